//! API errors and their one mapping to HTTP status codes and OpenAI's error body.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use exo_protocol::NodeError;
use serde::Serialize;

/// An error answered to an API client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or asks for something unsupported (400).
    #[error("{message}")]
    BadRequest {
        /// What is wrong.
        message: String,
        /// The offending parameter, if one.
        param: Option<&'static str>,
        /// OpenAI error code, if one applies.
        code: Option<&'static str>,
    },
    /// No node can serve the request now (503).
    #[error("{0}")]
    Unavailable(String),
    /// Every slot is busy and the queue is full (429, with `retry-after`).
    #[error("{message}")]
    Overloaded {
        /// What is full.
        message: String,
        /// Seconds the client should wait.
        retry_after: u32,
    },
    /// Something failed inside the cluster (500).
    #[error("{0}")]
    Internal(String),
    /// A node stopped making progress on the request (504).
    #[error("{0}")]
    Timeout(String),
    /// No API key, or not an accepted one (401).
    #[error("{0}")]
    Unauthorized(String),
    /// No such path (404).
    #[error("{0}")]
    NotFound(String),
    /// The path exists, the method does not (405).
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The body is larger than the router accepts (413).
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The body is not JSON (415).
    #[error("{0}")]
    UnsupportedMediaType(String),
}

impl ApiError {
    /// A 400 about `param`.
    pub fn bad(param: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param: Some(param),
            code: None,
        }
    }

    /// HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        }
    }

    /// OpenAI's error body.
    pub fn body(&self) -> ErrorBody {
        let (kind, param, code) = match self {
            ApiError::BadRequest { param, code, .. } => ("invalid_request_error", *param, *code),
            ApiError::Unavailable(_) => ("service_unavailable", None, Some("no_capacity")),
            ApiError::Overloaded { .. } => ("rate_limit_error", None, Some("rate_limit_exceeded")),
            ApiError::Internal(_) => ("server_error", None, None),
            ApiError::Timeout(_) => ("server_error", None, Some("timeout")),
            ApiError::Unauthorized(_) => ("invalid_request_error", None, Some("invalid_api_key")),
            ApiError::NotFound(_) => ("invalid_request_error", None, Some("unknown_url")),
            ApiError::MethodNotAllowed(_) => {
                ("invalid_request_error", None, Some("method_not_allowed"))
            }
            ApiError::PayloadTooLarge(_) => {
                ("invalid_request_error", None, Some("request_too_large"))
            }
            ApiError::UnsupportedMediaType(_) => (
                "invalid_request_error",
                None,
                Some("unsupported_media_type"),
            ),
        };
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind,
                param,
                code,
            },
        }
    }
}

/// OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    error: ErrorDetail,
}

/// What went wrong, for the client.
#[derive(Debug, Serialize)]
struct ErrorDetail {
    message: String,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::InvalidRequest(m) => ApiError::BadRequest {
                message: m,
                param: None,
                code: None,
            },
            NodeError::ContextLength { .. } => ApiError::BadRequest {
                message: format!("{e}; shorten the prompt"),
                param: Some("messages"),
                code: Some("context_length_exceeded"),
            },
            NodeError::Busy => {
                ApiError::Unavailable("every sequence slot is busy; retry shortly".into())
            }
            NodeError::WrongRole { .. }
            | NodeError::UnknownRequest(_)
            | NodeError::Transfer(_)
            | NodeError::Engine(_) => ApiError::Internal(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), Json(self.body())).into_response();
        match self {
            ApiError::Overloaded { retry_after, .. } => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            }
            ApiError::Unauthorized(_) => {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"exo-router\""),
                );
            }
            _ => {}
        }
        response
    }
}
