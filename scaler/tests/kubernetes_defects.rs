//! Issue 16's runtime defects of the Kubernetes launcher, each on the kube-api double
//! (`spillway-testkit`, over TLS) through the real `scaler` binary with
//! `LAUNCHER=kubernetes`, a real producer, RabbitMQ, and real `worker` processes run as
//! the Jobs' pods. Each test fails on the code before its fix:
//!
//! 1. a worker that can never start (its image cannot be pulled, or no pod is ever
//!    created) is stopped once with the reason, and spawning backs off;
//! 2. a job type without `image` runs `WORKER_IMAGE` with `imagePullPolicy:
//!    IfNotPresent`, so it starts where no registry can be reached;
//! 3. an `exec` command can write a temporary file (in the double, as in a cluster, a
//!    read-only root file system without a volume at `/tmp` has no writable `/tmp`);
//! 4. a Job being deleted is shown stopping and never deleted again;
//! 5. workers of no configured job type are listed and drained;
//! 9. pod logs are read with a byte limit; a worker Job the API server refuses stops the
//!    scaler at start; the Role grants exactly the calls the scaler makes.

#[path = "support/kube.rs"]
mod cluster;
mod support;

use std::{cell::RefCell, collections::BTreeSet};

use cluster::{
    Cluster, NAMESPACE, PATIENCE, assert_calls_allowed_by_the_role,
    assert_role_grants_exactly_the_calls_made, deletes_of, every_job, job_table, job_template,
    jobs_created, jobs_path, name_of, names, scaling_events, wait_for_event, wait_until,
    worker_binary,
};
use k8s_openapi::{api::batch::v1::Job, apimachinery::pkg::apis::meta::v1::Time};
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use reqwest::StatusCode;
use spillway_scaler::launcher::kube::{JOB_TYPE_LABEL, worker_job};
use spillway_testkit::kube_api::{Fault, KubeApiConfig};
use support::{numbered_csv, upload};

/// One quick job type. Few rows stay below `threshold` (20), so only rule 1 ("rows
/// ready and no worker taking rows") spawns for them: a stuck worker that still counted
/// as taking rows would hold them forever.
const QUICK: &str = r#"
tick_seconds = 1
idle_seconds = 30

[job_types.default]
queue = "tasks"
handler = "simulate"
simulate_ms = 50
"#;
const FEW_ROWS: u64 = 5;

/// The reason of a scaling event.
fn reason(event: &serde_json::Value) -> &str {
    event["reason"].as_str().unwrap_or_default()
}

/// The one worker a scaling event names.
fn worker(event: &serde_json::Value) -> String {
    event["workers"][0].as_str().unwrap_or_default().to_string()
}

/// Seconds from `earlier` to `later`.
fn seconds_between(earlier: &Time, later: &Time) -> f64 {
    later.0.duration_since(earlier.0).as_secs_f64()
}

fn removed(cluster: &Cluster, name: &str) -> Job {
    cluster
        .api
        .removed_jobs()
        .into_iter()
        .find(|j| name_of(j) == name)
        .unwrap_or_else(|| panic!("Job {name} was not removed"))
}

async fn wait_until_removed(cluster: &Cluster, name: &str) {
    wait_until(
        &format!("Job {name} to be deleted"),
        PATIENCE,
        || async { cluster.api.job(name).is_none() },
        || cluster.state(),
    )
    .await;
}

