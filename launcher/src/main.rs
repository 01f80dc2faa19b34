//! The `exo-router` command line: `serve` the API over a cluster, run a `node` daemon, `profile` a
//! machine, `plan` one request's placement, `simulate` a workload, or show a running cluster's
//! `status`.

mod cli;
mod hub;
mod lan;
mod node_cmd;
mod output;
mod status;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use exo_engine::Model;
use exo_node::measure::MeasurePlan;
use exo_router::placement::{PlacementMode, RequestShape};
use exo_router::profile::Profile;
use exo_router::simulate::Workload;

use cli::{
    Cli, ClusterCommand, ClusterInitArgs, Command, PlanArgs, ProfileArgs, ServeArgs, SimulateArgs,
};
use exo_protocol::LinkSecurity;

/// Runs the command; a failure is one line on stderr, `error: ` and what failed with each cause
/// after a colon, and exit status 1. The backtrace follows only when `RUST_BACKTRACE` asks for
/// one.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| !v.is_empty() && v != "0") {
                eprintln!("{}", e.backtrace());
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause after a colon; a cause the message before
/// already quotes (an error that prints its source) is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line += ": ";
        }
        line += &text;
    }
    line
}

fn run() -> Result<()> {
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
        Command::Node(mut args) => {
            if let Some(peer) = &args.model_from {
                let security = LinkSecurity::from_cluster_file(args.cluster.as_deref())?;
                rt.block_on(hub::fetch_from_peer(
                    peer,
                    &security,
                    &args.engine.model,
                    true,
                ))?;
            }
            args.engine.model = rt.block_on(hub_model(&args.engine.model))?;
            rt.block_on(node_cmd::resolve_also_models(&mut args))?;
            rt.block_on(node_cmd::node(args))
        }
        Command::Profile(mut args) => {
            args.engine.model = rt.block_on(hub_model(&args.engine.model))?;
            rt.block_on(profile(args))
        }
        Command::Pull(args) => rt.block_on(pull(&args)),
        Command::Plan(args) => plan(&args),
        Command::Simulate(args) => simulate(&args),
        Command::Cluster(ClusterCommand::Init(args)) => cluster_init(&args),
        Command::Status(args) => rt.block_on(status::status(&args)),
    }
}

/// `exo-router pull`: the file's path in the cache on stdout.
async fn pull(args: &cli::PullArgs) -> Result<()> {
    if let (Some(peer), Some(out)) = (&args.from_peer, &args.out) {
        let security = LinkSecurity::from_cluster_file(args.cluster.as_deref())?;
        let path = hub::fetch_from_peer(peer, &security, out, !args.quiet).await?;
        println!("{}", path.display());
        return Ok(());
    }
    let text = args.name.as_deref().unwrap_or_default();
    let mut name = hub::HubName::parse(text)
        .with_context(|| format!("{text:?} is not a hub name (org/repo or org/repo:TAG)"))?;
    if let Some(file) = &args.file {
        name.pick = hub::Pick::File(file.clone());
    }
    name.revision = args.revision.clone();
    let cfg = hub::HubConfig {
        progress: !args.quiet,
        ..hub::HubConfig::from_env()
    };
    let path = hub::pull(&cfg, &name).await?;
    println!("{}", path.display());
    Ok(())
}

/// A `--model` argument as a file: itself when it is one, else the hub model its name stands for
/// (from the cache, or fetched into it).
async fn hub_model(model: &Path) -> Result<std::path::PathBuf> {
    let text = model.to_string_lossy();
    match hub::HubName::parse(&text) {
        Some(name) if !model.is_file() => {
            let path = hub::model_path(&hub::HubConfig::from_env(), &name).await?;
            eprintln!("model {text}: {}", path.display());
            Ok(path)
        }
        _ => Ok(model.to_path_buf()),
    }
}

fn load_model(engine: &cli::EngineArgs) -> Result<Arc<Model>> {
    let path = &engine.model;
    let model = Model::load(path, &engine.model_options()).with_context(|| {
        format!(
            "loading {} (scripts/fetch-model puts the default model in place)",
            path.display()
        )
    })?;
    eprintln!("model {}: {}", model.name(), model.offload());
    Ok(model)
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".into())
}

