//! Binding concrete inputs to a checked spec.
//!
//! Shared by every backend: validates the q/k/v shapes and the named buffers
//! against the spec's declarations and produces a [`Bound`] problem (concrete
//! [`Shapes`], buffers in declaration order). Every mismatch is a
//! [`BindError`] that says exactly what is wrong.

use std::collections::BTreeMap;

use ndarray::{Array2, Array3, Array4, ArrayView1, ArrayView2, ArrayView4};

use crate::buffer::BufferData;
use crate::sema::eval::Shapes;
use crate::sema::{suggest, Spec, Type};
use crate::tensor::{ElemType, KvData, MagnitudeBits};

/// The inputs of one attention call.
#[derive(Clone, Debug)]
pub struct Inputs<'a> {
    /// `[B, H, Q, D]`
    pub q: ArrayView4<'a, f32>,
    /// The element type whose values `q` holds (carried in f32, which holds
    /// every bf16 and f16 value exactly): f32 unless [`Inputs::q_elem`] says
    /// otherwise. bf16 q with bf16 k and v lets a prefill multiply on bf16
    /// operands ([`crate::tile::nest::KvSource::PackedBf16`], where the CPU
    /// has a bf16 dot product: [`crate::driver::has_bf16_dot`]).
    pub q_elem: ElemType,
    /// Keys, laid out as [`Inputs::kv_layout`] says: `[B or 1, HKV, KV, D]`
    /// dense, or a pool `[num_pages, page_size, HKV, D]` when paged.
    /// Stored as f32, bf16, f16, or quantized with scales (see [`crate::tensor`]).
    pub k: KvData<'a>,
    /// Values, with the layout, shape and element type of `k`.
    pub v: KvData<'a>,
    /// How `k` and `v` are laid out.
    pub kv_layout: KvLayout<'a>,
    /// Per sequence, how many keys it has (`[B]`; ragged batches and paged
    /// pools). The query rows of sequence `b` then sit at the end of it, at
    /// positions `kv_offset + kv_lens[b] - Q ..`. Keys past a sequence's
    /// length are never read.
    pub kv_lens: Option<ArrayView1<'a, i32>>,
    /// Named buffers, in their declared element types.
    pub buffers: BTreeMap<String, BufferData>,
    /// The absolute position of query row 0 (`q = row + q_offset`); not with `kv_lens`.
    pub q_offset: i64,
    /// The absolute position of key row 0 (`kv = row + kv_offset`).
    pub kv_offset: i64,
    /// Whether to return the log-sum-exp of every query row.
    pub want_lse: bool,
}

/// How the K and V operands of a call are laid out.
#[derive(Clone, Debug)]
pub enum KvLayout<'a> {
    /// `[B or 1, HKV, KV, D]`: key `j` of sequence `b`, head `kh` at `[b, kh, j, :]`
    /// (`[0, kh, j, :]` when the batch is 1 and shared).
    Dense,
    /// A paged pool `[num_pages, page_size, HKV, D]` (the layout of vLLM and
    /// FlashInfer): key `j` of sequence `b` sits in page `page_table[b, j /
    /// page_size]`, slot `j % page_size`. Needs `kv_lens`; table entries past
    /// a sequence's last page are ignored.
    Paged {
        /// `[B, max_pages]`
        page_table: ArrayView2<'a, i32>,
    },
}

impl<'a> Inputs<'a> {
    pub fn new(
        q: ArrayView4<'a, f32>,
        k: impl Into<KvData<'a>>,
        v: impl Into<KvData<'a>>,
    ) -> Inputs<'a> {
        Inputs {
            q,
            q_elem: ElemType::F32,
            k: k.into(),
            v: v.into(),
            kv_layout: KvLayout::Dense,
            kv_lens: None,
            buffers: BTreeMap::new(),
            q_offset: 0,
            kv_offset: 0,
            want_lse: false,
        }
    }

    /// A call on a paged KV cache: pools `k_pages`, `v_pages` of shape
    /// `[num_pages, page_size, HKV, D]`, `page_table` `[B, max_pages]` and the
    /// length of every sequence `kv_lens` `[B]`; the queries are the last `Q`
    /// positions of each sequence.
    pub fn paged(
        q: ArrayView4<'a, f32>,
        k_pages: impl Into<KvData<'a>>,
        v_pages: impl Into<KvData<'a>>,
        page_table: ArrayView2<'a, i32>,
        kv_lens: ArrayView1<'a, i32>,
    ) -> Inputs<'a> {
        Inputs {
            kv_layout: KvLayout::Paged { page_table },
            kv_lens: Some(kv_lens),
            ..Inputs::new(q, k_pages, v_pages)
        }
    }

    /// The length of every sequence (`[B]`): a ragged batch of dense k/v
    /// `[B, HKV, KVmax, D]` whose sequence `b` holds `kv_lens[b]` keys.
    pub fn kv_lens(mut self, kv_lens: ArrayView1<'a, i32>) -> Inputs<'a> {
        self.kv_lens = Some(kv_lens);
        self
    }

    /// The absolute position of key row 0, for computing one block of a
    /// larger attention (ring attention, context parallelism).
    pub fn kv_offset(mut self, offset: i64) -> Inputs<'a> {
        self.kv_offset = offset;
        self
    }

    pub fn buffer(mut self, name: &str, data: BufferData) -> Inputs<'a> {
        self.buffers.insert(name.to_string(), data);
        self
    }

    pub fn q_offset(mut self, offset: i64) -> Inputs<'a> {
        self.q_offset = offset;
        self
    }

    /// Declares that `q` holds values of `elem` (bf16 or f16 values widened
    /// to f32, e.g. by [`crate::tensor::round_to`]); binding checks that it
    /// does. Quantized types are not query types.
    pub fn q_elem(mut self, elem: ElemType) -> Inputs<'a> {
        self.q_elem = elem;
        self
    }

    pub fn with_lse(mut self) -> Inputs<'a> {
        self.want_lse = true;
        self
    }
}

