//! Reading a tool call while it is generated: in a reply of the form
//! `{"tool_calls": [{"name": "f", "arguments": {...}}]}`, the function name as soon as it is
//! complete and the `arguments` object's text as it grows, so streams can send both early.

/// Where the first call's arguments start, and its function name, once the text has got that far.
pub fn header(text: &str) -> Option<(String, usize)> {
    let mut rest = text.trim_start();
    for token in ["{", "\"tool_calls\"", ":", "[", "{", "\"name\"", ":"] {
        rest = rest.strip_prefix(token)?.trim_start();
    }
    let quoted = rest.strip_prefix('"')?;
    let end = quoted.find(['"', '\\'])?;
    if quoted[end..].starts_with('\\') {
        return None;
    }
    let name = quoted[..end].to_string();
    rest = quoted[end + 1..].trim_start();
    for token in [",", "\"arguments\"", ":"] {
        rest = rest.strip_prefix(token)?.trim_start();
    }
    rest.starts_with('{')
        .then(|| (name, text.len() - rest.len()))
}

/// The length of the JSON object at the start of `s` when it is complete (string-aware brace
/// matching), else `None`.
pub fn object_len(s: &str) -> Option<usize> {
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

/// The first call's name and the exact text of its arguments, when the reply has both complete.
pub fn first_call(text: &str) -> Option<(String, &str)> {
    let (name, start) = header(text)?;
    let len = object_len(&text[start..])?;
    Some((name, &text[start..start + len]))
}

/// Sends one call's pieces as the text grows.
#[derive(Debug, Default)]
pub struct CallStream {
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
    /// Looks at the whole reply so far and returns what has become sendable.
    pub fn advance(&mut self, text: &str) -> Vec<Piece> {
        let mut out = Vec::new();
        if self.start.is_none()
            && let Some((name, start)) = header(text)
        {
            self.start = Some(start);
            out.push(Piece::Begin(name));
        }
        if let Some(start) = self.start {
            let args = &text[start..];
            let upto = object_len(args).unwrap_or(args.len());
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
}