async fn profile(args: ProfileArgs) -> Result<()> {
    let model = load_model(&args.engine)?;
    anyhow::ensure!(
        (1..=256).contains(&args.slots),
        "--slots must be within 1..=256"
    );
    let config = args.engine.context_config(args.slots);
    eprintln!("[1/2] hardware");
    let hardware = exo_node::hardware::probe();
    for line in hardware.summary() {
        eprintln!("      {line}");
    }
    let plan = MeasurePlan::for_slots(args.quick, args.slots);
    eprintln!("[2/2] model {} (this takes a while)", model.name());
    let started = std::time::Instant::now();
    let measured = exo_node::measure::measure(Arc::clone(&model), config, &plan, |line| {
        eprintln!("      [{:>5.1}s] {line}", started.elapsed().as_secs_f64());
    })
    .await?;
    let name = args.name.unwrap_or_else(host_name);
    let text = exo_node::hardware::node_profile_toml(
        &args.engine.model,
        &name,
        &config,
        &hardware,
        model.offload(),
        &measured,
    )?;
    match args.out {
        Some(path) => {
            std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("profile written to {}", path.display());
        }
        None => print!("{text}"),
    }
    Ok(())
}

/// The profile at `path`, narrowed to the nodes of `model` (needed when it serves several), with
/// a cost model.
fn load_costed(path: &Path, model: Option<&str>) -> Result<Profile> {
    let profile = Profile::load(path)?
        .for_model(model)
        .map_err(|e| anyhow::anyhow!("profile {}: {e}", path.display()))?;
    anyhow::ensure!(
        profile.has_cost_model(),
        "profile {} has no cost model: every node needs [nodes.perf] and [policy] needs kv_bytes_per_token (see docs/profiles.md)",
        path.display()
    );
    Ok(profile)
}

fn plan(args: &PlanArgs) -> Result<()> {
    let profile = load_costed(&args.profile, args.model.as_deref())?;
    let shape = RequestShape {
        prompt_tokens: args.prompt_tokens.max(1),
        output_tokens: args
            .output_tokens
            .unwrap_or(profile.policy.expected_output_tokens)
            .max(1),
    };
    let plan = profile
        .cost_model(profile.placement)
        .plan(&profile.idle_views(), shape);
    if args.json {
        println!("{}", output::plan_json(&profile, shape, &plan)?);
    } else {
        output::plan_table(&profile, shape, &plan);
    }
    Ok(())
}

fn simulate(args: &SimulateArgs) -> Result<()> {
    let profile = load_costed(&args.profile, args.model.as_deref())?;
    let workload: Workload = args.workload.parse()?;
    let reports = PlacementMode::ALL
        .into_iter()
        .map(|mode| exo_router::simulate::simulate(&profile, &workload, mode))
        .collect::<Result<Vec<_>, _>>()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        output::simulate_table(&profile, &args.workload, &reports);
    }
    Ok(())
}

