//! `attnc bench`: random inputs, warm-up, timed runs, and a report.
//!
//! The report counts the dense work `4·B·H·Q·KV·D` flops and the useful work
//! (only visible entries, counted exactly: FULL tiles whole, PARTIAL tiles
//! element by element, EMPTY tiles not at all).

use std::time::Instant;

use ndarray::{Array4, ArrayD, IxDyn};

use crate::bind::{bind, Inputs, Outputs};
use crate::buffer::BufferData;
use crate::driver::{Error, Program};
use crate::mask::{classify, TileClass, Tiling};
use crate::sema::eval::{Evaluator, Point, Shapes};
use crate::sema::{Buffer, Type};

/// Shapes and repetitions of a benchmark.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub dim: usize,
    pub q_offset: i64,
    pub runs: usize,
    pub warmup: usize,
    pub seed: u64,
    /// The stored type of K and V (what `kv_bytes` counts).
    pub kv_elem: crate::tensor::ElemType,
}

/// What `attnc bench` prints.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchReport {
    pub spec: String,
    pub backend: String,
    pub shapes: Shapes,
    pub runs: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub compile_ms: f64,
    pub gflops_dense: f64,
    pub gflops_useful: f64,
    /// Fraction of the Q x KV entries that are visible.
    pub visible_fraction: f64,
    pub peak_rss_mib: f64,
    /// Bytes of K and V the call must read once: the rows (b, KV head, key)
    /// that some query reading that KV head sees ([`Visible::key_rows`]), K
    /// and V, in their stored type (scales included).
    pub kv_bytes: u64,
    /// Bytes of K and V stored (`B x HKV x KV` rows of each), seen or not.
    pub kv_stored_bytes: u64,
    /// `kv_bytes` over the median time: the rate at which the call reads its
    /// cache (the figure to set beside the memory bandwidth for decode).
    pub gb_per_s: f64,
    /// The FMA peak measured beside the runs, when asked for.
    pub fma_peak: Option<PeakReport>,
    /// The memory read bandwidth measured beside the runs, when asked for.
    pub memory: Option<MemoryReport>,
    /// The type of q's values and the stored type of K and V.
    pub q_elem: crate::tensor::ElemType,
    pub kv_elem: crate::tensor::ElemType,
    /// The loop nest a tiled backend ran (rows, K/V source; `attnc emit
    /// --stage nest` prints it whole), when the caller names it.
    pub nest: Option<String>,
}

/// The machine's memory read bandwidth, measured in the same run as the
/// timings, and the call against it.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryReport {
    /// Median over passes of [`read_bandwidth`] over the arrays of K and V
    /// the call reads, GB/s.
    pub read_gb_per_s: f64,
    /// The call's median time over the time to read `kv_bytes` once at
    /// `read_gb_per_s`: 1.0 is memory speed. None when the call must read
    /// nothing (the mask hides every key).
    pub ratio: Option<f64>,
}

/// The FMA peak measured before every timed run, and the runs against it.
#[derive(Clone, Debug, PartialEq)]
pub struct PeakReport {
    /// What was measured, such as `jit-f32x4` or `native-avx2`.
    pub name: String,
    /// Median over the runs of the peak of all threads, GFLOP/s.
    pub median_gflops: f64,
    /// Median over the runs of (useful GFLOP/s of the run) / (the peak measured
    /// just before it).
    pub median_fraction: f64,
    /// The best run's fraction.
    pub best_fraction: f64,
}

/// Measures an FMA peak (GFLOP/s of all worker threads) when called.
pub struct PeakProbe {
    /// What is measured, such as `jit-f32x4`.
    pub name: String,
    /// Runs the measurement.
    pub measure: Box<dyn Fn() -> f64>,
}

