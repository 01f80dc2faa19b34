//! Header and chunk frames: encoding a sequence state into frames and checking frames back into a state.

use xxhash_rust::xxh3::{Xxh3, xxh3_64};

use crate::codec::Codec;
use crate::error::KvError;
use crate::layout::{KvLayout, KvType, ModelFingerprint};

/// The wire format version this build writes and reads.
pub const WIRE_VERSION: u16 = 1;
/// Default raw bytes per chunk: small enough for tarpc's 8 MiB frame even when lz4 expands a chunk.
pub const DEFAULT_CHUNK_SIZE: u32 = 4 << 20;
/// Largest raw chunk a receiver accepts unless its limits say less.
pub const MAX_CHUNK_SIZE: u32 = 7 << 20;
/// Bytes in front of every chunk payload.
pub const CHUNK_HEADER_LEN: usize = 32;

const HEADER_MAGIC: &[u8; 4] = b"EXKV";
const CHUNK_MAGIC: &[u8; 4] = b"EXKC";
/// Header bytes before the token ids.
const HEADER_FIXED_LEN: usize = 96;
/// The trailing header checksum.
const HEADER_CHECKSUM_LEN: usize = 8;

/// Everything a receiver learns from the header frame, before any payload arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvHeader {
    /// Model that produced the cache.
    pub fingerprint: ModelFingerprint,
    /// The sender's KV layout.
    pub layout: KvLayout,
    /// Compression of every chunk.
    pub codec: Codec,
    /// Bytes of the uncompressed llama.cpp sequence state.
    pub raw_len: u64,
    /// Sum of the encoded chunk payloads.
    pub encoded_len: u64,
    /// Raw bytes per chunk; the last chunk holds the remainder.
    pub chunk_size: u32,
    /// Number of chunk frames that follow.
    pub n_chunks: u32,
    /// xxh3-64 of the uncompressed state.
    pub raw_checksum: u64,
    /// The token ids whose keys and values the cache holds, in position order.
    pub tokens: Vec<i32>,
}

impl KvHeader {
    /// Length of the encoded header.
    pub fn encoded_len_bytes(&self) -> usize {
        HEADER_FIXED_LEN + 4 * self.tokens.len() + HEADER_CHECKSUM_LEN
    }

