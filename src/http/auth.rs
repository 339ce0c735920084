//! Who may call: the broker's basic-auth pairs, compared as digests in constant time, and
//! the `X-Broker-API-Version` check at the OSB door.

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use upstreams::osb::ApiVersion;

use super::{AppState, API_VERSION};
use crate::config::Credential;
use crate::error::OsbError;

/// The accepted basic-auth pairs, kept only as SHA-256 digests of `user:password`.
pub(super) struct BrokerCredentials {
    digests: Vec<[u8; 32]>,
}

impl BrokerCredentials {
    pub(super) fn new(credentials: &[Credential]) -> Self {
        let digests = credentials
            .iter()
            .map(|c| digest(&format!("{}:{}", c.username, c.password.expose())))
            .collect();
        BrokerCredentials { digests }
    }

    /// Compares against every pair in constant time, whatever matches first.
    pub(super) fn accepts(&self, header: Option<&HeaderValue>) -> bool {
        let Some(pair) = header
            .and_then(|h| h.to_str().ok())
            .and_then(|h| {
                h.strip_prefix("Basic ")
                    .or_else(|| h.strip_prefix("basic "))
            })
            .and_then(|b64| STANDARD.decode(b64.trim()).ok())
            .and_then(|raw| String::from_utf8(raw).ok())
        else {
            return false;
        };
        let presented = digest(&pair);
        self.digests
            .iter()
            .fold(subtle::Choice::from(0), |acc, d| acc | d.ct_eq(&presented))
            .into()
    }
}

fn digest(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

pub(super) async fn authenticate(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    if state.credentials.accepts(req.headers().get(AUTHORIZATION)) {
        next.run(req).await
    } else {
        OsbError::Unauthorized.into_response()
    }
}

pub(super) async fn check_api_version(req: Request, next: Next) -> Response {
    let header = req
        .headers()
        .get(&API_VERSION)
        .and_then(|v| v.to_str().ok());
    match header.and_then(ApiVersion::parse) {
        Some(v) if v.is_supported() => next.run(req).await,
        _ => OsbError::PreconditionFailed(format!(
            "X-Broker-API-Version {} is not supported: this broker answers {} up to {} (any 2.x from {})",
            header.map(|h| format!("{h:?}")).unwrap_or_else(|| "(missing)".into()),
            ApiVersion::OLDEST,
            ApiVersion::CURRENT,
            ApiVersion::OLDEST,
        ))
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn basic_auth_accepts_any_listed_pair_only() {
        let creds = BrokerCredentials::new(&[
            Credential {
                username: "a".into(),
                password: Secret::new("first-password"),
            },
            Credential {
                username: "b".into(),
                password: Secret::new("second-password"),
            },
        ]);
        let header = |pair: &str| {
            HeaderValue::from_str(&format!("Basic {}", STANDARD.encode(pair))).unwrap()
        };
        assert!(creds.accepts(Some(&header("a:first-password"))));
        assert!(creds.accepts(Some(&header("b:second-password"))));
        assert!(!creds.accepts(Some(&header("a:second-password"))));
        assert!(!creds.accepts(Some(&header("a:first-password "))));
        assert!(!creds.accepts(Some(&HeaderValue::from_static("Bearer x"))));
        assert!(!creds.accepts(None));
    }
}
