//! The arithmetic of the cost model: how long a prompt waits and runs, how long its cache takes
//! to move, what a decode step costs under load, and which candidate wins.

use exo_kvcache::{Codec, piece_tokens};
use exo_protocol::{NodePerf, Role};

use super::{Link, NodeLoad, Objective, PREFILL_CHUNK, Policy, Prediction, RequestShape};
use crate::placement::{NodeId, NodeView, PlacementMode};

/// Seconds to move `bytes` of exported KV from `p` to `d` over `link` with `codec`: encode, wire
/// and decode pipelined chunk by chunk, then import.
pub fn transfer_s(
    bytes: f64,
    p: &NodePerf,
    d: &NodePerf,
    link: &Link,
    codec: Codec,
) -> Option<f64> {
    let enc = p.codec(codec)?;
    let dec = d.codec(codec)?;
    let stages = [
        bytes / (enc.encode_gb_s * 1e9),
        bytes / enc.ratio / link.bytes_per_s(),
        bytes / (dec.decode_gb_s * 1e9),
    ];
    let chunks = (bytes / f64::from(exo_kvcache::DEFAULT_CHUNK_SIZE))
        .ceil()
        .max(1.0);
    let slowest = stages.iter().copied().fold(0.0, f64::max);
    // A pipeline takes as long as its slowest stage, plus the other stages' share of one chunk
    // (filling it before the slowest stage starts, draining it after).
    let pipeline = slowest + (stages.iter().sum::<f64>() - slowest) / chunks;
    Some(pipeline + bytes / (d.kv_import_gb_s * 1e9) + link.latency_ms / 1000.0)
}

/// The numbers of pieces a hand-off may be cut in; [`best_pieces`] picks one per request.
pub const PIECE_CHOICES: [u64; 4] = [1, 2, 4, 8];

/// A streamed hand-off of a `tokens`-token prompt cut in `pieces`, whose own prefill takes
/// `prefill_s` (docs/kvcache.md): the cells of every [`piece_tokens`] go out as the prompt passes
/// them, after an export of the sequence so far (`export_s` for the whole cache), and queue on the
/// link (`wire_s` for the whole cache); the rest follows the last batch. Returns the seconds the
/// exports add to the prefill (before token 0) and the seconds from the prompt's end until the last
/// byte arrived.
pub fn streamed_handoff_s(
    tokens: u64,
    pieces: u64,
    prefill_s: f64,
    export_s: f64,
    wire_s: f64,
) -> (f64, f64) {
    if tokens == 0 {
        return (0.0, export_s + wire_s);
    }
    let n = tokens as f64;
    let every = piece_tokens(tokens, pieces);
    let (mut during, mut link_free, mut sent, mut at) = (0.0, 0.0f64, 0u64, every);
    while at < tokens {
        let share = at as f64 / n;
        // The export runs on the prefill node's engine, between its batches.
        during += share * export_s;
        let ready = share * prefill_s + during;
        link_free = link_free.max(ready) + wire_s * (at - sent) as f64 / n;
        (sent, at) = (at, at + every);
    }
    let end = prefill_s + during;
    // The last piece is cut from an export of the whole cache, made after token 0 went back.
    let last = link_free.max(end + export_s) + wire_s * (tokens - sent) as f64 / n;
    (during, last - end)
}

/// The pieces (one of [`PIECE_CHOICES`]) that bring a split request's second token soonest, and
/// their [`streamed_handoff_s`]. Each piece costs an export of the sequence so far, so streaming
/// pays where the wire is slow next to the exports (a CPU prefill over Ethernet) and loses where
/// exports are dear next to the wire (a GPU prefill on a fast link: exports from GPU memory ran at
/// about 0.3 GB/s on an H100, docs/gpu.md). Ties go to fewer pieces.
pub fn best_pieces(tokens: u64, prefill_s: f64, export_s: f64, wire_s: f64) -> (u64, (f64, f64)) {
    let mut best = (
        1,
        streamed_handoff_s(tokens, 1, prefill_s, export_s, wire_s),
    );
    for pieces in PIECE_CHOICES.into_iter().skip(1) {
        let t = streamed_handoff_s(tokens, pieces, prefill_s, export_s, wire_s);
        if t.0 + t.1 < best.1.0 + best.1.1 {
            best = (pieces, t);
        }
    }
    best
}

