//! OpenAI request bodies for `/v1/chat/completions` and `/v1/completions`, checked and turned into
//! the typed values the router works with (chat turns, sampling parameters, tools).

use exo_protocol::{ChatTurn, Constraint, SamplingParams};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::adjust::Adjustments;
use crate::api::error::ApiError;
pub use crate::api::tools::{ToolChoice, Tools, strict};

/// A chat message's content: a string or a list of parts (only text parts are supported).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Content parts.
    Parts(Vec<ContentPart>),
}

/// One content part.
#[derive(Debug, Deserialize)]
pub struct ContentPart {
    /// Part type; only `text` is supported.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default)]
    pub text: Option<String>,
}

/// One chat message.
#[derive(Debug, Deserialize)]
pub struct Message {
    /// Author role.
    pub role: String,
    /// Content (may be null for assistant messages).
    #[serde(default)]
    pub content: Option<Content>,
    /// An assistant message's tool calls.
    #[serde(default)]
    pub tool_calls: Option<Value>,
    /// A tool message's answer is for this call.
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

impl Message {
    /// A turn of plain text by `role` (other APIs' messages, turned into chat's).
    pub fn text(role: &str, text: String) -> Message {
        Message {
            role: role.into(),
            content: Some(Content::Text(text)),
            tool_calls: None,
            tool_call_id: None,
        }
    }

    /// A `tool` turn: the answer to call `call_id`.
    pub fn tool_result(call_id: String, text: String) -> Message {
        Message {
            tool_call_id: Some(call_id),
            ..Message::text("tool", text)
        }
    }
}

/// A function tool in chat's `tools` form (what other APIs' tool definitions become).
pub fn function_tool(name: &str, description: Option<&str>, parameters: Option<&Value>) -> Value {
    json!({
        "type": "function",
        "function": {
            "name": name,
            "description": description.unwrap_or_default(),
            "parameters": parameters.cloned().unwrap_or_else(|| json!({ "type": "object" })),
        },
    })
}

/// A call in an assistant turn's `tool_calls`, chat's form.
pub fn tool_call(id: &str, name: &str, arguments: &str) -> Value {
    json!({ "id": id, "type": "function", "function": { "name": name, "arguments": arguments } })
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    /// Send a final chunk with token usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields both endpoints share. Fields a client sends that are not listed are ignored.
#[derive(Debug, Deserialize, Default)]
pub struct CommonParams {
    /// Model id; must be the served model.
    pub model: Option<String>,
    /// Stream as server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Most tokens to generate.
    pub max_tokens: Option<u32>,
    /// Newer name of `max_tokens`.
    pub max_completion_tokens: Option<u32>,
    /// Temperature (default 1).
    pub temperature: Option<f32>,
    /// Nucleus sampling (default 1).
    pub top_p: Option<f32>,
    /// Keep only the k most likely tokens (not OpenAI's; many compatible clients send it).
    pub top_k: Option<u32>,
    /// Drop tokens less likely than `min_p` times the most likely one (not OpenAI's).
    pub min_p: Option<f32>,
    /// Logit bias, penalties and log probabilities.
    #[serde(flatten)]
    pub adjust: Adjustments,
    /// Seed for reproducible sampling.
    pub seed: Option<i64>,
    /// Stop strings.
    pub stop: Option<Stop>,
    /// Completions per prompt; only 1.
    pub n: Option<u32>,
    /// Functions the model may call (chat only).
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    /// `none`, `auto`, `required` or `{"type": "function", "function": {"name"}}`.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// `false`: at most one call per reply; `true` lets a forced call (`required`, a named
    /// function) be several; unset: the model decides in `auto`, one forced call.
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// `text`, `json_object` or `json_schema`.
    #[serde(default)]
    pub response_format: Option<Value>,
}

/// `POST /v1/chat/completions` body.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<Message>,
    /// Everything else.
    #[serde(flatten)]
    pub params: CommonParams,
}

/// `POST /v1/completions` prompt: a string or a one-element list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    /// One prompt.
    One(String),
    /// A list (only one element supported).
    Many(Vec<Value>),
}

/// `POST /v1/completions` body.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// The prompt.
    pub prompt: PromptField,
    /// Everything else.
    #[serde(flatten)]
    pub params: CommonParams,
}

/// Largest stop-string count (OpenAI allows 4).
const MAX_STOP: usize = 4;

