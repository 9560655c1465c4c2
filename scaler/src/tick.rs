//! The tick: observe, decide, act, record. Glue only.
//!
//! Each tick reads the launcher's workers once, then for each job type its queue's
//! depth and its workers' latest reports, asks the pure policy what to do, and does
//! it through the [`Context`]: the launcher, drain requests, the metrics and the
//! board. A failed read is passed on as "unknown", which the policy never takes for
//! idle.
//!
//! Every job type's queue and dead queue are read at once, each read bounded by
//! [`read_timeout`], and each job type is decided as soon as its own figures are in:
//! a management API that holds the reads of one queue delays that job type only, and
//! the tick by at most one read timeout.

/// Also the fakes of the queue figures and drain requests other modules' tests use.
#[cfg(test)]
pub(crate) mod tests;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::{StreamExt, stream::FuturesUnordered};
use spillway_common::{
    events::{WorkerState, unix_now},
    jobs_config::JobsConfig,
    rabbit_api::{ApiError, QueueStats},
    topology::dead_queue_name,
};

use crate::{
    board::{JobListing, JobTypeStats, ScalingEvent},
    context::{Context, DrainRequests, QueueFigures},
    launcher::{LaunchedWorker, Launcher, worker_name},
    metrics::{ActionLabels, HeldLabels, JobLabels},
    policy::{
        self, Action, Decision, Limits, Memory, Observation, Phase, Progress, QueueDepth,
        WorkerView,
    },
    share,
};

/// Finished workers (succeeded, failed, ended) the scaler keeps listed with their
/// logs, the newest first; older ones are forgotten ([`Launcher::forget`]).
pub const FINISHED_KEPT: usize = 100;

/// Finished workers forgotten in one tick at most.
const FORGOTTEN_PER_TICK: usize = 50;

pub struct Scaler<L, Q, D> {
    pub jobs: JobsConfig,
    pub ctx: Context<L, Q, D>,
    memory: HashMap<String, Memory>,
    /// When each worker was asked to drain (or first seen draining).
    drains: HashMap<String, Instant>,
}

impl<L: Launcher, Q: QueueFigures, D: DrainRequests> Scaler<L, Q, D> {
    pub fn new(jobs: JobsConfig, ctx: Context<L, Q, D>) -> Self {
        Scaler {
            jobs,
            ctx,
            memory: HashMap::new(),
            drains: HashMap::new(),
        }
    }

    pub async fn tick(&mut self, now: Instant) {
        self.ctx.metrics.ticks.inc();
        let workers = match self.ctx.launcher.workers().await {
            Ok(workers) => workers,
            Err(error) => {
                tracing::error!(%error, "cannot list workers; doing nothing this tick");
                return;
            }
        };
        let active: HashSet<&str> = workers
            .iter()
            .filter(|w| w.phase.is_active())
            .map(|w| w.name.as_str())
            .collect();
        self.ctx.reports.retain(|name| active.contains(name));
        self.drains.retain(|name, _| active.contains(name.as_str()));

        let mut reads: FuturesUnordered<_> = self
            .jobs
            .job_types
            .iter()
            .map(|(job_type, job)| {
                let queues = Arc::clone(&self.ctx.queues);
                let (job_type, job) = (job_type.clone(), job.clone());
                async move {
                    let dead_queue = dead_queue_name(&job.queue);
                    let (queue, dead) = tokio::join!(
                        queues.queue_stats(&job.queue),
                        queues.queue_stats(&dead_queue)
                    );
                    (job_type, job, queue, dead)
                }
            })
            .collect();
        let mut board_rows = Vec::with_capacity(reads.len());
        let mut spawns = Vec::new();
        let mut listings = Vec::with_capacity(workers.len());
        while let Some((job_type, job, queue, dead)) = reads.next().await {
            let stats = self.queue_stats(&job_type, queue);
            let launched: Vec<&LaunchedWorker> =
                workers.iter().filter(|w| w.job_type == job_type).collect();
            let observation = Observation {
                queue: stats.map(|s| QueueDepth {
                    ready: s.ready,
                    unacked: s.unacked,
                }),
                workers: launched.iter().map(|w| self.view(w, now)).collect(),
                last_batch_published: self.ctx.reports.last_batch_published(&job_type),
                news: self.ctx.reports.news(&job_type, now),
                paused: self.ctx.reports.is_paused(&job_type),
                cancelled_in_queue: self.ctx.reports.cancelled_in_queue(&job_type, now),
            };
            self.ctx.metrics.record_observation(&job_type, &observation);
            board_rows.push(JobTypeStats::observed(
                &job_type,
                &job,
                stats,
                dead.ok().map(|s| s.ready + s.unacked),
                &observation,
            ));
            listings.extend(JobListing::of(&job_type, &observation.workers, &launched));
            let limits = Limits {
                threshold: job.threshold,
                burst_threshold: job.burst_threshold,
                burst_size: job.burst_size,
                max_jobs: job.max_jobs,
                idle_window: self.jobs.idle_window(),
                drain_grace: self.ctx.timing.drain_grace,
                start_timeout: self.ctx.timing.start_timeout,
            };
            let memory = self.memory.remove(&job_type).unwrap_or_default();
            let (decisions, memory) = policy::decide(&observation, &limits, memory, now);
            self.memory.insert(job_type.clone(), memory);
            let waiting = observation.queue.map_or(0, |q| q.ready);
            if observation.paused && waiting > 0 {
                self.held(&job_type, "paused");
                if let Some(row) = board_rows.last_mut() {
                    row.held = Some("paused".into());
                }
            }
            for decision in decisions {
                match decision.action {
                    // Under a total cap, spawns wait until every job type has asked, to
                    // share the room; without one, nothing waits for a slow read.
                    Action::Spawn(wanted) if self.jobs.max_workers_total.is_some() => {
                        spawns.push((
                            share::Request {
                                job_type: job_type.clone(),
                                priority: job.priority,
                                wanted,
                                waiting,
                            },
                            decision.reason,
                        ))
                    }
                    _ => self.act(&job_type, decision, now).await,
                }
            }
        }
        self.orphans(&workers, &mut listings, now).await;
        let total = self.jobs.max_workers_total;
        let room = total.map(|total| {
            let active = workers.iter().filter(|w| w.phase.is_active()).count();
            total.saturating_sub(u32::try_from(active).unwrap_or(u32::MAX))
        });
        let requests: Vec<share::Request> = spawns.iter().map(|(r, _)| r.clone()).collect();
        let grants = share::share(&requests, room, total.unwrap_or(0));
        for (grant, (_, reason)) in grants.into_iter().zip(spawns) {
            if let Some(held) = &grant.held {
                let why = match held {
                    share::Held::Cap { .. } => "cap",
                    share::Held::Priority { .. } => "priority",
                };
                self.held(&grant.job_type, why);
                if let Some(row) = board_rows.iter_mut().find(|r| r.job_type == grant.job_type) {
                    row.held = Some(held.to_string());
                }
            }
            if grant.spawn > 0 {
                let reason = match &grant.held {
                    Some(held) => format!("{reason}; {} of them: {held}", grant.spawn),
                    None => reason,
                };
                let decision = Decision {
                    action: Action::Spawn(grant.spawn),
                    reason,
                };
                self.act(&grant.job_type, decision, now).await;
            }
        }
        // By job type name, as job types are listed everywhere, whichever read ended first.
        board_rows.sort_by(|a, b| a.job_type.cmp(&b.job_type));
        self.ctx.board.record_tick(board_rows, listings);
        self.forget_finished(&workers).await;
    }

