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
//! a chunk at a time, each chunk in one transaction that deletes it from the log: so
//! each logged outcome is folded exactly once. One fold runs at a time (an advisory
//! lock). The producer folds continually; every reader of a row's status or a batch's
//! counts folds first ([`Ledger::caught_up`]), and so does every operation that changes
//! rows (cancel, retry, delete), under the same lock, so none of them sees a row
//! without the outcomes already recorded for it.
//!
//! Folding is idempotent: a row whose status is final (`done`, `dead`, `cancelled`)
//! keeps it, so a redelivered row never counts twice in any figure; and a `failed`
//! outcome older (fewer attempts) than the row's is passed over, so the order in which
//! outcomes are folded does not matter. One statement updates each row only if its
//! status is the one expected, and moves its batch's counters by the transitions it
//! actually made (the rows it updated, as it returns them). A row's status is expected
//! from its delivery count (a first delivery finds its row pending); the few rows where
//! that is wrong are read and tried again. Rows are updated in key order, then their
//! batches, the order every other writer of rows keeps.

use std::collections::{BTreeMap, HashMap, HashSet};

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
    /// Outcomes that changed a row.
    pub applied: usize,
    /// Outcomes of rows already final: nothing changed.
    pub already_final: usize,
    /// `failed` outcomes of an earlier delivery than the one the row has: nothing
    /// changed.
    pub superseded: usize,
    /// Outcomes of rows the ledger does not hold (a deleted batch).
    pub unknown: usize,
}

impl Folded {
    /// Outcomes folded, whatever they changed.
    pub fn outcomes(&self) -> usize {
        self.applied + self.already_final + self.superseded + self.unknown
    }

    fn add(&mut self, other: Folded) {
        self.applied += other.applied;
        self.already_final += other.already_final;
        self.superseded += other.superseded;
        self.unknown += other.unknown;
    }
}

/// An outcome as the log holds it: who settled the row, and when.
struct Logged {
    outcome: Outcome,
    worker: String,
    /// When it was recorded, in seconds since the Unix epoch.
    settled_unix: f64,
}

/// A logged outcome as selected.
type LoggedColumns = (
    String,
    i64,
    String,
    i32,
    Option<String>,
    Option<String>,
    String,
    f64,
    f64,
);

impl TryFrom<LoggedColumns> for Logged {
    type Error = crate::LedgerError;

    fn try_from(
        (batch_id, line, status, attempts, error, result, worker, started, settled): LoggedColumns,
    ) -> Result<Self> {
        let status = status
            .parse()
            .map_err(|e: String| crate::LedgerError::Input(std::io::Error::other(e)))?;
        Ok(Logged {
            outcome: Outcome {
                batch_id,
                line: u64::try_from(line).unwrap_or(0),
                status,
                attempts: u32::try_from(attempts).unwrap_or(0),
                error,
                result,
                started_unix: started,
            },
            worker,
            settled_unix: settled,
        })
    }
}

/// What the outcomes of one row, applied in order, come to.
struct Settlement<'a> {
    /// The outcome the row ends with: the first final one, or else the last.
    last: &'a Logged,
    /// The outcomes applied, up to and including `last`.
    outcomes: usize,
    /// The delivery count of the first outcome.
    first_attempts: u32,
    attempts: u32,
    started_unix: f64,
}

impl<'a> Settlement<'a> {
    fn new(logged: &'a Logged) -> Self {
        Settlement {
            last: logged,
            outcomes: 1,
            first_attempts: logged.outcome.attempts,
            attempts: logged.outcome.attempts,
            started_unix: logged.outcome.started_unix,
        }
    }

    /// The status the row most likely has in the ledger before this: pending before its
    /// first delivery is settled, failed (with attempts left) after.
    fn likely_status(&self) -> RowStatus {
        if self.first_attempts <= 1 {
            RowStatus::Pending
        } else {
            RowStatus::Failed
        }
    }

    /// Applies `logged` after the others, unless the row is already final.
    fn then(&mut self, logged: &'a Logged) -> bool {
        if self.last.outcome.status.is_final() {
            return false;
        }
        self.last = logged;
        self.outcomes += 1;
        self.attempts = self.attempts.max(logged.outcome.attempts);
        self.started_unix = self.started_unix.min(logged.outcome.started_unix);
        true
    }
}

