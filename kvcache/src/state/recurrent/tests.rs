//! A hybrid model's state: the recurrent section parsed, checked, carried through the wire form,
//! re-framing and V translation unchanged, and every malformed variant refused before llama.cpp.

use super::super::tests::{
    synthetic_hybrid, synthetic_hybrid_iswa, synthetic_recurrent, synthetic_recurrent_state,
    synthetic_state,
};
use super::super::{Caches, StateShape, to_single_stream};
use crate::error::KvError;

fn cells(n: i32) -> Vec<i32> {
    (0..n).collect()
}

#[test]
fn a_hybrid_state_calibrates_and_round_trips_with_its_recurrent_section() {
    let multi = synthetic_hybrid(4, 2, 6, false);
    let shape = StateShape::calibrate(&multi).unwrap();
    let rec = shape.recurrent.clone().unwrap();
    assert_eq!((rec.n_layer, rec.r.len(), rec.s.len()), (5, 2, 2));
    assert_eq!((rec.r[0].row_size, rec.s[1].row_size), (8, 20));
    // 4 (cell count) + 8 (cell) + 8 (s_trans, n_layer) + 4 entries of 12 + rows 8, 8, 20, 20.
    assert_eq!(rec.section_len().unwrap(), 20 + 48 + 56);
    // The recurrent state does not grow with the prompt: a token costs the attention cache only.
    assert_eq!(shape.bytes_per_token(), 2 * 6 + 2 * 6);

    let (single, info) = to_single_stream(multi.clone()).unwrap();
    assert_eq!(info.cell_count, 6);
    // Seq ids inside the cells differ (2 vs 0), which llama.cpp ignores: compare lengths.
    assert_eq!(single.len(), synthetic_hybrid(1, 0, 6, false).len());
    shape.check(&single, 6).unwrap();
    let mut back = single.clone();
    shape.reframe_for_import(&mut back).unwrap();
    assert_eq!(back.len(), multi.len());
    // The recurrent section is the same bytes at the end of every form.
    let tail = &multi[multi.len() - 124..];
    assert_eq!(&back[back.len() - 124..], tail);
    assert_eq!(&single[single.len() - 124..], tail);
    assert_eq!(to_single_stream(back).unwrap().0, single);
    let caches = Caches::split(&single, shape.form()).unwrap();
    assert_eq!(caches.recurrent.as_deref(), Some(tail));
    assert!(caches.window.is_none());
    assert_eq!(caches.join(), single);
    // Cutting cells out of a hybrid export reads the attention cache only.
    assert_eq!(shape.cut(&single, 0..6).unwrap().len(), 6 * 36);
}

#[test]
fn v_translation_leaves_the_recurrent_section_alone() {
    let flat = synthetic_hybrid(1, 0, 5, false);
    let trans = StateShape::calibrate(&synthetic_hybrid(1, 0, 2, true)).unwrap();
    let there = trans.match_v_layout(flat.clone()).unwrap();
    trans.check(&there, 5).unwrap();
    assert_eq!(there[there.len() - 124..], flat[flat.len() - 124..]);
    let back = StateShape::calibrate(&flat).unwrap();
    assert_eq!(back.match_v_layout(there).unwrap(), flat);
}

