//! The dashboard's batches are the ledger's: the `scaler` binary, on a real broker and
//! a real PostgreSQL, shows in `/api/batches`, a batch's page, its results download,
//! the summary and `dashboard.sh` exactly what the ledger holds, the same after the
//! scaler restarts; with PostgreSQL unreachable it says so plainly and keeps scaling
//! (`/readyz` stays 200). Every outside value on the pages is text, never markup.

mod support;

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use spillway_ledger::{Ledger, NewBatch, Outcome, RowStatus};
use spillway_testkit::{TestDatabase, TestVhost, ledger::record_published_batch};
use support::{Scaler, local_jobs};

const HOSTILE: &str = "<script>alert(1)</script>";

/// Records batch `id` of `rows` rows (`n`, `note`; lines 2 onwards), all published.
async fn record_batch(ledger: &Ledger, id: &str, file_name: &str, rows: u64) {
    record_batch_of(ledger, "default", id, file_name, rows).await;
}

/// [`record_batch`], for `tenant`.
async fn record_batch_of(ledger: &Ledger, tenant: &str, id: &str, file_name: &str, rows: u64) {
    let header = ["n".to_string(), format!("note{HOSTILE}")];
    let batch = NewBatch {
        tenant,
        batch_id: id,
        job_type: "default",
        queue: "tasks",
        file_name: Some(file_name),
        header: &header,
        rows: Some(rows),
        callback_url: None,
    };
    let lines = (0..rows).map(|n| (n + 2, [n.to_string(), format!("{HOSTILE} row {n}")]));
    record_published_batch(ledger, &batch, lines).await;
}

fn outcome(batch: &str, line: u64, status: RowStatus, error: Option<&str>) -> Outcome {
    Outcome {
        batch_id: batch.into(),
        line,
        status,
        attempts: if status == RowStatus::Dead { 5 } else { 1 },
        error: error.map(String::from),
        result: (status == RowStatus::Done).then(|| format!("ok {line}")),
        started_unix: 1_700_000_000.0,
    }
}

async fn get(scaler: &Scaler, path: &str) -> (StatusCode, String) {
    let response = reqwest::get(format!("{}{path}", scaler.url))
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    (response.status(), response.text().await.unwrap())
}

