//! Rows' outcomes, recorded by workers before they ack the rows.
//!
//! A worker gathers the outcomes of many rows and records them in one transaction
//! ([`Ledger::record`]), a handful of statements whatever their number, so the ledger
//! is not a round trip per row. Recording is idempotent: a row whose status is final
//! (`done`, `dead`, `cancelled`) keeps it, so a redelivered row never counts twice in
//! any figure; the batch's counters move by the transitions actually made. The rows
//! are locked in key order, then their batches, so two workers recording at once wait
//! for each other instead of deadlocking.

use std::collections::{BTreeMap, HashMap};

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

/// How a batch's counters move.
#[derive(Debug, Default)]
struct Deltas {
    counts: HashMap<RowStatus, i64>,
    started_unix: f64,
}

impl Deltas {
    fn moved(&mut self, from: RowStatus, to: RowStatus, started_unix: f64) {
        *self.counts.entry(from).or_default() -= 1;
        *self.counts.entry(to).or_default() += 1;
        if self.started_unix == 0.0 || started_unix < self.started_unix {
            self.started_unix = started_unix;
        }
    }

    fn of(&self, status: RowStatus) -> i64 {
        self.counts.get(&status).copied().unwrap_or(0)
    }
}

impl Ledger {
    /// Records `outcomes` as settled by `worker`. Outcomes of one row are applied in
    /// the order given.
    pub async fn record(&self, worker: &str, outcomes: &[Outcome]) -> Result<Recorded> {
        self.schema().await?;
        let mut recorded = Recorded::default();
        if outcomes.is_empty() {
            return Ok(recorded);
        }
        let mut keys: Vec<(&str, i64)> = outcomes
            .iter()
            .map(|o| (o.batch_id.as_str(), line_of(o.line)))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let (batch_ids, lines): (Vec<&str>, Vec<i64>) = keys.into_iter().unzip();

        let mut tx = self.pool().begin().await?;
        let current: Vec<(String, i64, String)> = sqlx::query_as(
            "SELECT r.batch_id, r.line, r.status FROM batch_rows r
             JOIN unnest($1::text[], $2::int8[]) AS k(batch_id, line)
               ON r.batch_id = k.batch_id AND r.line = k.line
             ORDER BY r.batch_id, r.line
             FOR UPDATE OF r",
        )
        .bind(&batch_ids)
        .bind(&lines)
        .fetch_all(&mut *tx)
        .await?;
        let mut status: HashMap<(String, i64), RowStatus> = current
            .into_iter()
            .filter_map(|(batch, line, s)| Some(((batch, line), s.parse().ok()?)))
            .collect();

        // The last outcome applied to each row is what it is updated to.
        let mut updates: BTreeMap<(String, i64), &Outcome> = BTreeMap::new();
        let mut deltas: BTreeMap<&str, Deltas> = BTreeMap::new();
        for outcome in outcomes {
            let key = (outcome.batch_id.clone(), line_of(outcome.line));
            let Some(now) = status.get_mut(&key) else {
                recorded.unknown += 1;
                continue;
            };
            if now.is_final() {
                recorded.already_final += 1;
                continue;
            }
            deltas.entry(&outcome.batch_id).or_default().moved(
                *now,
                outcome.status,
                outcome.started_unix,
            );
            *now = outcome.status;
            updates.insert(key, outcome);
            recorded.applied += 1;
        }

        if !updates.is_empty() {
            let mut columns = RowColumns::default();
            for ((batch_id, line), outcome) in &updates {
                columns.push(batch_id, *line, outcome);
            }
            sqlx::query(
                "UPDATE batch_rows r SET status = u.status, attempts = greatest(r.attempts, u.attempts),
                        error = u.error, result = u.result, worker = $7, settled_at = now()
                 FROM unnest($1::text[], $2::int8[], $3::text[], $4::int4[], $5::text[], $6::text[])
                      AS u(batch_id, line, status, attempts, error, result)
                 WHERE r.batch_id = u.batch_id AND r.line = u.line",
            )
            .bind(&columns.batch_ids)
            .bind(&columns.lines)
            .bind(&columns.statuses)
            .bind(&columns.attempts)
            .bind(&columns.errors)
            .bind(&columns.results)
            .bind(worker)
            .execute(&mut *tx)
            .await?;

            let mut batches = BatchColumns::default();
            for (batch_id, delta) in &deltas {
                batches.push(batch_id, delta);
            }
            sqlx::query(
                "UPDATE batches b SET pending = b.pending + d.pending, failed = b.failed + d.failed,
                        done = b.done + d.done, dead = b.dead + d.dead,
                        started_at = coalesce(b.started_at, to_timestamp(d.started))
                 FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], $6::float8[])
                      AS d(batch_id, pending, failed, done, dead, started)
                 WHERE b.batch_id = d.batch_id",
            )
            .bind(&batches.batch_ids)
            .bind(&batches.pending)
            .bind(&batches.failed)
            .bind(&batches.done)
            .bind(&batches.dead)
            .bind(&batches.started)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(recorded)
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

/// Row updates as one array per column, for `unnest`.
#[derive(Default)]
struct RowColumns<'a> {
    batch_ids: Vec<&'a str>,
    lines: Vec<i64>,
    statuses: Vec<&'static str>,
    attempts: Vec<i32>,
    errors: Vec<Option<&'a str>>,
    results: Vec<Option<&'a str>>,
}

impl<'a> RowColumns<'a> {
    fn push(&mut self, batch_id: &'a str, line: i64, outcome: &'a Outcome) {
        self.batch_ids.push(batch_id);
        self.lines.push(line);
        self.statuses.push(outcome.status.as_str());
        self.attempts
            .push(i32::try_from(outcome.attempts).unwrap_or(i32::MAX));
        self.errors.push(outcome.error.as_deref());
        self.results.push(outcome.result.as_deref());
    }
}

/// Counter movements as one array per column, for `unnest`.
#[derive(Default)]
struct BatchColumns<'a> {
    batch_ids: Vec<&'a str>,
    pending: Vec<i64>,
    failed: Vec<i64>,
    done: Vec<i64>,
    dead: Vec<i64>,
    started: Vec<f64>,
}

impl<'a> BatchColumns<'a> {
    fn push(&mut self, batch_id: &'a str, delta: &Deltas) {
        self.batch_ids.push(batch_id);
        self.pending.push(delta.of(RowStatus::Pending));
        self.failed.push(delta.of(RowStatus::Failed));
        self.done.push(delta.of(RowStatus::Done));
        self.dead.push(delta.of(RowStatus::Dead));
        self.started.push(delta.started_unix);
    }
}
