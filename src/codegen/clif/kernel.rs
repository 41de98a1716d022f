//! Lowering a loop-IR kernel to one Cranelift function per kernel.
//!
//! Stage: CPU backend. Consumes a verified [`crate::tile::Kernel`]; produces a
//! [`CompiledKernel`] whose task function runs one (b, h, query tile) task:
//! the row-level values of the tile, then the walk over the FULL and PARTIAL
//! key tiles of the block map with, per tile, `qk` (S = scale · Q Kᵀ), the
//! column-level values, the element-level score mod (and mask on PARTIAL
//! tiles), the online-softmax step and `pv`. The tile products and the
//! softmax step are the native or JIT micro-kernels of [`GemmImpl`]; all
//! spec-specific work is generated here. The caller finishes the rows
//! (`out = acc / l`, `lse`) from the scratch the task leaves.
//!
//! The task function is `extern "C" fn(task: *const Task) -> i64`; `task`
//! is a `runtime::abi::Task`, and the result is 0 or an error code
//! (`runtime::abi::code`) with details in its `ErrorRecord`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, BlockArg, InstBuilder, MemFlagsData, Type, Value};
use cranelift_frontend::FunctionBuilder;

use super::jit::{JitCode, JitModule, JitOptions};
use super::microkernel::{
    begin_function, emit_if, emit_if_else, emit_range, emit_while, GemmImpl, TileFuncs,
};
use super::vmath::VMath;
use crate::codegen::CodegenError;
use crate::sema::{Func, ShapeVar, Var};
use crate::tile::nest::{KvSource, Step};
use crate::tile::{BinOp, CmpOp, Kernel, Level, Op, Section, Ty, UnOp, ValueId, Verified};

use crate::runtime::abi::{code, offset, BufferDesc};

/// The symbol of the `ancestor` helper called from generated code.
pub const ANCESTOR_SYMBOL: &str = "attnc_ancestor";

/// The symbol of `runtime::gemm::pv_exact`, the `pv` of tiles whose V holds a
/// non-finite value.
pub const PV_EXACT_SYMBOL: &str = "attnc_pv_exact";

/// The symbols of the in-place tile products (`runtime::gemm::view`).
pub const QK_VIEW_SYMBOL: &str = "attnc_qk_view";
pub const PV_VIEW_SYMBOL: &str = "attnc_pv_view";

/// The symbols of the bf16 pair products (`runtime::gemm::pairs`), linked in
/// kernels of [`KvSource::PackedBf16`].
pub const QK_PAIRS_SYMBOL: &str = "attnc_qk_pairs";
pub const PV_PAIRS_SYMBOL: &str = "attnc_pv_pairs";
pub const PV_PAIRS_EXACT_SYMBOL: &str = "attnc_pv_pairs_exact";

/// `ancestor(parent, i, j)` over a buffer descriptor. Returns 0 or 1, or
/// `-code::OUT_OF_RANGE` (with the index in `*bad`) or `-code::CYCLE` (with
/// the walk's start `i` in `*bad`).
///
/// # Safety
/// `desc` must point at a valid 1-d i64 buffer descriptor and `bad` be writable.
pub unsafe extern "C" fn ancestor_helper(
    desc: *const BufferDesc,
    i: i64,
    j: i64,
    bad: *mut i64,
) -> i64 {
    if i == j {
        return 1;
    }
    let desc = &*desc;
    let (data, len, stride) = (desc.data as *const i64, desc.dims[0], desc.strides[0]);
    let mut x = i;
    for _ in 0..=len {
        if x < 0 || x >= len {
            *bad = x;
            return -code::OUT_OF_RANGE;
        }
        x = *data.offset((x * stride) as isize);
        if x < 0 {
            return 0;
        }
        if x == j {
            return 1;
        }
    }
    *bad = i;
    -code::CYCLE
}

use crate::runtime::abi::{TaskCode, TaskFn};

/// Where row- and column-level values live in scratch (by instruction id).
#[derive(Clone, Debug, Default)]
pub struct ValueSlots {
    pub row: HashMap<usize, usize>,
    pub col: HashMap<usize, usize>,
}

/// A kernel compiled for the host CPU.
pub struct CompiledKernel {
    pub kernel: Verified,
    /// The raw task function: only the runtime calls it, with a task block it
    /// has sized and filled (`runtime::abi::Task`).
    pub(crate) task: TaskFn,
    pub slots: ValueSlots,
    pub gemm: GemmImpl,
    pub compile_time: Duration,
    pub clif: Option<String>,
    _code: Arc<JitCode>,
}

impl CompiledKernel {
    /// The kernel as the runtime runs it.
    pub fn code(&self) -> TaskCode<'_> {
        TaskCode {
            kernel: &self.kernel,
            task: self.task,
            row_slots: self.slots.row.len(),
            col_slots: self.slots.col.len(),
        }
    }
}

impl std::fmt::Debug for CompiledKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledKernel")
            .field("name", &self.kernel.name)
            .field("gemm", &self.gemm.name())
            .finish()
    }
}

/// Compiles `kernel` with the tile products of `gemm`.
pub fn compile(
    kernel: &Verified,
    gemm: GemmImpl,
    options: &JitOptions,
) -> Result<CompiledKernel, CodegenError> {
    let start = Instant::now();
    if !kernel.schedule.tiling.bkv.is_multiple_of(16) {
        return Err(CodegenError::Isa(format!(
            "the CPU backend needs key tiles that are a multiple of 16 (packed K panels), found bkv = {}",
            kernel.schedule.tiling.bkv
        )));
    }
    let mut symbols = gemm
        .symbols()
        .map_err(|e| CodegenError::Isa(e.to_string()))?;
    symbols.push((ANCESTOR_SYMBOL, ancestor_helper as *const u8));
    symbols.push((PV_EXACT_SYMBOL, crate::runtime::gemm::pv_exact as *const u8));
    let view_isa = gemm.products_isa();
    let (qk_view, pv_view) = crate::runtime::gemm::view::view_kernels(view_isa);
    symbols.push((QK_VIEW_SYMBOL, qk_view as *const u8));
    symbols.push((PV_VIEW_SYMBOL, pv_view as *const u8));
    // bf16 pairs replace the f32 tile products of a packed nest.
    let pairs = (kernel.nest.kv == KvSource::PackedBf16)
        .then(|| crate::runtime::gemm::pairs::PairProducts::for_isa(view_isa, false));
    if let Some(pairs) = pairs {
        let (qk, pv, pv_exact) = pairs.kernels();
        symbols.push((QK_PAIRS_SYMBOL, qk as *const u8));
        symbols.push((PV_PAIRS_SYMBOL, pv as *const u8));
        symbols.push((PV_PAIRS_EXACT_SYMBOL, pv_exact as *const u8));
    }
    let mut jit = JitModule::new(options, &symbols)?;
    let tiles = gemm.declare_in(&mut jit)?;
    let p = jit.pointer_type();
    let anc_sig = jit.signature(&[p, types::I64, types::I64, p], &[types::I64]);
    let ancestor = jit.declare_import(ANCESTOR_SYMBOL, &anc_sig)?;
    let pv_exact = jit.declare_import(PV_EXACT_SYMBOL, &super::microkernel::pv_signature(&jit))?;
    let qk_view_sig = jit.signature(&[p, p, p, p, p, p, p, p, p, types::F32], &[]);
    let qk_view = jit.declare_import(QK_VIEW_SYMBOL, &qk_view_sig)?;
    let pv_view = jit.declare_import(PV_VIEW_SYMBOL, &super::microkernel::pv_signature(&jit))?;
    let pair_funcs = match pairs {
        Some(_) => Some((
            jit.declare_import(QK_PAIRS_SYMBOL, &super::microkernel::qk_signature(&jit))?,
            jit.declare_import(PV_PAIRS_SYMBOL, &super::microkernel::pv_signature(&jit))?,
            jit.declare_import(
                PV_PAIRS_EXACT_SYMBOL,
                &super::microkernel::pv_signature(&jit),
            )?,
        )),
        None => None,
    };
    let sig = jit.signature(&[p], &[types::I64]);
    let name = format!("attnc_task_{}", kernel.name);
    let id = jit.declare_function(&name, &sig)?;
    // Row and column values live in scratch slots between the loop that
    // computes them and the code that uses them. Only values used at another
    // level or in another section's pass need one: storing every value would
    // keep them all live to the end of their loop body, and register
    // allocation grows faster than linearly with the number of live values.
    let mut exported = vec![false; kernel.insts.len()];
    for inst in &kernel.insts {
        for o in inst.op.operands().into_iter().chain(inst.guard) {
            let def = kernel.inst(o);
            if def.level != inst.level || def.section != inst.section {
                exported[o.0 as usize] = true;
            }
        }
    }
    for root in [kernel.score_full, kernel.score_partial]
        .into_iter()
        .chain(kernel.mask)
    {
        exported[root.0 as usize] = true;
    }
    let mut slots = ValueSlots::default();
    for (i, inst) in kernel.insts.iter().enumerate() {
        if !exported[i] {
            continue;
        }
        match inst.level {
            Level::Row => {
                let n = slots.row.len();
                slots.row.insert(i, n);
            }
            Level::Col => {
                let n = slots.col.len();
                slots.col.insert(i, n);
            }
            _ => {}
        }
    }
    let has_fma = jit.has_native_fma();
    let clif = {
        let info = jit.define_function(id, |b, refs| {
            let (qk, pv, pv_exact) = match pair_funcs {
                Some((qk, pv, pv_exact)) => (qk, pv, pv_exact),
                None => (tiles.qk, tiles.pv, pv_exact),
            };
            let qk = refs.func_ref(b, qk);
            let pv = refs.func_ref(b, pv);
            let pv_exact = refs.func_ref(b, pv_exact);
            let sm = refs.func_ref(b, tiles.softmax_update);
            let anc = refs.func_ref(b, ancestor);
            let qk_view = refs.func_ref(b, qk_view);
            let pv_view = refs.func_ref(b, pv_view);
            let funcs = Funcs {
                qk,
                pv,
                pv_exact,
                qk_view,
                pv_view,
                softmax: sm,
                ancestor: anc,
                _tiles: tiles,
            };
            let mut e = Emitter {
                k: kernel,
                vm: VMath::new(has_fma),
                ptr: p,
                slots: &slots,
                funcs,
                vals: vec![None; kernel.insts.len()],
                uniform: vec![None; kernel.insts.len()],
                task: None,
                check_proven: options.check_proven_loads,
            };
            e.body(b);
            Ok(())
        })?;
        info.clif.clone()
    };
    let code = Arc::new(jit.finalize()?);
    // SAFETY: the function was generated with the signature `fn(*const i64) -> i64`.
    let task: TaskFn = unsafe { code.function(&name)? };
    Ok(CompiledKernel {
        kernel: kernel.clone(),
        task,
        slots,
        gemm,
        compile_time: start.elapsed(),
        clif,
        _code: code,
    })
}

