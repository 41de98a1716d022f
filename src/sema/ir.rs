//! The checked spec: names resolved, types known, every expression in an arena.
//!
//! Stage: sema. Produced by [`super::check`], consumed by the block-map
//! analysis, the loop-IR builder and the reference interpreter.
//!
//! What the nodes mean:
//! - [`Expr::Var`] is one of the index variables `b`, `h`, `q`, `kv`; `q` is the
//!   absolute query position (row index plus the call's query offset).
//! - [`Expr::Shape`] is one of `B`, `H`, `HKV`, `Q`, `KV`, `D`; `Q` is the number
//!   of query rows of the call.
//! - [`Expr::Score`] is `q·k × scale`, legal only inside the score expression.
//! - [`Expr::Binary`] operands have the same type: int and float are unified by
//!   explicit [`Func::Float`] conversions inserted by the checker. Int `/` and
//!   `%` are floor division and floor modulo. `And` and `Or` short-circuit.
//! - [`Expr::Load`] has one int index per buffer dimension.
//! - `causal` has been expanded to `q >= kv`, and `let`s are shared subtrees.
//!
//! Illegal (the checker never produces them): `Score` outside `score`, a `Var`,
//! `Load` or `Score` inside `scale`, a non-bool mask, a bool score.

use std::fmt;

use crate::syntax::Span;

/// A typed index into [`Spec::exprs`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExprId(pub u32);

/// A typed index into [`Spec::params`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParamId(pub u32);

/// A typed index into [`Spec::buffers`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BufferId(pub u32);

impl fmt::Display for ExprId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "e{}", self.0)
    }
}

/// The scalar types of the language.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Type {
    Int,
    Float,
    Bool,
}

impl Type {
    pub fn is_numeric(self) -> bool {
        matches!(self, Type::Int | Type::Float)
    }
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Type::Int => "int",
            Type::Float => "float",
            Type::Bool => "bool",
        })
    }
}

/// A constant value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl Value {
    pub fn ty(self) -> Type {
        match self {
            Value::Int(_) => Type::Int,
            Value::Float(_) => Type::Float,
            Value::Bool(_) => Type::Bool,
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x:?}"),
            Value::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// An index variable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Var {
    B,
    H,
    Q,
    Kv,
}

impl Var {
    pub const ALL: [Var; 4] = [Var::B, Var::H, Var::Q, Var::Kv];

    pub fn name(self) -> &'static str {
        match self {
            Var::B => "b",
            Var::H => "h",
            Var::Q => "q",
            Var::Kv => "kv",
        }
    }
}

/// A shape of the call, known when buffers are bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ShapeVar {
    B,
    H,
    Hkv,
    Q,
    Kv,
    D,
}

impl ShapeVar {
    pub const ALL: [ShapeVar; 6] = [
        ShapeVar::B,
        ShapeVar::H,
        ShapeVar::Hkv,
        ShapeVar::Q,
        ShapeVar::Kv,
        ShapeVar::D,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ShapeVar::B => "B",
            ShapeVar::H => "H",
            ShapeVar::Hkv => "HKV",
            ShapeVar::Q => "Q",
            ShapeVar::Kv => "KV",
            ShapeVar::D => "D",
        }
    }

    pub fn from_name(name: &str) -> Option<ShapeVar> {
        ShapeVar::ALL.into_iter().find(|s| s.name() == name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    Neg,
    Not,
    /// `~x` on int: bitwise not.
    BitNot,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
    /// Integer bit operators: `&`, `|`, `^`.
    BitAnd,
    BitOr,
    BitXor,
    /// `x << n`, `x >> n` (arithmetic) on ints; a count outside `0..=63` is
    /// a run-time error.
    Shl,
    Shr,
}

impl BinaryOp {
    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Rem => "rem",
            BinaryOp::Eq => "eq",
            BinaryOp::Ne => "ne",
            BinaryOp::Lt => "lt",
            BinaryOp::Le => "le",
            BinaryOp::Gt => "gt",
            BinaryOp::Ge => "ge",
            BinaryOp::And => "and",
            BinaryOp::Or => "or",
            BinaryOp::BitAnd => "bitand",
            BinaryOp::BitOr => "bitor",
            BinaryOp::BitXor => "bitxor",
            BinaryOp::Shl => "shl",
            BinaryOp::Shr => "shr",
        }
    }

    /// Whether the operator shifts (and fails on a count outside `0..=63`).
    pub fn is_shift(self) -> bool {
        matches!(self, BinaryOp::Shl | BinaryOp::Shr)
    }

    pub fn is_comparison(self) -> bool {
        matches!(
            self,
            BinaryOp::Eq | BinaryOp::Ne | BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge
        )
    }
}

