//! `placement = "auto"` through the real router: two embedded nodes whose perf tables make one a
//! fast-prefill box and the other a fast-decode box. Short prompts stay whole on one node, long
//! prompts are split, a slow link keeps them home, and every decision is counted in `/metrics`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{long_message, post, start_text};
use serde_json::json;

/// Two `both` nodes; `LINK` is replaced by the link's bandwidth in Gbit/s.
const TWO_BOXES: &str = r#"
model = "MODEL"
placement = "auto"

[policy]
kv_bytes_per_token = 23052
tpot_target_ms = 40     # the compute box (60 ms per token) misses it

[layout]
n_ctx_seq = 4096

[[links]]
between = ["compute", "bandwidth"]
bandwidth_gbit_s = LINK
latency_ms = 0.1

[[nodes]]
name = "compute"
address = "embedded"
role = "both"
slots = 2

[nodes.perf]
source = "hand-made: fast prefill, slow decode"
prefill_tok_s = [[16, 2000.0], [2048, 5000.0]]
decode_step_ms = [[1, 60.0], [2, 62.0]]
kv_export_gb_s = 2.0
kv_import_gb_s = 2.0

[[nodes]]
name = "bandwidth"
address = "embedded"
role = "both"
slots = 2

[nodes.perf]
source = "hand-made: slow prefill, fast decode"
prefill_tok_s = [[16, 1000.0], [2048, 500.0]]
decode_step_ms = [[1, 20.0], [2, 21.0]]
kv_export_gb_s = 2.0
kv_import_gb_s = 2.0
"#;

fn chat(model: &str, content: &str) -> serde_json::Value {
    json!({
        "model": model,
        "messages": [{ "role": "user", "content": content }],
        "max_tokens": 8,
        "temperature": 0
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_splits_long_prompts_keeps_short_ones_and_respects_the_link() {
    let server = start_text(&TWO_BOXES.replace("LINK", "10.0")).await;
    let model = server.cluster.model_id();

    // A short prompt: shipping its cache gains nothing, it runs whole on the fast decoder.
    let short = post(
        server.addr,
        "/v1/chat/completions",
        &chat(&model, "Say hi."),
    )
    .await;
    assert_eq!(short.status, 200, "{}", short.body);
    assert_eq!(
        (short.prefill_node.as_str(), short.decode_node.as_str()),
        ("bandwidth", "bandwidth")
    );

    // A long prompt: prefill on the fast-compute node, decode on the fast-decode node.
    let long_prompt = long_message(1000);
    let long = post(
        server.addr,
        "/v1/chat/completions",
        &chat(&model, &long_prompt),
    )
    .await;
    assert_eq!(long.status, 200, "{}", long.body);
    assert_eq!(
        (long.prefill_node.as_str(), long.decode_node.as_str()),
        ("compute", "bandwidth")
    );

    let metrics = common::procs::metrics(&server.addr.to_string()).await;
    let counted = |mode: &str, prefill: &str, decode: &str| {
        metrics.lines().any(|l| {
            l.starts_with("exo_placements_total")
                && l.contains(&format!("mode=\"{mode}\""))
                && l.contains(&format!("prefill=\"{prefill}\""))
                && l.contains(&format!("decode=\"{decode}\""))
                && l.ends_with(" 1")
        })
    };
    assert!(counted("colocated", "bandwidth", "bandwidth"), "{metrics}");
    assert!(
        counted("disaggregated", "compute", "bandwidth"),
        "{metrics}"
    );
    // The router chose the pieces for the split (both nodes have perf tables) and the prefill
    // node shipped the cache in that many: one after the prompt, or several while it ran (cut at
    // the ends of prefill batches, so a few may merge).
    let chosen: u64 = long
        .kv_pieces
        .parse()
        .expect("x-exo-kv-pieces on a priced split");
    let shipped = common::node_counter(&metrics, "exo_kv_pieces_total", "compute")
        .unwrap_or_else(|| panic!("no exo_kv_pieces_total for compute: {metrics}"));
    eprintln!("kv pieces: chosen {chosen}, shipped {shipped}");
    if chosen == 1 {
        assert_eq!(shipped, 1);
    } else {
        assert!((2..=chosen).contains(&shipped), "{shipped} of {chosen}");
    }
    assert!(short.kv_pieces.is_empty(), "colocated: no pieces header");
    server.shutdown().await;

    // Over a 1 Mbit/s link the ~30 MB cache would take minutes: the long prompt runs whole on
    // the only node that meets the TPOT target, slow prefill and all.
    let server = start_text(&TWO_BOXES.replace("LINK", "0.001")).await;
    let long = post(
        server.addr,
        "/v1/chat/completions",
        &chat(&model, &long_prompt),
    )
    .await;
    assert_eq!(long.status, 200, "{}", long.body);
    assert_eq!(
        (long.prefill_node.as_str(), long.decode_node.as_str()),
        ("bandwidth", "bandwidth")
    );
    server.shutdown().await;
}
