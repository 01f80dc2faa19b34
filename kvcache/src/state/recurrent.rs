//! The recurrent section of a hybrid model's state (Jamba, Granite 4 hybrid, LFM2, Falcon-H1,
//! Nemotron-H, Qwen3-Next: attention layers and Mamba-style or short-convolution layers in one
//! model), which llama.cpp writes after the attention cache sections.
//!
//! `llama_memory_recurrent::state_write` for one sequence writes `u32 cell_count` (1, or 0 for an
//! empty sequence: a sequence's whole history lives in one cell), per cell `i32 pos` (the last
//! position the state absorbed) and `u32 n_seq_id` (0 for a one-sequence export: no sequence ids
//! follow), then `u32 s_trans` (always 0), `u32 n_layer` (every layer of the model, including the
//! attention layers, which write nothing here), then per recurrent layer its "R" (convolution)
//! state `i32 type, u64 row_size, cell_count rows`, then per recurrent layer its "S" (SSM) state
//! the same way. Unlike the attention cache there are no streams, no per-token cells and no
//! transposed variant, and the state does not grow with the prompt.
//!
//! llama.cpp aborts the process on a recurrent section of two or more cells (an assertion in its
//! reader), so nothing but exactly one cell at the expected position passes [`RecurrentShape`]'s
//! checks.

use std::ops::Range;

#[cfg(test)]
mod tests;

use super::LayerShape;
use super::parse::malformed;
use crate::error::KvError;
use crate::frame::Reader;

/// Bytes of a recurrent section's fixed fields for one cell: `cell_count`, the cell's `pos` and
/// `n_seq_id`, `s_trans`, `n_layer`.
const FIXED_LEN: u64 = 4 + 8 + 8;
/// Bytes of one layer entry's own header: `i32` type and `u64` row size.
const ENTRY_HEAD: u64 = 12;
/// `ggml_type` id of F32, the only type llama.cpp keeps recurrent states in.
const GGML_F32: i32 = 0;

/// The recurrent state's shape: its layer count field and each recurrent layer's R and S rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecurrentShape {
    /// The `n_layer` field: every layer of the model, attention layers included.
    pub n_layer: u32,
    /// Per recurrent layer, its convolution ("R") state row.
    pub r: Vec<LayerShape>,
    /// Per recurrent layer, its SSM ("S") state row (row size 0 for models without one, LFM2).
    pub s: Vec<LayerShape>,
}

/// A recurrent section as parsed.
#[derive(Debug, Clone)]
pub(crate) struct RecurrentSection {
    /// Its bytes in the state (always the state's end).
    pub span: Range<usize>,
    /// The position of the last token the state absorbed (`None` for an empty sequence).
    pub pos: Option<i32>,
    pub shape: RecurrentShape,
}

impl RecurrentShape {
    /// Bytes of this section holding one sequence's state (one cell).
    pub fn section_len(&self) -> Result<u64, KvError> {
        self.r
            .iter()
            .chain(&self.s)
            .try_fold(FIXED_LEN, |sum, l| {
                sum.checked_add(ENTRY_HEAD)?.checked_add(l.row_size)
            })
            .ok_or_else(|| malformed("recurrent state size overflows"))
    }

    /// Whether `other` (parsed from a state) has this context's layer count and rows.
    pub(crate) fn same(&self, other: &RecurrentShape) -> Result<(), KvError> {
        if self == other {
            return Ok(());
        }
        Err(KvError::ShapeMismatch(format!(
            "recurrent state: state has {} of {} layers with R {:?} and S {:?}, context has {} of \
             {} with R {:?} and S {:?}",
            other.r.len(),
            other.n_layer,
            other.r.first(),
            other.s.first(),
            self.r.len(),
            self.n_layer,
            self.r.first(),
            self.s.first(),
        )))
    }

