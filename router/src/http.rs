//! The OpenAI-compatible HTTP API (axum): routes, request parsing, JSON and server-sent-event answers.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use exo_protocol::{ChatPrompt, Prompt};
use futures::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::cluster::Cluster;
use crate::costmodel::RequestShape;
use crate::error::ApiError;
use crate::generation::{Delta, Generation};
use crate::openai::{
    ChatRequest, CommonParams, CompletionRequest, ToolChoice, Tools, call_id, finish_str, usage,
};
use crate::toolcall::{CallStream, Piece};

/// Header naming the node that ran the prompt.
pub const PREFILL_HEADER: &str = "x-exo-prefill-node";
/// Header naming the node that generated.
pub const DECODE_HEADER: &str = "x-exo-decode-node";

/// The HTTP routes over a cluster.
pub fn router(cluster: Arc<Cluster>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
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

/// Which endpoint shapes the answer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

struct Meta {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    /// The chat request's tools, when it has any.
    tools: Option<Tools>,
}

impl Meta {
    /// The tool calls a finished reply makes, if it is one.
    fn tool_calls(&self, text: &str, finish: &str) -> Option<Vec<Value>> {
        let id = self.id.trim_start_matches("chatcmpl-");
        self.tools
            .as_ref()
            .filter(|_| finish == "stop")
            .and_then(|t| t.parse(text, id))
    }

    /// Whether streamed text must be held back: a reply that must be a tool call, or (with
    /// `tool_choice: auto`) one that so far could still become one.
    fn holds(&self, so_far: &str) -> bool {
        match self.tools.as_ref().map(|t| &t.choice) {
            None | Some(ToolChoice::None) => false,
            Some(ToolChoice::Required | ToolChoice::Named(_)) => true,
            Some(ToolChoice::Auto) => {
                let t = so_far.trim_start();
                t.is_empty() || t.starts_with('{')
            }
        }
    }

    /// One piece of a tool call streamed while it is generated (the first call, index 0).
    fn call_piece(&self, piece: Piece) -> Value {
        let id = self.id.trim_start_matches("chatcmpl-");
        let delta = match piece {
            Piece::Begin(name) => json!({ "tool_calls": [{ "index": 0, "id": call_id(id, 0),
                "type": "function", "function": { "name": name, "arguments": "" } }] }),
            Piece::Arguments(a) => {
                json!({ "tool_calls": [{ "index": 0, "function": { "arguments": a } }] })
            }
        };
        self.chunk(delta, None)
    }

    /// Streamed tool calls as OpenAI sends them: per call, a chunk with its id and name, then
    /// its arguments in pieces; then the finish chunk.
    fn tool_call_chunks(&self, calls: &[Value]) -> Vec<Value> {
        let mut out = Vec::new();
        for (i, c) in calls.iter().enumerate() {
            out.push(self.chunk(
                json!({ "tool_calls": [{ "index": i, "id": c["id"], "type": "function",
                                         "function": { "name": c["function"]["name"], "arguments": "" } }] }),
                None,
            ));
            let args = c["function"]["arguments"].as_str().unwrap_or_default();
            let chars: Vec<char> = args.chars().collect();
            for piece in chars.chunks(16) {
                let piece: String = piece.iter().collect();
                out.push(self.chunk(
                    json!({ "tool_calls": [{ "index": i, "function": { "arguments": piece } }] }),
                    None,
                ));
            }
        }
        out.push(self.chunk(json!({}), Some("tool_calls")));
        out
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        match self.kind {
            Kind::Chat => json!({
                "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "system_fingerprint": null,
                "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }],
            }),
            Kind::Completion => json!({
                "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{ "index": 0, "text": delta.get("content").cloned().unwrap_or(json!("")),
                              "logprobs": null, "finish_reason": finish }],
            }),
        }
    }

    fn usage_chunk(&self, prompt: u32, completion: u32) -> Value {
        let object = if self.kind == Kind::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        json!({ "id": self.id, "object": object, "created": self.created, "model": self.model,
                "choices": [], "usage": usage(prompt, completion) })
    }

    fn whole(&self, text: String, finish: &str, prompt: u32, completion: u32) -> Value {
        if let Some(calls) = self.tool_calls(&text, finish) {
            return json!({
                "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "system_fingerprint": null,
                "choices": [{ "index": 0,
                              "message": { "role": "assistant", "content": null, "tool_calls": calls },
                              "logprobs": null, "finish_reason": "tool_calls" }],
                "usage": usage(prompt, completion),
            });
        }
        match self.kind {
            Kind::Chat => json!({
                "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "system_fingerprint": null,
                "choices": [{ "index": 0, "message": { "role": "assistant", "content": text },
                              "logprobs": null, "finish_reason": finish }],
                "usage": usage(prompt, completion),
            }),
            Kind::Completion => json!({
                "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{ "index": 0, "text": text, "logprobs": null, "finish_reason": finish }],
                "usage": usage(prompt, completion),
            }),
        }
    }
}

