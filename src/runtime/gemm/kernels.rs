//! The native tile kernels, written once against [`Simd`] and instantiated per
//! instruction set as `extern "C"` entry points (see `mod.rs` for their contracts).
//!
//! `qk` walks column tiles of `NV` vectors (`NV · LANES` keys, a whole number of
//! packed panels) and, inside each, row tiles of `MR` query rows; one register tile
//! keeps `MR x NV` accumulators over the whole `d` reduction. `pv` walks column blocks
//! of `NV` vectors of the head dimension and row tiles of `MR` rows; the accumulator tile
//! is loaded once, updated over all keys of the tile and stored once. Rows left over
//! after the full row tiles go through tiles of 8, 4, 2 and 1 rows; a ragged last column
//! tile goes through a tile with fewer vectors and masked stores.

use super::math::{exp2_nonpositive, exp_nonpositive};
use super::simd::{Simd, MAX_LANES};
use super::PANEL;

/// Loads `R` rows of `NV` vectors from rows `stride` apart: the first
/// `n_cols` columns, zero past them.
#[inline(always)]
pub(crate) unsafe fn load_rows<S: Simd, const R: usize, const NV: usize>(
    p: *const f32,
    stride: usize,
    n_cols: usize,
) -> [[S::V; NV]; R] {
    let lanes = S::LANES;
    let zero = S::splat(0.0);
    let mut c = [[zero; NV]; R];
    for (i, c_row) in c.iter_mut().enumerate() {
        let row = p.add(i * stride);
        for (j, c_v) in c_row.iter_mut().enumerate() {
            let col = j * lanes;
            if col + lanes <= n_cols {
                *c_v = S::load(row.add(col));
            } else if col < n_cols {
                *c_v = S::load_masked(row.add(col), S::first_lanes(n_cols - col), zero);
            }
        }
    }
    c
}

/// Stores `R` rows of `NV` vectors (times `scale`, if any) to the first
/// `n_cols` columns of rows `s_stride` apart.
#[inline(always)]
pub(crate) unsafe fn store_rows<S: Simd, const R: usize, const NV: usize>(
    rows: &[[S::V; NV]; R],
    n_cols: usize,
    s: *mut f32,
    s_stride: usize,
    scale: Option<f32>,
) {
    let lanes = S::LANES;
    for (i, row_v) in rows.iter().enumerate() {
        let row = s.add(i * s_stride);
        for (v, &x) in row_v.iter().enumerate() {
            let col = v * lanes;
            let val = match scale {
                Some(f) => S::mul(x, S::splat(f)),
                None => x,
            };
            if col + lanes <= n_cols {
                S::store(row.add(col), val);
            } else if col < n_cols {
                S::store_masked(row.add(col), S::first_lanes(n_cols - col), val);
            }
        }
    }
}

/// Register tile of `qk`: `R` rows by `NV` vectors, reduced over `d`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn qk_tile<S: Simd, const R: usize, const NV: usize>(
    q: *const f32,
    q_stride: usize,
    k: *const f32,
    panel_stride: usize,
    d: usize,
    n_cols: usize,
    s: *mut f32,
    s_stride: usize,
    scale: f32,
) {
    let lanes = S::LANES;
    let mut acc = [[S::splat(0.0); NV]; R];
    for kk in 0..d {
        let b: [S::V; NV] = std::array::from_fn(|v| {
            let col = v * lanes;
            S::load(k.add((col / PANEL) * panel_stride + kk * PANEL + col % PANEL))
        });
        for (i, acc_row) in acc.iter_mut().enumerate() {
            let a = S::splat(*q.add(i * q_stride + kk));
            for (acc_v, &b_v) in acc_row.iter_mut().zip(b.iter()) {
                *acc_v = S::fma(a, b_v, *acc_v);
            }
        }
    }
    store_rows::<S, R, NV>(&acc, n_cols, s, s_stride, Some(scale));
}

