//! The batches the dashboard shows, read from the ledger (PostgreSQL) on every
//! request: the batch table (`/api/batches`), a batch's page (`/batches/{id}`, and
//! its figures as JSON at `/api/batches/{id}`) and its results download
//! (`/batches/{id}/results`).
//!
//! The scaler keeps no batch of its own: what it shows is what the ledger holds, so
//! every figure is the same after the producer, the scaler, a worker or PostgreSQL
//! restarts. The scaler scales without the ledger (its decisions read RabbitMQ), so
//! an unreachable ledger is not a readiness failure: these answers say so instead
//! (503 with the JSON error, a banner on the pages). A read waits at most
//! [`LEDGER_READ_TIMEOUT`], so a PostgreSQL that does not answer never holds a page
//! for long.

use std::{future::Future, time::Duration};

use axum::{
    Extension, Json,
    body::Body,
    extract::State,
    http::{StatusCode, header},
    response::{Html, IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use spillway_common::{
    auth::Principal,
    extract::{Path, Query},
    openapi::ErrorBody,
};
use spillway_ledger::{
    BatchFilter, BatchRecord, Ledger, RowStatus, batches::DeadRow, results::Format,
};

use utoipa::{IntoParams, ToSchema};

use super::DashboardState;
use crate::http::ApiError;

/// Batches the table shows, newest first; the producer's `GET /batches` pages
/// through all of them.
pub const BATCHES_SHOWN: u32 = 50;
/// Dead rows a batch's page lists; the results download has every one.
pub const DEAD_ROWS_SHOWN: u32 = 100;
/// Longest a dashboard answer waits for the ledger: the pool itself retries a refused
/// connection for 5 s, longer than the page's refresh.
pub const LEDGER_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// A batch as the dashboard shows it: the ledger's record and what follows from it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct BatchView {
    #[serde(flatten)]
    pub record: BatchRecord,
    /// Rows settled per second since the first row was.
    pub rows_per_second: Option<f64>,
    /// Seconds until every row is settled at that rate, while the batch runs.
    pub eta_seconds: Option<f64>,
    /// Share of rows with a final outcome (done, dead or cancelled), 0.0 to 1.0.
    pub progress: f64,
}

impl BatchView {
    pub fn of(record: BatchRecord) -> Self {
        let finished = record.done + record.dead + record.cancelled;
        BatchView {
            rows_per_second: record.rows_per_second(),
            eta_seconds: record.eta_seconds(),
            progress: if record.rows == 0 {
                1.0
            } else {
                (finished as f64 / record.rows as f64).min(1.0)
            },
            record,
        }
    }
}

/// The batch table: the newest batches, and whether older ones exist.
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema)]
pub struct BatchesView {
    pub batches: Vec<BatchView>,
    /// Older batches exist beyond [`BATCHES_SHOWN`].
    pub more: bool,
}

/// A batch's page: its figures and its first dead rows.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct BatchPage {
    pub batch: BatchView,
    /// The first [`DEAD_ROWS_SHOWN`] dead rows, in line order.
    pub dead_rows: Vec<DeadRow>,
}

/// `what`, read from the ledger within [`LEDGER_READ_TIMEOUT`].
pub(crate) async fn read<T>(
    what: impl Future<Output = spillway_ledger::Result<T>>,
) -> Result<T, ApiError> {
    match tokio::time::timeout(LEDGER_READ_TIMEOUT, what).await {
        Ok(read) => Ok(read?),
        Err(_) => Err(ApiError::LedgerSilent(LEDGER_READ_TIMEOUT)),
    }
}

/// The newest batches in the ledger that `principal` may see.
pub async fn newest(ledger: &Ledger, principal: &Principal) -> Result<BatchesView, ApiError> {
    let filter = BatchFilter {
        limit: BATCHES_SHOWN + 1,
        tenant: principal.tenant_filter().map(str::to_string),
        ..BatchFilter::default()
    };
    let mut batches = read(ledger.batches(&filter)).await?;
    let more = batches.len() > BATCHES_SHOWN as usize;
    batches.truncate(BATCHES_SHOWN as usize);
    Ok(BatchesView {
        batches: batches.into_iter().map(BatchView::of).collect(),
        more,
    })
}

