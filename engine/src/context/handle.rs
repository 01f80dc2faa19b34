//! The async side: [`ContextHandle`] and the configuration a context is created with.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use exo_kvcache::{Codec, DecodedKv, KvHeader, KvLayout, StateShape};
use exo_sampling::{FinishReason, SamplingParams};
use tokio::sync::{mpsc, oneshot};

use super::prefill::PrefillBatching;
use super::slots::{SlotLease, SlotPool};
use super::worker::worker_main;
use super::{Command, EventSink, ExportedKv, GenEvent, KvPiece, PieceStream, PrefillOutput, Reply};
use crate::error::EngineError;
use crate::model::Model;

/// How a context is created; both sides of a KV transfer must use compatible layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextConfig {
    /// KV types, flash attention, stream layout, slots and per-sequence context.
    pub layout: KvLayout,
    /// Tokens per llama.cpp batch during prefill.
    pub n_batch: u32,
    /// CPU threads; 0 means all available cores.
    pub n_threads: u32,
    /// Whether waiting prompts share prefill batches.
    pub prefill_batching: PrefillBatching,
    /// Whether a prompt reuses the cache its slot kept from an earlier prompt that started the
    /// same way (prefix reuse: `prefill`'s module docs say when it applies). Off for measurements
    /// that repeat one prompt.
    pub prefix_reuse: bool,
}

impl Default for ContextConfig {
    fn default() -> Self {
        ContextConfig {
            layout: KvLayout::default(),
            n_batch: 512,
            n_threads: 0,
            prefill_batching: PrefillBatching::Adaptive,
            prefix_reuse: true,
        }
    }
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

/// Async handle to one context; cheap to clone. Dropping the last handle stops the worker and waits
/// for it to free the context (sequences still generating are dropped).
#[derive(Clone)]
pub struct ContextHandle {
    tx: mpsc::UnboundedSender<Command>,
    slots: Arc<SlotPool>,
    config: ContextConfig,
    shape: Arc<StateShape>,
    model: Arc<Model>,
    retired: Arc<AtomicBool>,
    /// The worker's prefill batch size in force ([`ContextHandle::prefill_batch_tokens`]).
    batch_hint: Arc<AtomicUsize>,
    /// Held for its `Drop`: the last handle stops and joins the worker.
    _worker: Arc<WorkerThread>,
}

/// The worker thread, stopped and joined when the last [`ContextHandle`] goes: the llama.cpp
/// context is freed there and then, not while the process exits. A CUDA context freed on the
/// worker thread while `main` returns aborts in the CUDA runtime ("driver shutting down").
struct WorkerThread {
    tx: mpsc::UnboundedSender<Command>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for WorkerThread {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
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
        let retired = Arc::new(AtomicBool::new(false));
        let worker_retired = Arc::clone(&retired);
        let batch_hint = Arc::new(AtomicUsize::new(config.n_batch as usize));
        let worker_hint = Arc::clone(&batch_hint);
        let thread = std::thread::Builder::new()
            .name("exo-engine-ctx".into())
            .spawn(move || {
                worker_main(
                    worker_model,
                    config,
                    rx,
                    ready_tx,
                    worker_retired,
                    worker_hint,
                )
            })
            .map_err(|e| EngineError::ContextCreate(format!("cannot start worker thread: {e}")))?;
        let worker = Arc::new(WorkerThread {
            tx: tx.clone(),
            thread: Some(thread),
        });
        let shape = ready_rx.recv().map_err(|_| EngineError::WorkerGone)??;
        let n = config.layout.n_seq_max as usize;
        let slots = Arc::new(SlotPool::new(n));
        Ok(ContextHandle {
            tx,
            slots,
            config,
            shape: Arc::new(shape),
            model,
            retired,
            batch_hint,
            _worker: worker,
        })
    }

    /// Tokens the next prefill batch takes at most: `n_batch` until batches were timed, then the
    /// size the adaptive policy chose from their timings (`prefill`'s module docs). `exo-router
    /// profile` records it, so the cost model cuts a streamed hand-off's pieces where this engine
    /// does.
    pub fn prefill_batch_tokens(&self) -> usize {
        self.batch_hint.load(Ordering::Relaxed)
    }

    /// Why this context can no longer serve, if it cannot: llama.cpp rejected a KV state and the
    /// context was retired ([`EngineError::ContextRetired`]), or its worker thread is gone
    /// ([`EngineError::WorkerGone`]). A node reports this in `hello`, and the router stops placing
    /// requests on it.
    pub fn fault(&self) -> Option<EngineError> {
        if self.retired.load(Ordering::Relaxed) {
            Some(EngineError::ContextRetired)
        } else if self.tx.is_closed() {
            Some(EngineError::WorkerGone)
        } else {
            None
        }
    }

    /// Waits for a free sequence slot; waiters are served first come, first served. When the lease
    /// is dropped, what runs on the slot stops and its KV is cleared, or kept for prefix reuse.
    pub async fn acquire_slot(&self) -> SlotLease {
        self.slots.acquire(&self.tx, &[]).await
    }

