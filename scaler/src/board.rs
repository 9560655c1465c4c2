//! What the dashboard shows: the latest observation of every job type, the workers
//! with their counts, recent batches with their progress, the scaling events, and a
//! short history for the chart.
//!
//! The tick and the bus write here; the dashboard's JSON API reads. Everything is
//! bounded (history, events, batches), so a long-running scaler's memory stays flat.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
};

use serde::Serialize;
use spillway_common::events::{BatchCounts, BatchPublished, WorkerReport, unix_now};
use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

const HISTORY: usize = 360;
const EVENTS: usize = 200;
const BATCHES: usize = 200;

/// One job type as last observed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct JobTypeStats {
    pub job_type: String,
    pub queue: String,
    /// `None` when the last read of the queue failed.
    pub ready: Option<u64>,
    pub unacked: Option<u64>,
    /// Rows acked by workers since the queue was created.
    pub consumed_total: Option<u64>,
    /// Rows waiting in `<queue>.dead`.
    pub dead_lettered: Option<u64>,
    pub workers_active: u64,
    pub max_jobs: u32,
}

/// A point of the chart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Sample {
    pub unix: u64,
    pub ready: u64,
    pub unacked: u64,
    pub workers: u64,
}

/// A spawn, drain or stop, with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScalingEvent {
    pub unix: u64,
    pub job_type: String,
    pub action: &'static str,
    pub workers: Vec<String>,
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

/// A row of the job table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobView {
    pub name: String,
    pub job_type: String,
    pub status: &'static str,
    pub started_unix: u64,
    pub processed: u64,
    pub failed: u64,
    pub dead_lettered: u64,
    pub in_flight: u64,
    pub last_activity_unix: Option<u64>,
}

/// A row of the batch table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BatchView {
    pub batch_id: String,
    pub job_type: Option<String>,
    /// Rows published; `None` until the producer's announcement arrives.
    pub rows: Option<u64>,
    pub processed: u64,
    pub failed: u64,
    pub dead_lettered: u64,
    /// Share of rows finished (processed or dead), from 0.0 to 1.0, when `rows` is known.
    pub progress: Option<f64>,
    pub published_unix: Option<u64>,
}

