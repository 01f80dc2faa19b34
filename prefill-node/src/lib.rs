//! Prefill node: runs a prompt through llama.cpp, samples the first token and encodes the KV cache.

use exo_engine::{ContextHandle, EngineError};
use exo_kvcache::{Codec, KvEncoder, KvError};
use exo_protocol::SamplingParams;

/// Why a prefill failed.
#[derive(Debug, thiserror::Error)]
pub enum PrefillError {
    /// The engine refused or failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The KV cache could not be framed.
    #[error(transparent)]
    Kv(#[from] KvError),
}

/// A prompt's result: the first output token and the frames of its KV cache, ready to send.
pub struct Prefilled {
    /// Output token 0, sampled here.
    pub first_token: i32,
    /// Prompt tokens processed.
    pub n_prompt: usize,
    /// The KV cache's frames (header first, then chunks as they are taken).
    pub frames: KvEncoder<Vec<u8>>,
}

/// A prefill worker over one engine context (sequence slot 0).
pub struct PrefillNode {
    ctx: ContextHandle,
    codec: Codec,
    chunk_size: u32,
}

impl PrefillNode {
    /// A node that encodes caches with `codec` in chunks of `chunk_size` raw bytes.
    pub fn new(ctx: ContextHandle, codec: Codec, chunk_size: u32) -> Self {
        PrefillNode {
            ctx,
            codec,
            chunk_size,
        }
    }

    /// The engine context.
    pub fn context(&self) -> &ContextHandle {
        &self.ctx
    }

    /// Runs `tokens`, samples output token 0, exports and frames the KV cache, and frees the slot.
    pub async fn prefill(
        &self,
        tokens: Vec<i32>,
        sampling: &SamplingParams,
    ) -> Result<Prefilled, PrefillError> {
        let out = self.ctx.prefill(0, tokens, sampling.clone()).await?;
        let exported = self.ctx.export(0).await;
        self.ctx.clear(0).await?;
        let kv = exported?;
        let model = self.ctx.model();
        let frames = KvEncoder::new(
            kv.state,
            kv.tokens,
            model.fingerprint(),
            self.ctx.config().layout,
            self.codec,
            self.chunk_size,
        )?;
        Ok(Prefilled {
            first_token: out.first_token,
            n_prompt: out.n_prompt,
            frames,
        })
    }
}