/// Defect 1 (and 9's least privilege): the stuck worker is stopped once, with the
/// pod's reason, and spawning pauses 10 s before a worker that can start takes the
/// rows. The run makes every kind of call the scaler has (a dry-run create at start,
/// list and watch of Jobs, create, pods list for the waiting reason, delete, a log
/// read), so it is also where the Role is checked to grant exactly those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_image_cannot_be_pulled_is_stopped_once_and_spawning_backs_off() {
    let cluster = Cluster::start("k8s-pull", QUICK, Cluster::double()).await;
    cluster.api.set_fault(Fault::ImagePullBackOff);
    let scaler = cluster.start_scaler(&[]).await;
    upload(&cluster.producer, numbered_csv(FEW_ROWS as usize)).await;

    let stop = wait_for_event(
        &cluster,
        &scaler,
        "a stop event saying ImagePullBackOff",
        |e| e["action"] == "stop" && reason(e).contains("ImagePullBackOff"),
    )
    .await;
    cluster.api.set_fault(Fault::None);
    let stuck = worker(&stop);
    assert!(
        reason(&stop).contains("cannot start") && reason(&stop).contains("pauses 10s"),
        "the pod's reason, and the pause: {stop}"
    );
    wait_until_removed(&cluster, &stuck).await;
    cluster.wait_until_settled("tasks", FEW_ROWS).await;

    assert_eq!(
        deletes_of(&cluster.api, &stuck),
        1,
        "stopped once, not every tick:\n{}",
        cluster.scaler_log()
    );
    let jobs = every_job(&cluster.api);
    assert_eq!(
        jobs_created(&cluster.api),
        2,
        "one Job that could not start, one after the pause: {:?}",
        jobs.iter().map(name_of).collect::<Vec<_>>()
    );
    let next = jobs
        .iter()
        .find(|j| name_of(j) != stuck)
        .expect("the Job spawned after the pause");
    let deleted_at = removed(&cluster, &stuck)
        .metadata
        .deletion_timestamp
        .unwrap();
    let paused = seconds_between(
        &deleted_at,
        next.metadata.creation_timestamp.as_ref().unwrap(),
    );
    // The pause is 10 s from the tick that stopped it; timestamps are read to the
    // second by the scaler, hence the slack.
    assert!(
        paused >= 9.0,
        "no Job within the 10 s pause: the next came {paused:.1} s after the stop"
    );

    let log = reqwest::get(format!("{}/api/jobs/{}/logs", scaler.url, name_of(next)))
        .await
        .unwrap();
    assert_eq!(log.status(), StatusCode::OK);
    assert!(log.text().await.unwrap().contains("worker starting"));
    assert_role_grants_exactly_the_calls_made(&cluster.api);
}

/// Defect 1, a pod never created (a quota refuses it): no waiting reason is permanent,
/// so the start timeout decides, after `WORKER_START_TIMEOUT_SECONDS` (10, its least).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_pod_is_never_created_is_stopped_after_the_start_timeout() {
    let cluster = Cluster::start("k8s-nopod", QUICK, Cluster::double()).await;
    cluster.api.set_fault(Fault::DenyPodCreation(
        "exceeded quota: compute, requested: cpu=100m, used: cpu=2, limited: cpu=2".into(),
    ));
    let scaler = cluster
        .start_scaler(&[("WORKER_START_TIMEOUT_SECONDS", "10")])
        .await;
    upload(&cluster.producer, numbered_csv(FEW_ROWS as usize)).await;

    let stop = wait_for_event(
        &cluster,
        &scaler,
        "a stop event saying no pod was created",
        |e| e["action"] == "stop" && reason(e).contains("no pod created"),
    )
    .await;
    let name = worker(&stop);
    assert!(
        reason(&stop).contains("start timeout 10s"),
        "the start timeout decided: {stop}"
    );
    wait_until_removed(&cluster, &name).await;
    let job = removed(&cluster, &name);
    let pending = seconds_between(
        job.metadata.creation_timestamp.as_ref().unwrap(),
        job.metadata.deletion_timestamp.as_ref().unwrap(),
    );
    assert!(
        (9.0..=15.0).contains(&pending),
        "stopped about 10 s after its creation, not {pending:.1} s"
    );
    assert_eq!(deletes_of(&cluster.api, &name), 1, "stopped once");
    assert!(
        cluster
            .api
            .events()
            .iter()
            .any(|e| e.reason.as_deref() == Some("FailedCreate")),
        "the cluster did refuse its pod"
    );
    assert_calls_allowed_by_the_role(&cluster.api);
}

