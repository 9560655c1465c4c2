//! The Kubernetes path's shared set-up and readings, for the tests that run the real
//! `scaler` binary with `LAUNCHER=kubernetes` against the kube-api double
//! (`spillway-testkit`, over TLS): a [`Cluster`] (a vhost, a working directory holding
//! the job-types file, the double with the Secret and ConfigMap the worker Jobs read,
//! a producer) that starts the scaler against it; what the scaler shows (its events and
//! job table); what the double saw (its requests, read as RBAC calls and checked
//! against the scaler's Role in `infra/k8s/base/rbac.yaml`).
//!
//! Included by each Kubernetes test file with `#[path = "support/kube.rs"] mod cluster;`
//! next to `mod support;`, whose [`Scaler`] and producer it uses.
// Each test crate including this module uses part of it.
#![allow(dead_code)]

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    future::Future,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use k8s_openapi::api::batch::v1::Job;
use reqwest::StatusCode;
use serde_json::Value;
use spillway_common::rabbit_api::QueueStats;
use spillway_scaler::{
    config::Settings,
    launcher::{kube::JobTemplate, spec::WorkerEnv},
};
use spillway_testkit::{
    TestDatabase, TestVhost,
    kube_api::{KubeApi, KubeApiConfig, RequestRecord},
};
use tokio_util::sync::CancellationToken;

use crate::support::{Scaler, free_port, start_producer_with};

pub const NAMESPACE: &str = "spillway";
/// How long any one thing may take before a test gives up on it.
pub const PATIENCE: Duration = Duration::from_secs(60);
/// The label the scaler's watch selects on (`app.kubernetes.io/managed-by=spillway-scaler`).
pub const MANAGED_BY_SELECTOR: &str =
    "labelSelector=app.kubernetes.io%2Fmanaged-by%3Dspillway-scaler";
/// The Secret and ConfigMap the worker Jobs read (the scaler's defaults).
pub const SECRET: (&str, &str) = ("spillway-rabbitmq", "amqp-url");
/// The Secret the worker Jobs read `DATABASE_URL` from (the scaler's default).
pub const DATABASE_SECRET: (&str, &str) = ("spillway-postgres", "url");
pub const CONFIG_MAP: (&str, &str) = ("spillway-jobs", "jobs.toml");

/// The `worker` binary cargo built next to the scaler: what the double's pods run.
pub fn worker_binary() -> PathBuf {
    let worker = PathBuf::from(env!("CARGO_BIN_EXE_scaler")).with_file_name("worker");
    assert!(
        worker.exists(),
        "{} is missing: build it first (`cargo test --workspace` does)",
        worker.display()
    );
    worker
}

pub fn name_of(job: &Job) -> String {
    job.metadata.name.clone().unwrap_or_default()
}

/// Whether `job` has condition `kind` (`Complete`, `Failed`) set to True.
pub fn condition(job: &Job, kind: &str) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == kind && c.status == "True"))
}

pub async fn ready(url: &str) -> bool {
    reqwest::get(format!("{url}/readyz"))
        .await
        .is_ok_and(|r| r.status() == StatusCode::OK)
}

/// The scaler's list and watch of its Jobs reached the double, authorised.
pub fn watched_its_jobs(api: &KubeApi) -> bool {
    let requests = api.requests();
    let jobs = |r: &&RequestRecord| {
        r.method == "GET" && r.path == jobs_path() && r.query.contains(MANAGED_BY_SELECTOR)
    };
    let listed = requests
        .iter()
        .filter(jobs)
        .any(|r| !r.query.contains("watch=true"));
    let watched = requests
        .iter()
        .filter(jobs)
        .any(|r| r.query.contains("watch=true") && r.query.contains("resourceVersion="));
    listed && watched
}

