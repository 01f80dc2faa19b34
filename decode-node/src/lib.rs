//! Decode node: receives KV caches, imports them into free sequence slots and generates tokens.

use std::sync::Mutex;

use exo_engine::{ContextHandle, EngineError, Generated};
use exo_kvcache::{DecodeLimits, ImportTarget, KvDecoder, KvError};
use exo_protocol::SamplingParams;

/// Why a decode failed.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The engine refused or failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The KV transfer was refused.
    #[error(transparent)]
    Kv(#[from] KvError),
    /// Every sequence slot is in use.
    #[error("no free sequence slot")]
    NoFreeSlot,
}

/// A decode worker over one engine context with several sequence slots.
pub struct DecodeNode {
    ctx: ContextHandle,
    limits: DecodeLimits,
    busy: Mutex<Vec<bool>>,
}

/// A sequence slot held for one request; freed on drop.
pub struct SlotGuard<'a> {
    node: &'a DecodeNode,
    slot: usize,
}

impl SlotGuard<'_> {
    /// The llama.cpp sequence id of this slot.
    pub fn seq(&self) -> i32 {
        self.slot as i32
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let mut busy = self.node.busy.lock().unwrap_or_else(|e| e.into_inner());
        busy[self.slot] = false;
    }
}

impl DecodeNode {
    /// A node whose transfers are checked against `limits`.
    pub fn new(ctx: ContextHandle, limits: DecodeLimits) -> Self {
        let slots = ctx.config().layout.n_seq_max as usize;
        DecodeNode {
            ctx,
            limits,
            busy: Mutex::new(vec![false; slots]),
        }
    }

    /// The engine context.
    pub fn context(&self) -> &ContextHandle {
        &self.ctx
    }

    /// Starts receiving a transfer: checks its header frame against this node's model and layout.
    pub fn begin_transfer(&self, header: &[u8]) -> Result<KvDecoder, DecodeError> {
        let target = ImportTarget {
            fingerprint: self.ctx.model().fingerprint(),
            layout: self.ctx.config().layout,
        };
        Ok(KvDecoder::new(header, &self.limits, &target)?)
    }

    fn take_slot(&self) -> Result<SlotGuard<'_>, DecodeError> {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let slot = busy
            .iter()
            .position(|b| !b)
            .ok_or(DecodeError::NoFreeSlot)?;
        busy[slot] = true;
        Ok(SlotGuard { node: self, slot })
    }

    /// Finishes a transfer, imports it into a free slot and generates from `first_token` (output 0).
    pub async fn decode(
        &self,
        transfer: KvDecoder,
        first_token: i32,
        sampling: SamplingParams,
    ) -> Result<Generated, DecodeError> {
        let kv = transfer.finish()?;
        let slot = self.take_slot()?;
        self.ctx.import(slot.seq(), kv).await?;
        let out = self
            .ctx
            .generate(slot.seq(), first_token, 0, sampling)
            .await;
        self.ctx.clear(slot.seq()).await?;
        Ok(out?)
    }
}
