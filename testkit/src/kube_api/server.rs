//! The HTTP face of the double: the Kubernetes REST paths a client of Jobs and pods
//! uses, behind bearer-token authentication, each answered in the API server's own
//! shapes (objects, `...List`s, watch event lines, and `Status` for every error).
//!
//! Every request is recorded (method, path, query) before it is authenticated, so a
//! test can count what a client sent, a DELETE repeated every tick for instance. RBAC is
//! not emulated: the one token may do everything, so least privilege is checked by
//! reading that record, not by a refusal.
//!
//! | path | verbs |
//! |---|---|
//! | `/apis/batch/v1/namespaces/{ns}/jobs` | list, watch, create (`dryRun=All`, `fieldValidation`) |
//! | `/apis/batch/v1/namespaces/{ns}/jobs/{name}` | get, delete (`propagationPolicy`, `dryRun`) |
//! | `/api/v1/namespaces/{ns}/pods`, `.../events` | list, watch |
//! | `/api/v1/namespaces/{ns}/pods/{name}` | get |
//! | `/api/v1/namespaces/{ns}/pods/{name}/log` | get (`container`, `tailLines`, `limitBytes`, `follow`) |
//! | `/api/v1/namespaces/{ns}/secrets/{name}`, `.../configmaps/{name}` | get |
//! | `/version` | get |

use std::{collections::HashMap, convert::Infallible, sync::Arc, time::Duration};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Path, Query, Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use k8s_openapi::{
    ByteString,
    api::{
        batch::v1::Job,
        core::v1::{ConfigMap, Event, Pod, Secret},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{
    RequestRecord, Shared, admission, kubelet, lock,
    store::{Kept, Selector},
};

/// An error answer: a `Status` object with the HTTP code it names.
#[derive(Debug)]
pub(crate) struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
    details: Option<Value>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            code: 400,
            reason: "BadRequest",
            message: message.into(),
            details: None,
        }
    }

    pub fn gone(message: impl Into<String>) -> Self {
        ApiError {
            code: 410,
            reason: "Expired",
            message: message.into(),
            details: None,
        }
    }

    pub fn invalid(message: String, details: Value) -> Self {
        ApiError {
            code: 422,
            reason: "Invalid",
            message,
            details: Some(details),
        }
    }

    /// `jobs.batch "x" not found`, `pods "x" not found`.
    fn not_found(resource: &str, group: &str, name: &str) -> Self {
        let qualified = if group.is_empty() {
            resource.to_string()
        } else {
            format!("{resource}.{group}")
        };
        ApiError {
            code: 404,
            reason: "NotFound",
            message: format!("{qualified} {name:?} not found"),
            details: Some(json!({"name": name, "group": group, "kind": resource})),
        }
    }

    fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": self.message,
            "reason": self.reason, "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(code, &self.status())
    }
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

#[derive(Clone)]
pub(crate) struct AppState {
    pub world: Shared,
    pub token: Arc<str>,
    pub stop: CancellationToken,
}

pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/version", get(version))
        .route(
            "/apis/batch/v1/namespaces/{ns}/jobs",
            get(list_jobs).post(create_job),
        )
        .route(
            "/apis/batch/v1/namespaces/{ns}/jobs/{name}",
            get(get_job).delete(delete_job),
        )
        .route("/api/v1/namespaces/{ns}/pods", get(list_pods))
        .route("/api/v1/namespaces/{ns}/pods/{name}", get(get_pod))
        .route("/api/v1/namespaces/{ns}/pods/{name}/log", get(pod_log))
        .route("/api/v1/namespaces/{ns}/events", get(list_events))
        .route("/api/v1/namespaces/{ns}/secrets/{name}", get(get_secret))
        .route(
            "/api/v1/namespaces/{ns}/configmaps/{name}",
            get(get_config_map),
        )
        .fallback(|| async {
            ApiError {
                code: 404,
                reason: "NotFound",
                message: "the server could not find the requested resource".into(),
                details: None,
            }
        })
        .method_not_allowed_fallback(|| async {
            ApiError {
                code: 405,
                reason: "MethodNotAllowed",
                message: "the server does not allow this method on the requested resource".into(),
                details: None,
            }
        })
        .layer(middleware::from_fn_with_state(state.clone(), gate))
        .with_state(state)
}

