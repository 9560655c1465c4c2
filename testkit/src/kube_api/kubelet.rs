//! The double's cluster side: the Job controller, the garbage and TTL collectors, the
//! scheduler and a kubelet that runs each pod's container as a real process on this
//! machine. A loop calls [`reconcile`] every few tens of milliseconds; each call moves
//! every Job and pod one step, as the real controllers would.
//!
//! Why real processes: what matters about a worker Job is what its process does with
//! what the Job gives it (the broker URL from a Secret, the job types from a
//! ConfigMap, SIGTERM and a grace period on delete), so the pod runs the real binary
//! with exactly what the Job's spec resolves to, and nothing from the test's own
//! environment:
//!
//! - **argv**: `command` + `args` when `command` is set, else the image's entrypoint,
//!   which the double maps from the image name to a binary (or one default binary for
//!   any image) + `args`. `$(VAR)` references are expanded as the kubelet does.
//! - **environment**: cleared, then `PATH`, `HOSTNAME` (the pod name),
//!   `KUBERNETES_SERVICE_HOST`/`_PORT` (this double), `envFrom`, then `env` in order
//!   (`value`, `secretKeyRef`, `configMapKeyRef`, basic `fieldRef`). A missing Secret,
//!   ConfigMap or key leaves the pod `Pending` with its container waiting in
//!   `CreateContainerConfigError`, retried each second, as the kubelet does.
//! - **volumes**: `configMap` and `secret` volumes are written as files, `emptyDir` is
//!   an empty directory, all under the pod's own temporary directory; a missing
//!   ConfigMap or Secret keeps the pod `ContainerCreating` with a `FailedMount` event.
//!   Other volume types are empty directories. `readOnly` and `sizeLimit` are not
//!   enforced.
//! - **paths**: the process cannot see the container's file system, so every `env`
//!   value and argument that starts with a volume's `mountPath` is rewritten to that
//!   volume's directory (`/etc/spillway/jobs.toml` becomes `<pod dir>/volumes/
//!   jobs-config/jobs.toml`), and `TMPDIR` is set to the `emptyDir` mounted at `/tmp`
//!   when there is one. The working directory is the pod's own directory.
//! - **read-only root**: a container with `readOnlyRootFilesystem: true` and no volume
//!   mounted at `/tmp` has no writable `/tmp` in a cluster (its root file system, `/tmp`
//!   included, is read-only), so here `/tmp` is treated as mounted from a directory that
//!   does not exist ([`NO_WRITABLE_TMP`]): `TMPDIR` points there and paths under `/tmp`
//!   are rewritten to it, so `mktemp` and anything else that honours `TMPDIR` fail as they
//!   would in the cluster. (A `/tmp/...` written inside a shell script is not rewritten:
//!   the process can still reach this machine's `/tmp` that way.)
//! - **output**: stdout and stderr go to the pod's log file, served by `pods/log`.
//! - **stopping**: a deleted pod's process gets SIGTERM, and SIGKILL (its whole process
//!   group) after `terminationGracePeriodSeconds`; when the main process exits, the rest
//!   of its group is killed, as a container's are.
//!
//! Pods with more than one container or with init containers are not run (their
//! container waits in `CreateContainerError` saying so); restartPolicy `OnFailure` is
//! treated as `Never` (a failed pod is replaced by the Job controller up to
//! `backoffLimit`, not restarted in place); readiness probes are not run (a running
//! container is ready).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        batch::v1::{Job, JobCondition, JobStatus},
        core::v1::{
            Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
            ContainerStateWaiting, ContainerStatus, Pod, PodCondition, PodIP, PodStatus, Volume,
        },
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time},
    jiff::{SignedDuration, Timestamp},
};
use nix::{
    sys::signal::{Signal, kill, killpg},
    unistd::Pid,
};

use super::{Fault, World, admission};

/// The PATH of a container whose image sets none (the container runtimes' default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How often a pod that cannot start yet, or a Job whose pod was refused, is retried.
const RETRY: Duration = Duration::from_secs(1);
/// How long an image pull is reported `ErrImagePull` before `ImagePullBackOff`.
const PULL_BACKOFF_AFTER: Duration = Duration::from_secs(1);
const NODE_NAME: &str = "testkit-node";
/// Where `/tmp` leads, under the pod's directory, for a container with a read-only root
/// file system and no volume at `/tmp`: a path that is never created, so nothing can be
/// written there. Named so that the error a command prints says why.
pub(crate) const NO_WRITABLE_TMP: &str = "no-writable-tmp-the-root-file-system-is-read-only";

/// A running container: the pod's main process and how it is being stopped.
struct Running {
    child: Child,
    started_at: Time,
    stop: Option<Stop>,
}

struct Stop {
    /// When SIGKILL follows the SIGTERM already sent.
    kill_at: Instant,
    killed: bool,
    /// Stopped by the kubelet (eviction) rather than by deletion: the pod stays, Failed.
    evicted: bool,
}

/// The node: what runs where, and the kubelet's and controllers' bookkeeping.
pub(crate) struct Node {
    /// Per-pod directories (volumes, logs, working directory).
    root: PathBuf,
    images: BTreeMap<String, PathBuf>,
    default_binary: Option<PathBuf>,
    enforce_restricted: bool,
    /// Port of the API server, for `KUBERNETES_SERVICE_PORT`.
    pub api_port: u16,
    pub fault: Fault,
    running: BTreeMap<String, Running>,
    /// Pods evicted before they ran: they fail at the next step.
    evicted_pending: BTreeSet<String>,
    /// When a pod's first image pull failed.
    pull_failed_at: BTreeMap<String, Instant>,
    /// When a pod that could not start, or a Job whose pod was refused, is tried again.
    retry_at: BTreeMap<String, Instant>,
    /// Terminal pods the Job controller has counted (by uid).
    counted: BTreeSet<String>,
}

