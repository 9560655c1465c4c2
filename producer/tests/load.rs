//! Load: eight concurrent uploads of 100,000 rows each, through HTTP, to the real
//! `producer` binary running as a process of its own so its memory can be measured.
//! Every upload is answered 200 with all its rows under a batch id of its own, the
//! queue then holds every row, and the producer's peak resident memory stays within a
//! fixed bound above its idle memory: it streams uploads instead of holding them. The
//! uploads add up to about twice that bound, so holding them would break it.

use std::{
    collections::HashSet,
    process::Stdio,
    time::{Duration, Instant},
};

use reqwest::{StatusCode, multipart};
use serde_json::Value;
use spillway_testkit::{
    TestDatabase, TestVhost,
    bench::process::{peak_rss_kib, rss_kib},
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

const UPLOADS: u64 = 8;
const ROWS: u64 = 100_000;

/// The text column of every row: rows of about 160 bytes make each upload about
/// 16 MB, and all of them together about 128 MB, twice `PEAK_ABOVE_IDLE_KIB`.
const TEXT: &str = "a row of the load test, long enough that eight uploads of them add up to far \
                    more than the producer may hold in memory; with a comma, and \"quotes\"";

/// Rows per chunk of an upload's body, made as the client sends it.
const ROWS_PER_CHUNK: u64 = 1000;

/// How far the producer's peak resident memory may rise above its idle memory while
/// it takes every upload at once: a few windows of rows in flight, not whole files.
const PEAK_ABOVE_IDLE_KIB: u64 = 64 * 1024;

/// Time for the producer process to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Time for every upload to be answered: generous for a debug build on two cores.
const UPLOADS_TIMEOUT: Duration = Duration::from_secs(300);

#[tokio::test]
async fn eight_concurrent_uploads_of_100000_rows_all_land_in_bounded_memory() {
    let vhost = TestVhost::new("load").await;
    let database = TestDatabase::new("load").await;
    let (mut producer, base_url) = start_producer(&vhost, &database).await;
    let pid = producer.id().expect("the producer is running");
    let client = reqwest::Client::new();
    let health = client
        .get(format!("{base_url}/healthz"))
        .send()
        .await
        .expect("the producer answers /healthz");
    assert_eq!(health.status(), StatusCode::OK);
    let idle_kib = rss_kib(pid);

    let started = Instant::now();
    let uploads = (0..UPLOADS).map(|upload| {
        let form = multipart::Form::new().part(
            "file",
            multipart::Part::stream(csv(upload)).file_name("load.csv"),
        );
        let request = client.post(format!("{base_url}/upload")).multipart(form);
        async move {
            let response = request.send().await.expect("the producer answers");
            let status = response.status();
            let body: Value = response.json().await.expect("a JSON answer");
            (status, body)
        }
    });
    let answers = tokio::time::timeout(UPLOADS_TIMEOUT, futures_util::future::join_all(uploads))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{UPLOADS} uploads of {ROWS} rows were not all answered within {UPLOADS_TIMEOUT:?}"
            )
        });
    let elapsed = started.elapsed();
    let peak_kib = peak_rss_kib(pid);

    let mut batch_ids = HashSet::new();
    for (status, body) in &answers {
        assert_eq!(*status, StatusCode::OK, "{body}");
        assert_eq!(body["rows"].as_u64(), Some(ROWS), "{body}");
        batch_ids.insert(body["batch_id"].as_str().expect("a batch id").to_string());
    }
    assert_eq!(batch_ids.len() as u64, UPLOADS, "batch ids are distinct");
    assert_eq!(
        u64::from(vhost.ready("tasks").await.expect("the work queue exists")),
        UPLOADS * ROWS,
        "the queue holds every row of every upload"
    );
    println!(
        "{UPLOADS} x {ROWS} rows in {elapsed:.1?} ({:.0} rows/s); producer RSS idle {} MiB, peak {} MiB",
        (UPLOADS * ROWS) as f64 / elapsed.as_secs_f64(),
        idle_kib / 1024,
        peak_kib / 1024
    );
    assert!(
        peak_kib <= idle_kib + PEAK_ABOVE_IDLE_KIB,
        "the producer's peak RSS was {peak_kib} KiB, more than {PEAK_ABOVE_IDLE_KIB} KiB above \
         its idle {idle_kib} KiB: its memory grows with the uploads instead of staying bounded"
    );
    producer.kill().await.expect("stop the producer");
}

/// Upload `upload`'s CSV, made chunk by chunk as it is sent: a header and `ROWS`
/// rows that name their upload.
fn csv(upload: u64) -> reqwest::Body {
    let text = TEXT.replace('"', "\"\"");
    let chunks = (0..ROWS / ROWS_PER_CHUNK).map(move |chunk| {
        let mut csv = String::new();
        if chunk == 0 {
            csv.push_str("upload,n,text\n");
        }
        for n in chunk * ROWS_PER_CHUNK + 1..=(chunk + 1) * ROWS_PER_CHUNK {
            csv.push_str(&format!("{upload},{n},\"{text}\"\n"));
        }
        Ok::<_, std::io::Error>(csv)
    });
    reqwest::Body::wrap_stream(futures_util::stream::iter(chunks))
}

/// Starts the `producer` binary on a port of its choosing, publishing to `vhost`, and
/// returns it with its base URL once it says it is ready.
async fn start_producer(vhost: &TestVhost, database: &TestDatabase) -> (Child, String) {
    // The settings are the test's alone: nothing from the environment running it.
    let mut producer = Command::new(env!("CARGO_BIN_EXE_producer"))
        .env_clear()
        .env("AMQP_URL", &vhost.amqp_url)
        .env("DATABASE_URL", &database.url)
        .env("PRODUCER_LISTEN", "127.0.0.1:0")
        // Every upload from this one client at once.
        .env("MAX_UPLOADS_PER_CLIENT", UPLOADS.to_string())
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the producer binary");
    let mut log = BufReader::new(producer.stderr.take().expect("its log")).lines();
    let ready = async {
        while let Some(line) = log.next_line().await.expect("read the producer's log") {
            let Ok(event) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if event["message"] == "producer ready for uploads" {
                return event["listen"].as_str().map(str::to_string);
            }
        }
        None
    };
    let listen = tokio::time::timeout(START_TIMEOUT, ready)
        .await
        .unwrap_or_else(|_| {
            panic!("the producer did not say it was ready within {START_TIMEOUT:?}")
        })
        .expect("the producer exited before it was ready, or logged no `listen` address");
    // Keep reading its log so the producer never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });
    (producer, format!("http://{listen}"))
}
