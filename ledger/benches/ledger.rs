//! Ledger benchmarks, part of `./manage.sh bench`: results read out of the ledger and
//! outcomes written into it, each against PostgreSQL doing the same work by the
//! shortest path, in the same run on the same database.
//!
//! - **e.** A batch of 1,000,000 rows of `data/generate_data.py` output, recorded as the
//!   producer records it (`COPY`) and then finished (every row `done` with the result
//!   the built-in `simulate` handler gives), downloaded as CSV through the release
//!   `producer`'s `GET /batches/{id}/results` as a client saving it would: from the
//!   request to the last byte. The baseline is a bare `COPY ... TO STDOUT` of the same
//!   rows and columns (the statement the ledger streams) read through sqlx in this
//!   process. Two runs each, in the order producer, COPY, COPY, producer, each producer
//!   a fresh process; after an untimed COPY that brings the rows into memory. Also the
//!   producer's peak resident memory for that download against its own for a batch of
//!   a tenth as many rows.
//! - **f.** The outcomes of 100,000 rows (done, with a `simulate` result) written as a
//!   worker's recorder writes them: [`Ledger::record`] with up to
//!   [`spillway_worker::record::MAX_BATCH`] outcomes a call, one call after another.
//!   The baseline is a bare `INSERT ... SELECT FROM unnest(...)` of the same columns
//!   into a table that has nothing else (no constraint, no default), one statement per
//!   as many rows. A call of each side in turn (so a stall of the machine lands on both
//!   alike), three rounds, each after a `VACUUM` and a `CHECKPOINT`.
//! - **f2.** Those outcomes folded into their rows and their batch's counts
//!   ([`Ledger::fold`], as the producer folds), against a bare `UPDATE ... FROM
//!   unnest(...)` of the same columns of as many rows of another batch, in as many
//!   transactions. Not on a worker's path; reported so the work the log moves is seen.
//!
//! `BENCH_ROWS` replaces every row count, for a quick run. Records its figures in
//! `target/bench-results/ledger.json`.