/// Batch `id` if `principal` may see it: another tenant's is no batch at all.
async fn visible(
    ledger: &Ledger,
    principal: &Principal,
    id: &str,
) -> Result<BatchRecord, ApiError> {
    read(ledger.batch(id))
        .await?
        .filter(|b| principal.sees(&b.tenant))
        .ok_or_else(|| ApiError::NoSuchBatch(id.to_string()))
}

/// A batch and its first dead rows.
async fn page_of(ledger: &Ledger, principal: &Principal, id: &str) -> Result<BatchPage, ApiError> {
    let record = visible(ledger, principal, id).await?;
    let dead_rows = if record.dead == 0 {
        Vec::new()
    } else {
        read(ledger.dead_rows(id, DEAD_ROWS_SHOWN)).await?
    };
    Ok(BatchPage {
        batch: BatchView::of(record),
        dead_rows,
    })
}

/// The newest batches the token may see (its tenant's; every tenant's for an admin).
#[utoipa::path(
    get,
    path = "/api/batches",
    tag = "batches",
    operation_id = "list_batches",
    responses(
        (status = 200, description = "The newest batches, newest first, and whether older ones exist.", body = BatchesView),
        (status = 500, description = "The ledger failed to answer.", body = ErrorBody),
        (status = 503, description = "PostgreSQL cannot be reached, or did not answer in time.", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<DashboardState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<BatchesView>, ApiError> {
    Ok(Json(newest(&state.ledger, &principal).await?))
}

/// A batch's figures and its first dead rows.
#[utoipa::path(
    get,
    path = "/api/batches/{id}",
    tag = "batches",
    operation_id = "get_batch",
    params(("id" = String, Path, description = "The batch's id, as the producer gave it.")),
    responses(
        (status = 200, description = "The batch, and its first dead rows in line order.", body = BatchPage),
        (status = 400, description = "The path cannot be read: it holds a NUL byte (`%00`), or is not UTF-8 once decoded.", body = ErrorBody),
        (status = 404, description = "No such batch that this token may see.", body = ErrorBody),
        (status = 500, description = "The ledger failed to answer.", body = ErrorBody),
        (status = 503, description = "PostgreSQL cannot be reached, or did not answer in time.", body = ErrorBody),
    )
)]
pub async fn get(
    State(state): State<DashboardState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<BatchPage>, ApiError> {
    Ok(Json(page_of(&state.ledger, &principal, &id).await?))
}

/// The batch's page.
///
/// When the ledger cannot say, a page that says why, with the error's status.
#[utoipa::path(
    get,
    path = "/batches/{id}",
    tag = "batches",
    operation_id = "batch_page",
    params(("id" = String, Path, description = "The batch's id, as the producer gave it.")),
    responses(
        (status = 200, description = "The batch's page: its figures, its first dead rows and its results download.", body = String, content_type = "text/html"),
        (status = 400, description = "The path cannot be read: it holds a NUL byte (`%00`), or is not UTF-8 once decoded.", body = ErrorBody),
        (status = 404, description = "A page saying there is no such batch that this token may see.", body = String, content_type = "text/html"),
        (
            status = 500,
            description = "A page saying the ledger failed; or, when the page itself cannot be rendered, the JSON error.",
            content((String = "text/html"), (ErrorBody = "application/json")),
        ),
        (status = 503, description = "A page saying PostgreSQL cannot be reached or did not answer in time; it refreshes itself.", body = String, content_type = "text/html"),
    )
)]
pub async fn page(
    State(state): State<DashboardState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Response {
    let (status, rendered) = match page_of(&state.ledger, &principal, &id).await {
        Ok(page) => (StatusCode::OK, state.page.render_batch(&id, Ok(&page))),
        Err(error) => (error.status(), state.page.render_batch(&id, Err(&error))),
    };
    match rendered {
        Ok(html) => (status, Html(html)).into_response(),
        Err(error) => {
            tracing::error!(%error, "cannot render a batch's page");
            ApiError::Render(error.to_string()).into_response()
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ResultsQuery {
    /// Only the rows of this status (`dead`, say); every row without it.
    #[param(value_type = Option<RowStatus>, inline)]
    status: Option<String>,
}

/// The batch's rows and their outcomes, as CSV.
///
/// Every row with its outcome and result, in line order, streamed from PostgreSQL.
#[utoipa::path(
    get,
    path = "/batches/{id}/results",
    tag = "batches",
    operation_id = "batch_results",
    params(("id" = String, Path, description = "The batch's id, as the producer gave it."), ResultsQuery),
    responses(
        (
            status = 200,
            description = "The rows as a CSV download: the batch's own columns, then each row's line, status, result, error and attempts.",
            body = String,
            content_type = "text/csv",
            headers(("Content-Disposition" = String, description = "`attachment; filename=\"<id>-results.csv\"`, the id keeping only letters, digits, `-` and `_`.")),
        ),
        (status = 400, description = "`status` is not a row status (the error names them), or the path or the query cannot be read (a NUL byte, say).", body = ErrorBody),
        (status = 404, description = "No such batch that this token may see.", body = ErrorBody),
        (status = 500, description = "The ledger failed to answer.", body = ErrorBody),
        (status = 503, description = "PostgreSQL cannot be reached, or did not answer in time.", body = ErrorBody),
    )
)]
pub async fn results(
    State(state): State<DashboardState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    Query(query): Query<ResultsQuery>,
) -> Result<Response, ApiError> {
    let status: Option<RowStatus> = query
        .status
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(ApiError::BadQuery)?;
    let record = visible(&state.ledger, &principal, &id).await?;
    let download = read(state.ledger.results(&record, Format::Csv, status)).await?;
    // The id is the producer's, but a file name is no place to find out otherwise.
    let name: String = record
        .batch_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        .collect();
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}-results.csv\""),
            ),
        ],
        Body::from_stream(download),
    )
        .into_response())
}

