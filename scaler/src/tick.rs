//! The tick: observe, decide, act, record. Glue only.
//!
//! Each tick reads the launcher's workers once, then for each job type its queue's
//! depth (management API) and its workers' latest reports, asks the pure policy what
//! to do, and does it through the launcher or the bus. A failed read is passed on as
//! "unknown", which the policy never takes for idle.
//!
//! Every job type's queue and dead queue are read at once, each read bounded by
//! [`read_timeout`], and each job type is decided as soon as its own figures are in:
//! a management API that holds the reads of one queue delays that job type only, and
//! the tick by at most one read timeout.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::{StreamExt, stream::FuturesUnordered};
use spillway_common::{
    events::{WorkerState, unix_now},
    jobs_config::JobsConfig,
    rabbit_api::{ApiError, QueueStats, RabbitApi},
    topology::dead_queue_name,
};

use crate::{
    board::{Board, JobListing, JobTypeStats, ScalingEvent},
    bus::Bus,
    launcher::{LaunchedWorker, Launcher, worker_name},
    metrics::{ActionLabels, JobLabels, Metrics, PhaseLabels},
    policy::{
        self, Action, Decision, Limits, Memory, Observation, Phase, Progress, QueueDepth,
        WorkerView,
    },
};

pub struct Scaler<L> {
    pub jobs: JobsConfig,
    pub launcher: Arc<L>,
    pub api: RabbitApi,
    pub bus: Arc<Bus>,
    pub metrics: Arc<Metrics>,
    pub board: Arc<Board>,
    pub drain_grace: Duration,
    /// A report older than this says nothing about the worker's hands.
    pub report_stale_after: Duration,
    /// How long a worker may stay pending before it is taken as unable to start.
    pub start_timeout: Duration,
    memory: HashMap<String, Memory>,
    /// When each worker was asked to drain (or first seen draining).
    drains: HashMap<String, Instant>,
}

/// What a scaler observes through, acts through and reports to, whatever its launcher.
pub struct Parts {
    pub api: RabbitApi,
    pub bus: Arc<Bus>,
    pub metrics: Arc<Metrics>,
    pub board: Arc<Board>,
    pub drain_grace: Duration,
    /// A report older than this says nothing about the worker's hands.
    pub report_stale_after: Duration,
    /// How long a worker may stay pending before it is taken as unable to start.
    pub start_timeout: Duration,
}

impl<L: Launcher> Scaler<L> {
    pub fn new(jobs: JobsConfig, launcher: Arc<L>, parts: Parts) -> Self {
        Scaler {
            jobs,
            launcher,
            api: parts.api,
            bus: parts.bus,
            metrics: parts.metrics,
            board: parts.board,
            drain_grace: parts.drain_grace,
            report_stale_after: parts.report_stale_after,
            start_timeout: parts.start_timeout,
            memory: HashMap::new(),
            drains: HashMap::new(),
        }
    }

