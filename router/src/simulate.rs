//! A discrete-event simulation of a cluster under a workload, per placement policy, built on the
//! cost model's per-node timings (`exo-router simulate`).
//!
//! Each node is modelled the way the engine works: one worker that, per turn, runs the KV imports
//! and exports that arrived, one `n_batch` chunk of the first waiting prompt (prompts take turns),
//! then one decode step for every generating sequence. Slots are held as the nodes hold them: a
//! prefill-only node from the start of a prompt until its cache is exported, a decode node from
//! import to the last token, a `both` node for the whole request. A link carries one transfer at a
//! time in each direction. Placement calls the same cost model as the router, with the same live
//! load counters.

use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use exo_kvcache::Codec;
use serde::Serialize;

use crate::costmodel::{
    self, Candidates, NodeLoad, NodePerf, NodeView, PREFILL_CHUNK, RequestShape,
};
use crate::profile::Profile;

/// Why a simulation cannot run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The profile lacks what the cost model needs.
    #[error("profile {0}: every node needs [nodes.perf] and policy.kv_bytes_per_token")]
    NoCostModel(String),
    /// The workload is not usable.
    #[error("workload: {0}")]
    Workload(String),
}

/// How requests arrive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrival {
    /// Poisson arrivals at this many requests per second.
    Rate(f64),
    /// A closed loop: this many requests in flight, a new one as soon as one ends (like `loadgen`).
    Concurrency(usize),
}

/// The requests to simulate.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// Requests in all.
    pub requests: usize,
    /// Arrival process.
    pub arrival: Arrival,
    /// Prompt tokens of a short request: uniform in `min..=max`.
    pub prompt_tokens: (u64, u64),
    /// Every Nth request has a long prompt (0: none).
    pub long_every: usize,
    /// Prompt tokens of a long request.
    pub long_tokens: u64,
    /// Output tokens: uniform in `min..=max`.
    pub output_tokens: (u64, u64),
    /// Seed of the arrival times and lengths.
    pub seed: u64,
}

/// The placement policies compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SimPolicy {
    /// Every request on the single node that serves the average request best.
    Colocated,
    /// Every request split, the pair chosen by the cost model with live load.
    Disaggregated,
    /// The cost model's choice among all placements, per request.
    Auto,
}

impl SimPolicy {
    /// All policies, in report order.
    pub const ALL: [SimPolicy; 3] = [
        SimPolicy::Colocated,
        SimPolicy::Disaggregated,
        SimPolicy::Auto,
    ];

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            SimPolicy::Colocated => "colocated",
            SimPolicy::Disaggregated => "disaggregated",
            SimPolicy::Auto => "auto",
        }
    }
}

/// Percentiles of one latency, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
}

fn percentiles(mut v: Vec<f64>) -> Percentiles {
    if v.is_empty() {
        return Percentiles::default();
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Percentiles {
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
    }
}

/// What one policy achieved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimReport {
    /// The policy.
    pub policy: SimPolicy,
    /// Requests that could not be placed (no node for this policy).
    pub unplaced: usize,
    /// Requests completed.
    pub completed: usize,
    /// Time from the first arrival to the last token, seconds.
    pub duration_s: f64,
    /// Completed requests per second.
    pub requests_per_s: f64,
    /// Output tokens per second.
    pub output_tok_s: f64,
    /// Time to first token, all requests.
    pub ttft: Percentiles,
    /// Time per output token after the first, all requests.
    pub tpot: Percentiles,
    /// Time to first token of the short requests only.
    pub ttft_short: Percentiles,
    /// Time per output token of the short requests only.
    pub tpot_short: Percentiles,
    /// Mean end-to-end time, seconds.
    pub e2e_mean_s: f64,
    /// Requests per placement (`prefill->decode`).
    pub placements: BTreeMap<String, usize>,
}

/// A small deterministic generator (SplitMix64): the same seed gives the same workload.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn between(&mut self, (lo, hi): (u64, u64)) -> u64 {
        if hi <= lo {
            lo
        } else {
            lo + self.next() % (hi - lo + 1)
        }
    }
}

