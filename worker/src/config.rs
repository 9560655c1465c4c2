//! The worker's settings: read from the environment once, at start. `worker --help`
//! lists them all.

use std::time::Duration;

use clap::Parser;
use spillway_common::config::{
    BROKER_RETRY_MAX_SECONDS, BrokerSettings, JobsSettings, LogSettings, Process,
};
use spillway_ledger::DatabaseSettings;

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

    /// The most bytes a row's result (an `exec` command's stdout) may hold; a command
    /// that prints more fails its row, saying so.
    #[arg(long = "result-max-bytes", env = "RESULT_MAX_BYTES", value_name = "RESULT_MAX_BYTES",
          default_value_t = 64 * 1024, value_parser = clap::value_parser!(u64).range(1..=16 * 1024 * 1024))]
    pub result_max_bytes: u64,

    /// Seconds between two progress reports.
    #[arg(long = "progress-seconds", env = "PROGRESS_SECONDS", value_name = "PROGRESS_SECONDS",
          default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub progress_seconds: u64,

    /// Deprecated name of BROKER_RETRY_SECONDS, read (with a warning at start) only
    /// when that is unset, so deployments that set it keep their budget.
    #[arg(
        long = "broker-give-up-seconds",
        env = "BROKER_GIVE_UP_SECONDS",
        value_name = "BROKER_GIVE_UP_SECONDS",
        hide = true,
        value_parser = clap::value_parser!(u64).range(0..=BROKER_RETRY_MAX_SECONDS)
    )]
    pub broker_give_up_seconds: Option<u64>,

    #[command(flatten)]
    pub broker: BrokerSettings,

    #[command(flatten)]
    pub jobs: JobsSettings,

    #[command(flatten)]
    pub database: DatabaseSettings,

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

    /// How long to keep reconnecting to a lost broker before exiting with an error:
    /// `BROKER_RETRY_SECONDS`, else the deprecated `BROKER_GIVE_UP_SECONDS`, else 300 s.
    pub fn broker_retry_budget(&self) -> Duration {
        match (
            self.broker.broker_retry_seconds,
            self.broker_give_up_seconds,
        ) {
            (None, Some(seconds)) => Duration::from_secs(seconds),
            _ => self.broker.retry_budget(Process::Worker),
        }
    }

    /// What to tell the operator about a deprecated setting in use, if one is.
    pub fn deprecation_warning(&self) -> Option<String> {
        let old = self.broker_give_up_seconds?;
        Some(match self.broker.broker_retry_seconds {
            None => format!(
                "BROKER_GIVE_UP_SECONDS is deprecated: rename it BROKER_RETRY_SECONDS (its value, {old} s, is used)"
            ),
            Some(new) => format!(
                "BROKER_GIVE_UP_SECONDS ({old} s) is deprecated and ignored: BROKER_RETRY_SECONDS ({new} s) is set"
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Settings {
        Settings::try_parse_from(["worker"].iter().chain(args)).expect("valid settings")
    }

    #[test]
    fn the_reconnect_budget_comes_from_the_new_name_then_the_old_one() {
        // (flags, budget in seconds, whether a deprecation warning is logged)
        let table: [(&[&str], u64, bool); 4] = [
            (&[], 300, false),
            (&["--broker-retry-seconds", "20"], 20, false),
            (&["--broker-give-up-seconds", "45"], 45, true),
            (
                &[
                    "--broker-retry-seconds",
                    "20",
                    "--broker-give-up-seconds",
                    "45",
                ],
                20,
                true,
            ),
        ];
        for (flags, seconds, warns) in table {
            let settings = parse(flags);
            assert_eq!(
                settings.broker_retry_budget(),
                Duration::from_secs(seconds),
                "{flags:?}"
            );
            assert_eq!(settings.deprecation_warning().is_some(), warns, "{flags:?}");
        }
        let ignored = parse(&[
            "--broker-retry-seconds",
            "20",
            "--broker-give-up-seconds",
            "45",
        ]);
        assert!(
            ignored.deprecation_warning().unwrap().contains("ignored"),
            "says which one wins"
        );
    }

    #[test]
    fn the_old_name_has_the_same_bounds_as_the_new_one() {
        let refused = Settings::try_parse_from(["worker", "--broker-give-up-seconds", "3601"]);
        let error = refused.expect_err("3601 refused").to_string();
        assert!(error.contains("BROKER_GIVE_UP_SECONDS"), "{error}");
    }
}
