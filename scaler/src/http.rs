//! The scaler's HTTP endpoints: the dashboard and its JSON API ([`crate::dashboard`]),
//! `/api/jobs/{name}/logs` (a worker's log, through its launcher), `/healthz`,
//! `/readyz` (connected to RabbitMQ) and `/metrics`.
//! Errors are JSON, like every Spillway service's.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::json;

use serde::Deserialize;

use crate::{
    bus::Bus,
    dashboard::{self, DashboardState},
    launcher::{Launcher, LauncherError},
    metrics::Metrics,
};

pub struct HttpState<L> {
    pub bus: Arc<Bus>,
    pub metrics: Arc<Metrics>,
    pub launcher: Arc<L>,
}

/// Every route: the dashboard and its API, logs, probes and metrics.
pub fn app<L: Launcher>(state: HttpState<L>, dashboard: DashboardState) -> Router {
    let pages = Router::new()
        .route("/", get(dashboard::index))
        .route("/api/stats", get(dashboard::stats))
        .route("/api/jobs", get(dashboard::jobs))
        .route("/api/batches", get(dashboard::batches))
        .route("/api/events", get(dashboard::events))
        .route("/api/summary", get(dashboard::summary))
        .with_state(dashboard);
    router(state).merge(pages)
}

impl<L> Clone for HttpState<L> {
    fn clone(&self) -> Self {
        HttpState {
            bus: Arc::clone(&self.bus),
            metrics: Arc::clone(&self.metrics),
            launcher: Arc::clone(&self.launcher),
        }
    }
}

fn router<L: Launcher>(state: HttpState<L>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz::<L>))
        .route("/metrics", get(metrics::<L>))
        .route("/api/jobs/{name}/logs", get(logs::<L>))
        .fallback(|| async { (StatusCode::NOT_FOUND, Json(json!({"error": "not found"}))) })
        .with_state(state)
}

async fn readyz<L>(State(state): State<HttpState<L>>) -> Response {
    if state.bus.connected() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "not connected to RabbitMQ"})),
        )
            .into_response()
    }
}

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

#[derive(Debug, Deserialize)]
struct LogQuery {
    /// Only the last this many lines.
    tail: Option<u32>,
    /// Serve as a file download.
    #[serde(default)]
    download: bool,
}

async fn logs<L: Launcher>(
    State(state): State<HttpState<L>>,
    Path(name): Path<String>,
    Query(query): Query<LogQuery>,
) -> Response {
    match state.launcher.logs(&name, query.tail).await {
        Ok(text) => {
            let mut response =
                ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response();
            if query.download
                && let Ok(value) = format!("attachment; filename=\"{name}.log\"").parse()
            {
                response
                    .headers_mut()
                    .insert(header::CONTENT_DISPOSITION, value);
            }
            response
        }
        Err(error @ LauncherError::NoSuchWorker(_)) => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": error.to_string()})),
        )
            .into_response(),
        Err(error) => (
            StatusCode::BAD_GATEWAY,
            Json(json!({"error": error.to_string()})),
        )
            .into_response(),
    }
}
