//! The producer against a real RabbitMQ: every shape of well-formed CSV arrives row
//! for row, concurrent uploads all land, job types route to their queues, and a
//! missing broker is a 503. Bad uploads are the corpus in `corpus.rs`.

mod support;

use reqwest::StatusCode;
use serde_json::Value;
use spillway_common::events::BatchStateChanged;
use spillway_testkit::events::EventListener;
use support::TestProducer;

fn strs(values: &[&str]) -> Vec<String> {
    values.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn every_shape_of_csv_arrives_row_for_row() {
    let producer = TestProducer::start("shapes", &[]).await;
    let csv = "\u{FEFF}Date,Item Description,Quantity,Amount\r\n\
               2024-01-01,\"Widget, large\",3,9.99\r\n\
               2024-01-02,\"Two\r\nlines, and \"\"quotes\"\"\",1,5\r\n\
               2024-01-03,Crème brûlée 東京,2,\r\n";
    let (status, body) = producer.upload(csv).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["job_type"], "default");
    assert_eq!(body["queue"], "tasks");
    assert_eq!(body["rows"], 3);
    let batch = body["batch_id"].as_str().unwrap().to_string();

    let rows = producer.drain("tasks").await;
    let headers = strs(&["Date", "Item Description", "Quantity", "Amount"]);
    let expected = [
        (2, strs(&["2024-01-01", "Widget, large", "3", "9.99"])),
        (
            3,
            strs(&["2024-01-02", "Two\r\nlines, and \"quotes\"", "1", "5"]),
        ),
        (5, strs(&["2024-01-03", "Crème brûlée 東京", "2", ""])),
    ];
    assert_eq!(rows.len(), expected.len());
    for (i, ((id, mode, row), (line, fields))) in rows.iter().zip(expected).enumerate() {
        assert_eq!(row.batch_id, batch);
        assert_eq!(row.job_type, "default");
        assert_eq!(row.headers, headers);
        assert_eq!(row.fields, fields);
        assert_eq!(row.line, line);
        assert_eq!(row.row, i as u64 + 1);
        assert_eq!(id.as_deref(), Some(format!("{batch}:{line}").as_str()));
        assert_eq!(*mode, Some(2), "persistent");
    }
}

#[tokio::test]
async fn a_file_larger_than_one_chunk_arrives_whole() {
    let producer = TestProducer::start("large", &[]).await;
    let mut csv = String::from("n,text\n");
    for n in 1..=20_000 {
        csv.push_str(&format!("{n},\"row {n}, with a comma\"\n"));
    }
    let (status, body) = producer.upload(csv).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["rows"], 20_000);
    let rows = producer.drain("tasks").await;
    assert_eq!(rows.len(), 20_000);
    for (i, (_, _, row)) in rows.iter().enumerate() {
        let n = i + 1;
        assert_eq!(
            row.fields,
            [n.to_string(), format!("row {n}, with a comma")]
        );
    }
}

#[tokio::test]
async fn concurrent_uploads_all_land_with_distinct_batch_ids() {
    // Eight at once from this one client: more than it may have by default.
    let producer = TestProducer::start("concurrent", &["--max-uploads-per-client", "8"]).await;
    let uploads = (0..8).map(|u| {
        let mut csv = String::from("upload,n\n");
        for n in 0..500 {
            csv.push_str(&format!("{u},{n}\n"));
        }
        producer.upload(csv)
    });
    let answers = futures_util::future::join_all(uploads).await;
    let mut batch_ids = std::collections::HashSet::new();
    for (status, body) in &answers {
        assert_eq!(*status, StatusCode::OK, "{body}");
        assert_eq!(body["rows"], 500);
        batch_ids.insert(body["batch_id"].as_str().unwrap().to_string());
    }
    assert_eq!(batch_ids.len(), 8, "batch ids are distinct");

    let rows = producer.drain("tasks").await;
    assert_eq!(rows.len(), 4000);
    let ids: std::collections::HashSet<_> = rows.iter().map(|(id, _, _)| id.clone()).collect();
    assert_eq!(ids.len(), 4000, "every row has its own message id");
    for batch in &batch_ids {
        let (status, view) = producer.get(&format!("/batches/{batch}")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            (view["published"].as_u64(), view["state"].as_str()),
            (Some(500), Some("queued")),
            "{view}"
        );
    }
}

