//! A chat request's tools: the `tools` array and `tool_choice` checked, the constraint a forced
//! call puts on the reply (OpenAI's strict reading of parameter schemas, one call or, with
//! `parallel_tool_calls: true`, several), and the calls read back from a finished reply.

use exo_protocol::{Constraint, ToolSyntax};
use serde_json::{Value, json};

use crate::api::error::ApiError;
use crate::api::openai::ChatRequest;
use crate::api::response::{FunctionCall, ToolCall};

/// A tool's parameters schema made strict, as OpenAI's strict mode reads it: every object schema
/// that does not say otherwise allows no properties beyond those it declares (a model told
/// nothing keeps inventing properties until `max_tokens`). Nested schemas too.
pub fn strict(schema: &Value) -> Value {
    let Some(map) = schema.as_object() else {
        return schema.clone();
    };
    let mut out = serde_json::Map::new();
    for (k, v) in map {
        let v = match k.as_str() {
            "properties" | "$defs" | "definitions" | "patternProperties" => match v.as_object() {
                Some(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), strict(v))).collect()),
                None => v.clone(),
            },
            "items" | "additionalItems" | "not" | "if" | "then" | "else" => strict(v),
            "anyOf" | "oneOf" | "allOf" | "prefixItems" => match v.as_array() {
                Some(a) => Value::Array(a.iter().map(strict).collect()),
                None => v.clone(),
            },
            _ => v.clone(),
        };
        out.insert(k.clone(), v);
    }
    let is_object =
        out.get("type").and_then(Value::as_str) == Some("object") || out.contains_key("properties");
    if is_object && !out.contains_key("additionalProperties") {
        out.insert("additionalProperties".into(), Value::Bool(false));
    }
    Value::Object(out)
}

/// How the model may use the request's tools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// Never call a tool (the tools are not shown to the model).
    None,
    /// The model decides; a reply in the tool-call format becomes tool calls.
    Auto,
    /// The reply must be a call of one of the tools (enforced).
    Required,
    /// The reply must be a call of this function (enforced).
    Named(String),
}

/// A chat request's validated tools and `tool_choice`.
#[derive(Debug, Clone)]
pub struct Tools {
    /// OpenAI's `tools` array, each entry checked.
    pub list: Vec<Value>,
    /// What the model may do with them.
    pub choice: ToolChoice,
    /// How the served model writes a call when left to itself (`auto`), from its chat template.
    pub syntax: ToolSyntax,
    /// `parallel_tool_calls`: `Some(false)` keeps a reply to one call, `Some(true)` lets a forced
    /// reply hold up to [`MAX_PARALLEL_CALLS`].
    pub parallel: Option<bool>,
}

/// Most calls a forced reply may hold with `parallel_tool_calls: true`.
pub const MAX_PARALLEL_CALLS: usize = 8;

impl ChatRequest {
    /// The request's tools, `None` when it has none.
    pub fn tools(&self) -> Result<Option<Tools>, ApiError> {
        let list = self.params.tools.clone().unwrap_or_default();
        let bad = |m: String| ApiError::bad("tools", m);
        let mut names = Vec::new();
        for t in &list {
            if t.get("type").and_then(Value::as_str) != Some("function") {
                return Err(bad("each tool needs \"type\": \"function\"".into()));
            }
            let f = t
                .get("function")
                .filter(|f| f.is_object())
                .ok_or_else(|| bad("each tool needs a `function` object".into()))?;
            let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
            let valid = !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !valid {
                return Err(bad(format!(
                    "function name {name:?} must be 1-64 letters, digits, '_' or '-'"
                )));
            }
            if names.contains(&name) {
                return Err(bad(format!("function {name:?} is listed twice")));
            }
            if let Some(p) = f.get("parameters")
                && !p.is_object()
            {
                return Err(bad(format!(
                    "function {name:?}: parameters must be a JSON Schema object"
                )));
            }
            names.push(name);
        }
        let choice_bad = |m: &str| ApiError::bad("tool_choice", m.to_string());
        let choice = match &self.params.tool_choice {
            None => ToolChoice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                _ => {
                    return Err(choice_bad(
                        "tool_choice must be none, auto, required or a function",
                    ));
                }
            },
            Some(v) => {
                let name = v
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| choice_bad("tool_choice object needs function.name"))?;
                if !names.contains(&name) {
                    return Err(choice_bad(&format!(
                        "tool_choice names unknown function {name:?}"
                    )));
                }
                ToolChoice::Named(name.to_string())
            }
        };
        if list.is_empty() {
            return match choice {
                ToolChoice::Required | ToolChoice::Named(_) => {
                    Err(choice_bad("tool_choice needs tools"))
                }
                _ => Ok(None),
            };
        }
        Ok(Some(Tools {
            list,
            choice,
            syntax: ToolSyntax::default(),
            parallel: self.params.parallel_tool_calls,
        }))
    }
}

impl Tools {
    /// The tools as the prompt shows them; `None` with `tool_choice: none`.
    pub fn prompt_json(&self) -> Option<String> {
        (self.choice != ToolChoice::None).then(|| Value::Array(self.list.clone()).to_string())
    }

