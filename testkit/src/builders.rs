//! Builders of the messages tests feed to the scaler, so that a test names only the
//! fields its case is about.

use spillway_common::events::{WorkerReport, WorkerState};

/// A report of running worker `worker` of job type `default` on queue `tasks`, with
/// nothing counted and every timestamp at 1 s after the epoch. Set what the test is
/// about with struct update syntax: `WorkerReport { in_flight: 2, ..worker_report("w0") }`.
pub fn worker_report(worker: &str) -> WorkerReport {
    WorkerReport {
        worker: worker.into(),
        job_type: "default".into(),
        queue: "tasks".into(),
        state: WorkerState::Running,
        processed: 0,
        failed: 0,
        dead_lettered: 0,
        skipped: 0,
        in_flight: 0,
        started_unix: 1,
        last_activity_unix: 1,
        sent_unix: 1,
    }
}
