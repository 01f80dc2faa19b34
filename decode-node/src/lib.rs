//! Decode node: receives KV caches, imports them into free sequence slots, generates, and hands the
//! output to whoever polls for it.
//!
//! Each request has an entry keyed by its id. The entry is created by whichever arrives first: the
//! transfer's `kv_begin` (from the prefill node) or the router's first `poll`. Chunks may arrive out of
//! order when several are in flight; they are reordered within a bounded window and fed to the
//! [`KvDecoder`] in order, on blocking threads under the transfer's own lock (decompression and
//! checksums never run on the async threads or under the map lock every poll takes). Chunks arrive
//! while the prompt is still running on the prefill node; its `kv_end` (the end frame and output
//! token 0) follows the last one, and then the cache is checked whole, imported into a free slot
//! and generation starts; its events queue in the entry until polled. Dropping the entry (cancel, finish, or a timeout) stops generation at the
//! next token and frees the slot.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use exo_engine::{ContextHandle, EventSink, GenEvent, SlotLease, resumed_output};
use exo_kvcache::{DecodeLimits, ImportTarget, KvDecoder};
use exo_protocol::{KvBegin, KvEnd, KvFrame, NodeError, PollReply, RequestId, SamplingParams};
use tokio::sync::mpsc;

mod transfer;
pub use transfer::MAX_PARKED_BYTES;
use transfer::Transfer;

/// Requests a node knows at most, per sequence slot (plus [`EXTRA_REQUESTS`]): enough for a full
/// node with transfers queued behind it, few enough that polls or transfers for made-up ids
/// cannot grow the table without bound.
pub const REQUESTS_PER_SLOT: usize = 4;
/// Requests a node knows beyond [`REQUESTS_PER_SLOT`] per slot.
pub const EXTRA_REQUESTS: usize = 16;
/// Ended requests remembered at most (to refuse their late transfers).
pub const MAX_ENDED: usize = 4096;

/// Timeouts of a decode node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeTimeouts {
    /// A transfer (or a polled request whose transfer never began) with no progress for this long fails.
    pub transfer: Duration,
    /// A request nobody polled for this long is cancelled (its router went away). A cache still
    /// arriving before the router's first poll is judged by `transfer` instead (a long prompt
    /// ships for as long as it runs), and a request's idle clock starts no earlier than its
    /// transfer's end.
    pub idle: Duration,
}

impl Default for DecodeTimeouts {
    fn default() -> Self {
        DecodeTimeouts {
            transfer: Duration::from_secs(60),
            idle: Duration::from_secs(60),
        }
    }
}

type Event = Result<GenEvent, NodeError>;

/// The connection a call arrived on, as the node server numbers them. A transfer's chunks and
/// end frame are accepted only on the connection that began it: a peer that learnt a request's
/// id cannot write into its cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinkId(pub u64);

enum Stage {
    /// Polled, but no transfer has begun.
    Waiting,
    /// Chunks arriving. The transfer has a lock of its own: chunks are checked and decompressed
    /// under it on blocking threads, never under the node-wide map lock that polls take.
    Receiving(Arc<Mutex<Transfer>>),
    /// Imported (or prefilled here) and generating, or failed with the error queued: no transfer
    /// is expected any more.
    Running,
}

/// Locks `m`, whatever an earlier holder's panic left: the data is only ever replaced whole.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Entry {
    stage: Stage,
    /// Bytes the transfer may come to hold (its declared state plus parked chunks), counted
    /// against the node's budget while it is receiving.
    promised: usize,
    /// The connection that began the transfer, once one did.
    kv_link: Option<LinkId>,
    /// The connection that polls the request (the router's): the first to poll it, or the one
    /// that ran a colocated prompt here. Polls and cancels on another are not served.
    poll_link: Option<LinkId>,
    tx: mpsc::UnboundedSender<Event>,
    rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Event>>>,
    last_progress: Instant,
    last_poll: Instant,
    /// The transfer's wire bytes once it ended, until a poll reports them.
    kv_wire_bytes: Option<u64>,
}

impl Entry {
    fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let now = Instant::now();
        Entry {
            stage: Stage::Waiting,
            promised: 0,
            kv_link: None,
            poll_link: None,
            tx,
            rx: Arc::new(tokio::sync::Mutex::new(rx)),
            last_progress: now,
            last_poll: now,
            kv_wire_bytes: None,
        }
    }

    /// Fails the request with `error`, queued for the router's next poll, unless its transfer is
    /// already over (cache imported, or failed before): then this is stale and changes nothing.
    fn fail(&mut self, error: NodeError) {
        if !matches!(self.stage, Stage::Running) {
            let _ = self.tx.send(Err(error));
            self.stage = Stage::Running;
            self.promised = 0;
            self.last_poll = Instant::now();
        }
    }
}

