//! The event loop of the simulation: nodes as workers taking turns, requests as they travel.

use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use exo_kvcache::Codec;

use super::{Arrival, Workload};
use crate::placement::cost_model::{PREFILL_CHUNK, handoff_terms, streamed_handoff_s};
use crate::placement::{NodeLoad, NodeView, PlacementMode, Placer, RequestShape};
use crate::profile::Profile;
use exo_protocol::NodePerf;

/// One request of the workload and what became of it.
#[derive(Debug, Clone)]
pub(super) struct Req {
    pub(super) prompt: u64,
    pub(super) output: u64,
    pub(super) long: bool,
    pub(super) arrival: f64,
    pub(super) prefill: usize,
    pub(super) decode: usize,
    pub(super) codec: Codec,
    /// Pieces its hand-off is cut in.
    pub(super) pieces: u64,
    pub(super) first_token: Option<f64>,
    pub(super) finished: Option<f64>,
    pub(super) generated: u64,
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
    /// Prompts being prefilled: (request, tokens done, turns passed over), in arrival order.
    prefilling: Vec<(usize, u64, u32)>,
    jobs: VecDeque<Job>,
    /// Sequences generating.
    active: Vec<usize>,
    busy: bool,
    load: NodeLoad,
}

impl SimNode {
    /// Prompts take free slots first come, first served; so do arrived caches (first).
    fn take_slots(&mut self) {
        while self.used < self.slots {
            if let Some(r) = self.import_wait.pop_front() {
                self.used += 1;
                self.jobs.push_back(Job::Import(r));
            } else if let Some(r) = self.prompt_wait.pop_front() {
                self.used += 1;
                self.prefilling.push((r, 0, 0));
            } else {
                break;
            }
        }
    }
}

/// Turns a waiting prompt is passed over for shorter ones before it goes first (the engine's rule).
const MAX_PASSED_OVER: u32 = 8;

impl SimNode {
    /// Takes the prompt that runs a chunk this turn, as the engine picks it: the one passed over
    /// longest once that reaches [`MAX_PASSED_OVER`], else the one with the fewest tokens left
    /// (`left` of request and tokens done), earliest on a tie. The others count one more pass.
    fn next_prompt(&mut self, left: impl Fn(usize, u64) -> u64) -> Option<(usize, u64)> {
        let i = (0..self.prefilling.len()).min_by_key(|&i| {
            let (r, done, passed) = self.prefilling[i];
            let overdue = passed >= MAX_PASSED_OVER;
            (
                !overdue,
                if overdue { u32::MAX - passed } else { 0 },
                left(r, done),
                i,
            )
        })?;
        let (r, done, _) = self.prefilling.remove(i);
        for p in &mut self.prefilling {
            p.2 += 1;
        }
        Some((r, done))
    }
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

/// The simulated cluster: its nodes, the requests, and the events still to happen.
pub(super) struct Sim<'a> {
    pub(super) profile: &'a Profile,
    perf: Vec<&'a NodePerf>,
    pub(super) mode: PlacementMode,
    placer: Box<dyn Placer>,
    nodes: Vec<SimNode>,
    pub(super) reqs: Vec<Req>,
    events: BinaryHeap<Timed>,
    seq: u64,
    now: f64,
    /// When each directed link is free again.
    link_free: BTreeMap<(usize, usize), f64>,
    pub(super) unplaced: usize,
    workload: Workload,
    issued: usize,
}

impl<'a> Sim<'a> {
    /// A cluster of `profile`'s nodes (every one with a perf table) about to serve `reqs`, placed
    /// by `placer`.
    pub(super) fn new(
        profile: &'a Profile,
        workload: &Workload,
        mode: PlacementMode,
        placer: Box<dyn Placer>,
        reqs: Vec<Req>,
    ) -> Self {
        Sim {
            profile,
            perf: profile
                .nodes
                .iter()
                .filter_map(|n| n.perf.as_ref())
                .collect(),
            mode,
            placer,
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
        }
    }

