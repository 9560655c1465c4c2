//! The job-types file: which job types exist, which queue each feeds, how its rows are
//! handled and how far its workers may scale.
//!
//! Producer, worker and scaler all read the same file (`JOBS_CONFIG`), so the queue
//! a row is published to is the queue a worker consumes and the scaler watches. With no
//! file, the built-in configuration has one job type, `default`, on queue `tasks`. The
//! file is validated at start: an unknown key or a bad value is an error naming it.

use std::{collections::BTreeMap, ops::RangeInclusive, path::Path, time::Duration};

use crate::topology::dead_queue_name;

use serde::Deserialize;

/// The whole file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    /// Seconds between two scaler ticks.
    #[serde(default = "defaults::tick_seconds")]
    pub tick_seconds: u64,
    /// Seconds queue and unacked must stay at zero before workers are drained.
    #[serde(default = "defaults::idle_seconds")]
    pub idle_seconds: u64,
    /// The job type `POST /upload` submits to.
    #[serde(default = "defaults::default_job_type")]
    pub default_job_type: String,
    /// Most workers of all job types at once, pending ones included; when it binds,
    /// job types of higher `priority` spawn first. Unset: each job type's `max_jobs`
    /// is its only cap.
    #[serde(default)]
    pub max_workers_total: Option<u32>,
    /// Job types by name.
    pub job_types: BTreeMap<String, JobType>,
}

/// How a worker handles a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HandlerKind {
    /// Sleep `simulate_ms` per row, failing a `fail_rate` share of them.
    Simulate,
    /// Run `command` with the row's JSON on stdin.
    Exec,
}

/// One job type.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobType {
    /// The work queue its rows are published to.
    pub queue: String,
    #[serde(default = "defaults::handler")]
    pub handler: HandlerKind,
    /// `simulate`: milliseconds per row.
    #[serde(default = "defaults::simulate_ms")]
    pub simulate_ms: u64,
    /// `simulate`: share of rows that fail, from 0.0 to 1.0.
    #[serde(default)]
    pub fail_rate: f64,
    /// `exec`: the command and its arguments.
    #[serde(default)]
    pub command: Vec<String>,
    /// Deliveries of one row before it is dead-lettered.
    #[serde(default = "defaults::delivery_limit")]
    pub delivery_limit: u32,
    /// Ready rows above which one more worker is spawned.
    #[serde(default = "defaults::threshold")]
    pub threshold: u64,
    /// Ready rows above which a burst of workers is spawned.
    #[serde(default = "defaults::burst_threshold")]
    pub burst_threshold: u64,
    /// Workers spawned at once above `burst_threshold`.
    #[serde(default = "defaults::burst_size")]
    pub burst_size: u32,
    /// Most workers of this type at once, pending ones included.
    #[serde(default = "defaults::max_jobs")]
    pub max_jobs: u32,
    /// Under `max_workers_total`, job types of higher priority spawn first; equal
    /// priorities take turns.
    #[serde(default)]
    pub priority: u32,
    /// Container image of its workers on Kubernetes; without it, the scaler's
    /// `WORKER_IMAGE` (the worker image the deployment built).
    #[serde(default)]
    pub image: Option<String>,
}

mod defaults {
    use super::HandlerKind;

    pub fn tick_seconds() -> u64 {
        5
    }
    pub fn idle_seconds() -> u64 {
        30
    }
    pub fn default_job_type() -> String {
        "default".into()
    }
    pub fn handler() -> HandlerKind {
        HandlerKind::Simulate
    }
    pub fn simulate_ms() -> u64 {
        2000
    }
    pub fn delivery_limit() -> u32 {
        5
    }
    pub fn threshold() -> u64 {
        20
    }
    pub fn burst_threshold() -> u64 {
        40
    }
    pub fn burst_size() -> u32 {
        5
    }
    pub fn max_jobs() -> u32 {
        10
    }
}

/// Why a job-types file was refused.
#[derive(Debug, thiserror::Error)]
pub enum JobsConfigError {
    #[error("cannot read job-types file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("job-types file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("job-types file {path}: {message}")]
    Invalid { path: String, message: String },
}

