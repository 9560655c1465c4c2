//! The broker alone: a bare lapin publisher and a bare lapin consumer, the baseline of
//! every throughput figure.
//!
//! They put on the wire what Spillway's producer and worker put there (the same
//! message bodies and properties, publisher confirms, manual acks) on the same kind of
//! queue, a quorum work queue declared by [`spillway_common::topology`] with the job type's
//! arguments, and do nothing else. A ratio near 1 means Spillway adds little on top of
//! what RabbitMQ itself takes.

use std::{
    collections::VecDeque,
    path::Path,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use lapin::{
    Channel, Connection, ConnectionProperties,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueDeclareOptions,
    },
    types::FieldTable,
};

use spillway_common::{
    envelope::{RowMessage, RowMessageRef, message_id, row_properties},
    jobs_config::JobType,
    topology,
};

/// Publisher confirms in flight: the producer's default `PUBLISH_WINDOW`.
pub const CONFIRM_WINDOW: usize = 2000;

/// One row message as it goes on the wire.
pub struct Row {
    pub message_id: String,
    pub body: Vec<u8>,
}

/// A message for each data row of `csv`, encoded as the producer encodes it. The file is
/// parsed here, before any timing starts.
pub fn csv_rows(csv: &Path, batch_id: &str, job_type: &str) -> Vec<Row> {
    let mut reader = csv::Reader::from_path(csv)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", csv.display()));
    let headers: Vec<String> = reader
        .headers()
        .expect("a header line")
        .iter()
        .map(String::from)
        .collect();
    reader
        .records()
        .enumerate()
        .map(|(i, record)| {
            let record = record.expect("a well-formed row");
            // generate_data.py writes one line per row, after the header on line 1.
            let line = i as u64 + 2;
            let message = RowMessageRef {
                batch_id,
                job_type,
                line,
                row: i as u64 + 1,
                headers: &headers,
                fields: record.iter().collect::<Vec<_>>(),
            };
            Row {
                message_id: message_id(batch_id, line),
                body: serde_json::to_vec(&message).expect("a row serialises"),
            }
        })
        .collect()
}

/// The columns of [`sample_rows`].
pub const SAMPLE_HEADER: [&str; 4] = ["Date", "Item Description", "Quantity", "Amount"];
/// The fields of every one of [`sample_rows`].
pub const SAMPLE_FIELDS: [&str; 4] = ["2024-01-13", "Desk lamp", "4", "119.06"];

/// `rows` copies of one four-field row message ([`SAMPLE_HEADER`], [`SAMPLE_FIELDS`]),
/// numbered as lines 1..=rows.
pub fn sample_rows(rows: u64, batch_id: &str, job_type: &str) -> Vec<Row> {
    (1..=rows)
        .map(|line| {
            let row = RowMessage {
                batch_id: batch_id.into(),
                job_type: job_type.into(),
                line,
                row: line,
                headers: SAMPLE_HEADER.map(String::from).into(),
                fields: SAMPLE_FIELDS.map(String::from).into(),
            };
            Row {
                message_id: row.message_id(),
                body: serde_json::to_vec(&row).expect("a row serialises"),
            }
        })
        .collect()
}

/// A connection to `amqp_url` and a channel on which `job`'s work queue is declared as
/// every Spillway process declares it.
pub async fn work_queue_channel(amqp_url: &str, job: &JobType) -> (Connection, Channel) {
    let connection = Connection::connect(amqp_url, ConnectionProperties::default())
        .await
        .expect("connect to the benchmark's vhost");
    let channel = connection.create_channel().await.expect("a channel");
    topology::declare_work_queue(&channel, &job.queue, job.delivery_limit)
        .await
        .expect("declare the work queue");
    (connection, channel)
}

/// Publishes `rows` to `queue` with [`CONFIRM_WINDOW`] confirms in flight, and returns
/// the time from the first publish to the last confirm.
pub async fn publish_confirmed(channel: &Channel, queue: &str, rows: &[Row]) -> Duration {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("publisher confirms");
    let started = Instant::now();
    let mut pending = VecDeque::with_capacity(CONFIRM_WINDOW);
    for row in rows {
        if pending.len() == CONFIRM_WINDOW {
            let confirm: lapin::PublisherConfirm = pending.pop_front().expect("a confirm");
            assert!(confirm.await.expect("a confirm").is_ack(), "a nack");
        }
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &row.body,
                row_properties(&row.message_id),
            )
            .await
            .expect("publish");
        pending.push_back(confirm);
    }
    for confirm in pending {
        assert!(confirm.await.expect("a confirm").is_ack(), "a nack");
    }
    started.elapsed()
}

/// Takes `rows` row messages from `queue` at `prefetch` on a connection of its own,
/// decoding and acking each (an ack is not waited for before the next delivery), and
/// returns the time from connecting until every ack is sent.
pub async fn consume_acked(amqp_url: &str, queue: &str, rows: u64, prefetch: u16) -> Duration {
    let started = Instant::now();
    let connection = Connection::connect(amqp_url, ConnectionProperties::default())
        .await
        .expect("connect to the benchmark's vhost");
    let channel = connection.create_channel().await.expect("a channel");
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .expect("set the prefetch");
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "bare".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    // An ack resolves once lapin's I/O loop has written it: awaiting each one before
    // taking the next delivery would time that round trip rather than the broker. Each
    // ack is sent from a task of its own instead, as the worker settles each row.
    let mut acks = Vec::with_capacity(rows as usize);
    for _ in 0..rows {
        let delivery = consumer
            .next()
            .await
            .expect("the consumer stays open")
            .expect("a delivery");
        let _: RowMessage = serde_json::from_slice(&delivery.data).expect("a row message");
        acks.push(tokio::spawn(async move {
            delivery.ack(BasicAckOptions::default()).await
        }));
    }
    for ack in acks {
        assert!(ack.await.expect("the ack task").expect("ack"), "acked once");
    }
    let elapsed = started.elapsed();
    connection
        .close(200, "done".into())
        .await
        .expect("close the connection");
    elapsed
}

/// What the broker says of a queue right now (the management API's figures are sampled
/// every few seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueCounts {
    /// Messages ready for delivery; unacknowledged ones are not counted.
    pub ready: u32,
    pub consumers: u32,
}

impl QueueCounts {
    /// Whether every message has been delivered to a consumer that is still there.
    ///
    /// A passive declare of a quorum queue that times out inside RabbitMQ is answered
    /// with zero messages and zero consumers, which a loaded machine does produce; with
    /// the consumers still attached, a real answer counts at least one.
    pub fn drained_by_consumers(self) -> bool {
        self.ready == 0 && self.consumers > 0
    }
}

/// Counts of `queue` now, from a passive declare.
pub async fn queue_counts(channel: &Channel, queue: &str) -> QueueCounts {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let answer = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .expect("the work queue exists");
    QueueCounts {
        ready: answer.message_count(),
        consumers: answer.consumer_count(),
    }
}
