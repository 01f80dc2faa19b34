//! exo-router's router: the OpenAI-compatible HTTP API over a cluster of nodes, and where each
//! request runs. It links no inference engine; the nodes it drives are `exo-node` daemons, spoken
//! to over tarpc (`exo-protocol`).
//!
//! A request travels: [`api`] (parse, validate, one request id) -> [`cluster`] (admission, then
//! [`placement`] over the healthy nodes' live load) -> [`generation`] (the prefill call, which ships
//! the KV cache straight to the decode node, and the decode node's output) -> [`api`] (JSON or
//! server-sent events). [`profile`] reads the cluster profile; [`simulate`] runs a workload through
//! a simulated cluster with the same placers; [`metrics`] is the Prometheus exporter.

pub mod api;
pub mod cluster;
pub mod generation;
pub mod metrics;
pub mod placement;
pub mod profile;
pub mod simulate;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::cluster::{Cluster, ServedModel};
use crate::profile::Profile;

/// Why the router could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The HTTP socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// What the router serves: a profile's nodes at known RPC addresses.
#[derive(Debug, Clone)]
pub struct Deployment<'a> {
    /// The cluster profile.
    pub profile: &'a Profile,
    /// The RPC address of each of the profile's nodes, in the profile's order.
    pub addrs: Vec<String>,
    /// The models the launcher loaded for embedded nodes; other models are learnt from the nodes.
    pub models: Vec<ServedModel>,
    /// How the HTTP API admits requests (keys, body limit).
    pub http: api::gate::HttpOptions,
    /// How links to the nodes are secured (the cluster file's mutual TLS, or plain TCP).
    pub security: exo_protocol::LinkSecurity,
}

/// A running router: HTTP API, cluster connections and health checks.
pub struct Server {
    /// Where the HTTP API listens.
    pub addr: SocketAddr,
    /// The cluster.
    pub cluster: Arc<Cluster>,
    /// Stops what runs beside the router (embedded nodes), after the HTTP side.
    stop: watch::Sender<bool>,
    /// Stops the HTTP side: no new connections, in-flight requests run to their end.
    http_stop: watch::Sender<bool>,
    http: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Connects to the deployment's nodes and serves the API on `listen` until [`Server::drain`]
    /// or [`Server::shutdown`], which set `stop` to true once the HTTP side has stopped: whatever
    /// watches it, such as embedded nodes, outlives the requests it serves.
    pub async fn start(
        deployment: Deployment<'_>,
        listen: SocketAddr,
        stop: watch::Sender<bool>,
    ) -> Result<Server, ServeError> {
        metrics::handle();
        let cluster = Cluster::connect(
            deployment.profile,
            deployment.addrs,
            deployment.models,
            deployment.security,
        )
        .await;
        let health = tokio::spawn(Arc::clone(&cluster).run_health());
        let discovery = &deployment.profile.discovery;
        let browse = discovery.enabled.then(|| {
            let interfaces = discovery.interfaces.clone();
            let run = Arc::clone(&cluster).run_discovery(interfaces);
            let probes = tokio::spawn(Arc::clone(&cluster).run_link_probes());
            let browse = tokio::spawn(async move {
                if let Err(e) = run.await {
                    tracing::error!(error = %e, "LAN discovery stopped; only the profile's nodes serve");
                }
            });
            (browse, probes)
        });
        let bind = |source| ServeError::Bind {
            addr: listen,
            source,
        };
        let listener = TcpListener::bind(listen).await.map_err(bind)?;
        let addr = listener.local_addr().map_err(bind)?;
        let app = api::router(Arc::clone(&cluster), &deployment.http);
        let keys = tokio::spawn(Arc::clone(&deployment.http.keys).watch());
        let (http_stop, mut stopped) = watch::channel(false);
        let http = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "HTTP server failed");
            }
            health.abort();
            keys.abort();
            if let Some((browse, probes)) = browse {
                browse.abort();
                probes.abort();
            }
        });
        Ok(Server {
            addr,
            cluster,
            stop,
            http_stop,
            http,
        })
    }

    /// Stops gracefully: accepts no new connection, lets the requests in flight (streams too)
    /// finish for up to `deadline`, drops those still running then (their clients see the
    /// connection close; their nodes cancel them), and only then stops the embedded nodes.
    pub async fn drain(mut self, deadline: Duration) {
        let in_flight = self.cluster.in_flight();
        tracing::info!(in_flight, deadline_s = deadline.as_secs_f64(), "draining");
        let _ = self.http_stop.send(true);
        if tokio::time::timeout(deadline, &mut self.http)
            .await
            .is_err()
        {
            tracing::warn!(
                in_flight = self.cluster.in_flight(),
                "drain deadline passed; dropping the requests still in flight"
            );
            self.http.abort();
            let _ = (&mut self.http).await;
        }
        let _ = self.stop.send(true);
    }

    /// Stops at once: [`Server::drain`] with no time for requests in flight.
    pub async fn shutdown(self) {
        self.drain(Duration::ZERO).await;
    }
}

/// The default profile path relative to the working directory.
pub fn default_profile() -> &'static Path {
    Path::new(profile::DEFAULT_PROFILE)
}
