//! The local launcher: workers as processes on this machine.
//!
//! This is what `./manage.sh local` and the end-to-end tests run. Each worker is the
//! `worker` binary (by default the one next to the scaler's own), started in a process
//! group of its own with its log in `<dir>/<name>.log`. A registry file per worker,
//! `<dir>/<name>.json`, records its pid, so a restarted scaler finds the workers the
//! previous one started; a recorded pid counts only while that process still carries
//! the worker's `WORKER_NAME`, so a reused pid is never mistaken for a worker.

use std::{
    collections::HashMap,
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
};

use std::os::unix::process::CommandExt;

use nix::{sys::signal, unistd::Pid};
use serde::{Deserialize, Serialize};
use spillway_common::events::unix_now;

use super::{LaunchedWorker, Launcher, LauncherError, MAX_LOG_BYTES, log_cut_note};
use crate::policy::Phase;

pub struct LocalLauncher {
    worker_bin: PathBuf,
    dir: PathBuf,
    /// Workers this process started, so their exit status can be collected.
    children: Mutex<HashMap<String, Child>>,
}

/// One line of the registry.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    name: String,
    job_type: String,
    pid: u32,
    started_unix: u64,
    /// Set once the worker is known to have ended.
    #[serde(default)]
    ended: Option<Ended>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Ended {
    Succeeded,
    Failed,
    /// It ended while no scaler was watching: its exit status is lost.
    Unknown,
}

impl LocalLauncher {
    /// Workers run `worker_bin`; registry and logs live in `dir`, created if needed.
    pub fn new(worker_bin: PathBuf, dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(LocalLauncher {
            worker_bin,
            dir,
            children: Mutex::new(HashMap::new()),
        })
    }

