//! Worker consume benchmark: `./manage.sh bench` (or `cargo bench -p spillway-worker`).
//!
//! In one run, on one quorum work queue holding the same 100,000 row messages:
//! 1. a bare lapin consumer at prefetch 200 takes and acks every message, without
//!    waiting for one ack before taking the next: the baseline;
//! 2. the release `worker` binary, with the `simulate` handler at 0 ms (a no-op) and
//!    the same prefetch, does the same, timed from its start to an empty queue.
//!
//! Prints rows/s of both and the ratio (target >= 0.8).

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use lapin::{
    Channel, Connection, ConnectionProperties,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueDeclareOptions, QueuePurgeOptions,
    },
    types::FieldTable,
};
use spillway_common::{
    envelope::{RowMessage, row_properties},
    testing::TestVhost,
    topology,
};

const ROWS: u64 = 100_000;
const PREFETCH: u16 = 200;
const QUEUE: &str = "tasks";

#[tokio::main]
async fn main() {
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let worker_bin = root.join("target/release/worker");
    assert!(
        worker_bin.exists(),
        "{} is missing: run `cargo build --release --bin worker` (./manage.sh bench does)",
        worker_bin.display()
    );
    let vhost = TestVhost::new("bench-worker").await;
    let connection = Connection::connect(&vhost.amqp_url, ConnectionProperties::default())
        .await
        .expect("connect to the bench vhost");
    let channel = connection.create_channel().await.unwrap();
    topology::declare_work_queue(&channel, QUEUE, 5)
        .await
        .unwrap();

    // Alternate the two, twice, so neither gains from going first (a warm queue).
    let (mut bare, mut worker) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        fill(&channel).await;
        worker.push(through_worker(&worker_bin, &vhost, &channel).await);
        fill(&channel).await;
        bare.push(bare_consumer(&vhost).await);
    }
    let mean = |rates: &[f64]| rates.iter().sum::<f64>() / rates.len() as f64;
    let (bare, worker) = (mean(&bare), mean(&worker));

    println!();
    println!("| rows | worker rows/s | bare lapin consumer rows/s | ratio |");
    println!("|---:|---:|---:|---:|");
    println!(
        "| {ROWS} | {worker:.0} | {bare:.0} | {:.2} |",
        worker / bare
    );
    println!(
        "\nmeans of two alternating runs each; prefetch {PREFETCH} for both; ratio target >= 0.80"
    );
}

async fn fill(channel: &Channel) {
    channel
        .queue_purge(QUEUE.into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .ok();
    let mut pending = Vec::with_capacity(2000);
    for line in 1..=ROWS {
        let row = RowMessage {
            batch_id: "bench".into(),
            job_type: "default".into(),
            line,
            row: line,
            headers: vec![
                "Date".into(),
                "Item Description".into(),
                "Quantity".into(),
                "Amount".into(),
            ],
            fields: vec![
                "2024-01-13".into(),
                "Desk lamp".into(),
                "4".into(),
                "119.06".into(),
            ],
        };
        let confirm = channel
            .basic_publish(
                "".into(),
                QUEUE.into(),
                BasicPublishOptions::default(),
                &serde_json::to_vec(&row).unwrap(),
                row_properties(&row.message_id()),
            )
            .await
            .unwrap();
        pending.push(confirm);
        if pending.len() == 2000 {
            for confirm in pending.drain(..) {
                assert!(confirm.await.unwrap().is_ack());
            }
        }
    }
    for confirm in pending {
        assert!(confirm.await.unwrap().is_ack());
    }
    assert_eq!(ready(channel).await, ROWS as u32);
}

async fn ready(channel: &Channel) -> u32 {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(QUEUE.into(), passive, FieldTable::default())
        .await
        .unwrap()
        .message_count()
}

/// Rows/s of a plain lapin consumer acking each message, acks pipelined.
async fn bare_consumer(vhost: &TestVhost) -> f64 {
    let started = Instant::now();
    let connection = Connection::connect(&vhost.amqp_url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            QUEUE.into(),
            "bare".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut taken = 0;
    while taken < ROWS {
        let delivery = consumer
            .next()
            .await
            .expect("consumer open")
            .expect("a delivery");
        let _: RowMessage = serde_json::from_slice(&delivery.data).unwrap();
        delivery.ack(BasicAckOptions::default()).await.unwrap();
        taken += 1;
    }
    let rate = ROWS as f64 / started.elapsed().as_secs_f64();
    println!("bare lapin consumer: {ROWS} rows at {rate:.0} rows/s");
    connection.close(200, "done".into()).await.unwrap();
    rate
}

/// Rows/s of the worker binary with a no-op handler, until the queue is empty.
async fn through_worker(bin: &PathBuf, vhost: &TestVhost, channel: &Channel) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let jobs = dir.path().join("jobs.toml");
    std::fs::write(
        &jobs,
        format!("[job_types.default]\nqueue = \"{QUEUE}\"\nsimulate_ms = 0\n"),
    )
    .unwrap();
    let started = Instant::now();
    let mut child = Command::new(bin)
        .env("AMQP_URL", &vhost.amqp_url)
        .env("JOBS_CONFIG", &jobs)
        .env("CONCURRENCY", PREFETCH.to_string())
        .env("PREFETCH", PREFETCH.to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start the worker");
    let deadline = Instant::now() + Duration::from_secs(300);
    while ready(channel).await > 0 {
        assert!(
            Instant::now() < deadline,
            "the worker did not empty the queue within 300 s"
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the worker exited early: {status}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let _ = Command::new("kill")
        .args(["-s", "TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "the worker drains and exits 0: {status}");
    let left = ready(channel).await;
    assert_eq!(left, 0, "the worker left {left} rows behind on its drain");
    let rate = ROWS as f64 / elapsed.as_secs_f64();
    println!("worker (no-op handler): {ROWS} rows at {rate:.0} rows/s");
    rate
}
