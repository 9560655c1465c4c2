//! The Kubernetes branch of start-up, as the scaler runs it: the launcher built from
//! the settings ([`KubeLauncher::from_settings`], so `Settings::job_template` and
//! `WorkerEnv::from_settings`), its dry run at start, then a [`Scaler`] ticking on it,
//! all against the mocked API server.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use spillway_common::jobs_config::JobsConfig;
use spillway_testkit::wait_for;

use super::api_server::{answer, api_server, next};
use crate::{
    board::Board,
    config::Settings,
    context::{Context, Timing},
    launcher::{Launcher, kube::KubeLauncher},
    metrics::Metrics,
    reports::Reports,
    tick::{
        Scaler,
        tests::{FakeDrains, FakeQueues},
    },
};

/// Settings with every value the Job reads given as a flag (flags win over the
/// environment the tests run in); the namespace is the client's.
fn settings() -> Settings {
    Settings::try_parse_from([
        "scaler",
        "--launcher=kubernetes",
        "--worker-image=registry.example/worker:7",
        "--worker-secret=rabbit-creds",
        "--worker-secret-key=url",
        "--worker-database-secret=ledger-creds",
        "--worker-database-secret-key=dsn",
        "--worker-configmap=job-types",
        "--worker-configmap-key=types.toml",
        "--worker-ttl-seconds=60",
        "--worker-memory-limit=512Mi",
    ])
    .unwrap()
}

/// The parts of a worker Job that come from the settings.
fn from_settings(job: &Value) -> Value {
    let pod = &job["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let env: Vec<&Value> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|var| var["name"] != "WORKER_NAME")
        .collect();
    json!({
        "image": container["image"],
        "ttl": job["spec"]["ttlSecondsAfterFinished"],
        "memory_limit": container["resources"]["limits"]["memory"],
        "env": env,
        "volumes": pod["volumes"],
    })
}

#[tokio::test]
async fn a_scaler_started_from_its_settings_dry_runs_then_spawns_their_jobs() {
    let settings = settings();
    let jobs = JobsConfig::default();
    let (client, mut requests) = api_server(json!([]));

    let server = tokio::spawn(async move {
        let (method, path, query, body, respond) = next(&mut requests).await;
        answer(respond, StatusCode::CREATED, &body);
        (requests, method, path, query, body)
    });
    let (launcher, watch) = KubeLauncher::from_settings(&settings, &jobs, client)
        .await
        .unwrap();
    let (mut requests, method, path, query, dry_run) = server.await.unwrap();
    assert_eq!(
        (method, path.as_str()),
        (Method::POST, "/apis/batch/v1/namespaces/spillway/jobs"),
        "in the client's namespace"
    );
    assert!(query.contains("dryRun=All"), "nothing is created: {query}");
    assert_eq!(
        from_settings(&dry_run),
        json!({
            "image": "registry.example/worker:7",
            "ttl": 60,
            "memory_limit": "512Mi",
            "env": [
                {"name": "JOB_TYPE", "value": "default"},
                {"name": "JOBS_CONFIG", "value": "/etc/spillway/jobs.toml"},
                {"name": "LOG_FORMAT", "value": "json"},
                {"name": "AMQP_URL", "valueFrom": {"secretKeyRef":
                    {"name": "rabbit-creds", "key": "url", "optional": false}}},
                {"name": "DATABASE_URL", "valueFrom": {"secretKeyRef":
                    {"name": "ledger-creds", "key": "dsn", "optional": false}}},
            ],
            "volumes": [
                {"name": "jobs-config", "configMap": {"name": "job-types",
                    "items": [{"key": "types.toml", "path": "jobs.toml"}]}},
                {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
            ],
        })
    );

    // The watch lists (nothing yet), then watches: that request is left waiting.
    tokio::spawn(watch);
    let (_, _, query, _, respond) = next(&mut requests).await;
    assert!(!query.contains("watch=true"), "a list first: {query}");
    answer(
        respond,
        StatusCode::OK,
        &json!({"apiVersion": "batch/v1", "kind": "JobList",
                "metadata": {"resourceVersion": "1"}, "items": []}),
    );
    let launcher = Arc::new(launcher);
    wait_for("the cache to sync", Duration::from_secs(5), || async {
        launcher.workers().await.is_ok()
    })
    .await;

    let queues = Arc::new(FakeQueues::default());
    queues.set("tasks", 5, 0);
    let reports = Arc::new(Reports::default());
    let mut scaler = Scaler::new(
        jobs,
        Context {
            launcher: Arc::clone(&launcher),
            queues,
            drains: Arc::new(FakeDrains::default()),
            reports: Arc::clone(&reports),
            metrics: Arc::new(Metrics::new()),
            board: Arc::new(Board::new(reports)),
            timing: Timing {
                drain_grace: Duration::from_secs(60),
                report_stale_after: Duration::from_secs(15),
                start_timeout: Duration::from_secs(180),
            },
        },
    );
    let server = tokio::spawn(async move {
        loop {
            let (method, path, query, body, respond) = next(&mut requests).await;
            if query.contains("watch=true") {
                std::mem::forget(respond);
                continue;
            }
            answer(respond, StatusCode::CREATED, &body);
            return (method, path, query, body);
        }
    });
    scaler.tick(Instant::now()).await;
    let (method, path, query, created) = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the tick creates a Job within 5 s")
        .unwrap();
    assert_eq!(
        (method, path.as_str()),
        (Method::POST, "/apis/batch/v1/namespaces/spillway/jobs")
    );
    assert!(!query.contains("dryRun"), "a real create: {query}");
    assert_eq!(
        from_settings(&created),
        from_settings(&dry_run),
        "the Job spawned is the one checked at start"
    );
    let name = created["metadata"]["name"].as_str().unwrap();
    assert!(name.starts_with("spillway-default-"), "{name}");
    let events = scaler.ctx.board.events();
    assert_eq!(
        (events[0].action, events[0].reason.as_str()),
        ("spawn", "5 ready and no worker taking rows")
    );
}
