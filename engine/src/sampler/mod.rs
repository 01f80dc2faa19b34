//! Choosing the next token from a context's logits, reproducibly across machines: the request's
//! logit bias and penalties ([`adjust`]), its constraint, the filters and the seeded draw, and the
//! chosen token's log probability when asked for ([`logprobs`]).

use exo_sampling::{SamplingParams, TokenLogprob, TopLogprob};
use llama_cpp_2::context::LlamaContext;
use llguidance::Matcher;

use crate::constraint::advance;
use crate::error::EngineError;

mod dist;

/// The random bits of the draw for output token `index` of a request seeded with `seed`
/// (splitmix64).
///
/// Any node that knows the request's seed and how many tokens came before draws the same token from
/// the same logits: no RNG state has to travel with the KV cache.
pub fn draw_bits(seed: u64, index: u32) -> u64 {
    let mut z = seed ^ (u64::from(index).wrapping_add(1)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A chosen token and, when the request asked, its log probability and the likeliest
/// alternatives as token ids (the caller adds their bytes: [`Chosen::logprob`]).
pub(crate) struct Chosen {
    pub(crate) token: i32,
    logprobs: Option<(f32, Vec<(i32, f32)>)>,
}

impl Chosen {
    /// The token's log probability with the bytes of every token named, when asked for.
    pub(crate) fn logprob(&self, bytes: impl Fn(i32) -> Vec<u8>) -> Option<TokenLogprob> {
        let (logprob, top) = self.logprobs.as_ref()?;
        Some(TokenLogprob {
            token: self.token,
            bytes: bytes(self.token),
            logprob: *logprob,
            top: top
                .iter()
                .map(|&(token, logprob)| TopLogprob {
                    token,
                    bytes: bytes(token),
                    logprob,
                })
                .collect(),
        })
    }
}

/// Picks output token `index` from the logits of batch row `row`, after the request's logit bias
/// and its penalties over `output` (the tokens generated before this one). With a constraint,
/// tokens it does not allow are removed first (before top-k/top-p, so they can never empty the
/// choice), and the matcher then advances over the chosen token.
pub(crate) fn choose(
    ctx: &LlamaContext<'_>,
    row: i32,
    p: &SamplingParams,
    index: u32,
    matcher: Option<&mut Matcher>,
    output: &[i32],
) -> Result<Chosen, EngineError> {
    let raw = ctx.get_logits_ith(row);
    if !p.adjusts_logits() {
        return choose_from(raw, p, index, matcher);
    }
    ADJUSTED.with_borrow_mut(|buf| {
        adjust(raw, p, output, buf);
        choose_from(buf, p, index, matcher)
    })
}

/// [`choose`] over logits already adjusted.
fn choose_from(
    logits: &[f32],
    p: &SamplingParams,
    index: u32,
    mut matcher: Option<&mut Matcher>,
) -> Result<Chosen, EngineError> {
    let mask = match matcher.as_deref_mut() {
        Some(m) => Some(
            m.compute_mask_or_eos()
                .map_err(|e| EngineError::Decode(format!("constraint: {e}")))?,
        ),
        None => None,
    };
    let allowed = |id: usize| {
        mask.as_ref()
            .is_none_or(|m| u32::try_from(id).is_ok_and(|t| m.is_allowed(t)))
    };
    let token = if p.temperature <= 0.0 {
        if mask.is_none() {
            argmax_all(logits)?
        } else {
            argmax(logits, allowed)?
        }
    } else {
        sample(logits, p, index, mask.is_some(), allowed)?
    };
    if let Some(m) = matcher {
        advance(m, token)?;
    }
    let logprobs = p.logprobs.map(|n| logprobs(logits, token, usize::from(n)));
    Ok(Chosen { token, logprobs })
}

/// `raw` with the request's logit bias added and its penalties applied for the tokens of
/// `output`, into `buf`: the repetition penalty first (a positive logit divided by it, a negative
/// one multiplied), then the frequency penalty per occurrence and the presence penalty once, as
/// llama.cpp's penalties sampler applies them. Ids outside the vocabulary are skipped (nodes refuse
/// them before a request starts).
fn adjust(raw: &[f32], p: &SamplingParams, output: &[i32], buf: &mut Vec<f32>) {
    buf.clear();
    buf.extend_from_slice(raw);
    let slot = |t: i32| usize::try_from(t).ok().filter(|&i| i < raw.len());
    for &(t, bias) in &p.logit_bias {
        if let Some(i) = slot(t) {
            buf[i] += bias;
        }
    }
    let mut counts: Vec<(i32, u32)> = Vec::new();
    let mut sorted = output.to_vec();
    sorted.sort_unstable();
    for t in sorted {
        match counts.last_mut() {
            Some((last, n)) if *last == t => *n += 1,
            _ => counts.push((t, 1)),
        }
    }
    for (t, n) in counts {
        let Some(i) = slot(t) else { continue };
        let l = buf[i];
        let l = if l > 0.0 {
            l / p.repetition_penalty
        } else {
            l * p.repetition_penalty
        };
        buf[i] = l - p.frequency_penalty * n as f32 - p.presence_penalty;
    }
}

/// The log probability of `token` and of the `n` likeliest tokens (most likely first, ties to the
/// lower id) under `logits` at temperature 1: log-softmax, summed in f64 in id order.
fn logprobs(logits: &[f32], token: i32, n: usize) -> (f32, Vec<(i32, f32)>) {
    let max = dist::max(logits);
    let sum: f64 = logits
        .iter()
        .filter(|l| !l.is_nan())
        .map(|&l| f64::from(l - max).exp())
        .sum();
    let lse = f64::from(max) + sum.ln();
    let lp = |l: f32| (f64::from(l) - lse) as f32;
    let mut top: Vec<(i32, f32)> = Vec::with_capacity(n + 1);
    if n > 0 {
        for (i, &l) in logits.iter().enumerate() {
            let beats = top.len() < n || top.last().is_some_and(|&(_, worst)| l > worst);
            if l.is_nan() || !beats {
                continue;
            }
            let at = top.partition_point(|&(_, x)| x >= l);
            top.insert(at, (i32::try_from(i).unwrap_or(i32::MAX), l));
            top.truncate(n);
        }
    }
    let chosen = usize::try_from(token)
        .ok()
        .and_then(|i| logits.get(i))
        .map_or(f32::NEG_INFINITY, |&l| lp(l));
    (chosen, top.into_iter().map(|(t, l)| (t, lp(l))).collect())
}

fn sample(
    logits: &[f32],
    p: &SamplingParams,
    index: u32,
    masked: bool,
    allowed: impl Fn(usize) -> bool,
) -> Result<i32, EngineError> {
    let u = dist::uniform(draw_bits(p.seed, index));
    let filtered = masked || p.top_k > 0 || p.top_p < 1.0 || p.min_p > 0.0;
    WEIGHTS
        .with_borrow_mut(|w| {
            if !filtered {
                // The whole vocabulary in id order: no candidate array at all.
                dist::weights(logits, p.temperature, w);
                return dist::pick(w, u).and_then(|i| i32::try_from(i).ok());
            }
            let kept = candidates(logits, p, allowed);
            let kept_logits: Vec<f32> = kept.iter().map(|&(_, l)| l).collect();
            dist::weights(&kept_logits, p.temperature, w);
            dist::pick(w, u).map(|i| kept[i].0)
        })
        .ok_or_else(|| EngineError::Decode("no token can be drawn".into()))
}

/// The tokens a filtered draw chooses among, as (id, logit), in the order the draw walks them:
/// allowed by the constraint, then top-k, top-p and min-p as llama.cpp applies them (on the logits
/// before temperature). Sorted by logit, highest first, ties to the lower id: a total order, so the
/// result does not depend on the sorting algorithm.
fn candidates(
    logits: &[f32],
    p: &SamplingParams,
    allowed: impl Fn(usize) -> bool,
) -> Vec<(i32, f32)> {
    let mut c: Vec<(i32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|&(i, l)| !l.is_nan() && allowed(i))
        .filter_map(|(i, &l)| i32::try_from(i).ok().map(|id| (id, l)))
        .collect();
    c.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if p.top_k > 0 {
        c.truncate(usize::try_from(p.top_k).unwrap_or(usize::MAX));
    }
    let Some(&(_, top)) = c.first() else {
        return c;
    };
    if p.top_p < 1.0 {
        // The smallest prefix whose probability (temperature 1) reaches top_p; at least one token.
        let mut w = Vec::new();
        let kept_logits: Vec<f32> = c.iter().map(|&(_, l)| l).collect();
        dist::weights(&kept_logits, 1.0, &mut w);
        let total: f32 = w.iter().sum();
        let mut run = 0.0f32;
        let keep = w
            .iter()
            .position(|&x| {
                run += x;
                run >= p.top_p * total
            })
            .map_or(c.len(), |i| i + 1);
        c.truncate(keep.max(1));
    }
    if p.min_p > 0.0 {
        // Probability at least min_p times the most likely token's: logit >= top + ln(min_p).
        let floor = top + p.min_p.ln();
        c.retain(|&(_, l)| l >= floor);
    }
    c
}

thread_local! {
    /// The draw's weights, one buffer per engine thread, reused every step.
    static WEIGHTS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The logits after a request's bias and penalties, one buffer per engine thread.
    static ADJUSTED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`argmax`] with every token allowed, in a form the compiler vectorises: the largest logit first
/// ([`dist::max`], 16 lanes at a time), then the first token that has it. It runs once per sequence
/// per step over the whole vocabulary, so it is on the decode loop's critical path.
fn argmax_all(logits: &[f32]) -> Result<i32, EngineError> {
    let max = dist::max(logits);
    logits
        .iter()
        .position(|&l| l == max)
        .and_then(|i| i32::try_from(i).ok())
        .ok_or_else(|| EngineError::Decode("no token has a comparable logit".into()))
}

/// Greedy choice: the highest logit among allowed tokens, ties to the lowest token id.
fn argmax(logits: &[f32], allowed: impl Fn(usize) -> bool) -> Result<i32, EngineError> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if allowed(i) && best.is_none_or(|(_, b)| l > b) {
            best = Some((i, l));
        }
    }
    best.and_then(|(i, _)| i32::try_from(i).ok())
        .ok_or_else(|| EngineError::Decode("no allowed token".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draw_bits_differ_by_index_and_seed_and_are_stable() {
        assert_ne!(draw_bits(1, 0), draw_bits(1, 1));
        assert_ne!(draw_bits(1, 0), draw_bits(2, 0));
        assert_eq!(draw_bits(42, 7), draw_bits(42, 7));
    }

    fn params(temperature: f32, top_k: u32, top_p: f32, min_p: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            seed: 7,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn filters_keep_what_llama_cpp_keeps() {
        // Probabilities at temperature 1: 0.4, 0.3, 0.2, 0.1 for ids 3, 2, 1, 0.
        let logits: Vec<f32> = [1.0f32, 2.0, 3.0, 4.0].iter().map(|v| v.ln()).collect();
        let ids = |p: &SamplingParams| -> Vec<i32> {
            candidates(&logits, p, |_| true)
                .iter()
                .map(|&(id, _)| id)
                .collect()
        };
        assert_eq!(ids(&params(1.0, 0, 1.0, 0.0)), [3, 2, 1, 0]);
        assert_eq!(ids(&params(1.0, 2, 1.0, 0.0)), [3, 2]);
        assert_eq!(ids(&params(1.0, 0, 0.65, 0.0)), [3, 2]);
        assert_eq!(ids(&params(1.0, 0, 0.75, 0.0)), [3, 2, 1]);
        assert_eq!(ids(&params(1.0, 0, 0.01, 0.0)), [3]);
        // min_p 0.5: tokens at least half as likely as the top one (0.4): 0.4, 0.3, 0.2.
        assert_eq!(ids(&params(1.0, 0, 1.0, 0.5)), [3, 2, 1]);
        let masked: Vec<i32> = candidates(&logits, &params(1.0, 0, 1.0, 0.0), |i| i != 3)
            .iter()
            .map(|&(id, _)| id)
            .collect();
        assert_eq!(masked, [2, 1, 0]);
    }

    #[test]
    fn sampling_is_reproducible_and_stays_inside_the_filters() {
        let logits: Vec<f32> = (0..49_152)
            .map(|i| ((i * 7919) % 997) as f32 / 100.0)
            .collect();
        let mut seen = std::collections::HashSet::new();
        for index in 0..200 {
            let full = params(0.8, 0, 1.0, 0.0);
            let a = sample(&logits, &full, index, false, |_| true).unwrap();
            assert_eq!(a, sample(&logits, &full, index, false, |_| true).unwrap());
            seen.insert(a);
            let k = sample(&logits, &params(0.8, 5, 1.0, 0.0), index, false, |_| true).unwrap();
            let top5: Vec<i32> = candidates(&logits, &params(1.0, 5, 1.0, 0.0), |_| true)
                .iter()
                .map(|&(id, _)| id)
                .collect();
            assert!(top5.contains(&k), "{k} not in {top5:?}");
            let odd = sample(&logits, &full, index, true, |i| i % 2 == 1).unwrap();
            assert_eq!(odd % 2, 1);
        }
        // A full-vocabulary draw at temperature 0.8 over near-flat logits is not stuck on one token.
        assert!(seen.len() > 50, "{}", seen.len());
        assert!(sample(&logits, &params(0.8, 0, 1.0, 0.0), 0, true, |_| false).is_err());
    }

    #[test]
    fn bias_and_penalties_change_the_logits_as_llama_cpp_does() {
        let raw = [2.0f32, -1.0, 0.5, 3.0];
        let p = SamplingParams {
            logit_bias: vec![(2, 10.0), (99, 5.0)],
            repetition_penalty: 2.0,
            frequency_penalty: 0.25,
            presence_penalty: 0.5,
            ..SamplingParams::default()
        };
        let mut buf = Vec::new();
        // Token 0 twice, token 1 once; 2 biased; 3 untouched; 99 is outside the vocabulary.
        adjust(&raw, &p, &[0, 1, 0], &mut buf);
        assert_eq!(buf, [2.0 / 2.0 - 0.5 - 0.5, -2.0 - 0.25 - 0.5, 10.5, 3.0]);
        // Greedy follows the bias: token 2 now has the highest logit.
        assert_eq!(argmax_all(&buf).ok(), Some(2));
    }

    #[test]
    fn logprobs_are_a_log_softmax_with_the_likeliest_first() {
        let logits = [1.0f32, 3.0, 3.0, -2.0, f32::NAN, 0.0];
        let (chosen, top) = logprobs(&logits, 1, 3);
        let total: f64 = [1.0f64, 3.0, 3.0, -2.0, 0.0].iter().map(|l| l.exp()).sum();
        let expected = (3.0 - total.ln()) as f32;
        assert!((chosen - expected).abs() < 1e-6, "{chosen} {expected}");
        let ids: Vec<i32> = top.iter().map(|&(t, _)| t).collect();
        assert_eq!(ids, [1, 2, 0]);
        assert_eq!(top[0].1, chosen);
        let (_, all) = logprobs(&logits, 0, logits.len());
        let mass: f64 = all.iter().map(|&(_, lp)| f64::from(lp).exp()).sum();
        assert!((mass - 1.0).abs() < 1e-5, "{mass}");
        assert!(logprobs(&logits, 0, 0).1.is_empty());
    }

    #[test]
    fn argmax_takes_the_first_of_equal_maxima() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0], |_| true).ok(), Some(1));
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0], |i| i != 1).ok(), Some(2));
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0], |i| i == 3).ok(), Some(3));
        assert!(argmax(&[], |_| true).is_err());
        assert!(argmax(&[1.0], |_| false).is_err());
    }

    #[test]
    fn argmax_all_agrees_with_argmax_on_every_shape() {
        // Lengths around the lane width, the maximum at every place, ties, and the vocabulary size.
        for n in [1usize, 15, 16, 17, 33, 49_152] {
            for at in [0, n / 2, n - 1] {
                let mut logits: Vec<f32> =
                    (0..n).map(|i| ((i * 7919) % 1000) as f32 / 100.0).collect();
                logits[at] = 20.0;
                assert_eq!(
                    argmax_all(&logits).ok(),
                    argmax(&logits, |_| true).ok(),
                    "n {n} at {at}"
                );
                let last = n - 1;
                logits[last] = 20.0;
                assert_eq!(
                    argmax_all(&logits).ok(),
                    Some(at as i32),
                    "tie at {at} and {last}"
                );
            }
        }
        assert_eq!(
            argmax_all(&[f32::NEG_INFINITY, f32::NEG_INFINITY]).ok(),
            Some(0)
        );
        assert_eq!(argmax_all(&[f32::NAN, 1.0, f32::NAN]).ok(), Some(1));
        assert!(argmax_all(&[]).is_err());
        assert!(argmax_all(&[f32::NAN]).is_err());
    }
}
