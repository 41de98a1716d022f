//! Test support shared by the native and JIT tile kernels: a small deterministic random
//! generator and checks of `qk`, `pv` and `softmax_update` against f64 products.

use super::{pack_k, pack_v, PackedK, PackedV, TileKernels, PANEL};
use ndarray::{s, Array2};

/// xorshift64*: deterministic, dependency-free.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `[-1, 1)`.
    pub(crate) fn unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub(crate) fn matrix(&mut self, rows: usize, cols: usize) -> Array2<f32> {
        Array2::from_shape_simple_fn((rows, cols), || self.unit())
    }
}

const SENTINEL: f32 = 12345.0;

/// Tile shapes `(d, rows, cols)` covering full tiles, every leftover-row path and
/// ragged panels.
pub(crate) fn shapes() -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    for &d in &[1usize, 7, 16, 32, 64, 80, 128] {
        for &(rows, cols) in &[
            (0usize, 5usize),
            (3, 0),
            (1, 1),
            (5, 15),
            (6, 16),
            (7, 17),
            (13, 33),
            (16, 48),
            (31, 64),
            (64, 64),
        ] {
            out.push((d, rows, cols));
        }
    }
    out
}

/// Checks `qk` on a tile of K keys starting at panel `key0 / 16` of a packed head.
pub(crate) fn check_qk(kernels: &TileKernels, d: usize, rows: usize, cols: usize, rng: &mut Rng) {
    let key0 = PANEL * rng.below(3);
    let kv_len = key0 + cols + rng.below(20);
    let q_stride = d + rng.below(3);
    let s_stride = cols + 1 + rng.below(3);
    let q = rng.matrix(rows.max(1), q_stride);
    let k = rng.matrix(kv_len, d);
    let layout = PackedK { d, kv_len };
    let mut packed = vec![f32::NAN; layout.len()];
    pack_k(k.view(), &mut packed).unwrap();
    let scale = 0.5 + rng.unit().abs();
    let mut s = vec![SENTINEL; rows.max(1) * s_stride];
    let q_flat = q.as_slice().unwrap();
    let k_tile = &packed[layout.tile_offset(key0)..];
    kernels
        .qk(
            q_flat, q_stride, k_tile, d, rows, cols, &mut s, s_stride, scale,
        )
        .unwrap();
    for r in 0..rows.max(1) {
        for c in 0..s_stride {
            let got = s[r * s_stride + c];
            if r >= rows || c >= cols {
                assert_eq!(
                    got,
                    SENTINEL,
                    "{}: qk wrote outside the tile at ({r}, {c})",
                    kernels.name()
                );
                continue;
            }
            let mut exact = 0.0f64;
            let mut mag = 0.0f64;
            for t in 0..d {
                let prod = q[[r, t]] as f64 * k[[key0 + c, t]] as f64;
                exact += prod;
                mag += prod.abs();
            }
            exact *= scale as f64;
            let tol = (d as f64 + 2.0) * f32::EPSILON as f64 * mag * scale as f64 + 1e-30;
            assert!(
                (got as f64 - exact).abs() <= tol,
                "{}: qk d={d} rows={rows} cols={cols} at ({r}, {c}): got {got}, expected {exact}",
                kernels.name()
            );
        }
    }
}

