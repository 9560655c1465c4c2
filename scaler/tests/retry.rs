//! Retrying a batch's dead rows, end to end on the local launcher: rows that fail on
//! every one of their first `delivery_limit` attempts, and pass afterwards, end `done`
//! after one retry, each run exactly once more; their copies leave the dead queue; a
//! retry interrupted after its ledger step is finished by the next call.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use spillway_ledger::BatchState;
use spillway_testkit::{TestVhost, local_workers::WorkerReaper};
use support::{
    Scaler,
    ledger::{ledger_of, wait_finished},
    local_jobs, numbered_csv, post_json, start_producer, upload,
};

/// Counts its runs of each row in `$RECORD.<line>`; fails the first two, then answers
/// with how many runs it took.
const FAILS_TWICE: &str = r#"f="$RECORD.$SPILLWAY_LINE"; n=$(( $(cat "$f" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$f"; if [ "$n" -le 2 ]; then echo "attempt $n refused" >&2; exit 1; fi; printf 'ok after %s runs' "$n""#;

const ROWS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_rows_retried_pass_once_leave_the_dead_queue_and_an_interrupted_retry_finishes() {
    let vhost = TestVhost::new("retry").await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    // Two deliveries a row: both fail, and the row is dead.
    std::fs::write(dir.join("jobs.toml"), local_jobs(FAILS_TWICE, 2, 2)).unwrap();
    let (producer, _stop_producer) = start_producer(&vhost, dir).await;
    let _scaler = Scaler::start(&vhost, dir, "scaler.log");
    let _reaper = WorkerReaper(dir);

    let batch = upload(&producer, numbered_csv(ROWS)).await;
    let ledger = ledger_of(dir);
    let first = wait_finished(&ledger, &batch, Duration::from_secs(120)).await;
    assert_eq!(
        (first.state, first.dead, first.done),
        (BatchState::DoneWithFailures, ROWS as u64, 0),
        "{first:?}"
    );
    assert_eq!(vhost.ready("tasks.dead").await, Some(ROWS as u32));

    // A producer that died right after the retry's ledger step: rows pending, listed,
    // not yet published, their copies still dead-lettered.
    let listed = ledger.retry_dead(&batch).await.unwrap().unwrap();
    assert_eq!(
        (listed.retried, listed.to_publish),
        (ROWS as u64, ROWS as u64)
    );

    let retry = format!("{producer}/batches/{batch}/retry");
    let (status, body) = post_json(&retry).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["retried"], 0,
        "the interrupted retry moved them: {body}"
    );
    assert_eq!(body["published"], ROWS, "{body}");
    assert_eq!(body["removed_from_dead_queue"], ROWS, "{body}");
    assert_eq!(
        vhost.ready("tasks.dead").await,
        Some(0),
        "the dead queue and the ledger agree"
    );

    let second = wait_finished(&ledger, &batch, Duration::from_secs(120)).await;
    assert_eq!(
        (second.state, second.done, second.dead, second.pending),
        (BatchState::Done, ROWS as u64, 0, 0),
        "{second:?}"
    );
    let results = reqwest::get(format!("{producer}/batches/{batch}/results?format=jsonl"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let rows: Vec<Value> = results
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), ROWS);
    for row in &rows {
        assert_eq!(row["status"], "done", "{row}");
        assert_eq!(
            row["result"], "ok after 3 runs",
            "run exactly once more: {row}"
        );
        assert_eq!(row["attempts"], 1, "attempts start again: {row}");
    }
    for line in 2..=ROWS + 1 {
        let runs = std::fs::read_to_string(dir.join(format!("record.{line}"))).unwrap();
        assert_eq!(
            runs.trim(),
            "3",
            "line {line}: two failures and one success"
        );
    }

    // Nothing is dead any more: a retry now does nothing, and says so.
    let (status, body) = post_json(&retry).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (&body["retried"], &body["published"]),
        (&0.into(), &0.into()),
        "{body}"
    );
    // A batch that does not exist is a 404.
    let (status, _) = post_json(&format!("{producer}/batches/no-such-batch/retry")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
