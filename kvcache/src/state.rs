//! The llama.cpp sequence-state layout: parsing, checking against a context's cache shape, re-framing.
//!
//! `llama_state_seq_get_data_ext` writes: `u32 magic 0xaf143cd8`, `i32 source seq id`, `u32 n_stream`,
//! then per stream `u32 cell_count` and, when non-zero, the cells (`i32 pos`, `u32 n_seq_id`, an
//! optional cell extension record, `n_seq_id x i32 seq id`), `u32 v_trans`, `u32 n_layer`,
//! `u32 n_rot_k`, `u32 n_rot_v`, per layer `i32 k_type, u64 k_row_size, cell_count rows`, then V per
//! layer (`i32 v_type, u64 v_row_size, rows`, or when transposed `i32 v_type, u32 v_elem_size,
//! u32 n_embd_v_gqa, n_embd_v_gqa runs of cell_count elements`). llama.cpp aborts on some malformed
//! states, so every field is checked here first.

use crate::error::KvError;
use crate::frame::Reader;

const STATE_MAGIC: u32 = 0xaf14_3cd8;
/// Offset of `n_stream` in a state.
const N_STREAM_OFFSET: usize = 8;
/// Cell extension record sizes llama.cpp may write (none, or x, y, tok for M-RoPE models).
const CELL_EXT_CANDIDATES: [u32; 2] = [0, 12];

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
}

/// What parsing a sequence state found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqStateInfo {
    /// Streams in the state.
    pub n_stream: u32,
    /// The one stream holding cells (0 when the state is empty).
    pub stream: u32,
    /// Cells (tokens) in the state.
    pub cell_count: u32,
    /// Byte range from that stream's `cell_count` field to the end of its data.
    pub body: std::ops::Range<usize>,
}

struct Parsed {
    info: SeqStateInfo,
    shape: Option<StateShape>,
}

