//! The broker restarted mid-run (`rabbitmqctl stop_app` / `start_app`): while it is
//! down the producer answers 503 and the scaler drains nobody; once it is back the
//! producer takes uploads again, the workers reconnect and finish every row, and the
//! run accounts for every row: "N rows in, N processed at least once, 0 lost, D
//! duplicates".
//!
//! It stops the whole broker, every vhost, so it is a test binary of its own with one
//! test: cargo runs test binaries one after another, never beside each other.

mod support;

use std::{process::Command, time::Duration};

use reqwest::StatusCode;
use spillway_testkit::{
    TestVhost,
    events::EventListener,
    local_workers::{WorkerReaper, registry, running_workers},
    wait_for,
};
use support::{
    Account, Hold, RECORD_ROW, Scaler, expected_rows, held_after, local_jobs, numbered_csv,
    recorded_rows, start_producer_with, try_upload, upload, wait_rows_held,
};

const ROWS: usize = 800;
const MAX_JOBS: usize = 4;
/// Rows of the first batch that flow before the broker stops (lines 2 to 101); the
/// rest wait for the hold's release, once the broker is back, so rows outlast the
/// restart whatever the machine's speed.
const FREE_ROWS: usize = 100;

fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl")
        .args(args)
        .status()
        .expect("this test restarts the local broker with rabbitmqctl: install RabbitMQ's CLI, or run ./manage.sh test, which does");
    assert!(status.success(), "rabbitmqctl {args:?}: {status}");
}

/// Starts the broker's application again when dropped, whatever happened meanwhile.
struct BrokerBack;

impl Drop for BrokerBack {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("start_app").status();
        let _ = Command::new("rabbitmqctl").arg("await_startup").status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_run_loses_no_row_and_everything_reconnects() {
    let vhost = TestVhost::new("fault-broker").await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let slow_row = held_after(FREE_ROWS + 1, &format!("{RECORD_ROW}; sleep 0.05"));
    std::fs::write(dir.join("jobs.toml"), local_jobs(&slow_row, MAX_JOBS, 5)).unwrap();
    let hold = Hold::new(dir);
    let mut reports = EventListener::start(&vhost, &["worker.#"]).await;
    let (producer, stop_producer) =
        start_producer_with(&vhost, dir, &["--broker-retry-seconds", "1"]).await;
    let scaler = Scaler::start_with(&vhost, dir, "scaler.log", &[hold.env()]);
    let _reaper = WorkerReaper(dir);

    let first = upload(&producer, numbered_csv(ROWS)).await;
    wait_rows_held(dir, &mut reports, MAX_JOBS, FREE_ROWS).await;
    // Its connection goes with the broker.
    drop(reports);
    let before = running_workers(dir);
    let done = recorded_rows(dir).len();
    assert_eq!(done, FREE_ROWS, "the rows outlast the restart");

    let broker_back = BrokerBack;
    rabbitmqctl(&["stop_app"]);
    println!("stopped the broker with {done} of {ROWS} rows recorded");
    let (status, body) = try_upload(&producer, numbered_csv(10)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    println!("an upload while the broker is down: {status} {body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "the 503 says what is wrong: {body}"
    );
    wait_for(
        "the scaler to notice it cannot read the queue",
        Duration::from_secs(15),
        || async {
            scaler
                .metric("spillway_scaler_observe_failures_total{job_type=\"default\"}")
                .await
                > 0
        },
    )
    .await;
    assert_eq!(
        scaler
            .metric("spillway_scaler_decisions_total{job_type=\"default\",action=\"drain\"}")
            .await,
        0,
        "no drain on missing data"
    );
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    drop(broker_back);
    println!("started the broker again");
    hold.release();

    // The producer's connection comes back on the next upload's retry.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let second = loop {
        let (status, body) = try_upload(&producer, numbered_csv(ROWS)).await;
        if status == StatusCode::OK {
            break body["batch_id"].as_str().unwrap().to_string();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the producer takes no upload 60 s after the broker came back: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let mut expected = expected_rows(&first, ROWS);
    expected.extend(expected_rows(&second, ROWS));
    wait_for(
        "every row of both batches processed",
        Duration::from_secs(180),
        || async {
            let recorded = recorded_rows(dir);
            expected.iter().all(|row| recorded.contains_key(row))
        },
    )
    .await;
    let account = Account::of(&expected, &recorded_rows(dir), &Default::default());
    println!("{account} (broker restarted mid-run)");
    assert!(
        account.lost.is_empty(),
        "{account}: lost {:?}",
        account.lost
    );

    // The workers from before the restart reconnected rather than gave up: once idle,
    // they drain and exit 0.
    wait_for(
        "every worker drained after the idle window",
        Duration::from_secs(90),
        || async { registry(dir).1 == 0 },
    )
    .await;
    for (name, _) in &before {
        let entry =
            std::fs::read_to_string(dir.join("workers").join(format!("{name}.json"))).unwrap();
        assert!(
            entry.contains("\"ended\":\"succeeded\""),
            "{name} drained cleanly after reconnecting: {entry}"
        );
        let log = std::fs::read_to_string(dir.join("workers").join(format!("{name}.log"))).unwrap();
        assert!(
            log.contains("reconnecting"),
            "{name}'s log shows it lost and regained the broker"
        );
    }
    drop(scaler);
    stop_producer.cancel();
}
