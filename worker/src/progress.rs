//! What the worker has done so far, and the reports it publishes about it.
//!
//! Counters are updated by the row tasks and read by the reporter, which publishes a
//! [`WorkerReport`] every `PROGRESS_SECONDS` and once more on exit. The scaler and the
//! dashboard read these reports; "work in hand" (`in_flight`) is what keeps the
//! scaler from draining a busy worker.

use std::sync::{
    Mutex,
    atomic::{AtomicU64, Ordering},
};

use lapin::{BasicProperties, Channel, options::BasicPublishOptions};
use spillway_common::events::{
    EVENTS_EXCHANGE, WorkerReport, WorkerState, report_routing_key, unix_now,
};

/// How one row ended, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tally {
    Processed,
    /// Failed and returned to the queue for another attempt.
    Failed,
    /// Failed for good and moved to the dead queue.
    DeadLettered,
    /// A row of a cancelled batch, acked without running it.
    Skipped,
}

/// Live counters of one worker.
pub struct Progress {
    pub worker: String,
    pub job_type: String,
    pub queue: String,
    processed: AtomicU64,
    failed: AtomicU64,
    dead_lettered: AtomicU64,
    skipped: AtomicU64,
    in_flight: AtomicU64,
    started_unix: u64,
    last_activity_unix: AtomicU64,
    state: Mutex<WorkerState>,
}

impl Progress {
    pub fn new(worker: String, job_type: String, queue: String) -> Self {
        let now = unix_now();
        Progress {
            worker,
            job_type,
            queue,
            processed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            started_unix: now,
            last_activity_unix: AtomicU64::new(now),
            state: Mutex::new(WorkerState::Running),
        }
    }

    /// Marks a row as in hand until the returned guard is dropped, however the row's
    /// task ends (settled, aborted on a lost connection, or panicked).
    pub fn row_in_hand(self: &std::sync::Arc<Self>) -> InHand {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        InHand(std::sync::Arc::clone(self))
    }

    /// Rows in hand now.
    pub fn in_hand(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a settled row. (How each batch is doing is the ledger's to say.)
    pub fn tally(&self, tally: Tally) {
        let total = match tally {
            Tally::Processed => &self.processed,
            Tally::Failed => &self.failed,
            Tally::DeadLettered => &self.dead_lettered,
            Tally::Skipped => &self.skipped,
        };
        total.fetch_add(1, Ordering::Relaxed);
    }

    pub fn touch(&self) {
        self.last_activity_unix.store(unix_now(), Ordering::Relaxed);
    }

    pub fn set_state(&self, state: WorkerState) {
        *self.state.lock().expect("state lock") = state;
    }

    pub fn report(&self) -> WorkerReport {
        WorkerReport {
            worker: self.worker.clone(),
            job_type: self.job_type.clone(),
            queue: self.queue.clone(),
            state: *self.state.lock().expect("state lock"),
            processed: self.processed.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            started_unix: self.started_unix,
            last_activity_unix: self.last_activity_unix.load(Ordering::Relaxed),
            sent_unix: unix_now(),
        }
    }

    /// Publishes the current report on the events exchange.
    pub async fn publish(&self, channel: &Channel) -> Result<(), lapin::Error> {
        let report = self.report();
        let body = serde_json::to_vec(&report).expect("a report serialises");
        channel
            .basic_publish(
                EVENTS_EXCHANGE.into(),
                report_routing_key(&self.job_type, &self.worker)
                    .as_str()
                    .into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_content_type("application/json".into()),
            )
            .await?;
        Ok(())
    }
}

/// A row in hand; see [`Progress::row_in_hand`].
pub struct InHand(std::sync::Arc<Progress>);

impl Drop for InHand {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_counted_by_how_they_ended() {
        let progress = Progress::new("w".into(), "default".into(), "tasks".into());
        for tally in [
            Tally::Processed,
            Tally::Failed,
            Tally::DeadLettered,
            Tally::Processed,
            Tally::DeadLettered,
            Tally::Skipped,
        ] {
            progress.tally(tally);
        }
        let report = progress.report();
        assert_eq!(
            (
                report.processed,
                report.failed,
                report.dead_lettered,
                report.skipped
            ),
            (2, 1, 2, 1)
        );
    }

    #[test]
    fn a_row_is_in_hand_until_its_guard_goes() {
        let progress =
            std::sync::Arc::new(Progress::new("w".into(), "default".into(), "tasks".into()));
        let first = progress.row_in_hand();
        let second = progress.row_in_hand();
        assert_eq!(progress.report().in_flight, 2);
        drop(first);
        drop(second);
        assert_eq!(progress.report().in_flight, 0);
    }
}
