//! A llama.cpp context on its own worker thread, driven over a channel from async code.

use std::num::NonZeroU32;
use std::sync::Arc;

use exo_kvcache::{DecodedKv, ImportTarget, KvLayout, KvType, StateShape, to_single_stream};
use exo_protocol::{FinishReason, SamplingParams};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::context::session::LlamaStateSeqFlags;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;
use llguidance::Matcher;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::constraint::advance;
use crate::error::EngineError;
use crate::model::Model;
use crate::sampler::choose;
use crate::text::TextStream;

/// How a context is created; both sides of a KV transfer must use compatible layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextConfig {
    /// KV types, flash attention, stream layout, slots and per-sequence context.
    pub layout: KvLayout,
    /// Tokens per llama.cpp batch during prefill.
    pub n_batch: u32,
    /// CPU threads; 0 means all available cores.
    pub n_threads: u32,
}

impl Default for ContextConfig {
    fn default() -> Self {
        ContextConfig {
            layout: KvLayout::default(),
            n_batch: 512,
            n_threads: 0,
        }
    }
}

/// The sequence slots of a context: a fair semaphore counts free slots, a bitmap says which.
struct SlotPool {
    free: Arc<Semaphore>,
    busy: std::sync::Mutex<Vec<bool>>,
}

/// One sequence slot of a context, held by one request; freed (and its KV cleared) on drop.
pub struct SlotLease {
    seq: i32,
    pool: Arc<SlotPool>,
    tx: mpsc::UnboundedSender<Command>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl std::fmt::Debug for SlotLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotLease").field("seq", &self.seq).finish()
    }
}

impl SlotLease {
    /// The llama.cpp sequence id of the slot.
    pub fn seq(&self) -> i32 {
        self.seq
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        // Queued behind whatever the slot's request still has in flight, so it runs after that.
        let (reply, _) = oneshot::channel();
        let _ = self.tx.send(Command::Clear {
            seq: self.seq,
            reply,
        });
        let mut busy = self.pool.busy.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = busy.get_mut(self.seq as usize) {
            *b = false;
        }
        // The permit is released after this, once the slot is marked free.
    }
}

/// Result of a prefill: the first output token, sampled on the prefill side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefillOutput {
    /// Output token 0.
    pub first_token: i32,
    /// Prompt tokens now in the sequence's KV cache.
    pub n_prompt: usize,
}

/// One sequence's KV cache in the single-stream wire form, with the tokens it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedKv {
    /// The llama.cpp sequence state, one stream.
    pub state: Vec<u8>,
    /// Token ids at positions `0..tokens.len()`.
    pub tokens: Vec<i32>,
}

/// What a generation streams back, token by token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GenEvent {
    /// A generated token and the text that became final with it (may be empty mid-character).
    Token {
        /// Token id.
        id: i32,
        /// Output index of this token (0 is the prefill's token).
        index: u32,
        /// Newly final text.
        text: String,
    },
    /// Generation ended; `tail` is text held back until the end (a possible stop-string prefix or an
    /// incomplete character), released now that no stop string can follow.
    Done {
        /// Why it ended.
        finish: FinishReason,
        /// Final text.
        tail: String,
    },
}

/// The whole output of a generation, for callers that do not stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// Generated token ids, the continuation token first.
    pub tokens: Vec<i32>,
    /// Generated text.
    pub text: String,
    /// Why it ended.
    pub finish: FinishReason,
}

type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

enum Command {
    Prefill {
        seq: i32,
        tokens: Vec<i32>,
        sampling: SamplingParams,
        reply: Reply<PrefillOutput>,
    },
    Export {
        seq: i32,
        reply: Reply<ExportedKv>,
    },
    Import {
        seq: i32,
        kv: DecodedKv,
        reply: Reply<()>,
    },
    Generate {
        seq: i32,
        next: i32,
        index: u32,
        sampling: SamplingParams,
        events: mpsc::UnboundedSender<GenEvent>,
        reply: Reply<()>,
    },
    Clear {
        seq: i32,
        reply: Reply<()>,
    },
}

