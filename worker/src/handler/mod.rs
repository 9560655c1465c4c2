//! Handlers: what a worker does with one row.
//!
//! A handler only says whether the row succeeded, and with what result; recording the
//! outcome and settling the delivery (ack, requeue, dead-letter) happen in one place,
//! [`crate::consume`], whatever the handler. The job type chooses the handler
//! (`handler = "simulate" | "exec"`).

pub mod exec;
pub mod simulate;

use std::time::Duration;

use spillway_common::{
    envelope::RowMessage,
    jobs_config::{HandlerKind, JobType},
};

/// Why a row failed; sent along with the row if it is dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RowFailed(pub String);

/// The handler of a job type.
#[derive(Debug, Clone)]
pub enum Handler {
    Simulate(simulate::Simulate),
    Exec(exec::Exec),
}

impl Handler {
    pub fn for_job_type(job: &JobType, exec_timeout: Duration, result_max_bytes: usize) -> Self {
        match job.handler {
            HandlerKind::Simulate => Handler::Simulate(simulate::Simulate {
                per_row: Duration::from_millis(job.simulate_ms),
                fail_rate: job.fail_rate,
            }),
            HandlerKind::Exec => Handler::Exec(exec::Exec {
                command: job.command.clone(),
                timeout: exec_timeout,
                result_max_bytes,
            }),
        }
    }

    /// Runs the row; `Ok` holds its result, as the ledger records it.
    pub async fn handle(&self, row: &RowMessage, body: &[u8]) -> Result<String, RowFailed> {
        match self {
            Handler::Simulate(simulate) => simulate.handle().await,
            Handler::Exec(exec) => exec.handle(row, body).await,
        }
    }
}
