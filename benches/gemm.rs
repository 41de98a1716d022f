//! Micro-benchmarks of the tile kernels: GFLOP/s of `qk` and `pv` for every
//! implementation this CPU runs (JIT f32x4 and the native instruction sets), the
//! online-softmax step, and the throughput of the JIT'd vector exp.
//!
//! Run: `cargo bench --bench gemm` (add `-- --threads 2` to also run both cores,
//! `-- --tiles` to compare JIT register-tile shapes, `-- --softmax` for the
//! online-softmax step alone). One thread by default; the
//! figures are the best of several timed repetitions (the machine is shared and noisy).

use attnc::codegen::clif::jit::{JitModule, JitOptions};
use attnc::codegen::clif::microkernel::{
    begin_function, define_pv_tiled, define_qk_tiled, jit_fma_peak, GemmImpl, MicroTile,
};
use attnc::codegen::clif::vmath::{VMath, F32X4};
use attnc::runtime::gemm::{
    pack_k, pack_v, FmaPeak, NativeIsa, PackedK, PackedV, PvFn, QkFn, TileKernels,
};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{InstBuilder, MemFlagsData};
use ndarray::Array2;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

const BQ: usize = 64;
const BKV: usize = 64;
const KV: usize = 1024;

fn matrix(rows: usize, cols: usize, seed: u32) -> Array2<f32> {
    let mut x = seed.wrapping_mul(2654435761) | 1;
    Array2::from_shape_simple_fn((rows, cols), || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
    })
}

/// Best seconds per call of `f` over `reps` timed batches of `iters` calls.
fn best_time(iters: usize, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() / iters as f64);
    }
    best
}

/// GFLOP/s of a sweep of `qk` (one query block against all KV tiles) per thread.
fn bench_qk(kernels: &TileKernels, d: usize, threads: usize) -> f64 {
    let q = matrix(BQ, d, 1);
    let k = matrix(KV, d, 2);
    let layout = PackedK { d, kv_len: KV };
    let mut packed = vec![0.0; layout.len()];
    pack_k(k.view(), &mut packed).unwrap();
    let flops = 2.0 * (BQ * KV * d) as f64;
    let run = |s: &mut Vec<f32>| {
        for kv0 in (0..KV).step_by(BKV) {
            kernels
                .qk(
                    q.as_slice().unwrap(),
                    d,
                    &packed[layout.tile_offset(kv0)..],
                    d,
                    BQ,
                    BKV,
                    s,
                    BKV,
                    0.125,
                )
                .unwrap();
        }
        black_box(&s);
    };
    parallel_gflops(threads, flops, || {
        let mut s = vec![0.0f32; BQ * BKV];
        best_time(4, 60, || run(&mut s))
    })
}

/// GFLOP/s of a sweep of `pv` (one query block against all KV tiles) per thread.
fn bench_pv(kernels: &TileKernels, d: usize, threads: usize) -> f64 {
    let p = matrix(BQ, BKV, 3);
    let v = matrix(KV, d, 4);
    let layout = PackedV { d, kv_len: KV };
    let mut packed = vec![0.0; layout.len()];
    pack_v(v.view(), &mut packed).unwrap();
    let flops = 2.0 * (BQ * KV * d) as f64;
    let run = |acc: &mut Vec<f32>| {
        for kv0 in (0..KV).step_by(BKV) {
            kernels
                .pv(
                    p.as_slice().unwrap(),
                    BKV,
                    &packed[layout.tile_offset(kv0)..],
                    layout.row_stride(),
                    d,
                    BQ,
                    BKV,
                    acc,
                    d,
                )
                .unwrap();
        }
        black_box(&acc);
    };
    parallel_gflops(threads, flops, || {
        let mut acc = vec![0.0f32; BQ * d];
        best_time(4, 60, || run(&mut acc))
    })
}

