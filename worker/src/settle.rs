//! Settling one delivery: run its row, record its outcome, then ack, requeue or
//! dead-letter it, exactly once.
//!
//! Every delivery is settled in one function, [`settle`]: ack when the handler
//! succeeded; on failure, return it to the queue (the quorum queue counts deliveries)
//! or, on its last allowed attempt or when it is not a row for this worker at all (not
//! a row message, another job type's row, or fields that do not match its headers),
//! publish it to `<queue>.dead` with the reason and then ack it. A row is never dropped
//! and never loops forever; should the worker die mid-row, the broker delivers the row
//! again, and its own delivery limit dead-letters a row that kills workers.
//!
//! A row's outcome (done with its result, failed, dead) is recorded in the ledger
//! ([`crate::record`]) before its delivery is settled: a row is acked only once its
//! outcome is committed, and one whose outcome cannot be recorded goes back to the
//! queue. A redelivered row the ledger already has as done (or dead) is acked without
//! running again: at-least-once delivery, effectively-once results. A row of a
//! cancelled batch is acked without running at all.

use std::{
    panic::AssertUnwindSafe,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures_util::FutureExt;
use lapin::{
    BasicProperties, Channel,
    message::Delivery,
    options::{BasicPublishOptions, BasicRejectOptions},
    types::{AMQPValue, ShortString},
};
use spillway_common::{envelope::RowMessage, topology};
use spillway_ledger::{Ledger, LedgerError, Outcome, RowStatus};

use crate::{
    acks::{Acks, Sent},
    cancelled::CancelledBatches,
    handler::{Handler, RowFailed},
    progress::{Progress, Tally},
    record::{RecordError, RecordObserver, Recorder},
};

/// Why a row was not done.
enum Failure {
    /// The handler failed: retry until the delivery limit.
    Handler(RowFailed),
    /// The message is not a row: no retry can help.
    Poison(String),
}

/// A row as the ledger keys it.
struct RowKey {
    batch_id: String,
    line: u64,
}

/// What a row task needs to settle its delivery.
pub(crate) struct Settler {
    pub recorder: Recorder,
    pub ledger: Ledger,
    /// The job type whose rows this worker runs; any other is not a row for it.
    pub job_type: String,
    pub publisher: Channel,
    pub queue: String,
    pub worker: String,
    pub delivery_limit: u32,
    pub progress: Arc<Progress>,
    pub cancelled: CancelledBatches,
    /// The consuming channel's acks, sent in runs.
    pub acks: Arc<Acks>,
}

impl Settler {
    /// Acks `delivery` with the next run of acks; returns once it is sent.
    async fn ack(&self, delivery: &Delivery) -> Sent {
        self.acks
            .ack(delivery.delivery_tag, delivery.acker.clone())
            .await
    }

    /// Returns `delivery` to the queue, at once.
    async fn requeue(&self, delivery: &Delivery) -> Sent {
        self.acks
            .reject(
                delivery.delivery_tag,
                &delivery.acker,
                BasicRejectOptions { requeue: true },
            )
            .await
    }
}

/// Handles one delivery and settles it.
pub(crate) async fn process(delivery: Delivery, handler: &Handler, settler: &Settler) {
    let started_unix = unix_seconds();
    let row = serde_json::from_slice::<RowMessage>(&delivery.data)
        .map_err(|e| e.to_string())
        .and_then(|row| {
            row.check(&settler.job_type)
                .map(|()| row)
                .map_err(|e| e.to_string())
        });
    let (key, outcome) = match row {
        Ok(row) => {
            if settler.cancelled.is_cancelled(&row.batch_id).await {
                // The ledger has the row as `cancelled` already: nothing to run or record.
                match settler.ack(&delivery).await {
                    Ok(_) => settler.progress.tally(Tally::Skipped),
                    Err(error) => {
                        tracing::warn!(%error, "cannot ack a cancelled row; the broker will redeliver it")
                    }
                }
                return;
            }
            if delivery.redelivered && already_settled(settler, &row).await {
                // Its outcome is committed: running it again would only repeat work.
                if let Err(error) = settler.ack(&delivery).await {
                    tracing::warn!(%error, "cannot ack a row already done; the broker will redeliver it");
                }
                return;
            }
            // A handler that panics fails its row like any other failure: the row is
            // still settled, never left unacked.
            let result = AssertUnwindSafe(handler.handle(&row, &delivery.data))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| Err(RowFailed("the handler panicked".into())));
            tracing::debug!(batch_id = %row.batch_id, line = row.line, ok = result.is_ok(), "row handled");
            let key = RowKey {
                batch_id: row.batch_id,
                line: row.line,
            };
            (Some(key), result.map_err(Failure::Handler))
        }
        // Not counted under the batch it names: that batch may not be this job
        // type's, or not exist at all.
        Err(why) => (
            None,
            Err(Failure::Poison(format!(
                "not a Spillway row message: {why}"
            ))),
        ),
    };
    if let Err(error) = settle(&delivery, key.as_ref(), outcome, started_unix, settler).await {
        // The channel or the ledger is gone; the broker will deliver the row again.
        tracing::warn!(%error, "cannot settle a row; the broker will redeliver it");
    }
}

