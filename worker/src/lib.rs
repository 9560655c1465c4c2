//! Spillway's worker: consumes one job type's queue with manual acks, runs the job
//! type's handler on each row, reports progress, and drains on request.
//!
//! # Layout
//!
//! - [`config`]: the worker's settings, from the environment.
//! - [`consume`]: the consume loop, reconnection, draining.
//! - [`settle`]: one delivery's fate: run, record its outcome, then ack, requeue or
//!   dead-letter it, once.
//! - [`record`]: rows' outcomes written to the ledger in batches before their acks.
//! - `acks`: those acks sent in runs, one `multiple` ack for many rows.
//! - `cancelled`: which batches are cancelled, so their rows are acked unrun.
//! - [`handler`]: what is done with a row: `simulate` or `exec`.
//! - [`drain`]: drain requests from the scaler over RabbitMQ.
//! - [`progress`]: counters and the progress reports on the events exchange.

mod acks;
mod cancelled;
pub mod config;
pub mod consume;
pub mod drain;
pub mod handler;
pub mod progress;
pub mod record;
pub mod settle;

use std::time::Duration;

use spillway_common::jobs_config::{JobsConfig, UnknownJobType};
use spillway_ledger::LedgerError;

use crate::{config::Settings, consume::Worker, handler::Handler};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    JobType(#[from] UnknownJobType),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// Resolves the settings and job types into a runnable worker.
pub fn build(settings: &Settings, jobs: &JobsConfig) -> Result<Worker, BuildError> {
    let job_type = settings
        .job_type
        .clone()
        .unwrap_or_else(|| jobs.default_job_type.clone());
    let job = jobs.job_type(&job_type)?;
    Ok(Worker {
        name: settings.worker_name(),
        job_type,
        queue: job.queue.clone(),
        delivery_limit: job.delivery_limit,
        handler: Handler::for_job_type(
            job,
            Duration::from_secs(settings.exec_timeout_seconds),
            usize::try_from(settings.result_max_bytes).unwrap_or(usize::MAX),
        ),
        ledger: settings.database.open()?,
        amqp_url: settings.broker.amqp_url.clone(),
        concurrency: usize::from(settings.concurrency),
        prefetch: settings.prefetch(),
        progress_interval: Duration::from_secs(settings.progress_seconds),
        give_up_after: settings.broker_retry_budget(),
    })
}