impl Node {
    pub fn new(
        root: PathBuf,
        images: BTreeMap<String, PathBuf>,
        default_binary: Option<PathBuf>,
        enforce_restricted: bool,
    ) -> Self {
        Node {
            root,
            images,
            default_binary,
            enforce_restricted,
            api_port: 0,
            fault: Fault::None,
            running: BTreeMap::new(),
            evicted_pending: BTreeSet::new(),
            pull_failed_at: BTreeMap::new(),
            retry_at: BTreeMap::new(),
            counted: BTreeSet::new(),
        }
    }

    pub fn pod_dir(&self, pod: &str) -> PathBuf {
        self.root.join("pods").join(pod)
    }

    pub fn log_path(&self, pod: &str, container: &str) -> PathBuf {
        self.pod_dir(pod).join(format!("{container}.log"))
    }

    pub fn pid(&self, pod: &str) -> Option<u32> {
        self.running.get(pod).map(|r| r.child.id())
    }

    /// SIGKILLs every process group still running and reaps it: nothing outlives the double.
    pub fn kill_all(&mut self) {
        for (_, mut running) in std::mem::take(&mut self.running) {
            let _ = killpg(Pid::from_raw(running.child.id() as i32), Signal::SIGKILL);
            let _ = running.child.wait();
        }
    }
}

fn now() -> Time {
    Time(Timestamp::now())
}

/// One step of every controller, for every Job and pod.
pub(crate) fn reconcile(world: &mut World) {
    let jobs: Vec<String> = world
        .store
        .jobs
        .iter()
        // A Job put as it is waits for no controller, but a deletion still completes.
        .filter(|(name, job)| {
            !world.unmanaged.contains(*name) || job.metadata.deletion_timestamp.is_some()
        })
        .map(|(name, _)| name.clone())
        .collect();
    for job in jobs {
        sync_job(world, &job);
    }
    let pods: Vec<String> = world.store.pods.keys().cloned().collect();
    for pod in pods {
        sync_pod(world, &pod);
    }
}

fn owned_by<'a>(world: &'a World, uid: &str) -> Vec<&'a Pod> {
    world
        .store
        .pods
        .values()
        .filter(|p| {
            p.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.uid == uid)
        })
        .collect()
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(phase(pod), "Succeeded" | "Failed")
}

fn job_condition(job: &Job, type_: &str) -> Option<JobCondition> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_ && c.status == "True")
        .cloned()
}

/// The Job controller, the garbage collector and the TTL controller, for one Job.
fn sync_job(world: &mut World, name: &str) {
    let Some(job) = world.store.jobs.get(name).cloned() else {
        return;
    };
    let uid = job.metadata.uid.clone().unwrap_or_default();
    if job.metadata.deletion_timestamp.is_some() {
        // Foreground deletion: the dependents go first, then the Job. Meanwhile the Job
        // controller keeps its counts (a terminating pod is neither active nor ready)
        // and starts no pod.
        let pods: Vec<(String, bool)> = owned_by(world, &uid)
            .into_iter()
            .map(|p| {
                (
                    p.metadata.name.clone().unwrap_or_default(),
                    p.metadata.deletion_timestamp.is_some(),
                )
            })
            .collect();
        if pods.is_empty() {
            remove_job(world, name);
            return;
        }
        for (pod, deleting) in pods {
            if !deleting {
                delete_pod(world, &pod);
            }
        }
        let (status, _) = count_pods(world, &job);
        world
            .store
            .update::<Job>(name, |job| job.status = Some(status));
        return;
    }
    let finished = job_condition(&job, "Complete").or_else(|| job_condition(&job, "Failed"));
    if let Some(finished) = finished {
        let ttl = job.spec.as_ref().and_then(|s| s.ttl_seconds_after_finished);
        let at = finished.last_transition_time.map(|t| t.0);
        if let (Some(ttl), Some(at)) = (ttl, at)
            && at + SignedDuration::from_secs(i64::from(ttl)) <= Timestamp::now()
        {
            // The TTL controller deletes in the foreground.
            foreground_delete(world, name);
        }
        return;
    }

    let spec = job.spec.clone().unwrap_or_default();
    let (mut status, live) = count_pods(world, &job);

    let completions = spec.completions.unwrap_or(1);
    let backoff_limit = spec.backoff_limit.unwrap_or(6);
    if status.succeeded.unwrap_or(0) >= completions {
        let at = now();
        status.conditions = Some(vec![
            true_condition(
                "SuccessCriteriaMet",
                "CompletionsReached",
                "Reached expected number of succeeded pods",
                &at,
            ),
            true_condition(
                "Complete",
                "CompletionsReached",
                "Reached expected number of succeeded pods",
                &at,
            ),
        ]);
        status.completion_time = Some(at);
    } else if status.failed.unwrap_or(0) > backoff_limit {
        let at = now();
        status.conditions = Some(vec![
            true_condition(
                "FailureTarget",
                "BackoffLimitExceeded",
                "Job has reached the specified backoff limit",
                &at,
            ),
            true_condition(
                "Failed",
                "BackoffLimitExceeded",
                "Job has reached the specified backoff limit",
                &at,
            ),
        ]);
        for pod in &live {
            delete_pod(world, pod.metadata.name.as_deref().unwrap_or_default());
        }
    } else if live.is_empty()
        && world
            .node
            .retry_at
            .get(name)
            .is_none_or(|at| *at <= Instant::now())
    {
        create_pod(world, &job);
    }
    world
        .store
        .update::<Job>(name, |job| job.status = Some(status));
}

