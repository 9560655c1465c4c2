//! The worker Job manifest: what a Spillway worker is on Kubernetes, as a pure
//! function of the [`JobTemplate`] and the worker's [`WorkerSpec`].
//!
//! Kept apart from the launcher's API calls so that the Job can be built, inspected
//! and written out (for the same schema and Pod Security checks as the deploy
//! manifests) without a cluster. One Job runs one pod: `backoffLimit: 0` (a failed
//! worker is the scaler's to replace, not Kubernetes's to retry), a TTL after it
//! finishes, resources, a non-root read-only container with a size-limited `/tmp`.
//! Its environment is the spec's: a Secret's key is referred to (`valueFrom`), never
//! written in, and a ConfigMap file is a read-only volume.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        batch::v1::{Job, JobSpec},
        core::v1::{
            Capabilities, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar,
            EnvVarSource, KeyToPath, PodSecurityContext, PodSpec, PodTemplateSpec,
            ResourceRequirements, SeccompProfile, SecretKeySelector, SecurityContext, Volume,
            VolumeMount,
        },
    },
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::ObjectMeta},
};

use crate::launcher::spec::{Source, Var, WorkerSpec};

/// Label every Spillway worker Job carries, and the selector of the watch.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "spillway-scaler");
pub const NAME_LABEL: (&str, &str) = ("app.kubernetes.io/name", "spillway-worker");
/// The label the NetworkPolicy admits to RabbitMQ.
pub const PART_OF: (&str, &str) = ("app.kubernetes.io/part-of", "spillway");
pub const JOB_TYPE_LABEL: &str = "spillway.dev/job-type";
pub const WORKER_LABEL: &str = "spillway.dev/worker";

/// The uid and gid the images create for their one user.
const WORKER_UID: i64 = 10001;

/// Everything a worker Job is made of besides its [`WorkerSpec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobTemplate {
    /// Container image per job type: its own `image`, else `WORKER_IMAGE`.
    pub images: BTreeMap<String, String>,
    /// `imagePullPolicy`, set explicitly: a `:latest` image would otherwise be pulled
    /// every time, which fails on clusters whose images are built in place.
    pub image_pull_policy: String,
    pub ttl_seconds_after_finished: i32,
    /// Time a deleted worker gets to finish the rows it holds.
    pub termination_grace_seconds: i64,
    pub cpu_request: String,
    pub memory_request: String,
    pub cpu_limit: String,
    pub memory_limit: String,
    /// Size limit of the writable `/tmp` (the root file system is read-only).
    pub tmp_size_limit: String,
}

/// A Job asked for a job type the template has no image for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no image for job type {0:?}")]
pub struct NoImage(pub String);

/// The Job that runs the worker of `spec`.
pub fn worker_job(t: &JobTemplate, spec: &WorkerSpec) -> Result<Job, NoImage> {
    let (job_type, name) = (spec.job_type.as_str(), spec.name.as_str());
    let image = t
        .images
        .get(job_type)
        .ok_or_else(|| NoImage(job_type.into()))?;
    let (mut volumes, mut volume_mounts): (Vec<Volume>, Vec<VolumeMount>) =
        spec.env.iter().filter_map(config_map_file).unzip();
    // `exec` commands write temporary files; the root file system is read-only.
    volumes.push(Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(Quantity(t.tmp_size_limit.clone())),
            ..EmptyDirVolumeSource::default()
        }),
        ..Volume::default()
    });
    volume_mounts.push(VolumeMount {
        name: "tmp".into(),
        mount_path: "/tmp".into(),
        ..VolumeMount::default()
    });
    let labels = BTreeMap::from([
        (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
        (NAME_LABEL.0.to_string(), NAME_LABEL.1.to_string()),
        (PART_OF.0.to_string(), PART_OF.1.to_string()),
        (JOB_TYPE_LABEL.to_string(), job_type.to_string()),
        (WORKER_LABEL.to_string(), name.to_string()),
    ]);
    let container = Container {
        name: "worker".into(),
        image: Some(image.clone()),
        image_pull_policy: Some(t.image_pull_policy.clone()),
        env: Some(spec.env.iter().map(env_var).collect()),
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
        volume_mounts: Some(volume_mounts),
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
                        run_as_user: Some(WORKER_UID),
                        run_as_group: Some(WORKER_UID),
                        // The emptyDir is writable by the worker's group.
                        fs_group: Some(WORKER_UID),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container],
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        ..Job::default()
    })
}

/// A variable of the spec as a container's: a Secret's key by reference, a ConfigMap
/// file by the path it is mounted at.
fn env_var(var: &Var) -> EnvVar {
    let (value, value_from) = match &var.source {
        Source::Value(value)
        | Source::PerLauncher {
            kubernetes: value, ..
        } => (Some(value.clone()), None),
        Source::SecretKey { name, key, .. } => (
            None,
            Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: name.clone(),
                    key: key.clone(),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
        ),
        Source::ConfigMapFile { path, .. } => (Some(path.clone()), None),
    };
    EnvVar {
        name: var.name.into(),
        value,
        value_from,
    }
}

