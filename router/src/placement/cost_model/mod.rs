//! The cost model: predicts time to first token, time per output token and end-to-end time of a
//! request for every candidate placement, from measured node profiles, links and live load, and
//! chooses one by the profile's objective.
//!
//! Everything here is plain arithmetic on numbers from the profile, so `plan`, `simulate`, the
//! router's `auto` placement and the unit tests all use the same predictions.

use exo_kvcache::Codec;
use exo_protocol::{NodePerf, PerfError, positive};
use serde::{Deserialize, Serialize};

use super::{Choice, NodeId, NodeView, PlacementMode, Placer};

mod predict;

pub use predict::{
    HandoffTerms, PIECE_CHOICES, best_codec, best_pieces, choose, handoff_s, handoff_terms,
    predict, streamed_handoff_s, transfer_s,
};

/// Prompt tokens a prefill pass takes at once (the engine's `n_batch`): a colocated node runs one
/// such chunk between decode steps.
pub const PREFILL_CHUNK: u32 = 512;

/// A network link between two nodes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// Usable bandwidth in gigabits per second.
    pub bandwidth_gbit_s: f64,
    /// One-way latency in milliseconds.
    pub latency_ms: f64,
}

impl Link {
    /// Checks the numbers.
    pub fn validate(&self) -> Result<(), PerfError> {
        positive("bandwidth_gbit_s", self.bandwidth_gbit_s)?;
        if !(self.latency_ms.is_finite() && self.latency_ms >= 0.0) {
            return Err(PerfError("latency_ms must be zero or positive".into()));
        }
        Ok(())
    }

    fn bytes_per_s(&self) -> f64 {
        self.bandwidth_gbit_s * 1e9 / 8.0
    }
}

/// What a node is doing right now (live in the router, simulated in `simulate`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct NodeLoad {
    /// Prompt tokens placed on the node and not yet prefilled.
    pub prefill_backlog: u64,
    /// Sequences generating on it.
    pub decoding: u32,
    /// Their context tokens, summed.
    pub decode_ctx: u64,
}

/// One request to place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestShape {
    /// Prompt tokens (an estimate when the router has not tokenized it).
    pub prompt_tokens: u64,
    /// Output tokens expected (`max_tokens`, or the profile's default).
    pub output_tokens: u64,
}

/// What placement optimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Lowest time to first token plus the hand-off pause, among placements meeting the TPOT
    /// target (lowest end-to-end time when none does).
    #[default]
    Ttft,
    /// Lowest end-to-end time.
    E2e,
}

/// The placement policy of a profile (its `[policy]` table).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// What to optimise.
    pub objective: Objective,
    /// Time per output token a placement must stay under, seconds.
    pub tpot_target_s: f64,
    /// Output tokens assumed when a request sets no `max_tokens`.
    pub expected_output_tokens: u64,
    /// Fixed cost of a hand-off (RPC round trips, decode-side set-up), seconds.
    pub handoff_overhead_s: f64,
    /// KV cache bytes per token of the model and layout.
    pub kv_bytes_per_token: f64,
    /// Link assumed between nodes the profile names no link for.
    pub default_link: Link,
    /// Pieces the streamed hand-offs the router sets pieces for (both nodes with perf tables)
    /// are cut in (one of [`PIECE_CHOICES`]); `None`: the cost model chooses per request
    /// ([`best_pieces`]).
    pub handoff_pieces: Option<u64>,
}

impl Policy {
    /// KV bytes per token: the policy's, else what the nodes measured with their perf tables
    /// (every node of a cluster runs the same model); 0 when nobody knows.
    pub fn kv_bytes_per_token<'a>(&self, perfs: impl IntoIterator<Item = &'a NodePerf>) -> f64 {
        if self.kv_bytes_per_token > 0.0 {
            return self.kv_bytes_per_token;
        }
        perfs
            .into_iter()
            .find_map(|p| p.kv_bytes_per_token)
            .unwrap_or(0.0)
    }
}

/// The predicted cost of one candidate placement.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// `Colocated` or `Disaggregated`.
    pub mode: PlacementMode,
    /// Prefill node (not serialized: whoever prints a prediction names its nodes).
    #[serde(skip)]
    pub prefill: NodeId,
    /// Decode node (not serialized, like `prefill`).
    #[serde(skip)]
    pub decode: NodeId,
    /// Codec for the KV transfer (split placements only).
    pub codec: Option<Codec>,
    /// Pieces the KV transfer is cut in while the prompt runs (split placements only; 1: one
    /// piece after it).
    pub pieces: Option<u64>,
    /// Time to first token, seconds.
    pub ttft_s: f64,
    /// Pause after the first token while the cache moves (export, transfer, import, slot wait).
    pub handoff_s: f64,
    /// Mean time per output token after the first, hand-off pause included, seconds (what a
    /// client measures as TPOT).
    pub tpot_s: f64,
    /// Time per output token once tokens flow (the decode node's step), seconds.
    pub steady_tpot_s: f64,
    /// End-to-end time, seconds.
    pub e2e_s: f64,
    /// True when `steady_tpot_s` is within the policy's target: the target is about how fast
    /// text streams; the one-off hand-off pause counts in the start time instead.
    pub meets_target: bool,
}

