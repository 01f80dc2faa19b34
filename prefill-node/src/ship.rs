//! Shipping a prompt's cache to its decode node while the prompt runs (the streamed hand-off).
//!
//! A task starts with the prompt: with the first piece of the cache it sends the transfer's header
//! (`kv_begin`), then, as the engine hands over pieces of the cache ([`KvPiece`]: the cells of the last part of the prompt, every
//! eighth of it or so, then the whole cache after the last batch), frames them on a blocking thread
//! (cut into chunks of whole cells, compressed with the link's codec) and sends the chunks with up
//! to `chunks_in_flight` calls outstanding. Once the prompt's token 0 is known and every chunk call
//! returned, `kv_end` carries the end frame (the final state's checksum) and token 0. So the wire
//! time of all but the last piece hides behind the prompt's compute.

use std::sync::Arc;
use std::time::Instant;

use exo_engine::KvPiece;
use exo_kvcache::{KvEncoder, KvError, piece_tokens};
use exo_protocol::{
    Handoff, KvBegin, KvEnd, KvFrame, NodeError, NodeServiceClient, RequestId, SamplingParams,
    connect, context_with_deadline,
};
use futures::{StreamExt, TryStreamExt};
use tokio::sync::{mpsc, oneshot};

use crate::{
    ABORT_BACKOFF, ABORT_TIMEOUT, ABORT_TRIES, InFlight, MAX_PEERS, PrefillNode, kv_call_timeout,
};

/// A prompt whose cache is to be shipped.
pub(crate) struct Outbound<'a> {
    pub(crate) id: RequestId,
    pub(crate) handoff: Handoff,
    /// The sequence the prompt runs in.
    pub(crate) seq: i32,
    pub(crate) tokens: &'a [i32],
    pub(crate) sampling: SamplingParams,
    /// Keeps the request counted until the transfer ends.
    pub(crate) held: InFlight,
}

/// How a shipment ended when nothing failed.
enum Shipped {
    /// The decode node has the whole cache and token 0.
    Delivered,
    /// The request ended at token 0: the transfer was not needed (the decode node is told).
    NotNeeded,
    /// The prompt failed before any of its cache was sent: the decode node never heard of it.
    NotStarted,
}

/// Where the prompt sends the token it sampled and its output number (`None`: the request ended
/// with it) to end the transfer.
pub(crate) type FirstToken = oneshot::Sender<Option<(i32, u32)>>;

impl PrefillNode {
    /// Starts shipping `out`'s cache on a task of its own. Returns where the engine sends the pieces,
    /// how many tokens apart, and where token 0 goes once known. A failure from here on reaches the
    /// client through the decode node ([`Self::abort`]).
    pub(crate) fn start_shipment(
        self: &Arc<Self>,
        out: Outbound<'_>,
    ) -> Result<(mpsc::UnboundedSender<KvPiece>, usize, FirstToken), NodeError> {
        let (codec, chunk_size) = (out.handoff.codec, out.handoff.chunk_size);
        let n_pieces = match out.handoff.pieces {
            0 => self.ship.handoff_pieces,
            n => u64::from(n),
        };
        let spec = self
            .ctx
            .transfer_header(out.seq, out.tokens.to_vec(), codec, chunk_size);
        let encoder = KvEncoder::new(spec).map_err(|e| NodeError::Transfer(e.to_string()))?;
        let (pieces_tx, pieces) = mpsc::unbounded_channel();
        let (first_tx, first) = oneshot::channel();
        let node = Arc::clone(self);
        let (id, handoff, sampling, held) = (out.id, out.handoff, out.sampling, out.held);
        tokio::spawn(async move {
            let _held = held;
            let addr = handoff.decode_addr.clone();
            match node
                .ship(id, &handoff, encoder, sampling, pieces, first)
                .await
            {
                Ok(Shipped::Delivered | Shipped::NotStarted) => {}
                Ok(Shipped::NotNeeded) => {
                    let why = NodeError::Transfer("the request ended at its first token".into());
                    node.abort(id, &addr, why).await;
                }
                Err(e) => {
                    tracing::warn!(%id, decode = %addr, error = %e, "KV transfer failed");
                    node.abort(id, &addr, e).await;
                }
            }
        });
        Ok((
            pieces_tx,
            piece_tokens(out.tokens.len() as u64, n_pieces) as usize,
            first_tx,
        ))
    }

