//! Another architecture through the whole system: Gemma 3 270M (`scripts/fetch-model gemma3`), an
//! interleaved sliding-window model whose KV state holds two caches, served split (prefill node ->
//! decode node over tarpc) with prompts longer than its 512-token window, the cache streamed in
//! pieces while the prompt runs, and two requests decoding side by side.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;

use common::post;
use exo_router::profile::Profile;
use exo_test_support::root;
use serde_json::json;

const GEMMA: &str = "models/gemma-3-270m-q4_k_m.gguf";

/// Plain text (the base model has no chat template) of about `entries * 25` tokens.
fn log_prompt(entries: usize, variant: usize) -> String {
    let mut text = String::new();
    for i in 0..entries {
        text += &format!(
            "Entry {i}: the ferry from harbour {} left at {}:{:02} carrying {} passengers. ",
            (i + variant) % 5,
            6 + i % 12,
            (i * 7 + variant) % 60,
            40 + i * 3
        );
    }
    text + &format!("Entry {entries}:")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sliding_window_model_is_served_split_past_its_window() {
    let gemma = root().join(GEMMA);
    assert!(
        gemma.is_file(),
        "{GEMMA} missing: run scripts/fetch-model gemma3"
    );
    // No perf tables: the router leaves the pieces to the prefill node, which ships a long
    // prompt's cache in pieces of 256 tokens or more while the prompt runs.
    let text = format!(
        r#"
model = "{}"
placement = "disaggregated"
[kv]
codec = "lz4"
[layout]
n_ctx_seq = 2048
[[nodes]]
name = "prefill-0"
address = "embedded"
role = "prefill"
slots = 2
[[nodes]]
name = "decode-0"
address = "embedded"
role = "decode"
slots = 2
"#,
        gemma.display()
    );
    let profile = Profile::parse(&text, Path::new("gemma-split.toml")).unwrap();
    let server = exo_launcher::start(&profile, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let models = reqwest::get(format!("http://{}/v1/models", server.addr))
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "gemma-3-270m-q4_k_m", "{models}");

    // Two long prompts at once: each past the window, each cache streamed in pieces, both decoding
    // in one batch on the decode node.
    let ask = |variant: usize, stream: bool| {
        let body = json!({
            "model": "gemma-3-270m-q4_k_m", "prompt": log_prompt(48, variant),
            "max_tokens": 12, "temperature": 0, "stream": stream,
        });
        async move { post(server.addr, "/v1/completions", &body).await }
    };
    let (a, b) = tokio::join!(ask(0, false), ask(1, true));
    for answer in [&a, &b] {
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(
            (answer.prefill_node.as_str(), answer.decode_node.as_str()),
            ("prefill-0", "decode-0")
        );
    }
    let metrics = reqwest::get(format!("http://{}/metrics", server.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let pieces = common::node_counter(&metrics, "exo_kv_pieces_total", "prefill-0")
        .unwrap_or_else(|| panic!("no exo_kv_pieces_total: {metrics}"));
    assert!(pieces > 2, "two caches went in {pieces} pieces in all");
    let usage = &a.body["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 1000, "{usage}");
    assert_eq!(usage["completion_tokens"], 12, "{usage}");
    let a_text = a.body["choices"][0]["text"].as_str().unwrap();
    // The log continues: the next entry's ferry, in the prompt's own words.
    assert!(a_text.contains("ferry"), "{a_text:?}");
    assert!(b.text.contains("ferry"), "{:?}", b.text);
    assert_eq!(b.finish, "length");
    // A base model has no chat template: a chat request is refused, naming what is missing.
    let chat = json!({
        "model": "gemma-3-270m-q4_k_m", "max_tokens": 4,
        "messages": [{ "role": "user", "content": "Hello" }],
    });
    let refused = post(server.addr, "/v1/chat/completions", &chat).await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(
        refused.body.to_string().contains("chat_template"),
        "{}",
        refused.body
    );
    server.shutdown().await;
}
