//! The router's view of the cluster: membership (connections to the nodes, the model and KV layout
//! each must share), health checks, admission (429 past the queue limit), and the live load the
//! placer reads; [`Cluster::place`] counts a request on its nodes until it ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use exo_protocol::{
    LinkSecurity, ModelFingerprint, NodeInfo, NodeServiceClient, RequestId, ToolSyntax,
    context_with_deadline,
};

use crate::api::error::ApiError;
use crate::placement::cost_model::CostModel;
use crate::placement::{
    self, Choice, Link, NodeId, NodeLoad, NodeView, PlacementMode, Placer, RequestShape,
};
use crate::profile::{KvShipping, NodeSpec, Profile};

mod activity;
mod admission;
mod guards;
mod links;
mod membership;

pub use activity::{Activity, LinkTally, Outcome, Rate, RequestRecord};
pub use links::MeasuredLink;
pub use membership::Origin;

pub use guards::{Admission, DecodeLoad, InFlight, Placement, PrefillLoad, SlotPermit};

/// Why a discovered node that said goodbye is down.
const LEFT: &str = "left the cluster (it said goodbye)";

/// Characters per prompt token assumed until the first prefill reports a real count.
const INITIAL_CHARS_PER_TOKEN: f64 = 4.0;

/// Deadline of a health check.
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);
/// Deadline of a token count.
const COUNT_TIMEOUT: Duration = Duration::from_secs(30);
/// How often nodes are checked (and down nodes retried).
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);

/// One node as the router sees it.
pub struct ClusterNode {
    /// Its position in the profile.
    pub id: NodeId,
    /// Its profile entry (for a node found on the LAN, made from its announcement).
    pub spec: NodeSpec,
    /// Where it came from.
    pub origin: Origin,
    /// Its RPC address (a discovered node's may change when it announces itself again).
    addr: RwLock<String>,
    /// A discovered node that said goodbye: not checked or used until it is seen again.
    left: AtomicBool,
    client: RwLock<Option<NodeServiceClient>>,
    info: RwLock<Option<NodeInfo>>,
    healthy: AtomicBool,
    /// Why the node is down, while it is (the last failed contact).
    down_reason: RwLock<Option<String>>,
    in_flight: AtomicUsize,
    /// Prompt tokens placed here whose prefill has not finished (estimated until tokenized).
    prefill_backlog: AtomicU64,
    /// Requests generating here.
    decoding: AtomicUsize,
    /// Their context tokens, summed.
    decode_ctx: AtomicU64,
    /// One permit per sequence slot of the node (once it has said how many it has): a request
    /// holds one from before its prompt runs until it ends, so a cache is only shipped to a
    /// decode node with a slot waiting for it, and decode-node memory stays bounded by its slots.
    slots: Arc<tokio::sync::Semaphore>,
    /// The slot count the permits were made for (0 until the node first answered).
    slot_count: AtomicUsize,
    /// Prompt tokens it ran, per second.
    pub prefill_rate: Rate,
    /// Tokens it generated, per second.
    pub decode_rate: Rate,
}

impl ClusterNode {
    /// The node's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Its RPC address.
    pub fn addr(&self) -> String {
        self.addr.read().map(|a| a.clone()).unwrap_or_default()
    }

    /// Whether the node runs `model` (as its last `hello` said).
    pub fn runs(&self, model: &ServedModel) -> bool {
        self.info()
            .is_some_and(|i| i.fingerprint == model.fingerprint)
    }

    /// True for a discovered node that said goodbye and was not seen since.
    pub fn has_left(&self) -> bool {
        self.left.load(Ordering::Relaxed)
    }

    /// A node at `addr` as the profile or an announcement describes it, not contacted yet.
    fn new(id: NodeId, spec: NodeSpec, origin: Origin, addr: String) -> ClusterNode {
        ClusterNode {
            id,
            spec,
            origin,
            addr: RwLock::new(addr),
            left: AtomicBool::new(false),
            client: RwLock::new(None),
            info: RwLock::new(None),
            healthy: AtomicBool::new(false),
            down_reason: RwLock::new(Some("not contacted yet".into())),
            in_flight: AtomicUsize::new(0),
            prefill_backlog: AtomicU64::new(0),
            decoding: AtomicUsize::new(0),
            decode_ctx: AtomicU64::new(0),
            slots: Arc::new(tokio::sync::Semaphore::new(0)),
            slot_count: AtomicUsize::new(0),
            prefill_rate: Rate::default(),
            decode_rate: Rate::default(),
        }
    }

