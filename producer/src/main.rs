//! The `producer` binary: read settings, start logging, serve until SIGTERM/SIGINT.
//!
//! A failure to start (a bad setting, an unreadable job-types file, a port in use) is
//! printed as one `error: ...` line with its causes, never as a stack trace: it is
//! meant for the operator who set the value, whatever `RUST_BACKTRACE` says.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use spillway_common::auth::Tokens;
use spillway_common::{jobs_config::JobsConfig, shutdown, telemetry};
use spillway_producer::config::{Command, Settings, TokenCommand};

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let settings = Settings::parse();
    if let Some(Command::Token(TokenCommand::Add { name, tenant, role })) = &settings.command {
        let Some(path) = &settings.auth.tokens_file else {
            anyhow::bail!(
                "set TOKENS_FILE (or --tokens-file) to the file the token's hash goes in"
            );
        };
        let token = Tokens::add(path, name, tenant, *role)?;
        eprintln!(
            "token {name:?} (tenant {tenant:?}, {role:?}) added to {}; it is shown this once:",
            path.display()
        );
        println!("{token}");
        return Ok(());
    }
    settings.validate()?;
    telemetry::init(&settings.log)?;
    let jobs = JobsConfig::load(settings.jobs.jobs_config.as_deref())?;
    let state = spillway_producer::build_state(&settings, jobs)?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on PRODUCER_LISTEN={}", settings.listen))?;
    // The bound address, not the setting: with port 0 it names the port chosen.
    let listen = listener.local_addr()?;
    tracing::info!(%listen, "producer ready for uploads");
    let stop = shutdown::on_signal()?;
    spillway_producer::serve(listener, state, async move { stop.cancelled().await }).await?;
    Ok(())
}
