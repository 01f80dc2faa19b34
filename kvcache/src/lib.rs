//! The KV cache wire format: moves one sequence's llama.cpp KV cache between machines, checked end to end.
//!
//! A transfer is one [`KvHeader`] frame, chunk frames carrying the sequence's cells in order (whole
//! cells each, sent as the prompt produces them), and an end frame with the final state's checksum.
//! The header says which model and KV layout produced the cache, which tokens it holds, the cache's
//! shape and how chunks are compressed, so a receiver can refuse anything that would not import
//! cleanly before a byte reaches llama.cpp (which aborts the process on a malformed state).
//! [`KvEncoder`] produces the frames; [`KvDecoder`] checks them and places their cells into the state;
//! [`StateShape`] cuts and joins cells and checks the joined llama.cpp sequence state itself.
//!
//! This crate is a leaf: bytes, codecs and checks only, no llama.cpp, no async runtime, no transport.
//! The byte-by-byte format is documented in `docs/kvcache.md`.

mod codec;
mod error;
mod frame;
mod layout;
mod segment;
mod state;
mod transpose;

pub use codec::Codec;
pub use error::KvError;
pub use frame::{
    CHUNK_HEADER_LEN, DEFAULT_CHUNK_SIZE, DecodeLimits, DecodedKv, ImportTarget, KvDecoder,
    KvEncoder, KvHeader, MAX_CHUNK_SIZE, TransferFrames, WIRE_VERSION, chunk_index,
};
pub use layout::{KvLayout, KvType, ModelFingerprint};
pub use segment::{HANDOFF_PIECES, MIN_PIECE_TOKENS, piece_tokens, source_seq};
pub use state::{LayerShape, SeqStateInfo, StateShape, VShape, to_single_stream};
pub use transpose::transposable_elem_size;
