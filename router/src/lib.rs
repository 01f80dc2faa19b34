//! exo-router: the router (placement and the OpenAI-compatible HTTP API) and the node daemons it drives.
//!
//! A request travels: `http` (parse, validate) -> `cluster` (placement on healthy, least-loaded nodes)
//! -> `generation` (prefill call on the prefill node, which ships the KV cache straight to the decode
//! node; then long-polls the decode node) -> `http` (JSON or server-sent events). `node` is the daemon
//! every machine runs (`exo-router node`), also used in-process for embedded nodes.

pub mod cluster;
pub mod costmodel;
pub mod error;
pub mod generation;
pub mod hardware;
pub mod http;
pub mod measure;
pub mod metrics;
pub mod node;
pub mod openai;
pub mod profile;
pub mod simulate;
pub mod toolcall;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use exo_engine::{EngineError, Model, ModelOptions};
use exo_kvcache::KvLayout;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::cluster::Cluster;
use crate::node::{NodeOptions, spawn_node};
use crate::profile::{NodeAddress, Profile};

/// Why the router could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
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
    /// The engine failed to load the model or create a context.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An embedded node failed to start.
    #[error("embedded node {name} failed to start: {detail}")]
    Node {
        /// Node name.
        name: String,
        /// What went wrong.
        detail: String,
    },
}

/// Finds the profile's model: as written (relative to the working directory), then relative to the
/// profile's folder and that folder's parent (so `profiles/x.toml` can name `models/...`).
pub fn resolve_model(profile: &Profile) -> Result<PathBuf, ServeError> {
    let m = &profile.model;
    let mut tried = vec![m.clone()];
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
        .ok_or_else(|| ServeError::ModelMissing {
            model: m.display().to_string(),
            tried: tried
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// A running router: HTTP API, cluster connections and any embedded nodes.
pub struct Server {
    /// Where the HTTP API listens.
    pub addr: SocketAddr,
    /// The cluster.
    pub cluster: Arc<Cluster>,
    stop: watch::Sender<bool>,
    http: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Starts embedded nodes, connects to all nodes and serves the API on `listen`.
    pub async fn start(profile: &Profile, listen: SocketAddr) -> Result<Server, ServeError> {
        metrics::handle();
        let (stop, stopped) = watch::channel(false);
        let shutdown = move || {
            let mut rx = stopped.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let mut expected = None;
        let mut model_id = profile
            .model
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut nodes = Vec::new();
        let model = if profile.has_embedded() {
            let path = resolve_model(profile)?;
            let model = Model::load(&path, &ModelOptions::default())?;
            expected = Some(model.fingerprint());
            model_id = model.name();
            Some(model)
        } else {
            None
        };
        for spec in &profile.nodes {
            let addr = match (&spec.address, &model) {
                (NodeAddress::Remote(a), _) => a.clone(),
                (NodeAddress::Embedded, Some(model)) => {
                    let options = NodeOptions {
                        name: spec.name.clone(),
                        role: spec.role,
                        layout: KvLayout {
                            n_seq_max: spec.slots,
                            ..profile.layout
                        },
                        chunks_in_flight: profile.kv.chunks_in_flight,
                    };
                    let local: SocketAddr = ([127, 0, 0, 1], 0).into();
                    let bound = spawn_node(Arc::clone(model), &options, local, shutdown())
                        .await
                        .map_err(|e| ServeError::Node {
                            name: spec.name.clone(),
                            detail: e.to_string(),
                        })?;
                    tracing::info!(node = %spec.name, role = %spec.role, %bound, "embedded node started");
                    bound.to_string()
                }
                (NodeAddress::Embedded, None) => continue,
            };
            nodes.push((spec.clone(), addr));
        }
        let cluster = Cluster::connect(
            nodes,
            profile.placement,
            profile.kv,
            profile.max_queued,
            cluster::CostInputs {
                policy: profile.policy,
                links: profile
                    .links
                    .iter()
                    .filter_map(|&(a, b, l)| {
                        let name = |i: usize| profile.nodes.get(i).map(|n| n.name.clone());
                        Some((name(a)?, name(b)?, l))
                    })
                    .collect(),
            },
            model_id,
            expected,
        )
        .await;
        let health = tokio::spawn(Arc::clone(&cluster).run_health());
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| ServeError::Bind {
                addr: listen.to_string(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ServeError::Bind {
            addr: listen.to_string(),
            source,
        })?;
        let app = http::router(Arc::clone(&cluster));
        let http_shutdown = shutdown();
        let http = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(http_shutdown)
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "HTTP server failed");
            }
            health.abort();
        });
        Ok(Server {
            addr,
            cluster,
            stop,
            http,
        })
    }

    /// Stops the HTTP API and the embedded nodes.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.http.await;
    }
}

/// The default profile path relative to the working directory.
pub fn default_profile() -> &'static Path {
    Path::new(profile::DEFAULT_PROFILE)
}
