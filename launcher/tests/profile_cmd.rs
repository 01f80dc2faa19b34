//! `exo-router profile` on this machine: its hardware facts agree with what the OS reports, and the
//! file it writes is accepted by `plan` and by `serve`, which then answers a chat request.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;

use common::{model_path, post};
use exo_router::profile::Profile;
use serde_json::{Value, json};

fn exo_router(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_exo-router"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "exo-router {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A number from `getconf NAME` (glibc reads sysconf, not our code path).
fn getconf(name: &str) -> u64 {
    let out = Command::new("getconf").arg(name).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Physical cores as util-linux counts them: distinct (core, socket) pairs.
fn lscpu_cores() -> usize {
    let out = Command::new("lscpu")
        .arg("-p=CORE,SOCKET")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(str::to_string)
        .collect::<BTreeSet<_>>()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_measures_this_machine_and_its_file_serves() {
    let dir = std::env::temp_dir().join(format!("exo-profile-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("node.toml");
    let model = model_path().display().to_string();
    let out = exo_router(&[
        "profile",
        "--model",
        &model,
        "--out",
        file.to_str().unwrap(),
        "--name",
        "probe",
        "--quick",
    ]);
    // Per-step progress on stderr.
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(progress.contains("prefill"), "{progress}");
    assert!(progress.contains("decode batch"), "{progress}");

    let text = std::fs::read_to_string(&file).unwrap();
    let doc: toml::Table = text.parse().unwrap();
    let node = &doc["nodes"].as_array().unwrap()[0];
    let hw = node["hardware"].as_table().unwrap();
    let int = |k: &str| u64::try_from(hw[k].as_integer().unwrap()).unwrap();

    // Hardware facts against the OS.
    assert_eq!(int("threads"), getconf("_NPROCESSORS_CONF"), "{hw:?}");
    assert_eq!(int("cores") as usize, lscpu_cores(), "{hw:?}");
    let os_memory = getconf("_PHYS_PAGES") * getconf("PAGESIZE");
    let reported = int("memory_bytes");
    assert!(
        reported.abs_diff(os_memory) <= os_memory / 100,
        "memory {reported} vs OS {os_memory}"
    );
    assert!(int("packages") >= 1);
    assert!(!hw["numa"].as_array().unwrap().is_empty(), "{hw:?}");
    // Where the model ran: this CPU-only build registers no GPU, so no layer was offloaded.
    let offload = hw["offload"].as_table().unwrap();
    assert_eq!(offload["gpu_layers"].as_integer(), Some(0), "{offload:?}");
    assert_eq!(
        offload["n_layer"].as_integer(),
        Some(30),
        "SmolLM2-135M: {offload:?}"
    );
    assert!(
        offload["devices"].as_array().unwrap().is_empty(),
        "{offload:?}"
    );
    assert!(progress.contains("on the CPU"), "{progress}");

    // The measurements are the model's: a real KV size and ordered speed tables.
    let profile = Profile::load(&file).unwrap();
    let kv = profile.policy.kv_bytes_per_token;
    assert!(
        (20_000.0..30_000.0).contains(&kv),
        "SmolLM2 f16 KV is ~23 kB/token: {kv}"
    );
    let perf = profile.nodes[0].perf.as_ref().unwrap();
    assert!(perf.prefill_tok_s.len() >= 2 && perf.decode_step_ms.len() >= 2);
    assert!(perf.decode_step_ms.iter().all(|&(_, ms)| ms > 0.0));

    // `plan` accepts it and keeps everything on the one node.
    let out = exo_router(&["plan", "--profile", file.to_str().unwrap(), "--json"]);
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["chosen"]["mode"], "colocated", "{plan}");
    assert_eq!(plan["chosen"]["prefill"], "probe", "{plan}");
    assert!(plan["candidates"][0]["ttft_s"].as_f64().unwrap() > 0.0);

    // `serve` accepts it and answers.
    let server = exo_launcher::start(&profile, SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let answer = post(
        server.addr,
        "/v1/chat/completions",
        &json!({
            "model": server.cluster.model_id(),
            "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": 8,
            "temperature": 0
        }),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.prefill_node, "probe");
    assert_eq!(answer.decode_node, "probe");
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
