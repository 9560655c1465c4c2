//! Validation: what makes an upload acceptable, and the reason given when it is not.
//!
//! [`Rows`] reads CSV through the byte-level rules of [`StrictReader`] and the `csv`
//! parser, checks the header workers will address fields by, and yields each data row
//! with the file line it starts on. Every way a file can fail is a [`Rejection`], the
//! client's to fix, with the line to look at and a stable label for metrics; anything
//! else that goes wrong is ours, and is kept apart so it is never blamed on the file.

use std::{collections::HashMap, io, io::Read};

use crate::strict::{StrictError, StrictReader};

use super::{IngestError, Limits};

/// Why an upload was refused. Every variant is the client's to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("expected a multipart/form-data upload with a `file` field: {0}")]
    NotMultipart(String),
    #[error("the upload has no multipart field named `file`")]
    MissingFile,
    #[error("the file is empty: it has no header line")]
    EmptyFile,
    #[error("the file has a header but no data rows")]
    HeaderOnly,
    #[error("the upload is larger than the limit of {limit} bytes (MAX_UPLOAD_BYTES)")]
    TooLarge { limit: u64 },
    #[error(
        "the upload stalled: nothing arrived for {seconds} s (BODY_IDLE_TIMEOUT_SECONDS); send it again"
    )]
    BodyIdle { seconds: u64 },
    #[error("the header has {count} columns, more than the limit of {limit} (MAX_COLUMNS)")]
    TooManyColumns { count: usize, limit: usize },
    #[error("column {column} of the header has no name; every column needs one")]
    UnnamedColumn { column: usize },
    #[error(
        "the header names column {name:?} twice (columns {first} and {second}); column names must be unique"
    )]
    DuplicateColumn {
        name: String,
        first: usize,
        second: usize,
    },
    #[error("row has {found} fields but the header has {expected}")]
    RaggedRow {
        line: u64,
        expected: u64,
        found: u64,
    },
    #[error("the file is not valid UTF-8")]
    NotUtf8 { line: u64 },
    #[error("{0}")]
    Strict(StrictError),
}

impl Rejection {
    /// The 1-based file line the problem is on, where there is one.
    pub fn line(&self) -> Option<u64> {
        match self {
            Rejection::RaggedRow { line, .. } | Rejection::NotUtf8 { line } => Some(*line),
            Rejection::TooManyColumns { .. }
            | Rejection::UnnamedColumn { .. }
            | Rejection::DuplicateColumn { .. } => Some(1),
            Rejection::Strict(e) => Some(e.line()),
            _ => None,
        }
    }

    /// A stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::NotMultipart(_) => "not_multipart",
            Rejection::MissingFile => "missing_file",
            Rejection::EmptyFile => "empty_file",
            Rejection::HeaderOnly => "header_only",
            Rejection::TooLarge { .. } => "too_large",
            Rejection::BodyIdle { .. } => "body_idle",
            Rejection::TooManyColumns { .. } => "too_many_columns",
            Rejection::UnnamedColumn { .. } => "unnamed_column",
            Rejection::DuplicateColumn { .. } => "duplicate_column",
            Rejection::RaggedRow { .. } => "ragged_row",
            Rejection::NotUtf8 { .. } => "not_utf8",
            Rejection::Strict(StrictError::NulByte { .. }) => "nul_byte",
            Rejection::Strict(StrictError::RowTooLong { .. }) => "row_too_long",
            Rejection::Strict(StrictError::NotCsv { .. }) => "not_csv",
            Rejection::Strict(_) => "bad_quoting",
        }
    }
}

/// The data rows of a CSV file whose header has been read and accepted.
pub struct Rows<R> {
    reader: csv::Reader<StrictReader<R>>,
    rows: u64,
}

impl<R: Read> Rows<R> {
    /// Reads and checks the header of `input`, returning its names and the rows after it.
    pub fn open(input: R, limits: &Limits) -> Result<(Vec<String>, Self), IngestError> {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(false)
            .from_reader(StrictReader::new(input, limits.max_row_bytes));
        let headers: Vec<String> = reader
            .headers()
            .map_err(|e| classify(e, 1))?
            .iter()
            .map(str::to_owned)
            .collect();
        reader.get_mut().take_row_start();
        if headers.is_empty() {
            return Err(Rejection::EmptyFile.into());
        }
        check_header(&headers, limits.max_columns)?;
        Ok((headers, Rows { reader, rows: 0 }))
    }

    /// Reads the next row into `record` and returns the file line it starts on;
    /// `None` at the end of a file that had at least one row.
    pub fn next(&mut self, record: &mut csv::StringRecord) -> Result<Option<u64>, IngestError> {
        let more = self.reader.read_record(record);
        let line = self.reader.get_mut().take_row_start().unwrap_or(0);
        if more.map_err(|e| classify(e, line))? {
            self.rows += 1;
            Ok(Some(line))
        } else if self.rows == 0 {
            Err(Rejection::HeaderOnly.into())
        } else {
            Ok(None)
        }
    }
}

/// Refuses a header workers could not use: too wide, or with a column that has no
/// name or the name of another. Rows reach workers as names and fields side by side,
/// so a blank or repeated name would make a field unreachable by name.
fn check_header(headers: &[String], max_columns: usize) -> Result<(), Rejection> {
    if headers.len() > max_columns {
        return Err(Rejection::TooManyColumns {
            count: headers.len(),
            limit: max_columns,
        });
    }
    let mut seen = HashMap::with_capacity(headers.len());
    for (i, name) in headers.iter().enumerate() {
        let column = i + 1;
        if name.trim().is_empty() {
            return Err(Rejection::UnnamedColumn { column });
        }
        if let Some(first) = seen.insert(name.as_str(), column) {
            return Err(Rejection::DuplicateColumn {
                name: name.clone(),
                first,
                second: column,
            });
        }
    }
    Ok(())
}