/// Checks `pv` on a tile of V rows starting at an arbitrary key.
pub(crate) fn check_pv(kernels: &TileKernels, d: usize, rows: usize, cols: usize, rng: &mut Rng) {
    let key0 = rng.below(20);
    let kv_len = key0 + cols + rng.below(5);
    let p_stride = cols + rng.below(3);
    let acc_stride = d + rng.below(3);
    let p = Array2::from_shape_simple_fn((rows.max(1), p_stride.max(1)), || rng.unit().abs());
    let v = rng.matrix(kv_len, d);
    let layout = PackedV { d, kv_len };
    let mut packed = vec![f32::NAN; layout.len()];
    pack_v(v.view(), &mut packed).unwrap();
    let acc0: Vec<f32> = (0..rows.max(1) * acc_stride).map(|_| rng.unit()).collect();
    let mut acc = acc0.clone();
    for r in 0..rows.max(1) {
        for c in d..acc_stride {
            acc[r * acc_stride + c] = SENTINEL;
        }
    }
    let before = acc.clone();
    kernels
        .pv(
            p.as_slice().unwrap(),
            p_stride.max(1),
            &packed[layout.tile_offset(key0)..],
            layout.row_stride(),
            d,
            rows,
            cols,
            &mut acc,
            acc_stride,
        )
        .unwrap();
    for r in 0..rows.max(1) {
        for c in 0..acc_stride {
            let got = acc[r * acc_stride + c];
            if r >= rows || c >= d {
                assert_eq!(
                    got.to_bits(),
                    before[r * acc_stride + c].to_bits(),
                    "{}: pv wrote outside the tile at ({r}, {c})",
                    kernels.name()
                );
                continue;
            }
            let mut exact = acc0[r * acc_stride + c] as f64;
            let mut mag = exact.abs();
            for j in 0..cols {
                let prod = p[[r, j]] as f64 * v[[key0 + j, c]] as f64;
                exact += prod;
                mag += prod.abs();
            }
            let tol = (cols as f64 + 2.0) * f32::EPSILON as f64 * mag + 1e-30;
            assert!(
                (got as f64 - exact).abs() <= tol,
                "{}: pv d={d} rows={rows} cols={cols} at ({r}, {c}): got {got}, expected {exact}",
                kernels.name()
            );
        }
    }
}

/// Runs FlashAttention-2 over one query block with `softmax_update` and `pv`, tile by
/// tile, and compares `out = acc / l` with a dense f64 softmax; scores are random with
/// some `-inf` (masked) entries, and one row fully masked in the first tile.
pub(crate) fn check_online_softmax(
    kernels: &TileKernels,
    d: usize,
    rows: usize,
    base2: bool,
    rng: &mut Rng,
) {
    let n_keys = 70;
    let tile = 32;
    let mut scores = Array2::from_shape_simple_fn((rows, n_keys), || 4.0 * rng.unit());
    for r in 0..rows {
        for c in 0..n_keys {
            if rng.below(5) == 0 || (r == 0 && c < tile) {
                scores[[r, c]] = f32::NEG_INFINITY;
            }
        }
    }
    let v = rng.matrix(n_keys, d);
    let layout = PackedV { d, kv_len: n_keys };
    let mut packed = vec![0.0; layout.len()];
    pack_v(v.view(), &mut packed).unwrap();
    let mut m = vec![f32::NEG_INFINITY; rows];
    let mut l = vec![0.0f32; rows];
    let mut acc = vec![0.0f32; rows * d];
    let mut c0 = 0;
    while c0 < n_keys {
        let cols = tile.min(n_keys - c0);
        let mut s: Vec<f32> = scores
            .slice(s![.., c0..c0 + cols])
            .iter()
            .copied()
            .collect();
        kernels
            .softmax_update(
                &mut s, cols, rows, cols, &mut m, &mut l, &mut acc, d, d, base2,
            )
            .unwrap();
        kernels
            .pv(
                &s,
                cols,
                &packed[layout.tile_offset(c0)..],
                layout.row_stride(),
                d,
                rows,
                cols,
                &mut acc,
                d,
            )
            .unwrap();
        c0 += cols;
    }
    for r in 0..rows {
        let to_e = |x: f32| {
            if base2 {
                (x as f64) * std::f64::consts::LN_2
            } else {
                x as f64
            }
        };
        let mx = (0..n_keys)
            .map(|c| to_e(scores[[r, c]]))
            .fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = (0..n_keys)
            .map(|c| (to_e(scores[[r, c]]) - mx).exp())
            .collect();
        let sum: f64 = w.iter().sum();
        let m_exact = (0..n_keys)
            .map(|c| scores[[r, c]])
            .fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(m[r], m_exact, "{}: running max of row {r}", kernels.name());
        for t in 0..d {
            let exact: f64 = (0..n_keys).map(|c| w[c] * v[[c, t]] as f64).sum::<f64>() / sum;
            let got = acc[r * d + t] / l[r];
            assert!(
                (got as f64 - exact).abs() <= 2e-6,
                "{}: online softmax d={d} row {r} col {t}: got {got}, expected {exact}",
                kernels.name()
            );
        }
    }
}

pub(crate) use super::math::ulp_error;
