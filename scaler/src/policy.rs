//! The scaling policy: a pure function from what was observed to what to do.
//!
//! No I/O, no clock and no randomness here: the tick loop passes in the observations,
//! the job type's limits and *now*, and gets back decisions, each with the reason a
//! person would want in the event log. Rules, per job type:
//!
//! 1. No stranded work: rows ready and no worker -> spawn one.
//! 2. Ready above `threshold` -> spawn one; above `burst_threshold` -> spawn
//!    `min(burst_size, max_jobs - workers)`. Pending (unscheduled) workers count, so a
//!    full cluster cannot make the scaler spawn without bound.
//! 3. Drain only after ready, unacked and every worker's work in hand have been zero
//!    for the whole idle window; any activity restarts the window. Missing or stale
//!    data is never taken as idle.
//! 4. A worker asked to drain that is still there after the grace period is stopped
//!    only if it reports nothing in hand (or never started: still pending); a busy
//!    worker is never stopped.

use std::time::{Duration, Instant};

/// Limits of one job type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub threshold: u64,
    pub burst_threshold: u64,
    pub burst_size: u32,
    pub max_jobs: u32,
    pub idle_window: Duration,
    pub drain_grace: Duration,
}

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
    pub fn is_active(self) -> bool {
        matches!(self, Phase::Pending | Phase::Running | Phase::Stopping)
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
}

/// What the policy remembers between ticks of one job type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// Since when everything has been idle, if it is.
    pub idle_since: Option<Instant>,
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
    let active = observed.workers.iter().filter(|w| w.phase.is_active());
    let workers = active.clone().count() as u32;
    let taking_rows = active
        .clone()
        .filter(|w| w.drain_requested_at.is_none() && w.phase != Phase::Stopping)
        .count() as u32;

    let Some(queue) = observed.queue else {
        // Without numbers there is nothing safe to do, and the idle window restarts.
        return (decisions, Memory { idle_since: None });
    };

    let room = limits.max_jobs.saturating_sub(workers);
    let spawn = if queue.ready > limits.burst_threshold {
        Some((
            limits.burst_size.min(room),
            format!(
                "{} ready > burst threshold {}: burst of up to {} ({workers} of {} workers running or pending)",
                queue.ready, limits.burst_threshold, limits.burst_size, limits.max_jobs
            ),
        ))
    } else if queue.ready > limits.threshold {
        Some((
            1.min(room),
            format!(
                "{} ready > threshold {} ({workers} of {} workers running or pending)",
                queue.ready, limits.threshold, limits.max_jobs
            ),
        ))
    } else if queue.ready > 0 && taking_rows == 0 {
        Some((
            1.min(room),
            format!("{} ready and no worker taking rows", queue.ready),
        ))
    } else {
        None
    };
    if let Some((count, reason)) = spawn
        && count > 0
    {
        decisions.push(Decision {
            action: Action::Spawn(count),
            reason,
        });
    }

    let in_hand: u64 = active.clone().filter_map(|w| w.in_flight).sum();
    // A pending worker has never run, so holds nothing; only a running one can be
    // silent about rows it holds.
    let unknown = active
        .clone()
        .filter(|w| matches!(w.phase, Phase::Running | Phase::Stopping) && w.in_flight.is_none())
        .count();
    let idle = queue.ready == 0 && queue.unacked == 0 && in_hand == 0 && unknown == 0;
    let idle_since = if idle {
        memory.idle_since.or(Some(now))
    } else {
        None
    };

    if let Some(since) = idle_since
        && now.duration_since(since) >= limits.idle_window
    {
        let to_drain: Vec<String> = active
            .clone()
            .filter(|w| w.drain_requested_at.is_none() && w.phase != Phase::Stopping)
            .map(|w| w.name.clone())
            .collect();
        if !to_drain.is_empty() {
            decisions.push(Decision {
                action: Action::Drain(to_drain),
                reason: format!(
                    "queue, unacked and work in hand at zero for {}s (idle window {}s)",
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

    (decisions, Memory { idle_since })
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
    };

    fn worker(name: &str, phase: Phase, in_flight: Option<u64>) -> WorkerView {
        WorkerView {
            name: name.into(),
            phase,
            drain_requested_at: None,
            in_flight,
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
        };
        let memory = Memory {
            idle_since: Some(start),
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

    #[test]
    fn job_types_are_decided_apart_one_idle_window_drains_only_its_own_workers() {
        let start = Instant::now();
        let now = start + Duration::from_secs(30);
        // Job type A has been idle for 30 s; job type B has work in hand.
        let idle_a = Memory {
            idle_since: Some(start),
        };
        let (a, _) = decide(&observed(0, 0, running(1)), &LIMITS, idle_a, now);
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
        };
        let (decisions, _) = decide(
            &observed(0, 0, vec![worker("terminating", Phase::Stopping, Some(0))]),
            &LIMITS,
            idle,
            now,
        );
        assert!(decisions.is_empty(), "nor asked to drain: {decisions:?}");
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
}
