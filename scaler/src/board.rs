//! What the dashboard shows: the latest observation of every job type, the workers
//! with their counts, recent batches with their progress, the scaling events, and a
//! short history for the chart.
//!
//! The tick and the bus write here; the dashboard's JSON API reads. Everything is
//! bounded (history, events, batches), so a long-running scaler's memory stays flat.
//!
//! Batches are bounded without lying about them: finished batches are forgotten first
//! (oldest first), one still in progress only beyond a much larger bound; a forgotten
//! batch stays forgotten, since a worker's report alone cannot bring back the
//! producer's announcement (its job type and row count); and how many batches were
//! forgotten is part of the answer.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
};

use serde::Serialize;
use spillway_common::{
    events::{BatchCounts, BatchPublished, WorkerReport, unix_now},
    jobs_config::JobType,
    rabbit_api::QueueStats,
};
use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

use crate::{
    launcher::LaunchedWorker,
    policy::{Observation, Phase, WorkerView},
    reports::Reports,
};

const HISTORY: usize = 360;
const EVENTS: usize = 200;
/// Batches kept while finished ones can make room.
const BATCHES: usize = 200;
/// Batches kept at most, in progress or not: beyond this the oldest are forgotten,
/// batches never announced first.
const BATCHES_IN_PROGRESS: usize = 2_000;
/// Forgotten batch ids remembered, so reports naming them are ignored.
const FORGOTTEN: usize = 4_096;
/// A batch first heard of in a report is added only if that worker settled one of its
/// rows this recently (by the worker's own clock): reports also name old batches,
/// whose announcement a restarted scaler never heard.
const REPORTED_RECENTLY_SECONDS: u64 = 60;

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
        }
    }
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

/// The batch table: recent batches, newest first, and how many the board forgot.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BatchesView {
    pub batches: Vec<BatchView>,
    /// Batches no longer shown (finished ones first, to keep the board bounded).
    pub not_shown: u64,
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

#[derive(Debug, Default)]
struct BatchEntry {
    published: Option<BatchPublished>,
    by_worker: HashMap<String, BatchCounts>,
}

impl BatchEntry {
    fn sum(&self, field: fn(&BatchCounts) -> u64) -> u64 {
        self.by_worker.values().map(field).sum()
    }

    /// Announced, and every row processed or dead-lettered.
    fn finished(&self) -> bool {
        self.published
            .as_ref()
            .is_some_and(|p| self.sum(|c| c.processed) + self.sum(|c| c.dead_lettered) >= p.rows)
    }
}

#[derive(Default)]
struct State {
    job_types: Vec<JobTypeStats>,
    jobs: Vec<JobListing>,
    history: VecDeque<Sample>,
    events: VecDeque<ScalingEvent>,
    batches: HashMap<String, BatchEntry>,
    /// Batch ids, oldest first.
    batch_order: VecDeque<String>,
    forgotten: HashSet<String>,
    forgotten_order: VecDeque<String>,
    batches_not_shown: u64,
    updated_unix: u64,
}

impl State {
    fn batch(&mut self, batch_id: &str) -> &mut BatchEntry {
        if !self.batches.contains_key(batch_id) {
            self.batch_order.push_back(batch_id.to_string());
        }
        self.batches.entry(batch_id.to_string()).or_default()
    }

    /// Forgets batches beyond the bounds: finished ones first, oldest first; one in
    /// progress only beyond [`BATCHES_IN_PROGRESS`], one never announced first.
    fn evict_batches(&mut self) {
        while self.batches.len() > BATCHES {
            let oldest_where = |keep: fn(&BatchEntry) -> bool| {
                self.batch_order
                    .iter()
                    .position(|id| self.batches.get(id).is_some_and(keep))
            };
            let victim = match oldest_where(BatchEntry::finished) {
                Some(at) => at,
                None if self.batches.len() > BATCHES_IN_PROGRESS => {
                    oldest_where(|entry| entry.published.is_none()).unwrap_or(0)
                }
                None => return,
            };
            let Some(id) = self.batch_order.remove(victim) else {
                return;
            };
            self.batches.remove(&id);
            self.batches_not_shown += 1;
            if self.forgotten_order.len() >= FORGOTTEN
                && let Some(oldest) = self.forgotten_order.pop_front()
            {
                self.forgotten.remove(&oldest);
            }
            self.forgotten.insert(id.clone());
            self.forgotten_order.push_back(id);
        }
    }
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

