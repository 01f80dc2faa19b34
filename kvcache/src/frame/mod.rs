//! Header, chunk and end frames: a sequence's cells encoded into frames as they become available, and
//! frames checked back into a state.
//!
//! `header` holds the header frame (its type, encoding, decoding and checks), `encoder` turns cells
//! into frames, `decoder` checks frames back into a state. This module holds what they share: the
//! wire constants, the chunk magic and the bounds-checked [`Reader`] (also used by the state parser).

mod decoder;
mod encoder;
mod header;
#[cfg(test)]
mod tests;

use crate::error::KvError;

pub use decoder::{DecodedKv, KvDecoder, chunk_index};
pub use encoder::{KvEncoder, TransferFrames};
pub use header::{DecodeLimits, ImportTarget, KvHeader};

/// The wire format version this build writes and reads.
pub const WIRE_VERSION: u16 = 4;
/// Default raw bytes per chunk: small enough for tarpc's 8 MiB frame even when lz4 expands a chunk.
pub const DEFAULT_CHUNK_SIZE: u32 = 4 << 20;
/// Largest raw chunk a receiver accepts unless its limits say less.
pub const MAX_CHUNK_SIZE: u32 = 7 << 20;
/// Bytes in front of every chunk payload.
pub const CHUNK_HEADER_LEN: usize = 32;

/// Magic bytes that open every chunk frame.
const CHUNK_MAGIC: &[u8; 4] = b"EXKC";
/// Magic bytes that open the end frame.
const END_MAGIC: &[u8; 4] = b"EXKE";
/// Bytes of the end frame: magic, transfer tag, chunk count, cell count, window cell count, state
/// checksum, checksum.
const END_FRAME_LEN: usize = 4 + 8 + 4 + 4 + 4 + 8 + 8;

/// Which part of the state a chunk carries, by its place in the transfer: the full cache's cells,
/// then a hybrid or recurrent model's recurrent section, then an iSWA model's window cells.
#[derive(Clone, Copy)]
enum Part {
    Full,
    Recurrent,
    Window,
}

/// The first 8 bytes of `b` as an array (callers pass at least 8 bytes).
fn fixed8(b: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    a
}

/// A bounds-checked little-endian cursor (a clone reads on from the same place, for a parser that
/// tries one reading before another).
#[derive(Clone)]
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
            .ok_or_else(|| KvError::Truncated {
                what: self.what,
                // A hostile size near u64::MAX must not overflow while reporting it.
                need: (self.pos as u64).saturating_add(n as u64),
                have: self.bytes.len() as u64,
            })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// Reads 4 bytes and refuses them unless they are `magic` (the error names this reader's frame).
    fn expect_magic(&mut self, magic: &[u8; 4]) -> Result<(), KvError> {
        if self.take(4)? != magic {
            return Err(KvError::BadMagic { what: self.what });
        }
        Ok(())
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
