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
    extract::{Path, Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use spillway_common::auth::Principal;
use spillway_common::events::{BatchPublishing, publishing_routing_key};
use spillway_ledger::{
    BatchFilter, BatchRecord, RowStatus,
    batches::Deleted,
    cancel::{CancelRefused, Cancelled},
    results::Format,
    retry::RetryRefused,
};

use crate::{
    broker::Broker,
    ingest::{publish, resume::LedgerRows},
    routes::{ApiError, AppState},
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
#[derive(Debug, Serialize)]
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

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    state: Option<String>,
    job_type: Option<String>,
    before: Option<String>,
    limit: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct BatchPage {
    pub batches: Vec<BatchView>,
    /// Pass as `before` for the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_before: Option<String>,
}

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

#[derive(Debug, Deserialize)]
pub struct ResultsQuery {
    format: Option<String>,
    status: Option<String>,
}

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

/// What a retry did.
#[derive(Debug, Serialize)]
pub struct Retried {
    pub batch_id: String,
    /// Dead rows set back to pending by this call.
    pub retried: u64,
    /// Rows published again and confirmed: those, and any an interrupted retry left.
    pub published: u64,
    /// Their copies taken out of the dead queue.
    pub removed_from_dead_queue: u64,
}

/// `POST /batches/{id}/retry`: every dead row of the batch back to pending, attempts
/// reset, out of the dead queue and published again, once.
///
/// In this order, each step safe to repeat: the ledger moves the dead rows to pending
/// and lists them (one transaction); their copies leave the dead queue; the listed
/// rows are published with confirms; the list is emptied. Calling it again after an
/// interruption at any point finishes the job.
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

/// What a cancel did.
#[derive(Debug, Serialize)]
pub struct CancelAnswer {
    pub batch_id: String,
    pub state: &'static str,
    #[serde(flatten)]
    pub counts: Cancelled,
}

/// `POST /batches/{id}/cancel`: the batch's rows not yet settled will not run.
///
/// A batch still being published stops being published within a second; rows already
/// queued are acked by workers without running; rows in a worker's hands finish.
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
                state: "cancelled",
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
