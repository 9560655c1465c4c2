//! The outbox of batch state changes: each one published on the events exchange, and
//! the final ones POSTed to the callback URL their upload gave.
//!
//! A trigger on `batches` (migration 0007) writes every change of a batch's state to
//! `batch_events` in the transaction that makes it, with the batch as it was then, so
//! no change is missed whoever makes it (a producer, a worker, a cancel). The producer
//! delivers them: [`Ledger::unpublished_events`] and [`Ledger::events_published`] for
//! the exchange, [`Ledger::claim_due_callbacks`] and [`Ledger::callback_attempted`] for
//! callbacks; [`Ledger::listen_for_events`] wakes it as a change commits.

use std::time::Duration;

use serde::Serialize;
use sqlx::postgres::PgListener;

use crate::{BatchState, Ledger, LedgerError, Result, batches::state_of};

/// The PostgreSQL notification channel a change of a batch's state notifies.
const CHANNEL: &str = "spillway_batch_events";

/// A change of a batch's state.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchEvent {
    pub id: i64,
    pub batch_id: String,
    pub job_type: String,
    pub state: BatchState,
    /// The batch at the change: id, job type, state, counts and times.
    pub summary: serde_json::Map<String, serde_json::Value>,
}

/// A callback due now, leased to its caller for a while.
#[derive(Debug, Clone, PartialEq)]
pub struct DueCallback {
    pub event: BatchEvent,
    pub url: String,
    /// Attempts made before this one.
    pub attempts: u32,
    /// How long ago the batch reached the state being told.
    pub age: Duration,
}

/// How an attempt to deliver a callback went.
#[derive(Debug, Clone, PartialEq)]
pub enum Attempt {
    Delivered,
    /// Failed; try again after this long.
    Failed {
        error: String,
        retry_in: Duration,
    },
    /// Failed, and no more attempts will be made.
    GaveUp {
        error: String,
    },
}

/// Where a batch's completion callback stands, as the batch shows it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct CallbackDelivery {
    /// `pending`, `delivered` or `given_up`.
    pub status: String,
    pub attempts: u32,
    /// The last failed attempt's error.
    pub error: Option<String>,
    /// When it was delivered or given up on.
    pub ended_at: Option<String>,
}

/// Wakes its owner when a batch's state changes.
pub struct EventListener(PgListener);

impl EventListener {
    /// Resolves at the next change committed (or when the connection was lost and
    /// found again, as changes may have been missed meanwhile).
    pub async fn changed(&mut self) -> Result<()> {
        self.0.try_recv().await?;
        Ok(())
    }
}

/// A change as selected: id, batch, job type, state, summary as JSON text.
type EventColumns = (i64, String, String, String, String);
/// A due callback as selected: the change's columns, then URL, attempts and age.
type CallbackColumns = (i64, String, String, String, String, String, i32, f64);

fn event_of((id, batch_id, job_type, state, summary): EventColumns) -> Result<BatchEvent> {
    let summary = serde_json::from_str(&summary)
        .map_err(|e| LedgerError::Query(sqlx::Error::Decode(e.into())))?;
    Ok(BatchEvent {
        id,
        batch_id,
        job_type,
        state: state_of(&state)?,
        summary,
    })
}

impl Ledger {
    /// A listener woken by every change of a batch's state, on a connection of its own.
    pub async fn listen_for_events(&self) -> Result<EventListener> {
        self.schema().await?;
        let mut listener = PgListener::connect_with(self.pool()).await?;
        listener.listen(CHANNEL).await?;
        Ok(EventListener(listener))
    }

