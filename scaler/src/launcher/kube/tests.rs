//! The launcher against a mocked API server ([`api_server`]): each request it sends is
//! checked (method, path, selector, body) and answered as Kubernetes would; the tests
//! script only the requests they are about.
//!
//! # Layout
//!
//! - [`api_server`]: the mocked API server and its answers.
//! - [`scaler`]: start-up from the settings, and a scaler ticking on this launcher.

mod api_server;
mod scaler;

use std::{collections::BTreeMap, time::Duration};

use http::{Method, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use spillway_testkit::wait_for;

use self::api_server::{NAMESPACE, SELECTOR, answer, job, launcher, launcher_with_pods, next};
use super::{manifest::tests::template, *};
use crate::launcher::spec::WorkerEnv;

#[tokio::test]
async fn spawning_posts_the_worker_job_of_the_manifest() {
    let (launcher, _watch, mut handle) = launcher();
    let server = tokio::spawn(async move {
        let (method, path, query, body, respond) = next(&mut handle).await;
        answer(respond, StatusCode::CREATED, &body);
        (method, path, query, body)
    });
    launcher
        .spawn("default", "spillway-default-1")
        .await
        .unwrap();
    let (method, path, query, body) = server.await.unwrap();
    assert_eq!(method, Method::POST);
    assert_eq!(path, "/apis/batch/v1/namespaces/spillway/jobs");
    assert!(!query.contains("dryRun"), "a real create: {query}");
    let expected = worker_job(
        &template(),
        &WorkerEnv::example().spec("default", "spillway-default-1"),
    )
    .unwrap();
    assert_eq!(body, serde_json::to_value(expected).unwrap());
}

#[tokio::test]
async fn the_start_check_dry_runs_one_job_per_job_type_and_names_a_refused_one() {
    let (launcher, _watch, mut handle) = launcher();
    let server = tokio::spawn(async move {
        let (method, path, query, body, respond) = next(&mut handle).await;
        answer(
            respond,
            StatusCode::UNPROCESSABLE_ENTITY,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid", "code": 422,
                    "message": "Job.batch \"x\" is invalid: spec.template.spec.containers[0].resources.limits[memory]: Invalid value: \"lots\""}),
        );
        (method, path, query, body)
    });
    let error = launcher.check_job_types().await.unwrap_err().to_string();
    let (method, path, query, body) = server.await.unwrap();
    assert_eq!(
        (method, path.as_str()),
        (Method::POST, "/apis/batch/v1/namespaces/spillway/jobs")
    );
    assert!(query.contains("dryRun=All"), "nothing is created: {query}");
    assert_eq!(
        body["metadata"]["labels"]["spillway.dev/job-type"],
        "default"
    );
    assert!(
        error.contains("job type \"default\"") && error.contains("Invalid value: \"lots\""),
        "{error}"
    );
}

#[tokio::test]
async fn an_unknown_job_type_is_refused_before_any_request() {
    let (launcher, _watch, _handle) = launcher();
    let error = launcher
        .spawn("resize", "spillway-resize-1")
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("no image for job type \"resize\""),
        "{error}"
    );
}

#[tokio::test]
async fn logs_come_from_the_pod_of_a_known_worker_only() {
    let (launcher, watch, mut handle) = launcher();
    tokio::spawn(watch);
    let (_, _, _, _, respond) = next(&mut handle).await;
    answer(
        respond,
        StatusCode::OK,
        &json!({"apiVersion": "batch/v1", "kind": "JobList", "metadata": {"resourceVersion": "1"},
                "items": [job("busy", json!({"active": 1, "ready": 1}))]}),
    );
    wait_for("the cache to sync", Duration::from_secs(5), || async {
        launcher.workers().await.is_ok()
    })
    .await;
    assert!(matches!(
        launcher.logs("kube-system-pod", None).await,
        Err(LauncherError::NoSuchWorker(_))
    ));

    let server = tokio::spawn(async move {
        loop {
            let (method, path, query, _, respond) = next(&mut handle).await;
            if query.contains("watch=true") {
                // The cache's watch: leave it waiting.
                std::mem::forget(respond);
                continue;
            }
            assert_eq!(
                (method, path.as_str()),
                (Method::GET, "/api/v1/namespaces/spillway/pods")
            );
            assert!(
                query.contains("labelSelector=spillway.dev%2Fworker%3Dbusy"),
                "{query}"
            );
            answer(
                respond,
                StatusCode::OK,
                &json!({"apiVersion": "v1", "kind": "PodList", "metadata": {},
                "items": [{"metadata": {"name": "busy-x7k2p", "namespace": NAMESPACE}}]}),
            );
            let (method, path, query, _, respond) = next(&mut handle).await;
            assert_eq!(
                (method, path.as_str()),
                (
                    Method::GET,
                    "/api/v1/namespaces/spillway/pods/busy-x7k2p/log"
                )
            );
            assert!(
                query.contains("container=worker") && query.contains("tailLines=50"),
                "{query}"
            );
            respond.send_response(
                Response::builder()
                    .body(Body::from(b"row 7 done\n".to_vec()))
                    .unwrap(),
            );
            return;
        }
    });
    assert_eq!(
        launcher.logs("busy", Some(50)).await.unwrap(),
        "row 7 done\n"
    );
    server.await.unwrap();
}

