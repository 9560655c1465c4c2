//! The Kubernetes launcher: workers as `batch/v1` Jobs in the scaler's namespace.
//!
//! Each worker is one Job with one pod, built from [`JobTemplate`]: labels that select
//! Spillway's own workers, `backoffLimit: 0` (a failed worker is the scaler's to
//! replace, not Kubernetes's to retry), `ttlSecondsAfterFinished`, resources, a
//! non-root read-only container, the broker URL from a Secret and the job types from a
//! ConfigMap. The list of workers comes from a watched cache of those Jobs (one watch,
//! not a list per tick), and is refused until the cache has synced, so a restarted
//! scaler never mistakes "not loaded yet" for "no workers", and while the watch is
//! failing, so a cache that may be missing changes is never read as the truth. A Job is deleted only as a
//! drain fallback, in the foreground: the Job stays (marked for deletion, still counted
//! as a worker) while its pod gets SIGTERM and drains like any worker.

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::{FutureExt, StreamExt};
use k8s_openapi::{
    api::{
        batch::v1::{Job, JobSpec},
        core::v1::{
            Capabilities, ConfigMapVolumeSource, Container, EnvVar, EnvVarSource, Pod,
            PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements, SeccompProfile,
            SecretKeySelector, SecurityContext, Volume, VolumeMount,
        },
    },
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::ObjectMeta},
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, LogParams, PostParams},
    runtime::{WatchStreamExt, reflector, watcher},
};

use super::{LaunchedWorker, Launcher, LauncherError};
use crate::policy::Phase;

/// Label every Spillway worker Job carries, and the selector of the watch.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "spillway-scaler");
pub const NAME_LABEL: (&str, &str) = ("app.kubernetes.io/name", "spillway-worker");
/// The label the NetworkPolicy admits to RabbitMQ.
pub const PART_OF: (&str, &str) = ("app.kubernetes.io/part-of", "spillway");
pub const JOB_TYPE_LABEL: &str = "spillway.dev/job-type";
pub const WORKER_LABEL: &str = "spillway.dev/worker";

/// Where the job types are mounted in a worker's container.
const JOBS_CONFIG_PATH: &str = "/etc/spillway/jobs.toml";

/// Everything a worker Job is made of besides its name and job type.
#[derive(Debug, Clone)]
pub struct JobTemplate {
    /// Container image per job type.
    pub images: BTreeMap<String, String>,
    /// Secret holding the broker URL, and its key.
    pub secret_name: String,
    pub secret_key: String,
    /// ConfigMap holding the job types, and its key.
    pub config_map: String,
    pub config_map_key: String,
    pub ttl_seconds_after_finished: i32,
    /// Time a deleted worker gets to finish the rows it holds.
    pub termination_grace_seconds: i64,
    pub cpu_request: String,
    pub memory_request: String,
    pub cpu_limit: String,
    pub memory_limit: String,
}

/// How long a watch error keeps the cache suspect when no event has come since. The
/// watch retries with a backoff of at most 30 s, so a watch that keeps failing renews
/// its error within this; one that recovered without a change to report stops being
/// suspect after it.
const WATCH_ERROR_HOLD: Duration = Duration::from_secs(60);

pub struct KubeLauncher {
    jobs: Api<Job>,
    pods: Api<Pod>,
    cache: reflector::Store<Job>,
    /// The watch's latest error and when it came, until an event arrives after it.
    watch_error: Arc<Mutex<Option<(Instant, String)>>>,
    template: JobTemplate,
}

