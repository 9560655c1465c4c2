//! `exec`: runs a configured command per row.
//!
//! The row's JSON message is the command's stdin; `SPILLWAY_BATCH_ID`, `SPILLWAY_LINE`,
//! `SPILLWAY_ROW` and `SPILLWAY_JOB_TYPE` are in its environment. Exit status 0 means
//! done; any other status, a signal, or running past the timeout means failed.
//!
//! The outcome is the command's own exit status, decided when it exits. It runs in a
//! process group of its own, and the group is killed as soon as the command exits,
//! times out or its row is abandoned: a background job it left behind, still holding
//! its output open, neither holds the row until the timeout nor outlives it. The pipes
//! are then read for at most [`OUTPUT_GRACE`] more, for output not yet logged.
//!
//! Standard output is the row's answer, its result in the ledger: UTF-8, one trailing
//! newline trimmed, at most `RESULT_MAX_BYTES` (more fails the row, saying so).
//! Standard error is the diary: each line goes to the worker's log, tagged with batch
//! and line. Both are read to their end as bytes in bounded chunks, whatever they hold
//! (a reader that stopped early would close the pipe and kill a command that was doing
//! its job); stderr is decoded lossily, and a line longer than [`MAX_LINE_BYTES`] is cut
//! there and the rest counted, so one endless line cannot take the worker's memory.

use std::{fmt, pin::pin, process::Stdio, time::Duration};

use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};
use spillway_common::envelope::RowMessage;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    process::{Child, Command},
};

use super::RowFailed;

/// The most of one output line that is logged; the rest is counted and dropped.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// How much output is read at a time: with [`MAX_LINE_BYTES`], what one stream of one
/// row may hold in the worker's memory.
const READ_CHUNK_BYTES: usize = 8 * 1024;

/// How long output is still read after the command exited. What it printed is in the
/// pipes already and its group is dead, so the pipes end as soon as they are read,
/// unless something that left the group (a daemon) holds them: that is not waited for.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// The most of a command's last error line a failure reason carries.
const REASON_LINE_CHARS: usize = 500;

#[derive(Debug, Clone)]
pub struct Exec {
    /// Program and arguments; never empty (the job-types file is validated).
    pub command: Vec<String>,
    pub timeout: Duration,
    /// The most a row's result (its command's stdout) may hold.
    pub result_max_bytes: usize,
}

impl Exec {
    /// Runs the command on `row`; its stdout is the row's result.
    pub async fn handle(&self, row: &RowMessage, body: &[u8]) -> Result<String, RowFailed> {
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
            .process_group(0)
            // A row dropped mid-run (its task aborted) neither leaves the command running
            // nor unreaped; what the command started goes with its group, below.
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| RowFailed(format!("cannot start {program:?}: {e}")))?;
        // Declared after `child`, so it is dropped first: an abandoned row (its task
        // aborted) kills the group while the command is not yet reaped.
        let mut group = ProcessGroup::of(&child);

        let mut stdin = child.stdin.take().expect("stdin is piped");
        let body = body.to_vec();
        // A command that never reads stdin must not block the row: write in the background.
        let feed = tokio::spawn(async move {
            let _ = stdin.write_all(&body).await;
        });
        let mut last_error_line = None;
        let mut answer = Answer::new(self.result_max_bytes);
        let exited = {
            let stdout = read_chunks(child.stdout.take(), |chunk| answer.push(chunk));
            let stderr = read_lines(child.stderr.take(), |line| {
                log_line(row, "stderr", &line);
                if !line.text.trim().is_empty() {
                    last_error_line = Some(line.text);
                }
            });
            let mut output = pin!(async { tokio::join!(stdout, stderr) });
            let mut output_ended = false;
            let exited = tokio::time::timeout(self.timeout, async {
                // Output is read while the command runs (a full pipe would stall it),
                // but only its exit decides the outcome.
                loop {
                    tokio::select! {
                        status = child.wait() => break status,
                        _ = &mut output, if !output_ended => output_ended = true,
                    }
                }
            })
            .await;
            group.kill();
            if !output_ended && tokio::time::timeout(OUTPUT_GRACE, output).await.is_err() {
                tracing::warn!(
                    batch_id = %row.batch_id, line = row.line,
                    "the command's output is still open {OUTPUT_GRACE:?} after it ended (held by a process outside its group); no longer read"
                );
            }
            exited
        };
        feed.abort();
        let said =
            last_error_line.map(|line| line.chars().take(REASON_LINE_CHARS).collect::<String>());
        match (exited, said) {
            (Err(_), _) => Err(RowFailed(format!(
                "{program:?} timed out after {:?} (EXEC_TIMEOUT_SECONDS)",
                self.timeout
            ))),
            (Ok(Err(e)), _) => Err(RowFailed(format!("cannot wait for {program:?}: {e}"))),
            (Ok(Ok(status)), _) if status.success() => answer.result(program),
            (Ok(Ok(status)), None) => Err(RowFailed(format!("{program:?} failed: {status}"))),
            (Ok(Ok(status)), Some(said)) => Err(RowFailed(format!(
                "{program:?} failed: {status}; its last error line: {said}"
            ))),
        }
    }
}

