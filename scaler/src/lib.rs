//! Spillway's scaler: watches each job type's queue and its workers, spawns workers by
//! queue depth and drains them once everything has been idle for the idle window.
//!
//! # Layout
//!
//! - [`config`]: the scaler's settings, from the environment.
//! - [`policy`]: the scaling rules, a pure function with table tests.
//! - [`tick`]: observe -> decide -> act, once per tick.
//! - [`context`]: what a tick observes and acts through, each side effect behind a
//!   trait: [`launcher::Launcher`], [`context::QueueFigures`], [`context::DrainRequests`].
//! - [`launcher`]: where workers run, behind one trait: [`launcher::local`] (processes)
//!   and [`launcher::kube`] (Kubernetes Jobs), both starting a worker from the same
//!   [`launcher::spec`] (its name, job type and environment, from the settings).
//! - [`bus`]: worker reports in, drain requests out, over RabbitMQ.
//! - [`simulate`]: `scaler simulate`, the policy against a simulated cluster.
//! - [`share`]: workers fitted under `max_workers_total`, by priority (pure).
//! - [`reports`]: each worker's latest report and each job type's latest batch
//!   announcement, as heard on the bus.
//! - [`board`]: what the dashboard shows of live scaling, kept bounded.
//! - [`dashboard`]: the HTML pages and their JSON API; batches read from the ledger
//!   ([`dashboard::batches`]).
//! - [`http`]: every route, with `/api/jobs/{name}/logs`, `/healthz`, `/readyz`, `/metrics`.
//! - [`metrics`]: the Prometheus metrics.

pub mod board;
pub mod bus;
pub mod config;
pub mod context;
pub mod dashboard;
pub mod http;
pub mod launcher;
pub mod login;
pub mod metrics;
pub mod reports;
pub mod tick;

pub use spillway_scaling::{policy, share, simulate};

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use spillway_common::{
    auth::{Access, Gate},
    jobs_config::JobsConfig,
    rabbit_api::RabbitApi,
};
use spillway_ledger::Ledger;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    board::Board,
    bus::Bus,
    config::{LauncherKind, Settings},
    context::{Context, Timing},
    dashboard::{DashboardState, Page, operations::Producer},
    http::HttpState,
    launcher::{Launcher, kube::KubeLauncher, local::LocalLauncher},
    metrics::Metrics,
    reports::Reports,
    tick::Scaler,
};

/// The least time from the end of a tick to a tick woken by news (the periodic tick
/// is not held).
const WAKE_SPACING: Duration = Duration::from_millis(200);

/// Everything a scaler is made of besides its launcher.
struct Parts {
    queues: Arc<RabbitApi>,
    bus: Arc<Bus>,
    reports: Arc<Reports>,
    board: Arc<Board>,
    metrics: Arc<Metrics>,
    /// Read by the dashboard only: scaling never waits for PostgreSQL.
    ledger: Ledger,
    timing: Timing,
    producer_url: String,
    /// How long a connection may take to send a request head.
    header_timeout: Duration,
    /// Who may call the API.
    gate: Gate,
}

