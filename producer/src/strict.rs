//! Byte-level checks the `csv` crate does not make.
//!
//! The `csv` parser is lenient: it accepts a quote in the middle of an unquoted field
//! and silently swallows the rest of a file after an unterminated quote. Spillway
//! rejects such files instead of publishing rows the user did not mean, so the bytes
//! pass through [`StrictReader`] on their way to the parser. It enforces RFC 4180
//! quoting, refuses NUL bytes and bounds the size of one row, which also bounds the
//! parser's memory whatever the input. By their first bytes it recognises the files
//! most often uploaded by mistake (compressed, a spreadsheet, UTF-16), so the user is
//! told what the file is instead of where its first odd byte sits.
//!
//! It also notes the line on which each row starts. The parser's own line count is
//! one short after every CRLF terminator, and users fix files by line number.

use std::{
    collections::VecDeque,
    io::{self, Read},
};

/// What made a file invalid, and on which line (1-based).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StrictError {
    #[error(
        "bad quoting: a quote inside an unquoted field (quote the whole field and double the quote)"
    )]
    BareQuote { line: u64 },
    #[error("bad quoting: a closing quote must be followed by a comma or the end of the line")]
    TextAfterQuote { line: u64 },
    #[error("bad quoting: the quoted field that starts here is never closed")]
    Unterminated { line: u64 },
    #[error("the file contains a NUL byte")]
    NulByte { line: u64 },
    #[error("a row is longer than the limit of {limit} bytes (MAX_ROW_BYTES)")]
    RowTooLong { line: u64, limit: usize },
    #[error("{what}")]
    NotCsv { what: &'static str },
}

/// First bytes of files that are not CSV text, and what to tell the user about them.
const NOT_CSV: [(&[u8], &str); 4] = [
    (
        b"\x1f\x8b",
        "the file is gzip-compressed, not CSV text: upload it uncompressed",
    ),
    (
        b"PK\x03\x04",
        "the file is a zip archive (an .xlsx workbook is one), not CSV text: export it as CSV",
    ),
    (
        b"\xff\xfe",
        "the file is UTF-16 text, not UTF-8: save it as UTF-8 CSV",
    ),
    (
        b"\xfe\xff",
        "the file is UTF-16 text, not UTF-8: save it as UTF-8 CSV",
    ),
];

/// Bytes the first check needs to see at once: the longest of the byte-order mark and
/// the [`NOT_CSV`] signatures.
const SNIFF_BYTES: usize = 4;

