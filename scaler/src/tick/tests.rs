//! The tick against fakes of everything it acts through: each test scripts the
//! launcher's workers, the queue figures and the reports, ticks with *now* of its
//! choosing, and checks what was spawned, drained and stopped, and what the metrics
//! and the board say. No broker, API or cluster: the real ones are in `tests/`.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use spillway_common::{
    events::{WorkerReport, unix_now},
    jobs_config::JobsConfig,
    rabbit_api::{ApiError, QueueStats},
};
use spillway_testkit::builders::worker_report;

use super::*;
use crate::{
    board::Board,
    bus::DrainError,
    context::Timing,
    launcher::{LauncherError, LogLines},
    metrics::Metrics,
    policy::Phase,
    reports::Reports,
};

#[derive(Default)]
struct FakeLauncher {
    workers: Mutex<Vec<LaunchedWorker>>,
    spawned: Mutex<Vec<String>>,
    stopped: Mutex<Vec<String>>,
    forgotten: Mutex<Vec<String>>,
    cannot_list: AtomicBool,
    cannot_spawn: AtomicBool,
}

impl FakeLauncher {
    fn add(&self, name: &str, phase: Phase) {
        self.add_of("default", name, phase);
    }

    fn add_of(&self, job_type: &str, name: &str, phase: Phase) {
        self.workers.lock().unwrap().push(LaunchedWorker {
            name: name.into(),
            job_type: job_type.into(),
            phase,
            started_unix: unix_now(),
            waiting: None,
        });
    }
}

impl Launcher for FakeLauncher {
    async fn workers(&self) -> Result<Vec<LaunchedWorker>, LauncherError> {
        if self.cannot_list.load(Ordering::SeqCst) {
            return Err(LauncherError::List("the API server is away".into()));
        }
        Ok(self.workers.lock().unwrap().clone())
    }

    async fn spawn(&self, job_type: &str, name: &str) -> Result<(), LauncherError> {
        if self.cannot_spawn.load(Ordering::SeqCst) {
            return Err(LauncherError::Spawn {
                name: name.into(),
                source: "quota exceeded".into(),
            });
        }
        self.spawned.lock().unwrap().push(name.into());
        self.add_of(job_type, name, Phase::Pending);
        Ok(())
    }

    async fn stop(&self, name: &str) -> Result<(), LauncherError> {
        self.stopped.lock().unwrap().push(name.into());
        Ok(())
    }

    async fn forget(&self, name: &str) -> Result<(), LauncherError> {
        self.forgotten.lock().unwrap().push(name.into());
        self.workers.lock().unwrap().retain(|w| w.name != name);
        Ok(())
    }

    async fn logs(&self, name: &str, _tail_lines: Option<u32>) -> Result<String, LauncherError> {
        Err(LauncherError::NoSuchWorker(name.into()))
    }

    async fn follow_logs(
        &self,
        name: &str,
        _tail_lines: Option<u32>,
    ) -> Result<LogLines, LauncherError> {
        Err(LauncherError::NoSuchWorker(name.into()))
    }
}

/// Queue figures by queue name; a queue without figures answers as an unknown one.
#[derive(Default)]
pub(crate) struct FakeQueues {
    figures: Mutex<HashMap<String, QueueStats>>,
    reads: AtomicUsize,
}

impl FakeQueues {
    pub(crate) fn set(&self, queue: &str, ready: u64, unacked: u64) {
        self.figures.lock().unwrap().insert(
            queue.into(),
            QueueStats {
                ready,
                unacked,
                ..QueueStats::default()
            },
        );
    }
}

impl QueueFigures for FakeQueues {
    async fn queue_stats(&self, queue: &str) -> Result<QueueStats, ApiError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.figures
            .lock()
            .unwrap()
            .get(queue)
            .copied()
            .ok_or_else(|| ApiError::NoSuchQueue(queue.into()))
    }
}

/// Drain requests, recorded; all refused while `refuse` is set.
#[derive(Default)]
pub(crate) struct FakeDrains {
    asked: Mutex<Vec<String>>,
    refuse: AtomicBool,
}

