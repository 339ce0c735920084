//! # Layout
//! - [`osb`]: the Open Service Broker API v2 wire types, defined once for both sides of
//!   the proxy.
//!
//! The client for remote brokers joins this crate with upstream federation.

pub mod osb;
