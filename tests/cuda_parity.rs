//! The CUDA backend against the reference interpreter, on a real GPU.
//!
//! Needs the `cuda` feature and an NVIDIA GPU (compute capability 8.0+);
//! without a driver or a device every test prints why and returns. Run by
//! `scripts/gpu-check.sh`. Tolerance: `|got - want| <= tol * (1 + |want|)`
//! with tol = 1e-4 for f32 inputs and 1e-2 for f16/bf16.
#![cfg(feature = "cuda")]

mod common;

use attnc::bench::{generate_buffer, Rng};
use attnc::codegen::ptx::Dtype;
use attnc::runtime::cuda::{CudaError, CudaRuntime};
use attnc::sema::eval::{EvalError, Shapes};
use attnc::sema::Type;
use attnc::{BufferData, Inputs, Outputs, SourceFile, SpecOptions};

fn runtime() -> Option<CudaRuntime> {
    match CudaRuntime::new(0) {
        Ok(rt) => {
            eprintln!("running on {} ({})", rt.device_name(), rt.arch());
            Some(rt)
        }
        Err(
            e @ (CudaError::NoDriver | CudaError::NoDevice { .. } | CudaError::Unsupported { .. }),
        ) => {
            eprintln!("skipping: {e}");
            None
        }
        Err(e) => panic!("cannot open the GPU: {e}"),
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

#[test]
fn every_fixture_matches_the_reference_in_every_dtype() {
    let Some(rt) = runtime() else { return };
    let mut failures = Vec::new();
    for dir in common::fixture_dirs() {
        let case = common::load_case(&dir);
        let program = case.program();
        let inputs = case.inputs().with_lse();
        let want = program.run_reference(&inputs).unwrap();
        for dtype in Dtype::ALL {
            let got = rt
                .run(&program.spec, &inputs, dtype)
                .unwrap_or_else(|e| panic!("{} {dtype}: {e}", case.name));
            let (err, same_inf) = compare(&got, &want);
            eprintln!("{:32} {dtype:4}: max rel err {err:.2e}", case.name);
            if err > tolerance(dtype) || !same_inf {
                failures.push(format!("{} {dtype}: error {err:.3e} (tolerance {:.0e}), lse -inf rows agree: {same_inf}", case.name, tolerance(dtype)));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Buffers for a spec at the given shapes: documents of ~1/3 of the
/// sequence, ALiBi slopes, roots-only trees, fair coins.
fn buffers_for(
    spec: &attnc::sema::Spec,
    shapes: &Shapes,
    rng: &mut Rng,
) -> Vec<(String, BufferData)> {
    spec.buffers
        .iter()
        .map(|decl| {
            let recipe = match (decl.name.as_str(), decl.elem) {
                ("parent", _) => "const:-1",
                ("slope", _) => "alibi",
                (_, Type::Int) => "docs:3",
                (_, Type::Float) => "uniform",
                (_, Type::Bool) => "bernoulli:0.5",
            };
            (
                decl.name.clone(),
                generate_buffer(decl, shapes, recipe, rng).unwrap(),
            )
        })
        .collect()
}

#[test]
fn every_example_matches_at_ragged_sizes_and_large_heads() {
    let Some(rt) = runtime() else { return };
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
            for (name, data) in buffers_for(&program.spec, &shapes, &mut rng) {
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
                let got = rt
                    .run(&program.spec, &inputs, dtype)
                    .unwrap_or_else(|e| panic!("{} D={d} {dtype}: {e}", program.spec.name));
                let (err, same_inf) = compare(&got, &want);
                eprintln!(
                    "{:22} D={d:3} N={n:3} {dtype:4}: max rel err {err:.2e}",
                    program.spec.name
                );
                if err > tolerance(dtype) || !same_inf {
                    failures.push(format!(
                        "{} D={d} {dtype}: error {err:.3e}, lse -inf rows agree: {same_inf}",
                        program.spec.name
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn failing_reads_report_the_interpreter_error() {
    let Some(rt) = runtime() else { return };
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
