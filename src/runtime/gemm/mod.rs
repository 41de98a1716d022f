//! The two tile products of FlashAttention-2 on the CPU, and the online-softmax step,
//! as native micro-kernels behind C-ABI function pointers.
//!
//! Consumes packed K/V (built here by [`pack_k`] / [`pack_v`], once per call and
//! (batch, kv-head)) and row-major tiles; produces score tiles and accumulator updates.
//! JIT'd kernels call these through the pointers in [`TileKernels`] (registered with
//! `JITBuilder::symbol` under [`TileKernels::symbols`]), so everything spec-specific
//! stays in generated code and only the dense tile work lives here.
//!
//! # Layouts
//!
//! * Packed K ([`PackedK`]): panels of [`PANEL`] = 16 keys, `[n_panels][d][PANEL]`:
//!   key `j`, dimension `c` sits at `(j / 16) * d * 16 + c * 16 + j % 16`. Keys past
//!   `kv_len` in the last panel are zero. A `qk` tile must start at a key that is a
//!   multiple of 16, and its `k` pointer is the start of that key's panel.
//! * Packed V ([`PackedV`]): row-major `[kv_len][row_stride]` with
//!   `row_stride = round_up(d, 16)`; columns past `d` are zero (kernels load whole
//!   vectors of V rows). A `pv` tile may start at any key.
//! * Q, S, P and the accumulator are row-major with a row stride in elements.
//!
//! # Kernels (all strides and sizes in f32 elements)
//!
//! * [`QkFn`] `qk(q, q_stride, k, d, rows, cols, s, s_stride, scale)`:
//!   `S[r][c] = scale · Σ_t Q[r][t] · K[c][t]` for `r < rows`, `c < cols`; S entries
//!   past `cols` are not written.
//! * [`PvFn`] `pv(p, p_stride, v, v_stride, d, rows, cols, acc, acc_stride)`:
//!   `Acc[r][t] += Σ_c P[r][c] · V[c][t]` for `r < rows`, `t < d`, over keys `c < cols`.
//! * [`SoftmaxUpdateFn`] `softmax_update(s, s_stride, rows, cols, m, l, acc,
//!   acc_stride, d, base2)`: one FlashAttention-2 step, see its docs.
//!
//! Any `d >= 1`, `rows >= 0` and `cols >= 0` is allowed; the fast paths are full
//! register tiles (AVX-512: 6 rows x 64 columns; AVX2: 6 x 16; portable: 2 x 16 for
//! `qk`, 4 x 8 for `pv`).

mod kernels;
pub mod math;
pub mod pairs;
mod simd;
pub mod view;

use ndarray::ArrayView2;
use std::any::Any;
use std::fmt;
use std::sync::Arc;

/// Keys per packed K panel (and the column granularity of packed V rows).
pub const PANEL: usize = 16;

/// `S = scale · Q · Kᵀ` on one tile; see the module docs for the layouts.
///
/// # Safety
///
/// `q` must be valid for reading `rows` rows of `d` elements at stride `q_stride`;
/// `k` for `ceil(cols / 16)` packed panels of `d · 16` elements; `s` for writing
/// `rows` rows of `cols` elements at stride `s_stride`.
pub type QkFn = unsafe extern "C" fn(
    q: *const f32,
    q_stride: usize,
    k: *const f32,
    d: usize,
    rows: usize,
    cols: usize,
    s: *mut f32,
    s_stride: usize,
    scale: f32,
);

/// `Acc += P · V` on one tile; see the module docs for the layouts.
///
/// # Safety
///
/// `p` must be valid for reading `rows` rows of `cols` elements at stride `p_stride`;
/// `v` for `cols` rows of `round_up(d, 16)` elements at stride `v_stride`; `acc` for
/// reading and writing `rows` rows of `d` elements at stride `acc_stride`.
pub type PvFn = unsafe extern "C" fn(
    p: *const f32,
    p_stride: usize,
    v: *const f32,
    v_stride: usize,
    d: usize,
    rows: usize,
    cols: usize,
    acc: *mut f32,
    acc_stride: usize,
);

/// One online-softmax step over a score tile that is already scaled, score-modded and
/// masked (masked entries `-inf`), for each row `r < rows`:
///
/// ```text
/// m_new  = max(m[r], max_c S[r][c])
/// alpha  = e^(m[r] - m_new)                 (0 when m[r] = -inf)
/// P[r][c] = e^(S[r][c] - m_new)             (written over S; 0 for S = -inf)
/// l[r]   = l[r] · alpha + Σ_c P[r][c]
/// Acc[r][..d] *= alpha                      (skipped when alpha = 1)
/// m[r]   = m_new
/// ```
///
/// `e` is `exp` when `base2 == 0` and `2^x` otherwise (scores in log2 units). A row
/// whose scores are all `-inf` so far keeps `m = -inf`, `l = 0`, `P = 0`. A NaN score
/// makes its row's `l` NaN; a `+inf` score gives NaN probabilities. The exponential
/// is accurate to 2 ulp for results above `2^-126` and flushes smaller ones to zero.
///
/// # Safety
///
/// `s` must be valid for reading and writing `rows` rows of `cols` elements at stride
/// `s_stride`; `m` and `l` for `rows` elements; `acc` for `rows` rows of `d` elements at
/// stride `acc_stride`.
pub type SoftmaxUpdateFn = unsafe extern "C" fn(
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
);

