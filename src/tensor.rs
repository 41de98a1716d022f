//! Element types of the K and V operands: f32, the half-precision types
//! bf16 and f16, and the quantized types int8 and fp8 (OCP e4m3fn) with a
//! float32 scale per (token, KV head).
//!
//! [`KvData`] is a K or V operand as a call reads it (a view of the caller's
//! memory, in its stored type); [`KvArray`] owns one, and makes one from f32
//! data by rounding or quantizing ([`KvArray::quantize`]). Every backend
//! reads the same values: element `[i, j, k, t]` of a quantized operand is
//! `f32(x) * scale[i, j, k]`, rounded once to f32 ([`KvData::get`]); the
//! reference computes in f64 on those values.
//!
//! Quantization (what `attnc run --kv-dtype` and [`KvArray::quantize`] do):
//! the scale of a (token, KV head) row is its largest magnitude divided by
//! 127 (int8) or 448 (fp8, the largest finite e4m3fn value); each element is
//! `x / scale` rounded to nearest, ties to even. A row of zeros has scale 0.

use half::{bf16, f16};
use ndarray::{Array3, Array4, ArrayView3, ArrayView4, ArrayViewMut1, Axis, Zip};

/// The element type of q, k or v as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ElemType {
    F32,
    Bf16,
    F16,
    /// Symmetric int8 with a float32 scale per (token, KV head).
    Int8,
    /// OCP FP8 e4m3fn (as `torch.float8_e4m3fn`, stored as its bits in u8)
    /// with a float32 scale per (token, KV head).
    Fp8,
}

impl ElemType {
    pub const ALL: [ElemType; 5] = [
        ElemType::F32,
        ElemType::Bf16,
        ElemType::F16,
        ElemType::Int8,
        ElemType::Fp8,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ElemType::F32 => "f32",
            ElemType::Bf16 => "bf16",
            ElemType::F16 => "f16",
            ElemType::Int8 => "int8",
            ElemType::Fp8 => "fp8",
        }
    }

    /// Bytes per element (without scales).
    pub fn size(self) -> usize {
        match self {
            ElemType::F32 => 4,
            ElemType::Bf16 | ElemType::F16 => 2,
            ElemType::Int8 | ElemType::Fp8 => 1,
        }
    }

    /// Bytes of `rows` rows of `d` elements, their scales included.
    pub fn row_bytes(self, rows: usize, d: usize) -> usize {
        rows * (d * self.size() + if self.is_quantized() { 4 } else { 0 })
    }

    /// Whether elements carry a scale per (token, KV head).
    pub fn is_quantized(self) -> bool {
        matches!(self, ElemType::Int8 | ElemType::Fp8)
    }

    /// The largest magnitude a quantized element holds (the divisor of the
    /// row's absmax that gives its scale).
    pub(crate) fn quant_max(self) -> f32 {
        match self {
            ElemType::Int8 => 127.0,
            ElemType::Fp8 => 448.0,
            _ => unreachable!("only int8 and fp8 have scales"),
        }
    }

    /// Whether `x` is a value of this type (exactly what [`ElemType::round`]
    /// keeps; NaN counts, whatever its payload). Bit tests, no conversion:
    /// binding runs it over every element of q on every call.
    pub fn holds(self, x: f32) -> bool {
        let bits = x.to_bits() & 0x7fff_ffff;
        if bits == 0 || bits >= 0x7f80_0000 {
            return true; // zeros, infinities, NaN
        }
        match self {
            ElemType::Bf16 => bits & 0xffff == 0,
            ElemType::F16 => {
                // f16 keeps 10 of f32's 23 mantissa bits for exponents -14..=15,
                // and fewer below (subnormals, down to 2^-24).
                let e = (bits >> 23) as i32 - 127;
                let dropped = 13 + (-14 - e).max(0);
                (-24..=15).contains(&e) && bits & ((1u32 << dropped) - 1) == 0
            }
            _ => true,
        }
    }

    /// `x` rounded to this type and back (nearest, ties to even); quantized
    /// types have no rounding of their own (they need a scale) and keep `x`.
    pub fn round(self, x: f32) -> f32 {
        match self {
            ElemType::Bf16 => bf16::from_f32(x).to_f32(),
            ElemType::F16 => f16::from_f32(x).to_f32(),
            _ => x,
        }
    }
}

impl std::fmt::Display for ElemType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

/// The bits of `|x|` read as an f32: at least `0x7f80_0000` exactly when `x`
/// is not finite. The scans for non-finite values fold these with an integer
/// maximum, which vectorises where a float test stops to branch per value.
pub trait MagnitudeBits: Copy {
    fn magnitude_bits(self) -> u32;
}

impl MagnitudeBits for f32 {
    #[inline(always)]
    fn magnitude_bits(self) -> u32 {
        self.to_bits() & 0x7fff_ffff
    }
}

impl MagnitudeBits for bf16 {
    /// A bf16 is the high half of the f32 it widens to.
    #[inline(always)]
    fn magnitude_bits(self) -> u32 {
        (u32::from(self.to_bits()) << 16) & 0x7fff_ffff
    }
}

/// The largest [`MagnitudeBits`] of a row (0 when empty).
#[inline]
pub fn max_magnitude_bits<T: MagnitudeBits>(row: ndarray::ArrayView1<'_, T>) -> u32 {
    match row.as_slice() {
        Some(xs) => xs.iter().fold(0, |m, x| m.max(x.magnitude_bits())),
        None => row.iter().fold(0, |m, x| m.max(x.magnitude_bits())),
    }
}