use std::{
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use futures_util::StreamExt;
use spillway_ledger::{
    BatchState, Ledger, NewBatch, Outcome, RowStatus,
    outcomes::{FOLD_CHUNK, OutcomeColumns},
};
use spillway_testkit::{
    TestDatabase, TestVhost,
    bench::{
        self,
        process::{Producer, Received, generate_csv, peak_rss_kib},
        results::{Figure, Measure, record},
    },
    ledger::record_published_batch,
};
use spillway_worker::record::MAX_BATCH;
use sqlx::postgres::PgPoolCopyExt;

const DOWNLOAD_ROWS: u64 = 1_000_000;
const RECORD_ROWS: u64 = 100_000;
/// Rounds of f, each a run of both sides, call by call.
const WRITE_ROUNDS: usize = 3;
/// What the built-in `simulate` handler records as a row's result at 0 ms.
const SIMULATE_RESULT: &str = r#"{"simulated_ms":0}"#;
const WORKER: &str = "bench-worker";

#[tokio::main]
async fn main() {
    let download_rows = bench::rows(DOWNLOAD_ROWS);
    let record_rows = bench::rows(RECORD_ROWS);
    let database = TestDatabase::new("bench-ledger").await;
    // The producer connects to a broker; nothing is published in this benchmark.
    let vhost = TestVhost::new("bench-ledger").await;
    let ledger = Ledger::open(&database.url, 8).expect("the test database's URL");
    ledger.ready().await.expect("the ledger's schema");
    let dir = tempfile::tempdir().expect("a temp dir");
    let csv = dir.path().join("rows.csv");
    generate_csv(&csv, download_rows.max(record_rows));

    let download = download(&ledger, &vhost, &database, &csv, download_rows).await;
    let [writes, folds] = write_outcomes(&ledger, &csv, record_rows).await;
    record(
        "ledger",
        &[download.throughput, download.memory, writes, folds],
    );
}

// e: results download

struct Download {
    throughput: Figure,
    memory: Figure,
}

async fn download(
    ledger: &Ledger,
    vhost: &TestVhost,
    database: &TestDatabase,
    csv: &Path,
    rows: u64,
) -> Download {
    let small_rows = (rows / 10).max(1);
    let (large, small) = ("bench-download-large", "bench-download-small");
    for (batch_id, n) in [(large, rows), (small, small_rows)] {
        record_batch(ledger, batch_id, csv, n).await;
        finish_every_row(ledger, batch_id).await;
    }
    vacuum(ledger).await;
    println!("an untimed COPY first, to bring the rows into memory:");
    bare_copy(ledger, large, rows).await;

    // The peak of a fresh producer that downloaded the small batch only.
    let producer = Producer::start(&vhost.amqp_url, None, &database.url).await;
    let (elapsed, _) = through_producer(&producer, small, small_rows).await;
    let small_rss = peak_rss_kib(producer.process.pid());
    println!(
        "producer download: {small_rows} rows in {:.2} s, peak RSS {small_rss} KiB",
        elapsed.as_secs_f64()
    );
    drop(producer);

    // Producer, COPY, COPY, producer: neither gains from going first.
    let (mut spillway, mut baseline, mut large_rss) = (Vec::new(), Vec::new(), 0);
    for producer_turn in [true, false, false, true] {
        if producer_turn {
            let producer = Producer::start(&vhost.amqp_url, None, &database.url).await;
            let (elapsed, received) = through_producer(&producer, large, rows).await;
            let rss = peak_rss_kib(producer.process.pid());
            println!(
                "producer download: {rows} rows ({:.1} MiB in {} chunks) in {:.2} s, peak RSS \
                 {rss} KiB",
                received.bytes as f64 / 1048576.0,
                received.chunks,
                elapsed.as_secs_f64()
            );
            spillway.push(elapsed);
            large_rss = large_rss.max(rss);
        } else {
            baseline.push(bare_copy(ledger, large, rows).await);
        }
    }
    Download {
        throughput: Figure {
            key: "e1".into(),
            what: format!("results download, {rows} rows of CSV over HTTP"),
            spillway: Measure::mean_throughput(rows, &spillway),
            baseline: Measure::mean_throughput(rows, &baseline),
            note: "`GET /batches/{id}/results` of a finished batch from the release `producer`, \
                   read as it arrives, from the request to the last byte; against a bare `COPY \
                   ... TO STDOUT` of the same rows and columns read through sqlx; mean of two \
                   runs each (producer, COPY, COPY, producer); higher is better, goal: at least \
                   200000 rows/s for the producer (its own figure, not the ratio)"
                .into(),
        },
        memory: Figure {
            key: "e2".into(),
            what: format!("producer peak RSS, {rows}- vs {small_rows}-row download"),
            spillway: Measure::Kib(large_rss),
            baseline: Measure::Kib(small_rss),
            note: format!(
                "the peak resident memory (VmHWM) of a fresh release `producer` that served the \
                 {rows}-row download (the higher of its two runs) against one that served the \
                 {small_rows}-row one: the rows are streamed, so memory stays flat; lower is \
                 better, goal: under 64 MiB whatever the batch size"
            ),
        },
    }
}

/// A download from a producer that has served a request already, as a client reading
/// the batch first does: its connections to PostgreSQL are open.
async fn through_producer(producer: &Producer, batch_id: &str, rows: u64) -> (Duration, Received) {
    let batch = producer.get_json(&format!("/batches/{batch_id}")).await;
    assert_eq!(batch["state"], "done", "{batch}");
    let (elapsed, received) = producer
        .download(&format!("/batches/{batch_id}/results"))
        .await;
    // A header line, then a line per row: no field of the generated rows or their
    // results holds a line break.
    assert_eq!(received.lines, rows + 1, "{received:?}");
    (elapsed, received)
}

/// The statement the ledger streams a CSV download with (`ledger/src/results.rs`), for
/// the four columns of the generated rows.
async fn bare_copy(ledger: &Ledger, batch_id: &str, rows: u64) -> Duration {
    let statement = format!(
        "COPY (SELECT r.fields[1], r.fields[2], r.fields[3], r.fields[4], r.line, r.status,
                      r.result, r.error, r.attempts
               FROM batch_rows r WHERE r.batch_id = '{batch_id}'
               ORDER BY r.line)
         TO STDOUT (FORMAT csv)"
    );
    let started = Instant::now();
    let mut received = Received::default();
    let mut stream = ledger
        .pool()
        .copy_out_raw(&statement)
        .await
        .expect("COPY TO STDOUT starts");
    while let Some(chunk) = stream.next().await {
        received.add(&chunk.expect("COPY's bytes"));
    }
    let elapsed = started.elapsed();
    assert_eq!(received.lines, rows, "{received:?}");
    println!(
        "bare COPY TO STDOUT: {rows} rows ({:.1} MiB in {} chunks) in {:.2} s",
        received.bytes as f64 / 1048576.0,
        received.chunks,
        elapsed.as_secs_f64()
    );
    elapsed
}