/// The Job's status with its pods counted as the Job controller counts them: each
/// finished pod once (succeeded or failed), the others active, ready or terminating.
/// Also returns the pods not finished.
fn count_pods(world: &mut World, job: &Job) -> (JobStatus, Vec<Pod>) {
    let uid = job.metadata.uid.clone().unwrap_or_default();
    let mut status = job.status.clone().unwrap_or_default();
    let pods: Vec<Pod> = owned_by(world, &uid).into_iter().cloned().collect();
    for pod in &pods {
        let pod_uid = pod.metadata.uid.clone().unwrap_or_default();
        if is_terminal(pod) && world.node.counted.insert(pod_uid) {
            let count = if phase(pod) == "Succeeded" {
                &mut status.succeeded
            } else {
                &mut status.failed
            };
            *count = Some(count.unwrap_or(0) + 1);
        }
    }
    let live: Vec<Pod> = pods.into_iter().filter(|p| !is_terminal(p)).collect();
    let terminating = live
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_some())
        .count() as i32;
    let active = live.len() as i32 - terminating;
    let ready = live
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && pod_is_ready(p))
        .count() as i32;
    status.start_time.get_or_insert_with(now);
    status.active = Some(active);
    status.ready = Some(ready);
    status.terminating = Some(terminating);
    status
        .uncounted_terminated_pods
        .get_or_insert_with(Default::default);
    (status, live)
}

fn true_condition(type_: &str, reason: &str, message: &str, at: &Time) -> JobCondition {
    JobCondition {
        type_: type_.into(),
        status: "True".into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_probe_time: Some(at.clone()),
        last_transition_time: Some(at.clone()),
    }
}

fn pod_is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Lowercase consonants and digits, as Kubernetes' generated names use.
fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    uuid::Uuid::new_v4()
        .as_bytes()
        .iter()
        .take(5)
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