/// Why [`KvArray::append`] wrote nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, miette::Diagnostic)]
pub enum AppendError {
    #[error("a step is [B, HKV, D] = {expected:?} with a page table of B rows; found a step {step:?} and a table {table:?}")]
    #[diagnostic(
        code(attnc::append::shape),
        help("one new row per sequence and KV head, of the pool's D")
    )]
    Shape {
        expected: [usize; 3],
        step: Vec<usize>,
        table: Vec<usize>,
    },
    #[error("kv_lens[{b}] is {len}, a negative length")]
    #[diagnostic(code(attnc::append::kv_lens))]
    NegativeLen { b: usize, len: i32 },
    #[error("sequence {b} appends key {key}, in its page {slot}: the table lists no page of the pool there (pages 0 .. {pages})")]
    #[diagnostic(
        code(attnc::append::page),
        help("give the sequence a free page in its table row before its last page is full")
    )]
    NoPage {
        b: usize,
        key: usize,
        slot: usize,
        pages: usize,
    },
    #[error("the pool has pages of 0 slots: nothing can be appended")]
    #[diagnostic(
        code(attnc::append::page_size),
        help("a pool is [num_pages, page_size, HKV, D] with page_size >= 1")
    )]
    ZeroPageSize,
    #[error("the pool's scales have shape {found:?}, its data {data:?}")]
    #[diagnostic(
        code(attnc::append::scales),
        help(
            "int8/fp8 data [num_pages, page_size, HKV, D] takes scales [num_pages, page_size, HKV]"
        )
    )]
    ScalesShape { data: Vec<usize>, found: Vec<usize> },
    #[error("sequences {first} and {second} both append into slot {slot} of page {page}")]
    #[diagnostic(
        code(attnc::append::shared_slot),
        help("sequences may share the full pages of a common prefix, but each appends into a page of its own: copy a shared last page before appending to it")
    )]
    SharedSlot {
        first: usize,
        second: usize,
        page: usize,
        slot: usize,
    },
}

impl std::str::FromStr for ElemType {
    type Err = String;
    fn from_str(s: &str) -> Result<ElemType, String> {
        ElemType::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                format!("unknown element type `{s}` (expected f32, bf16, f16, int8 or fp8)")
            })
    }
}

/// The value of e4m3fn bits: sign, 4 exponent bits (bias 7), 3 mantissa
/// bits; exponent 0 is subnormal (`m * 2^-9`); `S.1111.111` is NaN and
/// there are no infinities.
pub fn e4m3_to_f32(bits: u8) -> f32 {
    let sign = if bits & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = (bits >> 3) & 0xf;
    let m = (bits & 7) as f32;
    if bits & 0x7f == 0x7f {
        f32::NAN
    } else if e == 0 {
        sign * m * (-9f32).exp2()
    } else {
        sign * (1.0 + m / 8.0) * (e as f32 - 7.0).exp2()
    }
}

/// `x` as e4m3fn bits, rounded to nearest (ties to even); magnitudes past
/// the largest finite value 448 saturate to it, NaN gives NaN.
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    // Subnormals: multiples of 2^-9 below 2^-6 (8 * 2^-9 rounds up into
    // the first normal, code 8).
    let code = if a < (-6f32).exp2() {
        round_even(a * 512.0) as u32
    } else if a >= 448.0 {
        0x7e
    } else {
        // Round the f32 mantissa to 3 bits, ties to even, carrying into the
        // exponent.
        let b = a.to_bits();
        let b = b + 0x7ffff + ((b >> 20) & 1);
        let e = (b >> 23) as i32 - 127 + 7;
        let code = ((e as u32) << 3) | ((b >> 20) & 7);
        code.min(0x7e)
    };
    sign | code as u8
}

/// `x` rounded to an integer, ties to even, for `|x| <= 2^22` (adding and
/// subtracting 1.5 * 2^23 leaves no fraction bits; `round_ties_even` is a
/// library call on the baseline x86-64 target, and quantizing a cache calls
/// this once per element).
#[inline]
fn round_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