/// Async handle to one context; cheap to clone, the worker stops when the last handle is dropped.
#[derive(Clone)]
pub struct ContextHandle {
    tx: mpsc::UnboundedSender<Command>,
    slots: Arc<SlotPool>,
    config: ContextConfig,
    shape: Arc<StateShape>,
    model: Arc<Model>,
}

impl std::fmt::Debug for ContextHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextHandle")
            .field("config", &self.config)
            .finish()
    }
}

impl ContextHandle {
    /// Creates the context on a new worker thread and learns its KV cache shape.
    pub fn spawn(model: Arc<Model>, config: ContextConfig) -> Result<ContextHandle, EngineError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let worker_model = Arc::clone(&model);
        std::thread::Builder::new()
            .name("exo-engine-ctx".into())
            .spawn(move || worker_main(worker_model, config, rx, ready_tx))
            .map_err(|e| EngineError::ContextCreate(format!("cannot start worker thread: {e}")))?;
        let shape = ready_rx.recv().map_err(|_| EngineError::WorkerGone)??;
        let n = config.layout.n_seq_max as usize;
        let slots = Arc::new(SlotPool {
            free: Arc::new(Semaphore::new(n)),
            busy: std::sync::Mutex::new(vec![false; n]),
        });
        Ok(ContextHandle {
            tx,
            slots,
            config,
            shape: Arc::new(shape),
            model,
        })
    }

    /// Waits for a free sequence slot; waiters are served first come, first served. The slot's KV is
    /// cleared when the lease is dropped.
    pub async fn acquire_slot(&self) -> SlotLease {
        // The semaphore is never closed, so acquiring only waits.
        let permit = Arc::clone(&self.slots.free).acquire_owned().await.ok();
        self.lease(permit)
    }

    /// Takes a free sequence slot now, or `None` when all are in use.
    pub fn try_acquire_slot(&self) -> Option<SlotLease> {
        let permit = Arc::clone(&self.slots.free).try_acquire_owned().ok()?;
        Some(self.lease(Some(permit)))
    }

    fn lease(&self, permit: Option<OwnedSemaphorePermit>) -> SlotLease {
        let mut busy = self.slots.busy.lock().unwrap_or_else(|e| e.into_inner());
        // A permit guarantees a free entry; the fallback only keeps this total.
        let slot = busy.iter().position(|b| !b).unwrap_or(0);
        busy[slot] = true;
        SlotLease {
            seq: slot as i32,
            pool: Arc::clone(&self.slots),
            tx: self.tx.clone(),
            _permit: permit,
        }
    }

    /// Sequence slots not leased right now.
    pub fn free_slots(&self) -> usize {
        self.slots.free.available_permits()
    }

    /// The configuration this context was created with.
    pub fn config(&self) -> &ContextConfig {
        &self.config
    }

    /// The KV cache shape learned at start-up.
    pub fn shape(&self) -> &StateShape {
        &self.shape
    }

    /// The model this context runs.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .map_err(|_| EngineError::WorkerGone)?;
        rx.await.map_err(|_| EngineError::WorkerGone)?
    }

    /// Runs the prompt into sequence `seq` (cleared first) and samples output token 0.
    pub async fn prefill(
        &self,
        seq: i32,
        tokens: Vec<i32>,
        sampling: SamplingParams,
    ) -> Result<PrefillOutput, EngineError> {
        self.call(|reply| Command::Prefill {
            seq,
            tokens,
            sampling,
            reply,
        })
        .await
    }

    /// Exports sequence `seq`'s KV cache in the single-stream wire form.
    pub async fn export(&self, seq: i32) -> Result<ExportedKv, EngineError> {
        self.call(|reply| Command::Export { seq, reply }).await
    }

    /// Checks a received state against this context and imports it into sequence `seq`.
    pub async fn import(&self, seq: i32, kv: DecodedKv) -> Result<(), EngineError> {
        self.call(|reply| Command::Import { seq, kv, reply }).await
    }

    /// Continues sequence `seq`: feeds `next` (output token `index`, already sampled) and streams the
    /// following tokens until an end token, a stop string, `max_tokens` in all, the context's end, or
    /// the receiver of `events` is dropped. `next` itself is not sent as an event.
    pub async fn generate_stream(
        &self,
        seq: i32,
        next: i32,
        index: u32,
        sampling: SamplingParams,
        events: mpsc::UnboundedSender<GenEvent>,
    ) -> Result<(), EngineError> {
        self.call(|reply| Command::Generate {
            seq,
            next,
            index,
            sampling,
            events,
            reply,
        })
        .await
    }

    /// [`Self::generate_stream`] collected: the returned tokens start with `next`.
    pub async fn generate(
        &self,
        seq: i32,
        next: i32,
        index: u32,
        sampling: SamplingParams,
    ) -> Result<Generated, EngineError> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut text = TextStream::new(&sampling.stop);
        let mut out = Generated {
            tokens: vec![next],
            text: String::new(),
            finish: FinishReason::Length,
        };
        let first = self.model.token_bytes(next);
        let stop_on_first = self.model.is_eog(next);
        out.text += &text.push(&first);
        if stop_on_first || text.stopped() {
            out.text.clear();
            out.finish = FinishReason::Stop;
            return Ok(out);
        }
        let run = self.generate_stream(seq, next, index, sampling, tx);
        let collect = async {
            while let Some(ev) = rx.recv().await {
                match ev {
                    GenEvent::Token { id, text: t, .. } => {
                        out.tokens.push(id);
                        out.text += &t;
                    }
                    GenEvent::Done { finish, tail } => {
                        out.text += &tail;
                        out.finish = finish;
                    }
                }
            }
        };
        let (res, ()) = tokio::join!(run, collect);
        res?;
        Ok(out)
    }

    /// Frees sequence `seq`.
    pub async fn clear(&self, seq: i32) -> Result<(), EngineError> {
        self.call(|reply| Command::Clear { seq, reply }).await
    }
}

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
fn worker_main(
    model: Arc<Model>,
    config: ContextConfig,
    mut rx: mpsc::UnboundedReceiver<Command>,
    ready: std::sync::mpsc::Sender<Result<StateShape, EngineError>>,
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
        retired: false,
        active: Vec::new(),
        pending: std::collections::VecDeque::new(),
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
    loop {
        // Idle: sleep until a command arrives. Generating: take whatever arrived, then one step.
        if w.active.is_empty() && w.pending.is_empty() {
            match rx.blocking_recv() {
                Some(cmd) => w.serve(cmd),
                None => break,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(cmd) => w.serve(cmd),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    if w.active.is_empty() && w.pending.is_empty() {
                        return;
                    }
                    break;
                }
            }
        }
        // Prompts and generating sequences take turns: one prompt chunk, then one decode step.
        w.prefill_chunk();
        if !w.active.is_empty() {
            w.step();
        }
    }
}

