//! Segments: the cells `a..b` of a sequence state on their own, and whole states joined back from
//! them. A streamed hand-off (issue 14) exports the sequence after each part of the prompt, cuts out
//! the cells that part added and ships them while the next part runs; the receiver joins the
//! segments into the state a single export at the end would have given, byte for byte.
//!
//! A segment has no header of its own: for its cells, in order, the cell records (`i32 pos`,
//! `u32 n_seq_id = 1`, the extension record, `i32 seq id`), then each K layer's rows, then each V
//! layer's rows or, when V is transposed, each embedding element's run of values. Its length is
//! `cells x` [`StateShape::segment_bytes_per_cell`]; the shape of the state it came from says how to
//! read it.

use std::ops::Range;

use crate::error::KvError;
use crate::frame::Reader;
use crate::state::{LayerShape, RecurrentShape, StateShape, VShape, parse_single};

/// Bytes before the first cell record in a single-stream state: magic, source sequence id,
/// `n_stream`, `cell_count`.
const HEAD: usize = 16;
/// Bytes between the cell records and the first layer: `v_trans`, `n_layer`, `n_rot_k`, `n_rot_v`.
const MID: usize = 16;
/// Bytes of a layer's own header: `i32` type and a `u64` row size, or `i32` type, `u32` element
/// size and `u32` element count.
const LAYER_HEAD: usize = 12;
const STATE_MAGIC: u32 = 0xaf14_3cd8;

/// A streamed hand-off sends a prompt's cache in about this many pieces while the prompt runs
/// (a prefill node's default; `--handoff-pieces`).
pub const HANDOFF_PIECES: u64 = 8;
/// No piece but the last is smaller than this many tokens: each piece costs an export.
pub const MIN_PIECE_TOKENS: u64 = 256;

/// The prompt tokens between the pieces of a streamed hand-off of a `tokens`-token prompt cut in
/// `pieces`: `tokens / pieces`, at least [`MIN_PIECE_TOKENS`] (`pieces` 0 or 1: the whole prompt,
/// one export after it). The prefill node sends a piece once its batches have added that many
/// cells since the last one, and the rest when the prompt ends; the cost model prices the hand-off
/// the same way, with [`HANDOFF_PIECES`].
pub fn piece_tokens(tokens: u64, pieces: u64) -> u64 {
    if pieces <= 1 {
        return tokens.max(1);
    }
    tokens.div_ceil(pieces).max(MIN_PIECE_TOKENS)
}

fn malformed(msg: impl Into<String>) -> KvError {
    KvError::MalformedState(msg.into())
}

/// `bytes[range]`, or an error where a range this module computed falls outside (it never should:
/// every state is parsed and every segment's length checked first).
fn part(bytes: &[u8], range: Range<usize>) -> Result<&[u8], KvError> {
    bytes
        .get(range)
        .ok_or_else(|| malformed("a cell range falls outside the state"))
}

fn usize_of(v: u64) -> Result<usize, KvError> {
    usize::try_from(v).map_err(|_| malformed("size does not fit in memory"))
}

/// Where one layer's data sits in a state, and how it is laid out.
#[derive(Clone, Copy)]
enum Block {
    /// One row of this many bytes per cell.
    Rows(usize),
    /// Transposed V: `n_embd` runs, one value of `elem` bytes per cell each.
    Runs { elem: usize, n_embd: usize },
}

impl Block {
    /// Bytes per cell of each run, and how many runs.
    fn runs(self) -> (usize, usize) {
        match self {
            Block::Rows(row) => (row, 1),
            Block::Runs { elem, n_embd } => (elem, n_embd),
        }
    }
}

/// Bytes of a layout's headers: before the cell records, between them and the layers, and in
/// front of each layer.
type Heads = (usize, usize, usize);
/// A single-stream state's headers.
const STATE_HEADS: Heads = (HEAD, MID, LAYER_HEAD);
/// A segment has none.
const SEGMENT_HEADS: Heads = (0, 0, 0);

impl StateShape {
    /// Bytes of one cell record.
    fn cell_record_len(&self) -> usize {
        12 + self.cell_ext_len as usize
    }

