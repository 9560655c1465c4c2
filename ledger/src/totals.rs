//! Rows by status across every batch the ledger holds, per job type: what `/metrics`
//! shows, read from the batches' counters (a handful of rows, not every row).

use crate::{Ledger, Result, RowStatus};

/// Rows of one job type with one status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowTotal {
    pub job_type: String,
    pub status: RowStatus,
    pub rows: u64,
}

impl Ledger {
    /// Rows by job type and status, over every batch in the ledger.
    pub async fn row_totals(&self) -> Result<Vec<RowTotal>> {
        self.caught_up().await?;
        let sums: Vec<(String, i64, i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT job_type, sum(pending)::int8, sum(done)::int8, sum(failed)::int8,
                    sum(dead)::int8, sum(cancelled)::int8
             FROM batches GROUP BY job_type ORDER BY job_type",
        )
        .fetch_all(self.pool())
        .await?;
        let mut totals = Vec::with_capacity(sums.len() * RowStatus::ALL.len());
        for (job_type, pending, done, failed, dead, cancelled) in sums {
            for (status, rows) in [
                (RowStatus::Pending, pending),
                (RowStatus::Done, done),
                (RowStatus::Failed, failed),
                (RowStatus::Dead, dead),
                (RowStatus::Cancelled, cancelled),
            ] {
                totals.push(RowTotal {
                    job_type: job_type.clone(),
                    status,
                    rows: u64::try_from(rows).unwrap_or(0),
                });
            }
        }
        Ok(totals)
    }
}
