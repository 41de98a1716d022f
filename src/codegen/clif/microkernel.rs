//! JIT-generated f32x4 tile products: the portable implementation of `qk` and `pv`,
//! with exactly the C ABI, packed layouts and semantics of the native kernels in
//! `runtime::gemm` (see that module for the contracts), so either can serve a kernel
//! ([`GemmImpl`]).
//!
//! Shapes (chosen by `cargo bench --bench gemm -- --tiles`; see `docs/cpu-backend.md`):
//!
//! * both kernels use a [`MicroTile`] register tile, by default 4 rows x 2 f32x4
//!   vectors (8 accumulators: x64 has only 16 xmm registers, and wider tiles spill),
//!   with the reduction loop unrolled by 4 and leftover rows in tiles of 2 and 1.
//! * `qk` walks column tiles of 8 keys inside the 16-key packed panels; a ragged last
//!   tile is computed whole (the packing zero-pads it) and stored through a stack
//!   buffer, `n_cols` scalars per row.
//! * `pv` walks column blocks of 8 head-dimension columns; a ragged last block is
//!   loaded and stored through a zeroed stack buffer.
//! * Tile rows are addressed from loop-carried bases, one per three rows
//!   (`[base]`, `[base + stride]`, `[base + stride·2]`), to keep the general-purpose
//!   registers from spilling.
//!
//! All loops are top-tested (the header branches to the body or the exit): with
//! do-while shapes x64 stops folding loads into memory operands. Code is meant for
//! `opt_level = "none"`.

use super::jit::{JitModule, JitOptions};
use super::vmath::{VMath, F32X4};
use crate::codegen::CodegenError;
use crate::runtime::gemm::{
    symbol, FmaPeak, FmaPeakFn, NativeIsa, PvFn, QkFn, SoftmaxUpdateFn, TileKernels,
    UnsupportedIsa, PANEL,
};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{
    types, BlockArg, InstBuilder, MemFlagsData, StackSlotData, StackSlotKind, Type, Value,
};
use cranelift_frontend::FunctionBuilder;
use cranelift_module::FuncId;
use std::sync::Arc;

/// Unroll factor of the reduction loops.
pub const UNROLL: usize = 4;

/// The register tile of a JIT'd tile product: `rows` rows (1 to 8) by `vecs` f32x4
/// vectors (1, 2 or 4) of output columns. Leftover rows go through tiles of 4, 2 and 1
/// rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MicroTile {
    /// Rows per register tile.
    pub rows: usize,
    /// f32x4 vectors per row.
    pub vecs: usize,
}

impl MicroTile {
    /// The default: 4 rows x 2 vectors, 8 accumulators (the fastest shape measured by
    /// `benches/gemm.rs`; x64 has 16 xmm registers and wider tiles spill).
    pub const DEFAULT: MicroTile = MicroTile { rows: 4, vecs: 2 };

    fn check(&self) {
        assert!(
            (1..=8).contains(&self.rows) && matches!(self.vecs, 1 | 2 | 4),
            "unsupported micro-tile {self:?}"
        );
    }

    /// Output columns per tile.
    fn cols(&self) -> usize {
        self.vecs * 4
    }

    /// Row counts of the leftover tiles (the powers of two below `rows`), largest
    /// first; the leftover count `rem < rows <= 8` is the sum of those set in it.
    fn leftover_rows(&self) -> impl Iterator<Item = usize> {
        let rows = self.rows;
        [4usize, 2, 1].into_iter().filter(move |&size| size < rows)
    }
}

impl Default for MicroTile {
    fn default() -> Self {
        MicroTile::DEFAULT
    }
}

/// Which implementation serves the tile products.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GemmImpl {
    /// The JIT-generated f32x4 kernels of this module (portable; 128-bit vectors).
    Jit,
    /// The native Rust kernels for one instruction set.
    Native(NativeIsa),
}

impl GemmImpl {
    /// The faster implementation on this CPU: native AVX-512 or AVX2 where available
    /// (4x / 2x the f32x4 FMA width), else the JIT kernels.
    pub fn detect() -> GemmImpl {
        match NativeIsa::detect() {
            NativeIsa::Portable => GemmImpl::Jit,
            isa => GemmImpl::Native(isa),
        }
    }

    /// The instruction set of the native products that a kernel with these
    /// tile products links beside them (the in-place and bf16 pair
    /// products): `Native`'s own, or this CPU's best for `Jit`.
    pub fn products_isa(&self) -> NativeIsa {
        match self {
            GemmImpl::Native(isa) => *isa,
            GemmImpl::Jit => NativeIsa::detect(),
        }
    }

    /// A short name: `jit` or `native-avx512` / `native-avx2` / `native-portable`.
    pub fn name(&self) -> String {
        match self {
            GemmImpl::Jit => "jit".to_string(),
            GemmImpl::Native(isa) => format!("native-{isa}"),
        }
    }

    /// The symbols a [`JitModule`] must be created with for [`Self::declare_in`]: the
    /// native kernels (for `Jit`, only the native online-softmax step).
    pub fn symbols(&self) -> Result<Vec<(&'static str, *const u8)>, UnsupportedIsa> {
        let native = match self {
            GemmImpl::Jit => TileKernels::native_detected(),
            GemmImpl::Native(isa) => TileKernels::native(*isa)?,
        };
        let all = native.symbols();
        Ok(match self {
            GemmImpl::Jit => all
                .into_iter()
                .filter(|(name, _)| *name == symbol::SOFTMAX_UPDATE)
                .collect(),
            GemmImpl::Native(_) => all.to_vec(),
        })
    }

