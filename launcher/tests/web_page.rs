//! The web page and the cluster view over one split cluster: the page's files, `/v1/cluster` and
//! its event stream, `exo-router status`, and the page itself in headless Chromium (Debian's
//! `chromium`): it loads, sends a chat, shows the streamed answer with the nodes that made it, and
//! shows both nodes in the cluster view.
//!
//! Without a `chromium` on PATH the browser part is skipped with a line saying so, unless
//! `EXO_REQUIRE_CHROMIUM=1` (set by scripts/test, which installs it) makes that a failure.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::browser::{self, Browser};
use common::start_profile;
use exo_router::api::status::ClusterStatus;
use exo_router::cluster::Outcome;
use serde_json::{Value, json};

const QUESTION: &str = "Give three tips for sleeping well.";

async fn get(base: &str, path: &str) -> reqwest::Response {
    reqwest::get(format!("{base}{path}")).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_chats_and_shows_the_cluster() {
    let server = start_profile("local.toml").await;
    let model = server.cluster.model_id();
    let base = format!("http://{}", server.addr);

    // The page's files, with a policy that allows scripts from this origin only.
    let page = get(&base, "/").await;
    assert_eq!(page.status().as_u16(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(page.text().await.unwrap().contains("/ui/app.js"));
    let js = get(&base, "/ui/app.js").await;
    assert!(
        js.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );

    // The cluster before any request: both nodes up, with their hardware.
    let status: ClusterStatus = get(&base, "/v1/cluster").await.json().await.unwrap();
    assert!(status.ready);
    assert_eq!(status.model, model);
    let names: Vec<&str> = status.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["prefill-0", "decode-0"]);
    for n in &status.nodes {
        assert!(n.healthy, "{n:?}");
        let hw = n.hardware.as_ref().unwrap();
        assert!(hw.cpu_threads > 0 && hw.n_layer == 30, "{hw:?}");
        assert_eq!(n.slots_in_use, 0);
    }

    // The answer the API gives; the page must show the same text.
    let request = json!({
        "model": model, "max_tokens": 64, "temperature": 0,
        "messages": [{ "role": "user", "content": QUESTION }],
    });
    let api: Value = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&request)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let expected = api["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!expected.is_empty());

    match browser::find() {
        Some(binary) => in_the_browser(binary, &base, &expected).await,
        None => {
            let required = std::env::var("EXO_REQUIRE_CHROMIUM").is_ok_and(|v| v == "1");
            assert!(!required, "EXO_REQUIRE_CHROMIUM=1 but no chromium on PATH");
            eprintln!("web_page: no chromium on PATH: the browser checks are skipped");
        }
    }

    // What the view reads now: the requests, done, and the hand-offs between the two nodes.
    let status: ClusterStatus = get(&base, "/v1/cluster").await.json().await.unwrap();
    let done = status.recent.iter().filter(|r| r.outcome == Outcome::Done);
    assert!(done.count() >= 1, "{:?}", status.recent);
    let r = &status.recent[0];
    assert_eq!(
        (r.prefill.as_str(), r.decode.as_str()),
        ("prefill-0", "decode-0")
    );
    assert!(
        r.prompt_tokens > 0 && r.completion_tokens > 0 && r.ttft_ms > 0.0,
        "{r:?}"
    );
    let link = &status.links[0];
    assert_eq!(
        (link.prefill.as_str(), link.decode.as_str()),
        ("prefill-0", "decode-0")
    );
    assert_eq!(link.handoffs as usize, status.recent.len());
    // The wire bytes: at least the f16 cache of the prompts (23,040 bytes a token) plus framing.
    assert!(link.kv_bytes >= link.kv_tokens * 23_040, "{link:?}");
    assert!(
        status
            .nodes
            .iter()
            .all(|n| n.slots_in_use == 0 && n.in_flight == 0)
    );

    // The event stream sends the same state, as `cluster` events.
    let mut events = get(&base, "/v1/cluster/events").await;
    assert!(
        events.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut first = String::new();
    while !first.contains("\n\n") {
        let chunk = events.chunk().await.unwrap().unwrap();
        first += &String::from_utf8_lossy(&chunk);
    }
    assert!(first.starts_with("event: cluster\ndata: "), "{first}");
    let data = first.lines().nth(1).unwrap().trim_start_matches("data: ");
    let streamed: ClusterStatus = serde_json::from_str(data).unwrap();
    assert_eq!(streamed.nodes.len(), 2);
    drop(events);

    // `exo-router status` prints the same cluster.
    let out = Command::new(env!("CARGO_BIN_EXE_exo-router"))
        .args(["status", "--url", &base])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("ready"), "{text}");
    for node in ["prefill-0", "decode-0"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(node) && l.contains(" up ")),
            "{text}"
        );
    }
    assert!(text.contains("prefill-0 -> decode-0: "), "{text}");
    let out = Command::new(env!("CARGO_BIN_EXE_exo-router"))
        .args(["status", "--url", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: cannot reach the router"), "{err}");
    server.shutdown().await;
}

/// The page in headless Chromium: a chat sent from the address (`?q=`) streams the same answer
/// the API gave, names the nodes that made it, and the cluster view shows both nodes and the
/// request. With `EXO_UI_SCREENSHOTS=DIR`, screenshots for docs/ui.md go there.
async fn in_the_browser(binary: &str, base: &str, expected: &str) {
    let query = QUESTION.replace(' ', "+");
    let url = format!("{base}/?q={query}&temperature=0&max_tokens=64");
    let mut b = Browser::start(binary).await;
    b.open(&url, (1280, 800), false).await;
    let answer = "document.querySelector('.msg.assistant')";
    let finished = format!("['done', 'error'].includes({answer}?.dataset.state)");
    b.wait_for(&finished, Duration::from_secs(90), "the answer")
        .await;
    let state = b.eval(&format!("{answer}.dataset.state")).await;
    let meta = b
        .eval(&format!("{answer}.querySelector('.meta').innerText"))
        .await;
    assert_eq!(state, "done", "{meta}");
    // The conversation the page keeps (and sends back next turn) holds the streamed text; the
    // bubble shows it as markdown.
    let kept = b.eval("state.history.map(m => m.content)").await;
    assert_eq!(kept, json!([QUESTION, expected]));
    if expected.contains("1. **") {
        let list = b
            .eval(&format!(
                "{answer}.querySelectorAll('.body ol > li > strong').length"
            ))
            .await;
        assert!(list.as_u64().unwrap() >= 1, "{list}");
    }
    let meta = meta.as_str().unwrap();
    assert!(meta.contains("TTFT") && meta.contains("tok/s"), "{meta}");
    assert!(
        meta.contains("prefill-0") && meta.contains("decode-0"),
        "{meta}"
    );
    // The live view: both nodes up, the ready state, and the request among the recent ones.
    let live = "document.querySelectorAll('.node:not(.down)').length === 2 \
        && document.querySelector('#state-chip').dataset.state === 'ready' \
        && document.querySelectorAll('#recent tbody tr').length >= 2";
    b.wait_for(live, Duration::from_secs(10), "the cluster view")
        .await;
    let nodes = b
        .eval("[...document.querySelectorAll('[data-node]')].map(n => n.dataset.node)")
        .await;
    assert_eq!(nodes, json!(["prefill-0", "decode-0"]));
    let link = b.eval("document.querySelector('#links').innerText").await;
    assert!(link.as_str().unwrap().contains("hand-offs"), "{link}");

    let Ok(dir) = std::env::var("EXO_UI_SCREENSHOTS") else {
        return;
    };
    let dir = std::path::Path::new(&dir);
    std::fs::create_dir_all(dir).unwrap();
    b.screenshot(&dir.join("desktop.png")).await;
    let dark = json!({ "features": [{ "name": "prefers-color-scheme", "value": "dark" }] });
    b.call("Emulation.setEmulatedMedia", dark).await;
    b.screenshot(&dir.join("desktop-dark.png")).await;
    // A phone: the chat, then the cluster tab.
    b.open(&url, (390, 844), true).await;
    b.wait_for(
        &format!("{answer}?.dataset.state === 'done'"),
        Duration::from_secs(90),
        "the phone's answer",
    )
    .await;
    b.screenshot(&dir.join("phone-chat.png")).await;
    b.eval("document.querySelector('.tab[data-view=cluster]').click()")
        .await;
    b.wait_for(
        "document.querySelectorAll('.node').length === 2",
        Duration::from_secs(10),
        "the phone's cluster view",
    )
    .await;
    b.screenshot(&dir.join("phone-cluster.png")).await;
}
