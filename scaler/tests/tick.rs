//! The tick against a real broker, with a launcher that only records what it is told
//! and workers that are reports published by the test: what the scaler hears on the
//! bus (worker counters, batch announcements) keeps busy workers from being drained,
//! a drain request the broker refuses is counted as a failure, not as a drain, and a
//! management API that holds the reads of one queue delays only that job type.
//!
//! `tick` takes *now* as an argument, so the idle window is walked with instants the
//! test chooses instead of waiting for it; reports are kept fresh for the whole walk.

use std::{
    future::IntoFuture,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Router, extract::Request, http::header, response::IntoResponse};

use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties, options::BasicPublishOptions,
};
use prometheus_client::metrics::{counter::Counter, family::Family};
use spillway_common::{
    events::{EVENTS_EXCHANGE, WorkerReport, batch_routing_key, report_routing_key},
    jobs_config::JobsConfig,
    rabbit_api::RabbitApi,
};
use spillway_scaler::{
    board::Board,
    bus::Bus,
    context::{Context, Timing},
    launcher::{LaunchedWorker, Launcher, LauncherError, LogLines},
    metrics::{JobLabels, Metrics},
    policy::Phase,
    reports::Reports,
    tick::Scaler,
};
use spillway_testkit::{TestVhost, builders::worker_report, wait_for};
use tokio_util::sync::CancellationToken;

const PATIENCE: Duration = Duration::from_secs(30);

/// A launcher that runs nothing: it lists the workers it was given or asked to spawn.
#[derive(Default)]
struct Recorder {
    workers: Mutex<Vec<LaunchedWorker>>,
    /// Each spawn: job type and when it was asked for.
    spawns: Mutex<Vec<(String, Instant)>>,
}

impl Recorder {
    fn with_running(job_type: &str, names: &[&str]) -> Self {
        let recorder = Recorder::default();
        for name in names {
            recorder.add(job_type, name, Phase::Running);
        }
        recorder
    }

    fn spawns(&self) -> Vec<(String, Instant)> {
        self.spawns.lock().unwrap().clone()
    }

    fn add(&self, job_type: &str, name: &str, phase: Phase) {
        self.workers.lock().unwrap().push(LaunchedWorker {
            name: name.into(),
            job_type: job_type.into(),
            phase,
            // Started now: a pending worker is not past its start timeout.
            started_unix: spillway_common::events::unix_now(),
            waiting: None,
        });
    }
}

impl Launcher for Recorder {
    async fn workers(&self) -> Result<Vec<LaunchedWorker>, LauncherError> {
        Ok(self.workers.lock().unwrap().clone())
    }

    async fn spawn(&self, job_type: &str, name: &str) -> Result<(), LauncherError> {
        self.spawns
            .lock()
            .unwrap()
            .push((job_type.into(), Instant::now()));
        self.add(job_type, name, Phase::Pending);
        Ok(())
    }

    async fn stop(&self, _name: &str) -> Result<(), LauncherError> {
        Ok(())
    }