struct Worker<'m> {
    model: &'m Model,
    ctx: LlamaContext<'m>,
    config: ContextConfig,
    shape: Option<StateShape>,
    /// Tokens whose KV each sequence holds.
    seq_tokens: Vec<Vec<i32>>,
    retired: bool,
    /// Sequences generating; each step decodes one token for all of them in one batch.
    active: Vec<Active>,
    /// Prompts being prefilled, one `n_batch` chunk per turn.
    pending: std::collections::VecDeque<Pending>,
}

/// A prompt being prefilled.
struct Pending {
    seq: i32,
    slot: usize,
    tokens: Vec<i32>,
    /// Tokens already in the cache.
    done: usize,
    sampling: SamplingParams,
    /// The constraint's state, when the request has one.
    matcher: Option<Matcher>,
    reply: Reply<PrefillOutput>,
}

/// A sequence being generated by the batch loop.
struct Active {
    seq: i32,
    slot: usize,
    /// The token to feed next (already sampled and sent).
    token: i32,
    /// Output index of `token`.
    index: u32,
    sampling: SamplingParams,
    /// The constraint's state, advanced over every token chosen so far.
    matcher: Option<Matcher>,
    text: TextStream,
    events: mpsc::UnboundedSender<GenEvent>,
    reply: Reply<()>,
}