/// The built-in functions (except `ancestor`, which is [`Expr::Ancestor`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Func {
    Abs,
    Min,
    Max,
    Clamp,
    Exp,
    Exp2,
    Log,
    Log2,
    Sqrt,
    Rsqrt,
    Tanh,
    Sigmoid,
    Floor,
    Ceil,
    Erf,
    Sin,
    Cos,
    /// `pow(x, y)`, float.
    Pow,
    /// -1, 0 or 1, int for int and float for float.
    Sign,
    /// `tanh` computed fast: `tanh.approx.f32` on the GPU, a rational
    /// function on the CPU (`tile::math::tanh_approx`).
    TanhApprox,
    Round,
    /// int or bool to float.
    Float,
    /// float (truncated toward zero) or bool to int.
    Int,
}

impl Func {
    pub const ALL: [Func; 23] = [
        Func::Abs,
        Func::Min,
        Func::Max,
        Func::Clamp,
        Func::Exp,
        Func::Exp2,
        Func::Log,
        Func::Log2,
        Func::Sqrt,
        Func::Rsqrt,
        Func::Tanh,
        Func::Sigmoid,
        Func::Floor,
        Func::Ceil,
        Func::Round,
        Func::Float,
        Func::Int,
        Func::Erf,
        Func::Sin,
        Func::Cos,
        Func::Pow,
        Func::Sign,
        Func::TanhApprox,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Func::Abs => "abs",
            Func::Min => "min",
            Func::Max => "max",
            Func::Clamp => "clamp",
            Func::Exp => "exp",
            Func::Exp2 => "exp2",
            Func::Log => "log",
            Func::Log2 => "log2",
            Func::Sqrt => "sqrt",
            Func::Rsqrt => "rsqrt",
            Func::Tanh => "tanh",
            Func::Sigmoid => "sigmoid",
            Func::Floor => "floor",
            Func::Ceil => "ceil",
            Func::Round => "round",
            Func::Float => "float",
            Func::Int => "int",
            Func::Erf => "erf",
            Func::Sin => "sin",
            Func::Cos => "cos",
            Func::Pow => "pow",
            Func::Sign => "sign",
            Func::TanhApprox => "tanh_approx",
        }
    }

    pub fn from_name(name: &str) -> Option<Func> {
        Func::ALL.into_iter().find(|f| f.name() == name)
    }

    pub fn arity(self) -> usize {
        match self {
            Func::Min | Func::Max | Func::Pow => 2,
            Func::Clamp => 3,
            _ => 1,
        }
    }
}

/// One node of the checked expression graph.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Const(Value),
    Var(Var),
    Shape(ShapeVar),
    Score,
    Param(ParamId),
    Load {
        buffer: BufferId,
        indices: Vec<ExprId>,
    },
    Unary(UnaryOp, ExprId),
    Binary(BinaryOp, ExprId, ExprId),
    Select {
        cond: ExprId,
        then: ExprId,
        otherwise: ExprId,
    },
    Call(Func, Vec<ExprId>),
    /// True iff `j == i` or `j` is reached from `i` by following `parent` (-1 = root).
    Ancestor {
        parent: BufferId,
        i: ExprId,
        j: ExprId,
    },
}

