//! Folding the outcome log. Workers append rows' outcomes to the ledger's log
//! ([`spillway_ledger::outcomes`]); the producer folds them into the rows and their
//! batches' counts continually, so a batch finishes (and its event and callback go
//! out) within [`FOLD_INTERVAL`] of its last outcome, whether or not anyone reads it.
//! Readers of the ledger fold before they read, so what they show is never behind.
//! Folds take a lock in PostgreSQL: any number of producers may run this.

use std::{sync::Arc, time::Duration};

use spillway_common::retry;
use spillway_ledger::outcomes::FOLD_CHUNK;
use tokio_util::sync::CancellationToken;

use crate::routes::AppState;

/// How long the producer waits between folds of the outcome log.
pub const FOLD_INTERVAL: Duration = Duration::from_millis(100);

/// Folds the outcome log every [`FOLD_INTERVAL`] (at once again while it is busy) until
/// `stop`; while PostgreSQL cannot be reached, on the ledger's backoff curve.
pub async fn run(state: Arc<AppState>, stop: CancellationToken) {
    let mut delays = retry::ledger_delays();
    loop {
        let started = std::time::Instant::now();
        let wait = match state.ledger.fold().await {
            Ok(folded) => {
                delays = retry::ledger_delays();
                if folded.outcomes > 0 {
                    state.metrics.folded(folded.outcomes, started.elapsed());
                    tracing::debug!(?folded, took = ?started.elapsed(), "outcomes folded");
                }
                if folded.unknown > 0 {
                    tracing::warn!(
                        outcomes = folded.unknown,
                        "outcomes of rows the ledger does not hold (a deleted batch?) were dropped"
                    );
                }
                // A fold that took a whole chunk or more found the log busy: fold again
                // at once rather than fall behind.
                if folded.outcomes >= FOLD_CHUNK as u64 {
                    Duration::ZERO
                } else {
                    FOLD_INTERVAL
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot fold rows' outcomes yet; they wait in the ledger's log");
                delays.next().unwrap_or(Duration::from_secs(5))
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}
