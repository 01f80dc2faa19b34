//! Frame-level tests: round trips for every codec and chunking, cells sent as they become available,
//! and each bad input refused with its own error; property tests that arbitrary bytes never panic.

use proptest::prelude::*;

use super::*;
use crate::codec::Codec;
use crate::layout::{KvLayout, KvType, ModelFingerprint};
use crate::state::StateShape;
use crate::state::tests::synthetic_state;

fn target() -> ImportTarget {
    ImportTarget {
        fingerprint: ModelFingerprint([7; 32]),
        layout: KvLayout::default(),
    }
}

/// A state of `cells` cells and what a transfer of it says.
fn fixture(cells: usize, v_trans: bool, codec: Codec, chunk: u32) -> (Vec<u8>, KvHeader) {
    let positions: Vec<i32> = (0..cells as i32).collect();
    let state = synthetic_state(1, 0, &positions, v_trans);
    let t = target();
    let spec = KvHeader {
        fingerprint: t.fingerprint,
        layout: t.layout,
        codec,
        chunk_size: chunk,
        source_seq: 0,
        tokens: (0..cells as i32).collect(),
        shape: StateShape::calibrate(&state).unwrap_or_else(|e| panic!("{e}")),
    };
    (state, spec)
}

fn encode(cells: usize, codec: Codec, chunk: u32) -> (Vec<u8>, TransferFrames) {
    let (state, spec) = fixture(cells, false, codec, chunk);
    let frames = KvEncoder::whole(spec, &state).unwrap_or_else(|e| panic!("{e}"));
    (state, frames)
}

fn decode(header: &[u8], chunks: &[Vec<u8>], end: &[u8]) -> Result<Vec<u8>, KvError> {
    let mut d = KvDecoder::new(header, &DecodeLimits::default(), &target())?;
    for c in chunks {
        d.push_chunk(c)?;
    }
    Ok(d.finish(end)?.state)
}

/// Bytes per cell of the synthetic state: record 12, K 2 x 6, V 2 x 6.
const PER_CELL: u32 = 36;

#[test]
fn every_codec_round_trips_with_many_chunk_sizes() {
    for v_trans in [false, true] {
        for codec in Codec::ALL {
            for chunk in [1u32, PER_CELL, 3 * PER_CELL + 5, 1 << 20] {
                let (state, spec) = fixture(23, v_trans, codec, chunk);
                let (h, c, e) = KvEncoder::whole(spec, &state).unwrap_or_default();
                let per_chunk = (chunk / PER_CELL).max(1) as usize;
                assert_eq!(c.len(), 23usize.div_ceil(per_chunk));
                assert_eq!(decode(&h, &c, &e), Ok(state), "{codec} chunk {chunk}");
            }
        }
    }
}

#[test]
fn cells_sent_as_they_become_available_arrive_whole() {
    let (state, spec) = fixture(23, true, Codec::Lz4, 4 * PER_CELL);
    let mut enc = KvEncoder::new(spec).unwrap_or_else(|e| panic!("{e}"));
    let mut d = KvDecoder::new(&enc.header_frame(), &DecodeLimits::default(), &target())
        .unwrap_or_else(|e| panic!("{e}"));
    // Three exports as the prompt runs: 5, then 6 more, then the last 12 cells, the middle
    // ones as a segment cut out already.
    for cells in [5, 11, 23] {
        if cells == 11 {
            let seg = enc.header().shape.cut(&state, 5..11).unwrap_or_default();
            while let Some(f) = enc.next_frame_of_segment(&seg, 5).unwrap_or_default() {
                assert!(d.push_chunk(&f).is_ok());
            }
        }
        while let Some(f) = enc.next_frame(&state, cells).unwrap_or_default() {
            assert!(d.push_chunk(&f).is_ok());
        }
        assert_eq!(enc.cells_sent(), cells);
        assert_eq!(d.bytes_held(), cells * PER_CELL as usize);
    }
    assert!(d.is_complete());
    let end = enc.end_frame(&state).unwrap_or_default();
    assert_eq!(d.finish(&end).map(|k| k.state), Ok(state));
    // More cells than the transfer holds are refused at the sender.
    assert!(
        enc.next_frame(&synthetic_state(1, 0, &[0], false), 24)
            .is_err()
    );
}

