//! Every API error answers with its status and OpenAI's error body; a client that disconnects
//! mid-stream frees its sequence on the decode node.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{long_message, node_metric, post, start_text};
use serde_json::{Value, json};

/// A split cluster with a small context and a single decode slot.
const SMALL: &str = r#"
model = "MODEL"
placement = "disaggregated"
[layout]
n_ctx_seq = 256
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

fn assert_error(status: u16, body: &Value, want_status: u16, want_type: &str) {
    assert_eq!(status, want_status, "{body}");
    let err = &body["error"];
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(err["type"], want_type, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_400_with_openai_error_bodies() {
    let server = start_text(SMALL).await;
    let model = server.cluster.model_id();
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/chat/completions", server.addr);

    let malformed = client.post(&url).body("{\"model\": ").send().await.unwrap();
    let status = malformed.status().as_u16();
    assert_error(
        status,
        &malformed.json().await.unwrap(),
        400,
        "invalid_request_error",
    );

    let msg = |content: &str| json!([{ "role": "user", "content": content }]);
    let cases = [
        (
            json!({ "model": "gpt-4o", "messages": msg("hi") }),
            "model_not_found",
        ),
        (json!({ "messages": msg("hi") }), ""),
        (json!({ "model": model, "messages": [] }), ""),
        (json!({ "model": model, "messages": msg("hi"), "n": 2 }), ""),
        (
            json!({ "model": model, "messages": msg("hi"), "temperature": 7 }),
            "",
        ),
        (
            json!({ "model": model, "messages": msg(&long_message(400)) }),
            "context_length_exceeded",
        ),
        (
            json!({ "model": model, "messages": [{ "role": "wizard", "content": "hi" }] }),
            "",
        ),
        (
            json!({ "model": model, "messages": msg("hi"), "tools": [{ "type": "function" }] }),
            "",
        ),
    ];
    for (body, code) in cases {
        let a = post(server.addr, "/v1/chat/completions", &body).await;
        assert_error(a.status, &a.body, 400, "invalid_request_error");
        if !code.is_empty() {
            assert_eq!(a.body["error"]["code"], code, "{}", a.body);
        }
    }
    let empty_prompt = post(
        server.addr,
        "/v1/completions",
        &json!({ "model": model, "prompt": "" }),
    )
    .await;
    assert_error(
        empty_prompt.status,
        &empty_prompt.body,
        400,
        "invalid_request_error",
    );

    // The server still answers properly after all of that.
    let ok = post(
        server.addr,
        "/v1/chat/completions",
        &json!({ "model": model, "messages": msg("hi"), "max_tokens": 4 }),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reachable_node_gives_503_quickly() {
    // Nothing listens on these ports (bound, then released).
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let text = format!(
        "model = \"MODEL\"\nplacement = \"disaggregated\"\n[[nodes]]\nname = \"p\"\naddress = \"{}\"\nrole = \"prefill\"\n[[nodes]]\nname = \"d\"\naddress = \"{}\"\nrole = \"decode\"\n",
        free(),
        free()
    );
    let server = start_text(&text).await;
    let body = json!({ "model": server.cluster.model_id(), "messages": [{ "role": "user", "content": "hi" }] });
    let a = tokio::time::timeout(
        Duration::from_secs(10),
        post(server.addr, "/v1/chat/completions", &body),
    )
    .await
    .unwrap();
    assert_error(a.status, &a.body, 503, "service_unavailable");
    let health = reqwest::get(format!("http://{}/health", server.addr))
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 503);
    server.shutdown().await;
}

/// Starts a streaming request for a long story of up to `max_tokens` tokens; its response is open.
async fn long_stream(
    addr: std::net::SocketAddr,
    model: &str,
    max_tokens: u32,
) -> reqwest::Response {
    let long = json!({
        "model": model, "messages": [{ "role": "user", "content": "Write a very long story." }],
        "max_tokens": max_tokens, "stream": true, "temperature": 1.0, "seed": 3,
    });
    let resp = reqwest::Client::new()
        .post(format!("http://{addr}/v1/chat/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    resp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_frees_its_slot() {
    let server = start_text(SMALL).await;
    let model = server.cluster.model_id();
    let mut resp = long_stream(server.addr, &model, 200).await;
    let mut seen = String::new();
    while !seen.contains("\"content\":\"") || seen.matches("data:").count() < 4 {
        seen += &String::from_utf8_lossy(&resp.chunk().await.unwrap().unwrap());
    }
    drop(resp);
    // The decode node has one slot: these requests are served only if the dropped stream freed it.
    for _ in 0..3 {
        let short = json!({ "model": model, "messages": [{ "role": "user", "content": "Say hi." }], "max_tokens": 8 });
        let a = post(server.addr, "/v1/chat/completions", &short).await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    assert!(server.cluster.nodes().iter().all(|n| n.in_flight() == 0));
    server.shutdown().await;
}

/// Cancellation reaches the engine: a stream dropped after a few tokens stops generating on its
/// decode node within a token or two (counted, not timed), instead of running on to `max_tokens`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_stops_generating_at_once() {
    // Node names of its own: the metrics registry is shared by the tests of this binary.
    let server = start_text(
        &SMALL
            .replace("\"p\"", "\"p-drop\"")
            .replace("\"d\"", "\"d-drop\""),
    )
    .await;
    let model = server.cluster.model_id();
    let mut resp = long_stream(server.addr, &model, 180).await;
    // Token 0 comes from the prefill node; read five more content deltas, so the decode node has
    // generated at least five tokens (the role chunk's empty content does not count).
    let mut seen = String::new();
    while seen.matches("\"delta\":{\"content\":\"").count() < 6 {
        seen += &String::from_utf8_lossy(&resp.chunk().await.unwrap().unwrap());
    }
    drop(resp);
    let metrics = || async {
        reqwest::get(format!("http://{}/metrics", server.addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    // Wait for the sequence to leave the decode node, however long that takes...
    let mut page = metrics().await;
    for _ in 0..600 {
        if node_metric(&page, "exo_decode_active_sequences", "d-drop") == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        page = metrics().await;
    }
    assert_eq!(
        node_metric(&page, "exo_decode_active_sequences", "d-drop"),
        0.0,
        "{page}"
    );
    // ...then count what it generated: a few tokens past the five read, not the 180 asked for.
    let generated = node_metric(&page, "exo_decode_tokens_total", "d-drop");
    assert!(
        (4.0..40.0).contains(&generated),
        "{generated} tokens generated after the drop"
    );
    server.shutdown().await;
}
