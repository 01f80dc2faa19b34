//! The cluster profile: which model, which nodes in which roles, and how requests are placed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use exo_kvcache::{Codec, DEFAULT_CHUNK_SIZE, KvLayout, KvType, MAX_CHUNK_SIZE};
use exo_protocol::{NodePerf, Role};
use serde::Deserialize;

use crate::placement::cost_model::{CostModel, PIECE_CHOICES, link_between};
use crate::placement::{Link, NodeId, NodeLoad, NodeView, Objective, PlacementMode, Policy};

mod discovery;
mod nodes;
mod security;

pub use discovery::Discovery;
use nodes::RawNode;
pub use security::ApiAccess;

/// The default profile `serve` uses when none is given.
pub const DEFAULT_PROFILE: &str = "profiles/local.toml";
/// Requests admitted beyond the decode slots by default.
pub const DEFAULT_MAX_QUEUED: usize = 64;
/// Default `router.migration_limit`: enough for a request to outlive a couple of node failures,
/// few enough that a request that kills every node it reaches does not go round the cluster.
pub const DEFAULT_MIGRATION_LIMIT: u32 = 3;
/// Default `router.progress_timeout_s`: above the decode node's own waits (a cache queued for a
/// slot, a stalled transfer: 60 s each), so it only fires for a node that stopped working.
pub const DEFAULT_PROGRESS_TIMEOUT_S: f64 = 120.0;
/// A node's default RPC port.
pub const DEFAULT_NODE_PORT: u16 = 52416;
/// The router's default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:52415";

/// Why a profile was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The file could not be read.
    #[error("cannot read profile {path}: {source}")]
    Read {
        /// Profile path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown keys.
    #[error("profile {path} is invalid: {detail}")]
    Parse {
        /// Profile path.
        path: String,
        /// The parser's message.
        detail: String,
    },
    /// The profile parses but cannot work.
    #[error("profile {path}: {detail}")]
    Invalid {
        /// Profile path.
        path: String,
        /// What is wrong.
        detail: String,
    },
}

/// Where a node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeAddress {
    /// Started inside the router process, still spoken to over tarpc on a loopback port.
    Embedded,
    /// An `exo-router node` elsewhere (`host:port`).
    Remote(String),
}

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSpec {
    /// Unique name (shown in `x-exo-*-node` headers).
    pub name: String,
    /// Where it is.
    pub address: NodeAddress,
    /// What it does.
    pub role: Role,
    /// Sequence slots of an embedded node's context.
    pub slots: u32,
    /// CPU threads of an embedded node's context (`threads = N`); `None`: an equal share of the
    /// cores the other embedded nodes leave (see `exo_launcher::thread_budgets`).
    pub threads: Option<u32>,
    /// Its measured speed (`[nodes.perf]`), needed by the cost model.
    pub perf: Option<NodePerf>,
    /// Its own model (`model = "..."` in its entry), when it is not the profile's: a cluster may
    /// serve several models, each request going to nodes of the model it names.
    pub model: Option<PathBuf>,
}

/// How the KV cache travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShipping {
    /// Codec for the chunks.
    pub codec: Codec,
    /// Raw bytes per chunk.
    pub chunk_size: u32,
    /// Chunk calls in flight per transfer.
    pub chunks_in_flight: usize,
}

/// A validated profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// Where it was read from.
    pub path: PathBuf,
    /// The model file for embedded nodes.
    pub model: PathBuf,
    /// Placement mode.
    pub placement: PlacementMode,
    /// HTTP listen address.
    pub listen: SocketAddr,
    /// Requests admitted beyond the decode slots before the API answers 429.
    pub max_queued: usize,
    /// Longest a request may go without output from its decode node before it fails with 504
    /// (a wedged engine that answers polls with nothing).
    pub progress_timeout: std::time::Duration,
    /// Times one request may move to other nodes after a node serving it failed
    /// (`router.migration_limit`; 0: never, the request fails instead).
    pub migration_limit: u32,
    /// KV shipping.
    pub kv: KvShipping,
    /// KV layout of embedded nodes (slots per node come from each node).
    pub layout: KvLayout,
    /// The nodes.
    pub nodes: Vec<NodeSpec>,
    /// How `auto` placement chooses (`[policy]`).
    pub policy: Policy,
    /// Links between nodes; others use `policy.default_link`.
    pub links: Vec<(NodeId, NodeId, Link)>,
    /// Who may call the API (`[api]`).
    pub api: ApiAccess,
    /// The cluster file that secures node links with mutual TLS (`[cluster] file`); `None`: plain
    /// TCP.
    pub cluster_file: Option<PathBuf>,
    /// Nodes found on the LAN (`[discovery]`).
    pub discovery: Discovery,
}

