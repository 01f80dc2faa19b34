//! The split over a real, slow network: the prefill node (with the router) and the decode node run
//! as processes in two network namespaces joined by a veth pair that `tc tbf` shapes to 100 Mbit/s
//! both ways, so a 1,500-token prompt's cache (35 MB) crosses a slow link in pieces while the prompt
//! runs. The answer equals a colocated run's, token for token. Making namespaces needs root (CI has
//! it); without it the test says so on stderr and returns.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::procs::{ip, node_args};
use common::{long_message, model_path, post, start_profile, write_split_profile};
use serde_json::{Value, json};

/// The two namespaces (and the veth pair in them), deleted when dropped.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Makes namespaces `p` (10.78.0.1) and `d` (10.78.0.2) joined by a veth pair shaped to `rate`
/// both ways; `None` when this machine cannot (not root, no `ip` or `tc`).
fn link(p: &str, d: &str, tag: u32, rate: &str) -> Option<Namespaces> {
    if !ip(&["netns", "add", p]) {
        return None;
    }
    let made = Namespaces(vec![p.to_string(), d.to_string()]);
    let (vp, vd) = (format!("exv{tag}p"), format!("exv{tag}d"));
    let steps: [&[&str]; 9] = [
        &["netns", "add", d],
        &["link", "add", &vp, "type", "veth", "peer", "name", &vd],
        &["link", "set", &vp, "netns", p],
        &["link", "set", &vd, "netns", d],
        &["-n", p, "addr", "add", "10.78.0.1/24", "dev", &vp],
        &["-n", d, "addr", "add", "10.78.0.2/24", "dev", &vd],
        &["-n", p, "link", "set", &vp, "up"],
        &["-n", d, "link", "set", &vd, "up"],
        &["-n", p, "link", "set", "lo", "up"],
    ];
    if !steps.iter().all(|s| ip(s)) {
        return None;
    }
    for (ns, dev) in [(p, &vp), (d, &vd)] {
        let shaped = Command::new("ip")
            .args([
                "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root",
            ])
            .args(["tbf", "rate", rate, "burst", "256kb", "latency", "100ms"])
            .status()
            .is_ok_and(|s| s.success());
        if !shaped {
            return None;
        }
    }
    Some(made)
}

/// Starts `exo-router ARGS` inside namespace `ns`; returns once it printed "listening on".
fn spawn_in(ns: &str, args: &[&str]) -> Proc {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_exo-router")])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let started = lines.any(|l| l.is_ok_and(|l| l.contains("listening on")));
    assert!(started, "exo-router {args:?} did not start in {ns}");
    std::thread::spawn(move || lines.for_each(drop));
    Proc(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_over_a_shaped_link_answers_like_colocated() {
    let tag = std::process::id() % 100_000;
    let (p_ns, d_ns) = (format!("exo-sp{tag}"), format!("exo-sd{tag}"));
    let curl = Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .status();
    let namespaces = curl
        .is_ok_and(|s| s.success())
        .then(|| link(&p_ns, &d_ns, tag, "100mbit"))
        .flatten();
    let Some(_namespaces) = namespaces else {
        eprintln!(
            "SKIPPED a_split_over_a_shaped_link_answers_like_colocated: cannot make network \
             namespaces here (needs root, ip, tc and curl)"
        );
        return;
    };
    let model = model_path().display().to_string();
    let node = |role: &str, addr: &str| {
        let ns = if role == "decode" { &d_ns } else { &p_ns };
        let mut args = node_args(&model, role, role);
        args.extend_from_slice(&["--threads", "1", "--listen", addr]);
        spawn_in(ns, &args)
    };
    let _decode = node("decode", "10.78.0.2:52416");
    let _prefill = node("prefill", "10.78.0.1:52416");
    let (dir, profile) = write_split_profile(
        &model,
        ("prefill", "10.78.0.1:52416"),
        ("decode", "10.78.0.2:52416"),
        "shaped",
    );
    let profile = profile.display().to_string();
    let _router = spawn_in(
        &p_ns,
        &[
            "serve",
            "--profile",
            &profile,
            "--listen",
            "10.78.0.1:52415",
        ],
    );

    let body = json!({
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "messages": [{ "role": "user", "content": long_message(700) }],
        "max_tokens": 24, "temperature": 0,
    });
    // The client sits in the prefill node's namespace too: curl, on a blocking thread.
    let (ns, payload) = (p_ns.clone(), body.to_string());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("ip")
            .args(["netns", "exec", &ns, "curl", "-s", "--max-time", "300"])
            .args(["-H", "content-type: application/json", "-d", &payload])
            .arg("http://10.78.0.1:52415/v1/chat/completions")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let split: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}", String::from_utf8_lossy(&out.stdout));
    });
    let prompt_tokens = split["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
    assert!(prompt_tokens > 1000, "{split}");

    let colocated = start_profile("local-colocated.toml").await;
    let reference = post(colocated.addr, "/v1/chat/completions", &body).await;
    assert_eq!(reference.status, 200, "{}", reference.body);
    let text = split["choices"][0]["message"]["content"].as_str();
    assert_eq!(text, Some(reference.text.as_str()), "{split}");
    let _ = std::fs::remove_dir_all(&dir);
}
