//! The receiving side: chunk frames checked one by one, in order, their cells placed into the state,
//! and the end frame that closes the transfer.

use xxhash_rust::xxh3::xxh3_64;

use super::{
    CHUNK_MAGIC, DecodeLimits, END_FRAME_LEN, END_MAGIC, ImportTarget, KvHeader, Part, Reader,
};
use crate::error::KvError;
use crate::state::Caches;

/// The index of a chunk frame, read without checking anything else (for reordering on arrival).
pub fn chunk_index(frame: &[u8]) -> Result<u32, KvError> {
    let mut r = Reader::new(frame, "KV chunk");
    r.expect_magic(CHUNK_MAGIC)?;
    r.u32()
}

/// A state reassembled from frames whose checksums, sizes and order all checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedKv {
    /// The transfer's header.
    pub header: KvHeader,
    /// The uncompressed llama.cpp sequence state (single-stream form).
    pub state: Vec<u8>,
}

/// Checks the frames of one transfer, in order, and places each chunk's cells straight into the
/// state they belong to, refusing anything inconsistent. After the full cache's cells come a hybrid
/// model's recurrent section (exactly its shape's length, in chunks) and an iSWA model's window
/// cells (kept as segments); both are joined to the state at the end.
pub struct KvDecoder {
    header: KvHeader,
    tag: u64,
    per_cell: usize,
    next: u32,
    /// Cells placed so far.
    cells: usize,
    /// Bytes of one window cell in a segment (0 without a window).
    window_per_cell: usize,
    /// The window cache's cells received so far, chunk by chunk.
    window: Vec<Vec<u8>>,
    window_cells: usize,
    /// The recurrent section's bytes received so far, and its length (0 without one).
    recurrent: Vec<u8>,
    recurrent_len: usize,
    /// The receiver's limit on the joined state's bytes.
    max_state_bytes: u64,
    /// Allocated once the first chunk passed its checks.
    state: Vec<u8>,
    /// The current chunk, decoded.
    scratch: Vec<u8>,
}

/// The fixed head of a chunk frame (after its magic), as read, not yet checked.
struct ChunkHead {
    index: u32,
    raw_len: u32,
    enc_len: u32,
    tag: u64,
    checksum: u64,
}

impl ChunkHead {
    /// Reads the magic and the head fields, in wire order.
    fn read(r: &mut Reader<'_>) -> Result<Self, KvError> {
        r.expect_magic(CHUNK_MAGIC)?;
        Ok(ChunkHead {
            index: r.u32()?,
            raw_len: r.u32()?,
            enc_len: r.u32()?,
            tag: r.u64()?,
            checksum: r.u64()?,
        })
    }
}

impl KvDecoder {
    /// Reads the header frame and checks it against the receiver's limits and identity before any
    /// payload is accepted.
    pub fn new(
        header_frame: &[u8],
        limits: &DecodeLimits,
        target: &ImportTarget,
    ) -> Result<Self, KvError> {
        let header = KvHeader::decode(header_frame, limits)?;
        target.check(&header)?;
        let tag = header.transfer_tag();
        let per_cell_of = |shape: &crate::state::StateShape| {
            usize::try_from(shape.segment_bytes_per_cell()?)
                .map_err(|_| KvError::MalformedState("cell size does not fit in memory".into()))
        };
        let per_cell = per_cell_of(&header.shape)?;
        let window_per_cell = match header.shape.window.as_deref() {
            Some(w) => per_cell_of(w)?,
            None => 0,
        };
        let recurrent_len = usize::try_from(header.shape.recurrent_len()?)
            .map_err(|_| KvError::MalformedState("recurrent state too large".into()))?;
        Ok(KvDecoder {
            header,
            tag,
            per_cell,
            next: 0,
            cells: 0,
            window_per_cell,
            window: Vec::new(),
            window_cells: 0,
            recurrent: Vec::new(),
            recurrent_len,
            max_state_bytes: limits.max_state_bytes,
            state: Vec::new(),
            scratch: Vec::new(),
        })
    }

    /// The checked header.
    pub fn header(&self) -> &KvHeader {
        &self.header
    }

    /// Bytes of cells received so far.
    pub fn bytes_held(&self) -> usize {
        self.cells * self.per_cell + self.window_cells * self.window_per_cell + self.recurrent.len()
    }

    /// Chunks accepted so far.
    pub fn chunks_received(&self) -> u32 {
        self.next
    }

    /// True once every cell of the full cache has arrived (window cells and the end frame may
    /// still be due).
    pub fn is_complete(&self) -> bool {
        self.cells == self.full_cells()
    }

    /// Checks one chunk frame and places its cells. Chunks must arrive in index order.
    ///
    /// The checks run in a fixed order, which decides the error a bad frame reports: the head's
    /// fields, the chunk's place in the transfer, its declared sizes, then its payload.
    pub fn push_chunk(&mut self, frame: &[u8]) -> Result<(), KvError> {
        let mut r = Reader::new(frame, "KV chunk");
        let head = ChunkHead::read(&mut r)?;
        self.check_place(&head)?;
        self.check_declared_sizes(&head)?;
        let payload = r.rest();
        self.check_payload(&head, payload)?;
        self.place(head.index, head.raw_len, payload)?;
        self.next += 1;
        Ok(())
    }

