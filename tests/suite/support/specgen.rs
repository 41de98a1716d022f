//! Random `.attn` specs for property tests, each with a plain-data
//! description of what it computes.
//!
//! [`arb_spec`] draws a [`GenSpec`]: the source text of one attention block,
//! the param overrides to apply to it, the buffers it declares (with how to
//! fill them), and its mask, score mod and scale as enum trees
//! ([`MaskDesc`], [`ScoreDesc`], [`ScaleDesc`]). The trees hold the effective
//! values (a param's override when it has one), so evaluating them needs only
//! the tree, the shapes and the buffer data: [`MaskDesc::eval`],
//! [`ScoreDesc::eval`], [`ScaleDesc::eval`]. They are interpreted here in
//! plain Rust and never go through attnc's parser, checker or evaluator, which
//! is what makes them an independent oracle.
//!
//! The mask atoms are the attention patterns of the field (causal, sliding
//! windows, prefix, sinks, chunks, documents, global tokens, dilation,
//! block layouts, trees) plus index arithmetic with negative operands (floor
//! division and modulo), heads and batches; they combine with `&&`, `||`, `!`,
//! `if` and `let`. Score mods (soft-capping, ALiBi, relative-bias tables,
//! constant factors, `if`-based biases, `-inf` scores, built-in functions)
//! nest around `score`.
//!
//! [`arb_case`] adds random shapes (GQA and MQA, Q != KV, query offsets, k/v
//! batch broadcast) and a seed; [`GenCase::data`] makes q, k, v and the
//! buffers from the seed, and [`GenCase::inputs`] turns them into
//! [`attnc::Inputs`].
//!
//! Buffer reads on the query side index the next position, `q + 1`, and are
//! guarded by `q + 1 < KV &&` most of the time; the unguarded ones fall out of
//! range at the call's last position (`KV` is the end of the call's
//! positions), and then both the evaluator here and attnc must report the
//! same read.

use std::collections::{BTreeMap, BTreeSet};

use attnc::{BufferData, Inputs, SourceFile, SpecOptions};
use ndarray::{Array4, ArrayD, IxDyn};
use proptest::prelude::*;

// ---------------------------------------------------------------------------
// The description.

/// How a constant of the spec is written.
#[derive(Clone, Debug, PartialEq)]
pub enum ArgForm<T> {
    /// An inline literal.
    Literal,
    /// A `param` with this default; overridden with the value when they differ.
    Param { default: T },
}

/// An int constant; `value` is what the spec computes with.
#[derive(Clone, Debug, PartialEq)]
pub struct IntArg {
    pub value: i64,
    pub form: ArgForm<i64>,
}

/// A float constant; `value` is what the spec computes with.
#[derive(Clone, Debug, PartialEq)]
pub struct FloatArg {
    pub value: f64,
    pub form: ArgForm<f64>,
}

/// One attention pattern, written as a small bool expression.
#[derive(Clone, Debug, PartialEq)]
pub enum MaskAtom {
    /// `true` / `false`
    Const(bool),
    /// `causal`: q >= kv
    Causal,
    /// `q - kv < w`
    Window(IntArg),
    /// `abs(q - kv) <= w`
    Band(IntArg),
    /// `kv < n` (a prefix, or attention sinks)
    KeyBelow(IntArg),
    /// `q / c == kv / c` (c >= 1)
    Chunk(IntArg),
    /// `(q - kv) / c == k`, floor division; c != 0, may be negative
    FloorDiv { c: i64, k: i64 },
    /// `(kv - q) % c == r`, floor modulo (the remainder has c's sign); c != 0
    FloorMod { c: i64, r: i64 },
    /// `(q - kv) % d == 0` (d >= 1)
    Dilated(IntArg),
    /// `kv % (h + 1) == 0`
    HeadStride,
    /// `kv + b < KV`
    BatchTail,
    /// `doc[q] == doc[kv]`, with `q < KV &&` in front when guarded.
    /// `buffer doc[KV]: int`, non-decreasing document ids.
    Doc { guarded: bool },
    /// `global[kv] || global[q]`, with `q < KV &&` before `global[q]` when
    /// guarded. `buffer global[KV]: bool`.
    Global { guarded: bool },
    /// `layout_BQ_BK[q / bq, kv / bk]`, with `q < KV &&` in front when guarded.
    /// `buffer layout_BQ_BK[KV / bq, KV / bk]: bool`.
    Block { bq: i64, bk: i64, guarded: bool },
    /// `ancestor(parent, q, kv)`, with `q < KV &&` in front when guarded.
    /// `buffer parent[KV]: int`, a forest (parent[i] < i or -1).
    Ancestor { guarded: bool },
    /// A bool param.
    Flag { value: bool, default: bool },
    /// `((q OP kv) & M) == R` with OP one of `&`, `|`, `^` (0, 1, 2); M
    /// written in decimal, hex or binary (`radix` 10, 16, 2) with a `_`.
    Bits { op: u8, m: i64, r: i64, radix: u32 },
    /// `(q >> S) == (kv >> S)`: aligned blocks of 2^S positions.
    ShiftBlock { s: i64 },
    /// `(~q & kv & M) == 0`: kv's bits under M are among q's.
    BitSubset { m: i64 },
    /// `((q - kv) >> S) == K`: an arithmetic shift of a value of either sign.
    ShiftDiff { s: i64, k: i64 },
    /// `(1 << (q - kv + S)) > 1`: a shift by a count that leaves 0..=63 on
    /// some elements, an error there (the `<<` of bit 63 gives a negative).
    ShiftCount { s: i64 },
    /// `any(i in 0..N: q - kv == i * STEP)`: keys at N strided offsets.
    AnyStride { n: i64, step: i64 },
    /// `all(i in 0..N: q - kv + i >= 0)` (causal for N >= 1, true for N = 0).
    AllCausal { n: i64 },
}

/// A mask: atoms combined with `&&`, `||`, `!`, `if` and `let`.
#[derive(Clone, Debug, PartialEq)]
pub enum MaskDesc {
    Atom(MaskAtom),
    /// `let mN = INNER`, used by name; the same value as `INNER`.
    Let(Box<MaskDesc>),
    Not(Box<MaskDesc>),
    And(Box<MaskDesc>, Box<MaskDesc>),
    Or(Box<MaskDesc>, Box<MaskDesc>),
    /// `if COND { THEN } else { OTHERWISE }`
    If(Box<MaskDesc>, Box<MaskDesc>, Box<MaskDesc>),
    /// `fN(q, kv, b, h)` of a function of the block, `fn fN(q: int, kv:
    /// int, b: int, h: int) -> bool { LETS INNER }`; the same value as
    /// `INNER`. Its lets go into the function's body.
    Fn(Box<MaskDesc>),
}

