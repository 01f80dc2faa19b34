//! The OpenAI Responses API (`POST /v1/responses`), stateless: its request body, turned into the
//! same chat request `/v1/chat/completions` makes, and its replies ([`reply`]): the `response`
//! object and the streamed `response.*` events.
//!
//! Nothing is stored (`store: false` semantics whatever the client asks): `previous_response_id`
//! is refused with a message saying so; clients send the whole conversation as `input` items.

pub mod reply;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::error::ApiError;
use crate::api::openai::{ChatRequest, CommonParams, Message, function_tool, tool_call};

/// `POST /v1/responses` body. Fields not listed (`store`, `metadata`, `user`, `include`,
/// `truncation`) are accepted and ignored.
#[derive(Debug, Deserialize)]
pub struct ResponsesRequest {
    /// Model id; must be the served model.
    pub model: Option<String>,
    /// A string (one user message) or a list of input items.
    pub input: Input,
    /// A system message put first.
    #[serde(default)]
    pub instructions: Option<String>,
    /// Most tokens to generate.
    pub max_output_tokens: Option<u32>,
    /// Temperature.
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    pub top_p: Option<f32>,
    /// Seed for reproducible sampling (an extension, as on chat completions).
    pub seed: Option<i64>,
    /// Stream `response.*` events.
    #[serde(default)]
    pub stream: bool,
    /// Function tools.
    #[serde(default)]
    pub tools: Option<Vec<ResponsesTool>>,
    /// `auto`, `none`, `required` or `{"type": "function", "name"}`.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// As on chat completions.
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// `{"format": {"type": "text" | "json_object" | "json_schema", ...}}`.
    #[serde(default)]
    pub text: Option<TextOptions>,
    /// Refused: this server keeps no responses.
    #[serde(default)]
    pub previous_response_id: Option<String>,
}

/// `input`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Input {
    /// One user message.
    Text(String),
    /// Items (messages, function calls and their outputs).
    Items(Vec<Value>),
}

/// A function tool (Responses' flat form).
#[derive(Debug, Deserialize)]
pub struct ResponsesTool {
    /// Only `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function's name.
    #[serde(default)]
    pub name: Option<String>,
    /// What it does.
    #[serde(default)]
    pub description: Option<String>,
    /// JSON Schema of its arguments.
    #[serde(default)]
    pub parameters: Option<Value>,
}

/// `text`.
#[derive(Debug, Deserialize)]
pub struct TextOptions {
    /// The output format.
    #[serde(default)]
    pub format: Option<Value>,
}

/// A message item's text: a string, or `input_text` / `output_text` parts.
fn item_text(content: &Value) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("input_text" | "output_text" | "text"), Some(Value::String(t))) => {
                        text += t;
                    }
                    (kind, _) => {
                        return Err(ApiError::bad(
                            "input",
                            format!(
                                "content part {kind:?} is not supported (input_text, output_text)"
                            ),
                        ));
                    }
                }
            }
            Ok(text)
        }
        _ => Err(ApiError::bad(
            "input",
            "message content must be a string or a list of parts",
        )),
    }
}

