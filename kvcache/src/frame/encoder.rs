//! The sending side: a sequence state cut into one header frame and its chunk frames.

use xxhash_rust::xxh3::xxh3_64;

use super::{CHUNK_HEADER_LEN, CHUNK_MAGIC, KvHeader};
use crate::codec::Codec;
use crate::error::KvError;
use crate::layout::{KvLayout, ModelFingerprint};

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