#[tokio::test]
async fn stopping_deletes_the_job_after_its_pod_has_drained() {
    let (launcher, _watch, mut handle) = launcher();
    let server = tokio::spawn(async move {
        let (method, path, _, body, respond) = next(&mut handle).await;
        answer(
            respond,
            StatusCode::OK,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
        );
        (method, path, body)
    });
    launcher.stop("spillway-default-1").await.unwrap();
    let (method, path, body) = server.await.unwrap();
    assert_eq!(method, Method::DELETE);
    assert_eq!(
        path,
        "/apis/batch/v1/namespaces/spillway/jobs/spillway-default-1"
    );
    assert_eq!(
        body["propagationPolicy"], "Foreground",
        "the Job, and so the worker's place under max_jobs, stays until its pod is gone"
    );
}

#[tokio::test]
async fn workers_come_from_a_watched_cache_with_phases_from_job_status() {
    let (launcher, watch, mut handle) = launcher();
    tokio::spawn(watch);
    assert!(
        launcher.workers().await.is_err(),
        "no answer before the cache has synced"
    );

    let (method, path, query, _, respond) = next(&mut handle).await;
    assert_eq!(
        (method, path.as_str()),
        (Method::GET, "/apis/batch/v1/namespaces/spillway/jobs")
    );
    assert!(
        query.contains(SELECTOR),
        "only Spillway's own Jobs: {query}"
    );
    assert!(!query.contains("watch=true"), "a list first: {query}");
    answer(
        respond,
        StatusCode::OK,
        &json!({
            "apiVersion": "batch/v1", "kind": "JobList",
            "metadata": {"resourceVersion": "10"},
            "items": [
                job("unscheduled", json!({"active": 1, "ready": 0})),
                job("busy", json!({"active": 1, "ready": 1})),
                job("drained", json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})),
                job("crashed", json!({"failed": 1, "conditions": [{"type": "Failed", "status": "True"}]})),
                job("new", json!(null)),
            ]
        }),
    );
    let phases = || async {
        launcher
            .workers()
            .await
            .map(|ws| {
                ws.into_iter()
                    .map(|w| (w.name, w.phase))
                    .collect::<BTreeMap<_, _>>()
            })
            .unwrap_or_default()
    };
    wait_for("the cache to sync", Duration::from_secs(5), || async {
        !phases().await.is_empty()
    })
    .await;
    let expected = BTreeMap::from([
        ("busy".to_string(), Phase::Running),
        ("crashed".to_string(), Phase::Failed),
        ("drained".to_string(), Phase::Succeeded),
        ("new".to_string(), Phase::Pending),
        ("unscheduled".to_string(), Phase::Pending),
    ]);
    assert_eq!(phases().await, expected);
    let workers = launcher.workers().await.unwrap();
    assert!(
        workers
            .iter()
            .all(|w| w.job_type == "default" && w.started_unix > 0)
    );

    // Then the watch: a change arrives as an event, not as another list.
    let (method, _, query, _, respond) = next(&mut handle).await;
    assert_eq!(method, Method::GET);
    assert!(
        query.contains("watch=true") && query.contains(SELECTOR),
        "{query}"
    );
    assert!(
        query.contains("resourceVersion=10"),
        "resumes from the list: {query}"
    );
    let event =
        json!({"type": "MODIFIED", "object": job("unscheduled", json!({"active": 1, "ready": 1}))});
    let response = Response::builder()
        .status(StatusCode::OK)
        .body(Body::from(format!("{event}\n").into_bytes()))
        .unwrap();
    respond.send_response(response);
    wait_for(
        "the watch event to reach the cache",
        Duration::from_secs(5),
        || async { phases().await.get("unscheduled") == Some(&Phase::Running) },
    )
    .await;

    // A failing watch makes the cache suspect: no answer until it works again.
    let (method, _, query, _, respond) = next(&mut handle).await;
    assert!(
        method == Method::GET && query.contains("watch=true"),
        "{query}"
    );
    answer(
        respond,
        StatusCode::INTERNAL_SERVER_ERROR,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "etcd is sulking", "reason": "InternalError", "code": 500}),
    );
    wait_for(
        "the failing watch to make the cache suspect",
        Duration::from_secs(5),
        || async {
            launcher
                .workers()
                .await
                .is_err_and(|e| e.to_string().contains("etcd is sulking"))
        },
    )
    .await;
    let (_, _, query, _, respond) = next(&mut handle).await;
    assert!(query.contains("watch=true"), "retried: {query}");
    let event = json!({"type": "MODIFIED", "object": job("busy", json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}))});
    respond.send_response(
        Response::builder()
            .status(StatusCode::OK)
            .body(Body::from(format!("{event}\n").into_bytes()))
            .unwrap(),
    );
    wait_for(
        "the recovered watch to be trusted again",
        Duration::from_secs(5),
        || async { phases().await.get("busy") == Some(&Phase::Succeeded) },
    )
    .await;
}

