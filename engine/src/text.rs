//! Turning generated tokens into text: incremental UTF-8 and stop strings.

use exo_sampling::FinishReason;

/// Accumulates token bytes and releases text that is final: complete UTF-8 characters that cannot be
/// the beginning of a stop string. Once a stop string appears, the text before it is released and the
/// stream reports that it stopped.
#[derive(Debug, Clone, Default)]
pub struct TextStream {
    /// The stop strings with their indices in the request's list (empty ones left out).
    stop: Vec<(u8, String)>,
    /// Bytes of an incomplete UTF-8 character at the end of the last token.
    partial: Vec<u8>,
    /// Decoded text not yet released (it may be the start of a stop string).
    held: String,
    stopped: bool,
    /// The index of the stop string that ended the stream.
    matched: Option<u8>,
}

impl TextStream {
    /// A stream that ends at any of `stop` (empty strings are ignored).
    pub fn new(stop: &[String]) -> Self {
        TextStream {
            stop: stop
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.is_empty())
                .filter_map(|(i, s)| Some((u8::try_from(i).ok()?, s.clone())))
                .collect(),
            ..Self::default()
        }
    }

    /// True once a stop string was seen; later input is ignored.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// How a stream that stopped ended: the stop string's index in the request's list.
    pub fn stop_reason(&self) -> FinishReason {
        self.matched
            .map_or(FinishReason::Stop, FinishReason::StopSequence)
    }

    /// Adds one token's bytes and returns the text that became final.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        if self.stopped {
            return String::new();
        }
        self.partial.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.partial) {
            Ok(s) => s.len(),
            Err(e) => match e.error_len() {
                // Bytes that can never become valid: replace them and move on.
                Some(bad) => {
                    let upto = e.valid_up_to();
                    let good = String::from_utf8_lossy(&self.partial[..upto + bad]).into_owned();
                    self.partial.drain(..upto + bad);
                    self.held.push_str(&good);
                    return self.release();
                }
                None => e.valid_up_to(),
            },
        };
        let text: Vec<u8> = self.partial.drain(..valid).collect();
        self.held.push_str(&String::from_utf8_lossy(&text));
        self.release()
    }

    /// Ends the stream: releases held text and any incomplete character (as U+FFFD).
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let tail = String::from_utf8_lossy(&std::mem::take(&mut self.partial)).into_owned();
        self.held.push_str(&tail);
        let out = self.release();
        let rest = std::mem::take(&mut self.held);
        out + &rest
    }

    fn release(&mut self) -> String {
        // The stop string that appears earliest; at the same place, the first in the list.
        if let Some((at, index)) = self
            .stop
            .iter()
            .filter_map(|(i, s)| self.held.find(s.as_str()).map(|at| (at, *i)))
            .min()
        {
            self.stopped = true;
            self.matched = Some(index);
            let out = self.held[..at].to_string();
            self.held.clear();
            self.partial.clear();
            return out;
        }
        // Hold back the longest suffix of `held` that is a prefix of some stop string.
        let keep = self
            .stop
            .iter()
            .map(|(_, s)| longest_suffix_prefix(&self.held, s))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        out
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`, on char boundaries.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = text.len().min(stop.len().saturating_sub(1));
    (1..=max)
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && stop.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stop: &[&str], pieces: &[&[u8]]) -> (String, bool) {
        let stop: Vec<String> = stop.iter().map(|s| s.to_string()).collect();
        let mut t = TextStream::new(&stop);
        let mut out = String::new();
        for p in pieces {
            out += &t.push(p);
        }
        out += &t.finish();
        (out, t.stopped())
    }

    #[test]
    fn multibyte_characters_split_across_tokens_come_out_whole() {
        let euro = "€".as_bytes();
        let mut t = TextStream::new(&[]);
        assert_eq!(t.push(&euro[..1]), "");
        assert_eq!(t.push(&euro[1..2]), "");
        assert_eq!(t.push(&euro[2..]), "€");
        assert_eq!(
            run(&[], &[b"a", &euro[..2], &euro[2..], b"b"]),
            ("a€b".into(), false)
        );
    }

    #[test]
    fn the_stop_string_that_ended_the_stream_is_named_by_its_index() {
        let stop: Vec<String> = ["", "xyz", "ll", "l"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut t = TextStream::new(&stop);
        assert_eq!(t.stop_reason(), FinishReason::Stop);
        // "ll" and "l" both start where the text first matches: the earlier in the list ("ll",
        // index 2) wins; the empty string (index 0) is ignored but keeps the numbering.
        assert_eq!(t.push(b"hello"), "he");
        assert_eq!(t.stop_reason(), FinishReason::StopSequence(2));
        let mut t = TextStream::new(&["lo".to_string(), "e".to_string()]);
        assert_eq!(t.push(b"hello"), "h");
        assert_eq!(
            t.stop_reason(),
            FinishReason::StopSequence(1),
            "the earliest in the text"
        );
    }

    #[test]
    fn stop_strings_end_the_stream_and_are_not_emitted() {
        assert_eq!(
            run(&["END"], &[b"hello E", b"N", b"D more"]),
            ("hello ".into(), true)
        );
        assert_eq!(
            run(&["\n\n"], &[b"a\n", b"b\n", b"\nc"]),
            ("a\nb".into(), true)
        );
        // A held prefix that turns out not to be a stop string is released.
        assert_eq!(run(&["END"], &[b"EN", b"x"]), ("ENx".into(), false));
        assert_eq!(run(&["END"], &[b"EN"]), ("EN".into(), false));
    }

    #[test]
    fn earliest_of_several_stop_strings_wins() {
        assert_eq!(run(&["cd", "b"], &[b"abcd"]), ("a".into(), true));
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        assert_eq!(run(&[], &[b"a\xffb"]), ("a\u{fffd}b".into(), false));
        assert_eq!(run(&[], &[b"a\xe2\x82"]), ("a\u{fffd}".into(), false));
    }
}
