//! Errors of the engine.

use exo_kvcache::KvError;

/// Why an engine operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The llama.cpp backend could not be initialised.
    #[error("llama.cpp backend failed to initialise: {0}")]
    Backend(String),
    /// The model file could not be read or loaded.
    #[error("cannot load model {path}: {detail}")]
    ModelLoad {
        /// Model path.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// llama.cpp refused to create a context with this configuration.
    #[error("cannot create a llama.cpp context: {0}")]
    ContextCreate(String),
    /// Tokenizing or rendering a prompt failed.
    #[error("prompt error: {0}")]
    Prompt(String),
    /// The request does not fit (empty prompt, too long for the context, bad token id, bad slot).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// llama.cpp failed while decoding a batch.
    #[error("llama.cpp decode failed: {0}")]
    Decode(String),
    /// A sequence state was refused before import.
    #[error("KV import refused: {0}")]
    Kv(#[from] KvError),
    /// Exporting a sequence state failed.
    #[error("KV export failed: {0}")]
    Export(String),
    /// llama.cpp rejected an import that passed every check; the context is no longer trusted.
    #[error("llama.cpp rejected the KV state; this context is retired")]
    ImportRejected,
    /// The context was retired after an earlier failure (see llama.cpp #27052).
    #[error("context retired after an earlier failed import")]
    ContextRetired,
    /// The worker thread is gone.
    #[error("engine worker stopped")]
    WorkerGone,
}
