//! The client side of one remote broker: authentication, TLS, timeouts, a circuit
//! breaker, and answers checked to be OSB before anyone relies on them.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use oauth2::basic::BasicClient;
use oauth2::{ClientId, ClientSecret, Scope, TokenResponse, TokenUrl};
use reqwest::header::{HeaderValue, AUTHORIZATION, RETRY_AFTER};
use reqwest::{Method, StatusCode};

use crate::osb;
use crate::settings::{AuthSettings, UpstreamSettings};

/// Why a call to an upstream failed. Every message names the upstream by alias and
/// never carries its credentials.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {alias} is not being called: its circuit is open after repeated failures (next probe in {retry_in_secs} s)")]
    CircuitOpen { alias: String, retry_in_secs: u64 },
    #[error("upstream {alias} did not answer within {secs} s")]
    Timeout { alias: String, secs: u64 },
    #[error("upstream {alias} cannot be reached: {detail}")]
    Connect { alias: String, detail: String },
    #[error("upstream {alias} failed TLS verification: {detail}")]
    Tls { alias: String, detail: String },
    #[error("upstream {alias} could not be authenticated: {detail}")]
    Auth { alias: String, detail: String },
    #[error("upstream {alias} answered {status}: {detail}")]
    Failed {
        alias: String,
        status: u16,
        detail: String,
    },
    #[error(
        "upstream {alias} answered more than {cap} bytes; the answer was cut off and not used"
    )]
    TooLarge { alias: String, cap: usize },
    #[error("upstream {alias} answered something that is not OSB (status {status}): {detail}")]
    Malformed {
        alias: String,
        status: u16,
        detail: String,
    },
}

impl UpstreamError {
    /// What the platform may be told: the upstream's alias and what went wrong, never a
    /// transport detail (which names its address). An upstream's own error description is
    /// passed on.
    pub fn public(&self) -> String {
        match self {
            UpstreamError::Connect { alias, .. } => format!("upstream {alias} cannot be reached"),
            UpstreamError::Tls { alias, .. } => {
                format!("upstream {alias} failed TLS verification")
            }
            UpstreamError::Auth { alias, .. } => {
                format!("upstream {alias} could not be authenticated")
            }
            UpstreamError::Malformed { alias, status, .. } => {
                format!("upstream {alias} answered something that is not OSB (status {status})")
            }
            other => other.to_string(),
        }
    }

    /// A short label: metrics and `/health` show it, never the detail.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::CircuitOpen { .. } => "circuit_open",
            UpstreamError::Timeout { .. } => "timeout",
            UpstreamError::Connect { .. } => "unreachable",
            UpstreamError::Tls { .. } => "tls",
            UpstreamError::Auth { .. } => "auth",
            UpstreamError::Failed { .. } => "failed",
            UpstreamError::Malformed { .. } => "malformed",
            UpstreamError::TooLarge { .. } => "too_large",
        }
    }
}

/// One OSB call to forward.
#[derive(Debug, Clone)]
pub struct OsbRequest {
    pub method: Method,
    /// `/v2/...`, ids already the upstream's own, segments escaped.
    pub path: String,
    pub query: Vec<(String, String)>,
    /// The JSON body, serialised once by the caller (and shared, not copied, by a retry).
    pub body: Option<bytes::Bytes>,
    pub api_version: String,
    pub originating_identity: Option<String>,
    pub request_identity: Option<String>,
    /// A catalog fetch: read with the upstream's catalog cap, not its answer cap.
    pub catalog: bool,
}

impl OsbRequest {
    pub fn new(method: Method, path: impl Into<String>, api_version: impl Into<String>) -> Self {
        OsbRequest {
            method,
            path: path.into(),
            query: Vec::new(),
            body: None,
            api_version: api_version.into(),
            originating_identity: None,
            request_identity: None,
            catalog: false,
        }
    }
}

/// An upstream's answer: a status OSB defines, the body read as what the call expects,
/// and `Retry-After` as sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Read<T> {
    pub status: u16,
    pub body: T,
    pub retry_after: Option<String>,
}

/// An upstream's OSB answer, typed.
pub type OsbResponse = Read<osb::Answer>;

/// An upstream's answer before it is read: bytes.
type Raw = Read<bytes::Bytes>;

/// Statuses an OSB broker answers with; anything else is not OSB.
const OSB_STATUSES: &[u16] = &[
    200, 201, 202, 400, 401, 403, 404, 409, 410, 412, 422, 501, 507,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
        }
    }
}

#[derive(Debug)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

/// Told about every call: alias, outcome, how long it took.
pub type Observer = std::sync::Arc<dyn Fn(&str, &str, Duration) + Send + Sync>;

