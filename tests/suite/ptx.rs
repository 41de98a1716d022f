//! The PTX backend without a GPU: snapshots of the PTX of focused specs, and
//! ptxas assembling the PTX of every example for sm_80 and sm_90 in every
//! dtype, within the register and shared-memory budget the launch promises.
//!
//! ptxas is found through `ATTNC_PTXAS`, else `.tools/cuda/nvidia/cuda_nvcc/bin/ptxas`
//! (installed by `scripts/test.sh`, the suite's command, from PyPI), else `PATH`.
//! Without it the assembling tests fail, naming the command that installs it.

use crate::support::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use attnc::codegen::ptx::{self, Arch, Dtype, PtxKernel, PtxOptions};
use attnc::tile::{self, Schedule};
use attnc::SourceFile;

fn spec_of(path: &Path) -> attnc::sema::Spec {
    attnc::load(SourceFile::read(path).unwrap(), &Default::default())
        .unwrap()
        .spec
}

fn compile(spec: &attnc::sema::Spec, schedule: &Schedule, arch: Arch, dtype: Dtype) -> PtxKernel {
    let k = tile::lower(spec, schedule);
    tile::verify(&k).unwrap();
    ptx::compile(
        &k,
        &PtxOptions {
            arch,
            dtype,
            kv_quant: None,
        },
    )
    .unwrap_or_else(|e| panic!("{}: {e}", spec.name))
}

/// A small schedule (one warp, 16 x 16 tiles, D = 16) keeps the snapshots
/// readable; the structure is the same at every size.
const SNAPSHOT_SCHEDULE: Schedule = Schedule {
    tiling: attnc::mask::Tiling { bq: 16, bkv: 16 },
    dim: Some(16),
    exp2: true,
    rows: attnc::tile::nest::RowMap::OneHead,
    kv: attnc::tile::nest::KvSource::Packed,
};

