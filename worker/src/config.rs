//! The worker's settings: read from the environment once, at start. `worker --help`
//! lists them all.

use clap::Parser;
use spillway_common::config::{BrokerSettings, JobsSettings, LogSettings};

/// Spillway worker: consumes one job type's queue and runs its handler on each row.
///
/// Every setting is an environment variable (or the flag shown).
#[derive(Debug, Clone, Parser)]
#[command(name = "worker", version)]
pub struct Settings {
    /// Job type to work on (default: the job-types file's default job type).
    #[arg(long = "job-type", env = "JOB_TYPE", value_name = "JOB_TYPE")]
    pub job_type: Option<String>,

    /// Name in reports, logs and drain requests (default: $HOSTNAME, else worker-<pid>).
    #[arg(long = "worker-name", env = "WORKER_NAME", value_name = "WORKER_NAME")]
    pub worker_name: Option<String>,

    /// Rows handled at the same time.
    #[arg(long = "concurrency", env = "CONCURRENCY", value_name = "CONCURRENCY", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=2000))]
    pub concurrency: u16,

    /// Unacked rows the broker may hand this worker (default: CONCURRENCY, so no row
    /// waits in this worker's buffer behind a slow one while other workers are idle).
    #[arg(long = "prefetch", env = "PREFETCH", value_name = "PREFETCH",
          value_parser = clap::value_parser!(u16).range(1..=2000))]
    pub prefetch: Option<u16>,

    /// `exec` handler: seconds a row's command may run before it is killed and the row failed.
    #[arg(long = "exec-timeout-seconds", env = "EXEC_TIMEOUT_SECONDS", value_name = "EXEC_TIMEOUT_SECONDS",
          default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub exec_timeout_seconds: u64,

    /// Seconds between two progress reports.
    #[arg(long = "progress-seconds", env = "PROGRESS_SECONDS", value_name = "PROGRESS_SECONDS",
          default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub progress_seconds: u64,

    /// Seconds to keep reconnecting to a lost broker before exiting with an error.
    #[arg(
        long = "broker-give-up-seconds",
        env = "BROKER_GIVE_UP_SECONDS",
        value_name = "BROKER_GIVE_UP_SECONDS",
        default_value_t = 300
    )]
    pub broker_give_up_seconds: u64,

    #[command(flatten)]
    pub broker: BrokerSettings,

    #[command(flatten)]
    pub jobs: JobsSettings,

    #[command(flatten)]
    pub log: LogSettings,
}

impl Settings {
    pub fn worker_name(&self) -> String {
        self.worker_name
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
            .unwrap_or_else(|| format!("worker-{}", std::process::id()))
    }

    pub fn prefetch(&self) -> u16 {
        self.prefetch.unwrap_or(self.concurrency)
    }
}