/// Most logged outcomes folded in one transaction.
pub const FOLD_CHUNK: usize = 8192;

/// The advisory lock a fold holds: one fold at a time, and no cancel, retry or delete
/// in the middle of one.
const FOLD_LOCK: i64 = 0x5350_494c_4c46_4f4c; // "SPILLFOL"

/// How many times a row found with another status than expected is read and tried
/// again before folding gives up on it for this call.
const RACES: usize = 8;

impl Ledger {
    /// Records `outcomes` as settled by `worker`: one `INSERT` into the outcome log,
    /// committed when this returns. They count once folded ([`Ledger::fold`]), which
    /// every reader of the ledger does first.
    pub async fn record(&self, worker: &str, outcomes: &[Outcome]) -> Result<()> {
        self.schema().await?;
        if outcomes.is_empty() {
            return Ok(());
        }
        let mut columns = LogColumns::default();
        for outcome in outcomes {
            columns.push(outcome);
        }
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

    /// Folds every outcome logged so far into its row and its batch's counts, a chunk
    /// per transaction, and says what that changed.
    pub async fn fold(&self) -> Result<Folded> {
        self.schema().await?;
        let mut folded = Folded::default();
        loop {
            let mut tx = self.pool().begin().await?;
            lock_folds(&mut tx).await?;
            let (taken, chunk) = fold_chunk(&mut tx).await?;
            tx.commit().await?;
            folded.add(chunk);
            if taken < FOLD_CHUNK {
                return Ok(folded);
            }
        }
    }

    /// Applies the schema, and folds the outcomes logged so far if there are any: what
    /// every reader of rows' statuses or batches' counts does first.
    pub(crate) async fn caught_up(&self) -> Result<()> {
        self.schema().await?;
        // Outcomes being folded are still visible here until their fold commits, so
        // an empty log means nothing is left to fold, nor being folded.
        let logged: bool = sqlx::query_scalar("SELECT EXISTS (SELECT FROM row_outcomes)")
            .fetch_one(self.pool())
            .await?;
        if logged {
            self.fold().await?;
        }
        Ok(())
    }

    /// The status of one row, or `None` if the ledger does not hold it. A worker asks
    /// this of a redelivered row only, to ack a row already done without running it.
    pub async fn row_status(&self, batch_id: &str, line: u64) -> Result<Option<RowStatus>> {
        self.caught_up().await?;
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM batch_rows WHERE batch_id = $1 AND line = $2")
                .bind(batch_id)
                .bind(line_of(line))
                .fetch_optional(self.pool())
                .await?;
        Ok(status.and_then(|s| s.parse().ok()))
    }
}

/// Takes the fold lock for the rest of `tx`, and folds every outcome logged so far in
/// it: what an operation that changes rows does before it reads them.
pub(crate) async fn fold_within(tx: &mut PgConnection) -> Result<()> {
    lock_folds(tx).await?;
    while fold_chunk(tx).await?.0 == FOLD_CHUNK {}
    Ok(())
}

async fn lock_folds(tx: &mut PgConnection) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(FOLD_LOCK)
        .execute(tx)
        .await?;
    Ok(())
}

