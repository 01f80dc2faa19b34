//! The sending side: a header frame, then chunk frames for the cells of the sequence as they become
//! available (a streamed hand-off sends them while the prompt still runs), then an end frame.

use xxhash_rust::xxh3::xxh3_64;

use super::{CHUNK_HEADER_LEN, CHUNK_MAGIC, END_FRAME_LEN, END_MAGIC, KvHeader, Part};
use crate::codec::Codec;
use crate::error::KvError;
use crate::state::{Caches, malformed, parse_single};

/// Every frame of one transfer: the header frame, the chunk frames in order, the end frame.
pub type TransferFrames = (Vec<u8>, Vec<Vec<u8>>, Vec<u8>);

/// Turns a sequence's cells into chunk frames as they become available.
///
/// Feed it exports of the sequence as the prompt runs ([`Self::next_frame`] with the cells each
/// holds, which only grow); it sends each cell once, in whole cells per chunk, every chunk
/// compressed on its own. [`Self::end_frame`] closes the transfer with the checksum of the final
/// state. Nothing needs the whole encoded size up front. After the full cache's cells come the
/// parts that change until the prompt ends, cut from the final export: a hybrid model's recurrent
/// section (its bytes in chunks of at most `chunk_size`), then an iSWA model's sliding-window
/// cells (in chunks of whole window cells).
pub struct KvEncoder {
    header: KvHeader,
    tag: u64,
    per_cell: usize,
    cells_per_chunk: usize,
    sent_cells: usize,
    /// The final export taken apart, once the full cache's cells are all sent.
    tail: Option<Tail>,
    window_sent: usize,
    recurrent_sent: usize,
    /// Bytes of one window cell in a segment (0 without a window).
    window_per_cell: usize,
    next_index: u32,
    raw_bytes: u64,
    wire_bytes: u64,
}

impl KvEncoder {
    /// An encoder for the transfer `header` describes (its `chunk_size` raised to one cell if a
    /// cell is larger: a cell always travels whole).
    pub fn new(mut header: KvHeader) -> Result<Self, KvError> {
        let per_cell = usize::try_from(header.shape.segment_bytes_per_cell()?)
            .map_err(|_| KvError::MalformedState("cell size does not fit in memory".into()))?;
        if header.chunk_size == 0 || per_cell == 0 {
            return Err(KvError::InvalidField {
                field: "chunk_size",
                detail: "zero".into(),
            });
        }
        let window_per_cell = match &header.shape.window {
            Some(w) => usize::try_from(w.segment_bytes_per_cell()?)
                .map_err(|_| malformed("cell size does not fit in memory"))?,
            None => 0,
        };
        let cells_per_chunk = (header.chunk_size as usize / per_cell).max(1);
        header.chunk_size = header
            .chunk_size
            .max(u32::try_from(per_cell.max(window_per_cell)).unwrap_or(u32::MAX));
        let tag = header.transfer_tag();
        Ok(KvEncoder {
            header,
            tag,
            per_cell,
            cells_per_chunk,
            sent_cells: 0,
            tail: None,
            window_sent: 0,
            recurrent_sent: 0,
            window_per_cell,
            next_index: 0,
            raw_bytes: 0,
            wire_bytes: 0,
        })
    }

    /// The header this encoder describes.
    pub fn header(&self) -> &KvHeader {
        &self.header
    }

    /// The header frame's bytes.
    pub fn header_frame(&self) -> Vec<u8> {
        self.header.encode()
    }

    /// Cells sent so far.
    pub fn cells_sent(&self) -> usize {
        self.sent_cells
    }

    /// Raw and encoded payload bytes sent so far.
    pub fn bytes_sent(&self) -> (u64, u64) {
        (self.raw_bytes, self.wire_bytes)
    }

