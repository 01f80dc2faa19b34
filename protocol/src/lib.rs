//! The RPC protocol between the router and the nodes: the tarpc service, its messages, and the TCP
//! transport (bincode frames, `TCP_NODELAY`, explicit frame limits and deadlines), plain or under
//! mutual TLS with the cluster file ([`tls`]); nodes announcing themselves on the LAN and the router
//! finding them ([`discovery`]).
//!
//! Also the facts a node reports or measures about itself ([`NodeInfo`], [`NodePerf`]), which the
//! router reads. No llama.cpp here, so the router can depend on it without linking an inference
//! engine.

pub mod discovery;
mod perf;
mod service;
pub mod tls;
mod transport;

pub use exo_kvcache::{Codec, KvLayout, KvType, ModelFingerprint};
pub use exo_sampling::{
    Constraint, FinishReason, MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS, SamplingParams, TokenLogprob,
    TopLogprob,
};
pub use perf::{CodecPerf, NodePerf, PerfError, positive};
/// Bytes as one serde value (probe payloads).
pub use serde_bytes::ByteBuf;
pub use service::{
    ChatPrompt, ChatTurn, Handoff, HardwareFacts, KvBegin, KvEnd, KvFrame, LinkProbe,
    MAX_MODEL_PART, MAX_PROBE_BYTES, ModelPart, NodeError, NodeInfo, NodeService,
    NodeServiceClient, NodeServiceRequest, NodeServiceResponse, PollReply, PrefillReply,
    PrefillRequest, Prompt, RequestId, Role, ServeNodeService, ToolSyntax,
};
pub use tls::{ClusterError, LinkSecurity, new_cluster_pem};
pub use transport::{
    CONNECT_TIMEOUT, MAX_CONNECTIONS, MAX_FRAME_BYTES, ServerTransport, connect,
    context_with_deadline, open_link, serve,
};
