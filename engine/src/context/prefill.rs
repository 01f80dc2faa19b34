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
use std::sync::atomic::Ordering;
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
    /// Output index of the token the prompt ends with (non-zero for a resumed request, whose last
    /// `first_index` prompt tokens are its earlier output).
    pub(super) first_index: u32,
    /// Tokens already in the cache.
    pub(super) done: usize,
    /// Of those, the ones an earlier prompt left in the slot (prefix reuse).
    pub(super) reused: usize,
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

    /// The most tokens of this prompt one batch may take: up to the end of the prompt proper,
    /// then one at a time through a resumed request's earlier output. That output was decoded
    /// one token per sequence per step where it was generated, and llama.cpp's arithmetic for a
    /// sequence's single token differs in the last bits from the same token among several of its
    /// sequence's ([`chunk`]; `tests/resume.rs` fails with one batch), so only the same shape
    /// reproduces the cache and the next tokens exactly.
    fn most_per_batch(&self) -> usize {
        let prompt = self.tokens.len() - self.first_index as usize;
        if self.done < prompt {
            prompt - self.done
        } else {
            1
        }
    }
}

/// What a prefill batch costs on this context, learned from the batches it ran: a robust line
/// `seconds = fixed + per_token * tokens` over the last [`COST_WINDOW`] batches.
#[derive(Debug, Default)]
pub(super) struct PrefillCost {
    samples: VecDeque<(f64, f64)>,
    /// The last line fitted; kept while the window holds batches of one size only (which the
    /// line's own batch sizing makes common).
    line: Option<(f64, f64)>,
}

