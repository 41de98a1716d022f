//! Emitters of f32x4 vector math into Cranelift IR.
//!
//! Each emitter appends instructions at the builder's current position and returns the
//! result value; none creates blocks, so they can be used anywhere in a body. Vector
//! constants are `vconst`s (constant-pool loads that x64 folds into the using
//! instruction), so emitting inside a loop adds no constant materialisation.
//!
//! Scalar forms (`*_scalar`) splat the f32 operand, run the vector code and extract
//! lane 0: same accuracy, about the cost of one vector evaluation.
//!
//! # Accuracy (measured by the tests against f64, in f32 ulps of the exact result)
//!
//! | function | domain with the bound | max error | special values |
//! |---|---|---|---|
//! | `exp` | all finite x | <= 1 ulp (also in the subnormal range, as absolute error <= 1 subnormal ulp) | `-inf -> 0`, `+inf -> +inf`, `x > 88.73 -> +inf`, NaN -> NaN |
//! | `exp2` | all finite x | <= 1 ulp | same, overflow from `x >= 128` |
//! | `exp_nonpositive` / `exp2_nonpositive` | `x <= 0`, results >= 2^-126 | <= 1 ulp | `-inf -> 0`, results below 2^-126 flush to 0, NaN -> NaN; positive x unsupported |
//! | `log` | x > 0 (subnormals included) | <= 1 ulp | `0 -> -inf`, `x < 0 -> NaN`, `+inf -> +inf`, NaN -> NaN |
//! | `log2` | x > 0 | <= 2 ulp | as `log` |
//! | `tanh` | all x | <= 2 ulp | `±inf -> ±1`, NaN -> NaN |
//! | `sigmoid` | all x (subnormal results as absolute error) | <= 2.1 ulp (2.01 measured) | `-inf -> 0`, `+inf -> 1`, NaN -> NaN |
//! | `tanh_approx` | all x | <= 6 ulp, absolute <= 3.3e-7 (`tanh`'s polynomial below 0.625) | `±inf -> ±1`, NaN -> NaN, `±0 -> ±0` |
//!
//! `max(x, y)` is `x > y ? x : y` (one `maxps`): when either operand is NaN it returns
//! `y`. `min(x, y)` is `x < y ? x : y` likewise. The horizontal reductions return an f32.

use crate::runtime::gemm::math::{
    EXP_P, LN2, LN2_HI, LN2_LO, LOG2E, LOG_P, MAGIC, TANH_P, TANH_POLY_LIMIT,
};
use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::{
    types, BlockArg, ConstantData, Endianness, InstBuilder, MemFlagsData, Type, Value,
};
use cranelift_frontend::FunctionBuilder;

/// The vector type all emitters work on.
pub const F32X4: Type = types::F32X4;
const I32X4: Type = types::I32X4;

/// Emits f32x4 math. Copy it freely; it only remembers whether `fma` is native.
#[derive(Clone, Copy, Debug)]
pub struct VMath {
    fused: bool,
}

fn lane_flags() -> MemFlagsData {
    MemFlagsData::new().with_endianness(Endianness::Little)
}

impl VMath {
    /// Emitters for a target where `fma` is (`has_native_fma`) or is not one instruction;
    /// without it `fma` is emitted as `fmul` + `fadd`.
    pub fn new(has_native_fma: bool) -> VMath {
        VMath {
            fused: has_native_fma,
        }
    }

    /// A constant f32x4 with all lanes `x`.
    pub fn splat(&self, b: &mut FunctionBuilder<'_>, x: f32) -> Value {
        self.const_bits(b, F32X4, x.to_bits())
    }

    fn const_bits(&self, b: &mut FunctionBuilder<'_>, ty: Type, bits: u32) -> Value {
        let bytes: Vec<u8> = std::iter::repeat_n(bits.to_le_bytes(), 4)
            .flatten()
            .collect();
        let handle = b.func.dfg.constants.insert(ConstantData::from(bytes));
        b.ins().vconst(ty, handle)
    }

    fn splat_i32(&self, b: &mut FunctionBuilder<'_>, x: i32) -> Value {
        self.const_bits(b, I32X4, x as u32)
    }

    /// `a · x + c`.
    pub fn fma(&self, b: &mut FunctionBuilder<'_>, a: Value, x: Value, c: Value) -> Value {
        if self.fused {
            b.ins().fma(a, x, c)
        } else {
            let p = b.ins().fmul(a, x);
            b.ins().fadd(p, c)
        }
    }

    /// Lane mask (as f32x4 bits) of `x cc y`.
    fn cmp(&self, b: &mut FunctionBuilder<'_>, cc: FloatCC, x: Value, y: Value) -> Value {
        let m = b.ins().fcmp(cc, x, y);
        b.ins().bitcast(F32X4, lane_flags(), m)
    }

    /// `x > y ? x : y` per lane (NaN in either gives `y`); one `maxps` on x64.
    pub fn max(&self, b: &mut FunctionBuilder<'_>, x: Value, y: Value) -> Value {
        let m = self.cmp(b, FloatCC::LessThan, y, x);
        b.ins().bitselect(m, x, y)
    }

