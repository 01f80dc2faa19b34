//! The Responses API's reply shapes: the `response` object, and the streamed events
//! (`response.created`, `response.in_progress`, `response.output_item.added`,
//! `response.content_part.added`, `response.output_text.delta` / `.done`,
//! `response.function_call_arguments.delta` / `.done`, `response.output_item.done`,
//! `response.completed`), framed from the same [`ReplyEvent`]s the chat stream uses.

use std::convert::Infallible;

use axum::response::sse::Event;
use futures::Stream;
use serde_json::{Value, json};

use crate::api::error::ApiError;
use crate::api::response::{Finish, Reply, ResponseMeta};
use crate::api::shape::{ReplyEvent, Shaper};
use crate::api::sse::{Framing, framed_events};
use crate::generation::Generation;

/// The id of the reply's message item.
fn message_id(meta: &ResponseMeta) -> String {
    format!("msg_{}", meta.id)
}

/// The id of function call item `i`.
fn call_item_id(meta: &ResponseMeta, i: usize) -> String {
    format!("fc_{}_{i}", meta.id)
}

fn message_item(meta: &ResponseMeta, text: &str, status: &str) -> Value {
    json!({
        "type": "message",
        "id": message_id(meta),
        "status": status,
        "role": "assistant",
        "content": [{ "type": "output_text", "text": text, "annotations": [], "logprobs": [] }],
    })
}

fn call_item(id: String, call_id: &str, name: &str, arguments: &str, status: &str) -> Value {
    json!({
        "type": "function_call",
        "id": id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    })
}

/// The `response` object: `output` items, and `status` (`incomplete` when cut by
/// `max_output_tokens`).
fn response(
    meta: &ResponseMeta,
    status: &str,
    output: Vec<Value>,
    finish: Option<Finish>,
    usage: (u32, u32),
) -> Value {
    let cut = finish == Some(Finish::Length);
    json!({
        "id": meta.response_id(),
        "object": "response",
        "created_at": meta.created,
        "status": if cut { "incomplete" } else { status },
        "model": meta.model,
        "output": output,
        "incomplete_details": cut.then(|| json!({ "reason": "max_output_tokens" })),
        "error": null,
        "parallel_tool_calls": meta.parallel_tool_calls,
        "tool_choice": "auto",
        "tools": [],
        "store": false,
        "usage": {
            "input_tokens": usage.0,
            "output_tokens": usage.1,
            "total_tokens": usage.0.saturating_add(usage.1),
            "input_tokens_details": { "cached_tokens": 0 },
            "output_tokens_details": { "reasoning_tokens": 0 },
        },
    })
}

/// The whole `response` of a finished reply.
pub fn whole(meta: &ResponseMeta, reply: Reply, finish: Finish, usage: (u32, u32)) -> Value {
    let output = match reply {
        Reply::Text(text) => vec![message_item(meta, &text, "completed")],
        Reply::Calls(calls) => calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let id = call_item_id(meta, i);
                call_item(
                    id,
                    &c.id,
                    &c.function.name,
                    &c.function.arguments,
                    "completed",
                )
            })
            .collect(),
    };
    response(meta, "completed", output, Some(finish), usage)
}

/// The output item a stream has open, and what it holds so far.
enum Open {
    Text(String),
    Call {
        index: usize,
        call_id: String,
        name: String,
        arguments: String,
    },
}

/// Frames [`ReplyEvent`]s as Responses events, numbering them and keeping the finished items for
/// `response.completed`.
struct Framer {
    meta: ResponseMeta,
    sequence: u64,
    open: Option<Open>,
    done: Vec<Value>,
}

impl Framer {
    fn event(&mut self, kind: &'static str, mut data: Value) -> Event {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        Event::default().event(kind).data(data.to_string())
    }

