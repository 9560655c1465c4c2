//! The dashboard: one server-rendered page (`/`) that then refreshes itself in place
//! from the JSON API (`/api/stats`, `/api/jobs`, `/api/batches`, `/api/events`), with
//! no outside asset, so it works offline; a page per batch (`/batches/{id}`); and the
//! same board as text (`/api/summary`) for `dashboard.sh`.
//!
//! Workers, queues and scaling come from the [`Board`] (live scaling data, in
//! memory); batches come from the ledger ([`batches`]).
//!
//! The templates are compiled once at start. Tera escapes every value in them; the
//! page's script puts every value it fetches into the page as text, never as HTML, so
//! a job name, a log line, a file name or a CSV value containing markup shows as what
//! it is.

pub mod batches;
pub mod dead;
pub mod operations;
pub mod summary;

use std::sync::Arc;

use axum::{
    Extension, Json,
    extract::State,
    response::{Html, IntoResponse, Response},
};
use serde::Deserialize;
use spillway_common::{auth::Principal, extract::Query, openapi::ErrorBody};
use spillway_ledger::Ledger;
use tera::{Context, Kwargs, State as TeraState, Tera};
use utoipa::IntoParams;

use crate::{
    board::{Board, JobView, ScalingEvent, StatsView},
    http::ApiError,
};
use batches::{BatchPage, BatchesView};

const TEMPLATE: &str = "index.html";
const BATCH_TEMPLATE: &str = "batch.html";
const DEAD_TEMPLATE: &str = "dead.html";

/// The compiled pages.
pub struct Page {
    tera: Tera,
    refresh_ms: u64,
}

impl Page {
    /// Compiles the templates; `refresh_ms` is how often the pages refresh themselves.
    pub fn new(refresh_ms: u64) -> Self {
        let mut tera = Tera::new();
        tera.register_filter("urlencode", |s: &str, _: Kwargs, _: &TeraState| {
            path_segment(s)
        });
        tera.add_raw_templates([
            (TEMPLATE, include_str!("index.html")),
            (BATCH_TEMPLATE, include_str!("batch.html")),
            (DEAD_TEMPLATE, include_str!("dead.html")),
        ])
        .expect("the dashboard templates compile");
        Page { tera, refresh_ms }
    }

    /// The dashboard, with the ledger's batches or why they cannot be read.
    pub fn render(
        &self,
        board: &Board,
        batches: Result<&BatchesView, &str>,
    ) -> Result<String, tera::Error> {
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
        match batches {
            Ok(batches) => context.insert("batches", batches),
            Err(error) => {
                context.insert("batches", &BatchesView::default());
                context.insert("ledger_error", error);
            }
        }
        if batches.is_ok() {
            context.insert("ledger_error", "");
        }
        context.insert("batches_shown", &batches::BATCHES_SHOWN);
        context.insert("events", &board.events());
        context.insert("refresh_ms", &self.refresh_ms);
        self.tera.render(TEMPLATE, &context)
    }

    /// The page of batch `id`, or one saying why it cannot be shown. It refreshes
    /// itself while the batch runs, or while the ledger cannot be read.
    pub fn render_batch(
        &self,
        id: &str,
        page: Result<&BatchPage, &ApiError>,
    ) -> Result<String, tera::Error> {
        let mut context = Context::new();
        context.insert("batch_id", id);
        match page {
            Ok(page) => {
                context.insert("error", "");
                context.insert("batch", &page.batch);
                context.insert("dead_rows", &page.dead_rows);
                context.insert("refresh", &!page.batch.record.state.is_finished());
            }
            Err(error) => {
                context.insert("error", &error.to_string());
                context.insert(
                    "refresh",
                    &(error.status() == axum::http::StatusCode::SERVICE_UNAVAILABLE),
                );
            }
        }
        context.insert("refresh_seconds", &self.refresh_ms.div_ceil(1000).max(1));
        self.tera.render(BATCH_TEMPLATE, &context)
    }
}

