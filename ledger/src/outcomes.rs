//! Rows' outcomes, recorded by workers before they ack the rows.
//!
//! A worker gathers the outcomes of many rows and records them with one call
//! ([`Ledger::record`]): one statement whatever their number, so the ledger is not a
//! round trip per row. Recording is idempotent: a row whose status is final (`done`,
//! `dead`, `cancelled`) keeps it, so a redelivered row never counts twice in any figure.
//!
//! One statement updates each row only if its status is the one expected, and moves
//! its batch's counters by the transitions it actually made (the rows it updated, as
//! it returns them). A row's status is expected from its delivery count (a first
//! delivery finds its row pending); the few rows where that is wrong, or that another
//! worker settled meanwhile, are read and tried again. Rows are updated in
//! key order, then their batches, so two workers recording at once wait for each other
//! instead of deadlocking.

use std::collections::{BTreeMap, HashMap, HashSet};

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

/// What recording a set of outcomes changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Outcomes that changed a row.
    pub applied: usize,
    /// Outcomes of rows already final: nothing changed.
    pub already_final: usize,
    /// Outcomes of rows the ledger does not hold (a deleted batch).
    pub unknown: usize,
}

/// What the outcomes of one row, applied in order, come to.
struct Settlement<'a> {
    /// The outcome the row ends with: the first final one, or else the last.
    last: &'a Outcome,
    /// The outcomes applied, up to and including `last`.
    outcomes: usize,
    /// The delivery count of the first outcome.
    first_attempts: u32,
    attempts: u32,
    started_unix: f64,
}

impl<'a> Settlement<'a> {
    fn new(outcome: &'a Outcome) -> Self {
        Settlement {
            last: outcome,
            outcomes: 1,
            first_attempts: outcome.attempts,
            attempts: outcome.attempts,
            started_unix: outcome.started_unix,
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

    /// Applies `outcome` after the others, unless the row is already final.
    fn then(&mut self, outcome: &'a Outcome) -> bool {
        if self.last.status.is_final() {
            return false;
        }
        self.last = outcome;
        self.outcomes += 1;
        self.attempts = self.attempts.max(outcome.attempts);
        self.started_unix = self.started_unix.min(outcome.started_unix);
        true
    }
}

/// How many times a row settled by another worker between the read and the update is
/// read and tried again before recording gives up on it for this call.
const RACES: usize = 8;

impl Ledger {
    /// Records `outcomes` as settled by `worker`. Outcomes of one row are applied in
    /// the order given.
    pub async fn record(&self, worker: &str, outcomes: &[Outcome]) -> Result<Recorded> {
        self.schema().await?;
        let mut recorded = Recorded::default();
        let mut rows: BTreeMap<(&str, i64), Settlement> = BTreeMap::new();
        for outcome in outcomes {
            let key = (outcome.batch_id.as_str(), line_of(outcome.line));
            match rows.get_mut(&key) {
                None => {
                    rows.insert(key, Settlement::new(outcome));
                }
                Some(row) => {
                    if !row.then(outcome) {
                        recorded.already_final += 1;
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
            let mut changes = Changes::default();
            for (key, row) in &rows {
                changes.push(*key, was[key], row);
            }
            let settled = self.settle(worker, &changes).await?;
            rows.retain(|key, row| {
                let done = settled.contains(key);
                if done {
                    recorded.applied += row.outcomes;
                }
                !done
            });
            if rows.is_empty() {
                return Ok(recorded);
            }
            let statuses = self.statuses(rows.keys()).await?;
            rows.retain(|key, row| {
                match statuses.get(&(key.0.to_string(), key.1)) {
                    None => recorded.unknown += row.outcomes,
                    Some(status) if status.is_final() => recorded.already_final += row.outcomes,
                    Some(status) => {
                        was.insert(*key, *status);
                        return true;
                    }
                }
                false
            });
            if rows.is_empty() {
                return Ok(recorded);
            }
        }
        Err(crate::LedgerError::Input(std::io::Error::other(format!(
            "{} rows changed under every one of {RACES} attempts to record them",
            rows.len()
        ))))
    }

    /// The statuses of the rows of `keys` the ledger holds.
    async fn statuses<'k>(
        &self,
        keys: impl Iterator<Item = &'k (&'k str, i64)>,
    ) -> Result<HashMap<(String, i64), RowStatus>> {
        let (batch_ids, lines): (Vec<&str>, Vec<i64>) = keys.copied().unzip();
        let found: Vec<(String, i64, String)> = sqlx::query_as(
            "SELECT r.batch_id, r.line, r.status FROM batch_rows r
             JOIN unnest($1::text[], $2::int8[]) AS k(batch_id, line)
               ON r.batch_id = k.batch_id AND r.line = k.line",
        )
        .bind(&batch_ids)
        .bind(&lines)
        .fetch_all(self.pool())
        .await?;
        Ok(found
            .into_iter()
            .filter_map(|(batch_id, line, status)| Some(((batch_id, line), status.parse().ok()?)))
            .collect())
    }

    /// Applies `changes` to rows whose status is still the one read, and moves their
    /// batches' counters: one statement, one transaction. Returns the rows it updated.
    async fn settle<'k>(
        &self,
        worker: &str,
        changes: &Changes<'k, '_>,
    ) -> Result<HashSet<(&'k str, i64)>> {
        if changes.batch_ids.is_empty() {
            return Ok(HashSet::new());
        }
        let updated: Vec<i64> = sqlx::query_scalar(
            "WITH u AS (
                 SELECT * FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[], $5::int4[],
                                      $6::text[], $7::text[], $8::float8[]) WITH ORDINALITY
                     AS u(batch_id, line, was, status, attempts, error, result, started, i)
             ), settled AS (
                 UPDATE batch_rows r SET status = u.status,
                        attempts = greatest(r.attempts, u.attempts), error = u.error,
                        result = u.result, worker = $9, settled_at = now()
                 FROM u
                 WHERE r.batch_id = u.batch_id AND r.line = u.line AND r.status = u.was
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
        .bind(worker)
        .fetch_all(self.pool())
        .await?;
        Ok(updated
            .into_iter()
            .filter_map(|i| {
                let i = usize::try_from(i - 1).ok()?;
                Some((*changes.batch_ids.get(i)?, *changes.lines.get(i)?))
            })
            .collect())
    }

    /// The status of one row, or `None` if the ledger does not hold it. A worker asks
    /// this of a redelivered row only, to ack a row already done without running it.
    pub async fn row_status(&self, batch_id: &str, line: u64) -> Result<Option<RowStatus>> {
        self.schema().await?;
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM batch_rows WHERE batch_id = $1 AND line = $2")
                .bind(batch_id)
                .bind(line_of(line))
                .fetch_optional(self.pool())
                .await?;
        Ok(status.and_then(|s| s.parse().ok()))
    }
}

fn line_of(line: u64) -> i64 {
    i64::try_from(line).unwrap_or(i64::MAX)
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
}

impl<'k, 'o> Changes<'k, 'o> {
    fn push(&mut self, (batch_id, line): (&'k str, i64), was: RowStatus, row: &Settlement<'o>) {
        self.batch_ids.push(batch_id);
        self.lines.push(line);
        self.was.push(was.as_str());
        self.statuses.push(row.last.status.as_str());
        self.attempts
            .push(i32::try_from(row.attempts).unwrap_or(i32::MAX));
        self.errors.push(row.last.error.as_deref());
        self.results.push(row.last.result.as_deref());
        self.started.push(row.started_unix);
    }
}
