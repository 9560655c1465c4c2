//! Ingest: an upload stream becomes validated rows on disk, then confirmed messages.
//!
//! Two phases keep both promises the producer makes. First the body is streamed
//! through the strict checks and the CSV parser into a spool file of ready-to-send
//! message bodies: memory stays flat whatever the file size, and the whole file is
//! validated before anything is published, so a rejected upload publishes nothing.
//! Then the spool is replayed to RabbitMQ with publisher confirms, keeping a window
//! of confirms in flight (waiting for each one would cap throughput at a few hundred
//! rows a second), and the upload is answered only once every row is confirmed.

use std::{
    collections::VecDeque,
    io::{self, BufWriter, Read, Seek, Write},
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
};

use bytes::{Buf, Bytes};
use futures_util::{Stream, StreamExt};
use lapin::{Channel, Confirmation, PublisherConfirm, options::BasicPublishOptions};
use spillway_common::envelope::{RowMessageRef, message_id, row_properties};
use tokio::{
    io::{AsyncReadExt, BufReader},
    sync::mpsc,
};

use crate::strict::{StrictError, StrictReader};

/// Bounds on what one upload may contain.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_upload_bytes: u64,
    pub max_row_bytes: usize,
    pub max_columns: usize,
}

/// Who the rows belong to.
#[derive(Debug, Clone)]
pub struct BatchInfo {
    pub batch_id: String,
    pub job_type: String,
}

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

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Rejected(#[from] Rejection),
    #[error("cannot write the spool file: {0}")]
    Spool(#[from] io::Error),
}

/// Validated rows of one upload, encoded as message bodies in a temporary file that
/// disappears when this is dropped.
#[derive(Debug)]
pub struct Spool {
    file: std::fs::File,
    pub rows: u64,
}

/// Most bytes handed to the parser in one piece. Chunks arrive as large as the
/// connection had buffered (half a megabyte is common); cut into pieces, the channel's
/// few slots bound the bytes waiting for the parser whatever size chunks come in.
const PIECE_BYTES: usize = 64 * 1024;

/// Streams `body` through validation into a spool file in `dir`.
///
/// The parser is synchronous, so it runs on a blocking thread fed through a small
/// bounded channel: a slow parser slows the upload down instead of buffering it.
pub async fn spool_upload<S>(
    mut body: S,
    batch: BatchInfo,
    limits: Limits,
    dir: &Path,
) -> Result<Spool, IngestError>
where
    S: Stream<Item = Result<Bytes, Rejection>> + Unpin,
{
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let dir = dir.to_path_buf();
    let parser = tokio::task::spawn_blocking(move || {
        spool_rows(ChannelReader::new(rx), &batch, &limits, &dir)
    });

    let mut received: u64 = 0;
    let mut stream_error = None;
    'body: while let Some(chunk) = body.next().await {
        let mut chunk = match chunk {
            Ok(chunk) => chunk,
            Err(rejection) => {
                stream_error = Some(rejection);
                break;
            }
        };
        received += chunk.len() as u64;
        if received > limits.max_upload_bytes {
            stream_error = Some(Rejection::TooLarge {
                limit: limits.max_upload_bytes,
            });
            break;
        }
        while !chunk.is_empty() {
            let piece = chunk.split_to(chunk.len().min(PIECE_BYTES));
            if tx.send(piece).await.is_err() {
                // The parser stopped early: it has found a problem and will report it.
                break 'body;
            }
        }
    }
    drop(tx);
    let parsed = parser
        .await
        .map_err(|e| IngestError::Spool(io::Error::other(e)))?;
    match stream_error {
        Some(rejection) => Err(rejection.into()),
        None => parsed,
    }
}

/// Parses and validates CSV from `input`, writing one encoded message per data row.
pub fn spool_rows(
    input: impl Read,
    batch: &BatchInfo,
    limits: &Limits,
    dir: &Path,
) -> Result<Spool, IngestError> {
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

    let mut out = BufWriter::with_capacity(256 * 1024, tempfile::tempfile_in(dir)?);
    let mut record = csv::StringRecord::new();
    let mut body = Vec::with_capacity(1024);
    let mut rows = 0;
    loop {
        let more = reader.read_record(&mut record);
        let line = reader.get_mut().take_row_start().unwrap_or(0);
        if !more.map_err(|e| classify(e, line))? {
            break;
        }
        rows += 1;
        body.clear();
        let message = RowMessageRef {
            batch_id: &batch.batch_id,
            job_type: &batch.job_type,
            line,
            row: rows,
            headers: &headers,
            fields: Fields(&record),
        };
        serde_json::to_writer(&mut body, &message).map_err(io::Error::other)?;
        out.write_all(&line.to_le_bytes())?;
        out.write_all(&(body.len() as u32).to_le_bytes())?;
        out.write_all(&body)?;
    }
    if rows == 0 {
        return Err(Rejection::HeaderOnly.into());
    }
    let mut file = out.into_inner().map_err(io::IntoInnerError::into_error)?;
    file.rewind()?;
    Ok(Spool { file, rows })
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
    let mut seen = std::collections::HashMap::with_capacity(headers.len());
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

/// A parsed row's fields serialised as a JSON array, without copying them.
struct Fields<'a>(&'a csv::StringRecord);