    /// [`Self::acquire_slot`] for a prompt of `tokens`: the free slot whose cache starts the most
    /// like it, so its prefill can reuse that start.
    pub async fn acquire_slot_for(&self, tokens: &[i32]) -> SlotLease {
        self.slots.acquire(&self.tx, tokens).await
    }

    /// Takes a free sequence slot now, or `None` when all are in use.
    pub fn try_acquire_slot(&self) -> Option<SlotLease> {
        self.slots.try_acquire(&self.tx)
    }

    /// Sequence slots not leased right now.
    pub fn free_slots(&self) -> usize {
        self.slots.available()
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

    /// The header of a transfer of sequence `seq`'s cache, holding `tokens`: this context's model,
    /// layout and cache shape, with the link's `codec` and `chunk_size`.
    pub fn transfer_header(
        &self,
        seq: i32,
        tokens: Vec<i32>,
        codec: Codec,
        chunk_size: u32,
    ) -> KvHeader {
        KvHeader {
            fingerprint: self.model.fingerprint(),
            layout: self.config.layout,
            codec,
            chunk_size,
            source_seq: seq,
            tokens,
            shape: StateShape::clone(&self.shape),
        }
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .map_err(|_| EngineError::WorkerGone)?;
        rx.await.map_err(|_| EngineError::WorkerGone)?
    }

    /// Runs the prompt into sequence `seq` (cleared first, but for a start it may reuse: `prefill`'s
    /// module docs) and samples output token 0.
    pub async fn prefill(
        &self,
        seq: i32,
        tokens: Vec<i32>,
        sampling: SamplingParams,
    ) -> Result<PrefillOutput, EngineError> {
        self.prefill_resumed(seq, tokens, 0, sampling, None).await
    }

    /// [`Self::prefill`] or [`Self::prefill_streamed`] (with `stream`: where the pieces go and
    /// how often) of a request that may resume elsewhere's output: the last `resumed` of `tokens`
    /// are its output tokens 0.., already sent to the client by a node that failed; the token
    /// chosen is output number `resumed`, drawn and constrained as that node would have.
    pub async fn prefill_resumed(
        &self,
        seq: i32,
        tokens: Vec<i32>,
        resumed: usize,
        sampling: SamplingParams,
        stream: Option<(mpsc::UnboundedSender<KvPiece>, usize)>,
    ) -> Result<PrefillOutput, EngineError> {
        let stream = stream.map(|(tx, every)| PieceStream {
            tx,
            every: every.max(1),
            sent: 0,
        });
        self.call(|reply| Command::Prefill {
            seq,
            tokens,
            resumed,
            sampling,
            stream,
            reply,
        })
        .await
    }

    /// [`Self::prefill`] for a streamed hand-off: whenever the prompt's batches have added at least
    /// `every` cells since the last piece, the new cells are exported and sent to `pieces` as a
    /// [`KvPiece::Segment`]; in the turn its last batch runs, the whole cache follows as
    /// [`KvPiece::Final`]. `pieces` closes when the prompt ends, early if it fails.
    pub async fn prefill_streamed(
        &self,
        seq: i32,
        tokens: Vec<i32>,
        sampling: SamplingParams,
        pieces: mpsc::UnboundedSender<KvPiece>,
        every: usize,
    ) -> Result<PrefillOutput, EngineError> {
        self.prefill_resumed(seq, tokens, 0, sampling, Some((pieces, every)))
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
    /// nobody listens to `events` any more. `next` itself is not sent as an event.
    pub async fn generate_stream(
        &self,
        seq: i32,
        next: i32,
        index: u32,
        sampling: SamplingParams,
        events: impl EventSink,
    ) -> Result<(), EngineError> {
        self.generate_after(seq, (next, index), Vec::new(), sampling, events)
            .await
    }

    /// [`Self::generate_stream`] for a request whose output tokens before `next` were `history`
    /// (output number `history.len()` is `next`): the constraint and the text continue from
    /// them, as on the node that produced them. Empty `history`: `next` is output token 0.
    pub async fn resume_stream(
        &self,
        seq: i32,
        next: i32,
        history: Vec<i32>,
        sampling: SamplingParams,
        events: impl EventSink,
    ) -> Result<(), EngineError> {
        let index = u32::try_from(history.len())
            .map_err(|_| EngineError::InvalidRequest("output too long".into()))?;
        self.generate_after(seq, (next, index), history, sampling, events)
            .await
    }

    /// Continues sequence `seq` from `next`, output token `index`, after the output `history`.
    async fn generate_after(
        &self,
        seq: i32,
        (next, index): (i32, u32),
        history: Vec<i32>,
        sampling: SamplingParams,
        events: impl EventSink,
    ) -> Result<(), EngineError> {
        self.call(|reply| Command::Generate {
            seq,
            next,
            index,
            history,
            sampling,
            events: Box::new(events),
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
        let (tx, mut rx) = mpsc::unbounded_channel::<GenEvent>();
        let first = self.model.first_output(&[], next, &sampling);
        let mut out = Generated {
            tokens: vec![next],
            text: first.text,
            finish: first.finish.unwrap_or(FinishReason::Length),
        };
        if first.finish.is_some() {
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
