//! The scaler's Prometheus metrics, served as OpenMetrics text on `/metrics`.

use crate::policy::{Observation, Phase};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub job_type: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub job_type: String,
    pub phase: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HeldLabels {
    pub job_type: String,
    /// `cap`, `priority` or `paused`.
    pub why: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub job_type: String,
    pub action: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub queue_ready: Family<JobLabels, Gauge>,
    pub queue_unacked: Family<JobLabels, Gauge>,
    pub workers: Family<PhaseLabels, Gauge>,
    pub decisions: Family<ActionLabels, Counter>,
    pub observe_failures: Family<JobLabels, Counter>,
    pub drain_failures: Family<JobLabels, Counter>,
    pub held: Family<HeldLabels, Counter>,
    pub ticks: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        let metrics = Metrics {
            registry: Registry::with_prefix("spillway_scaler"),
            queue_ready: Family::default(),
            queue_unacked: Family::default(),
            workers: Family::default(),
            decisions: Family::default(),
            observe_failures: Family::default(),
            drain_failures: Family::default(),
            held: Family::default(),
            ticks: Counter::default(),
        };
        let mut registry = metrics.registry;
        registry.register(
            "queue_ready",
            "Ready rows in the job type's queue",
            metrics.queue_ready.clone(),
        );
        registry.register(
            "queue_unacked",
            "Rows delivered and not yet acked",
            metrics.queue_unacked.clone(),
        );
        registry.register("workers", "Workers by phase", metrics.workers.clone());
        registry.register(
            "decisions",
            "Scaling actions taken (spawn: workers started; drain: workers asked to drain; stop: workers stopped)",
            metrics.decisions.clone(),
        );
        registry.register(
            "observe_failures",
            "Ticks whose queue numbers could not be read",
            metrics.observe_failures.clone(),
        );
        registry.register(
            "drain_failures",
            "Drain requests the broker did not confirm (refused, or no connection); each is tried again next tick",
            metrics.drain_failures.clone(),
        );
        registry.register(
            "held",
            "Ticks in which a job type with rows waiting got fewer workers than its policy wanted, by why (cap: max_workers_total; priority: the room went to higher priorities; paused)",
            metrics.held.clone(),
        );
        registry.register("ticks", "Scaler ticks", metrics.ticks.clone());
        Metrics {
            registry,
            ..metrics
        }
    }

    /// Shows every counter of `job_type` at 0 until it counts something, so that
    /// "nothing happened" reads as 0 on `/metrics` rather than as a missing line, which
    /// is also what a renamed metric looks like.
    pub fn start_job_type(&self, job_type: &str) {
        // Asking for a label set creates it at 0; the guard returned is of no use here.
        for action in ["spawn", "drain", "stop"] {
            let _ = self.decisions.get_or_create(&ActionLabels {
                job_type: job_type.into(),
                action,
            });
        }
        let labels = JobLabels {
            job_type: job_type.into(),
        };
        let _ = self.observe_failures.get_or_create(&labels);
        let _ = self.drain_failures.get_or_create(&labels);
        for why in ["cap", "priority", "paused"] {
            let _ = self.held.get_or_create(&HeldLabels {
                job_type: job_type.into(),
                why,
            });
        }
    }

    /// How many `action`s (`spawn`, `drain`, `stop`) were taken for `job_type` so far.
    pub fn decision_count(&self, job_type: &str, action: &'static str) -> u64 {
        self.decisions
            .get_or_create(&ActionLabels {
                job_type: job_type.into(),
                action,
            })
            .get()
    }

    /// The gauges of one job type's observation: queue depth and workers by phase.
    pub fn record_observation(&self, job_type: &str, observation: &Observation) {
        let labels = JobLabels {
            job_type: job_type.into(),
        };
        if let Some(queue) = observation.queue {
            self.queue_ready
                .get_or_create(&labels)
                .set(queue.ready as i64);
            self.queue_unacked
                .get_or_create(&labels)
                .set(queue.unacked as i64);
        }
        for phase in Phase::ALL {
            let count = observation
                .workers
                .iter()
                .filter(|w| w.phase == phase)
                .count();
            self.workers
                .get_or_create(&PhaseLabels {
                    job_type: job_type.into(),
                    phase: phase.as_str(),
                })
                .set(count as i64);
        }
    }

    pub fn render(&self) -> String {
        spillway_common::metrics::render(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