pub struct Upstream {
    observer: Option<Observer>,
    settings: UpstreamSettings,
    base: url::Url,
    http: reqwest::Client,
    breaker: Mutex<Breaker>,
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
}

impl Upstream {
    pub fn new(settings: UpstreamSettings) -> Result<Self, String> {
        let mut base =
            url::Url::parse(&settings.url).map_err(|e| format!("url {:?}: {e}", settings.url))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(format!("url {:?}: must be http or https", settings.url));
        }
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(settings.connect_timeout_secs.max(1)))
            .timeout(Duration::from_secs(settings.request_timeout_secs.max(1)))
            .redirect(reqwest::redirect::Policy::none())
            .danger_accept_invalid_certs(settings.skip_tls_verification);
        if let Some(path) = &settings.ca_certificate {
            let pem = std::fs::read(path)
                .map_err(|e| format!("ca_certificate {}: {e}", path.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| format!("ca_certificate {}: {e}", path.display()))?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder.build().map_err(|e| e.to_string())?;
        Ok(Upstream {
            observer: None,
            settings,
            base,
            http,
            breaker: Mutex::new(Breaker {
                failures: 0,
                open_until: None,
                probing: false,
            }),
            token: tokio::sync::Mutex::new(None),
        })
    }

    /// Reports every call's outcome (for metrics).
    pub fn with_observer(mut self, observer: Observer) -> Self {
        self.observer = Some(observer);
        self
    }

    pub fn alias(&self) -> &str {
        &self.settings.alias
    }

    pub fn settings(&self) -> &UpstreamSettings {
        &self.settings
    }

    pub fn breaker_state(&self) -> BreakerState {
        let b = self.breaker.lock().expect("breaker lock");
        match b.open_until {
            None => BreakerState::Closed,
            Some(until) if Instant::now() < until && !b.probing => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// Lets a call through, or refuses it while the circuit is open.
    fn admit(&self) -> Result<(), UpstreamError> {
        let mut b = self.breaker.lock().expect("breaker lock");
        match b.open_until {
            None => Ok(()),
            Some(until) if Instant::now() < until || b.probing => Err(UpstreamError::CircuitOpen {
                alias: self.settings.alias.clone(),
                retry_in_secs: until.saturating_duration_since(Instant::now()).as_secs(),
            }),
            Some(_) => {
                // Cool-down over: this call is the one probe.
                b.probing = true;
                Ok(())
            }
        }
    }

    fn record(&self, healthy: bool) {
        let mut b = self.breaker.lock().expect("breaker lock");
        b.probing = false;
        if healthy {
            b.failures = 0;
            b.open_until = None;
        } else {
            b.failures = b.failures.saturating_add(1);
            if b.failures >= self.settings.breaker.failures.max(1) || b.open_until.is_some() {
                let cool_down = Duration::from_secs(self.settings.breaker.cool_down_secs);
                b.open_until = Some(Instant::now() + cool_down);
                tracing::warn!(upstream = %self.settings.alias, failures = b.failures, "circuit opened");
            }
        }
    }

    /// Sends one OSB call and checks the answer is OSB. Transport failures, timeouts and
    /// 5xx answers count against the circuit breaker; any OSB answer counts for it.
    pub async fn send(
        &self,
        request: &OsbRequest,
        kind: osb::Kind,
    ) -> Result<OsbResponse, UpstreamError> {
        let read = |status, body: &[u8]| {
            osb::Answer::read(kind, status, body).map_err(|e| format!("{kind:?} answer: {e}"))
        };
        self.send_guarded(request, read).await
    }

    /// One call through the breaker; `read` turns the body into what the call expects,
    /// and a body it cannot read is not OSB.
    async fn send_guarded<T>(
        &self,
        request: &OsbRequest,
        read: impl Fn(u16, &[u8]) -> Result<T, String>,
    ) -> Result<Read<T>, UpstreamError> {
        let started = Instant::now();
        let result = self.send_checked(request, read).await;
        if let Some(observe) = &self.observer {
            let outcome = match &result {
                Ok(r) if r.status < 400 => "ok",
                Ok(_) => "refused",
                Err(e) => e.kind(),
            };
            observe(&self.settings.alias, outcome, started.elapsed());
        }
        result
    }

    async fn send_checked<T>(
        &self,
        request: &OsbRequest,
        read: impl Fn(u16, &[u8]) -> Result<T, String>,
    ) -> Result<Read<T>, UpstreamError> {
        self.admit()?;
        let result = self.send_once(request, false).await;
        let result = match result {
            Err(UpstreamError::Failed { status: 401, .. })
                if matches!(self.settings.auth, AuthSettings::ClientCredentials { .. }) =>
            {
                // The cached token may have been revoked: fetch a new one, once.
                self.send_once(request, true).await
            }
            other => other,
        };
        let result = result.and_then(|raw| {
            let body = read(raw.status, &raw.body).map_err(|detail| UpstreamError::Malformed {
                alias: self.settings.alias.clone(),
                status: raw.status,
                detail,
            })?;
            Ok(Read {
                status: raw.status,
                body,
                retry_after: raw.retry_after,
            })
        });
        let healthy = match &result {
            Ok(_) => true,
            Err(UpstreamError::Failed { status, .. }) => *status < 500,
            Err(UpstreamError::Auth { .. }) => false,
            Err(_) => false,
        };
        self.record(healthy);
        result
    }

    async fn send_once(
        &self,
        request: &OsbRequest,
        fresh_token: bool,
    ) -> Result<Raw, UpstreamError> {
        let alias = &self.settings.alias;
        let url = self
            .base
            .join(request.path.trim_start_matches('/'))
            .map_err(|e| UpstreamError::Connect {
                alias: alias.clone(),
                detail: format!("bad path: {e}"),
            })?;
        let version = self
            .settings
            .api_version
            .clone()
            .unwrap_or_else(|| request.api_version.clone());
        let mut builder = self
            .http
            .request(request.method.clone(), url)
            .query(&request.query)
            .header("X-Broker-API-Version", version);
        if let Some(v) = &request.originating_identity {
            builder = builder.header("X-Broker-API-Originating-Identity", v);
        }
        if let Some(v) = &request.request_identity {
            builder = builder.header("X-Broker-API-Request-Identity", v);
        }
        if let Some(body) = &request.body {
            builder = builder
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone());
        }
        let builder = self.authorize(builder, fresh_token).await?;
        let response = builder.send().await.map_err(|e| self.transport_error(e))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let cap = if request.catalog {
            self.settings.max_catalog_bytes
        } else {
            self.settings.max_response_bytes
        };
        let bytes = crate::bounded::read(response, cap)
            .await
            .map_err(|e| match e {
                crate::bounded::ReadError::TooLarge { cap } => UpstreamError::TooLarge {
                    alias: alias.clone(),
                    cap,
                },
                crate::bounded::ReadError::Transport(e) => self.transport_error(e),
            })?;
        self.judge(status, bytes, retry_after)
    }

    /// Adds the upstream's credentials to a request: basic, bearer, or a
    /// client-credentials token (fetched again when `fresh_token`).
    async fn authorize(
        &self,
        builder: reqwest::RequestBuilder,
        fresh_token: bool,
    ) -> Result<reqwest::RequestBuilder, UpstreamError> {
        let alias = &self.settings.alias;
        let builder = match &self.settings.auth {
            AuthSettings::None => builder,
            AuthSettings::Basic { username, password } => {
                builder.basic_auth(username, Some(password.expose()))
            }
            AuthSettings::Bearer { token } => builder.bearer_auth(token.expose()),
            AuthSettings::ClientCredentials {
                token_url,
                client_id,
                client_secret,
                scopes,
            } => {
                let grant = Grant {
                    token_url,
                    client_id,
                    client_secret,
                    scopes,
                };
                let token = self.token(grant, fresh_token).await?;
                let mut value =
                    HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                        UpstreamError::Auth {
                            alias: alias.clone(),
                            detail: "the token endpoint issued a token that is not a header value"
                                .into(),
                        }
                    })?;
                value.set_sensitive(true);
                builder.header(AUTHORIZATION, value)
            }
        };
        Ok(builder)
    }

    /// What an upstream's answer is: a 5xx or 401 is its failure, a status
    /// OSB does not define is malformed, anything else is read.
    fn judge(
        &self,
        status: StatusCode,
        bytes: bytes::Bytes,
        retry_after: Option<String>,
    ) -> Result<Raw, UpstreamError> {
        let alias = &self.settings.alias;
        if status.is_server_error() {
            let described = serde_json::from_slice::<osb::ErrorBody>(&bytes)
                .ok()
                .and_then(|b| b.description)
                .unwrap_or_else(|| "no description".into())
                .chars()
                .take(500)
                .collect();
            return Err(UpstreamError::Failed {
                alias: alias.clone(),
                status: status.as_u16(),
                detail: described,
            });
        }
        if status == StatusCode::UNAUTHORIZED {
            return Err(UpstreamError::Failed {
                alias: alias.clone(),
                status: 401,
                detail: "the upstream refused Brokerage's credentials".into(),
            });
        }
        if !OSB_STATUSES.contains(&status.as_u16()) {
            return Err(UpstreamError::Malformed {
                alias: alias.clone(),
                status: status.as_u16(),
                detail: "the status is not one OSB defines".into(),
            });
        }
        Ok(Read {
            status: status.as_u16(),
            body: bytes,
            retry_after,
        })
    }

    fn transport_error(&self, e: reqwest::Error) -> UpstreamError {
        let alias = self.settings.alias.clone();
        if e.is_timeout() {
            return UpstreamError::Timeout {
                alias,
                secs: self.settings.request_timeout_secs,
            };
        }
        // Walk the source chain: TLS failures show up deep inside connect errors.
        let e = e.without_url();
        let mut detail = e.to_string();
        let mut source = std::error::Error::source(&e);
        let mut tls = false;
        while let Some(s) = source {
            let text = s.to_string();
            if text.contains("certificate") || text.contains("tls") || text.contains("TLS") {
                tls = true;
            }
            detail = format!("{detail}: {text}");
            source = s.source();
        }
        if tls {
            UpstreamError::Tls { alias, detail }
        } else {
            UpstreamError::Connect { alias, detail }
        }
    }

    /// The cached client-credentials token, fetched anew when missing, about to expire, or
    /// refused.
    async fn token(&self, grant: Grant<'_>, fresh: bool) -> Result<String, UpstreamError> {
        let Grant {
            token_url,
            client_id,
            client_secret,
            scopes,
        } = grant;
        let mut cached = self.token.lock().await;
        if let Some((token, valid_until)) = cached.as_ref() {
            if !fresh && Instant::now() < *valid_until {
                return Ok(token.clone());
            }
        }
        let auth_error = |detail: String| UpstreamError::Auth {
            alias: self.settings.alias.clone(),
            detail,
        };
        let client = BasicClient::new(ClientId::new(client_id.to_string()))
            .set_client_secret(ClientSecret::new(client_secret.expose().to_string()))
            .set_token_uri(
                TokenUrl::new(token_url.to_string())
                    .map_err(|e| auth_error(format!("token_url: {e}")))?,
            );
        let response = client
            .exchange_client_credentials()
            .add_scopes(scopes.iter().cloned().map(Scope::new))
            .request_async(&crate::bounded::OAuthClient {
                http: &self.http,
                cap: self.settings.max_response_bytes,
            })
            .await
            .map_err(|e| auth_error(format!("token request to {token_url} failed: {e}")))?;
        let token = response.access_token().secret().clone();
        *cached = Some((
            token.clone(),
            renew_at(Instant::now(), response.expires_in()),
        ));
        Ok(token)
    }

    /// `GET /v2/catalog`, read leniently: each service that is not OSB is left out and
    /// reported, the rest kept ([`osb::Catalog::read_lenient`]).
    pub async fn catalog(&self, api_version: &str) -> Result<osb::Checked, UpstreamError> {
        let mut request = OsbRequest::new(Method::GET, "/v2/catalog", api_version);
        request.catalog = true;
        let read = |status, body: &[u8]| {
            if status != 200 {
                return Err("a catalog needs status 200".to_string());
            }
            osb::Catalog::read_lenient(body)
        };
        Ok(self.send_guarded(&request, read).await?.body)
    }
}

