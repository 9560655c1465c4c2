//! The whole system for end-to-end tests: a producer in-process, the `scaler` binary
//! with the local launcher (which runs the `worker` binary), all on one vhost.
// Each test crate including this module uses part of it.
#![allow(dead_code)]

pub mod ledger;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use reqwest::StatusCode;
use serde_json::Value;
use spillway_common::events::{WorkerReport, unix_now};
use spillway_testkit::{TestVhost, events::EventListener, local_workers::registry};
use tokio_util::sync::CancellationToken;

/// A free port on 127.0.0.1 (free when asked; good enough for a test).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Scaler {
    child: Child,
    pub url: String,
}

impl Scaler {
    /// Starts the scaler with `dir/jobs.toml`, workers in `dir/workers`, its log in `dir/log`.
    pub fn start(vhost: &TestVhost, dir: &Path, log: &str) -> Self {
        Self::start_with(vhost, dir, log, &[])
    }

    /// [`Scaler::start`] with more environment for the scaler and its workers.
    pub fn start_with(vhost: &TestVhost, dir: &Path, log: &str, env: &[(&str, &str)]) -> Self {
        let port = free_port();
        let scaler = PathBuf::from(env!("CARGO_BIN_EXE_scaler"));
        let worker = scaler.with_file_name("worker");
        assert!(
            worker.exists(),
            "{} is missing: build it first (`cargo test --workspace` does)",
            worker.display()
        );
        // The ledger of the producer started in `dir`; without one, nothing answers
        // there, and workers keep the rows they cannot record.
        let database_url = std::fs::read_to_string(dir.join(DATABASE_URL_FILE))
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:1/none".into());
        let child = Command::new(&scaler)
            .env("AMQP_URL", &vhost.amqp_url)
            .env("DATABASE_URL", database_url)
            .env("RABBITMQ_API_URL", &vhost.api_url)
            .env("JOBS_CONFIG", dir.join("jobs.toml"))
            .env("WORKER_BIN", &worker)
            .env("WORKER_DIR", dir.join("workers"))
            .env("SCALER_LISTEN", format!("127.0.0.1:{port}"))
            .env("RECORD", dir.join("record"))
            .env("CONCURRENCY", "1")
            .env("PROGRESS_SECONDS", "1")
            .env("REPORT_STALE_SECONDS", "5")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(log)).unwrap())
            .spawn()
            .expect("start the scaler");
        Scaler {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Waits until the scaler answers `/readyz` with 200.
    pub async fn wait_ready(&self) {
        let readyz = format!("{}/readyz", self.url);
        spillway_testkit::wait_for(
            "the scaler to be ready",
            std::time::Duration::from_secs(60),
            || async {
                reqwest::get(&readyz)
                    .await
                    .is_ok_and(|r| r.status().is_success())
            },
        )
        .await;
    }

    /// Waits until the scaler has finished `ticks` ticks: observed, decided and acted.
    pub async fn wait_ticks(&self, ticks: u64) {
        self.wait_ready().await;
        // A tick is counted as it starts: once one more has started, this one is done.
        spillway_testkit::wait_for(
            &format!("the scaler to finish {ticks} ticks"),
            std::time::Duration::from_secs(60),
            || async { self.metric("spillway_scaler_ticks_total").await > ticks },
        )
        .await;
    }

    /// A counter or gauge from /metrics, named with its labels as the text shows it
    /// (`spillway_scaler_decisions_total{job_type="default",action="spawn"}`).
    ///
    /// Panics when the scaler does not answer or does not show the metric: a test
    /// that reads "spawned nothing" from a metric that was renamed must fail, not pass.
    pub async fn metric(&self, metric: &str) -> u64 {
        let text = self.get("/metrics").await.text().await.unwrap_or_default();
        text.lines()
            .find_map(|line| line.strip_prefix(metric)?.strip_prefix(' '))
            .map(|value| {
                value.trim().parse().unwrap_or_else(|e| {
                    panic!("metric {metric} has a value that is not a count: {value:?}: {e}")
                })
            })
            .unwrap_or_else(|| panic!("the scaler's /metrics has no {metric}:\n{text}"))
    }

    /// The scaler's scaling events (`/api/events`), newest first.
    pub async fn events(&self) -> Vec<Value> {
        self.get("/api/events")
            .await
            .json()
            .await
            .expect("the scaler's events are a JSON list")
    }

    /// GET `path` on the scaler; panics unless it answers 200.
    async fn get(&self, path: &str) -> reqwest::Response {
        let response = reqwest::get(format!("{}{path}", self.url))
            .await
            .unwrap_or_else(|e| panic!("the scaler at {} does not answer {path}: {e}", self.url));
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "GET {path} on the scaler"
        );
        response
    }

    /// Runs `dashboard.sh` with `args` against this scaler: success, stdout, stderr.
    pub fn dashboard_sh(&self, args: &[&str]) -> (bool, String, String) {
        let output = Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../dashboard.sh"))
            .args(args)
            .env("SCALER_URL", &self.url)
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    pub fn terminate(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the scaler stops cleanly: {status}");
    }

    /// SIGKILL: no chance to clean up, as when its node dies.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Scaler {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn recorded(dir: &Path) -> BTreeSet<u64> {
    std::fs::read_to_string(dir.join("record"))
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect()
}

