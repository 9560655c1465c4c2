//! Settings shared by every Spillway process, read from the environment.
//!
//! Each binary composes these groups into its own `clap` parser with
//! `#[command(flatten)]`, so `--help` lists every variable with its default and a bad
//! value stops the process at start with a message naming the variable.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

/// Where the broker is.
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
}

impl BrokerSettings {
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