async fn get_json(scaler: &Scaler, path: &str) -> Value {
    let (status, body) = get(scaler, path).await;
    assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

fn jobs_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("jobs.toml"), local_jobs("true", 1, 5)).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_what_the_ledger_holds_the_same_after_a_restart() {
    let vhost = TestVhost::new("batches").await;
    let db = TestDatabase::new("scaler_batches").await;
    let ledger = Ledger::open(&db.url, 2).unwrap();
    // A finished batch with two dead rows, whose file name and errors are markup,
    // then a newer one still queued.
    let finished = "6f0c-finished";
    record_batch(&ledger, finished, &format!("{HOSTILE}.csv"), 4).await;
    let dead_error = format!("{HOSTILE} \"resize\" failed: exit status: 2");
    ledger
        .record(
            "w1",
            &[
                outcome(finished, 2, RowStatus::Done, None),
                outcome(finished, 3, RowStatus::Dead, Some(&dead_error)),
                outcome(finished, 4, RowStatus::Done, None),
                outcome(finished, 5, RowStatus::Dead, Some("timed out")),
            ],
        )
        .await
        .unwrap();
    let queued = "7a1d-queued";
    record_batch(&ledger, queued, "later.csv", 3).await;

    let dir = jobs_dir();
    let mut scaler = Scaler::start_with(
        &vhost,
        dir.path(),
        "scaler-1.log",
        &[("DATABASE_URL", &db.url)],
    );
    scaler.wait_ready().await;

    let batches = get_json(&scaler, "/api/batches").await;
    let list = batches["batches"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{batches}");
    assert_eq!(list[0]["batch_id"], queued, "newest first");
    assert_eq!(batches["more"], false);
    let shown = &list[1];
    // (field, value): the ledger's figures, as its record holds them.
    let figures = [
        ("batch_id", Value::from(finished)),
        ("state", "done_with_failures".into()),
        ("file_name", format!("{HOSTILE}.csv").into()),
        ("rows", 4.into()),
        ("published", 4.into()),
        ("pending", 0.into()),
        ("done", 2.into()),
        ("failed", 0.into()),
        ("dead", 2.into()),
        ("progress", 1.0.into()),
        ("eta_seconds", Value::Null),
    ];
    for (field, value) in &figures {
        assert_eq!(&shown[field], value, "{field} of {shown}");
    }
    assert!(shown["rows_per_second"].as_f64().is_some(), "{shown}");
    assert_eq!(list[0]["state"], "queued");
    assert_eq!(list[0]["progress"], 0.0);

    let page = get_json(&scaler, &format!("/api/batches/{finished}")).await;
    let dead: Vec<(u64, &str)> = page["dead_rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            (
                row["line"].as_u64().unwrap(),
                row["error"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(dead, [(3, dead_error.as_str()), (5, "timed out")]);

    // The batch's page: figures, dead rows and the download, every outside value as text.
    let (status, html) = get(&scaler, &format!("/batches/{finished}")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!html.contains(HOSTILE), "no outside markup: {html}");
    for expected in [
        r#"id="state">done_with_failures<"#,
        r#"id="rows">4<"#,
        r#"id="done">2<"#,
        r#"id="dead">2<"#,
        "&lt;script&gt;alert(1)&lt;",
        "&quot;resize&quot; failed: exit status: 2",
        "timed out",
        &format!(r#"href="/batches/{finished}/results""#),
    ] {
        assert!(html.contains(expected), "{expected} in {html}");
    }
    let (status, csv) = get(&scaler, &format!("/batches/{finished}/results")).await;
    assert_eq!(status, StatusCode::OK);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "n,note<script>alert(1)</script>,spillway_line,spillway_status,spillway_result,spillway_error,spillway_attempts"
    );
    assert_eq!(lines.len(), 5, "a header and 4 rows: {csv}");
    assert!(lines[1].starts_with("0,") && lines[1].ends_with(",2,done,ok 2,,1"));
    let (_, dead_csv) = get(&scaler, &format!("/batches/{finished}/results?status=dead")).await;
    assert_eq!(dead_csv.lines().count(), 3, "{dead_csv}");
    assert_eq!(
        get(&scaler, "/batches/no-such-batch").await.0,
        StatusCode::NOT_FOUND
    );

    // The dashboard links each batch to its page; the summary and dashboard.sh show it.
    let (_, index) = get(&scaler, "/").await;
    assert!(
        index.contains(&format!(r#"<a href="/batches/{finished}">{finished}</a>"#)),
        "{index}"
    );
    let (ok, summary, _) = scaler.dashboard_sh(&[]);
    assert!(ok, "{summary}");
    assert!(
        summary
            .lines()
            .any(|l| l.starts_with(finished) && l.contains("done_with_failures")),
        "{summary}"
    );
    let (ok, json, _) = scaler.dashboard_sh(&["--json"]);
    let json: Value = serde_json::from_str(&json).unwrap();
    assert!(ok);
    assert_eq!(json["batches"], batches);

    // A restarted scaler remembers nothing of its own: it shows the same figures.
    scaler.terminate();
    let scaler = Scaler::start_with(
        &vhost,
        dir.path(),
        "scaler-2.log",
        &[("DATABASE_URL", &db.url)],
    );
    scaler.wait_ready().await;
    assert_eq!(get_json(&scaler, "/api/batches").await, batches);
    assert_eq!(
        get_json(&scaler, &format!("/api/batches/{finished}")).await,
        page
    );
    ledger.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_ledger_is_said_plainly_and_the_scaler_stays_ready() {
    let vhost = TestVhost::new("batches_down").await;
    let dir = jobs_dir();
    let scaler = Scaler::start_with(
        &vhost,
        dir.path(),
        "scaler.log",
        &[("DATABASE_URL", "postgres://postgres@127.0.0.1:1/spillway")],
    );
    // Ready without PostgreSQL: scaling reads RabbitMQ only.
    scaler.wait_ready().await;

    let asked = Instant::now();
    let (status, body) = get(&scaler, "/api/batches").await;
    assert!(
        asked.elapsed() < Duration::from_secs(4),
        "bounded: {:?}",
        asked.elapsed()
    );
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let error: Value = serde_json::from_str(&body).unwrap();
    let message = error["error"].as_str().unwrap();
    assert!(
        message.starts_with("the ledger: PostgreSQL"),
        "one JSON shape, saying what is wrong: {error}"
    );

    let (status, index) = get(&scaler, "/").await;
    assert_eq!(status, StatusCode::OK, "the rest of the dashboard shows");
    assert!(
        index.contains(
            r#"<p id="ledger-error" class="error">Batches cannot be read: the ledger: PostgreSQL"#
        ),
        "{index}"
    );
    let (status, page) = get(&scaler, "/batches/6f0c").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        page.contains(r#"<p class="error" id="error">the ledger: PostgreSQL"#),
        "{page}"
    );

    let (ok, summary, _) = scaler.dashboard_sh(&[]);
    assert!(
        ok && summary.contains("batches cannot be read: the ledger: PostgreSQL"),
        "{summary}"
    );
    let (ok, json, _) = scaler.dashboard_sh(&["--json"]);
    let json: Value = serde_json::from_str(&json).unwrap();
    assert!(ok && json["batches"] == error, "{json}");
    assert!(json["stats"]["job_types"].is_array());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submitter_sees_its_tenants_batches_on_the_dashboard_and_no_other() {
    use spillway_common::auth::{Role, Tokens};
    let vhost = TestVhost::new("batches-tenants").await;
    let db = TestDatabase::new("scaler_tenants").await;
    let ledger = Ledger::open(&db.url, 2).unwrap();
    record_batch_of(&ledger, "acme", "acme-1", "acme.csv", 2).await;
    record_batch_of(&ledger, "globex", "globex-1", "globex.csv", 2).await;
    let dir = jobs_dir();
    let tokens = dir.path().join("tokens.toml");
    let acme = Tokens::add(&tokens, "acme-ci", "acme", Role::Submitter).unwrap();
    let admin = Tokens::add(&tokens, "ops", "default", Role::Admin).unwrap();
    let scaler = Scaler::start_with(
        &vhost,
        dir.path(),
        "scaler.log",
        &[
            ("DATABASE_URL", &db.url),
            ("TOKENS_FILE", tokens.to_str().unwrap()),
        ],
    );
    scaler.wait_ready().await;
    let client = reqwest::Client::new();
    let as_token = |token: &str, path: &str| {
        client
            .get(format!("{}{path}", scaler.url))
            .bearer_auth(token)
            .send()
    };
    let ids = |page: Value| -> Vec<String> {
        page["batches"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["batch_id"].as_str().unwrap().to_string())
            .collect()
    };
    let mine: Value = as_token(&acme, "/api/batches")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ids(mine), ["acme-1"]);
    for path in [
        "/api/batches/globex-1",
        "/batches/globex-1",
        "/batches/globex-1/results",
    ] {
        let answer = as_token(&acme, path).await.unwrap();
        assert_eq!(answer.status(), StatusCode::NOT_FOUND, "{path}");
    }
    let dead = as_token(&acme, "/dead?job_type=default").await.unwrap();
    assert_eq!(dead.status(), StatusCode::FORBIDDEN);
    let all: Value = as_token(&admin, "/api/batches")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut every = ids(all);
    every.sort();
    assert_eq!(every, ["acme-1", "globex-1"]);
    let (status, _) = get(&scaler, "/api/batches").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}
