//! The ABI between generated CPU code and the runtime, as typed `#[repr(C)]`
//! structs: the task block a task function receives, the buffer descriptors
//! it reads through, and the error record it fills on failure.
//!
//! The runtime owns these types; the Cranelift backend addresses their
//! fields through the byte offsets below (`std::mem::offset_of!`), so the
//! generated loads and the Rust side cannot disagree about a layout. Every
//! field is 8 bytes: a task function reads each with one i64 load.

use std::mem::{offset_of, size_of};

/// Everything one task (one batch, head and query tile) needs, filled by
/// `runtime::exec` and read by the generated task function.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Task {
    pub b: i64,
    pub h: i64,
    /// Absolute query position of the tile's first row (row0 + q_offset).
    pub q_start: i64,
    pub rows: i64,
    /// Q tile: `rows` rows of `d` floats, row stride `d` (read only: it may be
    /// the caller's input).
    pub q: *const f32,
    /// Packed K of the head (see `runtime::gemm::PackedK`).
    pub k: *const f32,
    /// V of the head (packed, or the caller's rows), and its row stride in floats.
    pub v: *const f32,
    pub v_stride: i64,
    /// FULL key-tile ranges of this query tile: `n_full` (start, end) u32 pairs.
    pub full: *const u32,
    pub n_full: i64,
    /// PARTIAL key tiles of this query tile: `n_part` u32.
    pub part: *const u32,
    pub n_part: i64,
    pub kv_len: i64,
    pub d: i64,
    /// Scratch: S `[bq x bkv]`, m `[bq]`, l `[bq]`, acc `[bq x d]` (f32).
    pub s: *mut f32,
    pub m: *mut f32,
    pub l: *mut f32,
    pub acc: *mut f32,
    /// Row-level values `[n_row][bq]` and column-level values `[n_col][bkv]`, 8 bytes each.
    pub rowvals: *mut u64,
    pub colvals: *mut u64,
    /// Where a failing task describes its error.
    pub err: *mut ErrorRecord,
    /// One descriptor per buffer of the spec, in declaration order.
    pub bufs: *const BufferDesc,
    /// Shapes B, H, HKV, Q, KV, D.
    pub shapes: *const i64,
    /// One byte per key tile of the head: nonzero where V holds a non-finite
    /// value (`runtime::gemm::nonfinite_tiles`); such tiles take the exact `pv`.
    pub v_flags: *const u8,
    /// Where the task's keys are when they are read in place (`KvSource::InPlace`).
    pub kv_view: *const KvView,
    /// Absolute position of key row 0 (`kv = key row + kv_start`).
    pub kv_start: i64,
}

/// Where the key and value rows of one (sequence, KV head) live, for the
/// in-place tile products (`runtime::gemm::view`): key `j` is in page
/// `table[j / page_size]`, slot `j % page_size`, at `k + page * page_stride +
/// slot * row_stride` (and likewise in `v`), strides in elements of type
/// `elem`. Dense rows are one page as long as the sequence, with a table of
/// one entry, 0.
///
/// Quantized elements (`elem` int8 or fp8) have a float32 scale per key row:
/// that of key `j` is at `k_scales + page * scale_page_stride + slot *
/// scale_row_stride` (and in `v_scales`), and element `t` of the row stands
/// for `f32(x[t]) * scale`.
///
/// A view may span several KV heads of the sequence, for a tile that holds
/// every query head ([`crate::tile::nest::RowMap::AllHeads`]): tile row `r`
/// reads KV head `r / head_rows`, whose rows start `head_stride` elements
/// (and whose scales start `scale_head_stride` floats) after the previous
/// head's. A view of one KV head has `head_rows` at least the tile's rows.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KvView {
    pub k: *const u8,
    pub v: *const u8,
    /// Keys of the sequence: the table lists a page for every key below it.
    pub len: i64,
    pub row_stride: i64,
    pub page_stride: i64,
    pub page_size: i64,
    pub table: *const i32,
    pub head_stride: i64,
    pub head_rows: i64,
    pub elem: crate::tensor::ElemType,
    pub k_scales: *const f32,
    pub v_scales: *const f32,
    pub scale_row_stride: i64,
    pub scale_page_stride: i64,
    pub scale_head_stride: i64,
}

