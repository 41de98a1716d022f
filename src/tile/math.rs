//! Math functions the loop IR expresses with its own ops: `sin`, `cos`,
//! `erf`, `pow` and `sign` are lowered here into f32 arithmetic,
//! comparisons, selects and the IR's `round`, `floor`, `exp`, `log2`,
//! `exp2` and `abs`, so every backend computes them with the same
//! operations and needs no code of its own. `tanh_approx` stays a call
//! (`tanh.approx.f32` on the GPU); its CPU form is [`tanh_approx`].
//!
//! Accuracy, measured against f64 (`mpmath`/libm) in f32 ulps of the exact
//! result with round-to-nearest f32 ops and the IR's `exp` at <= 1 ulp; the
//! tests of `codegen::clif` and the suite measure the compiled forms
//! (docs/language.md has the table):
//!
//! | function | domain with the bound | max error |
//! |---|---|---|
//! | `sin`, `cos` | `|x| <= 100` | <= 2 ulp (1.5 measured) |
//! | `sin`, `cos` | `|x| <= 1e6` | absolute <= 1.1e-7 (more ulps next to their zeros) |
//! | `sin`, `cos` | `1e6 < |x| <= 4e6` | absolute <= 3e-6 |
//! | `sin`, `cos` | `|x| > 4e6` | the reduction loses its bits (1e-4 at 1.6e7, nothing from 1e8): finite, in [-1, 1] |
//! | `erf` | all x | <= 3 ulp (2.3 measured) |
//! | `pow` | `exp2(y · log2|x|)`: the error of `log2` scaled by `|y · log2 |x||` | see the table in docs/language.md |
//! | `tanh_approx` | all x | <= 6 ulp (5.4 measured), absolute <= 3.3e-7 |

use super::builder::Builder;
use super::ir::{BinOp, CmpOp, Op, Ty, UnOp, ValueId};
use crate::sema::Func;

/// `π/2` in four parts for Cody–Waite reduction: the first three have at
/// most 12 significant bits (`0x3fc90000`, `0x39fda000`, `0x33a22000`), so
/// with `j = jh·4096 + jl` (both parts of at most 12 bits, `|j| < 2^24`)
/// every product `jh·4096·P_i` and `jl·P_i` is exact, and the subtractions
/// stay exact up to `|x|` of about 10^6.
const PIO2_1: f32 = f32::from_bits(0x3fc9_0000);
const PIO2_2: f32 = f32::from_bits(0x39fd_a000);
const PIO2_3: f32 = f32::from_bits(0x33a2_2000);
const PIO2_4: f32 = f32::from_bits(0x2c34_611a);
/// `S` in `sin r = r + r³·S(r²)` on `[-π/4, π/4]`, lowest degree first (Cephes).
const SIN_P: [f32; 3] = [-1.666_665_5e-1, 8.332_161e-3, -1.951_529_6e-4];
/// `C` in `cos r = 1 - r²/2 + r⁴·C(r²)` on `[-π/4, π/4]`, lowest degree first (Cephes).
const COS_P: [f32; 3] = [4.166_664_6e-2, -1.388_731_6e-3, 2.443_315_7e-5];
/// `P` in `erf x = x·P(x²)` for `|x| <= 1`, lowest degree first (weighted
/// minimax by Lawson's iteration, relative error 1.2e-9 in exact arithmetic).
/// The first is the fitted coefficient, not 2/√π: as an f32 it is one unit
/// in the last place below it.
#[allow(clippy::approx_constant)]
const ERF_SMALL: [f32; 7] = [
    1.128_379_1,
    -0.376_126_26,
    0.112_835_854,
    -0.026_853_817,
    0.005_188_334_3,
    -8.010_247e-4,
    7.854_024_4e-5,
];
/// `Q` in `erf x = 1 - exp(Q(x - 2.5))` for `1 < x < 3.92`, lowest degree
/// first (minimax for `log(erfc x)`, absolute error 8.2e-9 in exact
/// arithmetic). From 3.92 on, `erf x` rounds to 1 in f32.
const ERF_LARGE: [f32; 9] = [
    -7.806_815,
    -5.352_680_7,
    -0.943_893_7,
    -0.010_858_423,
    0.002_165_224_9,
    -4.202_467_7e-4,
    7.733_255e-5,
    -1.327_830_5e-5,
    1.631_966_1e-6,
];
const ERF_CENTRE: f32 = 2.5;
const ERF_ONE: f32 = 3.92;

