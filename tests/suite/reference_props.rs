//! The reference interpreter against an independent brute force.
//!
//! The property test draws random specs (`support::specgen`), random shapes
//! (GQA, MQA, Q != KV, query offsets, k/v batch broadcast, explicit scales,
//! fully masked rows) and random data, runs them through `attnc::load` and
//! `Program::run_reference`, and compares out and lse (to 1e-5) with a dense
//! f64 computation that evaluates the spec's description directly
//! (`support::dense`). When evaluation fails (an unguarded buffer read out of
//! range), both must fail on the same read.
//!
//! The deterministic tests below pin the edge cases: empty lengths,
//! out-of-range reads, short-circuiting, `if`, `ancestor`, NaN inputs and
//! division by zero.

use crate::support;

use std::collections::BTreeMap;

use attnc::{BufferData, Inputs, Program, SourceFile, SpecOptions};
use ndarray::{Array4, ArrayD, IxDyn};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;

use support::dense;
use support::specgen::{arb_case, EvalFailure, GenCase};

const TOL: f64 = 1e-5;

fn load(case: &GenCase) -> Result<Program, TestCaseError> {
    attnc::load(case.spec.source_file(), &case.spec.options()).map_err(|e| {
        TestCaseError::fail(format!(
            "generated spec rejected:\n{}\n{}",
            case.spec.source,
            e.render()
        ))
    })
}

/// Pieces of text attnc's error must contain for this failure: the read and
/// the point, as in "read out of range: `doc[4]` with shape [4] (at b=0, h=0, q=4, kv=0)".
fn expected_error_parts(f: &EvalFailure) -> Vec<String> {
    match f {
        EvalFailure::OutOfRange { buffer, index, at } => {
            let index: Vec<String> = index.iter().map(|i| i.to_string()).collect();
            vec![
                format!("read out of range: `{buffer}[{}]`", index.join(", ")),
                format!("(at b={}, h={}, q={}, kv={})", at.b, at.h, at.q, at.kv),
            ]
        }
        EvalFailure::Cycle { buffer } => vec![format!("cycle in buffer `{buffer}`")],
        EvalFailure::Shift { count, at } => vec![format!(
            "shift by {count}, outside 0..=63 (at b={}, h={}, q={}, kv={})",
            at.b, at.h, at.q, at.kv
        )],
    }
}

