//! The tiled online-softmax loop IR.
//!
//! Stage: tile. Built from a checked spec and a [`Schedule`] by
//! [`super::build`], optimised by [`super::opt`], checked by
//! [`super::verify()`], executed by [`super::interp`] and translated by the
//! backends. It never refers to the AST or to sema's expression arena.
//!
//! A [`Kernel`] is a fixed FlashAttention-2 loop nest with straight-line SSA
//! code placed at the loop level where it is computed:
//!
//! ```text
//! call:                       once per call            (Level::Call)
//! grid b, h, qt parallel:
//!   head:                     once per (b, h)          (Level::Head)
//!   row i:                    once per query row        (Level::Row)
//!   for kt in full(qt):       FULL key tiles, no mask code
//!     col j:                  once per key column       (Level::Col)
//!     elem.full i, j:         once per element          (Level::Elem)
//!   for kt in partial(qt):    PARTIAL key tiles, mask applied
//!     col j: ...
//!     elem.partial i, j: ...
//!   finish: out = acc / l, lse
//! ```
//!
//! Values at `Col` and `Elem` level are shared by the two key-tile loops
//! unless they belong to one of them (`Inst::section`). Values of the FULL
//! section at `Call`, `Head` or `Row` level are computed only for query tiles
//! that have at least one FULL tile (a read there is only legitimate where
//! some key is visible), and row values only for query tiles that visit any
//! key tile. Each kernel has the
//! roots `scale` and `q_prescale` (call level), `mask` (evaluated on partial
//! tiles only), and `score_full` / `score_partial` (the score fed to the
//! softmax, in the kernel's exp units: log2 units when `exp2` is the base).
//!
//! Invariants (checked by `verify`): operands precede their users; an
//! instruction's level is at least the level of its operands and guard;
//! `TileScore` appears only at `Elem` level; loads index with ints and
//! have one index per buffer dimension; guards are bool.

use std::fmt;

use crate::sema::{Dim, Func, ShapeVar, Var};

/// How a spec is tiled and specialised. The algorithm (the spec) says what to
/// compute; the schedule says how.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Schedule {
    /// Query rows by key columns per tile.
    pub tiling: crate::mask::Tiling,
    /// Head dim to specialise on (`D` becomes a constant), or generic.
    pub dim: Option<usize>,
    /// Use base-2 exponentials (log2(e) folded into the query prescale).
    pub exp2: bool,
    /// How a tile's rows map to heads and queries (one head, or a GQA group).
    pub rows: super::nest::RowMap,
    /// Where K and V are read from.
    pub kv: super::nest::KvSource,
}

impl Default for Schedule {
    fn default() -> Schedule {
        Schedule {
            tiling: crate::mask::Tiling::default(),
            dim: Some(64),
            exp2: true,
            rows: Default::default(),
            kv: Default::default(),
        }
    }
}

/// A typed SSA value id, printed `vN`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub u32);

impl fmt::Display for ValueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

/// Value types: ints are 64-bit, floats are f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ty {
    I64,
    F32,
    Bool,
}

impl fmt::Display for Ty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ty::I64 => "i64",
            Ty::F32 => "f32",
            Ty::Bool => "bool",
        })
    }
}

/// Where in the loop nest a value is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Level {
    Call,
    Head,
    Row,
    Col,
    Elem,
}

impl Level {
    /// The level of a value computed from values at `self` and `o`.
    pub fn join(self, o: Level) -> Level {
        match (self, o) {
            (Level::Row, Level::Col) | (Level::Col, Level::Row) => Level::Elem,
            (a, b) => a.max(b),
        }
    }

    /// Whether a value at level `self` is available where `o` runs.
    pub fn available_in(self, o: Level) -> bool {
        self.join(o) == o
    }

    pub fn name(self) -> &'static str {
        match self {
            Level::Call => "call",
            Level::Head => "head",
            Level::Row => "row",
            Level::Col => "col",
            Level::Elem => "elem",
        }
    }
}

/// Which key-tile loop a value belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Section {
    /// Used by both loops.
    Shared,
    /// Only FULL tiles.
    Full,
    /// Only PARTIAL tiles.
    Partial,
}