impl StrictError {
    pub fn line(&self) -> u64 {
        match *self {
            StrictError::BareQuote { line }
            | StrictError::TextAfterQuote { line }
            | StrictError::Unterminated { line }
            | StrictError::NulByte { line }
            | StrictError::RowTooLong { line, .. } => line,
            StrictError::NotCsv { .. } => 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    FieldStart,
    Unquoted,
    Quoted,
    /// Just saw a quote inside a quoted field: either an escaped `""` or the close.
    QuoteInQuoted,
}

/// Passes bytes through unchanged, failing with an [`io::Error`] wrapping a
/// [`StrictError`] at the first violation.
pub struct StrictReader<R> {
    inner: R,
    state: State,
    line: u64,
    row_start_line: u64,
    quote_line: u64,
    row_bytes: usize,
    max_row_bytes: usize,
    at_file_start: bool,
    at_row_start: bool,
    /// Lines on which rows start, for rows the parser has not taken yet.
    row_starts: VecDeque<u64>,
}

impl<R: Read> StrictReader<R> {
    pub fn new(inner: R, max_row_bytes: usize) -> Self {
        StrictReader {
            inner,
            state: State::FieldStart,
            line: 1,
            row_start_line: 1,
            quote_line: 1,
            row_bytes: 0,
            max_row_bytes,
            at_file_start: true,
            at_row_start: true,
            row_starts: VecDeque::new(),
        }
    }

    /// The line on which the next row not yet taken starts. Blank lines are not rows,
    /// as for the parser, so call this once per row (header included) the parser reads.
    pub fn take_row_start(&mut self) -> Option<u64> {
        self.row_starts.pop_front()
    }

    fn check(&mut self, mut bytes: &[u8]) -> Result<(), StrictError> {
        if self.at_file_start && !bytes.is_empty() {
            self.at_file_start = false;
            // `read` makes sure the first check sees the whole signature or mark.
            if let Some((_, what)) = NOT_CSV.iter().find(|(magic, _)| bytes.starts_with(magic)) {
                return Err(StrictError::NotCsv { what });
            }
            // The parser skips a UTF-8 byte-order mark; so must the quote rules.
            bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        }
        for &byte in bytes {
            if self.at_row_start && byte != b'\n' && byte != b'\r' {
                self.at_row_start = false;
                self.row_starts.push_back(self.line);
            }
            self.row_bytes += 1;
            if self.row_bytes > self.max_row_bytes {
                return Err(StrictError::RowTooLong {
                    line: self.row_start_line,
                    limit: self.max_row_bytes,
                });
            }
            self.state = match (self.state, byte) {
                (_, 0) => return Err(StrictError::NulByte { line: self.line }),
                (State::Quoted, b'"') => State::QuoteInQuoted,
                (State::Quoted, b'\n') => {
                    self.line += 1;
                    State::Quoted
                }
                (State::Quoted, _) => State::Quoted,
                (State::QuoteInQuoted, b'"') => State::Quoted,
                (State::FieldStart, b'"') => {
                    self.quote_line = self.line;
                    State::Quoted
                }
                (State::Unquoted, b'"') => return Err(StrictError::BareQuote { line: self.line }),
                (_, b',') => State::FieldStart,
                (_, b'\n') => {
                    self.line += 1;
                    self.end_row();
                    State::FieldStart
                }
                (_, b'\r') => {
                    self.end_row();
                    State::FieldStart
                }
                (State::QuoteInQuoted, _) => {
                    return Err(StrictError::TextAfterQuote { line: self.line });
                }
                (State::FieldStart | State::Unquoted, _) => State::Unquoted,
            };
        }
        Ok(())
    }

    fn end_row(&mut self) {
        self.at_row_start = true;
        self.row_bytes = 0;
        self.row_start_line = self.line;
    }

    fn finish(&self) -> Result<(), StrictError> {
        match self.state {
            State::Quoted => Err(StrictError::Unterminated {
                line: self.quote_line,
            }),
            _ => Ok(()),
        }
    }
}

impl<R: Read> Read for StrictReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut n = self.inner.read(buf)?;
        // Upload chunks can split a byte-order mark or a signature: give the first
        // check (and the parser, which strips the mark only when it sees it whole)
        // enough bytes to recognise them.
        while self.at_file_start && n > 0 && n < SNIFF_BYTES && buf.len() >= SNIFF_BYTES {
            match self.inner.read(&mut buf[n..SNIFF_BYTES])? {
                0 => break,
                more => n += more,
            }
        }
        let verdict = if n == 0 {
            self.finish()
        } else {
            self.check(&buf[..n])
        };
        verdict.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(input: impl Read, max_row_bytes: usize) -> Result<Vec<u8>, StrictError> {
        run(input, max_row_bytes).0
    }

    fn run(input: impl Read, max_row_bytes: usize) -> (Result<Vec<u8>, StrictError>, Vec<u64>) {
        let mut reader = StrictReader::new(input, max_row_bytes);
        let mut out = Vec::new();
        let verdict = match reader.read_to_end(&mut out) {
            Ok(_) => Ok(out),
            Err(e) => Err(e
                .into_inner()
                .and_then(|inner| inner.downcast::<StrictError>().ok())
                .map(|boxed| *boxed)
                .expect("a StrictError")),
        };
        (
            verdict,
            std::iter::from_fn(|| reader.take_row_start()).collect(),
        )
    }

    #[test]
    fn well_formed_files_pass_unchanged() {
        let cases: [&[u8]; 6] = [
            b"a,b\n1,2\n",
            b"a,b\r\n1,2\r\n",
            b"a,b\n\"1,5\",\"say \"\"hi\"\"\"\n",
            b"a,b\n\"multi\nline\",2\n",
            b"\xEF\xBB\xBF\"a\",b\n1,2",
            "名前,値\n東京,é\n".as_bytes(),
        ];
        for input in cases {
            assert_eq!(verdict(input, 1024).as_deref(), Ok(input), "{input:?}");
        }
    }

    #[test]
    fn violations_name_their_line() {
        let cases: [(&[u8], StrictError); 5] = [
            (b"a,b\n1,x\"y\n", StrictError::BareQuote { line: 2 }),
            (b"a,b\n1,\"x\"y\n", StrictError::TextAfterQuote { line: 2 }),
            (
                b"a,b\n1,2\n3,\"open\n4,5\n",
                StrictError::Unterminated { line: 3 },
            ),
            (b"a,b\n1,2\n3,\x004\n", StrictError::NulByte { line: 3 }),
            (
                b"a,b\n1,2\n3,45678901234567\n",
                StrictError::RowTooLong { line: 3, limit: 16 },
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(verdict(input, 16), Err(expected.clone()), "{input:?}");
            assert!(expected.line() > 1);
        }
    }

    #[test]
    fn files_that_are_not_csv_text_are_named() {
        let cases: [(&[u8], &str); 4] = [
            (b"\x1f\x8b\x08\x00\x00\x00", "gzip"),
            (b"PK\x03\x04\x14\x00", "zip archive"),
            (b"\xff\xfea\x00,\x00b\x00", "UTF-16"),
            (b"\xfe\xff\x00a\x00,\x00b", "UTF-16"),
        ];
        for (input, named) in cases {
            match verdict(input, 1024) {
                Err(StrictError::NotCsv { what }) => assert!(what.contains(named), "{what}"),
                other => panic!("{input:?}: {other:?}"),
            }
        }
        // A signature split across reads is still recognised; one inside the file is data.
        let split = (&b"P"[..]).chain(&b"K\x03\x04rest"[..]);
        assert!(matches!(
            verdict(split, 1024),
            Err(StrictError::NotCsv { what }) if what.contains("zip")
        ));
        assert!(verdict(&b"a\nPK\x03\x04\n"[..], 1024).is_ok());
    }

    #[test]
    fn a_quoted_newline_counts_toward_the_line_of_later_rows() {
        let input: &[u8] = b"a,b\n\"x\ny\",1\n2,bad\"\n";
        assert_eq!(
            verdict(input, 1024),
            Err(StrictError::BareQuote { line: 4 })
        );
    }

    #[test]
    fn a_byte_order_mark_split_across_reads_is_still_skipped() {
        let chunks: [&[u8]; 3] = [b"\xEF", b"\xBB", b"\xBF\"a\",b\n1,2\n"];
        let reader = chunks
            .iter()
            .fold(Box::new(io::empty()) as Box<dyn Read>, |acc, c| {
                Box::new(acc.chain(*c))
            });
        let mut strict = StrictReader::new(reader, 1024);
        let mut out = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            match strict.read(&mut buf).expect("valid input") {
                0 => break,
                n => out.extend_from_slice(&buf[..n]),
            }
        }
        assert!(out.starts_with(b"\xEF\xBB\xBF\"a\""));
        let mut csv = csv::Reader::from_reader(&out[..]);
        assert_eq!(csv.headers().unwrap(), vec!["a", "b"]);
    }

    #[test]
    fn row_starts_skip_blank_lines_and_count_quoted_newlines() {
        let input: &[u8] = b"a,b\r\n\r\n\"x\r\ny\",1\r\n2,3\r\n,\n";
        assert_eq!(run(input, 1024).1, [1, 3, 5, 6]);
    }
}
