//! The log service's routes: the drains Cloud Foundry's syslog agent posts to, and the
//! operators' read of an instance's lines (what `brokerage logs` prints).

use axum::extract::{Path, Query, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::AppState;
use crate::error::OsbError;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/drains/{binding_id}/{token}", post(drain))
        .route("/logs/instances/{instance_id}", get(lines))
}

/// A drain: 200 for a live binding's token, 404 with no body for anything else (an
/// unknown binding, a wrong token, a binding unbound). The body is one RFC 5424 message,
/// or several octet-counted ones (`https-batch`), capped like every other body.
async fn drain(
    State(state): State<AppState>,
    Path((binding_id, token)): Path<(String, String)>,
    req: Request,
) -> Response {
    let Some(logs) = state.broker.logs() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if crate::broker::check_id("binding_id", &binding_id).is_err() {
        return StatusCode::NOT_FOUND.into_response();
    }
    let limit = state.limits.max_body_bytes;
    let body = tokio::time::timeout(
        state.limits.body_timeout,
        axum::body::to_bytes(req.into_body(), limit),
    )
    .await;
    let body = match body {
        Err(_) => return StatusCode::REQUEST_TIMEOUT.into_response(),
        Ok(Err(_)) => return StatusCode::PAYLOAD_TOO_LARGE.into_response(),
        Ok(Ok(body)) => body,
    };
    match logs.deliver(&binding_id, &token, &body).await {
        Ok(Some(n)) => {
            state.broker.metrics().log_lines_received.inc_by(n as u64);
            StatusCode::OK.into_response()
        }
        Ok(None) => StatusCode::NOT_FOUND.into_response(),
        Err(e) => {
            tracing::error!(error = %e, "a drain could not be looked up");
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
    }
}

#[derive(Deserialize)]
struct After {
    #[serde(default)]
    after: u64,
}

/// An instance's kept lines after `?after=SEQ`, with what was dropped; behind the broker's
/// own credentials.
async fn lines(
    State(state): State<AppState>,
    Path(instance_id): Path<String>,
    Query(after): Query<After>,
    headers: HeaderMap,
) -> Response {
    if !state.credentials.accepts(headers.get(AUTHORIZATION)) {
        return OsbError::Unauthorized.into_response();
    }
    if let Err(e) = crate::broker::check_id("instance_id", &instance_id) {
        return e.into_response();
    }
    let Some(logs) = state.broker.logs() else {
        return OsbError::NotFound("this broker keeps no logs".into()).into_response();
    };
    match logs.book(&instance_id).await {
        Ok(Some(book)) => {
            let lines: Vec<_> = book.lines.iter().filter(|l| l.seq > after.after).collect();
            Json(serde_json::json!({
                "lines": lines,
                "dropped": book.dropped,
                "next_seq": book.next_seq,
            }))
            .into_response()
        }
        Ok(None) => {
            OsbError::NotFound(format!("instance {instance_id} keeps no logs")).into_response()
        }
        Err(e) => OsbError::from(e).into_response(),
    }
}