impl serde::Serialize for Fields<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter())
    }
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

/// Why publishing stopped before every row was confirmed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("lost the RabbitMQ connection after {published} rows were confirmed: {source}")]
    Broker {
        published: u64,
        source: lapin::Error,
    },
    #[error("RabbitMQ refused the row on line {line} (nack) after {published} rows were confirmed")]
    Refused { published: u64, line: u64 },
    #[error(
        "the row on line {line} could not be routed to its queue after {published} rows were confirmed"
    )]
    Unroutable { published: u64, line: u64 },
    #[error("cannot read the spool file: {0}")]
    Spool(#[from] io::Error),
}

/// How often a row the broker nacks is sent again before the batch fails. A nack
/// means the broker did not take the row (a quorum queue electing a leader, say),
/// so sending it again cannot duplicate it.
const NACK_RETRIES: u32 = 3;

/// Bytes of unconfirmed bodies kept for resending, whatever `window` allows: wide rows
/// must not multiply into gigabytes of memory.
const MAX_IN_FLIGHT_BYTES: usize = 16 << 20;

/// A row sent and not yet confirmed.
struct InFlight {
    line: u64,
    body: Vec<u8>,
    confirm: PublisherConfirm,
}

/// Publishes every spooled row to `queue` on `channel` (which must have confirms
/// enabled), with at most `window` confirms outstanding. `confirmed` is advanced as
/// confirms arrive, so progress can be watched while a large batch is sent.
pub async fn publish(
    spool: Spool,
    channel: &Channel,
    batch_id: &str,
    queue: &str,
    window: usize,
    confirmed: &AtomicU64,
) -> Result<u64, PublishError> {
    let publisher = Publisher {
        channel,
        batch_id,
        queue,
        confirmed,
    };
    let mut input = BufReader::with_capacity(256 * 1024, tokio::fs::File::from_std(spool.file));
    let mut pending: VecDeque<InFlight> = VecDeque::with_capacity(window);
    let mut pending_bytes = 0;
    for _ in 0..spool.rows {
        while pending.len() > 1 && pending_bytes > MAX_IN_FLIGHT_BYTES {
            let oldest = pending.pop_front().expect("more than one in flight");
            pending_bytes -= oldest.body.len();
            publisher.settle(oldest).await?;
        }
        // Reuse the buffer of the row about to be settled for the next one. A new one
        // is sized by the row read into it: a window of small rows stays small.
        let mut body = if pending.len() == window {
            let oldest = pending.pop_front().expect("window is full");
            pending_bytes -= oldest.body.len();
            publisher.settle(oldest).await?
        } else {
            Vec::new()
        };
        let line = input.read_u64_le().await?;
        let len = input.read_u32_le().await? as usize;
        body.resize(len, 0);
        input.read_exact(&mut body).await?;
        let confirm = publisher.send(line, &body).await?;
        pending_bytes += body.len();
        pending.push_back(InFlight {
            line,
            body,
            confirm,
        });
    }
    while let Some(oldest) = pending.pop_front() {
        publisher.settle(oldest).await?;
    }
    Ok(confirmed.load(Ordering::Relaxed))
}

struct Publisher<'a> {
    channel: &'a Channel,
    batch_id: &'a str,
    queue: &'a str,
    confirmed: &'a AtomicU64,
}

impl Publisher<'_> {
    async fn send(&self, line: u64, body: &[u8]) -> Result<PublisherConfirm, PublishError> {
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        self.channel
            .basic_publish(
                "".into(),
                self.queue.into(),
                options,
                body,
                row_properties(&message_id(self.batch_id, line)),
            )
            .await
            .map_err(|source| PublishError::Broker {
                published: self.confirmed.load(Ordering::Relaxed),
                source,
            })
    }

    /// Waits for a row's confirm, sending it again if nacked; returns its buffer.
    async fn settle(&self, mut row: InFlight) -> Result<Vec<u8>, PublishError> {
        let mut nacks = 0;
        loop {
            let published = self.confirmed.load(Ordering::Relaxed);
            match row.confirm.await {
                Ok(Confirmation::Ack(None)) => {
                    self.confirmed.fetch_add(1, Ordering::Relaxed);
                    return Ok(row.body);
                }
                Ok(Confirmation::Ack(Some(_))) => {
                    return Err(PublishError::Unroutable {
                        published,
                        line: row.line,
                    });
                }
                Ok(Confirmation::Nack(_) | Confirmation::NotRequested) if nacks < NACK_RETRIES => {
                    nacks += 1;
                    tracing::warn!(
                        line = row.line,
                        nacks,
                        "RabbitMQ nacked a row; sending it again"
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(100 * u64::from(nacks)))
                        .await;
                    row.confirm = self.send(row.line, &row.body).await?;
                }
                Ok(Confirmation::Nack(_) | Confirmation::NotRequested) => {
                    return Err(PublishError::Refused {
                        published,
                        line: row.line,
                    });
                }
                Err(source) => return Err(PublishError::Broker { published, source }),
            }
        }
    }
}

