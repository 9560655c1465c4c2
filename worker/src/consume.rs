//! The consume loop: take rows, run each as a task, reconnect, drain.
//!
//! Rows run as tasks, at most `CONCURRENCY` at a time, with `PREFETCH` unacked rows
//! allowed by the broker; each task settles its delivery exactly once
//! ([`crate::settle`]), after its outcome is recorded by the one recorder task of the
//! worker ([`crate::record`]).
//!
//! A lost connection is re-established with backoff for up to
//! `BROKER_RETRY_SECONDS`; rows in hand at that moment are redelivered by the broker.
//! A drain (SIGTERM or a request from the scaler) cancels the consumer, finishes and
//! acks the rows already received, and ends the run.

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;
use lapin::{
    Channel, Connection,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions},
    types::FieldTable,
};
use spillway_common::{
    events::{self, WorkerState},
    retry, topology,
};
use spillway_ledger::Ledger;
use tokio::{sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    acks::Acks,
    cancelled::CancelledBatches,
    drain,
    handler::Handler,
    progress::Progress,
    record::{Recorder, Slots},
    settle::{LogRecords, Settler, process},
};

/// Everything a worker needs to run, resolved from its settings.
pub struct Worker {
    pub name: String,
    pub job_type: String,
    pub queue: String,
    pub delivery_limit: u32,
    pub handler: Handler,
    pub amqp_url: String,
    pub concurrency: usize,
    pub prefetch: u16,
    pub progress_interval: Duration,
    pub give_up_after: Duration,
    /// Where rows' outcomes are recorded.
    pub ledger: Ledger,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(
        "gave up on RabbitMQ after {seconds} s without a connection (BROKER_RETRY_SECONDS): {source}"
    )]
    GaveUp {
        seconds: u64,
        source: retry::ConnectError,
    },
    #[error("cannot set up consuming from queue {queue:?}: {source}")]
    Setup { queue: String, source: lapin::Error },
}

/// How one connection's session ended.
enum SessionEnd {
    Drained,
    /// The connection or the consumer went away without a drain; why.
    ConnectionLost(String),
}

impl Worker {
    /// Runs until drained by `stop` or by a drain request; returns when every row
    /// received has been settled and the final report sent.
    pub async fn run(self, stop: CancellationToken) -> Result<(), WorkerError> {
        let progress = Arc::new(Progress::new(
            self.name.clone(),
            self.job_type.clone(),
            self.queue.clone(),
        ));
        let in_hand = Arc::clone(&progress);
        let (recorder, recording) = Recorder::start(
            self.ledger.clone(),
            self.name.clone(),
            stop.clone(),
            LogRecords,
            Slots {
                concurrency: self.concurrency as u64,
                in_hand: Box::new(move || in_hand.in_hand()),
            },
        );
        let ran = self.sessions(&progress, &recorder, &stop).await;
        drop(recorder);
        let _ = recording.await;
        ran
    }

    /// Connects and consumes, reconnecting after a lost connection, until drained.
    async fn sessions(
        &self,
        progress: &Arc<Progress>,
        recorder: &Recorder,
        stop: &CancellationToken,
    ) -> Result<(), WorkerError> {
        tracing::info!(
            worker = %self.name, job_type = %self.job_type, queue = %self.queue,
            concurrency = self.concurrency, prefetch = self.prefetch, "worker starting"
        );
        loop {
            let connecting = retry::connect(&self.amqp_url, &self.name, self.give_up_after);
            let connection = tokio::select! {
                // Stopped while the broker is away: there is nothing in hand to finish.
                _ = stop.cancelled() => {
                    tracing::info!("stopped while waiting for RabbitMQ; exiting");
                    return Ok(());
                }
                connected = connecting => connected.map_err(|source| WorkerError::GaveUp {
                    seconds: self.give_up_after.as_secs(),
                    source,
                })?,
            };
            match self.session(&connection, progress, recorder, stop).await? {
                SessionEnd::Drained => {
                    let _ = connection.close(200, "drained".into()).await;
                    let report = progress.report();
                    tracing::info!(
                        processed = report.processed,
                        failed = report.failed,
                        dead_lettered = report.dead_lettered,
                        "worker drained, exiting"
                    );
                    return Ok(());
                }
                SessionEnd::ConnectionLost(error) if stop.is_cancelled() => {
                    tracing::warn!(%error, "connection lost while draining; rows in hand return to the queue");
                    return Ok(());
                }
                SessionEnd::ConnectionLost(error) => {
                    tracing::warn!(%error, "connection to RabbitMQ lost; reconnecting");
                }
            }
        }
    }

