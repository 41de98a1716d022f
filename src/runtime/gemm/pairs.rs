//! The tile products on bf16 operands with f32 accumulation, for a
//! prefill whose q, k and v are all bf16 ([`crate::tile::nest::KvSource::PackedBf16`],
//! chosen where the CPU has `vdpbf16ps` and it multiplies faster than f32
//! FMAs: [`crate::driver::has_bf16_dot`], [`dpbf16_pays`]).
//!
//! Operands travel as *pairs*: one `u32` holds two bf16 values, the first in
//! the low half, as `vdpbf16ps` (AVX-512 BF16) reads them. That instruction
//! multiplies 16 pairs by 16 pairs and adds both products to 16 f32
//! accumulators: twice the multiply-adds of an f32 FMA per instruction.
//! Elsewhere the same layouts are widened to f32 (a shift and a mask per pair
//! vector) and multiplied with two FMAs. The products of two bf16 values are
//! exact in f32, so the instruction sets differ in the order of the f32
//! additions, and in one more way: `vdpbf16ps` and `vcvtne2ps2bf16` treat
//! subnormal inputs as zero and flush subnormal results (their fixed
//! behaviour), where the widened products keep them. Only values below 2^-126
//! are affected, far below the bf16 rounding of P.
//!
//! # Layouts (in `u32` pairs)
//!
//! * Packed K ([`PairsK`]): panels of [`PANEL`] = 16 keys, `[n_panels][d2 / 2][PANEL]`
//!   with `d2 = round_up(d, 2)`: the pair of dimensions `2t, 2t + 1` of key `j`
//!   sits at `(j / 16) * (d2 / 2) * 16 + t * 16 + j % 16`. Keys past `kv_len` and
//!   the dimension past an odd `d` are zero. A tile starting at key `c0` (a
//!   multiple of 16) starts `c0 * d2 * 2` bytes in.
//! * Packed V ([`PairsV`]): rows of key pairs `[ceil(kv_len / 2)][round_up(d, 16)]`:
//!   column `c` of the pair row `u` holds keys `2u` (low) and `2u + 1` (high).
//!   Columns past `d` and the key past an odd `kv_len` are zero. A tile starting
//!   at an even key `c0` starts `c0 * row_stride * 2` bytes in.
//!
//! # Kernels (the ABI of [`QkFn`] / [`PvFn`], `k` and `v` pointing at pairs)
//!
//! * `qk`: `S[r][c] = scale · Σ_t bf16(Q[r][t]) · K[c][t]`; Q is f32 and rounded
//!   to bf16 (to nearest even) as it is staged, exactly when it holds bf16 values.
//! * `pv`: `Acc[r][t] += Σ_c bf16(P[r][c]) · V[c][t]`: the probabilities are
//!   rounded to bf16 for the product, as FlashAttention does (the row sums `l`
//!   are taken before, in f32). An odd `cols` pairs the last key with a zero
//!   probability, so its partner row must be finite (the packing zero-fills it).
//! * `pv_exact`: `pv` over the keys whose rounded probability is not zero, so a
//!   NaN or infinite V of a masked key cannot reach the accumulator.

use super::kernels::{load_rows, store_rows};
use super::simd::{Portable, Simd};
use super::{PvFn, QkFn, PANEL};
use half::bf16;
use ndarray::ArrayView2;

/// The layout of one packed K head in pairs (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PairsK {
    /// Head dimension.
    pub d: usize,
    /// Number of keys.
    pub kv_len: usize,
}

impl PairsK {
    /// Pairs per key row, `ceil(d / 2)`.
    pub fn pairs(&self) -> usize {
        self.d.div_ceil(2)
    }
    /// Pairs per panel of 16 keys.
    pub fn panel_stride(&self) -> usize {
        self.pairs() * PANEL
    }
    /// Pairs of the packed head.
    pub fn len(&self) -> usize {
        self.kv_len.div_ceil(PANEL) * self.panel_stride()
    }
    /// Whether the head has no keys.
    pub fn is_empty(&self) -> bool {
        self.kv_len == 0
    }
}

/// The layout of one packed V head in pairs (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PairsV {
    /// Head dimension.
    pub d: usize,
    /// Number of keys.
    pub kv_len: usize,
}

impl PairsV {
    /// Pairs per row of two keys, `round_up(d, 16)`.
    pub fn row_stride(&self) -> usize {
        self.d.div_ceil(PANEL) * PANEL
    }
    /// Pairs of the packed head.
    pub fn len(&self) -> usize {
        self.kv_len.div_ceil(2) * self.row_stride()
    }
    /// Whether the head has no keys.
    pub fn is_empty(&self) -> bool {
        self.kv_len == 0
    }
}

