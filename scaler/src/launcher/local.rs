//! The local launcher: workers as processes on this machine.
//!
//! This is what `./manage.sh local` and the end-to-end tests run. Each worker is the
//! `worker` binary (by default the one next to the scaler's own), started in a process
//! group of its own with its log in `<dir>/<name>.log` and an entry in the
//! [`registry`], so a restarted scaler finds the workers the previous one started.
//!
//! A worker's environment is the scaler's with its [`WorkerSpec`] laid over it: each
//! variable of the spec is set to its local value, or removed when it has none, so a
//! Spillway setting reaches the worker from the spec alone, never because the scaler
//! happened to have it in its environment (a scaler given `--amqp-url` passes that URL
//! on; one with no job-types file gives its workers none). The rest is passed on as a
//! shell would, on purpose: `PATH`, `HOME` and the locale that the worker and its
//! `exec` commands need, the worker's own tunables (`CONCURRENCY`, `PREFETCH`,
//! `PROGRESS_SECONDS`, `EXEC_TIMEOUT_SECONDS`) and whatever an `exec` command reads.
//! Clearing it would leave `exec` commands without a `PATH` and need a scaler setting
//! for each of those.
//!
//! # Layout
//!
//! - [`registry`]: the worker registry, one file per worker.
//! - [`log_tail`]: the end of a worker's log, bounded in bytes.

pub mod log_follow;
pub mod log_tail;
pub mod registry;
#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::Duration,
};

use std::os::unix::process::CommandExt;

use anyhow::Context as _;
use backon::{ExponentialBuilder, Retryable as _};
use nix::{sys::signal, unistd::Pid};
use spillway_common::events::unix_now;
use tokio::io::AsyncSeekExt as _;

use self::{
    log_tail::read_tail,
    registry::{Ended, Entry, Registry, find_worker_process, is_worker_process},
};
use super::{
    Cause, LaunchedWorker, Launcher, LauncherError, LogLines, MAX_LOG_BYTES,
    spec::{WorkerEnv, WorkerSpec},
};
use crate::{config::Settings, policy::Phase};

pub struct LocalLauncher {
    worker_bin: PathBuf,
    registry: Registry,
    /// What every worker gets from the settings, besides its name and job type.
    env: WorkerEnv,
    /// Workers this process started, so their exit status can be collected.
    children: Mutex<HashMap<String, Child>>,
}

impl LocalLauncher {
    /// The scaler's launcher: `WORKER_BIN` (else the `worker` next to the scaler),
    /// the registry in `WORKER_DIR`, and each worker's environment from the settings.
    pub fn from_settings(settings: &Settings) -> anyhow::Result<Self> {
        let worker_bin = match &settings.worker_bin {
            Some(bin) => bin.clone(),
            None => worker_next_to_current_exe()
                .context("cannot find the worker binary next to the scaler's: set WORKER_BIN")?,
        };
        let dir = &settings.worker_dir;
        let launcher = LocalLauncher::new(worker_bin, dir.clone())
            .with_context(|| format!("WORKER_DIR {} is not usable", dir.display()))?;
        Ok(launcher.with_env(WorkerEnv::from_settings(settings)))
    }

    /// Workers run `worker_bin`; registry and logs live in `dir`, created if needed.
    /// Its workers get their name and job type only, until [`Self::with_env`].
    pub fn new(worker_bin: PathBuf, dir: PathBuf) -> std::io::Result<Self> {
        Ok(LocalLauncher {
            worker_bin,
            registry: Registry::open(dir)?,
            env: WorkerEnv::default(),
            children: Mutex::new(HashMap::new()),
        })
    }

    /// Its workers get `env` besides their name and job type.
    pub fn with_env(self, env: WorkerEnv) -> Self {
        LocalLauncher { env, ..self }
    }

    /// The command that starts the worker of `spec`: the spec's environment over the
    /// scaler's, in a process group of its own.
    fn command(&self, spec: &WorkerSpec) -> Command {
        let mut command = Command::new(&self.worker_bin);
        for var in &spec.env {
            match var.source.local_value() {
                Some(value) => command.env(var.name, value),
                None => command.env_remove(var.name),
            };
        }
        // Its own group: Ctrl-C at the scaler's terminal does not reach it.
        command.stdin(Stdio::null()).process_group(0);
        command
    }

