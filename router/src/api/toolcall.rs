//! Reading tool calls in the syntax a model writes them ([`ToolSyntax`]): while one is generated,
//! the function name as soon as it is complete and the arguments object's text as it grows, so
//! streams can send both early; and, once the reply is whole, every call it makes.

use exo_protocol::ToolSyntax;

/// What comes before the first call's function name, token by token (whitespace between).
fn opening(syntax: ToolSyntax) -> &'static [&'static str] {
    match syntax {
        ToolSyntax::Wrapped => &["{", "\"tool_calls\"", ":", "[", "{", "\"name\"", ":"],
        ToolSyntax::Hermes => &["<tool_call>", "{", "\"name\"", ":"],
        ToolSyntax::Llama3 => &["{", "\"name\"", ":"],
        ToolSyntax::Mistral => &["[TOOL_CALLS]", "[", "{", "\"name\"", ":"],
    }
}

/// The openings a call in `syntax` may have: its own, and for Hermes also a bare call object, as
/// small Hermes-template models (Qwen2.5-Coder-0.5B among them) often write it without the tags.
fn openings(syntax: ToolSyntax) -> impl Iterator<Item = &'static [&'static str]> {
    let bare = (syntax == ToolSyntax::Hermes).then(|| opening(ToolSyntax::Llama3));
    std::iter::once(opening(syntax)).chain(bare)
}

/// What a syntax allows before its opening: Llama 3's `<|python_tag|>`, where the detokenizer
/// shows it.
fn lead_tag(syntax: ToolSyntax) -> Option<&'static str> {
    (syntax == ToolSyntax::Llama3).then_some("<|python_tag|>")
}

/// The reply so far with its syntax's lead tag removed.
fn strip_lead(text: &str, syntax: ToolSyntax) -> &str {
    let t = text.trim_start();
    lead_tag(syntax)
        .and_then(|l| t.strip_prefix(l))
        .unwrap_or(t)
}

/// `text` after `tokens`, each possibly preceded by whitespace; `None` if it does not start so.
fn after_tokens<'a>(text: &'a str, tokens: &[&str]) -> Option<&'a str> {
    tokens.iter().try_fold(text.trim_start(), |rest, t| {
        Some(rest.strip_prefix(t)?.trim_start())
    })
}

/// True while `text` (trimmed) could still become, or already is, the opening of a call in
/// `syntax`: a stream holds such text back instead of sending it as content.
pub fn may_open(text: &str, syntax: ToolSyntax) -> bool {
    let t = text.trim_start();
    let mut leads = openings(syntax).map(|o| o[0]).chain(lead_tag(syntax));
    t.is_empty() || leads.any(|l| t.starts_with(l) || l.starts_with(t))
}

/// Where the first call's arguments start in a reply in `syntax`, and its function name, once
/// the text has got that far.
pub fn header_in(text: &str, syntax: ToolSyntax) -> Option<(String, usize)> {
    let stripped = strip_lead(text, syntax);
    let mut rest = openings(syntax).find_map(|o| after_tokens(stripped, o))?;
    let quoted = rest.strip_prefix('"')?;
    let end = quoted.find(['"', '\\'])?;
    if quoted[end..].starts_with('\\') {
        return None;
    }
    let name = quoted[..end].to_string();
    rest = quoted[end + 1..].trim_start();
    rest = rest.strip_prefix(',')?.trim_start();
    rest = rest
        .strip_prefix("\"arguments\"")
        .or_else(|| rest.strip_prefix("\"parameters\""))?
        .trim_start();
    rest = rest.strip_prefix(':')?.trim_start();
    rest.starts_with('{')
        .then(|| (name, text.len() - rest.len()))
}

