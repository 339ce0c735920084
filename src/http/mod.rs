//! The HTTP layer, the only code that knows axum: routes, authentication, the API version
//! check, request tracing, and the mapping of domain results to OSB responses. Handlers
//! extract, call the [`Broker`], and map the answer; nothing else.

mod dashboard;
mod extract;
mod logs;
pub mod serve;
pub mod tls;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::header::{HeaderName, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::Instrument;
use upstreams::osb::ApiVersion;

use crate::broker::{Broker, CallContext, Reply};
use crate::config::Credential;
use crate::error::OsbError;
use extract::{OsbJson, OsbPath, OsbQuery};

const API_VERSION: HeaderName = HeaderName::from_static("x-broker-api-version");
const REQUEST_IDENTITY: HeaderName = HeaderName::from_static("x-broker-api-request-identity");
const ORIGINATING_IDENTITY: HeaderName =
    HeaderName::from_static("x-broker-api-originating-identity");

/// Limits on what a request may cost.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body (413 past it).
    pub max_body_bytes: usize,
    /// Longest a request body may take to arrive (408 past it).
    pub body_timeout: std::time::Duration,
    /// `/ready` probes the store and backends at most once per this interval.
    pub ready_interval: std::time::Duration,
}

/// What the handlers share: cheap handles only.
#[derive(Clone)]
pub struct AppState {
    pub broker: Broker,
    credentials: Arc<BrokerCredentials>,
    metrics_credentials: Arc<BrokerCredentials>,
    pub limits: Limits,
    pub dashboard: Option<Arc<crate::dashboard::Dashboard>>,
    platforms: Arc<crate::dashboard::Platforms>,
    readiness: Arc<Readiness>,
}

impl AppState {
    pub fn new(
        broker: Broker,
        credentials: &[Credential],
        metrics_credentials: &[Credential],
        limits: Limits,
        dashboard: Option<Arc<crate::dashboard::Dashboard>>,
        platforms: Arc<crate::dashboard::Platforms>,
    ) -> Self {
        AppState {
            broker,
            credentials: Arc::new(BrokerCredentials::new(credentials)),
            metrics_credentials: Arc::new(BrokerCredentials::new(metrics_credentials)),
            limits,
            dashboard,
            platforms,
            readiness: Arc::default(),
        }
    }
}

/// The headers an OSB call carries that upstreams must see too. `X-Api-Info-Location` is
/// kept only when it names a Cloud Controller the operator allows.
impl axum::extract::FromRequestParts<AppState> for CallContext {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = |name: &HeaderName| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        Ok(CallContext {
            api_version: header(&API_VERSION)
                .as_deref()
                .and_then(ApiVersion::parse)
                .unwrap_or(ApiVersion::CURRENT),
            originating_identity: header(&ORIGINATING_IDENTITY),
            request_identity: header(&REQUEST_IDENTITY),
            api_info_location: header(&HeaderName::from_static("x-api-info-location"))
                .and_then(|location| state.platforms.admit(&location)),
        })
    }
}

/// The accepted basic-auth pairs, kept only as SHA-256 digests of `user:password`.
struct BrokerCredentials {
    digests: Vec<[u8; 32]>,
}

impl BrokerCredentials {
    fn new(credentials: &[Credential]) -> Self {
        let digests = credentials
            .iter()
            .map(|c| digest(&format!("{}:{}", c.username, c.password.expose())))
            .collect();
        BrokerCredentials { digests }
    }

    /// Compares against every pair in constant time, whatever matches first.
    fn accepts(&self, header: Option<&HeaderValue>) -> bool {
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

/// The broker's routes and middleware, ready to serve ([`serve::start`]) or to answer one
/// request in process ([`App::answer`]).
#[derive(Clone)]
pub struct App(Router);

impl App {
    /// Answers one request in process: its status and body (the fuzz harness).
    pub async fn answer(&self, request: ::http::Request<Bytes>) -> (StatusCode, Bytes) {
        use tower::ServiceExt;
        let request = request.map(axum::body::Body::from);
        let response = self.0.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap_or_default();
        (status, body)
    }
}

pub fn router(state: AppState) -> App {
    use axum::routing::get as g;
    let osb = Router::new()
        .route("/v2/catalog", g(catalog))
        .route(
            "/v2/service_instances/{instance_id}",
            g(fetch_instance)
                .put(provision)
                .patch(update)
                .delete(deprovision),
        )
        .route(
            "/v2/service_instances/{instance_id}/last_operation",
            g(instance_last_operation),
        )
        .route(
            "/v2/service_instances/{instance_id}/service_bindings/{binding_id}",
            g(fetch_binding).put(bind).delete(unbind),
        )
        .route(
            "/v2/service_instances/{instance_id}/service_bindings/{binding_id}/last_operation",
            g(binding_last_operation),
        )
        .route_layer(middleware::from_fn(check_api_version))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    let router = Router::new()
        .merge(osb)
        .merge(dashboard::routes())
        .merge(logs::routes())
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .method_not_allowed_fallback(|| async { OsbError::MethodNotAllowed })
        .fallback(|| async { OsbError::NotFound("no such route".into()) })
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            OsbError::Internal("a request handler panicked".into()).into_response()
        }))
        .layer(middleware::from_fn_with_state(state.clone(), trace_request))
        .with_state(state);
    App(router)
}