#[test]
fn missing_and_truncated_frames_are_refused() {
    let (_, (h, c, e)) = encode(10, Codec::Lz4, 3 * PER_CELL);
    assert_eq!(c.len(), 4);
    assert!(matches!(
        decode(&h, &c[..3], &e),
        Err(KvError::Incomplete {
            received: 3,
            declared: 4
        })
    ));
    assert!(matches!(
        decode(&h[..h.len() - 1], &c, &e),
        Err(KvError::Truncated { .. } | KvError::HeaderChecksum)
    ));
    assert!(matches!(
        decode(&h[..10], &c, &e),
        Err(KvError::Truncated { .. })
    ));
    let mut cut = c.clone();
    let n = cut[1].len() - 1;
    cut[1].truncate(n);
    assert!(matches!(
        decode(&h, &cut, &e),
        Err(KvError::Truncated { .. })
    ));
    assert!(matches!(
        decode(&h, &c, &e[..e.len() - 1]),
        Err(KvError::Truncated { .. })
    ));
}

#[test]
fn reordered_duplicated_and_extra_chunks_are_refused() {
    let (_, (h, c, e)) = encode(10, Codec::None, 3 * PER_CELL);
    let swapped = vec![c[1].clone(), c[0].clone()];
    assert_eq!(
        decode(&h, &swapped, &e),
        Err(KvError::OutOfOrderChunk {
            expected: 0,
            got: 1
        })
    );
    let dup = vec![c[0].clone(), c[0].clone()];
    assert_eq!(decode(&h, &dup, &e), Err(KvError::DuplicateChunk(0)));
    // A fifth chunk would carry cells past the ten the header declares.
    let mut extra = c[0].clone();
    extra[4..8].copy_from_slice(&4u32.to_le_bytes());
    let mut all = c.clone();
    all.push(extra);
    assert!(matches!(
        decode(&h, &all, &e),
        Err(KvError::OversizedChunk { index: 4, .. })
    ));
}

#[test]
fn chunks_and_end_frames_from_another_transfer_are_refused() {
    let (_, (h, c, e)) = encode(10, Codec::None, 3 * PER_CELL);
    let (state, mut spec) = fixture(10, false, Codec::None, 3 * PER_CELL);
    spec.source_seq = 3;
    let (_, c2, e2) = KvEncoder::whole(spec, &state).unwrap_or_default();
    assert_eq!(decode(&h, &c2, &e), Err(KvError::ForeignChunk(0)));
    assert!(matches!(
        decode(&h, &c, &e2),
        Err(KvError::InvalidField {
            field: "end frame",
            ..
        })
    ));
}

#[test]
fn chunks_that_are_not_whole_cells_or_oversized_are_refused() {
    let (_, (h, c, e)) = encode(10, Codec::None, 3 * PER_CELL);
    let mut half = c[0].clone();
    half[8..12].copy_from_slice(&(PER_CELL + 1).to_le_bytes());
    assert!(matches!(
        decode(&h, &[half], &e),
        Err(KvError::OversizedChunk { index: 0, .. })
    ));
    let mut big = c[0].clone();
    big[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode(&h, &[big], &e),
        Err(KvError::OversizedChunk { index: 0, .. })
    ));
}

#[test]
fn corrupted_bytes_fail_their_checksums() {
    let (_, (h, c, e)) = encode(10, Codec::Lz4, 3 * PER_CELL);
    let mut bad = c.clone();
    let last = bad[1].len() - 1;
    bad[1][last] ^= 1;
    assert_eq!(decode(&h, &bad, &e), Err(KvError::ChunkChecksum(1)));
    let mut bad_header = h.clone();
    bad_header[20] ^= 1;
    assert_eq!(decode(&bad_header, &c, &e), Err(KvError::HeaderChecksum));
    let mut bad_end = e.clone();
    bad_end[30] ^= 1;
    assert!(decode(&h, &c, &bad_end).is_err());
    let mut magic = c.clone();
    magic[0][0] = b'X';
    assert!(matches!(
        decode(&h, &magic, &e),
        Err(KvError::BadMagic { .. })
    ));
}

/// Rewrites header fields and fixes its checksum, as a buggy or hostile sender would.
fn forge_header(h: &[u8], edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut b = h[..h.len() - 8].to_vec();
    edit(&mut b);
    let sum = xxhash_rust::xxh3::xxh3_64(&b);
    b.extend_from_slice(&sum.to_le_bytes());
    b
}

