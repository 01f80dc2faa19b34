use super::parse;
use super::*;

const STATE_MAGIC: u32 = 0xaf14_3cd8;
/// An attention model's state form without cell extensions.
const PLAIN: Form = Form::ALL[0];

/// Builds a synthetic state: `n_stream` streams, cells in `stream`, positions in `positions`.
pub(crate) fn synthetic_state(
    n_stream: u32,
    stream: u32,
    positions: &[i32],
    v_trans: bool,
) -> Vec<u8> {
    let mut b = head();
    synthetic_section(&mut b, n_stream, stream, positions, v_trans, 2);
    b
}

/// Builds a synthetic iSWA state: a two-layer full cache of cells `0..n` and a three-layer window
/// cache of cells `n - w..n`, stored from the middle of the window (as a ring buffer holds them).
pub(crate) fn synthetic_iswa(n_stream: u32, stream: u32, n: i32, w: i32, v_trans: bool) -> Vec<u8> {
    let mut b = head();
    let full: Vec<i32> = (0..n).collect();
    synthetic_section(&mut b, n_stream, stream, &full, v_trans, 2);
    let mut window: Vec<i32> = (n - w..n).collect();
    window.rotate_left(w as usize / 2);
    synthetic_section(&mut b, n_stream, stream, &window, v_trans, 3);
    b
}

/// Builds a synthetic hybrid state: [`synthetic_state`] of cells `0..n`, then a recurrent section
/// of one cell at `n - 1` with two recurrent layers of five (R rows of 8 bytes, S rows of 20).
pub(crate) fn synthetic_hybrid(n_stream: u32, stream: u32, n: i32, v_trans: bool) -> Vec<u8> {
    let positions: Vec<i32> = (0..n).collect();
    let mut b = synthetic_state(n_stream, stream, &positions, v_trans);
    synthetic_recurrent(&mut b, Some(n - 1), 5, &[8, 8], &[20, 20]);
    b
}

/// Builds a synthetic hybrid iSWA state (LFM2 with a sliding window): [`synthetic_iswa`], then the
/// recurrent section of [`synthetic_hybrid`].
pub(crate) fn synthetic_hybrid_iswa(n_stream: u32, stream: u32, n: i32, w: i32) -> Vec<u8> {
    let mut b = synthetic_iswa(n_stream, stream, n, w, false);
    synthetic_recurrent(&mut b, Some(n - 1), 5, &[8, 8], &[20, 20]);
    b
}

/// Builds a synthetic purely recurrent state: the head and a recurrent section of one cell at
/// `n - 1` with two layers (R rows of 12 bytes, S rows of 40).
pub(crate) fn synthetic_recurrent_state(n: i32) -> Vec<u8> {
    let mut b = head();
    synthetic_recurrent(&mut b, Some(n - 1), 2, &[12, 12], &[40, 40]);
    b
}

/// Appends a recurrent section: one cell at `pos` (none for `None`), `n_layer` in its field, then
/// an F32 entry per R row size and per S row size.
pub(crate) fn synthetic_recurrent(
    b: &mut Vec<u8>,
    pos: Option<i32>,
    n_layer: u32,
    r: &[u64],
    s: &[u64],
) {
    b.extend_from_slice(&u32::from(pos.is_some()).to_le_bytes());
    if let Some(p) = pos {
        b.extend_from_slice(&p.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
    }
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&n_layer.to_le_bytes());
    for (i, row) in r.iter().chain(s).enumerate() {
        b.extend_from_slice(&0i32.to_le_bytes());
        b.extend_from_slice(&row.to_le_bytes());
        if pos.is_some() {
            b.extend((0..*row).map(|j| (j as u8).wrapping_mul(7) ^ i as u8));
        }
    }
}

fn head() -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&STATE_MAGIC.to_le_bytes());
    b.extend_from_slice(&0i32.to_le_bytes());
    b
}

fn synthetic_section(
    b: &mut Vec<u8>,
    n_stream: u32,
    stream: u32,
    positions: &[i32],
    v_trans: bool,
    n_layer: u32,
) {
    let (k_row, v_el, n_embd) = (6u64, 2u32, 3u32);
    b.extend_from_slice(&n_stream.to_le_bytes());
    for s in 0..n_stream {
        if s != stream || positions.is_empty() {
            b.extend_from_slice(&0u32.to_le_bytes());
            continue;
        }
        let n = positions.len() as u64;
        b.extend_from_slice(&(positions.len() as u32).to_le_bytes());
        for p in positions {
            b.extend_from_slice(&p.to_le_bytes());
            b.extend_from_slice(&1u32.to_le_bytes());
            b.extend_from_slice(&(s as i32).to_le_bytes());
        }
        b.extend_from_slice(&u32::from(v_trans).to_le_bytes());
        b.extend_from_slice(&n_layer.to_le_bytes());
        b.extend_from_slice(&64u32.to_le_bytes());
        b.extend_from_slice(&64u32.to_le_bytes());
        for l in 0..n_layer {
            b.extend_from_slice(&1i32.to_le_bytes());
            b.extend_from_slice(&k_row.to_le_bytes());
            b.extend((0..k_row * n).map(|i| (i as u8).wrapping_add(l as u8)));
        }
        for _ in 0..n_layer {
            b.extend_from_slice(&1i32.to_le_bytes());
            if v_trans {
                b.extend_from_slice(&v_el.to_le_bytes());
                b.extend_from_slice(&n_embd.to_le_bytes());
            } else {
                b.extend_from_slice(&(u64::from(v_el * n_embd)).to_le_bytes());
            }
            b.extend((0..u64::from(v_el * n_embd) * n).map(|i| i as u8 ^ 0x5a));
        }
    }
}