/// The odd numerator of [`tanh_approx`] in `x²`, lowest degree first.
pub const TANH_APPROX_NUM: [f32; 7] = [
    4.893_524_6e-3,
    6.372_619_3e-4,
    1.485_722_4e-5,
    5.122_297e-8,
    -8.604_672e-11,
    2.000_188e-13,
    -2.760_768_5e-16,
];
/// The even denominator of [`tanh_approx`] in `x²`, lowest degree first.
pub const TANH_APPROX_DEN: [f32; 4] =
    [4.893_525e-3, 2.268_434_6e-3, 1.185_347_1e-4, 1.198_258_4e-6];
/// [`tanh_approx`] clamps its argument to `±TANH_APPROX_CLAMP`, where the
/// rational function reaches 1 in f32.
pub const TANH_APPROX_CLAMP: f32 = 7.905_311;

/// Below this magnitude `tanh_approx(x)` is `tanh` (the jit's odd
/// polynomial, within 2 ulp; libm's here): as fast where soft-capping keeps
/// its arguments, and exact for the tiny ones the rational would round away.
pub const TANH_APPROX_SMALL: f32 = 0.625;

/// Above this magnitude `tanh_approx(x)` is `±1` (as `tanh` rounds to f32).
pub const TANH_APPROX_ONE: f32 = 9.0;

/// `tanh_approx(x)` as the CPU backends compute it: `tanh` below 0.625 (the
/// jit's odd polynomial there, within 2 ulp), else the rational function
/// `x·N(x²) / D(x²)` of degree 13/6 on `x` clamped to `±7.905311`, and `±1`
/// above 9: no exponential. NaN gives NaN, `±inf` gives `±1`.
pub fn tanh_approx(x: f32) -> f32 {
    if x.abs() < TANH_APPROX_SMALL {
        return x.tanh();
    }
    if x.abs() > TANH_APPROX_ONE {
        return 1f32.copysign(x);
    }
    // NaN-propagating clamp: `max(-c, x)` keeps NaN (the second operand).
    let c = TANH_APPROX_CLAMP;
    let xc = if -c > x { -c } else { x };
    let xc = if c < xc { c } else { xc };
    let z = xc * xc;
    let horner = |p: &[f32]| p.iter().rev().fold(0.0f32, |acc, &k| acc.mul_add(z, k));
    xc * horner(&TANH_APPROX_NUM) / horner(&TANH_APPROX_DEN)
}

/// Emits the IR of a math function of the spec that has no IR op of its
/// own; `None` for the others (they are IR calls or lowered elsewhere).
pub fn lower(b: &mut Builder, f: Func, args: &[ValueId]) -> Option<ValueId> {
    let mut m = MathBuilder { b };
    Some(match f {
        Func::Sin => m.sin_cos(args[0], false),
        Func::Cos => m.sin_cos(args[0], true),
        Func::Erf => m.erf(args[0]),
        Func::Pow => m.pow(args[0], args[1]),
        Func::Sign => m.sign(args[0]),
        _ => return None,
    })
}

struct MathBuilder<'a> {
    b: &'a mut Builder,
}