    /// Ends the open item: its `.done` events and `response.output_item.done`.
    fn close(&mut self, out: &mut Vec<Event>) {
        let index = self.done.len();
        let item = match self.open.take() {
            None => return,
            Some(Open::Text(text)) => {
                let id = message_id(&self.meta);
                let part = json!({ "type": "output_text", "text": text, "annotations": [], "logprobs": [] });
                let done = json!({ "item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": [] });
                out.push(self.event("response.output_text.done", done));
                let part_done = json!({ "item_id": id, "output_index": index, "content_index": 0, "part": part });
                out.push(self.event("response.content_part.done", part_done));
                message_item(&self.meta, &text, "completed")
            }
            Some(Open::Call {
                index: call,
                call_id,
                name,
                arguments,
            }) => {
                let id = call_item_id(&self.meta, call);
                let done = json!({ "item_id": id, "output_index": index, "arguments": arguments });
                out.push(self.event("response.function_call_arguments.done", done));
                call_item(id, &call_id, &name, &arguments, "completed")
            }
        };
        let done = json!({ "output_index": index, "item": item });
        out.push(self.event("response.output_item.done", done));
        self.done.push(item);
    }

    fn frame(&mut self, e: ReplyEvent, usage: (u32, u32), out: &mut Vec<Event>) {
        let index = self.done.len();
        match e {
            ReplyEvent::Content(delta) => {
                let id = message_id(&self.meta);
                if !matches!(self.open, Some(Open::Text(_))) {
                    self.close(out);
                    let item = json!({ "type": "message", "id": id, "status": "in_progress", "role": "assistant", "content": [] });
                    let index = self.done.len();
                    out.push(self.event(
                        "response.output_item.added",
                        json!({ "output_index": index, "item": item }),
                    ));
                    let part = json!({ "type": "output_text", "text": "", "annotations": [], "logprobs": [] });
                    let added = json!({ "item_id": id, "output_index": index, "content_index": 0, "part": part });
                    out.push(self.event("response.content_part.added", added));
                    self.open = Some(Open::Text(String::new()));
                }
                if let Some(Open::Text(text)) = &mut self.open {
                    text.push_str(&delta);
                }
                let index = self.done.len();
                let data = json!({ "item_id": id, "output_index": index, "content_index": 0, "delta": delta, "logprobs": [] });
                out.push(self.event("response.output_text.delta", data));
            }
            ReplyEvent::CallBegin {
                index: call,
                id,
                name,
            } => {
                self.close(out);
                let index = self.done.len();
                let item = call_item(
                    call_item_id(&self.meta, call),
                    &id,
                    &name,
                    "",
                    "in_progress",
                );
                out.push(self.event(
                    "response.output_item.added",
                    json!({ "output_index": index, "item": item }),
                ));
                self.open = Some(Open::Call {
                    index: call,
                    call_id: id,
                    name,
                    arguments: String::new(),
                });
            }
            ReplyEvent::CallArgs { index: call, text } => {
                if let Some(Open::Call { arguments, .. }) = &mut self.open {
                    arguments.push_str(&text);
                    let id = call_item_id(&self.meta, call);
                    let data = json!({ "item_id": id, "output_index": index, "delta": text });
                    out.push(self.event("response.function_call_arguments.delta", data));
                }
            }
            ReplyEvent::Finish(f) => {
                self.close(out);
                let output = std::mem::take(&mut self.done);
                let body = response(&self.meta, "completed", output, Some(f), usage);
                let kind = if f == Finish::Length {
                    "response.incomplete"
                } else {
                    "response.completed"
                };
                out.push(self.event(kind, json!({ "response": body })));
            }
        }
    }
}

impl Framing for Framer {
    fn frame(&mut self, event: ReplyEvent, usage: (u32, u32), out: &mut Vec<Event>) {
        Framer::frame(self, event, usage, out);
    }

    fn error(&mut self, e: &ApiError) -> Event {
        let data = json!({ "code": e.status().as_u16(), "message": e.to_string(), "param": null, "error": e.body() });
        self.event("error", data)
    }
}

/// The events of one streamed Responses reply; each step runs in the request's `span`.
pub fn events(
    meta: ResponseMeta,
    generation: Generation,
    shaper: Shaper,
    span: tracing::Span,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let mut framer = Framer {
        meta: meta.clone(),
        sequence: 0,
        open: None,
        done: Vec::new(),
    };
    let started = response(&meta, "in_progress", Vec::new(), None, (0, 0));
    let head = vec![
        framer.event("response.created", json!({ "response": started })),
        framer.event("response.in_progress", json!({ "response": started })),
    ];
    framed_events(head, generation, shaper, framer, span)
}
