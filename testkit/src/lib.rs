//! Spillway's test and benchmark tooling, a dev-dependency of every crate and a normal
//! dependency of none: what the tests and benchmarks of more than one crate need, so
//! that none of them copies a set-up block, and the stand-ins for systems Spillway
//! talks to that cannot run where the tests run.
//!
//! # Layout
//!
//! - [`vhost`]: a throwaway vhost per test on the real broker ([`TestVhost`]).
//! - [`wait`]: [`wait_for`], bounded waiting with a clear timeout message.
//! - [`database`]: a throwaway PostgreSQL database per test ([`TestDatabase`]).
//! - [`ledger`]: batches recorded in the ledger as the producer records them.
//! - [`producer`]: the producer serving in the test's own process.
//! - [`events`]: listening to worker reports and batch announcements.
//! - [`builders`]: messages with defaults, so a test names only what its case is about.
//! - [`local_workers`]: the local launcher's worker registry, read from outside.
//! - [`bench`]: the benchmarks' baselines, processes and results table.
//! - [`kube_api`]: a Kubernetes API server over real TLS that stores Jobs, serves list,
//!   watch, pods and logs, and runs each Job's pod as a real process.
//!   - `tls`: its CA, certificate, TLS listener, kubeconfig and in-cluster files.
//!   - `server`: the REST paths, authentication, the request record, `Status` errors.
//!   - `store`: objects, resourceVersions, watch history, selectors.
//!   - `kubelet`: the Job controller, garbage and TTL collectors, scheduler and kubelet.
//!   - `admission`: decoding, validation, defaulting and Pod Security `restricted`.

pub mod bench;
pub mod builders;
pub mod database;
pub mod events;
pub mod kube_api;
pub mod ledger;
pub mod local_workers;
pub mod producer;
pub mod vhost;
pub mod wait;

pub use database::TestDatabase;
pub use vhost::TestVhost;
pub use wait::wait_for;