#[cfg(test)]
pub(crate) mod tests {
    use spillway_ledger::BatchState;

    use super::*;

    /// A batch record with `rows` rows, `done` and `dead` of them settled.
    pub(crate) fn record(
        id: &str,
        state: BatchState,
        rows: u64,
        done: u64,
        dead: u64,
    ) -> BatchRecord {
        BatchRecord {
            batch_id: id.into(),
            tenant: "default".into(),
            job_type: "default".into(),
            queue: "tasks".into(),
            file_name: Some("data.csv".into()),
            header: vec!["n".into()],
            state,
            error: None,
            rows,
            published: rows,
            pending: rows - done - dead,
            failed: 0,
            done,
            dead,
            cancelled: 0,
            received_at: "2026-12-01T06:00:00.000Z".into(),
            published_at: Some("2026-12-01T06:00:01.000Z".into()),
            started_at: Some("2026-12-01T06:00:02.000Z".into()),
            finished_at: None,
            seconds_running: Some(10.0),
            callback_url: None,
            callback: None,
        }
    }

    #[test]
    fn a_view_adds_rate_eta_and_progress_to_the_record() {
        // name, record, rows per second, eta, progress
        let cases = [
            (
                "running: 40 of 100 settled in 10 s is 4 rows/s, 60 left is 15 s",
                record("b", BatchState::Running, 100, 30, 10),
                Some(4.0),
                Some(15.0),
                0.4,
            ),
            (
                "finished: a rate, no eta",
                record("b", BatchState::Done, 100, 100, 0),
                Some(10.0),
                None,
                1.0,
            ),
            (
                "queued, nothing settled: neither",
                BatchRecord {
                    seconds_running: None,
                    ..record("b", BatchState::Queued, 100, 0, 0)
                },
                None,
                None,
                0.0,
            ),
            (
                "no rows is finished",
                record("b", BatchState::Done, 0, 0, 0),
                None,
                None,
                1.0,
            ),
        ];
        for (name, record, rate, eta, progress) in cases {
            let view = BatchView::of(record);
            assert_eq!(view.rows_per_second, rate, "{name}");
            assert_eq!(view.eta_seconds, eta, "{name}");
            assert_eq!(view.progress, progress, "{name}");
        }
    }
}