    /// The next chunk frame from `state`, an export of the sequence holding its first `cells`
    /// cells (single-stream form); `None` once every one of those cells has been sent. Call it
    /// again with a later export for the cells that follow. With the final export (all the
    /// header's tokens) it goes on to a hybrid model's recurrent section and an iSWA model's
    /// window cells.
    pub fn next_frame(&mut self, state: &[u8], cells: usize) -> Result<Option<Vec<u8>>, KvError> {
        // A purely recurrent model's state has no cells: everything travels from the final export.
        let with_cells = self.header.shape.cells_for(cells);
        if let Some(range) = self.next_range(0, with_cells)? {
            let raw = self.header.shape.cut(state, range)?;
            return Ok(Some(self.frame(&raw, Part::Full)));
        }
        if cells != self.header.tokens.len() {
            return Ok(None);
        }
        if self.tail.is_none() {
            self.tail = Some(Tail::of(&self.header, state)?);
        }
        let Some(tail) = &self.tail else {
            return Ok(None);
        };
        let chunk = self.header.chunk_size as usize;
        if let Some(rec) = &tail.recurrent
            && self.recurrent_sent < rec.len()
        {
            let end = (self.recurrent_sent + chunk).min(rec.len());
            let raw = rec
                .get(self.recurrent_sent..end)
                .unwrap_or_default()
                .to_vec();
            return Ok(Some(self.frame(&raw, Part::Recurrent)));
        }
        let (Some(shape), Some((src, total))) = (self.header.shape.window.as_deref(), &tail.window)
        else {
            return Ok(None);
        };
        if self.window_sent >= *total {
            return Ok(None);
        }
        let per_chunk = (chunk / self.window_per_cell.max(1)).max(1);
        let end = (self.window_sent + per_chunk).min(*total);
        let raw = shape.cut(src, self.window_sent as u32..end as u32)?;
        Ok(Some(self.frame(&raw, Part::Window)))
    }

    /// The next chunk frame from `segment`, the cells `first..` of the sequence cut out already
    /// ([`StateShape::cut`]); `None` once all of them have been sent. The cells before `first`
    /// must have been sent already.
    pub fn next_frame_of_segment(
        &mut self,
        segment: &[u8],
        first: usize,
    ) -> Result<Option<Vec<u8>>, KvError> {
        let cells = first + segment.len() / self.per_cell;
        if self.sent_cells < first {
            return Err(KvError::InvalidField {
                field: "segment",
                detail: format!("starts at cell {first}, {} sent", self.sent_cells),
            });
        }
        let Some(range) = self.next_range(first, cells)? else {
            return Ok(None);
        };
        let raw = self.header.shape.cut_segment(segment, range)?;
        Ok(Some(self.frame(&raw, Part::Full)))
    }

    /// The cells of the next chunk, counted from `offset`, when fewer than `cells` have been sent.
    fn next_range(
        &self,
        offset: usize,
        cells: usize,
    ) -> Result<Option<std::ops::Range<u32>>, KvError> {
        if cells > self.header.tokens.len() {
            return Err(KvError::InvalidField {
                field: "cells",
                detail: format!(
                    "{cells} cells for a transfer of {}",
                    self.header.tokens.len()
                ),
            });
        }
        if self.sent_cells >= cells {
            return Ok(None);
        }
        let end = (self.sent_cells + self.cells_per_chunk).min(cells);
        Ok(Some(
            (self.sent_cells - offset) as u32..(end - offset) as u32,
        ))
    }

    /// Frames the next bytes of `part` (whole cells of a cache, or recurrent section bytes),
    /// compressed with the transfer's codec.
    fn frame(&mut self, raw: &[u8], part: Part) -> Vec<u8> {
        let frame = match self.header.codec {
            Codec::None => chunk_frame(self.next_index, self.tag, raw, raw),
            codec => {
                let mut enc = Vec::new();
                codec.encode_into(raw, &mut enc);
                chunk_frame(self.next_index, self.tag, raw, &enc)
            }
        };
        self.raw_bytes += raw.len() as u64;
        self.wire_bytes += (frame.len() - CHUNK_HEADER_LEN) as u64;
        match part {
            Part::Full => self.sent_cells += raw.len() / self.per_cell,
            Part::Window => self.window_sent += raw.len() / self.window_per_cell.max(1),
            Part::Recurrent => self.recurrent_sent += raw.len(),
        }
        self.next_index += 1;
        frame
    }

