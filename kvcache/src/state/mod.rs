//! The llama.cpp sequence-state layout: parsing, checking against a context's cache shape, re-framing.
//!
//! `llama_state_seq_get_data_ext` writes: `u32 magic 0xaf143cd8`, `i32 source seq id`, `u32 n_stream`,
//! then per stream `u32 cell_count` and, when non-zero, the cells (`i32 pos`, `u32 n_seq_id`, an
//! optional cell extension record, `n_seq_id x i32 seq id`), `u32 v_trans`, `u32 n_layer`,
//! `u32 n_rot_k`, `u32 n_rot_v`, per layer `i32 k_type, u64 k_row_size, cell_count rows`, then V per
//! layer (`i32 v_type, u64 v_row_size, rows`, or when transposed `i32 v_type, u32 v_elem_size,
//! u32 n_embd_v_gqa, n_embd_v_gqa runs of cell_count elements`). llama.cpp aborts on some malformed
//! states, so every field is checked here first.
//!
//! An interleaved sliding-window (iSWA) model, Gemma 2 and 3 among them, keeps two caches, and its
//! state holds two such sections after the one head (magic, source sequence id): the full-attention
//! cache with every position `0..n`, then the sliding-window cache with only the positions still
//! inside the window, `n - w..n` (`w` at most the window). Each section has its own streams, cells
//! and layers. The functions here work section by section; [`StateShape::window`] is the second
//! section's shape.
//!
//! A hybrid model (attention and recurrent layers) ends its state with a recurrent section
//! ([`recurrent`]): one cell holding the sequence's whole history, shipped as it is
//! ([`StateShape::recurrent`]). A purely recurrent model (Mamba, RWKV) writes that section alone;
//! its shape has no K or V layers ([`StateShape::has_attention`]).

mod parse;
mod recurrent;
#[cfg(test)]
pub(crate) mod tests;

use crate::error::KvError;
pub(crate) use parse::{Form, HEAD_LEN, malformed};
use parse::{Parsed, Section, parse};
pub use recurrent::RecurrentShape;

/// One layer's K (or non-transposed V) rows: ggml type id and bytes per row (per token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerShape {
    /// `ggml_type` id.
    pub type_id: i32,
    /// Bytes per cell.
    pub row_size: u64,
}

/// One layer's V storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VShape {
    /// One row per cell (flash attention on).
    Rows(LayerShape),
    /// Transposed: one run per embedding element (flash attention off).
    Transposed {
        /// `ggml_type` id.
        type_id: i32,
        /// Bytes per element.
        elem_size: u32,
        /// Elements per cell.
        n_embd: u32,
    },
}

impl VShape {
    /// Bytes of one cell's V in this layer.
    pub(crate) fn bytes_per_cell(&self) -> Option<u64> {
        match *self {
            VShape::Rows(l) => Some(l.row_size),
            VShape::Transposed {
                elem_size, n_embd, ..
            } => u64::from(elem_size).checked_mul(u64::from(n_embd)),
        }
    }
}

/// The cache shape of one llama.cpp context, learned from a state it exported itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateShape {
    /// KV streams in the context (1 when unified, else one per sequence slot).
    pub n_stream: u32,
    /// Bytes of the per-cell extension record.
    pub cell_ext_len: u32,
    /// V stored transposed (flash attention off).
    pub v_trans: bool,
    /// Rotated K dimensions.
    pub n_rot_k: u32,
    /// Rotated V dimensions.
    pub n_rot_v: u32,
    /// K per layer.
    pub k: Vec<LayerShape>,
    /// V per layer.
    pub v: Vec<VShape>,
    /// An iSWA model's sliding-window cache, whose section follows this (full-attention) one in
    /// every state; its own `window` is `None`.
    pub window: Option<Box<StateShape>>,
    /// A hybrid model's recurrent state, whose section ends every state (after the window
    /// cache's, if any); `None` in a window's shape.
    pub recurrent: Option<RecurrentShape>,
}