    async fn session(
        &self,
        connection: &Connection,
        progress: &Arc<Progress>,
        recorder: &Recorder,
        stop: &CancellationToken,
    ) -> Result<SessionEnd, WorkerError> {
        let setup = |source| WorkerError::Setup {
            queue: self.queue.clone(),
            source,
        };
        let consuming = connection.create_channel().await.map_err(setup)?;
        let publisher = connection.create_channel().await.map_err(setup)?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(setup)?;
        topology::declare_work_queue(&consuming, &self.queue, self.delivery_limit)
            .await
            .map_err(setup)?;
        events::declare_exchanges(&consuming).await.map_err(setup)?;
        consuming
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await
            .map_err(setup)?;
        let mut drain_requests = drain::listen(&publisher, &self.name).await.map_err(setup)?;
        let mut rows = consuming
            .basic_consume(
                self.queue.as_str().into(),
                self.name.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(setup)?;

        let acks = Arc::new(Acks::default());
        let sending_acks = tokio::spawn({
            let acks = Arc::clone(&acks);
            async move { acks.run().await }
        });
        let settler = Arc::new(Settler {
            recorder: recorder.clone(),
            ledger: self.ledger.clone(),
            job_type: self.job_type.clone(),
            publisher: publisher.clone(),
            queue: self.queue.clone(),
            worker: self.name.clone(),
            delivery_limit: self.delivery_limit,
            progress: Arc::clone(progress),
            cancelled: CancelledBatches::new(self.ledger.clone()),
            acks: Arc::clone(&acks),
        });
        let reporter = tokio::spawn(report_every(
            self.progress_interval,
            Arc::clone(progress),
            publisher.clone(),
        ));
        let slots = Arc::new(Semaphore::new(self.concurrency));
        let mut tasks = JoinSet::new();
        let mut draining = stop.is_cancelled();
        if draining {
            self.stop_taking(&consuming, progress, &publisher).await;
        }

        let end = loop {
            tokio::select! {
                _ = stop.cancelled(), if !draining => {
                    draining = true;
                    self.stop_taking(&consuming, progress, &publisher).await;
                }
                request = drain_requests.next(), if !draining => match request {
                    Some(Ok(_)) => {
                        tracing::info!("drain requested by the scaler");
                        stop.cancel();
                    }
                    Some(Err(error)) => break SessionEnd::ConnectionLost(error.to_string()),
                    None => break SessionEnd::ConnectionLost("the drain-request consumer ended".into()),
                },
                Some(done) = tasks.join_next() => {
                    if let Err(e) = done {
                        tracing::error!(error = %e, "a row task panicked");
                    }
                }
                next = async {
                    // Wait for a free slot before taking a delivery, so rows beyond
                    // CONCURRENCY stay with the broker (or in the prefetch buffer).
                    let slot = Arc::clone(&slots).acquire_owned().await.expect("never closed");
                    (slot, rows.next().await)
                } => match next {
                    (slot, Some(Ok(delivery))) => {
                        acks.delivered(delivery.delivery_tag).await;
                        let in_hand = progress.row_in_hand();
                        let handler = self.handler.clone();
                        let settler = Arc::clone(&settler);
                        tasks.spawn(async move {
                            process(delivery, &handler, &settler).await;
                            drop((in_hand, slot));
                        });
                    }
                    (_, Some(Err(error))) => break SessionEnd::ConnectionLost(error.to_string()),
                    // Draining: the consumer was cancelled and everything it delivered taken.
                    (_, None) if draining => break SessionEnd::Drained,
                    (_, None) => break SessionEnd::ConnectionLost(
                        "the broker ended the consumer (connection closed or queue deleted)".into(),
                    ),
                }
            }
        };
        if matches!(end, SessionEnd::ConnectionLost(_)) {
            // Their rows went back to the queue with the connection, and their acks
            // cannot arrive: stop them (and the commands they run) and reconnect now.
            tasks.abort_all();
        }
        while let Some(done) = tasks.join_next().await {
            if let Err(e) = done
                && e.is_panic()
            {
                tracing::error!(error = %e, "a row task panicked");
            }
        }
        reporter.abort();
        sending_acks.abort();
        if matches!(end, SessionEnd::Drained) {
            progress.set_state(WorkerState::Exited);
            if let Err(error) = progress.publish(&publisher).await {
                tracing::warn!(%error, "cannot send the final progress report");
            }
            let _ = publisher.wait_for_confirms().await;
            // Channels first, so the connection's close finds nothing half-open.
            let _ = consuming.close(200, "drained".into()).await;
            let _ = publisher.close(200, "drained".into()).await;
        }
        Ok(end)
    }

    async fn stop_taking(&self, consuming: &Channel, progress: &Progress, publisher: &Channel) {
        tracing::info!("draining: taking no new rows, finishing the ones in hand");
        progress.set_state(WorkerState::Draining);
        if let Err(error) = consuming
            .basic_cancel(self.name.as_str().into(), BasicCancelOptions::default())
            .await
        {
            tracing::warn!(%error, "cannot cancel the consumer");
        }
        let _ = progress.publish(publisher).await;
    }
}

async fn report_every(interval: Duration, progress: Arc<Progress>, channel: Channel) {
    let mut ticks = tokio::time::interval(interval);
    let mut last_logged = None;
    loop {
        ticks.tick().await;
        if let Err(error) = progress.publish(&channel).await {
            tracing::warn!(%error, "cannot send a progress report");
        }
        let report = progress.report();
        let counts = (report.processed, report.failed, report.in_flight);
        if last_logged != Some(counts) {
            tracing::info!(
                processed = report.processed,
                failed = report.failed,
                dead_lettered = report.dead_lettered,
                in_flight = report.in_flight,
                "progress"
            );
            last_logged = Some(counts);
        }
    }
}
