//! The whole system on the local launcher with a real broker: 200 uploaded rows get a
//! burst of workers, never more than `max_jobs`, every row is processed, a scaler
//! restarted mid-run neither loses nor double-spawns workers, and once idle for the
//! (shortened) idle window every worker is drained and exits cleanly.

mod support;

use std::{collections::BTreeSet, time::Duration};

use reqwest::StatusCode;
use spillway_common::testing::{TestVhost, wait_for};
use support::{Scaler, first_worker, recorded, registry, start_producer, upload};

const ROWS: usize = 200;
const MAX_JOBS: usize = 10;
const PATIENCE: Duration = Duration::from_secs(90);

/// Records each row's line, then takes half a second, so 200 rows keep 10 workers
/// busy for about 10 s: long enough to restart the scaler in the middle.
const JOBS: &str = r#"
tick_seconds = 1
idle_seconds = 3

[job_types.default]
queue = "tasks"
handler = "exec"
command = ["sh", "-c", "echo \"$SPILLWAY_LINE\" >> \"$RECORD\"; sleep 0.5"]
max_jobs = 10
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploaded_rows_get_workers_are_all_processed_and_the_workers_drain() {
    let vhost = TestVhost::new("e2e").await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    std::fs::write(dir.join("jobs.toml"), JOBS).unwrap();
    let (producer, stop_producer) = start_producer(&vhost, dir).await;
    let mut scaler = Scaler::start(&vhost, dir, "scaler-1.log");

    let mut csv = String::from("n\n");
    for n in 1..=ROWS {
        csv.push_str(&format!("{n}\n"));
    }
    upload(&producer, csv).await;

    // The management API samples queues every few seconds; once it shows the burst,
    // one tick (1 s) later a burst of 5 must have been spawned.
    wait_for(
        "the management API to show the uploaded rows",
        PATIENCE,
        || async {
            vhost
                .api
                .queue_stats("tasks")
                .await
                .is_ok_and(|q| q.ready + q.unacked > 40)
        },
    )
    .await;
    wait_for(
        "a burst of at least 5 workers within a tick",
        Duration::from_secs(3),
        || async { registry(dir).0 >= 5 },
    )
    .await;
    wait_for("10 workers", PATIENCE, || async {
        registry(dir).0 >= MAX_JOBS
    })
    .await;

    // A worker's log, through the scaler's API; nothing else is readable there.
    // The worker may have been spawned a moment ago: its first line comes when it starts.
    let worker = first_worker(dir);
    let log_url = format!("{}/api/jobs/{worker}/logs", scaler.url);
    wait_for(
        "the worker's log to show it starting",
        Duration::from_secs(30),
        || async {
            let log = reqwest::get(&log_url).await.unwrap();
            assert_eq!(log.status(), StatusCode::OK);
            log.text().await.unwrap().contains("worker starting")
        },
    )
    .await;
    let stranger = reqwest::get(format!(
        "{}/api/jobs/..%2F..%2Fetc%2Fpasswd/logs",
        scaler.url
    ))
    .await
    .unwrap();
    assert_eq!(stranger.status(), StatusCode::NOT_FOUND);

    // Restart the scaler mid-run: the new one must find the 10 workers and add none.
    assert!(recorded(dir).len() < ROWS, "the rows outlast the restart");
    scaler.terminate();
    let scaler = Scaler::start(&vhost, dir, "scaler-2.log");
    wait_for("every row processed", PATIENCE, || async {
        let (spawned, running) = registry(dir);
        assert!(
            spawned <= MAX_JOBS,
            "never more than {MAX_JOBS} workers: {spawned} spawned"
        );
        assert!(running <= MAX_JOBS);
        recorded(dir).len() == ROWS
    })
    .await;
    assert_eq!(
        recorded(dir),
        (2..=ROWS as u64 + 1).collect::<BTreeSet<_>>(),
        "each row's line"
    );

    wait_for(
        "every worker drained after the idle window",
        PATIENCE,
        || async {
            let (spawned, running) = registry(dir);
            assert!(
                spawned <= MAX_JOBS,
                "no spawn after the restart: {spawned} spawned"
            );
            // The registry marks a worker ended when the scaler sees it exit.
            running == 0
        },
    )
    .await;
    let (spawned, _) = registry(dir);
    assert_eq!(
        spawned, MAX_JOBS,
        "the restarted scaler neither lost nor added workers"
    );
    assert_eq!(
        scaler
            .metric("spillway_scaler_decisions_total{job_type=\"default\",action=\"spawn\"}")
            .await,
        0
    );
    assert_eq!(
        scaler
            .metric("spillway_scaler_decisions_total{job_type=\"default\",action=\"drain\"}")
            .await,
        MAX_JOBS as u64,
        "the restarted scaler drained all ten"
    );
    wait_for(
        "the scaler to see every worker gone",
        Duration::from_secs(10),
        || async {
            // Workers it did not start have no exit status it can see: `ended`.
            scaler
                .metric("spillway_scaler_workers{job_type=\"default\",phase=\"ended\"}")
                .await
                == MAX_JOBS as u64
        },
    )
    .await;
    let queue = vhost.api.queue_stats("tasks").await.unwrap();
    assert_eq!((queue.ready, queue.unacked), (0, 0));
    stop_producer.cancel();
}
