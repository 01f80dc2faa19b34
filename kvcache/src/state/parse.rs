//! The byte parser behind [`super::StateShape`]: a state's head, then one cache section, or two for
//! an iSWA model (the full-attention cache, then the sliding-window cache), and for a hybrid model
//! the recurrent section last ([`super::recurrent`]); a purely recurrent model's state is the head
//! and the recurrent section alone. Each is checked field by field before anything trusts it.
//!
//! A section is `u32 n_stream`, then per stream `u32 cell_count` and, when non-zero, the stream's
//! cells and layers. A sequence's cells sit in one stream of a section. The full cache holds the
//! positions `0..n`; the window cache only the last positions still inside the window, so a
//! section's positions are checked to be distinct and contiguous from their lowest, and the caller
//! checks where they start.

use std::ops::Range;

use super::recurrent::{RecurrentSection, parse_recurrent};
use super::{LayerShape, StateShape, VShape};
use crate::error::KvError;
use crate::frame::Reader;

const STATE_MAGIC: u32 = 0xaf14_3cd8;
/// Bytes of a state's head: magic and source sequence id.
pub(crate) const HEAD_LEN: usize = 8;

pub(crate) fn malformed(msg: impl Into<String>) -> KvError {
    KvError::MalformedState(msg.into())
}

/// One cache section of a state, as parsed.
#[derive(Debug, Clone)]
pub(crate) struct Section {
    /// Streams in the section.
    pub n_stream: u32,
    /// The one stream holding cells (0 when none does).
    pub stream: u32,
    /// Cells in that stream.
    pub cell_count: u32,
    /// The lowest cell position (0 when there are no cells).
    pub first_pos: i32,
    /// Bytes of the whole section, from its `n_stream` field.
    pub span: Range<usize>,
    /// Bytes of the cell-holding stream, from its `cell_count` field (an empty one when none holds
    /// cells: the first stream's `cell_count`).
    pub body: Range<usize>,
    /// The cache shape its cells show (`None` without cells); its `window` is `None`.
    pub shape: Option<StateShape>,
}

/// What a state's bytes hold besides the cells themselves: the cell extension record's length,
/// whether attention cache sections open the state (all but purely recurrent models), and whether
/// a recurrent section ends it (hybrid and recurrent models).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Form {
    pub cell_ext_len: u32,
    pub attention: bool,
    pub recurrent: bool,
}

impl Form {
    /// Every form llama.cpp writes, the most common first: attention caches without and with a
    /// cell extension, the same with a recurrent section (hybrid), the recurrent section alone.
    pub(crate) const ALL: [Form; 5] = [
        Form::caches(0, false),
        Form::caches(12, false),
        Form::caches(0, true),
        Form::caches(12, true),
        Form {
            cell_ext_len: 0,
            attention: false,
            recurrent: true,
        },
    ];

    const fn caches(cell_ext_len: u32, recurrent: bool) -> Form {
        Form {
            cell_ext_len,
            attention: true,
            recurrent,
        }
    }
}

/// A parsed state: the full cache (none for a purely recurrent model), for an iSWA model the window
/// cache after it, and for a hybrid or recurrent model the recurrent section at the end.
#[derive(Debug, Clone)]
pub(crate) struct Parsed {
    pub full: Option<Section>,
    pub window: Option<Section>,
    pub recurrent: Option<RecurrentSection>,
}

impl Parsed {
    /// The sections in state order: the full cache, then the window cache if any.
    pub(crate) fn sections(&self) -> impl DoubleEndedIterator<Item = &Section> {
        self.full.iter().chain(&self.window)
    }

    /// The state's shape (the window's as [`StateShape::window`], the recurrent section's as
    /// [`StateShape::recurrent`]), `None` when a cache section holds no cells. A purely recurrent
    /// state's shape has no K or V layers.
    pub(crate) fn shape(&self) -> Option<StateShape> {
        let Some(full) = &self.full else {
            let rec = self.recurrent.as_ref()?;
            return Some(StateShape::recurrent_only(rec.shape.clone()));
        };
        let mut shape = full.shape.clone()?;
        if let Some(w) = &self.window {
            shape.window = Some(Box::new(w.shape.clone()?));
        }
        shape.recurrent = self.recurrent.as_ref().map(|r| r.shape.clone());
        Some(shape)
    }
}