impl Page {
    /// A page of `job_type`'s dead rows (`page` at most), or why it cannot be shown.
    pub fn render_dead(
        &self,
        job_type: &str,
        rows: Result<&Vec<spillway_ledger::dead::DeadLetter>, &ApiError>,
        page: u32,
    ) -> Result<String, tera::Error> {
        let mut context = Context::new();
        context.insert("job_type", job_type);
        context.insert("page", &page);
        match rows {
            Ok(rows) => {
                context.insert("error", "");
                context.insert("rows", rows);
                let next = (rows.len() == page as usize)
                    .then(|| rows.last().map(spillway_ledger::dead::DeadLetter::cursor))
                    .flatten();
                context.insert("next_after", &next.unwrap_or_default());
            }
            Err(error) => {
                context.insert("error", &error.to_string());
                context.insert("next_after", "");
            }
        }
        self.tera.render(DEAD_TEMPLATE, &context)
    }
}

/// `s` as one segment of a URL path: every byte but the unreserved ones
/// percent-encoded, so an id cannot add a segment, a query or markup to a link.
fn path_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
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
    /// Where batches are read from; connects lazily, so the dashboard serves whether
    /// or not PostgreSQL answers.
    pub ledger: Ledger,
    /// Where batch operations are forwarded.
    pub producer: operations::Producer,
}

/// The dashboard page.
///
/// Workers, queues, scaling and the newest batches, as HTML that then refreshes itself
/// from the JSON API.
#[utoipa::path(
    get,
    path = "/",
    tag = "dashboard",
    responses(
        (
            status = 200,
            description = "The dashboard page (a ledger that cannot be read is a banner on it).",
            body = String,
            content_type = "text/html",
        ),
        (status = 500, description = "The page cannot be rendered.", body = ErrorBody),
    )
)]
pub async fn index(
    State(state): State<DashboardState>,
    Extension(principal): Extension<Principal>,
) -> Result<Html<String>, ApiError> {
    let batches = batches::newest(&state.ledger, &principal)
        .await
        .map_err(|e| e.to_string());
    let batches = batches.as_ref().map_err(String::as_str);
    state
        .page
        .render(&state.board, batches)
        .map(Html)
        .map_err(|error| {
            tracing::error!(%error, "cannot render the dashboard");
            ApiError::Render(error.to_string())
        })
}

/// The board's figures.
///
/// Every job type's latest figures, their totals, the scaler's and the host's CPU and
/// memory, and the recent history for the chart.
#[utoipa::path(
    get,
    path = "/api/stats",
    tag = "dashboard",
    responses((status = 200, description = "The board's figures as last observed.", body = StatsView))
)]
pub async fn stats(State(state): State<DashboardState>) -> Json<StatsView> {
    Json(state.board.stats())
}

/// The workers, newest first, with the counts of their latest reports.
#[utoipa::path(
    get,
    path = "/api/jobs",
    tag = "dashboard",
    responses((status = 200, description = "Every worker the launcher lists.", body = [JobView]))
)]
pub async fn jobs(State(state): State<DashboardState>) -> Json<Vec<JobView>> {
    Json(state.board.jobs())
}

