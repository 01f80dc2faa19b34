//! The command line's side of LAN discovery: `serve` without a profile looks for nodes before it
//! chooses between the LAN profile and the local cluster, and `node` announces itself.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use exo_node::NodeServer;
use exo_protocol::LinkSecurity;
use exo_protocol::discovery::{Announcement, Announcer, Browser, Sighting};
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
