//! The ledger against a real PostgreSQL, each test in a database of its own.

use futures_util::TryStreamExt;
use spillway_ledger::{
    BatchFilter, BatchState, Folded, Ledger, NewBatch, Outcome, RowStatus,
    batches::Deleted,
    results::{CSV_COLUMNS, Format},
};
use std::time::Duration;

use spillway_testkit::{TestDatabase, wait_for};

async fn ledger(label: &str) -> (TestDatabase, Ledger) {
    let db = TestDatabase::new(label).await;
    let ledger = Ledger::open(&db.url, 4).expect("a valid URL");
    ledger.ready().await.expect("the test database answers");
    (db, ledger)
}

/// Records a batch `id` of `rows` (line 2 onwards, one line each) under `header`.
async fn record_batch(ledger: &Ledger, id: &str, header: &[&str], rows: &[&[&str]]) {
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    let batch = NewBatch {
        tenant: "default",
        batch_id: id,
        job_type: "default",
        queue: "tasks",
        file_name: Some("data.csv"),
        header: &header,
        rows: Some(rows.len() as u64),
        callback_url: None,
    };
    let lines = (2..).zip(rows.iter().map(|fields| fields.iter()));
    spillway_testkit::ledger::record_batch(ledger, &batch, lines).await;
}

/// Records a batch `id` of `rows` rows, one column `n`: 0, 1, 2 and so on.
async fn record_numbered_batch(ledger: &Ledger, id: &str, rows: usize) {
    let rows: Vec<[String; 1]> = (0..rows).map(|n| [n.to_string()]).collect();
    let rows: Vec<[&str; 1]> = rows.iter().map(|[n]| [n.as_str()]).collect();
    let rows: Vec<&[&str]> = rows.iter().map(|r| r.as_slice()).collect();
    record_batch(ledger, id, &["n"], &rows).await;
}

fn outcome(batch: &str, line: u64, status: RowStatus, result: Option<&str>) -> Outcome {
    Outcome {
        batch_id: batch.into(),
        line,
        status,
        attempts: 1,
        error: (status != RowStatus::Done).then(|| format!("line {line} failed")),
        result: result.map(String::from),
        started_unix: 1_700_000_000.0,
    }
}

async fn download(ledger: &Ledger, id: &str, format: Format, status: Option<RowStatus>) -> String {
    let batch = ledger.batch(id).await.unwrap().expect("the batch");
    let chunks: Vec<_> = ledger
        .results(&batch, format, status)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    String::from_utf8(chunks.concat()).unwrap()
}

#[tokio::test]
async fn processes_starting_at_once_apply_the_migrations_once() {
    let db = TestDatabase::new("migrate").await;
    let ledgers: Vec<_> = (0..4).map(|_| Ledger::open(&db.url, 2).unwrap()).collect();
    let started = futures_util::future::join_all(ledgers.iter().map(Ledger::ready)).await;
    for ready in started {
        ready.expect("every process becomes ready");
    }
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(ledgers[0].pool())
        .await
        .unwrap();
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .count();
    assert_eq!(applied, files as i64);
}

#[tokio::test]
async fn a_process_built_before_the_newest_migration_still_runs() {
    let (db, ledger) = ledger("newer-schema").await;
    // A later build applied a migration this one does not know.
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (999999, 'from a newer build', true, '\\x00', 0)",
    )
    .execute(ledger.pool())
    .await
    .unwrap();
    let older = Ledger::open(&db.url, 1).unwrap();
    older
        .ready()
        .await
        .expect("an older build runs against a newer schema");
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable_and_a_bad_url_is_refused() {
    // Nothing listens on port 1.
    let ledger = Ledger::open("postgres://postgres@127.0.0.1:1/spillway", 1).unwrap();
    let error = ledger.ready().await.unwrap_err();
    assert!(error.is_unavailable(), "{error}");
    let error = Ledger::open("mysql://nowhere", 1).unwrap_err();
    assert!(error.to_string().contains("DATABASE_URL"), "{error}");
}

