//! The `exo-router` command line: `serve` the API over a cluster, run a `node` daemon, `profile` a
//! machine, `plan` one request's placement, or `simulate` a workload.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use exo_engine::{Model, ModelOptions};
use exo_kvcache::{KvLayout, KvType};
use exo_protocol::Role;
use exo_router::costmodel::{self, Candidates, NodeLoad, NodeView, RequestShape};
use exo_router::measure::MeasurePlan;
use exo_router::node::{NodeOptions, spawn_node};
use exo_router::profile::{PlacementMode, Profile};
use exo_router::simulate::{Arrival, SimPolicy, Workload};
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
    /// Measure this machine (hardware and model speed) and write a profile for it.
    Profile(ProfileArgs),
    /// Print the placement the cost model would choose for one request, with every candidate.
    Plan(PlanArgs),
    /// Simulate the cluster under a workload and compare placement policies.
    Simulate(SimulateArgs),
}

#[derive(clap::Args)]
struct ProfileArgs {
    /// GGUF model to measure with.
    #[arg(
        long,
        env = "EXO_MODEL",
        default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
    )]
    model: PathBuf,
    /// Write the profile here (default: print it).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Node name in the profile (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Decode slots to measure up to and to write in the profile.
    #[arg(long, default_value_t = 8)]
    slots: u32,
    /// Context per sequence, in tokens.
    #[arg(long, default_value_t = 4096)]
    n_ctx_seq: u32,
    /// KV cache type for K and V.
    #[arg(long, default_value = "f16")]
    kv_type: KvType,
    /// Flash attention on.
    #[arg(long)]
    flash_attn: bool,
    /// A short measurement (seconds instead of minutes), for tests and a first look.
    #[arg(long)]
    quick: bool,
}

#[derive(clap::Args)]
struct PlanArgs {
    /// Cluster profile with [nodes.perf] for every node.
    #[arg(long)]
    profile: PathBuf,
    /// Prompt tokens of the request.
    #[arg(long, default_value_t = 2048)]
    prompt_tokens: u64,
    /// Output tokens of the request (default: the profile's policy.expected_output_tokens).
    #[arg(long)]
    output_tokens: Option<u64>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct SimulateArgs {
    /// Cluster profile with [nodes.perf] for every node.
    #[arg(long)]
    profile: PathBuf,
    /// Workload: comma-separated key=value among requests, rate (requests/s) or concurrency,
    /// prompt (tokens, or MIN-MAX), output (tokens, or MIN-MAX), long_every, long_tokens, seed.
    #[arg(
        long,
        default_value = "requests=200,rate=1,prompt=100-400,output=64-256,long_every=0,seed=1"
    )]
    workload: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
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
        Command::Profile(args) => rt.block_on(profile(args)),
        Command::Plan(args) => plan(&args),
        Command::Simulate(args) => simulate(&args),
    }
}

async fn profile(args: ProfileArgs) -> Result<()> {
    let model = Model::load(&args.model, &ModelOptions::default()).with_context(|| {
        format!(
            "loading {} (scripts/fetch-model puts the default model in place)",
            args.model.display()
        )
    })?;
    anyhow::ensure!(
        (1..=256).contains(&args.slots),
        "--slots must be within 1..=256"
    );
    let layout = KvLayout {
        type_k: args.kv_type,
        type_v: args.kv_type,
        flash_attn: args.flash_attn,
        kv_unified: false,
        n_seq_max: args.slots,
        n_ctx_seq: args.n_ctx_seq,
    };
    eprintln!("[1/2] hardware");
    let hardware = exo_router::hardware::probe();
    for line in hardware.summary() {
        eprintln!("      {line}");
    }
    let mut plan = if args.quick {
        MeasurePlan::quick()
    } else {
        MeasurePlan::full()
    };
    plan.batches.retain(|&b| b <= args.slots);
    if !plan.batches.contains(&args.slots) && !args.quick {
        plan.batches.push(args.slots);
    }
    eprintln!("[2/2] model {} (this takes a while)", model.name());
    let started = std::time::Instant::now();
    let measured = exo_router::measure::measure(Arc::clone(&model), layout, &plan, |line| {
        eprintln!("      [{:>5.1}s] {line}", started.elapsed().as_secs_f64());
    })
    .await?;
    let name = args.name.unwrap_or_else(host_name);
    let text =
        exo_router::hardware::node_profile_toml(&args.model, &name, layout, &hardware, &measured)?;
    match args.out {
        Some(path) => {
            std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("profile written to {}", path.display());
        }
        None => print!("{text}"),
    }
    Ok(())
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".into())
}