impl Expr {
    /// The operands of this node, in order.
    pub fn operands(&self) -> Vec<ExprId> {
        match self {
            Expr::Const(_) | Expr::Var(_) | Expr::Shape(_) | Expr::Score | Expr::Param(_) => vec![],
            Expr::Load { indices, .. } => indices.clone(),
            Expr::Unary(_, a) => vec![*a],
            Expr::Binary(_, a, b) => vec![*a, *b],
            Expr::Select {
                cond,
                then,
                otherwise,
            } => vec![*cond, *then, *otherwise],
            Expr::Call(_, args) => args.clone(),
            Expr::Ancestor { i, j, .. } => vec![*i, *j],
        }
    }
}

/// What an expression depends on, as a bit set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Deps(pub u8);

impl Deps {
    pub const NONE: Deps = Deps(0);
    pub const B: Deps = Deps(1);
    pub const H: Deps = Deps(2);
    pub const Q: Deps = Deps(4);
    pub const KV: Deps = Deps(8);
    pub const SCORE: Deps = Deps(16);
    /// Reads a run-time buffer.
    pub const BUFFER: Deps = Deps(32);

    pub fn of_var(v: Var) -> Deps {
        match v {
            Var::B => Deps::B,
            Var::H => Deps::H,
            Var::Q => Deps::Q,
            Var::Kv => Deps::KV,
        }
    }

    pub fn union(self, o: Deps) -> Deps {
        Deps(self.0 | o.0)
    }

    pub fn contains(self, o: Deps) -> bool {
        self.0 & o.0 == o.0
    }

    pub fn intersects(self, o: Deps) -> bool {
        self.0 & o.0 != 0
    }
}

impl fmt::Display for Deps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (Deps::B, "b"),
            (Deps::H, "h"),
            (Deps::Q, "q"),
            (Deps::KV, "kv"),
            (Deps::SCORE, "score"),
            (Deps::BUFFER, "buf"),
        ];
        let list: Vec<&str> = names
            .iter()
            .filter(|(d, _)| self.contains(*d))
            .map(|(_, n)| *n)
            .collect();
        if list.is_empty() {
            f.write_str("const")
        } else {
            f.write_str(&list.join(","))
        }
    }
}

/// A `param` declaration with its current value (the default or an override).
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    pub name: String,
    pub ty: Type,
    pub value: Value,
    pub span: Span,
}

/// An integer operation on two dimensions' values: `None` where it
/// overflows (or, for a division, for a divisor below 1).
type CheckedOp = fn(i64, i64) -> Option<i64>;

/// One dimension of a buffer: an int expression of literals, int params
/// and shapes. `/` rounds up, so `Q / 64` counts the query tiles of 64 rows,
/// a partial one included.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    Lit(i64),
    Shape(ShapeVar),
    /// An int param: only in [`Buffer::declared`]; [`Buffer::dims`] holds
    /// its current value.
    Param(ParamId),
    Add(Box<Dim>, Box<Dim>),
    Sub(Box<Dim>, Box<Dim>),
    Mul(Box<Dim>, Box<Dim>),
    /// `ceil(A / B)`.
    CeilDiv(Box<Dim>, Box<Dim>),
}

impl Dim {
    /// The value under `shape`, or `None` where it is undefined: a division
    /// by zero or a negative divisor, an overflow of i64, or a negative
    /// length.
    pub fn eval(&self, shape: &dyn Fn(ShapeVar) -> i64) -> Option<i64> {
        let v = self.eval_signed(shape)?;
        (v >= 0).then_some(v)
    }

    fn eval_signed(&self, shape: &dyn Fn(ShapeVar) -> i64) -> Option<i64> {
        Some(match self {
            Dim::Lit(n) => *n,
            Dim::Shape(s) => shape(*s),
            Dim::Param(_) => return None,
            _ => {
                let (a, b, op) = self.operation().expect("the other dimensions are binary");
                op(a.eval_signed(shape)?, b.eval_signed(shape)?)?
            }
        })
    }

