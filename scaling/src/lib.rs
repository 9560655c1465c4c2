//! Spillway's scaling decisions, with no I/O: what the scaler's tick calls, and what
//! `scaler simulate` runs against a simulated cluster.
//!
//! - [`policy`]: the scaling rules for one job type, a pure function with table tests.
//! - [`share`]: workers fitted under `max_workers_total`, by priority.
//! - [`simulate`]: the policy and the share, unchanged, beside KEDA ScaledJob's
//!   strategies and the prototype's rules, scenario by scenario.
//!
//! A crate of its own so that it builds optimised in every profile: the simulator's
//! 10,000-worker scenario is a test, and it has to run in seconds there too.

pub mod policy;
pub mod share;
pub mod simulate;
