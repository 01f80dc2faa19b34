//! The Anthropic Messages API (`POST /v1/messages`): its request body, turned into the same chat
//! request the OpenAI endpoint makes (turns, sampling, tools), so a request runs the same way
//! behind either API; and its replies ([`reply`]): the `message` object, the streamed event
//! sequence, and errors in Anthropic's shape.

pub mod reply;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::error::ApiError;
use crate::api::openai::{
    ChatRequest, CommonParams, Content, Message, Stop, function_tool, tool_call,
};

/// `POST /v1/messages` body. Fields not listed (`metadata`, `anthropic-version` is a header) are
/// accepted and ignored; `seed` is our extension (Anthropic has none) for reproducible sampling.
#[derive(Debug, Deserialize)]
pub struct MessagesRequest {
    /// Model id; must be the served model.
    pub model: Option<String>,
    /// Most tokens to generate (required, as in Anthropic's API).
    pub max_tokens: Option<u32>,
    /// The system prompt: a string or a list of text blocks.
    #[serde(default)]
    pub system: Option<SystemPrompt>,
    /// The conversation, alternating `user` and `assistant`.
    pub messages: Vec<AnthropicMessage>,
    /// Strings that end generation (not included in the output).
    #[serde(default)]
    pub stop_sequences: Option<Vec<String>>,
    /// Temperature.
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    pub top_p: Option<f32>,
    /// Keep only the k most likely tokens.
    pub top_k: Option<u32>,
    /// Stream events.
    #[serde(default)]
    pub stream: bool,
    /// Seed for reproducible sampling (an extension).
    pub seed: Option<i64>,
    /// Tools the model may call.
    #[serde(default)]
    pub tools: Option<Vec<AnthropicTool>>,
    /// How the model may use them.
    #[serde(default)]
    pub tool_choice: Option<AnthropicToolChoice>,
    /// Extended thinking: refused when enabled (no model here thinks that way).
    #[serde(default)]
    pub thinking: Option<Value>,
}

/// `system`: a string or text blocks.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum SystemPrompt {
    /// Plain text.
    Text(String),
    /// Text blocks (other fields such as `cache_control` are ignored).
    Blocks(Vec<Block>),
}

/// One message.
#[derive(Debug, Deserialize)]
pub struct AnthropicMessage {
    /// `user` or `assistant`.
    pub role: String,
    /// A string or content blocks.
    pub content: AnthropicContent,
}

/// A message's content.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum AnthropicContent {
    /// Plain text.
    Text(String),
    /// Content blocks.
    Blocks(Vec<Block>),
}

/// A content block; the types a text model can take.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Block {
    /// Text.
    Text {
        /// The text.
        text: String,
    },
    /// A call the assistant made.
    ToolUse {
        /// The call's id.
        id: String,
        /// The tool called.
        name: String,
        /// Its arguments, a JSON object.
        input: Value,
    },
    /// A tool's answer, in a user message.
    ToolResult {
        /// The call answered.
        tool_use_id: String,
        /// A string or text blocks.
        #[serde(default)]
        content: Option<ToolResultContent>,
        /// The tool failed.
        #[serde(default)]
        is_error: bool,
    },
    /// Anything else (images, documents, thinking): refused.
    #[serde(other)]
    Unsupported,
}

/// A tool result's content.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ToolResultContent {
    /// Plain text.
    Text(String),
    /// Blocks (text only).
    Blocks(Vec<Block>),
}

/// A tool definition.
#[derive(Debug, Deserialize)]
pub struct AnthropicTool {
    /// `custom` or absent; server tools (web search, ...) are refused.
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// The tool's name.
    pub name: String,
    /// What it does.
    #[serde(default)]
    pub description: Option<String>,
    /// JSON Schema of its input.
    #[serde(default)]
    pub input_schema: Option<Value>,
}

/// `tool_choice`.
#[derive(Debug, Deserialize)]
pub struct AnthropicToolChoice {
    /// `auto`, `any`, `tool` or `none`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The tool, for `tool`.
    #[serde(default)]
    pub name: Option<String>,
    /// At most one tool call in the reply.
    #[serde(default)]
    pub disable_parallel_tool_use: Option<bool>,
}

fn block_text(blocks: &[Block], param: &'static str) -> Result<String, ApiError> {
    let mut text = Vec::new();
    for b in blocks {
        match b {
            Block::Text { text: t } => text.push(t.as_str()),
            _ => return Err(ApiError::bad(param, "only text blocks are supported here")),
        }
    }
    Ok(text.join("\n"))
}