/// A K or V operand as a call reads it, in its stored type. Quantized data
/// has a float32 scale per row of `D` elements (the first three axes):
/// `[B, HKV, KV]` for dense k/v, `[num_pages, page_size, HKV]` for a pool.
#[derive(Clone, Debug)]
pub enum KvData<'a> {
    F32(ArrayView4<'a, f32>),
    Bf16(ArrayView4<'a, bf16>),
    F16(ArrayView4<'a, f16>),
    Int8 {
        data: ArrayView4<'a, i8>,
        scales: ArrayView3<'a, f32>,
    },
    /// e4m3fn bits.
    Fp8 {
        data: ArrayView4<'a, u8>,
        scales: ArrayView3<'a, f32>,
    },
}

impl<'a> From<ArrayView4<'a, f32>> for KvData<'a> {
    fn from(a: ArrayView4<'a, f32>) -> KvData<'a> {
        KvData::F32(a)
    }
}

impl<'a> From<ArrayView4<'a, bf16>> for KvData<'a> {
    fn from(a: ArrayView4<'a, bf16>) -> KvData<'a> {
        KvData::Bf16(a)
    }
}

impl<'a> From<ArrayView4<'a, f16>> for KvData<'a> {
    fn from(a: ArrayView4<'a, f16>) -> KvData<'a> {
        KvData::F16(a)
    }
}

impl<'a> KvData<'a> {
    pub fn elem(&self) -> ElemType {
        match self {
            KvData::F32(_) => ElemType::F32,
            KvData::Bf16(_) => ElemType::Bf16,
            KvData::F16(_) => ElemType::F16,
            KvData::Int8 { .. } => ElemType::Int8,
            KvData::Fp8 { .. } => ElemType::Fp8,
        }
    }

    pub fn shape(&self) -> &[usize] {
        match self {
            KvData::F32(a) => a.shape(),
            KvData::Bf16(a) => a.shape(),
            KvData::F16(a) => a.shape(),
            KvData::Int8 { data, .. } => data.shape(),
            KvData::Fp8 { data, .. } => data.shape(),
        }
    }

    /// Strides in elements.
    pub fn strides(&self) -> &[isize] {
        match self {
            KvData::F32(a) => a.strides(),
            KvData::Bf16(a) => a.strides(),
            KvData::F16(a) => a.strides(),
            KvData::Int8 { data, .. } => data.strides(),
            KvData::Fp8 { data, .. } => data.strides(),
        }
    }

    /// The same view, borrowed for a shorter time.
    pub fn reborrow(&self) -> KvData<'_> {
        match self {
            KvData::F32(a) => KvData::F32(a.view()),
            KvData::Bf16(a) => KvData::Bf16(a.view()),
            KvData::F16(a) => KvData::F16(a.view()),
            KvData::Int8 { data, scales } => KvData::Int8 {
                data: data.view(),
                scales: scales.view(),
            },
            KvData::Fp8 { data, scales } => KvData::Fp8 {
                data: data.view(),
                scales: scales.view(),
            },
        }
    }

    /// Rows `[i, j, keys, ..]` as f32 (borrowed when they are f32, widened
    /// or dequantized otherwise).
    pub(crate) fn rows_f32(
        &self,
        i: usize,
        j: usize,
        keys: std::ops::Range<usize>,
    ) -> ndarray::CowArray<'_, f32, ndarray::Ix2> {
        use ndarray::s;
        let scaled = |data: ndarray::Array2<f32>, scales: &ArrayView3<'_, f32>| {
            let sc = scales.slice(s![i, j, keys.clone()]);
            let mut data = data;
            for (mut row, &sv) in data.rows_mut().into_iter().zip(sc.iter()) {
                row.mapv_inplace(|x| x * sv);
            }
            data
        };
        let at = s![i, j, keys.clone(), ..];
        match self {
            KvData::F32(a) => a.slice(at).into(),
            KvData::Bf16(a) => a.slice(at).mapv(bf16::to_f32).into(),
            KvData::F16(a) => a.slice(at).mapv(f16::to_f32).into(),
            KvData::Int8 { data, scales } => {
                scaled(data.slice(at).mapv(|x| x as f32), scales).into()
            }
            KvData::Fp8 { data, scales } => scaled(data.slice(at).mapv(e4m3_to_f32), scales).into(),
        }
    }

    /// The same data with axes 1 and 2 swapped (scales too): a pool `[pages,
    /// page_size, HKV, D]` as `[pages, HKV, page_size, D]`, so that
    /// `rows_f32(page, kh, slots)` reads a run of slots of one KV
    /// head.
    pub fn slots_by_head(&self) -> KvData<'_> {
        let swap = [0, 2, 1, 3];
        match self {
            KvData::F32(a) => KvData::F32(a.view().permuted_axes(swap)),
            KvData::Bf16(a) => KvData::Bf16(a.view().permuted_axes(swap)),
            KvData::F16(a) => KvData::F16(a.view().permuted_axes(swap)),
            KvData::Int8 { data, scales } => KvData::Int8 {
                data: data.view().permuted_axes(swap),
                scales: scales.view().permuted_axes([0, 2, 1]),
            },
            KvData::Fp8 { data, scales } => KvData::Fp8 {
                data: data.view().permuted_axes(swap),
                scales: scales.view().permuted_axes([0, 2, 1]),
            },
        }
    }

    /// The data, when it is f32.
    pub fn as_f32(&self) -> Option<&ArrayView4<'a, f32>> {
        match self {
            KvData::F32(a) => Some(a),
            _ => None,
        }
    }

    /// A copy in standard layout (scales too).
    pub fn to_standard(&self) -> KvArray {
        fn std<T: Clone>(a: &ArrayView4<'_, T>) -> Array4<T> {
            a.as_standard_layout().into_owned()
        }
        match self {
            KvData::F32(a) => KvArray::F32(std(a)),
            KvData::Bf16(a) => KvArray::Bf16(std(a)),
            KvData::F16(a) => KvArray::F16(std(a)),
            KvData::Int8 { data, scales } => KvArray::Int8 {
                data: std(data),
                scales: scales.as_standard_layout().into_owned(),
            },
            KvData::Fp8 { data, scales } => KvArray::Fp8 {
                data: std(data),
                scales: scales.as_standard_layout().into_owned(),
            },
        }
    }

    /// Whether a quantized operand's scales have one value per row (shape
    /// `[A, B, C]` for data `[A, B, C, D]`); `Err` holds their shape.
    pub fn scales_fit(&self) -> Result<(), Vec<usize>> {
        match self.scales() {
            Some(sc) if sc.shape() != &self.shape()[..3] => Err(sc.shape().to_vec()),
            _ => Ok(()),
        }
    }

    /// Rows `[i, j, .., ..]` as an operand of shape `[1, 1, C, D]` (scales
    /// `[1, 1, C]`): one slot of a pool, every KV head.
    ///
    /// # Panics
    ///
    /// If `[i, j]` is outside the first two axes (or the scales are shorter
    /// than the data: [`KvData::scales_fit`]).
    pub fn rows_at(&self, i: usize, j: usize) -> KvData<'_> {
        use ndarray::s;
        let at = s![i..i + 1, j..j + 1, .., ..];
        let sat = s![i..i + 1, j..j + 1, ..];
        match self {
            KvData::F32(a) => KvData::F32(a.slice(at)),
            KvData::Bf16(a) => KvData::Bf16(a.slice(at)),
            KvData::F16(a) => KvData::F16(a.slice(at)),
            KvData::Int8 { data, scales } => KvData::Int8 {
                data: data.slice(at),
                scales: scales.slice(sat),
            },
            KvData::Fp8 { data, scales } => KvData::Fp8 {
                data: data.slice(at),
                scales: scales.slice(sat),
            },
        }
    }

    /// The scales of a quantized operand.
    pub fn scales(&self) -> Option<&ArrayView3<'a, f32>> {
        match self {
            KvData::Int8 { scales, .. } | KvData::Fp8 { scales, .. } => Some(scales),
            _ => None,
        }
    }

    /// Element `i` as every backend reads it (dequantized: `f32(x) * scale`).
    ///
    /// # Panics
    ///
    /// As ndarray's indexing, where `i` is out of range, or where the scales
    /// do not fit the data ([`KvData::scales_fit`]; binding refuses such
    /// operands).
    #[inline]
    pub fn get(&self, i: [usize; 4]) -> f32 {
        match self {
            KvData::F32(a) => a[i],
            KvData::Bf16(a) => a[i].to_f32(),
            KvData::F16(a) => a[i].to_f32(),
            KvData::Int8 { data, scales } => data[i] as f32 * scales[[i[0], i[1], i[2]]],
            KvData::Fp8 { data, scales } => e4m3_to_f32(data[i]) * scales[[i[0], i[1], i[2]]],
        }
    }

    /// Every element as every backend reads it ([`KvData::get`]): widened,
    /// or dequantized with its scales.
    ///
    /// # Errors
    ///
    /// Scales that are not one per row of `D` values
    /// ([`crate::bind::BindError::ScalesShape`], as binding reports them).
    pub fn dequantize(&self) -> Result<Array4<f32>, crate::bind::BindError> {
        self.scales_fit()
            .map_err(|found| crate::bind::BindError::ScalesShape {
                which: "K/V",
                expected: self.shape()[..3].to_vec(),
                found,
            })?;
        Ok(self.to_f32())
    }

    /// Every element as f32 (for backends that take f32 operands and make a
    /// copy of their own), of an operand whose scales fit (bound).
    pub(crate) fn to_f32(&self) -> Array4<f32> {
        let sh = self.shape();
        let mut out = Array4::zeros((sh[0], sh[1], sh[2], sh[3]));
        for i in 0..sh[0] {
            for j in 0..sh[1] {
                out.slice_mut(ndarray::s![i, j, .., ..])
                    .assign(&self.rows_f32(i, j, 0..sh[2]));
            }
        }
        out
    }

    /// The stored data: pointer to element `[0, 0, 0, 0]`, for the runtime.
    pub fn as_ptr(&self) -> *const u8 {
        match self {
            KvData::F32(a) => a.as_ptr().cast(),
            KvData::Bf16(a) => a.as_ptr().cast(),
            KvData::F16(a) => a.as_ptr().cast(),
            KvData::Int8 { data, .. } => data.as_ptr().cast(),
            KvData::Fp8 { data, .. } => data.as_ptr().cast(),
        }
    }
}

