//! Acting on batches from the dashboard: `POST /batches/{id}/retry` and `/cancel` on
//! the scaler are the producer's own, forwarded to `PRODUCER_URL`, so the dashboard's
//! buttons and `dashboard.sh` need only the scaler's address. The producer's answer,
//! status and JSON body, is passed on as it is; a producer out of reach is a 502.

use axum::{
    Json,
    body::Body,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::json;
use spillway_common::{auth::presented, extract::Path, openapi::ErrorBody};
use spillway_ledger::{cancel::CancelAnswer, retry::Retried};

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

    /// POSTs `path` to the producer with the caller's token (`token`), so that the
    /// producer applies the caller's own rights, and passes its answer on.
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

/// Retries the batch's dead rows, through the producer.
///
/// Every dead row back to pending, out of the dead queue and published again, once:
/// the producer's `POST /batches/{id}/retry`, forwarded with the caller's token.
#[utoipa::path(
    post,
    path = "/batches/{id}/retry",
    tag = "batches",
    operation_id = "retry_batch",
    params(("id" = String, Path, description = "The batch's id, as the producer gave it.")),
    responses(
        (status = 200, description = "The producer's answer: what the retry did (nothing, when no row is dead).", body = Retried),
        (status = 400, description = "The path cannot be read: it holds a NUL byte (`%00`), or is not UTF-8 once decoded.", body = ErrorBody),
        (status = 401, description = "No token, or not a valid one, at the scaler or at the producer it is forwarded to (a browser asking the scaler for HTML is sent to /login instead).", body = ErrorBody),
        (status = 404, description = "The producer knows no such batch that this token may see, or no longer its job type.", body = ErrorBody),
        (status = 409, description = "The batch is still publishing, failed to publish, or was cancelled: it cannot be retried.", body = ErrorBody),
        (status = 500, description = "The producer's ledger failed, or RabbitMQ refused the queue's declaration.", body = ErrorBody),
        (status = 502, description = "The producer cannot be reached at PRODUCER_URL.", body = ErrorBody),
        (
            status = 503,
            description = "RabbitMQ or PostgreSQL is unavailable to the producer, or publishing the rows failed part way (the error then also says `batch_id` and how many rows were `published`): calling again finishes the retry.",
            body = ErrorBody,
        ),
    )
)]
pub async fn retry(
    State(state): State<DashboardState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let path = format!("/batches/{}/retry", super::path_segment(&id));
    state.producer.forward(&path, presented(&headers)).await
}

/// Cancels the batch, through the producer.
///
/// Its rows not yet settled will not run: the producer's `POST /batches/{id}/cancel`,
/// forwarded with the caller's token.
#[utoipa::path(
    post,
    path = "/batches/{id}/cancel",
    tag = "batches",
    operation_id = "cancel_batch",
    params(("id" = String, Path, description = "The batch's id, as the producer gave it.")),
    responses(
        (status = 200, description = "The producer's answer: the batch is cancelled, with how many rows will not run and how many ran.", body = CancelAnswer),
        (status = 400, description = "The path cannot be read: it holds a NUL byte (`%00`), or is not UTF-8 once decoded.", body = ErrorBody),
        (status = 401, description = "No token, or not a valid one, at the scaler or at the producer it is forwarded to (a browser asking the scaler for HTML is sent to /login instead).", body = ErrorBody),
        (status = 404, description = "The producer knows no such batch that this token may see.", body = ErrorBody),
        (status = 409, description = "The batch is finished already: only an unfinished batch can be cancelled.", body = ErrorBody),
        (status = 500, description = "The producer's ledger failed.", body = ErrorBody),
        (status = 502, description = "The producer cannot be reached at PRODUCER_URL.", body = ErrorBody),
        (status = 503, description = "PostgreSQL is unavailable to the producer.", body = ErrorBody),
    )
)]
pub async fn cancel(
    State(state): State<DashboardState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let path = format!("/batches/{}/cancel", super::path_segment(&id));
    state.producer.forward(&path, presented(&headers)).await
}
