//! The KV cache wire format: moves one sequence's llama.cpp KV cache between machines, checked end to end.
//!
//! A transfer is one [`KvHeader`] frame followed by `n_chunks` chunk frames. The header says which model
//! and KV layout produced the cache, which tokens it holds, how it was compressed and how large it is, so
//! a receiver can refuse anything that would not import cleanly before a byte reaches llama.cpp (which
//! aborts the process on a malformed state). [`KvEncoder`] produces the frames; [`KvDecoder`] checks
//! and reassembles them; [`StateShape`] checks the reassembled llama.cpp sequence state itself.
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
    KvEncoder, KvHeader, MAX_CHUNK_SIZE, WIRE_VERSION, chunk_index,
};
pub use layout::{KvLayout, KvType, ModelFingerprint};
pub use segment::source_seq;
pub use state::{LayerShape, SeqStateInfo, StateShape, VShape, to_single_stream};
pub use transpose::transposable_elem_size;