/// The process group a command leads, killed once: when the command has exited or
/// timed out, or when this is dropped with the row.
struct ProcessGroup(Option<Pid>);

impl ProcessGroup {
    fn of(child: &Child) -> Self {
        ProcessGroup(
            child
                .id()
                .and_then(|id| i32::try_from(id).ok())
                .map(Pid::from_raw),
        )
    }

    fn kill(&mut self) {
        if let Some(group) = self.0.take() {
            // The group's id is the command's pid, which Linux does not hand out again
            // while any member of the group lives, and this runs before the command is
            // reaped or right after; an empty group answers ESRCH: nothing was left.
            let _ = killpg(group, Signal::SIGKILL);
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One line of output as it is logged: at most [`MAX_LINE_BYTES`] of it, decoded
/// lossily, and how many more bytes it had.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    text: String,
    dropped: u64,
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)?;
        if self.dropped > 0 {
            write!(f, "… {} more bytes dropped", self.dropped)?;
        }
        Ok(())
    }
}

fn log_line(row: &RowMessage, stream: &str, line: &Line) {
    tracing::info!(batch_id = %row.batch_id, line = row.line, stream, "{line}");
}

/// Reads `output` to its end, whatever its bytes, and hands each line to `each`.
async fn read_lines(output: Option<impl AsyncRead + Unpin>, mut each: impl FnMut(Line)) {
    let mut lines = LineSplitter::default();
    read_chunks(output, |chunk| lines.push(chunk, &mut each)).await;
    lines.finish(&mut each);
}