/// One span per request carrying its identity; the identity is echoed back.
async fn trace_request(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = crate::metrics::Metrics::route_label(
        req.extensions()
            .get::<axum::extract::MatchedPath>()
            .map_or("unmatched", |p| p.as_str()),
    );
    let method = crate::metrics::Metrics::method_label(req.method());
    let request_id = req
        .headers()
        .get(&REQUEST_IDENTITY)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 200)
        .map(str::to_string);
    let user = req
        .headers()
        .get(&ORIGINATING_IDENTITY)
        .and_then(|v| v.to_str().ok())
        .and_then(originating_user);
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        path = %loggable(req.uri().path()),
        request_id = request_id.as_deref().unwrap_or(""),
        user = user.as_deref().unwrap_or(""),
    );
    let mut response = next.run(req).instrument(span.clone()).await;
    span.in_scope(|| {
        tracing::info!(
            status = response.status().as_u16(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
            "answered"
        )
    });
    if let Some(id) = request_id.and_then(|id| HeaderValue::from_str(&id).ok()) {
        response.headers_mut().insert(REQUEST_IDENTITY, id);
    }
    state.broker.metrics().observe_request(
        route,
        method,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

/// A request path as logged: a drain's token (its last segment) is a secret and is masked.
fn loggable(path: &str) -> std::borrow::Cow<'_, str> {
    match path
        .strip_prefix("/drains/")
        .and_then(|rest| rest.split_once('/'))
    {
        Some((binding, _token)) => format!("/drains/{binding}/***").into(),
        None => path.into(),
    }
}

/// `platform base64(json)` -> the user id only, never the rest of the identity.
fn originating_user(header: &str) -> Option<String> {
    let (platform, encoded) = header.trim().split_once(' ')?;
    let raw = STANDARD.decode(encoded.trim()).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&raw).ok()?;
    let user = value
        .get("user_id")
        .or_else(|| value.get("username"))?
        .as_str()?;
    let user: String = user.chars().filter(|c| !c.is_control()).take(100).collect();
    Some(format!("{platform}:{user}"))
}

async fn authenticate(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if state.credentials.accepts(req.headers().get(AUTHORIZATION)) {
        next.run(req).await
    } else {
        OsbError::Unauthorized.into_response()
    }
}

async fn check_api_version(req: Request, next: Next) -> Response {
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

impl IntoResponse for OsbError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            match self.cause() {
                Some(cause) => tracing::error!(error = %self, %cause, "request failed"),
                None => tracing::error!(error = %self, "request failed"),
            }
        } else {
            tracing::debug!(error = %self, "request refused");
        }
        if matches!(self, OsbError::Gone) {
            return (status, Json(json!({}))).into_response();
        }
        let body = upstreams::osb::ErrorBody {
            error: Some(self.code().into()),
            description: Some(self.description()),
            ..Default::default()
        };
        let mut response = (status, Json(body)).into_response();
        if matches!(self, OsbError::Unauthorized) {
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"brokerage\""),
            );
        }
        response
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::OK);
        let mut response = (status, Json(self.answer)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

type Answer = Result<Reply, OsbError>;

/// An answer cut to the caller's `X-Broker-API-Version`: no field its version does not
/// define ([`upstreams::versions`]).
struct Fitted(ApiVersion, Answer);

impl Fitted {
    fn new(ctx: &CallContext, answer: Answer) -> Self {
        Fitted(ctx.api_version, answer)
    }
}

impl IntoResponse for Fitted {
    fn into_response(self) -> Response {
        let Fitted(version, answer) = self;
        match answer {
            Ok(mut reply) => {
                upstreams::versions::fit(&mut reply.answer, version);
                reply.into_response()
            }
            Err(e) => e.into_response(),
        }
    }
}

/// Liveness, and each upstream's circuit breaker and catalog; no authentication.
async fn health(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "status": "ok",
        "upstreams": state.broker.federation().health().await,
    }))
}

