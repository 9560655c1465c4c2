//! The local launcher's registry: one file per worker, `<dir>/<name>.json`, with its
//! job type, pid and start time, and how it ended once that is known.
//!
//! A restarted scaler rebuilds its list of workers from here, never from memory, and
//! so do `scaler workers` and `./manage.sh local stop`. A recorded pid counts only
//! while that process still carries the worker's `WORKER_NAME`, so a reused pid is
//! never mistaken for a worker. Each entry is written whole (write, then rename), so
//! a reader never sees half of one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::policy::Phase;

/// One line of the registry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    pub job_type: String,
    /// 0 until recorded: a scaler registers a worker before starting it.
    pub pid: u32,
    pub started_unix: u64,
    /// Set once the worker is known to have ended.
    #[serde(default)]
    pub ended: Option<Ended>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ended {
    Succeeded,
    Failed,
    /// It ended while no scaler was watching: its exit status is lost.
    Unknown,
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

/// The registry in one directory.
#[derive(Debug, Clone)]
pub struct Registry {
    dir: PathBuf,
}

impl Registry {
    /// The registry in `dir`, created if needed.
    pub fn open(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Registry { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn entry_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    pub fn write(&self, entry: &Entry) -> std::io::Result<()> {
        let path = self.entry_path(&entry.name);
        let partial = path.with_extension("json.partial");
        std::fs::write(
            &partial,
            serde_json::to_vec(entry).expect("an entry serialises"),
        )?;
        std::fs::rename(partial, path)
    }

    /// Worker `name`'s entry, if it has one.
    pub fn entry(&self, name: &str) -> std::io::Result<Option<Entry>> {
        match std::fs::read(self.entry_path(name)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(std::io::Error::other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes worker `name`'s entry; one already gone is not an error.
    pub fn remove(&self, name: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.entry_path(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every entry, oldest first; an unreadable one is skipped with a warning.
    pub fn entries(&self) -> std::io::Result<Vec<Entry>> {
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
}

/// Whether `pid` is a live process whose environment names it worker `name`.
pub fn is_worker_process(pid: u32, name: &str) -> bool {
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
pub fn find_worker_process(name: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|&pid| is_worker_process(pid, name))
}
