//! What the ledger says of a run: every row's outcome counted, for the fault tests'
//! line "N rows in, N outcomes, 0 lost, 0 counted twice".

use std::{fmt, path::Path, time::Duration};

use spillway_ledger::{BatchRecord, Ledger};
use spillway_testkit::wait_for;

use super::DATABASE_URL_FILE;

/// The ledger the producer started in `dir` records into (see `start_producer`).
pub fn ledger_of(dir: &Path) -> Ledger {
    let url = std::fs::read_to_string(dir.join(DATABASE_URL_FILE))
        .expect("a producer started in this directory first");
    Ledger::open(&url, 2).expect("a valid DATABASE_URL")
}

/// Waits until `batch` is finished in the ledger, and returns it.
pub async fn wait_finished(ledger: &Ledger, batch: &str, patience: Duration) -> BatchRecord {
    wait_for(
        &format!("batch {batch} to be finished in the ledger"),
        patience,
        || async {
            ledger
                .batch(batch)
                .await
                .ok()
                .flatten()
                .is_some_and(|b| b.state.is_finished())
        },
    )
    .await;
    ledger.batch(batch).await.unwrap().unwrap()
}

/// A batch's rows as the ledger accounts for them: its counters against its rows.
#[derive(Debug, PartialEq, Eq)]
pub struct LedgerAccount {
    pub rows_in: u64,
    /// Rows with a final outcome (done or dead), counted row by row.
    pub outcomes: u64,
    /// Rows without one.
    pub lost: u64,
    /// What the batch's counters say beyond the rows' own outcomes: a row counted twice.
    pub counted_twice: i64,
}

impl LedgerAccount {
    pub async fn of(ledger: &Ledger, batch: &str) -> Self {
        let record = ledger.batch(batch).await.unwrap().expect("the batch");
        let (finals, unsettled): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status IN ('done', 'dead')),
                    count(*) FILTER (WHERE status NOT IN ('done', 'dead'))
             FROM batch_rows WHERE batch_id = $1",
        )
        .bind(batch)
        .fetch_one(ledger.pool())
        .await
        .unwrap();
        LedgerAccount {
            rows_in: record.rows,
            outcomes: finals as u64,
            lost: unsettled as u64,
            counted_twice: (record.done + record.dead) as i64 - finals,
        }
    }

    /// Panics unless every row has one outcome, counted once.
    pub fn assert_whole(&self) {
        assert!(
            self.outcomes == self.rows_in && self.lost == 0 && self.counted_twice == 0,
            "{self}"
        );
    }
}

impl fmt::Display for LedgerAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ledger: {} rows in, {} outcomes, {} lost, {} counted twice",
            self.rows_in, self.outcomes, self.lost, self.counted_twice
        )
    }
}
