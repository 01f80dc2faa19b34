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
        }
    }
}

impl SamplingParams {
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
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// The client went away or the request was cancelled.
    Cancelled,
}