#[derive(Debug, Clone)]
struct Req {
    prompt: u64,
    output: u64,
    long: bool,
    arrival: f64,
    prefill: usize,
    decode: usize,
    codec: Codec,
    first_token: Option<f64>,
    finished: Option<f64>,
    generated: u64,
}

/// Work for a node's worker.
#[derive(Debug)]
enum Job {
    /// Import a cache, then generate.
    Import(usize),
    /// Export a finished prompt's cache.
    Export(usize),
}

#[derive(Debug, Default)]
struct SimNode {
    slots: usize,
    /// Slots held.
    used: usize,
    /// Requests waiting for a slot to start their prompt (FIFO).
    prompt_wait: VecDeque<usize>,
    /// Requests whose cache arrived and wait for a decode slot (FIFO).
    import_wait: VecDeque<usize>,
    /// Prompts being prefilled: (request, tokens done).
    prefilling: VecDeque<(usize, u64)>,
    jobs: VecDeque<Job>,
    /// Sequences generating.
    active: Vec<usize>,
    busy: bool,
    load: NodeLoad,
}

#[derive(Debug, PartialEq)]
enum Event {
    Arrive(usize),
    /// A worker turn ends.
    TurnDone {
        node: usize,
        chunk: Option<(usize, u64)>,
        stepped: Vec<usize>,
    },
    /// A cache reaches its decode node.
    Delivered(usize),
}

/// An event at a time; the heap pops the earliest, ties in insertion order.
struct Timed(f64, u64, Event);

impl PartialEq for Timed {
    fn eq(&self, o: &Self) -> bool {
        self.0 == o.0 && self.1 == o.1
    }
}
impl Eq for Timed {}
impl PartialOrd for Timed {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Timed {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        o.0.total_cmp(&self.0).then(o.1.cmp(&self.1))
    }
}

struct Sim<'a> {
    profile: &'a Profile,
    perf: Vec<&'a NodePerf>,
    policy: SimPolicy,
    home: Option<usize>,
    nodes: Vec<SimNode>,
    reqs: Vec<Req>,
    events: BinaryHeap<Timed>,
    seq: u64,
    now: f64,
    /// When each directed link is free again.
    link_free: BTreeMap<(usize, usize), f64>,
    unplaced: usize,
    workload: Workload,
    issued: usize,
}

