//! Local backends: the systems that do the real work of a local service. The broker
//! decides *whether* a call may run and records it; a backend only does it, and leaves
//! nothing behind when it fails.

pub mod cubrid;
pub mod logs;
pub mod mongodb;
pub mod mysql;
pub mod postgresql;
pub mod redis;
pub mod swift;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::catalog::{ParametersOf, PlanLimits};
use crate::config::{BackendKind, Config, ServerBackendConfig};
use crate::store::Drain;

/// How a backend failed; the broker maps each to an OSB status.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The backend's server cannot be reached (503). `public` is what the client is told
    /// (which system, never where it is); `detail` (host, port, the driver's words) is for
    /// the log.
    #[error("{public}: {detail}")]
    Unavailable { public: String, detail: String },
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

impl BackendError {
    pub fn unavailable(public: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        BackendError::Unavailable {
            public: public.into(),
            detail: detail.to_string(),
        }
    }

    /// What a client may be told: never the broker's hosts, ports or user names.
    pub fn public(&self) -> String {
        match self {
            BackendError::Unavailable { public, .. } => public.clone(),
            BackendError::Failed(_) => {
                "the backend failed; the operator can find the cause in the broker's log".into()
            }
            other => other.to_string(),
        }
    }
}

pub type Parameters<'a> = Option<&'a Map<String, Value>>;

/// A binding as a backend is asked to make it.
#[derive(Debug, Clone, Copy)]
pub struct Binding<'a> {
    pub instance_id: &'a str,
    pub binding_id: &'a str,
    /// The app it is for (`app_guid`, or `bind_resource.app_guid`), when the platform named one.
    pub app: Option<&'a str>,
    pub limits: PlanLimits,
    /// The bind's parameters, already checked against what the backend reads.
    pub parameters: Parameters<'a>,
}

/// A binding as a backend is asked to revoke it. `app` is `None` for a delete of a
/// binding the broker has no record of (Cloud Controller's orphan mitigation).
#[derive(Debug, Clone, Copy)]
pub struct Unbinding<'a> {
    pub instance_id: &'a str,
    pub binding_id: &'a str,
    pub app: Option<&'a str>,
}

/// What a bind hands out: the credentials apps read and, from a log service, the drain
/// the platform sends the app's logs to (the answer's `syslog_drain_url`).
#[derive(Debug, Clone)]
pub struct Bound {
    pub credentials: Map<String, Value>,
    pub drain: Option<Drain>,
}

impl From<Map<String, Value>> for Bound {
    fn from(credentials: Map<String, Value>) -> Self {
        Bound {
            credentials,
            drain: None,
        }
    }
}

/// The ids of an instance's live bindings, read when called.
pub type LiveBindings<'a> = &'a (dyn Fn() -> futures::future::BoxFuture<'static, Result<Vec<String>, BackendError>>
         + Send
         + Sync);

/// What one enforcement pass changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaChange {
    pub used_bytes: u64,
    pub revoked: u32,
    pub restored: u32,
}

