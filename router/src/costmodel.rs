//! The cost model: predicts time to first token, time per output token and end-to-end time of a
//! request for every candidate placement, from measured node profiles, links and live load, and
//! chooses one by the profile's objective.
//!
//! Everything here is plain arithmetic on numbers from the profile, so `plan`, `simulate`, the
//! router's `auto` placement and the unit tests all use the same predictions.

use exo_kvcache::Codec;
use serde::{Deserialize, Serialize};

/// Prompt tokens a prefill pass takes at once (the engine's `n_batch`): a colocated node runs one
/// such chunk between decode steps.
pub const PREFILL_CHUNK: u32 = 512;

/// Measured speed of one codec on a node.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodecPerf {
    /// Raw bytes / wire bytes.
    pub ratio: f64,
    /// Compression speed, GB of raw KV per second.
    pub encode_gb_s: f64,
    /// Decompression speed, GB of raw KV per second.
    pub decode_gb_s: f64,
}

/// How fast a node runs the model: the `[nodes.perf]` table of a profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodePerf {
    /// Where the numbers come from (a measurement, or the published figures they derive from).
    pub source: String,
    /// Prefill speed, `[prompt tokens, tokens/s]` points; interpolated linearly in between.
    pub prefill_tok_s: Vec<(u32, f64)>,
    /// Time of one decode step, `[sequences in the batch, milliseconds]` points, at short context.
    pub decode_step_ms: Vec<(u32, f64)>,
    /// Extra step time per sequence for each 1,000 tokens of its context, in milliseconds.
    #[serde(default)]
    pub decode_ms_per_1k_ctx: f64,
    /// KV export (state copy out of llama.cpp), GB/s.
    pub kv_export_gb_s: f64,
    /// KV import, GB/s.
    pub kv_import_gb_s: f64,
    /// Compression codecs measured on this node; `none` is always available.
    #[serde(default)]
    pub codecs: std::collections::BTreeMap<String, CodecPerf>,
}

/// Why a node's perf table cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PerfError(String);

fn positive(name: &str, v: f64) -> Result<(), PerfError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(PerfError(format!("{name} must be a positive number")))
    }
}

/// Linear interpolation over `(x, y)` points sorted by x; flat beyond the ends.
fn interpolate(points: &[(u32, f64)], x: f64) -> f64 {
    let (Some(first), Some(last)) = (points.first(), points.last()) else {
        return 0.0;
    };
    if x <= f64::from(first.0) {
        return first.1;
    }
    if x >= f64::from(last.0) {
        return last.1;
    }
    for w in points.windows(2) {
        let (x0, y0) = (f64::from(w[0].0), w[0].1);
        let (x1, y1) = (f64::from(w[1].0), w[1].1);
        if x <= x1 {
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0);
        }
    }
    last.1
}

impl NodePerf {
    /// Checks that every number can be used (positive, finite, points sorted and distinct).
    pub fn validate(&self) -> Result<(), PerfError> {
        for (name, points) in [
            ("prefill_tok_s", &self.prefill_tok_s),
            ("decode_step_ms", &self.decode_step_ms),
        ] {
            if points.is_empty() {
                return Err(PerfError(format!("{name} needs at least one point")));
            }
            for w in points.windows(2) {
                if w[0].0 >= w[1].0 {
                    return Err(PerfError(format!(
                        "{name} points must be sorted by their first number, without repeats"
                    )));
                }
            }
            for &(x, y) in points.iter() {
                if x == 0 {
                    return Err(PerfError(format!("{name}: the first number must be >= 1")));
                }
                positive(name, y)?;
            }
        }
        if !(self.decode_ms_per_1k_ctx.is_finite() && self.decode_ms_per_1k_ctx >= 0.0) {
            return Err(PerfError(
                "decode_ms_per_1k_ctx must be zero or positive".into(),
            ));
        }
        positive("kv_export_gb_s", self.kv_export_gb_s)?;
        positive("kv_import_gb_s", self.kv_import_gb_s)?;
        for (name, c) in &self.codecs {
            let codec: Codec = name
                .parse()
                .map_err(|e| PerfError(format!("codecs: {e}")))?;
            if codec == Codec::None {
                return Err(PerfError("codecs: `none` needs no entry".into()));
            }
            positive(&format!("codecs.{name}.ratio"), c.ratio)?;
            positive(&format!("codecs.{name}.encode_gb_s"), c.encode_gb_s)?;
            positive(&format!("codecs.{name}.decode_gb_s"), c.decode_gb_s)?;
        }
        Ok(())
    }

