//! The scenarios `scaler simulate` runs: arrival traces, row times, cluster sizes.

use super::{Dist, SimJobType};

/// A cluster and the rows that arrive at it.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    pub job_types: Vec<SimJobType>,
    /// Pods the nodes hold at once; the rest stay `Pending`.
    pub capacity: u64,
    /// Nodes added (a cluster autoscaler): from this second, room for this many pods.
    pub more_nodes: Option<(u64, u64)>,
    /// Seconds from a pod getting a node to its worker taking rows.
    pub start_latency: Dist,
    /// `max_workers_total`, for the scalers that have one.
    pub total_cap: Option<u32>,
    /// The longest a run may last, in seconds.
    pub horizon: u64,
}

fn job_type(
    name: &'static str,
    max_jobs: u32,
    row_seconds: Dist,
    arrivals: Vec<(u64, u64)>,
) -> SimJobType {
    SimJobType {
        name,
        priority: 0,
        max_jobs,
        burst_size: 5,
        row_seconds,
        arrivals,
    }
}

/// Every scenario, the 10,000-worker one last.
pub fn all() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "one-big-batch",
            about: "20,000 rows of 1-3 s at once; 100 workers at most, room for all of them.",
            job_types: vec![job_type(
                "default",
                100,
                Dist::Uniform(1.0, 3.0),
                vec![(0, 20_000)],
            )],
            capacity: 100,
            start_latency: Dist::Uniform(3.0, 8.0),
            more_nodes: None,
            total_cap: None,
            horizon: 3_600,
        },
        Scenario {
            name: "steady-stream",
            about: "5 rows of 2 s every second for 10 minutes.",
            job_types: vec![job_type(
                "default",
                50,
                Dist::Fixed(2.0),
                (0..600).map(|t| (t, 5)).collect(),
            )],
            capacity: 50,
            start_latency: Dist::Uniform(3.0, 8.0),
            more_nodes: None,
            total_cap: None,
            horizon: 7_200,
        },
        Scenario {
            name: "bursts",
            about: "1,000 rows of 0.5-1.5 s every 2 minutes, five times: the queue empties in between.",
            job_types: vec![job_type(
                "default",
                50,
                Dist::Uniform(0.5, 1.5),
                (0..5).map(|i| (i * 120, 1_000)).collect(),
            )],
            capacity: 50,
            start_latency: Dist::Uniform(3.0, 8.0),
            more_nodes: None,
            total_cap: None,
            horizon: 7_200,
        },
        Scenario {
            name: "long-tail",
            about: "2,000 rows of 1 s, one in a hundred taking 120 s.",
            job_types: vec![job_type(
                "default",
                40,
                Dist::Tail {
                    base: 1.0,
                    slow: 120.0,
                    share: 0.01,
                },
                vec![(0, 2_000)],
            )],
            capacity: 40,
            start_latency: Dist::Uniform(3.0, 8.0),
            more_nodes: None,
            total_cap: None,
            horizon: 3_600,
        },
        Scenario {
            name: "pending-pods",
            about: "100 rows of 10 s; 20 workers allowed but nodes for 2 until a cluster autoscaler adds room for 20 after 90 s: pods stay Pending that long.",
            job_types: vec![job_type("default", 20, Dist::Fixed(10.0), vec![(0, 100)])],
            capacity: 2,
            start_latency: Dist::Uniform(3.0, 8.0),
            more_nodes: Some((90, 20)),
            total_cap: None,
            horizon: 3_600,
        },
        Scenario {
            name: "shared-cluster",
            about: "Three job types under max_workers_total 30: two bulk ones (priority 1) busy from the start, an urgent one (priority 5) arriving after a minute.",
            job_types: vec![
                SimJobType {
                    priority: 5,
                    ..job_type("urgent", 30, Dist::Fixed(2.0), vec![(60, 500)])
                },
                SimJobType {
                    priority: 1,
                    ..job_type("bulk-a", 30, Dist::Uniform(1.0, 3.0), vec![(0, 10_000)])
                },
                SimJobType {
                    priority: 1,
                    ..job_type("bulk-b", 30, Dist::Uniform(1.0, 3.0), vec![(0, 3_000)])
                },
            ],
            capacity: 30,
            start_latency: Dist::Uniform(3.0, 8.0),
            more_nodes: None,
            total_cap: Some(30),
            horizon: 7_200,
        },
        Scenario {
            name: "ten-thousand-workers",
            about: "10,000,000 rows of 20-40 s at once; 10,000 workers at most, nodes for all, pods taking 5-30 s to start.",
            job_types: vec![SimJobType {
                burst_size: 500,
                ..job_type(
                    "default",
                    10_000,
                    Dist::Uniform(20.0, 40.0),
                    vec![(0, 10_000_000)],
                )
            }],
            capacity: 10_000,
            start_latency: Dist::Uniform(5.0, 30.0),
            more_nodes: None,
            total_cap: None,
            horizon: 100_000,
        },
    ]
}
