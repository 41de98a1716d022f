//! Non-finite values on every CPU backend, through the public API.
//!
//! The contract (docs/testing.md, "Non-finite inputs"):
//! - a key the mask rules out never contributes, whatever K and V hold there
//!   (NaN and ±inf included): padding and stale KV-cache slots hold such values;
//! - a NaN score at a visible key (a NaN in q or k, or a score mod that yields
//!   NaN) makes its row's out and lse NaN, as in the reference;
//! - a non-finite V at a visible key makes that row's out non-finite in that
//!   dimension (NaN or ±inf: the online softmax may turn inf into NaN);
//! - a row that sees no key, or whose visible scores are all -inf, gets
//!   out = 0 and lse = -inf.
//!
//! Every case runs on the reference, the tile interpreter and the JIT (both
//! tile-product implementations) under several tilings, and every backend must
//! agree with the reference element by element in class (NaN, ±inf, finite) and,
//! where finite, in value.

use attnc::codegen::clif::GemmImpl;
use attnc::{Inputs, Outputs, Program, SourceFile, SpecOptions};
use ndarray::{s, Array4};

fn load(text: &str, params: &[(&str, &str)]) -> Program {
    let options = SpecOptions::with_params(params);
    attnc::load(SourceFile::new("t.attn", text), &options)
        .unwrap_or_else(|e| panic!("{}", e.render()))
}

/// Every CPU backend's output, labelled.
fn every_backend(program: &Program, inputs: &Inputs<'_>) -> Vec<(String, Outputs)> {
    let mut runs = Vec::new();
    for (bq, bkv) in [(64, 64), (16, 16), (5, 32)] {
        runs.push((
            format!("interp {bq}x{bkv}"),
            program
                .run_interp(inputs, attnc::mask::Tiling { bq, bkv })
                .unwrap(),
        ));
        let mut gemms = vec![GemmImpl::Jit, GemmImpl::detect()];
        gemms.dedup();
        for gemm in gemms {
            let kernel = program
                .compile_jit(attnc::mask::Tiling { bq, bkv }, gemm)
                .unwrap();
            runs.push((
                format!("jit {bq}x{bkv} {}", gemm.name()),
                kernel
                    .run(inputs)
                    .unwrap_or_else(|e| panic!("{}", e.render())),
            ));
        }
    }
    runs
}

/// Whether `got` matches `want` in class and, when finite, in value.
fn same(got: f32, want: f32, nonfinite_ok: bool) -> bool {
    if want.is_nan() {
        got.is_nan()
    } else if want.is_infinite() {
        got == want || (nonfinite_ok && !got.is_finite())
    } else {
        (got - want).abs() <= 1e-4 * (1.0 + want.abs())
    }
}

/// Runs every backend and compares with the reference; returns the reference.
/// `nonfinite_ok`: an infinite reference value may come out as any non-finite
/// value (for inf in V at a visible key).
fn check_all(program: &Program, inputs: &Inputs<'_>, nonfinite_ok: bool) -> Outputs {
    let want = program.run_reference(inputs).unwrap();
    for (name, got) in every_backend(program, inputs) {
        assert_same(&name, &got, "reference", &want, nonfinite_ok);
    }
    want
}

/// Asserts that `got` matches `want` element by element ([`same`]).
fn assert_same(name: &str, got: &Outputs, what: &str, want: &Outputs, nonfinite_ok: bool) {
    for ((idx, &g), &w) in got.out.indexed_iter().zip(want.out.iter()) {
        assert!(
            same(g, w, nonfinite_ok),
            "{name}: out{idx:?} = {g}, {what} {w}"
        );
    }
    let (got_lse, want_lse) = (got.lse.as_ref().unwrap(), want.lse.as_ref().unwrap());
    for ((idx, &g), &w) in got_lse.indexed_iter().zip(want_lse.iter()) {
        assert!(same(g, w, false), "{name}: lse{idx:?} = {g}, {what} {w}");
    }
}

