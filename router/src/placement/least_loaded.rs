//! Least-loaded placement: the healthy node with the fewest requests in flight, preferring a node
//! dedicated to the phase over a `both` node on ties.

use exo_protocol::Role;

use super::{Choice, NodeView, Placer, RequestShape};

/// Places on the least-loaded nodes, split or colocated.
#[derive(Debug, Clone, Copy)]
pub struct LeastLoaded {
    split: bool,
}

impl LeastLoaded {
    /// Prefill on one node, decode on another.
    pub fn split() -> Self {
        LeastLoaded { split: true }
    }

    /// The whole request on one `both` node.
    pub fn colocated() -> Self {
        LeastLoaded { split: false }
    }
}

/// The node with the fewest requests in flight among those `want` accepts, not `not`; ties go to
/// a node whose role is exactly `prefer`.
fn least<'a>(
    nodes: &'a [NodeView<'a>],
    want: impl Fn(Role) -> bool,
    prefer: Role,
    not: Option<usize>,
) -> Option<&'a NodeView<'a>> {
    nodes
        .iter()
        .filter(|n| want(n.role) && not != Some(n.id))
        .min_by_key(|n| (n.in_flight, n.role != prefer))
}

impl Placer for LeastLoaded {
    fn choose(&self, nodes: &[NodeView], _: RequestShape) -> Option<Choice> {
        let (prefill, decode) = if self.split {
            let p = least(nodes, Role::prefills, Role::Prefill, None)?;
            let d = least(nodes, Role::decodes, Role::Decode, Some(p.id))?;
            (p.id, d.id)
        } else {
            let n = least(nodes, |r| r == Role::Both, Role::Both, None)?;
            (n.id, n.id)
        };
        Some(Choice {
            prefill,
            decode,
            codec: None,
            pieces: None,
            predicted: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::NodeLoad;

    fn node(id: usize, role: Role, in_flight: usize) -> NodeView<'static> {
        NodeView {
            id,
            role,
            slots: 4,
            perf: None,
            load: NodeLoad::default(),
            in_flight,
        }
    }

    const SHAPE: RequestShape = RequestShape {
        prompt_tokens: 10,
        output_tokens: 10,
    };

    #[test]
    fn split_takes_the_idlest_of_each_role_and_never_one_node_twice() {
        let nodes = [
            node(0, Role::Prefill, 3),
            node(1, Role::Both, 1),
            node(2, Role::Decode, 1),
        ];
        let c = LeastLoaded::split().choose(&nodes, SHAPE).unwrap();
        // Node 1 is the idlest prefill-capable node; the decode side must then be another node,
        // and among equals the dedicated decode node wins.
        assert_eq!((c.prefill, c.decode), (1, 2));
        let only_both = [node(0, Role::Both, 0)];
        assert!(LeastLoaded::split().choose(&only_both, SHAPE).is_none());
    }

    #[test]
    fn colocated_needs_a_both_node() {
        let nodes = [
            node(0, Role::Prefill, 0),
            node(1, Role::Both, 5),
            node(2, Role::Both, 2),
        ];
        let c = LeastLoaded::colocated().choose(&nodes, SHAPE).unwrap();
        assert_eq!((c.prefill, c.decode), (2, 2));
        assert!(
            LeastLoaded::colocated()
                .choose(&nodes[..1], SHAPE)
                .is_none()
        );
    }
}