    /// Waits up to `timeout` for one of the node's sequence slots and holds it until the permit
    /// is dropped; `None` when none freed in time.
    pub async fn reserve_slot(self: &Arc<Self>, timeout: Duration) -> Option<SlotPermit> {
        let permit = Arc::clone(&self.slots).acquire_owned();
        let permit = match tokio::time::timeout(timeout, permit).await {
            Ok(Ok(permit)) => permit,
            _ => return None,
        };
        let permit = SlotPermit {
            permit: Some(permit),
            node: Arc::clone(self),
        };
        permit.publish();
        Some(permit)
    }

    /// Slots free for new requests (permits not held).
    pub fn free_slots(&self) -> usize {
        self.slots.available_permits()
    }

    /// Its sequence slots (0 until it first answered).
    pub fn slot_count(&self) -> usize {
        self.slot_count.load(Ordering::Relaxed)
    }

    /// Prompt tokens placed here whose prefill has not finished.
    pub fn prefill_backlog(&self) -> u64 {
        self.prefill_backlog.load(Ordering::Relaxed)
    }

    /// Makes the permits for `n` slots the first time the node says how many it has.
    fn set_slot_count(&self, n: usize) {
        if self
            .slot_count
            .compare_exchange(0, n, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.slots.add_permits(n);
        }
    }

    /// What it reported on connect, once connected.
    pub fn info(&self) -> Option<NodeInfo> {
        self.info.read().ok().and_then(|i| i.clone())
    }

    /// Why the node is down (`None` while it is up).
    pub fn down_reason(&self) -> Option<String> {
        if self.healthy() {
            return None;
        }
        // Checks that fail after the goodbye (the node is stopping) do not hide why it went.
        if self.has_left() {
            return Some(LEFT.into());
        }
        self.down_reason.read().ok().and_then(|r| r.clone())
    }

    /// True when the last contact succeeded.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Requests placed on this node and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// What the node is doing, as the cost model sees it.
    pub fn load(&self) -> NodeLoad {
        NodeLoad {
            prefill_backlog: self.prefill_backlog.load(Ordering::Relaxed),
            decoding: u32::try_from(self.decoding.load(Ordering::Relaxed)).unwrap_or(u32::MAX),
            decode_ctx: self.decode_ctx.load(Ordering::Relaxed),
        }
    }

    /// The RPC client, if connected.
    pub fn client(&self) -> Option<NodeServiceClient> {
        self.client.read().ok().and_then(|c| c.clone())
    }

    /// Marks the node down after a failed call; the health loop reconnects it.
    pub fn mark_down(&self, why: &str) {
        let was_up = self.healthy.swap(false, Ordering::Relaxed);
        let changed = self
            .down_reason
            .write()
            .map(|mut r| {
                let changed = r.as_deref() != Some(why);
                *r = Some(why.to_string());
                changed
            })
            .unwrap_or(true);
        // Logged when the node goes down, and when the reason changes (a node that never came up
        // says why once, not at every health check).
        if was_up || changed {
            tracing::warn!(node = %self.spec.name, addr = %self.addr(), %why, "node down");
        }
        if let Ok(mut c) = self.client.write() {
            *c = None;
        }
    }
}

