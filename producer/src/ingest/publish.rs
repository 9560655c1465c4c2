//! Publishing: a spool's rows sent to their queue with windowed publisher confirms.
//!
//! Every row must be confirmed before the upload is answered, but waiting for each
//! confirm before sending the next row would cap throughput at a few hundred rows a
//! second. So up to a window of rows is in flight, their bodies kept until confirmed:
//! a row the broker nacks is sent again from memory, and the count of confirmed rows
//! advances as confirms arrive, so progress can be watched while a large batch is sent.
//!
//! One row in every [`MANDATORY_EVERY`] (the first among them) is published
//! `mandatory`, so that a work queue deleted while its batch is published fails the
//! batch within that many rows instead of having RabbitMQ confirm rows it routed
//! nowhere. Not every row: the rows a deleted queue held are lost with it however soon
//! that is noticed, and checking each made RabbitMQ take rows a quarter slower
//! (BENCHMARKS.md, "a2: where the producer's time went").

use std::{
    collections::VecDeque,
    io,
    sync::atomic::{AtomicU64, Ordering},
};

use lapin::{Channel, Confirmation, PublisherConfirm, options::BasicPublishOptions};
use spillway_common::{
    envelope::{message_id, row_properties},
    retry,
};

/// Where the rows to publish come from: an upload's spool, or the ledger for a batch
/// whose publication is resumed.
pub trait RowSource {
    /// Reads the next row's message body into `body`, replacing what it held, and
    /// returns the file line the row started on; `None` after the last row.
    fn next_into(
        &mut self,
        body: &mut Vec<u8>,
    ) -> impl std::future::Future<Output = io::Result<Option<u64>>> + Send;
}

/// Why publishing stopped before every row was confirmed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("lost the RabbitMQ connection after {published} rows were confirmed: {source}")]
    Broker {
        published: u64,
        source: lapin::Error,
    },
    #[error("RabbitMQ refused the row on line {line} (nack) after {published} rows were confirmed")]
    Refused { published: u64, line: u64 },
    #[error(
        "the work queue is gone: RabbitMQ could not route the row on line {line} to it, after \
         {published} rows were confirmed (the rows it held went with it)"
    )]
    Unroutable { published: u64, line: u64 },
    #[error("cannot read the rows to publish: {0}")]
    Source(#[from] io::Error),
    #[error("the batch was cancelled after {published} rows were confirmed")]
    Cancelled { published: u64 },
}

/// One row in this many is published `mandatory`: how soon a deleted queue is noticed.
const MANDATORY_EVERY: u64 = 100;

/// Bytes of unconfirmed bodies kept for resending, whatever `window` allows: wide rows
/// must not multiply into gigabytes of memory.
const MAX_IN_FLIGHT_BYTES: usize = 16 << 20;

/// A row sent and not yet confirmed.
struct InFlight {
    line: u64,
    body: Vec<u8>,
    confirm: PublisherConfirm,
}

/// Publishes every row of `rows` to `queue` on `channel` (which must have confirms
/// enabled), with at most `window` confirms outstanding. `confirmed` is advanced as
/// confirms arrive, in the order the rows were sent.
pub async fn publish(
    mut rows: impl RowSource,
    channel: &Channel,
    batch_id: &str,
    queue: &str,
    window: usize,
    confirmed: &AtomicU64,
) -> Result<u64, PublishError> {
    let publisher = Publisher {
        channel,
        batch_id,
        queue,
        confirmed,
    };
    let mut pending: VecDeque<InFlight> = VecDeque::with_capacity(window);
    let mut pending_bytes = 0;
    let mut sent: u64 = 0;
    loop {
        while pending.len() > 1 && pending_bytes > MAX_IN_FLIGHT_BYTES {
            let oldest = pending.pop_front().expect("more than one in flight");
            pending_bytes -= oldest.body.len();
            publisher.settle(oldest).await?;
        }
        // Reuse the buffer of the row about to be settled for the next one. A new one
        // is sized by the row read into it: a window of small rows stays small.
        let mut body = if pending.len() == window {
            let oldest = pending.pop_front().expect("window is full");
            pending_bytes -= oldest.body.len();
            publisher.settle(oldest).await?
        } else {
            Vec::new()
        };
        let Some(line) = rows.next_into(&mut body).await? else {
            break;
        };
        let confirm = publisher
            .send(line, &body, sent.is_multiple_of(MANDATORY_EVERY))
            .await?;
        sent += 1;
        pending_bytes += body.len();
        pending.push_back(InFlight {
            line,
            body,
            confirm,
        });
    }
    while let Some(oldest) = pending.pop_front() {
        publisher.settle(oldest).await?;
    }
    Ok(confirmed.load(Ordering::Relaxed))
}

struct Publisher<'a> {
    channel: &'a Channel,
    batch_id: &'a str,
    queue: &'a str,
    confirmed: &'a AtomicU64,
}

impl Publisher<'_> {
    /// Publishes one row; RabbitMQ returns it rather than drop it if `mandatory` and
    /// it cannot be routed.
    async fn send(
        &self,
        line: u64,
        body: &[u8],
        mandatory: bool,
    ) -> Result<PublisherConfirm, PublishError> {
        let options = BasicPublishOptions {
            mandatory,
            ..BasicPublishOptions::default()
        };
        self.channel
            .basic_publish(
                "".into(),
                self.queue.into(),
                options,
                body,
                row_properties(&message_id(self.batch_id, line)),
            )
            .await
            .map_err(|source| PublishError::Broker {
                published: self.confirmed.load(Ordering::Relaxed),
                source,
            })
    }

    /// Waits for a row's confirm, sending it again if nacked; returns its buffer.
    async fn settle(&self, mut row: InFlight) -> Result<Vec<u8>, PublishError> {
        // A nack means the broker did not take the row, so it is sent again on the
        // broker retry policy (a bounded number of times) before the batch fails.
        let mut nack_delays = retry::nack_delays();
        loop {
            let published = self.confirmed.load(Ordering::Relaxed);
            match row.confirm.await {
                Ok(Confirmation::Ack(None)) => {
                    self.confirmed.fetch_add(1, Ordering::Relaxed);
                    return Ok(row.body);
                }
                Ok(Confirmation::Ack(Some(_))) => {
                    return Err(PublishError::Unroutable {
                        published,
                        line: row.line,
                    });
                }
                Ok(Confirmation::Nack(_) | Confirmation::NotRequested) => {
                    let Some(delay) = nack_delays.next() else {
                        return Err(PublishError::Refused {
                            published,
                            line: row.line,
                        });
                    };
                    tracing::warn!(
                        line = row.line,
                        retry_in = ?delay,
                        "RabbitMQ nacked a row; sending it again"
                    );
                    tokio::time::sleep(delay).await;
                    row.confirm = self.send(row.line, &row.body, true).await?;
                }
                Err(source) => return Err(PublishError::Broker { published, source }),
            }
        }
    }
}
