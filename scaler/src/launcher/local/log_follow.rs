//! Following a local worker's log file as `tail -f` does: what is written after a
//! point, line by line, until the worker has ended and everything it wrote is read.

use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::io::AsyncReadExt as _;

use crate::launcher::{LauncherError, LogLines, MAX_LOG_BYTES};

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
    /// Read, not yet sent: the start of a line.
    partial: Vec<u8>,
    /// Lines to send before reading more.
    ready: std::collections::VecDeque<String>,
    ended: bool,
}

impl Follower {
    /// `first` (the log's last lines so far) line by line, then every line written
    /// after, until the worker has ended.
    pub fn lines(self, first: &str) -> LogLines {
        let state = State {
            follower: self,
            partial: Vec::new(),
            ready: first.lines().map(str::to_string).collect(),
            ended: false,
        };
        futures_util::stream::unfold(state, |mut state| async move {
            loop {
                if let Some(line) = state.ready.pop_front() {
                    return Some((Ok(line), state));
                }
                if state.ended {
                    if state.partial.is_empty() {
                        return None;
                    }
                    let rest = String::from_utf8_lossy(&state.partial).into_owned();
                    state.partial.clear();
                    return Some((Ok(rest), state));
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
                state.split(&chunk[..read]);
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

impl State {
    /// Adds `bytes` read: each whole line becomes ready, and a line longer than
    /// [`MAX_LOG_BYTES`] is sent in pieces of that size.
    fn split(&mut self, bytes: &[u8]) {
        self.partial.extend_from_slice(bytes);
        let limit = usize::try_from(MAX_LOG_BYTES).unwrap_or(usize::MAX);
        loop {
            let end = match self.partial.iter().position(|&b| b == b'\n') {
                Some(at) if at <= limit => at,
                _ if self.partial.len() > limit => limit,
                _ => return,
            };
            let line: Vec<u8> = self.partial.drain(..end).collect();
            if self.partial.first() == Some(&b'\n') {
                self.partial.remove(0);
            }
            self.ready
                .push_back(String::from_utf8_lossy(&line).into_owned());
        }
    }
}
