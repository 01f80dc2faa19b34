//! A llama.cpp context on its own worker thread, driven over a channel from async code.
//!
//! The async side ([`ContextHandle`], in `handle`) only sends `Command`s, each with a oneshot
//! reply, to one OS thread that owns the llama.cpp context for its whole life (`worker`). Sequence
//! slots are leased on the async side (`slots`); dropping a lease queues the clearing of its KV
//! behind whatever the slot's request still has in flight. Between commands the worker runs the
//! batch loop: one prefill batch of waiting prompts (`prefill`: shortest first, several sequences per
//! batch where that pays), then one decode step for every generating sequence (`batch`).

use exo_kvcache::DecodedKv;
use exo_sampling::{FinishReason, SamplingParams, TokenLogprob};
use tokio::sync::{mpsc, oneshot};

use crate::error::EngineError;

mod batch;
mod handle;
mod prefill;
mod slots;
mod worker;

pub use handle::{ContextConfig, ContextHandle, Generated};
pub use prefill::PrefillBatching;

/// Where a generation's events go: delivered on the engine thread as each token is made, so the
/// receiver gets them with no forwarding task in between (a decode node's request queue, or a
/// channel).
pub trait EventSink: Send + 'static {
    /// Delivers `event`; false once nobody listens any more (generation then stops).
    fn send(&mut self, event: GenEvent) -> bool;
    /// True once nobody listens: checked before every step, so a cancelled sequence leaves the
    /// batch before its next token.
    fn is_closed(&self) -> bool;
}

impl EventSink for mpsc::UnboundedSender<GenEvent> {
    fn send(&mut self, event: GenEvent) -> bool {
        mpsc::UnboundedSender::send(self, event).is_ok()
    }

    fn is_closed(&self) -> bool {
        mpsc::UnboundedSender::is_closed(self)
    }
}
pub use slots::SlotLease;

/// The output a resumed request already produced: the last `resumed` of a sequence's `tokens`,
/// which follow its prompt. `None` when they would not leave at least one prompt token.
pub fn resumed_output(tokens: &[i32], resumed: usize) -> Option<&[i32]> {
    tokens
        .len()
        .checked_sub(resumed)
        .filter(|&at| at > 0)
        .and_then(|at| tokens.get(at..))
}

/// Result of a prefill: the first output token, sampled on the prefill side.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefillOutput {
    /// Output token 0.
    pub first_token: i32,
    /// Its log probability, when the request asked for them.
    pub first_logprob: Option<TokenLogprob>,
    /// Prompt tokens now in the sequence's KV cache.
    pub n_prompt: usize,
    /// Of those, the leading ones whose cache an earlier prompt in the same slot had left and this
    /// one reused instead of computing (prefix reuse, `prefill`'s module docs).
    pub reused: usize,
}

/// Part of a prompt's cache, sent while the prompt runs ([`ContextHandle::prefill_streamed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvPiece {
    /// The cells `first..` that the batches since the last piece added, cut out of an export
    /// already ([`exo_kvcache::StateShape::cut`]).
    Segment {
        /// The segment's first cell.
        first: usize,
        /// The segment.
        bytes: Vec<u8>,
    },
    /// The whole cache, exported in the turn the prompt's last batch ran, right after token 0 went
    /// back: the cells no segment carried are cut from it, and its checksum closes the transfer.
    Final(ExportedKv),
}

/// Where a prompt's pieces go, and how often.
struct PieceStream {
    tx: mpsc::UnboundedSender<KvPiece>,
    /// Export once at least this many new cells are in the cache.
    every: usize,
    /// Cells sent so far.
    sent: usize,
}

/// One sequence's KV cache in the single-stream wire form, with the tokens it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedKv {
    /// The llama.cpp sequence state, one stream.
    pub state: Vec<u8>,
    /// Token ids at positions `0..tokens.len()`.
    pub tokens: Vec<i32>,
}

/// What a generation streams back, token by token.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// A generated token and the text that became final with it (may be empty mid-character).
    Token {
        /// Token id.
        id: i32,
        /// Output index of this token (0 is the prefill's token).
        index: u32,
        /// Newly final text.
        text: String,
        /// Its log probability, when the request asked for them.
        logprob: Option<TokenLogprob>,
    },
    /// Generation ended; `tail` is text held back until the end (a possible stop-string prefix or an
    /// incomplete character), released now that no stop string can follow.
    Done {
        /// Why it ended.
        finish: FinishReason,
        /// Final text.
        tail: String,
    },
}

/// Where the worker sends a command's result.
type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

/// What the async side asks of the worker thread, served in the order sent.
enum Command {
    Prefill {
        seq: i32,
        tokens: Vec<i32>,
        /// The last this many of `tokens` are output the request already produced (resumed
        /// elsewhere); the token chosen is output number `resumed`.
        resumed: usize,
        sampling: SamplingParams,
        /// Where the cache goes while the prompt runs, for a streamed hand-off.
        stream: Option<PieceStream>,
        reply: Reply<PrefillOutput>,
    },
    Export {
        seq: i32,
        reply: Reply<ExportedKv>,
    },
    Import {
        seq: i32,
        kv: DecodedKv,
        reply: Reply<()>,
    },
    Generate {
        seq: i32,
        next: i32,
        index: u32,
        /// Output tokens before `next` to replay into the constraint and the text (a resumed
        /// request); empty otherwise.
        history: Vec<i32>,
        sampling: SamplingParams,
        events: Box<dyn EventSink>,
        reply: Reply<()>,
    },
    Clear {
        seq: i32,
        reply: Reply<()>,
    },
    /// A lease ended: stop what still runs on the slot; its cache stays for prefix reuse where
    /// the context allows it, and is cleared otherwise.
    Release {
        seq: i32,
    },
    /// Stop now (the last handle is gone): sequences still running are dropped with the context.
    Stop,
}