    /// The K layers then the V layers, as blocks.
    fn blocks(&self) -> Result<Vec<Block>, KvError> {
        let mut out = Vec::with_capacity(self.k.len() + self.v.len());
        for k in &self.k {
            out.push(Block::Rows(usize_of(k.row_size)?));
        }
        for v in &self.v {
            out.push(match *v {
                VShape::Rows(l) => Block::Rows(usize_of(l.row_size)?),
                VShape::Transposed {
                    elem_size, n_embd, ..
                } => Block::Runs {
                    elem: elem_size as usize,
                    n_embd: n_embd as usize,
                },
            });
        }
        Ok(out)
    }

    /// Bytes one cell takes in a segment: its record, its K rows and its V.
    pub fn segment_bytes_per_cell(&self) -> Result<u64, KvError> {
        let v: Option<u64> = self.v.iter().map(VShape::bytes_per_cell).sum();
        let kv = v
            .and_then(|v| self.k.iter().try_fold(v, |s, l| s.checked_add(l.row_size)))
            .ok_or_else(|| malformed("cell size overflows"))?;
        kv.checked_add(self.cell_record_len() as u64)
            .ok_or_else(|| malformed("cell size overflows"))
    }

    /// The segment of cells `cells` of `state`, a single-stream state of this cache (checked here:
    /// layers, types and sizes as this shape's, any stream count in the shape; cells at positions
    /// `0..n` in any order, which the segment takes in the state's order).
    pub fn cut(&self, state: &[u8], cells: Range<u32>) -> Result<Vec<u8>, KvError> {
        let (info, shape) = parse_single(state, self.form())?;
        self.same_cache(&shape)?;
        self.cut_cells(state, STATE_HEADS, info.cell_count as usize, cells)
    }

    /// Cells `cells` (counted from the segment's own first cell) of `segment`, a segment of this
    /// shape, as a segment of their own.
    pub fn cut_segment(&self, segment: &[u8], cells: Range<u32>) -> Result<Vec<u8>, KvError> {
        let per_cell = usize_of(self.segment_bytes_per_cell()?)?;
        if !segment.len().is_multiple_of(per_cell) {
            return Err(malformed("a segment that is not whole cells"));
        }
        self.cut_cells(segment, SEGMENT_HEADS, segment.len() / per_cell, cells)
    }

    /// Where each run of per-cell values starts in a layout of `n` cells with headers `heads`,
    /// and its bytes per cell, in layout order: the cell records, every K layer's rows, every V
    /// layer's rows or its runs (one per embedding element).
    fn runs(&self, n: usize, heads: Heads) -> Result<Vec<(usize, usize)>, KvError> {
        let (head, mid, layer_head) = heads;
        let rec = self.cell_record_len();
        let mut out = vec![(head, rec)];
        let mut at = head + n * rec + mid;
        for block in self.blocks()? {
            at += layer_head;
            let (width, count) = block.runs();
            for _ in 0..count {
                out.push((at, width));
                at += n * width;
            }
        }
        Ok(out)
    }

    /// Cells `cells` of the `n` that `bytes` lays out with headers `heads` (a state's, or none for
    /// a segment).
    fn cut_cells(
        &self,
        bytes: &[u8],
        heads: Heads,
        n: usize,
        cells: Range<u32>,
    ) -> Result<Vec<u8>, KvError> {
        let (a, b) = (cells.start as usize, cells.end as usize);
        if a >= b || b > n {
            return Err(malformed(format!("cells {a}..{b} of {n}")));
        }
        let per_cell = usize_of(self.segment_bytes_per_cell()?)?;
        let mut out = Vec::with_capacity((b - a) * per_cell);
        for (start, width) in self.runs(n, heads)? {
            out.extend_from_slice(part(bytes, start + a * width..start + b * width)?);
        }
        Ok(out)
    }

    /// The single-stream state that holds the cells of `segments` in order (each cut from a state
    /// of this shape), with `source_seq` as its source sequence id: what one export of all those
    /// cells gives. Every segment's length must be a whole number of cells.
    pub fn join(&self, source_seq: i32, segments: &[&[u8]]) -> Result<Vec<u8>, KvError> {
        let per_cell = usize_of(self.segment_bytes_per_cell()?)?;
        let total: usize = segments.iter().map(|s| s.len() / per_cell.max(1)).sum();
        let mut state = self.blank_state(source_seq, total)?;
        let mut first = 0;
        for s in segments {
            first += self.place(&mut state, total, first, s)?;
        }
        Ok(state)
    }

