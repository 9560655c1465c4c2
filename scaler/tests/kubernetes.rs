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
//!   workers drain after the idle window, every Job ends `Complete`, nothing is lost,
//!   and every call the scaler made is one its Role (`infra/k8s/base/rbac.yaml`) allows.
//!
//! Issue 16's runtime defects, each on the same double, are in `kubernetes_defects.rs`;
//! the set-up both share is `support/kube.rs`.

#[path = "support/kube.rs"]
mod cluster;
mod support;

use spillway_ledger::{BatchFilter, BatchState, Ledger};
use std::process::{Child, Command, Stdio};

use cluster::{
    Cluster, NAMESPACE, PATIENCE, assert_calls_allowed_by_the_role,
    assert_no_worker_outlives_the_double, condition, name_of, ready, watched_its_jobs,
};
use k8s_openapi::api::batch::v1::Job;
use kube::{Api, api::ListParams};
use spillway_testkit::kube_api::{Fault, KubeApi, KubeApiConfig};
use spillway_testkit::wait_for;
use support::{free_port, numbered_csv, upload};

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

/// The smallest job-types file: one job type, nothing else.
const ONE_JOB_TYPE: &str = "[job_types.default]\nqueue = \"tasks\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scaler_binary_becomes_ready_against_the_api_through_a_kubeconfig() {
    let cluster = Cluster::start("k8s-ready", ONE_JOB_TYPE, KubeApiConfig::new(NAMESPACE)).await;
    // Waits for /readyz to answer 200 and for the list and watch of its Jobs.
    let scaler = cluster.start_scaler(&[]).await;
    let log = cluster.scaler_log();
    assert!(ready(&scaler.url).await, "still ready: {log}");
    assert!(
        !log.contains("panicked"),
        "the scaler's log shows a panic: {log}"
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
    let cluster =
        Cluster::start("k8s-incluster", ONE_JOB_TYPE, KubeApiConfig::new(NAMESPACE)).await;
    let (api, vhost, dir) = (&cluster.api, &cluster.vhost, cluster.dir());
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
        || async { watched_its_jobs(api) },
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
    let cluster = Cluster::start("k8s-e2e", JOBS, Cluster::double()).await;
    let api = &cluster.api;
    let scaler = cluster.start_scaler(&[]).await;

    upload(&cluster.producer, numbered_csv(ROWS as usize)).await;
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

    cluster.wait_until_settled("tasks", ROWS).await;
    let queue = cluster.queue("tasks").await;
    assert_eq!(
        queue.acked_total,
        ROWS,
        "each row acknowledged once; pods:\n{}",
        cluster.pods()
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
        "every worker Job ends Complete: {ended:?}\n{}",
        cluster.state()
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

    let dead = cluster.queue("tasks.dead").await;
    assert_eq!(dead.ready, 0, "nothing dead-lettered");
    let queue = cluster.queue("tasks").await;
    assert_eq!(
        (queue.ready, queue.unacked, queue.acked_total),
        (0, 0, ROWS),
        "nothing lost, nothing left"
    );
    // The Job pods read DATABASE_URL from their Secret: every outcome is in the ledger.
    let ledger = Ledger::open(&cluster.database.url, 1).unwrap();
    let batches = ledger
        .batches(&BatchFilter {
            limit: 10,
            ..BatchFilter::default()
        })
        .await
        .unwrap();
    let [batch] = &batches[..] else {
        panic!("one batch in the ledger, not {batches:?}")
    };
    assert_eq!(
        (batch.state, batch.done, batch.pending),
        (BatchState::Done, ROWS, 0),
        "every row done in the ledger"
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
    assert_calls_allowed_by_the_role(api);
    let double_dir = api.dir().to_path_buf();
    drop(scaler);
    drop(cluster);
    assert_no_worker_outlives_the_double(&double_dir);
}

#[tokio::test]
async fn a_finished_worker_job_is_forgotten_by_deleting_it_and_a_gone_one_is_no_error() {
    use clap::Parser as _;
    use k8s_openapi::api::batch::v1::JobStatus;
    use spillway_common::jobs_config::JobsConfig;
    use spillway_scaler::{
        config::Settings,
        launcher::{
            Launcher as _,
            kube::{KubeLauncher, worker_job},
            spec::WorkerEnv,
            worker_name,
        },
    };

    let api = KubeApi::start(KubeApiConfig::new(NAMESPACE));
    let settings = Settings::parse_from(["scaler"]);
    let jobs = JobsConfig::default();
    let (template, env) = (
        settings.job_template(&jobs),
        WorkerEnv::from_settings(&settings),
    );
    let mut names = Vec::new();
    for succeeded in [true, false] {
        let name = worker_name("default");
        let mut job = worker_job(&template, &env.spec("default", &name)).unwrap();
        job.metadata.namespace = Some(NAMESPACE.into());
        job.status = Some(JobStatus {
            succeeded: Some(i32::from(succeeded)),
            failed: Some(i32::from(!succeeded)),
            ..JobStatus::default()
        });
        api.put_job(job);
        names.push(name);
    }
    let (launcher, watch) = KubeLauncher::new(api.client().await, NAMESPACE, template, env);
    tokio::spawn(watch);
    let listed = || async {
        launcher
            .workers()
            .await
            .map(|ws| ws.into_iter().map(|w| w.name).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    wait_for("the watch to list both Jobs", PATIENCE, || async {
        listed().await.len() == 2
    })
    .await;

    launcher.forget(&names[0]).await.unwrap();
    assert!(api.job(&names[0]).is_none(), "the Job is deleted");
    wait_for("the watch to drop the forgotten Job", PATIENCE, || async {
        listed().await == [names[1].clone()]
    })
    .await;
    launcher
        .forget(&names[0])
        .await
        .expect("a Job gone already (its TTL, say) is forgotten all the same");
}
