//! The Kubernetes path through the real client stack, against the kube-api double
//! (`spillway-testkit`) over TLS with a CA the client must verify:
//!
//! - `kube::Client::try_default()` finds the double from `KUBECONFIG` and lists Jobs;
//! - the real `scaler` binary with `LAUNCHER=kubernetes` becomes ready and watches its
//!   Jobs, configured by a kubeconfig, and again from the in-cluster service-account
//!   files (under `unshare -m`, with no kubeconfig at all);
//! - the whole pipeline: the producer, the scaler with `LAUNCHER=kubernetes`, and real
//!   `worker` processes run by the double from the scaler's own Job spec (broker URL
//!   from a Secret, job types from a ConfigMap): every uploaded row is processed, the
//!   workers drain after the idle window, every Job ends `Complete`, nothing is lost.

mod support;

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use k8s_openapi::api::batch::v1::Job;
use kube::{Api, api::ListParams};
use reqwest::StatusCode;
use spillway_common::testing::{TestVhost, wait_for};
use spillway_testkit::kube_api::{Fault, KubeApi, KubeApiConfig};
use support::{Scaler, free_port, numbered_csv, start_producer, upload};

const NAMESPACE: &str = "spillway";
const PATIENCE: Duration = Duration::from_secs(90);
/// The label the scaler's watch selects on (`app.kubernetes.io/managed-by=spillway-scaler`).
const MANAGED_BY_SELECTOR: &str = "labelSelector=app.kubernetes.io%2Fmanaged-by%3Dspillway-scaler";

fn worker_binary() -> PathBuf {
    let worker = PathBuf::from(env!("CARGO_BIN_EXE_scaler")).with_file_name("worker");
    assert!(
        worker.exists(),
        "{} is missing: build it first (`cargo test --workspace` does)",
        worker.display()
    );
    worker
}

fn name_of(job: &Job) -> String {
    job.metadata.name.clone().unwrap_or_default()
}

fn condition(job: &Job, kind: &str) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == kind && c.status == "True"))
}

async fn ready(url: &str) -> bool {
    reqwest::get(format!("{url}/readyz"))
        .await
        .is_ok_and(|r| r.status() == StatusCode::OK)
}

