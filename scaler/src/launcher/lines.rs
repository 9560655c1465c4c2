//! A followed log's bytes cut into lines, the same for either launcher.

use std::collections::VecDeque;

use super::MAX_LOG_BYTES;

/// Bytes read from a log, not yet a whole line, and the lines cut from them: each
/// without its line break (nor the `\r` of a `\r\n`), and a line longer than
/// [`MAX_LOG_BYTES`] in pieces of that size, so that memory stays bounded whatever a
/// worker prints.
#[derive(Debug, Default)]
pub struct LineCutter {
    partial: Vec<u8>,
    ready: VecDeque<String>,
}

impl LineCutter {
    /// Adds `bytes` read from the log.
    pub fn push(&mut self, bytes: &[u8]) {
        self.partial.extend_from_slice(bytes);
        let limit = usize::try_from(MAX_LOG_BYTES).unwrap_or(usize::MAX);
        loop {
            let (end, skip) = match self.partial.iter().position(|&b| b == b'\n') {
                Some(at) if at <= limit => (at, 1),
                _ if self.partial.len() > limit => (limit, 0),
                _ => return,
            };
            let mut line: Vec<u8> = self.partial.drain(..end + skip).collect();
            line.truncate(end);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            self.ready
                .push_back(String::from_utf8_lossy(&line).into_owned());
        }
    }

    /// The next whole line cut, if any.
    pub fn next_line(&mut self) -> Option<String> {
        self.ready.pop_front()
    }

    /// What is left once the log has ended: the last line, if it had no line break.
    pub fn finish(&mut self) -> Option<String> {
        if self.partial.is_empty() {
            return None;
        }
        let rest = std::mem::take(&mut self.partial);
        Some(String::from_utf8_lossy(&rest).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_cut_at_breaks_without_carriage_returns_and_long_ones_in_pieces() {
        let mut cutter = LineCutter::default();
        cutter.push(b"one\r\ntw");
        assert_eq!(cutter.next_line().as_deref(), Some("one"));
        assert_eq!(cutter.next_line(), None, "half a line waits");
        cutter.push(b"o\nthree");
        assert_eq!(cutter.next_line().as_deref(), Some("two"));
        assert_eq!(cutter.finish().as_deref(), Some("three"));
        assert_eq!(cutter.finish(), None);

        let limit = usize::try_from(MAX_LOG_BYTES).unwrap();
        cutter.push(&vec![b'x'; limit + 10]);
        assert_eq!(cutter.next_line().map(|l| l.len()), Some(limit));
        cutter.push(b"\n");
        assert_eq!(cutter.next_line().map(|l| l.len()), Some(10));
    }
}