    /// Up to `limit` changes not yet published on the events exchange, oldest first.
    pub async fn unpublished_events(&self, limit: u32) -> Result<Vec<BatchEvent>> {
        self.schema().await?;
        let rows: Vec<EventColumns> = sqlx::query_as(
            "SELECT id, batch_id, job_type, state, summary::text FROM batch_events
             WHERE published_at IS NULL ORDER BY id LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?;
        rows.into_iter().map(event_of).collect()
    }

    /// The changes `ids` are confirmed on the events exchange.
    pub async fn events_published(&self, ids: &[i64]) -> Result<()> {
        self.schema().await?;
        sqlx::query("UPDATE batch_events SET published_at = now() WHERE id = ANY($1)")
            .bind(ids)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Up to `limit` callbacks due now, each leased for `lease`: no other caller gets
    /// it until the lease ends, so a process that dies mid-attempt leaves it to be
    /// tried again then.
    pub async fn claim_due_callbacks(
        &self,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<DueCallback>> {
        self.schema().await?;
        let rows: Vec<CallbackColumns> = sqlx::query_as(
            "UPDATE batch_events SET callback_due_at = now() + make_interval(secs => $2)
             WHERE id IN (SELECT id FROM batch_events
                          WHERE callback_status = 'pending' AND callback_due_at <= now()
                          ORDER BY callback_due_at LIMIT $1 FOR UPDATE SKIP LOCKED)
             RETURNING id, batch_id, job_type, state, summary::text, callback_url,
                       callback_attempts, extract(epoch FROM now() - at)::float8",
        )
        .bind(i64::from(limit))
        .bind(lease.as_secs_f64())
        .fetch_all(self.pool())
        .await?;
        rows.into_iter()
            .map(
                |(id, batch_id, job_type, state, summary, url, attempts, age)| {
                    Ok(DueCallback {
                        event: event_of((id, batch_id, job_type, state, summary))?,
                        url,
                        attempts: u32::try_from(attempts).unwrap_or(0),
                        age: Duration::from_secs_f64(age.max(0.0)),
                    })
                },
            )
            .collect()
    }

    /// Records an attempt to deliver the callback of change `id`.
    pub async fn callback_attempted(&self, id: i64, attempt: &Attempt) -> Result<()> {
        self.schema().await?;
        let (status, error, retry_in) = match attempt {
            Attempt::Delivered => ("delivered", None, None),
            Attempt::Failed { error, retry_in } => ("pending", Some(error), Some(*retry_in)),
            Attempt::GaveUp { error } => ("given_up", Some(error), None),
        };
        sqlx::query(
            "UPDATE batch_events SET callback_status = $2, callback_attempts = callback_attempts + 1,
                    callback_error = coalesce($3, callback_error),
                    callback_due_at = CASE WHEN $4::float8 IS NULL THEN NULL
                                           ELSE now() + make_interval(secs => $4) END,
                    callback_ended_at = CASE WHEN $2 = 'pending' THEN NULL ELSE now() END
             WHERE id = $1",
        )
        .bind(id)
        .bind(status)
        .bind(error)
        .bind(retry_in.map(|d| d.as_secs_f64()))
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// How long until the next callback is due, if one is pending.
    pub async fn next_callback_due(&self) -> Result<Option<Duration>> {
        self.schema().await?;
        let seconds: Option<f64> = sqlx::query_scalar(
            "SELECT extract(epoch FROM min(callback_due_at) - now())::float8 FROM batch_events
             WHERE callback_status = 'pending'",
        )
        .fetch_one(self.pool())
        .await?;
        Ok(seconds.map(|s| Duration::from_secs_f64(s.max(0.0))))
    }

    /// Asks for a callback to `url` when `batch_id` reaches a final state.
    pub async fn set_callback_url(&self, batch_id: &str, url: &str) -> Result<()> {
        self.schema().await?;
        sqlx::query("UPDATE batches SET callback_url = $2 WHERE batch_id = $1")
            .bind(batch_id)
            .bind(url)
            .execute(self.pool())
            .await?;
        Ok(())
    }
}

/// The latest callback delivery of the batch in the enclosing query's `batches`, as
/// JSON text, for [`crate::BatchRecord`].
macro_rules! callback_column {
    () => {
        concat!(
            "(SELECT json_build_object('status', callback_status, 'attempts', callback_attempts,
                     'error', callback_error, 'ended_at', ",
            rfc3339!("callback_ended_at"),
            ")::text FROM batch_events e
              WHERE e.batch_id = batches.batch_id AND e.callback_status IS NOT NULL
              ORDER BY e.id DESC LIMIT 1) AS callback"
        )
    };
}
pub(crate) use callback_column;