impl Sim<'_> {
    fn at(&mut self, t: f64, e: Event) {
        self.seq += 1;
        self.events.push(Timed(t, self.seq, e));
    }

    fn bytes(&self, r: usize) -> f64 {
        self.reqs[r].prompt as f64 * self.profile.policy.kv_bytes_per_token
    }

    fn views(&self) -> Vec<NodeView<'_>> {
        self.profile
            .nodes
            .iter()
            .zip(&self.nodes)
            .zip(&self.perf)
            .map(|((spec, n), perf)| NodeView {
                name: &spec.name,
                prefills: spec.role.prefills(),
                decodes: spec.role.decodes(),
                colocates: spec.role == exo_protocol::Role::Both,
                slots: spec.slots,
                perf,
                load: n.load,
            })
            .collect()
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.profile.nodes.iter().position(|n| n.name == name)
    }

    fn place(&mut self, r: usize) -> bool {
        let shape = RequestShape {
            prompt_tokens: self.reqs[r].prompt,
            output_tokens: self.reqs[r].output,
        };
        let chosen = match (self.policy, self.home) {
            (SimPolicy::Colocated, Some(h)) => Some((h, h, Codec::None)),
            (SimPolicy::Colocated, None) => None,
            (policy, _) => {
                let which = if policy == SimPolicy::Auto {
                    Candidates::All
                } else {
                    Candidates::Disaggregated
                };
                let views = self.views();
                let plan = costmodel::plan(
                    &self.profile.policy,
                    &views,
                    |a, b| self.profile.link(a, b),
                    shape,
                    which,
                );
                plan.chosen().and_then(|c| {
                    let codec = c.codec.and_then(|c| c.parse().ok()).unwrap_or(Codec::None);
                    Some((self.index(&c.prefill)?, self.index(&c.decode)?, codec))
                })
            }
        };
        let Some((p, d, codec)) = chosen else {
            return false;
        };
        let req = &mut self.reqs[r];
        req.prefill = p;
        req.decode = d;
        req.codec = codec;
        self.nodes[p].load.prefill_backlog += req.prompt;
        self.nodes[d].load.decoding += 1;
        self.nodes[d].load.decode_ctx += req.prompt;
        self.nodes[p].prompt_wait.push_back(r);
        true
    }

    fn arrive(&mut self, r: usize) {
        self.reqs[r].arrival = self.now;
        if self.place(r) {
            let p = self.reqs[r].prefill;
            self.kick(p);
        } else {
            self.unplaced += 1;
            self.next_closed_loop();
        }
    }

    fn next_closed_loop(&mut self) {
        if let Arrival::Concurrency(_) = self.workload.arrival
            && self.issued < self.reqs.len()
        {
            let r = self.issued;
            self.issued += 1;
            self.at(self.now, Event::Arrive(r));
        }
    }

    /// Starts the node's next turn if it is idle and has work.
    fn kick(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        if node.busy {
            return;
        }
        // Prompts take free slots first come, first served; so do arrived caches.
        while node.used < node.slots {
            if let Some(r) = node.import_wait.pop_front() {
                node.used += 1;
                node.jobs.push_back(Job::Import(r));
            } else if let Some(r) = node.prompt_wait.pop_front() {
                node.used += 1;
                node.prefilling.push_back((r, 0));
            } else {
                break;
            }
        }
        let perf = self.perf[n];
        let mut took = 0.0;
        let mut jobs_done = Vec::new();
        while let Some(job) = node.jobs.pop_front() {
            match job {
                Job::Import(r) => {
                    took += self.reqs[r].prompt as f64 * self.profile.policy.kv_bytes_per_token
                        / (perf.kv_import_gb_s * 1e9);
                    jobs_done.push(Job::Import(r));
                }
                Job::Export(r) => {
                    took += self.reqs[r].prompt as f64 * self.profile.policy.kv_bytes_per_token
                        / (perf.kv_export_gb_s * 1e9);
                    jobs_done.push(Job::Export(r));
                }
            }
        }
        let chunk = node.prefilling.pop_front().map(|(r, done)| {
            let total = self.reqs[r].prompt;
            let len = (total - done).min(u64::from(PREFILL_CHUNK));
            // Per-token speed at the prompt's full length, as the prefill table measures it.
            took += perf.prefill_s(total) * len as f64 / total as f64;
            (r, done + len)
        });
        let node = &mut self.nodes[n];
        let stepped = node.active.clone();
        if !stepped.is_empty() {
            let ctx: u64 = stepped
                .iter()
                .map(|&r| self.reqs[r].prompt + self.reqs[r].generated)
                .sum();
            let batch = stepped.len() as u32;
            took += perf.step_s(batch, ctx as f64 / f64::from(batch));
        }
        if took == 0.0 && chunk.is_none() && stepped.is_empty() && jobs_done.is_empty() {
            return;
        }
        node.busy = true;
        let mut deliveries = Vec::new();
        // Imports and exports take effect at the start of the turn's compute: close enough.
        for job in jobs_done {
            match job {
                Job::Import(r) => node.active.push(r),
                Job::Export(r) => {
                    node.used -= 1;
                    let d = self.reqs[r].decode;
                    let bytes = self.reqs[r].prompt as f64 * self.profile.policy.kv_bytes_per_token;
                    let link = self
                        .profile
                        .link(n, d)
                        .unwrap_or(self.profile.policy.default_link);
                    let move_s = costmodel::transfer_s(
                        bytes,
                        self.perf[n],
                        self.perf[d],
                        &link,
                        self.reqs[r].codec,
                    )
                    .unwrap_or(f64::INFINITY);
                    // Import is a job on the decode node; the link carries the rest.
                    let wire = move_s - bytes / (self.perf[d].kv_import_gb_s * 1e9)
                        + self.profile.policy.handoff_overhead_s;
                    let start = self.now.max(*self.link_free.get(&(n, d)).unwrap_or(&0.0));
                    self.link_free.insert((n, d), start + wire);
                    deliveries.push((start + wire, r));
                }
            }
        }
        for (t, r) in deliveries {
            self.at(t, Event::Delivered(r));
        }
        let t = self.now + took;
        self.at(
            t,
            Event::TurnDone {
                node: n,
                chunk,
                stepped,
            },
        );
    }

    fn turn_done(&mut self, n: usize, chunk: Option<(usize, u64)>, stepped: Vec<usize>) {
        self.nodes[n].busy = false;
        if let Some((r, done)) = chunk {
            if done < self.reqs[r].prompt {
                self.nodes[n].prefilling.push_back((r, done));
            } else {
                self.prompt_done(n, r);
            }
        }
        for r in stepped {
            let req = &mut self.reqs[r];
            req.generated += 1;
            if req.generated >= req.output {
                req.finished = Some(self.now);
                let node = &mut self.nodes[n];
                node.active.retain(|&x| x != r);
                node.used -= 1;
                node.load.decoding -= 1;
                node.load.decode_ctx -= req.prompt;
                self.next_closed_loop();
            }
        }
        self.kick(n);
    }

    fn prompt_done(&mut self, n: usize, r: usize) {
        self.nodes[n].load.prefill_backlog -= self.reqs[r].prompt;
        let req = &mut self.reqs[r];
        req.generated = 1;
        if req.output <= 1 {
            req.first_token = Some(self.now);
            req.finished = Some(self.now);
            let d = req.decode;
            let node = &mut self.nodes[n];
            node.used -= 1;
            self.nodes[d].load.decoding -= 1;
            self.nodes[d].load.decode_ctx -= self.reqs[r].prompt;
            self.next_closed_loop();
            return;
        }
        if req.decode == n {
            req.first_token = Some(self.now);
            self.nodes[n].active.push(r);
        } else {
            // The first token reaches the client once the cache is exported.
            let export = self.bytes(r) / (self.perf[n].kv_export_gb_s * 1e9);
            self.reqs[r].first_token = Some(self.now + export);
            self.nodes[n].jobs.push_back(Job::Export(r));
        }
    }

    fn delivered(&mut self, r: usize) {
        let d = self.reqs[r].decode;
        self.nodes[d].import_wait.push_back(r);
        self.kick(d);
    }
}

