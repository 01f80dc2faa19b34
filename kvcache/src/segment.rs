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
use crate::state::{StateShape, VShape, parse_single};

/// Bytes before the first cell record in a single-stream state: magic, source sequence id,
/// `n_stream`, `cell_count`.
const HEAD: usize = 16;
/// Bytes between the cell records and the first layer: `v_trans`, `n_layer`, `n_rot_k`, `n_rot_v`.
const MID: usize = 16;
/// Bytes of a layer's own header: `i32` type and a `u64` row size, or `i32` type, `u32` element
/// size and `u32` element count.
const LAYER_HEAD: usize = 12;
const STATE_MAGIC: u32 = 0xaf14_3cd8;

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
        let (info, shape) = parse_single(state, self.cell_ext_len)?;
        self.same_cache(&shape)?;
        let n = info.cell_count as usize;
        let (a, b) = (cells.start as usize, cells.end as usize);
        if a >= b || b > n {
            return Err(malformed(format!("cells {a}..{b} of a state of {n}")));
        }
        let per_cell = usize_of(self.segment_bytes_per_cell()?)?;
        let mut out = Vec::with_capacity((b - a) * per_cell);
        let rec = self.cell_record_len();
        out.extend_from_slice(part(state, HEAD + a * rec..HEAD + b * rec)?);
        let mut at = HEAD + n * rec + MID;
        for block in self.blocks()? {
            at += LAYER_HEAD;
            match block {
                Block::Rows(row) => {
                    out.extend_from_slice(part(state, at + a * row..at + b * row)?);
                    at += n * row;
                }
                Block::Runs { elem, n_embd } => {
                    for _ in 0..n_embd {
                        out.extend_from_slice(part(state, at + a * elem..at + b * elem)?);
                        at += n * elem;
                    }
                }
            }
        }
        Ok(out)
    }

    /// The single-stream state that holds the cells of `segments` in order (each cut from a state
    /// of this shape), with `source_seq` as its source sequence id: what one export of all those
    /// cells gives. Every segment's length must be a whole number of cells.
    pub fn join(&self, source_seq: i32, segments: &[&[u8]]) -> Result<Vec<u8>, KvError> {
        let per_cell = usize_of(self.segment_bytes_per_cell()?)?;
        let mut counts = Vec::with_capacity(segments.len());
        for (i, s) in segments.iter().enumerate() {
            if s.is_empty() || s.len() % per_cell != 0 {
                return Err(malformed(format!(
                    "segment {i} has {} bytes, not a whole number of {per_cell}-byte cells",
                    s.len()
                )));
            }
            counts.push(s.len() / per_cell);
        }
        let n: usize = counts.iter().sum();
        let n32 = u32::try_from(n).map_err(|_| malformed("too many cells"))?;
        let n_layer = u32::try_from(self.k.len()).map_err(|_| malformed("too many layers"))?;
        let blocks = self.blocks()?;
        let mut out = Vec::with_capacity(HEAD + MID + n * per_cell + blocks.len() * LAYER_HEAD);
        out.extend_from_slice(&STATE_MAGIC.to_le_bytes());
        out.extend_from_slice(&source_seq.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&n32.to_le_bytes());
        // Where the next block starts in each segment.
        let rec = self.cell_record_len();
        let mut at: Vec<usize> = counts.iter().map(|c| c * rec).collect();
        for (s, c) in segments.iter().zip(&counts) {
            out.extend_from_slice(part(s, 0..c * rec)?);
        }
        for word in [u32::from(self.v_trans), n_layer, self.n_rot_k, self.n_rot_v] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        for (l, block) in blocks.iter().enumerate() {
            self.layer_head(l, &mut out);
            let runs = match *block {
                Block::Rows(row) => vec![row],
                Block::Runs { elem, n_embd } => vec![elem; n_embd],
            };
            for width in runs {
                for ((s, c), pos) in segments.iter().zip(&counts).zip(at.iter_mut()) {
                    out.extend_from_slice(part(s, *pos..*pos + c * width)?);
                    *pos += c * width;
                }
            }
        }
        Ok(out)
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
        assert!(source_seq(&[0u8; 5]).is_err());
    }
}
