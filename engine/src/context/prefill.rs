//! Prefill scheduling: which waiting prompts go into the next llama.cpp batch, and how many tokens of
//! each.
//!
//! Every turn of the worker's loop runs one prefill batch of at most `n_batch` tokens. Prompts are
//! taken shortest-remaining first, so a short prompt never waits behind a whole long one (at most
//! behind one chunk already running); a prompt passed over [`MAX_PASSED_OVER`] batches in a row goes
//! first, so a long prompt still finishes under a steady stream of short ones. Several prompts share
//! one batch (one sequence each) when that finishes them sooner on the whole: on a GPU a batch of 480
//! tokens costs about what one of 60 does, on a small CPU it costs eight times as much and running
//! them one after the other gets most of them their first token sooner. [`PrefillCost`] learns which
//! of the two this context is from the batches it has timed, and sizes batches to match: no larger
//! than it takes to keep a batch's fixed cost under [`FIXED_SHARE`] of its time (on a small CPU,
//! 64 tokens, so a prompt that arrives waits a fraction of a second for the batch already running;
//! on a GPU, `n_batch`).

use std::collections::VecDeque;
use std::time::Instant;

use exo_sampling::SamplingParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;
use llguidance::Matcher;

use super::worker::Worker;
use super::{KvPiece, PieceStream, PrefillOutput, Reply};
use crate::error::EngineError;
use crate::sampler::choose;

/// Batches a waiting prompt may be passed over for shorter ones before it goes first.
pub(super) const MAX_PASSED_OVER: u32 = 8;

/// Prefill batches whose timings the cost model remembers.
const COST_WINDOW: usize = 64;

/// Adaptive batches are sized so the fixed cost of a batch stays under this share of its time.
const FIXED_SHARE: f64 = 0.1;

/// Adaptive batches are never smaller than this many tokens (or `n_batch`, if smaller).
const MIN_BATCH: usize = 64;

/// How waiting prompts are put into prefill batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrefillBatching {
    /// From the timings of earlier batches: prompts share a batch when that gets them their first
    /// token sooner in total (accelerators) and run one after the other when it does not (small
    /// CPUs), and batches are only as large as it takes for their fixed cost not to matter.
    #[default]
    Adaptive,
    /// Always fill `n_batch` with as many waiting prompts as fit.
    Always,
    /// One prompt per batch of up to `n_batch` tokens.
    Never,
}

/// A prompt being prefilled.
pub(super) struct Pending {
    pub(super) seq: i32,
    pub(super) slot: usize,
    pub(super) tokens: Vec<i32>,
    /// Tokens already in the cache.
    pub(super) done: usize,
    /// Prefill batches in a row that ran without this prompt.
    pub(super) passed_over: u32,
    /// Where the cache goes while the prompt runs (a streamed hand-off).
    pub(super) stream: Option<PieceStream>,
    pub(super) sampling: SamplingParams,
    /// The constraint's state, when the request has one.
    pub(super) matcher: Option<Matcher>,
    pub(super) reply: Reply<PrefillOutput>,
}

impl Pending {
    fn remaining(&self) -> usize {
        self.tokens.len() - self.done
    }
}

/// What a prefill batch costs on this context, learned from the batches it ran: a least-squares
/// line `seconds = fixed + per_token * tokens` over the last [`COST_WINDOW`] batches.
#[derive(Debug, Default)]
pub(super) struct PrefillCost {
    samples: VecDeque<(f64, f64)>,
    /// The last line fitted; kept while the window holds batches of one size only (which the
    /// line's own batch sizing makes common).
    line: Option<(f64, f64)>,
}

impl PrefillCost {
    /// Remembers that a batch of `tokens` took `seconds`.
    pub(super) fn record(&mut self, tokens: usize, seconds: f64) {
        if self.samples.len() == COST_WINDOW {
            self.samples.pop_front();
        }
        self.samples.push_back((tokens as f64, seconds));
        if let Some(line) = self.line_through_window() {
            self.line = Some(line);
        }
    }

