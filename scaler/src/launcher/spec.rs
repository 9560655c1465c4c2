//! What a worker gets from the scaler that starts it: a [`WorkerSpec`], its name, its
//! job type and its environment, each variable with the [`Source`] of its value.
//!
//! One spec for both launchers, built by [`WorkerEnv::from_settings`] from the
//! scaler's settings: the local launcher sets each variable to its local value (or
//! removes it), the Kubernetes launcher turns the same variables into a Job's `env`,
//! `valueFrom` and volumes. A setting reaches workers only through this list, never by
//! a worker inheriting the scaler's environment, so a new one (a `DATABASE_URL`, say)
//! is one line in [`WorkerEnv::from_settings`] and both kinds of worker get it.

use std::{ffi::OsStr, path::PathBuf};

use spillway_common::config::LogFormat;

use crate::config::Settings;

/// Where a worker Job finds the job-types file (a ConfigMap key mounted read-only).
pub const JOBS_CONFIG_PATH: &str = "/etc/spillway/jobs.toml";

/// Everything a worker is started with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSpec {
    pub name: String,
    pub job_type: String,
    /// `WORKER_NAME` and `JOB_TYPE` first, then the settings' variables.
    pub env: Vec<Var>,
}

/// One environment variable of a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Var {
    pub name: &'static str,
    pub source: Source,
}

impl Var {
    pub fn new(name: &'static str, source: Source) -> Self {
        Var { name, source }
    }
}

/// Where a variable's value comes from, on each launcher. Each kind says what a local
/// worker gets (the scaler's own value) and what a Job refers to, so a secret is never
/// written into a Job and a file is the one the cluster holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// This text, wherever the worker runs.
    Value(String),
    /// One text for a local process, another for a Job.
    PerLauncher { local: String, kubernetes: String },
    /// A secret: a local worker gets `local`; a Job reads key `key` of Secret `name`.
    SecretKey {
        local: String,
        name: String,
        key: String,
    },
    /// A file's path: a local worker gets `local` (the variable is unset when there is
    /// none); a Job mounts key `key` of ConfigMap `name` read-only at `path`, and gets
    /// `path`. Each such file needs a directory of its own in the container.
    ConfigMapFile {
        local: Option<PathBuf>,
        name: String,
        key: String,
        path: String,
    },
}

impl Source {
    /// What a local worker gets: `None` means the variable is unset.
    pub fn local_value(&self) -> Option<&OsStr> {
        match self {
            Source::Value(value)
            | Source::PerLauncher { local: value, .. }
            | Source::SecretKey { local: value, .. } => Some(value.as_ref()),
            Source::ConfigMapFile { local, .. } => local.as_deref().map(|path| path.as_os_str()),
        }
    }
}

/// The variables every worker gets from the scaler's settings, built once at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerEnv(Vec<Var>);

impl WorkerEnv {
    /// Every setting a worker gets from the scaler, each with its source on both
    /// launchers. Add a variable for workers here, and only here.
    pub fn from_settings(s: &Settings) -> Self {
        let log_format = match s.log.log_format {
            LogFormat::Human => "human",
            LogFormat::Json => "json",
        };
        WorkerEnv(vec![
            Var::new(
                "JOBS_CONFIG",
                Source::ConfigMapFile {
                    local: s.jobs.jobs_config.clone(),
                    name: s.worker_configmap.clone(),
                    key: s.worker_configmap_key.clone(),
                    path: JOBS_CONFIG_PATH.into(),
                },
            ),
            // A local worker logs as its scaler does (its log file is read on the
            // dashboard); a pod logs JSON lines, for the cluster's log collector.
            Var::new(
                "LOG_FORMAT",
                Source::PerLauncher {
                    local: log_format.into(),
                    kubernetes: "json".into(),
                },
            ),
            Var::new(
                "AMQP_URL",
                Source::SecretKey {
                    local: s.broker.amqp_url.clone(),
                    name: s.worker_secret.clone(),
                    key: s.worker_secret_key.clone(),
                },
            ),
            Var::new(
                "DATABASE_URL",
                Source::SecretKey {
                    local: s.database.database_url.clone(),
                    name: s.worker_database_secret.clone(),
                    key: s.worker_database_secret_key.clone(),
                },
            ),
        ])
    }

    /// These variables and no others, whatever the settings (for tests).
    pub fn new(vars: Vec<Var>) -> Self {
        WorkerEnv(vars)
    }

