//! Resuming publications whose producer stopped: no row of a batch the ledger holds
//! is left unpublished.
//!
//! A batch is in the ledger, all its rows with it, before its first row is published,
//! and the producer publishing it writes its confirmed count as a heartbeat. Every
//! producer looks for batches still `publishing` whose heartbeat stopped (at start,
//! then every `PUBLICATION_STALE_SECONDS`), claims one at a time, and publishes the rows
//! after the confirmed count from the ledger, encoded as the spool would have them.
//! Rows the dead producer sent after its last heartbeat are sent again: at-least-once
//! delivery, and the ledger counts each row once.

use std::{
    collections::VecDeque,
    io,
    sync::{Arc, atomic::AtomicU64},
};

use spillway_common::envelope::RowMessageRef;
use spillway_ledger::{BatchRecord, Ledger};
use tokio_util::sync::CancellationToken;

use super::{Publication, publish::RowSource, publish_batch};
use crate::routes::AppState;

/// Rows read from the ledger a page at a time.
const PAGE_ROWS: u32 = 5_000;

/// Which rows of a batch a [`LedgerRows`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    /// Those after a file line: the rest of an interrupted publication.
    After,
    /// Those a retry listed for publication.
    Retried,
}

/// Rows of a batch read from the ledger in file order, encoded as the spool would
/// have them.
pub(crate) struct LedgerRows {
    which: Which,
    ledger: Ledger,
    batch_id: String,
    job_type: String,
    header: Vec<String>,
    /// Rows read and not yet encoded: line, position among the batch's rows, fields.
    page: VecDeque<(u64, u64, Vec<String>)>,
    /// File line of the row read last.
    after: u64,
    /// Position among the batch's rows of the row read last.
    position: u64,
}

impl RowSource for LedgerRows {
    async fn next_into(&mut self, body: &mut Vec<u8>) -> io::Result<Option<u64>> {
        if self.page.is_empty() {
            match self.which {
                Which::After => {
                    let page = self
                        .ledger
                        .rows_after(&self.batch_id, self.after, PAGE_ROWS)
                        .await
                        .map_err(io::Error::other)?;
                    // The rest of a publication follows the rows before it.
                    let first = self.position;
                    self.page.extend(
                        page.into_iter()
                            .zip(first + 1..)
                            .map(|((line, fields), position)| (line, position, fields)),
                    );
                }
                Which::Retried => {
                    let page = self
                        .ledger
                        .retry_rows_after(&self.batch_id, self.after, PAGE_ROWS)
                        .await
                        .map_err(io::Error::other)?;
                    self.page.extend(page);
                }
            }
        }
        let Some((line, position, fields)) = self.page.pop_front() else {
            return Ok(None);
        };
        self.after = line;
        self.position = position;
        body.clear();
        let message = RowMessageRef {
            batch_id: &self.batch_id,
            job_type: &self.job_type,
            line,
            row: self.position,
            headers: &self.header,
            fields: &fields,
        };
        serde_json::to_writer(&mut *body, &message).map_err(io::Error::other)?;
        Ok(Some(line))
    }
}

impl LedgerRows {
    /// The rows of `batch` a retry listed for publication.
    pub(crate) fn retried(ledger: Ledger, batch: &BatchRecord) -> Self {
        LedgerRows {
            which: Which::Retried,
            ledger,
            batch_id: batch.batch_id.clone(),
            job_type: batch.job_type.clone(),
            header: batch.header.clone(),
            page: VecDeque::new(),
            after: 0,
            position: 0,
        }
    }
}

/// Resumes abandoned publications until `stop`: every `PUBLICATION_STALE_SECONDS`, each
/// batch still `publishing` without a heartbeat is claimed and its remaining rows
/// published. A ledger or broker that cannot be reached is tried again next round.
pub async fn resume_abandoned(state: Arc<AppState>, stop: CancellationToken) {
    let stale = state.publication_stale;
    let mut rounds = tokio::time::interval(stale);
    loop {
        tokio::select! {
            _ = rounds.tick() => {}
            () = stop.cancelled() => return,
        }
        loop {
            match state.ledger.claim_stale_publication(stale).await {
                Ok(Some(batch)) => resume(&state, batch).await,
                Ok(None) => break,
                Err(error) => {
                    tracing::warn!(%error, "cannot look for abandoned publications");
                    break;
                }
            }
        }
    }
}

/// Publishes the rest of `batch`.
async fn resume(state: &Arc<AppState>, batch: BatchRecord) {
    tracing::info!(batch_id = %batch.batch_id, published = batch.published, rows = batch.rows,
        "resuming an abandoned publication");
    let delivery_limit = match state.jobs.job_type(&batch.job_type) {
        Ok(job) => job.delivery_limit,
        Err(error) => {
            let message = format!("cannot resume publishing: {error}");
            tracing::error!(batch_id = %batch.batch_id, %message);
            if let Err(e) = state
                .ledger
                .fail_publishing(&batch.batch_id, batch.published, &message)
                .await
            {
                tracing::error!(batch_id = %batch.batch_id, error = %e, "cannot record a failed publication");
            }
            return;
        }
    };
    let channel = match state
        .broker
        .publishing_channel(&batch.queue, delivery_limit)
        .await
    {
        Ok(channel) => channel,
        Err(error) => {
            // The heartbeat was renewed by the claim: the batch is tried again once it
            // is stale once more.
            tracing::warn!(batch_id = %batch.batch_id, %error, "cannot resume a publication yet");
            return;
        }
    };
    let ledger = state.ledger.clone();
    let after = match ledger.resume_after(&batch.batch_id, batch.published).await {
        Ok(after) => after,
        Err(error) => {
            tracing::warn!(batch_id = %batch.batch_id, %error, "cannot resume a publication yet");
            return;
        }
    };
    let source = LedgerRows {
        which: Which::After,
        ledger: ledger.clone(),
        batch_id: batch.batch_id.clone(),
        job_type: batch.job_type.clone(),
        header: batch.header.clone(),
        page: VecDeque::new(),
        after,
        position: batch.published,
    };
    let publication = Arc::new(Publication {
        batch_id: batch.batch_id.clone(),
        job_type: batch.job_type,
        queue: batch.queue,
        rows: batch.rows,
        confirmed: AtomicU64::new(batch.published),
    });
    let published = publish_batch(source, channel, publication, state, ()).await;
    if let Err(error) = published {
        tracing::error!(batch_id = %batch.batch_id, %error, "resumed publication failed");
    }
}
