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

use exo_engine::{ChatMessage, ContextHandle, EngineError, SlotLease};
use exo_protocol::{
    LinkSecurity, NodeError, NodeServiceClient, PrefillReply, PrefillRequest, Prompt,
    SamplingParams,
};

mod probe;
mod ship;
use ship::Outbound;
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};

/// Every KV call to a decode node gets this long, plus its bytes' time at [`MIN_LINK_BYTES_PER_S`].
const KV_CALL_BASE: Duration = Duration::from_secs(5);
/// The slowest link a KV call's deadline allows for: 1 MB/s (8 Mbit/s), shared by the chunk calls
/// in flight. A call that does not finish by then is taken for a stalled link: it fails, and the
/// connection is dropped, so later transfers to that decode node open a fresh one instead of
/// queueing behind the stall.
const MIN_LINK_BYTES_PER_S: f64 = 1e6;

/// The deadline of a KV call carrying `bytes` while `in_flight` such calls share the link.
pub(crate) fn kv_call_timeout(bytes: usize, in_flight: usize) -> Duration {
    KV_CALL_BASE + Duration::from_secs_f64((bytes * in_flight.max(1)) as f64 / MIN_LINK_BYTES_PER_S)
}
/// Deadline of the call that tells a decode node a transfer failed.
const ABORT_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections tried for that call.
const ABORT_TRIES: u32 = 6;
/// Wait before the second try of that call; it doubles for each try after (1.55 s in all).
const ABORT_BACKOFF: Duration = Duration::from_millis(50);
/// Most decode-node connections a prefill node keeps.
pub const MAX_PEERS: usize = 64;

/// How a prefill node ships caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShipConfig {
    /// Chunk calls in flight at once per transfer (the decode node reorders them).
    pub chunks_in_flight: usize,
    /// Longest a prompt waits for a free slot before the node answers busy.
    pub queue_timeout: Duration,
    /// Pieces a prompt's cache is shipped in while the prompt runs (each costs an export of the
    /// sequence so far; 1: one export after the prompt, nothing overlapped).
    pub handoff_pieces: u64,
}

impl Default for ShipConfig {
    fn default() -> Self {
        ShipConfig {
            chunks_in_flight: 2,
            queue_timeout: Duration::from_secs(120),
            handoff_pieces: exo_kvcache::HANDOFF_PIECES,
        }
    }
}

/// What a prefill produced when the request continues on this node (colocated).
pub struct LocalContinuation {
    /// The slot holding the prompt's KV cache.
    pub lease: SlotLease,
    /// The output token the prefill sampled.
    pub first_token: i32,
    /// The request's output before it (a resumed request's; empty otherwise).
    pub history: Vec<i32>,
    /// Sampling for the rest of the request.
    pub sampling: SamplingParams,
}