/// Sorts a parser error on the row starting at `line` into the client's fault or ours.
fn classify(error: csv::Error, line: u64) -> IngestError {
    match error.into_kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => Rejection::RaggedRow {
            line,
            expected: expected_len,
            found: len,
        }
        .into(),
        csv::ErrorKind::Utf8 { .. } => Rejection::NotUtf8 { line }.into(),
        csv::ErrorKind::Io(e) => match e.get_ref().and_then(|inner| inner.downcast_ref()) {
            Some(strict) => Rejection::Strict(StrictError::clone(strict)).into(),
            None => IngestError::Spool(e),
        },
        other => IngestError::Spool(io::Error::other(format!("{other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_upload_bytes: 1 << 20,
        max_row_bytes: 1024,
        max_columns: 4,
    };

    /// The file line each row of `input` starts on, or why the file is refused.
    fn validate(input: &[u8]) -> Result<Vec<u64>, Rejection> {
        let verdict = Rows::open(input, &LIMITS).and_then(|(_, mut rows)| {
            let mut record = csv::StringRecord::new();
            let mut lines = Vec::new();
            while let Some(line) = rows.next(&mut record)? {
                lines.push(line);
            }
            Ok(lines)
        });
        match verdict {
            Ok(lines) => Ok(lines),
            Err(IngestError::Rejected(rejection)) => Err(rejection),
            Err(e) => panic!("unexpected {e}"),
        }
    }

    struct Case {
        name: &'static str,
        input: &'static [u8],
        expected: Rejection,
        /// The label it is counted under in `spillway_producer_rejections_total`.
        reason: &'static str,
    }

    #[test]
    fn each_bad_file_gets_its_rejection() {
        let cases = [
            Case {
                name: "nothing at all",
                input: b"",
                expected: Rejection::EmptyFile,
                reason: "empty_file",
            },
            Case {
                name: "blank lines only: they are not rows, so not a header either",
                input: b"\n\r\n\n",
                expected: Rejection::EmptyFile,
                reason: "empty_file",
            },
            Case {
                name: "a header and nothing after it",
                input: b"a,b\n",
                expected: Rejection::HeaderOnly,
                reason: "header_only",
            },
            Case {
                name: "a row one field short, on line 3",
                input: b"a,b\n1,2\n3\n",
                expected: Rejection::RaggedRow {
                    line: 3,
                    expected: 2,
                    found: 1,
                },
                reason: "ragged_row",
            },
            Case {
                name: "a byte that is not UTF-8 on line 2",
                input: b"a,b\n1,\xff\n",
                expected: Rejection::NotUtf8 { line: 2 },
                reason: "not_utf8",
            },
            Case {
                name: "five columns where MAX_COLUMNS is 4",
                input: b"a,b,c,d,e\n1,2,3,4,5\n",
                expected: Rejection::TooManyColumns { count: 5, limit: 4 },
                reason: "too_many_columns",
            },
            Case {
                name: "a header column named only by a space",
                input: b"a, ,c\n1,2,3\n",
                expected: Rejection::UnnamedColumn { column: 2 },
                reason: "unnamed_column",
            },
            Case {
                name: "a header naming `a` in columns 1 and 3",
                input: b"a,b,a\n1,2,3\n",
                expected: Rejection::DuplicateColumn {
                    name: "a".into(),
                    first: 1,
                    second: 3,
                },
                reason: "duplicate_column",
            },
            Case {
                name: "a quote opened on line 2 and never closed",
                input: b"a,b\n1,\"2\n",
                expected: Rejection::Strict(StrictError::Unterminated { line: 2 }),
                reason: "bad_quoting",
            },
            Case {
                name: "a NUL byte in a field on line 2",
                input: b"a,b\n1,\x002\n",
                expected: Rejection::Strict(StrictError::NulByte { line: 2 }),
                reason: "nul_byte",
            },
            Case {
                name: "gzip bytes instead of text",
                input: b"\x1f\x8b\x08\x00\x00\x00",
                expected: Rejection::Strict(StrictError::NotCsv {
                    what: "the file is gzip-compressed, not CSV text: upload it uncompressed",
                }),
                reason: "not_csv",
            },
        ];
        for case in cases {
            let verdict = validate(case.input);
            assert_eq!(verdict, Err(case.expected), "{}", case.name);
            assert_eq!(verdict.unwrap_err().reason(), case.reason, "{}", case.name);
        }
    }

    #[test]
    fn a_row_longer_than_max_row_bytes_is_refused_on_its_line() {
        let long = format!("a,b\n1,2\n3,{}\n", "x".repeat(LIMITS.max_row_bytes));
        assert_eq!(
            validate(long.as_bytes()),
            Err(Rejection::Strict(StrictError::RowTooLong {
                line: 3,
                limit: LIMITS.max_row_bytes,
            }))
        );
    }

    #[test]
    fn each_row_is_given_the_line_it_starts_on() {
        // Line 2 is blank, the quoted field spans lines 3 and 4, line 5 is blank.
        assert_eq!(validate(b"a,b\n\n\"x\ny\",1\n\n2,3\n"), Ok(vec![3, 6]));
    }
}
