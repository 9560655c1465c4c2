//! Who may do what on the producer's API, with a real tokens file: no token and a
//! wrong token are refused; a submitter uploads into its tenant, sees and acts on its
//! tenant's batches only (another tenant's batch is 404, as if there were none) and
//! never dead letters; an admin sees every tenant's; the probes stay open. And the
//! `producer` binary: `token add` prints a token once and keeps only its hash, and a
//! producer bound beyond loopback without tokens refuses to start.

mod support;

use std::process::Command;

use reqwest::{StatusCode, multipart};
use serde_json::Value;
use spillway_common::auth::{Role, Tokens};
use support::TestProducer;

struct Tenants {
    _dir: tempfile::TempDir,
    path: String,
    admin: String,
    acme: String,
    other: String,
}

fn tokens() -> Tenants {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.toml");
    let admin = Tokens::add(&path, "ops", "default", Role::Admin).unwrap();
    let acme = Tokens::add(&path, "acme-ci", "acme", Role::Submitter).unwrap();
    let other = Tokens::add(&path, "globex-ci", "globex", Role::Submitter).unwrap();
    Tenants {
        path: path.display().to_string(),
        _dir: dir,
        admin,
        acme,
        other,
    }
}

async fn call(
    producer: &TestProducer,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
) -> (StatusCode, Value) {
    let mut request = producer
        .client
        .request(method, format!("{}{path}", producer.base_url));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

async fn upload_as(producer: &TestProducer, token: &str) -> (StatusCode, Value) {
    let form = multipart::Form::new().part(
        "file",
        multipart::Part::bytes(b"id,value\n1,a\n2,b\n".to_vec()).file_name("data.csv"),
    );
    let response = producer
        .client
        .post(format!("{}/upload", producer.base_url))
        .bearer_auth(token)
        .multipart(form)
        .send()
        .await
        .unwrap();
    (response.status(), response.json().await.unwrap())
}

#[tokio::test]
async fn tokens_and_tenants_decide_who_sees_and_does_what() {
    let tenants = tokens();
    let producer = TestProducer::start("auth", &["--tokens-file", &tenants.path]).await;
    let get = reqwest::Method::GET;

    // No token, a wrong token: 401, and nothing is uploaded.
    let (status, body) = call(&producer, get.clone(), "/batches", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body["error"].as_str().unwrap().contains("Bearer"), "{body}");
    let (status, _) = call(&producer, get.clone(), "/batches", Some("spw_wrong")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = producer.upload(b"id\n1\n".to_vec()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // The probes are open.
    for open in ["/healthz", "/readyz"] {
        let (status, _) = call(&producer, get.clone(), open, None).await;
        assert_ne!(status, StatusCode::UNAUTHORIZED, "{open}");
    }

    // Each submitter uploads into its own tenant.
    let (status, acme_batch) = upload_as(&producer, &tenants.acme).await;
    assert_eq!(status, StatusCode::OK, "{acme_batch}");
    let acme_id = acme_batch["batch_id"].as_str().unwrap().to_string();
    let (status, other_batch) = upload_as(&producer, &tenants.other).await;
    assert_eq!(status, StatusCode::OK, "{other_batch}");
    let other_id = other_batch["batch_id"].as_str().unwrap().to_string();

    let (_, listed) = call(&producer, get.clone(), "/batches", Some(&tenants.acme)).await;
    let ids: Vec<&str> = listed["batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["batch_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [acme_id.as_str()],
        "a submitter lists its tenant's only"
    );
    let (status, mine) = call(
        &producer,
        get.clone(),
        &format!("/batches/{acme_id}"),
        Some(&tenants.acme),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{mine}");
    assert_eq!(mine["tenant"], "acme");

    // Another tenant's batch is not there, whatever is asked of it.
    for (method, path) in [
        (get.clone(), format!("/batches/{other_id}")),
        (get.clone(), format!("/batches/{other_id}/results")),
        (reqwest::Method::POST, format!("/batches/{other_id}/cancel")),
        (reqwest::Method::POST, format!("/batches/{other_id}/retry")),
        (reqwest::Method::DELETE, format!("/batches/{other_id}")),
    ] {
        let (status, body) = call(&producer, method.clone(), &path, Some(&tenants.acme)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {body}");
    }
    // Dead letters are an admin's.
    let (status, body) = call(&producer, get.clone(), "/dead", Some(&tenants.acme)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, _) = call(&producer, get.clone(), "/dead", Some(&tenants.admin)).await;
    assert_eq!(status, StatusCode::OK);

    // The admin sees every tenant's.
    let (_, all) = call(&producer, get.clone(), "/batches", Some(&tenants.admin)).await;
    assert_eq!(all["batches"].as_array().unwrap().len(), 2, "{all}");
    let (status, _) = call(
        &producer,
        get,
        &format!("/batches/{other_id}"),
        Some(&tenants.admin),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[test]
fn token_add_prints_a_token_once_and_keeps_only_its_hash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.toml");
    let output = Command::new(env!("CARGO_BIN_EXE_producer"))
        .args([
            "token",
            "add",
            "ci",
            "--tenant",
            "acme",
            "--role",
            "submitter",
        ])
        .env("TOKENS_FILE", &path)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let token = String::from_utf8(output.stdout).unwrap().trim().to_string();
    assert!(token.starts_with("spw_"), "{token}");
    let kept = std::fs::read_to_string(&path).unwrap();
    assert!(!kept.contains(&token) && kept.contains("acme"), "{kept}");
    let who = Tokens::load(&path).unwrap().verify(&token).unwrap();
    assert_eq!((who.name.as_str(), who.role), ("ci", Role::Submitter));

    let without = Command::new(env!("CARGO_BIN_EXE_producer"))
        .args(["token", "add", "x", "--tenant", "t", "--role", "admin"])
        .env_remove("TOKENS_FILE")
        .output()
        .unwrap();
    assert!(!without.status.success());
    assert!(String::from_utf8_lossy(&without.stderr).contains("TOKENS_FILE"));
}

#[test]
fn a_producer_listening_beyond_loopback_without_tokens_refuses_to_start() {
    let output = Command::new(env!("CARGO_BIN_EXE_producer"))
        .env_clear()
        .env("PRODUCER_LISTEN", "0.0.0.0:0")
        .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no TOKENS_FILE") && stderr.contains("AUTH=off"),
        "{stderr}"
    );
}

/// The `producer` binary on a port of its choosing with `tokens`, logging everything it
/// can (`RUST_LOG=debug`) into `log`; returns it and its base URL.
async fn producer_logging_to(
    tokens: &str,
    vhost: &spillway_testkit::TestVhost,
    database: &spillway_testkit::TestDatabase,
    log: &std::path::Path,
) -> (tokio::process::Child, String) {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_producer"))
        .env_clear()
        .env("PRODUCER_LISTEN", "127.0.0.1:0")
        .env("AMQP_URL", &vhost.amqp_url)
        .env("DATABASE_URL", &database.url)
        .env("TOKENS_FILE", tokens)
        .env("RUST_LOG", "debug")
        .env("LOG_FORMAT", "json")
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let listen = || {
        std::fs::read_to_string(log).ok().and_then(|text| {
            text.lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|e| e["message"] == "producer ready for uploads")
                .and_then(|e| e["listen"].as_str().map(str::to_string))
        })
    };
    spillway_testkit::wait_for(
        "the producer to say it is ready",
        std::time::Duration::from_secs(60),
        || std::future::ready(listen().is_some()),
    )
    .await;
    let base = format!("http://{}", listen().unwrap());
    (child, base)
}

#[tokio::test]
async fn no_token_ever_appears_in_the_log() {
    let tenants = tokens();
    let vhost = spillway_testkit::TestVhost::new("auth-log").await;
    let database = spillway_testkit::TestDatabase::new("auth-log").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("producer.log");
    let (mut child, base) = producer_logging_to(&tenants.path, &vhost, &database, &log).await;
    let client = reqwest::Client::new();
    let wrong = "spw_a-wrong-token-that-must-not-be-logged";
    let form = multipart::Form::new().part(
        "file",
        multipart::Part::bytes(b"id\n1\n2\n".to_vec()).file_name("data.csv"),
    );
    let uploaded = client
        .post(format!("{base}/upload"))
        .bearer_auth(&tenants.acme)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(uploaded.status(), StatusCode::OK);
    for token in [wrong, tenants.admin.as_str(), tenants.other.as_str()] {
        client
            .get(format!("{base}/batches"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        client
            .get(format!("{base}/dead"))
            .header("cookie", format!("spillway_token={token}"))
            .send()
            .await
            .unwrap();
    }
    // Each event is written as it happens: what the log holds now is all of it.
    child.kill().await.unwrap();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.lines().count() > 3, "the producer logged: {logged}");
    for token in [wrong, &tenants.admin, &tenants.acme, &tenants.other] {
        assert!(!logged.contains(token), "a token in the log: {logged}");
    }
}

/// `/openapi.json` is open, describes every route the producer serves (the routes and
/// the document come from the same code), and says which operations need a token.
#[tokio::test]
async fn the_openapi_document_is_open_and_describes_every_route() {
    let tenants = tokens();
    let producer = TestProducer::start("openapi", &["--tokens-file", &tenants.path]).await;
    let (status, doc) = call(&producer, reqwest::Method::GET, "/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK, "served without a token: {doc}");
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    let mut paths: Vec<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    paths.sort_unstable();
    assert_eq!(
        paths,
        [
            "/batches",
            "/batches/{id}",
            "/batches/{id}/cancel",
            "/batches/{id}/results",
            "/batches/{id}/retry",
            "/dead",
            "/dead/replay",
            "/healthz",
            "/metrics",
            "/readyz",
            "/submit/{job_type}",
            "/upload",
        ]
    );
    let mut ids: Vec<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|item| item.as_object().unwrap().values())
        .map(|op| {
            op["operationId"]
                .as_str()
                .expect("every operation has an id")
        })
        .collect();
    let operations = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), operations, "operation ids are unique: {ids:?}");
    let operation = |path: &str, method: &str| doc["paths"][path][method].clone();
    for (path, method) in [
        ("/batches", "get"),
        ("/batches/{id}", "delete"),
        ("/upload", "post"),
    ] {
        let op = operation(path, method);
        assert_eq!(
            op["security"],
            serde_json::json!([{"bearer": []}]),
            "{method} {path}"
        );
        assert!(op["responses"]["401"].is_object(), "{method} {path}: {op}");
    }
    for path in ["/healthz", "/readyz"] {
        let op = operation(path, "get");
        assert!(op["security"].is_null(), "{path} is open: {op}");
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"],
        serde_json::json!({"type": "http", "scheme": "bearer"})
    );
    assert_eq!(
        operation("/upload", "post")["responses"]["400"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/ErrorAnswer"
    );
}