/// A position-dependent bias added to the score.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BiasFn {
    /// `sigmoid(float(q - kv) * 0.25)`
    Sigmoid,
    /// `tanh(float(kv) / 8.0)`
    Tanh,
    /// `exp2(-float(abs(q - kv)))`
    Exp2,
    /// `exp(float(-abs(q - kv)) / 4.0)`
    Exp,
    /// `log(float(kv + 1))`
    Log,
    /// `log2(float(q + 1)) * 0.25`
    Log2,
    /// `sqrt(float(abs(q - kv))) * 0.1`
    Sqrt,
    /// `rsqrt(float(kv + 1))`
    Rsqrt,
    /// `floor(float(q - kv) / 2.0) * 0.1`
    Floor,
    /// `ceil(float(kv - q) / 3.0) * 0.1`
    Ceil,
    /// `round(float(q - kv) / 2.0) * 0.1` (ties to even)
    Round,
    /// `float(min(max(q - kv, -3), 5)) * 0.2`
    MinMax,
    /// `float(int(float(kv) * 0.7)) * 0.1` (`int` truncates)
    Trunc,
    /// `float((kv - q) % 3) * 0.5` (floor modulo)
    Mod,
    /// `sin(float(q - kv) * 0.3) * 0.5`
    Sin,
    /// `cos(float(kv) * 0.2)`
    Cos,
    /// `erf(float(q - kv) * 0.25)`
    Erf,
    /// `pow(float(abs(q - kv)) + 1.0, -0.5)`
    Pow,
    /// `float(sign(q - kv)) * 0.5`
    Sign,
    /// `tanh_approx(float(kv) / 8.0) * 0.01` (the GPU's `tanh.approx`
    /// errs by 2^-11 relative; the factor keeps that inside the parity
    /// tolerance)
    TanhApprox,
    /// `sum(i in 0..3: float(q - kv + i)) * 0.05`
    Sum,
}

impl BiasFn {
    pub const ALL: [BiasFn; 21] = [
        BiasFn::Sigmoid,
        BiasFn::Tanh,
        BiasFn::Exp2,
        BiasFn::Exp,
        BiasFn::Log,
        BiasFn::Log2,
        BiasFn::Sqrt,
        BiasFn::Rsqrt,
        BiasFn::Floor,
        BiasFn::Ceil,
        BiasFn::Round,
        BiasFn::MinMax,
        BiasFn::Trunc,
        BiasFn::Mod,
        BiasFn::Sin,
        BiasFn::Cos,
        BiasFn::Erf,
        BiasFn::Pow,
        BiasFn::Sign,
        BiasFn::TanhApprox,
        BiasFn::Sum,
    ];
}

/// A score mod: wrappers nested around `score`.
#[derive(Clone, Debug, PartialEq)]
pub enum ScoreDesc {
    /// `score`: q·k × scale.
    Score,
    /// A constant.
    Const(f64),
    /// `c * (INNER)`
    Mul(f64, Box<ScoreDesc>),
    /// `cap * tanh((INNER) / cap)`
    Softcap(FloatArg, Box<ScoreDesc>),
    /// `softcap(INNER, cap)` of the file's function `fn softcap(x: float,
    /// cap: float) -> float { let t = tanh(x / cap)  cap * t }`: the same
    /// value as `Softcap`.
    CallSoftcap(FloatArg, Box<ScoreDesc>),
    /// `(INNER) - slope[h] * (q - kv)`; `buffer slope[H]: float`.
    Alibi(Box<ScoreDesc>),
    /// `(INNER) + rel_M[h, clamp(kv - q, -M, M) + M]`; `buffer rel_M[H, 2M+1]: float`.
    RelBias(i64, Box<ScoreDesc>),
    /// `(INNER) + BIAS`
    Bias(BiasFn, Box<ScoreDesc>),
    /// `(INNER) + if COND { bias } else { 0.0 }`
    IfBias {
        cond: MaskDesc,
        bias: f64,
        inner: Box<ScoreDesc>,
    },
    /// `if COND { INNER } else { -1.0 / 0.0 }`: a visible key with score -inf.
    NegInfUnless {
        cond: MaskDesc,
        inner: Box<ScoreDesc>,
    },
    /// `let sN = INNER` then `if sN > 0.0 { sN } else { sN * 0.5 }`.
    Leaky(Box<ScoreDesc>),
    /// `clamp(INNER, -c, c)`
    Clamp(f64, Box<ScoreDesc>),
}

/// An explicit `scale = ...`.
#[derive(Clone, Debug, PartialEq)]
pub enum ScaleDesc {
    /// A float literal.
    Literal(f64),
    /// A float param.
    Param(FloatArg),
    /// `1`, an int the checker converts to float.
    IntOne,
    /// `rsqrt(float(D))`, the default written out.
    InvSqrtD,
    /// `float(HKV) / float(H)`
    HeadRatio,
}

/// A shape name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    B,
    H,
    Hkv,
    Q,
    Kv,
    D,
}

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Shape::B => "B",
            Shape::H => "H",
            Shape::Hkv => "HKV",
            Shape::Q => "Q",
            Shape::Kv => "KV",
            Shape::D => "D",
        }
    }
}

/// A buffer dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenDim {
    Shape(Shape),
    /// `SHAPE / n`, ceil-divided.
    CeilDiv(Shape, usize),
    Lit(usize),
}

/// A buffer element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    Int,
    Float,
    Bool,
}

/// How to fill a buffer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fill {
    /// Non-decreasing document ids starting at 0 (1-dimensional int).
    DocIds,
    /// Each element true with this probability (bool).
    Bernoulli(f64),
    /// A forest: element i is -1 or a random j < i (1-dimensional int).
    Tree,
    /// Uniform floats in [lo, hi).
    Uniform(f64, f64),
}

/// A buffer the spec declares.
#[derive(Clone, Debug, PartialEq)]
pub struct GenBuffer {
    pub name: String,
    pub dims: Vec<GenDim>,
    pub elem: Elem,
    pub fill: Fill,
}

/// A random spec: its text, how to load it, and what it computes.
#[derive(Clone, Debug, PartialEq)]
pub struct GenSpec {
    /// The attention block's name.
    pub name: String,
    /// The `.attn` source text.
    pub source: String,
    /// Param overrides, as for `--param NAME=VALUE`.
    pub params: Vec<(String, String)>,
    /// The buffers the spec declares, in declaration order.
    pub buffers: Vec<GenBuffer>,
    pub mask: Option<MaskDesc>,
    pub score: Option<ScoreDesc>,
    pub scale: Option<ScaleDesc>,
}

// ---------------------------------------------------------------------------
// Rendering the description as source text.

#[derive(Default)]
struct Render {
    params: Vec<String>,
    overrides: Vec<(String, String)>,
    buffers: Vec<GenBuffer>,
    lets: Vec<String>,
    /// Lets made so far, which numbers their names.
    let_count: usize,
    /// The block's functions and the file's.
    functions: Vec<String>,
    file_functions: Vec<String>,
    /// Whether the text is inside a function's body, where `causal` is
    /// not in scope.
    in_fn: bool,
}