/// An owned K or V operand (see [`KvData`]).
#[derive(Clone, Debug, PartialEq)]
pub enum KvArray {
    F32(Array4<f32>),
    Bf16(Array4<bf16>),
    F16(Array4<f16>),
    Int8 {
        data: Array4<i8>,
        scales: Array3<f32>,
    },
    Fp8 {
        data: Array4<u8>,
        scales: Array3<f32>,
    },
}

impl KvArray {
    /// `x` in type `elem`: rounded (bf16, f16; nearest, ties to even) or
    /// quantized with a scale per row of the last axis (int8, fp8), in
    /// standard layout whatever the layout of `x`. A row holding NaN or inf
    /// gets a NaN or infinite scale (its values all dequantize to NaN), which
    /// binding refuses at a key a sequence uses.
    pub fn quantize(x: ArrayView4<'_, f32>, elem: ElemType) -> KvArray {
        let x = x.as_standard_layout();
        match elem {
            ElemType::F32 => KvArray::F32(x.into_owned()),
            ElemType::Bf16 => KvArray::Bf16(x.mapv(bf16::from_f32)),
            ElemType::F16 => KvArray::F16(x.mapv(f16::from_f32)),
            ElemType::Int8 | ElemType::Fp8 => {
                let (a, b, c, d) = x.dim();
                let mut scales = Array3::<f32>::zeros((a, b, c));
                let mut bytes = Array4::<u8>::zeros((a, b, c, d));
                Zip::from(bytes.lanes_mut(Axis(3)))
                    .and(&mut scales)
                    .and(x.lanes(Axis(3)))
                    .for_each(|out, s, row| {
                        *s = quantize_row(row.iter().copied(), out, elem);
                    });
                match elem {
                    ElemType::Int8 => KvArray::Int8 {
                        data: bytes.mapv(|b| b as i8),
                        scales,
                    },
                    _ => KvArray::Fp8 {
                        data: bytes,
                        scales,
                    },
                }
            }
        }
    }

    /// `x` in type `elem`, as [`KvArray::quantize`] makes it; f32 data in
    /// standard layout is moved, not copied.
    pub fn from_f32(x: Array4<f32>, elem: ElemType) -> KvArray {
        match elem {
            ElemType::F32 if x.is_standard_layout() => KvArray::F32(x),
            _ => KvArray::quantize(x.view(), elem),
        }
    }

