//! Lowering a checked spec under a schedule into the loop IR.
//!
//! Params become constants, `&&`/`||`/`if` become non-short-circuit bool ops
//! and selects whose trapping operations (range-checked loads, `ancestor`,
//! integer division by a value that may be zero) carry the condition under
//! which the spec evaluates them as a guard. The score on PARTIAL tiles is
//! additionally guarded by the mask, because the score mod is only evaluated
//! where the mask allows.

use std::collections::HashMap;

use super::builder::{Builder, KernelDecls, KernelRoots};
use super::ir::*;
use crate::sema::{BinaryOp, Expr, ExprId, Func, ShapeVar, Spec, Type, UnaryOp, Value};

/// Lowers `spec` under `schedule`, without optimisations.
pub fn build(spec: &Spec, schedule: &Schedule) -> Kernel {
    let mut lower = Lower {
        spec,
        schedule,
        b: Builder::for_rows(schedule.rows),
        memo: HashMap::new(),
        conj_parent: HashMap::new(),
        must: HashMap::new(),
        score: None,
        may_trap: spec.may_trap(),
    };
    let scale = match spec.scale {
        Some(s) => {
            let v = lower.expr(s, None);
            lower.cast_to_float(v)
        }
        None => {
            let d = lower.shape(ShapeVar::D);
            let df = lower.b.add(Op::IToF(d), Ty::F32, None, None);
            lower.b.add(Op::Call(Func::Rsqrt, df), Ty::F32, None, None)
        }
    };
    let q_prescale = if schedule.exp2 {
        let log2e = lower.b.fconst(std::f32::consts::LOG2_E);
        lower.b.binary(BinOp::FMul, scale, log2e)
    } else {
        scale
    };
    let tile = lower.b.add(Op::TileScore, Ty::F32, None, None);
    // The score the mod sees is in natural-log units.
    lower.score = Some(if schedule.exp2 {
        let ln2 = lower.b.fconst(std::f32::consts::LN_2);
        lower.b.binary(BinOp::FMul, tile, ln2)
    } else {
        tile
    });
    let traps = |b: &Builder, from: usize| -> Vec<ValueId> {
        (from..b.insts.len())
            .filter(|&i| b.insts[i].op.may_trap(|c| b.const_int(c)))
            .map(|i| ValueId(i as u32))
            .collect()
    };
    let start = lower.b.insts.len();
    let mask = spec.mask.map(|m| lower.expr(m, None));
    let mask_effects = traps(&lower.b, start);
    let score_in_exp_units = |lower: &mut Lower, guard: Option<ValueId>| match spec.score {
        None => tile,
        Some(s) => {
            let v = lower.expr(s, guard);
            let v = lower.cast_to_float(v);
            if schedule.exp2 {
                let log2e = lower.b.fconst(std::f32::consts::LOG2_E);
                lower.b.binary(BinOp::FMul, v, log2e)
            } else {
                v
            }
        }
    };
    // What the FULL score lowers unguarded is evaluated on FULL tiles only; the
    // PARTIAL score must not reuse it (it would then run where the mask is
    // false), so it starts again from what the mask lowered.
    let after_mask = lower.memo.clone();
    let start = lower.b.insts.len();
    let score_full = score_in_exp_units(&mut lower, None);
    let effects_full = traps(&lower.b, start);
    lower.memo = after_mask;
    let start = lower.b.insts.len();
    let score_partial = score_in_exp_units(&mut lower, mask);
    let mut effects_partial = mask_effects;
    effects_partial.extend(traps(&lower.b, start));
    let roots = KernelRoots {
        scale,
        q_prescale,
        mask,
        score_full,
        score_partial,
        effects_full,
        effects_partial,
    };
    let (insts, spans, roots) = lower.b.finish(roots);
    let params = spec
        .params
        .iter()
        .map(|p| (p.name.clone(), p.value.to_string()))
        .collect();
    let buffers = spec
        .buffers
        .iter()
        .map(|b| BufferDecl {
            name: b.name.clone(),
            elem: ty_of(b.elem),
            dims: b.dims.clone(),
        })
        .collect();
    let decls = KernelDecls {
        name: spec.name.clone(),
        schedule: *schedule,
        params,
        buffers,
    };
    Kernel::from_parts(decls, insts, spans, roots)
}

pub fn ty_of(t: Type) -> Ty {
    match t {
        Type::Int => Ty::I64,
        Type::Float => Ty::F32,
        Type::Bool => Ty::Bool,
    }
}

