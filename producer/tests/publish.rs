//! Publishing through a real RabbitMQ: a work queue deleted while its batch is
//! published fails the publication within a hundred rows, naming the first row
//! RabbitMQ could not route, instead of RabbitMQ confirming rows it sent nowhere.

use std::sync::atomic::{AtomicU64, Ordering};

use lapin::{
    Channel, Connection, ConnectionProperties,
    options::{ConfirmSelectOptions, QueueDeleteOptions},
};
use spillway_common::topology;
use spillway_producer::ingest::publish::{PublishError, RowSource, publish};
use spillway_testkit::TestVhost;

const QUEUE: &str = "doomed";
const ROWS: u64 = 1_000;
/// The queue is deleted once this many rows are sent.
const DELETED_AFTER: u64 = 250;

/// `ROWS` rows on lines 1, 2, ..., deleting the queue once `DELETED_AFTER` are sent.
struct Rows {
    sent: u64,
    admin: Channel,
}

impl RowSource for Rows {
    async fn next_into(&mut self, body: &mut Vec<u8>) -> std::io::Result<Option<u64>> {
        if self.sent == DELETED_AFTER {
            self.admin
                .queue_delete(QUEUE.into(), QueueDeleteOptions::default())
                .await
                .expect("delete the work queue");
        }
        if self.sent == ROWS {
            return Ok(None);
        }
        self.sent += 1;
        body.clear();
        body.extend_from_slice(format!("{{\"row\":{}}}", self.sent).as_bytes());
        Ok(Some(self.sent))
    }
}

#[tokio::test]
async fn a_queue_deleted_while_its_rows_are_published_fails_the_publication() {
    let vhost = TestVhost::new("publish-deleted-queue").await;
    let connection = Connection::connect(&vhost.amqp_url, ConnectionProperties::default())
        .await
        .expect("connect to the test's vhost");
    let channel = connection.create_channel().await.expect("a channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("publisher confirms");
    topology::declare_work_queue(&channel, QUEUE, 5)
        .await
        .expect("declare the work queue");
    let rows = Rows {
        sent: 0,
        admin: connection.create_channel().await.expect("a channel"),
    };

    let confirmed = AtomicU64::new(0);
    let error = publish(rows, &channel, "b", QUEUE, 20, &confirmed)
        .await
        .expect_err("rows sent to a deleted queue are refused");
    let text = error.to_string();
    let PublishError::Unroutable { line, published } = error else {
        panic!("expected an unroutable row, got {text}");
    };
    assert!(
        line > DELETED_AFTER && line <= DELETED_AFTER + 100,
        "noticed on line {line}, more than 100 rows after the queue was deleted after line \
         {DELETED_AFTER}"
    );
    assert_eq!(published, confirmed.load(Ordering::Relaxed));
    assert!(
        published < line,
        "{published} rows confirmed before line {line}"
    );
    assert!(
        text.contains("work queue is gone") && text.contains(&format!("line {line}")),
        "{text}"
    );
}