#[test]
fn ptx_snapshots_of_focused_specs() {
    for (file, dtype) in [
        ("affine_window.attn", Dtype::F16),
        ("hoist_row_col.attn", Dtype::Bf16),
        ("score_guarded_by_mask.attn", Dtype::F32),
        ("softcap_exp2.attn", Dtype::F16),
    ] {
        let spec = spec_of(&common::root().join("tests/specs").join(file));
        let k = compile(&spec, &SNAPSHOT_SCHEDULE, Arch::Sm80, dtype);
        insta::assert_snapshot!(
            format!("ptx_{}_{}", file.trim_end_matches(".attn"), dtype),
            k.text
        );
    }
    // K/V read in place through a page table (a paged pool or ragged rows).
    let spec = spec_of(&common::root().join("tests/specs/affine_window.attn"));
    let schedule = Schedule {
        kv: attnc::tile::nest::KvSource::InPlace,
        ..SNAPSHOT_SCHEDULE
    };
    let k = compile(&spec, &schedule, Arch::Sm80, Dtype::F16);
    insta::assert_snapshot!("ptx_affine_window_f16_in_place", k.text);
    // Quantized K/V dequantized in the tile loads: int8 into an f32 kernel,
    // fp8 into an f16 one.
    for (elem, dtype) in [
        (attnc::ElemType::Int8, Dtype::F32),
        (attnc::ElemType::Fp8, Dtype::F16),
    ] {
        let k = tile::lower(&spec, &schedule);
        let options = PtxOptions {
            arch: Arch::Sm80,
            dtype,
            kv_quant: Some(elem),
        };
        let k = ptx::compile(&k, &options).unwrap();
        insta::assert_snapshot!(format!("ptx_affine_window_{dtype}_in_place_{elem}"), k.text);
    }
    // A packed kernel takes no quantized K/V.
    let packed = tile::lower(&spec, &SNAPSHOT_SCHEDULE);
    let err = ptx::compile(
        &packed,
        &PtxOptions {
            arch: Arch::Sm80,
            dtype: Dtype::F16,
            kv_quant: Some(attnc::ElemType::Int8),
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("int8 K/V in the packed kernel"), "{err}");
}

#[test]
fn kernels_have_the_promised_shape() {
    let spec = spec_of(&common::root().join("examples/packed_docs.attn"));
    let k = compile(
        &spec,
        &ptx::schedule(128, Dtype::F16),
        Arch::Sm90,
        Dtype::F16,
    );
    let t = &k.text;
    assert!(
        t.contains(".target sm_90") && t.contains(".version 8.0") && t.contains(".address_size 64")
    );
    assert!(t.contains(&format!(".visible .entry {}(", k.entry)));
    for op in [
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
        "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16",
        "cp.async.cg.shared.global",
        "ex2.approx.ftz.f32",
        "shfl.sync.bfly.b32",
        "atom.global.cas.b32",
    ] {
        assert!(t.contains(op), "missing {op}");
    }
    // doc[q] (checked, row level) is read once per owned row: 2 reads;
    // doc[kv] (column level, PARTIAL tiles only) once per owned column: 16.
    assert_eq!(t.matches("ld.global.nc.s64").count(), 2 + 16, "{t}");
    // The FULL tile body has no mask code: the selects to -inf are in the
    // PARTIAL body only (one per owned element).
    let full = &t[t.find("---- FULL tile").unwrap()..t.find("---- PARTIAL tile").unwrap()];
    assert!(
        !full.contains("selp.f32") && !full.contains("icmp.eq"),
        "mask code in the FULL body"
    );
    let partial = &t[t.find("---- PARTIAL tile").unwrap()..t.find("---- online softmax").unwrap()];
    assert_eq!(partial.matches("0fFF800000").count(), 32);
    // P V: mma.sync, except on V tiles the host flagged as holding NaN or
    // inf, where a uniform branch before the softmax step takes a copy of it
    // and FMAs predicated on p != 0 (so the usual path stays straight-line).
    let before = &t[..t.find("---- online softmax").unwrap()];
    assert!(before.contains("bra.uni $L_pv_exact_"));
    let pv = &t[t.find("---- O += P V").unwrap()..t.find("---- epilogue").unwrap()];
    // The label is placed at the start of a line; the branch to it is not.
    let (fast, exact) = pv.split_at(pv.find("\n$L_pv_exact_").unwrap());
    assert!(t.contains("[p_v_flags]") && t.contains("ld.global.nc.u8"));
    assert!(fast.contains("mma.sync") && fast.contains("bra.uni $L_pv_done_"));
    assert!(exact.contains("---- online softmax"));
    let exact = &exact[exact.find("---- O += P V, exact").unwrap()..];
    assert!(exact.contains("shfl.sync.idx.b32") && exact.contains("setp.neu.f32"));
    assert!(!exact.contains("mma.sync"));
    assert!(exact
        .lines()
        .filter(|l| l.contains("fma.rn.f32"))
        .all(|l| l.trim_start().starts_with("@%p")));
    // f32 inputs use FMAs, not tensor cores, each skipping p = 0; they do
    // not read the V-tile flags.
    let k32 = compile(
        &spec,
        &ptx::schedule(64, Dtype::F32),
        Arch::Sm80,
        Dtype::F32,
    );
    assert!(!k32.text.contains("mma.sync") && k32.text.contains("fma.rn.f32"));
    let pv32 =
        &k32.text[k32.text.find("---- O += P V").unwrap()..k32.text.find("---- epilogue").unwrap()];
    assert!(pv32
        .lines()
        .filter(|l| l.contains("fma.rn.f32"))
        .all(|l| l.trim_start().starts_with("@%p")));
    assert!(!k32.text.contains("[p_v_flags]"));
    let kb = compile(
        &spec,
        &ptx::schedule(64, Dtype::Bf16),
        Arch::Sm80,
        Dtype::Bf16,
    );
    assert!(
        kb.text.contains("m16n8k16.row.col.f32.bf16.bf16.f32")
            && kb.text.contains("cvt.rn.bf16x2.f32")
    );
}

/// Float division by values that are not constants (head-, element- and
/// row-level divisors) and a sigmoid, as element-level score code (a
/// constant divisor is a multiply in the loop IR already).
const DIVISIONS: &str = "attention divisions {
    buffer temp[H]: float
    mask = causal
    let d = float(q - kv)
    score = score / temp[h] - 2.0 * score / (1.0 + d) + sigmoid(score) / float(q + 1)
}";

