//! The host side of the PTX kernel ABI: the device arrays a launch needs,
//! built from bound inputs and block maps, and the decoding of the error
//! block. Pure data transformations (no driver, no I/O), so every runtime
//! that launches the kernel shares them and they are tested without a GPU.

use ndarray::ArrayView4;

use super::{Dtype, ErrorRecord, Launch};
use crate::bind::Bound;
use crate::buffer::BufferData;
use crate::mask::BlockMaps;
use crate::sema::eval::{EvalError, Point};
use crate::tile::Kernel;

/// `x` as an IEEE half (round to nearest even; overflow to infinity).
pub fn f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        let nan = if man != 0 {
            0x200 | (man >> 13) as u16
        } else {
            0
        };
        return sign | 0x7c00 | nan;
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    // Keep `mantissa >> shift` and round on the dropped bits.
    let (m, shift, base) = if e <= 0 {
        if e < -10 {
            return sign;
        }
        (man | 0x80_0000, (14 - e) as u32, 0u32)
    } else {
        (man, 13, (e as u32) << 10)
    };
    let kept = m >> shift;
    let rest = m & ((1 << shift) - 1);
    let halfway = 1 << (shift - 1);
    let round = u32::from(rest > halfway || (rest == halfway && kept & 1 == 1));
    // A carry out of the mantissa correctly bumps the exponent (up to infinity).
    sign | (base + kept + round) as u16
}

/// `x` as a bfloat16 (round to nearest even; NaN stays NaN).
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// Quantized K or V packed for the device ([`super::Launch::kv_quant`]):
/// the data `[n0, n1, n2, d_pad]` one byte per element (int8, or fp8 e4m3fn
/// bits), pad columns zero, and its float32 scales, one per row in the same
/// row order, as raw little-endian bytes. `None` for f32/bf16/f16 data.
pub fn pack_quantized(a: &crate::tensor::KvData<'_>, d_pad: usize) -> Option<(Vec<u8>, Vec<u8>)> {
    use crate::tensor::KvData;
    let (bytes, scales): (Vec<u8>, _) = match a {
        KvData::Int8 { data, scales } => (data.iter().map(|&x| x as u8).collect(), scales),
        KvData::Fp8 { data, scales } => (data.iter().copied().collect(), scales),
        _ => return None,
    };
    let d = a.shape()[3];
    let rows = bytes.len() / d.max(1);
    let mut out = vec![0u8; rows * d_pad];
    for (r, row) in bytes.chunks(d.max(1)).enumerate().take(rows) {
        out[r * d_pad..r * d_pad + d].copy_from_slice(row);
    }
    let s = scales.iter().flat_map(|x| x.to_le_bytes()).collect();
    Some((out, s))
}

/// A tensor packed for the device: `[n0, n1, n2, d_pad]` in the dtype,
/// pad columns zero, as raw little-endian bytes.
pub fn pack(a: &ArrayView4<'_, f32>, d_pad: usize, dtype: Dtype) -> Vec<u8> {
    let (n0, n1, n2, _) = a.dim();
    let mut out = Vec::with_capacity(n0 * n1 * n2 * d_pad * dtype.size());
    for i in 0..n0 {
        for j in 0..n1 {
            for r in 0..n2 {
                pack_row(
                    a.slice(ndarray::s![i, j, r, ..]).iter().copied(),
                    d_pad,
                    dtype,
                    &mut out,
                );
            }
        }
    }
    out
}

/// Appends one row of [`pack`]'s output: the values in the dtype, then zero
/// up to `d_pad` elements.
fn pack_row(row: impl Iterator<Item = f32>, d_pad: usize, dtype: Dtype, out: &mut Vec<u8>) {
    for x in row.chain(std::iter::repeat(0.0)).take(d_pad) {
        match dtype {
            Dtype::F16 => out.extend_from_slice(&f16_bits(x).to_le_bytes()),
            Dtype::Bf16 => out.extend_from_slice(&bf16_bits(x).to_le_bytes()),
            Dtype::F32 => out.extend_from_slice(&x.to_le_bytes()),
        }
    }
}

/// K and V as a kernel reads them: quantized bytes and their scales, or
/// values rounded to the dtype.
pub(super) struct KvBytes {
    pub k: Vec<u8>,
    pub v: Vec<u8>,
    /// `k_scales_ptr`, `v_scales_ptr` of a quantized cache.
    pub scales: Option<(Vec<u8>, Vec<u8>)>,
    /// V dequantized and rounded to the dtype, for the V-tile flags of an
    /// mma kernel on a quantized cache.
    dequantized_v: Option<Vec<u8>>,
}

impl KvBytes {
    /// `k` and `v` for a kernel of padded head dim `d_pad` and type `dtype`
    /// (every K/V row, or the rows of one slot of a pool for an append). No
    /// f32 copy of a quantized cache is made unless the V-tile flags need
    /// one (mma kernels).
    pub(super) fn of(
        k: &crate::tensor::KvData<'_>,
        v: &crate::tensor::KvData<'_>,
        d_pad: usize,
        dtype: Dtype,
    ) -> KvBytes {
        let rounded = |a: &crate::tensor::KvData<'_>| pack(&a.to_f32().view(), d_pad, dtype);
        match (pack_quantized(k, d_pad), pack_quantized(v, d_pad)) {
            (Some((kb, ks)), Some((vb, vs))) => KvBytes {
                k: kb,
                v: vb,
                scales: Some((ks, vs)),
                dequantized_v: dtype.uses_mma().then(|| rounded(v)),
            },
            _ => KvBytes {
                k: rounded(k),
                v: rounded(v),
                scales: None,
                dequantized_v: None,
            },
        }
    }

