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
    /// Stops forwarding a connection's client bytes (without closing it) once the client has
    /// sent more than `bytes`, for the first `times` connections that get that far: a stalled
    /// link. Counted in [`FaultProxy::cuts`] like a cut.
    StallAfter {
        /// Bytes from the client that get through.
        bytes: u64,
        /// Connections to stall.
        times: usize,
    },
    /// Each connection is refused (closed as soon as it is accepted) with probability
    /// 1/`refuse_one_in`, else stalled with probability 1/`stall_one_in`, and otherwise cut, after
    /// a random number of client bytes below `max_bytes`: a busy connection is cut (or stalls)
    /// sooner or later, a quiet one may never be. The draws come from `seed`, so a run can be
    /// repeated.
    Chaos {
        /// One refused connection in this many.
        refuse_one_in: u64,
        /// Of the others, one stalled (not cut) in this many (0: none).
        stall_one_in: u64,
        /// Cuts happen below this many client bytes.
        max_bytes: u64,
        /// Seed of the draws.
        seed: u64,
    },
}

/// What happens to one connection.
#[derive(Debug, Clone, Copy)]
enum Fate {
    Pass,
    Refuse,
    Cut(u64),
    Stall(u64),
}

/// A small deterministic generator (splitmix64) for the proxy's draws.
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Fault {
    /// The fate of connection number `n` (from 0).
    fn fate(self, n: u64) -> Fate {
        match self {
            Fault::Chaos {
                refuse_one_in,
                stall_one_in,
                max_bytes,
                seed,
            } => {
                let draw = splitmix(seed ^ splitmix(n));
                let bytes = splitmix(draw) % max_bytes.max(1);
                if refuse_one_in > 0 && draw.is_multiple_of(refuse_one_in) {
                    Fate::Refuse
                } else if stall_one_in > 0 && splitmix(draw ^ 1).is_multiple_of(stall_one_in) {
                    Fate::Stall(bytes)
                } else {
                    Fate::Cut(bytes)
                }
            }
            Fault::None | Fault::CutAfter { .. } | Fault::StallAfter { .. } => Fate::Pass,
        }
    }
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
            let mut n = 0u64;
            while let Ok((inbound, _)) = listener.accept().await {
                let cuts = Arc::clone(&counted);
                let fate = fault.fate(n);
                n += 1;
                tokio::spawn(async move {
                    if let Fate::Refuse = fate {
                        cuts.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    if let Ok(outbound) = TcpStream::connect(target).await {
                        forward(inbound, outbound, fault, fate, &cuts).await;
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

    /// Connections cut (or refused) so far.
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
async fn forward(
    inbound: TcpStream,
    outbound: TcpStream,
    fault: Fault,
    fate: Fate,
    cuts: &AtomicUsize,
) {
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
            let (limit, stall) = match (fault, fate) {
                (Fault::CutAfter { bytes, times }, _) => (Some((bytes, times)), false),
                (Fault::StallAfter { bytes, times }, _) => (Some((bytes, times)), true),
                (_, Fate::Cut(bytes)) => (Some((bytes, usize::MAX)), false),
                (_, Fate::Stall(bytes)) => (Some((bytes, usize::MAX)), true),
                _ => (None, false),
            };
            if let Some((bytes, times)) = limit
                && sent + n as u64 > bytes
                && claim(cuts, times)
            {
                let keep = bytes.saturating_sub(sent) as usize;
                let _ = to_server.write_all(&buf[..keep]).await;
                if stall {
                    // Hold both ends open and move nothing more, until the proxy stops.
                    std::future::pending::<()>().await;
                }
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