    /// `(fixed, per_token)` seconds: the line through the window when it has batches of sizes
    /// 2x apart, else the last such line, if any.
    fn fit(&self) -> Option<(f64, f64)> {
        self.line
    }

    /// The least-squares line through the window, once the batches in it differ in size by 2x or
    /// more (a line through points of one size says nothing about the slope). Both parts are
    /// clamped at zero.
    fn line_through_window(&self) -> Option<(f64, f64)> {
        let n = self.samples.len() as f64;
        let (lo, hi) = self
            .samples
            .iter()
            .fold((f64::MAX, 0.0f64), |(lo, hi), &(x, _)| {
                (lo.min(x), hi.max(x))
            });
        if self.samples.len() < 2 || hi < 2.0 * lo {
            return None;
        }
        let mx = self.samples.iter().map(|s| s.0).sum::<f64>() / n;
        let my = self.samples.iter().map(|s| s.1).sum::<f64>() / n;
        let sxx: f64 = self.samples.iter().map(|s| (s.0 - mx).powi(2)).sum();
        let sxy: f64 = self.samples.iter().map(|s| (s.0 - mx) * (s.1 - my)).sum();
        let per_token = (sxy / sxx).max(0.0);
        Some(((my - per_token * mx).max(0.0), per_token))
    }

    /// Tokens in an adaptive batch: the fewest for which the fixed cost is at most [`FIXED_SHARE`]
    /// of the batch's time, at least [`MIN_BATCH`], at most `n_batch`; `n_batch` until timed.
    pub(super) fn batch_tokens(&self, n_batch: usize) -> usize {
        let Some((fixed, per_token)) = self.fit() else {
            return n_batch;
        };
        if per_token <= 0.0 {
            return n_batch;
        }
        let wanted = fixed * (1.0 - FIXED_SHARE) / (FIXED_SHARE * per_token);
        // `as` saturates: a huge or NaN ratio becomes usize::MAX or 0, then the clamp applies.
        (wanted.ceil() as usize).clamp(MIN_BATCH.min(n_batch), n_batch)
    }

    /// Whether adding `add` tokens of one more prompt to a batch that already holds `prompts`
    /// prompts gets them their first tokens sooner in total than running it in a batch of its own
    /// right after. With a batch costing `fixed + per_token * n`, sharing delays the `prompts`
    /// already in by `per_token * add` each and saves the newcomer a whole `fixed`: it pays when
    /// `prompts * per_token * add <= fixed`. Until timings of two sizes exist, sharing is tried
    /// (which also times a larger batch).
    pub(super) fn sharing_pays(&self, prompts: usize, add: usize) -> bool {
        self.fit()
            .is_none_or(|(fixed, per_token)| prompts as f64 * per_token * add as f64 <= fixed)
    }
}

/// The tokens each chosen prompt contributes to the next batch, as `(index into pending, tokens)`
/// in batch order. `waiting[i]` is `(remaining tokens, batches passed over)` of prompt `i`, in
/// arrival order. The first pick is the prompt passed over longest once it reaches
/// [`MAX_PASSED_OVER`], otherwise the one with the fewest tokens left (earliest on a tie); further
/// prompts, in the same order, join while tokens remain in `n_batch` and `share` allows.
pub(super) fn plan(
    waiting: &[(usize, u32)],
    n_batch: usize,
    mut share: impl FnMut(usize, usize) -> bool,
) -> Vec<(usize, usize)> {
    let mut order: Vec<usize> = (0..waiting.len()).collect();
    order.sort_by_key(|&i| {
        let (remaining, passed) = waiting[i];
        let overdue = passed >= MAX_PASSED_OVER;
        // Overdue prompts first, longest passed over first; then shortest remaining.
        (
            !overdue,
            if overdue { u32::MAX - passed } else { 0 },
            remaining,
            i,
        )
    });
    let mut picked = Vec::new();
    let mut room = n_batch;
    for i in order {
        if room == 0 {
            break;
        }
        let take = waiting[i].0.min(room);
        if take == 0 || (!picked.is_empty() && !share(picked.len(), take)) {
            continue;
        }
        picked.push((i, take));
        room -= take;
    }
    picked
}