/// All rows of one `qk` column tile: full `MR`-row tiles, then tiles of 8, 4, 2, 1 rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn qk_rows<S: Simd, const MR: usize, const NV: usize>(
    q: *const f32,
    q_stride: usize,
    k: *const f32,
    panel_stride: usize,
    d: usize,
    rows: usize,
    n_cols: usize,
    s: *mut f32,
    s_stride: usize,
    scale: f32,
) {
    let mut r = 0;
    macro_rules! tiles {
        ($R:expr) => {
            while rows - r >= $R {
                qk_tile::<S, { $R }, NV>(
                    q.add(r * q_stride),
                    q_stride,
                    k,
                    panel_stride,
                    d,
                    n_cols,
                    s.add(r * s_stride),
                    s_stride,
                    scale,
                );
                r += $R;
            }
        };
    }
    tiles!(MR);
    if MR > 8 {
        tiles!(8);
    }
    if MR > 4 {
        tiles!(4);
    }
    if MR > 2 {
        tiles!(2);
    }
    if MR > 1 {
        tiles!(1);
    }
}

/// `S = scale · Q · Kᵀ` over all row and column tiles.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn qk<S: Simd, const MR: usize, const NV: usize>(
    q: *const f32,
    q_stride: usize,
    k: *const f32,
    d: usize,
    rows: usize,
    cols: usize,
    s: *mut f32,
    s_stride: usize,
    scale: f32,
) {
    let lanes = S::LANES;
    let tile_cols = NV * lanes;
    debug_assert!(tile_cols.is_multiple_of(PANEL) && NV <= 4);
    let panel_stride = d * PANEL;
    let mut c0 = 0;
    while c0 < cols {
        let n_cols = (cols - c0).min(tile_cols);
        let kc = k.add((c0 / PANEL) * panel_stride);
        let sc = s.add(c0);
        let n_vec = n_cols.div_ceil(lanes);
        macro_rules! go {
            ($NV:expr) => {
                qk_rows::<S, MR, { $NV }>(
                    q,
                    q_stride,
                    kc,
                    panel_stride,
                    d,
                    rows,
                    n_cols,
                    sc,
                    s_stride,
                    scale,
                )
            };
        }
        if n_vec == NV {
            go!(NV);
        } else if n_vec == 1 {
            go!(1);
        } else if n_vec == 2 {
            go!(2);
        } else {
            go!(3);
        }
        c0 += tile_cols;
    }
}

/// Register tile of `pv`: `R` rows by `NV` vectors of the head dimension, reduced over
/// `n_keys` keys.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_tile<S: Simd, const R: usize, const NV: usize>(
    p: *const f32,
    p_stride: usize,
    v: *const f32,
    v_stride: usize,
    n_keys: usize,
    n_cols: usize,
    acc: *mut f32,
    acc_stride: usize,
) {
    let lanes = S::LANES;
    let mut c = load_rows::<S, R, NV>(acc, acc_stride, n_cols);
    for kk in 0..n_keys {
        let vrow = v.add(kk * v_stride);
        let b: [S::V; NV] = std::array::from_fn(|j| S::load(vrow.add(j * lanes)));
        for (i, c_row) in c.iter_mut().enumerate() {
            let a = S::splat(*p.add(i * p_stride + kk));
            for (c_v, &b_v) in c_row.iter_mut().zip(b.iter()) {
                *c_v = S::fma(a, b_v, *c_v);
            }
        }
    }
    store_rows::<S, R, NV>(&c, n_cols, acc, acc_stride, None);
}

/// All rows of one `pv` column block.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_rows<S: Simd, const MR: usize, const NV: usize>(
    p: *const f32,
    p_stride: usize,
    v: *const f32,
    v_stride: usize,
    rows: usize,
    n_keys: usize,
    n_cols: usize,
    acc: *mut f32,
    acc_stride: usize,
) {
    let mut r = 0;
    macro_rules! tiles {
        ($R:expr) => {
            while rows - r >= $R {
                pv_tile::<S, { $R }, NV>(
                    p.add(r * p_stride),
                    p_stride,
                    v,
                    v_stride,
                    n_keys,
                    n_cols,
                    acc.add(r * acc_stride),
                    acc_stride,
                );
                r += $R;
            }
        };
    }
    tiles!(MR);
    if MR > 8 {
        tiles!(8);
    }
    if MR > 4 {
        tiles!(4);
    }
    if MR > 2 {
        tiles!(2);
    }
    if MR > 1 {
        tiles!(1);
    }
}