/// All nodes of the cluster.
pub struct Cluster {
    /// Every node ever known, in order of arrival: a node's [`NodeId`] is its index, and entries
    /// are never removed (a node that leaves is marked so), so ids stay valid.
    nodes: RwLock<Vec<Arc<ClusterNode>>>,
    mode: PlacementMode,
    /// The placer for `mode`, made again when a link is measured ([`Cluster::run_link_probes`]).
    placer: RwLock<Box<dyn Placer>>,
    /// The profile's cost model (its links only); measured links are added to a copy of it.
    cost: CostModel,
    /// Links measured between node pairs the profile describes no link for.
    measured: RwLock<HashMap<(NodeId, NodeId), MeasuredLink>>,
    /// How KV caches travel.
    pub kv: KvShipping,
    /// The models the nodes serve, in order of first arrival (a model is its fingerprint; its id
    /// is the name the first node running it gave).
    models: RwLock<Vec<ServedModel>>,
    /// The id clients see before any node answered: the profile model's file name.
    default_id: String,
    next_id: AtomicU64,
    /// Requests admitted and not yet finished, per model (each model's queue is bounded by its
    /// own decode slots); their sum is the cluster's.
    admitted: Mutex<HashMap<ModelFingerprint, usize>>,
    max_queued: usize,
    /// Longest a request may go without output (the profile's `router.progress_timeout_s`).
    pub progress_timeout: Duration,
    /// Times a request may move after a node serving it failed (`router.migration_limit`).
    pub migration_limit: u32,
    expected_output_tokens: u64,
    chars_per_token: Mutex<f64>,
    /// How links to the nodes are secured.
    security: LinkSecurity,
    /// The links the profile describes.
    links: Vec<(NodeId, NodeId, Link)>,
    /// What it has done lately.
    pub activity: Activity,
}

/// A model the cluster serves: the id clients name, and the file (fingerprint) every node serving
/// it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedModel {
    /// The id clients name.
    pub id: String,
    /// What every node serving it runs.
    pub fingerprint: ModelFingerprint,
}