    /// Writes the shape for a receiver: `u32 n_layer`, `u32` recurrent layers, then each R entry's
    /// and each S entry's `i32 type, u64 row_size`.
    pub(crate) fn write_skeleton(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.n_layer.to_le_bytes());
        out.extend_from_slice(&(self.r.len() as u32).to_le_bytes());
        for l in self.r.iter().chain(&self.s) {
            out.extend_from_slice(&l.type_id.to_le_bytes());
            out.extend_from_slice(&l.row_size.to_le_bytes());
        }
    }

    /// Reads what [`Self::write_skeleton`] wrote, refusing more than `max_layers` layers, more
    /// recurrent layers than layers, and a section size that overflows.
    pub(crate) fn read_skeleton(r: &mut Reader<'_>, max_layers: u32) -> Result<Self, KvError> {
        let n_layer = r.u32()?;
        let n_recurrent = r.u32()?;
        if n_layer > max_layers || n_recurrent == 0 || n_recurrent > n_layer {
            return Err(malformed(format!(
                "{n_recurrent} recurrent layers of {n_layer}"
            )));
        }
        let mut entries = Vec::with_capacity(2 * n_recurrent as usize);
        for _ in 0..2 * n_recurrent {
            entries.push(LayerShape {
                type_id: r.i32()?,
                row_size: r.u64()?,
            });
        }
        let s = entries.split_off(n_recurrent as usize);
        let shape = RecurrentShape {
            n_layer,
            r: entries,
            s,
        };
        shape.section_len()?;
        Ok(shape)
    }
}

/// Reads a recurrent section that runs to the end of the state: at most one cell, with no
/// sequence ids, `s_trans` 0, then an even number of layer entries (R for each recurrent layer,
/// then S for each), no more than twice `n_layer`.
pub(crate) fn parse_recurrent(r: &mut Reader<'_>) -> Result<RecurrentSection, KvError> {
    let start = r.pos();
    let cell_count = r.u32()?;
    let pos = match cell_count {
        0 => None,
        1 => {
            let pos = r.i32()?;
            let n_seq_id = r.u32()?;
            if pos < 0 || n_seq_id != 0 {
                return Err(malformed(format!(
                    "recurrent cell at position {pos} with {n_seq_id} sequence ids (expected 0)"
                )));
            }
            Some(pos)
        }
        n => {
            return Err(malformed(format!(
                "{n} cells in a recurrent state (a sequence has one)"
            )));
        }
    };
    let s_trans = r.u32()?;
    if s_trans != 0 {
        return Err(malformed(format!("recurrent s_trans {s_trans}")));
    }
    let n_layer = r.u32()?;
    let mut entries = Vec::new();
    while r.remaining() > 0 {
        if entries.len() >= 2 * n_layer as usize {
            return Err(malformed(format!(
                "more than twice {n_layer} recurrent layer entries"
            )));
        }
        let type_id = r.i32()?;
        let row_size = r.u64()?;
        // llama.cpp keeps recurrent states in F32 (4-byte elements). Anything else here is another
        // layout (an indexer cache, rows of another kind) read as entries: refused, not guessed.
        if type_id != GGML_F32 || row_size % 4 != 0 {
            return Err(malformed(format!(
                "a recurrent state entry of type {type_id} with {row_size}-byte rows (F32 expected)"
            )));
        }
        let bytes = row_size
            .checked_mul(u64::from(cell_count))
            .ok_or_else(|| malformed("row size overflows"))?;
        r.skip(bytes)?;
        entries.push(LayerShape { type_id, row_size });
    }
    if entries.is_empty() || entries.len() % 2 != 0 {
        return Err(malformed(format!(
            "{} recurrent layer entries (R and S for each layer)",
            entries.len()
        )));
    }
    let s = entries.split_off(entries.len() / 2);
    Ok(RecurrentSection {
        span: start..r.pos(),
        pos,
        shape: RecurrentShape {
            n_layer,
            r: entries,
            s,
        },
    })
}
