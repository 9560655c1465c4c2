//! The producer serving in the test's own process: the library's `build_state` and
//! `serve`, as `main` runs them, on an ephemeral port.
//!
//! In-process, so a test needs no binary built and sees the producer's panics; the
//! settings still go through the command-line parser, so a test sets them as an
//! operator would (`--jobs-config`, `--broker-retry-seconds`, ...).

use std::sync::Arc;

use clap::Parser;
use spillway_common::jobs_config::JobsConfig;
use spillway_producer::config::Settings;
use tokio_util::sync::CancellationToken;

use crate::TestDatabase;

/// A producer serving in the test's process.
pub struct Started {
    /// Its base URL, `http://127.0.0.1:<port>`.
    pub url: String,
    /// Cancel to stop it.
    pub stop: CancellationToken,
    /// Its ledger's `DATABASE_URL`, for the scaler and workers of the same test.
    pub database_url: String,
}

/// Starts a producer publishing to `amqp_url`, with `args` as extra command-line
/// flags. It serves from the moment this returns: the listener is bound already.
/// Unless `args` name a `--database-url`, its ledger is a [`TestDatabase`] of its own,
/// dropped when the producer stops.
pub async fn start(amqp_url: &str, args: &[&str]) -> Started {
    let database = match args.contains(&"--database-url") {
        true => None,
        false => Some(TestDatabase::new("producer").await),
    };
    let database_url = database.as_ref().map(|db| db.url.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("an ephemeral port for the producer");
    let url = format!("http://{}", listener.local_addr().expect("a bound address"));
    let argv = ["producer", "--amqp-url", amqp_url, "--public-url", &url]
        .into_iter()
        .chain(args.iter().copied())
        .chain(
            database_url
                .as_deref()
                .map(|url| ["--database-url", url])
                .into_iter()
                .flatten(),
        );
    let settings = Settings::try_parse_from(argv).expect("valid test settings for the producer");
    let database_url = settings.database.database_url.clone();
    let jobs = JobsConfig::load(settings.jobs.jobs_config.as_deref()).expect("valid job types");
    let state = spillway_producer::build_state(&settings, jobs).expect("a valid DATABASE_URL");
    let stop = CancellationToken::new();
    let until = stop.clone();
    let served = spillway_producer::serve(listener, Arc::clone(&state), async move {
        until.cancelled().await
    });
    tokio::spawn(async move {
        let _ = served.await;
        state.ledger.close().await;
        drop(database);
    });
    Started {
        url,
        stop,
        database_url,
    }
}
