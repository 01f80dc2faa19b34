//! What a request holds while it lives, each released when dropped: its place in admission
//! ([`Admission`]), its count on its nodes ([`InFlight`]), its share of the prefill backlog
//! ([`PrefillLoad`]) and of the decode load ([`DecodeLoad`]), and its decode slot ([`SlotPermit`]);
//! [`Placement`] holds the per-node ones with where the request runs.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use exo_kvcache::{Codec, ModelFingerprint};

use super::{Cluster, ClusterNode};
use crate::placement::Prediction;

/// Counts a request on a node while alive.
pub struct InFlight(Arc<ClusterNode>);

impl InFlight {
    pub(super) fn new(node: &Arc<ClusterNode>) -> Self {
        let n = node.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!("exo_node_in_flight", "node" => node.spec.name.clone()).set(n as f64);
        InFlight(Arc::clone(node))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let n = self
            .0
            .in_flight
            .fetch_sub(1, Ordering::Relaxed)
            .saturating_sub(1);
        metrics::gauge!("exo_node_in_flight", "node" => self.0.spec.name.clone()).set(n as f64);
    }
}

/// One sequence slot of a decode node, reserved for a request from before its prompt runs until
/// it ends (see [`ClusterNode::reserve_slot`]); dropping it frees the slot for the next request.
pub struct SlotPermit {
    pub(super) permit: Option<tokio::sync::OwnedSemaphorePermit>,
    pub(super) node: Arc<ClusterNode>,
}

impl SlotPermit {
    /// Publishes `exo_decode_slots_reserved{node}`: the node's slots held by requests.
    pub(super) fn publish(&self) {
        let node = &self.node;
        let reserved = node
            .slot_count
            .load(Ordering::Relaxed)
            .saturating_sub(node.slots.available_permits());
        metrics::gauge!("exo_decode_slots_reserved", "node" => node.spec.name.clone())
            .set(reserved as f64);
    }
}

impl Drop for SlotPermit {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.publish();
    }
}

/// A prompt's share of its prefill node's backlog; released when the prefill ends.
pub struct PrefillLoad {
    pub(super) node: Arc<ClusterNode>,
    pub(super) tokens: u64,
}

impl Drop for PrefillLoad {
    fn drop(&mut self) {
        self.node
            .prefill_backlog
            .fetch_sub(self.tokens, Ordering::Relaxed);
    }
}

/// A sequence counted on its decode node while the request lives.
pub struct DecodeLoad {
    pub(super) node: Arc<ClusterNode>,
    pub(super) ctx: u64,
}

impl Drop for DecodeLoad {
    fn drop(&mut self) {
        self.node.decoding.fetch_sub(1, Ordering::Relaxed);
        self.node.decode_ctx.fetch_sub(self.ctx, Ordering::Relaxed);
    }
}

/// A request admitted into the cluster; releases its place on drop.
pub struct Admission {
    pub(super) cluster: Arc<Cluster>,
    /// The model whose queue it counts in.
    pub(super) model: ModelFingerprint,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let total = match self.cluster.admitted.lock() {
            Ok(mut by_model) => {
                if let Some(held) = by_model.get_mut(&self.model) {
                    *held = held.saturating_sub(1);
                }
                by_model.values().sum()
            }
            Err(_) => return,
        };
        self.cluster.publish_load(total);
    }
}

/// Where one request runs.
pub struct Placement {
    /// Runs the prompt.
    pub prefill: Arc<ClusterNode>,
    /// Generates (the same node when colocated).
    pub decode: Arc<ClusterNode>,
    /// Keeps the nodes' in-flight counts while the request lives.
    pub guards: Vec<InFlight>,
    /// The prompt's share of the prefill node's backlog: drop it when the prefill ends.
    pub prefill_load: Option<PrefillLoad>,
    /// The sequence's share of the decode node's load.
    pub decode_load: DecodeLoad,
    /// The KV codec for this request's hand-off.
    pub codec: Codec,
    /// Pieces the hand-off is cut in while the prompt runs; `None`: the prefill node's default.
    pub pieces: Option<u64>,
    /// The cost model's prediction, when it chose.
    pub predicted: Option<Prediction>,
}

impl Placement {
    /// True when prefill and decode run on different nodes.
    pub fn is_split(&self) -> bool {
        !Arc::ptr_eq(&self.prefill, &self.decode)
    }
}
