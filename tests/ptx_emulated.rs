//! The generated PTX run on a CPU emulator (`support/ptx_emu.rs`) against
//! the tile interpreter: checks the fragment layouts, the staging, the
//! block-map walk, ragged tails, masks, the online softmax, the epilogue
//! and the error block without a GPU. The emulator computes
//! transcendentals exactly, so this checks the kernel's logic, not the
//! SFU approximations (those need `scripts/gpu-check.sh`).
// The errors are the interpreter's, by value.
#![allow(clippy::result_large_err)]

mod common;
#[path = "support/ptx_emu.rs"]
mod ptx_emu;

use std::collections::HashMap;

use attnc::bench::{generate_buffer, Rng};
use attnc::codegen::ptx::{self, host, Arch, Dtype, ErrorRecord, PtxOptions, PARAMS};
use attnc::mask::{classify, Tiling};
use attnc::sema::eval::{EvalError, Shapes};
use attnc::tile::{self, Schedule};
use attnc::{Inputs, Outputs, SourceFile, SpecOptions};
use ndarray::Array3;

/// Runs the PTX of `spec` under `schedule` on the emulator.
fn emulate(
    spec: &attnc::sema::Spec,
    schedule: &Schedule,
    dtype: Dtype,
    inputs: &Inputs<'_>,
) -> Result<Outputs, EvalError> {
    let kernel = tile::lower(spec, schedule);
    let compiled = ptx::compile(
        &kernel,
        &PtxOptions {
            arch: Arch::Sm80,
            dtype,
        },
    )
    .unwrap();
    let l = &compiled.launch;
    let bound = attnc::bind::bind(spec, inputs).unwrap();
    let s = bound.shapes;
    let maps = classify(spec, &bound, Tiling::new(l.bq, l.bkv).unwrap()).unwrap();
    let dm = host::device_maps(&maps, s.h);
    let scalars = host::scalars(&bound, &dm).unwrap();
    let mut mem = ptx_emu::Memory::default();
    let u32s = |v: &[u32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let rows = s.b * s.h * s.q;
    let mut params: HashMap<String, u64> = HashMap::new();
    let pointers = [
        host::pack(&inputs.q, l.d_pad, dtype),
        host::pack(&inputs.k, l.d_pad, dtype),
        host::pack(&inputs.v, l.d_pad, dtype),
        vec![0u8; rows * l.d_pad * 4],
        vec![0u8; rows * 4],
        vec![0u8; ErrorRecord::WORDS * 8],
        u32s(&dm.rows),
        u32s(&dm.full),
        u32s(&dm.partial),
    ];
    for (name, data) in PARAMS.iter().zip(pointers) {
        params.insert(format!("p_{name}"), mem.alloc(data));
    }
    for (name, v) in PARAMS[9..19].iter().zip(scalars.u32s) {
        params.insert(format!("p_{name}"), u64::from(v));
    }
    params.insert("p_q_offset".into(), scalars.q_offset as u64);
    for (i, b) in bound.buffers.iter().enumerate() {
        params.insert(format!("p_buf{i}"), mem.alloc(host::buffer_bytes(b)));
    }
    let program = ptx_emu::Program::parse(&compiled.text);
    let smem = if l.dynamic_smem { l.smem_bytes } else { 0 };
    ptx_emu::run(
        &program,
        &params,
        &mut mem,
        l.grid(s.b, s.h, s.q),
        l.threads,
        smem,
    );
    let words: Vec<u64> = mem
        .bytes(params["p_err"])
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    if let Some(e) = host::decode_error(&words, &kernel, &bound) {
        return Err(e);
    }
    let f32s = |base: u64| {
        mem.bytes(base)
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect::<Vec<f32>>()
    };
    let out = host::unpad(&f32s(params["p_out"]), l, s.b, s.h, s.q);
    let lse = Array3::from_shape_vec((s.b, s.h, s.q), f32s(params["p_lse"])).unwrap();
    Ok(Outputs {
        out,
        lse: Some(lse),
    })
}

fn interp(
    spec: &attnc::sema::Spec,
    schedule: &Schedule,
    inputs: &Inputs<'_>,
) -> Result<Outputs, EvalError> {
    let kernel = tile::lower(spec, schedule);
    let bound = attnc::bind::bind(spec, inputs).unwrap();
    let maps = classify(
        spec,
        &bound,
        Tiling::new(schedule.bq, schedule.bkv).unwrap(),
    )
    .unwrap();
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
    let options = SpecOptions {
        entry: None,
        params: params
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
    };
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
                    "slope" => "alibi",
                    "doc" => "docs:3",
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
            let tol = if dtype == Dtype::F32 { 1e-4 } else { 1e-2 };
            eprintln!("{:22} D={d} {dtype:4}: {err:.2e}", spec.name);
            if err > tol {
                failures.push(format!("{} D={d} {dtype}: error {err:.3e}", spec.name));
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
        bq,
        bkv,
        dim: Some(d),
        exp2,
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
        let q = rng.array4((b, h, n, d));
        let k = rng.array4((kv_b, hkv, kv_n, d));
        let v = rng.array4((kv_b, hkv, kv_n, d));
        let shapes = Shapes {
            b,
            h,
            hkv,
            q: n,
            kv: kv_n,
            d,
        };
        let mut inputs = Inputs::new(q.view(), k.view(), v.view())
            .with_lse()
            .q_offset(q_offset);
        for decl in &spec.buffers {
            let recipe = match decl.name.as_str() {
                "slope" => "alibi",
                "doc" => "docs:3",
                _ => "uniform",
            };
            inputs = inputs.buffer(
                &decl.name,
                generate_buffer(decl, &shapes, recipe, &mut rng).unwrap(),
            );
        }
        let want = interp(&spec, &schedule, &inputs).unwrap();
        let got = emulate(&spec, &schedule, dtype, &inputs).unwrap();
        let err = max_err(&got, &want);
        let tol = if dtype == Dtype::F32 { 1e-4 } else { 1e-2 };
        eprintln!(
            "{:14} {}x{} D={d} {dtype:4}: {err:.2e}",
            spec.name, schedule.bq, schedule.bkv
        );
        if err > tol {
            failures.push(format!(
                "{} {}x{} D={d} {dtype}: error {err:.3e}",
                spec.name, schedule.bq, schedule.bkv
            ));
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
    let pos = attnc::BufferData::Int(ndarray::Array1::zeros(20).into_dyn());
    let inputs = Inputs::new(q.view(), q.view(), q.view()).buffer("pos", pos);
    let schedule = ptx::schedule(16, Dtype::F16);
    match emulate(&spec, &schedule, Dtype::F16, &inputs) {
        Err(EvalError::OutOfRange {
            buffer, index, at, ..
        }) => {
            assert_eq!(buffer, "pos");
            assert_eq!(index, vec![at.q - at.kv]);
            assert!(index[0] < 0);
        }
        other => panic!(
            "expected an out-of-range read, got {:?}",
            other.map(|o| o.out.shape().to_vec())
        ),
    }
}