/// Waits for `condition`, and on timeout fails with `what` and what `state` says then
/// (the cluster's pods, the scaler's log: whatever explains the wait).
pub async fn wait_until<F, Fut>(
    what: &str,
    timeout: Duration,
    mut condition: F,
    state: impl Fn() -> String,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !condition().await {
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                state()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The path of the namespace's Jobs, and of Job `name`.
pub fn jobs_path() -> String {
    format!("/apis/batch/v1/namespaces/{NAMESPACE}/jobs")
}

pub fn job_path(name: &str) -> String {
    format!("{}/{name}", jobs_path())
}

/// DELETE requests the double received for Job `name`.
pub fn deletes_of(api: &KubeApi, name: &str) -> usize {
    api.requests()
        .iter()
        .filter(|r| r.method == "DELETE" && r.path == job_path(name))
        .count()
}

/// Jobs created for real (dry runs left out).
pub fn jobs_created(api: &KubeApi) -> usize {
    api.requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path == jobs_path() && !r.query.contains("dryRun"))
        .count()
}

/// Every Job the double holds or has removed (deleted, or collected after its TTL).
pub fn every_job(api: &KubeApi) -> Vec<Job> {
    let mut jobs = api.removed_jobs();
    jobs.extend(api.jobs());
    jobs
}

/// A worker Job template and environment for Jobs a test creates itself (left-overs
/// of another scaler), reading the same Secret and ConfigMap as the scaler's: the
/// environment is the scaler's own `WorkerEnv::from_settings`.
pub fn job_template(images: &[(&str, &str)]) -> (JobTemplate, WorkerEnv) {
    let template = JobTemplate {
        images: images
            .iter()
            .map(|(job_type, image)| (job_type.to_string(), image.to_string()))
            .collect(),
        image_pull_policy: "IfNotPresent".into(),
        ttl_seconds_after_finished: 60,
        termination_grace_seconds: 5,
        cpu_request: "100m".into(),
        memory_request: "64Mi".into(),
        cpu_limit: "1".into(),
        memory_limit: "256Mi".into(),
        tmp_size_limit: "16Mi".into(),
    };
    let settings = <Settings as clap::Parser>::parse_from([
        "scaler",
        &format!("--worker-secret={}", SECRET.0),
        &format!("--worker-secret-key={}", SECRET.1),
        &format!("--worker-configmap={}", CONFIG_MAP.0),
        &format!("--worker-configmap-key={}", CONFIG_MAP.1),
    ]);
    (template, WorkerEnv::from_settings(&settings))
}

/// Everything but the scaler: RabbitMQ (a vhost of its own), the double, a producer.
/// Dropping it stops the producer and the double (and so every worker) and deletes the
/// vhost.
pub struct Cluster {
    // Declared first, dropped first: the workers stop before their vhost goes.
    pub api: KubeApi,
    pub vhost: TestVhost,
    pub producer: String,
    stop_producer: CancellationToken,
    /// The ledger the producer, the scaler and the workers share.
    pub database: TestDatabase,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// A cluster whose scaler, producer and workers all read `jobs` (the job-types
    /// file); the double is configured by `double` (which binary its images run).
    pub async fn start(label: &str, jobs: &str, double: KubeApiConfig) -> Self {
        let vhost = TestVhost::new(label).await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("jobs.toml"), jobs).unwrap();
        let database = TestDatabase::new(label).await;
        let api = KubeApi::start(double);
        api.put_secret(SECRET.0, [(SECRET.1, vhost.amqp_url.as_str())]);
        api.put_secret(
            DATABASE_SECRET.0,
            [(DATABASE_SECRET.1, database.url.as_str())],
        );
        api.put_config_map(CONFIG_MAP.0, [(CONFIG_MAP.1, jobs)]);
        let (producer, stop_producer) =
            start_producer_with(&vhost, dir.path(), &["--database-url", &database.url]).await;
        Cluster {
            api,
            vhost,
            producer,
            stop_producer,
            database,
            dir,
        }
    }

    /// The double, running the `worker` binary for any image.
    pub fn double() -> KubeApiConfig {
        KubeApiConfig::new(NAMESPACE).default_binary(worker_binary())
    }

    /// From now on the workers read `jobs` (the ConfigMap), not the scaler's file.
    pub fn workers_read(&self, jobs: &str) {
        self.api
            .put_config_map(CONFIG_MAP.0, [(CONFIG_MAP.1, jobs)]);
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The scaler's settings for the Kubernetes launcher against this double, with
    /// short grace periods; `extra` adds to them or overrides them.
    pub fn scaler_env(&self, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let kubeconfig = self.api.kubeconfig_path().display().to_string();
        let base = [
            ("DATABASE_URL", self.database.url.as_str()),
            ("LAUNCHER", "kubernetes"),
            ("KUBECONFIG", kubeconfig.as_str()),
            ("KUBE_NAMESPACE", NAMESPACE),
            ("DRAIN_GRACE_SECONDS", "5"),
            ("WORKER_TTL_SECONDS", "3"),
            ("WORKER_STOP_GRACE_SECONDS", "5"),
            // Workers report every 5 s (the default: the Job sets no PROGRESS_SECONDS);
            // a report is stale only after three of them are missed.
            ("REPORT_STALE_SECONDS", "15"),
        ];
        base.iter()
            .chain(extra)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Starts the scaler (its log in `scaler.log`) and waits until it is ready and
    /// watching its Jobs on the double.
    pub async fn start_scaler(&self, extra: &[(&str, &str)]) -> Scaler {
        let env = self.scaler_env(extra);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let scaler = Scaler::start_with(&self.vhost, self.dir(), "scaler.log", &env);
        wait_until(
            "the scaler to be ready and watching its Jobs on the double",
            PATIENCE,
            || async { ready(&scaler.url).await && watched_its_jobs(&self.api) },
            || self.scaler_log(),
        )
        .await;
        scaler
    }

    /// Runs the scaler, expecting it to stop by itself: its exit status and stderr.
    pub async fn run_scaler_to_exit(
        &self,
        extra: &[(&str, &str)],
    ) -> (std::process::ExitStatus, String) {
        let mut scaler = tokio::process::Command::new(env!("CARGO_BIN_EXE_scaler"))
            .env("AMQP_URL", &self.vhost.amqp_url)
            .env("RABBITMQ_API_URL", &self.vhost.api_url)
            .env("JOBS_CONFIG", self.dir().join("jobs.toml"))
            .env("SCALER_LISTEN", format!("127.0.0.1:{}", free_port()))
            .envs(self.scaler_env(extra))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the scaler");
        let status = tokio::time::timeout(PATIENCE, scaler.wait())
            .await
            .unwrap_or_else(|_| panic!("the scaler still runs after {PATIENCE:?}"))
            .unwrap();
        let mut stderr = String::new();
        use tokio::io::AsyncReadExt;
        scaler
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .await
            .unwrap();
        (status, stderr)
    }

    pub fn scaler_log(&self) -> String {
        let log = std::fs::read_to_string(self.dir().join("scaler.log")).unwrap_or_default();
        format!("scaler log:\n{log}")
    }

    /// Each pod: its phase, why it waits, and its log.
    pub fn pods(&self) -> String {
        self.api
            .pods()
            .iter()
            .map(|p| {
                let name = p.metadata.name.clone().unwrap_or_default();
                let status = p.status.clone().unwrap_or_default();
                let waiting: Vec<String> = status
                    .container_statuses
                    .iter()
                    .flatten()
                    .filter_map(|c| c.state.as_ref()?.waiting.as_ref()?.reason.clone())
                    .collect();
                format!(
                    "--- pod {name}: {} {waiting:?}\n{}",
                    status.phase.unwrap_or_default(),
                    self.api.pod_log(&name)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The pods and the scaler's log, for a failure message.
    pub fn state(&self) -> String {
        format!("pods:\n{}\n{}", self.pods(), self.scaler_log())
    }

    pub async fn queue(&self, queue: &str) -> QueueStats {
        self.vhost.api.queue_stats(queue).await.unwrap()
    }

    /// Waits until `rows` rows of `queue` have been settled (acknowledged, or
    /// dead-lettered and then acknowledged) and none is left.
    /// A failure says what the management API answered last.
    pub async fn wait_until_settled(&self, queue: &str, rows: u64) {
        let last = RefCell::new(String::from("nothing yet"));
        wait_until(
            &format!("{rows} rows of {queue} settled"),
            PATIENCE,
            || async {
                let stats = self.vhost.api.queue_stats(queue).await;
                *last.borrow_mut() = match &stats {
                    Ok(q) => format!("{q:?}"),
                    Err(e) => e.to_string(),
                };
                stats.is_ok_and(|q| q.ready == 0 && q.unacked == 0 && q.acked_total >= rows)
            },
            || format!("{queue} last: {}\n{}", last.borrow(), self.state()),
        )
        .await;
    }

    /// Waits for a pod whose log contains `text`, and returns its Job's name.
    pub async fn wait_for_pod_log(&self, text: &str) -> String {
        let job_of = || {
            self.api.pods().into_iter().find_map(|p| {
                let pod = p.metadata.name.clone()?;
                self.api
                    .pod_log(&pod)
                    .contains(text)
                    .then(|| p.metadata.labels?.get("job-name").cloned())?
            })
        };
        wait_until(
            &format!("a pod logging {text:?}"),
            PATIENCE,
            || async { job_of().is_some() },
            || self.state(),
        )
        .await;
        job_of().unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_producer.cancel();
    }
}

/// GET `path` on the scaler, as JSON.
pub async fn scaler_json(scaler: &Scaler, path: &str) -> Value {
    let Ok(response) = reqwest::get(format!("{}{path}", scaler.url)).await else {
        return Value::Null;
    };
    response.json().await.unwrap_or(Value::Null)
}

/// The scaler's scaling events (`/api/events`), newest first.
pub async fn scaling_events(scaler: &Scaler) -> Vec<Value> {
    match scaler_json(scaler, "/api/events").await {
        Value::Array(events) => events,
        _ => Vec::new(),
    }
}

/// The scaler's job table (`/api/jobs`).
pub async fn job_table(scaler: &Scaler) -> Vec<Value> {
    match scaler_json(scaler, "/api/jobs").await {
        Value::Array(jobs) => jobs,
        _ => Vec::new(),
    }
}

/// Waits for a scaling event that `matches`, and returns it.
pub async fn wait_for_event(
    cluster: &Cluster,
    scaler: &Scaler,
    what: &str,
    matches: impl Fn(&Value) -> bool,
) -> Value {
    let found = || async { scaling_events(scaler).await.into_iter().find(&matches) };
    wait_until(
        what,
        PATIENCE,
        || async { found().await.is_some() },
        || cluster.state(),
    )
    .await;
    found().await.unwrap()
}

/// Whether scaling event `event` is a `action` that names `worker`.
pub fn names(event: &Value, action: &str, worker: &str) -> bool {
    event["action"] == action
        && event["workers"]
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w == worker))
}

/// One kind of API call, as RBAC sees it: a verb on a resource of an API group.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Call {
    pub group: String,
    pub resource: String,
    pub verb: String,
}

impl std::fmt::Display for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        write!(f, "{} {}/{}", self.verb, group, self.resource)
    }
}

/// The RBAC call a request is, as the API server's authorizer reads it; `None` for
/// non-resource URLs (`/version`, discovery), which the Role does not govern.
pub fn call_of(request: &RequestRecord) -> Option<Call> {
    let segments: Vec<&str> = request.path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match segments.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let rest = match rest {
        ["namespaces", _, tail @ ..] if !tail.is_empty() => tail,
        rest => rest,
    };
    let (resource, named) = match rest {
        [] => return None,
        [resource] => (resource.to_string(), false),
        [resource, _name] => (resource.to_string(), true),
        [resource, _name, subresource] => (format!("{resource}/{subresource}"), true),
        _ => panic!("an API path the test cannot read: {}", request.path),
    };
    let watch = request
        .query
        .split('&')
        .any(|p| p == "watch=true" || p == "watch=1");
    let verb = match (request.method.as_str(), named) {
        ("GET", _) if watch => "watch",
        ("GET", false) => "list",
        ("GET", true) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        (method, _) => panic!("a method the test cannot read: {method} {}", request.path),
    };
    Some(Call {
        group: group.to_string(),
        resource,
        verb: verb.to_string(),
    })
}

/// Every kind of call the double received. Only the scaler may have sent them: a
/// test that calls the double's API itself must not use this.
pub fn calls(api: &KubeApi) -> BTreeSet<Call> {
    api.requests().iter().filter_map(call_of).collect()
}

/// What the scaler's Role in `infra/k8s/base/rbac.yaml` grants, rule by rule expanded
/// into calls. Read line by line: the file writes each rule's `apiGroups`,
/// `resources` and `verbs` as one-line flow lists (`verbs: ["list"]`), which is all
/// this reads (anything else there fails the test, naming the line).
pub fn role_grants() -> BTreeSet<Call> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra/k8s/base/rbac.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let role = text
        .split("\n---")
        .find(|doc| doc.lines().any(|l| l.trim() == "kind: Role"))
        .unwrap_or_else(|| panic!("no Role in {}", path.display()));
    let mut rules: Vec<BTreeMap<&str, Vec<String>>> = Vec::new();
    let mut in_rules = false;
    for line in role.lines() {
        if !line.starts_with(' ') && !line.starts_with('-') {
            in_rules = line.trim_end() == "rules:";
            continue;
        }
        if !in_rules || line.trim().is_empty() || line.trim().starts_with('#') {
            continue;
        }
        let item = line.trim();
        let (new_rule, item) = match item.strip_prefix("- ") {
            Some(item) => (true, item),
            None => (false, item),
        };
        let (key, value) = item
            .split_once(':')
            .unwrap_or_else(|| panic!("a Role rule line the test cannot read: {line:?}"));
        let items = value
            .trim()
            .strip_prefix('[')
            .and_then(|v| v.strip_suffix(']'))
            .unwrap_or_else(|| panic!("not a one-line flow list: {line:?}"));
        // `[""]` is the core API group: an empty name, not an empty list.
        let list = match items.trim() {
            "" => Vec::new(),
            items => items
                .split(',')
                .map(|v| v.trim().trim_matches('"').to_string())
                .collect(),
        };
        if new_rule {
            rules.push(BTreeMap::new());
        }
        rules
            .last_mut()
            .unwrap_or_else(|| panic!("a rule line before any rule: {line:?}"))
            .insert(key.trim(), list);
    }
    let mut grants = BTreeSet::new();
    for rule in &rules {
        let field = |key: &str| {
            rule.get(key)
                .unwrap_or_else(|| panic!("a Role rule without {key}: {rule:?}"))
        };
        for group in field("apiGroups") {
            for resource in field("resources") {
                for verb in field("verbs") {
                    assert!(
                        group != "*" && resource != "*" && verb != "*",
                        "a wildcard in the Role: {rule:?}"
                    );
                    grants.insert(Call {
                        group: group.clone(),
                        resource: resource.clone(),
                        verb: verb.clone(),
                    });
                }
            }
        }
    }
    assert!(!grants.is_empty(), "the Role grants nothing? {role}");
    grants
}

