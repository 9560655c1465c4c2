//! The scaler's HTTP endpoints: the dashboard and its JSON API ([`crate::dashboard`]),
//! `/api/jobs/{name}/logs` (a worker's log, through its launcher; followed live as
//! Server-Sent Events with `?follow=1`),
//! `POST /job-types/{name}/pause` and `/resume` (kept in the ledger), `/healthz`,
//! `/readyz` (connected to RabbitMQ), `/metrics`, and the OpenAPI document of them all
//! at `/openapi.json`.
//! `/readyz` does not ask PostgreSQL: the scaler scales without the ledger, which
//! only the batch pages read (they say when it is unreachable).
//! Errors are JSON, like every Spillway service's. A log answer is bounded in bytes by
//! its launcher ([`crate::launcher::MAX_LOG_BYTES`]), whatever the log's size.
//!
//! Every route is added with utoipa-axum's `routes!`, from its handler's
//! `#[utoipa::path]`: the route and its documentation come from the one annotation, so
//! no route goes undocumented.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    Extension, Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use futures_util::{Stream, StreamExt as _};
use serde::{Deserialize, Serialize};
use spillway_common::{
    auth::{Gate, Principal, require_token},
    extract::{Path, Query},
    openapi::{self, ErrorBody, Probe},
};
use spillway_ledger::{Ledger, LedgerError};
use tokio_util::sync::CancellationToken;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    bus::Bus,
    dashboard::{self, DashboardState, batches, dead, operations},
    launcher::{Launcher, LauncherError, LogLines},
    metrics::Metrics,
    reports::Reports,
};