fn int_lit(v: i64) -> String {
    if v < 0 {
        format!("({v})")
    } else {
        v.to_string()
    }
}

fn float_lit(v: f64) -> String {
    // `{:?}` always prints a decimal point or an exponent, so the text reads
    // back as a float literal with the same value.
    if v < 0.0 {
        format!("({v:?})")
    } else {
        format!("{v:?}")
    }
}

impl Render {
    fn param(&mut self, ty: &str, default: String, value: String) -> String {
        let name = format!("p{}", self.params.len());
        self.params.push(format!("param {name}: {ty} = {default}"));
        if default != value {
            self.overrides.push((name.clone(), value));
        }
        name
    }

    fn int_arg(&mut self, a: &IntArg) -> String {
        match &a.form {
            ArgForm::Literal => int_lit(a.value),
            ArgForm::Param { default } => {
                self.param("int", default.to_string(), a.value.to_string())
            }
        }
    }

    fn float_arg(&mut self, a: &FloatArg) -> String {
        match &a.form {
            ArgForm::Literal => float_lit(a.value),
            ArgForm::Param { default } => {
                self.param("float", format!("{default:?}"), format!("{:?}", a.value))
            }
        }
    }

    fn buffer(&mut self, name: &str, dims: Vec<GenDim>, elem: Elem, fill: Fill) -> String {
        if !self.buffers.iter().any(|b| b.name == name) {
            self.buffers.push(GenBuffer {
                name: name.to_string(),
                dims,
                elem,
                fill,
            });
        }
        name.to_string()
    }

    fn let_(&mut self, prefix: &str, value: String) -> String {
        let name = format!("{prefix}{}", self.let_count);
        self.let_count += 1;
        self.lets.push(format!("let {name} = {value}"));
        name
    }

    fn atom(&mut self, a: &MaskAtom) -> String {
        let guard = |g: bool| if g { "q + 1 < KV && " } else { "" };
        match a {
            MaskAtom::Const(c) => c.to_string(),
            MaskAtom::Causal if self.in_fn => "q >= kv".to_string(),
            MaskAtom::Causal => "causal".to_string(),
            MaskAtom::Window(w) => format!("q - kv < {}", self.int_arg(w)),
            MaskAtom::Band(w) => format!("abs(q - kv) <= {}", self.int_arg(w)),
            MaskAtom::KeyBelow(n) => format!("kv < {}", self.int_arg(n)),
            MaskAtom::Chunk(c) => {
                let c = self.int_arg(c);
                format!("q / {c} == kv / {c}")
            }
            MaskAtom::FloorDiv { c, k } => format!("(q - kv) / {} == {}", int_lit(*c), int_lit(*k)),
            MaskAtom::FloorMod { c, r } => format!("(kv - q) % {} == {}", int_lit(*c), int_lit(*r)),
            MaskAtom::Dilated(d) => format!("(q - kv) % {} == 0", self.int_arg(d)),
            MaskAtom::HeadStride => "kv % (h + 1) == 0".to_string(),
            MaskAtom::BatchTail => "kv + b < KV".to_string(),
            MaskAtom::Doc { guarded } => {
                let doc = self.buffer(
                    "doc",
                    vec![GenDim::Shape(Shape::Kv)],
                    Elem::Int,
                    Fill::DocIds,
                );
                format!("{}{doc}[q + 1] == {doc}[kv]", guard(*guarded))
            }
            MaskAtom::Global { guarded } => {
                let g = self.buffer(
                    "global",
                    vec![GenDim::Shape(Shape::Kv)],
                    Elem::Bool,
                    Fill::Bernoulli(0.2),
                );
                format!("{g}[kv] || ({}{g}[q + 1])", guard(*guarded))
            }
            MaskAtom::Block { bq, bk, guarded } => {
                let name = format!("layout_{bq}_{bk}");
                let dims = vec![
                    GenDim::CeilDiv(Shape::Kv, *bq as usize),
                    GenDim::CeilDiv(Shape::Kv, *bk as usize),
                ];
                let l = self.buffer(&name, dims, Elem::Bool, Fill::Bernoulli(0.5));
                format!("{}{l}[(q + 1) / {bq}, kv / {bk}]", guard(*guarded))
            }
            MaskAtom::Ancestor { guarded } => {
                let p = self.buffer(
                    "parent",
                    vec![GenDim::Shape(Shape::Kv)],
                    Elem::Int,
                    Fill::Tree,
                );
                format!("{}ancestor({p}, q + 1, kv)", guard(*guarded))
            }
            MaskAtom::Bits { op, m, r, radix } => {
                let sym = ["&", "|", "^"][*op as usize];
                let m = match radix {
                    16 => format!("0x{m:x}"),
                    2 => format!("0b{:b}", m)
                        .replacen("0b1", "0b1_", 1)
                        .trim_end_matches('_')
                        .to_string(),
                    _ => m.to_string(),
                };
                format!("((q {sym} kv) & {m}) == {r}")
            }
            MaskAtom::ShiftBlock { s } => format!("(q >> {s}) == (kv >> {s})"),
            MaskAtom::BitSubset { m } => format!("(~q & kv & {m}) == 0"),
            MaskAtom::ShiftDiff { s, k } => format!("((q - kv) >> {s}) == {}", int_lit(*k)),
            MaskAtom::ShiftCount { s } => format!("(1 << (q - kv + {s})) > 1"),
            MaskAtom::AnyStride { n, step } => {
                format!("any(i in 0..{n}: q - kv == i * {})", int_lit(*step))
            }
            MaskAtom::AllCausal { n } => format!("all(i in 0..{n}: q - kv + i >= 0)"),
            MaskAtom::Flag { value, default } => {
                self.param("bool", default.to_string(), value.to_string())
            }
        }
    }

    fn mask(&mut self, m: &MaskDesc) -> String {
        match m {
            MaskDesc::Atom(a) => format!("({})", self.atom(a)),
            MaskDesc::Let(inner) => {
                let value = self.mask(inner);
                self.let_("m", value)
            }
            MaskDesc::Not(a) => format!("!{}", self.mask(a)),
            MaskDesc::Fn(inner) => {
                let outer_lets = std::mem::take(&mut self.lets);
                let was_in_fn = std::mem::replace(&mut self.in_fn, true);
                let body = self.mask(inner);
                self.in_fn = was_in_fn;
                let lets = std::mem::replace(&mut self.lets, outer_lets);
                let name = format!("f{}", self.functions.len());
                let mut text = format!("fn {name}(q: int, kv: int, b: int, h: int) -> bool {{\n");
                for l in lets {
                    text += &format!("        {l}\n");
                }
                text += &format!("        {body}\n    }}");
                self.functions.push(text);
                format!("{name}(q, kv, b, h)")
            }
            MaskDesc::And(a, b) => format!("({} && {})", self.mask(a), self.mask(b)),
            MaskDesc::Or(a, b) => format!("({} || {})", self.mask(a), self.mask(b)),
            MaskDesc::If(c, a, b) => {
                format!(
                    "(if {} {{ {} }} else {{ {} }})",
                    self.mask(c),
                    self.mask(a),
                    self.mask(b)
                )
            }
        }
    }

