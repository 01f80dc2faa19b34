//! Unit tests of the cost model's arithmetic, with the shipped profiles' kinds of machines.

use super::*;
use crate::placement::cost_model::plan;
use exo_protocol::CodecPerf;

/// A compute-heavy box: fast prefill, slow decode (like a DGX Spark).
fn compute_box() -> NodePerf {
    NodePerf {
        source: "test".into(),
        prefill_tok_s: vec![(1, 17.0), (64, 1000.0), (1024, 5000.0), (8192, 5600.0)],
        decode_step_ms: vec![(1, 60.0), (8, 70.0)],
        decode_ms_per_1k_ctx: 0.5,
        kv_export_gb_s: 20.0,
        kv_import_gb_s: 20.0,
        codecs: [(
            "shuffle-lz4".to_string(),
            CodecPerf {
                ratio: 1.1,
                encode_gb_s: 1.0,
                decode_gb_s: 3.0,
            },
        )]
        .into_iter()
        .collect(),
        kv_bytes_per_token: None,
        prefill_batch_tokens: None,
    }
}

/// A bandwidth-heavy box: slow prefill, fast decode (like an M3 Ultra).
fn bandwidth_box() -> NodePerf {
    NodePerf {
        source: "test".into(),
        prefill_tok_s: vec![(1, 50.0), (64, 900.0), (1024, 1450.0), (8192, 1470.0)],
        decode_step_ms: vec![(1, 26.0), (8, 32.0)],
        decode_ms_per_1k_ctx: 0.2,
        kv_export_gb_s: 20.0,
        kv_import_gb_s: 20.0,
        codecs: Default::default(),
        kv_bytes_per_token: None,
        prefill_batch_tokens: None,
    }
}

fn policy() -> Policy {
    Policy {
        objective: Objective::Ttft,
        tpot_target_s: 0.05,
        expected_output_tokens: 256,
        handoff_overhead_s: 0.005,
        kv_bytes_per_token: 131_072.0,
        default_link: Link {
            bandwidth_gbit_s: 10.0,
            latency_ms: 0.1,
        },
        handoff_pieces: None,
    }
}

fn view(id: NodeId, perf: &NodePerf, load: NodeLoad) -> NodeView<'_> {
    NodeView {
        id,
        role: Role::Both,
        slots: 8,
        perf: Some(perf),
        load,
        in_flight: 0,
    }
}

// Node ids of the tests' clusters, named for the machines they stand for.
const SPARK: NodeId = 0;
const MAC: NodeId = 1;
const MAC_1: NodeId = 1;
const MAC_2: NodeId = 2;
const COLOCATED: PlacementMode = PlacementMode::Colocated;
const DISAGGREGATED: PlacementMode = PlacementMode::Disaggregated;

fn chosen(pol: &Policy, nodes: &[NodeView], link: Link, prompt: u64) -> Prediction {
    let req = RequestShape {
        prompt_tokens: prompt,
        output_tokens: 256,
    };
    plan(pol, nodes, |_, _| Some(link), req, PlacementMode::Auto)
        .chosen()
        .cloned()
        .unwrap()
}

const FAST: Link = Link {
    bandwidth_gbit_s: 10.0,
    latency_ms: 0.1,
};

#[test]
fn the_streamed_hand_off_hides_the_wire_behind_the_prefill() {
    // A 4,096-token prompt, 16 s of prefill: pieces of 512 tokens every 2 s.
    let (during, exposed) = streamed_handoff_s(4096, 8, 1, 16.0, 0.0, 4.0);
    // A link faster than the prefill leaves only the last eighth exposed.
    assert_eq!(during, 0.0);
    assert!((exposed - 0.5).abs() < 1e-9, "{exposed}");
    // A link slower than the prefill: the pieces queue; all but 7/8 of the prefill shows.
    let (_, slow) = streamed_handoff_s(4096, 8, 1, 16.0, 0.0, 40.0);
    assert!((slow - (40.0 - 14.0)).abs() < 1e-9, "{slow}");
    // Seven exports of 1/8..7/8 of the cache delay the prefill by 3.5 whole exports; the last
    // export, after token 0, is part of what shows.
    let (during, exposed) = streamed_handoff_s(4096, 8, 1, 16.0, 0.1, 4.0);
    assert!((during - 0.35).abs() < 1e-9, "{during}");
    assert!((exposed - 0.6).abs() < 1e-9, "{exposed}");
    // Under 512 tokens a piece is 256 tokens: a 300-token prompt sends one, then 44 tokens.
    let (_, short) = streamed_handoff_s(300, 8, 1, 3.0, 0.0, 0.3);
    assert!((short - 0.3 * 44.0 / 300.0).abs() < 1e-9, "{short}");
    // One piece: the whole export and wire after the prompt.
    let (during, exposed) = streamed_handoff_s(4096, 1, 1, 16.0, 0.1, 4.0);
    assert_eq!(during, 0.0);
    assert!((exposed - 4.1).abs() < 1e-9, "{exposed}");
}

