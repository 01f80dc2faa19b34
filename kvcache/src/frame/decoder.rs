//! The receiving side: chunk frames checked one by one, in order, and reassembled into the state.

use xxhash_rust::xxh3::{Xxh3, xxh3_64};

use super::{CHUNK_MAGIC, DecodeLimits, ImportTarget, KvHeader, Reader};
use crate::error::KvError;

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

/// Checks and reassembles the frames of one transfer, in order, refusing anything inconsistent.
pub struct KvDecoder {
    header: KvHeader,
    tag: u64,
    next: u32,
    encoded_seen: u64,
    state: Vec<u8>,
    hasher: Xxh3,
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
        Ok(KvDecoder {
            header,
            tag,
            next: 0,
            encoded_seen: 0,
            state: Vec::new(),
            hasher: Xxh3::new(),
        })
    }

    /// The checked header.
    pub fn header(&self) -> &KvHeader {
        &self.header
    }

    /// Bytes of decoded state held so far.
    pub fn bytes_held(&self) -> usize {
        self.state.len()
    }

    /// Chunks accepted so far.
    pub fn chunks_received(&self) -> u32 {
        self.next
    }

    /// True once every declared chunk has been accepted.
    pub fn is_complete(&self) -> bool {
        self.next == self.header.n_chunks
    }

    /// Checks one chunk frame and appends its decoded bytes. Chunks must arrive in index order.
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
        self.append(head.index, head.raw_len, payload)?;
        self.encoded_seen += u64::from(head.enc_len);
        self.next += 1;
        Ok(())
    }

    /// Ends the transfer: every chunk present and the whole state's checksum right.
    pub fn finish(self) -> Result<DecodedKv, KvError> {
        if !self.is_complete() {
            return Err(KvError::Incomplete {
                received: self.next,
                declared: self.header.n_chunks,
            });
        }
        if self.encoded_seen != self.header.encoded_len {
            return Err(KvError::InvalidField {
                field: "encoded_len",
                detail: format!(
                    "chunks carried {} bytes, header declared {}",
                    self.encoded_seen, self.header.encoded_len
                ),
            });
        }
        if self.hasher.digest() != self.header.raw_checksum {
            return Err(KvError::StateChecksum);
        }
        Ok(DecodedKv {
            header: self.header,
            state: self.state,
        })
    }
}

/// The checks and the append behind [`KvDecoder::push_chunk`], in the order it runs them.
impl KvDecoder {
    /// Refuses a chunk that is not the next one of this transfer: past the declared count, already
    /// seen, early, or tagged for another transfer.
    fn check_place(&self, head: &ChunkHead) -> Result<(), KvError> {
        let index = head.index;
        if index >= self.header.n_chunks {
            return Err(KvError::ExtraChunk {
                got: index,
                declared: self.header.n_chunks,
            });
        }
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

    /// Refuses a raw length other than the header implies for this chunk, or an encoded length
    /// beyond what the codec can produce from it.
    fn check_declared_sizes(&self, head: &ChunkHead) -> Result<(), KvError> {
        let (index, raw_len, enc_len) = (head.index, head.raw_len, head.enc_len);
        let want_raw = self.header.chunk_raw_len(index);
        if u64::from(raw_len) != want_raw {
            return Err(KvError::OversizedChunk {
                index,
                detail: format!("declares {raw_len} raw bytes, the header implies {want_raw}"),
            });
        }
        let max_enc = self.header.codec.max_encoded_len(raw_len as usize) as u64;
        if u64::from(enc_len) > max_enc {
            return Err(KvError::OversizedChunk {
                index,
                detail: format!("declares {enc_len} encoded bytes, the codec bound is {max_enc}"),
            });
        }
        Ok(())
    }

    /// Checks the payload: exactly the declared length, within the declared encoded total, and
    /// matching its checksum.
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
        if self.encoded_seen + u64::from(enc_len) > self.header.encoded_len {
            return Err(KvError::OversizedChunk {
                index,
                detail: format!(
                    "runs past the declared encoded total {}",
                    self.header.encoded_len
                ),
            });
        }
        if xxh3_64(payload) != head.checksum {
            return Err(KvError::ChunkChecksum(index));
        }
        Ok(())
    }

    /// Decodes a checked payload onto the end of the state and feeds it to the state checksum; on a
    /// decode failure the state is left as it was.
    fn append(&mut self, index: u32, raw_len: u32, payload: &[u8]) -> Result<(), KvError> {
        let start = self.state.len();
        if start == 0 {
            // Reserve once the first chunk proves the sender is real; the size passed the limit check.
            self.state.reserve_exact(self.header.raw_len as usize);
        }
        self.state.resize(start + raw_len as usize, 0);
        if let Err(detail) = self
            .header
            .codec
            .decode_into(payload, &mut self.state[start..])
        {
            self.state.truncate(start);
            return Err(KvError::Decompress { index, detail });
        }
        self.hasher.update(&self.state[start..]);
        Ok(())
    }
}
