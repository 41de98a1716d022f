//! Abstract evaluation of a mask over a box of (q, kv) positions.
//!
//! Stage: mask analysis (helper of [`super::classify`]). Consumes the checked
//! expression graph of a [`Spec`] and a [`QBox`] (a product of a q range and a
//! kv range, with `b` and `h` fixed) and produces an [`Abs`]: a value that
//! over-approximates the set of values the expression takes at the points of
//! the box, and a flag saying whether evaluating it at some point of the box
//! might fail (an out-of-range read, a division by zero, a cycle in an
//! `ancestor` buffer).
//!
//! The domains:
//! - int: an interval `[lo, hi]`, plus an optional affine form
//!   `a*q + b*kv + c` that equals the value at every point of the box. The
//!   interval of an affine value is its exact range over the box, and the
//!   difference of two affine values is compared exactly, so a comparison of
//!   affine forms is decided exactly (causal, windows, prefixes, sinks).
//!   Every node is computed in i128 and must fit in i64, otherwise it becomes
//!   [`IntRange::TOP`] (the concrete evaluator wraps; TOP covers every i64).
//! - float: an interval of finite values, or `Top` (may be anything, NaN
//!   included). Only operations whose IEEE rounding is monotone keep an
//!   interval (+, -, *, /, conversions, floor, ceil, round, min, max, abs);
//!   transcendental functions give `Top`.
//! - bool: [`Tri`]: always true, always false, or unknown.
//!
//! Soundness: if `may_fail` is false, the concrete evaluator succeeds at
//! every point of the box and its value lies in the abstract value. A value
//! whose `may_fail` is true says nothing; callers fall back to element-wise
//! evaluation there. `&&`, `||` and `if` follow the evaluator's short-circuit
//! rules, so a read the evaluator never performs never makes a box fail.

use crate::sema::eval::{floor_div, floor_mod, Evaluator, Shapes};
use crate::sema::{BinaryOp, Deps, Expr, ExprId, Func, ShapeVar, Spec, Type, UnaryOp, Value, Var};

use super::summary::Summaries;

/// A box of positions: absolute query positions `q0..=q1` and key positions
/// `k0..=k1` (both non-empty), at fixed `b` and `h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QBox {
    pub q0: i64,
    pub q1: i64,
    pub k0: i64,
    pub k1: i64,
}

impl QBox {
    /// Number of points, saturating.
    pub fn size(&self) -> u128 {
        ((self.q1 - self.q0 + 1) as u128) * ((self.k1 - self.k0 + 1) as u128)
    }
}

/// A three-valued truth value over a box.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tri {
    False,
    True,
    Unknown,
}

impl Tri {
    fn of(b: bool) -> Tri {
        if b {
            Tri::True
        } else {
            Tri::False
        }
    }

    fn not(self) -> Tri {
        match self {
            Tri::True => Tri::False,
            Tri::False => Tri::True,
            Tri::Unknown => Tri::Unknown,
        }
    }

    fn join(self, o: Tri) -> Tri {
        if self == o {
            self
        } else {
            Tri::Unknown
        }
    }
}

/// `q * self.q + kv * self.kv + self.c`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Affine {
    pub q: i64,
    pub kv: i64,
    pub c: i64,
}

/// The exact range of an affine form (given in i128) over a box.
fn affine_range(q: i128, kv: i128, c: i128, bx: &QBox) -> (i128, i128) {
    let (q0, q1, k0, k1) = (bx.q0 as i128, bx.q1 as i128, bx.k0 as i128, bx.k1 as i128);
    let (qa, qb) = (q * q0, q * q1);
    let (ka, kb) = (kv * k0, kv * k1);
    (c + qa.min(qb) + ka.min(kb), c + qa.max(qb) + ka.max(kb))
}

fn fits(x: i128) -> bool {
    x >= i64::MIN as i128 && x <= i64::MAX as i128
}

/// An int abstract value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IntRange {
    pub lo: i64,
    pub hi: i64,
    /// Equals the value at every point of the box, when known.
    pub aff: Option<Affine>,
}

impl IntRange {
    pub const TOP: IntRange = IntRange {
        lo: i64::MIN,
        hi: i64::MAX,
        aff: None,
    };

    pub fn point(v: i64) -> IntRange {
        IntRange {
            lo: v,
            hi: v,
            aff: Some(Affine { q: 0, kv: 0, c: v }),
        }
    }

    /// An interval computed exactly in i128: TOP when it leaves i64.
    fn interval(lo: i128, hi: i128) -> IntRange {
        if fits(lo) && fits(hi) {
            if lo == hi {
                IntRange::point(lo as i64)
            } else {
                IntRange {
                    lo: lo as i64,
                    hi: hi as i64,
                    aff: None,
                }
            }
        } else {
            IntRange::TOP
        }
    }

    /// An affine form (coefficients in i128) over a box.
    fn affine(q: i128, kv: i128, c: i128, bx: &QBox) -> IntRange {
        let (lo, hi) = affine_range(q, kv, c, bx);
        if !(fits(lo) && fits(hi)) {
            return IntRange::TOP;
        }
        let aff = (fits(q) && fits(kv) && fits(c)).then_some(Affine {
            q: q as i64,
            kv: kv as i64,
            c: c as i64,
        });
        IntRange {
            lo: lo as i64,
            hi: hi as i64,
            aff,
        }
    }

    fn is_point(&self) -> Option<i64> {
        (self.lo == self.hi).then_some(self.lo)
    }

    fn hull(a: IntRange, b: IntRange) -> IntRange {
        if a == b {
            return a;
        }
        let aff = if a.aff.is_some() && a.aff == b.aff {
            a.aff
        } else {
            None
        };
        IntRange {
            lo: a.lo.min(b.lo),
            hi: a.hi.max(b.hi),
            aff,
        }
    }
}

/// A float abstract value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FloatRange {
    /// Any value, including NaN and infinities.
    Top,
    /// Finite bounds, `lo <= hi`; the value is never NaN.
    Range(f64, f64),
}

impl FloatRange {
    fn new(lo: f64, hi: f64) -> FloatRange {
        if lo.is_finite() && hi.is_finite() && lo <= hi {
            FloatRange::Range(lo, hi)
        } else {
            FloatRange::Top
        }
    }

    fn point(x: f64) -> FloatRange {
        FloatRange::new(x, x)
    }

    fn hull(a: FloatRange, b: FloatRange) -> FloatRange {
        match (a, b) {
            (FloatRange::Range(a0, a1), FloatRange::Range(b0, b1)) => {
                FloatRange::new(a0.min(b0), a1.max(b1))
            }
            _ => FloatRange::Top,
        }
    }

    /// Applies a monotone non-decreasing function to both ends.
    fn monotone(self, f: impl Fn(f64) -> f64) -> FloatRange {
        match self {
            FloatRange::Range(lo, hi) => FloatRange::new(f(lo), f(hi)),
            FloatRange::Top => FloatRange::Top,
        }
    }

