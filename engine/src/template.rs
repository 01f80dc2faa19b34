//! Chat templates: the model's own Jinja template (`tokenizer.chat_template` in its GGUF
//! metadata), rendered with minijinja the way Hugging Face renders it, tools included.
//!
//! Templates that know nothing of tools still get them: the tool list and the reply format are
//! put in the system message, and earlier tool calls are written in that same format, so the
//! model sees one consistent convention (`TOOL_FORMAT`).

use minijinja::{Environment, Error, ErrorKind, Value as Jinja};
use serde_json::{Value, json};

use crate::error::EngineError;
use crate::model::ChatMessage;

/// The GGUF key holding the template.
pub const TEMPLATE_KEY: &str = "tokenizer.chat_template";

/// How the model is asked to call tools when its template has no convention of its own, and the
/// shape the router parses (and, for `tool_choice` `required` or a named function, enforces).
pub const TOOL_FORMAT: &str = "To call functions, reply with only a JSON object of the form \
{\"tool_calls\": [{\"name\": \"<function name>\", \"arguments\": {<arguments>}}]}.";

/// A compiled chat template.
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
    knows_tools: bool,
    knows_tool_calls: bool,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// Compiles `source`; an error names the template key and what is wrong.
    pub(crate) fn new(source: String, bos: String, eos: String) -> Result<Self, String> {
        let knows_tools = source.contains("tools");
        let knows_tool_calls = source.contains("tool_calls");
        let mut env = Environment::new();
        // Hugging Face renders with trim_blocks and lstrip_blocks on.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Jinja, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |_format: String| -> Jinja {
            // Templates use it for a "today" line; the date is not worth a time-zone database.
            Jinja::from(crate::template::today())
        });
        env.add_template_owned("chat", source)
            .map_err(|e| format!("`{TEMPLATE_KEY}` does not compile: {e}"))?;
        Ok(ChatTemplate {
            env,
            knows_tools,
            knows_tool_calls,
            bos,
            eos,
        })
    }

    /// Renders `messages` (and `tools`, OpenAI's array) with the assistant's turn opened.
    pub(crate) fn render(
        &self,
        messages: &[ChatMessage],
        tools: Option<&Value>,
    ) -> Result<String, EngineError> {
        self.render_parts(messages, tools).map(|(text, _)| text)
    }

    /// [`ChatTemplate::render`], and the message texts handed to the template (the client's
    /// words, with any tool preamble or earlier calls written in), in message order.
    pub(crate) fn render_parts(
        &self,
        messages: &[ChatMessage],
        tools: Option<&Value>,
    ) -> Result<(String, Vec<String>), EngineError> {
        let mut msgs: Vec<Value> = messages.iter().map(|m| self.message(m)).collect();
        let tools = tools.filter(|t| t.as_array().is_some_and(|a| !a.is_empty()));
        if let Some(t) = tools
            && !self.knows_tools
        {
            let preamble = tool_preamble(t);
            match msgs.first_mut() {
                Some(first) if first["role"] == "system" => {
                    let content = first["content"].as_str().unwrap_or_default();
                    first["content"] = json!(format!("{content}\n\n{preamble}"));
                }
                _ => msgs.insert(0, json!({ "role": "system", "content": preamble })),
            }
        }
        let texts = msgs
            .iter()
            .filter_map(|m| m["content"].as_str().map(str::to_string))
            .collect();
        let ctx = json!({
            "messages": msgs,
            "tools": if self.knows_tools { tools.cloned() } else { None },
            "add_generation_prompt": true,
            "bos_token": self.bos,
            "eos_token": self.eos,
        });
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| EngineError::Prompt(format!("`{TEMPLATE_KEY}`: {e}")))?;
        let text = tmpl
            .render(Jinja::from_serialize(&ctx))
            .map_err(|e| EngineError::Prompt(format!("`{TEMPLATE_KEY}` failed to render: {e}")))?;
        Ok((text, texts))
    }

    fn message(&self, m: &ChatMessage) -> Value {
        let mut v = json!({ "role": m.role, "content": m.content });
        if let Some(calls) = &m.tool_calls {
            if self.knows_tool_calls {
                v["tool_calls"] = calls.clone();
            } else {
                // Write earlier calls the way the model is asked to make them.
                let text = calls_as_text(calls);
                v["content"] = json!(if m.content.is_empty() {
                    text
                } else {
                    format!("{}\n{text}", m.content)
                });
            }
        }
        if let Some(id) = &m.tool_call_id {
            v["tool_call_id"] = json!(id);
        }
        v
    }
}

