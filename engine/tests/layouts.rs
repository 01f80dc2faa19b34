//! The KV hand-off of the cache layouts beyond one attention cache, each prefilled in one context,
//! shipped through the wire format into another and continued there exactly as the first context
//! continues it:
//! - an interleaved sliding-window (iSWA) model, Gemma 3 270M (`scripts/fetch-model gemma3`): a
//!   full-attention cache and a sliding-window cache of the last 512 positions, with a prompt
//!   longer than the window;
//! - a hybrid model (`scripts/fetch-model hybrid`, a tiny random-weight Jamba: Mamba and attention
//!   layers): an attention cache and a recurrent state;
//! - a purely recurrent model (`scripts/fetch-model recurrent`, a tiny random-weight Mamba): the
//!   recurrent state alone.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use exo_engine::{ContextHandle, EngineError, Memory, Model};
use exo_kvcache::{Codec, DecodedKv, KvLayout, KvType};
use exo_sampling::SamplingParams;
use exo_test_support::{context_of, frames, other_model, receive};

const GEMMA: &str = "models/gemma-3-270m-q4_k_m.gguf";
const HYBRID: &str = "models/tiny-jamba.gguf";
const MAMBA: &str = "models/tiny-mamba.gguf";

fn context(model: &Arc<Model>, n_seq_max: u32, flash_attn: bool) -> ContextHandle {
    let layout = KvLayout {
        type_k: KvType::F16,
        type_v: KvType::F16,
        flash_attn,
        kv_unified: false,
        n_seq_max,
        n_ctx_seq: 2048,
    };
    context_of(model, layout)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Greedy and seeded sampling, with a repetition penalty of `penalty` (1: none).
fn greedy_and_seeded(penalty: f32) -> [SamplingParams; 2] {
    let greedy = SamplingParams {
        repetition_penalty: penalty,
        ..SamplingParams::greedy(24)
    };
    let seeded = SamplingParams {
        temperature: 0.9,
        seed: 77,
        ..greedy.clone()
    };
    [greedy, seeded]
}

/// Prefills `toks` in `a`'s sequence 0 and continues there; ships the cache to `b`'s sequence 1 and
/// continues there: the same tokens, for each of `samplings`. Returns the state's bytes and the
/// first sampling's continuation.
async fn split_equals_colocated(
    a: &ContextHandle,
    b: &ContextHandle,
    toks: &[i32],
    samplings: [SamplingParams; 2],
) -> (usize, Vec<i32>) {
    let (mut bytes, mut first) = (0, Vec::new());
    for sampling in samplings {
        let pre = a.prefill(0, toks.to_vec(), sampling.clone()).await.unwrap();
        let kv = a.export(0).await.unwrap();
        bytes = kv.state.len();
        let reference = a
            .generate(0, pre.first_token, 0, sampling.clone())
            .await
            .unwrap();
        assert!(reference.tokens.len() >= 8, "{reference:?}");
        ship(a, b, &kv, 1).await.unwrap();
        let split = b
            .generate(1, pre.first_token, 0, sampling.clone())
            .await
            .unwrap();
        assert_eq!(split.tokens, reference.tokens, "{sampling:?}");
        eprintln!(
            "{} prompt tokens, {bytes} state bytes: {:?} identical",
            toks.len(),
            split.text
        );
        if first.is_empty() {
            first = split.tokens;
        }
    }
    (bytes, first)
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
    src: &ContextHandle,
    dst: &ContextHandle,
    kv: &exo_engine::ExportedKv,
    seq: i32,
) -> Result<(), EngineError> {
    dst.import(seq, through_frames(src, dst, kv)).await
}

/// `kv` (exported from `src`) through the frames (shuffle-lz4, 1 MiB chunks), checked by `dst`'s
/// decoder.
fn through_frames(
    src: &ContextHandle,
    dst: &ContextHandle,
    kv: &exo_engine::ExportedKv,
) -> DecodedKv {
    let layout = src.config().layout;
    let (h, c, e) = frames(src, kv, layout, Codec::ShuffleLz4, 1 << 20);
    receive(dst, &h, &c, &e).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_sliding_window_cache_crosses_the_hand_off_exactly() {
    let model = other_model(GEMMA, "gemma3");
    assert_eq!(model.sliding_window(), Some(512));
    rt().block_on(async {
        let a = context(&model, 1, false);
        let b = context(&model, 2, false);
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
        split_equals_colocated(&a, &b, &toks, greedy_and_seeded(1.0)).await;
    });
}

/// A hybrid model's state: its attention cache re-framed for another stream count, its recurrent
/// section carried as it is; the continuation is the same (and the state decides it). Its V
/// translates for the other flash-attention setting. A recurrent section llama.cpp would abort on
/// (two cells) is refused before it, and the receiving context keeps working.
#[test]
fn a_hybrid_models_recurrent_state_crosses_the_hand_off_exactly() {
    let model = other_model(HYBRID, "hybrid");
    rt().block_on(recurrent_state_crosses(model, 2));
}

/// The same for a purely recurrent model (Mamba): its state is the recurrent section alone, and a
/// transfer of it carries no cells.
#[test]
fn a_recurrent_models_state_crosses_the_hand_off_exactly() {
    let model = other_model(MAMBA, "recurrent");
    assert_eq!(model.memory(), Memory::Recurrent);
    rt().block_on(recurrent_state_crosses(model, 0));
}

/// The checks of the two tests above, for a model with `attention_layers` attention layers beside
/// its two Mamba layers.
async fn recurrent_state_crosses(model: Arc<Model>, attention_layers: usize) {
    let a = context(&model, 1, false);
    let b = context(&model, 3, false);
    let rec = a.shape().recurrent.clone().expect("a recurrent state");
    let n_layer = 2 + attention_layers as u32;
    assert_eq!((rec.n_layer, rec.r.len()), (n_layer, 2));
    assert_eq!(a.shape().k.len(), attention_layers);
    let toks = model.tokenize(&"The ferry left the harbour at dawn. ".repeat(12), true);
    // Random weights repeat one token; a penalty makes each step a choice the state decides.
    let [greedy, seeded] = greedy_and_seeded(3.0);
    let samplings = [greedy.clone(), seeded];
    let (bytes, tokens) = split_equals_colocated(&a, &b, &toks, samplings).await;
    let attention = a.shape().bytes_per_token() as usize * toks.len();
    let section = rec.section_len().unwrap() as usize;
    assert!(bytes >= attention + section, "{bytes} bytes");
    let distinct: std::collections::HashSet<_> = tokens.iter().collect();
    assert!(distinct.len() > 8, "{tokens:?}");
    // The state decides it: the same first token after another prompt (other words to its end:
    // a random Mamba layer's state fades fast, its convolution holds the last inputs) goes
    // elsewhere.
    let other = "Rain fell on the quiet town. ".repeat(11) + "Bells rang out over the square";
    let other = model.tokenize(&other, true);
    a.prefill(0, other, greedy.clone()).await.unwrap();
    let elsewhere = a.generate(0, tokens[0], 0, greedy.clone()).await.unwrap();
    assert_ne!(
        elsewhere.tokens, tokens,
        "the continuation ignores the state"
    );

    // Into a context with flash attention on (V stored the other way; its kernels round
    // differently, so no exactness is asked here): llama.cpp takes the translated state.
    let fa = context(&model, 1, true);
    let pre = a.prefill(0, toks.clone(), greedy.clone()).await.unwrap();
    let kv = a.export(0).await.unwrap();
    ship(&a, &fa, &kv, 0).await.unwrap();
    let there = fa.generate(0, pre.first_token, 0, greedy).await.unwrap();
    let same = there
        .tokens
        .iter()
        .zip(&tokens)
        .take_while(|(x, y)| x == y)
        .count();
    eprintln!("flash attention on: the first {same} of 24 tokens agree");

    // Two recurrent cells: llama.cpp's reader would abort the process on this.
    a.prefill(0, toks.clone(), SamplingParams::greedy(1))
        .await
        .unwrap();
    let kv = a.export(0).await.unwrap();
    let mut bad = through_frames(&a, &b, &kv);
    let at = bad.state.len() - section;
    bad.state[at..at + 4].copy_from_slice(&2u32.to_le_bytes());
    let refused = b.import(2, bad).await;
    assert!(matches!(refused, Err(EngineError::Kv(_))), "{refused:?}");
    ship(&a, &b, &kv, 2).await.unwrap();
    let pre = a.prefill(0, toks, SamplingParams::greedy(4)).await.unwrap();
    let after = b
        .generate(2, pre.first_token, 0, SamplingParams::greedy(4))
        .await
        .unwrap();
    assert!(!after.tokens.is_empty());
}
