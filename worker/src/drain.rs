//! Drain requests over RabbitMQ.
//!
//! The scaler asks a worker to stop by publishing any message to the
//! `spillway.control` topic exchange with routing key `drain.<worker name>`. Each
//! worker listens on an exclusive, server-named queue bound to its own key, so the
//! request reaches exactly that worker, and the queue disappears with the worker. A
//! drain request has the same effect as SIGTERM: take no new rows, finish and ack the
//! ones in hand, exit 0.

use lapin::{Channel, Consumer};
use spillway_common::events::{CONTROL_EXCHANGE, drain_routing_key, subscribe};

/// Consumes this worker's drain requests (auto-acked: a request is idempotent).
pub async fn listen(channel: &Channel, worker: &str) -> Result<Consumer, lapin::Error> {
    subscribe(
        channel,
        CONTROL_EXCHANGE,
        &[&drain_routing_key(worker)],
        &format!("{worker}-control"),
    )
    .await
}
