//! The dashboard's login: a form that takes a token and keeps it in an HttpOnly,
//! SameSite=Strict cookie (`spillway_token`), which every later request of the
//! browser carries; and a logout that clears it. Without a tokens file there is
//! nothing to log in to, and the form says so.

use axum::{
    Form,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{Html, IntoResponse, Redirect, Response},
};
use serde::Deserialize;
use spillway_common::auth::{COOKIE, Gate};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

/// `/login` (the form, and the token it posts) and `/logout`, each documented.
pub fn routes(gate: Gate) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(form, login))
        .routes(routes!(logout))
        .with_state(gate)
}

fn page(message: &str) -> Html<String> {
    Html(format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Spillway: log in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;max-width:26rem;margin:4rem auto;padding:0 1rem}}
input{{width:100%;padding:.5rem;margin:.5rem 0;box-sizing:border-box}}button{{padding:.5rem 1rem}}
.message{{color:#b00}}</style></head><body><h1>Spillway</h1>
<p class="message" id="message">{message}</p>
<form method="post" action="/login"><label for="token">Token</label>
<input id="token" name="token" type="password" autocomplete="off" required autofocus>
<button type="submit">Log in</button></form></body></html>"#
    ))
}

/// The login form, for a browser. Open to anyone.
#[utoipa::path(
    get,
    path = "/login",
    tag = "login",
    operation_id = "login_form",
    responses((
        status = 200,
        description = "The form asking for a token (saying the dashboard is open when this scaler asks for none).",
        body = String,
        content_type = "text/html",
    ))
)]
async fn form(State(gate): State<Gate>) -> Html<String> {
    if gate.needs_tokens() {
        page("")
    } else {
        page("This scaler asks for no token: the dashboard is open.")
    }
}

/// What the login form posts.
#[derive(Deserialize, ToSchema)]
struct Login {
    /// A token, as `producer token add` showed it.
    token: String,
}

/// Logs in: keeps a valid token in the dashboard's cookie.
///
/// Then sends the browser to the dashboard. Open to anyone.
#[utoipa::path(
    post,
    path = "/login",
    tag = "login",
    request_body(content = Login, content_type = "application/x-www-form-urlencoded"),
    responses(
        (
            status = 303,
            description = "The token is valid here (any is, when this scaler asks for none): it is kept in the cookie, and the browser sent to the dashboard.",
            headers(
                ("Location" = String, description = "`/`, the dashboard."),
                ("Set-Cookie" = String, description = "`spillway_token`, holding the token: HttpOnly, SameSite=Strict."),
            ),
        ),
        (status = 401, description = "Not a token, or not one this scaler knows: the form again, saying so.", body = String, content_type = "text/html"),
        (status = 415, description = "The body is not `application/x-www-form-urlencoded`.", body = String, content_type = "text/plain"),
        (status = 422, description = "The form has no `token` field.", body = String, content_type = "text/plain"),
    )
)]
async fn login(State(gate): State<Gate>, Form(login): Form<Login>) -> Response {
    let mut headers = HeaderMap::new();
    let Ok(bearer) = HeaderValue::from_str(&format!("Bearer {}", login.token.trim())) else {
        return (StatusCode::UNAUTHORIZED, page("That is not a token.")).into_response();
    };
    headers.insert(header::AUTHORIZATION, bearer);
    if gate.principal(&headers).is_none() {
        return (
            StatusCode::UNAUTHORIZED,
            page("That token is not valid here."),
        )
            .into_response();
    }
    let cookie = format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
        login.token.trim()
    );
    match HeaderValue::from_str(&cookie) {
        Ok(cookie) => ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response(),
        Err(_) => (StatusCode::UNAUTHORIZED, page("That is not a token.")).into_response(),
    }
}

/// Clears the dashboard's cookie and sends the browser to the login form.
#[utoipa::path(
    post,
    path = "/logout",
    tag = "login",
    responses((
        status = 303,
        description = "Logged out: the cookie is cleared, and the browser sent to the login form.",
        headers(
            ("Location" = String, description = "`/login`."),
            ("Set-Cookie" = String, description = "`spillway_token`, emptied and expired."),
        ),
    ))
)]
async fn logout() -> Response {
    let cleared = format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    ([(header::SET_COOKIE, cleared)], Redirect::to("/login")).into_response()
}