/// What a lookup of an unknown job type returns: the names that do exist.
#[derive(Debug, thiserror::Error)]
#[error("unknown job type {requested:?}; known job types: {}", known.join(", "))]
pub struct UnknownJobType {
    pub requested: String,
    pub known: Vec<String>,
}

impl Default for JobsConfig {
    fn default() -> Self {
        let default_type = JobType {
            queue: "tasks".into(),
            handler: defaults::handler(),
            simulate_ms: defaults::simulate_ms(),
            fail_rate: 0.0,
            command: Vec::new(),
            delivery_limit: defaults::delivery_limit(),
            threshold: defaults::threshold(),
            burst_threshold: defaults::burst_threshold(),
            burst_size: defaults::burst_size(),
            max_jobs: defaults::max_jobs(),
            priority: 0,
            image: None,
        };
        JobsConfig {
            tick_seconds: defaults::tick_seconds(),
            idle_seconds: defaults::idle_seconds(),
            default_job_type: defaults::default_job_type(),
            max_workers_total: None,
            job_types: BTreeMap::from([("default".to_string(), default_type)]),
        }
    }
}

impl JobsConfig {
    /// The file at `path`, or the built-in configuration when there is none.
    pub fn load(path: Option<&Path>) -> Result<Self, JobsConfigError> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| JobsConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|error| match error {
            ParseError::Syntax(message) => JobsConfigError::Parse {
                path: shown,
                message,
            },
            ParseError::Invalid(message) => JobsConfigError::Invalid {
                path: shown,
                message,
            },
        })
    }

    /// The job types `text` (the file's contents) holds, checked.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let config: JobsConfig =
            toml::from_str(text).map_err(|e| ParseError::Syntax(e.to_string()))?;
        config.validate().map_err(ParseError::Invalid)?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        // Bounded both ways: a tick of 10^11 seconds is a scaler that never ticks again,
        // and an idle window of a year never drains anyone.
        in_range("tick_seconds", self.tick_seconds, TICK_SECONDS)?;
        in_range("idle_seconds", self.idle_seconds, IDLE_SECONDS)?;
        if self.job_types.is_empty() {
            return Err("job_types must name at least one job type".into());
        }
        if self.max_workers_total == Some(0) {
            return Err(
                "max_workers_total: must be at least 1 (leave it out for no total cap)".into(),
            );
        }
        if !self.job_types.contains_key(&self.default_job_type) {
            return Err(format!(
                "default_job_type {:?} is not one of the job types ({})",
                self.default_job_type,
                self.known_job_types().join(", ")
            ));
        }
        let mut queues = BTreeMap::new();
        for (name, job) in &self.job_types {
            if !is_label_value(name) {
                return Err(format!(
                    "job_types.{name}: a job type name must be 1 to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit (it labels Kubernetes Jobs)"
                ));
            }
            job.validate()
                .map_err(|message| format!("job_types.{name}.{message}"))?;
            if let Some(other) = queues.insert(job.queue.as_str(), name) {
                return Err(format!(
                    "job_types.{name}.queue: queue {:?} is already used by job type {other:?}",
                    job.queue
                ));
            }
        }
        // A work queue named like another's dead queue would be declared twice with
        // different arguments: whichever comes second fails (PRECONDITION_FAILED).
        for (name, job) in &self.job_types {
            if let Some(other) = queues.get(dead_queue_name(&job.queue).as_str()) {
                return Err(format!(
                    "job_types.{other}.queue: queue {:?} is the dead-letter queue of job type {name:?} (queue {:?}); choose another name",
                    dead_queue_name(&job.queue),
                    job.queue
                ));
            }
        }
        Ok(())
    }

    pub fn known_job_types(&self) -> Vec<String> {
        self.job_types.keys().cloned().collect()
    }

    pub fn job_type(&self, name: &str) -> Result<&JobType, UnknownJobType> {
        self.job_types.get(name).ok_or_else(|| UnknownJobType {
            requested: name.to_string(),
            known: self.known_job_types(),
        })
    }

    pub fn tick(&self) -> Duration {
        Duration::from_secs(self.tick_seconds)
    }

    pub fn idle_window(&self) -> Duration {
        Duration::from_secs(self.idle_seconds)
    }
}

