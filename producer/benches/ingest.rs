//! Producer ingest benchmark, part of `./manage.sh bench`.
//!
//! For 100,000 and 1,000,000 rows of `data/generate_data.py` output, in one run:
//! 1. a bare lapin publisher sends the same message bodies to the same kind of queue
//!    (a quorum work queue) with the same window of publisher confirms in flight: the
//!    baseline, with the CSV already parsed and encoded outside the timing, and no
//!    database;
//! 2. the release `producer` binary, as its own process, receives the file through
//!    HTTP, records the batch and every row in its ledger (PostgreSQL, `COPY`) and
//!    publishes it: from the first byte sent to the answer.
//!
//! Each runs twice, in the order producer, bare, bare, producer, with the queue purged
//! after every run. It records the mean rows/s of both (ratio target >= 0.8: the
//! ledger must not make ingest slower than the broker allows) and the producer's peak
//! resident memory for both sizes (target: under 64 MiB, within 10% of each other) in
//! `target/bench-results/ingest.json`. `BENCH_ROWS` replaces the larger size (the
//! smaller is a tenth of it), for a quick run.

use std::{path::Path, time::Duration};

use lapin::options::QueuePurgeOptions;
use spillway_common::jobs_config::JobsConfig;
use spillway_testkit::{
    TestDatabase, TestVhost,
    bench::{
        self,
        baseline::{CONFIRM_WINDOW, csv_rows, publish_confirmed, work_queue_channel},
        process::{Producer, generate_csv, peak_rss_kib},
        results::{Figure, Measure, record},
    },
};

#[tokio::main]
async fn main() {
    let jobs = JobsConfig::load(None).expect("the built-in job types");
    let job = jobs
        .job_type(&jobs.default_job_type)
        .expect("the default job type");
    let vhost = TestVhost::new("bench-ingest").await;
    let database = TestDatabase::new("bench-ingest").await;
    let workdir = tempfile::tempdir().expect("a temp dir");

    let mut figures = Vec::new();
    let mut peak_rss = Vec::new();
    let large = bench::rows(1_000_000);
    for (key, rows) in [("a1", (large / 10).max(1)), ("a2", large)] {
        let csv = workdir.path().join(format!("{rows}.csv"));
        generate_csv(&csv, rows);
        let (_connection, channel) = work_queue_channel(&vhost.amqp_url, job).await;
        let bodies = csv_rows(&csv, "bare", &jobs.default_job_type);
        let producer = Producer::start(&vhost.amqp_url, None, &database.url).await;

        // Producer, bare, bare, producer: a run right after another's purge of a
        // million rows finds the broker still tidying its queue, so each side takes
        // that turn once.
        let (mut bare, mut uploads) = (Vec::new(), Vec::new());
        for producer_turn in [true, false, false, true] {
            if producer_turn {
                uploads.push(upload(&producer, &csv, rows).await);
            } else {
                let elapsed = publish_confirmed(&channel, &job.queue, &bodies).await;
                println!(
                    "bare lapin publisher: {rows} rows in {:.2} s",
                    elapsed.as_secs_f64()
                );
                bare.push(elapsed);
            }
            purge(&channel, &job.queue).await;
        }
        drop(bodies);
        let rss = peak_rss_kib(producer.process.pid());
        println!("producer peak RSS over both uploads of {rows} rows: {rss} KiB");

        peak_rss.push((rows, rss));
        figures.push(Figure {
            key: key.into(),
            what: format!("producer ingest, {rows} rows over HTTP"),
            spillway: Measure::mean_throughput(rows, &uploads),
            baseline: Measure::mean_throughput(rows, &bare),
            note: format!(
                "upload of a generated CSV to the release `producer` until its answer (every row \
                 recorded in the ledger, then published and confirmed), against a bare lapin \
                 publisher (no database) sending the same bodies to the same quorum queue with \
                 {CONFIRM_WINDOW} confirms in flight; mean of two runs each, in the order \
                 producer, bare, bare, producer; higher is better, target >= 0.80"
            ),
        });
    }
    let [(small_rows, small_rss), (large_rows, large_rss)] = peak_rss[..] else {
        unreachable!("two sizes were measured")
    };
    figures.push(Figure {
        key: "a3".into(),
        what: format!("producer peak RSS, {large_rows} vs {small_rows} rows"),
        spillway: Measure::Kib(large_rss),
        baseline: Measure::Kib(small_rss),
        note: format!(
            "the producer's peak resident memory (VmHWM) for the {large_rows}-row upload against \
             its own for {small_rows} rows: the file is streamed, so memory stays flat; target \
             <= 1.10 and under 64 MiB"
        ),
    });
    record("ingest", &figures);
}

/// Uploads `csv` of `rows` rows to `producer`, checks the ledger has every row
/// published, and returns the time to the answer.
async fn upload(producer: &Producer, csv: &Path, rows: u64) -> Duration {
    let ledger_before = producer.metric("ledger_write_seconds_sum").await;
    let publishing_before = producer.metric("publish_seconds_sum").await;
    let (elapsed, answer) = producer.upload(csv).await;
    assert_eq!(answer["rows"].as_u64(), Some(rows), "{answer}");
    let batch = producer
        .get_json(&format!(
            "/batches/{}",
            answer["batch_id"].as_str().unwrap_or("")
        ))
        .await;
    assert_eq!(
        batch["published"].as_u64(),
        Some(rows),
        "the ledger: {batch}"
    );
    // How much of the upload was recording it in the ledger and how much publishing
    // it, to tell the ledger's share from the broker's when the ratio falls short.
    let spent = |before: Option<f64>, after: Option<f64>| match (before, after) {
        (Some(before), Some(after)) => format!("{:.2}", after - before),
        _ => "?".into(),
    };
    let ledger = spent(
        ledger_before,
        producer.metric("ledger_write_seconds_sum").await,
    );
    let publishing = spent(
        publishing_before,
        producer.metric("publish_seconds_sum").await,
    );
    println!(
        "producer over HTTP: {rows} rows in {:.2} s ({ledger} s of it waiting, once validated, \
         for the ledger, {publishing} s publishing)",
        elapsed.as_secs_f64(),
    );
    elapsed
}

async fn purge(channel: &lapin::Channel, queue: &str) {
    channel
        .queue_purge(queue.into(), QueuePurgeOptions::default())
        .await
        .expect("purge the work queue");
}
