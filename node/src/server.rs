//! The node RPC service: one engine context serving the prefill side, the decode side, or both,
//! as the node's role says; calls for a side the node lacks are refused with `WrongRole`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use exo_decode_node::{DecodeNode, DecodeTimeouts, LinkId};
use exo_engine::{ContextConfig, ContextHandle, Model, Offload};
use exo_kvcache::DecodeLimits;
use exo_prefill_node::{PrefillNode, ShipConfig};
use exo_protocol::{
    HardwareFacts, KvBegin, KvEnd, KvFrame, LinkProbe, LinkSecurity, MAX_MODEL_PART, ModelPart,
    NodeError, NodeInfo, NodePerf, NodeService, PollReply, PrefillReply, PrefillRequest, Prompt,
    RequestId, Role, ToolSyntax,
};
use futures::StreamExt;
use tarpc::context::Context;
use tarpc::server::{BaseChannel, Channel};
use tokio::net::TcpListener;

/// The longest a `poll` call waits for output.
const MAX_POLL_WAIT: Duration = Duration::from_secs(5);

/// How to start a node.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Node name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// The engine context: KV layout (`n_seq_max` is the number of sequence slots), CPU threads
    /// (0: every core; nodes that share a machine should get disjoint budgets, or their thread
    /// teams slow each other down), prefix reuse.
    pub context: ContextConfig,
    /// Chunk calls in flight when shipping a cache.
    pub chunks_in_flight: usize,
    /// Pieces a prefill node ships a prompt's cache in while the prompt runs (1: after it).
    pub handoff_pieces: u64,
    /// A decode node fails a KV transfer that makes no progress for this long.
    pub transfer_timeout: Duration,
    /// How its links (served and made) are secured: mutual TLS with the cluster file, or plain.
    pub security: LinkSecurity,
    /// Its measured speed, reported in `hello` (`node --measure`).
    pub perf: Option<NodePerf>,
}

/// The node RPC service: dispatches each call to the prefill or decode side the node has.
#[derive(Clone)]
pub struct NodeServer {
    info: Arc<NodeInfo>,
    prefill: Option<Arc<PrefillNode>>,
    decode: Option<Arc<DecodeNode>>,
    /// The one engine context both sides share.
    ctx: ContextHandle,
    /// Set by [`NodeServer::drain`]: no new prompts, `hello` reports the node out of service.
    draining: Arc<AtomicBool>,
    /// How the links it serves are secured.
    security: LinkSecurity,
    /// The connection this copy of the server answers (each connection gets its own copy).
    link: LinkId,
}

impl NodeServer {
    /// Creates the node's context and services (the model is already loaded).
    pub fn new(
        model: Arc<Model>,
        options: &NodeOptions,
    ) -> Result<NodeServer, exo_engine::EngineError> {
        let ctx = ContextHandle::spawn(Arc::clone(&model), options.context)?;
        let prefill = options.role.prefills().then(|| {
            PrefillNode::new(
                &options.name,
                ctx.clone(),
                ShipConfig {
                    chunks_in_flight: options.chunks_in_flight,
                    handoff_pieces: options.handoff_pieces,
                    ..ShipConfig::default()
                },
                options.security.clone(),
            )
        });
        let decode = options.role.decodes().then(|| {
            let node = DecodeNode::new(
                &options.name,
                ctx.clone(),
                DecodeLimits::for_context(
                    ctx.shape(),
                    options.context.layout.n_ctx_seq,
                    ctx.model().sliding_window(),
                ),
                DecodeTimeouts {
                    transfer: options.transfer_timeout,
                    ..DecodeTimeouts::default()
                },
            );
            tokio::spawn(Arc::clone(&node).run_reaper());
            node
        });
        let info = NodeInfo {
            name: options.name.clone(),
            role: options.role,
            model: model.name(),
            fingerprint: model.fingerprint(),
            layout: options.context.layout,
            hardware: hardware_facts(model.offload()),
            version: env!("CARGO_PKG_VERSION").to_string(),
            fault: None,
            perf: options.perf.clone(),
            tool_syntax: model
                .chat_template_source()
                .map_or(ToolSyntax::Wrapped, |t| ToolSyntax::detect(&t)),
        };
        Ok(NodeServer {
            info: Arc::new(info),
            prefill,
            decode,
            ctx,
            draining: Arc::new(AtomicBool::new(false)),
            security: options.security.clone(),
            link: LinkId(0),
        })
    }