struct Funcs {
    qk: cranelift_codegen::ir::FuncRef,
    pv: cranelift_codegen::ir::FuncRef,
    pv_exact: cranelift_codegen::ir::FuncRef,
    qk_view: cranelift_codegen::ir::FuncRef,
    pv_view: cranelift_codegen::ir::FuncRef,
    softmax: cranelift_codegen::ir::FuncRef,
    ancestor: cranelift_codegen::ir::FuncRef,
    _tiles: TileFuncs,
}

/// The index variables available where code is being emitted.
#[derive(Clone, Copy, Default)]
struct Here {
    b: Option<Value>,
    h: Option<Value>,
    q: Option<Value>,
    kv: Option<Value>,
    tile_score: Option<Value>,
}

struct Emitter<'a> {
    k: &'a Kernel,
    vm: VMath,
    ptr: Type,
    slots: &'a ValueSlots,
    funcs: Funcs,
    /// The Cranelift value of each IR value, where it is in scope.
    vals: Vec<Option<Value>>,
    /// Splats of the uniform (call, head or row level) operands of the element
    /// code, made once per row before the column loop (Cranelift at
    /// `opt_level = "none"` does not hoist them); empty outside a row.
    uniform: Vec<Option<VVal>>,
    task: Option<Value>,
    /// Bounds-check the reads the optimiser proved in range too.
    check_proven: bool,
}

fn flags() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// Flags of lane-reinterpreting bitcasts.
fn lane_flags() -> MemFlagsData {
    MemFlagsData::new().with_endianness(cranelift_codegen::ir::Endianness::Little)
}

/// What every key tile of a task shares: the query rows, the scratch slots
/// of row and column values, the Q prescale and the tile sizes.
#[derive(Clone, Copy)]
struct TileCtx {
    q_start: Value,
    rows: Value,
    rowvals: Value,
    colvals: Value,
    prescale: Value,
    bq: i64,
    bkv: i64,
}

/// An element-level value over four columns.
#[derive(Clone, Copy, Debug)]
enum VVal {
    /// f32x4.
    F(Value),
    /// i32x4 lane mask (all ones = true).
    M(Value),
    /// Lanes 0-1 and 2-3 as i64x2.
    I(Value, Value),
}

fn clif_ty(t: Ty) -> Type {
    match t {
        Ty::I64 => types::I64,
        Ty::F32 => types::F32,
        Ty::Bool => types::I8,
    }
}

