//! Everything a tick observes through and acts through, in one [`Context`]: the
//! launcher (workers), the queue figures (the management API), drain requests (the
//! bus), what workers and the producer said ([`Reports`]), and where the outcome is
//! recorded (metrics, the board).
//!
//! Each side effect sits behind a trait, [`Launcher`], [`QueueFigures`] and
//! [`DrainRequests`], so the step from decision to action is tested against fakes
//! (`tick/tests.rs`) as well as end to end against the real broker, API and cluster.

use std::{future::Future, sync::Arc, time::Duration};

use spillway_common::rabbit_api::{ApiError, QueueStats, RabbitApi};

use crate::{board::Board, bus::DrainError, metrics::Metrics, reports::Reports};

/// A queue's ready and unacked counts, from wherever they are read.
pub trait QueueFigures: Send + Sync + 'static {
    fn queue_stats(&self, queue: &str)
    -> impl Future<Output = Result<QueueStats, ApiError>> + Send;
}

impl QueueFigures for RabbitApi {
    fn queue_stats(
        &self,
        queue: &str,
    ) -> impl Future<Output = Result<QueueStats, ApiError>> + Send {
        RabbitApi::queue_stats(self, queue)
    }
}

/// Asking a worker to finish what it holds and exit.
pub trait DrainRequests: Send + Sync + 'static {
    /// `Ok` only once the request is known to be on its way (confirmed by the broker).
    fn drain(&self, worker: &str) -> impl Future<Output = Result<(), DrainError>> + Send;
}

/// How long things may take, from the settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// A worker asked to drain may take this long before it is stopped (if idle).
    pub drain_grace: Duration,
    /// A report older than this says nothing about the worker's hands.
    pub report_stale_after: Duration,
    /// A worker pending this long is taken as unable to start.
    pub start_timeout: Duration,
}

pub struct Context<L, Q, D> {
    pub launcher: Arc<L>,
    pub queues: Arc<Q>,
    pub drains: Arc<D>,
    pub reports: Arc<Reports>,
    pub metrics: Arc<Metrics>,
    pub board: Arc<Board>,
    pub timing: Timing,
}