    /// Where worker `name` writes its log.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.registry.dir().join(format!("{name}.log"))
    }

    /// The phase of `entry` now, collecting exit statuses of this process's children.
    fn phase_of(&self, entry: &mut Entry) -> Phase {
        if let Some(ended) = entry.ended {
            return ended.into();
        }
        let mut children = self.children.lock().expect("children lock");
        let ended = match children.get_mut(&entry.name) {
            Some(child) => match child.try_wait() {
                Ok(None) => return Phase::Running,
                Ok(Some(status)) if status.success() => Ended::Succeeded,
                Ok(Some(_)) | Err(_) => Ended::Failed,
            },
            // Started by an earlier scaler: alive if its pid still is this worker.
            None if is_worker_process(entry.pid, &entry.name) => return Phase::Running,
            // That scaler died between starting it and recording its pid: find it.
            None if entry.pid == 0 => match find_worker_process(&entry.name) {
                Some(pid) => {
                    entry.pid = pid;
                    if let Err(error) = self.registry.write(entry) {
                        tracing::warn!(worker = %entry.name, %error, "cannot record a found worker's pid");
                    }
                    return Phase::Running;
                }
                None => Ended::Unknown,
            },
            None => Ended::Unknown,
        };
        children.remove(&entry.name);
        entry.ended = Some(ended);
        if let Err(error) = self.registry.write(entry) {
            tracing::warn!(worker = %entry.name, %error, "cannot record that a worker ended");
        }
        ended.into()
    }
}

impl Launcher for LocalLauncher {
    async fn workers(&self) -> Result<Vec<LaunchedWorker>, LauncherError> {
        let entries = self.registry.entries().map_err(|e| {
            LauncherError::List(in_context(e, &self.registry.dir().display().to_string()))
        })?;
        Ok(entries
            .into_iter()
            .map(|mut entry| {
                let phase = self.phase_of(&mut entry);
                LaunchedWorker {
                    name: entry.name,
                    job_type: entry.job_type,
                    phase,
                    started_unix: entry.started_unix,
                    // A process starts at once or fails to spawn: it never waits.
                    waiting: None,
                }
            })
            .collect())
    }