fn random(shape: (usize, usize, usize, usize), seed: u64) -> Array4<f32> {
    attnc::bench::Rng::new(seed).array4(shape)
}

#[test]
fn nan_and_inf_past_a_length_mask_never_reach_the_output() {
    let program = load(
        "attention t {\n    param len: int = 37\n    mask = kv < len\n}\n",
        &[],
    );
    let (b, h, q_len, kv_len, d) = (2, 2, 50, 100, 16);
    let q = random((b, h, q_len, d), 1);
    let mut k = random((b, h, kv_len, d), 2);
    let mut v = random((b, h, kv_len, d), 3);
    for (i, x) in v.slice_mut(s![.., .., 37.., ..]).iter_mut().enumerate() {
        *x = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][i % 3];
    }
    k.slice_mut(s![.., .., 60.., ..]).fill(f32::NAN);
    let inputs = Inputs::new(q.view(), k.view(), v.view()).with_lse();
    let want = check_all(&program, &inputs, false);
    assert!(want.out.iter().all(|x| x.is_finite()));
}

#[test]
fn an_inf_in_v_reaches_only_the_rows_that_see_its_key() {
    let program = load("attention t { mask = causal }", &[]);
    let (q_len, d) = (40, 8);
    let q = random((1, 1, q_len, d), 4);
    let k = random((1, 1, q_len, d), 5);
    let mut v = random((1, 1, q_len, d), 6);
    v[[0, 0, 10, 4]] = f32::INFINITY;
    let inputs = Inputs::new(q.view(), k.view(), v.view()).with_lse();
    let want = check_all(&program, &inputs, true);
    // Rows 0-9 cannot see key 10: finite. Rows from 10 on see it in dim 4 only.
    for row in 0..q_len {
        for c in 0..d {
            let x = want.out[[0, 0, row, c]];
            assert_eq!(x.is_finite(), row < 10 || c != 4, "row {row} dim {c}: {x}");
        }
    }
}

#[test]
fn a_nan_query_row_gives_nan_not_an_empty_row() {
    let program = load("attention t { mask = causal }", &[]);
    let (q_len, d) = (70, 8);
    let mut q = random((1, 2, q_len, d), 7);
    let k = random((1, 2, q_len, d), 8);
    let v = random((1, 2, q_len, d), 9);
    q[[0, 1, 33, 2]] = f32::NAN;
    let inputs = Inputs::new(q.view(), k.view(), v.view()).with_lse();
    let want = check_all(&program, &inputs, false);
    let lse = want.lse.unwrap();
    assert!(lse[[0, 1, 33]].is_nan());
    assert!(want.out.slice(s![0, 1, 33, ..]).iter().all(|x| x.is_nan()));
    assert_eq!(lse.iter().filter(|x| x.is_nan()).count(), 1);
}

#[test]
fn score_mods_that_yield_nan_propagate_it() {
    for score in [
        "sqrt(score - 100.0)",
        "score % 0.0",
        "if q == 5 && kv == 3 { sqrt(-1.0 - score * score) } else { score }",
    ] {
        let program = load(
            &format!("attention t {{\n    mask = causal\n    score = {score}\n}}\n"),
            &[],
        );
        let q = random((1, 1, 20, 4), 10);
        let k = random((1, 1, 20, 4), 11);
        let inputs = Inputs::new(q.view(), k.view(), k.view()).with_lse();
        let want = check_all(&program, &inputs, false);
        assert!(want.lse.unwrap().iter().any(|x| x.is_nan()), "{score}");
    }
}

#[test]
fn a_nan_in_an_early_tile_poisons_the_whole_row() {
    // The NaN score is in the row's first key tile; later tiles are finite and
    // larger, so a maximum that skipped NaN would rescale it away on one path.
    let program = load(
        "attention t {\n    score = if kv == 0 { sqrt(-1.0 - score * score) } else { score + 10.0 }\n}\n",
        &[],
    );
    let q = random((1, 1, 9, 4), 12);
    let k = random((1, 1, 200, 4), 13);
    let inputs = Inputs::new(q.view(), k.view(), k.view()).with_lse();
    let want = check_all(&program, &inputs, false);
    assert!(want.out.iter().all(|x| x.is_nan()));
}

