//! Following a local worker's log file as `tail -f` does: what is written after a
//! point, line by line, until the worker has ended and everything it wrote is read.

use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::io::AsyncReadExt as _;

use crate::launcher::{LauncherError, LogLines, lines::LineCutter};

/// How often a log that has not grown is read again.
const POLL: Duration = Duration::from_millis(200);

/// A worker's log file, opened where following starts.
pub struct Follower {
    pub name: String,
    pub file: tokio::fs::File,
    /// Whether the worker called this is still running.
    pub alive: Box<dyn Fn(&str) -> bool + Send + Sync>,
}

struct State {
    follower: Follower,
    lines: LineCutter,
    ended: bool,
}

impl Follower {
    /// `first` (the log's last lines so far) line by line, then every line written
    /// after, until the worker has ended.
    pub fn lines(self, first: &str) -> LogLines {
        let mut lines = LineCutter::default();
        if !first.is_empty() {
            lines.push(first.as_bytes());
            if !first.ends_with('\n') {
                lines.push(b"\n");
            }
        }
        let state = State {
            follower: self,
            lines,
            ended: false,
        };
        futures_util::stream::unfold(state, |mut state| async move {
            loop {
                if let Some(line) = state.lines.next_line() {
                    return Some((Ok(line), state));
                }
                if state.ended {
                    return state.lines.finish().map(|rest| (Ok(rest), state));
                }
                // Ended before this read: whatever it wrote is in the file by now.
                let alive = (state.follower.alive)(&state.follower.name);
                let mut chunk = vec![0; 64 * 1024];
                let read = match state.follower.file.read(&mut chunk).await {
                    Ok(read) => read,
                    Err(error) => {
                        state.ended = true;
                        let error = LauncherError::Logs {
                            name: state.follower.name.clone(),
                            source: error.into(),
                        };
                        return Some((Err(error), state));
                    }
                };
                state.lines.push(&chunk[..read]);
                if read == 0 {
                    if alive {
                        tokio::time::sleep(POLL).await;
                    } else {
                        state.ended = true;
                    }
                }
            }
        })
        .boxed()
    }
}
