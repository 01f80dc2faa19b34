//! Admission on a prefill node: long prompts never hold every slot, so a short prompt that arrives
//! behind two long ones runs at once, and the long-prompt permits come back.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use exo_engine::{ContextConfig, ContextHandle};
use exo_kvcache::KvLayout;
use exo_prefill_node::{PrefillNode, ShipConfig, long_prompt_permits};
use exo_protocol::{PrefillRequest, Prompt, RequestId, SamplingParams};
use exo_test_support::model;

fn request(id: u64, text: String) -> PrefillRequest {
    PrefillRequest {
        id: RequestId(u128::from(id)),
        prompt: Prompt::Text(text),
        sampling: SamplingParams::greedy(4),
        handoff: None,
        resume: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_prompt_gets_a_slot_while_long_ones_queue() {
    let model = model();
    let config = ContextConfig {
        layout: KvLayout {
            n_seq_max: 2,
            n_ctx_seq: 4096,
            ..KvLayout::default()
        },
        ..ContextConfig::default()
    };
    let ctx = ContextHandle::spawn(model.clone(), config).unwrap();
    let ship = ShipConfig {
        // A permit that never came back would fail the second long prompt after this.
        queue_timeout: Duration::from_secs(60),
        ..ShipConfig::default()
    };
    let node = PrefillNode::new("prefill-test", ctx, ship, exo_protocol::LinkSecurity::Plain);
    assert_eq!(node.free_long_prompt_permits(), 1);
    // About 1,100 tokens each, two prefill batches and more.
    let long_text = |v: usize| {
        format!("Log {v}. ") + &"The keeper logged the weather at dawn and at dusk. ".repeat(100)
    };
    assert!(model.tokenize(&long_text(0), true).len() > 2 * 512);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let run = |node: Arc<PrefillNode>, req: PrefillRequest, name: &'static str| {
        let done = done_tx.clone();
        tokio::spawn(async move {
            let (reply, local) = node.prefill(req).await.unwrap();
            // The slot is freed here (no decode side): the request ends with its prompt.
            drop(local);
            done.send(name).unwrap();
            reply
        })
    };
    let first = run(Arc::clone(&node), request(1, long_text(0)), "long 1");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = run(Arc::clone(&node), request(2, long_text(1)), "long 2");
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Both slots would be long prompts' without the permits; the short one would wait for one.
    assert_eq!(node.free_long_prompt_permits(), 0);
    let short = run(
        Arc::clone(&node),
        request(3, "The capital of France is".into()),
        "short",
    );
    short.await.unwrap();
    first.await.unwrap();
    second.await.unwrap();
    let order: Vec<&str> = std::iter::from_fn(|| done_rx.try_recv().ok()).collect();
    assert_eq!(order, ["short", "long 1", "long 2"]);
    assert_eq!(node.free_long_prompt_permits(), 1);
}

#[test]
fn long_prompts_hold_a_quarter_of_the_slots_at_least_one() {
    assert_eq!(long_prompt_permits(1), 1);
    assert_eq!(long_prompt_permits(2), 1);
    assert_eq!(long_prompt_permits(4), 1);
    assert_eq!(long_prompt_permits(8), 2);
    assert_eq!(long_prompt_permits(16), 4);
}
