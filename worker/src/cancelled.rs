//! Which batches are cancelled, asked of the ledger at most once a second per batch:
//! a worker acks a cancelled batch's rows without running them (the ledger has them
//! as `cancelled` already).
//!
//! One question is in flight at a time: rows arriving while the ledger is being asked
//! wait for its answer instead of each asking again. (Two hundred rows in hand asking
//! at once had each worker open all its connections to PostgreSQL, a tenth of the
//! rows' ledger queries in the end-to-end benchmark.)

use std::{collections::HashMap, future::Future, time::Duration};

use spillway_ledger::{BatchState, Ledger};
use tokio::{sync::Mutex, time::Instant};

/// How long a batch's "not cancelled" is believed before the ledger is asked again.
const FRESH: Duration = Duration::from_secs(1);

/// Batches remembered at most; the oldest answers are forgotten beyond it.
const REMEMBERED: usize = 1024;

/// Where a batch's state is asked: the ledger, or a test's stand-in.
pub(crate) trait BatchStates: Send + Sync {
    /// Whether `batch_id` is cancelled. When it cannot say, it is not: the row runs,
    /// and its outcome is not recorded over `cancelled` if it was.
    fn is_cancelled(&self, batch_id: &str) -> impl Future<Output = bool> + Send;
}

impl BatchStates for Ledger {
    async fn is_cancelled(&self, batch_id: &str) -> bool {
        matches!(
            self.batch_state(batch_id).await,
            Ok(Some(BatchState::Cancelled))
        )
    }
}

pub(crate) struct CancelledBatches<S = Ledger> {
    states: S,
    /// Per batch: cancelled or not, and when it was asked. Held while asking.
    known: Mutex<HashMap<String, (bool, Instant)>>,
}

impl<S: BatchStates> CancelledBatches<S> {
    pub fn new(states: S) -> Self {
        CancelledBatches {
            states,
            known: Mutex::default(),
        }
    }

    /// Whether `batch_id` is cancelled, as last asked.
    pub async fn is_cancelled(&self, batch_id: &str) -> bool {
        let mut known = self.known.lock().await;
        if let Some((cancelled, at)) = known.get(batch_id)
            && (*cancelled || at.elapsed() < FRESH)
        {
            return *cancelled;
        }
        let cancelled = self.states.is_cancelled(batch_id).await;
        if known.len() >= REMEMBERED {
            let cutoff = Instant::now() - FRESH;
            known.retain(|_, (cancelled, at)| *cancelled && *at > cutoff);
        }
        known.insert(batch_id.to_string(), (cancelled, Instant::now()));
        cancelled
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    };

    use super::*;

    /// Counts the questions; answers slowly, as a busy database would.
    #[derive(Default)]
    struct Asked {
        questions: AtomicUsize,
        cancelled: AtomicBool,
    }

    impl BatchStates for Arc<Asked> {
        async fn is_cancelled(&self, _batch_id: &str) -> bool {
            self.questions.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(5)).await;
            self.cancelled.load(Ordering::Relaxed)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn rows_arriving_together_ask_once_and_again_only_once_the_answer_is_stale() {
        let asked = Arc::new(Asked::default());
        let batches = Arc::new(CancelledBatches::new(Arc::clone(&asked)));
        let rows = |n| {
            let tasks: Vec<_> = (0..n)
                .map(|_| {
                    let batches = Arc::clone(&batches);
                    tokio::spawn(async move { batches.is_cancelled("b1").await })
                })
                .collect();
            async move {
                let mut answers = Vec::new();
                for task in tasks {
                    answers.push(task.await.unwrap());
                }
                answers
            }
        };
        assert_eq!(rows(200).await, vec![false; 200]);
        assert_eq!(asked.questions.load(Ordering::Relaxed), 1);

        asked.cancelled.store(true, Ordering::Relaxed);
        assert_eq!(rows(10).await, vec![false; 10], "still fresh");
        assert_eq!(asked.questions.load(Ordering::Relaxed), 1);

        tokio::time::sleep(FRESH).await;
        assert_eq!(rows(200).await, vec![true; 200]);
        assert_eq!(asked.questions.load(Ordering::Relaxed), 2);
        tokio::time::sleep(FRESH).await;
        assert!(batches.is_cancelled("b1").await, "a cancel is for good");
        assert_eq!(asked.questions.load(Ordering::Relaxed), 2);
    }
}
