//! Pausing a job type, end to end on the local launcher: during a run, every worker
//! drains with no row lost and the rest wait in the queue; the pause outlives a scaler
//! restart; resume starts workers again and every row is done once.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use spillway_ledger::BatchState;
use spillway_testkit::{
    TestVhost,
    local_workers::{WorkerReaper, registry},
    wait_for,
};
use support::{
    RECORD_ROW, Scaler, expected_rows,
    ledger::{ledger_of, wait_finished},
    local_jobs, numbered_csv, post_json, recorded_rows, start_producer, upload,
};

const ROWS: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_drains_every_worker_outlives_a_restart_and_resume_finishes_the_rows() {
    let vhost = TestVhost::new("pause").await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    // Slow rows, one at a time per worker: the pause lands mid-run.
    let slow = format!("{RECORD_ROW}; sleep 0.05");
    std::fs::write(dir.join("jobs.toml"), local_jobs(&slow, 3, 5)).unwrap();
    let (producer, _stop_producer) = start_producer(&vhost, dir).await;
    let mut scaler = Scaler::start_with(&vhost, dir, "scaler.log", &[("CONCURRENCY", "1")]);
    scaler.wait_ready().await;
    let _reaper = WorkerReaper(dir);

    let batch = upload(&producer, numbered_csv(ROWS)).await;
    wait_for("some rows to run", Duration::from_secs(60), || async {
        recorded_rows(dir).len() >= 10
    })
    .await;

    let (status, body) = post_json(&format!("{}/job-types/default/pause", scaler.url)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["paused"], true, "{body}");
    wait_for(
        "every worker to drain and exit",
        Duration::from_secs(60),
        || async { registry(dir).1 == 0 },
    )
    .await;
    let ledger = ledger_of(dir);
    let paused_at = ledger.batch(&batch).await.unwrap().unwrap();
    assert!(
        paused_at.pending > 0 && paused_at.done > 0,
        "the pause landed mid-run: {paused_at:?}"
    );
    assert_eq!(paused_at.state, BatchState::Running, "{paused_at:?}");

    // A new scaler honours the pause: ticks pass, rows wait, nobody is spawned.
    scaler.terminate();
    let spawned_before = registry(dir).0;
    let scaler = Scaler::start_with(&vhost, dir, "scaler-2.log", &[("CONCURRENCY", "1")]);
    scaler.wait_ticks(3).await;
    assert_eq!(
        registry(dir).0,
        spawned_before,
        "a paused job type spawns nothing"
    );

    let (ok, summary, stderr) = scaler.dashboard_sh(&[]);
    assert!(ok, "{stderr}");
    assert!(
        summary
            .lines()
            .any(|l| l.starts_with("default") && l.ends_with("PAUSED")),
        "the summary shows the pause: {summary}"
    );
    let (ok, answer, stderr) = scaler.dashboard_sh(&["resume", "default"]);
    assert!(ok, "{stderr}");
    assert!(answer.contains(r#""paused":false"#), "{answer}");
    let finished = wait_finished(&ledger, &batch, Duration::from_secs(120)).await;
    assert_eq!(
        (finished.state, finished.done),
        (BatchState::Done, ROWS as u64),
        "{finished:?}"
    );
    let ran = recorded_rows(dir);
    assert_eq!(
        ran.keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        expected_rows(&batch, ROWS),
        "every row ran, none was lost"
    );
    assert!(
        ran.values().all(|&runs| runs == 1),
        "a drained worker finishes its rows once: {:?}",
        ran.iter()
            .filter(|(_, runs)| **runs > 1)
            .collect::<Vec<_>>()
    );

    let (status, _) = post_json(&format!("{}/job-types/no-such-type/pause", scaler.url)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