fn divisions_spec() -> attnc::sema::Spec {
    attnc::load(
        SourceFile::new("divisions.attn", DIVISIONS),
        &Default::default(),
    )
    .unwrap()
    .spec
}

/// The score code of soft-capping and float division is straight-line and
/// has no IEEE division (`div.rn` is a range check, a branch and a call to a
/// slow path in SASS, per element): `tanh` is `ex2` + `rcp.approx`, `x / y`
/// is `rcp.approx` of a scaled divisor, `sigmoid` is `rcp.approx`, in every
/// dtype.
#[test]
fn score_code_has_no_ieee_division() {
    let gemma = spec_of(&common::root().join("examples/gemma2_local.attn"));
    let divisions = divisions_spec();
    for dtype in Dtype::ALL {
        for (spec, want) in [
            (&gemma, &["ex2.approx.ftz.f32", "rcp.approx.ftz.f32"][..]),
            (&divisions, &["rcp.approx.ftz.f32", "and.b32"][..]),
        ] {
            let k = compile(spec, &ptx::schedule(128, dtype), Arch::Sm90, dtype);
            let t = &k.text;
            let score =
                &t[t.find("---- FULL tile").unwrap()..t.find("---- online softmax").unwrap()];
            for op in want {
                assert!(
                    score.contains(op),
                    "{} {dtype}: no {op} in the score code",
                    spec.name
                );
            }
            for op in ["div.rn", "rcp.rn", "tanh.approx"] {
                assert!(
                    !score.contains(op),
                    "{} {dtype}: {op} in the score code",
                    spec.name
                );
            }
        }
    }
}

// ---- ptxas ------------------------------------------------------------------------------

const INSTALL: &str = "python3 -m pip install --target .tools/cuda nvidia-cuda-nvcc-cu12==12.9.86";

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// The ptxas to use. Without one the test fails (a test that skips checks
/// nothing): `scripts/test.sh`, the suite's command, installs it.
fn ptxas() -> PathBuf {
    std::env::var_os("ATTNC_PTXAS")
        .map(PathBuf::from)
        .or_else(|| {
            Some(common::root().join(".tools/cuda/nvidia/cuda_nvcc/bin/ptxas"))
                .filter(|p| p.is_file())
        })
        .or_else(|| on_path("ptxas"))
        .unwrap_or_else(|| {
            panic!(
                "ptxas not found: run the suite with scripts/test.sh, which installs it, or install it with `{INSTALL}`, or set ATTNC_PTXAS"
            )
        })
}

/// What `ptxas -v` says about one kernel.
#[derive(Debug, Default, PartialEq)]
struct Figures {
    registers: usize,
    smem: usize,
    stack: usize,
    spill_stores: usize,
    spill_loads: usize,
}

/// The number right before `unit` in `line` (`Used 18 registers`).
fn number_before(line: &str, unit: &str) -> Option<usize> {
    let at = line.find(unit)?;
    line[..at].split_whitespace().last()?.parse().ok()
}

fn parse_figures(log: &str) -> Figures {
    let mut f = Figures::default();
    for line in log.lines() {
        if line.contains("Used") && line.contains("registers") {
            f.registers = number_before(line, " registers").unwrap_or_default();
            f.smem = number_before(line, " bytes smem").unwrap_or_default();
        }
        if line.contains("stack frame") {
            f.stack = number_before(line, " bytes stack frame").unwrap_or_default();
            f.spill_stores = number_before(line, " bytes spill stores").unwrap_or_default();
            f.spill_loads = number_before(line, " bytes spill loads").unwrap_or_default();
        }
    }
    f
}

