//! Ingest: an upload stream becomes validated rows on disk, then confirmed messages.
//!
//! Two phases keep both promises the producer makes. First the body is streamed
//! through the checks of [`validate`] into a [`spool`] file of ready-to-send message
//! bodies: memory stays flat whatever the file size, and the whole file is validated
//! before anything is published, so a rejected upload publishes nothing. Then
//! [`publish`] replays the spool to RabbitMQ with publisher confirms, and the upload
//! is answered only once every row is confirmed. While the body is validated, the
//! ledger records the batch and its rows ([`record_batch`], following the parser
//! through [`tail`]) in one transaction that commits at the end of a valid upload, so
//! the rows are in the ledger before the first is published without waiting for a
//! second pass. This module is the glue between them: it decides where each phase runs
//! (the synchronous parser on a blocking thread, recording and publication in tasks of
//! their own) and what is recorded when a batch ends.

pub mod publish;
pub mod resume;
pub mod spool;
pub mod tail;
pub mod validate;

use std::{
    io::{self, Read},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use backon::Retryable;
use bytes::{Buf, Bytes};
use futures_util::{Stream, StreamExt};
use lapin::Channel;
use spillway_common::{
    events::{BatchPublishing, publishing_routing_key},
    retry,
};
use spillway_ledger::{BatchState, Ledger, LedgerError, NewBatch};
use tokio::sync::mpsc;

use crate::{broker::Broker, routes::AppState};
use publish::{PublishError, RowSource};
use spool::{Spool, SpoolWriter};
use tail::{TailReader, TailWriter};
use validate::{Rejection, Rows};

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

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Rejected(#[from] Rejection),
    #[error("cannot write the spool file: {0}")]
    Spool(#[from] io::Error),
}

/// Most bytes handed to the parser in one piece. Chunks arrive as large as the
/// connection had buffered (half a megabyte is common); cut into pieces, the channel's
/// few slots bound the bytes waiting for the parser whatever size chunks come in.
const PIECE_BYTES: usize = 64 * 1024;

/// Streams `body` through validation into a spool file in `dir`, and into
/// `ledger_rows` for the ledger.
///
/// The parser is synchronous, so it runs on a blocking thread fed through a small
/// bounded channel: a slow parser slows the upload down instead of buffering it.
pub async fn spool_upload<S>(
    mut body: S,
    batch: BatchInfo,
    limits: Limits,
    dir: &Path,
    ledger_rows: TailWriter,
) -> Result<Spool, IngestError>
where
    S: Stream<Item = Result<Bytes, Rejection>> + Unpin,
{
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let dir = dir.to_path_buf();
    let parser = tokio::task::spawn_blocking(move || {
        spool_rows(ChannelReader::new(rx), &batch, &limits, &dir, ledger_rows)
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

/// Parses and validates CSV from `input`, writing one encoded message per data row,
/// and the row for the ledger to `ledger_rows`.
pub fn spool_rows(
    input: impl Read,
    batch: &BatchInfo,
    limits: &Limits,
    dir: &Path,
    ledger_rows: TailWriter,
) -> Result<Spool, IngestError> {
    let (headers, mut rows) = Rows::open(input, limits)?;
    let mut spool = SpoolWriter::create(dir, batch, &headers, ledger_rows)?;
    let mut record = csv::StringRecord::new();
    while let Some(line) = rows.next(&mut record)? {
        spool.push(line, &record)?;
    }
    Ok(spool.finish()?)
}

/// Where a batch's rows come from and go to: what the ledger records beside them.
#[derive(Debug, Clone)]
pub struct BatchFile {
    pub batch_id: String,
    pub job_type: String,
    pub queue: String,
    pub file_name: Option<String>,
    /// Whose batch it is: the uploading token's tenant.
    pub tenant: String,
    pub callback_url: Option<String>,
}

/// Records `batch` and its rows in the ledger as `tail` brings them: committed once
/// the upload is validated to its end, rolled back if it is refused.
pub async fn record_batch(
    ledger: Ledger,
    batch: BatchFile,
    mut tail: TailReader,
) -> Result<(), LedgerError> {
    let Some(header) = tail.header().await else {
        return Err(LedgerError::Input(io::Error::other(
            "the upload was refused before its header was read",
        )));
    };
    let new = NewBatch {
        batch_id: &batch.batch_id,
        job_type: &batch.job_type,
        queue: &batch.queue,
        file_name: batch.file_name.as_deref(),
        header: &header,
        rows: None,
        callback_url: batch.callback_url.as_deref(),
        tenant: &batch.tenant,
    };
    ledger.create_batch(&new, tail.rows()).await
}

/// Why a batch's publication ended before its last confirm.
#[derive(Debug, thiserror::Error)]
pub enum PublicationError {
    /// Publishing stopped after `published` rows were confirmed.
    #[error("{error}")]
    Stopped { error: PublishError, published: u64 },
    /// The publishing task itself died: a bug of ours, not the broker's.
    #[error("the publishing task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A batch being published: which it is, and how many of its rows RabbitMQ has
/// confirmed, from the first.
#[derive(Debug)]
pub struct Publication {
    pub batch_id: String,
    pub job_type: String,
    pub queue: String,
    pub rows: u64,
    pub confirmed: AtomicU64,
}

/// How often a batch's confirmed count is written to the ledger while it is
/// published: the heartbeat that tells other producers it is in hand, and the point a
/// resumed publication starts from.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// Announces the batch, publishes the rows of `rows` through `channel` (which it
/// closes when done), then records the outcome in the ledger (whose outbox announces
/// the batch's new state) and in `metrics`.
///
/// Publishing runs in its own task, tracked by the state's `tasks` so shutdown waits
/// for it, holding `hold` until it ends, and keeps its own books: a client that hangs
/// up mid-way (dropping this future) does not leave a batch half-sent or its state
/// stale.
pub async fn publish_batch(
    rows: impl RowSource + Send + 'static,
    channel: Channel,
    batch: Arc<Publication>,
    state: &AppState,
    hold: impl Send + 'static,
) -> Result<(), PublicationError> {
    let window = state.publish_window;
    let ledger = state.ledger.clone();
    let metrics = Arc::clone(&state.metrics);
    let publishing = state.tasks.spawn(async move {
        // Held, whatever it is, until the batch is published: an upload's slot of its
        // client, which a client hanging up does not free early.
        let _hold = hold;
        let started = Instant::now();
        let already = batch.confirmed.load(Ordering::Relaxed);
        let starting = BatchPublishing {
            batch_id: batch.batch_id.clone(),
            job_type: batch.job_type.clone(),
            queue: batch.queue.clone(),
            rows: batch.rows.saturating_sub(already),
        };
        let key = publishing_routing_key(&batch.job_type);
        Broker::announce(&channel, &key, &batch.batch_id, &starting).await;
        let sending = publish::publish(
            rows,
            &channel,
            &batch.batch_id,
            &batch.queue,
            window,
            &batch.confirmed,
        );
        let result = tokio::select! {
            result = sending => result,
            () = write_progress(&ledger, &batch) => Err(PublishError::Cancelled {
                published: batch.confirmed.load(Ordering::Relaxed),
            }),
        };
        let _ = channel.close(200, "batch published".into()).await;
        let published = batch.confirmed.load(Ordering::Relaxed);
        metrics.rows_published.inc_by(published - already);
        match result {
            Ok(_) => {
                let recorded = (|| ledger.finish_publishing(&batch.batch_id))
                    // PostgreSQL restarting: keep trying for a while; should it take
                    // longer, another producer publishes the rows again (counted once).
                    .retry(retry::broker_backoff(Duration::from_secs(30)))
                    .when(LedgerError::is_unavailable)
                    .await;
                if let Err(error) = recorded {
                    // Every row is published; the batch stays `publishing` in the
                    // ledger, and a producer will publish its rows again (counted once).
                    tracing::error!(batch_id = %batch.batch_id, %error, "cannot record the end of a publication");
                }
                metrics.publish_seconds.observe(started.elapsed().as_secs_f64());
                tracing::info!(batch_id = %batch.batch_id, rows = batch.rows, took = ?started.elapsed(), "batch published");
                Ok(())
            }
            Err(error) => {
                let message = error.to_string();
                if let Err(e) = ledger.fail_publishing(&batch.batch_id, published, &message).await {
                    tracing::error!(batch_id = %batch.batch_id, error = %e, "cannot record a failed publication");
                }
                tracing::error!(batch_id = %batch.batch_id, %error, published, rows = batch.rows, "batch failed");
                Err(PublicationError::Stopped { error, published })
            }
        }
    });
    publishing.await?
}

/// Writes `batch`'s confirmed count to the ledger every [`PROGRESS_INTERVAL`], and
/// ends only when the ledger says the batch was cancelled. A write that fails is
/// logged and tried again at the next tick: publishing goes on, as the rows are
/// already in the ledger.
async fn write_progress(ledger: &Ledger, batch: &Publication) {
    let mut ticks = tokio::time::interval(PROGRESS_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let published = batch.confirmed.load(Ordering::Relaxed);
        if let Err(error) = ledger.set_published(&batch.batch_id, published).await {
            tracing::warn!(batch_id = %batch.batch_id, %error, "cannot record publishing progress");
        }
        if matches!(
            ledger.batch_state(&batch.batch_id).await,
            Ok(Some(BatchState::Cancelled))
        ) {
            tracing::info!(batch_id = %batch.batch_id, published, "batch cancelled: publishing stops");
            return;
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

    /// The messages `input` is spooled as, or why it is refused.
    async fn spooled(input: &[u8]) -> Result<Vec<RowMessage>, Rejection> {
        let dir = std::env::temp_dir();
        let (ledger_rows, _) = tail::pair(&dir).unwrap();
        let spool = match spool_rows(input, &batch(), &LIMITS, &dir, ledger_rows) {
            Ok(spool) => spool,
            Err(IngestError::Rejected(r)) => return Err(r),
            Err(e) => panic!("unexpected {e}"),
        };
        let count = spool.rows;
        let mut reader = spool.into_reader();
        let mut body = Vec::new();
        let mut rows = Vec::new();
        while let Some(line) = reader.next_into(&mut body).await.unwrap() {
            let row: RowMessage = serde_json::from_slice(&body).unwrap();
            assert_eq!(row.line, line);
            rows.push(row);
        }
        assert_eq!(rows.len() as u64, count);
        Ok(rows)
    }

    #[tokio::test]
    async fn lines_are_counted_alike_for_lf_and_crlf() {
        for newline in ["\n", "\r\n"] {
            let input = ["a", "1", "", "2", "3"].join(newline) + newline;
            let rows = spooled(input.as_bytes()).await.unwrap();
            let lines: Vec<_> = rows.iter().map(|r| (r.line, r.row)).collect();
            assert_eq!(lines, [(2, 1), (4, 2), (5, 3)], "{newline:?}");
        }
        assert_eq!(
            spooled(b"a,b\r\n1,2\r\n3\r\n").await,
            Err(Rejection::RaggedRow {
                line: 3,
                expected: 2,
                found: 1
            })
        );
    }

    #[tokio::test]
    async fn rows_keep_their_lines_fields_and_positions() {
        let rows = spooled(b"\xEF\xBB\xBFa,b\r\n\"x\r\ny\",2\r\n3,\"4,5\"\r\n")
            .await
            .unwrap();
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
        let dir = std::env::temp_dir();
        let (ledger_rows, _) = tail::pair(&dir).unwrap();
        let spool = spool_upload(body, batch(), LIMITS, &dir, ledger_rows)
            .await
            .expect("a valid upload");
        assert_eq!(spool.rows, 40_000);
    }
}