/// What parsing a sequence state found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqStateInfo {
    /// Streams in the state.
    pub n_stream: u32,
    /// The one stream holding cells (0 when the state is empty).
    pub stream: u32,
    /// Cells (tokens) in the state: the full cache's (0 for a purely recurrent state).
    pub cell_count: u32,
    /// Cells in the sliding-window cache of an iSWA state (0 without one): the last positions.
    pub window_cells: u32,
}

impl SeqStateInfo {
    fn of(p: &Parsed) -> Self {
        let full = p.full.as_ref();
        SeqStateInfo {
            n_stream: full.map_or(1, |f| f.n_stream),
            stream: full.map_or(0, |f| f.stream),
            cell_count: full.map_or(0, |f| f.cell_count),
            window_cells: p.window.as_ref().map_or(0, |w| w.cell_count),
        }
    }
}

impl StateShape {
    /// How this shape's states are laid out around their cells.
    pub(crate) fn form(&self) -> Form {
        Form {
            cell_ext_len: self.cell_ext_len,
            attention: self.has_attention(),
            recurrent: self.recurrent.is_some(),
        }
    }

    /// How one of this shape's caches is laid out as a state of its own ([`Caches`]).
    pub(crate) fn cache_form(&self) -> Form {
        Form {
            attention: true,
            recurrent: false,
            ..self.form()
        }
    }

    /// Whether states of this shape hold an attention cache: every model but a purely recurrent
    /// one (whose state is its recurrent section alone, and whose transfers carry no cells).
    pub fn has_attention(&self) -> bool {
        !self.k.is_empty()
    }

    /// Bytes of the recurrent section (0 for a shape without one).
    pub fn recurrent_len(&self) -> Result<u64, KvError> {
        self.recurrent
            .as_ref()
            .map_or(Ok(0), RecurrentShape::section_len)
    }

    /// The cells a transfer of `n_tokens` tokens carries: one per token, none without attention.
    pub fn cells_for(&self, n_tokens: usize) -> usize {
        if self.has_attention() { n_tokens } else { 0 }
    }

    /// The shape of a purely recurrent model's state: no caches, `recurrent` alone.
    pub(crate) fn recurrent_only(recurrent: RecurrentShape) -> Self {
        StateShape {
            n_stream: 1,
            cell_ext_len: 0,
            v_trans: false,
            n_rot_k: 0,
            n_rot_v: 0,
            k: Vec::new(),
            v: Vec::new(),
            window: None,
            recurrent: Some(recurrent),
        }
    }

    /// Learns a context's cache shape from a state that context exported (any number of cells).
    pub fn calibrate(state: &[u8]) -> Result<Self, KvError> {
        let parsed = parse_any(state)?;
        parsed
            .shape()
            .ok_or_else(|| malformed("calibration state holds no cells"))
    }

    /// Bytes one cached token takes in this shape (K and V over all layers; for an iSWA model the
    /// window cache's too, which is what a token costs while the prompt fits the window).
    pub fn bytes_per_token(&self) -> u64 {
        let k: u64 = self.k.iter().map(|l| l.row_size).sum();
        let v: u64 = self.v.iter().filter_map(VShape::bytes_per_cell).sum();
        k + v + self.window.as_ref().map_or(0, |w| w.bytes_per_token())
    }

