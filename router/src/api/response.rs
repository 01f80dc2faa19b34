//! The OpenAI response bodies, as typed structs: whole answers (`chat.completion`,
//! `text_completion`), streamed chunks (`chat.completion.chunk`), the model list and health.

use exo_protocol::{FinishReason, RequestId, Role};
use serde::Serialize;

use super::logprobs::ChoiceLogprobs;

/// OpenAI's `finish_reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// An end token (also a cancelled request).
    Stop,
    /// A stop string: its index in the request's `stop` (OpenAI says `stop`; Anthropic says
    /// `stop_sequence` and which).
    StopSequence(u8),
    /// `max_tokens` or the context length.
    Length,
    /// The reply is a call of the request's tools.
    ToolCalls,
}

impl Finish {
    /// OpenAI's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Finish::Stop | Finish::StopSequence(_) => "stop",
            Finish::Length => "length",
            Finish::ToolCalls => "tool_calls",
        }
    }

    /// True when the model ended the reply itself (an end token or a stop string).
    pub fn is_stop(self) -> bool {
        matches!(self, Finish::Stop | Finish::StopSequence(_))
    }
}

impl Serialize for Finish {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl From<FinishReason> for Finish {
    fn from(f: FinishReason) -> Self {
        match f {
            FinishReason::Stop | FinishReason::Cancelled => Finish::Stop,
            FinishReason::StopSequence(i) => Finish::StopSequence(i),
            FinishReason::Length => Finish::Length,
        }
    }
}

/// Which endpoint shapes the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completion,
    /// `/v1/messages` (Anthropic).
    Messages,
    /// `/v1/responses` (OpenAI Responses).
    Responses,
}

/// The fields every body of one response repeats.
#[derive(Debug, Clone)]
pub struct ResponseMeta {
    /// Which endpoint.
    pub endpoint: Endpoint,
    /// The request's id (the same in the logs and every RPC).
    pub id: RequestId,
    /// Unix seconds.
    pub created: u64,
    /// The served model.
    pub model: String,
    /// The request's stop strings (what a `stop_sequence` finish names).
    pub stop: Vec<String>,
    /// The request's `parallel_tool_calls` (default true), which a Responses object echoes.
    pub parallel_tool_calls: bool,
}

impl ResponseMeta {
    /// The stop string a `finish` names, if it is one.
    pub fn stop_sequence(&self, finish: Finish) -> Option<&str> {
        match finish {
            Finish::StopSequence(i) => self.stop.get(usize::from(i)).map(String::as_str),
            _ => None,
        }
    }

    /// The response `id`: `chatcmpl-` or `cmpl-` and the request id in hex.
    pub fn response_id(&self) -> String {
        match self.endpoint {
            Endpoint::Chat => format!("chatcmpl-{}", self.id),
            Endpoint::Completion => format!("cmpl-{}", self.id),
            Endpoint::Messages => format!("msg_{}", self.id),
            Endpoint::Responses => format!("resp_{}", self.id),
        }
    }

    /// The id of tool call `i` of this response.
    pub fn call_id(&self, i: usize) -> String {
        format!("call_{}_{i}", self.id)
    }

    fn head(&self, object: &'static str) -> Head {
        Head {
            id: self.response_id(),
            object,
            created: self.created,
            model: self.model.clone(),
        }
    }
}

/// `id`, `object`, `created`, `model`.
#[derive(Debug, Serialize)]
pub struct Head {
    id: String,
    object: &'static str,
    created: u64,
    model: String,
}

/// Token counts.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Their sum.
    pub total_tokens: u32,
}

impl Usage {
    /// Usage of `prompt` prompt and `completion` generated tokens.
    pub fn new(prompt: u32, completion: u32) -> Self {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt.saturating_add(completion),
        }
    }
}

/// A function call in a message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCall {
    /// The call's id (`call_<request>_<i>`).
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// What is called.
    pub function: FunctionCall,
}

/// The function and its arguments.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionCall {
    /// Function name.
    pub name: String,
    /// Arguments, a JSON object's text exactly as generated.
    pub arguments: String,
}

/// The assistant's message in a whole chat answer.
#[derive(Debug, Serialize)]
pub struct AssistantMessage {
    role: &'static str,
    content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<ToolCall>>,
}

/// One choice of a whole answer.
#[derive(Debug, Serialize)]
pub struct Choice {
    index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<AssistantMessage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    logprobs: Option<ChoiceLogprobs>,
    finish_reason: Finish,
}

/// A whole answer: `chat.completion` or `text_completion`.
#[derive(Debug, Serialize)]
pub struct Completion {
    #[serde(flatten)]
    head: Head,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_fingerprint: Option<Option<()>>,
    choices: [Choice; 1],
    usage: Usage,
}

impl Completion {
    /// The answer of a finished request: its text, or the tool calls it made.
    pub fn new(meta: &ResponseMeta, reply: Reply, finish: Finish, usage: Usage) -> Self {
        let (object, fingerprint, message, text) = match (meta.endpoint, reply) {
            (Endpoint::Chat | Endpoint::Messages | Endpoint::Responses, Reply::Text(t)) => {
                let m = AssistantMessage {
                    role: "assistant",
                    content: Some(t),
                    tool_calls: None,
                };
                ("chat.completion", Some(None), Some(m), None)
            }
            (Endpoint::Chat | Endpoint::Messages | Endpoint::Responses, Reply::Calls(calls)) => {
                let m = AssistantMessage {
                    role: "assistant",
                    content: None,
                    tool_calls: Some(calls),
                };
                ("chat.completion", Some(None), Some(m), None)
            }
            (Endpoint::Completion, Reply::Text(t)) => ("text_completion", None, None, Some(t)),
            (Endpoint::Completion, Reply::Calls(_)) => {
                ("text_completion", None, None, Some(String::new()))
            }
        };
        Completion {
            head: meta.head(object),
            system_fingerprint: fingerprint,
            choices: [Choice {
                index: 0,
                message,
                text,
                logprobs: None,
                finish_reason: finish,
            }],
            usage,
        }
    }

