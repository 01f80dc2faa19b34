//! The router against stand-in nodes (real tarpc over real TCP, no llama.cpp): when the decode
//! node dies, hangs or reports a fault while a split request's prompt runs, the request fails with
//! 503 and the prefill call is cancelled on the prefill node, instead of waiting for the prompt to
//! end (up to the 600 s prefill deadline); and health checks take a node that reports a fault out
//! of service.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use exo_protocol::{
    HardwareFacts, KvBegin, KvEnd, KvFrame, KvLayout, KvType, ModelFingerprint, NodeError,
    NodeInfo, NodeService, PollReply, PrefillReply, PrefillRequest, RequestId, Role,
};
use exo_router::profile::Profile;
use exo_router::{Deployment, Server};
use futures::StreamExt;
use tarpc::context::Context;
use tarpc::server::{BaseChannel, Channel};
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot, watch};

/// What the test sees of a stand-in node.
#[derive(Default)]
struct Signals {
    /// `hello` hangs instead of answering (health checks answer until this is set).
    hang_hello: AtomicBool,
    /// What `hello` reports as the node's fault (a retired engine context, say).
    fault: Mutex<Option<String>>,
    /// `prefill` answers at once (output token 0) instead of never.
    answer_prefill: AtomicBool,
    /// `poll` answers with no output after its wait, forever (a wedged engine).
    wedged: AtomicBool,
    /// A `cancel` arrived.
    cancelled: AtomicBool,
    /// `prefill` calls received.
    prefill_calls: AtomicUsize,
    /// A prefill call arrived.
    prefill_started: Notify,
    /// A prefill call's handler was dropped before it answered (the call was cancelled).
    prefill_cancelled: AtomicBool,
}

/// A node that answers `hello` and never finishes a prompt.
#[derive(Clone)]
struct StandIn {
    info: NodeInfo,
    signals: Arc<Signals>,
}

/// Marks the prefill cancelled when dropped unanswered.
struct Unanswered(Arc<Signals>);

impl Drop for Unanswered {
    fn drop(&mut self) {
        self.0.prefill_cancelled.store(true, Ordering::SeqCst);
    }
}

impl NodeService for StandIn {
    async fn hello(self, _: Context) -> NodeInfo {
        if self.signals.hang_hello.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        NodeInfo {
            fault: self.signals.fault.lock().unwrap().clone(),
            ..self.info.clone()
        }
    }

    async fn prefill(self, _: Context, _: PrefillRequest) -> Result<PrefillReply, NodeError> {
        self.signals.prefill_calls.fetch_add(1, Ordering::SeqCst);
        if self.signals.answer_prefill.load(Ordering::SeqCst) {
            return Ok(PrefillReply {
                first_token: 1,
                first_text: "Once".into(),
                n_prompt: 3,
                finish: None,
                first_logprob: None,
            });
        }
        let _guard = Unanswered(Arc::clone(&self.signals));
        self.signals.prefill_started.notify_one();
        std::future::pending().await
    }

    async fn kv_begin(self, _: Context, _: KvBegin) -> Result<(), NodeError> {
        Err(NodeError::Busy)
    }

    async fn kv_chunk(self, _: Context, _: KvFrame) -> Result<(), NodeError> {
        Err(NodeError::Busy)
    }

    async fn kv_end(self, _: Context, _: KvEnd) -> Result<(), NodeError> {
        Err(NodeError::Busy)
    }

    async fn kv_abort(self, _: Context, _: RequestId, _: String) {}

