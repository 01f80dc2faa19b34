//! Anthropic's reply shapes: the whole `message` object, the streamed event sequence
//! (`message_start`, `content_block_start`, `content_block_delta` with `text_delta` or
//! `input_json_delta`, `content_block_stop`, `message_delta`, `message_stop`) framed from the same
//! [`ReplyEvent`]s the OpenAI stream uses, and `{"type": "error", "error": {...}}` bodies.

use std::convert::Infallible;

use axum::Json;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde_json::{Value, json};

use crate::api::error::ApiError;
use crate::api::response::{Finish, Reply, ResponseMeta};
use crate::api::shape::{ReplyEvent, Shaper};
use crate::api::sse::{Framing, framed_events};
use crate::generation::Generation;

/// Anthropic's `stop_reason` for how a reply ended.
pub fn stop_reason(finish: Finish) -> &'static str {
    match finish {
        Finish::Stop => "end_turn",
        Finish::StopSequence(_) => "stop_sequence",
        Finish::Length => "max_tokens",
        Finish::ToolCalls => "tool_use",
    }
}

/// A tool call's `input`: its arguments' JSON (an empty object if they do not parse, which
/// constrained calls never produce).
fn input(arguments: &str) -> Value {
    serde_json::from_str(arguments).unwrap_or_else(|_| json!({}))
}

/// The whole `message` object of a finished reply.
pub fn message(meta: &ResponseMeta, reply: Reply, finish: Finish, usage: (u32, u32)) -> Value {
    let content: Vec<Value> = match reply {
        Reply::Text(text) => vec![json!({ "type": "text", "text": text })],
        Reply::Calls(calls) => calls
            .into_iter()
            .map(|c| {
                json!({
                    "type": "tool_use",
                    "id": c.id,
                    "name": c.function.name,
                    "input": input(&c.function.arguments),
                })
            })
            .collect(),
    };
    json!({
        "id": meta.response_id(),
        "type": "message",
        "role": "assistant",
        "model": meta.model,
        "content": content,
        "stop_reason": stop_reason(finish),
        "stop_sequence": meta.stop_sequence(finish),
        "usage": { "input_tokens": usage.0, "output_tokens": usage.1 },
    })
}

/// Anthropic's error `type` for an API error.
fn error_type(e: &ApiError) -> &'static str {
    match e {
        ApiError::BadRequest { .. }
        | ApiError::MethodNotAllowed(_)
        | ApiError::UnsupportedMediaType(_) => "invalid_request_error",
        ApiError::Unauthorized(_) => "authentication_error",
        ApiError::NotFound(_) => "not_found_error",
        ApiError::PayloadTooLarge(_) => "request_too_large",
        ApiError::Overloaded { .. } => "rate_limit_error",
        ApiError::Unavailable(_) => "overloaded_error",
        ApiError::Internal(_) | ApiError::Timeout(_) => "api_error",
    }
}

/// `{"type": "error", "error": {"type", "message"}}`.
pub fn error_body(e: &ApiError) -> Value {
    json!({ "type": "error", "error": { "type": error_type(e), "message": e.to_string() } })
}

/// An error answered in Anthropic's shape, with the same status (and headers) as OpenAI's.
pub fn error_response(e: ApiError) -> Response {
    let body = error_body(&e);
    let mut response = e.into_response();
    let (parts, _) = response.into_parts();
    response = (parts, Json(body)).into_response();
    response
}

fn event(kind: &'static str, data: &Value) -> Event {
    Event::default().event(kind).data(data.to_string())
}

/// The content block a stream has open.
#[derive(Clone, Copy, PartialEq)]
enum Open {
    Text,
    Call(usize),
}

/// Frames [`ReplyEvent`]s as Anthropic events, opening and closing content blocks.
struct Framer {
    block: usize,
    open: Option<Open>,
    /// The request's stop strings, to name the one that ended the reply.
    stop: Vec<String>,
}

impl Framer {
    fn close(&mut self, out: &mut Vec<Event>) {
        if self.open.take().is_some() {
            out.push(event(
                "content_block_stop",
                &json!({ "type": "content_block_stop", "index": self.block }),
            ));
            self.block += 1;
        }
    }

    fn start(&mut self, open: Open, block: Value, out: &mut Vec<Event>) {
        self.close(out);
        out.push(event(
            "content_block_start",
            &json!({ "type": "content_block_start", "index": self.block, "content_block": block }),
        ));
        self.open = Some(open);
    }

    fn delta(&self, delta: Value, out: &mut Vec<Event>) {
        out.push(event(
            "content_block_delta",
            &json!({ "type": "content_block_delta", "index": self.block, "delta": delta }),
        ));
    }

    fn frame(&mut self, e: ReplyEvent, output_tokens: u32, out: &mut Vec<Event>) {
        match e {
            ReplyEvent::Content(text) => {
                if self.open != Some(Open::Text) {
                    self.start(Open::Text, json!({ "type": "text", "text": "" }), out);
                }
                self.delta(json!({ "type": "text_delta", "text": text }), out);
            }
            ReplyEvent::CallBegin { index, id, name } => {
                let block = json!({ "type": "tool_use", "id": id, "name": name, "input": {} });
                self.start(Open::Call(index), block, out);
            }
            ReplyEvent::CallArgs { index, text } => {
                if self.open == Some(Open::Call(index)) {
                    let delta = json!({ "type": "input_json_delta", "partial_json": text });
                    self.delta(delta, out);
                }
            }
            ReplyEvent::Finish(f) => {
                self.close(out);
                out.push(event(
                    "message_delta",
                    &json!({
                        "type": "message_delta",
                        "delta": {
                            "stop_reason": stop_reason(f),
                            "stop_sequence": match f {
                                Finish::StopSequence(i) => self.stop.get(usize::from(i)),
                                _ => None,
                            },
                        },
                        "usage": { "output_tokens": output_tokens },
                    }),
                ));
                out.push(event("message_stop", &json!({ "type": "message_stop" })));
            }
        }
    }
}

impl Framing for Framer {
    fn frame(&mut self, event: ReplyEvent, usage: (u32, u32), out: &mut Vec<Event>) {
        Framer::frame(self, event, usage.1, out);
    }

    fn error(&mut self, error: &ApiError) -> Event {
        event("error", &error_body(error))
    }
}

/// The events of one streamed Messages response; each step runs in the request's `span`.
pub fn events(
    meta: ResponseMeta,
    generation: Generation,
    shaper: Shaper,
    span: tracing::Span,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let start = json!({
        "type": "message_start",
        "message": {
            "id": meta.response_id(),
            "type": "message",
            "role": "assistant",
            "model": meta.model,
            "content": [],
            "stop_reason": null,
            "stop_sequence": null,
            "usage": { "input_tokens": generation.prompt_tokens, "output_tokens": 0 },
        },
    });
    let head = vec![
        event("message_start", &start),
        event("ping", &json!({ "type": "ping" })),
    ];
    let framer = Framer {
        block: 0,
        open: None,
        stop: meta.stop.clone(),
    };
    framed_events(head, generation, shaper, framer, span)
}