#[test]
fn a_row_size_near_the_top_of_u64_is_refused_not_overflowed() {
    let mut st = synthetic_state(1, 0, &[0], false);
    // The first K layer's row size sits after the 28-byte cell header, v_trans, n_layer, the
    // two 64-bit widths (44 bytes) and the layer's type (4 bytes).
    st[48..56].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
    let refused = StateShape::calibrate(&st);
    assert!(refused.is_err(), "{refused:?}");
    assert!(to_single_stream(st).is_err());
}

#[test]
fn calibrates_and_checks_its_own_state() {
    for v_trans in [false, true] {
        let st = synthetic_state(1, 0, &[0, 1, 2], v_trans);
        let shape = StateShape::calibrate(&st).unwrap();
        assert_eq!(shape.k.len(), 2);
        assert_eq!(shape.v_trans, v_trans);
        assert_eq!(shape.bytes_per_token(), 2 * 6 + 2 * 6);
        let info = shape.check(&st, 3).unwrap();
        assert_eq!(info.cell_count, 3);
        assert!(matches!(
            shape.check(&st, 4),
            Err(KvError::MalformedState(_))
        ));
    }
}

#[test]
fn single_stream_form_round_trips_through_reframing() {
    let multi = synthetic_state(4, 2, &[1, 0, 2], false);
    let single_ref = synthetic_state(1, 0, &[1, 0, 2], false);
    let (single, info) = to_single_stream(multi.clone()).unwrap();
    assert_eq!(info.cell_count, 3);
    // Seq ids inside the cells differ (2 vs 0) but are ignored by llama.cpp; compare the rest.
    assert_eq!(single.len(), single_ref.len());
    let shape4 = StateShape {
        n_stream: 4,
        ..StateShape::calibrate(&multi).unwrap()
    };
    let mut back = single.clone();
    shape4.check(&back, 3).unwrap();
    shape4.reframe_for_import(&mut back).unwrap();
    assert_eq!(back.len(), multi.len());
    let parsed = parse::parse(&back, PLAIN).unwrap();
    let full = parsed.full.unwrap();
    assert_eq!((full.n_stream, full.stream), (4, 0));
}

#[test]
fn refuses_layout_and_position_faults() {
    let shape = StateShape::calibrate(&synthetic_state(1, 0, &[0, 1], false)).unwrap();
    let trans = synthetic_state(1, 0, &[0, 1], true);
    assert!(matches!(
        shape.check(&trans, 2),
        Err(KvError::ShapeMismatch(_))
    ));
    let dup = synthetic_state(1, 0, &[0, 0], false);
    assert!(matches!(
        shape.check(&dup, 2),
        Err(KvError::MalformedState(_))
    ));
    let gap = synthetic_state(1, 0, &[0, 5], false);
    assert!(matches!(
        shape.check(&gap, 2),
        Err(KvError::MalformedState(_))
    ));
    let mut long = synthetic_state(1, 0, &[0, 1], false);
    long.push(0);
    assert!(matches!(
        shape.check(&long, 2),
        Err(KvError::MalformedState(_))
    ));
    let short = synthetic_state(1, 0, &[0, 1], false);
    assert!(matches!(
        shape.check(&short[..short.len() - 1], 2),
        Err(KvError::Truncated { .. })
    ));
    let mut bad_magic = short.clone();
    bad_magic[0] ^= 1;
    assert!(matches!(
        shape.check(&bad_magic, 2),
        Err(KvError::BadMagic { .. })
    ));
}