    /// Makes the tile operations callable from functions of `jit`: native ones are
    /// imported by symbol (the module must have been created with [`Self::symbols`]),
    /// JIT ones are defined in the module. Call them with `call` and the signatures of
    /// `QkFn`, `PvFn`, `SoftmaxUpdateFn`.
    pub fn declare_in(&self, jit: &mut JitModule) -> Result<TileFuncs, CodegenError> {
        let softmax_sig = softmax_signature(jit);
        let softmax_update = jit.declare_import(symbol::SOFTMAX_UPDATE, &softmax_sig)?;
        let (qk, pv) = match self {
            GemmImpl::Jit => (
                define_qk(jit, "attnc_jit_qk")?,
                define_pv(jit, "attnc_jit_pv")?,
            ),
            GemmImpl::Native(_) => (
                jit.declare_import(symbol::QK, &qk_signature(jit))?,
                jit.declare_import(symbol::PV, &pv_signature(jit))?,
            ),
        };
        Ok(TileFuncs {
            qk,
            pv,
            softmax_update,
        })
    }

    /// The register-only FMA loop at this implementation's vector width, to measure
    /// the tile products' efficiency against.
    pub fn fma_peak(&self) -> Result<FmaPeak, CodegenError> {
        match self {
            GemmImpl::Jit => jit_fma_peak(),
            GemmImpl::Native(isa) => {
                FmaPeak::native(*isa).map_err(|e| CodegenError::Isa(e.to_string()))
            }
        }
    }

    /// Standalone tile kernels (for the interpreter, tests and benchmarks). `Jit`
    /// compiles a small module that the result keeps alive.
    pub fn kernels(&self) -> Result<TileKernels, CodegenError> {
        match self {
            GemmImpl::Native(isa) => {
                TileKernels::native(*isa).map_err(|e| CodegenError::Isa(e.to_string()))
            }
            GemmImpl::Jit => {
                let native = TileKernels::native_detected();
                let mut jit = JitModule::new(&JitOptions::default(), &[])?;
                define_qk(&mut jit, "attnc_jit_qk")?;
                define_pv(&mut jit, "attnc_jit_pv")?;
                let code = Arc::new(jit.finalize()?);
                // SAFETY: the functions were generated with the QkFn / PvFn signatures
                // and implement their contracts; `code` is kept alive by the result.
                unsafe {
                    let qk: QkFn = code.function("attnc_jit_qk")?;
                    let pv: PvFn = code.function("attnc_jit_pv")?;
                    let softmax: SoftmaxUpdateFn = native.softmax_update;
                    Ok(TileKernels::from_raw("jit-f32x4", qk, pv, softmax, code))
                }
            }
        }
    }
}

/// The register-only FMA loop (`FmaPeakFn`) at the JIT kernels' width, f32x4:
/// the peak the JIT tile products are measured against.
pub fn jit_fma_peak() -> Result<FmaPeak, CodegenError> {
    let mut jit = JitModule::new(&JitOptions::default(), &[])?;
    let ptr = jit.pointer_type();
    let vm = VMath::new(jit.has_native_fma());
    let sig = jit.signature(&[ptr, ptr], &[]);
    let id = jit.declare_function("attnc_jit_fma_peak", &sig)?;
    jit.define_function(id, |b, _| {
        let p = begin_function(b);
        let (iters, out) = (p[0], p[1]);
        let zero = b.ins().iconst(ptr, 0);
        let a = vm.splat(b, 0.999_9);
        let c = vm.splat(b, 1e-4);
        let mut init = vec![zero];
        init.extend((0..FmaPeak::CHAINS).map(|_| vm.splat(b, 0.5)));
        // `n` rounds on the carried (counter, chains).
        let rounds = |b: &mut FunctionBuilder<'_>, v: &[Value], n: usize| {
            let mut next = vec![b.ins().iadd_imm_s(v[0], n as i64)];
            next.extend(
                v[1..]
                    .iter()
                    .map(|&x| (0..n).fold(x, |x, _| vm.fma(b, x, a, c))),
            );
            next
        };
        // Rounds in groups of UNROLL (few taken branches per FMA, as in the tile
        // products' main loops), then one at a time.
        let main_end = b.ins().band_imm_s(iters, -(UNROLL as i64));
        let chains = emit_while(
            b,
            &init,
            |b, v| b.ins().icmp(IntCC::UnsignedLessThan, v[0], main_end),
            |b, v| rounds(b, v, UNROLL),
        );
        let chains = emit_while(
            b,
            &chains,
            |b, v| b.ins().icmp(IntCC::UnsignedLessThan, v[0], iters),
            |b, v| rounds(b, v, 1),
        );
        let sum = chains[2..]
            .iter()
            .fold(chains[1], |s, &x| b.ins().fadd(s, x));
        let lane = b.ins().extractlane(sum, 0);
        b.ins().store(flags(), lane, out, 0);
        b.ins().return_(&[]);
        Ok(())
    })?;
    let code = Arc::new(jit.finalize()?);
    // SAFETY: the function was generated with the FmaPeakFn signature over f32x4
    // vectors; `code` is kept alive by the result.
    unsafe {
        let f: FmaPeakFn = code.function("attnc_jit_fma_peak")?;
        Ok(FmaPeak::from_raw("jit-f32x4", f, 4, code))
    }
}

/// The tile operations as functions of one module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileFuncs {
    /// `QkFn`.
    pub qk: FuncId,
    /// `PvFn`.
    pub pv: FuncId,
    /// `SoftmaxUpdateFn`.
    pub softmax_update: FuncId,
}

