//! Which batches are cancelled, asked of the ledger at most once a second per batch:
//! a worker acks a cancelled batch's rows without running them (the ledger has them
//! as `cancelled` already).

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use spillway_ledger::{BatchState, Ledger};

/// How long a batch's "not cancelled" is believed before the ledger is asked again.
const FRESH: Duration = Duration::from_secs(1);

/// Batches remembered at most; the oldest answers are forgotten beyond it.
const REMEMBERED: usize = 1024;

pub(crate) struct CancelledBatches {
    ledger: Ledger,
    /// Per batch: cancelled or not, and when the ledger said so.
    known: Mutex<HashMap<String, (bool, Instant)>>,
}

impl CancelledBatches {
    pub fn new(ledger: Ledger) -> Self {
        CancelledBatches {
            ledger,
            known: Mutex::default(),
        }
    }

    /// Whether `batch_id` is cancelled. When the ledger cannot say, it is not: the row
    /// runs, and its outcome is not recorded over `cancelled` if it was.
    pub async fn is_cancelled(&self, batch_id: &str) -> bool {
        if let Some((cancelled, at)) = self.known.lock().expect("cancelled lock").get(batch_id)
            && (*cancelled || at.elapsed() < FRESH)
        {
            return *cancelled;
        }
        let cancelled = matches!(
            self.ledger.batch_state(batch_id).await,
            Ok(Some(BatchState::Cancelled))
        );
        let mut known = self.known.lock().expect("cancelled lock");
        if known.len() >= REMEMBERED {
            let cutoff = Instant::now() - FRESH;
            known.retain(|_, (cancelled, at)| *cancelled && *at > cutoff);
        }
        known.insert(batch_id.to_string(), (cancelled, Instant::now()));
        cancelled
    }
}
