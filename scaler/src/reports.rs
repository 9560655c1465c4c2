//! What the workers, the producer and operators last said: each worker's latest report
//! and when it arrived, when each job type's latest batch announcement arrived, the
//! rows announced and settled lately ([`News`]), and which job types are paused.
//!
//! An announcement of rows being published, or of a batch published, and a pause or
//! resume also wake the tick ([`Reports::wakes`]): an upload is met with workers at
//! once, not at the next tick.
//!
//! The one owner of these facts: the bus writes them as they arrive, the tick reads
//! them to decide, the board reads them to show the job table. Arrival times are the
//! scaler's own clock, so a report's age never depends on a worker's clock.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

use spillway_common::events::WorkerReport;
use tokio::sync::Notify;

use crate::policy::News;

/// How long announced and settled rows count as news: the management API's figures
/// refresh every 5 s by default and are read up to a tick later.
pub const NEWS_WINDOW: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct Reports {
    latest: Mutex<HashMap<String, (WorkerReport, Instant)>>,
    batches: Mutex<HashMap<String, Instant>>,
    news: Mutex<HashMap<String, Flow>>,
    paused: Mutex<BTreeSet<String>>,
    wake: Notify,
}

/// Rows of one job type announced and settled lately, with when.
#[derive(Default)]
struct Flow {
    announced: VecDeque<(Instant, u64)>,
    settled: VecDeque<(Instant, u64)>,
    /// Rows settled since the scaler started, by every worker's reports.
    settled_ever: u64,
    /// Batches cancelled with rows still in the queue: those rows, and
    /// `settled_ever` when the cancel was heard.
    cancelled: Vec<(u64, u64)>,
}

impl Flow {
    fn forget_before(&mut self, cutoff: Instant) {
        for events in [&mut self.announced, &mut self.settled] {
            while events.front().is_some_and(|(at, _)| *at < cutoff) {
                events.pop_front();
            }
        }
    }
}

/// Rows a report says its worker settled: done, failed, dead-lettered, or skipped
/// (of a cancelled batch).
fn settled(report: &WorkerReport) -> u64 {
    report.processed + report.failed + report.dead_lettered + report.skipped
}

impl Reports {
    /// Records `report`, arrived at `at`. One that changes what its worker holds (rows
    /// in hand, or its state: draining, exited), or the first of a worker, wakes the
    /// tick: a worker that took its last row or left may call for a decision now.
    pub fn record(&self, report: WorkerReport, at: Instant) {
        let mut latest = self.latest.lock().expect("reports lock");
        let previous = latest.get(&report.worker).map(|(r, _)| r);
        let before = previous.map_or(0, settled);
        let changed =
            previous.is_none_or(|r| r.in_flight != report.in_flight || r.state != report.state);
        let moved = settled(&report).saturating_sub(before);
        if moved > 0 {
            self.flow(&report.job_type, at, |flow| {
                flow.settled.push_back((at, moved));
                flow.settled_ever += moved;
            });
        }
        latest.insert(report.worker.clone(), (report, at));
        drop(latest);
        if changed {
            self.wake.notify_one();
        }
    }

    /// Records that `rows` of `job_type` are being published, as of `at`, and wakes
    /// the tick.
    pub fn record_publishing(&self, job_type: &str, rows: u64, at: Instant) {
        self.flow(job_type, at, |flow| flow.announced.push_back((at, rows)));
        self.wake.notify_one();
    }

    /// Rows of `job_type` announced and settled within [`NEWS_WINDOW`] before `now`.
    pub fn news(&self, job_type: &str, now: Instant) -> News {
        let mut news = self.news.lock().expect("news lock");
        let Some(flow) = news.get_mut(job_type) else {
            return News::default();
        };
        flow.forget_before(now.checked_sub(NEWS_WINDOW).unwrap_or(now));
        let sum = |events: &VecDeque<(Instant, u64)>| events.iter().map(|(_, n)| n).sum();
        News {
            announced: sum(&flow.announced),
            settled: sum(&flow.settled),
        }
    }

    /// Records that a batch of `job_type` was cancelled with `rows` still in its queue,
    /// and wakes the tick.
    pub fn record_cancelled(&self, job_type: &str, rows: u64, at: Instant) {
        if rows > 0 {
            self.flow(job_type, at, |flow| {
                let since = flow.settled_ever;
                flow.cancelled.push((rows, since));
            });
        }
        self.wake.notify_one();
    }

    /// Rows of cancelled batches of `job_type` that may still wait in its queue as the
    /// queue figures show it at `now`: each cancelled batch's, less every row settled
    /// since it was cancelled and long enough ago ([`NEWS_WINDOW`]) for the figures to
    /// show it. Rows of other batches settled meanwhile count against it too, so what
    /// it withholds from the policy only ever errs towards spawning.
    pub fn cancelled_in_queue(&self, job_type: &str, now: Instant) -> u64 {
        let mut news = self.news.lock().expect("news lock");
        let Some(flow) = news.get_mut(job_type) else {
            return 0;
        };
        flow.forget_before(now.checked_sub(NEWS_WINDOW).unwrap_or(now));
        let lately: u64 = flow.settled.iter().map(|(_, n)| n).sum();
        let ever = flow.settled_ever.saturating_sub(lately);
        flow.cancelled
            .retain(|(rows, since)| ever.saturating_sub(*since) < *rows);
        flow.cancelled
            .iter()
            .map(|(rows, since)| rows - ever.saturating_sub(*since))
            .sum()
    }