/// Two bf16 as one pair, `lo` in the low half.
#[inline(always)]
fn pair(lo: bf16, hi: bf16) -> u32 {
    u32::from(lo.to_bits()) | u32::from(hi.to_bits()) << 16
}

/// Packs the keys `k` (`[keys, d]`) into `dst`, the pairs of their panels
/// ([`PairsK`]); a caller packing a head in pieces starts each piece at a
/// multiple of 16 keys, `key0 / 16` panels into the head.
///
/// # Panics
///
/// If `dst` is shorter than the panels.
pub fn pack_k_pairs(k: ArrayView2<bf16>, dst: &mut [u32]) {
    let (keys, d) = k.dim();
    let lay = PairsK { d, kv_len: keys };
    let dst = &mut dst[..lay.len()];
    dst.fill(0);
    let zero = bf16::ZERO;
    for (j, row) in k.rows().into_iter().enumerate() {
        let base = (j / PANEL) * lay.panel_stride() + j % PANEL;
        for t in 0..lay.pairs() {
            let hi = if 2 * t + 1 < d { row[2 * t + 1] } else { zero };
            dst[base + t * PANEL] = pair(row[2 * t], hi);
        }
    }
}

/// Packs the keys `v` (`[keys, d]`) into `dst`, the pair rows of
/// [`PairsV`]; a caller packing a head in pieces starts each piece at an even
/// key, `key0 / 2` pair rows into the head.
///
/// # Panics
///
/// If `dst` is shorter than the pair rows.
pub fn pack_v_pairs(v: ArrayView2<bf16>, dst: &mut [u32]) {
    let (keys, d) = v.dim();
    let lay = PairsV { d, kv_len: keys };
    let dst = &mut dst[..lay.len()];
    let rs = lay.row_stride();
    for (u, out) in dst.chunks_exact_mut(rs.max(1)).enumerate() {
        let lo = v.row(2 * u);
        let hi = (2 * u + 1 < keys).then(|| v.row(2 * u + 1));
        for (c, x) in out.iter_mut().enumerate() {
            *x = if c < d {
                pair(lo[c], hi.map_or(bf16::ZERO, |h| h[c]))
            } else {
                0
            };
        }
    }
}

/// The bf16 pair product of one instruction set.
///
/// # Safety
///
/// As for [`Simd`]: only inside functions compiled with the matching target
/// features, on CPUs that have them; `b` reads `LANES` pairs.
pub(crate) unsafe trait PairDot {
    /// The f32 vectors.
    type S: Simd;
    /// One pair of the left operand, ready to multiply.
    type A: Copy;
    /// `LANES` pairs of the right operand, ready to multiply.
    type B: Copy;
    /// Rounds the `n` floats at `src` to bf16 and writes them as `ceil(n / 2)`
    /// pairs to `dst` (an odd `n` pairs the last with zero).
    unsafe fn stage(src: *const f32, n: usize, dst: *mut u32);
    unsafe fn a(pair: u32) -> Self::A;
    unsafe fn b(p: *const u32) -> Self::B;
    /// `c + a.lo · b.lo + a.hi · b.hi`, lane by lane.
    unsafe fn dot(c: <Self::S as Simd>::V, a: Self::A, b: Self::B) -> <Self::S as Simd>::V;
}

/// Pairs widened to f32 and multiplied with two FMAs, on any [`Simd`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Widening<S>(std::marker::PhantomData<S>);

// SAFETY: the primitives are those of `S`, used under its contract.
unsafe impl<S: Simd> PairDot for Widening<S> {
    type S = S;
    type A = (S::V, S::V);
    type B = (S::V, S::V);
    #[inline(always)]
    unsafe fn stage(src: *const f32, n: usize, dst: *mut u32) {
        stage_scalar(src, n, dst)
    }
    #[inline(always)]
    unsafe fn a(pair: u32) -> Self::A {
        (
            S::splat(f32::from_bits(pair << 16)),
            S::splat(f32::from_bits(pair & 0xffff_0000)),
        )
    }
    #[inline(always)]
    unsafe fn b(p: *const u32) -> Self::B {
        S::load_bf16_pairs(p)
    }
    #[inline(always)]
    unsafe fn dot(c: S::V, a: Self::A, b: Self::B) -> S::V {
        S::fma(a.1, b.1, S::fma(a.0, b.0, c))
    }
}