/// Runs `time_one` on `threads` threads at once; returns the summed GFLOP/s.
fn parallel_gflops(threads: usize, flops: f64, time_one: impl Fn() -> f64 + Sync) -> f64 {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|_| s.spawn(&time_one)).collect();
        handles
            .into_iter()
            .map(|h| flops / h.join().unwrap() / 1e9)
            .sum()
    })
}

/// Nanoseconds per score of the online-softmax step on a 64 x 64 tile, with
/// `exp` (`base2 = false`) or `2^x` (the kernels' default schedule).
/// Prints the online-softmax step's cost for every native instruction set.
fn print_softmax() {
    println!("online-softmax step (64 x 64 scores, d = 64), ns per score:");
    println!("{:<18} {:>9} {:>9}", "kernels", "exp", "2^x");
    for isa in NativeIsa::ALL.into_iter().filter(|i| i.is_supported()) {
        let k = TileKernels::native(isa).unwrap();
        let (e, e2) = (bench_softmax(&k, 64, false), bench_softmax(&k, 64, true));
        println!("{:<18} {e:>9.3} {e2:>9.3}", k.name());
    }
}

fn bench_softmax(kernels: &TileKernels, d: usize, base2: bool) -> f64 {
    let mut s = matrix(BQ, BKV, 5).into_raw_vec_and_offset().0;
    // m = 1 bounds every score (in [-0.5, 0.5)) and every probability the step
    // writes back in their place (in (0, 1]), so the step runs on its own output
    // with no copy to time, alpha = 1 and every call does the same work.
    let mut m = vec![1.0f32; BQ];
    let mut l = vec![0.0f32; BQ];
    let mut acc = vec![0.0f32; BQ * d];
    let t = best_time(2000, 15, || {
        kernels
            .softmax_update(&mut s, BKV, BQ, BKV, &mut m, &mut l, &mut acc, d, d, base2)
            .unwrap();
        black_box(&s);
    });
    t * 1e9 / (BQ * BKV) as f64
}

type MapFn = unsafe extern "C" fn(*const f32, *mut f32, usize);

/// Exps per nanosecond of the JIT'd f32x4 `exp_nonpositive` and `exp` over 4096 values.
fn bench_jit_exp() -> (f64, f64) {
    let mut jit = JitModule::new(
        &JitOptions {
            verify: false,
            ..JitOptions::default()
        },
        &[],
    )
    .unwrap();
    let ptr = jit.pointer_type();
    let vm = VMath::new(jit.has_native_fma());
    for (name, full) in [("exp_np", false), ("exp", true)] {
        let sig = jit.signature(&[ptr, ptr, ptr], &[]);
        let id = jit.declare_function(name, &sig).unwrap();
        jit.define_function(id, |b, _| {
            let p = begin_function(b);
            let zero = b.ins().iconst(ptr, 0);
            let bytes = b.ins().ishl_imm_s(p[2], 2);
            attnc::codegen::clif::microkernel::emit_while(
                b,
                &[zero],
                |b, v| b.ins().icmp(IntCC::UnsignedLessThan, v[0], bytes),
                |b, v| {
                    let src = b.ins().iadd(p[0], v[0]);
                    let dst = b.ins().iadd(p[1], v[0]);
                    // Two independent vectors per iteration.
                    for off in [0, 16] {
                        let x = b.ins().load(F32X4, MemFlagsData::new(), src, off);
                        let y = if full {
                            vm.exp(b, x)
                        } else {
                            vm.exp_nonpositive(b, x)
                        };
                        b.ins().store(MemFlagsData::new(), y, dst, off);
                    }
                    vec![b.ins().iadd_imm_s(v[0], 32)]
                },
            );
            b.ins().return_(&[]);
            Ok(())
        })
        .unwrap();
    }
    let code = jit.finalize().unwrap();
    let n = 4096;
    let xs: Vec<f32> = (0..n).map(|i| -(i as f32) * 0.02).collect();
    let mut ys = vec![0.0f32; n];
    let mut rate = |name: &str| {
        let f: MapFn = unsafe { code.function(name) }.unwrap();
        let t = best_time(200, 15, || unsafe { f(xs.as_ptr(), ys.as_mut_ptr(), n) });
        n as f64 / (t * 1e9)
    };
    (rate("exp_np"), rate("exp"))
}

