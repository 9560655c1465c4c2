//! The mocked API server the launcher's tests talk to (`tower_test::mock::pair`
//! behind a real `kube::Client`): each request a test is about is handed to it to
//! check and answer; reads of the pods of pending workers are answered by a router
//! from a fixed pod list.

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::{Client, client::Body};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::super::{KubeLauncher, manifest::tests::template};
use crate::launcher::spec::WorkerEnv;

pub(super) const NAMESPACE: &str = "spillway";
pub(super) const SELECTOR: &str = "labelSelector=app.kubernetes.io%2Fmanaged-by%3Dspillway-scaler";

type Exchange = (
    Request<Body>,
    tower_test::mock::SendResponse<Response<Body>>,
);

/// The requests a test scripts: every one but the pod lists the router answers.
pub(super) struct Requests(mpsc::UnboundedReceiver<Exchange>);

impl Requests {
    async fn next_request(&mut self) -> Option<Exchange> {
        self.0.recv().await
    }
}

/// A client of a mocked API server in namespace `spillway` whose pod lists (of
/// Spillway's workers) answer `pods`, and the other requests it receives.
pub(super) fn api_server(pods: Value) -> (Client, Requests) {
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
    (Client::new(service, NAMESPACE), Requests(requests))
}

pub(super) fn launcher() -> (
    KubeLauncher,
    impl Future<Output = ()> + Send + 'static,
    Requests,
) {
    launcher_with_pods(json!([]))
}

/// A launcher (of the manifest tests' template and environment) whose pod lists
/// answer `pods`.
pub(super) fn launcher_with_pods(
    pods: Value,
) -> (
    KubeLauncher,
    impl Future<Output = ()> + Send + 'static,
    Requests,
) {
    let (client, requests) = api_server(pods);
    let (launcher, watch) = KubeLauncher::new(client, NAMESPACE, template(), WorkerEnv::example());
    (launcher, watch, requests)
}

/// The next request: its method, path, query and JSON body (`Null` when empty).
pub(super) async fn next(
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

pub(super) fn answer(
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

pub(super) fn job(name: &str, status: Value) -> Value {
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