    /// The constraint `required` or a named function puts on the reply: one call (up to
    /// [`MAX_PARALLEL_CALLS`] with `parallel_tool_calls: true`), in the tool-call format, whose
    /// arguments match the function's parameters schema.
    pub fn constraint(&self) -> Option<Constraint> {
        let allowed: Vec<&Value> = match &self.choice {
            ToolChoice::None | ToolChoice::Auto => return None,
            ToolChoice::Required => self.list.iter().collect(),
            ToolChoice::Named(n) => self
                .list
                .iter()
                .filter(|t| t["function"]["name"] == n.as_str())
                .collect(),
        };
        let calls: Vec<Value> = allowed
            .iter()
            .map(|t| {
                let f = &t["function"];
                let params = f
                    .get("parameters")
                    .cloned()
                    .unwrap_or_else(|| json!({ "type": "object" }));
                json!({
                    "type": "object",
                    "properties": { "name": { "const": f["name"] }, "arguments": strict(&params) },
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        let max_calls = if self.parallel == Some(true) {
            MAX_PARALLEL_CALLS
        } else {
            1
        };
        let schema = json!({
            "type": "object",
            "properties": {
                "tool_calls": { "type": "array", "items": { "anyOf": calls }, "minItems": 1, "maxItems": max_calls }
            },
            "required": ["tool_calls"],
            "additionalProperties": false,
            // One space after `:` and `,`, none elsewhere: a model cannot pad a call with
            // whitespace until max_tokens.
            "x-guidance": { "whitespace_flexible": false, "item_separator": ", ", "key_separator": ": " },
        });
        Some(Constraint::JsonSchema(schema.to_string()))
    }

    /// The tool calls in a finished reply, call `i` with id `call_id(i)`; `None` when the reply is
    /// not calls of listed functions with JSON-object arguments. The arguments are the text
    /// exactly as generated, so a stream that sent them piece by piece and this answer agree to
    /// the byte. With `parallel_tool_calls: false` only the first call is kept.
    pub fn calls(&self, text: &str, call_id: impl Fn(usize) -> String) -> Option<Vec<ToolCall>> {
        if self.choice == ToolChoice::None {
            return None;
        }
        let mut found = crate::api::toolcall::all_calls(text, self.reply_syntax())?;
        if self.parallel == Some(false) {
            found.truncate(1);
        }
        found
            .into_iter()
            .enumerate()
            .map(|(i, (name, arguments))| {
                let known = self.lists(&name);
                let object = serde_json::from_str::<Value>(&arguments).is_ok_and(|v| v.is_object());
                (known && object).then(|| ToolCall {
                    id: call_id(i),
                    kind: "function",
                    function: FunctionCall { name, arguments },
                })
            })
            .collect()
    }

    /// True when `name` is one of the request's functions.
    pub fn lists(&self, name: &str) -> bool {
        self.list.iter().any(|t| t["function"]["name"] == name)
    }

    /// The syntax a reply's calls are in: the model's own with `auto`; ours, which the constraint
    /// enforces, with `required` or a named function.
    pub fn reply_syntax(&self) -> ToolSyntax {
        match self.choice {
            ToolChoice::Auto => self.syntax,
            _ => ToolSyntax::Wrapped,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn tools(choice: ToolChoice, parallel: Option<bool>) -> Tools {
        let list = ["get_weather", "get_time"]
            .iter()
            .map(|n| json!({ "type": "function", "function": { "name": n } }))
            .collect();
        Tools {
            list,
            choice,
            syntax: ToolSyntax::Wrapped,
            parallel,
        }
    }

    fn max_items(t: &Tools) -> Value {
        let Some(Constraint::JsonSchema(schema)) = t.constraint() else {
            panic!("no schema")
        };
        let schema: Value = serde_json::from_str(&schema).unwrap();
        schema["properties"]["tool_calls"]["maxItems"].clone()
    }

    #[test]
    fn a_forced_reply_holds_several_calls_only_when_asked() {
        for choice in [ToolChoice::Required, ToolChoice::Named("get_time".into())] {
            assert_eq!(max_items(&tools(choice.clone(), None)), 1);
            assert_eq!(max_items(&tools(choice.clone(), Some(false))), 1);
            assert_eq!(max_items(&tools(choice, Some(true))), MAX_PARALLEL_CALLS);
        }
        assert!(tools(ToolChoice::Auto, Some(true)).constraint().is_none());
    }

    #[test]
    fn parallel_tool_calls_false_keeps_the_first_call() {
        let two = r#"{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", "arguments": {}}]}"#;
        let id = |i: usize| format!("call_{i}");
        for (parallel, n) in [(None, 2), (Some(true), 2), (Some(false), 1)] {
            let calls = tools(ToolChoice::Auto, parallel).calls(two, id).unwrap();
            assert_eq!(calls.len(), n, "{parallel:?}");
            assert_eq!(calls[0].function.name, "get_weather");
        }
    }
}
