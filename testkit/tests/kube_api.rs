//! The kube-api double through the real kube client (built from the kubeconfig the
//! double writes, over its TLS): Jobs created, listed in pages, watched with
//! resourceVersions (and relisted after a 410), deleted in the foreground and the
//! background, collected after their TTL; invalid Jobs and Pod Security violations
//! refused; each fault mode; no writable `/tmp` under a read-only root without a volume
//! there; pod logs with `tailLines` and `limitBytes`; a client that trusts another CA,
//! or sends another token, refused. The "image" is a small shell script, so none of
//! this needs RabbitMQ.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use futures_util::StreamExt;
use k8s_openapi::api::{batch::v1::Job, core::v1::Pod};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, LogParams, PostParams, WatchEvent, WatchParams},
    runtime::watcher,
};
use serde_json::{Value, json};
use spillway_testkit::kube_api::{Fault, KubeApi, KubeApiConfig};
use spillway_testkit::wait_for;

const NS: &str = "spillway";
const PATIENCE: Duration = Duration::from_secs(20);

/// The "image": prints its greeting, then does what `$MODE` says. `drain` lingers a
/// second after saying so: a pod's log goes with the pod, and a test must get to read it.
const SCRIPT: &str = r#"#!/bin/sh
echo "hello from $HOSTNAME: $GREETING"
case "$MODE" in
  fail) exit 3 ;;
  drain) trap 'echo draining; sleep 1; exit 0' TERM; echo ready; while :; do sleep 0.05; done ;;
  stubborn) trap 'echo ignoring TERM' TERM; echo ready; while :; do sleep 0.05; done ;;
  lines) for n in 1 2 3 4 5; do echo "$n"; done ;;
  files) cat "$CONFIG_FILE"; echo "tmp=$TMPDIR"; touch "$TMPDIR/scratch" && echo wrote-tmp ;;
  mktemp) f=$(mktemp) && echo "wrote $f" && rm "$f" || echo "no temporary file, TMPDIR=$TMPDIR" ;;
esac
"#;

struct Fixture {
    api: KubeApi,
    client: Client,
    // Holds the script for as long as the double may run it.
    _scripts: tempfile::TempDir,
}

impl Fixture {
    async fn new() -> Self {
        Self::with(|config| config).await
    }

    async fn with(configure: impl FnOnce(KubeApiConfig) -> KubeApiConfig) -> Self {
        let scripts = tempfile::tempdir().unwrap();
        let script = write_script(scripts.path());
        let api = KubeApi::start(configure(KubeApiConfig::new(NS).default_binary(script)));
        let client = api.client().await;
        Fixture {
            api,
            client,
            _scripts: scripts,
        }
    }

    fn jobs(&self) -> Api<Job> {
        Api::namespaced(self.client.clone(), NS)
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), NS)
    }

    async fn create(&self, job: &Job) -> Job {
        self.jobs()
            .create(&PostParams::default(), job)
            .await
            .unwrap_or_else(|e| panic!("create {:?}: {e}", job.metadata.name))
    }

    /// Waits for Job `name`'s one pod and returns its name.
    async fn pod_of(&self, job: &str) -> String {
        wait_for(&format!("a pod for Job {job}"), PATIENCE, || async {
            !self.api.pods_of(job).is_empty()
        })
        .await;
        self.api.pods_of(job)[0].metadata.name.clone().unwrap()
    }

    async fn wait_for_log(&self, pod: &str, text: &str) {
        wait_for(
            &format!("{text:?} in pod {pod}'s log"),
            PATIENCE,
            || async { self.api.pod_log(pod).contains(text) },
        )
        .await;
    }

    async fn wait_for_condition(&self, job: &str, condition: &str) -> Job {
        wait_for(
            &format!("Job {job} to be {condition}"),
            PATIENCE,
            || async {
                self.api
                    .job(job)
                    .is_some_and(|j| has_condition(&j, condition))
            },
        )
        .await;
        self.api.job(job).unwrap()
    }
}

fn write_script(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("image.sh");
    std::fs::write(&path, SCRIPT).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A Job as Spillway builds one (Pod Security `restricted`), with `$MODE` set.
fn job(name: &str, mode: &str) -> Job {
    job_with(name, mode, |_| {})
}

fn job_with(name: &str, mode: &str, edit: impl FnOnce(&mut Value)) -> Job {
    let mut value = json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "labels": {"app": "test"}},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"app": "test"}},
                "spec": {
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": 2,
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 10001,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "main", "image": "example/worker:1",
                        "env": [{"name": "MODE", "value": mode},
                                {"name": "GREETING", "value": "hi"}],
                        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"},
                                      "limits": {"cpu": "1", "memory": "256Mi"}},
                        "securityContext": {"allowPrivilegeEscalation": false,
                                            "capabilities": {"drop": ["ALL"]}},
                    }],
                },
            },
        },
    });
    edit(&mut value);
    serde_json::from_value(value).unwrap()
}

fn has_condition(job: &Job, kind: &str) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == kind && c.status == "True"))
}

