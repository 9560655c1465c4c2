//! The batches API: every batch the ledger holds, its progress, its results.
//!
//! `GET /batches` lists batches newest first (paged with `limit` and `before`,
//! filtered by `state` and `job_type`); `GET /batches/{id}` shows one with its counts,
//! rows per second and, while it runs, an estimate of the time to finish;
//! `GET /batches/{id}/results` streams every row with its outcome, CSV by default or
//! JSON Lines (`?format=jsonl`), optionally only rows of one `status`;
//! `DELETE /batches/{id}` removes a finished batch; `POST /batches/{id}/retry`
//! publishes the batch's dead rows again ([`retry`]); `POST /batches/{id}/cancel`
//! cancels an unfinished one ([`cancel`]). All of it reads the ledger, so
//! the answers are the same after any process restarts.

use std::{
    collections::HashSet,
    sync::{Arc, atomic::AtomicU64},
};

use axum::{
    Extension, Json,
    body::Body,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use spillway_common::events::{BatchPublishing, publishing_routing_key};
use spillway_common::{
    auth::Principal,
    extract::{Path, Query},
};
use spillway_ledger::{
    BatchFilter, BatchRecord, BatchState, RowStatus,
    batches::Deleted,
    cancel::{CancelAnswer, CancelRefused},
    results::Format,
    retry::{Retried, RetryRefused},
};

use utoipa::{IntoParams, ToSchema};

use crate::{
    broker::Broker,
    ingest::{publish, resume::LedgerRows},
    routes::{ApiError, AppState, ErrorAnswer},
};

/// Whether `principal` may see batch `id`: an admin any, a submitter its tenant's. A
/// batch of another tenant is answered as no batch at all, so that ids do not leak.
async fn visible(state: &AppState, principal: &Principal, id: &str) -> Result<(), ApiError> {
    if principal.is_admin() {
        return Ok(());
    }
    match state.ledger.batch_tenant(id).await? {
        Some(tenant) if principal.sees(&tenant) => Ok(()),
        _ => Err(ApiError::NoSuchBatch(id.to_string())),
    }
}

/// Most batches one page lists.
const MAX_PAGE: u32 = 500;
const DEFAULT_PAGE: u32 = 50;

/// A batch as the API shows it: the ledger's record and what follows from it.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchView {
    #[serde(flatten)]
    pub record: BatchRecord,
    /// Rows settled per second since the first row was.
    pub rows_per_second: Option<f64>,
    /// Seconds until every row is settled at that rate, while the batch runs.
    pub eta_seconds: Option<f64>,
}

impl BatchView {
    pub fn of(record: BatchRecord) -> Self {
        BatchView {
            rows_per_second: record.rows_per_second(),
            eta_seconds: record.eta_seconds(),
            record,
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only batches in this state.
    #[param(value_type = Option<BatchState>, inline)]
    state: Option<String>,
    /// Only batches of this job type.
    job_type: Option<String>,
    /// Only batches older than this one: the `next_before` of the previous page.
    before: Option<String>,
    /// Most batches to list, 1 to 500 (50 by default).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
}

/// One page of batches, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchPage {
    pub batches: Vec<BatchView>,
    /// Pass as `before` for the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_before: Option<String>,
}

/// `GET /batches`: the batches this token may see, newest first, a page at a time.
#[utoipa::path(get, operation_id = "list_batches", path = "/batches", tag = "batches", params(ListQuery),
    responses(
        (status = 200, description = "A page of batches", body = BatchPage),
        (status = 400, description = "A filter or limit that cannot be", body = ErrorAnswer),
        (status = 503, description = "PostgreSQL is out of reach", body = ErrorAnswer),
    ))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    Query(query): Query<ListQuery>,
) -> Result<Json<BatchPage>, ApiError> {
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::BadQuery(format!(
            "limit must be between 1 and {MAX_PAGE}, not {limit}"
        )));
    }
    let filter = BatchFilter {
        state: query
            .state
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(ApiError::BadQuery)?,
        job_type: query.job_type,
        tenant: principal.tenant_filter().map(str::to_string),
        before: query.before,
        limit,
    };
    let batches = state.ledger.batches(&filter).await?;
    let next_before = (batches.len() == limit as usize)
        .then(|| batches.last().map(|b| b.batch_id.clone()))
        .flatten();
    Ok(Json(BatchPage {
        batches: batches.into_iter().map(BatchView::of).collect(),
        next_before,
    }))
}

