//! Tool-call shaping: turns the generated text, as it arrives, into what a client is sent:
//! [`ReplyEvent::Content`], or a call's [`ReplyEvent::CallBegin`] and [`ReplyEvent::CallArgs`],
//! then one [`ReplyEvent::Finish`]. The SSE writer only frames these events; a whole answer uses
//! the same [`Tools::calls`] to decide between text and calls.

use crate::api::openai::{ToolChoice, Tools};
use crate::api::response::{Finish, FunctionCall, Reply, ResponseMeta, ToolCall};
use crate::api::toolcall::{CallStream, Piece, args_so_far, header_in, may_open};
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
        let syntax = tools.as_ref().map(Tools::reply_syntax).unwrap_or_default();
        Shaper {
            meta,
            tools,
            held: String::new(),
            call: CallStream::new(syntax),
        }
    }

    /// Whether text must be held back: a reply that must be a tool call, or (with
    /// `tool_choice: auto`) one that so far could still become one.
    fn holds(&self) -> bool {
        match self.tools.as_ref().map(|t| &t.choice) {
            None | Some(ToolChoice::None) => false,
            Some(ToolChoice::Required | ToolChoice::Named(_)) => true,
            Some(ToolChoice::Auto) => self
                .tools
                .as_ref()
                .is_some_and(|t| may_open(&self.held, t.syntax)),
        }
    }

    /// The calls a finished reply makes, if it is a call of the request's tools.
    fn calls(&self, finish: Finish) -> Option<Vec<ToolCall>> {
        let tools = self.tools.as_ref().filter(|_| finish.is_stop())?;
        tools.calls(&self.held, |i| self.meta.call_id(i))
    }

    /// A call cut off by `max_tokens`: its name and the arguments generated so far, when the
    /// reply got as far as the name of a listed function. It is answered as a call with
    /// `finish_reason: "length"`, never as the wrapper's text.
    fn cut_call(&self, finish: Finish) -> Option<ToolCall> {
        let tools = self
            .tools
            .as_ref()
            .filter(|t| finish == Finish::Length && t.choice != ToolChoice::None)?;
        let (name, start) = header_in(&self.held, tools.reply_syntax())?;
        if !tools.lists(&name) {
            return None;
        }
        Some(ToolCall {
            id: self.meta.call_id(0),
            kind: "function",
            function: FunctionCall {
                name,
                arguments: args_so_far(&self.held[start..]).to_string(),
            },
        })
    }

    /// True when the reply must be a call (`required` or a named function): its text is never
    /// content, even when it was cut off before the call's name.
    fn must_call(&self) -> bool {
        matches!(
            self.tools.as_ref().map(|t| &t.choice),
            Some(ToolChoice::Required | ToolChoice::Named(_))
        )
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
            // The first call was streamed already; any further (parallel) calls go whole. A call
            // that was cut off ends with the reason it was cut off.
            let reason = match calls {
                Some(calls) => {
                    events.extend(calls.into_iter().enumerate().skip(1).flat_map(call_events));
                    Finish::ToolCalls
                }
                None => finish,
            };
            events.push(ReplyEvent::Finish(reason));
        } else if let Some(calls) = calls {
            events.extend(calls.into_iter().enumerate().flat_map(call_events));
            events.push(ReplyEvent::Finish(Finish::ToolCalls));
        } else if let Some(cut) = self.cut_call(finish) {
            events.extend(call_events((0, cut)));
            events.push(ReplyEvent::Finish(finish));
        } else if self.must_call() {
            events.push(ReplyEvent::Finish(finish));
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
        if let Some(calls) = self.calls(finish) {
            return (Reply::Calls(calls), Finish::ToolCalls);
        }
        if let Some(cut) = self.cut_call(finish) {
            return (Reply::Calls(vec![cut]), finish);
        }
        if self.must_call() {
            return (Reply::Text(String::new()), finish);
        }
        (Reply::Text(self.held), finish)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::api::openai::strict;
    use crate::api::response::Endpoint;
    use exo_protocol::{FinishReason, RequestId};
    use serde_json::json;

    fn shaper(choice: ToolChoice) -> Shaper {
        let meta = ResponseMeta {
            endpoint: Endpoint::Chat,
            id: RequestId(7),
            created: 0,
            model: "m".into(),
            stop: Vec::new(),
            parallel_tool_calls: true,
        };
        let list = vec![json!({ "type": "function", "function": { "name": "get_weather" } })];
        Shaper::new(
            meta,
            Some(Tools {
                list,
                choice,
                syntax: exo_protocol::ToolSyntax::Wrapped,
                parallel: None,
            }),
        )
    }

    const CUT: &str =
        "{\"tool_calls\": [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Os";

    #[test]
    fn a_call_cut_by_max_tokens_is_a_call_with_finish_length_never_content() {
        let named = || shaper(ToolChoice::Named("get_weather".into()));
        let (reply, finish) = named().whole(CUT.into(), FinishReason::Length);
        assert_eq!(finish, Finish::Length);
        let Reply::Calls(calls) = reply else {
            panic!("not a call")
        };
        assert_eq!(calls[0].function.name, "get_weather");
        assert_eq!(calls[0].function.arguments, "{\"city\": \"Os");
        // Cut before the name: no call, and no wrapper text as content either.
        let early = "{\"tool_calls\": [{\"na";
        let (reply, _) = named().whole(early.into(), FinishReason::Length);
        assert!(matches!(reply, Reply::Text(t) if t.is_empty()));
        // Streamed: the same, as call events.
        for text in [CUT, early] {
            let mut s = named();
            let events = s.push(Delta {
                text: text.into(),
                logprobs: Vec::new(),
                finish: Some(FinishReason::Length),
            });
            assert!(
                !events.iter().any(|e| matches!(e, ReplyEvent::Content(_))),
                "{events:?}"
            );
            assert_eq!(events.last(), Some(&ReplyEvent::Finish(Finish::Length)));
        }
        // With `auto`, a cut call is a call too.
        let (reply, finish) = shaper(ToolChoice::Auto).whole(CUT.into(), FinishReason::Length);
        assert!(matches!(reply, Reply::Calls(_)) && finish == Finish::Length);
    }

    #[test]
    fn parameter_schemas_are_made_strict_unless_they_say_otherwise() {
        let schema = json!({
            "type": "object",
            "properties": {
                "place": { "type": "object", "properties": { "city": { "type": "string" } } },
                "tags": { "type": "array", "items": { "type": "object", "properties": {} } },
                "extra": { "type": "object", "additionalProperties": true },
            },
        });
        let s = strict(&schema);
        assert_eq!(s["additionalProperties"], false);
        assert_eq!(s["properties"]["place"]["additionalProperties"], false);
        assert_eq!(
            s["properties"]["tags"]["items"]["additionalProperties"],
            false
        );
        assert_eq!(s["properties"]["extra"]["additionalProperties"], true);
        assert_eq!(strict(&json!(true)), json!(true));
    }
}
