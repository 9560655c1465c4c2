//! Spillway's shared library: everything two or more of the producer, worker and
//! scaler processes need to agree on.
//!
//! # Layout
//!
//! - [`auth`]: who may do what: tokens from a tokens file, tenants and roles.
//! - [`config`]: settings every process reads from the environment (broker URL and
//!   reconnect budget, logging).
//! - [`jobs_config`]: the job-types file mapping a job type to its queue, handler and limits.
//! - [`events`]: worker progress reports and drain requests, their exchanges, and
//!   subscribing to them.
//! - [`extract`]: query and path extractors that refuse in JSON, and refuse NUL bytes.
//! - [`envelope`]: the message carried for one CSV row, and its AMQP properties.
//! - [`topology`]: declaring the quorum work queue, its dead-letter exchange and `<queue>.dead`.
//! - [`rabbit_api`]: a small client for the RabbitMQ management HTTP API.
//! - [`retry`]: the one retry policy for the broker: connecting, and rows it nacks.
//! - [`metrics`]: a metrics registry as the OpenMetrics text `/metrics` serves.
//! - [`openapi`]: what every service's OpenAPI document at `/openapi.json` shares.
//! - [`telemetry`]: tracing setup, human-readable or JSON lines.
//! - [`shutdown`]: turning SIGTERM/SIGINT into a cancellation token.
//!
//! Test and benchmark helpers live in the dev-only `spillway-testkit` crate.

pub mod auth;
pub mod config;
pub mod envelope;
pub mod events;
pub mod extract;
pub mod jobs_config;
pub mod metrics;
pub mod openapi;
pub mod rabbit_api;
pub mod retry;
pub mod serve;
pub mod shutdown;
pub mod telemetry;
pub mod topology;
