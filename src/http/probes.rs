//! The probes: liveness, readiness (the store and backends, probed at most once per
//! interval), and the Prometheus metrics behind their own credentials.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::AppState;
use crate::broker::Broker;
use crate::error::OsbError;

/// `/health`, `/ready` and `/metrics`.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
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
pub(super) struct Readiness {
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
