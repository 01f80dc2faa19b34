//! `exo-router pull` and `--model org/repo:TAG` against a local server with the Hugging Face hub's
//! URL layout (there is no internet here): the file listing, the resolve URL that redirects to
//! storage and carries the sha256 and commit in its headers, range requests. The real binary
//! downloads the default model through a connection the server cuts part-way, resumes it, checks
//! it, lays it out as the hub's own tools do, and a node then runs it by name from the cache.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use common::procs::{last_word, spawn_command};
use exo_test_support::model_path;
use serde_json::json;
use sha2::{Digest, Sha256};

const REPO: &str = "test-org/SmolLM2-GGUF";
const FILE: &str = "SmolLM2-135M-Instruct-Q4_1.gguf";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
/// The first download of the file is cut after the server sent this many bytes.
const CUT_AT: usize = 20 << 20;

/// The fake hub: the model's bytes, its sha256, and the requests it saw.
struct Hub {
    bytes: Bytes,
    sha256: String,
    /// `Range` headers (or "" for none) of the storage GETs, in order.
    gets: Mutex<Vec<String>>,
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

async fn tree(
    State(hub): State<Arc<Hub>>,
    UrlPath((org, name, _rev)): UrlPath<(String, String, String)>,
) -> Response {
    if format!("{org}/{name}") != REPO {
        return StatusCode::NOT_FOUND.into_response();
    }
    let n = hub.bytes.len();
    axum::Json(json!([
        { "type": "file", "path": "README.md", "size": 12, "oid": "1111" },
        { "type": "file", "path": FILE, "size": n, "lfs": { "oid": hub.sha256, "size": n } },
        // A second quantization whose published sha256 is not what its bytes hash to.
        { "type": "file", "path": "SmolLM2-135M-Instruct-Q8_0.gguf", "size": n,
          "lfs": { "oid": "ab".repeat(32), "size": n } },
        { "type": "directory", "path": "extras" },
    ]))
    .into_response()
}

/// `HEAD`/`GET /ORG/NAME/resolve/REV/FILE`: the hub's answer, a redirect to storage with the
/// file's sha256 (for LFS files), size and commit.
async fn resolve(
    State(hub): State<Arc<Hub>>,
    UrlPath((org, name, _rev, file)): UrlPath<(String, String, String, String)>,
) -> Response {
    if format!("{org}/{name}") != REPO || !file.ends_with(".gguf") {
        return StatusCode::NOT_FOUND.into_response();
    }
    let etag = if file == FILE {
        hub.sha256.clone()
    } else {
        "ab".repeat(32)
    };
    Response::builder()
        .status(StatusCode::FOUND)
        .header(header::LOCATION, format!("/storage/{file}"))
        .header("x-repo-commit", COMMIT)
        .header("x-linked-etag", format!("\"{etag}\""))
        .header("x-linked-size", hub.bytes.len().to_string())
        .body(Body::empty())
        .unwrap()
}

/// The storage the hub redirects to: ranges honoured; the first whole-file GET is cut part-way.
async fn storage(State(hub): State<Arc<Hub>>, method: Method, headers: HeaderMap) -> Response {
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if method == Method::HEAD {
        return StatusCode::OK.into_response();
    }
    let first = {
        let mut gets = hub.gets.lock().unwrap();
        gets.push(range.clone());
        gets.len() == 1
    };
    let from: usize = range
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let body = hub.bytes.slice(from.min(hub.bytes.len())..);
    let status = if range.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::PARTIAL_CONTENT
    };
    if first {
        // Half a file, then the connection breaks.
        let part = body.slice(..CUT_AT);
        let stream = futures::stream::iter(vec![
            Ok(part),
            Err(std::io::Error::other("connection cut by the test")),
        ]);
        return Response::builder()
            .status(status)
            .header(header::CONTENT_LENGTH, body.len().to_string())
            .body(Body::from_stream(stream))
            .unwrap();
    }
    (status, body).into_response()
}