    /// Serializes the header; the last 8 bytes are the xxh3-64 of all bytes before them.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.encoded_len_bytes());
        b.extend_from_slice(HEADER_MAGIC);
        b.extend_from_slice(&WIRE_VERSION.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&self.fingerprint.0);
        b.extend_from_slice(&self.layout.type_k.ggml_id().to_le_bytes());
        b.extend_from_slice(&self.layout.type_v.ggml_id().to_le_bytes());
        b.push(u8::from(self.layout.flash_attn));
        b.push(u8::from(self.layout.kv_unified));
        b.push(self.codec.id());
        b.push(0);
        b.extend_from_slice(&self.layout.n_seq_max.to_le_bytes());
        b.extend_from_slice(&self.layout.n_ctx_seq.to_le_bytes());
        b.extend_from_slice(&self.raw_len.to_le_bytes());
        b.extend_from_slice(&self.encoded_len.to_le_bytes());
        b.extend_from_slice(&self.chunk_size.to_le_bytes());
        b.extend_from_slice(&self.n_chunks.to_le_bytes());
        b.extend_from_slice(&self.raw_checksum.to_le_bytes());
        b.extend_from_slice(&(self.tokens.len() as u32).to_le_bytes());
        for t in &self.tokens {
            b.extend_from_slice(&t.to_le_bytes());
        }
        let sum = xxh3_64(&b);
        b.extend_from_slice(&sum.to_le_bytes());
        b
    }

    /// Parses and checks a header frame against the receiver's limits (nothing is allocated for the
    /// payload here; token ids are read only after their count passed the limit).
    pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<Self, KvError> {
        let mut r = Reader::new(bytes, "KV header");
        if r.take(4)? != HEADER_MAGIC {
            return Err(KvError::BadMagic { what: "KV header" });
        }
        let version = r.u16()?;
        if version != WIRE_VERSION {
            return Err(KvError::UnsupportedVersion {
                found: version,
                supported: WIRE_VERSION,
            });
        }
        let flags = r.u16()?;
        let mut fp = [0u8; 32];
        fp.copy_from_slice(r.take(32)?);
        let type_k = r.u32()?;
        let type_v = r.u32()?;
        let flash_attn = r.flag("flash_attn")?;
        let kv_unified = r.flag("kv_unified")?;
        let codec = r.u8()?;
        let reserved = r.u8()?;
        let n_seq_max = r.u32()?;
        let n_ctx_seq = r.u32()?;
        let raw_len = r.u64()?;
        let encoded_len = r.u64()?;
        let chunk_size = r.u32()?;
        let n_chunks = r.u32()?;
        let raw_checksum = r.u64()?;
        let n_tokens = r.u32()?;
        let total = HEADER_FIXED_LEN as u64 + 4 * u64::from(n_tokens) + HEADER_CHECKSUM_LEN as u64;
        if bytes.len() as u64 != total {
            // Checked before the checksum so a short frame reports what is missing.
            if (bytes.len() as u64) < total {
                return Err(KvError::Truncated {
                    what: "KV header",
                    need: total,
                    have: bytes.len() as u64,
                });
            }
            return Err(KvError::InvalidField {
                field: "header length",
                detail: format!("{} bytes, the token count implies {total}", bytes.len()),
            });
        }
        let body_len = bytes.len() - HEADER_CHECKSUM_LEN;
        let stored = u64::from_le_bytes(fixed8(&bytes[body_len..]));
        if xxh3_64(&bytes[..body_len]) != stored {
            return Err(KvError::HeaderChecksum);
        }
        if flags != 0 || reserved != 0 {
            return Err(KvError::InvalidField {
                field: "flags",
                detail: "reserved bits set".into(),
            });
        }
        let layout = KvLayout {
            type_k: KvType::from_ggml_id(type_k)?,
            type_v: KvType::from_ggml_id(type_v)?,
            flash_attn,
            kv_unified,
            n_seq_max,
            n_ctx_seq,
        };
        let codec = Codec::from_id(codec)?;
        if u64::from(n_tokens) > limits.max_tokens {
            return Err(KvError::TooManyTokens {
                tokens: n_tokens.into(),
                limit: limits.max_tokens,
            });
        }
        if raw_len > limits.max_state_bytes {
            return Err(KvError::StateTooLarge {
                declared: raw_len,
                limit: limits.max_state_bytes,
            });
        }
        if chunk_size == 0 || chunk_size > limits.max_chunk_size {
            return Err(KvError::InvalidField {
                field: "chunk_size",
                detail: format!("{chunk_size} is outside 1..={}", limits.max_chunk_size),
            });
        }
        let expect_chunks = raw_len.div_ceil(u64::from(chunk_size));
        if u64::from(n_chunks) != expect_chunks {
            return Err(KvError::InvalidField {
                field: "n_chunks",
                detail: format!(
                    "{n_chunks}, but {raw_len} bytes in chunks of {chunk_size} make {expect_chunks}"
                ),
            });
        }
        let max_encoded = encoded_bound(codec, raw_len, chunk_size);
        if encoded_len > max_encoded {
            return Err(KvError::InvalidField {
                field: "encoded_len",
                detail: format!("{encoded_len} exceeds the codec's bound {max_encoded}"),
            });
        }
        let mut tokens = Vec::with_capacity(n_tokens as usize);
        for _ in 0..n_tokens {
            tokens.push(r.i32()?);
        }
        Ok(KvHeader {
            fingerprint: ModelFingerprint(fp),
            layout,
            codec,
            raw_len,
            encoded_len,
            chunk_size,
            n_chunks,
            raw_checksum,
            tokens,
        })
    }

    /// Tag that binds every chunk to this transfer (the header checksum).
    fn transfer_tag(&self) -> u64 {
        let b = self.encode();
        u64::from_le_bytes(fixed8(&b[b.len() - HEADER_CHECKSUM_LEN..]))
    }

    /// Raw length of chunk `index`.
    fn chunk_raw_len(&self, index: u32) -> u64 {
        let start = u64::from(index) * u64::from(self.chunk_size);
        (self.raw_len - start).min(u64::from(self.chunk_size))
    }
}

