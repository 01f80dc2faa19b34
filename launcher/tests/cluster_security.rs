//! A cluster secured by `exo-router cluster init`, with real node processes: members talk over
//! mutual TLS; a node holding another cluster's file is refused and `/health` says why; bytes
//! from a peer without the file never reach the RPC decoder; malformed frames from a member are
//! refused without a crash or growth in memory.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::procs::{Proc, spawn_node};
use common::{model_path, start_text};
use exo_protocol::{LinkSecurity, context_with_deadline, open_link};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `exo-router cluster init --out-dir DIR` (and `extra` flags); returns its output.
fn cluster_init(dir: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_exo-router"))
        .args(["cluster", "init", "--out-dir"])
        .arg(dir)
        .args(extra)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

/// The admin key `cluster init` wrote.
fn admin_key(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("api-keys.toml")).unwrap();
    let keys: toml::Table = toml::from_str(&text).unwrap();
    keys["keys"]["admin"].as_str().unwrap().to_string()
}

fn rss_kib(proc: &Proc) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", proc.0.id())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// A tiny deterministic generator for the hostile bytes.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Writes `bytes` to a fresh link (then closes our side if `hang_up`) and waits for the node to
/// close it; true if it did (within 10 s, reading and discarding whatever it sent).
async fn closed_after(addr: &str, security: &LinkSecurity, bytes: &[u8], hang_up: bool) -> bool {
    let Ok(mut io) = open_link(addr, security).await else {
        return true;
    };
    let _ = io.write_all(bytes).await;
    let _ = io.flush().await;
    if hang_up {
        let _ = io.shutdown().await;
    }
    let mut sink = vec![0u8; 4096];
    let drained = async {
        loop {
            match io.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), drained)
        .await
        .is_ok()
}

async fn chat(base: &str, key: &str, model: &str) -> (u16, String, String) {
    let body = json!({ "model": model, "messages": [{ "role": "user", "content": "Name a colour." }], "max_tokens": 8, "temperature": 0 });
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (p, d) = (header("x-exo-prefill-node"), header("x-exo-decode-node"));
    (resp.status().as_u16(), p, d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_talk_over_tls_and_everyone_else_is_refused() {
    let dir = std::env::temp_dir().join(format!("exo-cluster-sec-{}", std::process::id()));
    let (ours, theirs): (PathBuf, PathBuf) = (dir.join("a"), dir.join("b"));
    let made = cluster_init(&ours, &[]);
    assert!(made.status.success(), "{made:?}");
    assert!(String::from_utf8_lossy(&made.stdout).contains("admin = exo-"));
    let again = cluster_init(&ours, &[]);
    assert!(!again.status.success());
    // A refusal is one readable line, without a backtrace.
    let refusal = String::from_utf8_lossy(&again.stderr);
    assert!(
        refusal.starts_with("error: ") && refusal.contains("--force"),
        "{refusal}"
    );
    assert_eq!(refusal.trim_end().lines().count(), 1, "{refusal}");
    assert!(cluster_init(&theirs, &[]).status.success());
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(ours.join("cluster.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o077,
            0,
            "the cluster file is readable by others: {mode:o}"
        );
    }
    let our_file = ours.join("cluster.pem").display().to_string();
    let their_file = theirs.join("cluster.pem").display().to_string();

    let model = model_path().display().to_string();
    let member = |file: &str| ["--cluster", file, "--threads", "1"].map(String::from);
    let args = member(&our_file);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (_p, p_addr) = spawn_node(&model, "prefill", "p-tls", &args);
    let (d, d_addr) = spawn_node(&model, "decode", "d-tls", &args);
    let other = member(&their_file);
    let other: Vec<&str> = other.iter().map(String::as_str).collect();
    let (_x, x_addr) = spawn_node(&model, "decode", "x-other", &other);

    let profile = format!(
        "model = \"MODEL\"\nplacement = \"disaggregated\"\n[cluster]\nfile = \"{our_file}\"\n[api]\nkeys_file = \"{}\"\n\
         [[nodes]]\nname = \"p-tls\"\naddress = \"{p_addr}\"\nrole = \"prefill\"\n\
         [[nodes]]\nname = \"d-tls\"\naddress = \"{d_addr}\"\nrole = \"decode\"\n\
         [[nodes]]\nname = \"x-other\"\naddress = \"{x_addr}\"\nrole = \"decode\"\n",
        ours.join("api-keys.toml").display()
    );
    let server = start_text(&profile).await;
    let base = format!("http://{}", server.addr);
    let key = admin_key(&ours);
    let model_id = server.cluster.model_id();
    assert_eq!(
        chat(&base, &key, &model_id).await,
        (200, "p-tls".into(), "d-tls".into())
    );

    // The node of another cluster is down, and /health says why.
    let health: Value = reqwest::get(format!("{base}/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let x = health["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "x-other")
        .unwrap();
    assert_eq!(x["healthy"], false, "{health}");
    let why = x["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("TLS") && why.contains("cluster file"),
        "{health}"
    );

    // A plain RPC client, and one with the other cluster's file, get no answer from our node.
    let plain = exo_protocol::connect(&d_addr, &LinkSecurity::Plain)
        .await
        .unwrap();
    assert!(
        plain
            .hello(context_with_deadline(Duration::from_secs(8)))
            .await
            .is_err()
    );
    let theirs_link = LinkSecurity::load(Path::new(&their_file)).unwrap();
    assert!(exo_protocol::connect(&d_addr, &theirs_link).await.is_err());

    // Unauthenticated random bytes, then frames of garbage from a member: each connection is
    // closed, the node does not crash, and its memory does not grow.
    let before = rss_kib(&d);
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for i in 0..40 {
        let n = 1 + (rng.next() % 70_000) as usize;
        let mut bytes = rng.bytes(n);
        if i % 4 == 0 {
            // A TLS record header, to get further into the handshake.
            bytes.splice(0..0, [0x16, 0x03, 0x01, 0x40, 0x00]);
        }
        assert!(closed_after(&d_addr, &LinkSecurity::Plain, &bytes, false).await);
    }
    let ours_link = LinkSecurity::load(Path::new(&our_file)).unwrap();
    for i in 0..40u32 {
        let len = match i % 5 {
            // Larger than any frame the node accepts: refused at the length.
            0 => (exo_protocol::MAX_FRAME_BYTES as u32) + 1 + i,
            // A large declared length with a few bytes behind it, then the peer goes.
            1 => 15 << 20,
            _ => 1 + (rng.next() % 60_000) as u32,
        };
        let mut frame = len.to_be_bytes().to_vec();
        frame.extend(rng.bytes((len as usize).min(60_000)));
        assert!(
            closed_after(&d_addr, &ours_link, &frame, i % 5 == 1).await,
            "frame {i} of {len} bytes left the connection open"
        );
    }
    let after = rss_kib(&d);
    assert!(
        after < before + 64 * 1024,
        "the decode node grew from {before} KiB to {after} KiB"
    );

    // The cluster still serves.
    assert_eq!(
        chat(&base, &key, &model_id).await,
        (200, "p-tls".into(), "d-tls".into())
    );
    server.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}