/// What the hand-off of a `tokens`-token prompt (`bytes` of cache) from `p` to `d` over `link`
/// costs with `codec`, cut in the best number of pieces ([`best_pieces`]): `(pieces, seconds the
/// exports add before token 0, seconds of hand-off after it)`, the import and the link's latency
/// included in the latter; `None` when a node has not measured `codec`.
pub fn handoff_s(
    tokens: u64,
    bytes: f64,
    (p, d): (&NodePerf, &NodePerf),
    link: &Link,
    codec: Codec,
) -> Option<(u64, f64, f64)> {
    let move_s = transfer_s(bytes, p, d, link, codec)?;
    // Import and the link's latency come once at the end; the rest of the move can overlap the
    // prefill.
    let once = bytes / (d.kv_import_gb_s * 1e9) + link.latency_ms / 1000.0;
    let export = bytes / (p.kv_export_gb_s * 1e9);
    let (pieces, (during, exposed)) =
        best_pieces(tokens, p.prefill_s(tokens), export, move_s - once);
    Some((pieces, during, exposed + once))
}

/// The codec that moves `bytes` fastest from `p` to `d` over `link`, and its time.
pub fn best_codec(bytes: f64, p: &NodePerf, d: &NodePerf, link: &Link) -> (Codec, f64) {
    let mut best = (Codec::None, f64::INFINITY);
    for codec in Codec::ALL {
        if let Some(t) = transfer_s(bytes, p, d, link, codec)
            && t < best.1
        {
            best = (codec, t);
        }
    }
    best
}

/// Seconds of prefill for `tokens` new prompt tokens on `n`, behind its backlog, with the decode
/// steps a colocated node interleaves between prompt chunks.
fn prefill_wait_s(n: &Priced, tokens: u64) -> f64 {
    let own = n.perf.prefill_s(tokens);
    let backlog = n.perf.prefill_s(n.load.prefill_backlog);
    let chunks = (tokens + n.load.prefill_backlog).div_ceil(u64::from(PREFILL_CHUNK));
    let interleaved = if n.load.decoding > 0 {
        chunks as f64 * n.perf.step_s(n.load.decoding, mean_ctx(&n.load))
    } else {
        0.0
    };
    own + backlog + interleaved
}

fn mean_ctx(load: &NodeLoad) -> f64 {
    if load.decoding == 0 {
        0.0
    } else {
        load.decode_ctx as f64 / f64::from(load.decoding)
    }
}

/// Seconds per output token of one more sequence on `n` with context `ctx`, and the wait for a
/// free slot when all are taken.
fn decode_cost(n: &Priced, ctx: u64, output: u64) -> (f64, f64) {
    let batch = (n.load.decoding + 1).min(n.slots.max(1));
    let total_ctx = n.load.decode_ctx + ctx;
    let step = n
        .perf
        .step_s(batch, total_ctx as f64 / f64::from(n.load.decoding + 1));
    // A colocated node also runs the prompts queued on it between steps.
    let prefill_share = n.perf.prefill_s(n.load.prefill_backlog) / output.max(1) as f64;
    // Over capacity, a request waits until a running one leaves; each frees its slot after
    // about `output` steps, so slots free at `slots / (output * step)` per second.
    let excess = (n.load.decoding + 1).saturating_sub(n.slots.max(1));
    let slot_wait = excess as f64 * output as f64 * step / f64::from(n.slots.max(1));
    (step + prefill_share, slot_wait)
}

