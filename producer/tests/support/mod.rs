//! A producer running in-process against its own vhost on the real broker, and the
//! client calls the tests make to it.

// Each test binary that includes this module uses a part of it.
#![allow(dead_code)]

use std::time::Duration;

use futures_util::StreamExt;

use lapin::{
    Channel, Connection,
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
use reqwest::{StatusCode, multipart};
use serde_json::Value;
use spillway_common::envelope::RowMessage;
use spillway_testkit::TestVhost;
use tokio_util::sync::CancellationToken;

pub struct TestProducer {
    pub base_url: String,
    pub client: reqwest::Client,
    pub vhost: TestVhost,
    stop: CancellationToken,
}

impl TestProducer {
    /// A producer on an ephemeral port with its own vhost; `args` are extra flags.
    pub async fn start(label: &str, args: &[&str]) -> Self {
        let vhost = TestVhost::new(label).await;
        Self::start_with_url(vhost, None, args).await
    }

    /// Like [`start`](Self::start) but publishing to `amqp_url` instead of the vhost.
    pub async fn start_with_url(vhost: TestVhost, amqp_url: Option<&str>, args: &[&str]) -> Self {
        let amqp_url = amqp_url.unwrap_or(&vhost.amqp_url);
        let spillway_testkit::producer::Started {
            url: base_url,
            stop,
            ..
        } = spillway_testkit::producer::start(amqp_url, args).await;
        TestProducer {
            base_url,
            client: reqwest::Client::new(),
            vhost,
            stop,
        }
    }

    /// Stops this producer and starts another on the same vhost with `args`.
    pub async fn restart(&mut self, args: &[&str]) {
        self.stop.cancel();
        let started = spillway_testkit::producer::start(&self.vhost.amqp_url, args).await;
        self.base_url = started.url;
        self.stop = started.stop;
    }

    /// Uploads `csv` as the `file` field to `path`; returns the status and JSON body.
    pub async fn upload_to(&self, path: &str, csv: impl Into<Vec<u8>>) -> (StatusCode, Value) {
        let part = multipart::Part::bytes(csv.into())
            .file_name("data.csv")
            .mime_str("text/csv")
            .unwrap();
        let form = multipart::Form::new().part("file", part);
        let response = self
            .client
            .post(format!("{}{path}", self.base_url))
            .multipart(form)
            .send()
            .await
            .expect("producer answers");
        Self::decode(response).await
    }

    pub async fn upload(&self, csv: impl Into<Vec<u8>>) -> (StatusCode, Value) {
        self.upload_to("/upload", csv).await
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let response = self
            .client
            .get(format!("{}{path}", self.base_url))
            .send()
            .await
            .expect("producer answers");
        Self::decode(response).await
    }

    /// GETs `path` and returns its body as text, whatever its status.
    pub async fn text(&self, path: &str) -> String {
        self.client
            .get(format!("{}{path}", self.base_url))
            .send()
            .await
            .expect("producer answers")
            .text()
            .await
            .expect("a text body")
    }

    pub async fn decode(response: reqwest::Response) -> (StatusCode, Value) {
        let status = response.status();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{status}: body is not JSON: {text:?}"));
        (status, body)
    }

    pub async fn channel(&self) -> (Connection, Channel) {
        let connection = self.vhost.connect().await;
        let channel = connection.create_channel().await.unwrap();
        (connection, channel)
    }

    /// Ready messages in `queue`, or `None` when it does not exist.
    pub async fn depth(&self, queue: &str) -> Option<u32> {
        self.vhost.ready(queue).await
    }

    /// Takes (and acks) every message ready in `queue` now, in order.
    pub async fn drain(&self, queue: &str) -> Vec<(Option<String>, Option<u8>, RowMessage)> {
        let ready = self.depth(queue).await.expect("queue exists") as usize;
        let (_connection, channel) = self.channel().await;
        channel
            .basic_qos(500, BasicQosOptions::default())
            .await
            .unwrap();
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "test-drain".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("basic.consume");
        let mut rows = Vec::with_capacity(ready);
        while rows.len() < ready {
            let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "timed out after 30 s waiting for message {} of {ready}",
                        rows.len() + 1
                    )
                })
                .expect("consumer open")
                .expect("a delivery");
            let row: RowMessage = serde_json::from_slice(&delivery.data).expect("a row message");
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string());
            let mode = *delivery.properties.delivery_mode();
            delivery.ack(BasicAckOptions::default()).await.unwrap();
            rows.push((id, mode, row));
        }
        rows
    }
}

impl Drop for TestProducer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
