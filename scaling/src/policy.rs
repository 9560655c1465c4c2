//! The scaling policy: a pure function from what was observed to what to do.
//!
//! No I/O, no clock and no randomness here: the tick loop passes in the observations,
//! the job type's limits and *now*, and gets back decisions, each with the reason a
//! person would want in the event log. Rules, per job type:
//!
//! 1. No stranded work: rows ready and no worker -> spawn one.
//! 2. Ready above `threshold` -> spawn one; above `burst_threshold` -> spawn
//!    `min(burst_size, max_jobs - workers)`. Ready is the queue figures', or, while
//!    they may not show them yet, the rows announced lately less those settled and in
//!    hand since ([`ready_rows`]), so an upload is met with workers in a second. Rows
//!    of batches cancelled lately count only for rule 1 ([`worth_workers`]): one
//!    worker acks them without running them, so a cancelled batch starts no burst.
//!    Rows only announced count while no worker is pending (one is on its way for
//!    them), and rows only the queue figures show are acted on once per refresh of
//!    the figures ([`FIGURES_REFRESH`]): a scaler woken by every announcement of a
//!    stream of small uploads does not spawn again for the same rows.
//!    Pending (unscheduled) workers count, so a full cluster cannot make the scaler
//!    spawn without bound.
//! 3. Drain only after ready, unacked and every worker's work in hand have been zero
//!    for the whole idle window; any activity restarts the window. Activity includes
//!    what the queue figures may not show yet (the management API lags by seconds): a
//!    worker whose counters moved since the previous observation, and a batch announced
//!    since then. Missing or stale data is never taken as idle.
//! 4. A worker asked to drain that is still there after the grace period is stopped
//!    only if it reports nothing in hand (or never started: still pending); a busy
//!    worker is never stopped.
//! 6. A paused job type (an operator's `POST /job-types/{name}/pause`) spawns nothing
//!    and asks every worker to drain; rule 4 still stops them. Rows wait in the queue.
//! 5. A worker that cannot start (its launcher says it never will, e.g. an image that
//!    cannot be pulled, or it is still pending after `start_timeout`) is stopped with
//!    the launcher's reason and no longer counted; spawning for its job type then
//!    pauses, doubling with each failure in a row (10 s up to 5 min), so a broken image
//!    is not retried every tick. A worker that runs ends the pause.
//!
//! Workers of no configured job type (orphans: a job type removed from the file, or a
//! Job without the label) are asked to drain at once, and stopped after the grace only
//! if they hold nothing, by [`decide_orphans`]: nobody spawns for them, so nothing
//! waits on them, and draining loses nothing (rows not taken stay in their queue).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

/// Limits of one job type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub threshold: u64,
    pub burst_threshold: u64,
    pub burst_size: u32,
    pub max_jobs: u32,
    pub idle_window: Duration,
    pub drain_grace: Duration,
    /// How long a worker may stay pending before it is taken as unable to start.
    pub start_timeout: Duration,
}

/// How often the management API's queue figures refresh (RabbitMQ's default
/// `collect_statistics_interval`): a scaler woken more often than this (by
/// announcements) would otherwise spawn again for rows it has spawned for already.
pub const FIGURES_REFRESH: Duration = Duration::from_secs(5);

/// The first pause of spawning after a worker could not start, doubled with each
/// further failure in a row up to [`START_BACKOFF_MAX`].
pub const START_BACKOFF: Duration = Duration::from_secs(10);
pub const START_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Where a worker is in its life, as its launcher sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Created but not running yet (an unscheduled pod, say).
    Pending,
    Running,
    Succeeded,
    Failed,
    /// Ended while no scaler was watching it, exit status unknown.
    Ended,
    /// Being stopped: its launcher has been told to stop it and it has not ended yet.
    /// It still holds its place under `max_jobs`, and is never acted on again.
    Stopping,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::Pending,
        Phase::Running,
        Phase::Succeeded,
        Phase::Failed,
        Phase::Ended,
        Phase::Stopping,
    ];

    pub fn is_active(self) -> bool {
        matches!(self, Phase::Pending | Phase::Running | Phase::Stopping)
    }

    /// Its name in metrics labels, the dashboard and `scaler workers`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Running => "running",
            Phase::Succeeded => "succeeded",
            Phase::Failed => "failed",
            Phase::Ended => "ended",
            Phase::Stopping => "stopping",
        }
    }
}

/// Why a pending worker has not started, as its launcher sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// The reason and message, e.g. `ImagePullBackOff: Back-off pulling image ...`.
    pub detail: String,
    /// It will not clear by waiting (someone must fix the image, Secret or ConfigMap).
    pub permanent: bool,
}

/// One worker as observed this tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerView {
    pub name: String,
    pub phase: Phase,
    /// When it was asked to drain (or first seen draining), if it was.
    pub drain_requested_at: Option<Instant>,
    /// Rows in hand according to its latest fresh report; `None` when it has not
    /// reported recently enough to know.
    pub in_flight: Option<u64>,
    /// Its counters according to its latest fresh report; `None` as for `in_flight`.
    pub progress: Option<Progress>,
    /// How long since its launcher started it.
    pub age: Duration,
    /// Why it has not started yet, when pending and its launcher can tell.
    pub waiting: Option<Waiting>,
}

/// A worker's counters of settled rows, from one report. Compared only with the same
/// worker's earlier counters, never with the scaler's clock: a change is activity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub processed: u64,
    pub failed: u64,
    pub dead_lettered: u64,
    /// When it last started or finished a row, by its own clock.
    pub last_activity_unix: u64,
}

/// The queue as the management API last sampled it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueDepth {
    pub ready: u64,
    pub unacked: u64,
}

/// Everything observed about one job type this tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// `None` when the read failed or is stale: never taken as idle.
    pub queue: Option<QueueDepth>,
    pub workers: Vec<WorkerView>,
    /// When the producer last announced a confirmed batch of this job type, as the
    /// scaler heard it; the batch's rows may not be in the queue figures yet.
    pub last_batch_published: Option<Instant>,
    /// Rows announced and settled lately, fresher than the queue figures.
    pub news: News,
    /// Paused by an operator: no worker is spawned, and every one is asked to drain.
    pub paused: bool,
    /// Rows of batches cancelled lately that may still wait in the queue.
    pub cancelled_in_queue: u64,
}

