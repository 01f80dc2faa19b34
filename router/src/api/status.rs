//! The cluster at a glance: `GET /v1/cluster` (one [`ClusterStatus`] as JSON) and
//! `GET /v1/cluster/events` (one every [`EVENT_INTERVAL`] as server-sent events), read by the web
//! page and by `exo-router status`. Both sit behind the API key, like `/metrics`: they name the
//! nodes' addresses and hardware.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use exo_protocol::{HardwareFacts, Role};
use futures::Stream;
use serde::{Deserialize, Serialize};

use crate::cluster::{Cluster, Origin, RequestRecord};

/// How often `/v1/cluster/events` sends the cluster's state.
pub const EVENT_INTERVAL: Duration = Duration::from_secs(1);

/// The whole cluster, now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The model id clients name (the first, when the cluster serves several).
    pub model: String,
    /// Every model the cluster serves (`/v1/models`), in order of arrival.
    pub models: Vec<String>,
    /// True when a request could be placed right now (as `/health`'s `ok`).
    pub ready: bool,
    /// The profile's placement mode.
    pub placement: String,
    /// Requests admitted and not yet over.
    pub requests_in_flight: usize,
    /// Of those, the ones beyond the decode slots (waiting).
    pub queued: usize,
    /// Sequence slots of the healthy nodes that generate.
    pub decode_slots: usize,
    /// Every node of the profile.
    pub nodes: Vec<NodeStatus>,
    /// Every prefill -> decode pair that has shipped a cache, or that the profile describes.
    pub links: Vec<LinkStatus>,
    /// The last requests, newest first.
    pub recent: Vec<RequestRecord>,
}

/// One node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Its name.
    pub name: String,
    /// What it does.
    pub role: Role,
    /// Its RPC address.
    pub address: String,
    /// Listed in the profile, or found on the LAN.
    pub origin: Origin,
    /// True when the last health check succeeded.
    pub healthy: bool,
    /// Why it is down, while it is.
    pub error: Option<String>,
    /// Its machine and where its model runs, once it answered.
    pub hardware: Option<HardwareFacts>,
    /// Its exo-router version, once it answered.
    pub version: Option<String>,
    /// The model it runs, once it answered.
    pub model: Option<String>,
    /// Where the perf table the cost model uses for it comes from: `profile`, `measured` (the
    /// node measured itself at start) or `null` (none: placed by load alone).
    pub perf: Option<String>,
    /// Its sequence slots (0 until it answered).
    pub slots: usize,
    /// Of those, the ones requests hold.
    pub slots_in_use: usize,
    /// Requests placed on it and not yet over.
    pub in_flight: usize,
    /// Prompt tokens waiting for or in its prefill.
    pub prefill_backlog_tokens: u64,
    /// Prompt tokens it ran per second, lately.
    pub prefill_tok_s: f64,
    /// Tokens it generated per second, lately.
    pub decode_tok_s: f64,
}

/// One prefill -> decode pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkStatus {
    /// The node that runs the prompts.
    pub prefill: String,
    /// The node that receives their caches.
    pub decode: String,
    /// Caches shipped this way since the router started.
    pub handoffs: u64,
    /// Their tokens, summed.
    pub kv_tokens: u64,
    /// The bytes they took on the wire (compressed or not), as the decode nodes received them.
    pub kv_bytes: u64,
    /// The link's bandwidth: the profile's `[[links]]`, else measured (`null`: neither).
    pub bandwidth_gbit_s: Option<f64>,
    /// Its one-way latency, likewise.
    pub latency_ms: Option<f64>,
    /// Where those numbers come from: `profile` or `measured`.
    pub source: Option<String>,
    /// Why the last probe of the link failed, when it did.
    pub probe_error: Option<String>,
}

