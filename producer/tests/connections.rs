//! The producer's connection limits, through real sockets: a client that sends no
//! request head, or only part of one, within `REQUEST_HEADER_TIMEOUT_SECONDS` is cut
//! off; one client holds at most `MAX_UPLOADS_PER_CLIENT` uploads at once, and the
//! next gets 429 until one ends.

mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use reqwest::StatusCode;
use support::TestProducer;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};

/// Reads until the producer closes the connection; how long that took.
async fn closed_after(mut stream: TcpStream) -> Duration {
    let started = Instant::now();
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut sink))
        .await
        .expect("the producer closes a connection whose head does not come")
        .ok();
    started.elapsed()
}

#[tokio::test]
async fn a_connection_that_sends_no_request_head_in_time_is_closed() {
    let producer =
        TestProducer::start("head-timeout", &["--request-header-timeout-seconds", "1"]).await;
    let address = producer.base_url.trim_start_matches("http://").to_string();

    // Nothing at all; one byte; half a request head: each closed once the second the
    // setting gives is up, not before.
    let heads: [&[u8]; 3] = [b"", b"P", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"];
    for head in heads {
        let mut stream = TcpStream::connect(&address).await.unwrap();
        stream.write_all(head).await.unwrap();
        let after = closed_after(stream).await;
        assert!(
            after >= Duration::from_millis(900) && after < Duration::from_secs(10),
            "{:?} closed after {after:?}",
            String::from_utf8_lossy(head)
        );
    }

    // A whole request is answered, and the server is still serving.
    let answer = producer
        .client
        .get(format!("{}/healthz", producer.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
}

/// A multipart upload whose file part never ends until `release` is sent a value:
/// the producer holds it as an upload in progress meanwhile.
fn held_upload(
    producer: &TestProducer,
) -> (
    mpsc::Sender<()>,
    tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>,
) {
    let (release, mut released) = mpsc::channel::<()>(1);
    let head = "--X\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.csv\"\r\nContent-Type: text/csv\r\n\r\nid,value\r\n1,a\r\n";
    let body = async_stream_body(head, async move {
        released.recv().await;
    });
    let request = producer
        .client
        .post(format!("{}/upload", producer.base_url))
        .header("content-type", "multipart/form-data; boundary=X")
        .body(body)
        .send();
    (release, tokio::spawn(request))
}

/// `head`, then (once `wait` completes) the rest of a one-part multipart body.
fn async_stream_body(
    head: &'static str,
    wait: impl std::future::Future<Output = ()> + Send + 'static,
) -> reqwest::Body {
    let parts = futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(head))])
        .chain(futures_util::stream::once(async move {
            wait.await;
            Ok(bytes::Bytes::from_static(b"2,b\r\n--X--\r\n"))
        }));
    reqwest::Body::wrap_stream(parts)
}

#[tokio::test]
async fn one_client_holds_at_most_its_share_of_uploads_and_the_next_is_told_to_wait() {
    let producer = TestProducer::start("upload-cap", &["--max-uploads-per-client", "2"]).await;
    let (first, first_answer) = held_upload(&producer);
    let (second, second_answer) = held_upload(&producer);
    // Both are being read once the producer counts them.
    let metrics_url = format!("{}/metrics", producer.base_url);
    // Each is counted once the producer reads it: until then a third one could pass.
    spillway_testkit::wait_for(
        "two uploads in progress",
        Duration::from_secs(10),
        || async {
            let metrics = reqwest::get(&metrics_url)
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            metrics.contains("uploads_in_progress 2")
        },
    )
    .await;
    let refused = producer
        .client
        .post(format!("{}/upload", producer.base_url))
        .multipart(reqwest::multipart::Form::new().part(
            "file",
            reqwest::multipart::Part::bytes(b"id\n1\n".to_vec()).file_name("d.csv"),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.headers()["retry-after"], "1");
    let (status, body) = producer.upload(b"id\n1\n".to_vec()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("2 uploads"),
        "{body}"
    );
    let metrics = reqwest::get(&metrics_url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("reason=\"too_many_uploads\""), "{metrics}");

    first.send(()).await.unwrap();
    let answer = first_answer.await.unwrap().unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    let (status, body) = producer.upload(b"id\n1\n".to_vec()).await;
    assert_eq!(status, StatusCode::OK, "a slot is free again: {body}");
    second.send(()).await.unwrap();
    assert_eq!(
        second_answer.await.unwrap().unwrap().status(),
        StatusCode::OK
    );
}