/// JIT kernels with a given register tile.
fn jit_tiled(tile: MicroTile) -> TileKernels {
    let mut jit = JitModule::new(
        &JitOptions {
            verify: false,
            ..JitOptions::default()
        },
        &[],
    )
    .unwrap();
    define_qk_tiled(&mut jit, "qk", tile).unwrap();
    define_pv_tiled(&mut jit, "pv", tile).unwrap();
    let code = Arc::new(jit.finalize().unwrap());
    unsafe {
        let qk: QkFn = code.function("qk").unwrap();
        let pv: PvFn = code.function("pv").unwrap();
        let native = TileKernels::native_detected();
        TileKernels::from_raw(
            format!("jit-{}x{}", tile.rows, tile.vecs),
            qk,
            pv,
            native.softmax_update,
            code,
        )
    }
}

/// The in-place decode products (`runtime::gemm::view`) on the tile of a
/// paged GQA decode step (`attnc emit --stage nest --q-len 1 --heads 32
/// --kv-heads 8 --page-size 16`): every query head of a sequence in one tile
/// (32 rows, 4 per KV head), key rows of 8 KV heads x D = 128 in pages of 16
/// slots in a shuffled order, tiles of 64 keys. GFLOP/s of `qk` and `pv`
/// (2 x rows x keys x D each), one thread, K/V stored f32 and int8 (with a
/// scale per row), for 128 keys (in cache) and 65536 keys (128 MiB of int8
/// K and V, 512 MiB of f32: past every cache).
fn print_view() {
    for n in [128, 65536] {
        print_view_at(n);
    }
}

