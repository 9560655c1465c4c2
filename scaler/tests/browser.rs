//! The dashboard in a real browser: headless Chromium, driven over WebDriver
//! (chromedriver), opens the scaler's page during a run on the local launcher and
//! checks that the cards show live numbers, workers appear with processed counts, a
//! worker's logs open, and a CSV value containing `<script>` shows as text. It saves
//! a screenshot to `target/test-artifacts/dashboard.png`. A second run retries a
//! batch's dead rows and cancels a running batch from their pages, through the
//! scaler to the producer.

mod support;

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use base64::Engine;
use serde_json::{Value, json};
use spillway_testkit::{TestVhost, wait_for};
use support::{Scaler, free_port, start_producer, start_producer_with, upload};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const PATIENCE: Duration = Duration::from_secs(60);
const PAYLOAD: &str = "<script>alert(1)</script>";

/// Rows print their own JSON on stderr (so the worker's log, its diary, holds the CSV
/// values), then take a moment, so workers are still there to be looked at.
const JOBS: &str = r#"
tick_seconds = 1
idle_seconds = 300

[job_types.default]
queue = "tasks"
handler = "exec"
command = ["sh", "-c", "cat >&2; echo >&2; sleep 0.2"]
max_jobs = 3
"#;

/// A chromedriver process and one browser session on it.
struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
}