/// The single node that serves the average request of `workload` best on an idle cluster.
fn best_home(profile: &Profile, perf: &[&NodePerf], workload: &Workload) -> Option<usize> {
    let mean = |(lo, hi): (u64, u64)| (lo + hi) / 2;
    let shape = RequestShape {
        prompt_tokens: mean(workload.prompt_tokens),
        output_tokens: mean(workload.output_tokens),
    };
    let views: Vec<NodeView> = profile
        .nodes
        .iter()
        .zip(perf)
        .map(|(spec, perf)| NodeView {
            name: &spec.name,
            prefills: spec.role.prefills(),
            decodes: spec.role.decodes(),
            colocates: spec.role == exo_protocol::Role::Both,
            slots: spec.slots,
            perf,
            load: NodeLoad::default(),
        })
        .collect();
    let candidates = costmodel::predict(
        &profile.policy,
        &views,
        |a, b| profile.link(a, b),
        shape,
        Candidates::Colocated,
    );
    let best = costmodel::choose(&profile.policy, &candidates)?;
    profile
        .nodes
        .iter()
        .position(|n| n.name == candidates[best].prefill)
}

/// Simulates `workload` on the cluster of `profile` under one placement policy.
pub fn simulate(
    profile: &Profile,
    workload: &Workload,
    policy: SimPolicy,
) -> Result<SimReport, SimError> {
    if !profile.has_cost_model() {
        return Err(SimError::NoCostModel(profile.path.display().to_string()));
    }
    if workload.requests == 0 {
        return Err(SimError::Workload("requests must be at least 1".into()));
    }
    match workload.arrival {
        Arrival::Rate(r) if !(r.is_finite() && r > 0.0) => {
            return Err(SimError::Workload("rate must be positive".into()));
        }
        Arrival::Concurrency(0) => {
            return Err(SimError::Workload("concurrency must be at least 1".into()));
        }
        _ => {}
    }
    if workload.prompt_tokens.0 == 0 || workload.output_tokens.0 == 0 {
        return Err(SimError::Workload(
            "prompt and output lengths must be at least 1".into(),
        ));
    }
    let perf: Vec<&NodePerf> = profile
        .nodes
        .iter()
        .filter_map(|n| n.perf.as_ref())
        .collect();
    let mut rng = Rng(workload.seed);
    let mut t = 0.0;
    let reqs: Vec<Req> = (0..workload.requests)
        .map(|i| {
            let long = workload.long_every > 0 && (i + 1) % workload.long_every == 0;
            let prompt = if long {
                workload.long_tokens.max(1)
            } else {
                rng.between(workload.prompt_tokens)
            };
            let output = rng.between(workload.output_tokens);
            if let Arrival::Rate(rate) = workload.arrival {
                t += -(1.0 - rng.unit()).ln() / rate;
            }
            Req {
                prompt,
                output,
                long,
                arrival: t,
                prefill: 0,
                decode: 0,
                codec: Codec::None,
                first_token: None,
                finished: None,
                generated: 0,
            }
        })
        .collect();
    let home = best_home(profile, &perf, workload);
    let mut sim = Sim {
        profile,
        perf,
        policy,
        home,
        nodes: profile
            .nodes
            .iter()
            .map(|n| SimNode {
                slots: n.slots.max(1) as usize,
                ..SimNode::default()
            })
            .collect(),
        reqs,
        events: BinaryHeap::new(),
        seq: 0,
        now: 0.0,
        link_free: BTreeMap::new(),
        unplaced: 0,
        workload: workload.clone(),
        issued: 0,
    };
    match workload.arrival {
        Arrival::Rate(_) => {
            for r in 0..sim.reqs.len() {
                let at = sim.reqs[r].arrival;
                sim.at(at, Event::Arrive(r));
            }
            sim.issued = sim.reqs.len();
        }
        Arrival::Concurrency(c) => {
            for _ in 0..c.min(sim.reqs.len()) {
                sim.next_closed_loop();
            }
        }
    }
    while let Some(Timed(t, _, e)) = sim.events.pop() {
        sim.now = t;
        match e {
            Event::Arrive(r) => sim.arrive(r),
            Event::TurnDone {
                node,
                chunk,
                stepped,
            } => sim.turn_done(node, chunk, stepped),
            Event::Delivered(r) => sim.delivered(r),
        }
    }
    Ok(report(&sim))
}

