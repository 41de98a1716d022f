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
//!   shifts and masks; by other positive constants, a multiply by a magic
//!   constant (`umulhi`, or `imul` where the dividend is bounded by a small
//!   constant) with the sign trick (`ishr x, 63`, `ixor`) where the dividend
//!   may be negative; float division by a constant becomes a multiply by its
//!   reciprocal (exact for powers of two, within 2 ulp otherwise).
//!
//! Affine rewriting, and strength reduction where it drops the sign handling
//! of a dividend the interval analysis proves non-negative, assume index
//! arithmetic does not overflow i64. The range analysis makes that true of
//! every value it bounds: bind caps shapes and positions at 2^31 - 1
//! (`sema::POSITION_LIMIT`), and a bound that could reach 2^62 for such
//! symbols is dropped (`interval`), as is any multiply by a factor above 2^20
//! (a wrapping idiom such as `kv * 2^61` proves nothing); `<<` stays opaque.

use super::builder::{rewrite, Builder};
use super::interp::{eval_pure, Scalar};
use super::ir::*;
use super::verify::{verify, Verified};
use crate::sema::{Dim, ShapeVar, Var};

/// The largest constant factor the range analysis multiplies a bound by (a
/// larger one is a wrapping idiom; `interval` also drops any bound that could
/// reach 2^62).
const MAX_PROOF_FACTOR: u64 = 1 << 20;

/// One optimisation pass: a kernel in, the rewritten kernel out.
pub type Pass = fn(&Kernel) -> Kernel;

/// The optimisation pipeline, in order.
pub const PASSES: [(&str, Pass); 5] = [
    ("fold_constants", fold_constants),
    ("prove_bounds", prove_bounds),
    ("simplify_affine", simplify_affine),
    ("strength_reduce", strength_reduce),
    ("fold_constants", fold_constants),
];

/// Runs every pass, verifying the kernel before the first and after each
/// (in every build: `verify` is linear, and the backends rely on its
/// invariants, so a pass that breaks one stops here with the kernel printed
/// rather than in generated code).
///
/// Every read enters checked (an unchecked read of the input is checked
/// again), so the only unchecked reads of the result are those
/// `prove_bounds` proved in range: what [`Verified`] promises the backends.
pub fn optimize(k: &Kernel) -> Verified {
    if let Err(e) = verify(k) {
        panic!("after lowering: {e}\n{k}");
    }
    let mut k = check_every_read(k);
    for (name, pass) in PASSES {
        k = pass(&k);
        if let Err(e) = verify(&k) {
            panic!("after {name}: {e}\n{k}");
        }
    }
    Verified::by_optimize(k)
}

