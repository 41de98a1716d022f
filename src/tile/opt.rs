//! Optimisations of the loop IR. Each pass takes a kernel and returns a new
//! one (rebuilt through the hash-consing builder, so common subexpressions
//! are merged after every pass, and values move to the outermost loop level
//! their operands allow: hoisting by index dependence is structural).
//!
//! - [`fold_constants`]: evaluates ops on constants, simplifies identities.
//! - [`prove_bounds`]: symbolic interval analysis of buffer indices over the
//!   ranges of b, h, q, kv and the guards around each read; proven reads
//!   lose their run-time check and their guard (so they may be hoisted).
//! - [`simplify_affine`]: rewrites element-level comparisons of affine int
//!   forms as `row part <op> column part`, so `q - kv < window` costs one
//!   compare per element against a per-row value.
//! - [`strength_reduce`]: floor division/modulo by powers of two become
//!   shifts and masks; float division by a power of two becomes a multiply.
//!
//! Affine rewriting assumes index arithmetic does not overflow i64.

use super::builder::{rewrite, Builder};
use super::interp::{eval_pure, Scalar};
use super::ir::*;
use super::verify::verify;
use crate::sema::{Dim, ShapeVar, Var};

/// The optimisation pipeline, in order.
pub const PASSES: [(&str, fn(&Kernel) -> Kernel); 5] = [
    ("fold_constants", fold_constants),
    ("prove_bounds", prove_bounds),
    ("simplify_affine", simplify_affine),
    ("strength_reduce", strength_reduce),
    ("fold_constants", fold_constants),
];

/// Runs every pass, verifying after each in debug builds.
pub fn optimize(k: &Kernel) -> Kernel {
    let mut k = k.clone();
    for (name, pass) in PASSES {
        k = pass(&k);
        if cfg!(debug_assertions) {
            if let Err(e) = verify(&k) {
                panic!("after {name}: {e}\n{k}");
            }
        }
    }
    k
}

fn as_scalar(b: &Builder, v: ValueId) -> Option<Scalar> {
    match b.inst(v).op {
        Op::IConst(i) => Some(Scalar::I(i)),
        Op::FConst(x) => Some(Scalar::F(x)),
        Op::BConst(x) => Some(Scalar::B(x)),
        _ => None,
    }
}

fn constant(b: &mut Builder, s: Scalar) -> ValueId {
    match s {
        Scalar::I(i) => b.iconst(i),
        Scalar::F(x) => b.fconst(x),
        Scalar::B(x) => b.bconst(x),
    }
}

/// Constant folding and algebraic identities that leave results unchanged.
pub fn fold_constants(k: &Kernel) -> Kernel {
    rewrite(k, |b, inst, _| {
        if let Some(g) = inst.guard {
            if b.const_bool(g) == Some(false) {
                // Never performed: the value is the harmless zero.
                return Some(constant(b, Scalar::zero(inst.ty)));
            }
        }
        let ops = inst.op.operands();
        if !ops.is_empty() && ops.iter().all(|o| as_scalar(b, *o).is_some()) {
            if let Some(s) = eval_pure(&inst.op, |v| {
                as_scalar(b, v).expect("all operands are constants")
            }) {
                return Some(constant(b, s));
            }
        }
        let ci = |b: &Builder, v: ValueId| b.const_int(v);
        let cb = |b: &Builder, v: ValueId| b.const_bool(v);
        match inst.op {
            Op::Binary(BinOp::IAdd, x, y) if ci(b, y) == Some(0) => Some(x),
            Op::Binary(BinOp::IAdd, x, y) if ci(b, x) == Some(0) => Some(y),
            Op::Binary(BinOp::ISub, x, y) if ci(b, y) == Some(0) => Some(x),
            Op::Binary(BinOp::IMul, x, y) if ci(b, y) == Some(1) => Some(x),
            Op::Binary(BinOp::IMul, x, y) if ci(b, x) == Some(1) => Some(y),
            Op::Binary(BinOp::FMul, x, y) if matches!(b.inst(y).op, Op::FConst(c) if c == 1.0) => {
                Some(x)
            }
            Op::Binary(BinOp::And, x, y) if cb(b, x) == Some(true) => Some(y),
            Op::Binary(BinOp::And, x, y) if cb(b, y) == Some(true) => Some(x),
            Op::Binary(BinOp::And, x, y) if cb(b, x) == Some(false) || cb(b, y) == Some(false) => {
                Some(b.bconst(false))
            }
            Op::Binary(BinOp::Or, x, y) if cb(b, x) == Some(false) => Some(y),
            Op::Binary(BinOp::Or, x, y) if cb(b, y) == Some(false) => Some(x),
            Op::Binary(BinOp::Or, x, y) if cb(b, x) == Some(true) || cb(b, y) == Some(true) => {
                Some(b.bconst(true))
            }
            Op::Binary(BinOp::And | BinOp::Or | BinOp::IMin | BinOp::IMax, x, y) if x == y => {
                Some(x)
            }
            Op::Select(c, x, y) => match cb(b, c) {
                Some(true) => Some(x),
                Some(false) => Some(y),
                None if x == y => Some(x),
                None => None,
            },
            Op::Unary(UnOp::Not, x) => match b.inst(x).op {
                Op::Unary(UnOp::Not, y) => Some(y),
                _ => None,
            },
            _ => None,
        }
    })
}