#[tokio::test]
async fn a_pending_worker_says_why_it_has_not_started() {
    let pod = |worker: &str, status: Value| {
        json!({"metadata": {"name": format!("{worker}-x7k2p"), "namespace": NAMESPACE,
                            "labels": {"spillway.dev/worker": worker}},
               "status": status})
    };
    let (launcher, watch, mut handle) = launcher_with_pods(json!([
        pod(
            "stuck",
            json!({"phase": "Pending", "containerStatuses": [{
            "name": "worker", "image": "nope:1", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"nope:1\""}}}]})
        ),
        pod("busy", json!({"phase": "Running"})),
    ]));
    tokio::spawn(watch);
    let (_, _, _, _, respond) = next(&mut handle).await;
    answer(
        respond,
        StatusCode::OK,
        &json!({"apiVersion": "batch/v1", "kind": "JobList", "metadata": {"resourceVersion": "1"},
                "items": [job("stuck", json!({"active": 1, "ready": 0})),
                          job("denied", json!(null)),
                          job("busy", json!({"active": 1, "ready": 1}))]}),
    );
    wait_for("the cache to sync", Duration::from_secs(5), || async {
        launcher.workers().await.is_ok_and(|w| w.len() == 3)
    })
    .await;
    let waiting: BTreeMap<String, Option<Waiting>> = launcher
        .workers()
        .await
        .unwrap()
        .into_iter()
        .map(|w| (w.name, w.waiting))
        .collect();
    assert_eq!(
        waiting["stuck"],
        Some(Waiting {
            detail: "ImagePullBackOff: Back-off pulling image \"nope:1\"".into(),
            permanent: true
        })
    );
    let denied = waiting["denied"]
        .as_ref()
        .expect("a Job without a pod waits");
    assert!(
        !denied.permanent && denied.detail.contains("no pod created yet"),
        "{denied:?}"
    );
    assert_eq!(waiting["busy"], None, "a running worker waits for nothing");
}

#[tokio::test]
async fn a_job_just_created_counts_as_pending_before_the_watch_shows_it() {
    let (launcher, watch, mut handle) = launcher();
    tokio::spawn(watch);
    let (_, _, _, _, respond) = next(&mut handle).await;
    answer(
        respond,
        StatusCode::OK,
        &json!({"apiVersion": "batch/v1", "kind": "JobList",
                "metadata": {"resourceVersion": "10"}, "items": []}),
    );
    // The watch's request, left open: it delivers nothing for now.
    let (_, _, query, _, _watching) = next(&mut handle).await;
    assert!(query.contains("watch=true"), "{query}");
    wait_for("the cache to sync", Duration::from_secs(5), || async {
        launcher.workers().await.is_ok_and(|w| w.is_empty())
    })
    .await;

    let server = tokio::spawn(async move {
        let (method, _, _, body, respond) = next(&mut handle).await;
        answer(respond, StatusCode::CREATED, &body);
        method
    });
    launcher
        .spawn("default", "spillway-default-1")
        .await
        .unwrap();
    assert_eq!(server.await.unwrap(), Method::POST);
    let workers: Vec<(String, String, Phase)> = launcher
        .workers()
        .await
        .unwrap()
        .into_iter()
        .map(|w| (w.name, w.job_type, w.phase))
        .collect();
    assert_eq!(
        workers,
        [(
            "spillway-default-1".to_string(),
            "default".to_string(),
            Phase::Pending
        )],
        "the next tick counts it, whatever the watch has shown"
    );
}