    /// Ends the transfer with its end frame: every chunk and cell present, and the joined state's
    /// checksum equal to the sender's final export's.
    pub fn finish(mut self, end_frame: &[u8]) -> Result<DecodedKv, KvError> {
        let end = EndFrame::read(end_frame)?;
        if end.tag != self.tag {
            return Err(KvError::InvalidField {
                field: "end frame",
                detail: "it belongs to another transfer".into(),
            });
        }
        if end.n_chunks != self.next {
            return Err(KvError::Incomplete {
                received: self.next,
                declared: end.n_chunks,
            });
        }
        let n = self.full_cells();
        let windowed = self.header.shape.window.is_some();
        if end.n_cells as usize != n
            || self.cells != n
            || end.n_window as usize != self.window_cells
            || windowed != (self.window_cells > 0)
        {
            return Err(KvError::InvalidField {
                field: "end frame",
                detail: format!(
                    "{} + {} window cells declared, {} + {} received, the header has {} tokens",
                    end.n_cells,
                    end.n_window,
                    self.cells,
                    self.window_cells,
                    self.header.tokens.len()
                ),
            });
        }
        if self.recurrent.len() != self.recurrent_len {
            return Err(KvError::InvalidField {
                field: "end frame",
                detail: format!(
                    "{} of the recurrent state's {} bytes received",
                    self.recurrent.len(),
                    self.recurrent_len
                ),
            });
        }
        let window = match self.header.shape.window.as_deref() {
            Some(shape) => {
                let parts: Vec<&[u8]> = self.window.iter().map(Vec::as_slice).collect();
                Some(shape.join(self.header.source_seq, &parts)?)
            }
            None => None,
        };
        if !self.header.shape.has_attention() {
            // No cells came: the caches part of a purely recurrent state is its head alone.
            self.state = self.header.shape.blank_state(self.header.source_seq, 0)?;
        }
        self.state = Caches {
            full: std::mem::take(&mut self.state),
            window,
            recurrent: (self.recurrent_len > 0).then(|| std::mem::take(&mut self.recurrent)),
        }
        .join();
        if xxh3_64(&self.state) != end.raw_checksum {
            return Err(KvError::StateChecksum);
        }
        Ok(DecodedKv {
            header: self.header,
            state: self.state,
        })
    }
}

/// The end frame, as read and checked on its own.
struct EndFrame {
    tag: u64,
    n_chunks: u32,
    n_cells: u32,
    n_window: u32,
    raw_checksum: u64,
}

impl EndFrame {
    fn read(frame: &[u8]) -> Result<Self, KvError> {
        if frame.len() != END_FRAME_LEN {
            return Err(KvError::Truncated {
                what: "KV end frame",
                need: END_FRAME_LEN as u64,
                have: frame.len() as u64,
            });
        }
        let mut r = Reader::new(frame, "KV end frame");
        r.expect_magic(END_MAGIC)?;
        let end = EndFrame {
            tag: r.u64()?,
            n_chunks: r.u32()?,
            n_cells: r.u32()?,
            n_window: r.u32()?,
            raw_checksum: r.u64()?,
        };
        let sum = r.u64()?;
        if xxh3_64(&frame[..END_FRAME_LEN - 8]) != sum {
            return Err(KvError::InvalidField {
                field: "end frame",
                detail: "checksum mismatch".into(),
            });
        }
        Ok(end)
    }
}

/// The checks and the append behind [`KvDecoder::push_chunk`], in the order it runs them.
impl KvDecoder {
    /// Refuses a chunk that is not the next one of this transfer: past the declared count, already
    /// seen, early, or tagged for another transfer.
    fn check_place(&self, head: &ChunkHead) -> Result<(), KvError> {
        let index = head.index;
        if index < self.next {
            return Err(KvError::DuplicateChunk(index));
        }
        if index > self.next {
            return Err(KvError::OutOfOrderChunk {
                expected: self.next,
                got: index,
            });
        }
        if head.tag != self.tag {
            return Err(KvError::ForeignChunk(index));
        }
        Ok(())
    }

    /// The full cache's cells the transfer carries: one per token (none for a purely recurrent
    /// model).
    fn full_cells(&self) -> usize {
        self.header.shape.cells_for(self.header.tokens.len())
    }

    /// What the next chunk carries: full-cache cells until all are in, then the recurrent
    /// section's bytes until all are in, then window cells (when the model has a window cache).
    fn next_part(&self) -> Part {
        if self.cells < self.full_cells() {
            Part::Full
        } else if self.recurrent.len() < self.recurrent_len {
            Part::Recurrent
        } else if self.window_per_cell > 0 {
            Part::Window
        } else {
            Part::Full
        }
    }