/// Seconds between scaler ticks: at least one, at most five minutes.
pub const TICK_SECONDS: RangeInclusive<u64> = 1..=300;
/// Seconds of idleness before a drain: at least one, at most a day.
pub const IDLE_SECONDS: RangeInclusive<u64> = 1..=86_400;
/// Milliseconds per simulated row: at most an hour.
pub const SIMULATE_MS: RangeInclusive<u64> = 0..=3_600_000;

/// `Ok` when `value` of `key` lies in `range`; otherwise a message naming both.
fn in_range(key: &str, value: u64, range: RangeInclusive<u64>) -> Result<(), String> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(format!(
            "{key}: {value} is out of range ({} to {})",
            range.start(),
            range.end()
        ))
    }
}

/// Whether `text` is a valid Kubernetes label value (and so a usable job type name).
fn is_label_value(text: &str) -> bool {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    (1..=63).contains(&text.len())
        && alnum(text.chars().next())
        && alnum(text.chars().last())
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Why the text of a job-types file is not one.
#[derive(Debug)]
pub enum ParseError {
    /// Not TOML, or not the file's shape.
    Syntax(String),
    /// A value out of bounds or inconsistent.
    Invalid(String),
}

impl JobType {
    /// Checks one job type; the message starts with the offending key.
    fn validate(&self) -> Result<(), String> {
        // `<queue>.dead` must also fit AMQP's 255-byte short string.
        let longest_queue = 255 - ".dead".len();
        if self.queue.is_empty() || self.queue.len() > longest_queue {
            return Err(format!("queue: must be 1 to {longest_queue} bytes long"));
        }
        if self.queue.starts_with("amq.") {
            return Err("queue: names starting with \"amq.\" are reserved by RabbitMQ".into());
        }
        in_range("simulate_ms", self.simulate_ms, SIMULATE_MS)?;
        if !(0.0..=1.0).contains(&self.fail_rate) {
            return Err(format!(
                "fail_rate: {} is not between 0.0 and 1.0",
                self.fail_rate
            ));
        }
        if self.handler == HandlerKind::Exec && self.command.is_empty() {
            return Err("command: the exec handler needs a command".into());
        }
        if self.delivery_limit == 0 {
            return Err("delivery_limit: must be at least 1".into());
        }
        if self.burst_threshold < self.threshold {
            return Err(format!(
                "burst_threshold: {} is below threshold {}",
                self.burst_threshold, self.threshold
            ));
        }
        if self.max_jobs == 0 {
            return Err("max_jobs: must be at least 1".into());
        }
        if self.burst_size == 0 {
            return Err("burst_size: must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid(text: &str) -> String {
        match JobsConfig::parse(text) {
            Ok(config) => panic!("accepted {config:?}"),
            Err(ParseError::Syntax(m) | ParseError::Invalid(m)) => m,
        }
    }

    #[test]
    fn built_in_default_maps_default_to_tasks() {
        let config = JobsConfig::load(None).unwrap();
        let job = config.job_type("default").unwrap();
        assert_eq!(job.queue, "tasks");
        assert_eq!(job.handler, HandlerKind::Simulate);
        assert_eq!((job.threshold, job.burst_threshold), (20, 40));
        assert_eq!((job.burst_size, job.max_jobs), (5, 10));
        assert_eq!(config.idle_window(), Duration::from_secs(30));
    }

    #[test]
    fn a_minimal_file_fills_in_defaults() {
        let config = JobsConfig::parse(
            r#"
            [job_types.default]
            queue = "tasks"
            [job_types.resize]
            queue = "images"
            handler = "exec"
            command = ["sh", "-c", "cat"]
            max_jobs = 3
            "#,
        )
        .unwrap_or_else(|_| panic!("refused"));
        let resize = config.job_type("resize").unwrap();
        assert_eq!(resize.handler, HandlerKind::Exec);
        assert_eq!(resize.max_jobs, 3);
        assert_eq!(resize.delivery_limit, 5);
        assert_eq!(config.tick_seconds, 5);
    }

    #[test]
    fn unknown_keys_are_named() {
        let message = invalid("[job_types.default]\nqueue = \"t\"\nmax_job = 3\n");
        assert!(message.contains("max_job"), "{message}");
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            (
                "[job_types.default]\nqueue = \"t\"\nfail_rate = 1.5\n",
                "job_types.default.fail_rate",
            ),
            (
                "[job_types.default]\nqueue = \"t\"\nhandler = \"exec\"\n",
                "job_types.default.command",
            ),
            (
                "[job_types.default]\nqueue = \"t\"\nthreshold = 50\n",
                "job_types.default.burst_threshold",
            ),
            (
                "[job_types.default]\nqueue = \"\"\n",
                "job_types.default.queue",
            ),
            (
                "[job_types.a]\nqueue = \"t\"\n[job_types.default]\nqueue = \"t\"\n",
                "already used",
            ),
            ("[job_types.other]\nqueue = \"t\"\n", "default_job_type"),
            (
                "default_job_type = \"a b\"\n[job_types.\"a b\"]\nqueue = \"t\"\n",
                "job type name must be",
            ),
            (
                "tick_seconds = 0\n[job_types.default]\nqueue = \"t\"\n",
                "tick_seconds",
            ),
            (
                "[job_types.default]\nqueue = \"t\"\nhandler = \"shell\"\n",
                "handler",
            ),
            (
                "tick_seconds = 100000000000\n[job_types.default]\nqueue = \"t\"\n",
                "tick_seconds: 100000000000 is out of range (1 to 300)",
            ),
            (
                "idle_seconds = 0\n[job_types.default]\nqueue = \"t\"\n",
                "idle_seconds: 0 is out of range (1 to 86400)",
            ),
            (
                "idle_seconds = 31536000\n[job_types.default]\nqueue = \"t\"\n",
                "idle_seconds: 31536000 is out of range",
            ),
            (
                "[job_types.default]\nqueue = \"t\"\nsimulate_ms = 86400000\n",
                "job_types.default.simulate_ms: 86400000 is out of range",
            ),
        ];
        for (text, expected) in cases {
            let message = invalid(text);
            assert!(
                message.contains(expected),
                "{expected:?} not in {message:?}"
            );
        }
    }

    /// Queue `x` and queue `x.dead` would be declared once as a work queue and once as
    /// the other's dead-letter queue, with different arguments: refused, naming both.
    #[test]
    fn a_queue_named_like_another_job_types_dead_queue_is_refused_naming_both() {
        let cases = [
            (
                "a work queue on another's dead queue",
                "[job_types.default]\nqueue = \"x\"\n[job_types.b]\nqueue = \"x.dead\"\n",
                "job_types.b.queue: queue \"x.dead\" is the dead-letter queue of job type \"default\" (queue \"x\")",
            ),
            (
                "the same, the other way round in the file",
                "[job_types.a]\nqueue = \"tasks.dead\"\n[job_types.default]\nqueue = \"tasks\"\n",
                "job_types.a.queue: queue \"tasks.dead\" is the dead-letter queue of job type \"default\"",
            ),
            (
                "one queue for two job types",
                "[job_types.default]\nqueue = \"x\"\n[job_types.b]\nqueue = \"x\"\n",
                "job_types.default.queue: queue \"x\" is already used by job type \"b\"",
            ),
        ];
        for (name, text, expected) in cases {
            let message = invalid(text);
            assert!(message.contains(expected), "{name}: {message:?}");
        }
        // `x.dead.dead` is nobody's queue: `x.dead` and `x` alone are fine apart.
        assert!(
            JobsConfig::parse(
                "[job_types.default]\nqueue = \"x.dead\"\n[job_types.b]\nqueue = \"y\"\n"
            )
            .is_ok()
        );
    }

    #[test]
    fn unknown_job_type_lists_the_known_ones() {
        let config = JobsConfig::default();
        let error = config.job_type("nope").unwrap_err();
        assert_eq!(
            error.to_string(),
            "unknown job type \"nope\"; known job types: default"
        );
    }
}
