//! The `scaler` binary: read settings, start logging, scale until SIGTERM/SIGINT.

use anyhow::Context;
use clap::Parser;
use spillway_common::{jobs_config::JobsConfig, shutdown, telemetry};
use spillway_scaler::config::Settings;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::parse();
    settings.broker.validate()?;
    telemetry::init(&settings.log)?;
    let jobs = JobsConfig::load(settings.jobs.jobs_config.as_deref())?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on SCALER_LISTEN={}", settings.listen))?;
    tracing::info!(listen = %settings.listen, launcher = ?settings.launcher(), "scaler starting");
    let stop = shutdown::on_signal()?;
    spillway_scaler::run(settings, jobs, listener, stop).await
}