    /// Where worker `name` writes its log.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    fn entry_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    fn write_entry(&self, entry: &Entry) -> std::io::Result<()> {
        // Write then rename, so a reader never sees half an entry.
        let path = self.entry_path(&entry.name);
        let partial = path.with_extension("json.partial");
        std::fs::write(
            &partial,
            serde_json::to_vec(entry).expect("an entry serialises"),
        )?;
        std::fs::rename(partial, path)
    }

    fn entries(&self) -> std::io::Result<Vec<Entry>> {
        let mut entries = Vec::new();
        for file in std::fs::read_dir(&self.dir)? {
            let path = file?.path();
            if path.extension().is_some_and(|e| e == "json") {
                match std::fs::read(&path).map(|bytes| serde_json::from_slice::<Entry>(&bytes)) {
                    Ok(Ok(entry)) => entries.push(entry),
                    Ok(Err(e)) => {
                        tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable worker registry entry")
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        entries.sort_by_key(|e| e.started_unix);
        Ok(entries)
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
                    if let Err(error) = self.write_entry(entry) {
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
        if let Err(error) = self.write_entry(entry) {
            tracing::warn!(worker = %entry.name, %error, "cannot record that a worker ended");
        }
        ended.into()
    }
}

impl From<Ended> for Phase {
    fn from(ended: Ended) -> Self {
        match ended {
            Ended::Succeeded => Phase::Succeeded,
            Ended::Failed => Phase::Failed,
            Ended::Unknown => Phase::Ended,
        }
    }
}

/// Whether `pid` is a live process whose environment names it worker `name`.
fn is_worker_process(pid: u32, name: &str) -> bool {
    let wanted = format!("WORKER_NAME={name}");
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|environ| {
            environ
                .split(|&b| b == 0)
                .any(|var| var == wanted.as_bytes())
        })
        .unwrap_or(false)
}

/// The pid of the live process carrying `WORKER_NAME=name`, if any.
fn find_worker_process(name: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|&pid| is_worker_process(pid, name))
}

impl Launcher for LocalLauncher {
    async fn workers(&self) -> Result<Vec<LaunchedWorker>, LauncherError> {
        let entries = self
            .entries()
            .map_err(|e| LauncherError::List(format!("{}: {e}", self.dir.display())))?;
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
        let failed = |reason: String| LauncherError::Spawn {
            name: name.to_string(),
            reason,
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
        self.write_entry(&entry)
            .map_err(|e| failed(format!("cannot record it in the registry: {e}")))?;
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
                let _ = self.write_entry(&entry);
                return Err(failed(format!("{}: {e}", self.worker_bin.display())));
            }
        };
        entry.pid = child.id();
        self.children
            .lock()
            .expect("children lock")
            .insert(name.to_string(), child);
        self.write_entry(&entry)
            .map_err(|e| failed(format!("cannot record its pid in the registry: {e}")))
    }

    async fn stop(&self, name: &str) -> Result<(), LauncherError> {
        let failed = |reason: String| LauncherError::Stop {
            name: name.to_string(),
            reason,
        };
        let entry = self
            .entries()
            .map_err(|e| failed(e.to_string()))?
            .into_iter()
            .find(|e| e.name == name)
            .ok_or_else(|| failed("no such worker".into()))?;
        if entry.pid == 0 || !is_worker_process(entry.pid, name) {
            return Ok(());
        }
        // The worker only: it drains, letting the command of the row in hand finish.
        let pid = Pid::from_raw(i32::try_from(entry.pid).map_err(|e| failed(e.to_string()))?);
        signal::kill(pid, signal::Signal::SIGTERM).map_err(|e| failed(e.to_string()))
    }

    async fn logs(&self, name: &str, tail_lines: Option<u32>) -> Result<String, LauncherError> {
        // Only names in the registry: never a path a caller made up.
        let known = self
            .entries()
            .map_err(|e| LauncherError::List(e.to_string()))?
            .iter()
            .any(|e| e.name == name);
        if !known {
            return Err(LauncherError::NoSuchWorker(name.into()));
        }
        read_tail(&self.log_path(name), tail_lines, MAX_LOG_BYTES).map_err(|e| {
            LauncherError::Logs {
                name: name.into(),
                reason: e.to_string(),
            }
        })
    }
}

/// The end of the log at `path`: its last `lines` lines (all of it for `None`), and
/// at most `limit` bytes of them, after [`log_cut_note`] when that bound cut them.
/// The file is read from its end in chunks, no further back than `limit` bytes and
/// only as far as the lines asked for: memory stays bounded whatever the log's size.
fn read_tail(path: &Path, lines: Option<u32>, limit: u64) -> std::io::Result<String> {
    const CHUNK: u64 = 64 * 1024;
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let floor = len.saturating_sub(limit);
    let mut start = len;
    let mut window: Vec<u8> = Vec::new();
    while start > floor && !holds_lines(&window, lines) {
        let from = start.saturating_sub(CHUNK).max(floor);
        let mut chunk = vec![0; usize::try_from(start - from).expect("a chunk fits in memory")];
        file.seek(SeekFrom::Start(from))?;
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&window);
        window = chunk;
        start = from;
    }
    let text = String::from_utf8_lossy(&window);
    // Cut when the window stopped at the bound with fewer lines than asked for (or
    // with the whole log asked for); its first line is then only the end of a line.
    if start > 0 && !holds_lines(&window, lines) {
        let whole_lines = match text.find('\n') {
            Some(at) if at + 1 < text.len() => &text[at + 1..],
            // One line longer than the bound: its end is all there is to show.
            _ => &text[..],
        };
        return Ok(log_cut_note() + whole_lines);
    }
    Ok(tail(&text, lines).to_string())
}

/// Whether `window`, the end of a log, holds `lines` whole lines (besides the final
/// line break); `None` asks for the whole log, which only the file's start ends.
fn holds_lines(window: &[u8], lines: Option<u32>) -> bool {
    let Some(lines) = lines else { return false };
    let body = window.strip_suffix(b"\n").unwrap_or(window);
    body.iter().filter(|&&b| b == b'\n').count() >= lines as usize
}