/// The engine's events for one request, put straight into the request's entry (and counted) on
/// the engine thread as they are made. When the entry is gone (cancelled, timed out) nobody
/// listens, and the engine drops the sequence before its next token.
struct EntrySink {
    tx: mpsc::UnboundedSender<Event>,
    tokens: metrics::Counter,
}

impl EventSink for EntrySink {
    fn send(&mut self, event: GenEvent) -> bool {
        if matches!(event, GenEvent::Token { .. }) {
            self.tokens.increment(1);
        }
        self.tx.send(Ok(event)).is_ok()
    }

    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// The decode side of a node: transfers in, tokens out.
pub struct DecodeNode {
    name: String,
    ctx: ContextHandle,
    limits: DecodeLimits,
    timeouts: DecodeTimeouts,
    requests: Mutex<HashMap<RequestId, Entry>>,
    /// Requests cancelled or ended recently: a transfer (or an abort) for one of them that
    /// arrives late is refused, instead of making a new entry nobody will poll.
    ended: Mutex<HashMap<RequestId, Instant>>,
    /// Most requests known at once ([`REQUESTS_PER_SLOT`] per slot, plus [`EXTRA_REQUESTS`]).
    max_requests: usize,
    /// Bytes all transfers together may come to hold: two caches per slot of the largest state
    /// the limits admit, each with its parked chunks.
    budget: usize,
}

impl DecodeNode {
    /// A decode node called `name` (its metrics label) over `ctx`; call [`DecodeNode::run_reaper`] on a task to enforce the timeouts.
    pub fn new(
        name: &str,
        ctx: ContextHandle,
        limits: DecodeLimits,
        timeouts: DecodeTimeouts,
    ) -> Arc<Self> {
        let slots = ctx.config().layout.n_seq_max as usize;
        let per_transfer = usize::try_from(limits.max_state_bytes)
            .unwrap_or(usize::MAX)
            .saturating_add(MAX_PARKED_BYTES);
        Arc::new(DecodeNode {
            name: name.to_string(),
            ctx,
            limits,
            timeouts,
            requests: Mutex::new(HashMap::new()),
            ended: Mutex::new(HashMap::new()),
            max_requests: slots * REQUESTS_PER_SLOT + EXTRA_REQUESTS,
            budget: per_transfer.saturating_mul(2 * slots.max(1)),
        })
    }

    /// The engine context.
    pub fn context(&self) -> &ContextHandle {
        &self.ctx
    }

    /// Requests known to this node (receiving, generating or waiting to be polled).
    pub fn active_requests(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RequestId, Entry>> {
        lock(&self.requests)
    }

    /// Starts a transfer: checks the header against this node's model, layout and limits.
    pub fn kv_begin(self: &Arc<Self>, begin: KvBegin, from: LinkId) -> Result<(), NodeError> {
        let target = ImportTarget {
            fingerprint: self.ctx.model().fingerprint(),
            layout: self.ctx.config().layout,
        };
        if self.has_ended(begin.id) {
            return Err(NodeError::UnknownRequest(begin.id));
        }
        let decoder = match KvDecoder::new(&begin.header, &self.limits, &target) {
            Ok(d) => d,
            Err(e) => {
                // The request cannot go on: say why to whoever polls it, now.
                let e = NodeError::Transfer(e.to_string());
                self.fail_transfer(begin.id, e.clone());
                return Err(e);
            }
        };
        // The full cache, and an iSWA model's window cache (at most the model's window of cells).
        let header = decoder.header();
        let promised = header
            .shape
            .max_state_len(header.tokens.len(), self.ctx.model().sliding_window())
            .unwrap_or(usize::MAX)
            .saturating_add(MAX_PARKED_BYTES);
        let mut map = self.lock();
        let held: usize = map.values().map(|e| e.promised).sum();
        if held.saturating_add(promised) > self.budget {
            tracing::warn!(id = %begin.id, held, promised, budget = self.budget, "KV transfer refused: the node's transfer budget is spent");
            return Err(NodeError::Busy);
        }
        let entry = self.entry(&mut map, begin.id)?;
        if !matches!(entry.stage, Stage::Waiting) {
            return Err(NodeError::Transfer(format!(
                "request {} already has a transfer",
                begin.id
            )));
        }
        entry.promised = promised;
        entry.kv_link = Some(from);
        entry.stage = Stage::Receiving(Arc::new(Mutex::new(Transfer {
            decoder: Some(Box::new(decoder)),
            sampling: begin.sampling,
            ahead: BTreeMap::new(),
            wire_bytes: begin.header.len() as u64,
        })));
        entry.last_progress = Instant::now();
        Ok(())
    }

    /// Request `id`'s entry, made if the node has room for one more request (else `Busy`).
    fn entry<'m>(
        &self,
        map: &'m mut HashMap<RequestId, Entry>,
        id: RequestId,
    ) -> Result<&'m mut Entry, NodeError> {
        if !map.contains_key(&id) && map.len() >= self.max_requests {
            tracing::warn!(%id, limit = self.max_requests, "request refused: the node knows too many requests");
            return Err(NodeError::Busy);
        }
        Ok(map.entry(id).or_insert_with(Entry::new))
    }