/// The results of one attention call.
#[derive(Clone, Debug, PartialEq)]
pub struct Outputs {
    /// `[B, H, Q, D]`; rows that see no key are 0.
    pub out: Array4<f32>,
    /// `[B, H, Q]`, natural log; `-inf` for rows that see no key. Present when asked for.
    pub lse: Option<Array3<f32>>,
}

impl Outputs {
    /// The outputs of a call on `shapes` where B, H or Q is 0 (nothing to
    /// compute), with lse when asked for.
    pub fn empty(shapes: &Shapes, want_lse: bool) -> Outputs {
        debug_assert!(shapes.b == 0 || shapes.h == 0 || shapes.q == 0);
        let (b, h, q) = (shapes.b, shapes.h, shapes.q);
        Outputs {
            out: Array4::zeros((b, h, q, shapes.d)),
            lse: want_lse.then(|| Array3::from_elem((b, h, q), f32::NEG_INFINITY)),
        }
    }
}

/// A validated problem: concrete shapes and the buffers in declaration order.
///
/// `shapes.kv` is the `KV` the spec sees: the end of the positions of the
/// call, `max(kv_offset + key rows, q_offset + Q)` (for a ragged batch
/// `kv_offset` plus the longest sequence's keys), so `0 .. KV` covers every
/// absolute key and query position of the call.
///
/// Only [`bind`] makes one (the fields are read through accessors): the
/// compiled backends read what a `Bound` describes without bounds checks, so
/// it must be the binding of the inputs it runs with.
#[derive(Clone, Debug, PartialEq)]
pub struct Bound {
    pub(crate) shapes: Shapes,
    /// The absolute position of query row 0 when the batch is not ragged.
    pub(crate) q_offset: i64,
    /// The absolute position of key row 0.
    pub(crate) kv_offset: i64,
    /// Key rows of dense k and v (every sequence's, unless `kv_lens`).
    pub(crate) kv_rows: usize,
    /// Batch size of k and v: `shapes.b`, or 1 when they broadcast (dense only).
    pub(crate) kv_batch: usize,
    /// Per sequence, its number of keys, when the batch is ragged (or paged).
    pub(crate) kv_lens: Option<Vec<usize>>,
    /// The page table and page size of a paged pool.
    pub(crate) pages: Option<Pages>,
    /// The stored element type of k and v.
    pub(crate) kv_elem: ElemType,
    /// The element type of q's values ([`Inputs::q_elem`]).
    pub(crate) q_elem: ElemType,
    /// Indexed by `BufferId`.
    pub(crate) buffers: Vec<BufferData>,
}

/// The page table of a paged K/V pool, as bound.
#[derive(Clone, Debug, PartialEq)]
pub struct Pages {
    /// Slots per page.
    pub(crate) page_size: usize,
    /// Pages in the pool.
    pub(crate) num_pages: usize,
    /// `[B, max_pages]`, in standard (row-major) layout: the kernels read a
    /// sequence's row as a contiguous run; entries a sequence uses are in
    /// `0 .. num_pages`.
    pub(crate) table: Array2<i32>,
}

impl Pages {
    /// Slots per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Pages in the pool.
    pub fn num_pages(&self) -> usize {
        self.num_pages
    }

    /// `[B, max_pages]`, in standard layout.
    pub fn table(&self) -> &Array2<i32> {
        &self.table
    }
}

impl Bound {
    /// The shapes the spec sees (`KV`: the end of the call's positions).
    pub fn shapes(&self) -> Shapes {
        self.shapes
    }

    /// The absolute position of query row 0 when the batch is not ragged.
    pub fn q_offset(&self) -> i64 {
        self.q_offset
    }

    /// The absolute position of key row 0.
    pub fn kv_offset(&self) -> i64 {
        self.kv_offset
    }

    /// Key rows of dense k and v (every sequence's, unless ragged).
    pub fn kv_rows(&self) -> usize {
        self.kv_rows
    }

