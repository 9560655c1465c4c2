//! `scaler simulate --seed N`: the scaling policy, unchanged, against a simulated
//! cluster and queue, beside the rules people use today, scenario by scenario.
//!
//! Simulated time advances a second at a time, and a second costs only what happens
//! in it: rows arrive by a scenario's trace; a worker (a pod) waits `Pending` while the
//! cluster's nodes are full, then starts after a sampled latency, takes one row at a
//! time from its job type's queue, and exits when asked to drain once it holds
//! nothing, or (a KEDA job) after its one row. Only pods with something due in a
//! second are looked at in it (a row finished, a start, a drain), so 10,000 workers
//! through 10,000,000 rows take seconds. What the scalers see is what they would see
//! for real: the management API's figures sampled every 5 s, workers' own reports of
//! rows in hand, and the producer's announcements as rows arrive.
//!
//! Each [`strategies::Strategy`] decides on its own schedule: Spillway's policy
//! ([`crate::policy::decide`] and [`crate::share::share`], exactly as the tick calls
//! them) every `tick_seconds` and at once on an announcement; KEDA ScaledJob's
//! `default`, `accurate` and `eager` strategies every 30 s, as KEDA documents them;
//! and the prototype's rules on every tick, from the figures alone. Every run of a
//! seed gives the same tables and charts ([`chart`]).

pub mod chart;
pub mod scenarios;
pub mod strategies;

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
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
#[derive(Debug)]
struct Pod {
    name: String,
    job_type: usize,
    created: u64,
    /// When it got a node, if it has.
    scheduled: Option<u64>,
    /// When it starts taking rows, once scheduled.
    starts_at: Option<u64>,
    started: bool,
    /// When the row in hand is done.
    row: Option<u64>,
    processed: u64,
    draining: bool,
    /// Takes one row, then exits (a KEDA job).
    one_row: bool,
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
    /// Workers and rows ready, every [`SAMPLE_EVERY`] seconds: the chart's lines.
    pub series: Vec<Point>,
}

/// The cluster and the queue at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Point {
    pub at: u64,
    /// Workers not ended, pending or running.
    pub workers: u64,
    pub pending: u64,
    /// Rows ready in the queues.
    pub ready: u64,
}

/// The simulated cluster and queues, as one strategy's run leaves them.
struct Cluster<'a> {
    scenario: &'a Scenario,
    rng: Rng,
    /// Live pods by serial, so in order of creation.
    pods: BTreeMap<u64, Pod>,
    serial: u64,
    /// Pods waiting for a node, in order of creation (ended ones are skipped).
    unscheduled: VecDeque<u64>,
    on_nodes: u64,
    not_started: u64,
    /// Pods to look at, by the second they have something due.
    due: BTreeMap<u64, Vec<u64>>,
    /// Running pods holding nothing, per job type.
    idle: Vec<BTreeSet<u64>>,
    queued: Vec<u64>,
    in_hand: Vec<u64>,
    done_rows: u64,
    /// Rows settled, per job type, as (second, rows).
    settled: Vec<VecDeque<(u64, u64)>>,
    outcome: Outcome,
}