/// The prefill side of a node.
pub struct PrefillNode {
    name: String,
    ctx: ContextHandle,
    ship: ShipConfig,
    /// Connections to decode nodes, by address: at most [`MAX_PEERS`].
    peers: Mutex<HashMap<String, NodeServiceClient>>,
    /// How links to decode nodes are secured: under TLS only a cluster member can be shipped to,
    /// whatever address a request names.
    security: LinkSecurity,
    /// Requests between the start of `prefill` and the end of their KV transfer.
    in_flight: Arc<AtomicUsize>,
    /// One permit per long prompt being prefilled at once ([`long_prompt_permits`]).
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

/// Long prompts (longer than one prefill batch) a node with `slots` slots prefills at once: a
/// quarter of the slots, at least one. More long prompts in the engine finish none of them sooner
/// (their chunks take turns, and on a CPU a batch costs in proportion to its tokens), but each
/// holds a slot that short prompts then wait for: with one of four slots left to them, three chats
/// behind a queue of long prompts took turns at it, short TTFT p99 4.4 s (docs/bench.md).
pub fn long_prompt_permits(slots: usize) -> usize {
    (slots / 4).max(1)
}

impl PrefillNode {
    /// A prefill node called `name` (its metrics label) over `ctx`, shipping caches over links
    /// secured by `security`.
    pub fn new(
        name: &str,
        ctx: ContextHandle,
        ship: ShipConfig,
        security: LinkSecurity,
    ) -> Arc<Self> {
        let long = long_prompt_permits(ctx.config().layout.n_seq_max as usize);
        Arc::new(PrefillNode {
            name: name.to_string(),
            ctx,
            ship,
            peers: Mutex::new(HashMap::new()),
            security,
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
        tokens: &[i32],
    ) -> Result<(SlotLease, Option<OwnedSemaphorePermit>), NodeError> {
        let long = tokens.len() > self.ctx.config().n_batch as usize;
        let wait = async {
            // The semaphore is never closed, so acquiring only waits.
            let permit = if long {
                Arc::clone(&self.long_prompts).acquire_owned().await.ok()
            } else {
                None
            };
            (self.ctx.acquire_slot_for(tokens).await, permit)
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

    /// Renders and tokenizes a prompt; the client's text is plain text, never special tokens
    /// (see `Model::chat_tokens`).
    pub fn tokenize(&self, prompt: &Prompt) -> Result<Vec<i32>, NodeError> {
        let model = self.ctx.model();
        let tokens = match prompt {
            Prompt::Text(t) => model.text_tokens(t),
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
                    .chat_tokens(&msgs, tools.as_ref())
                    .map_err(engine_error)?
            }
        };
        if tokens.is_empty() {
            return Err(NodeError::InvalidRequest("the prompt is empty".into()));
        }
        Ok(tokens)
    }

    /// Counts a prompt of `tokens` that took `took` seconds in the node's prefill metrics.
    fn record_prefill(&self, tokens: usize, took: f64) {
        let node = self.name.clone();
        metrics::counter!("exo_prefill_tokens_total", "node" => node.clone())
            .increment(tokens as u64);
        metrics::histogram!("exo_prefill_seconds", "node" => node.clone()).record(took);
        if took > 0.0 {
            metrics::gauge!("exo_prefill_tokens_per_second", "node" => node)
                .set(tokens as f64 / took);
        }
    }

    /// Runs a request's prompt. With a handoff the cache is shipped to the decode node by a task
    /// that starts with the prompt (pieces go out while it runs) and ends the transfer once token 0
    /// is known; the reply comes back then. Without one the slot is returned for generation here.
    /// A resumed request's earlier output (`request.resume`) follows the prompt, one token per
    /// batch, and the token sampled is the output after it.
    pub async fn prefill(
        self: &Arc<Self>,
        request: PrefillRequest,
    ) -> Result<(PrefillReply, Option<LocalContinuation>), NodeError> {
        let held = self.hold();
        let mut tokens = self.tokenize(&request.prompt)?;
        // A resumed request's earlier output follows its prompt in the cache.
        tokens.extend_from_slice(&request.resume);
        let resume = request.resume;
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
        let (lease, _long_permit) = self.admit(&tokens).await?;
        let sampling = request.sampling;
        let started = Instant::now();
        // With a hand-off the cache leaves for the decode node while the prompt still runs.
        let (stream, shipment) = match request.handoff {
            Some(handoff) => {
                let out = Outbound {
                    id: request.id,
                    handoff,
                    seq: lease.seq(),
                    tokens: &tokens,
                    sampling: sampling.clone(),
                    held,
                };
                let (pieces, every, first) = self.start_shipment(out)?;
                (Some((pieces, every)), Some(first))
            }
            None => (None, None),
        };
        let run =
            self.ctx
                .prefill_resumed(lease.seq(), tokens, resume.len(), sampling.clone(), stream);
        let out = run.await.map_err(engine_error)?;
        // Tokens computed: a start reused from an earlier prompt took no time.
        self.record_prefill(
            out.n_prompt.saturating_sub(out.reused),
            started.elapsed().as_secs_f64(),
        );
        let model = self.ctx.model();
        let first = model.first_output(&resume, out.first_token, &sampling);
        let reply = PrefillReply {
            first_token: out.first_token,
            first_text: first.text,
            n_prompt: out.n_prompt as u32,
            finish: first.finish,
            first_logprob: out.first_logprob.clone(),
        };
        if let Some(shipment) = shipment {
            // The cache was exported in the prompt's last turn: the slot is free now. The
            // shipping task ends the transfer with token 0, or drops it if the request ended.
            drop(lease);
            let index = resume.len() as u32;
            let _ = shipment.send(first.finish.is_none().then_some((out.first_token, index)));
            return Ok((reply, None));
        }
        if first.finish.is_some() {
            return Ok((reply, None));
        }
        Ok((
            reply,
            Some(LocalContinuation {
                lease,
                first_token: out.first_token,
                history: resume,
                sampling,
            }),
        ))
    }
}