    /// Batch size of k and v: `B`, or 1 when they broadcast (dense only).
    pub fn kv_batch(&self) -> usize {
        self.kv_batch
    }

    /// Per sequence, its number of keys, when the batch is ragged (or paged).
    pub fn kv_lens(&self) -> Option<&[usize]> {
        self.kv_lens.as_deref()
    }

    /// The page table and page size of a paged pool.
    pub fn pages(&self) -> Option<&Pages> {
        self.pages.as_ref()
    }

    /// The stored element type of k and v.
    pub fn kv_elem(&self) -> ElemType {
        self.kv_elem
    }

    /// The element type of q's values.
    pub fn q_elem(&self) -> ElemType {
        self.q_elem
    }

    /// The buffers, indexed by `BufferId`.
    pub fn buffers(&self) -> &[BufferData] {
        &self.buffers
    }

    /// The most keys any sequence has (its rows of k and v): the extent of
    /// the key walk, which `shapes.kv` (the end of the positions, offsets
    /// included) may far exceed.
    pub fn key_rows(&self) -> usize {
        match &self.kv_lens {
            Some(lens) => lens.iter().copied().max().unwrap_or(0),
            None => self.kv_rows,
        }
    }

    /// Whether the call has no output to compute: B, H or Q is 0.
    pub fn is_empty(&self) -> bool {
        self.shapes.b == 0 || self.shapes.h == 0 || self.shapes.q == 0
    }

    /// The number of keys of sequence `b` (its rows of k and v).
    pub fn kv_len(&self, b: usize) -> usize {
        match &self.kv_lens {
            Some(lens) => lens[b],
            None => self.kv_rows,
        }
    }

    /// The absolute position of query row 0 of sequence `b`: `q_offset`, or
    /// for a ragged batch the position that puts the last query row on the
    /// sequence's last key.
    pub fn q_start(&self, b: usize) -> i64 {
        match &self.kv_lens {
            Some(lens) => self.kv_offset + lens[b] as i64 - self.shapes.q as i64,
            None => self.q_offset,
        }
    }

    /// Whether every sequence has its own length (ragged or paged).
    pub fn is_ragged(&self) -> bool {
        self.kv_lens.is_some()
    }

    /// The index into k (and v) of key row `j` (`0 <= j < kv_len(b)`) of
    /// sequence `b`, head `kh`, dimension `d`: the one place that addresses
    /// a K/V element for the reference and the tile interpreter.
    pub fn kv_index(&self, b: usize, kh: usize, j: usize, d: usize) -> [usize; 4] {
        match &self.pages {
            None => [self.kv_batch_index(b), kh, j, d],
            Some(p) => {
                let page = p.table[[b, j / p.page_size]] as usize;
                [page, j % p.page_size, kh, d]
            }
        }
    }

    /// The key/value head that query head `h` reads (GQA/MQA).
    pub fn kv_head(&self, h: usize) -> usize {
        h / (self.shapes.h / self.shapes.hkv)
    }

    /// The key/value batch index that query batch `b` reads.
    pub fn kv_batch_index(&self, b: usize) -> usize {
        if self.kv_batch == 1 {
            0
        } else {
            b
        }
    }
}