    /// The operands of `+ - * /` and the operation on their values (`None`
    /// where it overflows, or for a divisor below 1).
    fn operation(&self) -> Option<(&Dim, &Dim, CheckedOp)> {
        Some(match self {
            Dim::Add(a, b) => (a, b, i64::checked_add),
            Dim::Sub(a, b) => (a, b, i64::checked_sub),
            Dim::Mul(a, b) => (a, b, i64::checked_mul),
            Dim::CeilDiv(a, b) => (a, b, |x, y| {
                (y > 0).then(|| x.div_euclid(y) + i64::from(x.rem_euclid(y) != 0))
            }),
            _ => return None,
        })
    }

    /// A binary dimension of two literals as the literal it computes; other
    /// dimensions unchanged; `Err` with the dimension where the literal
    /// arithmetic overflows (or divides by less than 1).
    pub fn fold_literals(self) -> Result<Dim, Dim> {
        let value = match self.operation() {
            Some((Dim::Lit(x), Dim::Lit(y), op)) => op(*x, *y),
            _ => return Ok(self),
        };
        value.map(Dim::Lit).ok_or(self)
    }

    /// 1 for `+ -`, 2 for `* /`, 3 for atoms: the parentheses printing needs.
    fn level(&self) -> u8 {
        match self {
            Dim::Add(..) | Dim::Sub(..) => 1,
            Dim::Mul(..) | Dim::CeilDiv(..) => 2,
            Dim::Lit(_) | Dim::Shape(_) | Dim::Param(_) => 3,
        }
    }

    /// This dimension with every param replaced by its value in `params`,
    /// and literal arithmetic folded where it stays within i64.
    pub fn resolve(&self, params: &[Param]) -> Dim {
        let r = |d: &Dim| Box::new(d.resolve(params));
        let d = match self {
            Dim::Lit(_) | Dim::Shape(_) => return self.clone(),
            Dim::Param(id) => match params[id.0 as usize].value {
                Value::Int(v) => return Dim::Lit(v),
                // The checker admits int params only.
                _ => return self.clone(),
            },
            Dim::Add(a, b) => Dim::Add(r(a), r(b)),
            Dim::Sub(a, b) => Dim::Sub(r(a), r(b)),
            Dim::Mul(a, b) => Dim::Mul(r(a), r(b)),
            Dim::CeilDiv(a, b) => Dim::CeilDiv(r(a), r(b)),
        };
        d.fold_literals().unwrap_or_else(|d| d)
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (a, op, b) = match self {
            Dim::Lit(n) if *n < 0 => return write!(f, "({n})"),
            Dim::Lit(n) => return write!(f, "{n}"),
            Dim::Shape(s) => return f.write_str(s.name()),
            Dim::Param(id) => return write!(f, "param{}", id.0),
            Dim::Add(a, b) => (a, "+", b),
            Dim::Sub(a, b) => (a, "-", b),
            Dim::Mul(a, b) => (a, "*", b),
            Dim::CeilDiv(a, b) => (a, "/", b),
        };
        let level = self.level();
        let side = |f: &mut fmt::Formatter<'_>, x: &Dim, right: bool| {
            if x.level() < level || (right && x.level() == level) {
                write!(f, "({x})")
            } else {
                write!(f, "{x}")
            }
        };
        side(f, a, false)?;
        write!(f, " {op} ")?;
        side(f, b, true)
    }
}

/// A `buffer` declaration.
#[derive(Clone, Debug, PartialEq)]
pub struct Buffer {
    pub name: String,
    /// The dimensions under the current param values (no [`Dim::Param`]):
    /// what binding checks and the kernels index.
    pub dims: Vec<Dim>,
    /// The dimensions as declared, params included; [`Spec::set_param`]
    /// recomputes `dims` from them.
    pub declared: Vec<Dim>,
    pub elem: Type,
    pub span: Span,
}

/// A `let` binding, kept for printing and diagnostics.
#[derive(Clone, Debug, PartialEq)]
pub struct Let {
    pub name: String,
    pub value: ExprId,
    pub span: Span,
}

