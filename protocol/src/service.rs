//! The node service: one tarpc service every node serves; a node refuses calls its role does not cover.
//!
//! A disaggregated request: the router calls `prefill` on the prefill node with a [`Handoff`] naming the
//! decode node. The prefill node runs the prompt, samples output token 0, replies to the router at once
//! (the router streams that token to the client) and meanwhile ships the KV cache straight to the
//! decode node (`kv_begin`, then `kv_chunk` per chunk; `kv_abort` when it cannot finish). The decode
//! node imports the cache when the last chunk arrives and generates; the router long-polls it with `poll` and calls `cancel` when the client goes.
//! A colocated request is a `prefill` without handoff on a `both` node, which then generates itself.

use serde::{Deserialize, Serialize};

use crate::{FinishReason, KvLayout, ModelFingerprint, SamplingParams, TokenLogprob};

/// A request's id, made once by the router's HTTP layer: 128 random bits, so another client (or
/// a device on the LAN) cannot guess a live request's id to poll or cancel it. The same in the
/// API response (`chatcmpl-<id>`), in every log line about the request (`request=<id>` on the
/// router, `id=<id>` on the nodes) and in every RPC. Shown as 32 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(pub u128);

impl RequestId {
    /// The low 64 bits: the sampling seed of a request whose client gave none.
    pub fn seed(self) -> u64 {
        self.0 as u64
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// What a node does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Runs prompts and ships KV caches.
    Prefill,
    /// Imports KV caches and generates.
    Decode,
    /// Both, including whole requests on its own (colocated).
    Both,
}

impl Role {
    /// True if the node runs prompts.
    pub fn prefills(self) -> bool {
        matches!(self, Role::Prefill | Role::Both)
    }

    /// True if the node generates.
    pub fn decodes(self) -> bool {
        matches!(self, Role::Decode | Role::Both)
    }

    /// Sequence slots a node of this role gets when none are configured: four. A prefill-only node
    /// holds a slot per prompt from its start until its cache is exported, so with several slots a
    /// short prompt that arrives behind a long one runs first (shortest first, engine
    /// `PrefillBatching`) and waiting prompts can share a batch; a node that generates batches its
    /// decode steps over its slots.
    pub fn default_slots(self) -> u32 {
        4
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Both => "both",
        })
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "prefill" => Ok(Role::Prefill),
            "decode" => Ok(Role::Decode),
            "both" => Ok(Role::Both),
            other => Err(format!(
                "unknown role {other:?} (expected prefill, decode or both)"
            )),
        }
    }
}

/// Hardware facts a node reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct HardwareFacts {
    /// Hardware threads available to the process.
    pub cpu_threads: u32,
    /// Total memory in bytes (0 when unknown).
    pub memory_bytes: u64,
    /// Operating system.
    pub os: String,
    /// CPU architecture.
    pub arch: String,
    /// The GPU the model's layers run on, as its driver names it (`None`: on the CPU).
    pub gpu: Option<String>,
    /// Model layers on that GPU, of `n_layer`.
    pub gpu_layers: u32,
    /// The model's layers.
    pub n_layer: u32,
}

/// How a model writes a tool call: the convention its chat template teaches it, or ours for a
/// template that has none (then the tool list and this format are put in the system message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum ToolSyntax {
    /// Ours: `{"tool_calls": [{"name": "f", "arguments": {...}}, ...]}` as the whole reply.
    #[default]
    Wrapped,
    /// Hermes and Qwen: `<tool_call>{"name": "f", "arguments": {...}}</tool_call>`, one block per
    /// call.
    Hermes,
    /// Llama 3.x: `{"name": "f", "parameters": {...}}` (after `<|python_tag|>` where that token is
    /// shown), several separated by `;`.
    Llama3,
    /// Mistral: `[TOOL_CALLS] [{"name": "f", "arguments": {...}}, ...]`.
    Mistral,
}

impl ToolSyntax {
    /// The convention a chat template's source teaches; `Wrapped` for one that knows no tools.
    pub fn detect(template: &str) -> ToolSyntax {
        if !template.contains("tools") {
            ToolSyntax::Wrapped
        } else if template.contains("<tool_call>") {
            ToolSyntax::Hermes
        } else if template.contains("[TOOL_CALLS]") {
            ToolSyntax::Mistral
        } else if template.contains("<|python_tag|>")
            || (template.contains("<|start_header_id|>") && template.contains("\"parameters\""))
        {
            ToolSyntax::Llama3
        } else {
            ToolSyntax::Wrapped
        }
    }
}