/// Inputs that do not fit the spec or each other.
#[derive(Clone, Debug, PartialEq, thiserror::Error, miette::Diagnostic)]
pub enum BindError {
    #[error("q is declared {elem}, but q{index:?} = {value:e} is not a {elem} value")]
    #[diagnostic(
        code(attnc::bind::q_dtype),
        help("round q to {elem} first (`attnc::tensor::round_to`, round to nearest even), or leave it f32")
    )]
    QNotRounded {
        elem: ElemType,
        index: [usize; 4],
        value: f32,
    },
    #[error("q cannot be {elem}: queries are f32, bf16 or f16")]
    #[diagnostic(
        code(attnc::bind::q_dtype),
        help("quantized types (int8, fp8) are for the K/V cache (`--kv-dtype`); use `--dtype f32|bf16|f16` for q")
    )]
    QElem { elem: ElemType },
    #[error("k and v must have the same element type: k is {k}, v is {v}")]
    #[diagnostic(
        code(attnc::bind::kv_dtype),
        help("store the cache's keys and values in one type (f32, bf16, f16, int8 or fp8)")
    )]
    KvTypes { k: ElemType, v: ElemType },
    #[error("the {which} scales have shape {found:?}, expected {expected:?} (one float32 per row of D elements of the {which} data)")]
    #[diagnostic(
        code(attnc::bind::kv_scales),
        help("int8/fp8 data [A, B, C, D] takes scales [A, B, C]: [B, HKV, KV] for dense k/v, [num_pages, page_size, HKV] for a pool")
    )]
    ScalesShape {
        which: &'static str,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("the {which} scale of key {key} of sequence {b}, KV head {kh} is {value:e}, which is not finite")]
    #[diagnostic(
        code(attnc::bind::kv_scales),
        help("every key a sequence uses needs a finite scale (slots past its length may hold anything); a scale quantized from float data (`--kv-dtype int8|fp8` on a float file, `KvArray::quantize`, `KvArray::append`) is NaN or inf when that row of D values holds NaN or inf, which int8 and fp8 with a scale cannot carry")
    )]
    NonFiniteScale {
        which: &'static str,
        b: usize,
        kh: usize,
        key: usize,
        value: f32,
    },
    #[error("the {which} scale of key {key} of sequence {b}, KV head {kh} is {value:e}, and {stored} ({held}) times it overflows f32")]
    #[diagnostic(
        code(attnc::bind::kv_scales),
        help("every value a sequence uses must dequantize (stored value x scale) to a finite f32: fp8 scales may be at most f32::MAX / 448; int8 scales f32::MAX / 128, or larger while 127 x scale is finite for a row that holds no -128 (the scales `--kv-dtype`, `KvArray::quantize` and `KvArray::append` compute always fit)")
    )]
    ScaleOverflow {
        which: &'static str,
        b: usize,
        kh: usize,
        key: usize,
        value: f32,
        stored: f32,
        held: &'static str,
    },
    #[error("k and v must have the same shape: k is {k:?}, v is {v:?}")]
    #[diagnostic(code(attnc::bind::kv_shape))]
    KvShape { k: Vec<usize>, v: Vec<usize> },
    #[error("head dim differs: q has D = {q} (shape {q_shape:?}), k and v have D = {kv} (shape {kv_shape:?})")]
    #[diagnostic(
        code(attnc::bind::head_dim),
        help("q is [B, H, Q, D] and k, v are [B, HKV, KV, D] with the same D")
    )]
    HeadDim {
        q: usize,
        kv: usize,
        q_shape: Vec<usize>,
        kv_shape: Vec<usize>,
    },
    #[error("the head dim D must be at least 1, found 0")]
    #[diagnostic(
        code(attnc::bind::head_dim),
        help("q is [B, H, Q, D] and k, v are [B, HKV, KV, D]; the last axis is D")
    )]
    ZeroHeadDim,
    #[error("batch differs: q has B = {q}, k and v have B = {kv}")]
    #[diagnostic(
        code(attnc::bind::batch),
        help("k and v must have the batch of q, or 1 to broadcast over it")
    )]
    Batch { q: usize, kv: usize },
    #[error("H = {h} query heads is not a multiple of HKV = {hkv} key/value heads")]
    #[diagnostic(code(attnc::bind::heads), help("k and v need at least one key/value head (HKV >= 1; `--kv-heads`, default H, on the command line), and GQA/MQA needs H to be a multiple of HKV (query head h reads key/value head h / (H / HKV))"))]
    Heads { h: usize, hkv: usize },
    #[error("the query offset must be >= 0, found {0}")]
    #[diagnostic(code(attnc::bind::q_offset), help("the offset is the absolute position of query row 0: 0 for prefill, KV - Q when decoding with a KV cache"))]
    NegativeOffset(i64),
    #[error("the key offset must be >= 0, found {0}")]
    #[diagnostic(
        code(attnc::bind::kv_offset),
        help("the key offset is the absolute position of key row 0 (0 unless the keys are one block of a longer sequence)")
    )]
    NegativeKvOffset(i64),
    #[error("a query offset ({0}) together with per-sequence lengths (kv_lens)")]
    #[diagnostic(
        code(attnc::bind::q_offset),
        help("with kv_lens the queries sit at the end of each sequence (positions kv_lens[b] - Q ..); drop the query offset")
    )]
    OffsetWithLens(i64),
    #[error("a paged K/V pool needs the length of every sequence (kv_lens)")]
    #[diagnostic(
        code(attnc::bind::kv_lens),
        help("pass kv_lens, int32 [B], with the page table (`--kv-lens L.npy`)")
    )]
    PagedWithoutLens,
    #[error("per-sequence lengths (kv_lens) need k and v with one sequence per query batch (B = {b}), not a shared batch of 1")]
    #[diagnostic(
        code(attnc::bind::kv_lens),
        help("give k and v the shape [B, HKV, KVmax, D], or drop kv_lens")
    )]
    RaggedBroadcast { b: usize },
    #[error("kv_lens has shape {found:?}, expected [{b}] (one length per sequence)")]
    #[diagnostic(code(attnc::bind::kv_lens), help("kv_lens is int32 [B]"))]
    KvLensShape { b: usize, found: Vec<usize> },
    #[error("kv_lens[{b}] is {len}, a negative length")]
    #[diagnostic(code(attnc::bind::kv_lens), help("lengths are numbers of keys, >= Q"))]
    NegativeKvLen { b: usize, len: i32 },
    #[error("kv_lens[{b}] is {len}, shorter than the Q = {q} queries that end the sequence")]
    #[diagnostic(
        code(attnc::bind::kv_lens),
        help("the queries of sequence b are its last Q positions, so kv_lens[b] >= Q (append the new tokens' keys before attending)")
    )]
    KvLenBelowQ { b: usize, len: usize, q: usize },
    #[error("kv_lens[{b}] is {len}, past the {rows} key rows of k and v")]
    #[diagnostic(
        code(attnc::bind::kv_lens),
        help("k and v are [B, HKV, KVmax, D] with KVmax >= every length")
    )]
    KvLenPastRows { b: usize, len: usize, rows: usize },
    #[error("kv_lens[{b}] is {len}, past the {max_pages} pages x {page_size} slots of its page-table row")]
    #[diagnostic(
        code(attnc::bind::kv_lens),
        help("the page table is [B, max_pages]: give it enough columns for the longest sequence")
    )]
    KvLenPastPages {
        b: usize,
        len: usize,
        max_pages: usize,
        page_size: usize,
    },
    #[error("the page table has shape {found:?}, expected [{b}, max_pages]")]
    #[diagnostic(
        code(attnc::bind::page_table),
        help("the page table is int32 [B, max_pages]: row b lists sequence b's pages in order")
    )]
    PageTableShape { b: usize, found: Vec<usize> },
    #[error("page_table[{b}, {slot}] is {page}, outside the pool of {num_pages} pages")]
    #[diagnostic(
        code(attnc::bind::page_table),
        help("every page a sequence uses (the first ceil(kv_lens[b] / page_size) entries of its row) must be in 0 .. num_pages")
    )]
    PageOutOfPool {
        b: usize,
        slot: usize,
        page: i32,
        num_pages: usize,
    },
    #[error("the K/V pool has shape {pool:?}: a page size of 0")]
    #[diagnostic(
        code(attnc::bind::page_size),
        help("pools are [num_pages, page_size, HKV, D] with page_size >= 1")
    )]
    ZeroPageSize { pool: Vec<usize> },
    #[error("{what} is {value}, past the limit of {limit} (2^31 - 1)", limit = crate::sema::POSITION_LIMIT)]
    #[diagnostic(
        code(attnc::bind::too_large),
        help("shapes and positions (q_offset + Q, kv_offset + the key rows) must stay within 2^31 - 1; split the sequence into smaller calls")
    )]
    TooLarge { what: &'static str, value: u64 },
    #[error("missing buffer `{name}`: attention `{spec}` declares `buffer {name}[{dims}]: {ty}`")]
    #[diagnostic(
        code(attnc::bind::missing_buffer),
        help("bind it, e.g. `--buffer {name}=FILE.npy`")
    )]
    MissingBuffer {
        spec: String,
        name: String,
        dims: String,
        ty: Type,
    },
    #[error("unexpected buffer `{name}`: attention `{spec}` declares no such buffer")]
    #[diagnostic(code(attnc::bind::extra_buffer), help("{help}"))]
    ExtraBuffer {
        spec: String,
        name: String,
        help: String,
    },
    #[error("buffer `{name}` is declared {declared} but the data is {found}")]
    #[diagnostic(
        code(attnc::bind::buffer_type),
        help("int buffers take int32/int64 data, float buffers float32, bool buffers bool")
    )]
    BufferType {
        name: String,
        declared: Type,
        found: Type,
    },
    #[error(
        "buffer `{name}[{dims}]`: the dimension `{dim}` is negative, overflows a 64-bit int or divides by zero for these inputs"
    )]
    #[diagnostic(code(attnc::bind::buffer_dim), help("the shapes are B={}, H={}, HKV={}, Q={}, KV={}, D={}; a dimension must be at least 0 and its divisors at least 1", shapes.b, shapes.h, shapes.hkv, shapes.q, shapes.kv, shapes.d))]
    BufferDim {
        name: String,
        dims: String,
        dim: String,
        shapes: Shapes,
    },
    #[error("buffer `{name}` has shape {found:?}, but `{name}[{dims}]` is {expected:?} for these inputs")]
    #[diagnostic(code(attnc::bind::buffer_shape), help("the shapes are B={}, H={}, HKV={}, Q={}, KV={}, D={}", shapes.b, shapes.h, shapes.hkv, shapes.q, shapes.kv, shapes.d))]
    BufferShape {
        name: String,
        dims: String,
        expected: Vec<usize>,
        found: Vec<usize>,
        shapes: Shapes,
    },
}

