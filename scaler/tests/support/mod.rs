//! The whole system for end-to-end tests: a producer in-process, the `scaler` binary
//! with the local launcher (which runs the `worker` binary), all on one vhost.
// Each test crate including this module uses part of it.
#![allow(dead_code)]

use std::{
    collections::{BTreeMap, BTreeSet},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
};

use clap::Parser;
use reqwest::StatusCode;
use spillway_common::{jobs_config::JobsConfig, testing::TestVhost};
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
        let child = Command::new(&scaler)
            .env("AMQP_URL", &vhost.amqp_url)
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

    /// A counter or gauge from /metrics, 0 when absent or unreachable.
    pub async fn metric(&self, line_prefix: &str) -> u64 {
        let Ok(response) = reqwest::get(format!("{}/metrics", self.url)).await else {
            return 0;
        };
        let text = response.text().await.unwrap_or_default();
        text.lines()
            .find_map(|line| line.strip_prefix(line_prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
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

/// Workers in the registry: (spawned in all, still running).
pub fn registry(dir: &Path) -> (usize, usize) {
    let mut spawned = 0;
    let mut running = 0;
    for entry in std::fs::read_dir(dir.join("workers"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "json") {
            spawned += 1;
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.contains("\"ended\":null") {
                running += 1;
            }
        }
    }
    (spawned, running)
}

/// Name and pid of each worker the registry shows running whose process is still that
/// worker (a pid can be reused once its process is gone).
pub fn running_workers(dir: &Path) -> Vec<(String, u32)> {
    std::fs::read_dir(dir.join("workers"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .filter(|entry| entry["ended"].is_null())
        .filter_map(|entry| {
            let pid = entry["pid"].as_u64().filter(|&pid| pid > 0)?;
            Some((entry["name"].as_str()?.to_string(), pid as u32))
        })
        .filter(|(name, pid)| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|environ| {
                environ
                    .split(|&b| b == 0)
                    .any(|var| var == format!("WORKER_NAME={name}").as_bytes())
            })
        })
        .collect()
}

pub fn first_worker(dir: &Path) -> String {
    std::fs::read_dir(dir.join("workers"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .expect("a registered worker")
}

pub fn recorded(dir: &Path) -> BTreeSet<u64> {
    std::fs::read_to_string(dir.join("record"))
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect()
}

pub async fn start_producer(vhost: &TestVhost, dir: &Path) -> (String, CancellationToken) {
    start_producer_with(vhost, dir, &[]).await
}

/// [`start_producer`] with more command-line settings.
pub async fn start_producer_with(
    vhost: &TestVhost,
    dir: &Path,
    args: &[&str],
) -> (String, CancellationToken) {
    let jobs_path = dir.join("jobs.toml");
    let settings = spillway_producer::config::Settings::try_parse_from(
        [
            "producer",
            "--amqp-url",
            &vhost.amqp_url,
            "--jobs-config",
            jobs_path.to_str().unwrap(),
        ]
        .into_iter()
        .chain(args.iter().copied()),
    )
    .unwrap();
    let jobs = JobsConfig::load(Some(&jobs_path)).unwrap();
    let state = spillway_producer::build_state(&settings, jobs);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let until = stop.clone();
    tokio::spawn(spillway_producer::serve(
        listener,
        Arc::clone(&state),
        async move { until.cancelled().await },
    ));
    (url, stop)
}

/// Uploads `csv` to the producer at `producer`: its status and JSON answer.
pub async fn try_upload(producer: &str, csv: String) -> (StatusCode, serde_json::Value) {
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(csv.into_bytes()).file_name("rows.csv"),
    );
    let response = reqwest::Client::new()
        .post(format!("{producer}/upload"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or_default())
}

/// Uploads `csv`, expects it accepted, and returns its batch id.
pub async fn upload(producer: &str, csv: String) -> String {
    let (status, body) = try_upload(producer, csv).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["batch_id"].as_str().expect("a batch id").to_string()
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

/// Stops, on drop, every worker the registry in `dir` shows running, so that no test
/// leaves workers behind, even one that fails.
pub struct WorkerReaper<'a>(pub &'a Path);

impl Drop for WorkerReaper<'_> {
    fn drop(&mut self) {
        for (_, pid) in running_workers(self.0) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
