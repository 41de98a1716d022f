//! The vector primitives the native tile kernels are written against.
//!
//! Each instruction set is a zero-sized type implementing [`Simd`]; the kernels in
//! `kernels.rs` are generic over it, so one kernel text serves AVX-512, AVX2 and the
//! portable fallback and only these primitives differ.
//!
//! The primitives are `#[inline(always)]` and not themselves `#[target_feature]`
//! functions: they are inlined into the kernel entry points, which carry the target
//! features, and there the intrinsics they call are inlined in turn. Calling any of
//! them outside such an entry point (on a CPU without the feature) is undefined
//! behaviour, which is why every method is `unsafe`.

/// A vector instruction set with `LANES` f32 lanes.
///
/// # Safety
///
/// Implementations may only be used inside functions compiled with the matching
/// target features, on CPUs that have them. Pointers passed to loads and stores must be
/// valid for `LANES` elements (or the first `n` lanes for the masked forms).
pub(crate) unsafe trait Simd: Copy {
    /// Number of f32 lanes.
    const LANES: usize;
    /// Vector registers of the instruction set: register blocks of the
    /// products are sized to fit them (a block that does not spills its
    /// accumulators to the stack on every step).
    const REGS: usize;
    /// A vector of `LANES` f32.
    type V: Copy;
    /// A lane mask selecting the first `n` lanes.
    type M: Copy;

    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// Mask of the first `n` lanes, `n <= LANES`.
    unsafe fn first_lanes(n: usize) -> Self::M;
    /// Loads the masked lanes; other lanes take `fill` and their memory is not touched.
    unsafe fn load_masked(p: *const f32, m: Self::M, fill: Self::V) -> Self::V;
    /// Stores the masked lanes; other memory is not touched.
    unsafe fn store_masked(p: *mut f32, m: Self::M, v: Self::V);
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    /// `a * b + c`, fused where the instruction set has FMA.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// Lane-wise maximum with x86 `maxps` semantics: `a > b ? a : b`, so a NaN in
    /// either operand yields `b`.
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    /// Horizontal maximum of all lanes (NaN handling as a chain of [`Simd::max`]).
    unsafe fn reduce_max(v: Self::V) -> f32;
    /// Horizontal sum of all lanes.
    unsafe fn reduce_sum(v: Self::V) -> f32;
    /// `2^n` for `t = n + 1.5 * 2^23` (the magic-number rounding of `n`), built by
    /// shifting `n + 127` into the exponent field; exact for `-126 <= n <= 127` and
    /// `0.0` for `n = -127`.
    unsafe fn pow2_from_magic(t: Self::V) -> Self::V;
    /// `LANES` bf16 values (bits) widened to f32.
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> Self::V {
        widen::<Self, u16>(p, Self::LANES, |x| f32::from_bits((x as u32) << 16))
    }
    /// `LANES` pairs of bf16 (bits; the first of a pair in the low half of
    /// its `u32`) widened to f32: the first of each pair, then the second.
    #[inline(always)]
    unsafe fn load_bf16_pairs(p: *const u32) -> (Self::V, Self::V) {
        (
            widen::<Self, u32>(p, Self::LANES, |x| f32::from_bits(x << 16)),
            widen::<Self, u32>(p, Self::LANES, |x| f32::from_bits(x & 0xffff_0000)),
        )
    }
    /// `LANES` f16 values (bits) widened to f32.
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> Self::V {
        widen::<Self, u16>(p, Self::LANES, |x| half::f16::from_bits(x).to_f32())
    }
    /// `LANES` int8 values as f32.
    #[inline(always)]
    unsafe fn load_i8(p: *const i8) -> Self::V {
        widen::<Self, i8>(p, Self::LANES, |x| x as f32)
    }
    /// What [`Simd::load_e4m3`] gives for an e4m3fn value of 1: a power of
    /// two, so that a caller folds its inverse into a row scale.
    const E4M3_UNIT: f32 = 1.0;
    /// `LANES` e4m3fn values (bits) widened to f32, times [`Simd::E4M3_UNIT`].
    #[inline(always)]
    unsafe fn load_e4m3(p: *const u8) -> Self::V {
        widen::<Self, u8>(p, Self::LANES, crate::tensor::e4m3_to_f32)
    }
    /// Row maxima of `LANES` rows at once: lane `r` of the result is the horizontal
    /// maximum of `rows[r]` (`rows.len() == LANES`; a row holding NaN gives an
    /// unspecified lane, which the online softmax never meets: its column maxima drop NaN).
    #[inline(always)]
    unsafe fn reduce_rows_max(rows: &[Self::V]) -> Self::V {
        reduce_each_row::<Self>(rows, |v| Self::reduce_max(v))
    }
    /// Row sums of `LANES` rows at once: lane `r` of the result is the horizontal sum
    /// of `rows[r]` (`rows.len() == LANES`).
    #[inline(always)]
    unsafe fn reduce_rows_sum(rows: &[Self::V]) -> Self::V {
        reduce_each_row::<Self>(rows, |v| Self::reduce_sum(v))
    }
}

