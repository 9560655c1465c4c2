//! The local launcher: workers as processes on this machine.
//!
//! This is what `./manage.sh local` and the end-to-end tests run. Each worker is the
//! `worker` binary (by default the one next to the scaler's own), started in a process
//! group of its own with its log in `<dir>/<name>.log` and an entry in the
//! [`registry`], so a restarted scaler finds the workers the previous one started.
//!
//! # Layout
//!
//! - [`registry`]: the worker registry, one file per worker.
//! - [`log_tail`]: the end of a worker's log, bounded in bytes.

pub mod log_tail;
pub mod registry;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
};

use std::os::unix::process::CommandExt;

use nix::{sys::signal, unistd::Pid};
use spillway_common::events::unix_now;

use self::{
    log_tail::read_tail,
    registry::{Ended, Entry, Registry, find_worker_process, is_worker_process},
};
use super::{Cause, LaunchedWorker, Launcher, LauncherError, MAX_LOG_BYTES};
use crate::policy::Phase;

pub struct LocalLauncher {
    worker_bin: PathBuf,
    registry: Registry,
    /// Workers this process started, so their exit status can be collected.
    children: Mutex<HashMap<String, Child>>,
}

impl LocalLauncher {
    /// Workers run `worker_bin`; registry and logs live in `dir`, created if needed.
    pub fn new(worker_bin: PathBuf, dir: PathBuf) -> std::io::Result<Self> {
        Ok(LocalLauncher {
            worker_bin,
            registry: Registry::open(dir)?,
            children: Mutex::new(HashMap::new()),
        })
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
        let started = std::fs::File::create(self.log_path(name))
            .and_then(|log| Ok((log.try_clone()?, log)))
            .and_then(|(out, err)| {
                Command::new(&self.worker_bin)
                    .env("WORKER_NAME", name)
                    .env("JOB_TYPE", job_type)
                    .stdin(Stdio::null())
                    .stdout(out)
                    .stderr(err)
                    // Its own group: Ctrl-C at the scaler's terminal does not reach it.
                    .process_group(0)
                    .spawn()
            });
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
        read_tail(&self.log_path(name), tail_lines, MAX_LOG_BYTES).map_err(|e| {
            LauncherError::Logs {
                name: name.into(),
                source: e.into(),
            }
        })
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use spillway_common::testing::wait_for;

    use super::*;

    /// A stand-in worker: a shell that, once its TERM trap is set, marks itself ready
    /// in `dir`, then sleeps until signalled and exits with `code`.
    fn launcher_with_script(dir: &Path, code: i32) -> LocalLauncher {
        let script = dir.join("fake-worker");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\ntrap 'exit {code}' TERM\ntouch '{}/'\"$WORKER_NAME\".ready\nwhile :; do sleep 0.05; done\n",
                dir.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        LocalLauncher::new(script, dir.join("workers")).unwrap()
    }

    async fn wait_ready(dir: &Path, name: &str) {
        let marker = dir.join(format!("{name}.ready"));
        wait_for(
            &format!("{name} to be ready"),
            Duration::from_secs(10),
            || std::future::ready(marker.exists()),
        )
        .await;
    }

    async fn phase(launcher: &LocalLauncher, name: &str) -> Phase {
        let workers = launcher.workers().await.unwrap();
        workers
            .into_iter()
            .find(|w| w.name == name)
            .expect("listed")
            .phase
    }

    async fn wait_phase(launcher: &LocalLauncher, name: &str, wanted: Phase) {
        let what = format!("{name} to be {wanted:?}");
        wait_for(&what, Duration::from_secs(10), || async {
            phase(launcher, name).await == wanted
        })
        .await;
    }

    #[tokio::test]
    async fn spawned_workers_are_listed_running_then_with_their_exit_status() {
        let dir = tempfile::tempdir().unwrap();
        let ok = launcher_with_script(dir.path(), 0);
        ok.spawn("default", "w-ok").await.unwrap();
        assert_eq!(phase(&ok, "w-ok").await, Phase::Running);
        wait_ready(dir.path(), "w-ok").await;
        ok.stop("w-ok").await.unwrap();
        wait_phase(&ok, "w-ok", Phase::Succeeded).await;

        let failing = launcher_with_script(dir.path(), 3);
        failing.spawn("default", "w-bad").await.unwrap();
        wait_ready(dir.path(), "w-bad").await;
        failing.stop("w-bad").await.unwrap();
        wait_phase(&failing, "w-bad", Phase::Failed).await;
        let listed = failing.workers().await.unwrap();
        assert_eq!(
            listed
                .iter()
                .map(|w| w.job_type.as_str())
                .collect::<Vec<_>>(),
            ["default", "default"]
        );
    }

    #[tokio::test]
    async fn logs_are_readable_for_registered_workers_only() {
        let dir = tempfile::tempdir().unwrap();
        let launcher = launcher_with_script(dir.path(), 0);
        launcher.spawn("default", "w-log").await.unwrap();
        wait_ready(dir.path(), "w-log").await;
        std::fs::write(launcher.log_path("w-log"), "one\ntwo\nthree\n").unwrap();
        assert_eq!(
            launcher.logs("w-log", Some(2)).await.unwrap(),
            "two\nthree\n"
        );
        for stranger in ["../../etc/passwd", "w-unknown"] {
            assert!(matches!(
                launcher.logs(stranger, None).await,
                Err(LauncherError::NoSuchWorker(_))
            ));
        }
        launcher.stop("w-log").await.unwrap();
    }

    #[tokio::test]
    async fn a_worker_whose_pid_was_never_recorded_is_found_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let launcher = launcher_with_script(dir.path(), 0);
        // Unique on the machine: the search is by name over every process, and another
        // run of this test may be searching at the same time.
        let orphan_name = crate::launcher::worker_name("orphan");
        let orphan_name = orphan_name.as_str();
        // As if a scaler died between registering a worker and recording its pid.
        let mut orphan = Command::new(dir.path().join("fake-worker"))
            .env("WORKER_NAME", orphan_name)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        wait_ready(dir.path(), orphan_name).await;
        launcher
            .registry
            .write(&Entry {
                name: orphan_name.into(),
                job_type: "default".into(),
                pid: 0,
                started_unix: unix_now(),
                ended: None,
            })
            .unwrap();
        assert_eq!(phase(&launcher, orphan_name).await, Phase::Running);
        let recorded = launcher
            .registry
            .entries()
            .unwrap()
            .into_iter()
            .find(|e| e.name == orphan_name)
            .unwrap();
        assert_eq!(recorded.pid, orphan.id(), "its pid is recorded once found");
        launcher.stop(orphan_name).await.unwrap();
        assert!(orphan.wait().unwrap().success());
    }

    #[tokio::test]
    async fn a_new_launcher_finds_the_workers_an_earlier_one_started() {
        let dir = tempfile::tempdir().unwrap();
        let first = launcher_with_script(dir.path(), 0);
        first.spawn("default", "w-kept").await.unwrap();
        wait_ready(dir.path(), "w-kept").await;

        let second = launcher_with_script(dir.path(), 0);
        assert_eq!(
            phase(&second, "w-kept").await,
            Phase::Running,
            "found by pid and name"
        );
        second.stop("w-kept").await.unwrap();
        // The second launcher did not start it, so the exit status is not its to see.
        wait_phase(&second, "w-kept", Phase::Ended).await;
    }
}
