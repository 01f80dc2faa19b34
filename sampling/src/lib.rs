//! What a generation asks for and how it ends: [`SamplingParams`] (with its [`Constraint`]) and
//! [`FinishReason`].
//!
//! The engine (which links llama.cpp) and the RPC protocol (which the router uses without llama.cpp)
//! both need these types, so they live in this small crate of plain data that neither pulls in: the
//! engine does not depend on tarpc, and the router does not depend on the engine.

use serde::{Deserialize, Serialize};

/// How the next token is chosen and when generation stops.
///
/// Each token's random draw is seeded from `(seed, index of the output token)`, never from a running
/// RNG, so generation can move between machines mid-sequence and still produce the same tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// Softmax temperature; 0 or below means greedy (argmax, ties to the lowest token id).
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 disables.
    pub top_k: u32,
    /// Keep the smallest set of tokens whose probability reaches p; 1.0 disables.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 disables.
    pub min_p: f32,
    /// Seed of the per-token draws.
    pub seed: u64,
    /// Largest number of tokens to generate.
    pub max_tokens: u32,
    /// Strings that end generation when produced; they are not part of the output.
    pub stop: Vec<String>,
    /// What the output must match, enforced token by token; `None`: free text.
    pub constraint: Option<Constraint>,
    /// Subtracted from the logit of every token the output already holds (OpenAI's
    /// `presence_penalty`, -2 to 2; 0: none).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time the output holds it (`frequency_penalty`).
    pub frequency_penalty: f32,
    /// Divides a positive logit (multiplies a negative one) of every token the output already
    /// holds (llama.cpp's and Hugging Face's `repetition_penalty`; 1: none).
    pub repetition_penalty: f32,
    /// Added to the logits of these token ids (`logit_bias`, -100 to 100).
    pub logit_bias: Vec<(i32, f32)>,
    /// Report each output token's log probability and this many of the likeliest alternatives
    /// (0 to 20); `None`: no log probabilities.
    pub logprobs: Option<u8>,
}

/// The log probability of one output token, from the logits after `logit_bias` and the penalties
/// at temperature 1, before top-k/top-p/min-p and any constraint: the model's distribution as
/// the request adjusted it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// The token id.
    pub token: i32,
    /// Its bytes (a token may hold part of a UTF-8 character).
    pub bytes: Vec<u8>,
    /// Its natural log probability.
    pub logprob: f32,
    /// The likeliest tokens at this position, most likely first (ties: lower id first).
    pub top: Vec<TopLogprob>,
}

/// One alternative at an output position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    /// The token id.
    pub token: i32,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Its natural log probability.
    pub logprob: f32,
}

/// A constraint on the generated text, enforced by masking every token that could not continue a
/// match. It travels with the sampling parameters: a decode node rebuilds it and replays the first
/// token through it, so split generation follows exactly the same masks as colocated generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Constraint {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON valid against this JSON Schema (its text).
    JsonSchema(String),
    /// A grammar in llguidance's Lark dialect (used for tool calls).
    Lark(String),
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 0,
            max_tokens: 256,
            stop: Vec::new(),
            constraint: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            logprobs: None,
        }
    }
}

/// Most stop strings a request may carry (the API allows 4; nodes accept a few more).
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 1024;
/// Longest constraint text (a JSON Schema or a grammar), in bytes.
pub const MAX_CONSTRAINT_BYTES: usize = 1 << 20;
/// Most `logit_bias` entries.
pub const MAX_LOGIT_BIAS: usize = 1024;
/// Most alternatives per token with `logprobs`.
pub const MAX_TOP_LOGPROBS: u8 = 20;

