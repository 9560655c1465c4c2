//! The producer's one long-lived RabbitMQ connection.
//!
//! Opening a connection per upload would cost a TCP and AMQP handshake each time and
//! leave the broker with churn; instead one connection is shared, each upload gets a
//! cheap channel on it, and a lost connection is replaced on the next use, with
//! backoff for up to `BROKER_RETRY_SECONDS`. When the broker stays away, callers get
//! [`BrokerError`], which the HTTP layer answers with 503.

use std::{collections::HashSet, sync::Arc, time::Duration};

use lapin::{
    BasicProperties, Channel, Connection,
    options::{
        BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
        QueueDeclareOptions,
    },
    types::FieldTable,
};
use serde::Deserialize;
use spillway_common::{
    events::{self, EVENTS_EXCHANGE},
    retry, topology,
};
use tokio::sync::Mutex;

/// Why no publishing channel could be had.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker could not be reached: try again later (503).
    #[error("RabbitMQ is unavailable at {endpoint}: {reason}")]
    Unavailable { endpoint: String, reason: String },
    /// The queue exists with other arguments than the job type's (a changed
    /// `delivery_limit`, or a classic queue of the same name): an operator's fix (500).
    #[error(
        "cannot declare queue {queue:?} (does it exist with other arguments than the job-types file gives?): {reason}"
    )]
    Topology { queue: String, reason: String },
}

/// The part of a row message that names the row.
#[derive(Deserialize)]
struct RowKey {
    batch_id: String,
    line: u64,
}

pub struct Broker {
    amqp_url: String,
    /// `host:port/vhost` of `amqp_url`, without credentials, for messages.
    endpoint: String,
    retry_budget: Duration,
    connection: Mutex<Option<Arc<Connection>>>,
    /// Serialises queue declarations: a quorum queue declared by two channels at
    /// once can accept the second declaration before it can take messages.
    declaring: Mutex<()>,
}

impl Broker {
    pub fn new(amqp_url: &str, retry_budget: Duration) -> Self {
        Broker {
            amqp_url: amqp_url.to_string(),
            endpoint: without_credentials(amqp_url),
            retry_budget,
            connection: Mutex::new(None),
            declaring: Mutex::new(()),
        }
    }

    /// A channel with publisher confirms on, whose work queue `queue` is declared.
    pub async fn publishing_channel(
        &self,
        queue: &str,
        delivery_limit: u32,
    ) -> Result<Channel, BrokerError> {
        let channel = self.events_channel().await?;
        let _declaring = self.declaring.lock().await;
        topology::declare_work_queue(&channel, queue, delivery_limit)
            .await
            .map_err(|e| match e.kind() {
                lapin::ErrorKind::ProtocolError(amqp)
                    if matches!(
                        amqp.kind(),
                        lapin::protocol::AMQPErrorKind::Soft(
                            lapin::protocol::AMQPSoftError::PRECONDITIONFAILED
                        )
                    ) =>
                {
                    BrokerError::Topology {
                        queue: queue.to_string(),
                        reason: e.to_string(),
                    }
                }
                _ => self.unavailable(e),
            })?;
        Ok(channel)
    }