#[test]
fn wrong_model_layout_and_version_are_refused_before_any_payload() {
    let (_, (h, c, e)) = encode(3, Codec::None, 64);
    let other_model = forge_header(&h, |b| b[8] ^= 0xff);
    assert!(matches!(
        decode(&other_model, &c, &e),
        Err(KvError::ModelMismatch { .. })
    ));
    let q8 = forge_header(&h, |b| {
        b[44..48].copy_from_slice(&KvType::Q8_0.ggml_id().to_le_bytes())
    });
    assert!(matches!(
        decode(&q8, &c, &e),
        Err(KvError::LayoutMismatch {
            field: "type_v",
            ..
        })
    ));
    let unknown_type = forge_header(&h, |b| b[40..44].copy_from_slice(&77u32.to_le_bytes()));
    assert_eq!(
        decode(&unknown_type, &c, &e),
        Err(KvError::UnknownKvType(77))
    );
    let unknown_codec = forge_header(&h, |b| b[50] = 9);
    assert_eq!(
        decode(&unknown_codec, &c, &e),
        Err(KvError::UnknownCodec(9))
    );
    // Older senders (version 1: whole state, sizes up front; version 2: no window caches, a
    // shorter end frame; version 3: no recurrent section) are refused by name.
    for old in [1u16, 2, 3] {
        let forged = forge_header(&h, |b| b[4..6].copy_from_slice(&old.to_le_bytes()));
        assert_eq!(
            decode(&forged, &c, &e),
            Err(KvError::UnsupportedVersion {
                found: old,
                supported: WIRE_VERSION
            })
        );
    }
}

#[test]
fn declared_sizes_over_the_limits_are_refused_without_allocating() {
    let (_, (h, _, _)) = encode(3, Codec::None, 64);
    let tight = DecodeLimits {
        max_state_bytes: 99,
        ..DecodeLimits::default()
    };
    assert!(matches!(
        KvDecoder::new(&h, &tight, &target()).err(),
        Some(KvError::StateTooLarge { limit: 99, .. })
    ));
    let few_tokens = DecodeLimits {
        max_tokens: 2,
        ..DecodeLimits::default()
    };
    assert!(matches!(
        KvDecoder::new(&h, &few_tokens, &target()).err(),
        Some(KvError::TooManyTokens { .. })
    ));
    let small_chunks = DecodeLimits {
        max_chunk_size: 32,
        ..DecodeLimits::default()
    };
    assert!(matches!(
        KvDecoder::new(&h, &small_chunks, &target()).err(),
        Some(KvError::InvalidField {
            field: "chunk_size",
            ..
        })
    ));
    let small_ctx = ImportTarget {
        layout: KvLayout {
            n_ctx_seq: 3,
            ..KvLayout::default()
        },
        ..target()
    };
    assert!(matches!(
        KvDecoder::new(&h, &DecodeLimits::default(), &small_ctx).err(),
        Some(KvError::TooManyTokens {
            tokens: 3,
            limit: 2
        })
    ));
    // A shape claiming a million layers is refused while its header is read.
    let layers = h.len() - 8 - (2 * 24 + 17) + 13;
    let many = forge_header(&h, |b| {
        b[layers..layers + 4].copy_from_slice(&1_000_000u32.to_le_bytes())
    });
    assert!(KvDecoder::new(&many, &DecodeLimits::default(), &target()).is_err());
}