/// What the producer and the workers said lately about rows of one job type, within a
/// window as long as the management API's figures may lag: rows announced as being
/// published, and rows the workers settled. Fresher than the queue figures, so an
/// upload is seen at once, and a queue emptied meanwhile is not taken as full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct News {
    pub announced: u64,
    pub settled: u64,
}

/// Rows ready as far as anyone can tell: the queue figures, or, when they may not
/// show them yet (or there are none yet, for a queue just declared), the rows
/// announced lately less those settled since and those in workers' hands.
pub fn ready_rows(queue: Option<QueueDepth>, news: News, in_hand: u64) -> u64 {
    let fresh = news
        .announced
        .saturating_sub(news.settled)
        .saturating_sub(in_hand);
    queue.map_or(0, |q| q.ready).max(fresh)
}

/// Of `ready` rows, those worth more than one worker: less the rows of cancelled
/// batches that may still wait in the queue (a worker acks those without running
/// them, thousands a second).
pub fn worth_workers(ready: u64, cancelled_in_queue: u64) -> u64 {
    ready.saturating_sub(cancelled_in_queue)
}

/// What the policy remembers between ticks of one job type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Memory {
    /// Since when everything has been idle, if it is.
    pub idle_since: Option<Instant>,
    /// Each worker's counters as last observed (workers still observed only).
    pub progress: BTreeMap<String, Progress>,
    /// The batch announcement already taken into account.
    pub last_batch_published: Option<Instant>,
    /// Workers in a row that could not start, and until when spawning pauses for it.
    pub start_failures: u32,
    pub spawn_paused_until: Option<Instant>,
    /// When workers were last spawned: the queue figures then are not acted on twice.
    pub last_spawned: Option<Instant>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Spawn(u32),
    /// Ask these workers to finish what they hold and exit.
    Drain(Vec<String>),
    /// Stop a worker that ignored its drain request and holds nothing.
    Stop(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub reason: String,
}

/// Decides what to do for one job type.
pub fn decide(
    observed: &Observation,
    limits: &Limits,
    memory: Memory,
    now: Instant,
) -> (Vec<Decision>, Memory) {
    let mut decisions = Vec::new();
    let stuck: Vec<(&WorkerView, String)> = observed
        .workers
        .iter()
        .filter_map(|w| Some((w, cannot_start(w, limits)?)))
        .collect();
    let stuck_names: BTreeSet<&str> = stuck.iter().map(|(w, _)| w.name.as_str()).collect();
    let is_stuck = |w: &WorkerView| stuck_names.contains(w.name.as_str());
    let active = observed
        .workers
        .iter()
        .filter(|w| w.phase.is_active() && !is_stuck(w));
    let workers = active.clone().count() as u32;
    let taking_rows = active
        .clone()
        .filter(|w| w.drain_requested_at.is_none() && w.phase != Phase::Stopping)
        .count() as u32;

    let (start_failures, spawn_paused_until) = if !stuck.is_empty() {
        let failures = memory.start_failures.saturating_add(1);
        let pause = START_BACKOFF
            .saturating_mul(1 << (failures - 1).min(16))
            .min(START_BACKOFF_MAX);
        (failures, Some(now + pause))
    } else if observed.workers.iter().any(|w| w.phase == Phase::Running) {
        (0, None)
    } else {
        (memory.start_failures, memory.spawn_paused_until)
    };
    for (worker, why) in &stuck {
        decisions.push(Decision {
            action: Action::Stop(worker.name.clone()),
            reason: format!(
                "{why}; spawning for this job type pauses {}s ({start_failures} start failure(s) in a row)",
                spawn_paused_until.map_or(0, |until| until.duration_since(now).as_secs())
            ),
        });
    }
    let spawning_paused = spawn_paused_until.is_some_and(|until| now < until);

    // Activity the queue figures may not show yet, each compared with the previous
    // observation: counters that moved mean rows were settled (fast rows leave
    // nothing in hand at the moment of a report), and a new announcement means rows
    // were published. A worker seen for the first time is news too.
    let moved = observed
        .workers
        .iter()
        .filter(|w| w.progress.is_some() && memory.progress.get(&w.name) != w.progress.as_ref())
        .count();
    let announced = observed.last_batch_published.is_some()
        && observed.last_batch_published != memory.last_batch_published;
    // Each observed worker's latest counters: its report's, or the last remembered.
    let mut remembered = memory.progress;
    let progress: BTreeMap<String, Progress> = observed
        .workers
        .iter()
        .filter_map(|w| {
            let counters = w.progress.or_else(|| remembered.remove(&w.name))?;
            Some((w.name.clone(), counters))
        })
        .collect();
    let mut last_spawned = memory.last_spawned;
    let remember = |idle_since, last_spawned| Memory {
        idle_since,
        progress,
        last_batch_published: observed
            .last_batch_published
            .or(memory.last_batch_published),
        start_failures,
        spawn_paused_until,
        last_spawned,
    };

    // Rows announced are worth workers even before the queue figures show them: the
    // figures of a queue just declared take seconds to appear.
    let in_hand: u64 = active.clone().filter_map(|w| w.in_flight).sum();
    let seen = ready_rows(observed.queue, observed.news, in_hand);
    // Rows the queue figures do not show yet are worth workers only while none is
    // pending: a pending worker is on its way for them already, and a stream of small
    // announcements would otherwise add workers on every one.
    let pending = active.clone().filter(|w| w.phase == Phase::Pending).count();
    let waiting = if pending > 0 {
        observed.queue.map_or(0, |q| q.ready)
    } else {
        seen
    };
    let ready = worth_workers(waiting, observed.cancelled_in_queue);
    let room = limits.max_jobs.saturating_sub(workers);
    let spawn = if ready > limits.burst_threshold {
        Some((
            limits.burst_size.min(room),
            format!(
                "{ready} ready > burst threshold {}: burst of up to {} ({workers} of {} workers running or pending)",
                limits.burst_threshold, limits.burst_size, limits.max_jobs
            ),
        ))
    } else if ready > limits.threshold {
        Some((
            1.min(room),
            format!(
                "{ready} ready > threshold {} ({workers} of {} workers running or pending)",
                limits.threshold, limits.max_jobs
            ),
        ))
    } else if ready > 0 && taking_rows == 0 {
        Some((
            1.min(room),
            format!("{ready} ready and no worker taking rows"),
        ))
    } else if waiting > 0 && taking_rows == 0 {
        Some((
            1.min(room),
            format!(
                "{waiting} ready, of cancelled batches: one worker acks them without running them"
            ),
        ))
    } else {
        None
    };
    // Rows only the queue figures show were answered already if workers were spawned
    // since those figures last refreshed.
    let only_in_figures = waiting <= observed.queue.map_or(0, |q| q.ready);
    let answered = only_in_figures
        && memory
            .last_spawned
            .is_some_and(|at| now.duration_since(at) < FIGURES_REFRESH);
    if let Some((count, reason)) = spawn
        && count > 0
        && !spawning_paused
        && !observed.paused
        && !answered
    {
        decisions.push(Decision {
            action: Action::Spawn(count),
            reason,
        });
        last_spawned = Some(now);
    }
    // Workers still taking rows: those a drain request would reach.
    let not_yet_asked = || -> Vec<String> {
        active
            .clone()
            .filter(|w| w.drain_requested_at.is_none() && w.phase != Phase::Stopping)
            .map(|w| w.name.clone())
            .collect()
    };
    if observed.paused {
        let to_drain = not_yet_asked();
        if !to_drain.is_empty() {
            decisions.push(Decision {
                action: Action::Drain(to_drain),
                reason: "job type paused: workers finish the rows they hold and exit; the rest wait in the queue".into(),
            });
        }
    }

    let Some(queue) = observed.queue else {
        // Without numbers nothing else is safe to do, and the idle window restarts.
        return (decisions, remember(None, last_spawned));
    };

    // A pending worker has never run, so holds nothing; only a running one can be
    // silent about rows it holds.
    let unknown = active
        .clone()
        .filter(|w| matches!(w.phase, Phase::Running | Phase::Stopping) && w.in_flight.is_none())
        .count();
    let idle =
        seen == 0 && queue.unacked == 0 && in_hand == 0 && unknown == 0 && moved == 0 && !announced;
    let idle_since = if idle && !observed.paused {
        memory.idle_since.or(Some(now))
    } else {
        None
    };

    if let Some(since) = idle_since
        && now.duration_since(since) >= limits.idle_window
    {
        let to_drain = not_yet_asked();
        if !to_drain.is_empty() {
            decisions.push(Decision {
                action: Action::Drain(to_drain),
                reason: format!(
                    "queue, unacked and work in hand at zero, no row settled and no batch announced, for {}s (idle window {}s)",
                    now.duration_since(since).as_secs(),
                    limits.idle_window.as_secs()
                ),
            });
        }
    }

    for worker in active.filter(|w| w.phase != Phase::Stopping) {
        // A pending worker cannot hear a drain request (it has not started listening),
        // and holds nothing: after the grace it is stopped like an idle one.
        let holds_nothing = worker.in_flight == Some(0) || worker.phase == Phase::Pending;
        if let Some(asked) = worker.drain_requested_at
            && now.duration_since(asked) >= limits.drain_grace
            && holds_nothing
        {
            decisions.push(Decision {
                action: Action::Stop(worker.name.clone()),
                reason: format!(
                    "asked to drain {}s ago (grace {}s) and holds nothing",
                    now.duration_since(asked).as_secs(),
                    limits.drain_grace.as_secs()
                ),
            });
        }
    }

    (decisions, remember(idle_since, last_spawned))
}