fn encoded_bound(codec: Codec, raw_len: u64, chunk_size: u32) -> u64 {
    let full = raw_len / u64::from(chunk_size);
    let rest = raw_len % u64::from(chunk_size);
    full * codec.max_encoded_len(chunk_size as usize) as u64
        + if rest > 0 {
            codec.max_encoded_len(rest as usize) as u64
        } else {
            0
        }
}

/// What a receiver refuses before allocating: sizes a sender may claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest uncompressed state accepted.
    pub max_state_bytes: u64,
    /// Largest token count accepted.
    pub max_tokens: u64,
    /// Largest raw chunk accepted.
    pub max_chunk_size: u32,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_state_bytes: 8 << 30,
            max_tokens: 1 << 20,
            max_chunk_size: MAX_CHUNK_SIZE,
        }
    }
}

/// The receiver's side of the compatibility check: its model and its KV layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportTarget {
    /// The receiver's model.
    pub fingerprint: ModelFingerprint,
    /// The receiver's context layout.
    pub layout: KvLayout,
}

impl ImportTarget {
    /// Checks a header against this receiver: same model, compatible layout, and room for the tokens
    /// plus at least one more (the first generated token).
    pub fn check(&self, header: &KvHeader) -> Result<(), KvError> {
        if header.fingerprint != self.fingerprint {
            return Err(KvError::ModelMismatch {
                sender: header.fingerprint.to_hex(),
                receiver: self.fingerprint.to_hex(),
            });
        }
        self.layout.accepts(&header.layout)?;
        let room = u64::from(self.layout.n_ctx_seq).saturating_sub(1);
        if header.tokens.len() as u64 > room {
            return Err(KvError::TooManyTokens {
                tokens: header.tokens.len() as u64,
                limit: room,
            });
        }
        Ok(())
    }
}

/// Turns a sequence state into one header frame and a series of chunk frames.
///
/// With [`Codec::None`] the chunk frames are cut from `raw` as they are taken. A compressing codec must
/// know the exact encoded total for the header, so every chunk is compressed once, up front, and its
/// frame kept until it is taken: compressed chunks, never a second contiguous copy of the state.
pub struct KvEncoder<B> {
    header: KvHeader,
    tag: u64,
    raw: B,
    encoded: Vec<Vec<u8>>,
    next: u32,
}

impl<B: AsRef<[u8]>> KvEncoder<B> {
    /// Prepares the frames for `state` (single-stream form, see [`crate::to_single_stream`]); the
    /// encoder borrows or owns the state, whichever `B` is.
    pub fn new(
        state: B,
        tokens: Vec<i32>,
        fingerprint: ModelFingerprint,
        layout: KvLayout,
        codec: Codec,
        chunk_size: u32,
    ) -> Result<Self, KvError> {
        if chunk_size == 0 {
            return Err(KvError::InvalidField {
                field: "chunk_size",
                detail: "zero".into(),
            });
        }
        let raw = state.as_ref();
        let n_chunks =
            u32::try_from((raw.len() as u64).div_ceil(u64::from(chunk_size))).map_err(|_| {
                KvError::InvalidField {
                    field: "n_chunks",
                    detail: "too many chunks".into(),
                }
            })?;
        let encoded: Vec<Vec<u8>> = match codec {
            Codec::None => Vec::new(),
            _ => raw
                .chunks(chunk_size as usize)
                .map(|c| {
                    let mut v = Vec::new();
                    codec.encode_into(c, &mut v);
                    v
                })
                .collect(),
        };
        let encoded_len = match codec {
            Codec::None => raw.len() as u64,
            _ => encoded.iter().map(|v| v.len() as u64).sum(),
        };
        let header = KvHeader {
            fingerprint,
            layout,
            codec,
            raw_len: raw.len() as u64,
            encoded_len,
            chunk_size,
            n_chunks,
            raw_checksum: xxh3_64(raw),
            tokens,
        };
        let tag = header.transfer_tag();
        Ok(KvEncoder {
            header,
            tag,
            raw: state,
            encoded,
            next: 0,
        })
    }

    /// The header this encoder describes.
    pub fn header(&self) -> &KvHeader {
        &self.header
    }