impl Emitter<'_> {
    /// The task block's field at byte `offset` (an `abi::offset` constant).
    fn task_field(&self, b: &mut FunctionBuilder<'_>, offset: i32) -> Value {
        b.ins()
            .load(types::I64, flags(), self.task.unwrap(), offset)
    }

    fn body(&mut self, b: &mut FunctionBuilder<'_>) {
        self.task = Some(begin_function(b)[0]);
        let k = self.k;
        // The loop nest this body lowers: one task per (b, h, query tile), or
        // per (b, KV head, key chunk) for a GQA group, or per (b, key chunk)
        // for all heads (the runtime's task block says which); the grid
        // itself is the runtime's.
        let (crate::tile::nest::Grid::QueryTiles { .. }
        | crate::tile::nest::Grid::KvHeads { .. }
        | crate::tile::nest::Grid::Sequences { .. }) = k.nest.grid;
        let bq = k.schedule.tiling.bq as i64;
        let bkv = k.schedule.tiling.bkv as i64;
        let bv = self.task_field(b, offset::B);
        let hv = self.task_field(b, offset::H);
        let mut here = Here {
            b: Some(bv),
            h: Some(hv),
            ..Here::default()
        };
        let not_full = |s: Section| s != Section::Full;
        let full_only = |s: Section| s == Section::Full;
        self.level_where(b, Level::Call, not_full, &here);
        self.level_where(b, Level::Head, not_full, &here);
        let q_start = self.task_field(b, offset::Q_START);
        let rows = self.task_field(b, offset::ROWS);
        let rowvals = self.task_field(b, offset::ROWVALS);
        let colvals = self.task_field(b, offset::COLVALS);
        let zero = b.ins().iconst(types::I64, 0);
        let prescale = self.vals[k.q_prescale.0 as usize].unwrap();
        let full = self.task_field(b, offset::FULL);
        let n_full = self.task_field(b, offset::N_FULL);
        let n_part = self.task_field(b, offset::N_PART);
        // Row-level values, once per row, for query tiles that visit any key tile.
        let n_tiles = b.ins().iadd(n_full, n_part);
        let any = b.ins().icmp_imm_s(IntCC::SignedGreaterThan, n_tiles, 0);
        emit_if(b, any, |b| {
            self.rows(b, not_full, false, q_start, rows, rowvals, bq, &here);
        });
        let tc = TileCtx {
            q_start,
            rows,
            rowvals,
            colvals,
            prescale,
            bq,
            bkv,
        };
        // The key walk of the loop nest, section by section.
        let crate::tile::nest::KeyWalk::BlockMap { .. } = &k.nest.walk;
        for &section in k.nest.sections() {
            match section {
                Section::Full => {
                    // FULL tiles (ranges of (start, end)), after the values only they use.
                    let has_full = b.ins().icmp_imm_s(IntCC::SignedGreaterThan, n_full, 0);
                    let full_block = b.create_block();
                    let after_full = b.create_block();
                    b.ins().brif(has_full, full_block, &[], after_full, &[]);
                    b.switch_to_block(full_block);
                    self.level_where(b, Level::Call, full_only, &here);
                    self.level_where(b, Level::Head, full_only, &here);
                    self.rows(b, full_only, true, q_start, rows, rowvals, bq, &here);
                    emit_range(b, zero, n_full, |b, r| {
                        let off = b.ins().imul_imm_s(r, 8);
                        let addr = b.ins().iadd(full, off);
                        let start = b.ins().uload32(flags(), addr, 0);
                        let end = b.ins().uload32(flags(), addr, 4);
                        emit_range(b, start, end, |b, t| {
                            self.tile(b, t, Section::Full, &mut here, &tc);
                        });
                    });
                    b.ins().jump(after_full, &[]);
                    b.switch_to_block(after_full);
                }
                Section::Partial => {
                    let part = self.task_field(b, offset::PART);
                    emit_range(b, zero, n_part, |b, r| {
                        let off = b.ins().imul_imm_s(r, 4);
                        let addr = b.ins().iadd(part, off);
                        let kt = b.ins().uload32(flags(), addr, 0);
                        self.tile(b, kt, Section::Partial, &mut here, &tc);
                    });
                }
                Section::Shared => unreachable!("the walk visits FULL and PARTIAL tiles"),
            }
        }
        let ok = b.ins().iconst(types::I64, 0);
        b.ins().return_(&[ok]);
    }

    /// Computes the row-level values whose section passes `pick` for every
    /// row of the tile and stores them in their slots.
    #[allow(clippy::too_many_arguments)]
    fn rows(
        &mut self,
        b: &mut FunctionBuilder<'_>,
        pick: impl Fn(Section) -> bool + Copy,
        reload_others: bool,
        q_start: Value,
        rows: Value,
        rowvals: Value,
        bq: i64,
        here: &Here,
    ) {
        let any = self
            .k
            .insts
            .iter()
            .any(|i| i.level == Level::Row && pick(i.section));
        if !any {
            return;
        }
        let zero = b.ins().iconst(types::I64, 0);
        emit_range(b, zero, rows, |b, i| {
            let h2 = self.row_here(b, q_start, i, here);
            if reload_others {
                // Values of the first row pass that these depend on.
                self.load_slots_where(b, Level::Row, |s| !pick(s), rowvals, bq, i);
            }
            self.level_where(b, Level::Row, pick, &h2);
            self.store_slots_where(b, Level::Row, pick, rowvals, bq, i);
        });
    }

    /// Where row `i` of the tile is: its query position and head, as the
    /// loop nest's row map says (`q_start + i` of the task's head, or head
    /// `h + i / Q`, query `q_start + i % Q` in a GQA group or, from `h = 0`,
    /// in a tile of all heads).
    fn row_here(&self, b: &mut FunctionBuilder<'_>, q_start: Value, i: Value, here: &Here) -> Here {
        use crate::tile::nest::RowMap;
        match self.k.nest.rows {
            RowMap::OneHead => Here {
                q: Some(b.ins().iadd(q_start, i)),
                ..*here
            },
            RowMap::GqaGroup | RowMap::AllHeads => {
                let shapes = self.task_field(b, offset::SHAPES);
                let qn = b.ins().load(types::I64, flags(), shapes, 3 * 8);
                let head = b.ins().udiv(i, qn);
                let row = b.ins().urem(i, qn);
                Here {
                    q: Some(b.ins().iadd(q_start, row)),
                    h: here.h.map(|h| b.ins().iadd(h, head)),
                    ..*here
                }
            }
        }
    }

    fn store_slots(
        &mut self,
        b: &mut FunctionBuilder<'_>,
        level: Level,
        section: Section,
        base: Value,
        stride: i64,
        i: Value,
    ) {
        self.store_slots_where(b, level, |s| s.runs_in(section), base, stride, i)
    }

    /// The scratch addresses, at position `i`, of the values of `level`
    /// whose section passes `pick`, in instruction order.
    fn slot_addrs(
        &self,
        b: &mut FunctionBuilder<'_>,
        level: Level,
        pick: impl Fn(Section) -> bool,
        base: Value,
        stride: i64,
        i: Value,
    ) -> Vec<(usize, Value)> {
        let slots = if level == Level::Row {
            &self.slots.row
        } else {
            &self.slots.col
        };
        let mut list: Vec<(usize, usize)> = slots.iter().map(|(&v, &s)| (v, s)).collect();
        list.sort();
        list.into_iter()
            .filter(|&(v, _)| pick(self.k.insts[v].section))
            .map(|(v, s)| {
                let idx = b.ins().iadd_imm_s(i, s as i64 * stride);
                let off = b.ins().imul_imm_s(idx, 8);
                (v, b.ins().iadd(base, off))
            })
            .collect()
    }

    /// Stores the values of `level` whose section passes `pick` into their
    /// scratch slots at position `i`.
    fn store_slots_where(
        &mut self,
        b: &mut FunctionBuilder<'_>,
        level: Level,
        pick: impl Fn(Section) -> bool,
        base: Value,
        stride: i64,
        i: Value,
    ) {
        for (v, addr) in self.slot_addrs(b, level, pick, base, stride, i) {
            if let Some(val) = self.vals[v] {
                b.ins().store(flags(), val, addr, 0);
            }
        }
    }

    /// Reloads the values of `level` (for the given loop) from scratch position `i`.
    fn load_slots(
        &mut self,
        b: &mut FunctionBuilder<'_>,
        level: Level,
        section: Section,
        base: Value,
        stride: i64,
        i: Value,
    ) {
        self.load_slots_where(b, level, |s| s.runs_in(section), base, stride, i)
    }

    /// Reloads the values of `level` whose section passes `pick` from scratch position `i`.
    fn load_slots_where(
        &mut self,
        b: &mut FunctionBuilder<'_>,
        level: Level,
        pick: impl Fn(Section) -> bool,
        base: Value,
        stride: i64,
        i: Value,
    ) {
        for (v, addr) in self.slot_addrs(b, level, pick, base, stride, i) {
            let ty = clif_ty(self.k.insts[v].ty);
            self.vals[v] = Some(b.ins().load(ty, flags(), addr, 0));
        }
    }

    /// One key tile: the steps of the loop nest (qk, column values, element
    /// code and scores, softmax step, pv).
    #[allow(clippy::too_many_arguments)]
    fn tile(
        &mut self,
        b: &mut FunctionBuilder<'_>,
        kt: Value,
        section: Section,
        here: &mut Here,
        tc: &TileCtx,
    ) {
        let k = self.k;
        let p = self.ptr;
        let col0 = b.ins().imul_imm_s(kt, tc.bkv);
        // Absolute position of the tile's first key.
        let kv_start = self.task_field(b, offset::KV_START);
        let kv0 = b.ins().iadd(col0, kv_start);
        let kv_len = self.task_field(b, offset::KV_LEN);
        let left = b.ins().isub(kv_len, col0);
        let bkv_v = b.ins().iconst(types::I64, tc.bkv);
        let lt = b.ins().icmp(IntCC::SignedLessThan, left, bkv_v);
        let cols = b.ins().select(lt, left, bkv_v);
        let d = self.task_field(b, offset::D);
        let q = self.task_field(b, offset::Q);
        let kp = self.task_field(b, offset::K);
        let s = self.task_field(b, offset::S);
        // K panel of the tile's first key (col0 is a multiple of 16): col0 * d
        // floats in, or col0 * round_up(d, 2) bf16 values of pairs.
        let bf16_pairs = k.nest.kv == KvSource::PackedBf16;
        let koff = if bf16_pairs {
            let d2 = b.ins().iadd_imm_s(d, 1);
            let d2 = b.ins().band_imm_s(d2, -2);
            let koff = b.ins().imul(col0, d2);
            b.ins().imul_imm_s(koff, 2)
        } else {
            let koff = b.ins().imul(col0, d);
            b.ins().imul_imm_s(koff, 4)
        };
        let kaddr = b.ins().iadd(kp, koff);
        let s_stride = b.ins().iconst(p, tc.bkv);
        let m = self.task_field(b, offset::M);
        let l = self.task_field(b, offset::L);
        let acc = self.task_field(b, offset::ACC);
        for step in &k.nest.steps {
            match step {
                Step::Qk => match k.nest.kv {
                    KvSource::Packed | KvSource::PackedBf16 => {
                        b.ins().call(
                            self.funcs.qk,
                            &[q, d, kaddr, d, tc.rows, cols, s, s_stride, tc.prescale],
                        );
                    }
                    KvSource::InPlace => {
                        let view = self.task_field(b, offset::KV_VIEW);
                        b.ins().call(
                            self.funcs.qk_view,
                            &[q, d, view, col0, d, tc.rows, cols, s, s_stride, tc.prescale],
                        );
                    }
                },
                Step::Cols => {
                    // Column-level values.
                    let has_cols = k
                        .insts
                        .iter()
                        .any(|i| i.level == Level::Col && i.section.runs_in(section));
                    if has_cols {
                        let zero = b.ins().iconst(types::I64, 0);
                        emit_range(b, zero, cols, |b, j| {
                            let kv = b.ins().iadd(kv0, j);
                            let h2 = Here {
                                kv: Some(kv),
                                ..*here
                            };
                            self.level(b, Level::Col, section, &h2);
                            self.store_slots(b, Level::Col, section, tc.colvals, tc.bkv, j);
                        });
                    }
                }
                Step::Scores => {
                    // Element-level code, unless the tile's score is the raw tile score.
                    let score = if section == Section::Full {
                        k.score_full
                    } else {
                        k.score_partial
                    };
                    let needs_elem = section == Section::Partial && k.mask.is_some()
                        || k.inst(score).op != Op::TileScore;
                    if needs_elem {
                        let zero = b.ins().iconst(types::I64, 0);
                        emit_range(b, zero, tc.rows, |b, i| {
                            let row = self.row_here(b, tc.q_start, i, here);
                            self.load_slots(b, Level::Row, section, tc.rowvals, tc.bq, i);
                            self.splat_uniforms(b, section, score);
                            let row_off = b.ins().imul_imm_s(i, tc.bkv * 4);
                            let srow = b.ins().iadd(s, row_off);
                            // Four columns at a time in f32x4, then the scalar tail.
                            let after_vec = emit_while(
                                b,
                                &[zero],
                                |b, w| {
                                    let j4 = b.ins().iadd_imm_s(w[0], 4);
                                    b.ins().icmp(IntCC::SignedLessThanOrEqual, j4, cols)
                                },
                                |b, w| {
                                    let j = w[0];
                                    let kv = b.ins().iadd(kv0, j);
                                    let h2 = Here {
                                        kv: Some(kv),
                                        ..row
                                    };
                                    self.elem_vector(
                                        b, section, score, &h2, tc.colvals, tc.bkv, j, srow,
                                    );
                                    vec![b.ins().iadd_imm_s(j, 4)]
                                },
                            );
                            emit_range(b, after_vec[0], cols, |b, j| {
                                let kv = b.ins().iadd(kv0, j);
                                self.load_slots(b, Level::Col, section, tc.colvals, tc.bkv, j);
                                let off = b.ins().imul_imm_s(j, 4);
                                let addr = b.ins().iadd(srow, off);
                                let ts = b.ins().load(types::F32, flags(), addr, 0);
                                let h2 = Here {
                                    kv: Some(kv),
                                    tile_score: Some(ts),
                                    ..row
                                };
                                self.level(b, Level::Elem, section, &h2);
                                let mut out = self.vals[score.0 as usize].unwrap();
                                if section == Section::Partial {
                                    if let Some(m) = k.mask {
                                        let mv = self.vals[m.0 as usize].unwrap();
                                        let ninf = b.ins().f32const(f32::NEG_INFINITY);
                                        out = b.ins().select(mv, out, ninf);
                                    }
                                }
                                b.ins().store(flags(), out, addr, 0);
                            });
                            self.uniform.fill(None);
                        });
                    }
                }
                Step::OnlineSoftmax => {
                    let base2 = b.ins().iconst(types::I32, i64::from(k.schedule.exp2));
                    b.ins().call(
                        self.funcs.softmax,
                        &[s, s_stride, tc.rows, cols, m, l, acc, d, d, base2],
                    );
                }
                Step::Pv if k.nest.kv == KvSource::InPlace => {
                    // Skips keys of probability 0 itself: no flags needed.
                    let view = self.task_field(b, offset::KV_VIEW);
                    b.ins().call(
                        self.funcs.pv_view,
                        &[s, s_stride, view, col0, d, tc.rows, cols, acc, d],
                    );
                }
                Step::Pv => {
                    let vp = self.task_field(b, offset::V);
                    let vstride = self.task_field(b, offset::V_STRIDE);
                    // V row of the tile's first key: col0 rows of v_stride floats,
                    // or col0 / 2 rows of v_stride pairs (col0 is even).
                    let voff = b.ins().imul(col0, vstride);
                    let voff = b.ins().imul_imm_s(voff, if bf16_pairs { 2 } else { 4 });
                    let vaddr = b.ins().iadd(vp, voff);
                    // A tile whose V holds NaN or inf takes the exact product, which skips
                    // keys of probability 0 (the dense one would compute 0 x NaN).
                    let vflags = self.task_field(b, offset::V_FLAGS);
                    let flag_addr = b.ins().iadd(vflags, kt);
                    let dirty = b.ins().uload8(types::I32, flags(), flag_addr, 0);
                    let pv_args = [s, s_stride, vaddr, vstride, d, tc.rows, cols, acc, d];
                    let (pv, pv_exact) = (self.funcs.pv, self.funcs.pv_exact);
                    emit_if_else(
                        b,
                        dirty,
                        |b| {
                            b.ins().call(pv_exact, &pv_args);
                        },
                        |b| {
                            b.ins().call(pv, &pv_args);
                        },
                    );
                }
            }
        }
    }

    /// Element code for four consecutive columns `j .. j + 4` of one row:
    /// f32 values as f32x4, bools as i32x4 lane masks, ints as two i64x2.
    /// Operations without a vector form (gathers, guarded and trapping ops,
    /// int/float conversions, integer division) run lane by lane.
    #[allow(clippy::too_many_arguments)]
    fn elem_vector(
        &mut self,
        b: &mut FunctionBuilder<'_>,
        section: Section,
        score: ValueId,
        here: &Here,
        colvals: Value,
        bkv: i64,
        j: Value,
        srow: Value,
    ) {
        let k = self.k;
        let mut vv: Vec<Option<VVal>> = vec![None; k.insts.len()];
        // Column values of the four columns.
        let mut list: Vec<(usize, usize)> = self.slots.col.iter().map(|(&v, &s)| (v, s)).collect();
        list.sort();
        for (v, slot) in list {
            let inst = &k.insts[v];
            if !inst.section.runs_in(section) {
                continue;
            }
            let idx = b.ins().iadd_imm_s(j, slot as i64 * bkv);
            let off = b.ins().imul_imm_s(idx, 8);
            let addr = b.ins().iadd(colvals, off);
            vv[v] = Some(match inst.ty {
                Ty::I64 => {
                    let lo = b.ins().load(types::I64X2, flags(), addr, 0);
                    let hi = b.ins().load(types::I64X2, flags(), addr, 16);
                    VVal::I(lo, hi)
                }
                Ty::F32 => {
                    let lanes: Vec<Value> = (0..4)
                        .map(|l| b.ins().load(types::F32, flags(), addr, l * 8))
                        .collect();
                    VVal::F(self.build_f32(b, &lanes))
                }
                Ty::Bool => {
                    let lanes: Vec<Value> = (0..4)
                        .map(|l| b.ins().load(types::I8, flags(), addr, l * 8))
                        .collect();
                    VVal::M(self.build_mask(b, &lanes))
                }
            });
        }
        // `s` at column j: the row pointer plus j floats.
        let off = b.ins().imul_imm_s(j, 4);
        let addr = b.ins().iadd(srow, off);
        let ts = b.ins().load(types::F32X4, flags(), addr, 0);
        for v in 0..k.insts.len() {
            let inst = &k.insts[v];
            if inst.level != Level::Elem || !inst.section.runs_in(section) {
                continue;
            }
            let val = match &inst.op {
                Op::TileScore => Some(VVal::F(ts)),
                _ if inst.guard.is_some() => None,
                op => self.vector_op(b, op, inst.ty, &vv),
            };
            vv[v] = Some(match val {
                Some(x) => x,
                None => self.scalarize(b, v, &vv, here, ts),
            });
        }
        let mut out = self.as_f32(b, &vv, score);
        if section == Section::Partial {
            if let Some(m) = k.mask {
                let mask = self.as_mask(b, &vv, m);
                let mf = b.ins().bitcast(types::F32X4, lane_flags(), mask);
                let ninf = self.vm.splat(b, f32::NEG_INFINITY);
                out = b.ins().bitselect(mf, out, ninf);
            }
        }
        b.ins().store(flags(), out, addr, 0);
    }

    fn build_f32(&self, b: &mut FunctionBuilder<'_>, lanes: &[Value]) -> Value {
        let mut v = b.ins().splat(types::F32X4, lanes[0]);
        for (l, &x) in lanes.iter().enumerate().skip(1) {
            v = b.ins().insertlane(v, x, l as u8);
        }
        v
    }

    /// Four i8 bools to an i32x4 lane mask.
    fn build_mask(&self, b: &mut FunctionBuilder<'_>, lanes: &[Value]) -> Value {
        let mut v = b.ins().iconst(types::I32, 0);
        let mut out = b.ins().splat(types::I32X4, v);
        for (l, &x) in lanes.iter().enumerate() {
            let w = b.ins().uextend(types::I32, x);
            v = b.ins().ineg(w);
            out = b.ins().insertlane(out, v, l as u8);
        }
        out
    }

    fn build_i64(&self, b: &mut FunctionBuilder<'_>, lanes: &[Value]) -> VVal {
        let lo = b.ins().splat(types::I64X2, lanes[0]);
        let lo = b.ins().insertlane(lo, lanes[1], 1);
        let hi = b.ins().splat(types::I64X2, lanes[2]);
        let hi = b.ins().insertlane(hi, lanes[3], 1);
        VVal::I(lo, hi)
    }

    /// Splats, at the current point (the top of a row), every uniform value the
    /// vector element code of `section` reads, for [`Self::vget`].
    fn splat_uniforms(&mut self, b: &mut FunctionBuilder<'_>, section: Section, score: ValueId) {
        let k = self.k;
        // Column values are per lane (loaded by `elem_vector`), not uniform.
        // Constants are splatted where they are used: splatting thousands of
        // them up front keeps them all live across the row loop, and register
        // allocation then grows faster than linearly with the spec.
        let uniform = |v: ValueId| {
            k.inst(v).level <= Level::Row
                && !matches!(k.inst(v).op, Op::IConst(_) | Op::FConst(_) | Op::BConst(_))
        };
        let mut wanted: Vec<ValueId> = k
            .insts
            .iter()
            .filter(|i| i.level == Level::Elem && i.section.runs_in(section))
            .flat_map(|i| i.op.operands())
            .collect();
        wanted.push(score);
        if section == Section::Partial {
            wanted.extend(k.mask);
        }
        for v in wanted {
            if uniform(v) && self.uniform[v.0 as usize].is_none() {
                let x = self.splat(b, v);
                self.uniform[v.0 as usize] = Some(x);
            }
        }
    }

    /// The vector form of `v`: computed at element level, or a uniform
    /// (call, head or row level) value splatted (once per row, see
    /// [`Self::splat_uniforms`]).
    fn vget(&self, b: &mut FunctionBuilder<'_>, vv: &[Option<VVal>], v: ValueId) -> VVal {
        if let Some(x) = vv[v.0 as usize].or(self.uniform[v.0 as usize]) {
            return x;
        }
        self.splat(b, v)
    }

    /// `v` (a uniform value in scope) in every lane.
    fn splat(&self, b: &mut FunctionBuilder<'_>, v: ValueId) -> VVal {
        let s = self.get(v);
        match self.k.inst(v).ty {
            Ty::F32 => VVal::F(b.ins().splat(types::F32X4, s)),
            Ty::I64 => {
                let x = b.ins().splat(types::I64X2, s);
                VVal::I(x, x)
            }
            Ty::Bool => {
                let w = b.ins().uextend(types::I32, s);
                let m = b.ins().ineg(w);
                VVal::M(b.ins().splat(types::I32X4, m))
            }
        }
    }

    fn as_f32(&self, b: &mut FunctionBuilder<'_>, vv: &[Option<VVal>], v: ValueId) -> Value {
        match self.vget(b, vv, v) {
            VVal::F(x) => x,
            _ => unreachable!("verified IR: {v} is f32"),
        }
    }

    fn as_mask(&self, b: &mut FunctionBuilder<'_>, vv: &[Option<VVal>], v: ValueId) -> Value {
        match self.vget(b, vv, v) {
            VVal::M(x) => x,
            _ => unreachable!("verified IR: {v} is bool"),
        }
    }

    fn as_i64(
        &self,
        b: &mut FunctionBuilder<'_>,
        vv: &[Option<VVal>],
        v: ValueId,
    ) -> (Value, Value) {
        match self.vget(b, vv, v) {
            VVal::I(lo, hi) => (lo, hi),
            _ => unreachable!("verified IR: {v} is i64"),
        }
    }

    /// Two i64x2 lane masks to one i32x4 lane mask.
    fn narrow_mask(&self, b: &mut FunctionBuilder<'_>, lo: Value, hi: Value) -> Value {
        let lo8 = b.ins().bitcast(types::I8X16, lane_flags(), lo);
        let hi8 = b.ins().bitcast(types::I8X16, lane_flags(), hi);
        let perm: Vec<u8> = vec![0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27];
        let imm = b
            .func
            .dfg
            .immediates
            .push(cranelift_codegen::ir::ConstantData::from(perm));
        let m = b.ins().shuffle(lo8, hi8, imm);
        b.ins().bitcast(types::I32X4, lane_flags(), m)
    }

    /// The vector form of an op, or `None` where it has none.
    fn vector_op(
        &mut self,
        b: &mut FunctionBuilder<'_>,
        op: &Op,
        ty: Ty,
        vv: &[Option<VVal>],
    ) -> Option<VVal> {
        let f = |s: &Self, b: &mut FunctionBuilder<'_>, v: &ValueId| s.as_f32(b, vv, *v);
        Some(match op {
            Op::FConst(_) | Op::IConst(_) | Op::BConst(_) => return None,
            Op::Unary(UnOp::FNeg, a) => {
                let x = f(self, b, a);
                VVal::F(b.ins().fneg(x))
            }
            Op::Unary(UnOp::Not, a) => {
                let m = self.as_mask(b, vv, *a);
                VVal::M(b.ins().bnot(m))
            }
            Op::Unary(UnOp::INeg, a) => {
                let (lo, hi) = self.as_i64(b, vv, *a);
                VVal::I(b.ins().ineg(lo), b.ins().ineg(hi))
            }
            Op::Unary(UnOp::INot, a) => {
                let (lo, hi) = self.as_i64(b, vv, *a);
                VVal::I(b.ins().bnot(lo), b.ins().bnot(hi))
            }
            Op::Binary(op, x, y) => match op {
                BinOp::FAdd
                | BinOp::FSub
                | BinOp::FMul
                | BinOp::FDiv
                | BinOp::FRem
                | BinOp::FMin
                | BinOp::FMax => {
                    let (x, y) = (f(self, b, x), f(self, b, y));
                    VVal::F(match op {
                        BinOp::FAdd => b.ins().fadd(x, y),
                        BinOp::FSub => b.ins().fsub(x, y),
                        BinOp::FMul => b.ins().fmul(x, y),
                        BinOp::FDiv => b.ins().fdiv(x, y),
                        BinOp::FRem => {
                            let q = b.ins().fdiv(x, y);
                            let fl = b.ins().floor(q);
                            let m = b.ins().fmul(y, fl);
                            b.ins().fsub(x, m)
                        }
                        _ => {
                            let cc = if *op == BinOp::FMin {
                                FloatCC::LessThan
                            } else {
                                FloatCC::GreaterThan
                            };
                            let c = b.ins().fcmp(cc, x, y);
                            let c = b.ins().bitcast(types::F32X4, lane_flags(), c);
                            let pick = b.ins().bitselect(c, x, y);
                            let ynan = b.ins().fcmp(FloatCC::Unordered, y, y);
                            let ynan = b.ins().bitcast(types::F32X4, lane_flags(), ynan);
                            b.ins().bitselect(ynan, x, pick)
                        }
                    })
                }
                BinOp::And | BinOp::Or | BinOp::BEq | BinOp::BNe => {
                    let (x, y) = (self.as_mask(b, vv, *x), self.as_mask(b, vv, *y));
                    VVal::M(match op {
                        BinOp::And => b.ins().band(x, y),
                        BinOp::Or => b.ins().bor(x, y),
                        BinOp::BEq => b.ins().icmp(IntCC::Equal, x, y),
                        _ => b.ins().icmp(IntCC::NotEqual, x, y),
                    })
                }
                BinOp::IAdd
                | BinOp::ISub
                | BinOp::IMul
                | BinOp::IAnd
                | BinOp::IXor
                | BinOp::IOr
                | BinOp::IMin
                | BinOp::IMax => {
                    let ((a0, a1), (b0, b1)) = (self.as_i64(b, vv, *x), self.as_i64(b, vv, *y));
                    let pair = |b: &mut FunctionBuilder<'_>, p: Value, q: Value| match op {
                        BinOp::IAdd => b.ins().iadd(p, q),
                        BinOp::ISub => b.ins().isub(p, q),
                        BinOp::IMul => b.ins().imul(p, q),
                        BinOp::IAnd => b.ins().band(p, q),
                        BinOp::IXor => b.ins().bxor(p, q),
                        BinOp::IOr => b.ins().bor(p, q),
                        _ => {
                            let cc = if *op == BinOp::IMin {
                                IntCC::SignedLessThan
                            } else {
                                IntCC::SignedGreaterThan
                            };
                            let c = b.ins().icmp(cc, p, q);
                            b.ins().bitselect(c, p, q)
                        }
                    };
                    let lo = pair(b, a0, b0);
                    let hi = pair(b, a1, b1);
                    VVal::I(lo, hi)
                }
                // The verifier guarantees a constant shift in 0..64.
                BinOp::IShr => {
                    let s = self.k.const_int(*y)?;
                    let (lo, hi) = self.as_i64(b, vv, *x);
                    VVal::I(b.ins().sshr_imm_s(lo, s), b.ins().sshr_imm_s(hi, s))
                }
                // No i64x2 `umulhi` on x86: `IMulHiU` (and integer
                // division and the checked shifts, which trap) run lane by lane.
                _ => return None,
            },
            Op::Cmp(cmp, x, y) => {
                if self.k.inst(*x).ty == Ty::F32 {
                    let (x, y) = (f(self, b, x), f(self, b, y));
                    let cc = match cmp {
                        CmpOp::Eq => FloatCC::Equal,
                        CmpOp::Ne => FloatCC::NotEqual,
                        CmpOp::Lt => FloatCC::LessThan,
                        CmpOp::Le => FloatCC::LessThanOrEqual,
                        CmpOp::Gt => FloatCC::GreaterThan,
                        CmpOp::Ge => FloatCC::GreaterThanOrEqual,
                    };
                    VVal::M(b.ins().fcmp(cc, x, y))
                } else {
                    let ((a0, a1), (b0, b1)) = (self.as_i64(b, vv, *x), self.as_i64(b, vv, *y));
                    let cc = match cmp {
                        CmpOp::Eq => IntCC::Equal,
                        CmpOp::Ne => IntCC::NotEqual,
                        CmpOp::Lt => IntCC::SignedLessThan,
                        CmpOp::Le => IntCC::SignedLessThanOrEqual,
                        CmpOp::Gt => IntCC::SignedGreaterThan,
                        CmpOp::Ge => IntCC::SignedGreaterThanOrEqual,
                    };
                    let lo = b.ins().icmp(cc, a0, b0);
                    let hi = b.ins().icmp(cc, a1, b1);
                    VVal::M(self.narrow_mask(b, lo, hi))
                }
            }
            Op::Select(c, x, y) => {
                let m = self.as_mask(b, vv, *c);
                match ty {
                    Ty::F32 => {
                        let (x, y) = (f(self, b, x), f(self, b, y));
                        let mf = b.ins().bitcast(types::F32X4, lane_flags(), m);
                        VVal::F(b.ins().bitselect(mf, x, y))
                    }
                    Ty::Bool => {
                        let (x, y) = (self.as_mask(b, vv, *x), self.as_mask(b, vv, *y));
                        VVal::M(b.ins().bitselect(m, x, y))
                    }
                    Ty::I64 => {
                        let ((a0, a1), (b0, b1)) = (self.as_i64(b, vv, *x), self.as_i64(b, vv, *y));
                        let m0 = b.ins().swiden_low(m);
                        let m1 = b.ins().swiden_high(m);
                        VVal::I(b.ins().bitselect(m0, a0, b0), b.ins().bitselect(m1, a1, b1))
                    }
                }
            }
            Op::Call(func, a) if ty == Ty::F32 => {
                let x = f(self, b, a);
                VVal::F(match func {
                    Func::Abs => b.ins().fabs(x),
                    Func::Exp => self.vm.exp(b, x),
                    Func::Exp2 => self.vm.exp2(b, x),
                    Func::Log => self.vm.log(b, x),
                    Func::Log2 => self.vm.log2(b, x),
                    Func::Sqrt => b.ins().sqrt(x),
                    Func::Rsqrt => {
                        let s = b.ins().sqrt(x);
                        let one = self.vm.splat(b, 1.0);
                        b.ins().fdiv(one, s)
                    }
                    Func::Tanh => self.vm.tanh(b, x),
                    Func::TanhApprox => self.vm.tanh_approx(b, x),
                    Func::Sigmoid => self.vm.sigmoid(b, x),
                    Func::Floor => b.ins().floor(x),
                    Func::Ceil => b.ins().ceil(x),
                    Func::Round => b.ins().nearest(x),
                    _ => return None,
                })
            }
            Op::IToF(a) => {
                // Fast path: every lane fits in i32 (cvtdq2ps); else convert lane by lane.
                let (lo, hi) = self.as_i64(b, vv, *a);
                let narrow = self.narrow_mask(b, lo, hi);
                let fast = b.ins().fcvt_from_sint(types::F32X4, narrow);
                if crate::tile::range::int_range(self.k, *a).fits_i32() {
                    // Proven under the shape and position limit (`q - kv`): no check.
                    return Some(VVal::F(fast));
                }
                let w0 = b.ins().swiden_low(narrow);
                let w1 = b.ins().swiden_high(narrow);
                let e0 = b.ins().icmp(IntCC::Equal, w0, lo);
                let e1 = b.ins().icmp(IntCC::Equal, w1, hi);
                let both = b.ins().band(e0, e1);
                let fits = b.ins().vall_true(both);
                let slow_block = b.create_block();
                let merge = b.create_block();
                let result = b.append_block_param(merge, types::F32X4);
                b.ins()
                    .brif(fits, merge, &[BlockArg::Value(fast)], slow_block, &[]);
                b.switch_to_block(slow_block);
                let lanes: Vec<Value> = (0..4u8)
                    .map(|l| {
                        let x = b.ins().extractlane(if l < 2 { lo } else { hi }, l % 2);
                        b.ins().fcvt_from_sint(types::F32, x)
                    })
                    .collect();
                let slow = self.build_f32(b, &lanes);
                b.ins().jump(merge, &[BlockArg::Value(slow)]);
                b.switch_to_block(merge);
                VVal::F(result)
            }
            Op::BToI(a) => {
                let m = self.as_mask(b, vv, *a);
                let lo = b.ins().swiden_low(m);
                let hi = b.ins().swiden_high(m);
                VVal::I(b.ins().ineg(lo), b.ins().ineg(hi))
            }
            _ => return None,
        })
    }

    /// Runs instruction `v` lane by lane with the scalar emitter.
    fn scalarize(
        &mut self,
        b: &mut FunctionBuilder<'_>,
        v: usize,
        vv: &[Option<VVal>],
        here: &Here,
        ts: Value,
    ) -> VVal {
        let inst = &self.k.insts[v];
        let mut deps: Vec<ValueId> = inst.op.operands();
        deps.extend(inst.guard);
        let saved: Vec<(ValueId, Option<Value>)> =
            deps.iter().map(|d| (*d, self.vals[d.0 as usize])).collect();
        let mut lanes = Vec::with_capacity(4);
        for lane in 0..4u8 {
            for d in &deps {
                if let Some(x) = vv[d.0 as usize] {
                    let scalar = match x {
                        VVal::F(x) => b.ins().extractlane(x, lane),
                        VVal::M(m) => {
                            let w = b.ins().extractlane(m, lane);
                            b.ins().icmp_imm_s(IntCC::NotEqual, w, 0)
                        }
                        VVal::I(lo, hi) => b
                            .ins()
                            .extractlane(if lane < 2 { lo } else { hi }, lane % 2),
                    };
                    self.vals[d.0 as usize] = Some(scalar);
                }
            }
            let kv = here.kv.map(|kv| b.ins().iadd_imm_s(kv, i64::from(lane)));
            let t = b.ins().extractlane(ts, lane);
            let h2 = Here {
                kv,
                tile_score: Some(t),
                ..*here
            };
            lanes.push(self.guarded_op(b, v, &h2));
        }
        for (d, x) in saved {
            self.vals[d.0 as usize] = x;
        }
        match inst.ty {
            Ty::F32 => VVal::F(self.build_f32(b, &lanes)),
            Ty::Bool => VVal::M(self.build_mask(b, &lanes)),
            Ty::I64 => self.build_i64(b, &lanes),
        }
    }

    /// The scalar value of instruction `v`, performed only under its guard.
    fn guarded_op(&mut self, b: &mut FunctionBuilder<'_>, v: usize, here: &Here) -> Value {
        let inst = &self.k.insts[v];
        match inst.guard {
            None => self.op(b, v, here),
            Some(g) => {
                let g = self.vals[g.0 as usize].unwrap();
                let ty = clif_ty(inst.ty);
                let then_block = b.create_block();
                let else_block = b.create_block();
                let merge = b.create_block();
                let result = b.append_block_param(merge, ty);
                b.ins().brif(g, then_block, &[], else_block, &[]);
                b.switch_to_block(then_block);
                let x = self.op(b, v, here);
                b.ins().jump(merge, &[BlockArg::Value(x)]);
                b.switch_to_block(else_block);
                let z = self.zero(b, inst.ty);
                b.ins().jump(merge, &[BlockArg::Value(z)]);
                b.switch_to_block(merge);
                result
            }
        }
    }

    /// Emits every instruction of `level` that the given loop runs.
    fn level(&mut self, b: &mut FunctionBuilder<'_>, level: Level, section: Section, here: &Here) {
        self.level_where(b, level, |s| s.runs_in(section), here)
    }

    /// Emits the instructions of `level` whose section passes `pick`.
    fn level_where(
        &mut self,
        b: &mut FunctionBuilder<'_>,
        level: Level,
        pick: impl Fn(Section) -> bool,
        here: &Here,
    ) {
        for v in 0..self.k.insts.len() {
            let inst = &self.k.insts[v];
            if inst.level == level && pick(inst.section) {
                let val = self.guarded_op(b, v, here);
                self.vals[v] = Some(val);
            }
        }
    }

    fn zero(&self, b: &mut FunctionBuilder<'_>, ty: Ty) -> Value {
        match ty {
            Ty::I64 => b.ins().iconst(types::I64, 0),
            Ty::F32 => b.ins().f32const(0.0),
            Ty::Bool => b.ins().iconst(types::I8, 0),
        }
    }

    /// Reports an error: fills the error slot and returns the code.
    fn fail_if(
        &mut self,
        b: &mut FunctionBuilder<'_>,
        bad: Value,
        code: i64,
        v: usize,
        here: &Here,
        index: &[Value],
    ) {
        let fail = b.create_block();
        let cont = b.create_block();
        b.ins().brif(bad, fail, &[], cont, &[]);
        b.switch_to_block(fail);
        let err = self.task_field(b, offset::ERR);
        let c = b.ins().iconst(types::I64, code);
        b.ins().store(flags(), c, err, offset::E_CODE);
        let vid = b.ins().iconst(types::I64, v as i64);
        b.ins().store(flags(), vid, err, offset::E_VALUE);
        let minus = b.ins().iconst(types::I64, -1);
        b.ins()
            .store(flags(), here.q.unwrap_or(minus), err, offset::E_Q);
        b.ins()
            .store(flags(), here.kv.unwrap_or(minus), err, offset::E_KV);
        for (n, x) in index.iter().take(4).enumerate() {
            b.ins()
                .store(flags(), *x, err, offset::E_INDEX + (n * 8) as i32);
        }
        b.ins().return_(&[c]);
        b.switch_to_block(cont);
    }

    fn get(&self, v: ValueId) -> Value {
        self.vals[v.0 as usize].unwrap_or_else(|| panic!("verified IR: {v} is in scope"))
    }

    fn op(&mut self, b: &mut FunctionBuilder<'_>, v: usize, here: &Here) -> Value {
        let inst = &self.k.insts[v];
        let g = |x: &ValueId| self.get(*x);
        match &inst.op {
            Op::IConst(i) => b.ins().iconst(types::I64, *i),
            Op::FConst(x) => b.ins().f32const(*x),
            Op::BConst(x) => b.ins().iconst(types::I8, i64::from(*x)),
            Op::Var(Var::B) => here.b.unwrap(),
            Op::Var(Var::H) => here.h.unwrap(),
            Op::Var(Var::Q) => here.q.expect("verified IR: q at row level or below"),
            Op::Var(Var::Kv) => here.kv.expect("verified IR: kv at column level or below"),
            Op::Shape(s) => {
                let shapes = self.task_field(b, offset::SHAPES);
                let idx = ShapeVar::ALL.iter().position(|x| x == s).unwrap();
                b.ins().load(types::I64, flags(), shapes, (idx * 8) as i32)
            }
            Op::TileScore => here
                .tile_score
                .expect("verified IR: tile_score at element level"),
            Op::Unary(UnOp::INeg, a) => b.ins().ineg(g(a)),
            Op::Unary(UnOp::FNeg, a) => b.ins().fneg(g(a)),
            Op::Unary(UnOp::Not, a) => b.ins().bxor_imm_s(g(a), 1),
            Op::Unary(UnOp::INot, a) => b.ins().bnot(g(a)),
            Op::Binary(op, x, y) => {
                let (x, y) = (g(x), g(y));
                self.binary(b, *op, x, y, v, here)
            }
            Op::Cmp(op, x, y) => {
                let (x, y) = (g(x), g(y));
                if b.func.dfg.value_type(x) == types::F32 {
                    let cc = match op {
                        CmpOp::Eq => FloatCC::Equal,
                        CmpOp::Ne => FloatCC::NotEqual,
                        CmpOp::Lt => FloatCC::LessThan,
                        CmpOp::Le => FloatCC::LessThanOrEqual,
                        CmpOp::Gt => FloatCC::GreaterThan,
                        CmpOp::Ge => FloatCC::GreaterThanOrEqual,
                    };
                    b.ins().fcmp(cc, x, y)
                } else {
                    let cc = match op {
                        CmpOp::Eq => IntCC::Equal,
                        CmpOp::Ne => IntCC::NotEqual,
                        CmpOp::Lt => IntCC::SignedLessThan,
                        CmpOp::Le => IntCC::SignedLessThanOrEqual,
                        CmpOp::Gt => IntCC::SignedGreaterThan,
                        CmpOp::Ge => IntCC::SignedGreaterThanOrEqual,
                    };
                    b.ins().icmp(cc, x, y)
                }
            }
            Op::Select(c, x, y) => {
                let (c, x, y) = (g(c), g(x), g(y));
                b.ins().select(c, x, y)
            }
            Op::Call(f, a) => {
                let x = g(a);
                match f {
                    Func::Abs if inst.ty == Ty::I64 => {
                        let n = b.ins().ineg(x);
                        let neg = b.ins().icmp_imm_s(IntCC::SignedLessThan, x, 0);
                        b.ins().select(neg, n, x)
                    }
                    Func::Abs => b.ins().fabs(x),
                    Func::Exp => self.vm.exp_scalar(b, x),
                    Func::Exp2 => self.vm.exp2_scalar(b, x),
                    Func::Log => self.vm.log_scalar(b, x),
                    Func::Log2 => self.vm.log2_scalar(b, x),
                    Func::Sqrt => b.ins().sqrt(x),
                    Func::Rsqrt => {
                        let s = b.ins().sqrt(x);
                        let one = b.ins().f32const(1.0);
                        b.ins().fdiv(one, s)
                    }
                    Func::Tanh => self.vm.tanh_scalar(b, x),
                    Func::TanhApprox => self.vm.tanh_approx_scalar(b, x),
                    Func::Sigmoid => self.vm.sigmoid_scalar(b, x),
                    Func::Floor => b.ins().floor(x),
                    Func::Ceil => b.ins().ceil(x),
                    Func::Round => b.ins().nearest(x),
                    other => {
                        unreachable!("verified IR: `{}` is lowered to other ops", other.name())
                    }
                }
            }
            Op::IToF(a) => b.ins().fcvt_from_sint(types::F32, g(a)),
            Op::FToI(a) => b.ins().fcvt_to_sint_sat(types::I64, g(a)),
            Op::BToI(a) => b.ins().uextend(types::I64, g(a)),
            Op::Load {
                buffer,
                indices,
                checked,
            } => {
                let idx: Vec<Value> = indices.iter().map(g).collect();
                self.load(b, v, *buffer as usize, &idx, *checked, inst.ty, here)
            }
            Op::Ancestor { parent, i, j } => {
                let (i, j) = (g(i), g(j));
                let bufs = self.task_field(b, offset::BUFS);
                let desc = b
                    .ins()
                    .iadd_imm_s(bufs, *parent as i64 * offset::DESC_BYTES);
                let err = self.task_field(b, offset::ERR);
                let bad = b.ins().iadd_imm_s(err, i64::from(offset::E_INDEX));
                let call = b.ins().call(self.funcs.ancestor, &[desc, i, j, bad]);
                let r = b.inst_results(call)[0];
                let oob = b.ins().icmp_imm_s(IntCC::Equal, r, -code::OUT_OF_RANGE);
                self.fail_if(b, oob, code::OUT_OF_RANGE, v, here, &[]);
                let cyc = b.ins().icmp_imm_s(IntCC::Equal, r, -code::CYCLE);
                self.fail_if(b, cyc, code::CYCLE, v, here, &[]);
                b.ins().ireduce(types::I8, r)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn load(
        &mut self,
        b: &mut FunctionBuilder<'_>,
        v: usize,
        buffer: usize,
        idx: &[Value],
        checked: bool,
        ty: Ty,
        here: &Here,
    ) -> Value {
        let bufs = self.task_field(b, offset::BUFS);
        let base = (buffer as i64 * offset::DESC_BYTES) as i32;
        if checked || self.check_proven {
            let mut bad: Option<Value> = None;
            for (n, &x) in idx.iter().enumerate() {
                let dim = b.ins().load(
                    types::I64,
                    flags(),
                    bufs,
                    base + offset::DESC_DIMS + (n * 8) as i32,
                );
                // Unsigned compare: negative indices are huge.
                let out = b.ins().icmp(IntCC::UnsignedGreaterThanOrEqual, x, dim);
                bad = Some(match bad {
                    None => out,
                    Some(p) => b.ins().bor(p, out),
                });
            }
            if let Some(bad) = bad {
                let code = if checked {
                    code::OUT_OF_RANGE
                } else {
                    code::PROVEN_OUT_OF_RANGE
                };
                self.fail_if(b, bad, code, v, here, idx);
            }
        }
        let mut offset: Option<Value> = None;
        for (n, &x) in idx.iter().enumerate() {
            let stride = b.ins().load(
                types::I64,
                flags(),
                bufs,
                base + offset::DESC_STRIDES + (n * 8) as i32,
            );
            let term = b.ins().imul(x, stride);
            offset = Some(match offset {
                None => term,
                Some(o) => b.ins().iadd(o, term),
            });
        }
        let offset = offset.unwrap_or_else(|| b.ins().iconst(types::I64, 0));
        let data = b
            .ins()
            .load(types::I64, flags(), bufs, base + offset::DESC_DATA);
        let size = match ty {
            Ty::I64 => 8,
            Ty::F32 => 4,
            Ty::Bool => 1,
        };
        let bytes = b.ins().imul_imm_s(offset, size);
        let addr = b.ins().iadd(data, bytes);
        match ty {
            Ty::Bool => {
                let x = b.ins().load(types::I8, flags(), addr, 0);
                b.ins().icmp_imm_s(IntCC::NotEqual, x, 0)
            }
            t => b.ins().load(clif_ty(t), flags(), addr, 0),
        }
    }

    fn binary(
        &mut self,
        b: &mut FunctionBuilder<'_>,
        op: BinOp,
        x: Value,
        y: Value,
        v: usize,
        here: &Here,
    ) -> Value {
        match op {
            BinOp::IAdd => b.ins().iadd(x, y),
            BinOp::ISub => b.ins().isub(x, y),
            BinOp::IMul => b.ins().imul(x, y),
            BinOp::IDiv | BinOp::IRem => {
                let is_zero = b.ins().icmp_imm_s(IntCC::Equal, y, 0);
                self.fail_if(b, is_zero, code::DIV_ZERO, v, here, &[]);
                // x86 traps on i64::MIN / -1: divide by 1 instead and fix up.
                let minus_one = b.ins().icmp_imm_s(IntCC::Equal, y, -1);
                let one = b.ins().iconst(types::I64, 1);
                let safe = b.ins().select(minus_one, one, y);
                let q = b.ins().sdiv(x, safe);
                let r = b.ins().srem(x, safe);
                // Floor: when the remainder is nonzero and its sign differs from the divisor's.
                let sign = b.ins().bxor(r, safe);
                let neg = b.ins().icmp_imm_s(IntCC::SignedLessThan, sign, 0);
                let nz = b.ins().icmp_imm_s(IntCC::NotEqual, r, 0);
                let fix = b.ins().band(neg, nz);
                if op == BinOp::IDiv {
                    let qm = b.ins().iadd_imm_s(q, -1);
                    let fl = b.ins().select(fix, qm, q);
                    let nx = b.ins().ineg(x);
                    b.ins().select(minus_one, nx, fl)
                } else {
                    let rp = b.ins().iadd(r, safe);
                    let fl = b.ins().select(fix, rp, r);
                    let z = b.ins().iconst(types::I64, 0);
                    b.ins().select(minus_one, z, fl)
                }
            }
            BinOp::IShr => b.ins().sshr(x, y),
            BinOp::IAnd => b.ins().band(x, y),
            BinOp::IXor => b.ins().bxor(x, y),
            BinOp::IOr => b.ins().bor(x, y),
            BinOp::IShl | BinOp::ISar => {
                // A count outside 0..=63 (unsigned: negative counts too) fails.
                let bad = b.ins().icmp_imm_s(IntCC::UnsignedGreaterThan, y, 63);
                self.fail_if(b, bad, code::SHIFT, v, here, &[y]);
                if op == BinOp::IShl {
                    b.ins().ishl(x, y)
                } else {
                    b.ins().sshr(x, y)
                }
            }
            BinOp::IMulHiU => b.ins().umulhi(x, y),
            BinOp::IMin => {
                let c = b.ins().icmp(IntCC::SignedLessThan, x, y);
                b.ins().select(c, x, y)
            }
            BinOp::IMax => {
                let c = b.ins().icmp(IntCC::SignedGreaterThan, x, y);
                b.ins().select(c, x, y)
            }
            BinOp::FAdd => b.ins().fadd(x, y),
            BinOp::FSub => b.ins().fsub(x, y),
            BinOp::FMul => b.ins().fmul(x, y),
            BinOp::FDiv => b.ins().fdiv(x, y),
            BinOp::FRem => {
                let q = b.ins().fdiv(x, y);
                let f = b.ins().floor(q);
                let m = b.ins().fmul(y, f);
                b.ins().fsub(x, m)
            }
            // NaN in one operand returns the other (as f32::min / f32::max).
            BinOp::FMin | BinOp::FMax => {
                let cc = if op == BinOp::FMin {
                    FloatCC::LessThan
                } else {
                    FloatCC::GreaterThan
                };
                let c = b.ins().fcmp(cc, x, y);
                let pick = b.ins().select(c, x, y);
                let y_nan = b.ins().fcmp(FloatCC::Unordered, y, y);
                b.ins().select(y_nan, x, pick)
            }
            BinOp::And => b.ins().band(x, y),
            BinOp::Or => b.ins().bor(x, y),
            BinOp::BEq => b.ins().icmp(IntCC::Equal, x, y),
            BinOp::BNe => b.ins().icmp(IntCC::NotEqual, x, y),
        }
    }
}