/// Records the request, then lets it through only with the bearer token.
async fn gate(State(state): State<AppState>, request: Request, next: Next) -> Response {
    lock(&state.world).store.requests.push(RequestRecord {
        method: request.method().to_string(),
        path: request.uri().path().to_string(),
        query: request.uri().query().unwrap_or_default().to_string(),
    });
    let expected = format!("Bearer {}", state.token);
    let authorized = request
        .headers()
        .get(header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == expected.as_bytes());
    if !authorized {
        return ApiError {
            code: 401,
            reason: "Unauthorized",
            message: "Unauthorized".into(),
            details: None,
        }
        .into_response();
    }
    next.run(request).await
}

type Params = Query<HashMap<String, String>>;

async fn version() -> Response {
    json_response(
        StatusCode::OK,
        &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-spillway-testkit",
                "platform": "linux/amd64"}),
    )
}

fn is_true(params: &HashMap<String, String>, key: &str) -> bool {
    matches!(params.get(key).map(String::as_str), Some("true" | "1"))
}

fn number<T: std::str::FromStr>(
    params: &HashMap<String, String>,
    key: &str,
) -> Result<Option<T>, ApiError> {
    params
        .get(key)
        .filter(|v| !v.is_empty())
        .map(|v| {
            v.parse()
                .map_err(|_| ApiError::bad_request(format!("{key}: invalid value {v:?}")))
        })
        .transpose()
}

/// List or watch `K` in `ns`. A namespace other than the double's has nothing in it.
fn list_or_watch<K: Kept>(
    state: &AppState,
    ns: &str,
    params: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    let selector = Selector::parse(
        params.get("labelSelector").map(String::as_str),
        params.get("fieldSelector").map(String::as_str),
    )?;
    let visible = lock(&state.world).store.namespace == ns;
    if is_true(params, "watch") {
        return watch::<K>(state, visible, selector, params);
    }
    let world = lock(&state.world);
    let mut list = world.store.list::<K>(
        &selector,
        number(params, "limit")?,
        params.get("continue").map(String::as_str),
    )?;
    if !visible {
        list["items"] = json!([]);
    }
    Ok(json_response(StatusCode::OK, &list))
}

fn event_line(type_: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": type_, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

/// A watch: JSON lines of changes after `resourceVersion` (or, without one, the current
/// objects as ADDED first), until `timeoutSeconds`, then a BOOKMARK if allowed. A
/// version older than the history held is answered with an ERROR event, 410 Expired.
fn watch<K: Kept>(
    state: &AppState,
    visible: bool,
    selector: Selector,
    params: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    if is_true(params, "sendInitialEvents") {
        return Err(ApiError::bad_request(
            "sendInitialEvents (streaming lists) is not supported by the test double",
        ));
    }
    let timeout = Duration::from_secs(number(params, "timeoutSeconds")?.unwrap_or(1800));
    let bookmarks = is_true(params, "allowWatchBookmarks");
    let from: Option<u64> = number(params, "resourceVersion")?.filter(|rv| *rv != 0);
    let gone = |rv: u64, now: u64| {
        event_line(
            "ERROR",
            &ApiError::gone(format!("too old resource version: {rv} ({now})")).status(),
        )
    };

    let (mut changed, mut cursor, initial, mut ended) = {
        let world = lock(&state.world);
        let store = &world.store;
        let now = store.resource_version();
        match from {
            None => {
                let current: Vec<Bytes> = K::map(store)
                    .values()
                    .map(|o| serde_json::to_value(o).expect("serialisable"))
                    .filter(|v| visible && selector.matches(v))
                    .map(|v| event_line("ADDED", &v))
                    .collect();
                (store.subscribe(), now, current, false)
            }
            Some(rv) if store.changes_after(K::WHICH, rv).is_none() => {
                (store.subscribe(), rv, vec![gone(rv, now)], true)
            }
            Some(rv) => (store.subscribe(), rv, Vec::new(), false),
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    let world = Arc::clone(&state.world);
    let stop = state.stop.clone();
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + timeout;
        for line in initial {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        while !ended {
            changed.borrow_and_update();
            let lines: Vec<Bytes> = {
                let world = lock(&world);
                let store = &world.store;
                let now = store.resource_version();
                match store.changes_after(K::WHICH, cursor) {
                    None => {
                        ended = true;
                        vec![gone(cursor, now)]
                    }
                    Some(changes) => {
                        let lines = changes
                            .into_iter()
                            .filter(|c| visible && selector.matches(&c.object))
                            .map(|c| event_line(c.type_, &c.object))
                            .collect();
                        cursor = now;
                        lines
                    }
                }
            };
            for line in lines {
                if tx.send(line).await.is_err() {
                    return;
                }
            }
            if ended {
                return;
            }
            tokio::select! {
                result = changed.changed() => if result.is_err() { return },
                _ = tokio::time::sleep_until(deadline) => {
                    if bookmarks {
                        let mark = json!({"kind": K::KIND, "apiVersion": K::API_VERSION,
                                          "metadata": {"resourceVersion": cursor.to_string()}});
                        let _ = tx.send(event_line("BOOKMARK", &mark)).await;
                    }
                    return;
                }
                _ = stop.cancelled() => return,
                _ = tx.closed() => return,
            }
        }
    });
    let lines = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|line| (Ok::<_, Infallible>(line), rx))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(lines),
    )
        .into_response())
}

