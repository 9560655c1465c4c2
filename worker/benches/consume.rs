//! Worker consume benchmark, part of `./manage.sh bench`.
//!
//! In one run, on one quorum work queue holding 100,000 row messages each time:
//! 1. a bare lapin consumer at prefetch 200 takes and acks every message, without
//!    waiting for one ack before taking the next, and writes nowhere: the baseline;
//! 2. the release `worker` binary, with the `simulate` handler at 0 ms (a no-op) and
//!    the same prefetch, does the same, recording every row's outcome in its ledger
//!    (PostgreSQL) before acking it, timed from its start until no row is left ready
//!    (the management API then confirms every row was acked, and the ledger that the
//!    batch is done). The batch is recorded in the ledger beforehand, as the producer
//!    would have, so each outcome changes a row.
//!
//! Two runs each, in the order worker, bare, bare, worker, each worker run on a batch
//! of its own.
//!
//! Records rows/s of both (ratio target >= 0.8) in `target/bench-results/consume.json`.
//! `BENCH_ROWS` replaces the 100,000, for a quick run.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use lapin::{Channel, options::QueuePurgeOptions};
use spillway_common::jobs_config::JobsConfig;
use spillway_ledger::{BatchState, Ledger, NewBatch};
use spillway_testkit::{
    TestDatabase, TestVhost,
    bench::{
        self,
        baseline::{
            Row, SAMPLE_FIELDS, SAMPLE_HEADER, consume_acked, publish_confirmed, queue_counts,
            sample_rows, work_queue_channel,
        },
        process::{Process, release_binary},
        results::{Figure, Measure, record},
    },
    ledger::record_published_batch,
    wait_for,
};

const ROWS: u64 = 100_000;
const JOB_TYPE: &str = "default";
const PREFETCH: u16 = 200;
const JOBS: &str = "[job_types.default]\nqueue = \"tasks\"\nsimulate_ms = 0\n";

#[tokio::main]
async fn main() {
    let worker_bin = release_binary("worker");
    let dir = tempfile::tempdir().expect("a temp dir");
    let jobs_path = dir.path().join("jobs.toml");
    std::fs::write(&jobs_path, JOBS).expect("write jobs.toml");
    let jobs = JobsConfig::load(Some(&jobs_path)).expect("the benchmark's job types");
    let job = jobs.job_type("default").expect("the default job type");
    let vhost = TestVhost::new("bench-consume").await;
    let database = TestDatabase::new("bench-consume").await;
    let ledger = Ledger::open(&database.url, 2).expect("the test database's URL");
    let (_connection, channel) = work_queue_channel(&vhost.amqp_url, job).await;
    let rows_count = bench::rows(ROWS);

    // Worker, bare, bare, worker: neither gains from going first (a cold queue).
    let (mut bare, mut worker) = (Vec::new(), Vec::new());
    for (run, worker_turn) in [true, false, false, true].into_iter().enumerate() {
        // A batch of its own for each run: a row already done keeps its outcome.
        let batch_id = format!("bench-{run}");
        if worker_turn {
            record_published_batch(
                &ledger,
                &NewBatch {
                    tenant: "default",
                    batch_id: &batch_id,
                    job_type: JOB_TYPE,
                    queue: &job.queue,
                    file_name: None,
                    header: &SAMPLE_HEADER.map(String::from),
                    rows: Some(rows_count),
                    callback_url: None,
                },
                (1..=rows_count).map(|line| (line, SAMPLE_FIELDS)),
            )
            .await;
        }
        let rows = sample_rows(rows_count, &batch_id, JOB_TYPE);
        fill(&channel, &job.queue, &rows).await;
        drop(rows);
        if worker_turn {
            let run = Run {
                bin: &worker_bin,
                vhost: &vhost,
                database_url: &database.url,
                jobs_path: &jobs_path,
                channel: &channel,
                queue: &job.queue,
                rows: rows_count,
            };
            worker.push(through_worker(&run).await);
            let batch = ledger
                .batch(&batch_id)
                .await
                .expect("read the batch")
                .expect("the batch is recorded");
            assert_eq!(
                (batch.state, batch.done),
                (BatchState::Done, rows_count),
                "{batch:?}"
            );
        } else {
            let elapsed = consume_acked(&vhost.amqp_url, &job.queue, rows_count, PREFETCH).await;
            println!(
                "bare lapin consumer: {rows_count} rows in {:.2} s",
                elapsed.as_secs_f64()
            );
            bare.push(elapsed);
        }
    }
    record(
        "consume",
        &[Figure {
            key: "b".into(),
            what: format!("worker consume and ack, {rows_count} rows, no-op handler"),
            spillway: Measure::mean_throughput(rows_count, &worker),
            baseline: Measure::mean_throughput(rows_count, &bare),
            note: format!(
                "the release `worker` (`simulate`, 0 ms, CONCURRENCY = PREFETCH = {PREFETCH}) from \
                 its start until the queue is empty, recording every row's outcome in the ledger \
                 before acking it, against a bare lapin consumer acking each row at the same \
                 prefetch and writing nowhere; mean of two runs each, in the order worker, bare, \
                 bare, worker; higher is better, target >= 0.80"
            ),
        }],
    );
}

async fn fill(channel: &Channel, queue: &str, rows: &[Row]) {
    channel
        .queue_purge(queue.into(), QueuePurgeOptions::default())
        .await
        .expect("purge the work queue");
    publish_confirmed(channel, queue, rows).await;
    wait_for(
        "the queue to hold every row",
        Duration::from_secs(30),
        || async { queue_counts(channel, queue).await.ready as usize == rows.len() },
    )
    .await;
}

/// One run of the worker binary.
struct Run<'a> {
    bin: &'a Path,
    vhost: &'a TestVhost,
    database_url: &'a str,
    jobs_path: &'a Path,
    channel: &'a Channel,
    queue: &'a str,
    rows: u64,
}

/// Time the worker binary with a no-op handler takes to empty the queue.
async fn through_worker(run: &Run<'_>) -> Duration {
    let Run {
        bin,
        vhost,
        database_url,
        jobs_path,
        channel,
        queue,
        rows,
    } = *run;
    let started = Instant::now();
    let mut worker = Process::spawn(
        Command::new(bin)
            .env("AMQP_URL", &vhost.amqp_url)
            .env("DATABASE_URL", database_url)
            .env("JOBS_CONFIG", jobs_path)
            .env("CONCURRENCY", PREFETCH.to_string())
            .env("PREFETCH", PREFETCH.to_string())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null()),
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    while !queue_counts(channel, queue).await.drained_by_consumers() {
        assert!(
            Instant::now() < deadline,
            "the worker did not empty the queue within 300 s"
        );
        worker.assert_running();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    // The rows still in the worker's hands when the last was delivered are no-ops
    // settled within milliseconds; the management API confirms every one was acked
    // before the worker is stopped (stopped earlier, it would hand back the deliveries
    // it had not started on, as a drain does). Its figures are sampled every few
    // seconds: one taken while the worker is attached is from this run.
    wait_for("every row acked", Duration::from_secs(60), || async {
        vhost
            .api
            .queue_stats(queue)
            .await
            .is_ok_and(|q| q.ready + q.unacked == 0 && q.consumers > 0)
    })
    .await;
    let status = worker.terminate();
    assert!(status.success(), "the worker drains and exits 0: {status}");
    let left = queue_counts(channel, queue).await.ready;
    assert_eq!(left, 0, "the worker left {left} rows behind on its drain");
    println!(
        "worker (no-op handler): {rows} rows in {:.2} s",
        elapsed.as_secs_f64()
    );
    elapsed
}