/// The recent scaling events (spawns, drains, stops), newest first.
#[utoipa::path(
    get,
    path = "/api/events",
    tag = "dashboard",
    responses((status = 200, description = "The events the scaler still keeps (the newest few hundred).", body = [ScalingEvent]))
)]
pub async fn events(State(state): State<DashboardState>) -> Json<Vec<ScalingEvent>> {
    Json(state.board.events())
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SummaryQuery {
    /// `true` adds ANSI colours.
    #[serde(default)]
    color: bool,
}

/// The board and the ledger's batches as plain text, for `dashboard.sh`.
#[utoipa::path(
    get,
    path = "/api/summary",
    tag = "dashboard",
    params(SummaryQuery),
    responses(
        (
            status = 200,
            description = "The board as text for a terminal (batches that cannot be read are a line saying why).",
            body = String,
            content_type = "text/plain",
        ),
        (status = 400, description = "The query cannot be read (`color` is not `true` or `false`, a NUL byte).", body = ErrorBody),
    )
)]
pub async fn summary(
    State(state): State<DashboardState>,
    Extension(principal): Extension<Principal>,
    Query(query): Query<SummaryQuery>,
) -> Response {
    let batches = batches::newest(&state.ledger, &principal)
        .await
        .map_err(|e| e.to_string());
    let batches = batches.as_ref().map_err(String::as_str);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        summary::render(&state.board, batches, query.color),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use spillway_common::events::WorkerReport;
    use spillway_ledger::{BatchRecord, BatchState, batches::DeadRow};
    use spillway_testkit::builders::worker_report;

    use std::sync::Arc;

    use super::*;
    use crate::{
        board::{JobListing, JobTypeStats},
        dashboard::batches::{BatchView, tests::record},
        reports::Reports,
    };

    const HOSTILE: &str = "<script>alert(1)</script>";

    /// What a page that refreshes itself holds.
    const REFRESHES: &str = "const refresh = setTimeout(";

    fn escaped(html: &str, text: &str) -> bool {
        let amp = text
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;");
        html.contains(&amp) || html.contains(&amp.replace('/', "&#x2F;"))
    }

    /// A batch whose every outside value (id, job type, file name, header, error) is
    /// markup.
    fn hostile_batch() -> BatchRecord {
        BatchRecord {
            job_type: format!("{HOSTILE}type"),
            file_name: Some(format!("{HOSTILE}.csv")),
            header: vec![format!("{HOSTILE}col")],
            error: Some(format!("{HOSTILE}error")),
            ..record(
                &format!("b\"><i>{HOSTILE}"),
                BatchState::DoneWithFailures,
                4,
                3,
                1,
            )
        }
    }

    #[test]
    fn the_page_renders_the_board_with_every_outside_value_escaped() {
        let reports = Arc::new(Reports::default());
        let board = Board::new(Arc::clone(&reports));
        let batches = BatchesView {
            batches: vec![BatchView::of(hostile_batch())],
            more: false,
        };
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
                paused: false,
                cancelled_in_queue: 0,
                held: None,
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
        let html = Page::new(2000).render(&board, Ok(&batches)).unwrap();
        assert!(
            !html.contains("<script>alert(1)</script>"),
            "a job name is never markup"
        );
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;&#x2F;script&gt;")
                || html.contains("&lt;script&gt;alert(1)&lt;/script&gt;")
        );
        assert!(!html.contains("<i>"), "a batch id is never markup");
        assert!(
            escaped(&html, &format!("{HOSTILE}type")),
            "job type as text"
        );
        assert!(
            html.contains(
                r#"href="/batches/b%22%3E%3Ci%3E%3Cscript%3Ealert%281%29%3C%2Fscript%3E""#
            ),
            "the batch's link is one path segment: {html}"
        );
        assert!(html.contains(r#"<p id="ledger-error" class="error" hidden>"#));
        assert!(html.contains(r#"<p id="batches-more" class="empty" hidden>"#));
        assert!(
            html.contains(r#"<div style="width: 100.0%">"#),
            "3 done + 1 dead of 4: {html}"
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
    fn an_unreadable_ledger_is_a_banner_and_the_rest_of_the_board_shows() {
        let html = Page::new(2000)
            .render(
                &Board::default(),
                Err("the ledger: PostgreSQL is <unreachable>"),
            )
            .unwrap();
        assert!(
            html.contains(r#"<p id="ledger-error" class="error">Batches cannot be read: the ledger: PostgreSQL is &lt;unreachable&gt;</p>"#),
            "{html}"
        );
        assert!(html.contains("No batches yet."));
        assert!(html.contains(r#"id="card-ready">0<"#));
    }

    #[test]
    fn a_batch_page_shows_its_figures_dead_rows_and_download_with_every_outside_value_escaped() {
        let page = BatchPage {
            batch: BatchView::of(hostile_batch()),
            dead_rows: vec![DeadRow {
                line: 7,
                attempts: 5,
                error: Some(format!("{HOSTILE} exit status 2")),
                fields: vec![format!("{HOSTILE}field"), "x".into()],
            }],
        };
        let id = page.batch.record.batch_id.clone();
        let html = Page::new(2000).render_batch(&id, Ok(&page)).unwrap();
        assert!(!html.contains(HOSTILE) && !html.contains("<i>"), "{html}");
        for text in [
            format!("{HOSTILE}type"),
            format!("{HOSTILE}.csv"),
            format!("{HOSTILE}col"),
            format!("{HOSTILE}error"),
            format!("{HOSTILE} exit status 2"),
            format!("{HOSTILE}field, x"),
        ] {
            assert!(escaped(&html, &text), "{text} as text in {html}");
        }
        for figure in [
            r#"id="state">done_with_failures<"#,
            r#"id="rows">4<"#,
            r#"id="done">3<"#,
            r#"id="dead">1<"#,
            r#"id="pending">0<"#,
            r#"id="rate">0.4<"#,
            r#"id="eta">–<"#,
            r#"<td class="num">7</td><td class="num">5</td>"#,
            r#"href="/batches/b%22%3E%3Ci%3E%3Cscript%3Ealert%281%29%3C%2Fscript%3E/results""#,
            r#"/results?status=dead""#,
        ] {
            assert!(html.contains(figure), "{figure} in {html}");
        }
        assert!(
            !html.contains(REFRESHES),
            "a finished batch's page stays put"
        );
    }

    #[test]
    fn the_dead_rows_page_escapes_what_it_shows_and_links_the_next_page() {
        const HOSTILE: &str = "<script>alert(1)</script>";
        let rows: Vec<spillway_ledger::dead::DeadLetter> = (2..4)
            .map(|line| spillway_ledger::dead::DeadLetter {
                batch_id: format!("b\"{HOSTILE}"),
                line,
                attempts: 5,
                error: Some(format!("exit 1: {HOSTILE}")),
                worker: Some("w1".into()),
                settled_at: Some("2026-12-01T06:00:00.000Z".into()),
                fields: vec![HOSTILE.into()],
            })
            .collect();
        let html = Page::new(2000).render_dead(HOSTILE, Ok(&rows), 2).unwrap();
        assert!(!html.contains(HOSTILE), "escaped: {html}");
        assert!(escaped(&html, &format!("exit 1: {HOSTILE}")), "{html}");
        assert!(
            html.contains(r#"<td class="num">3</td><td class="num">5</td>"#),
            "{html}"
        );
        assert!(
            html.contains(r#"id="next" href="/dead?job_type=%3Cscript%3Ealert%281%29%3C%2Fscript%3E&amp;after=b%22%3Cscript%3Ealert%281%29%3C%2Fscript%3E%3A3""#),
            "{html}"
        );
        let shorter = Page::new(2000)
            .render_dead("default", Ok(&rows), 100)
            .unwrap();
        assert!(!shorter.contains(r#"id="next""#), "a last page has no next");
        let failed = Page::new(2000)
            .render_dead(
                "default",
                Err(&ApiError::LedgerSilent(std::time::Duration::from_secs(5))),
                100,
            )
            .unwrap();
        assert!(failed.contains("did not answer within"), "{failed}");
    }

    #[test]
    fn a_batch_page_the_ledger_cannot_give_says_why() {
        let cases = [
            (
                ApiError::LedgerSilent(std::time::Duration::from_secs(2)),
                "the ledger: PostgreSQL did not answer within 2s",
                true,
            ),
            (
                ApiError::NoSuchBatch("<b>".into()),
                "no batch &quot;&lt;b&gt;&quot; in the ledger",
                false,
            ),
        ];
        for (error, text, refreshes) in cases {
            let html = Page::new(2000).render_batch("<b>", Err(&error)).unwrap();
            assert!(html.contains(text), "{text} in {html}");
            assert!(!html.contains("<b>"), "{html}");
            assert_eq!(html.contains(REFRESHES), refreshes, "{text}");
        }
    }

    #[test]
    fn a_path_segment_keeps_unreserved_bytes_only() {
        assert_eq!(path_segment("6f0c-ab_1.x~"), "6f0c-ab_1.x~");
        assert_eq!(path_segment("a/b?c#d"), "a%2Fb%3Fc%23d");
        assert_eq!(path_segment("é"), "%C3%A9");
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(20 * 1024 * 1024 + 512 * 1024), "20.5 MiB");
    }
}