/// Parses a state of `form`: the head, one or two cache sections, the recurrent section when the
/// form has one, nothing after them.
pub(crate) fn parse(state: &[u8], form: Form) -> Result<Parsed, KvError> {
    let mut r = Reader::new(state, "KV state");
    if r.u32()? != STATE_MAGIC {
        return Err(KvError::BadMagic { what: "KV state" });
    }
    let _source_seq = r.i32()?;
    if !form.attention {
        if !form.recurrent {
            return Err(malformed(
                "a state form with neither caches nor a recurrent section",
            ));
        }
        return Ok(Parsed {
            full: None,
            window: None,
            recurrent: Some(parse_recurrent(&mut r)?),
        });
    }
    let cell_ext_len = form.cell_ext_len;
    let full = Some(parse_section(&mut r, cell_ext_len)?);
    if form.recurrent {
        // The recurrent section is last; an iSWA hybrid's window cache comes before it.
        let mut attempt = r.clone();
        if let Ok(rec) = parse_recurrent(&mut attempt) {
            return Ok(Parsed {
                full,
                window: None,
                recurrent: Some(rec),
            });
        }
        let window = parse_section(&mut r, cell_ext_len)?;
        let rec = parse_recurrent(&mut r)?;
        return Ok(Parsed {
            full,
            window: Some(window),
            recurrent: Some(rec),
        });
    }
    let window = if r.remaining() > 0 {
        let trailing = r.remaining();
        Some(parse_section(&mut r, cell_ext_len).map_err(|e| {
            malformed(format!(
                "{trailing} bytes after the cache that are not a second (sliding-window) cache: {e}"
            ))
        })?)
    } else {
        None
    };
    if r.remaining() > 0 {
        return Err(malformed(format!(
            "{} trailing bytes after two caches",
            r.remaining()
        )));
    }
    Ok(Parsed {
        full,
        window,
        recurrent: None,
    })
}

fn parse_section(r: &mut Reader<'_>, cell_ext_len: u32) -> Result<Section, KvError> {
    let start = r.pos();
    let n_stream = r.u32()?;
    if n_stream == 0 {
        return Err(malformed("zero streams"));
    }
    let mut found: Option<Section> = None;
    let first_body = r.pos()..r.pos() + 4;
    for s in 0..n_stream {
        let body_start = r.pos();
        let cell_count = r.u32()?;
        if cell_count == 0 {
            continue;
        }
        if found.is_some() {
            return Err(malformed("cells in more than one stream"));
        }
        let first_pos = parse_cells(r, cell_count, cell_ext_len)?;
        let shape = parse_layers(r, cell_count, cell_ext_len, n_stream)?;
        found = Some(Section {
            n_stream,
            stream: s,
            cell_count,
            first_pos,
            span: 0..0,
            body: body_start..r.pos(),
            shape: Some(shape),
        });
    }
    let span = start..r.pos();
    Ok(match found {
        Some(s) => Section { span, ..s },
        None => Section {
            n_stream,
            stream: 0,
            cell_count: 0,
            first_pos: 0,
            span,
            body: first_body,
            shape: None,
        },
    })
}

/// Reads one stream's layers (after its cells) and returns the cache shape they show.
fn parse_layers(
    r: &mut Reader<'_>,
    cell_count: u32,
    ext_len: u32,
    n_stream: u32,
) -> Result<StateShape, KvError> {
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
        window: None,
        recurrent: None,
    })
}

/// Reads `cell_count` cells, each with exactly one sequence id, whose positions are distinct and
/// contiguous (any order); returns the lowest.
fn parse_cells(r: &mut Reader<'_>, cell_count: u32, ext_len: u32) -> Result<i32, KvError> {
    let n = cell_count as usize;
    // Every cell takes at least 12 bytes: refuse an absurd count before allocating the position map.
    if (n as u64) * 12 > r.remaining() as u64 {
        return Err(KvError::Truncated {
            what: "KV state cells",
            need: n as u64 * 12,
            have: r.remaining() as u64,
        });
    }
    let mut positions = Vec::with_capacity(n);
    for _ in 0..n {
        positions.push(read_cell(r, ext_len)?);
    }
    let first = positions.iter().copied().min().unwrap_or(0);
    if first < 0 {
        return Err(malformed(format!("cell position {first}")));
    }
    let mut seen = vec![false; n];
    for pos in positions {
        let slot = usize::try_from(i64::from(pos) - i64::from(first))
            .ok()
            .and_then(|p| seen.get_mut(p));
        match slot {
            Some(s) if !*s => *s = true,
            _ => {
                return Err(malformed(format!(
                    "cell position {pos} is repeated or outside {first}..{}",
                    i64::from(first) + n as i64
                )));
            }
        }
    }
    Ok(first)
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
