//! `GET /dead?job_type=NAME`: a job type's dead rows, a page at a time, read from the
//! ledger (where a row is `dead` exactly while its message is in the dead queue), so
//! browsing them neither consumes nor reorders the queue.

use axum::{
    Extension,
    extract::State,
    response::{Html, IntoResponse, Response},
};
use serde::Deserialize;
use spillway_common::{auth::Principal, extract::Query, openapi::ErrorBody};
use spillway_ledger::dead::{DeadFilter, parse_cursor};
use utoipa::IntoParams;

use super::{DashboardState, batches::read};
use crate::http::ApiError;

/// Dead rows one page shows.
const PAGE: u32 = 100;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeadQuery {
    /// The job type whose dead rows to list.
    job_type: String,
    /// `<batch_id>:<line>` of the last row of the previous page; the first page
    /// without it.
    after: Option<String>,
}

/// A page of a job type's dead rows (admin tokens only).
///
/// In batch and line order, read from the ledger, so that browsing them neither
/// consumes nor reorders the dead queue.
#[utoipa::path(
    get,
    path = "/dead",
    tag = "batches",
    operation_id = "dead_page",
    params(DeadQuery),
    responses(
        (status = 200, description = "The page of dead rows, linking the next page when there is one.", body = String, content_type = "text/html"),
        (
            status = 400,
            description = "A page saying `after` is not a `<batch_id>:<line>` cursor; or, when the query cannot be read at all (no `job_type`, a NUL byte), the JSON error.",
            content((String = "text/html"), (ErrorBody = "application/json")),
        ),
        (status = 403, description = "The token is not an admin's.", body = ErrorBody),
        (
            status = 500,
            description = "A page saying the ledger failed; or, when the page itself cannot be rendered, the JSON error.",
            content((String = "text/html"), (ErrorBody = "application/json")),
        ),
        (status = 503, description = "A page saying PostgreSQL cannot be reached or did not answer in time.", body = String, content_type = "text/html"),
    )
)]
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