/// [`PairDot::stage`] one value at a time (round to nearest even; NaN stays NaN).
#[inline(always)]
unsafe fn stage_scalar(src: *const f32, n: usize, dst: *mut u32) {
    let at = |i: usize| {
        if i < n {
            bf16::from_f32(*src.add(i))
        } else {
            bf16::ZERO
        }
    };
    for t in 0..n.div_ceil(2) {
        *dst.add(t) = pair(at(2 * t), at(2 * t + 1));
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::Avx512Bf16;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::simd::Avx512;
    use super::PairDot;
    use std::arch::x86_64::*;

    /// AVX-512 BF16: `vdpbf16ps`, 16 pairs by 16 pairs into 16 f32 per instruction.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx512Bf16;

    // SAFETY: only used inside `#[target_feature(enable = "avx512f,avx512bf16")]`
    // entry points, chosen after run-time detection of both features.
    unsafe impl PairDot for Avx512Bf16 {
        type S = Avx512;
        type A = __m512bh;
        type B = __m512bh;
        #[inline(always)]
        unsafe fn stage(src: *const f32, n: usize, dst: *mut u32) {
            // 32 floats to 32 bf16 (round to nearest even) per instruction;
            // the tail through masked loads that read zeros past `n`.
            let mut i = 0;
            while i < n {
                let left = n - i;
                let m0: __mmask16 = if left >= 16 { !0 } else { (1u16 << left) - 1 };
                let m1: __mmask16 = if left >= 32 {
                    !0
                } else if left > 16 {
                    (1u16 << (left - 16)) - 1
                } else {
                    0
                };
                let x0 = _mm512_maskz_loadu_ps(m0, src.add(i));
                let x1 = _mm512_maskz_loadu_ps(m1, src.add(i).wrapping_add(16));
                // The second operand's values fill the low half.
                let h: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(x1, x0));
                let pairs = left.min(32).div_ceil(2);
                let pm: __mmask16 = if pairs >= 16 { !0 } else { (1u16 << pairs) - 1 };
                _mm512_mask_storeu_epi32(dst.add(i / 2).cast(), pm, h);
                i += 32;
            }
        }
        #[inline(always)]
        unsafe fn a(pair: u32) -> __m512bh {
            std::mem::transmute(_mm512_set1_epi32(pair as i32))
        }
        #[inline(always)]
        unsafe fn b(p: *const u32) -> __m512bh {
            std::mem::transmute(_mm512_loadu_si512(p.cast()))
        }
        #[inline(always)]
        unsafe fn dot(c: __m512, a: __m512bh, b: __m512bh) -> __m512 {
            _mm512_dpbf16_ps(c, a, b)
        }
    }
}

/// Pairs staged on the stack per call (above it, on the heap).
const STAGE: usize = 4096;

/// Rows of floats staged as bf16 pairs ([`PairDot::stage`]), a block of
/// rows at a time: on the stack when a block fits [`STAGE`] pairs, else on
/// the heap. An iterator rather than a callback: a closure's body would not
/// inherit the caller's `#[target_feature]`s, and the intrinsics in it would
/// not be inlined.
struct StagedRows {
    stack: std::mem::MaybeUninit<[u32; STAGE]>,
    heap: Vec<u32>,
    /// Values per row, pairs per row, rows per block, rows, the next row.
    n: usize,
    pairs: usize,
    block: usize,
    rows: usize,
    r0: usize,
}

impl StagedRows {
    /// Staging for `rows` rows of `n` values each.
    #[inline(always)]
    fn new(n: usize, rows: usize) -> StagedRows {
        let pairs = n.div_ceil(2);
        // As many rows as fit the stack buffer, at least one.
        let block = (STAGE / pairs.max(1)).clamp(1, rows.max(1));
        StagedRows {
            stack: std::mem::MaybeUninit::uninit(),
            heap: Vec::new(),
            n,
            pairs,
            block,
            rows,
            r0: 0,
        }
    }

    /// Stages the next block of the rows at `src` (`stride` floats apart):
    /// its first row, its number of rows and its pairs (row `i` of the block
    /// at `i * self.pairs`), valid until the next call.
    ///
    /// # Safety
    ///
    /// `src` must hold the rows given to [`StagedRows::new`].
    #[inline(always)]
    unsafe fn next<D: PairDot>(
        &mut self,
        src: *const f32,
        stride: usize,
    ) -> Option<(usize, usize, *const u32)> {
        if self.r0 >= self.rows {
            return None;
        }
        let (r0, n_rows) = (self.r0, self.block.min(self.rows - self.r0));
        let len = n_rows * self.pairs;
        let dst: *mut u32 = if len <= STAGE {
            self.stack.as_mut_ptr().cast()
        } else {
            self.heap.resize(len, 0);
            self.heap.as_mut_ptr()
        };
        for i in 0..n_rows {
            D::stage(src.add((r0 + i) * stride), self.n, dst.add(i * self.pairs));
        }
        self.r0 += n_rows;
        Some((r0, n_rows, dst))
    }
}

