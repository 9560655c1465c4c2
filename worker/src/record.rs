//! Recording rows' outcomes in the ledger before their deliveries are settled.
//!
//! A row is acked only once its outcome is committed, so an outcome is never lost
//! with a worker. One round trip per row would cap a worker at the database's latency,
//! so row tasks hand their outcomes to one [`Recorder`] task, which writes whatever has
//! gathered (up to [`MAX_BATCH`]) in one transaction and answers each row when it is
//! committed.
//!
//! Before it writes, the recorder waits up to [`LINGER`] for more outcomes to join,
//! unless none can: when every one of the worker's `CONCURRENCY` slots holds a row
//! waiting for this write, it writes at once. Without that wait, ten workers sharing
//! one upload were each handed a few rows at a time, committed about 16 outcomes a
//! transaction, and PostgreSQL's cost per commit took a third of the machine.
//!
//! While PostgreSQL cannot be reached the recorder keeps trying, on the broker's
//! backoff curve; the rows waiting for it hold their concurrency slots, so the worker
//! takes no new rows, and nothing is acked: the rows wait in RabbitMQ. Once the worker
//! is told to stop, rows whose outcome cannot be recorded are answered with the error,
//! and go back to the queue.

use std::time::{Duration, Instant};

use spillway_common::retry;
use spillway_ledger::{Ledger, LedgerError, Outcome};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Most outcomes written in one transaction.
pub const MAX_BATCH: usize = 512;

/// Outcomes waiting to be written, beyond which row tasks wait to hand theirs over.
const QUEUE: usize = 4 * MAX_BATCH;

/// Longest a row's outcome waits for others to join its transaction.
const LINGER: Duration = Duration::from_millis(20);

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

/// The worker's rows, as far as the recorder needs them: whether more outcomes can
/// come before it writes those it has.
pub struct Slots {
    /// Rows the worker may hold at once (`CONCURRENCY`).
    pub concurrency: u64,
    /// Rows it holds now.
    pub in_hand: Box<dyn Fn() -> u64 + Send + Sync>,
}

impl Slots {
    /// Whether every slot holds a row and all `waiting` of them wait for the recorder:
    /// no other row can be taken, let alone settled, until they are written.
    fn all_waiting(&self, waiting: usize) -> bool {
        let in_hand = (self.in_hand)();
        in_hand >= self.concurrency && waiting as u64 >= in_hand
    }
}

/// What the recorder did, for the worker's progress report and logs.
pub trait RecordObserver: Send + Sync + 'static {
    fn recorded(&self, rows: usize, took: Duration);
    fn unavailable(&self, error: &LedgerError);
}

impl Recorder {
    /// Starts the recorder task writing to `ledger` as `worker`, whose rows `slots`
    /// tells of. It runs until every handle is dropped; once `stop` is cancelled it
    /// stops retrying an unreachable ledger.
    pub fn start(
        ledger: Ledger,
        worker: String,
        stop: CancellationToken,
        observer: impl RecordObserver,
        slots: Slots,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(run(ledger, worker, rx, stop, observer, slots));
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
    slots: Slots,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        gather(&mut rx, &mut batch, &slots).await;
        let (outcomes, waiters): (Vec<Outcome>, Vec<oneshot::Sender<Committed>>) =
            batch.drain(..).unzip();
        let committed = write(&ledger, &worker, &outcomes, &stop, &observer).await;
        for waiter in waiters {
            let _ = waiter.send(committed.clone());
        }
    }
}

/// Adds to `batch` what arrives within [`LINGER`], until it holds [`MAX_BATCH`] items or
/// every slot of the worker waits for it.
async fn gather<T>(rx: &mut mpsc::Receiver<T>, batch: &mut Vec<T>, slots: &Slots) {
    let deadline = tokio::time::sleep(LINGER);
    tokio::pin!(deadline);
    while batch.len() < MAX_BATCH && !slots.all_waiting(batch.len()) {
        let room = MAX_BATCH - batch.len();
        tokio::select! {
            received = rx.recv_many(batch, room) => if received == 0 { return },
            () = &mut deadline => return,
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
            Ok(()) => {
                observer.recorded(outcomes.len(), started.elapsed());
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

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    };

    use tokio::time::Instant;

    use super::*;

    fn slots(concurrency: u64, in_hand: &Arc<AtomicU64>) -> Slots {
        let in_hand = Arc::clone(in_hand);
        Slots {
            concurrency,
            in_hand: Box::new(move || in_hand.load(Ordering::Relaxed)),
        }
    }

    /// Gathers from `rx`, starting as the recorder does with what has arrived, and says
    /// what it took and how long it waited.
    async fn gathered(rx: &mut mpsc::Receiver<u32>, slots: &Slots) -> (usize, Duration) {
        let started = Instant::now();
        let mut batch = Vec::new();
        rx.recv_many(&mut batch, MAX_BATCH).await;
        gather(rx, &mut batch, slots).await;
        (batch.len(), started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn waits_the_linger_for_rows_yet_to_come() {
        let (tx, mut rx) = mpsc::channel(QUEUE);
        let in_hand = Arc::new(AtomicU64::new(1));
        tx.send(0).await.unwrap();
        let sent = Arc::clone(&in_hand);
        tokio::spawn(async move {
            for row in 1..4 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                sent.fetch_add(1, Ordering::Relaxed);
                tx.send(row).await.unwrap();
            }
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
        assert_eq!(gathered(&mut rx, &slots(200, &in_hand)).await, (4, LINGER));
    }

    #[tokio::test(start_paused = true)]
    async fn writes_at_once_when_every_slot_waits() {
        let (tx, mut rx) = mpsc::channel(QUEUE);
        let in_hand = Arc::new(AtomicU64::new(3));
        for row in 0..3 {
            tx.send(row).await.unwrap();
        }
        let full = slots(3, &in_hand);
        assert_eq!(gathered(&mut rx, &full).await, (3, Duration::ZERO));
        tx.send(3).await.unwrap();
        in_hand.store(1, Ordering::Relaxed);
        assert_eq!(
            gathered(&mut rx, &slots(1, &in_hand)).await,
            (1, Duration::ZERO),
            "a worker of CONCURRENCY 1"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_ends_when_the_last_free_slot_fills_with_a_waiting_row() {
        let (tx, mut rx) = mpsc::channel(QUEUE);
        let in_hand = Arc::new(AtomicU64::new(2));
        tx.send(0).await.unwrap();
        tx.send(1).await.unwrap();
        let sent = Arc::clone(&in_hand);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            sent.fetch_add(1, Ordering::Relaxed);
            tx.send(2).await.unwrap();
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
        assert_eq!(
            gathered(&mut rx, &slots(3, &in_hand)).await,
            (3, Duration::from_millis(5))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_is_written_at_once() {
        let (tx, mut rx) = mpsc::channel(QUEUE);
        let in_hand = Arc::new(AtomicU64::new(MAX_BATCH as u64 + 5));
        for row in 0..MAX_BATCH as u32 + 5 {
            tx.send(row).await.unwrap();
        }
        assert_eq!(
            gathered(&mut rx, &slots(10_000, &in_hand)).await,
            (MAX_BATCH, Duration::ZERO)
        );
    }
}