/// Checks one generated case; returns whether it was an error case.
fn check_case(case: &GenCase) -> Result<bool, TestCaseError> {
    let program = load(case)?;
    let data = case.data();
    let got = program.run_reference(&case.inputs(&data));
    let want = dense::attention(case, &data);
    match (got, want) {
        (Ok(got), Ok(want)) => {
            dense::compare(&got, &want, TOL)
                .map_err(|e| TestCaseError::fail(format!("{e}\nspec:\n{}", case.spec.source)))?;
            Ok(false)
        }
        (Err(e), Err(f)) => {
            let message = e.to_string();
            prop_assert!(
                expected_error_parts(&f)
                    .iter()
                    .all(|part| message.contains(part.as_str())),
                "attnc failed with `{message}`, the brute force with {f:?}\nspec:\n{}",
                case.spec.source
            );
            Ok(true)
        }
        (Ok(_), Err(f)) => Err(TestCaseError::fail(format!(
            "attnc succeeded but the brute force failed with {f:?}\nspec:\n{}",
            case.spec.source
        ))),
        (Err(e), Ok(_)) => Err(TestCaseError::fail(format!(
            "attnc failed but the brute force succeeded:\n{}\nspec:\n{}",
            e.render(),
            case.spec.source
        ))),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn reference_matches_brute_force(case in arb_case()) {
        check_case(&case)?;
    }
}

/// The generator must reach the cases the property is meant to cover; a
/// generator that silently stopped producing them would make the property
/// above vacuous.
#[test]
fn generator_covers_the_interesting_cases() {
    let mut runner = TestRunner::deterministic();
    let strategy = arb_case();
    let (mut errors, mut empty_rows, mut full_rows, mut gqa, mut mqa, mut offset, mut broadcast) =
        (0, 0, 0, 0, 0, 0, 0);
    let (mut q_ne_kv, mut overrides, mut scale, mut score, mut buffers) = (0, 0, 0, 0, 0);
    let (mut kv_offset, mut keys_after_queries) = (0, 0);
    let (mut bit_ops, mut shift_errors, mut reductions, mut new_math) = (0, 0, 0, 0);
    for _ in 0..200 {
        let case = strategy.new_tree(&mut runner).unwrap().current();
        let s = case.shapes;
        gqa += usize::from(s.hkv > 1 && s.hkv < s.h);
        mqa += usize::from(s.hkv == 1 && s.h > 1);
        offset += usize::from(s.q_offset > 0);
        kv_offset += usize::from(s.kv_offset > 0);
        keys_after_queries += usize::from(s.kv_offset > s.q_offset);
        broadcast += usize::from(s.kv_batch == 1 && s.b > 1);
        q_ne_kv += usize::from(s.q != s.kv);
        overrides += usize::from(!case.spec.params.is_empty());
        scale += usize::from(case.spec.scale.is_some());
        score += usize::from(case.spec.score.is_some());
        buffers += usize::from(!case.spec.buffers.is_empty());
        bit_ops += usize::from(["&", "|", "^", "<<", ">>", "~"].iter().any(|op| {
            case.spec
                .source
                .replace("&&", "")
                .replace("||", "")
                .contains(op)
        }));
        let src = &case.spec.source;
        reductions += usize::from(["sum(", "any(", "all("].iter().any(|r| src.contains(r)));
        new_math += usize::from(
            ["sin(", "cos(", "erf(", "pow(", "sign(", "tanh_approx("]
                .iter()
                .any(|f| src.contains(f)),
        );
        match dense::attention(&case, &case.data()) {
            Err(EvalFailure::Shift { .. }) => {
                errors += 1;
                shift_errors += 1
            }
            Err(_) => errors += 1,
            Ok(d) => {
                empty_rows += usize::from(d.lse.iter().any(|x| *x == f64::NEG_INFINITY));
                full_rows += usize::from(d.lse.iter().any(|x| x.is_finite()));
            }
        }
    }
    let counts = [
        ("failing reads", errors),
        ("fully masked rows", empty_rows),
        ("rows with visible keys", full_rows),
        ("GQA", gqa),
        ("MQA", mqa),
        ("query offsets", offset),
        ("key offsets", kv_offset),
        ("keys starting after the first query", keys_after_queries),
        ("k/v batch broadcast", broadcast),
        ("Q != KV", q_ne_kv),
        ("param overrides", overrides),
        ("explicit scale", scale),
        ("score mods", score),
        ("buffers", buffers),
        ("bit operators", bit_ops),
        ("shifts out of range", shift_errors),
        ("reductions", reductions),
        ("sin, cos, erf, pow, sign or tanh_approx", new_math),
    ];
    for (what, n) in counts {
        assert!(
            n >= 5,
            "only {n} of 200 generated cases have {what}: {counts:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// Deterministic edge cases.

fn program(src: &str) -> Program {
    attnc::load(SourceFile::new("test.attn", src), &SpecOptions::default())
        .unwrap_or_else(|e| panic!("{}", e.render()))
}

fn int_buffer(v: &[i64]) -> BufferData {
    BufferData::Int(ArrayD::from_shape_vec(IxDyn(&[v.len()]), v.to_vec()).unwrap())
}

fn bool_buffer(v: &[bool]) -> BufferData {
    BufferData::Bool(ArrayD::from_shape_vec(IxDyn(&[v.len()]), v.to_vec()).unwrap())
}

fn float_buffer(v: &[f32]) -> BufferData {
    BufferData::Float(ArrayD::from_shape_vec(IxDyn(&[v.len()]), v.to_vec()).unwrap())
}

fn ramp(shape: (usize, usize, usize, usize), step: f32) -> Array4<f32> {
    let mut x = 0.0f32;
    Array4::from_shape_simple_fn(shape, || {
        x += step;
        (x * 7.3).sin()
    })
}

/// Inputs with q = k = 0 and v the identity (D = KV), so every visible key
/// gets the same weight and `out[.., row, kv] > 0` exactly when key `kv` is
/// visible from `row`.
struct Probe {
    q: Array4<f32>,
    k: Array4<f32>,
    v: Array4<f32>,
}

impl Probe {
    fn new(n_q: usize, n_kv: usize) -> Probe {
        let d = n_kv.max(1);
        let v = Array4::from_shape_fn(
            (1, 1, n_kv, d),
            |(_, _, kv, j)| if kv == j { 1.0 } else { 0.0 },
        );
        Probe {
            q: Array4::zeros((1, 1, n_q, d)),
            k: Array4::zeros((1, 1, n_kv, d)),
            v,
        }
    }

    fn inputs(&self) -> Inputs<'_> {
        Inputs::new(self.q.view(), self.k.view(), self.v.view()).with_lse()
    }

    /// The visible keys of every query row.
    fn visible(out: &attnc::Outputs) -> Vec<Vec<usize>> {
        let out = &out.out;
        (0..out.shape()[2])
            .map(|row| {
                (0..out.shape()[3])
                    .filter(|&kv| out[[0, 0, row, kv]] > 0.0)
                    .collect()
            })
            .collect()
    }
}

#[test]
fn zero_query_length_gives_empty_outputs() {
    let p = program("attention a { buffer doc[KV]: int\n mask = doc[q] == doc[kv] }");
    let q = Array4::<f32>::zeros((2, 2, 0, 4));
    let k = ramp((2, 1, 5, 4), 0.1);
    let inputs = Inputs::new(q.view(), k.view(), k.view())
        .with_lse()
        .buffer("doc", int_buffer(&[0, 0, 1, 1, 1]));
    let out = p.run_reference(&inputs).unwrap();
    assert_eq!(out.out.shape(), &[2, 2, 0, 4]);
    assert_eq!(out.lse.unwrap().shape(), &[2, 2, 0]);
}

#[test]
fn zero_key_length_gives_empty_rows() {
    // No key exists, so neither the mask nor the score mod is evaluated: the
    // buffer reads (which would all be out of range) never happen.
    let p = program("attention a { buffer doc[KV]: int\n mask = doc[q] == doc[kv]\n score = score + float(doc[q]) }");
    let q = ramp((2, 2, 3, 4), 0.1);
    let k = Array4::<f32>::zeros((2, 2, 0, 4));
    // KV is the end of the call's positions: the three queries at 0..3.
    let inputs = Inputs::new(q.view(), k.view(), k.view())
        .with_lse()
        .buffer("doc", int_buffer(&[0, 0, 0]));
    let out = p.run_reference(&inputs).unwrap();
    assert_eq!(out.out.shape(), &[2, 2, 3, 4]);
    assert!(out.out.iter().all(|x| *x == 0.0));
    assert!(out.lse.unwrap().iter().all(|x| *x == f32::NEG_INFINITY));
}

#[test]
fn lse_is_returned_only_when_asked_for() {
    let p = program("attention a { mask = causal }");
    let q = ramp((1, 1, 3, 2), 0.1);
    let out = p
        .run_reference(&Inputs::new(q.view(), q.view(), q.view()))
        .unwrap();
    assert!(out.lse.is_none());
}

#[test]
fn out_of_range_read_names_the_buffer_and_the_index() {
    // doc[q + 1] reads past the end of the positions at the last query.
    let p = program(
        "attention packed {\n    buffer doc[KV]: int\n    mask = doc[q + 1] == doc[kv] && causal\n}",
    );
    let q = ramp((1, 2, 3, 4), 0.1);
    let k = ramp((1, 2, 4, 4), 0.2);
    let inputs = Inputs::new(q.view(), k.view(), k.view())
        .q_offset(1)
        .buffer("doc", int_buffer(&[0, 0, 1, 1]));
    let err = p.run_reference(&inputs).unwrap_err();
    // Rows 0 and 1 are q = 1, 2 (reading 2, 3); row 2 is q = 3, the first bad read.
    assert_eq!(
        err.to_string(),
        "read out of range: `doc[4]` with shape [4] (at b=0, h=0, q=3, kv=0)"
    );
    let text = err.render();
    assert!(text.contains("test.attn:3:12"), "{text}");
    assert!(text.contains("this read"), "{text}");
    assert!(text.contains("guard the read"), "{text}");
}

#[test]
fn and_short_circuits_so_guarded_reads_stay_in_range() {
    let w = [true, false, true, true, false];
    let p =
        program("attention a {\n buffer w[KV]: bool\n let x = kv - 1\n mask = x >= 0 && w[x] }");
    let probe = Probe::new(2, 5);
    let out = p
        .run_reference(&probe.inputs().buffer("w", bool_buffer(&w)))
        .unwrap();
    let expected: Vec<usize> = (1..5).filter(|&kv| w[kv - 1]).collect();
    assert_eq!(Probe::visible(&out), vec![expected.clone(), expected]);

    // The same with `||`: the read happens only when `x < 0` is false.
    let p = program("attention a {\n buffer w[KV]: bool\n let x = kv - 1\n mask = x < 0 || w[x] }");
    let out = p
        .run_reference(&probe.inputs().buffer("w", bool_buffer(&w)))
        .unwrap();
    let expected: Vec<usize> = (0..5).filter(|&kv| kv == 0 || w[kv - 1]).collect();
    assert_eq!(Probe::visible(&out), vec![expected.clone(), expected]);

    // Without the guard the read at kv = 0 is out of range.
    let p = program("attention a {\n buffer w[KV]: bool\n let x = kv - 1\n mask = w[x] }");
    let err = p
        .run_reference(&probe.inputs().buffer("w", bool_buffer(&w)))
        .unwrap_err();
    assert!(err.to_string().contains("`w[-1]`"), "{err}");
}

#[test]
fn if_evaluates_only_the_taken_branch() {
    let w = [false, true, true, false];
    let p = program(
        "attention a {\n buffer w[KV]: bool\n mask = if kv == 0 { true } else { w[kv - 1] } }",
    );
    let probe = Probe::new(1, 4);
    let out = p
        .run_reference(&probe.inputs().buffer("w", bool_buffer(&w)))
        .unwrap();
    let expected: Vec<usize> = (0..4).filter(|&kv| kv == 0 || w[kv - 1]).collect();
    assert_eq!(Probe::visible(&out), vec![expected]);

    // In a score mod: the bias of key kv is bias[kv - 1], and key 0 gets none.
    let bias = [0.5f32, -1.0, 2.0];
    let p = program(
        "attention a {\n buffer bias[KV]: float\n score = if kv >= 1 { score + bias[kv - 1] } else { score } }",
    );
    let q = ramp((1, 1, 2, 3), 0.1);
    let k = ramp((1, 1, 3, 3), 0.3);
    let v = ramp((1, 1, 3, 3), 0.7);
    let inputs = Inputs::new(q.view(), k.view(), v.view())
        .with_lse()
        .buffer("bias", float_buffer(&bias));
    let out = p.run_reference(&inputs).unwrap();
    let lse = out.lse.unwrap();
    for row in 0..2 {
        let scores: Vec<f64> = (0..3)
            .map(|kv| {
                let dot: f64 = (0..3)
                    .map(|d| f64::from(q[[0, 0, row, d]]) * f64::from(k[[0, 0, kv, d]]))
                    .sum();
                dot / 3f64.sqrt()
                    + if kv >= 1 {
                        f64::from(bias[kv - 1])
                    } else {
                        0.0
                    }
            })
            .collect();
        let want = scores.iter().map(|s| s.exp()).sum::<f64>().ln();
        assert!(
            (f64::from(lse[[0, 0, row]]) - want).abs() < TOL,
            "row {row}: {} vs {want}",
            lse[[0, 0, row]]
        );
    }
}

/// Whether `j` is `i` or reached from `i` through `parent`, on a forest.
fn is_ancestor(parent: &[i64], i: usize, j: usize) -> bool {
    let mut x = i as i64;
    loop {
        if x == j as i64 {
            return true;
        }
        if x < 0 {
            return false;
        }
        x = parent[x as usize];
    }
}

#[test]
fn ancestor_follows_the_tree() {
    // 0 is the root; 1 and 2 are its children; 3 is a child of 1; 4 of 3; 5 is another root.
    let parent = [-1, 0, 0, 1, 3, -1];
    let p = program("attention tree {\n buffer parent[KV]: int\n mask = ancestor(parent, q, kv) }");
    let probe = Probe::new(6, 6);
    let out = p
        .run_reference(&probe.inputs().buffer("parent", int_buffer(&parent)))
        .unwrap();
    let expected: Vec<Vec<usize>> = (0..6)
        .map(|q| (0..6).filter(|&kv| is_ancestor(&parent, q, kv)).collect())
        .collect();
    assert_eq!(Probe::visible(&out), expected);
    assert_eq!(expected[4], vec![0, 1, 3, 4]);
    assert_eq!(expected[2], vec![0, 2]);
    assert_eq!(expected[5], vec![5]);
}

#[test]
fn ancestor_on_a_cycle_is_an_error() {
    // 0 -> 1 -> 0 loops without reaching a root or key 2.
    let parent = [1, 0, -1];
    let p = program("attention tree {\n buffer parent[KV]: int\n mask = ancestor(parent, q, kv) }");
    let probe = Probe::new(1, 3);
    let err = p
        .run_reference(&probe.inputs().buffer("parent", int_buffer(&parent)))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "`ancestor` found a cycle in buffer `parent` starting from position 0"
    );
    assert!(
        err.render().contains("must describe a forest"),
        "{}",
        err.render()
    );
}

#[test]
fn ancestor_with_a_parent_out_of_range_is_an_error() {
    let parent = [-1, 7];
    let p = program("attention tree {\n buffer parent[KV]: int\n mask = ancestor(parent, q, kv) }");
    let probe = Probe::new(2, 2);
    let err = p
        .run_reference(&probe.inputs().buffer("parent", int_buffer(&parent)))
        .unwrap_err();
    assert!(err.to_string().contains("`parent[7]`"), "{err}");
}

#[test]
fn nan_inputs_propagate_to_the_rows_that_see_them() {
    let p = program("attention a { mask = causal }");
    let (n, d) = (4, 3);
    let base = ramp((1, 1, n, d), 0.1);

    // A NaN in query row 1: that row's out and lse are NaN, the others are not.
    let mut q = base.clone();
    q[[0, 0, 1, 0]] = f32::NAN;
    let out = p
        .run_reference(&Inputs::new(q.view(), base.view(), base.view()).with_lse())
        .unwrap();
    let lse = out.lse.unwrap();
    for row in 0..n {
        let row_nan = out
            .out
            .slice(ndarray::s![0, 0, row, ..])
            .iter()
            .all(|x| x.is_nan());
        assert_eq!(row_nan, row == 1, "row {row}: {:?}", out.out);
        assert_eq!(lse[[0, 0, row]].is_nan(), row == 1, "row {row}: {lse:?}");
    }

    // A NaN in key 2: rows that see key 2 (rows 2 and 3, causal) are NaN;
    // rows 0 and 1 never see it.
    let mut k = base.clone();
    k[[0, 0, 2, 1]] = f32::NAN;
    let out = p
        .run_reference(&Inputs::new(base.view(), k.view(), base.view()).with_lse())
        .unwrap();
    let lse = out.lse.unwrap();
    for row in 0..n {
        assert_eq!(lse[[0, 0, row]].is_nan(), row >= 2, "row {row}: {lse:?}");
        assert_eq!(
            out.out[[0, 0, row, 0]].is_nan(),
            row >= 2,
            "row {row}: {:?}",
            out.out
        );
    }

    // A NaN in value 2, column 1: only that column of the rows that see key 2
    // is NaN; lse does not involve v.
    let mut v = base.clone();
    v[[0, 0, 2, 1]] = f32::NAN;
    let out = p
        .run_reference(&Inputs::new(base.view(), base.view(), v.view()).with_lse())
        .unwrap();
    for row in 0..n {
        for col in 0..d {
            assert_eq!(
                out.out[[0, 0, row, col]].is_nan(),
                row >= 2 && col == 1,
                "out[{row}, {col}]: {:?}",
                out.out
            );
        }
    }
    assert!(out.lse.unwrap().iter().all(|x| x.is_finite()));
}

#[test]
fn nan_from_a_score_mod_propagates() {
    // log of a negative number is NaN: every visible score of rows q >= 1 is NaN
    // there (kv < q), so those rows are NaN, not "empty".
    let p = program("attention a { mask = causal\n score = score + log(float(kv - q) + 0.5) }");
    let x = ramp((1, 1, 3, 2), 0.1);
    let out = p
        .run_reference(&Inputs::new(x.view(), x.view(), x.view()).with_lse())
        .unwrap();
    let lse = out.lse.unwrap();
    assert!(lse[[0, 0, 0]].is_finite(), "{lse:?}");
    assert!(
        lse[[0, 0, 1]].is_nan() && lse[[0, 0, 2]].is_nan(),
        "{lse:?}"
    );
}

#[test]
fn minus_infinity_scores_count_as_masked() {
    // Float division by zero is not an error: -1.0 / 0.0 is -inf. A row whose
    // visible scores are all -inf is empty (out 0, lse -inf).
    let p = program("attention a { score = if kv < q { score } else { -1.0 / 0.0 } }");
    let x = ramp((1, 1, 3, 2), 0.1);
    let out = p
        .run_reference(&Inputs::new(x.view(), x.view(), x.view()).with_lse())
        .unwrap();
    let lse = out.lse.unwrap();
    assert_eq!(lse[[0, 0, 0]], f32::NEG_INFINITY);
    assert!(out
        .out
        .slice(ndarray::s![0, 0, 0, ..])
        .iter()
        .all(|x| *x == 0.0));
    assert!(lse[[0, 0, 1]].is_finite() && lse[[0, 0, 2]].is_finite());
}

#[test]
fn integer_division_by_zero_in_the_mask_is_an_error() {
    let p = program("attention a {\n    mask = q % (kv - 2) == 0\n}");
    let x = ramp((1, 1, 2, 4), 0.1);
    let k = ramp((1, 1, 4, 4), 0.2);
    let err = p
        .run_reference(&Inputs::new(x.view(), k.view(), k.view()))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "integer division by zero (at b=0, h=0, q=0, kv=2)"
    );
    let text = err.render();
    assert!(text.contains("test.attn:2:12"), "{text}");
    assert!(text.contains("divides by zero here"), "{text}");
}

#[test]
fn integer_division_by_zero_in_the_scale_is_an_error() {
    let p = program("attention a { scale = float(1 / (D - D)) }");
    let x = ramp((1, 1, 2, 4), 0.1);
    let err = p
        .run_reference(&Inputs::new(x.view(), x.view(), x.view()))
        .unwrap_err();
    assert!(
        err.to_string().starts_with("integer division by zero"),
        "{err}"
    );
}

#[test]
fn param_overrides_reach_the_reference() {
    let src = "attention a { param w: int = 1\n mask = causal && q - kv < w }";
    let probe = Probe::new(4, 4);
    for w in 1..4usize {
        let options = SpecOptions {
            entry: None,
            params: vec![("w".into(), w.to_string())],
        };
        let p = attnc::load(SourceFile::new("w.attn", src), &options).unwrap();
        let out = p.run_reference(&probe.inputs()).unwrap();
        let expected: Vec<Vec<usize>> = (0..4)
            .map(|q| (0..4).filter(|&kv| kv <= q && q - kv < w).collect())
            .collect();
        assert_eq!(Probe::visible(&out), expected);
    }
}

#[test]
fn buffers_are_keyed_by_name() {
    // Binding order does not matter; the BTreeMap is only a container.
    let mut buffers = BTreeMap::new();
    buffers.insert("b2".to_string(), int_buffer(&[1, 0, 1]));
    buffers.insert("b1".to_string(), int_buffer(&[0, 0, 1]));
    let p = program("attention a { buffer b2[KV]: int\n buffer b1[KV]: int\n mask = b1[kv] == 0 && b2[kv] == 1 }");
    let probe = Probe::new(1, 3);
    let mut inputs = probe.inputs();
    inputs.buffers = buffers;
    let out = p.run_reference(&inputs).unwrap();
    assert_eq!(Probe::visible(&out), vec![vec![0]]);
}

/// A regression check on one hand-built case through the whole harness, so a
/// harness bug (e.g. comparing against itself) cannot hide: the brute force
/// must see the empty rows that a window with a large query offset leaves.
#[test]
fn harness_sees_empty_rows_of_a_sliding_window() {
    use support::specgen::*;
    let mask = MaskDesc::And(
        Box::new(MaskDesc::Atom(MaskAtom::Causal)),
        Box::new(MaskDesc::Atom(MaskAtom::Window(IntArg {
            value: 3,
            form: ArgForm::Param { default: 100 },
        }))),
    );
    let spec = GenSpec::new(
        Some(mask),
        Some(ScoreDesc::Alibi(Box::new(ScoreDesc::Score))),
        None,
        0,
    );
    assert!(
        spec.source.contains("param p0: int = 100"),
        "{}",
        spec.source
    );
    assert_eq!(spec.params, vec![("p0".to_string(), "3".to_string())]);
    let shapes = GenShapes {
        b: 2,
        h: 4,
        hkv: 2,
        q: 6,
        kv: 5,
        d: 3,
        kv_batch: 1,
        q_offset: 4,
        kv_offset: 0,
    };
    let case = GenCase {
        spec,
        shapes,
        seed: 7,
    };
    let data = case.data();
    let want = dense::attention(&case, &data).unwrap();
    // q = 4..=9 over keys 0..=4 with a window of 3: q - kv < 3 leaves rows q >= 7 empty.
    for row in 0..6 {
        let q = row as i64 + 4;
        let sees = (0..5i64).any(|kv| q >= kv && q - kv < 3);
        assert_eq!(want.lse[[0, 0, row]].is_finite(), sees, "row {row}");
    }
    assert!((0..6).any(|row| !want.lse[[0, 0, row]].is_finite()));
    assert!(!check_case(&case).unwrap(), "not an error case");
}