/// Register tile of `qk`: `R` rows of staged pairs by `NV` vectors of keys.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn qk_tile<D: PairDot, const R: usize, const NV: usize>(
    qs: *const u32,
    np: usize,
    k: *const u32,
    n_cols: usize,
    s: *mut f32,
    s_stride: usize,
    scale: f32,
) {
    let lanes = D::S::LANES;
    let panel_stride = np * PANEL;
    let mut acc = [[D::S::splat(0.0); NV]; R];
    for t in 0..np {
        // (A loop, not `array::from_fn`: see `StagedRows` on closures.)
        let at = |v: usize| (v * lanes / PANEL) * panel_stride + t * PANEL + v * lanes % PANEL;
        let mut b = [D::b(k.add(at(0))); NV];
        for (v, b_v) in b.iter_mut().enumerate().skip(1) {
            *b_v = D::b(k.add(at(v)));
        }
        for (i, acc_row) in acc.iter_mut().enumerate() {
            let a = D::a(*qs.add(i * np + t));
            for (acc_v, &b_v) in acc_row.iter_mut().zip(b.iter()) {
                *acc_v = D::dot(*acc_v, a, b_v);
            }
        }
    }
    store_rows::<D::S, R, NV>(&acc, n_cols, s, s_stride, Some(scale));
}

/// Row tiles of `MR` rows, then of 4, 2 and 1: calls `tile!(R, r)` for each
/// tile of `R` rows starting at row `r`.
macro_rules! row_tiles {
    ($rows:expr, $MR:ident, $tile:ident) => {{
        let rows = $rows;
        let mut r = 0;
        while rows - r >= $MR {
            $tile!($MR, r);
            r += $MR;
        }
        if $MR > 4 {
            while rows - r >= 4 {
                $tile!(4, r);
                r += 4;
            }
        }
        if $MR > 2 {
            while rows - r >= 2 {
                $tile!(2, r);
                r += 2;
            }
        }
        if $MR > 1 {
            while rows - r >= 1 {
                $tile!(1, r);
                r += 1;
            }
        }
    }};
}

/// Calls `go!(NV)` with `NV` the vectors of a column tile of `n_vec` vectors
/// (`n_vec <= MAX`, `MAX <= 4`).
macro_rules! by_vectors {
    ($n_vec:expr, $MAX:ident, $go:ident) => {
        if $n_vec == $MAX {
            $go!($MAX)
        } else if $n_vec == 1 {
            $go!(1)
        } else if $n_vec == 2 {
            $go!(2)
        } else {
            $go!(3)
        }
    };
}

/// `S = scale · bf16(Q) · Kᵀ` (see the module docs).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn qk<D: PairDot, const MR: usize, const NV: usize>(
    q: *const f32,
    q_stride: usize,
    k: *const u32,
    d: usize,
    rows: usize,
    cols: usize,
    s: *mut f32,
    s_stride: usize,
    scale: f32,
) {
    let lanes = D::S::LANES;
    let tile_cols = NV * lanes;
    debug_assert!(tile_cols.is_multiple_of(PANEL) && NV <= 4);
    // Every pair read is staged first.
    let mut staged = StagedRows::new(d, rows);
    let np = staged.pairs;
    while let Some((r0, n_rows, qs)) = staged.next::<D>(q, q_stride) {
        let mut c0 = 0;
        while c0 < cols {
            let n_cols = (cols - c0).min(tile_cols);
            let kc = k.add((c0 / PANEL) * np * PANEL);
            let sc = s.add(r0 * s_stride + c0);
            let n_vec = n_cols.div_ceil(lanes);
            macro_rules! go {
                ($NV:expr) => {{
                    macro_rules! tile {
                        ($R:expr, $r:expr) => {
                            qk_tile::<D, { $R }, { $NV }>(
                                qs.add($r * np),
                                np,
                                kc,
                                n_cols,
                                sc.add($r * s_stride),
                                s_stride,
                                scale,
                            )
                        };
                    }
                    row_tiles!(n_rows, MR, tile)
                }};
            }
            by_vectors!(n_vec, NV, go);
            c0 += tile_cols;
        }
    }
}

/// Register tile of `pv`: `R` rows by `NV` vectors of the head dimension,
/// reduced over `n_pairs` key pairs.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_tile<D: PairDot, const R: usize, const NV: usize>(
    ps: *const u32,
    ps_stride: usize,
    v: *const u32,
    v_stride: usize,
    n_pairs: usize,
    n_cols: usize,
    acc: *mut f32,
    acc_stride: usize,
) {
    let lanes = D::S::LANES;
    let mut c = load_rows::<D::S, R, NV>(acc, acc_stride, n_cols);
    for u in 0..n_pairs {
        let vrow = v.add(u * v_stride);
        let mut b = [D::b(vrow); NV];
        for (j, b_j) in b.iter_mut().enumerate().skip(1) {
            *b_j = D::b(vrow.add(j * lanes));
        }
        for (i, c_row) in c.iter_mut().enumerate() {
            let a = D::a(*ps.add(i * ps_stride + u));
            for (c_v, &b_v) in c_row.iter_mut().zip(b.iter()) {
                *c_v = D::dot(*c_v, a, b_v);
            }
        }
    }
    store_rows::<D::S, R, NV>(&c, n_cols, acc, acc_stride, None);
}