/// The Job controller's pod create, through admission: refused by a `DenyPodCreation`
/// fault or by Pod Security, it leaves a `FailedCreate` event and is retried.
fn create_pod(world: &mut World, job: &Job) {
    let job_name = job.metadata.name.clone().unwrap_or_default();
    let template = job.spec.clone().unwrap_or_default().template;
    let spec = template.spec.unwrap_or_default();
    let prefix: String = job_name.chars().take(57).collect();
    let pod_name = format!("{}-{}", prefix.trim_end_matches('-'), random_suffix());
    let refusal = match &world.node.fault {
        Fault::DenyPodCreation(message) => Some(message.clone()),
        _ if world.node.enforce_restricted => {
            let violations = admission::pod_security_restricted(&spec);
            (!violations.is_empty()).then(|| {
                format!(
                    "pods {pod_name:?} is forbidden: violates PodSecurity \"restricted:latest\": {}",
                    violations.join(", ")
                )
            })
        }
        _ => None,
    };
    if let Some(refusal) = refusal {
        world.store.record_event(
            job,
            "Warning",
            "FailedCreate",
            &format!("Error creating: {refusal}"),
            "job-controller",
        );
        world.node.retry_at.insert(job_name, Instant::now() + RETRY);
        return;
    }
    let mut labels = template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    labels.insert("job-name".into(), job_name.clone());
    labels.insert("batch.kubernetes.io/job-name".into(), job_name.clone());
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(pod_name.clone()),
            namespace: Some(world.store.namespace.clone()),
            uid: Some(uuid::Uuid::new_v4().to_string()),
            creation_timestamp: Some(now()),
            labels: Some(labels),
            annotations: template.metadata.and_then(|m| m.annotations),
            owner_references: Some(vec![OwnerReference {
                api_version: "batch/v1".into(),
                kind: "Job".into(),
                name: job_name.clone(),
                uid: job.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        status: Some(PodStatus {
            phase: Some("Pending".into()),
            ..PodStatus::default()
        }),
    };
    world.store.put(pod);
    world.store.record_event(
        job,
        "Normal",
        "SuccessfulCreate",
        &format!("Created pod: {pod_name}"),
        "job-controller",
    );
}

/// Foreground deletion: the object is marked (deletionTimestamp and the
/// `foregroundDeletion` finalizer) and stays until its dependents are gone.
pub(crate) fn foreground_delete(world: &mut World, name: &str) {
    world.store.update::<Job>(name, |job| {
        job.metadata.deletion_timestamp.get_or_insert_with(now);
        job.metadata.deletion_grace_period_seconds.get_or_insert(0);
        let finalizers = job.metadata.finalizers.get_or_insert_with(Vec::new);
        if !finalizers.iter().any(|f| f == "foregroundDeletion") {
            finalizers.push("foregroundDeletion".into());
        }
    });
}

/// Background deletion: the Job goes now, its pods are deleted behind it.
pub(crate) fn background_delete(world: &mut World, name: &str) {
    let Some(job) = remove_job(world, name) else {
        return;
    };
    let uid = job.metadata.uid.unwrap_or_default();
    let pods: Vec<String> = owned_by(world, &uid)
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    for pod in pods {
        delete_pod(world, &pod);
    }
}

/// Orphaning deletion (the API's default for `batch/v1` Jobs): the Job goes, its pods
/// stay and keep running, without an owner.
pub(crate) fn orphan_delete(world: &mut World, name: &str) {
    let Some(job) = remove_job(world, name) else {
        return;
    };
    let uid = job.metadata.uid.unwrap_or_default();
    let pods: Vec<String> = owned_by(world, &uid)
        .into_iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    for pod in pods {
        world
            .store
            .update::<Pod>(&pod, |p| p.metadata.owner_references = None);
    }
}

fn remove_job(world: &mut World, name: &str) -> Option<Job> {
    let job = world.store.remove::<Job>(name)?;
    world.node.retry_at.remove(name);
    world.unmanaged.remove(name);
    world.store.removed_jobs.push(job.clone());
    Some(job)
}

/// Graceful pod deletion: deletionTimestamp now + grace, SIGTERM to a running process.
fn delete_pod(world: &mut World, name: &str) {
    let Some(pod) = world.store.pods.get(name) else {
        return;
    };
    let grace = grace_seconds(pod);
    world.store.update::<Pod>(name, |pod| {
        pod.metadata.deletion_timestamp = Some(Time(
            Timestamp::now() + SignedDuration::from_secs(grace as i64),
        ));
        pod.metadata.deletion_grace_period_seconds = Some(grace as i64);
    });
    stop_container(world, name, grace, false);
}

fn grace_seconds(pod: &Pod) -> u64 {
    pod.spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .unwrap_or(30)
        .max(0) as u64
}

/// SIGTERM now, SIGKILL after `grace` seconds.
fn stop_container(world: &mut World, pod: &str, grace: u64, evicted: bool) {
    if let Some(running) = world.node.running.get_mut(pod)
        && running.stop.is_none()
    {
        let _ = kill(Pid::from_raw(running.child.id() as i32), Signal::SIGTERM);
        running.stop = Some(Stop {
            kill_at: Instant::now() + Duration::from_secs(grace),
            killed: false,
            evicted,
        });
    }
}

/// Node-pressure eviction by the kubelet: SIGTERM, SIGKILL after the grace period, and
/// the pod ends `Failed` with reason `Evicted` (it is not deleted). False if there is
/// no such pod or it has already finished.
pub(crate) fn evict(world: &mut World, pod: &str) -> bool {
    let Some(current) = world.store.pods.get(pod) else {
        return false;
    };
    if is_terminal(current) {
        return false;
    }
    let grace = grace_seconds(current);
    world.store.update::<Pod>(pod, |p| {
        let status = p.status.get_or_insert_with(Default::default);
        set_condition(
            status,
            "DisruptionTarget",
            "True",
            Some("TerminationByKubelet"),
            Some(EVICTED_MESSAGE),
        );
    });
    if world.node.running.contains_key(pod) {
        stop_container(world, pod, grace, true);
    } else {
        world.node.evicted_pending.insert(pod.to_string());
    }
    true
}

const EVICTED_MESSAGE: &str = "The node was low on resource: memory. ";

fn set_condition(
    status: &mut PodStatus,
    type_: &str,
    value: &str,
    reason: Option<&str>,
    message: Option<&str>,
) {
    let conditions = status.conditions.get_or_insert_with(Vec::new);
    let existing = conditions.iter_mut().find(|c| c.type_ == type_);
    let changed = existing.as_ref().is_none_or(|c| c.status != value);
    let condition = PodCondition {
        type_: type_.into(),
        status: value.into(),
        reason: reason.map(Into::into),
        message: message.map(Into::into),
        last_transition_time: if changed {
            Some(now())
        } else {
            existing
                .as_ref()
                .and_then(|c| c.last_transition_time.clone())
        },
        ..PodCondition::default()
    };
    match existing {
        Some(c) => *c = condition,
        None => conditions.push(condition),
    }
}

fn container_status(container: &Container, state: ContainerState, ready: bool) -> ContainerStatus {
    let started = state.running.is_some();
    ContainerStatus {
        name: container.name.clone(),
        image: container.image.clone().unwrap_or_default(),
        image_id: String::new(),
        ready,
        started: Some(started),
        restart_count: 0,
        state: Some(state),
        ..ContainerStatus::default()
    }
}

/// The pod is `Pending` with its container waiting for `reason`. True if that is news.
fn set_waiting(
    world: &mut World,
    pod: &str,
    container: &Container,
    reason: &str,
    message: &str,
) -> bool {
    let waiting = ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.into()),
            message: (!message.is_empty()).then(|| message.into()),
        }),
        ..ContainerState::default()
    };
    let status = container_status(container, waiting, false);
    world.store.update::<Pod>(pod, |p| {
        let s = p.status.get_or_insert_with(Default::default);
        let unready = format!("containers with unready status: [{}]", container.name);
        set_condition(s, "PodReadyToStartContainers", "True", None, None);
        set_condition(s, "Initialized", "True", None, None);
        set_condition(
            s,
            "Ready",
            "False",
            Some("ContainersNotReady"),
            Some(&unready),
        );
        set_condition(
            s,
            "ContainersReady",
            "False",
            Some("ContainersNotReady"),
            Some(&unready),
        );
        s.container_statuses = Some(vec![status]);
    })
}

