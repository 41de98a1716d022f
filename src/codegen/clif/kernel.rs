//! Lowering a loop-IR kernel to one Cranelift function per kernel.
//!
//! Stage: CPU backend. Consumes a verified [`tile::Kernel`]; produces a
//! [`CompiledKernel`] whose task function runs one (b, h, query tile) task:
//! the row-level values of the tile, then the walk over the FULL and PARTIAL
//! key tiles of the block map with, per tile, `qk` (S = scale · Q Kᵀ), the
//! column-level values, the element-level score mod (and mask on PARTIAL
//! tiles), the online-softmax step and `pv`. The tile products and the
//! softmax step are the native or JIT micro-kernels of [`GemmImpl`]; all
//! spec-specific work is generated here. The caller finishes the rows
//! (`out = acc / l`, `lse`) from the scratch the task leaves.
//!
//! The task function is `extern "C" fn(task: *const i64) -> i64`; `task`
//! is laid out as the `T_*` constants say, and the result is 0 or an error
//! code with details in the error slot (`E_*`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, BlockArg, InstBuilder, MemFlagsData, Type, Value};
use cranelift_frontend::FunctionBuilder;

use super::jit::{JitCode, JitModule, JitOptions};
use super::microkernel::{emit_while, GemmImpl, TileFuncs};
use super::vmath::VMath;
use crate::codegen::CodegenError;
use crate::sema::{Func, ShapeVar, Var};
use crate::tile::{BinOp, CmpOp, Kernel, Level, Op, Section, Ty, UnOp, ValueId};

// Task slots (i64 each).
pub const T_B: usize = 0;
pub const T_H: usize = 1;
/// Absolute query position of the tile's first row (row0 + q_offset).
pub const T_QSTART: usize = 2;
pub const T_ROWS: usize = 3;
/// Q tile: `rows` rows of `d` floats, row stride `d`.
pub const T_Q: usize = 4;
/// Packed K of the head (see `runtime::gemm::PackedK`).
pub const T_K: usize = 5;
/// Packed V of the head, and its row stride in floats.
pub const T_V: usize = 6;
pub const T_VSTRIDE: usize = 7;
/// FULL key-tile ranges of this query tile: `n_full` (start, end) u32 pairs.
pub const T_FULL: usize = 8;
pub const T_NFULL: usize = 9;
/// PARTIAL key tiles of this query tile: `n_part` u32.
pub const T_PART: usize = 10;
pub const T_NPART: usize = 11;
pub const T_KVLEN: usize = 12;
pub const T_D: usize = 13;
/// Scratch: S [bq x bkv], m [bq], l [bq], acc [bq x d] (f32).
pub const T_S: usize = 14;
pub const T_M: usize = 15;
pub const T_L: usize = 16;
pub const T_ACC: usize = 17;
/// Row-level values [n_row][bq] and column-level values [n_col][bkv], 8 bytes each.
pub const T_ROWVALS: usize = 18;
pub const T_COLVALS: usize = 19;
/// Error slot: `E_LEN` i64.
pub const T_ERR: usize = 20;
/// Buffer descriptors: `DESC_LEN` i64 per buffer (pointer, 4 dims, 4 strides in elements).
pub const T_BUFS: usize = 21;
/// Shapes B, H, HKV, Q, KV, D.
pub const T_SHAPES: usize = 22;
pub const T_LEN: usize = 23;

pub const DESC_LEN: usize = 9;
/// Error slot: code, value id, q, kv, then up to 4 indices.
pub const E_CODE: usize = 0;
pub const E_VALUE: usize = 1;
pub const E_Q: usize = 2;
pub const E_KV: usize = 3;
pub const E_INDEX: usize = 4;
pub const E_LEN: usize = 8;
pub const ERR_OUT_OF_RANGE: i64 = 1;
pub const ERR_DIV_ZERO: i64 = 2;
pub const ERR_CYCLE: i64 = 3;

/// The symbol of the `ancestor` helper called from generated code.
pub const ANCESTOR_SYMBOL: &str = "attnc_ancestor";