#[test]
fn pieces_leave_where_the_engine_batches_end() {
    // 3,496 tokens in eighths of 437 with 64-token batches: the engine sends pieces at 448, 896,
    // ..., 3,136 tokens and leaves 360 for after the prompt (1 ms of wire per token here, a prompt
    // slow enough that only the last piece shows).
    let (_, exact) = streamed_handoff_s(3496, 8, 1, 100.0, 0.0, 3.496);
    let (_, batched) = streamed_handoff_s(3496, 8, 64, 100.0, 0.0, 3.496);
    assert!((exact - 0.437).abs() < 1e-9, "{exact}");
    assert!((batched - 0.360).abs() < 1e-9, "{batched}");
}

#[test]
fn the_cache_streams_where_the_wire_is_slow_next_to_the_exports() {
    // The H100 on loopback (docs/gpu.md): a 7,700-token prompt prefilled in 0.21 s, its
    // 177 MB exported at 0.3 GB/s (0.59 s), 18 ms of wire: one piece after the prompt.
    let (pieces, (during, exposed)) = best_pieces(7700, 1, 0.21, 0.59, 0.018);
    assert_eq!((pieces, during), (1, 0.0));
    assert!((exposed - 0.608).abs() < 1e-9, "{exposed}");
    // A CPU prefill of 3,500 tokens in 7 s, 80 MB exported at 1 GB/s, 6.4 s over 100 Mbit/s:
    // eight pieces, most of the wire behind the prompt.
    let (pieces, (during, exposed)) = best_pieces(3500, 1, 7.0, 0.08, 6.4);
    assert_eq!(pieces, 8);
    assert!(during < 0.5 && exposed < 1.5, "{during} {exposed}");
    // Nothing to gain (no wire, free exports): the fewest pieces.
    assert_eq!(best_pieces(3500, 1, 7.0, 0.0, 0.0).0, 1);
}

#[test]
fn a_fixed_split_gets_the_codec_for_its_link() {
    use crate::placement::Placer;
    use crate::placement::cost_model::{CostModel, LinkCodec};
    use crate::placement::least_loaded::LeastLoaded;
    let c = compute_box();
    let b = NodePerf {
        codecs: c.codecs.clone(),
        ..bandwidth_box()
    };
    let nodes = [
        view(SPARK, &c, NodeLoad::default()),
        view(MAC, &b, NodeLoad::default()),
    ];
    let placer = |gbit_s| LinkCodec {
        inner: LeastLoaded::split(),
        cost: CostModel {
            policy: policy(),
            links: vec![(
                SPARK,
                MAC,
                Link {
                    bandwidth_gbit_s: gbit_s,
                    latency_ms: 0.1,
                },
            )],
            mode: PlacementMode::Auto,
        },
    };
    let shape = RequestShape {
        prompt_tokens: 8192,
        output_tokens: 64,
    };
    let codec = |gbit_s| placer(gbit_s).choose(&nodes, shape).and_then(|c| c.codec);
    // Saving 10% of 1 GB pays at 100 Mbit/s (8.6 s of wire saved for 1.4 s of CPU), not at
    // 100 Gbit/s.
    assert_eq!(codec(0.1), Some(Codec::ShuffleLz4));
    assert_eq!(codec(100.0), Some(Codec::None));
}

#[test]
fn long_prompts_split_short_prompts_stay_home() {
    let (c, b) = (compute_box(), bandwidth_box());
    let nodes = [
        view(SPARK, &c, NodeLoad::default()),
        view(MAC, &b, NodeLoad::default()),
    ];
    let long = chosen(&policy(), &nodes, FAST, 8192);
    assert_eq!(
        (long.mode, long.prefill, long.decode),
        (DISAGGREGATED, SPARK, MAC),
        "{long:?}"
    );
    let short = chosen(&policy(), &nodes, FAST, 20);
    assert_eq!((short.mode, short.decode), (COLOCATED, MAC), "{short:?}");
}

#[test]
fn a_slow_link_flips_the_choice() {
    let (c, b) = (compute_box(), bandwidth_box());
    let nodes = [
        view(SPARK, &c, NodeLoad::default()),
        view(MAC, &b, NodeLoad::default()),
    ];
    let wifi = Link {
        bandwidth_gbit_s: 0.1,
        latency_ms: 5.0,
    };
    assert_eq!(chosen(&policy(), &nodes, FAST, 4096).mode, DISAGGREGATED);
    let slow = chosen(&policy(), &nodes, wifi, 4096);
    assert_eq!((slow.mode, slow.decode), (COLOCATED, MAC));
}

