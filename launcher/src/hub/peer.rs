//! A model from a peer node instead of the internet: the node's own GGUF file, read in
//! [`MAX_MODEL_PART`] pieces over the cluster link (`model_part`, mutual TLS with a cluster file),
//! resumed from what is on disk, and checked against the fingerprint the peer's `hello` reports
//! before it is used.

use std::path::{Path, PathBuf};
use std::time::Duration;

use exo_protocol::{LinkSecurity, MAX_MODEL_PART, NodeServiceClient, context_with_deadline};
use tokio::io::AsyncWriteExt;

use super::download::Progress;
use super::{HubError, io_err};

/// Deadline of one piece (4 MiB: seconds even on a slow Wi-Fi link).
const PART_TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline of connecting and of `hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections a fetch may lose (each resumed where it stopped) before it gives up.
const ATTEMPTS: u32 = 5;

fn peer_err(addr: &str, detail: impl std::fmt::Display) -> HubError {
    HubError::Peer {
        addr: addr.to_string(),
        detail: detail.to_string(),
    }
}

async fn connect(addr: &str, security: &LinkSecurity) -> Result<NodeServiceClient, HubError> {
    tokio::time::timeout(HELLO_TIMEOUT, exo_protocol::connect(addr, security))
        .await
        .map_err(|_| peer_err(addr, "connection timed out"))?
        .map_err(|e| peer_err(addr, e))
}

/// Fetches the model the node at `addr` runs into `dest` (through `dest.incomplete`, resumed when a
/// part is there), unless `dest` is there already; returns `dest`. The finished file must have
/// the model fingerprint the peer reports (length, head, samples, tail), else it is removed.
pub async fn fetch_from_peer(
    addr: &str,
    security: &LinkSecurity,
    dest: &Path,
    progress: bool,
) -> Result<PathBuf, HubError> {
    if dest.is_file() {
        return Ok(dest.to_path_buf());
    }
    let mut client = connect(addr, security).await?;
    let info = client
        .hello(context_with_deadline(HELLO_TIMEOUT))
        .await
        .map_err(|e| peer_err(addr, e))?;
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        tokio::fs::create_dir_all(dir).await.map_err(io_err(dir))?;
    }
    let mut part_name = dest.as_os_str().to_owned();
    part_name.push(".incomplete");
    let part = PathBuf::from(part_name);
    let mut out = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&part)
        .await
        .map_err(io_err(&part))?;
    let mut have = out.metadata().await.map_err(io_err(&part))?.len();
    // The file's size first: a part longer than it is not this file's beginning.
    let total = client
        .model_part(context_with_deadline(HELLO_TIMEOUT), 0, 0)
        .await
        .map_err(|e| peer_err(addr, e))?
        .map_err(|e| peer_err(addr, e))?
        .total;
    if have > total {
        out.set_len(0).await.map_err(io_err(&part))?;
        have = 0;
    }
    let mut shown = Progress::new(progress, &format!("{} from {addr}", info.model), total);
    shown.at(have);
    let mut lost = 0;
    loop {
        let ctx = context_with_deadline(PART_TIMEOUT);
        let piece = match client.model_part(ctx, have, MAX_MODEL_PART).await {
            Ok(reply) => reply.map_err(|e| peer_err(addr, e))?,
            Err(e) if lost + 1 < ATTEMPTS => {
                lost += 1;
                shown.interrupt(&format!(
                    "connection lost ({e}); resuming (attempt {} of {ATTEMPTS})",
                    lost + 1
                ));
                // A peer that is briefly away gets a moment; each failed reconnect counts too.
                tokio::time::sleep(Duration::from_millis(500 * u64::from(lost))).await;
                if let Ok(c) = connect(addr, security).await {
                    client = c;
                }
                continue;
            }
            Err(e) => return Err(peer_err(addr, e)),
        };
        if piece.bytes.is_empty() {
            if have == piece.total {
                break;
            }
            return Err(peer_err(
                addr,
                format!("sent nothing at {have} of {} bytes", piece.total),
            ));
        }
        out.write_all(&piece.bytes).await.map_err(io_err(&part))?;
        have += piece.bytes.len() as u64;
        shown.add(piece.bytes.len() as u64);
        if have >= piece.total {
            break;
        }
    }
    out.flush().await.map_err(io_err(&part))?;
    drop(out);
    shown.done();
    let hashed = part.clone();
    let fingerprint = tokio::task::spawn_blocking(move || exo_engine::fingerprint_file(&hashed))
        .await
        .map_err(|e| peer_err(addr, e))?
        .map_err(io_err(&part))?;
    if fingerprint != info.fingerprint {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(HubError::Checksum {
            file: dest.display().to_string(),
            expected: format!("fingerprint {} (the peer's)", info.fingerprint),
            actual: format!("fingerprint {fingerprint}"),
        });
    }
    tokio::fs::rename(&part, dest).await.map_err(io_err(dest))?;
    Ok(dest.to_path_buf())
}
