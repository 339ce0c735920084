//! Local backends: the systems that do the real work of a local service. The broker
//! decides *whether* a call may run and records it; a backend only does it, and leaves
//! nothing behind when it fails.

pub mod mysql;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Map, Value};

use crate::catalog::PlanLimits;
use crate::config::Config;

/// How a backend failed; the broker maps each to an OSB status.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The backend's server cannot be reached (503).
    #[error("{0}")]
    Unavailable(String),
    /// The resource exists already without the broker having recorded it (409).
    #[error("{0}")]
    Conflict(String),
    /// The request cannot be done in the backend's current state (422).
    #[error("{0}")]
    Rejected(String),
    /// The request's parameters are wrong (400).
    #[error("{0}")]
    BadRequest(String),
    /// Anything else (500).
    #[error("{0}")]
    Failed(String),
}

pub type Parameters<'a> = Option<&'a Map<String, Value>>;

/// A binding as quota enforcement sees it.
#[derive(Debug, Clone)]
pub struct BindingAccess {
    pub binding_id: String,
    /// Read-only bindings never get write access back.
    pub read_only: bool,
}

/// What one enforcement pass changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaChange {
    pub used_bytes: u64,
    pub revoked: u32,
    pub restored: u32,
}

#[async_trait]
pub trait Backend: Send + Sync {
    /// Names the backend and where it lives, without secrets.
    fn describe(&self) -> String;
    /// Total storage, in MB, the plans of all its instances may promise; `None`: no limit.
    fn capacity_mb(&self) -> Option<u64> {
        None
    }
    /// Reaches the backend's server.
    async fn check(&self) -> Result<(), BackendError>;
    async fn provision(
        &self,
        instance_id: &str,
        limits: PlanLimits,
        parameters: Parameters<'_>,
    ) -> Result<(), BackendError>;
    /// Moves an instance to another plan's limits, refusing what the instance outgrew.
    async fn update(
        &self,
        instance_id: &str,
        from: PlanLimits,
        to: PlanLimits,
        parameters: Parameters<'_>,
    ) -> Result<(), BackendError>;
    /// Removes the instance and whatever access was left on it; done if already gone.
    async fn deprovision(&self, instance_id: &str) -> Result<(), BackendError>;
    /// Creates access for one binding and returns the credentials apps read.
    async fn bind(
        &self,
        instance_id: &str,
        binding_id: &str,
        limits: PlanLimits,
        parameters: Parameters<'_>,
    ) -> Result<Map<String, Value>, BackendError>;
    /// Revokes a binding's access, cutting its open connections; done if already gone.
    async fn unbind(&self, instance_id: &str, binding_id: &str) -> Result<(), BackendError>;
    /// Holds the instance to its plan's storage: at or over the limit its users lose write
    /// access (and their open connections), below it they get it back. Backends without
    /// quotas change nothing.
    async fn enforce_quota(
        &self,
        _instance_id: &str,
        _limits: PlanLimits,
        _bindings: &[BindingAccess],
    ) -> Result<QuotaChange, BackendError> {
        Ok(QuotaChange::default())
    }

    /// What the instance's dashboard shows about it, as label and value.
    async fn describe_instance(
        &self,
        instance_id: &str,
        limits: PlanLimits,
    ) -> Result<Vec<(String, String)>, BackendError>;
}

pub type Backends = HashMap<String, Arc<dyn Backend>>;

/// The configured backends, by the name services refer to them with. Building them
/// reaches no server.
pub fn from_config(config: &Config) -> anyhow::Result<Backends> {
    let mut backends: Backends = HashMap::new();
    if let Some(mysql) = &config.backends.mysql {
        backends.insert("mysql".into(), Arc::new(mysql::MysqlBackend::new(mysql)?));
    }
    Ok(backends)
}

/// Rejects parameters a backend does not know, naming them.
pub fn only_known_parameters(
    parameters: Parameters<'_>,
    known: &[&str],
) -> Result<(), BackendError> {
    let unknown: Vec<&str> = parameters
        .into_iter()
        .flat_map(|p| p.keys())
        .map(String::as_str)
        .filter(|k| !known.contains(k))
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(BackendError::BadRequest(format!(
            "unknown parameter{} {}; this plan accepts {}",
            if unknown.len() > 1 { "s" } else { "" },
            unknown.join(", "),
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        )))
    }
}