impl ClusterStatus {
    /// The state of `cluster` now.
    pub fn of(cluster: &Cluster) -> ClusterStatus {
        let nodes: Vec<NodeStatus> = cluster
            .nodes()
            .iter()
            .map(|n| {
                let info = n.info();
                NodeStatus {
                    name: n.name().to_string(),
                    role: n.spec.role,
                    address: n.addr(),
                    origin: n.origin,
                    healthy: n.healthy(),
                    error: n.down_reason(),
                    hardware: info.as_ref().map(|i| i.hardware.clone()),
                    perf: if n.spec.perf.is_some() {
                        Some("profile".into())
                    } else {
                        info.as_ref()
                            .and_then(|i| i.perf.as_ref())
                            .map(|_| "measured".into())
                    },
                    model: info.as_ref().map(|i| i.model.clone()),
                    version: info.map(|i| i.version),
                    slots: n.slot_count(),
                    slots_in_use: n.slot_count().saturating_sub(n.free_slots()),
                    in_flight: n.in_flight(),
                    prefill_backlog_tokens: n.prefill_backlog(),
                    prefill_tok_s: n.prefill_rate.per_second(),
                    decode_tok_s: n.decode_rate.per_second(),
                }
            })
            .collect();
        let decode_slots = cluster.decode_capacity();
        ClusterStatus {
            model: cluster.model_id(),
            models: cluster.models().into_iter().map(|m| m.id).collect(),
            ready: cluster.ready(),
            placement: cluster.mode().to_string(),
            requests_in_flight: cluster.in_flight(),
            queued: cluster.in_flight().saturating_sub(decode_slots),
            decode_slots,
            links: links(cluster),
            nodes,
            recent: cluster.activity.recent(),
        }
    }
}

/// Every prefill -> decode pair that shipped a cache, has a profile link or was measured.
fn links(cluster: &Cluster) -> Vec<LinkStatus> {
    let nodes = cluster.nodes();
    let shipped = cluster.activity.links();
    let mut out = Vec::new();
    for p in nodes.iter().filter(|n| n.spec.role.prefills()) {
        for d in nodes
            .iter()
            .filter(|n| n.spec.role.decodes() && n.id != p.id)
        {
            let tally = shipped
                .iter()
                .find(|(k, _)| *k == (p.id, d.id))
                .map(|(_, t)| *t);
            let profile = cluster.link(p.id, d.id);
            let measured = cluster.measured_link(p.id, d.id);
            let probe = measured.as_ref().and_then(|m| m.probe);
            if tally.is_none() && profile.is_none() && measured.is_none() {
                continue;
            }
            let (bandwidth, latency, source) = match (profile, probe) {
                (Some(l), _) => (
                    Some(l.bandwidth_gbit_s),
                    Some(l.latency_ms),
                    Some("profile"),
                ),
                (None, Some(m)) => (
                    Some(m.bandwidth_gbit_s),
                    Some(m.latency_ms),
                    Some("measured"),
                ),
                (None, None) => (None, None, None),
            };
            let tally = tally.unwrap_or_default();
            out.push(LinkStatus {
                prefill: p.name().to_string(),
                decode: d.name().to_string(),
                handoffs: tally.handoffs,
                kv_tokens: tally.kv_tokens,
                kv_bytes: tally.kv_bytes,
                bandwidth_gbit_s: bandwidth,
                latency_ms: latency,
                source: source.map(String::from),
                probe_error: measured.and_then(|m| m.error),
            });
        }
    }
    out
}

/// `GET /v1/cluster`.
pub async fn snapshot(State(cluster): State<Arc<Cluster>>) -> Json<ClusterStatus> {
    Json(ClusterStatus::of(&cluster))
}

/// `GET /v1/cluster/events`: the state now, then again every [`EVENT_INTERVAL`] (event `cluster`)
/// until the client leaves.
pub async fn events(
    State(cluster): State<Arc<Cluster>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let ticks = tokio_stream_interval(EVENT_INTERVAL);
    let stream = futures::StreamExt::map(ticks, move |()| {
        let status = ClusterStatus::of(&cluster);
        let event = Event::default().event("cluster");
        Ok(event
            .json_data(&status)
            .unwrap_or_else(|_| Event::default().comment("unserializable")))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// A stream that yields at once and then every `period`.
fn tokio_stream_interval(period: Duration) -> impl Stream<Item = ()> {
    futures::stream::unfold(None::<tokio::time::Interval>, move |tick| async move {
        let mut tick = tick.unwrap_or_else(|| {
            let mut t = tokio::time::interval(period);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        tick.tick().await;
        Some(((), Some(tick)))
    })
}
