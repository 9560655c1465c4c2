//! Bounded waiting for a condition, with a clear message when it never comes: the
//! tests' way to wait for something that no event announces.

use std::{future::Future, time::Duration};

/// Waits until `condition` holds, checking every 50 ms, or panics after `timeout`
/// with `what` in the message.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !condition().await {
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