fn listed(calls: &BTreeSet<Call>) -> String {
    calls
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every call the scaler made is one its Role allows: in a cluster none would be
/// refused.
pub fn assert_calls_allowed_by_the_role(api: &KubeApi) {
    let grants = role_grants();
    let refused: BTreeSet<Call> = calls(api).difference(&grants).cloned().collect();
    assert!(
        refused.is_empty(),
        "calls the Role in infra/k8s/base/rbac.yaml does not allow: {}\n(it grants {})",
        listed(&refused),
        listed(&grants)
    );
}

/// Least privilege: the Role grants exactly the calls the scaler made, for a run that
/// makes every kind of call the scaler has.
pub fn assert_role_grants_exactly_the_calls_made(api: &KubeApi) {
    assert_calls_allowed_by_the_role(api);
    let unused: BTreeSet<Call> = role_grants().difference(&calls(api)).cloned().collect();
    assert!(
        unused.is_empty(),
        "the Role in infra/k8s/base/rbac.yaml grants what the scaler never used: {}\n(it used {})",
        listed(&unused),
        listed(&calls(api))
    );
}

/// The pods of the double whose directory was `double_dir` did not outlive it (the
/// scaler leaves workers running by design; the double is what runs them here). Its
/// workers are known by their `JOBS_CONFIG`, a file in that directory.
pub fn assert_no_worker_outlives_the_double(double_dir: &Path) {
    let marker = format!("JOBS_CONFIG={}/", double_dir.display()).into_bytes();
    let leftovers: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("environ")).ok())
        .filter(|environ| environ.split(|b| *b == 0).any(|v| v.starts_with(&marker)))
        .map(|environ| String::from_utf8_lossy(&environ).into_owned())
        .collect();
    assert!(
        leftovers.is_empty(),
        "worker processes outlived the double: {leftovers:?}"
    );
}
