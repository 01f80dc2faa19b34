//! Disaggregated serving gives exactly the text colocated serving gives, through the HTTP API.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{long_message, post, start_profile};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_and_colocated_answers_are_identical() {
    let split = start_profile("local.toml").await;
    let colocated = start_profile("local-colocated.toml").await;
    let model = split.cluster.model_id();
    let prompts = [
        "What is the capital of France?".to_string(),
        long_message(330),
        long_message(1000),
    ];
    let samplings = [
        json!({ "temperature": 0 }),
        json!({ "temperature": 0.8, "seed": 4242 }),
    ];
    for (pi, prompt) in prompts.iter().enumerate() {
        for sampling in &samplings {
            for stream in [false, true] {
                let mut body = json!({
                    "model": model,
                    "messages": [{ "role": "user", "content": prompt }],
                    "max_tokens": 40,
                    "stream": stream,
                    "stream_options": { "include_usage": true },
                });
                body.as_object_mut()
                    .unwrap()
                    .extend(sampling.as_object().unwrap().clone());
                let a = post(split.addr, "/v1/chat/completions", &body).await;
                let b = post(colocated.addr, "/v1/chat/completions", &body).await;
                assert_eq!(
                    (a.status, b.status),
                    (200, 200),
                    "{:?} {:?}",
                    a.body,
                    b.body
                );
                assert!(!a.text.is_empty());
                assert_eq!(a.text, b.text, "prompt {pi}, {sampling}, stream {stream}");
                assert_eq!(a.finish, b.finish);
                assert_eq!(a.body["usage"], b.body["usage"]);
                let prompt_tokens = a.body["usage"]["prompt_tokens"].as_u64().unwrap();
                if pi == 2 {
                    assert!(
                        prompt_tokens > 1800,
                        "long prompt has only {prompt_tokens} tokens"
                    );
                }
                // Where it ran: two nodes when split, one when colocated.
                assert_eq!(
                    (a.prefill_node.as_str(), a.decode_node.as_str()),
                    ("prefill-0", "decode-0")
                );
                assert_eq!(
                    (b.prefill_node.as_str(), b.decode_node.as_str()),
                    ("local-0", "local-0")
                );
                eprintln!(
                    "prompt {pi} ({prompt_tokens} tokens), {sampling}, stream {stream}: {:?}",
                    a.text
                );
            }
        }
    }
    // The seeded answer differs from the greedy one (the seed is really used) and /v1/completions
    // agrees across the split too.
    let body = |t: Value| json!({ "model": model, "prompt": "Once upon a time", "max_tokens": 24, "temperature": t, "seed": 7 });
    let a = post(split.addr, "/v1/completions", &body(json!(0.9))).await;
    let b = post(colocated.addr, "/v1/completions", &body(json!(0.9))).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.text, b.text);
    assert_eq!(a.body["object"], "text_completion");
    let greedy = post(split.addr, "/v1/completions", &body(json!(0))).await;
    assert_ne!(greedy.text, a.text);
    split.shutdown().await;
    colocated.shutdown().await;
}
