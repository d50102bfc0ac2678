//! One error type for REST responses: `{code, message}` with the right status.
//!
//! User mistakes are 4xx with a message that names the problem; only server faults are 5xx,
//! and those never leak internals beyond the error chain's text.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use cella_api::ApiError;
use cella_core::manager::{ManagerError, error_chain};

/// An HTTP error with E2B's body shape.
#[derive(Debug)]
pub struct HttpError {
    /// Status to answer with.
    pub status: StatusCode,
    /// Message for the body.
    pub message: String,
}

impl HttpError {
    /// An error with a status and message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> HttpError {
        HttpError {
            status,
            message: message.into(),
        }
    }

    /// 400 naming a field.
    pub fn bad_request(message: impl Into<String>) -> HttpError {
        HttpError::new(StatusCode::BAD_REQUEST, message)
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> HttpError {
        HttpError::new(StatusCode::UNAUTHORIZED, message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> HttpError {
        HttpError::new(StatusCode::NOT_FOUND, message)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = ApiError {
            code: self.status.as_u16(),
            message: self.message,
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<ManagerError> for HttpError {
    fn from(e: ManagerError) -> HttpError {
        let status = match &e {
            ManagerError::InvalidField { .. } | ManagerError::DriverUnavailable(_) => {
                StatusCode::BAD_REQUEST
            }
            ManagerError::SandboxNotFound(_) | ManagerError::TemplateNotFound(_) => {
                StatusCode::NOT_FOUND
            }
            ManagerError::WrongState { .. } => StatusCode::CONFLICT,
            ManagerError::PauseUnsupported { .. } | ManagerError::SnapshotUnsupported { .. } => {
                StatusCode::NOT_IMPLEMENTED
            }
            ManagerError::TemplateNotReady(_) | ManagerError::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ManagerError::Conflict(_) => StatusCode::CONFLICT,
            ManagerError::Egress(cella_core::egress::EgressError::PoolExhausted(_)) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ManagerError::Driver(_)
            | ManagerError::Store(_)
            | ManagerError::Template(_)
            | ManagerError::Snapshot(_)
            | ManagerError::Egress(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::error!(error = %error_chain(&e), "request failed");
        }
        HttpError::new(status, error_chain(&e))
    }
}
