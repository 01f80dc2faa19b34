//! A cluster that assembles itself: a router with no node in its profile finds node processes
//! that announce themselves (mDNS), serves through them within seconds, lets a node leave
//! gracefully (SIGTERM: the stream it was generating finishes, nothing new goes there), takes it
//! back when it returns on another port, and drops and re-admits a node killed with -9.
//!
//! The nodes run in their own network namespace, joined to the test's by a veth pair, so the
//! announcements cross a real (virtual) Ethernet link; where namespaces cannot be made (not
//! root), everything runs on loopback and the test says so.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use common::procs::{Proc, ip, last_word, spawn_command};
use common::{model_path, start_text, status, until};
use exo_router::api::status::{ClusterStatus, NodeStatus};
use exo_router::cluster::Origin;
use serde_json::{Value, json};

/// Where the nodes run: a namespace behind a veth pair, or this namespace's loopback.
struct Lan {
    ns: Option<String>,
    /// The nodes' listen IP.
    ip: &'static str,
}

impl Drop for Lan {
    fn drop(&mut self) {
        if let Some(ns) = &self.ns {
            // Deleting the namespace deletes the veth pair (and its end on this side).
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

impl Lan {
    /// A namespace at 10.79.T.2 joined to this one (10.79.T.1) by a veth pair; loopback when it
    /// cannot be made.
    fn new() -> Lan {
        let tag = std::process::id() % 250;
        let ns = format!("exo-lan-{}", std::process::id());
        let (here, there) = (format!("exl{tag}a"), format!("exl{tag}b"));
        let (near, far) = (format!("10.79.{tag}.1/24"), format!("10.79.{tag}.2/24"));
        if ip(&["netns", "add", &ns]) {
            let lan = Lan {
                ns: Some(ns.clone()),
                ip: Box::leak(format!("10.79.{tag}.2").into_boxed_str()),
            };
            let steps: [&[&str]; 7] = [
                &["link", "add", &here, "type", "veth", "peer", "name", &there],
                &["link", "set", &there, "netns", &ns],
                &["addr", "add", &near, "dev", &here],
                &["-n", &ns, "addr", "add", &far, "dev", &there],
                &["link", "set", &here, "up"],
                &["-n", &ns, "link", "set", &there, "up"],
                &["-n", &ns, "link", "set", "lo", "up"],
            ];
            if steps.iter().all(|s| ip(s)) {
                eprintln!("discovery: nodes in namespace {ns}, announced over veth {here}");
                return lan;
            }
        }
        eprintln!("discovery: cannot make a network namespace (not root?): nodes on loopback");
        Lan {
            ns: None,
            ip: "127.0.0.1",
        }
    }

    /// Starts `exo-router node` named `name` in `role`, measuring itself (its measurement cached
    /// in `cache`), with `extra` flags; returns it and its address.
    fn node_with(
        &self,
        role: &str,
        name: &str,
        cache: &std::path::Path,
        extra: &[&str],
    ) -> (Proc, String) {
        let model = model_path();
        let listen = format!("{}:0", self.ip);
        let node_args = [
            "node", "--role", role, "--name", name, "--listen", &listen, "--model",
        ];
        let mut cmd = match &self.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_exo-router")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_exo-router")),
        };
        cmd.args(node_args)
            .arg(&model)
            .args(["--drain-timeout", "20", "--measure", "--profile-cache"])
            .arg(cache)
            .args(extra);
        let (proc, line) = spawn_command(cmd, "listening on");
        (proc, last_word(&line))
    }
}

impl Lan {
    /// [`Lan::node_with`] without extra flags.
    fn node(&self, role: &str, name: &str, cache: &std::path::Path) -> (Proc, String) {
        self.node_with(role, name, cache, &[])
    }
}

fn node<'a>(s: &'a ClusterStatus, name: &str) -> Option<&'a NodeStatus> {
    s.nodes.iter().find(|n| n.name == name)
}

fn up(s: &ClusterStatus, name: &str) -> bool {
    node(s, name).is_some_and(|n| n.healthy)
}

