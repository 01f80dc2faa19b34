//! The header frame: what a receiver learns before any payload, its encoding, and every check a
//! header must pass (format, checksum, the receiver's limits and identity) before payload is accepted.

use xxhash_rust::xxh3::xxh3_64;

use super::{MAX_CHUNK_SIZE, Reader, WIRE_VERSION, fixed8};
use crate::codec::Codec;
use crate::error::KvError;
use crate::layout::{KvLayout, KvType, ModelFingerprint};
use crate::state::StateShape;

/// Magic bytes that open the header frame.
const HEADER_MAGIC: &[u8; 4] = b"EXKV";
/// Header bytes before the token ids.
const HEADER_FIXED_LEN: usize = 72;
/// The shorter a shape can be: its fixed fields, one layer of K and V, the window and recurrent
/// flags.
const SKELETON_MIN_LEN: u64 = 17 + 24 + 2;
/// Most layers a header's shape may declare.
const MAX_LAYERS: u32 = 4096;
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
    /// Most raw bytes a chunk carries (each chunk carries whole cells).
    pub chunk_size: u32,
    /// The sequence id the sender exported from (the state's own field, kept so the joined state
    /// equals the sender's export byte for byte).
    pub source_seq: i32,
    /// The token ids whose keys and values the cache holds, in position order.
    pub tokens: Vec<i32>,
    /// The sender's cache shape (its stream count aside): how the chunks' cells are laid out and
    /// joined into the state.
    pub shape: StateShape,
}

impl KvHeader {
    /// Serializes the header; the last 8 bytes are the xxh3-64 of all bytes before them.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_FIXED_LEN + 4 * self.tokens.len() + 1024);
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
        b.extend_from_slice(&self.chunk_size.to_le_bytes());
        b.extend_from_slice(&self.source_seq.to_le_bytes());
        b.extend_from_slice(&(self.tokens.len() as u32).to_le_bytes());
        for t in &self.tokens {
            b.extend_from_slice(&t.to_le_bytes());
        }
        self.shape.write_skeleton(&mut b);
        let sum = xxh3_64(&b);
        b.extend_from_slice(&sum.to_le_bytes());
        b
    }

    /// Parses and checks a header frame against the receiver's limits (nothing is allocated for the
    /// payload here; token ids are read only after their count passed the limit).
    ///
    /// The checks run in a fixed order, which decides the error a bad frame reports: magic and
    /// version, the fixed fields, the frame length the token count implies at least, the checksum,
    /// the reserved bits, the layout's types, the codec, the receiver's limits, the token ids, the
    /// shape, and last the state size it implies.
    pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<Self, KvError> {
        let mut r = Reader::new(bytes, "KV header");
        let fixed = FixedFields::read(&mut r)?;
        check_frame_len(bytes, fixed.n_tokens)?;
        check_header_checksum(bytes)?;
        fixed.check_reserved()?;
        let layout = fixed.layout()?;
        let codec = Codec::from_id(fixed.codec)?;
        fixed.check_limits(limits)?;
        let tokens = read_tokens(&mut r, fixed.n_tokens)?;
        let shape = StateShape::read_skeleton(&mut r, MAX_LAYERS)?;
        if r.remaining() != HEADER_CHECKSUM_LEN {
            return Err(KvError::InvalidField {
                field: "header length",
                detail: format!("{} bytes after the shape, expected 8", r.remaining()),
            });
        }
        let state_len =
            (shape.state_len(tokens.len())? as u64).saturating_add(shape.recurrent_len()?);
        if state_len > limits.max_state_bytes {
            return Err(KvError::StateTooLarge {
                declared: state_len,
                limit: limits.max_state_bytes,
            });
        }
        Ok(KvHeader {
            fingerprint: ModelFingerprint(fixed.fingerprint),
            layout,
            codec,
            chunk_size: fixed.chunk_size,
            source_seq: fixed.source_seq,
            tokens,
            shape,
        })
    }

    /// Tag that binds every chunk and the end frame to this transfer (the header checksum).
    pub(super) fn transfer_tag(&self) -> u64 {
        let b = self.encode();
        u64::from_le_bytes(fixed8(&b[b.len() - HEADER_CHECKSUM_LEN..]))
    }
}

/// The header's fixed-size fields (everything before the token ids) as read, not yet checked beyond
/// the magic, the version and the two flag bytes.
struct FixedFields {
    flags: u16,
    fingerprint: [u8; 32],
    type_k: u32,
    type_v: u32,
    flash_attn: bool,
    kv_unified: bool,
    codec: u8,
    reserved: u8,
    n_seq_max: u32,
    n_ctx_seq: u32,
    chunk_size: u32,
    source_seq: i32,
    n_tokens: u32,
}