#[test]
fn a_recurrent_section_that_llama_cpp_would_choke_on_is_refused() {
    let shape = StateShape::calibrate(&synthetic_hybrid(1, 0, 3, false)).unwrap();
    let attention = || synthetic_state(1, 0, &cells(4), false);
    let with = |pos, n_layer, r: &[u64], s: &[u64]| {
        let mut b = attention();
        synthetic_recurrent(&mut b, pos, n_layer, r, s);
        b
    };
    shape
        .check(&with(Some(3), 5, &[8, 8], &[20, 20]), 4)
        .unwrap();
    let malformed = |state: Vec<u8>, why: &str| {
        let got = shape.check(&state, 4);
        assert!(
            matches!(got, Err(KvError::MalformedState(_))),
            "{why}: {got:?}"
        );
    };
    malformed(
        with(Some(2), 5, &[8, 8], &[20, 20]),
        "a state of other tokens",
    );
    malformed(
        with(None, 5, &[8, 8], &[20, 20]),
        "an empty recurrent state",
    );
    malformed(
        with(Some(3), 5, &[8, 8, 8], &[20, 20]),
        "an odd entry count",
    );
    malformed(
        with(Some(3), 1, &[8, 8], &[20, 20]),
        "more entries than layers",
    );
    // Two cells abort llama.cpp (an assertion in its reader): refused by count.
    let mut two = with(Some(3), 5, &[8, 8], &[20, 20]);
    let at = attention().len();
    two[at..at + 4].copy_from_slice(&2u32.to_le_bytes());
    malformed(two, "two cells");
    let mut seq_ids = with(Some(3), 5, &[8, 8], &[20, 20]);
    seq_ids[at + 8..at + 12].copy_from_slice(&1u32.to_le_bytes());
    malformed(seq_ids, "a cell with sequence ids");
    let mut s_trans = with(Some(3), 5, &[8, 8], &[20, 20]);
    s_trans[at + 12..at + 16].copy_from_slice(&1u32.to_le_bytes());
    malformed(s_trans, "s_trans 1");
    let mut short = with(Some(3), 5, &[8, 8], &[20, 20]);
    short.pop();
    malformed(short, "a truncated section");
    // Another model's recurrent layers, and a state without the section at all.
    let other = shape.check(&with(Some(3), 5, &[8, 8], &[24, 24]), 4);
    assert!(matches!(other, Err(KvError::ShapeMismatch(_))), "{other:?}");
    let missing = shape.check(&attention(), 4);
    assert!(
        matches!(missing, Err(KvError::Truncated { .. })),
        "{missing:?}"
    );
    // An attention-only context refuses a hybrid state.
    let plain = StateShape::calibrate(&attention()).unwrap();
    assert!(
        plain
            .check(&with(Some(3), 5, &[8, 8], &[20, 20]), 4)
            .is_err()
    );
}

#[test]
fn a_hybrid_state_with_a_window_cache_keeps_its_three_parts_apart() {
    let multi = synthetic_hybrid_iswa(3, 1, 9, 4);
    let shape = StateShape::calibrate(&multi).unwrap();
    assert!(shape.window.is_some() && shape.recurrent.is_some());
    let (single, info) = to_single_stream(multi.clone()).unwrap();
    assert_eq!((info.cell_count, info.window_cells), (9, 4));
    shape.check(&single, 9).unwrap();
    assert!(
        shape.check(&single, 10).is_err(),
        "the window and the recurrent cell end at 8"
    );
    let mut back = single.clone();
    shape.reframe_for_import(&mut back).unwrap();
    assert_eq!(back.len(), multi.len());
    assert_eq!(to_single_stream(back).unwrap().0, single);
    let caches = Caches::split(&single, shape.form()).unwrap();
    assert!(caches.window.is_some());
    assert_eq!(caches.recurrent.as_ref().map(Vec::len), Some(124));
    assert_eq!(caches.join(), single);
    // Each part where it belongs: a hybrid shape without the window, or an iSWA one without the
    // recurrent section, refuses it.
    let hybrid = StateShape::calibrate(&synthetic_hybrid(1, 0, 3, false)).unwrap();
    assert!(hybrid.check(&single, 9).is_err());
    let iswa =
        StateShape::calibrate(&super::super::tests::synthetic_iswa(1, 0, 3, 2, false)).unwrap();
    assert!(iswa.check(&single, 9).is_err());
}

#[test]
fn entries_other_than_f32_rows_are_refused() {
    let shape = StateShape::calibrate(&synthetic_hybrid(1, 0, 3, false)).unwrap();
    let mut state = synthetic_hybrid(1, 0, 3, false);
    // The first R entry's type, after the section's cell count, cell, s_trans and n_layer.
    let at = state.len() - 124 + 20;
    state[at..at + 4].copy_from_slice(&1i32.to_le_bytes());
    assert!(matches!(
        shape.check(&state, 3),
        Err(KvError::MalformedState(_))
    ));
    assert!(StateShape::calibrate(&state).is_err());
}