/// The scheduler and the kubelet, for one pod.
fn sync_pod(world: &mut World, name: &str) {
    let Some(pod) = world.store.pods.get(name).cloned() else {
        return;
    };
    if world.node.running.contains_key(name) {
        watch_process(world, &pod);
        return;
    }
    if pod.metadata.deletion_timestamp.is_some() {
        // Nothing runs (it never started, or it has finished): the pod goes at once.
        remove_pod(world, name);
        return;
    }
    if is_terminal(&pod) {
        return;
    }
    let Some(container) = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .cloned()
    else {
        return;
    };
    if world.node.evicted_pending.remove(name) {
        world.store.update::<Pod>(name, |p| {
            let s = p.status.get_or_insert_with(Default::default);
            s.phase = Some("Failed".into());
            s.reason = Some("Evicted".into());
            s.message = Some(EVICTED_MESSAGE.into());
        });
        return;
    }
    if !schedule(world, &pod) {
        return;
    }
    if world
        .node
        .retry_at
        .get(name)
        .is_some_and(|at| *at > Instant::now())
    {
        return;
    }
    let spec = pod.spec.clone().unwrap_or_default();
    if spec.containers.len() > 1 || spec.init_containers.as_ref().is_some_and(|c| !c.is_empty()) {
        set_waiting(
            world,
            name,
            &container,
            "CreateContainerError",
            "the test double runs single-container pods without init containers only",
        );
        return;
    }
    let image = container.image.clone().unwrap_or_default();
    let entrypoint = world
        .node
        .images
        .get(&image)
        .or(world.node.default_binary.as_ref())
        .cloned();
    let policy = container
        .image_pull_policy
        .as_deref()
        .unwrap_or("IfNotPresent");
    let pull_fails = match world.node.fault {
        Fault::ImagePullBackOff => true,
        Fault::NoRegistry => policy == "Always",
        _ => container.command.is_none() && entrypoint.is_none(),
    };
    if pull_fails {
        pull_failed(world, &pod, &container, &image);
        return;
    }
    world.node.pull_failed_at.remove(name);

    let dir = world.node.pod_dir(name);
    let mounts = match materialise_volumes(world, &pod, &container, &dir) {
        Ok(mounts) => mounts,
        Err((volume, message)) => {
            set_waiting(world, name, &container, "ContainerCreating", "");
            world.store.record_event(
                &pod,
                "Warning",
                "FailedMount",
                &format!("MountVolume.SetUp failed for volume {volume:?} : {message}"),
                "kubelet",
            );
            world
                .node
                .retry_at
                .insert(name.into(), Instant::now() + RETRY);
            return;
        }
    };
    let env = match container_env(world, &pod, &container, &mounts) {
        Ok(env) => env,
        Err(message) => {
            set_waiting(
                world,
                name,
                &container,
                "CreateContainerConfigError",
                &message,
            );
            world.store.record_event(
                &pod,
                "Warning",
                "Failed",
                &format!("Error: {message}"),
                "kubelet",
            );
            world
                .node
                .retry_at
                .insert(name.into(), Instant::now() + RETRY);
            return;
        }
    };
    world.node.retry_at.remove(name);
    start_container(world, &pod, &container, entrypoint, env, &mounts, &dir);
}

/// Scheduling: under the `Pending` fault no node has room. True once scheduled.
fn schedule(world: &mut World, pod: &Pod) -> bool {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let scheduled = pod.spec.as_ref().is_some_and(|s| s.node_name.is_some());
    if scheduled {
        return true;
    }
    if world.node.fault == Fault::Pending {
        const UNSCHEDULABLE: &str = "0/1 nodes are available: 1 Insufficient cpu. preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod.";
        let changed = world.store.update::<Pod>(name, |p| {
            let s = p.status.get_or_insert_with(Default::default);
            set_condition(
                s,
                "PodScheduled",
                "False",
                Some("Unschedulable"),
                Some(UNSCHEDULABLE),
            );
        });
        if changed {
            world.store.record_event(
                pod,
                "Warning",
                "FailedScheduling",
                UNSCHEDULABLE,
                "default-scheduler",
            );
        }
        return false;
    }
    world.store.update::<Pod>(name, |p| {
        p.spec.get_or_insert_with(Default::default).node_name = Some(NODE_NAME.into());
        let s = p.status.get_or_insert_with(Default::default);
        set_condition(s, "PodScheduled", "True", None, None);
        s.start_time = Some(now());
        s.host_ip = Some("127.0.0.1".into());
    });
    let namespace = world.store.namespace.clone();
    world.store.record_event(
        pod,
        "Normal",
        "Scheduled",
        &format!("Successfully assigned {namespace}/{name} to {NODE_NAME}"),
        "default-scheduler",
    );
    true
}

/// `ErrImagePull`, then `ImagePullBackOff` as the kubelet backs off.
fn pull_failed(world: &mut World, pod: &Pod, container: &Container, image: &str) {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let first = *world
        .node
        .pull_failed_at
        .entry(name.to_string())
        .or_insert_with(Instant::now);
    let (reason, message) = if first.elapsed() < PULL_BACKOFF_AFTER {
        (
            "ErrImagePull",
            format!(
                "failed to pull and unpack image {image:?}: failed to resolve reference {image:?}: the test double has no registry"
            ),
        )
    } else {
        (
            "ImagePullBackOff",
            format!("Back-off pulling image {image:?}"),
        )
    };
    if set_waiting(world, name, container, reason, &message) {
        let event_reason = if reason == "ErrImagePull" {
            "Failed"
        } else {
            "BackOff"
        };
        world
            .store
            .record_event(pod, "Warning", event_reason, &message, "kubelet");
    }
}