impl Section {
    /// Whether a value of this section is computed in the loop over `tiles`
    /// (shared values are computed in both).
    pub fn runs_in(self, tiles: Section) -> bool {
        self == Section::Shared || self == tiles
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnOp {
    INeg,
    FNeg,
    Not,
    /// Bitwise not of an int (`~`).
    INot,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinOp {
    IAdd,
    ISub,
    IMul,
    /// Floor division (traps, as an error from the call, on zero).
    IDiv,
    /// Floor modulo (traps on zero).
    IRem,
    /// Arithmetic shift right: floor division by a power of two.
    IShr,
    /// Bitwise and: floor modulo by a power of two (mask).
    IAnd,
    /// Bitwise exclusive or (with `ishr x, 63`: the sign trick of
    /// division by a constant).
    IXor,
    /// Bitwise or.
    IOr,
    /// The spec's `<<`: shift left (bits shifted out are lost); a count
    /// outside `0..=63` traps, as an error from the call.
    IShl,
    /// The spec's `>>`: arithmetic shift right, trapping as `ishl` does
    /// (`ishr` is the unchecked shift the optimiser makes of divisions).
    ISar,
    /// The high 64 bits of the unsigned 128-bit product of the operands'
    /// bit patterns: the magic multiply of division by a constant.
    IMulHiU,
    IMin,
    IMax,
    FAdd,
    FSub,
    FMul,
    FDiv,
    /// `a - b * floor(a / b)`.
    FRem,
    FMin,
    FMax,
    And,
    Or,
    /// Equality of bools.
    BEq,
    BNe,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    pub fn name(self) -> &'static str {
        match self {
            CmpOp::Eq => "eq",
            CmpOp::Ne => "ne",
            CmpOp::Lt => "lt",
            CmpOp::Le => "le",
            CmpOp::Gt => "gt",
            CmpOp::Ge => "ge",
        }
    }

    /// The comparison with operands swapped: `a op b == b op.swap() a`.
    pub fn swap(self) -> CmpOp {
        match self {
            CmpOp::Lt => CmpOp::Gt,
            CmpOp::Le => CmpOp::Ge,
            CmpOp::Gt => CmpOp::Lt,
            CmpOp::Ge => CmpOp::Le,
            c => c,
        }
    }
}

impl BinOp {
    pub fn name(self) -> &'static str {
        match self {
            BinOp::IAdd => "iadd",
            BinOp::ISub => "isub",
            BinOp::IMul => "imul",
            BinOp::IDiv => "idiv",
            BinOp::IRem => "irem",
            BinOp::IShr => "ishr",
            BinOp::IAnd => "iand",
            BinOp::IXor => "ixor",
            BinOp::IOr => "ior",
            BinOp::IShl => "ishl",
            BinOp::ISar => "isar",
            BinOp::IMulHiU => "umulhi",
            BinOp::IMin => "imin",
            BinOp::IMax => "imax",
            BinOp::FAdd => "fadd",
            BinOp::FSub => "fsub",
            BinOp::FMul => "fmul",
            BinOp::FDiv => "fdiv",
            BinOp::FRem => "frem",
            BinOp::FMin => "fmin",
            BinOp::FMax => "fmax",
            BinOp::And => "band",
            BinOp::Or => "bor",
            BinOp::BEq => "beq",
            BinOp::BNe => "bne",
        }
    }

    /// Whether the op may trap (integer division by a value that may be
    /// zero, a shift by a count that may fall outside `0..=63`).
    pub fn may_trap(self) -> bool {
        matches!(self, BinOp::IDiv | BinOp::IRem | BinOp::IShl | BinOp::ISar)
    }

    /// Whether the op is a checked shift (`ishl`, `isar`).
    pub fn is_checked_shift(self) -> bool {
        matches!(self, BinOp::IShl | BinOp::ISar)
    }
}

/// One operation of the expression sub-IR.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    IConst(i64),
    FConst(f32),
    BConst(bool),
    /// `b`, `h` (head level), `q` (row level, absolute position), `kv` (col level).
    Var(Var),
    /// A shape of the call (call level).
    Shape(ShapeVar),
    /// The element of the S = Q Kᵀ tile, already multiplied by `q_prescale`.
    TileScore,
    Unary(UnOp, ValueId),
    Binary(BinOp, ValueId, ValueId),
    /// Comparison of two ints or two floats.
    Cmp(CmpOp, ValueId, ValueId),
    Select(ValueId, ValueId, ValueId),
    /// Float functions of one argument (and `abs`).
    Call(Func, ValueId),
    /// int to float.
    IToF(ValueId),
    /// float to int (truncating, saturating, NaN to 0).
    FToI(ValueId),
    /// bool to 0/1.
    BToI(ValueId),
    /// Buffer read. `checked`: not proven in range, so range-checked at run
    /// time (an error from the call). Performed only where `guard` is true.
    Load {
        buffer: u32,
        indices: Vec<ValueId>,
        checked: bool,
    },
    /// `ancestor(parent, i, j)`; always range- and cycle-checked.
    Ancestor {
        parent: u32,
        i: ValueId,
        j: ValueId,
    },
}

impl Op {
    pub fn operands(&self) -> Vec<ValueId> {
        match self {
            Op::IConst(_)
            | Op::FConst(_)
            | Op::BConst(_)
            | Op::Var(_)
            | Op::Shape(_)
            | Op::TileScore => vec![],
            Op::Unary(_, a) | Op::Call(_, a) | Op::IToF(a) | Op::FToI(a) | Op::BToI(a) => vec![*a],
            Op::Binary(_, a, b) | Op::Cmp(_, a, b) => vec![*a, *b],
            Op::Select(c, a, b) => vec![*c, *a, *b],
            Op::Load { indices, .. } => indices.clone(),
            Op::Ancestor { i, j, .. } => vec![*i, *j],
        }
    }