fn load_costed(path: &std::path::Path) -> Result<Profile> {
    let profile = Profile::load(path)?;
    anyhow::ensure!(
        profile.has_cost_model(),
        "profile {} has no cost model: every node needs [nodes.perf] and [policy] needs kv_bytes_per_token (see docs/profiles.md)",
        path.display()
    );
    Ok(profile)
}

fn plan(args: &PlanArgs) -> Result<()> {
    let profile = load_costed(&args.profile)?;
    let shape = RequestShape {
        prompt_tokens: args.prompt_tokens.max(1),
        output_tokens: args
            .output_tokens
            .unwrap_or(profile.policy.expected_output_tokens)
            .max(1),
    };
    let views: Vec<NodeView> = profile
        .nodes
        .iter()
        .filter_map(|n| {
            Some(NodeView {
                name: &n.name,
                prefills: n.role.prefills(),
                decodes: n.role.decodes(),
                colocates: n.role == Role::Both,
                slots: n.slots,
                perf: n.perf.as_ref()?,
                load: NodeLoad::default(),
            })
        })
        .collect();
    let which = match profile.placement {
        PlacementMode::Auto => Candidates::All,
        PlacementMode::Colocated => Candidates::Colocated,
        PlacementMode::Disaggregated => Candidates::Disaggregated,
    };
    let plan = costmodel::plan(
        &profile.policy,
        &views,
        |a, b| profile.link(a, b),
        shape,
        which,
    );
    let chosen = plan.chosen();
    if args.json {
        let out = serde_json::json!({
            "profile": args.profile.display().to_string(),
            "request": { "prompt_tokens": shape.prompt_tokens, "output_tokens": shape.output_tokens },
            "objective": profile.policy.objective,
            "tpot_target_ms": profile.policy.tpot_target_s * 1e3,
            "candidates": plan.candidates,
            "chosen": chosen.map(|c| serde_json::json!({ "mode": c.mode, "prefill": c.prefill, "decode": c.decode, "codec": c.codec })),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{}: {} prompt tokens, {} output tokens, objective {:?}, TPOT target {:.0} ms, idle cluster",
        args.profile.display(),
        shape.prompt_tokens,
        shape.output_tokens,
        profile.policy.objective,
        profile.policy.tpot_target_s * 1e3
    );
    println!();
    println!(
        "  {:<32} {:<14} {:<12} {:>10} {:>11} {:>9} {:>9} {:>10}  target",
        "placement", "mode", "codec", "TTFT ms", "hand-off ms", "step ms", "TPOT ms", "E2E ms"
    );
    for (i, c) in plan.candidates.iter().enumerate() {
        let name = if c.prefill == c.decode {
            c.prefill.clone()
        } else {
            format!("{} -> {}", c.prefill, c.decode)
        };
        println!(
            "{} {:<32} {:<14} {:<12} {:>10.1} {:>11.1} {:>9.2} {:>9.2} {:>10.1}  {}",
            if plan.chosen == Some(i) { "*" } else { " " },
            name,
            c.mode,
            c.codec.unwrap_or("-"),
            c.ttft_s * 1e3,
            c.handoff_s * 1e3,
            c.steady_tpot_s * 1e3,
            c.tpot_s * 1e3,
            c.e2e_s * 1e3,
            if c.meets_target { "met" } else { "missed" }
        );
    }
    println!();
    match chosen {
        Some(c) => println!(
            "chosen: {} (prefill {}, decode {})",
            c.mode, c.prefill, c.decode
        ),
        None => println!("chosen: none (no node can serve this placement mode)"),
    }
    Ok(())
}

fn simulate(args: &SimulateArgs) -> Result<()> {
    let profile = load_costed(&args.profile)?;
    let workload = parse_workload(&args.workload)?;
    let mut reports = Vec::new();
    for policy in SimPolicy::ALL {
        reports.push(exo_router::simulate::simulate(&profile, &workload, policy)?);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
        return Ok(());
    }
    println!("{}: workload {}", args.profile.display(), args.workload);
    println!();
    println!(
        "| policy | done | req/s | out tok/s | TTFT p50 / p90 / p99 ms | TPOT p50 / p90 / p99 ms | short TPOT p99 ms | placements |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &reports {
        let ms = |p: exo_router::simulate::Percentiles| {
            format!(
                "{:.0} / {:.0} / {:.0}",
                p.p50 * 1e3,
                p.p90 * 1e3,
                p.p99 * 1e3
            )
        };
        let tpot = |p: exo_router::simulate::Percentiles| {
            format!(
                "{:.1} / {:.1} / {:.1}",
                p.p50 * 1e3,
                p.p90 * 1e3,
                p.p99 * 1e3
            )
        };
        let placements: Vec<String> = r
            .placements
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        println!(
            "| {} | {}{} | {:.2} | {:.1} | {} | {} | {:.1} | {} |",
            r.policy.name(),
            r.completed,
            if r.unplaced > 0 {
                format!(" ({} unplaced)", r.unplaced)
            } else {
                String::new()
            },
            r.requests_per_s,
            r.output_tok_s,
            ms(r.ttft),
            tpot(r.tpot),
            r.tpot_short.p99 * 1e3,
            placements.join(", ")
        );
    }
    Ok(())
}

/// Parses `key=value,...` into a workload.
fn parse_workload(spec: &str) -> Result<Workload> {
    let mut w = Workload {
        requests: 200,
        arrival: Arrival::Rate(1.0),
        prompt_tokens: (100, 400),
        long_every: 0,
        long_tokens: 2000,
        output_tokens: (64, 256),
        seed: 1,
    };
    let range = |v: &str| -> Result<(u64, u64)> {
        let (a, b) = v.split_once('-').unwrap_or((v, v));
        let (a, b): (u64, u64) = (a.trim().parse()?, b.trim().parse()?);
        anyhow::ensure!(
            a >= 1 && a <= b,
            "range {v:?} must be MIN-MAX with 1 <= MIN <= MAX"
        );
        Ok((a, b))
    };
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .with_context(|| format!("workload: {part:?} is not key=value"))?;
        let bad = |e: &dyn std::fmt::Display| anyhow::anyhow!("workload {k}={v}: {e}");
        match k.trim() {
            "requests" => w.requests = v.parse().map_err(|e| bad(&e))?,
            "rate" => w.arrival = Arrival::Rate(v.parse().map_err(|e| bad(&e))?),
            "concurrency" => w.arrival = Arrival::Concurrency(v.parse().map_err(|e| bad(&e))?),
            "prompt" => w.prompt_tokens = range(v).map_err(|e| bad(&e))?,
            "output" => w.output_tokens = range(v).map_err(|e| bad(&e))?,
            "long_every" => w.long_every = v.parse().map_err(|e| bad(&e))?,
            "long_tokens" => w.long_tokens = v.parse().map_err(|e| bad(&e))?,
            "seed" => w.seed = v.parse().map_err(|e| bad(&e))?,
            other => anyhow::bail!(
                "workload: unknown key {other:?} (requests, rate, concurrency, prompt, output, long_every, long_tokens, seed)"
            ),
        }
    }
    Ok(w)
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