async fn list_jobs(
    State(state): State<AppState>,
    Path(ns): Path<String>,
    Query(params): Params,
) -> Result<Response, ApiError> {
    list_or_watch::<Job>(&state, &ns, &params)
}

async fn list_pods(
    State(state): State<AppState>,
    Path(ns): Path<String>,
    Query(params): Params,
) -> Result<Response, ApiError> {
    list_or_watch::<Pod>(&state, &ns, &params)
}

async fn list_events(
    State(state): State<AppState>,
    Path(ns): Path<String>,
    Query(params): Params,
) -> Result<Response, ApiError> {
    list_or_watch::<Event>(&state, &ns, &params)
}

fn only_namespace(state: &AppState, ns: &str) -> Result<(), ApiError> {
    if lock(&state.world).store.namespace == ns {
        Ok(())
    } else {
        Err(ApiError::not_found("namespaces", "", ns))
    }
}

async fn create_job(
    State(state): State<AppState>,
    Path(ns): Path<String>,
    Query(params): Params,
    body: Bytes,
) -> Result<Response, ApiError> {
    only_namespace(&state, &ns)?;
    let dry_run = match params.get("dryRun").map(String::as_str) {
        None | Some("") => false,
        Some("All") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "dryRun: Unsupported value: {other:?}: supported values: \"All\""
            )));
        }
    };
    let validation =
        admission::FieldValidation::parse(params.get("fieldValidation").map(String::as_str))?;
    let (mut job, warnings) = admission::decode_job(&body, validation)?;
    if job.metadata.namespace.as_deref().is_some_and(|n| n != ns) {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    let name = job.metadata.name.clone().unwrap_or_default();
    let causes = admission::validate_job(&job);
    if !causes.is_empty() {
        return Err(admission::invalid(&name, &causes));
    }
    let mut world = lock(&state.world);
    if world.store.jobs.contains_key(&name) {
        return Err(ApiError {
            code: 409,
            reason: "AlreadyExists",
            message: format!("jobs.batch {name:?} already exists"),
            details: Some(json!({"name": name, "group": "batch", "kind": "jobs"})),
        });
    }
    admission::default_job(&mut job, &ns, &uuid::Uuid::new_v4().to_string());
    if !dry_run {
        job = world.store.put(job);
        world.store.warnings.extend(warnings.iter().cloned());
    }
    drop(world);
    let mut response = json_response(
        StatusCode::CREATED,
        &serde_json::to_value(&job).expect("serialisable"),
    );
    for warning in warnings {
        let value = format!("299 - {warning:?}");
        if let Ok(value) = HeaderValue::from_str(&value) {
            response.headers_mut().append(header::WARNING, value);
        }
    }
    Ok(response)
}

