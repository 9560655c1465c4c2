//! The `scaler` and `producer` binaries refuse a bad setting at start: each exits
//! non-zero within seconds with one message naming the setting, and never a stack
//! trace, even with `RUST_BACKTRACE=1`. Durations out of their range are bad settings:
//! `tick_seconds = 100000000000` used to be accepted by a scaler that then never ticked.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// How long a refusal may take; a binary still running after this accepted the setting.
const REFUSAL: Duration = Duration::from_secs(20);

fn binary(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_scaler")).with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo test --workspace` does)",
        path.display()
    );
    path
}

/// Runs `binary` with `env` (on a port of its own, with backtraces asked for) and
/// returns its exit code and standard error, or panics if it is still running after
/// [`REFUSAL`].
fn refused(binary: &Path, env: &[(&str, &str)]) -> (i32, String) {
    let stderr = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(binary)
        .env("RUST_BACKTRACE", "1")
        .env("SCALER_LISTEN", "127.0.0.1:0")
        .env("PRODUCER_LISTEN", "127.0.0.1:0")
        .env("LAUNCHER", "local")
        .env(
            "WORKER_DIR",
            std::env::temp_dir().join("spillway-bad-settings"),
        )
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr.reopen().unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + REFUSAL;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} accepted {env:?} and was still running after {REFUSAL:?}",
                binary.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(stderr.path()).unwrap();
    (status.code().expect("an exit code, not a signal"), text)
}

fn jobs_file(dir: &Path, text: &str) -> String {
    let path = dir.join("jobs.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// Asserts one refusal: the exit code, the setting named, and no stack trace.
fn assert_refused(case: &str, (code, stderr): (i32, String), expected_code: i32, names: &str) {
    assert_eq!(code, expected_code, "{case}: exit code; stderr: {stderr}");
    assert!(
        stderr.contains(names),
        "{case}: {names:?} not in {stderr:?}"
    );
    for trace in ["backtrace", "Backtrace", "panicked", "Error: "] {
        assert!(!stderr.contains(trace), "{case}: {trace:?} in {stderr:?}");
    }
}

#[test]
fn the_scaler_refuses_bad_settings_with_one_message_and_no_stack_trace() {
    let dir = tempfile::tempdir().unwrap();
    let scaler = binary("scaler");
    let huge_tick = jobs_file(
        dir.path(),
        "tick_seconds = 100000000000\n[job_types.default]\nqueue = \"tasks\"\n",
    );
    let (code, stderr) = refused(&scaler, &[("JOBS_CONFIG", &huge_tick)]);
    assert_refused(
        "tick_seconds = 100000000000",
        (code, stderr.clone()),
        1,
        "tick_seconds: 100000000000 is out of range (1 to 300)",
    );
    assert!(
        stderr.starts_with("error: job-types file ") && stderr.lines().count() == 1,
        "one line: {stderr:?}"
    );
    assert_refused(
        "AMQP_URL that does not parse",
        refused(&scaler, &[("AMQP_URL", "http://nope")]),
        1,
        "error: AMQP_URL is not a valid AMQP URL",
    );
    // The dashboard reads batches from the ledger: its URL is checked at start.
    assert_refused(
        "DATABASE_URL of another scheme",
        refused(&scaler, &[("DATABASE_URL", "mysql://127.0.0.1/spillway")]),
        1,
        "error: DATABASE_URL is not a PostgreSQL URL",
    );
    for (variable, value) in [
        ("DRAIN_GRACE_SECONDS", "100000000000"),
        ("REPORT_STALE_SECONDS", "0"),
        ("REPORT_STALE_SECONDS", "100000000000"),
        ("WORKER_TTL_SECONDS", "100000000"),
        ("WORKER_STOP_GRACE_SECONDS", "100000000000"),
    ] {
        // clap's own refusal: usage error, exit code 2, naming the variable.
        assert_refused(
            &format!("{variable}={value}"),
            refused(&scaler, &[(variable, value)]),
            2,
            variable,
        );
    }
}

#[test]
fn the_producer_refuses_bad_settings_with_one_message_and_no_stack_trace() {
    let dir = tempfile::tempdir().unwrap();
    let producer = binary("producer");
    let huge_tick = jobs_file(
        dir.path(),
        "tick_seconds = 100000000000\n[job_types.default]\nqueue = \"tasks\"\n",
    );
    assert_refused(
        "tick_seconds = 100000000000",
        refused(&producer, &[("JOBS_CONFIG", &huge_tick)]),
        1,
        "error: job-types file ",
    );
    assert_refused(
        "a SPOOL_DIR that is not a directory",
        refused(&producer, &[("SPOOL_DIR", "/nonexistent/spool")]),
        1,
        "error: SPOOL_DIR /nonexistent/spool is not a writable directory",
    );
    for (variable, value) in [
        ("BODY_IDLE_TIMEOUT_SECONDS", "100000000000"),
        ("BROKER_RETRY_SECONDS", "100000000000"),
    ] {
        assert_refused(
            &format!("{variable}={value}"),
            refused(&producer, &[(variable, value)]),
            2,
            variable,
        );
    }
}