/// Every row of `batch_id` done, with a result, and the batch with them: set directly,
/// as the quickest way to a finished batch of any size.
async fn finish_every_row(ledger: &Ledger, batch_id: &str) {
    sqlx::query(
        "UPDATE batch_rows SET status = 'done', attempts = 1, result = $2, worker = $3,
                settled_at = now()
         WHERE batch_id = $1",
    )
    .bind(batch_id)
    .bind(SIMULATE_RESULT)
    .bind(WORKER)
    .execute(ledger.pool())
    .await
    .expect("finish the batch's rows");
    sqlx::query(
        "UPDATE batches SET pending = 0, done = rows, started_at = now() WHERE batch_id = $1",
    )
    .bind(batch_id)
    .execute(ledger.pool())
    .await
    .expect("finish the batch");
    assert_state(ledger, batch_id, BatchState::Done).await;
}

// f: ledger writes, and f2: their fold

async fn write_outcomes(ledger: &Ledger, csv: &Path, rows: u64) -> [Figure; 2] {
    // The bare side's table: the outcome log's columns, without its constraint, its
    // default or anything else.
    sqlx::raw_sql(
        "CREATE TABLE bench_bare_outcomes (batch_id text, line bigint, status text,
             attempts integer, error text, result text, worker text, started float8)",
    )
    .execute(ledger.pool())
    .await
    .expect("the bare side's table");
    let (mut written, mut inserted) = (Vec::new(), Vec::new());
    let (mut folded, mut updated) = (Vec::new(), Vec::new());
    for round in 1..=WRITE_ROUNDS {
        // A batch for each side's rows: the ledger's outcomes are folded into its own,
        // the bare update updates the other.
        let ledgers = format!("bench-record-ledger-{round}");
        let bares = format!("bench-record-bare-{round}");
        let mut batch_ids = [&ledgers, &bares];
        if round % 2 == 0 {
            batch_ids.reverse();
        }
        for batch_id in batch_ids {
            record_batch(ledger, batch_id, csv, rows).await;
        }
        sqlx::raw_sql("TRUNCATE bench_bare_outcomes")
            .execute(ledger.pool())
            .await
            .expect("empty the bare side's table");
        // From vacuumed tables and a checkpoint, so neither side pays for the dead row
        // versions or the dirty pages of the rounds before.
        settle_down(ledger).await;
        let (ledger_outcomes, bare_outcomes) =
            (done_outcomes(&ledgers, rows), done_outcomes(&bares, rows));
        let (mut through, mut bare) = (Duration::ZERO, Duration::ZERO);
        // A call of each side in turn, first one then the other: a stall of the machine
        // (a slow flush of the write-ahead log) lands on both sides alike.
        let calls = ledger_outcomes
            .chunks(MAX_BATCH)
            .zip(bare_outcomes.chunks(MAX_BATCH));
        for (call, (ledger_chunk, bare_chunk)) in calls.enumerate() {
            if call % 2 == 0 {
                through += through_ledger(ledger, ledger_chunk).await;
                bare += bare_insert(ledger, bare_chunk).await;
            } else {
                bare += bare_insert(ledger, bare_chunk).await;
                through += through_ledger(ledger, ledger_chunk).await;
            }
        }
        println!(
            "round {round}: Ledger::record {rows} outcomes in {:.2} s, bare INSERT FROM unnest in {:.2} s",
            through.as_secs_f64(),
            bare.as_secs_f64()
        );
        written.push(through);
        inserted.push(bare);

        settle_down(ledger).await;
        let (fold, update) = if round % 2 == 1 {
            let fold = fold_all(ledger, rows).await;
            (fold, bare_update(ledger, &bare_outcomes).await)
        } else {
            let update = bare_update(ledger, &bare_outcomes).await;
            (fold_all(ledger, rows).await, update)
        };
        assert_state(ledger, &ledgers, BatchState::Done).await;
        println!(
            "round {round}: Ledger::fold {rows} outcomes in {:.2} s, bare UPDATE FROM unnest in {:.2} s",
            fold.as_secs_f64(),
            update.as_secs_f64()
        );
        folded.push(fold);
        updated.push(update);
    }
    [
        Figure {
            key: "f".into(),
            what: format!("ledger writes, {rows} outcomes, {MAX_BATCH} a transaction"),
            spillway: Measure::mean_throughput(rows, &written),
            baseline: Measure::mean_throughput(rows, &inserted),
            note: format!(
                "`Ledger::record`, as a worker's recorder calls it, with {MAX_BATCH} outcomes \
                 a call: one `INSERT` into the outcome log; against a bare `INSERT ... SELECT \
                 FROM unnest(...)` of the same columns into a table with nothing else, one \
                 statement per {MAX_BATCH}; a call of each in turn, after a VACUUM and a \
                 CHECKPOINT; mean of {WRITE_ROUNDS} rounds; higher is better, target >= 0.80"
            ),
        },
        Figure {
            key: "f2".into(),
            what: format!("outcomes folded, {rows} rows, up to {FOLD_CHUNK} a transaction"),
            spillway: Measure::mean_throughput(rows, &folded),
            baseline: Measure::mean_throughput(rows, &updated),
            note: format!(
                "`Ledger::fold`, as the producer calls it, of the {rows} outcomes f logged: each \
                 row updated unless already final (then it keeps its outcome) and the batch's \
                 counters moved by the rows it changed, one statement per up to {FOLD_CHUNK} \
                 outcomes, each its own transaction; against a bare `UPDATE batch_rows ... \
                 FROM unnest(...)` of the same columns of as many rows of another batch, \
                 {FOLD_CHUNK} a statement and a transaction; after a VACUUM and a CHECKPOINT, \
                 each first in turn; mean of {WRITE_ROUNDS} rounds; higher is better; off the \
                 workers' path, so no target of its own (c counts it)"
            ),
        },
    ]
}