impl Cluster {
    /// Connects to the nodes of `profile`, node `i` at `addrs[i]` (nodes that do not answer yet are
    /// retried by [`Cluster::run_health`]). `models` are those the launcher loaded for embedded
    /// nodes; every other model joins with the first node that runs it.
    pub async fn connect(
        profile: &Profile,
        addrs: Vec<String>,
        models: Vec<ServedModel>,
        security: LinkSecurity,
    ) -> Arc<Cluster> {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let stem = || {
            let stem = profile.model.file_stem();
            stem.map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let nodes = profile.nodes.iter().zip(addrs).enumerate();
        let nodes = nodes.map(|(id, (spec, addr))| {
            Arc::new(ClusterNode::new(id, spec.clone(), Origin::Profile, addr))
        });
        let cluster = Arc::new(Cluster {
            nodes: RwLock::new(nodes.collect()),
            mode: profile.placement,
            placer: RwLock::new(placement::for_mode(
                profile.placement,
                profile.cost_model(PlacementMode::Auto),
            )),
            cost: profile.cost_model(PlacementMode::Auto),
            measured: RwLock::new(HashMap::new()),
            kv: profile.kv,
            models: RwLock::new(models),
            default_id: stem(),
            next_id: AtomicU64::new(seed << 16),
            admitted: Mutex::new(HashMap::new()),
            max_queued: profile.max_queued,
            progress_timeout: profile.progress_timeout,
            migration_limit: profile.migration_limit,
            expected_output_tokens: profile.policy.expected_output_tokens,
            chars_per_token: Mutex::new(INITIAL_CHARS_PER_TOKEN),
            security,
            links: profile.links.clone(),
            activity: Activity::default(),
        });
        let nodes = cluster.nodes();
        futures::future::join_all(nodes.iter().map(|n| cluster.check(n))).await;
        cluster
    }

    /// The id of the cluster's first model (the profile model's file name until a node answered):
    /// what a one-model cluster's status and logs name.
    pub fn model_id(&self) -> String {
        self.models()
            .first()
            .map_or_else(|| self.default_id.clone(), |m| m.id.clone())
    }

    /// The models the cluster serves, in order of arrival.
    pub fn models(&self) -> Vec<ServedModel> {
        self.models.read().map(|m| m.clone()).unwrap_or_default()
    }

    /// The served model a request names; a missing or unknown name is a 400 that lists the models.
    pub fn resolve_model(&self, requested: Option<&str>) -> Result<ServedModel, ApiError> {
        let Some(name) = requested else {
            return Err(ApiError::bad("model", "you must provide a model parameter"));
        };
        let models = self.models();
        if let Some(m) = models.iter().find(|m| m.id == name) {
            return Ok(m.clone());
        }
        if name == self.default_id {
            // The profile's model, before any node running it answered: a node is missing,
            // not the model.
            return Err(ApiError::Unavailable(format!(
                "no node serving `{name}` has answered yet"
            )));
        }
        let served = if models.is_empty() {
            format!("`{}` (no node has answered yet)", self.default_id)
        } else {
            models
                .iter()
                .map(|m| format!("`{}`", m.id))
                .collect::<Vec<_>>()
                .join(", ")
        };
        Err(ApiError::BadRequest {
            message: format!("the model `{name}` does not exist; this server serves {served}"),
            param: Some("model"),
            code: Some("model_not_found"),
        })
    }

    /// How `model` writes tool calls, as the first node running it that answered reports.
    pub fn tool_syntax(&self, model: &ServedModel) -> ToolSyntax {
        self.nodes()
            .iter()
            .filter_map(|n| n.info())
            .find(|i| i.fingerprint == model.fingerprint)
            .map(|i| i.tool_syntax)
            .unwrap_or_default()
    }

    /// The nodes, now (the profile's, then those found on the LAN in order of arrival).
    pub fn nodes(&self) -> Vec<Arc<ClusterNode>> {
        self.nodes.read().map(|n| n.clone()).unwrap_or_default()
    }

    /// Node `id`.
    pub fn node(&self, id: NodeId) -> Option<Arc<ClusterNode>> {
        self.nodes.read().ok()?.get(id).cloned()
    }

    /// The tokens `prompt` comes to on `model`, counted by a healthy prefill-capable node running
    /// it (503 when there is none).
    pub async fn count_tokens(
        &self,
        model: &ServedModel,
        prompt: exo_protocol::Prompt,
    ) -> Result<u32, ApiError> {
        let node = self
            .nodes()
            .into_iter()
            .filter(|n| n.healthy() && n.spec.role.prefills() && n.runs(model))
            .find_map(|n| n.client().map(|c| (n, c)));
        let Some((node, client)) = node else {
            return Err(ApiError::Unavailable(
                "no healthy node can count tokens".into(),
            ));
        };
        let ctx = context_with_deadline(COUNT_TIMEOUT);
        match client.count_tokens(ctx, prompt).await {
            Ok(counted) => counted.map_err(ApiError::from),
            Err(e) => Err(ApiError::Unavailable(format!(
                "node {} did not count: {e}",
                node.name()
            ))),
        }
    }

    /// How it places requests.
    pub fn mode(&self) -> PlacementMode {
        self.mode
    }

    /// The link between nodes `a` and `b` as the profile describes it (`None`: not described).
    pub fn link(&self, a: NodeId, b: NodeId) -> Option<Link> {
        placement::cost_model::link_between(&self.links, a, b)
    }

    /// A fresh request id, 128 bits from the OS's random source (the HTTP layer takes one per
    /// request; it names the request in the response, the logs and every RPC).
    pub fn next_id(&self) -> RequestId {
        let mut bytes = [0u8; 16];
        if getrandom::fill(&mut bytes).is_err() {
            // No OS randomness (not seen on any supported system): still unique, but guessable.
            tracing::warn!("no randomness from the OS; this request id is sequential");
            let n = self.next_id.fetch_add(1, Ordering::Relaxed);
            return RequestId(u128::from(n));
        }
        RequestId(u128::from_le_bytes(bytes))
    }

    /// Estimated tokens of a prompt of `chars` characters, before any node has tokenized it.
    pub fn estimate_tokens(&self, chars: usize) -> u64 {
        let per = self
            .chars_per_token
            .lock()
            .map_or(INITIAL_CHARS_PER_TOKEN, |c| *c);
        ((chars as f64 / per).ceil() as u64).max(1)
    }

    /// Learns the characters per token from a prompt the prefill node tokenized.
    pub fn observe_prompt(&self, chars: usize, tokens: u32) {
        if tokens == 0 || chars == 0 {
            return;
        }
        let seen = chars as f64 / f64::from(tokens);
        if let Ok(mut c) = self.chars_per_token.lock() {
            *c = 0.9 * *c + 0.1 * seen;
        }
    }

    /// Output tokens the cost model assumes for a request (its `max_tokens`, at most the
    /// profile's `policy.expected_output_tokens`).
    pub fn expected_output(&self, max_tokens: u32) -> u64 {
        u64::from(max_tokens).min(self.expected_output_tokens)
    }

    /// Chooses where a request for `model` would run now, without counting it anywhere. Only
    /// nodes running the model are candidates.
    pub fn choose(&self, model: &ServedModel, shape: RequestShape) -> Result<Choice, ApiError> {
        let nodes = self.nodes();
        let infos: Vec<Option<NodeInfo>> = nodes.iter().map(|n| n.info()).collect();
        // The healthy nodes as placers see them, with their live load; the profile's perf table,
        // else the one the node measured itself.
        let views: Vec<NodeView<'_>> = nodes
            .iter()
            .zip(&infos)
            .filter(|(n, _)| n.healthy() && n.runs(model))
            .map(|(n, info)| NodeView {
                id: n.id,
                role: n.spec.role,
                slots: info.as_ref().map_or(n.spec.slots, |i| i.layout.n_seq_max),
                perf: n
                    .spec
                    .perf
                    .as_ref()
                    .or(info.as_ref().and_then(|i| i.perf.as_ref())),
                load: n.load(),
                in_flight: n.in_flight(),
            })
            .collect();
        let chosen = self
            .placer
            .read()
            .ok()
            .and_then(|p| p.choose(&views, shape));
        chosen.ok_or_else(|| {
            ApiError::Unavailable(format!(
                "no healthy node can serve this request for {} ({} placement)",
                model.id, self.mode
            ))
        })
    }

    /// Chooses where a request runs, by the profile's placement mode and the nodes' current load,
    /// and counts it on those nodes until the returned placement is dropped.
    pub fn place(&self, model: &ServedModel, shape: RequestShape) -> Result<Placement, ApiError> {
        let choice = self.choose(model, shape)?;
        let node = |id: NodeId| {
            let node = self.node(id);
            node.ok_or_else(|| ApiError::Internal(format!("placement chose unknown node {id}")))
        };
        let (prefill, decode) = (node(choice.prefill)?, node(choice.decode)?);
        let mode = choice.kind().name();
        let codec = choice.codec.unwrap_or(self.kv.codec);
        let predicted = choice.predicted;
        match &predicted {
            Some(p) => tracing::info!(
                mode,
                prefill = prefill.name(),
                decode = decode.name(),
                prompt_tokens = shape.prompt_tokens,
                output_tokens = shape.output_tokens,
                codec = codec.name(),
                ttft_ms = p.ttft_s * 1e3,
                tpot_ms = p.tpot_s * 1e3,
                e2e_ms = p.e2e_s * 1e3,
                "placed by the cost model"
            ),
            None => tracing::debug!(
                mode,
                prefill = prefill.name(),
                decode = decode.name(),
                "placed"
            ),
        }
        metrics::counter!(
            "exo_placements_total",
            "mode" => mode,
            "prefill" => prefill.name().to_string(),
            "decode" => decode.name().to_string()
        )
        .increment(1);
        let mut guards = vec![InFlight::new(&prefill)];
        if !Arc::ptr_eq(&prefill, &decode) {
            guards.push(InFlight::new(&decode));
        }
        prefill
            .prefill_backlog
            .fetch_add(shape.prompt_tokens, Ordering::Relaxed);
        decode.decoding.fetch_add(1, Ordering::Relaxed);
        decode
            .decode_ctx
            .fetch_add(shape.prompt_tokens, Ordering::Relaxed);
        Ok(Placement {
            prefill_load: Some(PrefillLoad {
                node: Arc::clone(&prefill),
                tokens: shape.prompt_tokens,
            }),
            decode_load: DecodeLoad {
                node: Arc::clone(&decode),
                ctx: shape.prompt_tokens,
            },
            prefill,
            decode,
            guards,
            codec,
            pieces: choice.pieces,
            predicted,
        })
    }
}