impl KubeLauncher {
    /// A launcher for `namespace`, and the watch that keeps its cache: run the future
    /// for as long as the launcher is used.
    pub fn new(
        client: Client,
        namespace: &str,
        template: JobTemplate,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
        let pods: Api<Pod> = Api::namespaced(client, namespace);
        let (cache, writer) = reflector::store();
        let selector = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);
        let watch = reflector(
            writer,
            watcher(jobs.clone(), watcher::Config::default().labels(&selector)),
        )
        .default_backoff();
        let watch_error = Arc::new(Mutex::new(None));
        let health = Arc::clone(&watch_error);
        let watch = watch.for_each(move |event| {
            let mut health = health.lock().expect("watch health lock");
            match event {
                Ok(_) => *health = None,
                Err(error) => {
                    tracing::warn!(%error, "watching worker Jobs failed; retrying");
                    *health = Some((Instant::now(), error.to_string()));
                }
            }
            std::future::ready(())
        });
        (
            KubeLauncher {
                jobs,
                pods,
                cache,
                watch_error,
                template,
            },
            watch,
        )
    }

    /// The Job that runs worker `name` on `job_type`.
    pub fn job(&self, job_type: &str, name: &str) -> Result<Job, LauncherError> {
        let t = &self.template;
        let image = t.images.get(job_type).ok_or_else(|| LauncherError::Spawn {
            name: name.into(),
            reason: format!("no image for job type {job_type:?}"),
        })?;
        let labels = BTreeMap::from([
            (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
            (NAME_LABEL.0.to_string(), NAME_LABEL.1.to_string()),
            (PART_OF.0.to_string(), PART_OF.1.to_string()),
            (JOB_TYPE_LABEL.to_string(), job_type.to_string()),
            (WORKER_LABEL.to_string(), name.to_string()),
        ]);
        let env = |name: &str, value: &str| EnvVar {
            name: name.into(),
            value: Some(value.into()),
            ..EnvVar::default()
        };
        let quantities = |cpu: &str, memory: &str| {
            BTreeMap::from([
                ("cpu".to_string(), Quantity(cpu.to_string())),
                ("memory".to_string(), Quantity(memory.to_string())),
            ])
        };
        let container = Container {
            name: "worker".into(),
            image: Some(image.clone()),
            env: Some(vec![
                env("WORKER_NAME", name),
                env("JOB_TYPE", job_type),
                env("JOBS_CONFIG", JOBS_CONFIG_PATH),
                env("LOG_FORMAT", "json"),
                EnvVar {
                    name: "AMQP_URL".into(),
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: t.secret_name.clone(),
                            key: t.secret_key.clone(),
                            optional: Some(false),
                        }),
                        ..EnvVarSource::default()
                    }),
                    ..EnvVar::default()
                },
            ]),
            resources: Some(ResourceRequirements {
                requests: Some(quantities(&t.cpu_request, &t.memory_request)),
                limits: Some(quantities(&t.cpu_limit, &t.memory_limit)),
                ..ResourceRequirements::default()
            }),
            security_context: Some(SecurityContext {
                allow_privilege_escalation: Some(false),
                read_only_root_filesystem: Some(true),
                run_as_non_root: Some(true),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".into()]),
                    ..Capabilities::default()
                }),
                ..SecurityContext::default()
            }),
            volume_mounts: Some(vec![VolumeMount {
                name: "jobs-config".into(),
                mount_path: "/etc/spillway".into(),
                read_only: Some(true),
                ..VolumeMount::default()
            }]),
            ..Container::default()
        };
        Ok(Job {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(labels.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(JobSpec {
                backoff_limit: Some(0),
                ttl_seconds_after_finished: Some(t.ttl_seconds_after_finished),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(labels),
                        ..ObjectMeta::default()
                    }),
                    spec: Some(PodSpec {
                        restart_policy: Some("Never".into()),
                        automount_service_account_token: Some(false),
                        termination_grace_period_seconds: Some(t.termination_grace_seconds),
                        security_context: Some(PodSecurityContext {
                            run_as_non_root: Some(true),
                            run_as_user: Some(10001),
                            run_as_group: Some(10001),
                            seccomp_profile: Some(SeccompProfile {
                                type_: "RuntimeDefault".into(),
                                ..SeccompProfile::default()
                            }),
                            ..PodSecurityContext::default()
                        }),
                        containers: vec![container],
                        volumes: Some(vec![Volume {
                            name: "jobs-config".into(),
                            config_map: Some(ConfigMapVolumeSource {
                                name: t.config_map.clone(),
                                items: Some(vec![k8s_openapi::api::core::v1::KeyToPath {
                                    key: t.config_map_key.clone(),
                                    path: "jobs.toml".into(),
                                    ..Default::default()
                                }]),
                                ..ConfigMapVolumeSource::default()
                            }),
                            ..Volume::default()
                        }]),
                        ..PodSpec::default()
                    }),
                },
                ..JobSpec::default()
            }),
            ..Job::default()
        })
    }
}