impl BenchReport {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "spec": self.spec,
            "backend": self.backend,
            "batch": self.shapes.b,
            "heads": self.shapes.h,
            "kv_heads": self.shapes.hkv,
            "q_len": self.shapes.q,
            "kv_len": self.shapes.kv,
            "dim": self.shapes.d,
            "runs": self.runs,
            "median_ms": self.median_ms,
            "min_ms": self.min_ms,
            "compile_ms": self.compile_ms,
            "gflops_dense": self.gflops_dense,
            "gflops_useful": self.gflops_useful,
            "visible_fraction": self.visible_fraction,
            "peak_rss_mib": self.peak_rss_mib,
            "kv_bytes": self.kv_bytes,
            "kv_stored_bytes": self.kv_stored_bytes,
            "gb_per_s": self.gb_per_s,
            "read_gb_per_s": self.memory.as_ref().map(|m| m.read_gb_per_s),
            "memory_ratio": self.memory.as_ref().and_then(|m| m.ratio),
            "q_dtype": self.q_elem.name(),
            "kv_dtype": self.kv_elem.name(),
            "nest": self.nest,
            "fma_peak": self.fma_peak.as_ref().map(|p| serde_json::json!({
                "kind": p.name,
                "median_gflops": p.median_gflops,
                "median_fraction": p.median_fraction,
                "best_fraction": p.best_fraction,
            })),
        })
    }
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.shapes;
        writeln!(
            f,
            "{} on {}: B={} H={} HKV={} Q={} KV={} D={}, q {}, K/V {}, {} runs",
            self.spec,
            self.backend,
            s.b,
            s.h,
            s.hkv,
            s.q,
            s.kv,
            s.d,
            self.q_elem,
            self.kv_elem,
            self.runs
        )?;
        if let Some(nest) = &self.nest {
            writeln!(f, "  loop nest: {nest}")?;
        }
        writeln!(
            f,
            "  median {:.3} ms, min {:.3} ms, compile {:.3} ms",
            self.median_ms, self.min_ms, self.compile_ms
        )?;
        writeln!(
            f,
            "  {:.1} GFLOP/s dense-equivalent, {:.1} GFLOP/s useful ({:.1}% of entries visible)",
            self.gflops_dense,
            self.gflops_useful,
            100.0 * self.visible_fraction
        )?;
        let size = |bytes: u64| {
            if bytes < 1 << 20 {
                format!("{:.1} KiB", bytes as f64 / 1024.0)
            } else {
                format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
            }
        };
        if self.kv_bytes == self.kv_stored_bytes {
            writeln!(
                f,
                "  K+V {} read at {:.1} GB/s",
                size(self.kv_bytes),
                self.gb_per_s
            )?;
        } else {
            writeln!(
                f,
                "  K+V {} seen by the mask (of {} stored) read at {:.1} GB/s",
                size(self.kv_bytes),
                size(self.kv_stored_bytes),
                self.gb_per_s
            )?;
        }
        if let Some(m) = &self.memory {
            write!(
                f,
                "  memory read at {:.1} GB/s beside the runs (K and V streamed by every thread): ",
                m.read_gb_per_s
            )?;
            match m.ratio {
                Some(ratio) => writeln!(
                    f,
                    "the call takes {ratio:.2}x the time to read that K+V once"
                )?,
                None => writeln!(f, "the call must read no K or V (the mask hides every key)")?,
            }
        }
        write!(f, "  peak RSS {:.1} MiB", self.peak_rss_mib)?;
        if let Some(p) = &self.fma_peak {
            write!(
                f,
                "\n  {} FMA peak beside the runs: median {:.1} GFLOP/s; useful work at {:.1}% of it (median of runs), {:.1}% (best run)",
                p.name,
                p.median_gflops,
                100.0 * p.median_fraction,
                100.0 * p.best_fraction
            )?;
        }
        Ok(())
    }
}

/// A tiny deterministic generator (SplitMix64) so benchmarks are reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// A standard normal sample (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }

    pub fn array4(&mut self, shape: (usize, usize, usize, usize)) -> Array4<f32> {
        Array4::from_shape_simple_fn(shape, || self.uniform())
    }

    /// Random q `[B, H, Q, D]`, then k and v `[B, HKV, KV, D]`, uniform in
    /// [-1, 1): the inputs of `attnc bench` and `attnc run --random`.
    pub fn qkv(&mut self, shapes: &Shapes) -> (Array4<f32>, Array4<f32>, Array4<f32>) {
        let q = self.array4((shapes.b, shapes.h, shapes.q, shapes.d));
        let k = self.array4((shapes.b, shapes.hkv, shapes.kv, shapes.d));
        let v = self.array4((shapes.b, shapes.hkv, shapes.kv, shapes.d));
        (q, k, v)
    }
}

