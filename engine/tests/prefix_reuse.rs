//! Prefix reuse: a prompt that starts like the one a freed slot last ran keeps that start's cache
//! and computes only the rest, and leaves exactly the cache, first token and continuation that
//! computing the whole prompt leaves.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use exo_engine::{ContextConfig, ContextHandle, Generated, PrefillOutput};
use exo_kvcache::KvLayout;
use exo_sampling::SamplingParams;

use exo_test_support::model;

fn context(prefix_reuse: bool) -> ContextHandle {
    let config = ContextConfig {
        layout: KvLayout {
            n_seq_max: 3,
            n_ctx_seq: 1024,
            ..KvLayout::default()
        },
        // Small batches, so prompts run in several and the reused start ends mid-batch.
        n_batch: 48,
        prefix_reuse,
        ..ContextConfig::default()
    };
    ContextHandle::spawn(Arc::clone(&model()), config).unwrap()
}

fn chat(text: &str) -> Vec<i32> {
    model().tokenize(
        &format!(
            "<|im_start|>system\nYou are a careful assistant who answers in full sentences and \
             checks every fact twice before writing it down.<|im_end|>\n<|im_start|>user\n{text}\
             <|im_end|>\n<|im_start|>assistant\n"
        ),
        false,
    )
}

fn sampled() -> SamplingParams {
    SamplingParams {
        temperature: 0.9,
        seed: 7,
        max_tokens: 24,
        ..SamplingParams::default()
    }
}

/// Prefills `prompt` in a slot leased for it, exports the cache and generates; the lease is freed
/// at the end (the slot keeps its cache where the context reuses prefixes).
async fn run(ctx: &ContextHandle, prompt: &[i32]) -> (PrefillOutput, Vec<u8>, Generated) {
    let lease = ctx.acquire_slot_for(prompt).await;
    let seq = lease.seq();
    let out = ctx.prefill(seq, prompt.to_vec(), sampled()).await.unwrap();
    let kv = ctx.export(seq).await.unwrap();
    assert_eq!(kv.tokens, prompt);
    let generated = ctx
        .generate(seq, out.first_token, 0, sampled())
        .await
        .unwrap();
    (out, kv.state, generated)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_start_leaves_the_cache_and_output_of_a_whole_prefill() {
    let first = chat("Describe how a lighthouse keeper spent a winter night on the island.");
    let second = chat("Describe how a baker prepares bread before dawn in a small village.");
    let shared = first
        .iter()
        .zip(&second)
        .take_while(|(a, b)| a == b)
        .count();
    assert!(shared > 30, "the prompts share {shared} tokens");

    let reusing = context(true);
    let whole = context(false);
    let (out, _, _) = run(&reusing, &first).await;
    assert_eq!(out.reused, 0, "nothing to reuse in a new context");
    // A prompt that starts like none of them comes in between, and takes an empty slot.
    run(&reusing, &model().tokenize("Name three rivers.", false)).await;

    // The second prompt finds the first one's slot and keeps their shared start; run again, it
    // keeps all of itself but the two tokens that always run; the first then finds it again.
    let expected = [shared, second.len() - 2, shared];
    for (prompt, expected) in [&second, &second, &first].into_iter().zip(expected) {
        let (reused_out, reused_kv, reused_gen) = run(&reusing, prompt).await;
        let (whole_out, whole_kv, whole_gen) = run(&whole, prompt).await;
        assert_eq!(reused_out.reused, expected);
        assert_eq!(whole_out.reused, 0);
        assert_eq!(reused_out.first_token, whole_out.first_token);
        assert!(reused_kv == whole_kv, "the caches differ");
        assert_eq!(reused_gen.tokens, whole_gen.tokens);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_cache_or_a_cleared_slot_is_never_reused() {
    let ctx = context(true);
    let prompt = chat("Explain why the sky looks blue at noon.");
    let (_, _, _) = run(&ctx, &prompt).await;
    // Clearing forgets the start: the same prompt runs whole again.
    for seq in 0..3 {
        ctx.clear(seq).await.unwrap();
    }
    let (out, _, _) = run(&ctx, &prompt).await;
    assert_eq!(out.reused, 0);
    // A cache imported into the slot was computed elsewhere: not reused either.
    let lease = ctx.acquire_slot_for(&prompt).await;
    let seq = lease.seq();
    let kv = ctx.export(seq).await.unwrap();
    let layout = ctx.config().layout;
    let (header, chunks, end) =
        exo_test_support::frames(&ctx, &kv, layout, exo_kvcache::Codec::None, 1 << 20);
    let decoded = exo_test_support::receive(&ctx, &header, &chunks, &end).unwrap();
    ctx.import(seq, decoded).await.unwrap();
    let out = ctx.prefill(seq, prompt.clone(), sampled()).await.unwrap();
    assert_eq!(out.reused, 0);
}
