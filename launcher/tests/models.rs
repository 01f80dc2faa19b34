//! Another architecture through the whole system: Gemma 3 270M (`scripts/fetch-model gemma3`), an
//! interleaved sliding-window model whose KV state holds two caches, served split (prefill node ->
//! decode node over tarpc) with prompts longer than its 512-token window, the cache streamed in
//! pieces while the prompt runs, and two requests decoding side by side; and one cluster serving
//! Gemma and the default model side by side, each request on the nodes of the model it names
//! (the API, the cluster view and the page's model picker); and a hybrid model (attention and
//! Mamba layers, `scripts/fetch-model hybrid`) and a purely recurrent one (`recurrent`) served
//! split exactly as colocated; one node process holding two models (`--also-model`), each
//! served to a router as a node of its own; and a model name passing to a new file once no node
//! serves the old one (an updated GGUF).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;

use std::time::Duration;

use common::browser::{self, Browser};
use common::post;
use exo_router::profile::Profile;
use exo_test_support::root;
use serde_json::json;

const GEMMA: &str = "models/gemma-3-270m-q4_k_m.gguf";
const HYBRID: &str = "models/tiny-jamba.gguf";
const MAMBA: &str = "models/tiny-mamba.gguf";

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
    let metrics = common::procs::metrics(&server.addr.to_string()).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_cluster_serves_two_models_each_on_its_own_nodes() {
    let smol = exo_test_support::model_path();
    let gemma = root().join(GEMMA);
    let text = format!(
        r#"
model = "{}"
placement = "colocated"
[router]
max_queued = 0
[layout]
n_ctx_seq = 1024
[[nodes]]
name = "smol-0"
address = "embedded"
role = "both"
slots = 2
[[nodes]]
name = "gemma-0"
address = "embedded"
role = "both"
slots = 2
model = "{}"
"#,
        smol.display(),
        gemma.display()
    );
    let profile = Profile::parse(&text, Path::new("two-models.toml")).unwrap();
    let server = exo_launcher::start(&profile, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let base = format!("http://{}", server.addr);
    let ids = model_ids(server.addr).await;
    assert_eq!(ids, ["SmolLM2-135M-Instruct.Q4_1", "gemma-3-270m-q4_k_m"]);

    // Each request goes to the nodes of the model it names, both at once.
    let chat = json!({
        "model": "SmolLM2-135M-Instruct.Q4_1", "max_tokens": 8, "temperature": 0,
        "messages": [{ "role": "user", "content": "What is the capital of France?" }],
    });
    let completion = json!({
        "model": "gemma-3-270m-q4_k_m", "max_tokens": 8, "temperature": 0,
        "prompt": log_prompt(3, 0),
    });
    let (a, b) = tokio::join!(
        post(server.addr, "/v1/chat/completions", &chat),
        post(server.addr, "/v1/completions", &completion)
    );
    assert_eq!((a.status, b.status), (200, 200), "{} {}", a.body, b.body);
    assert_eq!(
        (a.prefill_node.as_str(), a.decode_node.as_str()),
        ("smol-0", "smol-0")
    );
    assert_eq!(
        (b.prefill_node.as_str(), b.decode_node.as_str()),
        ("gemma-0", "gemma-0")
    );
    assert_eq!(a.body["model"], "SmolLM2-135M-Instruct.Q4_1");
    assert_eq!(b.body["model"], "gemma-3-270m-q4_k_m");
    assert!(
        b.body["choices"][0]["text"]
            .as_str()
            .unwrap()
            .contains("ferry"),
        "{}",
        b.body
    );

    // Token counts come from a node of the model named; an unknown model lists both.
    let count = |model: &str| {
        json!({ "model": model, "max_tokens": 1,
                "messages": [{ "role": "user", "content": "Hello there" }] })
    };
    let counted = post(
        server.addr,
        "/v1/messages/count_tokens",
        &count("SmolLM2-135M-Instruct.Q4_1"),
    )
    .await;
    assert_eq!(counted.status, 200, "{}", counted.body);
    let unknown = post(
        server.addr,
        "/v1/chat/completions",
        &json!({
            "model": "llama-9000", "messages": [{ "role": "user", "content": "hi" }],
        }),
    )
    .await;
    assert_eq!(unknown.status, 400, "{}", unknown.body);
    let message = unknown.body["error"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        message.contains("`SmolLM2-135M-Instruct.Q4_1`, `gemma-3-270m-q4_k_m`"),
        "{message}"
    );
    assert_eq!(unknown.body["error"]["code"], "model_not_found");

    // Admission counts each model's own decode slots: three Gemma requests at once find two
    // slots (and no queue), so one gets a 429 naming the model, while SmolLM2 still admits.
    let long = |variant: usize| {
        json!({ "model": "gemma-3-270m-q4_k_m", "max_tokens": 48, "temperature": 0,
                "prompt": log_prompt(3, variant) })
    };
    let smol_chat = json!({ "model": "SmolLM2-135M-Instruct.Q4_1", "max_tokens": 4,
        "messages": [{ "role": "user", "content": "Hi" }] });
    let (l1, l2, l3) = (long(1), long(2), long(3));
    let (g1, g2, g3, s1) = tokio::join!(
        post(server.addr, "/v1/completions", &l1),
        post(server.addr, "/v1/completions", &l2),
        post(server.addr, "/v1/completions", &l3),
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            post(server.addr, "/v1/chat/completions", &smol_chat).await
        }
    );
    let mut statuses = [g1.status, g2.status, g3.status];
    statuses.sort_unstable();
    assert_eq!(
        statuses,
        [200, 200, 429],
        "{} {} {}",
        g1.body,
        g2.body,
        g3.body
    );
    let refused = [&g1, &g2, &g3]
        .into_iter()
        .find(|a| a.status == 429)
        .unwrap();
    assert!(
        refused.body.to_string().contains("gemma-3-270m-q4_k_m"),
        "{}",
        refused.body
    );
    assert_eq!(s1.status, 200, "{}", s1.body);

    // The cluster view names each node's model, and the page offers both.
    let status: exo_router::api::status::ClusterStatus = reqwest::get(format!("{base}/v1/cluster"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status.models, ids);
    let node_models: Vec<Option<&str>> = status.nodes.iter().map(|n| n.model.as_deref()).collect();
    assert_eq!(node_models, [Some(ids[0].as_str()), Some(ids[1].as_str())]);
    match browser::find() {
        Some(binary) => the_page_picks_a_model(binary, &base).await,
        None => {
            let required = std::env::var("EXO_REQUIRE_CHROMIUM").is_ok_and(|v| v == "1");
            assert!(!required, "EXO_REQUIRE_CHROMIUM=1 but no chromium on PATH");
            eprintln!("models: no chromium on PATH: the page checks are skipped");
        }
    }
    server.shutdown().await;
}

/// The page over the two-model cluster: a picker with both models; a chat goes to the model
/// picked (`?model=`): SmolLM2 answers from its node, Gemma (a base model) refuses a chat, and the
/// page shows why.
async fn the_page_picks_a_model(binary: &str, base: &str) {
    let mut b = Browser::start(binary).await;
    let answer = "document.querySelector('.msg.assistant')";
    let finished = format!("['done', 'error'].includes({answer}?.dataset.state)");
    let picker = "document.querySelector('#model-pick')";
    for (model, state, shows) in [
        ("SmolLM2-135M-Instruct.Q4_1", "done", "smol-0"),
        ("gemma-3-270m-q4_k_m", "error", "chat_template"),
    ] {
        let url = format!("{base}/?model={model}&q=Hello&max_tokens=4&temperature=0");
        b.open(&url, (1280, 800), false).await;
        b.wait_for(&finished, Duration::from_secs(60), "the answer")
            .await;
        let meta = b
            .eval(&format!("{answer}.querySelector('.meta').innerText"))
            .await;
        assert_eq!(
            b.eval(&format!("{answer}.dataset.state")).await,
            state,
            "{meta}"
        );
        assert!(meta.as_str().unwrap_or_default().contains(shows), "{meta}");
        b.wait_for(
            &format!("{picker}.options.length === 2 && !{picker}.hidden"),
            Duration::from_secs(10),
            "the model picker",
        )
        .await;
        assert_eq!(b.eval(&format!("{picker}.value")).await, model);
        let options = b
            .eval(&format!("[...{picker}.options].map(o => o.value)"))
            .await;
        assert_eq!(
            options,
            json!(["SmolLM2-135M-Instruct.Q4_1", "gemma-3-270m-q4_k_m"])
        );
    }
}

/// The ids `/v1/models` lists, in its order.
async fn model_ids(addr: std::net::SocketAddr) -> Vec<String> {
    let models = reqwest::get(format!("http://{addr}/v1/models"))
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str().map(String::from))
        .collect()
}

