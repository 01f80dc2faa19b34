//! Who is in the cluster: connecting to nodes and checking them ([`Cluster::run_health`]), the
//! checks a node must pass to serve (model, role, KV layout), and nodes found on the LAN
//! ([`Cluster::run_discovery`]): a node that announces itself joins within a health check, one that
//! says goodbye stops being used (its requests in flight finish), and one that comes back joins
//! again under the same id.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use exo_protocol::discovery::{Announcement, Browser, DiscoveryError, Sighting};
use exo_protocol::{NodeInfo, connect, context_with_deadline};

use super::{Cluster, ClusterNode, HEALTH_INTERVAL, HELLO_TIMEOUT, ServedModel};
use crate::profile::{NodeAddress, NodeSpec};

/// Where a node of the cluster came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// The profile lists it.
    Profile,
    /// It announced itself on the LAN.
    Discovered,
}

impl Cluster {
    /// Connects (if needed) and says hello; marks the node up or down.
    pub(super) async fn check(&self, node: &Arc<ClusterNode>) {
        let (client, fresh) = match node.client() {
            Some(c) => (c, false),
            None => match connect(&node.addr(), &self.security).await {
                Ok(c) => (c, true),
                Err(e) => {
                    node.mark_down(&format!("connect: {e}"));
                    return;
                }
            },
        };
        let info = match client.hello(context_with_deadline(HELLO_TIMEOUT)).await {
            Ok(info) => info,
            Err(e) => {
                // A node under TLS closes a plain connection without a word.
                let hint = if fresh && !self.security.is_tls() {
                    " (a node started with --cluster closes plain connections: give the router the same cluster file)"
                } else {
                    ""
                };
                node.mark_down(&format!("hello: {e}{hint}"));
                return;
            }
        };
        if let Err(why) = self.accept_node(node, &info) {
            node.mark_down(&why);
            return;
        }
        if let Ok(mut c) = node.client.write() {
            *c = Some(client);
        }
        node.set_slot_count(info.layout.n_seq_max as usize);
        if let Ok(mut i) = node.info.write() {
            *i = Some(info);
        }
        if !node.healthy.swap(true, Ordering::Relaxed) {
            tracing::info!(node = %node.spec.name, addr = %node.addr(), role = %node.spec.role, "node up");
        }
    }

    /// A node joins with the role the profile gives it and a model the cluster can tell apart
    /// from its others (a new model joins with it), and stays only while it reports no fault.
    fn accept_node(&self, node: &ClusterNode, info: &NodeInfo) -> Result<(), String> {
        if let Some(fault) = &info.fault {
            return Err(format!("cannot serve: {fault}"));
        }
        // A discovered node's address came from the LAN: it must be the node that announced it
        // (a loopback address may reach another node of this machine).
        if node.origin == Origin::Discovered && info.name != node.spec.name {
            return Err(format!(
                "{} answers as {:?}, not as the node that announced it",
                node.addr(),
                info.name
            ));
        }
        if info.role != node.spec.role {
            return Err(format!(
                "reports role {}, the profile says {}",
                info.role, node.spec.role
            ));
        }
        // Every decode-capable node must accept caches from every prefill-capable node of its
        // model.
        let same_model = |o: &NodeInfo| o.fingerprint == info.fingerprint;
        for other in self
            .nodes()
            .iter()
            .filter_map(|n| n.info())
            .filter(same_model)
        {
            let (p, d) = match (
                info.role.prefills() && other.role.decodes(),
                info.role.decodes() && other.role.prefills(),
            ) {
                (true, _) => (info.layout, other.layout),
                (_, true) => (other.layout, info.layout),
                _ => continue,
            };
            d.accepts(&p)
                .map_err(|e| format!("KV layout incompatible with node {}: {e}", other.name))?;
        }
        // Only a node that passed every check brings its model.
        self.register_model(info)
    }

    /// Adds the node's model to those the cluster serves unless it is there already; a model of
    /// the same name but another file is refused (clients could not tell them apart).
    fn register_model(&self, info: &NodeInfo) -> Result<(), String> {
        let mut models = self
            .models
            .write()
            .map_err(|_| "lock poisoned".to_string())?;
        if models.iter().any(|m| m.fingerprint == info.fingerprint) {
            return Ok(());
        }
        if let Some(i) = models.iter().position(|m| m.id == info.model) {
            let old = models[i].fingerprint;
            // The other file still served: clients could not tell the two apart.
            let served = self
                .nodes()
                .iter()
                .any(|n| n.healthy() && n.info().is_some_and(|i| i.fingerprint == old));
            if served {
                return Err(format!(
                    "runs model {} ({}), the cluster's {} is another file ({})",
                    info.model, info.fingerprint, info.model, old
                ));
            }
            // No node serves the old file any more (an updated model, say): the new one takes
            // its name.
            models.remove(i);
        }
        tracing::info!(model = %info.model, fingerprint = %info.fingerprint, "serving a model");
        models.push(ServedModel {
            id: info.model.clone(),
            fingerprint: info.fingerprint,
        });
        Ok(())
    }

