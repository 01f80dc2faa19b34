//! Prefill node: renders and tokenizes a prompt, runs it through llama.cpp, samples output token 0,
//! and ships the KV cache straight to the decode node the router chose.
//!
//! Prompts wait for one of the context's sequence slots, first come, first served. A long prompt
//! (more tokens than one prefill batch) also needs one of `slots - 1` long-prompt permits while it
//! is prefilled, so long prompts never hold every slot: a short prompt that arrives behind a queue
//! of long ones still gets a slot, and the engine runs it first (shortest first).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use exo_engine::{ChatMessage, ContextHandle, EngineError, ExportedKv, SlotLease};
use exo_kvcache::KvEncoder;
use exo_protocol::{
    Handoff, KvBegin, KvFrame, NodeError, NodeServiceClient, PrefillReply, PrefillRequest, Prompt,
    RequestId, SamplingParams, connect, context_with_deadline,
};
use futures::{StreamExt, TryStreamExt};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};

/// Deadline of one KV call to a decode node.
const KV_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline of the call that tells a decode node a transfer failed.
const ABORT_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections tried for that call.
const ABORT_TRIES: usize = 3;

/// How a prefill node ships caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShipConfig {
    /// Chunk calls in flight at once per transfer (the decode node reorders them).
    pub chunks_in_flight: usize,
    /// Longest a prompt waits for a free slot before the node answers busy.
    pub queue_timeout: Duration,
}

impl Default for ShipConfig {
    fn default() -> Self {
        ShipConfig {
            chunks_in_flight: 2,
            queue_timeout: Duration::from_secs(120),
        }
    }
}

/// What a prefill produced when the request continues on this node (colocated).
pub struct LocalContinuation {
    /// The slot holding the prompt's KV cache.
    pub lease: SlotLease,
    /// Output token 0.
    pub first_token: i32,
    /// Sampling for the rest of the request.
    pub sampling: SamplingParams,
}

/// The prefill side of a node.
pub struct PrefillNode {
    name: String,
    ctx: ContextHandle,
    ship: ShipConfig,
    peers: Mutex<HashMap<String, NodeServiceClient>>,
    /// Requests between the start of `prefill` and the end of their KV transfer.
    in_flight: Arc<AtomicUsize>,
    /// One permit per long prompt being prefilled at once: one fewer than the slots (at least one).
    long_prompts: Arc<Semaphore>,
}

/// One request counted in [`PrefillNode::in_flight`] while it lives.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn engine_error(e: EngineError) -> NodeError {
    match e {
        EngineError::InvalidRequest(m) | EngineError::Prompt(m) => NodeError::InvalidRequest(m),
        other => NodeError::Engine(other.to_string()),
    }
}

impl PrefillNode {
    /// A prefill node called `name` (its metrics label) over `ctx`.
    pub fn new(name: &str, ctx: ContextHandle, ship: ShipConfig) -> Arc<Self> {
        let long = (ctx.config().layout.n_seq_max as usize)
            .saturating_sub(1)
            .max(1);
        Arc::new(PrefillNode {
            name: name.to_string(),
            ctx,
            ship,
            peers: Mutex::new(HashMap::new()),
            in_flight: Arc::new(AtomicUsize::new(0)),
            long_prompts: Arc::new(Semaphore::new(long)),
        })
    }

    /// Long-prompt permits not taken right now.
    pub fn free_long_prompt_permits(&self) -> usize {
        self.long_prompts.available_permits()
    }

    /// Waits for what a prompt of `n_tokens` needs to start: a long-prompt permit if it is longer
    /// than one prefill batch, then a slot; busy after the queue timeout.
    async fn admit(
        &self,
        n_tokens: usize,
    ) -> Result<(SlotLease, Option<OwnedSemaphorePermit>), NodeError> {
        let long = n_tokens > self.ctx.config().n_batch as usize;
        let wait = async {
            // The semaphore is never closed, so acquiring only waits.
            let permit = if long {
                Arc::clone(&self.long_prompts).acquire_owned().await.ok()
            } else {
                None
            };
            (self.ctx.acquire_slot().await, permit)
        };
        tokio::time::timeout(self.ship.queue_timeout, wait)
            .await
            .map_err(|_| NodeError::Busy)
    }