#[tokio::test]
async fn rows_come_back_with_their_fields_as_csv_and_json_lines() {
    let (_db, ledger) = ledger("results").await;
    let rows: [&[&str]; 4] = [
        &["a, b", "say \"hi\""],
        &["multi\r\nline", "東京 🚲"],
        &["", "C:\\dir\\"],
        &["NULL", "{x,y}"],
    ];
    record_batch(&ledger, "b1", &["name", "note"], &rows).await;
    ledger
        .record(
            "w1",
            &[
                outcome("b1", 2, RowStatus::Done, Some("out,\"2\"")),
                outcome("b1", 3, RowStatus::Dead, None),
            ],
        )
        .await
        .unwrap();

    let csv = download(&ledger, "b1", Format::Csv, None).await;
    let mut reader = csv::Reader::from_reader(csv.as_bytes());
    let header: Vec<_> = reader.headers().unwrap().iter().map(String::from).collect();
    let mut expected_header = vec!["name".to_string(), "note".into()];
    expected_header.extend(CSV_COLUMNS.map(String::from));
    assert_eq!(header, expected_header);
    let records: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(records.len(), 4);
    for (i, (record, fields)) in records.iter().zip(rows).enumerate() {
        assert_eq!(
            &record.iter().take(2).collect::<Vec<_>>(),
            fields,
            "row {i}"
        );
        assert_eq!(&record[2], (i + 2).to_string(), "row {i}'s line");
    }
    assert_eq!(
        &records[0].iter().skip(3).collect::<Vec<_>>(),
        &["done", "out,\"2\"", "", "1"]
    );
    assert_eq!(&records[1][3], "dead");
    assert_eq!(&records[1][5], "line 3 failed");
    assert_eq!(&records[2][3], "pending");

    let jsonl = download(&ledger, "b1", Format::JsonLines, Some(RowStatus::Done)).await;
    let lines: Vec<serde_json::Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{jsonl}");
    assert_eq!(
        lines[0],
        serde_json::json!({"line": 2, "status": "done", "attempts": 1, "result": "out,\"2\"",
            "error": null, "fields": {"name": "a, b", "note": "say \"hi\""}})
    );
    let all = download(&ledger, "b1", Format::JsonLines, None).await;
    let notes: Vec<String> = all
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["fields"]["note"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(notes, rows.map(|r| r[1].to_string()));
}

#[tokio::test]
async fn a_batch_runs_then_finishes_as_its_rows_settle_and_redeliveries_count_once() {
    let (_db, ledger) = ledger("states").await;
    record_batch(&ledger, "b1", &["n"], &[&["1"], &["2"], &["3"]]).await;
    let state = |b: &spillway_ledger::BatchRecord| (b.state, b.pending, b.failed, b.done, b.dead);
    let batch = ledger.batch("b1").await.unwrap().unwrap();
    assert_eq!(state(&batch), (BatchState::Publishing, 3, 0, 0, 0));

    // A row settled while the batch is still being published.
    ledger
        .record("w1", &[outcome("b1", 2, RowStatus::Done, Some("a"))])
        .await
        .unwrap();
    ledger.finish_publishing("b1").await.unwrap();
    let batch = ledger.batch("b1").await.unwrap().unwrap();
    assert_eq!(state(&batch), (BatchState::Running, 2, 0, 1, 0));
    assert_eq!(batch.published, 3);
    assert!(batch.started_at.is_some() && batch.published_at.is_some());

    // Row 3 fails with attempts left, then is redelivered and done; row 2 is
    // redelivered after it was done: nothing counts twice.
    ledger
        .record(
            "w2",
            &[
                outcome("b1", 3, RowStatus::Failed, None),
                outcome("b1", 2, RowStatus::Done, Some("again")),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        ledger.fold().await.unwrap(),
        Folded {
            outcomes: 2,
            rows_changed: 1,
            unknown: 0
        }
    );
    let batch = ledger.batch("b1").await.unwrap().unwrap();
    assert_eq!(state(&batch), (BatchState::Running, 1, 1, 1, 0));
    ledger
        .record("w1", &[outcome("b1", 3, RowStatus::Done, Some("c"))])
        .await
        .unwrap();
    // A redelivered row's status counts its outcomes still in the log, unfolded.
    assert_eq!(
        ledger.row_status("b1", 2).await.unwrap(),
        Some(RowStatus::Done)
    );
    assert_eq!(
        ledger.row_status("b1", 3).await.unwrap(),
        Some(RowStatus::Done),
        "done in the log, failed in the row"
    );
    assert_eq!(
        ledger.row_status("b1", 4).await.unwrap(),
        Some(RowStatus::Pending)
    );
    assert_eq!(ledger.row_status("b1", 99).await.unwrap(), None);

    // The last row dies: the batch is done, with failures.
    ledger
        .record(
            "w1",
            &[
                outcome("b1", 4, RowStatus::Dead, None),
                outcome("b1", 99, RowStatus::Done, None),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        ledger.fold().await.unwrap(),
        Folded {
            outcomes: 3,
            rows_changed: 2,
            unknown: 1
        },
        "line 99 is no row of the batch"
    );
    let batch = ledger.batch("b1").await.unwrap().unwrap();
    assert_eq!(state(&batch), (BatchState::DoneWithFailures, 0, 0, 2, 1));
    assert!(batch.finished_at.is_some());
    let csv = download(&ledger, "b1", Format::Csv, None).await;
    assert!(
        csv.contains("\n1,2,done,a,,1\n"),
        "the first result stands: {csv}"
    );
    let dead = ledger.dead_rows("b1", 10).await.unwrap();
    let dead: Vec<_> = dead
        .into_iter()
        .map(|d| (d.line, d.attempts, d.error, d.fields))
        .collect();
    assert_eq!(
        dead,
        [(
            4,
            1,
            Some("line 4 failed".to_string()),
            vec!["3".to_string()]
        )]
    );
    let totals: Vec<(RowStatus, u64)> = ledger
        .row_totals()
        .await
        .unwrap()
        .into_iter()
        .filter(|t| t.job_type == "default")
        .map(|t| (t.status, t.rows))
        .collect();
    assert_eq!(
        totals,
        [
            (RowStatus::Pending, 0),
            (RowStatus::Done, 2),
            (RowStatus::Failed, 0),
            (RowStatus::Dead, 1),
            (RowStatus::Cancelled, 0)
        ]
    );
}

#[tokio::test]
async fn concurrent_workers_recording_the_same_rows_count_each_once() {
    let (_db, ledger) = ledger("concurrent").await;
    record_numbered_batch(&ledger, "b1", 500).await;
    ledger.finish_publishing("b1").await.unwrap();
    // Four workers each record every row, in different orders and slices: two as
    // failed with attempts left, two as done, so rows move pending -> failed -> done
    // under each other's feet.
    let workers = (0..4u64).map(|w| {
        let ledger = ledger.clone();
        tokio::spawn(async move {
            let mut lines: Vec<u64> = (2..502).collect();
            lines.rotate_left((w * 97) as usize);
            for chunk in lines.chunks(50 + w as usize * 10) {
                let outcomes: Vec<_> = chunk
                    .iter()
                    .map(|&line| match w % 2 {
                        0 => outcome("b1", line, RowStatus::Failed, None),
                        _ => outcome("b1", line, RowStatus::Done, Some("r")),
                    })
                    .collect();
                ledger.record(&format!("w{w}"), &outcomes).await.unwrap();
            }
        })
    });
    for worker in workers {
        worker.await.unwrap();
    }
    let batch = ledger.batch("b1").await.unwrap().unwrap();
    assert_eq!(
        (batch.state, batch.pending, batch.failed, batch.done),
        (BatchState::Done, 0, 0, 500)
    );
    let done: i64 = sqlx::query_scalar("SELECT count(*) FROM batch_rows WHERE status = 'done'")
        .fetch_one(ledger.pool())
        .await
        .unwrap();
    assert_eq!(done, 500);
}

#[tokio::test]
async fn outcomes_count_once_whatever_order_and_however_many_folds_take_them() {
    let (_db, ledger) = ledger("folds").await;
    record_numbered_batch(&ledger, "b1", 300).await;
    ledger.finish_publishing("b1").await.unwrap();
    let failed = |line, attempts, error: &str| Outcome {
        attempts,
        error: Some(error.into()),
        ..outcome("b1", line, RowStatus::Failed, None)
    };

    // Recorded, not yet folded: the log holds it, and a reader folds it first.
    ledger
        .record("w2", &[failed(2, 2, "second")])
        .await
        .unwrap();
    let logged: i64 = sqlx::query_scalar("SELECT count(*) FROM row_outcomes")
        .fetch_one(ledger.pool())
        .await
        .unwrap();
    assert_eq!(logged, 1, "the outcome waits in the log");
    let batch = ledger.batch("b1").await.unwrap().unwrap();
    assert_eq!((batch.pending, batch.failed), (299, 1));

    // An earlier delivery's failure, folded after the later one's, changes nothing.
    ledger.record("w1", &[failed(2, 1, "first")]).await.unwrap();
    assert_eq!(
        ledger.fold().await.unwrap(),
        Folded {
            outcomes: 1,
            rows_changed: 0,
            unknown: 0
        }
    );
    let (attempts, error, worker): (i32, String, String) = sqlx::query_as(
        "SELECT attempts, error, worker FROM batch_rows WHERE batch_id = 'b1' AND line = 2",
    )
    .fetch_one(ledger.pool())
    .await
    .unwrap();
    assert_eq!(
        (attempts, error.as_str(), worker.as_str()),
        (2, "second", "w2")
    );

    // A row's outcomes recorded out of order in one fold apply by delivery: done wins.
    let done = Outcome {
        attempts: 2,
        ..outcome("b1", 3, RowStatus::Done, Some("r"))
    };
    ledger
        .record("w1", &[done, failed(3, 1, "first")])
        .await
        .unwrap();

    // Every other row done, recorded by many calls and folded by many folds at once.
    for lines in (4..302).collect::<Vec<u64>>().chunks(37) {
        let outcomes: Vec<_> = lines
            .iter()
            .map(|&line| outcome("b1", line, RowStatus::Done, Some("r")))
            .collect();
        ledger.record("w3", &outcomes).await.unwrap();
    }
    let folds: Vec<_> = (0..4)
        .map(|_| {
            let ledger = ledger.clone();
            tokio::spawn(async move { ledger.fold().await.unwrap() })
        })
        .collect();
    let mut folded = Folded::default();
    for fold in folds {
        let fold = fold.await.unwrap();
        folded.outcomes += fold.outcomes;
        folded.rows_changed += fold.rows_changed;
        folded.unknown += fold.unknown;
    }
    assert_eq!(
        folded,
        Folded {
            outcomes: 2 + 298,
            rows_changed: 1 + 298,
            unknown: 0
        },
        "each outcome folded once"
    );
    let batch = ledger.batch("b1").await.unwrap().unwrap();
    assert_eq!(
        (batch.state, batch.pending, batch.failed, batch.done),
        (BatchState::Running, 0, 1, 299)
    );
}

#[tokio::test]
async fn a_row_changed_under_a_fold_keeps_its_outcome_in_the_log_for_the_next() {
    let (db, ledger) = ledger("fold-race").await;
    record_batch(&ledger, "b1", &["n"], &[&["1"], &["2"]]).await;
    ledger.finish_publishing("b1").await.unwrap();
    ledger
        .record("w2", &[outcome("b1", 2, RowStatus::Done, Some("answer"))])
        .await
        .unwrap();
    // A writer that takes no fold lock (a worker built before the log) fails row 2 and
    // holds it while a fold starts.
    let mut other = ledger.pool().begin().await.unwrap();
    sqlx::query(
        "UPDATE batch_rows SET status = 'failed', attempts = 1 WHERE batch_id = 'b1' AND line = 2",
    )
    .execute(&mut *other)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE batches SET pending = pending - 1, failed = failed + 1 WHERE batch_id = 'b1'",
    )
    .execute(&mut *other)
    .await
    .unwrap();
    let folding = {
        let ledger = ledger.clone();
        tokio::spawn(async move { ledger.fold().await.unwrap() })
    };
    wait_for(
        "the fold to wait for the row",
        Duration::from_secs(10),
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = $1 AND wait_event_type = 'Lock' AND query LIKE '%row_outcomes%'",
            )
            .bind(&db.name)
            .fetch_one(ledger.pool())
            .await
            .unwrap();
            waiting > 0
        },
    )
    .await;
    other.commit().await.unwrap();
    assert_eq!(
        folding.await.unwrap(),
        Folded {
            outcomes: 1,
            rows_changed: 0,
            unknown: 0
        },
        "the row changed under the fold: nothing applied, nothing counted"
    );
    // The next fold applies the outcome to the row as it now is.
    assert_eq!(ledger.fold().await.unwrap().rows_changed, 1);
    let batch = ledger.batch("b1").await.unwrap().unwrap();
    assert_eq!(
        (batch.state, batch.pending, batch.failed, batch.done),
        (BatchState::Running, 1, 0, 1)
    );
    let csv = download(&ledger, "b1", Format::Csv, None).await;
    assert!(csv.contains("\n1,2,done,answer,,1\n"), "{csv}");
}