/// The layout of one packed K head: `[n_panels][d][PANEL]`, zero-padded keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedK {
    /// Head dimension.
    pub d: usize,
    /// Number of keys.
    pub kv_len: usize,
}

impl PackedK {
    /// Number of panels, `ceil(kv_len / PANEL)`.
    pub fn n_panels(&self) -> usize {
        self.kv_len.div_ceil(PANEL)
    }
    /// Elements per panel, `d · PANEL`.
    pub fn panel_stride(&self) -> usize {
        self.d * PANEL
    }
    /// Total elements of the packed head.
    pub fn len(&self) -> usize {
        self.n_panels() * self.panel_stride()
    }
    /// Whether the packed head holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Element offset of the panel holding `key`; a `qk` tile starting at `key` (a
    /// multiple of [`PANEL`]) takes its `k` pointer here.
    pub fn tile_offset(&self, key: usize) -> usize {
        debug_assert!(
            key.is_multiple_of(PANEL),
            "qk tiles start at multiples of {PANEL}"
        );
        (key / PANEL) * self.panel_stride()
    }
    /// Element offset of key `key`, dimension `c`.
    pub fn offset(&self, key: usize, c: usize) -> usize {
        self.tile_offset(key - key % PANEL) + c * PANEL + key % PANEL
    }
}

/// The layout of one packed V head: `[kv_len][row_stride]`, zero-padded columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedV {
    /// Head dimension.
    pub d: usize,
    /// Number of keys.
    pub kv_len: usize,
}

impl PackedV {
    /// Elements per row, `round_up(d, PANEL)`; the `v_stride` argument of `pv`.
    pub fn row_stride(&self) -> usize {
        self.d.div_ceil(PANEL) * PANEL
    }
    /// Total elements of the packed head.
    pub fn len(&self) -> usize {
        self.kv_len * self.row_stride()
    }
    /// Whether the packed head holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Element offset of key `key`'s row; a `pv` tile starting at `key` takes its `v`
    /// pointer here.
    pub fn tile_offset(&self, key: usize) -> usize {
        key * self.row_stride()
    }
}

/// A destination buffer of the wrong size for a packed layout.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("packed buffer has {found} elements, the layout needs {expected}")]
pub struct PackError {
    /// Elements the layout needs.
    pub expected: usize,
    /// Elements the buffer has.
    pub found: usize,
}

/// Packs one K head (`[kv_len, d]`, any strides) into `dst` in the [`PackedK`] layout,
/// overwriting all of `dst` (padding included).
pub fn pack_k(k: ArrayView2<f32>, dst: &mut [f32]) -> Result<PackedK, PackError> {
    let (kv_len, d) = k.dim();
    let layout = PackedK { d, kv_len };
    if dst.len() != layout.len() {
        return Err(PackError {
            expected: layout.len(),
            found: dst.len(),
        });
    }
    // Full contiguous panels go through 8 x 8 transposes where the CPU has AVX.
    #[cfg(target_arch = "x86_64")]
    let avx = std::arch::is_x86_feature_detected!("avx");
    for (panel_idx, panel) in dst
        .chunks_exact_mut(layout.panel_stride().max(1))
        .enumerate()
    {
        let key0 = panel_idx * PANEL;
        let n_keys = PANEL.min(kv_len - key0);
        let mut slices: [&[f32]; PANEL] = [&[]; PANEL];
        let mut contiguous = true;
        for (j, slot) in slices.iter_mut().enumerate().take(n_keys) {
            match k.row(key0 + j).to_slice() {
                Some(row) => *slot = row,
                None => contiguous = false,
            }
        }
        #[cfg(target_arch = "x86_64")]
        if avx && contiguous && n_keys == PANEL {
            // SAFETY: AVX was detected; the 16 rows hold `d` floats each and the
            // panel `16·d`.
            unsafe { kernels::pack_k_panel_avx(&slices, d, panel) };
            continue;
        }
        if contiguous {
            // Key by key: sequential reads, stores strided by one panel row (in L1).
            for (j, row) in slices[..n_keys].iter().enumerate() {
                for (out, &x) in panel.chunks_exact_mut(PANEL).zip(row.iter()) {
                    out[j] = x;
                }
            }
        } else {
            for (c, out) in panel.chunks_exact_mut(PANEL).enumerate() {
                for (j, o) in out.iter_mut().enumerate().take(n_keys) {
                    *o = k[[key0 + j, c]];
                }
            }
        }
        if n_keys < PANEL {
            for out in panel.chunks_exact_mut(PANEL) {
                out[n_keys..].fill(0.0);
            }
        }
    }
    Ok(layout)
}