    /// Requests this node is working on: waiting for a slot, prefilling, or shipping their cache.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn hold(&self) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(&self.in_flight))
    }

    /// The engine context.
    pub fn context(&self) -> &ContextHandle {
        &self.ctx
    }

    /// Renders and tokenizes a prompt.
    pub fn tokenize(&self, prompt: &Prompt) -> Result<Vec<i32>, NodeError> {
        let model = self.ctx.model();
        let text = match prompt {
            Prompt::Text(t) => t.clone(),
            Prompt::Chat(chat) => {
                if chat.turns.is_empty() {
                    return Err(NodeError::InvalidRequest(
                        "messages must not be empty".into(),
                    ));
                }
                let json = |what: &str, text: &str| {
                    serde_json::from_str::<serde_json::Value>(text)
                        .map_err(|e| NodeError::InvalidRequest(format!("{what} is not JSON: {e}")))
                };
                let msgs = chat
                    .turns
                    .iter()
                    .map(|t| {
                        Ok(ChatMessage {
                            role: t.role.clone(),
                            content: t.content.clone(),
                            tool_calls: t
                                .tool_calls
                                .as_deref()
                                .map(|c| json("tool_calls", c))
                                .transpose()?,
                            tool_call_id: t.tool_call_id.clone(),
                        })
                    })
                    .collect::<Result<Vec<_>, NodeError>>()?;
                let tools = chat
                    .tools
                    .as_deref()
                    .map(|t| json("tools", t))
                    .transpose()?;
                model
                    .chat_prompt(&msgs, tools.as_ref())
                    .map_err(engine_error)?
            }
        };
        let tokens = model.tokenize(&text, true);
        if tokens.is_empty() {
            return Err(NodeError::InvalidRequest("the prompt is empty".into()));
        }
        Ok(tokens)
    }

    /// Runs a request's prompt. With a handoff the cache is shipped to the decode node on a task and the
    /// reply comes back at once; without one the slot is returned for generation here.
    pub async fn prefill(
        self: &Arc<Self>,
        request: PrefillRequest,
    ) -> Result<(PrefillReply, Option<LocalContinuation>), NodeError> {
        let held = self.hold();
        let tokens = self.tokenize(&request.prompt)?;
        let own = self.ctx.config().layout.n_ctx_seq;
        let limit = request
            .handoff
            .as_ref()
            .map_or(own, |h| h.context_limit.min(own))
            .saturating_sub(1);
        if tokens.len() > limit as usize {
            return Err(NodeError::ContextLength {
                tokens: tokens.len() as u32,
                limit,
            });
        }
        // Held until the prompt is prefilled (and its cache exported): then it is no longer a prompt.
        let (lease, _long_permit) = self.admit(tokens.len()).await?;
        let sampling = request.sampling;
        let started = Instant::now();
        // With a hand-off the cache is exported in the same worker turn the prompt finishes in.
        let run = if request.handoff.is_some() {
            self.ctx
                .prefill_export(lease.seq(), tokens, sampling.clone())
                .await
        } else {
            self.ctx
                .prefill(lease.seq(), tokens, sampling.clone())
                .await
        };
        let mut out = run.map_err(engine_error)?;
        let took = started.elapsed().as_secs_f64();
        let node = self.name.clone();
        metrics::counter!("exo_prefill_tokens_total", "node" => node.clone())
            .increment(out.n_prompt as u64);
        metrics::histogram!("exo_prefill_seconds", "node" => node.clone()).record(took);
        if took > 0.0 {
            metrics::gauge!("exo_prefill_tokens_per_second", "node" => node)
                .set(out.n_prompt as f64 / took);
        }
        let model = self.ctx.model();
        let first = model.first_output(out.first_token, &sampling);
        let reply = PrefillReply {
            first_token: out.first_token,
            first_text: first.text,
            n_prompt: out.n_prompt as u32,
            finish: first.finish,
        };
        if first.finish.is_some() {
            return Ok((reply, None));
        }
        match request.handoff {
            None => Ok((
                reply,
                Some(LocalContinuation {
                    lease,
                    first_token: out.first_token,
                    sampling,
                }),
            )),
            Some(handoff) => {
                let kv = out.kv.take().ok_or_else(|| {
                    NodeError::Engine("the prefill returned no cache to hand off".into())
                })?;
                drop(lease);
                let first_token = out.first_token;
                self.hand_off(request.id, kv, handoff, first_token, sampling, held);
                Ok((reply, None))
            }
        }
    }

    /// Frames the prompt's exported cache and ships it to the decode node on a task of its own,
    /// which keeps the request counted (`held`) until done. Returns at once, so output token 0
    /// reaches the client before the cache is encoded or on the wire; a failure from here on
    /// reaches the client through the decode node ([`Self::abort`]).
    fn hand_off(
        self: &Arc<Self>,
        id: RequestId,
        kv: ExportedKv,
        handoff: Handoff,
        first_token: i32,
        sampling: SamplingParams,
        held: InFlight,
    ) {
        metrics::counter!("exo_kv_exported_bytes_total", "node" => self.name.clone())
            .increment(kv.state.len() as u64);
        let (fingerprint, layout) = (self.ctx.model().fingerprint(), self.ctx.config().layout);
        let (codec, chunk_size) = (handoff.codec, handoff.chunk_size);
        let node = Arc::clone(self);
        tokio::spawn(async move {
            let _held = held;
            // Checksums and compression run on a blocking thread, not on the async threads.
            let encode =
                move || KvEncoder::new(kv.state, kv.tokens, fingerprint, layout, codec, chunk_size);
            let shipped = match tokio::task::spawn_blocking(encode).await {
                Err(e) => Err(NodeError::Transfer(format!("encoding stopped: {e}"))),
                Ok(Err(e)) => Err(NodeError::Transfer(e.to_string())),
                Ok(Ok(encoder)) => {
                    node.ship(id, &handoff, encoder, first_token, sampling)
                        .await
                }
            };
            if let Err(e) = shipped {
                tracing::warn!(%id, decode = %handoff.decode_addr, error = %e, "KV transfer failed");
                node.abort(id, &handoff.decode_addr, e).await;
            }
        });
    }

    /// Tells the decode node at `addr` that request `id`'s transfer failed with `error`, so the
    /// request fails there now (and the router's poll returns the reason) rather than at the decode
    /// node's transfer timeout. Best effort, on up to [`ABORT_TRIES`] fresh connections (the
    /// cached one may be what broke; the next transfer reuses the new one): an unreachable decode
    /// node is the router's to notice.
    async fn abort(&self, id: RequestId, addr: &str, error: NodeError) {
        let reason = match error {
            NodeError::Transfer(why) => format!("from prefill node {}: {why}", self.name),
            other => format!("from prefill node {}: {other}", self.name),
        };
        for _ in 0..ABORT_TRIES {
            self.peers.lock().await.remove(addr);
            let sent = match self.client(addr).await {
                Ok(c) => c
                    .kv_abort(context_with_deadline(ABORT_TIMEOUT), id, reason.clone())
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match sent {
                Ok(()) => return,
                Err(e) => {
                    tracing::debug!(%id, decode = %addr, error = %e, "could not abort the transfer")
                }
            }
        }
    }

    /// The cached connection to decode node `addr`, made if there is none. The map is not locked
    /// while connecting, so one unreachable decode node does not hold up shipping to the others.
    async fn client(&self, addr: &str) -> Result<NodeServiceClient, NodeError> {
        if let Some(c) = self.peers.lock().await.get(addr) {
            return Ok(c.clone());
        }
        let c = connect(addr)
            .await
            .map_err(|e| NodeError::Transfer(format!("cannot reach decode node {addr}: {e}")))?;
        Ok(self
            .peers
            .lock()
            .await
            .entry(addr.to_string())
            .or_insert(c)
            .clone())
    }

    /// Sends the header, then the chunks with up to `chunks_in_flight` calls outstanding.
    async fn ship(
        &self,
        id: RequestId,
        handoff: &Handoff,
        encoder: KvEncoder<Vec<u8>>,
        first_token: i32,
        sampling: SamplingParams,
    ) -> Result<(), NodeError> {
        let started = Instant::now();
        let (raw, wire) = (encoder.header().raw_len, encoder.header().encoded_len);
        let client = self.client(&handoff.decode_addr).await?;
        let rpc = |e: tarpc::client::RpcError| NodeError::Transfer(e.to_string());
        let begin = KvBegin {
            id,
            header: encoder.header_frame(),
            first_token,
            sampling,
        };
        client
            .kv_begin(context_with_deadline(KV_CALL_TIMEOUT), begin)
            .await
            .map_err(rpc)??;
        let depth = self.ship.chunks_in_flight.max(1);
        // A blocking thread frames the chunks (a checksum each, a copy when uncompressed), at most
        // `depth` ahead of the calls; it stops when the receiver goes (a failed call).
        let (frames_tx, frames_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(depth);
        tokio::task::spawn_blocking(move || {
            for frame in encoder {
                if frames_tx.blocking_send(frame).is_err() {
                    break;
                }
            }
        });
        let frames = futures::stream::unfold(frames_rx, |mut rx| async move {
            rx.recv().await.map(|frame| (frame, rx))
        });
        frames
            .map(|bytes| {
                let client = client.clone();
                async move {
                    client
                        .kv_chunk(
                            context_with_deadline(KV_CALL_TIMEOUT),
                            KvFrame { id, bytes },
                        )
                        .await
                        .map_err(rpc)?
                }
            })
            .buffered(depth)
            .try_collect::<Vec<()>>()
            .await?;
        let node = self.name.clone();
        metrics::counter!("exo_kv_wire_bytes_total", "node" => node.clone()).increment(wire);
        metrics::histogram!("exo_kv_transfer_seconds", "node" => node.clone())
            .record(started.elapsed().as_secs_f64());
        if wire > 0 {
            metrics::gauge!("exo_kv_compression_ratio", "node" => node)
                .set(raw as f64 / wire as f64);
        }
        Ok(())
    }
}