/// `Acc += P · V` over all row tiles and column blocks.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn pv<S: Simd, const MR: usize, const NV: usize>(
    p: *const f32,
    p_stride: usize,
    v: *const f32,
    v_stride: usize,
    d: usize,
    rows: usize,
    cols: usize,
    acc: *mut f32,
    acc_stride: usize,
) {
    let lanes = S::LANES;
    let block = NV * lanes;
    debug_assert!(NV <= 4);
    let mut c0 = 0;
    while c0 < d {
        let n_cols = (d - c0).min(block);
        let n_vec = n_cols.div_ceil(lanes);
        macro_rules! go {
            ($NV:expr) => {
                pv_rows::<S, MR, { $NV }>(
                    p,
                    p_stride,
                    v.add(c0),
                    v_stride,
                    rows,
                    cols,
                    n_cols,
                    acc.add(c0),
                    acc_stride,
                )
            };
        }
        if n_vec == NV {
            go!(NV);
        } else if n_vec == 1 {
            go!(1);
        } else if n_vec == 2 {
            go!(2);
        } else {
            go!(3);
        }
        c0 += block;
    }
}

/// One online-softmax step over a score tile (see `SoftmaxUpdateFn`).
///
/// Rows go in groups of `LANES`, so the per-row bookkeeping is vector work across
/// rows: (1) each row's maximum as a vector over its columns, then the group's row
/// maxima, new running maxima and rescale factors `alpha = exp(m_old - m_new)` as one
/// vector each; (2) per row, `p = exp(s - m_new)` and its column sums; (3) the
/// group's row sums and `l = l · alpha + sum` as one vector, and the rescale of the
/// accumulator rows whose `alpha` is not 1.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn softmax_update<S: Simd>(
    s: *mut f32,
    s_stride: usize,
    rows: usize,
    cols: usize,
    m: *mut f32,
    l: *mut f32,
    acc: *mut f32,
    acc_stride: usize,
    d: usize,
    base2: bool,
) {
    let lanes = S::LANES;
    let full = cols - cols % lanes;
    let tail = S::first_lanes(cols - full);
    let has_tail = full < cols;
    let neg_inf = S::splat(f32::NEG_INFINITY);
    let zero = S::splat(0.0);
    let exp = |x: S::V| {
        if base2 {
            exp2_nonpositive::<S>(x)
        } else {
            exp_nonpositive::<S>(x)
        }
    };
    // Per-row vectors of the current group (maxima, then sums); rows past the
    // group's end stay at the reduction's identity.
    let mut red = [zero; MAX_LANES];
    let mut m_use = [0f32; MAX_LANES];
    let mut alpha = [0f32; MAX_LANES];
    let mut r0 = 0;
    while r0 < rows {
        let n = lanes.min(rows - r0);
        let group = S::first_lanes(n);
        for (r, red_r) in red.iter_mut().enumerate().take(lanes) {
            if r >= n {
                *red_r = neg_inf;
                continue;
            }
            let row = s.add((r0 + r) * s_stride);
            let mut mx = neg_inf;
            let mut c = 0;
            while c < full {
                mx = S::max(S::load(row.add(c)), mx);
                c += lanes;
            }
            if has_tail {
                mx = S::max(S::load_masked(row.add(full), tail, neg_inf), mx);
            }
            *red_r = mx;
        }
        let m_tile = S::reduce_rows_max(&red[..lanes]);
        let m_old = S::load_masked(m.add(r0), group, neg_inf);
        let m_new = S::max(m_tile, m_old);
        S::store_masked(m.add(r0), group, m_new);
        // A row with no visible score yet keeps m = -inf; subtracting the lowest
        // finite float instead keeps exp(-inf - m) = 0 rather than NaN.
        let m_sub = S::max(m_new, S::splat(f32::MIN));
        S::store(m_use.as_mut_ptr(), m_sub);
        let a = exp(S::sub(m_old, m_sub));
        S::store(alpha.as_mut_ptr(), a);
        for (r, red_r) in red.iter_mut().enumerate().take(lanes) {
            if r >= n {
                *red_r = zero;
                continue;
            }
            let row = s.add((r0 + r) * s_stride);
            let m_v = S::splat(m_use[r]);
            let mut sum = zero;
            let mut c = 0;
            while c < full {
                let p = exp(S::sub(S::load(row.add(c)), m_v));
                S::store(row.add(c), p);
                sum = S::add(sum, p);
                c += lanes;
            }
            if has_tail {
                let x = S::load_masked(row.add(full), tail, neg_inf);
                let p = exp(S::sub(x, m_v));
                S::store_masked(row.add(full), tail, p);
                sum = S::add(sum, p);
            }
            *red_r = sum;
        }
        let sums = S::reduce_rows_sum(&red[..lanes]);
        let l_old = S::load_masked(l.add(r0), group, zero);
        S::store_masked(l.add(r0), group, S::add(S::mul(l_old, a), sums));
        for (r, &a) in alpha.iter().enumerate().take(n) {
            if a != 1.0 {
                let a_row = acc.add((r0 + r) * acc_stride);
                let alpha_v = S::splat(a);
                let d_full = d - d % lanes;
                let mut c = 0;
                while c < d_full {
                    S::store(a_row.add(c), S::mul(S::load(a_row.add(c)), alpha_v));
                    c += lanes;
                }
                if d_full < d {
                    let mask = S::first_lanes(d - d_full);
                    let x = S::load_masked(a_row.add(d_full), mask, zero);
                    S::store_masked(a_row.add(d_full), mask, S::mul(x, alpha_v));
                }
            }
        }
        r0 += n;
    }
}

