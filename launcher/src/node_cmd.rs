//! `exo-router node`: the node daemon. One node serves the `--model`; each `--also-model` is one more
//! node in the same process (its own name, port, engine context and share of the CPU threads), so
//! one machine can offer several models when its memory holds them all. Routers see each as a
//! node of its own (announced on the LAN, or listed in a profile by its address).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use exo_engine::Model;
use exo_node::{NodeOptions, NodeServer, spawn_node};
use exo_protocol::LinkSecurity;

use crate::cli::NodeArgs;
use crate::{host_name, lan, load_model, serve_node_metrics, stop_signal};

/// One node of this process, serving.
struct Served {
    name: String,
    server: NodeServer,
    /// Its mDNS announcement (dropped on stop: the goodbye).
    announcer: Option<exo_protocol::discovery::Announcer>,
}

/// A node started but not yet announced: its address, its own arguments (its model, its threads)
/// and its server.
struct Started {
    bound: SocketAddr,
    args: NodeArgs,
    server: NodeServer,
}

/// What the nodes of this process share.
struct Shared<'a> {
    args: &'a NodeArgs,
    security: &'a LinkSecurity,
    listen: SocketAddr,
    threads: u32,
    slots: u32,
}

/// Runs the node(s) until SIGINT or SIGTERM, then drains them (up to `--drain-timeout`).
pub async fn node(args: NodeArgs) -> Result<()> {
    let security = LinkSecurity::from_cluster_file(args.cluster.as_deref())?;
    let listen = node_listen(&args, &security);
    let paths: Vec<PathBuf> = std::iter::once(args.engine.model.clone())
        .chain(args.also_models.iter().cloned())
        .collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    // Before the models load: what they take afterwards is what the check asks about.
    let available = exo_node::hardware::os_available_memory();
    let mut models = Vec::with_capacity(paths.len());
    for path in &paths {
        let mut engine = args.engine.clone();
        engine.model.clone_from(path);
        models.push(load_model(&engine)?);
    }
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("{}-{}", host_name(), listen.port()));
    let names = node_names(&name, &models)?;
    let weights: Vec<(String, u64)> = models.iter().map(|m| resident_weights(m)).collect();
    if models.len() > 1 {
        check_memory(&weights, 0, available)?;
    }
    if let Some(addr) = args.metrics_listen {
        serve_node_metrics(addr).await?;
    }
    let shared = Shared {
        args: &args,
        security: &security,
        listen,
        threads: thread_share(args.engine.threads, cores, paths.len()),
        slots: args.slots.unwrap_or(args.role.default_slots()),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut started = Vec::with_capacity(models.len());
    let mut kv_bytes = 0u64;
    for (i, (model, node_name)) in models.iter().zip(&names).enumerate() {
        let node = start(&shared, i, (model, node_name), &paths[i], stop_rx.clone()).await?;
        kv_bytes = kv_bytes.saturating_add(cpu_share(model, node.server.kv_capacity_bytes()));
        started.push(node);
    }
    // Every cache is allocated now: a refusal comes before any node announces or says it listens.
    if models.len() > 1 {
        check_memory(&weights, kv_bytes, available)?;
    }
    let nodes: Vec<Served> = started
        .into_iter()
        .zip(models.iter().zip(names))
        .map(|(node, (model, name))| go_live(&shared, node, model, name))
        .collect();
    let signal = stop_signal().await?;
    drain(nodes, signal, args.drain_timeout).await;
    let _ = stop_tx.send(true);
    Ok(())
}

