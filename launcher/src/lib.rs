//! exo-launcher: the `exo-router` command, which composes the router (`exo-router`, no inference
//! engine) and the node daemon (`exo-node`, llama.cpp). This library holds what the command and the
//! system tests share: [`start`] brings up a profile's cluster, embedded nodes and router together.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use exo_engine::{ContextConfig, EngineError, Model, ModelOptions};
use exo_kvcache::KvLayout;
use exo_node::{DecodeTimeouts, NodeOptions, SpawnError, spawn_node};
use exo_protocol::LinkSecurity;
use exo_router::api::gate::HttpOptions;
use exo_router::cluster::ServedModel;
use exo_router::profile::{NodeAddress, NodeSpec, Profile};
use exo_router::{Deployment, ServeError, Server};
use tokio::sync::watch;

mod threads;
pub use threads::thread_budgets;

/// Why a cluster could not start.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The model of the embedded nodes was not found.
    #[error(
        "model file {model} not found (looked in {tried}); run scripts/fetch-model or fix the profile"
    )]
    ModelMissing {
        /// As written in the profile.
        model: String,
        /// Where it was looked for.
        tried: String,
    },
    /// The engine failed to load the model.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// An embedded node failed to start.
    #[error("embedded node {name} failed to start: {source}")]
    Node {
        /// Node name.
        name: String,
        /// What went wrong.
        source: SpawnError,
    },
    /// The router failed to start.
    #[error(transparent)]
    Router(#[from] ServeError),
    /// The API keys could not be loaded.
    #[error(transparent)]
    Keys(#[from] exo_router::api::auth::KeysError),
    /// The cluster file could not be loaded.
    #[error(transparent)]
    Cluster(#[from] exo_protocol::ClusterError),
}

/// Finds the profile's model: as written (relative to the working directory), then relative to the
/// profile's folder and that folder's parent (so `profiles/x.toml` can name `models/...`).
pub fn resolve_model(profile: &Profile) -> Result<PathBuf, LaunchError> {
    resolve_model_path(profile, &profile.model)
}

/// Finds model file `m` named in `profile` the way [`resolve_model`] finds the profile's.
pub fn resolve_model_path(profile: &Profile, m: &Path) -> Result<PathBuf, LaunchError> {
    let mut tried = vec![m.to_path_buf()];
    if m.is_relative()
        && let Some(dir) = profile.path.parent()
    {
        tried.push(dir.join(m));
        if let Some(up) = dir.parent() {
            tried.push(up.join(m));
        }
    }
    tried
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| LaunchError::ModelMissing {
            model: m.display().to_string(),
            tried: tried
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Starts one embedded node on a free loopback port; it stops when `stop` turns true.
async fn start_embedded(
    model: &Arc<Model>,
    profile: &Profile,
    spec: &NodeSpec,
    threads: u32,
    security: &LinkSecurity,
    stop: &watch::Sender<bool>,
) -> Result<String, LaunchError> {
    let options = NodeOptions {
        name: spec.name.clone(),
        role: spec.role,
        context: ContextConfig {
            layout: KvLayout {
                n_seq_max: spec.slots,
                ..profile.layout
            },
            n_threads: threads,
            ..ContextConfig::default()
        },
        chunks_in_flight: profile.kv.chunks_in_flight,
        handoff_pieces: exo_kvcache::HANDOFF_PIECES,
        transfer_timeout: DecodeTimeouts::default().transfer,
        security: security.clone(),
        perf: spec.perf.clone(),
    };
    let mut stopped = stop.subscribe();
    let shutdown = async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    let local: SocketAddr = ([127, 0, 0, 1], 0).into();
    // Embedded nodes serve only this router, which drains its requests before it stops them.
    let (bound, _) = spawn_node(Arc::clone(model), &options, local, shutdown)
        .await
        .map_err(|source| LaunchError::Node {
            name: spec.name.clone(),
            source,
        })?;
    tracing::info!(node = %spec.name, role = %spec.role, %bound, threads, "embedded node started");
    Ok(bound.to_string())
}

/// Starts the cluster a profile describes: starts the embedded nodes (if any, loading each model
/// once for all the nodes that run it), then the router, which connects to every node and serves
/// the API on `listen`. [`Server::shutdown`] stops the embedded nodes too.
pub async fn start(profile: &Profile, listen: SocketAddr) -> Result<Server, LaunchError> {
    let (stop, _) = watch::channel(false);
    let security = LinkSecurity::from_cluster_file(profile.cluster_file.as_deref())?;
    let mut models: Vec<(PathBuf, Arc<Model>)> = Vec::new();
    let mut addrs = Vec::new();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let budgets = thread_budgets(&profile.nodes, cores);
    let planned: u32 = budgets.iter().flatten().sum();
    if planned > cores {
        tracing::warn!(
            planned,
            cores,
            "the embedded nodes' threads add up to more than this machine's cores; their engines will slow each other down"
        );
    }
    for (spec, budget) in profile.nodes.iter().zip(budgets) {
        let addr = match &spec.address {
            NodeAddress::Remote(a) => a.clone(),
            NodeAddress::Embedded => {
                let path =
                    resolve_model_path(profile, spec.model.as_ref().unwrap_or(&profile.model))?;
                let loaded = match models.iter().find(|(p, _)| *p == path) {
                    Some((_, m)) => Arc::clone(m),
                    None => {
                        let m = Model::load(&path, &ModelOptions::default())?;
                        models.push((path, Arc::clone(&m)));
                        m
                    }
                };
                let threads = budget.unwrap_or(cores);
                start_embedded(&loaded, profile, spec, threads, &security, &stop).await?
            }
        };
        addrs.push(addr);
    }
    let deployment = Deployment {
        profile,
        addrs,
        http: HttpOptions::load(&profile.api)?,
        security,
        models: models
            .iter()
            .map(|(_, m)| ServedModel {
                id: m.name(),
                fingerprint: m.fingerprint(),
            })
            .collect(),
    };
    Ok(Server::start(deployment, listen, stop).await?)
}
