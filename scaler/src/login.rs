//! The dashboard's login: a form that takes a token and keeps it in an HttpOnly,
//! SameSite=Strict cookie (`spillway_token`), which every later request of the
//! browser carries; and a logout that clears it. Without a tokens file there is
//! nothing to log in to, and the form says so.

use axum::{
    Form, Router,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{Html, IntoResponse, Redirect, Response},
    routing::{get, post},
};
use serde::Deserialize;
use spillway_common::auth::{COOKIE, Gate};

pub fn routes(gate: Gate) -> Router {
    Router::new()
        .route("/login", get(form).post(login))
        .route("/logout", post(logout))
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

async fn form(State(gate): State<Gate>) -> Html<String> {
    if gate.needs_tokens() {
        page("")
    } else {
        page("This scaler asks for no token: the dashboard is open.")
    }
}

#[derive(Deserialize)]
struct Login {
    token: String,
}

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

async fn logout() -> Response {
    let cleared = format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    ([(header::SET_COOKIE, cleared)], Redirect::to("/login")).into_response()
}