    /// Forgets finished workers beyond the newest [`FINISHED_KEPT`], so that they do
    /// not pile up (a Job's TTL bounds them in time, this in number, for either launcher).
    async fn forget_finished(&self, workers: &[LaunchedWorker]) {
        let mut finished: Vec<&LaunchedWorker> = workers
            .iter()
            .filter(|w| matches!(w.phase, Phase::Succeeded | Phase::Failed | Phase::Ended))
            .collect();
        if finished.len() <= FINISHED_KEPT {
            return;
        }
        finished.sort_by_key(|w| std::cmp::Reverse(w.started_unix));
        // The oldest first, a bounded number a tick and a few at once: after a wave of
        // thousands of workers the history shrinks over a few ticks, none held long.
        let forgetting = finished[FINISHED_KEPT..]
            .iter()
            .rev()
            .take(FORGOTTEN_PER_TICK)
            .map(|worker| async move {
                match self.ctx.launcher.forget(&worker.name).await {
                    Ok(()) => tracing::debug!(worker = %worker.name, "forgot a finished worker"),
                    Err(error) => tracing::warn!(%error, "cannot forget a finished worker"),
                }
            });
        futures_util::stream::iter(forgetting)
            .buffer_unordered(8)
            .collect::<()>()
            .await;
    }

    /// Counts a tick in which `job_type` got fewer workers than it wanted, and `why`.
    fn held(&self, job_type: &str, why: &'static str) {
        self.ctx
            .metrics
            .held
            .get_or_create(&HeldLabels {
                job_type: job_type.into(),
                why,
            })
            .inc();
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
            listings.extend(JobListing::of(label, &views, &launched));
            let why = if label.is_empty() {
                "a worker without a job type".to_string()
            } else {
                format!("job type {label:?} is not configured")
            };
            let grace = self.ctx.timing.drain_grace;
            for decision in policy::decide_orphans(&views, &why, grace, now) {
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
                self.ctx
                    .metrics
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
        let report = self.ctx.reports.get(&worker.name);
        if let Some((report, _)) = &report
            && report.state != WorkerState::Running
        {
            // Draining on its own (SIGTERM) or asked by an earlier scaler.
            self.drains.entry(worker.name.clone()).or_insert(now);
        }
        let stale_after = self.ctx.timing.report_stale_after;
        let fresh = report.filter(|(_, at)| now.saturating_duration_since(*at) <= stale_after);
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

    async fn act(&mut self, job_type: &str, decision: Decision, now: Instant) {
        let reason = decision.reason;
        let record = |action: &'static str, workers: Vec<String>| {
            self.ctx.board.record_event(ScalingEvent {
                unix: unix_now(),
                job_type: job_type.into(),
                action,
                workers,
                reason: reason.clone(),
            });
        };
        let count = |action: &'static str, n: u64| {
            self.ctx
                .metrics
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
                    match self.ctx.launcher.spawn(job_type, &name).await {
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
                    match self.ctx.drains.drain(&name).await {
                        Ok(()) => {
                            count("drain", 1);
                            tracing::info!(job_type, worker = %name, %reason, "asked a worker to drain");
                            drained.push(name);
                        }
                        Err(error) => {
                            self.ctx
                                .metrics
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
            Action::Stop(name) => match self.ctx.launcher.stop(&name).await {
                Ok(()) => {
                    count("stop", 1);
                    tracing::warn!(job_type, worker = %name, %reason, "stopped a worker");
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