impl KvView {
    /// The view of a pool in the standard layout `[pages, page_size, hkv,
    /// d]` (scales `[pages, page_size, hkv]`, or null), from KV head 0 of
    /// `k` and `v`, for a tile of `head_rows` rows per KV head, keys `..len`
    /// listed by `table`.
    #[allow(clippy::too_many_arguments)]
    pub fn pool(
        (k, v): (*const u8, *const u8),
        (k_scales, v_scales): (*const f32, *const f32),
        table: *const i32,
        len: usize,
        [page_size, hkv, d]: [usize; 3],
        head_rows: usize,
        elem: crate::tensor::ElemType,
    ) -> KvView {
        KvView {
            k,
            v,
            len: len as i64,
            row_stride: (hkv * d) as i64,
            page_stride: (page_size * hkv * d) as i64,
            page_size: page_size as i64,
            table,
            head_stride: d as i64,
            head_rows: head_rows as i64,
            elem,
            k_scales,
            v_scales,
            scale_row_stride: hkv as i64,
            scale_page_stride: (page_size * hkv) as i64,
            scale_head_stride: 1,
        }
    }
}

// SAFETY: a view is only read, by the tasks of one run, and points at K/V rows
// and a page table that the run holds and nobody writes while it runs.
unsafe impl Send for KvView {}
// SAFETY: as above.
unsafe impl Sync for KvView {}

/// A buffer as generated code reads it: data, up to four dims and the
/// strides (in elements) of a standard-layout array.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BufferDesc {
    pub data: *const u8,
    pub dims: [i64; 4],
    pub strides: [i64; 4],
}

/// What a failing task reports: the kind, the IR value that failed, the
/// point (`q`, `kv`; -1 where the value does not depend on it) and up to four
/// indices of a read.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ErrorRecord {
    pub code: i64,
    pub value: i64,
    pub q: i64,
    pub kv: i64,
    pub index: [i64; 4],
}

/// The task function of a compiled CPU kernel.
pub type TaskFn = unsafe extern "C" fn(task: *const Task) -> i64;

/// A compiled CPU kernel as the runtime runs it: the verified kernel it was
/// lowered from, its task function (private: only the runtime calls it,
/// with a task block it has sized and filled) and the row- and column-level
/// scratch slots a task needs. A backend makes one
/// (`codegen::clif::kernel::CompiledKernel::code`); the runtime needs no
/// backend type.
#[derive(Clone, Copy)]
pub struct TaskCode<'a> {
    pub kernel: &'a crate::tile::Verified,
    pub(crate) task: TaskFn,
    pub row_slots: usize,
    pub col_slots: usize,
}

/// The kinds of run-time error, as `ErrorRecord::code` and as the (negated)
/// return value of `ancestor`.
pub mod code {
    /// A range-checked read out of range.
    pub const OUT_OF_RANGE: i64 = 1;
    /// Integer division or remainder by zero.
    pub const DIV_ZERO: i64 = 2;
    /// `ancestor` walked into a cycle.
    pub const CYCLE: i64 = 3;
    /// A read the optimiser proved in range is out of range (only with
    /// `JitOptions::check_proven_loads`): a compiler bug.
    pub const PROVEN_OUT_OF_RANGE: i64 = 4;
    /// A shift (`<<`, `>>`) by a count outside `0..=63`; `index[0]` is the count.
    pub const SHIFT: i64 = 5;
}

/// A failure as a backend recorded it, before decoding: the kind
/// ([`code`]), the failing instruction, the point, and the words recorded
/// with it (a read's indices, a shift's count, a cycle's start). The CPU
/// task's [`ErrorRecord`] and the GPU's error block both become one, and
/// [`decode`] turns it into the error the reference gives, so every backend
/// reports the same kind and coordinates.
#[derive(Clone, Debug)]
pub struct RawError<'a> {
    pub code: i64,
    pub value: usize,
    pub at: crate::sema::eval::Point,
    pub words: &'a [i64],
}

