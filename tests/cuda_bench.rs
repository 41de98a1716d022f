//! The GPU benchmark (`scripts/gpu-check.sh`): B = 4, H = 16, D = 64 and
//! 128, N = 1024, 4096, 16384 (`ATTNC_BENCH_SIZES` overrides), for dense,
//! causal, sliding window (256), document (packed, 4 documents), soft-cap
//! (causal, cap 50) and ALiBi (causal), in f16 and bf16 (and f32 at the
//! smallest size). Sizes go outermost, so a run cut short still has every
//! variant at the small sizes; `ATTNC_BENCH_BUDGET_S` stops starting new
//! configurations after that many seconds. Prints one line per
//! configuration with the mean kernel time (CUDA events) and TFLOP/s, both counted
//! dense (4 B H N² D) and over the tiles the kernel computes (FULL and
//! PARTIAL); writes JSON lines to `$OUT/gpu_bench.jsonl` when `OUT` is set.
//!
//! Ignored by default (it needs the `cuda` feature, a GPU and minutes):
//! `cargo test --release --features cuda --test cuda_bench -- --ignored --nocapture`.
#![cfg(feature = "cuda")]
// The runtime's errors carry the interpreter's diagnostics by value.
#![allow(clippy::result_large_err)]

#[path = "suite/support/common.rs"]
mod common;

use std::io::Write;

use attnc::bench::{generate_buffer, Rng};
use attnc::codegen::ptx::Dtype;
use attnc::mask::{classify, Tiling};
use attnc::runtime::cuda::{CudaError, CudaRuntime};
use attnc::sema::eval::Shapes;
use attnc::{Inputs, SourceFile, SpecOptions};

/// A benchmark variant: label, example, param overrides, buffer recipes.
type Variant = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static [(&'static str, &'static str)],
);

const VARIANTS: [Variant; 6] = [
    ("dense", "dense", &[], &[]),
    ("causal", "causal", &[], &[]),
    ("sliding_256", "sliding_window", &[("window", "256")], &[]),
    ("document", "packed_docs", &[], &[("doc", "docs:4")]),
    (
        "softcap_causal",
        "gemma2_local",
        &[("window", "1000000000"), ("cap", "50.0")],
        &[],
    ),
    ("alibi_causal", "alibi", &[], &[("slope", "alibi")]),
];