/// Decides what to do with workers of no configured job type (`why` says which).
pub fn decide_orphans(
    workers: &[WorkerView],
    why: &str,
    drain_grace: Duration,
    now: Instant,
) -> Vec<Decision> {
    let mut decisions = Vec::new();
    let active = workers
        .iter()
        .filter(|w| w.phase.is_active() && w.phase != Phase::Stopping);
    let to_drain: Vec<String> = active
        .clone()
        .filter(|w| w.drain_requested_at.is_none())
        .map(|w| w.name.clone())
        .collect();
    if !to_drain.is_empty() {
        decisions.push(Decision {
            action: Action::Drain(to_drain),
            reason: format!("{why}: nothing will be spawned for it, so its workers drain"),
        });
    }
    for worker in active {
        let holds_nothing = worker.in_flight == Some(0) || worker.phase == Phase::Pending;
        if let Some(asked) = worker.drain_requested_at
            && now.duration_since(asked) >= drain_grace
            && holds_nothing
        {
            decisions.push(Decision {
                action: Action::Stop(worker.name.clone()),
                reason: format!(
                    "{why}; asked to drain {}s ago (grace {}s) and holds nothing",
                    now.duration_since(asked).as_secs(),
                    drain_grace.as_secs()
                ),
            });
        }
    }
    decisions
}

