//! Cancelling a batch mid-run, end to end on the local launcher: rows in workers'
//! hands finish, the rest are acked without running, the queue empties, and the
//! ledger accounts for every row as done or cancelled.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use spillway_ledger::BatchState;
use spillway_testkit::{TestVhost, local_workers::WorkerReaper, wait_for};
use support::{
    RECORD_ROW, Scaler, ledger::ledger_of, local_jobs, numbered_csv, post_json, recorded_rows,
    start_producer, upload,
};

const ROWS: usize = 2_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_batch_runs_no_more_rows_and_its_queue_empties() {
    let vhost = TestVhost::new("cancel").await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let slow = format!("{RECORD_ROW}; sleep 0.05");
    std::fs::write(dir.join("jobs.toml"), local_jobs(&slow, 2, 5)).unwrap();
    let (producer, _stop_producer) = start_producer(&vhost, dir).await;
    let _scaler = Scaler::start_with(&vhost, dir, "scaler.log", &[("CONCURRENCY", "2")]);
    let _reaper = WorkerReaper(dir);

    let batch = upload(&producer, numbered_csv(ROWS)).await;
    wait_for("some rows to run", Duration::from_secs(60), || async {
        recorded_rows(dir).len() >= 20
    })
    .await;

    let cancel = format!("{producer}/batches/{batch}/cancel");
    let (status, body) = post_json(&cancel).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "cancelled", "{body}");
    let cancelled = body["cancelled"].as_u64().unwrap();
    let ran = body["ran"].as_u64().unwrap();
    assert!(cancelled > 0 && ran > 0, "cancelled mid-run: {body}");

    wait_for(
        "the cancelled rows to leave the queue",
        Duration::from_secs(60),
        || async { vhost.ready("tasks").await == Some(0) },
    )
    .await;
    let ledger = ledger_of(dir);
    let record = ledger.batch(&batch).await.unwrap().unwrap();
    assert_eq!(record.state, BatchState::Cancelled, "{record:?}");
    assert_eq!(
        record.done + record.dead + record.cancelled,
        ROWS as u64,
        "every row accounted for once: {record:?}"
    );
    assert_eq!((record.pending, record.failed), (0, 0), "{record:?}");
    // After the cancel only rows in workers' hands ran, and those a worker started
    // within a second of asking the ledger (it asks once a second per batch): far
    // fewer than the rows left.
    let ran_at_all = recorded_rows(dir).len() as u64;
    assert!(
        ran_at_all < ran + cancelled / 2,
        "{ran_at_all} rows ran, {ran} before the cancel: most of the {cancelled} left were skipped"
    );

    let (status, body) = post_json(&cancel).await;
    assert_eq!(status, StatusCode::CONFLICT, "cancelled already: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_batch_of_100_000_rows_gets_one_worker_not_a_burst_and_its_queue_empties() {
    const ROWS: usize = 100_000;
    let vhost = TestVhost::new("cancel-burst").await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    std::fs::write(dir.join("jobs.toml"), local_jobs(RECORD_ROW, 5, 5)).unwrap();
    let (producer, _stop_producer) = start_producer(&vhost, dir).await;
    // A worker holding many rows at once acks a cancelled batch's rows quickly.
    let scaler = Scaler::start_with(
        &vhost,
        dir,
        "scaler.log",
        &[("CONCURRENCY", "8"), ("PREFETCH", "500")],
    );
    let _reaper = WorkerReaper(dir);

    // Paused while the batch is uploaded and cancelled, so that no worker starts before.
    wait_for("the scaler to serve", Duration::from_secs(30), || async {
        reqwest::get(format!("{}/healthz", scaler.url))
            .await
            .is_ok()
    })
    .await;
    let (status, body) = post_json(&format!("{}/job-types/default/pause", scaler.url)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let batch = upload(&producer, numbered_csv(ROWS)).await;
    let (status, body) = post_json(&format!("{producer}/batches/{batch}/cancel")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["cancelled"], ROWS, "{body}");
    wait_for(
        "the scaler to hear of the cancelled rows",
        Duration::from_secs(30),
        || async {
            let stats: serde_json::Value = reqwest::get(format!("{}/api/stats", scaler.url))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            stats["job_types"][0]["cancelled_in_queue"] == ROWS
        },
    )
    .await;

    let (status, body) = post_json(&format!("{}/job-types/default/resume", scaler.url)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_for(
        "the cancelled rows to leave the queue",
        Duration::from_secs(180),
        || async { vhost.ready("tasks").await == Some(0) },
    )
    .await;
    let events: serde_json::Value = reqwest::get(format!("{}/api/events", scaler.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let spawned: usize = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "spawn")
        .map(|e| e["workers"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(spawned, 1, "one worker for the cancelled rows: {events}");
    assert!(recorded_rows(dir).is_empty(), "no cancelled row ran");
}