impl DrainRequests for FakeDrains {
    async fn drain(&self, worker: &str) -> Result<(), DrainError> {
        if self.refuse.load(Ordering::SeqCst) {
            return Err(DrainError {
                worker: worker.into(),
                reason: "ACCESS_REFUSED".into(),
            });
        }
        self.asked.lock().unwrap().push(worker.into());
        Ok(())
    }
}

const STALE_AFTER: Duration = Duration::from_secs(15);

/// A scaler over fakes, job type `default` on queue `tasks` (threshold 20, burst 40
/// by 5, max 10, idle window 30 s), drain grace 60 s, reports stale after 15 s.
struct Fixture {
    scaler: Scaler<FakeLauncher, FakeQueues, FakeDrains>,
    launcher: Arc<FakeLauncher>,
    queues: Arc<FakeQueues>,
    drains: Arc<FakeDrains>,
    reports: Arc<Reports>,
    t0: Instant,
}

impl Fixture {
    fn new() -> Self {
        Self::with_jobs(JobsConfig::default())
    }

    /// A scaler over fakes with the job types of `jobs`, every queue empty at first.
    fn with_jobs(jobs: JobsConfig) -> Self {
        let (launcher, queues, drains) =
            (Arc::default(), Arc::<FakeQueues>::default(), Arc::default());
        for job in jobs.job_types.values() {
            queues.set(&job.queue, 0, 0);
            queues.set(&format!("{}.dead", job.queue), 0, 0);
        }
        let reports = Arc::new(Reports::default());
        let ctx = Context {
            launcher: Arc::clone(&launcher),
            queues: Arc::clone(&queues),
            drains: Arc::clone(&drains),
            reports: Arc::clone(&reports),
            metrics: Arc::new(Metrics::new()),
            board: Arc::new(Board::new(Arc::clone(&reports))),
            timing: Timing {
                drain_grace: Duration::from_secs(60),
                report_stale_after: STALE_AFTER,
                start_timeout: Duration::from_secs(180),
            },
        };
        Fixture {
            scaler: Scaler::new(jobs, ctx),
            launcher,
            queues,
            drains,
            reports,
            t0: Instant::now(),
        }
    }

    fn at(&self, seconds: u64) -> Instant {
        self.t0 + Duration::from_secs(seconds)
    }

    /// A report from `worker` with `in_flight` rows in hand, arrived `seconds` in.
    fn report(&self, worker: &str, in_flight: u64, seconds: u64) {
        let report = WorkerReport {
            in_flight,
            ..worker_report(worker)
        };
        self.reports.record(report, self.at(seconds));
    }

    fn decisions(&self, action: &'static str) -> u64 {
        self.scaler.ctx.metrics.decision_count("default", action)
    }

    fn spawned(&self) -> usize {
        self.launcher.spawned.lock().unwrap().len()
    }

    fn drained(&self) -> Vec<String> {
        self.drains.asked.lock().unwrap().clone()
    }

