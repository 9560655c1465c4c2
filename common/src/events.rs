//! The messages workers and the scaler exchange besides rows: progress reports and
//! drain requests, each on a topic exchange of its own.
//!
//! Workers publish a [`WorkerReport`] on [`EVENTS_EXCHANGE`] every few seconds and on
//! exit, so the scaler knows who holds work before it drains anyone (the management
//! API's unacked count lags by seconds; a worker's own report does not). The scaler
//! asks a worker to drain by publishing to [`CONTROL_EXCHANGE`] with the worker's
//! [`drain_routing_key`]; each worker listens on an exclusive queue bound to its own key.
//! Whoever listens does so through [`subscribe`].

use lapin::{
    Channel, Consumer, ExchangeKind,
    options::{BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
};
use serde::{Deserialize, Serialize};

/// Topic exchange of worker reports (routing key `worker.<job_type>.<worker>`), of
/// batches starting to be published (`publishing.<job_type>`) and of every change of a
/// batch's state (`batch.<job_type>.<state>`).
pub const EVENTS_EXCHANGE: &str = "spillway.events";
/// Topic exchange of requests to workers; routing key `drain.<worker>`.
pub const CONTROL_EXCHANGE: &str = "spillway.control";

pub fn report_routing_key(job_type: &str, worker: &str) -> String {
    format!("worker.{job_type}.{worker}")
}

pub fn batch_routing_key(job_type: &str, state: &str) -> String {
    format!("batch.{job_type}.{state}")
}

pub fn publishing_routing_key(job_type: &str) -> String {
    format!("publishing.{job_type}")
}

pub fn drain_routing_key(worker: &str) -> String {
    format!("drain.{worker}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    /// Taking and processing rows.
    Running,
    /// Asked to stop: taking no new rows, finishing the ones in hand.
    Draining,
    /// Gone; this is its last report.
    Exited,
}

/// A worker's account of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerReport {
    pub worker: String,
    pub job_type: String,
    pub queue: String,
    pub state: WorkerState,
    /// Rows handled successfully and acked.
    pub processed: u64,
    /// Failed rows returned to the queue for another attempt.
    pub failed: u64,
    /// Rows this worker sent to the dead queue.
    pub dead_lettered: u64,
    /// Rows of cancelled batches this worker acked without running them.
    #[serde(default)]
    pub skipped: u64,
    /// Rows received and not yet settled: work in hand.
    pub in_flight: u64,
    pub started_unix: u64,
    /// When a row last started or finished, or the worker started.
    pub last_activity_unix: u64,
    pub sent_unix: u64,
}

/// What the producer announces as it starts publishing rows of a batch: rows the
/// management API's figures will show only seconds later, so the scaler can spawn
/// workers for them at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchPublishing {
    pub batch_id: String,
    pub job_type: String,
    pub queue: String,
    /// Rows about to be published.
    pub rows: u64,
}

/// A batch whose state changed, as it was then: the body of every
/// `batch.<job_type>.<state>` event, and of the completion callback of a final state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchStateChanged {
    pub batch_id: String,
    pub job_type: String,
    /// `publishing`, `queued`, `running`, `done`, `done_with_failures`, `failed` or
    /// `cancelled`.
    pub state: String,
    pub file_name: Option<String>,
    /// Why the batch failed, when it did.
    pub error: Option<String>,
    pub rows: u64,
    /// Rows confirmed by RabbitMQ.
    pub published: u64,
    pub pending: u64,
    /// Failed with attempts left.
    pub failed: u64,
    pub done: u64,
    pub dead: u64,
    pub cancelled: u64,
    pub received_at: String,
    pub published_at: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// Where the batch's rows and results can be downloaded.
    pub results_url: String,
    /// The change's id in the ledger: a receiver that sees it twice has seen one change.
    pub event_id: i64,
}

impl BatchStateChanged {
    /// Rows of a cancelled batch that may still wait in its queue: published and not
    /// settled when it was cancelled (workers ack them without running them).
    pub fn cancelled_in_queue(&self) -> u64 {
        self.cancelled
            .min(self.published.saturating_sub(self.done + self.dead))
    }
}

/// Declares both exchanges (durable topic exchanges).
pub async fn declare_exchanges(channel: &Channel) -> Result<(), lapin::Error> {
    for exchange in [EVENTS_EXCHANGE, CONTROL_EXCHANGE] {
        channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// Consumes, without acks, a server-named exclusive queue bound to `exchange` with
/// each of `routing_keys`.
///
/// Events are news, not work: a listener that is gone needs none of them, so its queue
/// is exclusive and auto-deleted (it goes with the connection, and nothing piles up
/// for a process that has exited), and deliveries need no ack. The exchange must
/// exist: see [`declare_exchanges`].
pub async fn subscribe(
    channel: &Channel,
    exchange: &str,
    routing_keys: &[&str],
    consumer_tag: &str,
) -> Result<Consumer, lapin::Error> {
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
    for key in routing_keys {
        channel
            .queue_bind(
                queue.name().clone(),
                exchange.into(),
                (*key).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    channel
        .basic_consume(
            queue.name().clone(),
            consumer_tag.into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
