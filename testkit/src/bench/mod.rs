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

pub mod baseline;
pub mod process;
pub mod results;