impl StateShape {
    /// Learns a context's cache shape from a state that context exported (any number of cells).
    pub fn calibrate(state: &[u8]) -> Result<Self, KvError> {
        let mut last = KvError::MalformedState("no candidate cell layout".into());
        for ext in CELL_EXT_CANDIDATES {
            match parse(state, ext) {
                Ok(Parsed {
                    shape: Some(shape), ..
                }) => return Ok(shape),
                Ok(Parsed { shape: None, .. }) => {
                    return Err(KvError::MalformedState(
                        "calibration state holds no cells".into(),
                    ));
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Bytes one cached token takes in this shape (K and V over all layers).
    pub fn bytes_per_token(&self) -> u64 {
        let k: u64 = self.k.iter().map(|l| l.row_size).sum();
        let v: u64 = self.v.iter().filter_map(VShape::bytes_per_cell).sum();
        k + v
    }

    /// Checks a single-stream state (as carried on the wire) against this shape: same layers, types
    /// and row sizes, exactly `n_tokens` cells at positions `0..n_tokens`, nothing left over.
    pub fn check(&self, state: &[u8], n_tokens: usize) -> Result<SeqStateInfo, KvError> {
        let parsed = parse(state, self.cell_ext_len)?;
        let info = parsed.info;
        if info.n_stream != 1 {
            return Err(KvError::MalformedState(format!(
                "{} streams, the wire form has 1",
                info.n_stream
            )));
        }
        if info.cell_count as usize != n_tokens {
            return Err(KvError::MalformedState(format!(
                "{} cells for {n_tokens} tokens",
                info.cell_count
            )));
        }
        let Some(shape) = parsed.shape else {
            return Err(KvError::MalformedState("state holds no cells".into()));
        };
        self.same_cache(&shape)?;
        Ok(info)
    }

    /// Whether `other` (parsed from a state) has this cache's layers, types, row sizes, rotation
    /// dims and V transposition; the stream count may differ.
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

    /// Rewrites a checked single-stream state in place so this context can import it: `n_stream` set
    /// to the context's stream count and the other streams appended empty. llama.cpp puts the cells
    /// of the non-empty stream into the destination sequence's own stream.
    pub fn reframe_for_import(&self, state: &mut Vec<u8>) -> Result<(), KvError> {
        let extra = self
            .n_stream
            .checked_sub(1)
            .ok_or_else(|| KvError::ShapeMismatch("zero streams".into()))?;
        write_n_stream(state, self.n_stream)?;
        state.resize(state.len() + 4 * extra as usize, 0);
        Ok(())
    }
}

/// Turns an exported state into the single-stream wire form: the stream holding the cells, and
/// `n_stream = 1`. Works in place; only a state whose cells are not in stream 0 moves bytes.
pub fn to_single_stream(mut state: Vec<u8>) -> Result<(Vec<u8>, SeqStateInfo), KvError> {
    let info = parse_any(&state)?.info;
    let head = N_STREAM_OFFSET + 4;
    state.truncate(info.body.end);
    if info.body.start > head {
        state.drain(head..info.body.start);
    }
    write_n_stream(&mut state, 1)?;
    let len = state.len();
    let info = SeqStateInfo {
        n_stream: 1,
        stream: 0,
        body: head..len,
        ..info
    };
    Ok((state, info))
}

fn write_n_stream(state: &mut [u8], n: u32) -> Result<(), KvError> {
    let field = state
        .get_mut(N_STREAM_OFFSET..N_STREAM_OFFSET + 4)
        .ok_or(KvError::Truncated {
            what: "KV state",
            need: 12,
            have: 0,
        })?;
    field.copy_from_slice(&n.to_le_bytes());
    Ok(())
}

/// Parses a single-stream state with cells (the wire form): what it holds and its cache shape.
pub(crate) fn parse_single(
    state: &[u8],
    cell_ext_len: u32,
) -> Result<(SeqStateInfo, StateShape), KvError> {
    let parsed = parse(state, cell_ext_len)?;
    if parsed.info.n_stream != 1 {
        return Err(malformed(format!(
            "{} streams, the wire form has 1",
            parsed.info.n_stream
        )));
    }
    let shape = parsed
        .shape
        .ok_or_else(|| malformed("state holds no cells"))?;
    Ok((parsed.info, shape))
}

fn parse_any(state: &[u8]) -> Result<Parsed, KvError> {
    let mut last = KvError::MalformedState("no candidate cell layout".into());
    for ext in CELL_EXT_CANDIDATES {
        match parse(state, ext) {
            Ok(p) => return Ok(p),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn malformed(msg: impl Into<String>) -> KvError {
    KvError::MalformedState(msg.into())
}

fn parse(state: &[u8], cell_ext_len: u32) -> Result<Parsed, KvError> {
    let mut r = Reader::new(state, "KV state");
    if r.u32()? != STATE_MAGIC {
        return Err(KvError::BadMagic { what: "KV state" });
    }
    let _source_seq = r.i32()?;
    let n_stream = r.u32()?;
    if n_stream == 0 {
        return Err(malformed("zero streams"));
    }
    let mut found: Option<(u32, u32, std::ops::Range<usize>, StateShape)> = None;
    for s in 0..n_stream {
        let start = r.pos();
        let cell_count = r.u32()?;
        if cell_count == 0 {
            continue;
        }
        if found.is_some() {
            return Err(malformed("cells in more than one stream"));
        }
        let shape = parse_stream(&mut r, cell_count, cell_ext_len, n_stream)?;
        found = Some((s, cell_count, start..r.pos(), shape));
    }
    let end = r.pos();
    if end != state.len() {
        return Err(malformed(format!("{} trailing bytes", state.len() - end)));
    }
    Ok(match found {
        Some((stream, cell_count, body, shape)) => Parsed {
            info: SeqStateInfo {
                n_stream,
                stream,
                cell_count,
                body,
            },
            shape: Some(shape),
        },
        None => Parsed {
            info: SeqStateInfo {
                n_stream,
                stream: 0,
                cell_count: 0,
                body: 12..12 + 4,
            },
            shape: None,
        },
    })
}

/// Parses one stream's cells and layers (its `cell_count` already read and non-zero) and returns the
/// cache shape they show.
fn parse_stream(
    r: &mut Reader<'_>,
    cell_count: u32,
    ext_len: u32,
    n_stream: u32,
) -> Result<StateShape, KvError> {
    parse_cells(r, cell_count, ext_len)?;
    let v_trans = read_v_trans(r)?;
    let n_layer = r.u32()?;
    let n_rot_k = r.u32()?;
    let n_rot_v = r.u32()?;
    let cells = u64::from(cell_count);
    let k = parse_k_layers(r, n_layer, cells)?;
    let v = parse_v_layers(r, n_layer, cells, v_trans)?;
    Ok(StateShape {
        n_stream,
        cell_ext_len: ext_len,
        v_trans,
        n_rot_k,
        n_rot_v,
        k,
        v,
    })
}

/// Reads `cell_count` cells, each with exactly one sequence id, whose positions are `0..cell_count`
/// in any order, each once.
fn parse_cells(r: &mut Reader<'_>, cell_count: u32, ext_len: u32) -> Result<(), KvError> {
    let n = cell_count as usize;
    // Every cell takes at least 12 bytes: refuse an absurd count before allocating the position map.
    if (n as u64) * 12 > r.remaining() as u64 {
        return Err(KvError::Truncated {
            what: "KV state cells",
            need: n as u64 * 12,
            have: r.remaining() as u64,
        });
    }
    let mut seen = vec![false; n];
    for _ in 0..n {
        let pos = read_cell(r, ext_len)?;
        let slot = usize::try_from(pos).ok().and_then(|p| seen.get_mut(p));
        match slot {
            Some(s) if !*s => *s = true,
            _ => {
                return Err(malformed(format!(
                    "cell position {pos} is repeated or outside 0..{n}"
                )));
            }
        }
    }
    Ok(())
}

/// Reads one cell and returns its position; refuses a cell in other than exactly one sequence.
fn read_cell(r: &mut Reader<'_>, ext_len: u32) -> Result<i32, KvError> {
    let pos = r.i32()?;
    let n_seq_id = r.u32()?;
    r.skip(u64::from(ext_len))?;
    if n_seq_id != 1 {
        return Err(malformed(format!(
            "cell with {n_seq_id} sequence ids (expected 1)"
        )));
    }
    let _seq = r.i32()?;
    Ok(pos)
}

/// Reads the `v_trans` field, which must be 0 or 1.
fn read_v_trans(r: &mut Reader<'_>) -> Result<bool, KvError> {
    match r.u32()? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(malformed(format!("v_trans {v}"))),
    }
}

/// Reads `n_layer` K layers (type id, row size, then `cells` rows each).
fn parse_k_layers(
    r: &mut Reader<'_>,
    n_layer: u32,
    cells: u64,
) -> Result<Vec<LayerShape>, KvError> {
    let mut k = Vec::new();
    for _ in 0..n_layer {
        let type_id = r.i32()?;
        let row_size = r.u64()?;
        skip_rows(r, row_size, cells)?;
        k.push(LayerShape { type_id, row_size });
    }
    Ok(k)
}

/// Reads `n_layer` V layers: rows like K, or when transposed element size and count, then the runs.
fn parse_v_layers(
    r: &mut Reader<'_>,
    n_layer: u32,
    cells: u64,
    v_trans: bool,
) -> Result<Vec<VShape>, KvError> {
    let mut v = Vec::new();
    for _ in 0..n_layer {
        let type_id = r.i32()?;
        if v_trans {
            let elem_size = r.u32()?;
            let n_embd = r.u32()?;
            skip_rows(r, u64::from(elem_size) * u64::from(n_embd), cells)?;
            v.push(VShape::Transposed {
                type_id,
                elem_size,
                n_embd,
            });
        } else {
            let row_size = r.u64()?;
            skip_rows(r, row_size, cells)?;
            v.push(VShape::Rows(LayerShape { type_id, row_size }));
        }
    }
    Ok(v)
}

/// Skips `cells` rows of `row` bytes each, refusing a total that overflows.
fn skip_rows(r: &mut Reader<'_>, row: u64, cells: u64) -> Result<(), KvError> {
    let bytes = row
        .checked_mul(cells)
        .ok_or_else(|| malformed("row size overflows"))?;
    r.skip(bytes)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a synthetic state: `n_stream` streams, cells in `stream`, positions in `positions`.
    pub(crate) fn synthetic_state(
        n_stream: u32,
        stream: u32,
        positions: &[i32],
        v_trans: bool,
    ) -> Vec<u8> {
        let (n_layer, k_row, v_el, n_embd) = (2u32, 6u64, 2u32, 3u32);
        let mut b = Vec::new();
        b.extend_from_slice(&STATE_MAGIC.to_le_bytes());
        b.extend_from_slice(&0i32.to_le_bytes());
        b.extend_from_slice(&n_stream.to_le_bytes());
        for s in 0..n_stream {
            if s != stream || positions.is_empty() {
                b.extend_from_slice(&0u32.to_le_bytes());
                continue;
            }
            let n = positions.len() as u64;
            b.extend_from_slice(&(positions.len() as u32).to_le_bytes());
            for p in positions {
                b.extend_from_slice(&p.to_le_bytes());
                b.extend_from_slice(&1u32.to_le_bytes());
                b.extend_from_slice(&(s as i32).to_le_bytes());
            }
            b.extend_from_slice(&u32::from(v_trans).to_le_bytes());
            b.extend_from_slice(&n_layer.to_le_bytes());
            b.extend_from_slice(&64u32.to_le_bytes());
            b.extend_from_slice(&64u32.to_le_bytes());
            for l in 0..n_layer {
                b.extend_from_slice(&1i32.to_le_bytes());
                b.extend_from_slice(&k_row.to_le_bytes());
                b.extend((0..k_row * n).map(|i| (i as u8).wrapping_add(l as u8)));
            }
            for _ in 0..n_layer {
                b.extend_from_slice(&1i32.to_le_bytes());
                if v_trans {
                    b.extend_from_slice(&v_el.to_le_bytes());
                    b.extend_from_slice(&n_embd.to_le_bytes());
                } else {
                    b.extend_from_slice(&(u64::from(v_el * n_embd)).to_le_bytes());
                }
                b.extend((0..u64::from(v_el * n_embd) * n).map(|i| i as u8 ^ 0x5a));
            }
        }
        b
    }

    #[test]
    fn a_row_size_near_the_top_of_u64_is_refused_not_overflowed() {
        let mut st = synthetic_state(1, 0, &[0], false);
        // The first K layer's row size sits after the 28-byte cell header, v_trans, n_layer, the
        // two 64-bit widths (44 bytes) and the layer's type (4 bytes).
        st[48..56].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
        let refused = StateShape::calibrate(&st);
        assert!(refused.is_err(), "{refused:?}");
        assert!(to_single_stream(st).is_err());
    }

    #[test]
    fn calibrates_and_checks_its_own_state() {
        for v_trans in [false, true] {
            let st = synthetic_state(1, 0, &[0, 1, 2], v_trans);
            let shape = StateShape::calibrate(&st).unwrap();
            assert_eq!(shape.k.len(), 2);
            assert_eq!(shape.v_trans, v_trans);
            assert_eq!(shape.bytes_per_token(), 2 * 6 + 2 * 6);
            let info = shape.check(&st, 3).unwrap();
            assert_eq!(info.cell_count, 3);
            assert!(matches!(
                shape.check(&st, 4),
                Err(KvError::MalformedState(_))
            ));
        }
    }

    #[test]
    fn single_stream_form_round_trips_through_reframing() {
        let multi = synthetic_state(4, 2, &[1, 0, 2], false);
        let single_ref = synthetic_state(1, 0, &[1, 0, 2], false);
        let (single, info) = to_single_stream(multi.clone()).unwrap();
        assert_eq!(info.cell_count, 3);
        // Seq ids inside the cells differ (2 vs 0) but are ignored by llama.cpp; compare the rest.
        assert_eq!(single.len(), single_ref.len());
        let shape4 = StateShape {
            n_stream: 4,
            ..StateShape::calibrate(&multi).unwrap()
        };
        let mut back = single.clone();
        shape4.check(&back, 3).unwrap();
        shape4.reframe_for_import(&mut back).unwrap();
        assert_eq!(back.len(), multi.len());
        let parsed = parse(&back, 0).unwrap();
        assert_eq!((parsed.info.n_stream, parsed.info.stream), (4, 0));
    }

    #[test]
    fn refuses_layout_and_position_faults() {
        let shape = StateShape::calibrate(&synthetic_state(1, 0, &[0, 1], false)).unwrap();
        let trans = synthetic_state(1, 0, &[0, 1], true);
        assert!(matches!(
            shape.check(&trans, 2),
            Err(KvError::ShapeMismatch(_))
        ));
        let dup = synthetic_state(1, 0, &[0, 0], false);
        assert!(matches!(
            shape.check(&dup, 2),
            Err(KvError::MalformedState(_))
        ));
        let gap = synthetic_state(1, 0, &[0, 5], false);
        assert!(matches!(
            shape.check(&gap, 2),
            Err(KvError::MalformedState(_))
        ));
        let mut long = synthetic_state(1, 0, &[0, 1], false);
        long.push(0);
        assert!(matches!(
            shape.check(&long, 2),
            Err(KvError::MalformedState(_))
        ));
        let short = synthetic_state(1, 0, &[0, 1], false);
        assert!(matches!(
            shape.check(&short[..short.len() - 1], 2),
            Err(KvError::Truncated { .. })
        ));
        let mut bad_magic = short.clone();
        bad_magic[0] ^= 1;
        assert!(matches!(
            shape.check(&bad_magic, 2),
            Err(KvError::BadMagic { .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn mutated_states_never_panic(at in 0usize..400, val in proptest::prelude::any::<u8>(), v_trans in proptest::prelude::any::<bool>()) {
            let good = synthetic_state(2, 1, &[0, 1, 2], v_trans);
            let shape = StateShape::calibrate(&synthetic_state(1, 0, &[0], v_trans)).unwrap_or_else(|e| panic!("{e}"));
            let mut bad = good.clone();
            let i = at % bad.len();
            bad[i] = val;
            let _ = StateShape::calibrate(&bad);
            if let Ok((single, _)) = to_single_stream(bad) {
                let _ = shape.check(&single, 3);
                // Translating V to the other layout never panics either, whatever the bytes.
                let other = StateShape { v_trans: !v_trans, ..shape.clone() };
                let _ = other.match_v_layout(single);
            }
        }
    }
}
