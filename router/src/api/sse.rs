//! Server-sent events of one generation: frames the shaped [`ReplyEvent`]s as OpenAI chunks, then
//! the usage chunk (when asked for) and `[DONE]`. Dropping the stream (the client went away) drops
//! the [`Generation`], which cancels the request on its decode node.

use std::convert::Infallible;

use axum::response::sse::Event;
use futures::{Stream, StreamExt};
use tracing::Instrument;

use crate::api::logprobs::ChoiceLogprobs;
use crate::api::response::{Chunk, Delta, Endpoint, ResponseMeta, Usage};
use crate::api::shape::{ReplyEvent, Shaper};
use crate::generation::Generation;

fn data(chunk: &impl serde::Serialize) -> Event {
    Event::default().data(serde_json::to_string(chunk).unwrap_or_default())
}

fn chunk(meta: &ResponseMeta, event: ReplyEvent) -> Chunk {
    match event {
        ReplyEvent::Content(text) => Chunk::new(meta, Delta::content(text), None),
        ReplyEvent::CallBegin { index, id, name } => {
            Chunk::new(meta, Delta::call_begin(index, id, name), None)
        }
        ReplyEvent::CallArgs { index, text } => {
            Chunk::new(meta, Delta::call_args(index, text), None)
        }
        ReplyEvent::Finish(f) => Chunk::new(meta, Delta::default(), Some(f)),
    }
}

/// The chunks of one generation step, the step's log probabilities on the first (on a chunk of
/// their own when the step's text is still held back). `offset`: completion characters so far.
fn step(
    meta: &ResponseMeta,
    mut delta: crate::generation::Delta,
    shaper: &mut Shaper,
    offset: &mut usize,
) -> Vec<Event> {
    let logprobs = std::mem::take(&mut delta.logprobs);
    let mut chunks: Vec<Chunk> = shaper
        .push(delta)
        .into_iter()
        .map(|e| chunk(meta, e))
        .collect();
    if !logprobs.is_empty() {
        let lp = ChoiceLogprobs::new(meta.endpoint, &logprobs, *offset);
        *offset += ChoiceLogprobs::chars(&logprobs);
        if chunks.is_empty() {
            chunks.push(Chunk::new(meta, Delta::default(), None));
        }
        if let Some(first) = chunks.first_mut() {
            first.set_logprobs(lp);
        }
    }
    chunks.iter().map(data).collect()
}

/// The events of one streamed response; each step runs in the request's `span`, so log lines made
/// while streaming carry the request id.
pub fn events(
    meta: ResponseMeta,
    include_usage: bool,
    generation: Generation,
    shaper: Shaper,
    span: tracing::Span,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let role =
        (meta.endpoint == Endpoint::Chat).then(|| data(&Chunk::new(&meta, Delta::role(), None)));
    let body = futures::stream::unfold(Some((meta, generation, shaper, 0)), move |state| {
        let span = span.clone();
        async move {
            let (meta, mut generation, mut shaper, mut offset) = state?;
            let events = match generation.next().await {
                Some(Ok(delta)) => {
                    let events = step(&meta, delta, &mut shaper, &mut offset);
                    return Some((events, Some((meta, generation, shaper, offset))));
                }
                Some(Err(e)) => vec![data(&e.body())],
                None => {
                    let usage = Usage::new(generation.prompt_tokens, generation.completion_tokens);
                    let usage = include_usage.then(|| data(&Chunk::usage(&meta, usage)));
                    usage
                        .into_iter()
                        .chain([Event::default().data("[DONE]")])
                        .collect()
                }
            };
            Some((events, None))
        }
        .instrument(span)
    });
    futures::stream::iter(role)
        .chain(body.flat_map(|events: Vec<Event>| futures::stream::iter(events)))
        .map(Ok)
}

/// How an API other than chat completions frames the shaped reply events of a stream
/// (Anthropic's Messages, OpenAI's Responses).
pub trait Framing: Send + 'static {
    /// Appends the events `event` makes; `usage` is (prompt, completion) tokens so far.
    fn frame(&mut self, event: ReplyEvent, usage: (u32, u32), out: &mut Vec<Event>);
    /// The event that ends a stream on `error`.
    fn error(&mut self, error: &crate::api::error::ApiError) -> Event;
}

/// The events of one streamed reply: `head`, then each generation step framed by `framer`, until
/// the generation ends or fails; each step runs in the request's `span`.
pub fn framed_events<F: Framing>(
    head: Vec<Event>,
    generation: Generation,
    shaper: Shaper,
    framer: F,
    span: tracing::Span,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let body = futures::stream::unfold(Some((generation, shaper, framer)), move |state| {
        let span = span.clone();
        async move {
            let (mut generation, mut shaper, mut framer) = state?;
            match generation.next().await {
                Some(Ok(delta)) => {
                    let mut out = Vec::new();
                    for e in shaper.push(delta) {
                        let usage = (generation.prompt_tokens, generation.completion_tokens);
                        framer.frame(e, usage, &mut out);
                    }
                    Some((out, Some((generation, shaper, framer))))
                }
                Some(Err(e)) => Some((vec![framer.error(&e)], None)),
                None => None,
            }
        }
        .instrument(span)
    });
    futures::stream::iter(head)
        .chain(body.flat_map(|events: Vec<Event>| futures::stream::iter(events)))
        .map(Ok)
}
