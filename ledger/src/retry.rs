//! Retrying a batch's dead rows: each set back to pending with its attempts reset and
//! published again, once.
//!
//! [`Ledger::retry_dead`] moves the dead rows to pending and lists them in
//! `retry_rows` in one transaction; the producer then publishes what that list holds
//! ([`Ledger::retry_rows_after`]) and, once RabbitMQ has confirmed all of it (and the
//! rows' copies are out of the dead queue), empties it ([`Ledger::retried`]). A
//! producer that dies in between leaves the list as it was, and the next retry of the
//! batch publishes it again: no row is left pending unpublished, none both dead and
//! pending; at worst a row is delivered twice, and counted once.

use serde::Serialize;

use crate::{BatchState, Ledger, LedgerError, Result, batches::lock_state};

/// What a retry did, as the producer answers `POST /batches/{id}/retry`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Retried {
    pub batch_id: String,
    /// Dead rows set back to pending by this call.
    pub retried: u64,
    /// Rows published again and confirmed: those, and any an interrupted retry left.
    pub published: u64,
    /// Their copies taken out of the dead queue.
    pub removed_from_dead_queue: u64,
}

/// What a retry set in motion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Retry {
    /// Dead rows set back to pending by this call.
    pub retried: u64,
    /// Rows to publish: those, and any an interrupted retry left unpublished.
    pub to_publish: u64,
}

/// Why a batch's dead rows cannot be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryRefused {
    NotFound,
    /// Still being published, never published, or cancelled.
    State(BatchState),
}

impl Ledger {
    /// Sets every dead row of `batch_id` back to pending (attempts 0, no error) and
    /// lists it for publication; the batch runs again.
    pub async fn retry_dead(
        &self,
        batch_id: &str,
    ) -> Result<std::result::Result<Retry, RetryRefused>> {
        self.caught_up().await?;
        let mut tx = self.pool().begin().await?;
        // Every outcome recorded so far counts first, and none is folded until this ends.
        crate::outcomes::fold_within(&mut tx).await?;
        let Some(state) = lock_state(&mut tx, batch_id).await? else {
            return Ok(Err(RetryRefused::NotFound));
        };
        if matches!(
            state,
            BatchState::Publishing | BatchState::Failed | BatchState::Cancelled
        ) {
            return Ok(Err(RetryRefused::State(state)));
        }
        let retried: i64 = sqlx::query_scalar(
            "WITH retried AS (
                 UPDATE batch_rows SET status = 'pending', attempts = 0, error = NULL,
                        result = NULL, worker = NULL, settled_at = NULL
                 WHERE batch_id = $1 AND status = 'dead'
                 RETURNING batch_id, line
             ), positions AS (
                 SELECT line, row_number() OVER (ORDER BY line) AS position
                 FROM batch_rows WHERE batch_id = $1
             ), listed AS (
                 INSERT INTO retry_rows (batch_id, line, position)
                 SELECT r.batch_id, r.line, p.position FROM retried r JOIN positions p USING (line)
                 ON CONFLICT DO NOTHING
             )
             SELECT count(*) FROM retried",
        )
        .bind(batch_id)
        .fetch_one(&mut *tx)
        .await?;
        if retried > 0 {
            sqlx::query(
                "UPDATE batches SET dead = dead - $2, pending = pending + $2, state = 'running',
                        finished_at = NULL
                 WHERE batch_id = $1",
            )
            .bind(batch_id)
            .bind(retried)
            .execute(&mut *tx)
            .await?;
        }
        let to_publish: i64 =
            sqlx::query_scalar("SELECT count(*) FROM retry_rows WHERE batch_id = $1")
                .bind(batch_id)
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(Ok(Retry {
            retried: u64::try_from(retried).unwrap_or(0),
            to_publish: u64::try_from(to_publish).unwrap_or(0),
        }))
    }

    /// Up to `limit` rows of `batch_id` listed for publication by a retry, after file
    /// line `after`, in file order, as `(line, position, fields)`: `position` is the
    /// row's among the batch's data rows, from 1.
    pub async fn retry_rows_after(
        &self,
        batch_id: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<(u64, u64, Vec<String>)>> {
        self.schema().await?;
        let rows: Vec<(i64, i64, Vec<String>)> = sqlx::query_as(
            "SELECT r.line, t.position, r.fields FROM retry_rows t
             JOIN batch_rows r USING (batch_id, line)
             WHERE t.batch_id = $1 AND t.line > $2
             ORDER BY t.line LIMIT $3",
        )
        .bind(batch_id)
        .bind(i64::try_from(after).unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(line, position, fields)| {
                let unsigned = |n: i64| u64::try_from(n).unwrap_or(0);
                (unsigned(line), unsigned(position), fields)
            })
            .collect())
    }

    /// The file lines of the rows of `batch_id` a retry listed for publication.
    pub async fn retry_lines(&self, batch_id: &str) -> Result<Vec<u64>> {
        self.schema().await?;
        let lines: Vec<i64> =
            sqlx::query_scalar("SELECT line FROM retry_rows WHERE batch_id = $1 ORDER BY line")
                .bind(batch_id)
                .fetch_all(self.pool())
                .await?;
        Ok(lines
            .into_iter()
            .map(|l| u64::try_from(l).unwrap_or(0))
            .collect())
    }

    /// Every row listed for `batch_id` by a retry is published and confirmed.
    pub async fn retried(&self, batch_id: &str) -> Result<()> {
        self.schema().await?;
        sqlx::query("DELETE FROM retry_rows WHERE batch_id = $1")
            .bind(batch_id)
            .execute(self.pool())
            .await
            .map_err(LedgerError::from)?;
        Ok(())
    }
}