impl MathBuilder<'_> {
    fn c(&mut self, x: f32) -> ValueId {
        self.b.fconst(x)
    }
    fn add(&mut self, a: ValueId, c: ValueId) -> ValueId {
        self.b.binary(BinOp::FAdd, a, c)
    }
    fn sub(&mut self, a: ValueId, c: ValueId) -> ValueId {
        self.b.binary(BinOp::FSub, a, c)
    }
    fn mul(&mut self, a: ValueId, c: ValueId) -> ValueId {
        self.b.binary(BinOp::FMul, a, c)
    }
    fn neg(&mut self, a: ValueId) -> ValueId {
        let ty = self.b.ty(a);
        let op = if ty == Ty::F32 {
            UnOp::FNeg
        } else {
            UnOp::INeg
        };
        self.b.add(Op::Unary(op, a), ty, None, None)
    }
    fn call(&mut self, f: Func, a: ValueId) -> ValueId {
        self.b.add(Op::Call(f, a), Ty::F32, None, None)
    }
    fn cmp(&mut self, op: CmpOp, a: ValueId, c: ValueId) -> ValueId {
        self.b.add(Op::Cmp(op, a, c), Ty::Bool, None, None)
    }
    fn select(&mut self, cond: ValueId, then: ValueId, otherwise: ValueId) -> ValueId {
        let ty = self.b.ty(then);
        self.b
            .add(Op::Select(cond, then, otherwise), ty, None, None)
    }
    /// `P(x)` by Horner's rule, `p` lowest degree first.
    fn horner(&mut self, p: &[f32], x: ValueId) -> ValueId {
        let mut acc = self.c(p[p.len() - 1]);
        for &k in p[..p.len() - 1].iter().rev() {
            let t = self.mul(acc, x);
            let k = self.c(k);
            acc = self.add(t, k);
        }
        acc
    }

    /// `sin x` or `cos x`: `j = round(x · 2/π)`, `r = x - j·π/2` (three
    /// parts), the Cephes polynomials on `r`, and the quadrant `j mod 4`
    /// choosing among `±sin r`, `±cos r`; clamped to [-1, 1] (with `r` kept
    /// within ±4) so a reduction that lost its accuracy (huge `|x|`) stays
    /// finite and in range. `sin x` is `x` below 2^-12 (so `sin(-0) = -0`).
    /// NaN and `±inf` give NaN.
    fn sin_cos(&mut self, x: ValueId, cos: bool) -> ValueId {
        let two_over_pi = self.c(std::f32::consts::FRAC_2_PI);
        let t = self.mul(x, two_over_pi);
        let j = self.call(Func::Round, t);
        // j = jh·4096 + jl with jh = trunc(j / 4096), so both have j's sign.
        let inv = self.c(1.0 / 4096.0);
        let jq = self.mul(j, inv);
        let zero = self.c(0.0);
        let negative = self.cmp(CmpOp::Lt, jq, zero);
        let up = self.call(Func::Ceil, jq);
        let down = self.call(Func::Floor, jq);
        let jh = self.select(negative, up, down);
        let k4096 = self.c(4096.0);
        let jh4 = self.mul(jh, k4096);
        let jl = self.sub(j, jh4);
        let mut r = x;
        for part in [PIO2_1, PIO2_2, PIO2_3] {
            let p = self.c(part);
            let hp = self.mul(jh4, p);
            r = self.sub(r, hp);
            let lp = self.mul(jl, p);
            r = self.sub(r, lp);
        }
        let p4 = self.c(PIO2_4);
        let jp = self.mul(j, p4);
        let r = self.sub(r, jp);
        // Past |x| ~ 1e26 the reduction is meaningless and r could square to
        // inf: keep it within ±4 (NaN passes), so finite x gives a finite
        // result, clamped below.
        let r = self.clamp(r, 4.0);
        let z = self.mul(r, r);
        // sin r = r + (z·r)·S(z)
        let s_poly = self.horner(&SIN_P, z);
        let zr = self.mul(z, r);
        let s_tail = self.mul(zr, s_poly);
        let s = self.add(r, s_tail);
        // cos r = (1 - z/2) + (z·z)·C(z)
        let c_poly = self.horner(&COS_P, z);
        let half = self.c(0.5);
        let hz = self.mul(half, z);
        let one = self.c(1.0);
        let head = self.sub(one, hz);
        let zz = self.mul(z, z);
        let c_tail = self.mul(zz, c_poly);
        let c = self.add(head, c_tail);
        // The quadrant n = j mod 4 (exact for |j| < 2^24); cos x = sin(x + π/2).
        let quarter = self.c(0.25);
        let jq = self.mul(j, quarter);
        let fl = self.call(Func::Floor, jq);
        let four = self.c(4.0);
        let f4 = self.mul(fl, four);
        let mut n = self.sub(j, f4);
        if cos {
            let three = self.c(3.0);
            let last = self.cmp(CmpOp::Eq, n, three);
            let next = self.add(n, one);
            let zero = self.c(0.0);
            n = self.select(last, zero, next);
        }
        let (ns, nc) = (self.neg(s), self.neg(c));
        let two = self.c(2.0);
        let is2 = self.cmp(CmpOp::Eq, n, two);
        let v = self.select(is2, ns, nc);
        let is1 = self.cmp(CmpOp::Eq, n, one);
        let v = self.select(is1, c, v);
        let zero = self.c(0.0);
        let is0 = self.cmp(CmpOp::Eq, n, zero);
        let v = self.select(is0, s, v);
        let v = self.clamp(v, 1.0);
        if cos {
            return v;
        }
        // sin x = x (within a third of an ulp) below 2^-12, which keeps -0.
        let a = self.call(Func::Abs, x);
        let tiny = self.c(1.0 / 4096.0);
        let small = self.cmp(CmpOp::Lt, a, tiny);
        self.select(small, x, v)
    }

    /// `x` limited to `[-m, m]` with selects, so NaN stays NaN (the IR's
    /// `fmin`/`fmax` would return the other operand).
    fn clamp(&mut self, x: ValueId, m: f32) -> ValueId {
        let hi = self.c(m);
        let lo = self.c(-m);
        let above = self.cmp(CmpOp::Gt, x, hi);
        let x = self.select(above, hi, x);
        let below = self.cmp(CmpOp::Lt, x, lo);
        self.select(below, lo, x)
    }

    /// `erf x`: `x·P(x²)` for `|x| <= 1`; else `±(1 - exp(Q(|x| - 2.5)))`
    /// below 3.92 and `±1` from there. NaN gives NaN, `±0` keeps its sign.
    fn erf(&mut self, x: ValueId) -> ValueId {
        let a = self.call(Func::Abs, x);
        let x2 = self.mul(x, x);
        let p = self.horner(&ERF_SMALL, x2);
        let small = self.mul(x, p);
        let centre = self.c(ERF_CENTRE);
        let u = self.sub(a, centre);
        let q = self.horner(&ERF_LARGE, u);
        let e = self.call(Func::Exp, q);
        let one = self.c(1.0);
        let large = self.sub(one, e);
        // `a >= 3.92` is false for NaN, which keeps `large` (NaN).
        let limit = self.c(ERF_ONE);
        let saturated = self.cmp(CmpOp::Ge, a, limit);
        let big = self.select(saturated, one, large);
        let zero = self.c(0.0);
        let negative = self.cmp(CmpOp::Lt, x, zero);
        let nbig = self.neg(big);
        let signed = self.select(negative, nbig, big);
        let in_small = self.cmp(CmpOp::Le, a, one);
        self.select(in_small, small, signed)
    }

    /// `pow(x, y) = exp2(y · log2|x|)` with the sign and special values of
    /// IEEE 754 `pow`: 1 when `y = 0` or `x = 1` (NaN included) or
    /// `|x| = 1` and `|y| = inf`; the sign of `x` for odd integer `y`
    /// (`-0` included); NaN for finite `x < 0` and a non-integer `y`.
    fn pow(&mut self, x: ValueId, y: ValueId) -> ValueId {
        let ax = self.call(Func::Abs, x);
        let l = self.call(Func::Log2, ax);
        let t = self.mul(y, l);
        let r = self.call(Func::Exp2, t);
        // y an integer (±inf included, NaN not); odd if y/2 is not.
        let fy = self.call(Func::Floor, y);
        let integer = self.cmp(CmpOp::Eq, fy, y);
        let half = self.c(0.5);
        let hy = self.mul(y, half);
        let fhy = self.call(Func::Floor, hy);
        let odd_half = self.cmp(CmpOp::Ne, fhy, hy);
        let odd = self.b.binary(BinOp::And, integer, odd_half);
        // The sign bit of x: x < 0, or 1/x < 0 for -0.
        let zero = self.c(0.0);
        let one = self.c(1.0);
        let below = self.cmp(CmpOp::Lt, x, zero);
        let inv = self.b.binary(BinOp::FDiv, one, x);
        let inv_below = self.cmp(CmpOp::Lt, inv, zero);
        let negative = self.b.binary(BinOp::Or, below, inv_below);
        let flip = self.b.binary(BinOp::And, odd, negative);
        let nr = self.neg(r);
        let r = self.select(flip, nr, r);
        // Finite x < 0 with a non-integer y has no real power.
        let ninf = self.c(f32::NEG_INFINITY);
        let finite = self.cmp(CmpOp::Gt, x, ninf);
        let neg_finite = self.b.binary(BinOp::And, below, finite);
        let not_integer = self
            .b
            .add(Op::Unary(UnOp::Not, integer), Ty::Bool, None, None);
        let no_power = self.b.binary(BinOp::And, neg_finite, not_integer);
        let nan = self.c(f32::NAN);
        let r = self.select(no_power, nan, r);
        // The cases whose value is 1 whatever the formula gives.
        let y0 = self.cmp(CmpOp::Eq, y, zero);
        let x1 = self.cmp(CmpOp::Eq, x, one);
        let ax1 = self.cmp(CmpOp::Eq, ax, one);
        let ay = self.call(Func::Abs, y);
        let inf = self.c(f32::INFINITY);
        let ay_inf = self.cmp(CmpOp::Eq, ay, inf);
        let unit_inf = self.b.binary(BinOp::And, ax1, ay_inf);
        let is_one = self.b.binary(BinOp::Or, y0, x1);
        let is_one = self.b.binary(BinOp::Or, is_one, unit_inf);
        self.select(is_one, one, r)
    }

    /// `sign x`: 1, -1, or `x` itself for ±0 and NaN (0 for an int 0).
    fn sign(&mut self, x: ValueId) -> ValueId {
        let (zero, one) = match self.b.ty(x) {
            Ty::I64 => (self.b.iconst(0), self.b.iconst(1)),
            _ => (self.c(0.0), self.c(1.0)),
        };
        let m1 = self.neg(one);
        let below = self.cmp(CmpOp::Lt, x, zero);
        let v = self.select(below, m1, x);
        let above = self.cmp(CmpOp::Gt, x, zero);
        self.select(above, one, v)
    }
}
