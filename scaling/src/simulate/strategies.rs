//! What decides, in a simulation: Spillway's policy as the tick runs it, KEDA
//! ScaledJob's three scaling strategies, and the prototype's rules.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use super::SimJobType;
use crate::{
    policy::{
        self, Action, Limits, Memory, News, Observation, Phase, Progress, QueueDepth, WorkerView,
    },
    share,
};

/// A worker as a scaler can see it.
#[derive(Debug, Clone)]
pub struct WorkerSeen<'a> {
    pub name: &'a str,
    pub job_type: usize,
    /// Started (not pending).
    pub running: bool,
    /// Rows in hand, as its report says.
    pub in_hand: u64,
    pub processed: u64,
    pub draining: bool,
    pub age: Duration,
}

/// Everything a scaler can see at one moment.
pub struct View<'a> {
    pub now: Instant,
    pub job_types: &'a [SimJobType],
    pub total_cap: Option<u32>,
    /// The management API's figures, as last sampled.
    pub sampled: &'a [QueueDepth],
    pub workers: Vec<WorkerSeen<'a>>,
    /// Rows announced and settled within the last 10 s, per job type.
    pub announced: Vec<u64>,
    pub settled: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Spawn { job_type: usize, count: u32 },
    Drain(String),
    Stop(String),
}

pub trait Strategy {
    fn name(&self) -> String;
    /// Seconds between two decisions.
    fn period(&self) -> u64;
    /// Whether rows announced by the producer wake it before its period is up.
    fn wakes_on_news(&self) -> bool;
    /// Whether its workers take one row and exit (a KEDA job) rather than take rows
    /// until asked to drain.
    fn one_row_jobs(&self) -> bool;
    fn decide(&mut self, view: &View) -> Vec<Decision>;
}

/// Every strategy, each fresh.
pub fn all() -> Vec<Box<dyn Strategy>> {
    vec![
        Box::new(Spillway::default()),
        Box::new(Keda(KedaStrategy::Default)),
        Box::new(Keda(KedaStrategy::Accurate)),
        Box::new(Keda(KedaStrategy::Eager)),
        Box::new(Prototype::default()),
    ]
}

/// Spillway: [`policy::decide`] per job type and [`share::share`] across them, as the
/// tick runs them, every 5 s and on every announcement.
#[derive(Default)]
pub struct Spillway {
    memory: HashMap<usize, Memory>,
    drains: HashMap<String, Instant>,
}

impl Strategy for Spillway {
    fn name(&self) -> String {
        "spillway".into()
    }

    fn period(&self) -> u64 {
        5
    }

    fn wakes_on_news(&self) -> bool {
        true
    }

    fn one_row_jobs(&self) -> bool {
        false
    }

    fn decide(&mut self, view: &View) -> Vec<Decision> {
        let mut decisions = Vec::new();
        let mut requests = Vec::new();
        for (i, job) in view.job_types.iter().enumerate() {
            let workers: Vec<WorkerView> = view
                .workers
                .iter()
                .filter(|w| w.job_type == i)
                .map(|w| WorkerView {
                    name: w.name.to_string(),
                    phase: if w.running {
                        Phase::Running
                    } else {
                        Phase::Pending
                    },
                    drain_requested_at: self.drains.get(w.name).copied(),
                    in_flight: w.running.then_some(w.in_hand),
                    progress: w.running.then_some(Progress {
                        processed: w.processed,
                        ..Progress::default()
                    }),
                    age: w.age,
                    waiting: None,
                })
                .collect();
            let observation = Observation {
                queue: Some(view.sampled[i]),
                workers,
                last_batch_published: None,
                news: News {
                    announced: view.announced[i],
                    settled: view.settled[i],
                },
                paused: false,
                cancelled_in_queue: 0,
            };
            let limits = Limits {
                threshold: 20,
                burst_threshold: 40,
                burst_size: job.burst_size,
                max_jobs: job.max_jobs,
                idle_window: Duration::from_secs(30),
                drain_grace: Duration::from_secs(60),
                start_timeout: Duration::from_secs(180),
            };
            let memory = self.memory.remove(&i).unwrap_or_default();
            let (made, memory) = policy::decide(&observation, &limits, memory, view.now);
            self.memory.insert(i, memory);
            for decision in made {
                match decision.action {
                    Action::Spawn(wanted) => requests.push(share::Request {
                        job_type: i.to_string(),
                        priority: job.priority,
                        wanted,
                        waiting: view.sampled[i].ready,
                    }),
                    Action::Drain(names) => {
                        for name in names {
                            self.drains.insert(name.clone(), view.now);
                            decisions.push(Decision::Drain(name));
                        }
                    }
                    Action::Stop(name) => decisions.push(Decision::Stop(name)),
                }
            }
        }
        let room = view.total_cap.map(|total| {
            total.saturating_sub(u32::try_from(view.workers.len()).unwrap_or(u32::MAX))
        });
        for grant in share::share(&requests, room, view.total_cap.unwrap_or(0)) {
            if grant.spawn > 0 {
                decisions.push(Decision::Spawn {
                    job_type: grant.job_type.parse().expect("job types are indices here"),
                    count: grant.spawn,
                });
            }
        }
        decisions
    }
}