    /// A channel with publisher confirms on, whose exchanges (the events exchange's
    /// among them) are declared.
    pub async fn events_channel(&self) -> Result<Channel, BrokerError> {
        let connection = self.connection(self.retry_budget).await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| self.unavailable(e))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| self.unavailable(e))?;
        events::declare_exchanges(&channel)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(channel)
    }

    /// Announces `event` about `batch_id` on the events exchange with `routing_key`,
    /// for the scaler. Best effort: the batch's rows are safe whether or not it
    /// arrives.
    pub async fn announce(
        channel: &Channel,
        routing_key: &str,
        batch_id: &str,
        event: &impl serde::Serialize,
    ) {
        let body = serde_json::to_vec(event).expect("an event serialises");
        let sent = channel
            .basic_publish(
                EVENTS_EXCHANGE.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_content_type("application/json".into()),
            )
            .await;
        if let Err(error) = sent {
            tracing::warn!(%batch_id, %error, routing_key, "cannot announce the batch");
        }
    }

    /// Removes from `queue`'s dead queue the copies of `batch_id`'s rows at `lines`
    /// (rows a retry set back to pending), and keeps every other message: each one
    /// taken is either dropped (a retried row) or published to the dead queue's end
    /// with a confirm before it is acked. Only the messages there when it starts are
    /// looked at. Returns how many copies it removed.
    ///
    /// Interrupted, it loses nothing: a message kept may be in the dead queue twice,
    /// once more than before, if the process dies between the confirm of its copy and
    /// the ack of the original.
    pub async fn remove_dead_copies(
        &self,
        queue: &str,
        delivery_limit: u32,
        batch_id: &str,
        lines: &HashSet<u64>,
    ) -> Result<u64, BrokerError> {
        let channel = self.publishing_channel(queue, delivery_limit).await?;
        let dead = topology::dead_queue_name(queue);
        let there = channel
            .queue_declare(
                dead.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| self.unavailable(e))?
            .message_count();
        let mut removed = 0;
        for _ in 0..there {
            let Some(message) = channel
                .basic_get(dead.as_str().into(), BasicGetOptions::default())
                .await
                .map_err(|e| self.unavailable(e))?
            else {
                break;
            };
            let delivery = message.delivery;
            let retried = serde_json::from_slice::<RowKey>(&delivery.data)
                .is_ok_and(|row| row.batch_id == batch_id && lines.contains(&row.line));
            if retried {
                removed += 1;
            } else {
                channel
                    .basic_publish(
                        "".into(),
                        dead.as_str().into(),
                        BasicPublishOptions::default(),
                        &delivery.data,
                        delivery.properties.clone(),
                    )
                    .await
                    .map_err(|e| self.unavailable(e))?
                    .await
                    .map_err(|e| self.unavailable(e))?;
            }
            delivery
                .ack(BasicAckOptions::default())
                .await
                .map_err(|e| self.unavailable(e))?;
        }
        let _ = channel.close(200, "dead copies removed".into()).await;
        Ok(removed)
    }

    /// Whether the broker answers now, connecting once without retries if needed.
    pub async fn check(&self) -> Result<(), BrokerError> {
        self.connection(Duration::ZERO).await.map(drop)
    }

    async fn connection(&self, budget: Duration) -> Result<Arc<Connection>, BrokerError> {
        // Held across the connect so concurrent uploads wait for one reconnect
        // instead of each opening a connection of its own.
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref()
            && connection.status().connected()
        {
            return Ok(Arc::clone(connection));
        }
        let connection = retry::connect(&self.amqp_url, "spillway-producer", budget)
            .await
            .map_err(|e| self.unavailable(e))?;
        tracing::info!(endpoint = %self.endpoint, "connected to RabbitMQ");
        let connection = Arc::new(connection);
        *slot = Some(Arc::clone(&connection));
        Ok(connection)
    }

    pub(crate) fn unavailable(&self, reason: impl ToString) -> BrokerError {
        BrokerError::Unavailable {
            endpoint: self.endpoint.clone(),
            reason: reason.to_string(),
        }
    }
}

/// `amqp://user:pass@host:5672/vhost` -> `amqp://host:5672/vhost`.
fn without_credentials(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let authority_end = url[scheme_end..]
        .find('/')
        .map_or(url.len(), |i| scheme_end + i);
    match url[scheme_end..authority_end].rfind('@') {
        Some(at) => format!("{}{}", &url[..scheme_end], &url[scheme_end + at + 1..]),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_never_show_passwords() {
        assert_eq!(
            without_credentials("amqp://guest:s3cret@rabbit:5672/%2f"),
            "amqp://rabbit:5672/%2f"
        );
        assert_eq!(
            without_credentials("amqp://rabbit:5672/team@eu"),
            "amqp://rabbit:5672/team@eu"
        );
    }
}
