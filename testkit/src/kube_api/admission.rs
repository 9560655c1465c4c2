//! What the double refuses, as a real API server would: Jobs that do not decode or do
//! not validate, and pods that violate Pod Security `restricted`.
//!
//! A double that accepts anything proves nothing about the objects a client builds, so
//! a Job create goes through the same stages as on a real server, with the same answers:
//! a body that is not a `batch/v1` Job, does not decode into k8s-openapi's `Job` (the
//! OpenAPI schema's types), or holds a quantity outside the Kubernetes grammar is `400
//! BadRequest`; unknown fields are found by re-serialising the decoded Job and comparing
//! (refused under `fieldValidation=Strict`, otherwise dropped with a `Warning`, the
//! server's default); then the Job is validated (`422 Invalid`, with one cause per
//! field) and defaulted. Pod Security is enforced where a real cluster enforces it: on
//! the pods the Job controller creates, not on the Job, so a violating Job is accepted
//! and never gets a pod, with a `FailedCreate` event saying why.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        batch::v1::Job,
        core::v1::{Container, PodSpec, ResourceRequirements},
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time},
    jiff::Timestamp,
};
use serde_json::Value;

use super::server::ApiError;

/// The `fieldValidation` directive of a create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FieldValidation {
    Ignore,
    Warn,
    Strict,
}

impl FieldValidation {
    pub fn parse(value: Option<&str>) -> Result<Self, ApiError> {
        match value {
            None | Some("") | Some("Warn") => Ok(FieldValidation::Warn),
            Some("Ignore") => Ok(FieldValidation::Ignore),
            Some("Strict") => Ok(FieldValidation::Strict),
            Some(other) => Err(ApiError::bad_request(format!(
                "fieldValidation parameter unsupported: {other}"
            ))),
        }
    }
}

/// One invalid field, as a `StatusCause`.
#[derive(Debug, Clone)]
pub(crate) struct Cause {
    pub field: String,
    pub reason: &'static str,
    pub message: String,
}

impl Cause {
    fn required(field: impl Into<String>) -> Self {
        Cause {
            field: field.into(),
            reason: "FieldValueRequired",
            message: "Required value".into(),
        }
    }

    fn invalid(field: impl Into<String>, value: impl std::fmt::Display, why: &str) -> Self {
        Cause {
            field: field.into(),
            reason: "FieldValueInvalid",
            message: format!("Invalid value: {}: {why}", quoted(value)),
        }
    }
}

fn quoted(value: impl std::fmt::Display) -> String {
    let text = value.to_string();
    if text.parse::<i64>().is_ok() {
        text
    } else {
        format!("{text:?}")
    }
}

/// A Job decoded from a create body, and the warnings for what was dropped from it.
pub(crate) fn decode_job(
    body: &[u8],
    validation: FieldValidation,
) -> Result<(Job, Vec<String>), ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
    })?;
    let (api_version, kind) = (value["apiVersion"].as_str(), value["kind"].as_str());
    if (api_version, kind) != (Some("batch/v1"), Some("Job")) {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({}) does not match the expected API version (batch/v1), or the kind ({}) is not Job",
            api_version.unwrap_or(""),
            kind.unwrap_or("")
        )));
    }
    let job: Job = serde_json::from_value(value.clone()).map_err(|e| {
        ApiError::bad_request(format!(
            "Job in version \"v1\" cannot be handled as a Job: {e}"
        ))
    })?;
    if let Some(spec) = job.spec.as_ref().and_then(|s| s.template.spec.as_ref()) {
        for container in all_containers(spec) {
            for quantity in quantities(container.resources.as_ref()) {
                if parse_quantity(quantity).is_none() {
                    return Err(ApiError::bad_request(format!(
                        "Job in version \"v1\" cannot be handled as a Job: quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$' (got {quantity:?})"
                    )));
                }
            }
        }
    }
    let mut unknown = Vec::new();
    let decoded = serde_json::to_value(&job).expect("a Job serialises");
    unknown_fields(&value, &decoded, "", &mut unknown);
    let unknown: Vec<String> = unknown
        .into_iter()
        .map(|path| format!("unknown field {path:?}"))
        .collect();
    match validation {
        FieldValidation::Strict if !unknown.is_empty() => Err(ApiError::bad_request(format!(
            "strict decoding error: {}",
            unknown.join(", ")
        ))),
        FieldValidation::Warn => Ok((job, unknown)),
        _ => Ok((job, Vec::new())),
    }
}

