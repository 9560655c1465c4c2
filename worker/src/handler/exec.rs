//! `exec`: runs a configured command per row.
//!
//! The row's JSON message is the command's stdin; `SPILLWAY_BATCH_ID`, `SPILLWAY_LINE`,
//! `SPILLWAY_ROW` and `SPILLWAY_JOB_TYPE` are in its environment. Exit status 0 means
//! done; any other status, a signal, or running past the timeout means failed. Each
//! line the command prints goes to the worker's log, tagged with batch and line.

use std::{process::Stdio, time::Duration};

use spillway_common::envelope::RowMessage;
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader},
    process::Command,
};

use super::RowFailed;

#[derive(Debug, Clone)]
pub struct Exec {
    /// Program and arguments; never empty (the job-types file is validated).
    pub command: Vec<String>,
    pub timeout: Duration,
}

impl Exec {
    pub async fn handle(&self, row: &RowMessage, body: &[u8]) -> Result<(), RowFailed> {
        let (program, args) = self
            .command
            .split_first()
            .ok_or_else(|| RowFailed("the exec handler has no command".into()))?;
        let mut child = Command::new(program)
            .args(args)
            .env("SPILLWAY_BATCH_ID", &row.batch_id)
            .env("SPILLWAY_LINE", row.line.to_string())
            .env("SPILLWAY_ROW", row.row.to_string())
            .env("SPILLWAY_JOB_TYPE", &row.job_type)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A worker that is stopped, or a row that times out, takes its command along.
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| RowFailed(format!("cannot start {program:?}: {e}")))?;

        let mut stdin = child.stdin.take().expect("stdin is piped");
        let body = body.to_vec();
        // A command that never reads stdin must not block the row: write in the background.
        let feed = tokio::spawn(async move {
            let _ = stdin.write_all(&body).await;
        });
        let stdout = log_lines(child.stdout.take(), "stdout", row);
        let stderr = log_lines(child.stderr.take(), "stderr", row);

        let run = async {
            let (status, _, last_error_line) = tokio::join!(child.wait(), stdout, stderr);
            status.map(|status| (status, last_error_line))
        };
        let outcome = tokio::time::timeout(self.timeout, run).await;
        feed.abort();
        match outcome {
            Err(_) => Err(RowFailed(format!(
                "{program:?} timed out after {:?} (EXEC_TIMEOUT_SECONDS)",
                self.timeout
            ))),
            Ok(Err(e)) => Err(RowFailed(format!("cannot wait for {program:?}: {e}"))),
            Ok(Ok((status, _))) if status.success() => Ok(()),
            Ok(Ok((status, None))) => Err(RowFailed(format!("{program:?} failed: {status}"))),
            Ok(Ok((status, Some(said)))) => Err(RowFailed(format!(
                "{program:?} failed: {status}; its last error line: {said}"
            ))),
        }
    }
}

/// The most of a command's last error line a failure reason carries.
const REASON_LINE_CHARS: usize = 500;

/// Logs each line of `output` tagged with the row; returns the last non-blank one,
/// shortened to [`REASON_LINE_CHARS`], so a failure can say what the command said.
async fn log_lines(
    output: Option<impl AsyncRead + Unpin>,
    stream: &str,
    row: &RowMessage,
) -> Option<String> {
    let mut lines = BufReader::new(output?).lines();
    let mut last = None;
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::info!(batch_id = %row.batch_id, line = row.line, stream, "{line}");
        if !line.trim().is_empty() {
            last = Some(line);
        }
    }
    last.map(|line| line.chars().take(REASON_LINE_CHARS).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> RowMessage {
        RowMessage {
            batch_id: "b1".into(),
            job_type: "default".into(),
            line: 7,
            row: 6,
            headers: vec!["a".into()],
            fields: vec!["x".into()],
        }
    }

    fn exec(script: &str, timeout_ms: u64) -> Exec {
        Exec {
            command: vec!["sh".into(), "-c".into(), script.into()],
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    #[tokio::test]
    async fn the_command_gets_the_row_on_stdin_and_its_place_in_the_environment() {
        let check = r#"input=$(cat); [ "$input" = '{"row":6}' ] && [ "$SPILLWAY_BATCH_ID:$SPILLWAY_LINE:$SPILLWAY_ROW" = b1:7:6 ]"#;
        assert_eq!(
            exec(check, 5000).handle(&row(), br#"{"row":6}"#).await,
            Ok(())
        );
    }

    #[tokio::test]
    async fn a_non_zero_exit_or_a_timeout_fails_the_row() {
        let failed = exec("exit 3", 5000)
            .handle(&row(), b"{}")
            .await
            .unwrap_err();
        assert!(failed.0.contains("exit status: 3"), "{failed}");
        assert!(!failed.0.contains("error line"), "{failed}");
        let said = exec(
            "echo first >&2; echo 'out of paper' >&2; echo >&2; exit 4",
            5000,
        )
        .handle(&row(), b"{}")
        .await
        .unwrap_err();
        assert!(
            said.0
                .ends_with("exit status: 4; its last error line: out of paper"),
            "{said}"
        );
        let slow = exec("sleep 5", 100)
            .handle(&row(), b"{}")
            .await
            .unwrap_err();
        assert!(slow.0.contains("timed out"), "{slow}");
        let missing = Exec {
            command: vec!["/nonexistent/spillway-cmd".into()],
            timeout: Duration::from_secs(1),
        };
        assert!(
            missing
                .handle(&row(), b"{}")
                .await
                .unwrap_err()
                .0
                .contains("cannot start")
        );
    }
}
