//! Bounded waiting for a condition, for tests (feature `test-support`).
//!
//! Everything else tests and benchmarks share lives in the dev-only `spillway-testkit`
//! crate, which re-exports this as `spillway_testkit::wait_for`. It stays here only
//! while the scaler's launcher unit tests import it from this path; once they import
//! `spillway_testkit::wait_for`, it moves into the testkit and the feature goes.

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