    /// Combines with the four corners of an operation that is monotone in
    /// each argument on sign-constant domains.
    fn corners(a: FloatRange, b: FloatRange, f: impl Fn(f64, f64) -> f64) -> FloatRange {
        match (a, b) {
            (FloatRange::Range(a0, a1), FloatRange::Range(b0, b1)) => {
                let c = [f(a0, b0), f(a0, b1), f(a1, b0), f(a1, b1)];
                if c.iter().any(|x| !x.is_finite()) {
                    return FloatRange::Top;
                }
                FloatRange::new(
                    c.iter().copied().fold(f64::INFINITY, f64::min),
                    c.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                )
            }
            _ => FloatRange::Top,
        }
    }
}

/// An abstract value of any type.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AVal {
    Int(IntRange),
    Float(FloatRange),
    Bool(Tri),
}

impl AVal {
    pub fn top(ty: Type) -> AVal {
        match ty {
            Type::Int => AVal::Int(IntRange::TOP),
            Type::Float => AVal::Float(FloatRange::Top),
            Type::Bool => AVal::Bool(Tri::Unknown),
        }
    }

    fn of_value(v: Value) -> AVal {
        match v {
            Value::Int(i) => AVal::Int(IntRange::point(i)),
            Value::Float(x) => AVal::Float(FloatRange::point(x)),
            Value::Bool(b) => AVal::Bool(Tri::of(b)),
        }
    }

    fn int(self) -> IntRange {
        match self {
            AVal::Int(r) => r,
            v => unreachable!("checked int expression gave {v:?}"),
        }
    }

    fn float(self) -> FloatRange {
        match self {
            AVal::Float(r) => r,
            v => unreachable!("checked float expression gave {v:?}"),
        }
    }

    fn tri(self) -> Tri {
        match self {
            AVal::Bool(t) => t,
            v => unreachable!("checked bool expression gave {v:?}"),
        }
    }

    fn hull(a: AVal, b: AVal) -> AVal {
        match (a, b) {
            (AVal::Int(x), AVal::Int(y)) => AVal::Int(IntRange::hull(x, y)),
            (AVal::Float(x), AVal::Float(y)) => AVal::Float(FloatRange::hull(x, y)),
            (AVal::Bool(x), AVal::Bool(y)) => AVal::Bool(x.join(y)),
            (x, y) => unreachable!("join of {x:?} and {y:?}"),
        }
    }
}

/// The result of abstract evaluation: a value and whether evaluation might
/// fail somewhere in the box (then the value must not be used).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Abs {
    pub v: AVal,
    pub may_fail: bool,
}

impl Abs {
    fn ok(v: AVal) -> Abs {
        Abs { v, may_fail: false }
    }

    fn fail(ty: Type) -> Abs {
        Abs {
            v: AVal::top(ty),
            may_fail: true,
        }
    }

    /// The decided truth value of a bool result, if evaluation cannot fail.
    pub fn decided(&self) -> Option<bool> {
        if self.may_fail {
            return None;
        }
        match self.v {
            AVal::Bool(Tri::True) => Some(true),
            AVal::Bool(Tri::False) => Some(false),
            _ => None,
        }
    }
}

/// Evaluates expressions of one spec over boxes. Shared subtrees are
/// memoised per box.
pub struct AbsEval<'s> {
    spec: &'s Spec,
    shapes: Shapes,
    memo: Vec<(u64, Abs)>,
    generation: u64,
    bx: QBox,
    b: i64,
    h: i64,
    /// Per expression, whether it is evaluated concretely instead ([`Fold`]).
    folds: Vec<Fold>,
    /// The concrete evaluator of those (they read no buffer).
    ev: Evaluator<'s>,
    /// Their ranges by (expression, b, h, first and last position of the
    /// axis they depend on): the same query tile and key tiles recur from
    /// box to box and row to row. Cleared when it grows past
    /// [`FOLD_CACHE_ENTRIES`].
    fold_cache: std::collections::HashMap<(u32, i64, i64, i64, i64), AVal>,
}

/// Entries of the fold cache before it is cleared.
const FOLD_CACHE_ENTRIES: usize = 1 << 16;

/// Sub-expressions evaluated concretely over a box, for an exact range: those
/// that read no buffer or score (one whose evaluation fails somewhere in the
/// box is left to the rules), and depend
/// - on neither `q` nor `kv` (a per-head or per-batch constant, such as a
///   window computed from `h`): once per box;
/// - on one of them only, through bit operators (whose interval rules are
///   loose and keep no affine form, as in the coordinates of a Morton
///   index): once per position of that axis when the box spans at most
///   [`FOLD_LIMIT`] of them. (`%` is not folded: its rule keeps the affine
///   form `q % c == q - k c` over an aligned box, which a range cannot say.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fold {
    No,
    Once,
    OverQ,
    OverKv,
}

/// Positions of one axis a box may span for a [`Fold::OverQ`] or
/// [`Fold::OverKv`] sub-expression to be enumerated.
const FOLD_LIMIT: i64 = 128;

/// The [`Fold`] of every expression of `spec`, in arena order.
fn folds(spec: &Spec) -> Vec<Fold> {
    let mut loose = vec![false; spec.exprs.len()];
    let mut out = Vec::with_capacity(spec.exprs.len());
    for (i, e) in spec.exprs.iter().enumerate() {
        let own = matches!(
            e,
            Expr::Unary(UnaryOp::BitNot, _)
                | Expr::Binary(
                    BinaryOp::BitAnd
                        | BinaryOp::BitOr
                        | BinaryOp::BitXor
                        | BinaryOp::Shl
                        | BinaryOp::Shr,
                    _,
                    _
                )
        );
        loose[i] = own
            || e.operands()
                .iter()
                .any(|o| (o.0 as usize) < i && loose[o.0 as usize]);
        let id = ExprId(i as u32);
        let deps = spec.deps(id);
        let trivial = matches!(
            e,
            Expr::Const(_) | Expr::Var(_) | Expr::Shape(_) | Expr::Param(_) | Expr::Score
        );
        let (q, kv) = (deps.contains(Deps::Q), deps.contains(Deps::KV));
        out.push(
            // A sub-expression that may fail (a division, a shift) is folded
            // too: where its evaluation fails at some position, `fold` gives
            // up and the rules (which mark the box as failing) apply.
            if trivial || deps.contains(Deps::BUFFER) || deps.contains(Deps::SCORE) {
                Fold::No
            } else {
                match (q, kv) {
                    (false, false) => Fold::Once,
                    (true, false) if loose[i] => Fold::OverQ,
                    (false, true) if loose[i] => Fold::OverKv,
                    _ => Fold::No,
                }
            },
        );
    }
    out
}

