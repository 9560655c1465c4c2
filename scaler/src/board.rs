//! What the dashboard shows of live scaling: the latest observation of every job
//! type, the workers with their counts, the scaling events, and a short history for
//! the chart. (Batches are not here: the dashboard reads them from the ledger, see
//! [`crate::dashboard::batches`].)
//!
//! The tick writes here; the dashboard's JSON API reads. Everything is bounded
//! (history, events), so a long-running scaler's memory stays flat.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use serde::Serialize;
use spillway_common::{events::unix_now, jobs_config::JobType, rabbit_api::QueueStats};
use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};
use utoipa::ToSchema;

use crate::{
    launcher::LaunchedWorker,
    policy::{Observation, Phase, WorkerView},
    reports::Reports,
};

const HISTORY: usize = 360;
const EVENTS: usize = 200;
/// One job type as last observed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct JobTypeStats {
    pub job_type: String,
    /// Its RabbitMQ queue.
    pub queue: String,
    /// Rows waiting in the queue; `None` when the last read of the queue failed (as
    /// for each of the queue's figures).
    pub ready: Option<u64>,
    /// Rows delivered to workers and not yet acked.
    pub unacked: Option<u64>,
    /// Rows acked by workers since the queue was created.
    pub consumed_total: Option<u64>,
    /// Rows waiting in `<queue>.dead`.
    pub dead_lettered: Option<u64>,
    /// Its workers that are pending, running or stopping.
    pub workers_active: u64,
    /// The most workers it may have.
    pub max_jobs: u32,
    /// Paused by an operator: spawning nothing, its workers draining.
    pub paused: bool,
    /// Rows of batches cancelled lately that may still wait in the queue: worth one
    /// worker to ack them, not a burst.
    pub cancelled_in_queue: u64,
    /// Why it got fewer workers than its policy wanted this tick, if it did: the total
    /// cap, higher priorities, or a pause.
    pub held: Option<String>,
}

impl JobTypeStats {
    /// The row of one job type's observation: queue figures (`None` where the read
    /// failed), rows in its dead queue, and its active workers.
    pub fn observed(
        job_type: &str,
        job: &JobType,
        stats: Option<QueueStats>,
        dead_lettered: Option<u64>,
        observation: &Observation,
    ) -> Self {
        JobTypeStats {
            job_type: job_type.into(),
            queue: job.queue.clone(),
            ready: stats.map(|s| s.ready),
            unacked: stats.map(|s| s.unacked),
            consumed_total: stats.map(|s| s.acked_total),
            dead_lettered,
            workers_active: observation
                .workers
                .iter()
                .filter(|w| w.phase.is_active())
                .count() as u64,
            max_jobs: job.max_jobs,
            paused: observation.paused,
            cancelled_in_queue: observation.cancelled_in_queue,
            held: None,
        }
    }
}

/// A point of the chart: every job type's figures added up, at one tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct Sample {
    /// When, in seconds since the Unix epoch.
    pub unix: u64,
    pub ready: u64,
    pub unacked: u64,
    /// Active workers.
    pub workers: u64,
}

/// A spawn, drain or stop, with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ScalingEvent {
    /// When, in seconds since the Unix epoch.
    pub unix: u64,
    pub job_type: String,
    /// `spawn`, `drain` or `stop`.
    pub action: &'static str,
    /// The workers it concerned.
    pub workers: Vec<String>,
    /// Why the scaler decided it.
    pub reason: String,
}

/// A worker as the launcher lists it, before its counts are added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobListing {
    pub name: String,
    pub job_type: String,
    pub status: &'static str,
    pub started_unix: u64,
}

impl JobListing {
    /// The listings of workers of `job_type`: each view beside its launcher's record.
    pub fn of(job_type: &str, views: &[WorkerView], launched: &[&LaunchedWorker]) -> Vec<Self> {
        views
            .iter()
            .zip(launched)
            .map(|(view, launched)| JobListing {
                name: view.name.clone(),
                job_type: job_type.into(),
                status: status_of(view),
                started_unix: launched.started_unix,
            })
            .collect()
    }
}

