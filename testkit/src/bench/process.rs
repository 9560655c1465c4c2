//! Spillway's release binaries run as child processes of a benchmark, each its own
//! process as in production, and what the kernel accounts to a process: its resident
//! memory (`/proc/<pid>/status`) and its CPU time (the process's CPU-time clock, which
//! counts every thread, ended ones included, to the nanosecond).

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use nix::{
    sys::signal::{Signal, kill},
    time::clock_getcpuclockid,
    unistd::Pid,
};

use crate::wait_for;

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the testkit crate sits in the workspace")
        .to_path_buf()
}

/// `target/release/<name>`, which `./manage.sh bench` builds before the benchmarks.
pub fn release_binary(name: &str) -> PathBuf {
    let path = workspace_root().join("target/release").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --release --bins` (./manage.sh bench does)",
        path.display()
    );
    path
}

/// Writes `rows` rows of sample CSV to `out` with `data/generate_data.py`.
pub fn generate_csv(out: &Path, rows: u64) {
    let status = Command::new("python3")
        .arg(workspace_root().join("data/generate_data.py"))
        .args(["--rows", &rows.to_string(), "--out"])
        .arg(out)
        .status()
        .expect("python3 runs data/generate_data.py");
    assert!(status.success(), "generate_data.py failed: {status}");
}

/// An address on 127.0.0.1 whose port was free when asked.
pub fn free_local_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free local port")
}

/// A child process, killed when dropped so that no benchmark leaves one behind.
pub struct Process {
    child: Child,
}

impl Process {
    pub fn spawn(command: &mut Command) -> Self {
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        Process { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Panics if the process has exited: a benchmark of a dead process measures nothing.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("the child's status") {
            panic!("process {} exited early: {status}", self.child.id());
        }
    }

    /// SIGTERM, the way Spillway's processes are asked to stop, then its exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        kill(Pid::from_raw(self.pid() as i32), Signal::SIGTERM).expect("signal the child");
        self.child.wait().expect("the child's exit status")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of process `pid` now, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

/// The most resident memory process `pid` has had, in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM")
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// CPU time process `pid` has used so far, user and system, all its threads.
pub fn cpu_time(pid: u32) -> Duration {
    clock_getcpuclockid(Pid::from_raw(pid as i32))
        .and_then(|clock| clock.now())
        .map(Duration::from)
        .unwrap_or_else(|e| panic!("cannot read the CPU clock of process {pid}: {e}"))
}

/// The release `producer`, serving on a port of its own.
pub struct Producer {
    pub process: Process,
    url: String,
    http: reqwest::Client,
}

impl Producer {
    /// Starts the producer on `amqp_url` with `jobs_config` (or the built-in job
    /// types), recording batches in the ledger at `database_url`, and waits until it
    /// serves.
    pub async fn start(amqp_url: &str, jobs_config: Option<&Path>, database_url: &str) -> Self {
        let addr = free_local_addr();
        let mut command = Command::new(release_binary("producer"));
        command
            .env("PRODUCER_LISTEN", addr.to_string())
            // The benchmarks upload from one client, several batches at once.
            .env("MAX_UPLOADS_PER_CLIENT", "1000")
            .env("AMQP_URL", amqp_url)
            .env("DATABASE_URL", database_url)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null());
        match jobs_config {
            Some(path) => command.env("JOBS_CONFIG", path),
            None => command.env_remove("JOBS_CONFIG"),
        };
        let producer = Producer {
            process: Process::spawn(&mut command),
            url: format!("http://{addr}"),
            http: reqwest::Client::new(),
        };
        let healthz = format!("{}/healthz", producer.url);
        wait_for("the producer to serve", Duration::from_secs(30), || async {
            producer.http.get(&healthz).send().await.is_ok()
        })
        .await;
        producer
    }

    /// Uploads `csv` to `POST /upload`, streamed from the file as a client would send
    /// it, and returns the time from the first byte sent to the answer, and the answer.
    /// Panics unless the upload is accepted.
    pub async fn upload(&self, csv: &Path) -> (Duration, serde_json::Value) {
        let file = tokio::fs::File::open(csv)
            .await
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", csv.display()));
        let length = file.metadata().await.expect("the file's length").len();
        let part = reqwest::multipart::Part::stream_with_length(file, length).file_name("data.csv");
        let form = reqwest::multipart::Form::new().part("file", part);
        let started = Instant::now();
        let response = self
            .http
            .post(format!("{}/upload", self.url))
            .multipart(form)
            .send()
            .await
            .expect("the producer answers");
        let elapsed = started.elapsed();
        let status = response.status();
        let answer: serde_json::Value = response.json().await.expect("a JSON answer");
        assert!(status.is_success(), "upload refused: {status} {answer}");
        (elapsed, answer)
    }

    /// `GET path` on the producer (`/batches/{id}`, say), answered with JSON. Panics
    /// unless the answer is a success.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let response = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .expect("the producer answers");
        let status = response.status();
        let answer: serde_json::Value = response.json().await.expect("a JSON answer");
        assert!(status.is_success(), "GET {path}: {status} {answer}");
        answer
    }

    /// The value of the metric whose name ends with `suffix` on the producer's
    /// `/metrics` (`ledger_write_seconds_sum`, say), if it shows one.
    pub async fn metric(&self, suffix: &str) -> Option<f64> {
        let text = self
            .http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .expect("the producer answers")
            .text()
            .await
            .expect("the metrics' text");
        text.lines().find_map(|line| {
            let (name, value) = line.split_once(' ')?;
            name.ends_with(suffix).then(|| value.trim().parse().ok())?
        })
    }

    /// Downloads `path` (`/batches/{id}/results`, say) as a client saving it would,
    /// reading the body as it arrives but keeping none of it, and returns the time from
    /// the request to the last byte and what arrived. Panics unless the answer is a
    /// success.
    pub async fn download(&self, path: &str) -> (Duration, Received) {
        let started = Instant::now();
        let response = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .expect("the producer answers");
        let status = response.status();
        assert!(
            status.is_success(),
            "GET {path}: {status} {}",
            response.text().await.unwrap_or_default()
        );
        let mut received = Received::default();
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            received.add(&chunk.expect("the download's bytes"));
        }
        (started.elapsed(), received)
    }
}

/// What a streamed download delivered: its bytes, its lines (a row each, when no field
/// holds a line break), and the chunks they came in.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub bytes: u64,
    pub lines: u64,
    pub chunks: u64,
}

impl Received {
    pub fn add(&mut self, chunk: &[u8]) {
        self.chunks += 1;
        self.bytes += chunk.len() as u64;
        self.lines += chunk.iter().filter(|&&b| b == b'\n').count() as u64;
    }
}
