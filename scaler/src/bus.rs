//! The scaler's side of RabbitMQ messaging: worker reports and batch announcements
//! (rows being published, batches queued and cancelled) in, drain requests out.
//!
//! One task keeps a connection open (reconnecting with backoff for as long as the
//! scaler runs) and consumes every worker's reports and the producer's batch
//! announcements from the events exchange into [`Reports`]. Drain requests go out on
//! a channel of their own in confirm mode, so a
//! request the broker refuses (`ACCESS_REFUSED` closes the channel) is a failure the
//! caller sees, not a request believed sent; a closed one is reopened for the next.
//! While it is disconnected, reports age and become stale, which the policy treats
//! as "unknown": never idle.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};
use spillway_common::{
    config::{BrokerSettings, Process},
    events::{
        self, BatchPublishing, BatchStateChanged, CONTROL_EXCHANGE, EVENTS_EXCHANGE, WorkerReport,
        drain_routing_key,
    },
    jobs_config::JobsConfig,
    retry, topology,
};
use tokio_util::sync::CancellationToken;

use crate::{context::DrainRequests, reports::Reports};

#[derive(Debug, thiserror::Error)]
#[error("cannot ask worker {worker} to drain: {reason}")]
pub struct DrainError {
    pub worker: String,
    pub reason: String,
}

pub struct Bus {
    reports: Arc<Reports>,
    /// Work queues (name, delivery limit) declared on every connection, so the
    /// management API always has them to report on.
    queues: Vec<(String, u32)>,
    channel: Mutex<Option<Channel>>,
    /// The open connection, for (re)opening the drain channel.
    connection: Mutex<Option<Arc<Connection>>>,
    /// Drain requests' channel, in confirm mode; opened on first use.
    control: tokio::sync::Mutex<Option<Channel>>,
}

/// Longest wait for the broker to confirm a drain request.
const DRAIN_CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

impl Bus {
    /// A bus that records what it hears in `reports`.
    pub fn new(reports: Arc<Reports>, jobs: &JobsConfig) -> Arc<Self> {
        Arc::new(Bus {
            reports,
            queues: jobs
                .job_types
                .values()
                .map(|job| (job.queue.clone(), job.delivery_limit))
                .collect(),
            channel: Mutex::new(None),
            connection: Mutex::new(None),
            control: tokio::sync::Mutex::new(None),
        })
    }

    pub fn connected(&self) -> bool {
        self.channel
            .lock()
            .expect("channel lock")
            .as_ref()
            .is_some_and(|c| c.status().connected())
    }

    /// Asks `worker` to finish what it holds and exit.
    async fn request_drain(&self, worker: &str) -> Result<(), DrainError> {
        let failed = |reason: String| DrainError {
            worker: worker.to_string(),
            reason,
        };
        let mut control = self.control.lock().await;
        let channel = match control.as_ref() {
            Some(channel) if channel.status().connected() => channel.clone(),
            _ => {
                let connection = self
                    .connection
                    .lock()
                    .expect("connection lock")
                    .clone()
                    .ok_or_else(|| failed("not connected to RabbitMQ".into()))?;
                let channel = connection
                    .create_channel()
                    .await
                    .map_err(|e| failed(format!("cannot open a channel: {e}")))?;
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await
                    .map_err(|e| failed(format!("cannot enable publisher confirms: {e}")))?;
                control.insert(channel).clone()
            }
        };
        let published = async {
            channel
                .basic_publish(
                    CONTROL_EXCHANGE.into(),
                    drain_routing_key(worker).as_str().into(),
                    BasicPublishOptions::default(),
                    b"drain",
                    BasicProperties::default(),
                )
                .await?
                .await
        };
        let outcome = match tokio::time::timeout(DRAIN_CONFIRM_TIMEOUT, published).await {
            Ok(Ok(confirmation)) if confirmation.is_ack() => return Ok(()),
            Ok(Ok(_)) => "the broker did not accept it (nack)".to_string(),
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("no confirmation within {DRAIN_CONFIRM_TIMEOUT:?}"),
        };
        // The channel may be closed (a refusal closes it) or wedged: start afresh.
        *control = None;
        Err(failed(outcome))
    }

    /// Keeps the connection and the report consumer up until `stop`. Each round of
    /// reconnecting lasts `BROKER_RETRY_SECONDS` (30 s unless set), then the failure is
    /// logged and a new round starts: the scaler never gives up on the broker.
    pub async fn run(self: Arc<Self>, broker: impl Into<BrokerSettings>, stop: CancellationToken) {
        let broker = broker.into();
        let budget = broker.retry_budget(Process::Scaler);
        loop {
            let session = async {
                let connection =
                    Arc::new(retry::connect(&broker.amqp_url, "spillway-scaler", budget).await?);
                let channel = connection.create_channel().await?;
                for (queue, delivery_limit) in &self.queues {
                    topology::declare_work_queue(&channel, queue, *delivery_limit)
                        .await
                        .with_context(|| format!("cannot declare work queue {queue:?}"))?;
                }
                let reports = subscribe(&channel).await?;
                *self.channel.lock().expect("channel lock") = Some(channel);
                *self.connection.lock().expect("connection lock") = Some(connection);
                tracing::info!("listening to worker reports");
                self.consume(reports).await;
                anyhow::Ok(())
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                ended = session => {
                    *self.channel.lock().expect("channel lock") = None;
                    *self.connection.lock().expect("connection lock") = None;
                    *self.control.lock().await = None;
                    match ended {
                        Ok(()) => tracing::warn!("lost the RabbitMQ connection; reconnecting"),
                        Err(error) => tracing::warn!(%error, "cannot reach RabbitMQ; retrying"),
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn consume(&self, mut events: lapin::Consumer) {
        while let Some(Ok(delivery)) = events.next().await {
            let key = delivery.routing_key.as_str();
            if key.starts_with("publishing.") {
                match serde_json::from_slice::<BatchPublishing>(&delivery.data) {
                    Ok(batch) => {
                        self.reports
                            .record_publishing(&batch.job_type, batch.rows, Instant::now())
                    }
                    Err(error) => tracing::warn!(%error, "ignoring a malformed batch announcement"),
                }
                continue;
            }
            if key.starts_with("batch.") {
                match serde_json::from_slice::<BatchStateChanged>(&delivery.data) {
                    Ok(batch) => match batch.state.as_str() {
                        "queued" => self.reports.record_batch(&batch.job_type, Instant::now()),
                        "cancelled" => self.reports.record_cancelled(
                            &batch.job_type,
                            batch.cancelled_in_queue(),
                            Instant::now(),
                        ),
                        _ => {}
                    },
                    Err(error) => tracing::warn!(%error, "ignoring a malformed batch event"),
                }
                continue;
            }
            match serde_json::from_slice::<WorkerReport>(&delivery.data) {
                Ok(report) => self.reports.record(report, Instant::now()),
                Err(error) => tracing::warn!(%error, "ignoring a malformed worker report"),
            }
        }
    }
}

/// An exclusive queue bound to every worker report and batch announcement, consumed
/// without acks.
async fn subscribe(channel: &Channel) -> Result<lapin::Consumer, lapin::Error> {
    events::declare_exchanges(channel).await?;
    events::subscribe(
        channel,
        EVENTS_EXCHANGE,
        &["worker.#", "publishing.#", "batch.#"],
        "spillway-scaler-reports",
    )
    .await
}

impl DrainRequests for Bus {
    fn drain(
        &self,
        worker: &str,
    ) -> impl std::future::Future<Output = Result<(), DrainError>> + Send {
        self.request_drain(worker)
    }
}