/// CPU and memory of the scaler process and of the host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Resources {
    pub scaler_cpu_percent: f32,
    pub scaler_memory_bytes: u64,
    pub host_cpu_percent: f32,
    pub host_memory_used_bytes: u64,
    pub host_memory_total_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatsView {
    pub job_types: Vec<JobTypeStats>,
    pub totals: Totals,
    pub resources: Resources,
    pub history: Vec<Sample>,
    pub updated_unix: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub ready: u64,
    pub unacked: u64,
    pub consumed_total: u64,
    pub dead_lettered: u64,
    pub workers_active: u64,
    pub max_jobs: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct WorkerCounts {
    processed: u64,
    failed: u64,
    dead_lettered: u64,
    in_flight: u64,
    last_activity_unix: u64,
}

#[derive(Debug, Default)]
struct BatchEntry {
    published: Option<BatchPublished>,
    by_worker: HashMap<String, BatchCounts>,
}

#[derive(Default)]
struct State {
    job_types: Vec<JobTypeStats>,
    jobs: Vec<JobListing>,
    history: VecDeque<Sample>,
    events: VecDeque<ScalingEvent>,
    workers: HashMap<String, WorkerCounts>,
    batches: HashMap<String, BatchEntry>,
    batch_order: VecDeque<String>,
    updated_unix: u64,
}

impl State {
    fn batch(&mut self, batch_id: &str) -> &mut BatchEntry {
        if !self.batches.contains_key(batch_id) {
            if self.batch_order.len() >= BATCHES
                && let Some(oldest) = self.batch_order.pop_front()
            {
                self.batches.remove(&oldest);
            }
            self.batch_order.push_back(batch_id.to_string());
        }
        self.batches.entry(batch_id.to_string()).or_default()
    }
}

pub struct Board {
    state: Mutex<State>,
    system: Mutex<Option<System>>,
}

impl Default for Board {
    fn default() -> Self {
        Self::new()
    }
}

impl Board {
    pub fn new() -> Self {
        Board {
            state: Mutex::default(),
            system: Mutex::new(System::new().ok()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("board lock")
    }

    pub fn record_report(&self, report: &WorkerReport) {
        let mut state = self.state();
        state.workers.insert(
            report.worker.clone(),
            WorkerCounts {
                processed: report.processed,
                failed: report.failed,
                dead_lettered: report.dead_lettered,
                in_flight: report.in_flight,
                last_activity_unix: report.last_activity_unix,
            },
        );
        for (batch_id, counts) in &report.batches {
            state
                .batch(batch_id)
                .by_worker
                .insert(report.worker.clone(), *counts);
        }
    }

    pub fn record_batch(&self, batch: BatchPublished) {
        let mut state = self.state();
        let batch_id = batch.batch_id.clone();
        state.batch(&batch_id).published = Some(batch);
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
        state
            .workers
            .retain(|name, _| jobs.iter().any(|j| &j.name == name));
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
                let counts = state.workers.get(&job.name).copied();
                JobView {
                    name: job.name.clone(),
                    job_type: job.job_type.clone(),
                    status: job.status,
                    started_unix: job.started_unix,
                    processed: counts.map_or(0, |c| c.processed),
                    failed: counts.map_or(0, |c| c.failed),
                    dead_lettered: counts.map_or(0, |c| c.dead_lettered),
                    in_flight: counts.map_or(0, |c| c.in_flight),
                    last_activity_unix: counts.map(|c| c.last_activity_unix),
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

    /// Recent batches, newest first.
    pub fn batches(&self) -> Vec<BatchView> {
        let state = self.state();
        state
            .batch_order
            .iter()
            .rev()
            .filter_map(|id| state.batches.get(id).map(|entry| (id, entry)))
            .map(|(id, entry)| {
                let sum = |f: fn(&BatchCounts) -> u64| entry.by_worker.values().map(f).sum::<u64>();
                let processed = sum(|c| c.processed);
                let dead_lettered = sum(|c| c.dead_lettered);
                let rows = entry.published.as_ref().map(|p| p.rows);
                BatchView {
                    batch_id: id.clone(),
                    job_type: entry.published.as_ref().map(|p| p.job_type.clone()),
                    rows,
                    processed,
                    failed: sum(|c| c.failed),
                    dead_lettered,
                    progress: rows
                        .filter(|&r| r > 0)
                        .map(|r| ((processed + dead_lettered) as f64 / r as f64).min(1.0)),
                    published_unix: entry.published.as_ref().map(|p| p.published_unix),
                }
            })
            .collect()
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
    use std::collections::BTreeMap;

    use spillway_common::events::WorkerState;

    use super::*;

    fn report(worker: &str, batches: &[(&str, u64, u64)]) -> WorkerReport {
        WorkerReport {
            worker: worker.into(),
            job_type: "default".into(),
            queue: "tasks".into(),
            state: WorkerState::Running,
            processed: batches.iter().map(|b| b.1).sum(),
            failed: 0,
            dead_lettered: batches.iter().map(|b| b.2).sum(),
            in_flight: 1,
            started_unix: 1,
            last_activity_unix: 2,
            sent_unix: 3,
            batches: batches
                .iter()
                .map(|&(id, processed, dead_lettered)| {
                    (
                        id.to_string(),
                        BatchCounts {
                            processed,
                            failed: 0,
                            dead_lettered,
                            last_unix: 2,
                        },
                    )
                })
                .collect::<BTreeMap<_, _>>(),
        }
    }

    #[test]
    fn batch_progress_adds_up_every_worker_latest_counts() {
        let board = Board::new();
        board.record_batch(BatchPublished {
            batch_id: "b1".into(),
            job_type: "default".into(),
            queue: "tasks".into(),
            rows: 10,
            published_unix: 5,
        });
        board.record_report(&report("w1", &[("b1", 3, 0)]));
        board.record_report(&report("w2", &[("b1", 2, 1)]));
        // A later report from w1 replaces its earlier counts rather than adding to them.
        board.record_report(&report("w1", &[("b1", 4, 0)]));
        let batches = board.batches();
        assert_eq!(batches.len(), 1);
        let b1 = &batches[0];
        assert_eq!((b1.rows, b1.processed, b1.dead_lettered), (Some(10), 6, 1));
        assert_eq!(b1.progress, Some(0.7));
    }

    #[test]
    fn a_batch_seen_only_in_reports_has_no_progress_yet() {
        let board = Board::new();
        board.record_report(&report("w1", &[("b9", 1, 0)]));
        let b9 = &board.batches()[0];
        assert_eq!((b9.rows, b9.progress, b9.processed), (None, None, 1));
    }

    #[test]
    fn the_job_table_carries_counts_until_the_worker_is_forgotten() {
        let board = Board::new();
        board.record_report(&report("w1", &[("b1", 3, 0)]));
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
        let board = Board::new();
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