/// The error for binding a buffer the spec does not declare.
pub fn unknown_buffer(spec: &Spec, name: &str) -> BindError {
    let names: Vec<&str> = spec.buffers.iter().map(|b| b.name.as_str()).collect();
    let help = match suggest(name, names.iter().copied()) {
        Some(s) => format!("did you mean `{s}`?"),
        None if names.is_empty() => "this attention block takes no buffers".to_string(),
        None => format!("its buffers are: {}", names.join(", ")),
    };
    BindError::ExtraBuffer {
        spec: spec.name.clone(),
        name: name.to_string(),
        help,
    }
}

/// Validates `inputs` against `spec`.
pub fn bind(spec: &Spec, inputs: &Inputs<'_>) -> Result<Bound, BindError> {
    let (qs, ks, vs) = (inputs.q.shape(), inputs.k.shape(), inputs.v.shape());
    if inputs.k.elem() != inputs.v.elem() {
        return Err(BindError::KvTypes {
            k: inputs.k.elem(),
            v: inputs.v.elem(),
        });
    }
    check_q_elem(inputs)?;
    for (which, data) in [("k", &inputs.k), ("v", &inputs.v)] {
        data.scales_fit().map_err(|found| BindError::ScalesShape {
            which,
            expected: data.shape()[..3].to_vec(),
            found,
        })?;
    }
    if ks != vs {
        return Err(BindError::KvShape {
            k: ks.to_vec(),
            v: vs.to_vec(),
        });
    }
    if qs[3] != ks[3] {
        return Err(BindError::HeadDim {
            q: qs[3],
            kv: ks[3],
            q_shape: qs.to_vec(),
            kv_shape: ks.to_vec(),
        });
    }
    if qs[3] == 0 {
        return Err(BindError::ZeroHeadDim);
    }
    let paged = matches!(inputs.kv_layout, KvLayout::Paged { .. });
    // Dense: [B|1, HKV, KV, D]; paged: [pages, page_size, HKV, D].
    let (kv_batch, hkv, kv_rows) = if paged {
        (qs[0], ks[2], 0)
    } else {
        (ks[0], ks[1], ks[2])
    };
    if !paged && ks[0] != qs[0] && ks[0] != 1 {
        return Err(BindError::Batch {
            q: qs[0],
            kv: ks[0],
        });
    }
    let h = qs[1];
    if hkv == 0 || h % hkv != 0 {
        return Err(BindError::Heads { h, hkv });
    }
    if inputs.q_offset < 0 {
        return Err(BindError::NegativeOffset(inputs.q_offset));
    }
    if inputs.kv_offset < 0 {
        return Err(BindError::NegativeKvOffset(inputs.kv_offset));
    }
    let kv_lens = match inputs.kv_lens {
        None if paged => return Err(BindError::PagedWithoutLens),
        None => None,
        Some(lens) => {
            if inputs.q_offset != 0 {
                return Err(BindError::OffsetWithLens(inputs.q_offset));
            }
            if !paged && ks[0] != qs[0] {
                return Err(BindError::RaggedBroadcast { b: qs[0] });
            }
            if lens.len() != qs[0] {
                return Err(BindError::KvLensShape {
                    b: qs[0],
                    found: lens.shape().to_vec(),
                });
            }
            Some(seq_lens(lens, qs[2], kv_rows, inputs)?)
        }
    };
    let pages = match &inputs.kv_layout {
        KvLayout::Dense => None,
        KvLayout::Paged { page_table } => Some(bind_pages(
            page_table,
            ks,
            qs[0],
            kv_lens.as_deref().expect("checked above"),
        )?),
    };
    // `KV` is the end of the positions the call covers: the last key, or the
    // last query when queries run past the keys (a block of ring attention
    // whose keys come first), so one table indexed by `q` and `kv` serves.
    let kv_end = match &kv_lens {
        Some(lens) => inputs.kv_offset as i128 + lens.iter().copied().max().unwrap_or(0) as i128,
        None => (inputs.kv_offset as i128 + kv_rows as i128)
            .max(inputs.q_offset as i128 + qs[2] as i128),
    };
    let sizes = [
        ("the batch B", qs[0] as i128),
        ("the number of heads H", h as i128),
        ("the head dim D", qs[3] as i128),
        (
            "the query end q_offset + Q",
            inputs.q_offset as i128 + qs[2] as i128,
        ),
        (
            "the key end KV (kv_offset + the key rows, or q_offset + Q if later)",
            kv_end,
        ),
    ];
    if let Some(&(what, value)) = sizes
        .iter()
        .find(|(_, n)| *n > crate::sema::POSITION_LIMIT as i128)
    {
        return Err(BindError::TooLarge {
            what,
            value: u64::try_from(value).unwrap_or(u64::MAX),
        });
    }
    let shapes = Shapes {
        b: qs[0],
        h,
        hkv,
        q: qs[2],
        kv: kv_end as usize,
        d: qs[3],
    };
    if let Some(name) = inputs.buffers.keys().find(|n| spec.buffer_id(n).is_none()) {
        return Err(unknown_buffer(spec, name));
    }
    let mut buffers = Vec::with_capacity(spec.buffers.len());
    for decl in &spec.buffers {
        let dims = decl
            .dims
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let Some(data) = inputs.buffers.get(&decl.name) else {
            return Err(BindError::MissingBuffer {
                spec: spec.name.clone(),
                name: decl.name.clone(),
                dims,
                ty: decl.elem,
            });
        };
        if data.ty() != decl.elem {
            return Err(BindError::BufferType {
                name: decl.name.clone(),
                declared: decl.elem,
                found: data.ty(),
            });
        }
        let expected = shapes
            .buffer_shape(decl)
            .map_err(|d| BindError::BufferDim {
                name: decl.name.clone(),
                dims: dims.clone(),
                dim: d.to_string(),
                shapes,
            })?;
        if data.shape() != expected.as_slice() {
            return Err(BindError::BufferShape {
                name: decl.name.clone(),
                dims,
                expected,
                found: data.shape().to_vec(),
                shapes,
            });
        }
        buffers.push(data.clone());
    }
    let bound = Bound {
        shapes,
        q_offset: inputs.q_offset,
        kv_offset: inputs.kv_offset,
        kv_rows,
        kv_batch,
        kv_lens,
        pages,
        kv_elem: inputs.k.elem(),
        q_elem: inputs.q_elem,
        buffers,
    };
    for (which, data) in [("k", &inputs.k), ("v", &inputs.v)] {
        if let Some(scales) = data.scales() {
            check_scales(which, data, scales, &bound)?;
        }
    }
    Ok(bound)
}