/// `Acc += bf16(P) · V` (see the module docs).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv<D: PairDot, const MR: usize, const NV: usize>(
    p: *const f32,
    p_stride: usize,
    v: *const u32,
    v_stride: usize,
    d: usize,
    rows: usize,
    cols: usize,
    acc: *mut f32,
    acc_stride: usize,
) {
    let lanes = D::S::LANES;
    let width = NV * lanes;
    // Every pair read is staged first.
    let mut staged = StagedRows::new(cols, rows);
    let n_pairs = staged.pairs;
    while let Some((r0, n_rows, ps)) = staged.next::<D>(p, p_stride) {
        let mut c0 = 0;
        while c0 < d {
            let n_cols = (d - c0).min(width);
            let n_vec = n_cols.div_ceil(lanes);
            let ac = acc.add(r0 * acc_stride + c0);
            macro_rules! go {
                ($NV:expr) => {{
                    macro_rules! tile {
                        ($R:expr, $r:expr) => {
                            pv_tile::<D, { $R }, { $NV }>(
                                ps.add($r * n_pairs),
                                n_pairs,
                                v.add(c0),
                                v_stride,
                                n_pairs,
                                n_cols,
                                ac.add($r * acc_stride),
                                acc_stride,
                            )
                        };
                    }
                    row_tiles!(n_rows, MR, tile)
                }};
            }
            by_vectors!(n_vec, NV, go);
            c0 += width;
        }
    }
}

/// `pv` over the keys whose rounded probability is not zero (see the module
/// docs), with the ABI of [`PvFn`]; plain code, for the few tiles whose V
/// holds NaN or infinity.
///
/// # Safety
///
/// As for [`PvFn`], with `v` the pair rows of the tile's first (even) key.
pub unsafe extern "C" fn pv_exact(
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
    let v: *const u32 = v.cast();
    for r in 0..rows {
        // SAFETY: the caller guarantees `rows` rows of `d` accumulators at
        // `acc_stride`, `cols` probabilities per row and the pair rows of `cols` keys.
        let a = std::slice::from_raw_parts_mut(acc.add(r * acc_stride), d);
        for c in 0..cols {
            let pc = bf16::from_f32(*p.add(r * p_stride + c)).to_f32();
            if pc == 0.0 {
                continue;
            }
            let row = std::slice::from_raw_parts(v.add(c / 2 * v_stride), d);
            for (x, &y) in a.iter_mut().zip(row) {
                let half = if c % 2 == 0 { y << 16 } else { y & 0xffff_0000 };
                *x += pc * f32::from_bits(half);
            }
        }
    }
}

/// Instantiates the `extern "C"` `qk` and `pv` of one instruction set.
macro_rules! entry_points {
    (
        $(#[$attr:meta])*
        $dot:ty, qk = ($qk:ident, $qmr:expr, $qnv:expr), pv = ($pv:ident, $pmr:expr, $pnv:expr)
    ) => {
        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        unsafe extern "C" fn $qk(
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
            const MR: usize = $qmr;
            qk::<$dot, MR, { $qnv }>(q, q_stride, k.cast(), d, rows, cols, s, s_stride, scale)
        }

        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        unsafe extern "C" fn $pv(
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
            const MR: usize = $pmr;
            pv::<$dot, MR, { $pnv }>(p, p_stride, v.cast(), v_stride, d, rows, cols, acc, acc_stride)
        }
    };
}

entry_points!(
    Widening<Portable>,
    qk = (qk_portable, 2, 4),
    pv = (pv_portable, 2, 2)
);

#[cfg(target_arch = "x86_64")]
entry_points!(
    #[target_feature(enable = "avx2,fma,f16c")]
    Widening<super::simd::Avx2>,
    qk = (qk_avx2, 4, 2),
    pv = (pv_avx2, 4, 2)
);

#[cfg(target_arch = "x86_64")]
entry_points!(
    #[target_feature(enable = "avx512f")]
    Widening<super::simd::Avx512>,
    qk = (qk_avx512, 4, 4),
    pv = (pv_avx512, 4, 4)
);

#[cfg(target_arch = "x86_64")]
entry_points!(
    #[target_feature(enable = "avx512f,avx512bf16")]
    Avx512Bf16,
    qk = (qk_avx512bf16, 6, 4),
    pv = (pv_avx512bf16, 6, 4)
);

/// How the pair products of an instruction set are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairProducts {
    /// `vdpbf16ps` (AVX-512 BF16).
    Dpbf16,
    /// Widened to f32, two FMAs per pair.
    Widened(super::NativeIsa),
}