struct Lower<'a> {
    spec: &'a Spec,
    schedule: &'a Schedule,
    b: Builder,
    /// (expression, guard) to value: the same expression under another guard
    /// is lowered again, since its trapping operations differ.
    /// The guards each expression has been lowered under. A lowering under a
    /// weaker guard serves a stronger one: an operation that is evaluated
    /// whenever `g` holds is also evaluated whenever `g && c` does. This keeps
    /// a let that is used in the condition of an `if` and in its branches one
    /// value instead of three, level after level.
    memo: HashMap<ExprId, Vec<(Option<ValueId>, ValueId)>>,
    /// Each guard `g && c` made by [`Lower::and_guard`], to its `g`.
    conj_parent: HashMap<ValueId, Option<ValueId>>,
    /// Per expression, the trapping expressions evaluated whenever it is (see
    /// [`Lower::must`]), as bit sets over expression ids.
    must: HashMap<ExprId, std::rc::Rc<Vec<u64>>>,
    score: Option<ValueId>,
    /// Per expression: whether its subtree holds an operation that may trap.
    /// Only those depend on the guard they are lowered under; the rest are
    /// lowered once, so a let used under many conditions stays one value.
    may_trap: Vec<bool>,
}

/// The members of a bit set, in increasing order.
fn bits(set: &[u64]) -> impl Iterator<Item = usize> + '_ {
    set.iter().enumerate().flat_map(|(w, &word)| {
        (0..64)
            .filter(move |b| word >> b & 1 == 1)
            .map(move |b| w * 64 + b)
    })
}