/// Every call a whole reply in `syntax` makes, as (function name, exact arguments text); `None`
/// when the reply is not calls in that syntax.
pub fn all_calls(text: &str, syntax: ToolSyntax) -> Option<Vec<(String, String)>> {
    let one = |obj: &str| -> Option<(String, String)> {
        // Each call object: `{"name": ..., "arguments"|"parameters": {...}}`.
        let (name, start) = header_in(obj, ToolSyntax::Llama3)?;
        let len = object_len(&obj[start..])?;
        Some((name, obj[start..start + len].to_string()))
    };
    let calls = match syntax {
        ToolSyntax::Wrapped => array_calls(text, &["{", "\"tool_calls\"", ":"], "}")?
            .iter()
            .map(|o| one(o))
            .collect::<Option<Vec<_>>>()?,
        // A reply that opens with an object: bare call objects, as a Llama 3 reply writes them
        // (their arguments may even hold the text `<tool_call>`).
        ToolSyntax::Hermes if text.trim_start().starts_with('{') => {
            return all_calls(text, ToolSyntax::Llama3);
        }
        ToolSyntax::Hermes => {
            let mut calls = Vec::new();
            let mut rest = text;
            while let Some(at) = rest.find("<tool_call>") {
                let body = rest[at + "<tool_call>".len()..].trim_start();
                let len = object_len(body)?;
                calls.push(one(&body[..len])?);
                rest = body[len..].trim_start();
                rest = rest.strip_prefix("</tool_call>").unwrap_or(rest);
            }
            if !rest.trim().is_empty() {
                return None;
            }
            calls
        }
        ToolSyntax::Llama3 => {
            let mut calls = Vec::new();
            let mut rest = strip_lead(text, syntax);
            while !rest.is_empty() {
                let len = object_len(rest)?;
                calls.push(one(&rest[..len])?);
                rest = rest[len..].trim_start();
                rest = rest.strip_prefix(';').unwrap_or(rest).trim_start();
            }
            calls
        }
        ToolSyntax::Mistral => array_calls(text, &["[TOOL_CALLS]"], "")?
            .iter()
            .map(|o| one(o))
            .collect::<Option<Vec<_>>>()?,
    };
    (!calls.is_empty()).then_some(calls)
}

/// The call objects of a reply that is `before` tokens, a JSON array of objects, then `after`
/// (whitespace between), each object as its exact text.
fn array_calls<'a>(text: &'a str, before: &[&str], after: &str) -> Option<Vec<&'a str>> {
    let list = after_tokens(text, before)?;
    let len = object_len(list)?;
    if list[len..].trim() != after {
        return None;
    }
    objects_in_array(&list[..len])
}

