//! Helpers the test suites share: the repository root, the default model's path, the model
//! loaded once per test binary, a KV hand-off through the wire format between two contexts
//! ([`frames`], [`receive`]), and a fault-injecting TCP proxy ([`proxy`]). Only ever a dev-dependency: a missing model is a broken test set-up,
//! so these panic with the fix (`scripts/fetch-model`) instead of returning errors.

#![allow(clippy::panic)]

pub mod proxy;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use exo_engine::{ContextConfig, ContextHandle, ExportedKv, Model, ModelOptions};
use exo_kvcache::{
    Codec, DecodeLimits, DecodedKv, ImportTarget, KvDecoder, KvEncoder, KvError, KvHeader,
    KvLayout, TransferFrames, source_seq,
};

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
    context_of(&model(), layout)
}

/// Another model of the repository's `models/` (`file`, e.g. `models/tiny-jamba.gguf`), put there
/// by `scripts/fetch-model FETCH`.
pub fn other_model(file: &str, fetch: &str) -> Arc<Model> {
    let path = root().join(file);
    Model::load(&path, &ModelOptions::default())
        .unwrap_or_else(|e| panic!("{e} (run scripts/fetch-model {fetch})"))
}

/// A context of `model` with `layout` and the default configuration otherwise.
pub fn context_of(model: &Arc<Model>, layout: KvLayout) -> ContextHandle {
    let config = ContextConfig {
        layout,
        ..ContextConfig::default()
    };
    ContextHandle::spawn(Arc::clone(model), config).unwrap_or_else(|e| panic!("context: {e}"))
}

/// Every frame of a transfer of `kv` (exported from `src`) with `codec` and `chunk`-byte chunks,
/// its header saying `layout` (the sender's own, or another one to forge a header).
pub fn frames(
    src: &ContextHandle,
    kv: &ExportedKv,
    layout: KvLayout,
    codec: Codec,
    chunk: u32,
) -> TransferFrames {
    let seq = source_seq(&kv.state).unwrap_or_else(|e| panic!("{e}"));
    let spec = KvHeader {
        layout,
        ..src.transfer_header(seq, kv.tokens.clone(), codec, chunk)
    };
    KvEncoder::whole(spec, &kv.state).unwrap_or_else(|e| panic!("{e}"))
}

/// The frames checked by `dst`'s decoder, as a decode node checks them (its model's fingerprint
/// and layout; a whole sequence of its context at most) into the state `dst` would import.
pub fn receive(
    dst: &ContextHandle,
    header: &[u8],
    chunks: &[Vec<u8>],
    end: &[u8],
) -> Result<DecodedKv, KvError> {
    let layout = dst.config().layout;
    let target = ImportTarget {
        fingerprint: dst.model().fingerprint(),
        layout,
    };
    let limits =
        DecodeLimits::for_context(dst.shape(), layout.n_ctx_seq, dst.model().sliding_window());
    let mut d = KvDecoder::new(header, &limits, &target)?;
    for c in chunks {
        d.push_chunk(c)?;
    }
    d.finish(end)
}
