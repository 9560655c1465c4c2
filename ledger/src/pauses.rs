//! Job types paused by an operator, kept here so a restarted scaler still honours them.

use crate::{Ledger, Result};

impl Ledger {
    /// Pauses `job_type`; pausing it again changes nothing.
    pub async fn pause_job_type(&self, job_type: &str) -> Result<()> {
        self.schema().await?;
        sqlx::query("INSERT INTO paused_job_types (job_type) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(job_type)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Resumes `job_type`; resuming one not paused changes nothing.
    pub async fn resume_job_type(&self, job_type: &str) -> Result<()> {
        self.schema().await?;
        sqlx::query("DELETE FROM paused_job_types WHERE job_type = $1")
            .bind(job_type)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// The job types paused now, by name.
    pub async fn paused_job_types(&self) -> Result<Vec<String>> {
        self.schema().await?;
        Ok(
            sqlx::query_scalar("SELECT job_type FROM paused_job_types ORDER BY job_type")
                .fetch_all(self.pool())
                .await?,
        )
    }
}
