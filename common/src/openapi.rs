//! The OpenAPI document each service serves at `/openapi.json`.
//!
//! Each service builds its routes and its document together, from its handlers'
//! `#[utoipa::path]` annotations (utoipa-axum's `routes!`), so a route cannot go
//! undocumented; [`finish`] then adds what every Spillway service shares: its title,
//! the bearer-token scheme, and, on every operation the [`Gate`] does not leave open,
//! that a token is required and that a request without one is answered 401.

use axum::{Router, http::header, routing::get};
use serde::Serialize;
use utoipa::{
    PartialSchema, ToSchema,
    openapi::{
        Components, ContentBuilder, OpenApi, Ref, RefOr, Response, ResponseBuilder,
        path::Operation,
        security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme},
    },
};

use crate::auth::Gate;

/// Where the document is served, open to anyone.
pub const PATH: &str = "/openapi.json";

/// The name of the bearer-token scheme in the document.
const BEARER: &str = "bearer";

/// What every failed request answers: a JSON object whose `error` says what went
/// wrong (some answers say more, in fields their operation documents).
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for a person to read.
    pub error: String,
}

/// What a probe (`/healthz`, `/readyz`) answers when it passes.
#[derive(Debug, Serialize, ToSchema)]
pub struct Probe {
    /// `ok` from `/healthz` (the process serves requests), `ready` from `/readyz`.
    #[schema(example = "ok")]
    pub status: &'static str,
}

/// `doc` as served: titled, versioned, with the bearer scheme, and every operation
/// not open through `gate` requiring it (answering 401 without it).
pub fn finish(mut doc: OpenApi, title: &str, description: &str, gate: &Gate) -> OpenApi {
    doc.info.title = title.to_string();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc.info.description = Some(description.to_string());
    doc.info.license = None;
    doc.info.contact = None;
    let components = doc.components.get_or_insert_with(Components::default);
    components.add_security_scheme(
        BEARER,
        SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
    );
    components
        .schemas
        .insert(ErrorBody::name().into(), ErrorBody::schema());
    let bad_parameter =
        error_response("A query or path parameter that cannot be what the operation asks for");
    let unauthorized = error_response(
        "No token, or not a valid one (a browser asking for HTML is sent to /login instead)",
    );
    for (path, item) in doc.paths.paths.iter_mut() {
        let open = gate.is_open(path);
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for operation in operations.into_iter().flatten() {
            // The extractors ([`crate::extract`]) refuse bad parameters with 400.
            if operation.parameters.as_ref().is_some_and(|p| !p.is_empty()) {
                operation
                    .responses
                    .responses
                    .entry("400".into())
                    .or_insert_with(|| RefOr::T(bad_parameter.clone()));
            }
            if !open {
                require_token(operation, &unauthorized);
            }
        }
    }
    doc
}

/// A response of [`ErrorBody`], described.
fn error_response(description: &str) -> Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name(ErrorBody::name())))
                .build(),
        )
        .build()
}

fn require_token(operation: &mut Operation, unauthorized: &Response) {
    operation
        .security
        .get_or_insert_with(Vec::new)
        .push(SecurityRequirement::new(BEARER, Vec::<String>::new()));
    operation
        .responses
        .responses
        .entry("401".into())
        .or_insert_with(|| RefOr::T(unauthorized.clone()));
}

/// A router serving `doc` at [`PATH`], serialised once.
pub fn route<S: Clone + Send + Sync + 'static>(doc: &OpenApi) -> Router<S> {
    let body =
        axum::body::Bytes::from(serde_json::to_vec(doc).expect("an OpenAPI document is JSON"));
    Router::new().route(
        PATH,
        get(move || async move { ([(header::CONTENT_TYPE, "application/json")], body) }),
    )
}