/// Appends one input item as chat turns: a message, or a function call (joined to the
/// assistant turn before it when there is one), or a function call's output.
fn push_item(item: &Value, out: &mut Vec<Message>) -> Result<(), ApiError> {
    let field = |name: &str| item.get(name).and_then(Value::as_str);
    match field("type").unwrap_or("message") {
        "message" => {
            let role = field("role")
                .ok_or_else(|| ApiError::bad("input", "a message item needs a role"))?;
            let role = match role {
                "user" | "assistant" | "system" => role,
                "developer" => "system",
                other => return Err(ApiError::bad("input", format!("unknown role {other:?}"))),
            };
            let text = item_text(item.get("content").unwrap_or(&Value::Null))?;
            out.push(Message::text(role, text));
        }
        "function_call" => {
            let (Some(call_id), Some(name)) = (field("call_id"), field("name")) else {
                return Err(ApiError::bad(
                    "input",
                    "a function_call item needs call_id and name",
                ));
            };
            let call = tool_call(call_id, name, field("arguments").unwrap_or("{}"));
            match out.last_mut() {
                Some(m) if m.role == "assistant" => match &mut m.tool_calls {
                    Some(Value::Array(calls)) => calls.push(call),
                    _ => m.tool_calls = Some(json!([call])),
                },
                _ => out.push(Message {
                    role: "assistant".into(),
                    content: None,
                    tool_calls: Some(json!([call])),
                    tool_call_id: None,
                }),
            }
        }
        "function_call_output" => {
            let call_id = field("call_id").ok_or_else(|| {
                ApiError::bad("input", "a function_call_output item needs call_id")
            })?;
            let output = match item.get("output") {
                Some(Value::String(s)) => s.clone(),
                Some(other) => item_text(other)?,
                None => String::new(),
            };
            out.push(Message::tool_result(call_id.to_string(), output));
        }
        other => {
            return Err(ApiError::bad(
                "input",
                format!(
                    "input item type {other:?} is not supported (message, function_call, function_call_output)"
                ),
            ));
        }
    }
    Ok(())
}

impl ResponsesRequest {
    /// The same chat request `/v1/chat/completions` would make: `instructions` as the system
    /// message, function calls as the assistant's `tool_calls`, their outputs as `tool` turns,
    /// tools and `text.format` in chat's form.
    pub fn to_chat(&self) -> Result<ChatRequest, ApiError> {
        if self.previous_response_id.is_some() {
            return Err(ApiError::bad(
                "previous_response_id",
                "this server stores no responses: send the whole conversation as `input` items",
            ));
        }
        let mut messages = Vec::new();
        if let Some(i) = &self.instructions {
            messages.push(Message::text("system", i.clone()));
        }
        match &self.input {
            Input::Text(t) => messages.push(Message::text("user", t.clone())),
            Input::Items(items) => {
                for item in items {
                    push_item(item, &mut messages)?;
                }
            }
        }
        let tools = self
            .tools
            .as_ref()
            .map(|list| list.iter().map(chat_tool).collect::<Result<Vec<_>, _>>())
            .transpose()?;
        let tool_choice = self.tool_choice.as_ref().map(chat_choice);
        let response_format = self
            .text
            .as_ref()
            .and_then(|t| t.format.as_ref())
            .map(chat_format)
            .transpose()?;
        Ok(ChatRequest {
            messages,
            params: CommonParams {
                model: self.model.clone(),
                stream: self.stream,
                max_tokens: self.max_output_tokens,
                temperature: self.temperature,
                top_p: self.top_p,
                seed: self.seed,
                tools,
                tool_choice,
                parallel_tool_calls: self.parallel_tool_calls,
                response_format,
                ..CommonParams::default()
            },
        })
    }
}

fn chat_tool(t: &ResponsesTool) -> Result<Value, ApiError> {
    if t.kind != "function" {
        return Err(ApiError::bad(
            "tools",
            format!("tool type {:?} is not supported (function)", t.kind),
        ));
    }
    Ok(function_tool(
        t.name.as_deref().unwrap_or_default(),
        t.description.as_deref(),
        t.parameters.as_ref(),
    ))
}

/// Responses' `{"type": "function", "name"}` is chat's `{"type": "function", "function": {"name"}}`.
fn chat_choice(c: &Value) -> Value {
    match c.get("name") {
        Some(name) => json!({ "type": "function", "function": { "name": name } }),
        None => c.clone(),
    }
}

/// Responses' flat `text.format` is chat's `response_format`.
fn chat_format(f: &Value) -> Result<Value, ApiError> {
    Ok(match f.get("type").and_then(Value::as_str) {
        Some("json_schema") => json!({
            "type": "json_schema",
            "json_schema": {
                "name": f.get("name").cloned().unwrap_or(Value::Null),
                "schema": f.get("schema").cloned().unwrap_or(Value::Null),
                "strict": f.get("strict").cloned().unwrap_or(Value::Null),
            },
        }),
        Some("text" | "json_object") => f.clone(),
        _ => {
            return Err(ApiError::bad(
                "text",
                "text.format type must be text, json_object or json_schema",
            ));
        }
    })
}
