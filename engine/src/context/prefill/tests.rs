//! Unit tests of the prefill planner and its cost line.

use super::*;

#[test]
fn shortest_first_and_fills_the_batch() {
    let waiting = [(1500, 0), (60, 0), (40, 0), (60, 0)];
    // Sharing allowed: shortest first, ties in arrival order, the others join with as many
    // tokens as the first.
    let all = plan(&waiting, 512, |_| usize::MAX, |_, _| true);
    assert_eq!(all, vec![(2, 40), (1, 40), (3, 40), (0, 40)]);
    // One with 41 tokens left cannot join a batch of 40s (its last token would run alone).
    let odd = [(41, 0), (40, 0), (60, 0)];
    let all = plan(&odd, 512, |_| usize::MAX, |_, _| true);
    assert_eq!(all, vec![(1, 40), (2, 40)]);
    // Sharing refused: the shortest alone.
    assert_eq!(
        plan(&waiting, 512, |_| usize::MAX, |_, _| false),
        vec![(2, 40)]
    );
}

#[test]
fn a_prompt_passed_over_long_enough_goes_first() {
    let waiting = [(1500, MAX_PASSED_OVER), (60, 0), (20, MAX_PASSED_OVER + 3)];
    assert_eq!(
        plan(&waiting, 512, |_| usize::MAX, |_, _| false),
        vec![(2, 20)]
    );
    assert_eq!(
        plan(&waiting[..2], 512, |_| usize::MAX, |_, _| false),
        vec![(0, 512)]
    );
    assert_eq!(
        plan(
            &[(1500, MAX_PASSED_OVER - 1), (60, 0)],
            512,
            |_| usize::MAX,
            |_, _| false
        ),
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
        cpu.record(n, 0.005 + 0.002 * n as f64, 0);
        gpu.record(n, 0.008 + 0.000_005 * n as f64, 0);
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
    slow_start.record(100, 0.05 + 0.001 * 100.0, 0);
    slow_start.record(300, 0.05 + 0.001 * 300.0, 0);
    // 0.05 * 0.9 / (0.1 * 0.001) = 450, give or take the float rounding of the fit.
    assert!((450..=451).contains(&slow_start.batch_tokens(2048)));
}

#[test]
fn a_slow_first_batch_does_not_stop_gpu_batching() {
    // As on the H100 (scripts/gpu-check, step 4): warm batches cost ~6 ms plus ~10 µs a
    // token, but the first 60-token batch took 129 ms (set-up of its shape). A least-squares
    // line through these points priced a token at ~1 ms and ran eight 60-token prompts one
    // by one.
    let mut gpu = PrefillCost::default();
    for n in [8usize, 16, 24, 32, 40, 48, 56, 64, 8, 16, 32, 64] {
        gpu.record(n, 0.006 + 0.000_01 * n as f64, 0);
    }
    gpu.record(60, 0.129, 0);
    let (fixed, per_token) = gpu.fit().unwrap_or((f64::NAN, f64::NAN));
    assert!(
        (per_token - 0.000_01).abs() < 1e-9 && (fixed - 0.006).abs() < 1e-9,
        "{fixed} {per_token}"
    );
    assert!(gpu.sharing_pays(7, 60));
}

#[test]
fn no_chunk_leaves_a_lone_token() {
    assert_eq!(chunk(65, 64), 63);
    assert_eq!(chunk(3, 2), 0);
    assert_eq!(chunk(100, 1), 0);
    assert_eq!(chunk(1, 64), 1);
    assert_eq!(chunk(1, 1), 1);
    assert_eq!(chunk(64, 64), 64);
    assert_eq!(chunk(66, 64), 64);
    // Two prompts, three tokens of room: the short one whole, nothing of the long one.
    let waiting = [(2, 0), (100, 0)];
    assert_eq!(plan(&waiting, 3, |_| usize::MAX, |_, _| true), vec![(0, 2)]);
}

#[test]
fn median_of_odd_even_and_no_values() {
    assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
    assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), Some(2.5));
    assert_eq!(median(&mut []), None);
}

#[test]
fn cost_model_needs_two_sizes_keeps_its_line_and_forgets_old_batches() {
    let mut c = PrefillCost::default();
    for _ in 0..10 {
        c.record(60, 0.1, 0);
    }
    assert_eq!(c.fit(), None);
    c.record(120, 0.3, 0);
    assert!(c.fit().is_some());
    // A window of one size keeps the last line learned.
    for _ in 0..COST_WINDOW {
        c.record(64, 0.2, 0);
    }
    let kept = c.fit();
    assert!(kept.is_some());
    c.record(64, 0.25, 0);
    assert_eq!(c.fit(), kept);
    for _ in 0..COST_WINDOW {
        c.record(100, 0.2, 0);
        c.record(400, 0.8, 0);
    }
    let (fixed, per_token) = c.fit().unwrap_or((f64::NAN, f64::NAN));
    assert!(
        fixed.abs() < 1e-9 && (per_token - 0.002).abs() < 1e-9,
        "{fixed} {per_token}"
    );
    assert_eq!(c.samples.len(), COST_WINDOW);
}

#[test]
fn later_chunks_of_a_long_prompt_do_not_move_the_line() {
    // One CPU core, as a prefill node here warms up: a 45-token and a 366-token prompt, each in one
    // batch (4.2 ms a token, nothing fixed).
    let mut c = PrefillCost::default();
    c.record(45, 0.0042 * 45.0, 0);
    c.record(366, 0.0042 * 366.0, 0);
    let before = c.batch_tokens(512);
    assert_eq!(before, 64);
    // Then a 2,048-token prompt in 64-token chunks, each paying attention over the chunks before
    // it (0.6 us per token and cell of context). Counted as fixed cost, that grew the batches.
    for k in 2..32 {
        let context = 64 * k;
        c.record(64, 64.0 * (0.0042 + 0.6e-6 * context as f64), context);
    }
    assert_eq!(c.batch_tokens(512), before);
}