#[test]
fn a_loaded_decode_node_is_avoided() {
    let (c, b) = (compute_box(), bandwidth_box());
    let busy = NodeLoad {
        prefill_backlog: 0,
        decoding: 8,
        decode_ctx: 8 * 3000,
    };
    let mut nodes = vec![
        view(SPARK, &c, NodeLoad::default()),
        view(MAC_1, &b, busy),
        view(MAC_2, &b, NodeLoad::default()),
    ];
    for n in &mut nodes[1..] {
        n.role = Role::Decode;
    }
    let p = chosen(&policy(), &nodes, FAST, 4096);
    assert_eq!(p.decode, MAC_2, "{p:?}");
    // With the idle node loaded instead, the choice follows.
    nodes[1].load = NodeLoad::default();
    nodes[2].load = busy;
    assert_eq!(chosen(&policy(), &nodes, FAST, 4096).decode, MAC_1);
}

#[test]
fn the_cheapest_codec_depends_on_the_link() {
    let c = compute_box();
    let bytes = 1e9;
    let (fast, _) = best_codec(bytes, &c, &c, &FAST);
    let slow_link = Link {
        bandwidth_gbit_s: 0.5,
        latency_ms: 1.0,
    };
    let (slow, _) = best_codec(bytes, &c, &c, &slow_link);
    // On 10 GbE compressing at 1 GB/s is slower than sending raw; on a slow link 10% smaller wins.
    assert_eq!((fast, slow), (Codec::None, Codec::ShuffleLz4));
}

#[test]
fn interpolation_and_extrapolation() {
    let c = compute_box();
    assert!((c.prefill_s(8192) - 8192.0 / 5600.0).abs() < 1e-9);
    assert!((c.prefill_s(100_000) - 100_000.0 / 5600.0).abs() < 1e-6);
    // Beyond the last batch size the step grows along the last slope.
    let s16 = c.step_s(16, 0.0);
    assert!(
        (s16 - (70.0 + 10.0 / 7.0 * 8.0) / 1000.0).abs() < 1e-9,
        "{s16}"
    );
    assert!(c.step_s(1, 2000.0) > c.step_s(1, 0.0));
    // A one-token prompt still costs a forward pass over all the weights.
    assert!((c.prefill_s(1) - c.step_s(1, 0.0)).abs() < 1e-12);
}

#[test]
fn e2e_objective_minimises_the_whole_request() {
    let (c, b) = (compute_box(), bandwidth_box());
    let nodes = [
        view(SPARK, &c, NodeLoad::default()),
        view(MAC, &b, NodeLoad::default()),
    ];
    let pol = Policy {
        objective: Objective::E2e,
        ..policy()
    };
    let req = RequestShape {
        prompt_tokens: 8192,
        output_tokens: 32,
    };
    let p = plan(&pol, &nodes, |_, _| Some(FAST), req, PlacementMode::Auto);
    let best = p
        .candidates
        .iter()
        .map(|c| c.e2e_s)
        .fold(f64::INFINITY, f64::min);
    assert_eq!(p.chosen().unwrap().e2e_s, best);
}

#[test]
fn bad_perf_tables_are_refused() {
    let mut c = compute_box();
    c.prefill_tok_s = vec![(64, 1.0), (32, 2.0)];
    assert!(c.validate().is_err());
    let mut c = compute_box();
    c.kv_import_gb_s = 0.0;
    assert!(c.validate().is_err());
    let mut c = compute_box();
    c.codecs.insert(
        "zip".into(),
        CodecPerf {
            ratio: 2.0,
            encode_gb_s: 1.0,
            decode_gb_s: 1.0,
        },
    );
    assert!(c.validate().unwrap_err().to_string().contains("zip"));
    assert!(compute_box().validate().is_ok());
}

#[test]
fn kv_bytes_per_token_comes_from_the_policy_else_from_the_nodes() {
    let measured = NodePerf {
        kv_bytes_per_token: Some(23_040.0),
        ..compute_box()
    };
    let unknown = Policy {
        kv_bytes_per_token: 0.0,
        ..policy()
    };
    assert_eq!(
        unknown.kv_bytes_per_token([&bandwidth_box(), &measured]),
        23_040.0
    );
    assert_eq!(unknown.kv_bytes_per_token([&bandwidth_box()]), 0.0);
    let given = Policy {
        kv_bytes_per_token: 100.0,
        ..policy()
    };
    assert_eq!(given.kv_bytes_per_token([&measured]), 100.0);
}
