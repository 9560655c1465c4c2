//! The `scaler` binary: read settings, start logging, scale until SIGTERM/SIGINT.
//!
//! A failure to start (a bad setting, an unreadable job-types file, a port in use) is
//! printed as one `error: ...` line with its causes, never as a stack trace: it is
//! meant for the operator who set the value, whatever `RUST_BACKTRACE` says.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context;
use clap::Parser;
use spillway_common::{jobs_config::JobsConfig, shutdown, telemetry};
use spillway_scaler::{
    config::{Command, Settings},
    launcher::{kube::worker_job, local::LocalLauncher, spec::WorkerEnv, worker_name},
    simulate,
};

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
    match settings.command {
        Some(Command::WorkerJobs) => {
            let jobs = JobsConfig::load(settings.jobs.jobs_config.as_deref())?;
            return print_worker_jobs(&settings, &jobs);
        }
        Some(Command::Workers) => return print_workers(&settings),
        Some(Command::Simulate {
            seed,
            scenario,
            svg,
        }) => return simulate(seed, scenario.as_deref(), svg.as_deref()),
        None => {}
    }
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

fn simulate(seed: u64, scenario: Option<&str>, svg: Option<&Path>) -> anyhow::Result<()> {
    if let Some(dir) = svg {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create --svg directory {}", dir.display()))?;
    }
    for run in simulate::run_scenarios(seed, scenario)? {
        println!("{}", run.table());
        if let Some(dir) = svg {
            let path = dir.join(format!("{}.svg", run.scenario.name));
            std::fs::write(&path, simulate::chart::svg(&run))
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    eprintln!(
        "simulated in {:.1} s of CPU",
        simulate::cpu_time()?.as_secs_f64()
    );
    Ok(())
}

fn print_workers(settings: &Settings) -> anyhow::Result<()> {
    let dir = &settings.worker_dir;
    if !dir.is_dir() {
        anyhow::bail!(
            "WORKER_DIR {} does not exist: no local worker was ever started there",
            dir.display()
        );
    }
    // Listing starts nothing: the binary is only named, never run.
    let launcher = LocalLauncher::new(PathBuf::from("worker"), dir.clone())
        .with_context(|| format!("cannot read the worker registry in {}", dir.display()))?;
    println!("{}", serde_json::to_string_pretty(&launcher.registered()?)?);
    Ok(())
}

fn print_worker_jobs(settings: &Settings, jobs: &JobsConfig) -> anyhow::Result<()> {
    let template = settings.job_template(jobs);
    let env = WorkerEnv::from_settings(settings);
    for job_type in jobs.job_types.keys() {
        let job = worker_job(&template, &env.spec(job_type, &worker_name(job_type)))?;
        println!("---\n{}", serde_json::to_string_pretty(&job)?);
    }
    Ok(())
}