/// Packs one V head (`[kv_len, d]`, any strides) into `dst` in the [`PackedV`] layout,
/// overwriting all of `dst` (padding included).
pub fn pack_v(v: ArrayView2<f32>, dst: &mut [f32]) -> Result<PackedV, PackError> {
    let (kv_len, d) = v.dim();
    let layout = PackedV { d, kv_len };
    if dst.len() != layout.len() {
        return Err(PackError {
            expected: layout.len(),
            found: dst.len(),
        });
    }
    for (row, out) in v
        .outer_iter()
        .zip(dst.chunks_exact_mut(layout.row_stride().max(1)))
    {
        match row.as_slice() {
            Some(src) => out[..d].copy_from_slice(src),
            None => out[..d]
                .iter_mut()
                .zip(row.iter())
                .for_each(|(o, &x)| *o = x),
        }
        out[d..].fill(0.0);
    }
    Ok(layout)
}

/// Marks every tile of `tile` keys of one V head (`[kv_len, d]`, any strides) that
/// holds a non-finite value (NaN or ±inf): `out[t]` is 1 for such a tile, else 0.
///
/// The tile products compute `Acc += P · V` as dense products, where a key whose
/// probability is 0 (masked, or past the end of the row's visible keys) still
/// multiplies its V row, and `0 × NaN` is NaN. A task therefore takes
/// [`pv_exact`] on the tiles marked here, and the fast product elsewhere.
///
/// With `only`, tiles `t` where `only[t]` is false are not read and get 0.
///
/// # Panics
///
/// If `out` (or `only`) does not hold exactly `ceil(kv_len / tile)` flags or `tile`
/// is 0.
pub fn nonfinite_tiles<T: crate::tensor::MagnitudeBits>(
    v: ArrayView2<T>,
    tile: usize,
    only: Option<&[bool]>,
    out: &mut [u8],
) {
    assert!(tile > 0, "tiles hold at least one key");
    assert_eq!(out.len(), v.nrows().div_ceil(tile), "one flag per tile");
    let worst = crate::tensor::max_magnitude_bits::<T>;
    if let Some(only) = only {
        assert_eq!(only.len(), out.len(), "one choice per tile");
    }
    for (t, flag) in out.iter_mut().enumerate() {
        if only.is_some_and(|only| !only[t]) {
            *flag = 0;
            continue;
        }
        let end = v.nrows().min((t + 1) * tile);
        let bits = (t * tile..end).fold(0u32, |a, key| a.max(worst(v.row(key))));
        *flag = u8::from(bits >= 0x7f80_0000);
    }
}

/// `Acc += P · V` over the keys whose probability is not zero, with the ABI and
/// layouts of [`PvFn`]: a key with `P = 0` never touches the accumulator, so a NaN
/// or infinite V row of a masked key cannot reach it (in the dense products
/// `0 × NaN` is NaN). Slower than the tile products; tasks call it only on the
/// tiles [`nonfinite_tiles`] marks.
///
/// # Safety
///
/// As for [`PvFn`].
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
    for r in 0..rows {
        // SAFETY: the caller guarantees `rows` rows of `d` accumulators at `acc_stride`
        // and of `cols` probabilities at `p_stride`, and `cols` V rows of at least `d`.
        let a = std::slice::from_raw_parts_mut(acc.add(r * acc_stride), d);
        for c in 0..cols {
            let pc = *p.add(r * p_stride + c);
            if pc == 0.0 {
                continue;
            }
            let vrow = std::slice::from_raw_parts(v.add(c * v_stride), d);
            for (x, &y) in a.iter_mut().zip(vrow) {
                *x += pc * y;
            }
        }
    }
}

/// The instruction sets the native kernels are built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NativeIsa {
    /// AVX-512F (x86-64).
    Avx512,
    /// AVX2 with FMA (x86-64).
    Avx2,
    /// Plain Rust on arrays of four lanes, auto-vectorised for the baseline target.
    Portable,
}

impl NativeIsa {
    /// All instruction sets, fastest first.
    pub const ALL: [NativeIsa; 3] = [NativeIsa::Avx512, NativeIsa::Avx2, NativeIsa::Portable];

    /// The fastest instruction set this CPU supports.
    pub fn detect() -> NativeIsa {
        Self::ALL
            .into_iter()
            .find(|isa| isa.is_supported())
            .unwrap_or(NativeIsa::Portable)
    }