#[test]
fn ptxas_output_parses() {
    let log = "ptxas info    : Compiling entry function 'k' for 'sm_80'\nptxas info    : Function properties for k\n    \
8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\nptxas info    : Used 168 registers, used 1 barriers, 18432 bytes smem, 472 bytes cmem[0]\n";
    assert_eq!(
        parse_figures(log),
        Figures {
            registers: 168,
            smem: 18432,
            stack: 8,
            spill_stores: 4,
            spill_loads: 12
        }
    );
}

/// Assembles with the flags CI uses; `Err` holds ptxas's message.
fn assemble(ptxas: &Path, text: &str, arch: Arch, name: &str) -> Result<Figures, String> {
    assemble_with(ptxas, text, arch, name, true)
}

/// Score mods whose per-element work is more than the registers left beside
/// a D = 128 tile: their kernels assemble and meet every other budget, but
/// ptxas spills a few bytes per thread. The PTX backend evaluates each of a
/// thread's elements with all its intermediates live; until it can trade
/// elements per thread for registers, these stay listed (with what makes
/// them heavy) rather than dropping the check for everyone.
const SPILLING_SCORE_MODS: [(&str, &str); 2] = [
    (
        "sandwich",
        "eight cosines per element, each a range reduction and two polynomials",
    ),
    (
        "mla_rope",
        "a 4-term dot product of buffer rows per element",
    ),
];

fn spills_allowed(job: &str) -> bool {
    SPILLING_SCORE_MODS
        .iter()
        .any(|(spec, _)| job.starts_with(&format!("{spec}_")))
}

fn assemble_with(
    ptxas: &Path,
    text: &str,
    arch: Arch,
    name: &str,
    spills_are_errors: bool,
) -> Result<Figures, String> {
    let tmp = tempfile::Builder::new()
        .prefix("attnc-ptx-")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    let src = dir.join(format!("{name}.ptx"));
    std::fs::write(&src, text).unwrap();
    let out = Command::new(ptxas)
        .arg(format!("-arch={arch}"))
        .args(["-v", "--warn-on-spills"])
        .args(spills_are_errors.then_some("--warning-as-error"))
        .arg(&src)
        .arg("-o")
        .arg(dir.join(format!("{name}.cubin")))
        .output()
        .map_err(|e| format!("cannot run {}: {e}", ptxas.display()))?;
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(log);
    }
    Ok(parse_figures(&log))
}

/// One kernel to assemble.
struct Job {
    name: String,
    kernel: PtxKernel,
}

/// Assembles every job (on all cores) and checks each against its budget:
/// no error, no spill, no stack, at most `max_registers` registers, the
/// static shared memory the launch declares (0 when it is dynamic), and at
/// least the occupancy the launch promises. Returns one line per job.
fn assemble_all(ptxas: &Path, jobs: &[Job]) -> Vec<String> {
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(jobs.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<Option<Result<String, String>>> = (0..jobs.len()).map(|_| None).collect();
    let slots = std::sync::Mutex::new(&mut results);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(job) = jobs.get(i) else { break };
                let l = &job.kernel.launch;
                let spills_ok = spills_allowed(&job.name);
                let r = assemble_with(ptxas, &job.kernel.text, l.arch, &job.name, !spills_ok)
                    .and_then(|f| {
                        let static_smem = if l.dynamic_smem { 0 } else { l.smem_bytes };
                        let problems: Vec<String> = [
                            (
                                f.spill_stores + f.spill_loads > 0 && !spills_ok,
                                format!("spills ({f:?})"),
                            ),
                            (
                                f.stack > 0 && !spills_ok,
                                format!("a {} byte stack frame", f.stack),
                            ),
                            (
                                f.registers > l.max_registers,
                                format!("{} registers > budget {}", f.registers, l.max_registers),
                            ),
                            (
                                f.smem != static_smem,
                                format!(
                                    "{} bytes static smem, the launch declares {static_smem}",
                                    f.smem
                                ),
                            ),
                            (
                                l.ctas_per_sm(f.registers) < l.min_ctas_per_sm(),
                                format!(
                                    "occupancy {} CTAs/SM < promised {}",
                                    l.ctas_per_sm(f.registers),
                                    l.min_ctas_per_sm()
                                ),
                            ),
                        ]
                        .into_iter()
                        .filter_map(|(bad, what)| bad.then_some(what))
                        .collect();
                        if problems.is_empty() {
                            Ok(format!(
                                "{:40} {:>3} regs {:>6} B smem{} {} CTAs/SM",
                                job.name,
                                f.registers,
                                l.smem_bytes,
                                if l.dynamic_smem {
                                    " (dynamic)"
                                } else {
                                    "          "
                                },
                                l.ctas_per_sm(f.registers)
                            ))
                        } else {
                            Err(problems.join("; "))
                        }
                    });
                slots.lock().unwrap()[i] = Some(r);
            });
        }
    });
    let mut lines = Vec::new();
    let mut failures = Vec::new();
    for (job, r) in jobs.iter().zip(results) {
        match r.expect("every job ran") {
            Ok(line) => lines.push(line),
            Err(e) => failures.push(format!("{}: {e}", job.name)),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} kernels failed:\n{}",
        failures.len(),
        jobs.len(),
        failures.join("\n")
    );
    lines
}

