//! The HTTP API (axum): OpenAI's chat and completions ([`openai`]), Anthropic's Messages
//! ([`anthropic`]), OpenAI's Responses ([`responses`]), the cluster's state ([`status`]) and the
//! web page ([`ui`]); the one error -> status map ([`error`]), tool-call shaping ([`shape`]), typed
//! response bodies ([`response`]) and server-sent events ([`sse`]).
//!
//! Each request gets its id here, once: it is the response `id`, the `request` field of every log
//! line about it, and the id of every RPC the request makes.

pub mod adjust;
pub mod anthropic;
pub mod auth;
pub mod error;
pub mod gate;
pub mod logprobs;
pub mod openai;
pub mod response;
pub mod responses;
pub mod shape;
pub mod sse;
pub mod status;
pub mod toolcall;
pub mod tools;
pub mod ui;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use exo_protocol::{ChatPrompt, Prompt};
use serde::de::DeserializeOwned;
use tracing::Instrument;

use crate::cluster::Cluster;
use crate::generation::Generation;
use error::ApiError;
use gate::{HttpOptions, JsonBody};
use logprobs::ChoiceLogprobs;
use openai::{ChatRequest, CommonParams, CompletionRequest, Tools};
use response::{Completion, Endpoint, Health, ModelList, NodeHealth, ResponseMeta, Usage};
use shape::Shaper;

/// Header naming the node that ran the prompt.
pub const PREFILL_HEADER: &str = "x-exo-prefill-node";
/// Header naming the node that generated.
pub const DECODE_HEADER: &str = "x-exo-decode-node";
/// Header with the pieces the KV cache was shipped in, where the router chose them (a split
/// placed with perf tables).
pub const PIECES_HEADER: &str = "x-exo-kv-pieces";

/// The HTTP routes over a cluster. Every route but `/health`, the web page's files ([`ui`]) and
/// `/metrics` when `open_metrics` asks for an API key when `options.keys` has any.
pub fn router(cluster: Arc<Cluster>, options: &HttpOptions) -> Router {
    let mut keyed = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route(
            "/v1/messages",
            post(other_api::<anthropic::MessagesRequest>),
        )
        .route("/v1/messages/count_tokens", post(count_tokens))
        .route(
            "/v1/responses",
            post(other_api::<responses::ResponsesRequest>),
        )
        .route("/v1/models", get(models))
        .route("/v1/cluster", get(status::snapshot))
        .route("/v1/cluster/events", get(status::events));
    let mut open = Router::new().route("/health", get(health));
    for asset in ui::ASSETS {
        open = open.route(asset.path, get(move || async move { ui::serve(asset) }));
    }
    if options.open_metrics {
        open = open.route("/metrics", get(metrics_text));
    } else {
        keyed = keyed.route("/metrics", get(metrics_text));
    }
    let keyed = keyed.route_layer(axum::middleware::from_fn_with_state(
        Arc::clone(&options.keys),
        gate::require_key,
    ));
    keyed
        .merge(open)
        .fallback(gate::not_found)
        .method_not_allowed_fallback(gate::wrong_method)
        .layer(DefaultBodyLimit::max(options.max_body_bytes))
        .with_state(cluster)
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest {
        message: format!("invalid request body: {e}"),
        param: None,
        code: None,
    })
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What one API call asks for, parsed and checked.
struct Call {
    endpoint: Endpoint,
    prompt: Prompt,
    params: CommonParams,
    tools: Option<Tools>,
}

/// The call a chat request makes, through whichever API it came.
fn chat_call(endpoint: Endpoint, req: ChatRequest) -> Result<Call, ApiError> {
    let tools = req.tools()?;
    let prompt = ChatPrompt {
        turns: req.turns()?,
        tools: tools.as_ref().and_then(Tools::prompt_json),
    };
    Ok(Call {
        endpoint,
        prompt: Prompt::Chat(prompt),
        params: req.params,
        tools,
    })
}

async fn chat(State(cluster): State<Arc<Cluster>>, body: Result<JsonBody, ApiError>) -> Response {
    let call = || chat_call(Endpoint::Chat, parse(&body?.0)?);
    counted("chat", answer(&cluster, Endpoint::Chat, call()).await)
}

