//! The worker thread: creates the llama.cpp context, serves commands in order and runs the batch loop
//! between them.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use exo_kvcache::{DecodedKv, ImportTarget, KvType, StateShape, to_single_stream};
use exo_sampling::SamplingParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::context::session::LlamaStateSeqFlags;
use llguidance::Matcher;
use tokio::sync::mpsc;

use super::batch::Active;
use super::prefill::{Pending, PrefillCost};
use super::{Command, ContextConfig, ExportedKv};
use crate::constraint::advance;
use crate::error::EngineError;
use crate::model::Model;

fn kv_cache_type(t: KvType) -> KvCacheType {
    match t {
        KvType::F32 => KvCacheType::F32,
        KvType::F16 => KvCacheType::F16,
        KvType::Bf16 => KvCacheType::BF16,
        KvType::Q8_0 => KvCacheType::Q8_0,
        KvType::Q4_0 => KvCacheType::Q4_0,
        KvType::Q4_1 => KvCacheType::Q4_1,
        KvType::Q5_0 => KvCacheType::Q5_0,
        KvType::Q5_1 => KvCacheType::Q5_1,
    }
}

fn context_params(config: &ContextConfig) -> Result<LlamaContextParams, EngineError> {
    let l = &config.layout;
    let n_ctx = u32::try_from(l.n_ctx_total())
        .ok()
        .and_then(NonZeroU32::new)
        .ok_or_else(|| {
            EngineError::ContextCreate(format!("context size {} is out of range", l.n_ctx_total()))
        })?;
    if l.n_seq_max == 0 || config.n_batch == 0 {
        return Err(EngineError::ContextCreate(
            "n_seq_max and n_batch must be positive".into(),
        ));
    }
    let threads = if config.n_threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get() as i32)
    } else {
        i32::try_from(config.n_threads).unwrap_or(i32::MAX)
    };
    let fa = if l.flash_attn {
        llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED
    } else {
        llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED
    };
    Ok(LlamaContextParams::default()
        .with_n_ctx(Some(n_ctx))
        .with_n_batch(config.n_batch)
        .with_n_ubatch(config.n_batch)
        .with_n_seq_max(l.n_seq_max)
        .with_kv_unified(l.kv_unified)
        .with_type_k(kv_cache_type(l.type_k))
        .with_type_v(kv_cache_type(l.type_v))
        .with_flash_attention_policy(fa)
        .with_n_threads(threads)
        .with_n_threads_batch(threads))
}

