//! Continuous batching: sequences decoded together in one batch produce exactly what each produces
//! alone, also when they join and leave at different times; prompts prefilled together, several per
//! batch and cut at any token, leave exactly the cache each leaves alone.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use exo_engine::{ContextConfig, ContextHandle, PrefillBatching};
use exo_kvcache::KvLayout;
use exo_sampling::SamplingParams;

use exo_test_support::{context, model};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_generation_equals_solo_generation() {
    let model = model();
    let layout = KvLayout {
        n_seq_max: 8,
        n_ctx_seq: 512,
        ..KvLayout::default()
    };
    let ctx = context(layout);
    let topics = [
        "rivers",
        "volcanoes",
        "bread",
        "chess",
        "comets",
        "violins",
        "glaciers",
        "bees",
    ];
    let prompts: Vec<Vec<i32>> = topics
        .iter()
        .map(|t| {
            model.tokenize(
                &format!("<|im_start|>user\nTell me about {t}.<|im_end|>\n<|im_start|>assistant\n"),
                false,
            )
        })
        .collect();
    // Different lengths and samplers, so sequences leave the batch at different steps.
    let sampling = |i: usize| {
        if i.is_multiple_of(2) {
            SamplingParams::greedy(20 + 6 * i as u32)
        } else {
            SamplingParams {
                temperature: 0.9,
                seed: i as u64,
                max_tokens: 20 + 6 * i as u32,
                ..SamplingParams::default()
            }
        }
    };
    let mut solo = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let pre = ctx.prefill(0, p.clone(), sampling(i)).await.unwrap();
        solo.push(
            ctx.generate(0, pre.first_token, 0, sampling(i))
                .await
                .unwrap(),
        );
    }
    ctx.clear(0).await.unwrap();
    let mut firsts = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        firsts.push(
            ctx.prefill(i as i32, p.clone(), sampling(i))
                .await
                .unwrap()
                .first_token,
        );
    }
    let runs = (0..prompts.len()).map(|i| {
        let ctx = ctx.clone();
        let first = firsts[i];
        async move { ctx.generate(i as i32, first, 0, sampling(i)).await.unwrap() }
    });
    let together = futures::future::join_all(runs).await;
    for (i, (a, b)) in solo.iter().zip(&together).enumerate() {
        assert_eq!(a.tokens, b.tokens, "sequence {i} ({})", topics[i]);
        assert_eq!(a.text, b.text);
    }
    // A sequence that joins while others are mid-generation also matches.
    let late = ctx
        .prefill(0, prompts[3].clone(), sampling(3))
        .await
        .unwrap();
    let early = {
        let ctx = ctx.clone();
        let p = prompts[2].clone();
        tokio::spawn(async move {
            let pre = ctx.prefill(1, p, sampling(2)).await.unwrap();
            ctx.generate(1, pre.first_token, 0, sampling(2))
                .await
                .unwrap()
        })
    };
    let joined = ctx
        .generate(0, late.first_token, 0, sampling(3))
        .await
        .unwrap();
    assert_eq!(joined.tokens, solo[3].tokens);
    assert_eq!(early.await.unwrap().tokens, solo[2].tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_take_turns_and_keep_their_results() {
    let model = model();
    let layout = KvLayout {
        n_seq_max: 2,
        n_ctx_seq: 4096,
        ..KvLayout::default()
    };
    let ctx = context(layout);
    let long = model.tokenize(
        &"The lighthouse keeper logged the weather at dawn and at dusk. ".repeat(140),
        true,
    );
    let short = model.tokenize("The capital of France is", true);
    assert!(
        long.len() > 3 * 512,
        "long prompt has {} tokens",
        long.len()
    );
    let greedy = SamplingParams::greedy(8);
    let solo_long = ctx.prefill(0, long.clone(), greedy.clone()).await.unwrap();
    let solo_short = ctx.prefill(1, short.clone(), greedy.clone()).await.unwrap();
    // Forget them, so neither prompt reuses its own cache below (prefix reuse): both must run.
    ctx.clear(0).await.unwrap();
    ctx.clear(1).await.unwrap();

    // The long prompt starts first; the short one arrives while it runs and finishes before it.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let long_run = {
        let (ctx, done, long, g) = (ctx.clone(), done_tx.clone(), long.clone(), greedy.clone());
        tokio::spawn(async move {
            let out = ctx.prefill(0, long, g).await.unwrap();
            done.send("long").unwrap();
            out
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let short_out = ctx.prefill(1, short, greedy).await.unwrap();
    done_tx.send("short").unwrap();
    let long_out = long_run.await.unwrap();
    assert_eq!(
        done_rx.recv().await,
        Some("short"),
        "the short prompt waited for the whole long one"
    );
    assert_eq!(short_out, solo_short);
    assert_eq!(long_out, solo_long);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_sharing_prefill_batches_keep_their_results() {
    let model = model();
    let config = ContextConfig {
        layout: KvLayout {
            n_seq_max: 4,
            n_ctx_seq: 1024,
            ..KvLayout::default()
        },
        // Small batches, so the long prompt runs in several, cut wherever the short ones leave room.
        n_batch: 64,
        prefill_batching: PrefillBatching::Always,
        ..ContextConfig::default()
    };
    let ctx = ContextHandle::spawn(model.clone(), config).unwrap();
    let prompts: Vec<Vec<i32>> = [300, 20, 45, 7]
        .iter()
        .enumerate()
        .map(|(v, &n)| model.filler_tokens(n, v))
        .collect();
    let greedy = SamplingParams::greedy(12);
    // Each prompt alone, in the sequence it gets below (the state names its cells' sequence): its
    // chunks start at multiples of 64 and nothing shares its batches.
    let mut solo = Vec::new();
    for (seq, p) in prompts.iter().enumerate() {
        let seq = seq as i32;
        let pre = ctx.prefill(seq, p.clone(), greedy.clone()).await.unwrap();
        let kv = ctx.export(seq).await.unwrap();
        let out = ctx
            .generate(seq, pre.first_token, 0, greedy.clone())
            .await
            .unwrap();
        ctx.clear(seq).await.unwrap();
        solo.push((pre, kv, out));
    }
    // All at once: shortest first, several per batch, the long one cut at other places.
    let runs = prompts.iter().enumerate().map(|(seq, p)| {
        let (ctx, p, g) = (ctx.clone(), p.clone(), greedy.clone());
        async move {
            let pre = ctx.prefill(seq as i32, p, g.clone()).await.unwrap();
            let kv = ctx.export(seq as i32).await.unwrap();
            let out = ctx
                .generate(seq as i32, pre.first_token, 0, g)
                .await
                .unwrap();
            (pre, kv, out)
        }
    });
    let together = futures::future::join_all(runs).await;
    for (i, (a, b)) in solo.iter().zip(&together).enumerate() {
        assert_eq!(a.0, b.0, "prompt {i}: first token");
        assert!(a.1 == b.1, "prompt {i}: the KV cache differs");
        assert_eq!(a.2.tokens, b.2.tokens, "prompt {i}: generated tokens");
    }
}