/// A blocking [`Read`] over chunks arriving on a channel; the end of the channel is
/// the end of the input.
struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl ChannelReader {
    fn new(rx: mpsc::Receiver<Bytes>) -> Self {
        ChannelReader {
            rx,
            current: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spillway_common::envelope::RowMessage;

    const LIMITS: Limits = Limits {
        max_upload_bytes: 1 << 20,
        max_row_bytes: 1024,
        max_columns: 4,
    };

    fn batch() -> BatchInfo {
        BatchInfo {
            batch_id: "b".into(),
            job_type: "default".into(),
        }
    }

    fn spooled(input: &[u8]) -> Result<Vec<RowMessage>, Rejection> {
        let spool = match spool_rows(input, &batch(), &LIMITS, &std::env::temp_dir()) {
            Ok(spool) => spool,
            Err(IngestError::Rejected(r)) => return Err(r),
            Err(e) => panic!("unexpected {e}"),
        };
        let mut file = spool.file;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).unwrap();
        let mut rest = &bytes[..];
        let mut rows = Vec::new();
        while !rest.is_empty() {
            let line = u64::from_le_bytes(rest[..8].try_into().unwrap());
            let len = u32::from_le_bytes(rest[8..12].try_into().unwrap()) as usize;
            let row: RowMessage = serde_json::from_slice(&rest[12..12 + len]).unwrap();
            assert_eq!(row.line, line);
            rows.push(row);
            rest = &rest[12 + len..];
        }
        assert_eq!(rows.len() as u64, spool.rows);
        Ok(rows)
    }

    #[test]
    fn lines_are_counted_alike_for_lf_and_crlf() {
        for newline in ["\n", "\r\n"] {
            let input = ["a", "1", "", "2", "3"].join(newline) + newline;
            let rows = spooled(input.as_bytes()).unwrap();
            let lines: Vec<_> = rows.iter().map(|r| (r.line, r.row)).collect();
            assert_eq!(lines, [(2, 1), (4, 2), (5, 3)], "{newline:?}");
        }
        assert_eq!(
            spooled(b"a,b\r\n1,2\r\n3\r\n"),
            Err(Rejection::RaggedRow {
                line: 3,
                expected: 2,
                found: 1
            })
        );
    }

    #[test]
    fn rows_keep_their_lines_fields_and_positions() {
        let rows = spooled(b"\xEF\xBB\xBFa,b\r\n\"x\r\ny\",2\r\n3,\"4,5\"\r\n").unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].headers, ["a", "b"]);
        assert_eq!(rows[0].fields, ["x\r\ny", "2"]);
        assert_eq!((rows[0].line, rows[0].row), (2, 1));
        assert_eq!(rows[1].fields, ["3", "4,5"]);
        assert_eq!((rows[1].line, rows[1].row), (4, 2));
    }

    #[tokio::test]
    async fn a_chunk_larger_than_a_piece_arrives_whole() {
        let mut csv = String::from("n\n");
        for n in 0..40_000 {
            csv.push_str(&format!("{n}\n"));
        }
        assert!(csv.len() > 2 * PIECE_BYTES);
        let body = futures_util::stream::iter([Ok(Bytes::from(csv))]);
        let spool = spool_upload(body, batch(), LIMITS, &std::env::temp_dir())
            .await
            .expect("a valid upload");
        assert_eq!(spool.rows, 40_000);
    }

    #[test]
    fn each_bad_file_gets_its_rejection() {
        let cases: [(&[u8], Rejection); 9] = [
            (b"", Rejection::EmptyFile),
            (b"a,b\n", Rejection::HeaderOnly),
            (
                b"a,b\n1,2\n3\n",
                Rejection::RaggedRow {
                    line: 3,
                    expected: 2,
                    found: 1,
                },
            ),
            (b"a,b\n1,\xff\n", Rejection::NotUtf8 { line: 2 }),
            (
                b"a,b,c,d,e\n1,2,3,4,5\n",
                Rejection::TooManyColumns { count: 5, limit: 4 },
            ),
            (b"a, ,c\n1,2,3\n", Rejection::UnnamedColumn { column: 2 }),
            (
                b"a,b,a\n1,2,3\n",
                Rejection::DuplicateColumn {
                    name: "a".into(),
                    first: 1,
                    second: 3,
                },
            ),
            (b"\n\r\n\n", Rejection::EmptyFile),
            (
                b"a,b\n1,\"2\n",
                Rejection::Strict(StrictError::Unterminated { line: 2 }),
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(spooled(input), Err(expected), "{input:?}");
        }
    }
}
