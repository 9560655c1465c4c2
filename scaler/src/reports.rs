//! What the workers and the producer last said: each worker's latest report and when
//! it arrived, and when each job type's latest batch announcement arrived.
//!
//! The one owner of these facts: the bus writes them as they arrive, the tick reads
//! them to decide, the board reads them to show the job table. Arrival times are the
//! scaler's own clock, so a report's age never depends on a worker's clock.

use std::{collections::HashMap, sync::Mutex, time::Instant};

use spillway_common::events::WorkerReport;

#[derive(Default)]
pub struct Reports {
    latest: Mutex<HashMap<String, (WorkerReport, Instant)>>,
    batches: Mutex<HashMap<String, Instant>>,
}

impl Reports {
    pub fn record(&self, report: WorkerReport, at: Instant) {
        self.latest
            .lock()
            .expect("reports lock")
            .insert(report.worker.clone(), (report, at));
    }

    /// The latest report of `worker` and when it arrived.
    pub fn get(&self, worker: &str) -> Option<(WorkerReport, Instant)> {
        self.latest
            .lock()
            .expect("reports lock")
            .get(worker)
            .cloned()
    }

    /// Forgets workers no longer known to the launcher.
    pub fn retain(&self, known: impl Fn(&str) -> bool) {
        self.latest
            .lock()
            .expect("reports lock")
            .retain(|name, _| known(name));
    }

    /// Records that a batch of `job_type` was announced at `at`.
    pub fn record_batch(&self, job_type: &str, at: Instant) {
        self.batches
            .lock()
            .expect("batches lock")
            .insert(job_type.to_string(), at);
    }

    /// When the producer's latest announcement of a batch of `job_type` arrived: rows
    /// the management API may not count yet.
    pub fn last_batch_published(&self, job_type: &str) -> Option<Instant> {
        self.batches
            .lock()
            .expect("batches lock")
            .get(job_type)
            .copied()
    }
}
