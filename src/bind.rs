//! Binding concrete inputs to a checked spec.
//!
//! Shared by every backend: validates the q/k/v shapes and the named buffers
//! against the spec's declarations and produces a [`Bound`] problem (concrete
//! [`Shapes`], buffers in declaration order). Every mismatch is a
//! [`BindError`] that says exactly what is wrong.

use std::collections::BTreeMap;

use ndarray::{Array3, Array4, ArrayView4};

use crate::buffer::BufferData;
use crate::sema::eval::Shapes;
use crate::sema::{suggest, Spec, Type};

/// The inputs of one attention call.
#[derive(Clone, Debug)]
pub struct Inputs<'a> {
    /// `[B, H, Q, D]`
    pub q: ArrayView4<'a, f32>,
    /// `[B or 1, HKV, KV, D]`
    pub k: ArrayView4<'a, f32>,
    /// `[B or 1, HKV, KV, D]`
    pub v: ArrayView4<'a, f32>,
    /// Named buffers, in their declared element types.
    pub buffers: BTreeMap<String, BufferData>,
    /// The absolute position of query row 0 (`q = row + q_offset`).
    pub q_offset: i64,
    /// Whether to return the log-sum-exp of every query row.
    pub want_lse: bool,
}

impl<'a> Inputs<'a> {
    pub fn new(
        q: ArrayView4<'a, f32>,
        k: ArrayView4<'a, f32>,
        v: ArrayView4<'a, f32>,
    ) -> Inputs<'a> {
        Inputs {
            q,
            k,
            v,
            buffers: BTreeMap::new(),
            q_offset: 0,
            want_lse: false,
        }
    }

    pub fn buffer(mut self, name: &str, data: BufferData) -> Inputs<'a> {
        self.buffers.insert(name.to_string(), data);
        self
    }

    pub fn q_offset(mut self, offset: i64) -> Inputs<'a> {
        self.q_offset = offset;
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

/// A validated problem: concrete shapes and the buffers in declaration order.
#[derive(Clone, Debug)]
pub struct Bound {
    pub shapes: Shapes,
    pub q_offset: i64,
    /// Batch size of k and v: `shapes.b`, or 1 when they broadcast.
    pub kv_batch: usize,
    /// Indexed by `BufferId`.
    pub buffers: Vec<BufferData>,
}

impl Bound {
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
    #[diagnostic(code(attnc::bind::heads), help("GQA/MQA needs H to be a multiple of HKV (query head h reads key/value head h / (H / HKV))"))]
    Heads { h: usize, hkv: usize },
    #[error("the query offset must be >= 0, found {0}")]
    #[diagnostic(code(attnc::bind::q_offset), help("the offset is the absolute position of query row 0: 0 for prefill, KV - Q when decoding with a KV cache"))]
    NegativeOffset(i64),
    #[error("{what} is {value}, past the limit of {limit} (2^31 - 1)", limit = crate::sema::POSITION_LIMIT)]
    #[diagnostic(
        code(attnc::bind::too_large),
        help("shapes and positions (q_offset + Q, KV) must stay within 2^31 - 1; split the sequence into smaller calls")
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
    if ks[0] != qs[0] && ks[0] != 1 {
        return Err(BindError::Batch {
            q: qs[0],
            kv: ks[0],
        });
    }
    let (h, hkv) = (qs[1], ks[1]);
    if hkv == 0 || h % hkv != 0 {
        return Err(BindError::Heads { h, hkv });
    }
    if inputs.q_offset < 0 {
        return Err(BindError::NegativeOffset(inputs.q_offset));
    }
    let sizes = [
        ("the batch B", qs[0] as i128),
        ("the number of heads H", h as i128),
        ("the head dim D", qs[3] as i128),
        ("the key length KV", ks[2] as i128),
        (
            "the query end q_offset + Q",
            inputs.q_offset as i128 + qs[2] as i128,
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
        kv: ks[2],
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
        let expected: Vec<usize> = decl.dims.iter().map(|d| shapes.dim(*d)).collect();
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
    Ok(Bound {
        shapes,
        q_offset: inputs.q_offset,
        kv_batch: ks[0],
        buffers,
    })
}