/// The last readiness probe, shared by every `/ready` request of this process.
#[derive(Default)]
struct Readiness {
    last: tokio::sync::Mutex<Option<(Instant, Arc<Probed>)>>,
}

/// One probe of the store and every backend: whether each answered, and why not.
struct Probed {
    store: Result<(), String>,
    backends: Vec<(String, Result<(), String>)>,
}

impl Probed {
    fn ready(&self) -> bool {
        self.store.is_ok() && self.backends.iter().all(|(_, s)| s.is_ok())
    }
}

impl Readiness {
    /// The cached probe while younger than `interval`; otherwise one new probe, which
    /// concurrent requests wait for instead of probing themselves.
    async fn probe(&self, broker: &Broker, interval: std::time::Duration) -> Arc<Probed> {
        let mut last = self.last.lock().await;
        if let Some((at, probed)) = last.as_ref() {
            if at.elapsed() < interval {
                return probed.clone();
            }
        }
        let quick = std::time::Duration::from_secs(3);
        let outcome = |r: Result<Result<(), String>, _>| {
            r.unwrap_or_else(|_| Err("no answer within 3 s".to_string()))
        };
        let store = outcome(
            tokio::time::timeout(quick, broker.store().check())
                .await
                .map(|r| r.map_err(|e| e.to_string())),
        );
        let mut backends = Vec::new();
        for (name, backend) in broker.backends() {
            let status = outcome(
                tokio::time::timeout(quick, backend.check())
                    .await
                    .map(|r| r.map_err(|e| e.to_string())),
            );
            backends.push((name.to_string(), status));
        }
        backends.sort_by(|a, b| a.0.cmp(&b.0));
        let probed = Arc::new(Probed { store, backends });
        *last = Some((Instant::now(), probed.clone()));
        probed
    }
}