    /// Bytes of a single-stream state of `cells` cells in this shape (its caches: the head alone
    /// for a purely recurrent shape).
    pub fn state_len(&self, cells: usize) -> Result<usize, KvError> {
        if !self.has_attention() {
            return Ok(crate::state::HEAD_LEN);
        }
        let per_cell = usize_of(self.segment_bytes_per_cell()?)?;
        cells
            .checked_mul(per_cell)
            .and_then(|d| d.checked_add(HEAD + MID + (self.k.len() + self.v.len()) * LAYER_HEAD))
            .ok_or_else(|| malformed("state size overflows"))
    }

    /// Most bytes a single-stream state of `cells` cells in this shape takes: for an iSWA shape
    /// with its window cache of at most `window` cells (the model's sliding window; `None`: as
    /// many as `cells`), for a hybrid shape with its recurrent section.
    pub fn max_state_len(&self, cells: usize, window: Option<u32>) -> Result<usize, KvError> {
        let mut len = self.state_len(cells)?;
        if let Some(w) = &self.window {
            let window_cells = window.map_or(cells, |n| cells.min(n as usize));
            len = len.saturating_add(w.state_len(window_cells)?);
        }
        Ok(len.saturating_add(usize_of(self.recurrent_len()?)?))
    }

    /// A single-stream state of `cells` cells in this shape whose headers are written and whose
    /// cells are all zero bytes, for [`Self::place`] to fill.
    pub fn blank_state(&self, source_seq: i32, cells: usize) -> Result<Vec<u8>, KvError> {
        let n32 = u32::try_from(cells).map_err(|_| malformed("too many cells"))?;
        let n_layer = u32::try_from(self.k.len()).map_err(|_| malformed("too many layers"))?;
        let mut out = Vec::with_capacity(self.state_len(cells)?);
        out.extend_from_slice(&STATE_MAGIC.to_le_bytes());
        out.extend_from_slice(&source_seq.to_le_bytes());
        if !self.has_attention() {
            return Ok(out);
        }
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&n32.to_le_bytes());
        out.resize(out.len() + cells * self.cell_record_len(), 0);
        for word in [u32::from(self.v_trans), n_layer, self.n_rot_k, self.n_rot_v] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        for (l, block) in self.blocks()?.into_iter().enumerate() {
            self.layer_head(l, &mut out);
            let (width, count) = block.runs();
            out.resize(out.len() + cells * width * count, 0);
        }
        Ok(out)
    }

    /// Writes `segment` (whole cells, cut from a state of this shape) into `state`, a state of
    /// `total` cells made by [`Self::blank_state`], as its cells `first..`; returns how many cells
    /// it held. Refuses a segment that is not whole cells or runs past `total`.
    pub fn place(
        &self,
        state: &mut [u8],
        total: usize,
        first: usize,
        segment: &[u8],
    ) -> Result<usize, KvError> {
        let per_cell = usize_of(self.segment_bytes_per_cell()?)?;
        if segment.is_empty() || !segment.len().is_multiple_of(per_cell) {
            return Err(malformed(format!(
                "a segment of {} bytes is not a whole number of {per_cell}-byte cells",
                segment.len()
            )));
        }
        let c = segment.len() / per_cell;
        if first + c > total || state.len() != self.state_len(total)? {
            return Err(malformed(format!(
                "cells {first}..{} of a state of {total}",
                first + c
            )));
        }
        // The segment's runs lie back to back; each goes to its run in the state.
        let mut from = 0;
        for (start, width) in self.runs(total, STATE_HEADS)? {
            let len = c * width;
            let to = start + first * width;
            state
                .get_mut(to..to + len)
                .ok_or_else(|| malformed("a cell range falls outside the state"))?
                .copy_from_slice(part(segment, from..from + len)?);
            from += len;
        }
        Ok(c)
    }

    /// Writes the shape a receiver needs to place segments (the sender's, stream count aside):
    /// `u8 v_trans`, `u32 cell_ext_len`, `u32 n_rot_k`, `u32 n_rot_v`, `u32 n_layer`, then per K
    /// layer `i32 type, u64 row_size`, then per V layer `i32 type` and `u64 row_size` or, when
    /// transposed, `u32 elem_size, u32 n_embd`.
    /// Then `u8` 1 and the window cache's skeleton for an iSWA shape, else `u8` 0; then `u8` 1
    /// and the recurrent state's skeleton ([`RecurrentShape::write_skeleton`]) for a hybrid shape,
    /// else `u8` 0.
    pub(crate) fn write_skeleton(&self, out: &mut Vec<u8>) {
        self.write_cache_skeleton(out);
        match &self.window {
            Some(w) => {
                out.push(1);
                w.write_cache_skeleton(out);
            }
            None => out.push(0),
        }
        match &self.recurrent {
            Some(r) => {
                out.push(1);
                r.write_skeleton(out);
            }
            None => out.push(0),
        }
    }

    fn write_cache_skeleton(&self, out: &mut Vec<u8>) {
        out.push(u8::from(self.v_trans));
        for word in [self.cell_ext_len, self.n_rot_k, self.n_rot_v] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out.extend_from_slice(&(self.k.len() as u32).to_le_bytes());
        for l in 0..self.k.len() + self.v.len() {
            self.layer_head(l, out);
        }
    }

    /// Reads what [`Self::write_skeleton`] wrote, refusing more than `max_layers` layers, a
    /// V layer of the other kind than `v_trans` says, and a cell size that overflows.
    pub(crate) fn read_skeleton(r: &mut Reader<'_>, max_layers: u32) -> Result<Self, KvError> {
        let mut shape = Self::read_cache_skeleton(r, max_layers)?;
        shape.window = match r.u8()? {
            0 => None,
            1 => Some(Box::new(Self::read_cache_skeleton(r, max_layers)?)),
            v => return Err(malformed(format!("window flag {v}"))),
        };
        shape.recurrent = match r.u8()? {
            0 => None,
            1 => Some(RecurrentShape::read_skeleton(r, max_layers)?),
            v => return Err(malformed(format!("recurrent flag {v}"))),
        };
        let empty_window = shape.window.as_ref().is_some_and(|w| !w.has_attention());
        if empty_window
            || !shape.has_attention() && (shape.recurrent.is_none() || shape.window.is_some())
        {
            return Err(malformed(
                "a shape without attention layers must be a recurrent state alone",
            ));
        }
        Ok(shape)
    }

    fn read_cache_skeleton(r: &mut Reader<'_>, max_layers: u32) -> Result<Self, KvError> {
        let v_trans = match r.u8()? {
            0 => false,
            1 => true,
            v => return Err(malformed(format!("v_trans {v}"))),
        };
        let cell_ext_len = r.u32()?;
        let (n_rot_k, n_rot_v) = (r.u32()?, r.u32()?);
        let n_layer = r.u32()?;
        // No layers: a purely recurrent model's shape (the caller checks the recurrent part follows).
        if n_layer > max_layers || cell_ext_len > 64 {
            return Err(malformed(format!(
                "{n_layer} layers, a {cell_ext_len}-byte cell extension"
            )));
        }
        let mut k = Vec::with_capacity(n_layer as usize);
        for _ in 0..n_layer {
            k.push(LayerShape {
                type_id: r.i32()?,
                row_size: r.u64()?,
            });
        }
        let mut v = Vec::with_capacity(n_layer as usize);
        for _ in 0..n_layer {
            let type_id = r.i32()?;
            v.push(if v_trans {
                VShape::Transposed {
                    type_id,
                    elem_size: r.u32()?,
                    n_embd: r.u32()?,
                }
            } else {
                VShape::Rows(LayerShape {
                    type_id,
                    row_size: r.u64()?,
                })
            });
        }
        let shape = StateShape {
            n_stream: 1,
            cell_ext_len,
            v_trans,
            n_rot_k,
            n_rot_v,
            k,
            v,
            window: None,
            recurrent: None,
        };
        shape.segment_bytes_per_cell()?;
        Ok(shape)
    }

    /// Writes the header of block `l` (K layers first, then V layers) as llama.cpp does.
    fn layer_head(&self, l: usize, out: &mut Vec<u8>) {
        let v = l.checked_sub(self.k.len()).and_then(|i| self.v.get(i));
        match (self.k.get(l), v) {
            (Some(k), _) => {
                out.extend_from_slice(&k.type_id.to_le_bytes());
                out.extend_from_slice(&k.row_size.to_le_bytes());
            }
            (None, None) => {}
            (None, Some(VShape::Rows(v))) => {
                out.extend_from_slice(&v.type_id.to_le_bytes());
                out.extend_from_slice(&v.row_size.to_le_bytes());
            }
            (
                None,
                Some(VShape::Transposed {
                    type_id,
                    elem_size,
                    n_embd,
                }),
            ) => {
                out.extend_from_slice(&type_id.to_le_bytes());
                out.extend_from_slice(&elem_size.to_le_bytes());
                out.extend_from_slice(&n_embd.to_le_bytes());
            }
        }
    }
}