/// Runs the scaler until `stop`: HTTP endpoints on `listener`, the bus, and the ticks.
/// Workers are left running when it stops; a restarted scaler finds them again.
pub async fn run(
    settings: Settings,
    jobs: JobsConfig,
    listener: TcpListener,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    // Who may call the API and open the dashboard, by the address it listens on.
    let gate = Access::from_settings(&settings.auth, listener.local_addr()?)?;
    let reports = Arc::new(Reports::default());
    let board = Arc::new(Board::new(Arc::clone(&reports)));
    let metrics = Arc::new(Metrics::new());
    for job_type in jobs.job_types.keys() {
        metrics.start_job_type(job_type);
    }
    let parts = Parts {
        queues: Arc::new(
            RabbitApi::new(&settings.rabbitmq_api_url, &settings.broker.amqp_url)?
                .with_read_timeout(tick::read_timeout(jobs.tick())),
        ),
        bus: Bus::new(Arc::clone(&reports), &jobs),
        reports,
        board,
        metrics,
        ledger: settings.database.open()?,
        timing: Timing {
            drain_grace: Duration::from_secs(settings.drain_grace_seconds),
            report_stale_after: Duration::from_secs(settings.report_stale_seconds),
            start_timeout: Duration::from_secs(settings.worker_start_timeout_seconds),
        },
        producer_url: settings.producer_url.clone(),
        header_timeout: Duration::from_secs(settings.request_header_timeout_seconds),
        gate,
    };
    tokio::spawn(Arc::clone(&parts.bus).run(settings.broker.clone(), stop.clone()));
    match settings.launcher() {
        LauncherKind::Kubernetes => {
            let client = kube::Client::try_default()
                .await
                .context("cannot reach the Kubernetes API (LAUNCHER=kubernetes)")?;
            let (launcher, watch) = KubeLauncher::from_settings(&settings, &jobs, client).await?;
            let watch = tokio::spawn(watch);
            let served = serve_and_tick(launcher, jobs, parts, listener, stop).await;
            watch.abort();
            served?;
        }
        LauncherKind::Local => {
            let launcher = LocalLauncher::from_settings(&settings)?;
            serve_and_tick(launcher, jobs, parts, listener, stop).await?;
        }
    }
    tracing::info!("scaler stopped; workers keep running and a restarted scaler picks them up");
    Ok(())
}

async fn serve_and_tick<L: Launcher>(
    launcher: L,
    jobs: JobsConfig,
    parts: Parts,
    listener: TcpListener,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let launcher = Arc::new(launcher);
    let dashboard = DashboardState {
        board: Arc::clone(&parts.board),
        page: Arc::new(Page::new(2000)),
        ledger: parts.ledger.clone(),
        producer: Producer::new(&parts.producer_url),
    };
    tokio::spawn(load_pauses(
        parts.ledger.clone(),
        Arc::clone(&parts.reports),
        stop.clone(),
    ));
    let router = http::app(
        HttpState {
            bus: Arc::clone(&parts.bus),
            metrics: Arc::clone(&parts.metrics),
            launcher: Arc::clone(&launcher),
            reports: Arc::clone(&parts.reports),
            ledger: parts.ledger.clone(),
            job_types: Arc::new(jobs.job_types.keys().cloned().collect()),
            stop: stop.clone(),
        },
        dashboard,
        parts.gate.clone(),
    );
    let http = tokio::spawn(spillway_common::serve::serve(
        listener,
        router,
        parts.header_timeout,
        stop.clone().cancelled_owned(),
    ));
    let mut scaler = Scaler::new(
        jobs,
        Context {
            launcher,
            queues: parts.queues,
            drains: parts.bus,
            reports: parts.reports,
            metrics: parts.metrics,
            board: parts.board,
            timing: parts.timing,
        },
    );
    let mut ticks = tokio::time::interval(scaler.jobs.tick());
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let reports = Arc::clone(&scaler.ctx.reports);
    let mut last = tokio::time::Instant::now();
    loop {
        // The periodic tick, or at once on news: rows announced, a worker whose hands
        // changed or that left. A woken tick starts at least WAKE_SPACING after the
        // previous one ended, so that thousands of workers reporting keep the scaler
        // busy a bounded share of the time.
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticks.tick() => {}
            () = reports.wakes() => tokio::time::sleep_until(last + WAKE_SPACING).await,
        }
        scaler.tick(std::time::Instant::now()).await;
        last = tokio::time::Instant::now();
    }
    http.await??;
    Ok(())
}

/// Reads which job types are paused from the ledger, once it answers: scaling goes on
/// meanwhile (and a job type paused before a restart may spawn until then).
async fn load_pauses(ledger: Ledger, reports: Arc<Reports>, stop: CancellationToken) {
    loop {
        match ledger.paused_job_types().await {
            Ok(paused) => {
                for job_type in &paused {
                    reports.set_paused(job_type, true);
                }
                if !paused.is_empty() {
                    tracing::info!(?paused, "job types paused before this start");
                }
                return;
            }
            Err(error) => tracing::warn!(%error, "cannot read paused job types yet; retrying"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}
