//! The HTTP layer, the only code that knows axum. This file assembles the routes
//! ([`osb`], [`probes`], the dashboard and the drains), traces every request, and maps
//! domain errors to OSB error bodies; [`auth`] decides who may call. Handlers extract,
//! call the [`Broker`], and map the answer; nothing else.

mod auth;
mod dashboard;
mod extract;
mod logs;
mod osb;
mod probes;
pub mod serve;
pub mod tls;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::header::{HeaderName, WWW_AUTHENTICATE};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::json;
use tracing::Instrument;

use crate::broker::Broker;
use crate::config::Credential;
use crate::error::OsbError;
use auth::BrokerCredentials;
use probes::Readiness;

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
    let router = Router::new()
        .merge(osb::routes(state.clone()))
        .merge(dashboard::routes())
        .merge(logs::routes())
        .merge(probes::routes())
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

#[cfg(test)]
mod tests {
    use super::*;

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
