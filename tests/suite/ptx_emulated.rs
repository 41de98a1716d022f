//! The generated PTX run on a CPU emulator (`support/ptx_emu.rs`) against
//! the tile interpreter: checks the fragment layouts, the staging, the
//! block-map walk, ragged tails, masks, the online softmax, the epilogue
//! and the error block without a GPU. The emulator models the approximate
//! instructions (`ex2.approx`, `rcp.approx`, `div.full`, `tanh.approx`, ...)
//! at the maximum error the PTX ISA allows them (`ptx_emu::Approx`), so the
//! accuracy checks here bound what the GPU can do; they cannot show what a
//! GPU actually rounds (that needs `scripts/gpu-check.sh`).
// The errors are the interpreter's, by value.
#![allow(clippy::result_large_err)]

use crate::support::common;
use crate::support::ptx_emu;
use crate::support::ptx_run;

use ptx_run::{emulate, emulate_with};

use attnc::bench::{generate_buffer, Rng};
use attnc::codegen::ptx::{self, Dtype};
use attnc::mask::classify;
use attnc::sema::eval::{EvalError, Shapes};
use attnc::tile::{self, Schedule};
use attnc::{Inputs, Outputs, SourceFile, SpecOptions};

fn interp(
    spec: &attnc::sema::Spec,
    schedule: &Schedule,
    inputs: &Inputs<'_>,
) -> Result<Outputs, EvalError> {
    let kernel = tile::lower(spec, schedule);
    let bound = attnc::bind::bind(spec, inputs).unwrap();
    let maps = classify(spec, &bound, schedule.tiling).unwrap();
    tile::interp::run(&kernel, inputs, &bound, &maps)
}

/// Largest `|a - b| / (1 + |b|)` over out and finite lse; -inf rows must agree.
fn max_err(got: &Outputs, want: &Outputs) -> f32 {
    let mut worst = 0f32;
    for (g, w) in got.out.iter().zip(want.out.iter()) {
        worst = worst.max((g - w).abs() / (1.0 + w.abs()));
    }
    for (g, w) in got
        .lse
        .as_ref()
        .unwrap()
        .iter()
        .zip(want.lse.as_ref().unwrap().iter())
    {
        if w.is_finite() {
            worst = worst.max((g - w).abs() / (1.0 + w.abs()));
        } else if g != w {
            return f32::INFINITY;
        }
    }
    if worst.is_nan() {
        f32::INFINITY
    } else {
        worst
    }
}

fn load(path: &str, params: &[(&str, &str)]) -> attnc::sema::Spec {
    let options = SpecOptions::with_params(params);
    attnc::load(
        SourceFile::read(&common::root().join(path)).unwrap(),
        &options,
    )
    .unwrap()
    .spec
}