impl Worker<'_> {
    /// Checks a prompt and empties its sequence; the prompt then runs in prefill batches between
    /// decode steps (`prefill_batch`), so generating sequences keep going.
    pub(super) fn begin_prefill(&mut self, seq: i32, tokens: &[i32]) -> Result<usize, EngineError> {
        let slot = self.slot(seq)?;
        if tokens.is_empty() {
            return Err(EngineError::InvalidRequest("empty prompt".into()));
        }
        let room = self.config.layout.n_ctx_seq as usize;
        if tokens.len() >= room {
            return Err(EngineError::InvalidRequest(format!(
                "prompt of {} tokens does not fit the context of {room} tokens per sequence",
                tokens.len()
            )));
        }
        self.model.check_tokens(tokens)?;
        self.clear(seq)?;
        Ok(slot)
    }

    /// Runs one prefill batch: the next tokens of the prompts [`plan`] picks, each in its own
    /// sequence. A prompt whose last token ran gets its output token 0 from that token's logits;
    /// the others wait for the next batch. The cache a prompt ends with does not depend on how its
    /// tokens were split or what shared its batches (`tests/batching.rs` checks it).
    pub(super) fn prefill_batch(&mut self) {
        self.drop_cancelled();
        if self.pending.is_empty() {
            return;
        }
        let waiting: Vec<(usize, u32)> = self
            .pending
            .iter()
            .map(|p| (p.remaining(), p.passed_over))
            .collect();
        let policy = self.config.prefill_batching;
        let cost = &self.prefill_cost;
        let n_batch = self.config.n_batch as usize;
        let room = match policy {
            PrefillBatching::Adaptive => cost.batch_tokens(n_batch),
            PrefillBatching::Always | PrefillBatching::Never => n_batch,
        };
        let picked = plan(&waiting, room, |n, add| match policy {
            PrefillBatching::Always => true,
            PrefillBatching::Never => false,
            PrefillBatching::Adaptive => cost.sharing_pays(n, add),
        });
        let total: usize = picked.iter().map(|&(_, n)| n).sum();
        let started = Instant::now();
        let ran = self.decode_picked(&picked, total);
        for p in self.pending.iter_mut() {
            p.passed_over += 1;
        }
        // Prompts that leave now, by index into `pending`, with the batch row of their last token.
        let leaving: Vec<(usize, Result<i32, String>)> = match ran {
            Ok(rows) => {
                self.prefill_cost
                    .record(total, started.elapsed().as_secs_f64());
                metrics::histogram!("exo_prefill_batch_prompts").record(picked.len() as f64);
                let mut finished = Vec::new();
                for (&(i, take), row) in picked.iter().zip(rows) {
                    let p = &mut self.pending[i];
                    p.passed_over = 0;
                    p.done += take;
                    if let Some(row) = row {
                        finished.push((i, Ok(row)));
                    }
                    self.send_piece(i);
                }
                finished
            }
            Err(e) => picked
                .iter()
                .map(|&(i, _)| (i, Err(e.to_string())))
                .collect(),
        };
        self.finish_prompts(leaving);
    }

    /// Prompts whose caller went away (request cancelled) leave, with what they left behind.
    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].reply.is_closed() {
                let seq = self.pending[i].seq;
                self.pending.remove(i);
                let _ = self
                    .ctx
                    .clear_kv_cache_seq(u32::try_from(seq).ok(), None, None);
            } else {
                i += 1;
            }
        }
    }

    /// Ends the prompts in `leaving` (index into `pending`, and the batch row of their last token
    /// or why the batch failed): token 0 for those that finished, the error for the others.
    fn finish_prompts(&mut self, mut leaving: Vec<(usize, Result<i32, String>)>) {
        // Remove from the back so the indices still to come stay valid.
        leaving.sort_by_key(|&(i, _)| std::cmp::Reverse(i));
        for (i, row) in leaving {
            let Some(mut p) = self.pending.remove(i) else {
                continue;
            };
            let result = match row {
                Ok(row) => self.first_token(&mut p, row),
                Err(why) => {
                    let _ = self
                        .ctx
                        .clear_kv_cache_seq(u32::try_from(p.seq).ok(), None, None);
                    Err(EngineError::Decode(why))
                }
            };
            let done = result.is_ok();
            // Token 0 goes out first; a streamed prompt's whole cache follows in this same turn,
            // before any command (the slot's clearing among them) is served.
            let _ = p.reply.send(result);
            if done && let Some(stream) = p.stream.take() {
                self.send_final(p.seq, stream);
            }
        }
    }

    /// Hands a streamed prompt's whole cache over as its final piece; a failed export ends the
    /// stream without it (the hand-off then fails with a clear reason).
    fn send_final(&mut self, seq: i32, stream: PieceStream) {
        match self.export(seq) {
            // A receiver that went away is the hand-off's to report, not the prefill's.
            Ok(kv) => {
                let _ = stream.tx.send(KvPiece::Final(kv));
            }
            Err(e) => tracing::warn!(seq, error = %e, "could not export a prompt's cache"),
        }
    }

    /// Decodes the picked chunks in one batch; for each picked prompt, the batch row of its last
    /// token when this batch finishes it.
    fn decode_picked(
        &mut self,
        picked: &[(usize, usize)],
        total: usize,
    ) -> Result<Vec<Option<i32>>, EngineError> {
        let mut batch = LlamaBatch::new(total.max(1), 1);
        let mut rows = Vec::with_capacity(picked.len());
        for &(i, take) in picked {
            let p = &self.pending[i];
            let last = p.done + take == p.tokens.len();
            for (k, &t) in p.tokens[p.done..p.done + take].iter().enumerate() {
                let pos = i32::try_from(p.done + k)
                    .map_err(|_| EngineError::InvalidRequest("position overflow".into()))?;
                let logits = last && k + 1 == take;
                batch
                    .add(LlamaToken(t), pos, &[p.seq], logits)
                    .map_err(|e| EngineError::Decode(e.to_string()))?;
            }
            rows.push(last.then(|| batch.n_tokens() - 1));
        }
        self.ctx
            .decode(&mut batch)
            .map_err(|e| EngineError::Decode(e.to_string()))?;
        Ok(rows)
    }

    /// Output token 0 of a prompt that just finished, from the logits of batch row `row`; the
    /// prompt's tokens become its sequence's.
    fn first_token(&mut self, p: &mut Pending, row: i32) -> Result<PrefillOutput, EngineError> {
        let first_token = choose(&self.ctx, row, &p.sampling, 0, p.matcher.as_mut())?;
        let n_prompt = p.tokens.len();
        self.seq_tokens[p.slot] = std::mem::take(&mut p.tokens);
        Ok(PrefillOutput {
            first_token,
            n_prompt,
        })
    }

    /// Sends the cells a streamed prompt's batches added since its last piece, once there are at
    /// least its `every`. A failed export ends the stream early (the hand-off then fails with it);
    /// the prompt itself goes on.
    fn send_piece(&mut self, i: usize) {
        let Some(p) = self.pending.get(i) else {
            return;
        };
        let (seq, done) = (p.seq, p.done);
        let due = p
            .stream
            .as_ref()
            .is_some_and(|s| done < p.tokens.len() && done - s.sent >= s.every);
        if !due {
            return;
        }
        let sent = p.stream.as_ref().map_or(0, |s| s.sent);
        let piece = self.export_cells(seq, done).and_then(|state| {
            let shape = self.shape()?;
            Ok(shape.cut(&state, sent as u32..done as u32)?)
        });
        let Some(p) = self.pending.get_mut(i) else {
            return;
        };
        match piece {
            Ok(bytes) => {
                if let Some(s) = p.stream.as_mut() {
                    let _ = s.tx.send(KvPiece::Segment { first: sent, bytes });
                    s.sent = done;
                }
            }
            Err(e) => {
                tracing::warn!(seq, error = %e, "could not export part of a prompt's cache");
                p.stream = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_first_and_fills_the_batch() {
        let waiting = [(1500, 0), (60, 0), (40, 0), (60, 0)];
        // Sharing allowed: shortest first, ties in arrival order, the long one takes what is left.
        let all = plan(&waiting, 512, |_, _| true);
        assert_eq!(all, vec![(2, 40), (1, 60), (3, 60), (0, 352)]);
        // Sharing refused: the shortest alone.
        assert_eq!(plan(&waiting, 512, |_, _| false), vec![(2, 40)]);
    }

    #[test]
    fn a_prompt_passed_over_long_enough_goes_first() {
        let waiting = [(1500, MAX_PASSED_OVER), (60, 0), (20, MAX_PASSED_OVER + 3)];
        assert_eq!(plan(&waiting, 512, |_, _| false), vec![(2, 20)]);
        assert_eq!(plan(&waiting[..2], 512, |_, _| false), vec![(0, 512)]);
        assert_eq!(
            plan(&[(1500, MAX_PASSED_OVER - 1), (60, 0)], 512, |_, _| false),
            vec![(1, 60)]
        );
    }

    #[test]
    fn cost_model_batches_where_a_batch_has_a_large_fixed_cost() {
        let mut cpu = PrefillCost::default();
        let mut gpu = PrefillCost::default();
        // Untimed: try sharing.
        assert!(cpu.sharing_pays(3, 60));
        for n in [60usize, 480, 60, 480, 120] {
            // CPU: 5 ms a batch, 2 ms a token. GPU: 8 ms a batch, 5 µs a token.
            cpu.record(n, 0.005 + 0.002 * n as f64);
            gpu.record(n, 0.008 + 0.000_005 * n as f64);
        }
        // On the CPU a 60-token prompt runs alone; one of a token or two joins one or two others.
        assert!(!cpu.sharing_pays(1, 60));
        assert!(cpu.sharing_pays(1, 2));
        assert!(cpu.sharing_pays(2, 1));
        assert!(!cpu.sharing_pays(3, 1));
        // On the GPU eight 60-token prompts share a batch, eight 512-token chunks do not.
        assert!(gpu.sharing_pays(7, 60));
        assert!(!gpu.sharing_pays(7, 512 * 8));
        // Batch size: the CPU's fixed cost is 10% of a 23-token batch (clamped up to 64); the GPU's
        // of a 14,400-token one (clamped down to n_batch).
        assert_eq!(cpu.batch_tokens(512), 64);
        assert_eq!(cpu.batch_tokens(32), 32);
        assert_eq!(gpu.batch_tokens(512), 512);
        assert_eq!(PrefillCost::default().batch_tokens(512), 512);
        let mut slow_start = PrefillCost::default();
        slow_start.record(100, 0.05 + 0.001 * 100.0);
        slow_start.record(300, 0.05 + 0.001 * 300.0);
        // 0.05 * 0.9 / (0.1 * 0.001) = 450, give or take the float rounding of the fit.
        assert!((450..=451).contains(&slow_start.batch_tokens(2048)));
    }

    #[test]
    fn cost_model_needs_two_sizes_keeps_its_line_and_forgets_old_batches() {
        let mut c = PrefillCost::default();
        for _ in 0..10 {
            c.record(60, 0.1);
        }
        assert_eq!(c.fit(), None);
        c.record(120, 0.3);
        assert!(c.fit().is_some());
        // A window of one size keeps the last line learned.
        for _ in 0..COST_WINDOW {
            c.record(64, 0.2);
        }
        let kept = c.fit();
        assert!(kept.is_some());
        c.record(64, 0.25);
        assert_eq!(c.fit(), kept);
        for _ in 0..COST_WINDOW {
            c.record(100, 0.2);
            c.record(400, 0.8);
        }
        let (fixed, per_token) = c.fit().unwrap_or((f64::NAN, f64::NAN));
        assert!(
            fixed.abs() < 1e-9 && (per_token - 0.002).abs() < 1e-9,
            "{fixed} {per_token}"
        );
        assert_eq!(c.samples.len(), COST_WINDOW);
    }
}
