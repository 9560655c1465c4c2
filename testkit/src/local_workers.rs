//! The local launcher's worker registry, read from outside the scaler: which workers
//! it has spawned and which still run, for tests and benchmarks that run the scaler
//! with `LAUNCHER=local` and `WORKER_DIR=<dir>/workers`.
//!
//! The registry is one `<name>.json` per worker spawned (its `ended` is null while it
//! runs) beside the worker's `<name>.log`.

use std::path::Path;

/// Workers in the registry under `dir`: (spawned in all, still running).
pub fn registry(dir: &Path) -> (usize, usize) {
    let entries = entries(dir);
    let running = entries.iter().filter(|e| e["ended"].is_null()).count();
    (entries.len(), running)
}

/// Name and pid of each worker the registry shows running whose process is still that
/// worker (a pid can be reused once its process is gone).
pub fn running_workers(dir: &Path) -> Vec<(String, u32)> {
    entries(dir)
        .into_iter()
        .filter(|entry| entry["ended"].is_null())
        .filter_map(|entry| {
            let pid = entry["pid"].as_u64().filter(|&pid| pid > 0)?;
            Some((entry["name"].as_str()?.to_string(), pid as u32))
        })
        .filter(|(name, pid)| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|environ| {
                environ
                    .split(|&b| b == 0)
                    .any(|var| var == format!("WORKER_NAME={name}").as_bytes())
            })
        })
        .collect()
}

/// The name of some worker in the registry; panics if there is none.
pub fn first_worker(dir: &Path) -> String {
    entries(dir)
        .into_iter()
        .find_map(|entry| entry["name"].as_str().map(str::to_string))
        .expect("a registered worker")
}

/// Every registry entry under `dir` that can be read now (one being written is not).
fn entries(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_dir(dir.join("workers"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .filter_map(|text| serde_json::from_str(&text).ok())
        .collect()
}

/// Stops, on drop, every worker the registry in `dir` shows running, so that no test
/// or benchmark leaves workers behind, even one that fails.
pub struct WorkerReaper<'a>(pub &'a Path);

impl Drop for WorkerReaper<'_> {
    fn drop(&mut self) {
        for (_, pid) in running_workers(self.0) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