/// Every example (and the spec dividing by constants) at a ragged size (two
/// query and two key tiles, GQA) with the GPU schedule, in f32 (FMA path)
/// and f16 (mma path), and one with a padded head dim and Q read from
/// shared memory.
#[test]
fn emulated_ptx_matches_the_tile_interpreter() {
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("examples/dense.attn", vec![]),
        ("examples/causal.attn", vec![]),
        ("examples/sliding_window.attn", vec![("window", "40")]),
        ("examples/packed_docs.attn", vec![]),
        (
            "examples/gemma2_local.attn",
            vec![("window", "50"), ("cap", "5.0")],
        ),
        ("examples/alibi.attn", vec![]),
        ("examples/t5_bias.attn", vec![]),
        ("examples/spec_tree.attn", vec![("prompt", "30")]),
        ("examples/block_sparse.attn", vec![]),
        (
            "examples/neighborhood_2d.attn",
            vec![("W", "8"), ("R", "1")],
        ),
        // Division by constants that are not powers of two (`mul.hi.u64`).
        ("tests/specs/divide_by_constant.attn", vec![]),
        // Buffer dimensions computed from params and shapes, one rounded up
        // in the kernel (`div.s64`/`rem.s64`).
        ("tests/specs/param_dims.attn", vec![("num_docs", "4")]),
        // Bounded reductions (expanded by the checker), one range set by an
        // override of its param.
        ("tests/specs/reductions.attn", vec![("top_k", "2")]),
        // sin, cos, erf, pow and sign lowered to IR ops, and the SFU's tanh
        // (2^-11 relative: the tolerance below).
        ("tests/specs/math.attn", vec![]),
        ("tests/specs/pow_sign.attn", vec![]),
        ("tests/specs/gelu_erf.attn", vec![]),
        (
            "examples/neighborhood_2d.attn",
            vec![("W", "7"), ("R", "1")],
        ),
    ];
    let (b, h, hkv, n) = (1, 2, 1, 70);
    let mut failures = Vec::new();
    for (d, dtype) in [(32, Dtype::F32), (32, Dtype::F16), (24, Dtype::Bf16)] {
        let mut rng = Rng::new(d as u64);
        let q = rng.array4((b, h, n, d));
        let k = rng.array4((b, hkv, n, d));
        let v = rng.array4((b, hkv, n, d));
        for (path, params) in &cases {
            let spec = load(path, params);
            let shapes = Shapes {
                b,
                h,
                hkv,
                q: n,
                kv: n,
                d,
            };
            let mut inputs = Inputs::new(q.view(), k.view(), v.view()).with_lse();
            for decl in &spec.buffers {
                let recipe = match decl.name.as_str() {
                    "parent" => "const:-1",
                    "slope" | "freq" => "alibi",
                    "doc" | "topk" => "docs:3",
                    _ if decl.elem == attnc::sema::Type::Bool => "bernoulli:0.5",
                    _ => "uniform",
                };
                inputs = inputs.buffer(
                    &decl.name,
                    generate_buffer(decl, &shapes, recipe, &mut rng).unwrap(),
                );
            }
            let schedule = ptx::schedule(d, dtype);
            let want = interp(&spec, &schedule, &inputs).unwrap();
            let got = emulate(&spec, &schedule, dtype, &inputs).unwrap();
            let err = max_err(&got, &want);
            let tol = match dtype {
                // `tanh_approx` is `tanh.approx.f32` on the GPU, 2^-10.987
                // relative, where the interpreter computes the CPU's form.
                Dtype::F32 if spec.name == "math" => 2e-3,
                Dtype::F32 => 1e-4,
                _ => 1e-2,
            };
            eprintln!("{:22} D={d} {dtype:4}: {err:.2e}", spec.name);
            if err > tol {
                failures.push(format!("{} D={d} {dtype}: error {err:.3e}", spec.name));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// K/V read in place (`KvSource::InPlace`): a shuffled paged pool (page
/// sizes 7 and 16) and dense rows of ragged lengths, decode (Q = 1) and a
/// chunked prefill (Q = 20, past a page boundary), GQA 2, every dtype and
/// both `cp.async` splits (D = 24 in bf16 takes the general one). Every
/// stale slot holds NaN. The emulated PTX matches the tile interpreter of
/// the same nest, and the pool and the dense rows give the same outputs.
#[test]
fn emulated_ptx_reads_paged_pools_and_ragged_rows() {
    let specs: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("examples/causal.attn", vec![]),
        ("examples/sliding_window.attn", vec![("window", "40")]),
        ("examples/alibi.attn", vec![]),
        ("examples/packed_docs.attn", vec![]),
    ];
    let (h, hkv) = (4, 2);
    let mut failures = Vec::new();
    for (d, dtype) in [(32, Dtype::F32), (32, Dtype::F16), (24, Dtype::Bf16)] {
        for (q_len, ps) in [(1, 16), (20, 7)] {
            let lens = [q_len, 37, 90];
            let (b, kv_max) = (lens.len(), 90);
            let mut rng = Rng::new((d * 100 + q_len) as u64);
            let r = common::ragged(&lens, (h, hkv, q_len, d), ps, &mut rng);
            let (q, k, v, table, lens_arr) = (&r.q, &r.k, &r.v, &r.table, &r.lens);
            let (kp, vp) = (&r.k_pages, &r.v_pages);
            for (path, params) in &specs {
                let spec = load(path, params);
                let shapes = Shapes {
                    b,
                    h,
                    hkv,
                    q: q_len,
                    kv: kv_max,
                    d,
                };
                let mut buffers = Vec::new();
                for decl in &spec.buffers {
                    let recipe = if decl.name == "slope" {
                        "alibi"
                    } else {
                        "docs:3"
                    };
                    let data = generate_buffer(decl, &shapes, recipe, &mut rng).unwrap();
                    buffers.push((decl.name.clone(), data));
                }
                let paged = with_buffers(
                    Inputs::paged(
                        q.view(),
                        kp.view(),
                        vp.view(),
                        table.view(),
                        lens_arr.view(),
                    ),
                    &buffers,
                );
                let dense = with_buffers(
                    Inputs::new(q.view(), k.view(), v.view()).kv_lens(lens_arr.view()),
                    &buffers,
                );
                let schedule = Schedule {
                    kv: tile::nest::KvSource::InPlace,
                    ..ptx::schedule(d, dtype)
                };
                let want = interp(&spec, &schedule, &dense).unwrap();
                let tol = if dtype == Dtype::F32 { 1e-4 } else { 1e-2 };
                let mut outs = Vec::new();
                for (layout, inputs) in [("pool", &paged), ("dense rows", &dense)] {
                    let got = emulate(&spec, &schedule, dtype, inputs).unwrap();
                    let err = max_err(&got, &want);
                    eprintln!(
                        "{:16} D={d} {dtype:4} Q={q_len} page {ps} {layout}: {err:.2e}",
                        spec.name
                    );
                    if err > tol {
                        failures.push(format!(
                            "{} D={d} {dtype} Q={q_len} page {ps} {layout}: error {err:.3e}",
                            spec.name
                        ));
                    }
                    outs.push(got);
                }
                if outs[0] != outs[1] {
                    failures.push(format!(
                        "{} D={d} {dtype} Q={q_len} page {ps}: the pool and the dense rows differ",
                        spec.name
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Quantized K/V (int8, fp8 e4m3fn, a float32 scale per row) read in place
/// and dequantized in the tile loads, for every compute type: a shuffled
/// paged pool and dense ragged rows, decode and a chunked prefill. Stale
/// slots hold NaN scales (and NaN fp8 bits). The emulated PTX matches the
/// tile interpreter on the same stored values.
#[test]
fn emulated_ptx_dequantizes_int8_and_fp8_pools() {
    use attnc::{ElemType, KvArray};
    let (h, hkv) = (4, 2);
    let spec = load("examples/sliding_window.attn", &[("window", "40")]);
    let mut failures = Vec::new();
    for (d, dtype) in [(32, Dtype::F32), (32, Dtype::F16), (24, Dtype::Bf16)] {
        for (q_len, ps) in [(1, 16), (20, 7)] {
            let lens = [q_len, 37, 90];
            let b = lens.len();
            let kv_max = 90;
            let mut rng = Rng::new((d * 10 + q_len) as u64);
            let q = rng.array4((b, h, q_len, d));
            let k = rng.array4((b, hkv, kv_max, d));
            let v = rng.array4((b, hkv, kv_max, d));
            let (kp, vp, table) = common::paged_pool(&k, &v, &lens, ps, &mut rng);
            let lens_arr = ndarray::Array1::from_iter(lens.iter().map(|&n| n as i32));
            let mut used = vec![vec![false; ps]; kp.dim().0];
            for (bi, &n) in lens.iter().enumerate() {
                for j in 0..n {
                    used[table[[bi, j / ps]] as usize][j % ps] = true;
                }
            }
            for elem in [ElemType::Int8, ElemType::Fp8] {
                // Stale rows: NaN scales (and NaN fp8 bits) past each length.
                let stale = |a: &mut KvArray, live: &dyn Fn(usize, usize) -> bool| {
                    if let KvArray::Int8 { scales, .. } | KvArray::Fp8 { scales, .. } = a {
                        for ((i, j, _), x) in scales.indexed_iter_mut() {
                            if !live(i, j) {
                                *x = f32::NAN;
                            }
                        }
                    }
                    if let KvArray::Fp8 { data, .. } = a {
                        for ((i, j, _, _), x) in data.indexed_iter_mut() {
                            if !live(i, j) {
                                *x = 0x7f;
                            }
                        }
                    }
                };
                let quantize = |x: &ndarray::Array4<f32>| KvArray::quantize(x.view(), elem);
                let (mut kq, mut vq) = (quantize(&k), quantize(&v));
                let (mut kpq, mut vpq) = (quantize(&kp), quantize(&vp));
                // Dense rows [B, HKV, KV]: key j of sequence b is live below its length.
                for a in [&mut kq, &mut vq] {
                    if let KvArray::Int8 { scales, .. } | KvArray::Fp8 { scales, .. } = a {
                        for ((bi, _, j), x) in scales.indexed_iter_mut() {
                            if j >= lens[bi] {
                                *x = f32::NAN;
                            }
                        }
                    }
                }
                for a in [&mut kpq, &mut vpq] {
                    stale(a, &|p, slot| used[p][slot]);
                }
                let paged = Inputs::paged(
                    q.view(),
                    kpq.view(),
                    vpq.view(),
                    table.view(),
                    lens_arr.view(),
                )
                .with_lse();
                let dense = Inputs::new(q.view(), kq.view(), vq.view())
                    .kv_lens(lens_arr.view())
                    .with_lse();
                let schedule = Schedule {
                    kv: tile::nest::KvSource::InPlace,
                    ..ptx::schedule(d, dtype)
                };
                let want = interp(&spec, &schedule, &dense).unwrap();
                let tol = if dtype == Dtype::F32 { 1e-4 } else { 1e-2 };
                for (layout, inputs) in [("pool", &paged), ("dense rows", &dense)] {
                    let got = emulate(&spec, &schedule, dtype, inputs).unwrap();
                    let err = max_err(&got, &want);
                    eprintln!("D={d} {dtype:4} {elem} Q={q_len} page {ps} {layout}: {err:.2e}");
                    if err.is_nan() || err > tol {
                        failures.push(format!(
                            "D={d} {dtype} {elem} Q={q_len} page {ps} {layout}: error {err:.3e}"
                        ));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Other layouts: Q from shared memory (heavy scores at D = 128), padded
/// head dims with the general `cp.async` split, one-warp and eight-warp
/// tiles, natural-exp units, a query offset with a broadcast k/v batch.
#[test]
fn emulated_ptx_matches_in_other_layouts() {
    let sched = |bq, bkv, d, exp2| Schedule {
        tiling: attnc::mask::Tiling { bq, bkv },
        dim: Some(d),
        exp2,
        ..Schedule::default()
    };
    // (spec, schedule, dtype, (B, H, HKV, k/v batch, Q, query offset))
    type Case = (
        &'static str,
        Schedule,
        Dtype,
        (usize, usize, usize, usize, usize, i64),
    );
    let cases: Vec<Case> = vec![
        (
            "examples/t5_bias.attn",
            ptx::schedule(128, Dtype::F16),
            Dtype::F16,
            (1, 1, 1, 1, 70, 0),
        ),
        (
            "examples/causal.attn",
            ptx::schedule(80, Dtype::F16),
            Dtype::F16,
            (1, 2, 2, 1, 70, 0),
        ),
        (
            "examples/alibi.attn",
            ptx::schedule(40, Dtype::F32),
            Dtype::F32,
            (1, 2, 2, 1, 70, 0),
        ),
        (
            "examples/packed_docs.attn",
            sched(16, 16, 16, true),
            Dtype::F16,
            (1, 1, 1, 1, 45, 0),
        ),
        (
            "examples/packed_docs.attn",
            sched(128, 128, 16, true),
            Dtype::Bf16,
            (1, 1, 1, 1, 150, 0),
        ),
        (
            "examples/softcap.attn",
            sched(64, 64, 32, false),
            Dtype::F32,
            (1, 1, 1, 1, 70, 0),
        ),
        (
            "examples/causal.attn",
            ptx::schedule(32, Dtype::F16),
            Dtype::F16,
            (2, 2, 1, 1, 30, 40),
        ),
    ];
    let mut failures = Vec::new();
    for (path, schedule, dtype, (b, h, hkv, kv_b, n, q_offset)) in cases {
        let spec = load(path, &[]);
        let d = schedule.dim.unwrap();
        let mut rng = Rng::new(d as u64 + 1);
        let kv_n = n + q_offset as usize;
        let (q, k, v, shapes) = common::random_qkv(&mut rng, (b, h, hkv, d), (kv_b, n, kv_n), kv_n);
        let inputs = with_buffers(
            Inputs::new(q.view(), k.view(), v.view()).q_offset(q_offset),
            &common::buffers_for(&spec, &shapes, &mut rng),
        );
        let want = interp(&spec, &schedule, &inputs).unwrap();
        let got = emulate(&spec, &schedule, dtype, &inputs).unwrap();
        let err = max_err(&got, &want);
        let tol = if dtype == Dtype::F32 { 1e-4 } else { 1e-2 };
        eprintln!(
            "{:14} {}x{} D={d} {dtype:4}: {err:.2e}",
            spec.name, schedule.tiling.bq, schedule.tiling.bkv
        );
        if err > tol {
            failures.push(format!(
                "{} {}x{} D={d} {dtype}: error {err:.3e}",
                spec.name, schedule.tiling.bq, schedule.tiling.bkv
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn with_buffers<'a>(mut inputs: Inputs<'a>, buffers: &[(String, attnc::BufferData)]) -> Inputs<'a> {
    for (name, data) in buffers {
        inputs = inputs.buffer(name, data.clone());
    }
    inputs.with_lse()
}

/// Key offsets (`kv = kv_offset + key row`), as blocks of ring attention
/// compute them: dense K/V whose keys come before, overlap or follow the
/// queries (rows that see no key: out 0, lse -inf), and ragged rows and a
/// shuffled pool (NaN in every stale slot) whose queries end on keys 1000
/// positions in (and a decode step 2e9 positions in). The specs read positions absolutely (the sinks of
/// `streaming_llm`, the `doc[KV]` table of `packed_docs`), so a kernel that
/// dropped the offset fails. The emulated PTX matches the tile interpreter;
/// and the blocks of one call, merged, give the whole call.
#[test]
fn emulated_ptx_takes_key_offsets() {
    let specs: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("examples/causal.attn", vec![]),
        (
            "examples/streaming_llm.attn",
            vec![("sinks", "4"), ("window", "20")],
        ),
        ("examples/packed_docs.attn", vec![]),
        ("examples/alibi.attn", vec![]),
    ];
    let (h, hkv, d) = (4, 2, 32);
    let mut failures = Vec::new();
    let mut check = |what: String, got: &Outputs, want: &Outputs, tol: f32| {
        let err = max_err(got, want);
        eprintln!("{what}: {err:.2e}");
        if err > tol {
            failures.push(format!("{what}: error {err:.3e}"));
        }
    };
    for dtype in [Dtype::F32, Dtype::F16] {
        let tol = if dtype == Dtype::F32 { 1e-4 } else { 1e-2 };
        let mut rng = Rng::new(17 + dtype as u64);
        for (path, params) in &specs {
            let spec = load(path, params);
            // Dense K/V: (query offset, Q, key offset, key rows).
            let dense = ptx::schedule(d, dtype);
            for (q_offset, q_len, kv_offset, rows) in
                [(90, 30, 0, 70), (40, 30, 50, 60), (0, 20, 1000, 40)]
            {
                let end = (q_offset + q_len).max(kv_offset + rows);
                let (q, k, v, shapes) =
                    common::random_qkv(&mut rng, (2, h, hkv, d), (2, q_len, rows), end);
                let buffers = common::buffers_for(&spec, &shapes, &mut rng);
                let inputs = with_buffers(
                    Inputs::new(q.view(), k.view(), v.view())
                        .q_offset(q_offset as i64)
                        .kv_offset(kv_offset as i64),
                    &buffers,
                );
                let want = interp(&spec, &dense, &inputs).unwrap();
                let got = emulate(&spec, &dense, dtype, &inputs).unwrap();
                check(
                    format!(
                        "{} {dtype} queries at {q_offset}, {rows} keys at {kv_offset}",
                        spec.name
                    ),
                    &got,
                    &want,
                    tol,
                );
                // The same queries on the keys split in two blocks, merged;
                // each block takes the prefix of `doc[KV]` its positions end.
                let cut = rows / 2 + 3;
                let part = |r: std::ops::Range<usize>| {
                    let (k, v) = (
                        k.slice(ndarray::s![.., .., r.clone(), ..]),
                        v.slice(ndarray::s![.., .., r.clone(), ..]),
                    );
                    let block_end = (q_offset + q_len).max(kv_offset + r.end);
                    let prefix = common::kv_prefix(&buffers, block_end);
                    let inputs = with_buffers(
                        Inputs::new(q.view(), k, v)
                            .q_offset(q_offset as i64)
                            .kv_offset((kv_offset + r.start) as i64),
                        &prefix,
                    );
                    emulate(&spec, &dense, dtype, &inputs).unwrap()
                };
                let (a, c) = (part(0..cut), part(cut..rows));
                let merged = attnc::merge_states(&[
                    (a.out.view(), a.lse.as_ref().unwrap().view()),
                    (c.out.view(), c.lse.as_ref().unwrap().view()),
                ])
                .unwrap();
                check(
                    format!(
                        "{} {dtype} queries at {q_offset}, keys at {kv_offset} in two blocks, merged",
                        spec.name
                    ),
                    &merged,
                    &want,
                    tol,
                );
            }
            // In place: ragged rows and a pool, queries ending on keys at
            // kv_offset + 0 .. len.
            let in_place = Schedule {
                kv: tile::nest::KvSource::InPlace,
                ..ptx::schedule(d, dtype)
            };
            // The last: a decode step 2e9 positions in (past the kernel's
            // 32-bit sizes; positions are s64), for specs without a table
            // of positions.
            let big = spec.buffers.iter().all(|b| b.name != "doc");
            let steps = [(1, 16, 1000), (20, 7, 1000), (1, 16, 2_000_000_000)];
            for (q_len, ps, kv_offset) in steps.into_iter().take(if big { 3 } else { 2 }) {
                let lens = [q_len, 37, 90];
                let r = common::ragged(&lens, (h, hkv, q_len, d), ps, &mut rng);
                let shapes = Shapes {
                    b: lens.len(),
                    h,
                    hkv,
                    q: q_len,
                    kv: kv_offset + 90,
                    d,
                };
                let buffers = common::buffers_for(&spec, &shapes, &mut rng);
                let paged = with_buffers(
                    Inputs::paged(
                        r.q.view(),
                        r.k_pages.view(),
                        r.v_pages.view(),
                        r.table.view(),
                        r.lens.view(),
                    )
                    .kv_offset(kv_offset as i64),
                    &buffers,
                );
                let rows = with_buffers(
                    Inputs::new(r.q.view(), r.k.view(), r.v.view())
                        .kv_lens(r.lens.view())
                        .kv_offset(kv_offset as i64),
                    &buffers,
                );
                let want = interp(&spec, &in_place, &rows).unwrap();
                for (layout, inputs) in [("pool", &paged), ("ragged rows", &rows)] {
                    let got = emulate(&spec, &in_place, dtype, inputs).unwrap();
                    check(
                        format!(
                            "{} {dtype} Q={q_len} {layout}, keys at {kv_offset}",
                            spec.name
                        ),
                        &got,
                        &want,
                        tol,
                    );
                }
                if spec.name == "streaming_llm" {
                    // The sinks (kv < 4) are 1000 positions before these keys.
                    let at_zero = with_buffers(
                        Inputs::new(r.q.view(), r.k.view(), r.v.view()).kv_lens(r.lens.view()),
                        &buffers,
                    );
                    let unshifted = interp(&spec, &in_place, &at_zero).unwrap();
                    assert!(
                        max_err(&unshifted, &want) > 1e-2,
                        "the key offset must change what streaming_llm sees"
                    );
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn emulated_ptx_reports_the_interpreter_error() {
    let src = "attention a { buffer pos[KV]: int\n score = score + float(pos[q - kv]) }";
    let spec = attnc::load(SourceFile::new("a.attn", src), &SpecOptions::default())
        .unwrap()
        .spec;
    let mut rng = Rng::new(3);
    let q = rng.array4((1, 1, 20, 16));
    let schedule = ptx::schedule(16, Dtype::F16);
    // With a key offset the error names the key's position, not its row:
    // at offset 100 no position is a row.
    for kv_offset in [0, 100] {
        let pos = attnc::BufferData::Int(ndarray::Array1::zeros(20 + kv_offset).into_dyn());
        let inputs = Inputs::new(q.view(), q.view(), q.view())
            .kv_offset(kv_offset as i64)
            .buffer("pos", pos);
        match emulate(&spec, &schedule, Dtype::F16, &inputs) {
            Err(EvalError::OutOfRange {
                buffer, index, at, ..
            }) => {
                assert_eq!(buffer, "pos");
                assert_eq!(index, vec![at.q - at.kv]);
                assert!(index[0] < 0);
                assert!((kv_offset as i64..kv_offset as i64 + 20).contains(&at.kv));
            }
            other => panic!(
                "expected an out-of-range read, got {:?}",
                other.map(|o| o.out.shape().to_vec())
            ),
        }
    }
}

// ---- non-finite inputs --------------------------------------------------------------

/// Whether `got` matches the reference value `want` in class (NaN, ±inf,
/// finite) and, when finite, within `tol` relative. With `nonfinite_ok`,
/// an infinite reference value may come out as any non-finite value (inf
/// in V at a visible key: the online softmax may rescale it into NaN).
fn same_class(got: f32, want: f32, tol: f32, nonfinite_ok: bool) -> bool {
    if want.is_nan() {
        got.is_nan()
    } else if want.is_infinite() {
        got == want || (nonfinite_ok && !got.is_finite())
    } else {
        (got - want).abs() <= tol * (1.0 + want.abs())
    }
}

/// One non-finite case: a spec, the shapes `(B, H, HKV, k/v batch, Q, KV,
/// D)`, how q, k and v are poisoned, an optional bool buffer `keep[KV]`,
/// and what the reference must show (so that the case tests what it says).
struct Poison {
    name: &'static str,
    src: &'static str,
    shape: (usize, usize, usize, usize, usize, usize, usize),
    poison: fn(&mut ndarray::Array4<f32>, &mut ndarray::Array4<f32>, &mut ndarray::Array4<f32>),
    keep: Option<fn(usize) -> bool>,
    nonfinite_ok: bool,
    expect: fn(&Outputs),
}

fn all_finite(o: &Outputs) {
    assert!(
        o.out.iter().all(|x| x.is_finite()),
        "reference out not finite"
    );
    assert!(
        o.lse.as_ref().unwrap().iter().all(|x| x.is_finite()),
        "reference lse not finite"
    );
}

/// Rows `< 10` of every head finite; from 10 on, head `h` row `r` has a
/// non-finite out in dim `c` exactly when `bad(h, c)`.
fn rows_from_10(o: &Outputs, bad: fn(usize, usize) -> bool) {
    for ((_, h, r, c), x) in o.out.indexed_iter() {
        assert_eq!(
            !x.is_finite(),
            r >= 10 && bad(h, c),
            "reference out[{h}, {r}, {c}] = {x}"
        );
    }
}

const NON_FINITE: [Poison; 9] = [
    Poison {
        // The case: NaN, ±inf and (f16: inf once packed) 1e6 in V and
        // NaN in K past `len`, over a k/v batch and GQA.
        name: "kv < len, V NaN/inf/1e6 and K NaN past len",
        src: "attention t {\n param len: int = 10\n mask = kv < len\n}",
        shape: (2, 4, 2, 2, 70, 100, 24),
        poison: |_, k, v| {
            let vals = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e6];
            for (i, x) in v.slice_mut(ndarray::s![.., .., 10.., ..]).iter_mut().enumerate() {
                *x = vals[i % 4];
            }
            k.slice_mut(ndarray::s![.., .., 40.., ..]).fill(f32::NAN);
        },
        keep: None,
        nonfinite_ok: false,
        expect: all_finite,
    },
    Poison {
        // Every key tile PARTIAL; poisoned in one k/v batch and head only.
        name: "keep[kv], K and V NaN at dropped keys",
        src: "attention t {\n buffer keep[KV]: bool\n mask = keep[kv]\n}",
        shape: (2, 4, 2, 2, 40, 70, 24),
        poison: |_, k, v| {
            for kv in (0..70).filter(|kv| kv % 3 == 1) {
                k.slice_mut(ndarray::s![1, 1, kv, ..]).fill(f32::NAN);
                v.slice_mut(ndarray::s![1, 1, kv, ..]).fill(f32::NAN);
            }
        },
        keep: Some(|kv| kv % 3 != 1),
        nonfinite_ok: false,
        expect: all_finite,
    },
    Poison {
        // Rows 0-9 cannot see key 10; rows from 64 on see its tile as FULL.
        name: "causal, V[10, 4] = inf",
        src: "attention t { mask = causal }",
        shape: (1, 2, 2, 1, 70, 70, 24),
        poison: |_, _, v| v[[0, 1, 10, 4]] = f32::INFINITY,
        keep: None,
        nonfinite_ok: true,
        expect: |o| rows_from_10(o, |h, c| h == 1 && c == 4),
    },
    Poison {
        name: "causal, K[10] = NaN",
        src: "attention t { mask = causal }",
        shape: (1, 2, 2, 1, 70, 70, 24),
        poison: |_, k, _| k.slice_mut(ndarray::s![0, 0, 10, ..]).fill(f32::NAN),
        keep: None,
        nonfinite_ok: false,
        expect: |o| {
            rows_from_10(o, |h, _| h == 0);
            let lse = o.lse.as_ref().unwrap();
            assert!(lse[[0, 0, 10]].is_nan() && lse[[0, 1, 10]].is_finite() && lse[[0, 0, 9]].is_finite());
        },
    },
    Poison {
        // A NaN in V at a visible key: NaN in that dim of every row, lse finite.
        name: "kv < len, V[5, 3] = NaN (visible)",
        src: "attention t {\n param len: int = 10\n mask = kv < len\n}",
        shape: (1, 1, 1, 1, 20, 70, 24),
        poison: |_, _, v| v[[0, 0, 5, 3]] = f32::NAN,
        keep: None,
        nonfinite_ok: false,
        expect: |o| {
            assert!(o.out.indexed_iter().all(|((_, _, _, c), x)| x.is_nan() == (c == 3)));
            assert!(o.lse.as_ref().unwrap().iter().all(|x| x.is_finite()));
        },
    },
    Poison {
        // A score mod that is NaN everywhere: NaN rows, not empty ones.
        name: "score = sqrt(score - 100.0)",
        src: "attention t {\n mask = causal\n score = sqrt(score - 100.0)\n}",
        shape: (1, 1, 1, 1, 20, 20, 16),
        poison: |_, _, _| {},
        keep: None,
        nonfinite_ok: false,
        expect: |o| {
            assert!(o.out.iter().all(|x| x.is_nan()));
            assert!(o.lse.as_ref().unwrap().iter().all(|x| x.is_nan()));
        },
    },
    Poison {
        name: "score = NaN at (q 5, kv 3) only",
        src: "attention t {\n mask = causal\n score = if q == 5 && kv == 3 { sqrt(-1.0 - score * score) } else { score % 0.5 }\n}",
        shape: (1, 1, 1, 1, 20, 20, 16),
        poison: |_, _, _| {},
        keep: None,
        nonfinite_ok: false,
        expect: |o| {
            let lse = o.lse.as_ref().unwrap();
            assert!((0..20).all(|r| lse[[0, 0, r]].is_nan() == (r == 5)));
        },
    },
    Poison {
        // The NaN score is in the row's first key tile; later tiles are larger,
        // so a maximum that skipped NaN would rescale it away.
        name: "NaN score in an early tile",
        src: "attention t {\n score = if kv == 0 { sqrt(-1.0 - score * score) } else { score + 10.0 }\n}",
        shape: (1, 1, 1, 1, 9, 200, 16),
        poison: |_, _, _| {},
        keep: None,
        nonfinite_ok: false,
        expect: |o| assert!(o.out.iter().all(|x| x.is_nan())),
    },
    Poison {
        // Rows 0-3 see no key, rows 4-7 score every key -inf (V NaN at a key
        // they score -inf): out 0, lse -inf. Rows from 8 see the NaN: NaN.
        name: "empty and all -inf rows, NaN at key 29",
        src: "attention t {\n mask = q >= 4 || kv < 0\n score = if q < 8 { -1.0 / 0.0 } else { score }\n}",
        shape: (1, 1, 1, 1, 12, 30, 16),
        poison: |_, k, v| {
            k[[0, 0, 29, 0]] = f32::NAN;
            v.slice_mut(ndarray::s![0, 0, 29, ..]).fill(f32::NAN);
        },
        keep: None,
        nonfinite_ok: false,
        expect: |o| {
            let lse = o.lse.as_ref().unwrap();
            for r in 0..12 {
                let row = o.out.slice(ndarray::s![0, 0, r, ..]);
                if r < 8 {
                    assert!(lse[[0, 0, r]] == f32::NEG_INFINITY && row.iter().all(|&x| x == 0.0));
                } else {
                    assert!(lse[[0, 0, r]].is_nan() && row.iter().all(|x| x.is_nan()));
                }
            }
        },
    },
];

/// NaN and inf in K and V at keys the mask rules out never reach the
/// output; NaN at a visible key or a NaN score makes the row NaN (out and
/// lse), never an empty row; rows that see nothing stay out = 0, lse = -inf.
/// Compared with the reference interpreter element by element in class and,
/// where finite, in value, in every dtype under the GPU schedule and 16 x 16
/// tiles. In f16/bf16 the flagged V tiles take the exact P V path, the
/// others `mma.sync`; in f32 every product skips p = 0.
#[test]
fn emulated_ptx_keeps_non_finite_values_at_masked_keys_out() {
    let mut failures = Vec::new();
    for case in &NON_FINITE {
        let (b, h, hkv, kv_b, nq, nkv, d) = case.shape;
        let program = attnc::load(SourceFile::new("t.attn", case.src), &SpecOptions::default())
            .unwrap_or_else(|e| panic!("{}", e.render()));
        let mut rng = Rng::new(nkv as u64 + d as u64);
        let mut q = rng.array4((b, h, nq, d));
        let mut k = rng.array4((kv_b, hkv, nkv, d));
        let mut v = rng.array4((kv_b, hkv, nkv, d));
        (case.poison)(&mut q, &mut k, &mut v);
        let mut inputs = Inputs::new(q.view(), k.view(), v.view()).with_lse();
        if let Some(keep) = case.keep {
            let keep = ndarray::Array1::from_shape_fn(nkv, keep).into_dyn();
            inputs = inputs.buffer("keep", attnc::BufferData::Bool(keep));
        }
        let want = program.run_reference(&inputs).unwrap();
        (case.expect)(&want);
        let want_lse = want.lse.as_ref().unwrap();
        for dtype in Dtype::ALL {
            let tiny = Schedule {
                tiling: attnc::mask::Tiling { bq: 16, bkv: 16 },
                dim: Some(d),
                exp2: true,
                ..Schedule::default()
            };
            for schedule in [ptx::schedule(d, dtype), tiny] {
                let got = emulate(&program.spec, &schedule, dtype, &inputs).unwrap();
                let tol = if dtype == Dtype::F32 { 1e-4 } else { 2e-2 };
                let mut bad = Vec::new();
                let mut worst = 0f32;
                for ((idx, &g), &w) in got.out.indexed_iter().zip(want.out.iter()) {
                    if !same_class(g, w, tol, case.nonfinite_ok) {
                        bad.push(format!("out{idx:?} = {g}, reference {w}"));
                    } else if w.is_finite() {
                        worst = worst.max((g - w).abs() / (1.0 + w.abs()));
                    }
                }
                for ((idx, &g), &w) in got
                    .lse
                    .as_ref()
                    .unwrap()
                    .indexed_iter()
                    .zip(want_lse.iter())
                {
                    if !same_class(g, w, tol, false) {
                        bad.push(format!("lse{idx:?} = {g}, reference {w}"));
                    } else if w.is_finite() {
                        worst = worst.max((g - w).abs() / (1.0 + w.abs()));
                    }
                }
                eprintln!(
                    "{:46} {}x{} {dtype:4}: {} mismatches, max rel err {worst:.2e}",
                    case.name,
                    schedule.tiling.bq,
                    schedule.tiling.bkv,
                    bad.len()
                );
                if !bad.is_empty() {
                    failures.push(format!(
                        "{} {}x{} {dtype}: {} mismatches, e.g. {}",
                        case.name,
                        schedule.tiling.bq,
                        schedule.tiling.bkv,
                        bad.len(),
                        bad[..bad.len().min(3)].join("; ")
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---- approximate arithmetic: soft-capping and float division -------------------------

/// A program from a path under the repository root or from source text,
/// with param overrides.
fn program_of(path_or_src: &str, params: &[(&str, &str)]) -> attnc::Program {
    let options = SpecOptions::with_params(params);
    let file = if path_or_src.ends_with(".attn") {
        SourceFile::read(&common::root().join(path_or_src)).unwrap()
    } else {
        SourceFile::new("t.attn", path_or_src)
    };
    attnc::load(file, &options).unwrap_or_else(|e| panic!("{}", e.render()))
}

/// Float divisions by element-, row- and head-level values (none of them a
/// constant, so none is a multiply in the loop IR) and a sigmoid, each term
/// well conditioned so the f16/bf16 input rounding stays within tolerance.
const DIVISIONS: &str = "attention divisions {
    buffer temp[H]: float
    mask = causal
    let d = float(q - kv)
    score = score / temp[h] + (d + 1.0) / (d + 4.0 + score * score) - 2.0 * score / (1.0 + d)
        + sigmoid(score / (0.25 + float(kv % 3))) / float(q + 1)
}";

/// Soft-capping (`tanh`) and float division against the f64 reference with
/// the parity tolerances the CUDA tests promise (1e-4 f32, 1e-2 f16/bf16),
/// in every dtype under the GPU schedule, with the approximate instructions
/// off by their full PTX ISA bounds: scattered, all toward zero and all away
/// from zero (and exact, for comparison). Soft-cap inputs cover tanh near 0
/// (cap 50, unit inputs), across its range (cap 5, scores of a few units)
/// and saturated (cap 50, scores around 140, where `tanh.approx`'s 2^-11
/// is an error of up to 0.024 in the score).
#[test]
fn emulated_ptx_soft_cap_and_division_within_parity_tolerance() {
    use ptx_emu::Approx;
    // (name, spec, params, q/k offset, q/k scale)
    type Case = (
        &'static str,
        &'static str,
        Vec<(&'static str, &'static str)>,
        f32,
        f32,
    );
    let cases: Vec<Case> = vec![
        (
            "gemma2_local cap 50",
            "examples/gemma2_local.attn",
            vec![("window", "50")],
            0.0,
            1.0,
        ),
        (
            "gemma2_local cap 5, scores x9",
            "examples/gemma2_local.attn",
            vec![("window", "50"), ("cap", "5.0")],
            0.0,
            3.0,
        ),
        (
            "gemma2_local cap 50, saturated",
            "examples/gemma2_local.attn",
            vec![("window", "50")],
            5.0,
            1.0,
        ),
        ("softcap cap 50", "examples/softcap.attn", vec![], 0.0, 1.0),
        (
            "softcap cap 2, scores x4",
            "examples/softcap.attn",
            vec![("cap", "2.0"), ("qpas", "32.0")],
            0.0,
            2.0,
        ),
        ("divisions", DIVISIONS, vec![], 0.0, 1.0),
    ];
    let (b, h, hkv, n, d) = (1, 2, 1, 70, 32);
    let mut failures = Vec::new();
    for (name, src, params, offset, scale) in &cases {
        let program = program_of(src, params);
        let spec = &program.spec;
        let mut rng = Rng::new(7);
        let q = rng.array4((b, h, n, d)).mapv(|x| offset + scale * x);
        let k = rng.array4((b, hkv, n, d)).mapv(|x| offset + scale * x);
        let v = rng.array4((b, hkv, n, d));
        let mut inputs = Inputs::new(q.view(), k.view(), v.view()).with_lse();
        if spec.buffers.iter().any(|b| b.name == "temp") {
            let temp = ndarray::Array1::from_vec(vec![0.75f32, 1.5]).into_dyn();
            inputs = inputs.buffer("temp", attnc::BufferData::Float(temp));
        }
        let want = program.run_reference(&inputs).unwrap();
        for dtype in Dtype::ALL {
            let tol = if dtype == Dtype::F32 { 1e-4 } else { 1e-2 };
            let schedule = ptx::schedule(d, dtype);
            let mut line = format!("{name:32} {dtype:4}:");
            for approx in [Approx::Exact, Approx::Scattered, Approx::Low, Approx::High] {
                let got = emulate_with(spec, &schedule, dtype, &inputs, approx).unwrap();
                let err = max_err(&got, &want);
                line += &format!(" {approx:?} {err:.2e}");
                if err > tol {
                    failures.push(format!(
                        "{name} {dtype} {approx:?}: error {err:.3e} (tolerance {tol:.0e})"
                    ));
                }
            }
            eprintln!("{line}");
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Special operands of float division, `tanh` and `sigmoid` keep the tile
/// interpreter's results (f32, IEEE) in class and value: each row adds
/// `f(x[q], y[q])` to all its scores, so a finite value shifts the row's lse
/// by it, -inf empties the row (out 0, lse -inf), NaN and +inf make it NaN.
/// Operands: ±0, ±inf, NaN, subnormals, |y| > 2^126 (which `div.full`
/// scales), quotients that overflow or underflow, and subnormal results
/// (`log` of one is finite, -inf had it been flushed to 0). In
/// every dtype, with the approximate instructions scattered at their bounds.
#[test]
fn emulated_ptx_float_specials_keep_the_interpreter_class() {
    let (inf, nan, sub) = (f32::INFINITY, f32::NAN, 1e-40f32);
    let pairs: [(f32, f32); 24] = [
        (1.0, 0.0),
        (-1.0, 0.0),
        (1.0, -0.0),
        (0.0, 0.0),
        (nan, 1.0),
        (1.0, nan),
        (1.0, inf),
        (inf, inf),
        (inf, 2.0),
        (-inf, 2.0),
        (3.0, sub),
        (sub, sub),
        (sub, 3.0),
        (-sub, 0.5),
        (3e38, 0.5),
        (3e38, 3e38),
        (1e-30, 3e38),
        (-7.0, -3e-39),
        (5.0, 2.0),
        (-87.5, 1.0),
        (-88.5, 1.0),
        (-89.0, 1.0),
        (0.1, -0.3),
        (44.0, -0.2),
    ];
    let srcs = [
        ("x / y", "score + x[q] / y[q]"),
        ("x / y (per key)", "score + x[q] / y[kv % 24]"),
        ("4 tanh(x)", "score + 4.0 * tanh(x[q])"),
        ("4 tanh(x / y)", "score + 4.0 * tanh(x[q] / y[q])"),
        ("4 sigmoid(x)", "score + 4.0 * sigmoid(x[q])"),
        ("log(sigmoid(x))", "score + log(sigmoid(x[q]))"),
        ("log|x / y|", "score + log(abs(x[q] / y[q]))"),
        ("log|tanh(x)|", "score + log(abs(tanh(x[q])))"),
    ];
    let n = pairs.len();
    let xs = ndarray::Array1::from_iter(pairs.iter().map(|p| p.0)).into_dyn();
    let ys = ndarray::Array1::from_iter(pairs.iter().map(|p| p.1)).into_dyn();
    let mut rng = Rng::new(11);
    let (q, k, v) = (
        rng.array4((1, 1, n, 16)),
        rng.array4((1, 1, n, 16)),
        rng.array4((1, 1, n, 16)),
    );
    let mut failures = Vec::new();
    for (name, score) in srcs {
        let src = format!(
            "attention t {{\n buffer x[Q]: float\n buffer y[Q]: float\n score = {score}\n}}"
        );
        let program = program_of(&src, &[]);
        let inputs = Inputs::new(q.view(), k.view(), v.view())
            .with_lse()
            .buffer("x", attnc::BufferData::Float(xs.clone()))
            .buffer("y", attnc::BufferData::Float(ys.clone()));
        for dtype in Dtype::ALL {
            let schedule = ptx::schedule(16, dtype);
            let want = interp(&program.spec, &schedule, &inputs).unwrap();
            let got = emulate(&program.spec, &schedule, dtype, &inputs).unwrap();
            let tol = if dtype == Dtype::F32 { 1e-4 } else { 1e-2 };
            let want_lse = want.lse.as_ref().unwrap();
            let mut bad = Vec::new();
            for ((idx, &g), &w) in got.lse.as_ref().unwrap().indexed_iter().zip(want_lse) {
                if !same_class(g, w, tol, false) {
                    bad.push(format!(
                        "row {} ({:?}): lse {g}, interpreter {w}",
                        idx.2, pairs[idx.2]
                    ));
                }
            }
            for ((idx, &g), &w) in got.out.indexed_iter().zip(want.out.iter()) {
                if !same_class(g, w, tol, false) {
                    bad.push(format!(
                        "row {} ({:?}): out {g}, interpreter {w}",
                        idx.2, pairs[idx.2]
                    ));
                }
            }
            eprintln!("{name:18} {dtype:4}: {} mismatches", bad.len());
            if !bad.is_empty() {
                bad.dedup_by(|x, y| x.split(')').next() == y.split(')').next());
                failures.push(format!(
                    "{name} {dtype}: {}",
                    bad[..bad.len().min(4)].join("; ")
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A paged pool kept on the device between calls (`ResidentPool`, as
/// `runtime::cuda::CudaPool` holds it): uploaded once, then three decoding
/// steps, each appended on the host (`KvArray::append`) and to the device by
/// the pool's writes alone (one sequence crossing into a new page). After
/// every step the device arrays equal a fresh upload of the whole pool, the
/// writes hold exactly the new rows, the V-tile flags kept per row equal
/// those read from V, and the emulated call on the resident arrays matches
/// the tile interpreter (within the dtype's tolerance) and the call that
/// uploads everything (bit for bit).
/// Stale slots hold NaN (NaN scales for int8), and a key outside the window
/// holds 1e6 in V (inf in f16: the mma kernel must take its exact path there).
#[test]
fn emulated_ptx_reads_a_resident_pool_appended_step_by_step() {
    use attnc::runtime::device::host::Arg;
    use attnc::runtime::device::pool::ResidentPool;
    use attnc::{ElemType, KvArray};
    let spec = load("examples/sliding_window.attn", &[("window", "40")]);
    let (h, hkv, d, ps) = (4, 2, 32, 16);
    let mut failures = Vec::new();
    for dtype in [Dtype::F32, Dtype::F16] {
        for elem in [ElemType::F32, ElemType::Int8] {
            let mut lens = vec![5usize, 47, 90];
            let b = lens.len();
            let mut rng = Rng::new(7 + d as u64);
            let k = rng.array4((b, hkv, 90, d));
            let mut v = rng.array4((b, hkv, 90, d));
            v[[2, 0, 10, 3]] = 1e6;
            let (kp, vp, mut table) = common::paged_pool(&k, &v, &lens, ps, &mut rng);
            // Sequence 1 reaches key 48, the first of its fourth page: give
            // it a page no sequence uses.
            let used: Vec<i32> = table.iter().copied().filter(|&p| p >= 0).collect();
            let free = (0..kp.dim().0 as i32).find(|p| !used.contains(p)).unwrap();
            table[[1, 3]] = free;
            let (mut kq, mut vq) = (KvArray::from_f32(kp, elem), KvArray::from_f32(vp, elem));
            // NaN scales at every stale int8 slot (the slots past each length).
            let stale_scales = |a: &mut KvArray, lens: &[usize], table: &ndarray::Array2<i32>| {
                if let KvArray::Int8 { scales, .. } = a {
                    for ((p, slot, _), x) in scales.indexed_iter_mut() {
                        let live = lens.iter().enumerate().any(|(bi, &n)| {
                            (0..n).any(|j| table[[bi, j / ps]] == p as i32 && j % ps == slot)
                        });
                        if !live {
                            *x = f32::NAN;
                        }
                    }
                }
            };
            stale_scales(&mut kq, &lens, &table);
            stale_scales(&mut vq, &lens, &table);
            let schedule = Schedule {
                kv: tile::nest::KvSource::InPlace,
                ..ptx::schedule(d, dtype)
            };
            let (kernel, code) = ptx_run::compile(&spec, &schedule, dtype, elem);
            let q0 = rng.array4((b, h, 1, d));
            let lens0 = ndarray::Array1::from_iter(lens.iter().map(|&n| n as i32));
            let inputs0 =
                Inputs::paged(q0.view(), kq.view(), vq.view(), table.view(), lens0.view());
            let (mut pool, whole) = ResidentPool::new(&kernel, &code, &inputs0).unwrap();
            let mut device = ptx_run::PoolBytes::default();
            device.apply(whole);
            let row_bytes = if elem == ElemType::Int8 {
                d
            } else {
                d * dtype.size()
            };
            for step in 0..3 {
                let at = format!("{dtype} {elem} step {step}");
                let lens_before = ndarray::Array1::from_iter(lens.iter().map(|&n| n as i32));
                let (sk, sv) = (rng.array4((b, hkv, 1, d)), rng.array4((b, hkv, 1, d)));
                let step_of =
                    |a: &ndarray::Array4<f32>| a.index_axis(ndarray::Axis(2), 0).to_owned();
                kq.append(table.view(), lens_before.view(), step_of(&sk).view())
                    .unwrap();
                vq.append(table.view(), lens_before.view(), step_of(&sv).view())
                    .unwrap();
                let q = rng.array4((b, h, 1, d));
                let host = Inputs::paged(
                    q.view(),
                    kq.view(),
                    vq.view(),
                    table.view(),
                    lens_before.view(),
                );
                let writes = pool.append(&host, lens_before.view()).unwrap();
                let written: usize = writes.iter().map(|w| w.bytes.len()).sum();
                let scales = if elem == ElemType::Int8 {
                    2 * b * hkv * 4
                } else {
                    0
                };
                if written != 2 * b * hkv * row_bytes + scales {
                    failures.push(format!("{at}: {written} bytes written for {b} new rows"));
                }
                device.apply(writes);
                for n in lens.iter_mut() {
                    *n += 1;
                }
                let lens_now = ndarray::Array1::from_iter(lens.iter().map(|&n| n as i32));
                let inputs = Inputs::paged(
                    q.view(),
                    kq.view(),
                    vq.view(),
                    table.view(),
                    lens_now.view(),
                )
                .with_lse();
                // The device arrays are those of a fresh upload of the pool.
                let (_, fresh) = ResidentPool::new(&kernel, &code, &inputs).unwrap();
                for w in fresh {
                    if device.0[w.array] != w.bytes {
                        failures.push(format!("{at}: device `{}` differs from an upload", w.array));
                    }
                }
                // The flags kept per row are those read from V.
                let bound = attnc::bind::bind(&spec, &inputs).unwrap();
                let l = &code.launch;
                let maps = classify(
                    &spec,
                    &bound,
                    attnc::mask::Tiling::new(l.bq, l.bkv).unwrap(),
                )
                .unwrap();
                let flags = |pool| {
                    attnc::runtime::device::host::launch_args(
                        &kernel, &code, &inputs, &bound, &maps, pool,
                    )
                    .unwrap()
                    .into_iter()
                    .find(|(n, _)| n == "v_flags")
                    .unwrap()
                    .1
                };
                let (kept, read) = (flags(Some(&pool)), flags(None));
                if kept != read {
                    failures.push(format!("{at}: V-tile flags {kept:?}, from V {read:?}"));
                }
                if dtype == Dtype::F16 && !matches!(&read, Arg::Array(f) if f.contains(&1)) {
                    failures.push(format!("{at}: no V tile flagged (1e6 is inf in f16)"));
                }
                let want = interp(&spec, &schedule, &inputs).unwrap();
                let got = ptx_run::emulate_pooled(&kernel, &code, &spec, &inputs, (&pool, &device))
                    .unwrap();
                let uploaded = emulate(&spec, &schedule, dtype, &inputs).unwrap();
                let err = max_err(&got, &want);
                let tol = if dtype == Dtype::F32 { 1e-4 } else { 1e-2 };
                eprintln!("resident pool {at}: {err:.2e}");
                if err.is_nan() || err > tol {
                    failures.push(format!("{at}: error {err:.3e}"));
                }
                if got != uploaded {
                    failures.push(format!(
                        "{at}: the resident call and the uploading one differ"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