/// Takes up to a chunk of logged outcomes out of the log and applies them, in `tx`,
/// which holds the fold lock. Returns how many it took and what they changed.
async fn fold_chunk(tx: &mut PgConnection) -> Result<(usize, Folded)> {
    let taken: Vec<LoggedColumns> = sqlx::query_as(
        "DELETE FROM row_outcomes
         WHERE ctid = ANY (ARRAY (SELECT ctid FROM row_outcomes LIMIT $1))
         RETURNING batch_id, line, status, attempts, error, result, worker, started,
                   extract(epoch FROM settled_at)::float8",
    )
    .bind(FOLD_CHUNK as i64)
    .fetch_all(&mut *tx)
    .await?;
    let count = taken.len();
    let mut logged = taken
        .into_iter()
        .map(Logged::try_from)
        .collect::<Result<Vec<_>>>()?;
    // The log keeps no order: a row's outcomes are applied by delivery, then by when
    // they were recorded.
    logged.sort_by(|a, b| {
        (a.outcome.attempts, a.settled_unix)
            .partial_cmp(&(b.outcome.attempts, b.settled_unix))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    Ok((count, apply(tx, &logged).await?))
}

/// Applies `logged` (one row's outcomes in the order they are to apply) to the rows
/// and their batches' counters.
async fn apply(tx: &mut PgConnection, logged: &[Logged]) -> Result<Folded> {
    let mut folded = Folded::default();
    let mut rows: BTreeMap<(&str, i64), Settlement> = BTreeMap::new();
    for entry in logged {
        let key = (entry.outcome.batch_id.as_str(), line_of(entry.outcome.line));
        match rows.get_mut(&key) {
            None => {
                rows.insert(key, Settlement::new(entry));
            }
            Some(row) => {
                if !row.then(entry) {
                    folded.already_final += 1;
                }
            }
        }
    }
    // Each row's status as last known: first as its delivery count says it most
    // likely is (a first delivery finds its row pending, a later one finds it
    // failed), then, for the rows where that was wrong, as read.
    let mut was: BTreeMap<(&str, i64), RowStatus> = rows
        .iter()
        .map(|(key, row)| (*key, row.likely_status()))
        .collect();
    for _ in 0..RACES {
        if rows.is_empty() {
            return Ok(folded);
        }
        let mut changes = Changes::default();
        for (key, row) in &rows {
            changes.push(*key, was[key], row);
        }
        let settled = settle(tx, &changes).await?;
        rows.retain(|key, row| {
            let done = settled.contains(key);
            if done {
                folded.applied += row.outcomes;
            }
            !done
        });
        if rows.is_empty() {
            return Ok(folded);
        }
        let found = statuses(tx, rows.keys()).await?;
        rows.retain(|key, row| {
            match found.get(&(key.0.to_string(), key.1)) {
                None => folded.unknown += row.outcomes,
                Some((status, _)) if status.is_final() => folded.already_final += row.outcomes,
                Some((status, attempts))
                    if *status == was[key]
                        && row.last.outcome.status == RowStatus::Failed
                        && *attempts > row.attempts =>
                {
                    folded.superseded += row.outcomes
                }
                Some((status, _)) => {
                    was.insert(*key, *status);
                    return true;
                }
            }
            false
        });
    }
    if rows.is_empty() {
        return Ok(folded);
    }
    Err(crate::LedgerError::Input(std::io::Error::other(format!(
        "{} rows changed under every one of {RACES} attempts to fold their outcomes",
        rows.len()
    ))))
}

/// The statuses and attempts of the rows of `keys` the ledger holds.
async fn statuses<'k>(
    tx: &mut PgConnection,
    keys: impl Iterator<Item = &'k (&'k str, i64)>,
) -> Result<HashMap<(String, i64), (RowStatus, u32)>> {
    let (batch_ids, lines): (Vec<&str>, Vec<i64>) = keys.copied().unzip();
    let found: Vec<(String, i64, String, i32)> = sqlx::query_as(
        "SELECT r.batch_id, r.line, r.status, r.attempts FROM batch_rows r
         JOIN unnest($1::text[], $2::int8[]) AS k(batch_id, line)
           ON r.batch_id = k.batch_id AND r.line = k.line",
    )
    .bind(&batch_ids)
    .bind(&lines)
    .fetch_all(tx)
    .await?;
    Ok(found
        .into_iter()
        .filter_map(|(batch_id, line, status, attempts)| {
            let attempts = u32::try_from(attempts).unwrap_or(0);
            Some(((batch_id, line), (status.parse().ok()?, attempts)))
        })
        .collect())
}