impl PrefillCost {
    /// Remembers that a batch of `tokens` took `seconds`, unless a prompt in it had more cells in
    /// the cache before it than the batch adds (`context` is the most any had): a later chunk of a
    /// long prompt also pays attention over the chunks before it, a cost that grows with the
    /// context, not with the batch. Taken into the line, it read as fixed cost (on one CPU core,
    /// chunks 2,000 tokens into a prompt moved the fitted fixed cost from milliseconds to about
    /// 100 ms), and batches grew to 500 tokens, for a short prompt to wait behind. A prompt's first
    /// chunks, and the rest of a prompt that reused a short start, are timed.
    pub(super) fn record(&mut self, tokens: usize, seconds: f64, context: usize) {
        if context > tokens {
            return;
        }
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
    pub(super) fn fit(&self) -> Option<(f64, f64)> {
        self.line
    }

    /// A line through the window that one-off slow batches do not bend (on a GPU the first
    /// batch of each shape pays for kernel and library set-up, 20 times a warm batch): the
    /// median of the slopes between batches whose sizes are 2x or more apart (Theil-Sen), and the
    /// median of what each batch leaves for the fixed cost. None until two batches are 2x apart
    /// (a line through points of one size says nothing about the slope). Both parts are clamped
    /// at zero.
    fn line_through_window(&self) -> Option<(f64, f64)> {
        let mut slopes = Vec::new();
        for (i, &(x0, y0)) in self.samples.iter().enumerate() {
            for &(x1, y1) in self.samples.iter().skip(i + 1) {
                if x1 >= 2.0 * x0 || x0 >= 2.0 * x1 {
                    slopes.push((y1 - y0) / (x1 - x0));
                }
            }
        }
        let per_token = median(&mut slopes)?.max(0.0);
        let mut fixed: Vec<f64> = self
            .samples
            .iter()
            .map(|&(x, y)| y - per_token * x)
            .collect();
        Some((median(&mut fixed)?.max(0.0), per_token))
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

/// How many of a part's `left` tokens a batch with `room` tokens free takes: as many as fit, but
/// never a lone token of a longer part, neither now nor as the part's last chunk. llama.cpp
/// computes a sequence's attention for a single token (a matrix-vector product) with other
/// rounding than for two or more (a matrix product), so a prompt whose cut left one token alone
/// would end with another cache and other logits than the same prompt cut elsewhere
/// (`tests/resume.rs` and `tests/batching.rs` check the cache is the same however it is cut).
fn chunk(left: usize, room: usize) -> usize {
    let take = left.min(room);
    match left - take {
        // Leave two for the next batch rather than one.
        1 if take > 2 => take - 1,
        1 => 0,
        _ if take == 1 && left > 1 => 0,
        _ => take,
    }
}

/// The median of `values` (the mean of the middle two for an even count; None when empty),
/// reordering them.
fn median(values: &mut [f64]) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => values.get(n / 2).copied(),
        _ => Some((values.get(n / 2 - 1)? + values.get(n / 2)?) / 2.0),
    }
}

/// The tokens each chosen prompt contributes to the next batch, as `(index into pending, tokens)`
/// in batch order. `waiting[i]` is `(remaining tokens, batches passed over)` of prompt `i`, in
/// arrival order, and `most(i)` the most tokens it may put in one batch. The first pick is the
/// prompt passed over longest once it reaches [`MAX_PASSED_OVER`], otherwise the one with the
/// fewest tokens left (earliest on a tie); further prompts, in the same order, join with as many
/// tokens as the first while they have them, tokens remain in `n_batch` and `share` allows.
pub(super) fn plan(
    waiting: &[(usize, u32)],
    n_batch: usize,
    most: impl Fn(usize) -> usize,
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
    let mut picked: Vec<(usize, usize)> = Vec::new();
    let mut room = n_batch;
    for i in order {
        if room == 0 {
            break;
        }
        let part = waiting[i].0.min(most(i));
        let take = match picked.first() {
            None => chunk(part, room),
            // Prompts that join put in as many tokens as the first: llama.cpp runs a batch whose
            // sequences have unequal shares in pieces of equal shares (one KV stream per
            // sequence), and the last pieces can hold a sequence's lone token ([`chunk`]).
            Some(&(_, c)) if c <= room && (part == c || (c >= 2 && part >= c + 2)) => c,
            Some(_) => 0,
        };
        if take == 0 || (!picked.is_empty() && !share(picked.len(), take)) {
            continue;
        }
        picked.push((i, take));
        room -= take;
    }
    picked
}

/// Tokens in the next prefill batch under `policy`.
fn batch_room(policy: PrefillBatching, cost: &PrefillCost, n_batch: usize) -> usize {
    match policy {
        PrefillBatching::Adaptive => cost.batch_tokens(n_batch),
        PrefillBatching::Always | PrefillBatching::Never => n_batch,
    }
}

impl Worker<'_> {
    /// Checks a prompt and empties its sequence but for a start it may reuse (returned with the
    /// slot); the prompt then runs in prefill batches between decode steps (`prefill_batch`), so
    /// generating sequences keep going.
    pub(super) fn begin_prefill(
        &mut self,
        seq: i32,
        tokens: &[i32],
        resumed: usize,
    ) -> Result<(usize, usize), EngineError> {
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
        self.stop(seq);
        let keep = self.reusable_prefix(slot, tokens, resumed);
        if keep > 0 {
            // Drop the cells from `keep` on; llama.cpp says false where it cannot cut a sequence.
            let cut = self.ctx.clear_kv_cache_seq(
                u32::try_from(seq).ok(),
                u32::try_from(keep).ok(),
                None,
            );
            if cut == Ok(true) {
                self.seq_tokens[slot].truncate(keep);
                self.reusable[slot] = keep;
                return Ok((slot, keep));
            }
        }
        self.forget(seq)?;
        Ok((slot, 0))
    }

    /// Whether this context reuses a slot's cache for a prompt that starts the same way: only a
    /// plain attention cache (a sliding window has dropped old cells, a recurrent state cannot go
    /// back to an earlier position) and only where the configuration allows it.
    pub(super) fn reuses_prefixes(&self) -> bool {
        self.config.prefix_reuse
            && self
                .shape()
                .is_ok_and(|s| s.window.is_none() && s.recurrent.is_none())
    }