    /// V in the dtype, packed, where the V-tile flags are taken from it
    /// (mma kernels; the f32 kernel predicates every product on p != 0 and
    /// reads no flags).
    fn v_for_flags(&self, dtype: Dtype) -> Option<&[u8]> {
        match (&self.scales, dtype.uses_mma()) {
            (_, false) => None,
            (None, true) => Some(&self.v),
            (Some(_), true) => self.dequantized_v.as_deref(),
        }
    }

    /// Per V row (rows of `d_pad` elements in `dtype`, in the packed row
    /// order), 1 where it holds a non-finite value in the dtype (dequantized,
    /// for a quantized cache): what the V-tile flags of the mma kernels are
    /// made of. `None` for the f32 kernel, which reads no flags.
    pub(super) fn v_row_flags(&self, d_pad: usize, dtype: Dtype) -> Option<Vec<u8>> {
        self.v_for_flags(dtype).map(|v| {
            v.chunks_exact(d_pad * dtype.size())
                .map(|r| u8::from(nonfinite(r, dtype)))
                .collect()
        })
    }
}

/// The strides, in rows, of a page, a slot and a KV head of a pool
/// `[P, page_size, HKV, d_pad]` packed by [`pack`].
pub(super) fn pool_strides(page_size: usize, hkv: usize) -> [usize; 3] {
    [page_size * hkv, hkv, 1]
}

/// The V-tile flags of the mma kernels: for packed V (`pack`'s output for
/// `[n0, n1, kv, d_pad]`), one byte per K/V head `i * n1 + j` and key tile
/// `kt` of `tile` keys, at `(i * n1 + j) * ceil(kv / tile) + kt`: 1 where the
/// tile holds a non-finite value in the dtype, else 0.
///
/// The test is on the packed values, so an f32 that overflows to infinity
/// in f16 (`|x| >= 65520`) counts too. The kernel takes its exact P V path
/// on flagged tiles only: there `0 × NaN` and `0 × inf` cannot reach the
/// output, while every other tile stays on `mma.sync` (see the module docs
/// of [`super`]).
///
/// # Panics
///
/// If `packed` does not hold `heads * kv * d_pad` elements or `tile` is 0.
pub fn nonfinite_tiles(
    packed: &[u8],
    heads: usize,
    kv: usize,
    d_pad: usize,
    dtype: Dtype,
    tile: usize,
) -> Vec<u8> {
    assert!(tile > 0, "tiles hold at least one key");
    let size = dtype.size();
    assert_eq!(packed.len(), heads * kv * d_pad * size, "packed V");
    let tiles = kv.div_ceil(tile);
    let row = d_pad * size;
    let mut flags = Vec::with_capacity(heads * tiles);
    for head in 0..heads {
        for kt in 0..tiles {
            let (r0, r1) = (kt * tile, kv.min((kt + 1) * tile));
            let base = head * kv * row;
            flags.push(u8::from(nonfinite(
                &packed[base + r0 * row..base + r1 * row],
                dtype,
            )));
        }
    }
    flags
}

/// Where an in-place kernel finds key rows (the [`super::IN_PLACE_PARAMS`]):
/// key `j` of KV head `kh` of sequence `b` is row `table[b * table_stride + j
/// / page_size] * page_stride + (j % page_size) * row_stride + kh *
/// head_stride` of k and v packed by [`pack`] (rows of the padded head dim).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InPlaceKv {
    /// Keys of each sequence.
    pub lens: Vec<u32>,
    /// `[B, table_stride]` page numbers.
    pub table: Vec<u32>,
    pub table_stride: u32,
    pub page_size: u32,
    pub page_stride: u32,
    pub row_stride: u32,
    pub head_stride: u32,
}