#[test]
fn rows_that_see_nothing_or_only_minus_inf_are_empty() {
    let program = load(
        "attention t {\n    mask = q >= 4 || kv < 0\n    score = if q < 8 { -1.0 / 0.0 } else { score }\n}\n",
        &[],
    );
    let q = random((1, 1, 12, 4), 14);
    let mut k = random((1, 1, 30, 4), 15);
    k[[0, 0, 29, 0]] = f32::NAN; // a NaN key the rows below 8 score -inf regardless
    let inputs = Inputs::new(q.view(), k.view(), k.view()).with_lse();
    let want = program.run_reference(&inputs).unwrap();
    // Rows 0-3 see no key, rows 4-7 score every key -inf: out 0, lse -inf.
    let lse = want.lse.as_ref().unwrap();
    for row in 0..8 {
        assert_eq!(lse[[0, 0, row]], f32::NEG_INFINITY);
        assert!(want.out.slice(s![0, 0, row, ..]).iter().all(|&x| x == 0.0));
    }
    check_all(&program, &inputs, false);
}

#[test]
fn data_dependent_overflow_is_ieee_f32_on_every_f32_backend() {
    // q·k × 1e38 overflows f32 for most keys: the scores are ±inf, a row with a
    // +inf score is NaN, a row whose visible scores are all -inf is empty. The
    // f64 reference does not overflow (docs/language.md says where it differs);
    // the f32 backends agree with each other.
    let program = load(
        "attention t {\n    mask = causal\n    scale = 1e38\n}\n",
        &[],
    );
    let q = random((1, 2, 40, 8), 16);
    let k = random((1, 2, 40, 8), 17);
    let inputs = Inputs::new(q.view(), k.view(), k.view()).with_lse();
    let runs = every_backend(&program, &inputs);
    let (first, want) = &runs[0];
    let mut classes = [0usize; 3];
    for x in want.lse.as_ref().unwrap() {
        classes[usize::from(x.is_nan()) + 2 * usize::from(*x == f32::NEG_INFINITY)] += 1;
    }
    assert!(classes[1] > 0, "some rows see a +inf score: {classes:?}");
    for (name, got) in &runs[1..] {
        assert_same(name, got, first, want, false);
    }
}

#[test]
fn keys_a_score_mod_scores_minus_inf_never_contribute_their_v() {
    // No mask, so every tile is FULL: the score mod alone hides keys 37 on.
    let program = load(
        "attention t {\n    score = if kv >= 37 { -1.0 / 0.0 } else { score }\n}\n",
        &[],
    );
    let q = random((1, 2, 30, 16), 18);
    let k = random((1, 2, 90, 16), 19);
    let mut v = random((1, 2, 90, 16), 20);
    v.slice_mut(s![.., .., 37.., ..]).fill(f32::NAN);
    let inputs = Inputs::new(q.view(), k.view(), v.view()).with_lse();
    let want = check_all(&program, &inputs, false);
    assert!(want.out.iter().all(|x| x.is_finite()));
}

#[test]
fn nan_in_v_at_keys_every_row_sees_reaches_every_row() {
    // Neither mask nor score mod: every key is visible, so a NaN in V is part
    // of the answer, in the dimension it sits in.
    let program = load("attention t { }", &[]);
    let q = random((1, 1, 20, 8), 21);
    let k = random((1, 1, 70, 8), 22);
    let mut v = random((1, 1, 70, 8), 23);
    v[[0, 0, 50, 3]] = f32::NAN;
    let inputs = Inputs::new(q.view(), k.view(), v.view()).with_lse();
    let want = check_all(&program, &inputs, false);
    for row in 0..20 {
        for c in 0..8 {
            assert_eq!(want.out[[0, 0, row, c]].is_nan(), c == 3);
        }
    }
}