/// Reads `output` to its end in bounded chunks, handing each to `each`.
async fn read_chunks(output: Option<impl AsyncRead + Unpin>, mut each: impl FnMut(&[u8])) {
    let Some(mut output) = output else {
        return;
    };
    let mut chunk = vec![0; READ_CHUNK_BYTES];
    loop {
        match output.read(&mut chunk).await {
            Ok(0) => break,
            Ok(read) => each(&chunk[..read]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => {
                tracing::warn!(%error, "cannot read the command's output");
                break;
            }
        }
    }
}

/// A command's stdout, kept up to the result's limit; past it, only counted.
struct Answer {
    bytes: Vec<u8>,
    max: usize,
    over: u64,
}

impl Answer {
    fn new(max: usize) -> Self {
        Answer {
            bytes: Vec::new(),
            max,
            over: 0,
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        let kept = chunk.len().min(self.max - self.bytes.len());
        self.bytes.extend_from_slice(&chunk[..kept]);
        self.over += (chunk.len() - kept) as u64;
    }

    /// The row's result: stdout as UTF-8 with one trailing newline trimmed, or why it
    /// cannot be one.
    fn result(mut self, program: &str) -> Result<String, RowFailed> {
        if self.over > 0 {
            return Err(RowFailed(format!(
                "{program:?} printed {} bytes on stdout, more than RESULT_MAX_BYTES ({}): stdout is the row's result; write bulky output elsewhere",
                self.bytes.len() as u64 + self.over,
                self.max
            )));
        }
        if self.bytes.ends_with(b"\n") {
            self.bytes.pop();
            if self.bytes.ends_with(b"\r") {
                self.bytes.pop();
            }
        }
        if self.bytes.contains(&0) {
            return Err(RowFailed(format!(
                "{program:?} printed a NUL byte on stdout: a result is text"
            )));
        }
        String::from_utf8(self.bytes).map_err(|e| {
            RowFailed(format!(
                "{program:?} printed bytes that are not UTF-8 on stdout (at byte {}): a result is UTF-8 text",
                e.utf8_error().valid_up_to()
            ))
        })
    }
}

/// Cuts a stream of bytes into [`Line`]s, holding at most one capped line however
/// long a line is. A line ends at `\n` (a `\r` before it is dropped too), or where the
/// stream ends.
#[derive(Default)]
struct LineSplitter {
    line: Vec<u8>,
    dropped: u64,
}

impl LineSplitter {
    fn push(&mut self, mut bytes: &[u8], each: &mut impl FnMut(Line)) {
        while let Some(newline) = bytes.iter().position(|&b| b == b'\n') {
            self.keep(&bytes[..newline]);
            self.emit(each);
            bytes = &bytes[newline + 1..];
        }
        self.keep(bytes);
    }

    fn finish(mut self, each: &mut impl FnMut(Line)) {
        if !self.line.is_empty() || self.dropped > 0 {
            self.emit(each);
        }
    }

    fn keep(&mut self, bytes: &[u8]) {
        let kept = bytes.len().min(MAX_LINE_BYTES - self.line.len());
        self.line.extend_from_slice(&bytes[..kept]);
        self.dropped += (bytes.len() - kept) as u64;
    }

    fn emit(&mut self, each: &mut impl FnMut(Line)) {
        if self.dropped == 0 && self.line.last() == Some(&b'\r') {
            self.line.pop();
        }
        each(Line {
            text: String::from_utf8_lossy(&self.line).into_owned(),
            dropped: std::mem::take(&mut self.dropped),
        });
        self.line.clear();
    }
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
            result_max_bytes: 1024,
        }
    }

    #[tokio::test]
    async fn the_command_gets_the_row_on_stdin_and_its_place_in_the_environment() {
        let check = r#"input=$(cat); [ "$input" = '{"row":6}' ] && [ "$SPILLWAY_BATCH_ID:$SPILLWAY_LINE:$SPILLWAY_ROW" = b1:7:6 ]"#;
        assert_eq!(
            exec(check, 5000).handle(&row(), br#"{"row":6}"#).await,
            Ok(String::new())
        );
    }

    #[tokio::test]
    async fn stdout_is_the_result_and_stderr_only_the_diary() {
        let ok = |result: &str| Ok(result.to_string());
        // (name, script, the row's result or what its failure says)
        let cases: [(&str, &str, Result<String, &str>); 7] = [
            ("one line", "echo 42", ok("42")),
            (
                "trailing CRLF trimmed once",
                r"printf 'a\n\nb\r\n'",
                ok("a\n\nb"),
            ),
            (
                "stderr is not the result",
                "echo diary >&2; printf done",
                ok("done"),
            ),
            ("unicode", "printf '東京 🚲'", ok("東京 🚲")),
            (
                "exactly the limit",
                "head -c 1024 /dev/zero | tr '\\0' x",
                Ok("x".repeat(1024)),
            ),
            (
                "over the limit",
                "head -c 1025 /dev/zero | tr '\\0' x",
                Err("printed 1025 bytes on stdout, more than RESULT_MAX_BYTES (1024)"),
            ),
            (
                "not UTF-8",
                r"printf 'caf\351'",
                Err("not UTF-8 on stdout (at byte 3)"),
            ),
        ];
        for (name, script, expected) in cases {
            let outcome = exec(script, 5000).handle(&row(), b"{}").await;
            match (&expected, &outcome) {
                (Ok(result), Ok(got)) => assert_eq!(got, result, "{name}"),
                (Err(says), Err(failed)) => assert!(failed.0.contains(says), "{name}: {failed}"),
                _ => panic!("{name}: expected {expected:?}, got {outcome:?}"),
            }
        }
        let nul = exec(r"printf 'a\000b'", 5000).handle(&row(), b"{}").await;
        assert!(nul.unwrap_err().0.contains("NUL"));
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
            result_max_bytes: 1024,
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

    /// The lines `LineSplitter` makes of `chunks`, read one after the other.
    fn split(chunks: &[&[u8]]) -> Vec<Line> {
        let mut lines = Vec::new();
        let mut splitter = LineSplitter::default();
        for chunk in chunks {
            splitter.push(chunk, &mut |line| lines.push(line));
        }
        splitter.finish(&mut |line| lines.push(line));
        lines
    }

    fn whole(text: &str) -> Line {
        Line {
            text: text.into(),
            dropped: 0,
        }
    }

    #[test]
    fn output_is_cut_into_lines_and_decoded_lossily_whatever_its_bytes() {
        assert_eq!(
            split(&[b"caf\xe9\nplain\r\nsplit ", b"across reads\n\nlast"]),
            [
                whole("caf\u{FFFD}"),
                whole("plain"),
                whole("split across reads"),
                whole(""),
                whole("last"),
            ]
        );
        assert_eq!(
            split(&[b"ends with a newline\n"]),
            [whole("ends with a newline")]
        );
        assert_eq!(split(&[]), []);
    }

    #[test]
    fn a_line_past_the_cap_is_cut_there_and_the_rest_counted() {
        let x = |n: usize| vec![b'x'; n];
        let capped = |dropped: u64| Line {
            text: "x".repeat(MAX_LINE_BYTES),
            dropped,
        };
        let cases = [
            (
                "exactly the cap",
                vec![x(MAX_LINE_BYTES), b"\n".to_vec()],
                vec![capped(0)],
            ),
            (
                "one byte over",
                vec![x(MAX_LINE_BYTES + 1)],
                vec![capped(1)],
            ),
            (
                // 100,000 - 16,384 = 83,616 bytes dropped, then the next line whole.
                "over many reads, then another line",
                vec![x(40_000), x(60_000), b"\nnext\n".to_vec()],
                vec![capped(83_616), whole("next")],
            ),
            (
                // The cut line's \r is among the dropped bytes, so it is counted there.
                "a long CRLF line",
                vec![x(MAX_LINE_BYTES + 10), b"\r\n".to_vec()],
                vec![capped(11)],
            ),
        ];
        for (name, chunks, expected) in cases {
            let chunks: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            assert_eq!(split(&chunks), expected, "{name}");
        }
        assert_eq!(
            capped(83_616).to_string().len(),
            MAX_LINE_BYTES + "… 83616 more bytes dropped".len()
        );
        assert!(
            capped(83_616)
                .to_string()
                .ends_with("x… 83616 more bytes dropped")
        );
        assert_eq!(whole("as is").to_string(), "as is");
    }

    #[tokio::test]
    async fn output_is_read_in_chunks_to_its_end() {
        // A line of one and a half chunks, under the cap: whole, though read in two.
        let long = READ_CHUNK_BYTES + READ_CHUNK_BYTES / 2;
        let output = [&b"caf\xe9\n"[..], &vec![b'x'; long], b"\ndone"].concat();
        let mut lines = Vec::new();
        read_lines(Some(output.as_slice()), |line| lines.push(line)).await;
        let seen: Vec<(usize, u64)> = lines.iter().map(|l| (l.text.len(), l.dropped)).collect();
        assert_eq!(seen, [("caf\u{FFFD}".len(), 0), (long, 0), (4, 0)]);
        assert_eq!(
            (lines[0].text.as_str(), lines[2].text.as_str()),
            ("caf\u{FFFD}", "done")
        );
        assert!(lines[1].text.bytes().all(|b| b == b'x'));
    }

    /// Whether process `pid` still runs: absent from /proc, or a zombie waiting for a
    /// parent to reap it, counts as gone.
    fn running(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                // The state follows the command name, which is in parentheses.
                let after_name = stat.rsplit_once(')')?.1;
                after_name
                    .split_whitespace()
                    .next()
                    .map(|state| state != "Z")
            })
            .unwrap_or(false)
    }

    /// The pid a test command recorded in `file`.
    fn recorded_pid(file: &std::path::Path) -> u32 {
        std::fs::read_to_string(file)
            .unwrap_or_else(|e| panic!("the command recorded a pid in {file:?}: {e}"))
            .trim()
            .parse()
            .expect("a pid")
    }

    async fn wait_gone(pid: u32, what: &str) {
        spillway_testkit::wait_for(what, Duration::from_secs(10), || {
            std::future::ready(!running(pid))
        })
        .await;
    }

    #[tokio::test]
    async fn output_that_is_not_utf8_is_read_to_the_end_and_exit_0_is_done() {
        // Latin-1 "café", then far more than a pipe's buffer, on both streams: a reader
        // that stopped at the first bad byte, or at the result's limit, would leave the
        // command to die of SIGPIPE.
        let script = r#"printf 'caf\351\n' >&2; i=0; while [ $i -lt 20000 ]; do echo "line $i" >&2; i=$((i+1)); done; echo ok"#;
        assert_eq!(
            exec(script, 30_000).handle(&row(), b"{}").await,
            Ok("ok".to_string())
        );
        let flood = "yes | head -c 1000000; exit 0";
        let failed = exec(flood, 30_000).handle(&row(), b"{}").await.unwrap_err();
        assert!(failed.0.contains("printed 1000000 bytes"), "{failed}");
    }

    #[tokio::test]
    async fn a_background_job_holding_the_output_neither_holds_the_row_nor_outlives_it() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("grandchild");
        let timeout = Duration::from_secs(20);
        for (exit, expected) in [(0, Ok(())), (3, Err("exit status: 3"))] {
            let outcome_of =
                |o: &Result<String, RowFailed>| o.as_ref().map(drop).map_err(Clone::clone);
            let script = format!(
                r#"( sleep 40; echo late ) & echo $! > '{}'; echo started; exit {exit}"#,
                pid_file.display()
            );
            let started = std::time::Instant::now();
            let outcome = exec(&script, timeout.as_millis() as u64)
                .handle(&row(), b"{}")
                .await;
            let took = started.elapsed();
            match (expected, outcome_of(&outcome)) {
                (Ok(()), Ok(())) => {}
                (Err(status), Err(failed)) if failed.0.contains(status) => {}
                _ => panic!("exit {exit}: expected {expected:?}, got {outcome:?}"),
            }
            assert!(
                took < Duration::from_secs(5),
                "exit {exit}: decided when the command exited, not after {took:?} (timeout {timeout:?})"
            );
            wait_gone(
                recorded_pid(&pid_file),
                &format!("the background job of a command that exited {exit} to be killed"),
            )
            .await;
        }
    }

    #[tokio::test]
    async fn a_timed_out_command_is_killed_with_everything_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("grandchild");
        let script = format!("( sleep 40 ) & echo $! > '{}'; wait", pid_file.display());
        let failed = exec(&script, 500).handle(&row(), b"{}").await.unwrap_err();
        assert!(failed.0.contains("timed out"), "{failed}");
        wait_gone(
            recorded_pid(&pid_file),
            "the timed-out command's background job to be killed",
        )
        .await;
    }

    #[tokio::test]
    async fn a_row_abandoned_mid_run_takes_its_command_and_what_it_started_along() {
        // A row task is aborted when the connection is lost: its future is dropped.
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("grandchild");
        let script = format!("( sleep 40 ) & echo $! > '{}'; wait", pid_file.display());
        let exec = exec(&script, 30_000);
        let row = row();
        let abandoned =
            tokio::time::timeout(Duration::from_millis(500), exec.handle(&row, b"{}")).await;
        assert!(
            abandoned.is_err(),
            "the command was still running: {abandoned:?}"
        );
        wait_gone(
            recorded_pid(&pid_file),
            "the abandoned row's background job to be killed",
        )
        .await;
    }
}