    /// Whether this CPU can run the kernels of `self`.
    pub fn is_supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            NativeIsa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            NativeIsa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            NativeIsa::Portable => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The name used in options and reports: `avx512`, `avx2`, `portable`.
    pub fn name(self) -> &'static str {
        match self {
            NativeIsa::Avx512 => "avx512",
            NativeIsa::Avx2 => "avx2",
            NativeIsa::Portable => "portable",
        }
    }
}

impl fmt::Display for NativeIsa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An instruction set this CPU lacks.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("this CPU does not support the `{0}` kernels; use `portable` or let attnc detect the instruction set")]
pub struct UnsupportedIsa(pub NativeIsa);

/// Symbol names under which JIT'd code imports the tile kernels.
pub mod symbol {
    /// The [`super::QkFn`] symbol.
    pub const QK: &str = "attnc_tile_qk";
    /// The [`super::PvFn`] symbol.
    pub const PV: &str = "attnc_tile_pv";
    /// The [`super::SoftmaxUpdateFn`] symbol.
    pub const SOFTMAX_UPDATE: &str = "attnc_tile_softmax_update";
}

/// `fma_peak(iters, out)`: `iters` rounds of [`FmaPeak::CHAINS`] independent vector
/// FMAs on registers only, storing a value that depends on all of them to `out`.
pub type FmaPeakFn = unsafe extern "C" fn(iters: usize, out: *mut f32);

/// A register-only FMA loop at the vector width of one tile-product implementation:
/// the FMA peak those products could reach on this core at the moment it is measured.
/// The machine's speed changes from minute to minute when it is shared, so
/// efficiencies are measured against a peak taken right beside the work.
#[derive(Clone)]
pub struct FmaPeak {
    f: FmaPeakFn,
    lanes: usize,
    name: String,
    _code: Option<Arc<dyn Any + Send + Sync>>,
}

impl fmt::Debug for FmaPeak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FmaPeak")
            .field("name", &self.name)
            .field("lanes", &self.lanes)
            .finish()
    }
}

impl FmaPeak {
    /// Independent FMA chains per round.
    pub const CHAINS: usize = kernels::PEAK_CHAINS;

    /// The loop at the vector width of the native kernels for `isa`.
    pub fn native(isa: NativeIsa) -> Result<FmaPeak, UnsupportedIsa> {
        if !isa.is_supported() {
            return Err(UnsupportedIsa(isa));
        }
        let (f, lanes): (FmaPeakFn, usize) = match isa {
            #[cfg(target_arch = "x86_64")]
            NativeIsa::Avx512 => (kernels::fma_peak_avx512, 16),
            #[cfg(target_arch = "x86_64")]
            NativeIsa::Avx2 => (kernels::fma_peak_avx2, 8),
            #[allow(unreachable_patterns)]
            _ => (kernels::fma_peak_portable, 4),
        };
        Ok(FmaPeak {
            f,
            lanes,
            name: format!("native-{isa}"),
            _code: None,
        })
    }

    /// A loop from other code (JIT-generated) over `lanes`-wide vectors, kept alive
    /// by `owner`.
    ///
    /// # Safety
    ///
    /// `f` must implement the contract of [`FmaPeakFn`] with `lanes`-lane vectors and
    /// stay valid while `owner` lives.
    pub unsafe fn from_raw(
        name: impl Into<String>,
        f: FmaPeakFn,
        lanes: usize,
        owner: Arc<dyn Any + Send + Sync>,
    ) -> FmaPeak {
        FmaPeak {
            f,
            lanes,
            name: name.into(),
            _code: Some(owner),
        }
    }

    /// The implementation measured, such as `native-avx2` or `jit-f32x4`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// GFLOP/s of this thread: the best of `reps` timed runs of `iters` rounds each
    /// (the best, because a shared machine only ever makes a run slower).
    pub fn measure(&self, iters: usize, reps: usize) -> f64 {
        let mut out = 0.0f32;
        let mut best = f64::INFINITY;
        for _ in 0..reps.max(1) {
            let t = std::time::Instant::now();
            // SAFETY: `f` implements `FmaPeakFn` (checked at construction) and `out` is
            // a valid f32.
            unsafe { (self.f)(iters, &mut out) };
            best = best.min(t.elapsed().as_secs_f64());
        }
        std::hint::black_box(out);
        (iters * Self::CHAINS * self.lanes * 2) as f64 / best.max(1e-12) / 1e9
    }
}

/// One implementation of the tile operations: function pointers with the C ABI, plus
/// whatever owns their code (for JIT-generated kernels).
#[derive(Clone)]
pub struct TileKernels {
    /// The `qk` kernel.
    pub qk: QkFn,
    /// The `pv` kernel.
    pub pv: PvFn,
    /// The online-softmax step.
    pub softmax_update: SoftmaxUpdateFn,
    name: String,
    _code: Option<Arc<dyn Any + Send + Sync>>,
}

impl fmt::Debug for TileKernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TileKernels")
            .field("name", &self.name)
            .finish()
    }
}

