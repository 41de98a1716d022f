//! The CUDA backend: PTX text for the loop IR.
//!
//! Stage: GPU code generation. Consumes a verified [`crate::tile::Kernel`] and
//! [`PtxOptions`] (target architecture, input dtype); produces a
//! [`PtxKernel`]: the PTX module text and the launch configuration the host
//! must use. It never sees the AST or sema, does no I/O and needs no GPU.
//!
//! The kernel is FlashAttention-2 shaped:
//! - one CTA per (b, h, query tile), `bq / 16` warps, each warp owning 16
//!   query rows; the grid is `(ceil(Q / bq), H, B)`, query tiles in reverse
//!   order so the longest rows of a causal mask start first;
//! - every thread owns the elements of the S tile that an `m16n8k16`
//!   accumulator fragment puts in its registers: rows `g` and `g + 8` of its
//!   warp (`g = lane / 4`) and, per 8-column block, columns `2 * (lane % 4)`
//!   and the one after. The f32 path keeps this layout, so the score code,
//!   the mask and the online softmax are the same for every dtype;
//! - K and V tiles are staged through shared memory with `cp.async`
//!   (zero-filled past KV), K of the next tile loading during the softmax
//!   and PV of the current one;
//! - f16/bf16: S = Q Kᵀ and O += P V with `mma.sync.m16n8k16` (f32
//!   accumulation, operands through `ldmatrix`); f32: the same products
//!   with FMAs from shared memory;
//! - a key whose probability is 0 (masked, past KV, underflowed) never
//!   touches the accumulators, as in the reference, so NaN or inf in V
//!   there cannot reach the output (`0 × NaN` is NaN): the f32 path
//!   predicates each FMA on `p != 0`; the mma path keeps `mma.sync` except
//!   on key tiles whose V tile the host flagged as holding a non-finite
//!   value ([`crate::runtime::device::host::nonfinite_tiles`]), where a uniform branch takes f32
//!   FMAs predicated on `p != 0` (p shuffled within the quad, V widened
//!   from shared memory). NaN or inf in K at a masked key is replaced by
//!   the mask's -inf before the softmax;
//! - the online softmax keeps the row max and (per-thread partial) row sum
//!   in registers, reduces with `shfl.sync.bfly` and exponentiates with
//!   `ex2.approx` (the IR folds log2(e) into `q_prescale` under `exp2`);
//! - the block map is walked from device arrays: FULL key tiles (ranges)
//!   first, then PARTIAL ones, as [`crate::tile::interp`] does. The mask
//!   code runs on PARTIAL tiles only; a ragged last key tile (columns past
//!   KV) gets a column mask on either kind;
//! - the per-level SSA code of the IR is lowered where it lives: call and
//!   head values once per thread, row values once per owned row and query
//!   tile, column values once per owned column and key tile, element values
//!   per owned element;
//! - buffer reads: `checked` ones are range-checked and a failure is
//!   recorded in the error block (see [`ErrorRecord`]) that the host turns
//!   into the interpreter's error; every read, division and `ancestor` runs
//!   only under its guard and only for real rows and columns (predication).
//!
//! Kernel parameters, in order (see [`PARAMS`]): pointers `q, k, v, out,
//! lse, err, map_rows, map_full, map_partial, v_flags`, then `u32` shapes `B, H,
//! HKV, Q, KV, D`, `group` (= H / HKV), `kv_batch_stride` (1, or 0 when k and
//! v broadcast over the batch), `map_stride_b`, `map_stride_h`, `kv_rows`
//! (the key rows of k and v, or of the longest sequence of an in-place call;
//! `KV`, the end of the call's positions, is larger when queries run past the
//! keys or keys start at an offset), then the `s64` `q_offset` and
//! `kv_offset` (key row `j` is at position `kv_offset + j`), then, for a
//! kernel that reads K/V in place (a paged pool or ragged dense rows), the
//! [`IN_PLACE_PARAMS`], then one pointer per buffer of the kernel.
//!
//! Device layouts: q is `[B, H, Q, Dp]`, k and v are `[B or 1, HKV, kv_rows, Dp]`
//! in the dtype, with `Dp` the padded head dim ([`Launch::d_pad`]; the pad
//! columns are zero); out is `[B, H, Q, Dp]` f32 and lse `[B, H, Q]` f32
//! (natural log). Buffers are row-major: int as i64, float as f32, bool as
//! one byte. `map_rows` holds, per (map, query tile), four u32: the first
//! and end index of its FULL ranges in `map_full` (u32 pairs `start, end`)
//! and of its PARTIAL tiles in `map_partial` (u32 key tile indices); map
//! `b * map_stride_b + h * map_stride_h` serves (b, h). `v_flags` holds one
//! byte per K/V head (`kv_batch * HKV + kv_head`, or `b * HKV + kv_head` in
//! place) and key tile of `kv_rows` keys, 1 where the
//! V tile holds NaN or inf in the dtype ([`crate::runtime::device::host::nonfinite_tiles`]); only
//! the f16/bf16 kernels read it.