/// Checks that q holds values of its declared element type.
fn check_q_elem(inputs: &Inputs<'_>) -> Result<(), BindError> {
    let elem = inputs.q_elem;
    match elem {
        ElemType::F32 => return Ok(()),
        ElemType::Bf16 | ElemType::F16 => {}
        ElemType::Int8 | ElemType::Fp8 => return Err(BindError::QElem { elem }),
    }
    let exact = |x: f32| elem.holds(x);
    let all_exact = match inputs.q.as_slice_memory_order() {
        Some(xs) => xs.iter().fold(true, |ok, &x| ok & exact(x)),
        None => inputs.q.iter().all(|&x| exact(x)),
    };
    if all_exact {
        return Ok(());
    }
    let ((b, h, i, d), &value) = inputs
        .q
        .indexed_iter()
        .find(|&(_, &x)| !exact(x))
        .expect("a value that is not exact, found above");
    Err(BindError::QNotRounded {
        elem,
        index: [b, h, i, d],
        value,
    })
}

/// Checks that every key a sequence uses dequantizes to finite values: its
/// scale is finite, and so is the scale times each value stored in its row
/// (stale slots past a sequence's length, or in pages it does not use, may
/// hold anything).
/// A pool is checked page by page in memory order, each page up to the last
/// slot a sequence uses in it; dense rows (and a pool that fails) run by run
/// in the order of the sequences and their keys (a run: the keys of one
/// page, or all of a sequence's dense rows), and only a run that fails is
/// searched for the first bad key, so the error names the first in key order.
fn check_scales(
    which: &'static str,
    data: &KvData<'_>,
    scales: &ndarray::ArrayView3<'_, f32>,
    bound: &Bound,
) -> Result<(), BindError> {
    // Every value a scale dequantizes is finite when |scale| <= f32::MAX /
    // 128 (int8, whose -128 is past the quantizers' 127) or f32::MAX / 448
    // (fp8's largest finite value): the test every scale takes. Only a key
    // whose scale is above it has its row of stored values read.
    let limit = scale_limit(data.elem()).to_bits();
    let all_finite = |a: ndarray::ArrayView2<'_, f32>| all_within(a, limit);
    let sh = bound.shapes;
    let batches = if bound.pages.is_some() {
        sh.b
    } else {
        bound.kv_batch.min(sh.b)
    };
    // A pool is checked page by page in memory order, each page up to the
    // last slot a sequence uses in it: in table order the pages come in a
    // shuffled order, and the scan waits on memory at every page. Only on
    // failure is the table order walked, for the first bad key.
    if let Some(p) = &bound.pages {
        let mut used = vec![0usize; p.num_pages];
        for b in 0..batches {
            let len = bound.kv_len(b);
            for (t, start) in (0..len).step_by(p.page_size).enumerate() {
                let page = p.table[[b, t]] as usize;
                used[page] = used[page].max(p.page_size.min(len - start));
            }
        }
        let ok = used
            .iter()
            .enumerate()
            .all(|(page, &n)| n == 0 || all_finite(scales.slice(ndarray::s![page, ..n, ..])));
        if ok {
            return Ok(());
        }
    }
    for b in 0..batches {
        let len = bound.kv_len(b);
        let run = match &bound.pages {
            None => len.max(1),
            Some(p) => p.page_size,
        };
        for start in (0..len).step_by(run) {
            let n = run.min(len - start);
            let [i, j, _, _] = bound.kv_index(b, 0, start, 0);
            // The scales of keys `start .. start + n`, every KV head.
            let ok = match &bound.pages {
                None => all_finite(scales.slice(ndarray::s![i, .., start..start + n])),
                Some(_) => all_finite(scales.slice(ndarray::s![i, j..j + n, ..])),
            };
            if ok {
                continue;
            }
            for key in start..start + n {
                for kh in 0..sh.hkv {
                    let [i, j, k, _] = bound.kv_index(b, kh, key, 0);
                    let value = scales[[i, j, k]];
                    if value.magnitude_bits() <= limit {
                        continue;
                    }
                    if !value.is_finite() {
                        return Err(BindError::NonFiniteScale {
                            which,
                            b,
                            kh,
                            key,
                            value,
                        });
                    }
                    if let Some((stored, held)) = overflowing_value(data, [i, j, k], value) {
                        return Err(BindError::ScaleOverflow {
                            which,
                            b,
                            kh,
                            key,
                            value,
                            stored,
                            held,
                        });
                    }
                }
            }
        }
    }
    Ok(())
}

