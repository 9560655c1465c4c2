//! PostgreSQL stopped and started again mid-run: while it is down the workers keep
//! the rows they cannot record (unacked, so nothing is lost) and say why; once it is
//! back every row's outcome is recorded once: "N rows in, N outcomes, 0 lost, 0
//! counted twice".
//!
//! It stops the machine's PostgreSQL (`service postgresql stop`), every database of
//! every test, so it is a test binary of its own with one test: cargo runs test
//! binaries one after another, never beside each other.

mod support;

use std::{process::Command, time::Duration};

use spillway_testkit::{TestVhost, local_workers::WorkerReaper, wait_for};
use support::{
    Account, Hold, RECORD_ROW, Scaler, expected_rows, held_after,
    ledger::{LedgerAccount, ledger_of, wait_finished},
    local_jobs, numbered_csv, recorded_rows, start_producer, upload,
};

const ROWS: usize = 1_000;
/// Rows that flow before PostgreSQL stops (lines 2 to 101); the rest wait for the
/// hold's release, once it is down, so workers hold rows they cannot record.
const FREE_ROWS: usize = 100;

fn service(action: &str) {
    let status = Command::new("service")
        .args(["postgresql", action])
        .status()
        .expect("this test restarts the local PostgreSQL with `service postgresql`: run it where ./manage.sh test runs");
    assert!(status.success(), "service postgresql {action}: {status}");
}

/// Starts PostgreSQL again when dropped, whatever happened meanwhile.
struct PostgresBack;

impl Drop for PostgresBack {
    fn drop(&mut self) {
        let _ = Command::new("service")
            .args(["postgresql", "start"])
            .status();
    }
}

/// Whether any worker's log says it cannot record outcomes.
fn a_worker_waits_for_postgres(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir.join("workers"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.path().extension().is_some_and(|e| e == "log"))
        .any(|entry| {
            std::fs::read_to_string(entry.path())
                .unwrap_or_default()
                .contains("PostgreSQL is unreachable")
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_mid_run_loses_no_outcome_and_counts_none_twice() {
    let vhost = TestVhost::new("fault-postgres").await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let row = held_after(FREE_ROWS + 1, RECORD_ROW);
    std::fs::write(dir.join("jobs.toml"), local_jobs(&row, 4, 5)).unwrap();
    let hold = Hold::new(dir);
    let (producer, stop_producer) = start_producer(&vhost, dir).await;
    let scaler = Scaler::start_with(&vhost, dir, "scaler.log", &[hold.env()]);
    let _reaper = WorkerReaper(dir);
    let ledger = ledger_of(dir);

    let batch = upload(&producer, numbered_csv(ROWS)).await;
    wait_for(
        "the free rows to be done in the ledger",
        Duration::from_secs(60),
        || async {
            ledger
                .batch(&batch)
                .await
                .ok()
                .flatten()
                .is_some_and(|b| b.done == FREE_ROWS as u64)
        },
    )
    .await;

    let back = PostgresBack;
    service("stop");
    println!("stopped PostgreSQL with {FREE_ROWS} of {ROWS} outcomes recorded");
    hold.release();
    wait_for(
        "a worker to say it cannot record outcomes",
        Duration::from_secs(60),
        || std::future::ready(a_worker_waits_for_postgres(dir)),
    )
    .await;
    service("start");
    drop(back);
    println!("started PostgreSQL again");

    wait_finished(&ledger, &batch, Duration::from_secs(180)).await;
    let ledger_account = LedgerAccount::of(&ledger, &batch).await;
    println!("{ledger_account} (PostgreSQL stopped and started mid-run)");
    ledger_account.assert_whole();
    let account = Account::of(
        &expected_rows(&batch, ROWS),
        &recorded_rows(dir),
        &Default::default(),
    );
    println!("{account} (PostgreSQL stopped and started mid-run)");
    assert!(
        account.lost.is_empty(),
        "{account}: lost {:?}",
        account.lost
    );
    drop(scaler);
    stop_producer.cancel();
}