/// KEDA ScaledJob's `scalingStrategy`, as its documentation gives them.
#[derive(Debug, Clone, Copy)]
pub enum KedaStrategy {
    Default,
    Accurate,
    Eager,
}

/// KEDA ScaledJob with the RabbitMQ scaler (`mode: QueueLength`, `value: 1`, read from
/// the management API: ready plus unacked), polling every 30 s (its default), each
/// Job consuming one message.
pub struct Keda(pub KedaStrategy);

impl Strategy for Keda {
    fn name(&self) -> String {
        match self.0 {
            KedaStrategy::Default => "keda default",
            KedaStrategy::Accurate => "keda accurate",
            KedaStrategy::Eager => "keda eager",
        }
        .into()
    }

    fn period(&self) -> u64 {
        30
    }

    fn wakes_on_news(&self) -> bool {
        false
    }

    fn one_row_jobs(&self) -> bool {
        true
    }

    fn decide(&mut self, view: &View) -> Vec<Decision> {
        let mut decisions = Vec::new();
        for (i, job) in view.job_types.iter().enumerate() {
            let queue_length = view.sampled[i].ready + view.sampled[i].unacked;
            let max_replicas = u64::from(job.max_jobs);
            let max_scale = queue_length.min(max_replicas);
            let running = view.workers.iter().filter(|w| w.job_type == i).count() as u64;
            let pending = view
                .workers
                .iter()
                .filter(|w| w.job_type == i && !w.running)
                .count() as u64;
            let scale_to = match self.0 {
                KedaStrategy::Default => max_scale.saturating_sub(running),
                KedaStrategy::Accurate => {
                    if max_scale + running > max_replicas {
                        max_replicas.saturating_sub(running)
                    } else {
                        max_scale.saturating_sub(pending)
                    }
                }
                KedaStrategy::Eager => max_replicas.saturating_sub(running).min(max_scale),
            };
            if scale_to > 0 {
                decisions.push(Decision::Spawn {
                    job_type: i,
                    count: u32::try_from(scale_to).unwrap_or(u32::MAX),
                });
            }
        }
        decisions
    }
}

/// The prototype's rules, from the queue figures alone, every 5 s: above 40 ready, up
/// to five more workers; rows and no worker, one; ready and unacked at zero for 30 s,
/// every worker asked to drain.
#[derive(Default)]
pub struct Prototype {
    idle_since: BTreeMap<usize, Instant>,
}

impl Strategy for Prototype {
    fn name(&self) -> String {
        "prototype".into()
    }

    fn period(&self) -> u64 {
        5
    }

    fn wakes_on_news(&self) -> bool {
        false
    }

    fn one_row_jobs(&self) -> bool {
        false
    }

    fn decide(&mut self, view: &View) -> Vec<Decision> {
        let mut decisions = Vec::new();
        for (i, job) in view.job_types.iter().enumerate() {
            let QueueDepth { ready, unacked } = view.sampled[i];
            let mine: Vec<&WorkerSeen> = view.workers.iter().filter(|w| w.job_type == i).collect();
            let active = mine.len() as u32;
            let room = job.max_jobs.saturating_sub(active);
            let spawn = if ready > 40 {
                room.min(5)
            } else if ready > 0 && active == 0 {
                room.min(1)
            } else {
                0
            };
            if spawn > 0 {
                decisions.push(Decision::Spawn {
                    job_type: i,
                    count: spawn,
                });
            }
            if ready == 0 && unacked == 0 {
                let since = *self.idle_since.entry(i).or_insert(view.now);
                if view.now.duration_since(since) >= Duration::from_secs(30) {
                    decisions.extend(
                        mine.iter()
                            .filter(|w| !w.draining)
                            .map(|w| Decision::Drain(w.name.to_string())),
                    );
                }
            } else {
                self.idle_since.remove(&i);
            }
        }
        decisions
    }
}