/// The largest |scale| with which every value of `elem` dequantizes to a
/// finite f32 (int8 holds -128; fp8 e4m3fn at most 448).
fn scale_limit(elem: ElemType) -> f32 {
    f32::MAX
        / match elem {
            ElemType::Int8 => 128.0,
            _ => elem.quant_max(),
        }
}

/// The value whose dequantization with `scale` (finite, above
/// [`scale_limit`]) overflows, if any, for the quantized row at `[i, j, k]`,
/// and what it is to the row. Only int8 gives such a scale a second look:
/// while 127 times it is finite, it dequantizes a row that holds no -128 (a
/// quantizer's scale, absmax / 127, goes past f32::MAX / 128 for rows near
/// f32::MAX).
fn overflowing_value(
    data: &KvData<'_>,
    [i, j, k]: [usize; 3],
    scale: f32,
) -> Option<(f32, &'static str)> {
    match data {
        KvData::Int8 { data, .. } if (127.0 * scale).is_finite() => data
            .slice(ndarray::s![i, j, k, ..])
            .iter()
            .any(|&x| x == i8::MIN)
            .then_some((-128.0, "a value of that row")),
        KvData::Int8 { .. } => Some((127.0, "the largest int8 a row may hold")),
        _ => Some((448.0, "the largest fp8 e4m3fn a row may hold")),
    }
}

