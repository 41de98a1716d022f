//! Vectorised exponentials for the native online-softmax helper, and the polynomial
//! constants shared with the Cranelift emitters in `codegen::clif::vmath`.
//!
//! All functions use the same scheme: `x = n·ln2 + r` with `n` rounded to the nearest
//! integer by adding the magic number `1.5·2^23`, `r` in `[-ln2/2, ln2/2]`,
//! `exp(r) = 1 + r + r²·P(r)` with a degree-5 `P` fitted for minimax relative error
//! (5e-11 in exact arithmetic, far below f32 rounding), and `2^n` built by shifting
//! `n + 127` into the exponent field. Measured accuracy: see the tests (<= 2 ulp).

use super::simd::Simd;

/// `1.5 · 2^23`: adding it to an f32 of magnitude < 2^22 rounds to an integer and
/// leaves that integer in the low mantissa bits.
pub const MAGIC: f32 = 12_582_912.0;
/// `log2(e)`.
pub const LOG2E: f32 = std::f32::consts::LOG2_E;
/// `ln(2)`.
pub const LN2: f32 = std::f32::consts::LN_2;
/// High part of `ln(2)` with 9 significant bits, so `n · LN2_HI` is exact for `|n| < 2^15`.
pub const LN2_HI: f32 = 355.0 / 512.0;
/// `ln(2) - LN2_HI`.
pub const LN2_LO: f32 = -2.121_944_4e-4;
/// `P(r)` in `exp(r) = 1 + r + r²·P(r)`, lowest degree first.
pub const EXP_P: [f32; 6] = [
    0.5,
    0.166_666_66,
    0.041_666_295,
    0.008_333_497,
    0.001_394_465_1,
    0.000_197_903_73,
];
/// `P(f)` in `2^f = 1 + f·P(f)` for `f` in `[-1/2, 1/2]`, lowest degree first
/// (near-minimax relative error 2.0e-9 in exact arithmetic, fitted by Lawson's
/// iteration on Chebyshev nodes).
pub const EXP2_P: [f32; 6] = [
    LN2, // the fit lands on ln 2 rounded to f32
    0.240_226_48,
    0.055_503_324,
    0.009_618_437,
    0.001_339_887_4,
    0.000_153_533_62,
];
/// `P(f)` in `ln(1 + f) = f - f²/2 + f³·P(f)` for `f` in `[sqrt(1/2) - 1, sqrt(2) - 1]`,
/// lowest degree first (minimax relative error 7.5e-10 in exact arithmetic).
pub const LOG_P: [f32; 9] = [
    0.333_333_13,
    -0.250_000_1,
    0.200_021_19,
    -0.166_679_95,
    0.142_195_46,
    -0.124_055_98,
    0.118_882_15,
    -0.116_756_15,
    0.067_464_81,
];
/// `P(x²)` in `tanh(x) = x + x³·P(x²)` for `|x| < TANH_POLY_LIMIT`, lowest degree
/// first (minimax relative error 4.4e-9 in exact arithmetic).
pub const TANH_P: [f32; 5] = [
    -0.333_332_8,
    0.133_314_42,
    -0.053_739_72,
    0.020_639_1,
    -0.005_705_001_3,
];
/// Below this magnitude `tanh` uses its odd polynomial; above it `1 - 2/(exp(2|x|) + 1)`.
pub const TANH_POLY_LIMIT: f32 = 0.625;

/// `exp(r)` for `|r| <= ln2/2`.
#[inline(always)]
unsafe fn exp_reduced<S: Simd>(r: S::V) -> S::V {
    let mut p = S::splat(EXP_P[5]);
    for &c in EXP_P[..5].iter().rev() {
        p = S::fma(p, r, S::splat(c));
    }
    let r2 = S::mul(r, r);
    S::add(S::fma(p, r2, r), S::splat(1.0))
}

/// `exp(x)` for `x <= 0` (the online-softmax domain). `exp(-inf) = 0`; NaN gives NaN;
/// results below `2^-126` (x < -87.3) may be flushed to zero. Positive `x` is outside
/// the domain (results are wrong from `x > 88`).
#[inline(always)]
pub(crate) unsafe fn exp_nonpositive<S: Simd>(x: S::V) -> S::V {
    // max(c, x) returns x when x is NaN, so NaN propagates.
    let x = S::max(S::splat(-88.0), x);
    let t = S::fma(x, S::splat(LOG2E), S::splat(MAGIC));
    let n = S::sub(t, S::splat(MAGIC));
    let r = S::fma(n, S::splat(-LN2_HI), x);
    let r = S::fma(n, S::splat(-LN2_LO), r);
    S::mul(exp_reduced::<S>(r), S::pow2_from_magic(t))
}

/// `2^x` for `x <= 0`, with the same conventions as [`exp_nonpositive`]
/// (results below `2^-126` may be flushed to zero). `x = n + f` with `f` in
/// `[-1/2, 1/2]` and `2^f = 1 + f·P(f)` ([`EXP2_P`], degree 6): no `ln 2`
/// scaling and four operations fewer than going through `exp`.
#[inline(always)]
pub(crate) unsafe fn exp2_nonpositive<S: Simd>(x: S::V) -> S::V {
    let x = S::max(S::splat(-127.0), x);
    let t = S::add(x, S::splat(MAGIC));
    let n = S::sub(t, S::splat(MAGIC));
    let f = S::sub(x, n);
    let mut p = S::splat(EXP2_P[5]);
    for &c in EXP2_P[..5].iter().rev() {
        p = S::fma(p, f, S::splat(c));
    }
    let p = S::fma(p, f, S::splat(1.0));
    S::mul(p, S::pow2_from_magic(t))
}

/// Max error in ulps of `got` against the exact `want`, where ulps are measured at the
/// exact result (subnormal results count in subnormal ulps).
pub fn ulp_error(got: f32, want: f64) -> f64 {
    if got.is_nan() || want.is_nan() {
        return if got.is_nan() && want.is_nan() {
            0.0
        } else {
            f64::INFINITY
        };
    }
    if got as f64 == want {
        return 0.0;
    }
    if want.is_infinite() || got.is_infinite() {
        // An exact result beyond f32::MAX rounds to inf: allowed when got is inf too.
        let beyond = want.abs() >= f32::MAX as f64;
        return if got.is_infinite() && beyond && got.signum() as f64 == want.signum() {
            0.0
        } else {
            f64::INFINITY
        };
    }
    let w = want.abs().max(f32::MIN_POSITIVE as f64);
    let ulp = 2f64.powi(w.log2().floor() as i32 - 23);
    let ulp = ulp.max(2f64.powi(-149));
    (got as f64 - want).abs() / ulp
}