    /// Checks a single-stream state (as carried on the wire) against this shape: same layers, types
    /// and row sizes, exactly `n_tokens` cells at positions `0..n_tokens`, nothing left over; for
    /// an iSWA shape also the window section, whose cells must be the positions `n_tokens - w..`
    /// for some `w` from 1 to `n_tokens` (the caller bounds `w` by the model's window); for a
    /// hybrid shape the recurrent section, one cell at position `n_tokens - 1` with this shape's
    /// layers and rows.
    pub fn check(&self, state: &[u8], n_tokens: usize) -> Result<SeqStateInfo, KvError> {
        let parsed = parse(state, self.form())?;
        let info = SeqStateInfo::of(&parsed);
        if let Some(full) = &parsed.full {
            let full = single_section(full, "full")?;
            if full.cell_count as usize != n_tokens || full.first_pos != 0 {
                return Err(malformed(format!(
                    "{} cells for {n_tokens} tokens, the first at position {}",
                    full.cell_count, full.first_pos
                )));
            }
            self.same_cache(full.shape.as_ref().ok_or_else(|| malformed("no cells"))?)?;
        }
        match (&self.window, &parsed.window) {
            (None, None) => {}
            (Some(shape), Some(w)) => {
                let w = single_section(w, "window")?;
                let end = i64::from(w.first_pos) + i64::from(w.cell_count);
                if w.cell_count == 0 || end != n_tokens as i64 {
                    return Err(malformed(format!(
                        "a window of {} cells from position {} for {n_tokens} tokens",
                        w.cell_count, w.first_pos
                    )));
                }
                shape.same_cache(w.shape.as_ref().ok_or_else(|| malformed("no cells"))?)?;
            }
            (mine, theirs) => {
                return Err(KvError::ShapeMismatch(format!(
                    "sliding-window cache: state has {}, context has {}",
                    if theirs.is_some() { "one" } else { "none" },
                    if mine.is_some() { "one" } else { "none" },
                )));
            }
        }
        if let (Some(mine), Some(rec)) = (&self.recurrent, &parsed.recurrent) {
            if rec.pos.map(i64::from) != Some(n_tokens as i64 - 1) {
                return Err(malformed(format!(
                    "a recurrent state at position {:?} for {n_tokens} tokens",
                    rec.pos
                )));
            }
            mine.same(&rec.shape)?;
        }
        Ok(info)
    }

    /// Whether `other` (parsed from a state) has this cache's layers, types, row sizes, rotation
    /// dims and V transposition; the stream count may differ. Compares one cache: the windows, if
    /// any, are compared by the caller.
    pub(crate) fn same_cache(&self, other: &StateShape) -> Result<(), KvError> {
        let mismatch = |what: &str, a: String, b: String| {
            Err(KvError::ShapeMismatch(format!(
                "{what}: state has {a}, context has {b}"
            )))
        };
        if other.v_trans != self.v_trans {
            return mismatch(
                "V transposition",
                other.v_trans.to_string(),
                self.v_trans.to_string(),
            );
        }
        if other.k.len() != self.k.len() || other.v.len() != self.v.len() {
            return mismatch(
                "layer count",
                other.k.len().to_string(),
                self.k.len().to_string(),
            );
        }
        if (other.n_rot_k, other.n_rot_v) != (self.n_rot_k, self.n_rot_v) {
            return mismatch(
                "rotation dims",
                format!("{}/{}", other.n_rot_k, other.n_rot_v),
                format!("{}/{}", self.n_rot_k, self.n_rot_v),
            );
        }
        for (i, (a, b)) in other.k.iter().zip(&self.k).enumerate() {
            if a != b {
                return mismatch(&format!("K layer {i}"), format!("{a:?}"), format!("{b:?}"));
            }
        }
        for (i, (a, b)) in other.v.iter().zip(&self.v).enumerate() {
            if a != b {
                return mismatch(&format!("V layer {i}"), format!("{a:?}"), format!("{b:?}"));
            }
        }
        Ok(())
    }

    /// Rewrites a checked single-stream state in place so this context can import it: each
    /// section's `n_stream` set to the context's stream count and the other streams appended
    /// empty. llama.cpp puts the cells of the non-empty stream into the destination sequence's
    /// own stream.
    pub fn reframe_for_import(&self, state: &mut Vec<u8>) -> Result<(), KvError> {
        let parsed = parse(state, self.form())?;
        let window_n = self.window.as_ref().map_or(self.n_stream, |w| w.n_stream);
        // Back to front, so the offsets of the sections before stay valid.
        let counts: Vec<_> = parsed.sections().zip([self.n_stream, window_n]).collect();
        for (s, n) in counts.into_iter().rev() {
            let extra = n
                .checked_sub(1)
                .ok_or_else(|| KvError::ShapeMismatch("zero streams".into()))?;
            single_section(s, "state's")?;
            write_u32(state, s.span.start, n)?;
            let empty = std::iter::repeat_n(0u8, 4 * extra as usize);
            state.splice(s.span.end..s.span.end, empty);
        }
        Ok(())
    }
}

