//! The launcher against a mocked API server: each request it sends is checked
//! (method, path, selector, body) and answered as Kubernetes would. Reads of the
//! pods of pending workers are answered by a router from a fixed pod list, so the
//! tests script only the requests they are about.

use std::{collections::BTreeMap, time::Duration};

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use spillway_common::testing::wait_for;
use tokio::sync::mpsc;

use super::*;

type Exchange = (
    Request<Body>,
    tower_test::mock::SendResponse<Response<Body>>,
);

/// The requests a test scripts: every one but the pod lists the router answers.
struct Requests(mpsc::UnboundedReceiver<Exchange>);

impl Requests {
    async fn next_request(&mut self) -> Option<Exchange> {
        self.0.recv().await
    }
}

const NAMESPACE: &str = "spillway";
const SELECTOR: &str = "labelSelector=app.kubernetes.io%2Fmanaged-by%3Dspillway-scaler";

fn template() -> JobTemplate {
    JobTemplate {
        images: BTreeMap::from([("default".into(), "spillway-worker:1.0".into())]),
        image_pull_policy: "IfNotPresent".into(),
        secret_name: "spillway-rabbitmq".into(),
        secret_key: "amqp-url".into(),
        config_map: "spillway-jobs".into(),
        config_map_key: "jobs.toml".into(),
        ttl_seconds_after_finished: 300,
        termination_grace_seconds: 600,
        cpu_request: "100m".into(),
        memory_request: "64Mi".into(),
        cpu_limit: "1".into(),
        memory_limit: "256Mi".into(),
        tmp_size_limit: "64Mi".into(),
    }
}

fn launcher() -> (
    KubeLauncher,
    impl Future<Output = ()> + Send + 'static,
    Requests,
) {
    launcher_with_pods(json!([]))
}

/// A launcher whose pod lists (of Spillway's workers) answer `pods`.
fn launcher_with_pods(
    pods: Value,
) -> (
    KubeLauncher,
    impl Future<Output = ()> + Send + 'static,
    Requests,
) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let (scripted, requests) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((request, respond)) = handle.next_request().await {
            let query = request.uri().query().unwrap_or_default();
            if request.uri().path() == "/api/v1/namespaces/spillway/pods"
                && query.contains(SELECTOR)
            {
                answer(
                    respond,
                    StatusCode::OK,
                    &json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": pods}),
                );
            } else if scripted.send((request, respond)).is_err() {
                return;
            }
        }
    });
    let client = Client::new(service, NAMESPACE);
    let (launcher, watch) = KubeLauncher::new(client, NAMESPACE, template());
    (launcher, watch, Requests(requests))
}

/// The next request: its method, path, query and JSON body (`Null` when empty).
async fn next(
    handle: &mut Requests,
) -> (
    Method,
    String,
    String,
    Value,
    tower_test::mock::SendResponse<Response<Body>>,
) {
    let (request, respond) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("a request within 5 s")
        .expect("the client is alive");
    let (parts, body) = request.into_parts();
    let bytes = body.collect_bytes().await.unwrap();
    let json = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    let query = parts.uri.query().unwrap_or_default().to_string();
    (
        parts.method,
        parts.uri.path().to_string(),
        query,
        json,
        respond,
    )
}

fn answer(
    respond: tower_test::mock::SendResponse<Response<Body>>,
    status: StatusCode,
    body: &Value,
) {
    let response = Response::builder()
        .status(status)
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap();
    respond.send_response(response);
}

fn job(name: &str, status: Value) -> Value {
    json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {
            "name": name, "namespace": NAMESPACE, "resourceVersion": "1",
            "creationTimestamp": "2026-11-23T10:00:00Z",
            "labels": {"app.kubernetes.io/managed-by": "spillway-scaler", "spillway.dev/job-type": "default"}
        },
        "spec": {"template": {"spec": {"containers": []}}},
        "status": status
    })
}

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
    let expected = worker_job(&template(), "default", "spillway-default-1").unwrap();
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