/// The scaler's list and watch of its Jobs reached the double, authorised.
fn watched_its_jobs(api: &KubeApi) -> bool {
    let requests = api.requests();
    let jobs = |r: &&spillway_testkit::kube_api::RequestRecord| {
        r.method == "GET"
            && r.path == format!("/apis/batch/v1/namespaces/{NAMESPACE}/jobs")
            && r.query.contains(MANAGED_BY_SELECTOR)
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

/// Run in a child process (its environment is its own, and edition 2024 makes
/// changing this process's environment unsafe): the client exactly as production
/// builds it, from `KUBECONFIG`.
#[tokio::test]
#[ignore = "a probe: client_try_default_finds_the_api_through_kubeconfig runs it with KUBECONFIG set"]
async fn probe_try_default_lists_jobs() {
    let client = kube::Client::try_default()
        .await
        .expect("Client::try_default from KUBECONFIG");
    let jobs: Api<Job> = Api::default_namespaced(client);
    let names: Vec<String> = jobs
        .list(&ListParams::default())
        .await
        .expect("list Jobs")
        .items
        .iter()
        .map(name_of)
        .collect();
    println!("PROBE-JOBS {}", names.join(","));
}

#[tokio::test]
async fn client_try_default_finds_the_api_through_kubeconfig() {
    let api = KubeApi::start(KubeApiConfig::new(NAMESPACE));
    api.set_fault(Fault::Pending);
    let job: Job = serde_json::from_value(serde_json::json!({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "listed"},
        "spec": {"template": {"spec": {"restartPolicy": "Never",
                 "containers": [{"name": "c", "image": "i:1"}]}}}
    }))
    .unwrap();
    Api::<Job>::namespaced(api.client().await, NAMESPACE)
        .create(&Default::default(), &job)
        .await
        .unwrap();
    let home = tempfile::tempdir().unwrap();
    let probe = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "probe_try_default_lists_jobs",
            "--nocapture",
        ])
        .env("KUBECONFIG", api.kubeconfig_path())
        // No ~/.kube/config of this machine's user can stand in for the double's.
        .env("HOME", home.path())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&probe.stdout);
    assert!(
        probe.status.success(),
        "the probe failed: {stdout}\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    assert!(
        stdout.contains("PROBE-JOBS listed\n"),
        "the Job in the kubeconfig's namespace: {stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scaler_binary_becomes_ready_against_the_api_through_a_kubeconfig() {
    let vhost = TestVhost::new("k8s-ready").await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    std::fs::write(
        dir.join("jobs.toml"),
        "[job_types.default]\nqueue = \"tasks\"\n",
    )
    .unwrap();
    let api = KubeApi::start(KubeApiConfig::new(NAMESPACE));
    let kubeconfig = api.kubeconfig_path().to_str().unwrap().to_string();
    let scaler = Scaler::start_with(
        &vhost,
        dir,
        "scaler.log",
        &[
            ("LAUNCHER", "kubernetes"),
            ("KUBECONFIG", &kubeconfig),
            ("KUBE_NAMESPACE", NAMESPACE),
        ],
    );
    let log = || std::fs::read_to_string(dir.join("scaler.log")).unwrap_or_default();
    wait_for("the scaler's /readyz to answer 200", PATIENCE, || async {
        ready(&scaler.url).await
    })
    .await;
    wait_for(
        "the scaler to list and watch its Jobs on the double",
        PATIENCE,
        || async { watched_its_jobs(&api) },
    )
    .await;
    assert!(ready(&scaler.url).await, "still ready: {}", log());
    assert!(
        !log().contains("panicked"),
        "the scaler's log shows a panic: {}",
        log()
    );
}

