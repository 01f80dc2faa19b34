//! Malformed and hostile HTTP requests against a server that asks for API keys: each gets a 4xx
//! with OpenAI's error body, and the server goes on answering properly afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};

use common::{long_message, start_text};
use serde_json::{Value, json};

const KEY: &str = "alice-key-0123456789abcdef";
const REVOKED: &str = "bob-key-0123456789abcdef";

/// One request of the table and what it must get.
struct Case {
    what: &'static str,
    method: &'static str,
    path: &'static str,
    /// Headers besides the key; `content-type: application/json` unless one is given here.
    headers: Vec<(&'static str, String)>,
    key: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    /// OpenAI error code expected, when one is.
    code: Option<&'static str>,
}

fn case(what: &'static str, status: u16, code: Option<&'static str>) -> Case {
    Case {
        what,
        method: "POST",
        path: "/v1/chat/completions",
        headers: Vec::new(),
        key: Some(KEY),
        body: Vec::new(),
        status,
        code,
    }
}

impl Case {
    fn json(mut self, body: Value) -> Case {
        self.body = body.to_string().into_bytes();
        self
    }
    fn raw(mut self, body: impl Into<Vec<u8>>) -> Case {
        self.body = body.into();
        self
    }
    fn key(mut self, key: Option<&'static str>) -> Case {
        self.key = key;
        self
    }
    fn header(mut self, name: &'static str, value: &str) -> Case {
        self.headers.push((name, value.into()));
        self
    }
    fn at(mut self, method: &'static str, path: &'static str) -> Case {
        self.method = method;
        self.path = path;
        self
    }
}

fn chat(model: &str, extra: Value) -> Value {
    let mut body = json!({ "model": model, "messages": [{ "role": "user", "content": "hi" }], "max_tokens": 4 });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    body
}

fn cases(model: &str) -> Vec<Case> {
    let ok = chat(model, json!({}));
    let bad = |what, extra: Value| case(what, 400, None).json(chat(model, extra));
    vec![
        // Who may call.
        case("no key", 401, Some("invalid_api_key")).json(ok.clone()).key(None),
        case("wrong key", 401, Some("invalid_api_key")).json(ok.clone()).key(Some("not-the-key-0123456789")),
        case("revoked key", 401, Some("invalid_api_key")).json(ok.clone()).key(Some(REVOKED)),
        case("key prefix", 401, Some("invalid_api_key")).json(ok.clone()).key(Some("alice-key-0123456789abcde")),
        case("basic auth", 401, Some("invalid_api_key")).json(ok.clone()).key(None)
            .header("authorization", &format!("Basic {KEY}")),
        case("empty bearer", 401, Some("invalid_api_key")).json(ok.clone()).key(None)
            .header("authorization", "Bearer "),
        case("key in the query", 401, Some("invalid_api_key")).json(ok.clone()).key(None)
            .at("POST", "/v1/chat/completions?api_key=alice-key-0123456789abcdef"),
        case("models without key", 401, Some("invalid_api_key")).at("GET", "/v1/models").key(None),
        case("metrics without key", 401, Some("invalid_api_key")).at("GET", "/metrics").key(None),
        case("cluster state without key", 401, Some("invalid_api_key")).at("GET", "/v1/cluster").key(None),
        case("cluster events without key", 401, Some("invalid_api_key")).at("GET", "/v1/cluster/events").key(None),
        case("POST to the page", 405, Some("method_not_allowed")).at("POST", "/").key(None),
        case("unknown page file", 404, Some("unknown_url")).at("GET", "/ui/../Cargo.toml").key(None),
        case("completions without key", 401, Some("invalid_api_key")).at("POST", "/v1/completions")
            .key(None).json(json!({ "model": model, "prompt": "hi" })),
        // Paths and methods.
        case("unknown path", 404, Some("unknown_url")).at("POST", "/v1/chat/completion"),
        case("unknown path without key", 404, Some("unknown_url")).at("GET", "/admin").key(None),
        case("path traversal", 404, Some("unknown_url")).at("GET", "/v1/../../etc/passwd"),
        case("GET on a POST route", 405, Some("method_not_allowed")).at("GET", "/v1/chat/completions"),
        case("DELETE models", 405, Some("method_not_allowed")).at("DELETE", "/v1/models"),
        case("PUT health", 405, Some("method_not_allowed")).at("PUT", "/health").key(None),
        // Bodies.
        case("body over the limit", 413, Some("request_too_large")).json(chat(model, json!({ "messages": [{ "role": "user", "content": "x".repeat(80_000) }] }))),
        case("text/plain body", 415, Some("unsupported_media_type")).json(ok.clone()).header("content-type", "text/plain"),
        case("form body", 415, Some("unsupported_media_type")).json(ok.clone()).header("content-type", "application/x-www-form-urlencoded"),
        case("multipart body", 415, Some("unsupported_media_type")).json(ok.clone()).header("content-type", "multipart/form-data; boundary=x"),
        case("empty body", 400, None).raw(""),
        case("truncated JSON", 400, None).raw("{\"model\": "),
        case("JSON array", 400, None).json(json!([1, 2, 3])),
        case("nested 100k deep", 400, None).raw("[".repeat(50_000)),
        case("invalid UTF-8", 400, None).raw(b"{\"model\": \"\xff\xfe\"}".to_vec()),
        case("lone surrogate", 400, None).raw(format!("{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"\\ud800\"}}]}}")),
        case("duplicate key", 400, None).raw(format!("{{\"model\": \"{model}\", \"model\": \"{model}\", \"messages\": []}}")),
        // Fields.
        bad("negative max_tokens", json!({ "max_tokens": -1 })),
        bad("max_tokens past u32", json!({ "max_tokens": 1u64 << 40 })),
        bad("max_tokens zero", json!({ "max_tokens": 0 })),
        bad("temperature as a string", json!({ "temperature": "NaN" })),
        case("temperature 1e999", 400, None).raw(format!("{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"hi\"}}], \"temperature\": 1e999}}")),
        bad("temperature out of range", json!({ "temperature": 9.5 })),
        bad("top_p negative", json!({ "top_p": -0.5 })),
        bad("n = 3", json!({ "n": 3 })),
        bad("messages not a list", json!({ "messages": "hi" })),
        bad("unknown role", json!({ "messages": [{ "role": "root", "content": "hi" }] })),
        bad("content a number", json!({ "messages": [{ "role": "user", "content": 42 }] })),
        bad("five stop strings", json!({ "stop": ["a", "b", "c", "d", "e"] })),
        bad("tools not a list", json!({ "tools": { "type": "function" } })),
        bad("unknown response_format", json!({ "response_format": { "type": "xml" } })),
        bad("logprobs not a boolean", json!({ "logprobs": 3 })),
        bad("presence_penalty out of range", json!({ "presence_penalty": 2.5 })),
        bad("logit_bias out of range", json!({ "logit_bias": { "42": 1000 } })),
        bad("logit_bias past the vocabulary", json!({ "logit_bias": { "99999999": 1 } })),
        bad("min_p out of range", json!({ "min_p": 2.0 })),
        case("unknown model", 400, Some("model_not_found")).json(chat("gpt-5", json!({}))),
        case("prompt past the context", 400, Some("context_length_exceeded"))
            .json(chat(model, json!({ "messages": [{ "role": "user", "content": long_message(400) }] }))),
    ]
}

async fn send(client: &reqwest::Client, base: &str, c: &Case) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(c.method.as_bytes()).unwrap();
    let mut req = client.request(method, format!("{base}{}", c.path));
    if !c.headers.iter().any(|(n, _)| *n == "content-type") && !c.body.is_empty() {
        req = req.header("content-type", "application/json");
    }
    for (n, v) in &c.headers {
        req = req.header(*n, v);
    }
    if let Some(k) = c.key {
        req = req.bearer_auth(k);
    }
    let resp = req.body(c.body.clone()).send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "{}: status {status}, body is not JSON ({e}): {text:?}",
            c.what
        )
    });
    (status, body)
}