// ---------------------------------------------------------------------------
// Bounds proofs.

const N_SYMS: usize = 7;
/// The symbols of bounds: the shapes, and the query offset.
const SYM_B: usize = 0;
const SYM_H: usize = 1;
const SYM_Q: usize = 3;
const SYM_KV: usize = 4;
const SYM_OFF: usize = 6;

fn sym_of(s: ShapeVar) -> usize {
    match s {
        ShapeVar::B => 0,
        ShapeVar::H => 1,
        ShapeVar::Hkv => 2,
        ShapeVar::Q => 3,
        ShapeVar::Kv => 4,
        ShapeVar::D => 5,
    }
}

/// `c + Σ a_i · sym_i` with every shape >= 1 and the offset >= 0.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Affine {
    c: i128,
    a: [i128; N_SYMS],
}

impl Affine {
    fn constant(c: i128) -> Affine {
        Affine { c, a: [0; N_SYMS] }
    }

    fn sym(i: usize) -> Affine {
        let mut a = Affine::constant(0);
        a.a[i] = 1;
        a
    }

    fn add(self, o: Affine) -> Affine {
        let mut r = self;
        r.c += o.c;
        for i in 0..N_SYMS {
            r.a[i] += o.a[i];
        }
        r
    }

    fn scale(self, k: i128) -> Affine {
        let mut r = self;
        r.c *= k;
        for x in r.a.iter_mut() {
            *x *= k;
        }
        r
    }

    fn sub(self, o: Affine) -> Affine {
        self.add(o.scale(-1))
    }

    /// Provably >= 0 for every admissible value of the symbols.
    fn nonneg(self) -> bool {
        self.a.iter().all(|&x| x >= 0)
            && self.c
                + self
                    .a
                    .iter()
                    .enumerate()
                    .map(|(i, &x)| if i == SYM_OFF { 0 } else { x })
                    .sum::<i128>()
                >= 0
    }
}

/// `floor(affine / div)`, `div >= 1`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct BoundExpr {
    affine: Affine,
    div: i128,
}

impl BoundExpr {
    fn exact(a: Affine) -> BoundExpr {
        BoundExpr { affine: a, div: 1 }
    }

