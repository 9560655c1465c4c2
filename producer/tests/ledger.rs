//! The producer and its ledger, against a real RabbitMQ and a real PostgreSQL: an
//! upload is answered only once the ledger holds every row; the batches API reads
//! the ledger; results download row for row; without PostgreSQL uploads get 503 and
//! nothing is published; a publication whose producer stopped is resumed.

mod support;

use reqwest::StatusCode;
use spillway_ledger::{BatchState, Ledger, NewBatch};
use spillway_testkit::{TestDatabase, TestVhost, ledger::record_batch, wait_for};
use std::time::Duration;
use support::TestProducer;

const CSV: &str = "name,note\r\n\
                   \"Widget, large\",\"say \"\"hi\"\"\"\r\n\
                   \"two\r\nlines\",東京 🚲\r\n\
                   plain,\r\n";

fn fields_of(csv: &str) -> Vec<Vec<String>> {
    csv::Reader::from_reader(csv.as_bytes())
        .records()
        .map(|r| r.unwrap().iter().map(String::from).collect())
        .collect()
}

async fn producer_with_ledger(label: &str) -> (TestProducer, TestDatabase, Ledger) {
    let db = TestDatabase::new(label).await;
    let producer = TestProducer::start(label, &["--database-url", &db.url]).await;
    let ledger = Ledger::open(&db.url, 2).unwrap();
    (producer, db, ledger)
}

#[tokio::test]
async fn an_upload_is_answered_once_the_ledger_holds_every_row_and_results_come_back_row_for_row() {
    let (producer, _db, ledger) = producer_with_ledger("ledger-upload").await;
    let (status, body) = producer.upload(CSV).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let id = body["batch_id"].as_str().unwrap();

    // The answer came: the ledger holds the batch, every row published.
    let batch = ledger
        .batch(id)
        .await
        .unwrap()
        .expect("the batch is in the ledger");
    assert_eq!((batch.rows, batch.published, batch.pending), (3, 3, 3));
    assert_eq!(batch.state, BatchState::Queued);
    assert_eq!(batch.header, ["name", "note"]);
    assert_eq!(batch.file_name.as_deref(), Some("data.csv"));

    let (status, view) = producer.get(&format!("/batches/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    for (field, value) in [
        ("rows", 3),
        ("published", 3),
        ("pending", 3),
        ("done", 0),
        ("dead", 0),
    ] {
        assert_eq!(view[field], value, "{field} in {view}");
    }
    assert_eq!(view["state"], "queued");
    assert_eq!(view["job_type"], "default");

    let response = producer
        .client
        .get(format!("{}/batches/{id}/results", producer.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let results = response.text().await.unwrap();
    let mut reader = csv::Reader::from_reader(results.as_bytes());
    assert_eq!(
        reader.headers().unwrap().iter().collect::<Vec<_>>(),
        [
            "name",
            "note",
            "spillway_line",
            "spillway_status",
            "spillway_result",
            "spillway_error",
            "spillway_attempts"
        ]
    );
    let rows: Vec<Vec<String>> = reader
        .records()
        .map(|r| r.unwrap().iter().map(String::from).collect())
        .collect();
    let expected = fields_of(CSV);
    assert_eq!(rows.len(), expected.len());
    for ((row, fields), line) in rows.iter().zip(&expected).zip(["2", "3", "5"]) {
        assert_eq!(&row[..2], &fields[..]);
        assert_eq!(&row[2..4], [line, "pending"]);
    }

    let jsonl = producer
        .text(&format!(
            "/batches/{id}/results?format=jsonl&status=pending"
        ))
        .await;
    let first: serde_json::Value = serde_json::from_str(jsonl.lines().next().unwrap()).unwrap();
    assert_eq!(first["fields"]["note"], "say \"hi\"");
    assert_eq!(jsonl.lines().count(), 3);
    assert_eq!(
        producer.drain("tasks").await.len(),
        3,
        "every row was published"
    );

    let metrics = producer.text("/metrics").await;
    for line in [
        r#"spillway_producer_ledger_rows{job_type="default",status="pending"} 3"#,
        r#"spillway_producer_ledger_rows{job_type="default",status="done"} 0"#,
        "spillway_producer_batch_rows_count 1",
        "spillway_producer_ledger_write_seconds_count 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in:\n{metrics}"
        );
    }
}

#[tokio::test]
async fn the_batches_api_lists_filters_and_refuses_what_it_cannot_do() {
    let (producer, _db, _ledger) = producer_with_ledger("ledger-api").await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (status, body) = producer.upload("n\n1\n").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        ids.push(body["batch_id"].as_str().unwrap().to_string());
    }
    let (status, page) = producer.get("/batches?limit=2").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let listed: Vec<&str> = page["batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["batch_id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [ids[2].as_str(), ids[1].as_str()], "newest first");
    let next = page["next_before"].as_str().expect("a next page");
    let (_, page) = producer
        .get(&format!("/batches?limit=2&before={next}"))
        .await;
    assert_eq!(page["batches"][0]["batch_id"], ids[0].as_str());
    assert!(page.get("next_before").is_none(), "{page}");
    let (_, page) = producer.get("/batches?state=done").await;
    assert_eq!(page["batches"].as_array().unwrap().len(), 0);

    // (request, status, what the error names)
    let refusals = [
        (
            "/batches?state=finished",
            StatusCode::BAD_REQUEST,
            "unknown batch state",
        ),
        ("/batches?limit=0", StatusCode::BAD_REQUEST, "limit"),
        ("/batches/nope", StatusCode::NOT_FOUND, "no batch"),
        ("/batches/nope/results", StatusCode::NOT_FOUND, "no batch"),
    ];
    for (path, expected, names) in refusals {
        let (status, body) = producer.get(path).await;
        assert_eq!(status, expected, "{path}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains(names),
            "{path}: {body}"
        );
    }
    let (status, body) = producer
        .get(&format!("/batches/{}/results?format=xml", ids[0]))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = producer
        .get(&format!("/batches/{}/results?status=lost", ids[0]))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    let delete = |id: &str| {
        producer
            .client
            .delete(format!("{}/batches/{id}", producer.base_url))
            .send()
    };
    let response = delete(&ids[0]).await.unwrap();
    let (status, body) = TestProducer::decode(response).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a queued batch is not deleted: {body}"
    );
    assert!(body["error"].as_str().unwrap().contains("queued"), "{body}");
}