#[tokio::test]
async fn publication_resumes_after_the_rows_confirmed_and_a_failure_is_recorded() {
    let (_db, ledger) = ledger("resume").await;
    record_batch(&ledger, "b1", &["n"], &[&["a"], &["b"], &["c"]]).await;
    record_batch(&ledger, "b2", &["n"], &[&["x"]]).await;
    ledger.set_published("b1", 2).await.unwrap();
    ledger.set_published("b1", 1).await.unwrap();
    // Both heartbeats are fresh: nothing to resume.
    let stale = std::time::Duration::from_secs(60);
    assert_eq!(ledger.claim_stale_publication(stale).await.unwrap(), None);
    // Their producer stops: the oldest is claimed first, and each only once.
    sqlx::query("UPDATE batches SET heartbeat_at = now() - interval '2 minutes'")
        .execute(ledger.pool())
        .await
        .unwrap();
    let claimed = ledger
        .claim_stale_publication(stale)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((claimed.batch_id.as_str(), claimed.published), ("b1", 2));
    let after = ledger.resume_after("b1", claimed.published).await.unwrap();
    assert_eq!(after, 3);
    let rest = ledger.rows_after("b1", after, 10).await.unwrap();
    assert_eq!(rest, [(4, vec!["c".to_string()])]);
    assert_eq!(ledger.rows_after("b1", 0, 2).await.unwrap().len(), 2);
    assert_eq!(ledger.resume_after("b1", 0).await.unwrap(), 0);
    let claimed = ledger
        .claim_stale_publication(stale)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.batch_id, "b2");
    assert_eq!(ledger.claim_stale_publication(stale).await.unwrap(), None);

    ledger
        .fail_publishing("b2", 0, "RabbitMQ refused")
        .await
        .unwrap();
    let b2 = ledger.batch("b2").await.unwrap().unwrap();
    assert_eq!(
        (b2.state, b2.error.as_deref()),
        (BatchState::Failed, Some("RabbitMQ refused"))
    );
}

