//! `simulate`: the demo handler. Sleeps a fixed time per row and fails a chosen share
//! of rows, so scaling, retries and dead-lettering can be watched without real work.

use std::time::Duration;

use super::RowFailed;

#[derive(Debug, Clone)]
pub struct Simulate {
    pub per_row: Duration,
    /// Share of rows that fail, from 0.0 to 1.0.
    pub fail_rate: f64,
}

impl Simulate {
    /// Waits, then fails at the chosen rate; the result says how long it "worked".
    pub async fn handle(&self) -> Result<String, RowFailed> {
        // A zero-length sleep still waits for the timer's next millisecond tick.
        if !self.per_row.is_zero() {
            tokio::time::sleep(self.per_row).await;
        }
        if self.fail_rate > 0.0 && fastrand::f64() < self.fail_rate {
            return Err(RowFailed(format!(
                "simulated failure (fail_rate {})",
                self.fail_rate
            )));
        }
        Ok(serde_json::json!({ "simulated_ms": self.per_row.as_millis() as u64 }).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn sleeps_per_row_and_fails_at_the_chosen_rate() {
        let always = Simulate {
            per_row: Duration::from_secs(2),
            fail_rate: 1.0,
        };
        let started = tokio::time::Instant::now();
        assert!(always.handle().await.is_err());
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        let never = Simulate {
            fail_rate: 0.0,
            ..always
        };
        assert_eq!(
            never.handle().await,
            Ok(r#"{"simulated_ms":2000}"#.to_string())
        );
    }
}