/// Paths present (and not null) in `input` that decoding dropped from `decoded`.
fn unknown_fields(input: &Value, decoded: &Value, path: &str, found: &mut Vec<String>) {
    match (input, decoded) {
        (Value::Object(fields), Value::Object(kept)) => {
            for (key, value) in fields {
                let here = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match kept.get(key) {
                    _ if value.is_null() => {}
                    None => found.push(here),
                    Some(kept) => unknown_fields(value, kept, &here, found),
                }
            }
        }
        (Value::Array(items), Value::Array(kept)) => {
            for (i, (item, kept)) in items.iter().zip(kept).enumerate() {
                unknown_fields(item, kept, &format!("{path}[{i}]"), found);
            }
        }
        _ => {}
    }
}

fn all_containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
}

fn quantities(resources: Option<&ResourceRequirements>) -> impl Iterator<Item = &str> {
    resources
        .into_iter()
        .flat_map(|r| r.requests.iter().chain(r.limits.iter()))
        .flat_map(|m| m.values().map(|q| q.0.as_str()))
}

/// The value of a Kubernetes quantity (`100m`, `64Mi`, `1e3`), or `None` outside the
/// grammar: a signed decimal number, then one of the binary-SI (`Ki`..`Ei`), decimal-SI
/// (`n`, `u`, `m`, ``, `k`, `M`..`E`) suffixes or a decimal exponent (`e3`, `E-2`).
pub(crate) fn parse_quantity(text: &str) -> Option<f64> {
    let split = text
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_digit() || c == '.' || (i == 0 && (c == '+' || c == '-'))))
        .map_or(text.len(), |(i, _)| i);
    let (number, suffix) = text.split_at(split);
    let digits = number.trim_start_matches(['+', '-']);
    if digits.is_empty() || digits == "." || digits.matches('.').count() > 1 {
        return None;
    }
    let value: f64 = digits.parse().ok()?;
    let value = if number.starts_with('-') {
        -value
    } else {
        value
    };
    let scale = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exponent => {
            let digits = exponent.strip_prefix(['e', 'E'])?;
            let unsigned = digits.trim_start_matches(['+', '-']);
            if unsigned.is_empty()
                || !unsigned.chars().all(|c| c.is_ascii_digit())
                || digits.len() - unsigned.len() > 1
            {
                return None;
            }
            10f64.powi(digits.parse().ok()?)
        }
    };
    Some(value * scale)
}