impl SamplingParams {
    /// Checks values a node must not trust from the wire: finite numbers within their ranges,
    /// and bounded stop strings and constraint text. The error says which field is wrong.
    pub fn check(&self) -> Result<(), String> {
        let finite = |name: &str, v: f32, ok: bool| {
            if v.is_finite() && ok {
                Ok(())
            } else {
                Err(format!("{name} = {v} is out of range"))
            }
        };
        finite("temperature", self.temperature, self.temperature <= 100.0)?;
        finite("top_p", self.top_p, self.top_p > 0.0 && self.top_p <= 1.0)?;
        finite("min_p", self.min_p, (0.0..=1.0).contains(&self.min_p))?;
        let penalty = |v: f32| (-2.0..=2.0).contains(&v);
        finite(
            "presence_penalty",
            self.presence_penalty,
            penalty(self.presence_penalty),
        )?;
        finite(
            "frequency_penalty",
            self.frequency_penalty,
            penalty(self.frequency_penalty),
        )?;
        let r = self.repetition_penalty;
        finite("repetition_penalty", r, r > 0.0 && r <= 10.0)?;
        if self.logit_bias.len() > MAX_LOGIT_BIAS {
            return Err(format!(
                "{} logit_bias entries, at most {MAX_LOGIT_BIAS}",
                self.logit_bias.len()
            ));
        }
        for &(token, bias) in &self.logit_bias {
            finite("a logit_bias value", bias, (-100.0..=100.0).contains(&bias))?;
            if token < 0 {
                return Err(format!("logit_bias names token {token}"));
            }
        }
        if self.logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
            return Err(format!("at most {MAX_TOP_LOGPROBS} alternatives per token"));
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return Err(format!(
                "{} stop strings, at most {MAX_STOP_STRINGS}",
                self.stop.len()
            ));
        }
        if let Some(s) = self.stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
            return Err(format!(
                "a stop string of {} bytes, at most {MAX_STOP_BYTES}",
                s.len()
            ));
        }
        let constraint_len = match &self.constraint {
            Some(Constraint::JsonSchema(t) | Constraint::Lark(t)) => t.len(),
            Some(Constraint::JsonObject) | None => 0,
        };
        if constraint_len > MAX_CONSTRAINT_BYTES {
            return Err(format!(
                "a constraint of {constraint_len} bytes, at most {MAX_CONSTRAINT_BYTES}"
            ));
        }
        Ok(())
    }

    /// True when the logits are changed before the choice (a bias or a penalty).
    pub fn adjusts_logits(&self) -> bool {
        !self.logit_bias.is_empty()
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
    }

    /// Greedy decoding of at most `max_tokens` tokens.
    pub fn greedy(max_tokens: u32) -> Self {
        SamplingParams {
            temperature: 0.0,
            max_tokens,
            ..SamplingParams::default()
        }
    }
}

/// Why generation ended (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-generation token.
    Stop,
    /// A stop string: the index of the one that appeared first in the text, in the request's
    /// `stop` list.
    StopSequence(u8),
    /// `max_tokens` or the context length was reached.
    Length,
    /// The client went away or the request was cancelled.
    Cancelled,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_and_out_of_range_values_are_refused() {
        assert!(SamplingParams::default().check().is_ok());
        assert!(SamplingParams::greedy(4).check().is_ok());
        let bad = [
            SamplingParams {
                temperature: f32::NAN,
                ..SamplingParams::default()
            },
            SamplingParams {
                temperature: f32::INFINITY,
                ..SamplingParams::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..SamplingParams::default()
            },
            SamplingParams {
                top_p: f32::NAN,
                ..SamplingParams::default()
            },
            SamplingParams {
                min_p: -0.1,
                ..SamplingParams::default()
            },
            SamplingParams {
                stop: vec!["x".into(); 17],
                ..SamplingParams::default()
            },
            SamplingParams {
                stop: vec!["x".repeat(2000)],
                ..SamplingParams::default()
            },
            SamplingParams {
                constraint: Some(Constraint::Lark("x".repeat(MAX_CONSTRAINT_BYTES + 1))),
                ..SamplingParams::default()
            },
            SamplingParams {
                presence_penalty: 2.5,
                ..SamplingParams::default()
            },
            SamplingParams {
                frequency_penalty: f32::NAN,
                ..SamplingParams::default()
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..SamplingParams::default()
            },
            SamplingParams {
                logit_bias: vec![(5, 101.0)],
                ..SamplingParams::default()
            },
            SamplingParams {
                logit_bias: vec![(-1, 1.0)],
                ..SamplingParams::default()
            },
            SamplingParams {
                logprobs: Some(21),
                ..SamplingParams::default()
            },
        ];
        for p in bad {
            assert!(p.check().is_err(), "{p:?}");
        }
    }
}
