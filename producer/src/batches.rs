//! What the producer knows about recent batches, for `GET /batches/{id}`.
//!
//! A batch is one upload. Its entry is created when its rows have been validated and
//! updated as confirms arrive, so a client can watch a large batch being published.
//! The producer keeps the most recent entries only (`BATCH_HISTORY`); how far workers
//! have got with a batch is the scaler's to report.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchState {
    Publishing,
    Published,
    Failed,
}

/// One batch as the producer tracks it while publishing.
#[derive(Debug)]
pub struct Batch {
    pub batch_id: String,
    pub job_type: String,
    pub queue: String,
    pub rows: u64,
    pub received_unix: u64,
    pub confirmed: AtomicU64,
    outcome: Mutex<(BatchState, Option<String>)>,
}

/// The JSON shape of a batch.
#[derive(Debug, Serialize)]
pub struct BatchView {
    pub batch_id: String,
    pub job_type: String,
    pub queue: String,
    pub rows: u64,
    pub published: u64,
    pub state: BatchState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub received_unix: u64,
}

impl Batch {
    pub fn new(batch_id: String, job_type: String, queue: String, rows: u64) -> Self {
        let received_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Batch {
            batch_id,
            job_type,
            queue,
            rows,
            received_unix,
            confirmed: AtomicU64::new(0),
            outcome: Mutex::new((BatchState::Publishing, None)),
        }
    }

    pub fn finish(&self, state: BatchState, error: Option<String>) {
        *self.outcome.lock().expect("batch lock") = (state, error);
    }

    pub fn view(&self) -> BatchView {
        let (state, error) = self.outcome.lock().expect("batch lock").clone();
        BatchView {
            batch_id: self.batch_id.clone(),
            job_type: self.job_type.clone(),
            queue: self.queue.clone(),
            rows: self.rows,
            published: self.confirmed.load(Ordering::Relaxed),
            state,
            error,
            received_unix: self.received_unix,
        }
    }
}

/// The most recent batches, oldest forgotten first.
pub struct Batches {
    capacity: usize,
    inner: Mutex<Recent>,
}

#[derive(Default)]
struct Recent {
    by_id: HashMap<String, Arc<Batch>>,
    order: VecDeque<String>,
}

impl Batches {
    pub fn new(capacity: usize) -> Self {
        Batches {
            capacity: capacity.max(1),
            inner: Mutex::default(),
        }
    }

    pub fn insert(&self, batch: Arc<Batch>) {
        let mut recent = self.inner.lock().expect("batches lock");
        if recent.order.len() == self.capacity
            && let Some(oldest) = recent.order.pop_front()
        {
            recent.by_id.remove(&oldest);
        }
        recent.order.push_back(batch.batch_id.clone());
        recent.by_id.insert(batch.batch_id.clone(), batch);
    }

    pub fn get(&self, batch_id: &str) -> Option<Arc<Batch>> {
        self.inner
            .lock()
            .expect("batches lock")
            .by_id
            .get(batch_id)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(id: &str) -> Arc<Batch> {
        Arc::new(Batch::new(id.into(), "default".into(), "tasks".into(), 3))
    }

    #[test]
    fn the_oldest_batch_is_forgotten_first() {
        let batches = Batches::new(2);
        for id in ["a", "b", "c"] {
            batches.insert(batch(id));
        }
        assert!(batches.get("a").is_none());
        assert!(batches.get("b").is_some() && batches.get("c").is_some());
    }

    #[test]
    fn a_view_shows_progress_and_outcome() {
        let b = batch("a");
        b.confirmed.store(2, Ordering::Relaxed);
        assert_eq!(b.view().state, BatchState::Publishing);
        b.finish(BatchState::Failed, Some("broker gone".into()));
        let view = b.view();
        assert_eq!((view.published, view.state), (2, BatchState::Failed));
        assert_eq!(view.error.as_deref(), Some("broker gone"));
    }
}