impl FixedFields {
    /// Reads the magic, the version and the fixed fields, in wire order.
    fn read(r: &mut Reader<'_>) -> Result<Self, KvError> {
        r.expect_magic(HEADER_MAGIC)?;
        let version = r.u16()?;
        if version != WIRE_VERSION {
            return Err(KvError::UnsupportedVersion {
                found: version,
                supported: WIRE_VERSION,
            });
        }
        let flags = r.u16()?;
        let mut fingerprint = [0u8; 32];
        fingerprint.copy_from_slice(r.take(32)?);
        Ok(FixedFields {
            flags,
            fingerprint,
            type_k: r.u32()?,
            type_v: r.u32()?,
            flash_attn: r.flag("flash_attn")?,
            kv_unified: r.flag("kv_unified")?,
            codec: r.u8()?,
            reserved: r.u8()?,
            n_seq_max: r.u32()?,
            n_ctx_seq: r.u32()?,
            chunk_size: r.u32()?,
            source_seq: r.i32()?,
            n_tokens: r.u32()?,
        })
    }

    /// Refuses set flag bits or a set reserved byte.
    fn check_reserved(&self) -> Result<(), KvError> {
        if self.flags != 0 || self.reserved != 0 {
            return Err(KvError::InvalidField {
                field: "flags",
                detail: "reserved bits set".into(),
            });
        }
        Ok(())
    }

    /// The sender's layout; fails on a K or V type this crate does not know (K checked first).
    fn layout(&self) -> Result<KvLayout, KvError> {
        Ok(KvLayout {
            type_k: KvType::from_ggml_id(self.type_k)?,
            type_v: KvType::from_ggml_id(self.type_v)?,
            flash_attn: self.flash_attn,
            kv_unified: self.kv_unified,
            n_seq_max: self.n_seq_max,
            n_ctx_seq: self.n_ctx_seq,
        })
    }

    /// Refuses a token count or chunk size beyond what the receiver accepts (no tokens and a zero
    /// chunk size included). The state size is checked once the shape is read.
    fn check_limits(&self, limits: &DecodeLimits) -> Result<(), KvError> {
        if self.n_tokens == 0 {
            return Err(KvError::InvalidField {
                field: "n_tokens",
                detail: "a transfer of no tokens".into(),
            });
        }
        if u64::from(self.n_tokens) > limits.max_tokens {
            return Err(KvError::TooManyTokens {
                tokens: self.n_tokens.into(),
                limit: limits.max_tokens,
            });
        }
        let chunk_size = self.chunk_size;
        if chunk_size == 0 || chunk_size > limits.max_chunk_size {
            return Err(KvError::InvalidField {
                field: "chunk_size",
                detail: format!("{chunk_size} is outside 1..={}", limits.max_chunk_size),
            });
        }
        Ok(())
    }
}

/// Checks the frame is at least as long as its token count implies (the shape that follows the
/// tokens has its own length). Runs before the checksum so a short frame reports what is missing.
fn check_frame_len(bytes: &[u8], n_tokens: u32) -> Result<(), KvError> {
    let least = HEADER_FIXED_LEN as u64
        + 4 * u64::from(n_tokens)
        + SKELETON_MIN_LEN
        + HEADER_CHECKSUM_LEN as u64;
    if (bytes.len() as u64) < least {
        return Err(KvError::Truncated {
            what: "KV header",
            need: least,
            have: bytes.len() as u64,
        });
    }
    Ok(())
}

/// Checks the trailing xxh3-64 against the bytes before it (the frame's length already checked).
fn check_header_checksum(bytes: &[u8]) -> Result<(), KvError> {
    let body_len = bytes.len() - HEADER_CHECKSUM_LEN;
    let stored = u64::from_le_bytes(fixed8(&bytes[body_len..]));
    if xxh3_64(&bytes[..body_len]) != stored {
        return Err(KvError::HeaderChecksum);
    }
    Ok(())
}

/// Reads the `n_tokens` token ids that follow the fixed fields.
fn read_tokens(r: &mut Reader<'_>, n_tokens: u32) -> Result<Vec<i32>, KvError> {
    let mut tokens = Vec::with_capacity(n_tokens as usize);
    for _ in 0..n_tokens {
        tokens.push(r.i32()?);
    }
    Ok(tokens)
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

impl DecodeLimits {
    /// The limits of a receiver whose context holds `n_ctx_seq` tokens per sequence in cache
    /// `shape`: no more tokens than a sequence holds, no larger state than such a sequence's. For
    /// an iSWA shape the window cache counts with at most `window` cells (the model's sliding
    /// window; `None`: as many as the context).
    pub fn for_context(
        shape: &crate::StateShape,
        n_ctx_seq: u32,
        window: Option<u32>,
    ) -> DecodeLimits {
        let defaults = DecodeLimits::default();
        let state = shape
            .max_state_len(n_ctx_seq as usize, window)
            .map_or(defaults.max_state_bytes, |b| b as u64);
        DecodeLimits {
            max_state_bytes: state.min(defaults.max_state_bytes),
            max_tokens: u64::from(n_ctx_seq),
            ..defaults
        }
    }
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
