//! Run-time errors name the same element on every CPU backend: the first in
//! the order of `b`, `h`, row and `kv`, at its absolute query position, with
//! the real indices (docs/language.md: "a call either succeeds for every
//! element or fails with the first error").
//!
//! The tiled backends evaluate row values, column values and tiles in their
//! own order and in parallel; what they report must not depend on it.

use attnc::codegen::clif::GemmImpl;
use attnc::{BufferData, Error, Inputs, Program, SourceFile, SpecOptions};
use ndarray::{Array1, ArrayD};

fn load(text: &str) -> Program {
    attnc::load(SourceFile::new("e.attn", text), &SpecOptions::default())
        .unwrap_or_else(|e| panic!("{}", e.render()))
}

fn ints(v: &[i64]) -> BufferData {
    BufferData::Int(Array1::from_vec(v.to_vec()).into_dyn())
}

/// Every backend's error message under several tilings; all must equal the
/// reference's, which is returned.
fn same_error_everywhere(program: &Program, inputs: &Inputs<'_>) -> String {
    let message = |r: Result<attnc::Outputs, Error>| match r {
        Err(Error::Eval { error, .. }) => error.to_string(),
        Err(e) => panic!("not a run-time error: {e}"),
        Ok(_) => "ok".to_string(),
    };
    let want = message(program.run_reference(inputs));
    assert_ne!(want, "ok", "the case must fail");
    for (bq, bkv) in [(64, 64), (16, 16), (3, 32)] {
        assert_eq!(
            message(program.run_interp(inputs, attnc::mask::Tiling { bq, bkv })),
            want,
            "interp {bq}x{bkv}"
        );
        let mut gemms = vec![GemmImpl::Jit, GemmImpl::detect()];
        gemms.dedup();
        for gemm in gemms {
            let kernel = program
                .compile_jit(attnc::mask::Tiling { bq, bkv }, gemm)
                .unwrap();
            assert_eq!(
                message(kernel.run(inputs)),
                want,
                "jit {bq}x{bkv} {}",
                gemm.name()
            );
        }
    }
    want
}

#[test]
fn a_read_that_depends_only_on_kv_reports_the_first_row() {
    // In the score mod: the block-map analysis does not evaluate it, the
    // backends compute `t[kv]` once per key column.
    let program =
        load("attention a {\n    buffer t[10]: int\n    score = score + float(t[kv])\n}\n");
    let mut rng = attnc::bench::Rng::new(1);
    let (q, k) = (rng.array4((1, 2, 30, 8)), rng.array4((1, 2, 40, 8)));
    let t = ints(&[1; 10]);
    let inputs = Inputs::new(q.view(), k.view(), k.view())
        .buffer("t", t)
        .q_offset(5);
    let e = same_error_everywhere(&program, &inputs);
    assert!(
        e.contains("`t[10]`") && e.contains("b=0, h=0, q=5, kv=10"),
        "{e}"
    );
}

#[test]
fn a_read_that_depends_only_on_the_head_reports_its_first_element() {
    let program = load("attention a {\n    buffer s[3]: float\n    score = score * s[h]\n}\n");
    let mut rng = attnc::bench::Rng::new(2);
    let (q, k) = (rng.array4((2, 4, 20, 8)), rng.array4((2, 4, 20, 8)));
    let s = BufferData::Float(ArrayD::from_elem(vec![3], 0.5));
    let inputs = Inputs::new(q.view(), k.view(), k.view())
        .buffer("s", s)
        .q_offset(100);
    let e = same_error_everywhere(&program, &inputs);
    assert!(
        e.contains("`s[3]`") && e.contains("b=0, h=3, q=100, kv=0"),
        "{e}"
    );
}

#[test]
fn the_first_error_in_order_wins_over_later_ones() {
    // Head 0 divides by zero wherever q % 7 + kv == q (first at row 0, key 0;
    // later at rows 7, 14, ...), later heads read out of range at keys past
    // 33: the first in (b, h, row, kv) order is the division at h = 0, q = 0.
    let program = load(
        "attention a {\n    buffer t[34]: int\n    mask = causal\n    score = score + float(if h > 0 { t[kv] } else { 1 / (q % 7 + kv - q) })\n}\n",
    );
    let mut rng = attnc::bench::Rng::new(3);
    let (q, k) = (rng.array4((1, 3, 50, 8)), rng.array4((1, 3, 50, 8)));
    let inputs = Inputs::new(q.view(), k.view(), k.view()).buffer("t", ints(&[0; 34]));
    let e = same_error_everywhere(&program, &inputs);
    assert!(
        e.contains("division by zero") && e.contains("b=0, h=0, q=0, kv=0"),
        "{e}"
    );
    // Past the first head only the reads fail.
    let program = load(
        "attention a {\n    buffer t[34]: int\n    mask = causal\n    score = score + float(if h > 0 { t[kv] } else { 1 })\n}\n",
    );
    let e = same_error_everywhere(&program, &inputs);
    assert!(
        e.contains("`t[34]`") && e.contains("b=0, h=1, q=34, kv=34"),
        "{e}"
    );
}

#[test]
fn an_ancestor_cycle_names_where_the_walk_started() {
    let program = load(
        "attention a {\n    buffer parent[KV]: int\n    mask = causal\n    score = if ancestor(parent, q, kv) { score } else { score - 1.0 }\n}\n",
    );
    let mut rng = attnc::bench::Rng::new(4);
    let q = rng.array4((1, 1, 12, 8));
    // Rows 0-4 walk a chain to the root; 5 -> 6 -> 5 is a cycle, entered first
    // by row 5 at key 0.
    let parent = ints(&[-1, 0, 1, 2, 3, 6, 5, 6, 7, 8, 9, 10]);
    let inputs = Inputs::new(q.view(), q.view(), q.view()).buffer("parent", parent);
    let e = same_error_everywhere(&program, &inputs);
    assert!(
        e.contains("cycle") && e.contains("starting from position 5"),
        "{e}"
    );
}