proptest::proptest! {
    #[test]
    fn mutated_iswa_states_never_panic(at in 0usize..1200, val in proptest::prelude::any::<u8>(), v_trans in proptest::prelude::any::<bool>()) {
        let good = synthetic_iswa(2, 1, 5, 3, v_trans);
        let shape = StateShape::calibrate(&synthetic_iswa(1, 0, 1, 1, v_trans)).unwrap_or_else(|e| panic!("{e}"));
        let mut bad = good.clone();
        let i = at % bad.len();
        bad[i] = val;
        let _ = StateShape::calibrate(&bad);
        if let Ok((mut single, _)) = to_single_stream(bad) {
            let _ = shape.check(&single, 5);
            let other = StateShape { v_trans: !v_trans, ..shape.clone() };
            let _ = other.match_v_layout(single.clone());
            let _ = shape.reframe_for_import(&mut single);
        }
    }


    #[test]
    fn mutated_states_never_panic(at in 0usize..400, val in proptest::prelude::any::<u8>(), v_trans in proptest::prelude::any::<bool>()) {
        let good = synthetic_state(2, 1, &[0, 1, 2], v_trans);
        let shape = StateShape::calibrate(&synthetic_state(1, 0, &[0], v_trans)).unwrap_or_else(|e| panic!("{e}"));
        let mut bad = good.clone();
        let i = at % bad.len();
        bad[i] = val;
        let _ = StateShape::calibrate(&bad);
        if let Ok((single, _)) = to_single_stream(bad) {
            let _ = shape.check(&single, 3);
            // Translating V to the other layout never panics either, whatever the bytes.
            let other = StateShape { v_trans: !v_trans, ..shape.clone() };
            let _ = other.match_v_layout(single);
        }
    }
}

#[test]
fn an_iswa_state_round_trips_through_the_wire_form_and_reframing() {
    let (n, w) = (9, 4);
    let multi = synthetic_iswa(4, 2, n, w, false);
    let shape = StateShape::calibrate(&multi).unwrap();
    let window = shape.window.as_deref().unwrap();
    assert_eq!((shape.k.len(), window.k.len()), (2, 3));
    assert_eq!(shape.bytes_per_token(), 2 * 12 + 3 * 12);
    let (single, info) = to_single_stream(multi.clone()).unwrap();
    assert_eq!((info.cell_count, info.window_cells), (n as u32, w as u32));
    assert_eq!(single.len(), synthetic_iswa(1, 0, n, w, false).len());
    shape.check(&single, n as usize).unwrap();
    let mut back = single.clone();
    shape.reframe_for_import(&mut back).unwrap();
    assert_eq!(back.len(), multi.len());
    let parsed = parse::parse(&back, PLAIN).unwrap();
    let window = parsed.window.unwrap();
    assert_eq!(
        (
            parsed.full.unwrap().n_stream,
            window.n_stream,
            window.cell_count
        ),
        (4, 4, w as u32)
    );
    assert_eq!(to_single_stream(back).unwrap().0, single);
    // The window section travels on its own and joins back byte for byte.
    let caches = Caches::split(&single, shape.form()).unwrap();
    assert!(caches.window.is_some() && caches.recurrent.is_none());
    assert_eq!(caches.join(), single);
}

#[test]
fn a_window_in_the_wrong_place_or_on_the_wrong_model_is_refused() {
    let iswa = StateShape::calibrate(&synthetic_iswa(1, 0, 3, 2, false)).unwrap();
    let plain = StateShape::calibrate(&synthetic_state(1, 0, &[0, 1, 2], false)).unwrap();
    let state = synthetic_iswa(1, 0, 9, 4, false);
    iswa.check(&state, 9).unwrap();
    // The window must end at the last token.
    assert!(matches!(
        iswa.check(&state, 10),
        Err(KvError::MalformedState(_))
    ));
    let mut early = head();
    synthetic_section(&mut early, 1, 0, &(0..9).collect::<Vec<_>>(), false, 2);
    synthetic_section(&mut early, 1, 0, &[3, 4, 5], false, 3);
    assert!(matches!(
        iswa.check(&early, 9),
        Err(KvError::MalformedState(_))
    ));
    // A window with a gap, and a window cache on a model without one (and the other way round).
    let mut gap = head();
    synthetic_section(&mut gap, 1, 0, &(0..9).collect::<Vec<_>>(), false, 2);
    synthetic_section(&mut gap, 1, 0, &[6, 8], false, 3);
    assert!(matches!(
        iswa.check(&gap, 9),
        Err(KvError::MalformedState(_))
    ));
    assert!(matches!(
        plain.check(&state, 9),
        Err(KvError::ShapeMismatch(_))
    ));
    let one = synthetic_state(1, 0, &(0..9).collect::<Vec<_>>(), false);
    assert!(matches!(
        iswa.check(&one, 9),
        Err(KvError::ShapeMismatch(_))
    ));
    // A third cache is trailing bytes.
    let mut three = state.clone();
    synthetic_section(&mut three, 1, 0, &[8], false, 3);
    assert!(matches!(
        iswa.check(&three, 9),
        Err(KvError::MalformedState(_))
    ));
}

#[test]
fn an_iswa_state_translates_v_cache_by_cache() {
    let stored = synthetic_iswa(1, 0, 7, 3, false);
    let flat = StateShape::calibrate(&stored).unwrap();
    let trans = StateShape::calibrate(&synthetic_iswa(1, 0, 2, 1, true)).unwrap();
    let there = trans.match_v_layout(stored.clone()).unwrap();
    trans.check(&there, 7).unwrap();
    assert_eq!(flat.match_v_layout(there).unwrap(), stored);
}