/// The in-process producer, publishing to `vhost` with the job types in `dir/jobs.toml`.
pub async fn start_producer(vhost: &TestVhost, dir: &Path) -> (String, CancellationToken) {
    start_producer_with(vhost, dir, &[]).await
}

/// [`start_producer`] with more command-line settings.
pub async fn start_producer_with(
    vhost: &TestVhost,
    dir: &Path,
    args: &[&str],
) -> (String, CancellationToken) {
    let jobs = dir.join("jobs.toml");
    let jobs = jobs.to_str().expect("a UTF-8 temporary path");
    let args: Vec<&str> = ["--jobs-config", jobs]
        .iter()
        .chain(args)
        .copied()
        .collect();
    let started = spillway_testkit::producer::start(&vhost.amqp_url, &args).await;
    // The scaler started in `dir` (and so its workers) share the producer's ledger.
    std::fs::write(dir.join(DATABASE_URL_FILE), &started.database_url).unwrap();
    (started.url, started.stop)
}

/// Where [`start_producer`] leaves its ledger's URL for [`Scaler::start_with`].
pub const DATABASE_URL_FILE: &str = "database-url";

/// A job-types file for the local-launcher runs: one `default` job type on `tasks`
/// whose rows run `command` through `sh -c`, ticking every second and idle after 3 s.
pub fn local_jobs(command: &str, max_jobs: usize, delivery_limit: u32) -> String {
    let command = command.replace('\\', "\\\\").replace('"', "\\\"");
    format!(
        r#"
tick_seconds = 1
idle_seconds = 3

[job_types.default]
queue = "tasks"
handler = "exec"
command = ["sh", "-c", "{command}"]
max_jobs = {max_jobs}
delivery_limit = {delivery_limit}
"#
    )
}

/// `command` behind a hold: a row after file line `line` waits while the [`Hold`]
/// exists, then runs `command`. A test that needs rows left at some moment holds them
/// rather than racing the workers, so it passes on a slow machine and a fast one alike.
pub fn held_after(line: usize, command: &str) -> String {
    format!(
        r#"if [ "$SPILLWAY_LINE" -gt {line} ]; then while [ -e "$HOLD" ]; do sleep 0.05; done; fi; {command}"#
    )
}

/// The file that holds rows back (see [`held_after`]): `HOLD` in the environment of
/// the scaler and so of its workers. Rows flow once it is released or dropped.
pub struct Hold(PathBuf);

impl Hold {
    pub fn new(dir: &Path) -> Self {
        let path = dir.join("hold");
        std::fs::write(&path, "").unwrap();
        Hold(path)
    }

    /// The environment variable naming the hold.
    pub fn env(&self) -> (&'static str, &str) {
        ("HOLD", self.0.to_str().expect("a UTF-8 temporary path"))
    }

    pub fn release(self) {}
}