/// A one-model profile for `model` with `nodes` (name, role) embedded.
fn profile_of(model: &Path, placement: &str, nodes: &[(&str, &str)]) -> Profile {
    let mut text = format!(
        "model = \"{}\"\nplacement = \"{placement}\"\n[kv]\ncodec = \"lz4\"\n[layout]\nn_ctx_seq = 2048\n",
        model.display()
    );
    for (name, role) in nodes {
        text += &format!(
            "[[nodes]]\nname = \"{name}\"\naddress = \"embedded\"\nrole = \"{role}\"\nslots = 2\n"
        );
    }
    Profile::parse(&text, Path::new("hybrid.toml")).unwrap()
}

/// A hybrid model's requests, served split (the attention cache streamed in pieces while the
/// prompt runs, the recurrent state after it, two requests decoding in one batch) give the text a
/// colocated node gives them one at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hybrid_model_is_served_split_exactly_as_colocated() {
    let pieces = served_split_as_colocated(HYBRID, "hybrid").await;
    assert!(pieces > 2, "two caches went in {pieces} pieces in all");
}

/// The same for a purely recurrent model, whose state goes in one piece after the prompt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recurrent_model_is_served_split_exactly_as_colocated() {
    let pieces = served_split_as_colocated(MAMBA, "recurrent").await;
    assert_eq!(pieces, 2, "one piece a request");
}

