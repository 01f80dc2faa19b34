//! A real multi-process cluster: prefill node, decode node and router as three OS processes on
//! loopback ports, started by the test; then the decode node is killed and requests get 503. Also a
//! pair that differs in flash attention, served together, KV transfers cut by a faulty link, and a
//! drain on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::procs::{Proc, free_addr, last_word, metrics, spawn, spawn_node, spawn_node_logged};
use common::{model_path, node_metric, post, write_split_profile};
use exo_test_support::proxy::{Fault, FaultProxy};
use futures::StreamExt;
use serde_json::json;

/// Writes a disaggregated profile for `prefill` and `decode` (name, address) under a folder named
/// with `tag`, and starts `exo-router serve` on it: the process, its HTTP address, the folder.
fn serve_split(
    model: &str,
    prefill: (&str, &str),
    decode: (&str, &str),
    tag: &str,
) -> (Proc, SocketAddr, PathBuf) {
    let (dir, profile) = write_split_profile(model, prefill, decode, tag);
    let (router, line) = spawn(
        &[
            "serve",
            "--profile",
            profile.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        "listening on http",
    );
    (router, last_word(&line).parse().unwrap(), dir)
}

/// The chat most tests here send: greedy, 16 tokens at most; the model answers "The capital of
/// France is Paris."
fn capital_question() -> serde_json::Value {
    json!({
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "messages": [{ "role": "user", "content": "Tell me the capital of France." }],
        "max_tokens": 16, "temperature": 0,
    })
}

/// What decode node `node` holds by its gauges at `metrics_addr`: sequence slots in use, KV
/// transfers pending, KV bytes held.
async fn holdings(metrics_addr: &str, node: &str) -> [f64; 3] {
    let page = metrics(metrics_addr).await;
    [
        "exo_decode_slots_in_use",
        "exo_kv_transfers_pending",
        "exo_kv_bytes_held",
    ]
    .map(|m| node_metric(&page, m, node))
}

/// A split cluster whose decode node the router and the prefill node reach only through a
/// fault-injecting proxy: node processes `TAG-prefill` and `TAG-decode`, the proxy, `serve`.
struct ProxiedSplit {
    prefill: Proc,
    decode: Proc,
    router: Proc,
    proxy: FaultProxy,
    /// The router's HTTP address.
    addr: SocketAddr,
    /// The folder of the profile (remove it at the end).
    dir: PathBuf,
}

/// Starts a [`ProxiedSplit`] named by `tag`, the nodes with `prefill_flags` and `decode_flags`,
/// the proxy doing `fault`.
async fn proxied_split(
    tag: &str,
    fault: Fault,
    prefill_flags: &[&str],
    decode_flags: &[&str],
) -> ProxiedSplit {
    let model = model_path().display().to_string();
    let (p_name, d_name) = (format!("{tag}-prefill"), format!("{tag}-decode"));
    let (prefill, prefill_addr) = spawn_node(&model, "prefill", &p_name, prefill_flags);
    let (decode, decode_addr) = spawn_node(&model, "decode", &d_name, decode_flags);
    let proxy = FaultProxy::start(decode_addr.parse().unwrap(), fault)
        .await
        .unwrap();
    let proxied = proxy.addr().to_string();
    let (router, addr, dir) = serve_split(
        &model,
        (&p_name, &prefill_addr),
        (&d_name, &proxied),
        &format!("{tag}-test"),
    );
    ProxiedSplit {
        prefill,
        decode,
        router,
        proxy,
        addr,
        dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_serve_a_chat_and_a_dead_node_gives_503() {
    let model = model_path().display().to_string();
    let (_prefill, prefill_addr) = spawn_node(&model, "prefill", "proc-prefill", &[]);
    let metrics_addr = free_addr();
    let metrics_flag = ["--metrics-listen", metrics_addr.as_str()];
    let (decode, decode_addr) = spawn_node(&model, "decode", "proc-decode", &metrics_flag);
    let (_router, addr, dir) = serve_split(
        &model,
        ("proc-prefill", &prefill_addr),
        ("proc-decode", &decode_addr),
        "test",
    );

    let body = capital_question();
    let a = post(addr, "/v1/chat/completions", &body).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.text.contains("Paris"), "{:?}", a.text);
    assert_eq!(
        (a.prefill_node.as_str(), a.decode_node.as_str()),
        ("proc-prefill", "proc-decode")
    );
    // The decode node process serves its own metrics.
    let metrics = metrics(&metrics_addr).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("exo_decode_tokens_total{node=\"proc-decode\"}")),
        "{metrics}"
    );

    drop(decode);
    let dead = tokio::time::timeout(
        Duration::from_secs(15),
        post(addr, "/v1/chat/completions", &body),
    )
    .await
    .unwrap();
    assert_eq!(dead.status, 503, "{}", dead.body);
    assert_eq!(dead.body["error"]["type"], "service_unavailable");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A prefill node with flash attention and a decode node without (V stored the other way): the
/// router accepts the pair, the cache is transposed on import, and the answer is the one every
/// other configuration gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flash_attention_on_prefill_and_off_decode_serve_together() {
    let model = model_path().display().to_string();
    let (_prefill, prefill_addr) = spawn_node(&model, "prefill", "fa-prefill", &["--flash-attn"]);
    let (_decode, decode_addr) = spawn_node(&model, "decode", "plain-decode", &[]);
    let (_router, addr, dir) = serve_split(
        &model,
        ("fa-prefill", &prefill_addr),
        ("plain-decode", &decode_addr),
        "fa-test",
    );
    let body = capital_question();
    let a = post(addr, "/v1/chat/completions", &body).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.text, "The capital of France is Paris.");
    assert_eq!(
        (a.prefill_node.as_str(), a.decode_node.as_str()),
        ("fa-prefill", "plain-decode")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A KV transfer cut midway: a proxy in front of the decode node closes the prefill node's
/// connection after 64 KiB of KV. The client hears the prefill node's reason at once (not
/// "transfer timed out" at the decode node's one-minute transfer timeout), and the next request,
/// whose connection the proxy leaves alone, is served: nothing stays stuck on either node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_cut_midway_fails_at_once_with_its_reason() {
    let fault = Fault::CutAfter {
        bytes: 64 << 10,
        times: 1,
    };
    let split = proxied_split("cut", fault, &[], &["--slots", "1"]).await;
    let (addr, proxy) = (split.addr, &split.proxy);
    let body = capital_question();
    let cut = tokio::time::timeout(
        Duration::from_secs(20),
        post(addr, "/v1/chat/completions", &body),
    )
    .await
    .expect("the failure must arrive long before the decode node's transfer timeout");
    assert_eq!(proxy.cuts(), 1);
    assert_eq!(cut.status, 500, "{}", cut.body);
    let message = cut.body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("from prefill node cut-prefill"),
        "{message}"
    );

    let again = post(addr, "/v1/chat/completions", &body).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.text, "The capital of France is Paris.");
    assert_eq!(proxy.cuts(), 1);
    let _ = std::fs::remove_dir_all(&split.dir);
}