mod expr;

mod kernel;
mod writer;

use crate::tile::{Kernel, Schedule, Verified};

// The launch ABI (architectures, element types, parameters, the error
// block, launch data) belongs to the runtime, which launches kernels; the
// backend generates code against it.
pub use crate::runtime::device::{
    Arch, Dtype, ErrorRecord, Launch, PtxError, PtxKernel, IN_PLACE_PARAMS, PARAMS, QUANT_PARAMS,
    STATIC_SMEM_LIMIT,
};

/// What to generate PTX for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PtxOptions {
    pub arch: Arch,
    pub dtype: Dtype,
    /// K and V stored as int8 or fp8 with a float32 scale per row,
    /// dequantized to `dtype` in the tile loads (the in-place kernel only);
    /// `None`: K and V are in `dtype`.
    pub kv_quant: Option<crate::tensor::ElemType>,
}

/// The largest (padded) head dim the backend supports.
pub const MAX_HEAD_DIM: usize = 256;

/// The schedule the PTX backend is tuned for at head dim `d`: 64 query rows
/// (4 warps), 64 keys per tile for f16/bf16 up to D = 128, 32 keys for f32
/// and for larger heads, exp2 softmax.
pub fn schedule(d: usize, dtype: Dtype) -> Schedule {
    let bkv = if dtype == Dtype::F32 || pad_head_dim(d, dtype) > 128 {
        32
    } else {
        64
    };
    Schedule {
        tiling: crate::mask::Tiling { bq: 64, bkv },
        dim: Some(d),
        exp2: true,
        ..Schedule::default()
    }
}

/// The head dim of the device arrays: `d` rounded up to 16 (mma, whose k
/// step is 16) or 8 (f32, whose column blocks are 8 wide).
pub fn pad_head_dim(d: usize, dtype: Dtype) -> usize {
    let unit = if dtype.uses_mma() { 16 } else { 8 };
    d.max(1).div_ceil(unit).saturating_mul(unit)
}

/// Plans the launch of `kernel` under `opts`, or says why it cannot run.
pub fn launch(kernel: &Kernel, opts: &PtxOptions) -> Result<Launch, PtxError> {
    use crate::tile::nest::RowMap;
    let s = &kernel.schedule;
    if s.rows != RowMap::OneHead || s.kv == crate::tile::nest::KvSource::PackedBf16 {
        return Err(PtxError::Nest {
            what: format!("rows {}, kv {}", s.rows.name(), s.kv.name()),
        });
    }
    if let Some(e) = opts.kv_quant {
        if !e.is_quantized() || s.kv != crate::tile::nest::KvSource::InPlace {
            return Err(PtxError::Nest {
                what: format!(
                    "{e} K/V in the {} kernel (scaled int8/fp8 K/V are dequantized by the in-place kernel's tile loads: emit it with a page size)",
                    if s.kv == crate::tile::nest::KvSource::InPlace { "in-place" } else { "packed" }
                ),
            });
        }
    }
    let d = s.dim.ok_or(PtxError::GenericDim)?;
    let d_pad = pad_head_dim(d, opts.dtype);
    if d_pad > MAX_HEAD_DIM {
        return Err(PtxError::HeadDimTooLarge {
            d,
            d_pad,
            max: MAX_HEAD_DIM,
        });
    }
    let ok = |n: usize| matches!(n, 16 | 32 | 64 | 128);
    if !ok(s.tiling.bq) || !ok(s.tiling.bkv) {
        return Err(PtxError::TileSize {
            bq: s.tiling.bq,
            bkv: s.tiling.bkv,
        });
    }
    let q_in_regs =
        opts.dtype.uses_mma() && (d_pad <= 64 || (d_pad <= 128 && !heavy_scores(kernel)));
    let layout = kernel::Layout::new(s.tiling.bq, s.tiling.bkv, d_pad, opts.dtype, q_in_regs);
    let smem_bytes = layout.smem_bytes;
    if smem_bytes > opts.arch.max_smem_per_block() {
        return Err(PtxError::SharedMemory {
            bytes: smem_bytes,
            max: opts.arch.max_smem_per_block(),
            arch: opts.arch,
        });
    }
    Ok(Launch {
        arch: opts.arch,
        dtype: opts.dtype,
        bq: s.tiling.bq,
        bkv: s.tiling.bkv,
        d,
        d_pad,
        threads: layout.threads,
        smem_bytes,
        dynamic_smem: smem_bytes > STATIC_SMEM_LIMIT,
        q_in_registers: layout.q_in_regs,
        max_registers: 255,
        kv_quant: opts.kv_quant,
    })
}

