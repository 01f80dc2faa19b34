//! The KV hand-off of an interleaved sliding-window (iSWA) model, Gemma 3 270M (`scripts/fetch-model
//! gemma3`): its state holds a full-attention cache and a sliding-window cache of the last 512
//! positions. A prompt longer than the window is prefilled in one context, shipped through the
//! wire format into another and continued there exactly as the first context continues it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use exo_engine::{ContextConfig, ContextHandle, EngineError, Model, ModelOptions};
use exo_kvcache::{
    Codec, DecodeLimits, DecodedKv, ImportTarget, KvDecoder, KvEncoder, KvLayout, KvType,
    source_seq,
};
use exo_sampling::SamplingParams;

const GEMMA: &str = "models/gemma-3-270m-q4_k_m.gguf";

fn gemma() -> Arc<Model> {
    let path = exo_test_support::root().join(GEMMA);
    Model::load(&path, &ModelOptions::default())
        .unwrap_or_else(|e| panic!("{e} (run scripts/fetch-model gemma3)"))
}

fn context(model: &Arc<Model>, n_seq_max: u32) -> ContextHandle {
    let config = ContextConfig {
        layout: KvLayout {
            type_k: KvType::F16,
            type_v: KvType::F16,
            flash_attn: false,
            kv_unified: false,
            n_seq_max,
            n_ctx_seq: 2048,
        },
        ..ContextConfig::default()
    };
    ContextHandle::spawn(model.clone(), config).unwrap_or_else(|e| panic!("{e}"))
}

/// A plain-text prompt (the base model has no chat template) of about 800 tokens: past the window.
fn long_prompt(model: &Model) -> Vec<i32> {
    let mut text = String::new();
    for i in 0..48 {
        text += &format!(
            "Entry {i}: the ferry from harbour {} left at {}:{:02} carrying {} passengers. ",
            i % 5,
            6 + i % 12,
            (i * 7) % 60,
            40 + i * 3
        );
    }
    text += "Entry 48:";
    model.tokenize(&text, true)
}

/// Ships `kv` (exported from `src`'s sequence 0) through the frames into `dst`'s sequence `seq`.
async fn ship(
    model: &Model,
    src: &ContextHandle,
    dst: &ContextHandle,
    kv: &exo_engine::ExportedKv,
    seq: i32,
) -> Result<(), EngineError> {
    let spec = src.transfer_header(
        source_seq(&kv.state).unwrap(),
        kv.tokens.clone(),
        Codec::ShuffleLz4,
        1 << 20,
    );
    let (h, c, e) = KvEncoder::whole(spec, &kv.state).unwrap_or_else(|e| panic!("{e}"));
    let target = ImportTarget {
        fingerprint: model.fingerprint(),
        layout: dst.config().layout,
    };
    let limits = DecodeLimits::for_context(dst.shape(), 2048, model.sliding_window());
    let mut d = KvDecoder::new(&h, &limits, &target).unwrap_or_else(|e| panic!("{e}"));
    for chunk in &c {
        d.push_chunk(chunk).unwrap_or_else(|e| panic!("{e}"));
    }
    let decoded: DecodedKv = d.finish(&e).unwrap_or_else(|e| panic!("{e}"));
    dst.import(seq, decoded).await
}

#[test]
fn a_sliding_window_cache_crosses_the_hand_off_exactly() {
    let model = gemma();
    assert_eq!(model.sliding_window(), Some(512));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let a = context(&model, 1);
        let b = context(&model, 2);
        let window = a
            .shape()
            .window
            .as_deref()
            .expect("Gemma 3 has a window cache");
        assert!(
            window.k.len() > a.shape().k.len(),
            "5 of 6 layers are local"
        );
        let toks = long_prompt(&model);
        assert!(toks.len() > 700, "{} tokens", toks.len());
        let greedy = SamplingParams::greedy(24);
        let seeded = SamplingParams {
            temperature: 0.9,
            seed: 77,
            max_tokens: 24,
            ..SamplingParams::default()
        };
        for sampling in [greedy, seeded] {
            let pre = a.prefill(0, toks.clone(), sampling.clone()).await.unwrap();
            let kv = a.export(0).await.unwrap();
            let reference = a
                .generate(0, pre.first_token, 0, sampling.clone())
                .await
                .unwrap();
            assert!(reference.tokens.len() >= 8, "{reference:?}");
            ship(&model, &a, &b, &kv, 1).await.unwrap();
            let split = b
                .generate(1, pre.first_token, 0, sampling.clone())
                .await
                .unwrap();
            assert_eq!(split.tokens, reference.tokens, "{sampling:?}");
            eprintln!(
                "{} prompt tokens, {} KV bytes (window cache included): {:?} identical",
                toks.len(),
                kv.state.len(),
                split.text
            );
        }
    });
}