    fn bias(&mut self, f: BiasFn) -> String {
        match f {
            BiasFn::Sigmoid => "sigmoid(float(q - kv) * 0.25)",
            BiasFn::Tanh => "tanh(float(kv) / 8.0)",
            BiasFn::Exp2 => "exp2(-float(abs(q - kv)))",
            BiasFn::Exp => "exp(float(-abs(q - kv)) / 4.0)",
            BiasFn::Log => "log(float(kv + 1))",
            BiasFn::Log2 => "log2(float(q + 1)) * 0.25",
            BiasFn::Sqrt => "sqrt(float(abs(q - kv))) * 0.1",
            BiasFn::Rsqrt => "rsqrt(float(kv + 1))",
            BiasFn::Floor => "floor(float(q - kv) / 2.0) * 0.1",
            BiasFn::Ceil => "ceil(float(kv - q) / 3.0) * 0.1",
            BiasFn::Round => "round(float(q - kv) / 2.0) * 0.1",
            BiasFn::MinMax => "float(min(max(q - kv, -3), 5)) * 0.2",
            BiasFn::Trunc => "float(int(float(kv) * 0.7)) * 0.1",
            BiasFn::Mod => "float((kv - q) % 3) * 0.5",
            BiasFn::Sin => "sin(float(q - kv) * 0.3) * 0.5",
            BiasFn::Cos => "cos(float(kv) * 0.2)",
            BiasFn::Erf => "erf(float(q - kv) * 0.25)",
            BiasFn::Pow => "pow(float(abs(q - kv)) + 1.0, -0.5)",
            BiasFn::Sign => "float(sign(q - kv)) * 0.5",
            BiasFn::TanhApprox => "tanh_approx(float(kv) / 8.0) * 0.01",
            BiasFn::Sum => "sum(i in 0..3: float(q - kv + i)) * 0.05",
        }
        .to_string()
    }

    fn score(&mut self, s: &ScoreDesc) -> String {
        match s {
            ScoreDesc::Score => "score".to_string(),
            ScoreDesc::Const(c) => float_lit(*c),
            ScoreDesc::Mul(c, inner) => format!("{} * ({})", float_lit(*c), self.score(inner)),
            ScoreDesc::Softcap(cap, inner) => {
                let cap = self.float_arg(cap);
                format!("{cap} * tanh(({}) / {cap})", self.score(inner))
            }
            ScoreDesc::CallSoftcap(cap, inner) => {
                let cap = self.float_arg(cap);
                let f = "fn softcap(x: float, cap: float) -> float {\n    let t = tanh(x / cap)\n    cap * t\n}";
                if !self.file_functions.iter().any(|g| g == f) {
                    self.file_functions.push(f.to_string());
                }
                format!("softcap({}, {cap})", self.score(inner))
            }
            ScoreDesc::Alibi(inner) => {
                let slope = self.buffer(
                    "slope",
                    vec![GenDim::Shape(Shape::H)],
                    Elem::Float,
                    Fill::Uniform(0.0, 0.5),
                );
                format!("({}) - {slope}[h] * (q - kv)", self.score(inner))
            }
            ScoreDesc::RelBias(m, inner) => {
                let dims = vec![GenDim::Shape(Shape::H), GenDim::Lit(2 * *m as usize + 1)];
                let rel = self.buffer(
                    &format!("rel_{m}"),
                    dims,
                    Elem::Float,
                    Fill::Uniform(-1.0, 1.0),
                );
                format!(
                    "({}) + {rel}[h, clamp(kv - q, -{m}, {m}) + {m}]",
                    self.score(inner)
                )
            }
            ScoreDesc::Bias(f, inner) => format!("({}) + {}", self.score(inner), self.bias(*f)),
            ScoreDesc::IfBias { cond, bias, inner } => {
                let inner = self.score(inner);
                format!(
                    "({inner}) + if {} {{ {} }} else {{ 0.0 }}",
                    self.mask(cond),
                    float_lit(*bias)
                )
            }
            ScoreDesc::NegInfUnless { cond, inner } => {
                let cond = self.mask(cond);
                format!(
                    "if {cond} {{ {} }} else {{ -1.0 / 0.0 }}",
                    self.score(inner)
                )
            }
            ScoreDesc::Leaky(inner) => {
                let value = self.score(inner);
                let s = self.let_("s", value);
                format!("if {s} > 0.0 {{ {s} }} else {{ {s} * 0.5 }}")
            }
            ScoreDesc::Clamp(c, inner) => format!("clamp({}, -{c:?}, {c:?})", self.score(inner)),
        }
    }

    fn scale(&mut self, s: &ScaleDesc) -> String {
        match s {
            ScaleDesc::Literal(x) => float_lit(*x),
            ScaleDesc::Param(a) => self.float_arg(a),
            ScaleDesc::IntOne => "1".to_string(),
            ScaleDesc::InvSqrtD => "rsqrt(float(D))".to_string(),
            ScaleDesc::HeadRatio => "float(HKV) / float(H)".to_string(),
        }
    }
}

impl GenSpec {
    /// Renders a description as a spec. `order` picks the order of the
    /// `mask`, `score` and `scale` items (any order is legal).
    pub fn new(
        mask: Option<MaskDesc>,
        score: Option<ScoreDesc>,
        scale: Option<ScaleDesc>,
        order: u8,
    ) -> GenSpec {
        let mut r = Render::default();
        let mut main = Vec::new();
        if let Some(m) = &mask {
            main.push(format!("mask = {}", r.mask(m)));
        }
        if let Some(s) = &score {
            main.push(format!("score = {}", r.score(s)));
        }
        if let Some(s) = &scale {
            main.push(format!("scale = {}", r.scale(s)));
        }
        let n = main.len().max(1);
        main.rotate_left(order as usize % n);
        if order & 8 != 0 {
            main.reverse();
        }
        let name = "gen".to_string();
        let mut source = "// generated spec\n".to_string();
        for f in &r.file_functions {
            source += &format!("{f}\n");
        }
        source += &format!("attention {name} {{\n");
        for p in &r.params {
            source += &format!("    {p}\n");
        }
        for b in &r.buffers {
            let dims: Vec<String> = b
                .dims
                .iter()
                .map(|d| match d {
                    GenDim::Shape(s) => s.name().to_string(),
                    GenDim::CeilDiv(s, n) => format!("{} / {n}", s.name()),
                    GenDim::Lit(n) => n.to_string(),
                })
                .collect();
            let elem = match b.elem {
                Elem::Int => "int",
                Elem::Float => "float",
                Elem::Bool => "bool",
            };
            source += &format!("    buffer {}[{}]: {elem}\n", b.name, dims.join(", "));
        }
        for f in &r.functions {
            source += &format!("    {f}\n");
        }
        for l in r.lets.iter().chain(&main) {
            source += &format!("    {l}\n");
        }
        source += "}\n";
        GenSpec {
            name,
            source,
            params: r.overrides,
            buffers: r.buffers,
            mask,
            score,
            scale,
        }
    }