/// The first `n` elements at `p` converted by `f` (the other lanes 0): the
/// scalar form of the widening loads, and every type's masked load.
#[inline(always)]
pub(crate) unsafe fn widen<S: Simd, T: Copy>(p: *const T, n: usize, f: impl Fn(T) -> f32) -> S::V {
    let mut out = [0f32; MAX_LANES];
    for (i, o) in out.iter_mut().enumerate().take(n) {
        *o = f(*p.add(i));
    }
    S::load(out.as_ptr())
}

/// The default of [`Simd::reduce_rows_max`] and [`Simd::reduce_rows_sum`]: one
/// horizontal reduction per row, gathered into a vector.
#[inline(always)]
unsafe fn reduce_each_row<S: Simd>(rows: &[S::V], reduce: impl Fn(S::V) -> f32) -> S::V {
    debug_assert_eq!(rows.len(), S::LANES);
    let mut out = [0f32; MAX_LANES];
    for (o, &v) in out.iter_mut().zip(rows) {
        *o = reduce(v);
    }
    S::load(out.as_ptr())
}

/// The widest [`Simd::LANES`] of any implementation (AVX-512).
pub(crate) const MAX_LANES: usize = 16;

/// The portable fallback: plain arrays of four lanes, which the compiler
/// auto-vectorises to the baseline vector unit (SSE2 on x86-64, NEON on aarch64).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Portable;

// SAFETY: every method only touches the memory its contract allows and needs no CPU
// feature.
unsafe impl Simd for Portable {
    const LANES: usize = 4;
    const REGS: usize = 16;
    type V = [f32; 4];
    type M = usize;

