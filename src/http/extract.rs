//! Extractors whose every rejection is an OSB error body.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::AppState;
use crate::error::OsbError;

/// Path parameters.
pub struct OsbPath<T>(pub T);

impl<T, S> FromRequestParts<S> for OsbPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = OsbError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, OsbError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| OsbPath(p.0))
            .map_err(|e: PathRejection| OsbError::BadRequest(format!("path: {}", e.body_text())))
    }
}

/// The query parameters OSB calls carry; empty values read as absent.
#[derive(Debug, Default, Deserialize)]
pub struct OsbQuery {
    #[serde(default)]
    accepts_incomplete: Option<String>,
    #[serde(default)]
    service_id: Option<String>,
    #[serde(default)]
    plan_id: Option<String>,
    #[serde(default)]
    operation: Option<String>,
}

impl OsbQuery {
    pub fn accepts_incomplete(&self) -> bool {
        self.accepts_incomplete.as_deref() == Some("true")
    }
    pub fn service_id(&self) -> Option<String> {
        self.service_id.clone().filter(|s| !s.is_empty())
    }
    pub fn plan_id(&self) -> Option<String> {
        self.plan_id.clone().filter(|s| !s.is_empty())
    }
    pub fn operation(&self) -> Option<String> {
        self.operation.clone().filter(|s| !s.is_empty())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for OsbQuery {
    type Rejection = OsbError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, OsbError> {
        axum::extract::Query::<OsbQuery>::from_request_parts(parts, state)
            .await
            .map(|q| q.0)
            .map_err(|e: QueryRejection| OsbError::BadRequest(format!("query: {}", e.body_text())))
    }
}

/// A JSON object body of at most `broker.max_body_bytes`, read as the request type `T`.
/// An empty body reads as `{}`.
pub struct OsbJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for OsbJson<T> {
    type Rejection = OsbError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, OsbError> {
        let limit = state.limits.max_body_bytes;
        let headers = req.headers();
        if let Some(content_type) = headers.get(CONTENT_TYPE) {
            let essence = content_type
                .to_str()
                .unwrap_or("")
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            if essence != "application/json" && !essence.ends_with("+json") {
                return Err(OsbError::UnsupportedMediaType);
            }
        }
        let declared = headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(OsbError::PayloadTooLarge(limit));
        }
        let bytes = tokio::time::timeout(
            state.limits.body_timeout,
            axum::body::to_bytes(req.into_body(), limit),
        )
        .await
        .map_err(|_| OsbError::RequestTimeout)?
        .map_err(|_| OsbError::PayloadTooLarge(limit))?;
        // Parsed once, straight into the request's type.
        let text: &[u8] = match bytes.iter().position(|b| !b.is_ascii_whitespace()) {
            None => b"{}",
            Some(start) if bytes[start] == b'{' => &bytes,
            Some(_) => {
                return Err(OsbError::BadRequest(
                    "the body must be a JSON object".into(),
                ))
            }
        };
        serde_json::from_slice(text).map(OsbJson).map_err(|e| {
            let what = match e.classify() {
                serde_json::error::Category::Data => "a valid request",
                _ => "valid JSON",
            };
            OsbError::BadRequest(format!("the body is not {what}: {e}"))
        })
    }
}
