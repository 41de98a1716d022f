//! The abstract syntax tree of a `.attn` file, exactly as written.
//!
//! Stage: syntax. Produced by [`super::parse`], consumed by `sema::check`.
//! Every node carries the byte span of its source text; nothing here is resolved
//! or typed yet (names are plain strings, `causal` is just a name).

use std::fmt;

/// A half-open byte range `[start, end)` into the source text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Span {
        Span { start, end }
    }

    /// The smallest span covering both.
    pub fn to(self, other: Span) -> Span {
        Span::new(self.start.min(other.start), self.end.max(other.end))
    }

    pub fn len(self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(self) -> bool {
        self.start == self.end
    }
}

impl From<Span> for miette::SourceSpan {
    fn from(s: Span) -> miette::SourceSpan {
        (s.start, s.len()).into()
    }
}

/// A name with the place it was written.
#[derive(Clone, Debug, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

/// A whole source file: one or more attention blocks, and the functions
/// they share.
#[derive(Clone, Debug, PartialEq)]
pub struct File {
    pub functions: Vec<Function>,
    pub attentions: Vec<Attention>,
}

/// `fn NAME(ARG: TYPE, ...) -> TYPE { let NAME = EXPR ... EXPR }`
#[derive(Clone, Debug, PartialEq)]
pub struct Function {
    pub name: Ident,
    pub args: Vec<(Ident, TypeName)>,
    pub ret: TypeName,
    pub lets: Vec<(Ident, Expr)>,
    pub body: Expr,
    pub span: Span,
}

/// `attention NAME { ITEM* }`
#[derive(Clone, Debug, PartialEq)]
pub struct Attention {
    pub name: Ident,
    pub items: Vec<Item>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    pub kind: ItemKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ItemKind {
    /// `fn NAME(...) -> TYPE { ... }`, seen by this block only
    Fn(Function),
    /// `param NAME: TYPE = LITERAL`
    Param {
        name: Ident,
        ty: TypeName,
        value: Literal,
    },
    /// `buffer NAME[DIM, ...]: TYPE`
    Buffer {
        name: Ident,
        /// Compile-time int expressions; the checker restricts them to
        /// literals, int params, shape names, `+ - * /` and parentheses.
        dims: Vec<Expr>,
        elem: TypeName,
    },
    /// `let NAME = EXPR`
    Let { name: Ident, value: Expr },
    /// `mask = EXPR`
    Mask(Expr),
    /// `score = EXPR`
    Score(Expr),
    /// `scale = EXPR`
    Scale(Expr),
}

impl ItemKind {
    /// The keyword that introduces the item.
    pub fn keyword(&self) -> &'static str {
        match self {
            ItemKind::Fn(_) => "fn",
            ItemKind::Param { .. } => "param",
            ItemKind::Buffer { .. } => "buffer",
            ItemKind::Let { .. } => "let",
            ItemKind::Mask(_) => "mask",
            ItemKind::Score(_) => "score",
            ItemKind::Scale(_) => "scale",
        }
    }
}

/// A scalar type as written: `int`, `float` or `bool`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TypeName {
    pub kind: ScalarKind,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScalarKind {
    Int,
    Float,
    Bool,
}

impl fmt::Display for ScalarKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ScalarKind::Int => "int",
            ScalarKind::Float => "float",
            ScalarKind::Bool => "bool",
        })
    }
}

/// A literal value of a param declaration.
#[derive(Clone, Debug, PartialEq)]
pub struct Literal {
    pub value: LitValue,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LitValue {
    Int(i64),
    Float(f64),
    Bool(bool),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ExprKind {
    Int(i64),
    Float(f64),
    Bool(bool),
    Name(Ident),
    Unary(UnaryOp, Box<Expr>),
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
    /// `NAME[i, j, ...]`
    Index(Ident, Vec<Expr>),
    /// `NAME(a, b, ...)`
    Call(Ident, Vec<Expr>),
    /// `if COND { A } else { B }`
    If(Box<Expr>, Box<Expr>, Box<Expr>),
    /// `OP(VAR in LO..HI: BODY)`
    Reduce(Box<Reduce>),
}

/// A bounded reduction `OP(VAR in LO..HI: BODY)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Reduce {
    pub op: ReduceOp,
    pub var: Ident,
    pub lo: Expr,
    pub hi: Expr,
    pub body: Expr,
}

/// What a reduction combines its values with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Any,
    All,
    Max,
    Min,
}

impl ReduceOp {
    pub const ALL: [ReduceOp; 5] = [
        ReduceOp::Sum,
        ReduceOp::Any,
        ReduceOp::All,
        ReduceOp::Max,
        ReduceOp::Min,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Any => "any",
            ReduceOp::All => "all",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    Neg,
    Not,
    /// `~`: integer bitwise not.
    BitNot,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Or,
    And,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    BitOr,
    BitXor,
    BitAnd,
    Shl,
    Shr,
}

impl BinaryOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinaryOp::Or => "||",
            BinaryOp::And => "&&",
            BinaryOp::Eq => "==",
            BinaryOp::Ne => "!=",
            BinaryOp::Lt => "<",
            BinaryOp::Le => "<=",
            BinaryOp::Gt => ">",
            BinaryOp::Ge => ">=",
            BinaryOp::Add => "+",
            BinaryOp::Sub => "-",
            BinaryOp::Mul => "*",
            BinaryOp::Div => "/",
            BinaryOp::Rem => "%",
            BinaryOp::BitOr => "|",
            BinaryOp::BitXor => "^",
            BinaryOp::BitAnd => "&",
            BinaryOp::Shl => "<<",
            BinaryOp::Shr => ">>",
        }
    }

    pub fn is_comparison(self) -> bool {
        matches!(
            self,
            BinaryOp::Eq | BinaryOp::Ne | BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge
        )
    }
}

