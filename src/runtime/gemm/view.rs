//! The tile products of in-place K/V ([`crate::tile::nest::KvSource::InPlace`]):
//! `S = scale · Q Kᵀ` and `Acc += P V` over key rows read where the caller keeps
//! them, through a [`KvView`] (dense rows of one sequence and KV head, or the
//! pages of a pool through the sequence's page table). Nothing is packed or
//! copied: each key row is read once per tile, by every query row of the tile
//! (the GQA group of a decode step) while it is in cache.
//!
//! Keys are walked page segment by page segment (a run of keys in one page is
//! contiguous at the view's row stride); a tile may span pages of any size.
//! `pv` skips keys of probability 0, so a NaN or infinite V row at a masked key
//! never reaches a row (no scan of V is needed).

use super::simd::Simd;
use crate::runtime::abi::KvView;

/// `qk_view(q, q_stride, view, key0, d, rows, cols, s, s_stride, scale)`:
/// `S[r][c] = scale · Σ_t Q[r][t] · K[key0 + c][t]` for `r < rows`, `c < cols`.
///
/// # Safety
///
/// `q` must be valid for `rows` rows of `d` floats at `q_stride`; `view` must
/// describe key rows `key0 .. key0 + cols` of at least `d` floats (see
/// [`KvView`]); `s` must be valid for writing `rows` rows of `cols` at `s_stride`.
pub type QkViewFn = unsafe extern "C" fn(
    q: *const f32,
    q_stride: usize,
    view: *const KvView,
    key0: usize,
    d: usize,
    rows: usize,
    cols: usize,
    s: *mut f32,
    s_stride: usize,
    scale: f32,
);

/// `pv_view(p, p_stride, view, key0, d, rows, cols, acc, acc_stride)`:
/// `Acc[r][t] += Σ_c P[r][c] · V[key0 + c][t]` over the keys with `P[r][c] != 0`.
///
/// # Safety
///
/// As for [`QkViewFn`], with `p` valid for `rows` rows of `cols` at `p_stride`
/// and `acc` for reading and writing `rows` rows of `d` at `acc_stride`.
pub type PvViewFn = unsafe extern "C" fn(
    p: *const f32,
    p_stride: usize,
    view: *const KvView,
    key0: usize,
    d: usize,
    rows: usize,
    cols: usize,
    acc: *mut f32,
    acc_stride: usize,
);

/// Calls `f(c, rows, n)` for each run of keys `key0 + c .. key0 + c + n` (with
/// `c < cols`) that lies in one page, with `rows` the K (or V) row of its first
/// key; consecutive keys of a run are `view.row_stride` floats apart.
#[inline(always)]
unsafe fn segments(
    view: &KvView,
    base: *const f32,
    key0: usize,
    cols: usize,
    mut f: impl FnMut(usize, *const f32, usize),
) {
    let ps = view.page_size as usize;
    let mut c = 0;
    while c < cols {
        let key = key0 + c;
        let slot = key % ps;
        let page = *view.table.add(key / ps) as usize;
        let n = (cols - c).min(ps - slot);
        let row = base.add(page * view.page_stride as usize + slot * view.row_stride as usize);
        f(c, row, n);
        c += n;
    }
}