/// Whether the ledger already has `row` as done or dead. When it cannot say, the row
/// runs: at-least-once.
async fn already_settled(settler: &Settler, row: &RowMessage) -> bool {
    match settler.ledger.row_status(&row.batch_id, row.line).await {
        Ok(Some(status)) => status.is_final(),
        Ok(None) => false,
        Err(error) => {
            tracing::warn!(%error, batch_id = %row.batch_id, line = row.line, "cannot tell whether a redelivered row is done; running it");
            false
        }
    }
}

/// The one place a delivery is acked, returned to the queue or dead-lettered, each
/// after its outcome is recorded.
async fn settle(
    delivery: &Delivery,
    key: Option<&RowKey>,
    outcome: Result<String, Failure>,
    started_unix: f64,
    settler: &Settler,
) -> Result<(), SettleError> {
    let progress = &settler.progress;
    let attempts = delivery_count(&delivery.properties) + 1;
    let record = |status: RowStatus, result: Option<String>, error: Option<&str>| {
        let outcome = key.map(|key| Outcome {
            batch_id: key.batch_id.clone(),
            line: key.line,
            status,
            attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
            error: error.map(String::from),
            result,
            started_unix,
        });
        async move {
            match outcome {
                Some(outcome) => settler.recorder.record(outcome).await,
                None => Ok(()),
            }
        }
    };
    let (reason, retry) = match outcome {
        Ok(result) => {
            if let Err(error) = record(RowStatus::Done, Some(result), None).await {
                settler.requeue(delivery).await?;
                return Err(error.into());
            }
            sent(settler.ack(delivery).await?)?;
            progress.tally(Tally::Processed);
            return Ok(());
        }
        Err(Failure::Handler(RowFailed(reason))) => (reason, true),
        Err(Failure::Poison(reason)) => (reason, false),
    };
    if retry && attempts < u64::from(settler.delivery_limit) {
        tracing::warn!(attempts, limit = settler.delivery_limit, %reason, "row failed; returning it to the queue");
        // Returned either way: a failure not recorded only leaves the row `pending`.
        if let Err(error) = record(RowStatus::Failed, None, Some(&reason)).await {
            tracing::warn!(%error, "cannot record a failed attempt");
        }
        sent(settler.requeue(delivery).await?)?;
        progress.tally(Tally::Failed);
        return Ok(());
    }
    tracing::error!(attempts, %reason, queue = %topology::dead_queue_name(&settler.queue), "row failed for good; dead-lettering it");
    // The copy first: a row recorded dead is one a redelivery will not run again, so
    // its copy must already be safe in `<queue>.dead`.
    let recorded = match dead_letter(delivery, &reason, attempts, settler).await {
        Ok(()) => record(RowStatus::Dead, None, Some(&reason))
            .await
            .map_err(SettleError::from),
        Err(error) => Err(error),
    };
    if let Err(error) = recorded {
        settler.requeue(delivery).await?;
        return Err(error);
    }
    sent(settler.ack(delivery).await?)?;
    progress.tally(Tally::DeadLettered);
    Ok(())
}