    /// The prefill node gave up on request `id`'s transfer: the request fails now with `reason`.
    pub fn kv_abort(&self, id: RequestId, reason: String) {
        if !self.has_ended(id) {
            tracing::debug!(%id, %reason, "transfer aborted by the prefill node");
            self.fail_transfer(id, NodeError::Transfer(reason));
        }
    }

    /// Fails request `id`'s transfer with `error` ([`Entry::fail`]), making the entry if the
    /// router has not polled yet.
    fn fail_transfer(&self, id: RequestId, error: NodeError) {
        let mut map = self.lock();
        if let Ok(entry) = self.entry(&mut map, id) {
            entry.fail(error);
        }
    }

    fn has_ended(&self, id: RequestId) -> bool {
        lock(&self.ended).contains_key(&id)
    }

    /// Accepts one chunk (in any order within the reorder window) on the connection that began the
    /// transfer (another gets `UnknownRequest`). The chunk is checked and decompressed on a
    /// blocking thread under its transfer's own lock. A refused chunk fails the request.
    pub async fn kv_chunk(self: &Arc<Self>, frame: KvFrame, from: LinkId) -> Result<(), NodeError> {
        let id = frame.id;
        let transfer = {
            let mut map = self.lock();
            let entry = map
                .get_mut(&id)
                .filter(|e| e.kv_link == Some(from))
                .ok_or(NodeError::UnknownRequest(id))?;
            let Stage::Receiving(transfer) = &entry.stage else {
                return Err(NodeError::Transfer("no transfer in progress".into()));
            };
            entry.last_progress = Instant::now();
            Arc::clone(transfer)
        };
        let accepted =
            tokio::task::spawn_blocking(move || lock(&transfer).accept(frame.bytes)).await;
        let accepted = accepted
            .map_err(|e| NodeError::Transfer(format!("chunk check failed: {e}")))
            .and_then(|r| r);
        match accepted {
            Ok(()) => {
                if let Some(entry) = self.lock().get_mut(&id) {
                    entry.last_progress = Instant::now();
                }
                Ok(())
            }
            Err(e) => {
                self.fail_transfer(id, e.clone());
                Err(e)
            }
        }
    }

    /// Ends a transfer (on the connection that began it): the state is checked whole against the
    /// end frame, imported into a free slot, and generation starts from `first_token`, on a task.
    pub fn kv_end(self: &Arc<Self>, end: KvEnd, from: LinkId) -> Result<(), NodeError> {
        let mut map = self.lock();
        let entry = map
            .get_mut(&end.id)
            .filter(|e| e.kv_link == Some(from))
            .ok_or(NodeError::UnknownRequest(end.id))?;
        if !matches!(entry.stage, Stage::Receiving(_)) {
            return Err(NodeError::Transfer("no transfer in progress".into()));
        }
        entry.last_progress = Instant::now();
        if entry.poll_link.is_none() {
            // The idle clock of a request nobody polled yet starts when it can produce output.
            entry.last_poll = Instant::now();
        }
        self.start_import(end.id, entry, end.frame, (end.first_token, end.index));
        Ok(())
    }