impl<'s> AbsEval<'s> {
    /// An evaluator of `spec`'s expressions at `shapes`, with the call's
    /// `buffers` (only the folded sub-expressions, which read none, are
    /// evaluated concretely here).
    pub fn new(
        spec: &'s Spec,
        shapes: Shapes,
        buffers: &'s [crate::buffer::BufferData],
    ) -> AbsEval<'s> {
        AbsEval {
            spec,
            shapes,
            memo: vec![(0, Abs::ok(AVal::Bool(Tri::Unknown))); spec.exprs.len()],
            folds: folds(spec),
            ev: Evaluator::new(spec, shapes, buffers),
            fold_cache: std::collections::HashMap::new(),
            generation: 0,
            bx: QBox {
                q0: 0,
                q1: 0,
                k0: 0,
                k1: 0,
            },
            b: 0,
            h: 0,
        }
    }

    /// Number of boxes evaluated so far.
    pub fn evaluations(&self) -> u64 {
        self.generation
    }

    /// Sets the batch and head the following boxes are at.
    pub fn set_head(&mut self, b: i64, h: i64) {
        self.b = b;
        self.h = h;
    }

    /// After [`Self::eval`] of `root` left it undecided, the sub-expression
    /// that defeated the analysis: from `root`, down through undecided (or
    /// possibly failing) operands of the logical operators (`!`, `&&`, `||`,
    /// `if`), to the nodes that are undecided while their own operands are
    /// not logical ones left undecided (a comparison of ranges that overlap,
    /// a read of a buffer, ...). Of those, the first that is not a comparison
    /// of two affine forms of the positions: such a comparison is decided
    /// exactly, so it is open only on a box its boundary crosses, which the
    /// corner witnesses settle; what makes a box need element-by-element
    /// evaluation is the other operand (`(q - kv) % d == 0` beside a
    /// window's edge). The first of them when all are such comparisons.
    /// `None` when `root` is decided.
    pub fn culprit(&self, root: ExprId) -> Option<ExprId> {
        if !Self::open(self.now(root)?) {
            return None;
        }
        let mut leaves = Vec::new();
        self.open_leaves(root, &mut leaves);
        leaves
            .iter()
            .copied()
            .find(|&id| !self.exact_comparison(id))
            .or(leaves.first().copied())
    }

    /// The abstract value of `id` over the last box evaluated, if it was
    /// evaluated there.
    fn now(&self, id: ExprId) -> Option<Abs> {
        let (gen, a) = self.memo[id.0 as usize];
        (gen == self.generation).then_some(a)
    }

    fn open(a: Abs) -> bool {
        a.may_fail || matches!(a.v, AVal::Bool(Tri::Unknown))
    }

    /// The open nodes under `id` (itself open) that are not logical
    /// operators with open operands, in operand order.
    fn open_leaves(&self, id: ExprId, out: &mut Vec<ExprId>) {
        let operands = match self.spec.expr(id) {
            Expr::Unary(UnaryOp::Not, a) => vec![*a],
            Expr::Binary(BinaryOp::And | BinaryOp::Or, a, b) => vec![*a, *b],
            Expr::Select {
                cond,
                then,
                otherwise,
            } => vec![*cond, *then, *otherwise],
            _ => vec![],
        };
        let open: Vec<ExprId> = operands
            .into_iter()
            .filter(|&o| self.now(o).is_some_and(Self::open))
            .collect();
        if open.is_empty() {
            out.push(id);
        }
        for o in open {
            self.open_leaves(o, out);
        }
    }

    /// Whether `id` compares two affine forms of the positions over the last
    /// box (decided exactly wherever the box does not cross its boundary).
    fn exact_comparison(&self, id: ExprId) -> bool {
        let affine = |o: ExprId| {
            matches!(
                self.now(o),
                Some(Abs {
                    v: AVal::Int(IntRange { aff: Some(_), .. }),
                    may_fail: false,
                })
            )
        };
        match self.spec.expr(id) {
            Expr::Binary(op, a, b) if op.is_comparison() => affine(*a) && affine(*b),
            _ => false,
        }
    }

    /// Evaluates `id` over `bx`.
    pub fn eval(&mut self, id: ExprId, bx: QBox, sums: &mut Summaries<'_>) -> Abs {
        debug_assert!(bx.q0 <= bx.q1 && bx.k0 <= bx.k1);
        self.generation += 1;
        self.bx = bx;
        self.go(id, sums)
    }

    fn go(&mut self, id: ExprId, sums: &mut Summaries<'_>) -> Abs {
        let slot = self.memo[id.0 as usize];
        if slot.0 == self.generation {
            return slot.1;
        }
        let r = match self.fold(id) {
            Some(exact) => exact,
            None => self.compute(id, sums),
        };
        self.memo[id.0 as usize] = (self.generation, r);
        r
    }

    /// The exact range of a [`Fold`] sub-expression over the box, by
    /// evaluating it at every position it depends on; `None` when it is not
    /// folded here.
    fn fold(&mut self, id: ExprId) -> Option<Abs> {
        let bx = self.bx;
        let fold = self.folds[id.0 as usize];
        let span = match fold {
            Fold::No => return None,
            Fold::Once => (0, 0),
            Fold::OverQ if bx.q1 - bx.q0 < FOLD_LIMIT => (bx.q0, bx.q1),
            Fold::OverKv if bx.k1 - bx.k0 < FOLD_LIMIT => (bx.k0, bx.k1),
            _ => return None,
        };
        let key = (id.0, self.b, self.h, span.0, span.1);
        if let Some(v) = self.fold_cache.get(&key) {
            return Some(Abs::ok(*v));
        }
        let positions: Vec<(i64, i64)> = match fold {
            Fold::OverQ => (span.0..=span.1).map(|q| (q, bx.k0)).collect(),
            Fold::OverKv => (span.0..=span.1).map(|k| (bx.q0, k)).collect(),
            _ => vec![(bx.q0, bx.k0)],
        };
        let mut acc: Option<AVal> = None;
        for (q, kv) in positions {
            let point = crate::sema::eval::Point {
                b: self.b,
                h: self.h,
                q,
                kv,
                score: 0.0,
            };
            // A failure (a division by zero, a shift out of range) leaves the
            // box to the rules, which report it as possibly failing.
            let v = AVal::of_value(self.ev.eval(id, point).ok()?);
            acc = Some(match acc {
                None => v,
                Some(a) => AVal::hull(a, v),
            });
        }
        if self.fold_cache.len() >= FOLD_CACHE_ENTRIES {
            self.fold_cache.clear();
        }
        self.fold_cache.insert(key, acc?);
        acc.map(Abs::ok)
    }

    fn compute(&mut self, id: ExprId, sums: &mut Summaries<'_>) -> Abs {
        let spec = self.spec;
        let bx = self.bx;
        match spec.expr(id) {
            Expr::Const(v) => Abs::ok(AVal::of_value(*v)),
            Expr::Var(v) => Abs::ok(AVal::Int(match v {
                Var::B => IntRange::point(self.b),
                Var::H => IntRange::point(self.h),
                Var::Q => IntRange {
                    lo: bx.q0,
                    hi: bx.q1,
                    aff: Some(Affine { q: 1, kv: 0, c: 0 }),
                },
                Var::Kv => IntRange {
                    lo: bx.k0,
                    hi: bx.k1,
                    aff: Some(Affine { q: 0, kv: 1, c: 0 }),
                },
            })),
            Expr::Shape(s) => Abs::ok(AVal::Int(IntRange::point(self.shape(*s)))),
            // Never inside a mask; the checker rejects it.
            Expr::Score => Abs::ok(AVal::Float(FloatRange::Top)),
            Expr::Param(p) => Abs::ok(AVal::of_value(spec.param(*p).value)),
            Expr::Load { buffer, indices } => {
                let ty = spec.ty(id);
                let mut ranges = [(0i64, 0i64); MAX_DIMS];
                if indices.len() > MAX_DIMS {
                    return Abs::fail(ty);
                }
                let mut may_fail = false;
                for (k, &i) in indices.iter().enumerate() {
                    let a = self.go(i, sums);
                    let r = a.v.int();
                    if a.may_fail || r.lo < 0 || r.hi as u64 >= sums.shape(*buffer)[k] as u64 {
                        may_fail = true;
                    }
                    ranges[k] = (r.lo, r.hi);
                }
                if may_fail {
                    return Abs::fail(ty);
                }
                Abs::ok(sums.summary(*buffer, &ranges[..indices.len()]))
            }
            Expr::Unary(UnaryOp::Neg, a) => {
                let a = self.go(*a, sums);
                let v = match a.v {
                    AVal::Int(r) => AVal::Int(neg(r, &bx)),
                    AVal::Float(r) => AVal::Float(match r {
                        FloatRange::Range(lo, hi) => FloatRange::new(-hi, -lo),
                        FloatRange::Top => FloatRange::Top,
                    }),
                    v => unreachable!("neg of {v:?}"),
                };
                Abs {
                    v,
                    may_fail: a.may_fail,
                }
            }
            Expr::Unary(UnaryOp::Not, a) => {
                let a = self.go(*a, sums);
                Abs {
                    v: AVal::Bool(a.v.tri().not()),
                    may_fail: a.may_fail,
                }
            }
            Expr::Unary(UnaryOp::BitNot, a) => {
                // `~x == -x - 1`.
                let a = self.go(*a, sums);
                let r = a.v.int();
                Abs {
                    v: AVal::Int(IntRange::interval(-(r.hi as i128) - 1, -(r.lo as i128) - 1)),
                    may_fail: a.may_fail,
                }
            }
            Expr::Binary(op @ (BinaryOp::And | BinaryOp::Or), x, y) => {
                let a = self.go(*x, sums);
                if a.may_fail {
                    return Abs::fail(Type::Bool);
                }
                // The value of `x` that makes the right side irrelevant.
                let short = if *op == BinaryOp::And {
                    Tri::False
                } else {
                    Tri::True
                };
                match a.v.tri() {
                    t if t == short => Abs::ok(AVal::Bool(t)),
                    Tri::Unknown => {
                        let b = self.go(*y, sums);
                        let t = if b.v.tri() == short {
                            short
                        } else {
                            Tri::Unknown
                        };
                        Abs {
                            v: AVal::Bool(t),
                            may_fail: b.may_fail,
                        }
                    }
                    _ => self.go(*y, sums),
                }
            }
            Expr::Binary(op, x, y) => {
                let (a, b) = (self.go(*x, sums), self.go(*y, sums));
                let may_fail = a.may_fail || b.may_fail;
                match binary(*op, a.v, b.v, &bx) {
                    Some(v) => Abs { v, may_fail },
                    // A divisor that may be zero.
                    None => Abs::fail(spec.ty(id)),
                }
            }
            Expr::Select {
                cond,
                then,
                otherwise,
            } => {
                let c = self.go(*cond, sums);
                if c.may_fail {
                    return Abs::fail(spec.ty(id));
                }
                match c.v.tri() {
                    Tri::True => self.go(*then, sums),
                    Tri::False => self.go(*otherwise, sums),
                    Tri::Unknown => {
                        let (a, b) = (self.go(*then, sums), self.go(*otherwise, sums));
                        Abs {
                            v: AVal::hull(a.v, b.v),
                            may_fail: a.may_fail || b.may_fail,
                        }
                    }
                }
            }
            Expr::Call(f, args) => {
                let mut vals = [AVal::Bool(Tri::Unknown); 3];
                let mut may_fail = false;
                for (slot, &a) in vals.iter_mut().zip(args) {
                    let r = self.go(a, sums);
                    may_fail |= r.may_fail;
                    *slot = r.v;
                }
                Abs {
                    v: call(*f, &vals[..args.len()], &bx),
                    may_fail,
                }
            }
            Expr::Ancestor { parent, i, j } => {
                let (a, b) = (self.go(*i, sums), self.go(*j, sums));
                if a.may_fail || b.may_fail {
                    return Abs::fail(Type::Bool);
                }
                let (i, j) = (a.v.int(), b.v.int());
                if i.is_point().is_some() && i.is_point() == j.is_point() {
                    // `ancestor(p, x, x)` is true without reading `p`.
                    return Abs::ok(AVal::Bool(Tri::True));
                }
                let forest = sums.forest(*parent);
                if !forest.valid || i.lo < 0 || i.hi as u64 >= forest.len as u64 {
                    return Abs::fail(Type::Bool);
                }
                // In an ordered forest every ancestor of i is below i.
                if forest.ordered && j.lo > i.hi {
                    return Abs::ok(AVal::Bool(Tri::False));
                }
                Abs::ok(AVal::Bool(Tri::Unknown))
            }
        }
    }

    fn shape(&self, s: ShapeVar) -> i64 {
        self.shapes.get(s) as i64
    }
}

