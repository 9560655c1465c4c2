//! The `worker` binary: read settings, start logging, consume until drained.
//! Exits 0 after a drain (SIGTERM or a request from the scaler), so a Kubernetes Job
//! that is drained ends `Succeeded`; non-zero when the settings are wrong or the broker
//! stays unreachable, with the reason as one `error: ...` line on stderr.

use std::process::ExitCode;

use clap::Parser;
use spillway_common::{jobs_config::JobsConfig, shutdown, telemetry};
use spillway_worker::config::Settings;

/// One thread: a worker's own work per row is small (decode, hand over, ack), and
/// several workers share a machine's cores; a multi-threaded runtime in each spent
/// their CPU on waking threads (end to end with ten workers on two cores: 0.75 of the
/// broker's time in two trials, 0.66 and 0.70 multi-threaded). Handlers' commands run
/// as processes of their own either way.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // The message and its causes only, even with RUST_BACKTRACE set: these are
            // an operator's to fix (a setting, the broker), and a stack trace of the
            // worker's own code would bury what to change.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let settings = Settings::parse();
    settings.broker.validate()?;
    telemetry::init(&settings.log)?;
    if let Some(warning) = settings.deprecation_warning() {
        tracing::warn!("{warning}");
    }
    let jobs = JobsConfig::load(settings.jobs.jobs_config.as_deref())?;
    let worker = spillway_worker::build(&settings, &jobs)?;
    let stop = shutdown::on_signal()?;
    worker.run(stop).await?;
    Ok(())
}