    pub async fn tick(&mut self, now: Instant) {
        self.metrics.ticks.inc();
        let workers = match self.launcher.workers().await {
            Ok(workers) => workers,
            Err(error) => {
                tracing::error!(%error, "cannot list workers; doing nothing this tick");
                return;
            }
        };
        let active = |name: &str| {
            workers
                .iter()
                .any(|w| w.name == name && w.phase.is_active())
        };
        self.bus.reports.retain(active);
        self.drains.retain(|name, _| active(name));

        let mut reads: FuturesUnordered<_> = self
            .jobs
            .job_types
            .iter()
            .map(|(job_type, job)| {
                let api = self.api.clone();
                let (job_type, job) = (job_type.clone(), job.clone());
                async move {
                    let dead_queue = dead_queue_name(&job.queue);
                    let (queue, dead) =
                        tokio::join!(api.queue_stats(&job.queue), api.queue_stats(&dead_queue));
                    (job_type, job, queue, dead)
                }
            })
            .collect();
        let mut board_rows = Vec::with_capacity(reads.len());
        let mut listings = Vec::with_capacity(workers.len());
        while let Some((job_type, job, queue, dead)) = reads.next().await {
            let stats = self.queue_stats(&job_type, queue);
            let observation = Observation {
                queue: stats.map(|s| QueueDepth {
                    ready: s.ready,
                    unacked: s.unacked,
                }),
                workers: workers
                    .iter()
                    .filter(|w| w.job_type == job_type)
                    .map(|w| self.view(w, now))
                    .collect(),
                last_batch_published: self.bus.last_batch_published(&job_type),
            };
            self.record_gauges(&job_type, &observation);
            let dead = dead.map(|s| s.ready + s.unacked);
            board_rows.push(JobTypeStats {
                job_type: job_type.clone(),
                queue: job.queue.clone(),
                ready: stats.map(|s| s.ready),
                unacked: stats.map(|s| s.unacked),
                consumed_total: stats.map(|s| s.acked_total),
                dead_lettered: dead.ok(),
                workers_active: observation
                    .workers
                    .iter()
                    .filter(|w| w.phase.is_active())
                    .count() as u64,
                max_jobs: job.max_jobs,
            });
            listings.extend(
                observation
                    .workers
                    .iter()
                    .zip(workers.iter().filter(|w| w.job_type == job_type))
                    .map(|(view, launched)| JobListing {
                        name: view.name.clone(),
                        job_type: job_type.clone(),
                        status: status_of(view),
                        started_unix: launched.started_unix,
                    }),
            );
            let limits = Limits {
                threshold: job.threshold,
                burst_threshold: job.burst_threshold,
                burst_size: job.burst_size,
                max_jobs: job.max_jobs,
                idle_window: self.jobs.idle_window(),
                drain_grace: self.drain_grace,
                start_timeout: self.start_timeout,
            };
            let memory = self.memory.remove(&job_type).unwrap_or_default();
            let (decisions, memory) = policy::decide(&observation, &limits, memory, now);
            self.memory.insert(job_type.clone(), memory);
            for decision in decisions {
                self.act(&job_type, decision, now).await;
            }
        }
        self.orphans(&workers, &mut listings, now).await;
        // By job type name, as job types are listed everywhere, whichever read ended first.
        board_rows.sort_by(|a, b| a.job_type.cmp(&b.job_type));
        self.board.record_tick(board_rows, listings);
    }

    /// Workers of no configured job type: listed, drained, stopped once idle.
    async fn orphans(
        &mut self,
        workers: &[LaunchedWorker],
        listings: &mut Vec<JobListing>,
        now: Instant,
    ) {
        let mut by_label: BTreeMap<&str, Vec<&LaunchedWorker>> = BTreeMap::new();
        for worker in workers {
            if !self.jobs.job_types.contains_key(&worker.job_type) {
                by_label.entry(&worker.job_type).or_default().push(worker);
            }
        }
        for (label, launched) in by_label {
            let views: Vec<WorkerView> = launched.iter().map(|w| self.view(w, now)).collect();
            listings.extend(
                views
                    .iter()
                    .zip(&launched)
                    .map(|(view, launched)| JobListing {
                        name: view.name.clone(),
                        job_type: label.to_string(),
                        status: status_of(view),
                        started_unix: launched.started_unix,
                    }),
            );
            let why = if label.is_empty() {
                "a worker without a job type".to_string()
            } else {
                format!("job type {label:?} is not configured")
            };
            for decision in policy::decide_orphans(&views, &why, self.drain_grace, now) {
                self.act(label, decision, now).await;
            }
        }
    }

    /// The figures of a read, or `None` (logged and counted) when it failed.
    fn queue_stats(
        &self,
        job_type: &str,
        read: Result<QueueStats, ApiError>,
    ) -> Option<QueueStats> {
        // The bus declares every work queue, so a missing queue, like missing figures,
        // is something unknown: never read as an empty queue.
        match read {
            Ok(stats) => Some(stats),
            Err(error) => {
                tracing::warn!(job_type, %error, "cannot read queue depth; not scaling this job type this tick");
                self.metrics
                    .observe_failures
                    .get_or_create(&JobLabels {
                        job_type: job_type.into(),
                    })
                    .inc();
                None
            }
        }
    }

    fn view(&mut self, worker: &LaunchedWorker, now: Instant) -> WorkerView {
        let report = self.bus.reports.get(&worker.name);
        if let Some((report, _)) = &report
            && report.state != WorkerState::Running
        {
            // Draining on its own (SIGTERM) or asked by an earlier scaler.
            self.drains.entry(worker.name.clone()).or_insert(now);
        }
        let fresh =
            report.filter(|(_, at)| now.saturating_duration_since(*at) <= self.report_stale_after);
        WorkerView {
            name: worker.name.clone(),
            phase: worker.phase,
            drain_requested_at: self.drains.get(&worker.name).copied(),
            in_flight: fresh.as_ref().map(|(report, _)| report.in_flight),
            progress: fresh.map(|(report, _)| Progress {
                processed: report.processed,
                failed: report.failed,
                dead_lettered: report.dead_lettered,
                last_activity_unix: report.last_activity_unix,
            }),
            age: Duration::from_secs(unix_now().saturating_sub(worker.started_unix)),
            waiting: worker.waiting.clone(),
        }
    }