/// The longest a backend's work may go on after the broker stopped waiting for it (the
/// operation timeout): a statement already sent keeps running on its server. An
/// operation's lease outlasts the timeout by this much, so that a process taking over an
/// abandoned operation does not run beside its first holder's last statement. Backends
/// bound their waits by it (MySQL: lock waits, which a node donating a state transfer or a
/// long DDL can make endless).
pub const LINGER_SECS: u64 = 5;

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
    /// The parameters this backend reads in a call (the plan's schema may allow more
    /// only where the backend reads them); the broker refuses others before it claims.
    fn parameters(&self, _call: ParametersOf) -> &'static [&'static str] {
        &[]
    }
    /// Bytes the instance holds, where the backend can tell: a move to a smaller plan is
    /// refused while this exceeds it ([`change_plan`]).
    async fn usage_bytes(&self, _instance_id: &str) -> Result<Option<u64>, BackendError> {
        Ok(None)
    }
    async fn provision(&self, instance_id: &str, limits: PlanLimits) -> Result<(), BackendError>;
    /// Applies another plan's limits to an instance (connection limits, quotas) or refuses
    /// what the backend cannot change; [`change_plan`] has already refused a plan the
    /// instance outgrew. Backends whose plans differ only in the quota pass change nothing.
    async fn update(
        &self,
        _instance_id: &str,
        _from: PlanLimits,
        _to: PlanLimits,
    ) -> Result<(), BackendError> {
        Ok(())
    }
    /// Removes the instance and whatever access was left on it; done if already gone.
    /// Data the instance still holds is removed too, unless the backend keeps data apart
    /// from the instance (Swift) and the plan does not allow purging it.
    async fn deprovision(&self, instance_id: &str, limits: PlanLimits) -> Result<(), BackendError>;
    /// Creates access for one binding and returns what apps are handed.
    async fn bind(&self, binding: &Binding<'_>) -> Result<Bound, BackendError>;
    /// Revokes a binding's access, cutting its open connections; done if already gone.
    async fn unbind(&self, binding: &Unbinding<'_>) -> Result<(), BackendError>;
    /// Removes access to the instance that no live binding accounts for: what a binding
    /// made with its own rights (a swauth account admin's extra users). `live` gives the
    /// instance's other bindings; call it only after listing what exists, so a binding made
    /// meanwhile is always counted. Backends whose bindings cannot make access change
    /// nothing.
    async fn prune(&self, _instance_id: &str, _live: LiveBindings<'_>) -> Result<(), BackendError> {
        Ok(())
    }
    /// Whether [`Backend::enforce_quota`] does anything: the quota pass visits only the
    /// instances of backends that do.
    fn enforces_quota(&self) -> bool {
        false
    }
    /// Holds each instance to its plan's storage: at or over the limit its users lose write
    /// access (and their open connections), below it they get it back. Called with a page
    /// of instances at a time, so a backend may read all their usage at once; one result
    /// per instance, in order. Backends without quotas change nothing.
    async fn enforce_quota(
        &self,
        instances: &[(String, PlanLimits)],
    ) -> Vec<Result<QuotaChange, BackendError>> {
        instances
            .iter()
            .map(|_| Ok(QuotaChange::default()))
            .collect()
    }

    /// What the instance's dashboard shows about it, as label and value.
    async fn describe_instance(
        &self,
        instance_id: &str,
        limits: PlanLimits,
    ) -> Result<Vec<(String, String)>, BackendError>;
}

pub type Backends = HashMap<BackendKind, Arc<dyn Backend>>;

/// The configured backends, by the name services refer to them with. Building them
/// reaches no server.
pub fn from_config(config: &Config) -> anyhow::Result<Backends> {
    let c = &config.backends;
    type Built = Option<anyhow::Result<Arc<dyn Backend>>>;
    let built: [(BackendKind, Built); 6] = [
        (
            BackendKind::Mysql,
            c.mysql
                .as_ref()
                .map(|b| Ok(Arc::new(mysql::MysqlBackend::new(b)?) as _)),
        ),
        (
            BackendKind::Mongodb,
            c.mongodb
                .as_ref()
                .map(|b| Ok(Arc::new(mongodb::MongodbBackend::new(b)?) as _)),
        ),
        (
            BackendKind::Postgresql,
            c.postgresql
                .as_ref()
                .map(|b| Ok(Arc::new(postgresql::PostgresqlBackend::new(b)?) as _)),
        ),
        (
            BackendKind::Redis,
            c.redis
                .as_ref()
                .map(|b| Ok(Arc::new(redis::RedisBackend::new(b)?) as _)),
        ),
        (
            BackendKind::Swift,
            c.swift
                .as_ref()
                .map(|b| Ok(Arc::new(swift::SwiftBackend::new(b)?) as _)),
        ),
        (
            BackendKind::Cubrid,
            c.cubrid
                .as_ref()
                .map(|b| Ok(Arc::new(cubrid::CubridBackend::new(b)?) as _)),
        ),
    ];
    let mut backends: Backends = HashMap::new();
    for (name, backend) in built {
        if let Some(backend) = backend {
            backends.insert(name, backend?);
        }
    }
    Ok(backends)
}

/// Rejects parameters the backend does not read, naming them.
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

/// Where a server backend is: as the broker reaches it (named in messages, never with
/// secrets) and as apps reach it (written into credentials).
pub(crate) struct Endpoint {
    pub admin_address: String,
    pub public_host: String,
    pub public_port: u16,
    pub timeout: Duration,
    /// The CA (PEM) of the server's certificate, when the server is reached over TLS.
    pub ca_certificate: Option<String>,
}

/// A TLS client configuration that trusts only the CA in `pem` (and checks the host name).
pub(crate) fn tls_client_config(pem: &str) -> anyhow::Result<tokio_rustls::rustls::ClientConfig> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::{crypto, ClientConfig, RootCertStore};
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(cert?)?;
    }
    Ok(
        ClientConfig::builder_with_provider(Arc::new(crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// The PEM certificate at `path`, checked to be one; errors name `key` and the file.
pub(crate) fn read_ca(key: &str, path: &std::path::Path) -> anyhow::Result<String> {
    let pem = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("{key}: cannot read {}: {e}", path.display()))?;
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        anyhow::bail!("{key}: {} is not a PEM certificate", path.display());
    }
    Ok(pem)
}

impl Endpoint {
    /// Reads host and port from an admin URL of the given scheme (`a|b`: either).
    pub(crate) fn of(
        key: &str,
        url: &str,
        scheme: &str,
        default_port: u16,
        public_host: Option<&String>,
        public_port: Option<u16>,
        timeout_secs: u64,
    ) -> anyhow::Result<Endpoint> {
        let parsed = url::Url::parse(url).map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
        let Some(host) = parsed
            .host_str()
            .filter(|_| scheme.split('|').any(|s| s == parsed.scheme()))
        else {
            anyhow::bail!(
                "{key}: must look like {}://user:password@host:port",
                scheme.split('|').next().unwrap_or(scheme)
            );
        };
        let port = parsed.port().unwrap_or(default_port);
        Ok(Endpoint {
            admin_address: format!("{host}:{port}"),
            public_host: public_host.cloned().unwrap_or_else(|| host.to_string()),
            public_port: public_port.unwrap_or(port),
            timeout: Duration::from_secs(timeout_secs.max(1)),
            ca_certificate: None,
        })
    }

    pub(crate) fn from_config(
        key: &str,
        config: &ServerBackendConfig,
        scheme: &str,
        default_port: u16,
    ) -> anyhow::Result<Endpoint> {
        let mut endpoint = Endpoint::of(
            key,
            config.url.expose(),
            scheme,
            default_port,
            config.public_host.as_ref(),
            config.public_port,
            config.connect_timeout_secs,
        )?;
        if let Some(path) = &config.ca_certificate {
            let parent = key.rsplit_once('.').map_or(key, |(p, _)| p);
            endpoint.ca_certificate = Some(read_ca(&format!("{parent}.ca_certificate"), path)?);
        }
        Ok(endpoint)
    }
}

/// Credentials built as JSON, as the map a binding holds; anything but an object is the
/// backend's own failure.
pub(crate) fn object(value: Value) -> Result<Map<String, Value>, BackendError> {
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(BackendError::Failed(
            "the backend built credentials that are not a JSON object".into(),
        )),
    }
}