    pub fn source_file(&self) -> SourceFile {
        SourceFile::new("gen.attn", self.source.clone())
    }

    /// Options that apply the param overrides.
    pub fn options(&self) -> SpecOptions {
        SpecOptions {
            entry: None,
            params: self.params.clone(),
        }
    }
}

// ---------------------------------------------------------------------------
// Shapes, cases and data.

/// The shapes of one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenShapes {
    pub b: usize,
    pub h: usize,
    pub hkv: usize,
    pub q: usize,
    pub kv: usize,
    pub d: usize,
    /// Batch of k and v: `b`, or 1 to broadcast.
    pub kv_batch: usize,
    pub q_offset: i64,
    /// The position of key row 0.
    pub kv_offset: i64,
}

impl GenShapes {
    /// `KV` as the spec sees it: the end of the call's positions, keys or
    /// queries (`max(kv_offset + kv, q_offset + Q)`).
    pub fn kv_end(&self) -> usize {
        (self.kv_offset as usize + self.kv).max(self.q_offset as usize + self.q)
    }

    pub fn get(&self, s: Shape) -> usize {
        match s {
            Shape::B => self.b,
            Shape::H => self.h,
            Shape::Hkv => self.hkv,
            Shape::Q => self.q,
            Shape::Kv => self.kv_end(),
            Shape::D => self.d,
        }
    }

    pub fn dim(&self, d: GenDim) -> usize {
        match d {
            GenDim::Shape(s) => self.get(s),
            GenDim::CeilDiv(s, n) => self.get(s).div_ceil(n),
            GenDim::Lit(n) => n,
        }
    }
}

/// A spec, shapes, and a seed for the data.
#[derive(Clone, Debug, PartialEq)]
pub struct GenCase {
    pub spec: GenSpec,
    pub shapes: GenShapes,
    pub seed: u64,
}

/// The arrays of one case.
#[derive(Clone, Debug)]
pub struct CaseData {
    /// `[B, H, Q, D]`, uniform in [-1, 1).
    pub q: Array4<f32>,
    /// `[kv_batch, HKV, KV, D]`, uniform in [-1, 1).
    pub k: Array4<f32>,
    pub v: Array4<f32>,
    pub buffers: BTreeMap<String, BufferData>,
}

/// A small deterministic generator (SplitMix64), so a case's data is a
/// function of its seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n); n >= 1.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

impl GenBuffer {
    /// Makes data of this buffer's shape under `shapes`.
    pub fn generate(&self, shapes: &GenShapes, rng: &mut Rng) -> BufferData {
        let shape: Vec<usize> = self.dims.iter().map(|d| shapes.dim(*d)).collect();
        let n: usize = shape.iter().product();
        let dyn_shape = IxDyn(&shape);
        match (self.elem, self.fill) {
            (Elem::Int, Fill::DocIds) => {
                let mut doc = 0i64;
                let v = (0..n)
                    .map(|_| {
                        if rng.unit() < 0.2 {
                            doc += 1;
                        }
                        doc
                    })
                    .collect();
                BufferData::Int(ArrayD::from_shape_vec(dyn_shape, v).unwrap())
            }
            (Elem::Int, Fill::Tree) => {
                let v = (0..n as u64)
                    .map(|i| {
                        if i == 0 || rng.unit() < 0.25 {
                            -1
                        } else {
                            rng.below(i) as i64
                        }
                    })
                    .collect();
                BufferData::Int(ArrayD::from_shape_vec(dyn_shape, v).unwrap())
            }
            (Elem::Bool, Fill::Bernoulli(p)) => {
                let v = (0..n).map(|_| rng.unit() < p).collect();
                BufferData::Bool(ArrayD::from_shape_vec(dyn_shape, v).unwrap())
            }
            (Elem::Float, Fill::Uniform(lo, hi)) => {
                let v = (0..n)
                    .map(|_| (lo + (hi - lo) * rng.unit()) as f32)
                    .collect();
                BufferData::Float(ArrayD::from_shape_vec(dyn_shape, v).unwrap())
            }
            (elem, fill) => panic!("specgen: cannot fill a {elem:?} buffer with {fill:?}"),
        }
    }
}

fn uniform4(shape: (usize, usize, usize, usize), rng: &mut Rng) -> Array4<f32> {
    Array4::from_shape_simple_fn(shape, || (2.0 * rng.unit() - 1.0) as f32)
}

impl GenCase {
    /// Makes q, k, v and the buffers from the seed.
    pub fn data(&self) -> CaseData {
        let s = &self.shapes;
        let mut rng = Rng::new(self.seed);
        let q = uniform4((s.b, s.h, s.q, s.d), &mut rng);
        let k = uniform4((s.kv_batch, s.hkv, s.kv, s.d), &mut rng);
        let v = uniform4((s.kv_batch, s.hkv, s.kv, s.d), &mut rng);
        let buffers = self
            .spec
            .buffers
            .iter()
            .map(|b| (b.name.clone(), b.generate(s, &mut rng)))
            .collect();
        CaseData { q, k, v, buffers }
    }

    /// The attnc inputs of this case (lse requested).
    pub fn inputs<'a>(&self, data: &'a CaseData) -> Inputs<'a> {
        let mut inputs = Inputs::new(data.q.view(), data.k.view(), data.v.view())
            .q_offset(self.shapes.q_offset)
            .kv_offset(self.shapes.kv_offset)
            .with_lse();
        inputs.buffers = data.buffers.clone();
        inputs
    }
}

// ---------------------------------------------------------------------------
// Evaluating the description.

/// The shapes and buffers a description is evaluated against.
#[derive(Clone, Copy, Debug)]
pub struct Env<'a> {
    pub shapes: &'a GenShapes,
    pub buffers: &'a BTreeMap<String, BufferData>,
}

/// The point of evaluation; `q` is absolute (row + query offset).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct At {
    pub b: i64,
    pub h: i64,
    pub q: i64,
    pub kv: i64,
}

/// Why evaluating a description failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EvalFailure {
    /// A read outside the buffer.
    OutOfRange {
        buffer: String,
        index: Vec<i64>,
        at: At,
    },
    /// `ancestor` looped.
    Cycle { buffer: String },
    /// A shift by a count outside 0..=63.
    Shift { count: i64, at: At },
}

/// Floor division, computed through f64 (exact for the small operands used here).
pub fn floor_div(a: i64, b: i64) -> i64 {
    assert!(b != 0 && a.abs() < (1 << 50) && b.abs() < (1 << 50));
    (a as f64 / b as f64).floor() as i64
}

/// The remainder of floor division: it has the divisor's sign.
pub fn floor_mod(a: i64, b: i64) -> i64 {
    a - b * floor_div(a, b)
}

