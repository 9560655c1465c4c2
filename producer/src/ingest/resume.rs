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

/// The unpublished rows of a batch, read from the ledger in file order.
struct LedgerRows {
    ledger: Ledger,
    batch_id: String,
    job_type: String,
    header: Vec<String>,
    page: VecDeque<(u64, Vec<String>)>,
    /// File line of the row read last.
    after: u64,
    /// Position among the batch's rows of the row read last.
    position: u64,
}

impl RowSource for LedgerRows {
    async fn next_into(&mut self, body: &mut Vec<u8>) -> io::Result<Option<u64>> {
        if self.page.is_empty() {
            let page = self
                .ledger
                .rows_after(&self.batch_id, self.after, PAGE_ROWS)
                .await
                .map_err(io::Error::other)?;
            self.page.extend(page);
        }
        let Some((line, fields)) = self.page.pop_front() else {
            return Ok(None);
        };
        self.after = line;
        self.position += 1;
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
    let published = publish_batch(
        source,
        channel,
        publication,
        state.publish_window,
        ledger,
        Arc::clone(&state.metrics),
        &state.tasks,
    )
    .await;
    if let Err(error) = published {
        tracing::error!(batch_id = %batch.batch_id, %error, "resumed publication failed");
    }
}
