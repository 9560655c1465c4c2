//! Log setup shared by every binary: readable lines on a terminal, JSON lines for a
//! log collector, filtered by `RUST_LOG`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber. Fails on a filter that does not parse, naming it.
pub fn init(settings: &LogSettings) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&settings.log_level).map_err(|e| {
        anyhow::anyhow!(
            "RUST_LOG {:?} is not a valid filter: {e}",
            settings.log_level
        )
    })?;
    // Colours only on a terminal: log files and the dashboard's log view get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let installed = match settings.log_format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    installed.map_err(|e| anyhow::anyhow!("cannot install the log subscriber: {e}"))
}