/// Generates a buffer from a recipe:
/// `docs:N` (int, N equal contiguous documents), `alibi` (float, ALiBi
/// slopes 2^(-8(i+1)/n)), `uniform` (float in [-1, 1)), `iota` (int, 0, 1, ...),
/// `bernoulli:P` (bool, true with probability P), `const:V` (any type).
pub fn generate_buffer(
    decl: &Buffer,
    shapes: &Shapes,
    recipe: &str,
    rng: &mut Rng,
) -> Result<BufferData, Error> {
    let shape = shapes.buffer_shape(decl).map_err(|d| {
        Error::Usage(format!(
            "cannot generate buffer `{}`: its dimension `{d}` is negative, overflows a 64-bit int or divides by zero for B={}, H={}, HKV={}, Q={}, KV={}, D={}",
            decl.name, shapes.b, shapes.h, shapes.hkv, shapes.q, shapes.kv, shapes.d
        ))
    })?;
    let n: usize = shape.iter().product();
    let bad = |why: String| {
        Error::Usage(format!(
            "cannot generate buffer `{}` ({}) from `{recipe}`: {why}; recipes: docs:N, alibi, uniform, iota, bernoulli:P, const:V",
            decl.name, decl.elem
        ))
    };
    let (kind, arg) = recipe.split_once(':').unwrap_or((recipe, ""));
    let want = |t: Type| {
        if decl.elem == t {
            Ok(())
        } else {
            Err(bad(format!("`{kind}` makes {t} data")))
        }
    };
    // `iota`, `alibi` and `uniform` take no `:ARG` (one was ignored).
    let no_arg = || {
        if recipe.contains(':') {
            Err(bad(format!(
                "`{kind}` takes no argument (`{kind}`, not `{recipe}`)"
            )))
        } else {
            Ok(())
        }
    };
    let dyn_shape = IxDyn(&shape);
    let shape = &shape;
    let last = *shape.last().unwrap_or(&1).max(&1);
    Ok(match kind {
        "docs" => {
            want(Type::Int)?;
            let docs: usize = arg
                .parse()
                .ok()
                .filter(|d| *d > 0)
                .ok_or_else(|| bad("N must be a positive integer".into()))?;
            let per = last.div_ceil(docs);
            BufferData::Int(ArrayD::from_shape_fn(dyn_shape, |i| {
                (i[shape.len() - 1] / per) as i64
            }))
        }
        "iota" => {
            want(Type::Int)?;
            no_arg()?;
            BufferData::Int(ArrayD::from_shape_fn(dyn_shape, |i| {
                i[shape.len() - 1] as i64
            }))
        }
        "alibi" => {
            want(Type::Float)?;
            no_arg()?;
            BufferData::Float(ArrayD::from_shape_fn(dyn_shape, |i| {
                2f32.powf(-8.0 * (i[shape.len() - 1] + 1) as f32 / last as f32)
            }))
        }
        "uniform" => {
            want(Type::Float)?;
            no_arg()?;
            BufferData::Float(
                ArrayD::from_shape_vec(dyn_shape, (0..n).map(|_| rng.uniform()).collect()).unwrap(),
            )
        }
        "bernoulli" => {
            want(Type::Bool)?;
            let p: f64 = arg
                .parse()
                .ok()
                .filter(|p| (0.0..=1.0).contains(p))
                .ok_or_else(|| bad("P must be in [0, 1]".into()))?;
            BufferData::Bool(
                ArrayD::from_shape_vec(
                    dyn_shape,
                    (0..n)
                        .map(|_| (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p)
                        .collect(),
                )
                .unwrap(),
            )
        }
        "const" => match decl.elem {
            Type::Int => BufferData::Int(ArrayD::from_elem(
                dyn_shape,
                arg.parse()
                    .map_err(|_| bad("V must be an integer".into()))?,
            )),
            Type::Float => BufferData::Float(ArrayD::from_elem(
                dyn_shape,
                arg.parse().map_err(|_| bad("V must be a number".into()))?,
            )),
            Type::Bool => BufferData::Bool(ArrayD::from_elem(
                dyn_shape,
                arg.parse()
                    .map_err(|_| bad("V must be true or false".into()))?,
            )),
        },
        _ => return Err(bad("unknown recipe".into())),
    })
}

/// What the mask lets a call see, counted exactly by [`count_visible`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Visible {
    /// Visible (b, h, q, kv) entries.
    pub entries: u64,
    /// Key rows (b, KV head, key) that at least one query row reading that
    /// KV head sees: the rows of K (and of V) the call must read.
    pub key_rows: u64,
}

