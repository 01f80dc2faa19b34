//! Constrained generation with llguidance: compiles a request's [`Constraint`] into a matcher that
//! masks every token that could not continue a match, and advances it over the chosen tokens.

use exo_sampling::Constraint;
use llama_cpp_2::sampling::LlamaSampler;
use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::json;

use crate::error::EngineError;

/// Compiles constraints for one model: holds the vocabulary trie (built once, it walks every token).
pub(crate) struct Compiler {
    factory: ParserFactory,
}

impl Compiler {
    pub(crate) fn new(model: &llama_cpp_2::model::LlamaModel) -> Result<Self, String> {
        let env = LlamaSampler::llguidance_tok_env(model);
        let factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        Ok(Compiler { factory })
    }

    /// A fresh matcher for `c`, or why `c` cannot be enforced (a client error).
    pub(crate) fn matcher(&self, c: &Constraint) -> Result<Matcher, EngineError> {
        let grammar = match c {
            Constraint::JsonObject => {
                TopLevelGrammar::from_json_schema(json!({ "type": "object" }))
            }
            Constraint::JsonSchema(text) => {
                let schema: serde_json::Value = serde_json::from_str(text).map_err(|e| {
                    EngineError::InvalidRequest(format!("JSON schema is not JSON: {e}"))
                })?;
                TopLevelGrammar::from_json_schema(schema)
            }
            Constraint::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
        };
        let parser = self.factory.create_parser(grammar).map_err(|e| {
            EngineError::InvalidRequest(format!("cannot enforce the constraint: {e}"))
        })?;
        let matcher = Matcher::new(Ok(parser));
        match matcher.get_error() {
            Some(e) => Err(EngineError::InvalidRequest(format!(
                "cannot enforce the constraint: {e}"
            ))),
            None => Ok(matcher),
        }
    }
}

/// Feeds a chosen token to the matcher. A matcher that already stopped (its grammar is complete)
/// only lets end-of-generation through, which ends the sequence; nothing more to advance.
pub(crate) fn advance(m: &mut Matcher, token: i32) -> Result<(), EngineError> {
    if m.is_stopped() {
        return Ok(());
    }
    let id = u32::try_from(token)
        .map_err(|_| EngineError::Decode(format!("negative token id {token}")))?;
    m.consume_token(id)
        .map_err(|e| EngineError::Decode(format!("constraint refused token {token}: {e}")))
}
