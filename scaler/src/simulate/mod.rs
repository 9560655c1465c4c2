//! `scaler simulate --seed N`: the scaling policy, unchanged, against a simulated
//! cluster and queue, beside the rules people use today, scenario by scenario.
//!
//! The simulation advances in steps of one second. Rows arrive by a scenario's trace;
//! a worker (a pod) waits `Pending` while the cluster's nodes are full, then starts
//! after a sampled latency, takes one row at a time from its job type's queue, and
//! exits when asked to drain once it holds nothing, or (a KEDA job) after its one row.
//! What the scalers see is what they would see for real: the management API's figures
//! sampled every 5 s, workers' own reports of rows in hand, and the producer's
//! announcements as rows arrive.
//!
//! Each [`strategies::Strategy`] decides on its own schedule: Spillway's policy
//! ([`crate::policy::decide`] and [`crate::share::share`], exactly as the tick calls
//! them) every `tick_seconds` and at once on an announcement; KEDA ScaledJob's
//! `default`, `accurate` and `eager` strategies every 30 s, as KEDA documents them;
//! and the prototype's rules on every tick, from the figures alone. Every run of a
//! seed gives the same table.

pub mod scenarios;
pub mod strategies;

use std::{
    collections::{BTreeMap, VecDeque},
    fmt::Write as _,
    time::{Duration, Instant},
};

use fastrand::Rng;

use crate::policy::QueueDepth;
pub use scenarios::Scenario;
use strategies::{Decision, Strategy, View, WorkerSeen};

/// How often the management API's figures refresh (RabbitMQ's default).
const SAMPLE_EVERY: u64 = 5;

/// A duration distribution, in seconds.
#[derive(Debug, Clone, Copy)]
pub enum Dist {
    Fixed(f64),
    /// Uniform between the two.
    Uniform(f64, f64),
    /// Mostly `base`, and `share` of the time `slow`.
    Tail {
        base: f64,
        slow: f64,
        share: f64,
    },
}

impl Dist {
    fn sample(self, rng: &mut Rng) -> f64 {
        match self {
            Dist::Fixed(s) => s,
            Dist::Uniform(a, b) => a + rng.f64() * (b - a),
            Dist::Tail { base, slow, share } => {
                if rng.f64() < share {
                    slow
                } else {
                    base
                }
            }
        }
    }
}

/// One job type of a scenario.
#[derive(Debug, Clone)]
pub struct SimJobType {
    pub name: &'static str,
    pub priority: u32,
    pub max_jobs: u32,
    /// Workers Spillway's policy spawns at once above its burst threshold.
    pub burst_size: u32,
    pub row_seconds: Dist,
    /// Rows arriving: (second, rows).
    pub arrivals: Vec<(u64, u64)>,
}

/// A worker in the simulated cluster.
#[derive(Debug, Clone)]
struct Pod {
    name: String,
    job_type: usize,
    created: u64,
    /// When it got a node, if it has.
    scheduled: Option<u64>,
    /// When it starts taking rows, once scheduled.
    starts_at: Option<u64>,
    /// The row in hand and when it finishes.
    row: Option<u64>,
    processed: u64,
    draining: bool,
    /// Takes one row, then exits (a KEDA job).
    one_row: bool,
    ended: Option<u64>,
}

impl Pod {
    fn running(&self, now: u64) -> bool {
        self.starts_at.is_some_and(|at| now >= at) && self.ended.is_none()
    }
}

/// How one strategy did in one scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub strategy: String,
    /// Seconds until the last row was done; `None` if not within the horizon.
    pub finished: Option<u64>,
    /// Seconds of node time workers held (scheduled to ended): the cost.
    pub worker_seconds: u64,
    /// Workers that ended having processed no row.
    pub wasted: u64,
    pub peak_pending: u64,
    pub peak_workers: u64,
    pub spawned: u64,
}