    /// Refuses a raw length that is not whole cells, more than the chunk size, or cells past the
    /// header's token count (window cells too: a window never holds more cells than the prompt),
    /// window cells that would take the state past the receiver's limit, recurrent bytes past the
    /// section's length, or an encoded length beyond what the codec can produce from it.
    fn check_declared_sizes(&self, head: &ChunkHead) -> Result<(), KvError> {
        let (index, raw_len) = (head.index, head.raw_len);
        let raw = raw_len as usize;
        let part = self.next_part();
        if let Part::Recurrent = part {
            let after = self.recurrent.len() + raw;
            if raw == 0 || raw_len > self.header.chunk_size || after > self.recurrent_len {
                return Err(KvError::OversizedChunk {
                    index,
                    detail: format!(
                        "declares {raw_len} raw bytes: recurrent state bytes up to {after} of {}, \
                         within the chunk size {}",
                        self.recurrent_len, self.header.chunk_size
                    ),
                });
            }
            return self.check_encoded_len(head);
        }
        let window = matches!(part, Part::Window);
        let (per_cell, held) = if window {
            (self.window_per_cell, self.window_cells)
        } else {
            (self.per_cell, self.cells)
        };
        if raw == 0 || !raw.is_multiple_of(per_cell) || raw_len > self.header.chunk_size {
            return Err(KvError::OversizedChunk {
                index,
                detail: format!(
                    "declares {raw_len} raw bytes: not whole {per_cell}-byte cells within the chunk size {}",
                    self.header.chunk_size
                ),
            });
        }
        let after = held + raw / per_cell;
        let most = if window {
            self.header.tokens.len()
        } else {
            self.full_cells()
        };
        if after > most {
            return Err(KvError::OversizedChunk {
                index,
                detail: format!(
                    "carries {}cells up to {after}, the header has {} tokens",
                    if window { "window " } else { "" },
                    self.header.tokens.len()
                ),
            });
        }
        let bytes = (self.bytes_held() + raw) as u64;
        if window && bytes > self.max_state_bytes {
            return Err(KvError::StateTooLarge {
                declared: bytes,
                limit: self.max_state_bytes,
            });
        }
        self.check_encoded_len(head)
    }

    /// Refuses an encoded length beyond what the codec can produce from the raw length.
    fn check_encoded_len(&self, head: &ChunkHead) -> Result<(), KvError> {
        let max_enc = self.header.codec.max_encoded_len(head.raw_len as usize) as u64;
        if u64::from(head.enc_len) > max_enc {
            return Err(KvError::OversizedChunk {
                index: head.index,
                detail: format!(
                    "declares {} encoded bytes, the codec bound is {max_enc}",
                    head.enc_len
                ),
            });
        }
        Ok(())
    }

    /// Checks the payload: exactly the declared length, and matching its checksum.
    fn check_payload(&self, head: &ChunkHead, payload: &[u8]) -> Result<(), KvError> {
        let (index, enc_len) = (head.index, head.enc_len);
        if payload.len() as u64 != u64::from(enc_len) {
            if (payload.len() as u64) < u64::from(enc_len) {
                return Err(KvError::Truncated {
                    what: "KV chunk payload",
                    need: enc_len.into(),
                    have: payload.len() as u64,
                });
            }
            return Err(KvError::OversizedChunk {
                index,
                detail: format!(
                    "carries {} payload bytes, declares {enc_len}",
                    payload.len()
                ),
            });
        }
        if xxh3_64(payload) != head.checksum {
            return Err(KvError::ChunkChecksum(index));
        }
        Ok(())
    }

    /// Decodes a checked payload and places its cells after those already placed; on a decode
    /// failure nothing is placed.
    fn place(&mut self, index: u32, raw_len: u32, payload: &[u8]) -> Result<(), KvError> {
        let part = self.next_part();
        if let Part::Window | Part::Recurrent = part {
            let mut bytes = vec![0; raw_len as usize];
            self.header
                .codec
                .decode_into(payload, &mut bytes)
                .map_err(|detail| KvError::Decompress { index, detail })?;
            if let Part::Recurrent = part {
                self.recurrent.extend_from_slice(&bytes);
            } else {
                self.window_cells += bytes.len() / self.window_per_cell;
                self.window.push(bytes);
            }
            return Ok(());
        }
        self.scratch.clear();
        self.scratch.resize(raw_len as usize, 0);
        self.header
            .codec
            .decode_into(payload, &mut self.scratch)
            .map_err(|detail| KvError::Decompress { index, detail })?;
        let total = self.header.tokens.len();
        if self.state.is_empty() {
            // Allocated once the first chunk proves the sender is real; the size passed the limit.
            self.state = self
                .header
                .shape
                .blank_state(self.header.source_seq, total)?;
        }
        self.cells += self
            .header
            .shape
            .place(&mut self.state, total, self.cells, &self.scratch)?;
        Ok(())
    }
}