/// Independent FMA chains of the peak loop: more than the FMA latency times the FMA
/// units of any x86 core (4 cycles x 2 units), so the loop is throughput-bound.
pub(crate) const PEAK_CHAINS: usize = 12;

/// `iters` rounds of [`PEAK_CHAINS`] independent FMAs on registers (see `FmaPeakFn`).
#[inline(always)]
unsafe fn fma_peak<S: Simd>(iters: usize, out: *mut f32) {
    let (a, c) = (S::splat(0.999_9), S::splat(1e-4));
    let mut x = [S::splat(0.5); PEAK_CHAINS];
    for _ in 0..iters {
        for v in x.iter_mut() {
            *v = S::fma(*v, a, c);
        }
    }
    let sum = x[1..].iter().fold(x[0], |s, &v| S::add(s, v));
    *out = S::reduce_sum(sum);
}

/// Packs one full panel of K (see `PackedK`): `panel[c·16 + j] = rows[j][c]` for the
/// 16 key rows and `c < d`, by 8 x 8 transposes of 8 keys x 8 dimensions (the
/// dimensions past the last multiple of 8 one by one).
///
/// # Safety
///
/// Needs AVX; every row holds at least `d` floats and `panel` at least `16·d`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
pub(crate) unsafe fn pack_k_panel_avx(rows: &[&[f32]; PANEL], d: usize, panel: &mut [f32]) {
    use std::arch::x86_64::*;
    debug_assert!(rows.iter().all(|r| r.len() >= d) && panel.len() >= PANEL * d);
    let d8 = d - d % 8;
    for half in [0, 8] {
        let r = &rows[half..half + 8];
        let mut c0 = 0;
        while c0 < d8 {
            let v: [__m256; 8] = std::array::from_fn(|j| _mm256_loadu_ps(r[j].as_ptr().add(c0)));
            // Pairs, then quads: u[k] holds dimension k of keys 0-3 in its low half
            // and dimension k + 4 in its high half (keys 4-7 in u[k + 4]).
            let t: [__m256; 8] = std::array::from_fn(|i| {
                let (a, b) = (v[i / 2 * 2], v[i / 2 * 2 + 1]);
                if i % 2 == 0 {
                    _mm256_unpacklo_ps(a, b)
                } else {
                    _mm256_unpackhi_ps(a, b)
                }
            });
            let u: [__m256; 8] = std::array::from_fn(|i| {
                let (g, k) = (i / 4 * 4, i % 4);
                let (a, b) = (t[g + k / 2], t[g + 2 + k / 2]);
                if k % 2 == 0 {
                    _mm256_shuffle_ps::<0x44>(a, b)
                } else {
                    _mm256_shuffle_ps::<0xEE>(a, b)
                }
            });
            for k in 0..4 {
                let lo = _mm256_permute2f128_ps::<0x20>(u[k], u[k + 4]);
                let hi = _mm256_permute2f128_ps::<0x31>(u[k], u[k + 4]);
                _mm256_storeu_ps(panel.as_mut_ptr().add((c0 + k) * PANEL + half), lo);
                _mm256_storeu_ps(panel.as_mut_ptr().add((c0 + k + 4) * PANEL + half), hi);
            }
            c0 += 8;
        }
    }
    for (j, row) in rows.iter().enumerate() {
        for c in d8..d {
            panel[c * PANEL + j] = row[c];
        }
    }
}

