//! Query and path extractors whose refusals are JSON, like every other error a Spillway
//! service answers (axum's own answer in plain text).
//!
//! They also refuse a NUL byte (`%00`) anywhere in the query or the path: no value
//! Spillway keeps may hold one (PostgreSQL text cannot), so such a request is the
//! client's mistake, answered 400 before it reaches the ledger.

use axum::{
    Json,
    extract::FromRequestParts,
    http::{StatusCode, request::Parts},
    response::{IntoResponse, Response},
};
use serde::de::DeserializeOwned;

use crate::openapi::ErrorBody;

/// The query string, deserialised as `T`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Query<T>(pub T);

/// The path's parameters, deserialised as `T`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Path<T>(pub T);

/// A query or path that cannot be what the operation asks for: 400, saying why.
#[derive(Debug)]
pub struct BadRequest(pub String);

impl IntoResponse for BadRequest {
    fn into_response(self) -> Response {
        (StatusCode::BAD_REQUEST, Json(ErrorBody { error: self.0 })).into_response()
    }
}

/// Whether percent-encoded `text` holds a NUL byte.
fn holds_nul(text: &str) -> bool {
    text.as_bytes()
        .windows(3)
        .any(|w| w[0] == b'%' && w[1] == b'0' && w[2] == b'0')
}

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = BadRequest;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        if parts.uri.query().is_some_and(holds_nul) {
            return Err(BadRequest("the query holds a NUL byte (%00)".into()));
        }
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|query| Query(query.0))
            .map_err(|rejection| BadRequest(rejection.body_text()))
    }
}

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = BadRequest;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        if holds_nul(parts.uri.path()) {
            return Err(BadRequest("the path holds a NUL byte (%00)".into()));
        }
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|path| Path(path.0))
            .map_err(|rejection| BadRequest(rejection.body_text()))
    }
}

#[cfg(test)]
mod tests {
    use axum::{Router, body::Body, http::Request, routing::get};
    use serde::Deserialize;
    use tower::ServiceExt as _;

    use super::*;

    #[derive(Deserialize)]
    struct Paging {
        limit: Option<u32>,
    }

    async fn answer(uri: &str) -> (StatusCode, serde_json::Value) {
        let app = Router::new().route(
            "/items/{id}",
            get(
                |Path(id): Path<String>, Query(paging): Query<Paging>| async move {
                    format!("{id} {:?}", paging.limit)
                },
            ),
        );
        let response = app
            .oneshot(Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let body = serde_json::from_slice(&body)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&body).into()));
        (status, body)
    }

    #[tokio::test]
    async fn refusals_are_json_and_nul_bytes_are_refused() {
        assert_eq!(answer("/items/a?limit=3").await.0, StatusCode::OK);
        for (uri, says) in [
            ("/items/a?limit=many", "limit"),
            ("/items/a?limit=1&limit=2", "limit"),
            ("/items/a%00b", "NUL"),
            ("/items/a?limit=1&x=%00", "NUL"),
        ] {
            let (status, body) = answer(uri).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {body}");
            assert!(
                body["error"].as_str().is_some_and(|e| e.contains(says)),
                "{uri}: {body}"
            );
        }
    }
}