fn report(sim: &Sim) -> SimReport {
    let done: Vec<&Req> = sim.reqs.iter().filter(|r| r.finished.is_some()).collect();
    let ttft = |r: &&Req| r.first_token.map(|f| f - r.arrival);
    let tpot = |r: &&Req| match (r.first_token, r.finished) {
        (Some(f), Some(e)) if r.output > 1 => Some((e - f) / (r.output - 1) as f64),
        _ => None,
    };
    let start = done.iter().map(|r| r.arrival).fold(f64::INFINITY, f64::min);
    let end = done.iter().filter_map(|r| r.finished).fold(0.0, f64::max);
    let duration = if done.is_empty() { 0.0 } else { end - start };
    let tokens: u64 = done.iter().map(|r| r.output).sum();
    let per_s = |x: f64| if duration > 0.0 { x / duration } else { 0.0 };
    let mut placements = BTreeMap::new();
    for r in &done {
        let (p, d) = (
            &sim.profile.nodes[r.prefill].name,
            &sim.profile.nodes[r.decode].name,
        );
        let key = if r.prefill == r.decode {
            p.clone()
        } else {
            format!("{p}->{d}")
        };
        *placements.entry(key).or_insert(0) += 1;
    }
    let short: Vec<&Req> = done.iter().copied().filter(|r| !r.long).collect();
    SimReport {
        policy: sim.policy,
        unplaced: sim.unplaced,
        completed: done.len(),
        duration_s: duration,
        requests_per_s: per_s(done.len() as f64),
        output_tok_s: per_s(tokens as f64),
        ttft: percentiles(done.iter().filter_map(ttft).collect()),
        tpot: percentiles(done.iter().filter_map(tpot).collect()),
        ttft_short: percentiles(short.iter().filter_map(ttft).collect()),
        tpot_short: percentiles(short.iter().filter_map(tpot).collect()),
        e2e_mean_s: if done.is_empty() {
            0.0
        } else {
            done.iter()
                .filter_map(|r| r.finished.map(|f| f - r.arrival))
                .sum::<f64>()
                / done.len() as f64
        },
        placements,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const PROFILE: &str = r#"
model = "m.gguf"
placement = "auto"
[policy]
kv_bytes_per_token = 131072
tpot_target_ms = 50
[[links]]
between = ["fast-prefill", "fast-decode"]
bandwidth_gbit_s = 10
latency_ms = 0.1
[[nodes]]
name = "fast-prefill"
address = "10.0.0.1:52416"
role = "both"
slots = 4
[nodes.perf]
source = "test"
prefill_tok_s = [[1, 17.0], [64, 1000.0], [1024, 5000.0], [8192, 5600.0]]
decode_step_ms = [[1, 60.0], [8, 70.0]]
kv_export_gb_s = 20
kv_import_gb_s = 20
[[nodes]]
name = "fast-decode"
address = "10.0.0.2:52416"
role = "both"
slots = 8
[nodes.perf]
source = "test"
prefill_tok_s = [[1, 50.0], [64, 900.0], [1024, 1450.0], [8192, 1470.0]]
decode_step_ms = [[1, 26.0], [8, 32.0]]
kv_export_gb_s = 20
kv_import_gb_s = 20
"#;

    fn profile() -> Profile {
        Profile::parse(PROFILE, Path::new("sim.toml")).unwrap()
    }

    fn workload(seed: u64) -> Workload {
        Workload {
            requests: 60,
            arrival: Arrival::Rate(0.5),
            prompt_tokens: (100, 400),
            long_every: 4,
            long_tokens: 8192,
            output_tokens: (32, 128),
            seed,
        }
    }

    #[test]
    fn deterministic_for_a_seed() {
        let p = profile();
        for policy in SimPolicy::ALL {
            let a = simulate(&p, &workload(7), policy).unwrap();
            let b = simulate(&p, &workload(7), policy).unwrap();
            assert_eq!(a, b);
            assert_eq!(a.completed, 60, "{policy:?}");
        }
        let c = simulate(&p, &workload(8), SimPolicy::Auto).unwrap();
        assert_ne!(simulate(&p, &workload(7), SimPolicy::Auto).unwrap(), c);
    }

    #[test]
    fn one_long_request_matches_the_cost_model_on_an_idle_cluster() {
        let p = profile();
        let w = Workload {
            requests: 1,
            arrival: Arrival::Concurrency(1),
            prompt_tokens: (8192, 8192),
            long_every: 0,
            long_tokens: 0,
            output_tokens: (32, 32),
            seed: 1,
        };
        let sim = simulate(&p, &w, SimPolicy::Disaggregated).unwrap();
        let views: Vec<NodeView> = p
            .nodes
            .iter()
            .map(|n| NodeView {
                name: &n.name,
                prefills: true,
                decodes: true,
                colocates: true,
                slots: n.slots,
                perf: n.perf.as_ref().unwrap(),
                load: NodeLoad::default(),
            })
            .collect();
        let shape = RequestShape {
            prompt_tokens: 8192,
            output_tokens: 32,
        };
        let plan = costmodel::plan(
            &p.policy,
            &views,
            |a, b| p.link(a, b),
            shape,
            Candidates::Disaggregated,
        );
        let predicted = plan.chosen().unwrap();
        let rel = (sim.e2e_mean_s - predicted.e2e_s).abs() / predicted.e2e_s;
        assert!(
            rel < 0.05,
            "sim {} vs model {}",
            sim.e2e_mean_s,
            predicted.e2e_s
        );
        assert_eq!(
            sim.placements.keys().next().unwrap(),
            "fast-prefill->fast-decode"
        );
    }

    #[test]
    fn bad_workloads_are_refused() {
        let p = profile();
        let mut w = workload(1);
        w.arrival = Arrival::Rate(0.0);
        assert!(simulate(&p, &w, SimPolicy::Auto).is_err());
        let mut w = workload(1);
        w.requests = 0;
        assert!(simulate(&p, &w, SimPolicy::Auto).is_err());
    }
}