/// Writes the pod's volumes under `dir/volumes` and returns each mount as
/// (mountPath, directory), longest path first, with `/tmp` leading nowhere when the root
/// file system is read-only and no volume is mounted there; or the volume that cannot be
/// mounted yet.
fn materialise_volumes(
    world: &World,
    pod: &Pod,
    container: &Container,
    dir: &Path,
) -> Result<Vec<(String, PathBuf)>, (String, String)> {
    let mut directories = BTreeMap::new();
    for volume in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        let at = dir.join("volumes").join(&volume.name);
        let failed = |message: String| (volume.name.clone(), message);
        let _ = std::fs::remove_dir_all(&at);
        std::fs::create_dir_all(&at).map_err(|e| failed(e.to_string()))?;
        if let Some(source) = &volume.config_map {
            let data = world.store.config_maps.get(&source.name);
            let missing = format!("configmap {:?} not found", source.name);
            let files = Files {
                data,
                items: source.items.as_deref(),
                default_mode: source.default_mode,
                optional: source.optional,
                missing: &missing,
                missing_key: "configmap references non-existent config key",
            };
            files.write(&at, volume).map_err(failed)?;
        } else if let Some(source) = &volume.secret {
            let secret = source.secret_name.clone().unwrap_or_default();
            let data = world.store.secrets.get(&secret);
            let missing = format!("secret {secret:?} not found");
            let files = Files {
                data,
                items: source.items.as_deref(),
                default_mode: source.default_mode,
                optional: source.optional,
                missing: &missing,
                missing_key: "references non-existent secret key",
            };
            files.write(&at, volume).map_err(failed)?;
        }
        directories.insert(volume.name.clone(), at);
    }
    let mut mounts: Vec<(String, PathBuf)> = container
        .volume_mounts
        .iter()
        .flatten()
        .filter_map(|m| {
            let base = directories.get(&m.name)?;
            let host = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                Some(sub) => base.join(sub),
                None => base.clone(),
            };
            Some((m.mount_path.trim_end_matches('/').to_string(), host))
        })
        .collect();
    let read_only_root = container
        .security_context
        .as_ref()
        .and_then(|s| s.read_only_root_filesystem)
        == Some(true);
    if read_only_root && !mounts.iter().any(|(path, _)| path == "/tmp") {
        mounts.push(("/tmp".into(), dir.join(NO_WRITABLE_TMP)));
    }
    mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
    Ok(mounts)
}

/// The files of a `configMap` or `secret` volume: its keys, or the `items` chosen.
struct Files<'a> {
    data: Option<&'a BTreeMap<String, String>>,
    items: Option<&'a [k8s_openapi::api::core::v1::KeyToPath]>,
    default_mode: Option<i32>,
    optional: Option<bool>,
    /// The kubelet's words for a missing source and a missing key.
    missing: &'a str,
    missing_key: &'a str,
}