#[tokio::test]
async fn batches_are_listed_newest_first_by_page_and_filter_and_deleted_once_finished() {
    let (_db, ledger) = ledger("list").await;
    for id in ["b1", "b2", "b3"] {
        record_batch(&ledger, id, &["n"], &[&["1"]]).await;
    }
    ledger.fail_publishing("b2", 0, "gone").await.unwrap();
    let ids = |batches: Vec<spillway_ledger::BatchRecord>| -> Vec<String> {
        batches.into_iter().map(|b| b.batch_id).collect()
    };
    let page = |before: Option<&str>| BatchFilter {
        limit: 2,
        before: before.map(String::from),
        ..BatchFilter::default()
    };
    assert_eq!(
        ids(ledger.batches(&page(None)).await.unwrap()),
        ["b3", "b2"]
    );
    assert_eq!(
        ids(ledger.batches(&page(Some("b2"))).await.unwrap()),
        ["b1"]
    );
    let failed = BatchFilter {
        state: Some(BatchState::Failed),
        limit: 10,
        ..BatchFilter::default()
    };
    assert_eq!(ids(ledger.batches(&failed).await.unwrap()), ["b2"]);
    let other = BatchFilter {
        job_type: Some("other".into()),
        limit: 10,
        ..BatchFilter::default()
    };
    assert!(ledger.batches(&other).await.unwrap().is_empty());

    assert_eq!(
        ledger.delete_batch("b1").await.unwrap(),
        Deleted::Unfinished(BatchState::Publishing)
    );
    assert_eq!(ledger.delete_batch("b2").await.unwrap(), Deleted::Deleted);
    assert_eq!(ledger.delete_batch("b2").await.unwrap(), Deleted::NotFound);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM batch_rows WHERE batch_id = 'b2'")
        .fetch_one(ledger.pool())
        .await
        .unwrap();
    assert_eq!(rows, 0, "a deleted batch's rows go with it");
}
