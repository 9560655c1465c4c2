//! The local launcher against a stand-in worker (a shell script): phases from exit
//! statuses, logs, the registry across launchers, and the environment a worker gets.

use std::time::Duration;

use futures_util::StreamExt as _;
use spillway_testkit::wait_for;

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
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
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

/// The launchers' example spec (variables set and removed) and one over a variable the
/// scaler's own environment has (`HOME`): the spec wins over what the scaler inherited.
fn spec_env() -> WorkerEnv {
    use crate::launcher::spec::{Source, Var};
    WorkerEnv::example().with(Var::new(
        "HOME",
        Source::Value("/nonexistent/spec-home".into()),
    ))
}

#[test]
fn a_workers_explicit_environment_is_exactly_its_spec_resolved_locally() {
    let dir = tempfile::tempdir().unwrap();
    let launcher = LocalLauncher::new("worker".into(), dir.path().into())
        .unwrap()
        .with_env(spec_env());
    let command = launcher.command(&launcher.env.spec("default", "w-1"));
    let explicit: std::collections::BTreeMap<&str, Option<&str>> = command
        .get_envs()
        .map(|(name, value)| (name.to_str().unwrap(), value.map(|v| v.to_str().unwrap())))
        .collect();
    // `None` is removed, whatever the scaler's environment holds.
    assert_eq!(
        explicit,
        std::collections::BTreeMap::from([
            ("AMQP_URL", Some("amqp://guest:guest@127.0.0.1:5672/%2f")),
            ("HOME", Some("/nonexistent/spec-home")),
            ("JOBS_CONFIG", None),
            ("JOB_TYPE", Some("default")),
            ("LOG_FORMAT", Some("human")),
            ("WORKER_NAME", Some("w-1")),
        ])
    );
}

#[tokio::test]
async fn a_started_worker_sees_its_specs_values_and_not_the_scalers() {
    let dir = tempfile::tempdir().unwrap();
    // `env` as the worker: it prints its environment to its log and exits 0.
    let launcher = LocalLauncher::new("/usr/bin/env".into(), dir.path().join("workers"))
        .unwrap()
        .with_env(spec_env());
    launcher.spawn("default", "w-env").await.unwrap();
    wait_phase(&launcher, "w-env", Phase::Succeeded).await;
    let log = std::fs::read_to_string(launcher.log_path("w-env")).unwrap();
    let seen = |name: &str| {
        log.lines()
            .find_map(|line| line.strip_prefix(&format!("{name}=")))
            .map(str::to_string)
    };
    let spec = launcher.env.spec("default", "w-env");
    for var in &spec.env {
        let expected = var
            .source
            .local_value()
            .map(|v| v.to_str().unwrap().to_string());
        assert_eq!(seen(var.name), expected, "{}", var.name);
    }
    assert_eq!(
        seen("PATH"),
        std::env::var("PATH").ok(),
        "what is not the spec's is passed on as a shell would"
    );
}

#[tokio::test]
async fn a_finished_worker_is_forgotten_with_its_log_and_a_running_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let launcher = launcher_with_script(dir.path(), 0);
    for name in ["w-done", "w-busy"] {
        launcher.spawn("default", name).await.unwrap();
        wait_ready(dir.path(), name).await;
    }
    let error = launcher.forget("w-busy").await.unwrap_err().to_string();
    assert!(error.contains("has not ended"), "{error}");
    launcher.stop("w-done").await.unwrap();
    wait_phase(&launcher, "w-done", Phase::Succeeded).await;
    let log = launcher.log_path("w-done");
    assert!(
        log.exists(),
        "a finished worker's log is kept until it is forgotten"
    );

    launcher.forget("w-done").await.unwrap();
    let names: Vec<String> = launcher
        .workers()
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.name)
        .collect();
    assert_eq!(names, ["w-busy"]);
    assert!(!log.exists(), "its log goes with it");
    assert!(matches!(
        launcher.logs("w-done", None).await,
        Err(LauncherError::NoSuchWorker(_))
    ));
    launcher.forget("w-done").await.unwrap();
    launcher.stop("w-busy").await.unwrap();
}

#[tokio::test]
async fn a_followed_log_gives_the_last_lines_then_each_new_one_until_the_worker_ends() {
    let dir = tempfile::tempdir().unwrap();
    // Three lines at once, then one every 50 ms until told to stop.
    let script = dir.path().join("ticking-worker");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ntrap 'echo bye; exit 0' TERM\necho one; echo two; echo three\ntouch '{}/'\"$WORKER_NAME\".ready\nn=0\nwhile :; do n=$((n+1)); echo \"tick $n\"; sleep 0.05; done\n",
            dir.path().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let launcher = LocalLauncher::new(script, dir.path().join("workers")).unwrap();
    launcher.spawn("default", "w-tick").await.unwrap();
    wait_ready(dir.path(), "w-tick").await;

    let mut lines = launcher.follow_logs("w-tick", Some(1)).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next())
            .await
            .expect("a new line within 10 s")
            .expect("the stream goes on while the worker runs")
            .unwrap();
        seen.push(line);
    }
    // One line of the tail (whichever was last when following began), then new ones
    // in order, none skipped or repeated.
    let ticks: Vec<u32> = seen
        .iter()
        .filter_map(|l| l.strip_prefix("tick ")?.parse().ok())
        .collect();
    assert!(ticks.len() >= 4, "{seen:?}");
    assert!(ticks.windows(2).all(|w| w[1] == w[0] + 1), "{seen:?}");

    launcher.stop("w-tick").await.unwrap();
    let rest: Vec<String> =
        tokio::time::timeout(Duration::from_secs(10), lines.collect::<Vec<_>>())
            .await
            .expect("the stream ends once the worker has exited")
            .into_iter()
            .map(Result::unwrap)
            .collect();
    assert_eq!(rest.last().map(String::as_str), Some("bye"), "{rest:?}");
    assert!(matches!(
        launcher.follow_logs("w-none", None).await,
        Err(LauncherError::NoSuchWorker(_))
    ));
}
