//! Cancelling a batch: every row of it not yet settled becomes `cancelled`, and the
//! batch is finished, `cancelled`.
//!
//! Rows already queued stay in RabbitMQ; workers ack them without running them (they
//! ask [`Ledger::batch_state`]). A row in a worker's hands when the batch is cancelled
//! finishes, but its outcome, folded after the cancel, does not change `cancelled`:
//! the counts say how many rows ran before the cancel (outcomes recorded before it are
//! folded first).

use serde::Serialize;

use crate::{BatchState, Ledger, Result};

/// What a cancel did, as the producer answers `POST /batches/{id}/cancel`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct CancelAnswer {
    pub batch_id: String,
    /// `cancelled`.
    pub state: BatchState,
    #[serde(flatten)]
    pub counts: Cancelled,
}

/// What cancelling a batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Cancelled {
    /// Rows that will not run.
    pub cancelled: u64,
    /// Rows that ran before: done or dead.
    pub ran: u64,
}

/// Why a batch cannot be cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelRefused {
    NotFound,
    /// It is finished already.
    Finished(BatchState),
}

impl Ledger {
    /// Cancels `batch_id`: its pending rows, and failed ones with attempts left, are
    /// `cancelled`, as is the batch.
    pub async fn cancel_batch(
        &self,
        batch_id: &str,
    ) -> Result<std::result::Result<Cancelled, CancelRefused>> {
        self.caught_up().await?;
        let mut tx = self.pool().begin().await?;
        // Every outcome recorded so far counts first, and none is folded until this
        // ends: the rows' statuses and the batch's state are the last word.
        crate::outcomes::fold_within(&mut tx).await?;
        let Some(state) = state_in(&mut tx, batch_id).await? else {
            return Ok(Err(CancelRefused::NotFound));
        };
        if state.is_finished() {
            return Ok(Err(CancelRefused::Finished(state)));
        }
        let (pending, failed): (i64, i64) = sqlx::query_as(
            "WITH cancelled AS (
                 UPDATE batch_rows r SET status = 'cancelled', settled_at = now()
                 FROM (SELECT line, status FROM batch_rows
                       WHERE batch_id = $1 AND status IN ('pending', 'failed')
                       ORDER BY line FOR UPDATE) o
                 WHERE r.batch_id = $1 AND r.line = o.line
                 RETURNING o.status AS was
             )
             SELECT count(*) FILTER (WHERE was = 'pending'), count(*) FILTER (WHERE was = 'failed')
             FROM cancelled",
        )
        .bind(batch_id)
        .fetch_one(&mut *tx)
        .await?;
        let counted: Option<(i64, i64)> = sqlx::query_as(
            "UPDATE batches SET pending = pending - $2, failed = failed - $3,
                    cancelled = cancelled + $2 + $3, state = 'cancelled', finished_at = now()
             WHERE batch_id = $1
               AND state NOT IN ('done', 'done_with_failures', 'failed', 'cancelled')
             RETURNING done, dead",
        )
        .bind(batch_id)
        .bind(pending)
        .bind(failed)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((done, dead)) = counted else {
            // It finished meanwhile (its publication ended with every row settled):
            // the rows go back as they were.
            let state = state_in(&mut tx, batch_id).await?;
            tx.rollback().await?;
            return Ok(Err(
                state.map_or(CancelRefused::NotFound, CancelRefused::Finished)
            ));
        };
        // A retry still to be published is not.
        sqlx::query("DELETE FROM retry_rows WHERE batch_id = $1")
            .bind(batch_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        let unsigned = |n: i64| u64::try_from(n).unwrap_or(0);
        Ok(Ok(Cancelled {
            cancelled: unsigned(pending + failed),
            ran: unsigned(done + dead),
        }))
    }

    /// The state of `batch_id`, or `None` if the ledger does not hold it.
    pub async fn batch_state(&self, batch_id: &str) -> Result<Option<BatchState>> {
        self.schema().await?;
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM batches WHERE batch_id = $1")
                .bind(batch_id)
                .fetch_optional(self.pool())
                .await?;
        state.as_deref().map(crate::batches::state_of).transpose()
    }
}

/// The state of `batch_id` as `tx` sees it.
async fn state_in(tx: &mut sqlx::PgConnection, batch_id: &str) -> Result<Option<BatchState>> {
    let state: Option<String> = sqlx::query_scalar("SELECT state FROM batches WHERE batch_id = $1")
        .bind(batch_id)
        .fetch_optional(tx)
        .await?;
    state.as_deref().map(crate::batches::state_of).transpose()
}