/// Every error the scaler's HTTP API answers, each as an [`ErrorBody`]
/// (`{"error": "..."}`) with its status: the one place that shape is written.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("not found")]
    NotFound,
    #[error("not connected to RabbitMQ")]
    NotReady,
    #[error("no batch {0:?} in the ledger")]
    NoSuchBatch(String),
    #[error("no job type {0:?}")]
    NoSuchJobType(String),
    #[error("{0}")]
    BadQuery(String),
    #[error("the ledger: {0}")]
    Ledger(#[from] LedgerError),
    #[error("the ledger: PostgreSQL did not answer within {0:?}")]
    LedgerSilent(Duration),
    #[error(transparent)]
    Launcher(#[from] LauncherError),
    #[error("{0} are for admin tokens only")]
    AdminOnly(&'static str),
    #[error("cannot render the dashboard: {0}")]
    Render(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound
            | ApiError::NoSuchBatch(_)
            | ApiError::NoSuchJobType(_)
            | ApiError::Launcher(LauncherError::NoSuchWorker(_)) => StatusCode::NOT_FOUND,
            ApiError::BadQuery(_) => StatusCode::BAD_REQUEST,
            ApiError::AdminOnly(_) => StatusCode::FORBIDDEN,
            ApiError::NotReady | ApiError::LedgerSilent(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Ledger(e) if e.is_unavailable() => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Launcher(_) => StatusCode::BAD_GATEWAY,
            ApiError::Ledger(_) | ApiError::Render(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(%status, error = %self, "request failed");
        }
        let body = ErrorBody {
            error: self.to_string(),
        };
        (status, Json(body)).into_response()
    }
}

pub struct HttpState<L> {
    pub bus: Arc<Bus>,
    pub metrics: Arc<Metrics>,
    pub launcher: Arc<L>,
    pub reports: Arc<Reports>,
    pub ledger: Ledger,
    /// The configured job types, by name.
    pub job_types: Arc<Vec<String>>,
    /// Cancelled when the scaler stops: followed logs end then, so that they do not
    /// hold the shutdown.
    pub stop: CancellationToken,
}

/// A followed log as Server-Sent Events: a `data` event per line, or per run of lines
/// that were there at once (the tail it starts with, say: one `data:` field a line,
/// which a client joins with line breaks); a failure as an `error` event; an `end`
/// event once the worker has ended and its last line is sent. Comments keep the
/// connection alive through proxies while the log is quiet.
fn follow(
    lines: LogLines,
    stop: CancellationToken,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let events = lines
        .take_until(stop.cancelled_owned())
        .ready_chunks(FOLLOW_TAIL as usize * 10)
        .flat_map(|chunk| {
            let mut events = Vec::new();
            let mut run = Vec::new();
            for line in chunk {
                match line {
                    Ok(line) => run.push(line),
                    Err(error) => {
                        if !run.is_empty() {
                            events.push(Ok(Event::default().data(run.join("\n"))));
                            run.clear();
                        }
                        events.push(Ok(Event::default().event("error").data(error.to_string())));
                    }
                }
            }
            if !run.is_empty() {
                events.push(Ok(Event::default().data(run.join("\n"))));
            }
            futures_util::stream::iter(events)
        })
        .chain(futures_util::stream::once(async {
            Ok(Event::default().event("end").data("end of the log"))
        }));
    Sse::new(events).keep_alive(KeepAlive::default())
}

/// What the OpenAPI document says the scaler is.
const DESCRIPTION: &str = "Watches queue depth and worker reports, spawns and drains \
    Spillway workers, and serves the dashboard, its JSON API, worker logs, probes and metrics.";

/// Every route: the dashboard and its API, logs, probes and metrics, and the OpenAPI
/// document describing them (served to anyone, like the probes).
pub fn app<L: Launcher>(state: HttpState<L>, dashboard: DashboardState, gate: Gate) -> Router {
    let pages = OpenApiRouter::new()
        .routes(routes!(dashboard::index))
        .routes(routes!(dashboard::stats))
        .routes(routes!(dashboard::jobs))
        .routes(routes!(batches::list))
        .routes(routes!(batches::get))
        .routes(routes!(batches::page))
        .routes(routes!(batches::results))
        .routes(routes!(dead::page))
        .routes(routes!(operations::retry))
        .routes(routes!(operations::cancel))
        .routes(routes!(dashboard::events))
        .routes(routes!(dashboard::summary))
        .with_state(dashboard);
    let (routes, doc) = router(state)
        .merge(pages)
        .merge(crate::login::routes(gate.clone()))
        .split_for_parts();
    let doc = openapi::finish(doc, "Spillway scaler", DESCRIPTION, &gate);
    routes
        .merge(openapi::route(&doc))
        .layer(axum::middleware::from_fn_with_state(gate, require_token))
}

impl<L> Clone for HttpState<L> {
    fn clone(&self) -> Self {
        HttpState {
            bus: Arc::clone(&self.bus),
            metrics: Arc::clone(&self.metrics),
            launcher: Arc::clone(&self.launcher),
            reports: Arc::clone(&self.reports),
            ledger: self.ledger.clone(),
            job_types: Arc::clone(&self.job_types),
            stop: self.stop.clone(),
        }
    }
}

/// The probes, metrics, worker logs and pausing, with the JSON 404 for any other path.
///
/// `readyz`, `metrics`, `logs`, `pause` and `resume` are generic over the launcher;
/// `routes!` names a handler without a turbofish (it pastes the name into that of the
/// annotation's type, which `logs::<L>` would break), and needs none: the handler's
/// `State<HttpState<L>>` can only be this router's state, so the compiler infers `L`.
/// Their `#[utoipa::path]` does not depend on `L`, so they are routed and documented
/// like every other handler, from the one annotation.
fn router<L: Launcher>(state: HttpState<L>) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .routes(routes!(logs))
        .routes(routes!(pause))
        .routes(routes!(resume))
        .fallback(|| async { ApiError::NotFound })
        .with_state(state)
}

/// Whether the scaler is up.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "probes",
    responses((status = 200, description = "The scaler is up.", body = Probe))
)]
async fn healthz() -> Json<Probe> {
    Json(Probe { status: "ok" })
}