/// The default `[policy]` link: gigabit Ethernet.
pub const DEFAULT_LINK: Link = Link {
    bandwidth_gbit_s: 1.0,
    latency_ms: 0.5,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    model: PathBuf,
    placement: PlacementMode,
    #[serde(default)]
    policy: RawPolicy,
    #[serde(default)]
    links: Vec<RawLink>,
    #[serde(default)]
    router: RawRouter,
    #[serde(default)]
    api: security::RawApi,
    #[serde(default)]
    cluster: security::RawCluster,
    #[serde(default)]
    discovery: discovery::RawDiscovery,
    #[serde(default)]
    kv: RawKv,
    #[serde(default)]
    layout: RawLayout,
    #[serde(default)]
    nodes: Vec<RawNode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawPolicy {
    objective: Objective,
    tpot_target_ms: f64,
    expected_output_tokens: u64,
    handoff_overhead_ms: f64,
    kv_bytes_per_token: Option<f64>,
    default_link: Link,
    handoff_pieces: Option<u64>,
}

impl Default for RawPolicy {
    fn default() -> Self {
        RawPolicy {
            objective: Objective::Ttft,
            tpot_target_ms: 100.0,
            expected_output_tokens: 256,
            handoff_overhead_ms: 2.0,
            kv_bytes_per_token: None,
            default_link: DEFAULT_LINK,
            handoff_pieces: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLink {
    between: [String; 2],
    bandwidth_gbit_s: f64,
    latency_ms: f64,
    #[serde(default)]
    #[allow(dead_code)]
    kind: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRouter {
    listen: Option<String>,
    max_queued: Option<usize>,
    progress_timeout_s: Option<f64>,
    migration_limit: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawKv {
    codec: String,
    chunk_size: u32,
    chunks_in_flight: usize,
}

impl Default for RawKv {
    fn default() -> Self {
        RawKv {
            codec: "none".into(),
            chunk_size: DEFAULT_CHUNK_SIZE,
            chunks_in_flight: 2,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLayout {
    type_k: String,
    type_v: String,
    flash_attn: bool,
    kv_unified: bool,
    n_ctx_seq: u32,
}

impl Default for RawLayout {
    fn default() -> Self {
        RawLayout {
            type_k: "f16".into(),
            type_v: "f16".into(),
            flash_attn: false,
            kv_unified: false,
            n_ctx_seq: 4096,
        }
    }
}

impl RawKv {
    fn validate(self) -> Result<KvShipping, String> {
        let codec: Codec = self.codec.parse().map_err(|e| format!("kv.codec: {e}"))?;
        if self.chunk_size == 0 || self.chunk_size > MAX_CHUNK_SIZE {
            return Err(format!("kv.chunk_size must be within 1..={MAX_CHUNK_SIZE}"));
        }
        Ok(KvShipping {
            codec,
            chunk_size: self.chunk_size,
            chunks_in_flight: self.chunks_in_flight.max(1),
        })
    }
}

impl RawLayout {
    fn validate(self) -> Result<KvLayout, String> {
        let kv_type = |name: &str, v: &str| -> Result<KvType, String> {
            v.parse().map_err(|e| format!("layout.{name}: {e}"))
        };
        let (type_k, type_v) = (
            kv_type("type_k", &self.type_k)?,
            kv_type("type_v", &self.type_v)?,
        );
        if self.n_ctx_seq < 16 {
            return Err("layout.n_ctx_seq must be at least 16".into());
        }
        Ok(KvLayout {
            type_k,
            type_v,
            flash_attn: self.flash_attn,
            kv_unified: self.kv_unified,
            n_seq_max: 1,
            n_ctx_seq: self.n_ctx_seq,
        })
    }
}

impl RawLink {
    fn validate(self, nodes: &[NodeSpec]) -> Result<(NodeId, NodeId, Link), String> {
        let index = |name: &str| {
            nodes
                .iter()
                .position(|n| n.name == name)
                .ok_or_else(|| format!("link names unknown node {name:?}"))
        };
        let (a, b) = (index(&self.between[0])?, index(&self.between[1])?);
        let link = Link {
            bandwidth_gbit_s: self.bandwidth_gbit_s,
            latency_ms: self.latency_ms,
        };
        link.validate()
            .map_err(|e| format!("link {:?}: {e}", self.between))?;
        Ok((a, b, link))
    }
}

impl RawPolicy {
    /// Typed values; `auto` placement needs every node's perf table and the KV bytes per token
    /// unless the cluster is not `complete` (with discovery, nodes report their own).
    fn validate(
        self,
        placement: PlacementMode,
        nodes: &[NodeSpec],
        complete: bool,
    ) -> Result<Policy, String> {
        self.default_link
            .validate()
            .map_err(|e| format!("policy.default_link: {e}"))?;
        if !(self.tpot_target_ms.is_finite() && self.tpot_target_ms > 0.0) {
            return Err("policy.tpot_target_ms must be positive".into());
        }
        if !(self.handoff_overhead_ms.is_finite() && self.handoff_overhead_ms >= 0.0) {
            return Err("policy.handoff_overhead_ms must be >= 0".into());
        }
        if self.expected_output_tokens == 0 {
            return Err("policy.expected_output_tokens must be >= 1".into());
        }
        if let Some(b) = self.kv_bytes_per_token
            && !(b.is_finite() && b > 0.0)
        {
            return Err("policy.kv_bytes_per_token must be positive".into());
        }
        if let Some(n) = self.handoff_pieces
            && !PIECE_CHOICES.contains(&n)
        {
            return Err(format!(
                "policy.handoff_pieces must be one of {PIECE_CHOICES:?}, not {n}"
            ));
        }
        if placement == PlacementMode::Auto && complete {
            if let Some(n) = nodes.iter().find(|n| n.perf.is_none()) {
                return Err(format!(
                    "placement \"auto\" needs [nodes.perf] for node {:?}: measure it with `exo-router profile`",
                    n.name
                ));
            }
            if self.kv_bytes_per_token.is_none() {
                return Err(
                    "placement \"auto\" needs policy.kv_bytes_per_token (`exo-router profile` writes it)".into(),
                );
            }
        }
        Ok(Policy {
            objective: self.objective,
            tpot_target_s: self.tpot_target_ms / 1000.0,
            expected_output_tokens: self.expected_output_tokens,
            handoff_overhead_s: self.handoff_overhead_ms / 1000.0,
            kv_bytes_per_token: self.kv_bytes_per_token.unwrap_or(0.0),
            default_link: self.default_link,
            handoff_pieces: self.handoff_pieces,
        })
    }
}

/// A placement mode needs nodes that can serve it.
fn check_placement(placement: PlacementMode, nodes: &[NodeSpec]) -> Result<(), String> {
    let can_split = nodes.iter().any(|n| n.role.prefills())
        && nodes.iter().any(|n| n.role.decodes())
        && nodes.len() >= 2;
    let can_colocate = nodes.iter().any(|n| n.role == Role::Both);
    match placement {
        PlacementMode::Disaggregated if !can_split => Err(
            "placement \"disaggregated\" needs a prefill-capable and another decode-capable node"
                .into(),
        ),
        PlacementMode::Colocated if !can_colocate => {
            Err("placement \"colocated\" needs a node with role \"both\"".into())
        }
        PlacementMode::Auto if !can_split && !can_colocate => Err(
            "no node can serve a request: add a \"both\" node or a prefill and a decode node"
                .into(),
        ),
        _ => Ok(()),
    }
}

/// `router.progress_timeout_s`, checked: a positive, finite number of seconds.
fn progress_timeout(secs: Option<f64>) -> Result<std::time::Duration, String> {
    let secs = secs.unwrap_or(DEFAULT_PROGRESS_TIMEOUT_S);
    std::time::Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            format!("router.progress_timeout_s must be a positive number of seconds, not {secs}")
        })
}

impl Profile {
    /// Reads and validates a profile file.
    pub fn load(path: &Path) -> Result<Profile, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Profile::parse(&text, path)
    }

    /// Parses and validates profile text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Profile, ProfileError> {
        let p = path.display().to_string();
        let raw: RawProfile = toml::from_str(text).map_err(|e| ProfileError::Parse {
            path: p.clone(),
            detail: e.to_string(),
        })?;
        let invalid = |detail: String| ProfileError::Invalid { path: p, detail };
        Profile::validate(raw, path).map_err(invalid)
    }

    /// Turns the file's fields into typed values; the error says what is wrong.
    fn validate(raw: RawProfile, path: &Path) -> Result<Profile, String> {
        let listen = raw.router.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen: SocketAddr = listen
            .parse()
            .map_err(|e| format!("router.listen {listen:?}: {e}"))?;
        let kv = raw.kv.validate()?;
        let layout = raw.layout.validate()?;
        let nodes = raw.nodes.into_iter().try_fold(Vec::new(), |mut nodes, n| {
            let spec = n.validate(&nodes)?;
            nodes.push(spec);
            Ok::<_, String>(nodes)
        })?;
        let discovery = raw.discovery.validate()?;
        // With discovery, the nodes the mode needs may come from the LAN. Each model's nodes
        // must be able to serve its requests on their own.
        if !discovery.enabled {
            let own = |n: &NodeSpec| n.model.clone().filter(|m| *m != raw.model);
            let mut models: Vec<Option<PathBuf>> = Vec::new();
            for m in nodes.iter().map(own) {
                if !models.contains(&m) {
                    models.push(m);
                }
            }
            for m in &models {
                let group: Vec<NodeSpec> = nodes.iter().filter(|n| own(n) == *m).cloned().collect();
                check_placement(raw.placement, &group).map_err(|e| match m {
                    Some(path) => format!("the nodes of model {}: {e}", path.display()),
                    None if models.len() > 1 => {
                        format!("the nodes of model {}: {e}", raw.model.display())
                    }
                    None => e,
                })?;
            }
        }
        let links = raw
            .links
            .into_iter()
            .map(|l| l.validate(&nodes))
            .collect::<Result<Vec<_>, _>>()?;
        // With discovery, nodes may bring their own perf tables (`node --measure`).
        let policy = raw
            .policy
            .validate(raw.placement, &nodes, !discovery.enabled)?;
        let api = raw.api.validate(path)?;
        Ok(Profile {
            api,
            cluster_file: raw.cluster.validate(path),
            discovery,
            policy,
            links,
            path: path.to_path_buf(),
            model: raw.model,
            placement: raw.placement,
            listen,
            max_queued: raw.router.max_queued.unwrap_or(DEFAULT_MAX_QUEUED),
            progress_timeout: progress_timeout(raw.router.progress_timeout_s)?,
            migration_limit: raw
                .router
                .migration_limit
                .unwrap_or(DEFAULT_MIGRATION_LIMIT),
            kv,
            layout,
            nodes,
        })
    }

    /// The cost model over this profile's policy and links, weighing the placements `mode` admits.
    pub fn cost_model(&self, mode: PlacementMode) -> CostModel {
        CostModel {
            policy: self.policy,
            links: self.links.clone(),
            mode,
        }
    }

    /// The link between nodes `a` and `b`: the one the profile names, else `policy.default_link`.
    pub fn link(&self, a: NodeId, b: NodeId) -> Link {
        link_between(&self.links, a, b).unwrap_or(self.policy.default_link)
    }

    /// Every node as a placer sees it on an idle cluster (`plan`, and the simulator's start).
    pub fn idle_views(&self) -> Vec<NodeView<'_>> {
        self.nodes
            .iter()
            .enumerate()
            .map(|(id, n)| NodeView {
                id,
                role: n.role,
                slots: n.slots,
                perf: n.perf.as_ref(),
                load: NodeLoad::default(),
                in_flight: 0,
            })
            .collect()
    }

    /// True when every node has a perf table and the policy knows the KV size: the cost model
    /// can run (`plan`, `simulate`, `auto`).
    pub fn has_cost_model(&self) -> bool {
        self.policy.kv_bytes_per_token > 0.0 && self.nodes.iter().all(|n| n.perf.is_some())
    }

    /// True if any node runs inside the router process (the router then loads the model).
    pub fn has_embedded(&self) -> bool {
        self.nodes
            .iter()
            .any(|n| n.address == NodeAddress::Embedded)
    }

    /// The name clients give the model node `n` runs: its file name without `.gguf`.
    pub fn model_name(&self, n: &NodeSpec) -> String {
        let path = n.model.as_ref().unwrap_or(&self.model);
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// The models the nodes run, by name, in the order the nodes first name them.
    pub fn model_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for n in &self.nodes {
            let name = self.model_name(n);
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
    }

    /// This profile narrowed to the nodes that run model `name` (and the links between them), for
    /// `plan` and `simulate`, which place one model's requests. `None` is fine for a profile of one
    /// model; one of several models must be named.
    pub fn for_model(&self, name: Option<&str>) -> Result<Profile, String> {
        let names = self.model_names();
        let name = match name {
            Some(n) if names.iter().any(|m| m == n) => n.to_string(),
            Some(n) => {
                return Err(format!(
                    "no node of the profile runs {n:?}; it runs {}",
                    names.join(", ")
                ));
            }
            None if names.len() <= 1 => return Ok(self.clone()),
            None => {
                return Err(format!(
                    "the profile serves several models ({}): name one with --model",
                    names.join(", ")
                ));
            }
        };
        let kept: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.model_name(&self.nodes[i]) == name)
            .collect();
        let new_id = |old: NodeId| kept.iter().position(|&k| k == old);
        let mut narrowed = self.clone();
        narrowed.model = kept
            .first()
            .and_then(|&i| self.nodes[i].model.clone())
            .unwrap_or_else(|| self.model.clone());
        narrowed.nodes = kept
            .iter()
            .map(|&i| NodeSpec {
                model: None,
                ..self.nodes[i].clone()
            })
            .collect();
        narrowed.links = self
            .links
            .iter()
            .filter_map(|&(a, b, link)| Some((new_id(a)?, new_id(b)?, link)))
            .collect();
        Ok(narrowed)
    }
}

#[cfg(test)]
mod tests;