fn print_view_at(n: usize) {
    use attnc::runtime::abi::KvView;
    use attnc::runtime::gemm::view::view_kernels;
    use attnc::tensor::ElemType;
    let (d, hkv, group, page, bkv) = (128usize, 8usize, 4usize, 16usize, 64usize);
    let rows = hkv * group;
    let pages = n / page;
    let k_f32: Vec<f32> = matrix(pages * page * hkv, d, 1).iter().copied().collect();
    let v_f32: Vec<f32> = k_f32.iter().rev().copied().collect();
    let to_i8 = |x: &[f32]| -> Vec<i8> { x.iter().map(|&x| (x * 254.0).round() as i8).collect() };
    let (k_i8, v_i8) = (to_i8(&k_f32), to_i8(&v_f32));
    let scales = vec![1.0f32 / 254.0; pages * page * hkv];
    // A shuffled page order (a fixed odd stride through the pages).
    let table: Vec<i32> = (0..pages).map(|i| ((i * 7 + 3) % pages) as i32).collect();
    println!(
        "in-place decode products, {rows} rows (GQA {group}), {hkv} KV heads, D = {d}, {n} keys \
         in pages of {page}, tiles of {bkv}, one thread, GFLOP/s:"
    );
    for isa in NativeIsa::ALL.into_iter().filter(|i| i.is_supported()) {
        let (qk, pv) = view_kernels(isa);
        for elem in [ElemType::F32, ElemType::Int8] {
            let quantized = elem == ElemType::Int8;
            let (k, v): (*const u8, *const u8) = if quantized {
                (k_i8.as_ptr().cast(), v_i8.as_ptr().cast())
            } else {
                (k_f32.as_ptr().cast(), v_f32.as_ptr().cast())
            };
            let scales = if quantized {
                scales.as_ptr()
            } else {
                std::ptr::null()
            };
            let view = KvView::pool(
                (k, v),
                (scales, scales),
                table.as_ptr(),
                n,
                [page, hkv, d],
                group,
                elem,
            );
            let q = matrix(rows, d, 3);
            let mut s = vec![0.5f32; rows * bkv];
            let mut acc = vec![0f32; rows * d];
            let flops = (2 * rows * n * d) as f64;
            let reps = (4096 / n).max(1);
            let t_qk = best_time(reps, 7, || {
                for c in (0..n).step_by(bkv) {
                    // SAFETY: the view covers keys 0 .. n; s holds rows x bkv.
                    unsafe {
                        qk(
                            q.as_ptr(),
                            d,
                            &view,
                            c,
                            d,
                            rows,
                            bkv,
                            s.as_mut_ptr(),
                            bkv,
                            0.1,
                        )
                    };
                }
                black_box(&s);
            });
            let t_pv = best_time(reps, 7, || {
                for c in (0..n).step_by(bkv) {
                    // SAFETY: as above; acc holds rows x d.
                    unsafe { pv(s.as_ptr(), bkv, &view, c, d, rows, bkv, acc.as_mut_ptr(), d) };
                }
                black_box(&acc);
            });
            println!(
                "  {isa:>8} {:>4}: qk {:6.1}  pv {:6.1}",
                format!("{elem:?}").to_lowercase(),
                flops / t_qk / 1e9,
                flops / t_pv / 1e9
            );
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads = args
        .iter()
        .position(|a| a == "--threads")
        .and_then(|i| args.get(i + 1))
        .and_then(|t| t.parse().ok())
        .unwrap_or(1usize);
    if args.iter().any(|a| a == "--softmax") {
        print_softmax();
        return;
    }
    if args.iter().any(|a| a == "--view") {
        print_view();
        return;
    }
    let mut impls: Vec<TileKernels> = vec![GemmImpl::Jit.kernels().unwrap()];
    for isa in NativeIsa::ALL {
        if isa.is_supported() {
            impls.push(TileKernels::native(isa).unwrap());
        } else {
            println!("(this CPU lacks {isa}: not measured)");
        }
    }
    if args.iter().any(|a| a == "--tiles") {
        for (rows, vecs) in [(8, 1), (4, 2), (5, 2), (6, 2), (8, 2), (3, 4), (4, 4)] {
            impls.push(jit_tiled(MicroTile { rows, vecs }));
        }
    }
    let mut peaks = vec![jit_fma_peak().unwrap()];
    peaks.extend(
        NativeIsa::ALL
            .into_iter()
            .filter(|i| i.is_supported())
            .map(|i| FmaPeak::native(i).unwrap()),
    );
    for peak in &peaks {
        println!(
            "{} FMA peak (registers only, one thread): {:.1} GFLOP/s",
            peak.name(),
            peak.measure(200_000, 30)
        );
    }
    println!("tile products, bq = {BQ}, bkv = {BKV}, kv = {KV}, {threads} thread(s), GFLOP/s:");
    println!(
        "{:<18} {:>9} {:>9} {:>9} {:>9}",
        "kernels", "qk d=64", "qk d=128", "pv d=64", "pv d=128"
    );
    for k in &impls {
        println!(
            "{:<18} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
            k.name(),
            bench_qk(k, 64, threads),
            bench_qk(k, 128, threads),
            bench_pv(k, 64, threads),
            bench_pv(k, 128, threads),
        );
    }
    let (kv, d) = (16384, 128);
    let k = matrix(kv, d, 6);
    let mut packed_k = vec![0.0; PackedK { d, kv_len: kv }.len()];
    let mut packed_v = vec![0.0; PackedV { d, kv_len: kv }.len()];
    let t_k = best_time(3, 10, || {
        pack_k(k.view(), &mut packed_k).unwrap();
    });
    let t_v = best_time(3, 10, || {
        pack_v(k.view(), &mut packed_v).unwrap();
    });
    println!(
        "packing one head of {kv} x {d}: pack_k {:.2} ms, pack_v {:.2} ms",
        t_k * 1e3,
        t_v * 1e3
    );
    print_softmax();
    let (np, full) = bench_jit_exp();
    println!("JIT f32x4 exp, exps per ns (one thread): exp_nonpositive {np:.2}, exp {full:.2}");
}