    fn stopped(&self) -> Vec<String> {
        self.launcher.stopped.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn rows_ready_and_no_worker_spawn_one_and_record_it() {
    let mut f = Fixture::new();
    f.queues.set("tasks", 5, 0);
    f.scaler.tick(f.at(0)).await;
    assert_eq!((f.spawned(), f.decisions("spawn")), (1, 1));
    let events = f.scaler.ctx.board.events();
    assert_eq!(events[0].action, "spawn");
    assert_eq!(events[0].reason, "5 ready and no worker taking rows");
    f.scaler.tick(f.at(1)).await;
    assert_eq!(f.spawned(), 1, "the pending worker takes the rows");
    assert_eq!(f.scaler.ctx.board.jobs()[0].status, "pending");
}

#[tokio::test]
async fn a_burst_stops_at_max_jobs_with_workers_already_running_after_a_restart() {
    let mut f = Fixture::new();
    for n in 0..8 {
        f.launcher.add(&format!("w{n}"), Phase::Running);
        f.report(&format!("w{n}"), 1, 0);
    }
    f.queues.set("tasks", 500, 8);
    f.scaler.tick(f.at(0)).await;
    assert_eq!(f.spawned(), 2, "10 at most, the 8 found running included");
    f.scaler.tick(f.at(5)).await;
    assert_eq!(f.spawned(), 2, "no more once at the cap");
    assert!(f.drained().is_empty() && f.stopped().is_empty());
}

#[tokio::test]
async fn idle_for_the_window_drains_then_stops_after_the_grace_only_if_idle() {
    let mut f = Fixture::new();
    f.launcher.add("idle", Phase::Running);
    f.launcher.add("busy", Phase::Running);
    // A worker's first report is news; the window starts at the next, quiet tick.
    for s in [0, 1, 30] {
        f.report("idle", 0, s);
        f.report("busy", 0, s);
        f.scaler.tick(f.at(s)).await;
    }
    assert!(f.drained().is_empty(), "within the window");
    f.scaler.tick(f.at(31)).await;
    assert_eq!(f.drained(), ["idle", "busy"]);
    assert_eq!(f.decisions("drain"), 2);

    // Draining, "busy" took a last row: it is never stopped while it holds it.
    f.report("idle", 0, 90);
    f.report("busy", 1, 90);
    f.scaler.tick(f.at(91)).await;
    assert_eq!(f.stopped(), ["idle"]);
    assert_eq!(f.drained().len(), 2, "nobody is asked twice");
}

#[tokio::test]
async fn a_stale_report_is_never_taken_for_idle() {
    let mut f = Fixture::new();
    f.launcher.add("silent", Phase::Running);
    f.report("silent", 0, 0);
    f.scaler.tick(f.at(0)).await;
    f.scaler.tick(f.at(40)).await;
    f.scaler.tick(f.at(100)).await;
    assert!(
        f.drained().is_empty(),
        "its last report is older than {STALE_AFTER:?}: it may hold rows"
    );
}

#[tokio::test]
async fn a_failed_queue_read_is_counted_and_changes_nothing() {
    let mut f = Fixture::new();
    f.launcher.add("w0", Phase::Running);
    f.report("w0", 0, 0);
    f.queues.figures.lock().unwrap().remove("tasks");
    f.scaler.tick(f.at(0)).await;
    f.report("w0", 0, 40);
    f.scaler.tick(f.at(40)).await;
    assert!(f.drained().is_empty(), "no figures is not an empty queue");
    let failures = f
        .scaler
        .ctx
        .metrics
        .observe_failures
        .get_or_create(&JobLabels {
            job_type: "default".into(),
        })
        .get();
    assert_eq!(failures, 2);
    assert_eq!(f.scaler.ctx.board.stats().job_types[0].ready, None);
}

#[tokio::test]
async fn a_launcher_that_cannot_list_its_workers_stops_the_tick() {
    let mut f = Fixture::new();
    f.queues.set("tasks", 500, 0);
    f.launcher.cannot_list.store(true, Ordering::SeqCst);
    f.scaler.tick(f.at(0)).await;
    assert_eq!(f.spawned(), 0, "without the workers, the cap is unknown");
    assert_eq!(f.queues.reads.load(Ordering::SeqCst), 0);
    assert_eq!(f.scaler.ctx.metrics.ticks.get(), 1);
}

#[tokio::test]
async fn a_spawn_the_launcher_refuses_is_neither_counted_nor_shown() {
    let mut f = Fixture::new();
    f.queues.set("tasks", 500, 0);
    f.launcher.cannot_spawn.store(true, Ordering::SeqCst);
    f.scaler.tick(f.at(0)).await;
    assert_eq!(f.decisions("spawn"), 0);
    assert!(f.scaler.ctx.board.events().is_empty());
    f.launcher.cannot_spawn.store(false, Ordering::SeqCst);
    f.scaler.tick(f.at(5)).await;
    assert_eq!(f.decisions("spawn"), 5, "tried again on the next tick");
}

#[tokio::test]
async fn a_refused_drain_is_counted_as_a_failure_and_asked_again() {
    let mut f = Fixture::new();
    f.launcher.add("w0", Phase::Running);
    f.drains.refuse.store(true, Ordering::SeqCst);
    for s in [0, 1, 31] {
        f.report("w0", 0, s);
        f.scaler.tick(f.at(s)).await;
    }
    let failures = |f: &Fixture| {
        f.scaler
            .ctx
            .metrics
            .drain_failures
            .get_or_create(&JobLabels {
                job_type: "default".into(),
            })
            .get()
    };
    assert_eq!((failures(&f), f.decisions("drain")), (1, 0));
    f.drains.refuse.store(false, Ordering::SeqCst);
    f.report("w0", 0, 36);
    f.scaler.tick(f.at(36)).await;
    assert_eq!(f.drained(), ["w0"]);
    f.report("w0", 0, 93);
    f.scaler.tick(f.at(93)).await;
    assert!(
        f.stopped().is_empty(),
        "the grace counts from the confirmed request (36 s), not the refused one"
    );
    f.report("w0", 0, 96);
    f.scaler.tick(f.at(96)).await;
    assert_eq!(f.stopped(), ["w0"]);
}

#[tokio::test]
async fn under_a_total_cap_the_higher_priority_spawns_first_and_the_board_says_why() {
    let jobs = JobsConfig::parse(
        r#"
max_workers_total = 6
default_job_type = "bulk"

[job_types.bulk]
queue = "bulk"
priority = 1

[job_types.urgent]
queue = "urgent"
priority = 5
"#,
    )
    .unwrap();
    let mut f = Fixture::with_jobs(jobs);
    let spawned_of = |f: &Fixture, job_type: &str| {
        f.launcher
            .workers
            .lock()
            .unwrap()
            .iter()
            .filter(|w| w.job_type == job_type)
            .count()
    };
    // Both have a burst waiting; the room (6) goes to urgent's 5 first.
    f.queues.set("bulk", 10_000, 0);
    f.queues.set("urgent", 500, 0);
    f.scaler.tick(f.at(0)).await;
    assert_eq!((spawned_of(&f, "urgent"), spawned_of(&f, "bulk")), (5, 1));
    let board = f.scaler.ctx.board.stats().job_types;
    let held = |job_type: &str| {
        board
            .iter()
            .find(|t| t.job_type == job_type)
            .and_then(|t| t.held.clone())
    };
    assert_eq!(held("urgent"), None);
    assert_eq!(
        held("bulk").as_deref(),
        Some("room given to higher priority: urgent")
    );
    let metrics = Arc::clone(&f.scaler.ctx.metrics);
    let count = |why| {
        metrics
            .held
            .get_or_create(&HeldLabels {
                job_type: "bulk".into(),
                why,
            })
            .get()
    };
    assert_eq!(count("priority"), 1);
    // At the cap nothing more starts, and bulk is told so (once the queue figures may
    // have changed: the policy does not act twice on one refresh of them).
    f.scaler.tick(f.at(5)).await;
    assert_eq!(f.spawned(), 6);
    assert_eq!(count("cap"), 1);
    // Once urgent has nothing waiting and its workers are gone, bulk gets the room.
    f.queues.set("urgent", 0, 0);
    f.launcher
        .workers
        .lock()
        .unwrap()
        .retain(|w| w.job_type != "urgent");
    f.scaler.tick(f.at(10)).await;
    assert_eq!(spawned_of(&f, "bulk"), 6, "1 + a burst of 5");
}

/// A restarted scaler: the same launcher, queues and drain requests, but nothing
/// remembered, no report heard yet, and the job types of `jobs`.
fn restarted(f: &Fixture, jobs: JobsConfig) -> Scaler<FakeLauncher, FakeQueues, FakeDrains> {
    let reports = Arc::new(Reports::default());
    Scaler::new(
        jobs,
        Context {
            launcher: Arc::clone(&f.launcher),
            queues: Arc::clone(&f.queues),
            drains: Arc::clone(&f.drains),
            reports: Arc::clone(&reports),
            metrics: Arc::new(Metrics::new()),
            board: Arc::new(Board::new(reports)),
            timing: f.scaler.ctx.timing,
        },
    )
}

#[tokio::test]
async fn a_busy_worker_holding_a_120_s_row_survives_a_scaler_restart_new_settings_and_the_idle_window()
 {
    let mut f = Fixture::new();
    f.launcher.add("busy", Phase::Running);
    f.queues.set("tasks", 0, 1);
    // Its row runs from 0 to 120 s; it reports every 5 s, the row in hand.
    for s in (0..=40).step_by(5) {
        f.report("busy", 1, s);
        f.scaler.tick(f.at(s)).await;
    }
    // The scaler restarts with new settings: a 5 s idle window, fewer workers allowed.
    let mut jobs = JobsConfig {
        idle_seconds: 5,
        ..JobsConfig::default()
    };
    jobs.job_types.get_mut("default").expect("default").max_jobs = 1;
    let mut scaler = restarted(&f, jobs);
    let reports = Arc::clone(&scaler.ctx.reports);
    let report = |in_flight, processed, s| {
        let report = WorkerReport {
            in_flight,
            processed,
            ..worker_report("busy")
        };
        reports.record(report, f.at(s));
    };
    // Before its first report reaches the new scaler, then with it.
    scaler.tick(f.at(41)).await;
    for s in (45..=120).step_by(5) {
        report(1, 0, s);
        scaler.tick(f.at(s)).await;
    }
    assert!(
        f.drained().is_empty() && f.stopped().is_empty(),
        "a worker holding a row is neither drained nor stopped: {:?} {:?}",
        f.drained(),
        f.stopped()
    );
    assert_eq!(f.spawned(), 0, "nothing was ready");
    // The row is done and acked: the worker is idle, and drained after the new window.
    f.queues.set("tasks", 0, 0);
    for s in (125..=140).step_by(5) {
        report(0, 1, s);
        scaler.tick(f.at(s)).await;
    }
    assert_eq!(f.drained(), ["busy"], "drained once idle for the window");
    assert!(f.stopped().is_empty(), "asked to drain, never stopped");
}

#[tokio::test]
async fn failed_jobs_never_count_as_active() {
    let mut f = Fixture::new();
    for n in 0..10 {
        f.launcher.add(&format!("failed-{n}"), Phase::Failed);
    }
    f.queues.set("tasks", 500, 0);
    f.scaler.tick(f.at(0)).await;
    assert_eq!(
        f.spawned(),
        5,
        "a full burst: ten failed Jobs are not ten of max_jobs"
    );
    f.scaler.tick(f.at(5)).await;
    assert_eq!(
        f.spawned(),
        10,
        "up to max_jobs, the failed ones not counted"
    );
    f.scaler.tick(f.at(10)).await;
    assert_eq!(f.spawned(), 10, "at max_jobs");
    assert!(
        f.drained().is_empty(),
        "a failed Job is never asked to drain"
    );
}

#[tokio::test]
async fn finished_workers_do_not_pile_up_beyond_the_newest_kept() {
    let mut f = Fixture::new();
    let finished = FINISHED_KEPT + 30;
    for n in 0..finished {
        let phase = if n % 3 == 0 {
            Phase::Failed
        } else {
            Phase::Succeeded
        };
        f.launcher.add(&format!("done-{n}"), phase);
    }
    // Oldest first: done-0 started first.
    for (n, worker) in f.launcher.workers.lock().unwrap().iter_mut().enumerate() {
        worker.started_unix = 1_000 + n as u64;
    }
    f.launcher.add("busy", Phase::Running);
    f.report("busy", 1, 0);
    f.queues.set("tasks", 0, 1);
    f.scaler.tick(f.at(0)).await;
    let forgotten = f.launcher.forgotten.lock().unwrap().clone();
    let oldest: Vec<String> = (0..30).map(|n| format!("done-{n}")).collect();
    let mut sorted = forgotten.clone();
    sorted.sort_by_key(|name| name[5..].parse::<usize>().unwrap());
    assert_eq!(
        sorted, oldest,
        "the 30 oldest finished workers, and only them"
    );
    f.scaler.tick(f.at(5)).await;
    assert_eq!(
        f.launcher.forgotten.lock().unwrap().len(),
        30,
        "{FINISHED_KEPT} finished kept: nothing more to forget"
    );
    assert!(f.stopped().is_empty() && f.drained().is_empty());
}