impl InPlaceKv {
    /// The layout of `bound`'s K/V as packed by [`pack`]: its paged pool
    /// `[P, page_size, HKV, d_pad]`, or dense rows `[B, HKV, rows, d_pad]` (one
    /// page per sequence).
    ///
    /// # Panics
    ///
    /// Unless every sequence's queries end on its last key: a ragged batch, a
    /// paged pool, or dense K/V whose offsets put the last query on the last
    /// key (`q_offset + Q == kv_offset + rows`; the in-place kernel puts each
    /// sequence's queries at its end; [`launch_args`] refuses other calls).
    pub fn of(bound: &Bound) -> Result<InPlaceKv, TooLarge> {
        assert!(
            InPlaceKv::queries_end_the_keys(bound),
            "an in-place kernel takes K/V whose sequences end on their queries"
        );
        let s = bound.shapes;
        let limit = |what, value| TooLarge::check(what, value, BIG);
        let lens = (0..s.b)
            .map(|b| limit("a sequence's keys", bound.kv_len(b)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(match &bound.pages {
            Some(p) => {
                let (rows, stride) = p.table.dim();
                // Entries past a sequence's pages are never read: any value.
                let table = p.table.iter().map(|&x| x as u32).collect();
                debug_assert_eq!(rows, s.b);
                limit("the pool's rows", p.num_pages * p.page_size * s.hkv)?;
                let [page_stride, row_stride, head_stride] = pool_strides(p.page_size, s.hkv);
                InPlaceKv {
                    lens,
                    table,
                    table_stride: limit("the page table's width", stride)?,
                    page_size: limit("the page size", p.page_size)?,
                    page_stride: limit("a page's rows", page_stride)?,
                    row_stride: row_stride as u32,
                    head_stride: head_stride as u32,
                }
            }
            None => {
                let rows = bound.kv_rows;
                limit("k's rows", bound.kv_batch * s.hkv * rows)?;
                InPlaceKv {
                    lens,
                    table: (0..s.b).map(|b| bound.kv_batch_index(b) as u32).collect(),
                    table_stride: 1,
                    page_size: rows.max(1) as u32,
                    page_stride: (s.hkv * rows) as u32,
                    row_stride: 1,
                    head_stride: rows as u32,
                }
            }
        })
    }

    /// Whether every sequence's last query sits on its last key, as the
    /// in-place kernel places them: a ragged batch or a paged pool, or dense
    /// K/V whose query offset says so.
    pub fn queries_end_the_keys(bound: &Bound) -> bool {
        bound.is_ragged()
            || bound.q_offset + bound.shapes.q as i64 == bound.kv_offset + bound.kv_rows as i64
    }

    /// The packed row of key `j` of KV head `kh` of sequence `b`.
    pub fn row(&self, b: usize, kh: usize, j: usize) -> usize {
        let ps = self.page_size as usize;
        let page = self.table[b * self.table_stride as usize + j / ps] as usize;
        page * self.page_stride as usize
            + (j % ps) * self.row_stride as usize
            + kh * self.head_stride as usize
    }

    /// The V-tile flags of an in-place mma kernel, as [`nonfinite_tiles`]
    /// gives them for packed V: one byte per (sequence, KV head) `b * hkv +
    /// kh` and key tile `kt` of `tile` keys, at `(b * hkv + kh) * ceil(kv /
    /// tile) + kt`, 1 where a key of the tile below the sequence's length
    /// has a V row (by its index, [`InPlaceKv::row`]) flagged nonzero in
    /// `row_flags` (`KvBytes::v_row_flags`, or a resident pool's). `kv` is
    /// the longest sequence's keys ([`Bound::key_rows`], the kernel's
    /// `kv_rows`): a key offset moves positions, not rows, so it adds no
    /// tiles.
    pub fn nonfinite_tiles(&self, row_flags: &[u8], hkv: usize, tile: usize) -> Vec<u8> {
        assert!(tile > 0, "tiles hold at least one key");
        let kv = self.lens.iter().copied().max().unwrap_or(0) as usize;
        let tiles = kv.div_ceil(tile);
        let mut flags = Vec::with_capacity(self.lens.len() * hkv * tiles);
        for (b, &len) in self.lens.iter().enumerate() {
            for kh in 0..hkv {
                for kt in 0..tiles {
                    let keys = kt * tile..(len as usize).min((kt + 1) * tile);
                    flags.push(u8::from(
                        keys.into_iter().any(|j| row_flags[self.row(b, kh, j)] != 0),
                    ));
                }
            }
        }
        flags
    }
}

/// Whether `bytes` hold a non-finite value of `dtype`: exactly when the
/// exponent bits of one are all ones.
fn nonfinite(bytes: &[u8], dtype: Dtype) -> bool {
    match dtype {
        Dtype::F16 => bytes
            .chunks_exact(2)
            .any(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7c00 == 0x7c00),
        Dtype::Bf16 => bytes
            .chunks_exact(2)
            .any(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7f80 == 0x7f80),
        Dtype::F32 => bytes
            .chunks_exact(4)
            .any(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7f80_0000 == 0x7f80_0000),
    }
}

/// A buffer as the kernel reads it: row-major, int as i64, float as f32,
/// bool as one byte.
pub fn buffer_bytes(data: &BufferData) -> Vec<u8> {
    match data {
        BufferData::Int(a) => a.iter().flat_map(|x| x.to_le_bytes()).collect(),
        BufferData::Float(a) => a.iter().flat_map(|x| x.to_le_bytes()).collect(),
        BufferData::Bool(a) => a.iter().map(|&x| u8::from(x)).collect(),
    }
}

/// The block maps as the kernel walks them (see the module docs of
/// [`super`]): `rows` holds four u32 per (map, query tile), `full` u32
/// pairs, `partial` u32 tile indices; map `b * stride_b + h * stride_h`
/// serves (b, h).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceMaps {
    pub rows: Vec<u32>,
    pub full: Vec<u32>,
    pub partial: Vec<u32>,
    pub stride_b: u32,
    pub stride_h: u32,
}

/// Flattens block maps for the device.
pub fn device_maps(maps: &BlockMaps, heads: usize) -> DeviceMaps {
    let mut m = DeviceMaps {
        stride_b: if maps.depends_on_b() {
            if maps.depends_on_h() {
                heads as u32
            } else {
                1
            }
        } else {
            0
        },
        stride_h: u32::from(maps.depends_on_h()),
        ..DeviceMaps::default()
    };
    for map in maps.maps() {
        for qt in 0..map.q_tiles() {
            let (f0, p0) = (m.full.len() / 2, m.partial.len());
            for r in map.full_ranges(qt) {
                m.full.extend([r.start, r.end]);
            }
            m.partial.extend_from_slice(map.partial(qt));
            m.rows.extend([
                f0 as u32,
                (m.full.len() / 2) as u32,
                p0 as u32,
                m.partial.len() as u32,
            ]);
        }
    }
    m
}

/// The scalar kernel parameters after the pointers, in [`super::PARAMS`] order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scalars {
    /// `B, H, HKV, Q, KV, D, group, kv_batch_stride, map_stride_b,
    /// map_stride_h, kv_rows` (the key rows: of dense K/V, or the longest
    /// sequence's of a ragged batch or a pool).
    pub u32s: [u32; 11],
    pub q_offset: i64,
    pub kv_offset: i64,
}