    /// `x < y ? x : y` per lane (NaN in either gives `y`); one `minps` on x64.
    pub fn min(&self, b: &mut FunctionBuilder<'_>, x: Value, y: Value) -> Value {
        let m = self.cmp(b, FloatCC::LessThan, x, y);
        b.ins().bitselect(m, x, y)
    }

    /// Lanes of `x` swapped by the byte permutation `perm` (a `shuffle` on i8x16).
    fn permute(&self, b: &mut FunctionBuilder<'_>, x: Value, perm: [u8; 16]) -> Value {
        let bytes = b.ins().bitcast(types::I8X16, lane_flags(), x);
        let imm = b
            .func
            .dfg
            .immediates
            .push(ConstantData::from(perm.to_vec()));
        let shuffled = b.ins().shuffle(bytes, bytes, imm);
        b.ins().bitcast(F32X4, lane_flags(), shuffled)
    }

    const SWAP_HALVES: [u8; 16] = [8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7];
    const SWAP_PAIRS: [u8; 16] = [4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11];

    /// Horizontal maximum of the four lanes, as an f32 (NaN handling as [`Self::max`]).
    pub fn reduce_max(&self, b: &mut FunctionBuilder<'_>, x: Value) -> Value {
        let h = self.permute(b, x, Self::SWAP_HALVES);
        let m = self.max(b, x, h);
        let p = self.permute(b, m, Self::SWAP_PAIRS);
        let m = self.max(b, m, p);
        b.ins().extractlane(m, 0)
    }

    /// Horizontal sum of the four lanes, as an f32: `(x0 + x2) + (x1 + x3)`.
    pub fn reduce_sum(&self, b: &mut FunctionBuilder<'_>, x: Value) -> Value {
        let h = self.permute(b, x, Self::SWAP_HALVES);
        let s = b.ins().fadd(x, h);
        let p = self.permute(b, s, Self::SWAP_PAIRS);
        let s = b.ins().fadd(s, p);
        b.ins().extractlane(s, 0)
    }

    /// `c[0] + x·(c[1] + x·(...))` by Horner's rule.
    fn horner(&self, b: &mut FunctionBuilder<'_>, x: Value, c: &[f32]) -> Value {
        let (last, rest) = c.split_last().expect("a polynomial has coefficients");
        let mut p = self.splat(b, *last);
        for &coef in rest.iter().rev() {
            let cv = self.splat(b, coef);
            p = self.fma(b, p, x, cv);
        }
        p
    }

    /// `exp(r)` for `|r| <= ln2/2`: `1 + r + r²·P(r)`.
    fn exp_reduced(&self, b: &mut FunctionBuilder<'_>, r: Value) -> Value {
        let p = self.horner(b, r, &EXP_P);
        let r2 = b.ins().fmul(r, r);
        let y = self.fma(b, p, r2, r);
        let one = self.splat(b, 1.0);
        b.ins().fadd(y, one)
    }

    /// `2^n` as `2^a · 2^(n-a)` with `a = n >> 1`, for the integer `n` held by the
    /// magic-number sum `t`; both factors are normal for `-150 <= n <= 128`, so the two
    /// multiplications round subnormal and overflowing results correctly.
    fn scale_by_pow2(&self, b: &mut FunctionBuilder<'_>, y: Value, t: Value) -> Value {
        let bits = b.ins().bitcast(I32X4, lane_flags(), t);
        let magic = self.splat_i32(b, MAGIC.to_bits() as i32);
        let n = b.ins().isub(bits, magic);
        let one = b.ins().iconst(types::I32, 1);
        let half = b.ins().sshr(n, one);
        let rest = b.ins().isub(n, half);
        let bias = self.splat_i32(b, 127);
        let shift = b.ins().iconst(types::I32, 23);
        let mut y = y;
        for e in [half, rest] {
            let biased = b.ins().iadd(e, bias);
            let pow_bits = b.ins().ishl(biased, shift);
            let pow = b.ins().bitcast(F32X4, lane_flags(), pow_bits);
            y = b.ins().fmul(y, pow);
        }
        y
    }

    /// `2^n` for the integer `n` held by `t` (`-127 <= n <= 127`; `n = -127` gives 0).
    fn pow2_single(&self, b: &mut FunctionBuilder<'_>, t: Value) -> Value {
        let bits = b.ins().bitcast(I32X4, lane_flags(), t);
        let bias = self.splat_i32(b, 127);
        let biased = b.ins().iadd(bits, bias);
        let shift = b.ins().iconst(types::I32, 23);
        let pow_bits = b.ins().ishl(biased, shift);
        b.ins().bitcast(F32X4, lane_flags(), pow_bits)
    }

    /// Clamps to `[lo, hi]`, passing NaN through.
    fn clamp(&self, b: &mut FunctionBuilder<'_>, x: Value, lo: f32, hi: f32) -> Value {
        let lo = self.splat(b, lo);
        let x = self.max(b, lo, x);
        let hi = self.splat(b, hi);
        self.min(b, hi, x)
    }