    async fn poll(self, _: Context, _: RequestId, wait_ms: u32) -> Result<PollReply, NodeError> {
        if self.signals.wedged.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(u64::from(wait_ms))).await;
            return Ok(PollReply::default());
        }
        std::future::pending().await
    }

    async fn cancel(self, _: Context, _: RequestId) {
        self.signals.cancelled.store(true, Ordering::SeqCst);
    }

    async fn count_tokens(self, _: Context, _: exo_protocol::Prompt) -> Result<u32, NodeError> {
        Err(NodeError::Busy)
    }

    async fn model_part(
        self,
        _: Context,
        _: u64,
        _: u32,
    ) -> Result<exo_protocol::ModelPart, NodeError> {
        Err(NodeError::Busy)
    }

    async fn probe_sink(self, _: Context, payload: exo_protocol::ByteBuf) -> u64 {
        payload.len() as u64
    }

    async fn probe_link(
        self,
        _: Context,
        _: String,
        _: u32,
    ) -> Result<exo_protocol::LinkProbe, NodeError> {
        Err(NodeError::Busy)
    }
}

/// Serves a stand-in with `role` on a free port until `stop` fires (then its connections close).
async fn stand_in(role: Role, stop: oneshot::Receiver<()>) -> (SocketAddr, Arc<Signals>) {
    stand_in_with_slots(role, stop, 4).await
}

/// [`stand_in`] reporting `slots` sequence slots.
async fn stand_in_with_slots(
    role: Role,
    stop: oneshot::Receiver<()>,
    slots: u32,
) -> (SocketAddr, Arc<Signals>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let layout = KvLayout {
        type_k: KvType::F16,
        type_v: KvType::F16,
        flash_attn: false,
        kv_unified: false,
        n_seq_max: slots,
        n_ctx_seq: 4096,
    };
    let signals = Arc::new(Signals::default());
    let node = StandIn {
        info: NodeInfo {
            name: format!("{role}"),
            role,
            model: "stand-in".into(),
            fingerprint: ModelFingerprint([7; 32]),
            layout,
            hardware: HardwareFacts::default(),
            version: "test".into(),
            fault: None,
            tool_syntax: exo_protocol::ToolSyntax::Wrapped,
            perf: None,
        },
        signals: Arc::clone(&signals),
    };
    let shutdown = async move {
        let _ = stop.await;
    };
    tokio::spawn(exo_protocol::serve(
        listener,
        exo_protocol::LinkSecurity::Plain,
        shutdown,
        move |transport| {
            let node = node.clone();
            async move {
                BaseChannel::with_defaults(transport)
                    .execute(node.serve())
                    .for_each(|response| async move {
                        tokio::spawn(response);
                    })
                    .await;
            }
        },
    ));
    (addr, signals)
}

/// Starts a router over a split cluster: prefill node `p` at `p_addr`, decode node `d` at `d_addr`.
async fn start_split(p_addr: SocketAddr, d_addr: SocketAddr) -> Server {
    start_split_with(p_addr, d_addr, "").await
}

/// [`start_split`] with `router` (TOML keys) as the profile's `[router]` table.
async fn start_split_with(p_addr: SocketAddr, d_addr: SocketAddr, router: &str) -> Server {
    let text = format!(
        "model = \"m.gguf\"\nplacement = \"disaggregated\"\n[router]\n{router}\n\
         [[nodes]]\nname = \"p\"\naddress = \"{p_addr}\"\nrole = \"prefill\"\n\
         [[nodes]]\nname = \"d\"\naddress = \"{d_addr}\"\nrole = \"decode\"\n"
    );
    let profile = Profile::parse(&text, Path::new("fail-fast.toml")).unwrap();
    let deployment = Deployment {
        profile: &profile,
        addrs: vec![p_addr.to_string(), d_addr.to_string()],
        models: Vec::new(),
        http: Default::default(),
        security: exo_protocol::LinkSecurity::Plain,
    };
    let (stop, _) = watch::channel(false);
    Server::start(deployment, SocketAddr::from(([127, 0, 0, 1], 0)), stop)
        .await
        .unwrap()
}

/// How the decode node fails while the prompt runs.
#[derive(Clone, Copy, Debug)]
enum Failure {
    /// Its process goes away (connections close) after it answered the first liveness check.
    Dies,
    /// It stays connected but stops answering (every `hello` hangs).
    Hangs,
    /// It answers, saying it cannot serve (its engine context was retired).
    ReportsFault,
}