/// The Cranelift signature of `QkFn`.
pub fn qk_signature(jit: &JitModule) -> cranelift_codegen::ir::Signature {
    let p = jit.pointer_type();
    jit.signature(&[p, p, p, p, p, p, p, p, types::F32], &[])
}

/// The Cranelift signature of `PvFn`.
pub fn pv_signature(jit: &JitModule) -> cranelift_codegen::ir::Signature {
    let p = jit.pointer_type();
    jit.signature(&[p; 9], &[])
}

/// The Cranelift signature of `SoftmaxUpdateFn`.
pub fn softmax_signature(jit: &JitModule) -> cranelift_codegen::ir::Signature {
    let p = jit.pointer_type();
    jit.signature(&[p, p, p, p, p, p, p, p, p, types::I32], &[])
}

fn flags() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

fn args(values: &[Value]) -> Vec<BlockArg> {
    values.iter().map(|&v| BlockArg::Value(v)).collect()
}

/// Emits a top-tested loop carrying `init`: the header evaluates `cond` on the carried
/// values and branches to the body or out; the body returns the next values. Leaves the
/// builder in the exit block and returns the carried values as seen there (the header's
/// parameters, which dominate the exit).
pub fn emit_while(
    b: &mut FunctionBuilder<'_>,
    init: &[Value],
    cond: impl FnOnce(&mut FunctionBuilder<'_>, &[Value]) -> Value,
    body: impl FnOnce(&mut FunctionBuilder<'_>, &[Value]) -> Vec<Value>,
) -> Vec<Value> {
    let header = b.create_block();
    let body_block = b.create_block();
    let exit = b.create_block();
    let types: Vec<Type> = init.iter().map(|&v| b.func.dfg.value_type(v)).collect();
    let params: Vec<Value> = types
        .iter()
        .map(|&t| b.append_block_param(header, t))
        .collect();
    b.ins().jump(header, &args(init));
    b.switch_to_block(header);
    let c = cond(b, &params);
    b.ins().brif(c, body_block, &[], exit, &[]);
    b.switch_to_block(body_block);
    let next = body(b, &params);
    assert_eq!(
        next.len(),
        params.len(),
        "a loop body returns every carried value"
    );
    b.ins().jump(header, &args(&next));
    b.switch_to_block(exit);
    params
}

/// Emits `for i in start..end { body(i) }` over i64 (signed compare, step 1),
/// leaving the builder after it.
pub fn emit_range(
    b: &mut FunctionBuilder<'_>,
    start: Value,
    end: Value,
    body: impl FnOnce(&mut FunctionBuilder<'_>, Value),
) {
    emit_while(
        b,
        &[start],
        |b, v| b.ins().icmp(IntCC::SignedLessThan, v[0], end),
        |b, v| {
            body(b, v[0]);
            vec![b.ins().iadd_imm_s(v[0], 1)]
        },
    );
}

/// Emits `emit(b, size, r)` over rows `0..rows`: tiles of `tile.rows` rows while
/// they fit, then one tile of each power of two set in the remainder (largest
/// first); `r` is the tile's first row and `zero` an i64 zero.
fn emit_row_tiles(
    b: &mut FunctionBuilder<'_>,
    tile: MicroTile,
    rows: Value,
    zero: Value,
    mut emit: impl FnMut(&mut FunctionBuilder<'_>, usize, Value),
) {
    let r_end = emit_while(
        b,
        &[zero],
        |b, v| {
            let next = b.ins().iadd_imm_s(v[0], tile.rows as i64);
            b.ins().icmp(IntCC::UnsignedLessThanOrEqual, next, rows)
        },
        |b, v| {
            emit(b, tile.rows, v[0]);
            vec![b.ins().iadd_imm_s(v[0], tile.rows as i64)]
        },
    )[0];
    let rem = b.ins().isub(rows, r_end);
    for size in tile.leftover_rows() {
        let bit = b.ins().band_imm_s(rem, size as i64);
        emit_if(b, bit, |b| {
            // The larger leftover tiles come first: skip the rows they took.
            let mask = !(2 * size as i64 - 1) & 7;
            let before = b.ins().band_imm_s(rem, mask);
            let r = b.ins().iadd(r_end, before);
            emit(b, size, r);
        });
    }
}

/// Emits `if cond { then }`, leaving the builder after it.
pub fn emit_if(
    b: &mut FunctionBuilder<'_>,
    cond: Value,
    then: impl FnOnce(&mut FunctionBuilder<'_>),
) {
    let then_block = b.create_block();
    let merge = b.create_block();
    b.ins().brif(cond, then_block, &[], merge, &[]);
    b.switch_to_block(then_block);
    then(b);
    b.ins().jump(merge, &[]);
    b.switch_to_block(merge);
}

/// Emits `if cond { then } else { other }`, leaving the builder after it.
pub fn emit_if_else(
    b: &mut FunctionBuilder<'_>,
    cond: Value,
    then: impl FnOnce(&mut FunctionBuilder<'_>),
    other: impl FnOnce(&mut FunctionBuilder<'_>),
) {
    let then_block = b.create_block();
    let else_block = b.create_block();
    let merge = b.create_block();
    b.ins().brif(cond, then_block, &[], else_block, &[]);
    b.switch_to_block(then_block);
    then(b);
    b.ins().jump(merge, &[]);
    b.switch_to_block(else_block);
    other(b);
    b.ins().jump(merge, &[]);
    b.switch_to_block(merge);
}

/// Emits a copy of `n` f32 (a runtime count) from `src` to `dst`.
fn emit_copy_f32(b: &mut FunctionBuilder<'_>, ptr: Type, src: Value, dst: Value, n: Value) {
    let zero = b.ins().iconst(ptr, 0);
    emit_while(
        b,
        &[zero],
        |b, v| b.ins().icmp(IntCC::UnsignedLessThan, v[0], n),
        |b, v| {
            let off = b.ins().ishl_imm_s(v[0], 2);
            let s = b.ins().iadd(src, off);
            let d = b.ins().iadd(dst, off);
            let x = b.ins().load(types::F32, flags(), s, 0);
            b.ins().store(flags(), x, d, 0);
            vec![b.ins().iadd_imm_s(v[0], 1)]
        },
    );
}

/// `[0, stride, 2·stride, ...]` (`n` byte offsets).
fn row_offsets(b: &mut FunctionBuilder<'_>, ptr: Type, stride: Value, n: usize) -> Vec<Value> {
    let mut offs = vec![b.ins().iconst(ptr, 0)];
    for i in 1..n {
        let prev = offs[i - 1];
        offs.push(b.ins().iadd(prev, stride));
    }
    offs
}

/// Row strides for addressing tile rows with few registers: rows are grouped in threes
/// around loop-carried base pointers, and row `r` is `base[r / 3] + (r % 3)·stride`,
/// which x64 folds into `[base]`, `[base + stride]`, `[base + stride·2]`.
#[derive(Clone, Copy)]
struct RowStrides {
    one: Value,
    two: Value,
    three: Value,
}

impl RowStrides {
    fn new(b: &mut FunctionBuilder<'_>, stride_bytes: Value) -> RowStrides {
        let two = b.ins().ishl_imm_s(stride_bytes, 1);
        let three = b.ins().iadd(two, stride_bytes);
        RowStrides {
            one: stride_bytes,
            two,
            three,
        }
    }

    /// The group bases of `rows` rows starting at `first`.
    fn bases(&self, b: &mut FunctionBuilder<'_>, first: Value, rows: usize) -> Vec<Value> {
        let mut bases = vec![first];
        for j in 1..rows.div_ceil(3) {
            let prev = bases[j - 1];
            bases.push(b.ins().iadd(prev, self.three));
        }
        bases
    }

    /// The address of row `r` from the group bases.
    fn row(&self, b: &mut FunctionBuilder<'_>, bases: &[Value], r: usize) -> Value {
        let base = bases[r / 3];
        match r % 3 {
            0 => base,
            1 => b.ins().iadd(base, self.one),
            _ => b.ins().iadd(base, self.two),
        }
    }
}

/// Values shared by the tiles of one `qk` function.
struct QkEnv {
    ptr: Type,
    q_stride_b: Value,
    q_rows: RowStrides,
    s_stride_b: Value,
    d: Value,
    d_main: Value,
    scale: Value,
    slot_addr: Value,
    vm: VMath,
    vecs: usize,
}

/// One `qk` register tile of `rows` rows at `q_base` / `s_base` against the panel at
/// `k_panel`.
fn emit_qk_tile(
    b: &mut FunctionBuilder<'_>,
    env: &QkEnv,
    rows: usize,
    q_base: Value,
    k_panel: Value,
    s_base: Value,
    n_cols: Value,
) {
    let ptr = env.ptr;
    let zero = env.vm.splat(b, 0.0);
    let n_acc = rows * env.vecs;
    let n_bases = rows.div_ceil(3);
    // One step of the reduction at the Q row bases / `k_ptr`, plus `u`.
    let step = |b: &mut FunctionBuilder<'_>,
                bases: &[Value],
                k_ptr: Value,
                u: usize,
                acc: &mut [Value]| {
        let bv: Vec<Value> = (0..env.vecs)
            .map(|v| {
                let off = (u * PANEL + v * 4) * 4;
                b.ins().load(F32X4, flags(), k_ptr, off as i32)
            })
            .collect();
        for i in 0..rows {
            let addr = env.q_rows.row(b, bases, i);
            let a = b.ins().load(types::F32, flags(), addr, (u * 4) as i32);
            let a = b.ins().splat(F32X4, a);
            for v in 0..env.vecs {
                let c = &mut acc[i * env.vecs + v];
                *c = env.vm.fma(b, a, bv[v], *c);
            }
        }
    };
    let k_main_end = {
        let bytes = b.ins().imul_imm_s(env.d_main, (PANEL * 4) as i64);
        b.ins().iadd(k_panel, bytes)
    };
    let k_end = {
        let bytes = b.ins().imul_imm_s(env.d, (PANEL * 4) as i64);
        b.ins().iadd(k_panel, bytes)
    };
    // Carried: k pointer, Q row-group bases, accumulators.
    let mut init = vec![k_panel];
    init.extend(env.q_rows.bases(b, q_base, rows));
    init.extend(std::iter::repeat_n(zero, n_acc));
    let advance = |b: &mut FunctionBuilder<'_>, v: &[Value], acc: Vec<Value>, steps: usize| {
        let mut next = vec![b.ins().iadd_imm_s(v[0], (steps * PANEL * 4) as i64)];
        for &base in &v[1..1 + n_bases] {
            next.push(b.ins().iadd_imm_s(base, (steps * 4) as i64));
        }
        next.extend(acc);
        next
    };
    let carried = emit_while(
        b,
        &init,
        |b, v| b.ins().icmp(IntCC::UnsignedLessThan, v[0], k_main_end),
        |b, v| {
            let mut acc = v[1 + n_bases..].to_vec();
            for u in 0..UNROLL {
                step(b, &v[1..1 + n_bases], v[0], u, &mut acc);
            }
            advance(b, v, acc, UNROLL)
        },
    );
    let carried = emit_while(
        b,
        &carried,
        |b, v| b.ins().icmp(IntCC::UnsignedLessThan, v[0], k_end),
        |b, v| {
            let mut acc = v[1 + n_bases..].to_vec();
            step(b, &v[1..1 + n_bases], v[0], 0, &mut acc);
            advance(b, v, acc, 1)
        },
    );
    let acc: Vec<Value> = carried[1 + n_bases..]
        .iter()
        .map(|&c| b.ins().fmul(c, env.scale))
        .collect();
    let s_offs = row_offsets(b, ptr, env.s_stride_b, rows);
    let full = b
        .ins()
        .icmp_imm_s(IntCC::Equal, n_cols, env.vecs as i64 * 4);
    emit_store_tile(
        b,
        ptr,
        env.slot_addr,
        env.vecs,
        &acc,
        s_base,
        &s_offs,
        full,
        n_cols,
    );
}

/// Stores a register tile (`vecs` f32x4 per row, rows at `base + offs[i]`):
/// whole rows when `full`, else each row through the scratch slot and its
/// first `n_cols` floats only.
#[allow(clippy::too_many_arguments)]
fn emit_store_tile(
    b: &mut FunctionBuilder<'_>,
    ptr: Type,
    slot_addr: Value,
    vecs: usize,
    tile: &[Value],
    base: Value,
    offs: &[Value],
    full: Value,
    n_cols: Value,
) {
    emit_if_else(
        b,
        full,
        |b| {
            for (i, &off) in offs.iter().enumerate() {
                let row = b.ins().iadd(base, off);
                for v in 0..vecs {
                    b.ins()
                        .store(flags(), tile[i * vecs + v], row, (v * 16) as i32);
                }
            }
        },
        |b| {
            for (i, &off) in offs.iter().enumerate() {
                for v in 0..vecs {
                    b.ins()
                        .store(flags(), tile[i * vecs + v], slot_addr, (v * 16) as i32);
                }
                let row = b.ins().iadd(base, off);
                emit_copy_f32(b, ptr, slot_addr, row, n_cols);
            }
        },
    );
}

/// Starts a function: switches to its entry block and returns its parameters.
pub fn begin_function(b: &mut FunctionBuilder<'_>) -> Vec<Value> {
    let entry = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.switch_to_block(entry);
    b.block_params(entry).to_vec()
}

/// Starts a tile-product function: its entry block, its parameters, and the
/// address of a one-panel stack slot that ragged tiles are stored through.
fn begin_tile_function(b: &mut FunctionBuilder<'_>, ptr: Type) -> (Vec<Value>, Value) {
    let params = begin_function(b);
    let slot = b.create_sized_stack_slot(StackSlotData::new(
        StackSlotKind::ExplicitSlot,
        (PANEL * 4) as u32,
        4,
    ));
    (params, b.ins().stack_addr(ptr, slot, 0))
}

/// Defines a `QkFn` named `name` in `jit` with the default [`MicroTile`].
pub fn define_qk(jit: &mut JitModule, name: &str) -> Result<FuncId, CodegenError> {
    define_qk_tiled(jit, name, MicroTile::DEFAULT)
}

/// Defines a `QkFn` named `name` in `jit` with register tile `tile`.
pub fn define_qk_tiled(
    jit: &mut JitModule,
    name: &str,
    tile: MicroTile,
) -> Result<FuncId, CodegenError> {
    tile.check();
    let sig = qk_signature(jit);
    let id = jit.declare_function(name, &sig)?;
    let ptr = jit.pointer_type();
    let vm = VMath::new(jit.has_native_fma());
    jit.define_function(id, |b, _| {
        let (p, slot_addr) = begin_tile_function(b, ptr);
        let (q, q_stride, k, d, rows, cols, s, s_stride, scale) =
            (p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8]);
        let q_stride_b = b.ins().ishl_imm_s(q_stride, 2);
        let env = QkEnv {
            ptr,
            q_stride_b,
            q_rows: RowStrides::new(b, q_stride_b),
            s_stride_b: b.ins().ishl_imm_s(s_stride, 2),
            d,
            d_main: b.ins().band_imm_s(d, -(UNROLL as i64)),
            scale: b.ins().splat(F32X4, scale),
            slot_addr,
            vm,
            vecs: tile.vecs,
        };
        let key_bytes = b.ins().ishl_imm_s(d, 2);
        let zero = b.ins().iconst(ptr, 0);
        emit_while(
            b,
            &[zero],
            |b, v| b.ins().icmp(IntCC::UnsignedLessThan, v[0], cols),
            |b, v| {
                let c0 = v[0];
                let left = b.ins().isub(cols, c0);
                let width = b.ins().iconst(ptr, tile.cols() as i64);
                let n_cols = b.ins().umin(left, width);
                // Panel c0 / 16 starts at (c0 / 16)·d·16 floats; the tile sits at
                // column c0 % 16 inside it.
                let panel_key = b.ins().band_imm_s(c0, -(PANEL as i64));
                let k_off = b.ins().imul(panel_key, key_bytes);
                let in_panel = b.ins().band_imm_s(c0, PANEL as i64 - 1);
                let in_panel = b.ins().ishl_imm_s(in_panel, 2);
                let k_off = b.ins().iadd(k_off, in_panel);
                let k_panel = b.ins().iadd(k, k_off);
                let s_off = b.ins().ishl_imm_s(c0, 2);
                let s_col = b.ins().iadd(s, s_off);
                emit_row_tiles(b, tile, rows, zero, |b, size, r| {
                    let q_off = b.ins().imul(r, env.q_stride_b);
                    let q_base = b.ins().iadd(q, q_off);
                    let s_off = b.ins().imul(r, env.s_stride_b);
                    let s_base = b.ins().iadd(s_col, s_off);
                    emit_qk_tile(b, &env, size, q_base, k_panel, s_base, n_cols);
                });
                vec![b.ins().iadd_imm_s(c0, tile.cols() as i64)]
            },
        );
        b.ins().return_(&[]);
        Ok(())
    })?;
    Ok(id)
}

/// Values shared by the tiles of one `pv` function.
struct PvEnv {
    ptr: Type,
    p_stride_b: Value,
    p_rows: RowStrides,
    v_rows: RowStrides,
    v_stride_b: Value,
    acc_stride_b: Value,
    n_keys: Value,
    keys_main: Value,
    slot_addr: Value,
    vm: VMath,
    vecs: usize,
}

/// One `pv` register tile of `rows` rows at `p_base` / `acc_base` over the V columns at
/// `v_base`; `full` says whether all 16 columns are inside `d`.
#[allow(clippy::too_many_arguments)]
fn emit_pv_tile(
    b: &mut FunctionBuilder<'_>,
    env: &PvEnv,
    rows: usize,
    p_base: Value,
    v_base: Value,
    acc_base: Value,
    full: Value,
    n_cols: Value,
) {
    let ptr = env.ptr;
    let acc_offs = row_offsets(b, ptr, env.acc_stride_b, rows);
    let zero = env.vm.splat(b, 0.0);
    let n_acc = rows * env.vecs;

    // Load the accumulator tile (through the zeroed stack buffer when ragged).
    let load_tile = |b: &mut FunctionBuilder<'_>, from_slot: bool| -> Vec<Value> {
        let mut acc = Vec::with_capacity(n_acc);
        for &off in &acc_offs {
            let row = b.ins().iadd(acc_base, off);
            let src = if from_slot {
                for v in 0..env.vecs {
                    b.ins().store(flags(), zero, env.slot_addr, (v * 16) as i32);
                }
                emit_copy_f32(b, ptr, row, env.slot_addr, n_cols);
                env.slot_addr
            } else {
                row
            };
            for v in 0..env.vecs {
                acc.push(b.ins().load(F32X4, flags(), src, (v * 16) as i32));
            }
        }
        acc
    };
    // The ragged case reloads through the buffer; both paths meet with the tile in
    // block parameters.
    let loaded = b.create_block();
    let acc_params: Vec<Value> = (0..n_acc)
        .map(|_| b.append_block_param(loaded, F32X4))
        .collect();
    let full_block = b.create_block();
    let ragged_block = b.create_block();
    b.ins().brif(full, full_block, &[], ragged_block, &[]);
    b.switch_to_block(full_block);
    let acc = load_tile(b, false);
    b.ins().jump(loaded, &args(&acc));
    b.switch_to_block(ragged_block);
    let acc = load_tile(b, true);
    b.ins().jump(loaded, &args(&acc));
    b.switch_to_block(loaded);

    let n_bases = rows.div_ceil(3);
    // One step of the reduction at the P row bases / V row `v_row`, plus `u` keys.
    let step = |b: &mut FunctionBuilder<'_>,
                bases: &[Value],
                v_row: Value,
                u: usize,
                acc: &mut [Value]| {
        let bv: Vec<Value> = (0..env.vecs)
            .map(|v| b.ins().load(F32X4, flags(), v_row, (v * 16) as i32))
            .collect();
        for i in 0..rows {
            let addr = env.p_rows.row(b, bases, i);
            let a = b.ins().load(types::F32, flags(), addr, (u * 4) as i32);
            let a = b.ins().splat(F32X4, a);
            for v in 0..env.vecs {
                let c = &mut acc[i * env.vecs + v];
                *c = env.vm.fma(b, a, bv[v], *c);
            }
        }
    };
    let v_main_end = {
        let bytes = b.ins().imul(env.keys_main, env.v_stride_b);
        b.ins().iadd(v_base, bytes)
    };
    let v_end = {
        let bytes = b.ins().imul(env.n_keys, env.v_stride_b);
        b.ins().iadd(v_base, bytes)
    };
    // Carried: V row pointer, P row-group bases, accumulators.
    let mut init = vec![v_base];
    init.extend(env.p_rows.bases(b, p_base, rows));
    init.extend(acc_params);
    let advance = |b: &mut FunctionBuilder<'_>, v: &[Value], acc: Vec<Value>, steps: usize| {
        let v_next = if steps == 1 {
            b.ins().iadd(v[0], env.v_stride_b)
        } else {
            let four = b.ins().ishl_imm_s(env.v_stride_b, 2);
            b.ins().iadd(v[0], four)
        };
        let mut next = vec![v_next];
        for &base in &v[1..1 + n_bases] {
            next.push(b.ins().iadd_imm_s(base, (steps * 4) as i64));
        }
        next.extend(acc);
        next
    };
    let carried = emit_while(
        b,
        &init,
        |b, v| b.ins().icmp(IntCC::UnsignedLessThan, v[0], v_main_end),
        |b, v| {
            let mut acc = v[1 + n_bases..].to_vec();
            let v_bases = env.v_rows.bases(b, v[0], UNROLL);
            for u in 0..UNROLL {
                let v_row = env.v_rows.row(b, &v_bases, u);
                step(b, &v[1..1 + n_bases], v_row, u, &mut acc);
            }
            advance(b, v, acc, UNROLL)
        },
    );
    let carried = emit_while(
        b,
        &carried,
        |b, v| b.ins().icmp(IntCC::UnsignedLessThan, v[0], v_end),
        |b, v| {
            let mut acc = v[1 + n_bases..].to_vec();
            step(b, &v[1..1 + n_bases], v[0], 0, &mut acc);
            advance(b, v, acc, 1)
        },
    );
    let acc = carried[1 + n_bases..].to_vec();
    emit_store_tile(
        b,
        ptr,
        env.slot_addr,
        env.vecs,
        &acc,
        acc_base,
        &acc_offs,
        full,
        n_cols,
    );
}

/// Defines a `PvFn` named `name` in `jit` with the default [`MicroTile`].
pub fn define_pv(jit: &mut JitModule, name: &str) -> Result<FuncId, CodegenError> {
    define_pv_tiled(jit, name, MicroTile::DEFAULT)
}

/// Defines a `PvFn` named `name` in `jit` with register tile `tile`.
pub fn define_pv_tiled(
    jit: &mut JitModule,
    name: &str,
    tile: MicroTile,
) -> Result<FuncId, CodegenError> {
    tile.check();
    let sig = pv_signature(jit);
    let id = jit.declare_function(name, &sig)?;
    let ptr = jit.pointer_type();
    let vm = VMath::new(jit.has_native_fma());
    jit.define_function(id, |b, _| {
        let (p, slot_addr) = begin_tile_function(b, ptr);
        let (pm, p_stride, v, v_stride, d, rows, cols, acc, acc_stride) =
            (p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8]);
        let p_stride_b = b.ins().ishl_imm_s(p_stride, 2);
        let v_stride_b = b.ins().ishl_imm_s(v_stride, 2);
        let env = PvEnv {
            ptr,
            p_stride_b,
            p_rows: RowStrides::new(b, p_stride_b),
            v_rows: RowStrides::new(b, v_stride_b),
            v_stride_b,
            acc_stride_b: b.ins().ishl_imm_s(acc_stride, 2),
            n_keys: cols,
            keys_main: b.ins().band_imm_s(cols, -(UNROLL as i64)),
            slot_addr,
            vm,
            vecs: tile.vecs,
        };
        let zero = b.ins().iconst(ptr, 0);
        emit_while(
            b,
            &[zero],
            |b, vals| b.ins().icmp(IntCC::UnsignedLessThan, vals[0], d),
            |b, vals| {
                let c0 = vals[0];
                let left = b.ins().isub(d, c0);
                let block = b.ins().iconst(ptr, tile.cols() as i64);
                let n_cols = b.ins().umin(left, block);
                let full = b.ins().icmp_imm_s(IntCC::Equal, n_cols, tile.cols() as i64);
                let col_off = b.ins().ishl_imm_s(c0, 2);
                let v_col = b.ins().iadd(v, col_off);
                let acc_col = b.ins().iadd(acc, col_off);
                emit_row_tiles(b, tile, rows, zero, |b, size, r| {
                    let p_off = b.ins().imul(r, env.p_stride_b);
                    let p_base = b.ins().iadd(pm, p_off);
                    let a_off = b.ins().imul(r, env.acc_stride_b);
                    let a_base = b.ins().iadd(acc_col, a_off);
                    emit_pv_tile(b, &env, size, p_base, v_col, a_base, full, n_cols);
                });
                vec![b.ins().iadd_imm_s(c0, tile.cols() as i64)]
            },
        );
        b.ins().return_(&[]);
        Ok(())
    })?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::gemm::testing::{check_online_softmax, check_pv, check_qk, shapes, Rng};
    use crate::runtime::gemm::{pack_k, PackedK};

    fn impls() -> Vec<GemmImpl> {
        let mut out = vec![GemmImpl::Jit];
        out.extend(
            NativeIsa::ALL
                .into_iter()
                .filter(|isa| isa.is_supported())
                .map(GemmImpl::Native),
        );
        out
    }

    #[test]
    fn jit_qk_matches_f64() {
        let kernels = GemmImpl::Jit.kernels().unwrap();
        assert_eq!(kernels.name(), "jit-f32x4");
        let mut rng = Rng::new(11);
        for (d, rows, cols) in shapes() {
            check_qk(&kernels, d, rows, cols, &mut rng);
        }
    }

    #[test]
    fn jit_pv_matches_f64() {
        let kernels = GemmImpl::Jit.kernels().unwrap();
        let mut rng = Rng::new(12);
        for (d, rows, cols) in shapes() {
            check_pv(&kernels, d, rows, cols, &mut rng);
        }
    }

    #[test]
    fn jit_online_softmax_pipeline_matches_dense_softmax() {
        let kernels = GemmImpl::Jit.kernels().unwrap();
        let mut rng = Rng::new(13);
        for &d in &[16usize, 80] {
            check_online_softmax(&kernels, d, 11, false, &mut rng);
        }
    }

    /// The JIT and native kernels agree with each other on the same tiles.
    #[test]
    fn jit_and_native_agree() {
        let jit = GemmImpl::Jit.kernels().unwrap();
        let native = TileKernels::native_detected();
        let mut rng = Rng::new(14);
        let (d, rows, cols) = (64, 37, 50);
        let q = rng.matrix(rows, d);
        let k = rng.matrix(cols, d);
        let layout = PackedK { d, kv_len: cols };
        let mut packed = vec![0.0; layout.len()];
        pack_k(k.view(), &mut packed).unwrap();
        let mut s_jit = vec![0.0; rows * cols];
        let mut s_native = vec![0.0; rows * cols];
        let q = q.as_slice().unwrap();
        jit.qk(q, d, &packed, d, rows, cols, &mut s_jit, cols, 0.125)
            .unwrap();
        native
            .qk(q, d, &packed, d, rows, cols, &mut s_native, cols, 0.125)
            .unwrap();
        for (a, b) in s_jit.iter().zip(&s_native) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    /// A JIT'd function calls the tile kernels through `declare_in`, for every
    /// implementation: imported native symbols and in-module JIT functions alike.
    #[test]
    fn tile_functions_are_callable_from_jit_code() {
        for gemm in impls() {
            let symbols = gemm.symbols().unwrap();
            let mut jit = JitModule::new(&JitOptions::default(), &symbols).unwrap();
            let funcs = gemm.declare_in(&mut jit).unwrap();
            let sig = qk_signature(&jit);
            let id = jit.declare_function("forward_qk", &sig).unwrap();
            jit.define_function(id, |b, refs| {
                let entry = b.create_block();
                b.append_block_params_for_function_params(entry);
                b.switch_to_block(entry);
                let params = b.block_params(entry).to_vec();
                let callee = refs.func_ref(b, funcs.qk);
                b.ins().call(callee, &params);
                b.ins().return_(&[]);
                Ok(())
            })
            .unwrap();
            let code = jit.finalize().unwrap();
            let forward: QkFn = unsafe { code.function("forward_qk") }.unwrap();
            // SAFETY: `forward` is kept alive by `code` in the owner below.
            let kernels = unsafe {
                TileKernels::from_raw(
                    "forward",
                    forward,
                    crate::runtime::gemm::TileKernels::native_detected().pv,
                    crate::runtime::gemm::TileKernels::native_detected().softmax_update,
                    Arc::new(code),
                )
            };
            let mut rng = Rng::new(15);
            check_qk(&kernels, 32, 9, 20, &mut rng);
            assert!(!gemm.name().is_empty());
        }
    }

    #[test]
    fn detect_prefers_wide_native_kernels() {
        match GemmImpl::detect() {
            GemmImpl::Jit => assert_eq!(NativeIsa::detect(), NativeIsa::Portable),
            GemmImpl::Native(isa) => assert_eq!(isa, NativeIsa::detect()),
        }
    }

    /// The main tile loop has all its FMAs fused and keeps its accumulators in
    /// registers (checked on the machine-code listing of the block with the most FMAs).
    /// Its broadcasts load once and broadcast from a register, since each feeds
    /// `vecs` FMAs; one `vbroadcastss [mem]` per FMA measured 20% slower (load-bound).
    #[test]
    fn main_loops_use_fma_and_do_not_spill_vectors() {
        if !cfg!(target_arch = "x86_64") || !std::arch::is_x86_feature_detected!("fma") {
            return;
        }
        let options = JitOptions {
            keep_disasm: true,
            ..JitOptions::default()
        };
        let mut jit = JitModule::new(&options, &[]).unwrap();
        define_qk(&mut jit, "qk").unwrap();
        define_pv(&mut jit, "pv").unwrap();
        for info in jit.infos() {
            let listing = info.disasm.as_deref().unwrap();
            let mut blocks: Vec<Vec<&str>> = Vec::new();
            for line in listing.lines() {
                if line.starts_with("block") {
                    blocks.push(Vec::new());
                } else if let Some(block) = blocks.last_mut() {
                    block.push(line);
                }
            }
            let fmas = |b: &Vec<&str>| b.iter().filter(|l| l.contains("vfmadd")).count();
            let main = blocks.iter().max_by_key(|b| fmas(b)).unwrap();
            let tile = MicroTile::DEFAULT;
            assert_eq!(fmas(main), tile.rows * tile.vecs * UNROLL, "{}", info.name);
            // A few reloads of loop-invariant strides are tolerated; vector spills
            // (accumulators or operands through the stack) are not.
            assert!(
                !main.iter().any(|l| l.contains("rsp") && l.contains("xmm")),
                "{}: the main loop spills vectors:\n{}",
                info.name,
                main.join("\n")
            );
        }
    }

    /// The JIT peak loop runs, through the unrolled rounds and the leftover ones
    /// (1001 is not a multiple of the unroll), as do the native loops behind
    /// `GemmImpl::fma_peak`.
    #[test]
    fn jit_fma_peak_runs() {
        let peak = GemmImpl::Jit.fma_peak().unwrap();
        assert_eq!(peak.name(), "jit-f32x4");
        let gflops = peak.measure(1001, 2);
        assert!(gflops.is_finite() && gflops > 0.0, "{gflops}");
        let native = GemmImpl::detect().fma_peak().unwrap();
        assert!(native.measure(1000, 1) > 0.0);
    }

    /// Other register tiles (used by the benchmark) compute the same products.
    #[test]
    fn other_micro_tiles_match_f64() {
        for (rows, vecs) in [(1, 1), (8, 1), (6, 2), (3, 4)] {
            let tile = MicroTile { rows, vecs };
            let mut jit = JitModule::new(&JitOptions::default(), &[]).unwrap();
            define_qk_tiled(&mut jit, "qk", tile).unwrap();
            define_pv_tiled(&mut jit, "pv", tile).unwrap();
            let code = Arc::new(jit.finalize().unwrap());
            // SAFETY: generated with the QkFn / PvFn signatures; `code` is the owner.
            let kernels = unsafe {
                let native = TileKernels::native_detected();
                TileKernels::from_raw(
                    format!("jit-{rows}x{vecs}"),
                    code.function("qk").unwrap(),
                    code.function("pv").unwrap(),
                    native.softmax_update,
                    code,
                )
            };
            let mut rng = Rng::new(16);
            for &(d, r, c) in &[(7, 13, 33), (64, 16, 48), (80, 31, 64), (1, 5, 15)] {
                check_qk(&kernels, d, r, c, &mut rng);
                check_pv(&kernels, d, r, c, &mut rng);
            }
        }
    }
}