/// Defect 2: the double's node has only the image the deployment built, and no
/// registry; before the fix the Job asked for `spillway-worker:latest` with no pull
/// policy (so `Always`), and its pod never started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_type_without_an_image_runs_worker_image_without_pulling_it() {
    const BUILT: &str = "spillway-worker:built-in-cluster";
    let node = KubeApiConfig::new(NAMESPACE).image(BUILT, worker_binary());
    let cluster = Cluster::start("k8s-image", QUICK, node).await;
    cluster.api.set_fault(Fault::NoRegistry);
    let _scaler = cluster.start_scaler(&[("WORKER_IMAGE", BUILT)]).await;
    upload(&cluster.producer, numbered_csv(FEW_ROWS as usize)).await;
    cluster.wait_until_settled("tasks", FEW_ROWS).await;

    let containers: Vec<(Option<String>, Option<String>)> = every_job(&cluster.api)
        .iter()
        .flat_map(|j| j.spec.clone()?.template.spec?.containers.into_iter().next())
        .map(|c| (c.image, c.image_pull_policy))
        .collect();
    assert!(!containers.is_empty());
    for (image, policy) in containers {
        assert_eq!(image.as_deref(), Some(BUILT), "WORKER_IMAGE");
        assert_eq!(policy.as_deref(), Some("IfNotPresent"), "never pulled");
    }
    assert_eq!(cluster.queue("tasks.dead").await.ready, 0);
    assert_calls_allowed_by_the_role(&cluster.api);
}

/// Defect 3: the worker's root file system is read-only, so only a volume at `/tmp`
/// makes `mktemp` work; a row whose command fails is dead-lettered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_command_can_write_a_temporary_file() {
    const MKTEMP: &str = r#"
tick_seconds = 1
idle_seconds = 30

[job_types.default]
queue = "tasks"
handler = "exec"
command = ["sh", "-c", 'f=$(mktemp) && echo ok > "$f" && rm "$f"']
delivery_limit = 1
"#;
    let cluster = Cluster::start("k8s-tmp", MKTEMP, Cluster::double()).await;
    let _scaler = cluster.start_scaler(&[]).await;
    upload(&cluster.producer, numbered_csv(FEW_ROWS as usize)).await;
    cluster.wait_until_settled("tasks", FEW_ROWS).await;
    let dead = cluster.queue("tasks.dead").await;
    assert_eq!(
        dead.ready,
        0,
        "rows dead-lettered: the command could not write /tmp\n{}",
        cluster.pods()
    );
    assert_calls_allowed_by_the_role(&cluster.api);
}

/// Defect 4: someone deletes a worker's Job in the foreground while its row runs; the
/// pod drains (SIGTERM: the row is finished first), so the Job stays, marked, for the
/// rest of the row. Before the fix it read as pending, the worker's own "draining"
/// report counted as a drain request, and after the grace the scaler deleted it again
/// every tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_being_deleted_is_shown_stopping_and_never_deleted_again() {
    // Long enough, while the Job is being deleted, for the worker's "draining" report
    // (sent as SIGTERM arrives), the 1 s drain grace and a few ticks.
    const SLOW_ROW: &str = r#"
tick_seconds = 1
idle_seconds = 30

[job_types.default]
queue = "tasks"
handler = "exec"
command = ["sh", "-c", "echo row-started >&2; sleep 5"]
max_jobs = 1
"#;
    let cluster = Cluster::start("k8s-stopping", SLOW_ROW, Cluster::double()).await;
    let scaler = cluster
        .start_scaler(&[
            ("DRAIN_GRACE_SECONDS", "1"),
            ("WORKER_STOP_GRACE_SECONDS", "30"),
        ])
        .await;
    upload(&cluster.producer, numbered_csv(1)).await;
    let name = cluster.wait_for_pod_log("row-started").await;
    Api::<Job>::namespaced(cluster.api.client().await, NAMESPACE)
        .delete(&name, &DeleteParams::foreground())
        .await
        .unwrap();

    let shown = RefCell::new(BTreeSet::new());
    wait_until(
        &format!("Job {name} to finish its row and go"),
        PATIENCE,
        || async {
            let table = job_table(&scaler).await;
            if let Some(job) = table.iter().find(|j| j["name"] == name.as_str()) {
                let status = job["status"].as_str().unwrap_or_default().to_string();
                shown.borrow_mut().insert(status);
            }
            cluster.api.job(&name).is_none()
        },
        || cluster.state(),
    )
    .await;
    let stops: Vec<String> = scaling_events(&scaler)
        .await
        .iter()
        .filter(|e| names(e, "stop", &name))
        .map(|e| reason(e).to_string())
        .collect();
    assert!(stops.is_empty(), "stopped while being deleted: {stops:?}");
    assert_eq!(
        deletes_of(&cluster.api, &name),
        1,
        "the one DELETE is the test's own"
    );
    assert!(
        shown.borrow().contains("stopping"),
        "shown as stopping while deleted: {:?}",
        shown.borrow()
    );
    cluster.wait_until_settled("tasks", 1).await;
    assert_eq!(
        cluster.queue("tasks.dead").await.ready,
        0,
        "its row finished"
    );
}