impl Env<'_> {
    fn read(&self, name: &str, index: &[i64], at: At) -> Result<(usize, &BufferData), EvalFailure> {
        let data = self
            .buffers
            .get(name)
            .unwrap_or_else(|| panic!("specgen: no data for buffer `{name}`"));
        let shape = match data {
            BufferData::Int(a) => a.shape(),
            BufferData::Float(a) => a.shape(),
            BufferData::Bool(a) => a.shape(),
        };
        assert_eq!(
            shape.len(),
            index.len(),
            "specgen: wrong number of indices for `{name}`"
        );
        let mut flat = 0usize;
        for (&i, &n) in index.iter().zip(shape) {
            if i < 0 || i >= n as i64 {
                return Err(EvalFailure::OutOfRange {
                    buffer: name.to_string(),
                    index: index.to_vec(),
                    at,
                });
            }
            flat = flat * n + i as usize;
        }
        Ok((flat, data))
    }

    pub fn int(&self, name: &str, index: &[i64], at: At) -> Result<i64, EvalFailure> {
        match self.read(name, index, at)? {
            (i, BufferData::Int(a)) => Ok(a.as_slice().unwrap()[i]),
            _ => panic!("specgen: `{name}` is not an int buffer"),
        }
    }

    pub fn float(&self, name: &str, index: &[i64], at: At) -> Result<f64, EvalFailure> {
        match self.read(name, index, at)? {
            (i, BufferData::Float(a)) => Ok(f64::from(a.as_slice().unwrap()[i])),
            _ => panic!("specgen: `{name}` is not a float buffer"),
        }
    }

    pub fn bool(&self, name: &str, index: &[i64], at: At) -> Result<bool, EvalFailure> {
        match self.read(name, index, at)? {
            (i, BufferData::Bool(a)) => Ok(a.as_slice().unwrap()[i]),
            _ => panic!("specgen: `{name}` is not a bool buffer"),
        }
    }

    /// True iff `j == i` or `j` is reached from `i` by following `parent`
    /// (a negative entry is a root and ends the walk).
    pub fn ancestor(&self, parent: &str, i: i64, j: i64, at: At) -> Result<bool, EvalFailure> {
        if i == j {
            return Ok(true);
        }
        let mut seen = BTreeSet::new();
        let mut x = i;
        loop {
            if !seen.insert(x) {
                return Err(EvalFailure::Cycle {
                    buffer: parent.to_string(),
                });
            }
            x = self.int(parent, &[x], at)?;
            if x < 0 {
                return Ok(false);
            }
            if x == j {
                return Ok(true);
            }
        }
    }
}

impl MaskAtom {
    pub fn eval(&self, env: &Env<'_>, at: At) -> Result<bool, EvalFailure> {
        let (q, kv) = (at.q, at.kv);
        let n_kv = env.shapes.kv_end() as i64;
        // Query-side reads index the next position.
        let qn = q + 1;
        let guard = |g: bool| !g || qn < n_kv;
        Ok(match self {
            MaskAtom::Const(c) => *c,
            MaskAtom::Causal => q >= kv,
            MaskAtom::Window(w) => q - kv < w.value,
            MaskAtom::Band(w) => (q - kv).abs() <= w.value,
            MaskAtom::KeyBelow(n) => kv < n.value,
            MaskAtom::Chunk(c) => floor_div(q, c.value) == floor_div(kv, c.value),
            MaskAtom::FloorDiv { c, k } => floor_div(q - kv, *c) == *k,
            MaskAtom::FloorMod { c, r } => floor_mod(kv - q, *c) == *r,
            MaskAtom::Dilated(d) => floor_mod(q - kv, d.value) == 0,
            MaskAtom::HeadStride => floor_mod(kv, at.h + 1) == 0,
            MaskAtom::BatchTail => kv + at.b < n_kv,
            MaskAtom::Doc { guarded } => {
                guard(*guarded) && env.int("doc", &[qn], at)? == env.int("doc", &[kv], at)?
            }
            MaskAtom::Global { guarded } => {
                env.bool("global", &[kv], at)?
                    || (guard(*guarded) && env.bool("global", &[qn], at)?)
            }
            MaskAtom::Block { bq, bk, guarded } => {
                guard(*guarded)
                    && env.bool(
                        &format!("layout_{bq}_{bk}"),
                        &[floor_div(qn, *bq), floor_div(kv, *bk)],
                        at,
                    )?
            }
            MaskAtom::Ancestor { guarded } => {
                guard(*guarded) && env.ancestor("parent", qn, kv, at)?
            }
            MaskAtom::Flag { value, .. } => *value,
            MaskAtom::Bits { op, m, r, .. } => {
                let x = match op {
                    0 => q & kv,
                    1 => q | kv,
                    _ => q ^ kv,
                };
                (x & m) == *r
            }
            MaskAtom::ShiftBlock { s } => (q >> s) == (kv >> s),
            MaskAtom::BitSubset { m } => (!q & kv & m) == 0,
            MaskAtom::ShiftDiff { s, k } => ((q - kv) >> s) == *k,
            MaskAtom::ShiftCount { s } => {
                let count = q - kv + s;
                if !(0..=63).contains(&count) {
                    return Err(EvalFailure::Shift { count, at });
                }
                (1i64 << count) > 1
            }
            MaskAtom::AnyStride { n, step } => (0..*n).any(|i| q - kv == i * step),
            MaskAtom::AllCausal { n } => (0..*n).all(|i| q - kv + i >= 0),
        })
    }
}

impl MaskDesc {
    /// Whether the key is visible; left operands first, short-circuiting.
    pub fn eval(&self, env: &Env<'_>, at: At) -> Result<bool, EvalFailure> {
        Ok(match self {
            MaskDesc::Atom(a) => a.eval(env, at)?,
            MaskDesc::Let(inner) | MaskDesc::Fn(inner) => inner.eval(env, at)?,
            MaskDesc::Not(a) => !a.eval(env, at)?,
            MaskDesc::And(a, b) => a.eval(env, at)? && b.eval(env, at)?,
            MaskDesc::Or(a, b) => a.eval(env, at)? || b.eval(env, at)?,
            MaskDesc::If(c, a, b) => {
                if c.eval(env, at)? {
                    a.eval(env, at)?
                } else {
                    b.eval(env, at)?
                }
            }
        })
    }
}

