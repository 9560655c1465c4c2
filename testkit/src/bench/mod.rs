//! Benchmark support: the baselines `./manage.sh bench` divides
//! Spillway's figures by, the processes it measures, and the one table it prints.
//!
//! Every figure is a ratio against a baseline measured in the same run, because the
//! machine a benchmark runs on is shared and its speed changes from minute to minute.
//! The benchmarks are separate targets (each in the crate whose binary it measures), so
//! each one records its figures in a file and the last one prints them all.
//!
//! # Layout
//!
//! - [`baseline`]: what the broker alone does: a bare lapin publisher with confirms and a
//!   bare lapin consumer with acks, on the same kind of queue Spillway uses.
//! - [`process`]: the release binaries as child processes, and their memory and CPU time.
//! - [`results`]: figures recorded under `target/bench-results/`, and the table.
//!
//! Each benchmark measures the row counts its figures name by default; `BENCH_ROWS`, when
//! set, replaces each benchmark's largest count ([`rows`]), for a quick run that checks
//! a benchmark works rather than one whose figures go into BENCHMARKS.md.

pub mod baseline;
pub mod process;
pub mod results;

/// Set to run every benchmark on fewer (or more) rows than its figures are defined for.
pub const ROWS_VAR: &str = "BENCH_ROWS";

/// `default`, or the row count `BENCH_ROWS` gives. Panics, naming the variable, when it
/// is not a positive number.
pub fn rows(default: u64) -> u64 {
    match std::env::var(ROWS_VAR) {
        Ok(value) => match value.trim().parse() {
            Ok(rows) if rows > 0 => rows,
            _ => panic!("{ROWS_VAR}={value:?} is not a positive number of rows"),
        },
        Err(_) => default,
    }
}