impl Files<'_> {
    fn write(&self, at: &Path, volume: &Volume) -> Result<(), String> {
        let optional = self.optional == Some(true);
        let Some(data) = self.data else {
            return if optional {
                Ok(())
            } else {
                Err(self.missing.to_string())
            };
        };
        let mut files = Vec::new();
        match self.items {
            Some(items) => {
                for item in items {
                    match data.get(&item.key) {
                        Some(value) => files.push((item.path.clone(), value, item.mode)),
                        None if optional => {}
                        None => return Err(format!("{}: {}", self.missing_key, item.key)),
                    }
                }
            }
            None => files.extend(data.iter().map(|(k, v)| (k.clone(), v, None))),
        }
        for (path, content, mode) in files {
            let file = at.join(&path);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
            }
            std::fs::write(&file, content).map_err(|e| format!("{}: {e}", volume.name))?;
            let mode = mode.or(self.default_mode).unwrap_or(0o644) as u32;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// `$(VAR)` replaced by VAR's value when it is defined, `$$(` kept as `$(`, the rest as is.
fn expand(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(escaped) = after.strip_prefix("$(") {
            out.push_str("$(");
            rest = escaped;
        } else if let Some(reference) = after.strip_prefix('(')
            && let Some(end) = reference.find(')')
        {
            let name = &reference[..end];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, value)) => out.push_str(value),
                None => out.push_str(&format!("$({name})")),
            }
            rest = &reference[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// `value` with a leading volume mount path replaced by the volume's directory.
fn rewrite(value: &str, mounts: &[(String, PathBuf)]) -> String {
    for (path, host) in mounts {
        if value == path || value.starts_with(&format!("{path}/")) {
            return format!("{}{}", host.display(), &value[path.len()..]);
        }
    }
    value.to_string()
}

fn set(env: &mut Vec<(String, String)>, name: &str, value: String) {
    match env.iter_mut().find(|(k, _)| k == name) {
        Some(entry) => entry.1 = value,
        None => env.push((name.to_string(), value)),
    }
}

/// The container's environment, resolved as the kubelet resolves it.
fn container_env(
    world: &World,
    pod: &Pod,
    container: &Container,
    mounts: &[(String, PathBuf)],
) -> Result<Vec<(String, String)>, String> {
    let store = &world.store;
    let namespace = &store.namespace;
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    let mut env = vec![
        ("PATH".to_string(), DEFAULT_PATH.to_string()),
        ("HOSTNAME".to_string(), pod_name.clone()),
        (
            "KUBERNETES_SERVICE_HOST".to_string(),
            "127.0.0.1".to_string(),
        ),
        (
            "KUBERNETES_SERVICE_PORT".to_string(),
            world.node.api_port.to_string(),
        ),
    ];
    let secret = |name: &str| {
        store
            .secrets
            .get(name)
            .ok_or_else(|| format!("secret {name:?} not found"))
    };
    let config_map = |name: &str| {
        store
            .config_maps
            .get(name)
            .ok_or_else(|| format!("configmap {name:?} not found"))
    };
    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.clone().unwrap_or_default();
        let (data, optional) = if let Some(r) = &source.config_map_ref {
            (config_map(&r.name), r.optional)
        } else if let Some(r) = &source.secret_ref {
            (secret(&r.name), r.optional)
        } else {
            continue;
        };
        match data {
            Ok(data) => {
                for (k, v) in data {
                    set(&mut env, &format!("{prefix}{k}"), v.clone());
                }
            }
            Err(_) if optional == Some(true) => {}
            Err(message) => return Err(message),
        }
    }
    for var in container.env.iter().flatten() {
        let value = match &var.value_from {
            None => Some(expand(var.value.as_deref().unwrap_or_default(), &env)),
            Some(from) => {
                if let Some(r) = &from.secret_key_ref {
                    match secret(&r.name) {
                        Ok(data) => match data.get(&r.key) {
                            Some(v) => Some(v.clone()),
                            None if r.optional == Some(true) => None,
                            None => {
                                return Err(format!(
                                    "couldn't find key {} in Secret {namespace}/{}",
                                    r.key, r.name
                                ));
                            }
                        },
                        Err(_) if r.optional == Some(true) => None,
                        Err(message) => return Err(message),
                    }
                } else if let Some(r) = &from.config_map_key_ref {
                    match config_map(&r.name) {
                        Ok(data) => match data.get(&r.key) {
                            Some(v) => Some(v.clone()),
                            None if r.optional == Some(true) => None,
                            None => {
                                return Err(format!(
                                    "couldn't find key {} in ConfigMap {namespace}/{}",
                                    r.key, r.name
                                ));
                            }
                        },
                        Err(_) if r.optional == Some(true) => None,
                        Err(message) => return Err(message),
                    }
                } else if let Some(r) = &from.field_ref {
                    let value = match r.field_path.as_str() {
                        "metadata.name" => pod_name.clone(),
                        "metadata.namespace" => namespace.clone(),
                        "metadata.uid" => pod.metadata.uid.clone().unwrap_or_default(),
                        "spec.nodeName" => NODE_NAME.into(),
                        "status.podIP" | "status.hostIP" => "127.0.0.1".into(),
                        other => {
                            return Err(format!(
                                "fieldRef {other:?} is not supported by the test double"
                            ));
                        }
                    };
                    Some(value)
                } else {
                    return Err(format!(
                        "env {:?}: resourceFieldRef is not supported by the test double",
                        var.name
                    ));
                }
            }
        };
        if let Some(value) = value {
            set(&mut env, &var.name, value);
        }
    }
    for (_, value) in env.iter_mut() {
        *value = rewrite(value, mounts);
    }
    if let Some((_, tmp)) = mounts.iter().find(|(path, _)| path == "/tmp")
        && !env.iter().any(|(k, _)| k == "TMPDIR")
    {
        env.push(("TMPDIR".into(), tmp.display().to_string()));
    }
    Ok(env)
}

fn start_container(
    world: &mut World,
    pod: &Pod,
    container: &Container,
    entrypoint: Option<PathBuf>,
    env: Vec<(String, String)>,
    mounts: &[(String, PathBuf)],
    dir: &Path,
) {
    let name = pod.metadata.name.clone().unwrap_or_default();
    // The spec's words are container paths and are rewritten; the entrypoint is a path
    // on this machine and is not.
    let from_spec = |text: &String| rewrite(&expand(text, &env), mounts);
    let args = container.args.iter().flatten().map(from_spec);
    let argv: Vec<String> = match &container.command {
        Some(command) => command.iter().map(from_spec).chain(args).collect(),
        None => entrypoint
            .map(|e| e.display().to_string())
            .into_iter()
            .chain(args)
            .collect(),
    };
    let log_path = world.node.log_path(&name, &container.name);
    let spawned = (|| -> std::io::Result<Child> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| std::io::Error::other("no command and no entrypoint"))?;
        std::fs::create_dir_all(dir)?;
        let log = File::options().create(true).append(true).open(&log_path)?;
        let workdir = match &container.working_dir {
            Some(w) => PathBuf::from(rewrite(w, mounts)),
            None => dir.to_path_buf(),
        };
        Command::new(program)
            .args(args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir(workdir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group, so stopping the container stops all it started.
            .process_group(0)
            .spawn()
    })();
    let started_at = now();
    match spawned {
        Err(error) => {
            let terminated = ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: 128,
                    reason: Some("StartError".into()),
                    message: Some(format!("failed to start {argv:?}: {error}")),
                    finished_at: Some(started_at),
                    ..ContainerStateTerminated::default()
                }),
                ..ContainerState::default()
            };
            let status = container_status(container, terminated, false);
            world.store.update::<Pod>(&name, |p| {
                let s = p.status.get_or_insert_with(Default::default);
                s.phase = Some("Failed".into());
                s.container_statuses = Some(vec![status]);
            });
        }
        Ok(child) => {
            let running = ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(started_at.clone()),
                }),
                ..ContainerState::default()
            };
            let mut status = container_status(container, running, true);
            status.container_id = Some(format!("testkit://{}", child.id()));
            world.node.running.insert(
                name.clone(),
                Running {
                    child,
                    started_at,
                    stop: None,
                },
            );
            world.store.update::<Pod>(&name, |p| {
                let s = p.status.get_or_insert_with(Default::default);
                s.phase = Some("Running".into());
                s.pod_ip = Some("127.0.0.1".into());
                s.pod_ips = Some(vec![PodIP {
                    ip: "127.0.0.1".into(),
                }]);
                set_condition(s, "PodReadyToStartContainers", "True", None, None);
                set_condition(s, "Initialized", "True", None, None);
                set_condition(s, "Ready", "True", None, None);
                set_condition(s, "ContainersReady", "True", None, None);
                s.container_statuses = Some(vec![status]);
            });
            let message = format!("Started container {}", container.name);
            world
                .store
                .record_event(pod, "Normal", "Started", &message, "kubelet");
        }
    }
}