    /// The answer with its tokens' log probabilities (when the request asked for them).
    pub fn with_logprobs(mut self, logprobs: Option<ChoiceLogprobs>) -> Self {
        self.choices[0].logprobs = logprobs;
        self
    }
}

/// What a finished reply is.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// Text.
    Text(String),
    /// Calls of the request's tools.
    Calls(Vec<ToolCall>),
}

/// A piece of a tool call in a streamed delta.
#[derive(Debug, Serialize)]
pub struct ToolCallDelta {
    index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    function: FunctionDelta,
}

/// The function part of a streamed tool-call piece.
#[derive(Debug, Serialize)]
pub struct FunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    arguments: String,
}

/// A chat chunk's `delta`.
#[derive(Debug, Default, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<[ToolCallDelta; 1]>,
}

impl Delta {
    /// The first chunk of a chat stream: the role, empty content.
    pub fn role() -> Self {
        Delta {
            role: Some("assistant"),
            content: Some(String::new()),
            tool_calls: None,
        }
    }

    /// More text.
    pub fn content(text: String) -> Self {
        Delta {
            content: Some(text),
            ..Delta::default()
        }
    }

    /// Call `index` begins: its id and function name.
    pub fn call_begin(index: usize, id: String, name: String) -> Self {
        Delta {
            tool_calls: Some([ToolCallDelta {
                index,
                id: Some(id),
                kind: Some("function"),
                function: FunctionDelta {
                    name: Some(name),
                    arguments: String::new(),
                },
            }]),
            ..Delta::default()
        }
    }

    /// More of call `index`'s arguments.
    pub fn call_args(index: usize, arguments: String) -> Self {
        Delta {
            tool_calls: Some([ToolCallDelta {
                index,
                id: None,
                kind: None,
                function: FunctionDelta {
                    name: None,
                    arguments,
                },
            }]),
            ..Delta::default()
        }
    }
}

/// One choice of a streamed chunk.
#[derive(Debug, Serialize)]
pub struct ChunkChoice {
    index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    delta: Option<Delta>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    logprobs: Option<ChoiceLogprobs>,
    finish_reason: Option<Finish>,
}

/// One streamed chunk: `chat.completion.chunk`, or `text_completion` for `/v1/completions`.
#[derive(Debug, Serialize)]
pub struct Chunk {
    #[serde(flatten)]
    head: Head,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_fingerprint: Option<Option<()>>,
    choices: Vec<ChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

impl Chunk {
    /// A chunk carrying `delta` and, on the last, the finish reason. A completion stream carries
    /// only the delta's text.
    pub fn new(meta: &ResponseMeta, delta: Delta, finish: Option<Finish>) -> Self {
        let (object, fingerprint, delta, text) = match meta.endpoint {
            Endpoint::Chat | Endpoint::Messages | Endpoint::Responses => {
                ("chat.completion.chunk", Some(None), Some(delta), None)
            }
            Endpoint::Completion => {
                let text = delta.content.unwrap_or_default();
                ("text_completion", None, None, Some(text))
            }
        };
        Chunk {
            head: meta.head(object),
            system_fingerprint: fingerprint,
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                text,
                logprobs: None,
                finish_reason: finish,
            }],
            usage: None,
        }
    }

    /// Gives the chunk the log probabilities of the tokens it carries.
    pub fn set_logprobs(&mut self, logprobs: ChoiceLogprobs) {
        if let Some(c) = self.choices.first_mut() {
            c.logprobs = Some(logprobs);
        }
    }

    /// The last chunk of a stream that asked for usage: no choices, the token counts.
    pub fn usage(meta: &ResponseMeta, usage: Usage) -> Self {
        let object = match meta.endpoint {
            Endpoint::Chat | Endpoint::Messages | Endpoint::Responses => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        };
        Chunk {
            head: meta.head(object),
            system_fingerprint: None,
            choices: Vec::new(),
            usage: Some(usage),
        }
    }
}

/// `GET /v1/models`.
#[derive(Debug, Serialize)]
pub struct ModelList {
    object: &'static str,
    data: Vec<ModelCard>,
}

/// One served model.
#[derive(Debug, Serialize)]
pub struct ModelCard {
    id: String,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

impl ModelList {
    /// The list of the models a cluster serves.
    pub fn of(ids: impl IntoIterator<Item = String>) -> Self {
        ModelList {
            object: "list",
            data: ids
                .into_iter()
                .map(|id| ModelCard {
                    id,
                    object: "model",
                    created: 0,
                    owned_by: "exo-router",
                })
                .collect(),
        }
    }
}

/// `GET /health`: whether a request could be placed now, and every node's state.
#[derive(Debug, Serialize)]
pub struct Health {
    /// `ok` or `unavailable`.
    pub status: &'static str,
    /// The served model.
    pub model: String,
    /// The nodes.
    pub nodes: Vec<NodeHealth>,
}

/// One node in `/health`.
#[derive(Debug, Serialize)]
pub struct NodeHealth {
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// RPC address.
    pub address: String,
    /// Whether the last check succeeded.
    pub healthy: bool,
    /// Why it is down, when it is (a refused TLS handshake names the cluster file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Requests placed on it and not finished.
    pub in_flight: usize,
}