/// Query rows handled together in `qk`: each K vector is loaded once for them.
const QK_ROWS: usize = 4;

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn qk<S: Simd>(
    q: *const f32,
    q_stride: usize,
    view: &KvView,
    key0: usize,
    d: usize,
    rows: usize,
    cols: usize,
    s: *mut f32,
    s_stride: usize,
    scale: f32,
) {
    let full = d - d % S::LANES;
    let tail = S::first_lanes(d - full);
    let zero = S::splat(0.0);
    let rs = view.row_stride as usize;
    segments(view, view.k, key0, cols, |c0, krows, n| {
        for j in 0..n {
            let krow = krows.add(j * rs);
            let mut r0 = 0;
            while r0 < rows {
                let nr = (rows - r0).min(QK_ROWS);
                let mut acc = [zero; QK_ROWS];
                let mut t = 0;
                while t < full {
                    let kv = S::load(krow.add(t));
                    for (i, a) in acc.iter_mut().enumerate().take(nr) {
                        *a = S::fma(S::load(q.add((r0 + i) * q_stride + t)), kv, *a);
                    }
                    t += S::LANES;
                }
                if full < d {
                    let kv = S::load_masked(krow.add(full), tail, zero);
                    for (i, a) in acc.iter_mut().enumerate().take(nr) {
                        let qv = S::load_masked(q.add((r0 + i) * q_stride + full), tail, zero);
                        *a = S::fma(qv, kv, *a);
                    }
                }
                for (i, a) in acc.iter().enumerate().take(nr) {
                    *s.add((r0 + i) * s_stride + c0 + j) = S::reduce_sum(*a) * scale;
                }
                r0 += nr;
            }
        }
    });
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv<S: Simd>(
    p: *const f32,
    p_stride: usize,
    view: &KvView,
    key0: usize,
    d: usize,
    rows: usize,
    cols: usize,
    acc: *mut f32,
    acc_stride: usize,
) {
    let rs = view.row_stride as usize;
    segments(view, view.v, key0, cols, |c0, vrows, n| {
        for r in 0..rows {
            let prow = p.add(r * p_stride + c0);
            let arow = acc.add(r * acc_stride);
            let mut t = 0;
            while t < d {
                let lanes = (d - t).min(S::LANES);
                let m = S::first_lanes(lanes);
                let mut a = if lanes == S::LANES {
                    S::load(arow.add(t))
                } else {
                    S::load_masked(arow.add(t), m, S::splat(0.0))
                };
                for j in 0..n {
                    let pj = *prow.add(j);
                    if pj == 0.0 {
                        continue; // masked or underflowed: its V row may be stale
                    }
                    let v = if lanes == S::LANES {
                        S::load(vrows.add(j * rs + t))
                    } else {
                        S::load_masked(vrows.add(j * rs + t), m, S::splat(0.0))
                    };
                    a = S::fma(S::splat(pj), v, a);
                }
                if lanes == S::LANES {
                    S::store(arow.add(t), a);
                } else {
                    S::store_masked(arow.add(t), m, a);
                }
                t += S::LANES;
            }
        }
    });
}

macro_rules! view_entry_points {
    ($(#[$attr:meta])* $simd:ty, $qk:ident, $pv:ident) => {
        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        pub(crate) unsafe extern "C" fn $qk(
            q: *const f32,
            q_stride: usize,
            view: *const KvView,
            key0: usize,
            d: usize,
            rows: usize,
            cols: usize,
            s: *mut f32,
            s_stride: usize,
            scale: f32,
        ) {
            qk::<$simd>(q, q_stride, &*view, key0, d, rows, cols, s, s_stride, scale)
        }

        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        pub(crate) unsafe extern "C" fn $pv(
            p: *const f32,
            p_stride: usize,
            view: *const KvView,
            key0: usize,
            d: usize,
            rows: usize,
            cols: usize,
            acc: *mut f32,
            acc_stride: usize,
        ) {
            pv::<$simd>(p, p_stride, &*view, key0, d, rows, cols, acc, acc_stride)
        }
    };
}

view_entry_points!(super::simd::Portable, qk_view_portable, pv_view_portable);

#[cfg(target_arch = "x86_64")]
view_entry_points!(
    #[target_feature(enable = "avx2,fma")]
    super::simd::Avx2,
    qk_view_avx2,
    pv_view_avx2
);

#[cfg(target_arch = "x86_64")]
view_entry_points!(
    #[target_feature(enable = "avx512f")]
    super::simd::Avx512,
    qk_view_avx512,
    pv_view_avx512
);

/// The in-place tile products for `isa` (which the caller has checked this CPU
/// supports).
pub fn view_kernels(isa: super::NativeIsa) -> (QkViewFn, PvViewFn) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        super::NativeIsa::Avx512 => (qk_view_avx512, pv_view_avx512),
        #[cfg(target_arch = "x86_64")]
        super::NativeIsa::Avx2 => (qk_view_avx2, pv_view_avx2),
        _ => (qk_view_portable, pv_view_portable),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::gemm::NativeIsa;

    /// A pool of `pages` pages of `ps` slots x `d` floats (one KV head),
    /// page table `table`; keys `0 .. n` of the sequence, NaN everywhere else.
    fn pool(ps: usize, d: usize, table: &[i32], n: usize) -> (Vec<f32>, Vec<f32>, Vec<Vec<f32>>) {
        let pages = table.iter().copied().max().unwrap() as usize + 2;
        let mut k = vec![f32::NAN; pages * ps * d];
        let mut v = vec![f32::NAN; pages * ps * d];
        let mut rows = Vec::new();
        for j in 0..n {
            let at = (table[j / ps] as usize * ps + j % ps) * d;
            let row: Vec<f32> = (0..d)
                .map(|t| ((j * 7 + t * 3) % 11) as f32 - 5.0)
                .collect();
            k[at..at + d].copy_from_slice(&row);
            for (x, y) in v[at..at + d].iter_mut().zip(&row) {
                *x = y * 0.5;
            }
            rows.push(row);
        }
        (k, v, rows)
    }

    #[test]
    fn in_place_products_follow_the_page_table_and_skip_zero_probabilities() {
        for isa in NativeIsa::ALL.into_iter().filter(|i| i.is_supported()) {
            let (qk_fn, pv_fn) = view_kernels(isa);
            for (ps, d, key0, cols) in
                [(1, 5, 0, 3), (7, 19, 3, 20), (16, 32, 16, 16), (4, 3, 2, 9)]
            {
                let table = [
                    5i32, 2, 0, 7, 1, 3, 4, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,
                    21, 22, 23,
                ];
                let n = key0 + cols;
                let (k, v, keys) = pool(ps, d, &table, n);
                let view = KvView {
                    k: k.as_ptr(),
                    v: v.as_ptr(),
                    row_stride: d as i64,
                    page_stride: (ps * d) as i64,
                    page_size: ps as i64,
                    table: table.as_ptr(),
                };
                let rows = 6;
                let q: Vec<f32> = (0..rows * d).map(|i| (i % 5) as f32 - 2.0).collect();
                let mut s = vec![0f32; rows * cols];
                unsafe {
                    qk_fn(
                        q.as_ptr(),
                        d,
                        &view,
                        key0,
                        d,
                        rows,
                        cols,
                        s.as_mut_ptr(),
                        cols,
                        0.5,
                    )
                };
                for r in 0..rows {
                    for c in 0..cols {
                        let want: f32 = (0..d)
                            .map(|t| q[r * d + t] * keys[key0 + c][t])
                            .sum::<f32>()
                            * 0.5;
                        assert_eq!(s[r * cols + c], want, "{isa} ps={ps} d={d} r={r} c={c}");
                    }
                }
                // Probabilities with zeros; the accumulator starts at 1.
                let p: Vec<f32> = (0..rows * cols)
                    .map(|i| if i % 3 == 0 { 0.0 } else { 0.25 })
                    .collect();
                let mut acc = vec![1f32; rows * d];
                unsafe {
                    pv_fn(
                        p.as_ptr(),
                        cols,
                        &view,
                        key0,
                        d,
                        rows,
                        cols,
                        acc.as_mut_ptr(),
                        d,
                    )
                };
                for r in 0..rows {
                    for t in 0..d {
                        let want = (0..cols).fold(1f32, |a, c| {
                            let pc = p[r * cols + c];
                            if pc == 0.0 {
                                a
                            } else {
                                a + pc * keys[key0 + c][t] * 0.5
                            }
                        });
                        assert_eq!(acc[r * d + t], want, "{isa} ps={ps} d={d} r={r} t={t}");
                    }
                }
            }
        }
    }
}
