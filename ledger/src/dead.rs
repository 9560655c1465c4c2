//! Dead rows of a job type: listed for `GET /dead`, and moved back to pending for a
//! replay of the dead queue.
//!
//! A row is `dead` in the ledger exactly while its message is in `<queue>.dead` (a
//! worker records the outcome before it dead-letters the row; a retry or a replay
//! moves it to pending before it takes the message out), so the dead queue is listed
//! from here: paged, without consuming or reordering the queue.
//!
//! A replay takes dead messages from the queue a few at a time and asks
//! [`Ledger::revive_dead`] which of their rows to publish again: those still dead
//! are set back to pending (attempts reset) and listed in `retry_rows`, in one
//! transaction, before their copies are published; once RabbitMQ has confirmed them
//! the replay unlists them ([`Ledger::unlist`]) and acks the dead messages. A replay
//! interrupted in between leaves them listed, and the next one publishes what is
//! listed first ([`Ledger::listed_batches`]) and drops the dead copies of rows that
//! are no longer dead: no row is left both dead and pending, none is lost.

use std::collections::HashMap;

use serde::Serialize;

use crate::{Ledger, Result, rfc3339};

/// A dead row as `GET /dead` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct DeadLetter {
    pub batch_id: String,
    pub line: u64,
    pub attempts: u32,
    pub error: Option<String>,
    /// The worker that gave up on it.
    pub worker: Option<String>,
    pub settled_at: Option<String>,
    pub fields: Vec<String>,
}

impl DeadLetter {
    /// Where the next page starts: `<batch_id>:<line>`, for [`parse_cursor`].
    pub fn cursor(&self) -> String {
        format!("{}:{}", self.batch_id, self.line)
    }
}

/// The row a [`DeadLetter::cursor`] names.
pub fn parse_cursor(cursor: &str) -> Result<(String, u64), String> {
    cursor
        .rsplit_once(':')
        .and_then(|(batch, line)| Some((batch.to_string(), line.parse().ok()?)))
        .ok_or_else(|| {
            format!(
                "after must be <batch_id>:<line>, as the previous page gives it, not {cursor:?}"
            )
        })
}

/// Which dead rows to list: of one job type (and optionally one batch), after a
/// given row, in (batch, line) order.
#[derive(Debug, Clone, Default)]
pub struct DeadFilter {
    pub job_type: String,
    pub batch_id: Option<String>,
    /// The last row of the previous page.
    pub after: Option<(String, u64)>,
    pub limit: u32,
}

/// What the ledger says of a dead message's row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revival {
    /// It was dead: now pending and listed. Publish the copy.
    Revived,
    /// It is not dead any more: a retry or an earlier replay took it. Drop the copy.
    NotDead,
    /// Its batch was cancelled: keep the copy in the dead queue.
    Cancelled,
    /// The ledger does not hold it (its batch was deleted): publish the copy.
    Unknown,
}

impl Ledger {
    /// A page of the dead rows `filter` selects.
    pub async fn dead_letters(&self, filter: &DeadFilter) -> Result<Vec<DeadLetter>> {
        self.caught_up().await?;
        let (after_batch, after_line) = filter
            .after
            .as_ref()
            .map_or(("", 0), |(batch, line)| (batch.as_str(), *line));
        let sql = concat!(
            "SELECT r.batch_id, r.line, r.attempts, r.error, r.worker, ",
            rfc3339!("r.settled_at"),
            ", r.fields
             FROM batches b JOIN batch_rows r USING (batch_id)
             WHERE b.job_type = $1 AND b.dead > 0 AND r.status = 'dead'
               AND ($2::text IS NULL OR b.batch_id = $2)
               AND (r.batch_id, r.line) > ($3, $4)
             ORDER BY r.batch_id, r.line LIMIT $5"
        );
        type Columns = (
            String,
            i64,
            i32,
            Option<String>,
            Option<String>,
            Option<String>,
            Vec<String>,
        );
        let rows: Vec<Columns> = sqlx::query_as(sql)
            .bind(&filter.job_type)
            .bind(filter.batch_id.as_deref())
            .bind(after_batch)
            .bind(i64::try_from(after_line).unwrap_or(i64::MAX))
            .bind(i64::from(filter.limit))
            .fetch_all(self.pool())
            .await?;
        Ok(rows
            .into_iter()
            .map(
                |(batch_id, line, attempts, error, worker, settled_at, fields)| DeadLetter {
                    batch_id,
                    line: u64::try_from(line).unwrap_or(0),
                    attempts: u32::try_from(attempts).unwrap_or(0),
                    error,
                    worker,
                    settled_at,
                    fields,
                },
            )
            .collect())
    }