/// Starts node `i` of the process, `name` serving `model` (from `path`), until `stop` turns true.
async fn start(
    shared: &Shared<'_>,
    i: usize,
    (model, name): (&Arc<Model>, &str),
    path: &Path,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Started> {
    let args = shared.args;
    let mut node_args = args.clone();
    node_args.engine.model = path.to_path_buf();
    node_args.engine.threads = shared.threads;
    let options = NodeOptions {
        name: name.to_string(),
        role: args.role,
        context: node_args.engine.context_config(shared.slots),
        chunks_in_flight: args.chunks_in_flight,
        handoff_pieces: args.handoff_pieces,
        transfer_timeout: Duration::from_secs_f64(args.transfer_timeout),
        security: shared.security.clone(),
        perf: lan::measured_perf(&node_args, model, shared.slots).await?,
    };
    let port = match shared.listen.port() {
        0 => 0,
        first => first.saturating_add(u16::try_from(i).unwrap_or(u16::MAX)),
    };
    let (bound, server) = spawn_node(
        Arc::clone(model),
        &options,
        SocketAddr::new(shared.listen.ip(), port),
        async move {
            let _ = stop.wait_for(|s| *s).await;
        },
    )
    .await
    .with_context(|| format!("starting node {name}"))?;
    Ok(Started {
        bound,
        args: node_args,
        server,
    })
}

/// Announces a started node on the LAN (unless `--no-announce`) and prints its address.
fn go_live(shared: &Shared<'_>, node: Started, model: &Model, name: String) -> Served {
    let security = shared.security;
    let announcer = lan::announce(&node.server, node.bound, security, &node.args, &host_name());
    if announcer.is_some() {
        println!("announced on the LAN as {name} (mDNS; --no-announce to stay off it)");
    }
    // The address is the line's last word: scripts and tests read it from there.
    println!(
        "exo-router node {name} ({}, {}, {}) listening on {}",
        shared.args.role,
        model.name(),
        security.describe(),
        node.bound
    );
    Served {
        name,
        server: node.server,
        announcer,
    }
}

/// Says goodbye on the LAN for every node first (routers place nothing more here), then lets the
/// requests they hold finish, up to `drain_timeout` seconds.
async fn drain(mut nodes: Vec<Served>, signal: &str, drain_timeout: u64) {
    for s in &mut nodes {
        drop(s.announcer.take());
    }
    eprintln!("{signal}: draining (up to {drain_timeout} s)");
    let deadline = Duration::from_secs(drain_timeout);
    let left = futures::future::join_all(nodes.iter().map(|s| s.server.drain(deadline))).await;
    if nodes.len() > 1 {
        for (s, left) in nodes.iter().zip(&left) {
            eprintln!("{}: {left} requests unfinished", s.name);
        }
    }
    eprintln!(
        "stopped with {} requests unfinished",
        left.iter().sum::<usize>()
    );
}

/// The node's listen address: as given, else every interface with a cluster file and loopback
/// without one. A node reachable from other machines without a cluster file gets a warning.
fn node_listen(args: &NodeArgs, security: &LinkSecurity) -> SocketAddr {
    let default_ip = if security.is_tls() {
        [0, 0, 0, 0]
    } else {
        [127, 0, 0, 1]
    };
    let listen = args
        .listen
        .unwrap_or_else(|| (default_ip, exo_router::profile::DEFAULT_NODE_PORT).into());
    if !security.is_tls() && !listen.ip().is_loopback() {
        eprintln!(
            "WARNING: this node listens on {listen}, reachable from other machines, without a cluster file:\n\
             WARNING: anyone who reaches it can run prompts, push KV caches and read other requests'\n\
             WARNING: output. Start it with --cluster FILE (`exo-router cluster init`; docs/security.md)."
        );
    }
    listen
}

/// Each of `models` engines' CPU threads: an equal share of `threads` (0: every one of the
/// machine's `cores`), at least one, so engines in one process do not oversubscribe the cores.
/// A single model keeps `threads` as given.
fn thread_share(threads: u32, cores: u32, models: usize) -> u32 {
    if models <= 1 {
        return threads;
    }
    let budget = if threads == 0 { cores } else { threads };
    (budget / u32::try_from(models).unwrap_or(u32::MAX)).max(1)
}

/// Each model's node name: `name` for the first, `name-<model>` for the others; refused when two
/// would have the same name (routers could not tell them apart).
fn node_names(name: &str, models: &[Arc<Model>]) -> Result<Vec<String>> {
    let mut names: Vec<String> = Vec::with_capacity(models.len());
    for (i, model) in models.iter().enumerate() {
        let node_name = if i == 0 {
            name.to_string()
        } else {
            format!("{name}-{}", model.name())
        };
        if names.contains(&node_name) {
            bail!(
                "two models would both serve as node {node_name}: give --also-model files of \
                 different names"
            );
        }
        names.push(node_name);
    }
    Ok(names)
}

/// A model's name and the bytes of its weights held in host memory.
fn resident_weights(model: &Model) -> (String, u64) {
    let file = std::fs::metadata(model.path()).map_or(0, |m| m.len());
    (model.name().to_string(), cpu_share(model, file))
}

/// The part of `bytes` (a model's weights or KV cache, spread over its layers) that stays in host
/// memory: the share of its layers not offloaded to a GPU.
fn cpu_share(model: &Model, bytes: u64) -> u64 {
    let offload = model.offload();
    let on_cpu = offload.n_layer.saturating_sub(offload.gpu_layers);
    let share = f64::from(on_cpu) / f64::from(offload.n_layer.max(1));
    (bytes as f64 * share) as u64
}

/// Refuses models whose weights (`weights`: name and bytes in host memory) and KV caches
/// (`kv_bytes`) together take more than the memory `available` (nothing is refused when the OS
/// does not say).
fn check_memory(weights: &[(String, u64)], kv_bytes: u64, available: Option<u64>) -> Result<()> {
    let Some(available) = available else {
        return Ok(());
    };
    let total = weights
        .iter()
        .map(|(_, b)| *b)
        .fold(kv_bytes, u64::saturating_add);
    if total <= available {
        return Ok(());
    }
    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
    let list: Vec<String> = weights
        .iter()
        .map(|(n, b)| format!("{n} {:.1} GiB", gib(*b)))
        .collect();
    bail!(
        "these models do not fit this machine's memory: {}{} need {:.1} GiB, {:.1} GiB is \
         available; serve fewer models here (drop an --also-model), fewer --slots or a shorter \
         --n-ctx-seq",
        list.join(", "),
        if kv_bytes > 0 {
            format!(" and their KV caches {:.1} GiB", gib(kv_bytes))
        } else {
            String::new()
        },
        gib(total),
        gib(available)
    )
}

/// Resolves the `--also-model` names and paths like `--model`'s.
pub async fn resolve_also_models(args: &mut NodeArgs) -> Result<()> {
    for m in &mut args.also_models {
        *m = crate::hub_model(m).await?;
        if !Path::new(m).is_file() {
            bail!("--also-model {}: no such file", m.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{check_memory, thread_share};

    #[test]
    fn engines_of_one_process_share_the_threads() {
        assert_eq!(thread_share(0, 16, 1), 0, "one model: llama.cpp's default");
        assert_eq!(thread_share(6, 16, 1), 6);
        assert_eq!(thread_share(0, 16, 2), 8);
        assert_eq!(thread_share(6, 16, 4), 1);
        assert_eq!(thread_share(0, 2, 3), 1, "at least one each");
    }

    #[test]
    fn models_that_do_not_fit_are_refused_by_name() {
        let gib = 1u64 << 30;
        let two = [("a".to_string(), 3 * gib), ("b".to_string(), 4 * gib)];
        assert!(check_memory(&two, 0, Some(8 * gib)).is_ok());
        assert!(check_memory(&two, 0, None).is_ok(), "nothing to go by");
        let Err(e) = check_memory(&two, 2 * gib, Some(8 * gib)) else {
            panic!("9 GiB fit in 8");
        };
        let e = e.to_string();
        assert!(e.contains("a 3.0 GiB, b 4.0 GiB"), "{e}");
        assert!(
            e.contains("KV caches 2.0 GiB") && e.contains("9.0 GiB"),
            "{e}"
        );
    }
}