    async fn forget(&self, name: &str) -> Result<(), LauncherError> {
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

/// A scaler on its own vhost, its bus connected, and a channel to publish as the
/// workers and the producer would.
struct Harness {
    /// Held for the test's length: dropping it deletes the vhost.
    vhost: TestVhost,
    scaler: Scaler<Recorder, RabbitApi, Bus>,
    publisher: Channel,
    _connection: Connection,
    stop: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

const ONE_JOB_TYPE: &str = r#"
idle_seconds = 30
[job_types.default]
queue = "tasks"
"#;

impl Harness {
    async fn start(label: &str, jobs: &str, launcher: Recorder) -> Self {
        let vhost = TestVhost::new(label).await;
        Self::on(vhost, jobs, launcher, |vhost| vhost.api.clone()).await
    }

    /// A harness on `vhost` whose scaler reads the management API through `api`.
    async fn on(
        vhost: TestVhost,
        jobs: &str,
        launcher: Recorder,
        api: impl FnOnce(&TestVhost) -> RabbitApi,
    ) -> Self {
        let path = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(path.path(), jobs).unwrap();
        let jobs = JobsConfig::load(Some(path.path())).unwrap();
        let reports = Arc::new(Reports::default());
        let board = Arc::new(Board::new(Arc::clone(&reports)));
        let bus = Bus::new(Arc::clone(&reports), &jobs);
        let stop = CancellationToken::new();
        tokio::spawn(Arc::clone(&bus).run(vhost.amqp_url.clone(), stop.clone()));
        wait_for("the bus to connect", PATIENCE, || {
            std::future::ready(bus.connected())
        })
        .await;
        // The bus declares the work queues; the management API has figures for them
        // only once it has sampled them.
        for job in jobs.job_types.values() {
            wait_for(
                &format!("figures for queue {}", job.queue),
                PATIENCE,
                || async { vhost.api.queue_stats(&job.queue).await.is_ok() },
            )
            .await;
        }
        let ctx = Context {
            launcher: Arc::new(launcher),
            queues: Arc::new(api(&vhost)),
            drains: bus,
            reports,
            board,
            metrics: Arc::new(Metrics::new()),
            timing: Timing {
                drain_grace: Duration::from_secs(60),
                // The test walks *now* far ahead of the clock: reports must stay fresh.
                report_stale_after: Duration::from_secs(3600),
                start_timeout: Duration::from_secs(180),
            },
        };
        let scaler = Scaler::new(jobs, ctx);
        let connection = Connection::connect(&vhost.amqp_url, ConnectionProperties::default())
            .await
            .unwrap();
        let publisher = connection.create_channel().await.unwrap();
        Harness {
            vhost,
            scaler,
            publisher,
            _connection: connection,
            stop,
        }
    }

    /// Publishes one row's worth of bytes straight to `queue`.
    async fn put_row(&self, queue: &str) {
        self.publisher
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                b"{}",
                BasicProperties::default(),
            )
            .await
            .unwrap();
    }

    async fn publish(&self, routing_key: &str, body: &serde_json::Value) {
        self.publisher
            .basic_publish(
                EVENTS_EXCHANGE.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                &serde_json::to_vec(body).unwrap(),
                BasicProperties::default(),
            )
            .await
            .unwrap();
    }

    /// Publishes a report of `worker` (nothing in hand) and waits until the bus has it.
    async fn report(&self, worker: &str, processed: u64) {
        let report = WorkerReport {
            processed,
            ..worker_report(worker)
        };
        self.publish(
            &report_routing_key("default", worker),
            &serde_json::to_value(&report).unwrap(),
        )
        .await;
        let reports = &self.scaler.ctx.reports;
        wait_for(
            &format!("the bus to hear {worker} at {processed} processed"),
            PATIENCE,
            || {
                std::future::ready(
                    reports
                        .get(worker)
                        .is_some_and(|(r, _)| r.processed == processed),
                )
            },
        )
        .await;
    }

    /// Publishes a batch's change to `queued` as the producer's outbox does, and waits
    /// for the bus.
    async fn announce_batch(&self) {
        let before = self.scaler.ctx.reports.last_batch_published("default");
        let batch = serde_json::json!({
            "batch_id": "b1", "job_type": "default", "state": "queued",
            "file_name": null, "error": null,
            "rows": 5_000, "published": 5_000, "pending": 5_000, "failed": 0, "done": 0,
            "dead": 0, "cancelled": 0,
            "received_at": "2026-12-01T06:00:00+00:00", "published_at": "2026-12-01T06:00:01+00:00",
            "started_at": null, "finished_at": null,
            "results_url": "http://localhost:8000/batches/b1/results", "event_id": 1
        });
        self.publish(&batch_routing_key("default", "queued"), &batch)
            .await;
        let reports = &self.scaler.ctx.reports;
        wait_for("the bus to hear the batch", PATIENCE, || {
            std::future::ready(reports.last_batch_published("default") != before)
        })
        .await;
    }

    fn decisions(&self, action: &'static str) -> u64 {
        self.scaler.ctx.metrics.decision_count("default", action)
    }
}

/// The count of `job_type` in a per-job-type counter.
fn count(family: &Family<JobLabels, Counter>, job_type: &str) -> u64 {
    family
        .get_or_create(&JobLabels {
            job_type: job_type.into(),
        })
        .get()
}

/// Issue 15: with fast rows a worker's reports show nothing in hand and the queue
/// figures lag at zero, so the scaler drained a worker whose `processed` was climbing.
#[tokio::test]
async fn a_worker_whose_counts_move_between_ticks_is_not_drained() {
    let mut h = Harness::start(
        "tick-moving",
        ONE_JOB_TYPE,
        Recorder::with_running("default", &["w0"]),
    )
    .await;
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    h.report("w0", 1_001).await;
    h.scaler.tick(at(0)).await;
    h.scaler.tick(at(1)).await; // idle from here, as far as the figures tell
    h.report("w0", 1_317).await;
    h.scaler.tick(at(30)).await;
    h.scaler.tick(at(31)).await;
    assert_eq!(
        h.decisions("drain"),
        0,
        "30 s after the window began, but w0 settled rows within it"
    );
    h.scaler.tick(at(61)).await;
    assert_eq!(
        h.decisions("drain"),
        1,
        "30 s after w0's counters last moved"
    );
}

/// Issue 16: a worker of a job type no longer in the file (or with no job-type label)
/// was watched but never shown, drained or stopped.
#[tokio::test]
async fn workers_of_no_configured_job_type_are_listed_and_drained() {
    let recorder = Recorder::with_running("retired", &["old-1"]);
    recorder.add("", "unlabelled-1", Phase::Running);
    let mut h = Harness::start("tick-orphans", ONE_JOB_TYPE, recorder).await;
    h.scaler.tick(Instant::now()).await;
    let listed: Vec<(String, String)> = h
        .scaler
        .ctx
        .board
        .jobs()
        .into_iter()
        .map(|job| (job.name, job.job_type))
        .collect();
    for expected in [("old-1", "retired"), ("unlabelled-1", "")] {
        assert!(
            listed.contains(&(expected.0.into(), expected.1.into())),
            "{expected:?} in {listed:?}"
        );
    }
    let metrics = Arc::clone(&h.scaler.ctx.metrics);
    let drains = |job_type: &str| metrics.decision_count(job_type, "drain");
    assert_eq!((drains("retired"), drains("")), (1, 1));
    h.scaler.tick(Instant::now()).await;
    assert_eq!(
        (drains("retired"), drains("")),
        (1, 1),
        "asked once, not every tick"
    );
}

/// A batch announced is rows on their way: the window restarts though the queue
/// figures do not show them yet.
#[tokio::test]
async fn a_batch_announced_restarts_the_idle_window() {
    let mut h = Harness::start(
        "tick-batch",
        ONE_JOB_TYPE,
        Recorder::with_running("default", &["w0"]),
    )
    .await;
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    h.report("w0", 0).await;
    h.scaler.tick(at(0)).await;
    h.scaler.tick(at(1)).await;
    h.announce_batch().await;
    h.scaler.tick(at(30)).await;
    h.scaler.tick(at(31)).await;
    assert_eq!(
        h.decisions("drain"),
        0,
        "a batch was announced within the window"
    );
    h.scaler.tick(at(60)).await;
    h.scaler.tick(at(61)).await;
    assert_eq!(
        h.decisions("drain"),
        1,
        "30 s after the announcement was seen"
    );
}

/// A drain request the broker refuses (here: no write permission on the control
/// exchange, which closes the channel with ACCESS_REFUSED) is logged and counted as a
/// failure and tried again, never counted or shown as a drain.
#[tokio::test]
async fn a_refused_drain_request_is_counted_as_a_failure_not_as_a_drain() {
    let vhost = TestVhost::new("tick-refused").await;
    vhost
        .api
        .set_permissions(".*", "^(?!spillway\\.control$).*", ".*")
        .await
        .unwrap();
    let mut h = Harness::on(
        vhost,
        ONE_JOB_TYPE,
        Recorder::with_running("default", &["w0"]),
        |vhost| vhost.api.clone(),
    )
    .await;
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    h.report("w0", 0).await;
    h.scaler.tick(at(0)).await;
    h.scaler.tick(at(1)).await;
    h.scaler.tick(at(31)).await;
    let metrics = Arc::clone(&h.scaler.ctx.metrics);
    let failures = &metrics.drain_failures;
    assert_eq!(count(failures, "default"), 1, "the refusal is counted");
    assert_eq!(h.decisions("drain"), 0, "and not counted as a drain");
    assert!(
        h.scaler
            .ctx
            .board
            .events()
            .iter()
            .all(|e| e.action != "drain"),
        "nor shown as one: {:?}",
        h.scaler.ctx.board.events()
    );
    h.scaler.tick(at(32)).await;
    assert_eq!(
        count(failures, "default"),
        2,
        "tried again on a fresh channel, refused again"
    );
    assert!(
        h.scaler.ctx.drains.connected(),
        "the report consumer is unaffected"
    );
}

/// A stand-in for the management API: it passes every request on to the real one,
/// except that requests whose path ends with one of `held` wait until the test ends.
struct HoldingProxy {
    /// `RABBITMQ_API_URL` through the proxy, with the real one's credentials.
    url: String,
    /// Requests held so far.
    held: Arc<AtomicUsize>,
    _stop: tokio_util::sync::DropGuard,
}

impl HoldingProxy {
    async fn start(upstream: &str, held: &'static [&'static str]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut url = reqwest::Url::parse(upstream).unwrap();
        url.set_port(Some(listener.local_addr().unwrap().port()))
            .unwrap();
        let mut bare = reqwest::Url::parse(upstream).unwrap();
        bare.set_username("").unwrap();
        bare.set_password(None).unwrap();
        let stop = CancellationToken::new();
        let count = Arc::new(AtomicUsize::new(0));
        let (until, counted, http) = (stop.clone(), Arc::clone(&count), reqwest::Client::new());
        let proxy = move |request: Request| {
            let (until, counted, http) = (until.clone(), Arc::clone(&counted), http.clone());
            let upstream = bare.as_str().trim_end_matches('/').to_string();
            async move {
                let path = request.uri().path().to_string();
                if held.iter().any(|h| path.ends_with(h)) {
                    counted.fetch_add(1, Ordering::SeqCst);
                    until.cancelled().await;
                }
                let target = format!(
                    "{upstream}{}",
                    request.uri().path_and_query().map_or("/", |p| p.as_str())
                );
                let mut forward = http.request(request.method().clone(), target);
                for (name, value) in request.headers() {
                    if name != header::HOST {
                        forward = forward.header(name, value);
                    }
                }
                let body = axum::body::to_bytes(request.into_body(), usize::MAX)
                    .await
                    .unwrap();
                let answer = forward.body(body).send().await.unwrap();
                let status = answer.status();
                let headers = answer.headers().clone();
                (status, headers, answer.bytes().await.unwrap()).into_response()
            }
        };
        let server = axum::serve(listener, Router::new().fallback(proxy))
            .with_graceful_shutdown(stop.clone().cancelled_owned());
        tokio::spawn(server.into_future());
        HoldingProxy {
            url: url.to_string(),
            held: count,
            _stop: stop.drop_guard(),
        }
    }
}

/// Issue 15: with the management API holding the reads of one queue, ticks took ~20 s
/// (that queue's read and its dead queue's, 10 s each, one after the other) and an
/// unrelated job type with rows ready waited as long for its first worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_whose_reads_are_held_delays_only_its_own_job_type() {
    const READ_TIMEOUT: Duration = Duration::from_secs(1);
    let vhost = TestVhost::new("tick-held").await;
    let proxy = HoldingProxy::start(&vhost.api_url, &["/held-queue", "/held-queue.dead"]).await;
    let through_proxy = RabbitApi::for_vhost(&proxy.url, &vhost.name)
        .unwrap()
        .with_read_timeout(READ_TIMEOUT);
    let jobs = r#"
[job_types.default]
queue = "tasks"
[job_types.held]
queue = "held-queue"
"#;
    let mut h = Harness::on(vhost, jobs, Recorder::default(), move |_| through_proxy).await;
    h.put_row("tasks").await;
    wait_for("the management API to count the row", PATIENCE, || async {
        h.vhost
            .api
            .queue_stats("tasks")
            .await
            .is_ok_and(|q| q.ready == 1)
    })
    .await;