/// Output token 0 reaches the client before the cache reaches the decode node: with the link to
/// the decode node stalled after 64 KiB of the transfer, the stream's first content still arrives;
/// the cache never does, and the stall ends the request at the decode node's transfer timeout with
/// an error event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_zero_streams_before_the_cache_arrives() {
    let fault = Fault::StallAfter {
        bytes: 64 << 10,
        times: 1,
    };
    let decode_flags = ["--slots", "1", "--transfer-timeout", "3"];
    let split = proxied_split("first", fault, &[], &decode_flags).await;
    let mut body = capital_question();
    body["stream"] = json!(true);
    let mut resp = reqwest::Client::new()
        .post(format!("http://{}/v1/chat/completions", split.addr))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut seen = String::new();
    while !seen.contains("\"content\":\"") {
        let chunk = tokio::time::timeout(Duration::from_secs(20), resp.chunk()).await;
        let chunk = chunk.expect("token 0 must not wait for the transfer");
        seen += &String::from_utf8_lossy(&chunk.unwrap().expect("stream ended before token 0"));
    }
    while let Ok(Some(chunk)) = resp.chunk().await {
        seen += &String::from_utf8_lossy(&chunk);
    }
    // The transfer stalled: the cache never reached the decode node, so token 0 came before it.
    assert_eq!(split.proxy.cuts(), 1, "the transfer was not stalled");
    assert!(seen.contains("\"error\""), "{seen}");
    assert!(!seen.contains("\"finish_reason\":\"length\""), "{seen}");
    let _ = std::fs::remove_dir_all(&split.dir);
}

