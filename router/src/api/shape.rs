//! Tool-call shaping: turns the generated text, as it arrives, into what a client is sent:
//! [`ReplyEvent::Content`], or a call's [`ReplyEvent::CallBegin`] and [`ReplyEvent::CallArgs`],
//! then one [`ReplyEvent::Finish`]. The SSE writer only frames these events; a whole answer uses
//! the same [`Tools::calls`] to decide between text and calls.

use crate::api::openai::{ToolChoice, Tools};
use crate::api::response::{Finish, Reply, ResponseMeta, ToolCall};
use crate::api::toolcall::{CallStream, Piece};
use crate::generation::Delta;

/// Argument text per streamed piece when a call is only recognised at the end (`auto`).
const ARGS_PIECE_CHARS: usize = 16;

/// What the client is sent next.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyEvent {
    /// More text of a plain reply.
    Content(String),
    /// Tool call `index` begins.
    CallBegin {
        /// Which call of the reply.
        index: usize,
        /// Its id.
        id: String,
        /// The function called.
        name: String,
    },
    /// More of call `index`'s arguments.
    CallArgs {
        /// Which call of the reply.
        index: usize,
        /// The next piece of its arguments' text.
        text: String,
    },
    /// The reply ended.
    Finish(Finish),
}

/// Shapes one reply's text into events.
pub struct Shaper {
    meta: ResponseMeta,
    tools: Option<Tools>,
    /// Text held back while it may still be a tool call; with no tools, text passes at once.
    held: String,
    call: CallStream,
}

impl Shaper {
    /// A shaper for one response; `tools` are the request's, if any.
    pub fn new(meta: ResponseMeta, tools: Option<Tools>) -> Self {
        Shaper {
            meta,
            tools,
            held: String::new(),
            call: CallStream::default(),
        }
    }

    /// Whether text must be held back: a reply that must be a tool call, or (with
    /// `tool_choice: auto`) one that so far could still become one.
    fn holds(&self) -> bool {
        match self.tools.as_ref().map(|t| &t.choice) {
            None | Some(ToolChoice::None) => false,
            Some(ToolChoice::Required | ToolChoice::Named(_)) => true,
            Some(ToolChoice::Auto) => {
                let t = self.held.trim_start();
                t.is_empty() || t.starts_with('{')
            }
        }
    }

    /// The calls a finished reply makes, if it is a call of the request's tools.
    fn calls(&self, finish: Finish) -> Option<Vec<ToolCall>> {
        let tools = self.tools.as_ref().filter(|_| finish == Finish::Stop)?;
        tools.calls(&self.held, |i| self.meta.call_id(i))
    }

    /// The events new output makes sendable.
    pub fn push(&mut self, delta: Delta) -> Vec<ReplyEvent> {
        self.held.push_str(&delta.text);
        let finish = delta.finish.map(Finish::from);
        let mut events = Vec::new();
        if self.call.begun() || self.holds() {
            // The call is streamed as it is generated: its name, then its arguments.
            for piece in self.call.advance(&self.held) {
                events.push(match piece {
                    Piece::Begin(name) => ReplyEvent::CallBegin {
                        index: 0,
                        id: self.meta.call_id(0),
                        name,
                    },
                    Piece::Arguments(text) => ReplyEvent::CallArgs { index: 0, text },
                });
            }
        }
        let Some(finish) = finish else {
            if !self.call.begun() && !self.holds() && !self.held.is_empty() {
                events.push(ReplyEvent::Content(std::mem::take(&mut self.held)));
            }
            return events;
        };
        let calls = self.calls(finish);
        if self.call.begun() {
            // Streamed already; a call that was cut off ends with the reason it was cut off.
            let reason = if calls.is_some() {
                Finish::ToolCalls
            } else {
                finish
            };
            events.push(ReplyEvent::Finish(reason));
        } else if let Some(calls) = calls {
            events.extend(calls.into_iter().enumerate().flat_map(call_events));
            events.push(ReplyEvent::Finish(Finish::ToolCalls));
        } else {
            if !self.held.is_empty() {
                events.push(ReplyEvent::Content(std::mem::take(&mut self.held)));
            }
            events.push(ReplyEvent::Finish(finish));
        }
        events
    }
}

impl Shaper {
    /// The answer of a finished, not streamed reply: the calls it makes, or its text.
    pub fn whole(mut self, text: String, finish: exo_protocol::FinishReason) -> (Reply, Finish) {
        self.held = text;
        let finish = Finish::from(finish);
        match self.calls(finish) {
            Some(calls) => (Reply::Calls(calls), Finish::ToolCalls),
            None => (Reply::Text(self.held), finish),
        }
    }
}

/// A call found whole at the end, as OpenAI streams one: its id and name, then its arguments in
/// pieces.
fn call_events((index, call): (usize, ToolCall)) -> Vec<ReplyEvent> {
    let begin = ReplyEvent::CallBegin {
        index,
        id: call.id,
        name: call.function.name,
    };
    let chars: Vec<char> = call.function.arguments.chars().collect();
    let args = chars
        .chunks(ARGS_PIECE_CHARS)
        .map(|piece| ReplyEvent::CallArgs {
            index,
            text: piece.iter().collect(),
        });
    std::iter::once(begin).chain(args).collect()
}