/// A child process that is SIGKILLed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether this process may make a mount namespace and mount in it (root on Linux).
fn can_unshare_mounts() -> bool {
    Command::new("unshare")
        .args(["-m", "sh", "-c", "mount -t tmpfs tmpfs /mnt"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scaler_binary_becomes_ready_in_cluster_from_the_service_account_files() {
    if !can_unshare_mounts() {
        eprintln!(
            "SKIPPED: `unshare -m` with a tmpfs mount is not available here (it needs root); \
             the in-cluster configuration is not tested"
        );
        return;
    }
    let vhost = TestVhost::new("k8s-incluster").await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    std::fs::write(
        dir.join("jobs.toml"),
        "[job_types.default]\nqueue = \"tasks\"\n",
    )
    .unwrap();
    let api = KubeApi::start(KubeApiConfig::new(NAMESPACE));
    let service_account = dir.join("serviceaccount");
    api.write_in_cluster_files(&service_account);
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    // A private mount namespace with a tmpfs on /run (/var/run points there), holding
    // the service-account files where every pod has them. No KUBECONFIG, no LAUNCHER,
    // no KUBE_NAMESPACE: inside a cluster all three come from there.
    let script = r#"set -e
mount -t tmpfs tmpfs /run
mkdir -p /run/secrets/kubernetes.io/serviceaccount
cp "$SERVICE_ACCOUNT"/* /run/secrets/kubernetes.io/serviceaccount/
exec "$SCALER""#;
    let scaler = Killed(
        Command::new("unshare")
            .args(["-m", "sh", "-c", script])
            .env_remove("KUBECONFIG")
            .env_remove("LAUNCHER")
            .env_remove("KUBE_NAMESPACE")
            .env("HOME", dir)
            .env("SERVICE_ACCOUNT", &service_account)
            .env("SCALER", env!("CARGO_BIN_EXE_scaler"))
            .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
            .env("KUBERNETES_SERVICE_PORT", api.port().to_string())
            .env("AMQP_URL", &vhost.amqp_url)
            .env("RABBITMQ_API_URL", &vhost.api_url)
            .env("JOBS_CONFIG", dir.join("jobs.toml"))
            .env("SCALER_LISTEN", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("scaler.log")).unwrap())
            .spawn()
            .expect("start the scaler under unshare"),
    );
    let log = || std::fs::read_to_string(dir.join("scaler.log")).unwrap_or_default();
    wait_for(
        "the in-cluster scaler's /readyz to answer 200",
        PATIENCE,
        || async { ready(&url).await },
    )
    .await;
    wait_for(
        "the in-cluster scaler to list and watch its Jobs on the double",
        PATIENCE,
        || async { watched_its_jobs(&api) },
    )
    .await;
    assert!(
        log().contains("workers run as Kubernetes Jobs") && log().contains(NAMESPACE),
        "the Kubernetes launcher by default, in the namespace from the file: {}",
        log()
    );
    drop(scaler);
}

/// 200 rows at 200 ms each keep a few workers busy for a few seconds.
const JOBS: &str = r#"
tick_seconds = 1
idle_seconds = 3

[job_types.default]
queue = "tasks"
handler = "simulate"
simulate_ms = 200
max_jobs = 4
"#;
const ROWS: u64 = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploaded_rows_are_processed_by_worker_jobs_that_end_complete() {
    let vhost = TestVhost::new("k8s-e2e").await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    std::fs::write(dir.join("jobs.toml"), JOBS).unwrap();
    let api = KubeApi::start(KubeApiConfig::new(NAMESPACE).default_binary(worker_binary()));
    api.put_secret("spillway-rabbitmq", [("amqp-url", vhost.amqp_url.as_str())]);
    api.put_config_map("spillway-jobs", [("jobs.toml", JOBS)]);
    let (producer, stop_producer) = start_producer(&vhost, dir).await;
    let kubeconfig = api.kubeconfig_path().to_str().unwrap().to_string();
    let scaler = Scaler::start_with(
        &vhost,
        dir,
        "scaler.log",
        &[
            ("LAUNCHER", "kubernetes"),
            ("KUBECONFIG", &kubeconfig),
            ("KUBE_NAMESPACE", NAMESPACE),
            ("DRAIN_GRACE_SECONDS", "5"),
            ("WORKER_TTL_SECONDS", "3"),
            ("WORKER_STOP_GRACE_SECONDS", "5"),
            // Workers report every 5 s (the default: the Job sets no PROGRESS_SECONDS);
            // a report is stale only after three of them are missed.
            ("REPORT_STALE_SECONDS", "15"),
        ],
    );
    let scaler_log = || std::fs::read_to_string(dir.join("scaler.log")).unwrap_or_default();
    let pod_logs = || {
        api.pods()
            .iter()
            .map(|p| {
                let name = p.metadata.name.clone().unwrap_or_default();
                format!("--- {name}\n{}", api.pod_log(&name))
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    wait_for("the scaler to be ready", PATIENCE, || async {
        ready(&scaler.url).await && watched_its_jobs(&api)
    })
    .await;

    upload(&producer, numbered_csv(ROWS as usize)).await;
    wait_for(
        "workers started as Jobs with running pods",
        PATIENCE,
        || async {
            api.pods().iter().any(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.phase.as_deref())
                    .is_some_and(|phase| phase == "Running" || phase == "Succeeded")
            })
        },
    )
    .await;
    let first = api.jobs().into_iter().next().expect("a worker Job");
    let labels = first.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("spillway.dev/job-type").map(String::as_str),
        Some("default")
    );

    wait_for("every row acknowledged", PATIENCE, || async {
        vhost
            .api
            .queue_stats("tasks")
            .await
            .is_ok_and(|q| q.ready == 0 && q.unacked == 0 && q.acked_total >= ROWS)
    })
    .await;
    let queue = vhost.api.queue_stats("tasks").await.unwrap();
    assert_eq!(
        queue.acked_total,
        ROWS,
        "each row acknowledged once; pods:\n{}",
        pod_logs()
    );

    // After the idle window the scaler asks the workers to drain; each exits 0, so
    // each Job ends Complete (and may then be collected after its 3 s TTL).
    wait_for(
        "every worker Job to end Complete after the idle window",
        PATIENCE,
        || async {
            let jobs = api.jobs();
            let finished = |j: &Job| condition(j, "Complete") || condition(j, "Failed");
            let terminal = |phase: Option<&str>| matches!(phase, Some("Succeeded" | "Failed"));
            (!jobs.is_empty() || !api.removed_jobs().is_empty())
                && jobs.iter().all(finished)
                && api
                    .pods()
                    .iter()
                    .all(|p| terminal(p.status.as_ref().and_then(|s| s.phase.as_deref())))
        },
    )
    .await;
    let mut ended: Vec<(String, &str)> = api
        .jobs()
        .iter()
        .map(|j| {
            (
                name_of(j),
                if condition(j, "Complete") {
                    "Complete"
                } else {
                    "not Complete"
                },
            )
        })
        .collect();
    ended.extend(api.removed_jobs().iter().map(|j| {
        let how = if condition(j, "Complete") {
            "Complete, removed after its TTL"
        } else {
            "removed without completing"
        };
        (name_of(j), how)
    }));
    ended.sort();
    eprintln!("worker Jobs: {ended:?}");
    assert!(!ended.is_empty());
    assert!(
        ended.iter().all(|(_, how)| how.starts_with("Complete")),
        "every worker Job ends Complete: {ended:?}\nscaler log:\n{}\npods:\n{}",
        scaler_log(),
        pod_logs()
    );
    let spawned = scaler
        .metric("spillway_scaler_decisions_total{job_type=\"default\",action=\"spawn\"}")
        .await;
    assert_eq!(
        spawned,
        ended.len() as u64,
        "one Job per spawn decision: {ended:?}"
    );
    assert!(ended.len() <= 4, "never more than max_jobs: {ended:?}");

    let dead = vhost.api.queue_stats("tasks.dead").await.unwrap();
    assert_eq!(dead.ready, 0, "nothing dead-lettered");
    let queue = vhost.api.queue_stats("tasks").await.unwrap();
    assert_eq!(
        (queue.ready, queue.unacked, queue.acked_total),
        (0, 0, ROWS),
        "nothing lost, nothing left"
    );
    let deletes = api
        .requests()
        .iter()
        .filter(|r| r.method == "DELETE")
        .count();
    eprintln!("DELETE requests from the scaler: {deletes}");
    let events: Vec<String> = api
        .events()
        .iter()
        .filter(|e| e.type_.as_deref() == Some("Warning"))
        .map(|e| format!("{:?}: {:?}", e.reason, e.message))
        .collect();
    assert!(events.is_empty(), "no warning events: {events:?}");
    stop_producer.cancel();
    drop(scaler);
    drop(api);
    assert_no_worker_outlives_the_double();
}

/// The double's pods do not outlive it (the scaler leaves workers running by design;
/// the double is what runs them here).
fn assert_no_worker_outlives_the_double() {
    let leftovers: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("environ")).ok())
        .filter(|environ| {
            environ.split(|b| *b == 0).any(|v| {
                v.starts_with(b"JOBS_CONFIG=")
                    && v.windows(b"spillway-kube-api-".len())
                        .any(|w| w == b"spillway-kube-api-")
            })
        })
        .map(|environ| String::from_utf8_lossy(&environ).into_owned())
        .collect();
    assert!(
        leftovers.is_empty(),
        "worker processes outlived the double: {leftovers:?}"
    );
}