/// When a token issued at `now` must be renewed: a tenth of its lifetime (at most a minute)
/// before it ends. Whatever lifetime the token endpoint claims, at most a day is believed,
/// so no number it sends can overflow the clock.
fn renew_at(now: Instant, expires_in: Option<Duration>) -> Instant {
    const LONGEST: Duration = Duration::from_secs(24 * 3600);
    let lifetime = expires_in.unwrap_or(Duration::from_secs(300)).min(LONGEST);
    let margin = (lifetime / 10).min(Duration::from_secs(60));
    now.checked_add(lifetime - margin).unwrap_or(now)
}

/// The version Brokerage announces upstream when the platform's is not at hand.
pub fn default_api_version() -> String {
    osb::ApiVersion::CURRENT.to_string()
}

/// The upstream's client-credentials settings, as a token request reads them.
struct Grant<'a> {
    token_url: &'a str,
    client_id: &'a str,
    client_secret: &'a crate::settings::Secret,
    scopes: &'a [String],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_lifetimes_saturate() {
        let now = Instant::now();
        assert_eq!(
            renew_at(now, Some(Duration::from_secs(u64::MAX))),
            now + Duration::from_secs(24 * 3600 - 60)
        );
        assert_eq!(
            renew_at(now, Some(Duration::from_secs(100))),
            now + Duration::from_secs(90)
        );
        assert_eq!(renew_at(now, Some(Duration::ZERO)), now);
        assert_eq!(renew_at(now, None), now + Duration::from_secs(270));
    }
}