    /// Pauses or resumes `job_type`, and wakes the tick.
    pub fn set_paused(&self, job_type: &str, paused: bool) {
        let mut set = self.paused.lock().expect("paused lock");
        if paused {
            set.insert(job_type.to_string());
        } else {
            set.remove(job_type);
        }
        self.wake.notify_one();
    }

    pub fn is_paused(&self, job_type: &str) -> bool {
        self.paused.lock().expect("paused lock").contains(job_type)
    }

    /// Resolves when an announcement arrived since the last call: time to tick.
    pub async fn wakes(&self) {
        self.wake.notified().await;
    }

    fn flow(&self, job_type: &str, at: Instant, record: impl FnOnce(&mut Flow)) {
        let mut news = self.news.lock().expect("news lock");
        let flow = news.entry(job_type.to_string()).or_default();
        flow.forget_before(at.checked_sub(NEWS_WINDOW).unwrap_or(at));
        record(flow);
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

    /// Records that a batch of `job_type` was announced published at `at`, and wakes
    /// the tick.
    pub fn record_batch(&self, job_type: &str, at: Instant) {
        self.batches
            .lock()
            .expect("batches lock")
            .insert(job_type.to_string(), at);
        self.wake.notify_one();
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

#[cfg(test)]
mod tests {
    use super::*;
    use spillway_common::events::WorkerState;
    use spillway_testkit::builders::worker_report;

    fn settled_by(worker: &str, processed: u64, failed: u64) -> WorkerReport {
        WorkerReport {
            job_type: "default".into(),
            processed,
            failed,
            ..worker_report(worker)
        }
    }

    #[tokio::test]
    async fn a_report_that_changes_what_a_worker_holds_wakes_the_tick_and_a_same_one_does_not() {
        let reports = Reports::default();
        let at = Instant::now();
        let woken = || async {
            tokio::time::timeout(Duration::from_millis(200), reports.wakes())
                .await
                .is_ok()
        };
        let holding = |in_flight, state| WorkerReport {
            in_flight,
            state,
            ..worker_report("w1")
        };
        reports.record(holding(3, WorkerState::Running), at);
        assert!(woken().await, "a worker's first report");
        reports.record(holding(3, WorkerState::Running), at);
        assert!(!woken().await, "nothing changed in its hands");
        reports.record(holding(0, WorkerState::Running), at);
        assert!(woken().await, "it took its last row");
        reports.record(holding(0, WorkerState::Exited), at);
        assert!(woken().await, "it left");
    }

    #[tokio::test]
    async fn news_counts_rows_announced_and_settled_within_the_window_and_wakes_the_tick() {
        let reports = Reports::default();
        let start = Instant::now();
        reports.record_publishing("default", 1_000, start);
        // Announcing woke the tick.
        tokio::time::timeout(Duration::from_secs(1), reports.wakes())
            .await
            .expect("an announcement wakes the tick");
        // Each report counts what moved since the same worker's previous one.
        reports.record(settled_by("w1", 100, 0), start);
        reports.record(settled_by("w1", 250, 10), start + Duration::from_secs(1));
        reports.record(settled_by("w2", 40, 0), start + Duration::from_secs(2));
        assert_eq!(
            reports.news("default", start + Duration::from_secs(3)),
            News {
                announced: 1_000,
                settled: 300
            }
        );
        assert_eq!(
            reports.news("other", start),
            News::default(),
            "news is per job type"
        );
        // Past the window it is no longer news: the queue figures show it by then.
        assert_eq!(
            reports.news("default", start + NEWS_WINDOW + Duration::from_secs(3)),
            News::default()
        );
        // A batch cancelled with 1,000 rows queued: those wait until as many rows are
        // settled (skipped ones included) and the queue figures can show it.
        let cancelled = start + Duration::from_secs(20);
        reports.record_cancelled("default", 1_000, cancelled);
        assert_eq!(reports.cancelled_in_queue("default", cancelled), 1_000);
        let skipped = |n| WorkerReport {
            skipped: n,
            ..settled_by("w2", 40, 0)
        };
        reports.record(skipped(600), cancelled + Duration::from_secs(1));
        let shown = cancelled + Duration::from_secs(2) + NEWS_WINDOW;
        assert_eq!(
            reports.cancelled_in_queue("default", cancelled + Duration::from_secs(2)),
            1_000,
            "the queue figures may not show the skipped rows yet"
        );
        assert_eq!(reports.cancelled_in_queue("default", shown), 400);
        reports.record(skipped(1_100), shown);
        assert_eq!(
            reports.cancelled_in_queue("default", shown + NEWS_WINDOW + Duration::from_secs(1)),
            0
        );
        assert_eq!(reports.cancelled_in_queue("other", shown), 0);
    }
}