fn is_dns1123_label(name: &str) -> bool {
    name.len() <= 63
        && !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fn is_dns1123_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_dns1123_label)
}

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`, at most 63 characters (empty allowed
/// for values).
fn is_label_value(value: &str) -> bool {
    value.is_empty()
        || (value.len() <= 63
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && value.starts_with(|c: char| c.is_ascii_alphanumeric())
            && value.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

fn is_label_key(key: &str) -> bool {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    prefix.is_none_or(is_dns1123_subdomain) && !name.is_empty() && is_label_value(name)
}

fn is_env_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        && !name.starts_with(|c: char| c.is_ascii_digit())
}

const DNS1123_SUBDOMAIN: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const DNS1123_LABEL: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";

fn labels(labels: Option<&BTreeMap<String, String>>, field: &str, causes: &mut Vec<Cause>) {
    for (key, value) in labels.into_iter().flatten() {
        if !is_label_key(key) {
            causes.push(Cause::invalid(
                field,
                key,
                "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
            ));
        }
        if !is_label_value(value) {
            causes.push(Cause::invalid(
                field,
                value,
                "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character, at most 63 characters",
            ));
        }
    }
}

/// Everything wrong with a Job, as the API server's validation reports it.
pub(crate) fn validate_job(job: &Job) -> Vec<Cause> {
    let mut causes = Vec::new();
    let name = job.metadata.name.as_deref().unwrap_or_default();
    if name.is_empty() {
        causes.push(Cause {
            field: "metadata.name".into(),
            reason: "FieldValueRequired",
            message: "Required value: name or generateName is required".into(),
        });
    } else if !is_dns1123_subdomain(name) {
        causes.push(Cause::invalid("metadata.name", name, DNS1123_SUBDOMAIN));
    } else if name.len() > 63 {
        // The Job controller labels its pods `job-name=<name>`, and a label value has at most 63.
        causes.push(Cause::invalid(
            "spec.template.labels",
            name,
            "must be no more than 63 characters",
        ));
    }
    labels(job.metadata.labels.as_ref(), "metadata.labels", &mut causes);
    let Some(spec) = &job.spec else {
        causes.push(Cause::required("spec.template"));
        return causes;
    };
    let non_negative = |value: Option<i32>, field: &str, causes: &mut Vec<Cause>| {
        if let Some(v) = value.filter(|v| *v < 0) {
            causes.push(Cause::invalid(
                field,
                v,
                "must be greater than or equal to 0",
            ));
        }
    };
    non_negative(spec.backoff_limit, "spec.backoffLimit", &mut causes);
    non_negative(spec.parallelism, "spec.parallelism", &mut causes);
    non_negative(spec.completions, "spec.completions", &mut causes);
    non_negative(
        spec.ttl_seconds_after_finished,
        "spec.ttlSecondsAfterFinished",
        &mut causes,
    );
    if let Some(v) = spec.active_deadline_seconds.filter(|v| *v <= 0) {
        causes.push(Cause::invalid(
            "spec.activeDeadlineSeconds",
            v,
            "must be greater than 0",
        ));
    }
    if spec.selector.is_some() && spec.manual_selector != Some(true) {
        causes.push(Cause::invalid(
            "spec.selector",
            "selector",
            "`selector` will be auto-generated",
        ));
    }
    if let Some(meta) = &spec.template.metadata {
        labels(
            meta.labels.as_ref(),
            "spec.template.metadata.labels",
            &mut causes,
        );
    }
    let Some(pod) = &spec.template.spec else {
        causes.push(Cause::required("spec.template.spec.containers"));
        return causes;
    };
    validate_pod_spec(pod, "spec.template.spec", &mut causes);
    match pod.restart_policy.as_deref() {
        Some("Never" | "OnFailure") => {}
        None => causes.push(Cause {
            field: "spec.template.spec.restartPolicy".into(),
            reason: "FieldValueRequired",
            message: "Required value: valid values: \"OnFailure\", \"Never\"".into(),
        }),
        Some(other) => causes.push(Cause {
            field: "spec.template.spec.restartPolicy".into(),
            reason: "FieldValueNotSupported",
            message: format!(
                "Unsupported value: {other:?}: supported values: \"OnFailure\", \"Never\""
            ),
        }),
    }
    causes
}

fn validate_pod_spec(pod: &PodSpec, at: &str, causes: &mut Vec<Cause>) {
    if pod.containers.is_empty() {
        causes.push(Cause::required(format!("{at}.containers")));
    }
    if let Some(v) = pod.termination_grace_period_seconds.filter(|v| *v < 0) {
        causes.push(Cause::invalid(
            format!("{at}.terminationGracePeriodSeconds"),
            v,
            "must be greater than or equal to 0",
        ));
    }
    let mut volumes = Vec::new();
    for (i, volume) in pod.volumes.iter().flatten().enumerate() {
        let field = format!("{at}.volumes[{i}].name");
        if !is_dns1123_label(&volume.name) {
            causes.push(Cause::invalid(&field, &volume.name, DNS1123_LABEL));
        } else if volumes.contains(&volume.name.as_str()) {
            causes.push(Cause {
                field,
                reason: "FieldValueDuplicate",
                message: format!("Duplicate value: {:?}", volume.name),
            });
        }
        volumes.push(volume.name.as_str());
        if volume_type(volume).is_none() {
            causes.push(Cause::required(format!(
                "{at}.volumes[{i}]: must specify a volume type"
            )));
        }
    }
    let mut names = Vec::new();
    for (i, container) in pod.containers.iter().enumerate() {
        let at = format!("{at}.containers[{i}]");
        if container.name.is_empty() {
            causes.push(Cause::required(format!("{at}.name")));
        } else if !is_dns1123_label(&container.name) {
            causes.push(Cause::invalid(
                format!("{at}.name"),
                &container.name,
                DNS1123_LABEL,
            ));
        } else if names.contains(&container.name.as_str()) {
            causes.push(Cause {
                field: format!("{at}.name"),
                reason: "FieldValueDuplicate",
                message: format!("Duplicate value: {:?}", container.name),
            });
        }
        names.push(container.name.as_str());
        validate_container(container, &at, &volumes, causes);
    }
}

fn validate_container(container: &Container, at: &str, volumes: &[&str], causes: &mut Vec<Cause>) {
    if container
        .image
        .as_deref()
        .is_none_or(|i| i.trim().is_empty())
    {
        causes.push(Cause::required(format!("{at}.image")));
    }
    match container.image_pull_policy.as_deref() {
        None | Some("Always" | "IfNotPresent" | "Never") => {}
        Some(other) => causes.push(Cause {
            field: format!("{at}.imagePullPolicy"),
            reason: "FieldValueNotSupported",
            message: format!(
                "Unsupported value: {other:?}: supported values: \"Always\", \"IfNotPresent\", \"Never\""
            ),
        }),
    }
    for (i, env) in container.env.iter().flatten().enumerate() {
        let field = format!("{at}.env[{i}]");
        if !is_env_name(&env.name) {
            causes.push(Cause::invalid(
                format!("{field}.name"),
                &env.name,
                "a valid environment variable name must consist of alphabetic characters, digits, '_', '-', or '.', and must not start with a digit",
            ));
        }
        if let Some(from) = &env.value_from {
            if env.value.as_deref().is_some_and(|v| !v.is_empty()) {
                causes.push(Cause::invalid(
                    format!("{field}.valueFrom"),
                    "",
                    "may not be specified when `value` is not empty",
                ));
            }
            let sources = [
                from.secret_key_ref.is_some(),
                from.config_map_key_ref.is_some(),
                from.field_ref.is_some(),
                from.resource_field_ref.is_some(),
            ];
            if sources.iter().filter(|s| **s).count() != 1 {
                causes.push(Cause::invalid(
                    format!("{field}.valueFrom"),
                    "",
                    "must specify exactly one of: `fieldRef`, `resourceFieldRef`, `configMapKeyRef` or `secretKeyRef`",
                ));
            }
            let key_ref = [
                from.secret_key_ref
                    .as_ref()
                    .map(|r| ("secretKeyRef", &r.name, &r.key)),
                from.config_map_key_ref
                    .as_ref()
                    .map(|r| ("configMapKeyRef", &r.name, &r.key)),
            ];
            for (source, name, key) in key_ref.into_iter().flatten() {
                if name.is_empty() {
                    causes.push(Cause::required(format!("{field}.valueFrom.{source}.name")));
                }
                if key.is_empty() {
                    causes.push(Cause::required(format!("{field}.valueFrom.{source}.key")));
                }
            }
        }
    }
    let mut paths = Vec::new();
    for (i, mount) in container.volume_mounts.iter().flatten().enumerate() {
        let field = format!("{at}.volumeMounts[{i}]");
        if !volumes.contains(&mount.name.as_str()) {
            causes.push(Cause {
                field: format!("{field}.name"),
                reason: "FieldValueNotFound",
                message: format!("Not found: {:?}", mount.name),
            });
        }
        if mount.mount_path.is_empty() {
            causes.push(Cause::required(format!("{field}.mountPath")));
        } else if paths.contains(&mount.mount_path.as_str()) {
            causes.push(Cause::invalid(
                format!("{field}.mountPath"),
                &mount.mount_path,
                "must be unique",
            ));
        }
        paths.push(mount.mount_path.as_str());
    }
    if let Some(resources) = &container.resources {
        for (kind, kept) in [
            ("requests", &resources.requests),
            ("limits", &resources.limits),
        ] {
            for (resource, quantity) in kept.iter().flatten() {
                if parse_quantity(&quantity.0).is_some_and(|v| v < 0.0) {
                    causes.push(Cause::invalid(
                        format!("{at}.resources.{kind}[{resource}]"),
                        &quantity.0,
                        "must be greater than or equal to 0",
                    ));
                }
            }
        }
        for (resource, request) in resources.requests.iter().flatten() {
            let limit = resources.limits.as_ref().and_then(|l| l.get(resource));
            if let (Some(request_value), Some(limit)) = (parse_quantity(&request.0), limit)
                && parse_quantity(&limit.0).is_some_and(|l| request_value > l)
            {
                causes.push(Cause::invalid(
                    format!("{at}.resources.requests"),
                    &request.0,
                    &format!(
                        "must be less than or equal to {resource} limit of {}",
                        limit.0
                    ),
                ));
            }
        }
    }
}

/// The volume's type: the one source field it sets.
fn volume_type(volume: &k8s_openapi::api::core::v1::Volume) -> Option<String> {
    let value = serde_json::to_value(volume).ok()?;
    value
        .as_object()?
        .keys()
        .find(|k| k.as_str() != "name")
        .cloned()
}

/// The `422 Invalid` answer for `causes` on Job `name`.
pub(crate) fn invalid(name: &str, causes: &[Cause]) -> ApiError {
    let listed: Vec<String> = causes
        .iter()
        .map(|c| format!("{}: {}", c.field, c.message))
        .collect();
    let message = if listed.len() == 1 {
        format!("Job.batch {name:?} is invalid: {}", listed[0])
    } else {
        format!("Job.batch {name:?} is invalid: [{}]", listed.join(", "))
    };
    ApiError::invalid(
        message,
        serde_json::json!({
            "name": name, "group": "batch", "kind": "Job",
            "causes": causes.iter().map(|c| serde_json::json!({
                "reason": c.reason, "message": c.message, "field": c.field,
            })).collect::<Vec<_>>(),
        }),
    )
}

/// Fills in what the API server defaults on a created Job, so a client reads back what
/// it would from a cluster: identity, the generated selector and the labels the Job
/// controller relies on, and the pod-spec defaults (notably `imagePullPolicy`: `Always`
/// for `:latest` or untagged images).
pub(crate) fn default_job(job: &mut Job, namespace: &str, uid: &str) {
    let name = job.metadata.name.clone().unwrap_or_default();
    job.metadata.namespace = Some(namespace.into());
    job.metadata.uid = Some(uid.into());
    job.metadata.creation_timestamp = Some(Time(Timestamp::now()));
    job.metadata.generation = Some(1);
    let spec = job.spec.get_or_insert_with(Default::default);
    let template_meta = spec
        .template
        .metadata
        .get_or_insert_with(ObjectMeta::default);
    if job.metadata.labels.as_ref().is_none_or(BTreeMap::is_empty) {
        job.metadata.labels = template_meta.labels.clone();
    }
    let template_labels = template_meta.labels.get_or_insert_with(BTreeMap::new);
    for key in ["batch.kubernetes.io/controller-uid", "controller-uid"] {
        template_labels.insert(key.into(), uid.into());
    }
    for key in ["batch.kubernetes.io/job-name", "job-name"] {
        template_labels.insert(key.into(), name.clone());
    }
    spec.selector = Some(LabelSelector {
        match_labels: Some(BTreeMap::from([(
            "batch.kubernetes.io/controller-uid".to_string(),
            uid.to_string(),
        )])),
        ..LabelSelector::default()
    });
    spec.parallelism.get_or_insert(1);
    spec.completions.get_or_insert(1);
    spec.backoff_limit.get_or_insert(6);
    spec.suspend.get_or_insert(false);
    spec.completion_mode
        .get_or_insert_with(|| "NonIndexed".into());
    spec.pod_replacement_policy
        .get_or_insert_with(|| "TerminatingOrFailed".into());
    if let Some(pod) = &mut spec.template.spec {
        pod.termination_grace_period_seconds.get_or_insert(30);
        pod.dns_policy.get_or_insert_with(|| "ClusterFirst".into());
        pod.scheduler_name
            .get_or_insert_with(|| "default-scheduler".into());
        pod.security_context.get_or_insert_with(Default::default);
        pod.enable_service_links.get_or_insert(true);
        for container in pod.containers.iter_mut() {
            let image = container.image.clone().unwrap_or_default();
            container
                .image_pull_policy
                .get_or_insert_with(|| default_pull_policy(&image).into());
            container
                .termination_message_path
                .get_or_insert_with(|| "/dev/termination-log".into());
            container
                .termination_message_policy
                .get_or_insert_with(|| "File".into());
        }
    }
}

/// `Always` for an untagged or `:latest` image (without a digest), else `IfNotPresent`.
fn default_pull_policy(image: &str) -> &'static str {
    if image.contains('@') {
        return "IfNotPresent";
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.split_once(':') {
        Some((_, "latest")) | None => "Always",
        Some(_) => "IfNotPresent",
    }
}

/// Why a pod with `spec` violates Pod Security `restricted`, in the words of the
/// admission plugin's message; empty if it does not.
pub(crate) fn pod_security_restricted(spec: &PodSpec) -> Vec<String> {
    let mut violations = Vec::new();
    let containers: Vec<&Container> = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .collect();
    let named = |f: &dyn Fn(&Container) -> bool| -> Vec<String> {
        containers
            .iter()
            .filter(|c| f(c))
            .map(|c| format!("{:?}", c.name))
            .collect()
    };
    let which = |names: &[String]| {
        if names.len() == 1 {
            format!("container {}", names[0])
        } else {
            format!("containers {}", names.join(", "))
        }
    };

    let hosts: Vec<&str> = [
        (spec.host_network, "hostNetwork=true"),
        (spec.host_pid, "hostPID=true"),
        (spec.host_ipc, "hostIPC=true"),
    ]
    .into_iter()
    .filter(|(set, _)| *set == Some(true))
    .map(|(_, text)| text)
    .collect();
    if !hosts.is_empty() {
        violations.push(format!("host namespaces ({})", hosts.join(", ")));
    }
    let privileged = named(&|c| {
        c.security_context
            .as_ref()
            .and_then(|s| s.privileged)
            .unwrap_or(false)
    });
    if !privileged.is_empty() {
        violations.push(format!(
            "privileged ({} must not set securityContext.privileged=true)",
            which(&privileged)
        ));
    }
    let host_ports = named(&|c| {
        c.ports
            .iter()
            .flatten()
            .any(|p| p.host_port.unwrap_or(0) != 0)
    });
    if !host_ports.is_empty() {
        violations.push(format!("hostPort ({} uses hostPorts)", which(&host_ports)));
    }
    let allowed = [
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    ];
    let mut host_path = Vec::new();
    let mut restricted = Vec::new();
    for volume in spec.volumes.iter().flatten() {
        let kind = volume_type(volume).unwrap_or_default();
        if kind == "hostPath" {
            host_path.push(format!("{:?}", volume.name));
        }
        if !allowed.contains(&kind.as_str()) {
            restricted.push(format!(
                "volume {:?} uses restricted volume type {kind:?}",
                volume.name
            ));
        }
    }
    if !host_path.is_empty() {
        violations.push(format!(
            "hostPath volumes (volume {})",
            host_path.join(", ")
        ));
    }
    let escalating = named(&|c| {
        c.security_context
            .as_ref()
            .and_then(|s| s.allow_privilege_escalation)
            != Some(false)
    });
    if !escalating.is_empty() {
        violations.push(format!(
            "allowPrivilegeEscalation != false ({} must set securityContext.allowPrivilegeEscalation=false)",
            which(&escalating)
        ));
    }
    fn capabilities(c: &Container) -> Option<&k8s_openapi::api::core::v1::Capabilities> {
        c.security_context.as_ref()?.capabilities.as_ref()
    }
    let not_dropping = named(&|c| {
        !capabilities(c)
            .and_then(|caps| caps.drop.as_ref())
            .is_some_and(|d| d.iter().any(|cap| cap == "ALL"))
    });
    let adding: Vec<String> = containers
        .iter()
        .flat_map(|c| {
            capabilities(c)
                .and_then(|caps| caps.add.clone())
                .unwrap_or_default()
                .into_iter()
                .filter(|cap| cap != "NET_BIND_SERVICE")
                .map(move |cap| format!("container {:?} must not include {cap:?} in securityContext.capabilities.add", c.name))
        })
        .collect();
    if !not_dropping.is_empty() || !adding.is_empty() {
        let mut why = Vec::new();
        if !not_dropping.is_empty() {
            why.push(format!(
                "{} must set securityContext.capabilities.drop=[\"ALL\"]",
                which(&not_dropping)
            ));
        }
        why.extend(adding);
        violations.push(format!("unrestricted capabilities ({})", why.join("; ")));
    }
    if !restricted.is_empty() {
        violations.push(format!(
            "restricted volume types ({})",
            restricted.join(", ")
        ));
    }
    let pod_context = spec.security_context.as_ref();
    let pod_non_root = pod_context.and_then(|s| s.run_as_non_root);
    let root_allowed = named(&|c| {
        let own = c.security_context.as_ref().and_then(|s| s.run_as_non_root);
        own == Some(false) || (own.is_none() && pod_non_root != Some(true))
    });
    if pod_non_root == Some(false) || !root_allowed.is_empty() {
        let whom = if root_allowed.is_empty() || root_allowed.len() == containers.len() {
            "pod or containers".to_string()
        } else {
            format!("pod or {}", which(&root_allowed))
        };
        violations.push(format!(
            "runAsNonRoot != true ({whom} must set securityContext.runAsNonRoot=true)"
        ));
    }
    let root_users = named(&|c| c.security_context.as_ref().and_then(|s| s.run_as_user) == Some(0));
    if pod_context.and_then(|s| s.run_as_user) == Some(0) || !root_users.is_empty() {
        violations.push(format!(
            "runAsUser=0 (pod and {} must not set runAsUser=0)",
            if root_users.is_empty() {
                "containers".to_string()
            } else {
                which(&root_users)
            }
        ));
    }
    let good_profile = |t: Option<&str>| matches!(t, Some("RuntimeDefault" | "Localhost"));
    let pod_profile = pod_context
        .and_then(|s| s.seccomp_profile.as_ref())
        .map(|p| p.type_.as_str());
    let unconfined = named(&|c| {
        let own = c
            .security_context
            .as_ref()
            .and_then(|s| s.seccomp_profile.as_ref())
            .map(|p| p.type_.as_str());
        match own {
            Some(_) => !good_profile(own),
            None => !good_profile(pod_profile),
        }
    });
    if (pod_profile.is_some() && !good_profile(pod_profile)) || !unconfined.is_empty() {
        violations.push(format!(
            "seccompProfile (pod or {} must set securityContext.seccompProfile.type to \"RuntimeDefault\" or \"Localhost\")",
            if unconfined.is_empty() { "containers".into() } else { which(&unconfined) }
        ));
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_follow_the_kubernetes_grammar() {
        let cases = [
            ("100m", Some(0.1)),
            ("1", Some(1.0)),
            ("64Mi", Some(64.0 * 1024.0 * 1024.0)),
            ("1.5Gi", Some(1.5 * 1024f64.powi(3))),
            ("1e3", Some(1000.0)),
            ("2E-1", Some(0.2)),
            (".5", Some(0.5)),
            ("+1k", Some(1000.0)),
            ("-1", Some(-1.0)),
            ("", None),
            ("abc", None),
            ("1.2.3", None),
            ("1mi", None),
            ("10 Mi", None),
            ("1e", None),
            ("1e+-2", None),
        ];
        for (text, expected) in cases {
            let got = parse_quantity(text);
            match (got, expected) {
                (Some(g), Some(e)) => {
                    assert!((g - e).abs() < 1e-9 * e.abs().max(1.0), "{text}: {g}")
                }
                (g, e) => assert_eq!(g, e, "{text}"),
            }
        }
    }

    #[test]
    fn names_and_labels() {
        assert!(is_dns1123_subdomain("spillway-default-1"));
        assert!(is_dns1123_subdomain("a.b"));
        assert!(!is_dns1123_subdomain("Upper"));
        assert!(!is_dns1123_subdomain("-a"));
        assert!(!is_dns1123_label("a.b"));
        assert!(is_label_key("app.kubernetes.io/name"));
        assert!(!is_label_key("bad key"));
        assert!(is_label_value(""));
        assert!(!is_label_value("-x"));
        assert_eq!(default_pull_policy("spillway-worker:latest"), "Always");
        assert_eq!(default_pull_policy("spillway-worker"), "Always");
        assert_eq!(default_pull_policy("localhost:5000/worker"), "Always");
        assert_eq!(default_pull_policy("spillway-worker:dev"), "IfNotPresent");
    }
}