/// Whether every value's magnitude bits are at most `limit` (the bits of a
/// finite positive f32: NaN and inf are above it) ([`crate::tensor::MagnitudeBits`];
/// this runs on every call over every scale a call uses).
fn all_within(a: ndarray::ArrayView2<'_, f32>, limit: u32) -> bool {
    use crate::tensor::max_magnitude_bits;
    let worst = match a.as_slice_memory_order() {
        Some(xs) => max_magnitude_bits(ndarray::ArrayView1::from(xs)),
        None => a
            .rows()
            .into_iter()
            .map(max_magnitude_bits)
            .max()
            .unwrap_or(0),
    };
    worst <= limit
}

/// Checks the sequence lengths: each at least `Q` (the queries are its last
/// positions) and at most what its storage holds (`rows` dense rows; paged
/// pools are checked against their table in [`bind_pages`]).
fn seq_lens(
    lens: ArrayView1<'_, i32>,
    q: usize,
    rows: usize,
    inputs: &Inputs<'_>,
) -> Result<Vec<usize>, BindError> {
    let paged = matches!(inputs.kv_layout, KvLayout::Paged { .. });
    lens.iter()
        .enumerate()
        .map(|(b, &len)| {
            if len < 0 {
                return Err(BindError::NegativeKvLen { b, len });
            }
            let len = len as usize;
            if len < q {
                return Err(BindError::KvLenBelowQ { b, len, q });
            }
            if !paged && len > rows {
                return Err(BindError::KvLenPastRows { b, len, rows });
            }
            Ok(len)
        })
        .collect()
}

/// Checks a page table against the pool `[num_pages, page_size, HKV, D]`
/// and the sequence lengths: `[B, max_pages]`, every sequence fits its row,
/// and every page a sequence uses is in the pool.
fn bind_pages(
    table: &ArrayView2<'_, i32>,
    pool: &[usize],
    b: usize,
    lens: &[usize],
) -> Result<Pages, BindError> {
    let (num_pages, page_size) = (pool[0], pool[1]);
    if page_size == 0 {
        return Err(BindError::ZeroPageSize {
            pool: pool.to_vec(),
        });
    }
    if table.nrows() != b {
        return Err(BindError::PageTableShape {
            b,
            found: table.shape().to_vec(),
        });
    }
    let max_pages = table.ncols();
    for (seq, &len) in lens.iter().enumerate() {
        let used = len.div_ceil(page_size);
        if used > max_pages {
            return Err(BindError::KvLenPastPages {
                b: seq,
                len,
                max_pages,
                page_size,
            });
        }
        for slot in 0..used {
            let page = table[[seq, slot]];
            if page < 0 || page as usize >= num_pages {
                return Err(BindError::PageOutOfPool {
                    b: seq,
                    slot,
                    page,
                    num_pages,
                });
            }
        }
    }
    Ok(Pages {
        page_size,
        num_pages,
        table: table.as_standard_layout().into_owned(),
    })
}
