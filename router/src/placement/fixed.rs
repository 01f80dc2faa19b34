//! Fixed placement: every request on the same nodes (the simulator's `colocated` policy puts the
//! whole workload on the one node that serves its average request best).

use super::{Choice, NodeId, NodeView, Placer, RequestShape};

/// Always the same prefill and decode node, with no KV codec (no hand-off when they are one).
#[derive(Debug, Clone, Copy)]
pub struct Fixed {
    /// Runs every prompt.
    pub prefill: NodeId,
    /// Generates every request.
    pub decode: NodeId,
}

impl Placer for Fixed {
    fn choose(&self, nodes: &[NodeView], _: RequestShape) -> Option<Choice> {
        let present = |id| nodes.iter().any(|n| n.id == id);
        (present(self.prefill) && present(self.decode)).then_some(Choice {
            prefill: self.prefill,
            decode: self.decode,
            codec: Some(exo_kvcache::Codec::None),
            pieces: None,
            predicted: None,
        })
    }
}