/// Instantiates the `extern "C"` entry points for one instruction set.
macro_rules! entry_points {
    (
        $(#[$attr:meta])*
        $simd:ty, qk = ($qk:ident, $qmr:expr, $qnv:expr), pv = ($pv:ident, $pmr:expr, $pnv:expr),
        softmax = $sm:ident, peak = $peak:ident
    ) => {
        $(#[$attr])*
        pub(crate) unsafe extern "C" fn $peak(iters: usize, out: *mut f32) {
            fma_peak::<$simd>(iters, out)
        }

        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        pub(crate) unsafe extern "C" fn $qk(
            q: *const f32,
            q_stride: usize,
            k: *const f32,
            d: usize,
            rows: usize,
            cols: usize,
            s: *mut f32,
            s_stride: usize,
            scale: f32,
        ) {
            qk::<$simd, { $qmr }, { $qnv }>(q, q_stride, k, d, rows, cols, s, s_stride, scale)
        }

        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        pub(crate) unsafe extern "C" fn $pv(
            p: *const f32,
            p_stride: usize,
            v: *const f32,
            v_stride: usize,
            d: usize,
            rows: usize,
            cols: usize,
            acc: *mut f32,
            acc_stride: usize,
        ) {
            pv::<$simd, { $pmr }, { $pnv }>(p, p_stride, v, v_stride, d, rows, cols, acc, acc_stride)
        }

        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        pub(crate) unsafe extern "C" fn $sm(
            s: *mut f32,
            s_stride: usize,
            rows: usize,
            cols: usize,
            m: *mut f32,
            l: *mut f32,
            acc: *mut f32,
            acc_stride: usize,
            d: usize,
            base2: u32,
        ) {
            softmax_update::<$simd>(s, s_stride, rows, cols, m, l, acc, acc_stride, d, base2 != 0)
        }
    };
}

entry_points!(
    super::simd::Portable,
    qk = (qk_portable, 2, 4),
    pv = (pv_portable, 4, 2),
    softmax = softmax_update_portable,
    peak = fma_peak_portable
);

#[cfg(target_arch = "x86_64")]
entry_points!(
    #[target_feature(enable = "avx2,fma,f16c")]
    super::simd::Avx2,
    qk = (qk_avx2, 6, 2),
    pv = (pv_avx2, 6, 2),
    softmax = softmax_update_avx2,
    peak = fma_peak_avx2
);

#[cfg(target_arch = "x86_64")]
entry_points!(
    #[target_feature(enable = "avx512f")]
    super::simd::Avx512,
    qk = (qk_avx512, 6, 4),
    pv = (pv_avx512, 6, 4),
    softmax = softmax_update_avx512,
    peak = fma_peak_avx512
);

/// Applies the softmax exponential (`exp` or `2^x`, for `x <= 0`) in place, whole
/// vectors only (tests).
#[cfg(test)]
#[inline(always)]
unsafe fn exp_in_place<S: Simd>(xs: &mut [f32], base2: bool) {
    for chunk in xs.chunks_exact_mut(S::LANES) {
        let x = S::load(chunk.as_ptr());
        let y = if base2 {
            exp2_nonpositive::<S>(x)
        } else {
            exp_nonpositive::<S>(x)
        };
        S::store(chunk.as_mut_ptr(), y);
    }
}

#[cfg(test)]
pub(crate) fn exp_in_place_portable(xs: &mut [f32], base2: bool) {
    // SAFETY: the portable primitives need no CPU feature; chunks are whole vectors.
    unsafe { exp_in_place::<super::simd::Portable>(xs, base2) }
}

#[cfg(all(test, target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn exp_in_place_avx2(xs: &mut [f32], base2: bool) {
    exp_in_place::<super::simd::Avx2>(xs, base2)
}

#[cfg(all(test, target_arch = "x86_64"))]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn exp_in_place_avx512(xs: &mut [f32], base2: bool) {
    exp_in_place::<super::simd::Avx512>(xs, base2)
}