/// A running pod: has its process exited, or is its grace period over?
fn watch_process(world: &mut World, pod: &Pod) {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let Some(running) = world.node.running.get_mut(&name) else {
        return;
    };
    let exited = match running.child.try_wait() {
        Ok(Some(status)) => status,
        Ok(None) => {
            if let Some(stop) = &mut running.stop
                && !stop.killed
                && Instant::now() >= stop.kill_at
            {
                let _ = killpg(Pid::from_raw(running.child.id() as i32), Signal::SIGKILL);
                stop.killed = true;
            }
            return;
        }
        Err(_) => return,
    };
    let running = world.node.running.remove(&name).expect("checked above");
    // The container is gone: so is everything it started.
    let _ = killpg(Pid::from_raw(running.child.id() as i32), Signal::SIGKILL);
    use std::os::unix::process::ExitStatusExt;
    let signal = exited.signal();
    let exit_code = exited.code().unwrap_or(128 + signal.unwrap_or(0));
    let evicted = running.stop.as_ref().is_some_and(|s| s.evicted);
    let container = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .cloned()
        .unwrap_or_default();
    let terminated = ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code,
            signal,
            reason: Some(if exit_code == 0 { "Completed" } else { "Error" }.into()),
            started_at: Some(running.started_at),
            finished_at: Some(now()),
            container_id: Some(format!("testkit://{}", running.child.id())),
            ..ContainerStateTerminated::default()
        }),
        ..ContainerState::default()
    };
    let status = container_status(&container, terminated, false);
    world.store.update::<Pod>(&name, |p| {
        let s = p.status.get_or_insert_with(Default::default);
        let (phase, why) = if evicted {
            ("Failed", "PodFailed")
        } else if exit_code == 0 {
            ("Succeeded", "PodCompleted")
        } else {
            ("Failed", "PodFailed")
        };
        s.phase = Some(phase.into());
        if evicted {
            s.reason = Some("Evicted".into());
            s.message = Some(EVICTED_MESSAGE.into());
        }
        set_condition(s, "Ready", "False", Some(why), None);
        set_condition(s, "ContainersReady", "False", Some(why), None);
        set_condition(s, "PodReadyToStartContainers", "False", None, None);
        s.container_statuses = Some(vec![status]);
    });
    if pod.metadata.deletion_timestamp.is_some() {
        remove_pod(world, &name);
    }
}

fn remove_pod(world: &mut World, name: &str) {
    if world.store.remove::<Pod>(name).is_some() {
        let _ = std::fs::remove_dir_all(world.node.pod_dir(name));
        world.node.retry_at.remove(name);
        world.node.pull_failed_at.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_expand_as_the_kubelet_expands_them() {
        let env = vec![("A".to_string(), "1".to_string())];
        let cases = [
            ("x$(A)y", "x1y"),
            ("$(B)", "$(B)"),
            ("$$(A)", "$(A)"),
            ("$A", "$A"),
            ("$(A", "$(A"),
            ("cost $5", "cost $5"),
        ];
        for (text, expected) in cases {
            assert_eq!(expand(text, &env), expected, "{text}");
        }
    }

    #[test]
    fn mount_paths_are_rewritten_to_the_volume_directory() {
        let mounts = vec![
            ("/etc/spillway/extra".to_string(), PathBuf::from("/p/extra")),
            ("/etc/spillway".to_string(), PathBuf::from("/p/jobs")),
            ("/tmp".to_string(), PathBuf::from("/p/tmp")),
        ];
        let cases = [
            ("/etc/spillway/jobs.toml", "/p/jobs/jobs.toml"),
            ("/etc/spillway/extra/a", "/p/extra/a"),
            ("/etc/spillway", "/p/jobs"),
            ("/etc/spillwayx", "/etc/spillwayx"),
            ("/tmp", "/p/tmp"),
            ("relative/tmp", "relative/tmp"),
        ];
        for (value, expected) in cases {
            assert_eq!(rewrite(value, &mounts), expected, "{value}");
        }
    }
}