/// Completes a prediction whose `tpot_s` holds the decode node's own time per token.
fn finish(policy: &Policy, out: u64, mut p: Prediction) -> Prediction {
    p.steady_tpot_s = p.tpot_s;
    let later = out.saturating_sub(1) as f64;
    if later > 0.0 {
        let after_first = p.handoff_s + later * p.tpot_s;
        p.e2e_s = p.ttft_s + after_first;
        p.tpot_s = after_first / later;
    } else {
        p.e2e_s = p.ttft_s;
        p.tpot_s = 0.0;
    }
    p.meets_target = p.steady_tpot_s <= policy.tpot_target_s;
    p
}

/// A node the cost model can price: one with a perf table.
struct Priced<'a> {
    id: NodeId,
    role: Role,
    slots: u32,
    perf: &'a NodePerf,
    load: NodeLoad,
}

/// A candidate before [`finish`] derives its totals.
fn candidate(
    mode: PlacementMode,
    (prefill, decode): (NodeId, NodeId),
    codec: Option<Codec>,
    ttft_s: f64,
    handoff_s: f64,
    tpot_s: f64,
) -> Prediction {
    Prediction {
        mode,
        prefill,
        decode,
        codec,
        pieces: None,
        ttft_s,
        handoff_s,
        tpot_s,
        steady_tpot_s: 0.0,
        e2e_s: 0.0,
        meets_target: false,
    }
}

/// Predicts every candidate placement of `req` over `nodes` that `mode` admits; nodes without a
/// perf table are not candidates. `link` gives the link between two nodes (`None`: the policy's
/// default link).
pub fn predict(
    policy: &Policy,
    nodes: &[NodeView],
    link: impl Fn(NodeId, NodeId) -> Option<Link>,
    req: RequestShape,
    mode: PlacementMode,
) -> Vec<Prediction> {
    let priced: Vec<Priced> = nodes
        .iter()
        .filter_map(|n| {
            Some(Priced {
                id: n.id,
                role: n.role,
                slots: n.slots,
                perf: n.perf?,
                load: n.load,
            })
        })
        .collect();
    let out = req.output_tokens.max(1);
    let bytes = req.prompt_tokens as f64 * policy.kv_bytes_per_token;
    let mut found = Vec::new();
    if mode.admits(PlacementMode::Colocated) {
        for n in priced.iter().filter(|n| n.role == Role::Both) {
            let ttft = prefill_wait_s(n, req.prompt_tokens);
            let (tpot, slot_wait) = decode_cost(n, req.prompt_tokens, out);
            let c = candidate(
                PlacementMode::Colocated,
                (n.id, n.id),
                None,
                ttft,
                slot_wait,
                tpot,
            );
            found.push(finish(policy, out, c));
        }
    }
    if mode.admits(PlacementMode::Disaggregated) {
        for p in priced.iter().filter(|n| n.role.prefills()) {
            for d in priced.iter().filter(|n| n.role.decodes() && n.id != p.id) {
                let l = link(p.id, d.id).unwrap_or(policy.default_link);
                let (codec, _) = best_codec(bytes, p.perf, d.perf, &l);
                let Some((pieces, during, after)) =
                    handoff_s(req.prompt_tokens, bytes, (p.perf, d.perf), &l, codec)
                else {
                    continue;
                };
                let ttft = prefill_wait_s(p, req.prompt_tokens) + during;
                let (tpot, slot_wait) = decode_cost(d, req.prompt_tokens, out);
                let handoff = policy.handoff_overhead_s + after + slot_wait;
                let ids = (p.id, d.id);
                let mut c = candidate(
                    PlacementMode::Disaggregated,
                    ids,
                    Some(codec),
                    ttft,
                    handoff,
                    tpot,
                );
                c.pieces = Some(pieces);
                found.push(finish(policy, out, c));
            }
        }
    }
    found
}