/// Starts a split cluster of stand-ins (with `router` as its `[router]` table), sends one
/// streaming chat, fails the decode node as `failure` says once the prompt is running, and checks
/// the request fails with 503 (the only decode node is lost, so it cannot move) and the prefill
/// call is cancelled; returns the error message.
async fn decode_node_fails_mid_prompt(failure: Failure, router: &str) -> String {
    let (_keep_prefill, prefill_stop) = oneshot::channel();
    let (kill_decode, decode_stop) = oneshot::channel();
    let (p_addr, prefill) = stand_in(Role::Prefill, prefill_stop).await;
    let (d_addr, decode) = stand_in(Role::Decode, decode_stop).await;
    let server = start_split_with(p_addr, d_addr, router).await;
    assert!(server.cluster.nodes().iter().all(|n| n.healthy()));

    let url = format!("http://{}/v1/chat/completions", server.addr);
    let request = tokio::spawn(async move {
        let body = serde_json::json!({
            "model": "stand-in",
            "messages": [{"role": "user", "content": "Hello"}],
            "stream": true
        });
        reqwest::Client::new().post(url).json(&body).send().await
    });
    prefill.prefill_started.notified().await;
    match failure {
        Failure::Dies => {
            // Let the check that runs alongside the prompt see the node alive first.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = kill_decode.send(());
        }
        Failure::Hangs => decode.hang_hello.store(true, Ordering::SeqCst),
        Failure::ReportsFault => *decode.fault.lock().unwrap() = Some(RETIRED.into()),
    }

    // Generous: without the decode leg watched for the whole prompt, the answer would wait for
    // the prompt, which never ends.
    let answer = tokio::time::timeout(Duration::from_secs(60), request)
        .await
        .unwrap_or_else(|_| panic!("{failure:?}: the request must fail, not wait for the prompt"))
        .unwrap()
        .unwrap();
    assert_eq!(answer.status().as_u16(), 503, "{failure:?}");
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["error"]["type"], "service_unavailable", "{body}");

    // The abandoned prefill call is cancelled on the prefill node.
    for _ in 0..100 {
        if prefill.prefill_cancelled.load(Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        prefill.prefill_cancelled.load(Ordering::SeqCst),
        "{failure:?}"
    );
    server.shutdown().await;
    body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The message of a request that tried to move: the lost node, and why no other node took it.
fn tried_to_move(message: &str) -> bool {
    message.contains("node d ") && message.contains("no other node could take the request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_node_that_dies_mid_prompt_fails_the_request_and_cancels_the_prefill() {
    let message = decode_node_fails_mid_prompt(Failure::Dies, "").await;
    assert!(tried_to_move(&message), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_node_that_hangs_mid_prompt_fails_the_request_and_cancels_the_prefill() {
    let message = decode_node_fails_mid_prompt(Failure::Hangs, "").await;
    assert!(tried_to_move(&message), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_node_that_reports_a_fault_mid_prompt_fails_the_request_and_cancels_the_prefill() {
    let message = decode_node_fails_mid_prompt(Failure::ReportsFault, "").await;
    assert!(tried_to_move(&message), "{message}");
}

/// With `router.migration_limit = 0` a lost node fails the request at once, without trying to
/// place it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_migrations_allowed_a_lost_node_fails_the_request_at_once() {
    let message = decode_node_fails_mid_prompt(Failure::Dies, "migration_limit = 0").await;
    assert!(!tried_to_move(&message), "{message}");
    assert!(message.contains("node d is unreachable"), "{message}");
}

/// What a node whose engine context was retired reports.
const RETIRED: &str = "context retired after an earlier failed import";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_take_a_node_that_reports_a_fault_out_of_service() {
    let (_keep_prefill, prefill_stop) = oneshot::channel();
    let (_keep_decode, decode_stop) = oneshot::channel();
    let (p_addr, _prefill) = stand_in(Role::Prefill, prefill_stop).await;
    let (d_addr, decode) = stand_in(Role::Decode, decode_stop).await;
    let server = start_split(p_addr, d_addr).await;
    assert!(server.cluster.nodes().iter().all(|n| n.healthy()));

    *decode.fault.lock().unwrap() = Some(RETIRED.into());
    // Health checks run every 2 s; a fault must take the node out within a few rounds.
    let mut down = false;
    for _ in 0..100 {
        down = !server.cluster.nodes()[1].healthy();
        if down {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(down, "a node reporting a fault stayed in service");
    assert!(server.cluster.nodes()[0].healthy());
    server.shutdown().await;
}

/// A decode node whose engine is wedged answers every poll with nothing: the request fails with
/// 504 once `router.progress_timeout_s` passes without output (instead of never), and the request
/// is cancelled on the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_decode_node_fails_the_request_at_the_progress_deadline() {
    let (_keep_prefill, prefill_stop) = oneshot::channel();
    let (_keep_decode, decode_stop) = oneshot::channel();
    let (p_addr, prefill) = stand_in(Role::Prefill, prefill_stop).await;
    let (d_addr, decode) = stand_in(Role::Decode, decode_stop).await;
    prefill.answer_prefill.store(true, Ordering::SeqCst);
    decode.wedged.store(true, Ordering::SeqCst);
    let server = start_split_with(p_addr, d_addr, "progress_timeout_s = 1.5").await;

    let body = serde_json::json!({
        "model": "stand-in",
        "messages": [{"role": "user", "content": "Hello"}],
    });
    let url = format!("http://{}/v1/chat/completions", server.addr);
    let answer = tokio::time::timeout(
        Duration::from_secs(30),
        reqwest::Client::new().post(url).json(&body).send(),
    )
    .await
    .expect("the request must fail at its progress deadline, not wait forever")
    .unwrap();
    assert_eq!(answer.status().as_u16(), 504);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["error"]["code"], "timeout", "{body}");
    for _ in 0..100 {
        if decode.cancelled.load(Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(decode.cancelled.load(Ordering::SeqCst));
    server.shutdown().await;
}

/// Waits (up to 10 s) until `done` holds.
async fn eventually(done: impl Fn() -> bool) -> bool {
    for _ in 0..200 {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done()
}

/// A request reserves a sequence slot on its decode node before its prompt runs: with the only
/// slot held by a running request, a second request's prompt does not run (its cache would only
/// wait in the decode node's memory); it runs once the first request's client goes away and its
/// slot is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_runs_only_once_a_decode_slot_is_reserved_for_it() {
    let (_keep_prefill, prefill_stop) = oneshot::channel();
    let (_keep_decode, decode_stop) = oneshot::channel();
    let (p_addr, prefill) = stand_in(Role::Prefill, prefill_stop).await;
    let (d_addr, decode) = stand_in_with_slots(Role::Decode, decode_stop, 1).await;
    prefill.answer_prefill.store(true, Ordering::SeqCst);
    // Requests on the decode node never end: the first one keeps the only slot.
    decode.wedged.store(true, Ordering::SeqCst);
    let server = start_split(p_addr, d_addr).await;
    let url = format!("http://{}/v1/chat/completions", server.addr);
    let body = |stream: bool| {
        serde_json::json!({
            "model": "stand-in",
            "messages": [{"role": "user", "content": "Hello"}],
            "stream": stream,
        })
    };

    let first = reqwest::Client::new()
        .post(&url)
        .json(&body(true))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status().as_u16(), 200);
    assert_eq!(prefill.prefill_calls.load(Ordering::SeqCst), 1);
    assert_eq!(server.cluster.nodes()[1].free_slots(), 0);

    let second = tokio::spawn(reqwest::Client::new().post(&url).json(&body(false)).send());
    // Give the second request every chance to run its prompt early (it must not).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(prefill.prefill_calls.load(Ordering::SeqCst), 1);

    drop(first);
    let calls = || prefill.prefill_calls.load(Ordering::SeqCst) == 2;
    assert!(
        eventually(calls).await,
        "the released slot must go to the waiting request"
    );
    second.abort();
    server.shutdown().await;
}