/// A problem the kernel cannot take (a size past its 32-bit indexing or
/// the grid limits).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what} = {value} is too large for the CUDA kernel (at most {max})")]
pub struct TooLarge {
    pub what: &'static str,
    pub value: usize,
    pub max: usize,
}

/// The largest size or index the kernel's 32-bit arithmetic takes.
const BIG: usize = (i32::MAX / 2) as usize;

impl TooLarge {
    /// `value` as a u32 parameter, or the error when it exceeds `max`.
    fn check(what: &'static str, value: usize, max: usize) -> Result<u32, TooLarge> {
        if value > max {
            Err(TooLarge { what, value, max })
        } else {
            Ok(value as u32)
        }
    }
}

/// The scalar parameters of a launch, checked against the kernel's limits.
pub fn scalars(bound: &Bound, maps: &DeviceMaps) -> Result<Scalars, TooLarge> {
    let s = bound.shapes;
    let limit = TooLarge::check;
    let big = BIG;
    let grid = 65535;
    Ok(Scalars {
        u32s: [
            limit("B", s.b, grid)?,
            limit("H", s.h, grid)?,
            limit("HKV", s.hkv, grid)?,
            limit("Q", s.q, big)?,
            // The end of the positions, offsets included: the kernel uses it
            // as an s64 shape value only (buffer dims), so it may reach any
            // position binding takes.
            limit("KV", s.kv, crate::sema::POSITION_LIMIT as usize)?,
            limit("D", s.d, big)?,
            (s.h / s.hkv.max(1)) as u32,
            u32::from(bound.kv_batch != 1),
            maps.stride_b,
            maps.stride_h,
            limit("the key rows", bound.key_rows(), big)?,
        ],
        q_offset: bound.q_offset,
        kv_offset: bound.kv_offset,
    })
}

/// Copies the `[B, H, Q, d_pad]` f32 output into `[B, H, Q, D]`.
pub fn unpad(out: &[f32], launch: &Launch, b: usize, h: usize, q: usize) -> ndarray::Array4<f32> {
    let (d, dp) = (launch.d, launch.d_pad);
    ndarray::Array4::from_shape_fn((b, h, q, d), |(i, j, r, c)| {
        out[((i * h + j) * q + r) * dp + c]
    })
}

/// The error the interpreter reports for a filled error block, or `None`
/// when the kernel ran clean.
pub fn decode_error(words: &[u64], kernel: &Kernel, bound: &Bound) -> Option<EvalError> {
    let kind = (words[0] & 0xffff_ffff) as u32;
    if kind == 0 {
        return None;
    }
    let at = Point {
        b: words[1] as i64,
        h: words[2] as i64,
        q: words[3] as i64,
        kv: words[4] as i64,
        score: 0.0,
    };
    let rest: Vec<i64> = words[5..5 + ErrorRecord::MAX_INDICES]
        .iter()
        .map(|&w| w as i64)
        .collect();
    let shapes: Vec<&[usize]> = bound.buffers.iter().map(|b| b.shape()).collect();
    let raw = crate::runtime::abi::RawError {
        code: i64::from(kind),
        value: (words[0] >> 32) as usize,
        at,
        words: &rest,
    };
    Some(crate::runtime::abi::decode(&raw, kernel, &shapes))
}

/// Refuses K/V stored in another type than `l`'s kernel dequantizes or
/// rounds to (bf16 data in an f16 kernel, int8 in an f32 one, and so on).
pub(super) fn check_kv_type(
    kv_elem: crate::tensor::ElemType,
    l: &Launch,
) -> Result<(), super::PtxError> {
    use crate::tensor::ElemType;
    let refuse = |what: String| Err(super::PtxError::Launch { what });
    match (kv_elem, l.kv_quant, l.dtype) {
        (e, Some(q), _) if e == q => {}
        (e, None, dtype) if !e.is_quantized() => {
            let other = match (e, dtype) {
                (ElemType::Bf16, Dtype::F16) => Some("f16"),
                (ElemType::F16, Dtype::Bf16) => Some("bf16"),
                _ => None,
            };
            if let Some(other) = other {
                return refuse(format!(
                    "{e} K/V in a kernel compiled for {other} (it would round them again)"
                ));
            }
        }
        (e, q, _) => {
            return refuse(format!(
                "{e} K/V in a kernel compiled for {} K/V",
                q.map_or_else(|| l.dtype.to_string(), |q| q.to_string())
            ))
        }
    }
    Ok(())
}

/// One argument of a launch, as the host prepares it.
#[derive(Clone, Debug, PartialEq)]
pub enum Arg {
    /// A device array holding these bytes (uploaded before the launch).
    Array(Vec<u8>),
    /// A device array of this many zeroed bytes that the kernel writes
    /// (`out`, `lse`, the error block).
    Output(usize),
    /// A `.u32` scalar.
    U32(u32),
    /// A `.s64` scalar.
    S64(i64),
    /// The device array of a resident pool passed as this parameter (`k`,
    /// `v`, `k_scales_ptr`, `v_scales_ptr`: [`super::pool::ResidentPool`]),
    /// already on the device: nothing is uploaded.
    Resident,
}