/// The section's one non-empty stream as the only stream, or an error naming `which` section.
fn single_section<'a>(s: &'a Section, which: &str) -> Result<&'a Section, KvError> {
    if s.n_stream != 1 {
        return Err(malformed(format!(
            "{} streams in the {which} cache, the wire form has 1",
            s.n_stream
        )));
    }
    Ok(s)
}

/// Turns an exported state into the single-stream wire form, in place: in each section the
/// stream holding the cells, and `n_stream = 1`. Only the bytes after an empty stream move.
pub fn to_single_stream(mut state: Vec<u8>) -> Result<(Vec<u8>, SeqStateInfo), KvError> {
    let parsed = parse_any(&state)?;
    let info = SeqStateInfo {
        n_stream: 1,
        stream: 0,
        ..SeqStateInfo::of(&parsed)
    };
    // Back to front, so the offsets of the sections before stay valid. The parser put each
    // section's body inside its span, after its `n_stream` field.
    for s in parsed.sections().rev() {
        state.drain(s.body.end..s.span.end);
        state.drain(s.span.start + 4..s.body.start);
        write_u32(&mut state, s.span.start, 1)?;
    }
    Ok((state, info))
}

fn write_u32(state: &mut [u8], at: usize, n: u32) -> Result<(), KvError> {
    let field = state.get_mut(at..at + 4).ok_or(KvError::Truncated {
        what: "KV state",
        need: at as u64 + 4,
        have: 0,
    })?;
    field.copy_from_slice(&n.to_le_bytes());
    Ok(())
}

/// A single-stream state taken apart: each cache section as a state of its own (with the head),
/// and a hybrid model's recurrent section as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Caches {
    /// The head and the full-attention cache (the head alone for a purely recurrent state).
    pub full: Vec<u8>,
    /// The head and an iSWA model's sliding-window cache.
    pub window: Option<Vec<u8>>,
    /// A hybrid model's recurrent section (no head).
    pub recurrent: Option<Vec<u8>>,
}

impl Caches {
    /// Takes apart a state of `form`.
    pub(crate) fn split(state: &[u8], form: Form) -> Result<Self, KvError> {
        let parsed = parse(state, form)?;
        let head = state.get(..HEAD_LEN).unwrap_or_default();
        let with_head = |s: &Section| {
            let mut v = Vec::with_capacity(HEAD_LEN + s.span.len());
            v.extend_from_slice(head);
            v.extend_from_slice(state.get(s.span.clone()).unwrap_or_default());
            v
        };
        Ok(Caches {
            full: match &parsed.full {
                Some(full) => with_head(full),
                None => head.to_vec(),
            },
            window: parsed.window.as_ref().map(with_head),
            recurrent: parsed
                .recurrent
                .as_ref()
                .map(|r| state.get(r.span.clone()).unwrap_or_default().to_vec()),
        })
    }

    /// The state they were taken from: the full cache, the window cache's section, the recurrent
    /// section.
    pub(crate) fn join(self) -> Vec<u8> {
        let mut state = self.full;
        if let Some(w) = self.window {
            state.extend_from_slice(w.get(HEAD_LEN..).unwrap_or_default());
        }
        if let Some(r) = self.recurrent {
            state.extend_from_slice(&r);
        }
        state
    }
}

/// Parses a single-stream state with cells (the wire form), one cache or two: what it holds and
/// the full cache's shape (with the window's).
pub(crate) fn parse_single(
    state: &[u8],
    form: Form,
) -> Result<(SeqStateInfo, StateShape), KvError> {
    let parsed = parse(state, form)?;
    if let Some(full) = &parsed.full {
        single_section(full, "full")?;
    }
    if let Some(w) = &parsed.window {
        single_section(w, "window")?;
    }
    let shape = parsed
        .shape()
        .ok_or_else(|| malformed("state holds no cells"))?;
    Ok((SeqStateInfo::of(&parsed), shape))
}

/// Parses a state of any form llama.cpp writes ([`Form::ALL`]). The first error is the one
/// reported (an attention model's state without an extension record is by far the most common).
fn parse_any(state: &[u8]) -> Result<Parsed, KvError> {
    let mut first = None;
    for form in Form::ALL {
        match parse(state, form) {
            Ok(p) => return Ok(p),
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    Err(first.unwrap_or_else(|| malformed("no candidate state layout")))
}
