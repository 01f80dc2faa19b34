//! Placement: which node runs a request's prompt and which generates it.
//!
//! One [`Placer`] trait, one file per policy:
//! - [`least_loaded`]: the node with the fewest requests in flight (the fixed `disaggregated` and
//!   `colocated` modes of a profile);
//! - [`cost_model`]: the candidate with the best predicted TTFT / TPOT / end-to-end time, from the
//!   nodes' measured `[nodes.perf]`, the links and live load (`auto`; `plan` and `simulate` too);
//! - [`fixed`]: always the same pair (the simulator's single home node).
//!
//! Placers see the cluster as a slice of [`NodeView`]s and answer with [`NodeId`]s, a
//! [`PlacementMode`] and a [`Codec`]: never names to look up again. The live router
//! ([`crate::cluster`]) and the simulator ([`crate::simulate`]) build the views from their own state.

pub mod cost_model;
pub mod fixed;
pub mod least_loaded;

use exo_kvcache::Codec;
use exo_protocol::{NodePerf, Role};
use serde::{Deserialize, Serialize};

pub use cost_model::{Link, NodeLoad, Objective, Plan, Policy, Prediction, RequestShape};

/// A node's position in its profile's `[[nodes]]` list; the router and the simulator keep their
/// nodes in that order.
pub type NodeId = usize;

/// How requests are placed: the profile's `placement`, the candidates `plan` weighs, and a
/// simulator policy, all the same choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlacementMode {
    /// Prefill on one node, decode on another.
    Disaggregated,
    /// Prefill and decode on one `both` node.
    Colocated,
    /// Either, chosen per request by the cost model (needs `perf` for every node).
    Auto,
}

impl PlacementMode {
    /// Every mode, in the order reports list them.
    pub const ALL: [PlacementMode; 3] = [
        PlacementMode::Colocated,
        PlacementMode::Disaggregated,
        PlacementMode::Auto,
    ];

    /// The name profiles and reports use.
    pub fn name(self) -> &'static str {
        match self {
            PlacementMode::Disaggregated => "disaggregated",
            PlacementMode::Colocated => "colocated",
            PlacementMode::Auto => "auto",
        }
    }

    /// True when this mode admits a placement of kind `kind` (`Colocated` or `Disaggregated`).
    pub fn admits(self, kind: PlacementMode) -> bool {
        self == PlacementMode::Auto || self == kind
    }
}

impl std::fmt::Display for PlacementMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One node as a placer sees it.
#[derive(Debug, Clone, Copy)]
pub struct NodeView<'a> {
    /// Which node.
    pub id: NodeId,
    /// What it does.
    pub role: Role,
    /// Decode slots.
    pub slots: u32,
    /// Its measured speed, when the profile has it (the cost model skips nodes without).
    pub perf: Option<&'a NodePerf>,
    /// What it is doing now, as the cost model counts it.
    pub load: NodeLoad,
    /// Requests placed on it and not yet finished.
    pub in_flight: usize,
}

/// Where one request runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// Runs the prompt.
    pub prefill: NodeId,
    /// Generates (the same node when colocated).
    pub decode: NodeId,
    /// KV codec of the hand-off; `None`: the profile's `kv.codec`.
    pub codec: Option<Codec>,
    /// Pieces the hand-off is cut in while the prompt runs; `None`: the prefill node's default.
    pub pieces: Option<u64>,
    /// The cost model's prediction, when it chose.
    pub predicted: Option<Prediction>,
}

impl Choice {
    /// `Colocated` or `Disaggregated`.
    pub fn kind(&self) -> PlacementMode {
        if self.prefill == self.decode {
            PlacementMode::Colocated
        } else {
            PlacementMode::Disaggregated
        }
    }
}

/// A placement policy.
pub trait Placer: Send + Sync {
    /// Where a request of `shape` should run among `nodes` (all of them placeable now), or
    /// `None` when this policy finds no node for it.
    fn choose(&self, nodes: &[NodeView], shape: RequestShape) -> Option<Choice>;
}

/// Tries each placer in turn: the first that answers places the request.
pub struct FirstOf(pub Vec<Box<dyn Placer>>);

impl Placer for FirstOf {
    fn choose(&self, nodes: &[NodeView], shape: RequestShape) -> Option<Choice> {
        self.0.iter().find_map(|p| p.choose(nodes, shape))
    }
}

/// The router's placer for a profile's mode: least-loaded for the fixed modes; for `auto` the
/// cost model, falling back to least-loaded split then colocated for nodes it cannot price. In
/// every mode a split's KV codec is chosen for its link from the nodes' measured codec speeds
/// when both have perf tables ([`cost_model::LinkCodec`]).
pub fn for_mode(mode: PlacementMode, cost: cost_model::CostModel) -> Box<dyn Placer> {
    let link_codec = |inner| cost_model::LinkCodec {
        inner,
        cost: cost.clone(),
    };
    match mode {
        PlacementMode::Disaggregated => Box::new(link_codec(least_loaded::LeastLoaded::split())),
        PlacementMode::Colocated => Box::new(least_loaded::LeastLoaded::colocated()),
        PlacementMode::Auto => Box::new(FirstOf(vec![
            Box::new(cost.clone()),
            Box::new(link_codec(least_loaded::LeastLoaded::split())),
            Box::new(least_loaded::LeastLoaded::colocated()),
        ])),
    }
}