impl BiasFn {
    pub fn eval(self, at: At) -> f64 {
        let (q, kv) = (at.q as f64, at.kv as f64);
        match self {
            BiasFn::Sigmoid => 1.0 / (1.0 + (-(q - kv) * 0.25).exp()),
            BiasFn::Tanh => (kv / 8.0).tanh(),
            BiasFn::Exp2 => (-(q - kv).abs()).exp2(),
            BiasFn::Exp => (-(q - kv).abs() / 4.0).exp(),
            BiasFn::Log => (kv + 1.0).ln(),
            BiasFn::Log2 => (q + 1.0).log2() * 0.25,
            BiasFn::Sqrt => (q - kv).abs().sqrt() * 0.1,
            BiasFn::Rsqrt => 1.0 / (kv + 1.0).sqrt(),
            BiasFn::Floor => ((q - kv) / 2.0).floor() * 0.1,
            BiasFn::Ceil => ((kv - q) / 3.0).ceil() * 0.1,
            BiasFn::Round => ((q - kv) / 2.0).round_ties_even() * 0.1,
            BiasFn::MinMax => (at.q - at.kv).clamp(-3, 5) as f64 * 0.2,
            BiasFn::Trunc => (kv * 0.7).trunc() * 0.1,
            BiasFn::Mod => floor_mod(at.kv - at.q, 3) as f64 * 0.5,
            BiasFn::Sin => ((q - kv) * 0.3).sin() * 0.5,
            BiasFn::Cos => (kv * 0.2).cos(),
            BiasFn::Erf => libm::erf((q - kv) * 0.25),
            BiasFn::Pow => ((q - kv).abs() + 1.0).powf(-0.5),
            BiasFn::Sign => (at.q - at.kv).signum() as f64 * 0.5,
            BiasFn::TanhApprox => (kv / 8.0).tanh() * 0.01,
            BiasFn::Sum => (0..3).map(|i| q - kv + i as f64).sum::<f64>() * 0.05,
        }
    }
}

impl ScoreDesc {
    /// The modified score of a visible key whose scaled score is `score`;
    /// inner expressions first, as written left to right.
    pub fn eval(&self, env: &Env<'_>, at: At, score: f64) -> Result<f64, EvalFailure> {
        let dq = (at.q - at.kv) as f64;
        Ok(match self {
            ScoreDesc::Score => score,
            ScoreDesc::Const(c) => *c,
            ScoreDesc::Mul(c, inner) => c * inner.eval(env, at, score)?,
            ScoreDesc::Softcap(cap, inner) | ScoreDesc::CallSoftcap(cap, inner) => {
                cap.value * (inner.eval(env, at, score)? / cap.value).tanh()
            }
            ScoreDesc::Alibi(inner) => {
                inner.eval(env, at, score)? - env.float("slope", &[at.h], at)? * dq
            }
            ScoreDesc::RelBias(m, inner) => {
                let s = inner.eval(env, at, score)?;
                s + env.float(
                    &format!("rel_{m}"),
                    &[at.h, (at.kv - at.q).clamp(-m, *m) + m],
                    at,
                )?
            }
            ScoreDesc::Bias(f, inner) => inner.eval(env, at, score)? + f.eval(at),
            ScoreDesc::IfBias { cond, bias, inner } => {
                let s = inner.eval(env, at, score)?;
                s + if cond.eval(env, at)? { *bias } else { 0.0 }
            }
            ScoreDesc::NegInfUnless { cond, inner } => {
                if cond.eval(env, at)? {
                    inner.eval(env, at, score)?
                } else {
                    f64::NEG_INFINITY
                }
            }
            ScoreDesc::Leaky(inner) => {
                let s = inner.eval(env, at, score)?;
                if s > 0.0 {
                    s
                } else {
                    s * 0.5
                }
            }
            ScoreDesc::Clamp(c, inner) => inner.eval(env, at, score)?.max(-c).min(*c),
        })
    }
}

impl ScaleDesc {
    pub fn eval(&self, shapes: &GenShapes) -> f64 {
        match self {
            ScaleDesc::Literal(x) => *x,
            ScaleDesc::Param(a) => a.value,
            ScaleDesc::IntOne => 1.0,
            ScaleDesc::InvSqrtD => 1.0 / (shapes.d as f64).sqrt(),
            ScaleDesc::HeadRatio => shapes.hkv as f64 / shapes.h as f64,
        }
    }
}

impl GenSpec {
    /// The softmax scale under `shapes` (1/sqrt(D) when the spec sets none).
    pub fn scale_value(&self, shapes: &GenShapes) -> f64 {
        match &self.scale {
            Some(s) => s.eval(shapes),
            None => 1.0 / (shapes.d as f64).sqrt(),
        }
    }
}

// ---------------------------------------------------------------------------
// Strategies.

fn arb_int_arg(lo: i64, hi: i64) -> impl Strategy<Value = IntArg> {
    (lo..=hi, lo..=hi, 0..3u8).prop_map(|(value, default, form)| match form {
        0 => IntArg {
            value,
            form: ArgForm::Literal,
        },
        1 => IntArg {
            value,
            form: ArgForm::Param { default: value },
        },
        _ => IntArg {
            value,
            form: ArgForm::Param { default },
        },
    })
}

/// Floats on a grid of quarters in [lo, hi], exact in decimal.
fn arb_quarter(lo: i32, hi: i32) -> impl Strategy<Value = f64> {
    (lo * 4..=hi * 4).prop_map(|k| f64::from(k) / 4.0)
}

fn arb_float_arg(lo: i32, hi: i32) -> impl Strategy<Value = FloatArg> {
    (arb_quarter(lo, hi), arb_quarter(lo, hi), 0..3u8).prop_map(|(value, default, form)| match form
    {
        0 => FloatArg {
            value,
            form: ArgForm::Literal,
        },
        1 => FloatArg {
            value,
            form: ArgForm::Param { default: value },
        },
        _ => FloatArg {
            value,
            form: ArgForm::Param { default },
        },
    })
}

fn nonzero(lo: i64, hi: i64) -> impl Strategy<Value = i64> {
    (lo..=hi).prop_filter("nonzero divisor", |c| *c != 0)
}

/// One mask atom.
pub fn arb_atom() -> impl Strategy<Value = MaskAtom> {
    let guarded = || prop::bool::weighted(0.85);
    prop_oneof![
        1 => any::<bool>().prop_map(MaskAtom::Const),
        4 => Just(MaskAtom::Causal),
        3 => arb_int_arg(-2, 12).prop_map(MaskAtom::Window),
        2 => arb_int_arg(0, 8).prop_map(MaskAtom::Band),
        2 => arb_int_arg(0, 10).prop_map(MaskAtom::KeyBelow),
        2 => arb_int_arg(1, 9).prop_map(MaskAtom::Chunk),
        1 => (nonzero(-5, 5), -3i64..=3).prop_map(|(c, k)| MaskAtom::FloorDiv { c, k }),
        1 => (nonzero(-5, 5), -4i64..=4).prop_map(|(c, r)| MaskAtom::FloorMod { c, r }),
        2 => arb_int_arg(1, 4).prop_map(MaskAtom::Dilated),
        1 => Just(MaskAtom::HeadStride),
        1 => Just(MaskAtom::BatchTail),
        2 => guarded().prop_map(|guarded| MaskAtom::Doc { guarded }),
        2 => guarded().prop_map(|guarded| MaskAtom::Global { guarded }),
        2 => (1i64..=5, 1i64..=5, guarded()).prop_map(|(bq, bk, guarded)| MaskAtom::Block { bq, bk, guarded }),
        2 => guarded().prop_map(|guarded| MaskAtom::Ancestor { guarded }),
        1 => (any::<bool>(), any::<bool>()).prop_map(|(value, default)| MaskAtom::Flag { value, default }),
        2 => (0u8..3, 1i64..=15, 0i64..=15, prop::sample::select(vec![10u32, 16, 2]))
            .prop_map(|(op, m, r, radix)| MaskAtom::Bits { op, m, r: r & m, radix }),
        1 => (0i64..=4).prop_map(|s| MaskAtom::ShiftBlock { s }),
        1 => (1i64..=31).prop_map(|m| MaskAtom::BitSubset { m }),
        1 => (0i64..=3, -3i64..=3).prop_map(|(s, k)| MaskAtom::ShiftDiff { s, k }),
        2 => (-4i64..=8).prop_map(|s| MaskAtom::ShiftCount { s }),
        1 => (0i64..=5, -4i64..=4).prop_map(|(n, step)| MaskAtom::AnyStride { n, step }),
        1 => (0i64..=3).prop_map(|n| MaskAtom::AllCausal { n }),
    ]
}