/// The worker: owns the context for its whole life and serves commands in order.
pub(super) fn worker_main(
    model: Arc<Model>,
    config: ContextConfig,
    mut rx: mpsc::UnboundedReceiver<Command>,
    ready: std::sync::mpsc::Sender<Result<StateShape, EngineError>>,
    retired: Arc<AtomicBool>,
    batch_hint: Arc<AtomicUsize>,
) {
    let params = match context_params(&config) {
        Ok(p) => p,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let created = crate::model::backend().and_then(|backend| {
        model
            .llama
            .new_context(backend, params)
            .map_err(|e| EngineError::ContextCreate(e.to_string()))
    });
    let ctx = match created {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut w = Worker {
        model: &model,
        ctx,
        config,
        shape: None,
        seq_tokens: vec![Vec::new(); config.layout.n_seq_max as usize],
        reusable: vec![0; config.layout.n_seq_max as usize],
        retired,
        active: Vec::new(),
        pending: std::collections::VecDeque::new(),
        prefill_cost: PrefillCost::default(),
        batch_hint,
    };
    match w.calibrate() {
        Ok(shape) => {
            w.shape = Some(shape.clone());
            let _ = ready.send(Ok(shape));
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    }
    w.run(&mut rx);
}

/// The worker thread's state: the context it owns and the sequences the batch loop is running.
pub(super) struct Worker<'m> {
    pub(super) model: &'m Model,
    pub(super) ctx: LlamaContext<'m>,
    pub(super) config: ContextConfig,
    shape: Option<StateShape>,
    /// Tokens whose KV each sequence holds.
    pub(super) seq_tokens: Vec<Vec<i32>>,
    /// How many leading cells of each sequence a prompt's chunks computed (its prompt proper, not
    /// decoded output nor an imported cache): what a later prompt may reuse.
    pub(super) reusable: Vec<usize>,
    /// Set for good once llama.cpp rejected a state; the handle reports it as the node's fault.
    retired: Arc<AtomicBool>,
    /// Sequences generating; each step decodes one token for all of them in one batch.
    pub(super) active: Vec<Active>,
    /// Prompts being prefilled, in arrival order; `prefill::plan` picks each turn's batch.
    pub(super) pending: std::collections::VecDeque<Pending>,
    /// What prefill batches have cost on this context.
    pub(super) prefill_cost: PrefillCost,
    /// The prefill batch size in force, published for [`super::ContextHandle::prefill_batch_tokens`].
    pub(super) batch_hint: Arc<AtomicUsize>,
}

impl Worker<'_> {
    /// Serves commands until every handle is gone and no work is left.
    fn run(&mut self, rx: &mut mpsc::UnboundedReceiver<Command>) {
        loop {
            // Idle: sleep until a command arrives. Generating: take whatever arrived, then one step.
            if self.active.is_empty() && self.pending.is_empty() {
                match rx.blocking_recv() {
                    Some(Command::Stop) | None => break,
                    Some(cmd) => self.serve(cmd),
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(Command::Stop) => return,
                    Ok(cmd) => self.serve(cmd),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        if self.active.is_empty() && self.pending.is_empty() {
                            return;
                        }
                        break;
                    }
                }
            }
            // Prompts and generating sequences take turns: one prefill batch, then one decode step.
            self.prefill_batch();
            if !self.active.is_empty() {
                self.step();
            }
        }
    }

    fn serve(&mut self, cmd: Command) {
        match cmd {
            Command::Prefill {
                seq,
                tokens,
                resumed,
                sampling,
                stream,
                reply,
            } => match self.begin_prompt(seq, &tokens, resumed, &sampling) {
                Ok((slot, matcher, first_index, reused)) => self.pending.push_back(Pending {
                    seq,
                    slot,
                    tokens,
                    first_index,
                    done: reused,
                    reused,
                    passed_over: 0,
                    stream,
                    sampling,
                    matcher,
                    reply,
                }),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::Export { seq, reply } => {
                let _ = reply.send(self.guard(|w| w.export(seq)));
            }
            Command::Import { seq, kv, reply } => {
                let _ = reply.send(self.guard(|w| w.import(seq, kv)));
            }
            Command::Generate {
                seq,
                next,
                index,
                history,
                sampling,
                events,
                reply,
            } => {
                let matcher = self
                    .guard(|w| w.check_generate(seq, next))
                    .and_then(|()| self.model.check_tokens(&history))
                    .and_then(|()| self.model.check_bias(&sampling))
                    .and_then(|()| self.resume_matcher(&sampling, index, &history, next));
                match matcher {
                    // `next` and the output before it were sent by whoever sampled them.
                    Ok(matcher) => self.start(Active {
                        seq,
                        slot: seq as usize,
                        token: next,
                        index,
                        text: self
                            .model
                            .text_after(history.into_iter().chain([next]), &sampling),
                        sampling,
                        matcher,
                        events,
                        reply,
                    }),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Command::Clear { seq, reply } => {
                let _ = reply.send(self.guard(|w| w.clear(seq)));
            }
            Command::Release { seq } => {
                if let Err(e) = self.guard(|w| w.release(seq)) {
                    tracing::debug!(seq, error = %e, "releasing a slot");
                }
            }
            // `run` stops on it before serving.
            Command::Stop => {}
        }
    }

    /// The matcher a new prompt's first token is chosen with, if the request is constrained.
    fn new_matcher(&self, p: &SamplingParams) -> Result<Option<Matcher>, EngineError> {
        p.constraint
            .as_ref()
            .map(|c| self.model.matcher(c))
            .transpose()
    }

    /// Checks a prompt whose last `resumed` tokens are the request's earlier output and empties its
    /// sequence but for a start it may reuse: its slot, the matcher after that output, the output
    /// index of the token the prompt will end with, and the prompt tokens already in the cache.
    fn begin_prompt(
        &mut self,
        seq: i32,
        tokens: &[i32],
        resumed: usize,
        sampling: &SamplingParams,
    ) -> Result<(usize, Option<Matcher>, u32, usize), EngineError> {
        let history = super::resumed_output(tokens, resumed).ok_or_else(|| {
            EngineError::InvalidRequest("the resumed output is not shorter than the prompt".into())
        })?;
        let first_index = u32::try_from(resumed)
            .map_err(|_| EngineError::InvalidRequest("resumed output too long".into()))?;
        self.model.check_tokens(tokens)?;
        self.model.check_bias(sampling)?;
        let matcher = self.matcher_after(sampling, history)?;
        let (slot, reused) = self.guard(|w| w.begin_prefill(seq, tokens, resumed))?;
        Ok((slot, matcher, first_index, reused))
    }

    /// The matcher a request's next token is chosen with after output tokens `history`, if the
    /// request is constrained: a fresh one advanced over them.
    fn matcher_after(
        &self,
        p: &SamplingParams,
        history: &[i32],
    ) -> Result<Option<Matcher>, EngineError> {
        let Some(mut m) = self.new_matcher(p)? else {
            return Ok(None);
        };
        for &t in history {
            advance(&mut m, t)?;
        }
        Ok(Some(m))
    }

    /// The matcher for generation that continues after output token `next` (index `index`, the
    /// output before it `history`): a fresh one advanced over `history` and `next`, exactly the
    /// state the node that chose `next` was in.
    fn resume_matcher(
        &self,
        p: &SamplingParams,
        index: u32,
        history: &[i32],
        next: i32,
    ) -> Result<Option<Matcher>, EngineError> {
        if p.constraint.is_some() && index as usize != history.len() {
            return Err(EngineError::InvalidRequest(
                "constrained generation continues only with every earlier output token".into(),
            ));
        }
        let mut m = self.matcher_after(p, history)?;
        if let Some(m) = m.as_mut() {
            advance(m, next)?;
        }
        Ok(m)
    }

    fn guard<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        if self.retired.load(Ordering::Relaxed) {
            return Err(EngineError::ContextRetired);
        }
        f(self)
    }

    pub(super) fn slot(&self, seq: i32) -> Result<usize, EngineError> {
        usize::try_from(seq)
            .ok()
            .filter(|&s| s < self.seq_tokens.len())
            .ok_or_else(|| {
                EngineError::InvalidRequest(format!(
                    "sequence {seq} is outside 0..{}",
                    self.seq_tokens.len()
                ))
            })
    }

    /// Decodes one token in sequence 0, exports it and clears it: the state tells the cache's shape.
    fn calibrate(&mut self) -> Result<StateShape, EngineError> {
        let bos = self.model.tokenize("", true).first().copied().unwrap_or(0);
        self.decode_chunk(0, &[bos], 0, true)?;
        let raw = self.export_raw(0)?;
        self.clear(0)?;
        let shape = StateShape::calibrate(&raw)?;
        // The parser reads the first layout that fits; the model says which one it must be.
        let memory = self.model.memory();
        if (shape.has_attention(), shape.recurrent.is_some()) != memory.parts() {
            return Err(EngineError::Kv(exo_kvcache::KvError::ShapeMismatch(
                format!("the context's own state does not read as a {memory:?} model's"),
            )));
        }
        tracing::debug!(
            n_stream = shape.n_stream,
            bytes_per_token = shape.bytes_per_token(),
            "context calibrated"
        );
        Ok(shape)
    }

    fn export_raw(&self, seq: i32) -> Result<Vec<u8>, EngineError> {
        let flags = LlamaStateSeqFlags::empty();
        let size = self.ctx.state_seq_get_size_ext(seq, flags);
        if size == 0 {
            return Err(EngineError::Export(
                "llama.cpp reports an empty state".into(),
            ));
        }
        let mut buf: Vec<u8> = Vec::with_capacity(size);
        // SAFETY: the buffer has room for `size` bytes, the size llama.cpp just reported for this
        // sequence; nothing else touches the context in between (this thread owns it).
        let written = unsafe {
            self.ctx
                .state_seq_get_data_ext(buf.as_mut_ptr(), seq, flags)
        };
        if written != size {
            return Err(EngineError::Export(format!(
                "llama.cpp wrote {written} bytes, announced {size}"
            )));
        }
        // SAFETY: llama.cpp initialised exactly `written` bytes.
        unsafe { buf.set_len(written) };
        Ok(buf)
    }

    pub(super) fn export(&mut self, seq: i32) -> Result<ExportedKv, EngineError> {
        let slot = self.slot(seq)?;
        if self.seq_tokens[slot].is_empty() {
            return Err(EngineError::InvalidRequest(format!(
                "sequence {seq} is empty"
            )));
        }
        let tokens = self.seq_tokens[slot].clone();
        let state = self.export_cells(seq, tokens.len())?;
        Ok(ExportedKv { state, tokens })
    }

    /// Sequence `seq`'s state in the single-stream wire form, which must hold exactly `cells`
    /// cells (a prompt part-way through holds the tokens its batches ran so far).
    pub(super) fn export_cells(&self, seq: i32, cells: usize) -> Result<Vec<u8>, EngineError> {
        let (state, info) = to_single_stream(self.export_raw(seq)?)?;
        if info.cell_count as usize != self.shape()?.cells_for(cells) {
            return Err(EngineError::Export(format!(
                "{} cells for {cells} tokens",
                info.cell_count
            )));
        }
        Ok(state)
    }

    /// The calibrated cache shape.
    pub(super) fn shape(&self) -> Result<&StateShape, EngineError> {
        self.shape.as_ref().ok_or(EngineError::ContextRetired)
    }

    fn import(&mut self, seq: i32, kv: DecodedKv) -> Result<(), EngineError> {
        let slot = self.slot(seq)?;
        let shape = self.shape.as_ref().ok_or(EngineError::ContextRetired)?;
        // The decoder checked this already; the engine checks again so no caller can skip it.
        ImportTarget {
            fingerprint: self.model.fingerprint(),
            layout: self.config.layout,
        }
        .check(&kv.header)?;
        let tokens = kv.header.tokens;
        if tokens.len() >= self.config.layout.n_ctx_seq as usize {
            return Err(EngineError::InvalidRequest(
                "state does not fit the per-sequence context".into(),
            ));
        }
        self.model.check_tokens(&tokens)?;
        // A sender with the other flash-attention setting stores V the other way: transpose it.
        let mut state = shape.match_v_layout(kv.state)?;
        let info = shape.check(&state, tokens.len())?;
        if shape.window.is_some() {
            window_fits(info.window_cells, self.model.sliding_window())?;
        }
        shape.reframe_for_import(&mut state)?;
        self.clear(seq)?;
        // SAFETY: `state` passed every check llama.cpp would otherwise abort on: magic, one non-empty
        // stream re-framed to this context's stream count, one sequence id per cell, distinct positions,
        // and layer count, types, row sizes and V transposition equal to this context's own export;
        // for an iSWA model the same for the window cache, whose cells fit the model's window; for a
        // hybrid or recurrent model a recurrent section of exactly one cell (two abort llama.cpp)
        // at the last position, with no sequence ids and this context's own layers and rows.
        let ok = unsafe {
            self.ctx
                .state_seq_set_data_ext(&state, seq, LlamaStateSeqFlags::empty())
        };
        if !ok {
            // llama.cpp #27052: after a failed restore the context may be corrupt. Never reuse it.
            self.retired.store(true, Ordering::Relaxed);
            tracing::error!(
                seq,
                "llama.cpp rejected a checked KV state; retiring the context"
            );
            return Err(EngineError::ImportRejected);
        }
        self.seq_tokens[slot] = tokens;
        // Computed elsewhere, maybe in another shape: never reused for a prompt here.
        self.reusable[slot] = 0;
        Ok(())
    }

    fn check_generate(&mut self, seq: i32, next: i32) -> Result<(), EngineError> {
        let slot = self.slot(seq)?;
        if self.seq_tokens[slot].is_empty() {
            return Err(EngineError::InvalidRequest(format!(
                "sequence {seq} is empty"
            )));
        }
        if self.active.iter().any(|a| a.seq == seq) {
            return Err(EngineError::InvalidRequest(format!(
                "sequence {seq} is already generating"
            )));
        }
        if self.pending.iter().any(|p| p.seq == seq) {
            return Err(EngineError::InvalidRequest(format!(
                "sequence {seq} is still prefilling"
            )));
        }
        self.model.check_tokens(&[next])
    }

    pub(super) fn clear(&mut self, seq: i32) -> Result<(), EngineError> {
        self.stop(seq);
        self.forget(seq)
    }

    /// Stops whatever still runs on sequence `seq`: its generation, or its prompt. A prompt
    /// stopped part-way leaves cells no token list describes, so the sequence is emptied then.
    pub(super) fn stop(&mut self, seq: i32) {
        self.stop_active(seq);
        if let Some(i) = self.pending.iter().position(|p| p.seq == seq)
            && let Some(p) = self.pending.remove(i)
        {
            let msg = format!("prefill of sequence {seq} was superseded");
            let _ = p.reply.send(Err(EngineError::InvalidRequest(msg)));
            let _ = self.forget(seq);
        }
    }

    /// Empties sequence `seq`'s cache and what the worker knows of it.
    pub(super) fn forget(&mut self, seq: i32) -> Result<(), EngineError> {
        let slot = self.slot(seq)?;
        self.seq_tokens[slot].clear();
        self.reusable[slot] = 0;
        self.ctx
            .clear_kv_cache_seq(u32::try_from(seq).ok(), None, None)
            .map_err(|e| EngineError::Decode(format!("clearing sequence {seq}: {e}")))?;
        Ok(())
    }

    /// A lease on `seq` ended: stops what runs on it and keeps its cache when a later prompt may
    /// reuse its start, clearing it otherwise.
    fn release(&mut self, seq: i32) -> Result<(), EngineError> {
        let slot = self.slot(seq)?;
        self.stop(seq);
        if self.reuses_prefixes() && self.reusable[slot] > 0 {
            return Ok(());
        }
        self.forget(seq)
    }
}

/// Refuses a window cache of more cells than the model's sliding window (or any, when the model's
/// metadata does not say its window): llama.cpp keeps at most that many, and a larger one would
/// fail inside it, retiring the context.
pub(super) fn window_fits(cells: u32, window: Option<u32>) -> Result<(), EngineError> {
    match window {
        Some(w) if cells <= w => Ok(()),
        _ => Err(EngineError::InvalidRequest(format!(
            "a window cache of {cells} cells, the model's sliding window is {}",
            window.map_or("unknown".into(), |w| w.to_string())
        ))),
    }
}

#[cfg(test)]
mod window_tests {
    use super::window_fits;

    #[test]
    fn a_window_cache_larger_than_the_model_window_is_refused() {
        assert!(window_fits(512, Some(512)).is_ok());
        assert!(window_fits(1, Some(512)).is_ok());
        assert!(window_fits(513, Some(512)).is_err());
        assert!(window_fits(1, None).is_err());
    }
}
