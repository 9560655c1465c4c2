//! Spillway's ledger: every batch, every row's outcome and result, durable in
//! PostgreSQL.
//!
//! The producer records a batch and its rows before it publishes them and advances
//! the batch as RabbitMQ confirms them; a worker records each row's outcome before it
//! acks the row; users read batches and download results from here. So a restart of
//! any process, PostgreSQL included, forgets nothing.
//!
//! A [`Ledger`] is a connection pool that connects lazily: a process starts whether or
//! not PostgreSQL answers, and [`Ledger::ready`] (which applies the embedded
//! migrations the first time it succeeds) says whether it does now.
//!
//! # Layout
//!
//! - [`batches`]: recording a batch and its rows, its publication, reading and
//!   deleting batches.
//! - [`outcomes`]: rows' outcomes appended to a log in batches, and folded into the
//!   rows and their batches' counts, idempotently.
//! - [`results`]: a batch's rows and results streamed out as CSV or JSON Lines.
//! - [`retry`]: a batch's dead rows set back to pending and listed for publication.
//! - [`dead`]: dead rows listed, and revived for a replay of the dead queue.
//! - [`pauses`]: job types paused by an operator.
//! - [`cancel`]: a batch's unsettled rows cancelled, and the batch with them.
//! - [`events`]: the outbox of batch state changes, for the events exchange and
//!   completion callbacks.
//! - [`copy`]: rows encoded for `COPY ... FROM STDIN`.
//! - [`totals`]: rows by job type and status, for `/metrics`.

pub mod batches;
pub mod cancel;
pub mod copy;
pub mod dead;
pub mod events;
pub mod outcomes;
pub mod pauses;
pub mod results;
pub mod retry;
pub mod totals;

use std::{str::FromStr, time::Duration};

use serde::Serialize;
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use tokio::sync::OnceCell;

pub use batches::{BatchFilter, BatchRecord, DeadRow, NewBatch};
pub use outcomes::{Folded, Outcome};

/// The default `DATABASE_URL`.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/spillway";

/// How long a caller waits for a pooled connection before the ledger counts as
/// unavailable: long enough for a busy pool, short enough that an upload or a row
/// learns quickly that PostgreSQL is gone.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// The schema migrations in `migrations/`, embedded at build time.
fn migrator() -> sqlx::migrate::Migrator {
    let mut migrator = sqlx::migrate!();
    // A process built before the newest migration still runs against the schema it
    // made (they only add): during a rolling upgrade, workers built last week keep
    // settling rows after this week's producer migrated the ledger.
    migrator.set_ignore_missing(true);
    migrator
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("DATABASE_URL is not a PostgreSQL URL (postgres://user@host:port/database): {0}")]
    BadUrl(String),
    #[error("PostgreSQL is unreachable: {0}")]
    Unavailable(sqlx::Error),
    #[error("cannot apply the ledger's schema migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("the ledger refused a statement: {0}")]
    Query(sqlx::Error),
    #[error("cannot read the rows to record: {0}")]
    Input(#[from] std::io::Error),
}

impl LedgerError {
    /// Whether waiting for PostgreSQL to come back could help.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, LedgerError::Unavailable(_))
    }
}

impl From<sqlx::Error> for LedgerError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => LedgerError::Unavailable(e),
            // A server shutting down or restarting answers with these SQLSTATEs
            // (admin_shutdown, crash_shutdown, cannot_connect_now).
            sqlx::Error::Database(ref db)
                if matches!(db.code().as_deref(), Some("57P01" | "57P02" | "57P03")) =>
            {
                LedgerError::Unavailable(e)
            }
            e => LedgerError::Query(e),
        }
    }
}

pub type Result<T, E = LedgerError> = std::result::Result<T, E>;

/// A row's status in the ledger.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum RowStatus {
    /// Not settled yet.
    Pending,
    Done,
    /// Failed, with attempts left: it will run again.
    Failed,
    /// Failed on its last attempt, or could not run at all: it is in `<queue>.dead`.
    Dead,
    Cancelled,
}

impl RowStatus {
    pub const ALL: [RowStatus; 5] = [
        RowStatus::Pending,
        RowStatus::Done,
        RowStatus::Failed,
        RowStatus::Dead,
        RowStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RowStatus::Pending => "pending",
            RowStatus::Done => "done",
            RowStatus::Failed => "failed",
            RowStatus::Dead => "dead",
            RowStatus::Cancelled => "cancelled",
        }
    }

    /// A final status is never changed by a later outcome of the same row.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RowStatus::Done | RowStatus::Dead | RowStatus::Cancelled
        )
    }
}

