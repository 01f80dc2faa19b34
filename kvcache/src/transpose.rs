//! V layout translation between the two ways llama.cpp stores V.
//!
//! With flash attention on, each V layer is one row per cell (`i32 type, u64 row_size, rows`). With
//! it off, V is stored transposed (`i32 type, u32 elem_size, u32 n_embd`, then `n_embd` runs of one
//! element per cell). A prefill node and a decode node that differ in flash attention exchange
//! caches by transposing V, element by element, on the receiver before import. Only V types whose
//! elements have a fixed size (f32, f16, bf16) can be stored transposed, so only those translate;
//! llama.cpp itself needs flash attention for quantized V.

use crate::error::KvError;
use crate::layout::KvType;
use crate::state::{Caches, StateShape, VShape, parse_single};

/// Bytes of a V layer's header after its type id: `u64 row_size`, or `u32 elem_size, u32 n_embd`.
const V_HEADER: u64 = 8;
/// Bytes of a K layer's header: `i32 type, u64 row_size`.
const K_HEADER: u64 = 12;
/// The fields between the cells and the first K layer: `u32 v_trans, u32 n_layer, u32 n_rot_k,
/// u32 n_rot_v`.
const LAYERS_HEADER: u64 = 16;

/// Bytes per element of a V type that can be stored transposed.
pub fn transposable_elem_size(type_id: i32) -> Option<u32> {
    let t = u32::try_from(type_id)
        .ok()
        .and_then(|id| KvType::from_ggml_id(id).ok())?;
    match t {
        KvType::F32 => Some(4),
        KvType::F16 | KvType::Bf16 => Some(2),
        _ => None,
    }
}

fn malformed(msg: impl Into<String>) -> KvError {
    KvError::MalformedState(msg.into())
}

fn to_usize(v: u64) -> Result<usize, KvError> {
    usize::try_from(v).map_err(|_| malformed("size does not fit in memory"))
}

impl StateShape {
    /// Rewrites a single-stream state (the wire form) so its V layers are stored the way this
    /// context stores them (`self.v_trans`); K, the cells and everything else are copied as they
    /// are. A state already stored this way, or with other V types than this context's, is returned
    /// unchanged (`check` then says what does not match). Refused with a typed error: a malformed
    /// state, or a V type that cannot be stored transposed.
    /// An iSWA state's two caches are translated each on its own; a hybrid state's recurrent
    /// section has no V and stays as it is.
    pub fn match_v_layout(&self, state: Vec<u8>) -> Result<Vec<u8>, KvError> {
        if !self.has_attention() {
            return Ok(state);
        }
        if self.window.is_none() && self.recurrent.is_none() {
            return self.match_cache_v_layout(state);
        }
        let mut caches = Caches::split(&state, self.form())?;
        caches.full = self.match_cache_v_layout(caches.full)?;
        if let (Some(shape), Some(w)) = (&self.window, caches.window.take()) {
            caches.window = Some(shape.match_cache_v_layout(w)?);
        }
        Ok(caches.join())
    }

    /// [`Self::match_v_layout`] for a state of one cache.
    fn match_cache_v_layout(&self, state: Vec<u8>) -> Result<Vec<u8>, KvError> {
        let (info, shape) = parse_single(&state, self.cache_form())?;
        // Only a state that differs in V storage alone is rewritten; any other difference is left
        // for `check` to report as the mismatch it is.
        let type_of = |v: &VShape| match *v {
            VShape::Rows(l) => l.type_id,
            VShape::Transposed { type_id, .. } => type_id,
        };
        let same_types = shape.v.len() == self.v.len()
            && shape
                .v
                .iter()
                .zip(&self.v)
                .all(|(a, b)| type_of(a) == type_of(b));
        // A window this context lacks is a mismatch for `check` too.
        if shape.v_trans == self.v_trans || !same_types || shape.window.is_some() {
            return Ok(state);
        }
        let cells = u64::from(info.cell_count);
        let layer_bytes = |header: u64, per_cell: Option<u64>| {
            per_cell
                .and_then(|b| b.checked_mul(cells))
                .and_then(|b| b.checked_add(header))
                .ok_or_else(|| malformed("layer size overflows"))
        };
        let mut v_bytes = 0u64;
        for v in &shape.v {
            v_bytes += layer_bytes(4 + V_HEADER, v.bytes_per_cell())?;
        }
        let mut k_bytes = 0u64;
        for k in &shape.k {
            k_bytes += layer_bytes(K_HEADER, Some(k.row_size))?;
        }
        let end = state.len() as u64;
        let v_start = end
            .checked_sub(v_bytes)
            .ok_or_else(|| malformed("V layers"))?;
        let k_start = v_start
            .checked_sub(k_bytes)
            .ok_or_else(|| malformed("K layers"))?;
        let flag_at = to_usize(
            k_start
                .checked_sub(LAYERS_HEADER)
                .ok_or_else(|| malformed("layers header"))?,
        )?;
        let v_start = to_usize(v_start)?;
        let (head, layers) = state
            .get(..flag_at)
            .zip(state.get(flag_at + 4..v_start))
            .ok_or_else(|| malformed("layer sizes do not add up"))?;
        let mut out = Vec::with_capacity(state.len());
        out.extend_from_slice(head);
        out.extend_from_slice(&u32::from(self.v_trans).to_le_bytes());
        out.extend_from_slice(layers);
        let mut at = v_start;
        for v in &shape.v {
            at = transpose_layer(&state, at, *v, to_usize(cells)?, &mut out)?;
        }
        Ok(out)
    }
}

