//! Worker consume benchmark, part of `./manage.sh bench`.
//!
//! In one run, on one quorum work queue holding the same 100,000 row messages:
//! 1. a bare lapin consumer at prefetch 200 takes and acks every message, without
//!    waiting for one ack before taking the next: the baseline;
//! 2. the release `worker` binary, with the `simulate` handler at 0 ms (a no-op) and
//!    the same prefetch, does the same, timed from its start until no row is left
//!    ready (the management API then confirms every row was acked).
//!
//! Two runs each, in the order worker, bare, bare, worker.
//!
//! Records rows/s of both (ratio target >= 0.8) in `target/bench-results/consume.json`.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use lapin::{Channel, options::QueuePurgeOptions};
use spillway_common::jobs_config::JobsConfig;
use spillway_testkit::{
    TestVhost,
    bench::{
        baseline::{
            Row, consume_acked, publish_confirmed, queue_counts, sample_rows, work_queue_channel,
        },
        process::{Process, release_binary},
        results::{Figure, Measure, record},
    },
    wait_for,
};

const ROWS: u64 = 100_000;
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
    let (_connection, channel) = work_queue_channel(&vhost.amqp_url, job).await;
    let rows = sample_rows(ROWS, "bench", "default");

    // Worker, bare, bare, worker: neither gains from going first (a cold queue).
    let (mut bare, mut worker) = (Vec::new(), Vec::new());
    for worker_turn in [true, false, false, true] {
        fill(&channel, &job.queue, &rows).await;
        if worker_turn {
            worker
                .push(through_worker(&worker_bin, &vhost, &jobs_path, &channel, &job.queue).await);
        } else {
            let elapsed = consume_acked(&vhost.amqp_url, &job.queue, ROWS, PREFETCH).await;
            println!(
                "bare lapin consumer: {ROWS} rows in {:.2} s",
                elapsed.as_secs_f64()
            );
            bare.push(elapsed);
        }
    }
    let mean = |runs: &[Duration]| runs.iter().sum::<Duration>().as_secs_f64() / runs.len() as f64;
    record(
        "consume",
        &[Figure {
            key: "b".into(),
            what: format!("worker consume and ack, {ROWS} rows, no-op handler"),
            spillway: Measure::Throughput {
                rows: ROWS,
                seconds: mean(&worker),
            },
            baseline: Measure::Throughput {
                rows: ROWS,
                seconds: mean(&bare),
            },
            note: format!(
                "the release `worker` (`simulate`, 0 ms, CONCURRENCY = PREFETCH = {PREFETCH}) from \
                 its start until the queue is empty, against a bare lapin consumer acking each \
                 row at the same prefetch; mean of two runs each, in the order worker, bare, bare, worker; higher is better, \
                 target >= 0.80"
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
        || async { queue_counts(channel, queue).await.ready == ROWS as u32 },
    )
    .await;
}

/// Time the worker binary with a no-op handler takes to empty the queue.
async fn through_worker(
    bin: &Path,
    vhost: &TestVhost,
    jobs_path: &Path,
    channel: &Channel,
    queue: &str,
) -> Duration {
    let started = Instant::now();
    let mut worker = Process::spawn(
        Command::new(bin)
            .env("AMQP_URL", &vhost.amqp_url)
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
        "worker (no-op handler): {ROWS} rows in {:.2} s",
        elapsed.as_secs_f64()
    );
    elapsed
}
