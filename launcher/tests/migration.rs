//! Request migration, with real processes: a node that dies (kill -9) while it serves requests
//! costs them nothing. Streams on a decode node that dies go on from another decode node, with
//! text identical to an undisturbed run (greedy, seeded and JSON-constrained); a prompt whose
//! prefill node dies runs again on another prefill node.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::procs::{Proc, free_addr, last_word, metrics, spawn, spawn_node};
use common::{long_message, model_path, node_metric, post, write_profile};
use futures::StreamExt;
use serde_json::{Value, json};

/// Starts `serve` on `profile` and returns it with its HTTP address.
fn serve(profile: &std::path::Path) -> (Proc, String) {
    let args = [
        "serve",
        "--profile",
        profile.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ];
    let (proc, line) = spawn(&args, "listening on http");
    (proc, last_word(&line))
}

/// Waits (up to 30 s) until the router at `addr` reports node `name` healthy.
async fn wait_healthy(addr: &str, name: &str) {
    for _ in 0..300 {
        let health: Value = reqwest::get(format!("http://{addr}/health"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let up = health["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|n| n["name"] == name && n["healthy"] == true);
        if up {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("node {name} never became healthy at {addr}");
}

/// Streams `body` from the router at `addr`, counting content deltas in `progress`; the text and
/// the finish reason (or the error event's message).
async fn stream(addr: String, mut body: Value, progress: Arc<AtomicUsize>) -> (String, String) {
    body["stream"] = json!(true);
    let resp = reqwest::Client::new()
        .post(format!("http://{addr}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let (mut text, mut finish, mut pending) = (String::new(), String::new(), String::new());
    let mut chunks = resp.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        pending += &String::from_utf8_lossy(&chunk.unwrap());
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data).unwrap();
            if let Some(e) = v.get("error") {
                finish = format!("error: {e}");
                continue;
            }
            let choice = &v["choices"][0];
            if let Some(t) = choice["delta"]["content"].as_str() {
                text += t;
                progress.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(f) = choice["finish_reason"].as_str() {
                finish = f.to_string();
            }
        }
    }
    (text, finish)
}

/// Eight chats: greedy, seeded at a temperature, and one constrained to a JSON object.
fn chats() -> Vec<Value> {
    let topics = [
        "a lighthouse keeper",
        "a river delta",
        "a glass blower",
        "a night train",
        "a beekeeper",
        "a chess club",
        "a mountain hut",
        "a bakery at dawn",
    ];
    topics
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut body = json!({
                "model": "SmolLM2-135M-Instruct.Q4_1",
                "messages": [{ "role": "user", "content": format!("Write a long story about {t}.") }],
                "max_tokens": 160,
                "temperature": if i % 2 == 0 { 0.0 } else { 0.8 },
                "seed": i,
            });
            if i == 7 {
                body["response_format"] = json!({ "type": "json_object" });
                body["messages"][0]["content"] = json!(format!("Describe {t} as JSON."));
            }
            body
        })
        .collect()
}

/// Runs `chats()` at once against `addr`; once each has streamed at least `before` deltas, runs
/// `then` (and waits for it); returns every (text, finish) and what `then` returned.
async fn run_chats<T, F: std::future::Future<Output = T>>(
    addr: &str,
    before: usize,
    then: impl FnOnce() -> F,
) -> (Vec<(String, String)>, T) {
    let progress: Vec<Arc<AtomicUsize>> = (0..8).map(|_| Arc::default()).collect();
    let tasks: Vec<_> = chats()
        .into_iter()
        .zip(&progress)
        .map(|(body, p)| tokio::spawn(stream(addr.to_string(), body, Arc::clone(p))))
        .collect();
    while progress.iter().any(|p| p.load(Ordering::Relaxed) < before) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let done = then().await;
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    (out, done)
}

/// `exo_migrations_total{reason="REASON"}` on the router's metrics page at `addr`.
async fn migrations(addr: &str, reason: &str) -> f64 {
    let page = metrics(addr).await;
    let key = format!("exo_migrations_total{{reason=\"{reason}\"}} ");
    page.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// kill -9 of the decode node while eight streams run on it: the router resumes each on the other
/// decode node (started late, so the first one took all eight), and every stream ends as it did
/// undisturbed, text for text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_on_a_killed_decode_node_finish_elsewhere_token_exact() {
    let model = model_path().display().to_string();
    let (_prefill, p_addr) = spawn_node(&model, "prefill", "m-prefill", &["--slots", "8"]);
    let (first, a_addr) = spawn_node(&model, "decode", "m-decode-a", &["--slots", "8"]);
    let b_addr = free_addr();
    let nodes = [
        ("m-prefill", p_addr.as_str(), "prefill"),
        ("m-decode-a", a_addr.as_str(), "decode"),
        ("m-decode-b", b_addr.as_str(), "decode"),
    ];
    let (dir, profile) = write_profile(&model, &nodes, "", "migrate-decode");
    let (_router, addr) = serve(&profile);

    // Undisturbed: all eight on decode node A (B is not up).
    let (undisturbed, ()) = run_chats(&addr, 0, || async {}).await;
    for (text, finish) in &undisturbed {
        assert!(finish == "length" || finish == "stop", "{finish}: {text}");
    }

    // Again; once every stream is under way, B comes up and A is killed.
    let (model2, addr2) = (model.clone(), addr.clone());
    let (moved, _second) = run_chats(&addr, 3, move || async move {
        let mut first = first;
        let args = ["--slots", "8", "--listen", b_addr.as_str()];
        let second = spawn_node_args(&model2, "decode", "m-decode-b", &args);
        wait_healthy(&addr2, "m-decode-b").await;
        first.0.kill().unwrap();
        first.0.wait().unwrap();
        second
    })
    .await;
    for (i, ((text, finish), (want, want_finish))) in moved.iter().zip(&undisturbed).enumerate() {
        assert_eq!(finish, want_finish, "chat {i}: {text}");
        assert_eq!(text, want, "chat {i}");
    }
    // Streams that were still running when A died moved (those already done had nothing to move).
    let n = migrations(&addr, "decode_node_lost").await;
    assert!((1.0..=8.0).contains(&n), "{n} moves");
    // The slots the streams reserved, on the dead node and on the one they moved to, are free.
    let page = metrics(&addr).await;
    for node in ["m-decode-a", "m-decode-b"] {
        assert_eq!(
            node_metric(&page, "exo_decode_slots_reserved", node),
            0.0,
            "{node}: {page}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `exo-router node` with `args` (which name the listen address) as `name`; waits for it to listen.
fn spawn_node_args(model: &str, role: &str, name: &str, args: &[&str]) -> Proc {
    let mut all = common::procs::node_args(model, role, name);
    all.extend_from_slice(args);
    spawn(&all, "listening on").0
}

/// kill -9 of the prefill node while a long prompt runs on it: the router runs the prompt again on
/// the other prefill node (started late, so the first one took it), and the answer is the one an
/// undisturbed run gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_on_a_killed_prefill_node_runs_again_elsewhere() {
    let model = model_path().display().to_string();
    // A computes the prompt again the second time (no prefix reuse), so it is still running when
    // A is killed (the flag reaching the node is what keeps this test from racing B's start).
    let (mut first, p_addr) = spawn_node(&model, "prefill", "r-prefill-a", &["--no-prefix-reuse"]);
    let (_decode, d_addr) = spawn_node(&model, "decode", "r-decode", &[]);
    let q_addr = free_addr();
    let nodes = [
        ("r-prefill-a", p_addr.as_str(), "prefill"),
        ("r-prefill-b", q_addr.as_str(), "prefill"),
        ("r-decode", d_addr.as_str(), "decode"),
    ];
    let (dir, profile) = write_profile(&model, &nodes, "", "migrate-prefill");
    let (_router, addr) = serve(&profile);
    let body = json!({
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "messages": [{ "role": "user", "content": long_message(1500) }],
        "max_tokens": 24, "temperature": 0,
    });
    let http: std::net::SocketAddr = addr.parse().unwrap();
    let chat = "/v1/chat/completions";
    let undisturbed = post(http, chat, &body).await;
    assert_eq!(undisturbed.status, 200, "{}", undisturbed.body);

    // Again; B comes up while the prompt runs on A, then A is killed mid-prompt.
    let request = tokio::spawn(async move { post(http, chat, &body).await });
    let args = ["--listen", q_addr.as_str()];
    let _second = spawn_node_args(&model, "prefill", "r-prefill-b", &args);
    wait_healthy(&addr, "r-prefill-b").await;
    assert!(!request.is_finished(), "the prompt ended before the kill");
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let moved = request.await.unwrap();
    assert_eq!(moved.status, 200, "{}", moved.body);
    assert_eq!(moved.text, undisturbed.text);
    assert_eq!(migrations(&addr, "prefill_node_lost").await, 1.0);
    let _ = std::fs::remove_dir_all(&dir);
}