async fn chat(State(cluster): State<Arc<Cluster>>, body: Bytes) -> Response {
    let run = async {
        let req: ChatRequest = parse(&body)?;
        let tools = req.tools()?;
        let prompt = ChatPrompt {
            turns: req.turns()?,
            tools: tools.as_ref().and_then(Tools::prompt_json),
        };
        serve(
            &cluster,
            Kind::Chat,
            Prompt::Chat(prompt),
            &req.params,
            tools,
        )
        .await
    };
    counted(
        "chat",
        run.await.unwrap_or_else(IntoResponse::into_response),
    )
}

fn counted(endpoint: &'static str, response: Response) -> Response {
    let status = response.status().as_u16().to_string();
    metrics::counter!("exo_requests_total", "endpoint" => endpoint, "status" => status)
        .increment(1);
    response
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

async fn completions(State(cluster): State<Arc<Cluster>>, body: Bytes) -> Response {
    let run = async {
        let req: CompletionRequest = parse(&body)?;
        if req.params.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::bad("tools", "tools are for /v1/chat/completions"));
        }
        let prompt = req.prompt_text()?;
        serve(
            &cluster,
            Kind::Completion,
            Prompt::Text(prompt),
            &req.params,
            None,
        )
        .await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

async fn serve(
    cluster: &Arc<Cluster>,
    kind: Kind,
    prompt: Prompt,
    params: &CommonParams,
    tools: Option<Tools>,
) -> Result<Response, ApiError> {
    let model = cluster.model_id();
    let id = cluster.next_id();
    let mut sampling = params.sampling(&model, id)?;
    if let Some(c) = tools.as_ref().and_then(Tools::constraint) {
        if sampling.constraint.is_some() {
            return Err(ApiError::bad(
                "response_format",
                "response_format cannot be combined with a required tool call",
            ));
        }
        sampling.constraint = Some(c);
    }
    let mut generation = Generation::start(cluster, prompt, sampling).await?;
    let prefix = if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    };
    let meta = Meta {
        kind,
        id: format!("{prefix}-{id:016x}"),
        created: now(),
        model,
        include_usage: params.include_usage(),
        tools,
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
    if params.stream {
        let sse = Sse::new(event_stream(meta, generation)).keep_alive(KeepAlive::default());
        return Ok((headers, sse).into_response());
    }
    let (text, finish) = generation.collect().await?;
    let body = meta.whole(
        text,
        finish_str(finish),
        generation.prompt_tokens,
        generation.completion_tokens,
    );
    Ok((StatusCode::OK, headers, Json(body)).into_response())
}

enum Stage {
    Role,
    /// Streaming text; the string holds text held back while it may be a tool call, and the
    /// call stream sends that call's name and arguments as they are generated.
    Body(String, CallStream),
    Tail,
    End,
}

/// Server-sent events of one generation; dropping the stream (client gone) cancels the request.
fn event_stream(
    meta: Meta,
    generation: Generation,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let first = if meta.kind == Kind::Chat {
        Stage::Role
    } else {
        Stage::Body(String::new(), CallStream::default())
    };
    let data = |v: Value| Event::default().data(v.to_string());
    futures::stream::unfold(
        (meta, generation, first),
        move |(meta, mut generation, stage)| async move {
            let (events, next) = match stage {
                Stage::Role => (
                    vec![data(
                        meta.chunk(json!({"role": "assistant", "content": ""}), None),
                    )],
                    Stage::Body(String::new(), CallStream::default()),
                ),
                Stage::Body(mut held, mut call) => match generation.next().await {
                    Some(Ok(Delta { text, finish })) => {
                        let mut events = Vec::new();
                        held.push_str(&text);
                        if call.begun() || meta.holds(&held) {
                            let pieces = call.advance(&held);
                            events.extend(pieces.into_iter().map(|p| data(meta.call_piece(p))));
                        }
                        if call.begun() {
                            // The reply is a call being streamed: no content, and its end
                            // is a tool-call finish unless it was cut off.
                            if let Some(f) = finish {
                                let reason = match meta.tool_calls(&held, finish_str(f)) {
                                    Some(_) => "tool_calls",
                                    None => finish_str(f),
                                };
                                events.push(data(meta.chunk(json!({}), Some(reason))));
                                return Some((
                                    futures::stream::iter(events.into_iter().map(Ok)),
                                    (meta, generation, Stage::Tail),
                                ));
                            }
                            return Some((
                                futures::stream::iter(events.into_iter().map(Ok)),
                                (meta, generation, Stage::Body(held, call)),
                            ));
                        }
                        if let Some(f) = finish
                            && let Some(calls) = meta.tool_calls(&held, finish_str(f))
                        {
                            let chunks = meta.tool_call_chunks(&calls);
                            events.extend(chunks.into_iter().map(data));
                            return Some((
                                futures::stream::iter(events.into_iter().map(Ok)),
                                (meta, generation, Stage::Tail),
                            ));
                        }
                        let hold = finish.is_none() && meta.holds(&held);
                        if !hold && !held.is_empty() {
                            let out = std::mem::take(&mut held);
                            events.push(data(meta.chunk(json!({ "content": out }), None)));
                        }
                        match finish {
                            Some(f) => {
                                events.push(data(meta.chunk(json!({}), Some(finish_str(f)))));
                                (events, Stage::Tail)
                            }
                            None => (events, Stage::Body(held, call)),
                        }
                    }
                    Some(Err(e)) => (vec![data(e.body())], Stage::End),
                    None => (Vec::new(), Stage::Tail),
                },
                Stage::Tail => {
                    let mut events = Vec::new();
                    if meta.include_usage {
                        events.push(data(meta.usage_chunk(
                            generation.prompt_tokens,
                            generation.completion_tokens,
                        )));
                    }
                    events.push(Event::default().data("[DONE]"));
                    (events, Stage::End)
                }
                Stage::End => return None,
            };
            Some((
                futures::stream::iter(events.into_iter().map(Ok)),
                (meta, generation, next),
            ))
        },
    )
    .flatten()
}

async fn models(State(cluster): State<Arc<Cluster>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{ "id": cluster.model_id(), "object": "model", "created": 0, "owned_by": "exo-router" }],
    }))
}

async fn health(State(cluster): State<Arc<Cluster>>) -> Response {
    let nodes: Vec<Value> = cluster
        .nodes()
        .iter()
        .map(|n| json!({ "name": n.name(), "role": n.spec.role, "address": n.addr, "healthy": n.healthy(), "in_flight": n.in_flight() }))
        .collect();
    // Healthy when a request could be placed right now.
    let probe = RequestShape {
        prompt_tokens: 1,
        output_tokens: 1,
    };
    let ok = cluster.choose(probe).is_ok();
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({ "status": if ok { "ok" } else { "unavailable" }, "model": cluster.model_id(), "nodes": nodes }))).into_response()
}
