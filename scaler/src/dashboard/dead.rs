//! `GET /dead?job_type=NAME`: a job type's dead rows, a page at a time, read from the
//! ledger (where a row is `dead` exactly while its message is in the dead queue), so
//! browsing them neither consumes nor reorders the queue.

use axum::{
    Extension,
    extract::{Query, State},
    response::{Html, IntoResponse, Response},
};
use serde::Deserialize;
use spillway_common::auth::Principal;
use spillway_ledger::dead::{DeadFilter, parse_cursor};

use super::{DashboardState, batches::read};
use crate::http::ApiError;

/// Dead rows one page shows.
const PAGE: u32 = 100;

#[derive(Debug, Deserialize)]
pub struct DeadQuery {
    job_type: String,
    /// `<batch_id>:<line>` of the last row of the previous page.
    after: Option<String>,
}

pub async fn page(
    State(state): State<DashboardState>,
    Extension(principal): Extension<Principal>,
    Query(query): Query<DeadQuery>,
) -> Response {
    if !principal.is_admin() {
        return ApiError::AdminOnly("dead letters").into_response();
    }
    let rows = async {
        let after = query
            .after
            .as_deref()
            .map(parse_cursor)
            .transpose()
            .map_err(ApiError::BadQuery)?;
        read(state.ledger.dead_letters(&DeadFilter {
            job_type: query.job_type.clone(),
            batch_id: None,
            after,
            limit: PAGE,
        }))
        .await
    }
    .await;
    let status = rows
        .as_ref()
        .map_or_else(ApiError::status, |_| axum::http::StatusCode::OK);
    match state.page.render_dead(&query.job_type, rows.as_ref(), PAGE) {
        Ok(html) => (status, Html(html)).into_response(),
        Err(error) => {
            tracing::error!(%error, "cannot render the dead rows' page");
            ApiError::Render(error.to_string()).into_response()
        }
    }
}
