//! The `exo-router` command line: `serve` the API over a cluster, or run a `node` daemon.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use exo_engine::{Model, ModelOptions};
use exo_kvcache::{KvLayout, KvType};
use exo_protocol::Role;
use exo_router::node::{NodeOptions, spawn_node};
use exo_router::profile::Profile;
use exo_router::{Server, default_profile};

#[derive(Parser)]
#[command(
    name = "exo-router",
    version,
    about = "Disaggregated LLM serving across mixed machines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible API over the cluster a profile describes.
    Serve(ServeArgs),
    /// Run a node daemon (one per machine) that the router connects to.
    Node(NodeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Cluster profile (TOML); see docs/profiles.md.
    #[arg(long, env = "EXO_PROFILE")]
    profile: Option<PathBuf>,
    /// HTTP listen address (overrides the profile's router.listen).
    #[arg(long, env = "EXO_LISTEN")]
    listen: Option<SocketAddr>,
}

#[derive(clap::Args)]
struct NodeArgs {
    /// What this node does: prefill, decode or both.
    #[arg(long, env = "EXO_ROLE")]
    role: Role,
    /// GGUF model (every node of a cluster must run the same file).
    #[arg(
        long,
        env = "EXO_MODEL",
        default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
    )]
    model: PathBuf,
    /// RPC listen address; port 0 picks a free port (printed on start).
    #[arg(long, env = "EXO_NODE_LISTEN", default_value = "0.0.0.0:52416")]
    listen: SocketAddr,
    /// Node name (defaults to the host name and port).
    #[arg(long, env = "EXO_NODE_NAME")]
    name: Option<String>,
    /// Sequence slots (concurrent requests); default 1 for prefill, 4 otherwise.
    #[arg(long)]
    slots: Option<u32>,
    /// Context per sequence, in tokens.
    #[arg(long, default_value_t = 4096)]
    n_ctx_seq: u32,
    /// KV cache type for K and V: f16, q8_0, ... (must match the other nodes).
    #[arg(long, default_value = "f16")]
    kv_type: KvType,
    /// Flash attention on (must match the other nodes).
    #[arg(long)]
    flash_attn: bool,
    /// Chunk calls in flight when shipping a KV cache.
    #[arg(long, default_value_t = 2)]
    chunks_in_flight: usize,
    /// Serve this node's Prometheus metrics at http://ADDR/metrics.
    #[arg(long, env = "EXO_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,llama-cpp-2=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match cli.command {
        Command::Serve(args) => rt.block_on(serve(args)),
        Command::Node(args) => rt.block_on(node(args)),
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    let path = args
        .profile
        .unwrap_or_else(|| default_profile().to_path_buf());
    let profile = Profile::load(&path)?;
    let listen = args.listen.unwrap_or(profile.listen);
    let server = Server::start(&profile, listen).await?;
    println!(
        "exo-router serving {} (profile {}), listening on http://{}",
        server.cluster.model_id(),
        path.display(),
        server.addr
    );
    tokio::signal::ctrl_c()
        .await
        .context("waiting for ctrl-c")?;
    eprintln!("shutting down");
    server.shutdown().await;
    Ok(())
}

async fn node(args: NodeArgs) -> Result<()> {
    let model = Model::load(&args.model, &ModelOptions::default()).with_context(|| {
        format!(
            "loading {} (scripts/fetch-model puts the default model in place)",
            args.model.display()
        )
    })?;
    let slots = args
        .slots
        .unwrap_or(if args.role == Role::Prefill { 1 } else { 4 });
    let layout = KvLayout {
        type_k: args.kv_type,
        type_v: args.kv_type,
        flash_attn: args.flash_attn,
        kv_unified: false,
        n_seq_max: slots,
        n_ctx_seq: args.n_ctx_seq,
    };
    let name = args.name.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "node".into());
        format!("{host}-{}", args.listen.port())
    });
    let options = NodeOptions {
        name: name.clone(),
        role: args.role,
        layout,
        chunks_in_flight: args.chunks_in_flight,
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let bound = spawn_node(Arc::clone(&model), &options, args.listen, async move {
        let _ = stop_rx.await;
    })
    .await?;
    if let Some(addr) = args.metrics_listen {
        exo_router::metrics::handle();
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("metrics listener {addr}"))?;
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(|| async { exo_router::metrics::render() }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        eprintln!("metrics at http://{addr}/metrics");
    }
    println!(
        "exo-router node {name} ({}) listening on {bound}",
        args.role
    );
    tokio::signal::ctrl_c()
        .await
        .context("waiting for ctrl-c")?;
    let _ = stop_tx.send(());
    Ok(())
}
