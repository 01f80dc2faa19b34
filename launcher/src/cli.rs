//! The command line, as clap derive structs: what each subcommand accepts. `node` and `profile`
//! share the engine flags ([`EngineArgs`]).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use exo_engine::{ContextConfig, GpuLayers, ModelOptions};
use exo_kvcache::{KvLayout, KvType};
use exo_protocol::Role;

/// `exo-router`.
#[derive(Parser)]
#[command(
    name = "exo-router",
    version,
    about = "Disaggregated LLM serving across mixed machines"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Command {
    /// Serve the OpenAI-compatible API over the cluster a profile describes.
    Serve(ServeArgs),
    /// Run a node daemon (one per machine) that the router connects to.
    Node(NodeArgs),
    /// Measure this machine (hardware and model speed) and write a profile for it.
    Profile(ProfileArgs),
    /// Print the placement the cost model would choose for one request, with every candidate.
    Plan(PlanArgs),
    /// Simulate the cluster under a workload and compare placement policies.
    Simulate(SimulateArgs),
    /// Make the files that secure a cluster (see docs/security.md).
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Show a running cluster: its nodes, links and last requests, as the web page does.
    Status(StatusArgs),
    /// Fetch a GGUF model from the Hugging Face hub into its cache and print its path.
    Pull(PullArgs),
}

/// `exo-router pull`.
#[derive(clap::Args)]
pub struct PullArgs {
    /// `org/repo:TAG` (the GGUF file whose name carries the quantization tag, e.g. Q8_0) or
    /// `org/repo` (its Q4_K_M file).
    #[arg(required_unless_present = "from_peer")]
    pub name: Option<String>,
    /// Fetch the model the node at this RPC address runs instead (over the cluster link: give
    /// `--cluster` when the cluster has a file), into `--out`.
    #[arg(long, value_name = "ADDR", requires = "out", conflicts_with = "name")]
    pub from_peer: Option<String>,
    /// Where a model fetched from a peer goes.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The cluster file, for a peer whose links use mutual TLS.
    #[arg(long, env = "EXO_CLUSTER")]
    pub cluster: Option<PathBuf>,
    /// This file of the repository instead of the one the tag picks.
    #[arg(long)]
    pub file: Option<String>,
    /// Branch, tag or commit of the repository.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
}

/// `exo-router status`.
#[derive(clap::Args)]
pub struct StatusArgs {
    /// The router's API.
    #[arg(long, default_value = "http://127.0.0.1:52415")]
    pub url: String,
    /// API key, when the router asks for one.
    #[arg(long, env = "EXO_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Redraw every `--interval` seconds until interrupted.
    #[arg(long)]
    pub watch: bool,
    /// Seconds between redraws with `--watch`.
    #[arg(long, default_value_t = 2.0, value_parser = positive_seconds)]
    pub interval: f64,
    /// Print the router's JSON (`GET /v1/cluster`) instead of tables.
    #[arg(long)]
    pub json: bool,
}

fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.1..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?}: give seconds between 0.1 and 3600")),
    }
}

/// `exo-router cluster ...`.
#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Write a new cluster file (mutual TLS for every node link) and an API keys file with one
    /// fresh key. Copy the cluster file to every machine; keep both private.
    Init(ClusterInitArgs),
}

/// `exo-router cluster init`.
#[derive(clap::Args)]
pub struct ClusterInitArgs {
    /// Folder to write `cluster.pem` and `api-keys.toml` into (made if missing).
    #[arg(long, default_value = "cluster")]
    pub out_dir: PathBuf,
    /// Replace files that already exist (every machine then needs the new cluster file).
    #[arg(long)]
    pub force: bool,
}

/// The model and KV cache a node runs with (`node` and `profile`).
#[derive(clap::Args, Clone)]
pub struct EngineArgs {
    /// GGUF model (nodes that hand requests to each other run the same file): a path, or a Hugging Face
    /// name `org/repo:TAG` taken from the hub's cache or fetched into it (`exo-router pull`).
    #[arg(
        long,
        env = "EXO_MODEL",
        default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
    )]
    pub model: PathBuf,
    /// Context per sequence, in tokens.
    #[arg(long, default_value_t = 4096)]
    pub n_ctx_seq: u32,
    /// KV cache type for K and V: f16, q8_0, ... (must match the other nodes).
    #[arg(long, default_value = "f16")]
    pub kv_type: KvType,
    /// Flash attention on. Nodes that differ here still exchange caches when the KV type is
    /// f32, f16 or bf16 (V is transposed on import).
    #[arg(long)]
    pub flash_attn: bool,
    /// Model layers to run on a GPU: auto (all when the build has a GPU backend and a GPU is
    /// present, else none), all, or a number (0: CPU only).
    #[arg(long, env = "EXO_N_GPU_LAYERS", default_value = "auto")]
    pub n_gpu_layers: GpuLayers,
    /// Run on this GPU only (llama.cpp's device index, as `exo-router profile` lists them).
    #[arg(long, env = "EXO_MAIN_GPU")]
    pub main_gpu: Option<usize>,
    /// CPU threads for the engine (0: every core). Give processes that share a machine disjoint
    /// budgets that add up to its cores.
    #[arg(long, env = "EXO_THREADS", default_value_t = 0)]
    pub threads: u32,
    /// Compute every prompt whole. By default a prompt reuses the cache a free slot kept from an
    /// earlier prompt that started the same way (a shared system prompt, an earlier chat turn);
    /// a client timing its requests could tell whether another's prompt started like its own, so
    /// turn reuse off where tenants must not learn that.
    #[arg(long)]
    pub no_prefix_reuse: bool,
}

