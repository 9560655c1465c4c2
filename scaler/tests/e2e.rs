//! The whole system on the local launcher with a real broker: 200 uploaded rows get a
//! burst of workers, never more than `max_jobs`, every row is processed, a scaler
//! restarted mid-run neither loses nor double-spawns workers, and once idle for the
//! (shortened) idle window every worker is drained and exits cleanly. Each step waits
//! for what the scaler and the workers say (a scaling event, a report of rows in
//! hand), never for an amount of time.

mod support;

use std::{collections::BTreeSet, time::Duration};

use reqwest::StatusCode;
use spillway_testkit::{
    TestVhost,
    events::EventListener,
    local_workers::{first_worker, registry},
    wait_for,
};
use support::{
    Hold, Scaler, held_after, local_jobs, numbered_csv, recorded, start_producer, upload,
    wait_rows_held,
};

const ROWS: usize = 200;
const MAX_JOBS: usize = 10;
const PATIENCE: Duration = Duration::from_secs(90);

/// What a row does once the hold is off: record its line, then take a moment.
const ROW: &str = r#"echo "$SPILLWAY_LINE" >> "$RECORD"; sleep 0.1"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploaded_rows_get_workers_are_all_processed_and_the_workers_drain() {
    let vhost = TestVhost::new("e2e").await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let jobs = local_jobs(&held_after(1, ROW), MAX_JOBS, 5);
    std::fs::write(dir.join("jobs.toml"), jobs).unwrap();
    // Every row is held until the scaler has been restarted: the rows outlast the
    // restart whatever the machine's speed.
    let hold = Hold::new(dir);
    let mut reports = EventListener::start(&vhost, &["worker.#"]).await;
    let (producer, stop_producer) = start_producer(&vhost, dir).await;
    let mut scaler = Scaler::start_with(&vhost, dir, "scaler-1.log", &[hold.env()]);

    scaler.wait_ready().await;
    upload(&producer, numbered_csv(ROWS)).await;

    // Far above the burst threshold (40), one tick spawns a burst of 5 at once.
    wait_for(
        "a burst of at least 5 workers spawned by one decision",
        PATIENCE,
        || async {
            scaler.events().await.iter().any(|event| {
                event["action"] == "spawn"
                    && event["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains("> burst threshold 40"))
                    && event["workers"].as_array().is_some_and(|w| w.len() >= 5)
            })
        },
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
    wait_rows_held(dir, &mut reports, MAX_JOBS, 0).await;
    assert!(recorded(dir).is_empty(), "the rows outlast the restart");
    scaler.terminate();
    let scaler = Scaler::start_with(&vhost, dir, "scaler-2.log", &[hold.env()]);
    scaler.wait_ticks(1).await;
    assert_eq!(
        scaler
            .metric("spillway_scaler_workers{job_type=\"default\",phase=\"running\"}")
            .await,
        MAX_JOBS as u64,
        "the restarted scaler found the workers, still at their rows"
    );
    hold.release();
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