/// Readiness: the store and every backend answer, probed at most once per
/// `broker.ready_interval_secs` whatever the request rate. Upstream breaker states are shown
/// but do not make the broker unready (one dead upstream must not take the rest out of
/// rotation). A process that got SIGTERM is not ready (`stopping`). Anyone learns ready or
/// not per system; why not (which may name hosts and users) only with the metrics
/// credentials.
async fn ready(State(state): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    let probed = state
        .readiness
        .probe(&state.broker, state.limits.ready_interval)
        .await;
    let detailed = state
        .metrics_credentials
        .accepts(headers.get(AUTHORIZATION));
    let show = |status: &Result<(), String>| match (status, detailed) {
        (Ok(()), _) => json!({"ok": true}),
        (Err(e), true) => json!({"ok": false, "error": e}),
        (Err(_), false) => json!({"ok": false}),
    };
    let backends: serde_json::Map<String, serde_json::Value> = probed
        .backends
        .iter()
        .map(|(name, status)| (name.clone(), show(status)))
        .collect();
    let stopping = state.broker.stopping();
    let ready = probed.ready() && !stopping;
    let body = json!({
        "ready": ready,
        "stopping": stopping,
        "store": show(&probed.store),
        "backends": backends,
        "upstreams": state.broker.federation().health().await,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// Prometheus metrics, behind their own credentials.
async fn metrics(State(state): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    if !state
        .metrics_credentials
        .accepts(headers.get(AUTHORIZATION))
    {
        return OsbError::Unauthorized.into_response();
    }
    let broker = &state.broker;
    for u in broker.federation().upstreams() {
        let value = match u.breaker_state() {
            upstreams::BreakerState::Closed => 0,
            upstreams::BreakerState::HalfOpen => 1,
            upstreams::BreakerState::Open => 2,
        };
        broker
            .metrics()
            .breaker_state
            .get_or_create(&crate::metrics::UpstreamLabels {
                upstream: u.alias().to_string(),
            })
            .set(value);
    }
    (
        [(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        broker.metrics().render(),
    )
        .into_response()
}

/// The merged catalog snapshot: never waits on an upstream.
async fn catalog(State(state): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    // Only the version matters here (checked at the door, so it parses).
    let version = headers
        .get(&API_VERSION)
        .and_then(|v| v.to_str().ok())
        .and_then(ApiVersion::parse)
        .unwrap_or(ApiVersion::CURRENT);
    let json: Bytes = state.broker.federation().snapshot().json_for(version);
    (
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        json,
    )
        .into_response()
}

async fn provision(
    State(state): State<AppState>,
    OsbPath(instance_id): OsbPath<String>,
    query: OsbQuery,
    ctx: CallContext,
    OsbJson(body): OsbJson<upstreams::osb::ProvisionRequest>,
) -> Fitted {
    let incomplete = query.accepts_incomplete();
    Fitted::new(
        &ctx,
        state
            .broker
            .provision(&instance_id, body, incomplete, &ctx)
            .await,
    )
}

async fn update(
    State(state): State<AppState>,
    OsbPath(instance_id): OsbPath<String>,
    query: OsbQuery,
    ctx: CallContext,
    OsbJson(body): OsbJson<upstreams::osb::UpdateRequest>,
) -> Fitted {
    let incomplete = query.accepts_incomplete();
    Fitted::new(
        &ctx,
        state
            .broker
            .update(&instance_id, body, incomplete, &ctx)
            .await,
    )
}

async fn deprovision(
    State(state): State<AppState>,
    OsbPath(instance_id): OsbPath<String>,
    query: OsbQuery,
    ctx: CallContext,
) -> Fitted {
    let (service, plan) = (query.service_id(), query.plan_id());
    let incomplete = query.accepts_incomplete();
    Fitted::new(
        &ctx,
        state
            .broker
            .deprovision(&instance_id, service, plan, incomplete, &ctx)
            .await,
    )
}

async fn fetch_instance(
    State(state): State<AppState>,
    OsbPath(instance_id): OsbPath<String>,
    ctx: CallContext,
) -> Fitted {
    Fitted::new(&ctx, state.broker.fetch_instance(&instance_id, &ctx).await)
}

async fn instance_last_operation(
    State(state): State<AppState>,
    OsbPath(instance_id): OsbPath<String>,
    query: OsbQuery,
    ctx: CallContext,
) -> Fitted {
    let operation = query.operation();
    Fitted::new(
        &ctx,
        state
            .broker
            .instance_last_operation(&instance_id, operation, &ctx)
            .await,
    )
}

async fn bind(
    State(state): State<AppState>,
    OsbPath((instance_id, binding_id)): OsbPath<(String, String)>,
    query: OsbQuery,
    ctx: CallContext,
    OsbJson(body): OsbJson<upstreams::osb::BindRequest>,
) -> Fitted {
    let incomplete = query.accepts_incomplete();
    Fitted::new(
        &ctx,
        state
            .broker
            .bind(&instance_id, &binding_id, body, incomplete, &ctx)
            .await,
    )
}

async fn unbind(
    State(state): State<AppState>,
    OsbPath((instance_id, binding_id)): OsbPath<(String, String)>,
    query: OsbQuery,
    ctx: CallContext,
) -> Fitted {
    let (service, plan) = (query.service_id(), query.plan_id());
    let incomplete = query.accepts_incomplete();
    Fitted::new(
        &ctx,
        state
            .broker
            .unbind(&instance_id, &binding_id, service, plan, incomplete, &ctx)
            .await,
    )
}

async fn fetch_binding(
    State(state): State<AppState>,
    OsbPath((instance_id, binding_id)): OsbPath<(String, String)>,
    ctx: CallContext,
) -> Fitted {
    Fitted::new(
        &ctx,
        state
            .broker
            .fetch_binding(&instance_id, &binding_id, &ctx)
            .await,
    )
}

async fn binding_last_operation(
    State(state): State<AppState>,
    OsbPath((instance_id, binding_id)): OsbPath<(String, String)>,
    query: OsbQuery,
    ctx: CallContext,
) -> Fitted {
    let operation = query.operation();
    Fitted::new(
        &ctx,
        state
            .broker
            .binding_last_operation(&instance_id, &binding_id, operation, &ctx)
            .await,
    )
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

    #[test]
    fn a_drains_token_is_never_logged() {
        assert_eq!(loggable("/drains/b-1/s3cr3t"), "/drains/b-1/***");
        assert_eq!(loggable("/drains/b-1/s3cr3t/more"), "/drains/b-1/***");
        assert_eq!(loggable("/v2/catalog"), "/v2/catalog");
    }

    #[test]
    fn originating_identity_yields_the_user_only() {
        let encoded = STANDARD.encode(r#"{"user_id":"683ea748","email":"secret@example.com"}"#);
        assert_eq!(
            originating_user(&format!("cloudfoundry {encoded}")).as_deref(),
            Some("cloudfoundry:683ea748")
        );
        assert_eq!(originating_user("cloudfoundry !!"), None);
        assert_eq!(originating_user("nothing"), None);
    }
}
