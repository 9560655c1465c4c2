//! Drain requests over RabbitMQ.
//!
//! The scaler asks a worker to stop by publishing any message to the
//! `spillway.control` topic exchange with routing key `drain.<worker name>`. Each
//! worker listens on an exclusive, server-named queue bound to its own key, so the
//! request reaches exactly that worker, and the queue disappears with the worker. A
//! drain request has the same effect as SIGTERM: take no new rows, finish and ack the
//! ones in hand, exit 0.

use lapin::{
    Channel, Consumer,
    options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
};
use spillway_common::events::{CONTROL_EXCHANGE, drain_routing_key};

/// Consumes this worker's drain requests (auto-acked: a request is idempotent).
pub async fn listen(channel: &Channel, worker: &str) -> Result<Consumer, lapin::Error> {
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            CONTROL_EXCHANGE.into(),
            drain_routing_key(worker).as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .basic_consume(
            queue.name().clone(),
            format!("{worker}-control").as_str().into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
}
