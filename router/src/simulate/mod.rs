//! A discrete-event simulation of a cluster under a workload, per placement policy, built on the
//! cost model's per-node timings (`exo-router simulate`).
//!
//! Each node is modelled the way the engine works: one worker that, per turn, runs the KV imports
//! and exports that arrived, one `n_batch` chunk of the waiting prompt with the fewest tokens left
//! (one passed over 8 turns goes first, as in the engine; the engine may also let short prompts
//! share a batch, which the simulation does not model), then one decode step for every generating
//! sequence. Slots are held as the nodes hold them: a
//! prefill-only node from the start of a prompt until its cache is exported, a decode node from
//! import to the last token, a `both` node for the whole request. A hand-off is priced as the cost
//! model prices the streamed one (`streamed_handoff_s`): the pieces' exports delay token 0, and what
//! is left when the prompt ends crosses the link, which carries one such tail at a time in each
//! direction (the pieces sent during the prompt are not queued on it). Placement calls the same cost model as the router, with the same live
//! load counters.

use std::collections::BTreeMap;

use exo_kvcache::Codec;
use serde::Serialize;

mod sim;

use crate::placement::fixed::Fixed;
use crate::placement::{FirstOf, NodeId, PlacementMode, Placer, RequestShape};
use crate::profile::Profile;
use sim::{Req, Sim};

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

impl Default for Workload {
    /// 200 requests at one per second, short prompts and outputs, no long prompts.
    fn default() -> Self {
        Workload {
            requests: 200,
            arrival: Arrival::Rate(1.0),
            prompt_tokens: (100, 400),
            long_every: 0,
            long_tokens: 2000,
            output_tokens: (64, 256),
            seed: 1,
        }
    }
}

/// `MIN-MAX` (or one number) as a range with `1 <= MIN <= MAX`.
fn token_range(v: &str) -> Result<(u64, u64), String> {
    let (a, b) = v.split_once('-').unwrap_or((v, v));
    let num = |x: &str| x.trim().parse::<u64>().map_err(|e| e.to_string());
    let (a, b) = (num(a)?, num(b)?);
    if a >= 1 && a <= b {
        Ok((a, b))
    } else {
        Err(format!("range {v:?} must be MIN-MAX with 1 <= MIN <= MAX"))
    }
}

impl std::str::FromStr for Workload {
    type Err = SimError;

    /// Parses `key=value,...` over the defaults: requests, rate (requests/s) or concurrency,
    /// prompt and output (tokens, or MIN-MAX), long_every, long_tokens, seed.
    fn from_str(spec: &str) -> Result<Self, SimError> {
        let mut w = Workload::default();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| SimError::Workload(format!("{part:?} is not key=value")))?;
            let bad = |e: &dyn std::fmt::Display| SimError::Workload(format!("{k}={v}: {e}"));
            let (k, v) = (k.trim(), v.trim());
            match k {
                "requests" => w.requests = v.parse().map_err(|e| bad(&e))?,
                "rate" => w.arrival = Arrival::Rate(v.parse().map_err(|e| bad(&e))?),
                "concurrency" => w.arrival = Arrival::Concurrency(v.parse().map_err(|e| bad(&e))?),
                "prompt" => w.prompt_tokens = token_range(v).map_err(|e| bad(&e))?,
                "output" => w.output_tokens = token_range(v).map_err(|e| bad(&e))?,
                "long_every" => w.long_every = v.parse().map_err(|e| bad(&e))?,
                "long_tokens" => w.long_tokens = v.parse().map_err(|e| bad(&e))?,
                "seed" => w.seed = v.parse().map_err(|e| bad(&e))?,
                other => {
                    return Err(SimError::Workload(format!(
                        "unknown key {other:?} (requests, rate, concurrency, prompt, output, long_every, long_tokens, seed)"
                    )));
                }
            }
        }
        Ok(w)
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
    /// The placement mode simulated.
    pub policy: PlacementMode,
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

/// The single node that serves the average request of `workload` best on an idle cluster.
fn best_home(profile: &Profile, workload: &Workload) -> Option<NodeId> {
    let mean = |(lo, hi): (u64, u64)| (lo + hi) / 2;
    let shape = RequestShape {
        prompt_tokens: mean(workload.prompt_tokens),
        output_tokens: mean(workload.output_tokens),
    };
    let home = profile.cost_model(PlacementMode::Colocated);
    home.choose(&profile.idle_views(), shape).map(|c| c.prefill)
}

/// The placer the simulator compares under `mode`: the single best home node for `colocated`;
/// the cost model (with live load) restricted to `mode` otherwise.
fn placer(profile: &Profile, workload: &Workload, mode: PlacementMode) -> Box<dyn Placer> {
    match mode {
        PlacementMode::Colocated => match best_home(profile, workload) {
            Some(home) => Box::new(Fixed {
                prefill: home,
                decode: home,
            }),
            None => Box::new(FirstOf(Vec::new())),
        },
        _ => Box::new(profile.cost_model(mode)),
    }
}

/// Refuses a workload the simulation cannot run.
fn check(workload: &Workload) -> Result<(), SimError> {
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
    Ok(())
}

/// The workload's requests: lengths and arrival times drawn from its seed.
fn requests(workload: &Workload) -> Vec<Req> {
    let mut rng = Rng(workload.seed);
    let mut t = 0.0;
    (0..workload.requests)
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
                pieces: exo_kvcache::HANDOFF_PIECES,
                first_token: None,
                finished: None,
                generated: 0,
            }
        })
        .collect()
}

/// Simulates `workload` on the cluster of `profile` under one placement mode.
pub fn simulate(
    profile: &Profile,
    workload: &Workload,
    mode: PlacementMode,
) -> Result<SimReport, SimError> {
    if !profile.has_cost_model() {
        return Err(SimError::NoCostModel(profile.path.display().to_string()));
    }
    check(workload)?;
    let placer = placer(profile, workload, mode);
    let mut sim = Sim::new(profile, workload, mode, placer, requests(workload));
    sim.run();
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
        policy: sim.mode,
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
        for policy in PlacementMode::ALL {
            let a = simulate(&p, &workload(7), policy).unwrap();
            let b = simulate(&p, &workload(7), policy).unwrap();
            assert_eq!(a, b);
            assert_eq!(a.completed, 60, "{policy:?}");
        }
        let c = simulate(&p, &workload(8), PlacementMode::Auto).unwrap();
        assert_ne!(simulate(&p, &workload(7), PlacementMode::Auto).unwrap(), c);
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
        let sim = simulate(&p, &w, PlacementMode::Disaggregated).unwrap();
        let shape = RequestShape {
            prompt_tokens: 8192,
            output_tokens: 32,
        };
        let split = p.cost_model(PlacementMode::Disaggregated);
        let plan = split.plan(&p.idle_views(), shape);
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
        assert!(simulate(&p, &w, PlacementMode::Auto).is_err());
        let mut w = workload(1);
        w.requests = 0;
        assert!(simulate(&p, &w, PlacementMode::Auto).is_err());
    }
}