impl EngineArgs {
    /// How the model is loaded.
    pub fn model_options(&self) -> ModelOptions {
        ModelOptions {
            gpu_layers: self.n_gpu_layers,
            main_gpu: self.main_gpu,
        }
    }

    /// How the engine context of a node with `slots` sequence slots is made.
    pub fn context_config(&self, slots: u32) -> ContextConfig {
        ContextConfig {
            layout: self.layout(slots),
            n_threads: self.threads,
            prefix_reuse: !self.no_prefix_reuse,
            ..ContextConfig::default()
        }
    }

    /// The KV layout of a context with `slots` sequence slots.
    pub fn layout(&self, slots: u32) -> KvLayout {
        KvLayout {
            type_k: self.kv_type,
            type_v: self.kv_type,
            flash_attn: self.flash_attn,
            kv_unified: false,
            n_seq_max: slots,
            n_ctx_seq: self.n_ctx_seq,
        }
    }
}

/// `exo-router serve`.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Cluster profile (TOML); see docs/profiles.md.
    #[arg(long, env = "EXO_PROFILE")]
    pub profile: Option<PathBuf>,
    /// HTTP listen address (overrides the profile's router.listen).
    #[arg(long, env = "EXO_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// On SIGTERM or ctrl-c: seconds the requests in flight (streams too) may take to finish
    /// before they are dropped; no new connection is accepted meanwhile.
    #[arg(long, env = "EXO_DRAIN_TIMEOUT", default_value_t = 30)]
    pub drain_timeout: u64,
    /// Times one request may move to other nodes when a node serving it dies, its stream going
    /// on where it stopped (overrides the profile's router.migration_limit, default 3; 0: the
    /// request fails instead).
    #[arg(long, env = "EXO_MIGRATION_LIMIT")]
    pub migration_limit: Option<u32>,
    /// An API key clients must present (`Authorization: Bearer KEY` or `x-api-key: KEY`), at
    /// least 16 printable characters; with no key at all the API is open.
    #[arg(long, env = "EXO_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// A TOML file of named API keys (`[keys]` then `name = "key"` lines), re-read when it
    /// changes: delete a line to revoke that key (overrides the profile's api.keys_file).
    #[arg(long, env = "EXO_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Serve /metrics without a key (for a Prometheus server that holds none).
    #[arg(long, env = "EXO_OPEN_METRICS")]
    pub open_metrics: bool,
    /// Largest request body in bytes; larger ones get 413 (overrides api.max_body_bytes,
    /// default 8 MiB).
    #[arg(long, env = "EXO_MAX_BODY_BYTES", value_parser = clap::value_parser!(u64).range(1024..))]
    pub max_body_bytes: Option<u64>,
    /// The cluster file (`exo-router cluster init`): node links use mutual TLS with it, and
    /// every node must hold the same file (overrides the profile's `[cluster] file`).
    #[arg(long, env = "EXO_CLUSTER")]
    pub cluster: Option<PathBuf>,
    /// Also take the nodes that announce themselves on the LAN (mDNS; `[discovery]` in the
    /// profile). On by default without --profile.
    #[arg(long, env = "EXO_DISCOVER", conflicts_with = "no_discover")]
    pub discover: bool,
    /// Never look for nodes on the LAN, even without --profile.
    #[arg(long)]
    pub no_discover: bool,
    /// Look for nodes on this network interface only (repeat for several; default: all).
    #[arg(long = "discovery-interface", value_name = "NAME")]
    pub discovery_interfaces: Vec<String>,
}

