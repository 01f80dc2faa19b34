//! TCP transport for the node service: length-delimited bincode frames with explicit limits, over
//! plain TCP or mutual TLS ([`LinkSecurity`]).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_serde::formats::Bincode;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::service::{NodeServiceClient, NodeServiceRequest, NodeServiceResponse};
use crate::tls::{LinkIo, LinkSecurity};

/// Largest frame either end accepts: a 7 MiB KV chunk plus headroom (tarpc's default is 8 MiB).
pub const MAX_FRAME_BYTES: usize = 16 << 20;

/// Most connections a node serves at once; more are closed as they arrive. Its peers are the
/// router and the prefill nodes (one connection each, a few more while reconnecting).
pub const MAX_CONNECTIONS: usize = 256;

fn framed(stream: Box<dyn LinkIo>) -> Framed<Box<dyn LinkIo>, LengthDelimitedCodec> {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME_BYTES)
        .new_framed(stream)
}

/// Longest a connection attempt to a node may take. A host that drops packets (down, firewalled,
/// or a listener whose backlog is full) would otherwise hold the caller for the kernel's SYN
/// retries, about two minutes.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Connects to a node, giving up after [`CONNECT_TIMEOUT`] (an error of kind `TimedOut`); under
/// TLS the node must prove it is a member of the cluster, and so must we.
pub async fn connect(addr: &str, security: &LinkSecurity) -> std::io::Result<NodeServiceClient> {
    let stream = open_link(addr, security).await?;
    let transport = tarpc::serde_transport::new(framed(stream), Bincode::default());
    Ok(NodeServiceClient::new(tarpc::client::Config::default(), transport).spawn())
}

/// The byte stream of a new link to `addr`, past the TLS handshake when `security` asks for one
/// ([`connect`] runs the RPC client over it; tests write raw frames to it).
pub async fn open_link(addr: &str, security: &LinkSecurity) -> std::io::Result<Box<dyn LinkIo>> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no answer from {addr} within {} s",
                    CONNECT_TIMEOUT.as_secs()
                ),
            )
        })??;
    // Nagle plus delayed ACKs stall request/response traffic on loopback to ~100 MB/s.
    stream.set_nodelay(true)?;
    security.client(stream).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("{e} (is {addr} a node of this cluster, started with the same cluster file?)"),
        )
    })
}

/// A call context whose deadline is `timeout` from now (tarpc's default is 10 seconds).
pub fn context_with_deadline(timeout: Duration) -> tarpc::context::Context {
    let mut ctx = tarpc::context::current();
    ctx.deadline = Instant::now() + timeout;
    ctx
}

/// The server side of one connection, ready for `tarpc::server::BaseChannel`.
pub type ServerTransport = tarpc::serde_transport::Transport<
    Box<dyn LinkIo>,
    tarpc::ClientMessage<NodeServiceRequest>,
    tarpc::Response<NodeServiceResponse>,
    Bincode<tarpc::ClientMessage<NodeServiceRequest>, tarpc::Response<NodeServiceResponse>>,
>;

/// Accepts connections from `listener` until `shutdown` completes and runs `on_connection` for each
/// on its own task, once the peer passed `security`'s handshake (a peer that fails it is closed
/// and logged, and nothing it sent is decoded); connections still open at shutdown are aborted.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    security: LinkSecurity,
    shutdown: impl Future<Output = ()>,
    on_connection: F,
) where
    F: Fn(ServerTransport) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::pin!(shutdown);
    let on_connection = Arc::new(on_connection);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                if connections.len() >= MAX_CONNECTIONS {
                    tracing::warn!(%peer, limit = MAX_CONNECTIONS, "too many connections; closing this one");
                    continue;
                }
                let security = security.clone();
                let on_connection = Arc::clone(&on_connection);
                connections.spawn(async move {
                    let opened = async {
                        stream.set_nodelay(true)?;
                        security.server(stream).await
                    };
                    match opened.await {
                        Ok(io) => {
                            tracing::debug!(%peer, "connection opened");
                            let transport = tarpc::serde_transport::new(framed(io), Bincode::default());
                            on_connection(transport).await;
                        }
                        Err(e) => {
                            metrics::counter!("exo_node_link_refused_total").increment(1);
                            tracing::warn!(%peer, error = %e, "refused a connection that did not prove cluster membership");
                        }
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.shutdown().await;
}
