//! Completion callbacks against a real receiver over HTTP, a real RabbitMQ and a real
//! PostgreSQL: a receiver that fails twice and then accepts gets exactly one accepted
//! delivery, signed; one that never accepts is given up on, visibly on the batch; a
//! restarted producer does not deliver again what was delivered; a bad callback URL
//! refuses the upload and publishes nothing.

mod support;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    http::{HeaderMap, StatusCode as AxumStatus},
    routing::post,
};
use reqwest::{StatusCode, multipart};
use serde_json::Value;
use spillway_ledger::Ledger;
use spillway_producer::outbox::{DELIVERY_HEADER, SIGNATURE_HEADER, sign};
use spillway_testkit::{TestDatabase, TestVhost};
use support::TestProducer;

const SECRET: &str = "test-callback-secret";
const PATIENCE: Duration = Duration::from_secs(30);

/// One request the receiver got: its delivery id, signature and body.
#[derive(Debug, Clone)]
struct Received {
    delivery: String,
    signature: String,
    body: Bytes,
}

/// An HTTP receiver that fails its first `failures` requests with 503 and accepts the
/// rest, recording every one.
struct Receiver {
    url: String,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    async fn start(failures: usize) -> Self {
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let log = Arc::clone(&received);
        let app = Router::new().route(
            "/hook",
            post(move |headers: HeaderMap, body: Bytes| {
                let log = Arc::clone(&log);
                async move {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string()
                    };
                    let mut log = log.lock().unwrap();
                    log.push(Received {
                        delivery: header(DELIVERY_HEADER),
                        signature: header(SIGNATURE_HEADER),
                        body,
                    });
                    if log.len() <= failures {
                        AxumStatus::SERVICE_UNAVAILABLE
                    } else {
                        AxumStatus::OK
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { url, received }
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

/// Uploads a small CSV with `callback_url` after the file (or before it).
async fn upload(producer: &TestProducer, callback_url: &str, first: bool) -> (StatusCode, Value) {
    let file = || {
        multipart::Part::bytes(b"n\n1\n2\n3\n".to_vec())
            .file_name("data.csv")
            .mime_str("text/csv")
            .unwrap()
    };
    let form = if first {
        multipart::Form::new()
            .text("callback_url", callback_url.to_string())
            .part("file", file())
    } else {
        multipart::Form::new()
            .part("file", file())
            .text("callback_url", callback_url.to_string())
    };
    let response = producer
        .client
        .post(format!("{}/upload", producer.base_url))
        .multipart(form)
        .send()
        .await
        .expect("producer answers");
    TestProducer::decode(response).await
}

async fn cancel(producer: &TestProducer, id: &str) {
    let response = producer
        .client
        .post(format!("{}/batches/{id}/cancel", producer.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

/// The batch's callback delivery as the batches API shows it, once it has ended.
async fn ended_callback(producer: &TestProducer, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, view) = producer.get(&format!("/batches/{id}")).await;
        if view["callback"]["ended_at"].is_string() {
            return view["callback"].clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the callback of {id} neither delivered nor given up within {PATIENCE:?}: {view}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_receiver_failing_twice_gets_one_accepted_signed_delivery_and_never_another() {
    let db = TestDatabase::new("callbacks").await;
    let vhost = TestVhost::new("callbacks").await;
    let args = ["--database-url", &db.url, "--callback-secret", SECRET];
    let producer = TestProducer::start_with_url(vhost, None, &args).await;
    let receiver = Receiver::start(2).await;

    let (status, body) = upload(&producer, &receiver.url, false).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let id = body["batch_id"].as_str().unwrap().to_string();
    cancel(&producer, &id).await;

    let callback = ended_callback(&producer, &id).await;
    assert_eq!(callback["status"], "delivered", "{callback}");
    assert_eq!(callback["attempts"], 3, "{callback}");
    let received = receiver.received();
    assert_eq!(received.len(), 3, "two refused, one accepted");
    for request in &received {
        assert_eq!(request.delivery, received[0].delivery, "one delivery id");
        assert_eq!(request.signature, sign(SECRET.as_bytes(), &request.body));
    }
    let summary: Value = serde_json::from_slice(&received[2].body).unwrap();
    assert_eq!(summary["batch_id"], id.as_str());
    assert_eq!(summary["state"], "cancelled");
    assert_eq!(
        (&summary["rows"], &summary["cancelled"]),
        (&3.into(), &3.into())
    );
    assert_eq!(
        summary["results_url"],
        format!("{}/batches/{id}/results", producer.base_url)
    );

    // A producer started afresh on the same ledger delivers the next batch's callback
    // (in order, after any due before it) and never the first one's again.
    let mut producer = producer;
    producer.restart(&args).await;
    let (status, body) = upload(&producer, &receiver.url, true).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let second = body["batch_id"].as_str().unwrap().to_string();
    cancel(&producer, &second).await;
    let callback = ended_callback(&producer, &second).await;
    assert_eq!(callback["status"], "delivered", "{callback}");
    let batches: Vec<String> = receiver
        .received()
        .iter()
        .map(|r| serde_json::from_slice::<Value>(&r.body).unwrap()["batch_id"].to_string())
        .collect();
    assert_eq!(
        batches,
        [&id, &id, &id, &second].map(|b| format!("{b:?}")),
        "each accepted once"
    );
}

#[tokio::test]
async fn a_receiver_that_never_accepts_is_given_up_on_visibly() {
    let db = TestDatabase::new("callbacks-give-up").await;
    let vhost = TestVhost::new("callbacks-give-up").await;
    let args = [
        "--database-url",
        &db.url,
        "--callback-secret",
        SECRET,
        "--callback-give-up-seconds",
        "3",
    ];
    let producer = TestProducer::start_with_url(vhost, None, &args).await;
    let receiver = Receiver::start(usize::MAX).await;
    let (status, body) = upload(&producer, &receiver.url, true).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let id = body["batch_id"].as_str().unwrap();
    cancel(&producer, id).await;

    let callback = ended_callback(&producer, id).await;
    assert_eq!(callback["status"], "given_up", "{callback}");
    let error = callback["error"].as_str().unwrap();
    assert!(error.contains("503"), "{error}");
    assert!(error.contains("CALLBACK_GIVE_UP_SECONDS=3"), "{error}");
    assert!(!receiver.received().is_empty(), "it was tried");
    let ledger = Ledger::open(&db.url, 1).unwrap();
    let batch = ledger.batch(id).await.unwrap().unwrap();
    assert_eq!(batch.callback_url.as_deref(), Some(receiver.url.as_str()));
}

#[tokio::test]
async fn a_bad_callback_url_refuses_the_upload_and_publishes_nothing() {
    let db = TestDatabase::new("callbacks-bad").await;
    let vhost = TestVhost::new("callbacks-bad").await;
    let with_secret = ["--database-url", &db.url, "--callback-secret", SECRET];
    let producer = TestProducer::start_with_url(vhost, None, &with_secret).await;
    for first in [true, false] {
        let (status, body) = upload(&producer, "ftp://example.com/hook", first).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("http://"),
            "{body}"
        );
    }
    assert_eq!(
        producer.depth("tasks").await.unwrap_or(0),
        0,
        "nothing published"
    );
    // The refusal that came after the file left its batch failed, with the reason.
    let (_, listed) = producer.get("/batches?state=failed").await;
    let failed = listed["batches"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{listed}");
    assert!(
        failed[0]["error"]
            .as_str()
            .unwrap()
            .contains("callback_url")
    );

    let mut producer = producer;
    producer.restart(&["--database-url", &db.url]).await;
    let (status, body) = upload(&producer, "https://example.com/hook", true).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("CALLBACK_SECRET"),
        "{body}"
    );
}
