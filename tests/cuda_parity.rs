//! The CUDA backend against the reference interpreter, on a real GPU.
//!
//! Needs the `cuda` feature and an NVIDIA GPU (compute capability 8.0+);
//! without a driver or a device every test fails, saying why (a test that
//! skipped would check nothing). Run by
//! `scripts/gpu-check.sh`. Tolerance: `|got - want| <= tol * (1 + |want|)`
//! with tol = 1e-4 for f32 inputs and 1e-2 for f16/bf16.
#![cfg(feature = "cuda")]
// The errors are the runtime's, by value.
#![allow(clippy::result_large_err)]

#[path = "suite/support/common.rs"]
mod common;

use attnc::bench::Rng;
use attnc::codegen::ptx::Dtype;
use attnc::runtime::cuda::{CudaError, CudaRuntime};
use attnc::sema::eval::{EvalError, Shapes};
use attnc::{BufferData, Inputs, Outputs, SourceFile, SpecOptions};

fn runtime() -> CudaRuntime {
    match CudaRuntime::new(0) {
        Ok(rt) => {
            eprintln!("running on {} ({})", rt.device_name(), rt.arch());
            rt
        }
        Err(e) => panic!(
            "cannot open the GPU: {e}\nthese tests need an NVIDIA GPU of compute capability 8.0+ \
             and its driver; scripts/gpu-check.sh runs them on such a machine"
        ),
    }
}

fn tolerance(dtype: Dtype) -> f32 {
    match dtype {
        Dtype::F32 => 1e-4,
        Dtype::F16 | Dtype::Bf16 => 1e-2,
    }
}

/// The largest `|got - want| / (1 + |want|)` over out and (finite) lse,
/// and whether the -inf pattern of lse agrees.
fn compare(got: &Outputs, want: &Outputs) -> (f32, bool) {
    let mut worst = 0f32;
    for (g, w) in got.out.iter().zip(want.out.iter()) {
        worst = worst.max((g - w).abs() / (1.0 + w.abs()));
    }
    let (gl, wl) = (got.lse.as_ref().unwrap(), want.lse.as_ref().unwrap());
    let mut same_inf = true;
    for (g, w) in gl.iter().zip(wl.iter()) {
        if w.is_finite() {
            worst = worst.max((g - w).abs() / (1.0 + w.abs()));
        } else {
            same_inf &= *g == *w;
        }
    }
    (if worst.is_nan() { f32::INFINITY } else { worst }, same_inf)
}

/// Prints [`compare`]'s error under `what` and records a failure past the
/// dtype's tolerance.
fn check(what: &str, got: &Outputs, want: &Outputs, dtype: Dtype, failures: &mut Vec<String>) {
    let (err, same_inf) = compare(got, want);
    eprintln!("{what}: max rel err {err:.2e}");
    if err > tolerance(dtype) || !same_inf {
        failures.push(format!(
            "{what}: error {err:.3e} (tolerance {:.0e}), lse -inf rows agree: {same_inf}",
            tolerance(dtype)
        ));
    }
}

