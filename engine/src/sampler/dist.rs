//! Drawing a token from logits at a temperature, in plain arithmetic the compiler vectorises.
//!
//! llama.cpp's samplers copy the whole vocabulary into a candidate array for every sequence at every
//! step and draw with the C++ standard library's random distributions, whose results differ between
//! standard libraries (libstdc++ on Linux, libc++ on macOS). This module works on the logits slice
//! directly, computes `exp` with a fixed polynomial (only IEEE additions and multiplications, so every
//! machine gets the same bits), sums in a fixed order, and draws with a seed-derived uniform number:
//! the same logits, seed and output index give the same token on any node.

/// Lanes of the partial sums: the order of every floating-point sum is fixed by it.
const LANES: usize = 16;

/// Tokens per block of the cumulative scan that finds the drawn token.
const BLOCK: usize = 1024;

/// `2^x` for `x <= 0` (results below 2^-126 are 0): Cody-Waite split into integer and fraction, and
/// a degree-7 Taylor polynomial for `2^f` on [0, 1) (relative error below 3e-6), exact and identical on
/// every IEEE machine.
#[inline]
fn exp2_neg(x: f32) -> f32 {
    let x = x.max(-126.0);
    // floor(x) by truncation and a correction: a conversion every x86-64 CPU vectorises (SSE2),
    // where `f32::floor` needs SSE4.1 or becomes a library call per element.
    let t = x as i32;
    let xi = if (t as f32) > x { t - 1 } else { t };
    let f = x - xi as f32;
    let p = 1.0
        + f * (std::f32::consts::LN_2
            + f * (0.240_226_5
                + f * (0.055_504_11
                    + f * (0.009_618_129
                        + f * (0.001_333_355 + f * (0.000_154_035_3 + f * 0.000_015_252_73))))));
    // xi is in [-126, 0], so the exponent field stays in 1..=127.
    let scale = f32::from_bits(((xi + 127) as u32) << 23);
    scale * p
}

/// The largest value of `xs` (NaNs ignored; `-inf` when there is none).
pub(super) fn max(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            *m = if x > *m { x } else { *m };
        }
    }
    lanes
        .iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// Sum in 16 fixed lanes, then the lanes in order: vectorised, and the same bits everywhere.
fn sum(xs: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (s, &x) in lanes.iter_mut().zip(chunk) {
            *s += x;
        }
    }
    lanes.iter().chain(rest).fold(0.0, |s, &x| s + x)
}

/// Writes the unnormalised probabilities `exp((logit - max) / temperature)` of `logits` into
/// `weights` (NaN logits get weight 0).
pub(super) fn weights(logits: &[f32], temperature: f32, weights: &mut Vec<f32>) {
    let top = max(logits);
    let k = std::f32::consts::LOG2_E / temperature;
    weights.clear();
    weights.extend(logits.iter().map(|&l| {
        let w = exp2_neg((l - top) * k);
        if w.is_nan() { 0.0 } else { w }
    }));
}

/// The position whose weight a uniform draw `u` in [0, 1) lands on: the first position where the
/// running sum passes `u` times the total. Block sums find the block, a scan inside it the position;
/// `None` when every weight is 0.
pub(super) fn pick(weights: &[f32], u: f64) -> Option<usize> {
    let blocks: Vec<f32> = weights.chunks(BLOCK).map(sum).collect();
    let total: f32 = blocks.iter().sum();
    // Also catches a NaN total.
    if total.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
        return None;
    }
    let target = (u * f64::from(total)) as f32;
    let mut before = 0.0f32;
    let mut last_block = 0;
    for (b, &s) in blocks.iter().enumerate() {
        if s > 0.0 {
            last_block = b;
        }
        if before + s > target && s > 0.0 {
            return Some(b * BLOCK + scan(&weights[b * BLOCK..], target - before));
        }
        before += s;
    }
    // Rounding left the target at the very end: the last token with any weight.
    let start = last_block * BLOCK;
    let block = &weights[start..(start + BLOCK).min(weights.len())];
    block.iter().rposition(|&w| w > 0.0).map(|i| start + i)
}

/// Inside one block: the first position where the running sum passes `target`, else the last
/// position with any weight (the block's sum and the running sum round differently).
fn scan(block: &[f32], target: f32) -> usize {
    let block = &block[..block.len().min(BLOCK)];
    let mut run = 0.0f32;
    let mut last = 0;
    for (i, &w) in block.iter().enumerate() {
        if w > 0.0 {
            last = i;
            run += w;
            if run > target {
                return i;
            }
        }
    }
    last
}

/// A uniform number in [0, 1) from a 64-bit seed (its top 53 bits).
pub(super) fn uniform(bits: u64) -> f64 {
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp2_matches_the_library_closely() {
        let mut x = -126.0f32;
        while x <= 0.0 {
            let (ours, lib) = (exp2_neg(x), x.exp2());
            assert!(((ours - lib) / lib).abs() < 3e-6, "x {x}: {ours} vs {lib}");
            x += 0.013;
        }
        assert_eq!(exp2_neg(0.0), 1.0);
        assert_eq!(exp2_neg(-1000.0), exp2_neg(-126.0));
        assert_eq!(exp2_neg(f32::NEG_INFINITY), exp2_neg(-126.0));
    }

    #[test]
    fn pick_follows_the_cumulative_weights() {
        let w = [0.0, 1.0, 0.0, 3.0];
        assert_eq!(pick(&w, 0.0), Some(1));
        assert_eq!(pick(&w, 0.24), Some(1));
        assert_eq!(pick(&w, 0.26), Some(3));
        assert_eq!(pick(&w, 0.999_999), Some(3));
        assert_eq!(pick(&[0.0, 0.0], 0.5), None);
        // Across blocks: one heavy token in the third block.
        let mut big = vec![1e-3f32; 3 * BLOCK];
        big[2 * BLOCK + 5] = 1e6;
        assert_eq!(pick(&big, 0.5), Some(2 * BLOCK + 5));
        assert_eq!(pick(&big, 0.0), Some(0));
    }

    #[test]
    fn draws_follow_the_softmax() {
        // Logits ln(1), ln(2), ln(3), ln(4) at temperature 1: probabilities 0.1, 0.2, 0.3, 0.4.
        let logits: Vec<f32> = [1.0f32, 2.0, 3.0, 4.0].iter().map(|v| v.ln()).collect();
        let mut w = Vec::new();
        weights(&logits, 1.0, &mut w);
        let n = 10_000;
        let mut counts = [0usize; 4];
        for i in 0..n {
            let u = (f64::from(i) + 0.5) / f64::from(n);
            counts[pick(&w, u).unwrap_or(9)] += 1;
        }
        for (k, want) in [1000, 2000, 3000, 4000].iter().enumerate() {
            assert!(counts[k].abs_diff(*want) <= 2, "{counts:?}");
        }
        // A low temperature concentrates on the largest logit.
        weights(&logits, 0.05, &mut w);
        assert!(w[3] == 1.0 && w[2] < 0.01, "{w:?}");
    }
}