    /// `e^x`, full range (see the accuracy table).
    pub fn exp(&self, b: &mut FunctionBuilder<'_>, x: Value) -> Value {
        // exp(-104) < 2^-150 rounds to 0; exp(89) overflows.
        let x = self.clamp(b, x, -104.0, 89.0);
        let log2e = self.splat(b, LOG2E);
        let magic = self.splat(b, MAGIC);
        let t = self.fma(b, x, log2e, magic);
        let n = b.ins().fsub(t, magic);
        let r = self.reduce_ln2(b, x, n);
        let y = self.exp_reduced(b, r);
        self.scale_by_pow2(b, y, t)
    }

    /// `x - n·ln2` in two steps (hi part exact).
    fn reduce_ln2(&self, b: &mut FunctionBuilder<'_>, x: Value, n: Value) -> Value {
        let hi = self.splat(b, -LN2_HI);
        let r = self.fma(b, n, hi, x);
        let lo = self.splat(b, -LN2_LO);
        self.fma(b, n, lo, r)
    }

    /// `2^x`, full range.
    pub fn exp2(&self, b: &mut FunctionBuilder<'_>, x: Value) -> Value {
        let x = self.clamp(b, x, -151.0, 129.0);
        let magic = self.splat(b, MAGIC);
        let t = b.ins().fadd(x, magic);
        let n = b.ins().fsub(t, magic);
        let f = b.ins().fsub(x, n);
        let ln2 = self.splat(b, LN2);
        let r = b.ins().fmul(f, ln2);
        let y = self.exp_reduced(b, r);
        self.scale_by_pow2(b, y, t)
    }

    /// `e^x` for `x <= 0` (the online-softmax domain): cheaper than [`Self::exp`].
    pub fn exp_nonpositive(&self, b: &mut FunctionBuilder<'_>, x: Value) -> Value {
        let lo = self.splat(b, -88.0);
        let x = self.max(b, lo, x);
        let log2e = self.splat(b, LOG2E);
        let magic = self.splat(b, MAGIC);
        let t = self.fma(b, x, log2e, magic);
        let n = b.ins().fsub(t, magic);
        let r = self.reduce_ln2(b, x, n);
        let y = self.exp_reduced(b, r);
        let pow = self.pow2_single(b, t);
        b.ins().fmul(y, pow)
    }

    /// `2^x` for `x <= 0`: cheaper than [`Self::exp2`].
    pub fn exp2_nonpositive(&self, b: &mut FunctionBuilder<'_>, x: Value) -> Value {
        let lo = self.splat(b, -127.0);
        let x = self.max(b, lo, x);
        let magic = self.splat(b, MAGIC);
        let t = b.ins().fadd(x, magic);
        let n = b.ins().fsub(t, magic);
        let f = b.ins().fsub(x, n);
        let ln2 = self.splat(b, LN2);
        let r = b.ins().fmul(f, ln2);
        let y = self.exp_reduced(b, r);
        let pow = self.pow2_single(b, t);
        b.ins().fmul(y, pow)
    }

    /// Splits `x > 0` into `m` in `[sqrt(1/2), sqrt(2))` and the integer exponent `e`
    /// (as f32), `x = m · 2^e`; returns `(f = m - 1, e, ln(1 + f) - f)`.
    fn log_parts(&self, b: &mut FunctionBuilder<'_>, x: Value) -> (Value, Value, Value) {
        // Subnormals: scale by 2^23 first and subtract 23 from the exponent.
        let min_normal = self.splat(b, f32::MIN_POSITIVE);
        let tiny = self.cmp(b, FloatCC::LessThan, x, min_normal);
        let two23 = self.splat(b, 8_388_608.0);
        let scaled = b.ins().fmul(x, two23);
        let x = b.ins().bitselect(tiny, scaled, x);
        let tiny_i = b.ins().bitcast(I32X4, lane_flags(), tiny);
        let m23 = self.splat_i32(b, -23);
        let zero_i = self.splat_i32(b, 0);
        let e_adj = b.ins().bitselect(tiny_i, m23, zero_i);

        let bits = b.ins().bitcast(I32X4, lane_flags(), x);
        let shift = b.ins().iconst(types::I32, 23);
        let biased = b.ins().ushr(bits, shift);
        let bias = self.splat_i32(b, 127);
        let e = b.ins().isub(biased, bias);
        let e = b.ins().iadd(e, e_adj);
        let mant_mask = self.splat_i32(b, 0x007f_ffff);
        let one_bits = self.splat_i32(b, 0x3f80_0000);
        let mant = b.ins().band(bits, mant_mask);
        let mant = b.ins().bor(mant, one_bits);
        let m = b.ins().bitcast(F32X4, lane_flags(), mant);
        // m in [1, 2): halve it above sqrt(2), adding 1 to e (mask lanes are -1).
        let sqrt2 = self.splat(b, std::f32::consts::SQRT_2);
        let big = self.cmp(b, FloatCC::GreaterThan, m, sqrt2);
        let half = self.splat(b, 0.5);
        let m_half = b.ins().fmul(m, half);
        let m = b.ins().bitselect(big, m_half, m);
        let big_i = b.ins().bitcast(I32X4, lane_flags(), big);
        let e = b.ins().isub(e, big_i);
        let e = b.ins().fcvt_from_sint(F32X4, e);

        let one = self.splat(b, 1.0);
        let f = b.ins().fsub(m, one);
        // ln(1 + f) - f = -f²/2 + f³·P(f)
        let p = self.horner(b, f, &LOG_P);
        let f2 = b.ins().fmul(f, f);
        let f3 = b.ins().fmul(f2, f);
        let minus_half = self.splat(b, -0.5);
        let t = b.ins().fmul(f2, minus_half);
        let tail = self.fma(b, p, f3, t);
        (f, e, tail)
    }