/// The most buffer dimensions summarised; more fall back to elements.
pub const MAX_DIMS: usize = 8;

fn neg(r: IntRange, bx: &QBox) -> IntRange {
    match r.aff {
        Some(a) => IntRange::affine(-(a.q as i128), -(a.kv as i128), -(a.c as i128), bx),
        None => IntRange::interval(-(r.hi as i128), -(r.lo as i128)),
    }
}

fn add(a: IntRange, b: IntRange, sign: i128, bx: &QBox) -> IntRange {
    match (a.aff, b.aff) {
        (Some(x), Some(y)) => IntRange::affine(
            x.q as i128 + sign * y.q as i128,
            x.kv as i128 + sign * y.kv as i128,
            x.c as i128 + sign * y.c as i128,
            bx,
        ),
        _ => {
            let (blo, bhi) = if sign > 0 {
                (b.lo as i128, b.hi as i128)
            } else {
                (-(b.hi as i128), -(b.lo as i128))
            };
            IntRange::interval(a.lo as i128 + blo, a.hi as i128 + bhi)
        }
    }
}

fn mul(a: IntRange, b: IntRange, bx: &QBox) -> IntRange {
    let scale = |r: IntRange, k: i64| -> Option<IntRange> {
        r.aff.map(|x| {
            IntRange::affine(
                x.q as i128 * k as i128,
                x.kv as i128 * k as i128,
                x.c as i128 * k as i128,
                bx,
            )
        })
    };
    if let Some(k) = b.is_point() {
        if let Some(r) = scale(a, k) {
            return r;
        }
    }
    if let Some(k) = a.is_point() {
        if let Some(r) = scale(b, k) {
            return r;
        }
    }
    let c = [
        a.lo as i128 * b.lo as i128,
        a.lo as i128 * b.hi as i128,
        a.hi as i128 * b.lo as i128,
        a.hi as i128 * b.hi as i128,
    ];
    IntRange::interval(*c.iter().min().unwrap(), *c.iter().max().unwrap())
}