/// A Job's phase: finished by its conditions or counts, running once its pod is
/// ready, pending before (unscheduled, pulling its image).
pub fn phase_of(job: &Job) -> Phase {
    let Some(status) = &job.status else {
        return Phase::Pending;
    };
    let condition = |kind: &str| {
        status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == kind && c.status == "True")
    };
    if condition("Complete") || status.succeeded.unwrap_or(0) > 0 {
        Phase::Succeeded
    } else if condition("Failed") || status.failed.unwrap_or(0) > 0 {
        Phase::Failed
    } else if status.ready.unwrap_or(0) > 0 {
        Phase::Running
    } else {
        Phase::Pending
    }
}

impl Launcher for KubeLauncher {
    async fn workers(&self) -> Result<Vec<LaunchedWorker>, LauncherError> {
        if self.cache.wait_until_ready().now_or_never().is_none() {
            return Err(LauncherError::List(
                "the watch of worker Jobs has not synced yet".into(),
            ));
        }
        if let Some((at, error)) = &*self.watch_error.lock().expect("watch health lock")
            && at.elapsed() < WATCH_ERROR_HOLD
        {
            return Err(LauncherError::List(format!(
                "the watch of worker Jobs is failing, so its cache may be stale: {error}"
            )));
        }
        let mut workers: Vec<LaunchedWorker> = self
            .cache
            .state()
            .iter()
            .filter(|job| job.metadata.deletion_timestamp.is_none() || phase_of(job).is_active())
            .map(|job| LaunchedWorker {
                name: job.metadata.name.clone().unwrap_or_default(),
                job_type: job
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(JOB_TYPE_LABEL))
                    .cloned()
                    .unwrap_or_default(),
                phase: phase_of(job),
                started_unix: job
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map_or(0, |t| t.0.as_second().max(0) as u64),
            })
            .collect();
        workers.sort_by_key(|w| w.started_unix);
        Ok(workers)
    }

    async fn spawn(&self, job_type: &str, name: &str) -> Result<(), LauncherError> {
        let job = self.job(job_type, name)?;
        self.jobs
            .create(&PostParams::default(), &job)
            .await
            .map(drop)
            .map_err(|e| LauncherError::Spawn {
                name: name.into(),
                reason: e.to_string(),
            })
    }

    async fn logs(&self, name: &str, tail_lines: Option<u32>) -> Result<String, LauncherError> {
        let failed = |reason: String| LauncherError::Logs {
            name: name.into(),
            reason,
        };
        // Only Jobs in the cache (Spillway's own, by label): never any pod by name.
        let known = self
            .cache
            .state()
            .iter()
            .any(|job| job.metadata.name.as_deref() == Some(name));
        if !known {
            return Err(LauncherError::NoSuchWorker(name.into()));
        }
        let pods = self
            .pods
            .list(&ListParams::default().labels(&format!("{WORKER_LABEL}={name}")))
            .await
            .map_err(|e| failed(e.to_string()))?;
        let pod = pods
            .items
            .iter()
            .filter_map(|pod| pod.metadata.name.clone())
            .next_back()
            .ok_or_else(|| {
                failed("its pod is gone (the Job finished and was cleaned up)".into())
            })?;
        let params = LogParams {
            container: Some("worker".into()),
            tail_lines: tail_lines.map(i64::from),
            ..LogParams::default()
        };
        self.pods
            .logs(&pod, &params)
            .await
            .map_err(|e| failed(e.to_string()))
    }

    async fn stop(&self, name: &str) -> Result<(), LauncherError> {
        self.jobs
            .delete(name, &DeleteParams::foreground())
            .await
            .map(drop)
            .map_err(|e| LauncherError::Stop {
                name: name.into(),
                reason: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    //! The launcher against a mocked API server: each request it sends is checked
    //! (method, path, selector, body) and answered as Kubernetes would.

    use std::time::Duration;

    use http::{Method, Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::{Value, json};
    use spillway_common::testing::wait_for;

    use super::*;

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    const NAMESPACE: &str = "spillway";
    const SELECTOR: &str = "labelSelector=app.kubernetes.io%2Fmanaged-by%3Dspillway-scaler";

    fn template() -> JobTemplate {
        JobTemplate {
            images: BTreeMap::from([("default".into(), "spillway-worker:1.0".into())]),
            secret_name: "spillway-rabbitmq".into(),
            secret_key: "amqp-url".into(),
            config_map: "spillway-jobs".into(),
            config_map_key: "jobs.toml".into(),
            ttl_seconds_after_finished: 300,
            termination_grace_seconds: 600,
            cpu_request: "100m".into(),
            memory_request: "64Mi".into(),
            cpu_limit: "1".into(),
            memory_limit: "256Mi".into(),
        }
    }

    fn launcher() -> (
        KubeLauncher,
        impl Future<Output = ()> + Send + 'static,
        Handle,
    ) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, NAMESPACE);
        let (launcher, watch) = KubeLauncher::new(client, NAMESPACE, template());
        (launcher, watch, handle)
    }

    /// The next request: its method, path, query and JSON body (`Null` when empty).
    async fn next(
        handle: &mut Handle,
    ) -> (
        Method,
        String,
        String,
        Value,
        tower_test::mock::SendResponse<Response<Body>>,
    ) {
        let (request, respond) =
            tokio::time::timeout(Duration::from_secs(5), handle.next_request())
                .await
                .expect("a request within 5 s")
                .expect("the client is alive");
        let (parts, body) = request.into_parts();
        let bytes = body.collect_bytes().await.unwrap();
        let json = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        let query = parts.uri.query().unwrap_or_default().to_string();
        (
            parts.method,
            parts.uri.path().to_string(),
            query,
            json,
            respond,
        )
    }

    fn answer(
        respond: tower_test::mock::SendResponse<Response<Body>>,
        status: StatusCode,
        body: &Value,
    ) {
        let response = Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap();
        respond.send_response(response);
    }

    fn job(name: &str, status: Value) -> Value {
        json!({
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {
                "name": name, "namespace": NAMESPACE, "resourceVersion": "1",
                "creationTimestamp": "2026-11-23T10:00:00Z",
                "labels": {"app.kubernetes.io/managed-by": "spillway-scaler", "spillway.dev/job-type": "default"}
            },
            "spec": {"template": {"spec": {"containers": []}}},
            "status": status
        })
    }

    #[tokio::test]
    async fn spawning_creates_a_labelled_locked_down_job_from_the_template() {
        let (launcher, _watch, mut handle) = launcher();
        let server = tokio::spawn(async move {
            let (method, path, _, body, respond) = next(&mut handle).await;
            answer(respond, StatusCode::CREATED, &body);
            (method, path, body)
        });
        launcher
            .spawn("default", "spillway-default-1")
            .await
            .unwrap();
        let (method, path, body) = server.await.unwrap();
        assert_eq!(method, Method::POST);
        assert_eq!(path, "/apis/batch/v1/namespaces/spillway/jobs");

        assert_eq!(body["metadata"]["name"], "spillway-default-1");
        let labels = &body["metadata"]["labels"];
        assert_eq!(labels["app.kubernetes.io/managed-by"], "spillway-scaler");
        assert_eq!(
            labels["app.kubernetes.io/part-of"], "spillway",
            "admitted to RabbitMQ by the NetworkPolicy"
        );
        assert_eq!(labels["spillway.dev/job-type"], "default");
        assert_eq!(labels["spillway.dev/worker"], "spillway-default-1");
        let spec = &body["spec"];
        assert_eq!(
            spec["backoffLimit"], 0,
            "the scaler, not Kubernetes, replaces failed workers"
        );
        assert_eq!(spec["ttlSecondsAfterFinished"], 300);
        let pod = &spec["template"]["spec"];
        assert_eq!(spec["template"]["metadata"]["labels"], *labels);
        assert_eq!(pod["restartPolicy"], "Never");
        assert_eq!(pod["automountServiceAccountToken"], false);
        assert_eq!(pod["terminationGracePeriodSeconds"], 600);
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(pod["securityContext"]["runAsUser"], 10001);
        let container = &pod["containers"][0];
        assert_eq!(container["image"], "spillway-worker:1.0");
        assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(
            container["securityContext"]["allowPrivilegeEscalation"],
            false
        );
        assert_eq!(
            container["securityContext"]["capabilities"]["drop"],
            json!(["ALL"])
        );
        assert_eq!(
            container["resources"]["requests"],
            json!({"cpu": "100m", "memory": "64Mi"})
        );
        assert_eq!(
            container["resources"]["limits"],
            json!({"cpu": "1", "memory": "256Mi"})
        );
        let env = container["env"].as_array().unwrap();
        let var = |name: &str| {
            env.iter()
                .find(|v| v["name"] == name)
                .cloned()
                .unwrap_or(Value::Null)
        };
        assert_eq!(var("WORKER_NAME")["value"], "spillway-default-1");
        assert_eq!(var("JOB_TYPE")["value"], "default");
        assert_eq!(var("JOBS_CONFIG")["value"], "/etc/spillway/jobs.toml");
        assert_eq!(
            var("AMQP_URL")["valueFrom"]["secretKeyRef"],
            json!({"name": "spillway-rabbitmq", "key": "amqp-url", "optional": false}),
            "credentials come from the Secret, never inline"
        );
        assert_eq!(pod["volumes"][0]["configMap"]["name"], "spillway-jobs");
    }

    #[tokio::test]
    async fn an_unknown_job_type_is_refused_before_any_request() {
        let (launcher, _watch, _handle) = launcher();
        let error = launcher
            .spawn("resize", "spillway-resize-1")
            .await
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("no image for job type \"resize\""),
            "{error}"
        );
    }

    #[tokio::test]
    async fn logs_come_from_the_pod_of_a_known_worker_only() {
        let (launcher, watch, mut handle) = launcher();
        tokio::spawn(watch);
        let (_, _, _, _, respond) = next(&mut handle).await;
        answer(
            respond,
            StatusCode::OK,
            &json!({"apiVersion": "batch/v1", "kind": "JobList", "metadata": {"resourceVersion": "1"},
                    "items": [job("busy", json!({"active": 1, "ready": 1}))]}),
        );
        wait_for("the cache to sync", Duration::from_secs(5), || async {
            launcher.workers().await.is_ok()
        })
        .await;
        assert!(matches!(
            launcher.logs("kube-system-pod", None).await,
            Err(LauncherError::NoSuchWorker(_))
        ));

        let server = tokio::spawn(async move {
            loop {
                let (method, path, query, _, respond) = next(&mut handle).await;
                if query.contains("watch=true") {
                    // The cache's watch: leave it waiting.
                    std::mem::forget(respond);
                    continue;
                }
                assert_eq!(
                    (method, path.as_str()),
                    (Method::GET, "/api/v1/namespaces/spillway/pods")
                );
                assert!(
                    query.contains("labelSelector=spillway.dev%2Fworker%3Dbusy"),
                    "{query}"
                );
                answer(
                    respond,
                    StatusCode::OK,
                    &json!({"apiVersion": "v1", "kind": "PodList", "metadata": {},
                    "items": [{"metadata": {"name": "busy-x7k2p", "namespace": NAMESPACE}}]}),
                );
                let (method, path, query, _, respond) = next(&mut handle).await;
                assert_eq!(
                    (method, path.as_str()),
                    (
                        Method::GET,
                        "/api/v1/namespaces/spillway/pods/busy-x7k2p/log"
                    )
                );
                assert!(
                    query.contains("container=worker") && query.contains("tailLines=50"),
                    "{query}"
                );
                respond.send_response(
                    Response::builder()
                        .body(Body::from(b"row 7 done\n".to_vec()))
                        .unwrap(),
                );
                return;
            }
        });
        assert_eq!(
            launcher.logs("busy", Some(50)).await.unwrap(),
            "row 7 done\n"
        );
        server.await.unwrap();
    }

    #[tokio::test]
    async fn stopping_deletes_the_job_after_its_pod_has_drained() {
        let (launcher, _watch, mut handle) = launcher();
        let server = tokio::spawn(async move {
            let (method, path, _, body, respond) = next(&mut handle).await;
            answer(
                respond,
                StatusCode::OK,
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
            );
            (method, path, body)
        });
        launcher.stop("spillway-default-1").await.unwrap();
        let (method, path, body) = server.await.unwrap();
        assert_eq!(method, Method::DELETE);
        assert_eq!(
            path,
            "/apis/batch/v1/namespaces/spillway/jobs/spillway-default-1"
        );
        assert_eq!(
            body["propagationPolicy"], "Foreground",
            "the Job, and so the worker's place under max_jobs, stays until its pod is gone"
        );
    }

    #[tokio::test]
    async fn workers_come_from_a_watched_cache_with_phases_from_job_status() {
        let (launcher, watch, mut handle) = launcher();
        tokio::spawn(watch);
        assert!(
            launcher.workers().await.is_err(),
            "no answer before the cache has synced"
        );

        let (method, path, query, _, respond) = next(&mut handle).await;
        assert_eq!(
            (method, path.as_str()),
            (Method::GET, "/apis/batch/v1/namespaces/spillway/jobs")
        );
        assert!(
            query.contains(SELECTOR),
            "only Spillway's own Jobs: {query}"
        );
        assert!(!query.contains("watch=true"), "a list first: {query}");
        answer(
            respond,
            StatusCode::OK,
            &json!({
                "apiVersion": "batch/v1", "kind": "JobList",
                "metadata": {"resourceVersion": "10"},
                "items": [
                    job("unscheduled", json!({"active": 1, "ready": 0})),
                    job("busy", json!({"active": 1, "ready": 1})),
                    job("drained", json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})),
                    job("crashed", json!({"failed": 1, "conditions": [{"type": "Failed", "status": "True"}]})),
                    job("new", json!(null)),
                ]
            }),
        );
        let phases = || async {
            launcher
                .workers()
                .await
                .map(|ws| {
                    ws.into_iter()
                        .map(|w| (w.name, w.phase))
                        .collect::<BTreeMap<_, _>>()
                })
                .unwrap_or_default()
        };
        wait_for("the cache to sync", Duration::from_secs(5), || async {
            !phases().await.is_empty()
        })
        .await;
        let expected = BTreeMap::from([
            ("busy".to_string(), Phase::Running),
            ("crashed".to_string(), Phase::Failed),
            ("drained".to_string(), Phase::Succeeded),
            ("new".to_string(), Phase::Pending),
            ("unscheduled".to_string(), Phase::Pending),
        ]);
        assert_eq!(phases().await, expected);
        let workers = launcher.workers().await.unwrap();
        assert!(
            workers
                .iter()
                .all(|w| w.job_type == "default" && w.started_unix > 0)
        );

        // Then the watch: a change arrives as an event, not as another list.
        let (method, _, query, _, respond) = next(&mut handle).await;
        assert_eq!(method, Method::GET);
        assert!(
            query.contains("watch=true") && query.contains(SELECTOR),
            "{query}"
        );
        assert!(
            query.contains("resourceVersion=10"),
            "resumes from the list: {query}"
        );
        let event = json!({"type": "MODIFIED", "object": job("unscheduled", json!({"active": 1, "ready": 1}))});
        let response = Response::builder()
            .status(StatusCode::OK)
            .body(Body::from(format!("{event}\n").into_bytes()))
            .unwrap();
        respond.send_response(response);
        wait_for(
            "the watch event to reach the cache",
            Duration::from_secs(5),
            || async { phases().await.get("unscheduled") == Some(&Phase::Running) },
        )
        .await;

        // A failing watch makes the cache suspect: no answer until it works again.
        let (method, _, query, _, respond) = next(&mut handle).await;
        assert!(
            method == Method::GET && query.contains("watch=true"),
            "{query}"
        );
        answer(
            respond,
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "message": "etcd is sulking", "reason": "InternalError", "code": 500}),
        );
        wait_for(
            "the failing watch to make the cache suspect",
            Duration::from_secs(5),
            || async {
                launcher
                    .workers()
                    .await
                    .is_err_and(|e| e.to_string().contains("etcd is sulking"))
            },
        )
        .await;
        let (_, _, query, _, respond) = next(&mut handle).await;
        assert!(query.contains("watch=true"), "retried: {query}");
        let event = json!({"type": "MODIFIED", "object": job("busy", json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}))});
        respond.send_response(
            Response::builder()
                .status(StatusCode::OK)
                .body(Body::from(format!("{event}\n").into_bytes()))
                .unwrap(),
        );
        wait_for(
            "the recovered watch to be trusted again",
            Duration::from_secs(5),
            || async { phases().await.get("busy") == Some(&Phase::Succeeded) },
        )
        .await;
    }
}
