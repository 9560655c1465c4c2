//! Batches: recorded with their rows before publication, advanced as RabbitMQ
//! confirms them, read by users, deleted when done with.
//!
//! A batch and all its rows enter the ledger in one transaction ([`Ledger::create_batch`]),
//! so a batch is never seen with part of its rows. Its `published` count is the number
//! of rows, from the first, that RabbitMQ has confirmed, written with a heartbeat
//! while the batch is published: when the heartbeat stops (its producer died), a
//! producer claims the batch ([`Ledger::claim_stale_publication`]) and publishes the
//! rest ([`Ledger::resume_after`], [`Ledger::rows_after`]); rows between that count and where the first
//! stopped are published twice, as at-least-once delivery allows, and counted once.

use std::time::Duration;

use serde::Serialize;
use sqlx::Row;
use tokio::io::AsyncRead;

use crate::{
    BatchState, Ledger, LedgerError, Result,
    copy::COPY_ROWS,
    events::{CallbackDelivery, callback_column},
    rfc3339,
};

/// A batch about to be recorded.
#[derive(Debug, Clone)]
pub struct NewBatch<'a> {
    pub batch_id: &'a str,
    pub job_type: &'a str,
    pub queue: &'a str,
    pub file_name: Option<&'a str>,
    pub header: &'a [String],
    /// How many rows the batch holds, when known before they are recorded: a check.
    pub rows: Option<u64>,
    /// Where to POST the batch's summary when it reaches a final state.
    pub callback_url: Option<&'a str>,
    /// Whose batch it is.
    pub tenant: &'a str,
}

/// A batch as the ledger holds it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct BatchRecord {
    pub batch_id: String,
    /// Whose batch it is.
    pub tenant: String,
    pub job_type: String,
    pub queue: String,
    pub file_name: Option<String>,
    pub header: Vec<String>,
    pub state: BatchState,
    pub error: Option<String>,
    pub rows: u64,
    pub published: u64,
    pub pending: u64,
    pub failed: u64,
    pub done: u64,
    pub dead: u64,
    pub cancelled: u64,
    pub received_at: String,
    pub published_at: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// Seconds from the first row settled to the last (or to now, while running).
    pub seconds_running: Option<f64>,
    /// Where the batch's summary is POSTed when it reaches a final state.
    pub callback_url: Option<String>,
    /// How the latest such callback went, once there is one.
    pub callback: Option<CallbackDelivery>,
}

impl BatchRecord {
    /// Rows settled (done, dead, or failed with attempts left) per second since the
    /// first row was; `None` before any row is.
    pub fn rows_per_second(&self) -> Option<f64> {
        let settled = self.done + self.dead + self.failed;
        self.seconds_running
            .filter(|s| *s > 0.0 && settled > 0)
            .map(|s| settled as f64 / s)
    }

    /// Seconds until every row is settled at [`BatchRecord::rows_per_second`], while
    /// the batch is queued or running.
    pub fn eta_seconds(&self) -> Option<f64> {
        let left = self.pending + self.failed;
        match (self.state, self.rows_per_second()) {
            (BatchState::Running | BatchState::Queued, Some(rate)) => Some(left as f64 / rate),
            _ => None,
        }
    }
}

/// A row that failed on its last attempt, or could not run at all.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct DeadRow {
    pub line: u64,
    pub attempts: u32,
    pub error: Option<String>,
    pub fields: Vec<String>,
}

/// Which batches to list, newest first.
#[derive(Debug, Clone, Default)]
pub struct BatchFilter {
    pub state: Option<BatchState>,
    pub job_type: Option<String>,
    /// Only this tenant's batches (every tenant's for `None`).
    pub tenant: Option<String>,
    /// Only batches older than this one (the last of the previous page).
    pub before: Option<String>,
    pub limit: u32,
}

/// What deleting a batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    Deleted,
    NotFound,
    /// Rows of it may still run: it is not deleted.
    Unfinished(BatchState),
}

/// The columns of a [`BatchRecord`], times as RFC 3339.
macro_rules! batch_columns {
    () => {
        concat!(
    "batch_id, tenant, job_type, queue, file_name, header, state, error, rows, published, ",
    "pending, failed, done, dead, cancelled, ",
    rfc3339!("received_at"),
    " AS received_at, ",
    rfc3339!("published_at"),
    " AS published_at, ",
    rfc3339!("started_at"),
    " AS started_at, ",
    rfc3339!("finished_at"),
    " AS finished_at, ",
    "extract(epoch FROM coalesce(finished_at, now()) - started_at)::float8 AS seconds_running, ",
    "callback_url, ",
    callback_column!()
        )
    };
}