async fn start_hub() -> (SocketAddr, Arc<Hub>) {
    let bytes = Bytes::from(std::fs::read(model_path()).unwrap());
    let hub = Arc::new(Hub {
        sha256: hex(&Sha256::digest(&bytes)),
        bytes,
        gets: Mutex::new(Vec::new()),
    });
    let app = Router::new()
        .route("/api/models/{org}/{name}/tree/{rev}", get(tree))
        .route(
            "/{org}/{name}/resolve/{rev}/{file}",
            get(resolve).head(resolve),
        )
        .route("/storage/{file}", get(storage).head(storage))
        .with_state(hub.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, hub)
}

/// Runs `exo-router ARGS` against the fake hub with `home` as HF_HOME; (success, stdout, stderr).
fn run(hub: SocketAddr, home: &Path, args: &[&str]) -> (bool, String, String) {
    let endpoint = format!("http://{hub}");
    exo(
        args,
        &[
            ("HF_ENDPOINT", &endpoint),
            ("HF_HOME", &home.display().to_string()),
        ],
    )
}

/// Runs `exo-router ARGS` with `env` (no other hub settings, no backtraces); (success, stdout,
/// stderr).
fn exo(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_exo-router"))
        .args(args)
        .envs(env.iter().copied())
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("RUST_BACKTRACE")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_is_pulled_resumed_checked_and_run_by_name() {
    let (hub, state) = start_hub().await;
    let home = std::env::temp_dir().join(format!("exo-pull-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    let cache = home.join("hub").join("models--test-org--SmolLM2-GGUF");

    // Pulled through a connection cut at 20 MiB: resumed with a range request, checked, laid out.
    let name = format!("{REPO}:Q4_1");
    let h = home.clone();
    let (ok, stdout, stderr) = tokio::task::spawn_blocking(move || run(hub, &h, &["pull", &name]))
        .await
        .unwrap();
    assert!(ok, "{stderr}");
    let path = PathBuf::from(&stdout);
    assert_eq!(path, cache.join("snapshots").join(COMMIT).join(FILE));
    assert_eq!(std::fs::read(&path).unwrap(), state.bytes.as_ref());
    assert_eq!(
        std::fs::read_link(&path).unwrap(),
        Path::new("../../blobs").join(&state.sha256)
    );
    assert_eq!(
        std::fs::read_to_string(cache.join("refs/main")).unwrap(),
        COMMIT
    );
    assert!(stderr.contains("resuming"), "{stderr}");
    // The second GET asks for the rest from what arrived before the cut (the connection may
    // drop bytes the server had queued, never more than it sent).
    let gets = state.gets.lock().unwrap().clone();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[0], "");
    let resumed_at: usize = gets[1]
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a range request: {gets:?}"));
    assert!((1..=CUT_AT).contains(&resumed_at), "{gets:?}");

    // Pulled again: the blob is there, nothing is downloaded.
    let h = home.clone();
    let (ok, again, _) = tokio::task::spawn_blocking(move || {
        run(hub, &h, &["pull", REPO, "--file", FILE, "--quiet"])
    })
    .await
    .unwrap();
    assert!(ok);
    assert_eq!(again, stdout);
    assert_eq!(state.gets.lock().unwrap().len(), 2);

    // A tag the repository lacks: one line naming what it has.
    let h = home.clone();
    let (ok, _, stderr) = tokio::task::spawn_blocking(move || {
        run(hub, &h, &["pull", "test-org/SmolLM2-GGUF:Q5_K_S"])
    })
    .await
    .unwrap();
    assert!(!ok);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("SmolLM2-135M-Instruct-Q4_1.gguf, SmolLM2-135M-Instruct-Q8_0.gguf"),
        "{stderr}"
    );

    // Bytes that do not hash to the published sha256 are refused and not kept.
    let h = home.clone();
    let (ok, _, stderr) = tokio::task::spawn_blocking(move || {
        run(hub, &h, &["pull", "test-org/SmolLM2-GGUF:Q8_0", "--quiet"])
    })
    .await
    .unwrap();
    assert!(!ok);
    assert!(stderr.contains("sha256"), "{stderr}");
    let blobs: Vec<_> = std::fs::read_dir(cache.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(blobs, vec![state.sha256.clone()], "nothing else is kept");

    // A node runs the model by name, from the cache alone.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_exo-router"));
    cmd.args([
        "node",
        "--role",
        "decode",
        "--name",
        "by-name",
        "--no-announce",
        "--listen",
        "127.0.0.1:0",
        "--model",
        &format!("{REPO}:Q4_1"),
    ])
    .env("HF_HOME", &home)
    .env("HF_HUB_OFFLINE", "1")
    .env("HF_ENDPOINT", "http://127.0.0.1:9");
    let (node, line) = tokio::task::spawn_blocking(move || spawn_command(cmd, "listening on"))
        .await
        .unwrap();
    assert!(!last_word(&line).is_empty());
    drop(node);

    // And a profile's embedded nodes, by the same name.
    let profile =
        std::fs::read_to_string(exo_test_support::root().join("profiles/local-colocated.toml"))
            .unwrap()
            .replace(
                "models/SmolLM2-135M-Instruct.Q4_1.gguf",
                &format!("{REPO}:Q4_1"),
            )
            .replace("127.0.0.1:52415", "127.0.0.1:0");
    let file = home.join("by-name.toml");
    std::fs::write(&file, profile).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_exo-router"));
    cmd.args(["serve", "--no-discover", "--profile"])
        .arg(&file)
        .env("HF_HOME", &home)
        .env("HF_HUB_OFFLINE", "1");
    let (serve, line) = tokio::task::spawn_blocking(move || spawn_command(cmd, "listening on"))
        .await
        .unwrap();
    assert!(
        line.contains("serving SmolLM2-135M-Instruct-Q4_1"),
        "{line}"
    );
    drop(serve);
    let _ = std::fs::remove_dir_all(&home);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_fetches_its_model_from_a_peer() {
    let model = model_path();
    let bytes = std::fs::read(&model).unwrap();
    let peer_model = model.display().to_string();
    let (peer, addr) = tokio::task::spawn_blocking(move || {
        common::procs::spawn_node(&peer_model, "decode", "peer", &[])
    })
    .await
    .unwrap();
    let dir = std::env::temp_dir().join(format!("exo-peer-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("m.gguf");
    let part = dir.join("m.gguf.incomplete");

    // A part on disk is resumed, not restarted: 10 MiB of other bytes make a file whose
    // fingerprint is not the peer's, which is refused and removed.
    std::fs::write(&part, vec![0x5a; 10 << 20]).unwrap();
    let o = out.display().to_string();
    let a = addr.clone();
    let (ok, _, stderr) = tokio::task::spawn_blocking(move || {
        exo(&["pull", "--from-peer", &a, "--out", &o, "--quiet"], &[])
    })
    .await
    .unwrap();
    assert!(!ok);
    assert!(stderr.contains("fingerprint"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(!part.exists() && !out.exists());

    // A part that is the file's true beginning is finished from where it stops.
    std::fs::write(&part, &bytes[..10 << 20]).unwrap();
    let (o, a) = (out.display().to_string(), addr.clone());
    let (ok, stdout, stderr) = tokio::task::spawn_blocking(move || {
        exo(&["pull", "--from-peer", &a, "--out", &o, "--quiet"], &[])
    })
    .await
    .unwrap();
    assert!(ok, "{stderr}");
    assert_eq!(stdout, out.display().to_string());
    assert_eq!(std::fs::read(&out).unwrap(), bytes);

    // A node started with a missing model and --model-from fetches it, then serves.
    let fresh = dir.join("node.gguf").display().to_string();
    let (node, line) = tokio::task::spawn_blocking(move || {
        common::procs::spawn_node(&fresh, "decode", "fetcher", &["--model-from", &addr])
    })
    .await
    .unwrap();
    assert!(!line.is_empty());
    assert_eq!(std::fs::read(dir.join("node.gguf")).unwrap(), bytes);
    drop((node, peer));
    let _ = std::fs::remove_dir_all(&dir);
}
