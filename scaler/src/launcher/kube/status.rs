//! What a worker Job's status and its pod's status say about the worker: its
//! [`Phase`], and why a pending one has not started.
//!
//! Pure functions of the objects the API server returns, so each case (an image that
//! cannot be pulled, a missing Secret key, a pod nobody can schedule, a Job being
//! deleted) is a table test rather than a cluster.

use k8s_openapi::api::{batch::v1::Job, core::v1::Pod};

use crate::policy::{Phase, Waiting};

/// A Job's phase: stopping once it is marked for deletion (its pod is terminating),
/// finished by its conditions or counts, running once its pod is ready, pending
/// before (unscheduled, pulling its image).
pub fn phase_of(job: &Job) -> Phase {
    let Some(status) = &job.status else {
        return stopping_or(job, Phase::Pending);
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
        stopping_or(job, Phase::Running)
    } else {
        stopping_or(job, Phase::Pending)
    }
}

fn stopping_or(job: &Job, phase: Phase) -> Phase {
    if job.metadata.deletion_timestamp.is_some() {
        Phase::Stopping
    } else {
        phase
    }
}

/// Container waiting reasons that do not clear by waiting: someone has to change the
/// image, the registry, the Secret or the ConfigMap first. (`ErrImagePull` alone may be
/// a registry's bad moment; the kubelet retries it, and the start timeout covers it.)
const CANNOT_START: &[&str] = &[
    "ImagePullBackOff",
    "ErrImageNeverPull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
];

/// Why `pod` is not running yet, from its containers' waiting states or its
/// scheduling condition; `None` when nothing is wrong that the pod's status says.
pub fn waiting_of(pod: &Pod) -> Option<Waiting> {
    let status = pod.status.as_ref()?;
    let waiting = status
        .container_statuses
        .iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.waiting.as_ref())
        .find_map(|w| {
            let reason = w.reason.clone()?;
            let permanent = CANNOT_START.contains(&reason.as_str());
            let detail = match w.message.as_deref().filter(|m| !m.is_empty()) {
                Some(message) => format!("{reason}: {message}"),
                None => reason,
            };
            Some(Waiting { detail, permanent })
        });
    waiting.or_else(|| {
        status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False")
            .map(|c| Waiting {
                detail: match (&c.reason, &c.message) {
                    (Some(reason), Some(message)) => format!("{reason}: {message}"),
                    (Some(reason), None) => reason.clone(),
                    _ => "not scheduled".into(),
                },
                permanent: false,
            })
    })
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn job(metadata: Value, status: Value) -> Job {
        serde_json::from_value(json!({"metadata": metadata, "status": status})).unwrap()
    }

    #[test]
    fn phases_by_job_status() {
        let deleting = json!({"name": "w", "deletionTimestamp": "2026-12-01T10:00:00Z"});
        let cases = [
            (
                "no status yet",
                job(json!({"name": "w"}), Value::Null),
                Phase::Pending,
            ),
            (
                "pod not ready",
                job(json!({}), json!({"active": 1, "ready": 0})),
                Phase::Pending,
            ),
            (
                "pod ready",
                job(json!({}), json!({"active": 1, "ready": 1})),
                Phase::Running,
            ),
            (
                "complete",
                job(
                    json!({}),
                    json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}),
                ),
                Phase::Succeeded,
            ),
            (
                "failed",
                job(
                    json!({}),
                    json!({"failed": 1, "conditions": [{"type": "Failed", "status": "True"}]}),
                ),
                Phase::Failed,
            ),
            // A foreground delete leaves the Job, its pod terminating: it is stopping,
            // not pending, so nobody stops it again.
            (
                "deleted, pod terminating",
                job(deleting.clone(), json!({"active": 1, "ready": 0})),
                Phase::Stopping,
            ),
            (
                "deleted while running",
                job(deleting.clone(), json!({"active": 1, "ready": 1})),
                Phase::Stopping,
            ),
            (
                "deleted after finishing",
                job(
                    deleting,
                    json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}),
                ),
                Phase::Succeeded,
            ),
        ];
        for (name, job, expected) in cases {
            assert_eq!(phase_of(&job), expected, "{name}");
        }
    }

    fn pod(status: Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "w-abcde"}, "status": status})).unwrap()
    }

    fn waiting_container(reason: &str, message: &str) -> Value {
        json!({"phase": "Pending", "containerStatuses": [{
            "name": "worker", "image": "spillway-worker:dev", "imageID": "", "ready": false,
            "restartCount": 0, "state": {"waiting": {"reason": reason, "message": message}}
        }]})
    }

    #[test]
    fn why_a_pod_has_not_started() {
        let cases = [
            ("running", pod(json!({"phase": "Running"})), None),
            (
                "image pull backing off: cannot start until the image is fixed",
                pod(waiting_container("ImagePullBackOff", "Back-off pulling image \"nope:1\"")),
                Some(Waiting { detail: "ImagePullBackOff: Back-off pulling image \"nope:1\"".into(), permanent: true }),
            ),
            (
                "a missing Secret key",
                pod(waiting_container("CreateContainerConfigError", "couldn't find key amqp-url in Secret spillway/spillway-rabbitmq")),
                Some(Waiting {
                    detail: "CreateContainerConfigError: couldn't find key amqp-url in Secret spillway/spillway-rabbitmq".into(),
                    permanent: true,
                }),
            ),
            (
                "a first pull error may pass: left to the start timeout",
                pod(waiting_container("ErrImagePull", "i/o timeout")),
                Some(Waiting { detail: "ErrImagePull: i/o timeout".into(), permanent: false }),
            ),
            (
                "creating the container is normal",
                pod(waiting_container("ContainerCreating", "")),
                Some(Waiting { detail: "ContainerCreating".into(), permanent: false }),
            ),
            (
                "no capacity: may clear when a node frees up",
                pod(json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                    "reason": "Unschedulable", "message": "0/1 nodes are available: 1 Insufficient cpu."}]})),
                Some(Waiting { detail: "Unschedulable: 0/1 nodes are available: 1 Insufficient cpu.".into(), permanent: false }),
            ),
        ];
        for (name, pod, expected) in cases {
            assert_eq!(waiting_of(&pod), expected, "{name}");
        }
    }
}