/// Why a pending worker will not start, if it will not: its launcher says so, or it
/// has been pending longer than the start timeout.
fn cannot_start(worker: &WorkerView, limits: &Limits) -> Option<String> {
    if worker.phase != Phase::Pending {
        return None;
    }
    match &worker.waiting {
        Some(waiting) if waiting.permanent => Some(format!("cannot start: {}", waiting.detail)),
        waiting if worker.age >= limits.start_timeout => Some(format!(
            "still pending after {}s (start timeout {}s): {}",
            worker.age.as_secs(),
            limits.start_timeout.as_secs(),
            waiting
                .as_ref()
                .map_or("its launcher gives no reason", |w| w.detail.as_str())
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        threshold: 20,
        burst_threshold: 40,
        burst_size: 5,
        max_jobs: 10,
        idle_window: Duration::from_secs(30),
        drain_grace: Duration::from_secs(60),
        start_timeout: Duration::from_secs(180),
    };

    fn worker(name: &str, phase: Phase, in_flight: Option<u64>) -> WorkerView {
        WorkerView {
            name: name.into(),
            phase,
            drain_requested_at: None,
            in_flight,
            progress: None,
            age: Duration::from_secs(5),
            waiting: None,
        }
    }

    fn running(n: usize) -> Vec<WorkerView> {
        (0..n)
            .map(|i| worker(&format!("w{i}"), Phase::Running, Some(0)))
            .collect()
    }

    fn observed(ready: u64, unacked: u64, workers: Vec<WorkerView>) -> Observation {
        Observation {
            queue: Some(QueueDepth { ready, unacked }),
            workers,
            last_batch_published: None,
            news: News::default(),
            paused: false,
            cancelled_in_queue: 0,
        }
    }

    fn actions(observation: &Observation) -> Vec<Action> {
        let (decisions, _) = decide(observation, &LIMITS, Memory::default(), Instant::now());
        decisions.into_iter().map(|d| d.action).collect()
    }

    /// A table row: name, ready, unacked, workers, expected actions.
    type Case = (&'static str, u64, u64, Vec<WorkerView>, Vec<Action>);

    /// One row per rule and edge (limits: threshold 20, burst 40 by 5, max 10).
    #[test]
    fn spawning_follows_thresholds_and_the_cap() {
        let cases: Vec<Case> = vec![
            ("empty queue, no workers: nothing", 0, 0, vec![], vec![]),
            (
                "1 ready, no workers: no stranded rows",
                1,
                0,
                vec![],
                vec![Action::Spawn(1)],
            ),
            (
                "20 ready, 1 worker: at threshold, not above",
                20,
                0,
                running(1),
                vec![],
            ),
            (
                "21 ready, 1 worker: above threshold -> 1",
                21,
                0,
                running(1),
                vec![Action::Spawn(1)],
            ),
            (
                "40 ready, 1 worker: at burst threshold -> 1",
                40,
                0,
                running(1),
                vec![Action::Spawn(1)],
            ),
            (
                "41 ready, 1 worker: burst -> min(5, 10-1) = 5",
                41,
                0,
                running(1),
                vec![Action::Spawn(5)],
            ),
            (
                "41 ready, 7 workers: burst capped -> 10-7 = 3",
                41,
                0,
                running(7),
                vec![Action::Spawn(3)],
            ),
            (
                "500 ready, 10 workers: at max -> nothing",
                500,
                0,
                running(10),
                vec![],
            ),
            (
                "21 ready, 10 workers: at max -> nothing",
                21,
                0,
                running(10),
                vec![],
            ),
            (
                "41 ready, 8 pending: pending count as workers -> 10-8 = 2",
                41,
                0,
                (0..8)
                    .map(|i| worker(&format!("p{i}"), Phase::Pending, None))
                    .collect(),
                vec![Action::Spawn(2)],
            ),
            (
                "5 ready, only finished workers: they do not count -> 1",
                5,
                0,
                vec![
                    worker("done", Phase::Succeeded, None),
                    worker("bad", Phase::Failed, None),
                ],
                vec![Action::Spawn(1)],
            ),
            (
                "5 ready, 1 worker taking rows: below threshold -> nothing",
                5,
                3,
                running(1),
                vec![],
            ),
        ];
        for (name, ready, unacked, workers, expected) in cases {
            assert_eq!(
                actions(&observed(ready, unacked, workers)),
                expected,
                "{name}"
            );
        }
    }

    #[test]
    fn rows_are_never_stranded_behind_draining_workers() {
        let mut draining = worker("w0", Phase::Running, Some(1));
        draining.drain_requested_at = Some(Instant::now());
        assert_eq!(
            actions(&observed(3, 0, vec![draining])),
            vec![Action::Spawn(1)]
        );
    }

    #[test]
    fn missing_queue_numbers_are_never_idle_and_spawn_nothing() {
        let start = Instant::now();
        let blind = Observation {
            queue: None,
            workers: running(2),
            last_batch_published: None,
            news: News::default(),
            paused: false,
            cancelled_in_queue: 0,
        };
        let memory = Memory {
            idle_since: Some(start),
            ..Memory::default()
        };
        let (decisions, memory) = decide(&blind, &LIMITS, memory, start + Duration::from_secs(600));
        assert_eq!(decisions, vec![]);
        assert_eq!(memory.idle_since, None, "the idle window restarts");
    }

    /// Walks the clock through the idle window: name, seconds since start, observation,
    /// whether a drain is expected.
    #[test]
    fn a_drain_needs_the_whole_idle_window_and_any_activity_restarts_it() {
        let start = Instant::now();
        let mut busy = running(2);
        busy[1].in_flight = Some(1);
        let mut silent = running(2);
        silent[0].in_flight = None;
        let steps: Vec<(&str, u64, Observation, bool)> = vec![
            ("idle starts", 0, observed(0, 0, running(2)), false),
            ("29 s idle", 29, observed(0, 0, running(2)), false),
            (
                "unacked rows restart the window",
                30,
                observed(0, 1, running(2)),
                false,
            ),
            ("idle again", 31, observed(0, 0, running(2)), false),
            (
                "60 s: 29 s since the restart",
                60,
                observed(0, 0, running(2)),
                false,
            ),
            (
                "a worker with a row in hand restarts it",
                61,
                observed(0, 0, busy),
                false,
            ),
            ("idle again", 62, observed(0, 0, running(2)), false),
            (
                "a worker without a fresh report is not known idle",
                80,
                observed(0, 0, silent),
                false,
            ),
            ("idle again", 81, observed(0, 0, running(2)), false),
            ("110 s: 29 s", 110, observed(0, 0, running(2)), false),
            (
                "111 s: 30 s of idle -> drain",
                111,
                observed(0, 0, running(2)),
                true,
            ),
        ];
        let mut memory = Memory::default();
        for (name, at, observation, drain_expected) in steps {
            let (decisions, next) = decide(
                &observation,
                &LIMITS,
                memory,
                start + Duration::from_secs(at),
            );
            memory = next;
            let drained = decisions
                .iter()
                .any(|d| matches!(&d.action, Action::Drain(names) if names == &["w0", "w1"]));
            assert_eq!(drained, drain_expected, "{name}: {decisions:?}");
        }
    }

    fn counted(processed: u64, failed: u64, last_activity_unix: u64) -> Progress {
        Progress {
            processed,
            failed,
            dead_lettered: 0,
            last_activity_unix,
        }
    }

    /// Two idle workers (nothing in hand) with the given counters now.
    fn reporting(w0: Progress, w1: Progress) -> Vec<WorkerView> {
        let mut workers = running(2);
        workers[0].progress = Some(w0);
        workers[1].progress = Some(w1);
        workers
    }

    /// Issue 15: the management API's figures lag by seconds and fast rows leave
    /// nothing in hand at the moment of a report, so a busy worker looked idle and was
    /// drained while its `processed` count climbed. Each row: the queue reads zero and
    /// every report shows nothing in hand, the window began 30 s ago (its full length),
    /// and the previous observation saw w0 at 1,001 processed, 2 failed, active at
    /// unix 100, w1 at 50, 0, 90, and the batch announced at `announced_before`.
    #[test]
    fn activity_the_queue_figures_do_not_show_yet_restarts_the_idle_window() {
        let start = Instant::now();
        let now = start + Duration::from_secs(30);
        let (w0, w1) = (counted(1_001, 2, 100), counted(50, 0, 90));
        let announced_before = start - Duration::from_secs(100);
        let memory = Memory {
            idle_since: Some(start),
            progress: BTreeMap::from([("w0".into(), w0), ("w1".into(), w1)]),
            last_batch_published: Some(announced_before),
            ..Memory::default()
        };
        let with_batch = |workers: Vec<WorkerView>, at: Option<Instant>| Observation {
            last_batch_published: at,
            ..observed(0, 0, workers)
        };
        // name, observation now, drain expected
        let cases: Vec<(&str, Observation, bool)> = vec![
            (
                "nothing moved for the whole window: drain",
                with_batch(reporting(w0, w1), Some(announced_before)),
                true,
            ),
            (
                "processed climbed 1,001 -> 1,317 while in hand read 0 at every report: no drain",
                with_batch(
                    reporting(counted(1_317, 2, 100), w1),
                    Some(announced_before),
                ),
                false,
            ),
            (
                "failed moved (the row went back to the queue, which still reads 0): no drain",
                with_batch(reporting(w0, counted(50, 1, 90)), Some(announced_before)),
                false,
            ),
            (
                "last activity moved (a row started and ended between two reports): no drain",
                with_batch(
                    reporting(counted(1_001, 2, 131), w1),
                    Some(announced_before),
                ),
                false,
            ),
            (
                "a row dead-lettered since the last observation: no drain",
                with_batch(
                    reporting(
                        Progress {
                            dead_lettered: 1,
                            ..w0
                        },
                        w1,
                    ),
                    Some(announced_before),
                ),
                false,
            ),
            (
                "a worker reporting for the first time: its counters are news, no drain",
                with_batch(
                    {
                        let mut workers = reporting(w0, w1);
                        workers.push(WorkerView {
                            progress: Some(counted(7, 0, 120)),
                            ..worker("w-new", Phase::Running, Some(0))
                        });
                        workers
                    },
                    Some(announced_before),
                ),
                false,
            ),
            (
                "a batch announced since the last observation, its rows not yet in the figures: no drain",
                with_batch(reporting(w0, w1), Some(now - Duration::from_secs(1))),
                false,
            ),
            (
                "a worker gone silent keeps its last counters: no news, drain",
                with_batch(
                    {
                        let mut workers = reporting(w0, w1);
                        workers[1].progress = None;
                        workers[1].phase = Phase::Succeeded;
                        workers
                    },
                    Some(announced_before),
                ),
                true,
            ),
        ];
        for (name, observation, drain_expected) in cases {
            let (decisions, next) = decide(&observation, &LIMITS, memory.clone(), now);
            let drained = decisions
                .iter()
                .any(|d| matches!(d.action, Action::Drain(_)));
            assert_eq!(drained, drain_expected, "{name}: {decisions:?}");
            assert_eq!(
                next.idle_since.is_some(),
                drain_expected,
                "{name}: activity restarts the window"
            );
        }
    }

    /// After activity the drain waits a whole window again, and the counters seen are
    /// remembered: the same counters next tick are not activity.
    #[test]
    fn after_rows_are_settled_the_drain_waits_a_whole_window_from_the_next_idle_tick() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let quiet = counted(10, 0, 5);
        // name, seconds since start, w0's counters, drain expected
        let steps: Vec<(&str, u64, Progress, bool)> = vec![
            ("first sight of w0 is news", 0, quiet, false),
            ("idle starts", 1, quiet, false),
            ("29 s idle", 30, quiet, false),
            ("w0 settled a row", 31, counted(11, 0, 36), false),
            (
                "idle again: the window starts over",
                32,
                counted(11, 0, 36),
                false,
            ),
            (
                "30 s after w0's row, 29 s idle",
                61,
                counted(11, 0, 36),
                false,
            ),
            ("30 s idle -> drain", 62, counted(11, 0, 36), true),
        ];
        let mut memory = Memory::default();
        for (name, second, w0, drain_expected) in steps {
            let mut workers = running(1);
            workers[0].progress = Some(w0);
            let (decisions, next) = decide(&observed(0, 0, workers), &LIMITS, memory, at(second));
            memory = next;
            let drained = decisions
                .iter()
                .any(|d| matches!(d.action, Action::Drain(_)));
            assert_eq!(drained, drain_expected, "{name}: {decisions:?}");
        }
    }

    #[test]
    fn job_types_are_decided_apart_one_idle_window_drains_only_its_own_workers() {
        let start = Instant::now();
        let now = start + Duration::from_secs(30);
        // Job type A has been idle for 30 s; job type B has work in hand.
        let idle_a = Memory {
            idle_since: Some(start),
            ..Memory::default()
        };
        let (a, _) = decide(&observed(0, 0, running(1)), &LIMITS, idle_a.clone(), now);
        let (b, b_memory) = decide(&observed(0, 2, running(1)), &LIMITS, idle_a, now);
        assert_eq!(a[0].action, Action::Drain(vec!["w0".into()]));
        assert!(b.is_empty(), "B's unacked rows keep its worker: {b:?}");
        assert_eq!(b_memory.idle_since, None);
    }

    #[test]
    fn a_worker_that_never_started_neither_blocks_the_drain_nor_outlives_it() {
        let start = Instant::now();
        let mut workers = running(1);
        workers.push(worker("unschedulable", Phase::Pending, None));
        let idle = Memory {
            idle_since: Some(start),
            ..Memory::default()
        };
        let (decisions, _) = decide(
            &observed(0, 0, workers.clone()),
            &LIMITS,
            idle,
            start + Duration::from_secs(30),
        );
        assert_eq!(
            decisions[0].action,
            Action::Drain(vec!["w0".into(), "unschedulable".into()]),
            "pending holds nothing, so it does not block the idle window"
        );

        let asked = start + Duration::from_secs(30);
        for w in &mut workers {
            w.drain_requested_at = Some(asked);
        }
        workers[0].in_flight = Some(2);
        let (decisions, _) = decide(
            &observed(0, 2, workers),
            &LIMITS,
            Memory::default(),
            asked + Duration::from_secs(60),
        );
        let actions: Vec<_> = decisions.into_iter().map(|d| d.action).collect();
        assert_eq!(
            actions,
            vec![Action::Stop("unschedulable".into())],
            "the busy one stays"
        );
    }

    #[test]
    fn workers_already_draining_are_not_asked_again() {
        let start = Instant::now();
        let mut workers = running(2);
        workers[0].drain_requested_at = Some(start);
        let memory = Memory {
            idle_since: Some(start),
            ..Memory::default()
        };
        let (decisions, _) = decide(
            &observed(0, 0, workers),
            &LIMITS,
            memory,
            start + Duration::from_secs(31),
        );
        assert_eq!(decisions[0].action, Action::Drain(vec!["w1".into()]));
        assert!(
            decisions[0].reason.contains("idle window 30s"),
            "{}",
            decisions[0].reason
        );
    }

    #[test]
    fn after_the_grace_only_a_worker_holding_nothing_is_stopped() {
        let asked = Instant::now();
        let now = asked + Duration::from_secs(61);
        let draining = |name: &str, in_flight| WorkerView {
            drain_requested_at: Some(asked),
            ..worker(name, Phase::Running, in_flight)
        };
        let observation = observed(
            0,
            3,
            vec![
                draining("idle", Some(0)),
                draining("busy", Some(3)),
                draining("silent", None),
            ],
        );
        let (decisions, _) = decide(&observation, &LIMITS, Memory::default(), now);
        let stops: Vec<_> = decisions.iter().map(|d| d.action.clone()).collect();
        assert_eq!(stops, vec![Action::Stop("idle".into())]);

        let early = decide(
            &observation,
            &LIMITS,
            Memory::default(),
            asked + Duration::from_secs(59),
        )
        .0;
        assert!(
            early.is_empty(),
            "within the grace nobody is stopped: {early:?}"
        );
    }

    #[test]
    fn a_worker_being_stopped_is_not_stopped_again_and_keeps_its_place() {
        let asked = Instant::now();
        let now = asked + Duration::from_secs(120);
        let mut workers = running(9);
        workers.push(WorkerView {
            drain_requested_at: Some(asked),
            ..worker("terminating", Phase::Stopping, Some(0))
        });
        let (decisions, _) = decide(&observed(41, 0, workers), &LIMITS, Memory::default(), now);
        let actions: Vec<_> = decisions.into_iter().map(|d| d.action).collect();
        assert_eq!(
            actions,
            Vec::<Action>::new(),
            "no second stop, and its place under max_jobs (10) is still taken"
        );

        let idle = Memory {
            idle_since: Some(asked),
            ..Memory::default()
        };
        let (decisions, _) = decide(
            &observed(0, 0, vec![worker("terminating", Phase::Stopping, Some(0))]),
            &LIMITS,
            idle,
            now,
        );
        assert!(decisions.is_empty(), "nor asked to drain: {decisions:?}");
    }

    fn waiting(detail: &str, permanent: bool) -> Option<Waiting> {
        Some(Waiting {
            detail: detail.into(),
            permanent,
        })
    }

    /// Pending workers by how long and why: name, age, waiting, expected stop.
    #[test]
    fn a_pending_worker_is_stopped_only_when_it_cannot_start() {
        let cases = [
            ("just created, no reason yet", 5, None, false),
            (
                "pulling its image",
                60,
                waiting("ContainerCreating", false),
                false,
            ),
            (
                "no capacity, within the timeout",
                179,
                waiting("Unschedulable: 0/1 nodes", false),
                false,
            ),
            (
                "no capacity past the timeout",
                180,
                waiting("Unschedulable: 0/1 nodes", false),
                true,
            ),
            ("never got a pod, past the timeout", 200, None, true),
            (
                "an image that cannot be pulled: at once",
                8,
                waiting("ImagePullBackOff: nope:1", true),
                true,
            ),
            (
                "a missing Secret key: at once",
                8,
                waiting("CreateContainerConfigError: no key", true),
                true,
            ),
        ];
        for (name, age, waits, stopped) in cases {
            let pending = WorkerView {
                age: Duration::from_secs(age),
                waiting: waits,
                ..worker("w", Phase::Pending, None)
            };
            let actions = actions(&observed(5, 0, vec![pending]));
            assert_eq!(
                actions.contains(&Action::Stop("w".into())),
                stopped,
                "{name}: {actions:?}"
            );
        }
    }

    #[test]
    fn a_worker_that_can_never_start_neither_blocks_its_queue_nor_is_replaced_every_tick() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let stuck = |name: &str| WorkerView {
            waiting: waiting("ImagePullBackOff: Back-off pulling image \"nope:1\"", true),
            ..worker(name, Phase::Pending, None)
        };
        // 15 ready (below threshold 20) and the one worker stuck: before the fix it held
        // its place and counted as taking rows, so nothing more ever happened.
        let (decisions, memory) = decide(
            &observed(15, 0, vec![stuck("a")]),
            &LIMITS,
            Memory::default(),
            at(0),
        );
        assert_eq!(decisions.len(), 1, "{decisions:?}");
        assert_eq!(decisions[0].action, Action::Stop("a".into()));
        assert_eq!(
            decisions[0].reason,
            "cannot start: ImagePullBackOff: Back-off pulling image \"nope:1\"; \
             spawning for this job type pauses 10s (1 start failure(s) in a row)"
        );

        // Being deleted it holds its place, and within the pause nothing is spawned.
        let stopping = WorkerView {
            phase: Phase::Stopping,
            ..stuck("a")
        };
        let (decisions, memory) = decide(&observed(15, 0, vec![stopping]), &LIMITS, memory, at(5));
        assert!(decisions.is_empty(), "paused: {decisions:?}");

        // After the pause, the stranded rows get a worker again.
        let (decisions, memory) = decide(&observed(15, 0, vec![]), &LIMITS, memory, at(10));
        assert_eq!(decisions[0].action, Action::Spawn(1));

        // It cannot start either: the pause doubles.
        let (decisions, memory) =
            decide(&observed(15, 0, vec![stuck("b")]), &LIMITS, memory, at(20));
        assert!(
            decisions[0]
                .reason
                .ends_with("pauses 20s (2 start failure(s) in a row)"),
            "{}",
            decisions[0].reason
        );
        let (decisions, memory) = decide(&observed(15, 0, vec![]), &LIMITS, memory, at(39));
        assert!(decisions.is_empty(), "still paused: {decisions:?}");

        // A worker that runs shows the job type can start workers: the count resets.
        let (_, memory) = decide(&observed(15, 0, running(1)), &LIMITS, memory, at(40));
        assert_eq!(
            (memory.start_failures, memory.spawn_paused_until),
            (0, None)
        );
    }

    #[test]
    fn the_pause_after_start_failures_stops_doubling_at_five_minutes() {
        let now = Instant::now();
        let memory = Memory {
            start_failures: 30,
            ..Memory::default()
        };
        let stuck = WorkerView {
            waiting: waiting("ErrImageNeverPull", true),
            ..worker("w", Phase::Pending, None)
        };
        let (_, memory) = decide(&observed(0, 0, vec![stuck]), &LIMITS, memory, now);
        assert_eq!(memory.spawn_paused_until, Some(now + START_BACKOFF_MAX));
    }

    #[test]
    fn orphans_are_drained_at_once_and_stopped_only_holding_nothing() {
        let asked = Instant::now();
        let grace = Duration::from_secs(60);
        let draining = |name: &str, in_flight| WorkerView {
            drain_requested_at: Some(asked),
            ..worker(name, Phase::Running, in_flight)
        };
        let cases = [
            (
                "new orphans: drained, a busy one too (it finishes its rows first)",
                vec![
                    worker("idle", Phase::Running, Some(0)),
                    worker("busy", Phase::Running, Some(3)),
                ],
                10,
                vec![Action::Drain(vec!["idle".into(), "busy".into()])],
            ),
            (
                "asked, within the grace: nothing",
                vec![draining("idle", Some(0))],
                10,
                vec![],
            ),
            (
                "asked, past the grace, idle: stopped",
                vec![draining("idle", Some(0))],
                61,
                vec![Action::Stop("idle".into())],
            ),
            (
                "asked, past the grace, busy: never stopped",
                vec![draining("busy", Some(2))],
                61,
                vec![],
            ),
            (
                "asked, past the grace, silent: never stopped",
                vec![draining("silent", None)],
                61,
                vec![],
            ),
            (
                "being stopped: left alone",
                vec![worker("going", Phase::Stopping, Some(0))],
                61,
                vec![],
            ),
            (
                "finished: left alone",
                vec![worker("done", Phase::Succeeded, None)],
                61,
                vec![],
            ),
        ];
        for (name, workers, seconds, expected) in cases {
            let decisions = decide_orphans(
                &workers,
                "job type \"retired\" is not configured",
                grace,
                asked + Duration::from_secs(seconds),
            );
            let actions: Vec<Action> = decisions.iter().map(|d| d.action.clone()).collect();
            assert_eq!(actions, expected, "{name}");
            assert!(
                decisions.iter().all(|d| d
                    .reason
                    .starts_with("job type \"retired\" is not configured")),
                "{name}: {decisions:?}"
            );
        }
    }

    #[test]
    fn every_decision_says_why() {
        let (decisions, _) = decide(
            &observed(41, 0, running(1)),
            &LIMITS,
            Memory::default(),
            Instant::now(),
        );
        assert_eq!(
            decisions[0].reason,
            "41 ready > burst threshold 40: burst of up to 5 (1 of 10 workers running or pending)"
        );
    }

    #[test]
    fn rows_announced_before_the_queue_figures_show_them_spawn_a_burst_at_once() {
        // The upload just started publishing; the management API still says empty.
        let news = News {
            announced: 100_000,
            settled: 0,
        };
        let just_uploaded = Observation {
            news,
            ..observed(0, 0, vec![])
        };
        assert_eq!(actions(&just_uploaded), vec![Action::Spawn(5)]);
        // Fifteen rows announced, no worker: one, as for fifteen rows in the figures.
        let few = Observation {
            news: News {
                announced: 15,
                settled: 0,
            },
            ..observed(0, 0, vec![])
        };
        assert_eq!(actions(&few), vec![Action::Spawn(1)]);
        // A queue declared a moment ago has no figures yet: the news alone spawns,
        // and nothing else is decided without figures.
        let no_figures = Observation {
            queue: None,
            news,
            ..observed(0, 0, vec![])
        };
        assert_eq!(actions(&no_figures), vec![Action::Spawn(5)]);
        // Workers spawned for them are still pending: more news (a stream of small
        // uploads) adds none until the figures show rows waiting.
        let on_their_way = Observation {
            news,
            ..observed(0, 0, vec![worker("p1", Phase::Pending, None)])
        };
        assert_eq!(actions(&on_their_way), vec![]);
        let shown = Observation {
            news,
            ..observed(5_000, 0, vec![worker("p1", Phase::Pending, None)])
        };
        assert_eq!(actions(&shown), vec![Action::Spawn(5)]);
    }

    #[test]
    fn rows_announced_and_settled_since_are_not_read_as_ready() {
        // Workers took and settled what was announced before the figures caught up:
        // the queue is empty, and no worker is wasted on it.
        let settled = Observation {
            news: News {
                announced: 10_000,
                settled: 9_990,
            },
            ..observed(0, 0, running(2))
        };
        assert_eq!(actions(&settled), vec![]);
        // What the workers hold is not ready either.
        assert_eq!(
            ready_rows(
                Some(QueueDepth {
                    ready: 0,
                    unacked: 0
                }),
                News {
                    announced: 500,
                    settled: 100,
                },
                400
            ),
            0
        );
        // Figures that already show more than the news are taken as they are.
        assert_eq!(
            ready_rows(
                Some(QueueDepth {
                    ready: 7_000,
                    unacked: 0
                }),
                News {
                    announced: 5_000,
                    settled: 0,
                },
                0
            ),
            7_000
        );
    }

    #[test]
    fn a_cancelled_batch_in_the_queue_gets_one_worker_not_a_burst() {
        // A million rows of a cancelled batch: one worker acks them all.
        let cancelled = Observation {
            cancelled_in_queue: 1_000_000,
            ..observed(1_000_000, 0, vec![])
        };
        assert_eq!(actions(&cancelled), vec![Action::Spawn(1)]);
        // With it running, nothing more.
        let draining = Observation {
            cancelled_in_queue: 1_000_000,
            ..observed(900_000, 100, running(1))
        };
        assert_eq!(actions(&draining), vec![]);
        // Rows of a live batch behind them still count.
        let behind = Observation {
            cancelled_in_queue: 500_000,
            ..observed(505_000, 100, running(1))
        };
        assert_eq!(actions(&behind), vec![Action::Spawn(LIMITS.burst_size)]);
        // A queue holding only cancelled rows is not idle: one worker stays for them.
        let (_, memory) = decide(&draining, &LIMITS, Memory::default(), Instant::now());
        assert_eq!(memory.idle_since, None);
    }

    #[test]
    fn a_paused_job_type_spawns_nothing_and_drains_every_worker_and_resumes() {
        let start = Instant::now();
        let paused = Observation {
            paused: true,
            ..observed(5_000, 200, running(3))
        };
        let (decisions, memory) = decide(&paused, &LIMITS, Memory::default(), start);
        let drained: Vec<Action> = decisions.into_iter().map(|d| d.action).collect();
        assert_eq!(
            drained,
            vec![Action::Drain(vec!["w0".into(), "w1".into(), "w2".into()])]
        );
        assert_eq!(memory.idle_since, None, "paused is not idle");
        // Asked once: not again; a busy worker is still never stopped.
        let asked: Vec<WorkerView> = running(3)
            .into_iter()
            .map(|w| WorkerView {
                drain_requested_at: Some(start),
                in_flight: Some(10),
                ..w
            })
            .collect();
        let later = Observation {
            paused: true,
            ..observed(5_000, 200, asked)
        };
        let (decisions, _) = decide(
            &later,
            &LIMITS,
            Memory::default(),
            start + Duration::from_secs(600),
        );
        assert_eq!(decisions, vec![]);
        // Resumed, with rows waiting and no worker: a burst at once.
        assert_eq!(actions(&observed(5_000, 0, vec![])), vec![Action::Spawn(5)]);
    }

    /// The known failures of queue-driven Job spawners, each ruled out by name.
    mod known_failures {
        use super::*;

        #[test]
        fn pods_pending_for_90_s_with_100_rows_waiting_start_no_more_than_min_rows_max_jobs() {
            let start = Instant::now();
            let mut workers: Vec<WorkerView> = Vec::new();
            let mut memory = Memory::default();
            for second in (0..=90).step_by(5) {
                let now = start + Duration::from_secs(second);
                for w in &mut workers {
                    w.age = now.duration_since(start);
                }
                let (decisions, next) =
                    decide(&observed(100, 0, workers.clone()), &LIMITS, memory, now);
                memory = next;
                for decision in decisions {
                    match decision.action {
                        Action::Spawn(n) => {
                            for _ in 0..n {
                                let name = format!("w{}", workers.len());
                                workers.push(worker(&name, Phase::Pending, None));
                            }
                        }
                        other => panic!("at {second}s: {other:?}"),
                    }
                }
                assert!(
                    workers.len() <= 10,
                    "at {second}s: {} workers",
                    workers.len()
                );
            }
            assert_eq!(workers.len(), 10, "min(100 rows, max_jobs 10)");
        }

        #[test]
        fn long_rows_unacked_and_new_rows_below_the_cap_get_a_new_worker_in_one_tick() {
            // Two workers each on a 120 s row; 30 new rows arrive (above threshold 20).
            let busy = vec![
                worker("w0", Phase::Running, Some(1)),
                worker("w1", Phase::Running, Some(1)),
            ];
            assert_eq!(actions(&observed(30, 2, busy)), vec![Action::Spawn(1)]);
        }

        #[test]
        fn fifteen_rows_and_no_worker_below_the_threshold_get_one_worker_in_one_tick() {
            assert_eq!(actions(&observed(15, 0, vec![])), vec![Action::Spawn(1)]);
        }

        #[test]
        fn a_busy_worker_survives_a_scaler_restart_new_settings_and_the_idle_window() {
            let start = Instant::now();
            // A 120 s row in hand, asked to drain before the restart; the new scaler has
            // no memory and tighter settings.
            let holding = WorkerView {
                drain_requested_at: Some(start),
                ..worker("busy", Phase::Running, Some(1))
            };
            let tight = Limits {
                max_jobs: 1,
                idle_window: Duration::from_secs(1),
                drain_grace: Duration::from_secs(1),
                ..LIMITS
            };
            let mut memory = Memory::default();
            for second in (0..=120).step_by(5) {
                let now = start + Duration::from_secs(second);
                let (decisions, next) =
                    decide(&observed(0, 1, vec![holding.clone()]), &tight, memory, now);
                memory = next;
                assert!(decisions.is_empty(), "at {second}s: {decisions:?}");
            }
        }

        #[test]
        fn failed_jobs_never_count_as_active() {
            let failed: Vec<WorkerView> = (0..10)
                .map(|i| worker(&format!("f{i}"), Phase::Failed, None))
                .collect();
            assert_eq!(actions(&observed(500, 0, failed)), vec![Action::Spawn(5)]);
        }
    }
}