/// Floor division; `None` when the divisor may be zero.
fn div(a: IntRange, b: IntRange) -> Option<IntRange> {
    if b.lo <= 0 && b.hi >= 0 {
        return None;
    }
    // Floor division is monotone in each argument on a sign-constant divisor,
    // so the corners bound it. Only i64::MIN / -1 leaves i64.
    let fd = |x: i64, y: i64| -> i128 {
        if x == i64::MIN && y == -1 {
            return -(i64::MIN as i128);
        }
        let q = x / y;
        (if x % y != 0 && ((x < 0) != (y < 0)) {
            q - 1
        } else {
            q
        }) as i128
    };
    let c = [
        fd(a.lo, b.lo),
        fd(a.lo, b.hi),
        fd(a.hi, b.lo),
        fd(a.hi, b.hi),
    ];
    Some(IntRange::interval(
        *c.iter().min().unwrap(),
        *c.iter().max().unwrap(),
    ))
}

/// Floor modulo; `None` when the divisor may be zero.
fn rem(a: IntRange, b: IntRange, bx: &QBox) -> Option<IntRange> {
    if b.lo <= 0 && b.hi >= 0 {
        return None;
    }
    if let Some(c) = b.is_point() {
        let (qlo, qhi) = (floor_div(a.lo, c)?, floor_div(a.hi, c)?);
        if qlo == qhi {
            // One quotient k over the box: a % c = a - c*k, monotone in a.
            if let Some(x) = a.aff {
                let k = qlo as i128 * c as i128;
                return Some(IntRange::affine(
                    x.q as i128,
                    x.kv as i128,
                    x.c as i128 - k,
                    bx,
                ));
            }
            return Some(IntRange::interval(
                floor_mod(a.lo, c)? as i128,
                floor_mod(a.hi, c)? as i128,
            ));
        }
    }
    // The remainder has the divisor's sign and is smaller in magnitude.
    Some(if b.lo > 0 {
        if a.lo >= 0 && a.hi < b.lo {
            a
        } else {
            IntRange::interval(0, b.hi as i128 - 1)
        }
    } else {
        IntRange::interval(b.lo as i128 + 1, 0)
    })
}

/// Compares two int values: the truth of `d OP 0` where `d = a - b`.
fn compare_int(op: BinaryOp, a: IntRange, b: IntRange, bx: &QBox) -> Tri {
    // The exact range of a - b.
    let (dlo, dhi) = match (a.aff, b.aff) {
        (Some(x), Some(y)) => affine_range(
            x.q as i128 - y.q as i128,
            x.kv as i128 - y.kv as i128,
            x.c as i128 - y.c as i128,
            bx,
        ),
        _ => (a.lo as i128 - b.hi as i128, a.hi as i128 - b.lo as i128),
    };
    compare_diff(op, dlo, dhi)
}

fn compare_diff<T: PartialOrd + Default>(op: BinaryOp, dlo: T, dhi: T) -> Tri {
    let z = T::default();
    let (always, never) = match op {
        BinaryOp::Lt => (dhi < z, dlo >= z),
        BinaryOp::Le => (dhi <= z, dlo > z),
        BinaryOp::Gt => (dlo > z, dhi <= z),
        BinaryOp::Ge => (dlo >= z, dhi < z),
        BinaryOp::Eq => (dlo == z && dhi == z, dlo > z || dhi < z),
        BinaryOp::Ne => (dlo > z || dhi < z, dlo == z && dhi == z),
        _ => unreachable!("not a comparison"),
    };
    if always {
        Tri::True
    } else if never {
        Tri::False
    } else {
        Tri::Unknown
    }
}

fn compare_float(op: BinaryOp, a: FloatRange, b: FloatRange) -> Tri {
    let (FloatRange::Range(a0, a1), FloatRange::Range(b0, b1)) = (a, b) else {
        return Tri::Unknown;
    };
    // Bounds of a - b, computed without rounding by comparing the ends.
    let always_lt = a1 < b0;
    let never_lt = a0 >= b1;
    let always_le = a1 <= b0;
    let never_le = a0 > b1;
    let always_eq = a0 == a1 && b0 == b1 && a0 == b0;
    let never_eq = a1 < b0 || b1 < a0;
    let (always, never) = match op {
        BinaryOp::Lt => (always_lt, never_lt),
        BinaryOp::Le => (always_le, never_le),
        BinaryOp::Gt => (never_le, always_le),
        BinaryOp::Ge => (never_lt, always_lt),
        BinaryOp::Eq => (always_eq, never_eq),
        BinaryOp::Ne => (never_eq, always_eq),
        _ => unreachable!("not a comparison"),
    };
    if always {
        Tri::True
    } else if never {
        Tri::False
    } else {
        Tri::Unknown
    }
}

/// `&`, `|`, `^` over int ranges: exact on two points; on non-negative
/// ranges bounded by the bits they can hold (`x & y <= min(x, y)`; `x | y` and
/// `x ^ y` stay below the next power of two above both); `x & m` with a
/// non-negative point `m` lies in `0..=m`; otherwise any int.
fn bits(op: BinaryOp, x: IntRange, y: IntRange) -> IntRange {
    if let (Some(a), Some(b)) = (x.is_point(), y.is_point()) {
        return IntRange::point(match op {
            BinaryOp::BitAnd => a & b,
            BinaryOp::BitOr => a | b,
            _ => a ^ b,
        });
    }
    let nonneg = |r: IntRange| r.lo >= 0;
    let below_pow2 = |hi: i64| {
        // The largest value with no bit above hi's top bit.
        if hi <= 0 {
            0
        } else {
            (1i64 << (63 - hi.leading_zeros()))
                .wrapping_shl(1)
                .wrapping_sub(1)
                .max(hi)
        }
    };
    match op {
        BinaryOp::BitAnd if nonneg(x) && nonneg(y) => IntRange::interval(0, x.hi.min(y.hi) as i128),
        BinaryOp::BitAnd if nonneg(x) => IntRange::interval(0, x.hi as i128),
        BinaryOp::BitAnd if nonneg(y) => IntRange::interval(0, y.hi as i128),
        BinaryOp::BitOr if nonneg(x) && nonneg(y) => {
            IntRange::interval(x.lo.max(y.lo) as i128, below_pow2(x.hi.max(y.hi)) as i128)
        }
        BinaryOp::BitXor if nonneg(x) && nonneg(y) => {
            IntRange::interval(0, below_pow2(x.hi.max(y.hi)) as i128)
        }
        _ => IntRange::TOP,
    }
}