#[test]
fn a_state_other_than_the_senders_fails_the_end_checksum() {
    let (_, (h, c, _)) = encode(10, Codec::None, 3 * PER_CELL);
    let (state, spec) = fixture(10, false, Codec::None, 3 * PER_CELL);
    let mut enc = KvEncoder::new(spec).unwrap_or_else(|e| panic!("{e}"));
    while let Ok(Some(_)) = enc.next_frame(&state, 10) {}
    let mut other = state.clone();
    let last = other.len() - 1;
    other[last] ^= 1;
    let wrong_end = enc.end_frame(&other).unwrap_or_default();
    assert_eq!(decode(&h, &c, &wrong_end), Err(KvError::StateChecksum));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_header_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = KvDecoder::new(&bytes, &DecodeLimits::default(), &target());
    }

    #[test]
    fn arbitrary_chunks_and_end_after_a_valid_header_never_panic(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..6),
        end in proptest::collection::vec(any::<u8>(), 0..40),
        codec in 0u8..3,
    ) {
        let codec = Codec::from_id(codec).unwrap_or_default();
        let (_, spec) = fixture(8, false, codec, 128);
        let enc = KvEncoder::new(spec).unwrap_or_else(|e| panic!("{e}"));
        let mut d = KvDecoder::new(&enc.header_frame(), &DecodeLimits::default(), &target())
            .unwrap_or_else(|e| panic!("{e}"));
        for c in &chunks {
            let _ = d.push_chunk(c);
        }
        let _ = d.finish(&end);
    }

    #[test]
    fn mutated_valid_frames_never_panic(
        flip in any::<prop::sample::Index>(),
        val in any::<u8>(),
        codec in 0u8..3,
        v_trans in any::<bool>(),
    ) {
        let codec = Codec::from_id(codec).unwrap_or_default();
        let (state, spec) = fixture(12, v_trans, codec, 200);
        let (header, mut frames, end) = KvEncoder::whole(spec, &state).unwrap_or_default();
        let total: usize = frames.iter().map(Vec::len).sum();
        let mut at = flip.index(total);
        for f in frames.iter_mut() {
            if at < f.len() { f[at] = val; break; }
            at -= f.len();
        }
        if let Ok(mut d) = KvDecoder::new(&header, &DecodeLimits::default(), &target())
            && frames.iter().all(|f| d.push_chunk(f).is_ok())
            && let Ok(out) = d.finish(&end)
        {
            // Anything that still decodes must be exactly the original bytes.
            prop_assert_eq!(out.state, state);
        }
    }

    #[test]
    fn arbitrary_state_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = StateShape::calibrate(&bytes);
        let _ = crate::state::to_single_stream(bytes.clone());
        if let Ok(shape) = StateShape::calibrate(&bytes) {
            for v_trans in [false, true] {
                let _ = StateShape { v_trans, ..shape.clone() }.match_v_layout(bytes.clone());
            }
            let _ = shape.cut(&bytes, 0..1);
            let _ = shape.join(0, &[&bytes]);
        }
    }

    #[test]
    fn valid_states_round_trip(cells in 1usize..40, chunk in 1u32..600, codec in 0u8..3, v_trans in any::<bool>()) {
        let codec = Codec::from_id(codec).unwrap_or_default();
        let (state, spec) = fixture(cells, v_trans, codec, chunk);
        let (h, c, e) = KvEncoder::whole(spec, &state).unwrap_or_default();
        prop_assert_eq!(decode(&h, &c, &e), Ok(state));
    }
}

/// An iSWA state of `n` cells with a `w`-cell window, and what a transfer of it says.
fn iswa_fixture(n: i32, w: i32, codec: Codec, chunk: u32) -> (Vec<u8>, KvHeader) {
    let state = crate::state::tests::synthetic_iswa(1, 0, n, w, false);
    let (_, spec) = fixture(n as usize, false, codec, chunk);
    let shape = StateShape::calibrate(&state).unwrap_or_else(|e| panic!("{e}"));
    (state, KvHeader { shape, ..spec })
}

#[test]
fn an_iswa_transfer_carries_the_window_after_the_full_cache() {
    for codec in Codec::ALL {
        for chunk in [1u32, 2 * PER_CELL, 1 << 20] {
            let (state, spec) = iswa_fixture(11, 4, codec, chunk);
            let (h, c, e) = KvEncoder::whole(spec, &state).unwrap_or_default();
            assert_eq!(
                decode(&h, &c, &e),
                Ok(state.clone()),
                "{codec} chunk {chunk}"
            );
            // Without the last window chunk the end frame does not add up.
            assert!(decode(&h, &c[..c.len() - 1], &e).is_err());
        }
    }
    // Streamed: full-cache segments while the prompt runs, then the final export's rest and window.
    let (state, spec) = iswa_fixture(11, 4, Codec::Lz4, 3 * PER_CELL);
    let mut enc = KvEncoder::new(spec).unwrap_or_else(|e| panic!("{e}"));
    let mut d = KvDecoder::new(&enc.header_frame(), &DecodeLimits::default(), &target())
        .unwrap_or_else(|e| panic!("{e}"));
    let seg = enc.header().shape.cut(&state, 0..6).unwrap_or_default();
    while let Some(f) = enc.next_frame_of_segment(&seg, 0).unwrap_or_default() {
        assert!(d.push_chunk(&f).is_ok());
    }
    assert!(enc.end_frame(&state).is_err(), "cells still due");
    while let Some(f) = enc.next_frame(&state, 11).unwrap_or_default() {
        assert!(d.push_chunk(&f).is_ok());
    }
    let end = enc.end_frame(&state).unwrap_or_default();
    assert_eq!(d.finish(&end).map(|k| k.state), Ok(state));
}

