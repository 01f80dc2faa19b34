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

/// Connects to a node.
pub async fn connect(addr: &str) -> std::io::Result<NodeServiceClient> {
    let stream = TcpStream::connect(addr).await?;
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