/// The job table's word for a worker's state.
fn status_of(worker: &WorkerView) -> &'static str {
    match worker.phase {
        Phase::Running if worker.drain_requested_at.is_some() => "draining",
        phase => phase.as_str(),
    }
}

/// A row of the job table: a worker, with the counts of its latest report (zero
/// before its first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct JobView {
    /// The worker's name.
    pub name: String,
    pub job_type: String,
    /// `pending`, `running`, `draining`, `stopping`, `succeeded`, `failed` or `ended`.
    pub status: &'static str,
    /// When it was started, in seconds since the Unix epoch.
    pub started_unix: u64,
    /// Rows it handled successfully.
    pub processed: u64,
    /// Failed rows it returned to the queue for another attempt.
    pub failed: u64,
    /// Rows it sent to the dead queue.
    pub dead_lettered: u64,
    /// Rows in its hands now.
    pub in_flight: u64,
    /// When a row last started or finished in it, in seconds since the Unix epoch;
    /// null before its first report.
    pub last_activity_unix: Option<u64>,
}

/// CPU and memory of the scaler process and of the host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, ToSchema)]
pub struct Resources {
    pub scaler_cpu_percent: f32,
    pub scaler_memory_bytes: u64,
    pub host_cpu_percent: f32,
    pub host_memory_used_bytes: u64,
    pub host_memory_total_bytes: u64,
}

/// What `/api/stats` answers: the board's figures as last observed.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct StatsView {
    pub job_types: Vec<JobTypeStats>,
    pub totals: Totals,
    pub resources: Resources,
    /// One sample a tick, oldest first, the last few hundred ticks.
    pub history: Vec<Sample>,
    /// When the last tick observed, in seconds since the Unix epoch (0 before the first).
    pub updated_unix: u64,
}

/// Every job type's figures added up (a figure that could not be read counts as 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct Totals {
    pub ready: u64,
    pub unacked: u64,
    pub consumed_total: u64,
    pub dead_lettered: u64,
    pub workers_active: u64,
    pub max_jobs: u64,
}

#[derive(Default)]
struct State {
    job_types: Vec<JobTypeStats>,
    jobs: Vec<JobListing>,
    history: VecDeque<Sample>,
    events: VecDeque<ScalingEvent>,
    updated_unix: u64,
}

pub struct Board {
    state: Mutex<State>,
    /// Each worker's latest report, owned by [`Reports`]: the job table reads its
    /// counts from there rather than keeping a copy.
    reports: Arc<Reports>,
    system: Mutex<Option<System>>,
}

impl Default for Board {
    fn default() -> Self {
        Self::new(Arc::default())
    }
}