    /// The transfer ended: finish it with `end_frame`, import into a free slot and generate from
    /// `first_token`, output number `index` (the output before it is the cache's last `index`
    /// tokens), on a task.
    fn start_import(
        self: &Arc<Self>,
        id: RequestId,
        entry: &mut Entry,
        end_frame: Vec<u8>,
        (first_token, index): (i32, u32),
    ) {
        let Stage::Receiving(transfer) = std::mem::replace(&mut entry.stage, Stage::Running) else {
            return;
        };
        entry.promised = 0;
        entry.kv_wire_bytes = Some(lock(&transfer).wire_bytes + end_frame.len() as u64);
        let tx = entry.tx.clone();
        let node = Arc::clone(self);
        tokio::spawn(async move {
            // The whole-state checksum runs on a blocking thread.
            let (decoded, sampling) = {
                let mut t = lock(&transfer);
                let decoder = t.decoder.take();
                let finish = move || decoder.map(|d| d.finish(&end_frame));
                (tokio::task::spawn_blocking(finish), t.sampling.clone())
            };
            let kv = match decoded.await {
                Ok(Some(Ok(kv))) => kv,
                Ok(Some(Err(e))) => {
                    let _ = tx.send(Err(NodeError::Transfer(e.to_string())));
                    return;
                }
                Ok(None) | Err(_) => {
                    let why = "the transfer's decoder was lost";
                    let _ = tx.send(Err(NodeError::Transfer(why.into())));
                    return;
                }
            };
            let tokens = &kv.header.tokens;
            let Some(history) = resumed_output(tokens, index as usize).map(<[i32]>::to_vec) else {
                let why = format!(
                    "output index {index} outside a cache of {} tokens",
                    tokens.len()
                );
                let _ = tx.send(Err(NodeError::Transfer(why)));
                return;
            };
            // Wait for a slot (first come, first served) rather than fail while all are busy.
            let Ok(lease) =
                tokio::time::timeout(node.timeouts.transfer, node.ctx.acquire_slot()).await
            else {
                let _ = tx.send(Err(NodeError::Busy));
                return;
            };
            if let Err(e) = node.ctx.import(lease.seq(), kv).await {
                let _ = tx.send(Err(NodeError::Transfer(e.to_string())));
                return;
            }
            tracing::debug!(%id, seq = lease.seq(), index, "KV imported, generating");
            node.generate(lease, (first_token, history), sampling, tx)
                .await;
        });
    }

    /// Continues a request whose prompt was prefilled in `lease` on this node's own context
    /// (colocated), from output token `first_token` after the earlier output `history`.
    pub fn start_local(
        self: &Arc<Self>,
        id: RequestId,
        lease: SlotLease,
        (first_token, history): (i32, Vec<i32>),
        sampling: SamplingParams,
        from: LinkId,
    ) {
        let mut entry = Entry::new();
        entry.stage = Stage::Running;
        entry.poll_link = Some(from);
        let tx = entry.tx.clone();
        self.lock().insert(id, entry);
        let node = Arc::clone(self);
        tokio::spawn(async move {
            node.generate(lease, (first_token, history), sampling, tx)
                .await
        });
    }

    async fn generate(
        &self,
        lease: SlotLease,
        (first_token, history): (i32, Vec<i32>),
        sampling: SamplingParams,
        out: mpsc::UnboundedSender<Event>,
    ) {
        let active = metrics::gauge!("exo_decode_active_sequences", "node" => self.name.clone());
        active.increment(1.0);
        let sink = EntrySink {
            tx: out.clone(),
            tokens: metrics::counter!("exo_decode_tokens_total", "node" => self.name.clone()),
        };
        let run = self
            .ctx
            .resume_stream(lease.seq(), first_token, history, sampling, sink);
        if let Err(e) = run.await {
            let _ = out.send(Err(NodeError::Engine(e.to_string())));
        }
        active.decrement(1.0);
        drop(lease);
    }

    /// Waits up to `wait` for output of request `id` and returns everything available. The request is
    /// forgotten once its final reply (finish or error) has been returned. The first connection
    /// to poll a request (or the one that prefilled it here) is the only one served: on another,
    /// the request is unknown.
    pub async fn poll(
        &self,
        id: RequestId,
        wait: Duration,
        from: LinkId,
    ) -> Result<PollReply, NodeError> {
        let (rx, kv_wire_bytes) = {
            let mut map = self.lock();
            let entry = self.entry(&mut map, id)?;
            if *entry.poll_link.get_or_insert(from) != from {
                return Err(NodeError::UnknownRequest(id));
            }
            entry.last_poll = Instant::now();
            (Arc::clone(&entry.rx), entry.kv_wire_bytes.take())
        };
        let mut rx = rx.lock().await;
        let mut reply = PollReply {
            kv_wire_bytes,
            ..PollReply::default()
        };
        let mut events = Vec::new();
        if let Ok(Some(ev)) = tokio::time::timeout(wait, rx.recv()).await {
            events.push(ev);
            while let Ok(ev) = rx.try_recv() {
                events.push(ev);
            }
        }
        for ev in events {
            match ev {
                Ok(GenEvent::Token {
                    id, text, logprob, ..
                }) => {
                    reply.text += &text;
                    reply.tokens.push(id);
                    reply.logprobs.extend(logprob);
                }
                Ok(GenEvent::Done { finish, tail }) => {
                    reply.text += &tail;
                    reply.finish = Some(finish);
                }
                Err(e) => {
                    self.forget(id);
                    return Err(e);
                }
            }
        }
        if reply.finish.is_some() {
            self.forget(id);
        }
        Ok(reply)
    }

