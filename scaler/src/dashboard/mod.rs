//! The dashboard: one server-rendered page (`/`) that then refreshes itself in place
//! from the JSON API (`/api/stats`, `/api/jobs`, `/api/batches`, `/api/events`), with
//! no outside asset, so it works offline; and the same board as text
//! (`/api/summary`) for `dashboard.sh`.
//!
//! The template is compiled once at start. Tera escapes every value in it; the page's
//! script puts every value it fetches into the page as text, never as HTML, so a job
//! name, a log line or a CSV value containing markup shows as what it is.

pub mod summary;

use std::sync::Arc;

use axum::{
    Json,
    extract::{Query, State},
    response::{Html, IntoResponse, Response},
};
use tera::{Context, Tera};

use crate::{
    board::{BatchesView, Board, JobView, ScalingEvent, StatsView},
    http::ApiError,
};

const TEMPLATE: &str = "index.html";

/// The compiled page.
pub struct Page {
    tera: Tera,
    refresh_ms: u64,
}

impl Page {
    /// Compiles the template; `refresh_ms` is how often the page refreshes itself.
    pub fn new(refresh_ms: u64) -> Self {
        let mut tera = Tera::new();
        tera.add_raw_template(TEMPLATE, include_str!("index.html"))
            .expect("the dashboard template compiles");
        Page { tera, refresh_ms }
    }

    pub fn render(&self, board: &Board) -> Result<String, tera::Error> {
        let stats = board.stats();
        let mut context = Context::new();
        context.insert(
            "scaler_memory",
            &format!("{} resident", bytes(stats.resources.scaler_memory_bytes)),
        );
        context.insert(
            "host_memory",
            &format!(
                "{} of {}",
                bytes(stats.resources.host_memory_used_bytes),
                bytes(stats.resources.host_memory_total_bytes)
            ),
        );
        context.insert("updated", &stats.updated_unix);
        context.insert("stats", &stats);
        context.insert("jobs", &board.jobs());
        context.insert("batches", &board.batches());
        context.insert("events", &board.events());
        context.insert("refresh_ms", &self.refresh_ms);
        self.tera.render(TEMPLATE, &context)
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// What the dashboard handlers need.
#[derive(Clone)]
pub struct DashboardState {
    pub board: Arc<Board>,
    pub page: Arc<Page>,
}

pub async fn index(State(state): State<DashboardState>) -> Result<Html<String>, ApiError> {
    state.page.render(&state.board).map(Html).map_err(|error| {
        tracing::error!(%error, "cannot render the dashboard");
        ApiError::Render(error.to_string())
    })
}

pub async fn stats(State(state): State<DashboardState>) -> Json<StatsView> {
    Json(state.board.stats())
}

pub async fn jobs(State(state): State<DashboardState>) -> Json<Vec<JobView>> {
    Json(state.board.jobs())
}

pub async fn batches(State(state): State<DashboardState>) -> Json<BatchesView> {
    Json(state.board.batches())
}

pub async fn events(State(state): State<DashboardState>) -> Json<Vec<ScalingEvent>> {
    Json(state.board.events())
}

#[derive(Debug, serde::Deserialize)]
pub struct SummaryQuery {
    #[serde(default)]
    color: bool,
}

/// The board as plain text (`?color=true` for ANSI colours), for `dashboard.sh`.
pub async fn summary(
    State(state): State<DashboardState>,
    Query(query): Query<SummaryQuery>,
) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        summary::render(&state.board, query.color),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use spillway_common::events::{BatchPublished, WorkerReport};
    use spillway_testkit::builders::worker_report;

    use std::sync::Arc;

    use super::*;
    use crate::{
        board::{JobListing, JobTypeStats},
        reports::Reports,
    };

    #[test]
    fn the_page_renders_the_board_with_every_outside_value_escaped() {
        let reports = Arc::new(Reports::default());
        let board = Board::new(Arc::clone(&reports));
        board.record_batch(BatchPublished {
            batch_id: "<b>batch</b>".into(),
            job_type: "default".into(),
            queue: "tasks".into(),
            rows: 4,
            published_unix: 1,
        });
        reports.record(
            WorkerReport {
                processed: 7,
                ..worker_report("<script>alert(1)</script>")
            },
            std::time::Instant::now(),
        );
        board.record_tick(
            vec![JobTypeStats {
                job_type: "default".into(),
                queue: "tasks".into(),
                ready: Some(41),
                unacked: Some(3),
                consumed_total: Some(99),
                dead_lettered: Some(2),
                workers_active: 1,
                max_jobs: 10,
            }],
            vec![JobListing {
                name: "<script>alert(1)</script>".into(),
                job_type: "default".into(),
                status: "running",
                started_unix: 1,
            }],
        );
        board.record_event(ScalingEvent {
            unix: 1,
            job_type: "default".into(),
            action: "spawn",
            workers: vec!["w<1>".into()],
            reason: "41 ready > burst threshold 40".into(),
        });
        let html = Page::new(2000).render(&board).unwrap();
        assert!(
            !html.contains("<script>alert(1)</script>"),
            "a job name is never markup"
        );
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;&#x2F;script&gt;")
                || html.contains("&lt;script&gt;alert(1)&lt;/script&gt;")
        );
        assert!(!html.contains("<b>batch</b>"));
        assert!(
            html.contains(r#"<p id="batches-not-shown" class="empty" hidden>0 older batches"#),
            "no batch forgotten: the note is there for the script, hidden"
        );
        assert!(
            html.contains(r#"id="card-ready">41<"#),
            "cards carry the numbers"
        );
        assert!(html.contains(r#"id="card-consumed">99<"#));
        assert!(html.contains(r#"id="card-dead">2<"#));
        assert!(html.contains("41 ready &gt; burst threshold 40"));
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "no outside asset"
        );
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(20 * 1024 * 1024 + 512 * 1024), "20.5 MiB");
    }
}
