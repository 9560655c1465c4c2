//! Settings shared by every Spillway process, read from the environment.
//!
//! Each binary composes these groups into its own `clap` parser with
//! `#[command(flatten)]`, so `--help` lists every variable with its default and a bad
//! value stops the process at start with a message naming the variable.

use std::{path::PathBuf, time::Duration};

use clap::{Args, ValueEnum};

/// Where the broker is, and how long to keep trying to reach it.
#[derive(Debug, Clone, Args)]
pub struct BrokerSettings {
    /// AMQP URL of RabbitMQ; its path is the vhost (`%2f` is `/`).
    #[arg(
        long = "amqp-url",
        env = "AMQP_URL",
        value_name = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,

    /// Seconds to keep retrying an unreachable RabbitMQ (0 to 3600): then the producer
    /// answers 503, a worker exits non-zero, the scaler logs it and starts again
    /// (default: producer 10, worker 300, scaler 30).
    #[arg(
        long = "broker-retry-seconds",
        env = "BROKER_RETRY_SECONDS",
        value_name = "BROKER_RETRY_SECONDS",
        value_parser = clap::value_parser!(u64).range(0..=BROKER_RETRY_MAX_SECONDS)
    )]
    pub broker_retry_seconds: Option<u64>,
}

/// The longest `BROKER_RETRY_SECONDS`: an hour without a broker is an outage to
/// page someone about, not one to sit out silently.
pub const BROKER_RETRY_MAX_SECONDS: u64 = 3_600;

/// A process that reads [`BrokerSettings`]: each waits for the broker for its own
/// reason, so each has its own default reconnect budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Process {
    Producer,
    Worker,
    Scaler,
}

impl Process {
    /// `BROKER_RETRY_SECONDS` when it is not set.
    pub const fn default_broker_retry(self) -> Duration {
        match self {
            // An upload is waiting on the answer: it should get its 503 in seconds.
            Process::Producer => Duration::from_secs(10),
            // A worker rides out a broker restart or a failover before it gives up on
            // its queue (the scaler starts another when rows are waiting).
            Process::Worker => Duration::from_secs(300),
            // The scaler never gives up: this is one round of retries, after which it
            // logs the failure and starts another.
            Process::Scaler => Duration::from_secs(30),
        }
    }
}

impl From<String> for BrokerSettings {
    /// The broker at `amqp_url`, with the default reconnect budget.
    fn from(amqp_url: String) -> Self {
        BrokerSettings {
            amqp_url,
            broker_retry_seconds: None,
        }
    }
}

impl BrokerSettings {
    /// How long `process` keeps retrying an unreachable broker: `BROKER_RETRY_SECONDS`,
    /// else the process's default.
    pub fn retry_budget(&self, process: Process) -> Duration {
        self.broker_retry_seconds
            .map_or(process.default_broker_retry(), Duration::from_secs)
    }

    /// Fails, naming `AMQP_URL`, when the URL does not parse.
    pub fn validate(&self) -> anyhow::Result<()> {
        use std::str::FromStr;
        lapin::uri::AMQPUri::from_str(&self.amqp_url)
            .map(drop)
            .map_err(|e| anyhow::anyhow!("AMQP_URL is not a valid AMQP URL: {e}"))
    }
}

/// Where the job-types file is.
#[derive(Debug, Clone, Args)]
pub struct JobsSettings {
    /// Path of the job-types TOML file; unset means the built-in `default` -> `tasks`.
    #[arg(long = "jobs-config", env = "JOBS_CONFIG", value_name = "JOBS_CONFIG")]
    pub jobs_config: Option<PathBuf>,
}

/// How logs are written.
#[derive(Debug, Clone, Args)]
pub struct LogSettings {
    /// Log line format.
    #[arg(
        long = "log-format",
        env = "LOG_FORMAT",
        value_name = "LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Human
    )]
    pub log_format: LogFormat,

    /// Log filter, in `tracing` directive syntax (for example `info,spillway_producer=debug`).
    #[arg(
        long = "log-level",
        env = "RUST_LOG",
        value_name = "RUST_LOG",
        default_value = "info"
    )]
    pub log_level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Readable lines for a terminal.
    Human,
    /// One JSON object per line, for log collectors.
    Json,
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        broker: BrokerSettings,
    }

    fn parse(args: &[&str]) -> Result<BrokerSettings, clap::Error> {
        Cli::try_parse_from(["test"].iter().chain(args)).map(|cli| cli.broker)
    }

    #[test]
    fn the_retry_budget_is_the_setting_else_each_process_default() {
        let set = parse(&["--broker-retry-seconds", "42"]).unwrap();
        let unset = BrokerSettings::from("amqp://rabbit/%2f".to_string());
        // (process, budget when set to 42, budget when unset)
        let table = [
            (Process::Producer, 42, 10),
            (Process::Worker, 42, 300),
            (Process::Scaler, 42, 30),
        ];
        for (process, when_set, when_unset) in table {
            assert_eq!(set.retry_budget(process).as_secs(), when_set, "{process:?}");
            assert_eq!(
                unset.retry_budget(process).as_secs(),
                when_unset,
                "{process:?}"
            );
        }
        assert_eq!(
            parse(&["--broker-retry-seconds", "0"])
                .unwrap()
                .retry_budget(Process::Worker),
            Duration::ZERO,
            "0 means one attempt, no retries"
        );
    }

    #[test]
    fn a_retry_budget_past_an_hour_is_refused_naming_the_variable() {
        assert!(parse(&["--broker-retry-seconds", "3600"]).is_ok());
        for bad in ["3601", "100000000000", "-1", "ten"] {
            // `--flag=value`, so that `-1` is read as a value and not as a flag.
            let error = parse(&[&format!("--broker-retry-seconds={bad}")])
                .err()
                .unwrap_or_else(|| panic!("{bad} accepted"))
                .to_string();
            assert!(error.contains("BROKER_RETRY_SECONDS"), "{bad}: {error}");
        }
    }
}