/// A plan change, as every backend promises it: a move to a smaller plan is refused while
/// the instance holds more than it allows; then the backend applies the new limits.
pub async fn change_plan(
    backend: &dyn Backend,
    instance_id: &str,
    from: PlanLimits,
    to: PlanLimits,
) -> Result<(), BackendError> {
    if to.max_storage_mb < from.max_storage_mb {
        if let Some(used) = backend.usage_bytes(instance_id).await? {
            if used > to.max_storage_mb * 1024 * 1024 {
                return Err(BackendError::Rejected(format!(
                    "the instance uses {}, more than the new plan allows; delete data first",
                    storage(used, to.max_storage_mb)
                )));
            }
        }
    }
    backend.update(instance_id, from, to).await
}

/// Storage as operators and clients read it: `12.34 MB of 100 MB (12%)`.
pub fn storage(used_bytes: u64, max_mb: u64) -> String {
    let mb = used_bytes as f64 / (1024.0 * 1024.0);
    let percent = used_bytes as f64 * 100.0 / (max_mb * 1024 * 1024).max(1) as f64;
    format!("{mb:.2} MB of {max_mb} MB ({percent:.0}%)")
}

/// Removes a secret from an error's message.
pub(crate) fn scrub(error: BackendError, secret: &str) -> BackendError {
    let clean = |m: String| m.replace(secret, "***");
    match error {
        BackendError::Unavailable { public, detail } => BackendError::Unavailable {
            public: clean(public),
            detail: clean(detail),
        },
        BackendError::Conflict(m) => BackendError::Conflict(clean(m)),
        BackendError::Rejected(m) => BackendError::Rejected(clean(m)),
        BackendError::BadRequest(m) => BackendError::BadRequest(clean(m)),
        BackendError::Failed(m) => BackendError::Failed(clean(m)),
    }
}

/// The database an instance owns.
pub fn database_name(instance_id: &str) -> String {
    let plain = !instance_id.is_empty()
        && instance_id.len() <= 60
        && instance_id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if plain {
        format!("cf_{}", instance_id.replace('-', "_"))
    } else {
        format!("cf_h{}", &hex::encode(Sha256::digest(instance_id))[..40])
    }
}

/// The user a binding owns: 32 characters of `[a-z0-9_]` (the most MySQL 8 allows).
pub fn user_name(binding_id: &str) -> String {
    format!("u_{}", &hex::encode(Sha256::digest(binding_id))[..30])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn safe(name: &str) -> bool {
        name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    }

    #[test]
    fn database_names_are_safe_and_distinct() {
        let ids = [
            "5a0e5c2a-3b1d-4c7e-9f00-1234567890ab",
            "a-b",
            "a_b",
            "axb",
            "AB",
            "ab",
            "x'; DROP DATABASE mysql; --",
            "back`tick",
            "../etc/passwd",
            "é",
            &"a".repeat(300),
        ];
        let names: Vec<String> = ids.iter().map(|id| database_name(id)).collect();
        for (id, name) in ids.iter().zip(&names) {
            assert!(safe(name), "{id:?} -> {name:?}");
        }
        let distinct: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(distinct.len(), names.len(), "{names:?}");
        assert_eq!(
            database_name("5a0e5c2a-3b1d-4c7e-9f00-1234567890ab"),
            "cf_5a0e5c2a_3b1d_4c7e_9f00_1234567890ab"
        );
    }
}