fn condition_reason(job: &Job, kind: &str) -> Option<String> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)?
        .reason
        .clone()
}

fn waiting_reason(pod: &Pod) -> Option<(String, String)> {
    let waiting = pod
        .status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .waiting
        .clone()?;
    Some((waiting.reason?, waiting.message.unwrap_or_default()))
}

fn api_error(result: Result<Job, kube::Error>) -> kube::core::Status {
    match result {
        Err(kube::Error::Api(status)) => *status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_job_runs_its_pod_to_completion_and_the_watch_shows_every_step() {
    let f = Fixture::new().await;
    let jobs = f.jobs();
    let listed = jobs.list(&ListParams::default()).await.unwrap();
    assert!(listed.items.is_empty());
    let list_rv = listed.metadata.resource_version.unwrap();

    // A watch from the list's version, as the watcher resumes one.
    let events = jobs
        .watch(&WatchParams::default().timeout(20), &list_rv)
        .await
        .unwrap();
    let created = f.create(&job("hello", "")).await;
    assert!(created.metadata.uid.is_some() && created.metadata.resource_version.is_some());
    let template = created.spec.as_ref().unwrap().template.clone();
    assert_eq!(
        template.metadata.unwrap().labels.unwrap()["job-name"],
        "hello",
        "defaulted as the API server does"
    );
    assert_eq!(
        template.spec.unwrap().containers[0]
            .image_pull_policy
            .as_deref(),
        Some("IfNotPresent")
    );

    let mut seen = Vec::new();
    let mut events = Box::pin(events);
    let complete = tokio::time::timeout(PATIENCE, async {
        while let Some(event) = events.next().await {
            match event.unwrap() {
                WatchEvent::Added(job) => seen.push(("ADDED", job)),
                WatchEvent::Modified(job) => {
                    let done = has_condition(&job, "Complete");
                    seen.push(("MODIFIED", job));
                    if done {
                        return;
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await;
    assert!(complete.is_ok(), "the Job never completed: {seen:#?}");
    assert_eq!(seen[0].0, "ADDED");
    let versions: Vec<u64> = seen
        .iter()
        .map(|(_, j)| {
            j.metadata
                .resource_version
                .as_ref()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "resourceVersions increase: {versions:?}"
    );
    assert!(
        seen.iter().any(|(_, j)| j
            .status
            .as_ref()
            .is_some_and(|s| s.active == Some(1) && s.ready == Some(1))),
        "the Job was seen running with a ready pod"
    );
    let done = &seen.last().unwrap().1;
    let status = done.status.as_ref().unwrap();
    assert_eq!(status.succeeded, Some(1));
    assert!(status.completion_time.is_some() && status.start_time.is_some());
    assert!(has_condition(done, "SuccessCriteriaMet"));

    let pod = f.pod_of("hello").await;
    assert!(pod.starts_with("hello-") && pod.len() == "hello-".len() + 5);
    let pod = f.pods().get(&pod).await.unwrap();
    assert_eq!(pod.status.unwrap().phase.as_deref(), Some("Succeeded"));
    let log = f
        .pods()
        .logs(pod.metadata.name.as_ref().unwrap(), &LogParams::default())
        .await
        .unwrap();
    assert_eq!(
        log,
        format!("hello from {}: hi\n", pod.metadata.name.unwrap()),
        "HOSTNAME is the pod's name, env comes from the spec"
    );
}

type WatcherEvent = Result<watcher::Event<Job>, watcher::Error>;

/// Drives `stream` in a task of its own (a watcher only renews its watch while polled)
/// and hands over its events.
fn follow(
    stream: impl futures_util::Stream<Item = WatcherEvent> + Send + 'static,
) -> tokio::sync::mpsc::UnboundedReceiver<WatcherEvent> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = Box::pin(stream);
        while let Some(event) = stream.next().await {
            if tx.send(event).is_err() {
                return;
            }
        }
    });
    rx
}

async fn next_event(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<WatcherEvent>,
) -> WatcherEvent {
    tokio::time::timeout(PATIENCE, events.recv())
        .await
        .expect("a watcher event in time")
        .expect("the watcher goes on")
}

#[tokio::test]
async fn the_runtime_watcher_resumes_from_its_version_and_relists_after_410_gone() {
    let f = Fixture::new().await;
    f.api.set_fault(Fault::Pending); // pods need not run here
    // Short watches without bookmarks: each ends after a second, and the watcher
    // resumes from the version of the last event it saw.
    let config = watcher::Config::default()
        .labels("app=test")
        .timeout(1)
        .disable_bookmarks();
    let mut events = follow(watcher(f.jobs(), config));
    let mut next = async || next_event(&mut events).await;
    assert!(matches!(next().await, Ok(watcher::Event::Init)));
    assert!(matches!(next().await, Ok(watcher::Event::InitDone)));
    f.create(&job("seen", "")).await;
    let settled = |name: &'static str| {
        let api = &f.api;
        async move {
            wait_for(
                &format!("Job {name} to count its pod"),
                PATIENCE,
                || async {
                    api.job(name)
                        .and_then(|j| j.status)
                        .is_some_and(|s| s.active == Some(1))
                },
            )
            .await
        }
    };
    settled("seen").await;
    // Changes this watch does not select move the version past the last one it saw;
    // then the history before now is compacted away.
    f.create(&job_with("unseen", "", |j| {
        j["metadata"]["labels"] = json!({"app": "other"});
    }))
    .await;
    settled("unseen").await;
    f.api.compact();
    loop {
        match next().await {
            Ok(watcher::Event::Apply(j)) if j.metadata.name.as_deref() == Some("seen") => {}
            Err(watcher::Error::WatchError(status)) => {
                assert_eq!(status.code, 410);
                break;
            }
            other => panic!("expected 410 Gone, got {other:?}"),
        }
    }
    let mut relisted = Vec::new();
    loop {
        match next().await {
            Ok(watcher::Event::Init) => {}
            Ok(watcher::Event::InitApply(job)) => relisted.push(job.metadata.name.unwrap()),
            Ok(watcher::Event::InitDone) => break,
            other => panic!("expected a relist, got {other:?}"),
        }
    }
    assert_eq!(relisted, ["seen"], "relisted with its selector");
    let watches: Vec<_> = f
        .api
        .requests()
        .into_iter()
        .filter(|r| r.query.contains("watch=true"))
        .collect();
    assert!(
        watches
            .iter()
            .all(|r| r.query.contains("labelSelector=app%3Dtest")
                && r.query.contains("timeoutSeconds=1")
                && r.query.contains("resourceVersion=")),
        "the watcher's own parameters: {watches:?}"
    );
}

#[tokio::test]
async fn the_default_watcher_keeps_its_place_with_bookmarks() {
    let f = Fixture::new().await;
    f.api.set_fault(Fault::Pending);
    // Default config, as the scaler's: a watch that ends with a BOOKMARK resumes from
    // the bookmark's version, so a compaction of older history does not make it relist.
    let mut events = follow(watcher(f.jobs(), watcher::Config::default().timeout(1)));
    let mut next = async || next_event(&mut events).await;
    assert!(matches!(next().await, Ok(watcher::Event::Init)));
    assert!(matches!(next().await, Ok(watcher::Event::InitDone)));
    f.create(&job("marked", "")).await;
    assert!(matches!(next().await, Ok(watcher::Event::Apply(_))));
    let watches = || {
        f.api
            .requests()
            .into_iter()
            .filter(|r| r.query.contains("watch=true"))
            .count()
    };
    wait_for("the watch to be renewed twice", PATIENCE, || async {
        watches() >= 3
    })
    .await;
    f.api.compact();
    f.create(&job("after-compaction", "")).await;
    loop {
        match next().await {
            Ok(watcher::Event::Apply(j)) if j.metadata.name.as_deref() == Some("marked") => {}
            Ok(watcher::Event::Apply(j)) => {
                assert_eq!(j.metadata.name.as_deref(), Some("after-compaction"));
                break;
            }
            other => panic!("expected the new Job without a relist, got {other:?}"),
        }
    }
    let requests = f.api.requests();
    let first = requests
        .iter()
        .find(|r| r.query.contains("watch=true"))
        .unwrap();
    assert!(
        first.query.contains("allowWatchBookmarks=true"),
        "the default watcher asks for bookmarks: {first:?}"
    );
}

#[tokio::test]
async fn lists_page_with_limit_and_continue_and_select_by_label() {
    let f = Fixture::new().await;
    f.api.set_fault(Fault::Pending);
    for name in ["a", "b", "c"] {
        f.create(&job(name, "")).await;
    }
    f.create(&job_with("other", "", |j| {
        j["metadata"]["labels"] = json!({"app": "other"});
    }))
    .await;
    let jobs = f.jobs();
    let first = jobs
        .list(&ListParams::default().labels("app=test").limit(2))
        .await
        .unwrap();
    let names = |l: &kube::core::ObjectList<Job>| {
        l.items
            .iter()
            .map(|j| j.metadata.name.clone().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&first), ["a", "b"]);
    assert_eq!(first.metadata.remaining_item_count, Some(1));
    let token = first.metadata.continue_.clone().expect("a continue token");
    let second = jobs
        .list(
            &ListParams::default()
                .labels("app=test")
                .limit(2)
                .continue_token(&token),
        )
        .await
        .unwrap();
    assert_eq!(names(&second), ["c"]);
    assert!(
        second
            .metadata
            .continue_
            .as_deref()
            .unwrap_or("")
            .is_empty()
    );
    assert_eq!(
        first.metadata.resource_version, second.metadata.resource_version,
        "the pages of one list answer with one version"
    );
    let not_test = jobs
        .list(&ListParams::default().labels("app!=test"))
        .await
        .unwrap();
    assert_eq!(names(&not_test), ["other"]);
}

#[tokio::test]
async fn foreground_deletion_marks_the_job_sends_sigterm_then_removes_it() {
    let f = Fixture::new().await;
    f.create(&job("drainer", "drain")).await;
    let pod = f.pod_of("drainer").await;
    f.wait_for_log(&pod, "ready").await;

    let answer = f
        .jobs()
        .delete("drainer", &DeleteParams::foreground())
        .await
        .unwrap();
    let marked = answer.left().expect("the marked Job, not a Status");
    assert!(marked.metadata.deletion_timestamp.is_some());
    assert_eq!(
        marked.metadata.finalizers.as_deref(),
        Some(&["foregroundDeletion".to_string()][..])
    );
    f.wait_for_log(&pod, "draining").await;
    wait_for("the Job to be gone after its pod", PATIENCE, || async {
        f.api.job("drainer").is_none()
    })
    .await;
    assert!(f.api.pods().is_empty(), "its pod went first");
    let removed = f.api.removed_jobs();
    assert_eq!(removed.len(), 1);
    assert!(removed[0].metadata.deletion_timestamp.is_some());
    assert!(matches!(
        f.jobs().get("drainer").await,
        Err(kube::Error::Api(e)) if e.code == 404
    ));
}

/// While its pod takes its grace period to stop, a Job being deleted is counted as the
/// Job controller counts it: the pod is terminating, neither active nor ready, and no
/// other pod replaces it.
#[tokio::test]
async fn a_job_being_deleted_counts_its_pod_as_terminating_and_starts_no_other() {
    let f = Fixture::new().await;
    f.create(&job("slow-stop", "stubborn")).await;
    let pod = f.pod_of("slow-stop").await;
    f.wait_for_log(&pod, "ready").await;
    let counts = |job: &Job| {
        let status = job.status.clone().unwrap_or_default();
        (status.active, status.ready, status.terminating)
    };
    wait_for(
        "the Job to count its pod active and ready",
        PATIENCE,
        || async {
            f.api
                .job("slow-stop")
                .is_some_and(|j| counts(&j) == (Some(1), Some(1), Some(0)))
        },
    )
    .await;
    f.jobs()
        .delete("slow-stop", &DeleteParams::foreground())
        .await
        .unwrap();
    wait_for("the Job to count its pod terminating", PATIENCE, || async {
        f.api
            .job("slow-stop")
            .is_some_and(|j| counts(&j) == (Some(0), Some(0), Some(1)))
    })
    .await;
    f.wait_for_log(&pod, "ignoring TERM").await;
    assert_eq!(f.api.pods_of("slow-stop").len(), 1, "no replacement pod");
    wait_for(
        "the Job to be gone after its grace period",
        PATIENCE,
        || async { f.api.job("slow-stop").is_none() },
    )
    .await;
}

#[tokio::test]
async fn a_pod_that_ignores_sigterm_is_killed_after_its_grace_period() {
    let f = Fixture::new().await;
    f.create(&job("stubborn", "stubborn")).await;
    let pod = f.pod_of("stubborn").await;
    f.wait_for_log(&pod, "ready").await;
    let pid = f.api.pod_pid(&pod).expect("a running process");
    f.jobs()
        .delete("stubborn", &DeleteParams::foreground())
        .await
        .unwrap();
    f.wait_for_log(&pod, "ignoring TERM").await;
    assert!(
        f.api.job("stubborn").is_some(),
        "still there within the 2 s grace period"
    );
    wait_for("SIGKILL after the grace period", PATIENCE, || async {
        f.api.job("stubborn").is_none()
    })
    .await;
    assert!(!process_exists(pid), "process {pid} was killed");
}

fn process_exists(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

#[tokio::test]
async fn background_deletion_removes_the_job_at_once_and_its_pod_behind_it() {
    let f = Fixture::new().await;
    f.create(&job("bg", "drain")).await;
    let pod = f.pod_of("bg").await;
    f.wait_for_log(&pod, "ready").await;
    let answer = f
        .jobs()
        .delete("bg", &DeleteParams::background())
        .await
        .unwrap();
    assert!(answer.is_right(), "a Status: the Job is gone at once");
    assert!(f.api.job("bg").is_none());
    f.wait_for_log(&pod, "draining").await;
    wait_for("the pod to go too", PATIENCE, || async {
        f.api.pods().is_empty()
    })
    .await;
}

#[tokio::test]
async fn finished_jobs_are_removed_after_their_ttl() {
    let f = Fixture::new().await;
    f.create(&job_with("brief", "", |j| {
        j["spec"]["ttlSecondsAfterFinished"] = json!(1);
    }))
    .await;
    f.wait_for_condition("brief", "Complete").await;
    wait_for("the TTL to remove the Job", PATIENCE, || async {
        f.api.job("brief").is_none()
    })
    .await;
    let removed = f.api.removed_jobs();
    assert!(
        has_condition(&removed[0], "Complete"),
        "removed having been Complete"
    );
    assert!(f.api.pods().is_empty(), "its pod went with it");
}

#[tokio::test]
async fn a_failing_pod_fails_the_job_with_backoff_limit_exceeded() {
    let f = Fixture::new().await;
    f.create(&job("doomed", "fail")).await;
    let job = f.wait_for_condition("doomed", "Failed").await;
    assert!(has_condition(&job, "FailureTarget"));
    assert_eq!(
        condition_reason(&job, "Failed").as_deref(),
        Some("BackoffLimitExceeded")
    );
    assert_eq!(job.status.as_ref().unwrap().failed, Some(1));
    let pods = f.api.pods_of("doomed");
    assert_eq!(pods.len(), 1, "backoffLimit 0: no second pod");
    let terminated = pods[0].status.clone().unwrap().container_statuses.unwrap()[0]
        .state
        .clone()
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!(
        (terminated.exit_code, terminated.reason.as_deref()),
        (3, Some("Error"))
    );
}

#[tokio::test]
async fn invalid_jobs_are_refused_as_the_api_server_refuses_them() {
    let f = Fixture::new().await;
    let cases: Vec<(&str, Job, u16, &str)> = vec![
        (
            "no image",
            job_with("no-image", "", |j| {
                j["spec"]["template"]["spec"]["containers"][0]["image"] = Value::Null;
            }),
            422,
            "spec.template.spec.containers[0].image: Required value",
        ),
        (
            "name not a DNS-1123 subdomain",
            job("Bad_Name", ""),
            422,
            "metadata.name: Invalid value: \"Bad_Name\"",
        ),
        (
            "restartPolicy Always",
            job_with("always", "", |j| {
                j["spec"]["template"]["spec"]["restartPolicy"] = json!("Always");
            }),
            422,
            "spec.template.spec.restartPolicy: Unsupported value: \"Always\"",
        ),
        (
            "no containers",
            job_with("empty", "", |j| {
                j["spec"]["template"]["spec"]["containers"] = json!([]);
            }),
            422,
            "spec.template.spec.containers: Required value",
        ),
        (
            "negative TTL",
            job_with("ttl", "", |j| {
                j["spec"]["ttlSecondsAfterFinished"] = json!(-1)
            }),
            422,
            "spec.ttlSecondsAfterFinished: Invalid value: -1",
        ),
        (
            "request above limit",
            job_with("greedy", "", |j| {
                j["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] =
                    json!("2");
            }),
            422,
            "must be less than or equal to cpu limit of 1",
        ),
        (
            "mount of a volume that does not exist",
            job_with("mount", "", |j| {
                j["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] =
                    json!([{"name": "nope", "mountPath": "/x"}]);
            }),
            422,
            "volumeMounts[0].name: Not found: \"nope\"",
        ),
        (
            "quantity outside the grammar",
            job_with("quantity", "", |j| {
                j["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] =
                    json!("256 MB");
            }),
            400,
            "quantities must match the regular expression",
        ),
    ];
    for (what, job, code, message) in cases {
        let error = api_error(f.jobs().create(&PostParams::default(), &job).await);
        assert_eq!(error.code, code, "{what}: {error:?}");
        assert!(error.message.contains(message), "{what}: {}", error.message);
        let expected_reason = if code == 422 { "Invalid" } else { "BadRequest" };
        assert_eq!(error.reason, expected_reason, "{what}");
    }
    assert!(f.api.jobs().is_empty(), "nothing refused was stored");

    // A dry run validates and answers, and stores nothing.
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let answered = f.jobs().create(&dry, &job("dry", "")).await.unwrap();
    assert_eq!(answered.metadata.name.as_deref(), Some("dry"));
    assert!(f.api.jobs().is_empty());
    let error = api_error(f.jobs().create(&dry, &job("Bad_Name", "")).await);
    assert_eq!(error.code, 422, "a dry run is validated too");

    f.create(&job("twice", "")).await;
    let error = api_error(
        f.jobs()
            .create(&PostParams::default(), &job("twice", ""))
            .await,
    );
    assert_eq!((error.code, error.reason.as_str()), (409, "AlreadyExists"));
}

#[tokio::test]
async fn unknown_fields_are_refused_under_strict_validation_and_dropped_with_a_warning_otherwise() {
    let f = Fixture::new().await;
    f.api.set_fault(Fault::Pending);
    let mut body = serde_json::to_value(job("typo", "")).unwrap();
    body["spec"]["template"]["spec"]["containers"][0]["imagePulPolicy"] = json!("Never");
    let post = |query: &str| {
        axum::http::Request::post(format!("/apis/batch/v1/namespaces/{NS}/jobs{query}"))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&body).unwrap())
            .unwrap()
    };
    let strict = f
        .client
        .request::<Job>(post("?fieldValidation=Strict"))
        .await;
    let error = api_error(strict);
    assert_eq!(error.code, 400);
    assert!(
        error.message.contains(
            "strict decoding error: unknown field \"spec.template.spec.containers[0].imagePulPolicy\""
        ),
        "{}",
        error.message
    );
    let created = f.client.request::<Job>(post("")).await.unwrap();
    assert!(
        created.spec.unwrap().template.spec.unwrap().containers[0]
            .image_pull_policy
            .as_deref()
            == Some("IfNotPresent"),
        "the misspelt field was dropped, not applied"
    );
    assert_eq!(
        f.api.warnings(),
        ["unknown field \"spec.template.spec.containers[0].imagePulPolicy\""]
    );
}

#[tokio::test]
async fn a_pod_violating_pod_security_restricted_is_never_created() {
    let f = Fixture::new().await;
    f.create(&job_with("loose", "", |j| {
        let spec = &mut j["spec"]["template"]["spec"];
        spec["securityContext"] = json!({});
        spec["containers"][0]["securityContext"] = json!({});
    }))
    .await;
    wait_for("a FailedCreate event", PATIENCE, || async {
        f.api
            .events()
            .iter()
            .any(|e| e.reason.as_deref() == Some("FailedCreate"))
    })
    .await;
    let event = f
        .api
        .events()
        .into_iter()
        .find(|e| e.reason.as_deref() == Some("FailedCreate"))
        .unwrap();
    let message = event.message.unwrap();
    assert_eq!(event.involved_object.name.as_deref(), Some("loose"));
    for violation in [
        "violates PodSecurity \"restricted:latest\"",
        "allowPrivilegeEscalation != false",
        "unrestricted capabilities",
        "runAsNonRoot != true",
        "seccompProfile",
    ] {
        assert!(message.contains(violation), "{violation}: {message}");
    }
    assert!(f.api.pods().is_empty(), "no pod, as under PSA enforce");
    let job = f.api.job("loose").unwrap();
    assert_eq!(job.status.unwrap().active, Some(0));
}

#[tokio::test]
async fn no_capacity_keeps_pods_pending_and_unschedulable() {
    let f = Fixture::new().await;
    f.api.set_fault(Fault::Pending);
    f.create(&job("waiting", "")).await;
    let pod = f.pod_of("waiting").await;
    wait_for("PodScheduled=False", PATIENCE, || async {
        f.api.pods().iter().any(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| {
                    c.iter().any(|c| {
                        c.type_ == "PodScheduled"
                            && c.status == "False"
                            && c.reason.as_deref() == Some("Unschedulable")
                    })
                })
        })
    })
    .await;
    assert_eq!(f.api.pod_pid(&pod), None, "nothing runs");
    wait_for(
        "the Job to count its pod active, not ready",
        PATIENCE,
        || async {
            let status = f.api.job("waiting").unwrap().status.unwrap_or_default();
            (status.active, status.ready) == (Some(1), Some(0))
        },
    )
    .await;
    // Capacity comes back: the pod is scheduled and runs.
    f.api.set_fault(Fault::None);
    f.wait_for_condition("waiting", "Complete").await;
}

#[tokio::test]
async fn failing_image_pulls_go_from_err_image_pull_to_image_pull_back_off() {
    let f = Fixture::new().await;
    f.api.set_fault(Fault::ImagePullBackOff);
    f.create(&job("pull", "")).await;
    let pod = f.pod_of("pull").await;
    let reason = || async {
        f.api
            .pods()
            .iter()
            .find_map(waiting_reason)
            .map(|(r, _)| r)
            .unwrap_or_default()
    };
    wait_for("ErrImagePull", PATIENCE, || async {
        reason().await == "ErrImagePull"
    })
    .await;
    wait_for("ImagePullBackOff", PATIENCE, || async {
        reason().await == "ImagePullBackOff"
    })
    .await;
    let error = f
        .pods()
        .logs(&pod, &LogParams::default())
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("is waiting to start: ImagePullBackOff"),
        "{error}"
    );
}

#[tokio::test]
async fn without_a_registry_only_images_with_pull_policy_always_fail() {
    let f = Fixture::new().await;
    f.api.set_fault(Fault::NoRegistry);
    let latest = |name: &str, policy: Option<&str>| {
        job_with(name, "", |j| {
            let container = &mut j["spec"]["template"]["spec"]["containers"][0];
            container["image"] = json!("spillway-worker:latest");
            if let Some(policy) = policy {
                container["imagePullPolicy"] = json!(policy);
            }
        })
    };
    f.create(&latest("defaulted", None)).await;
    f.create(&latest("local", Some("IfNotPresent"))).await;
    f.wait_for_condition("local", "Complete").await;
    wait_for("the :latest image to fail its pull", PATIENCE, || async {
        f.api
            .pods_of("defaulted")
            .iter()
            .filter_map(waiting_reason)
            .any(|(r, _)| r == "ErrImagePull" || r == "ImagePullBackOff")
    })
    .await;
}

#[tokio::test]
async fn denied_pod_creation_leaves_the_job_without_a_pod_until_allowed() {
    let f = Fixture::new().await;
    let quota = "pods \"x\" is forbidden: exceeded quota: compute, requested: cpu=100m, used: cpu=2, limited: cpu=2";
    f.api.set_fault(Fault::DenyPodCreation(quota.into()));
    f.create(&job("denied", "")).await;
    wait_for("a FailedCreate event", PATIENCE, || async {
        f.api.events().iter().any(|e| {
            e.reason.as_deref() == Some("FailedCreate")
                && e.message.as_deref() == Some(&format!("Error creating: {quota}"))
        })
    })
    .await;
    assert!(f.api.pods().is_empty());
    f.api.set_fault(Fault::None);
    f.wait_for_condition("denied", "Complete").await;
}

#[tokio::test]
async fn an_evicted_pod_fails_and_so_does_its_job() {
    let f = Fixture::new().await;
    f.create(&job("evictee", "drain")).await;
    let pod = f.pod_of("evictee").await;
    f.wait_for_log(&pod, "ready").await;
    assert!(f.api.evict(&pod));
    f.wait_for_log(&pod, "draining").await;
    let job = f.wait_for_condition("evictee", "Failed").await;
    assert_eq!(job.status.unwrap().failed, Some(1));
    let pod = f.pods().get(&pod).await.expect("an evicted pod stays");
    let status = pod.status.unwrap();
    assert_eq!(
        (status.phase.as_deref(), status.reason.as_deref()),
        (Some("Failed"), Some("Evicted")),
        "Failed even though it exited 0 after SIGTERM"
    );
    assert!(
        status
            .conditions
            .unwrap()
            .iter()
            .any(|c| c.type_ == "DisruptionTarget" && c.status == "True")
    );
}

#[tokio::test]
async fn secrets_config_maps_and_volumes_are_resolved_as_the_kubelet_resolves_them() {
    let f = Fixture::new().await;
    f.api
        .put_config_map("settings", [("conf.txt", "from the configmap\n")]);
    f.create(&job_with("configured", "files", |j| {
        let spec = &mut j["spec"]["template"]["spec"];
        spec["volumes"] = json!([
            {"name": "conf", "configMap": {"name": "settings",
              "items": [{"key": "conf.txt", "path": "conf.txt"}]}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "16Mi"}},
        ]);
        let container = &mut spec["containers"][0];
        container["volumeMounts"] = json!([
            {"name": "conf", "mountPath": "/etc/app", "readOnly": true},
            {"name": "tmp", "mountPath": "/tmp"},
        ]);
        container["env"].as_array_mut().unwrap().extend([
            json!({"name": "CONFIG_FILE", "value": "/etc/app/conf.txt"}),
            json!({"name": "GREETING", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "greeting"}}}),
        ]);
    }))
    .await;
    let pod = f.pod_of("configured").await;
    wait_for(
        "CreateContainerConfigError for the missing Secret",
        PATIENCE,
        || async {
            f.api
                .pods()
                .iter()
                .filter_map(waiting_reason)
                .any(|(r, m)| {
                    r == "CreateContainerConfigError" && m == "secret \"creds\" not found"
                })
        },
    )
    .await;
    f.api.put_secret("creds", [("other", "x")]);
    wait_for("the missing key named", PATIENCE, || async {
        f.api
            .pods()
            .iter()
            .filter_map(waiting_reason)
            .any(|(_, m)| m == format!("couldn't find key greeting in Secret {NS}/creds"))
    })
    .await;
    f.api.put_secret("creds", [("greeting", "from the secret")]);
    f.wait_for_condition("configured", "Complete").await;
    let log = f.api.pod_log(&pod);
    assert!(log.contains(": from the secret\n"), "{log}");
    assert!(
        log.contains("from the configmap\n"),
        "the mount path was rewritten: {log}"
    );
    assert!(
        log.contains("wrote-tmp"),
        "TMPDIR is the emptyDir at /tmp: {log}"
    );
    assert!(
        log.contains(&format!("tmp={}", f.api.dir().display())),
        "{log}"
    );
}

/// A read-only root file system has a writable `/tmp` only where a volume is mounted:
/// without one, `TMPDIR` leads to a directory that does not exist, as nothing under
/// `/` can be written in the cluster.
#[tokio::test]
async fn a_read_only_root_has_a_writable_tmp_only_from_a_volume_mounted_there() {
    let f = Fixture::new().await;
    let read_only = |j: &mut Value| {
        j["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] =
            json!(true);
    };
    let tmp_volume = |j: &mut Value| {
        let spec = &mut j["spec"]["template"]["spec"];
        spec["volumes"] = json!([{"name": "tmp", "emptyDir": {"sizeLimit": "16Mi"}}]);
        spec["containers"][0]["volumeMounts"] = json!([{"name": "tmp", "mountPath": "/tmp"}]);
    };
    let pod_dir = f.api.dir().join("pods").display().to_string();
    struct Case<'a> {
        job: &'a str,
        edit: &'a dyn Fn(&mut Value),
        log_holds: String,
        writes: bool,
    }
    let cases = [
        Case {
            job: "writable-root",
            edit: &|_| {},
            // No volume and no TMPDIR: mktemp uses this machine's /tmp.
            log_holds: "wrote /tmp/".to_string(),
            writes: true,
        },
        Case {
            job: "read-only-root",
            edit: &|j| read_only(j),
            log_holds: "no-writable-tmp-the-root-file-system-is-read-only\n".to_string(),
            writes: false,
        },
        Case {
            job: "read-only-root-with-tmp-volume",
            edit: &|j| {
                read_only(j);
                tmp_volume(j);
            },
            log_holds: format!("wrote {pod_dir}/"),
            writes: true,
        },
    ];
    for case in &cases {
        f.create(&job_with(case.job, "mktemp", |j| (case.edit)(j)))
            .await;
    }
    for case in &cases {
        let name = case.job;
        f.wait_for_condition(name, "Complete").await;
        let log = f.api.pod_log(&f.pod_of(name).await);
        assert!(log.contains(case.log_holds.as_str()), "{name}: {log}");
        assert_eq!(
            log.contains("no temporary file"),
            !case.writes,
            "{name}: mktemp {}: {log}",
            if case.writes { "succeeds" } else { "fails" }
        );
    }
}

#[tokio::test]
async fn pod_logs_honour_container_tail_lines_and_limit_bytes() {
    let f = Fixture::new().await;
    f.create(&job("talker", "lines")).await;
    f.wait_for_condition("talker", "Complete").await;
    let pod = f.pod_of("talker").await;
    let pods = f.pods();
    let logs = |params: LogParams| {
        let pods = pods.clone();
        let pod = pod.clone();
        async move { pods.logs(&pod, &params).await }
    };
    let cases = [
        ("tail 2", Some(2), None, "4\n5\n"),
        ("tail 0", Some(0), None, ""),
        ("limit 4", None, Some(4), "hell"),
        ("tail 3, limit 3", Some(3), Some(3), "3\n4"),
    ];
    for (what, tail, limit, expected) in cases {
        let params = LogParams {
            container: Some("main".into()),
            tail_lines: tail,
            limit_bytes: limit,
            ..LogParams::default()
        };
        assert_eq!(logs(params).await.unwrap(), expected, "{what}");
    }
    let wrong = LogParams {
        container: Some("sidecar".into()),
        ..LogParams::default()
    };
    let error = logs(wrong).await.unwrap_err();
    assert!(
        error.to_string().contains("container sidecar is not valid"),
        "{error}"
    );
}

#[tokio::test]
async fn a_client_that_trusts_another_ca_or_sends_another_token_is_refused() {
    let f = Fixture::new().await;
    let other = KubeApi::start(KubeApiConfig::new(NS));
    let dir = tempfile::tempdir().unwrap();
    // The other double's CA, this double's server and token.
    let mut kubeconfig: Value =
        serde_json::from_slice(&std::fs::read(other.kubeconfig_path()).unwrap()).unwrap();
    kubeconfig["clusters"][0]["cluster"]["server"] = json!(f.api.url());
    kubeconfig["users"][0]["user"]["token"] = json!(f.api.token());
    let client_for = |kubeconfig: &Value, name: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, kubeconfig.to_string()).unwrap();
        async move {
            let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
            let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .unwrap();
            Api::<Job>::namespaced(Client::try_from(config).unwrap(), NS)
        }
    };
    let untrusting = client_for(&kubeconfig, "wrong-ca").await;
    let error = untrusting.list(&ListParams::default()).await.unwrap_err();
    let chain = format!("{error:?}");
    assert!(
        chain.contains("InvalidCertificate(UnknownIssuer)"),
        "a TLS verification failure: {chain}"
    );

    let mut kubeconfig: Value =
        serde_json::from_slice(&std::fs::read(f.api.kubeconfig_path()).unwrap()).unwrap();
    kubeconfig["users"][0]["user"]["token"] = json!("not-the-token");
    let stranger = client_for(&kubeconfig, "wrong-token").await;
    match stranger.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 401),
        other => panic!("expected 401, got {other:?}"),
    }
    assert!(
        f.jobs().list(&ListParams::default()).await.is_ok(),
        "the right client is served"
    );
}

#[tokio::test]
async fn in_cluster_files_hold_the_token_ca_and_namespace() {
    let f = Fixture::new().await;
    let dir = tempfile::tempdir().unwrap();
    f.api.write_in_cluster_files(dir.path());
    let read = |file: &str| std::fs::read_to_string(dir.path().join(file)).unwrap();
    assert_eq!(read("token"), f.api.token());
    assert_eq!(read("namespace"), NS);
    assert_eq!(read("ca.crt"), f.api.ca_pem());
    assert!(read("ca.crt").starts_with("-----BEGIN CERTIFICATE-----"));
}

#[tokio::test]
async fn dropping_the_double_kills_its_processes_and_removes_its_files() {
    let f = Fixture::new().await;
    f.create(&job("forever", "stubborn")).await;
    let pod = f.pod_of("forever").await;
    f.wait_for_log(&pod, "ready").await;
    let pid = f.api.pod_pid(&pod).unwrap();
    let dir = f.api.dir().to_path_buf();
    assert!(process_exists(pid));
    drop(f);
    assert!(!process_exists(pid), "process {pid} outlived the double");
    assert!(!dir.exists(), "{} outlived the double", dir.display());
}