    /// The bytes of the data and of the scales (what a call reading every
    /// row reads): borrowed in memory order; an array that is not contiguous
    /// in memory (built by hand from a sliced one) is copied in logical order.
    pub fn bytes(&self) -> Vec<std::borrow::Cow<'_, [u8]>> {
        use std::borrow::Cow;
        fn raw<T: Copy, D: ndarray::Dimension>(a: &ndarray::Array<T, D>) -> Cow<'_, [u8]> {
            fn bytes_of<T>(a: &[T]) -> &[u8] {
                // SAFETY: the elements are plain numbers (f32, u16 bit
                // patterns, i8, u8) without padding; any initialised bytes
                // may be read as u8.
                unsafe { std::slice::from_raw_parts(a.as_ptr().cast(), std::mem::size_of_val(a)) }
            }
            match a.as_slice_memory_order() {
                Some(xs) => Cow::Borrowed(bytes_of(xs)),
                None => {
                    let mut out = Vec::with_capacity(std::mem::size_of::<T>() * a.len());
                    for x in a {
                        out.extend_from_slice(bytes_of(std::slice::from_ref(x)));
                    }
                    Cow::Owned(out)
                }
            }
        }
        match self {
            KvArray::F32(a) => vec![raw(a)],
            KvArray::Bf16(a) => vec![raw(a)],
            KvArray::F16(a) => vec![raw(a)],
            KvArray::Int8 { data, scales } => vec![raw(data), raw(scales)],
            KvArray::Fp8 { data, scales } => vec![raw(data), raw(scales)],
        }
    }

    pub fn view(&self) -> KvData<'_> {
        match self {
            KvArray::F32(a) => KvData::F32(a.view()),
            KvArray::Bf16(a) => KvData::Bf16(a.view()),
            KvArray::F16(a) => KvData::F16(a.view()),
            KvArray::Int8 { data, scales } => KvData::Int8 {
                data: data.view(),
                scales: scales.view(),
            },
            KvArray::Fp8 { data, scales } => KvData::Fp8 {
                data: data.view(),
                scales: scales.view(),
            },
        }
    }

    pub fn elem(&self) -> ElemType {
        self.view().elem()
    }

    /// Writes one row of `D` elements (`[i, j, k, ..]`: one token of one KV
    /// head) from f32, rounding or quantizing it (with a new scale) as
    /// [`KvArray::quantize`] does: how a server appends a decoding step's
    /// keys and values to its cache.
    ///
    /// # Panics
    ///
    /// If `row` is not `D` long or the index is out of range.
    pub fn set_row(&mut self, [i, j, k]: [usize; 3], row: &[f32]) {
        fn put<T>(mut lane: ArrayViewMut1<'_, T>, row: &[f32], f: impl Fn(f32) -> T) {
            assert_eq!(lane.len(), row.len(), "a row has D elements");
            for (o, &x) in lane.iter_mut().zip(row) {
                *o = f(x);
            }
        }
        match self {
            KvArray::F32(a) => put(a.slice_mut(ndarray::s![i, j, k, ..]), row, |x| x),
            KvArray::Bf16(a) => put(a.slice_mut(ndarray::s![i, j, k, ..]), row, bf16::from_f32),
            KvArray::F16(a) => put(a.slice_mut(ndarray::s![i, j, k, ..]), row, f16::from_f32),
            KvArray::Int8 { data, scales } => {
                let mut lane = data.slice_mut(ndarray::s![i, j, k, ..]);
                assert_eq!(lane.len(), row.len(), "a row has D elements");
                let mut bytes = vec![0u8; row.len()];
                scales[[i, j, k]] = quantize_row(
                    row.iter().copied(),
                    ArrayViewMut1::from(&mut bytes[..]),
                    ElemType::Int8,
                );
                for (o, b) in lane.iter_mut().zip(bytes) {
                    *o = b as i8;
                }
            }
            KvArray::Fp8 { data, scales } => {
                assert_eq!(data.shape()[3], row.len(), "a row has D elements");
                scales[[i, j, k]] = quantize_row(
                    row.iter().copied(),
                    data.slice_mut(ndarray::s![i, j, k, ..]),
                    ElemType::Fp8,
                );
            }
        }
    }
}

impl KvArray {
    /// Appends one decoding step to a paged pool `[num_pages, page_size,
    /// HKV, D]`: `step` `[B, HKV, D]` holds each sequence's new key (or
    /// value) row per KV head, written (rounded or quantized, with fresh
    /// scales) at position `kv_lens[b]` of sequence `b`, in page
    /// `page_table[b, kv_lens[b] / page_size]`. The caller then adds 1 to
    /// each length. Only those `B x HKV` rows are written.
    ///
    /// # Errors
    ///
    /// Nothing is written on any of these ([`AppendError`]): a step or table
    /// of the wrong shape, a negative length, a position whose page the
    /// table does not list inside the pool, pages of 0 slots, scales that are
    /// not one per row, or two sequences appending into the same slot
    /// (sequences may share the full pages of a common prefix, never the slot
    /// they write; a batch that pads with inactive rows gives each its own
    /// slot, or leaves them out of the step).
    pub fn append(
        &mut self,
        page_table: ndarray::ArrayView2<'_, i32>,
        kv_lens: ndarray::ArrayView1<'_, i32>,
        step: ndarray::ArrayView3<'_, f32>,
    ) -> Result<(), AppendError> {
        let sh = self.view().shape().to_vec();
        let (pages, ps, hkv, d) = (sh[0], sh[1], sh[2], sh[3]);
        let b = kv_lens.len();
        if step.shape() != [b, hkv, d] || page_table.nrows() != b {
            return Err(AppendError::Shape {
                expected: [b, hkv, d],
                step: step.shape().to_vec(),
                table: page_table.shape().to_vec(),
            });
        }
        self.view()
            .scales_fit()
            .map_err(|found| AppendError::ScalesShape {
                data: sh.clone(),
                found,
            })?;
        let at = append_slots(pages, ps, page_table, kv_lens)?;
        for (seq, (page, slot)) in at.into_iter().enumerate() {
            for kh in 0..hkv {
                let row: Vec<f32> = step.slice(ndarray::s![seq, kh, ..]).to_vec();
                self.set_row([page, slot, kh], &row);
            }
        }
        Ok(())
    }
}