/// A tile operation called with slices too short for its sizes and strides.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{operand} of {op} has {found} elements, the sizes and strides need {needed}")]
pub struct TileBoundsError {
    /// The operation.
    pub op: &'static str,
    /// The operand.
    pub operand: &'static str,
    /// Elements the call needs.
    pub needed: usize,
    /// Elements given.
    pub found: usize,
}

/// Elements spanned by `rows` rows of `width` at `stride` (0 when empty).
fn span(rows: usize, width: usize, stride: usize) -> usize {
    if rows == 0 || width == 0 {
        0
    } else {
        (rows - 1) * stride + width
    }
}

fn check(
    op: &'static str,
    operand: &'static str,
    needed: usize,
    found: usize,
) -> Result<(), TileBoundsError> {
    if found < needed {
        Err(TileBoundsError {
            op,
            operand,
            needed,
            found,
        })
    } else {
        Ok(())
    }
}

impl TileKernels {
    /// The native kernels for `isa`.
    pub fn native(isa: NativeIsa) -> Result<TileKernels, UnsupportedIsa> {
        if !isa.is_supported() {
            return Err(UnsupportedIsa(isa));
        }
        let (qk, pv, softmax_update): (QkFn, PvFn, SoftmaxUpdateFn) = match isa {
            #[cfg(target_arch = "x86_64")]
            NativeIsa::Avx512 => (
                kernels::qk_avx512,
                kernels::pv_avx512,
                kernels::softmax_update_avx512,
            ),
            #[cfg(target_arch = "x86_64")]
            NativeIsa::Avx2 => (
                kernels::qk_avx2,
                kernels::pv_avx2,
                kernels::softmax_update_avx2,
            ),
            #[allow(unreachable_patterns)]
            _ => (
                kernels::qk_portable,
                kernels::pv_portable,
                kernels::softmax_update_portable,
            ),
        };
        Ok(TileKernels {
            qk,
            pv,
            softmax_update,
            name: format!("native-{isa}"),
            _code: None,
        })
    }

    /// The native kernels for the fastest instruction set of this CPU.
    pub fn native_detected() -> TileKernels {
        Self::native(NativeIsa::detect()).expect("the detected instruction set is supported")
    }

    /// Kernels from other code (JIT-generated), kept alive by `owner` for as long as any
    /// clone of the result exists.
    ///
    /// # Safety
    ///
    /// The pointers must implement the contracts of [`QkFn`], [`PvFn`] and
    /// [`SoftmaxUpdateFn`] and stay valid while `owner` lives.
    pub unsafe fn from_raw(
        name: impl Into<String>,
        qk: QkFn,
        pv: PvFn,
        softmax_update: SoftmaxUpdateFn,
        owner: Arc<dyn Any + Send + Sync>,
    ) -> TileKernels {
        TileKernels {
            qk,
            pv,
            softmax_update,
            name: name.into(),
            _code: Some(owner),
        }
    }