fn done_outcomes(batch_id: &str, rows: u64) -> Vec<Outcome> {
    let started_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs_f64();
    (0..rows)
        .map(|i| Outcome {
            batch_id: batch_id.into(),
            line: i + 2,
            status: RowStatus::Done,
            attempts: 1,
            error: None,
            result: Some(SIMULATE_RESULT.into()),
            started_unix,
        })
        .collect()
}

/// One call of `Ledger::record`, as a worker's recorder makes it.
async fn through_ledger(ledger: &Ledger, outcomes: &[Outcome]) -> Duration {
    let started = Instant::now();
    ledger
        .record(WORKER, outcomes)
        .await
        .expect("outcomes recorded");
    started.elapsed()
}

/// What writing the outcomes takes at the least: the same columns as
/// `Ledger::record` writes, in one statement, into a table with nothing else.
async fn bare_insert(ledger: &Ledger, outcomes: &[Outcome]) -> Duration {
    let started = Instant::now();
    let columns = OutcomeColumns::of(outcomes);
    let inserted = sqlx::query(
        "INSERT INTO bench_bare_outcomes
         SELECT u.batch_id, u.line, u.status, u.attempts, u.error, u.result, $8, u.started
         FROM unnest($1::text[], $2::int8[], $3::text[], $4::int4[], $5::text[], $6::text[],
                     $7::float8[]) AS u(batch_id, line, status, attempts, error, result, started)",
    )
    .bind(&columns.batch_ids)
    .bind(&columns.lines)
    .bind(&columns.statuses)
    .bind(&columns.attempts)
    .bind(&columns.errors)
    .bind(&columns.results)
    .bind(&columns.started)
    .bind(WORKER)
    .execute(ledger.pool())
    .await
    .expect("the bare insert")
    .rows_affected();
    let elapsed = started.elapsed();
    assert_eq!(inserted, outcomes.len() as u64, "every outcome is inserted");
    elapsed
}