/// The [`EvalError`](crate::sema::eval::EvalError) of `raw`, for `kernel`
/// run on buffers of `shapes`. A proven read out of range
/// ([`code::PROVEN_OUT_OF_RANGE`]) is a compiler bug: it panics, naming it.
pub fn decode(
    raw: &RawError<'_>,
    kernel: &crate::tile::Kernel,
    shapes: &[&[usize]],
) -> crate::sema::eval::EvalError {
    use crate::sema::eval::EvalError;
    use crate::tile::Op;
    let v = raw.value;
    let span: miette::SourceSpan = kernel
        .spans
        .get(v)
        .copied()
        .flatten()
        .unwrap_or_default()
        .into();
    let at = raw.at;
    let word = |i: usize| raw.words.get(i).copied().unwrap_or(0);
    // The buffer a failing read or `ancestor` reads, and its index count.
    let (buf, n) = match kernel.insts.get(v).map(|i| &i.op) {
        Some(Op::Load {
            buffer, indices, ..
        }) => (*buffer as usize, indices.len()),
        Some(Op::Ancestor { parent, .. }) => (*parent as usize, 1),
        _ => (usize::MAX, 0),
    };
    let reads = || {
        assert!(
            buf != usize::MAX,
            "error kind {} at {v}, which does not read a buffer",
            raw.code
        );
        (
            kernel.buffers[buf].name.clone(),
            raw.words[..n.min(raw.words.len())].to_vec(),
            shapes[buf].to_vec(),
        )
    };
    match raw.code {
        code::DIV_ZERO => EvalError::DivisionByZero { at, span },
        code::SHIFT => EvalError::ShiftOutOfRange {
            count: word(0),
            at,
            span,
        },
        code::CYCLE => EvalError::AncestorCycle {
            buffer: reads().0,
            start: word(0),
            span,
        },
        code::PROVEN_OUT_OF_RANGE => {
            let (name, index, shape) = reads();
            panic!(
                "compiler bug: the read {v} of `{name}` was proven in range but reads index \
                 {index:?} of shape {shape:?} (at {at:?})\n{kernel}"
            )
        }
        code::OUT_OF_RANGE => {
            let (buffer, index, shape) = reads();
            EvalError::OutOfRange {
                buffer,
                index,
                shape,
                at,
                span,
            }
        }
        other => panic!("the kernel recorded error kind {other} at {v}, which is not a kind"),
    }
}

/// Byte offsets of the fields, for generated loads and stores.
pub mod offset {
    use super::*;

    macro_rules! offsets {
        ($ty:ty: $($name:ident = $field:ident),* $(,)?) => {
            $(pub const $name: i32 = offset_of!($ty, $field) as i32;)*
        };
    }
    offsets!(Task:
        B = b, H = h, Q_START = q_start, ROWS = rows, Q = q, K = k, V = v,
        V_STRIDE = v_stride, FULL = full, N_FULL = n_full, PART = part, N_PART = n_part,
        KV_LEN = kv_len, D = d, S = s, M = m, L = l, ACC = acc, ROWVALS = rowvals,
        COLVALS = colvals, ERR = err, BUFS = bufs, SHAPES = shapes, V_FLAGS = v_flags,
        KV_VIEW = kv_view, KV_START = kv_start,
    );
    offsets!(ErrorRecord: E_CODE = code, E_VALUE = value, E_Q = q, E_KV = kv, E_INDEX = index);
    offsets!(BufferDesc: DESC_DATA = data, DESC_DIMS = dims, DESC_STRIDES = strides);
    /// Bytes per buffer descriptor.
    pub const DESC_BYTES: i64 = size_of::<BufferDesc>() as i64;
}

// Generated code reads every field with one 8-byte load.
const _: () = assert!(size_of::<Task>() == 26 * 8);
const _: () = assert!(size_of::<ErrorRecord>() == 8 * 8);
const _: () = assert!(size_of::<BufferDesc>() == 9 * 8);

// SAFETY: a descriptor is only read, by tasks of one run, and points at buffer
// data that the run holds and nobody writes while it runs.
unsafe impl Send for BufferDesc {}
// SAFETY: as above.
unsafe impl Sync for BufferDesc {}

impl BufferDesc {
    /// The descriptor of a standard-layout array of `shape` at `data`.
    pub fn new(data: *const u8, shape: &[usize]) -> BufferDesc {
        assert!(shape.len() <= 4, "buffers have at most four dims");
        let mut d = BufferDesc {
            data,
            dims: [0; 4],
            strides: [0; 4],
        };
        let mut stride = 1i64;
        for n in (0..shape.len()).rev() {
            d.dims[n] = shape[n] as i64;
            d.strides[n] = stride;
            stride *= shape[n] as i64;
        }
        d
    }
}
