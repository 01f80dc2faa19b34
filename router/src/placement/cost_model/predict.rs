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
/// `prefill_s` in batches of `batch` tokens (docs/kvcache.md): a piece goes out at the end of the
/// first batch that brings [`piece_tokens`] new cells since the last one, as the prefill node's
/// engine sends them (a 3,496-token prompt in eighths with 64-token batches: pieces of 448 tokens
/// and a last one of 360, not eight of 437), after an export of the sequence so far (`export_s`
/// for the whole cache), and queues on the link (`wire_s` for the whole cache); the rest follows
/// the last batch. `batch` 1 cuts at exact multiples. Returns the seconds the exports add to the
/// prefill (before token 0) and the seconds from the prompt's end until the last byte arrived.
pub fn streamed_handoff_s(
    tokens: u64,
    pieces: u64,
    batch: u64,
    prefill_s: f64,
    export_s: f64,
    wire_s: f64,
) -> (f64, f64) {
    if tokens == 0 {
        return (0.0, export_s + wire_s);
    }
    let n = tokens as f64;
    let batch = batch.max(1);
    let every = piece_tokens(tokens, pieces).div_ceil(batch) * batch;
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
pub fn best_pieces(
    tokens: u64,
    batch: u64,
    prefill_s: f64,
    export_s: f64,
    wire_s: f64,
) -> (u64, (f64, f64)) {
    let mut best = (
        1,
        streamed_handoff_s(tokens, 1, batch, prefill_s, export_s, wire_s),
    );
    for pieces in PIECE_CHOICES.into_iter().skip(1) {
        let t = streamed_handoff_s(tokens, pieces, batch, prefill_s, export_s, wire_s);
        if t.0 + t.1 < best.1.0 + best.1.1 {
            best = (pieces, t);
        }
    }
    best
}

/// The terms of a hand-off of `bytes` of cache from `p` to `d` over `link` with `codec`, as
/// [`streamed_handoff_s`] takes them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HandoffTerms {
    /// An export of the whole cache on `p`.
    pub export_s: f64,
    /// What comes once, after the last byte: the import on `d` and the link's latency.
    pub once_s: f64,
    /// The rest of the move (encode, wire, decode), which can overlap the prefill; `None` when a
    /// node has not measured `codec`.
    pub overlap_s: Option<f64>,
}

/// The [`HandoffTerms`] of moving `bytes` from `p` to `d` over `link` with `codec`.
pub fn handoff_terms(
    bytes: f64,
    (p, d): (&NodePerf, &NodePerf),
    link: &Link,
    codec: Codec,
) -> HandoffTerms {
    let once_s = bytes / (d.kv_import_gb_s * 1e9) + link.latency_ms / 1000.0;
    HandoffTerms {
        export_s: bytes / (p.kv_export_gb_s * 1e9),
        once_s,
        overlap_s: transfer_s(bytes, p, d, link, codec).map(|move_s| move_s - once_s),
    }
}

/// What the hand-off of a `tokens`-token prompt (`bytes` of cache) from `p` to `d` over `link`
/// costs with `codec`, cut in `pieces`, or the best number of pieces ([`best_pieces`]) when `None`:
/// `(pieces, seconds the exports add before token 0, seconds of hand-off after it)`, the import
/// and the link's latency included in the latter; `None` when a node has not measured `codec`.
pub fn handoff_s(
    tokens: u64,
    bytes: f64,
    (p, d): (&NodePerf, &NodePerf),
    link: &Link,
    codec: Codec,
    pieces: Option<u64>,
) -> Option<(u64, f64, f64)> {
    let t = handoff_terms(bytes, (p, d), link, codec);
    let (batch, prefill_s, wire_s) = (p.batch_tokens(), p.prefill_s(tokens), t.overlap_s?);
    let (pieces, (during, exposed)) = match pieces {
        Some(n) => (
            n,
            streamed_handoff_s(tokens, n, batch, prefill_s, t.export_s, wire_s),
        ),
        None => best_pieces(tokens, batch, prefill_s, t.export_s, wire_s),
    };
    Some((pieces, during, exposed + t.once_s))
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
    let bytes = req.prompt_tokens as f64 * policy.kv_bytes_per_token(priced.iter().map(|n| n.perf));
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
                let Some((pieces, during, after)) = handoff_s(
                    req.prompt_tokens,
                    bytes,
                    (p.perf, d.perf),
                    &l,
                    codec,
                    policy.handoff_pieces,
                ) else {
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
mod tests;
