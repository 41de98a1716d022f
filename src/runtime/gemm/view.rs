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
//!
//! Rows are stored as f32, bf16, f16, int8 or fp8 (e4m3fn) ([`KvView::elem`]);
//! the products widen each vector to f32 as they load it (and apply a
//! quantized row's scale to its dot products and probabilities), so no f32
//! copy of the cache is made. The arithmetic is f32 in every case.

use std::mem::MaybeUninit;

use half::{bf16, f16};

use super::simd::{widen, Simd};
use crate::runtime::abi::KvView;
use crate::tensor::ElemType;

/// A stored element type of K/V rows, widened to f32 as it is loaded.
trait Elem: Copy {
    /// Whether a row carries a float32 scale.
    const QUANTIZED: bool;
    /// `LANES` elements at `p`, as f32, times [`Elem::unit`].
    unsafe fn load<S: Simd>(p: *const Self) -> S::V;
    fn to_f32(self) -> f32;
    /// What [`Elem::load`] gives for an element of value 1 on `S`: a power of
    /// two, 2^-8 for e4m3fn on AVX-512 and AVX2, which widen it through f16.
    /// `qk` applies its inverse to the dot products; `pv` folds it into the
    /// probabilities' scales (a probability is at most 1).
    #[inline(always)]
    fn unit<S: Simd>() -> f32 {
        1.0
    }
    /// The first `n` elements at `p` as [`Elem::load`] gives them (other lanes
    /// 0; no memory past them is read).
    #[inline(always)]
    unsafe fn load_first<S: Simd>(p: *const Self, n: usize) -> S::V {
        let v = widen::<S, Self>(p, n, Self::to_f32);
        if Self::unit::<S>() == 1.0 {
            v
        } else {
            S::mul(v, S::splat(Self::unit::<S>()))
        }
    }
}

impl Elem for f32 {
    const QUANTIZED: bool = false;
    #[inline(always)]
    unsafe fn load<S: Simd>(p: *const f32) -> S::V {
        S::load(p)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    unsafe fn load_first<S: Simd>(p: *const f32, n: usize) -> S::V {
        S::load_masked(p, S::first_lanes(n), S::splat(0.0))
    }
}

/// e4m3fn bits.
#[derive(Clone, Copy)]
#[repr(transparent)]
struct E4m3(u8);

/// `impl Elem` for a stored type: whether it is quantized, its widening
/// load (a `Simd` method taking the raw element pointer) and its scalar value.
macro_rules! elem {
    ($($t:ty: $quantized:literal, $load:ident, |$x:ident| $value:expr $(, unit $unit:ident)?;)*) => {
        $(impl Elem for $t {
            const QUANTIZED: bool = $quantized;
            #[inline(always)]
            unsafe fn load<S: Simd>(p: *const $t) -> S::V {
                S::$load(p.cast())
            }
            #[inline(always)]
            fn to_f32(self) -> f32 {
                let $x = self;
                $value
            }
            $(#[inline(always)]
            fn unit<S: Simd>() -> f32 {
                S::$unit
            })?
        })*
    };
}

elem! {
    bf16: false, load_bf16, |x| x.to_f32();
    f16: false, load_f16, |x| x.to_f32();
    i8: true, load_i8, |x| x as f32;
    E4m3: true, load_e4m3, |x| crate::tensor::e4m3_to_f32(x.0), unit E4M3_UNIT;
}

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

/// The runs of keys `key0 + c .. key0 + c + n` (with `c < cols`) that lie in
/// one page, each with the K (or V) row of its first key at `base` and its
/// scale at `scales` (quantized rows); consecutive keys of a run are
/// `view.row_stride` elements (`view.scale_row_stride` scales) apart.
///
/// An iterator rather than a callback: a closure would not inherit the target
/// features of the kernel entry point, and its vector intrinsics would not be
/// inlined.
struct Segments<'a, E> {
    view: &'a KvView,
    base: *const E,
    scales: *const f32,
    key0: usize,
    cols: usize,
    c: usize,
    /// Elements of a row to prefetch: the head dim of each KV head the
    /// view's tile reads.
    span: usize,
}

/// One run of keys in a page: its first column, its first row and scale, its
/// length, and where the products ask for rows ahead.
struct Segment<E> {
    c: usize,
    rows: *const E,
    scales: *const f32,
    n: usize,
    /// Null, or the row [`PF_KEYS`] keys after the run's first key, so that
    /// the products ask for key `j`'s row ahead at `ahead + j * row_stride`
    /// as they read key `j` (interleaved with the reads, where a burst a
    /// segment at a time stalls on full miss queues).
    ahead: *const E,
}

