//! The OSB routes: each handler extracts, calls the [`Broker`], and writes its answer cut
//! to the caller's API version.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header::{HeaderName, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use upstreams::osb::ApiVersion;

use super::extract::{OsbJson, OsbPath, OsbQuery};
use super::{auth, AppState, API_VERSION, ORIGINATING_IDENTITY, REQUEST_IDENTITY};
use crate::broker::{CallContext, Reply};
use crate::error::OsbError;

/// The `/v2` routes, behind the broker's credentials and the API version check.
pub(super) fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/v2/catalog", get(catalog))
        .route(
            "/v2/service_instances/{instance_id}",
            get(fetch_instance)
                .put(provision)
                .patch(update)
                .delete(deprovision),
        )
        .route(
            "/v2/service_instances/{instance_id}/last_operation",
            get(instance_last_operation),
        )
        .route(
            "/v2/service_instances/{instance_id}/service_bindings/{binding_id}",
            get(fetch_binding).put(bind).delete(unbind),
        )
        .route(
            "/v2/service_instances/{instance_id}/service_bindings/{binding_id}/last_operation",
            get(binding_last_operation),
        )
        .route_layer(middleware::from_fn(auth::check_api_version))
        .route_layer(middleware::from_fn_with_state(state, auth::authenticate))
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