impl UnaryOp {
    pub fn symbol(self) -> &'static str {
        match self {
            UnaryOp::Neg => "-",
            UnaryOp::Not => "!",
            UnaryOp::BitNot => "~",
        }
    }
}

// ---------------------------------------------------------------------------
// Text form: an indented S-expression-like dump used by `attnc emit --stage ast`
// and the AST snapshot tests. Spans print as `@start..end`.

impl fmt::Display for File {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for func in &self.functions {
            writeln!(f, "fn {func} @{}..{}", func.span.start, func.span.end)?;
        }
        for (i, a) in self.attentions.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{a}")?;
        }
        Ok(())
    }
}

/// `NAME(ARG: TYPE, ...) -> TYPE { let NAME = EXPR; ...; EXPR }` on one line.
impl fmt::Display for Function {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}(", self.name.name)?;
        for (i, (name, ty)) in self.args.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{}: {}", name.name, ty.kind)?;
        }
        write!(f, ") -> {} {{ ", self.ret.kind)?;
        for (name, value) in &self.lets {
            write!(f, "let {} = {}; ", name.name, SExpr(value))?;
        }
        write!(f, "{} }}", SExpr(&self.body))
    }
}

impl fmt::Display for Attention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "attention {} @{}..{}",
            self.name.name, self.span.start, self.span.end
        )?;
        for item in &self.items {
            write!(f, "    {} ", item.kind.keyword())?;
            match &item.kind {
                ItemKind::Fn(func) => write!(f, "{func}")?,
                ItemKind::Param { name, ty, value } => {
                    let v = match value.value {
                        LitValue::Int(i) => i.to_string(),
                        LitValue::Float(x) => format!("{x:?}"),
                        LitValue::Bool(b) => b.to_string(),
                    };
                    write!(f, "{}: {} = {}", name.name, ty.kind, v)?;
                }
                ItemKind::Buffer { name, dims, elem } => {
                    write!(f, "{}[", name.name)?;
                    for (i, d) in dims.iter().enumerate() {
                        if i > 0 {
                            write!(f, ", ")?;
                        }
                        write!(f, "{}", Infix(d))?;
                    }
                    write!(f, "]: {}", elem.kind)?;
                }
                ItemKind::Let { name, value } => write!(f, "{} = {}", name.name, SExpr(value))?,
                ItemKind::Mask(e) | ItemKind::Score(e) | ItemKind::Scale(e) => {
                    write!(f, "{}", SExpr(e))?
                }
            }
            writeln!(f, " @{}..{}", item.span.start, item.span.end)?;
        }
        Ok(())
    }
}

/// Fully parenthesised rendering of an expression, showing how it parsed.
pub struct SExpr<'a>(pub &'a Expr);

/// Arithmetic in the infix form it was written in (buffer dimensions:
/// `KV / 64 + 1`), with the parentheses its precedence needs; anything
/// else as an [`SExpr`].
pub struct Infix<'a>(pub &'a Expr);

impl Infix<'_> {
    /// 1 for `+ -`, 2 for `* / %`, 3 for what needs no parentheses.
    fn level(e: &Expr) -> u8 {
        match &e.kind {
            ExprKind::Binary(BinaryOp::Add | BinaryOp::Sub, ..) => 1,
            ExprKind::Binary(BinaryOp::Mul | BinaryOp::Div | BinaryOp::Rem, ..) => 2,
            _ => 3,
        }
    }
}

impl fmt::Display for Infix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = self.0;
        let level = Infix::level(e);
        match &e.kind {
            ExprKind::Binary(op, a, b) if level < 3 => {
                let side = |f: &mut fmt::Formatter<'_>, x: &Expr, right: bool| {
                    let lx = Infix::level(x);
                    if lx < level || (right && lx == level) {
                        write!(f, "({})", Infix(x))
                    } else {
                        write!(f, "{}", Infix(x))
                    }
                };
                side(f, a, false)?;
                write!(f, " {} ", op.symbol())?;
                side(f, b, true)
            }
            ExprKind::Unary(UnaryOp::Neg, x) if Infix::level(x) == 3 => write!(f, "-{}", Infix(x)),
            _ => write!(f, "{}", SExpr(e)),
        }
    }
}

impl fmt::Display for SExpr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0.kind {
            ExprKind::Int(i) => write!(f, "{i}"),
            ExprKind::Float(x) => write!(f, "{x:?}"),
            ExprKind::Bool(b) => write!(f, "{b}"),
            ExprKind::Name(n) => write!(f, "{}", n.name),
            ExprKind::Unary(op, e) => write!(f, "({} {})", op.symbol(), SExpr(e)),
            ExprKind::Binary(op, a, b) => write!(f, "({} {} {})", op.symbol(), SExpr(a), SExpr(b)),
            ExprKind::Index(n, args) | ExprKind::Call(n, args) => {
                let (open, close) = if matches!(self.0.kind, ExprKind::Index(..)) {
                    ("[", "]")
                } else {
                    ("(", ")")
                };
                write!(f, "{}{open}", n.name)?;
                for (i, a) in args.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{}", SExpr(a))?;
                }
                write!(f, "{close}")
            }
            ExprKind::If(c, a, b) => write!(f, "(if {} {} {})", SExpr(c), SExpr(a), SExpr(b)),
            ExprKind::Reduce(r) => write!(
                f,
                "({} {} {} {} {})",
                r.op.name(),
                r.var.name,
                SExpr(&r.lo),
                SExpr(&r.hi),
                SExpr(&r.body)
            ),
        }
    }
}