    /// What the node reports about itself (`fault` as at start-up; `hello` reports it live).
    pub fn info(&self) -> &NodeInfo {
        &self.info
    }

    /// The most bytes its context's cache holds: a whole sequence (the per-sequence context) in
    /// each slot.
    pub fn kv_capacity_bytes(&self) -> u64 {
        let layout = self.ctx.config().layout;
        let window = self.ctx.model().sliding_window();
        let per_seq = self
            .ctx
            .shape()
            .max_state_len(layout.n_ctx_seq as usize, window)
            .unwrap_or(usize::MAX);
        (per_seq as u64).saturating_mul(u64::from(layout.n_seq_max))
    }

    /// Drains the node for shutdown: takes no new prompt, reports itself out of service in
    /// `hello` (so the router places nothing more here), and waits until the requests it holds
    /// (prompts running or queued, transfers, generations) are done, or `deadline` passes. Returns
    /// the requests still held then.
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.draining.store(true, Ordering::Relaxed);
        let until = Instant::now() + deadline;
        loop {
            let held = self.requests_held();
            if held == 0 || Instant::now() >= until {
                return held;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Requests this node holds: prompts in a slot or waiting for one, and requests the decode
    /// side knows (receiving, generating, or waiting to be polled).
    fn requests_held(&self) -> usize {
        let prompts = self.prefill.as_ref().map_or(0, |p| p.in_flight());
        let decoding = self.decode.as_ref().map_or(0, |d| d.active_requests());
        prompts + decoding
    }

    /// Why the node cannot serve any more, if it cannot: draining, or a faulty engine.
    fn fault(&self) -> Option<String> {
        if self.draining.load(Ordering::Relaxed) {
            return Some("draining for shutdown".into());
        }
        self.ctx.fault().map(|e| e.to_string())
    }

    fn wrong_role(&self, what: &str) -> NodeError {
        NodeError::WrongRole {
            role: self.info.role,
            what: what.into(),
        }
    }

    fn decode_side(&self, what: &str) -> Result<&Arc<DecodeNode>, NodeError> {
        self.decode.as_ref().ok_or_else(|| self.wrong_role(what))
    }

    /// Serves the RPC service on `listener` until `shutdown` completes.
    pub async fn run(self, listener: TcpListener, shutdown: impl std::future::Future<Output = ()>) {
        let security = self.security.clone();
        let links = AtomicU64::new(1);
        exo_protocol::serve(listener, security, shutdown, move |transport| {
            let server = NodeServer {
                link: LinkId(links.fetch_add(1, Ordering::Relaxed)),
                ..self.clone()
            };
            async move {
                BaseChannel::with_defaults(transport)
                    .execute(NodeService::serve(server))
                    .for_each(|response| async move {
                        tokio::spawn(response);
                    })
                    .await;
            }
        })
        .await;
    }
}

impl NodeService for NodeServer {
    async fn hello(self, _: Context) -> NodeInfo {
        NodeInfo {
            fault: self.fault(),
            ..(*self.info).clone()
        }
    }

    async fn prefill(self, _: Context, request: PrefillRequest) -> Result<PrefillReply, NodeError> {
        let prefill = self
            .prefill
            .as_ref()
            .ok_or_else(|| self.wrong_role("prefill"))?;
        if self.draining.load(Ordering::Relaxed) {
            return Err(NodeError::Busy);
        }
        if request.handoff.is_none() && self.decode.is_none() {
            return Err(self.wrong_role("generate without a decode node"));
        }
        request
            .sampling
            .check()
            .map_err(NodeError::InvalidRequest)?;
        let id = request.id;
        let (reply, local) = prefill.prefill(request).await?;
        if let (Some(cont), Some(decode)) = (local, self.decode.as_ref()) {
            decode.start_local(
                id,
                cont.lease,
                (cont.first_token, cont.history),
                cont.sampling,
                self.link,
            );
        }
        Ok(reply)
    }

    async fn kv_begin(self, _: Context, begin: KvBegin) -> Result<(), NodeError> {
        let decode = self.decode_side("receive a KV cache")?;
        begin.sampling.check().map_err(NodeError::InvalidRequest)?;
        decode.kv_begin(begin, self.link)
    }

    async fn kv_chunk(self, _: Context, frame: KvFrame) -> Result<(), NodeError> {
        self.decode_side("receive a KV cache")?
            .kv_chunk(frame, self.link)
            .await
    }

    async fn kv_end(self, _: Context, end: KvEnd) -> Result<(), NodeError> {
        self.decode_side("receive a KV cache")?
            .kv_end(end, self.link)
    }

    async fn kv_abort(self, _: Context, id: RequestId, reason: String) {
        if let Some(d) = &self.decode {
            d.kv_abort(id, reason);
        }
    }

    async fn poll(self, _: Context, id: RequestId, wait_ms: u32) -> Result<PollReply, NodeError> {
        let wait = Duration::from_millis(u64::from(wait_ms)).min(MAX_POLL_WAIT);
        self.decode_side("generate")?
            .poll(id, wait, self.link)
            .await
    }

    async fn cancel(self, _: Context, id: RequestId) {
        if let Some(d) = &self.decode {
            d.cancel(id, self.link);
        }
    }

    async fn count_tokens(self, _: Context, prompt: Prompt) -> Result<u32, NodeError> {
        let prefill = self
            .prefill
            .clone()
            .ok_or_else(|| self.wrong_role("count tokens"))?;
        // Rendering the template and tokenizing are CPU work: off the async threads.
        let count = tokio::task::spawn_blocking(move || prefill.tokenize(&prompt));
        let tokens = count
            .await
            .map_err(|e| NodeError::Engine(format!("counting tokens: {e}")))??;
        Ok(u32::try_from(tokens.len()).unwrap_or(u32::MAX))
    }

    async fn probe_sink(self, _: Context, payload: exo_protocol::ByteBuf) -> u64 {
        payload.len() as u64
    }

    async fn probe_link(self, _: Context, to: String, bytes: u32) -> Result<LinkProbe, NodeError> {
        let prefill = self
            .prefill
            .as_ref()
            .ok_or_else(|| self.wrong_role("probe a link"))?;
        prefill.probe_link(&to, bytes).await
    }

    async fn model_part(self, _: Context, offset: u64, len: u32) -> Result<ModelPart, NodeError> {
        let path = self.ctx.model().path().to_path_buf();
        let len = len.min(MAX_MODEL_PART);
        // File reads: off the async threads.
        tokio::task::spawn_blocking(move || read_model_part(&path, offset, len))
            .await
            .map_err(|e| NodeError::Engine(format!("reading the model: {e}")))?
    }
}

/// `len` bytes of the file at `path` from `offset` (fewer at its end), and its size.
fn read_model_part(path: &Path, offset: u64, len: u32) -> Result<ModelPart, NodeError> {
    use std::io::{Read, Seek, SeekFrom};
    let failed = |e: std::io::Error| NodeError::Engine(format!("reading the model file: {e}"));
    let mut file = std::fs::File::open(path).map_err(failed)?;
    let total = file.metadata().map_err(failed)?.len();
    if offset > total {
        return Err(NodeError::InvalidRequest(format!(
            "offset {offset} is past the model file's {total} bytes"
        )));
    }
    let n = u64::from(len).min(total - offset);
    file.seek(SeekFrom::Start(offset)).map_err(failed)?;
    let mut bytes = Vec::with_capacity(n as usize);
    file.take(n).read_to_end(&mut bytes).map_err(failed)?;
    Ok(ModelPart {
        total,
        bytes: bytes.into(),
    })
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The engine could not create the node's context.
    #[error(transparent)]
    Engine(#[from] exo_engine::EngineError),
    /// The RPC socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Binds `addr`, then serves a node there on a task until `shutdown` completes; returns the
/// bound address and the server (to [`NodeServer::drain`] it before shutting down).
pub async fn spawn_node(
    model: Arc<Model>,
    options: &NodeOptions,
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, NodeServer), SpawnError> {
    let server = NodeServer::new(model, options)?;
    let bind = |source| SpawnError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind)?;
    let bound = listener.local_addr().map_err(bind)?;
    tokio::spawn(server.clone().run(listener, shutdown));
    Ok((bound, server))
}

/// This machine's facts from the OS and where the model went (`offload`), as a node reports them
/// in `hello`.
pub fn hardware_facts(offload: &Offload) -> HardwareFacts {
    HardwareFacts {
        gpu: offload.gpu().map(str::to_string),
        gpu_layers: offload.gpu_layers,
        n_layer: offload.n_layer,
        cpu_threads: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        memory_bytes: crate::hardware::os_memory().unwrap_or(0),
        os: std::env::consts::OS.into(),
        arch: std::env::consts::ARCH.into(),
    }
}