async fn get_job(
    State(state): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let world = lock(&state.world);
    match world
        .store
        .jobs
        .get(&name)
        .filter(|_| world.store.namespace == ns)
    {
        Some(job) => Ok(json_response(
            StatusCode::OK,
            &serde_json::to_value(job).expect("serialisable"),
        )),
        None => Err(ApiError::not_found("jobs", "batch", &name)),
    }
}

/// DELETE of a Job. `Foreground` marks it and answers 202 with the marked Job (it stays
/// until its pod is gone); `Background` and `Orphan` (the API's default for
/// `batch/v1` Jobs) remove it now and answer a `Status` of success.
async fn delete_job(
    State(state): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
    Query(params): Params,
    body: Bytes,
) -> Result<Response, ApiError> {
    let options: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("DeleteOptions: {e}")))?
    };
    let policy = options["propagationPolicy"]
        .as_str()
        .map(str::to_string)
        .or_else(|| params.get("propagationPolicy").cloned());
    let dry_run = options["dryRun"]
        .as_array()
        .is_some_and(|d| d.iter().any(|v| v == "All"))
        || params.get("dryRun").is_some_and(|d| d == "All");
    let mut world = lock(&state.world);
    let Some(job) = world
        .store
        .jobs
        .get(&name)
        .filter(|_| world.store.namespace == ns)
        .cloned()
    else {
        return Err(ApiError::not_found("jobs", "batch", &name));
    };
    let success = || {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
               "details": {"name": name, "group": "batch", "kind": "jobs",
                           "uid": job.metadata.uid}})
    };
    if dry_run {
        return Ok(json_response(StatusCode::OK, &success()));
    }
    match policy.as_deref() {
        Some("Foreground") => {
            kubelet::foreground_delete(&mut world, &name);
            let marked = world.store.jobs.get(&name).cloned().unwrap_or(job);
            Ok(json_response(
                StatusCode::ACCEPTED,
                &serde_json::to_value(marked).expect("serialisable"),
            ))
        }
        Some("Background") => {
            kubelet::background_delete(&mut world, &name);
            Ok(json_response(StatusCode::OK, &success()))
        }
        None | Some("Orphan") => {
            kubelet::orphan_delete(&mut world, &name);
            Ok(json_response(StatusCode::OK, &success()))
        }
        Some(other) => Err(ApiError::bad_request(format!(
            "propagationPolicy: Unsupported value: {other:?}: supported values: \"Foreground\", \"Background\", \"Orphan\""
        ))),
    }
}

async fn get_pod(
    State(state): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let world = lock(&state.world);
    match world
        .store
        .pods
        .get(&name)
        .filter(|_| world.store.namespace == ns)
    {
        Some(pod) => Ok(json_response(
            StatusCode::OK,
            &serde_json::to_value(pod).expect("serialisable"),
        )),
        None => Err(ApiError::not_found("pods", "", &name)),
    }
}