impl Cluster<'_> {
    fn wake(&mut self, pod: u64, at: u64) {
        self.due.entry(at).or_default().push(pod);
    }

    /// Wakes as many of a job type's idle pods as it has rows ready, at `at`.
    fn feed(&mut self, job_type: usize, at: u64) {
        let wanted = usize::try_from(self.queued[job_type]).unwrap_or(usize::MAX);
        let woken: Vec<u64> = self.idle[job_type].iter().copied().take(wanted).collect();
        for pod in woken {
            self.idle[job_type].remove(&pod);
            self.wake(pod, at);
        }
    }

    /// Gives pods waiting for a node the room the cluster has.
    fn schedule(&mut self, now: u64) {
        let capacity = match self.scenario.more_nodes {
            Some((at, more)) if now >= at => more,
            _ => self.scenario.capacity,
        };
        while self.on_nodes < capacity {
            let Some(serial) = self.unscheduled.pop_front() else {
                break;
            };
            let latency = self.scenario.start_latency.sample(&mut self.rng).round() as u64;
            let Some(pod) = self.pods.get_mut(&serial) else {
                continue;
            };
            self.on_nodes += 1;
            pod.scheduled = Some(now);
            pod.starts_at = Some(now + latency);
            self.wake(serial, now + latency);
        }
    }

    /// What a pod does at `now`: start, finish its row, take the next, or exit.
    fn step(&mut self, serial: u64, now: u64) {
        let Some(pod) = self.pods.get_mut(&serial) else {
            return;
        };
        if !pod.started {
            if pod.starts_at.is_none_or(|at| at > now) {
                return;
            }
            pod.started = true;
            self.not_started -= 1;
        }
        match pod.row {
            Some(until) if until > now => return,
            Some(_) => {
                pod.row = None;
                pod.processed += 1;
                self.done_rows += 1;
                self.in_hand[pod.job_type] -= 1;
                let settled = &mut self.settled[pod.job_type];
                match settled.back_mut() {
                    Some((at, rows)) if *at == now => *rows += 1,
                    _ => settled.push_back((now, 1)),
                }
                if pod.one_row {
                    return self.end(serial, now);
                }
            }
            None => {}
        }
        let job_type = pod.job_type;
        if pod.draining {
            self.end(serial, now);
        } else if self.queued[job_type] > 0 {
            self.queued[job_type] -= 1;
            self.in_hand[job_type] += 1;
            let seconds = self.scenario.job_types[job_type]
                .row_seconds
                .sample(&mut self.rng);
            let until = now + seconds.ceil().max(1.0) as u64;
            pod.row = Some(until);
            self.wake(serial, until);
        } else if pod.one_row {
            // A KEDA job that found the queue empty: it exits with nothing done.
            self.end(serial, now);
        } else {
            self.idle[job_type].insert(serial);
        }
    }

    /// A pod ends at `now` and is accounted for.
    fn end(&mut self, serial: u64, now: u64) {
        let Some(pod) = self.pods.remove(&serial) else {
            return;
        };
        self.idle[pod.job_type].remove(&serial);
        if let Some(scheduled) = pod.scheduled {
            self.on_nodes -= 1;
            self.outcome.worker_seconds += now.saturating_sub(scheduled);
        }
        if !pod.started {
            self.not_started -= 1;
        }
        if pod.row.is_some() {
            // Stopped with a row in hand: the row goes back to the queue.
            self.queued[pod.job_type] += 1;
            self.in_hand[pod.job_type] -= 1;
            self.feed(pod.job_type, now + 1);
        }
        if pod.processed == 0 {
            self.outcome.wasted += 1;
        }
    }

    fn spawn(&mut self, job_type: usize, now: u64, one_row: bool) {
        self.serial += 1;
        let serial = self.serial;
        self.outcome.spawned += 1;
        self.pods.insert(
            serial,
            Pod {
                name: format!("{}-{serial}", self.scenario.job_types[job_type].name),
                job_type,
                created: now,
                scheduled: None,
                starts_at: None,
                started: false,
                row: None,
                processed: 0,
                draining: false,
                one_row,
            },
        );
        self.unscheduled.push_back(serial);
        self.not_started += 1;
    }

    /// The pod a decision names: names end in the pod's serial.
    fn serial_of(name: &str) -> Option<u64> {
        name.rsplit_once('-')?.1.parse().ok()
    }

    fn drain(&mut self, name: &str, now: u64) {
        let Some(serial) = Self::serial_of(name) else {
            return;
        };
        let Some(pod) = self.pods.get_mut(&serial) else {
            return;
        };
        pod.draining = true;
        if self.idle[pod.job_type].remove(&serial) {
            self.wake(serial, now + 1);
        }
    }
}