    async fn spawn(&self, job_type: &str, name: &str) -> Result<(), LauncherError> {
        let failed = |source: Cause| LauncherError::Spawn {
            name: name.to_string(),
            source,
        };
        // Registered before it exists, so a scaler that dies mid-spawn leaves a trace
        // the next one follows (by name, in /proc) instead of an untracked worker.
        let mut entry = Entry {
            name: name.to_string(),
            job_type: job_type.to_string(),
            pid: 0,
            started_unix: unix_now(),
            ended: None,
        };
        self.registry
            .write(&entry)
            .map_err(|e| failed(in_context(e, "cannot record it in the registry")))?;
        let start = || {
            std::fs::File::create(self.log_path(name))
                .and_then(|log| Ok((log.try_clone()?, log)))
                .and_then(|(out, err)| {
                    self.command(&self.env.spec(job_type, name))
                        .stdout(out)
                        .stderr(err)
                        .spawn()
                })
        };
        // "Text file busy": the worker binary is open for writing somewhere (being
        // rebuilt, or inherited for an instant by a process another thread forks). It
        // passes in moments: try again a few times before giving up.
        let started = (|| async { start() })
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(10))
                    .with_max_times(6),
            )
            .sleep(tokio::time::sleep)
            .when(|e| e.kind() == std::io::ErrorKind::ExecutableFileBusy)
            .await;
        let child = match started {
            Ok(child) => child,
            Err(e) => {
                entry.ended = Some(Ended::Failed);
                let _ = self.registry.write(&entry);
                return Err(failed(in_context(
                    e,
                    &self.worker_bin.display().to_string(),
                )));
            }
        };
        entry.pid = child.id();
        self.children
            .lock()
            .expect("children lock")
            .insert(name.to_string(), child);
        self.registry
            .write(&entry)
            .map_err(|e| failed(in_context(e, "cannot record its pid in the registry")))
    }

    async fn stop(&self, name: &str) -> Result<(), LauncherError> {
        let failed = |source: Cause| LauncherError::Stop {
            name: name.to_string(),
            source,
        };
        let entry = self
            .registry
            .entries()
            .map_err(|e| failed(e.into()))?
            .into_iter()
            .find(|e| e.name == name)
            .ok_or_else(|| failed("no such worker".into()))?;
        if entry.pid == 0 || !is_worker_process(entry.pid, name) {
            return Ok(());
        }
        // The worker only: it drains, letting the command of the row in hand finish.
        let pid = Pid::from_raw(i32::try_from(entry.pid).map_err(|e| failed(e.into()))?);
        signal::kill(pid, signal::Signal::SIGTERM).map_err(|e| failed(e.into()))
    }

    async fn forget(&self, name: &str) -> Result<(), LauncherError> {
        let failed = |source: Cause| LauncherError::Forget {
            name: name.to_string(),
            source,
        };
        let Some(mut entry) = self.registry.entry(name).map_err(|e| failed(e.into()))? else {
            return Ok(());
        };
        if self.phase_of(&mut entry).is_active() {
            return Err(failed("it has not ended".into()));
        }
        self.registry.remove(name).map_err(|e| failed(e.into()))?;
        match std::fs::remove_file(self.log_path(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(failed(e.into())),
            _ => Ok(()),
        }
    }

    async fn logs(&self, name: &str, tail_lines: Option<u32>) -> Result<String, LauncherError> {
        // Only names in the registry: never a path a caller made up.
        let known = self
            .registry
            .entries()
            .map_err(|e| LauncherError::List(e.into()))?
            .iter()
            .any(|e| e.name == name);
        if !known {
            return Err(LauncherError::NoSuchWorker(name.into()));
        }
        read_tail(&self.log_path(name), tail_lines, MAX_LOG_BYTES)
            .map(|(text, _)| text)
            .map_err(|e| LauncherError::Logs {
                name: name.into(),
                source: e.into(),
            })
    }

    async fn follow_logs(
        &self,
        name: &str,
        tail_lines: Option<u32>,
    ) -> Result<LogLines, LauncherError> {
        let failed = |source: Cause| LauncherError::Logs {
            name: name.into(),
            source,
        };
        let entry = self
            .registry
            .entries()
            .map_err(|e| LauncherError::List(e.into()))?
            .into_iter()
            .find(|e| e.name == name)
            .ok_or_else(|| LauncherError::NoSuchWorker(name.into()))?;
        let path = self.log_path(name);
        let (first, offset) =
            read_tail(&path, tail_lines, MAX_LOG_BYTES).map_err(|e| failed(e.into()))?;
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| failed(e.into()))?;
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(|e| failed(e.into()))?;
        let pid = entry.pid;
        let follower = log_follow::Follower {
            name: name.to_string(),
            file,
            // A pid not recorded yet (the worker is being started): found by name.
            alive: Box::new(move |name| match pid {
                0 => find_worker_process(name).is_some(),
                pid => is_worker_process(pid, name),
            }),
        };
        Ok(follower.lines(&first))
    }
}

/// `error` with what was being done: still an I/O error of the same kind.
fn in_context(error: std::io::Error, doing: &str) -> Cause {
    Box::new(std::io::Error::new(
        error.kind(),
        format!("{doing}: {error}"),
    ))
}

/// A worker in the registry as `scaler workers` prints it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Registered {
    pub name: String,
    pub job_type: String,
    /// `running` only while its pid is still this worker's process.
    pub phase: &'static str,
    /// 0 when it was never recorded (its scaler died while starting it).
    pub pid: u32,
    pub started_unix: u64,
}

impl LocalLauncher {
    /// Every worker in the registry with its phase now and its pid.
    pub fn registered(&self) -> std::io::Result<Vec<Registered>> {
        Ok(self
            .registry
            .entries()?
            .into_iter()
            .map(|mut entry| {
                let phase = self.phase_of(&mut entry);
                Registered {
                    name: entry.name,
                    job_type: entry.job_type,
                    phase: phase.as_str(),
                    pid: entry.pid,
                    started_unix: entry.started_unix,
                }
            })
            .collect())
    }
}

/// The `worker` binary next to the running executable.
pub fn worker_next_to_current_exe() -> std::io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe.parent().unwrap_or(Path::new(".")).join("worker"))
}