/// Defect 5: Jobs left by an earlier configuration, one of a job type the scaler's
/// file no longer has (its workers still read it from the ConfigMap), one without the
/// job-type label. They run and listen for drain requests before the scaler starts;
/// the scaler lists them, drains them, and they end Complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_of_no_configured_job_type_are_listed_and_drained() {
    let cluster = Cluster::start("k8s-orphans", QUICK, Cluster::double()).await;
    cluster.workers_read(&format!(
        "{QUICK}\n[job_types.retired]\nqueue = \"retired\"\nhandler = \"simulate\"\n"
    ));
    let (template, env) = job_template(&[("retired", "spillway-worker:dev")]);
    let retired = worker_job(
        &template,
        &env.spec("retired", "spillway-retired-left-over"),
    )
    .unwrap();
    let mut unlabelled =
        worker_job(&template, &env.spec("retired", "spillway-unlabelled")).unwrap();
    unlabelled
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .remove(JOB_TYPE_LABEL);
    if let Some(spec) = unlabelled.spec.as_mut()
        && let Some(metadata) = spec.template.metadata.as_mut()
    {
        metadata.labels.as_mut().unwrap().remove(JOB_TYPE_LABEL);
    }
    let jobs = Api::<Job>::namespaced(cluster.api.client().await, NAMESPACE);
    for job in [&retired, &unlabelled] {
        jobs.create(&PostParams::default(), job).await.unwrap();
    }
    // A worker's first progress report goes out once its drain listener is bound.
    let listening = |job: &Job| {
        cluster.api.pods_of(&name_of(job)).iter().any(|p| {
            let pod = p.metadata.name.clone().unwrap_or_default();
            cluster.api.pod_log(&pod).contains("\"progress\"")
        })
    };
    wait_until(
        "both left-over workers to listen for drain requests",
        PATIENCE,
        || async { listening(&retired) && listening(&unlabelled) },
        || cluster.state(),
    )
    .await;

    let scaler = cluster.start_scaler(&[]).await;
    let expected = BTreeSet::from([
        (name_of(&retired), "retired".to_string()),
        (name_of(&unlabelled), String::new()),
    ]);
    wait_until(
        "both left-overs in the scaler's job table",
        PATIENCE,
        || async {
            let table: BTreeSet<(String, String)> = job_table(&scaler)
                .await
                .iter()
                .map(|j| {
                    let text = |key: &str| j[key].as_str().unwrap_or_default().to_string();
                    (text("name"), text("job_type"))
                })
                .collect();
            table.is_superset(&expected)
        },
        || cluster.state(),
    )
    .await;
    for (name, why) in [
        (name_of(&retired), "job type \"retired\" is not configured"),
        (name_of(&unlabelled), "without a job type"),
    ] {
        let drained = wait_for_event(&cluster, &scaler, &format!("{name} drained"), |e| {
            names(e, "drain", &name)
        })
        .await;
        assert!(reason(&drained).contains(why), "{drained}");
        wait_until(
            &format!("Job {name} to end Complete"),
            PATIENCE,
            || async {
                every_job(&cluster.api)
                    .iter()
                    .any(|j| name_of(j) == name && cluster::condition(j, "Complete"))
            },
            || cluster.state(),
        )
        .await;
        assert_eq!(
            deletes_of(&cluster.api, &name),
            0,
            "drained, not stopped: {name}"
        );
    }
}