/// `<<` and `>>` over int ranges; `None` when a count may fall outside
/// `0..=63` (the evaluator fails there). `>>` is monotone in the value and
/// antitone in the count on non-negative values (and monotone on negative
/// ones); `<<` is exact where no bit leaves the value.
fn shift(op: BinaryOp, x: IntRange, n: IntRange) -> Option<IntRange> {
    if n.lo < 0 || n.hi > 63 {
        return None;
    }
    let (n0, n1) = (n.lo as u32, n.hi as u32);
    Some(match op {
        BinaryOp::Shr => {
            let ends = [x.lo >> n0, x.lo >> n1, x.hi >> n0, x.hi >> n1];
            IntRange::interval(
                *ends.iter().min().unwrap() as i128,
                *ends.iter().max().unwrap() as i128,
            )
        }
        _ => {
            // x * 2^n, exact while it fits in i64 (then `<<` equals it).
            let ends = [
                (x.lo as i128) << n0,
                (x.lo as i128) << n1,
                (x.hi as i128) << n0,
                (x.hi as i128) << n1,
            ];
            IntRange::interval(*ends.iter().min().unwrap(), *ends.iter().max().unwrap())
        }
    })
}

/// A non-short-circuit binary operator; `None` when an int divisor may be 0
/// or a shift count may fall outside `0..=63`.
fn binary(op: BinaryOp, a: AVal, b: AVal, bx: &QBox) -> Option<AVal> {
    use BinaryOp::*;
    Some(match (a, b) {
        (AVal::Int(x), AVal::Int(y)) => match op {
            Add => AVal::Int(add(x, y, 1, bx)),
            Sub => AVal::Int(add(x, y, -1, bx)),
            Mul => AVal::Int(mul(x, y, bx)),
            Div => AVal::Int(match y.is_point() {
                // One quotient over the box: a constant.
                Some(c) if c > 0 && floor_div(x.lo, c) == floor_div(x.hi, c) => {
                    IntRange::point(floor_div(x.lo, c)?)
                }
                _ => div(x, y)?,
            }),
            Rem => AVal::Int(rem(x, y, bx)?),
            BitAnd | BitOr | BitXor => AVal::Int(bits(op, x, y)),
            Shl | Shr => AVal::Int(shift(op, x, y)?),
            Eq | Ne | Lt | Le | Gt | Ge => AVal::Bool(compare_int(op, x, y, bx)),
            And | Or => unreachable!("logical op on ints"),
        },
        (AVal::Float(x), AVal::Float(y)) => match op {
            Add => AVal::Float(FloatRange::corners(x, y, |p, q| p + q)),
            Sub => AVal::Float(FloatRange::corners(x, y, |p, q| p - q)),
            Mul => AVal::Float(FloatRange::corners(x, y, |p, q| p * q)),
            Div => AVal::Float(match y {
                FloatRange::Range(lo, hi) if lo > 0.0 || hi < 0.0 => {
                    FloatRange::corners(x, y, |p, q| p / q)
                }
                _ => FloatRange::Top,
            }),
            Rem => AVal::Float(FloatRange::Top),
            Eq | Ne | Lt | Le | Gt | Ge => AVal::Bool(compare_float(op, x, y)),
            And | Or | BitAnd | BitOr | BitXor | Shl | Shr => {
                unreachable!("logical or bit op on floats")
            }
        },
        (AVal::Bool(x), AVal::Bool(y)) => AVal::Bool(match op {
            Eq | Ne => {
                let t = match (x, y) {
                    (Tri::Unknown, _) | (_, Tri::Unknown) => Tri::Unknown,
                    (p, q) => Tri::of(p == q),
                };
                if op == Eq {
                    t
                } else {
                    t.not()
                }
            }
            _ => unreachable!("arithmetic on bools"),
        }),
        (x, y) => unreachable!("checked binary op on {x:?} and {y:?}"),
    })
}

fn int_min(a: IntRange, b: IntRange) -> IntRange {
    if a.hi <= b.lo {
        a
    } else if b.hi <= a.lo {
        b
    } else {
        IntRange {
            lo: a.lo.min(b.lo),
            hi: a.hi.min(b.hi),
            aff: None,
        }
    }
}

fn int_max(a: IntRange, b: IntRange) -> IntRange {
    if a.lo >= b.hi {
        a
    } else if b.lo >= a.hi {
        b
    } else {
        IntRange {
            lo: a.lo.max(b.lo),
            hi: a.hi.max(b.hi),
            aff: None,
        }
    }
}

fn float_min(a: FloatRange, b: FloatRange) -> FloatRange {
    FloatRange::corners(a, b, f64::min)
}

fn float_max(a: FloatRange, b: FloatRange) -> FloatRange {
    FloatRange::corners(a, b, f64::max)
}

