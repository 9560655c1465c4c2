//! `scaler workers`: the local registry as JSON, as `./manage.sh local stop` reads it.
//! A worker is `running` with its pid while that pid is still the worker's process,
//! and no longer once it has exited.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use spillway_scaler::launcher::{Launcher, local::LocalLauncher};
use spillway_testkit::wait_for;

/// `scaler workers` over the registry in `dir`.
fn listing(dir: &Path) -> Vec<Value> {
    let output = Command::new(env!("CARGO_BIN_EXE_scaler"))
        .arg("workers")
        .env("WORKER_DIR", dir)
        .stderr(Stdio::inherit())
        .output()
        .expect("run the scaler");
    assert!(output.status.success(), "scaler workers failed");
    serde_json::from_slice(&output.stdout).expect("JSON on stdout")
}

#[tokio::test]
async fn scaler_workers_lists_the_registry_with_live_pids_only() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("fake-worker");
    std::fs::write(
        &script,
        "#!/bin/sh\ntrap 'exit 0' TERM\nwhile :; do sleep 0.05; done\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let workers = dir.path().join("workers");
    let launcher = LocalLauncher::new(script, workers.clone()).unwrap();
    launcher.spawn("default", "w-listed").await.unwrap();

    let listed = listing(&workers);
    assert_eq!(listed.len(), 1, "{listed:?}");
    let worker = &listed[0];
    assert_eq!(
        (
            worker["name"].as_str(),
            worker["job_type"].as_str(),
            worker["phase"].as_str()
        ),
        (Some("w-listed"), Some("default"), Some("running"))
    );
    let pid = worker["pid"].as_u64().expect("a pid");
    assert!(Path::new(&format!("/proc/{pid}")).exists());

    // It ends behind the scaler's back: only that it is gone can be seen.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    wait_for(
        "the listing to show it ended",
        Duration::from_secs(10),
        || std::future::ready(listing(&workers)[0]["phase"] == "ended"),
    )
    .await;
    drop(launcher);
}

#[test]
fn scaler_workers_says_when_there_is_no_registry() {
    let output = Command::new(env!("CARGO_BIN_EXE_scaler"))
        .arg("workers")
        .env("WORKER_DIR", "/nonexistent/spillway-workers")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("WORKER_DIR /nonexistent/spillway-workers does not exist"),
        "{stderr}"
    );
}