impl PairProducts {
    /// The pair products for the kernels of `isa`: `vdpbf16ps` where `isa` is
    /// AVX-512 and the CPU has AVX-512 BF16 (unless `widen` asks for the
    /// widening ones, which tests compare against).
    pub fn for_isa(isa: super::NativeIsa, widen: bool) -> PairProducts {
        #[cfg(target_arch = "x86_64")]
        if !widen
            && isa == super::NativeIsa::Avx512
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
        {
            return PairProducts::Dpbf16;
        }
        let _ = widen;
        PairProducts::Widened(isa)
    }

    /// The `qk`, `pv` and exact `pv` kernels (see the module docs).
    ///
    /// # Panics
    ///
    /// If the CPU lacks the instruction set.
    pub fn kernels(self) -> (QkFn, PvFn, PvFn) {
        use super::NativeIsa;
        let exact: PvFn = pv_exact;
        match self {
            #[cfg(target_arch = "x86_64")]
            PairProducts::Dpbf16 => (qk_avx512bf16, pv_avx512bf16, exact),
            PairProducts::Widened(isa) => {
                assert!(isa.is_supported(), "this CPU lacks {isa}");
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    NativeIsa::Avx512 => (qk_avx512, pv_avx512, exact),
                    #[cfg(target_arch = "x86_64")]
                    NativeIsa::Avx2 => (qk_avx2, pv_avx2, exact),
                    #[allow(unreachable_patterns)]
                    _ => (qk_portable, pv_portable, exact),
                }
            }
            #[allow(unreachable_patterns)]
            _ => unreachable!("dpbf16 is chosen only on x86-64"),
        }
    }

    /// A short name: `dpbf16`, `widened-avx512`, ...
    pub fn name(self) -> String {
        match self {
            PairProducts::Dpbf16 => "dpbf16".into(),
            PairProducts::Widened(isa) => format!("widened-{isa}"),
        }
    }
}

/// `iters` rounds of [`FmaPeak::CHAINS`](super::FmaPeak::CHAINS) independent
/// `vdpbf16ps` on registers (32 multiply-adds each; the contract of
/// [`FmaPeakFn`](super::FmaPeakFn) with 32 lanes).
///
/// # Safety
///
/// Needs AVX-512 F and BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe extern "C" fn dpbf16_peak(iters: usize, out: *mut f32) {
    use std::arch::x86_64::*;
    // Pairs of 0.5 (bf16 0x3f00): each step adds 0.5 to every lane.
    let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(0x3f00_3f00));
    let mut x = [_mm512_set1_ps(0.0); super::FmaPeak::CHAINS];
    for _ in 0..iters {
        for v in x.iter_mut() {
            *v = _mm512_dpbf16_ps(*v, a, a);
        }
    }
    let sum = x[1..].iter().fold(x[0], |s, &v| _mm512_add_ps(s, v));
    *out = _mm512_reduce_add_ps(sum);
}

/// How many times the multiply-adds of f32 FMAs `vdpbf16ps` must do per
/// second on this core for the bf16 pairs to pay off against widening bf16
/// to f32 once as it is packed (the pairs also halve the bytes the products
/// read, but repack Q and P).
const DPBF16_MIN_GAIN: f64 = 1.25;

/// The environment variable that settles [`dpbf16_pays`] without timing.
pub const BF16_PAIRS_VAR: &str = "ATTNC_BF16_PAIRS";