/// Where one decoding step appends in a pool of `pages` pages of `ps`
/// slots: `(page, slot)` of key `kv_lens[b]` of each sequence `b`, through
/// its row of `page_table` ([`KvArray::append`], and the device copy of a
/// pool that mirrors it).
///
/// # Errors
///
/// A negative length, a key whose page the table does not list inside the
/// pool, or two sequences appending into the same slot (one would overwrite
/// the other's key).
pub fn append_slots(
    pages: usize,
    ps: usize,
    page_table: ndarray::ArrayView2<'_, i32>,
    kv_lens: ndarray::ArrayView1<'_, i32>,
) -> Result<Vec<(usize, usize)>, AppendError> {
    if ps == 0 {
        return Err(AppendError::ZeroPageSize);
    }
    let mut at = Vec::with_capacity(kv_lens.len());
    let mut taken = std::collections::HashMap::with_capacity(kv_lens.len());
    for (seq, &len) in kv_lens.iter().enumerate() {
        let key = usize::try_from(len).map_err(|_| AppendError::NegativeLen { b: seq, len })?;
        let slot = key / ps;
        let page = page_table
            .get([seq, slot])
            .copied()
            .filter(|&p| p >= 0 && (p as usize) < pages)
            .ok_or(AppendError::NoPage {
                b: seq,
                key,
                slot,
                pages,
            })?;
        let (page, slot) = (page as usize, key % ps);
        if let Some(&first) = taken.get(&(page, slot)) {
            return Err(AppendError::SharedSlot {
                first,
                second: seq,
                page,
                slot,
            });
        }
        taken.insert((page, slot), seq);
        at.push((page, slot));
    }
    Ok(at)
}

/// Quantizes one row into `out` (int8 as its two's-complement byte, fp8 as
/// e4m3fn bits) and returns its scale.
fn quantize_row(
    row: impl Iterator<Item = f32> + Clone,
    mut out: ArrayViewMut1<'_, u8>,
    elem: ElemType,
) -> f32 {
    // NaN propagates (`f32::max` would drop it): a row holding NaN or inf
    // gets a non-finite scale, so every value it dequantizes to is NaN and a
    // call that uses it is refused (`attnc::bind::kv_scales`), where int8
    // would otherwise turn a NaN into a silent 0.
    let absmax = if row.clone().any(f32::is_nan) {
        f32::NAN
    } else {
        row.clone().fold(0f32, |m, x| m.max(x.abs()))
    };
    let mut scale = absmax / elem.quant_max();
    if scale.is_finite() && !(scale * elem.quant_max()).is_finite() {
        // absmax near f32::MAX: the quotient rounded up, and the top code
        // would dequantize past f32. One step down; the top value saturates.
        scale = f32::from_bits(scale.to_bits() - 1);
    }
    for (o, x) in out.iter_mut().zip(row) {
        let y = if scale > 0.0 { x / scale } else { 0.0 };
        *o = match elem {
            ElemType::Int8 => (round_even(y.clamp(-127.0, 127.0)) as i8) as u8,
            _ => f32_to_e4m3(y),
        };
    }
    scale
}

/// q given in bf16 or f16 (the `half` crate's types) as the f32 array
/// `Inputs::q` takes: every value is exact in f32, so a call on it computes
/// with the half-precision values themselves.
pub fn widen<T: Copy + Into<f32>>(x: ArrayView4<'_, T>) -> Array4<f32> {
    x.mapv(Into::into)
}