#[test]
fn every_fixture_matches_the_reference_in_every_dtype() {
    let rt = runtime();
    let mut failures = Vec::new();
    for dir in common::fixture_dirs() {
        let case = common::load_case(&dir);
        let program = case.program();
        let inputs = case.inputs().with_lse();
        let want = program.run_reference(&inputs).unwrap();
        for dtype in Dtype::ALL {
            // A failing run is recorded and the other cases go on.
            let got = match rt.run(&program.spec, &inputs, dtype) {
                Ok(g) => g,
                Err(e) => {
                    eprintln!("{:32} {dtype:4}: run failed: {e}", case.name);
                    failures.push(format!("{} {dtype}: run failed: {e}", case.name));
                    continue;
                }
            };
            let what = format!("{:32} {dtype:4}", case.name);
            check(&what, &got, &want, dtype, &mut failures);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_example_matches_at_ragged_sizes_and_large_heads() {
    let rt = runtime();
    let mut failures = Vec::new();
    let mut examples: Vec<_> = std::fs::read_dir(common::root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "attn"))
        .collect();
    examples.sort();
    // Ragged in both lengths, GQA, a broadcast k/v batch, and head dims
    // that keep Q in registers (64, 128), read it from shared memory
    // (256) or need padding (72).
    for (d, b, h, hkv, kv_b, n) in [
        (64, 2, 4, 2, 2, 333),
        (128, 1, 2, 1, 1, 200),
        (72, 2, 2, 2, 1, 130),
        (256, 1, 2, 2, 1, 96),
    ] {
        let mut rng = Rng::new(d as u64);
        let q = rng.array4((b, h, n, d));
        let k = rng.array4((kv_b, hkv, n, d));
        let v = rng.array4((kv_b, hkv, n, d));
        for path in &examples {
            let program =
                attnc::load(SourceFile::read(path).unwrap(), &SpecOptions::default()).unwrap();
            let shapes = Shapes {
                b,
                h,
                hkv,
                q: n,
                kv: n,
                d,
            };
            let mut inputs = Inputs::new(q.view(), k.view(), v.view()).with_lse();
            for (name, data) in common::buffers_for(&program.spec, &shapes, &mut rng) {
                inputs = inputs.buffer(&name, data);
            }
            let want = match program.run_reference(&inputs) {
                Ok(w) => w,
                Err(e) => panic!(
                    "{}: the reference fails on these inputs: {e}",
                    program.spec.name
                ),
            };
            for dtype in Dtype::ALL {
                let got = match rt.run(&program.spec, &inputs, dtype) {
                    Ok(g) => g,
                    Err(e) => {
                        eprintln!(
                            "{:22} D={d:3} N={n:3} {dtype:4}: run failed: {e}",
                            program.spec.name
                        );
                        failures.push(format!(
                            "{} D={d} {dtype}: run failed: {e}",
                            program.spec.name
                        ));
                        continue;
                    }
                };
                let what = format!("{:22} D={d:3} N={n:3} {dtype:4}", program.spec.name);
                check(&what, &got, &want, dtype, &mut failures);
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn failing_reads_report_the_interpreter_error() {
    let rt = runtime();
    // `pos[q - kv]` reads out of range for kv > q: the interpreter's error.
    let src = "attention a { buffer pos[KV]: int\n score = score + float(pos[q - kv]) }";
    let program = attnc::load(SourceFile::new("a.attn", src), &SpecOptions::default()).unwrap();
    let mut rng = Rng::new(7);
    let q = rng.array4((1, 1, 40, 16));
    let pos = BufferData::Int(ndarray::Array1::zeros(40).into_dyn());
    let inputs = Inputs::new(q.view(), q.view(), q.view()).buffer("pos", pos);
    let want = program.run_reference(&inputs).unwrap_err().to_string();
    assert!(want.contains("read out of range"), "{want}");
    for dtype in Dtype::ALL {
        match rt.run(&program.spec, &inputs, dtype) {
            Err(CudaError::Eval(EvalError::OutOfRange {
                buffer,
                index,
                shape,
                ..
            })) => {
                assert_eq!((buffer.as_str(), shape), ("pos", vec![40]));
                assert!(index[0] < 0, "{index:?}");
            }
            other => panic!(
                "{dtype}: expected an out-of-range read, got {:?}",
                other.map(|o| o.out.shape().to_vec())
            ),
        }
    }
}

/// A poisoned entry: tensor ('k' or 'v'), key, column (None: the whole
/// row), value.
type Poisoned = (char, usize, Option<usize>, f32);

/// One non-finite case: a spec, where K and V are poisoned, and which
/// query rows cannot see any poisoned key.
struct Poison {
    name: &'static str,
    src: &'static str,
    at: fn(usize) -> Vec<Poisoned>,
    /// Whether query row `q` sees no poisoned key (so must be finite).
    clean: fn(usize) -> bool,
    keep_buffer: bool,
}

/// Key `kv` is kept by the `keep` buffer of the buffer-masked case: a
/// pattern that leaves every key tile PARTIAL.
fn kept(kv: usize) -> bool {
    kv % 3 != 1 && kv % 7 != 5
}

const VALID: usize = 100;

/// Every key from VALID on, whole rows of the named tensors.
fn masked_tail(n: usize, value: f32, tensors: &[char]) -> Vec<Poisoned> {
    tensors
        .iter()
        .flat_map(|&t| (VALID..n).map(move |kv| (t, kv, None, value)))
        .collect()
}

const POISONS: [Poison; 7] = [
    Poison {
        name: "kv<valid, K+V NaN past",
        src: "attention a { param valid: int = 100\n mask = kv < valid }",
        at: |n| masked_tail(n, f32::NAN, &['k', 'v']),
        clean: |_| true,
        keep_buffer: false,
    },
    Poison {
        name: "kv<valid, V NaN past",
        src: "attention a { param valid: int = 100\n mask = kv < valid }",
        at: |n| masked_tail(n, f32::NAN, &['v']),
        clean: |_| true,
        keep_buffer: false,
    },
    Poison {
        name: "kv<valid, V +Inf past",
        src: "attention a { param valid: int = 100\n mask = kv < valid }",
        at: |n| masked_tail(n, f32::INFINITY, &['v']),
        clean: |_| true,
        keep_buffer: false,
    },
    Poison {
        name: "kv<valid, K NaN/+Inf past",
        src: "attention a { param valid: int = 100\n mask = kv < valid }",
        at: |n| {
            let mut v = masked_tail(n, f32::NAN, &['k']);
            for p in v.iter_mut().filter(|p| p.1 % 2 == 0) {
                p.3 = f32::INFINITY;
            }
            v
        },
        clean: |_| true,
        keep_buffer: false,
    },
    Poison {
        name: "keep[kv], K+V NaN at dropped",
        src: "attention a { buffer keep[KV]: bool\n mask = keep[kv] }",
        at: |n| {
            (0..n)
                .filter(|&kv| !kept(kv))
                .flat_map(|kv| [('k', kv, None, f32::NAN), ('v', kv, None, f32::NAN)])
                .collect()
        },
        clean: |_| true,
        keep_buffer: true,
    },
    Poison {
        name: "causal, V[70,3] +Inf",
        src: "attention a { mask = causal }",
        at: |_| vec![('v', 70, Some(3), f32::INFINITY)],
        clean: |q| q < 70,
        keep_buffer: false,
    },
    Poison {
        name: "causal, K[70] NaN",
        src: "attention a { mask = causal }",
        at: |_| vec![('k', 70, None, f32::NAN)],
        clean: |q| q < 70,
        keep_buffer: false,
    },
];

/// NaN and Inf in K and V at keys the mask rules out never reach the
/// output: the rows that cannot see a poisoned key are finite and match the
/// reference. Masked keys of a PARTIAL tile are still loaded and multiplied
/// (p = 0 times v), so this is what a kernel must guard against.
#[test]
fn non_finite_values_at_masked_keys_do_not_reach_the_output() {
    let (b, h, n) = (1usize, 2usize, 200usize);
    let mut cases = Vec::new();
    for d in [64usize, 128] {
        for poison in &POISONS {
            let program = attnc::load(
                SourceFile::new("poison.attn", poison.src),
                &SpecOptions::default(),
            )
            .unwrap();
            let mut rng = Rng::new(1000 + d as u64);
            let q = rng.array4((b, h, n, d));
            let mut k = rng.array4((b, h, n, d));
            let mut v = rng.array4((b, h, n, d));
            for (t, kv, col, value) in (poison.at)(n) {
                let x = if t == 'k' { &mut k } else { &mut v };
                for hh in 0..h {
                    match col {
                        Some(c) => x[[0, hh, kv, c]] = value,
                        None => x.slice_mut(ndarray::s![0, hh, kv, ..]).fill(value),
                    }
                }
            }
            let keep = BufferData::Bool(ndarray::Array1::from_shape_fn(n, kept).into_dyn());
            // The reference itself: the clean rows are finite.
            let want = {
                let mut inputs = Inputs::new(q.view(), k.view(), v.view()).with_lse();
                if poison.keep_buffer {
                    inputs = inputs.buffer("keep", keep.clone());
                }
                program.run_reference(&inputs).unwrap()
            };
            for row in (0..n).filter(|&r| (poison.clean)(r)) {
                assert!(
                    want.out
                        .slice(ndarray::s![.., .., row, ..])
                        .iter()
                        .all(|x| x.is_finite()),
                    "{} D={d}: the reference is not finite in clean row {row}",
                    poison.name
                );
            }
            cases.push((d, poison, program, q, k, v, keep, want));
        }
    }
    let rt = runtime();
    let mut failures = Vec::new();
    for (d, poison, program, q, k, v, keep, want) in &cases {
        let mut inputs = Inputs::new(q.view(), k.view(), v.view()).with_lse();
        if poison.keep_buffer {
            inputs = inputs.buffer("keep", keep.clone());
        }
        for dtype in Dtype::ALL {
            let got = match rt.run(&program.spec, &inputs, dtype) {
                Ok(g) => g,
                Err(e) => {
                    failures.push(format!("{} D={d} {dtype}: run failed: {e}", poison.name));
                    continue;
                }
            };
            let (gl, wl) = (got.lse.as_ref().unwrap(), want.lse.as_ref().unwrap());
            let (mut worst, mut bad_rows, mut first_bad) = (0f32, 0usize, None);
            let (mut seen_rows, mut seen_agree) = (0usize, 0usize);
            for bb in 0..b {
                for hh in 0..h {
                    for row in 0..n {
                        let g = got.out.slice(ndarray::s![bb, hh, row, ..]);
                        let w = want.out.slice(ndarray::s![bb, hh, row, ..]);
                        let (glse, wlse) = (gl[[bb, hh, row]], wl[[bb, hh, row]]);
                        if !(poison.clean)(row) {
                            // Rows that see a poisoned key: only recorded.
                            seen_rows += 1;
                            let same = g
                                .iter()
                                .zip(w.iter())
                                .all(|(x, y)| x.is_finite() == y.is_finite());
                            seen_agree += usize::from(same);
                            continue;
                        }
                        let finite = g.iter().all(|x| x.is_finite()) && glse.is_finite();
                        if !finite {
                            bad_rows += 1;
                            if first_bad.is_none() {
                                let nonfinite = g.iter().filter(|x| !x.is_finite()).count();
                                first_bad = Some(format!(
                                    "h{hh} q{row}: {nonfinite}/{d} out values non-finite (e.g. {}), lse {glse}",
                                    g.iter().find(|x| !x.is_finite()).copied().unwrap_or(0.0)
                                ));
                            }
                            continue;
                        }
                        for (x, y) in g.iter().zip(w.iter()) {
                            worst = worst.max((x - y).abs() / (1.0 + y.abs()));
                        }
                        worst = worst.max((glse - wlse).abs() / (1.0 + wlse.abs()));
                    }
                }
            }
            let clean_rows = b * h * (0..n).filter(|&r| (poison.clean)(r)).count();
            eprintln!(
                "{:30} D={d:3} {dtype:4}: clean rows non-finite {bad_rows}/{clean_rows}, max rel err on the finite ones {worst:.2e}{}",
                poison.name,
                if seen_rows > 0 {
                    format!(", rows seeing the poison with the reference's finite pattern {seen_agree}/{seen_rows}")
                } else {
                    String::new()
                }
            );
            if bad_rows > 0 || worst > tolerance(dtype) {
                failures.push(format!(
                    "{} D={d} {dtype}: {bad_rows}/{clean_rows} rows that cannot see a poisoned key are non-finite{}; max rel err on the others {worst:.3e} (tolerance {:.0e})",
                    poison.name,
                    first_bad.map(|s| format!(" (first: {s})")).unwrap_or_default(),
                    tolerance(dtype)
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// K/V read in place on the GPU (the kernel `driver::ptx_plan` picks for
/// them): a shuffled paged pool (pages of 16 and 7) and dense rows of ragged
/// lengths, decode and a chunked prefill past a page boundary, GQA 2, every
/// stale slot NaN; f32 K/V in every dtype and int8/fp8 pools (scales per
/// row, NaN past each length) dequantized in the tile loads. Against the
/// reference on the same stored values.
#[test]
fn paged_ragged_and_quantized_caches_match_the_reference() {
    use attnc::{ElemType, KvArray};
    let rt = runtime();
    let mut failures = Vec::new();
    let (h, hkv, d) = (4, 2, 64);
    let specs = ["causal", "sliding_window", "alibi"];
    for (q_len, ps) in [(1, 16), (20, 7)] {
        let lens = [q_len, 37, 190];
        let (b, kv_max) = (lens.len(), 190);
        let mut rng = Rng::new((q_len * 100 + ps) as u64);
        let r = common::ragged(&lens, (h, hkv, q_len, d), ps, &mut rng);
        let (q, k, v, table, lens_arr) = (&r.q, &r.k, &r.v, &r.table, &r.lens);
        let (kp, vp) = (&r.k_pages, &r.v_pages);
        for name in specs {
            let path = common::root().join(format!("examples/{name}.attn"));
            let program =
                attnc::load(SourceFile::read(&path).unwrap(), &SpecOptions::default()).unwrap();
            let shapes = Shapes {
                b,
                h,
                hkv,
                q: q_len,
                kv: kv_max,
                d,
            };
            let buffers = common::buffers_for(&program.spec, &shapes, &mut rng);
            for elem in [ElemType::F32, ElemType::Int8, ElemType::Fp8] {
                let (kq, vq) = (
                    KvArray::quantize(k.view(), elem),
                    KvArray::quantize(v.view(), elem),
                );
                let (kpq, vpq) = (
                    KvArray::quantize(kp.view(), elem),
                    KvArray::quantize(vp.view(), elem),
                );
                let pool = Inputs::paged(
                    q.view(),
                    kpq.view(),
                    vpq.view(),
                    table.view(),
                    lens_arr.view(),
                );
                let rows = Inputs::new(q.view(), kq.view(), vq.view()).kv_lens(lens_arr.view());
                for (layout, inputs) in [("pool", pool), ("ragged rows", rows)] {
                    let mut inputs = inputs.with_lse();
                    for (n, data) in &buffers {
                        inputs = inputs.buffer(n, data.clone());
                    }
                    let want = program.run_reference(&inputs).unwrap();
                    for dtype in Dtype::ALL {
                        let what = format!(
                            "{name:15} {elem:4} {layout:11} Q={q_len:2} page {ps:2} {dtype:4}"
                        );
                        match rt.run(&program.spec, &inputs, dtype) {
                            Ok(got) => check(&what, &got, &want, dtype, &mut failures),
                            Err(e) => {
                                eprintln!("{what}: run failed: {e}");
                                failures.push(format!("{what}: run failed: {e}"));
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Key offsets (`kv = kv_offset + key row`), as ring attention runs them:
/// dense blocks whose keys come before, overlap or follow the queries, each
/// against the reference and, split in two key blocks merged by
/// `merge_states`, against the whole call; ragged rows and a pool (f32 and
/// int8) whose queries end on keys 1000 positions in. StreamingLLM's sinks
/// and `doc[KV]` read positions absolutely.
#[test]
fn key_offsets_match_the_reference() {
    use attnc::{ElemType, KvArray};
    let rt = runtime();
    let mut failures = Vec::new();
    let (h, hkv, d) = (4, 2, 64);
    let mut rng = Rng::new(29);
    let specs: [(&str, &[(&str, &str)]); 4] = [
        ("causal", &[]),
        ("streaming_llm", &[("sinks", "4"), ("window", "40")]),
        ("packed_docs", &[]),
        ("alibi", &[]),
    ];
    for (name, params) in specs {
        let path = common::root().join(format!("examples/{name}.attn"));
        let options = SpecOptions::with_params(params);
        let program = attnc::load(SourceFile::read(&path).unwrap(), &options).unwrap();
        for (q_offset, q_len, kv_offset, rows) in
            [(200, 70, 0, 150), (100, 70, 130, 140), (0, 30, 1000, 90)]
        {
            let end = (q_offset + q_len).max(kv_offset + rows);
            let (q, k, v, shapes) =
                common::random_qkv(&mut rng, (2, h, hkv, d), (2, q_len, rows), end);
            let buffers = common::buffers_for(&program.spec, &shapes, &mut rng);
            // A block of keys `range` of the queries, with the prefix of the
            // `doc[KV]` table its positions end.
            let block = |range: std::ops::Range<usize>| {
                let block_end = (q_offset + q_len).max(kv_offset + range.end);
                let mut inputs = Inputs::new(
                    q.view(),
                    k.slice(ndarray::s![.., .., range.clone(), ..]),
                    v.slice(ndarray::s![.., .., range.clone(), ..]),
                )
                .q_offset(q_offset as i64)
                .kv_offset((kv_offset + range.start) as i64)
                .with_lse();
                for (n, data) in common::kv_prefix(&buffers, block_end) {
                    inputs = inputs.buffer(&n, data);
                }
                inputs
            };
            let whole = block(0..rows);
            let want = program.run_reference(&whole).unwrap();
            let cut = rows / 2 + 5;
            for dtype in Dtype::ALL {
                let what =
                    format!("{name:14} queries at {q_offset}, keys at {kv_offset} {dtype:4}");
                let runs = [block(0..rows), block(0..cut), block(cut..rows)]
                    .iter()
                    .map(|inputs| rt.run(&program.spec, inputs, dtype))
                    .collect::<Result<Vec<_>, _>>();
                match runs {
                    Ok(outs) => {
                        check(&what, &outs[0], &want, dtype, &mut failures);
                        let merged = attnc::merge_states(&[
                            (outs[1].out.view(), outs[1].lse.as_ref().unwrap().view()),
                            (outs[2].out.view(), outs[2].lse.as_ref().unwrap().view()),
                        ])
                        .unwrap();
                        check(
                            &format!("{what} (two blocks merged)"),
                            &merged,
                            &want,
                            dtype,
                            &mut failures,
                        );
                    }
                    Err(e) => failures.push(format!("{what}: run failed: {e}")),
                }
            }
        }
        // Ragged rows and a pool, queries ending on keys at 1000 + 0 .. len.
        let (lens, q_len, kv_offset) = ([20, 37, 190], 20, 1000);
        let r = common::ragged(&lens, (h, hkv, q_len, d), 16, &mut rng);
        let shapes = Shapes {
            b: lens.len(),
            h,
            hkv,
            q: q_len,
            kv: kv_offset + 190,
            d,
        };
        let buffers = common::buffers_for(&program.spec, &shapes, &mut rng);
        for elem in [ElemType::F32, ElemType::Int8] {
            let (kq, vq, kpq, vpq) = (
                KvArray::quantize(r.k.view(), elem),
                KvArray::quantize(r.v.view(), elem),
                KvArray::quantize(r.k_pages.view(), elem),
                KvArray::quantize(r.v_pages.view(), elem),
            );
            let pool = Inputs::paged(
                r.q.view(),
                kpq.view(),
                vpq.view(),
                r.table.view(),
                r.lens.view(),
            );
            let rows = Inputs::new(r.q.view(), kq.view(), vq.view()).kv_lens(r.lens.view());
            for (layout, inputs) in [("pool", pool), ("ragged rows", rows)] {
                let mut inputs = inputs.kv_offset(kv_offset as i64).with_lse();
                for (n, data) in &buffers {
                    inputs = inputs.buffer(n, data.clone());
                }
                let want = program.run_reference(&inputs).unwrap();
                for dtype in Dtype::ALL {
                    let what =
                        format!("{name:14} {elem:4} {layout:11} keys at {kv_offset} {dtype:4}");
                    match rt.run(&program.spec, &inputs, dtype) {
                        Ok(got) => check(&what, &got, &want, dtype, &mut failures),
                        Err(e) => failures.push(format!("{what}: run failed: {e}")),
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A paged pool kept on the GPU between calls (`CudaRuntime::upload_pool`):
/// uploaded once, then four decoding steps appended on the host
/// (`KvArray::append`) and to the device by their new rows alone
/// (`CudaRuntime::append_pool`), each followed by a call on the resident
/// pool (`prepare_pooled`), against the reference on the host's pool and the
/// call that uploads everything. f32, int8 and fp8 pools in every dtype;
/// stale slots NaN; one sequence crosses into a new page.
#[test]
fn a_resident_pool_appended_step_by_step_matches_the_reference() {
    use attnc::{ElemType, KvArray};
    let rt = runtime();
    let mut failures = Vec::new();
    let (h, hkv, d, ps) = (4, 2, 64, 16);
    let path = common::root().join("examples/sliding_window.attn");
    let program = attnc::load(SourceFile::read(&path).unwrap(), &SpecOptions::default()).unwrap();
    let spec = &program.spec;
    for elem in [ElemType::F32, ElemType::Int8, ElemType::Fp8] {
        for dtype in Dtype::ALL {
            let mut lens = vec![5usize, 47, 190];
            let b = lens.len();
            let mut rng = Rng::new(11);
            let k = rng.array4((b, hkv, 190, d));
            let v = rng.array4((b, hkv, 190, d));
            let (kp, vp, mut table) = common::paged_pool(&k, &v, &lens, ps, &mut rng);
            let used: Vec<i32> = table.iter().copied().filter(|&p| p >= 0).collect();
            table[[1, 3]] = (0..kp.dim().0 as i32).find(|p| !used.contains(p)).unwrap();
            let (mut kq, mut vq) = (KvArray::from_f32(kp, elem), KvArray::from_f32(vp, elem));
            let lens0 = ndarray::Array1::from_iter(lens.iter().map(|&n| n as i32));
            let q0 = rng.array4((b, h, 1, d));
            let first = Inputs::paged(q0.view(), kq.view(), vq.view(), table.view(), lens0.view());
            let bound = attnc::bind::bind(spec, &first).unwrap();
            let kernel = rt.compile_for(spec, &bound, dtype).unwrap();
            let mut pool = rt.upload_pool(&kernel, &first).unwrap();
            for step in 0..4 {
                let what = format!("{elem:4} {dtype:4} step {step}");
                let before = ndarray::Array1::from_iter(lens.iter().map(|&n| n as i32));
                for a in [&mut kq, &mut vq] {
                    let row = rng.array4((b, hkv, 1, d));
                    let row = row.index_axis(ndarray::Axis(2), 0);
                    a.append(table.view(), before.view(), row).unwrap();
                }
                let q = rng.array4((b, h, 1, d));
                let host =
                    Inputs::paged(q.view(), kq.view(), vq.view(), table.view(), before.view());
                let bytes = rt.append_pool(&mut pool, &host, before.view()).unwrap();
                eprintln!("{what}: appended {bytes} bytes");
                for n in lens.iter_mut() {
                    *n += 1;
                }
                let now = ndarray::Array1::from_iter(lens.iter().map(|&n| n as i32));
                let inputs =
                    Inputs::paged(q.view(), kq.view(), vq.view(), table.view(), now.view())
                        .with_lse();
                let want = program.run_reference(&inputs).unwrap();
                let got = run_pooled(&rt, &kernel, &inputs, &pool);
                match got {
                    Ok(got) => {
                        check(&what, &got, &want, dtype, &mut failures);
                        match rt.run(spec, &inputs, dtype) {
                            Ok(uploaded) if uploaded.out == got.out => {}
                            Ok(_) => {
                                failures.push(format!("{what}: differs from the uploading call"))
                            }
                            Err(e) => failures.push(format!("{what}: uploading call failed: {e}")),
                        }
                    }
                    Err(e) => failures.push(format!("{what}: run failed: {e}")),
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// One call on a resident pool: prepared without uploading K/V, launched,
/// downloaded.
fn run_pooled(
    rt: &CudaRuntime,
    kernel: &attnc::runtime::cuda::CudaKernel,
    inputs: &Inputs<'_>,
    pool: &attnc::runtime::cuda::CudaPool,
) -> Result<Outputs, CudaError> {
    let mut p = rt.prepare_pooled(kernel, inputs, pool)?;
    rt.launch(kernel, &mut p)?;
    rt.finish(kernel, &p)
}

/// A call prepared for one kernel is refused by another (its arguments
/// follow the first kernel's tiles and parameter layout).
#[test]
fn a_prepared_call_launches_only_with_its_own_kernel() {
    let rt = runtime();
    let load = |src: &str| attnc::load(SourceFile::new("t.attn", src), &SpecOptions::default());
    let program = load("attention a { mask = causal }").unwrap();
    let window = load("attention b { mask = causal && q - kv < 8 }")
        .unwrap()
        .spec;
    let causal = program.spec.clone();
    let x = Rng::new(3).array4((1, 2, 40, 16));
    let inputs = Inputs::new(x.view(), x.view(), x.view()).with_lse();
    let bound = attnc::bind::bind(&causal, &inputs).unwrap();
    let kc = rt.compile_for(&causal, &bound, Dtype::F32).unwrap();
    let kw = rt.compile_for(&window, &bound, Dtype::F32).unwrap();
    let mut p = rt.prepare(&kc, &inputs).unwrap();
    for e in [
        rt.launch(&kw, &mut p).unwrap_err(),
        rt.finish(&kw, &p).unwrap_err(),
    ] {
        assert!(e.to_string().contains("prepared for another kernel"), "{e}");
    }
    rt.launch(&kc, &mut p).unwrap();
    let got = rt.finish(&kc, &p).unwrap();
    let want = program.run_reference(&inputs).unwrap();
    let (err, same_inf) = compare(&got, &want);
    assert!(err <= tolerance(Dtype::F32) && same_inf, "{err:e}");
}