/// What a node reports when the router connects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node's name.
    pub name: String,
    /// What it does.
    pub role: Role,
    /// Model id (file name without `.gguf`).
    pub model: String,
    /// Model fingerprint: every node of a cluster must run the same model.
    pub fingerprint: ModelFingerprint,
    /// The KV layout of its context.
    pub layout: KvLayout,
    /// Its machine.
    pub hardware: HardwareFacts,
    /// exo-router version.
    pub version: String,
    /// Why the node cannot serve, when it cannot (its engine context was retired after llama.cpp
    /// rejected a KV state, or its engine stopped); the router marks such a node down.
    pub fault: Option<String>,
    /// How its model writes tool calls (from its chat template).
    pub tool_syntax: ToolSyntax,
    /// Its speed, when it measured itself at start (`node --measure`): the router's cost model
    /// uses it for a node whose profile entry has no `[nodes.perf]`.
    pub perf: Option<crate::perf::NodePerf>,
}

/// One chat message.
///
/// Tool calls and tool lists travel as JSON *text*, not as `serde_json::Value`: the RPC's bincode
/// frames are not self-describing and cannot carry a `Value` (it needs `deserialize_any`). The
/// prefill node parses the text once, for the chat template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ChatTurn {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The message text.
    pub content: String,
    /// An assistant turn's tool calls, OpenAI's `tool_calls` array as JSON text.
    pub tool_calls: Option<String>,
    /// A tool turn's `tool_call_id`.
    pub tool_call_id: Option<String>,
}

/// A conversation and the tools the model may call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatPrompt {
    /// The messages.
    pub turns: Vec<ChatTurn>,
    /// OpenAI's `tools` array as JSON text; `None` when the request has none (or `tool_choice`
    /// is `none`).
    pub tools: Option<String>,
}

/// The prompt of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Prompt {
    /// Messages, rendered with the model's chat template.
    Chat(ChatPrompt),
    /// Raw text, tokenized as is (with the model's start token).
    Text(String),
}

/// Where and how a prefill node ships the KV cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handoff {
    /// The decode node's RPC address (`host:port`).
    pub decode_addr: String,
    /// Codec for the chunks.
    pub codec: crate::Codec,
    /// Pieces the cache goes out in while the prompt runs (each costs the prefill node an export
    /// of the sequence so far; 1: one piece after the prompt); 0: the prefill node's own default
    /// (`--handoff-pieces`).
    pub pieces: u32,
    /// Raw bytes per chunk.
    pub chunk_size: u32,
    /// The decode node's per-sequence context: the prompt must leave room in it.
    pub context_limit: u32,
}

/// A request to run a prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefillRequest {
    /// Request id.
    pub id: RequestId,
    /// The prompt.
    pub prompt: Prompt,
    /// Sampling for the whole request.
    pub sampling: SamplingParams,
    /// Ship the cache to a decode node; `None` to generate here (colocated, `both` nodes only).
    pub handoff: Option<Handoff>,
    /// Output tokens the request already produced on a node that failed (empty for a new
    /// request): they follow the prompt in the cache, their text was already sent, and the token
    /// sampled is output number `resume.len()`, drawn and constrained as the failed node would
    /// have (the router's migration).
    pub resume: Vec<i32>,
}

/// The prefill's answer, sent as soon as output token 0 is known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefillReply {
    /// Output token 0.
    pub first_token: i32,
    /// Text that token 0 made final.
    pub first_text: String,
    /// Prompt tokens.
    pub n_prompt: u32,
    /// Set when the request already ended with token 0 (nothing is shipped or generated then).
    pub finish: Option<FinishReason>,
    /// Token 0's log probability, when the request asked for them.
    pub first_logprob: Option<TokenLogprob>,
}

/// First message of a KV transfer, from the prefill node to the decode node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvBegin {
    /// Request id.
    pub id: RequestId,
    /// The KV header frame.
    #[serde(with = "serde_bytes")]
    pub header: Vec<u8>,
    /// Sampling for the rest of the request.
    pub sampling: SamplingParams,
}

/// The end of a KV transfer: sent once every chunk call returned, after the prompt's last batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEnd {
    /// Request id.
    pub id: RequestId,
    /// The KV end frame (chunk count and the final state's checksum).
    #[serde(with = "serde_bytes")]
    pub frame: Vec<u8>,
    /// The output token the prefill sampled, which the decode node feeds first.
    pub first_token: i32,
    /// Its output number: 0, or for a resumed request the output tokens before it, which are the
    /// last `index` tokens of the cache.
    pub index: u32,
}

/// One KV chunk frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvFrame {
    /// Request id.
    pub id: RequestId,
    /// The chunk frame.
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

/// Generated output since the last poll.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct PollReply {
    /// Newly final text.
    pub text: String,
    /// The tokens generated since the last poll (the router keeps them to resume the request
    /// elsewhere if this node fails).
    pub tokens: Vec<i32>,
    /// Set once generation ended; the request is then forgotten by the node.
    pub finish: Option<FinishReason>,
    /// The log probability of each of `tokens`, when the request asked for them (else empty).
    pub logprobs: Vec<TokenLogprob>,
    /// The bytes of KV cache the request's transfer brought over the wire (frames as sent,
    /// compressed or not), in the first reply after the cache was imported; `None` otherwise.
    pub kv_wire_bytes: Option<u64>,
}