/// A pod's log: the whole file, its last `tailLines`, at most `limitBytes` of that.
async fn pod_log(
    State(state): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
    Query(params): Params,
) -> Result<Response, ApiError> {
    let follow = is_true(&params, "follow");
    let tail: Option<usize> = number(&params, "tailLines")?;
    let limit: Option<usize> = number(&params, "limitBytes")?;
    let path = {
        let world = lock(&state.world);
        let pod = world
            .store
            .pods
            .get(&name)
            .filter(|_| world.store.namespace == ns)
            .ok_or_else(|| ApiError::not_found("pods", "", &name))?;
        let containers: Vec<&str> = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter().map(|c| c.name.as_str()))
            .collect();
        let container = match params.get("container") {
            Some(c) if containers.contains(&c.as_str()) => c.clone(),
            Some(c) => {
                return Err(ApiError::bad_request(format!(
                    "container {c} is not valid for pod {name}"
                )));
            }
            None if containers.len() == 1 => containers[0].to_string(),
            None => {
                return Err(ApiError::bad_request(format!(
                    "a container name must be specified for pod {name}, choose one of: [{}]",
                    containers.join(" ")
                )));
            }
        };
        let state = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|s| s.iter().find(|s| s.name == container))
            .and_then(|s| s.state.clone());
        let waiting = match &state {
            Some(s) if s.running.is_some() || s.terminated.is_some() => None,
            Some(s) => s.waiting.as_ref().and_then(|w| w.reason.clone()),
            None => Some("ContainerCreating".into()),
        };
        if let Some(reason) = waiting {
            return Err(ApiError::bad_request(format!(
                "container {container:?} in pod {name:?} is waiting to start: {reason}"
            )));
        }
        world.node.log_path(&name, &container)
    };
    let log = tokio::fs::read(&path).await.unwrap_or_default();
    let mut start = 0;
    if let Some(tail) = tail {
        // The start of the last `tail` lines; a final newline does not open a line.
        let body = log.strip_suffix(b"\n").unwrap_or(&log);
        start = body
            .iter()
            .enumerate()
            .rev()
            .filter(|(_, b)| **b == b'\n')
            .nth(tail.saturating_sub(1))
            .map_or(0, |(i, _)| i + 1);
        if tail == 0 {
            start = log.len();
        }
    }
    let mut body = &log[start..];
    if let Some(limit) = limit {
        body = &body[..limit.min(body.len())];
    }
    if follow {
        return Ok((
            [(header::CONTENT_TYPE, "text/plain")],
            Body::from_stream(follow_log(state, name, path, body.to_vec(), log.len())),
        )
            .into_response());
    }
    Ok(([(header::CONTENT_TYPE, "text/plain")], body.to_vec()).into_response())
}

/// A followed log, as the kubelet streams one: `first`, then what is written to the
/// file after `offset`, until the pod has finished and everything it wrote is sent.
fn follow_log(
    state: AppState,
    pod: String,
    path: std::path::PathBuf,
    first: Vec<u8>,
    offset: usize,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> {
    let finished = move || {
        let world = lock(&state.world);
        world.store.pods.get(&pod).is_none_or(|pod| {
            matches!(
                pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        })
    };
    futures_util::stream::unfold(
        (Some(first), offset, false),
        move |(first, offset, done)| {
            let (path, finished) = (path.clone(), finished.clone());
            async move {
                if let Some(first) = first.filter(|f| !f.is_empty()) {
                    return Some((Ok(Bytes::from(first)), (None, offset, done)));
                }
                if done {
                    return None;
                }
                loop {
                    // Finished before the read: whatever it wrote is in the file.
                    let ended = finished();
                    let log = tokio::fs::read(&path).await.unwrap_or_default();
                    if log.len() > offset {
                        let more = Bytes::copy_from_slice(&log[offset..]);
                        return Some((Ok(more), (None, log.len(), ended)));
                    }
                    if ended {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        },
    )
}

async fn get_secret(
    State(state): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let world = lock(&state.world);
    let data = world
        .store
        .secrets
        .get(&name)
        .filter(|_| world.store.namespace == ns)
        .ok_or_else(|| ApiError::not_found("secrets", "", &name))?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns),
            ..ObjectMeta::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| (k.clone(), ByteString(v.clone().into_bytes())))
                .collect(),
        ),
        type_: Some("Opaque".into()),
        ..Secret::default()
    };
    Ok(json_response(
        StatusCode::OK,
        &serde_json::to_value(secret).expect("serialisable"),
    ))
}

async fn get_config_map(
    State(state): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let world = lock(&state.world);
    let data = world
        .store
        .config_maps
        .get(&name)
        .filter(|_| world.store.namespace == ns)
        .ok_or_else(|| ApiError::not_found("configmaps", "", &name))?;
    let config_map = ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns),
            ..ObjectMeta::default()
        },
        data: Some(data.clone()),
        ..ConfigMap::default()
    };
    Ok(json_response(
        StatusCode::OK,
        &serde_json::to_value(config_map).expect("serialisable"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_carries_code_reason_and_details() {
        let status = ApiError::not_found("jobs", "batch", "w1").status();
        assert_eq!(status["code"], 404);
        assert_eq!(status["reason"], "NotFound");
        assert_eq!(status["message"], "jobs.batch \"w1\" not found");
        assert_eq!(status["details"]["kind"], "jobs");
    }
}