impl MessagesRequest {
    /// The same chat request `/v1/chat/completions` would make of this conversation: system
    /// prompt first, tool results as `tool` turns, tool uses as the assistant's `tool_calls`,
    /// tools and `tool_choice` in OpenAI's form.
    pub fn to_chat(&self) -> Result<ChatRequest, ApiError> {
        if self.max_tokens.is_none() {
            return Err(ApiError::bad("max_tokens", "max_tokens: field required"));
        }
        if self
            .thinking
            .as_ref()
            .and_then(|t| t.get("type"))
            .and_then(Value::as_str)
            .is_some_and(|t| t != "disabled")
        {
            return Err(ApiError::bad(
                "thinking",
                "extended thinking is not supported",
            ));
        }
        let mut messages = Vec::new();
        match &self.system {
            Some(SystemPrompt::Text(t)) => messages.push(Message::text("system", t.clone())),
            Some(SystemPrompt::Blocks(b)) => {
                messages.push(Message::text("system", block_text(b, "system")?));
            }
            None => {}
        }
        for m in &self.messages {
            match m.role.as_str() {
                "user" => user_turns(&m.content, &mut messages)?,
                "assistant" => messages.push(assistant_turn(&m.content)?),
                other => {
                    return Err(ApiError::bad(
                        "messages",
                        format!("unknown role `{other}` (user or assistant)"),
                    ));
                }
            }
        }
        if self.messages.is_empty() {
            return Err(ApiError::bad("messages", "messages must not be empty"));
        }
        Ok(ChatRequest {
            messages,
            params: self.params()?,
        })
    }

    fn params(&self) -> Result<CommonParams, ApiError> {
        let tools = self
            .tools
            .as_ref()
            .map(|list| list.iter().map(openai_tool).collect::<Result<Vec<_>, _>>())
            .transpose()?;
        let tool_choice = self.tool_choice.as_ref().map(openai_choice).transpose()?;
        Ok(CommonParams {
            model: self.model.clone(),
            stream: self.stream,
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            stop: self.stop_sequences.clone().map(Stop::Many),
            tools,
            tool_choice,
            parallel_tool_calls: self
                .tool_choice
                .as_ref()
                .and_then(|c| c.disable_parallel_tool_use)
                .map(|disabled| !disabled),
            ..CommonParams::default()
        })
    }
}

/// A user message's turns: its text, and a `tool` turn per tool result, in block order.
fn user_turns(content: &AnthropicContent, out: &mut Vec<Message>) -> Result<(), ApiError> {
    let blocks = match content {
        AnthropicContent::Text(t) => {
            out.push(Message::text("user", t.clone()));
            return Ok(());
        }
        AnthropicContent::Blocks(b) => b,
    };
    let mut text: Vec<&str> = Vec::new();
    let flush = |text: &mut Vec<&str>, out: &mut Vec<Message>| {
        if !text.is_empty() {
            out.push(Message::text("user", text.join("\n")));
            text.clear();
        }
    };
    for b in blocks {
        match b {
            Block::Text { text: t } => text.push(t),
            Block::ToolResult {
                tool_use_id,
                content,
                is_error,
            } => {
                flush(&mut text, out);
                let mut result = match content {
                    None => String::new(),
                    Some(ToolResultContent::Text(t)) => t.clone(),
                    Some(ToolResultContent::Blocks(b)) => block_text(b, "messages")?,
                };
                if *is_error {
                    result = format!("error: {result}");
                }
                out.push(Message::tool_result(tool_use_id.clone(), result));
            }
            Block::ToolUse { .. } => {
                return Err(ApiError::bad(
                    "messages",
                    "tool_use blocks belong to assistant messages",
                ));
            }
            Block::Unsupported => {
                return Err(ApiError::bad(
                    "messages",
                    "content block type not supported (text, tool_use and tool_result are)",
                ));
            }
        }
    }
    flush(&mut text, out);
    Ok(())
}

/// An assistant message: its text, and its tool uses as OpenAI `tool_calls`.
fn assistant_turn(content: &AnthropicContent) -> Result<Message, ApiError> {
    let blocks = match content {
        AnthropicContent::Text(t) => return Ok(Message::text("assistant", t.clone())),
        AnthropicContent::Blocks(b) => b,
    };
    let mut text = Vec::new();
    let mut calls = Vec::new();
    for b in blocks {
        match b {
            Block::Text { text: t } => text.push(t.as_str()),
            Block::ToolUse { id, name, input } => {
                calls.push(tool_call(id, name, &input.to_string()));
            }
            _ => {
                return Err(ApiError::bad(
                    "messages",
                    "an assistant message holds text and tool_use blocks only",
                ));
            }
        }
    }
    Ok(Message {
        role: "assistant".into(),
        content: Some(Content::Text(text.join("\n"))),
        tool_calls: (!calls.is_empty()).then_some(Value::Array(calls)),
        tool_call_id: None,
    })
}

fn openai_tool(t: &AnthropicTool) -> Result<Value, ApiError> {
    if t.kind.as_deref().is_some_and(|k| k != "custom") {
        return Err(ApiError::bad(
            "tools",
            format!(
                "tool {:?} is a server tool ({:?}); only custom tools are supported",
                t.name, t.kind
            ),
        ));
    }
    Ok(function_tool(
        &t.name,
        t.description.as_deref(),
        t.input_schema.as_ref(),
    ))
}

fn openai_choice(c: &AnthropicToolChoice) -> Result<Value, ApiError> {
    Ok(match c.kind.as_str() {
        "auto" => json!("auto"),
        "any" => json!("required"),
        "none" => json!("none"),
        "tool" => {
            let name = c.name.as_deref().ok_or_else(|| {
                ApiError::bad("tool_choice", "tool_choice of type tool needs a name")
            })?;
            json!({ "type": "function", "function": { "name": name } })
        }
        other => {
            return Err(ApiError::bad(
                "tool_choice",
                format!("tool_choice type {other:?} (auto, any, tool or none)"),
            ));
        }
    })
}
