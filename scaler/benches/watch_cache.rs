//! The kube launcher at 10,000 Jobs: part of `./manage.sh bench`.
//!
//! - **h1.** The resident memory of a process whose kube launcher's watch cache holds
//!   10,000 worker Jobs (the Jobs the scaler creates, each with a running status),
//!   against a process holding the same Jobs in a bare kube-rs reflector (what a watch
//!   cache keeps when nothing is left out), watched from the same API.
//! - **h2.** One tick of the scaler over those 10,000 workers (the launcher's listing,
//!   the policy, the board and the metrics; queue figures and drain requests answered
//!   in memory), against one read of the bare reflector's 10,000 Jobs.
//!
//! The API is the Kubernetes API double over TLS (the Jobs put in its store directly:
//! no pod runs), and each side is this executable started again in a role, connecting
//! through a kubeconfig as the scaler does, so that each has its own memory to measure.

use std::{
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser;
use futures_util::StreamExt;
use k8s_openapi::{
    api::batch::v1::{Job, JobStatus},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, reflector, watcher},
};
use spillway_common::{
    jobs_config::JobsConfig,
    rabbit_api::{ApiError, QueueStats},
};
use spillway_scaler::{
    board::Board,
    bus::DrainError,
    config::Settings,
    context::{Context, DrainRequests, QueueFigures, Timing},
    launcher::{
        Launcher as _,
        kube::{KubeLauncher, worker_job},
        spec::WorkerEnv,
        worker_name,
    },
    metrics::Metrics,
    reports::Reports,
    tick::Scaler,
};
use spillway_testkit::{
    bench::{
        process::rss_kib,
        results::{Figure, Measure, record},
    },
    kube_api::{KubeApi, KubeApiConfig},
};

const JOBS: usize = 10_000;
const NAMESPACE: &str = "spillway-bench";
/// Set in the environment of this executable when it runs as one side.
const ROLE: &str = "SPILLWAY_BENCH_ROLE";
const LAUNCHER: &str = "launcher";
const BARE: &str = "bare-reflector";
/// Ticks (and bare reads) timed, after one untimed.
const TIMED: u32 = 5;
const PATIENCE: Duration = Duration::from_secs(300);

/// What a side measured, printed as one JSON line on its standard output.
#[derive(serde::Serialize, serde::Deserialize)]
struct Side {
    rss_kib: u64,
    /// Mean time of one tick (the launcher) or one read of the cache (bare).
    seconds: f64,
}

#[tokio::main]
async fn main() {
    match std::env::var(ROLE).as_deref() {
        Ok(LAUNCHER) => print_side(launcher_side().await),
        Ok(BARE) => print_side(bare_side().await),
        _ => compare().await,
    }
}

fn print_side(side: Side) {
    println!(
        "{}",
        serde_json::to_string(&side).expect("a side serialises")
    );
}

async fn compare() {
    let api = KubeApi::start(KubeApiConfig::new(NAMESPACE));
    let settings = Settings::parse_from(["scaler"]);
    let jobs = JobsConfig::default();
    let template = settings.job_template(&jobs);
    let env = WorkerEnv::from_settings(&settings);
    let started = Time(Timestamp::now());
    for _ in 0..JOBS {
        let mut job = worker_job(&template, &env.spec("default", &worker_name("default")))
            .expect("the default job type's worker Job");
        job.status = Some(JobStatus {
            active: Some(1),
            ready: Some(1),
            start_time: Some(started.clone()),
            ..JobStatus::default()
        });
        api.put_job(job);
    }
    let dir = tempfile::tempdir().expect("a temp dir");
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let side = |role: &str| {
        let output = Command::new(std::env::current_exe().expect("this executable"))
            .env(ROLE, role)
            .env("KUBECONFIG", &kubeconfig)
            .env("KUBE_NAMESPACE", NAMESPACE)
            .stderr(Stdio::inherit())
            .output()
            .expect("run a side");
        assert!(output.status.success(), "the {role} side failed");
        let line = String::from_utf8_lossy(&output.stdout);
        let side: Side = serde_json::from_str(line.trim())
            .unwrap_or_else(|e| panic!("the {role} side printed {line:?}: {e}"));
        println!(
            "{role}: {} KiB, {:.1} ms",
            side.rss_kib,
            side.seconds * 1000.0
        );
        side
    };
    // Launcher, bare, bare, launcher: neither gains from going first.
    let sides: Vec<(Side, Side)> = (0..2)
        .map(|run| {
            if run == 0 {
                let launcher = side(LAUNCHER);
                (launcher, side(BARE))
            } else {
                let bare = side(BARE);
                (side(LAUNCHER), bare)
            }
        })
        .collect();
    let mean = |pick: fn(&(Side, Side)) -> f64| sides.iter().map(pick).sum::<f64>() / 2.0;
    record(
        "watch_cache",
        &[
            Figure {
                key: "h1".into(),
                what: format!("scaler RSS, {JOBS} worker Jobs in its watch cache"),
                spillway: Measure::Kib(mean(|(l, _)| l.rss_kib as f64) as u64),
                baseline: Measure::Kib(mean(|(_, b)| b.rss_kib as f64) as u64),
                note: format!(
                    "resident memory of a process whose kube launcher (as the scaler builds \
                     it, through a kubeconfig, over TLS) has synced its watch of {JOBS} running \
                     worker Jobs from the Kubernetes API double and ticked over them, against \
                     a process holding the same Jobs in a bare kube-rs reflector; mean of two \
                     runs each; lower is better"
                ),
            },
            Figure {
                key: "h2".into(),
                what: format!("one scaler tick over {JOBS} workers"),
                spillway: Measure::Seconds(mean(|(l, _)| l.seconds)),
                baseline: Measure::Seconds(mean(|(_, b)| b.seconds)),
                note: format!(
                    "one tick of the scaler over the launcher's {JOBS} workers (listing them \
                     from the cache, the policy, the board, the metrics; queue figures and \
                     drain requests answered in memory), mean of {TIMED}, against one read of \
                     the bare reflector's {JOBS} Jobs and their names; lower is better"
                ),
            },
        ],
    );
}