impl FromStr for RowStatus {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        RowStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = RowStatus::ALL.iter().map(|s| s.as_str()).collect();
                format!("unknown row status {s:?}: one of {}", names.join(", "))
            })
    }
}

/// A batch's state in the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BatchState {
    Publishing,
    Queued,
    Running,
    Done,
    DoneWithFailures,
    /// Could not be published.
    Failed,
    Cancelled,
}

impl BatchState {
    pub const ALL: [BatchState; 7] = [
        BatchState::Publishing,
        BatchState::Queued,
        BatchState::Running,
        BatchState::Done,
        BatchState::DoneWithFailures,
        BatchState::Failed,
        BatchState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BatchState::Publishing => "publishing",
            BatchState::Queued => "queued",
            BatchState::Running => "running",
            BatchState::Done => "done",
            BatchState::DoneWithFailures => "done_with_failures",
            BatchState::Failed => "failed",
            BatchState::Cancelled => "cancelled",
        }
    }

    /// Whether nothing more will happen to the batch's rows.
    pub fn is_finished(self) -> bool {
        !matches!(
            self,
            BatchState::Publishing | BatchState::Queued | BatchState::Running
        )
    }
}

impl FromStr for BatchState {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        BatchState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = BatchState::ALL.iter().map(|s| s.as_str()).collect();
                format!("unknown batch state {s:?}: one of {}", names.join(", "))
            })
    }
}

/// The ledger: a lazily connecting pool, and whether its schema is in place.
#[derive(Debug, Clone)]
pub struct Ledger {
    pool: PgPool,
    migrated: std::sync::Arc<OnceCell<()>>,
    /// Batches being recorded hold a connection for as long as their upload is read:
    /// at most all but two of the pool's at once, so the others always find one, and
    /// a recording waits here (its rows wait on disk) rather than timing out.
    recordings: std::sync::Arc<tokio::sync::Semaphore>,
}

impl Ledger {
    /// A ledger at `url` with at most `max_connections` connections. Connects on first
    /// use: only a malformed URL fails here.
    pub fn open(url: &str, max_connections: u32) -> Result<Self> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(LedgerError::BadUrl(format!("{url:?} has another scheme")));
        }
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| LedgerError::BadUrl(e.to_string()))?
            .application_name("spillway")
            // Results are streamed with COPY, whose statement carries the batch id as
            // a literal: make sure a backslash in it is never an escape.
            .options([("standard_conforming_strings", "on")]);
        let max_connections = max_connections.max(1);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options);
        let recordings = max_connections.saturating_sub(2).max(1) as usize;
        Ok(Ledger {
            pool,
            migrated: Default::default(),
            recordings: std::sync::Arc::new(tokio::sync::Semaphore::new(recordings)),
        })
    }

    /// Whether PostgreSQL answers, applying the schema migrations on the first
    /// success. Migrations take PostgreSQL's advisory lock, so processes starting at
    /// once apply them one at a time, and each only once.
    pub async fn ready(&self) -> Result<()> {
        self.schema().await?;
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Applies the migrations if this process has not yet: every statement of the
    /// ledger runs after this, so a process works whichever of them starts first.
    pub(crate) async fn schema(&self) -> Result<()> {
        self.migrated
            .get_or_try_init(|| async {
                migrator().run(&self.pool).await.map_err(|e| match e {
                    sqlx::migrate::MigrateError::Execute(e) => LedgerError::from(e),
                    e => LedgerError::Migrate(e),
                })
            })
            .await?;
        Ok(())
    }

    /// The pool, for callers that need a statement of their own.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Closes every connection; calls after this fail.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// A timestamp column as RFC 3339 in UTC, as every reader of the ledger shows times.
macro_rules! rfc3339 {
    ($column:literal) => {
        concat!(
            "to_char(",
            $column,
            " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
        )
    };
}
pub(crate) use rfc3339;

/// Where the ledger is: the settings every process that reads or writes it shares.
#[derive(Debug, Clone, clap::Args)]
pub struct DatabaseSettings {
    /// PostgreSQL URL of the ledger (`postgres://user:password@host:port/database`).
    #[arg(
        long = "database-url",
        env = "DATABASE_URL",
        value_name = "DATABASE_URL",
        default_value = DEFAULT_DATABASE_URL
    )]
    pub database_url: String,

    /// Most connections this process opens to PostgreSQL.
    #[arg(long = "database-max-connections", env = "DATABASE_MAX_CONNECTIONS",
          value_name = "DATABASE_MAX_CONNECTIONS", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub database_max_connections: u32,
}

impl DatabaseSettings {
    /// The ledger these settings name; fails, naming `DATABASE_URL`, when the URL
    /// does not parse.
    pub fn open(&self) -> Result<Ledger> {
        Ledger::open(&self.database_url, self.database_max_connections)
    }
}