/// Whether `vdpbf16ps` multiplies at least 1.25 times faster
/// than the f32 FMAs of AVX-512 on this core, measured once per process
/// (register-only loops, the best of several short runs of each, well under
/// a millisecond in all), unless the environment variable
/// `ATTNC_BF16_PAIRS` says `1` (yes) or `0` (no): a process that must agree
/// with another on the choice (the tests and the `attnc` they run) passes
/// its answer on. Cores differ: on a Zen 5 host the instruction does
/// twice the multiply-adds of an FMA, and a bf16 prefill ran 1.5x its f32
/// speed; on an Intel Xeon with AVX-512 BF16 (2026-12-08) it did 38 GMAC/s
/// against 82 for FMAs, and the same prefill ran at 0.62x the f32 speed.
pub fn dpbf16_pays() -> bool {
    static PAYS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PAYS.get_or_init(|| {
        if PairProducts::for_isa(super::NativeIsa::Avx512, false) != PairProducts::Dpbf16 {
            return false;
        }
        match std::env::var(BF16_PAIRS_VAR).as_deref() {
            Ok("1") => return true,
            Ok("0") => return false,
            Ok(other) => eprintln!(
                "attnc: {BF16_PAIRS_VAR}={other:?} is neither 1 nor 0; ignored (the bf16 pairs are chosen by timing them)"
            ),
            Err(_) => {}
        }
        #[cfg(target_arch = "x86_64")]
        {
            let fma = super::FmaPeak::native(super::NativeIsa::Avx512)
                .expect("AVX-512 was detected above");
            // SAFETY: `dpbf16_peak` implements `FmaPeakFn` with 32-lane
            // vectors of multiply-adds, on a CPU with AVX-512 BF16 (detected
            // above); it is a static function, so the owner keeps nothing.
            let dp = unsafe {
                super::FmaPeak::from_raw("dpbf16", dpbf16_peak, 32, std::sync::Arc::new(()))
            };
            let (iters, reps) = (2000, 9);
            // Both measured twice, alternating, the best of each kept: a
            // shared machine only ever makes a run slower.
            let (f1, d1) = (fma.measure(iters, reps), dp.measure(iters, reps));
            let (f2, d2) = (fma.measure(iters, reps), dp.measure(iters, reps));
            d1.max(d2) >= DPBF16_MIN_GAIN * f1.max(f2)
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::gemm::NativeIsa;
    use ndarray::Array2;

    fn rnd(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn round(x: f32) -> f64 {
        f64::from(bf16::from_f32(x).to_f32())
    }

    fn all_products() -> Vec<PairProducts> {
        let mut v: Vec<PairProducts> = NativeIsa::ALL
            .into_iter()
            .filter(|i| i.is_supported())
            .map(PairProducts::Widened)
            .collect();
        if PairProducts::for_isa(NativeIsa::Avx512, false) == PairProducts::Dpbf16 {
            v.push(PairProducts::Dpbf16);
        }
        v
    }

    #[test]
    fn packing_layouts() {
        let (keys, d) = (19, 5);
        let k = Array2::from_shape_fn((keys, d), |(j, c)| bf16::from_f32((j * 10 + c) as f32));
        let lay = PairsK { d, kv_len: keys };
        let mut dst = vec![u32::MAX; lay.len()];
        pack_k_pairs(k.view(), &mut dst);
        assert_eq!(lay.len(), 2 * 3 * 16);
        for j in 0..32 {
            for t in 0..3 {
                let x = dst[(j / 16) * 48 + t * 16 + j % 16];
                let want = |c: usize| {
                    if j < keys && c < d {
                        k[[j, c]].to_bits() as u32
                    } else {
                        0
                    }
                };
                assert_eq!(x, want(2 * t) | want(2 * t + 1) << 16, "key {j} pair {t}");
            }
        }
        let lay = PairsV { d, kv_len: keys };
        let mut dst = vec![u32::MAX; lay.len()];
        pack_v_pairs(k.view(), &mut dst);
        assert_eq!(lay.len(), 10 * 16);
        for u in 0..10 {
            for c in 0..16 {
                let want = |j: usize| {
                    if j < keys && c < d {
                        k[[j, c]].to_bits() as u32
                    } else {
                        0
                    }
                };
                assert_eq!(dst[u * 16 + c], want(2 * u) | want(2 * u + 1) << 16);
            }
        }
    }

    /// Every instruction set's pair products against f64 sums of the rounded
    /// operands, over shapes that hit every row and column tail.
    #[test]
    fn pair_products_match_f64_on_every_supported_isa() {
        for prod in all_products() {
            let (qk, pv, exact) = prod.kernels();
            for &(rows, cols, d) in &[
                (1, 1, 1),
                (7, 33, 3),
                (13, 64, 64),
                (64, 64, 128),
                (5, 17, 72),
                (9, 48, 130),
            ] {
                let q = rnd(rows * d, 1);
                let kf = rnd(cols * d, 2);
                let k = Array2::from_shape_fn((cols, d), |(j, c)| bf16::from_f32(kf[j * d + c]));
                let klay = PairsK { d, kv_len: cols };
                let mut kp = vec![0u32; klay.len()];
                pack_k_pairs(k.view(), &mut kp);
                let mut s = vec![f32::NAN; rows * cols];
                let scale = 0.3f32;
                // SAFETY: buffers sized by the layouts and shapes.
                unsafe {
                    qk(
                        q.as_ptr(),
                        d,
                        kp.as_ptr().cast(),
                        d,
                        rows,
                        cols,
                        s.as_mut_ptr(),
                        cols,
                        scale,
                    )
                };
                for r in 0..rows {
                    for c in 0..cols {
                        let want: f64 = (0..d)
                            .map(|t| round(q[r * d + t]) * f64::from(k[[c, t]].to_f32()))
                            .sum::<f64>()
                            * f64::from(scale);
                        let got = f64::from(s[r * cols + c]);
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()) * (d as f64).sqrt(),
                            "{} qk {rows}x{cols}x{d} [{r},{c}]: {got} vs {want}",
                            prod.name()
                        );
                    }
                }
                // P in [0, 1), some exact zeros; V with a NaN row at a zero probability for `exact`.
                let mut p: Vec<f32> = rnd(rows * cols, 3).iter().map(|x| x.abs()).collect();
                for r in 0..rows {
                    p[r * cols] = 0.0;
                }
                let vf = rnd(cols * d, 4);
                let mut v =
                    Array2::from_shape_fn((cols, d), |(j, c)| bf16::from_f32(vf[j * d + c]));
                let vlay = PairsV { d, kv_len: cols };
                let mut vp = vec![0u32; vlay.len()];
                pack_v_pairs(v.view(), &mut vp);
                let acc0 = rnd(rows * d, 5);
                let mut acc = acc0.clone();
                // SAFETY: as above.
                unsafe {
                    pv(
                        p.as_ptr(),
                        cols,
                        vp.as_ptr().cast(),
                        vlay.row_stride(),
                        d,
                        rows,
                        cols,
                        acc.as_mut_ptr(),
                        d,
                    )
                };
                let want = |v: &Array2<bf16>, r: usize, t: usize| -> f64 {
                    f64::from(acc0[r * d + t])
                        + (0..cols)
                            .filter(|&c| p[r * cols + c] != 0.0)
                            .map(|c| round(p[r * cols + c]) * f64::from(v[[c, t]].to_f32()))
                            .sum::<f64>()
                };
                for r in 0..rows {
                    for t in 0..d {
                        let w = want(&v, r, t);
                        let got = f64::from(acc[r * d + t]);
                        assert!(
                            (got - w).abs() <= 1e-5 * (1.0 + w.abs()) * (cols as f64).sqrt(),
                            "{} pv {rows}x{cols}x{d} [{r},{t}]: {got} vs {w}",
                            prod.name()
                        );
                    }
                }
                // Key 0 has probability 0 in every row: a NaN V there stays out.
                for t in 0..d {
                    v[[0, t]] = bf16::NAN;
                }
                pack_v_pairs(v.view(), &mut vp);
                let mut acc = acc0.clone();
                // SAFETY: as above.
                unsafe {
                    exact(
                        p.as_ptr(),
                        cols,
                        vp.as_ptr().cast(),
                        vlay.row_stride(),
                        d,
                        rows,
                        cols,
                        acc.as_mut_ptr(),
                        d,
                    )
                };
                for r in 0..rows {
                    for t in 0..d {
                        let w = want(&v, r, t);
                        let got = f64::from(acc[r * d + t]);
                        assert!(
                            (got - w).abs() <= 1e-5 * (1.0 + w.abs()) * (cols as f64).sqrt(),
                            "{} exact pv [{r},{t}]: {got} vs {w}",
                            prod.name()
                        );
                    }
                }
            }
        }
    }

    /// Staging rounds to nearest even, on every instruction set; a NaN stays
    /// NaN. (Subnormals are not compared: `vcvtne2ps2bf16` flushes them.)
    #[test]
    fn staging_rounds_to_nearest_even() {
        let xs: Vec<f32> = vec![
            1.0,
            f32::from_bits(0x3f80_8000), // a tie: rounds to even (1.0)
            f32::from_bits(0x3f81_8000), // a tie: rounds up to even
            f32::from_bits(0x3f80_8001),
            -0.0,
            0.1,
            -3.3e38,
            1e-30,
            7.0,
        ];
        let d = xs.len();
        // One key per dimension: S[0][c] = bf16(q[c]) (scale 1, K the identity).
        let eye =
            Array2::from_shape_fn((d, d), |(j, c)| bf16::from_f32(f32::from(u8::from(j == c))));
        let lay = PairsK { d, kv_len: d };
        let mut kp = vec![0u32; lay.len()];
        pack_k_pairs(eye.view(), &mut kp);
        for prod in all_products() {
            let (qk, _, _) = prod.kernels();
            let mut s = vec![0f32; d];
            // SAFETY: sized by the layout.
            unsafe {
                qk(
                    xs.as_ptr(),
                    d,
                    kp.as_ptr().cast(),
                    d,
                    1,
                    d,
                    s.as_mut_ptr(),
                    d,
                    1.0,
                )
            };
            for (c, &x) in xs.iter().enumerate() {
                assert_eq!(
                    s[c],
                    bf16::from_f32(x).to_f32(),
                    "{} stage {x}",
                    prod.name()
                );
            }
            let mut nan = xs.clone();
            nan[3] = f32::NAN;
            // SAFETY: as above.
            unsafe {
                qk(
                    nan.as_ptr(),
                    d,
                    kp.as_ptr().cast(),
                    d,
                    1,
                    d,
                    s.as_mut_ptr(),
                    d,
                    1.0,
                )
            };
            assert!(s[3].is_nan(), "{}: a NaN query stays NaN", prod.name());
        }
    }
}