/// The volume and mount of a ConfigMap file: its key as the one file of a read-only
/// directory, named after the variable (`JOBS_CONFIG` -> `jobs-config`).
fn config_map_file(var: &Var) -> Option<(Volume, VolumeMount)> {
    let Source::ConfigMapFile {
        name, key, path, ..
    } = &var.source
    else {
        return None;
    };
    // An absolute path: a relative one has no directory and the API server refuses
    // the Job (at the dry run at start).
    let (dir, file) = path.rsplit_once('/').unwrap_or(("", path));
    let volume = var.name.to_ascii_lowercase().replace('_', "-");
    Some((
        Volume {
            name: volume.clone(),
            config_map: Some(ConfigMapVolumeSource {
                name: name.clone(),
                items: Some(vec![KeyToPath {
                    key: key.clone(),
                    path: file.into(),
                    ..KeyToPath::default()
                }]),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        VolumeMount {
            name: volume,
            mount_path: dir.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
    ))
}

fn quantities(cpu: &str, memory: &str) -> BTreeMap<String, Quantity> {
    BTreeMap::from([
        ("cpu".to_string(), Quantity(cpu.to_string())),
        ("memory".to_string(), Quantity(memory.to_string())),
    ])
}

/// The template and worker environment the launcher's tests build Jobs from.
#[cfg(test)]
pub(crate) mod tests {
    use serde_json::json;

    use super::*;
    use crate::launcher::spec::WorkerEnv;

    pub(crate) fn template() -> JobTemplate {
        JobTemplate {
            images: BTreeMap::from([("default".into(), "spillway-worker:1.0".into())]),
            image_pull_policy: "IfNotPresent".into(),
            ttl_seconds_after_finished: 300,
            termination_grace_seconds: 600,
            cpu_request: "100m".into(),
            memory_request: "64Mi".into(),
            cpu_limit: "1".into(),
            memory_limit: "256Mi".into(),
            tmp_size_limit: "64Mi".into(),
        }
    }

    fn job(job_type: &str, name: &str) -> Result<Job, NoImage> {
        worker_job(&template(), &WorkerEnv::example().spec(job_type, name))
    }

    #[test]
    fn a_worker_job_is_labelled_locked_down_and_built_from_the_template() {
        let job = job("default", "spillway-default-1").unwrap();
        let body = serde_json::to_value(job).unwrap();
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
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        let container = &pod["containers"][0];
        assert_eq!(container["image"], "spillway-worker:1.0");
        assert_eq!(
            container["imagePullPolicy"], "IfNotPresent",
            "explicit: an image built in the cluster is never pulled by default"
        );
        let security = &container["securityContext"];
        assert_eq!(security["readOnlyRootFilesystem"], true);
        assert_eq!(security["allowPrivilegeEscalation"], false);
        assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(
            container["resources"],
            json!({"requests": {"cpu": "100m", "memory": "64Mi"},
                   "limits": {"cpu": "1", "memory": "256Mi"}})
        );
        assert_eq!(
            container["env"],
            json!([
                {"name": "WORKER_NAME", "value": "spillway-default-1"},
                {"name": "JOB_TYPE", "value": "default"},
                {"name": "JOBS_CONFIG", "value": "/etc/spillway/jobs.toml"},
                {"name": "LOG_FORMAT", "value": "json"},
                {"name": "AMQP_URL", "valueFrom": {"secretKeyRef":
                    {"name": "spillway-rabbitmq", "key": "amqp-url", "optional": false}}},
            ]),
            "the spec's variables, each in its Kubernetes form"
        );
        assert!(
            !body.to_string().contains("guest:guest"),
            "credentials come from the Secret, never inline"
        );
    }

    #[test]
    fn a_worker_has_a_size_limited_writable_tmp_and_the_job_types_read_only() {
        let job = job("default", "w").unwrap();
        let body = serde_json::to_value(job).unwrap();
        let pod = &body["spec"]["template"]["spec"];
        assert_eq!(
            pod["volumes"],
            json!([
                {"name": "jobs-config", "configMap": {"name": "spillway-jobs",
                    "items": [{"key": "jobs.toml", "path": "jobs.toml"}]}},
                {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
            ])
        );
        assert_eq!(
            pod["containers"][0]["volumeMounts"],
            json!([
                {"name": "jobs-config", "mountPath": "/etc/spillway", "readOnly": true},
                {"name": "tmp", "mountPath": "/tmp"},
            ])
        );
    }

    #[test]
    fn an_unknown_job_type_has_no_job() {
        assert_eq!(job("resize", "w"), Err(NoImage("resize".into())));
    }
}
