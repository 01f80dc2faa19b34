//! CPU thread budgets for the engines that share this process.
//!
//! Every llama.cpp context computes with a team of threads. Two contexts that each take every
//! core (llama.cpp's default) oversubscribe the machine: their OpenMP teams stop spinning between
//! parallel regions and sleep instead, and a decode step took twice as long beside an idle second
//! context (docs/placement.md). Embedded nodes therefore get disjoint budgets that add up to the
//! cores: the `threads` a profile gives a node, and an equal share of what is left for the others.

use exo_router::profile::{NodeAddress, NodeSpec};

/// The CPU threads of each node's context, in profile order; `None` for remote nodes (they choose
/// with `--threads` on their own machine). Embedded nodes with `threads` keep it; the others share
/// the cores left over equally, at least one thread each, and any odd thread goes to a node that
/// decodes first (decode steps are what users wait on token by token).
pub fn thread_budgets(nodes: &[NodeSpec], cores: u32) -> Vec<Option<u32>> {
    let embedded = |n: &NodeSpec| n.address == NodeAddress::Embedded;
    let fixed: u32 = nodes
        .iter()
        .filter(|n| embedded(n))
        .filter_map(|n| n.threads)
        .sum();
    let shared: Vec<usize> = (0..nodes.len())
        .filter(|&i| embedded(&nodes[i]) && nodes[i].threads.is_none())
        .collect();
    let left = cores.saturating_sub(fixed);
    let count = u32::try_from(shared.len()).unwrap_or(u32::MAX).max(1);
    let share = (left / count).max(1);
    let mut odd = if left >= count { left % count } else { 0 };
    let mut budgets: Vec<Option<u32>> = nodes
        .iter()
        .map(|n| if embedded(n) { n.threads } else { None })
        .collect();
    // Decoding nodes first, then the rest, each in profile order.
    let order = shared
        .iter()
        .filter(|&&i| nodes[i].role.decodes())
        .chain(shared.iter().filter(|&&i| !nodes[i].role.decodes()));
    for &i in order {
        let extra = u32::from(odd > 0);
        odd -= extra;
        budgets[i] = Some(share + extra);
    }
    budgets
}

#[cfg(test)]
mod tests {
    use super::*;
    use exo_protocol::Role;

    fn node(role: Role, address: NodeAddress, threads: Option<u32>) -> NodeSpec {
        NodeSpec {
            name: format!("{role}"),
            address,
            role,
            slots: 1,
            threads,
            perf: None,
            model: None,
        }
    }

    #[test]
    fn embedded_nodes_split_the_cores_and_decode_gets_the_odd_one() {
        let e = || NodeAddress::Embedded;
        let split = [
            node(Role::Prefill, e(), None),
            node(Role::Decode, e(), None),
        ];
        assert_eq!(thread_budgets(&split, 2), [Some(1), Some(1)]);
        assert_eq!(thread_budgets(&split, 7), [Some(3), Some(4)]);
        // Never zero, even with more nodes than cores.
        assert_eq!(thread_budgets(&split, 1), [Some(1), Some(1)]);
        let alone = [node(Role::Both, e(), None)];
        assert_eq!(thread_budgets(&alone, 16), [Some(16)]);
    }

    #[test]
    fn written_budgets_are_kept_and_remote_nodes_choose_their_own() {
        let e = || NodeAddress::Embedded;
        let remote = || NodeAddress::Remote("10.0.0.2:7070".into());
        let nodes = [
            node(Role::Prefill, e(), Some(5)),
            node(Role::Decode, remote(), None),
            node(Role::Decode, e(), None),
        ];
        assert_eq!(thread_budgets(&nodes, 16), [Some(5), None, Some(11)]);
        // A written budget past the cores leaves one thread for the others, not none.
        assert_eq!(thread_budgets(&nodes, 4), [Some(5), None, Some(1)]);
    }
}