/// Applies `changes` to rows whose status is still the one read, and moves their
/// batches' counters: one statement. Returns the rows it updated.
async fn settle<'k>(
    tx: &mut PgConnection,
    changes: &Changes<'k, '_>,
) -> Result<HashSet<(&'k str, i64)>> {
    let updated: Vec<i64> = sqlx::query_scalar(
        "WITH u AS (
             SELECT * FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[], $5::int4[],
                                  $6::text[], $7::text[], $8::float8[], $9::text[],
                                  $10::float8[]) WITH ORDINALITY
                 AS u(batch_id, line, was, status, attempts, error, result, started, worker,
                      settled, i)
         ), settled AS (
             UPDATE batch_rows r SET status = u.status,
                    attempts = greatest(r.attempts, u.attempts), error = u.error,
                    result = u.result, worker = u.worker, settled_at = to_timestamp(u.settled)
             FROM u
             WHERE r.batch_id = u.batch_id AND r.line = u.line AND r.status = u.was
               AND (u.status <> 'failed' OR r.attempts <= u.attempts)
             RETURNING r.batch_id, u.i, u.was, u.status, u.started
         ), moved AS (
             SELECT batch_id,
                    sum((status = 'pending')::int - (was = 'pending')::int) AS pending,
                    sum((status = 'failed')::int - (was = 'failed')::int) AS failed,
                    sum((status = 'done')::int - (was = 'done')::int) AS done,
                    sum((status = 'dead')::int - (was = 'dead')::int) AS dead,
                    min(started) AS started
             FROM settled GROUP BY batch_id ORDER BY batch_id
         ), counted AS (
             UPDATE batches b SET pending = b.pending + m.pending, failed = b.failed + m.failed,
                    done = b.done + m.done, dead = b.dead + m.dead,
                    started_at = coalesce(b.started_at, to_timestamp(m.started))
             FROM moved m WHERE b.batch_id = m.batch_id
         )
         SELECT i FROM settled",
    )
    .bind(&changes.batch_ids)
    .bind(&changes.lines)
    .bind(&changes.was)
    .bind(&changes.statuses)
    .bind(&changes.attempts)
    .bind(&changes.errors)
    .bind(&changes.results)
    .bind(&changes.started)
    .bind(&changes.workers)
    .bind(&changes.settled)
    .fetch_all(tx)
    .await?;
    Ok(updated
        .into_iter()
        .filter_map(|i| {
            let i = usize::try_from(i - 1).ok()?;
            Some((*changes.batch_ids.get(i)?, *changes.lines.get(i)?))
        })
        .collect())
}

fn line_of(line: u64) -> i64 {
    i64::try_from(line).unwrap_or(i64::MAX)
}

/// Outcomes as one array per column of the log, for `unnest`.
#[derive(Default)]
struct LogColumns<'o> {
    batch_ids: Vec<&'o str>,
    lines: Vec<i64>,
    statuses: Vec<&'static str>,
    attempts: Vec<i32>,
    errors: Vec<Option<&'o str>>,
    results: Vec<Option<&'o str>>,
    started: Vec<f64>,
}

impl<'o> LogColumns<'o> {
    fn push(&mut self, outcome: &'o Outcome) {
        self.batch_ids.push(&outcome.batch_id);
        self.lines.push(line_of(outcome.line));
        self.statuses.push(outcome.status.as_str());
        self.attempts
            .push(i32::try_from(outcome.attempts).unwrap_or(i32::MAX));
        self.errors.push(outcome.error.as_deref());
        self.results.push(outcome.result.as_deref());
        self.started.push(outcome.started_unix);
    }
}

/// Row changes as one array per column, for `unnest`, in key order.
#[derive(Default)]
struct Changes<'k, 'o> {
    batch_ids: Vec<&'k str>,
    lines: Vec<i64>,
    was: Vec<&'static str>,
    statuses: Vec<&'static str>,
    attempts: Vec<i32>,
    errors: Vec<Option<&'o str>>,
    results: Vec<Option<&'o str>>,
    started: Vec<f64>,
    workers: Vec<&'o str>,
    settled: Vec<f64>,
}

impl<'k, 'o> Changes<'k, 'o> {
    fn push(&mut self, (batch_id, line): (&'k str, i64), was: RowStatus, row: &Settlement<'o>) {
        let last = row.last;
        self.batch_ids.push(batch_id);
        self.lines.push(line);
        self.was.push(was.as_str());
        self.statuses.push(last.outcome.status.as_str());
        self.attempts
            .push(i32::try_from(row.attempts).unwrap_or(i32::MAX));
        self.errors.push(last.outcome.error.as_deref());
        self.results.push(last.outcome.result.as_deref());
        self.started.push(row.started_unix);
        self.workers.push(&last.worker);
        self.settled.push(last.settled_unix);
    }
}
