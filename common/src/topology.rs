//! The AMQP objects a job type needs, declared the same way by every process.
//!
//! A work queue is a durable quorum queue with a delivery limit, so a row that keeps
//! failing stops being redelivered, and an at-least-once dead-letter route, so such a
//! row lands in `<queue>.dead` instead of vanishing. RabbitMQ 3.x has no default
//! delivery limit (4.0 made it 20), so it is always set explicitly. Declaring is
//! idempotent: whichever process starts first creates the objects, and the others find
//! them in place.

use lapin::{
    Channel, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, ShortString},
};

/// The direct exchange every work queue dead-letters into.
pub const DEAD_LETTER_EXCHANGE: &str = "spillway.dead-letter";

/// Name of the queue that keeps a work queue's dead rows.
pub fn dead_queue_name(queue: &str) -> String {
    format!("{queue}.dead")
}

/// Arguments of a work queue. Changing any of them for an existing queue makes
/// RabbitMQ refuse the declaration (PRECONDITION_FAILED), so they live in one place.
pub fn work_queue_arguments(queue: &str, delivery_limit: u32) -> FieldTable {
    let mut args = FieldTable::default();
    let mut put = |key: &str, value: AMQPValue| {
        args.insert(ShortString::from(key), value);
    };
    put("x-queue-type", AMQPValue::LongString("quorum".into()));
    put(
        "x-delivery-limit",
        AMQPValue::LongLongInt(delivery_limit.into()),
    );
    put(
        "x-dead-letter-exchange",
        AMQPValue::LongString(DEAD_LETTER_EXCHANGE.into()),
    );
    put(
        "x-dead-letter-routing-key",
        AMQPValue::LongString(dead_queue_name(queue).as_str().into()),
    );
    // The default strategy (at-most-once) may drop a dead-lettered row if the dead
    // queue is unavailable; at-least-once requires reject-publish overflow.
    put(
        "x-dead-letter-strategy",
        AMQPValue::LongString("at-least-once".into()),
    );
    put("x-overflow", AMQPValue::LongString("reject-publish".into()));
    args
}

/// Declares the dead-letter exchange, `<queue>.dead` and the work queue itself.
pub async fn declare_work_queue(
    channel: &Channel,
    queue: &str,
    delivery_limit: u32,
) -> Result<(), lapin::Error> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );

    channel
        .exchange_declare(
            DEAD_LETTER_EXCHANGE.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let dead = dead_queue_name(queue);
    channel
        .queue_declare(dead.as_str().into(), durable, quorum)
        .await?;
    channel
        .queue_bind(
            dead.as_str().into(),
            DEAD_LETTER_EXCHANGE.into(),
            dead.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            queue.into(),
            durable,
            work_queue_arguments(queue, delivery_limit),
        )
        .await?;
    Ok(())
}
