//! Test doubles for Spillway's tests: stand-ins for the systems Spillway talks to that
//! cannot run where the tests run, built to behave as the real ones do at the boundary
//! Spillway uses, and reached the way production reaches the real ones.
//!
//! # Layout
//!
//! - [`kube_api`]: a Kubernetes API server over real TLS that stores Jobs, serves list,
//!   watch, pods and logs, and runs each Job's pod as a real process.
//!   - `tls`: its CA, certificate, TLS listener, kubeconfig and in-cluster files.
//!   - `server`: the REST paths, authentication, the request record, `Status` errors.
//!   - `store`: objects, resourceVersions, watch history, selectors.
//!   - `kubelet`: the Job controller, garbage and TTL collectors, scheduler and kubelet.
//!   - `admission`: decoding, validation, defaulting and Pod Security `restricted`.

pub mod kube_api;