fn examples() -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(common::root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "attn"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 10, "examples/ has the example specs");
    paths
}

#[test]
fn every_example_assembles_within_budget() {
    let ptxas = ptxas();
    let mut jobs = Vec::new();
    for path in examples() {
        let spec = spec_of(&path);
        for dtype in Dtype::ALL {
            for arch in Arch::ALL {
                // D = 128: the largest head dim that keeps Q in registers,
                // so the tightest register budget.
                let kernel = compile(&spec, &ptx::schedule(128, dtype), arch, dtype);
                jobs.push(Job {
                    name: format!("{}_d128_{dtype}_{arch}", spec.name),
                    kernel,
                });
            }
        }
    }
    let lines = assemble_all(&ptxas, &jobs);
    println!("{}", lines.join("\n"));
}

#[test]
fn other_layouts_assemble() {
    let ptxas = ptxas();
    let mut jobs = Vec::new();
    let variants: [(&str, Schedule, Dtype); 7] = [
        // Q from shared memory (D > 128), dynamic shared memory.
        ("t5_bias", ptx::schedule(256, Dtype::F16), Dtype::F16),
        ("packed_docs", ptx::schedule(256, Dtype::F32), Dtype::F32),
        // A padded head dim and the general cp.async split.
        ("gemma2_local", ptx::schedule(72, Dtype::Bf16), Dtype::Bf16),
        ("alibi", ptx::schedule(40, Dtype::F32), Dtype::F32),
        // One warp, and 8 warps with 128-key tiles.
        (
            "spec_tree",
            Schedule {
                tiling: attnc::mask::Tiling { bq: 16, bkv: 16 },
                dim: Some(64),
                exp2: true,
                ..Schedule::default()
            },
            Dtype::F16,
        ),
        (
            "causal",
            Schedule {
                tiling: attnc::mask::Tiling { bq: 128, bkv: 128 },
                dim: Some(64),
                exp2: true,
                ..Schedule::default()
            },
            Dtype::F16,
        ),
        // Natural-exp units.
        (
            "softcap",
            Schedule {
                exp2: false,
                ..ptx::schedule(64, Dtype::F16)
            },
            Dtype::F16,
        ),
    ];
    for (name, schedule, dtype) in variants {
        let spec = spec_of(&common::root().join("examples").join(format!("{name}.attn")));
        for arch in Arch::ALL {
            let kernel = compile(&spec, &schedule, arch, dtype);
            let d = schedule.dim.unwrap();
            jobs.push(Job {
                name: format!(
                    "{name}_{}x{}_d{d}_{dtype}_{arch}",
                    schedule.tiling.bq, schedule.tiling.bkv
                ),
                kernel,
            });
        }
    }
    // K/V read in place through a page table: every example on tensor cores
    // and with FMAs, and the general cp.async split.
    let in_place = |schedule: Schedule| Schedule {
        kv: attnc::tile::nest::KvSource::InPlace,
        ..schedule
    };
    for path in examples() {
        let spec = spec_of(&path);
        for (arch, dtype) in [(Arch::Sm90, Dtype::F16), (Arch::Sm80, Dtype::F32)] {
            jobs.push(Job {
                name: format!("{}_in_place_d128_{dtype}_{arch}", spec.name),
                kernel: compile(&spec, &in_place(ptx::schedule(128, dtype)), arch, dtype),
            });
        }
    }
    // Quantized K/V (int8, fp8) dequantized in the tile loads, on tensor
    // cores and with FMAs, D = 128 and a padded D = 72.
    for (name, d) in [("sliding_window", 128), ("gemma2_local", 72)] {
        let spec = spec_of(&common::root().join("examples").join(format!("{name}.attn")));
        for elem in [attnc::ElemType::Int8, attnc::ElemType::Fp8] {
            for (arch, dtype) in [
                (Arch::Sm90, Dtype::F16),
                (Arch::Sm80, Dtype::Bf16),
                (Arch::Sm80, Dtype::F32),
            ] {
                let k = tile::lower(&spec, &in_place(ptx::schedule(d, dtype)));
                let kernel = ptx::compile(
                    &k,
                    &PtxOptions {
                        arch,
                        dtype,
                        kv_quant: Some(elem),
                    },
                )
                .unwrap();
                jobs.push(Job {
                    name: format!("{name}_in_place_{elem}_d{d}_{dtype}_{arch}"),
                    kernel,
                });
            }
        }
    }
    let gemma = spec_of(&common::root().join("examples/gemma2_local.attn"));
    jobs.push(Job {
        name: "gemma2_local_in_place_d72_bf16_sm80".into(),
        kernel: compile(
            &gemma,
            &in_place(ptx::schedule(72, Dtype::Bf16)),
            Arch::Sm80,
            Dtype::Bf16,
        ),
    });
    // Float division by non-constants in the score code (straight-line: ptxas
    // interleaves the elements), in every dtype.
    let divisions = divisions_spec();
    for d in [64, 128] {
        for dtype in Dtype::ALL {
            for arch in Arch::ALL {
                jobs.push(Job {
                    name: format!("divisions_d{d}_{dtype}_{arch}"),
                    kernel: compile(&divisions, &ptx::schedule(d, dtype), arch, dtype),
                });
            }
        }
    }
    // The focused specs (guarded reads, short circuits, strength reduction, ...)
    // at D = 128 on tensor cores and with FMAs.
    let mut specs: Vec<PathBuf> = std::fs::read_dir(common::root().join("tests/specs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "attn"))
        .collect();
    specs.sort();
    for path in specs {
        let spec = spec_of(&path);
        for (arch, dtype) in [(Arch::Sm90, Dtype::F16), (Arch::Sm80, Dtype::F32)] {
            let kernel = compile(&spec, &ptx::schedule(128, dtype), arch, dtype);
            jobs.push(Job {
                name: format!("spec_{}_d128_{dtype}_{arch}", spec.name),
                kernel,
            });
        }
    }
    let lines = assemble_all(&ptxas, &jobs);
    println!("{}", lines.join("\n"));
}

#[test]
fn ptxas_rejects_broken_ptx() {
    // The harness itself must see failures: a kernel with an undeclared register.
    let ptxas = ptxas();
    let spec = spec_of(&common::root().join("examples/causal.attn"));
    let k = compile(&spec, &SNAPSHOT_SCHEDULE, Arch::Sm80, Dtype::F16);
    let broken = k.text.replacen("ret;", "mov.u32 %r99999, 0;\n\tret;", 1);
    let e = assemble(&ptxas, &broken, Arch::Sm80, "broken").unwrap_err();
    assert!(e.contains("%r99999"), "{e}");
}
