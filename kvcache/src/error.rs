//! Errors returned while encoding, decoding and checking KV transfers.

use crate::layout::KvType;

/// Why a KV transfer or a sequence state was refused; each variant is a distinct thing a caller can act on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KvError {
    /// The frame ended before a field it must contain.
    #[error("{what} is truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Which frame or field.
        what: &'static str,
        /// Bytes required.
        need: u64,
        /// Bytes present.
        have: u64,
    },
    /// The frame does not start with the expected magic bytes.
    #[error("bad magic in {what}")]
    BadMagic {
        /// Which frame.
        what: &'static str,
    },
    /// The header names a wire format version this build does not speak.
    #[error("unsupported KV wire version {found} (this build speaks {supported})")]
    UnsupportedVersion {
        /// Version in the header.
        found: u16,
        /// Version this build understands.
        supported: u16,
    },
    /// The header's own checksum does not match its bytes.
    #[error("KV header checksum mismatch")]
    HeaderChecksum,
    /// A field holds a value outside its allowed set or range.
    #[error("invalid KV header field {field}: {detail}")]
    InvalidField {
        /// Field name.
        field: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// The codec id is not one this build knows.
    #[error("unknown codec id {0}")]
    UnknownCodec(u8),
    /// The KV type id is not one this build knows.
    #[error("unknown KV type id {0}")]
    UnknownKvType(u32),
    /// The cache was produced by a different model (or quantization) than the receiver runs.
    #[error("KV cache is from another model: sender {sender}, receiver {receiver}")]
    ModelMismatch {
        /// Fingerprint in the header (hex).
        sender: String,
        /// Fingerprint of the receiver's model (hex).
        receiver: String,
    },
    /// The KV layout (types or flash attention) differs from the receiver's context.
    #[error("KV layout mismatch in {field}: sender {sender}, receiver {receiver}")]
    LayoutMismatch {
        /// Which part of the layout.
        field: &'static str,
        /// Sender's value.
        sender: String,
        /// Receiver's value.
        receiver: String,
    },
    /// The declared state is larger than the receiver's configured limit.
    #[error("declared KV state of {declared} bytes exceeds the limit of {limit} bytes")]
    StateTooLarge {
        /// Size the sender declared.
        declared: u64,
        /// Receiver's limit.
        limit: u64,
    },
    /// The cache holds more tokens than the receiver's limit or its per-sequence context.
    #[error("KV cache holds {tokens} tokens, the receiver accepts at most {limit}")]
    TooManyTokens {
        /// Tokens in the cache.
        tokens: u64,
        /// Receiver's limit.
        limit: u64,
    },
    /// A chunk is larger than the header allows.
    #[error("chunk {index} is oversized: {detail}")]
    OversizedChunk {
        /// Chunk index.
        index: u32,
        /// Which size is too big.
        detail: String,
    },
    /// A chunk arrived before the chunks that precede it.
    #[error("chunk {got} arrived out of order (expected {expected})")]
    OutOfOrderChunk {
        /// Index expected next.
        expected: u32,
        /// Index received.
        got: u32,
    },
    /// A chunk that was already received arrived again.
    #[error("chunk {0} arrived twice")]
    DuplicateChunk(u32),
    /// More chunks arrived than the header declared.
    #[error("chunk {got} is beyond the declared {declared} chunks")]
    ExtraChunk {
        /// Index received.
        got: u32,
        /// Chunk count in the header.
        declared: u32,
    },
    /// A chunk belongs to another transfer.
    #[error("chunk {0} belongs to another transfer")]
    ForeignChunk(u32),
    /// A chunk's checksum does not match its payload.
    #[error("chunk {0} checksum mismatch")]
    ChunkChecksum(u32),
    /// A chunk's payload could not be decompressed to its declared size.
    #[error("chunk {index} failed to decompress: {detail}")]
    Decompress {
        /// Chunk index.
        index: u32,
        /// Decoder's message.
        detail: String,
    },
    /// The transfer ended before all declared chunks arrived.
    #[error("transfer incomplete: {received} of {declared} chunks")]
    Incomplete {
        /// Chunks received.
        received: u32,
        /// Chunks declared.
        declared: u32,
    },
    /// The reassembled state's checksum does not match the header.
    #[error("reassembled KV state checksum mismatch")]
    StateChecksum,
    /// The reassembled bytes are not a llama.cpp sequence state this receiver can import.
    #[error("KV state is malformed: {0}")]
    MalformedState(String),
    /// The state is well formed but does not match the receiving context's cache shape.
    #[error("KV state does not fit the receiving context: {0}")]
    ShapeMismatch(String),
    /// A KV type name in configuration is not known.
    #[error(
        "unknown KV type name {0:?} (expected one of f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1)"
    )]
    UnknownKvTypeName(String),
    /// A codec name in configuration is not known.
    #[error("unknown codec name {0:?} (expected none, lz4 or shuffle-lz4)")]
    UnknownCodecName(String),
}

impl KvError {
    pub(crate) fn layout(
        field: &'static str,
        sender: impl ToString,
        receiver: impl ToString,
    ) -> Self {
        KvError::LayoutMismatch {
            field,
            sender: sender.to_string(),
            receiver: receiver.to_string(),
        }
    }

    pub(crate) fn type_mismatch(field: &'static str, sender: KvType, receiver: KvType) -> Self {
        Self::layout(field, sender, receiver)
    }
}
