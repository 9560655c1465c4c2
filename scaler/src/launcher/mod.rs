//! Launchers: where workers run. The scaler decides; a launcher carries it out.
//!
//! Every side effect of scaling (starting a worker, stopping one, listing them) sits
//! behind [`Launcher`], so the tick loop reads the same against local processes and
//! Kubernetes Jobs. A launcher rebuilds its list of workers from its own records (a
//! pid registry for local processes), never from the scaler's memory, so a restarted
//! scaler neither loses nor double-spawns workers. Both start a worker from the same
//! [`spec::WorkerSpec`]: what it gets (name, job type, environment) is decided once.
//!
//! # Layout
//!
//! - [`spec`]: what a worker is started with, from the scaler's settings.
//! - [`local`]: workers as processes on this machine.
//! - [`kube`]: workers as Kubernetes Jobs.
//! - [`lines`]: a followed log's bytes cut into lines.

pub mod kube;
pub mod lines;
pub mod local;
pub mod spec;

use std::future::Future;

use futures_util::stream::BoxStream;

use crate::policy::{Phase, Waiting};

/// A followed log: each line (without its line break) as the worker writes it, ending
/// when the worker has ended and every line it wrote has come.
pub type LogLines = BoxStream<'static, Result<String, LauncherError>>;

/// A worker as its launcher knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchedWorker {
    pub name: String,
    pub job_type: String,
    pub phase: Phase,
    pub started_unix: u64,
    /// Why a pending worker has not started yet, when its launcher can tell.
    pub waiting: Option<Waiting>,
}

/// What went wrong underneath: the API server's or the system's own error where there
/// is one (a caller can downcast it), a sentence where there is none.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    #[error("cannot start worker {name}: {source}")]
    Spawn {
        name: String,
        #[source]
        source: Cause,
    },
    #[error("cannot stop worker {name}: {source}")]
    Stop {
        name: String,
        #[source]
        source: Cause,
    },
    #[error("cannot forget finished worker {name}: {source}")]
    Forget {
        name: String,
        #[source]
        source: Cause,
    },
    #[error("cannot list workers: {0}")]
    List(#[source] Cause),
    #[error("no worker named {0:?}")]
    NoSuchWorker(String),
    #[error("cannot read the logs of worker {name}: {source}")]
    Logs {
        name: String,
        #[source]
        source: Cause,
    },
    #[error(
        "the API server refuses the worker Job of job type {job_type:?} (a dry run at start): {source}"
    )]
    Refused {
        job_type: String,
        #[source]
        source: ::kube::Error,
    },
}

pub trait Launcher: Send + Sync + 'static {
    /// Every worker this launcher started and still remembers, with its phase.
    fn workers(&self) -> impl Future<Output = Result<Vec<LaunchedWorker>, LauncherError>> + Send;

    /// Starts worker `name` on job type `job_type`.
    fn spawn(
        &self,
        job_type: &str,
        name: &str,
    ) -> impl Future<Output = Result<(), LauncherError>> + Send;

    /// Stops worker `name` (SIGTERM to it: it finishes what it holds and exits).
    fn stop(&self, name: &str) -> impl Future<Output = Result<(), LauncherError>> + Send;

    /// Forgets finished worker `name`: it is no longer listed, and its log goes (a
    /// Job is deleted; a local worker's registry entry and log file are removed). The
    /// tick calls it only for workers that ended.
    fn forget(&self, name: &str) -> impl Future<Output = Result<(), LauncherError>> + Send;

    /// The log of worker `name`, its last `tail_lines` lines when given, and never
    /// more than [`MAX_LOG_BYTES`] of it: a worker's log can be any size, the answer
    /// (and the scaler's memory while it builds it) cannot. When that bound cuts the
    /// answer it starts with [`log_cut_note`]. Only workers this launcher started can
    /// be read.
    fn logs(
        &self,
        name: &str,
        tail_lines: Option<u32>,
    ) -> impl Future<Output = Result<String, LauncherError>> + Send;

    /// The log of worker `name` followed: its last `tail_lines` lines (every line for
    /// `None`), then each line as it is written, until the worker has ended. A line is
    /// cut at [`MAX_LOG_BYTES`]. Only workers this launcher started can be read.
    fn follow_logs(
        &self,
        name: &str,
        tail_lines: Option<u32>,
    ) -> impl Future<Output = Result<LogLines, LauncherError>> + Send;
}

/// Most bytes of log one answer of [`Launcher::logs`] carries.
pub const MAX_LOG_BYTES: u64 = 1 << 20;

/// The first line of a log answer the byte bound cut.
pub fn log_cut_note() -> String {
    format!(
        "[spillway] this answer is cut at {MAX_LOG_BYTES} bytes: the log holds more than is shown\n"
    )
}

/// A fresh worker name: `spillway-<job type>-<suffix>`, valid as a Kubernetes name.
pub fn worker_name(job_type: &str) -> String {
    let cleaned: String = job_type
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    let suffix = {
        use std::hash::{BuildHasher, RandomState};
        RandomState::new().hash_one(std::time::SystemTime::now()) as u32
    };
    format!("spillway-{}-{suffix:08x}", cleaned.trim_matches('-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_names_are_valid_kubernetes_names_and_distinct() {
        let a = worker_name("Image_Resize");
        let b = worker_name("Image_Resize");
        assert!(a.starts_with("spillway-image-resize-"), "{a}");
        assert!(a.len() <= 63);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        );
        assert_ne!(a, b);
    }
}
