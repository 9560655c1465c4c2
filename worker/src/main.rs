//! The `worker` binary: read settings, start logging, consume until drained.
//! Exits 0 after a drain (SIGTERM or a request from the scaler), so a Kubernetes Job
//! that is drained ends `Succeeded`; non-zero when the broker stays unreachable.

use clap::Parser;
use spillway_common::{jobs_config::JobsConfig, shutdown, telemetry};
use spillway_worker::config::Settings;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::parse();
    settings.broker.validate()?;
    telemetry::init(&settings.log)?;
    let jobs = JobsConfig::load(settings.jobs.jobs_config.as_deref())?;
    let worker = spillway_worker::build(&settings, &jobs)?;
    let stop = shutdown::on_signal()?;
    worker.run(stop).await?;
    Ok(())
}