/// The objects of a JSON array's text, each as its exact text.
fn objects_in_array(array: &str) -> Option<Vec<&str>> {
    let mut rest = array.trim().strip_prefix('[')?.trim_start();
    let mut out = Vec::new();
    loop {
        if let Some(end) = rest.strip_prefix(']') {
            return end.trim().is_empty().then_some(out);
        }
        let len = object_len(rest)?;
        out.push(&rest[..len]);
        rest = rest[len..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
}

/// The length of the JSON object at the start of `s` when it is complete (string-aware brace
/// matching), else `None`.
fn object_len(s: &str) -> Option<usize> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, c) in s.char_indices() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' | '[' => depth += 1,
            '}' | ']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

/// A call's arguments text as generated so far (from where they start): the whole object once it
/// is complete, nothing after it.
pub fn args_so_far(args: &str) -> &str {
    &args[..object_len(args).unwrap_or(args.len())]
}

/// Sends one call's pieces as the text grows.
#[derive(Debug, Default)]
pub struct CallStream {
    /// The syntax the reply is read in.
    syntax: ToolSyntax,
    /// Where the arguments start, once the header has been seen.
    start: Option<usize>,
    /// Argument bytes already handed out.
    sent: usize,
}

/// What a stream can send after new text arrived.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// The call began: its function name.
    Begin(String),
    /// More of the arguments' text.
    Arguments(String),
}

impl CallStream {
    /// A stream reading calls in `syntax`.
    pub fn new(syntax: ToolSyntax) -> Self {
        CallStream {
            syntax,
            ..CallStream::default()
        }
    }

    /// Looks at the whole reply so far and returns what has become sendable.
    pub fn advance(&mut self, text: &str) -> Vec<Piece> {
        let mut out = Vec::new();
        if self.start.is_none()
            && let Some((name, start)) = header_in(text, self.syntax)
        {
            self.start = Some(start);
            out.push(Piece::Begin(name));
        }
        if let Some(start) = self.start {
            let args = args_so_far(&text[start..]);
            let upto = args.len();
            if upto > self.sent
                && let Some(piece) = args.get(self.sent..upto)
            {
                out.push(Piece::Arguments(piece.to_string()));
                self.sent = upto;
            }
        }
        out
    }

    /// True once the call's name was sent.
    pub fn begun(&self) -> bool {
        self.start.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first call's name and the exact text of its arguments, when both are complete.
    fn first_call(text: &str) -> Option<(String, &str)> {
        let (name, start) = header_in(text, ToolSyntax::Wrapped)?;
        let len = object_len(&text[start..])?;
        Some((name, &text[start..start + len]))
    }

    const REPLY: &str = "{ \"tool_calls\": [ {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo {x}\", \"n\": [1, {\"a\": \"}\\\"\"}]} } ] }";

    #[test]
    fn finds_the_name_and_the_exact_arguments() {
        let (name, args) = first_call(REPLY).unwrap_or_default();
        assert_eq!(name, "get_weather");
        assert_eq!(
            args,
            "{\"city\": \"Oslo {x}\", \"n\": [1, {\"a\": \"}\\\"\"}]}"
        );
        assert!(
            first_call("{\"tool_calls\": [{\"name\": \"f\", \"arguments\": {\"a\": 1").is_none()
        );
        assert!(first_call("Sure! {\"tool_calls\": []}").is_none());
    }

    #[test]
    fn streaming_pieces_add_up_to_the_arguments() {
        let mut s = CallStream::default();
        let mut name = String::new();
        let mut args = String::new();
        // Feed the reply a few characters at a time, as tokens arrive.
        let chars: Vec<char> = REPLY.chars().collect();
        for n in (0..=chars.len()).step_by(3).chain([chars.len()]) {
            let so_far: String = chars[..n].iter().collect();
            for p in s.advance(&so_far) {
                match p {
                    Piece::Begin(n) => {
                        assert!(name.is_empty(), "two beginnings");
                        name = n;
                    }
                    Piece::Arguments(a) => args += &a,
                }
            }
        }
        assert!(s.begun());
        assert_eq!(Some((name, args.as_str())), first_call(REPLY));
    }

    /// Replies as each family's models write them (recorded shapes).
    const HERMES: &str = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"zone\": \"CET\"}}\n</tool_call>";
    const LLAMA3: &str = "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}; {\"name\": \"get_time\", \"parameters\": {\"zone\": \"CET\"}}";
    const MISTRAL: &str = "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}, {\"name\": \"get_time\", \"arguments\": {\"zone\": \"CET\"}}]";
    const WRAPPED: &str = "{\"tool_calls\": [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}, {\"name\": \"get_time\", \"arguments\": {\"zone\": \"CET\"}}]}";

    fn two_calls() -> Vec<(String, String)> {
        vec![
            ("get_weather".into(), "{\"city\": \"Oslo\"}".into()),
            ("get_time".into(), "{\"zone\": \"CET\"}".into()),
        ]
    }

    #[test]
    fn every_family_parallel_calls_parse_to_the_same_calls() {
        for (syntax, text) in [
            (ToolSyntax::Hermes, HERMES),
            (ToolSyntax::Llama3, LLAMA3),
            (
                ToolSyntax::Llama3,
                LLAMA3.trim_start_matches("<|python_tag|>"),
            ),
            (ToolSyntax::Mistral, MISTRAL),
            (ToolSyntax::Wrapped, WRAPPED),
        ] {
            assert_eq!(
                all_calls(text, syntax),
                Some(two_calls()),
                "{syntax:?}: {text}"
            );
        }
        // Text before a Hermes call is the model thinking aloud; the calls still count.
        let chatty = format!("Let me check both.\n{HERMES}");
        assert_eq!(all_calls(&chatty, ToolSyntax::Hermes), Some(two_calls()));
        // Not calls: plain answers, another family's syntax, a call left open.
        assert_eq!(all_calls("It is sunny in Oslo.", ToolSyntax::Hermes), None);
        assert_eq!(all_calls(MISTRAL, ToolSyntax::Hermes), None);
        assert_eq!(all_calls(HERMES, ToolSyntax::Wrapped), None);
        assert_eq!(all_calls(&HERMES[..40], ToolSyntax::Hermes), None);
        assert_eq!(all_calls("{\"answer\": 4}", ToolSyntax::Llama3), None);
    }

    #[test]
    fn streams_hold_what_may_open_a_call_and_send_the_first_call_early() {
        assert!(may_open("<tool", ToolSyntax::Hermes));
        assert!(may_open("  <tool_call>\n{", ToolSyntax::Hermes));
        assert!(!may_open("The weather", ToolSyntax::Hermes));
        assert!(may_open("<|python", ToolSyntax::Llama3));
        assert!(may_open("[TOOL", ToolSyntax::Mistral));
        assert!(!may_open("[1, 2]", ToolSyntax::Mistral));
        for (syntax, text) in [
            (ToolSyntax::Hermes, HERMES),
            (ToolSyntax::Llama3, LLAMA3),
            (ToolSyntax::Mistral, MISTRAL),
        ] {
            let mut stream = CallStream::new(syntax);
            let (mut name, mut args) = (String::new(), String::new());
            let chars: Vec<char> = text.chars().collect();
            for n in (0..=chars.len()).step_by(5).chain([chars.len()]) {
                let so_far: String = chars[..n].iter().collect();
                for p in stream.advance(&so_far) {
                    match p {
                        Piece::Begin(n) => name = n,
                        Piece::Arguments(a) => args += &a,
                    }
                }
            }
            assert_eq!((name, args), two_calls()[0].clone(), "{syntax:?}");
        }
    }

    #[test]
    fn a_hermes_model_that_drops_the_tags_still_calls() {
        // Qwen2.5-Coder-0.5B-Instruct (a Hermes `<tool_call>` template), recorded with
        // `tool_choice: auto` on this machine.
        let bare = "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}";
        assert_eq!(
            all_calls(bare, ToolSyntax::Hermes),
            Some(vec![("get_weather".into(), "{\"city\": \"Paris\"}".into())])
        );
        assert!(may_open("{\"na", ToolSyntax::Hermes));
        let mut stream = CallStream::new(ToolSyntax::Hermes);
        let pieces = stream.advance(&bare[..40]);
        assert!(
            pieces.contains(&Piece::Begin("get_weather".into())),
            "{pieces:?}"
        );
        // A JSON answer that is not a call stays an answer.
        assert_eq!(all_calls("{\"answer\": 4}", ToolSyntax::Hermes), None);
        // Arguments that mention the tag are still a bare call's arguments.
        let tagged_text = "{\"name\": \"note\", \"arguments\": {\"text\": \"use <tool_call>\"}}";
        assert_eq!(
            all_calls(tagged_text, ToolSyntax::Hermes),
            Some(vec![(
                "note".into(),
                "{\"text\": \"use <tool_call>\"}".into()
            )])
        );
    }

    #[test]
    fn templates_tell_their_syntax() {
        let hermes = "{% if tools %}<tools>{{ tools }}</tools> ... <tool_call>{\"name\": ...}</tool_call>{% endif %}";
        let llama = "{% if tools %}<|start_header_id|>ipython ... {\"name\": function name, \"parameters\": ...}<|python_tag|>{% endif %}";
        let mistral =
            "{% if tools %}[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]";
        let chatml = "{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}";
        assert_eq!(ToolSyntax::detect(hermes), ToolSyntax::Hermes);
        assert_eq!(ToolSyntax::detect(llama), ToolSyntax::Llama3);
        assert_eq!(ToolSyntax::detect(mistral), ToolSyntax::Mistral);
        assert_eq!(ToolSyntax::detect(chatml), ToolSyntax::Wrapped);
    }
}