impl<'a, E: Elem> Segments<'a, E> {
    #[inline(always)]
    fn new(
        view: &'a KvView,
        base: *const u8,
        scales: *const f32,
        key0: usize,
        cols: usize,
        d: usize,
        rows: usize,
    ) -> Segments<'a, E> {
        Segments {
            view,
            base: base.cast(),
            scales,
            key0,
            cols,
            c: 0,
            span: row_span(view, d, rows),
        }
    }

    /// The next run.
    ///
    /// # Safety
    ///
    /// The view's table must list a page for every key of the run.
    #[inline(always)]
    unsafe fn next(&mut self) -> Option<Segment<E>> {
        if self.c >= self.cols {
            return None;
        }
        let v = self.view;
        let ps = v.page_size as usize;
        let key = self.key0 + self.c;
        let slot = key % ps;
        let page = *v.table.add(key / ps) as usize;
        let n = (self.cols - self.c).min(ps - slot);
        let row = self
            .base
            .add(page * v.page_stride as usize + slot * v.row_stride as usize);
        let scales = self
            .scales
            .wrapping_add(page * v.scale_page_stride as usize + slot * v.scale_row_stride as usize);
        // Bring the rows `PF_KEYS` keys ahead into L2, found through the
        // table: in a pool of small pages they are in other pages. Key by key
        // as the products read (`Segment::ahead`) when the keys ahead of a
        // segment share one page (pages that divide `PF_KEYS`: same slot, one
        // table entry); else a segment at a time, here.
        let ahead = key + PF_KEYS;
        let short_runs = self.span * size_of::<E>() < PF_RUN_BELOW_BYTES;
        let mut ahead_row = std::ptr::null();
        if short_runs && ps >= PAGE_PF_BELOW {
            ahead_row = row.wrapping_add(PF_KEYS * v.row_stride as usize);
        } else if short_runs && PF_KEYS.is_multiple_of(ps) {
            if ahead < v.len as usize {
                let page = *v.table.add(ahead / ps) as usize;
                ahead_row = self
                    .base
                    .add(page * v.page_stride as usize + slot * v.row_stride as usize);
            }
        } else if short_runs && ahead < v.len as usize {
            let page = *v.table.add(ahead / ps) as usize;
            let slot = ahead % ps;
            let rows = n.min(ps - slot).min(v.len as usize - ahead);
            let first = self
                .base
                .add(page * v.page_stride as usize + slot * v.row_stride as usize);
            for r in 0..rows {
                prefetch(first.add(r * v.row_stride as usize), self.span);
            }
        }
        // The scales of quantized rows `PF_KEYS` keys on, a few lines a
        // segment: unasked, the first scale of each block of keys waited on
        // memory (8% of an int8 paged decode's `qk` samples, on one load).
        if E::QUANTIZED && ahead < v.len as usize {
            let page = *v.table.add(ahead / ps) as usize;
            let slot = ahead % ps;
            let srs = v.scale_row_stride as usize;
            let first = self
                .scales
                .wrapping_add(page * v.scale_page_stride as usize + slot * srs);
            prefetch(first, n.min(ps - slot) * srs);
        }
        let c = self.c;
        self.c += n;
        Some(Segment {
            c,
            rows: row,
            scales,
            n,
            ahead: ahead_row,
        })
    }
}

/// Tile rows per KV head of a view (see [`KvView`]).
#[inline(always)]
fn head_rows(view: &KvView) -> usize {
    view.head_rows.max(1) as usize
}

/// Floats of a key row that a tile of `rows` rows reads: the head dim `d` of
/// each KV head it spans, from the first head's.
#[inline(always)]
fn row_span(view: &KvView, d: usize, rows: usize) -> usize {
    let heads = rows.div_ceil(head_rows(view)).max(1);
    (heads - 1) * view.head_stride as usize + d
}

/// Rows `r0 ..` of a tile that read one KV head, at most `max` of them, and
/// the offsets of that head's rows (in elements) and scales in the view.
#[inline(always)]
fn head_block(view: &KvView, r0: usize, rows: usize, max: usize) -> (usize, usize, usize) {
    let hr = head_rows(view);
    let n = (rows - r0).min(max).min(hr - r0 % hr);
    let head = r0 / hr;
    (
        n,
        head * view.head_stride as usize,
        head * view.scale_head_stride as usize,
    )
}

/// Asks for the `n` elements at `p` to be brought into L2 (a hint; never
/// faults). The products stream K and V once; without it a core reads them at
/// about half the rate the memory delivers (measured on the decode benchmark:
/// 27 ms without, 17-18 ms with a distance of 128 keys into L2; into L1, or
/// nearer, gained nothing).
#[inline(always)]
fn prefetch<E>(p: *const E, n: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let (p, bytes) = (p.cast::<u8>(), n * size_of::<E>());
        let mut off = 0;
        while off < bytes {
            // SAFETY: a prefetch is a hint that never faults, whatever the address.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                    p.wrapping_add(off).cast(),
                )
            };
            off += 64; // one line
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, n);
}

/// How many keys ahead the products ask for K and V rows (within a page
/// segment's stride; past it the hint is wasted, never wrong).
const PF_KEYS: usize = 128;

/// In pages at least this long (and dense rows) the products ask for the row
/// `PF_KEYS` keys ahead within the page. Shorter pages that divide `PF_KEYS`
/// find that row through the table, once per segment (the same slot of the
/// page `PF_KEYS` keys on), and are asked for key by key as well: on the
/// decode benchmarks of docs/performance.md, against a burst of hints for
/// the whole segment ahead, pages of 16 took an int8 GQA decode from 17.8-21.9
/// to 11.2-11.7 ms, a bf16 one from 17.0 to 11.2 ms and an f32 MQA decode from
/// 8.8-9.7 to 6.5-8.0 ms. Other short pages still take the burst.
const PAGE_PF_BELOW: usize = 4 * PF_KEYS;

/// Rows of K and V whose contiguous run (every KV head a tile reads, in
/// bytes) is at least this long are left to the hardware prefetchers, which
/// stream a long run better than hints do: a tile of all heads of a paged
/// pool (rows of `HKV x D` floats) took a median 36-39 ms with hints 128 keys
/// ahead and 28-31 ms without, on the paged GQA decode benchmark of
/// docs/performance.md (8 KV heads of 128 floats: runs of 4 KiB). Shorter
/// runs take hints: at D = 64 (runs of 2 KiB) the same call took 16.9 ms
/// without and 14.8 ms with them; an int8 pool at D = 128 (1 KiB) 17-19 ms
/// without.
const PF_RUN_BELOW_BYTES: usize = 4096;