/// One `Ledger::fold` of the `rows` outcomes logged, as the producer makes it.
async fn fold_all(ledger: &Ledger, rows: u64) -> Duration {
    let started = Instant::now();
    let folded = ledger.fold().await.expect("outcomes folded");
    let elapsed = started.elapsed();
    assert_eq!(
        (folded.outcomes, folded.rows_changed),
        (rows, rows),
        "every outcome logged is folded, and changes its row"
    );
    elapsed
}

/// What applying the outcomes to their rows takes at the least: the same columns as
/// `Ledger::fold` writes, in one statement and one transaction per as many rows as a
/// fold takes at once, and nothing else.
async fn bare_update(ledger: &Ledger, outcomes: &[Outcome]) -> Duration {
    let started = Instant::now();
    for chunk in outcomes.chunks(FOLD_CHUNK) {
        let columns = OutcomeColumns::of(chunk);
        let updated = sqlx::query(
            "UPDATE batch_rows r SET status = u.status, attempts = u.attempts, error = u.error,
                    result = u.result, worker = $7, settled_at = now()
             FROM unnest($1::text[], $2::int8[], $3::text[], $4::int4[], $5::text[], $6::text[])
                  AS u(batch_id, line, status, attempts, error, result)
             WHERE r.batch_id = u.batch_id AND r.line = u.line",
        )
        .bind(&columns.batch_ids)
        .bind(&columns.lines)
        .bind(&columns.statuses)
        .bind(&columns.attempts)
        .bind(&columns.errors)
        .bind(&columns.results)
        .bind(WORKER)
        .execute(ledger.pool())
        .await
        .expect("the bare update")
        .rows_affected();
        assert_eq!(updated, chunk.len() as u64, "every outcome updates its row");
    }
    started.elapsed()
}

// set-up shared by both

/// Records a batch of the first `rows` data rows of `csv` as the producer does (its rows
/// with `COPY`, in one transaction), and marks it published.
async fn record_batch(ledger: &Ledger, batch_id: &str, csv: &Path, rows: u64) {
    let mut reader = csv::Reader::from_path(csv)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", csv.display()));
    let header: Vec<String> = reader
        .headers()
        .expect("a header line")
        .iter()
        .map(String::from)
        .collect();
    let batch = NewBatch {
        tenant: "default",
        batch_id,
        job_type: "default",
        queue: "tasks",
        file_name: Some("rows.csv"),
        header: &header,
        rows: Some(rows),
        callback_url: None,
    };
    // generate_data.py writes one line per row, after the header on line 1.
    let lines = reader
        .into_records()
        .take(rows as usize)
        .zip(2..)
        .map(|(row, line)| {
            (
                line,
                row.expect("a well-formed row")
                    .iter()
                    .map(String::from)
                    .collect::<Vec<_>>(),
            )
        });
    record_published_batch(ledger, &batch, lines).await;
    assert_state(ledger, batch_id, BatchState::Queued).await;
}

/// Leaves no dead row versions or stale statistics from the set-up to the timed part.
async fn vacuum(ledger: &Ledger) {
    sqlx::raw_sql("VACUUM ANALYZE batches, batch_rows, row_outcomes")
        .execute(ledger.pool())
        .await
        .expect("vacuum the ledger's tables");
}

/// Vacuums, then writes every dirty page out: a timed run then pays only for its own
/// writes.
async fn settle_down(ledger: &Ledger) {
    vacuum(ledger).await;
    sqlx::raw_sql("CHECKPOINT")
        .execute(ledger.pool())
        .await
        .expect("a checkpoint (the benchmark's database user must be allowed one)");
}

async fn assert_state(ledger: &Ledger, batch_id: &str, state: BatchState) {
    let batch = ledger
        .batch(batch_id)
        .await
        .expect("read the batch")
        .expect("the batch is recorded");
    assert_eq!(batch.state, state, "{batch:?}");
}
