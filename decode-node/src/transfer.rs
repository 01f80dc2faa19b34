//! One KV transfer in progress on a decode node: its decoder, and the chunks that arrived ahead of
//! the next expected one, parked within a window and a byte cap.

use std::collections::BTreeMap;

use exo_kvcache::{KvDecoder, chunk_index};
use exo_protocol::{NodeError, SamplingParams};

/// Chunks accepted ahead of the next expected one.
const REORDER_WINDOW: u32 = 16;
/// Most bytes of chunks one transfer may park ahead of the next expected chunk.
pub const MAX_PARKED_BYTES: usize = 32 << 20;

/// A transfer in progress.
pub(crate) struct Transfer {
    /// `None` once the transfer ended and the import took it.
    pub(crate) decoder: Option<Box<KvDecoder>>,
    pub(crate) sampling: SamplingParams,
    /// Chunks that arrived ahead of the next expected one.
    pub(crate) ahead: BTreeMap<u32, Vec<u8>>,
    /// Bytes received on the wire so far: the header frame and every chunk frame.
    pub(crate) wire_bytes: u64,
}

impl Transfer {
    /// Bytes this transfer holds: the state decoded so far and the chunks parked ahead.
    pub(crate) fn bytes_held(&self) -> usize {
        let decoded = self.decoder.as_ref().map_or(0, |d| d.bytes_held());
        decoded + self.ahead.values().map(Vec::len).sum::<usize>()
    }

    /// Feeds a chunk to the decoder, or parks it until its predecessors arrive. Decompression and
    /// checksums happen here: call it off the async threads.
    pub(crate) fn accept(&mut self, bytes: Vec<u8>) -> Result<(), NodeError> {
        let transfer = |e: exo_kvcache::KvError| NodeError::Transfer(e.to_string());
        let Some(decoder) = self.decoder.as_mut() else {
            return Err(NodeError::Transfer(
                "the transfer is already complete".into(),
            ));
        };
        let index = chunk_index(&bytes).map_err(transfer)?;
        self.wire_bytes += bytes.len() as u64;
        let next = decoder.chunks_received();
        if index > next {
            if index - next > REORDER_WINDOW || self.ahead.contains_key(&index) {
                return Err(NodeError::Transfer(format!(
                    "chunk {index} is outside the reorder window at {next}"
                )));
            }
            let parked: usize = self.ahead.values().map(Vec::len).sum();
            if parked + bytes.len() > MAX_PARKED_BYTES {
                return Err(NodeError::Transfer(format!(
                    "chunk {index} would park more than {MAX_PARKED_BYTES} bytes ahead of chunk {next}"
                )));
            }
            self.ahead.insert(index, bytes);
        } else {
            decoder.push_chunk(&bytes).map_err(transfer)?;
            while let Some(parked) = self.ahead.remove(&decoder.chunks_received()) {
                decoder.push_chunk(&parked).map_err(transfer)?;
            }
        }
        Ok(())
    }
}