/// Runs `strategy` through `scenario` with `seed`.
pub fn run(scenario: &Scenario, strategy: &mut dyn Strategy, seed: u64) -> Outcome {
    let mut rng = Rng::with_seed(seed);
    let t0 = Instant::now();
    let types = &scenario.job_types;
    let mut queues: Vec<VecDeque<f64>> = vec![VecDeque::new(); types.len()];
    let mut arrivals: Vec<VecDeque<(u64, u64)>> = types
        .iter()
        .map(|t| t.arrivals.iter().copied().collect())
        .collect();
    let total_rows: u64 = types.iter().flat_map(|t| &t.arrivals).map(|(_, n)| n).sum();
    let mut done_rows = 0u64;
    let mut pods: Vec<Pod> = Vec::new();
    let mut sample: Vec<QueueDepth> = vec![
        QueueDepth {
            ready: 0,
            unacked: 0
        };
        types.len()
    ];
    let mut announced: Vec<VecDeque<(u64, u64)>> = vec![VecDeque::new(); types.len()];
    let mut settled: Vec<VecDeque<(u64, u64)>> = vec![VecDeque::new(); types.len()];
    let mut outcome = Outcome {
        strategy: strategy.name(),
        finished: None,
        worker_seconds: 0,
        wasted: 0,
        peak_pending: 0,
        peak_workers: 0,
        spawned: 0,
    };
    let mut next_decision = 0u64;
    let mut serial = 0u64;
    for now in 0..=scenario.horizon {
        // Rows arrive, announced by the producer as they are published.
        let mut news = false;
        for (i, due) in arrivals.iter_mut().enumerate() {
            while due.front().is_some_and(|(at, _)| *at <= now) {
                let (_, rows) = due.pop_front().expect("a due arrival");
                for _ in 0..rows {
                    queues[i].push_back(types[i].row_seconds.sample(&mut rng));
                }
                announced[i].push_back((now, rows));
                news = true;
            }
        }
        // Pods get nodes in order of creation, and start after their latency.
        let capacity = match scenario.more_nodes {
            Some((at, more)) if now >= at => more,
            _ => scenario.capacity,
        };
        let mut on_nodes = pods
            .iter()
            .filter(|p| p.scheduled.is_some() && p.ended.is_none())
            .count() as u64;
        for pod in pods
            .iter_mut()
            .filter(|p| p.scheduled.is_none() && p.ended.is_none())
        {
            if on_nodes < capacity {
                on_nodes += 1;
                pod.scheduled = Some(now);
                pod.starts_at = Some(now + scenario.start_latency.sample(&mut rng).round() as u64);
            }
        }
        // Workers finish rows, take the next, and exit when they are done.
        for pod in pods.iter_mut().filter(|p| p.running(now)) {
            if pod.row.is_some_and(|until| until <= now) {
                pod.row = None;
                pod.processed += 1;
                done_rows += 1;
                settled[pod.job_type].push_back((now, 1));
                if pod.one_row {
                    pod.ended = Some(now);
                    continue;
                }
            }
            if pod.row.is_none() {
                if pod.draining {
                    pod.ended = Some(now);
                } else if let Some(seconds) = queues[pod.job_type].pop_front() {
                    pod.row = Some(now + seconds.ceil().max(1.0) as u64);
                } else if pod.one_row {
                    // A KEDA job that found the queue empty: it exits with nothing done.
                    pod.ended = Some(now);
                }
            }
        }
        if done_rows == total_rows && arrivals.iter().all(VecDeque::is_empty) {
            outcome.finished.get_or_insert(now);
        }
        // The management API's figures, refreshed every few seconds.
        if now % SAMPLE_EVERY == 0 {
            for (i, figures) in sample.iter_mut().enumerate() {
                *figures = QueueDepth {
                    ready: queues[i].len() as u64,
                    unacked: pods
                        .iter()
                        .filter(|p| p.job_type == i && p.row.is_some())
                        .count() as u64,
                };
            }
        }
        for events in announced.iter_mut().chain(settled.iter_mut()) {
            while events.front().is_some_and(|(at, _)| at + 10 < now) {
                events.pop_front();
            }
        }
        // Pods that ended are accounted for and forgotten: only live ones are kept.
        pods.retain(|pod| {
            let Some(ended) = pod.ended else {
                return true;
            };
            outcome.account(pod, ended);
            false
        });
        let pending = pods
            .iter()
            .filter(|p| p.ended.is_none() && !p.running(now))
            .count() as u64;
        let active = pods.iter().filter(|p| p.ended.is_none()).count() as u64;
        outcome.peak_pending = outcome.peak_pending.max(pending);
        outcome.peak_workers = outcome.peak_workers.max(active);
        if outcome.finished.is_some() && active == 0 {
            break;
        }
        if now < next_decision && !(news && strategy.wakes_on_news()) {
            continue;
        }
        next_decision = now + strategy.period();
        let view = View {
            now: t0 + Duration::from_secs(now),
            job_types: types,
            total_cap: scenario.total_cap,
            sampled: &sample,
            workers: pods
                .iter()
                .filter(|p| p.ended.is_none())
                .map(|p| WorkerSeen {
                    name: &p.name,
                    job_type: p.job_type,
                    running: p.running(now),
                    in_hand: u64::from(p.row.is_some()),
                    processed: p.processed,
                    draining: p.draining,
                    age: Duration::from_secs(now - p.created),
                })
                .collect(),
            announced: announced
                .iter()
                .map(|e| e.iter().map(|(_, n)| n).sum())
                .collect(),
            settled: settled
                .iter()
                .map(|e| e.iter().map(|(_, n)| n).sum())
                .collect(),
        };
        for decision in strategy.decide(&view) {
            match decision {
                Decision::Spawn { job_type, count } => {
                    for _ in 0..count {
                        serial += 1;
                        outcome.spawned += 1;
                        pods.push(Pod {
                            name: format!("{}-{serial}", types[job_type].name),
                            job_type,
                            created: now,
                            scheduled: None,
                            starts_at: None,
                            row: None,
                            processed: 0,
                            draining: false,
                            one_row: strategy.one_row_jobs(),
                            ended: None,
                        });
                    }
                }
                Decision::Drain(name) => {
                    if let Some(pod) = pods.iter_mut().find(|p| p.name == name) {
                        pod.draining = true;
                    }
                }
                Decision::Stop(name) => {
                    if let Some(pod) = pods
                        .iter_mut()
                        .find(|p| p.name == name && p.ended.is_none())
                    {
                        // Stopped with a row in hand: the row goes back to the queue.
                        if pod.row.take().is_some() {
                            queues[pod.job_type]
                                .push_front(types[pod.job_type].row_seconds.sample(&mut rng));
                        }
                        pod.ended = Some(now);
                    }
                }
            }
        }
    }
    // Workers still there at the end (a run past its horizon) cost until then.
    let end = outcome.finished.unwrap_or(scenario.horizon);
    for pod in &pods {
        if let Some(scheduled) = pod.scheduled {
            outcome.worker_seconds += pod.ended.unwrap_or(end).saturating_sub(scheduled);
        }
    }
    outcome
}

