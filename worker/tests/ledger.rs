//! The worker and the ledger, against a real RabbitMQ and a real PostgreSQL: every
//! row's outcome and result is recorded before its ack; a redelivered row already
//! done is acked without running again; without PostgreSQL rows wait unacked and go
//! back to the queue when the worker stops.

mod support;

use spillway_ledger::{BatchState, Outcome, RowStatus};
use spillway_testkit::wait_for;
use support::{PATIENCE, QUEUE, Rig};

/// Prints the row's answer on stdout (its result) and a note on stderr; the row on
/// line 3 fails. Each run is recorded in $RECORD.
const ANSWERING: &str = r#"echo "$SPILLWAY_LINE" >> "$RECORD"; echo "note $SPILLWAY_LINE" >&2; [ "$SPILLWAY_LINE" != 3 ] || { echo "no line 3" >&2; exit 7; }; echo "answer-$SPILLWAY_LINE""#;

/// A row of `batch_rows`: line, status, result, error, attempts, worker.
type LedgerRow = (
    i64,
    String,
    Option<String>,
    Option<String>,
    i32,
    Option<String>,
);

#[tokio::test]
async fn every_outcome_and_result_is_recorded_and_the_batch_finishes() {
    let rig = Rig::new("ledger-outcomes", 2, ANSWERING).await;
    let ledger = rig.record_batch(5).await;
    rig.publish_rows(5).await;
    let mut worker = rig.start_worker("ledger-1", &[]);
    wait_for("the batch to finish in the ledger", PATIENCE, || async {
        let batch = ledger.batch(&rig.batch_id).await.unwrap().unwrap();
        batch.state.is_finished()
    })
    .await;
    let batch = ledger.batch(&rig.batch_id).await.unwrap().unwrap();
    assert_eq!(batch.state, BatchState::DoneWithFailures);
    assert_eq!(
        (batch.done, batch.dead, batch.pending, batch.failed),
        (4, 1, 0, 0)
    );

    let rows: Vec<LedgerRow> = sqlx::query_as(
        "SELECT line, status, result, error, attempts, worker FROM batch_rows ORDER BY line",
    )
    .fetch_all(ledger.pool())
    .await
    .unwrap();
    for (line, status, result, error, attempts, by) in rows {
        assert_eq!(by.as_deref(), Some("ledger-1"), "line {line}");
        if line == 3 {
            assert_eq!((status.as_str(), attempts), ("dead", 2), "line 3");
            let error = error.expect("a dead row carries its error");
            assert!(
                error.contains("exit status: 7") && error.contains("no line 3"),
                "{error}"
            );
            assert_eq!(result, None);
        } else {
            assert_eq!((status.as_str(), attempts), ("done", 1), "line {line}");
            assert_eq!(result.as_deref(), Some(format!("answer-{line}").as_str()));
        }
    }
    assert_eq!(
        rig.dead_letters().await.len(),
        1,
        "the dead row's copy is in the dead queue"
    );
    worker.signal("TERM");
    assert!(worker.wait_exit().await.success(), "{}", worker.log_text());
    assert_eq!(rig.ready(QUEUE).await, 0);
}

#[tokio::test]
async fn a_redelivered_row_already_done_is_acked_without_running_again() {
    // The command records that it started, then takes its time.
    let script = r#"echo "$SPILLWAY_LINE" >> "$RECORD"; sleep 30; echo late"#;
    let rig = Rig::new("ledger-redelivered", 5, script).await;
    let ledger = rig.record_batch(1).await;
    rig.publish_rows(1).await;
    let mut first = rig.start_worker("ledger-first", &[]);
    rig.wait_recorded("record", 1, &mut first).await;
    // The worker dies mid-row; meanwhile the row's outcome reaches the ledger another
    // way (as when a worker committed it and died before its ack arrived).
    first.signal("KILL");
    first.wait_exit().await;
    let done = Outcome {
        batch_id: rig.batch_id.clone(),
        line: 1,
        status: RowStatus::Done,
        attempts: 1,
        error: None,
        result: Some("first".into()),
        started_unix: 1.0,
    };
    ledger.record("ledger-first", &[done]).await.unwrap();

    let mut second = rig.start_worker("ledger-second", &[]);
    wait_for("the redelivered row to be taken", PATIENCE, || async {
        rig.ready(QUEUE).await == 0
    })
    .await;
    // A drain finishes the rows in hand: one run again would keep it for 30 s.
    second.signal("TERM");
    assert!(second.wait_exit().await.success(), "{}", second.log_text());
    assert_eq!(rig.counts("record").get(&1), Some(&1), "the row ran once");
    assert_eq!(rig.ready(QUEUE).await, 0, "the redelivered row was acked");
    let batch = ledger.batch(&rig.batch_id).await.unwrap().unwrap();
    assert_eq!((batch.state, batch.done), (BatchState::Done, 1));
}

#[tokio::test]
async fn without_postgresql_rows_wait_unacked_and_return_to_the_queue() {
    let rig = Rig::new("ledger-down", 5, ANSWERING).await;
    rig.publish_rows(2).await;
    // Nothing listens on port 1.
    let unreachable = [("DATABASE_URL", "postgres://postgres@127.0.0.1:1/spillway")];
    let mut worker = rig.start_worker("ledger-down-1", &unreachable);
    worker.wait_logged("PostgreSQL is unreachable", 1).await;
    rig.wait_recorded("record", 2, &mut worker).await;
    assert_eq!(
        rig.ready(QUEUE).await,
        0,
        "the rows are in the worker's hands, unacked"
    );
    worker.signal("TERM");
    assert!(worker.wait_exit().await.success(), "{}", worker.log_text());
    // The broker requeues what a closed connection held as it processes the close.
    wait_for("both rows back in the queue", PATIENCE, || async {
        rig.ready(QUEUE).await == 2
    })
    .await;
    assert!(rig.dead_letters().await.is_empty());

    // PostgreSQL is back: the rows are done, and recorded.
    let ledger = rig.record_batch(2).await;
    let _worker = rig.start_worker("ledger-down-2", &[]);
    wait_for("the rows to be recorded", PATIENCE, || async {
        ledger.batch(&rig.batch_id).await.unwrap().unwrap().done == 2
    })
    .await;
}
