//! The one retry policy for reaching the broker, and connecting with it.
//!
//! Brokers restart, quorum queues elect leaders and networks blip; every process
//! retries on the same curve, jittered exponential backoff from 100 ms doubling to
//! 5 s, so a broker coming back is not met by every client at the same instant.
//! Connecting retries for a bounded time, `BROKER_RETRY_SECONDS` (read once, in
//! [`BrokerSettings`](crate::config::BrokerSettings)), then reports a clear error
//! instead of hanging; what follows is each process's own (the producer answers
//! 503, a worker exits, the scaler logs it and starts again). A row the broker nacks
//! is sent again on the same curve, a bounded number of times; PostgreSQL, the
//! ledger, is waited for on the same curve too.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use lapin::{Connection, ConnectionProperties};

/// The curve every broker retry follows; callers bound it by time or by count.
fn curve() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
}

/// Backoff for broker operations, giving up once `budget` has been spent waiting.
pub fn broker_backoff(budget: Duration) -> ExponentialBuilder {
    curve().without_max_times().with_total_delay(Some(budget))
}

/// How often a row the broker nacks is sent again before its batch fails. A nack
/// means the broker did not take the row (a quorum queue electing a leader, say), so
/// sending it again cannot duplicate it; one that keeps nacking is not passing.
pub const NACK_RETRIES: usize = 3;

/// The waits before each new send of a nacked row: [`NACK_RETRIES`] of them, on the
/// broker curve; the iterator's end means "give up".
pub fn nack_delays() -> impl Iterator<Item = Duration> + Send {
    curve().with_max_times(NACK_RETRIES).build()
}

/// The waits between attempts to reach PostgreSQL, on the same curve, without end:
/// a worker holding rows waits for its ledger as long as it takes (its rows wait,
/// unacked, in RabbitMQ), and only its own stop ends the waiting.
pub fn ledger_delays() -> impl Iterator<Item = Duration> + Send {
    curve().without_max_times().build()
}

/// Longest wait for one connection attempt: a host that drops packets must not
/// hold a caller for the operating system's two-minute TCP timeout.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Broker(#[from] lapin::Error),
    #[error("no answer from RabbitMQ within {0:?}")]
    TimedOut(Duration),
}

/// Connects to `amqp_url`, retrying for about `budget` in all (at most `budget` plus
/// one attempt's timeout). The connection is named `name` in the management UI.
pub async fn connect(
    amqp_url: &str,
    name: &str,
    budget: Duration,
) -> Result<Connection, ConnectError> {
    let attempt = || async {
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        tokio::time::timeout(ATTEMPT_TIMEOUT, Connection::connect(amqp_url, properties))
            .await
            .map_err(|_| ConnectError::TimedOut(ATTEMPT_TIMEOUT))?
            .map_err(ConnectError::from)
    };
    let retrying = attempt
        .retry(broker_backoff(budget))
        .notify(|error, delay| {
            tracing::warn!(%error, retry_in = ?delay, "cannot reach RabbitMQ, retrying");
        });
    tokio::time::timeout(budget + ATTEMPT_TIMEOUT, retrying)
        .await
        .map_err(|_| ConnectError::TimedOut(budget + ATTEMPT_TIMEOUT))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nacked_row_is_sent_again_three_times_with_growing_jittered_waits() {
        let delays: Vec<Duration> = nack_delays().collect();
        assert_eq!(delays.len(), NACK_RETRIES);
        // Jitter adds up to the wait itself: 100 ms becomes 100-200 ms, then 200-400,
        // then 400-800.
        for (delay, base_ms) in delays.iter().zip([100u64, 200, 400]) {
            let base = Duration::from_millis(base_ms);
            assert!(
                *delay >= base && *delay <= base * 2,
                "{delay:?} not in {base:?}..={:?}",
                base * 2
            );
        }
    }

    #[test]
    fn connecting_stops_waiting_once_the_budget_is_spent() {
        // Every wait is at most 10 s (5 s cap, doubled by jitter), so a 30 s budget is
        // spent in a handful of retries and the waits never add up past it.
        let waits: Vec<Duration> = broker_backoff(Duration::from_secs(30)).build().collect();
        let total: Duration = waits.iter().sum();
        assert!(total <= Duration::from_secs(30), "waited {total:?}");
        assert!(waits.len() >= 4, "only {} retries", waits.len());
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(10)));
        // No budget: the first attempt is the only one.
        assert_eq!(broker_backoff(Duration::ZERO).build().count(), 0);
    }

    #[tokio::test]
    async fn an_unreachable_broker_is_given_up_on_after_the_budget() {
        let started = std::time::Instant::now();
        // Port 9 (discard) has no broker listening: every attempt is refused at once.
        let result = connect(
            "amqp://guest:guest@127.0.0.1:9/%2f",
            "retry-test",
            Duration::from_millis(500),
        )
        .await;
        assert!(matches!(result, Err(ConnectError::Broker(_))), "{result:?}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "gave up after {:?}",
            started.elapsed()
        );
    }
}