fn unix_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The recorder's news, in the worker's log.
pub(crate) struct LogRecords;

impl RecordObserver for LogRecords {
    fn recorded(&self, rows: usize, took: Duration) {
        tracing::debug!(rows, ?took, "outcomes recorded");
    }

    fn unavailable(&self, error: &LedgerError) {
        tracing::warn!(%error, "cannot record outcomes: PostgreSQL is unreachable; rows wait, unacked, until it is back");
    }
}

/// Publishes the row to `<queue>.dead` with why it failed, and waits for the confirm,
/// so the original is acked only once its copy is safe.
async fn dead_letter(
    delivery: &Delivery,
    reason: &str,
    attempts: u64,
    settler: &Settler,
) -> Result<(), SettleError> {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    let mut put = |key: &str, value: AMQPValue| {
        headers.insert(ShortString::from(key), value);
    };
    put("x-spillway-error", AMQPValue::LongString(reason.into()));
    put(
        "x-spillway-worker",
        AMQPValue::LongString(settler.worker.as_str().into()),
    );
    put(
        "x-spillway-attempts",
        AMQPValue::LongLongInt(i64::try_from(attempts).unwrap_or(i64::MAX)),
    );
    let properties: BasicProperties = delivery.properties.clone().with_headers(headers);
    let confirm = settler
        .publisher
        .basic_publish(
            topology::DEAD_LETTER_EXCHANGE.into(),
            topology::dead_queue_name(&settler.queue).as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &delivery.data,
            properties,
        )
        .await?
        .await?;
    match confirm {
        lapin::Confirmation::Ack(None) => Ok(()),
        _ => Err(SettleError::DeadLetterRefused),
    }
}

/// lapin answers `Ok(false)` when an ack or reject could not be sent (its channel is
/// gone): that row was not settled and must not be counted as if it were.
fn sent(was_sent: bool) -> Result<(), SettleError> {
    if was_sent {
        Ok(())
    } else {
        Err(SettleError::NotSent)
    }
}

#[derive(Debug, thiserror::Error)]
enum SettleError {
    #[error(transparent)]
    Broker(#[from] lapin::Error),
    #[error(transparent)]
    Ledger(#[from] RecordError),
    #[error("the channel is gone, so the row could not be settled")]
    NotSent,
    #[error("RabbitMQ did not take the dead-letter copy; the row returns to the queue")]
    DeadLetterRefused,
}

/// Earlier deliveries of this message, as the quorum queue counts them.
fn delivery_count(properties: &BasicProperties) -> u64 {
    let Some(headers) = properties.headers() else {
        return 0;
    };
    match headers.inner().get("x-delivery-count") {
        Some(AMQPValue::LongLongInt(n)) => u64::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongInt(n)) => u64::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongUInt(n)) => u64::from(*n),
        Some(AMQPValue::ShortInt(n)) => u64::try_from(*n).unwrap_or(0),
        Some(AMQPValue::ShortUInt(n)) => u64::from(*n),
        Some(AMQPValue::ShortShortInt(n)) => u64::try_from(*n).unwrap_or(0),
        Some(AMQPValue::ShortShortUInt(n)) => u64::from(*n),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldTable;

    #[test]
    fn delivery_count_reads_the_quorum_header_in_any_integer_width() {
        let with = |value| {
            let mut headers = FieldTable::default();
            headers.insert("x-delivery-count".into(), value);
            BasicProperties::default().with_headers(headers)
        };
        assert_eq!(delivery_count(&BasicProperties::default()), 0);
        assert_eq!(delivery_count(&with(AMQPValue::LongLongInt(3))), 3);
        assert_eq!(delivery_count(&with(AMQPValue::LongInt(2))), 2);
        assert_eq!(delivery_count(&with(AMQPValue::LongString("x".into()))), 0);
    }
}