/// A mask tree of up to `depth` levels of combinators.
pub fn arb_mask_depth(depth: u32) -> impl Strategy<Value = MaskDesc> {
    arb_atom().prop_map(MaskDesc::Atom).prop_recursive(depth, 12, 3, |inner| {
        prop_oneof![
            3 => (inner.clone(), inner.clone()).prop_map(|(a, b)| MaskDesc::And(Box::new(a), Box::new(b))),
            2 => (inner.clone(), inner.clone()).prop_map(|(a, b)| MaskDesc::Or(Box::new(a), Box::new(b))),
            1 => inner.clone().prop_map(|a| MaskDesc::Not(Box::new(a))),
            1 => (inner.clone(), inner.clone(), inner.clone())
                .prop_map(|(c, a, b)| MaskDesc::If(Box::new(c), Box::new(a), Box::new(b))),
            1 => inner.clone().prop_map(|a| MaskDesc::Let(Box::new(a))),
            1 => inner.prop_map(|a| MaskDesc::Fn(Box::new(a))),
        ]
    })
}

/// A mask.
pub fn arb_mask() -> impl Strategy<Value = MaskDesc> {
    arb_mask_depth(3)
}

/// A score mod.
pub fn arb_score() -> impl Strategy<Value = ScoreDesc> {
    let leaf = prop_oneof![
        6 => Just(ScoreDesc::Score),
        1 => arb_quarter(-2, 2).prop_map(ScoreDesc::Const),
    ];
    leaf.prop_recursive(3, 8, 1, |inner| {
        let b = |s: ScoreDesc| Box::new(s);
        prop_oneof![
            1 => (arb_quarter(-2, 2), inner.clone()).prop_map(move |(c, s)| ScoreDesc::Mul(c, b(s))),
            2 => (arb_float_arg(1, 8), inner.clone()).prop_map(move |(cap, s)| ScoreDesc::Softcap(cap, b(s))),
            1 => (arb_float_arg(1, 8), inner.clone()).prop_map(move |(cap, s)| ScoreDesc::CallSoftcap(cap, b(s))),
            2 => inner.clone().prop_map(move |s| ScoreDesc::Alibi(b(s))),
            2 => (0i64..=4, inner.clone()).prop_map(move |(m, s)| ScoreDesc::RelBias(m, b(s))),
            3 => (prop::sample::select(BiasFn::ALL.to_vec()), inner.clone())
                .prop_map(move |(f, s)| ScoreDesc::Bias(f, b(s))),
            2 => (arb_mask_depth(1), arb_quarter(-2, 2), inner.clone())
                .prop_map(move |(cond, bias, s)| ScoreDesc::IfBias { cond, bias, inner: b(s) }),
            1 => (arb_mask_depth(1), inner.clone())
                .prop_map(move |(cond, s)| ScoreDesc::NegInfUnless { cond, inner: b(s) }),
            1 => inner.clone().prop_map(move |s| ScoreDesc::Leaky(b(s))),
            1 => (arb_quarter(1, 3), inner).prop_map(move |(c, s)| ScoreDesc::Clamp(c, b(s))),
        ]
    })
}

/// An explicit scale.
pub fn arb_scale() -> impl Strategy<Value = ScaleDesc> {
    prop_oneof![
        2 => (1i32..=8).prop_map(|k| ScaleDesc::Literal(f64::from(k) / 8.0)),
        2 => (1i32..=8, 1i32..=8, 0..3u8).prop_map(|(v, d, form)| {
            let value = f64::from(v) / 8.0;
            let form = match form {
                0 => ArgForm::Literal,
                1 => ArgForm::Param { default: value },
                _ => ArgForm::Param { default: f64::from(d) / 8.0 },
            };
            ScaleDesc::Param(FloatArg { value, form })
        }),
        1 => Just(ScaleDesc::IntOne),
        1 => Just(ScaleDesc::InvSqrtD),
        1 => Just(ScaleDesc::HeadRatio),
    ]
}

/// A random spec with its description.
pub fn arb_spec() -> impl Strategy<Value = GenSpec> {
    (
        prop::option::weighted(0.85, arb_mask()),
        prop::option::weighted(0.6, arb_score()),
        prop::option::weighted(0.3, arb_scale()),
        any::<u8>(),
    )
        .prop_map(|(mask, score, scale, order)| GenSpec::new(mask, score, scale, order))
}

/// Random shapes: B 1..=3, H in {1, 2, 4} with HKV dividing H, Q and KV
/// 1..=40 independently, D 1..=16, query and key offsets 0..=40 (each 0
/// half the time), k/v batch 1 (broadcast) a quarter of the time.
pub fn arb_shapes() -> impl Strategy<Value = GenShapes> {
    (
        1usize..=3,
        prop::sample::select(vec![1usize, 2, 4]),
        0usize..3,
        1usize..=40,
        1usize..=40,
        1usize..=16,
        prop_oneof![Just(0i64), 0i64..=40],
        prop_oneof![Just(0i64), 0i64..=40],
        prop::bool::weighted(0.25),
    )
        .prop_map(
            |(b, h, hkv_pick, q, kv, d, q_offset, kv_offset, broadcast)| {
                let divisors: Vec<usize> = (1..=h).filter(|x| h % x == 0).collect();
                let hkv = divisors[hkv_pick % divisors.len()];
                GenShapes {
                    b,
                    h,
                    hkv,
                    q,
                    kv,
                    d,
                    kv_batch: if broadcast { 1 } else { b },
                    q_offset,
                    kv_offset,
                }
            },
        )
}

/// A random spec, shapes and data seed.
pub fn arb_case() -> impl Strategy<Value = GenCase> {
    (arb_spec(), arb_shapes(), any::<u64>()).prop_map(|(spec, shapes, seed)| GenCase {
        spec,
        shapes,
        seed,
    })
}