/// `ancestor(parent, i, j)` over a buffer descriptor. Returns 0 or 1, or
/// `-ERR_OUT_OF_RANGE` (with the index in `*bad`) or `-ERR_CYCLE`.
///
/// # Safety
/// `desc` must point at a valid 1-d i64 buffer descriptor and `bad` be writable.
pub unsafe extern "C" fn ancestor_helper(desc: *const i64, i: i64, j: i64, bad: *mut i64) -> i64 {
    if i == j {
        return 1;
    }
    let (data, len, stride) = (*desc as *const i64, *desc.add(1), *desc.add(5));
    let mut x = i;
    for _ in 0..=len {
        if x < 0 || x >= len {
            *bad = x;
            return -ERR_OUT_OF_RANGE;
        }
        x = *data.offset((x * stride) as isize);
        if x < 0 {
            return 0;
        }
        if x == j {
            return 1;
        }
    }
    -ERR_CYCLE
}

/// The task function of a compiled kernel.
pub type TaskFn = unsafe extern "C" fn(task: *const i64) -> i64;

/// Where row- and column-level values live in scratch (by instruction id).
#[derive(Clone, Debug, Default)]
pub struct ValueSlots {
    pub row: HashMap<usize, usize>,
    pub col: HashMap<usize, usize>,
}

/// A kernel compiled for the host CPU.
pub struct CompiledKernel {
    pub kernel: Kernel,
    pub task: TaskFn,
    pub slots: ValueSlots,
    pub gemm: GemmImpl,
    pub compile_time: Duration,
    pub clif: Option<String>,
    _code: Arc<JitCode>,
}

impl std::fmt::Debug for CompiledKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledKernel").field("name", &self.kernel.name).field("gemm", &self.gemm.name()).finish()
    }
}

/// Compiles `kernel` with the tile products of `gemm`.
pub fn compile(kernel: &Kernel, gemm: GemmImpl, options: &JitOptions) -> Result<CompiledKernel, CodegenError> {
    let start = Instant::now();
    if kernel.schedule.bkv % 16 != 0 {
        return Err(CodegenError::Isa(format!(
            "the CPU backend needs key tiles that are a multiple of 16 (packed K panels), found bkv = {}",
            kernel.schedule.bkv
        )));
    }
    let mut symbols = gemm.symbols().map_err(|e| CodegenError::Isa(e.to_string()))?;
    symbols.push((ANCESTOR_SYMBOL, ancestor_helper as *const u8));
    let mut jit = JitModule::new(options, &symbols)?;
    let tiles = gemm.declare_in(&mut jit)?;
    let p = jit.pointer_type();
    let anc_sig = jit.signature(&[p, types::I64, types::I64, p], &[types::I64]);
    let ancestor = jit.declare_import(ANCESTOR_SYMBOL, &anc_sig)?;
    let sig = jit.signature(&[p], &[types::I64]);
    let name = format!("attnc_task_{}", kernel.name);
    let id = jit.declare_function(&name, &sig)?;
    let mut slots = ValueSlots::default();
    for (i, inst) in kernel.insts.iter().enumerate() {
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
            let qk = refs.func_ref(b, tiles.qk);
            let pv = refs.func_ref(b, tiles.pv);
            let sm = refs.func_ref(b, tiles.softmax_update);
            let anc = refs.func_ref(b, ancestor);
            let funcs = Funcs { qk, pv, softmax: sm, ancestor: anc, _tiles: tiles };
            let mut e = Emitter { k: kernel, vm: VMath::new(has_fma), ptr: p, slots: &slots, funcs, vals: vec![None; kernel.insts.len()], task: None };
            e.body(b);
            Ok(())
        })?;
        info.clif.clone()
    };
    let code = Arc::new(jit.finalize()?);
    // SAFETY: the function was generated with the signature `fn(*const i64) -> i64`.
    let task: TaskFn = unsafe { code.function(&name)? };
    Ok(CompiledKernel { kernel: kernel.clone(), task, slots, gemm, compile_time: start.elapsed(), clif, _code: code })
}