    /// Seconds to prefill a prompt of `tokens` tokens on an idle node: never less than one
    /// decode step, since any forward pass reads all the weights once.
    pub fn prefill_s(&self, tokens: u64) -> f64 {
        if tokens == 0 {
            return 0.0;
        }
        let t = tokens as f64;
        (t / interpolate(&self.prefill_tok_s, t)).max(self.step_s(1, 0.0))
    }

    /// Seconds of one decode step for `batch` sequences whose context averages `mean_ctx` tokens.
    /// Beyond the last measured batch size the time grows along the last two points' slope.
    pub fn step_s(&self, batch: u32, mean_ctx: f64) -> f64 {
        if batch == 0 {
            return 0.0;
        }
        let b = f64::from(batch);
        let base = match self.decode_step_ms.as_slice() {
            [.., (x0, y0), (x1, y1)] if b > f64::from(*x1) => {
                let slope = ((y1 - y0) / f64::from(x1 - x0)).max(0.0);
                y1 + slope * (b - f64::from(*x1))
            }
            [(x1, y1)] if b > f64::from(*x1) => y1 * b / f64::from(*x1),
            points => interpolate(points, b),
        };
        (base + b * self.decode_ms_per_1k_ctx * mean_ctx / 1000.0) / 1000.0
    }

    /// The speed of `codec` here, `None` when not measured (`none` always has infinite speed).
    fn codec(&self, codec: Codec) -> Option<CodecPerf> {
        if codec == Codec::None {
            return Some(CodecPerf {
                ratio: 1.0,
                encode_gb_s: f64::INFINITY,
                decode_gb_s: f64::INFINITY,
            });
        }
        self.codecs.get(codec.name()).copied()
    }
}

/// A network link between two nodes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// Usable bandwidth in gigabits per second.
    pub bandwidth_gbit_s: f64,
    /// One-way latency in milliseconds.
    pub latency_ms: f64,
}

impl Link {
    /// Checks the numbers.
    pub fn validate(&self) -> Result<(), PerfError> {
        positive("bandwidth_gbit_s", self.bandwidth_gbit_s)?;
        if !(self.latency_ms.is_finite() && self.latency_ms >= 0.0) {
            return Err(PerfError("latency_ms must be zero or positive".into()));
        }
        Ok(())
    }

    fn bytes_per_s(&self) -> f64 {
        self.bandwidth_gbit_s * 1e9 / 8.0
    }
}

/// What a node is doing right now (live in the router, simulated in `simulate`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct NodeLoad {
    /// Prompt tokens placed on the node and not yet prefilled.
    pub prefill_backlog: u64,
    /// Sequences generating on it.
    pub decoding: u32,
    /// Their context tokens, summed.
    pub decode_ctx: u64,
}

/// One request to place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestShape {
    /// Prompt tokens (an estimate when the router has not tokenized it).
    pub prompt_tokens: u64,
    /// Output tokens expected (`max_tokens`, or the profile's default).
    pub output_tokens: u64,
}

/// What placement optimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Lowest time to first token plus the hand-off pause, among placements meeting the TPOT
    /// target (lowest end-to-end time when none does).
    #[default]
    Ttft,
    /// Lowest end-to-end time.
    E2e,
}

/// The placement policy of a profile (its `[policy]` table).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// What to optimise.
    pub objective: Objective,
    /// Time per output token a placement must stay under, seconds.
    pub tpot_target_s: f64,
    /// Output tokens assumed when a request sets no `max_tokens`.
    pub expected_output_tokens: u64,
    /// Fixed cost of a hand-off (RPC round trips, decode-side set-up), seconds.
    pub handoff_overhead_s: f64,
    /// KV cache bytes per token of the model and layout.
    pub kv_bytes_per_token: f64,
    /// Link assumed between nodes the profile names no link for.
    pub default_link: Link,
}