    /// Tells the decode node at `addr` that request `id`'s transfer failed with `error`, so the
    /// request fails there now (and the router's poll returns the reason) rather than at the decode
    /// node's transfer timeout. Best effort, on up to [`ABORT_TRIES`] fresh connections, backing off (the
    /// cached one may be what broke; the next transfer reuses the new one): an unreachable decode
    /// node is the router's to notice.
    async fn abort(&self, id: RequestId, addr: &str, error: NodeError) {
        let reason = match error {
            NodeError::Transfer(why) => format!("from prefill node {}: {why}", self.name),
            other => format!("from prefill node {}: {other}", self.name),
        };
        for attempt in 0..ABORT_TRIES {
            if attempt > 0 {
                tokio::time::sleep(ABORT_BACKOFF * (1 << (attempt - 1))).await;
            }
            self.peers.lock().await.remove(addr);
            let sent = match self.client(addr).await {
                Ok(c) => c
                    .kv_abort(context_with_deadline(ABORT_TIMEOUT), id, reason.clone())
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match sent {
                Ok(()) => return,
                Err(e) => {
                    tracing::debug!(%id, decode = %addr, error = %e, "could not abort the transfer")
                }
            }
        }
    }

    /// The cached connection to decode node `addr`, made if there is none. The map is not locked
    /// while connecting, so one unreachable decode node does not hold up shipping to the others.
    pub(crate) async fn client(&self, addr: &str) -> Result<NodeServiceClient, NodeError> {
        if let Some(c) = self.peers.lock().await.get(addr) {
            return Ok(c.clone());
        }
        let c = connect(addr, &self.security)
            .await
            .map_err(|e| NodeError::Transfer(format!("cannot reach decode node {addr}: {e}")))?;
        let mut peers = self.peers.lock().await;
        if peers.len() >= MAX_PEERS && !peers.contains_key(addr) {
            // A cluster has far fewer decode nodes; past the bound, forget any one connection
            // (it is made again when needed) rather than grow without limit.
            if let Some(old) = peers.keys().next().cloned() {
                peers.remove(&old);
            }
        }
        Ok(peers.entry(addr.to_string()).or_insert(c).clone())
    }

    /// Sends the header, then each piece's chunks as the engine hands them over (up to
    /// `chunks_in_flight` calls outstanding), then the end frame with token 0.
    async fn ship(
        &self,
        id: RequestId,
        handoff: &Handoff,
        encoder: KvEncoder,
        sampling: SamplingParams,
        pieces: mpsc::UnboundedReceiver<KvPiece>,
        first: oneshot::Receiver<Option<(i32, u32)>>,
    ) -> Result<Shipped, NodeError> {
        let started = Instant::now();
        let header = encoder.header_frame();
        let depth = self.ship.chunks_in_flight.max(1);
        // A blocking thread frames the pieces (cutting, compressing, checksums), at most `depth`
        // chunks ahead of the calls; it stops when the receiver goes (a failed call).
        let (frames_tx, mut frames_rx) = mpsc::channel::<Vec<u8>>(depth);
        let node = self.name.clone();
        let framer =
            tokio::task::spawn_blocking(move || frame_pieces(&node, encoder, pieces, frames_tx));
        // The decode node hears of the transfer with its first piece, not when the prompt starts:
        // its transfer timeout counts time without progress, and a prompt may wait in the engine's
        // queue or run long before it has a piece to send.
        let Some(first_frame) = frames_rx.recv().await else {
            // The prompt failed before any piece (the client hears it from the prefill call).
            return Ok(Shipped::NotStarted);
        };
        let client = self.client(&handoff.decode_addr).await?;
        let rpc = |e: tarpc::client::RpcError| NodeError::Transfer(e.to_string());
        let header_len = header.len();
        let begin = KvBegin {
            id,
            header,
            sampling,
        };
        client
            .kv_begin(context_with_deadline(kv_call_timeout(header_len, 1)), begin)
            .await
            .map_err(rpc)??;
        let frames = futures::stream::unfold(frames_rx, |mut rx| async move {
            rx.recv().await.map(|frame| (frame, rx))
        });
        futures::stream::once(async { first_frame })
            .chain(frames)
            .map(|bytes| {
                let client = client.clone();
                async move {
                    client
                        .kv_chunk(
                            context_with_deadline(kv_call_timeout(bytes.len(), depth)),
                            KvFrame { id, bytes },
                        )
                        .await
                        .map_err(rpc)?
                }
            })
            .buffered(depth)
            .try_collect::<Vec<()>>()
            .await?;
        let (encoder, end) = framer
            .await
            .map_err(|e| NodeError::Transfer(format!("framing stopped: {e}")))?
            .map_err(|e| NodeError::Transfer(e.to_string()))?;
        let Ok(Some((first_token, index))) = first.await else {
            // The prompt failed (its error reaches the client through the router) or ended at
            // token 0.
            return match end {
                Some(_) => Ok(Shipped::NotNeeded),
                None => Err(NodeError::Transfer("the prompt did not finish".into())),
            };
        };
        let frame = end.ok_or_else(|| {
            NodeError::Transfer("the engine ended the cache's pieces early".into())
        })?;
        let end_len = frame.len();
        let end = KvEnd {
            id,
            frame,
            first_token,
            index,
        };
        client
            .kv_end(context_with_deadline(kv_call_timeout(end_len, 1)), end)
            .await
            .map_err(rpc)??;
        let (raw, wire) = encoder.bytes_sent();
        let node = self.name.clone();
        metrics::counter!("exo_kv_wire_bytes_total", "node" => node.clone()).increment(wire);
        metrics::histogram!("exo_kv_transfer_seconds", "node" => node.clone())
            .record(started.elapsed().as_secs_f64());
        if wire > 0 {
            metrics::gauge!("exo_kv_compression_ratio", "node" => node)
                .set(raw as f64 / wire as f64);
        }
        Ok(Shipped::Delivered)
    }
}

/// Turns the engine's pieces into chunk frames and, after the final piece, the end frame; runs on
/// a blocking thread and counts, for `node`, the pieces in `exo_kv_pieces_total` and the final
/// state in `exo_kv_exported_bytes_total`. Returns the encoder (for its byte counts) and the end frame, `None` when the
/// pieces ended early (the prompt failed) or the frames' receiver went away.
fn frame_pieces(
    node: &str,
    mut encoder: KvEncoder,
    mut pieces: mpsc::UnboundedReceiver<KvPiece>,
    frames: mpsc::Sender<Vec<u8>>,
) -> Result<(KvEncoder, Option<Vec<u8>>), KvError> {
    while let Some(piece) = pieces.blocking_recv() {
        metrics::counter!("exo_kv_pieces_total", "node" => node.to_string()).increment(1);
        let end = match piece {
            KvPiece::Segment { first, bytes } => {
                while let Some(f) = encoder.next_frame_of_segment(&bytes, first)? {
                    if frames.blocking_send(f).is_err() {
                        return Ok((encoder, None));
                    }
                }
                None
            }
            KvPiece::Final(kv) => {
                metrics::counter!("exo_kv_exported_bytes_total", "node" => node.to_string())
                    .increment(kv.state.len() as u64);
                while let Some(f) = encoder.next_frame(&kv.state, kv.tokens.len())? {
                    if frames.blocking_send(f).is_err() {
                        return Ok((encoder, None));
                    }
                }
                Some(encoder.end_frame(&kv.state)?)
            }
        };
        if end.is_some() {
            return Ok((encoder, end));
        }
    }
    Ok((encoder, None))
}
