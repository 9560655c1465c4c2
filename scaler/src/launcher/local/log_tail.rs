//! Reading the end of a worker's log file: its last lines, bounded in bytes, read
//! from the end in chunks so the scaler's memory does not grow with the log.

use std::{
    io::{Read, Seek, SeekFrom},
    path::Path,
};

use crate::launcher::log_cut_note;

/// The end of the log at `path`: its last `lines` lines (all of it for `None`), and
/// at most `limit` bytes of them, after [`log_cut_note`] when that bound cut them; and
/// the length of the file they end at (where following it goes on from).
/// The file is read from its end in chunks, no further back than `limit` bytes and
/// only as far as the lines asked for: memory stays bounded whatever the log's size.
pub fn read_tail(path: &Path, lines: Option<u32>, limit: u64) -> std::io::Result<(String, u64)> {
    const CHUNK: u64 = 64 * 1024;
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let floor = len.saturating_sub(limit);
    let mut start = len;
    let mut window: Vec<u8> = Vec::new();
    while start > floor && !holds_lines(&window, lines) {
        let from = start.saturating_sub(CHUNK).max(floor);
        let mut chunk = vec![0; usize::try_from(start - from).expect("a chunk fits in memory")];
        file.seek(SeekFrom::Start(from))?;
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&window);
        window = chunk;
        start = from;
    }
    let text = String::from_utf8_lossy(&window);
    // Cut when the window stopped at the bound with fewer lines than asked for (or
    // with the whole log asked for); its first line is then only the end of a line.
    if start > 0 && !holds_lines(&window, lines) {
        let whole_lines = match text.find('\n') {
            Some(at) if at + 1 < text.len() => &text[at + 1..],
            // One line longer than the bound: its end is all there is to show.
            _ => &text[..],
        };
        return Ok((log_cut_note() + whole_lines, len));
    }
    Ok((tail(&text, lines).to_string(), len))
}

/// Whether `window`, the end of a log, holds `lines` whole lines (besides the final
/// line break); `None` asks for the whole log, which only the file's start ends.
fn holds_lines(window: &[u8], lines: Option<u32>) -> bool {
    let Some(lines) = lines else { return false };
    let body = window.strip_suffix(b"\n").unwrap_or(window);
    body.iter().filter(|&&b| b == b'\n').count() >= lines as usize
}

/// The last `lines` lines of `text` (all of it for `None`).
fn tail(text: &str, lines: Option<u32>) -> &str {
    let Some(lines) = lines else { return text };
    let trimmed = text.strip_suffix('\n').unwrap_or(text);
    match trimmed
        .rmatch_indices('\n')
        .nth(lines.saturating_sub(1) as usize)
    {
        Some((at, _)) if lines > 0 => &text[at + 1..],
        _ if lines == 0 => "",
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launcher::MAX_LOG_BYTES;

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", Some(2)), "b\nc\n");
        assert_eq!(tail("a\nb\nc", Some(2)), "b\nc");
        assert_eq!(tail("a\nb\n", Some(5)), "a\nb\n");
        assert_eq!(tail("a\nb\n", None), "a\nb\n");
        assert_eq!(tail("a\nb\n", Some(0)), "");
    }

    /// Writes `lines` lines of `line_bytes` bytes each (the last byte a line break, the
    /// first ones the line's number), a megabyte at a time.
    fn write_log(path: &Path, lines: usize, line_bytes: usize) {
        use std::io::Write;
        let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
        for n in 0..lines {
            let mut line = format!("{n:08}");
            line.extend(std::iter::repeat_n('x', line_bytes - line.len() - 1));
            line.push('\n');
            file.write_all(line.as_bytes()).unwrap();
        }
        file.flush().unwrap();
    }

    /// Issue 15: a worker printed one 300 MB line and `?tail=500` answered all of it,
    /// taking the scaler from 20 MB to 606 MB. Each row: a log, the lines asked for,
    /// whether the answer is cut, and what it ends with.
    #[test]
    fn a_log_answer_is_bounded_in_bytes_as_well_as_lines() {
        let dir = tempfile::tempdir().unwrap();
        let limit = MAX_LOG_BYTES as usize;
        // name, lines, bytes per line, tail, cut, ends with
        type Case = (&'static str, usize, usize, Option<u32>, bool, &'static str);
        let cases: Vec<Case> = vec![
            (
                "one 50 MB line, last 500 lines",
                1,
                50 << 20,
                Some(500),
                true,
                "xx\n",
            ),
            ("one 50 MB line, whole log", 1, 50 << 20, None, true, "xx\n"),
            (
                "500 lines of 10 KiB: only the last ~100 fit",
                500,
                10 << 10,
                Some(500),
                true,
                "\n",
            ),
            (
                "1,000 short lines, last 500",
                1_000,
                20,
                Some(500),
                false,
                "\n",
            ),
            ("a small log, whole", 3, 20, None, false, "\n"),
        ];
        for (name, lines, line_bytes, tail_lines, cut, ends_with) in cases {
            let path = dir.path().join("worker.log");
            write_log(&path, lines, line_bytes);
            let (answer, _) = read_tail(&path, tail_lines, MAX_LOG_BYTES).unwrap();
            assert!(
                answer.len() <= limit + log_cut_note().len(),
                "{name}: {} bytes",
                answer.len()
            );
            assert_eq!(answer.starts_with(&log_cut_note()), cut, "{name}");
            assert!(answer.ends_with(ends_with), "{name}");
            let body = answer.strip_prefix(&log_cut_note()).unwrap_or(&answer);
            if lines > 1 {
                assert!(
                    body.lines().all(|l| l.len() == line_bytes - 1),
                    "{name}: whole lines only"
                );
            }
        }
        write_log(&dir.path().join("short.log"), 1_000, 20);
        let (last, _) = read_tail(&dir.path().join("short.log"), Some(500), MAX_LOG_BYTES).unwrap();
        assert_eq!(last.lines().count(), 500);
        assert!(last.starts_with("00000500x"), "{}", &last[..20]);
        assert_eq!(
            read_tail(&dir.path().join("short.log"), Some(0), MAX_LOG_BYTES)
                .unwrap()
                .0,
            ""
        );
    }
}