impl Worker<'_> {
    fn serve(&mut self, cmd: Command) {
        match cmd {
            Command::Prefill {
                seq,
                tokens,
                sampling,
                reply,
            } => {
                let begun = self.new_matcher(&sampling).and_then(|matcher| {
                    self.guard(|w| w.begin_prefill(seq, &tokens))
                        .map(|slot| (slot, matcher))
                });
                match begun {
                    Ok((slot, matcher)) => self.pending.push_back(Pending {
                        seq,
                        slot,
                        tokens,
                        done: 0,
                        sampling,
                        matcher,
                        reply,
                    }),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
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
                sampling,
                events,
                reply,
            } => {
                let matcher = self
                    .guard(|w| w.check_generate(seq, next))
                    .and_then(|()| self.resume_matcher(&sampling, index, next));
                match matcher {
                    Ok(matcher) => self.start(Active {
                        seq,
                        slot: seq as usize,
                        token: next,
                        index,
                        text: TextStream::new(&sampling.stop),
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
        }
    }

    /// The matcher a new prompt's first token is chosen with, if the request is constrained.
    fn new_matcher(&self, p: &SamplingParams) -> Result<Option<Matcher>, EngineError> {
        p.constraint
            .as_ref()
            .map(|c| self.model.matcher(c))
            .transpose()
    }

    /// The matcher for generation that continues after output token `next` (index `index`): a
    /// fresh one advanced over `next`, exactly the state the node that chose `next` was in.
    fn resume_matcher(
        &self,
        p: &SamplingParams,
        index: u32,
        next: i32,
    ) -> Result<Option<Matcher>, EngineError> {
        let Some(mut m) = self.new_matcher(p)? else {
            return Ok(None);
        };
        if index != 0 {
            return Err(EngineError::InvalidRequest(
                "constrained generation can only continue from the first output token".into(),
            ));
        }
        advance(&mut m, next)?;
        Ok(Some(m))
    }

    fn guard<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        if self.retired {
            return Err(EngineError::ContextRetired);
        }
        f(self)
    }

    fn slot(&self, seq: i32) -> Result<usize, EngineError> {
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
        self.decode_tokens(0, &[bos], 0)?;
        let raw = self.export_raw(0)?;
        self.clear(0)?;
        let shape = StateShape::calibrate(&raw)?;
        tracing::debug!(
            n_stream = shape.n_stream,
            bytes_per_token = shape.bytes_per_token(),
            "context calibrated"
        );
        Ok(shape)
    }

    /// Feeds `tokens` at positions `start..` in batches of `n_batch`; logits only for the last token.
    fn decode_tokens(&mut self, seq: i32, tokens: &[i32], start: usize) -> Result<(), EngineError> {
        let n_batch = self.config.n_batch as usize;
        let n_chunks = tokens.len().div_ceil(n_batch);
        for (c, chunk) in tokens.chunks(n_batch).enumerate() {
            self.decode_chunk(seq, chunk, start + c * n_batch, c + 1 == n_chunks)?;
        }
        Ok(())
    }

    /// Decodes one chunk at positions `start..`; with `logits`, the last token's logits are kept.
    fn decode_chunk(
        &mut self,
        seq: i32,
        chunk: &[i32],
        start: usize,
        logits: bool,
    ) -> Result<(), EngineError> {
        let mut batch = LlamaBatch::new(chunk.len().max(1), 1);
        for (i, &t) in chunk.iter().enumerate() {
            let pos = i32::try_from(start + i)
                .map_err(|_| EngineError::InvalidRequest("position overflow".into()))?;
            batch
                .add(LlamaToken(t), pos, &[seq], logits && i + 1 == chunk.len())
                .map_err(|e| EngineError::Decode(e.to_string()))?;
        }
        self.ctx
            .decode(&mut batch)
            .map_err(|e| EngineError::Decode(e.to_string()))
    }

    /// Checks a prompt and empties its sequence; the prompt then runs chunk by chunk between decode
    /// steps (`prefill_chunk`), so generating sequences keep going and prompts take turns.
    fn begin_prefill(&mut self, seq: i32, tokens: &[i32]) -> Result<usize, EngineError> {
        let slot = self.slot(seq)?;
        if tokens.is_empty() {
            return Err(EngineError::InvalidRequest("empty prompt".into()));
        }
        let room = self.config.layout.n_ctx_seq as usize;
        if tokens.len() >= room {
            return Err(EngineError::InvalidRequest(format!(
                "prompt of {} tokens does not fit the context of {room} tokens per sequence",
                tokens.len()
            )));
        }
        self.model.check_tokens(tokens)?;
        self.clear(seq)?;
        Ok(slot)
    }

    /// Runs the next `n_batch` tokens of the first waiting prompt; a prompt that is not finished goes
    /// to the back of the queue. The chunks are the same whatever runs in between, so the cache is
    /// the same as an uninterrupted prefill's.
    fn prefill_chunk(&mut self) {
        let Some(mut p) = self.pending.pop_front() else {
            return;
        };
        if p.reply.is_closed() {
            // The caller went away (request cancelled): drop the prompt and what it left behind.
            let _ = self
                .ctx
                .clear_kv_cache_seq(u32::try_from(p.seq).ok(), None, None);
            return;
        }
        let n_batch = self.config.n_batch as usize;
        let end = (p.done + n_batch).min(p.tokens.len());
        let last = end == p.tokens.len();
        let ran = self.decode_chunk(p.seq, &p.tokens[p.done..end], p.done, last);
        if let Err(e) = ran {
            let _ = self
                .ctx
                .clear_kv_cache_seq(u32::try_from(p.seq).ok(), None, None);
            let _ = p.reply.send(Err(e));
            return;
        }
        p.done = end;
        if !last {
            self.pending.push_back(p);
            return;
        }
        let row = (end - 1 - (end - 1) / n_batch * n_batch) as i32;
        let result =
            choose(&self.ctx, row, &p.sampling, 0, p.matcher.as_mut()).map(|first_token| {
                let n_prompt = p.tokens.len();
                self.seq_tokens[p.slot] = std::mem::take(&mut p.tokens);
                PrefillOutput {
                    first_token,
                    n_prompt,
                }
            });
        let _ = p.reply.send(result);
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

    fn export(&mut self, seq: i32) -> Result<ExportedKv, EngineError> {
        let slot = self.slot(seq)?;
        if self.seq_tokens[slot].is_empty() {
            return Err(EngineError::InvalidRequest(format!(
                "sequence {seq} is empty"
            )));
        }
        let (state, info) = to_single_stream(self.export_raw(seq)?)?;
        let tokens = self.seq_tokens[slot].clone();
        if info.cell_count as usize != tokens.len() {
            return Err(EngineError::Export(format!(
                "{} cells for {} tokens",
                info.cell_count,
                tokens.len()
            )));
        }
        Ok(ExportedKv { state, tokens })
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
        shape.check(&kv.state, tokens.len())?;
        let mut state = kv.state;
        shape.reframe_for_import(&mut state)?;
        self.clear(seq)?;
        // SAFETY: `state` passed every check llama.cpp would otherwise abort on: magic, one non-empty
        // stream re-framed to this context's stream count, one sequence id per cell, distinct positions,
        // and layer count, types, row sizes and V transposition equal to this context's own export.
        let ok = unsafe {
            self.ctx
                .state_seq_set_data_ext(&state, seq, LlamaStateSeqFlags::empty())
        };
        if !ok {
            // llama.cpp #27052: after a failed restore the context may be corrupt. Never reuse it.
            self.retired = true;
            tracing::error!(
                seq,
                "llama.cpp rejected a checked KV state; retiring the context"
            );
            return Err(EngineError::ImportRejected);
        }
        self.seq_tokens[slot] = tokens;
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
        self.model.check_tokens(&[next])
    }

    /// Adds a sequence to the batch loop; its reply is sent when it finishes.
    fn start(&mut self, mut a: Active) {
        // Token `next` was already sent by whoever sampled it; only its bytes matter here.
        let _ = a.text.push(&self.model.token_bytes(a.token));
        self.active.push(a);
    }

    /// Ends generation of `active[i]`.
    fn finish(&mut self, i: usize, finish: FinishReason) {
        let mut a = self.active.swap_remove(i);
        let tail = a.text.finish();
        let _ = a.events.send(GenEvent::Done { finish, tail });
        let _ = a.reply.send(Ok(()));
    }

    /// Stops a sequence that is about to be cleared or overwritten.
    fn stop_active(&mut self, seq: i32) {
        if let Some(i) = self.active.iter().position(|a| a.seq == seq) {
            self.finish(i, FinishReason::Cancelled);
        }
    }

    /// One decode step: one token for every generating sequence, in a single batch.
    fn step(&mut self) {
        let room = self.config.layout.n_ctx_seq as usize;
        // Sequences that end before decoding anything more.
        let mut i = 0;
        while i < self.active.len() {
            let a = &self.active[i];
            let full =
                a.index + 1 >= a.sampling.max_tokens || self.seq_tokens[a.slot].len() + 1 >= room;
            match (full, a.events.is_closed()) {
                (true, _) => self.finish(i, FinishReason::Length),
                (_, true) => self.finish(i, FinishReason::Cancelled),
                _ => i += 1,
            }
        }
        if self.active.is_empty() {
            return;
        }
        let started = std::time::Instant::now();
        metrics::gauge!("exo_decode_batch_size").set(self.active.len() as f64);
        let mut batch = LlamaBatch::new(self.active.len(), 1);
        for a in &self.active {
            let pos = self.seq_tokens[a.slot].len() as i32;
            if let Err(e) = batch.add(LlamaToken(a.token), pos, &[a.seq], true) {
                self.fail_all(&EngineError::Decode(e.to_string()));
                return;
            }
        }
        if let Err(e) = self.ctx.decode(&mut batch) {
            self.fail_all(&EngineError::Decode(e.to_string()));
            return;
        }
        metrics::histogram!("exo_decode_step_seconds").record(started.elapsed().as_secs_f64());
        let mut row = self.active.len();
        // Walk backwards so finishing (swap_remove) never moves a row not yet visited.
        while row > 0 {
            row -= 1;
            let outcome = {
                let a = &mut self.active[row];
                self.seq_tokens[a.slot].push(a.token);
                a.index += 1;
                match choose(
                    &self.ctx,
                    row as i32,
                    &a.sampling,
                    a.index,
                    a.matcher.as_mut(),
                ) {
                    Err(e) => Err(e),
                    Ok(tok) if self.model.is_eog(tok) => Ok(Some(FinishReason::Stop)),
                    Ok(tok) => {
                        let t = a.text.push(&self.model.token_bytes(tok));
                        a.token = tok;
                        let sent = a.events.send(GenEvent::Token {
                            id: tok,
                            index: a.index,
                            text: t,
                        });
                        Ok(match (sent, a.text.stopped()) {
                            (Err(_), _) => Some(FinishReason::Cancelled),
                            (Ok(()), true) => Some(FinishReason::Stop),
                            (Ok(()), false) => None,
                        })
                    }
                }
            };
            match outcome {
                Ok(Some(f)) => self.finish(row, f),
                Ok(None) => {}
                Err(e) => {
                    let a = self.active.swap_remove(row);
                    let _ = a.reply.send(Err(e));
                }
            }
        }
    }

    fn fail_all(&mut self, e: &EngineError) {
        tracing::error!(error = %e, "batch decode failed");
        for a in self.active.drain(..) {
            let _ = a.reply.send(Err(EngineError::Decode(e.to_string())));
        }
    }

    fn clear(&mut self, seq: i32) -> Result<(), EngineError> {
        let slot = self.slot(seq)?;
        self.stop_active(seq);
        if let Some(i) = self.pending.iter().position(|p| p.seq == seq)
            && let Some(p) = self.pending.remove(i)
        {
            let msg = format!("prefill of sequence {seq} was superseded");
            let _ = p.reply.send(Err(EngineError::InvalidRequest(msg)));
        }
        self.ctx
            .clear_kv_cache_seq(u32::try_from(seq).ok(), None, None)
            .map_err(|e| EngineError::Decode(format!("clearing sequence {seq}: {e}")))?;
        self.seq_tokens[slot].clear();
        Ok(())
    }
}