/// Why a node refused or failed a call; each variant maps to one HTTP status at the router.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum NodeError {
    /// The request itself is wrong (empty prompt, bad token, bad parameters).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The prompt does not fit the context.
    #[error("prompt of {tokens} tokens exceeds the context of {limit} tokens")]
    ContextLength {
        /// Prompt tokens.
        tokens: u32,
        /// Largest prompt accepted.
        limit: u32,
    },
    /// Every sequence slot is busy.
    #[error("node busy: no free sequence slot")]
    Busy,
    /// The call needs a role this node does not have.
    #[error("node role {role} cannot {what}")]
    WrongRole {
        /// The node's role.
        role: Role,
        /// What was asked.
        what: String,
    },
    /// The node knows no request with this id (finished, cancelled or timed out).
    #[error("unknown request {0}")]
    UnknownRequest(RequestId),
    /// The KV transfer failed or was refused.
    #[error("KV transfer failed: {0}")]
    Transfer(String),
    /// The engine failed.
    #[error("engine error: {0}")]
    Engine(String),
}

/// The most bytes one [`NodeService::model_part`] returns.
pub const MAX_MODEL_PART: u32 = 4 << 20;

/// A piece of the GGUF file a node runs, for a peer that lacks the model
/// ([`NodeService::model_part`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelPart {
    /// The whole file's size in bytes.
    pub total: u64,
    /// The bytes from the offset asked for (fewer at the end of the file).
    pub bytes: serde_bytes::ByteBuf,
}

/// A measurement of the link from a prefill node to a decode node ([`NodeService::probe_link`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinkProbe {
    /// Goodput of the bytes sent, gigabits per second (through the link's encryption, if any).
    pub bandwidth_gbit_s: f64,
    /// Half the shortest round trip of an empty call, milliseconds.
    pub latency_ms: f64,
    /// Bytes sent to measure the bandwidth.
    pub bytes: u64,
}

/// The most bytes one [`NodeService::probe_link`] sends.
pub const MAX_PROBE_BYTES: u32 = 64 << 20;

/// The service every node serves.
#[tarpc::service]
pub trait NodeService {
    /// The node's identity, model, KV layout and hardware.
    async fn hello() -> NodeInfo;
    /// Runs a prompt; replies with output token 0 as soon as it is sampled.
    async fn prefill(request: PrefillRequest) -> Result<PrefillReply, NodeError>;
    /// Starts receiving a KV transfer for a request (decode nodes).
    async fn kv_begin(begin: KvBegin) -> Result<(), NodeError>;
    /// Receives the next chunk of a transfer (decode nodes).
    async fn kv_chunk(frame: KvFrame) -> Result<(), NodeError>;
    /// Ends a transfer whose chunks have all been accepted: the decode node checks the whole
    /// state, imports it and generates from `first_token` (decode nodes).
    async fn kv_end(end: KvEnd) -> Result<(), NodeError>;
    /// The prefill node gave up on a request's transfer (it could not export, encode or send it):
    /// the request fails on the decode node at once with `reason`, which its next `poll` returns,
    /// instead of at the transfer timeout. Ignored for a request whose transfer completed.
    async fn kv_abort(id: RequestId, reason: String);
    /// Waits up to `wait_ms` for generated output, then returns what there is.
    async fn poll(id: RequestId, wait_ms: u32) -> Result<PollReply, NodeError>;
    /// Stops a request and frees its slot.
    async fn cancel(id: RequestId);
    /// The tokens `prompt` comes to after the chat template, as a prefill of it would count them
    /// (prefill-capable nodes; Anthropic's `count_tokens`).
    async fn count_tokens(prompt: Prompt) -> Result<u32, NodeError>;
    /// Takes bytes and drops them, returning how many arrived: the far end of a link probe.
    async fn probe_sink(payload: serde_bytes::ByteBuf) -> u64;
    /// Measures the link from this (prefill) node to the node at `to`: empty round trips, then
    /// `bytes` (at most [`MAX_PROBE_BYTES`]) sent to it.
    async fn probe_link(to: String, bytes: u32) -> Result<LinkProbe, NodeError>;
    /// Up to `len` bytes (at most [`MAX_MODEL_PART`]) of the node's model file from `offset`: a
    /// node that lacks the model fetches it from a peer over the cluster link. The fetching side
    /// checks the finished file against the model fingerprint `hello` reports.
    async fn model_part(offset: u64, len: u32) -> Result<ModelPart, NodeError>;
}