#[tokio::test]
async fn without_postgresql_an_upload_is_a_503_and_nothing_is_published() {
    // Nothing listens on port 1.
    let producer = TestProducer::start(
        "ledger-down",
        &["--database-url", "postgres://postgres@127.0.0.1:1/spillway"],
    )
    .await;
    let (status, body) = producer.upload("n\n1\n2\n").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("PostgreSQL"),
        "{body}"
    );
    let (status, body) = producer.get("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(producer.depth("tasks").await.unwrap_or(0), 0);
}

#[tokio::test]
async fn a_publication_whose_producer_stopped_is_resumed_from_the_ledger() {
    let db = TestDatabase::new("ledger-resume").await;
    let vhost = TestVhost::new("ledger-resume").await;
    let ledger = Ledger::open(&db.url, 2).unwrap();
    ledger.ready().await.unwrap();
    // A batch of 5 rows whose producer confirmed 2, then stopped a while ago.
    let header = vec!["n".to_string()];
    let batch = NewBatch {
        tenant: "default",
        batch_id: "abandoned",
        job_type: "default",
        queue: "tasks",
        file_name: None,
        header: &header,
        rows: Some(5),
        callback_url: None,
    };
    record_batch(&ledger, &batch, (0..5u64).map(|n| (n + 2, [n.to_string()]))).await;
    ledger.set_published("abandoned", 2).await.unwrap();
    sqlx::query("UPDATE batches SET heartbeat_at = now() - interval '1 hour'")
        .execute(ledger.pool())
        .await
        .unwrap();

    let producer = TestProducer::start_with_url(vhost, None, &["--database-url", &db.url]).await;
    wait_for(
        "the resumed batch to be published",
        Duration::from_secs(30),
        || async { ledger.batch("abandoned").await.unwrap().unwrap().state == BatchState::Queued },
    )
    .await;
    let published = producer.drain("tasks").await;
    let resumed: Vec<(u64, u64, String)> = published
        .into_iter()
        .map(|(_, _, row)| (row.line, row.row, row.fields[0].clone()))
        .collect();
    assert_eq!(
        resumed,
        [
            (4, 3, "2".to_string()),
            (5, 4, "3".into()),
            (6, 5, "4".into())
        ],
        "the rows after the 2 confirmed, numbered as the first producer numbered them"
    );
}