    /// Replaces lanes of `y` for the special inputs of a logarithm: `0 -> -inf`,
    /// `x < 0 -> NaN`, `+inf -> +inf`, NaN -> NaN.
    fn log_specials(&self, b: &mut FunctionBuilder<'_>, x: Value, y: Value) -> Value {
        let zero = self.splat(b, 0.0);
        let is_zero = self.cmp(b, FloatCC::Equal, x, zero);
        let neg_inf = self.splat(b, f32::NEG_INFINITY);
        let y = b.ins().bitselect(is_zero, neg_inf, y);
        let inf = self.splat(b, f32::INFINITY);
        let is_inf = self.cmp(b, FloatCC::Equal, x, inf);
        let y = b.ins().bitselect(is_inf, inf, y);
        // x < 0 or NaN: NaN.
        let bad = self.cmp(b, FloatCC::UnorderedOrLessThan, x, zero);
        let nan = self.splat(b, f32::NAN);
        b.ins().bitselect(bad, nan, y)
    }

    /// Natural logarithm.
    pub fn log(&self, b: &mut FunctionBuilder<'_>, x: Value) -> Value {
        let (f, e, tail) = self.log_parts(b, x);
        let lo = self.splat(b, LN2_LO);
        let y = self.fma(b, e, lo, tail);
        let y = b.ins().fadd(y, f);
        let hi = self.splat(b, LN2_HI);
        let y = self.fma(b, e, hi, y);
        self.log_specials(b, x, y)
    }

    /// Base-2 logarithm.
    pub fn log2(&self, b: &mut FunctionBuilder<'_>, x: Value) -> Value {
        let (f, e, tail) = self.log_parts(b, x);
        // log2(m) = (f + tail)·log2(e) with log2(e) split into hi + lo parts.
        let log2e_hi = f32::from_bits(LOG2E.to_bits() & 0xffff_f000);
        let log2e_lo = (std::f64::consts::LOG2_E - log2e_hi as f64) as f32;
        let lo = self.splat(b, log2e_lo);
        let hi = self.splat(b, log2e_hi);
        let ln_m = b.ins().fadd(f, tail);
        let small = b.ins().fmul(ln_m, lo);
        let t = self.fma(b, tail, hi, small);
        let t = self.fma(b, f, hi, t);
        let y = b.ins().fadd(t, e);
        self.log_specials(b, x, y)
    }

    /// Hyperbolic tangent, computed on `|x|` with the sign of `x` put back (so
    /// `tanh(-0) = -0`). When every lane is below the polynomial's limit (the
    /// common case of soft-capping, `cap * tanh(score / cap)`), the exponential
    /// branch is skipped.
    pub fn tanh(&self, b: &mut FunctionBuilder<'_>, x: Value) -> Value {
        self.tanh_with(b, x, |vm, b, ax| {
            // 1 - 2/(e^(2|x|) + 1).
            let two_ax = b.ins().fadd(ax, ax);
            let e = vm.exp(b, two_ax);
            let one = vm.splat(b, 1.0);
            let e1 = b.ins().fadd(e, one);
            let two = vm.splat(b, 2.0);
            let q = b.ins().fdiv(two, e1);
            b.ins().fsub(one, q)
        })
    }