    /// Sets the rows of `messages` (batch, line, position among the batch's rows)
    /// that are still dead back to pending, attempts reset, and lists them for
    /// publication; says for each what to do with its dead copy.
    pub async fn revive_dead(&self, messages: &[(String, u64, u64)]) -> Result<Vec<Revival>> {
        self.caught_up().await?;
        let mut keys: Vec<(&str, i64, i64)> = messages
            .iter()
            .map(|(batch, line, position)| {
                (
                    batch.as_str(),
                    i64::try_from(*line).unwrap_or(i64::MAX),
                    i64::try_from(*position).unwrap_or(i64::MAX),
                )
            })
            .collect();
        // Rows in key order, then their batches, each once; no fold runs meanwhile.
        keys.sort_unstable();
        keys.dedup_by(|a, b| (a.0, a.1) == (b.0, b.1));
        let batches: Vec<&str> = keys.iter().map(|k| k.0).collect();
        let lines: Vec<i64> = keys.iter().map(|k| k.1).collect();
        let mut tx = self.pool().begin().await?;
        // Every outcome recorded so far counts first, and none is folded until this ends.
        crate::outcomes::fold_within(&mut tx).await?;
        let found: Vec<(String, i64, String, String)> = sqlx::query_as(
            "SELECT r.batch_id, r.line, r.status, b.state
             FROM unnest($1::text[], $2::bigint[]) AS w(batch_id, line)
             JOIN batch_rows r ON r.batch_id = w.batch_id AND r.line = w.line
             JOIN batches b ON b.batch_id = r.batch_id
             ORDER BY r.batch_id, r.line FOR UPDATE OF r",
        )
        .bind(&batches)
        .bind(&lines)
        .fetch_all(&mut *tx)
        .await?;
        let found: HashMap<(String, i64), Revival> = found
            .into_iter()
            .map(|(batch, line, status, state)| {
                let revival = match (status.as_str(), state.as_str()) {
                    ("dead", "cancelled") => Revival::Cancelled,
                    ("dead", _) => Revival::Revived,
                    _ => Revival::NotDead,
                };
                ((batch, line), revival)
            })
            .collect();
        let revive: Vec<usize> = (0..keys.len())
            .filter(|&i| found.get(&(keys[i].0.to_string(), keys[i].1)) == Some(&Revival::Revived))
            .collect();
        if !revive.is_empty() {
            let pick = |column: &dyn Fn(usize) -> i64| revive.iter().map(|&i| column(i)).collect();
            let revive_batches: Vec<&str> = revive.iter().map(|&i| keys[i].0).collect();
            let revive_lines: Vec<i64> = pick(&|i| keys[i].1);
            let revive_positions: Vec<i64> = pick(&|i| keys[i].2);
            sqlx::query(
                "WITH revived AS (
                     UPDATE batch_rows r SET status = 'pending', attempts = 0, error = NULL,
                            result = NULL, worker = NULL, settled_at = NULL
                     FROM unnest($1::text[], $2::bigint[]) AS w(batch_id, line)
                     WHERE r.batch_id = w.batch_id AND r.line = w.line
                     RETURNING r.batch_id, r.line)
                 INSERT INTO retry_rows (batch_id, line, position)
                 SELECT w.batch_id, w.line, w.position
                 FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS w(batch_id, line, position)
                 JOIN revived USING (batch_id, line)
                 ON CONFLICT DO NOTHING",
            )
            .bind(&revive_batches)
            .bind(&revive_lines)
            .bind(&revive_positions)
            .execute(&mut *tx)
            .await?;
            let mut per_batch: Vec<(&str, i64)> = Vec::new();
            for batch in &revive_batches {
                match per_batch.last_mut() {
                    Some((b, n)) if b == batch => *n += 1,
                    _ => per_batch.push((batch, 1)),
                }
            }
            for (batch, n) in per_batch {
                sqlx::query(
                    "UPDATE batches SET dead = dead - $2, pending = pending + $2,
                            state = CASE WHEN state IN ('done', 'done_with_failures')
                                         THEN 'running' ELSE state END,
                            finished_at = CASE WHEN state IN ('done', 'done_with_failures')
                                               THEN NULL ELSE finished_at END
                     WHERE batch_id = $1",
                )
                .bind(batch)
                .bind(n)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(messages
            .iter()
            .map(|(batch, line, _)| {
                let line = i64::try_from(*line).unwrap_or(i64::MAX);
                found
                    .get(&(batch.clone(), line))
                    .copied()
                    .unwrap_or(Revival::Unknown)
            })
            .collect())
    }

    /// Rows `rows` (batch, line) are published and confirmed: off the retry list.
    pub async fn unlist(&self, rows: &[(String, u64)]) -> Result<()> {
        self.schema().await?;
        let batches: Vec<&str> = rows.iter().map(|(b, _)| b.as_str()).collect();
        let lines: Vec<i64> = rows
            .iter()
            .map(|(_, l)| i64::try_from(*l).unwrap_or(i64::MAX))
            .collect();
        sqlx::query(
            "DELETE FROM retry_rows t USING unnest($1::text[], $2::bigint[]) AS w(batch_id, line)
             WHERE t.batch_id = w.batch_id AND t.line = w.line",
        )
        .bind(&batches)
        .bind(&lines)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Batches of `job_type` with rows listed for publication that an interrupted
    /// retry or replay did not see confirmed.
    pub async fn listed_batches(&self, job_type: &str) -> Result<Vec<String>> {
        self.schema().await?;
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT t.batch_id FROM retry_rows t JOIN batches b USING (batch_id)
             WHERE b.job_type = $1 ORDER BY t.batch_id",
        )
        .bind(job_type)
        .fetch_all(self.pool())
        .await?)
    }
}
