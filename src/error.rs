//! The one error type OSB calls fail with. Each variant carries its HTTP status and OSB
//! error code; the HTTP layer turns it into the response body `{"error", "description"}`
//! and logs what is internal, once, with its cause.

use crate::backend::BackendError;
use crate::store::StoreError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum OsbError {
    /// 400: the request is malformed or names something that does not exist.
    #[error("{0}")]
    BadRequest(String),
    /// 401: missing or wrong broker credentials.
    #[error("missing or wrong broker credentials")]
    Unauthorized,
    /// 404: no such instance or binding (fetch, update, bind).
    #[error("{0}")]
    NotFound(String),
    /// 405: the route exists, the method does not.
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    /// 409: the id exists with other attributes.
    #[error("{0}")]
    Conflict(String),
    /// 410 with `{}`: deprovision or unbind of what does not exist.
    #[error("gone")]
    Gone,
    /// 408: the request body did not arrive in time.
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    /// 412: missing or unsupported `X-Broker-API-Version`.
    #[error("{0}")]
    PreconditionFailed(String),
    /// 413: the body is larger than `broker.max_body_bytes`.
    #[error("request body larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// 415: a body that is not `application/json`.
    #[error("request bodies must be application/json")]
    UnsupportedMediaType,
    /// 422 `AsyncRequired`: the plan only runs asynchronously.
    #[error("this plan runs asynchronously: repeat the request with accepts_incomplete=true")]
    AsyncRequired,
    /// 422 `ConcurrencyError`: another operation on the same resource is in flight.
    #[error("{0}")]
    Concurrency(String),
    /// 422 `RequiresApp`: the binding needs an app.
    #[error("this service can only be bound to an application (app_guid)")]
    RequiresApp,
    /// 422 `MaintenanceInfoConflict`: `maintenance_info.version` does not match the catalog.
    #[error("{0}")]
    MaintenanceInfoConflict(String),
    /// 422 without a code: understood but refused in the resource's current state.
    #[error("{0}")]
    Unprocessable(String),
    /// 500: a failure the client cannot fix; the detail is logged, not sent.
    #[error("internal error: {0}")]
    Internal(String),
    /// 502: an upstream failed or answered something that is not OSB; the cause (which
    /// names its address) is logged, not sent.
    #[error("{public}")]
    BadGateway { public: String, cause: String },
    /// 503: a backend, the state store or an upstream cannot be reached; the cause is
    /// logged, not sent.
    #[error("{public}")]
    Unavailable { public: String, cause: String },
    /// 507: the backend has no room left for what the plan promises.
    #[error("{0}")]
    InsufficientStorage(String),
    /// 504: an upstream did not answer in time.
    #[error("{0}")]
    GatewayTimeout(String),
}

impl OsbError {
    pub fn status(&self) -> u16 {
        use OsbError::*;
        match self {
            BadRequest(_) => 400,
            Unauthorized => 401,
            NotFound(_) => 404,
            MethodNotAllowed => 405,
            Conflict(_) => 409,
            RequestTimeout => 408,
            Gone => 410,
            PreconditionFailed(_) => 412,
            PayloadTooLarge(_) => 413,
            UnsupportedMediaType => 415,
            AsyncRequired
            | Concurrency(_)
            | RequiresApp
            | MaintenanceInfoConflict(_)
            | Unprocessable(_) => 422,
            Internal(_) => 500,
            BadGateway { .. } => 502,
            Unavailable { .. } => 503,
            GatewayTimeout(_) => 504,
            InsufficientStorage(_) => 507,
        }
    }

    /// The OSB `error` code.
    pub fn code(&self) -> &'static str {
        use OsbError::*;
        match self {
            BadRequest(_) => "BadRequest",
            Unauthorized => "Unauthorized",
            NotFound(_) => "NotFound",
            MethodNotAllowed => "MethodNotAllowed",
            Conflict(_) => "Conflict",
            RequestTimeout => "RequestTimeout",
            Gone => "Gone",
            PreconditionFailed(_) => "PreconditionFailed",
            PayloadTooLarge(_) => "PayloadTooLarge",
            UnsupportedMediaType => "UnsupportedMediaType",
            AsyncRequired => "AsyncRequired",
            Concurrency(_) => "ConcurrencyError",
            RequiresApp => "RequiresApp",
            MaintenanceInfoConflict(_) => "MaintenanceInfoConflict",
            Unprocessable(_) => "UnprocessableEntity",
            Internal(_) => "InternalError",
            BadGateway { .. } => "BadGateway",
            Unavailable { .. } => "ServiceUnavailable",
            GatewayTimeout(_) => "GatewayTimeout",
            InsufficientStorage(_) => "InsufficientStorage",
        }
    }

    /// What the client is told; internal detail stays in the log.
    pub fn description(&self) -> String {
        match self {
            OsbError::Internal(_) => {
                "the broker failed to complete the request; the operator can find the cause in its log".into()
            }
            other => other.to_string(),
        }
    }

    /// What the log says about a failure: the description and, where it differs, the
    /// cause the client is not told.
    pub fn cause(&self) -> Option<&str> {
        match self {
            OsbError::BadGateway { cause, .. } | OsbError::Unavailable { cause, .. } => Some(cause),
            _ => None,
        }
    }

    pub fn concurrency() -> Self {
        OsbError::Concurrency(
            "another operation on this resource is in progress; try again when it has finished"
                .into(),
        )
    }
}

impl From<upstreams::UpstreamError> for OsbError {
    fn from(e: upstreams::UpstreamError) -> Self {
        let (public, cause) = (e.public(), e.to_string());
        match e {
            upstreams::UpstreamError::CircuitOpen { .. } => OsbError::Unavailable { public, cause },
            upstreams::UpstreamError::Timeout { .. } => OsbError::GatewayTimeout(public),
            _ => OsbError::BadGateway { public, cause },
        }
    }
}

impl From<StoreError> for OsbError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(cause) => OsbError::Unavailable {
                public: "the broker's state store is unavailable".into(),
                cause,
            },
            corrupt @ StoreError::Corrupt { .. } => OsbError::Internal(corrupt.to_string()),
        }
    }
}

impl From<BackendError> for OsbError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::Unavailable { public, detail } => OsbError::Unavailable {
                public,
                cause: detail,
            },
            BackendError::Conflict(m) => OsbError::Conflict(m),
            BackendError::Rejected(m) => OsbError::Unprocessable(m),
            BackendError::BadRequest(m) => OsbError::BadRequest(m),
            BackendError::Failed(m) => OsbError::Internal(m),
        }
    }
}