async fn serve(args: ServeArgs) -> Result<()> {
    let (mut profile, path) = lan::serve_profile(&args).await?;
    if let Some(limit) = args.migration_limit {
        profile.migration_limit = limit;
    }
    apply_api_flags(&mut profile, &args)?;
    // `model = "org/repo:TAG"` (the profile's, or an embedded node's own): the embedded nodes
    // load it from the hub's cache, fetched first when it is not there.
    let embedded =
        |n: &exo_router::profile::NodeSpec| n.address == exo_router::profile::NodeAddress::Embedded;
    let profile_model_used = profile
        .nodes
        .iter()
        .any(|n| embedded(n) && n.model.is_none());
    if profile_model_used && exo_launcher::resolve_model(&profile).is_err() {
        profile.model = hub_model(&profile.model).await?;
    }
    for i in 0..profile.nodes.len() {
        let own = profile.nodes[i]
            .model
            .clone()
            .filter(|_| embedded(&profile.nodes[i]));
        if let Some(m) = own
            && exo_launcher::resolve_model_path(&profile, &m).is_err()
        {
            profile.nodes[i].model = Some(hub_model(&m).await?);
        }
    }
    let listen = args.listen.unwrap_or(profile.listen);
    if !listen.ip().is_loopback() && profile.api.keys.is_empty() {
        eprintln!(
            "WARNING: the API listens on {listen}, reachable from other machines, and asks for no key:\n\
             WARNING: anyone who can reach it can run prompts and read /metrics. Give it a key with\n\
             WARNING: --api-key / EXO_API_KEY or --api-keys-file (docs/security.md)."
        );
    }
    let server = exo_launcher::start(&profile, listen).await?;
    let models: Vec<String> = server.cluster.models().into_iter().map(|m| m.id).collect();
    println!(
        "exo-router serving {} (profile {}), listening on http://{}",
        if models.is_empty() {
            server.cluster.model_id()
        } else {
            models.join(", ")
        },
        path.display(),
        server.addr
    );
    let signal = stop_signal().await?;
    eprintln!(
        "{signal}: draining {} requests in flight (up to {} s)",
        server.cluster.in_flight(),
        args.drain_timeout
    );
    server.drain(Duration::from_secs(args.drain_timeout)).await;
    eprintln!("stopped");
    Ok(())
}

/// `exo-router cluster init`: writes the cluster file and an API keys file with one fresh key,
/// both readable by their owner only.
fn cluster_init(args: &ClusterInitArgs) -> Result<()> {
    let dir = &args.out_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cluster = dir.join("cluster.pem");
    let keys = dir.join("api-keys.toml");
    for f in [&cluster, &keys] {
        anyhow::ensure!(
            args.force || !f.exists(),
            "{} exists; pass --force to replace it (then copy the new cluster file to every machine)",
            f.display()
        );
    }
    let label = hex(&random_bytes::<4>()?);
    let pem = exo_protocol::new_cluster_pem(&label)?;
    let key = format!("exo-{}", hex(&random_bytes::<24>()?));
    let keys_text = format!(
        "# exo-router API keys: one `name = \"key\"` per client. The router re-reads this file when\n\
         # it changes: delete a line to revoke that key.\n[keys]\nadmin = \"{key}\"\n"
    );
    write_private(&cluster, &pem)?;
    write_private(&keys, &keys_text)?;
    println!("cluster {label}:");
    println!(
        "  {}  copy to every node and the router machine",
        cluster.display()
    );
    println!("  {}  API keys (admin = {key})", keys.display());
    println!("then, on each node machine:");
    println!(
        "  exo-router node --role ROLE --cluster {}",
        cluster.display()
    );
    println!("and on the router machine (a profile listing the nodes):");
    println!(
        "  exo-router serve --profile PROFILE --cluster {} --api-keys-file {}",
        cluster.display(),
        keys.display()
    );
    Ok(())
}

fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))?;
    Ok(bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a secret file that only its owner may read (mode 0600 on Unix).
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// `serve`'s API flags over the profile's `[api]` table.
fn apply_api_flags(profile: &mut Profile, args: &ServeArgs) -> Result<()> {
    let api = &mut profile.api;
    if let Some(key) = &args.api_key {
        api.keys.inline.push(("cli".into(), key.clone()));
    }
    if let Some(file) = &args.api_keys_file {
        api.keys.file = Some(file.clone());
    }
    api.open_metrics |= args.open_metrics;
    if let Some(file) = &args.cluster {
        profile.cluster_file = Some(file.clone());
    }
    if let Some(max) = args.max_body_bytes {
        api.max_body_bytes = usize::try_from(max).context("--max-body-bytes is too large")?;
    }
    Ok(())
}

/// Waits for ctrl-c (SIGINT) or, on Unix, SIGTERM; returns which came.
async fn stop_signal() -> Result<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.map(|()| "SIGINT").context("waiting for ctrl-c"),
            _ = term.recv() => Ok("SIGTERM"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c()
            .await
            .map(|()| "ctrl-c")
            .context("waiting for ctrl-c")
    }
}

/// Serves this node's Prometheus metrics at `http://addr/metrics`.
async fn serve_node_metrics(addr: std::net::SocketAddr) -> Result<()> {
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
    Ok(())
}