async fn chat(base: &str, model: &str, stream: bool) -> reqwest::Response {
    let body = json!({
        "model": model, "max_tokens": 48, "temperature": 0, "stream": stream,
        "messages": [{ "role": "user", "content": "Write a short story about a lighthouse." }],
    });
    reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn decode_node(r: &reqwest::Response) -> String {
    r.headers()["x-exo-decode-node"]
        .to_str()
        .unwrap()
        .to_string()
}

fn sigterm(p: &Proc) {
    let pid = p.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_leave_and_come_back_without_a_restart() {
    let lan = Lan::new();
    let server =
        start_text("model = \"MODEL\"\nplacement = \"auto\"\n[discovery]\nenabled = true\n").await;
    let base = format!("http://{}", server.addr);
    let s = status(&base).await;
    assert!(s.nodes.is_empty() && !s.ready, "{s:?}");

    // Three nodes start after the router; each announces itself and is in use within seconds.
    let tag = std::process::id();
    let (p, d1, d2) = (format!("p-{tag}"), format!("d1-{tag}"), format!("d2-{tag}"));
    let cache = std::env::temp_dir().join(format!("exo-perf-cache-{tag}"));
    let _ = std::fs::remove_dir_all(&cache);
    let _prefill = lan.node("prefill", &p, &cache);
    let mut first = Some(lan.node("decode", &d1, &cache));
    let mut second = Some(lan.node("decode", &d2, &cache));
    let cached = || std::fs::read_dir(&cache).unwrap().count();
    let all_up = |s: &ClusterStatus| s.ready && [&p, &d1, &d2].iter().all(|n| up(s, n));
    let took = until(&base, "three nodes joining", all_up).await;
    eprintln!(
        "discovery: 3 nodes in use {:.1} s after the last one started",
        took.as_secs_f64()
    );
    let s = status(&base).await;
    for n in &s.nodes {
        assert_eq!(n.origin, Origin::Discovered);
        assert!(n.address.starts_with(lan.ip), "{n:?}");
        assert_eq!(n.perf.as_deref(), Some("measured"), "{n:?}");
    }
    // One measurement for the three: same model, layout, threads and machine.
    assert_eq!(cached(), 1);
    // The links between them are measured (nothing in the profile describes them).
    let measured = |s: &ClusterStatus| {
        let probed = |d: &str| {
            s.links.iter().any(|l| {
                (l.prefill.as_str(), l.decode.as_str()) == (p.as_str(), d)
                    && l.source.as_deref() == Some("measured")
                    && l.bandwidth_gbit_s.is_some_and(|b| b > 0.0)
            })
        };
        probed(&d1) && probed(&d2)
    };
    until(&base, "both links measured", measured).await;
    for l in status(&base).await.links {
        let (gbit, ms) = (
            l.bandwidth_gbit_s.unwrap_or(0.0),
            l.latency_ms.unwrap_or(0.0),
        );
        eprintln!(
            "discovery: link {} -> {}: {gbit:.2} Gbit/s, {ms:.3} ms",
            l.prefill, l.decode
        );
    }
    let model = s.model.clone();
    let r = chat(&base, &model, false).await;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["x-exo-prefill-node"], p.as_str());
    // `auto` placed it with the cost model, over the tables the nodes measured: it chose the
    // hand-off's pieces (no table, no pieces).
    assert!(
        r.headers().contains_key("x-exo-kv-pieces"),
        "{:?}",
        r.headers()
    );
    let expected: Value = r.json().await.unwrap();
    let expected = expected["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();

    // A graceful leave: SIGTERM to the node generating a stream. The stream finishes with the
    // whole answer; the node says goodbye and nothing new is placed on it.
    let mut stream = chat(&base, &model, true).await;
    let leaving = decode_node(&stream);
    let (gone, stays) = if leaving == d1 {
        (&mut first, &d2)
    } else {
        (&mut second, &d1)
    };
    let first_chunk = stream.chunk().await.unwrap().unwrap();
    sigterm(&gone.as_ref().unwrap().0);
    let mut body = String::from_utf8_lossy(&first_chunk).to_string();
    while let Some(chunk) = stream.chunk().await.unwrap() {
        body += &String::from_utf8_lossy(&chunk);
    }
    let text: String = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert!(!body.contains("\"error\""), "{body}");
    assert_eq!(text, expected, "the stream on the leaving node was cut");
    // Out of service while it drains, then gone: its goodbye reaches the router (mDNS lets a
    // goodbye's records expire a second later).
    let said_goodbye = |s: &ClusterStatus| {
        let why = node(s, &leaving).and_then(|n| n.error.clone());
        up(s, stays) && why.is_some_and(|w| w.contains("left the cluster"))
    };
    until(&base, "the leaving node's goodbye", said_goodbye).await;
    for _ in 0..3 {
        let r = chat(&base, &model, false).await;
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(decode_node(&r), *stays);
    }
    drop(gone.take());

    // It comes back on another port: the same entry, at its new address.
    let old = node(&status(&base).await, &leaving)
        .unwrap()
        .address
        .clone();
    *gone = Some(lan.node("decode", &leaving, &cache));
    let took = until(&base, "the node coming back", |s| up(s, &leaving)).await;
    eprintln!(
        "discovery: the node that left is back in use after {:.1} s",
        took.as_secs_f64()
    );
    let s = status(&base).await;
    assert_eq!(s.nodes.len(), 3, "{s:#?}");
    assert_ne!(node(&s, &leaving).unwrap().address, old);
    assert_eq!(
        cached(),
        1,
        "the returning node measured again instead of reusing its table"
    );

    // A node that dies (kill -9, no goodbye) is taken out by the health checks, and comes back.
    let victim = stays.clone();
    let slot = if victim == d1 {
        &mut first
    } else {
        &mut second
    };
    drop(slot.take());
    until(&base, "the killed node marked down", |s| !up(s, &victim)).await;
    let r = chat(&base, &model, false).await;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(decode_node(&r), leaving);
    *slot = Some(lan.node("decode", &victim, &cache));
    until(&base, "the killed node back", |s| up(s, &victim)).await;
    assert_eq!(status(&base).await.nodes.len(), 3);
    server.shutdown().await;
    without_a_profile(&lan, &cache, tag).await;
    std::fs::remove_dir_all(&cache).unwrap();
}

/// `serve` with no profile and a cluster file: it finds the nodes on the LAN, serves them with the
/// built-in LAN profile, and admits only the node holding the same cluster file (a node of
/// another cluster, and nodes without one, are refused and say why).
async fn without_a_profile(lan: &Lan, cache: &std::path::Path, tag: u32) {
    let dir = std::env::temp_dir().join(format!("exo-discovery-clusters-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    for name in ["ours", "theirs"] {
        let made = Command::new(env!("CARGO_BIN_EXE_exo-router"))
            .args(["cluster", "init", "--out-dir"])
            .arg(dir.join(name))
            .output()
            .unwrap();
        assert!(made.status.success(), "{made:?}");
    }
    let pem = |name: &str| dir.join(name).join("cluster.pem").display().to_string();
    let (ours, theirs) = (pem("ours"), pem("theirs"));
    let (member, stranger) = (format!("member-{tag}"), format!("stranger-{tag}"));
    let _m = lan.node_with("both", &member, cache, &["--cluster", &ours]);
    let _s = lan.node_with("both", &stranger, cache, &["--cluster", &theirs]);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_exo-router"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--cluster", &ours]);
    let (_router, line) = spawn_command(cmd, "listening on http");
    assert!(line.contains("profiles/lan.toml (built in)"), "{line}");
    let base = line.split("listening on ").nth(1).unwrap().to_string();
    let admitted = |s: &ClusterStatus| {
        let why = node(s, &stranger)
            .and_then(|n| n.error.clone())
            .unwrap_or_default();
        up(s, &member) && !up(s, &stranger) && why.contains("TLS")
    };
    until(&base, "only the cluster's member admitted", admitted).await;
    let s = status(&base).await;
    eprintln!(
        "discovery: without a profile, {member} admitted; {stranger}: {:?}",
        node(&s, &stranger).and_then(|n| n.error.clone())
    );
    assert_eq!(s.nodes.iter().filter(|n| n.healthy).count(), 1, "{s:#?}");
    let r = chat(&base, &s.model, false).await;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["x-exo-prefill-node"], member.as_str());
    std::fs::remove_dir_all(&dir).unwrap();
}