    /// Drops request `id`'s entry (after its final reply, or on cancel), remembering it as
    /// ended; true if there was one.
    fn forget(&self, id: RequestId) -> bool {
        // Remembered as ended before the entry goes, so a transfer arriving in between is refused.
        // A cancel for an id never seen is remembered only while there is room: made-up ids
        // cannot grow the table.
        let known = self.lock().contains_key(&id);
        {
            let mut ended = lock(&self.ended);
            if known || ended.len() < MAX_ENDED {
                ended.insert(id, Instant::now());
            }
        }
        self.lock().remove(&id).is_some()
    }

    /// Stops request `id`: generation ends before its next token and the slot is freed. A cancel
    /// on a connection other than the one that polls the request is ignored.
    pub fn cancel(&self, id: RequestId, from: LinkId) {
        let foreign = self
            .lock()
            .get(&id)
            .is_some_and(|e| e.poll_link.is_some_and(|l| l != from));
        if foreign {
            tracing::debug!(%id, "cancel refused: not from the connection that polls the request");
            return;
        }
        if self.forget(id) {
            tracing::debug!(%id, "request cancelled");
        }
    }

    /// What this node holds right now, published as gauges (labelled with the node's name):
    /// `exo_decode_slots_in_use` (sequence slots leased), `exo_kv_transfers_pending` (requests
    /// whose cache is awaited or arriving) and `exo_kv_bytes_held` (their bytes received so far).
    /// After every request has ended, all three are 0: anything else is a stranded resource.
    pub fn publish_holdings(&self) {
        let (pending, bytes) = {
            let map = self.lock();
            map.values()
                .fold((0usize, 0usize), |(n, b), e| match &e.stage {
                    Stage::Waiting => (n + 1, b),
                    // A transfer busy with a chunk is counted without its bytes this time.
                    Stage::Receiving(t) => {
                        let held = t.try_lock().map_or(0, |t| t.bytes_held());
                        (n + 1, b + held)
                    }
                    Stage::Running => (n, b),
                })
        };
        let slots = self.ctx.config().layout.n_seq_max as usize;
        let in_use = slots.saturating_sub(self.ctx.free_slots());
        let node = self.name.clone();
        metrics::gauge!("exo_decode_slots_in_use", "node" => node.clone()).set(in_use as f64);
        metrics::gauge!("exo_kv_transfers_pending", "node" => node.clone()).set(pending as f64);
        metrics::gauge!("exo_kv_bytes_held", "node" => node).set(bytes as f64);
    }

    /// Enforces the timeouts every second until the node is dropped elsewhere, and publishes
    /// what the node holds ([`DecodeNode::publish_holdings`]) on the same tick.
    pub async fn run_reaper(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let now = Instant::now();
            let mut map = self.lock();
            map.retain(|id, e| {
                let stalled = !matches!(e.stage, Stage::Running)
                    && now - e.last_progress > self.timeouts.transfer;
                if stalled {
                    tracing::warn!(%id, "KV transfer timed out");
                    e.fail(NodeError::Transfer("transfer timed out".into()));
                }
                // A cache still arriving that the router has not polled yet (it polls once the
                // prompt's first token is out) is the transfer timeout's to judge, however long
                // the prompt runs.
                let unpolled_transfer =
                    e.poll_link.is_none() && matches!(e.stage, Stage::Receiving(_));
                let idle = !unpolled_transfer && now - e.last_poll > self.timeouts.idle;
                if idle {
                    tracing::warn!(%id, "request not polled for too long; cancelling");
                }
                !idle
            });
            drop(map);
            lock(&self.ended).retain(|_, at| now - *at <= self.timeouts.transfer);
            self.publish_holdings();
            if Arc::strong_count(&self) == 1 {
                return;
            }
        }
    }
}