    /// Checks every node periodically, reconnecting those that are down.
    pub async fn run_health(self: Arc<Self>) {
        let mut tick = tokio::time::interval(HEALTH_INTERVAL);
        loop {
            tick.tick().await;
            let nodes = self.nodes();
            let present = nodes.iter().filter(|n| !n.has_left());
            futures::future::join_all(present.map(|n| self.check(n))).await;
        }
    }

    /// Browses the LAN for nodes on `interfaces` (all when empty) and lets in those that announce
    /// themselves, for as long as the router runs. Fails only when mDNS cannot start.
    pub async fn run_discovery(
        self: Arc<Self>,
        interfaces: Vec<String>,
    ) -> Result<(), DiscoveryError> {
        let browser = Browser::start(&interfaces)?;
        tracing::info!(?interfaces, "browsing the LAN for nodes");
        while let Some(sighting) = browser.next().await {
            match sighting {
                Sighting::Seen {
                    announcement,
                    addrs,
                } => self.seen(announcement, addrs),
                Sighting::Gone { name } => self.gone(&name),
                Sighting::Unreadable(why) => tracing::debug!(%why, "announcement ignored"),
            }
        }
        Ok(())
    }

    /// A node announced itself at `addrs`: a new one is added, a known one that left or moved is
    /// updated; either is checked at once (not at the next health tick).
    fn seen(self: &Arc<Self>, ann: Announcement, addrs: Vec<std::net::SocketAddr>) {
        let Some(first) = addrs.first() else {
            return;
        };
        let known = self.nodes().into_iter().find(|n| n.name() == ann.name);
        let node = match known {
            // The profile's entry for the same name wins over what the LAN says.
            Some(n) if n.origin == Origin::Profile => return,
            Some(n) => {
                let was_away = n.left.swap(false, Ordering::Relaxed);
                if was_away {
                    tracing::info!(node = %ann.name, "node is back");
                }
                n
            }
            None => {
                let Ok(mut nodes) = self.nodes.write() else {
                    return;
                };
                let spec = NodeSpec {
                    name: ann.name.clone(),
                    address: NodeAddress::Remote(first.to_string()),
                    role: ann.role,
                    slots: ann.layout.n_seq_max,
                    threads: None,
                    perf: None,
                    model: None,
                };
                let node =
                    ClusterNode::new(nodes.len(), spec, Origin::Discovered, first.to_string());
                let node = Arc::new(node);
                nodes.push(Arc::clone(&node));
                tracing::info!(node = %ann.name, role = %ann.role, ?addrs, "node found on the LAN");
                node
            }
        };
        let cluster = Arc::clone(self);
        tokio::spawn(async move {
            cluster.reach(&node, &addrs).await;
            cluster.check(&node).await;
        });
    }

    /// Points a discovered node at the first of `addrs` that accepts a connection, else at the
    /// first of them (the preferred one: the health check then reports why it fails there).
    async fn reach(&self, node: &ClusterNode, addrs: &[std::net::SocketAddr]) {
        if node.healthy() {
            return;
        }
        let set = |addr: String| {
            if let Ok(mut a) = node.addr.write() {
                *a = addr;
            }
        };
        for addr in addrs {
            let addr = addr.to_string();
            if let Ok(client) = connect(&addr, &self.security).await {
                set(addr);
                if let Ok(mut c) = node.client.write() {
                    *c = Some(client);
                }
                return;
            }
        }
        if let Some(first) = addrs.first() {
            set(first.to_string());
        }
    }

    /// A discovered node said goodbye: nothing new is placed on it; its requests in flight go on.
    fn gone(&self, name: &str) {
        let node = self.nodes().into_iter().find(|n| n.name() == name);
        if let Some(node) = node.filter(|n| n.origin == Origin::Discovered) {
            node.left.store(true, Ordering::Relaxed);
            node.mark_down(super::LEFT);
        }
    }
}
