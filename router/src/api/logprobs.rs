//! Log probabilities in a response, in the shape of the endpoint: chat's `logprobs.content[]`
//! (`token`, `logprob`, `bytes`, `top_logprobs[]`) or completions' `logprobs` (`tokens`,
//! `token_logprobs`, `top_logprobs` maps, `text_offset`). The numbers come from the node that
//! chose each token ([`TokenLogprob`]).

use std::collections::BTreeMap;

use exo_protocol::TokenLogprob;
use serde::Serialize;

use super::response::Endpoint;

/// A choice's `logprobs`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ChoiceLogprobs {
    /// Chat completions.
    Chat {
        /// One entry per output token.
        content: Vec<ChatToken>,
        /// Always `null`.
        refusal: Option<()>,
    },
    /// Completions.
    Completions {
        /// Each token's text.
        tokens: Vec<String>,
        /// Each token's log probability.
        token_logprobs: Vec<f32>,
        /// The alternatives at each position, text -> log probability.
        top_logprobs: Vec<BTreeMap<String, f32>>,
        /// Where each token starts in the completion's text (characters).
        text_offset: Vec<usize>,
    },
}

/// One output token of a chat answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatToken {
    /// Its text (lossy where it holds part of a character).
    pub token: String,
    /// Its log probability.
    pub logprob: f32,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// The likeliest alternatives (empty unless `top_logprobs` asked).
    pub top_logprobs: Vec<ChatAlternative>,
}

/// One alternative at a chat output position.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatAlternative {
    /// Its text.
    pub token: String,
    /// Its log probability.
    pub logprob: f32,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl ChoiceLogprobs {
    /// The `logprobs` of `tokens` for `endpoint`; completions' offsets count from `offset`
    /// characters (the text streamed before these tokens).
    pub fn new(endpoint: Endpoint, tokens: &[TokenLogprob], offset: usize) -> ChoiceLogprobs {
        match endpoint {
            Endpoint::Completion => {
                let mut at = offset;
                let mut text_offset = Vec::with_capacity(tokens.len());
                for t in tokens {
                    text_offset.push(at);
                    at += text(&t.bytes).chars().count();
                }
                ChoiceLogprobs::Completions {
                    tokens: tokens.iter().map(|t| text(&t.bytes)).collect(),
                    token_logprobs: tokens.iter().map(|t| t.logprob).collect(),
                    top_logprobs: tokens
                        .iter()
                        .map(|t| t.top.iter().map(|a| (text(&a.bytes), a.logprob)).collect())
                        .collect(),
                    text_offset,
                }
            }
            Endpoint::Chat | Endpoint::Messages | Endpoint::Responses => ChoiceLogprobs::Chat {
                content: tokens
                    .iter()
                    .map(|t| ChatToken {
                        token: text(&t.bytes),
                        logprob: t.logprob,
                        bytes: t.bytes.clone(),
                        top_logprobs: t
                            .top
                            .iter()
                            .map(|a| ChatAlternative {
                                token: text(&a.bytes),
                                logprob: a.logprob,
                                bytes: a.bytes.clone(),
                            })
                            .collect(),
                    })
                    .collect(),
                refusal: None,
            },
        }
    }

    /// Characters of text the tokens cover (the next offset of a completions stream).
    pub fn chars(tokens: &[TokenLogprob]) -> usize {
        tokens.iter().map(|t| text(&t.bytes).chars().count()).sum()
    }
}