#[tokio::test]
async fn a_refused_upload_leaves_nothing_and_uploads_beyond_the_pool_wait_their_turn() {
    // Three connections: one batch at a time may be recorded as it is read.
    let db = TestDatabase::new("ledger-tail").await;
    let producer = TestProducer::start(
        "ledger-tail",
        // Six uploads at once from this one client: more than it may have by default.
        &[
            "--database-url",
            &db.url,
            "--database-max-connections",
            "3",
            "--max-uploads-per-client",
            "6",
        ],
    )
    .await;
    let ledger = Ledger::open(&db.url, 2).unwrap();
    let numbered = |rows: usize| -> String {
        std::iter::once("n,square".to_string())
            .chain((1..=rows).map(|n| format!("{n},{}", n * n)))
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    };

    // Refused after thousands of rows already went to the ledger's open transaction.
    let refused = numbered(20_000) + "ragged\n";
    let (status, body) = producer.upload(refused).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["line"], 20_002, "{body}");
    let all = spillway_ledger::BatchFilter {
        limit: 10,
        ..Default::default()
    };
    let recorded = ledger.batches(&all).await.unwrap();
    assert!(
        recorded.is_empty(),
        "a refused upload is not recorded: {recorded:?}"
    );
    assert_eq!(producer.depth("tasks").await.unwrap_or(0), 0);

    // Six at once, one recording slot: each waits for it, none fails.
    let csv = numbered(5_000);
    let uploads = (0..6).map(|_| producer.upload(csv.clone()));
    let answers = futures_util::future::join_all(uploads).await;
    for (status, body) in &answers {
        assert_eq!(*status, StatusCode::OK, "{body}");
        let id = body["batch_id"].as_str().unwrap();
        let batch = ledger.batch(id).await.unwrap().expect("recorded");
        assert_eq!((batch.rows, batch.published), (5_000, 5_000), "{batch:?}");
    }
    assert_eq!(producer.depth("tasks").await.unwrap(), 30_000);
}

#[tokio::test]
async fn a_batch_cancelled_while_it_is_published_stops_being_published() {
    // One row in flight at a time: publishing takes seconds whatever the machine, so
    // the cancel comes while it runs (with the default window a loaded machine once
    // published every row before the cancel arrived).
    let db = TestDatabase::new("ledger-cancel").await;
    let producer = TestProducer::start(
        "ledger-cancel",
        &["--database-url", &db.url, "--publish-window", "1"],
    )
    .await;
    let ledger = Ledger::open(&db.url, 2).unwrap();
    const ROWS: u64 = 100_000;
    let csv = std::iter::once("n".to_string())
        .chain((1..=ROWS).map(|n| n.to_string()))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    let producer = std::sync::Arc::new(producer);
    let uploading = tokio::spawn({
        let producer = std::sync::Arc::clone(&producer);
        async move { producer.upload(csv).await }
    });
    let publishing = || async {
        let all = spillway_ledger::BatchFilter {
            limit: 10,
            ..Default::default()
        };
        ledger
            .batches(&all)
            .await
            .unwrap()
            .into_iter()
            .find(|b| b.state == BatchState::Publishing)
    };
    wait_for(
        "the batch to be recorded and published",
        Duration::from_secs(60),
        || async { publishing().await.is_some() },
    )
    .await;
    let id = publishing().await.unwrap().batch_id;

    let response = producer
        .client
        .post(format!("{}/batches/{id}/cancel", producer.base_url))
        .send()
        .await
        .unwrap();
    let (status, body) = TestProducer::decode(response).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["cancelled"], ROWS, "none has run: {body}");

    let (status, answer) = uploading.await.unwrap();
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    let published = answer["published"]
        .as_u64()
        .expect("how many were published");
    assert!(published < ROWS, "publishing stopped: {answer}");
    let batch = ledger.batch(&id).await.unwrap().unwrap();
    assert_eq!(
        (batch.state, batch.cancelled, batch.pending),
        (BatchState::Cancelled, ROWS, 0),
        "{batch:?}"
    );
}