/// Every candidate of one request and the one chosen.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// The candidates, in the order the nodes are listed.
    pub candidates: Vec<Prediction>,
    /// Index of the chosen candidate in `candidates`, `None` when none exists.
    #[serde(skip)]
    pub chosen: Option<usize>,
}

impl Plan {
    /// The chosen candidate.
    pub fn chosen(&self) -> Option<&Prediction> {
        self.chosen.and_then(|i| self.candidates.get(i))
    }
}

/// Predicts and chooses in one go.
pub fn plan(
    policy: &Policy,
    nodes: &[NodeView],
    link: impl Fn(NodeId, NodeId) -> Option<Link>,
    req: RequestShape,
    mode: PlacementMode,
) -> Plan {
    let candidates = predict(policy, nodes, link, req, mode);
    let chosen = choose(policy, &candidates);
    Plan { candidates, chosen }
}

/// The link `links` names between `a` and `b`, in either direction.
pub fn link_between(links: &[(NodeId, NodeId, Link)], a: NodeId, b: NodeId) -> Option<Link> {
    links
        .iter()
        .find(|&&(x, y, _)| (x, y) == (a, b) || (x, y) == (b, a))
        .map(|&(_, _, l)| l)
}

/// The cost model as a placer: the candidate [`choose`] picks among those `mode` admits.
#[derive(Debug, Clone)]
pub struct CostModel {
    /// How to choose.
    pub policy: Policy,
    /// Links the profile names, by node pair; others use `policy.default_link`.
    pub links: Vec<(NodeId, NodeId, Link)>,
    /// Which placements are candidates.
    pub mode: PlacementMode,
}

impl CostModel {
    /// The link between `a` and `b`, if one is named.
    pub fn link(&self, a: NodeId, b: NodeId) -> Option<Link> {
        link_between(&self.links, a, b)
    }

    /// Every candidate of `shape` over `nodes`, and the chosen one.
    pub fn plan(&self, nodes: &[NodeView], shape: RequestShape) -> Plan {
        plan(
            &self.policy,
            nodes,
            |a, b| self.link(a, b),
            shape,
            self.mode,
        )
    }
}

impl CostModel {
    /// The codec that moves a cache of `shape`'s prompt fastest from `prefill` to `decode` over
    /// their link, from both nodes' measured codec speeds, and the pieces to cut it in
    /// ([`best_pieces`]); `None` when either has no perf table.
    pub fn handoff_for(
        &self,
        nodes: &[NodeView],
        prefill: NodeId,
        decode: NodeId,
        shape: RequestShape,
    ) -> Option<(Codec, u64)> {
        let perf = |id: NodeId| nodes.iter().find(|n| n.id == id).and_then(|n| n.perf);
        let (p, d) = (perf(prefill)?, perf(decode)?);
        let link = self
            .link(prefill, decode)
            .unwrap_or(self.policy.default_link);
        let bytes = shape.prompt_tokens as f64 * self.policy.kv_bytes_per_token([p, d]);
        let codec = best_codec(bytes, p, d, &link).0;
        let pieces = self.policy.handoff_pieces;
        let (pieces, _, _) = handoff_s(shape.prompt_tokens, bytes, (p, d), &link, codec, pieces)?;
        Some((codec, pieces))
    }
}

/// Another placer's choice, with the codec and pieces of a split chosen per link the way the cost
/// model chooses them ([`CostModel::handoff_for`]) when that placer left them open: so
/// `disaggregated` placement compresses on a slow link and not on loopback, and streams the cache
/// during the prompt only where that pays, as `auto` does. Without perf tables the profile's
/// `kv.codec` and the prefill node's `--handoff-pieces` apply.
pub struct LinkCodec<P> {
    /// The placer that chooses the nodes.
    pub inner: P,
    /// Prices the codecs.
    pub cost: CostModel,
}

impl<P: Placer> Placer for LinkCodec<P> {
    fn choose(&self, nodes: &[NodeView], shape: RequestShape) -> Option<Choice> {
        let mut c = self.inner.choose(nodes, shape)?;
        if c.codec.is_none()
            && c.prefill != c.decode
            && let Some((codec, pieces)) = self.cost.handoff_for(nodes, c.prefill, c.decode, shape)
        {
            (c.codec, c.pieces) = (Some(codec), Some(pieces));
        }
        Some(c)
    }
}

impl Placer for CostModel {
    fn choose(&self, nodes: &[NodeView], shape: RequestShape) -> Option<Choice> {
        let p = self.plan(nodes, shape).chosen().cloned()?;
        Some(Choice {
            prefill: p.prefill,
            decode: p.decode,
            codec: p.codec,
            pieces: p.pieces,
            predicted: Some(p),
        })
    }
}
