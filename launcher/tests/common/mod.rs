//! Helpers shared by the router's integration tests: start clusters, talk HTTP, read SSE.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::Path;

use std::time::{Duration, Instant};

use exo_router::Server;
use exo_router::api::status::ClusterStatus;
use exo_router::profile::Profile;
use serde_json::Value;

pub use exo_test_support::{model_path, root};

pub mod browser;
pub mod procs;

/// The router's cluster view (`GET base/v1/cluster`).
pub async fn status(base: &str) -> ClusterStatus {
    reqwest::get(format!("{base}/v1/cluster"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Waits up to 30 s until `ok` holds for the cluster; returns how long it took.
pub async fn until(base: &str, what: &str, ok: impl Fn(&ClusterStatus) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        let s = status(base).await;
        if ok(&s) {
            return start.elapsed();
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{what}: {s:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts an in-process router for a shipped profile, on a free port.
pub async fn start_profile(name: &str) -> Server {
    let profile = Profile::load(&root().join("profiles").join(name)).unwrap();
    exo_launcher::start(&profile, SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap()
}

/// Starts an in-process router for profile text (its model path is absolute).
pub async fn start_text(text: &str) -> Server {
    let text = text.replace("MODEL", &model_path().display().to_string());
    let profile = Profile::parse(&text, Path::new("test-profile.toml")).unwrap();
    exo_launcher::start(&profile, SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap()
}

/// What one HTTP call returned.
pub struct Answer {
    pub status: u16,
    pub prefill_node: String,
    pub decode_node: String,
    /// The `x-exo-kv-pieces` header (empty when absent).
    pub kv_pieces: String,
    pub body: Value,
    /// For streams: the concatenated text and the finish reason.
    pub text: String,
    pub finish: String,
}

fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// Posts JSON and decodes the answer; for `"stream": true` requests, parses the event stream.
pub async fn post(addr: SocketAddr, path: &str, body: &Value) -> Answer {
    let resp = reqwest::Client::new()
        .post(format!("http://{addr}{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let prefill_node = header(&resp, "x-exo-prefill-node");
    let decode_node = header(&resp, "x-exo-decode-node");
    let kv_pieces = header(&resp, "x-exo-kv-pieces");
    let streaming = body.get("stream").and_then(Value::as_bool).unwrap_or(false) && status == 200;
    let raw = resp.text().await.unwrap();
    if !streaming {
        let body: Value = serde_json::from_str(&raw).unwrap_or(Value::Null);
        let choice = &body["choices"][0];
        let text = choice["message"]["content"]
            .as_str()
            .or(choice["text"].as_str())
            .unwrap_or_default()
            .to_string();
        let finish = choice["finish_reason"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        return Answer {
            status,
            prefill_node,
            decode_node,
            kv_pieces,
            body,
            text,
            finish,
        };
    }
    let events: Vec<&str> = raw
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(
        events.last(),
        Some(&"[DONE]"),
        "stream must end with [DONE]: {raw}"
    );
    let mut text = String::new();
    let mut finish = String::new();
    let mut usage = Value::Null;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        if let Some(u) = v.get("usage") {
            usage = u.clone();
        }
        let Some(choice) = v["choices"].get(0) else {
            continue;
        };
        text += choice["delta"]["content"]
            .as_str()
            .or(choice["text"].as_str())
            .unwrap_or_default();
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    Answer {
        status,
        prefill_node,
        decode_node,
        kv_pieces,
        body: serde_json::json!({ "usage": usage }),
        text,
        finish,
    }
}

/// A chat prompt of roughly `words` words.
pub fn long_message(words: usize) -> String {
    let topics = [
        "harbours",
        "canals",
        "vineyards",
        "windmills",
        "libraries",
        "ferries",
    ];
    let mut text = String::new();
    let mut i = 0;
    while text.split_whitespace().count() < words {
        text += &format!(
            "Record {i}: the {} of district {} reopened in {}. ",
            topics[i % topics.len()],
            i % 11,
            1900 + i
        );
        i += 1;
    }
    text + "Which district appears most often?"
}

/// The value of `metric{node="NODE"}` in a Prometheus text page (0 when absent).
pub fn node_metric(page: &str, metric: &str, node: &str) -> f64 {
    let key = format!("{metric}{{node=\"{node}\"}} ");
    page.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Writes a disaggregated profile for `prefill` and `decode` (name, address) running `model`
/// into a new folder named with `tag` under the temporary folder; returns the folder (remove it
/// at the end) and the profile's path.
pub fn write_split_profile(
    model: &str,
    prefill: (&str, &str),
    decode: (&str, &str),
    tag: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let nodes = [
        (prefill.0, prefill.1, "prefill"),
        (decode.0, decode.1, "decode"),
    ];
    write_profile(model, &nodes, "", tag)
}

/// [`write_split_profile`] for any `nodes` (name, address, role), with `extra` TOML (tables such
/// as `[router]`) after the top-level keys.
pub fn write_profile(
    model: &str,
    nodes: &[(&str, &str, &str)],
    extra: &str,
    tag: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("exo-router-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let profile = dir.join("cluster.toml");
    let mut text = format!("model = \"{model}\"\nplacement = \"disaggregated\"\n{extra}\n");
    for (name, address, role) in nodes {
        text +=
            &format!("[[nodes]]\nname = \"{name}\"\naddress = \"{address}\"\nrole = \"{role}\"\n");
    }
    std::fs::write(&profile, text).unwrap();
    (dir, profile)
}

/// The value of counter `name` for `node` in a Prometheus text scrape (`None` when absent).
pub fn node_counter(metrics: &str, name: &str, node: &str) -> Option<u64> {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l.contains(&format!("node=\"{node}\"")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok())
}