/// The source sequence id a single-stream state was exported from.
pub fn source_seq(state: &[u8]) -> Result<i32, KvError> {
    state
        .get(4..8)
        .and_then(|b| b.try_into().ok())
        .map(i32::from_le_bytes)
        .ok_or(KvError::Truncated {
            what: "KV state",
            need: 8,
            have: state.len() as u64,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::synthetic_state;

    fn shape_of(state: &[u8]) -> StateShape {
        StateShape::calibrate(state).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn cut_anywhere_and_joined_gives_the_state_back() {
        for v_trans in [false, true] {
            let positions: Vec<i32> = (0..11).collect();
            let state = synthetic_state(1, 0, &positions, v_trans);
            let shape = shape_of(&state);
            for cuts in [
                vec![0, 11],
                vec![0, 1, 11],
                vec![0, 4, 5, 10, 11],
                vec![0, 3, 6, 9, 11],
            ] {
                let segments: Vec<Vec<u8>> = cuts
                    .windows(2)
                    .map(|w| shape.cut(&state, w[0]..w[1]).unwrap_or_default())
                    .collect();
                let per_cell = shape.segment_bytes_per_cell().unwrap_or(0) as usize;
                for (w, s) in cuts.windows(2).zip(&segments) {
                    assert_eq!(s.len(), (w[1] - w[0]) as usize * per_cell);
                }
                let refs: Vec<&[u8]> = segments.iter().map(Vec::as_slice).collect();
                let joined = shape.join(source_seq(&state).unwrap_or(-1), &refs);
                assert_eq!(
                    joined.ok(),
                    Some(state.clone()),
                    "v_trans {v_trans}, cuts {cuts:?}"
                );
            }
        }
    }

    #[test]
    fn the_skeleton_round_trips() {
        for v_trans in [false, true] {
            let shape = shape_of(&synthetic_state(1, 0, &[0, 1], v_trans));
            let mut b = Vec::new();
            shape.write_skeleton(&mut b);
            let mut r = Reader::new(&b, "skeleton");
            assert_eq!(
                StateShape::read_skeleton(&mut r, 512).ok(),
                Some(shape.clone())
            );
            assert_eq!(r.remaining(), 0);
            let mut r = Reader::new(&b, "skeleton");
            assert!(StateShape::read_skeleton(&mut r, 1).is_err());
        }
    }

    #[test]
    fn bad_ranges_segments_and_shapes_are_refused() {
        let state = synthetic_state(1, 0, &[0, 1, 2], false);
        let shape = shape_of(&state);
        assert!(shape.cut(&state, 2..2).is_err());
        assert!(shape.cut(&state, 1..4).is_err());
        let other = shape_of(&synthetic_state(1, 0, &[0, 1, 2], true));
        assert!(other.cut(&state, 0..1).is_err());
        let seg = shape.cut(&state, 0..2).unwrap_or_default();
        assert!(shape.join(0, &[&seg[..seg.len() - 1]]).is_err());
        assert!(shape.join(0, &[&[]]).is_err());
        // Past the end of the state placed into.
        let mut blank = shape.blank_state(0, 2).unwrap_or_default();
        assert!(shape.place(&mut blank, 2, 1, &seg).is_err());
        assert_eq!(shape.place(&mut blank, 2, 0, &seg).ok(), Some(2));
        assert!(source_seq(&[0u8; 5]).is_err());
    }
}