/// Counts what the mask lets the call see, using the block map: FULL tiles
/// count whole, PARTIAL tiles element by element, at the positions the map
/// was built for (a ragged or paged batch's queries at the end of each
/// sequence, keys from the key offset).
pub fn count_visible(program: &Program, inputs: &Inputs<'_>) -> Result<Visible, Error> {
    let bound = bind(&program.spec, inputs)?;
    let s = bound.shapes;
    let group = s.h / s.hkv.max(1);
    let Some(mask) = program.spec.mask else {
        let key_rows = match &bound.kv_lens {
            Some(lens) => lens.iter().sum::<usize>() * s.hkv,
            None => bound.kv_batch * s.hkv * bound.kv_rows,
        } as u64;
        let entries = match &bound.kv_lens {
            Some(lens) => lens.iter().sum::<usize>() * s.h * s.q,
            None => s.b * s.h * s.q * bound.kv_rows,
        } as u64;
        return Ok(Visible { entries, key_rows });
    };
    let tiling = Tiling::new(64, 64).expect("64x64 is a valid tiling");
    let maps = classify(&program.spec, &bound, tiling).map_err(Error::Mask)?;
    let mut ev = Evaluator::new(&program.spec, s, &bound.buffers);
    // K and V of batch 1 shared by every sequence: a key row any sequence
    // sees is read, once.
    let shared_kv = bound.kv_batch == 1;
    // A shared map is every (b, h)'s: count (0, 0) and scale by the heads.
    let (heads, per_map, kv_per_map): (Vec<(usize, usize)>, u64, u64) = if maps.is_shared() {
        (
            vec![(0, 0)],
            (s.b * s.h) as u64,
            (bound.kv_batch * s.hkv) as u64,
        )
    } else {
        let heads = (0..s.b).flat_map(|b| (0..s.h).map(move |h| (b, h)));
        (heads.collect(), 1, 1)
    };
    let mut total = Visible {
        entries: 0,
        key_rows: 0,
    };
    // The keys seen by the heads of one (b, KV head) so far: heads walk in
    // order, so a group's heads are consecutive. For shared K and V, those
    // of every KV head over all sequences.
    let key_rows = bound.key_rows();
    let mut seen = vec![
        false;
        if shared_kv {
            s.hkv * key_rows
        } else {
            key_rows
        }
    ];
    let flush = |seen: &mut Vec<bool>, total: &mut Visible| {
        total.key_rows += seen.iter().filter(|&&x| x).count() as u64 * kv_per_map;
        seen.iter_mut().for_each(|x| *x = false);
    };
    for (i, &(b, h)) in heads.iter().enumerate() {
        let map = maps.get(b, h);
        let base = if shared_kv {
            h / group.max(1) * key_rows
        } else {
            0
        };
        let mut count = 0u64;
        for qt in 0..map.q_tiles() {
            let rows = map.q_rows(qt);
            for (kt, class) in map.tiles(qt) {
                let cols = map.kv_cols(kt as usize);
                match class {
                    TileClass::Full => {
                        count += (rows.len() * cols.len()) as u64;
                        seen[base + cols.start..base + cols.end]
                            .iter_mut()
                            .for_each(|x| *x = true);
                    }
                    TileClass::Partial => {
                        for r in rows.clone() {
                            for c in cols.clone() {
                                let p = Point {
                                    b: b as i64,
                                    h: h as i64,
                                    q: r as i64 + map.q_offset(),
                                    kv: c as i64 + map.kv_offset(),
                                    score: 0.0,
                                };
                                if ev.eval_bool(mask, p).map_err(|error| Error::Eval {
                                    file: program.file.clone(),
                                    error,
                                })? {
                                    count += 1;
                                    seen[base + c] = true;
                                }
                            }
                        }
                    }
                    TileClass::Empty => {}
                }
            }
        }
        total.entries += count * per_map;
        let next_group = heads.get(i + 1).map(|&(b, h)| (b, h / group.max(1)));
        if !shared_kv && next_group != Some((b, h / group.max(1))) {
            flush(&mut seen, &mut total);
        }
    }
    if shared_kv {
        flush(&mut seen, &mut total);
    }
    Ok(total)
}