/// Serves two requests for the model in `file` split, then each alone colocated: the same texts.
/// Returns the pieces the split's caches went in.
async fn served_split_as_colocated(file: &str, fetch: &str) -> u64 {
    let path = root().join(file);
    assert!(
        path.is_file(),
        "{file} missing: run scripts/fetch-model {fetch}"
    );
    let name = path.file_stem().unwrap().to_string_lossy().to_string();
    // Random weights repeat a token: a frequency penalty and a high temperature make each token
    // a choice the state decides.
    let ask = |addr, variant: usize, stream: bool| {
        let body = json!({
            "model": name, "prompt": log_prompt(24, variant), "max_tokens": 16,
            "temperature": 1.5, "seed": 11 + variant, "frequency_penalty": 2.0, "stream": stream,
        });
        async move { post(addr, "/v1/completions", &body).await }
    };
    // Node names of this model's own: the metrics (one registry per test process) count per node.
    let (prefill, decode) = (format!("{fetch}-prefill"), format!("{fetch}-decode"));
    let split = profile_of(
        &path,
        "disaggregated",
        &[(&prefill, "prefill"), (&decode, "decode")],
    );
    let server = exo_launcher::start(&split, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (a, b) = tokio::join!(ask(server.addr, 0, false), ask(server.addr, 1, true));
    let metrics = common::procs::metrics(&server.addr.to_string()).await;
    let pieces = common::node_counter(&metrics, "exo_kv_pieces_total", &prefill).unwrap_or(0);
    server.shutdown().await;
    for answer in [&a, &b] {
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(answer.decode_node, decode);
    }

    let colocated = profile_of(&path, "colocated", &[("both-0", "both")]);
    let server = exo_launcher::start(&colocated, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let alone_a = ask(server.addr, 0, false).await;
    let alone_b = ask(server.addr, 1, true).await;
    server.shutdown().await;
    assert_eq!(alone_a.decode_node, "both-0");
    assert!(
        alone_a.text.split_whitespace().count() > 4,
        "{:?}",
        alone_a.text
    );
    assert_eq!(a.text, alone_a.text);
    assert_eq!(b.text, alone_b.text);
    assert_ne!(a.text, b.text);
    eprintln!("{name}, split == colocated: {:?} / {:?}", a.text, b.text);
    pieces
}

/// One `exo-router node` process with the default model and `--also-model` the tiny hybrid: two
/// nodes (the second named after its model, on its own port), which a
/// router lists by address and serves each model's requests on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_process_holds_two_models() {
    let smol = exo_test_support::model_path();
    let jamba = root().join(HYBRID);
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_exo-router"));
    cmd.args(["node", "--role", "both", "--name", "box", "--slots", "2"])
        .args(["--listen", "127.0.0.1:0", "--no-announce", "--threads", "2"])
        .arg("--model")
        .arg(&smol)
        .arg("--also-model")
        .arg(&jamba);
    let (_node, lines) = common::procs::spawn_command_lines(cmd, "listening on", 2);
    assert!(lines[0].contains("node box (both, SmolLM2"), "{lines:?}");
    assert!(
        lines[1].contains("node box-tiny-jamba (both, tiny-jamba"),
        "{lines:?}"
    );
    let addr = |i: usize| common::procs::last_word(&lines[i]);
    let text = format!(
        "model = \"{}\"\nplacement = \"colocated\"\n[[nodes]]\nname = \"box\"\naddress = \"{}\"\nrole = \"both\"\nslots = 2\n[[nodes]]\nname = \"box-tiny-jamba\"\naddress = \"{}\"\nrole = \"both\"\nslots = 2\n",
        smol.display(),
        addr(0),
        addr(1)
    );
    let profile = Profile::parse(&text, Path::new("one-box.toml")).unwrap();
    let server = exo_launcher::start(&profile, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    // Listed in the order the nodes first answered, which two remote nodes do in either order.
    let mut ids = model_ids(server.addr).await;
    ids.sort();
    assert_eq!(ids, ["SmolLM2-135M-Instruct.Q4_1", "tiny-jamba"]);
    for (model, node) in [
        ("SmolLM2-135M-Instruct.Q4_1", "box"),
        ("tiny-jamba", "box-tiny-jamba"),
    ] {
        let body = json!({
            "model": model, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0,
        });
        let a = post(server.addr, "/v1/completions", &body).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(
            (a.prefill_node.as_str(), a.body["model"].as_str()),
            (node, Some(model))
        );
    }
    server.shutdown().await;
}

/// A node whose model has the name of another file the cluster serves is refused while that file
/// is served; once no node serves it (its node killed), the name passes to the other file and
/// requests for it run there. Which of the two nodes answers first (and so holds the name first)
/// is up to the network: the test takes them in that order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_name_passes_to_a_new_file_once_the_old_one_is_gone() {
    let smol = exo_test_support::model_path();
    // Another file under the default model's name: the tiny Jamba, copied.
    let dir = std::env::temp_dir().join(format!("exo-model-update-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let updated = dir.join(smol.file_name().unwrap());
    std::fs::copy(root().join(HYBRID), &updated).unwrap();
    let mut procs = std::collections::HashMap::new();
    let mut addrs = Vec::new();
    for (name, path) in [("file-a", &smol), ("file-b", &updated)] {
        let (proc, addr) =
            common::procs::spawn_node(&path.display().to_string(), "both", name, &[]);
        procs.insert(name, proc);
        addrs.push(addr);
    }
    let text = format!(
        "model = \"{}\"\nplacement = \"colocated\"\n[[nodes]]\nname = \"file-a\"\naddress = \"{}\"\nrole = \"both\"\n[[nodes]]\nname = \"file-b\"\naddress = \"{}\"\nrole = \"both\"\n",
        smol.display(),
        addrs[0],
        addrs[1]
    );
    let profile = Profile::parse(&text, Path::new("update.toml")).unwrap();
    let server = exo_launcher::start(&profile, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let base = format!("http://{}", server.addr);
    let up = |s: &exo_router::api::status::ClusterStatus, name: &str| {
        s.nodes.iter().any(|n| n.name == name && n.healthy)
    };
    // One holds the name; the other is refused, saying why.
    let refused = |s: &exo_router::api::status::ClusterStatus| {
        s.nodes.iter().any(|n| n.healthy)
            && s.nodes.iter().any(|n| {
                !n.healthy
                    && n.error
                        .as_deref()
                        .is_some_and(|w| w.contains("is another file"))
            })
    };
    common::until(&base, "one file served, the other refused", refused).await;
    let s = common::status(&base).await;
    let holder = if up(&s, "file-a") { "file-a" } else { "file-b" };
    let other = if holder == "file-a" {
        "file-b"
    } else {
        "file-a"
    };
    let ask = json!({
        "model": "SmolLM2-135M-Instruct.Q4_1", "prompt": "The capital of France is",
        "max_tokens": 4, "temperature": 0,
    });
    let a = post(server.addr, "/v1/completions", &ask).await;
    assert_eq!(
        (a.status, a.decode_node.as_str()),
        (200, holder),
        "{}",
        a.body
    );
    drop(procs.remove(holder));
    common::until(&base, "the name passing to the other file", |s| {
        up(s, other)
    })
    .await;
    let b = post(server.addr, "/v1/completions", &ask).await;
    assert_eq!(
        (b.status, b.decode_node.as_str()),
        (200, other),
        "{}",
        b.body
    );
    assert_eq!(model_ids(server.addr).await, ["SmolLM2-135M-Instruct.Q4_1"]);
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