/// `GET /batches/{id}`: one batch, its counts and progress.
#[utoipa::path(get, operation_id = "get_batch", path = "/batches/{id}", tag = "batches",
    params(("id" = String, Path, description = "The batch's id, as its upload answered")),
    responses(
        (status = 200, description = "The batch", body = BatchView),
        (status = 404, description = "No such batch (or another tenant's)", body = ErrorAnswer),
        (status = 503, description = "PostgreSQL is out of reach", body = ErrorAnswer),
    ))]
pub async fn get(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<BatchView>, ApiError> {
    let record = state
        .ledger
        .batch(&id)
        .await?
        .filter(|b| principal.sees(&b.tenant))
        .ok_or(ApiError::NoSuchBatch(id))?;
    Ok(Json(BatchView::of(record)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ResultsQuery {
    /// `csv` (the default) or `jsonl`.
    #[param(value_type = Option<ResultsFormat>, inline)]
    format: Option<String>,
    /// Only rows of this status.
    #[param(value_type = Option<RowStatus>, inline)]
    status: Option<String>,
}

/// The formats results download in: the parameter's documented values.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[expect(
    dead_code,
    reason = "only its schema is used: the query holds the text"
)]
enum ResultsFormat {
    Csv,
    Jsonl,
}

/// `GET /batches/{id}/results`: every row in line order with its outcome, streamed.
#[utoipa::path(get, operation_id = "batch_results", path = "/batches/{id}/results", tag = "batches",
    params(("id" = String, Path, description = "The batch's id"), ResultsQuery),
    responses(
        (status = 200, description = "The original columns, then spillway_line, spillway_status, spillway_result, spillway_error and spillway_attempts; as a file download",
            content((String = "text/csv"), (String = "application/jsonl"))),
        (status = 400, description = "An unknown format or status", body = ErrorAnswer),
        (status = 404, description = "No such batch (or another tenant's)", body = ErrorAnswer),
        (status = 503, description = "PostgreSQL is out of reach", body = ErrorAnswer),
    ))]
pub async fn results(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    Query(query): Query<ResultsQuery>,
) -> Result<Response, ApiError> {
    let (format, content_type, extension) = match query.format.as_deref() {
        None | Some("csv") => (Format::Csv, "text/csv; charset=utf-8", "csv"),
        Some("jsonl") => (
            Format::JsonLines,
            "application/jsonl; charset=utf-8",
            "jsonl",
        ),
        Some(other) => {
            return Err(ApiError::BadQuery(format!(
                "unknown format {other:?}: csv or jsonl"
            )));
        }
    };
    let status: Option<RowStatus> = query
        .status
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(ApiError::BadQuery)?;
    let record = state
        .ledger
        .batch(&id)
        .await?
        .filter(|b| principal.sees(&b.tenant))
        .ok_or(ApiError::NoSuchBatch(id))?;
    let download = state.ledger.results(&record, format, status).await?;
    let disposition = format!(
        "attachment; filename=\"{}-results.{extension}\"",
        record.batch_id
    );
    Ok((
        [
            (header::CONTENT_TYPE, content_type.to_string()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        Body::from_stream(download),
    )
        .into_response())
}

/// `DELETE /batches/{id}`: a finished batch and its rows out of the ledger.
#[utoipa::path(delete, operation_id = "delete_batch", path = "/batches/{id}", tag = "batches",
    params(("id" = String, Path, description = "The batch's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such batch (or another tenant's)", body = ErrorAnswer),
        (status = 409, description = "The batch is not finished: rows of it may still run", body = ErrorAnswer),
        (status = 503, description = "PostgreSQL is out of reach", body = ErrorAnswer),
    ))]
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    visible(&state, &principal, &id).await?;
    match state.ledger.delete_batch(&id).await? {
        Deleted::Deleted => Ok(StatusCode::NO_CONTENT.into_response()),
        Deleted::NotFound => Err(ApiError::NoSuchBatch(id)),
        Deleted::Unfinished(state) => Err(ApiError::Unfinished {
            batch_id: id,
            state,
        }),
    }
}

/// `POST /batches/{id}/retry`: every dead row of the batch back to pending, attempts
/// reset, out of the dead queue and published again, once.
///
/// In this order, each step safe to repeat: the ledger moves the dead rows to pending
/// and lists them (one transaction); their copies leave the dead queue; the listed
/// rows are published with confirms; the list is emptied. Calling it again after an
/// interruption at any point finishes the job.
#[utoipa::path(post, operation_id = "retry_batch", path = "/batches/{id}/retry", tag = "batches",
    params(("id" = String, Path, description = "The batch's id")),
    responses(
        (status = 200, description = "The dead rows are published again", body = Retried),
        (status = 404, description = "No such batch (or another tenant's), or its job type is no longer configured", body = ErrorAnswer),
        (status = 409, description = "The batch was never published", body = ErrorAnswer),
        (status = 503, description = "RabbitMQ or PostgreSQL is out of reach; calling again finishes the retry", body = ErrorAnswer),
    ))]
