//! TCP transport for the node service: length-delimited bincode frames with explicit limits.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_serde::formats::Bincode;
use tokio_util::codec::LengthDelimitedCodec;

use crate::service::{NodeServiceClient, NodeServiceRequest, NodeServiceResponse};

/// Largest frame either end accepts: a 7 MiB KV chunk plus headroom (tarpc's default is 8 MiB).
pub const MAX_FRAME_BYTES: usize = 16 << 20;

fn framed(
    stream: TcpStream,
) -> std::io::Result<tokio_util::codec::Framed<TcpStream, LengthDelimitedCodec>> {
    // Nagle plus delayed ACKs stall request/response traffic on loopback to ~100 MB/s.
    stream.set_nodelay(true)?;
    Ok(LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME_BYTES)
        .new_framed(stream))
}

/// Longest a connection attempt to a node may take. A host that drops packets (down, firewalled,
/// or a listener whose backlog is full) would otherwise hold the caller for the kernel's SYN
/// retries, about two minutes.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Connects to a node, giving up after [`CONNECT_TIMEOUT`] (an error of kind `TimedOut`).
pub async fn connect(addr: &str) -> std::io::Result<NodeServiceClient> {
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
    let transport = tarpc::serde_transport::new(framed(stream)?, Bincode::default());
    Ok(NodeServiceClient::new(tarpc::client::Config::default(), transport).spawn())
}

/// A call context whose deadline is `timeout` from now (tarpc's default is 10 seconds).
pub fn context_with_deadline(timeout: Duration) -> tarpc::context::Context {
    let mut ctx = tarpc::context::current();
    ctx.deadline = Instant::now() + timeout;
    ctx
}

/// The server side of one connection, ready for `tarpc::server::BaseChannel`.
pub type ServerTransport = tarpc::serde_transport::Transport<
    TcpStream,
    tarpc::ClientMessage<NodeServiceRequest>,
    tarpc::Response<NodeServiceResponse>,
    Bincode<tarpc::ClientMessage<NodeServiceRequest>, tarpc::Response<NodeServiceResponse>>,
>;

/// Accepts connections from `listener` until `shutdown` completes and runs `on_connection` for each
/// on its own task; connections still open at shutdown are aborted.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    on_connection: F,
) where
    F: Fn(ServerTransport) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::pin!(shutdown);
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
                match framed(stream) {
                    Ok(f) => {
                        tracing::debug!(%peer, "connection opened");
                        connections.spawn(on_connection(tarpc::serde_transport::new(f, Bincode::default())));
                    }
                    Err(e) => tracing::warn!(%peer, error = %e, "cannot configure connection"),
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.shutdown().await;
}
