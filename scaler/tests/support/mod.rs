//! The whole system for end-to-end tests: a producer in-process, the `scaler` binary
//! with the local launcher (which runs the `worker` binary), all on one vhost.
// Each test crate including this module uses part of it.
#![allow(dead_code)]

use std::{
    collections::BTreeSet,
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
    let jobs_path = dir.join("jobs.toml");
    let settings = spillway_producer::config::Settings::try_parse_from([
        "producer",
        "--amqp-url",
        &vhost.amqp_url,
        "--jobs-config",
        jobs_path.to_str().unwrap(),
    ])
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

/// Uploads `csv` to the producer at `producer` and expects it accepted.
pub async fn upload(producer: &str, csv: String) {
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
    assert_eq!(response.status(), StatusCode::OK);
}