/// Whether the scaler is connected to RabbitMQ.
///
/// PostgreSQL is not asked: the scaler scales without it.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "probes",
    responses(
        (status = 200, description = "Connected to RabbitMQ.", body = Probe),
        (status = 503, description = "Not connected to RabbitMQ.", body = ErrorBody),
    )
)]
async fn readyz<L>(State(state): State<HttpState<L>>) -> Result<Json<Probe>, ApiError> {
    if state.bus.connected() {
        Ok(Json(Probe { status: "ready" }))
    } else {
        Err(ApiError::NotReady)
    }
}

/// The scaler's metrics, for Prometheus.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "probes",
    responses((
        status = 200,
        description = "Every metric of the scaler, in the OpenMetrics text format.",
        body = String,
        content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8",
    ))
)]
async fn metrics<L>(State(state): State<HttpState<L>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// A job type's state after it was paused or resumed.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobTypePaused {
    pub job_type: String,
    /// Paused: spawning nothing, its workers draining.
    pub paused: bool,
}

/// Pauses a job type (admin tokens only).
///
/// The scaler spawns no worker for it and drains those it has, until it is resumed;
/// kept in the ledger, so it outlives the scaler.
#[utoipa::path(
    post,
    path = "/job-types/{name}/pause",
    tag = "job types",
    params(("name" = String, Path, description = "The job type, as the job-types file names it.")),
    responses(
        (status = 200, description = "The job type is paused.", body = JobTypePaused),
        (status = 400, description = "The path cannot be read: it holds a NUL byte (`%00`), or is not UTF-8 once decoded.", body = ErrorBody),
        (status = 403, description = "The token is not an admin's.", body = ErrorBody),
        (status = 404, description = "No job type of that name is configured.", body = ErrorBody),
        (status = 500, description = "The ledger failed to record it.", body = ErrorBody),
        (status = 503, description = "PostgreSQL cannot be reached: nothing changed.", body = ErrorBody),
    )
)]
async fn pause<L>(
    State(state): State<HttpState<L>>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<JobTypePaused>, ApiError> {
    if !principal.is_admin() {
        return Err(ApiError::AdminOnly("pausing and resuming job types"));
    }
    set_paused(&state, name, true).await
}

/// Resumes a paused job type (admin tokens only).
///
/// The scaler spawns its workers again as its queue asks.
#[utoipa::path(
    post,
    path = "/job-types/{name}/resume",
    tag = "job types",
    params(("name" = String, Path, description = "The job type, as the job-types file names it.")),
    responses(
        (status = 200, description = "The job type is running again.", body = JobTypePaused),
        (status = 400, description = "The path cannot be read: it holds a NUL byte (`%00`), or is not UTF-8 once decoded.", body = ErrorBody),
        (status = 403, description = "The token is not an admin's.", body = ErrorBody),
        (status = 404, description = "No job type of that name is configured.", body = ErrorBody),
        (status = 500, description = "The ledger failed to record it.", body = ErrorBody),
        (status = 503, description = "PostgreSQL cannot be reached: nothing changed.", body = ErrorBody),
    )
)]
async fn resume<L>(
    State(state): State<HttpState<L>>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<JobTypePaused>, ApiError> {
    if !principal.is_admin() {
        return Err(ApiError::AdminOnly("pausing and resuming job types"));
    }
    set_paused(&state, name, false).await
}

/// Pauses or resumes job type `name`: in the ledger first, so it outlives this
/// scaler, then for the next tick, which it starts at once.
async fn set_paused<L>(
    state: &HttpState<L>,
    name: String,
    paused: bool,
) -> Result<Json<JobTypePaused>, ApiError> {
    if !state.job_types.contains(&name) {
        return Err(ApiError::NoSuchJobType(name));
    }
    if paused {
        state.ledger.pause_job_type(&name).await?;
    } else {
        state.ledger.resume_job_type(&name).await?;
    }
    state.reports.set_paused(&name, paused);
    tracing::info!(job_type = %name, paused, "job type {}", if paused { "paused" } else { "resumed" });
    Ok(Json(JobTypePaused {
        job_type: name,
        paused,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct LogQuery {
    /// Only the last this many lines.
    tail: Option<u32>,
    /// `true` serves the log as a file download, `<name>.log`.
    #[serde(default)]
    download: bool,
    /// `1` (or `true`, or no value) follows the log as Server-Sent Events: its last
    /// `tail` lines (100 unless `tail` says), then each line as it is written.
    #[serde(default, deserialize_with = "flag")]
    #[param(value_type = String, pattern = "^(1|true|0|false)?$")]
    follow: bool,
}

/// Lines a followed log starts with when the request says no `tail`.
pub const FOLLOW_TAIL: u32 = 100;

/// A query flag: `1`, `true` or empty (`?follow`) are set; `0` and `false` are not.
fn flag<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    let value = String::deserialize(deserializer)?;
    match value.as_str() {
        "" | "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        other => Err(serde::de::Error::custom(format!(
            "{other:?} is not a flag: use 1 or 0"
        ))),
    }
}

/// A worker's log (admin tokens only).
///
/// Its last lines, or with `follow=1` followed live as Server-Sent Events.
#[utoipa::path(
    get,
    path = "/api/jobs/{name}/logs",
    tag = "workers",
    params(
        ("name" = String, Path, description = "The worker, as `/api/jobs` names it."),
        LogQuery,
    ),
    responses(
        (
            status = 200,
            description = "The log as text, at most 1 MiB of it (starting with a line saying \
                so when cut), a download with `download=true`; or, with `follow=1`, Server-Sent \
                Events: a `data` event per line (or run of lines written at once), an `error` \
                event when reading fails, and an `end` event once the worker has ended.",
            headers(("Content-Disposition" = String, description = "`attachment; filename=\"<name>.log\"` with `download=true` (and no `follow`).")),
            // The event stream has no schema: in OpenAPI 3.1 one would describe the
            // whole body (a string), which tools such as schemathesis read as the shape
            // of each event instead; the description says what the events are.
            content((String = "text/plain"), ("text/event-stream")),
        ),
        (status = 400, description = "The path or the query cannot be read (a `tail` that is not a count, a flag that is not one, a NUL byte).", body = ErrorBody),
        (status = 403, description = "The token is not an admin's.", body = ErrorBody),
        (status = 404, description = "This scaler's launcher started no worker of that name.", body = ErrorBody),
        (status = 502, description = "The launcher cannot list its workers or read the log (locally its registry or the log file; on Kubernetes the API server).", body = ErrorBody),
    )
)]
async fn logs<L: Launcher>(
    State(state): State<HttpState<L>>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
    Query(query): Query<LogQuery>,
) -> Result<Response, ApiError> {
    if !principal.is_admin() {
        return Err(ApiError::AdminOnly("worker logs"));
    }
    if query.follow {
        let lines = state
            .launcher
            .follow_logs(&name, Some(query.tail.unwrap_or(FOLLOW_TAIL)))
            .await?;
        return Ok(follow(lines, state.stop.clone()).into_response());
    }
    let text = state.launcher.logs(&name, query.tail).await?;
    let mut response =
        ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response();
    if query.download
        && let Ok(value) = format!("attachment; filename=\"{name}.log\"").parse()
    {
        response
            .headers_mut()
            .insert(header::CONTENT_DISPOSITION, value);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use serde_json::json;
    use spillway_common::jobs_config::JobsConfig;

    use super::*;
    use crate::{
        dashboard::Page,
        launcher::{MAX_LOG_BYTES, local::LocalLauncher, log_cut_note},
    };

    /// Issue 15: `?tail=500` of a worker that printed one 300 MB line answered all
    /// 300 MB, and the scaler's memory grew by as much per request. Here a 50 MB line:
    /// every way of asking answers at most a mebibyte, saying it was cut.
    #[tokio::test]
    async fn every_error_is_one_json_shape_with_its_status() {
        let cases = [
            (ApiError::NotFound, StatusCode::NOT_FOUND, "not found"),
            (
                ApiError::NotReady,
                StatusCode::SERVICE_UNAVAILABLE,
                "not connected to RabbitMQ",
            ),
            (
                LauncherError::NoSuchWorker("w9".into()).into(),
                StatusCode::NOT_FOUND,
                "no worker named \"w9\"",
            ),
            (
                LauncherError::Logs {
                    name: "w1".into(),
                    source: "its pod is gone".into(),
                }
                .into(),
                StatusCode::BAD_GATEWAY,
                "cannot read the logs of worker w1: its pod is gone",
            ),
            (
                ApiError::Render("bad template".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot render the dashboard: bad template",
            ),
            (
                ApiError::NoSuchBatch("b<1>".into()),
                StatusCode::NOT_FOUND,
                "no batch \"b<1>\" in the ledger",
            ),
            (
                ApiError::BadQuery("unknown row status".into()),
                StatusCode::BAD_REQUEST,
                "unknown row status",
            ),
            (
                LedgerError::BadUrl("no scheme".into()).into(),
                StatusCode::INTERNAL_SERVER_ERROR,
                "the ledger: DATABASE_URL is not a PostgreSQL URL (postgres://user@host:port/database): no scheme",
            ),
            (
                ApiError::LedgerSilent(Duration::from_secs(2)),
                StatusCode::SERVICE_UNAVAILABLE,
                "the ledger: PostgreSQL did not answer within 2s",
            ),
        ];
        for (error, status, message) in cases {
            let response = error.into_response();
            assert_eq!(response.status(), status, "{message}");
            let body = axum::body::to_bytes(response.into_body(), 1 << 16)
                .await
                .unwrap();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body, json!({"error": message}));
        }
    }

    #[tokio::test]
    async fn the_logs_endpoint_answers_at_most_a_mebibyte_of_a_huge_log() {
        let dir = tempfile::tempdir().unwrap();
        let launcher = LocalLauncher::new("/bin/true".into(), dir.path().into()).unwrap();
        launcher.spawn("default", "w-huge").await.unwrap();
        let mut log = std::fs::File::create(launcher.log_path("w-huge")).unwrap();
        let megabyte = vec![b'x'; 1 << 20];
        for _ in 0..50 {
            log.write_all(&megabyte).unwrap();
        }
        log.write_all(b"end\n").unwrap();
        drop(log);

        let (base, _served) = serve_logs(launcher, CancellationToken::new(), Gate::open()).await;
        let base = format!("{base}/api/jobs/w-huge/logs");

        for query in ["?tail=500", "", "?download=true"] {
            let response = reqwest::get(format!("{base}{query}")).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK, "{query}");
            let body = response.text().await.unwrap();
            assert!(
                body.len() as u64 <= MAX_LOG_BYTES + log_cut_note().len() as u64,
                "{query}: {} bytes",
                body.len()
            );
            assert!(body.starts_with(&log_cut_note()), "{query}: says it is cut");
            assert!(body.ends_with("xxend\n"), "{query}: the end of the log");
        }
    }

    /// A worker that writes six lines, then waits until `release` exists in its
    /// directory, writes `last` and exits.
    fn held_worker(dir: &std::path::Path) -> LocalLauncher {
        let script = dir.join("held-worker");
        std::fs::write(
            &script,
            format!(
                // Gone with its test's directory, released or not.
                "#!/bin/sh\nfor n in 1 2 3 4 5 6; do echo \"line $n\"; done\nwhile [ -d '{0}' ] && [ ! -e '{0}/release' ]; do sleep 0.02; done\necho last\n",
                dir.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        LocalLauncher::new(script, dir.join("workers")).unwrap()
    }

    /// The scaler's routes behind `gate` over the real server, on the local launcher.
    async fn serve_logs(
        launcher: LocalLauncher,
        stop: CancellationToken,
        gate: Gate,
    ) -> (String, tokio::task::JoinHandle<std::io::Result<()>>) {
        let ledger = spillway_ledger::Ledger::open("postgres://127.0.0.1:1/none", 1).unwrap();
        let state = HttpState {
            bus: Bus::new(Arc::default(), &JobsConfig::default()),
            metrics: Arc::new(Metrics::new()),
            launcher: Arc::new(launcher),
            reports: Arc::default(),
            ledger: ledger.clone(),
            job_types: Arc::default(),
            stop: stop.clone(),
        };
        let pages = DashboardState {
            board: Arc::default(),
            page: Arc::new(Page::new(2000)),
            ledger,
            producer: crate::dashboard::operations::Producer::new("http://127.0.0.1:9"),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let served = tokio::spawn(spillway_common::serve::serve(
            listener,
            app(state, pages, gate),
            Duration::from_secs(10),
            stop.cancelled_owned(),
        ));
        (base, served)
    }

    /// Every `$ref` in `value`.
    fn refs<'a>(value: &'a serde_json::Value, found: &mut Vec<&'a str>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("$ref", serde_json::Value::String(target)) => found.push(target),
                        _ => refs(value, found),
                    }
                }
            }
            serde_json::Value::Array(values) => values.iter().for_each(|v| refs(v, found)),
            _ => {}
        }
    }

    #[tokio::test]
    async fn the_openapi_document_is_served_without_a_token_and_describes_every_route() {
        use std::collections::BTreeSet;

        use spillway_common::auth::{Role, Tokens};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        Tokens::add(&path, "ops", "default", Role::Admin).unwrap();
        let gate = Gate::with_tokens(Tokens::load(&path).unwrap(), false);
        let launcher = LocalLauncher::new("/bin/true".into(), dir.path().join("workers")).unwrap();
        let (base, _served) = serve_logs(launcher, CancellationToken::new(), gate).await;

        let response = reqwest::get(format!("{base}/openapi.json")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let doc: serde_json::Value = response.json().await.unwrap();
        let version = doc["openapi"].as_str().unwrap();
        assert!(version.starts_with("3.1"), "{version}");
        assert_eq!(doc["info"]["title"], "Spillway scaler");

        // Every route the scaler serves, and nothing else.
        let served: BTreeSet<(&str, &str)> = [
            ("get", "/"),
            ("get", "/api/stats"),
            ("get", "/api/jobs"),
            ("get", "/api/batches"),
            ("get", "/api/batches/{id}"),
            ("get", "/batches/{id}"),
            ("get", "/batches/{id}/results"),
            ("get", "/dead"),
            ("post", "/batches/{id}/retry"),
            ("post", "/batches/{id}/cancel"),
            ("get", "/api/events"),
            ("get", "/api/summary"),
            ("get", "/healthz"),
            ("get", "/readyz"),
            ("get", "/metrics"),
            ("get", "/api/jobs/{name}/logs"),
            ("post", "/job-types/{name}/pause"),
            ("post", "/job-types/{name}/resume"),
            ("get", "/login"),
            ("post", "/login"),
            ("post", "/logout"),
        ]
        .into_iter()
        .collect();
        let paths = doc["paths"].as_object().unwrap();
        let documented: BTreeSet<(&str, &str)> = paths
            .iter()
            .flat_map(|(path, item)| {
                item.as_object()
                    .unwrap()
                    .keys()
                    .filter(|key| ["get", "post", "put", "delete", "patch"].contains(&key.as_str()))
                    .map(move |method| (method.as_str(), path.as_str()))
            })
            .collect();
        assert_eq!(documented, served);

        let operations: Vec<&serde_json::Value> = served
            .iter()
            .map(|(method, path)| &doc["paths"][path][method])
            .collect();
        let ids: BTreeSet<&str> = operations
            .iter()
            .map(|op| op["operationId"].as_str().unwrap())
            .collect();
        assert_eq!(
            ids.len(),
            operations.len(),
            "operation ids are unique: {ids:?}"
        );
        let mut targets = Vec::new();
        refs(&doc, &mut targets);
        for target in targets {
            let name = target.strip_prefix("#/components/schemas/").unwrap();
            assert!(
                doc["components"]["schemas"].get(name).is_some(),
                "{target} is in the document"
            );
        }

        // A token where the gate asks for one, and a 401 without it; none on probes.
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        let stats = &doc["paths"]["/api/stats"]["get"];
        assert_eq!(stats["security"], json!([{"bearer": []}]));
        assert!(stats["responses"].get("401").is_some(), "{stats}");
        let healthz = &doc["paths"]["/healthz"]["get"];
        assert!(healthz.get("security").is_none(), "{healthz}");
        assert!(healthz["responses"].get("401").is_none(), "{healthz}");
    }

    /// Reads `response` until `wanted` is in what came (or the body ends).
    async fn read_until(response: &mut reqwest::Response, body: &mut String, wanted: &str) {
        tokio::time::timeout(Duration::from_secs(30), async {
            while !body.contains(wanted) {
                match response.chunk().await.unwrap() {
                    Some(chunk) => body.push_str(&String::from_utf8_lossy(&chunk)),
                    None => return,
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{wanted:?} within 30 s: {body}"));
    }

    #[tokio::test]
    async fn a_followed_log_streams_each_line_as_an_event_then_ends_with_the_worker() {
        let dir = tempfile::tempdir().unwrap();
        let launcher = held_worker(dir.path());
        launcher.spawn("default", "w-held").await.unwrap();
        let stop = CancellationToken::new();
        let (base, served) = serve_logs(launcher, stop.clone(), Gate::open()).await;

        let mut response = reqwest::get(format!("{base}/api/jobs/w-held/logs?follow=1"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/event-stream"
        );
        let mut body = String::new();
        read_until(&mut response, &mut body, "line 6").await;
        assert!(!body.contains("event: end"), "still running: {body}");
        // Written while it is followed: it comes as an event, then the end.
        std::fs::write(dir.path().join("release"), "").unwrap();
        read_until(&mut response, &mut body, "event: end").await;
        let data: Vec<&str> = body
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        let mut expected: Vec<String> = (1..=6).map(|n| format!("line {n}")).collect();
        expected.push("last".into());
        assert_eq!(data[..7], expected[..], "{body}");
        assert!(body.contains("event: end\ndata: end of the log"), "{body}");

        // The terminal's view of the same stream: dashboard.sh logs -f prints the lines
        // and returns once the worker has ended.
        let output = tokio::process::Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../dashboard.sh"))
            .args(["logs", "w-held", "-f"])
            .env("SCALER_URL", &base)
            .output()
            .await
            .unwrap();
        let printed = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{printed}");
        assert_eq!(printed.lines().collect::<Vec<_>>(), expected, "{printed}");

        let missing = reqwest::get(format!("{base}/api/jobs/w-none/logs?follow=1"))
            .await
            .unwrap();
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        let bad = reqwest::get(format!("{base}/api/jobs/w-held/logs?follow=maybe"))
            .await
            .unwrap();
        assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
        stop.cancel();
        served.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_log_followed_while_the_scaler_stops_does_not_hold_the_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let launcher = held_worker(dir.path());
        launcher.spawn("default", "w-held").await.unwrap();
        let stop = CancellationToken::new();
        let (base, served) = serve_logs(launcher, stop.clone(), Gate::open()).await;
        let mut response = reqwest::get(format!("{base}/api/jobs/w-held/logs?follow=1"))
            .await
            .unwrap();
        let mut body = String::new();
        read_until(&mut response, &mut body, "line 6").await;

        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .expect("the server stops with a follow open: its stream ends")
            .unwrap()
            .unwrap();
        std::fs::write(dir.path().join("release"), "").unwrap();
    }

    #[tokio::test]
    async fn with_tokens_the_dashboard_asks_for_one_keeps_it_in_a_cookie_and_keeps_logs_for_admins()
    {
        use spillway_common::auth::{Role, Tokens};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let admin = Tokens::add(&path, "ops", "default", Role::Admin).unwrap();
        let submitter = Tokens::add(&path, "ci", "acme", Role::Submitter).unwrap();
        let gate = Gate::with_tokens(Tokens::load(&path).unwrap(), false);
        let launcher = held_worker(dir.path());
        launcher.spawn("default", "w-held").await.unwrap();
        let (base, _served) = serve_logs(launcher, CancellationToken::new(), gate).await;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();

        // No token: the API says 401, a browser is sent to the login form.
        let api = client
            .get(format!("{base}/api/stats"))
            .send()
            .await
            .unwrap();
        assert_eq!(api.status(), StatusCode::UNAUTHORIZED);
        let browser = client
            .get(format!("{base}/"))
            .header(header::ACCEPT, "text/html")
            .send()
            .await
            .unwrap();
        assert_eq!(browser.status(), StatusCode::SEE_OTHER);
        assert_eq!(browser.headers()[header::LOCATION], "/login");
        let form = client.get(format!("{base}/login")).send().await.unwrap();
        assert!(form.text().await.unwrap().contains("name=\"token\""));
        for open in ["/healthz", "/readyz"] {
            let answer = client.get(format!("{base}{open}")).send().await.unwrap();
            assert_ne!(answer.status(), StatusCode::UNAUTHORIZED, "{open}");
        }

        // A wrong token is refused at the form; a right one is kept in a cookie.
        let wrong = client
            .post(format!("{base}/login"))
            .form(&[("token", "spw_wrong")])
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
        let logged_in = client
            .post(format!("{base}/login"))
            .form(&[("token", submitter.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(logged_in.status(), StatusCode::SEE_OTHER);
        let cookie = logged_in.headers()[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
            "{cookie}"
        );
        let session = cookie.split(';').next().unwrap().to_string();
        let stats = client
            .get(format!("{base}/api/stats"))
            .header(header::COOKIE, &session)
            .send()
            .await
            .unwrap();
        assert_eq!(stats.status(), StatusCode::OK);

        // Worker logs and pausing are an admin's.
        for (method, path) in [
            (reqwest::Method::GET, "/api/jobs/w-held/logs"),
            (reqwest::Method::POST, "/job-types/default/pause"),
        ] {
            let refused = client
                .request(method.clone(), format!("{base}{path}"))
                .header(header::COOKIE, &session)
                .send()
                .await
                .unwrap();
            assert_eq!(refused.status(), StatusCode::FORBIDDEN, "{method} {path}");
        }
        let log = client
            .get(format!("{base}/api/jobs/w-held/logs"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap();
        assert_eq!(log.status(), StatusCode::OK);
        assert!(log.text().await.unwrap().contains("line 1"));

        // dashboard.sh: told to set SPILLWAY_TOKEN without one, served with one.
        let dashboard_sh = |token: Option<&str>| {
            let mut command = tokio::process::Command::new("bash");
            command
                .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../dashboard.sh"))
                .args(["logs", "w-held", "--tail", "1"])
                .env("SCALER_URL", &base)
                .env_remove("SPILLWAY_TOKEN");
            if let Some(token) = token {
                command.env("SPILLWAY_TOKEN", token);
            }
            command.output()
        };
        let without = dashboard_sh(None).await.unwrap();
        assert!(!without.status.success());
        assert!(String::from_utf8_lossy(&without.stderr).contains("set SPILLWAY_TOKEN"));
        let with = dashboard_sh(Some(&admin)).await.unwrap();
        assert!(with.status.success(), "{with:?}");
        assert_eq!(String::from_utf8_lossy(&with.stdout).trim(), "line 6");
        std::fs::write(dir.path().join("release"), "").unwrap();
    }
}
