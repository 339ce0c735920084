//! # Layout
//! - [`osb`]: the Open Service Broker API v2 wire types, defined once for both sides of
//!   the proxy.
//! - [`settings`]: how an operator describes a remote broker (URL, credentials, TLS,
//!   timeouts, filters, circuit breaker).
//! - [`client`]: [`Upstream`], the client of one remote broker: it authenticates (basic,
//!   bearer, OAuth2 client credentials), times out, breaks the circuit, and checks that
//!   what comes back is OSB.
//! - [`bounded`]: every peer's answer is read with a cap, streamed and cut there.
//! - [`versions`]: which answer fields each API version defines; answers are cut to the
//!   caller's.

pub mod bounded;
pub mod client;
pub mod osb;
pub mod settings;
pub mod versions;

pub use client::{BreakerState, Observer, OsbRequest, OsbResponse, Upstream, UpstreamError};
pub use reqwest::Method;
pub use settings::UpstreamSettings;
