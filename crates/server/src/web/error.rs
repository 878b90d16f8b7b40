//! The one error type of the web layer: answered as
//! `{"error":{"code","message"}}` with a 4xx/5xx status. Database errors
//! are logged and answered without their details.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::store::StoreError;

/// An error answered as JSON.
#[derive(Debug)]
pub struct AppError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl AppError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        AppError {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message: message.into(),
        }
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        AppError {
            status: StatusCode::CONFLICT,
            code: "conflict",
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        AppError {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: message.into(),
        }
    }

    pub fn unauthorised(message: impl Into<String>) -> Self {
        AppError {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorised",
            message: message.into(),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        AppError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "timeout",
            message: message.into(),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        let message = message.into();
        tracing::error!(%message, "internal error while serving a request");
        AppError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message,
        }
    }
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "database error while serving a request");
        AppError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message: "database error; see the server log".into(),
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}