impl Drop for Hold {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Waits until the scaler in `dir` has spawned `workers` workers, they have recorded
/// the `free_rows` rows before a [`held_after`] hold, and each has then reported rows
/// in hand (taken and not settled, so held) in a report sent after that: by the
/// workers' own account, not by how much time passed.
pub async fn wait_rows_held(
    dir: &Path,
    reports: &mut EventListener,
    workers: usize,
    free_rows: usize,
) {
    spillway_testkit::wait_for(
        &format!("{workers} workers spawned and the {free_rows} rows before the hold recorded"),
        std::time::Duration::from_secs(90),
        || async { registry(dir).0 >= workers && recorded_rows(dir).len() >= free_rows },
    )
    .await;
    let called = unix_now();
    let mut in_hand = BTreeMap::new();
    reports
        .wait_for(
            &format!("{workers} workers to report rows in hand"),
            std::time::Duration::from_secs(60),
            |report: &WorkerReport| {
                if report.sent_unix > called {
                    in_hand.insert(report.worker.clone(), report.in_flight);
                }
                in_hand.len() >= workers && in_hand.values().all(|&rows| rows > 0)
            },
        )
        .await;
}

/// Uploads `csv` to the producer at `producer`: its status and JSON answer.
pub async fn try_upload(producer: &str, csv: String) -> (StatusCode, serde_json::Value) {
    let response = send_upload(producer, csv).await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or_default())
}

/// Uploads `csv` to a producer that is to die mid-upload: whatever answer comes (or
/// none), it is not the test's business.
pub async fn try_upload_to_death(producer: String, csv: String) {
    let _ = send_upload(&producer, csv).await;
}

/// POSTs `csv` to the producer's `/upload` as the `file` field.
async fn send_upload(producer: &str, csv: String) -> reqwest::Result<reqwest::Response> {
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(csv.into_bytes()).file_name("rows.csv"),
    );
    reqwest::Client::new()
        .post(format!("{producer}/upload"))
        .multipart(form)
        .send()
        .await
}

/// Uploads `csv`, expects it accepted, and returns its batch id.
pub async fn upload(producer: &str, csv: String) -> String {
    let (status, body) = try_upload(producer, csv).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["batch_id"].as_str().expect("a batch id").to_string()
}

/// POSTs to `url` with no body: the status and the JSON answer.
pub async fn post_json(url: &str) -> (StatusCode, Value) {
    let answer = reqwest::Client::new()
        .post(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = answer.status();
    let body = answer
        .json()
        .await
        .unwrap_or_else(|e| panic!("POST {url} answered {status} without JSON: {e}"));
    (status, body)
}

/// An `exec` command that records each row it handles as `<batch id>:<line>`.
pub const RECORD_ROW: &str = r#"echo "$SPILLWAY_BATCH_ID:$SPILLWAY_LINE" >> "$RECORD""#;

/// `rows` rows of one column, `n`, numbered from 1: row n is on line n + 1.
pub fn numbered_csv(rows: usize) -> String {
    let mut csv = String::from("n\n");
    for n in 1..=rows {
        csv.push_str(&format!("{n}\n"));
    }
    csv
}

/// The `<batch id>:<line>` of every row of a [`numbered_csv`] batch.
pub fn expected_rows(batch: &str, rows: usize) -> BTreeSet<String> {
    (2..=rows + 1)
        .map(|line| format!("{batch}:{line}"))
        .collect()
}

/// How often each row was recorded by [`RECORD_ROW`].
pub fn recorded_rows(dir: &Path) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for row in std::fs::read_to_string(dir.join("record"))
        .unwrap_or_default()
        .lines()
    {
        *seen.entry(row.to_string()).or_insert(0) += 1;
    }
    seen
}

/// The rows uploaded against the rows recorded and dead-lettered.
pub struct Account {
    pub rows_in: usize,
    pub processed: usize,
    pub dead: usize,
    pub lost: Vec<String>,
    pub duplicates: usize,
}

impl Account {
    pub fn of(
        expected: &BTreeSet<String>,
        recorded: &BTreeMap<String, usize>,
        dead: &BTreeSet<String>,
    ) -> Self {
        let lost = expected
            .iter()
            .filter(|row| !recorded.contains_key(*row) && !dead.contains(*row))
            .cloned()
            .collect();
        Account {
            rows_in: expected.len(),
            processed: expected
                .iter()
                .filter(|row| recorded.contains_key(*row))
                .count(),
            dead: dead.len(),
            lost,
            duplicates: recorded.values().map(|n| n - 1).sum(),
        }
    }
}

impl std::fmt::Display for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} rows in, {} processed at least once, ",
            self.rows_in, self.processed
        )?;
        if self.dead > 0 {
            write!(f, "{} dead-lettered, ", self.dead)?;
        }
        write!(
            f,
            "{} lost, {} duplicates",
            self.lost.len(),
            self.duplicates
        )
    }
}
