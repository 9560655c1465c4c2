//! Acting on batches from the dashboard: `POST /batches/{id}/retry` and `/cancel` on
//! the scaler are the producer's own, forwarded to `PRODUCER_URL`, so the dashboard's
//! buttons and `dashboard.sh` need only the scaler's address. The producer's answer,
//! status and JSON body, is passed on as it is; a producer out of reach is a 502.

use axum::{
    Json,
    body::Body,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::json;
use spillway_common::auth::presented;

use super::DashboardState;

/// The producer as the dashboard reaches it.
#[derive(Clone)]
pub struct Producer {
    /// Its base URL, without a trailing slash.
    pub url: String,
    pub http: reqwest::Client,
}

impl Producer {
    pub fn new(url: &str) -> Self {
        Producer {
            url: url.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(600))
                .build()
                .expect("an HTTP client with a timeout builds"),
        }
    }

    /// POSTs `path` to the producer and passes its answer on.
    /// POSTs `path` to the producer with the caller's token (`token`), so that the
    /// producer applies the caller's own rights.
    async fn forward(&self, path: &str, token: Option<String>) -> Response {
        let url = format!("{}{path}", self.url);
        let answer = async {
            let mut request = self.http.post(&url);
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.send().await?;
            let status = response.status();
            let body = response.bytes().await?;
            Ok::<_, reqwest::Error>((status, body))
        };
        match answer.await {
            Ok((status, body)) => (
                StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY),
                [(header::CONTENT_TYPE, "application/json")],
                Body::from(body),
            )
                .into_response(),
            Err(error) => (
                StatusCode::BAD_GATEWAY,
                Json(json!({
                    "error": format!("cannot reach the producer at {} (PRODUCER_URL): {error}", self.url)
                })),
            )
                .into_response(),
        }
    }
}

/// `POST /batches/{id}/retry`, forwarded to the producer.
pub async fn retry(
    State(state): State<DashboardState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let path = format!("/batches/{}/retry", super::path_segment(&id));
    state.producer.forward(&path, presented(&headers)).await
}

/// `POST /batches/{id}/cancel`, forwarded to the producer.
pub async fn cancel(
    State(state): State<DashboardState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let path = format!("/batches/{}/cancel", super::path_segment(&id));
    state.producer.forward(&path, presented(&headers)).await
}