/// Chooses among candidates by the policy's objective.
pub fn choose(policy: &Policy, candidates: &[Prediction]) -> Option<usize> {
    let e2e = |i: &usize| candidates[*i].e2e_s;
    let by_e2e = || (0..candidates.len()).min_by(|a, b| e2e(a).total_cmp(&e2e(b)));
    match policy.objective {
        Objective::E2e => by_e2e(),
        Objective::Ttft => {
            let meeting: Vec<usize> = (0..candidates.len())
                .filter(|&i| candidates[i].meets_target)
                .collect();
            if meeting.is_empty() {
                return by_e2e();
            }
            // The start the user sees: first token, then the pause before the second. Within 1%
            // of each other, the faster whole request wins (e.g. the less loaded decode node).
            let start = |i: usize| candidates[i].ttft_s + candidates[i].handoff_s;
            meeting.into_iter().min_by(|&a, &b| {
                let (sa, sb) = (start(a), start(b));
                if (sa - sb).abs() <= 0.01 * sa.max(sb) {
                    candidates[a].e2e_s.total_cmp(&candidates[b].e2e_s)
                } else {
                    sa.total_cmp(&sb)
                }
            })
        }
    }
}

#[cfg(test)]
mod tests {
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
        let (during, exposed) = streamed_handoff_s(4096, 8, 16.0, 0.0, 4.0);
        // A link faster than the prefill leaves only the last eighth exposed.
        assert_eq!(during, 0.0);
        assert!((exposed - 0.5).abs() < 1e-9, "{exposed}");
        // A link slower than the prefill: the pieces queue; all but 7/8 of the prefill shows.
        let (_, slow) = streamed_handoff_s(4096, 8, 16.0, 0.0, 40.0);
        assert!((slow - (40.0 - 14.0)).abs() < 1e-9, "{slow}");
        // Seven exports of 1/8..7/8 of the cache delay the prefill by 3.5 whole exports; the last
        // export, after token 0, is part of what shows.
        let (during, exposed) = streamed_handoff_s(4096, 8, 16.0, 0.1, 4.0);
        assert!((during - 0.35).abs() < 1e-9, "{during}");
        assert!((exposed - 0.6).abs() < 1e-9, "{exposed}");
        // Under 512 tokens a piece is 256 tokens: a 300-token prompt sends one, then 44 tokens.
        let (_, short) = streamed_handoff_s(300, 8, 3.0, 0.0, 0.3);
        assert!((short - 0.3 * 44.0 / 300.0).abs() < 1e-9, "{short}");
        // One piece: the whole export and wire after the prompt.
        let (during, exposed) = streamed_handoff_s(4096, 1, 16.0, 0.1, 4.0);
        assert_eq!(during, 0.0);
        assert!((exposed - 4.1).abs() < 1e-9, "{exposed}");
    }

    #[test]
    fn the_cache_streams_where_the_wire_is_slow_next_to_the_exports() {
        // The H100 on loopback (docs/gpu.md): a 7,700-token prompt prefilled in 0.21 s, its
        // 177 MB exported at 0.3 GB/s (0.59 s), 18 ms of wire: one piece after the prompt.
        let (pieces, (during, exposed)) = best_pieces(7700, 0.21, 0.59, 0.018);
        assert_eq!((pieces, during), (1, 0.0));
        assert!((exposed - 0.608).abs() < 1e-9, "{exposed}");
        // A CPU prefill of 3,500 tokens in 7 s, 80 MB exported at 1 GB/s, 6.4 s over 100 Mbit/s:
        // eight pieces, most of the wire behind the prompt.
        let (pieces, (during, exposed)) = best_pieces(3500, 7.0, 0.08, 6.4);
        assert_eq!(pieces, 8);
        assert!(during < 0.5 && exposed < 1.5, "{during} {exposed}");
        // Nothing to gain (no wire, free exports): the fewest pieces.
        assert_eq!(best_pieces(3500, 7.0, 0.0, 0.0).0, 1);
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
}
