//! A TCP proxy that injects faults between two processes: put its address where a node's address
//! would go (in a profile, say) and it forwards every connection to the real node, cutting those
//! the [`Fault`] names. Connections travel as bytes, so whatever the proxy does to them is what a
//! broken network would do to the RPC above.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What the proxy does to the connections it forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Nothing: a plain forwarder.
    None,
    /// Closes a connection (both ends) once its client has sent more than `bytes`, for the first
    /// `times` connections that get that far; later connections pass untouched.
    CutAfter {
        /// Bytes from the client a connection may carry.
        bytes: u64,
        /// Connections to cut.
        times: usize,
    },
}

/// A running proxy; stops when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    cuts: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards each connection to `target` with `fault`.
    pub async fn start(target: SocketAddr, fault: Fault) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let cuts = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&cuts);
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let cuts = Arc::clone(&counted);
                tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(target).await {
                        forward(inbound, outbound, fault, &cuts).await;
                    }
                });
            }
        });
        Ok(FaultProxy { addr, cuts, task })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections cut so far.
    pub fn cuts(&self) -> usize {
        self.cuts.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies both ways until either side closes or the fault cuts the connection; dropping the
/// streams then closes both ends.
async fn forward(inbound: TcpStream, outbound: TcpStream, fault: Fault, cuts: &AtomicUsize) {
    let (mut from_client, mut to_client) = inbound.into_split();
    let (mut from_server, mut to_server) = outbound.into_split();
    let up = async {
        let mut sent = 0u64;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from_client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if let Fault::CutAfter { bytes, times } = fault
                && sent + n as u64 > bytes
                && claim(cuts, times)
            {
                let keep = bytes.saturating_sub(sent) as usize;
                let _ = to_server.write_all(&buf[..keep]).await;
                return;
            }
            sent += n as u64;
            if to_server.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let down = tokio::io::copy(&mut from_server, &mut to_client);
    tokio::select! {
        () = up => {}
        _ = down => {}
    }
}

/// Takes one of the `times` cuts, if any is left.
fn claim(cuts: &AtomicUsize, times: usize) -> bool {
    cuts.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
        (c < times).then_some(c + 1)
    })
    .is_ok()
}
