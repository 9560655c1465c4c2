//! Producer ingest benchmark: `./manage.sh bench`.
//!
//! For 100,000 and 1,000,000 rows of `data/generate_data.py` output, in one run:
//! 1. a bare lapin publisher sends the same message bodies to the same kind of queue
//!    (a quorum work queue) with the same window of publisher confirms in flight: the
//!    baseline, with the CSV already parsed and encoded outside the timing;
//! 2. the release `producer` binary, as its own process, receives the file through
//!    HTTP and publishes it: from the first byte sent to the answer.
//!
//! It prints rows/s of both, their ratio (target >= 0.8), and the producer's peak
//! resident memory (target < 64 MiB and within 10% between the two sizes).

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use lapin::{
    Channel, Connection, ConnectionProperties,
    options::{BasicPublishOptions, ConfirmSelectOptions, QueuePurgeOptions},
};
use spillway_common::{
    envelope::{RowMessageRef, message_id, row_properties},
    testing::{TestVhost, wait_for},
    topology,
};

const WINDOW: usize = 2000;
const QUEUE: &str = "tasks";
const DELIVERY_LIMIT: u32 = 5;

struct Measured {
    rows: u64,
    producer_rows_per_s: f64,
    bare_rows_per_s: f64,
    producer_peak_rss_kib: u64,
}

#[tokio::main]
async fn main() {
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let producer_bin = std::env::var_os("PRODUCER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/release/producer"));
    assert!(
        producer_bin.exists(),
        "{} is missing: run `cargo build --release --bin producer` (./manage.sh bench does)",
        producer_bin.display()
    );
    let vhost = TestVhost::new("bench").await;
    let workdir = tempfile::tempdir().expect("a temp dir");

    let mut results = Vec::new();
    for rows in [100_000u64, 1_000_000] {
        let csv = workdir.path().join(format!("{rows}.csv"));
        generate(&root, &csv, rows);
        let bare = bare_publisher(&vhost, &csv).await;
        purge(&vhost).await;
        let (producer, rss) = through_producer(&producer_bin, &vhost, &csv, rows).await;
        purge(&vhost).await;
        results.push(Measured {
            rows,
            producer_rows_per_s: producer,
            bare_rows_per_s: bare,
            producer_peak_rss_kib: rss,
        });
    }

    println!();
    println!("| rows | producer rows/s | bare lapin rows/s | ratio | producer peak RSS |");
    println!("|---:|---:|---:|---:|---:|");
    for m in &results {
        println!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.1} MiB |",
            m.rows,
            m.producer_rows_per_s,
            m.bare_rows_per_s,
            m.producer_rows_per_s / m.bare_rows_per_s,
            m.producer_peak_rss_kib as f64 / 1024.0
        );
    }
    let (small, large) = (&results[0], &results[1]);
    let growth = large.producer_peak_rss_kib as f64 / small.producer_peak_rss_kib as f64 - 1.0;
    println!(
        "\npeak RSS grows {:+.1}% from {} to {} rows (target: within 10%, under 64 MiB); ratio target >= 0.80",
        growth * 100.0,
        small.rows,
        large.rows
    );
}

fn generate(root: &Path, out: &Path, rows: u64) {
    let status = Command::new("python3")
        .arg(root.join("data/generate_data.py"))
        .args(["--rows", &rows.to_string(), "--out"])
        .arg(out)
        .status()
        .expect("python3 runs data/generate_data.py");
    assert!(status.success(), "generate_data.py failed");
}

async fn channel(vhost: &TestVhost) -> (Connection, Channel) {
    let connection = Connection::connect(&vhost.amqp_url, ConnectionProperties::default())
        .await
        .expect("connect to the bench vhost");
    let channel = connection.create_channel().await.unwrap();
    topology::declare_work_queue(&channel, QUEUE, DELIVERY_LIMIT)
        .await
        .unwrap();
    (connection, channel)
}

async fn purge(vhost: &TestVhost) {
    let (_connection, channel) = channel(vhost).await;
    channel
        .queue_purge(QUEUE.into(), QueuePurgeOptions::default())
        .await
        .unwrap();
}

/// Rows/s of a plain lapin publisher sending the producer's message bodies.
async fn bare_publisher(vhost: &TestVhost, csv: &Path) -> f64 {
    let mut reader = csv::Reader::from_path(csv).unwrap();
    let headers: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
    let bodies: Vec<(u64, Vec<u8>)> = reader
        .records()
        .enumerate()
        .map(|(i, record)| {
            let record = record.unwrap();
            let fields: Vec<&str> = record.iter().collect();
            let line = i as u64 + 2;
            let message = RowMessageRef {
                batch_id: "bare",
                job_type: "default",
                line,
                row: i as u64 + 1,
                headers: &headers,
                fields,
            };
            (line, serde_json::to_vec(&message).unwrap())
        })
        .collect();

    let (_connection, channel) = channel(vhost).await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let started = Instant::now();
    let mut pending = VecDeque::with_capacity(WINDOW);
    for (line, body) in &bodies {
        if pending.len() == WINDOW {
            let confirm: lapin::PublisherConfirm = pending.pop_front().unwrap();
            assert!(confirm.await.unwrap().is_ack());
        }
        let confirm = channel
            .basic_publish(
                "".into(),
                QUEUE.into(),
                BasicPublishOptions::default(),
                body,
                row_properties(&message_id("bare", *line)),
            )
            .await
            .unwrap();
        pending.push_back(confirm);
    }
    for confirm in pending {
        assert!(confirm.await.unwrap().is_ack());
    }
    let rate = bodies.len() as f64 / started.elapsed().as_secs_f64();
    println!(
        "bare lapin publisher: {} rows at {rate:.0} rows/s",
        bodies.len()
    );
    rate
}

/// Rows/s of the producer process for an HTTP upload of `csv`, and its peak RSS in KiB.
async fn through_producer(bin: &Path, vhost: &TestVhost, csv: &Path, rows: u64) -> (f64, u64) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let child = Command::new(bin)
        .env("PRODUCER_LISTEN", addr.to_string())
        .env("AMQP_URL", &vhost.amqp_url)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start the producer");
    let child = KillOnDrop(child);
    let client = reqwest::Client::new();
    let base = format!("http://{addr}");
    wait_for(
        "the producer to listen",
        Duration::from_secs(30),
        || async { client.get(format!("{base}/healthz")).send().await.is_ok() },
    )
    .await;

    let file = tokio::fs::File::open(csv).await.unwrap();
    let length = file.metadata().await.unwrap().len();
    let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
    let part = reqwest::multipart::Part::stream_with_length(body, length).file_name("data.csv");
    let form = reqwest::multipart::Form::new().part("file", part);
    let started = Instant::now();
    let response = client
        .post(format!("{base}/upload"))
        .multipart(form)
        .send()
        .await
        .expect("the producer answers");
    let elapsed = started.elapsed();
    let status = response.status();
    let answer: serde_json::Value = response.json().await.unwrap();
    assert!(status.is_success(), "upload failed: {status} {answer}");
    assert_eq!(answer["rows"].as_u64(), Some(rows), "{answer}");
    let rss = peak_rss_kib(child.0.id());
    let rate = rows as f64 / elapsed.as_secs_f64();
    println!("producer over HTTP: {rows} rows at {rate:.0} rows/s, peak RSS {rss} KiB");
    (rate, rss)
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
