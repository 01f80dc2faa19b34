//! OpenAI request and response shapes for `/v1/chat/completions` and `/v1/completions`.

use exo_protocol::{ChatTurn, Constraint, FinishReason, SamplingParams};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::ApiError;

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
    /// Seed for reproducible sampling.
    pub seed: Option<i64>,
    /// Stop strings.
    pub stop: Option<Stop>,
    /// Completions per prompt; only 1.
    pub n: Option<u32>,
    /// Tools (not supported yet).
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    /// Response format (only `text` supported yet).
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
    /// client gave none.
    pub fn sampling(
        &self,
        served_model: &str,
        fresh_seed: u64,
    ) -> Result<SamplingParams, ApiError> {
        match self.model.as_deref() {
            None => return Err(ApiError::bad("model", "you must provide a model parameter")),
            Some(m) if m != served_model => {
                return Err(ApiError::BadRequest {
                    message: format!(
                        "the model `{m}` does not exist; this server serves `{served_model}`"
                    ),
                    param: Some("model"),
                    code: Some("model_not_found"),
                });
            }
            Some(_) => {}
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad("n", "only n = 1 is supported"));
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::bad("tools", "tool calls are not supported yet"));
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
            top_k: 0,
            top_p,
            min_p: 0.0,
            seed: self.seed.map_or(fresh_seed, |s| s as u64),
            max_tokens,
            stop,
            constraint,
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
                Ok(ChatTurn { role, content })
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

/// OpenAI's `finish_reason` string.
pub fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length => "length",
    }
}

/// The `usage` object.
pub fn usage(prompt: u32, completion: u32) -> Value {
    json!({ "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion })
}
