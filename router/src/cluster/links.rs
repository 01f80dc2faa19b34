//! Links measured between nodes: with discovery on, the router asks each prefill-capable node to
//! probe its link to each decode-capable node the profile describes no `[[links]]` for
//! (`probe_link`: round trips, then [`PROBE_BYTES`] over the connection KV caches travel on), one
//! pair at a time, again every [`REFRESH`]. The cost model then prices hand-offs on that pair
//! with the measured bandwidth and latency instead of `policy.default_link`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use exo_protocol::{LinkProbe, context_with_deadline};

use super::{Cluster, ClusterNode};
use crate::placement::{self, Link, NodeId};

/// Bytes one probe sends.
pub const PROBE_BYTES: u32 = 16 << 20;
/// How often a measured link is measured again.
const REFRESH: Duration = Duration::from_secs(600);
/// How soon a failed probe is tried again.
const RETRY: Duration = Duration::from_secs(60);
/// How often the prober looks for a pair to measure.
const TICK: Duration = Duration::from_secs(2);
/// Deadline of one probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// The last probe of one prefill -> decode pair.
#[derive(Debug, Clone)]
pub struct MeasuredLink {
    /// What it measured (`None`: the probe failed; `error` says why).
    pub probe: Option<LinkProbe>,
    /// Why the last probe failed.
    pub error: Option<String>,
    /// When it ran.
    pub at: Instant,
}

impl Cluster {
    /// Measures the links between healthy nodes that the profile describes none for, one pair per
    /// tick, for as long as the router runs.
    pub async fn run_link_probes(self: Arc<Self>) {
        let mut tick = tokio::time::interval(TICK);
        loop {
            tick.tick().await;
            if let Some((p, d)) = self.next_probe() {
                self.probe(&p, &d).await;
            }
        }
    }

    /// The measurement of the pair `(prefill, decode)`, if one was made.
    pub fn measured_link(&self, prefill: NodeId, decode: NodeId) -> Option<MeasuredLink> {
        self.measured.read().ok()?.get(&(prefill, decode)).cloned()
    }

    /// A healthy pair with no profile link whose measurement is missing or due.
    fn next_probe(&self) -> Option<(Arc<ClusterNode>, Arc<ClusterNode>)> {
        let nodes = self.nodes();
        let healthy = || nodes.iter().filter(|n| n.healthy());
        let due = |p: &ClusterNode, d: &ClusterNode| match self.measured_link(p.id, d.id) {
            None => true,
            Some(m) if m.probe.is_some() => m.at.elapsed() > REFRESH,
            Some(m) => m.at.elapsed() > RETRY,
        };
        for p in healthy().filter(|n| n.spec.role.prefills()) {
            for d in healthy().filter(|n| n.spec.role.decodes() && n.id != p.id) {
                if self.link(p.id, d.id).is_none() && due(p, d) {
                    return Some((Arc::clone(p), Arc::clone(d)));
                }
            }
        }
        None
    }

    /// Asks `p` to probe its link to `d`, keeps the result and gives the placer the new link.
    async fn probe(&self, p: &ClusterNode, d: &ClusterNode) {
        let Some(client) = p.client() else { return };
        let ctx = context_with_deadline(PROBE_TIMEOUT);
        let result = match client.probe_link(ctx, d.addr(), PROBE_BYTES).await {
            Ok(Ok(probe)) => Ok(probe),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match &result {
            Ok(probe) => {
                tracing::info!(prefill = %p.name(), decode = %d.name(), gbit_s = probe.bandwidth_gbit_s, latency_ms = probe.latency_ms, "link measured")
            }
            Err(why) => {
                tracing::debug!(prefill = %p.name(), decode = %d.name(), %why, "link probe failed")
            }
        }
        let measured = MeasuredLink {
            probe: result.as_ref().ok().copied(),
            error: result.err(),
            at: Instant::now(),
        };
        if let Ok(mut m) = self.measured.write() {
            m.insert((p.id, d.id), measured);
        }
        self.rebuild_placer();
    }

    /// The placer over the profile's links and the measured ones.
    fn rebuild_placer(&self) {
        let mut cost = self.cost.clone();
        if let Ok(m) = self.measured.read() {
            for (&(a, b), link) in m.iter() {
                if let Some(probe) = link.probe.filter(|p| p.bandwidth_gbit_s > 0.0) {
                    let link = Link {
                        bandwidth_gbit_s: probe.bandwidth_gbit_s,
                        latency_ms: probe.latency_ms,
                    };
                    cost.links.push((a, b, link));
                }
            }
        }
        if let Ok(mut placer) = self.placer.write() {
            *placer = placement::for_mode(self.mode, cost);
        }
    }
}