    /// `tanh`'s frame, shared by [`Self::tanh`] and [`Self::tanh_approx`]:
    /// `|x| + |x|³·P(x²)` below [`TANH_POLY_LIMIT`], and only that when
    /// every lane is below it; `large(|x|)` (the magnitude) for the other
    /// lanes; the sign of `x` put back.
    fn tanh_with(
        &self,
        b: &mut FunctionBuilder<'_>,
        x: Value,
        large: impl FnOnce(&Self, &mut FunctionBuilder<'_>, Value) -> Value,
    ) -> Value {
        let ax = b.ins().fabs(x);
        let (small, in_poly) = self.tanh_small(b, x, ax);
        let all_small = b.ins().vall_true(in_poly);
        let large_block = b.create_block();
        let merge = b.create_block();
        let magnitude = b.append_block_param(merge, F32X4);
        b.ins().brif(
            all_small,
            merge,
            &[BlockArg::Value(small)],
            large_block,
            &[],
        );
        b.switch_to_block(large_block);
        let big = large(self, b, ax);
        let use_small = b.ins().bitcast(F32X4, lane_flags(), in_poly);
        let mixed = b.ins().bitselect(use_small, small, big);
        b.ins().jump(merge, &[BlockArg::Value(mixed)]);
        b.switch_to_block(merge);
        let sign_mask = self.splat(b, -0.0);
        let sign = b.ins().band(x, sign_mask);
        b.ins().bor(magnitude, sign)
    }

    /// `|x| + |x|³·P(x²)`, `tanh |x|` for `|x| < TANH_POLY_LIMIT`, and the
    /// lane mask (as an int vector) of the lanes where that holds.
    fn tanh_small(&self, b: &mut FunctionBuilder<'_>, x: Value, ax: Value) -> (Value, Value) {
        let x2 = b.ins().fmul(x, x);
        let p = self.horner(b, x2, &TANH_P);
        let px2 = b.ins().fmul(p, x2);
        let small = self.fma(b, px2, ax, ax);
        let limit = self.splat(b, TANH_POLY_LIMIT);
        let in_poly = b.ins().fcmp(FloatCC::LessThan, ax, limit);
        (small, in_poly)
    }

    /// Logistic sigmoid: with `t = e^-|x|` (at most 1), `1 / (1 + t)` for `x >= 0` and
    /// `t / (1 + t)` for `x < 0`, so large negative inputs keep full relative accuracy.
    pub fn sigmoid(&self, b: &mut FunctionBuilder<'_>, x: Value) -> Value {
        let ax = b.ins().fabs(x);
        let nax = b.ins().fneg(ax);
        let t = self.exp(b, nax);
        let one = self.splat(b, 1.0);
        let d = b.ins().fadd(t, one);
        let zero = self.splat(b, 0.0);
        let negative = self.cmp(b, FloatCC::LessThan, x, zero);
        let num = b.ins().bitselect(negative, t, one);
        b.ins().fdiv(num, d)
    }

    /// `tanh_approx`: below [`TANH_POLY_LIMIT`] the odd polynomial of
    /// [`Self::tanh`] (so when every lane is small, as in soft-capping, it
    /// costs what `tanh` does); otherwise the rational function of
    /// [`crate::tile::math::tanh_approx`] (`x·N(x²) / D(x²)` on `|x|`
    /// clamped to 7.905311, 1 above 9), with the sign of `x` put back: no
    /// exponential, which makes it faster than `tanh` on large arguments.
    pub fn tanh_approx(&self, b: &mut FunctionBuilder<'_>, x: Value) -> Value {
        use crate::tile::math::{
            TANH_APPROX_CLAMP, TANH_APPROX_DEN, TANH_APPROX_NUM, TANH_APPROX_ONE,
        };
        self.tanh_with(b, x, |vm, b, ax| {
            // min(c, |x|): the second operand wins when unordered, so NaN stays.
            let hi = vm.splat(b, TANH_APPROX_CLAMP);
            let xc = vm.min(b, hi, ax);
            let z = b.ins().fmul(xc, xc);
            let n = vm.horner(b, z, &TANH_APPROX_NUM);
            let d = vm.horner(b, z, &TANH_APPROX_DEN);
            let n = b.ins().fmul(xc, n);
            let r = b.ins().fdiv(n, d);
            // 1 above 9, where tanh rounds to 1.
            let one_at = vm.splat(b, TANH_APPROX_ONE);
            let big = vm.cmp(b, FloatCC::GreaterThan, ax, one_at);
            let one = vm.splat(b, 1.0);
            b.ins().bitselect(big, one, r)
        })
    }

    /// Applies a vector emitter to a scalar f32 (splat, emit, extract lane 0).
    pub fn scalar(
        &self,
        b: &mut FunctionBuilder<'_>,
        x: Value,
        f: impl FnOnce(&Self, &mut FunctionBuilder<'_>, Value) -> Value,
    ) -> Value {
        let v = b.ins().splat(F32X4, x);
        let y = f(self, b, v);
        b.ins().extractlane(y, 0)
    }

    /// Scalar [`Self::exp`].
    pub fn exp_scalar(&self, b: &mut FunctionBuilder<'_>, x: Value) -> Value {
        self.scalar(b, x, Self::exp)
    }
    /// Scalar [`Self::exp2`].
    pub fn exp2_scalar(&self, b: &mut FunctionBuilder<'_>, x: Value) -> Value {
        self.scalar(b, x, Self::exp2)
    }
    /// Scalar [`Self::log`].
    pub fn log_scalar(&self, b: &mut FunctionBuilder<'_>, x: Value) -> Value {
        self.scalar(b, x, Self::log)
    }
    /// Scalar [`Self::log2`].
    pub fn log2_scalar(&self, b: &mut FunctionBuilder<'_>, x: Value) -> Value {
        self.scalar(b, x, Self::log2)
    }
    /// Scalar [`Self::tanh`].
    pub fn tanh_scalar(&self, b: &mut FunctionBuilder<'_>, x: Value) -> Value {
        self.scalar(b, x, Self::tanh)
    }
    /// Scalar [`Self::tanh_approx`].
    pub fn tanh_approx_scalar(&self, b: &mut FunctionBuilder<'_>, x: Value) -> Value {
        self.scalar(b, x, Self::tanh_approx)
    }
    /// Scalar [`Self::sigmoid`].
    pub fn sigmoid_scalar(&self, b: &mut FunctionBuilder<'_>, x: Value) -> Value {
        self.scalar(b, x, Self::sigmoid)
    }
    /// Scalar `x > y ? x : y` (NaN in either gives `y`), without branches.
    pub fn max_scalar(&self, b: &mut FunctionBuilder<'_>, x: Value, y: Value) -> Value {
        let c = b.ins().fcmp(FloatCC::LessThan, y, x);
        b.ins().select(c, x, y)
    }
    /// Scalar `x < y ? x : y` (NaN in either gives `y`), without branches.
    pub fn min_scalar(&self, b: &mut FunctionBuilder<'_>, x: Value, y: Value) -> Value {
        let c = b.ins().fcmp(FloatCC::LessThan, x, y);
        b.ins().select(c, x, y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codegen::clif::jit::{JitCode, JitModule, JitOptions};
    use crate::codegen::clif::microkernel::emit_while;
    use crate::runtime::gemm::testing::ulp_error;
    use cranelift_codegen::ir::condcodes::IntCC;

    type MapFn = unsafe extern "C" fn(*const f32, *mut f32, usize);

    type Emitter<'a> = &'a dyn Fn(&VMath, &mut FunctionBuilder<'_>, Value) -> Value;

    /// JIT-compiles one function `dst[i] = f(src[i])` over whole f32x4 vectors per
    /// `(name, f)`.
    fn jit_maps(fns: &[(&str, Emitter<'_>)]) -> JitCode {
        let mut jit = JitModule::new(&JitOptions::default(), &[]).unwrap();
        let ptr = jit.pointer_type();
        let vm = VMath::new(jit.has_native_fma());
        for &(name, f) in fns {
            let sig = jit.signature(&[ptr, ptr, ptr], &[]);
            let id = jit.declare_function(name, &sig).unwrap();
            jit.define_function(id, |b, _| {
                let entry = b.create_block();
                b.append_block_params_for_function_params(entry);
                b.switch_to_block(entry);
                let p = b.block_params(entry).to_vec();
                let zero = b.ins().iconst(ptr, 0);
                let bytes = b.ins().ishl_imm_s(p[2], 2);
                emit_while(
                    b,
                    &[zero],
                    |b, v| b.ins().icmp(IntCC::UnsignedLessThan, v[0], bytes),
                    |b, v| {
                        let src = b.ins().iadd(p[0], v[0]);
                        let x = b.ins().load(F32X4, MemFlagsData::new(), src, 0);
                        let y = f(&vm, b, x);
                        let dst = b.ins().iadd(p[1], v[0]);
                        b.ins().store(MemFlagsData::new(), y, dst, 0);
                        vec![b.ins().iadd_imm_s(v[0], 16)]
                    },
                );
                b.ins().return_(&[]);
                Ok(())
            })
            .unwrap();
        }
        jit.finalize().unwrap()
    }

    fn run(code: &JitCode, name: &str, xs: &[f32]) -> Vec<f32> {
        let mut padded = xs.to_vec();
        padded.resize(xs.len().div_ceil(4) * 4, 0.0);
        let mut out = vec![0.0; padded.len()];
        // SAFETY: the function reads and writes `padded.len()` elements.
        unsafe {
            let f: MapFn = code.function(name).unwrap();
            f(padded.as_ptr(), out.as_mut_ptr(), padded.len());
        }
        out.truncate(xs.len());
        out
    }

    fn sweep(lo: f64, hi: f64, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (lo + (hi - lo) * i as f64 / (n - 1) as f64) as f32)
            .collect()
    }

    /// Asserts the max ulp error of `name` over `xs` against `exact` and returns it.
    fn max_ulp(code: &JitCode, name: &str, xs: &[f32], exact: impl Fn(f64) -> f64) -> f64 {
        let ys = run(code, name, xs);
        let mut worst = (0.0, 0.0f32);
        for (&x, &y) in xs.iter().zip(&ys) {
            let e = ulp_error(y, exact(x as f64));
            if e > worst.0 {
                worst = (e, x);
            }
        }
        eprintln!("{name}: max {:.3} ulp (at x = {:e})", worst.0, worst.1);
        worst.0
    }

    /// Small arguments (|x| < 0.7) in the even lanes, arguments up to `big`
    /// in the odd ones: vectors whose lanes take both branches of `tanh`.
    fn mixed_lanes(big: f64) -> Vec<f32> {
        sweep(-0.7, 0.7, 4096)
            .into_iter()
            .zip(sweep(-big, big, 4096))
            .flat_map(|(a, b)| [a, b])
            .collect()
    }

    /// Applies a scalar emitter to each lane separately.
    fn per_lane(
        vm: &VMath,
        b: &mut FunctionBuilder<'_>,
        x: Value,
        f: fn(&VMath, &mut FunctionBuilder<'_>, Value) -> Value,
    ) -> Value {
        let mut out = x;
        for lane in 0..4u8 {
            let s = b.ins().extractlane(x, lane);
            let y = f(vm, b, s);
            out = b.ins().insertlane(out, y, lane);
        }
        out
    }

    fn all_maps() -> JitCode {
        jit_maps(&[
            ("exp", &|vm, b, x| vm.exp(b, x)),
            ("exp2", &|vm, b, x| vm.exp2(b, x)),
            ("exp_np", &|vm, b, x| vm.exp_nonpositive(b, x)),
            ("exp2_np", &|vm, b, x| vm.exp2_nonpositive(b, x)),
            ("log", &|vm, b, x| vm.log(b, x)),
            ("log2", &|vm, b, x| vm.log2(b, x)),
            ("tanh", &|vm, b, x| vm.tanh(b, x)),
            ("sigmoid", &|vm, b, x| vm.sigmoid(b, x)),
            ("tanh_approx", &|vm, b, x| vm.tanh_approx(b, x)),
            ("tanh_approx_s", &|vm, b, x| {
                per_lane(vm, b, x, VMath::tanh_approx_scalar)
            }),
            ("exp_s", &|vm, b, x| per_lane(vm, b, x, VMath::exp_scalar)),
            ("log_s", &|vm, b, x| per_lane(vm, b, x, VMath::log_scalar)),
            ("tanh_s", &|vm, b, x| per_lane(vm, b, x, VMath::tanh_scalar)),
            ("reduce", &|vm, b, x| {
                // lanes: [max, sum, max_scalar(x0, x1), min_scalar(x0, x1)]
                let mx = vm.reduce_max(b, x);
                let sm = vm.reduce_sum(b, x);
                let x0 = b.ins().extractlane(x, 0);
                let x1 = b.ins().extractlane(x, 1);
                let smax = vm.max_scalar(b, x0, x1);
                let smin = vm.min_scalar(b, x0, x1);
                let v = b.ins().splat(F32X4, mx);
                let v = b.ins().insertlane(v, sm, 1);
                let v = b.ins().insertlane(v, smax, 2);
                b.ins().insertlane(v, smin, 3)
            }),
            ("maxmin", &|vm, b, x| {
                // (x, rotate(x)) lane-wise: max in lanes, then min of that with x.
                let bytes = b.ins().bitcast(types::I8X16, lane_flags(), x);
                let perm: Vec<u8> = (0..16).map(|i| ((i + 4) % 16) as u8).collect();
                let imm = b.func.dfg.immediates.push(ConstantData::from(perm));
                let rot = b.ins().shuffle(bytes, bytes, imm);
                let rot = b.ins().bitcast(F32X4, lane_flags(), rot);
                let mx = vm.max(b, x, rot);
                let mn = vm.min(b, x, rot);
                b.ins().fsub(mx, mn)
            }),
        ])
    }

    #[test]
    fn exp_family_accuracy_and_special_values() {
        let code = all_maps();
        let n = 1 << 16;
        assert!(max_ulp(&code, "exp", &sweep(-103.0, 88.72, n), f64::exp) <= 1.0);
        assert!(max_ulp(&code, "exp", &sweep(-1.0, 1.0, n), f64::exp) <= 1.0);
        assert!(max_ulp(&code, "exp2", &sweep(-149.0, 127.99, n), f64::exp2) <= 1.0);
        assert!(max_ulp(&code, "exp_np", &sweep(-87.3, 0.0, n), f64::exp) <= 1.0);
        assert!(max_ulp(&code, "exp2_np", &sweep(-126.0, 0.0, n), f64::exp2) <= 1.0);
        assert!(max_ulp(&code, "exp_s", &sweep(-20.0, 20.0, 4096), f64::exp) <= 1.0);

        let specials = [
            f32::NEG_INFINITY,
            f32::INFINITY,
            f32::NAN,
            0.0,
            -0.0,
            89.0,
            200.0,
            -200.0,
        ];
        let y = run(&code, "exp", &specials);
        assert_eq!(&y[..2], &[0.0, f32::INFINITY]);
        assert!(y[2].is_nan());
        assert_eq!(&y[3..], &[1.0, 1.0, f32::INFINITY, f32::INFINITY, 0.0]);
        let y = run(&code, "exp2", &specials);
        assert_eq!(y[0], 0.0);
        assert_eq!(y[1], f32::INFINITY);
        assert!(y[2].is_nan());
        assert_eq!(y[6..], [f32::INFINITY, 0.0]);
        for name in ["exp_np", "exp2_np"] {
            let y = run(&code, name, &[f32::NEG_INFINITY, f32::NAN, 0.0, -1000.0]);
            assert_eq!(y[0], 0.0, "{name}");
            assert!(y[1].is_nan(), "{name}");
            assert_eq!(&y[2..], &[1.0, 0.0], "{name}");
        }
    }

    #[test]
    fn log_family_accuracy_and_special_values() {
        let code = all_maps();
        // Log-spaced positive inputs over the whole range, subnormals included.
        let xs: Vec<f32> = sweep(-149.0, 127.99, 1 << 16)
            .into_iter()
            .map(|e| (e as f64).exp2() as f32)
            .chain(sweep(0.5, 2.0, 1 << 15))
            .collect();
        assert!(max_ulp(&code, "log", &xs, f64::ln) <= 1.0);
        assert!(max_ulp(&code, "log2", &xs, f64::log2) <= 2.0);
        assert!(max_ulp(&code, "log_s", &sweep(0.01, 100.0, 4096), f64::ln) <= 1.0);
        for name in ["log", "log2"] {
            let y = run(
                &code,
                name,
                &[
                    0.0,
                    -0.0,
                    -1.0,
                    f32::NAN,
                    f32::INFINITY,
                    1.0,
                    f32::NEG_INFINITY,
                ],
            );
            assert_eq!(&y[..2], &[f32::NEG_INFINITY, f32::NEG_INFINITY], "{name}");
            assert!(y[2].is_nan() && y[3].is_nan() && y[6].is_nan(), "{name}");
            assert_eq!(&y[4..6], &[f32::INFINITY, 0.0], "{name}");
        }
    }

    #[test]
    fn tanh_and_sigmoid_accuracy_and_special_values() {
        let code = all_maps();
        let n = 1 << 16;
        assert!(max_ulp(&code, "tanh", &sweep(-12.0, 12.0, n), f64::tanh) <= 2.0);
        assert!(max_ulp(&code, "tanh", &sweep(-0.7, 0.7, n), f64::tanh) <= 2.0);
        assert!(max_ulp(&code, "tanh_s", &sweep(-3.0, 3.0, 4096), f64::tanh) <= 2.0);
        // Vectors whose lanes take both branches (small lanes alone skip the exponential).
        let mixed = mixed_lanes(12.0);
        assert!(max_ulp(&code, "tanh", &mixed, f64::tanh) <= 2.0);
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        assert!(max_ulp(&code, "sigmoid", &sweep(-87.0, 30.0, n), sig) <= 2.1);
        assert!(max_ulp(&code, "sigmoid", &sweep(-103.0, -87.0, 4096), sig) <= 1.0);
        let y = run(
            &code,
            "tanh",
            &[f32::NEG_INFINITY, f32::INFINITY, f32::NAN, 0.0, -0.0, 1e-30],
        );
        assert_eq!(&y[..2], &[-1.0, 1.0]);
        assert!(y[2].is_nan());
        assert_eq!(y[3].to_bits(), 0.0f32.to_bits());
        assert_eq!(y[4].to_bits(), (-0.0f32).to_bits());
        assert_eq!(y[5], 1e-30);
        let y = run(
            &code,
            "sigmoid",
            &[f32::NEG_INFINITY, f32::INFINITY, f32::NAN, 0.0],
        );
        assert_eq!(y[0], 0.0);
        assert_eq!(y[1], 1.0);
        assert!(y[2].is_nan());
        assert_eq!(y[3], 0.5);
    }

    #[test]
    fn tanh_approx_accuracy_and_special_values() {
        let code = all_maps();
        let xs: Vec<f32> = sweep(-10.0, 10.0, 1 << 16)
            .into_iter()
            .chain((-149..0).map(|e| (e as f32).exp2()))
            .collect();
        assert!(max_ulp(&code, "tanh_approx", &xs, f64::tanh) <= 6.0);
        assert!(max_ulp(&code, "tanh_approx_s", &sweep(-3.0, 3.0, 4096), f64::tanh) <= 6.0);
        // The jit and the interpreter's form agree to 3 ulp (below 0.625 one
        // is a polynomial within 2 ulp, the other libm's tanh).
        let ys = run(&code, "tanh_approx", &xs);
        for (&x, &y) in xs.iter().zip(&ys) {
            let want = crate::tile::math::tanh_approx(x);
            assert!(ulp_error(y, want as f64) <= 3.0, "{x}: {y} vs {want}");
        }
        // Vectors whose lanes take both forms.
        let mixed = mixed_lanes(10.0);
        assert!(max_ulp(&code, "tanh_approx", &mixed, f64::tanh) <= 6.0);
        let y = run(
            &code,
            "tanh_approx",
            &[f32::NEG_INFINITY, f32::INFINITY, f32::NAN, 0.0, -0.0, 100.0],
        );
        assert_eq!(&y[..2], &[-1.0, 1.0]);
        assert!(y[2].is_nan());
        assert_eq!(y[3].to_bits(), 0.0f32.to_bits());
        assert_eq!(y[4].to_bits(), (-0.0f32).to_bits());
        assert_eq!(y[5], 1.0);
    }

    #[test]
    fn reductions_max_min_and_nan_convention() {
        let code = all_maps();
        let y = run(&code, "reduce", &[1.0, -2.0, 7.5, 3.0]);
        assert_eq!(y, vec![7.5, 9.5, 1.0, -2.0]);
        let y = run(&code, "reduce", &[f32::NEG_INFINITY; 4]);
        assert_eq!(y[0], f32::NEG_INFINITY);
        // max(x, NaN) = NaN and max(NaN, y) = y: the second operand wins when unordered.
        let y = run(&code, "reduce", &[2.0, f32::NAN, 0.0, 0.0]);
        assert!(y[2].is_nan() && y[3].is_nan());
        let y = run(&code, "reduce", &[f32::NAN, 2.0, 0.0, 0.0]);
        assert_eq!(&y[2..], &[2.0, 2.0]);
        // maxmin: lane i = max(x_i, x_{i+1}) - min(x_i, x_{i+1}) = |x_i - x_{i+1}|.
        let y = run(&code, "maxmin", &[1.0, 4.0, -2.0, 0.5]);
        assert_eq!(y, vec![3.0, 6.0, 2.5, 0.5]);
    }
}