pub async fn retry(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Retried>, ApiError> {
    let record = state
        .ledger
        .batch(&id)
        .await?
        .filter(|b| principal.sees(&b.tenant))
        .ok_or_else(|| ApiError::NoSuchBatch(id.clone()))?;
    let job = state.jobs.job_type(&record.job_type)?;
    let retry = match state.ledger.retry_dead(&id).await? {
        Ok(retry) => retry,
        Err(RetryRefused::NotFound) => return Err(ApiError::NoSuchBatch(id)),
        Err(RetryRefused::State(batch_state)) => {
            return Err(ApiError::CannotRetry {
                batch_id: id,
                state: batch_state,
            });
        }
    };
    let mut answer = Retried {
        batch_id: id.clone(),
        retried: retry.retried,
        published: 0,
        removed_from_dead_queue: 0,
    };
    if retry.to_publish == 0 {
        return Ok(Json(answer));
    }
    let lines: HashSet<u64> = state.ledger.retry_lines(&id).await?.into_iter().collect();
    answer.removed_from_dead_queue = state
        .broker
        .remove_dead_copies(&record.queue, job.delivery_limit, &id, &lines)
        .await?;
    answer.published =
        publish_listed(&state, &record, job.delivery_limit, retry.to_publish).await?;
    tracing::info!(batch_id = %id, retried = answer.retried, published = answer.published,
        removed = answer.removed_from_dead_queue, "dead rows retried");
    Ok(Json(answer))
}

/// Publishes the rows of `record`'s batch that a retry or replay listed, with
/// confirms, and then empties the list; returns how many were published.
pub(crate) async fn publish_listed(
    state: &AppState,
    record: &BatchRecord,
    delivery_limit: u32,
    listed: u64,
) -> Result<u64, ApiError> {
    let id = &record.batch_id;
    let channel = state
        .broker
        .publishing_channel(&record.queue, delivery_limit)
        .await?;
    let announcement = BatchPublishing {
        batch_id: id.clone(),
        job_type: record.job_type.clone(),
        queue: record.queue.clone(),
        rows: listed,
    };
    let key = publishing_routing_key(&record.job_type);
    Broker::announce(&channel, &key, id, &announcement).await;
    let confirmed = AtomicU64::new(0);
    let rows = LedgerRows::retried(state.ledger.clone(), record);
    let published = publish::publish(
        rows,
        &channel,
        id,
        &record.queue,
        state.publish_window,
        &confirmed,
    )
    .await;
    let _ = channel.close(200, "listed rows published".into()).await;
    let published = published.map_err(|error| ApiError::PublishFailed {
        batch_id: id.clone(),
        rows: listed,
        published: confirmed.load(std::sync::atomic::Ordering::Relaxed),
        message: format!("retry: {error}"),
    })?;
    state.ledger.retried(id).await?;
    state.metrics.rows_published.inc_by(published);
    Ok(published)
}

/// `POST /batches/{id}/cancel`: the batch's rows not yet settled will not run.
///
/// A batch still being published stops being published within a second; rows already
/// queued are acked by workers without running; rows in a worker's hands finish.
#[utoipa::path(post, operation_id = "cancel_batch", path = "/batches/{id}/cancel", tag = "batches",
    params(("id" = String, Path, description = "The batch's id")),
    responses(
        (status = 200, description = "Cancelled: its unsettled rows will not run", body = CancelAnswer),
        (status = 404, description = "No such batch (or another tenant's)", body = ErrorAnswer),
        (status = 409, description = "The batch is finished already", body = ErrorAnswer),
        (status = 503, description = "PostgreSQL is out of reach", body = ErrorAnswer),
    ))]
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<CancelAnswer>, ApiError> {
    visible(&state, &principal, &id).await?;
    match state.ledger.cancel_batch(&id).await? {
        Ok(counts) => {
            tracing::info!(batch_id = %id, cancelled = counts.cancelled, ran = counts.ran, "batch cancelled");
            Ok(Json(CancelAnswer {
                batch_id: id,
                state: BatchState::Cancelled,
                counts,
            }))
        }
        Err(CancelRefused::NotFound) => Err(ApiError::NoSuchBatch(id)),
        Err(CancelRefused::Finished(batch_state)) => Err(ApiError::CannotCancel {
            batch_id: id,
            state: batch_state,
        }),
    }
}
