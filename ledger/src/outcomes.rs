//! Rows' outcomes, recorded by workers before they ack the rows, and folded into the
//! rows and their batches' counts.
//!
//! A worker gathers the outcomes of many rows and records them with one call
//! ([`Ledger::record`]): one `INSERT` into the outcome log (`row_outcomes`, migration
//! 0009), whatever their number. The log has no index and nothing in it is updated, so
//! workers recording at once never wait for each other, nor for the rows' or the
//! batches' locks: a worker's write costs what appending its rows costs.
//!
//! [`Ledger::fold`] moves logged outcomes into `batch_rows` and the batches' counters,
//! a chunk at a time, each chunk one statement that deletes it from the log and applies
//! it: so each logged outcome is folded exactly once. One fold runs at a time (an
//! advisory lock). The producer folds continually; every reader of a row's status or a
//! batch's counts folds first ([`Ledger::caught_up`]), and so does every operation that
//! changes rows (cancel, retry, delete, revive), under the same lock, so none of them
//! sees a row without the outcomes already recorded for it, and none changes a row
//! while a fold does.
//!
//! Folding is idempotent: a row whose status is final (`done`, `dead`, `cancelled`)
//! keeps it, so a redelivered row never counts twice in any figure; and a `failed`
//! outcome of an earlier delivery than the row's is passed over, so the order in which
//! outcomes are folded does not matter. A batch's counters move by the transitions the
//! fold actually made, in the same statement.

use sqlx::PgConnection;

use crate::{Ledger, Result, RowStatus};

/// How one delivery of a row ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub batch_id: String,
    pub line: u64,
    /// `Done`, `Failed` (it will be delivered again) or `Dead`.
    pub status: RowStatus,
    /// Deliveries so far, this one included.
    pub attempts: u32,
    pub error: Option<String>,
    pub result: Option<String>,
    /// When the worker started this row, in seconds since the Unix epoch.
    pub started_unix: f64,
}

/// What folding logged outcomes changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Folded {
    /// Outcomes taken out of the log and folded, whatever they changed.
    pub outcomes: u64,
    /// Rows an outcome was applied to (a failed row failing again counts). Outcomes of a
    /// row already final, and an earlier delivery's failure, change nothing.
    pub rows_changed: u64,
    /// Outcomes of rows the ledger does not hold (a deleted batch): dropped.
    pub unknown: u64,
}

impl Folded {
    fn add(&mut self, other: Folded) {
        self.outcomes += other.outcomes;
        self.rows_changed += other.rows_changed;
        self.unknown += other.unknown;
    }
}

/// Most logged outcomes folded in one transaction.
pub const FOLD_CHUNK: usize = 8192;

/// The advisory lock a fold holds: one fold at a time, and no cancel, retry or delete
/// in the middle of one.
const FOLD_LOCK: i64 = 0x5350_494c_4c46_4f4c; // "SPILLFOL"

