//! Spillway's producer: an HTTP service that turns an uploaded CSV file into one
//! persistent, confirmed RabbitMQ message per row.
//!
//! # Layout
//!
//! - [`config`]: the producer's settings, from the environment.
//! - [`routes`]: the HTTP API and the mapping of every error to JSON.
//! - [`ingest`]: stream -> validate -> spool, then spool -> publish with confirms;
//!   where each phase runs, and what a batch records when it ends.
//!   - [`ingest::validate`]: the CSV checks and every reason an upload is rejected.
//!   - [`ingest::spool`]: the spool file's format, encoded and decoded in one place.
//!   - [`ingest::publish`]: windowed publisher confirms, with nacked rows sent again.
//! - [`strict`]: the byte-level CSV rules the parser does not enforce.
//! - [`broker`]: the one long-lived RabbitMQ connection, reconnected on demand.
//! - [`batches`]: the batches API (list, progress, results, delete), read from the
//!   ledger.
//!   - [`ingest::resume`]: publications whose producer stopped, resumed from the ledger.
//! - [`dead`]: the dead-letter list and replays of the dead queue.
//! - [`outbox`]: batch state changes published as events, and completion callbacks.
//! - [`folding`]: workers' logged outcomes folded into rows and batch counts.
//! - [`metrics`]: Prometheus counters and the publish-latency histogram.

pub mod batches;
pub mod broker;
pub mod config;
pub mod dead;
pub mod folding;
pub mod ingest;
pub mod metrics;
pub mod outbox;
pub mod routes;
pub mod strict;

use std::{future::Future, sync::Arc, time::Duration};

use spillway_common::{auth::Access, jobs_config::JobsConfig};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    broker::Broker,
    config::Settings,
    metrics::Metrics,
    routes::{AppState, UploadSlots},
};

/// Builds the producer's state from its settings and job types; fails only on a
/// malformed `DATABASE_URL` (the ledger is connected to when first used).
pub fn build_state(settings: &Settings, jobs: JobsConfig) -> anyhow::Result<Arc<AppState>> {
    let metrics = Arc::new(Metrics::new());
    Ok(Arc::new(AppState {
        jobs,
        broker: Broker::new(&settings.broker.amqp_url, settings.broker_retry_budget()),
        limits: settings.limits(),
        body_idle_timeout: settings.body_idle_timeout(),
        publish_window: usize::try_from(settings.publish_window).unwrap_or(2000),
        publication_stale: Duration::from_secs(settings.publication_stale_seconds),
        spool_dir: settings.spool_dir(),
        ledger: settings.database.open()?,
        metrics: Arc::clone(&metrics),
        callbacks: settings.callbacks(),
        replay_rows_per_second: settings.replay_rows_per_second,
        replays: Default::default(),
        uploads: Arc::new(UploadSlots::new(
            usize::try_from(settings.max_uploads_per_client).unwrap_or(4),
            metrics.uploads_in_progress.clone(),
        )),
        header_timeout: Duration::from_secs(settings.request_header_timeout_seconds),
        auth: settings.auth.clone(),
        tasks: TaskTracker::new(),
    }))
}

/// Serves the API on `listener` until `shutdown` completes, then lets requests in
/// flight finish and every batch being published reach its last confirm. Meanwhile
/// it resumes publications whose producer stopped (see [`ingest::resume`]) and
/// delivers the ledger's outbox (see [`outbox`]) and folds workers' outcomes (see
/// [`folding`]).
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Who may call the API, by the address it listens on: refused before anything runs.
    let gate = Access::from_settings(&state.auth, listener.local_addr()?)
        .map_err(std::io::Error::other)?;
    let stop_resuming = CancellationToken::new();
    let resuming = tokio::spawn(ingest::resume::resume_abandoned(
        Arc::clone(&state),
        stop_resuming.clone(),
    ));
    let delivering = tokio::spawn(outbox::run(Arc::clone(&state), stop_resuming.clone()));
    let folding = tokio::spawn(folding::run(Arc::clone(&state), stop_resuming.clone()));
    let served = spillway_common::serve::serve(
        listener,
        routes::router(Arc::clone(&state), gate),
        state.header_timeout,
        shutdown,
    )
    .await;
    stop_resuming.cancel();
    let _ = resuming.await;
    let _ = delivering.await;
    let _ = folding.await;
    state.tasks.close();
    state.tasks.wait().await;
    served
}