/// Query rows handled together in `qk`.
const QK_ROWS: usize = 4;

/// Keys handled together in `qk` on `S` (a divisor of every `Simd::LANES`):
/// with `QK_ROWS` rows, 16 independent accumulation chains hide the FMA
/// latency where there are 32 vector registers; with 16 registers, 8 chains:
/// 16 spilled accumulators to the stack on every step (`cargo bench --bench
/// gemm -- --view` on a Zen 3 AVX2 host, medians of 8 alternating runs, one
/// thread: 128 keys in cache, f32 28.1 -> 45.1 GFLOP/s and int8 38.3 -> 54.5;
/// 65536 keys from memory, int8 37.5 -> 47.5).
const fn qk_keys<S: Simd>() -> usize {
    if S::REGS >= 32 {
        4
    } else {
        2
    }
}

/// Per-lane partial dot products of rows `..NR` of Q (at `q`, stride
/// `q_stride`) with keys `..NK` (at `k`, stride `rs`) over the head dim
/// `d`, into `part[row][jj + key]`; the keys' rows are read in order.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn qk_part<S: Simd, E: Elem, const NR: usize, const NK: usize>(
    q: *const f32,
    q_stride: usize,
    k: *const E,
    rs: usize,
    d: usize,
    part: &mut [[MaybeUninit<S::V>; super::simd::MAX_LANES]; QK_ROWS],
    jj: usize,
    ahead: *const E,
) {
    let zero = S::splat(0.0);
    let full = d - d % S::LANES;
    if !ahead.is_null() {
        for c in 0..NK {
            prefetch(ahead.wrapping_add(c * rs), d);
        }
    }
    let mut acc = [[zero; NK]; NR];
    let mut t = 0;
    while t < full {
        // A loop, not `array::from_fn`: a closure would not inherit the
        // entry point's target features, and a widening load (a dozen
        // intrinsics for fp8) would stay a call.
        let mut kv = [zero; NK];
        for (c, x) in kv.iter_mut().enumerate() {
            *x = E::load::<S>(k.add(c * rs + t));
        }
        for (i, row) in acc.iter_mut().enumerate() {
            let qv = S::load(q.add(i * q_stride + t));
            for (a, &kc) in row.iter_mut().zip(&kv) {
                *a = S::fma(qv, kc, *a);
            }
        }
        t += S::LANES;
    }
    if full < d {
        let m = S::first_lanes(d - full);
        let mut kv = [zero; NK];
        for (c, x) in kv.iter_mut().enumerate() {
            *x = E::load_first::<S>(k.add(c * rs + full), d - full);
        }
        for (i, row) in acc.iter_mut().enumerate() {
            let qv = S::load_masked(q.add(i * q_stride + full), m, zero);
            for (a, &kc) in row.iter_mut().zip(&kv) {
                *a = S::fma(qv, kc, *a);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (c, a) in row.iter().enumerate() {
            part[i][jj + c] = MaybeUninit::new(*a);
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn qk<S: Simd, E: Elem>(
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
    let zero = S::splat(0.0);
    let scale_v = S::splat(scale);
    // What a loaded element of value 1 is, inverted (a power of two: exact),
    // applied to the dot products before a quantized row's scale (times the
    // softmax scale): folded into that scale, it would overflow f32 for a
    // scale within 256 of its largest where the reference's score is finite.
    let inv_unit = 1.0 / E::unit::<S>();
    let inv_unit_v = S::splat(inv_unit);
    let tail = S::first_lanes(d - full);
    let (rs, srs) = (view.row_stride as usize, view.scale_row_stride as usize);
    let mut segs = Segments::<E>::new(view, view.k, view.k_scales, key0, cols, d, rows);
    while let Some(Segment {
        c: c0,
        rows: krows,
        scales,
        n,
        ahead,
    }) = segs.next()
    {
        // Blocks of LANES keys, walked key after key (each K row read in
        // order, as the hardware prefetchers expect): for a few query rows at
        // once, one accumulator per (row, key) over the head dim, then one
        // transposing reduction per row gives the block's LANES scores.
        let mut j = 0;
        while j + S::LANES <= n {
            let mut r0 = 0;
            while r0 < rows {
                let (nr, head, shead) = head_block(view, r0, rows, QK_ROWS);
                let kb = krows.add(head + j * rs);
                // The block's keys' scales (quantized rows).
                let key_scales = if E::QUANTIZED {
                    let mut sc = [0f32; super::simd::MAX_LANES];
                    for (c, x) in sc.iter_mut().enumerate().take(S::LANES) {
                        *x = *scales.add(shead + (j + c) * srs);
                    }
                    S::mul(S::load(sc.as_ptr()), scale_v)
                } else {
                    scale_v
                };
                // The first rows of a KV head ask for its keys ahead; the
                // others read the same keys.
                let pf_here = !ahead.is_null() && r0 % head_rows(view) == 0;
                // Written before read, rows `..nr` and lanes `..LANES`
                // (zeroing 4 KiB per block would cost more than the block).
                let mut part = [[MaybeUninit::<S::V>::uninit(); super::simd::MAX_LANES]; QK_ROWS];
                let qr = q.add(r0 * q_stride);
                let mut jj = 0;
                while jj < S::LANES {
                    let kr = kb.add(jj * rs);
                    let pf_here = if pf_here {
                        ahead.wrapping_add(head + (j + jj) * rs)
                    } else {
                        std::ptr::null()
                    };
                    macro_rules! part {
                        ($nk:literal) => {
                            match nr {
                                4 => qk_part::<S, E, 4, $nk>(
                                    qr, q_stride, kr, rs, d, &mut part, jj, pf_here,
                                ),
                                3 => qk_part::<S, E, 3, $nk>(
                                    qr, q_stride, kr, rs, d, &mut part, jj, pf_here,
                                ),
                                2 => qk_part::<S, E, 2, $nk>(
                                    qr, q_stride, kr, rs, d, &mut part, jj, pf_here,
                                ),
                                _ => qk_part::<S, E, 1, $nk>(
                                    qr, q_stride, kr, rs, d, &mut part, jj, pf_here,
                                ),
                            }
                        };
                    }
                    // `qk_keys` is a constant of `S`: one arm is compiled.
                    match qk_keys::<S>() {
                        4 => part!(4),
                        _ => part!(2),
                    }
                    jj += qk_keys::<S>();
                }
                for (i, p) in part.iter().enumerate().take(nr) {
                    // SAFETY: lanes `..LANES` of rows `..nr` were written above.
                    let p = std::slice::from_raw_parts(p.as_ptr().cast::<S::V>(), S::LANES);
                    let mut sums = S::reduce_rows_sum(p);
                    if inv_unit != 1.0 {
                        sums = S::mul(sums, inv_unit_v);
                    }
                    S::store(
                        s.add((r0 + i) * s_stride + c0 + j),
                        S::mul(sums, key_scales),
                    );
                }
                r0 += nr;
            }
            j += S::LANES;
        }
        // The keys left: one at a time, each K vector shared by a few rows.
        for j in j..n {
            let mut r0 = 0;
            while r0 < rows {
                let (nr, head, shead) = head_block(view, r0, rows, QK_ROWS);
                let krow = krows.add(head + j * rs);
                let key_scale = if E::QUANTIZED {
                    scale * *scales.add(shead + j * srs)
                } else {
                    scale
                };
                let mut acc = [zero; QK_ROWS];
                let mut t = 0;
                while t < full {
                    let kv = E::load::<S>(krow.add(t));
                    for (i, a) in acc.iter_mut().enumerate().take(nr) {
                        *a = S::fma(S::load(q.add((r0 + i) * q_stride + t)), kv, *a);
                    }
                    t += S::LANES;
                }
                if full < d {
                    let kv = E::load_first::<S>(krow.add(full), d - full);
                    for (i, a) in acc.iter_mut().enumerate().take(nr) {
                        let qv = S::load_masked(q.add((r0 + i) * q_stride + full), tail, zero);
                        *a = S::fma(qv, kv, *a);
                    }
                }
                for (i, a) in acc.iter().enumerate().take(nr) {
                    *s.add((r0 + i) * s_stride + c0 + j) = S::reduce_sum(*a) * inv_unit * key_scale;
                }
                r0 += nr;
            }
        }
    }
}

/// Vectors of the head dim kept in registers per row in `pv`, at most.
const PV_VECS: usize = 8;

/// Rows of one KV head that share each V vector in `pv` (a GQA group of a
/// decode step), at most.
const PV_ROWS: usize = 4;

/// Keys whose probabilities `pv` stages at a time.
const PV_KEYS: usize = 32;

/// Vectors of the head dim per row that `pv` keeps in registers for `rows`
/// rows on `S`: accumulators in half the registers, the other half for the V
/// vectors and the broadcast probability (one short for a single row of
/// `REGS / 2` vectors, where the compiler reloads a V vector rather than an
/// accumulator). Four rows of four vectors on 16 registers spilled
/// accumulators to the stack on every key.
const fn pv_vecs<S: Simd>(rows: usize) -> usize {
    let v = S::REGS / 2 / rows;
    if v < PV_VECS {
        v
    } else {
        PV_VECS
    }
}

/// A chunk of at most [`PV_KEYS`] keys' probabilities for at most
/// [`PV_ROWS`] rows, each multiplied by its key's scale (quantized rows), and
/// whether every one of them is nonzero.
struct StagedP {
    p: [[f32; PV_KEYS]; PV_ROWS],
    dense: bool,
}

impl StagedP {
    /// Stages keys `..n` of rows `..nr` of `p` (stride `p_stride`), with the
    /// scales at `scales` (stride `srs`; read only for quantized rows).
    #[inline(always)]
    unsafe fn new<S: Simd, E: Elem>(
        p: *const f32,
        p_stride: usize,
        nr: usize,
        n: usize,
        scales: *const f32,
        srs: usize,
    ) -> StagedP {
        let mut sc = [1f32; PV_KEYS];
        if E::QUANTIZED {
            // Over what a loaded element of value 1 is (a power of two: exact).
            let unit = E::unit::<S>();
            for (j, s) in sc.iter_mut().enumerate().take(n) {
                *s = *scales.add(j * srs) / unit;
            }
        }
        let mut staged = StagedP {
            p: [[0.0; PV_KEYS]; PV_ROWS],
            dense: true,
        };
        for (g, row) in staged.p.iter_mut().enumerate().take(nr) {
            let src = std::slice::from_raw_parts(p.add(g * p_stride), n);
            let mut zeros = 0;
            for ((x, &pj), &s) in row.iter_mut().zip(src).zip(&sc) {
                zeros += (pj == 0.0) as usize;
                // A stale slot's scale may be NaN: its probability is 0 and
                // `pv_block` skips it.
                *x = if E::QUANTIZED { pj * s } else { pj };
            }
            staged.dense &= zeros == 0;
        }
        staged
    }
}

/// `Acc[..NR][t0 .. t0 + NV vectors] += P V` over the keys `0 .. n` of one
/// staged chunk (at most [`PV_KEYS`] keys of a page segment), with the staged
/// probabilities `p` (scales applied), the accumulators in registers across
/// the keys. The last vector covers `last` lanes. Unless `DENSE` (every staged
/// probability nonzero), a key is skipped for a row whose probability `live`
/// (stride `live_stride`) is 0, and its V row is not read when it is 0 for
/// every row: a masked key's V row and scale may be stale, NaN included.
/// `ahead.0`, unless null, is key 0's row `PF_KEYS` keys on, of which
/// `ahead.1` elements are asked for key by key as the keys are read.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_block<
    S: Simd,
    E: Elem,
    const NR: usize,
    const NV: usize,
    const DENSE: bool,
    const WHOLE: bool,
>(
    p: &StagedP,
    live: *const f32,
    live_stride: usize,
    vrows: *const E,
    rs: usize,
    n: usize,
    acc: *mut f32,
    acc_stride: usize,
    last: usize,
    ahead: (*const E, usize),
) {
    let zero = S::splat(0.0);
    let m = S::first_lanes(last);
    // `WHOLE` is a constant, so the key loop tests nothing for the last vector.
    debug_assert_eq!(WHOLE, last == S::LANES);
    let mut a = [[zero; NV]; NR];
    for (g, row) in a.iter_mut().enumerate() {
        for (v, x) in row.iter_mut().enumerate() {
            let ptr = acc.add(g * acc_stride + v * S::LANES);
            *x = if v + 1 < NV || WHOLE {
                S::load(ptr)
            } else {
                S::load_masked(ptr, m, zero)
            };
        }
    }
    for j in 0..n {
        let vrow = vrows.add(j * rs);
        if !ahead.0.is_null() {
            prefetch(ahead.0.wrapping_add(j * rs), ahead.1);
        }
        if !DENSE && (0..NR).all(|g| *live.add(g * live_stride + j) == 0.0) {
            continue;
        }
        let mut x = [zero; NV];
        for (v, x) in x.iter_mut().enumerate() {
            *x = if v + 1 < NV || WHOLE {
                E::load::<S>(vrow.add(v * S::LANES))
            } else {
                E::load_first::<S>(vrow.add(v * S::LANES), last)
            };
        }
        for (g, row) in a.iter_mut().enumerate() {
            if DENSE || *live.add(g * live_stride + j) != 0.0 {
                let pg = S::splat(p.p[g][j]);
                for (acc, &x) in row.iter_mut().zip(&x) {
                    *acc = S::fma(pg, x, *acc);
                }
            }
        }
    }
    for (g, row) in a.iter().enumerate() {
        for (v, x) in row.iter().enumerate() {
            let ptr = acc.add(g * acc_stride + v * S::LANES);
            if v + 1 < NV || WHOLE {
                S::store(ptr, *x);
            } else {
                S::store_masked(ptr, m, *x);
            }
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv<S: Simd, E: Elem>(
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
    let (rs, srs) = (view.row_stride as usize, view.scale_row_stride as usize);
    // Elements of a row in one cache line: a chunk of the head dim asks for
    // the rows ahead only where it starts a line's worth of elements.
    let line = (64 / size_of::<E>()).max(1);
    let mut segs = Segments::<E>::new(view, view.v, view.v_scales, key0, cols, d, rows);
    while let Some(Segment {
        c: c0,
        rows: vrows,
        scales,
        n,
        ahead,
    }) = segs.next()
    {
        // Up to four rows of one KV head share each V vector (a GQA group
        // of a decode step).
        let mut r0 = 0;
        while r0 < rows {
            let (nr, head, shead) = head_block(view, r0, rows, PV_ROWS);
            let nr = if nr == 3 { 2 } else { nr };
            let cap = pv_vecs::<S>(nr);
            // The first rows of a KV head ask for its rows ahead.
            let pf_head = !ahead.is_null() && r0 % head_rows(view) == 0;
            let mut j0 = 0;
            while j0 < n {
                let kn = (n - j0).min(PV_KEYS);
                let pr = p.add(r0 * p_stride + c0 + j0);
                let staged = StagedP::new::<S, E>(
                    pr,
                    p_stride,
                    nr,
                    kn,
                    scales.wrapping_add(shead + j0 * srs),
                    srs,
                );
                let vr = vrows.add(head + j0 * rs);
                let mut t0 = 0;
                while t0 < d {
                    let nv = (d - t0).div_ceil(S::LANES).min(cap);
                    let last = (d - t0 - (nv - 1) * S::LANES).min(S::LANES);
                    // Whole vectors, then (where `d` is not a multiple of
                    // the lanes) the last one alone, masked.
                    let (nv, last) = if last < S::LANES && nv > 1 {
                        (nv - 1, S::LANES)
                    } else {
                        (nv, last)
                    };
                    let ar = acc.add(r0 * acc_stride + t0);
                    let pf = if pf_head && t0 % line < nv * S::LANES {
                        (
                            ahead.wrapping_add(head + j0 * rs + t0),
                            (nv * S::LANES).max(line),
                        )
                    } else {
                        (std::ptr::null(), 0)
                    };
                    macro_rules! block {
                        ($($nr:literal: $($nv:literal)*;)*) => {
                            match (nr, nv, staged.dense, last == S::LANES) {
                                $($(
                                    ($nr, $nv, true, true) => pv_block::<S, E, $nr, $nv, true, true>(
                                        &staged, pr, p_stride, vr.add(t0), rs, kn, ar, acc_stride, last, pf,
                                    ),
                                    ($nr, $nv, false, true) => pv_block::<S, E, $nr, $nv, false, true>(
                                        &staged, pr, p_stride, vr.add(t0), rs, kn, ar, acc_stride, last, pf,
                                    ),
                                )*
                                    ($nr, 1, true, false) => pv_block::<S, E, $nr, 1, true, false>(
                                        &staged, pr, p_stride, vr.add(t0), rs, kn, ar, acc_stride, last, pf,
                                    ),
                                    ($nr, 1, false, false) => pv_block::<S, E, $nr, 1, false, false>(
                                        &staged, pr, p_stride, vr.add(t0), rs, kn, ar, acc_stride, last, pf,
                                    ),
                                )*
                                _ => unreachable!("1, 2 or 4 rows of 1 to {PV_VECS} whole vectors, or a masked one alone"),
                            }
                        };
                    }
                    block!(4: 1 2 3 4; 2: 1 2 3 4 5 6 7 8; 1: 1 2 3 4 5 6 7 8;);
                    t0 += (nv - 1) * S::LANES + last;
                }
                j0 += kn;
            }
            r0 += nr;
        }
    }
}

/// `$f::<E>(args)` with `E` the element type of `view`.
macro_rules! by_elem {
    ($f:ident, $view:expr, ($($arg:expr),*)) => {
        match $view.elem {
            ElemType::F32 => $f::<f32>($($arg),*),
            ElemType::Bf16 => $f::<bf16>($($arg),*),
            ElemType::F16 => $f::<f16>($($arg),*),
            ElemType::Int8 => $f::<i8>($($arg),*),
            ElemType::Fp8 => $f::<E4m3>($($arg),*),
        }
    };
}

/// The entry points of one instruction set: each dispatches on the view's
/// element type to a function compiled with the set's target features for
/// that type alone (one function per type keeps each small enough that
/// LLVM inlines every vector intrinsic into it).
macro_rules! view_entry_points {
    ($(#[$attr:meta])* $simd:ty, $qk:ident, $pv:ident) => {
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
            $(#[$attr])*
            #[allow(clippy::too_many_arguments)]
            #[inline(never)]
            unsafe fn typed<E: Elem>(
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
                qk::<$simd, E>(q, q_stride, view, key0, d, rows, cols, s, s_stride, scale)
            }
            let view = &*view;
            by_elem!(typed, view, (q, q_stride, view, key0, d, rows, cols, s, s_stride, scale))
        }

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
            $(#[$attr])*
            #[allow(clippy::too_many_arguments)]
            #[inline(never)]
            unsafe fn typed<E: Elem>(
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
                pv::<$simd, E>(p, p_stride, view, key0, d, rows, cols, acc, acc_stride)
            }
            let view = &*view;
            by_elem!(typed, view, (p, p_stride, view, key0, d, rows, cols, acc, acc_stride))
        }
    };
}

view_entry_points!(super::simd::Portable, qk_view_portable, pv_view_portable);

#[cfg(target_arch = "x86_64")]
view_entry_points!(
    #[target_feature(enable = "avx2,fma,f16c")]
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
    use crate::tensor::{KvArray, KvData};
    use ndarray::{s, Array3, Array4};

    /// A pool `[pages, ps, hkv, d]` whose keys `0 .. n` of the sequence (page
    /// table `table`) hold small integers (V: halves of K), NaN everywhere
    /// else, stored as `elem`; for quantized types every unused row gets a
    /// NaN scale (and fp8 data NaN bits), so reading one shows.
    fn pool(
        ps: usize,
        hkv: usize,
        d: usize,
        table: &[i32],
        n: usize,
        elem: ElemType,
    ) -> (KvArray, KvArray) {
        let pages = table.iter().copied().max().unwrap() as usize + 2;
        let mut k = Array4::<f32>::from_elem((pages, ps, hkv, d), f32::NAN);
        let mut v = k.clone();
        let mut used = vec![vec![false; ps]; pages];
        for j in 0..n {
            let (page, slot) = (table[j / ps] as usize, j % ps);
            used[page][slot] = true;
            for kh in 0..hkv {
                for t in 0..d {
                    let x = ((j * 7 + t * 3 + kh * 5) % 11) as f32 - 5.0;
                    k[[page, slot, kh, t]] = x;
                    v[[page, slot, kh, t]] = x * 0.5;
                }
            }
        }
        let poison = |a: &mut KvArray| {
            if let KvArray::Int8 { scales, .. } | KvArray::Fp8 { scales, .. } = a {
                for ((page, slot, _), s) in scales.indexed_iter_mut() {
                    if !used[page][slot] {
                        *s = f32::NAN;
                    }
                }
            }
            if let KvArray::Fp8 { data, .. } = a {
                for ((page, slot, _, _), x) in data.indexed_iter_mut() {
                    if !used[page][slot] {
                        *x = 0x7f;
                    }
                }
            }
        };
        let (mut k, mut v) = (
            KvArray::quantize(k.view(), elem),
            KvArray::quantize(v.view(), elem),
        );
        poison(&mut k);
        poison(&mut v);
        (k, v)
    }

    /// `|got - want|` within f32 rounding of a sum whose terms' magnitudes add to `mag`.
    fn close(got: f32, want: f64, mag: f64) -> bool {
        (f64::from(got) - want).abs() <= 1e-6 * mag + 1e-30
    }

    /// `pv_fn` on an accumulator of `rows` rows of `d` ones, with `p` of
    /// `rows` rows of `cols` keys from `key0` of `view`.
    #[allow(clippy::too_many_arguments)]
    fn run_pv(
        pv_fn: PvViewFn,
        p: &[f32],
        view: &KvView,
        key0: usize,
        d: usize,
        rows: usize,
        cols: usize,
    ) -> Vec<f32> {
        assert_eq!(p.len(), rows * cols);
        let mut acc = vec![1f32; rows * d];
        // SAFETY: `p` and `acc` hold `rows` rows of `cols` and `d`; the
        // caller's view covers keys `key0 .. key0 + cols`.
        unsafe {
            pv_fn(
                p.as_ptr(),
                cols,
                view,
                key0,
                d,
                rows,
                cols,
                acc.as_mut_ptr(),
                d,
            )
        };
        acc
    }

    /// Asserts that `acc` (`rows` rows of `d`, started at 1) holds `1 + Σ
    /// terms(r, t)` at each `[r][t]`.
    fn assert_acc<I: Iterator<Item = f64> + Clone>(
        acc: &[f32],
        rows: usize,
        d: usize,
        what: &str,
        terms: impl Fn(usize, usize) -> I,
    ) {
        for r in 0..rows {
            for t in 0..d {
                let terms = terms(r, t);
                let want = 1.0 + terms.clone().sum::<f64>();
                let mag = 1.0 + terms.map(f64::abs).sum::<f64>();
                assert!(
                    close(acc[r * d + t], want, mag),
                    "{what} r={r} t={t}: {} vs {want}",
                    acc[r * d + t]
                );
            }
        }
    }

    /// `pv` on the decode shape: four rows of a KV head sharing each V vector
    /// (and two of the next), chunks of staged probabilities where every one
    /// is nonzero, and a tail of keys past the sequence, stale (NaN V rows and
    /// scales, fp8 NaN bits) with probability 0 for every row.
    #[test]
    fn pv_of_a_gqa_group_stages_dense_chunks_and_skips_stale_keys() {
        for isa in NativeIsa::ALL.into_iter().filter(|i| i.is_supported()) {
            let (_, pv_fn) = view_kernels(isa);
            for elem in ElemType::ALL {
                // (page size, d, mixed): whole pages and short ones, a head dim
                // with a tail. Not mixed: every row live on keys ..40, the
                // sequence 40 long. Mixed: rows 1 and 4 live on ..40 and the
                // others on ..36, the sequence 36 long: rows 1 and 4 then read
                // stale keys (NaN), and the other rows, in the same blocks,
                // must skip them.
                for (ps, d, mixed) in [
                    (64, 131, false),
                    (16, 128, false),
                    (5, 24, false),
                    (64, 131, true),
                    (16, 40, true),
                ] {
                    let (hkv, hr, rows, key0, cols) = (2, 4, 6, 3, 48);
                    let live = |r: usize| if mixed && r != 1 && r != 4 { 36 } else { 40 };
                    let stale_rows = |r: usize| mixed && (r == 1 || r == 4);
                    let table: Vec<i32> = (0..24).rev().collect();
                    let n = key0 + if mixed { 36 } else { 40 };
                    let (_, v) = pool(ps, hkv, d, &table, n, elem);
                    let vd = v.view();
                    let scales = vd
                        .scales()
                        .map_or(std::ptr::null(), |s| s.slice(s![.., .., 0]).as_ptr());
                    let view = KvView::pool(
                        (vd.as_ptr(), vd.as_ptr()),
                        (scales, scales),
                        table.as_ptr(),
                        key0 + cols,
                        [ps, hkv, d],
                        hr,
                        elem,
                    );
                    let p: Vec<f32> = (0..rows * cols)
                        .map(|i| {
                            let (r, c) = (i / cols, i % cols);
                            if c < live(r) {
                                0.125 + ((r + c) % 5) as f32 * 0.0625
                            } else {
                                0.0
                            }
                        })
                        .collect();
                    let acc = run_pv(pv_fn, &p, &view, key0, d, rows, cols);
                    let what = format!("{isa} {elem} ps={ps} d={d} mixed={mixed}");
                    for r in (0..rows).filter(|&r| stale_rows(r)) {
                        for t in 0..d {
                            assert!(
                                acc[r * d + t].is_nan(),
                                "{what} r={r} t={t} read no stale key"
                            );
                        }
                    }
                    // The rows that read no stale key, checked alone.
                    let fresh: Vec<usize> = (0..rows).filter(|&r| !stale_rows(r)).collect();
                    let acc: Vec<f32> = fresh
                        .iter()
                        .flat_map(|&r| acc[r * d..(r + 1) * d].iter().copied())
                        .collect();
                    assert_acc(&acc, fresh.len(), d, &what, |i, t| {
                        let (p, vd, table, r) = (&p, &vd, &table, fresh[i]);
                        (0..live(r)).map(move |c| {
                            let j = key0 + c;
                            let x = f64::from(vd.get([table[j / ps] as usize, j % ps, r / hr, t]));
                            f64::from(p[r * cols + c]) * x
                        })
                    });
                }
            }
        }
    }

    #[test]
    fn in_place_products_follow_the_page_table_widen_every_type_and_skip_zero_probabilities() {
        for isa in NativeIsa::ALL.into_iter().filter(|i| i.is_supported()) {
            let (qk_fn, pv_fn) = view_kernels(isa);
            for elem in ElemType::ALL {
                // (page size, KV heads in a row, tile rows per KV head, d, key0, cols)
                for (ps, hkv, hr, d, key0, cols) in [
                    (1, 1, 6, 5, 0, 3),
                    (7, 1, 6, 19, 3, 20),
                    (16, 1, 6, 32, 16, 16),
                    (4, 1, 6, 3, 2, 9),
                    (16, 3, 2, 32, 5, 27),
                    (3, 2, 3, 19, 1, 17),
                    (1, 6, 1, 16, 0, 5),
                ] {
                    let table = [
                        5i32, 2, 0, 7, 1, 3, 4, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19,
                        20, 21, 22, 23,
                    ];
                    let n = key0 + cols;
                    let (k, v) = pool(ps, hkv, d, &table, n, elem);
                    let (kd, vd) = (k.view(), v.view());
                    let rows: usize = 6;
                    let head = |r: usize| (r / hr).min(hkv - 1);
                    assert_eq!(rows.div_ceil(hr), hkv, "the tile covers every head");
                    let at = |a: &KvData<'_>, j: usize, kh: usize, t: usize| {
                        f64::from(a.get([table[j / ps] as usize, j % ps, kh, t]))
                    };
                    let scales = |a: &KvData<'_>| {
                        a.scales()
                            .map_or(std::ptr::null(), |s| s.slice(s![.., .., 0]).as_ptr())
                    };
                    // Tile rows `r` read KV head `r / hr`; a view of one head
                    // has `hr` >= rows.
                    let view = KvView::pool(
                        (kd.as_ptr(), vd.as_ptr()),
                        (scales(&kd), scales(&vd)),
                        table.as_ptr(),
                        n,
                        [ps, hkv, d],
                        hr,
                        elem,
                    );
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
                    let what = format!("{isa} {elem} ps={ps} hkv={hkv} d={d}");
                    for r in 0..rows {
                        for c in 0..cols {
                            let terms = (0..d).map(|t| {
                                f64::from(q[r * d + t]) * at(&kd, key0 + c, head(r), t) * 0.5
                            });
                            let want: f64 = terms.clone().sum();
                            let mag: f64 = terms.map(f64::abs).sum();
                            assert!(
                                close(s[r * cols + c], want, mag),
                                "{what} r={r} c={c}: {} vs {want}",
                                s[r * cols + c]
                            );
                        }
                    }
                    // Probabilities with zeros; the accumulator starts at 1.
                    let p: Vec<f32> = (0..rows * cols)
                        .map(|i| if i % 3 == 0 { 0.0 } else { 0.25 })
                        .collect();
                    let acc = run_pv(pv_fn, &p, &view, key0, d, rows, cols);
                    assert_acc(&acc, rows, d, &what, |r, t| {
                        let (p, vd, at, head) = (&p, &vd, &at, &head);
                        (0..cols)
                            .filter(move |&c| p[r * cols + c] != 0.0)
                            .map(move |c| f64::from(p[r * cols + c]) * at(vd, key0 + c, head(r), t))
                    });
                }
            }
        }
    }

    /// An fp8 key scale near its largest (448 x scale finite) under a large
    /// softmax scale: the 2^-8 at which a vector unit loads fp8 values is
    /// applied to the dot products, so the scores stay the finite ones of
    /// f64 (folded into the scale, 256 x 7e35 x 100 overflowed to inf).
    #[test]
    fn fp8_scores_at_the_largest_scales_stay_finite() {
        for isa in NativeIsa::ALL.into_iter().filter(|i| i.is_supported()) {
            let (qk_fn, _) = view_kernels(isa);
            for d in [16, 19, 35] {
                let (ps, cols, scale, key_scale) = (16, 20, 100.0f32, 7e35f32);
                // Every element the smallest subnormal, 2^-9.
                let data = Array4::<u8>::from_elem((2, ps, 1, d), 0x01);
                let scales = Array3::<f32>::from_elem((2, ps, 1), key_scale);
                let table = [1i32, 0];
                let view = KvView::pool(
                    (data.as_ptr(), data.as_ptr()),
                    (scales.as_ptr(), scales.as_ptr()),
                    table.as_ptr(),
                    cols,
                    [ps, 1, d],
                    1,
                    ElemType::Fp8,
                );
                let q = vec![1f32; d];
                let mut s = vec![0f32; cols];
                // SAFETY: q holds one row of d; the view covers keys 0 .. cols;
                // s holds one row of cols.
                unsafe {
                    qk_fn(
                        q.as_ptr(),
                        d,
                        &view,
                        0,
                        d,
                        1,
                        cols,
                        s.as_mut_ptr(),
                        cols,
                        scale,
                    )
                };
                let want = f64::from(scale) * f64::from(key_scale) * d as f64 / 512.0;
                for (c, &got) in s.iter().enumerate() {
                    assert!(
                        close(got, want, want),
                        "{isa} d={d} key {c}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