/// `exo-router node`.
#[derive(clap::Args, Clone)]
pub struct NodeArgs {
    /// What this node does: prefill, decode or both.
    #[arg(long, env = "EXO_ROLE")]
    pub role: Role,
    /// The model and KV cache.
    #[command(flatten)]
    pub engine: EngineArgs,
    /// RPC listen address; port 0 picks a free port (printed on start). Default: 0.0.0.0:52416
    /// with a cluster file, else 127.0.0.1:52416 (this machine only).
    #[arg(long, env = "EXO_NODE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// The cluster file (`exo-router cluster init`): only the router and nodes holding the
    /// same file may connect, and every link is encrypted.
    #[arg(long, env = "EXO_CLUSTER")]
    pub cluster: Option<PathBuf>,
    /// Another model this process serves as well, as its own node (named NAME-<file stem>, on
    /// the next port, with the same role, slots and KV settings, and an equal share of the CPU
    /// threads); repeat for more. Refused at start when the models and their KV caches do not
    /// fit the memory the machine has available.
    #[arg(long = "also-model", value_name = "MODEL")]
    pub also_models: Vec<PathBuf>,
    /// When the `--model` file is missing here, fetch it first from the node at this RPC
    /// address (the same model, checked against its fingerprint; over the cluster link).
    #[arg(long, value_name = "ADDR", env = "EXO_MODEL_FROM")]
    pub model_from: Option<String>,
    /// Node name (defaults to the host name and port).
    #[arg(long, env = "EXO_NODE_NAME")]
    pub name: Option<String>,
    /// Sequence slots (concurrent requests); default 1 for prefill, 4 otherwise.
    #[arg(long)]
    pub slots: Option<u32>,
    /// Chunk calls in flight when shipping a KV cache.
    #[arg(long, default_value_t = 2)]
    pub chunks_in_flight: usize,
    /// Pieces a prefill node ships a prompt's KV cache in while the prompt still runs (each
    /// piece costs an export of the sequence so far, at least 256 tokens apart); 1 ships it
    /// after the prompt, with nothing overlapped.
    #[arg(long, default_value_t = exo_kvcache::HANDOFF_PIECES, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub handoff_pieces: u64,
    /// Seconds a KV transfer to this (decode) node may go without progress before it fails:
    /// a stalled link fails its request then, with "transfer timed out".
    #[arg(long, env = "EXO_TRANSFER_TIMEOUT", default_value_t = 60.0, value_parser = positive_secs)]
    pub transfer_timeout: f64,
    /// On SIGTERM or ctrl-c: seconds to finish the requests this node holds (it takes no new
    /// prompt and tells the router it is out of service meanwhile).
    #[arg(long, env = "EXO_DRAIN_TIMEOUT", default_value_t = 30)]
    pub drain_timeout: u64,
    /// Serve this node's Prometheus metrics at http://ADDR/metrics.
    #[arg(long, env = "EXO_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Do not announce this node on the LAN (mDNS); routers then reach it only through a
    /// profile that lists its address.
    #[arg(long, env = "EXO_NO_ANNOUNCE")]
    pub no_announce: bool,
    /// Announce on this network interface only (repeat for several; default: all).
    #[arg(long = "discovery-interface", value_name = "NAME")]
    pub discovery_interfaces: Vec<String>,
    /// Measure this node's speed at start (`exo-router profile --quick`'s plan, seconds) and
    /// report the table to routers, so `placement = "auto"` needs no hand-written [nodes.perf];
    /// a measurement cached for the same model, build, layout and hardware is reused.
    #[arg(long, env = "EXO_MEASURE")]
    pub measure: bool,
    /// Folder for cached measurements (default: $XDG_CACHE_HOME/exo-router, else
    /// ~/.cache/exo-router).
    #[arg(long, env = "EXO_PROFILE_CACHE")]
    pub profile_cache: Option<PathBuf>,
}

/// `exo-router profile`.
#[derive(clap::Args)]
pub struct ProfileArgs {
    /// The model and KV cache to measure with.
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Write the profile here (default: print it).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Node name in the profile (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Decode slots to measure up to and to write in the profile.
    #[arg(long, default_value_t = 8)]
    pub slots: u32,
    /// A short measurement (seconds instead of minutes), for tests and a first look.
    #[arg(long)]
    pub quick: bool,
}

/// `exo-router plan`.
#[derive(clap::Args)]
pub struct PlanArgs {
    /// Cluster profile with [nodes.perf] for every node.
    #[arg(long)]
    pub profile: PathBuf,
    /// Prompt tokens of the request.
    #[arg(long, default_value_t = 2048)]
    pub prompt_tokens: u64,
    /// Output tokens of the request (default: the profile's policy.expected_output_tokens).
    #[arg(long)]
    pub output_tokens: Option<u64>,
    /// The model the request names, when the profile's nodes run several.
    #[arg(long)]
    pub model: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `exo-router simulate`.
#[derive(clap::Args)]
pub struct SimulateArgs {
    /// Cluster profile with [nodes.perf] for every node.
    #[arg(long)]
    pub profile: PathBuf,
    /// The model the workload's requests name, when the profile's nodes run several.
    #[arg(long)]
    pub model: Option<String>,
    /// Workload: comma-separated key=value among requests, rate (requests/s) or concurrency,
    /// prompt (tokens, or MIN-MAX), output (tokens, or MIN-MAX), long_every, long_tokens, seed.
    #[arg(
        long,
        default_value = "requests=200,rate=1,prompt=100-400,output=64-256,long_every=0,seed=1"
    )]
    pub workload: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A number of seconds that is positive and finite (a duration flag).
fn positive_secs(s: &str) -> Result<f64, String> {
    let secs: f64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number of seconds: {e}"))?;
    if secs.is_finite() && secs > 0.0 && std::time::Duration::try_from_secs_f64(secs).is_ok() {
        Ok(secs)
    } else {
        Err(format!("{s} must be a positive number of seconds"))
    }
}