struct Funcs {
    qk: cranelift_codegen::ir::FuncRef,
    pv: cranelift_codegen::ir::FuncRef,
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
    task: Option<Value>,
}

fn flags() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

fn clif_ty(t: Ty) -> Type {
    match t {
        Ty::I64 => types::I64,
        Ty::F32 => types::F32,
        Ty::Bool => types::I8,
    }
}

impl Emitter<'_> {
    fn task_field(&self, b: &mut FunctionBuilder<'_>, slot: usize) -> Value {
        b.ins().load(types::I64, flags(), self.task.unwrap(), (slot * 8) as i32)
    }

    fn body(&mut self, b: &mut FunctionBuilder<'_>) {
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        self.task = Some(b.block_params(entry)[0]);
        let k = self.k;
        let bq = k.schedule.bq as i64;
        let bkv = k.schedule.bkv as i64;
        let bv = self.task_field(b, T_B);
        let hv = self.task_field(b, T_H);
        let mut here = Here { b: Some(bv), h: Some(hv), ..Here::default() };
        self.level(b, Level::Call, Section::Shared, &here);
        self.level(b, Level::Head, Section::Shared, &here);
        let q_start = self.task_field(b, T_QSTART);
        let rows = self.task_field(b, T_ROWS);
        let rowvals = self.task_field(b, T_ROWVALS);
        let colvals = self.task_field(b, T_COLVALS);
        // Row-level values, once per row.
        let zero = b.ins().iconst(types::I64, 0);
        if !self.slots.row.is_empty() {
            emit_while(
                b,
                &[zero],
                |b, v| b.ins().icmp(IntCC::SignedLessThan, v[0], rows),
                |b, v| {
                    let i = v[0];
                    let q = b.ins().iadd(q_start, i);
                    let h2 = Here { q: Some(q), ..here };
                    self.level(b, Level::Row, Section::Shared, &h2);
                    self.store_slots(b, Level::Row, rowvals, bq, i);
                    vec![b.ins().iadd_imm_s(i, 1)]
                },
            );
        }
        let prescale = self.vals[k.q_prescale.0 as usize].unwrap();
        // FULL tiles: ranges of (start, end).
        let full = self.task_field(b, T_FULL);
        let n_full = self.task_field(b, T_NFULL);
        emit_while(
            b,
            &[zero],
            |b, v| b.ins().icmp(IntCC::SignedLessThan, v[0], n_full),
            |b, v| {
                let r = v[0];
                let off = b.ins().imul_imm_s(r, 8);
                let addr = b.ins().iadd(full, off);
                let start = b.ins().uload32(flags(), addr, 0);
                let end = b.ins().uload32(flags(), addr, 4);
                emit_while(
                    b,
                    &[start],
                    |b, t| b.ins().icmp(IntCC::SignedLessThan, t[0], end),
                    |b, t| {
                        self.tile(b, t[0], Section::Full, &mut here, q_start, rows, rowvals, colvals, prescale, bq, bkv);
                        vec![b.ins().iadd_imm_s(t[0], 1)]
                    },
                );
                vec![b.ins().iadd_imm_s(r, 1)]
            },
        );
        let part = self.task_field(b, T_PART);
        let n_part = self.task_field(b, T_NPART);
        emit_while(
            b,
            &[zero],
            |b, v| b.ins().icmp(IntCC::SignedLessThan, v[0], n_part),
            |b, v| {
                let r = v[0];
                let off = b.ins().imul_imm_s(r, 4);
                let addr = b.ins().iadd(part, off);
                let kt = b.ins().uload32(flags(), addr, 0);
                self.tile(b, kt, Section::Partial, &mut here, q_start, rows, rowvals, colvals, prescale, bq, bkv);
                vec![b.ins().iadd_imm_s(r, 1)]
            },
        );
        let ok = b.ins().iconst(types::I64, 0);
        b.ins().return_(&[ok]);
    }

    /// Stores the values of `level` into their scratch slots at position `i`.
    fn store_slots(&mut self, b: &mut FunctionBuilder<'_>, level: Level, base: Value, stride: i64, i: Value) {
        let slots = if level == Level::Row { &self.slots.row } else { &self.slots.col };
        let mut list: Vec<(usize, usize)> = slots.iter().map(|(&v, &s)| (v, s)).collect();
        list.sort();
        for (v, s) in list {
            let Some(val) = self.vals[v] else { continue };
            let idx = b.ins().iadd_imm_s(i, s as i64 * stride);
            let off = b.ins().imul_imm_s(idx, 8);
            let addr = b.ins().iadd(base, off);
            b.ins().store(flags(), val, addr, 0);
        }
    }

    /// Reloads the values of `level` (for the given loop) from scratch position `i`.
    fn load_slots(&mut self, b: &mut FunctionBuilder<'_>, level: Level, section: Section, base: Value, stride: i64, i: Value) {
        let slots = if level == Level::Row { &self.slots.row } else { &self.slots.col };
        let mut list: Vec<(usize, usize)> = slots.iter().map(|(&v, &s)| (v, s)).collect();
        list.sort();
        for (v, s) in list {
            let inst = &self.k.insts[v];
            if !(inst.section == Section::Shared || inst.section == section) {
                continue;
            }
            let idx = b.ins().iadd_imm_s(i, s as i64 * stride);
            let off = b.ins().imul_imm_s(idx, 8);
            let addr = b.ins().iadd(base, off);
            self.vals[v] = Some(b.ins().load(clif_ty(inst.ty), flags(), addr, 0));
        }
    }

    /// One key tile: qk, column values, element code, softmax step, pv.
    #[allow(clippy::too_many_arguments)]
    fn tile(
        &mut self,
        b: &mut FunctionBuilder<'_>,
        kt: Value,
        section: Section,
        here: &mut Here,
        q_start: Value,
        rows: Value,
        rowvals: Value,
        colvals: Value,
        prescale: Value,
        bq: i64,
        bkv: i64,
    ) {
        let k = self.k;
        let p = self.ptr;
        let col0 = b.ins().imul_imm_s(kt, bkv);
        let kv_len = self.task_field(b, T_KVLEN);
        let left = b.ins().isub(kv_len, col0);
        let bkv_v = b.ins().iconst(types::I64, bkv);
        let lt = b.ins().icmp(IntCC::SignedLessThan, left, bkv_v);
        let cols = b.ins().select(lt, left, bkv_v);
        let d = self.task_field(b, T_D);
        let q = self.task_field(b, T_Q);
        let kp = self.task_field(b, T_K);
        let s = self.task_field(b, T_S);
        // K panel of the tile's first key: col0 * d floats in (col0 is a multiple of 16).
        let koff = b.ins().imul(col0, d);
        let koff = b.ins().imul_imm_s(koff, 4);
        let kaddr = b.ins().iadd(kp, koff);
        let s_stride = b.ins().iconst(p, bkv);
        b.ins().call(self.funcs.qk, &[q, d, kaddr, d, rows, cols, s, s_stride, prescale]);
        // Column-level values.
        let has_cols = self.slots.col.keys().any(|&v| {
            let i = &k.insts[v];
            i.section == Section::Shared || i.section == section
        });
        if has_cols {
            let zero = b.ins().iconst(types::I64, 0);
            emit_while(
                b,
                &[zero],
                |b, v| b.ins().icmp(IntCC::SignedLessThan, v[0], cols),
                |b, v| {
                    let j = v[0];
                    let kv = b.ins().iadd(col0, j);
                    let h2 = Here { kv: Some(kv), ..*here };
                    self.level(b, Level::Col, section, &h2);
                    self.store_slots(b, Level::Col, colvals, bkv, j);
                    vec![b.ins().iadd_imm_s(j, 1)]
                },
            );
        }
        // Element-level code, unless the tile's score is the raw tile score.
        let score = if section == Section::Full { k.score_full } else { k.score_partial };
        let needs_elem = section == Section::Partial && k.mask.is_some() || k.inst(score).op != Op::TileScore;
        if needs_elem {
            let zero = b.ins().iconst(types::I64, 0);
            emit_while(
                b,
                &[zero],
                |b, v| b.ins().icmp(IntCC::SignedLessThan, v[0], rows),
                |b, v| {
                    let i = v[0];
                    let q = b.ins().iadd(q_start, i);
                    self.load_slots(b, Level::Row, section, rowvals, bq, i);
                    let row_off = b.ins().imul_imm_s(i, bkv * 4);
                    let srow = b.ins().iadd(s, row_off);
                    emit_while(
                        b,
                        &[zero],
                        |b, w| b.ins().icmp(IntCC::SignedLessThan, w[0], cols),
                        |b, w| {
                            let j = w[0];
                            let kv = b.ins().iadd(col0, j);
                            self.load_slots(b, Level::Col, section, colvals, bkv, j);
                            let off = b.ins().imul_imm_s(j, 4);
                            let addr = b.ins().iadd(srow, off);
                            let ts = b.ins().load(types::F32, flags(), addr, 0);
                            let h2 = Here { q: Some(q), kv: Some(kv), tile_score: Some(ts), ..*here };
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
                            vec![b.ins().iadd_imm_s(j, 1)]
                        },
                    );
                    vec![b.ins().iadd_imm_s(i, 1)]
                },
            );
        }
        let m = self.task_field(b, T_M);
        let l = self.task_field(b, T_L);
        let acc = self.task_field(b, T_ACC);
        let base2 = b.ins().iconst(types::I32, i64::from(k.schedule.exp2));
        b.ins().call(self.funcs.softmax, &[s, s_stride, rows, cols, m, l, acc, d, d, base2]);
        let vp = self.task_field(b, T_V);
        let vstride = self.task_field(b, T_VSTRIDE);
        let voff = b.ins().imul(col0, vstride);
        let voff = b.ins().imul_imm_s(voff, 4);
        let vaddr = b.ins().iadd(vp, voff);
        b.ins().call(self.funcs.pv, &[s, s_stride, vaddr, vstride, d, rows, cols, acc, d]);
    }

    /// Emits every instruction of `level` that the given loop runs.
    fn level(&mut self, b: &mut FunctionBuilder<'_>, level: Level, section: Section, here: &Here) {
        for v in 0..self.k.insts.len() {
            let inst = &self.k.insts[v];
            if inst.level == level && (inst.section == Section::Shared || inst.section == section) {
                let val = match inst.guard {
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
                };
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
    fn fail_if(&mut self, b: &mut FunctionBuilder<'_>, bad: Value, code: i64, v: usize, here: &Here, index: &[Value]) {
        let fail = b.create_block();
        let cont = b.create_block();
        b.ins().brif(bad, fail, &[], cont, &[]);
        b.switch_to_block(fail);
        let err = self.task_field(b, T_ERR);
        let c = b.ins().iconst(types::I64, code);
        b.ins().store(flags(), c, err, (E_CODE * 8) as i32);
        let vid = b.ins().iconst(types::I64, v as i64);
        b.ins().store(flags(), vid, err, (E_VALUE * 8) as i32);
        let minus = b.ins().iconst(types::I64, -1);
        b.ins().store(flags(), here.q.unwrap_or(minus), err, (E_Q * 8) as i32);
        b.ins().store(flags(), here.kv.unwrap_or(minus), err, (E_KV * 8) as i32);
        for (n, x) in index.iter().take(4).enumerate() {
            b.ins().store(flags(), *x, err, ((E_INDEX + n) * 8) as i32);
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
                let shapes = self.task_field(b, T_SHAPES);
                let idx = ShapeVar::ALL.iter().position(|x| x == s).unwrap();
                b.ins().load(types::I64, flags(), shapes, (idx * 8) as i32)
            }
            Op::TileScore => here.tile_score.expect("verified IR: tile_score at element level"),
            Op::Unary(UnOp::INeg, a) => b.ins().ineg(g(a)),
            Op::Unary(UnOp::FNeg, a) => b.ins().fneg(g(a)),
            Op::Unary(UnOp::Not, a) => b.ins().bxor_imm_s(g(a), 1),
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
                    Func::Sigmoid => self.vm.sigmoid_scalar(b, x),
                    Func::Floor => b.ins().floor(x),
                    Func::Ceil => b.ins().ceil(x),
                    Func::Round => b.ins().nearest(x),
                    other => unreachable!("verified IR: `{}` is lowered to other ops", other.name()),
                }
            }
            Op::IToF(a) => b.ins().fcvt_from_sint(types::F32, g(a)),
            Op::FToI(a) => b.ins().fcvt_to_sint_sat(types::I64, g(a)),
            Op::BToI(a) => b.ins().uextend(types::I64, g(a)),
            Op::Load { buffer, indices, checked } => {
                let idx: Vec<Value> = indices.iter().map(g).collect();
                self.load(b, v, *buffer as usize, &idx, *checked, inst.ty, here)
            }
            Op::Ancestor { parent, i, j } => {
                let (i, j) = (g(i), g(j));
                let bufs = self.task_field(b, T_BUFS);
                let desc = b.ins().iadd_imm_s(bufs, (*parent as usize * DESC_LEN * 8) as i64);
                let err = self.task_field(b, T_ERR);
                let bad = b.ins().iadd_imm_s(err, (E_INDEX * 8) as i64);
                let call = b.ins().call(self.funcs.ancestor, &[desc, i, j, bad]);
                let r = b.inst_results(call)[0];
                let oob = b.ins().icmp_imm_s(IntCC::Equal, r, -ERR_OUT_OF_RANGE);
                self.fail_if(b, oob, ERR_OUT_OF_RANGE, v, here, &[]);
                let cyc = b.ins().icmp_imm_s(IntCC::Equal, r, -ERR_CYCLE);
                self.fail_if(b, cyc, ERR_CYCLE, v, here, &[]);
                b.ins().ireduce(types::I8, r)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn load(&mut self, b: &mut FunctionBuilder<'_>, v: usize, buffer: usize, idx: &[Value], checked: bool, ty: Ty, here: &Here) -> Value {
        let bufs = self.task_field(b, T_BUFS);
        let base = (buffer * DESC_LEN * 8) as i32;
        if checked {
            let mut bad: Option<Value> = None;
            for (n, &x) in idx.iter().enumerate() {
                let dim = b.ins().load(types::I64, flags(), bufs, base + ((1 + n) * 8) as i32);
                // Unsigned compare: negative indices are huge.
                let out = b.ins().icmp(IntCC::UnsignedGreaterThanOrEqual, x, dim);
                bad = Some(match bad {
                    None => out,
                    Some(p) => b.ins().bor(p, out),
                });
            }
            if let Some(bad) = bad {
                self.fail_if(b, bad, ERR_OUT_OF_RANGE, v, here, idx);
            }
        }
        let mut offset: Option<Value> = None;
        for (n, &x) in idx.iter().enumerate() {
            let stride = b.ins().load(types::I64, flags(), bufs, base + ((5 + n) * 8) as i32);
            let term = b.ins().imul(x, stride);
            offset = Some(match offset {
                None => term,
                Some(o) => b.ins().iadd(o, term),
            });
        }
        let offset = offset.unwrap_or_else(|| b.ins().iconst(types::I64, 0));
        let data = b.ins().load(types::I64, flags(), bufs, base);
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

    fn binary(&mut self, b: &mut FunctionBuilder<'_>, op: BinOp, x: Value, y: Value, v: usize, here: &Here) -> Value {
        match op {
            BinOp::IAdd => b.ins().iadd(x, y),
            BinOp::ISub => b.ins().isub(x, y),
            BinOp::IMul => b.ins().imul(x, y),
            BinOp::IDiv | BinOp::IRem => {
                let is_zero = b.ins().icmp_imm_s(IntCC::Equal, y, 0);
                self.fail_if(b, is_zero, ERR_DIV_ZERO, v, here, &[]);
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
                let cc = if op == BinOp::FMin { FloatCC::LessThan } else { FloatCC::GreaterThan };
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

