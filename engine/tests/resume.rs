//! Resuming a request elsewhere (the router's migration): a context that prefills the prompt
//! followed by the first `k` output tokens of a run, with `resumed = k`, samples exactly the run's
//! token `k`, and generation from there (`resume_stream` with those `k` tokens as history) gives
//! exactly the rest of the run, its text included: greedy, seeded and JSON-constrained.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use exo_engine::{ContextHandle, GenEvent};
use exo_kvcache::KvLayout;
use exo_sampling::{Constraint, SamplingParams};
use tokio::sync::mpsc;

use exo_test_support::{context, model};

/// Output tokens and text of generation from `next` (output number `history.len()`), `next`'s
/// own text not included.
async fn rest(
    ctx: &ContextHandle,
    next: i32,
    history: Vec<i32>,
    sampling: SamplingParams,
) -> (Vec<i32>, String) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let run = ctx.resume_stream(0, next, history, sampling, tx);
    let collect = async {
        let (mut tokens, mut text) = (Vec::new(), String::new());
        while let Some(ev) = rx.recv().await {
            match ev {
                GenEvent::Token { id, text: t, .. } => {
                    tokens.push(id);
                    text += &t;
                }
                GenEvent::Done { tail, .. } => text += &tail,
            }
        }
        (tokens, text)
    };
    let (res, out) = tokio::join!(run, collect);
    res.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_request_continues_token_for_token() {
    let model = model();
    let ctx = context(KvLayout {
        n_seq_max: 1,
        n_ctx_seq: 1024,
        ..KvLayout::default()
    });
    let prompt = model.tokenize(
        "<|im_start|>user\nDescribe a lighthouse keeper's day as JSON.<|im_end|>\n<|im_start|>assistant\n",
        false,
    );
    let runs = [
        SamplingParams::greedy(40),
        SamplingParams {
            temperature: 0.9,
            seed: 11,
            max_tokens: 40,
            ..SamplingParams::default()
        },
        SamplingParams {
            temperature: 0.7,
            seed: 5,
            max_tokens: 40,
            constraint: Some(Constraint::JsonObject),
            ..SamplingParams::default()
        },
    ];
    for sampling in runs {
        // The undisturbed run: prefill, then generation from output token 0.
        let pre = ctx
            .prefill(0, prompt.clone(), sampling.clone())
            .await
            .unwrap();
        let first = model.first_output(&[], pre.first_token, &sampling);
        let (tail, tail_text) = rest(&ctx, pre.first_token, Vec::new(), sampling.clone()).await;
        let output: Vec<i32> = [pre.first_token].into_iter().chain(tail).collect();
        let whole = first.text + &tail_text;
        assert!(output.len() > 12, "{sampling:?}: {whole}");
        for k in [1, 5, output.len() / 2, output.len() - 1] {
            // The run as the client saw it up to token k, then the move.
            let mut tokens = prompt.clone();
            tokens.extend_from_slice(&output[..k]);
            let pre = ctx
                .prefill_resumed(0, tokens, k, sampling.clone(), None)
                .await
                .unwrap();
            assert_eq!(pre.first_token, output[k], "{sampling:?}, moved at {k}");
            let history = output[..k].to_vec();
            let so_far = {
                let mut t = model.first_output(&[], output[0], &sampling).text;
                for i in 1..k {
                    t += &model.first_output(&output[..i], output[i], &sampling).text;
                }
                t
            };
            let next = model.first_output(&history, pre.first_token, &sampling);
            let (after, after_text) = rest(&ctx, pre.first_token, history, sampling.clone()).await;
            assert_eq!(&output[k + 1..], &after[..], "{sampling:?}, moved at {k}");
            assert_eq!(
                so_far + &next.text + &after_text,
                whole,
                "{sampling:?}, moved at {k}"
            );
        }
    }
    // A resumed output as long as the prompt and more is refused, not sampled from.
    let err = ctx
        .prefill_resumed(
            0,
            prompt.clone(),
            prompt.len(),
            SamplingParams::greedy(4),
            None,
        )
        .await;
    assert!(err.is_err());
}
