//! The producer's settings: read from the environment once, at start, and passed
//! down as typed values. `producer --help` lists them all.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};
use spillway_common::{
    auth::{AuthSettings, Role},
    config::{BrokerSettings, JobsSettings, LogSettings, Process},
};
use spillway_ledger::DatabaseSettings;

use crate::{ingest::Limits, outbox::Callbacks};

/// Spillway producer: turns an uploaded CSV file into one RabbitMQ message per row.
///
/// Every setting is an environment variable (or the flag shown).
#[derive(Debug, Clone, Parser)]
#[command(name = "producer", version)]
pub struct Settings {
    /// Address the HTTP API listens on.
    #[arg(
        long = "listen",
        env = "PRODUCER_LISTEN",
        value_name = "PRODUCER_LISTEN",
        default_value = "0.0.0.0:8000"
    )]
    pub listen: SocketAddr,

    /// Largest accepted upload, in bytes; larger ones get 413.
    #[arg(long = "max-upload-bytes", env = "MAX_UPLOAD_BYTES", value_name = "MAX_UPLOAD_BYTES", default_value_t = 1 << 30)]
    pub max_upload_bytes: u64,

    /// Largest accepted row, in bytes (bounds memory whatever the input).
    #[arg(long = "max-row-bytes", env = "MAX_ROW_BYTES", value_name = "MAX_ROW_BYTES", default_value_t = 1 << 20,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_row_bytes: u64,

    /// Most columns a file may have.
    #[arg(long = "max-columns", env = "MAX_COLUMNS", value_name = "MAX_COLUMNS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_columns: u64,

    /// Seconds an upload's body may send nothing before it is refused with 408, so a
    /// client that stalls cannot hold a connection and a spool file forever.
    #[arg(long = "body-idle-timeout-seconds", env = "BODY_IDLE_TIMEOUT_SECONDS", value_name = "BODY_IDLE_TIMEOUT_SECONDS",
          default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3_600))]
    pub body_idle_timeout_seconds: u64,

    /// Seconds a connection may take to send a whole request head (line and headers),
    /// from opening or from its previous request; then it is closed, so a client that
    /// stalls or trickles its headers holds nothing.
    #[arg(long = "request-header-timeout-seconds", env = "REQUEST_HEADER_TIMEOUT_SECONDS", value_name = "REQUEST_HEADER_TIMEOUT_SECONDS",
          default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub request_header_timeout_seconds: u64,

    /// Uploads one client (by its address) may have in progress at once; the next
    /// gets 429 until one ends.
    #[arg(long = "max-uploads-per-client", env = "MAX_UPLOADS_PER_CLIENT", value_name = "MAX_UPLOADS_PER_CLIENT",
          default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1_000))]
    pub max_uploads_per_client: u64,

    /// Publisher confirms kept in flight per upload.
    #[arg(long = "publish-window", env = "PUBLISH_WINDOW", value_name = "PUBLISH_WINDOW", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(1..=65_535))]
    pub publish_window: u64,

    /// Seconds without a heartbeat after which a batch still `publishing` (its
    /// producer died) is resumed by another producer; publishing writes one a second.
    #[arg(long = "publication-stale-seconds", env = "PUBLICATION_STALE_SECONDS", value_name = "PUBLICATION_STALE_SECONDS",
          default_value_t = 30, value_parser = clap::value_parser!(u64).range(3..=3_600))]
    pub publication_stale_seconds: u64,

    /// Directory for spool files of uploads being validated (default: the system temp dir).
    #[arg(long = "spool-dir", env = "SPOOL_DIR", value_name = "SPOOL_DIR")]
    pub spool_dir: Option<PathBuf>,

    /// Key of the HMAC-SHA256 signature of every completion callback
    /// (`Spillway-Signature`); an upload with a `callback_url` is refused without it.
    #[arg(
        long = "callback-secret",
        env = "CALLBACK_SECRET",
        value_name = "CALLBACK_SECRET",
        hide_env_values = true
    )]
    pub callback_secret: Option<String>,

    /// Seconds after a batch reaches its final state during which its callback is
    /// retried (with backoff) until the receiver answers 2xx; then it is given up on.
    #[arg(long = "callback-give-up-seconds", env = "CALLBACK_GIVE_UP_SECONDS", value_name = "CALLBACK_GIVE_UP_SECONDS",
          default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..))]
    pub callback_give_up_seconds: u64,

    /// The producer's URL as its users reach it, for the results URL in events and
    /// callbacks (default: http://localhost and the port of PRODUCER_LISTEN).
    #[arg(
        long = "public-url",
        env = "PRODUCER_PUBLIC_URL",
        value_name = "PRODUCER_PUBLIC_URL"
    )]
    pub public_url: Option<String>,

    /// Most dead rows a replay (`POST /dead/replay`) moves back to the work queue per
    /// second, so a replay does not flood workers or the broker.
    #[arg(long = "replay-rows-per-second", env = "REPLAY_ROWS_PER_SECOND", value_name = "REPLAY_ROWS_PER_SECOND",
          default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub replay_rows_per_second: u64,

    #[command(flatten)]
    pub broker: BrokerSettings,

    #[command(flatten)]
    pub jobs: JobsSettings,

    #[command(flatten)]
    pub database: DatabaseSettings,

    #[command(flatten)]
    pub log: LogSettings,

    #[command(flatten)]
    pub auth: AuthSettings,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What `producer` does instead of serving.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Manage the tokens in TOKENS_FILE.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Clone, Subcommand)]
pub enum TokenCommand {
    /// Make a token, keep its hash in TOKENS_FILE (created if missing) and print the
    /// token: the only time it is shown.
    Add {
        /// Its name, shown in logs and pages (never the token).
        name: String,
        /// The tenant whose batches it submits and sees.
        #[arg(long)]
        tenant: String,
        #[arg(long, value_enum)]
        role: Role,
    },
}

impl Settings {
    /// Checks what clap cannot: that `AMQP_URL` and `DATABASE_URL` parse and
    /// `SPOOL_DIR` is writable.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.broker.validate()?;
        self.database.open()?;
        let dir = self.spool_dir();
        tempfile::tempfile_in(&dir).map_err(|e| {
            anyhow::anyhow!(
                "SPOOL_DIR {} is not a writable directory: {e}",
                dir.display()
            )
        })?;
        Ok(())
    }

    pub fn public_url(&self) -> String {
        self.public_url
            .clone()
            .unwrap_or_else(|| format!("http://localhost:{}", self.listen.port()))
    }

    pub fn callbacks(&self) -> Callbacks {
        Callbacks::new(
            self.callback_secret.as_deref().filter(|s| !s.is_empty()),
            Duration::from_secs(self.callback_give_up_seconds),
            &self.public_url(),
        )
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.spool_dir.clone().unwrap_or_else(std::env::temp_dir)
    }

    /// How long an upload waits for an unreachable broker before it gets 503:
    /// `BROKER_RETRY_SECONDS`, 10 s unless set.
    pub fn broker_retry_budget(&self) -> Duration {
        self.broker.retry_budget(Process::Producer)
    }

    pub fn body_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.body_idle_timeout_seconds)
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_upload_bytes: self.max_upload_bytes,
            max_row_bytes: usize::try_from(self.max_row_bytes).unwrap_or(usize::MAX),
            max_columns: usize::try_from(self.max_columns).unwrap_or(usize::MAX),
        }
    }
}