/// Sends SIGTERM to `proc` and waits (up to a minute) for it to exit; its exit status.
fn terminate(proc: &mut Proc) -> std::process::ExitStatus {
    let pid = proc.0.id().to_string();
    let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(sent.success());
    for _ in 0..600 {
        if let Some(status) = proc.0.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("process {pid} did not exit within a minute of SIGTERM");
}

/// SIGTERM to the router and both nodes while a stream runs: the stream still ends normally with
/// every token asked for (each drains what it holds instead of dying), then all three exit
/// cleanly, the nodes with nothing left unfinished (their request counts went back to zero).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_stream_in_flight_before_stopping() {
    let model = model_path().display().to_string();
    let dir = std::env::temp_dir().join(format!("exo-router-drain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = |name: &str| Stdio::from(std::fs::File::create(dir.join(name)).unwrap());
    let (mut prefill, prefill_addr) =
        spawn_node_logged(&model, "prefill", "drain-prefill", &[], log("prefill.log"));
    let (mut decode, decode_addr) =
        spawn_node_logged(&model, "decode", "drain-decode", &[], log("decode.log"));
    let (mut router, addr, profile_dir) = serve_split(
        &model,
        ("drain-prefill", &prefill_addr),
        ("drain-decode", &decode_addr),
        "drain-test",
    );

    let body = json!({
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "messages": [{ "role": "user", "content": "Write a very long story." }],
        "max_tokens": 48, "stream": true, "temperature": 1.0, "seed": 3,
        "stream_options": { "include_usage": true },
    });
    let mut resp = reqwest::Client::new()
        .post(format!("http://{addr}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut seen = String::new();
    while !seen.contains("\"content\":\"") {
        seen += &String::from_utf8_lossy(&resp.chunk().await.unwrap().unwrap());
    }

    // All three stop while the stream runs; each is waited for on its own thread of the test.
    let exits = [
        std::thread::spawn(move || terminate(&mut router)),
        std::thread::spawn(move || terminate(&mut decode)),
        std::thread::spawn(move || terminate(&mut prefill)),
    ];
    while let Some(chunk) = resp.chunk().await.unwrap() {
        seen += &String::from_utf8_lossy(&chunk);
    }
    assert!(seen.contains("\"finish_reason\":\"length\""), "{seen}");
    assert!(seen.contains("\"completion_tokens\":48"), "{seen}");
    assert!(seen.trim_end().ends_with("data: [DONE]"), "{seen}");

    for exit in exits {
        assert!(exit.join().unwrap().success());
    }
    for node in ["prefill.log", "decode.log"] {
        let log = std::fs::read_to_string(dir.join(node)).unwrap();
        assert!(
            log.contains("stopped with 0 requests unfinished"),
            "{node}: {log}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&profile_dir);
}

/// At least 200 KV transfers through a link that refuses, stalls and cuts connections at random (a
/// seeded proxy in front of the decode node: one connection in four refused, one in four of the
/// others stalled, every other one cut after a random number of client bytes below 16 MiB, which a
/// transfer of about 0.9 MB reaches every few transfers). Every request is answered or fails with a clear error inside 90 s,
/// no process dies, and once the load stops nothing is stranded: no decode slot in use or
/// reserved, no transfer pending, no received bytes held, no request in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_through_a_faulty_link_strand_nothing() {
    let (p_metrics, d_metrics) = (free_addr(), free_addr());
    // Stalls among the faults: one in EXO_CHAOS_STALLS (default 4; 0: none) of the connections
    // not refused.
    let stall_one_in = std::env::var("EXO_CHAOS_STALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let fault = Fault::Chaos {
        refuse_one_in: 4,
        stall_one_in,
        max_bytes: 16 << 20,
        seed: 7,
    };
    let prefill_flags = ["--metrics-listen", &p_metrics, "--slots", "2"];
    // A stalled transfer fails at the decode node's transfer timeout (and at the prefill node's
    // call deadline, a few seconds on): 3 s here instead of 60.
    let decode_flags = ["--metrics-listen", &d_metrics, "--transfer-timeout", "3"];
    let mut split = proxied_split("chaos", fault, &prefill_flags, &decode_flags).await;
    let (addr, proxy) = (split.addr, &split.proxy);

    let (mut ok, mut failed, mut sent) = (0usize, 0usize, 0usize);
    let mut slowest = Duration::ZERO;
    let transfers = |page: &str| node_metric(page, "exo_prefill_seconds_count", "chaos-prefill");
    // Benchmark mode: EXO_CHAOS_TRANSFERS=1000 (docs/reliability.md).
    let target: f64 = std::env::var("EXO_CHAOS_TRANSFERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200.0);
    while transfers(&metrics(&p_metrics).await) < target {
        assert!(
            (sent as f64) < 7.5 * target,
            "{sent} requests made only {} transfers",
            transfers(&metrics(&p_metrics).await)
        );
        let batch = futures::stream::iter(sent..sent + 8)
            .map(|i| async move {
                let body = json!({
                    "model": "SmolLM2-135M-Instruct.Q4_1",
                    "messages": [{ "role": "user", "content": format!("Count to {i}.") }],
                    "max_tokens": 2, "temperature": 0,
                });
                // A request can move up to 3 times (router.migration_limit), each after a poll
                // that stalled for its 6 s deadline, and its transfer can stall for the decode
                // node's 3 s: well under 90 s, which would take a wait nobody bounds.
                let started = std::time::Instant::now();
                let answer = tokio::time::timeout(
                    Duration::from_secs(90),
                    post(addr, "/v1/chat/completions", &body),
                )
                .await
                .expect("every request must be answered or failed inside 90 s");
                (answer, started.elapsed())
            })
            .buffer_unordered(4)
            .collect::<Vec<_>>()
            .await;
        sent += batch.len();
        for (a, took) in batch {
            slowest = slowest.max(took);
            match a.status {
                200 => ok += 1,
                500 | 503 | 504 => {
                    let message = a.body["error"]["message"].as_str().unwrap_or_default();
                    assert!(!message.is_empty(), "{}", a.body);
                    failed += 1;
                }
                other => panic!("unexpected status {other}: {}", a.body),
            }
        }
    }
    eprintln!(
        "{sent} requests, {} transfers: {ok} answered, {failed} failed clearly; {} connections cut, stalled or refused; slowest request {slowest:?}",
        transfers(&metrics(&p_metrics).await),
        proxy.cuts()
    );
    assert!(ok > 0 && failed > 0 && proxy.cuts() > 0);

    // Nothing stranded: the gauges go back to zero (they are published every second).
    let mut left = String::new();
    for _ in 0..100 {
        let r = metrics(&addr.to_string()).await;
        let [slots, transfers, bytes] = holdings(&d_metrics, "chaos-decode").await;
        let reserved = node_metric(&r, "exo_decode_slots_reserved", "chaos-decode");
        let held = [slots, transfers, bytes, reserved];
        let in_flight = r
            .lines()
            .find_map(|l| l.strip_prefix("exo_requests_in_flight "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        left = format!("slots in use, transfers, bytes, reserved: {held:?}; in flight {in_flight}");
        if held.iter().all(|&v| v == 0.0) && in_flight == 0.0 {
            left.clear();
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(left.is_empty(), "stranded: {left}");
    for (name, proc) in [
        ("prefill", &mut split.prefill),
        ("decode", &mut split.decode),
        ("router", &mut split.router),
    ] {
        assert!(
            proc.0.try_wait().unwrap().is_none(),
            "the {name} process died"
        );
    }
    let _ = std::fs::remove_dir_all(&split.dir);
}

/// A link that stalls mid-transfer (a proxy stops forwarding the prefill node's bytes after
/// 64 KiB, keeping the connection open): the decode node, given `--transfer-timeout 2`, fails the
/// request with "transfer timed out" once the transfer made no progress for 2 s, the client gets
/// that error, and the decode node holds nothing afterwards; once the prefill node's own call
/// deadline passes, requests get through again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_transfer_fails_at_the_transfer_timeout_and_strands_nothing() {
    let d_metrics = free_addr();
    let fault = Fault::StallAfter {
        bytes: 64 << 10,
        times: 1,
    };
    let flags = ["--metrics-listen", &d_metrics, "--transfer-timeout", "2"];
    let split = proxied_split("stall", fault, &[], &flags).await;
    let (addr, proxy) = (split.addr, &split.proxy);
    let body = capital_question();
    // The bound only keeps a regression from hanging the run: with the default 60 s timeout the
    // request would still be waiting.
    let stalled = tokio::time::timeout(
        Duration::from_secs(30),
        post(addr, "/v1/chat/completions", &body),
    )
    .await
    .expect("the stalled transfer must fail at the 2 s transfer timeout");
    assert_eq!(proxy.cuts(), 1);
    assert_eq!(stalled.status, 500, "{}", stalled.body);
    let message = stalled.body["error"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(message.contains("transfer timed out"), "{message}");

    let mut held = [f64::NAN; 3];
    for _ in 0..50 {
        held = holdings(&d_metrics, "stall-decode").await;
        if held.iter().all(|&v| v == 0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        held.iter().all(|&v| v == 0.0),
        "decode node still holds {held:?}"
    );

    // The prefill node's call on the stalled connection fails at its own deadline (5 s plus its
    // chunks at 1 MB/s, well under 30 s) and the connection is dropped: a later request gets a
    // fresh one and its answer, instead of queueing behind the stall (60 s before).
    let recovered = tokio::time::timeout(Duration::from_secs(40), async {
        loop {
            let again = post(addr, "/v1/chat/completions", &body).await;
            if again.status == 200 {
                return again;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await
    .expect("transfers to the decode node stayed stuck behind the stalled connection");
    assert_eq!(recovered.text, "The capital of France is Paris.");
    let _ = std::fs::remove_dir_all(&split.dir);
}