    /// The progress of the batches a worker's report counts rows of.
    pub fn record_report(&self, report: &WorkerReport) {
        let mut state = self.state();
        for (batch_id, counts) in &report.batches {
            let known = state.batches.contains_key(batch_id);
            let recent = counts.last_unix + REPORTED_RECENTLY_SECONDS >= report.sent_unix;
            if known || (recent && !state.forgotten.contains(batch_id)) {
                state
                    .batch(batch_id)
                    .by_worker
                    .insert(report.worker.clone(), *counts);
            }
        }
        state.evict_batches();
    }

    pub fn record_batch(&self, batch: BatchPublished) {
        let mut state = self.state();
        // An announcement arrives once per batch: one for a forgotten batch is a
        // redelivery, and its rows' counts are gone with it.
        if state.forgotten.contains(&batch.batch_id) {
            return;
        }
        let batch_id = batch.batch_id.clone();
        state.batch(&batch_id).published = Some(batch);
        state.evict_batches();
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

    /// Recent batches, newest first, and how many are no longer shown.
    pub fn batches(&self) -> BatchesView {
        let state = self.state();
        let batches = state
            .batch_order
            .iter()
            .rev()
            .filter_map(|id| state.batches.get(id).map(|entry| (id, entry)))
            .map(|(id, entry)| {
                let processed = entry.sum(|c| c.processed);
                let dead_lettered = entry.sum(|c| c.dead_lettered);
                let rows = entry.published.as_ref().map(|p| p.rows);
                BatchView {
                    batch_id: id.clone(),
                    job_type: entry.published.as_ref().map(|p| p.job_type.clone()),
                    rows,
                    processed,
                    failed: entry.sum(|c| c.failed),
                    dead_lettered,
                    progress: rows
                        .filter(|&r| r > 0)
                        .map(|r| ((processed + dead_lettered) as f64 / r as f64).min(1.0)),
                    published_unix: entry.published.as_ref().map(|p| p.published_unix),
                }
            })
            .collect();
        BatchesView {
            batches,
            not_shown: state.batches_not_shown,
        }
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

    use spillway_testkit::builders::worker_report;

    use super::*;

    fn report(worker: &str, batches: &[(&str, u64, u64)]) -> WorkerReport {
        WorkerReport {
            processed: batches.iter().map(|b| b.1).sum(),
            dead_lettered: batches.iter().map(|b| b.2).sum(),
            in_flight: 1,
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
            ..worker_report(worker)
        }
    }

    #[test]
    fn batch_progress_adds_up_every_worker_latest_counts() {
        let board = Board::default();
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
        let batches = board.batches().batches;
        assert_eq!(batches.len(), 1);
        let b1 = &batches[0];
        assert_eq!((b1.rows, b1.processed, b1.dead_lettered), (Some(10), 6, 1));
        assert_eq!(b1.progress, Some(0.7));
    }

    #[test]
    fn a_batch_seen_only_in_reports_has_no_progress_yet() {
        let board = Board::default();
        board.record_report(&report("w1", &[("b9", 1, 0)]));
        let b9 = &board.batches().batches[0];
        assert_eq!((b9.rows, b9.progress, b9.processed), (None, None, 1));
    }

    fn announce(board: &Board, batch_id: &str, rows: u64) {
        board.record_batch(BatchPublished {
            batch_id: batch_id.into(),
            job_type: "default".into(),
            queue: "tasks".into(),
            rows,
            published_unix: 5,
        });
    }

    fn shown(board: &Board) -> Vec<String> {
        board
            .batches()
            .batches
            .into_iter()
            .map(|b| b.batch_id)
            .collect()
    }

    /// Issue 15: with more than 200 batches the oldest were evicted whatever their
    /// state, the six being processed among them. Here 250 batches of 2 rows: the 10
    /// oldest are half done, the 240 others finished.
    #[test]
    fn finished_batches_are_forgotten_first_and_one_in_progress_never() {
        let board = Board::default();
        for n in 0..250 {
            let id = format!("b{n:03}");
            announce(&board, &id, 2);
            let processed = if n < 10 { 1 } else { 2 };
            board.record_report(&report(&format!("w{n}"), &[(&id, processed, 0)]));
        }
        let view = board.batches();
        assert_eq!(view.batches.len(), BATCHES);
        assert_eq!(view.not_shown, 50, "the 50 oldest finished ones");
        let ids = shown(&board);
        for n in 0..10 {
            assert!(ids.contains(&format!("b{n:03}")), "b{n:03} is in progress");
        }
        assert!(!ids.contains(&"b010".to_string()) && !ids.contains(&"b059".to_string()));
        assert!(ids.contains(&"b060".to_string()));
        assert!(
            view.batches.iter().all(|b| b.rows == Some(2)),
            "every batch shown has its announcement"
        );
    }

    /// Issue 15: a worker's report naming an evicted batch re-created it without the
    /// producer's announcement, so it showed `null` for job type, rows and progress.
    #[test]
    fn a_report_naming_a_forgotten_batch_does_not_bring_it_back() {
        let board = Board::default();
        for n in 0..=BATCHES {
            let id = format!("b{n:03}");
            announce(&board, &id, 1);
            board.record_report(&report("w1", &[(&id, 1, 0)]));
        }
        assert!(
            !shown(&board).contains(&"b000".to_string()),
            "b000 forgotten"
        );
        // Workers keep naming the batches they touched lately.
        board.record_report(&report("w2", &[("b000", 1, 0)]));
        announce(&board, "b000", 1);
        let view = board.batches();
        assert!(
            !shown(&board).contains(&"b000".to_string()),
            "still forgotten"
        );
        assert_eq!((view.batches.len(), view.not_shown), (BATCHES, 1));
        assert!(view.batches.iter().all(|b| b.rows.is_some()));
    }

    #[test]
    fn a_batch_first_heard_of_in_a_report_is_added_only_while_it_is_worked_on() {
        let board = Board::default();
        let mut old = report("w1", &[("old", 5, 0), ("current", 1, 0)]);
        old.sent_unix = 1_000;
        old.batches.get_mut("old").unwrap().last_unix = 1_000 - REPORTED_RECENTLY_SECONDS - 1;
        old.batches.get_mut("current").unwrap().last_unix = 999;
        board.record_report(&old);
        assert_eq!(
            shown(&board),
            ["current"],
            "a batch last worked on long ago is history, not news"
        );
    }

    #[test]
    fn batches_in_progress_are_bounded_too_those_never_announced_forgotten_first() {
        let board = Board::default();
        board.record_report(&report("w1", &[("unannounced", 1, 0)]));
        for n in 0..BATCHES_IN_PROGRESS {
            announce(&board, &format!("b{n:04}"), 10);
        }
        let view = board.batches();
        assert_eq!(view.batches.len(), BATCHES_IN_PROGRESS);
        assert!(!shown(&board).contains(&"unannounced".to_string()));
        announce(&board, "one-more", 10);
        let ids = shown(&board);
        assert_eq!(ids.len(), BATCHES_IN_PROGRESS);
        assert!(!ids.contains(&"b0000".to_string()), "then the oldest");
        assert_eq!(board.batches().not_shown, 2);
    }

    #[test]
    fn the_job_table_carries_the_counts_of_each_workers_latest_report() {
        let reports = Arc::new(Reports::default());
        let board = Board::new(Arc::clone(&reports));
        reports.record(report("w1", &[("b1", 3, 0)]), std::time::Instant::now());
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
