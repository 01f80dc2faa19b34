//! Admission control and metrics: over the limit the API answers 429 with `retry-after`; under it
//! again requests are served; `/metrics` exposes the series with values after traffic.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{post, start_text};
use serde_json::{Value, json};

/// One decode slot and no queue: a second concurrent request is over the limit.
const TIGHT: &str = r#"
model = "MODEL"
placement = "disaggregated"
[router]
max_queued = 0
[kv]
codec = "shuffle-lz4"
[[nodes]]
name = "p"
address = "embedded"
role = "prefill"
[[nodes]]
name = "d"
address = "embedded"
role = "decode"
slots = 1
"#;

/// The value of a series line `name{...} value` (the first match), or `None`.
fn series(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_limit_gets_429_then_service_resumes_and_metrics_show_it() {
    let server = start_text(TIGHT).await;
    let model = server.cluster.model_id();
    let long = json!({
        "model": model, "messages": [{ "role": "user", "content": "Write a long story about a lighthouse." }],
        "max_tokens": 400, "stream": true, "temperature": 1.0, "seed": 5,
    });
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/chat/completions", server.addr);
    let mut held = client.post(&url).json(&long).send().await.unwrap();
    assert_eq!(held.status().as_u16(), 200);
    held.chunk().await.unwrap();

    let short = json!({ "model": model, "messages": [{ "role": "user", "content": "Say hi." }], "max_tokens": 8 });
    let over = client.post(&url).json(&short).send().await.unwrap();
    assert_eq!(over.status().as_u16(), 429);
    assert_eq!(
        over.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let body: Value = over.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("busy"))
    );

    drop(held);
    // Under the limit again once the held request is gone (its cancel takes a moment to land).
    let mut served = None;
    for _ in 0..50 {
        let a = post(server.addr, "/v1/chat/completions", &short).await;
        if a.status == 200 {
            served = Some(a);
            break;
        }
        assert_eq!(a.status, 429, "{}", a.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        served.is_some(),
        "never served after the held request ended"
    );

    let text = reqwest::get(format!("http://{}/metrics", server.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (name, label) in [
        ("exo_time_to_first_token_seconds_count", ""),
        ("exo_time_per_output_token_seconds_count", ""),
        ("exo_requests_total", "status=\"200\""),
        ("exo_requests_total", "status=\"429\""),
        ("exo_prefill_tokens_total", "node=\"p\""),
        ("exo_prefill_tokens_per_second", "node=\"p\""),
        ("exo_kv_exported_bytes_total", "node=\"p\""),
        ("exo_kv_wire_bytes_total", "node=\"p\""),
        ("exo_kv_compression_ratio", "node=\"p\""),
        ("exo_kv_transfer_seconds_count", "node=\"p\""),
        ("exo_decode_tokens_total", "node=\"d\""),
        ("exo_decode_step_seconds_count", ""),
        ("exo_placements_total", "disaggregated"),
        ("exo_completion_tokens_total", ""),
    ] {
        let v = series(&text, name, label)
            .unwrap_or_else(|| panic!("{name}{{{label}}} missing:\n{text}"));
        assert!(v > 0.0, "{name}{{{label}}} = {v}");
    }
    for gauge in [
        "exo_queue_depth",
        "exo_requests_in_flight",
        "exo_node_in_flight",
        "exo_decode_active_sequences",
    ] {
        assert!(series(&text, gauge, "").is_some(), "{gauge} missing");
    }
    server.shutdown().await;
}