    /// The leading tokens of `tokens` (whose last `resumed` are earlier output) whose cache slot
    /// `slot` holds and that a prefill may keep: cells a prompt's chunks computed, bit for bit what
    /// computing them again would give (`tests/batching.rs` checks a prompt's cache is the same
    /// however it is cut), and never the whole prompt proper but two tokens (a last chunk of one
    /// token would be computed with other rounding, see `chunk`; resumed output runs one token a
    /// batch after it, as it did where it was generated).
    fn reusable_prefix(&self, slot: usize, tokens: &[i32], resumed: usize) -> usize {
        if !self.reuses_prefixes() {
            return 0;
        }
        let proper = tokens.len().saturating_sub(resumed);
        let held = &self.seq_tokens[slot];
        let limit = self.reusable[slot]
            .min(proper.saturating_sub(2))
            .min(held.len());
        super::slots::common_prefix(&held[..limit], tokens)
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
        let room = batch_room(policy, cost, n_batch);
        let pending = &self.pending;
        let most = |i: usize| pending.get(i).map_or(0, Pending::most_per_batch);
        let picked = plan(&waiting, room, most, |n, add| match policy {
            PrefillBatching::Always => true,
            PrefillBatching::Never => false,
            PrefillBatching::Adaptive => cost.sharing_pays(n, add),
        });
        let total: usize = picked.iter().map(|&(_, n)| n).sum();
        let context = picked
            .iter()
            .filter_map(|&(i, _)| self.pending.get(i).map(|p| p.done))
            .max()
            .unwrap_or(0);
        let started = Instant::now();
        let ran = self.decode_picked(&picked, total);
        for p in self.pending.iter_mut() {
            p.passed_over += 1;
        }
        // Prompts that leave now, by index into `pending`, with the batch row of their last token.
        let leaving: Vec<(usize, Result<i32, String>)> = match ran {
            Ok(rows) => {
                self.prefill_cost
                    .record(total, started.elapsed().as_secs_f64(), context);
                let next = batch_room(policy, &self.prefill_cost, n_batch);
                if next != self.batch_hint.load(Ordering::Relaxed) {
                    let line = self.prefill_cost.fit();
                    tracing::debug!(batch = next, ?line, total, context, "prefill batch size");
                }
                self.batch_hint.store(next, Ordering::Relaxed);
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
                let _ = self.forget(seq);
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
                Ok(row) => self.first_token(&mut p, row).inspect_err(|_| {
                    // Its cells are in the cache but no token list says so: start over.
                    let _ = self.forget(p.seq);
                }),
                Err(why) => {
                    let _ = self.forget(p.seq);
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
                tracing::debug!(
                    seq,
                    cells = kv.tokens.len(),
                    "KV exported whole after token 0"
                );
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
        // A resumed request's output so far ends its prompt.
        let output = &p.tokens[p.tokens.len().saturating_sub(p.first_index as usize)..];
        let chosen = choose(
            &self.ctx,
            row,
            &p.sampling,
            p.first_index,
            p.matcher.as_mut(),
            output,
        )?;
        let n_prompt = p.tokens.len();
        self.seq_tokens[p.slot] = std::mem::take(&mut p.tokens);
        self.reusable[p.slot] = n_prompt.saturating_sub(p.first_index as usize);
        metrics::counter!("exo_prefill_reused_tokens_total").increment(p.reused as u64);
        Ok(PrefillOutput {
            first_token: chosen.token,
            first_logprob: chosen.logprob(|t| self.model.token_bytes(t)),
            n_prompt,
            reused: p.reused,
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
        // A purely recurrent state has no cells to send early: it all goes after the prompt.
        let cells = self.shape().is_ok_and(|s| s.has_attention());
        if !due || !cells {
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
                tracing::debug!(seq, first = sent, cells = done - sent, "KV piece cut");
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
mod tests;