/// A node as the cost model sees it.
#[derive(Debug, Clone, Copy)]
pub struct NodeView<'a> {
    /// Name.
    pub name: &'a str,
    /// Can it run prompts?
    pub prefills: bool,
    /// Can it generate?
    pub decodes: bool,
    /// Can it run a whole request (role `both`)?
    pub colocates: bool,
    /// Decode slots.
    pub slots: u32,
    /// Its speed.
    pub perf: &'a NodePerf,
    /// What it is doing now.
    pub load: NodeLoad,
}

/// The predicted cost of one candidate placement.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// `colocated` or `disaggregated`.
    pub mode: &'static str,
    /// Prefill node.
    pub prefill: String,
    /// Decode node.
    pub decode: String,
    /// Codec for the KV transfer (split placements only).
    pub codec: Option<&'static str>,
    /// Time to first token, seconds.
    pub ttft_s: f64,
    /// Pause after the first token while the cache moves (export, transfer, import, slot wait).
    pub handoff_s: f64,
    /// Mean time per output token after the first, hand-off pause included, seconds (what a
    /// client measures as TPOT).
    pub tpot_s: f64,
    /// Time per output token once tokens flow (the decode node's step), seconds.
    pub steady_tpot_s: f64,
    /// End-to-end time, seconds.
    pub e2e_s: f64,
    /// True when `steady_tpot_s` is within the policy's target: the target is about how fast
    /// text streams; the one-off hand-off pause counts in the start time instead.
    pub meets_target: bool,
}

/// Every candidate of one request and the one chosen.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// The candidates, in the order the nodes are listed.
    pub candidates: Vec<Prediction>,
    /// Index of the chosen candidate in `candidates`, `None` when none exists.
    #[serde(skip)]
    pub chosen: Option<usize>,
}

impl Plan {
    /// The chosen candidate.
    pub fn chosen(&self) -> Option<&Prediction> {
        self.chosen.and_then(|i| self.candidates.get(i))
    }
}

