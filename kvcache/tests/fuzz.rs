//! Property tests: arbitrary bytes never panic the header, chunk or state decoders; valid data round trips.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use exo_kvcache::{
    Codec, DecodeLimits, ImportTarget, KvDecoder, KvEncoder, KvLayout, ModelFingerprint,
    StateShape, to_single_stream,
};
use proptest::prelude::*;

fn target() -> ImportTarget {
    ImportTarget {
        fingerprint: ModelFingerprint([1; 32]),
        layout: KvLayout::default(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_header_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = KvDecoder::new(&bytes, &DecodeLimits::default(), &target());
    }

    #[test]
    fn arbitrary_chunks_after_a_valid_header_never_panic(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..6),
        codec in 0u8..3,
    ) {
        let raw = vec![3u8; 300];
        let codec = Codec::from_id(codec).unwrap_or_default();
        let t = target();
        let enc = KvEncoder::new(&raw, vec![0; 4], t.fingerprint, t.layout, codec, 128).unwrap();
        let mut d = KvDecoder::new(&enc.header_frame(), &DecodeLimits::default(), &t).unwrap();
        for c in &chunks {
            let _ = d.push_chunk(c);
        }
        let _ = d.finish();
    }

    #[test]
    fn mutated_valid_frames_never_panic(flip in any::<prop::sample::Index>(), val in any::<u8>(), codec in 0u8..3) {
        let raw: Vec<u8> = (0..500u32).map(|i| (i % 13) as u8).collect();
        let codec = Codec::from_id(codec).unwrap_or_default();
        let t = target();
        let enc = KvEncoder::new(&raw, vec![0; 4], t.fingerprint, t.layout, codec, 200).unwrap();
        let header = enc.header_frame();
        let mut frames: Vec<Vec<u8>> = enc.collect();
        let total: usize = frames.iter().map(Vec::len).sum();
        let mut at = flip.index(total);
        for f in frames.iter_mut() {
            if at < f.len() { f[at] = val; break; }
            at -= f.len();
        }
        if let Ok(mut d) = KvDecoder::new(&header, &DecodeLimits::default(), &t) {
            let ok = frames.iter().all(|f| d.push_chunk(f).is_ok());
            if ok {
                // Anything that still decodes must be exactly the original bytes.
                if let Ok(out) = d.finish() { prop_assert_eq!(out.state, raw); }
            }
        }
    }

    #[test]
    fn arbitrary_state_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = StateShape::calibrate(&bytes);
        let _ = to_single_stream(bytes.clone());
        if let Ok(shape) = StateShape::calibrate(&bytes) {
            for v_trans in [false, true] {
                let _ = StateShape { v_trans, ..shape.clone() }.match_v_layout(bytes.clone());
            }
        }
    }

    #[test]
    fn valid_payloads_round_trip(raw in proptest::collection::vec(any::<u8>(), 0..3000), chunk in 1u32..1500, codec in 0u8..3) {
        let codec = Codec::from_id(codec).unwrap_or_default();
        let t = target();
        let enc = KvEncoder::new(&raw, vec![5, 6], t.fingerprint, t.layout, codec, chunk).unwrap();
        let mut d = KvDecoder::new(&enc.header_frame(), &DecodeLimits::default(), &t).unwrap();
        for f in enc { d.push_chunk(&f).unwrap(); }
        prop_assert_eq!(d.finish().unwrap().state, raw);
    }
}
