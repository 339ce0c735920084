//! How an operator describes one remote broker.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A configuration value that must never be printed: a password, or a URL carrying one.
/// `Debug` shows `***`; serializing shows a URL with its password masked, else `***`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&redact_url(&self.0).unwrap_or_else(|| "***".into()))
    }
}

/// A URL with its password replaced by `***`, or `None` when the text is no URL.
pub fn redact_url(text: &str) -> Option<String> {
    let mut url = url::Url::parse(text).ok()?;
    if url.cannot_be_a_base() {
        return None;
    }
    if url.password().is_some() {
        url.set_password(Some("***")).ok()?;
    }
    Some(url.to_string())
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSettings {
    /// Short name: namespaces the upstream's services and names it in errors and logs.
    pub alias: String,
    /// The broker's base URL (without `/v2`).
    pub url: String,
    #[serde(default)]
    pub auth: AuthSettings,
    /// PEM file of the CA that signed the upstream's certificate.
    #[serde(default)]
    pub ca_certificate: Option<PathBuf>,
    /// Explicit opt-out of TLS certificate verification.
    #[serde(default)]
    pub skip_tls_verification: bool,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// Whole-request limit; keep it well under Cloud Controller's 60 s.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: u64,
    /// Largest catalog read from this upstream, in bytes; past it the fetch fails and the
    /// last good copy is kept.
    #[serde(default = "default_max_catalog_bytes")]
    pub max_catalog_bytes: usize,
    /// Largest answer to any other call (and from its token endpoint), in bytes.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
    /// Prefix of the namespaced service names; `<alias>-` when absent.
    #[serde(default)]
    pub name_prefix: Option<String>,
    #[serde(default)]
    pub include_services: Vec<String>,
    #[serde(default)]
    pub exclude_services: Vec<String>,
    #[serde(default)]
    pub include_plans: Vec<String>,
    #[serde(default)]
    pub exclude_plans: Vec<String>,
    /// `X-Broker-API-Version` sent upstream; the platform's own when absent.
    #[serde(default)]
    pub api_version: Option<String>,
    #[serde(default)]
    pub breaker: BreakerSettings,
}

fn default_connect_timeout() -> u64 {
    5
}
fn default_request_timeout() -> u64 {
    30
}
/// 8 MiB: several thousand plans with schemas and metadata.
fn default_max_catalog_bytes() -> usize {
    8 << 20
}
fn default_max_response_bytes() -> usize {
    1 << 20
}

impl UpstreamSettings {
    pub fn prefix(&self) -> String {
        self.name_prefix
            .clone()
            .unwrap_or_else(|| format!("{}-", self.alias))
    }

    pub fn wants_service(&self, name: &str) -> bool {
        selected(name, &self.include_services, &self.exclude_services)
    }

    pub fn wants_plan(&self, name: &str) -> bool {
        selected(name, &self.include_plans, &self.exclude_plans)
    }
}

/// Empty include list: everything; then exclusions. `*` at the end matches any suffix.
fn selected(name: &str, include: &[String], exclude: &[String]) -> bool {
    let matches = |pattern: &String| match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == pattern,
    };
    (include.is_empty() || include.iter().any(matches)) && !exclude.iter().any(matches)
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum AuthSettings {
    #[default]
    None,
    Basic {
        username: String,
        password: Secret,
    },
    Bearer {
        token: Secret,
    },
    /// OAuth2 client credentials; the token is cached until shortly before it expires.
    ClientCredentials {
        token_url: String,
        client_id: String,
        client_secret: Secret,
        #[serde(default)]
        scopes: Vec<String>,
    },
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerSettings {
    /// Consecutive failures that open the circuit.
    #[serde(default = "default_failures")]
    pub failures: u32,
    /// How long an open circuit refuses calls before letting one probe through.
    #[serde(default = "default_cool_down")]
    pub cool_down_secs: u64,
}

fn default_failures() -> u32 {
    5
}
fn default_cool_down() -> u64 {
    30
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failures: default_failures(),
            cool_down_secs: default_cool_down(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        let s = |i: &[&str], e: &[&str]| -> (Vec<String>, Vec<String>) {
            (
                i.iter().map(|x| x.to_string()).collect(),
                e.iter().map(|x| x.to_string()).collect(),
            )
        };
        for (include, exclude, name, expected) in [
            (&[][..], &[][..], "mysql", true),
            (&["mysql"][..], &[][..], "mysql", true),
            (&["mysql"][..], &[][..], "redis", false),
            (&["my*"][..], &[][..], "mysql", true),
            (&[][..], &["redis"][..], "redis", false),
            (&[][..], &["re*"][..], "redis", false),
            (&["*"][..], &["mysql"][..], "mysql", false),
        ] {
            let (i, e) = s(include, exclude);
            assert_eq!(
                selected(name, &i, &e),
                expected,
                "{include:?} {exclude:?} {name}"
            );
        }
    }
}