/// A built-in function on checked arguments.
fn call(f: Func, args: &[AVal], bx: &QBox) -> AVal {
    match f {
        Func::Float => AVal::Float(match args[0] {
            AVal::Int(r) => FloatRange::new(r.lo as f64, r.hi as f64),
            AVal::Bool(Tri::True) => FloatRange::point(1.0),
            AVal::Bool(Tri::False) => FloatRange::point(0.0),
            AVal::Bool(Tri::Unknown) => FloatRange::new(0.0, 1.0),
            AVal::Float(r) => r,
        }),
        Func::Int => AVal::Int(match args[0] {
            // Truncation (saturating) is monotone non-decreasing.
            AVal::Float(FloatRange::Range(lo, hi)) => {
                IntRange::interval(lo as i64 as i128, hi as i64 as i128)
            }
            AVal::Float(FloatRange::Top) => IntRange::TOP,
            AVal::Bool(Tri::True) => IntRange::point(1),
            AVal::Bool(Tri::False) => IntRange::point(0),
            AVal::Bool(Tri::Unknown) => IntRange::interval(0, 1),
            AVal::Int(r) => r,
        }),
        Func::Abs => match args[0] {
            AVal::Int(r) => AVal::Int(if r.lo >= 0 {
                r
            } else if r.hi <= 0 {
                neg(r, bx)
            } else {
                IntRange::interval(0, (-(r.lo as i128)).max(r.hi as i128))
            }),
            AVal::Float(r) => AVal::Float(match r {
                FloatRange::Range(lo, _) if lo >= 0.0 => r,
                FloatRange::Range(lo, hi) if hi <= 0.0 => FloatRange::new(-hi, -lo),
                FloatRange::Range(lo, hi) => FloatRange::new(0.0, (-lo).max(hi)),
                FloatRange::Top => FloatRange::Top,
            }),
            v => unreachable!("abs of {v:?}"),
        },
        Func::Min | Func::Max | Func::Clamp => {
            let pick_min = |a: AVal, b: AVal| match (a, b) {
                (AVal::Int(x), AVal::Int(y)) => AVal::Int(int_min(x, y)),
                (a, b) => AVal::Float(float_min(a.float(), b.float())),
            };
            let pick_max = |a: AVal, b: AVal| match (a, b) {
                (AVal::Int(x), AVal::Int(y)) => AVal::Int(int_max(x, y)),
                (a, b) => AVal::Float(float_max(a.float(), b.float())),
            };
            match f {
                Func::Min => pick_min(args[0], args[1]),
                Func::Max => pick_max(args[0], args[1]),
                _ => pick_min(pick_max(args[0], args[1]), args[2]),
            }
        }
        Func::Floor => AVal::Float(args[0].float().monotone(f64::floor)),
        Func::Ceil => AVal::Float(args[0].float().monotone(f64::ceil)),
        Func::Round => AVal::Float(args[0].float().monotone(f64::round_ties_even)),
        // sign is monotone non-decreasing.
        Func::Sign => match args[0] {
            AVal::Int(r) => AVal::Int(IntRange::interval(
                (r.lo as i128).signum(),
                (r.hi as i128).signum(),
            )),
            a => AVal::Float(a.float().monotone(crate::sema::eval::sign)),
        },
        // Transcendental functions: libm gives no monotonicity guarantee.
        Func::Exp
        | Func::Exp2
        | Func::Log
        | Func::Log2
        | Func::Sqrt
        | Func::Rsqrt
        | Func::Tanh
        | Func::Sigmoid
        | Func::Pow => AVal::Float(FloatRange::Top),
        // Bounded for finite arguments on every backend: sin and cos are
        // clamped to [-1, 1] after their reduction (tile::math), erf's two
        // branches stay within it; `tanh.approx.f32` may overshoot 1 by its
        // relative error (2^-10.987). No monotonicity is claimed: the f32
        // forms are not proven monotone.
        Func::Sin | Func::Cos | Func::Erf => AVal::Float(match args[0].float() {
            FloatRange::Range(..) => FloatRange::new(-1.0, 1.0),
            FloatRange::Top => FloatRange::Top,
        }),
        Func::TanhApprox => AVal::Float(match args[0].float() {
            FloatRange::Range(..) => FloatRange::new(-1.001, 1.001),
            FloatRange::Top => FloatRange::Top,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::BufferData;
    use crate::driver::{load, SourceFile, SpecOptions};
    use crate::sema::eval::{Evaluator, Point};

    fn spec(mask: &str) -> Spec {
        load(
            SourceFile::new("t.attn", format!("attention t {{ mask = {mask} }}")),
            &SpecOptions::default(),
        )
        .unwrap()
        .spec
    }

    fn shapes() -> Shapes {
        Shapes {
            b: 1,
            h: 1,
            hkv: 1,
            q: 1000,
            kv: 1000,
            d: 1,
        }
    }

    /// Evaluates the mask over a box abstractly.
    fn eval(mask: &str, bx: QBox) -> Abs {
        let s = spec(mask);
        let buffers: [BufferData; 0] = [];
        let mut sums = Summaries::new(&buffers);
        AbsEval::new(&s, shapes(), &[]).eval(s.mask.unwrap(), bx, &mut sums)
    }

    fn bx(q0: i64, q1: i64, k0: i64, k1: i64) -> QBox {
        QBox { q0, q1, k0, k1 }
    }

    /// Checks that an abstract result is sound against every point, and
    /// returns the set of concrete values seen.
    fn sound(mask: &str, b: QBox) -> (bool, bool) {
        let s = spec(mask);
        let a = eval(mask, b);
        let buffers: [BufferData; 0] = [];
        let mut ev = Evaluator::new(&s, shapes(), &buffers);
        let (mut t, mut f) = (false, false);
        for q in b.q0..=b.q1 {
            for kv in b.k0..=b.k1 {
                match ev.eval_bool(
                    s.mask.unwrap(),
                    Point {
                        q,
                        kv,
                        ..Point::default()
                    },
                ) {
                    Ok(true) => t = true,
                    Ok(false) => f = true,
                    Err(_) => assert!(
                        a.may_fail,
                        "`{mask}` fails at ({q}, {kv}) but the box was proved not to fail"
                    ),
                }
            }
        }
        if let Some(v) = a.decided() {
            assert!(
                if v { !f } else { !t },
                "`{mask}` decided {v} over {b:?} but both values occur"
            );
        }
        (t, f)
    }

    /// Checks each `(mask, box, decision)`: the abstract value of `mask` over `box`
    /// decides it as given (`None`: not decided).
    fn check_decisions(cases: &[(&str, QBox, Option<bool>)]) {
        for &(mask, b, want) in cases {
            assert_eq!(eval(mask, b).decided(), want, "`{mask}` over {b:?}");
        }
    }

    /// The culprit of an undecided box: past the window's edge (an affine
    /// comparison, open only where the box crosses it) to the residue class
    /// beside it; the first open term when every one is affine.
    #[test]
    fn the_culprit_is_the_term_affine_analysis_cannot_settle() {
        let culprit = |mask: &str, b: QBox| {
            let s = spec(mask);
            let buffers: [BufferData; 0] = [];
            let mut sums = Summaries::new(&buffers);
            let mut abs = AbsEval::new(&s, shapes(), &[]);
            abs.eval(s.mask.unwrap(), b, &mut sums);
            let source = format!("attention t {{ mask = {mask} }}");
            abs.culprit(s.mask.unwrap()).map(|id| {
                // The span of a term that opens with `(` starts inside it:
                // compare without parentheses.
                let span = s.span(id);
                source[span.start..span.end].replace(['(', ')'], "")
            })
        };
        // A box across the window's edge at q - kv = 128, below the diagonal.
        let edge = bx(128, 191, 0, 63);
        assert_eq!(
            culprit("causal && q - kv < 128 && (q - kv) % 2 == 0", edge).as_deref(),
            Some("q - kv % 2 == 0")
        );
        assert_eq!(
            culprit("(q - kv) % 2 == 0 && causal", bx(0, 63, 0, 63)).as_deref(),
            Some("q - kv % 2 == 0")
        );
        assert_eq!(
            culprit("causal && q - kv < 128", edge).as_deref(),
            Some("q - kv < 128")
        );
        assert_eq!(culprit("causal && q - kv < 128", bx(200, 263, 0, 63)), None);
    }

    #[test]
    fn affine_comparisons_are_decided_exactly() {
        check_decisions(&[
            // Causal: a box entirely below, above and across the diagonal.
            ("causal", bx(100, 199, 0, 99), Some(true)),
            ("causal", bx(0, 99, 100, 199), Some(false)),
            ("causal", bx(0, 99, 50, 149), None),
            // The same variable on both sides: only affine forms decide this.
            ("q + kv < 2 * q", bx(100, 199, 0, 99), Some(true)),
            ("q - kv - (q - kv) == 0", bx(0, 999, 0, 999), Some(true)),
            // A window edge.
            ("q - kv < 128", bx(128, 191, 64, 127), Some(true)),
            ("q - kv < 128", bx(128, 191, 0, 63), None),
        ]);
    }

    #[test]
    fn division_and_modulo_by_constants() {
        check_decisions(&[
            // Both q and kv in one chunk of 96.
            ("q / 96 == kv / 96", bx(100, 150, 96, 191), Some(true)),
            ("q / 96 == kv / 96", bx(100, 150, 0, 95), Some(false)),
            ("q / 96 == kv / 96", bx(100, 150, 0, 100), None),
            // Floor semantics on negatives: (q - kv) / 4 over q - kv in [-8, -5] is -2.
            ("(q - kv) / 4 == -2", bx(0, 3, 8, 8), Some(true)),
            ("(q - kv) / 4 == -2", bx(0, 4, 9, 9), None),
            // One quotient keeps the remainder affine: q % 16 = q - 32 here.
            (
                "q % 16 - kv % 16 == q - kv - 16",
                bx(32, 47, 16, 31),
                Some(true),
            ),
            ("q % 16 < 16 && q % 16 >= 0", bx(0, 999, 0, 999), Some(true)),
        ]);
    }

    #[test]
    fn bounded_math_decides_and_sign_is_monotone() {
        check_decisions(&[
            ("sin(float(q - kv)) <= 1.0", bx(0, 999, 0, 999), Some(true)),
            (
                "cos(float(q)) > 1.5 || erf(float(kv)) < -1.5",
                bx(0, 999, 0, 999),
                Some(false),
            ),
            (
                "tanh_approx(float(q)) < 1.01",
                bx(0, 999, 0, 999),
                Some(true),
            ),
            // Not monotone: a range in between stays undecided.
            ("sin(float(q)) > 0.5", bx(0, 999, 0, 999), None),
            ("sign(q - kv) == 1", bx(100, 199, 0, 99), Some(true)),
            ("sign(q - kv) >= 0", bx(0, 99, 100, 199), Some(false)),
            (
                "sign(float(q - kv)) < 0.0",
                bx(100, 199, 0, 99),
                Some(false),
            ),
            ("pow(2.0, float(q)) > 0.0", bx(0, 9, 0, 9), None),
        ]);
        for (mask, b) in [
            ("sin(float(q - kv)) <= 1.0", bx(0, 40, 0, 40)),
            ("sign(q - kv) == 1", bx(0, 40, 0, 40)),
            ("erf(float(q - kv) * 0.1) > 0.5", bx(0, 40, 0, 40)),
        ] {
            sound(mask, b);
        }
    }

    #[test]
    fn abs_min_max_clamp_if_and_floats() {
        check_decisions(&[
            ("abs(q - kv) <= 10", bx(100, 105, 98, 104), Some(true)),
            ("abs(q - kv) <= 10", bx(100, 105, 200, 300), Some(false)),
            ("min(q, kv) >= 50", bx(60, 70, 50, 90), Some(true)),
            ("max(q, kv) < 50", bx(60, 70, 0, 10), Some(false)),
            ("clamp(q - kv, 0, 8) == 8", bx(100, 110, 0, 50), Some(true)),
            (
                "if q > 500 { kv < 10 } else { kv >= 0 }",
                bx(0, 100, 0, 999),
                Some(true),
            ),
            (
                "if q > 50 { kv < 10 } else { kv >= 0 }",
                bx(0, 100, 0, 5),
                Some(true),
            ),
            ("float(q - kv) * 0.5 < 3.0", bx(0, 5, 0, 10), Some(true)),
            ("float(q - kv) * 0.5 < 3.0", bx(0, 10, 0, 10), None),
            (
                "float(q) * 0.5 > float(kv)",
                bx(100, 110, 0, 40),
                Some(true),
            ),
            // Transcendental functions are not trusted to be monotone.
            ("exp(float(kv - q)) < 1.0", bx(100, 110, 0, 40), None),
        ]);
    }

    #[test]
    fn short_circuits_and_failures() {
        // A divisor that may be zero fails, unless a guard rules it out first.
        assert!(eval("kv / (q - 5) > 0", bx(0, 10, 0, 10)).may_fail);
        assert!(!eval("kv / (q - 5) > 0", bx(6, 10, 0, 10)).may_fail);
        assert!(!eval("q > 20 && kv / (q - 5) > 0", bx(0, 10, 0, 10)).may_fail);
        assert!(eval("q > 2 && kv / (q - 5) > 0", bx(0, 10, 0, 10)).may_fail);
        // || with a true left side never evaluates its right side.
        assert_eq!(
            eval("kv < 100 || kv / (q - 5) > 0", bx(0, 10, 0, 10)).decided(),
            Some(true)
        );
        // Overflow makes a value unknown, never wrong.
        let huge = eval("q * 4611686018427387904 * 4 < 0", bx(1, 2, 0, 0));
        assert!(!huge.may_fail);
        assert_eq!(huge.decided(), None);
    }

    #[test]
    fn bit_operators_are_bounded() {
        let b = bx(0, 23, 0, 23);
        check_decisions(&[
            ("(q & 7) <= 7", b, Some(true)),
            ("(q & kv) <= 23", b, Some(true)),
            ("(q | 8) >= 8", b, Some(true)),
            ("(q | kv) <= 31", b, Some(true)),
            ("(q ^ kv) <= 31", b, Some(true)),
            ("(q >> 2) < 6", b, Some(true)),
            ("(q << 2) <= 92", b, Some(true)),
            ("~q < 0", b, Some(true)),
            ("~q >= -24", b, Some(true)),
            // Two points: exact.
            ("(5 ^ 3) == 6", b, Some(true)),
            // A count that may leave 0..=63 may fail: not decided.
            ("(q << (kv - 1)) >= 0", b, None),
            ("(q >> (kv % 64)) >= 0", b, Some(true)),
        ]);
        assert!(eval("(1 << (q - kv)) > 0", b).may_fail);
        assert!(!eval("(1 << (q % 8)) > 0", b).may_fail);
    }

    #[test]
    fn abstract_results_are_sound_on_small_boxes() {
        let masks = [
            "causal",
            "q - kv < 7 && causal",
            "(q - kv) % 3 == 0",
            "q / 5 != kv / 7",
            "abs(q / 4 - kv / 4) <= 1 && abs(q % 4 - kv % 4) <= 1",
            "min(q, kv) * 2 > max(q, kv) + 3",
            "!(kv < 4) || q + kv > 20",
            "if q % 2 == 0 { kv <= q } else { kv >= q }",
            "clamp(kv - q, -3, 3) == q % 7 - 3",
            "float(q) / float(kv + 1) > 1.5",
            "q != 6 && kv / (q - 6) >= 1",
            "kv / (q - 6) >= 0",
            "(q * q - kv) % 5 < 2",
            "((q ^ kv) & 7) == 3",
            "(q | kv) >= 16",
            "((q - kv) >> 2) == -1",
            "(~q & kv & 12) == 0",
            "(1 << (q - kv)) > 2",
            "((kv - q) << 3) < -8",
            "((q - 10) & (kv - 12)) < 0",
            "((q - 10) | 5) > 0",
            "((q - kv) ^ -1) >= 0",
            "((q >> (kv % 4)) & 1) == 1",
            "(kv >> (q - 8)) > 1",
        ];
        for mask in masks {
            for q0 in (0..24).step_by(5) {
                for k0 in (0..24).step_by(3) {
                    for (dq, dk) in [(0, 0), (3, 0), (0, 4), (5, 6), (12, 2)] {
                        sound(mask, bx(q0, q0 + dq, k0, k0 + dk));
                    }
                }
            }
        }
    }
}
