//! Choosing the next token from a context's logits, reproducibly across machines.

use exo_sampling::SamplingParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::sampling::LlamaSampler;
use llguidance::Matcher;

use crate::constraint::advance;
use crate::error::EngineError;

/// The seed of the draw for output token `index` of a request seeded with `seed` (splitmix64).
///
/// Any node that knows the request's seed and how many tokens came before draws the same token from
/// the same logits: no RNG state has to travel with the KV cache.
pub fn draw_seed(seed: u64, index: u32) -> u32 {
    let mut z = seed ^ (u64::from(index).wrapping_add(1)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 32) as u32
}

/// Picks output token `index` from the logits of batch row `row`. With a constraint, tokens it
/// does not allow are removed first (before top-k/top-p, so they can never empty the choice), and
/// the matcher then advances over the chosen token.
pub(crate) fn choose(
    ctx: &LlamaContext<'_>,
    row: i32,
    p: &SamplingParams,
    index: u32,
    mut matcher: Option<&mut Matcher>,
) -> Result<i32, EngineError> {
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
            argmax_all(ctx.get_logits_ith(row))?
        } else {
            argmax(ctx.get_logits_ith(row), allowed)?
        }
    } else {
        sample(ctx, row, p, index, allowed)?
    };
    if let Some(m) = matcher {
        advance(m, token)?;
    }
    Ok(token)
}

fn sample(
    ctx: &LlamaContext<'_>,
    row: i32,
    p: &SamplingParams,
    index: u32,
    allowed: impl Fn(usize) -> bool,
) -> Result<i32, EngineError> {
    let mut candidates = ctx.token_data_array_ith(row);
    for d in &mut candidates.data {
        if !usize::try_from(d.id().0).is_ok_and(&allowed) {
            d.set_logit(f32::NEG_INFINITY);
        }
    }
    if p.top_k > 0 {
        candidates.apply_sampler(&mut LlamaSampler::top_k(
            i32::try_from(p.top_k).unwrap_or(i32::MAX),
        ));
    }
    if p.top_p < 1.0 {
        candidates.apply_sampler(&mut LlamaSampler::top_p(p.top_p, 1));
    }
    if p.min_p > 0.0 {
        candidates.apply_sampler(&mut LlamaSampler::min_p(p.min_p, 1));
    }
    candidates.apply_sampler(&mut LlamaSampler::temp(p.temperature));
    candidates.apply_sampler(&mut LlamaSampler::dist(draw_seed(p.seed, index)));
    candidates
        .selected_token()
        .map(|t| t.0)
        .ok_or_else(|| EngineError::Decode("sampler selected no token".into()))
}

/// [`argmax`] with every token allowed, in a form the compiler vectorises: the largest logit first
/// (16 lanes at a time), then the first token that has it. It runs once per sequence per step over
/// the whole vocabulary, so it is on the decode loop's critical path.
fn argmax_all(logits: &[f32]) -> Result<i32, EngineError> {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (m, &l) in lanes.iter_mut().zip(chunk) {
            *m = if l > *m { l } else { *m };
        }
    }
    let max = lanes
        .iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &l| if l > m { l } else { m });
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
    fn draw_seeds_differ_by_index_and_seed_and_are_stable() {
        assert_ne!(draw_seed(1, 0), draw_seed(1, 1));
        assert_ne!(draw_seed(1, 0), draw_seed(2, 0));
        assert_eq!(draw_seed(42, 7), draw_seed(42, 7));
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