impl Ledger {
    /// Records `outcomes` as settled by `worker`: one `INSERT` into the outcome log,
    /// committed when this returns. They count once folded ([`Ledger::fold`]), which
    /// every reader of the ledger does first.
    pub async fn record(&self, worker: &str, outcomes: &[Outcome]) -> Result<()> {
        self.schema().await?;
        if outcomes.is_empty() {
            return Ok(());
        }
        let columns = OutcomeColumns::of(outcomes);
        sqlx::query(
            "INSERT INTO row_outcomes (batch_id, line, status, attempts, error, result, worker, started)
             SELECT u.batch_id, u.line, u.status, u.attempts, u.error, u.result, $8, u.started
             FROM unnest($1::text[], $2::int8[], $3::text[], $4::int4[], $5::text[], $6::text[],
                         $7::float8[])
                 AS u(batch_id, line, status, attempts, error, result, started)",
        )
        .bind(&columns.batch_ids)
        .bind(&columns.lines)
        .bind(&columns.statuses)
        .bind(&columns.attempts)
        .bind(&columns.errors)
        .bind(&columns.results)
        .bind(&columns.started)
        .bind(worker)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Folds the outcomes logged so far into their rows and their batches' counts, a
    /// chunk per transaction, and says what that changed. Outcomes logged meanwhile are
    /// left to the next fold, so a fold ends however fast workers log.
    pub async fn fold(&self) -> Result<Folded> {
        self.schema().await?;
        match began(self.pool()).await? {
            Some(began) => self.fold_until(&began).await,
            None => Ok(Folded::default()),
        }
    }

    /// Folds the outcomes recorded up to `began`, a time as PostgreSQL writes it.
    async fn fold_until(&self, began: &str) -> Result<Folded> {
        let mut folded = Folded::default();
        loop {
            let mut tx = self.pool().begin().await?;
            lock_folds(&mut tx).await?;
            let chunk = fold_chunk(&mut tx, began).await?;
            tx.commit().await?;
            folded.add(chunk);
            if chunk.outcomes < FOLD_CHUNK as u64 {
                return Ok(folded);
            }
        }
    }

    /// Applies the schema, and folds the outcomes logged so far, if any: what every
    /// reader of rows' statuses or batches' counts does first.
    pub(crate) async fn caught_up(&self) -> Result<()> {
        self.fold().await?;
        Ok(())
    }

    /// The status of one row, counting its outcomes still in the log, or `None` if the
    /// ledger does not hold it. A worker asks this of a redelivered row only, to ack a
    /// row already done without running it; it waits for no fold.
    pub async fn row_status(&self, batch_id: &str, line: u64) -> Result<Option<RowStatus>> {
        self.schema().await?;
        let status: Option<String> = sqlx::query_scalar(
            "SELECT CASE WHEN r.status IN ('pending', 'failed')
                         THEN coalesce((SELECT o.status FROM row_outcomes o
                                        WHERE o.batch_id = r.batch_id AND o.line = r.line
                                          AND o.status <> 'failed'
                                        LIMIT 1), r.status)
                         ELSE r.status END
             FROM batch_rows r WHERE r.batch_id = $1 AND r.line = $2",
        )
        .bind(batch_id)
        .bind(line_of(line))
        .fetch_optional(self.pool())
        .await?;
        Ok(status.and_then(|s| s.parse().ok()))
    }
}

/// When a fold begins (the statement's time, as PostgreSQL writes it), or `None` if the
/// log is empty. Every outcome committed before has an earlier `settled_at` (its
/// transaction's start); outcomes being folded still count until their fold commits,
/// so `None` means nothing is left to fold, nor being folded.
async fn began<'c>(executor: impl sqlx::PgExecutor<'c>) -> Result<Option<String>> {
    Ok(sqlx::query_scalar(
        "SELECT statement_timestamp()::text WHERE EXISTS (SELECT FROM row_outcomes)",
    )
    .fetch_optional(executor)
    .await?)
}

/// Takes the fold lock for the rest of `tx`, and folds every outcome logged so far in
/// it: what an operation that changes rows does before it reads them.
pub(crate) async fn fold_within(tx: &mut PgConnection) -> Result<()> {
    lock_folds(tx).await?;
    if let Some(began) = began(&mut *tx).await? {
        while fold_chunk(tx, &began).await?.outcomes == FOLD_CHUNK as u64 {}
    }
    Ok(())
}

async fn lock_folds(tx: &mut PgConnection) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(FOLD_LOCK)
        .execute(tx)
        .await?;
    Ok(())
}