#[test]
#[ignore = "GPU benchmark: run by scripts/gpu-check.sh"]
fn benchmark() {
    let rt = match CudaRuntime::new(0) {
        Ok(rt) => rt,
        Err(e) => panic!("the GPU benchmark needs an NVIDIA GPU and its driver: {e}"),
    };
    let mut json = std::env::var_os("OUT").map(|dir| {
        let path = std::path::Path::new(&dir).join("gpu_bench.jsonl");
        std::fs::File::create(&path)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()))
    });
    let (b, h) = (4usize, 16usize);
    println!(
        "GPU benchmark on {} ({}), B = {b}, H = {h}",
        rt.device_name(),
        rt.arch()
    );
    println!(
        "{:16} {:>5} {:>3} {:>4} {:>9} {:>10} {:>10}",
        "variant", "N", "D", "type", "ms", "TFLOP/s", "(tiles)"
    );
    let sizes = std::env::var("ATTNC_BENCH_SIZES")
        .map(|s| {
            s.split(',')
                .map(|x| {
                    x.trim()
                        .parse::<usize>()
                        .expect("ATTNC_BENCH_SIZES: numbers")
                })
                .collect()
        })
        .unwrap_or_else(|_| vec![1024, 4096, 16384]);
    let smallest = sizes.iter().copied().min().unwrap_or(0);
    let budget = std::env::var("ATTNC_BENCH_BUDGET_S")
        .ok()
        .map(|s| s.parse::<f64>().expect("ATTNC_BENCH_BUDGET_S: seconds"));
    let start = std::time::Instant::now();
    // The driver JIT-compiles each kernel once per (variant, dtype, head dim).
    let mut kernels = std::collections::HashMap::new();
    let mut failures = 0usize;
    'sizes: for &n in &sizes {
        for d in [64usize, 128] {
            let mut rng = Rng::new((n * 1000 + d) as u64);
            let q = rng.array4((b, h, n, d));
            let k = rng.array4((b, h, n, d));
            let v = rng.array4((b, h, n, d));
            let shapes = Shapes {
                b,
                h,
                hkv: h,
                q: n,
                kv: n,
                d,
            };
            for (label, example, params, recipes) in VARIANTS {
                let options = SpecOptions::with_params(params);
                let path = common::root()
                    .join("examples")
                    .join(format!("{example}.attn"));
                let program = attnc::load(SourceFile::read(&path).unwrap(), &options).unwrap();
                let mut inputs = Inputs::new(q.view(), k.view(), v.view());
                for (name, recipe) in recipes.iter() {
                    let decl = program
                        .spec
                        .buffers
                        .iter()
                        .find(|x| x.name == *name)
                        .unwrap();
                    inputs = inputs.buffer(
                        name,
                        generate_buffer(decl, &shapes, recipe, &mut rng).unwrap(),
                    );
                }
                let dtypes: &[Dtype] = if n == smallest {
                    &[Dtype::F16, Dtype::Bf16, Dtype::F32]
                } else {
                    &[Dtype::F16, Dtype::Bf16]
                };
                for &dtype in dtypes {
                    if let Some(b) = budget.filter(|&b| start.elapsed().as_secs_f64() > b) {
                        println!(
                            "time budget of {b:.0} s spent: stopping before {label} N={n} D={d} {}",
                            dtype.name()
                        );
                        break 'sizes;
                    }
                    // A failing configuration is reported and the others go on; a
                    // driver error after a launch may leave the context unusable,
                    // so that one stops the benchmark.
                    let kernel = match kernels.entry((label, dtype, d)).or_insert_with(|| {
                        rt.compile(&program.spec, d, dtype)
                            .map_err(|e| e.to_string())
                    }) {
                        Ok(k) => k,
                        Err(e) => {
                            println!(
                                "{label:16} {n:>5} {d:>3} {:>4} ERROR compiling: {e}",
                                dtype.name()
                            );
                            failures += 1;
                            continue;
                        }
                    };
                    let l = &kernel.ptx().launch;
                    let bound = attnc::bind::bind(&program.spec, &inputs).unwrap();
                    let stats = classify(&program.spec, &bound, Tiling::new(l.bq, l.bkv).unwrap())
                        .unwrap()
                        .stats_total();
                    let timed = (|| {
                        let mut prepared = rt.prepare(kernel, &inputs)?;
                        // About 0.2 s of launches per configuration.
                        let probe = rt.time(kernel, &mut prepared, 1)?;
                        let reps = ((200.0 / probe.max(1e-3)) as usize).clamp(3, 200);
                        let ms = rt.time(kernel, &mut prepared, reps)?;
                        rt.finish(kernel, &prepared)?;
                        Ok::<_, CudaError>((ms, reps))
                    })();
                    let (ms, reps) = match timed {
                        Ok(x) => x,
                        Err(e) => {
                            println!("{label:16} {n:>5} {d:>3} {:>4} ERROR: {e}", dtype.name());
                            failures += 1;
                            if matches!(e, CudaError::Driver { .. }) {
                                println!("a driver error: stopping the benchmark");
                                break 'sizes;
                            }
                            continue;
                        }
                    };
                    let dense = 4.0 * (b * h) as f64 * (n * n) as f64 * d as f64;
                    let tiles = dense * stats.work_fraction;
                    let (tf_dense, tf_tiles) = (dense / ms / 1e9, tiles / ms / 1e9);
                    println!("{label:16} {n:>5} {d:>3} {:>4} {ms:>9.3} {tf_dense:>10.1} {tf_tiles:>10.1}", dtype.name());
                    if let Some(f) = json.as_mut() {
                        let line = serde_json::json!({
                            "variant": label, "n": n, "d": d, "b": b, "h": h, "dtype": dtype.name(), "arch": rt.arch().name(),
                            "device": rt.device_name(), "ms": ms, "reps": reps, "tflops_dense": tf_dense,
                            "tflops_tiles": tf_tiles, "work_fraction": stats.work_fraction,
                            "bq": l.bq, "bkv": l.bkv, "smem_bytes": l.smem_bytes,
                        });
                        writeln!(f, "{line}").unwrap();
                    }
                }
            }
        }
    }
    println!(
        "benchmark done in {:.0} s, {failures} configuration(s) failed",
        start.elapsed().as_secs_f64()
    );
    assert_eq!(failures, 0, "{failures} benchmark configuration(s) failed");
}
