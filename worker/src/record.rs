//! Recording rows' outcomes in the ledger before their deliveries are settled.
//!
//! A row is acked only once its outcome is committed, so an outcome is never lost
//! with a worker. One round trip per row would cap a worker at the database's latency,
//! so row tasks hand their outcomes to one [`Recorder`] task, which writes whatever has
//! gathered (up to [`MAX_BATCH`]) in one transaction and answers each row when it is
//! committed: under load, many rows per statement; when idle, no wait at all.
//!
//! While PostgreSQL cannot be reached the recorder keeps trying, on the broker's
//! backoff curve; the rows waiting for it hold their concurrency slots, so the worker
//! takes no new rows, and nothing is acked: the rows wait in RabbitMQ. Once the worker
//! is told to stop, rows whose outcome cannot be recorded are answered with the error,
//! and go back to the queue.

use std::time::{Duration, Instant};

use spillway_common::retry;
use spillway_ledger::{Ledger, LedgerError, Outcome, Recorded};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Most outcomes written in one transaction.
pub const MAX_BATCH: usize = 512;

/// Outcomes waiting to be written, beyond which row tasks wait to hand theirs over.
const QUEUE: usize = 4 * MAX_BATCH;

/// How a row's outcome was recorded.
pub type Committed = Result<(), RecordError>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum RecordError {
    #[error("cannot record the row's outcome: {0}")]
    Ledger(String),
    #[error("the recorder has stopped")]
    Stopped,
}

/// A handle row tasks use to record outcomes.
#[derive(Debug, Clone)]
pub struct Recorder {
    outcomes: mpsc::Sender<(Outcome, oneshot::Sender<Committed>)>,
}

/// What the recorder did, for the worker's progress report and logs.
pub trait RecordObserver: Send + Sync + 'static {
    fn recorded(&self, rows: usize, took: Duration, recorded: Recorded);
    fn unavailable(&self, error: &LedgerError);
}

impl Recorder {
    /// Starts the recorder task writing to `ledger` as `worker`. It runs until every
    /// handle is dropped; once `stop` is cancelled it stops retrying an unreachable
    /// ledger.
    pub fn start(
        ledger: Ledger,
        worker: String,
        stop: CancellationToken,
        observer: impl RecordObserver,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(run(ledger, worker, rx, stop, observer));
        (Recorder { outcomes: tx }, task)
    }

    /// Records `outcome`, returning once it is committed (or cannot be).
    pub async fn record(&self, outcome: Outcome) -> Committed {
        let (tx, rx) = oneshot::channel();
        self.outcomes
            .send((outcome, tx))
            .await
            .map_err(|_| RecordError::Stopped)?;
        rx.await.map_err(|_| RecordError::Stopped)?
    }
}

async fn run(
    ledger: Ledger,
    worker: String,
    mut rx: mpsc::Receiver<(Outcome, oneshot::Sender<Committed>)>,
    stop: CancellationToken,
    observer: impl RecordObserver,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let (outcomes, waiters): (Vec<Outcome>, Vec<oneshot::Sender<Committed>>) =
            batch.drain(..).unzip();
        let committed = write(&ledger, &worker, &outcomes, &stop, &observer).await;
        for waiter in waiters {
            let _ = waiter.send(committed.clone());
        }
    }
}

/// Writes one batch, retrying while the ledger is unreachable and the worker is not
/// stopping.
async fn write(
    ledger: &Ledger,
    worker: &str,
    outcomes: &[Outcome],
    stop: &CancellationToken,
    observer: &impl RecordObserver,
) -> Committed {
    let mut delays = retry::ledger_delays();
    loop {
        let started = Instant::now();
        match ledger.record(worker, outcomes).await {
            Ok(recorded) => {
                observer.recorded(outcomes.len(), started.elapsed(), recorded);
                return Ok(());
            }
            Err(error) if error.is_unavailable() && !stop.is_cancelled() => {
                observer.unavailable(&error);
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stop.cancelled() => {}
                }
            }
            Err(error) => return Err(RecordError::Ledger(error.to_string())),
        }
    }
}
