//! The command line's side of LAN discovery: `serve` without a profile looks for nodes before it
//! chooses between the LAN profile and the local cluster; `node` announces itself, and with
//! `--measure` reports the speed it measured (or cached) so routers can place on it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use anyhow::{Context, Result};
use exo_engine::Model;
use exo_node::NodeServer;
use exo_node::measure::MeasurePlan;
use exo_protocol::discovery::{Announcement, Announcer, Browser, Sighting};
use exo_protocol::{LinkSecurity, NodePerf};
use exo_router::profile::Profile;

use crate::cli::{NodeArgs, ServeArgs};

/// How long `serve` without a profile listens for nodes before it decides.
const LOOK_FOR: Duration = Duration::from_secs(3);

/// The LAN profile (`profiles/lan.toml`), built in so `serve` finds it from any folder.
const LAN_PROFILE: &str = include_str!("../../profiles/lan.toml");

/// The profile `serve` runs and where it came from: `--profile`; without one, the LAN profile
/// when a node announced itself within [`LOOK_FOR`], else the default local cluster. Discovery is
/// on without a profile (unless `--no-discover`) and with `--discover`.
pub async fn serve_profile(args: &ServeArgs) -> Result<(Profile, PathBuf)> {
    let chosen = match &args.profile {
        Some(path) => Some(path.clone()),
        None if args.no_discover => None,
        None => {
            let found = look_for_nodes(&args.discovery_interfaces).await;
            if found.is_empty() {
                eprintln!("no node announced itself on the LAN; starting the local cluster");
                None
            } else {
                eprintln!("nodes on the LAN: {}", found.join(", "));
                let path = PathBuf::from("profiles/lan.toml (built in)");
                let mut profile = Profile::parse(LAN_PROFILE, &path)?;
                apply_discovery(&mut profile, args);
                return Ok((profile, path));
            }
        }
    };
    let path = chosen.unwrap_or_else(|| exo_router::default_profile().to_path_buf());
    let mut profile = Profile::load(&path)?;
    apply_discovery(&mut profile, args);
    Ok((profile, path))
}

/// `--discover`, `--no-discover` and `--discovery-interface` over the profile's `[discovery]`.
fn apply_discovery(profile: &mut Profile, args: &ServeArgs) {
    let d = &mut profile.discovery;
    d.enabled = (d.enabled || args.discover || args.profile.is_none()) && !args.no_discover;
    if !args.discovery_interfaces.is_empty() {
        d.interfaces.clone_from(&args.discovery_interfaces);
    }
}

/// The names of the nodes that announce themselves within [`LOOK_FOR`] (none when mDNS cannot
/// start: then there is no LAN to look at).
async fn look_for_nodes(interfaces: &[String]) -> Vec<String> {
    let browser = match Browser::start(interfaces) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("cannot look for nodes on the LAN: {e}");
            return Vec::new();
        }
    };
    let mut found = Vec::new();
    let listen = async {
        while let Some(s) = browser.next().await {
            if let Sighting::Seen { announcement, .. } = s
                && !found.contains(&announcement.name)
            {
                found.push(announcement.name);
            }
        }
    };
    let _ = tokio::time::timeout(LOOK_FOR, listen).await;
    found
}

/// Announces a node listening at `bound` on the LAN, unless `--no-announce` (or mDNS cannot
/// start here: then it warns); the goodbye goes out when the returned announcer is dropped.
pub fn announce(
    server: &NodeServer,
    bound: SocketAddr,
    security: &LinkSecurity,
    args: &NodeArgs,
    host: &str,
) -> Option<Announcer> {
    if args.no_announce {
        return None;
    }
    let info = server.info();
    let what = Announcement {
        name: info.name.clone(),
        role: info.role,
        port: bound.port(),
        fingerprint: info.fingerprint,
        layout: info.layout,
        version: info.version.clone(),
        tls: security.is_tls(),
    };
    match Announcer::start(&what, host, &args.discovery_interfaces) {
        Ok(a) => Some(a),
        // A machine without multicast still serves routers whose profiles list it.
        Err(e) => {
            eprintln!(
                "WARNING: cannot announce this node on the LAN ({e}); list it in the router's profile"
            );
            None
        }
    }
}

/// A measurement kept between starts, with what it was measured on.
#[derive(serde::Serialize, serde::Deserialize)]
struct CachedPerf {
    /// Model, build, layout, threads and where the model runs: another key, another measurement.
    key: String,
    perf: NodePerf,
}

/// The folder measurements are cached in.
fn cache_dir(args: &NodeArgs) -> Option<PathBuf> {
    if let Some(dir) = &args.profile_cache {
        return Some(dir.clone());
    }
    let env = |k| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("XDG_CACHE_HOME")
        .map(|d| d.join("exo-router"))
        .or_else(|| env("HOME").map(|h| h.join(".cache").join("exo-router")))
}

/// The node's perf table for `--measure`: the cached one for the same model, build, layout,
/// threads and offload, else a quick measurement (cached for the next start). `None` without
/// `--measure`.
pub async fn measured_perf(
    args: &NodeArgs,
    model: &Arc<Model>,
    slots: u32,
) -> Result<Option<NodePerf>> {
    if !args.measure {
        return Ok(None);
    }
    let config = args.engine.context_config(slots);
    let key = format!(
        "exo-router {}; model {}; layout {:?}; threads {}; {}; {} CPUs",
        env!("CARGO_PKG_VERSION"),
        model.fingerprint(),
        config.layout,
        config.n_threads,
        model.offload(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    // One file per key (FNV-1a of it): nodes of other roles or layouts on this machine keep theirs.
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let file = cache_dir(args).map(|d| d.join(format!("perf-{hash:016x}.json")));
    let cached = file
        .as_ref()
        .and_then(|f| std::fs::read(f).ok())
        .and_then(|b| serde_json::from_slice::<CachedPerf>(&b).ok())
        .filter(|c| c.key == key && c.perf.validate().is_ok());
    if let Some(c) = cached {
        eprintln!("perf table: reused the measurement cached for this model and machine");
        return Ok(Some(c.perf));
    }
    eprintln!("perf table: measuring this node (a quick plan; cached for the next start)");
    let started = std::time::Instant::now();
    let plan = MeasurePlan::for_slots(true, slots);
    let measured = exo_node::measure::measure(Arc::clone(model), config, &plan, |line| {
        tracing::debug!("{line}");
    })
    .await
    .context("measuring this node (--measure)")?;
    eprintln!(
        "perf table: measured in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if let Some(f) = &file {
        let saved = CachedPerf {
            key,
            perf: measured.perf.clone(),
        };
        let write = f
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| {
                std::fs::write(f, serde_json::to_vec_pretty(&saved).unwrap_or_default())
            });
        if let Err(e) = write {
            eprintln!("perf table: not cached ({}: {e})", f.display());
        }
    }
    Ok(Some(measured.perf))
}