impl CommonParams {
    /// Checks the fields and turns them into sampling parameters; `fresh_seed` is used when the
    /// client gave none. The `model` field is the cluster's to check ([`Cluster::resolve_model`]).
    ///
    /// [`Cluster::resolve_model`]: crate::cluster::Cluster::resolve_model
    pub fn sampling(&self, fresh_seed: u64) -> Result<SamplingParams, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad("n", "only n = 1 is supported"));
        }
        let constraint = match &self.response_format {
            None => None,
            Some(rf) => response_format(rf)?,
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad(
                "temperature",
                "temperature must be between 0 and 2",
            ));
        }
        let min_p = self.min_p.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&min_p) {
            return Err(ApiError::bad("min_p", "min_p must be in [0, 1]"));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad("top_p", "top_p must be in (0, 1]"));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOP {
            return Err(ApiError::bad(
                "stop",
                format!("at most {MAX_STOP} stop strings"),
            ));
        }
        let max_tokens = self
            .max_completion_tokens
            .or(self.max_tokens)
            .unwrap_or(u32::MAX);
        if max_tokens == 0 {
            return Err(ApiError::bad("max_tokens", "max_tokens must be at least 1"));
        }
        Ok(SamplingParams {
            temperature,
            top_k: self.top_k.unwrap_or(0),
            top_p,
            min_p,
            seed: self.seed.map_or(fresh_seed, |s| s as u64),
            max_tokens,
            stop,
            constraint,
            ..SamplingParams::default()
        })
    }

    /// True when a streamed response should end with a usage chunk.
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

/// The constraint a `response_format` asks for: `text` (none), `json_object`, or `json_schema`
/// with `json_schema.schema`. The schema is only checked for shape here; the node that runs the
/// request compiles it and refuses what it cannot enforce.
fn response_format(rf: &Value) -> Result<Option<Constraint>, ApiError> {
    let bad = |msg: &str| ApiError::bad("response_format", msg.to_string());
    match rf.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Constraint::JsonObject)),
        Some("json_schema") => {
            let schema = rf
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .ok_or_else(|| bad("response_format json_schema needs json_schema.schema"))?;
            if !(schema.is_object() || schema.is_boolean()) {
                return Err(bad("json_schema.schema must be a JSON Schema object"));
            }
            Ok(Some(Constraint::JsonSchema(schema.to_string())))
        }
        _ => Err(bad(
            "response_format type must be `text`, `json_object` or `json_schema`",
        )),
    }
}

impl ChatRequest {
    /// The conversation as chat turns.
    pub fn turns(&self) -> Result<Vec<ChatTurn>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::bad("messages", "messages must not be empty"));
        }
        self.messages
            .iter()
            .map(|m| {
                if !["system", "developer", "user", "assistant", "tool"].contains(&m.role.as_str())
                {
                    return Err(ApiError::bad(
                        "messages",
                        format!("unknown message role `{}`", m.role),
                    ));
                }
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut s = String::new();
                        for p in parts {
                            match (p.kind.as_str(), &p.text) {
                                ("text", Some(t)) => s += t,
                                (kind, _) => {
                                    return Err(ApiError::bad(
                                        "messages",
                                        format!("content part type `{kind}` is not supported"),
                                    ));
                                }
                            }
                        }
                        s
                    }
                };
                let role = if m.role == "developer" {
                    "system".to_string()
                } else {
                    m.role.clone()
                };
                let tool_calls = match &m.tool_calls {
                    None | Some(Value::Null) => None,
                    Some(calls @ Value::Array(_)) if m.role == "assistant" => {
                        Some(calls.to_string())
                    }
                    Some(_) => {
                        return Err(ApiError::bad(
                            "messages",
                            "tool_calls must be an array on an assistant message",
                        ));
                    }
                };
                Ok(ChatTurn {
                    role,
                    content,
                    tool_calls,
                    tool_call_id: m.tool_call_id.clone(),
                })
            })
            .collect()
    }
}

impl CompletionRequest {
    /// The single prompt string.
    pub fn prompt_text(&self) -> Result<String, ApiError> {
        match &self.prompt {
            PromptField::One(s) => Ok(s.clone()),
            PromptField::Many(v) => match v.as_slice() {
                [Value::String(s)] => Ok(s.clone()),
                _ => Err(ApiError::bad(
                    "prompt",
                    "only a single string prompt is supported",
                )),
            },
        }
    }
}