impl Board {
    pub fn new(reports: Arc<Reports>) -> Self {
        Board {
            state: Mutex::default(),
            reports,
            system: Mutex::new(System::new().ok()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("board lock")
    }

    pub fn record_event(&self, event: ScalingEvent) {
        let mut state = self.state();
        if state.events.len() >= EVENTS {
            state.events.pop_front();
        }
        state.events.push_back(event);
    }

    /// Records one tick's observation of every job type and the launcher's workers.
    pub fn record_tick(&self, job_types: Vec<JobTypeStats>, jobs: Vec<JobListing>) {
        let mut state = self.state();
        let sample = Sample {
            unix: unix_now(),
            ready: job_types.iter().filter_map(|j| j.ready).sum(),
            unacked: job_types.iter().filter_map(|j| j.unacked).sum(),
            workers: job_types.iter().map(|j| j.workers_active).sum(),
        };
        if state.history.len() >= HISTORY {
            state.history.pop_front();
        }
        state.history.push_back(sample);
        state.job_types = job_types;
        state.jobs = jobs;
        state.updated_unix = sample.unix;
    }

    pub fn stats(&self) -> StatsView {
        let resources = self.resources();
        let state = self.state();
        let totals = state
            .job_types
            .iter()
            .fold(Totals::default(), |t, j| Totals {
                ready: t.ready + j.ready.unwrap_or(0),
                unacked: t.unacked + j.unacked.unwrap_or(0),
                consumed_total: t.consumed_total + j.consumed_total.unwrap_or(0),
                dead_lettered: t.dead_lettered + j.dead_lettered.unwrap_or(0),
                workers_active: t.workers_active + j.workers_active,
                max_jobs: t.max_jobs + u64::from(j.max_jobs),
            });
        StatsView {
            job_types: state.job_types.clone(),
            totals,
            resources,
            history: state.history.iter().copied().collect(),
            updated_unix: state.updated_unix,
        }
    }

    /// Workers, newest first, with their last reported counts.
    pub fn jobs(&self) -> Vec<JobView> {
        let state = self.state();
        let mut jobs: Vec<JobView> = state
            .jobs
            .iter()
            .map(|job| {
                let report = self.reports.get(&job.name).map(|(report, _)| report);
                let report = report.as_ref();
                JobView {
                    name: job.name.clone(),
                    job_type: job.job_type.clone(),
                    status: job.status,
                    started_unix: job.started_unix,
                    processed: report.map_or(0, |r| r.processed),
                    failed: report.map_or(0, |r| r.failed),
                    dead_lettered: report.map_or(0, |r| r.dead_lettered),
                    in_flight: report.map_or(0, |r| r.in_flight),
                    last_activity_unix: report.map(|r| r.last_activity_unix),
                }
            })
            .collect();
        jobs.sort_by(|a, b| {
            b.started_unix
                .cmp(&a.started_unix)
                .then(a.name.cmp(&b.name))
        });
        jobs
    }

    /// Scaling events, newest first.
    pub fn events(&self) -> Vec<ScalingEvent> {
        self.state().events.iter().rev().cloned().collect()
    }

    fn resources(&self) -> Resources {
        let mut system = self.system.lock().expect("system lock");
        let Some(system) = system.as_mut() else {
            return Resources::default();
        };
        let pid = Pid::from_u32(std::process::id());
        system.refresh_cpu_usage();
        system.refresh_memory();
        system.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[pid]),
            true,
            ProcessRefreshKind::nothing().with_cpu().with_memory(),
        );
        let own = system.process(pid);
        Resources {
            scaler_cpu_percent: own.map_or(0.0, |p| p.cpu_usage()),
            scaler_memory_bytes: own.map_or(0, |p| p.memory()),
            host_cpu_percent: system.global_cpu_usage(),
            host_memory_used_bytes: system.used_memory(),
            host_memory_total_bytes: system.total_memory(),
        }
    }
}

#[cfg(test)]
mod tests {
    use spillway_common::events::WorkerReport;
    use spillway_testkit::builders::worker_report;

    use super::*;

    #[test]
    fn the_job_table_carries_the_counts_of_each_workers_latest_report() {
        let reports = Arc::new(Reports::default());
        let board = Board::new(Arc::clone(&reports));
        let report = WorkerReport {
            processed: 3,
            in_flight: 1,
            ..worker_report("w1")
        };
        reports.record(report, std::time::Instant::now());
        let listing = |name: &str, started| JobListing {
            name: name.into(),
            job_type: "default".into(),
            status: "running",
            started_unix: started,
        };
        board.record_tick(vec![], vec![listing("w1", 10), listing("w2", 20)]);
        let jobs = board.jobs();
        assert_eq!(
            jobs.iter().map(|j| j.name.as_str()).collect::<Vec<_>>(),
            ["w2", "w1"],
            "newest first"
        );
        assert_eq!((jobs[1].processed, jobs[1].in_flight), (3, 1));
        assert_eq!(jobs[0].last_activity_unix, None, "no report yet");
        board.record_tick(vec![], vec![listing("w2", 20)]);
        assert_eq!(board.jobs().len(), 1);
    }

    #[test]
    fn history_and_events_are_bounded() {
        let board = Board::default();
        for _ in 0..HISTORY + 5 {
            board.record_tick(vec![], vec![]);
        }
        for n in 0..EVENTS + 5 {
            board.record_event(ScalingEvent {
                unix: n as u64,
                job_type: "default".into(),
                action: "spawn",
                workers: vec![],
                reason: "test".into(),
            });
        }
        assert_eq!(board.stats().history.len(), HISTORY);
        let events = board.events();
        assert_eq!(events.len(), EVENTS);
        assert_eq!(events[0].unix, (EVENTS + 4) as u64, "newest first");
    }
}