impl Outcome {
    /// Adds a pod that ended at `ended` to the figures.
    fn account(&mut self, pod: &Pod, ended: u64) {
        if let Some(scheduled) = pod.scheduled {
            self.worker_seconds += ended.saturating_sub(scheduled);
        }
        if pod.processed == 0 {
            self.wasted += 1;
        }
    }
}

/// Every scenario with every strategy, as one table per scenario.
pub fn report(seed: u64, only: Option<&str>) -> anyhow::Result<String> {
    let scenarios: Vec<Scenario> = scenarios::all()
        .into_iter()
        .filter(|s| only.is_none_or(|name| s.name == name))
        .collect();
    if scenarios.is_empty() {
        let names: Vec<&str> = scenarios::all().iter().map(|s| s.name).collect();
        anyhow::bail!(
            "no scenario {:?}: one of {}",
            only.unwrap_or_default(),
            names.join(", ")
        );
    }
    let mut out = String::new();
    for scenario in &scenarios {
        let rows: BTreeMap<usize, Outcome> = strategies::all()
            .into_iter()
            .enumerate()
            .map(|(i, mut strategy)| (i, run(scenario, strategy.as_mut(), seed)))
            .collect();
        let _ = writeln!(
            out,
            "## {} (seed {seed})\n\n{}\n",
            scenario.name, scenario.about
        );
        let _ = writeln!(
            out,
            "| strategy | time to finish (s) | worker-seconds | wasted workers | peak pending | peak workers | spawned |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
        for outcome in rows.values() {
            let finished = outcome
                .finished
                .map_or_else(|| format!("> {}", scenario.horizon), |s| s.to_string());
            let _ = writeln!(
                out,
                "| {} | {finished} | {} | {} | {} | {} | {} |",
                outcome.strategy,
                outcome.worker_seconds,
                outcome.wasted,
                outcome.peak_pending,
                outcome.peak_workers,
                outcome.spawned
            );
        }
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{strategies::Spillway, *};

    fn scenario(name: &str) -> Scenario {
        scenarios::all()
            .into_iter()
            .find(|s| s.name == name)
            .expect("a scenario of that name")
    }

    fn by(strategy: &str, outcomes: &[Outcome]) -> Outcome {
        outcomes
            .iter()
            .find(|o| o.strategy == strategy)
            .cloned()
            .expect("an outcome of that strategy")
    }

    fn run_all(scenario: &Scenario, seed: u64) -> Vec<Outcome> {
        strategies::all()
            .into_iter()
            .map(|mut s| run(scenario, s.as_mut(), seed))
            .collect()
    }

    #[test]
    fn a_seed_always_gives_the_same_outcome() {
        let bursts = scenario("bursts");
        assert_eq!(run_all(&bursts, 7), run_all(&bursts, 7));
    }

    #[test]
    fn every_row_is_done_and_spillway_wastes_no_worker_on_bursts() {
        let bursts = scenario("bursts");
        let outcomes = run_all(&bursts, 1);
        for outcome in &outcomes {
            assert!(outcome.finished.is_some(), "{outcome:?}");
        }
        let spillway = by("spillway", &outcomes);
        assert_eq!(spillway.wasted, 0, "{spillway:?}");
        let prototype = by("prototype", &outcomes);
        assert!(
            spillway.finished <= prototype.finished,
            "reacting to announcements finishes no later: {spillway:?} {prototype:?}"
        );
    }

    #[test]
    fn pods_stuck_pending_start_no_more_jobs_than_rows_or_max_jobs_and_none_wasted() {
        // 100 rows, 20 allowed, nodes for 2: the rest of the pods wait Pending.
        let pending = scenario("pending-pods");
        let outcome = run(&pending, &mut Spillway::default(), 1);
        assert!(outcome.peak_workers <= 20, "{outcome:?}");
        assert_eq!(outcome.wasted, 0, "{outcome:?}");
        assert!(outcome.finished.is_some(), "{outcome:?}");
    }

    #[test]
    fn under_a_total_cap_the_urgent_job_type_is_not_starved() {
        let shared = scenario("shared-cluster");
        let outcome = run(&shared, &mut Spillway::default(), 1);
        assert!(outcome.peak_workers <= 30, "the cap holds: {outcome:?}");
        assert!(outcome.finished.is_some(), "{outcome:?}");
    }

    #[test]
    fn the_report_has_a_table_per_scenario_and_names_unknown_ones() {
        let table = report(1, Some("pending-pods")).unwrap();
        assert!(table.starts_with("## pending-pods (seed 1)"), "{table}");
        for strategy in [
            "spillway",
            "keda default",
            "keda accurate",
            "keda eager",
            "prototype",
        ] {
            assert!(table.contains(&format!("| {strategy} |")), "{table}");
        }
        let error = report(1, Some("nope")).unwrap_err().to_string();
        assert!(error.contains("one-big-batch"), "{error}");
    }
}