/// The system-message text describing `tools` (OpenAI's array) and the reply format.
fn tool_preamble(tools: &Value) -> String {
    let mut lines = vec!["You can call these functions:".to_string()];
    for t in tools.as_array().into_iter().flatten() {
        let f = &t["function"];
        lines.push(
            json!({
                "name": f["name"],
                "description": f.get("description").cloned().unwrap_or(Value::Null),
                "parameters": f.get("parameters").cloned().unwrap_or(json!({})),
            })
            .to_string(),
        );
    }
    lines.push(TOOL_FORMAT.to_string());
    lines.join("\n")
}

/// OpenAI `tool_calls` written in `TOOL_FORMAT` (arguments parsed back into objects when they
/// are JSON text, as OpenAI sends them).
fn calls_as_text(calls: &Value) -> String {
    let list: Vec<Value> = calls
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let f = &c["function"];
            let args = match &f["arguments"] {
                Value::String(s) => serde_json::from_str(s).unwrap_or_else(|_| json!(s)),
                other => other.clone(),
            };
            json!({ "name": f["name"], "arguments": args })
        })
        .collect();
    json!({ "tool_calls": list }).to_string()
}

/// Today's date (UTC) as templates print it, e.g. `25 Nov 2026`.
fn today() -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (y, m, d) = today_utc();
    let month = MONTHS
        .get(m.saturating_sub(1) as usize)
        .copied()
        .unwrap_or("Jan");
    format!("{d:02} {month} {y}")
}

/// Today's date in UTC as (year, month 1-12, day 1-31), from the system clock.
pub fn today_utc() -> (i64, u32, u32) {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m as u32, d as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
        }
    }

    #[test]
    fn renders_chatml_and_opens_the_assistant_turn() -> Result<(), Box<dyn std::error::Error>> {
        let t = ChatTemplate::new(CHATML.into(), String::new(), String::new())?;
        let out = t.render(&[msg("user", "hi")], None)?;
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        Ok(())
    }

    #[test]
    fn tools_go_into_the_system_message_when_the_template_has_no_convention()
    -> Result<(), Box<dyn std::error::Error>> {
        let t = ChatTemplate::new(CHATML.into(), String::new(), String::new())?;
        let tools = json!([{ "type": "function", "function": { "name": "get_weather", "parameters": { "type": "object" } } }]);
        let mut call = msg("assistant", "");
        call.tool_calls = Some(
            json!([{ "id": "c1", "type": "function", "function": { "name": "get_weather", "arguments": "{\"city\":\"Oslo\"}" } }]),
        );
        let mut result = msg("tool", "12 C");
        result.tool_call_id = Some("c1".into());
        let out = t.render(&[msg("user", "weather?"), call, result], Some(&tools))?;
        assert!(
            out.starts_with("<|im_start|>system\nYou can call these functions:\n{"),
            "{out}"
        );
        assert!(out.contains("\"name\":\"get_weather\""), "{out}");
        assert!(out.contains(TOOL_FORMAT), "{out}");
        // The earlier call in the same format, its arguments as an object; then the result.
        let turn = out
            .split("<|im_start|>assistant\n")
            .nth(1)
            .and_then(|t| t.split("<|im_end|>").next())
            .unwrap_or_default();
        let written: Value = serde_json::from_str(turn)?;
        let expected =
            json!({ "tool_calls": [{ "name": "get_weather", "arguments": { "city": "Oslo" } }] });
        assert_eq!(written, expected, "{out}");
        assert!(out.contains("<|im_start|>tool\n12 C<|im_end|>"), "{out}");
        Ok(())
    }

    #[test]
    fn a_template_that_knows_tools_gets_them_as_a_variable()
    -> Result<(), Box<dyn std::error::Error>> {
        let src = "{% if tools %}[{% for t in tools %}{{ t.function.name }}{% endfor %}]{% endif %}{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}";
        let t = ChatTemplate::new(src.into(), String::new(), String::new())?;
        let tools = json!([{ "type": "function", "function": { "name": "f" } }]);
        assert_eq!(t.render(&[msg("user", "x")], Some(&tools))?, "[f]user:x;");
        Ok(())
    }

    #[test]
    fn broken_templates_are_named_in_the_error() {
        let err = ChatTemplate::new("{% for %}".into(), String::new(), String::new()).err();
        assert!(err.is_some_and(|e| e.contains(TEMPLATE_KEY)));
        let raising = ChatTemplate::new(
            "{{ raise_exception('no system role') }}".into(),
            String::new(),
            String::new(),
        );
        let rendered = raising.map(|t| t.render(&[msg("user", "x")], None));
        assert!(
            matches!(rendered, Ok(Err(EngineError::Prompt(ref m))) if m.contains("no system role")),
            "{rendered:?}"
        );
    }
}