/// Writes the V layer that starts at `at` in `state` in the other storage; returns where the next
/// layer starts.
fn transpose_layer(
    state: &[u8],
    at: usize,
    v: VShape,
    cells: usize,
    out: &mut Vec<u8>,
) -> Result<usize, KvError> {
    let (type_id, elem, n_embd) = match v {
        VShape::Rows(l) => {
            let elem = transposable_elem_size(l.type_id).ok_or_else(|| {
                malformed(format!("V type {} cannot be stored transposed", l.type_id))
            })?;
            if l.row_size % u64::from(elem) != 0 {
                return Err(malformed("V row size is not a whole number of elements"));
            }
            (
                l.type_id,
                elem as usize,
                to_usize(l.row_size / u64::from(elem))?,
            )
        }
        VShape::Transposed {
            type_id,
            elem_size,
            n_embd,
        } => (type_id, elem_size as usize, n_embd as usize),
    };
    let row = elem
        .checked_mul(n_embd)
        .ok_or_else(|| malformed("V row size overflows"))?;
    let data_start = at + 4 + V_HEADER as usize;
    let len = row
        .checked_mul(cells)
        .ok_or_else(|| malformed("V layer size overflows"))?;
    let data = state
        .get(data_start..data_start + len)
        .ok_or_else(|| malformed("V layer is cut short"))?;
    out.extend_from_slice(&type_id.to_le_bytes());
    match v {
        // Rows (cell-major) to runs (element-major).
        VShape::Rows(_) => {
            out.extend_from_slice(&(elem as u32).to_le_bytes());
            out.extend_from_slice(&(n_embd as u32).to_le_bytes());
            for j in 0..n_embd {
                for c in 0..cells {
                    let from = c * row + j * elem;
                    out.extend_from_slice(&data[from..from + elem]);
                }
            }
        }
        // Runs (element-major) to rows (cell-major).
        VShape::Transposed { .. } => {
            out.extend_from_slice(&(row as u64).to_le_bytes());
            for c in 0..cells {
                for j in 0..n_embd {
                    let from = (j * cells + c) * elem;
                    out.extend_from_slice(&data[from..from + elem]);
                }
            }
        }
    }
    Ok(data_start + len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::synthetic_state;

    fn shape(v_trans: bool) -> StateShape {
        StateShape::calibrate(&synthetic_state(1, 0, &[0], v_trans)).unwrap()
    }

    #[test]
    fn rows_and_runs_round_trip_and_move_every_element() {
        let rows = synthetic_state(1, 0, &[0, 1, 2], false);
        let runs = shape(true).match_v_layout(rows.clone()).unwrap();
        assert_eq!(runs.len(), rows.len());
        // The translated state is what a flash-attention-off context expects.
        shape(true).check(&runs, 3).unwrap();
        assert!(shape(false).check(&runs, 3).is_err());
        let back = shape(false).match_v_layout(runs.clone()).unwrap();
        assert_eq!(back, rows);
        // Already in the receiver's layout: unchanged.
        assert_eq!(shape(false).match_v_layout(rows.clone()).unwrap(), rows);
    }

    #[test]
    fn elements_land_where_the_other_layout_reads_them() {
        // synthetic_state: 2 layers, V of 3 elements of 2 bytes per cell; with 3 cells each V
        // layer holds 18 bytes, byte i = i ^ 0x5a, at the end of the state.
        let rows = synthetic_state(1, 0, &[0, 1, 2], false);
        let runs = shape(true).match_v_layout(rows.clone()).unwrap();
        let layer = |s: &[u8], l: usize| {
            let start = s.len() - (2 - l) * (12 + 18) + 12;
            s[start..start + 18].to_vec()
        };
        for l in 0..2 {
            let (r, t) = (layer(&rows, l), layer(&runs, l));
            for c in 0..3 {
                for j in 0..3 {
                    let in_rows = &r[(c * 3 + j) * 2..(c * 3 + j) * 2 + 2];
                    let in_runs = &t[(j * 3 + c) * 2..(j * 3 + c) * 2 + 2];
                    assert_eq!(in_rows, in_runs, "layer {l} cell {c} element {j}");
                }
            }
        }
    }

    #[test]
    fn quantized_v_and_malformed_states_are_refused() {
        // Both V layers q8_0 (ggml type 8), at a receiver that stores q8_0 V transposed.
        let mut rows = synthetic_state(1, 0, &[0, 1], false);
        let len = rows.len();
        for at in [len - 2 * 24, len - 24] {
            rows[at..at + 4].copy_from_slice(&8i32.to_le_bytes());
        }
        let mut q8 = shape(true);
        for v in &mut q8.v {
            if let VShape::Transposed { type_id, .. } = v {
                *type_id = 8;
            }
        }
        let refused = q8.match_v_layout(rows.clone());
        assert!(
            matches!(refused, Err(KvError::MalformedState(_))),
            "{refused:?}"
        );
        // Other V types than the receiver's: left for `check`, which names the mismatch.
        assert_eq!(shape(true).match_v_layout(rows.clone()).unwrap(), rows);
        assert!(matches!(
            shape(true).check(&rows, 2),
            Err(KvError::ShapeMismatch(_))
        ));
        let cut = synthetic_state(1, 0, &[0, 1], false);
        assert!(
            shape(true)
                .match_v_layout(cut[..cut.len() - 1].to_vec())
                .is_err()
        );
    }
}