/// Which placements to consider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Candidates {
    /// Whole requests on one node only.
    Colocated,
    /// Split requests only.
    Disaggregated,
    /// Both kinds.
    All,
}

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
    // A pipeline takes as long as its slowest stage, plus filling it with the first chunk.
    let pipeline = slowest + stages.iter().sum::<f64>() / chunks;
    Some(pipeline + bytes / (d.kv_import_gb_s * 1e9) + link.latency_ms / 1000.0)
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
fn prefill_wait_s(n: &NodeView, tokens: u64) -> f64 {
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
fn decode_cost(n: &NodeView, ctx: u64, output: u64) -> (f64, f64) {
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

/// Predicts every candidate placement of `req` over `nodes`; `link` gives the link between two
/// nodes by index (`None`: the policy's default link).
pub fn predict(
    policy: &Policy,
    nodes: &[NodeView],
    link: impl Fn(usize, usize) -> Option<Link>,
    req: RequestShape,
    which: Candidates,
) -> Vec<Prediction> {
    let out = req.output_tokens.max(1);
    let bytes = req.prompt_tokens as f64 * policy.kv_bytes_per_token;
    let mut found = Vec::new();
    if which != Candidates::Disaggregated {
        for n in nodes.iter().filter(|n| n.colocates) {
            let ttft = prefill_wait_s(n, req.prompt_tokens);
            let (tpot, slot_wait) = decode_cost(n, req.prompt_tokens, out);
            let base = Prediction {
                mode: "colocated",
                prefill: n.name.to_string(),
                decode: n.name.to_string(),
                codec: None,
                ttft_s: ttft,
                handoff_s: slot_wait,
                tpot_s: tpot,
                steady_tpot_s: 0.0,
                e2e_s: 0.0,
                meets_target: false,
            };
            found.push(finish(policy, out, base));
        }
    }
    if which != Candidates::Colocated {
        for (pi, p) in nodes.iter().enumerate().filter(|(_, n)| n.prefills) {
            for (di, d) in nodes.iter().enumerate().filter(|(_, n)| n.decodes) {
                if pi == di {
                    continue;
                }
                let l = link(pi, di).unwrap_or(policy.default_link);
                let (codec, move_s) = best_codec(bytes, p.perf, d.perf, &l);
                // The prefill node answers once the cache is exported.
                let export = bytes / (p.perf.kv_export_gb_s * 1e9);
                let ttft = prefill_wait_s(p, req.prompt_tokens) + export;
                let (tpot, slot_wait) = decode_cost(d, req.prompt_tokens, out);
                let handoff = policy.handoff_overhead_s + move_s + slot_wait;
                let base = Prediction {
                    mode: "disaggregated",
                    prefill: p.name.to_string(),
                    decode: d.name.to_string(),
                    codec: Some(codec.name()),
                    ttft_s: ttft,
                    handoff_s: handoff,
                    tpot_s: tpot,
                    steady_tpot_s: 0.0,
                    e2e_s: 0.0,
                    meets_target: false,
                };
                found.push(finish(policy, out, base));
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

/// Predicts and chooses in one go.
pub fn plan(
    policy: &Policy,
    nodes: &[NodeView],
    link: impl Fn(usize, usize) -> Option<Link>,
    req: RequestShape,
    which: Candidates,
) -> Plan {
    let candidates = predict(policy, nodes, link, req, which);
    let chosen = choose(policy, &candidates);
    Plan { candidates, chosen }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn view<'a>(name: &'a str, perf: &'a NodePerf, load: NodeLoad) -> NodeView<'a> {
        NodeView {
            name,
            prefills: true,
            decodes: true,
            colocates: true,
            slots: 8,
            perf,
            load,
        }
    }

    fn chosen(pol: &Policy, nodes: &[NodeView], link: Link, prompt: u64) -> Prediction {
        let req = RequestShape {
            prompt_tokens: prompt,
            output_tokens: 256,
        };
        plan(pol, nodes, |_, _| Some(link), req, Candidates::All)
            .chosen()
            .cloned()
            .unwrap()
    }

    const FAST: Link = Link {
        bandwidth_gbit_s: 10.0,
        latency_ms: 0.1,
    };

    #[test]
    fn long_prompts_split_short_prompts_stay_home() {
        let (c, b) = (compute_box(), bandwidth_box());
        let nodes = [
            view("spark", &c, NodeLoad::default()),
            view("mac", &b, NodeLoad::default()),
        ];
        let long = chosen(&policy(), &nodes, FAST, 8192);
        assert_eq!(
            (long.mode, long.prefill.as_str(), long.decode.as_str()),
            ("disaggregated", "spark", "mac"),
            "{long:?}"
        );
        let short = chosen(&policy(), &nodes, FAST, 20);
        assert_eq!(
            (short.mode, short.decode.as_str()),
            ("colocated", "mac"),
            "{short:?}"
        );
    }

    #[test]
    fn a_slow_link_flips_the_choice() {
        let (c, b) = (compute_box(), bandwidth_box());
        let nodes = [
            view("spark", &c, NodeLoad::default()),
            view("mac", &b, NodeLoad::default()),
        ];
        let wifi = Link {
            bandwidth_gbit_s: 0.1,
            latency_ms: 5.0,
        };
        assert_eq!(chosen(&policy(), &nodes, FAST, 4096).mode, "disaggregated");
        let slow = chosen(&policy(), &nodes, wifi, 4096);
        assert_eq!((slow.mode, slow.decode.as_str()), ("colocated", "mac"));
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
            view("spark", &c, NodeLoad::default()),
            view("mac-1", &b, busy),
            view("mac-2", &b, NodeLoad::default()),
        ];
        for n in &mut nodes[1..] {
            n.prefills = false;
            n.colocates = false;
        }
        let p = chosen(&policy(), &nodes, FAST, 4096);
        assert_eq!(p.decode, "mac-2", "{p:?}");
        // With the idle node loaded instead, the choice follows.
        nodes[1].load = NodeLoad::default();
        nodes[2].load = busy;
        assert_eq!(chosen(&policy(), &nodes, FAST, 4096).decode, "mac-1");
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
            view("spark", &c, NodeLoad::default()),
            view("mac", &b, NodeLoad::default()),
        ];
        let pol = Policy {
            objective: Objective::E2e,
            ..policy()
        };
        let req = RequestShape {
            prompt_tokens: 8192,
            output_tokens: 32,
        };
        let p = plan(&pol, &nodes, |_, _| Some(FAST), req, Candidates::All);
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