    /// The end frame, once every cell has been sent: the chunk count, the window cells sent, and
    /// the xxh3-64 of `final_state`, the sequence's export holding all of them, which the
    /// receiver's joined state must equal.
    pub fn end_frame(&self, final_state: &[u8]) -> Result<Vec<u8>, KvError> {
        let n = self.header.shape.cells_for(self.header.tokens.len());
        let tail = self.tail.as_ref();
        let window_total = tail.and_then(|t| t.window.as_ref()).map_or(0, |(_, n)| *n);
        let window_due =
            self.header.shape.window.is_some() && self.window_sent != window_total.max(1);
        let recurrent_total = tail.and_then(|t| t.recurrent.as_ref()).map_or(0, Vec::len);
        let recurrent_due = self.header.shape.recurrent.is_some()
            && (recurrent_total == 0 || self.recurrent_sent != recurrent_total);
        if self.sent_cells != n || window_due || recurrent_due {
            return Err(KvError::Incomplete {
                received: (self.sent_cells + self.window_sent) as u32,
                declared: (n + window_total.max(1)) as u32,
            });
        }
        let mut b = Vec::with_capacity(END_FRAME_LEN);
        b.extend_from_slice(END_MAGIC);
        b.extend_from_slice(&self.tag.to_le_bytes());
        b.extend_from_slice(&self.next_index.to_le_bytes());
        b.extend_from_slice(&(n as u32).to_le_bytes());
        b.extend_from_slice(&(self.window_sent as u32).to_le_bytes());
        b.extend_from_slice(&xxh3_64(final_state).to_le_bytes());
        let sum = xxh3_64(&b);
        b.extend_from_slice(&sum.to_le_bytes());
        Ok(b)
    }

    /// Every frame of a transfer whose whole state is at hand: header, chunks, end.
    pub fn whole(header: KvHeader, state: &[u8]) -> Result<TransferFrames, KvError> {
        let n = header.tokens.len();
        let mut enc = KvEncoder::new(header)?;
        let mut chunks = Vec::new();
        while let Some(f) = enc.next_frame(state, n)? {
            chunks.push(f);
        }
        let end = enc.end_frame(state)?;
        Ok((enc.header_frame(), chunks, end))
    }
}

/// The parts of the final export that travel after the full cache's cells.
struct Tail {
    /// The window cache as a state of its own, and its cells (iSWA only).
    window: Option<(Vec<u8>, usize)>,
    /// The recurrent section's bytes (hybrid only).
    recurrent: Option<Vec<u8>>,
}

impl Tail {
    /// Takes apart `final_state` (an export of all the header's tokens), refusing one that lacks
    /// a part the header's shape has.
    fn of(header: &KvHeader, final_state: &[u8]) -> Result<Self, KvError> {
        let shape = &header.shape;
        let caches = Caches::split(final_state, shape.form())?;
        let window = match (shape.window.as_deref(), caches.window) {
            (Some(w), Some(state)) => {
                let (info, _) = parse_single(&state, w.form())?;
                Some((state, info.cell_count as usize))
            }
            (Some(_), None) => return Err(malformed("the state has no window cache")),
            (None, _) => None,
        };
        let due = usize::try_from(shape.recurrent_len()?).unwrap_or(usize::MAX);
        let has = caches.recurrent.as_ref().map_or(0, Vec::len);
        if has != due {
            return Err(malformed(format!(
                "the final export's recurrent state is {has} bytes, the header's shape {due}"
            )));
        }
        Ok(Tail {
            window,
            recurrent: caches.recurrent,
        })
    }
}

/// One chunk frame: fixed 32-byte head (raw length from `raw`), then the encoded `payload`.
fn chunk_frame(index: u32, tag: u64, raw: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(CHUNK_HEADER_LEN + payload.len());
    frame.extend_from_slice(CHUNK_MAGIC);
    frame.extend_from_slice(&index.to_le_bytes());
    frame.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&tag.to_le_bytes());
    frame.extend_from_slice(&xxh3_64(payload).to_le_bytes());
    frame.extend_from_slice(payload);
    frame
}
