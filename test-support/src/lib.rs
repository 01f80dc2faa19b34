//! Helpers the test suites share: the repository root, the default model's path, the model
//! loaded once per test binary, and a fault-injecting TCP proxy ([`proxy`]). Only ever a dev-dependency: a missing model is a broken test set-up,
//! so these panic with the fix (`scripts/fetch-model`) instead of returning errors.

#![allow(clippy::panic)]

pub mod proxy;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use exo_engine::{ContextConfig, ContextHandle, Model, ModelOptions};
use exo_kvcache::KvLayout;

/// The default model's path relative to the repository root (`scripts/fetch-model` puts it there).
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The model the tests run: always the default model, so expected texts hold.
pub fn model_path() -> PathBuf {
    let path = root().join(DEFAULT_MODEL);
    if !path.is_file() {
        panic!("{} missing: run scripts/fetch-model", path.display());
    }
    path
}

/// The test model, loaded once per test binary.
pub fn model() -> Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            Model::load(&model_path(), &ModelOptions::default())
                .unwrap_or_else(|e| panic!("{e} (run scripts/fetch-model first)"))
        })
        .clone()
}

/// A context of the test model with `layout` and the default configuration otherwise.
pub fn context(layout: KvLayout) -> ContextHandle {
    let config = ContextConfig {
        layout,
        ..ContextConfig::default()
    };
    ContextHandle::spawn(model(), config).unwrap_or_else(|e| panic!("context: {e}"))
}