#[tokio::test]
async fn job_types_route_to_their_own_queues() {
    let config = std::env::temp_dir().join(format!("spillway-jobs-{}.toml", std::process::id()));
    std::fs::write(
        &config,
        "[job_types.default]\nqueue = \"tasks\"\n[job_types.resize]\nqueue = \"images\"\nhandler = \"exec\"\ncommand = [\"true\"]\n",
    )
    .unwrap();
    let producer =
        TestProducer::start("jobtypes", &["--jobs-config", config.to_str().unwrap()]).await;
    let (status, body) = producer
        .upload_to("/submit/resize", "path\na.png\nb.png\n")
        .await;
    std::fs::remove_file(&config).unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["job_type"].as_str(), body["queue"].as_str()),
        (Some("resize"), Some("images"))
    );
    assert_eq!(producer.depth("images").await, Some(2));
    assert_eq!(producer.depth("tasks").await, None);
    let rows = producer.drain("images").await;
    assert!(rows.iter().all(|(_, _, row)| row.job_type == "resize"));
}

#[tokio::test]
async fn an_unreachable_broker_is_a_503_and_the_producer_stays_healthy() {
    let vhost = spillway_testkit::TestVhost::new("down").await;
    // Port 9 (discard) has no broker listening.
    let producer = TestProducer::start_with_url(
        vhost,
        Some("amqp://guest:secret@127.0.0.1:9/%2f"),
        &["--broker-retry-seconds", "0"],
    )
    .await;
    let (status, body) = producer.upload("a,b\n1,2\n").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("RabbitMQ is unavailable at amqp://127.0.0.1:9/%2f"),
        "{error}"
    );
    assert!(!error.contains("secret"), "no password in errors: {error}");

    // Validation still comes first: bad input is the client's problem even then.
    assert_eq!(producer.upload("a,b\n1\n").await.0, StatusCode::BAD_REQUEST);
    assert_eq!(producer.get("/healthz").await.0, StatusCode::OK);
    let (status, body): (StatusCode, Value) = producer.get("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(
        producer.get("/batches/unknown").await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn the_sample_generator_output_uploads_cleanly() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/generate_data.py");
    let output = std::process::Command::new("python3")
        .args([script, "--rows", "1000", "--out", "-"])
        .output()
        .expect("python3 runs data/generate_data.py");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let producer = TestProducer::start("generated", &[]).await;
    let (status, body) = producer.upload(output.stdout).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["rows"], 1000);
    let rows = producer.drain("tasks").await;
    assert_eq!(rows.len(), 1000);
    assert_eq!(
        rows[0].2.headers,
        strs(&["Date", "Item Description", "Quantity", "Amount"])
    );
    assert!(
        rows.iter().any(|(_, _, row)| row.fields[1].contains(',')),
        "quoted commas survive"
    );
}

#[tokio::test]
async fn a_queue_declared_with_other_arguments_is_a_clear_500_not_a_503() {
    let producer = TestProducer::start("mismatch", &[]).await;
    let (_connection, channel) = producer.channel().await;
    // A classic queue named like the job type's, left by something else.
    channel
        .queue_declare(
            "tasks".into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let (status, body) = producer.upload("a\n1\n").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("cannot declare queue \"tasks\""), "{error}");
    assert_eq!(producer.depth("tasks").await, Some(0), "nothing published");
}

#[tokio::test]
async fn every_change_of_a_batch_state_is_announced_on_the_events_exchange() {
    let producer = TestProducer::start("announce", &[]).await;
    let mut announcements = EventListener::start(&producer.vhost, &["batch.#"]).await;
    let (status, body) = producer.upload("a\n1\n2\n").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let batch_id = body["batch_id"].as_str().unwrap();
    let mut heard = Vec::new();
    for _ in 0..2 {
        let (routing_key, batch): (_, BatchStateChanged) = announcements
            .next(std::time::Duration::from_secs(10))
            .await
            .expect("an announcement within 10 s");
        assert_eq!(batch.batch_id, batch_id);
        assert_eq!(batch.rows, 2);
        assert_eq!(
            batch.results_url,
            format!("{}/batches/{batch_id}/results", producer.base_url)
        );
        heard.push((routing_key, batch.state, batch.published));
    }
    assert_eq!(
        heard,
        [
            (
                "batch.default.publishing".to_string(),
                "publishing".to_string(),
                0
            ),
            ("batch.default.queued".to_string(), "queued".to_string(), 2),
        ]
    );
}