/// The last `lines` lines of `text` (all of it for `None`).
fn tail(text: &str, lines: Option<u32>) -> &str {
    let Some(lines) = lines else { return text };
    let trimmed = text.strip_suffix('\n').unwrap_or(text);
    match trimmed
        .rmatch_indices('\n')
        .nth(lines.saturating_sub(1) as usize)
    {
        Some((at, _)) if lines > 0 => &text[at + 1..],
        _ if lines == 0 => "",
        _ => text,
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

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", Some(2)), "b\nc\n");
        assert_eq!(tail("a\nb\nc", Some(2)), "b\nc");
        assert_eq!(tail("a\nb\n", Some(5)), "a\nb\n");
        assert_eq!(tail("a\nb\n", None), "a\nb\n");
        assert_eq!(tail("a\nb\n", Some(0)), "");
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

    /// Writes `lines` lines of `line_bytes` bytes each (the last byte a line break, the
    /// first ones the line's number), a megabyte at a time.
    fn write_log(path: &Path, lines: usize, line_bytes: usize) {
        use std::io::Write;
        let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
        for n in 0..lines {
            let mut line = format!("{n:08}");
            line.extend(std::iter::repeat_n('x', line_bytes - line.len() - 1));
            line.push('\n');
            file.write_all(line.as_bytes()).unwrap();
        }
        file.flush().unwrap();
    }

    /// Issue 15: a worker printed one 300 MB line and `?tail=500` answered all of it,
    /// taking the scaler from 20 MB to 606 MB. Each row: a log, the lines asked for,
    /// whether the answer is cut, and what it ends with.
    #[test]
    fn a_log_answer_is_bounded_in_bytes_as_well_as_lines() {
        let dir = tempfile::tempdir().unwrap();
        let limit = MAX_LOG_BYTES as usize;
        // name, lines, bytes per line, tail, cut, ends with
        type Case = (&'static str, usize, usize, Option<u32>, bool, &'static str);
        let cases: Vec<Case> = vec![
            (
                "one 50 MB line, last 500 lines",
                1,
                50 << 20,
                Some(500),
                true,
                "xx\n",
            ),
            ("one 50 MB line, whole log", 1, 50 << 20, None, true, "xx\n"),
            (
                "500 lines of 10 KiB: only the last ~100 fit",
                500,
                10 << 10,
                Some(500),
                true,
                "\n",
            ),
            (
                "1,000 short lines, last 500",
                1_000,
                20,
                Some(500),
                false,
                "\n",
            ),
            ("a small log, whole", 3, 20, None, false, "\n"),
        ];
        for (name, lines, line_bytes, tail_lines, cut, ends_with) in cases {
            let path = dir.path().join("worker.log");
            write_log(&path, lines, line_bytes);
            let answer = read_tail(&path, tail_lines, MAX_LOG_BYTES).unwrap();
            assert!(
                answer.len() <= limit + log_cut_note().len(),
                "{name}: {} bytes",
                answer.len()
            );
            assert_eq!(answer.starts_with(&log_cut_note()), cut, "{name}");
            assert!(answer.ends_with(ends_with), "{name}");
            let body = answer.strip_prefix(&log_cut_note()).unwrap_or(&answer);
            if lines > 1 {
                assert!(
                    body.lines().all(|l| l.len() == line_bytes - 1),
                    "{name}: whole lines only"
                );
            }
        }
        write_log(&dir.path().join("short.log"), 1_000, 20);
        let last = read_tail(&dir.path().join("short.log"), Some(500), MAX_LOG_BYTES).unwrap();
        assert_eq!(last.lines().count(), 500);
        assert!(last.starts_with("00000500x"), "{}", &last[..20]);
        assert_eq!(
            read_tail(&dir.path().join("short.log"), Some(0), MAX_LOG_BYTES).unwrap(),
            ""
        );
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
            .write_entry(&Entry {
                name: orphan_name.into(),
                job_type: "default".into(),
                pid: 0,
                started_unix: unix_now(),
                ended: None,
            })
            .unwrap();
        assert_eq!(phase(&launcher, orphan_name).await, Phase::Running);
        let recorded = launcher
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
