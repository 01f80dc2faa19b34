//! Frame-level tests: round trips for every codec and chunking, and each bad input refused with its own error.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use exo_kvcache::{
    Codec, DecodeLimits, ImportTarget, KvDecoder, KvEncoder, KvError, KvLayout, KvType,
    ModelFingerprint,
};

fn target() -> ImportTarget {
    ImportTarget {
        fingerprint: ModelFingerprint([7; 32]),
        layout: KvLayout::default(),
    }
}

fn payload(len: usize) -> Vec<u8> {
    // f16-like data: repetitive high bytes, noisy low bytes.
    (0..len)
        .map(|i| {
            if i % 2 == 1 {
                0x3c
            } else {
                (i * 31 % 253) as u8
            }
        })
        .collect()
}

fn encode(raw: &[u8], codec: Codec, chunk: u32) -> (Vec<u8>, Vec<Vec<u8>>) {
    let t = target();
    let enc = KvEncoder::new(raw, vec![1, 2, 3], t.fingerprint, t.layout, codec, chunk).unwrap();
    let header = enc.header_frame();
    (header, enc.collect())
}

fn decode(header: &[u8], chunks: &[Vec<u8>]) -> Result<Vec<u8>, KvError> {
    let mut d = KvDecoder::new(header, &DecodeLimits::default(), &target())?;
    for c in chunks {
        d.push_chunk(c)?;
    }
    Ok(d.finish()?.state)
}

#[test]
fn every_codec_round_trips_with_many_chunk_sizes() {
    let raw = payload(10_001);
    for codec in Codec::ALL {
        for chunk in [1u32, 7, 4096, 10_001, 1 << 20] {
            let (h, c) = encode(&raw, codec, chunk);
            assert_eq!(c.len(), raw.len().div_ceil(chunk as usize));
            assert_eq!(decode(&h, &c).unwrap(), raw, "{codec} chunk {chunk}");
        }
    }
}

#[test]
fn shuffle_compresses_f16_like_data_better_than_plain_lz4() {
    let raw = payload(1 << 16);
    let size = |codec| {
        let (_, c) = encode(&raw, codec, 1 << 20);
        c.iter().map(Vec::len).sum::<usize>()
    };
    assert!(size(Codec::ShuffleLz4) < size(Codec::Lz4));
}

#[test]
fn empty_state_is_zero_chunks() {
    let (h, c) = encode(&[], Codec::Lz4, 16);
    assert!(c.is_empty());
    assert_eq!(decode(&h, &c).unwrap(), Vec::<u8>::new());
}

#[test]
fn truncated_transfer_and_frames_are_refused() {
    let (h, c) = encode(&payload(1000), Codec::Lz4, 300);
    assert!(matches!(
        decode(&h, &c[..3]),
        Err(KvError::Incomplete {
            received: 3,
            declared: 4
        })
    ));
    assert!(matches!(
        decode(&h[..h.len() - 1], &c),
        Err(KvError::Truncated { .. })
    ));
    assert!(matches!(
        decode(&h[..10], &c),
        Err(KvError::Truncated { .. })
    ));
    let mut cut = c.clone();
    let n = cut[1].len() - 1;
    cut[1].truncate(n);
    assert!(matches!(decode(&h, &cut), Err(KvError::Truncated { .. })));
    let mut stub = c.clone();
    stub[0].truncate(20);
    assert!(matches!(decode(&h, &stub), Err(KvError::Truncated { .. })));
}

#[test]
fn reordered_duplicated_and_extra_chunks_are_refused() {
    let (h, c) = encode(&payload(1000), Codec::None, 300);
    let swapped = vec![c[1].clone(), c[0].clone()];
    assert_eq!(
        decode(&h, &swapped),
        Err(KvError::OutOfOrderChunk {
            expected: 0,
            got: 1
        })
    );
    let dup = vec![c[0].clone(), c[0].clone()];
    assert_eq!(decode(&h, &dup), Err(KvError::DuplicateChunk(0)));
    // A chunk index past the declared count.
    let (h2, c2) = encode(&payload(1000), Codec::None, 1000);
    let mut extra = c[3].clone();
    extra[4..8].copy_from_slice(&5u32.to_le_bytes());
    assert_eq!(
        decode(&h2, &[c2[0].clone(), extra]),
        Err(KvError::ExtraChunk {
            got: 5,
            declared: 1
        })
    );
}

#[test]
fn chunks_from_another_transfer_are_refused() {
    let (h, c) = encode(&payload(1000), Codec::None, 300);
    let other = payload(1000).iter().map(|b| b ^ 1).collect::<Vec<_>>();
    let (_, oc) = encode(&other, Codec::None, 300);
    assert_eq!(
        decode(&h, &[c[0].clone(), oc[1].clone()]),
        Err(KvError::ForeignChunk(1))
    );
}

#[test]
fn oversized_chunks_are_refused() {
    let (h, c) = encode(&payload(1000), Codec::None, 300);
    let mut longer = c[0].clone();
    longer.push(0);
    assert!(matches!(
        decode(&h, &[longer]),
        Err(KvError::OversizedChunk { index: 0, .. })
    ));
    let mut bigger_raw = c[0].clone();
    bigger_raw[8..12].copy_from_slice(&301u32.to_le_bytes());
    assert!(matches!(
        decode(&h, &[bigger_raw]),
        Err(KvError::OversizedChunk { index: 0, .. })
    ));
    let mut bigger_enc = c[0].clone();
    bigger_enc[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode(&h, &[bigger_enc]),
        Err(KvError::OversizedChunk { index: 0, .. })
    ));
}