/// Whether the per-element code is heavy enough (buffer reads per element,
/// or more than 12 element instructions in a loop) that the 32 registers of
/// Q fragments at D = 128 would push ptxas into spilling: such kernels read
/// Q from shared memory instead.
pub fn heavy_scores(kernel: &Kernel) -> bool {
    use crate::tile::{Level, Op, Section};
    let elem = |sec: Section| {
        kernel
            .insts
            .iter()
            .filter(|i| i.level == Level::Elem && i.section.runs_in(sec))
            .count()
    };
    let reads = kernel
        .insts
        .iter()
        .any(|i| i.level == Level::Elem && matches!(i.op, Op::Load { .. } | Op::Ancestor { .. }));
    reads || elem(Section::Full).max(elem(Section::Partial)) > 12
}

/// Generates the PTX module of `kernel` and its launch configuration.
pub fn compile(kernel: &Verified, opts: &PtxOptions) -> Result<PtxKernel, PtxError> {
    let launch = launch(kernel, opts)?;
    let entry = entry_name(&kernel.name);
    let text = kernel::generate(kernel, &launch, &entry);
    Ok(PtxKernel {
        text,
        entry,
        launch,
    })
}

/// The PTX module text of `kernel` (see [`compile`] for the launch data).
pub fn emit(kernel: &Verified, opts: &PtxOptions) -> Result<String, PtxError> {
    compile(kernel, opts).map(|k| k.text)
}

/// The `.entry` name of a kernel: `attnc_` and the spec name, with any
/// character PTX does not allow in a name replaced by `_`.
pub fn entry_name(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("attnc_{clean}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{load, SourceFile, SpecOptions};

    fn kernel(src: &str, schedule: &Schedule) -> Verified {
        let program = load(SourceFile::new("t.attn", src), &SpecOptions::default()).unwrap();
        crate::tile::lower(&program.spec, schedule)
    }

    #[test]
    fn schedules_and_padding() {
        assert_eq!(
            schedule(128, Dtype::F16),
            Schedule {
                tiling: crate::mask::Tiling { bq: 64, bkv: 64 },
                dim: Some(128),
                exp2: true,
                ..Schedule::default()
            }
        );
        assert_eq!(schedule(256, Dtype::Bf16).tiling.bkv, 32);
        assert_eq!(schedule(64, Dtype::F32).tiling.bkv, 32);
        assert_eq!(pad_head_dim(72, Dtype::F16), 80);
        assert_eq!(pad_head_dim(72, Dtype::F32), 72);
        assert_eq!(pad_head_dim(3, Dtype::F32), 8);
    }

    #[test]
    fn rejects_what_does_not_fit_with_a_reason() {
        let opts = PtxOptions {
            arch: Arch::Sm80,
            dtype: Dtype::F16,
            kv_quant: None,
        };
        let generic = kernel(
            "attention a { }",
            &Schedule {
                dim: None,
                ..Schedule::default()
            },
        );
        assert_eq!(emit(&generic, &opts), Err(PtxError::GenericDim));
        let big = kernel(
            "attention a { }",
            &Schedule {
                dim: Some(300),
                ..Schedule::default()
            },
        );
        let e = emit(&big, &opts).unwrap_err();
        assert_eq!(
            e,
            PtxError::HeadDimTooLarge {
                d: 300,
                d_pad: 304,
                max: 256
            }
        );
        assert!(e.to_string().contains("D = 300"), "{e}");
        let odd = kernel(
            "attention a { }",
            &Schedule {
                tiling: crate::mask::Tiling { bq: 48, bkv: 64 },
                ..Schedule::default()
            },
        );
        assert_eq!(
            emit(&odd, &opts),
            Err(PtxError::TileSize { bq: 48, bkv: 64 })
        );
    }

    #[test]
    fn launch_of_the_default_schedules() {
        let k = kernel("attention a { mask = causal }", &schedule(128, Dtype::F16));
        let l = launch(
            &k,
            &PtxOptions {
                arch: Arch::Sm90,
                dtype: Dtype::F16,
                kv_quant: None,
            },
        )
        .unwrap();
        assert_eq!((l.threads, l.d_pad, l.q_in_registers), (128, 128, true));
        // K and V tiles of 64 x (128 + 8) halves; Q is staged in the V tile.
        assert_eq!(l.smem_bytes, 2 * 64 * 136 * 2);
        assert!(!l.dynamic_smem);
        assert_eq!(l.grid(2, 16, 1000), (16, 16, 2));
        let k = kernel("attention a { }", &schedule(128, Dtype::F32));
        let l = launch(
            &k,
            &PtxOptions {
                arch: Arch::Sm80,
                dtype: Dtype::F32,
                kv_quant: None,
            },
        )
        .unwrap();
        assert!(l.dynamic_smem && !l.q_in_registers);
        assert!(l.min_ctas_per_sm() >= 1);
    }

    #[test]
    fn names_parse_and_print() {
        for a in Arch::ALL {
            assert_eq!(a.name().parse::<Arch>(), Ok(a));
        }
        for d in Dtype::ALL {
            assert_eq!(d.name().parse::<Dtype>(), Ok(d));
        }
        assert!("sm_70"
            .parse::<Arch>()
            .unwrap_err()
            .contains("sm_80 or sm_90"));
        assert_eq!(entry_name("gemma2_local"), "attnc_gemma2_local");
    }
}