/// Runs `strategy` through `scenario` with `seed`.
pub fn run(scenario: &Scenario, strategy: &mut dyn Strategy, seed: u64) -> Outcome {
    let t0 = Instant::now();
    let types = &scenario.job_types;
    let mut arrivals: Vec<VecDeque<(u64, u64)>> = types
        .iter()
        .map(|t| t.arrivals.iter().copied().collect())
        .collect();
    let total_rows: u64 = types.iter().flat_map(|t| &t.arrivals).map(|(_, n)| n).sum();
    let mut sample = vec![
        QueueDepth {
            ready: 0,
            unacked: 0
        };
        types.len()
    ];
    let mut announced: Vec<VecDeque<(u64, u64)>> = vec![VecDeque::new(); types.len()];
    let mut cluster = Cluster {
        scenario,
        rng: Rng::with_seed(seed),
        pods: BTreeMap::new(),
        serial: 0,
        unscheduled: VecDeque::new(),
        on_nodes: 0,
        not_started: 0,
        due: BTreeMap::new(),
        idle: vec![BTreeSet::new(); types.len()],
        queued: vec![0; types.len()],
        in_hand: vec![0; types.len()],
        done_rows: 0,
        settled: vec![VecDeque::new(); types.len()],
        outcome: Outcome {
            strategy: strategy.name(),
            finished: None,
            worker_seconds: 0,
            wasted: 0,
            peak_pending: 0,
            peak_workers: 0,
            spawned: 0,
            series: Vec::new(),
        },
    };
    let mut next_decision = 0u64;
    for now in 0..=scenario.horizon {
        // Rows arrive, announced by the producer as they are published.
        let mut news = false;
        for (i, due) in arrivals.iter_mut().enumerate() {
            while due.front().is_some_and(|(at, _)| *at <= now) {
                let (_, rows) = due.pop_front().expect("a due arrival");
                cluster.queued[i] += rows;
                cluster.feed(i, now);
                announced[i].push_back((now, rows));
                news = true;
            }
        }
        // Pods get nodes in order of creation, start after their latency, finish rows,
        // take the next, and exit when they are done.
        cluster.schedule(now);
        while let Some(pods) = cluster.due.remove(&now) {
            for pod in pods {
                cluster.step(pod, now);
            }
        }
        if cluster.done_rows == total_rows && arrivals.iter().all(VecDeque::is_empty) {
            cluster.outcome.finished.get_or_insert(now);
        }
        let pending = cluster.not_started;
        let active = cluster.pods.len() as u64;
        // The management API's figures, refreshed every few seconds.
        if now % SAMPLE_EVERY == 0 {
            for (i, figures) in sample.iter_mut().enumerate() {
                *figures = QueueDepth {
                    ready: cluster.queued[i],
                    unacked: cluster.in_hand[i],
                };
            }
            cluster.outcome.series.push(Point {
                at: now,
                workers: active,
                pending,
                ready: cluster.queued.iter().sum(),
            });
        }
        for events in announced.iter_mut().chain(cluster.settled.iter_mut()) {
            while events.front().is_some_and(|(at, _)| at + 10 < now) {
                events.pop_front();
            }
        }
        let outcome = &mut cluster.outcome;
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
            workers: cluster
                .pods
                .values()
                .map(|p| WorkerSeen {
                    name: &p.name,
                    job_type: p.job_type,
                    running: p.started,
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
            settled: cluster
                .settled
                .iter()
                .map(|e| e.iter().map(|(_, n)| n).sum())
                .collect(),
        };
        let decisions = strategy.decide(&view);
        drop(view);
        for decision in decisions {
            match decision {
                Decision::Spawn { job_type, count } => {
                    for _ in 0..count {
                        cluster.spawn(job_type, now, strategy.one_row_jobs());
                    }
                }
                Decision::Drain(name) => cluster.drain(&name, now),
                Decision::Stop(name) => {
                    if let Some(serial) = Cluster::serial_of(&name) {
                        cluster.end(serial, now);
                    }
                }
            }
        }
    }
    // Workers still there at the end (a run past its horizon) cost until then.
    let end = cluster.outcome.finished.unwrap_or(scenario.horizon);
    let mut outcome = cluster.outcome;
    for pod in cluster.pods.values() {
        if let Some(scheduled) = pod.scheduled {
            outcome.worker_seconds += end.saturating_sub(scheduled);
        }
    }
    outcome
}

/// The CPU time this process has used.
pub fn cpu_time() -> nix::Result<Duration> {
    let spent = nix::time::clock_gettime(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID)?;
    Ok(Duration::from(spent))
}

/// One scenario run with every strategy.
#[derive(Debug, Clone)]
pub struct Run {
    pub scenario: Scenario,
    pub seed: u64,
    /// One per strategy, in [`strategies::all`]'s order.
    pub outcomes: Vec<Outcome>,
}

/// Every scenario (or only the one named) with every strategy.
pub fn run_scenarios(seed: u64, only: Option<&str>) -> anyhow::Result<Vec<Run>> {
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
    Ok(scenarios
        .into_iter()
        .map(|scenario| Run {
            outcomes: strategies::all()
                .into_iter()
                .map(|mut strategy| run(&scenario, strategy.as_mut(), seed))
                .collect(),
            scenario,
            seed,
        })
        .collect())
}

impl Run {
    /// The scenario's table, in Markdown.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let scenario = &self.scenario;
        let _ = writeln!(
            out,
            "## {} (seed {})\n\n{}\n",
            scenario.name, self.seed, scenario.about
        );
        let _ = writeln!(
            out,
            "| strategy | time to finish (s) | worker-seconds | wasted workers | peak pending | peak workers | spawned |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
        for outcome in &self.outcomes {
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
        out
    }
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
        run_scenarios(seed, Some(scenario.name))
            .expect("a known scenario")
            .remove(0)
            .outcomes
    }

    #[test]
    fn a_seed_always_gives_the_same_outcome() {
        let bursts = scenario("bursts");
        assert_eq!(run_all(&bursts, 7), run_all(&bursts, 7));
    }

    /// How long this takes is `scaler simulate`'s figure (BENCHMARKS.md), not a test's
    /// budget: on a shared machine the same run took 33 s of CPU one day and 54 s the
    /// next.
    #[test]
    fn ten_thousand_workers_through_ten_million_rows_to_the_end_and_again_the_same() {
        let scenario = scenario("ten-thousand-workers");
        let rows: u64 = scenario.job_types[0].arrivals.iter().map(|(_, n)| n).sum();
        assert_eq!(rows, 10_000_000);
        let outcomes = run_all(&scenario, 1);
        for outcome in &outcomes {
            assert!(outcome.finished.is_some(), "{outcome:?}");
        }
        let spillway = by("spillway", &outcomes);
        assert_eq!(spillway.peak_workers, 10_000, "{spillway:?}");
        assert_eq!(spillway.wasted, 0, "{spillway:?}");
        let again = run(&scenario, &mut Spillway::default(), 1);
        assert_eq!(again, spillway, "the same seed gives the same outcome");
    }

    #[test]
    fn every_row_is_done_and_spillway_wastes_no_worker_in_any_scenario_with_any_seed() {
        for seed in 1..=5 {
            for scenario in scenarios::all()
                .iter()
                .filter(|s| s.name != "ten-thousand-workers")
            {
                let outcomes = run_all(scenario, seed);
                let spillway = by("spillway", &outcomes);
                assert!(
                    spillway.finished.is_some(),
                    "{}: {spillway:?}",
                    scenario.name
                );
                assert_eq!(spillway.wasted, 0, "{} seed {seed}", scenario.name);
                let prototype = by("prototype", &outcomes);
                assert!(
                    spillway.finished <= prototype.finished,
                    "{}: reacting to announcements finishes no later: {spillway:?} {prototype:?}",
                    scenario.name
                );
            }
        }
    }

    #[test]
    fn the_chart_draws_workers_and_rows_ready_per_strategy_to_the_last_second() {
        let run = run_scenarios(1, Some("bursts")).unwrap().remove(0);
        let svg = chart::svg(&run);
        assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
        let lines = svg.matches("<polyline ").count();
        assert_eq!(
            lines,
            2 * run.outcomes.len(),
            "two panels, a line per strategy"
        );
        for outcome in &run.outcomes {
            assert!(svg.contains(&format!(">{}</text>", outcome.strategy)));
        }
        let end = run
            .outcomes
            .iter()
            .filter_map(|o| o.series.last())
            .map(|p| p.at)
            .max();
        assert!(
            svg.contains(&format!(">{} s</text>", end.unwrap())),
            "{svg}"
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
    fn the_table_has_a_row_per_strategy_and_unknown_scenarios_are_named() {
        let table = run_scenarios(1, Some("pending-pods")).unwrap()[0].table();
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
        let error = run_scenarios(1, Some("nope")).unwrap_err().to_string();
        assert!(error.contains("one-big-batch"), "{error}");
    }
}
