-- Job types an operator paused: the scaler spawns no worker for them until resumed,
-- whichever scaler runs and however often it restarts.
CREATE TABLE paused_job_types (
    job_type  text PRIMARY KEY,
    paused_at timestamptz NOT NULL DEFAULT now()
);