    /// The header frame's bytes.
    pub fn header_frame(&self) -> Vec<u8> {
        self.header.encode()
    }
}

impl<B: AsRef<[u8]>> Iterator for KvEncoder<B> {
    type Item = Vec<u8>;

    /// The next chunk frame.
    fn next(&mut self) -> Option<Vec<u8>> {
        if self.next >= self.header.n_chunks {
            return None;
        }
        let index = self.next;
        self.next += 1;
        let start = index as usize * self.header.chunk_size as usize;
        let raw = self.raw.as_ref();
        let end = (start + self.header.chunk_size as usize).min(raw.len());
        let payload: &[u8] = match self.encoded.get_mut(index as usize) {
            Some(v) => {
                let taken = std::mem::take(v);
                return Some(chunk_frame(index, (end - start) as u32, self.tag, &taken));
            }
            None => &raw[start..end],
        };
        Some(chunk_frame(index, (end - start) as u32, self.tag, payload))
    }
}

/// One chunk frame: fixed 32-byte head, then the encoded payload.
fn chunk_frame(index: u32, raw_len: u32, tag: u64, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(CHUNK_HEADER_LEN + payload.len());
    frame.extend_from_slice(CHUNK_MAGIC);
    frame.extend_from_slice(&index.to_le_bytes());
    frame.extend_from_slice(&raw_len.to_le_bytes());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&tag.to_le_bytes());
    frame.extend_from_slice(&xxh3_64(payload).to_le_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// The index of a chunk frame, read without checking anything else (for reordering on arrival).
pub fn chunk_index(frame: &[u8]) -> Result<u32, KvError> {
    let mut r = Reader::new(frame, "KV chunk");
    if r.take(4)? != CHUNK_MAGIC {
        return Err(KvError::BadMagic { what: "KV chunk" });
    }
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

    /// Chunks accepted so far.
    pub fn chunks_received(&self) -> u32 {
        self.next
    }

    /// True once every declared chunk has been accepted.
    pub fn is_complete(&self) -> bool {
        self.next == self.header.n_chunks
    }

    /// Checks one chunk frame and appends its decoded bytes. Chunks must arrive in index order.
    pub fn push_chunk(&mut self, frame: &[u8]) -> Result<(), KvError> {
        let mut r = Reader::new(frame, "KV chunk");
        if r.take(4)? != CHUNK_MAGIC {
            return Err(KvError::BadMagic { what: "KV chunk" });
        }
        let index = r.u32()?;
        let raw_len = r.u32()?;
        let enc_len = r.u32()?;
        let tag = r.u64()?;
        let checksum = r.u64()?;
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
        if tag != self.tag {
            return Err(KvError::ForeignChunk(index));
        }
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
        let payload = r.rest();
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
        if xxh3_64(payload) != checksum {
            return Err(KvError::ChunkChecksum(index));
        }
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
        self.encoded_seen += u64::from(enc_len);
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

fn fixed8(b: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    a
}

/// A bounds-checked little-endian cursor.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Reader {
            bytes,
            pos: 0,
            what,
        }
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], KvError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or(KvError::Truncated {
                what: self.what,
                need: self.pos as u64 + n as u64,
                have: self.bytes.len() as u64,
            })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    pub(crate) fn skip(&mut self, n: u64) -> Result<(), KvError> {
        let n = usize::try_from(n).map_err(|_| KvError::Truncated {
            what: self.what,
            need: u64::MAX,
            have: self.bytes.len() as u64,
        })?;
        self.take(n).map(|_| ())
    }

    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let s = &self.bytes[self.pos..];
        self.pos = self.bytes.len();
        s
    }

    pub(crate) fn u8(&mut self) -> Result<u8, KvError> {
        Ok(self.take(1)?[0])
    }

    fn flag(&mut self, field: &'static str) -> Result<bool, KvError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(KvError::InvalidField {
                field,
                detail: format!("{v} is not 0 or 1"),
            }),
        }
    }

    pub(crate) fn u16(&mut self) -> Result<u16, KvError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, KvError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn i32(&mut self) -> Result<i32, KvError> {
        let b = self.take(4)?;
        Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, KvError> {
        Ok(u64::from_le_bytes(fixed8(self.take(8)?)))
    }
}