/// A request body of another API that becomes the chat request `/v1/chat/completions` makes.
pub trait IntoChat: DeserializeOwned {
    /// The API's endpoint.
    const ENDPOINT: Endpoint;
    /// Its name in `exo_requests_total`.
    const METRIC: &'static str;
    /// The chat request it stands for.
    fn to_chat(&self) -> Result<ChatRequest, ApiError>;
}

impl IntoChat for anthropic::MessagesRequest {
    const ENDPOINT: Endpoint = Endpoint::Messages;
    const METRIC: &'static str = "messages";
    fn to_chat(&self) -> Result<ChatRequest, ApiError> {
        anthropic::MessagesRequest::to_chat(self)
    }
}

impl IntoChat for responses::ResponsesRequest {
    const ENDPOINT: Endpoint = Endpoint::Responses;
    const METRIC: &'static str = "responses";
    fn to_chat(&self) -> Result<ChatRequest, ApiError> {
        responses::ResponsesRequest::to_chat(self)
    }
}

/// `/v1/messages` and `/v1/responses`: parsed into a chat request, answered in the API's shape.
async fn other_api<R: IntoChat>(
    State(cluster): State<Arc<Cluster>>,
    body: Result<JsonBody, ApiError>,
) -> Response {
    let call = || chat_call(R::ENDPOINT, parse::<R>(&body?.0)?.to_chat()?);
    counted(R::METRIC, answer(&cluster, R::ENDPOINT, call()).await)
}

/// `POST /v1/messages/count_tokens`: the input tokens a Messages request of this body would use
/// (system, messages and tools through the model's chat template), counted by a prefill node.
async fn count_tokens(
    State(cluster): State<Arc<Cluster>>,
    body: Result<JsonBody, ApiError>,
) -> Response {
    let count = async {
        let mut req: anthropic::MessagesRequest = parse(&body?.0)?;
        // Counting needs no budget for the answer.
        req.max_tokens.get_or_insert(1);
        let call = chat_call(Endpoint::Messages, req.to_chat()?)?;
        let model = cluster.resolve_model(call.params.model.as_deref())?;
        call.params.sampling(0)?;
        let tokens = cluster.count_tokens(&model, call.prompt).await?;
        Ok::<_, ApiError>(Json(serde_json::json!({ "input_tokens": tokens })).into_response())
    };
    let response = count
        .await
        .unwrap_or_else(|e| gate::error_response(Endpoint::Messages, e));
    counted("count_tokens", response)
}

async fn completions(
    State(cluster): State<Arc<Cluster>>,
    body: Result<JsonBody, ApiError>,
) -> Response {
    let call = || -> Result<Call, ApiError> {
        let req: CompletionRequest = parse(&body?.0)?;
        if req.params.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::bad("tools", "tools are for /v1/chat/completions"));
        }
        Ok(Call {
            endpoint: Endpoint::Completion,
            prompt: Prompt::Text(req.prompt_text()?),
            params: req.params,
            tools: None,
        })
    };
    counted(
        "completions",
        answer(&cluster, Endpoint::Completion, call()).await,
    )
}

fn counted(endpoint: &'static str, response: Response) -> Response {
    let status = response.status().as_u16().to_string();
    metrics::counter!("exo_requests_total", "endpoint" => endpoint, "status" => status)
        .increment(1);
    response
}

/// Runs a parsed call under a new request id and answers it (errors become their status, in
/// the shape of the `endpoint`'s API).
async fn answer(
    cluster: &Arc<Cluster>,
    endpoint: Endpoint,
    call: Result<Call, ApiError>,
) -> Response {
    let id = cluster.next_id();
    let span = tracing::info_span!("request", request = %id);
    let run = async { serve(cluster, id, call?).await };
    run.instrument(span)
        .await
        .unwrap_or_else(|e| gate::error_response(endpoint, e))
}

