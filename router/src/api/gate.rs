//! What a request passes before a handler sees it: the API key, the body's size and content type,
//! and the answers for unknown paths and wrong methods, each an OpenAI-style error body.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::auth::{ApiKeys, Denied};
use super::error::ApiError;
use super::response::Endpoint;

/// Largest request body by default: a long conversation with tool schemas fits many times over.
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 << 20;

/// How the HTTP API admits requests.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Keys the API asks for; with none, the API is open.
    pub keys: Arc<ApiKeys>,
    /// `/metrics` without a key (for a Prometheus server that holds none).
    pub open_metrics: bool,
    /// Largest request body, in bytes; larger ones get 413.
    pub max_body_bytes: usize,
}

impl Default for HttpOptions {
    /// An open API (no keys), metrics behind the keys, [`DEFAULT_MAX_BODY_BYTES`].
    fn default() -> Self {
        HttpOptions {
            keys: Arc::new(ApiKeys::none()),
            open_metrics: false,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

impl HttpOptions {
    /// The options a profile's `[api]` table (with `serve`'s flags applied) asks for, its keys
    /// loaded.
    pub fn load(access: &crate::profile::ApiAccess) -> Result<HttpOptions, super::auth::KeysError> {
        Ok(HttpOptions {
            keys: Arc::new(ApiKeys::load(access.keys.clone())?),
            open_metrics: access.open_metrics,
            max_body_bytes: access.max_body_bytes,
        })
    }
}

/// Middleware: lets a request through only with an accepted key (when keys are configured).
pub async fn require_key(
    State(keys): State<Arc<ApiKeys>>,
    request: Request,
    next: Next,
) -> Response {
    if !keys.required() {
        return next.run(request).await;
    }
    match keys.check(request.headers()) {
        Ok(name) => {
            tracing::debug!(key = %name, path = %request.uri().path(), "authorized");
            metrics::counter!("exo_api_key_requests_total", "key" => name.to_string()).increment(1);
            next.run(request).await
        }
        Err(denied) => {
            metrics::counter!("exo_api_key_refused_total").increment(1);
            let message = match denied {
                Denied::Missing => {
                    "this server needs an API key: send `Authorization: Bearer KEY` or `x-api-key: KEY`"
                }
                Denied::Wrong => "incorrect API key provided",
            };
            answer_error(request.uri().path(), ApiError::Unauthorized(message.into()))
        }
    }
}

/// An error in the shape of `endpoint`'s API: Anthropic's for Messages, OpenAI's otherwise.
pub fn error_response(endpoint: Endpoint, e: ApiError) -> Response {
    match endpoint {
        Endpoint::Messages => super::anthropic::reply::error_response(e),
        Endpoint::Chat | Endpoint::Completion | Endpoint::Responses => e.into_response(),
    }
}

/// [`error_response`] for a request to `path`, before a handler knows its endpoint: paths under
/// `/v1/messages` are Anthropic's.
pub fn answer_error(path: &str, e: ApiError) -> Response {
    let endpoint = if path.starts_with("/v1/messages") {
        Endpoint::Messages
    } else {
        Endpoint::Chat
    };
    error_response(endpoint, e)
}

/// A request body that is JSON by its content type (or has none) and within the size limit.
pub struct JsonBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        if let Some(kind) = request.headers().get(header::CONTENT_TYPE) {
            let kind = kind.to_str().unwrap_or_default();
            let essence = kind.split(';').next().unwrap_or_default().trim();
            let essence = essence.to_ascii_lowercase();
            let json = essence == "application/json"
                || (essence.starts_with("application/") && essence.ends_with("+json"));
            if !json {
                return Err(ApiError::UnsupportedMediaType(format!(
                    "the body must be JSON: send `Content-Type: application/json` (got {kind:?})"
                )));
            }
        }
        let bytes = Bytes::from_request(request, state).await.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(format!(
                    "the request body is larger than this server accepts ({e}); the limit is `serve --max-body-bytes`"
                ))
            } else {
                ApiError::bad("body", format!("cannot read the request body: {e}"))
            }
        })?;
        Ok(JsonBody(bytes))
    }
}

/// Fallback for paths the API does not have (404).
pub async fn not_found(method: Method, uri: axum::http::Uri) -> Response {
    let e = ApiError::NotFound(format!(
        "no route {method} {}; the API serves /v1/chat/completions, /v1/completions, /v1/messages, /v1/responses, /v1/models, /health and /metrics",
        uri.path()
    ));
    answer_error(uri.path(), e)
}

/// Fallback for a known path asked with a method it does not serve (405).
pub async fn wrong_method(method: Method, uri: axum::http::Uri) -> Response {
    let e = ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()));
    answer_error(uri.path(), e)
}