#[test]
fn window_cells_past_the_limit_or_the_prompt_are_refused() {
    let (state, spec) = iswa_fixture(5, 5, Codec::None, 1 << 20);
    let (h, c, _) = KvEncoder::whole(spec, &state).unwrap_or_default();
    let limits = DecodeLimits {
        max_state_bytes: state.len() as u64 / 2,
        ..DecodeLimits::default()
    };
    let mut d = KvDecoder::new(&h, &limits, &target()).unwrap_or_else(|e| panic!("{e}"));
    assert!(d.push_chunk(&c[0]).is_ok());
    assert!(matches!(
        d.push_chunk(&c[1]),
        Err(KvError::StateTooLarge { .. })
    ));
    // A second copy of the window would hold more cells than the prompt.
    let mut d =
        KvDecoder::new(&h, &DecodeLimits::default(), &target()).unwrap_or_else(|e| panic!("{e}"));
    for f in &c {
        assert!(d.push_chunk(f).is_ok());
    }
    let mut again = c[1].clone();
    again[4..8].copy_from_slice(&2u32.to_le_bytes());
    assert!(matches!(
        d.push_chunk(&again),
        Err(KvError::OversizedChunk { .. })
    ));
}

/// A hybrid state of `n` cells and what a transfer of it says.
fn hybrid_fixture(n: i32, codec: Codec, chunk: u32) -> (Vec<u8>, KvHeader) {
    let state = crate::state::tests::synthetic_hybrid(1, 0, n, false);
    let (_, spec) = fixture(n as usize, false, codec, chunk);
    let shape = StateShape::calibrate(&state).unwrap_or_else(|e| panic!("{e}"));
    (state, KvHeader { shape, ..spec })
}

#[test]
fn a_hybrid_transfer_carries_the_recurrent_section_after_the_cells() {
    for codec in Codec::ALL {
        // Chunks of 1 byte cut the 124-byte section into 124 chunks; 50 into three.
        for chunk in [1u32, 50, 2 * PER_CELL, 1 << 20] {
            let (state, spec) = hybrid_fixture(9, codec, chunk);
            let (h, c, e) = KvEncoder::whole(spec, &state).unwrap_or_default();
            assert_eq!(decode(&h, &c, &e), Ok(state.clone()), "{codec} {chunk}");
            // Without the last piece of the section the end frame does not add up.
            assert!(decode(&h, &c[..c.len() - 1], &e).is_err());
        }
    }
    // Streamed: cells while the prompt runs, then the final export's section.
    let (state, spec) = hybrid_fixture(9, Codec::Lz4, 50);
    let mut enc = KvEncoder::new(spec).unwrap_or_else(|e| panic!("{e}"));
    let mut d = KvDecoder::new(&enc.header_frame(), &DecodeLimits::default(), &target())
        .unwrap_or_else(|e| panic!("{e}"));
    let seg = enc.header().shape.cut(&state, 0..4).unwrap_or_default();
    while let Some(f) = enc.next_frame_of_segment(&seg, 0).unwrap_or_default() {
        assert!(d.push_chunk(&f).is_ok());
    }
    assert!(enc.end_frame(&state).is_err(), "cells still due");
    while let Some(f) = enc.next_frame(&state, 9).unwrap_or_default() {
        assert!(d.push_chunk(&f).is_ok());
    }
    let end = enc.end_frame(&state).unwrap_or_default();
    assert_eq!(d.finish(&end).map(|k| k.state), Ok(state));
}