impl Browser {
    async fn start(profile: &Path) -> Self {
        for binary in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(binary).exists(),
                "{binary} is missing: install the chromium and chromium-driver packages (./manage.sh test does)"
            );
        }
        let port = free_port();
        // A process group of its own, which the Chromium it starts joins: dropping the
        // browser ends them all, not only chromedriver.
        let driver = Command::new(CHROMEDRIVER)
            .process_group(0)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        wait_for(
            "chromedriver to answer",
            Duration::from_secs(20),
            || async { http.get(format!("{base}/status")).send().await.is_ok() },
        )
        .await;
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                // The closed network refuses Chromium's own background connections.
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update", "--disable-sync",
                         "--window-size=1300,1400", format!("--user-data-dir={}", profile.display())]
            }
        }}});
        let created: Value = http
            .post(format!("{base}/session"))
            .json(&capabilities)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_string();
        Browser {
            driver,
            base,
            session,
            http,
        }
    }

    async fn command(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut request = self.http.request(method, url);
        if !body.is_null() {
            request = request.json(&body);
        }
        let answer: Value = request.send().await.unwrap().json().await.unwrap();
        if let Some(error) = answer["value"]["error"].as_str() {
            panic!(
                "WebDriver {path} failed: {error}: {}",
                answer["value"]["message"]
            );
        }
        answer["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", json!({"url": url}))
            .await;
    }

    /// Runs `script` in the page and returns what it returns.
    async fn eval(&self, script: &str) -> Value {
        self.command(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
        .await
    }

    /// The text of each cell of each row of table body `id`, row by row.
    async fn table(&self, id: &str) -> Vec<Vec<String>> {
        let rows = self
            .eval(&format!(
                "return [...document.querySelectorAll('#{id} tr')].map(r => [...r.cells].map(c => c.textContent))"
            ))
            .await;
        serde_json::from_value(rows).expect("rows of cells")
    }

    async fn screenshot(&self, to: &Path) {
        let png = self
            .command(reqwest::Method::GET, "/screenshot", Value::Null)
            .await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::write(to, bytes).unwrap();
        println!("dashboard screenshot: {}", to.display());
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Ok(group) = i32::try_from(self.driver.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(group),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.driver.wait();
    }
}

/// Runs `dashboard.sh` with `args` against the scaler at `url`: whether it succeeded,
/// its output and its errors.
fn dashboard_sh(url: &str, args: &[&str]) -> (bool, String, String) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../dashboard.sh");
    let output = Command::new("bash")
        .arg(script)
        .args(args)
        .env("SCALER_URL", url)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn artifact(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("../test-artifacts")
        .join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_live_numbers_workers_and_logs_and_escapes_what_it_shows() {
    let vhost = TestVhost::new("browser").await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    std::fs::write(dir.join("jobs.toml"), JOBS).unwrap();
    let (producer, stop_producer) = start_producer(&vhost, dir).await;
    let scaler = Scaler::start(&vhost, dir, "scaler.log");

    let mut csv = String::from("n,text\n");
    csv.push_str(&format!("0,{PAYLOAD}\n"));
    for n in 1..60 {
        csv.push_str(&format!("{n},row {n}\n"));
    }
    let batch = upload(&producer, csv).await;

    let browser = Browser::start(&dir.join("profile")).await;
    browser.open(&scaler.url).await;
    let number = |id: &'static str| {
        let browser = &browser;
        async move {
            let text = browser
                .eval(&format!(
                    "return document.getElementById('{id}').textContent"
                ))
                .await;
            text.as_str()
                .and_then(|t| t.trim().parse::<u64>().ok())
                .unwrap_or(0)
        }
    };
    wait_for("the cards to show rows consumed", PATIENCE, || async {
        number("card-consumed").await > 0
    })
    .await;
    wait_for(
        "the active-jobs card to count workers",
        PATIENCE,
        || async { number("card-active").await > 0 },
    )
    .await;
    assert_eq!(number("card-max").await, 3);

    wait_for(
        "a worker with a processed count in the job table",
        PATIENCE,
        || async {
            browser.table("jobs").await.iter().any(|row| {
                row[0].starts_with("spillway-default-")
                    && row.get(4).and_then(|n| n.parse::<u64>().ok()) > Some(0)
            })
        },
    )
    .await;

    // Every row, the one holding the payload too, was processed: the batch's row in
    // the table (from the ledger) reads 60 rows, 60 done, and a worker's log prints
    // the payload.
    wait_for(
        "the batch's row to show its 60 rows all processed",
        PATIENCE,
        || async {
            // Cells: batch, job type, rows, done, failed, dead, state, progress.
            browser
                .table("batches")
                .await
                .iter()
                .any(|row| row[0] == batch && row[2..=3] == ["60", "60"] && row[5] == "0")
        },
    )
    .await;
    let mut found = false;
    let workers = browser.eval("return [...document.querySelectorAll('#jobs button[data-logs]')].map(b => b.dataset.logs)").await;
    for (i, _) in workers.as_array().unwrap().iter().enumerate() {
        // The previous worker's log closed and the next opened at once, in one script:
        // the dialog's close event then comes after the new log is open, and must not
        // stop following it.
        browser
            .eval(&format!(
                "document.getElementById('logs').close(); document.querySelectorAll('#jobs button[data-logs]')[{i}].click()"
            ))
            .await;
        wait_for("the logs dialog to load", PATIENCE, || async {
            let state = browser.eval("return [document.getElementById('logs').open, document.getElementById('logs-text').textContent]").await;
            state[0] == json!(true) && state[1].as_str().is_some_and(|t| t != "loading…")
        })
        .await;
        let title = browser
            .eval("return document.getElementById('logs-title').textContent")
            .await;
        assert!(
            title
                .as_str()
                .is_some_and(|t| t.contains("following") || t.contains("has ended")),
            "the dialog follows the log live: {title}"
        );
        let text = browser
            .eval("return document.getElementById('logs-text').textContent")
            .await;
        found |= text.as_str().unwrap().contains(PAYLOAD);
    }
    assert!(
        found,
        "some worker's log shows the row with the payload, as text"
    );
    // As text, not markup: no element was made from it, and only the page's own script exists.
    assert_eq!(
        browser
            .eval("return document.getElementById('logs-text').childElementCount")
            .await,
        json!(0)
    );
    assert_eq!(
        browser.eval("return document.scripts.length").await,
        json!(1)
    );
    let download = browser
        .eval("return document.getElementById('logs-download').getAttribute('href')")
        .await;
    assert!(
        download.as_str().unwrap().ends_with("/logs?download=true"),
        "{download}"
    );

    browser.screenshot(&artifact("dashboard.png")).await;

    // The same board in a terminal, through dashboard.sh and curl.
    let run = |args: &[&str], url: &str| dashboard_sh(url, args);
    let (ok, summary, _) = run(&[], &scaler.url);
    assert!(
        ok && summary.contains("spillway-default-") && summary.contains("3 of 3 active"),
        "{summary}"
    );
    assert!(
        !summary.contains('\x1b'),
        "no colour off a terminal: {summary:?}"
    );
    let (ok, json_text, _) = run(&["--json"], &scaler.url);
    let parsed: Value = serde_json::from_str(&json_text).expect("--json prints JSON");
    assert!(
        ok && parsed["jobs"].as_array().is_some_and(|j| !j.is_empty()),
        "{json_text}"
    );
    let worker = parsed["jobs"][0]["name"].as_str().unwrap().to_string();
    let (ok, log, _) = run(&["logs", &worker, "--tail", "3"], &scaler.url);
    assert!(ok && log.lines().count() <= 3 && !log.is_empty(), "{log}");
    let (ok, _, error) = run(&[], &format!("http://127.0.0.1:{}", free_port()));
    assert!(!ok && error.contains("cannot reach the scaler"), "{error}");
    stop_producer.cancel();
}

/// Rows holding `boom` fail (and, with one delivery, die); rows holding `slow` take a
/// second; the rest pass.
const OPERATIONS_JOBS: &str = r#"
tick_seconds = 1
idle_seconds = 300

[job_types.default]
queue = "tasks"
handler = "exec"
command = ["sh", "-c", "input=$(cat); case \"$input\" in *boom*) exit 1;; *slow*) sleep 1;; esac"]
delivery_limit = 1
max_jobs = 1
"#;

/// The batch's state as the dashboard's API gives it.
async fn batch_state(scaler: &str, id: &str) -> Value {
    reqwest::get(format!("{scaler}/api/batches/{id}"))
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["batch"]
        .clone()
}

/// Clicks `button` on the page, answering its confirmation, and returns what the page
/// then says of the operation.
async fn operate(browser: &Browser, button: &str) -> String {
    browser
        .eval(&format!(
            "window.confirm = () => true; document.getElementById('{button}').click()"
        ))
        .await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let text = browser
            .eval(
                "const r = document.getElementById('action-result'); return r ? r.textContent : ''",
            )
            .await;
        let said = text.as_str().unwrap_or_default();
        if !said.is_empty() && !said.ends_with('…') {
            return said.to_string();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the page did not say how {button} went within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_page_retries_dead_rows_and_cancels_a_running_batch() {
    let vhost = TestVhost::new("browser-ops").await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    std::fs::write(dir.join("jobs.toml"), OPERATIONS_JOBS).unwrap();
    let (producer, stop_producer) = start_producer_with(&vhost, dir, &[]).await;
    let scaler = Scaler::start_with(&vhost, dir, "scaler.log", &[("PRODUCER_URL", &producer)]);
    let browser = Browser::start(&dir.join("profile")).await;

    // Two of five rows die; Retry dead rows runs them again (and they die again).
    let failing = upload(&producer, "n\n1\nboom 2\n3\nboom 4\n5\n".into()).await;
    wait_for("the batch to finish with 2 dead rows", PATIENCE, || async {
        let batch = batch_state(&scaler.url, &failing).await;
        batch["state"] == "done_with_failures" && batch["dead"] == 2
    })
    .await;
    browser
        .open(&format!("{}/batches/{failing}", scaler.url))
        .await;
    let said = operate(&browser, "retry").await;
    assert!(
        said.starts_with("2 dead rows back to pending, 2 published"),
        "{said}"
    );
    wait_for(
        "the retried rows to run and die again",
        PATIENCE,
        || async {
            let batch = batch_state(&scaler.url, &failing).await;
            batch["state"] == "done_with_failures" && batch["dead"] == 2 && batch["done"] == 3
        },
    )
    .await;

    // A batch of slow rows, cancelled while it runs: what has not run never will.
    let mut csv = String::from("n\n");
    for n in 0..100 {
        csv.push_str(&format!("slow {n}\n"));
    }
    let slow = upload(&producer, csv).await;
    wait_for("the slow batch to start running", PATIENCE, || async {
        batch_state(&scaler.url, &slow).await["state"] == "running"
    })
    .await;
    browser
        .open(&format!("{}/batches/{slow}", scaler.url))
        .await;
    let said = operate(&browser, "cancel").await;
    assert!(said.starts_with("cancelled: "), "{said}");
    let batch = batch_state(&scaler.url, &slow).await;
    assert_eq!(batch["state"], "cancelled", "{batch}");
    assert!(batch["cancelled"].as_u64().unwrap() > 50, "{batch}");
    // The page, reloaded, offers neither operation any more.
    wait_for("the cancelled batch's page to reload", PATIENCE, || async {
        browser
            .eval("return document.getElementById('state').textContent")
            .await
            == json!("cancelled")
    })
    .await;
    assert_eq!(
        browser
            .eval("return document.querySelectorAll('button[data-action]').length")
            .await,
        json!(0)
    );
    browser.screenshot(&artifact("batch-cancelled.png")).await;

    // The same operations in a terminal, with curl only, through the scaler.
    let run = |args: &[&str]| dashboard_sh(&scaler.url, args);
    let (ok, out, err) = run(&["retry", &failing]);
    assert!(ok && out.contains("\"retried\":2"), "{out}{err}");
    let (ok, _, err) = run(&["cancel", &slow]);
    assert!(!ok && err.contains("409"), "cancelled already: {err}");
    let (ok, _, err) = run(&["cancel", "no-such-batch"]);
    assert!(!ok && err.contains("404"), "{err}");
    let (ok, _, err) = run(&["retry"]);
    assert!(!ok && err.contains("needs a batch id"), "{err}");
    stop_producer.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_asks_for_a_token_in_a_login_form_and_keeps_it_out_of_reach_of_scripts() {
    use spillway_common::auth::{Role, Tokens};
    let vhost = TestVhost::new("browser-login").await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    std::fs::write(dir.join("jobs.toml"), JOBS).unwrap();
    let tokens = dir.join("tokens.toml");
    let admin = Tokens::add(&tokens, "ops", "default", Role::Admin).unwrap();
    let scaler = Scaler::start_with(
        &vhost,
        dir,
        "scaler.log",
        &[("TOKENS_FILE", tokens.to_str().unwrap())],
    );
    let readyz = format!("{}/readyz", scaler.url);
    wait_for("the scaler to be ready", PATIENCE, || async {
        reqwest::get(&readyz)
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;

    let browser = Browser::start(&dir.join("profile")).await;
    browser.open(&scaler.url).await;
    let at = |path: &'static str| {
        let browser = &browser;
        async move { browser.eval("return location.pathname").await == json!(path) }
    };
    wait_for(
        "the dashboard to send the browser to its login form",
        PATIENCE,
        || at("/login"),
    )
    .await;
    let log_in = |token: &str| {
        format!(
            "document.getElementById('token').value = {}; document.querySelector('form').submit()",
            json!(token)
        )
    };
    browser.eval(&log_in("spw_not-a-token")).await;
    wait_for("the form to refuse a wrong token", PATIENCE, || async {
        browser
            .eval("return document.getElementById('message')?.textContent ?? ''")
            .await
            .as_str()
            .is_some_and(|m| m.contains("not valid"))
    })
    .await;
    browser.eval(&log_in(&admin)).await;
    wait_for("the dashboard once logged in", PATIENCE, || async {
        at("/").await
            && browser
                .eval("return document.getElementById('jobs') !== null")
                .await
                == json!(true)
    })
    .await;
    assert_eq!(
        browser
            .eval("return document.cookie.includes('spillway_token')")
            .await,
        json!(false),
        "the token's cookie is HttpOnly: no script reads it"
    );
    let log = std::fs::read_to_string(dir.join("scaler.log")).unwrap();
    assert!(!log.contains(&admin), "the token is never logged: {log}");
}