/// A profile with one colocated node, a small context, a 64 KiB body limit and a keys file.
fn profile(keys_file: &std::path::Path) -> String {
    format!(
        "model = \"MODEL\"\nplacement = \"colocated\"\n[api]\nkeys_file = \"{}\"\nmax_body_bytes = 65536\n[layout]\nn_ctx_seq = 256\n[[nodes]]\nname = \"solo\"\naddress = \"embedded\"\nrole = \"both\"\nslots = 2\n",
        keys_file.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_4xx_with_openai_bodies_and_the_server_keeps_answering() {
    let dir = std::env::temp_dir().join(format!("exo-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys.toml");
    std::fs::write(
        &keys,
        format!("[keys]\nalice = \"{KEY}\"\nbob = \"{REVOKED}\"\n"),
    )
    .unwrap();
    let server = start_text(&profile(&keys)).await;
    let model = server.cluster.model_id();
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();

    // Bob's key works until its line leaves the file; then it is refused, with no restart.
    let models = |key: &'static str| {
        let req = client.get(format!("{base}/v1/models")).bearer_auth(key);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(models(REVOKED).await, 200);
    std::fs::write(&keys, format!("[keys]\nalice = \"{KEY}\"\n")).unwrap();
    let mut status = 200;
    for _ in 0..150 {
        status = models(REVOKED).await;
        if status == 401 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(status, 401, "a key deleted from the file is still accepted");
    assert_eq!(models(KEY).await, 200);

    let table = cases(&model);
    assert!(table.len() >= 30, "{} cases", table.len());
    for c in &table {
        let (status, body) = send(&client, &base, c).await;
        assert_eq!(status, c.status, "{}: {body}", c.what);
        let err = &body["error"];
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{}: {body}",
            c.what
        );
        assert!(err["type"].is_string(), "{}: {body}", c.what);
        if let Some(code) = c.code {
            assert_eq!(err["code"], code, "{}: {body}", c.what);
        }
    }

    // A body with no declared length (chunked) is cut off at the limit too: the server answers
    // 413 and closes, which the client sees as the 413 or, when it was still writing, as the
    // connection closing under it. A server that read the whole body would answer 400 (it is
    // only spaces, not JSON).
    let chunks = futures::stream::iter((0..40).map(|_| Ok::<_, std::io::Error>(vec![b' '; 4096])));
    let sent = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await;
    match sent {
        Ok(resp) => assert_eq!(resp.status().as_u16(), 413),
        Err(e) => assert!(e.is_request(), "{e}"),
    }

    // Bytes that are not HTTP at all: the connection is answered or closed, nothing more.
    let addr = server.addr;
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        s.write_all(b"\x16\x03\x01\x02\x00GARBAGE\r\n\r\n").unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let head = String::from_utf8_lossy(&out);
        assert!(out.is_empty() || head.starts_with("HTTP/1.1 4"), "{head}");
    })
    .await
    .unwrap();

    // The server still answers: a chat with the key (either header; the fields clients send at
    // their defaults are accepted), health without one.
    let ok = chat(
        &model,
        json!({ "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "logprobs": false, "min_p": 0.05 }),
    );
    let a = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&ok)
        .send()
        .await
        .unwrap();
    assert_eq!(a.status().as_u16(), 200);
    let a = client
        .post(format!("{base}/v1/chat/completions"))
        .header("x-api-key", KEY)
        .json(&ok)
        .send()
        .await
        .unwrap();
    assert_eq!(a.status().as_u16(), 200);
    let health = client.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    // The page holds no data: it loads without a key (and asks for one when the API does).
    for path in ["/", "/ui/app.js", "/ui/app.css", "/ui/icon.svg"] {
        let file = client.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(file.status().as_u16(), 200, "{path}");
    }
    let metrics = client
        .get(format!("{base}/metrics"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status().as_u16(), 200);
    let page = metrics.text().await.unwrap();
    assert!(page.contains("exo_api_key_refused_total"), "{page}");
    server.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}
