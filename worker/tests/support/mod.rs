//! Worker processes against their own vhost on the real broker: publishing rows,
//! starting `worker` binaries with an `exec` handler that records what it did, and
//! reading the records and the dead-lettered rows back.

// Each test binary that includes this module uses a part of it.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use lapin::{
    Connection,
    options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions},
    types::AMQPValue,
};
use spillway_common::{
    envelope::{RowMessage, row_properties},
    topology::{self, dead_queue_name},
};
use spillway_ledger::{Ledger, NewBatch};
use spillway_testkit::{
    TestDatabase, TestVhost, bench::process::peak_rss_kib, ledger::record_published_batch, wait_for,
};

pub const QUEUE: &str = "rows";
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A vhost with a work queue, a ledger database, and a directory for job types, logs
/// and records.
pub struct Rig {
    pub vhost: TestVhost,
    pub database: TestDatabase,
    pub dir: tempfile::TempDir,
    pub batch_id: String,
    delivery_limit: u32,
}

/// A row taken from the dead queue, with what the worker said about it.
#[derive(Debug)]
pub struct DeadLetter {
    pub body: Vec<u8>,
    /// `x-spillway-error`.
    pub reason: String,
    /// `x-spillway-attempts`.
    pub attempts: i64,
}

/// A running worker process, killed (with its commands) if the test ends early.
pub struct WorkerProcess {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Rig {
    /// A vhost whose work queue dead-letters a row after `delivery_limit` deliveries,
    /// and whose rows run `script` through `sh -c`.
    pub async fn new(label: &str, delivery_limit: u32, script: &str) -> Self {
        let vhost = TestVhost::new(label).await;
        let database = TestDatabase::new(label).await;
        let dir = tempfile::tempdir().unwrap();
        let command = serde_json::to_string(&["sh", "-c", script]).unwrap();
        let jobs = format!(
            "[job_types.default]\nqueue = \"{QUEUE}\"\nhandler = \"exec\"\n\
             command = {command}\ndelivery_limit = {delivery_limit}\n"
        );
        std::fs::write(dir.path().join("jobs.toml"), jobs).unwrap();
        Rig {
            vhost,
            database,
            dir,
            batch_id: format!("batch-{label}"),
            delivery_limit,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    async fn connection(&self) -> Connection {
        self.vhost.connect().await
    }

    /// A well-formed row of this rig's batch at `line`.
    pub fn row(&self, line: u64) -> RowMessage {
        RowMessage {
            batch_id: self.batch_id.clone(),
            job_type: "default".into(),
            line,
            row: line,
            headers: vec!["n".into()],
            fields: vec![line.to_string()],
        }
    }

    /// The rig's ledger.
    pub fn ledger(&self) -> Ledger {
        Ledger::open(&self.database.url, 2).expect("a valid URL")
    }

    /// Records this rig's batch with rows at lines 1..=rows in the ledger, as the
    /// producer does before publishing them, all published.
    pub async fn record_batch(&self, rows: u64) -> Ledger {
        let ledger = self.ledger();
        let batch = NewBatch {
            tenant: "default",
            batch_id: &self.batch_id,
            job_type: "default",
            queue: QUEUE,
            file_name: None,
            header: &["n".to_string()],
            rows: Some(rows),
            callback_url: None,
        };
        let lines = (1..=rows).map(|line| (line, [line.to_string()]));
        record_published_batch(&ledger, &batch, lines).await;
        ledger
    }

    /// Publishes rows with lines 1..=rows, confirmed.
    pub async fn publish_rows(&self, rows: u64) {
        let rows: Vec<RowMessage> = (1..=rows).map(|line| self.row(line)).collect();
        self.publish(&rows).await;
    }

    /// Publishes `rows` as they are, valid or not, confirmed.
    pub async fn publish(&self, rows: &[RowMessage]) {
        let connection = self.connection().await;
        let channel = connection.create_channel().await.unwrap();
        topology::declare_work_queue(&channel, QUEUE, self.delivery_limit)
            .await
            .unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        for row in rows {
            let confirm = channel
                .basic_publish(
                    "".into(),
                    QUEUE.into(),
                    BasicPublishOptions::default(),
                    &serde_json::to_vec(row).unwrap(),
                    row_properties(&row.message_id()),
                )
                .await
                .unwrap();
            assert!(confirm.await.unwrap().is_ack());
        }
    }

    /// Takes every message out of the work queue's dead queue.
    pub async fn dead_letters(&self) -> Vec<DeadLetter> {
        let connection = self.connection().await;
        let channel = connection.create_channel().await.unwrap();
        let dead = dead_queue_name(QUEUE);
        let mut letters = Vec::new();
        while let Some(message) = channel
            .basic_get(dead.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            let headers = message.delivery.properties.headers().clone();
            let header = |key: &str| headers.as_ref().and_then(|h| h.inner().get(key).cloned());
            letters.push(DeadLetter {
                reason: match header("x-spillway-error") {
                    Some(AMQPValue::LongString(reason)) => reason.to_string(),
                    other => panic!("a dead letter without its reason: {other:?}"),
                },
                attempts: match header("x-spillway-attempts") {
                    Some(AMQPValue::LongLongInt(attempts)) => attempts,
                    other => panic!("a dead letter without its attempts: {other:?}"),
                },
                body: message.delivery.data,
            });
        }
        letters
    }

    /// Ready messages in `queue` (needs no management-API delay).
    pub async fn ready(&self, queue: &str) -> u32 {
        self.vhost.ready(queue).await.expect("queue exists")
    }

    /// Starts a worker named `name`; `env` adds to its environment.
    pub fn start_worker(&self, name: &str, env: &[(&str, &str)]) -> WorkerProcess {
        let log = self.path(&format!("{name}.log"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_worker"));
        command
            .env("AMQP_URL", &self.vhost.amqp_url)
            .env("DATABASE_URL", &self.database.url)
            .env("JOBS_CONFIG", self.path("jobs.toml"))
            .env("WORKER_NAME", name)
            .env("PROGRESS_SECONDS", "1")
            .env("RUST_LOG", "info")
            .env("RECORD", self.path("record"))
            .env("STARTED", self.path("started"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            // Its own process group, so a test can kill it together with its commands.
            .process_group(0);
        for (key, value) in env {
            command.env(key, value);
        }
        WorkerProcess {
            name: name.to_string(),
            child: command.spawn().expect("start the worker binary"),
            log,
        }
    }

    /// How many times each line was recorded in file `name` (one line per entry).
    pub fn counts(&self, name: &str) -> BTreeMap<u64, usize> {
        let text = std::fs::read_to_string(self.path(name)).unwrap_or_default();
        let mut counts = BTreeMap::new();
        for line in text.lines() {
            *counts
                .entry(line.trim().parse().expect("a line number"))
                .or_default() += 1;
        }
        counts
    }

    /// Waits until file `name` holds at least `lines` distinct lines.
    pub async fn wait_recorded(&self, name: &str, lines: usize, worker: &mut WorkerProcess) {
        let what = format!("{lines} distinct lines in {name}");
        let patience = PATIENCE;
        let deadline = tokio::time::Instant::now() + patience;
        while self.counts(name).len() < lines {
            if let Some(status) = worker.child.try_wait().unwrap() {
                panic!(
                    "worker {} exited ({status}) before {what}:\n{}",
                    worker.name,
                    worker.log_text()
                );
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "timed out after {patience:?} waiting for {what}; worker log:\n{}",
                    worker.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl WorkerProcess {
    /// Sends `signal` to the worker and to every command it runs (each command has a
    /// process group of its own), as stopping a machine or a pod would.
    pub fn signal(&self, signal: &str) {
        let groups = self.groups();
        for group in &groups {
            let status = Command::new("kill")
                .args(["-s", signal, "--", &format!("-{group}")])
                .stderr(Stdio::null())
                .status()
                .unwrap();
            // A command may have ended since the groups were listed; the worker may not.
            assert!(
                status.success() || *group != groups[0],
                "kill -{signal} the worker's process group"
            );
        }
    }

    /// The worker's process group and its commands' groups: the worker's children.
    fn groups(&self) -> Vec<u32> {
        let worker = self.child.id();
        let mut groups = vec![worker];
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // After the name in parentheses: state, parent pid, process group.
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.split_whitespace().take(3).collect())
                .unwrap_or_default();
            if let [_, parent, group] = fields[..]
                && parent == worker.to_string()
                && group == pid.to_string()
            {
                groups.push(pid);
            }
        }
        groups
    }

    pub async fn wait_exit(&mut self) -> ExitStatus {
        let mut status = None;
        wait_for(&format!("worker {} to exit", self.name), PATIENCE, || {
            status = self.child.try_wait().unwrap();
            std::future::ready(status.is_some())
        })
        .await;
        status.expect("exited")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The most memory the worker has held resident so far (`VmHWM`), in bytes.
    pub fn peak_rss_bytes(&self) -> u64 {
        peak_rss_kib(self.child.id()) * 1024
    }

    /// The exit status, if the worker has exited.
    pub fn child_exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Waits until `text` appears at least `times` times in the worker's log.
    pub async fn wait_logged(&self, text: &str, times: usize) {
        let what = format!("{times} × {text:?} in the log of worker {}", self.name);
        wait_for(&what, PATIENCE, || {
            std::future::ready(self.log_text().matches(text).count() >= times)
        })
        .await;
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            for group in self.groups() {
                let _ = Command::new("kill")
                    .args(["-s", "KILL", "--", &format!("-{group}")])
                    .stderr(Stdio::null())
                    .status();
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