/// `k` with every read range-checked.
fn check_every_read(k: &Kernel) -> Kernel {
    let unchecked = |i: &Inst| matches!(i.op, Op::Load { checked: false, .. });
    if !k.insts.iter().any(unchecked) {
        return k.clone();
    }
    rewrite(k, |b, inst, span| match &inst.op {
        Op::Load {
            buffer,
            indices,
            checked: false,
        } => {
            let op = Op::Load {
                buffer: *buffer,
                indices: indices.clone(),
                checked: true,
            };
            Some(b.add_guarded(op, inst.ty, inst.guard, span))
        }
        _ => None,
    })
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
            Op::Binary(BinOp::IXor, x, y) if ci(b, y) == Some(0) => Some(x),
            Op::Binary(BinOp::IXor, x, y) if ci(b, x) == Some(0) => Some(y),
            Op::Binary(BinOp::IShr, x, y) if ci(b, y) == Some(0) => Some(x),
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

    fn checked_scale(self, k: i128) -> Option<Affine> {
        let mut r = self;
        r.c = r.c.checked_mul(k)?;
        for x in r.a.iter_mut() {
            *x = x.checked_mul(k)?;
        }
        Some(r)
    }

    fn checked_add(self, o: Affine) -> Option<Affine> {
        let mut r = self;
        r.c = r.c.checked_add(o.c)?;
        for i in 0..N_SYMS {
            r.a[i] = r.a[i].checked_add(o.a[i])?;
        }
        Some(r)
    }

    fn checked_sub(self, o: Affine) -> Option<Affine> {
        self.checked_add(o.checked_scale(-1)?)
    }

    /// Whether provably >= 0, or `None` where the sum would overflow i128.
    fn checked_nonneg(self) -> Option<bool> {
        let mut sum = self.c;
        for (i, &x) in self.a.iter().enumerate() {
            if x < 0 {
                return Some(false);
            }
            if i != SYM_OFF {
                sum = sum.checked_add(x)?;
            }
        }
        Some(sum >= 0)
    }

    /// Provably >= 0 for every admissible value of the symbols (`false`
    /// where deciding it would overflow i128).
    fn nonneg(self) -> bool {
        self.checked_nonneg().unwrap_or(false)
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

/// The interval of `v`, with every bound dropped whose magnitude could reach
/// 2^62 for symbols up to `sema::POSITION_LIMIT` (bind caps every shape and
/// position there): each proven value is then far from wrapping in i64, so
/// the bounds the proofs trust hold for the wrapping arithmetic that runs.
/// Arithmetic that can wrap (`+`, `-`, `*`, unary `-`) keeps its bounds only
/// when it has both: with one side unknown the exact result may leave i64
/// there and wrap around to the other side (`max(x, 0) + 1` is `i64::MIN`
/// at `x = i64::MAX`, below the lower bound 1).
fn interval(k: &Kernel, v: ValueId, depth: usize) -> Interval {
    let fits = |b: &BoundExpr| {
        let limit = crate::sema::POSITION_LIMIT as i128;
        let a = &b.affine;
        a.c.abs() + a.a.iter().map(|x| x.abs() * limit).sum::<i128>() < 1 << 62
    };
    let i = interval_unguarded(k, v, depth);
    let (lo, hi) = (i.lo.filter(fits), i.hi.filter(fits));
    let wraps = matches!(
        k.inst(v).op,
        Op::Binary(BinOp::IAdd | BinOp::ISub | BinOp::IMul, ..) | Op::Unary(UnOp::INeg, _)
    );
    if wraps && (lo.is_none() || hi.is_none()) {
        return Interval::default();
    }
    Interval { lo, hi }
}

fn interval_unguarded(k: &Kernel, v: ValueId, depth: usize) -> Interval {
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
                    // A large factor is how bits are pushed out on purpose
                    // (`kv * 2^61`): the product may wrap, which the affine
                    // bounds do not model, so it proves nothing.
                    if c.unsigned_abs() > MAX_PROOF_FACTOR {
                        return Interval::default();
                    }
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
                // For 0 <= a < 2^63 and any 64-bit m: 0 <= floor(a * m / 2^64) <= a.
                BinOp::IMulHiU if lin(ia.lo).is_some_and(Affine::nonneg) => Interval {
                    lo: Some(BoundExpr::exact(Affine::constant(0))),
                    hi: ia.hi,
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
                // A known lower bound holds for the value as computed
                // (`interval` keeps none that wrapping could break) and is
                // above -2^62, so the argument is not i64::MIN and its
                // absolute value is not negative.
                Some(_) => Interval {
                    lo: Some(BoundExpr::exact(Affine::constant(0))),
                    hi: None,
                },
                // `abs(i64::MIN)` wraps to itself: nothing is known.
                None => Interval::default(),
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

/// A dimension without division, as an affine form of the shapes (`None`
/// also where a coefficient would overflow i128).
fn affine_dim(d: &Dim) -> Option<Affine> {
    match d {
        Dim::Lit(n) => Some(Affine::constant(*n as i128)),
        Dim::Shape(s) => Some(Affine::sym(sym_of(*s))),
        Dim::Add(a, b) => affine_dim(a)?.checked_add(affine_dim(b)?),
        Dim::Sub(a, b) => affine_dim(a)?.checked_sub(affine_dim(b)?),
        Dim::Mul(a, b) => match (&**a, &**b) {
            (Dim::Lit(k), x) | (x, Dim::Lit(k)) => affine_dim(x)?.checked_scale(*k as i128),
            _ => None,
        },
        Dim::CeilDiv(..) | Dim::Param(_) => None,
    }
}

/// Whether `floor(A / div) <= dim - 1` holds for every admissible shape.
/// Dimensions that are not affine, or not an affine form rounded up by a
/// literal of at least 1, prove nothing, nor does any step that would
/// overflow i128: their reads stay checked.
fn below_dim(b: BoundExpr, dim: &Dim) -> bool {
    let one = Affine::constant(1);
    let proof = || -> Option<bool> {
        if let Some(d) = affine_dim(dim) {
            return d
                .checked_scale(b.div)?
                .checked_sub(one)?
                .checked_sub(b.affine)?
                .checked_nonneg();
        }
        let Dim::CeilDiv(num, den) = dim else {
            return Some(false);
        };
        let (Some(s), Dim::Lit(n)) = (affine_dim(num), &**den) else {
            return Some(false);
        };
        let n = *n as i128;
        if n < 1 {
            return Some(false);
        }
        if b.div == n {
            // floor(X / n) <= floor((S - 1) / n) = ceil(S / n) - 1 when X <= S - 1.
            s.checked_sub(one)?.checked_sub(b.affine)?.checked_nonneg()
        } else if b.div == 1 {
            // X <= floor((S - 1) / n) = ceil(S / n) - 1 when n·X <= S - 1.
            s.checked_sub(one)?
                .checked_sub(b.affine.checked_scale(n)?)?
                .checked_nonneg()
        } else {
            Some(false)
        }
    };
    proof().unwrap_or(false)
}

fn in_range(k: &Kernel, x: ValueId, guard: Option<ValueId>, dim: &Dim) -> bool {
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
                    .all(|(x, d)| in_range(k, *x, guard, d))
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
                && linear_terms(b, y, coeff.wrapping_neg(), terms, c, depth + 1)
        }
        Op::Unary(UnOp::INeg, x) if inst.level == Level::Elem => {
            linear_terms(b, x, coeff.wrapping_neg(), terms, c, depth + 1)
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

/// Whether `Σ coeff · term + c` lies in i64 for every value the terms can
/// take ([`int_range`](super::range::int_range)), so that the wrapping
/// arithmetic that computes it gives its exact value.
fn stays_in_i64(b: &Builder, terms: &[(ValueId, i64)], c: i64) -> bool {
    let bound = terms.iter().fold(i128::from(c).abs(), |acc, &(t, k)| {
        let r = super::range::int_range(b, t);
        let m = r.lo.abs().max(r.hi.abs());
        acc.saturating_add(i128::from(k).abs().saturating_mul(m))
    });
    bound <= i128::from(i64::MAX)
}

/// `x <op> y` at element level, with x - y affine in row- and column-level
/// terms, becomes `row part <op> column part` (where neither form can wrap).
pub fn simplify_affine(k: &Kernel) -> Kernel {
    rewrite(k, |b, inst, _| {
        let Op::Cmp(op, x, y) = inst.op else {
            return None;
        };
        if inst.level != Level::Elem || b.ty(x) != Ty::I64 {
            return None;
        }
        let (mut tx, mut cx, mut ty, mut cy) = (Vec::new(), 0i64, Vec::new(), 0i64);
        if !linear_terms(b, x, 1, &mut tx, &mut cx, 0)
            || !linear_terms(b, y, 1, &mut ty, &mut cy, 0)
        {
            return None;
        }
        // `x - y` and `row - col` below are the same sum of the same terms
        // (the coefficients merged exactly), and wrapping arithmetic computes
        // each side modulo 2^64; so `x <op> y` and `row <op> col` agree when
        // no side's value can leave i64. Otherwise (an unbounded buffer read,
        // `i64::MIN - kv`, ...) the comparison stays as written.
        let mut terms: Vec<(ValueId, i128)> = tx.iter().map(|&(t, k)| (t, k as i128)).collect();
        for &(t, k) in &ty {
            match terms.iter_mut().find(|(u, _)| *u == t) {
                Some((_, j)) => *j -= k as i128,
                None => terms.push((t, -(k as i128))),
            }
        }
        let terms: Vec<(ValueId, i64)> = terms
            .into_iter()
            .map(|(t, k)| Some((t, i64::try_from(k).ok()?)))
            .collect::<Option<_>>()?;
        let c = cx.checked_sub(cy)?;
        let (row, col): (Vec<_>, Vec<_>) = terms
            .into_iter()
            .filter(|(_, k)| *k != 0)
            .partition(|(t, _)| b.inst(*t).level != Level::Col);
        if col.is_empty() {
            // Nothing to split.
            return None;
        }
        let neg_col: Vec<(ValueId, i64)> = col
            .iter()
            .map(|&(t, k)| Some((t, k.checked_neg()?)))
            .collect::<Option<_>>()?;
        if !stays_in_i64(b, &tx, cx)
            || !stays_in_i64(b, &ty, cy)
            || !stays_in_i64(b, &row, c)
            || !stays_in_i64(b, &neg_col, 0)
        {
            return None;
        }
        let lhs = emit_sum(b, &row, c);
        let rhs = emit_sum(b, &neg_col, 0);
        Some(b.add(Op::Cmp(op, lhs, rhs), Ty::Bool, None, None))
    })
}

// ---------------------------------------------------------------------------
// Strength reduction.

/// What the interval analysis knows about a dividend, as i64 constants:
/// `lo <= x <= hi` where known.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct DividendRange {
    lo: Option<i64>,
    hi: Option<i64>,
    /// `x >= 0` for every admissible shape (a symbolic lower bound may prove
    /// this where no constant one exists).
    nonneg: bool,
}

impl DividendRange {
    fn of(k: &Kernel, x: ValueId) -> DividendRange {
        let iv = interval(k, x, 0);
        let constant = |b: Option<BoundExpr>| {
            let b = b?;
            if b.affine.a.iter().any(|&a| a != 0) {
                return None;
            }
            i64::try_from(b.affine.c.div_euclid(b.div)).ok()
        };
        let (lo, hi) = (constant(iv.lo), constant(iv.hi));
        DividendRange {
            lo,
            hi,
            nonneg: iv.lo.is_some_and(|b| b.affine.nonneg()) || lo.is_some_and(|l| l >= 0),
        }
    }

    /// The largest value of `x < 0 ? -1 - x : x`: what the unsigned part of
    /// a floor division sees. `i64::MAX` where nothing smaller is known.
    fn magnitude(self) -> i64 {
        let below = if self.nonneg {
            Some(0)
        } else {
            self.lo.map(|l| if l < 0 { -1 - l } else { 0 })
        };
        match (below, self.hi) {
            (Some(b), Some(h)) => b.max(h).max(0),
            _ => i64::MAX,
        }
    }
}

/// The multiplier `m = ceil(2^s / d)` and shift `s >= min_shift` (the
/// smallest such) with `floor(t * m / 2^s) == floor(t / d)` for every
/// `0 <= t <= max_t`, or `None` if `m` would not fit in 64 bits.
///
/// With `e = m * d - 2^s` (so `0 <= e < d`), `t = q * d + r`:
/// `t * m / 2^s = q + (r + t * e / 2^s) / d`, so `max_t * e < 2^s` makes the
/// floor exact (`r <= d - 1`). For `max_t < 2^63` and `s = 63 + ceil(log2 d)`
/// this always holds and `m < 2^64`, so a multiplier exists for every `d >= 1`.
fn magic(d: u64, max_t: u64, min_shift: u32) -> Option<(u64, u32)> {
    debug_assert!(d >= 1);
    (min_shift..=127).find_map(|s| {
        let p = 1u128 << s;
        let d = u128::from(d);
        let m = p.div_ceil(d);
        let e = m * d - p;
        (u128::from(max_t) * e < p).then_some(m)?;
        Some((u64::try_from(m).ok()?, s))
    })
}

/// `floor(t / d)` for `0 <= t <= max_t`, `d >= 2` not a power of two: a
/// signed multiply and shift where the product provably fits, else the
/// high half of an unsigned multiply and a shift.
fn unsigned_div(b: &mut Builder, t: ValueId, d: i64, max_t: i64) -> ValueId {
    if max_t < d {
        return b.iconst(0);
    }
    let (d, max_t) = (d as u64, max_t as u64);
    if let Some((m, s)) = magic(d, max_t, 0) {
        if u128::from(max_t) * u128::from(m) <= i64::MAX as u128 {
            let mc = b.iconst(m as i64);
            let prod = b.binary(BinOp::IMul, t, mc);
            let sc = b.iconst(i64::from(s));
            return b.binary(BinOp::IShr, prod, sc);
        }
    }
    let (m, s) = magic(d, max_t, 64).expect("a 64-bit multiplier exists for t < 2^63");
    let mc = b.iconst(m as i64);
    let hi = b.binary(BinOp::IMulHiU, t, mc);
    if s == 64 {
        hi
    } else {
        let sc = b.iconst(i64::from(s - 64));
        b.binary(BinOp::IShr, hi, sc)
    }
}

/// `floor(x / d)` for a constant `d >= 2` that is not a power of two, exact
/// for every i64 `x`. Negative `x` use the sign trick
/// `floor(x / d) = -1 - floor((-1 - x) / d)`, branch-free with
/// `sgn = ishr x, 63` (0 or -1) and `-1 - x = x ^ -1`; it is left out where
/// the interval analysis proves `x >= 0`.
fn floor_div_by_const(b: &mut Builder, x: ValueId, d: i64, range: DividendRange) -> ValueId {
    let max_t = range.magnitude();
    if range.nonneg {
        return unsigned_div(b, x, d, max_t);
    }
    let c63 = b.iconst(63);
    let sgn = b.binary(BinOp::IShr, x, c63);
    let t = b.binary(BinOp::IXor, x, sgn);
    let u = unsigned_div(b, t, d, max_t);
    b.binary(BinOp::IXor, u, sgn)
}

/// Division and modulo by constants: powers of two become shifts and
/// masks; other positive divisors a multiply by a magic constant (see
/// `floor_div_by_const`), and modulo `x - d * floor(x / d)`. Negative
/// divisors stay `idiv`/`irem` (rare in masks, and `-x` may overflow).
pub fn strength_reduce(k: &Kernel) -> Kernel {
    // Dividend ranges from the input kernel, by instruction index.
    let ranges: Vec<Option<DividendRange>> = k
        .insts
        .iter()
        .map(|inst| match inst.op {
            Op::Binary(BinOp::IDiv | BinOp::IRem, x, y)
                if k.const_int(y).is_some_and(|c| c > 2) =>
            {
                Some(DividendRange::of(k, x))
            }
            _ => None,
        })
        .collect();
    let mut idx = 0;
    rewrite(k, |b, inst, _| {
        let i = idx;
        idx += 1;
        match inst.op {
            Op::Binary(op @ (BinOp::IDiv | BinOp::IRem), x, y) => {
                let c = b.const_int(y)?;
                if c <= 0 {
                    return None;
                }
                if c.count_ones() != 1 {
                    let range = ranges[i]?;
                    let q = floor_div_by_const(b, x, c, range);
                    return Some(match op {
                        BinOp::IDiv => q,
                        _ if range.nonneg && range.hi.is_some_and(|h| h < c) => x,
                        _ => {
                            let dc = b.iconst(c);
                            let qd = b.binary(BinOp::IMul, q, dc);
                            b.binary(BinOp::ISub, x, qd)
                        }
                    });
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
                // `x / c` becomes `x * (1 / c)` when the reciprocal is a normal
                // float: exact for powers of two, otherwise within 2 ulp of the
                // quotient (two roundings instead of one); inf, NaN and signed
                // zeros come out as from the division.
                let r = 1.0 / c;
                if c.is_finite() && c != 0.0 && r.is_normal() {
                    let rc = b.fconst(r);
                    Some(b.binary(BinOp::FMul, x, rc))
                } else {
                    None
                }
            }
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sema::eval::{floor_div, floor_mod};

    /// A kernel whose score is `itof(f(b, x))`, where `x` is an i64 the
    /// interval analysis knows nothing about (a checked read of `xs[0]`).
    fn kernel_of(f: impl FnOnce(&mut Builder, ValueId) -> ValueId) -> Kernel {
        let mut b = Builder::default();
        let zero = b.iconst(0);
        let x = b.add(
            Op::Load {
                buffer: 0,
                indices: vec![zero],
                checked: true,
            },
            Ty::I64,
            None,
            None,
        );
        let r = f(&mut b, x);
        let xs = BufferDecl {
            name: "xs".into(),
            elem: Ty::I64,
            dims: vec![Dim::Lit(1)],
        };
        let k = Kernel::scored_by_int(b, r, vec![xs]);
        verify(&k).unwrap();
        k
    }

    /// The i64 under the score's `itof`, with `xs[0]` (and `kv`) set to `x`,
    /// every other instruction evaluated by the interpreter's `eval_pure`.
    fn run(k: &Kernel, x: i64) -> i64 {
        let mut vals: Vec<Scalar> = Vec::with_capacity(k.insts.len());
        for inst in &k.insts {
            let v = match &inst.op {
                Op::Load { .. } | Op::Var(Var::Kv) => Scalar::I(x),
                op => eval_pure(op, |v| vals[v.0 as usize])
                    .unwrap_or_else(|| panic!("not pure: {op:?}\n{k}")),
            };
            vals.push(v);
        }
        let Op::IToF(r) = k.inst(k.score_full).op else {
            panic!("the score is an itof\n{k}")
        };
        vals[r.0 as usize].i()
    }

    #[test]
    fn only_proofs_make_a_verified_kernel_read_unchecked() {
        // A hand-built kernel that reads `xs[x]` unchecked, `x` unknown: the
        // read comes out of `optimize` checked again.
        let k = kernel_of(|b, x| {
            b.add(
                Op::Load {
                    buffer: 0,
                    indices: vec![x],
                    checked: false,
                },
                Ty::I64,
                None,
                None,
            )
        });
        let reads = |k: &Kernel| {
            k.insts
                .iter()
                .filter_map(|i| match i.op {
                    Op::Load { checked, .. } => Some(checked),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(reads(&k), [true, false]);
        // `xs[0]` of `xs[1]` is proven in range; `xs[x]` is checked again.
        assert_eq!(reads(&optimize(&k)), [false, true]);
    }

    #[test]
    fn bounds_that_could_reach_2_62_are_dropped() {
        // One factor of 2^20 keeps kv's bounds; a second could reach 2^71.
        let k = kernel_of(|b, _| {
            let kv = b.add(Op::Var(Var::Kv), Ty::I64, None, None);
            let f = b.iconst(1 << 20);
            let once = b.binary(BinOp::IMul, kv, f);
            b.binary(BinOp::IMul, once, f)
        });
        let Op::IToF(twice) = k.inst(k.score_full).op else {
            panic!("{k}")
        };
        let Op::Binary(BinOp::IMul, once, _) = k.inst(twice).op else {
            panic!("{k}")
        };
        // 2^20 * (2^31 - 1) fits below 2^62; 2^40 * (2^31 - 1) does not,
        // and without its upper bound the product may wrap below 0 (at
        // kv = 2^23 it is i64::MIN): the lower bound 0 goes too.
        let i = interval(&k, once, 0);
        assert!(i.lo.is_some() && i.hi.is_some(), "{k}");
        let i = interval(&k, twice, 0);
        assert!(i.lo.is_none() && i.hi.is_none(), "{i:?}");
    }

    fn ops(k: &Kernel) -> Vec<BinOp> {
        k.insts
            .iter()
            .filter_map(|i| match i.op {
                Op::Binary(op, ..) => Some(op),
                _ => None,
            })
            .collect()
    }

    /// A deterministic stream of i64s (splitmix64).
    fn random(seed: u64) -> impl Iterator<Item = i64> {
        let mut s = seed;
        std::iter::repeat_with(move || {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) as i64
        })
    }

    /// Edge values for divisor `d`: the ends of i64, zero, multiples of `d`
    /// (small and near the ends) and their neighbours, and random values of
    /// every magnitude.
    fn dividends(d: i64, n_random: usize) -> Vec<i64> {
        let mut xs = vec![
            i64::MIN,
            i64::MIN + 1,
            i64::MAX,
            i64::MAX - 1,
            0,
            1,
            -1,
            2,
            -2,
        ];
        let ends = [i64::MAX / d, i64::MIN / d];
        let multiples = (-4..=4).chain(ends.iter().flat_map(|e| e - 2..=e + 2));
        for m in multiples {
            if let Some(base) = m.checked_mul(d) {
                xs.extend(
                    [base.checked_sub(1), Some(base), base.checked_add(1)]
                        .into_iter()
                        .flatten(),
                );
            }
        }
        for (i, r) in random(d as u64).take(n_random).enumerate() {
            // Full width, and shifted down to every magnitude.
            xs.push(r);
            xs.push(r >> (i % 63));
        }
        xs
    }

    const DIVISORS: &[i64] = &[
        3,
        5,
        6,
        7,
        10,
        12,
        100,
        641,
        1_000_000_007,
        (1 << 31) - 1,
        (1 << 31) + 1,
        (1 << 32) + 1,
        (1 << 62) - 1,
        (1 << 62) + 1,
        3 << 61,
        i64::MAX - 1,
        i64::MAX,
    ];

    /// Checks `x / d` and `x % d`, rewritten for dividends `x = shape(x)`,
    /// against `floor_div` / `floor_mod` of the same dividend.
    fn check(
        d: i64,
        n_random: usize,
        shape_name: &str,
        shape: impl Fn(&mut Builder, ValueId) -> ValueId + Copy,
        dividend: impl Fn(i64) -> Option<i64>,
    ) {
        for op in [BinOp::IDiv, BinOp::IRem] {
            let before = kernel_of(|b, x| {
                let x = shape(b, x);
                let dc = b.iconst(d);
                b.binary(op, x, dc)
            });
            let after = strength_reduce(&before);
            verify(&after).unwrap_or_else(|e| panic!("{e}\n{after}"));
            let left = ops(&after);
            assert!(
                !left.contains(&BinOp::IDiv) && !left.contains(&BinOp::IRem),
                "{} by {d} ({shape_name}) not reduced:\n{after}",
                op.name()
            );
            for x in dividends(d, n_random) {
                let Some(v) = dividend(x) else { continue };
                let want = match op {
                    BinOp::IDiv => floor_div(v, d),
                    _ => floor_mod(v, d),
                }
                .unwrap();
                // The unrewritten kernel, as a check of the harness itself.
                assert_eq!(run(&before, x), want);
                assert_eq!(
                    run(&after, x),
                    want,
                    "{} {v} by {d} ({shape_name}):\n{after}",
                    op.name()
                );
            }
        }
    }

    fn clamp(lo: i64, hi: i64) -> impl Fn(&mut Builder, ValueId) -> ValueId + Copy {
        move |b: &mut Builder, x: ValueId| {
            let (l, h) = (b.iconst(lo), b.iconst(hi));
            let x = b.binary(BinOp::IMax, x, l);
            b.binary(BinOp::IMin, x, h)
        }
    }

    fn check_all_shapes(d: i64, n_random: usize) {
        // Any i64: the sign trick.
        check(d, n_random, "any", |_, x| x, Some);
        // kv >= 0: no sign handling.
        check(
            d,
            n_random,
            "kv",
            |b, _| b.add(Op::Var(Var::Kv), Ty::I64, None, None),
            |x| (x >= 0).then_some(x),
        );
        // Constant ranges: a plain multiply where it fits.
        for (lo, hi) in [
            (0, d - 1),
            (0, 1000),
            (0, d.saturating_mul(3).saturating_add(2)),
            (0, (1 << 31) - 1),
            (0, i64::MAX),
            (-1000, 1000),
            (-(1 << 31), (1 << 31) - 1),
            (i64::MIN, 5),
        ] {
            check(d, n_random, &format!("[{lo}, {hi}]"), clamp(lo, hi), |x| {
                Some(x.clamp(lo, hi))
            });
        }
    }

    #[test]
    fn division_by_constants_is_exact_on_edge_and_random_values() {
        for &d in DIVISORS {
            check_all_shapes(d, 300);
        }
    }

    #[test]
    fn division_by_every_small_constant_is_exact() {
        for d in (3..300).filter(|d: &i64| d.count_ones() != 1) {
            check_all_shapes(d, 20);
        }
        for k in 3..63 {
            for d in [(1i64 << k) - 1, (1i64 << k) + 1] {
                check_all_shapes(d, 20);
            }
        }
    }

    #[test]
    fn the_cheapest_exact_form_is_chosen() {
        let text = |shape: fn(&mut Builder, ValueId) -> ValueId, op: BinOp, d: i64| {
            let k = kernel_of(|b, x| {
                let x = shape(b, x);
                let dc = b.iconst(d);
                b.binary(op, x, dc)
            });
            strength_reduce(&k).to_string()
        };
        // Any i64: sign trick around an unsigned high multiply.
        let t = text(|_, x| x, BinOp::IDiv, 7);
        assert!(
            t.contains("ishr") && t.contains("ixor") && t.contains("umulhi"),
            "{t}"
        );
        // kv >= 0: no sign handling.
        let kv = |b: &mut Builder, _| b.add(Op::Var(Var::Kv), Ty::I64, None, None);
        let t = text(kv, BinOp::IDiv, 7);
        assert!(t.contains("umulhi") && !t.contains("ixor"), "{t}");
        // 0 <= x <= 1000: a plain multiply and shift.
        let small = |b: &mut Builder, x| clamp(0, 1000)(b, x);
        let t = text(small, BinOp::IRem, 7);
        assert!(t.contains("imul") && !t.contains("umulhi"), "{t}");
        // 0 <= x < d: the quotient is 0 and the remainder x.
        let tiny = |b: &mut Builder, x| clamp(0, 6)(b, x);
        let t = text(tiny, BinOp::IRem, 7);
        assert!(!t.contains("imul") && !t.contains("umulhi"), "{t}");
        // Negative divisors stay divisions.
        let t = text(|_, x| x, BinOp::IDiv, -7);
        assert!(t.contains("idiv"), "{t}");
    }

    #[test]
    fn magic_multipliers_exist_for_every_dividend_below_2_pow_63() {
        let max = i64::MAX as u64;
        for d in DIVISORS.iter().map(|&d| d as u64).chain(3..2000) {
            let (m, s) = magic(d, max, 64).unwrap();
            // The bound of the doc comment: s <= 63 + ceil(log2 d).
            assert!(s <= 63 + (64 - (d - 1).leading_zeros()), "d = {d}: s = {s}");
            assert_eq!(u128::from(m), (1u128 << s).div_ceil(u128::from(d)));
        }
    }
}
