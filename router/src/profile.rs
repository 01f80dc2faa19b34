//! The cluster profile: which model, which nodes in which roles, and how requests are placed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use exo_kvcache::{Codec, DEFAULT_CHUNK_SIZE, KvLayout, KvType, MAX_CHUNK_SIZE};
use exo_protocol::Role;
use serde::Deserialize;

/// The default profile `serve` uses when none is given.
pub const DEFAULT_PROFILE: &str = "profiles/local.toml";
/// Requests admitted beyond the decode slots by default.
pub const DEFAULT_MAX_QUEUED: usize = 64;
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

/// How the router splits requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlacementMode {
    /// Prefill on one node, decode on another.
    Disaggregated,
    /// Prefill and decode on one `both` node.
    Colocated,
    /// Disaggregate when both roles are available, otherwise colocate.
    Auto,
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// Unique name (shown in `x-exo-*-node` headers).
    pub name: String,
    /// Where it is.
    pub address: NodeAddress,
    /// What it does.
    pub role: Role,
    /// Sequence slots of an embedded node's context.
    pub slots: u32,
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
    /// KV shipping.
    pub kv: KvShipping,
    /// KV layout of embedded nodes (slots per node come from each node).
    pub layout: KvLayout,
    /// The nodes.
    pub nodes: Vec<NodeSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    model: PathBuf,
    placement: PlacementMode,
    #[serde(default)]
    router: RawRouter,
    #[serde(default)]
    kv: RawKv,
    #[serde(default)]
    layout: RawLayout,
    #[serde(default)]
    nodes: Vec<RawNode>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRouter {
    listen: Option<String>,
    max_queued: Option<usize>,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: String,
    address: String,
    role: String,
    #[serde(default)]
    slots: Option<u32>,
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
        let invalid = |detail: String| ProfileError::Invalid {
            path: p.clone(),
            detail,
        };
        let listen = raw.router.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen: SocketAddr = listen
            .parse()
            .map_err(|e| invalid(format!("router.listen {listen:?}: {e}")))?;
        let codec: Codec = raw
            .kv
            .codec
            .parse()
            .map_err(|e| invalid(format!("kv.codec: {e}")))?;
        if raw.kv.chunk_size == 0 || raw.kv.chunk_size > MAX_CHUNK_SIZE {
            return Err(invalid(format!(
                "kv.chunk_size must be within 1..={MAX_CHUNK_SIZE}"
            )));
        }
        let type_k: KvType = raw
            .layout
            .type_k
            .parse()
            .map_err(|e| invalid(format!("layout.type_k: {e}")))?;
        let type_v: KvType = raw
            .layout
            .type_v
            .parse()
            .map_err(|e| invalid(format!("layout.type_v: {e}")))?;
        if raw.layout.n_ctx_seq < 16 {
            return Err(invalid("layout.n_ctx_seq must be at least 16".into()));
        }
        let layout = KvLayout {
            type_k,
            type_v,
            flash_attn: raw.layout.flash_attn,
            kv_unified: raw.layout.kv_unified,
            n_seq_max: 1,
            n_ctx_seq: raw.layout.n_ctx_seq,
        };
        let mut nodes = Vec::new();
        for n in raw.nodes {
            let role: Role = n
                .role
                .parse()
                .map_err(|e| invalid(format!("node {:?}: {e}", n.name)))?;
            if n.name.is_empty()
                || !n
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(invalid(format!(
                    "node name {:?}: use letters, digits, '-', '_' or '.'",
                    n.name
                )));
            }
            if nodes.iter().any(|m: &NodeSpec| m.name == n.name) {
                return Err(invalid(format!("node name {:?} appears twice", n.name)));
            }
            let address = if n.address == "embedded" {
                NodeAddress::Embedded
            } else if n
                .address
                .rsplit_once(':')
                .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok())
            {
                NodeAddress::Remote(n.address)
            } else {
                return Err(invalid(format!(
                    "node {:?}: address must be \"embedded\" or host:port",
                    n.name
                )));
            };
            let slots = n.slots.unwrap_or(if role == Role::Prefill { 1 } else { 4 });
            if slots == 0 || slots > 256 {
                return Err(invalid(format!(
                    "node {:?}: slots must be within 1..=256",
                    n.name
                )));
            }
            nodes.push(NodeSpec {
                name: n.name,
                address,
                role,
                slots,
            });
        }
        let can_split = nodes.iter().any(|n| n.role.prefills())
            && nodes.iter().any(|n| n.role.decodes())
            && nodes.len() >= 2;
        let can_colocate = nodes.iter().any(|n| n.role == Role::Both);
        match raw.placement {
            PlacementMode::Disaggregated if !can_split => {
                return Err(invalid("placement \"disaggregated\" needs a prefill-capable and another decode-capable node".into()));
            }
            PlacementMode::Colocated if !can_colocate => {
                return Err(invalid(
                    "placement \"colocated\" needs a node with role \"both\"".into(),
                ));
            }
            PlacementMode::Auto if !can_split && !can_colocate => {
                return Err(invalid("no node can serve a request: add a \"both\" node or a prefill and a decode node".into()));
            }
            _ => {}
        }
        Ok(Profile {
            path: path.to_path_buf(),
            model: raw.model,
            placement: raw.placement,
            listen,
            max_queued: raw.router.max_queued.unwrap_or(DEFAULT_MAX_QUEUED),
            kv: KvShipping {
                codec,
                chunk_size: raw.kv.chunk_size,
                chunks_in_flight: raw.kv.chunks_in_flight.max(1),
            },
            layout,
            nodes,
        })
    }

    /// True if any node runs inside the router process (the router then loads the model).
    pub fn has_embedded(&self) -> bool {
        self.nodes
            .iter()
            .any(|n| n.address == NodeAddress::Embedded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Profile, ProfileError> {
        Profile::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn every_shipped_profile_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Profile::load(&path).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 2);
    }

    const BASE: &str = "model = \"m.gguf\"\nplacement = \"disaggregated\"\n";

    #[test]
    fn disaggregation_needs_two_roles() {
        let one =
            format!("{BASE}[[nodes]]\nname = \"a\"\naddress = \"embedded\"\nrole = \"prefill\"\n");
        assert!(matches!(parse(&one), Err(ProfileError::Invalid { .. })));
        let two = format!(
            "{one}[[nodes]]\nname = \"b\"\naddress = \"10.0.0.2:7070\"\nrole = \"decode\"\nslots = 8\n"
        );
        let p = parse(&two).unwrap();
        assert_eq!(
            p.nodes[1].address,
            NodeAddress::Remote("10.0.0.2:7070".into())
        );
        assert_eq!(p.nodes[1].slots, 8);
        assert_eq!(p.listen.to_string(), DEFAULT_LISTEN);
    }

    #[test]
    fn mistakes_are_refused_with_their_reason() {
        let unknown_key = format!("{BASE}colour = \"red\"\n");
        assert!(matches!(
            parse(&unknown_key),
            Err(ProfileError::Parse { .. })
        ));
        let bad_role =
            format!("{BASE}[[nodes]]\nname = \"a\"\naddress = \"embedded\"\nrole = \"chef\"\n");
        assert!(parse(&bad_role).unwrap_err().to_string().contains("chef"));
        let bad_addr =
            format!("{BASE}[[nodes]]\nname = \"a\"\naddress = \"nowhere\"\nrole = \"both\"\n");
        assert!(
            parse(&bad_addr)
                .unwrap_err()
                .to_string()
                .contains("host:port")
        );
        let bad_codec = format!("{BASE}[kv]\ncodec = \"zip\"\n");
        assert!(parse(&bad_codec).unwrap_err().to_string().contains("zip"));
        let colocated = "model = \"m\"\nplacement = \"colocated\"\n[[nodes]]\nname = \"a\"\naddress = \"embedded\"\nrole = \"prefill\"\n";
        assert!(parse(colocated).unwrap_err().to_string().contains("both"));
    }
}