    /// Issues the workload's arrivals and runs every event to the end.
    pub(super) fn run(&mut self) {
        match self.workload.arrival {
            Arrival::Rate(_) => {
                for r in 0..self.reqs.len() {
                    let at = self.reqs[r].arrival;
                    self.at(at, Event::Arrive(r));
                }
                self.issued = self.reqs.len();
            }
            Arrival::Concurrency(c) => {
                for _ in 0..c.min(self.reqs.len()) {
                    self.next_closed_loop();
                }
            }
        }
        while let Some(Timed(t, _, e)) = self.events.pop() {
            self.now = t;
            match e {
                Event::Arrive(r) => self.arrive(r),
                Event::TurnDone {
                    node,
                    chunk,
                    stepped,
                } => self.turn_done(node, chunk, stepped),
                Event::Delivered(r) => self.delivered(r),
            }
        }
    }

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
            .enumerate()
            .map(|(id, ((spec, n), perf))| NodeView {
                id,
                role: spec.role,
                slots: spec.slots,
                perf: Some(perf),
                load: n.load,
                in_flight: 0,
            })
            .collect()
    }

    fn place(&mut self, r: usize) -> bool {
        let shape = RequestShape {
            prompt_tokens: self.reqs[r].prompt,
            output_tokens: self.reqs[r].output,
        };
        let views = self.views();
        let chosen = self.placer.choose(&views, shape).map(|c| {
            let pieces = c.pieces.unwrap_or(exo_kvcache::HANDOFF_PIECES);
            (c.prefill, c.decode, c.codec.unwrap_or(Codec::None), pieces)
        });
        let Some((p, d, codec, pieces)) = chosen else {
            return false;
        };
        let req = &mut self.reqs[r];
        req.prefill = p;
        req.decode = d;
        req.codec = codec;
        req.pieces = pieces;
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
        if self.nodes[n].busy {
            return;
        }
        self.nodes[n].take_slots();
        let perf = self.perf[n];
        let kv_bytes =
            |r: usize| self.reqs[r].prompt as f64 * self.profile.policy.kv_bytes_per_token;
        let node = &mut self.nodes[n];
        let jobs_done: Vec<Job> = node.jobs.drain(..).collect();
        let mut took: f64 = jobs_done
            .iter()
            .map(|job| match *job {
                Job::Import(r) => kv_bytes(r) / (perf.kv_import_gb_s * 1e9),
                Job::Export(r) => kv_bytes(r) / (perf.kv_export_gb_s * 1e9),
            })
            .sum();
        let reqs = &self.reqs;
        let chunk = node
            .next_prompt(|r, done| reqs[r].prompt - done)
            .map(|(r, done)| {
                let total = self.reqs[r].prompt;
                let len = (total - done).min(u64::from(PREFILL_CHUNK));
                // Per-token speed at the prompt's full length, as the prefill table measures it.
                took += perf.prefill_s(total) * len as f64 / total as f64;
                (r, done + len)
            });
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
        // Imports and exports take effect at the start of the turn's compute: close enough.
        for job in jobs_done {
            match job {
                Job::Import(r) => self.nodes[n].active.push(r),
                Job::Export(r) => {
                    self.nodes[n].used -= 1;
                    let at = self.ship(n, r);
                    self.at(at, Event::Delivered(r));
                }
            }
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

    /// What the streamed hand-off of request `r` from node `n` costs, as the cost model prices it
    /// ([`streamed_handoff_s`]): the seconds its exports add to the prompt, and the wire time left
    /// after the prompt ends (the final export included).
    fn streamed(&self, n: usize, r: usize) -> (f64, f64) {
        let d = self.reqs[r].decode;
        let prompt = self.reqs[r].prompt;
        let link = self.profile.link(n, d);
        let perf = (self.perf[n], self.perf[d]);
        let t = handoff_terms(self.bytes(r), perf, &link, self.reqs[r].codec);
        let own = self.perf[n].prefill_s(prompt);
        let overlap = t.overlap_s.unwrap_or(f64::INFINITY);
        let batch = self.perf[n].batch_tokens();
        streamed_handoff_s(prompt, self.reqs[r].pieces, batch, own, t.export_s, overlap)
    }

    /// Sends what is left of request `r`'s cache from node `n` to its decode node once its prompt
    /// ended (the rest went while it ran), one transfer at a time per link direction; returns when
    /// it arrives.
    fn ship(&mut self, n: usize, r: usize) -> f64 {
        let d = self.reqs[r].decode;
        let link = self.profile.link(n, d);
        // Import is a job on the decode node; the link carried the rest, mostly while the prompt
        // ran: what shows after it is the last piece (and the final export).
        // The prompt's own chunks did not count the pieces' exports: they come in here too.
        let (during, exposed) = self.streamed(n, r);
        let wire =
            during + exposed + link.latency_ms / 1000.0 + self.profile.policy.handoff_overhead_s;
        let start = self.now.max(*self.link_free.get(&(n, d)).unwrap_or(&0.0));
        self.link_free.insert((n, d), start + wire);
        start + wire
    }

    fn turn_done(&mut self, n: usize, chunk: Option<(usize, u64)>, stepped: Vec<usize>) {
        self.nodes[n].busy = false;
        if let Some((r, done)) = chunk {
            if done < self.reqs[r].prompt {
                self.nodes[n].prefilling.push((r, done, 0));
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
            // The first token reaches the client when the prompt ends, which the exports of the
            // pieces shipped while it ran delayed.
            let (during, _) = self.streamed(n, r);
            self.reqs[r].first_token = Some(self.now + during);
            self.nodes[n].jobs.push_back(Job::Export(r));
        }
    }

    fn delivered(&mut self, r: usize) {
        let d = self.reqs[r].decode;
        self.nodes[d].import_wait.push_back(r);
        self.kick(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_run_shortest_first_until_one_is_passed_over_too_long() {
        let len = [1500u64, 60, 40];
        let mut node = SimNode {
            prefilling: vec![(0, 0, 0), (1, 0, 0), (2, 0, 0)],
            ..SimNode::default()
        };
        let left = |r: usize, done: u64| len[r] - done;
        assert_eq!(node.next_prompt(left), Some((2, 0)));
        assert_eq!(node.next_prompt(left), Some((1, 0)));
        // A long prompt passed over enough turns goes before a newly arrived short one.
        node.prefilling[0].2 = MAX_PASSED_OVER;
        node.prefilling.push((1, 0, 0));
        assert_eq!(node.next_prompt(left), Some((0, 0)));
        assert_eq!(node.prefilling, vec![(1, 0, 1)]);
    }
}