/// Peak resident memory of this process, from `/proc/self/status` (0 where unavailable).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Median of a non-empty list.
fn median(xs: &[f64]) -> f64 {
    let mut xs = xs.to_vec();
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Times `run` on `inputs`: `warmup` untimed calls, then `runs` timed ones, each
/// right after a measurement of `peak` when one is given.
pub fn measure(
    program: &Program,
    backend: &str,
    config: &BenchConfig,
    inputs: &Inputs<'_>,
    compile_ms: f64,
    peak: Option<PeakProbe>,
    mut run: impl FnMut(&Inputs<'_>) -> Result<Outputs, Error>,
) -> Result<BenchReport, Error> {
    if config.runs == 0 {
        return Err(Error::Usage(
            "a benchmark needs at least one timed run (`runs` is 0)".into(),
        ));
    }
    for _ in 0..config.warmup {
        run(inputs)?;
    }
    let mut times: Vec<f64> = Vec::with_capacity(config.runs);
    let mut peaks = Vec::with_capacity(config.runs);
    for _ in 0..config.runs {
        if let Some(p) = &peak {
            peaks.push((p.measure)());
        }
        let t = Instant::now();
        let out = run(inputs)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        drop(out);
    }
    let median_ms = median(&times);
    let min_ms = times.iter().copied().fold(f64::INFINITY, f64::min);
    let shapes = Shapes {
        b: config.batch,
        h: config.heads,
        hkv: config.kv_heads,
        q: config.q_len,
        kv: config.kv_len,
        d: config.dim,
    };
    let dense = (shapes.b * shapes.h * shapes.q * shapes.kv) as f64;
    let seen = count_visible(program, inputs)?;
    let kv_bytes = (2 * config.kv_elem.row_bytes(seen.key_rows as usize, shapes.d)) as u64;
    let kv_stored_rows = shapes.b * shapes.hkv * shapes.kv;
    let kv_stored_bytes = (2 * config.kv_elem.row_bytes(kv_stored_rows, shapes.d)) as u64;
    let visible = seen.entries as f64;
    let flops_per_entry = 4.0 * shapes.d as f64;
    let fma_peak = peak.map(|p| {
        let fractions: Vec<f64> = times
            .iter()
            .zip(&peaks)
            .map(|(ms, peak)| visible * flops_per_entry / (ms * 1e6) / peak)
            .collect();
        PeakReport {
            name: p.name,
            median_gflops: median(&peaks),
            median_fraction: median(&fractions),
            best_fraction: fractions.iter().copied().fold(0.0, f64::max),
        }
    });
    Ok(BenchReport {
        spec: program.spec.name.clone(),
        backend: backend.to_string(),
        shapes,
        runs: times.len(),
        median_ms,
        min_ms,
        compile_ms,
        gflops_dense: dense * flops_per_entry / (median_ms * 1e6),
        gflops_useful: visible * flops_per_entry / (median_ms * 1e6),
        visible_fraction: if dense > 0.0 { visible / dense } else { 0.0 },
        peak_rss_mib: peak_rss_mib(),
        kv_bytes,
        kv_stored_bytes,
        gb_per_s: kv_bytes as f64 / (median_ms * 1e6),
        fma_peak,
        memory: None,
        q_elem: inputs.q_elem,
        kv_elem: config.kv_elem,
        nest: None,
    })
}

/// Attaches to `report` the memory read bandwidth measured by [`read_bandwidth`]
/// over `arrays` (the bytes of the K and V the call read), median of `passes`.
pub fn with_memory(mut report: BenchReport, arrays: &[&[u8]], passes: usize) -> BenchReport {
    let rates: Vec<f64> = (0..passes.max(1)).map(|_| read_bandwidth(arrays)).collect();
    let read_gb_per_s = median(&rates);
    report.memory = Some(MemoryReport {
        read_gb_per_s,
        ratio: (report.kv_bytes > 0)
            .then(|| report.median_ms / (report.kv_bytes as f64 / (read_gb_per_s * 1e6))),
    });
    report
}

/// Reads every byte of `arrays` once, in order, with every worker thread
/// (each a contiguous share of each array), and returns the bytes read per
/// second in GB/s: the streaming read bandwidth that bounds a call reading
/// those arrays. The sum is integer (the bits), so no float rule stops the
/// compiler from vectorizing it; a hint 64 KiB ahead keeps the hardware
/// prefetchers fed (measured here: 25 GB/s with it, 20 GB/s without on 2
/// threads).
pub fn read_bandwidth(arrays: &[&[u8]]) -> f64 {
    use rayon::prelude::*;
    let threads = rayon::current_num_threads().max(1);
    let bytes: usize = arrays.iter().map(|a| a.len()).sum();
    let t = Instant::now();
    let mut total = 0u32;
    for a in arrays {
        let per = a.len().div_ceil(threads).max(1);
        total = total.wrapping_add(
            a.par_chunks(per)
                .map(sum_bits)
                .reduce(|| 0, u32::wrapping_add),
        );
    }
    std::hint::black_box(total);
    bytes as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// The wrapping sum of the 32-bit words of `xs` (and its last bytes), a
/// 64-byte line at a time.
fn sum_bits(xs: &[u8]) -> u32 {
    const AHEAD: usize = 64 * 1024;
    let mut acc = [0u32; 16];
    let mut lines = xs.chunks_exact(64);
    for (i, line) in lines.by_ref().enumerate() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch is a hint that never faults, whatever the address.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                xs.as_ptr().wrapping_add(i * 64 + AHEAD).cast(),
            )
        };
        for (a, w) in acc.iter_mut().zip(line.chunks_exact(4)) {
            *a = a.wrapping_add(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
        }
    }
    lines
        .remainder()
        .iter()
        .fold(acc.iter().fold(0, |s, &a| s.wrapping_add(a)), |s, &x| {
            s.wrapping_add(u32::from(x))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{load, SourceFile, SpecOptions};

    fn causal() -> Program {
        load(
            SourceFile::new("c.attn", "attention c { mask = causal }"),
            &SpecOptions::default(),
        )
        .unwrap()
    }

    #[test]
    fn visible_count_of_causal_is_exact() {
        let p = causal();
        let q = Array4::<f32>::zeros((1, 2, 100, 4));
        let k = Array4::<f32>::zeros((1, 1, 100, 4));
        let inputs = Inputs::new(q.view(), k.view(), k.view());
        let seen = count_visible(&p, &inputs).unwrap();
        assert_eq!(seen.entries, 2 * 100 * 101 / 2);
        // Query row 99 sees every key.
        assert_eq!(seen.key_rows, 100);
    }

    /// A ragged batch whose heads see different windows, four query heads
    /// per KV head, keys from an offset: the counts of a brute-force walk
    /// over every (b, h, q, kv) at the positions binding gives them.
    #[test]
    fn visible_counts_follow_ragged_positions_heads_and_key_offsets() {
        let p = load(
            SourceFile::new(
                "w.attn",
                "attention w { mask = causal && q - kv < 20 + 30 * h }",
            ),
            &SpecOptions::default(),
        )
        .unwrap();
        let (b, h, hkv, q_len, kv) = (3usize, 8usize, 2usize, 5usize, 150usize);
        let q = Array4::<f32>::zeros((b, h, q_len, 4));
        let k = Array4::<f32>::zeros((b, hkv, kv, 4));
        let lens = ndarray::arr1(&[150i32, 7, 97]);
        let brute =
            |q_start: &dyn Fn(usize) -> i64, kv_start: i64, len: &dyn Fn(usize) -> usize| {
                let (mut entries, mut key_rows) = (0u64, 0u64);
                for bi in 0..b {
                    for g in 0..hkv {
                        let mut seen = vec![false; kv];
                        for hi in g * (h / hkv)..(g + 1) * (h / hkv) {
                            for r in 0..q_len {
                                for (c, seen) in seen.iter_mut().enumerate().take(len(bi)) {
                                    let (qp, kp) = (q_start(bi) + r as i64, kv_start + c as i64);
                                    if kp <= qp && qp - kp < 20 + 30 * hi as i64 {
                                        entries += 1;
                                        *seen = true;
                                    }
                                }
                            }
                        }
                        key_rows += seen.iter().filter(|&&x| x).count() as u64;
                    }
                }
                Visible { entries, key_rows }
            };
        let ragged = Inputs::new(q.view(), k.view(), k.view()).kv_lens(lens.view());
        let want = brute(&|bi| i64::from(lens[bi]) - q_len as i64, 0, &|bi| {
            lens[bi] as usize
        });
        assert_eq!(count_visible(&p, &ragged).unwrap(), want);
        assert!(want.key_rows < (b * hkv * kv) as u64 && want.entries > 0);
        let offset = Inputs::new(q.view(), k.view(), k.view())
            .q_offset(300)
            .kv_offset(200);
        let want = brute(&|_| 300, 200, &|_| kv);
        assert_eq!(count_visible(&p, &offset).unwrap(), want);
        assert!(want.key_rows > 0);
        // K and V of batch 1, shared by the 3 sequences of q: a row is read
        // once, whichever sequences see it; queries of sequence b at 10 b.
        let k1 = Array4::<f32>::zeros((1, hkv, kv, 4));
        let q1 = Array4::<f32>::zeros((b, h, 1, 4));
        let shared = Inputs::new(q1.view(), k1.view(), k1.view()).q_offset(60);
        let seen = count_visible(&p, &shared).unwrap();
        // Query 60 of head hi sees keys 60 - (20 + 30 hi) + 1 ..= 60, that
        // is 20, 50 and then all 61 keys: KV head 0 (heads 0-3) keys 0..=60,
        // KV head 1 (heads 4-7) the same, each once for the 3 sequences.
        assert_eq!(seen.key_rows, 2 * 61);
        assert_eq!(seen.entries, 3 * (20 + 50 + 61 * 6));
    }

    /// With a peak probe, every timed run follows one measurement of it, and the
    /// fractions are the runs' useful GFLOP/s over those peaks.
    #[test]
    fn runs_are_measured_against_the_peak_beside_them() {
        let p = causal();
        let q = Array4::<f32>::zeros((1, 2, 40, 8));
        let inputs = Inputs::new(q.view(), q.view(), q.view());
        let config = BenchConfig {
            batch: 1,
            heads: 2,
            kv_heads: 2,
            q_len: 40,
            kv_len: 40,
            dim: 8,
            q_offset: 0,
            runs: 5,
            warmup: 1,
            seed: 0,
            kv_elem: crate::tensor::ElemType::F32,
        };
        let probes = std::rc::Rc::new(std::cell::Cell::new(0));
        let count = probes.clone();
        let peak = PeakProbe {
            name: "test".into(),
            measure: Box::new(move || {
                count.set(count.get() + 1);
                2.5
            }),
        };
        let report = measure(&p, "reference", &config, &inputs, 0.0, Some(peak), |i| {
            p.run_reference(i)
        })
        .unwrap();
        assert_eq!(probes.get(), 5, "one peak measurement per timed run");
        let peak = report.fma_peak.as_ref().unwrap();
        assert_eq!(peak.name, "test");
        assert_eq!(peak.median_gflops, 2.5);
        // An odd number of runs: the median run is the run of the median time.
        let rel = |a: f64, b: f64| (a - b).abs() / b;
        assert!(rel(peak.median_fraction * 2.5, report.gflops_useful) < 1e-9);
        let visible = (2 * 40 * 41 / 2) as f64;
        let best = visible * 4.0 * 8.0 / (report.min_ms * 1e6);
        assert!(rel(peak.best_fraction * 2.5, best) < 1e-9);
        let json = report.to_json();
        assert_eq!(json["fma_peak"]["kind"], "test");
        assert_eq!(json["fma_peak"]["median_gflops"], 2.5);
    }

    #[test]
    fn buffer_recipes() {
        let p = load(
            SourceFile::new("d.attn", "attention d { buffer doc[KV]: int\n buffer s[H]: float\n mask = doc[q] == doc[kv] }"),
            &SpecOptions::default(),
        )
        .unwrap();
        let shapes = Shapes {
            b: 1,
            h: 4,
            hkv: 1,
            q: 8,
            kv: 8,
            d: 4,
        };
        let mut rng = Rng::new(1);
        let BufferData::Int(doc) =
            generate_buffer(&p.spec.buffers[0], &shapes, "docs:4", &mut rng).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            doc.iter().copied().collect::<Vec<_>>(),
            vec![0, 0, 1, 1, 2, 2, 3, 3]
        );
        let BufferData::Float(s) =
            generate_buffer(&p.spec.buffers[1], &shapes, "alibi", &mut rng).unwrap()
        else {
            panic!()
        };
        assert_eq!(s[[0]], 0.25);
        assert!(generate_buffer(&p.spec.buffers[0], &shapes, "alibi", &mut rng).is_err());
        assert!(generate_buffer(&p.spec.buffers[0], &shapes, "docs:0", &mut rng).is_err());
        // A recipe without an argument refuses one rather than ignoring it.
        for (buffer, recipe) in [(0, "iota:5"), (1, "alibi:2"), (1, "uniform:")] {
            let err = generate_buffer(&p.spec.buffers[buffer], &shapes, recipe, &mut rng)
                .unwrap_err()
                .to_string();
            assert!(err.contains("takes no argument"), "{recipe}: {err}");
        }
    }
}