    /// A short name such as `native-avx512` or `jit-f32x4`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `(symbol name, address)` pairs for `JITBuilder::symbol`.
    pub fn symbols(&self) -> [(&'static str, *const u8); 3] {
        [
            (symbol::QK, self.qk as *const u8),
            (symbol::PV, self.pv as *const u8),
            (symbol::SOFTMAX_UPDATE, self.softmax_update as *const u8),
        ]
    }

    /// Bounds-checked [`QkFn`]: `k` starts at the tile's first panel.
    #[allow(clippy::too_many_arguments)]
    pub fn qk(
        &self,
        q: &[f32],
        q_stride: usize,
        k: &[f32],
        d: usize,
        rows: usize,
        cols: usize,
        s: &mut [f32],
        s_stride: usize,
        scale: f32,
    ) -> Result<(), TileBoundsError> {
        check("qk", "q", span(rows, d, q_stride), q.len())?;
        check("qk", "k", cols.div_ceil(PANEL) * d * PANEL, k.len())?;
        check("qk", "s", span(rows, cols, s_stride), s.len())?;
        if rows > 1 {
            check("qk", "q_stride", d, q_stride)?;
            check("qk", "s_stride", cols, s_stride)?;
        }
        // SAFETY: the checks above cover every element the kernel touches.
        unsafe {
            (self.qk)(
                q.as_ptr(),
                q_stride,
                k.as_ptr(),
                d,
                rows,
                cols,
                s.as_mut_ptr(),
                s_stride,
                scale,
            )
        };
        Ok(())
    }

    /// Bounds-checked [`PvFn`]: `v` starts at the tile's first key row.
    #[allow(clippy::too_many_arguments)]
    pub fn pv(
        &self,
        p: &[f32],
        p_stride: usize,
        v: &[f32],
        v_stride: usize,
        d: usize,
        rows: usize,
        cols: usize,
        acc: &mut [f32],
        acc_stride: usize,
    ) -> Result<(), TileBoundsError> {
        let d_pad = d.div_ceil(PANEL) * PANEL;
        check("pv", "p", span(rows, cols, p_stride), p.len())?;
        check("pv", "v", span(cols, d_pad, v_stride), v.len())?;
        check("pv", "acc", span(rows, d, acc_stride), acc.len())?;
        if rows > 1 {
            check("pv", "p_stride", cols, p_stride)?;
            check("pv", "acc_stride", d, acc_stride)?;
        }
        if cols > 1 {
            check("pv", "v_stride", d_pad, v_stride)?;
        }
        // SAFETY: the checks above cover every element the kernel touches.
        unsafe {
            (self.pv)(
                p.as_ptr(),
                p_stride,
                v.as_ptr(),
                v_stride,
                d,
                rows,
                cols,
                acc.as_mut_ptr(),
                acc_stride,
            )
        };
        Ok(())
    }

    /// Bounds-checked [`SoftmaxUpdateFn`].
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_update(
        &self,
        s: &mut [f32],
        s_stride: usize,
        rows: usize,
        cols: usize,
        m: &mut [f32],
        l: &mut [f32],
        acc: &mut [f32],
        acc_stride: usize,
        d: usize,
        base2: bool,
    ) -> Result<(), TileBoundsError> {
        check("softmax_update", "s", span(rows, cols, s_stride), s.len())?;
        check("softmax_update", "m", rows, m.len())?;
        check("softmax_update", "l", rows, l.len())?;
        check(
            "softmax_update",
            "acc",
            span(rows, d, acc_stride),
            acc.len(),
        )?;
        if rows > 1 {
            check("softmax_update", "s_stride", cols, s_stride)?;
            check("softmax_update", "acc_stride", d, acc_stride)?;
        }
        // SAFETY: the checks above cover every element the kernel touches.
        unsafe {
            (self.softmax_update)(
                s.as_mut_ptr(),
                s_stride,
                rows,
                cols,
                m.as_mut_ptr(),
                l.as_mut_ptr(),
                acc.as_mut_ptr(),
                acc_stride,
                d,
                base2 as u32,
            )
        };
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod testing;

#[cfg(test)]
mod tests {
    use super::testing::{check_online_softmax, check_pv, check_qk, shapes, ulp_error, Rng};
    use super::*;
    use ndarray::{s, Array2};

    fn supported() -> Vec<TileKernels> {
        NativeIsa::ALL
            .into_iter()
            .filter(|isa| {
                let ok = isa.is_supported();
                if !ok {
                    eprintln!("note: this CPU lacks {isa}; its kernels are not run here");
                }
                ok
            })
            .map(|isa| TileKernels::native(isa).unwrap())
            .collect()
    }

    #[test]
    fn pack_k_layout_and_padding() {
        let mut rng = Rng::new(1);
        // Full panels (the transposing path where the CPU has it) and a ragged last
        // one; head dims below, at and past multiples of 8.
        for (kv, d) in [(37, 7), (37, 8), (40, 19), (33, 64)] {
            let k = rng.matrix(kv, d);
            let layout = PackedK { d, kv_len: kv };
            assert_eq!(layout.n_panels(), kv.div_ceil(PANEL));
            let mut dst = vec![f32::NAN; layout.len()];
            assert_eq!(pack_k(k.view(), &mut dst).unwrap(), layout);
            for key in 0..layout.n_panels() * PANEL {
                for c in 0..d {
                    let want = if key < kv { k[[key, c]] } else { 0.0 };
                    assert_eq!(
                        dst[layout.offset(key, c)],
                        want,
                        "kv={kv} d={d} ({key}, {c})"
                    );
                }
            }
        }
        // A non-contiguous view (every other column) packs the same as a copy.
        let wide = rng.matrix(20, 10);
        let view = wide.slice(s![.., ..;2]);
        let copy = view.to_owned();
        let layout = PackedK { d: 5, kv_len: 20 };
        let (mut a, mut b) = (vec![0.0; layout.len()], vec![1.0; layout.len()]);
        pack_k(view, &mut a).unwrap();
        pack_k(copy.view(), &mut b).unwrap();
        assert_eq!(a, b);
        let err = pack_k(copy.view(), &mut [0.0; 3]).unwrap_err();
        assert_eq!(
            err,
            PackError {
                expected: layout.len(),
                found: 3
            }
        );
        assert!(err.to_string().contains("needs 160"));
    }

    #[test]
    fn pack_v_layout_and_padding() {
        let mut rng = Rng::new(2);
        let v = rng.matrix(5, 20);
        let layout = PackedV { d: 20, kv_len: 5 };
        assert_eq!(layout.row_stride(), 32);
        let mut dst = vec![f32::NAN; layout.len()];
        pack_v(v.view(), &mut dst).unwrap();
        for key in 0..5 {
            for c in 0..32 {
                let want = if c < 20 { v[[key, c]] } else { 0.0 };
                assert_eq!(dst[layout.tile_offset(key) + c], want);
            }
        }
        let transposed = Array2::from_shape_fn((20, 5), |(i, j)| v[[j, i]]);
        let mut dst2 = vec![0.0; layout.len()];
        pack_v(transposed.t(), &mut dst2).unwrap();
        assert_eq!(dst, dst2);
        assert!(pack_v(v.view(), &mut []).is_err());
    }

    #[test]
    fn qk_matches_f64_on_every_supported_isa() {
        for kernels in supported() {
            let mut rng = Rng::new(3);
            for (d, rows, cols) in shapes() {
                check_qk(&kernels, d, rows, cols, &mut rng);
            }
        }
    }

    #[test]
    fn pv_matches_f64_on_every_supported_isa() {
        for kernels in supported() {
            let mut rng = Rng::new(4);
            for (d, rows, cols) in shapes() {
                check_pv(&kernels, d, rows, cols, &mut rng);
            }
        }
    }

    /// The peak loops run and report a positive, finite rate for every supported
    /// instruction set (their speed is measured by the benchmarks, not asserted).
    #[test]
    fn fma_peak_loops_run_on_every_supported_isa() {
        for isa in NativeIsa::ALL {
            match FmaPeak::native(isa) {
                Ok(peak) => {
                    let gflops = peak.measure(1000, 2);
                    assert!(gflops.is_finite() && gflops > 0.0, "{isa}: {gflops}");
                    assert_eq!(peak.name(), format!("native-{isa}"));
                }
                Err(e) => assert!(!isa.is_supported(), "{e}"),
            }
        }
    }

    #[test]
    fn online_softmax_matches_dense_softmax() {
        for kernels in supported() {
            let mut rng = Rng::new(5);
            for &d in &[7usize, 16, 64, 80] {
                // Whole and partial groups of rows for every vector width.
                for &rows in &[1usize, 5, 9, 16, 23] {
                    check_online_softmax(&kernels, d, rows, false, &mut rng);
                    check_online_softmax(&kernels, d, rows, true, &mut rng);
                }
            }
        }
    }

    #[test]
    fn softmax_update_special_values() {
        for kernels in supported() {
            // Row 0 fully masked: stays m = -inf, l = 0, P = 0, acc untouched (alpha = 0
            // times zeros). Row 1 has a NaN score: l becomes NaN.
            let cols = 19;
            let mut s = vec![f32::NEG_INFINITY; 2 * cols];
            s[cols + 3] = f32::NAN;
            s[cols + 4] = 1.0;
            let mut m = vec![f32::NEG_INFINITY; 2];
            let mut l = vec![0.0; 2];
            let mut acc = vec![0.0; 2 * 3];
            kernels
                .softmax_update(&mut s, cols, 2, cols, &mut m, &mut l, &mut acc, 3, 3, false)
                .unwrap();
            assert_eq!(m[0], f32::NEG_INFINITY, "{}", kernels.name());
            assert_eq!(l[0], 0.0);
            assert!(s[..cols].iter().all(|&p| p == 0.0));
            assert!(
                l[1].is_nan(),
                "{}: a NaN score poisons its row",
                kernels.name()
            );
            assert_eq!(acc, vec![0.0; 6]);
        }
    }

    #[test]
    fn nonfinite_tiles_marks_exactly_the_tiles_holding_nan_or_inf() {
        let mut v = ndarray::Array2::<f32>::from_elem((70, 5), 1.0e30);
        v[[17, 4]] = f32::NAN;
        v[[48, 0]] = f32::NEG_INFINITY;
        v[[69, 2]] = f32::INFINITY;
        v[[33, 1]] = f32::MAX;
        let mut flags = vec![9u8; 5];
        nonfinite_tiles(v.view(), 16, None, &mut flags);
        assert_eq!(flags, [0, 1, 0, 1, 1]);
        // Tiles left out are not read.
        nonfinite_tiles(
            v.view(),
            16,
            Some(&[true, false, true, true, false]),
            &mut flags,
        );
        assert_eq!(flags, [0, 0, 0, 1, 0]);
        // Strided rows (a transposed view) take the element-by-element path.
        let t = v.t().to_owned();
        let mut flags = vec![9u8; 3];
        nonfinite_tiles(t.t(), 32, None, &mut flags);
        assert_eq!(flags, [1, 1, 1]);
    }

    #[test]
    fn pv_exact_skips_keys_of_probability_zero() {
        // Key 1 is NaN and key 2 inf in V; row 0 gives them probability 0, row 1
        // sees key 2 only.
        let (d, stride) = (3, 16);
        let mut v = vec![0.0f32; 3 * stride];
        v[..d].copy_from_slice(&[1.0, 2.0, 3.0]);
        v[stride..stride + d].fill(f32::NAN);
        v[2 * stride..2 * stride + d].copy_from_slice(&[f32::INFINITY, 0.0, -1.0]);
        let p = [0.5f32, 0.0, 0.0, 0.0, 0.0, 0.25];
        let mut acc = vec![1.0f32; 2 * d];
        // SAFETY: the slices hold every element the ABI reads and writes.
        unsafe {
            pv_exact(
                p.as_ptr(),
                3,
                v.as_ptr(),
                stride,
                d,
                2,
                3,
                acc.as_mut_ptr(),
                d,
            );
        }
        assert_eq!(&acc[..d], &[1.5, 2.0, 2.5]);
        assert_eq!(&acc[d..], &[f32::INFINITY, 1.0, 0.75]);
    }

    #[test]
    fn bounds_are_checked() {
        let kernels = TileKernels::native(NativeIsa::Portable).unwrap();
        let mut s = vec![0.0; 10];
        let err = kernels
            .qk(&[0.0; 4], 4, &[0.0; 64], 4, 2, 5, &mut s, 5, 1.0)
            .unwrap_err();
        assert_eq!(err.operand, "q");
        assert!(err.to_string().contains("q of qk has 4 elements"));
        let mut acc = vec![0.0; 4];
        let err = kernels
            .pv(&[0.0; 2], 2, &[0.0; 16], 16, 4, 1, 2, &mut acc, 4)
            .unwrap_err();
        assert_eq!(err.operand, "v");
    }

    #[test]
    fn detection_and_unsupported_isas() {
        let detected = NativeIsa::detect();
        assert!(detected.is_supported());
        assert!(TileKernels::native_detected()
            .name()
            .ends_with(detected.name()));
        for isa in NativeIsa::ALL {
            match TileKernels::native(isa) {
                Ok(k) => assert_eq!(k.name(), format!("native-{isa}")),
                Err(e) => {
                    assert!(!isa.is_supported());
                    assert!(e.to_string().contains(isa.name()));
                }
            }
        }
    }

    /// Max ulp error of the softmax exponential over `[-87.3, 0]` (and `2^x` over
    /// `[-126, 0]`), plus its special values, for each supported instruction set.
    #[test]
    fn softmax_exp_is_accurate() {
        let n = 1 << 16;
        for base2 in [false, true] {
            let lo = if base2 { -126.0f64 } else { -87.3 };
            let xs: Vec<f32> = (0..n)
                .map(|i| (lo * i as f64 / (n - 1) as f64) as f32)
                .collect();
            let mut runs: Vec<(&str, Vec<f32>)> = Vec::new();
            let mut ys = xs.clone();
            kernels::exp_in_place_portable(&mut ys, base2);
            runs.push(("portable", ys));
            #[cfg(target_arch = "x86_64")]
            {
                if NativeIsa::Avx2.is_supported() {
                    let mut ys = xs.clone();
                    // SAFETY: AVX2, FMA and F16C were detected.
                    unsafe { kernels::exp_in_place_avx2(&mut ys, base2) };
                    runs.push(("avx2", ys));
                }
                if NativeIsa::Avx512.is_supported() {
                    let mut ys = xs.clone();
                    // SAFETY: AVX-512F was detected.
                    unsafe { kernels::exp_in_place_avx512(&mut ys, base2) };
                    runs.push(("avx512", ys));
                }
            }
            for (name, ys) in runs {
                let worst = xs
                    .iter()
                    .zip(&ys)
                    .map(|(&x, &y)| {
                        let want = if base2 {
                            (x as f64).exp2()
                        } else {
                            (x as f64).exp()
                        };
                        ulp_error(y, want)
                    })
                    .fold(0.0, f64::max);
                assert!(worst <= 2.0, "{name} base2={base2}: {worst} ulp");
                eprintln!("{name} softmax exp (base2={base2}): max {worst:.3} ulp");
            }
            let mut specials = [
                f32::NEG_INFINITY,
                0.0,
                -0.0,
                f32::NAN,
                -1000.0,
                -200.0,
                -150.0,
                -90.0,
                -88.5,
                -128.0,
                -127.5,
                -1e-30,
            ];
            let mut portable = specials;
            kernels::exp_in_place_portable(&mut portable[..8], base2);
            kernels::exp_in_place_portable(&mut portable[8..], base2);
            specials[..8].copy_from_slice(&portable[..8]);
            assert_eq!(portable[0], 0.0);
            assert_eq!(portable[1], 1.0);
            assert_eq!(portable[2], 1.0);
            assert!(portable[3].is_nan());
            assert_eq!(portable[4], 0.0);
            assert_eq!(portable[5], 0.0);
            assert_eq!(portable[11], 1.0);
            assert!(portable
                .iter()
                .all(|&p| p.is_nan() || (0.0..=1.0).contains(&p)));
        }
    }
}