#[test]
fn recurrent_bytes_past_the_section_or_a_final_export_without_one_are_refused() {
    let (state, spec) = hybrid_fixture(4, Codec::None, 1 << 20);
    let (h, c, _) = KvEncoder::whole(spec.clone(), &state).unwrap_or_default();
    assert_eq!(c.len(), 2, "the cells, then the section");
    let mut d =
        KvDecoder::new(&h, &DecodeLimits::default(), &target()).unwrap_or_else(|e| panic!("{e}"));
    assert!(d.push_chunk(&c[0]).is_ok());
    // A section chunk declaring one byte more than the section holds.
    let mut long = c[1].clone();
    long[8..12].copy_from_slice(&125u32.to_le_bytes());
    assert!(matches!(
        d.push_chunk(&long),
        Err(KvError::OversizedChunk { .. })
    ));
    // The header's shape is hybrid, the final export is not.
    let plain = crate::state::tests::synthetic_state(1, 0, &[0, 1, 2, 3], false);
    let mut enc = KvEncoder::new(spec).unwrap_or_else(|e| panic!("{e}"));
    let mut failed = None;
    loop {
        match enc.next_frame(&plain, 4) {
            Ok(Some(_)) => continue,
            Ok(None) => break,
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    assert!(failed.is_some());
}

#[test]
fn a_purely_recurrent_transfer_carries_the_section_alone() {
    let state = crate::state::tests::synthetic_recurrent_state(40);
    let (_, spec) = fixture(40, false, Codec::Lz4, 1 << 20);
    let shape = StateShape::calibrate(&state).unwrap_or_else(|e| panic!("{e}"));
    for codec in Codec::ALL {
        for chunk in [1u32, 64, 1 << 20] {
            let spec = KvHeader {
                shape: shape.clone(),
                codec,
                chunk_size: chunk,
                ..spec.clone()
            };
            let (h, c, e) = KvEncoder::whole(spec, &state).unwrap_or_default();
            // A chunk is never smaller than a (cell-less) shape's 12-byte cell record.
            let section = shape
                .recurrent
                .as_ref()
                .map_or(0, |r| r.section_len().unwrap_or(0));
            assert_eq!(c.len() as u64, section.div_ceil(u64::from(chunk.max(12))));
            assert_eq!(decode(&h, &c, &e), Ok(state.clone()), "{codec} {chunk}");
            assert!(decode(&h, &c[..c.len() - 1], &e).is_err());
        }
    }
    // A shape with no attention layers and no recurrent state is no shape at all.
    let (_, spec) = fixture(3, false, Codec::None, 1 << 20);
    let mut empty = KvHeader {
        shape: shape.clone(),
        ..spec
    }
    .encode();
    // Before the checksum: the flag, n_layer and the recurrent layer count, four entries.
    let flag_at = empty.len() - 8 - 2 * 2 * 12 - 8 - 1;
    assert_eq!(empty[flag_at], 1, "the recurrent flag");
    empty.truncate(flag_at);
    empty.push(0);
    let body = empty.len();
    let sum = xxhash_rust::xxh3::xxh3_64(&empty[..body]);
    empty.extend_from_slice(&sum.to_le_bytes());
    assert!(KvHeader::decode(&empty, &DecodeLimits::default()).is_err());
}

#[test]
fn a_hybrid_transfer_with_a_window_carries_cells_then_recurrent_then_window() {
    let state = crate::state::tests::synthetic_hybrid_iswa(1, 0, 11, 4);
    for chunk in [1u32, 50, 1 << 20] {
        let (_, spec) = fixture(11, false, Codec::Lz4, chunk);
        let shape = StateShape::calibrate(&state).unwrap_or_else(|e| panic!("{e}"));
        let (h, c, e) = KvEncoder::whole(KvHeader { shape, ..spec }, &state).unwrap_or_default();
        assert_eq!(decode(&h, &c, &e), Ok(state.clone()), "chunk {chunk}");
        assert!(decode(&h, &c[..c.len() - 1], &e).is_err());
    }
}

#[test]
fn a_transfer_of_no_tokens_is_refused() {
    let (_, spec) = fixture(3, false, Codec::None, 1 << 20);
    let empty = KvHeader {
        tokens: Vec::new(),
        ..spec
    };
    assert!(matches!(
        KvHeader::decode(&empty.encode(), &DecodeLimits::default()),
        Err(KvError::InvalidField {
            field: "n_tokens",
            ..
        })
    ));
}