/// One checked attention block.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    pub name: String,
    pub span: Span,
    pub params: Vec<Param>,
    pub buffers: Vec<Buffer>,
    pub lets: Vec<Let>,
    pub exprs: Vec<Expr>,
    /// Parallel to `exprs`.
    pub types: Vec<Type>,
    /// Parallel to `exprs`.
    pub deps: Vec<Deps>,
    /// Parallel to `exprs`: where each node was written.
    pub spans: Vec<Span>,
    pub mask: Option<ExprId>,
    pub score: Option<ExprId>,
    pub scale: Option<ExprId>,
    /// Params whose values the checker used: those that bound a reduction
    /// (`sum(i in 0..top_k: ...)` is expanded into `top_k` terms). An
    /// override of one re-checks the source ([`crate::driver::load`] does).
    pub fixed_params: Vec<ParamId>,
}

impl Spec {
    pub fn expr(&self, id: ExprId) -> &Expr {
        &self.exprs[id.0 as usize]
    }

    pub fn ty(&self, id: ExprId) -> Type {
        self.types[id.0 as usize]
    }

    pub fn deps(&self, id: ExprId) -> Deps {
        self.deps[id.0 as usize]
    }

    pub fn span(&self, id: ExprId) -> Span {
        self.spans[id.0 as usize]
    }

    pub fn param(&self, id: ParamId) -> &Param {
        &self.params[id.0 as usize]
    }

    pub fn buffer(&self, id: BufferId) -> &Buffer {
        &self.buffers[id.0 as usize]
    }

    /// The buffers the mask reads (by a load or as an `ancestor` parent), in
    /// buffer order: what a block map depends on besides shapes and offsets.
    pub fn mask_buffers(&self) -> Vec<BufferId> {
        let mut seen = vec![false; self.exprs.len()];
        let mut used = vec![false; self.buffers.len()];
        let mut stack: Vec<ExprId> = self.mask.into_iter().collect();
        while let Some(id) = stack.pop() {
            if std::mem::replace(&mut seen[id.0 as usize], true) {
                continue;
            }
            let e = self.expr(id);
            match e {
                Expr::Load { buffer, .. } => used[buffer.0 as usize] = true,
                Expr::Ancestor { parent, .. } => used[parent.0 as usize] = true,
                _ => {}
            }
            stack.extend(e.operands());
        }
        (0..self.buffers.len())
            .filter(|&i| used[i])
            .map(|i| BufferId(i as u32))
            .collect()
    }

    pub fn buffer_id(&self, name: &str) -> Option<BufferId> {
        self.buffers
            .iter()
            .position(|b| b.name == name)
            .map(|i| BufferId(i as u32))
    }

    /// Per expression, whether its subtree holds a range-checked read, an
    /// `ancestor`, an integer division or remainder or a shift: the
    /// operations that can fail at run time. Operands precede their users in the arena; an operand
    /// that does not is taken to fail.
    pub fn may_trap(&self) -> Vec<bool> {
        let mut traps = vec![true; self.exprs.len()];
        for (i, e) in self.exprs.iter().enumerate() {
            let own = match e {
                Expr::Load { .. } | Expr::Ancestor { .. } => true,
                Expr::Binary(BinaryOp::Div | BinaryOp::Rem, a, _) => self.ty(*a) == Type::Int,
                // A constant count in range cannot fail.
                Expr::Binary(BinaryOp::Shl | BinaryOp::Shr, _, n) => {
                    !matches!(self.expr(*n), Expr::Const(Value::Int(0..=63)))
                        && !matches!(
                            self.expr(*n),
                            Expr::Param(p) if matches!(self.param(*p).value, Value::Int(0..=63))
                        )
                }
                _ => false,
            };
            traps[i] = own
                || e.operands()
                    .iter()
                    .any(|o| o.0 as usize >= i || traps[o.0 as usize]);
        }
        traps
    }

    pub fn param_id(&self, name: &str) -> Option<ParamId> {
        self.params
            .iter()
            .position(|p| p.name == name)
            .map(|i| ParamId(i as u32))
    }
}

/// A checked file: one spec per attention block, in source order.
#[derive(Clone, Debug, PartialEq)]
pub struct Module {
    pub specs: Vec<Spec>,
}
