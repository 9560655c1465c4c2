//! Listening to Spillway's events exchange from a test: worker reports and batch
//! announcements, as the scaler hears them.
//!
//! A test that waits for an event rather than for time passing does not depend on the
//! machine's speed: "a worker reported rows in hand" is true on a slow machine and a
//! fast one alike.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::{Connection, Consumer};
use serde::de::DeserializeOwned;
use spillway_common::events::{self, EVENTS_EXCHANGE};

use crate::TestVhost;

/// A subscription to the events exchange of a vhost, on a connection of its own.
pub struct EventListener {
    // Kept open: the subscription's queue lives as long as the connection.
    _connection: Connection,
    consumer: Consumer,
}

impl EventListener {
    /// Listens to the events of `vhost` whose routing key matches one of
    /// `routing_keys` (`worker.#`, `batch.default`, ...), from now on.
    pub async fn start(vhost: &TestVhost, routing_keys: &[&str]) -> Self {
        let connection = vhost.connect().await;
        let channel = connection.create_channel().await.expect("a channel");
        events::declare_exchanges(&channel)
            .await
            .expect("declare the events exchange");
        let consumer = events::subscribe(&channel, EVENTS_EXCHANGE, routing_keys, "test-events")
            .await
            .expect("subscribe to the events exchange");
        EventListener {
            _connection: connection,
            consumer,
        }
    }

    /// The next event and its routing key, or `None` when none comes within `timeout`.
    /// Panics on a body that is not a `T`.
    pub async fn next<T: DeserializeOwned>(&mut self, timeout: Duration) -> Option<(String, T)> {
        let delivery = tokio::time::timeout(timeout, self.consumer.next())
            .await
            .ok()?
            .expect("the event subscription stays open")
            .expect("an event delivery");
        let event = serde_json::from_slice(&delivery.data).unwrap_or_else(|e| {
            panic!(
                "event {} is not what the test expects: {e}: {}",
                delivery.routing_key,
                String::from_utf8_lossy(&delivery.data)
            )
        });
        Some((delivery.routing_key.to_string(), event))
    }

    /// Takes events until `done` holds for one, or panics after `timeout` naming `what`;
    /// returns that event.
    pub async fn wait_for<T: DeserializeOwned>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&T) -> bool,
    ) -> T {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next::<T>(left).await {
                Some((_, event)) if done(&event) => return event,
                Some(_) => {}
                None => panic!("timed out after {timeout:?} waiting for {what}"),
            }
        }
    }
}