/// The kube launcher as the scaler builds it, synced, then ticked over.
async fn launcher_side() -> Side {
    let settings = Settings::parse_from(["scaler"]);
    let mut jobs = JobsConfig::default();
    jobs.job_types
        .get_mut("default")
        .expect("the default job type")
        .max_jobs = JOBS as u32;
    let client = Client::try_default()
        .await
        .expect("a client from KUBECONFIG");
    let (launcher, watch) = KubeLauncher::new(
        client,
        NAMESPACE,
        settings.job_template(&jobs),
        WorkerEnv::from_settings(&settings),
    );
    tokio::spawn(watch);
    let launcher = Arc::new(launcher);
    let deadline = Instant::now() + PATIENCE;
    while !launcher.workers().await.is_ok_and(|w| w.len() == JOBS) {
        assert!(
            Instant::now() < deadline,
            "the watch did not sync {JOBS} Jobs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "launcher: {} KiB once synced, before any tick",
        rss_kib(std::process::id())
    );
    let reports = Arc::new(Reports::default());
    let mut scaler = Scaler::new(
        jobs,
        Context {
            launcher,
            queues: Arc::new(Busy),
            drains: Arc::new(Busy),
            reports: Arc::clone(&reports),
            metrics: Arc::new(Metrics::new()),
            board: Arc::new(Board::new(reports)),
            timing: Timing {
                drain_grace: Duration::from_secs(60),
                report_stale_after: Duration::from_secs(30),
                start_timeout: Duration::from_secs(180),
            },
        },
    );
    let t0 = Instant::now();
    scaler.tick(t0).await;
    let started = Instant::now();
    for n in 1..=TIMED {
        scaler
            .tick(t0 + Duration::from_secs(5 * u64::from(n)))
            .await;
    }
    let seconds = started.elapsed().as_secs_f64() / f64::from(TIMED);
    Side {
        rss_kib: rss_kib(std::process::id()),
        seconds,
    }
}

/// The same Jobs in a bare reflector, read as a tick would read them.
async fn bare_side() -> Side {
    let client = Client::try_default()
        .await
        .expect("a client from KUBECONFIG");
    let jobs: Api<Job> = Api::namespaced(client, NAMESPACE);
    let (store, writer) = reflector::store();
    let watch = reflector(writer, watcher(jobs, watcher::Config::default()))
        .default_backoff()
        .for_each(|_| std::future::ready(()));
    tokio::spawn(watch);
    let deadline = Instant::now() + PATIENCE;
    while store.state().len() < JOBS {
        assert!(
            Instant::now() < deadline,
            "the watch did not sync {JOBS} Jobs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let read = || {
        store
            .state()
            .iter()
            .filter_map(|job| job.metadata.name.clone())
            .count()
    };
    assert_eq!(read(), JOBS);
    let started = Instant::now();
    for _ in 0..TIMED {
        assert_eq!(read(), JOBS);
    }
    Side {
        rss_kib: rss_kib(std::process::id()),
        seconds: started.elapsed().as_secs_f64() / f64::from(TIMED),
    }
}

/// Queue figures of a queue whose rows are all in hand, and drain requests that go
/// nowhere: what the tick reads and asks, answered in memory.
struct Busy;

impl QueueFigures for Busy {
    async fn queue_stats(&self, _queue: &str) -> Result<QueueStats, ApiError> {
        Ok(QueueStats {
            ready: 0,
            unacked: JOBS as u64,
            ..QueueStats::default()
        })
    }
}

impl DrainRequests for Busy {
    async fn drain(&self, _worker: &str) -> Result<(), DrainError> {
        Ok(())
    }
}