fn count(row: &sqlx::postgres::PgRow, column: &str) -> Result<u64> {
    let n: i64 = row.try_get(column)?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// The state of `batch_id`, its row locked until `tx` ends; `None` if there is no
/// such batch.
pub(crate) async fn lock_state(
    tx: &mut sqlx::PgConnection,
    batch_id: &str,
) -> Result<Option<BatchState>> {
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM batches WHERE batch_id = $1 FOR UPDATE")
            .bind(batch_id)
            .fetch_optional(tx)
            .await?;
    state.as_deref().map(state_of).transpose()
}

/// A batch state as the ledger stores it.
pub(crate) fn state_of(state: &str) -> Result<BatchState> {
    state
        .parse()
        .map_err(|e: String| LedgerError::Query(sqlx::Error::Decode(e.into())))
}

fn batch_of(row: &sqlx::postgres::PgRow) -> Result<BatchRecord> {
    let state: String = row.try_get("state")?;
    Ok(BatchRecord {
        batch_id: row.try_get("batch_id")?,
        tenant: row.try_get("tenant")?,
        job_type: row.try_get("job_type")?,
        queue: row.try_get("queue")?,
        file_name: row.try_get("file_name")?,
        header: row.try_get("header")?,
        state: state_of(&state)?,
        error: row.try_get("error")?,
        rows: count(row, "rows")?,
        published: count(row, "published")?,
        pending: count(row, "pending")?,
        failed: count(row, "failed")?,
        done: count(row, "done")?,
        dead: count(row, "dead")?,
        cancelled: count(row, "cancelled")?,
        received_at: row.try_get("received_at")?,
        published_at: row.try_get("published_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        seconds_running: row.try_get("seconds_running")?,
        callback_url: row.try_get("callback_url")?,
        callback: row
            .try_get::<Option<String>, _>("callback")?
            .map(|json| serde_json::from_str(&json))
            .transpose()
            .map_err(|e| LedgerError::Query(sqlx::Error::Decode(e.into())))?,
    })
}

fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Ledger {
    /// Records `batch` in state `publishing` with its rows, read from `rows` as
    /// [`crate::copy::RowsEncoder`] wrote them, in one transaction: committed when
    /// `rows` ends, rolled back if reading it fails. `rows` may still be being written
    /// when this starts, so a batch is recorded as it is validated.
    pub async fn create_batch(
        &self,
        batch: &NewBatch<'_>,
        rows: impl AsyncRead + Unpin,
    ) -> Result<()> {
        self.schema().await?;
        let _slot = self
            .recordings
            .acquire()
            .await
            .expect("the ledger never closes its recording slots");
        let mut tx = self.pool().begin().await?;
        sqlx::query(
            "INSERT INTO batches (batch_id, job_type, queue, file_name, header, callback_url,
                                  tenant, rows, pending)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 0, 0)",
        )
        .bind(batch.batch_id)
        .bind(batch.job_type)
        .bind(batch.queue)
        .bind(batch.file_name)
        .bind(batch.header)
        .bind(batch.callback_url)
        .bind(batch.tenant)
        .execute(&mut *tx)
        .await?;
        let mut copy = tx.copy_in_raw(COPY_ROWS).await?;
        if let Err(e) = copy.read_from(rows).await {
            copy.abort(e.to_string()).await?;
            return Err(e.into());
        }
        let copied = copy.finish().await?;
        if batch.rows.is_some_and(|rows| rows != copied) {
            return Err(LedgerError::Input(std::io::Error::other(format!(
                "batch {} has {:?} rows but {copied} were recorded",
                batch.batch_id, batch.rows
            ))));
        }
        sqlx::query("UPDATE batches SET rows = $2, pending = $2 WHERE batch_id = $1")
            .bind(batch.batch_id)
            .bind(signed(copied))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Advances the count of rows RabbitMQ has confirmed, from the first, and renews
    /// the publication's heartbeat.
    pub async fn set_published(&self, batch_id: &str, published: u64) -> Result<()> {
        self.schema().await?;
        sqlx::query(
            "UPDATE batches SET published = greatest(published, $2), heartbeat_at = now()
             WHERE batch_id = $1",
        )
        .bind(batch_id)
        .bind(signed(published))
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Every row is confirmed: the batch is queued (or already finished, if workers
    /// settled every row while it was being published).
    pub async fn finish_publishing(&self, batch_id: &str) -> Result<()> {
        self.schema().await?;
        sqlx::query(
            "UPDATE batches SET published = rows, published_at = now(), state = 'queued'
             WHERE batch_id = $1 AND state = 'publishing'",
        )
        .bind(batch_id)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Publication stopped for good: the batch is `failed`, with the reason.
    pub async fn fail_publishing(&self, batch_id: &str, published: u64, error: &str) -> Result<()> {
        self.schema().await?;
        sqlx::query(
            "UPDATE batches SET state = 'failed', error = $3, finished_at = now(),
                    published = greatest(published, $2)
             WHERE batch_id = $1 AND state = 'publishing'",
        )
        .bind(batch_id)
        .bind(signed(published))
        .bind(error)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Claims the oldest batch still `publishing` whose heartbeat is older than
    /// `stale`, renewing its heartbeat so that no other producer claims it too.
    pub async fn claim_stale_publication(&self, stale: Duration) -> Result<Option<BatchRecord>> {
        self.schema().await?;
        let sql = concat!(
            "WITH claimed AS (
                 UPDATE batches SET heartbeat_at = now()
                 WHERE batch_id = (
                     SELECT batch_id FROM batches
                     WHERE state = 'publishing' AND heartbeat_at < now() - make_interval(secs => $1)
                     ORDER BY received_at LIMIT 1 FOR UPDATE SKIP LOCKED)
                 RETURNING *)
             SELECT ",
            batch_columns!(),
            " FROM claimed batches"
        );
        let row = sqlx::query(sql)
            .bind(stale.as_secs_f64())
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(batch_of).transpose()
    }

    /// The file line after which the rows of `batch_id` not among the first
    /// `published` start (0 for all of them).
    pub async fn resume_after(&self, batch_id: &str, published: u64) -> Result<u64> {
        self.schema().await?;
        if published == 0 {
            return Ok(0);
        }
        let line: Option<i64> = sqlx::query_scalar(
            "SELECT line FROM batch_rows WHERE batch_id = $1 ORDER BY line OFFSET $2 LIMIT 1",
        )
        .bind(batch_id)
        .bind(signed(published - 1))
        .fetch_optional(self.pool())
        .await?;
        Ok(line.map_or(u64::MAX, |l| u64::try_from(l).unwrap_or(0)))
    }

    /// Up to `limit` rows of `batch_id` after file line `after`, in file order, as
    /// `(line, fields)`: a page of rows to publish, read by key so each page costs the
    /// same however far into the batch it is.
    pub async fn rows_after(
        &self,
        batch_id: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<(u64, Vec<String>)>> {
        self.schema().await?;
        let rows: Vec<(i64, Vec<String>)> = sqlx::query_as(
            "SELECT line, fields FROM batch_rows WHERE batch_id = $1 AND line > $2
             ORDER BY line LIMIT $3",
        )
        .bind(batch_id)
        .bind(signed(after))
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(line, fields)| (u64::try_from(line).unwrap_or(0), fields))
            .collect())
    }

    /// The tenant of `batch_id`, if there is such a batch.
    pub async fn batch_tenant(&self, batch_id: &str) -> Result<Option<String>> {
        self.schema().await?;
        Ok(
            sqlx::query_scalar("SELECT tenant FROM batches WHERE batch_id = $1")
                .bind(batch_id)
                .fetch_optional(self.pool())
                .await?,
        )
    }

    pub async fn batch(&self, batch_id: &str) -> Result<Option<BatchRecord>> {
        self.caught_up().await?;
        let sql = concat!(
            "SELECT ",
            batch_columns!(),
            " FROM batches WHERE batch_id = $1"
        );
        let row = sqlx::query(sql)
            .bind(batch_id)
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(batch_of).transpose()
    }

    /// Batches newest first, as `filter` selects them.
    pub async fn batches(&self, filter: &BatchFilter) -> Result<Vec<BatchRecord>> {
        self.caught_up().await?;
        let sql = concat!(
            "SELECT ",
            batch_columns!(),
            " FROM batches
             WHERE ($1::text IS NULL OR state = $1)
               AND ($2::text IS NULL OR job_type = $2)
               AND ($3::text IS NULL OR (received_at, batch_id) <
                    (SELECT received_at, batch_id FROM batches WHERE batch_id = $3))
               AND ($5::text IS NULL OR tenant = $5)
             ORDER BY received_at DESC, batch_id DESC
             LIMIT $4"
        );
        let rows = sqlx::query(sql)
            .bind(filter.state.map(BatchState::as_str))
            .bind(filter.job_type.as_deref())
            .bind(filter.before.as_deref())
            .bind(i64::from(filter.limit))
            .bind(filter.tenant.as_deref())
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(batch_of).collect()
    }

    /// The first `limit` dead rows of `batch_id`, in line order: what a batch's page
    /// shows of them (the results download has them all).
    pub async fn dead_rows(&self, batch_id: &str, limit: u32) -> Result<Vec<DeadRow>> {
        self.caught_up().await?;
        let rows: Vec<(i64, i32, Option<String>, Vec<String>)> = sqlx::query_as(
            "SELECT line, attempts, error, fields FROM batch_rows
             WHERE batch_id = $1 AND status = 'dead' ORDER BY line LIMIT $2",
        )
        .bind(batch_id)
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(line, attempts, error, fields)| DeadRow {
                line: u64::try_from(line).unwrap_or(0),
                attempts: u32::try_from(attempts).unwrap_or(0),
                error,
                fields,
            })
            .collect())
    }

    /// Removes a finished batch and its rows.
    pub async fn delete_batch(&self, batch_id: &str) -> Result<Deleted> {
        self.caught_up().await?;
        // Outcomes still in the log of a batch deleted are dropped when folded: it is
        // finished, so none of them would change a row.
        let mut tx = self.pool().begin().await?;
        let Some(state) = lock_state(&mut tx, batch_id).await? else {
            return Ok(Deleted::NotFound);
        };
        if !state.is_finished() {
            return Ok(Deleted::Unfinished(state));
        }
        for statement in [
            "DELETE FROM batch_events WHERE batch_id = $1",
            "DELETE FROM batch_rows WHERE batch_id = $1",
            "DELETE FROM batches WHERE batch_id = $1",
        ] {
            sqlx::query(statement)
                .bind(batch_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(Deleted::Deleted)
    }
}