/// Takes up to a chunk of the outcomes recorded up to `began` out of the log and
/// applies them, in `tx`, which holds the fold lock: one statement.
///
/// A row's outcomes apply by delivery, then by when they were recorded, and the row
/// ends with the first final one (done or dead), or else with the last. It changes
/// only from `pending` or `failed`, and to `failed` only from as many deliveries as
/// the outcome's or fewer. The row's status before (`was`, the statement's snapshot:
/// no other fold, cancel or retry runs meanwhile) and after move its batch's counters;
/// a row changed since the snapshot (by a writer that does not take the fold lock) is
/// not, and its outcome goes back into the log to be folded again.
async fn fold_chunk(tx: &mut PgConnection, began: &str) -> Result<Folded> {
    let (outcomes, rows_changed, unknown): (i64, i64, i64) = sqlx::query_as(
        "WITH taken AS (
             DELETE FROM row_outcomes
             WHERE ctid = ANY (ARRAY (SELECT ctid FROM row_outcomes
                                      WHERE settled_at <= $2::timestamptz LIMIT $1))
             RETURNING *
         ), per_row AS (
             SELECT DISTINCT ON (batch_id, line)
                    batch_id, line, status, error, result, worker, settled_at,
                    max(attempts) OVER w AS attempts, min(started) OVER w AS started,
                    count(*) OVER w AS outcomes
             FROM taken
             WINDOW w AS (PARTITION BY batch_id, line)
             ORDER BY batch_id, line, status = 'failed',
                      CASE WHEN status = 'failed' THEN -attempts ELSE attempts END,
                      CASE WHEN status = 'failed' THEN -extract(epoch FROM settled_at)
                           ELSE extract(epoch FROM settled_at) END
         ), applied AS (
             UPDATE batch_rows r SET status = p.status,
                    attempts = greatest(was.attempts, p.attempts), error = p.error,
                    result = p.result, worker = p.worker, settled_at = p.settled_at
             FROM per_row p
             JOIN batch_rows was ON was.batch_id = p.batch_id AND was.line = p.line
             WHERE r.batch_id = p.batch_id AND r.line = p.line
               AND was.status IN ('pending', 'failed')
               AND (p.status <> 'failed' OR was.attempts <= p.attempts)
               -- Unless another writer changed the row since the statement began (only
               -- a process built before the log does, without the fold lock).
               AND r.status = was.status AND r.attempts = was.attempts
             RETURNING r.batch_id, r.line, was.status AS was, p.status, p.started
         ), relogged AS (
             -- A row another writer changed: its outcome is folded again, to the row as it is.
             INSERT INTO row_outcomes (batch_id, line, status, attempts, error, result, worker,
                                       started, settled_at)
             SELECT p.batch_id, p.line, p.status, p.attempts, p.error, p.result, p.worker,
                    p.started, p.settled_at
             FROM per_row p
             JOIN batch_rows was ON was.batch_id = p.batch_id AND was.line = p.line
             WHERE (SELECT count(*) FROM applied) < (SELECT count(*) FROM per_row)
               AND was.status IN ('pending', 'failed')
               AND (p.status <> 'failed' OR was.attempts <= p.attempts)
               AND NOT EXISTS (SELECT FROM applied a
                               WHERE a.batch_id = p.batch_id AND a.line = p.line)
         ), moved AS (
             SELECT batch_id,
                    sum((status = 'failed')::int - (was = 'failed')::int) AS failed,
                    sum((status = 'done')::int) AS done,
                    sum((status = 'dead')::int) AS dead,
                    sum((was = 'pending')::int) AS pending,
                    min(started) AS started
             FROM applied GROUP BY batch_id
         ), counted AS (
             UPDATE batches b SET pending = b.pending - m.pending, failed = b.failed + m.failed,
                    done = b.done + m.done, dead = b.dead + m.dead,
                    started_at = coalesce(b.started_at, to_timestamp(m.started))
             FROM moved m WHERE b.batch_id = m.batch_id
         )
         -- Rows of unknown batches are looked for only when some row did not change.
         SELECT (SELECT count(*) FROM taken),
                (SELECT count(*) FROM applied),
                CASE WHEN (SELECT count(*) FROM applied) < (SELECT count(*) FROM per_row)
                     THEN (SELECT coalesce(sum(p.outcomes), 0)::int8 FROM per_row p
                           WHERE NOT EXISTS (SELECT FROM batch_rows r
                                             WHERE r.batch_id = p.batch_id AND r.line = p.line))
                     ELSE 0 END",
    )
    .bind(FOLD_CHUNK as i64)
    .bind(began)
    .fetch_one(tx)
    .await?;
    let count = |n: i64| u64::try_from(n).unwrap_or(0);
    Ok(Folded {
        outcomes: count(outcomes),
        rows_changed: count(rows_changed),
        unknown: count(unknown),
    })
}

fn line_of(line: u64) -> i64 {
    i64::try_from(line).unwrap_or(i64::MAX)
}

/// Outcomes as one array per column of the log, for `unnest`: what [`Ledger::record`]
/// binds, and what a benchmark's bare statements bind to write the same columns.
pub struct OutcomeColumns<'o> {
    pub batch_ids: Vec<&'o str>,
    pub lines: Vec<i64>,
    pub statuses: Vec<&'static str>,
    pub attempts: Vec<i32>,
    pub errors: Vec<Option<&'o str>>,
    pub results: Vec<Option<&'o str>>,
    pub started: Vec<f64>,
}

impl<'o> OutcomeColumns<'o> {
    pub fn of(outcomes: &'o [Outcome]) -> Self {
        OutcomeColumns {
            batch_ids: outcomes.iter().map(|o| o.batch_id.as_str()).collect(),
            lines: outcomes.iter().map(|o| line_of(o.line)).collect(),
            statuses: outcomes.iter().map(|o| o.status.as_str()).collect(),
            attempts: outcomes
                .iter()
                .map(|o| i32::try_from(o.attempts).unwrap_or(i32::MAX))
                .collect(),
            errors: outcomes.iter().map(|o| o.error.as_deref()).collect(),
            results: outcomes.iter().map(|o| o.result.as_deref()).collect(),
            started: outcomes.iter().map(|o| o.started_unix).collect(),
        }
    }
}