    #[inline(always)]
    unsafe fn splat(x: f32) -> [f32; 4] {
        [x; 4]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> [f32; 4] {
        std::ptr::read_unaligned(p as *const [f32; 4])
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: [f32; 4]) {
        std::ptr::write_unaligned(p as *mut [f32; 4], v)
    }
    #[inline(always)]
    unsafe fn first_lanes(n: usize) -> usize {
        n
    }
    #[inline(always)]
    unsafe fn load_masked(p: *const f32, n: usize, fill: [f32; 4]) -> [f32; 4] {
        let mut v = fill;
        for (i, lane) in v.iter_mut().enumerate().take(n) {
            *lane = *p.add(i);
        }
        v
    }
    #[inline(always)]
    unsafe fn store_masked(p: *mut f32, n: usize, v: [f32; 4]) {
        for (i, lane) in v.iter().enumerate().take(n) {
            *p.add(i) = *lane;
        }
    }
    #[inline(always)]
    unsafe fn add(a: [f32; 4], b: [f32; 4]) -> [f32; 4] {
        std::array::from_fn(|i| a[i] + b[i])
    }
    #[inline(always)]
    unsafe fn sub(a: [f32; 4], b: [f32; 4]) -> [f32; 4] {
        std::array::from_fn(|i| a[i] - b[i])
    }
    #[inline(always)]
    unsafe fn mul(a: [f32; 4], b: [f32; 4]) -> [f32; 4] {
        std::array::from_fn(|i| a[i] * b[i])
    }
    #[inline(always)]
    unsafe fn fma(a: [f32; 4], b: [f32; 4], c: [f32; 4]) -> [f32; 4] {
        // Unfused: a fused multiply-add without hardware support is a slow libm call.
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    unsafe fn max(a: [f32; 4], b: [f32; 4]) -> [f32; 4] {
        std::array::from_fn(|i| if a[i] > b[i] { a[i] } else { b[i] })
    }
    #[inline(always)]
    unsafe fn reduce_max(v: [f32; 4]) -> f32 {
        let a = if v[0] > v[2] { v[0] } else { v[2] };
        let b = if v[1] > v[3] { v[1] } else { v[3] };
        if a > b {
            a
        } else {
            b
        }
    }
    #[inline(always)]
    unsafe fn reduce_sum(v: [f32; 4]) -> f32 {
        (v[0] + v[2]) + (v[1] + v[3])
    }
    #[inline(always)]
    unsafe fn pow2_from_magic(t: [f32; 4]) -> [f32; 4] {
        std::array::from_fn(|i| f32::from_bits(t[i].to_bits().wrapping_add(127) << 23))
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Simd;
    use std::arch::x86_64::*;

    /// AVX2 + FMA (and F16C, for f16 widening), 8 lanes.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx2;

    // SAFETY: only used inside `#[target_feature(enable = "avx2,fma,f16c")]` entry points
    // that are called after run-time detection of the three features.
    unsafe impl Simd for Avx2 {
        const LANES: usize = 8;
        const REGS: usize = 16;
        type V = __m256;
        type M = __m256i;

        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn first_lanes(n: usize) -> __m256i {
            let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), idx)
        }
        #[inline(always)]
        unsafe fn load_masked(p: *const f32, m: __m256i, fill: __m256) -> __m256 {
            let loaded = _mm256_maskload_ps(p, m);
            _mm256_blendv_ps(fill, loaded, _mm256_castsi256_ps(m))
        }
        #[inline(always)]
        unsafe fn store_masked(p: *mut f32, m: __m256i, v: __m256) {
            _mm256_maskstore_ps(p, m, v)
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            _mm256_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: __m256, b: __m256) -> __m256 {
            _mm256_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: __m256, b: __m256) -> __m256 {
            _mm256_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn max(a: __m256, b: __m256) -> __m256 {
            _mm256_max_ps(a, b)
        }
        #[inline(always)]
        unsafe fn reduce_max(v: __m256) -> f32 {
            let lo = _mm256_castps256_ps128(v);
            let hi = _mm256_extractf128_ps(v, 1);
            let m = _mm_max_ps(lo, hi);
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
            _mm_cvtss_f32(m)
        }
        #[inline(always)]
        unsafe fn reduce_sum(v: __m256) -> f32 {
            let lo = _mm256_castps256_ps128(v);
            let hi = _mm256_extractf128_ps(v, 1);
            let s = _mm_add_ps(lo, hi);
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            _mm_cvtss_f32(s)
        }
        #[inline(always)]
        unsafe fn load_bf16_pairs(p: *const u32) -> (__m256, __m256) {
            let x = _mm256_loadu_si256(p.cast());
            (
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(x)),
                _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(-65536))),
            )
        }
        #[inline(always)]
        unsafe fn load_bf16(p: *const u16) -> __m256 {
            let x = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(x))
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u16) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
        }
        #[inline(always)]
        unsafe fn load_i8(p: *const i8) -> __m256 {
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast())))
        }
        /// The values come out times 2^-8 (see `load_e4m3`).
        const E4M3_UNIT: f32 = 1.0 / 256.0;
        #[inline(always)]
        unsafe fn load_e4m3(p: *const u8) -> __m256 {
            // Through f16 (F16C): e4m3fn's exponent and mantissa fields, moved
            // into f16's, give 2^-8 times the value (the biases are 7 and 15),
            // subnormals included; the caller folds the 2^8 into the row's
            // scale (`E4M3_UNIT`). Each byte goes to the high half of a 16-bit
            // lane, and an arithmetic shift right by one puts the sign at bit
            // 15 (and 14, cleared) and the other seven bits at 13..7.
            // S.1111.111 (NaN) becomes 0xffff, an f16 NaN. Seven operations
            // on eight 16-bit lanes, where rebiasing in 32-bit lanes (as the
            // AVX-512 load does) took thirteen, two of them blends of two
            // micro-ops each.
            let x = _mm_unpacklo_epi8(_mm_setzero_si128(), _mm_loadl_epi64(p.cast()));
            let bits = _mm_and_si128(_mm_srai_epi16::<1>(x), _mm_set1_epi16(0xbf80u16 as i16));
            let high = _mm_set1_epi16(0x7f00);
            let nan = _mm_cmpeq_epi16(_mm_and_si128(x, high), high);
            _mm256_cvtph_ps(_mm_or_si128(bits, nan))
        }
        #[inline(always)]
        unsafe fn pow2_from_magic(t: __m256) -> __m256 {
            let bits = _mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(127));
            _mm256_castsi256_ps(_mm256_slli_epi32(bits, 23))
        }
        #[inline(always)]
        unsafe fn reduce_rows_max(rows: &[__m256]) -> __m256 {
            reduce_rows8(rows, |a, b| _mm256_max_ps(a, b))
        }
        #[inline(always)]
        unsafe fn reduce_rows_sum(rows: &[__m256]) -> __m256 {
            reduce_rows8(rows, |a, b| _mm256_add_ps(a, b))
        }
    }

    /// Lane `r` of the result is `op` over all lanes of `rows[r]`, for 8 rows: a
    /// transpose interleaved with the reduction (14 shuffles and 7 `op`s in three
    /// levels) instead of one horizontal reduction per row.
    #[inline(always)]
    unsafe fn reduce_rows8(rows: &[__m256], op: impl Fn(__m256, __m256) -> __m256) -> __m256 {
        assert!(rows.len() == 8);
        // Level 1, per 128-bit half: [r0 a, r1 a, r0 b, r1 b] with `a op b` the half's reduction.
        let pair = |x: __m256, y: __m256| op(_mm256_unpacklo_ps(x, y), _mm256_unpackhi_ps(x, y));
        let (p01, p23) = (pair(rows[0], rows[1]), pair(rows[2], rows[3]));
        let (p45, p67) = (pair(rows[4], rows[5]), pair(rows[6], rows[7]));
        // Level 2, per half: [r0, r1, r2, r3] reduced over the half.
        let quad = |x: __m256, y: __m256| {
            op(
                _mm256_shuffle_ps::<0b01_00_01_00>(x, y),
                _mm256_shuffle_ps::<0b11_10_11_10>(x, y),
            )
        };
        let (q0, q4) = (quad(p01, p23), quad(p45, p67));
        // Level 3: combine the halves.
        op(
            _mm256_permute2f128_ps::<0x20>(q0, q4),
            _mm256_permute2f128_ps::<0x31>(q0, q4),
        )
    }

    /// AVX-512F, 16 lanes.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx512;

    // SAFETY: only used inside `#[target_feature(enable = "avx512f")]` entry points that
    // are called after run-time detection of the feature.
    unsafe impl Simd for Avx512 {
        const LANES: usize = 16;
        const REGS: usize = 32;
        type V = __m512;
        type M = __mmask16;

        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            _mm512_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn first_lanes(n: usize) -> __mmask16 {
            ((1u32 << n) - 1) as __mmask16
        }
        #[inline(always)]
        unsafe fn load_masked(p: *const f32, m: __mmask16, fill: __m512) -> __m512 {
            _mm512_mask_loadu_ps(fill, m, p)
        }
        #[inline(always)]
        unsafe fn store_masked(p: *mut f32, m: __mmask16, v: __m512) {
            _mm512_mask_storeu_ps(p, m, v)
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            _mm512_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: __m512, b: __m512) -> __m512 {
            _mm512_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            _mm512_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn max(a: __m512, b: __m512) -> __m512 {
            _mm512_max_ps(a, b)
        }
        #[inline(always)]
        unsafe fn reduce_max(v: __m512) -> f32 {
            let lo = _mm512_castps512_ps256(v);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
            let m = _mm256_max_ps(lo, hi);
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
            _mm_cvtss_f32(m)
        }
        #[inline(always)]
        unsafe fn reduce_sum(v: __m512) -> f32 {
            let lo = _mm512_castps512_ps256(v);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
            let s = _mm256_add_ps(lo, hi);
            let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            _mm_cvtss_f32(s)
        }
        #[inline(always)]
        unsafe fn load_bf16_pairs(p: *const u32) -> (__m512, __m512) {
            let x = _mm512_loadu_si512(p.cast());
            (
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(x)),
                _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(-65536))),
            )
        }
        #[inline(always)]
        unsafe fn load_bf16(p: *const u16) -> __m512 {
            let x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(x))
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u16) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
        }
        #[inline(always)]
        unsafe fn load_i8(p: *const i8) -> __m512 {
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.cast())))
        }
        /// The values come out times 2^-8 (see `load_e4m3`).
        const E4M3_UNIT: f32 = 1.0 / 256.0;
        #[inline(always)]
        unsafe fn load_e4m3(p: *const u8) -> __m512 {
            // Through f16, as on AVX2 (the exponent and mantissa fields moved
            // into f16's give 2^-8 times the value, subnormals included), on
            // sixteen 16-bit lanes of a 256-bit vector, then one `vcvtph2ps`
            // to sixteen f32 lanes: nine micro-ops, where rebiasing in 32-bit
            // lanes took thirteen operations, two of them blends of two
            // micro-ops each (and an fp8 paged decode ran at 1.55x the f32
            // one against int8's 2.2x).
            let x = _mm256_slli_epi16::<8>(_mm256_cvtepu8_epi16(_mm_loadu_si128(p.cast())));
            let bits = _mm256_and_si256(
                _mm256_srai_epi16::<1>(x),
                _mm256_set1_epi16(0xbf80u16 as i16),
            );
            let high = _mm256_set1_epi16(0x7f00);
            let nan = _mm256_cmpeq_epi16(_mm256_and_si256(x, high), high);
            _mm512_cvtph_ps(_mm256_or_si256(bits, nan))
        }
        #[inline(always)]
        unsafe fn pow2_from_magic(t: __m512) -> __m512 {
            let bits = _mm512_add_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(127));
            _mm512_castsi512_ps(_mm512_slli_epi32::<23>(bits))
        }
        #[inline(always)]
        unsafe fn reduce_rows_max(rows: &[__m512]) -> __m512 {
            reduce_rows16(rows, |a, b| _mm512_max_ps(a, b))
        }
        #[inline(always)]
        unsafe fn reduce_rows_sum(rows: &[__m512]) -> __m512 {
            reduce_rows16(rows, |a, b| _mm512_add_ps(a, b))
        }
    }

    /// Lane `r` of the result is `op` over all lanes of `rows[r]`, for 16 rows: the
    /// transpose-reduce of `reduce_rows8` inside each 128-bit chunk (rows four at a
    /// time), then two levels across chunks (30 shuffles and 15 `op`s in all,
    /// against a horizontal reduction of 7 steps per row).
    #[inline(always)]
    unsafe fn reduce_rows16(rows: &[__m512], op: impl Fn(__m512, __m512) -> __m512) -> __m512 {
        assert!(rows.len() == 16);
        // Per chunk: [r0 a, r1 a, r0 b, r1 b] with `a op b` the chunk's reduction.
        let pair = |x: __m512, y: __m512| op(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
        let p = [
            pair(rows[0], rows[1]),
            pair(rows[2], rows[3]),
            pair(rows[4], rows[5]),
            pair(rows[6], rows[7]),
            pair(rows[8], rows[9]),
            pair(rows[10], rows[11]),
            pair(rows[12], rows[13]),
            pair(rows[14], rows[15]),
        ];
        // Per chunk c of q[k]: rows 4k..4k+3, each reduced over chunk c.
        let quad = |x: __m512, y: __m512| {
            op(
                _mm512_shuffle_ps::<0b01_00_01_00>(x, y),
                _mm512_shuffle_ps::<0b11_10_11_10>(x, y),
            )
        };
        let q = [
            quad(p[0], p[1]),
            quad(p[2], p[3]),
            quad(p[4], p[5]),
            quad(p[6], p[7]),
        ];
        // Chunks (0, 2) against (1, 3) of two row quads, then the same once more:
        // chunk k of the result is q[k] reduced over all four chunks.
        let halves = |x: __m512, y: __m512| {
            op(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y),
            )
        };
        halves(halves(q[0], q[1]), halves(q[2], q[3]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `reduce_rows_max` and `reduce_rows_sum` of `S` against scalar reductions, on
    /// random rows with some `-inf` lanes (masked scores) and one all-`-inf` row.
    unsafe fn check_row_reductions<S: Simd>(name: &str) {
        let lanes = S::LANES;
        let mut x = 0x9e37_79b9u32;
        let mut data = vec![0f32; lanes * lanes];
        for (i, v) in data.iter_mut().enumerate() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *v = if i % 7 == 3 || i / lanes == 1 {
                f32::NEG_INFINITY
            } else {
                (x >> 8) as f32 / (1u32 << 20) as f32 - 8.0
            };
        }
        let rows: Vec<S::V> = data.chunks(lanes).map(|r| S::load(r.as_ptr())).collect();
        let mut max = [0f32; MAX_LANES];
        let mut sum = [0f32; MAX_LANES];
        S::store(max.as_mut_ptr(), S::reduce_rows_max(&rows));
        let finite: Vec<S::V> = data
            .chunks(lanes)
            .map(|r| {
                let r: Vec<f32> = r.iter().map(|v| v.max(-1.0)).collect();
                S::load(r.as_ptr())
            })
            .collect();
        S::store(sum.as_mut_ptr(), S::reduce_rows_sum(&finite));
        for (r, row) in data.chunks(lanes).enumerate() {
            let want_max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max[r], want_max, "{name}: max of row {r}");
            let want_sum: f64 = row.iter().map(|&v| v.max(-1.0) as f64).sum();
            let scale: f64 = row.iter().map(|&v| (v.max(-1.0) as f64).abs()).sum();
            assert!(
                (sum[r] as f64 - want_sum).abs() <= 1e-6 * scale.max(1.0),
                "{name}: sum of row {r}: {} against {want_sum}",
                sum[r]
            );
        }
    }

    /// Every widening load of `S` against the scalar conversions, on every
    /// bit pattern of e4m3 and int8 and on bf16/f16 patterns of every
    /// exponent (subnormals, infinities and NaN included): the same bits (for
    /// e4m3, of the value times `E4M3_UNIT`), or NaN for NaN.
    unsafe fn check_widening_loads<S: Simd>(name: &str) {
        let same = |got: f32, want: f32, what: &str| {
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{name} {what}: {got:e} ({:#x}) against {want:e} ({:#x})",
                got.to_bits(),
                want.to_bits()
            );
        };
        let mut out = [0f32; MAX_LANES];
        for block in (0..256usize).step_by(S::LANES) {
            let bytes: Vec<u8> = (block..block + S::LANES).map(|b| b as u8).collect();
            S::store(out.as_mut_ptr(), S::load_e4m3(bytes.as_ptr()));
            for (i, &b) in bytes.iter().enumerate() {
                same(
                    out[i],
                    crate::tensor::e4m3_to_f32(b) * S::E4M3_UNIT,
                    &format!("e4m3 {b:#x}"),
                );
            }
            S::store(out.as_mut_ptr(), S::load_i8(bytes.as_ptr().cast()));
            for (i, &b) in bytes.iter().enumerate() {
                same(out[i], b as i8 as f32, &format!("i8 {b:#x}"));
            }
        }
        for block in (0..65536usize).step_by(257 * S::LANES) {
            let bits: Vec<u16> = (0..S::LANES).map(|i| (block + 257 * i) as u16).collect();
            S::store(out.as_mut_ptr(), S::load_bf16(bits.as_ptr()));
            for (i, &b) in bits.iter().enumerate() {
                same(
                    out[i],
                    half::bf16::from_bits(b).to_f32(),
                    &format!("bf16 {b:#x}"),
                );
            }
            S::store(out.as_mut_ptr(), S::load_f16(bits.as_ptr()));
            for (i, &b) in bits.iter().enumerate() {
                same(
                    out[i],
                    half::f16::from_bits(b).to_f32(),
                    &format!("f16 {b:#x}"),
                );
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn check_avx2() {
        check_row_reductions::<Avx2>("avx2");
        check_widening_loads::<Avx2>("avx2");
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn check_avx512() {
        check_row_reductions::<Avx512>("avx512");
        check_widening_loads::<Avx512>("avx512");
    }

    #[test]
    fn row_reductions_and_widening_loads_match_scalar_ones_on_every_supported_isa() {
        // SAFETY: the portable primitives need no CPU feature.
        unsafe {
            check_row_reductions::<Portable>("portable");
            check_widening_loads::<Portable>("portable");
        }
        #[cfg(target_arch = "x86_64")]
        {
            use super::super::NativeIsa;
            if NativeIsa::Avx2.is_supported() {
                // SAFETY: AVX2, FMA and F16C were detected.
                unsafe { check_avx2() };
            }
            if NativeIsa::Avx512.is_supported() {
                // SAFETY: AVX-512F was detected.
                unsafe { check_avx512() };
            } else {
                eprintln!("avx512: not supported here, row reductions and widening loads not run");
            }
        }
    }
}