/// `x` with every element rounded to `elem` (bf16, f16) and kept as f32:
/// q in a half type, on a backend that computes with f32 operands (the
/// product of two bf16 or f16 values is exact in f32).
pub fn round_to(x: ArrayView4<'_, f32>, elem: ElemType) -> Array4<f32> {
    x.mapv(|v| elem.round(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `holds` is exactly "round keeps it": on every f16 and bf16 value
    /// widened, their neighbours one f32 ulp away, and a sweep of all f32
    /// bit patterns.
    #[test]
    fn holds_is_what_rounding_keeps() {
        let kept = |e: ElemType, x: f32| e.round(x).to_bits() == x.to_bits() || x.is_nan();
        let mut xs: Vec<f32> = (0..=u16::MAX)
            .flat_map(|h| [f16::from_bits(h).to_f32(), bf16::from_bits(h).to_f32()])
            .flat_map(|x| {
                let b = x.to_bits();
                [
                    x,
                    f32::from_bits(b.wrapping_add(1)),
                    f32::from_bits(b.wrapping_sub(1)),
                ]
            })
            .collect();
        xs.extend((0..=u32::MAX).step_by(4099).map(f32::from_bits));
        for e in [ElemType::F16, ElemType::Bf16, ElemType::F32] {
            for &x in &xs {
                assert_eq!(e.holds(x), kept(e, x), "{e} {x:e} ({:#x})", x.to_bits());
            }
        }
    }

    #[test]
    fn e4m3_round_trips_every_code_and_rounds_to_nearest_even() {
        for bits in 0..=255u8 {
            let x = e4m3_to_f32(bits);
            if bits & 0x7f == 0x7f {
                assert!(x.is_nan());
                assert_eq!(f32_to_e4m3(x) & 0x7f, 0x7f);
            } else {
                assert_eq!(f32_to_e4m3(x), bits, "{bits:#x} = {x}");
            }
        }
        // The largest finite value, the smallest subnormal, and ties.
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0x01), (-9f32).exp2());
        assert_eq!(f32_to_e4m3(1000.0), 0x7e);
        assert_eq!(f32_to_e4m3(-1000.0), 0xfe);
        // 1.0625 lies halfway between 1.0 (code 0x38) and 1.125 (0x39): even.
        assert_eq!(f32_to_e4m3(1.0625), 0x38);
        assert_eq!(f32_to_e4m3(1.1875), 0x3a);
        // Halfway between two subnormals 1 and 2 * 2^-9: even (2).
        assert_eq!(f32_to_e4m3(1.5 * (-9f32).exp2()), 0x02);
        // Between the largest subnormal (7 * 2^-9) and the first normal (2^-6).
        assert_eq!(f32_to_e4m3(7.5 * (-9f32).exp2()), 0x08);
        // Every f32 rounds to a nearest code.
        let codes: Vec<f32> = (0..0x7f).map(e4m3_to_f32).collect();
        let mut x = 0f32;
        while x < 460.0 {
            let got = e4m3_to_f32(f32_to_e4m3(x));
            let best = codes
                .iter()
                .map(|c| (c - x).abs())
                .fold(f32::INFINITY, f32::min);
            assert_eq!((got - x).abs(), best, "x = {x}");
            x = x * 1.013 + 1e-4;
        }
    }

    /// Arrays of any layout quantize into standard layout, and `bytes` gives
    /// every array's bytes without panicking, copying one that is not
    /// contiguous in memory.
    #[test]
    fn quantized_arrays_are_standard_and_their_bytes_any_layout() {
        use ndarray::ShapeBuilder;
        let standard = Array4::from_shape_fn((2, 3, 4, 5), |(a, b, c, d)| {
            (a * 60 + b * 20 + c * 5 + d) as f32 * 0.25 - 7.0
        });
        let mut fortran = Array4::<f32>::zeros((2, 3, 4, 5).f());
        fortran.assign(&standard);
        let reversed = standard.slice(ndarray::s![..;-1, .., .., ..]);
        for elem in ElemType::ALL {
            for x in [fortran.view(), reversed] {
                let want = KvArray::quantize(x.to_owned().as_standard_layout().view(), elem);
                for got in [
                    KvArray::quantize(x, elem),
                    KvArray::from_f32(x.to_owned(), elem),
                ] {
                    assert_eq!(got, want, "{elem}");
                    assert_eq!(got.view().strides(), want.view().strides(), "{elem}");
                    assert_eq!(got.bytes(), want.bytes(), "{elem}");
                    assert_eq!(got.bytes()[0].len(), 120 * elem.size(), "{elem}");
                }
            }
        }
        // Hand-built: Fortran order (contiguous, borrowed in memory order)
        // and a sliced array (not contiguous: copied).
        assert_eq!(KvArray::F32(fortran).bytes()[0].len(), 480);
        let sliced = standard.clone().slice_move(ndarray::s![.., .., ..;2, ..]);
        let kv = KvArray::F32(sliced.clone());
        let values: Vec<f32> = kv.bytes()[0]
            .chunks(4)
            .map(|c| f32::from_ne_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(values, sliced.iter().copied().collect::<Vec<_>>());
    }

    #[test]
    fn quantized_rows_have_absmax_scales_and_dequantize_within_half_a_step() {
        let x = Array4::from_shape_fn((2, 3, 4, 9), |(a, b, c, d)| {
            ((a * 31 + b * 17 + c * 7 + d * 5) % 23) as f32 * 0.37 - 4.0
        });
        let mut zero_row = x.clone();
        zero_row.slice_mut(ndarray::s![1, 2, 3, ..]).fill(0.0);
        for elem in [ElemType::Int8, ElemType::Fp8] {
            let q = KvArray::quantize(zero_row.view(), elem);
            let v = q.view();
            let scales = v.scales().unwrap();
            for ((a, b, c), &s) in scales.indexed_iter() {
                let row = zero_row.slice(ndarray::s![a, b, c, ..]);
                let absmax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
                assert_eq!(s, absmax / elem.quant_max());
                for (t, &want) in row.iter().enumerate() {
                    let got = v.get([a, b, c, t]);
                    // int8: half a step of `s`; e4m3: half an ulp of 3 bits.
                    let bound = match elem {
                        ElemType::Int8 => 0.5 * s * 1.0001,
                        _ => (want.abs() / 16.0).max(s * (-10f32).exp2()) * 1.0001,
                    };
                    assert!((got - want).abs() <= bound, "{elem} {got} vs {want}");
                }
            }
            assert_eq!(scales[[1, 2, 3]], 0.0);
            assert!((0..9).all(|t| v.get([1, 2, 3, t]) == 0.0));
            // The absmax element is represented exactly at the top code.
            let mut owned = q.clone();
            let row: Vec<f32> = (0..9).map(|t| x[[0, 1, 2, t]]).collect();
            owned.set_row([1, 2, 3], &row);
            for t in 0..9 {
                assert_eq!(owned.view().get([1, 2, 3, t]), v.get([0, 1, 2, t]));
            }
        }
        for elem in [ElemType::Bf16, ElemType::F16, ElemType::F32] {
            let q = KvArray::quantize(x.view(), elem);
            assert_eq!(q.elem(), elem);
            for (i, &want) in x.indexed_iter() {
                let i = [i.0, i.1, i.2, i.3];
                assert_eq!(q.view().get(i), elem.round(want));
            }
        }
    }

    #[test]
    fn append_quantizes_one_step_into_each_sequences_next_slot() {
        let pool = Array4::<f32>::from_elem((4, 2, 2, 3), f32::NAN);
        let table = ndarray::arr2(&[[2, 0], [3, -1]]);
        let lens = ndarray::arr1(&[3, 1]);
        let step =
            ndarray::Array3::from_shape_fn((2, 2, 3), |(b, h, t)| (b * 6 + h * 3 + t) as f32 - 4.0);
        for elem in ElemType::ALL {
            let mut a = KvArray::quantize(pool.view(), elem);
            a.append(table.view(), lens.view(), step.view()).unwrap();
            // Sequence 0's key 3 is page 0, slot 1; sequence 1's key 1 is page 3, slot 1.
            let mut want = KvArray::quantize(pool.view(), elem);
            for (b, page) in [(0, 0), (1, 3)] {
                for kh in 0..2 {
                    let row: Vec<f32> = step.slice(ndarray::s![b, kh, ..]).to_vec();
                    want.set_row([page, 1, kh], &row);
                }
            }
            assert_eq!(a.view().get([0, 1, 1, 2]), want.view().get([0, 1, 1, 2]));
            // Every element equal, NaN (the pool's stale slots) to NaN.
            let same = |a: &KvArray, b: &KvArray| {
                for (i, _) in pool.indexed_iter() {
                    let i = [i.0, i.1, i.2, i.3];
                    let (x, y) = (a.view().get(i), b.view().get(i));
                    assert!(x == y || (x.is_nan() && y.is_nan()), "{elem} {i:?}");
                }
            };
            same(&a, &want);
            // A position past the table, and a step of the wrong shape.
            let full = ndarray::arr1(&[4, 1]);
            let err = a
                .append(table.view(), full.view(), step.view())
                .unwrap_err();
            assert!(
                err.to_string().contains("sequence 0 appends key 4"),
                "{err}"
            );
            let err = a
                .append(
                    table.view(),
                    lens.view(),
                    step.slice(ndarray::s![.., .., ..2]),
                )
                .unwrap_err();
            assert!(err.to_string().contains("[2, 2, 3]"), "{err}");
            let neg = ndarray::arr1(&[-1, 1]);
            let err = a.append(table.view(), neg.view(), step.view()).unwrap_err();
            assert_eq!(err, AppendError::NegativeLen { b: 0, len: -1 });
            // Two sequences whose next key is the same slot of a page they
            // share: refused, nothing written.
            let shared = ndarray::arr2(&[[2, 0], [0, -1]]);
            let (before, lens2) = (a.clone(), ndarray::arr1(&[3, 1]));
            let err = a
                .append(shared.view(), lens2.view(), step.view())
                .unwrap_err();
            assert_eq!(
                err,
                AppendError::SharedSlot {
                    first: 0,
                    second: 1,
                    page: 0,
                    slot: 1
                }
            );
            same(&a, &before);
            // Pages of no slots, and scales that are not one per row:
            // refused, nothing written.
            let empty = Array4::<f32>::zeros((4, 0, 2, 3));
            let mut e = KvArray::quantize(empty.view(), elem);
            let err = e
                .append(table.view(), lens.view(), step.view())
                .unwrap_err();
            assert_eq!(err, AppendError::ZeroPageSize);
            if let KvArray::Int8 { data, .. } = KvArray::quantize(pool.view(), ElemType::Int8) {
                let mut bad = KvArray::Int8 {
                    data,
                    scales: ndarray::Array3::zeros((4, 2, 1)),
                };
                let before = bad.clone();
                let err = bad
                    .append(table.view(), lens.view(), step.view())
                    .unwrap_err();
                assert_eq!(
                    err,
                    AppendError::ScalesShape {
                        data: vec![4, 2, 2, 3],
                        found: vec![4, 2, 1]
                    }
                );
                assert_eq!(bad, before);
            }
        }
    }

    /// `dequantize` gives every element as `get` reads it, and refuses
    /// scales that are not one per row instead of panicking.
    #[test]
    fn dequantize_reads_every_element_and_refuses_misfit_scales() {
        let x = Array4::<f32>::from_shape_fn((2, 3, 4, 5), |(a, b, c, d)| {
            (a * 60 + b * 20 + c * 5 + d) as f32 * 0.37 - 20.0
        });
        for elem in ElemType::ALL {
            let a = KvArray::quantize(x.view(), elem);
            let got = a.view().dequantize().unwrap();
            for (i, &y) in got.indexed_iter() {
                assert_eq!(y, a.view().get([i.0, i.1, i.2, i.3]), "{elem} {i:?}");
            }
        }
        if let KvArray::Int8 { data, .. } = KvArray::quantize(x.view(), ElemType::Int8) {
            let bad = KvArray::Int8 {
                data,
                scales: ndarray::Array3::ones((2, 3, 2)),
            };
            let err = bad.view().dequantize().unwrap_err();
            assert!(
                err.to_string().contains("[2, 3, 2], expected [2, 3, 4]"),
                "{err}"
            );
        }
    }

    /// int8 has no NaN: a row holding NaN or inf gets a non-finite scale
    /// (every value of it dequantizes to NaN) instead of a silent 0; fp8
    /// alike, so that the two refuse the same rows. Other rows keep finite
    /// scales.
    #[test]
    fn a_non_finite_row_quantizes_to_a_non_finite_scale() {
        let mut x = Array4::<f32>::from_shape_fn((1, 1, 4, 3), |(_, _, r, c)| (r + c) as f32 - 2.0);
        x[[0, 0, 1, 2]] = f32::NAN;
        x[[0, 0, 2, 0]] = f32::INFINITY;
        x[[0, 0, 3, 1]] = f32::NEG_INFINITY;
        for elem in [ElemType::Int8, ElemType::Fp8] {
            let q = KvArray::quantize(x.view(), elem);
            let scales = q.view().scales().unwrap().to_owned();
            assert!(scales[[0, 0, 0]].is_finite(), "{elem}");
            for r in 1..4 {
                assert!(!scales[[0, 0, r]].is_finite(), "{elem} row {r}");
                for c in 0..3 {
                    assert!(q.view().get([0, 0, r, c]).is_nan(), "{elem} [{r}, {c}]");
                }
            }
            assert_eq!(q.view().get([0, 0, 0, 2]), 0.0, "{elem}");
        }
    }

    #[test]
    fn round_even_is_round_ties_even_in_its_range() {
        let mut x = -140.0f32;
        while x < 140.0 {
            assert_eq!(round_even(x), x.round_ties_even(), "{x}");
            x += 0.125;
        }
        for x in [0.5f32, 1.5, 2.5, -0.5, -2.5, 126.5, 4_194_303.5] {
            assert_eq!(round_even(x), x.round_ties_even(), "{x}");
        }
    }

    #[test]
    fn element_types_parse_from_their_names() {
        for t in ElemType::ALL {
            assert_eq!(t.name().parse::<ElemType>(), Ok(t));
        }
        assert!("fp16".parse::<ElemType>().unwrap_err().contains("bf16"));
    }
}