    fn record_gauges(&self, job_type: &str, observation: &Observation) {
        let labels = JobLabels {
            job_type: job_type.into(),
        };
        if let Some(queue) = observation.queue {
            self.metrics
                .queue_ready
                .get_or_create(&labels)
                .set(queue.ready as i64);
            self.metrics
                .queue_unacked
                .get_or_create(&labels)
                .set(queue.unacked as i64);
        }
        for (phase, name) in [
            (Phase::Pending, "pending"),
            (Phase::Running, "running"),
            (Phase::Succeeded, "succeeded"),
            (Phase::Failed, "failed"),
            (Phase::Ended, "ended"),
            (Phase::Stopping, "stopping"),
        ] {
            let count = observation
                .workers
                .iter()
                .filter(|w| w.phase == phase)
                .count();
            self.metrics
                .workers
                .get_or_create(&PhaseLabels {
                    job_type: job_type.into(),
                    phase: name,
                })
                .set(count as i64);
        }
    }

    async fn act(&mut self, job_type: &str, decision: Decision, now: Instant) {
        let reason = decision.reason;
        let record = |action: &'static str, workers: Vec<String>| {
            self.board.record_event(ScalingEvent {
                unix: unix_now(),
                job_type: job_type.into(),
                action,
                workers,
                reason: reason.clone(),
            });
        };
        let count = |action: &'static str, n: u64| {
            self.metrics
                .decisions
                .get_or_create(&ActionLabels {
                    job_type: job_type.into(),
                    action,
                })
                .inc_by(n);
        };
        match decision.action {
            Action::Spawn(n) => {
                let mut spawned = Vec::new();
                for _ in 0..n {
                    let name = worker_name(job_type);
                    match self.launcher.spawn(job_type, &name).await {
                        Ok(()) => {
                            count("spawn", 1);
                            tracing::info!(job_type, worker = %name, %reason, "spawned a worker");
                            spawned.push(name);
                        }
                        Err(error) => tracing::error!(job_type, %error, "spawn failed"),
                    }
                }
                if !spawned.is_empty() {
                    record("spawn", spawned);
                }
            }
            Action::Drain(names) => {
                let mut drained = Vec::new();
                for name in names {
                    match self.bus.drain(&name).await {
                        Ok(()) => {
                            count("drain", 1);
                            tracing::info!(job_type, worker = %name, %reason, "asked a worker to drain");
                            drained.push(name);
                        }
                        Err(error) => {
                            self.metrics
                                .drain_failures
                                .get_or_create(&JobLabels {
                                    job_type: job_type.into(),
                                })
                                .inc();
                            tracing::warn!(job_type, %error, "drain request not confirmed; trying again next tick");
                        }
                    }
                }
                for name in &drained {
                    self.drains.insert(name.clone(), now);
                }
                if !drained.is_empty() {
                    record("drain", drained);
                }
            }
            Action::Stop(name) => match self.launcher.stop(&name).await {
                Ok(()) => {
                    count("stop", 1);
                    tracing::warn!(job_type, worker = %name, %reason, "stopped a worker that did not drain");
                    record("stop", vec![name]);
                }
                Err(error) => tracing::error!(job_type, %error, "stop failed"),
            },
        }
    }
}

/// How long one management-API read may take: at most 3 s, and never longer than a
/// tick, so a held read delays the next tick by no more than one tick.
pub fn read_timeout(tick: Duration) -> Duration {
    tick.min(Duration::from_secs(3))
}

/// The job table's word for a worker's state.
fn status_of(worker: &WorkerView) -> &'static str {
    match worker.phase {
        Phase::Running if worker.drain_requested_at.is_some() => "draining",
        Phase::Pending => "pending",
        Phase::Running => "running",
        Phase::Succeeded => "succeeded",
        Phase::Failed => "failed",
        Phase::Ended => "ended",
        Phase::Stopping => "stopping",
    }
}