    let started = Instant::now();
    tokio::time::timeout(
        READ_TIMEOUT + Duration::from_secs(4),
        h.scaler.tick(started),
    )
    .await
    .expect("the tick ends about one read timeout after it starts, held reads or not");
    let took = started.elapsed();

    let spawns = h.scaler.ctx.launcher.spawns();
    assert_eq!(spawns.len(), 1, "one worker for the row: {spawns:?}");
    let (job_type, at) = &spawns[0];
    assert_eq!(job_type, "default");
    assert!(
        at.duration_since(started) < READ_TIMEOUT,
        "default's worker was spawned {:?} into the tick: it waited for the held reads",
        at.duration_since(started)
    );
    assert_eq!(
        proxy.held.load(Ordering::SeqCst),
        2,
        "the held queue and its dead queue were both asked for"
    );
    assert!(
        took < READ_TIMEOUT * 2,
        "the tick took {took:?}: the held queue's two reads ran one after the other"
    );
    assert_eq!(count(&h.scaler.ctx.metrics.observe_failures, "held"), 1);
    assert_eq!(count(&h.scaler.ctx.metrics.observe_failures, "default"), 0);
    let stats = h.scaler.ctx.board.stats();
    let row = |name: &str| {
        stats
            .job_types
            .iter()
            .find(|j| j.job_type == name)
            .cloned()
            .unwrap()
    };
    assert_eq!((row("default").ready, row("held").ready), (Some(1), None));

    let error = h
        .scaler
        .ctx
        .queues
        .queue_stats("held-queue")
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("(timeout)") && !error.to_string().contains("unreachable"),
        "{error}"
    );
}