/// Defect 9: a log read through the scaler asks the API server for at most so many
/// bytes (a worker's log can be any size; the scaler's memory cannot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_logs_are_read_from_the_api_with_a_byte_limit() {
    let cluster = Cluster::start("k8s-logs", QUICK, Cluster::double()).await;
    let scaler = cluster.start_scaler(&[]).await;
    upload(&cluster.producer, numbered_csv(FEW_ROWS as usize)).await;
    let name = cluster.wait_for_pod_log("worker starting").await;
    let response = reqwest::get(format!("{}/api/jobs/{name}/logs", scaler.url))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.text().await.unwrap().contains("worker starting"));

    let reads: Vec<String> = cluster
        .api
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.ends_with("/log"))
        .map(|r| r.query)
        .collect();
    assert!(!reads.is_empty(), "the log was read from the API server");
    for query in reads {
        let limit: Option<u64> = query
            .split('&')
            .find_map(|p| p.strip_prefix("limitBytes="))
            .and_then(|v| v.parse().ok());
        // Any bound the scaler (256 Mi) can hold a few of at once.
        assert!(
            limit.is_some_and(|l| l > 0 && l <= 16 << 20),
            "a pod log read without a byte limit: ?{query}"
        );
    }
    assert_calls_allowed_by_the_role(&cluster.api);
}

/// A worker's log followed through the scaler (`?follow=1`, Server-Sent Events) is the
/// pod's log stream (`follow=true`), line by line, and it ends when the pod does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_log_is_followed_from_the_pod_log_stream_until_its_pod_ends() {
    let cluster = Cluster::start("k8s-follow", QUICK, Cluster::double()).await;
    let scaler = cluster.start_scaler(&[]).await;
    upload(&cluster.producer, numbered_csv(FEW_ROWS as usize)).await;
    let name = cluster.wait_for_pod_log("worker starting").await;
    let mut response = reqwest::get(format!("{}/api/jobs/{name}/logs?follow=1", scaler.url))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = String::new();
    tokio::time::timeout(PATIENCE, async {
        while !body.contains("data: ") || !body.contains("worker starting") {
            let chunk = response.chunk().await.unwrap().expect("the stream goes on");
            body.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the log's lines as events: {body}"));

    // Its Job deleted, the pod drains and ends; so does the stream.
    Api::<Job>::namespaced(cluster.api.client().await, NAMESPACE)
        .delete(&name, &DeleteParams::foreground())
        .await
        .unwrap();
    tokio::time::timeout(PATIENCE, async {
        while let Some(chunk) = response.chunk().await.unwrap() {
            body.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the stream ends once the pod has: {body}"));
    assert!(body.contains("event: end"), "{body}");
    let follows: Vec<String> = cluster
        .api
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.ends_with("/log"))
        .map(|r| r.query)
        .filter(|q| q.contains("follow=true"))
        .collect();
    assert!(
        follows.iter().any(|q| q.contains("container=worker")),
        "the pod's log followed: {follows:?}"
    );
    assert_calls_allowed_by_the_role(&cluster.api);
}

/// Defect 9: a resource quantity the API server refuses is found by a dry-run create
/// at start, which names the job type and says what the API server said, and nothing
/// is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_job_the_api_server_refuses_stops_the_scaler_at_start() {
    let cluster = Cluster::start("k8s-dryrun", QUICK, Cluster::double()).await;
    let (status, stderr) = cluster
        .run_scaler_to_exit(&[("WORKER_MEMORY_LIMIT", "lots")])
        .await;
    assert!(!status.success(), "the scaler refused to start: {stderr}");
    assert!(
        stderr.contains("job type \"default\"") && stderr.contains("quantities must match"),
        "names the job type and the API server's message: {stderr}"
    );
    assert!(
        cluster
            .api
            .requests()
            .iter()
            .any(|r| r.method == "POST" && r.path == jobs_path() && r.query.contains("dryRun=All")),
        "asked the API server with a dry run"
    );
    assert!(every_job(&cluster.api).is_empty(), "no Job created");
}
