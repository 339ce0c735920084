//! Brokerage: one Open Service Broker endpoint for Cloud Foundry, in front of local
//! backends and remote brokers.
//!
//! # Layout
//! - [`config`]: layered configuration (defaults, file, environment, `$PORT`), parsed and
//!   checked; it builds nothing.
//! - [`startup`]: builds what the configuration describes, once each (catalog, TLS,
//!   upstream clients, dashboard links), and wires the broker for `main` and the tests.
//! - [`catalog`]: the local catalog, validated and published.
//! - [`federation`]: upstream brokers, the merged catalog and the routes back to them.
//! - [`http`]: the only module that knows axum: routes, auth, version check, tracing,
//!   the connection loop and the HTTPS listener's certificate.
//! - [`broker`]: what each OSB call means: claim, run, record, answer.
//! - [`dashboard`]: the instance dashboard behind single sign-on (the `sso` crate).
//! - [`store`]: durable records of instances, bindings and operations (embedded or MySQL).
//! - [`backend`]: the local backends that do the work (MySQL, MongoDB, PostgreSQL, Redis,
//!   Swift with swauth, CUBRID, logs).
//! - [`logs`]: application logs drained to the broker, queued and kept per instance.
//! - [`metrics`]: Prometheus metrics, rendered at `/metrics`.
//! - [`quota`]: storage quota enforcement, one process per cycle (a lease in the store).
//! - [`mysql`]: connection helpers the MySQL store and backend share.
//! - [`error`]: the OSB error every call fails with.

pub mod backend;
pub mod broker;
pub mod catalog;
pub mod config;
pub mod dashboard;
pub mod error;
pub mod federation;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod logs;
pub mod metrics;
pub mod mysql;
pub mod quota;
pub mod startup;
pub mod store;