#[test]
fn corrupted_bytes_fail_their_checksums() {
    let (h, c) = encode(&payload(1000), Codec::ShuffleLz4, 300);
    let mut bad_chunk = c.clone();
    let last = bad_chunk[2].len() - 1;
    bad_chunk[2][last] ^= 0x40;
    assert_eq!(decode(&h, &bad_chunk), Err(KvError::ChunkChecksum(2)));
    let mut bad_header = h.clone();
    bad_header[70] ^= 1;
    assert_eq!(decode(&bad_header, &c), Err(KvError::HeaderChecksum));
    let mut bad_magic = h.clone();
    bad_magic[0] = b'X';
    assert!(matches!(
        decode(&bad_magic, &c),
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
fn wrong_model_and_layout_are_refused_before_any_payload() {
    let (h, c) = encode(&payload(100), Codec::None, 64);
    let other_model = forge_header(&h, |b| b[8] ^= 0xff);
    assert!(matches!(
        decode(&other_model, &c),
        Err(KvError::ModelMismatch { .. })
    ));
    let q8 = forge_header(&h, |b| {
        b[44..48].copy_from_slice(&KvType::Q8_0.ggml_id().to_le_bytes())
    });
    assert!(matches!(
        decode(&q8, &c),
        Err(KvError::LayoutMismatch {
            field: "type_v",
            ..
        })
    ));
    // Flash attention on at the sender, off here: f16 V is transposed on import, so the transfer
    // is accepted; with quantized V (which cannot be transposed) it is refused.
    let t = target();
    let fa_layout = KvLayout {
        flash_attn: true,
        ..t.layout
    };
    let enc = KvEncoder::new(
        payload(100),
        vec![1, 2, 3],
        t.fingerprint,
        fa_layout,
        Codec::None,
        64,
    )
    .unwrap();
    let fa = enc.header_frame();
    assert_eq!(decode(&fa, &enc.collect::<Vec<_>>()), Ok(payload(100)));
    let q8_types = |b: &mut Vec<u8>| {
        b[40..44].copy_from_slice(&KvType::Q8_0.ggml_id().to_le_bytes());
        b[44..48].copy_from_slice(&KvType::Q8_0.ggml_id().to_le_bytes());
    };
    let q8_fa = forge_header(&h, |b| {
        q8_types(b);
        b[48] = 1;
    });
    let q8_target = ImportTarget {
        layout: KvLayout {
            type_k: KvType::Q8_0,
            type_v: KvType::Q8_0,
            ..KvLayout::default()
        },
        ..target()
    };
    assert!(matches!(
        KvDecoder::new(&q8_fa, &DecodeLimits::default(), &q8_target),
        Err(KvError::LayoutMismatch {
            field: "flash_attn",
            ..
        })
    ));
    let unknown_type = forge_header(&h, |b| b[40..44].copy_from_slice(&77u32.to_le_bytes()));
    assert_eq!(decode(&unknown_type, &c), Err(KvError::UnknownKvType(77)));
    let unknown_codec = forge_header(&h, |b| b[50] = 9);
    assert_eq!(decode(&unknown_codec, &c), Err(KvError::UnknownCodec(9)));
    let version = forge_header(&h, |b| b[4..6].copy_from_slice(&2u16.to_le_bytes()));
    assert!(matches!(
        decode(&version, &c),
        Err(KvError::UnsupportedVersion { found: 2, .. })
    ));
}

#[test]
fn declared_sizes_over_the_limits_are_refused_without_allocating() {
    let (h, c) = encode(&payload(100), Codec::None, 64);
    // 1 TiB declared: refused by the limit, long before anything is reserved.
    let huge = forge_header(&h, |b| {
        b[60..68].copy_from_slice(&(1u64 << 40).to_le_bytes());
        b[80..84].copy_from_slice(&((1u64 << 40) / 64).to_le_bytes()[..4]);
    });
    assert!(matches!(
        decode(&huge, &c),
        Err(KvError::StateTooLarge { .. })
    ));
    let tight = DecodeLimits {
        max_state_bytes: 99,
        ..DecodeLimits::default()
    };
    assert!(matches!(
        KvDecoder::new(&h, &tight, &target()).err(),
        Some(KvError::StateTooLarge {
            declared: 100,
            limit: 99
        })
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
    let wrong_count = forge_header(&h, |b| b[80..84].copy_from_slice(&9u32.to_le_bytes()));
    assert!(matches!(
        decode(&wrong_count, &c),
        Err(KvError::InvalidField {
            field: "n_chunks",
            ..
        })
    ));
}

#[test]
fn wrong_whole_state_checksum_is_refused() {
    let (h, c) = encode(&payload(100), Codec::None, 64);
    let wrong = forge_header(&h, |b| b[84] ^= 1);
    // The chunk tags are bound to the header checksum, so re-tag the chunks as a forger would.
    let tag = &wrong[wrong.len() - 8..];
    let retagged: Vec<Vec<u8>> = c
        .iter()
        .map(|f| {
            let mut f = f.clone();
            f[16..24].copy_from_slice(tag);
            f
        })
        .collect();
    assert_eq!(decode(&wrong, &retagged), Err(KvError::StateChecksum));
}