async fn serve(
    cluster: &Arc<Cluster>,
    id: exo_protocol::RequestId,
    call: Call,
) -> Result<Response, ApiError> {
    let Call {
        endpoint,
        prompt,
        params,
        tools,
    } = call;
    let model = cluster.resolve_model(params.model.as_deref())?;
    let parallel_tool_calls = params.parallel_tool_calls.unwrap_or(true);
    let tools = tools.map(|t| Tools {
        syntax: cluster.tool_syntax(&model),
        ..t
    });
    let mut sampling = params.sampling(id.seed())?;
    let field = match endpoint {
        Endpoint::Completion => adjust::LogprobsField::Completions,
        Endpoint::Chat | Endpoint::Messages | Endpoint::Responses => adjust::LogprobsField::Chat,
    };
    params.adjust.apply(field, &mut sampling)?;
    if sampling.logprobs.is_some() && tools.is_some() {
        return Err(ApiError::bad(
            "logprobs",
            "logprobs cannot be combined with tools yet",
        ));
    }
    if let Some(c) = tools.as_ref().and_then(Tools::constraint) {
        if sampling.constraint.is_some() {
            return Err(ApiError::bad(
                "response_format",
                "response_format cannot be combined with a required tool call",
            ));
        }
        sampling.constraint = Some(c);
    }
    let stop = sampling.stop.clone();
    let mut generation = Generation::start(cluster, id, &model, prompt, sampling).await?;
    let meta = ResponseMeta {
        endpoint,
        id,
        created: now(),
        model: model.id,
        stop,
        parallel_tool_calls,
    };
    let mut headers = HeaderMap::new();
    for (name, value) in [
        (PREFILL_HEADER, generation.prefill_node()),
        (DECODE_HEADER, generation.decode_node()),
    ] {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(name, v);
        }
    }
    if let Some(pieces) = generation.kv_pieces() {
        headers.insert(PIECES_HEADER, HeaderValue::from(pieces));
    }
    let shaper = Shaper::new(meta.clone(), tools);
    match endpoint {
        Endpoint::Messages | Endpoint::Responses => {
            return other_api_reply(meta, params.stream, generation, shaper, headers).await;
        }
        Endpoint::Chat | Endpoint::Completion => {}
    }
    if params.stream {
        let span = tracing::Span::current();
        let events = sse::events(meta, params.include_usage(), generation, shaper, span);
        let sse = Sse::new(events).keep_alive(KeepAlive::default());
        return Ok((headers, sse).into_response());
    }
    let done = generation.collect().await?;
    let logprobs =
        (!done.logprobs.is_empty()).then(|| ChoiceLogprobs::new(meta.endpoint, &done.logprobs, 0));
    let (reply, finish) = shaper.whole(done.text, done.finish);
    let usage = Usage::new(generation.prompt_tokens, generation.completion_tokens);
    let body = Completion::new(&meta, reply, finish, usage).with_logprobs(logprobs);
    Ok((StatusCode::OK, headers, Json(body)).into_response())
}

/// A Messages or Responses answer: the API's event stream, or its whole reply object.
async fn other_api_reply(
    meta: ResponseMeta,
    stream: bool,
    mut generation: Generation,
    shaper: Shaper,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if stream {
        let span = tracing::Span::current();
        let response = if meta.endpoint == Endpoint::Messages {
            let events = anthropic::reply::events(meta, generation, shaper, span);
            (headers, Sse::new(events).keep_alive(KeepAlive::default())).into_response()
        } else {
            let events = responses::reply::events(meta, generation, shaper, span);
            (headers, Sse::new(events).keep_alive(KeepAlive::default())).into_response()
        };
        return Ok(response);
    }
    let done = generation.collect().await?;
    let (reply, finish) = shaper.whole(done.text, done.finish);
    let usage = (generation.prompt_tokens, generation.completion_tokens);
    let body = if meta.endpoint == Endpoint::Messages {
        anthropic::reply::message(&meta, reply, finish, usage)
    } else {
        responses::reply::whole(&meta, reply, finish, usage)
    };
    Ok((StatusCode::OK, headers, Json(body)).into_response())
}

async fn metrics_text() -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        crate::metrics::render(),
    )
        .into_response()
}

async fn models(State(cluster): State<Arc<Cluster>>) -> Json<ModelList> {
    Json(ModelList::of(cluster.models().into_iter().map(|m| m.id)))
}

async fn health(State(cluster): State<Arc<Cluster>>) -> Response {
    let nodes = cluster
        .nodes()
        .iter()
        .map(|n| NodeHealth {
            name: n.name().to_string(),
            role: n.spec.role,
            address: n.addr(),
            healthy: n.healthy(),
            error: n.down_reason(),
            in_flight: n.in_flight(),
        })
        .collect();
    // Healthy when a request for some model could be placed right now.
    let ok = cluster.ready();
    let (status, word) = if ok {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    };
    let body = Health {
        status: word,
        model: cluster.model_id(),
        nodes,
    };
    (status, Json(body)).into_response()
}
