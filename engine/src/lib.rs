//! The llama.cpp engine both node kinds run: models, contexts on worker threads, sampling, KV export/import.
//!
//! A [`Model`] is loaded once and shared. Each [`ContextHandle`] owns one llama.cpp context on its own
//! OS thread (a context borrows the model and is not `Sync`) and is driven from async code over a
//! channel. Every context is created from a [`exo_kvcache::KvLayout`] so a prefill context and a decode
//! context agree byte for byte on the KV cache, and every imported state is checked against the
//! context's calibrated [`exo_kvcache::StateShape`] before llama.cpp sees it (llama.cpp aborts the
//! process on a malformed state). This is the only crate in the workspace that uses `unsafe`.

mod constraint;
mod context;
mod error;
mod model;
mod offload;
mod sampler;
mod template;
mod text;

pub use context::{
    ContextConfig, ContextHandle, EventSink, ExportedKv, GenEvent, Generated, KvPiece,
    PrefillBatching, PrefillOutput, SlotLease, resumed_output,
};
pub use error::EngineError;
pub use model::{ChatMessage, FirstOutput, Memory, Model, ModelOptions, fingerprint_file};
pub use offload::{GpuDevice, GpuLayers, Offload, gpu_devices};
pub use sampler::draw_bits;
pub use template::{TOOL_FORMAT, today_utc};
pub use text::TextStream;