    /// The broker URL from a Secret, the job types from a ConfigMap, JSON logs: what
    /// `WorkerEnv::from_settings` gives by default.
    #[cfg(test)]
    pub fn example() -> Self {
        WorkerEnv::new(vec![
            Var::new(
                "JOBS_CONFIG",
                Source::ConfigMapFile {
                    local: None,
                    name: "spillway-jobs".into(),
                    key: "jobs.toml".into(),
                    path: "/etc/spillway/jobs.toml".into(),
                },
            ),
            Var::new(
                "LOG_FORMAT",
                Source::PerLauncher {
                    local: "human".into(),
                    kubernetes: "json".into(),
                },
            ),
            Var::new(
                "AMQP_URL",
                Source::SecretKey {
                    local: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
                    name: "spillway-rabbitmq".into(),
                    key: "amqp-url".into(),
                },
            ),
        ])
    }

    /// These variables and `var` (for tests).
    #[cfg(test)]
    pub fn with(mut self, var: Var) -> Self {
        self.0.push(var);
        self
    }

    /// The spec of worker `name` on `job_type`.
    pub fn spec(&self, job_type: &str, name: &str) -> WorkerSpec {
        let own = [
            Var::new("WORKER_NAME", Source::Value(name.into())),
            Var::new("JOB_TYPE", Source::Value(job_type.into())),
        ];
        WorkerSpec {
            name: name.into(),
            job_type: job_type.into(),
            env: own.into_iter().chain(self.0.iter().cloned()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// Settings with every value the spec reads given as a flag (flags win over the
    /// environment the tests run in).
    fn settings(extra: &[&str]) -> Settings {
        let flags = [
            "scaler",
            "--amqp-url",
            "amqp://spill:way@rabbit:5672/prod",
            "--worker-secret",
            "rabbit-creds",
            "--worker-secret-key",
            "url",
            "--worker-configmap",
            "job-types",
            "--worker-configmap-key",
            "types.toml",
            "--database-url",
            "postgres://ledger@db:5432/spillway",
            "--worker-database-secret",
            "ledger-creds",
            "--worker-database-secret-key",
            "dsn",
        ];
        Settings::try_parse_from(flags.iter().chain(extra)).unwrap()
    }

    #[test]
    fn the_spec_names_the_worker_then_passes_each_setting_with_its_source() {
        let settings = settings(&["--jobs-config", "/srv/jobs.toml", "--log-format", "json"]);
        let spec = WorkerEnv::from_settings(&settings).spec("resize", "spillway-resize-1");
        assert_eq!(
            (spec.name.as_str(), spec.job_type.as_str()),
            ("spillway-resize-1", "resize")
        );
        // (variable, its source: what a local worker gets and what a Job refers to)
        let expected = [
            ("WORKER_NAME", Source::Value("spillway-resize-1".into())),
            ("JOB_TYPE", Source::Value("resize".into())),
            (
                "JOBS_CONFIG",
                Source::ConfigMapFile {
                    local: Some("/srv/jobs.toml".into()),
                    name: "job-types".into(),
                    key: "types.toml".into(),
                    path: "/etc/spillway/jobs.toml".into(),
                },
            ),
            (
                "LOG_FORMAT",
                Source::PerLauncher {
                    local: "json".into(),
                    kubernetes: "json".into(),
                },
            ),
            (
                "AMQP_URL",
                Source::SecretKey {
                    local: "amqp://spill:way@rabbit:5672/prod".into(),
                    name: "rabbit-creds".into(),
                    key: "url".into(),
                },
            ),
            (
                "DATABASE_URL",
                Source::SecretKey {
                    local: "postgres://ledger@db:5432/spillway".into(),
                    name: "ledger-creds".into(),
                    key: "dsn".into(),
                },
            ),
        ];
        let actual: Vec<(&str, Source)> =
            spec.env.into_iter().map(|v| (v.name, v.source)).collect();
        assert_eq!(actual, expected);
    }

    #[test]
    fn a_local_worker_gets_the_scalers_own_values_and_no_unset_file() {
        let mut settings = settings(&["--log-format", "human"]);
        // The built-in job types: no file for the worker either.
        settings.jobs.jobs_config = None;
        let spec = WorkerEnv::from_settings(&settings).spec("default", "w");
        let local: Vec<(&str, Option<&OsStr>)> = spec
            .env
            .iter()
            .map(|v| (v.name, v.source.local_value()))
            .collect();
        assert_eq!(
            local,
            [
                ("WORKER_NAME", Some(OsStr::new("w"))),
                ("JOB_TYPE", Some(OsStr::new("default"))),
                ("JOBS_CONFIG", None),
                ("LOG_FORMAT", Some(OsStr::new("human"))),
                (
                    "AMQP_URL",
                    Some(OsStr::new("amqp://spill:way@rabbit:5672/prod"))
                ),
                (
                    "DATABASE_URL",
                    Some(OsStr::new("postgres://ledger@db:5432/spillway"))
                ),
            ]
        );
    }
}