/// The arguments of one launch of `ptx` on `inputs`, in the kernel's
/// parameter order and named as its parameters ([`super::PARAMS`], then
/// [`super::IN_PLACE_PARAMS`] for a kernel that reads K/V in place,
/// [`super::QUANT_PARAMS`] for quantized K/V, then `buf0`, `buf1`, ...):
/// everything a runtime uploads, passes and downloads. `maps` are the block
/// maps of `bound` for the launch's tiling. One builder serves the CUDA
/// runtime and the PTX emulator of the tests, so what the emulator checks is
/// what the GPU is given.
///
/// Fails, without building anything, for a call the kernel cannot take:
/// ragged or paged K/V for a kernel of dense K/V; for an in-place
/// kernel, queries that do not end on each sequence's last key (dense K/V
/// without lengths whose `q_offset + Q` is not `kv_offset + rows`); K/V stored in another
/// type than the kernel dequantizes or rounds to; sizes past the kernel's
/// 32-bit indexing; a resident `pool` laid out for another pool or kernel
/// than `inputs`' pool and `ptx`.
///
/// With `pool`, the pool of `inputs` is on the device already
/// ([`super::pool::ResidentPool`]): K, V and their scales are passed as
/// [`Arg::Resident`] and the V-tile flags come from the pool's per-row
/// flags; `inputs`' pool is read only for its shape (binding reads its
/// scales, and the page table and lengths are passed as for any call).
pub fn launch_args(
    kernel: &Kernel,
    ptx: &super::PtxKernel,
    inputs: &crate::Inputs<'_>,
    bound: &Bound,
    maps: &BlockMaps,
    pool: Option<&super::pool::ResidentPool>,
) -> Result<Vec<(String, Arg)>, super::PtxError> {
    use crate::tile::nest::KvSource;
    let l = &ptx.launch;
    let s = bound.shapes;
    let refuse = |what: String| Err(super::PtxError::Launch { what });
    let in_place = kernel.nest.kv == KvSource::InPlace;
    if !in_place && (bound.is_ragged() || bound.pages.is_some()) {
        return refuse(
            "ragged or paged K/V in a kernel of dense K/V (compile it to read K/V in place)".into(),
        );
    }
    if in_place && !InPlaceKv::queries_end_the_keys(bound) {
        return refuse(format!(
            "queries at {} .. {} and keys at {} .. {} in a kernel that reads K/V in place (it \
             puts each sequence's queries on its last keys: give the lengths of the sequences)",
            bound.q_offset,
            bound.q_offset + s.q as i64,
            bound.kv_offset,
            bound.kv_offset + bound.kv_rows as i64
        ));
    }
    check_kv_type(bound.kv_elem, l)?;
    let dm = device_maps(maps, s.h);
    let scalars = scalars(bound, &dm)?;
    let in_place_kv = if in_place {
        Some(InPlaceKv::of(bound)?)
    } else {
        None
    };
    let u32s = |v: &[u32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    // K and V as the kernel reads them, and the V-tile flags of the mma
    // kernels: those of the values in the dtype (dequantized for a quantized
    // cache), from the rows' bytes, or, for a resident pool, from the flags
    // it keeps per row; the tiles of an in-place kernel gather their rows'
    // flags either way.
    let (k, v, scales, v_flags) = match pool {
        Some(pool) => {
            pool.check(ptx, inputs, bound)?;
            let ip = in_place_kv
                .as_ref()
                .expect("a resident pool is read in place");
            let flags = pool
                .v_row_flags()
                .map(|rows| ip.nonfinite_tiles(rows, s.hkv, l.bkv))
                .unwrap_or_default();
            let scales = pool
                .layout()
                .elem
                .is_quantized()
                .then_some((Arg::Resident, Arg::Resident));
            (Arg::Resident, Arg::Resident, scales, flags)
        }
        None => {
            let kv = KvBytes::of(&inputs.k, &inputs.v, l.d_pad, l.dtype);
            let flags = match &in_place_kv {
                Some(ip) => kv
                    .v_row_flags(l.d_pad, l.dtype)
                    .map(|rows| ip.nonfinite_tiles(&rows, s.hkv, l.bkv))
                    .unwrap_or_default(),
                None => match kv.v_for_flags(l.dtype) {
                    Some(v) => {
                        let sh = inputs.v.shape();
                        nonfinite_tiles(v, sh[0] * sh[1], sh[2], l.d_pad, l.dtype, l.bkv)
                    }
                    None => Vec::new(),
                },
            };
            let scales = kv.scales.map(|(ks, vs)| (Arg::Array(ks), Arg::Array(vs)));
            (Arg::Array(kv.k), Arg::Array(kv.v), scales, flags)
        }
    };
    let rows = s.b * s.h * s.q;
    let mut args: Vec<(String, Arg)> = Vec::new();
    let mut push = |names: &[&str], values: Vec<Arg>| {
        debug_assert_eq!(names.len(), values.len());
        args.extend(names.iter().map(|n| n.to_string()).zip(values));
    };
    let arrays = [
        Arg::Array(pack(&inputs.q, l.d_pad, l.dtype)),
        k,
        v,
        Arg::Output(rows * l.d_pad * 4),
        Arg::Output(rows * 4),
        Arg::Output(ErrorRecord::WORDS * 8),
        Arg::Array(u32s(&dm.rows)),
        Arg::Array(u32s(&dm.full)),
        Arg::Array(u32s(&dm.partial)),
        Arg::Array(v_flags),
    ];
    let values = arrays
        .into_iter()
        .chain(scalars.u32s.map(Arg::U32))
        .chain([Arg::S64(scalars.q_offset), Arg::S64(scalars.kv_offset)]);
    push(&super::PARAMS, values.collect());
    if let Some(ip) = in_place_kv {
        let values = [
            Arg::Array(u32s(&ip.lens)),
            Arg::Array(u32s(&ip.table)),
            Arg::U32(ip.table_stride),
            Arg::U32(ip.page_size),
            Arg::U32(ip.page_stride),
            Arg::U32(ip.row_stride),
            Arg::U32(ip.head_stride),
        ];
        push(&super::IN_PLACE_PARAMS, values.into());
    }
    if let Some((ks, vs)) = scales {
        push(&super::QUANT_PARAMS, vec![ks, vs]);
    }
    for (i, b) in bound.buffers.iter().enumerate() {
        args.push((format!("buf{i}"), Arg::Array(buffer_bytes(b))));
    }
    Ok(args)
}

/// Kernels for the unit tests of the host side (here and in
/// [`super::pool`]).
#[cfg(test)]
pub(super) mod testing {
    use super::*;
    use crate::codegen::ptx::{self, PtxOptions};
    use crate::driver::{load, SourceFile, SpecOptions};
    use crate::mask::{classify, Tiling};
    use crate::tensor::ElemType;
    use crate::tile::nest::KvSource;

    /// A causal spec.
    pub fn causal() -> crate::sema::Spec {
        load(
            SourceFile::new("t.attn", "attention a { mask = causal }"),
            &SpecOptions::default(),
        )
        .unwrap()
        .spec
    }

    /// `spec` lowered with K/V `kv` at head dim `d`, and its PTX for `dtype`
    /// with K/V stored quantized as `quant`.
    pub fn compile(
        spec: &crate::sema::Spec,
        kv: KvSource,
        dtype: Dtype,
        quant: Option<ElemType>,
        d: usize,
    ) -> (crate::tile::Verified, super::super::PtxKernel) {
        let schedule = crate::tile::Schedule {
            kv,
            ..ptx::schedule(d, dtype)
        };
        let kernel = crate::tile::lower(spec, &schedule);
        let opts = PtxOptions {
            arch: super::super::Arch::Sm80,
            dtype,
            kv_quant: quant,
        };
        let code = ptx::compile(&kernel, &opts).unwrap();
        (kernel, code)
    }

    /// [`launch_args`] of `k` on `inputs` (bound and classified here).
    pub fn args(
        spec: &crate::sema::Spec,
        k: &(crate::tile::Verified, super::super::PtxKernel),
        inputs: &crate::Inputs<'_>,
        pool: Option<&super::super::pool::ResidentPool>,
    ) -> Result<Vec<(String, Arg)>, super::super::PtxError> {
        let bound = crate::bind::bind(spec, inputs).unwrap();
        let l = &k.1.launch;
        let maps = classify(spec, &bound, Tiling::new(l.bq, l.bkv).unwrap()).unwrap();
        launch_args(&k.0, &k.1, inputs, &bound, &maps, pool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{load, SourceFile, SpecOptions};
    use crate::mask::{classify, Tiling};
    use crate::Inputs;
    use ndarray::{Array1, Array4};

    #[test]
    fn half_and_bfloat_rounding() {
        for (x, h) in [
            (0.0f32, 0x0000u16),
            (-0.0, 0x8000),
            (1.0, 0x3c00),
            (-2.0, 0xc000),
            (0.1, 0x2e66),
            (65504.0, 0x7bff),
            (65520.0, 0x7c00),
            (1e6, 0x7c00),
            (5.960_464_5e-8, 0x0001),
            (6.097_555e-5, 0x03ff),
            (6.103_515_6e-5, 0x0400),
            (1.0 + 1.0 / 2048.0, 0x3c00),
            (1.0 + 3.0 / 2048.0, 0x3c02),
            (f32::INFINITY, 0x7c00),
            (1e-9, 0x0000),
        ] {
            assert_eq!(f16_bits(x), h, "{x}");
        }
        assert!(f16_bits(f32::NAN) & 0x7c00 == 0x7c00 && f16_bits(f32::NAN) & 0x3ff != 0);
        for (x, h) in [
            (1.0f32, 0x3f80u16),
            (-1.5, 0xbfc0),
            (3.140625, 0x4049),
            (1.0 + 1.0 / 256.0, 0x3f80),
            (1.0 + 3.0 / 256.0, 0x3f82),
        ] {
            assert_eq!(bf16_bits(x), h, "{x}");
        }
        assert!(bf16_bits(f32::NAN) & 0x7f80 == 0x7f80 && bf16_bits(f32::NAN) & 0x7f != 0);
    }

    #[test]
    fn packing_pads_the_head_dim() {
        let a = Array4::from_shape_fn((1, 1, 2, 3), |(_, _, r, c)| (r * 3 + c) as f32);
        let bytes = pack(&a.view(), 8, Dtype::F32);
        let vals: Vec<f32> = bytes
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(
            vals,
            [0., 1., 2., 0., 0., 0., 0., 0., 3., 4., 5., 0., 0., 0., 0., 0.]
        );
        let bytes = pack(&a.view(), 16, Dtype::F16);
        assert_eq!(bytes.len(), 2 * 16 * 2);
        assert_eq!(u16::from_le_bytes([bytes[2], bytes[3]]), 0x3c00);
    }

    #[test]
    fn nonfinite_tiles_flag_values_that_are_not_finite_in_the_dtype() {
        // Two heads of 5 keys, tiles of 2 keys: 3 tiles per head.
        let mut a = Array4::from_shape_fn((1, 2, 5, 3), |(_, h, r, c)| (h * 15 + r * 3 + c) as f32);
        a[[0, 0, 1, 2]] = f32::NAN;
        a[[0, 1, 4, 0]] = f32::NEG_INFINITY;
        // Finite in f32 and bf16, infinite in f16.
        a[[0, 1, 2, 1]] = 1e6;
        let flags = |dtype| nonfinite_tiles(&pack(&a.view(), 16, dtype), 2, 5, 16, dtype, 2);
        assert_eq!(flags(Dtype::F16), [1, 0, 0, 0, 1, 1]);
        assert_eq!(flags(Dtype::Bf16), [1, 0, 0, 0, 0, 1]);
        assert_eq!(flags(Dtype::F32), [1, 0, 0, 0, 0, 1]);
        assert_eq!(
            nonfinite_tiles(&[], 0, 0, 16, Dtype::F16, 64),
            Vec::<u8>::new()
        );
    }

    #[test]
    fn maps_flatten_in_walk_order() {
        let program = load(
            SourceFile::new(
                "t.attn",
                "attention a { buffer doc[KV]: int\n mask = doc[q] == doc[kv] && causal }",
            ),
            &SpecOptions::default(),
        )
        .unwrap();
        let q = Array4::<f32>::zeros((1, 2, 100, 8));
        let doc = BufferData::Int(Array1::from_shape_fn(100, |i| (i / 40) as i64).into_dyn());
        let inputs = Inputs::new(q.view(), q.view(), q.view()).buffer("doc", doc);
        let bound = crate::bind::bind(&program.spec, &inputs).unwrap();
        let maps = classify(&program.spec, &bound, Tiling::new(16, 16).unwrap()).unwrap();
        let dm = device_maps(&maps, 2);
        let map = maps.get(0, 0);
        assert_eq!((dm.stride_b, dm.stride_h), (0, 0));
        assert_eq!(dm.rows.len(), 4 * map.q_tiles());
        for qt in 0..map.q_tiles() {
            let r = &dm.rows[4 * qt..4 * qt + 4];
            let full: Vec<u32> = (r[0]..r[1])
                .flat_map(|i| dm.full[2 * i as usize]..dm.full[2 * i as usize + 1])
                .collect();
            let want: Vec<u32> = map.full_ranges(qt).iter().flat_map(|r| r.clone()).collect();
            assert_eq!(full, want);
            assert_eq!(&dm.partial[r[2] as usize..r[3] as usize], map.partial(qt));
        }
        assert!(!dm.partial.is_empty() && !dm.full.is_empty());
        let s = scalars(&bound, &dm).unwrap();
        assert_eq!(s.u32s, [1, 2, 2, 100, 100, 8, 1, 0, 0, 0, 100]);
    }

    /// The arguments follow the kernel's parameter list (dense, in place,
    /// quantized), and every call the kernel cannot take is refused with what
    /// it is, before anything is built.
    #[test]
    fn launch_args_follow_the_parameters_and_refuse_what_the_kernel_cannot_take() {
        use crate::tensor::{ElemType, KvArray};
        use crate::tile::nest::KvSource;
        let spec = &testing::causal();
        let (d, q_len, kv) = (16, 3, 40);
        let compile = |kv_src: KvSource, dtype: Dtype, quant: Option<ElemType>| {
            testing::compile(spec, kv_src, dtype, quant, d)
        };
        let args = |k: &(crate::tile::Verified, super::super::PtxKernel), inputs: &Inputs<'_>| {
            testing::args(spec, k, inputs, None)
        };
        let names = |a: &[(String, Arg)]| a.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        let refused = |r: Result<Vec<(String, Arg)>, super::super::PtxError>, what: &str| match r {
            Err(e @ super::super::PtxError::Launch { .. }) => {
                assert!(e.to_string().contains(what), "{e}")
            }
            other => panic!("{what}: {other:?}"),
        };
        let q = Array4::<f32>::from_shape_fn((2, 2, q_len, d), |(b, h, i, c)| {
            (b + h + i + c) as f32 / 10.0
        });
        let kvf = Array4::<f32>::from_shape_fn((2, 1, kv, d), |(b, _, j, c)| {
            ((b * 7 + j * 3 + c) % 11) as f32 / 10.0 - 0.5
        });
        let lens = Array1::from_vec(vec![kv as i32, 17]);
        let dense = compile(KvSource::Packed, Dtype::F32, None);
        let in_place = compile(KvSource::InPlace, Dtype::F32, None);
        let plain: Vec<String> = super::super::PARAMS.iter().map(|s| s.to_string()).collect();
        let with = |extra: &[&str]| {
            let mut v = plain.clone();
            v.extend(extra.iter().map(|s| s.to_string()));
            v
        };

        // Dense K/V: PARAMS; the last query on the last key, in place: the
        // in-place parameters, every sequence KV long.
        let end = Inputs::new(q.view(), kvf.view(), kvf.view()).q_offset((kv - q_len) as i64);
        assert_eq!(names(&args(&dense, &end).unwrap()), plain);
        let a = args(&in_place, &end).unwrap();
        assert_eq!(names(&a), with(&super::super::IN_PLACE_PARAMS));
        let lens_bytes: Vec<u8> = [kv as u32, kv as u32]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(a[plain.len()].1, Arg::Array(lens_bytes));
        // Outputs are zeroed device arrays of the padded rows.
        let rows = 2 * 2 * q_len;
        assert_eq!(a[3].1, Arg::Output(rows * d * 4));
        assert_eq!(a[4].1, Arg::Output(rows * 4));

        // A ragged batch, in place; quantized K/V add their scales.
        let ragged = Inputs::new(q.view(), kvf.view(), kvf.view()).kv_lens(lens.view());
        assert_eq!(
            names(&args(&in_place, &ragged).unwrap()),
            with(&super::super::IN_PLACE_PARAMS)
        );
        let k8 = KvArray::quantize(kvf.view(), ElemType::Int8);
        let int8 = Inputs::new(q.view(), k8.view(), k8.view()).kv_lens(lens.view());
        let quant = compile(KvSource::InPlace, Dtype::F16, Some(ElemType::Int8));
        let mut all = super::super::IN_PLACE_PARAMS.to_vec();
        all.extend(super::super::QUANT_PARAMS);
        assert_eq!(names(&args(&quant, &int8).unwrap()), with(&all));

        // A key offset is passed after the query offset; in place, the
        // queries end on the keys when both offsets move together.
        let scalar = |a: &[(String, Arg)], name: &str| {
            a.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
        };
        let shifted = end.clone().q_offset((kv - q_len + 5) as i64).kv_offset(5);
        for kernel in [&dense, &in_place] {
            let a = args(kernel, &shifted).unwrap();
            assert_eq!(scalar(&a, "kv_offset"), Some(Arg::S64(5)));
            assert_eq!(scalar(&a, "KV"), Some(Arg::U32((kv + 5) as u32)));
            assert_eq!(scalar(&a, "kv_rows"), Some(Arg::U32(kv as u32)));
        }
        // In place, `kv_rows` is the longest sequence's keys: not the dense
        // rows, nor (for a pool) 0; the positions end `kv_offset` later.
        let shorter = Array1::from_vec(vec![kv as i32 - 5, 17]);
        let a = args(
            &in_place,
            &Inputs::new(q.view(), kvf.view(), kvf.view())
                .kv_lens(shorter.view())
                .kv_offset(1000),
        )
        .unwrap();
        assert_eq!(scalar(&a, "kv_offset"), Some(Arg::S64(1000)));
        assert_eq!(scalar(&a, "kv_rows"), Some(Arg::U32(kv as u32 - 5)));
        assert_eq!(scalar(&a, "KV"), Some(Arg::U32(1000 + kv as u32 - 5)));
        let pages = Array4::<f32>::from_shape_fn((8, 8, 1, d), |(p, s, _, c)| (p + s + c) as f32);
        let table =
            ndarray::Array2::from_shape_vec((2, 5), vec![3, 0, 6, 1, 4, 2, 5, 7, -1, -1]).unwrap();
        let pool_lens = Array1::from_vec(vec![37, 20]);
        let pooled = Inputs::paged(
            q.view(),
            pages.view(),
            pages.view(),
            table.view(),
            pool_lens.view(),
        );
        // A block far into a long sequence: its rows are few, its positions
        // past the kernel's 32-bit sizes (2^30), within binding's 2^31 - 1.
        for offset in [0, 7, 2_000_000_000] {
            let a = args(&in_place, &pooled.clone().kv_offset(offset)).unwrap();
            assert_eq!(scalar(&a, "kv_rows"), Some(Arg::U32(37)));
            assert_eq!(scalar(&a, "KV"), Some(Arg::U32(37 + offset as u32)));
        }

        // Refused: ragged K/V in a dense kernel, queries that do not end on
        // the keys in place (a key offset alone moves the keys past them),
        // K/V of another type.
        refused(
            args(&in_place, &end.clone().kv_offset(5)),
            "queries at 37 .. 40 and keys at 5 .. 45",
        );
        refused(
            args(&dense, &ragged),
            "ragged or paged K/V in a kernel of dense K/V",
        );
        let start = Inputs::new(q.view(), kvf.view(), kvf.view());
        refused(
            args(&in_place, &start),
            "queries at 0 .. 3 and keys at 0 .. 40",
        );
        refused(
            args(&in_place, &int8),
            "int8 K/V in a kernel compiled for f32 K/V",
        );
        refused(
            args(&quant, &ragged),
            "f32 K/V in a kernel compiled for int8 K/V",
        );
        let kb = KvArray::quantize(kvf.view(), ElemType::Bf16);
        let bf16 = Inputs::new(q.view(), kb.view(), kb.view()).q_offset((kv - q_len) as i64);
        let f16_kernel = compile(KvSource::Packed, Dtype::F16, None);
        refused(
            args(&f16_kernel, &bf16),
            "bf16 K/V in a kernel compiled for f16",
        );
    }

    #[test]
    fn error_blocks_decode_to_the_interpreter_errors() {
        let program = load(
            SourceFile::new(
                "t.attn",
                "attention a { buffer pos[KV]: int\n score = score + float(pos[q - kv]) }",
            ),
            &SpecOptions::default(),
        )
        .unwrap();
        let k = crate::tile::lower(&program.spec, &crate::tile::Schedule::default());
        let load_id = k
            .insts
            .iter()
            .position(|i| matches!(i.op, crate::tile::Op::Load { .. }))
            .unwrap();
        let q = Array4::<f32>::zeros((1, 1, 4, 64));
        let inputs = Inputs::new(q.view(), q.view(), q.view())
            .buffer("pos", BufferData::Int(Array1::zeros(4).into_dyn()));
        let bound = crate::bind::bind(&program.spec, &inputs).unwrap();
        let mut words = [0u64; ErrorRecord::WORDS];
        assert_eq!(decode_error(&words, &k, &bound), None);
        words[0] = ((load_id as u64) << 32) | u64::from(ErrorRecord::OUT_OF_RANGE);
        words[3] = 0;
        words[4] = 2;
        words[5] = (-2i64) as u64;
        let e = decode_error(&words, &k, &bound).unwrap();
        assert!(
            e.to_string().starts_with(
                "read out of range: `pos[-2]` with shape [4] (at b=0, h=0, q=0, kv=2)"
            ),
            "{e}"
        );
        words[0] = ((load_id as u64) << 32) | u64::from(ErrorRecord::DIVISION_BY_ZERO);
        assert!(decode_error(&words, &k, &bound)
            .unwrap()
            .to_string()
            .contains("division by zero"));
    }
}
