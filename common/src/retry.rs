//! The one retry policy for reaching the broker, and connecting with it.
//!
//! Brokers restart and networks blip; every process retries with jittered
//! exponential backoff (100 ms doubling to 5 s) for a bounded time, then reports a
//! clear error instead of hanging. The bound comes from `BROKER_RETRY_SECONDS`.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use lapin::{Connection, ConnectionProperties};

/// Backoff for broker operations, giving up once `budget` has been spent waiting.
pub fn broker_backoff(budget: Duration) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .with_total_delay(Some(budget))
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