    fn linear(self) -> Option<Affine> {
        (self.div == 1).then_some(self.affine)
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Interval {
    lo: Option<BoundExpr>,
    hi: Option<BoundExpr>,
}

/// `a <= b` provably (both linear).
fn le(a: BoundExpr, b: BoundExpr) -> bool {
    match (a.linear(), b.linear()) {
        (Some(a), Some(b)) => b.sub(a).nonneg(),
        _ => false,
    }
}

fn interval(k: &Kernel, v: ValueId, depth: usize) -> Interval {
    let point = |a: Affine| Interval {
        lo: Some(BoundExpr::exact(a)),
        hi: Some(BoundExpr::exact(a)),
    };
    let range = |lo: Affine, hi: Affine| Interval {
        lo: Some(BoundExpr::exact(lo)),
        hi: Some(BoundExpr::exact(hi)),
    };
    if depth > 64 {
        return Interval::default();
    }
    let get = |x: ValueId| interval(k, x, depth + 1);
    let lin = |b: Option<BoundExpr>| b.and_then(BoundExpr::linear);
    let one = Affine::constant(1);
    match &k.inst(v).op {
        Op::IConst(c) => point(Affine::constant(*c as i128)),
        Op::Shape(s) => point(Affine::sym(sym_of(*s))),
        Op::Var(Var::B) => range(Affine::constant(0), Affine::sym(SYM_B).sub(one)),
        Op::Var(Var::H) => range(Affine::constant(0), Affine::sym(SYM_H).sub(one)),
        Op::Var(Var::Q) => range(
            Affine::sym(SYM_OFF),
            Affine::sym(SYM_OFF).add(Affine::sym(SYM_Q)).sub(one),
        ),
        Op::Var(Var::Kv) => range(Affine::constant(0), Affine::sym(SYM_KV).sub(one)),
        Op::BToI(_) => range(Affine::constant(0), one),
        Op::Unary(UnOp::INeg, a) => {
            let a = get(*a);
            Interval {
                lo: lin(a.hi).map(|x| BoundExpr::exact(x.scale(-1))),
                hi: lin(a.lo).map(|x| BoundExpr::exact(x.scale(-1))),
            }
        }
        Op::Binary(op, a, b) => {
            let (ia, ib) = (get(*a), get(*b));
            let both =
                |x: Option<BoundExpr>, y: Option<BoundExpr>, f: fn(Affine, Affine) -> Affine| {
                    Some(BoundExpr::exact(f(lin(x)?, lin(y)?)))
                };
            let cb = k.const_int(*b);
            match op {
                BinOp::IAdd => Interval {
                    lo: both(ia.lo, ib.lo, Affine::add),
                    hi: both(ia.hi, ib.hi, Affine::add),
                },
                BinOp::ISub => Interval {
                    lo: both(ia.lo, ib.hi, Affine::sub),
                    hi: both(ia.hi, ib.lo, Affine::sub),
                },
                BinOp::IMul => {
                    let (x, c) = match (k.const_int(*a), cb) {
                        (_, Some(c)) => (ia, c),
                        (Some(c), _) => (ib, c),
                        _ => return Interval::default(),
                    };
                    let s =
                        |b: Option<BoundExpr>| lin(b).map(|a| BoundExpr::exact(a.scale(c as i128)));
                    if c >= 0 {
                        Interval {
                            lo: s(x.lo),
                            hi: s(x.hi),
                        }
                    } else {
                        Interval {
                            lo: s(x.hi),
                            hi: s(x.lo),
                        }
                    }
                }
                BinOp::IDiv | BinOp::IShr => {
                    let d = match (op, cb) {
                        (BinOp::IDiv, Some(c)) if c > 0 => c as i128,
                        (BinOp::IShr, Some(s)) if (0..62).contains(&s) => 1i128 << s,
                        _ => return Interval::default(),
                    };
                    let div = |b: Option<BoundExpr>| {
                        let a = lin(b)?;
                        Some(if a.a.iter().all(|&x| x == 0) {
                            BoundExpr::exact(Affine::constant(a.c.div_euclid(d)))
                        } else {
                            BoundExpr { affine: a, div: d }
                        })
                    };
                    Interval {
                        lo: div(ia.lo),
                        hi: div(ia.hi),
                    }
                }
                BinOp::IRem => match cb {
                    Some(c) if c > 0 => range(Affine::constant(0), Affine::constant(c as i128 - 1)),
                    _ => Interval::default(),
                },
                BinOp::IAnd => match cb {
                    Some(m) if m >= 0 => range(Affine::constant(0), Affine::constant(m as i128)),
                    _ => Interval::default(),
                },
                BinOp::IMin => Interval {
                    lo: pick_lower_of_min(ia.lo, ib.lo),
                    hi: ia.hi.or(ib.hi).map(|_| better_upper(ia.hi, ib.hi)),
                },
                BinOp::IMax => Interval {
                    lo: ia.lo.or(ib.lo).map(|_| better_lower(ia.lo, ib.lo)),
                    hi: pick_upper_of_max(ia.hi, ib.hi),
                },
                _ => Interval::default(),
            }
        }
        Op::Select(_, a, b) => {
            let (ia, ib) = (get(*a), get(*b));
            Interval {
                lo: pick_lower_of_min(ia.lo, ib.lo),
                hi: pick_upper_of_max(ia.hi, ib.hi),
            }
        }
        Op::Call(crate::sema::Func::Abs, a) => {
            let ia = get(*a);
            match ia.lo {
                Some(lo) if lin(Some(lo)).is_some_and(Affine::nonneg) => ia,
                _ => Interval {
                    lo: Some(BoundExpr::exact(Affine::constant(0))),
                    hi: None,
                },
            }
        }
        _ => Interval::default(),
    }
}

/// A lower bound of `min(a, b)`: the provably smaller of the two.
fn pick_lower_of_min(a: Option<BoundExpr>, b: Option<BoundExpr>) -> Option<BoundExpr> {
    let (a, b) = (a?, b?);
    if le(a, b) {
        Some(a)
    } else if le(b, a) {
        Some(b)
    } else {
        None
    }
}

/// An upper bound of `max(a, b)`: the provably larger of the two.
fn pick_upper_of_max(a: Option<BoundExpr>, b: Option<BoundExpr>) -> Option<BoundExpr> {
    let (a, b) = (a?, b?);
    if le(a, b) {
        Some(b)
    } else if le(b, a) {
        Some(a)
    } else {
        None
    }
}

/// An upper bound of `min(a, b)`: either is valid; prefer the provably smaller, then a constant.
fn better_upper(a: Option<BoundExpr>, b: Option<BoundExpr>) -> BoundExpr {
    match (a, b) {
        (Some(a), Some(b)) if le(b, a) => b,
        (Some(a), Some(b)) if le(a, b) => a,
        (Some(a), Some(b)) => {
            if b.affine.a.iter().all(|&x| x == 0) {
                b
            } else {
                a
            }
        }
        (Some(a), None) => a,
        (None, Some(b)) => b,
        (None, None) => unreachable!("called with at least one bound"),
    }
}

/// A lower bound of `max(a, b)`: either is valid; prefer the provably larger.
fn better_lower(a: Option<BoundExpr>, b: Option<BoundExpr>) -> BoundExpr {
    match (a, b) {
        (Some(a), Some(b)) if le(a, b) => b,
        (Some(a), Some(b)) if le(b, a) => a,
        (Some(a), Some(b)) => {
            if b.affine.a.iter().all(|&x| x == 0) {
                b
            } else {
                a
            }
        }
        (Some(a), None) => a,
        (None, Some(b)) => b,
        (None, None) => unreachable!("called with at least one bound"),
    }
}

/// The conjuncts of a guard.
fn conjuncts(k: &Kernel, g: ValueId, out: &mut Vec<ValueId>) {
    match k.inst(g).op {
        Op::Binary(BinOp::And, a, b) => {
            conjuncts(k, a, out);
            conjuncts(k, b, out);
        }
        _ => out.push(g),
    }
}

/// Candidate bounds of `x` from its interval and the facts of the guard.
fn candidates(k: &Kernel, x: ValueId, guard: Option<ValueId>) -> (Vec<BoundExpr>, Vec<BoundExpr>) {
    let iv = interval(k, x, 0);
    let mut lo: Vec<BoundExpr> = iv.lo.into_iter().collect();
    let mut hi: Vec<BoundExpr> = iv.hi.into_iter().collect();
    let mut facts = Vec::new();
    if let Some(g) = guard {
        conjuncts(k, g, &mut facts);
    }
    for f in facts {
        let Op::Cmp(op, a, b) = k.inst(f).op else {
            continue;
        };
        let (op, other) = if a == x {
            (op, b)
        } else if b == x {
            (op.swap(), a)
        } else {
            continue;
        };
        let io = interval(k, other, 0);
        let shift = |b: Option<BoundExpr>, d: i128| {
            b.and_then(BoundExpr::linear)
                .map(|a| BoundExpr::exact(a.add(Affine::constant(d))))
        };
        match op {
            CmpOp::Ge => lo.extend(io.lo),
            CmpOp::Gt => lo.extend(shift(io.lo, 1)),
            CmpOp::Le => hi.extend(io.hi),
            CmpOp::Lt => hi.extend(shift(io.hi, -1)),
            CmpOp::Eq => {
                lo.extend(io.lo);
                hi.extend(io.hi);
            }
            CmpOp::Ne => {}
        }
    }
    (lo, hi)
}

/// Whether `floor(A / div) <= dim - 1` holds for every admissible shape.
fn below_dim(b: BoundExpr, dim: Dim) -> bool {
    let limit = |d: Affine| {
        d.scale(b.div)
            .sub(Affine::constant(1))
            .sub(b.affine)
            .nonneg()
    };
    match dim {
        Dim::Lit(n) => limit(Affine::constant(n as i128)),
        Dim::Shape(s) => limit(Affine::sym(sym_of(s))),
        // floor(A / n) <= ceil(S / n) - 1 when A <= S - 1.
        Dim::CeilDiv(s, n) if b.div == n as i128 => Affine::sym(sym_of(s))
            .sub(Affine::constant(1))
            .sub(b.affine)
            .nonneg(),
        Dim::CeilDiv(..) => b.div == 1 && Affine::constant(0).sub(b.affine).nonneg(),
    }
}

fn in_range(k: &Kernel, x: ValueId, guard: Option<ValueId>, dim: Dim) -> bool {
    let (lo, hi) = candidates(k, x, guard);
    lo.iter().any(|b| b.affine.nonneg()) && hi.iter().any(|b| below_dim(*b, dim))
}

/// How a read was proven in range.
#[derive(Clone, Copy, PartialEq)]
enum Proof {
    None,
    /// Only where its guard holds: the read stays guarded.
    UnderGuard,
    /// Everywhere: the read may run unguarded (and be hoisted).
    Always,
}

/// Drops the run-time check of every read proven in range, and its guard
/// too when the proof did not need the guard's facts.
pub fn prove_bounds(k: &Kernel) -> Kernel {
    let mut proofs = vec![Proof::None; k.insts.len()];
    for (i, inst) in k.insts.iter().enumerate() {
        if let Op::Load {
            buffer,
            indices,
            checked: true,
        } = &inst.op
        {
            let dims = &k.buffers[*buffer as usize].dims;
            let all = |guard| {
                indices
                    .iter()
                    .zip(dims)
                    .all(|(x, d)| in_range(k, *x, guard, *d))
            };
            proofs[i] = if all(None) {
                Proof::Always
            } else if inst.guard.is_some() && all(inst.guard) {
                Proof::UnderGuard
            } else {
                Proof::None
            };
        }
    }
    let mut idx = 0;
    rewrite(k, |b, inst, span| {
        let i = idx;
        idx += 1;
        let Op::Load {
            buffer, indices, ..
        } = &inst.op
        else {
            return None;
        };
        let guard = match proofs[i] {
            Proof::None => return None,
            Proof::UnderGuard => inst.guard,
            Proof::Always => None,
        };
        let op = Op::Load {
            buffer: *buffer,
            indices: indices.clone(),
            checked: false,
        };
        Some(b.add_guarded(op, inst.ty, guard, span))
    })
}

// ---------------------------------------------------------------------------
// Affine comparisons.

/// `Σ coeff · term + c`, with terms below element level.
fn linear_terms(
    b: &Builder,
    v: ValueId,
    coeff: i64,
    terms: &mut Vec<(ValueId, i64)>,
    c: &mut i64,
    depth: usize,
) -> bool {
    if depth > 32 {
        return false;
    }
    let inst = b.inst(v);
    match inst.op {
        Op::IConst(x) => {
            *c = c.wrapping_add(coeff.wrapping_mul(x));
            true
        }
        Op::Binary(BinOp::IAdd, x, y) if inst.level == Level::Elem => {
            linear_terms(b, x, coeff, terms, c, depth + 1)
                && linear_terms(b, y, coeff, terms, c, depth + 1)
        }
        Op::Binary(BinOp::ISub, x, y) if inst.level == Level::Elem => {
            linear_terms(b, x, coeff, terms, c, depth + 1)
                && linear_terms(b, y, -coeff, terms, c, depth + 1)
        }
        Op::Unary(UnOp::INeg, x) if inst.level == Level::Elem => {
            linear_terms(b, x, -coeff, terms, c, depth + 1)
        }
        Op::Binary(BinOp::IMul, x, y) if inst.level == Level::Elem => {
            match (b.const_int(x), b.const_int(y)) {
                (_, Some(k)) => linear_terms(b, x, coeff.wrapping_mul(k), terms, c, depth + 1),
                (Some(k), _) => linear_terms(b, y, coeff.wrapping_mul(k), terms, c, depth + 1),
                _ => false,
            }
        }
        _ if inst.level == Level::Elem => false,
        _ => {
            match terms.iter_mut().find(|(t, _)| *t == v) {
                Some((_, k)) => *k = k.wrapping_add(coeff),
                None => terms.push((v, coeff)),
            }
            true
        }
    }
}

/// Emits `Σ coeff · term + c` (terms in order).
fn emit_sum(b: &mut Builder, terms: &[(ValueId, i64)], c: i64) -> ValueId {
    let mut acc: Option<ValueId> = None;
    for &(t, k) in terms.iter().filter(|(_, k)| *k != 0) {
        let (term, negate) = match k {
            1 => (t, false),
            -1 => (t, true),
            k => {
                let kc = b.iconst(k.wrapping_abs());
                (b.binary(BinOp::IMul, t, kc), k < 0)
            }
        };
        acc = Some(match (acc, negate) {
            (None, false) => term,
            (None, true) => b.add(Op::Unary(UnOp::INeg, term), Ty::I64, None, None),
            (Some(a), false) => b.binary(BinOp::IAdd, a, term),
            (Some(a), true) => b.binary(BinOp::ISub, a, term),
        });
    }
    match (acc, c) {
        (None, c) => b.iconst(c),
        (Some(a), 0) => a,
        (Some(a), c) if c > 0 => {
            let cc = b.iconst(c);
            b.binary(BinOp::IAdd, a, cc)
        }
        (Some(a), c) => {
            let cc = b.iconst(c.wrapping_neg());
            b.binary(BinOp::ISub, a, cc)
        }
    }
}

/// `x <op> y` at element level, with x - y affine in row- and column-level
/// terms, becomes `row part <op> column part`.
pub fn simplify_affine(k: &Kernel) -> Kernel {
    rewrite(k, |b, inst, _| {
        let Op::Cmp(op, x, y) = inst.op else {
            return None;
        };
        if inst.level != Level::Elem || b.ty(x) != Ty::I64 {
            return None;
        }
        let mut terms = Vec::new();
        let mut c = 0i64;
        if !linear_terms(b, x, 1, &mut terms, &mut c, 0)
            || !linear_terms(b, y, -1, &mut terms, &mut c, 0)
        {
            return None;
        }
        let (row, col): (Vec<_>, Vec<_>) = terms
            .into_iter()
            .filter(|(_, k)| *k != 0)
            .partition(|(t, _)| b.inst(*t).level != Level::Col);
        if col.is_empty() || row.is_empty() && c == 0 && col.len() == 1 && col[0].1 == -1 {
            // Nothing to split (or already `0 <op> column`).
            if col.is_empty() {
                return None;
            }
        }
        let lhs = emit_sum(b, &row, c);
        let neg_col: Vec<(ValueId, i64)> =
            col.iter().map(|&(t, k)| (t, k.wrapping_neg())).collect();
        let rhs = emit_sum(b, &neg_col, 0);
        Some(b.add(Op::Cmp(op, lhs, rhs), Ty::Bool, None, None))
    })
}

// ---------------------------------------------------------------------------
// Strength reduction.

/// Division and modulo by powers of two become shifts and masks.
pub fn strength_reduce(k: &Kernel) -> Kernel {
    rewrite(k, |b, inst, _| match inst.op {
        Op::Binary(op @ (BinOp::IDiv | BinOp::IRem), x, y) => {
            let c = b.const_int(y)?;
            if c <= 0 || c.count_ones() != 1 {
                return None;
            }
            let shift = c.trailing_zeros() as i64;
            Some(match op {
                BinOp::IDiv if shift == 0 => x,
                BinOp::IDiv => {
                    let s = b.iconst(shift);
                    b.binary(BinOp::IShr, x, s)
                }
                _ => {
                    let m = b.iconst(c - 1);
                    b.binary(BinOp::IAnd, x, m)
                }
            })
        }
        Op::Binary(BinOp::FDiv, x, y) => {
            let Op::FConst(c) = b.inst(y).op else {
                return None;
            };
            let r = 1.0 / c;
            // Exact only when the reciprocal is exact: a power of two.
            if c.is_finite()
                && c != 0.0
                && r.is_finite()
                && c.abs().to_bits() & 0x007f_ffff == 0
                && r.is_normal()
            {
                let rc = b.fconst(r);
                Some(b.binary(BinOp::FMul, x, rc))
            } else {
                None
            }
        }
        _ => None,
    })
}