#[test]
fn the_largest_state_counts_every_part() {
    // What a receiver budgets for a sequence of 100 cells: the full cache, at most a 4-cell
    // window, the 124-byte recurrent section. A real state of that size fits, with 8 bytes to
    // spare (the bound counts the window cache as a state of its own, head included).
    let shape = StateShape::calibrate(&synthetic_hybrid_iswa(1, 0, 3, 2)).unwrap();
    let window = shape.window.as_deref().unwrap();
    let bound = shape.max_state_len(100, Some(4)).unwrap();
    assert_eq!(
        bound,
        shape.state_len(100).unwrap() + window.state_len(4).unwrap() + 124
    );
    assert_eq!(synthetic_hybrid_iswa(1, 0, 100, 4).len() + 8, bound);
    let recurrent = StateShape::calibrate(&synthetic_recurrent_state(3)).unwrap();
    assert_eq!(
        recurrent.max_state_len(100, None).unwrap(),
        synthetic_recurrent_state(100).len()
    );
}

#[test]
fn a_purely_recurrent_state_is_its_section_alone() {
    let state = synthetic_recurrent_state(30);
    let shape = StateShape::calibrate(&state).unwrap();
    assert!(!shape.has_attention() && shape.window.is_none());
    assert_eq!(shape.recurrent.as_ref().unwrap().r.len(), 2);
    assert_eq!((shape.bytes_per_token(), shape.cells_for(30)), (0, 0));
    // Nothing to move or re-frame: every form is the state itself.
    let (single, info) = to_single_stream(state.clone()).unwrap();
    assert_eq!((single.as_slice(), info.cell_count), (state.as_slice(), 0));
    assert_eq!(shape.check(&state, 30).unwrap().cell_count, 0);
    let mut back = state.clone();
    shape.reframe_for_import(&mut back).unwrap();
    assert_eq!(back, state);
    assert_eq!(shape.match_v_layout(state.clone()).unwrap(), state);
    let caches = Caches::split(&state, shape.form()).unwrap();
    assert_eq!(caches.full.len(), 8, "the head alone");
    assert_eq!(caches.join(), state);
    // The state of another prompt length, of a hybrid model, or of an attention model is refused.
    assert!(matches!(
        shape.check(&state, 31),
        Err(KvError::MalformedState(_))
    ));
    assert!(shape.check(&synthetic_hybrid(1, 0, 30, false), 30).is_err());
    assert!(
        shape
            .check(&synthetic_state(1, 0, &cells(30), false), 30)
            .is_err()
    );
    let hybrid = StateShape::calibrate(&synthetic_hybrid(1, 0, 3, false)).unwrap();
    assert!(hybrid.check(&state, 30).is_err());
}

proptest::proptest! {
    #[test]
    fn mutated_hybrid_states_never_panic(at in 0usize..400, val in proptest::prelude::any::<u8>(), v_trans in proptest::prelude::any::<bool>()) {
        let good = synthetic_hybrid(2, 1, 4, v_trans);
        let shape = StateShape::calibrate(&synthetic_hybrid(1, 0, 1, v_trans)).unwrap_or_else(|e| panic!("{e}"));
        let mut bad = good.clone();
        let i = at % bad.len();
        bad[i] = val;
        let _ = StateShape::calibrate(&bad);
        if let Ok((mut single, _)) = to_single_stream(bad) {
            let _ = shape.check(&single, 4);
            let _ = Caches::split(&single, shape.form()).map(Caches::join);
            let other = StateShape { v_trans: !v_trans, ..shape.clone() };
            let _ = other.match_v_layout(single.clone());
            let _ = shape.reframe_for_import(&mut single);
        }
    }

    #[test]
    fn mutated_recurrent_states_never_panic(at in 0usize..200, val in proptest::prelude::any::<u8>()) {
        let shape = StateShape::calibrate(&synthetic_recurrent_state(1)).unwrap_or_else(|e| panic!("{e}"));
        let mut bad = synthetic_recurrent_state(5);
        let i = at % bad.len();
        bad[i] = val;
        let _ = StateShape::calibrate(&bad);
        let _ = shape.check(&bad, 5);
        let _ = Caches::split(&bad, shape.form()).map(Caches::join);
        if let Ok((mut single, _)) = to_single_stream(bad) {
            let _ = shape.reframe_for_import(&mut single);
        }
    }
}