impl Lower<'_> {
    fn shape(&mut self, s: ShapeVar) -> ValueId {
        match (s, self.schedule.dim) {
            (ShapeVar::D, Some(d)) => self.b.iconst(d as i64),
            _ => self.b.add(Op::Shape(s), Ty::I64, None, None),
        }
    }

    fn cast_to_float(&mut self, v: ValueId) -> ValueId {
        match self.b.ty(v) {
            Ty::F32 => v,
            Ty::I64 => self.b.add(Op::IToF(v), Ty::F32, None, None),
            Ty::Bool => {
                let i = self.b.add(Op::BToI(v), Ty::I64, None, None);
                self.b.add(Op::IToF(i), Ty::F32, None, None)
            }
        }
    }

    fn not(&mut self, v: ValueId) -> ValueId {
        self.b.add(Op::Unary(UnOp::Not, v), Ty::Bool, None, None)
    }

    fn expr(&mut self, id: ExprId, guard: Option<ValueId>) -> ValueId {
        // A subtree that cannot trap computes the same value under any guard.
        let guard = guard.filter(|_| self.may_trap[id.0 as usize]);
        if let Some(done) = self.memo.get(&id) {
            if let Some(&(_, v)) = done.iter().find(|(g, _)| self.implies(guard, *g)) {
                return v;
            }
        }
        let v = self.compute(id, guard);
        self.memo.entry(id).or_default().push((guard, v));
        v
    }

    /// The trapping expressions evaluated whenever `id` is: `id` itself, what
    /// its operands evaluate unconditionally, the condition of an `if` and what
    /// both its branches evaluate, the left side of `&&` and `||`. `None` when
    /// the spec has too many expressions for the bit sets (then the branches of
    /// an `if` are lowered on their own).
    fn must(&mut self, id: ExprId) -> Option<std::rc::Rc<Vec<u64>>> {
        // At most 2^14 expressions: 32 MiB of sets in the worst case.
        const MAX_EXPRS: usize = 1 << 14;
        let n = self.spec.exprs.len();
        if n > MAX_EXPRS {
            return None;
        }
        if let Some(m) = self.must.get(&id) {
            return Some(m.clone());
        }
        // Iteratively, operands first: let chains can be thousands deep.
        let mut stack = vec![(id, false)];
        while let Some((e, ready)) = stack.pop() {
            if self.must.contains_key(&e) {
                continue;
            }
            let ops = self.spec.expr(e).operands();
            if !ready {
                stack.push((e, true));
                stack.extend(
                    ops.iter()
                        .filter(|o| !self.must.contains_key(o))
                        .map(|&o| (o, false)),
                );
                continue;
            }
            let mut set = vec![0u64; n.div_ceil(64)];
            let union =
                |set: &mut Vec<u64>, o: &[u64]| set.iter_mut().zip(o).for_each(|(a, b)| *a |= b);
            match self.spec.expr(e) {
                Expr::Select {
                    cond,
                    then,
                    otherwise,
                } => {
                    union(&mut set, &self.must[cond]);
                    let (t, o) = (&self.must[then], &self.must[otherwise]);
                    set.iter_mut()
                        .zip(t.iter().zip(o.iter()))
                        .for_each(|(a, (x, y))| *a |= x & y);
                }
                Expr::Binary(BinaryOp::And | BinaryOp::Or, a, _) => union(&mut set, &self.must[a]),
                _ => {
                    for o in &ops {
                        union(&mut set, &self.must[o]);
                    }
                }
            }
            if self.may_trap[e.0 as usize] {
                set[e.0 as usize / 64] |= 1 << (e.0 % 64);
            }
            self.must.insert(e, std::rc::Rc::new(set));
        }
        self.must.get(&id).cloned()
    }

    /// `guard && cond`, remembering the conjunction for [`Lower::implies`].
    fn and_guard(&mut self, guard: Option<ValueId>, cond: ValueId) -> Option<ValueId> {
        let g = self.b.and_guard(guard, cond);
        if let Some(g) = g {
            self.conj_parent.entry(g).or_insert(guard);
        }
        g
    }

    /// Whether `strong` implies `weak`: `weak` is true (`None`), or `strong`
    /// is `weak` with conditions added by [`Lower::and_guard`].
    fn implies(&self, strong: Option<ValueId>, weak: Option<ValueId>) -> bool {
        let Some(weak) = weak else { return true };
        let mut cur = strong;
        while let Some(g) = cur {
            if g == weak {
                return true;
            }
            cur = self.conj_parent.get(&g).copied().flatten();
        }
        false
    }

    fn compute(&mut self, id: ExprId, guard: Option<ValueId>) -> ValueId {
        let spec = self.spec;
        let span = Some(spec.span(id));
        let ty = ty_of(spec.ty(id));
        match spec.expr(id) {
            Expr::Const(Value::Int(i)) => self.b.iconst(*i),
            Expr::Const(Value::Float(x)) => self.b.fconst(*x as f32),
            Expr::Const(Value::Bool(x)) => self.b.bconst(*x),
            Expr::Param(p) => match spec.param(*p).value {
                Value::Int(i) => self.b.iconst(i),
                Value::Float(x) => self.b.fconst(x as f32),
                Value::Bool(x) => self.b.bconst(x),
            },
            Expr::Var(v) => self.b.add(Op::Var(*v), Ty::I64, None, None),
            Expr::Shape(s) => self.shape(*s),
            Expr::Score => self
                .score
                .expect("score is lowered after the tile score exists"),
            Expr::Unary(UnaryOp::Not, a) => {
                let a = self.expr(*a, guard);
                self.not(a)
            }
            Expr::Unary(UnaryOp::BitNot, a) => {
                let a = self.expr(*a, guard);
                self.b.add(Op::Unary(UnOp::INot, a), Ty::I64, None, None)
            }
            Expr::Unary(UnaryOp::Neg, a) => {
                let a = self.expr(*a, guard);
                let op = if ty == Ty::I64 {
                    UnOp::INeg
                } else {
                    UnOp::FNeg
                };
                self.b.add(Op::Unary(op, a), ty, None, None)
            }
            Expr::Binary(BinaryOp::And, a, c) => {
                let a = self.expr(*a, guard);
                let g = self.and_guard(guard, a);
                let c = self.expr(*c, g);
                self.b.binary(BinOp::And, a, c)
            }
            Expr::Binary(BinaryOp::Or, a, c) => {
                let a = self.expr(*a, guard);
                let na = self.not(a);
                let g = self.and_guard(guard, na);
                let c = self.expr(*c, g);
                self.b.binary(BinOp::Or, a, c)
            }
            Expr::Binary(op, a, c) => {
                let operand_ty = ty_of(spec.ty(*a));
                let (a, c) = (self.expr(*a, guard), self.expr(*c, guard));
                if op.is_comparison() {
                    if operand_ty == Ty::Bool {
                        let bop = if *op == BinaryOp::Eq {
                            BinOp::BEq
                        } else {
                            BinOp::BNe
                        };
                        return self.b.binary(bop, a, c);
                    }
                    let cmp = match op {
                        BinaryOp::Eq => CmpOp::Eq,
                        BinaryOp::Ne => CmpOp::Ne,
                        BinaryOp::Lt => CmpOp::Lt,
                        BinaryOp::Le => CmpOp::Le,
                        BinaryOp::Gt => CmpOp::Gt,
                        _ => CmpOp::Ge,
                    };
                    return self.b.add(Op::Cmp(cmp, a, c), Ty::Bool, None, None);
                }
                let int = operand_ty == Ty::I64;
                let bop = match (op, int) {
                    (BinaryOp::Add, true) => BinOp::IAdd,
                    (BinaryOp::Sub, true) => BinOp::ISub,
                    (BinaryOp::Mul, true) => BinOp::IMul,
                    (BinaryOp::Div, true) => BinOp::IDiv,
                    (BinaryOp::Rem, true) => BinOp::IRem,
                    (BinaryOp::Add, false) => BinOp::FAdd,
                    (BinaryOp::Sub, false) => BinOp::FSub,
                    (BinaryOp::Mul, false) => BinOp::FMul,
                    (BinaryOp::Div, false) => BinOp::FDiv,
                    (BinaryOp::Rem, false) => BinOp::FRem,
                    (BinaryOp::BitAnd, _) => BinOp::IAnd,
                    (BinaryOp::BitOr, _) => BinOp::IOr,
                    (BinaryOp::BitXor, _) => BinOp::IXor,
                    (BinaryOp::Shl | BinaryOp::Shr, _) => {
                        // `x >> c` by a constant count in range cannot fail:
                        // the unchecked `ishr`, which the vector code knows.
                        // `x << c` stays `ishl` even then: the range proofs
                        // take index arithmetic not to wrap, and a left shift
                        // is where bits are meant to leave (`kv << 61`), so
                        // its result is opaque to them.
                        match self.b.const_int(c).filter(|n| (0..=63).contains(n)) {
                            Some(_) if *op == BinaryOp::Shr => {
                                return self.b.add(Op::Binary(BinOp::IShr, a, c), ty, None, None)
                            }
                            _ if *op == BinaryOp::Shl => BinOp::IShl,
                            _ => BinOp::ISar,
                        }
                    }
                    _ => unreachable!("logical and comparison ops handled above"),
                };
                self.b.add(Op::Binary(bop, a, c), ty, guard, span)
            }
            Expr::Select {
                cond,
                then,
                otherwise,
            } => {
                let c = self.expr(*cond, guard);
                // What both branches evaluate is evaluated whenever the `if` is:
                // lowered once under its guard, the branches reuse it (one
                // lowering per branch would double at every level of a chain).
                if guard.is_some()
                    && self.may_trap[then.0 as usize]
                    && self.may_trap[otherwise.0 as usize]
                {
                    if let (Some(t), Some(e)) = (self.must(*then), self.must(*otherwise)) {
                        let shared: Vec<ExprId> = bits(&t)
                            .filter(|&i| e[i / 64] >> (i % 64) & 1 == 1)
                            .map(|i| ExprId(i as u32))
                            .collect();
                        for id in shared {
                            self.expr(id, guard);
                        }
                    }
                }
                let g_then = self.and_guard(guard, c);
                let t = self.expr(*then, g_then);
                let nc = self.not(c);
                let g_else = self.and_guard(guard, nc);
                let e = self.expr(*otherwise, g_else);
                self.b.add(Op::Select(c, t, e), ty, None, None)
            }
            Expr::Call(f, args) => {
                let args: Vec<ValueId> = args.iter().map(|a| self.expr(*a, guard)).collect();
                let int = ty == Ty::I64;
                let (min, max) = if int {
                    (BinOp::IMin, BinOp::IMax)
                } else {
                    (BinOp::FMin, BinOp::FMax)
                };
                match f {
                    Func::Min => self.b.binary(min, args[0], args[1]),
                    Func::Max => self.b.binary(max, args[0], args[1]),
                    Func::Clamp => {
                        let lo = self.b.binary(max, args[0], args[1]);
                        self.b.binary(min, lo, args[2])
                    }
                    Func::Float => self.cast_to_float(args[0]),
                    Func::Int => match self.b.ty(args[0]) {
                        Ty::F32 => self.b.add(Op::FToI(args[0]), Ty::I64, None, None),
                        Ty::Bool => self.b.add(Op::BToI(args[0]), Ty::I64, None, None),
                        Ty::I64 => args[0],
                    },
                    f => match super::math::lower(&mut self.b, *f, &args) {
                        Some(v) => v,
                        None => self.b.add(Op::Call(*f, args[0]), ty, None, None),
                    },
                }
            }
            Expr::Load { buffer, indices } => {
                let idx = indices.iter().map(|i| self.expr(*i, guard)).collect();
                self.b.add(
                    Op::Load {
                        buffer: buffer.0,
                        indices: idx,
                        checked: true,
                    },
                    ty,
                    guard,
                    span,
                )
            }
            Expr::Ancestor { parent, i, j } => {
                let (i, j) = (self.expr(*i, guard), self.expr(*j, guard));
                self.b.add(
                    Op::Ancestor {
                        parent: parent.0,
                        i,
                        j,
                    },
                    Ty::Bool,
                    guard,
                    span,
                )
            }
        }
    }
}