    /// Rebuilds the op with operands mapped through `f`.
    pub fn map_operands(&self, mut f: impl FnMut(ValueId) -> ValueId) -> Op {
        match self {
            Op::Unary(o, a) => Op::Unary(*o, f(*a)),
            Op::Call(o, a) => Op::Call(*o, f(*a)),
            Op::IToF(a) => Op::IToF(f(*a)),
            Op::FToI(a) => Op::FToI(f(*a)),
            Op::BToI(a) => Op::BToI(f(*a)),
            Op::Binary(o, a, b) => Op::Binary(*o, f(*a), f(*b)),
            Op::Cmp(o, a, b) => Op::Cmp(*o, f(*a), f(*b)),
            Op::Select(c, a, b) => Op::Select(f(*c), f(*a), f(*b)),
            Op::Load {
                buffer,
                indices,
                checked,
            } => Op::Load {
                buffer: *buffer,
                indices: indices.iter().map(|i| f(*i)).collect(),
                checked: *checked,
            },
            Op::Ancestor { parent, i, j } => Op::Ancestor {
                parent: *parent,
                i: f(*i),
                j: f(*j),
            },
            o => o.clone(),
        }
    }

    /// Whether executing the op where it is not wanted could fail, given the
    /// constant value of an operand where it has one.
    pub fn may_trap(&self, const_of: impl Fn(ValueId) -> Option<i64>) -> bool {
        match self {
            Op::Load { checked, .. } => *checked,
            Op::Ancestor { .. } => true,
            Op::Binary(op, _, b) if op.is_checked_shift() => {
                !const_of(*b).is_some_and(|c| (0..=63).contains(&c))
            }
            Op::Binary(op, _, b) if op.may_trap() => const_of(*b).is_none_or(|c| c == 0),
            _ => false,
        }
    }
}

/// One instruction: an op, its type, where it runs, and (for ops that may
/// trap) the condition under which it is performed.
#[derive(Clone, Debug, PartialEq)]
pub struct Inst {
    pub op: Op,
    pub ty: Ty,
    pub level: Level,
    pub section: Section,
    /// Performed only where this bool is true; elsewhere the value is a
    /// harmless zero. `None` = always. Kept on ops that may trap and on
    /// reads that are proven in range only where the guard holds.
    pub guard: Option<ValueId>,
}

/// A buffer as the kernel sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct BufferDecl {
    pub name: String,
    pub elem: Ty,
    pub dims: Vec<Dim>,
}

/// The whole kernel of one spec under one schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    pub name: String,
    pub schedule: Schedule,
    /// Baked param values, for the header only.
    pub params: Vec<(String, String)>,
    pub buffers: Vec<BufferDecl>,
    pub insts: Vec<Inst>,
    /// Parallel to `insts`: the source span of trapping instructions, for
    /// errors from the call. Not part of the text form.
    pub spans: Vec<Option<crate::syntax::Span>>,
    /// The softmax scale (call level, f32).
    pub scale: ValueId,
    /// What each Q tile is multiplied by when loaded (`scale`, times log2(e) with exp2).
    pub q_prescale: ValueId,
    /// The mask, applied on PARTIAL tiles; `None` = every key visible.
    pub mask: Option<ValueId>,
    /// The score fed to the softmax on FULL tiles, in exp units.
    pub score_full: ValueId,
    /// The same on PARTIAL tiles (its trapping ops guarded by the mask).
    pub score_partial: ValueId,
    /// Trapping operations (checked reads, `ancestor`, divisions) that the
    /// spec evaluates even where their value is unused, per loop: a read that
    /// would fail must fail even if folding made its result irrelevant.
    pub effects_full: Vec<ValueId>,
    pub effects_partial: Vec<ValueId>,
    /// The loop nest around the instructions, which every backend lowers.
    pub nest: super::nest::LoopNest,
}

impl Kernel {
    pub fn inst(&self, v: ValueId) -> &Inst {
        &self.insts[v.0 as usize]
    }

    pub fn roots(&self) -> Vec<ValueId> {
        let mut r = vec![
            self.scale,
            self.q_prescale,
            self.score_full,
            self.score_partial,
        ];
        r.extend(self.mask);
        r
    }

    /// Whether the score fed to the softmax is more than the raw tile score on
    /// FULL or PARTIAL tiles: a score mod, which may score a visible key
    /// `-inf` (probability 0). Without one, every key of a FULL tile has a
    /// nonzero probability unless its score underflows, so only PARTIAL tiles
    /// need the exact `P·V` for non-finite V.
    pub fn has_score_mod(&self) -> bool {
        [self.score_full, self.score_partial]
            .iter()
            .any(|&r| self.inst(r).op != Op::TileScore)
    }

    /// The constant int value of `v`, if it is one.
    pub fn const_int(&self, v: ValueId) -> Option<i64> {
        match self.inst(v).op {
            Op::IConst(i) => Some(i),
            _ => None,
        }
    }
}
