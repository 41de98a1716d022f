//! Evaluation of checked expressions on concrete values, in f64.
//!
//! Shared by the reference interpreter and the block-map analysis (which
//! evaluates masks element by element on the tiles it cannot decide
//! symbolically). Reads are always range-checked; an out-of-range read is an
//! [`EvalError`] naming the buffer, the index and the expression, never a
//! panic or a clamp. `&&`, `||` and `if` evaluate only what they need.

use super::ir::*;
use crate::buffer::BufferData;
use crate::syntax::Span;

/// The concrete shapes of one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Shapes {
    pub b: usize,
    pub h: usize,
    pub hkv: usize,
    pub q: usize,
    pub kv: usize,
    pub d: usize,
}

impl Shapes {
    pub fn get(&self, s: ShapeVar) -> usize {
        match s {
            ShapeVar::B => self.b,
            ShapeVar::H => self.h,
            ShapeVar::Hkv => self.hkv,
            ShapeVar::Q => self.q,
            ShapeVar::Kv => self.kv,
            ShapeVar::D => self.d,
        }
    }

    /// The shape of buffer `b` under these shapes, or the first dimension
    /// that is undefined for them (see [`Dim::eval`]).
    pub fn buffer_shape<'a>(&self, b: &'a Buffer) -> Result<Vec<usize>, &'a Dim> {
        b.dims.iter().map(|d| self.dim(d).ok_or(d)).collect()
    }

    /// The length of a buffer dimension under these shapes, or `None` where
    /// it is undefined (see [`Dim::eval`]).
    pub fn dim(&self, d: &Dim) -> Option<usize> {
        let shape = |s| i64::try_from(self.get(s)).unwrap_or(i64::MAX);
        d.eval(&shape).and_then(|n| usize::try_from(n).ok())
    }
}

/// The point at which an expression is evaluated.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Point {
    pub b: i64,
    pub h: i64,
    /// Absolute query position (row + query offset).
    pub q: i64,
    pub kv: i64,
    /// `q·k × scale`; only read by `score`.
    pub score: f64,
}

/// The help of [`EvalError::OutOfRange`]: which index of the read left its
/// axis, and the fixes.
fn out_of_range_help(buffer: &str, index: &[i64], shape: &[usize]) -> String {
    let axis = index
        .iter()
        .zip(shape)
        .position(|(&i, &n)| i < 0 || i as u128 >= n as u128);
    let guard = match (axis, shape.len()) {
        (Some(a), 1) => format!(
            "index {} is outside 0..{}: guard the read so it happens only in range, e.g. \
             `if i >= 0 && i < N {{ {buffer}[i] }} else {{ ... }}` with N its declared size \
             (here {})",
            index[a], shape[a], shape[a]
        ),
        (Some(a), _) => format!(
            "index {} (axis {a}) is outside 0..{}: guard the read so that index stays in range, \
             e.g. `if i >= 0 && i < N {{ ... }} else {{ ... }}` with N the declared size of \
             axis {a} (here {})",
            index[a], shape[a], shape[a]
        ),
        (None, _) => "guard the read so it happens only in range".to_string(),
    };
    format!(
        "{guard}, or bind a larger buffer (the positions `q` and `kv` include the call's query \
         and key offsets)"
    )
}

/// A failure while evaluating an expression of the spec on concrete data.
#[derive(Clone, Debug, PartialEq, thiserror::Error, miette::Diagnostic)]
pub enum EvalError {
    #[error("read out of range: `{buffer}[{}]` with shape [{}] (at b={}, h={}, q={}, kv={})", join(index), join(shape), at.b, at.h, at.q, at.kv)]
    #[diagnostic(
        code(attnc::run::out_of_range),
        help("{}", out_of_range_help(.buffer, .index, .shape))
    )]
    OutOfRange {
        buffer: String,
        index: Vec<i64>,
        shape: Vec<usize>,
        at: Point,
        #[label("this read")]
        span: miette::SourceSpan,
    },
    #[error("integer division by zero (at b={}, h={}, q={}, kv={})", at.b, at.h, at.q, at.kv)]
    #[diagnostic(
        code(attnc::run::division_by_zero),
        help("guard the division, e.g. `if d != 0 {{ x / d }} else {{ 0 }}`")
    )]
    DivisionByZero {
        at: Point,
        #[label("divides by zero here")]
        span: miette::SourceSpan,
    },
    #[error("shift by {count}, outside 0..=63 (at b={}, h={}, q={}, kv={})", at.b, at.h, at.q, at.kv)]
    #[diagnostic(
        code(attnc::run::shift_out_of_range),
        help("the count of `<<` and `>>` on 64-bit ints must be 0 to 63: guard or clamp it, e.g. `x << clamp(n, 0, 63)`")
    )]
    ShiftOutOfRange {
        count: i64,
        at: Point,
        #[label("shifts by {count} here")]
        span: miette::SourceSpan,
    },
    #[error("`ancestor` found a cycle in buffer `{buffer}` starting from position {start}")]
    #[diagnostic(
        code(attnc::run::ancestor_cycle),
        help("`{buffer}` must describe a forest: following parents must reach -1")
    )]
    AncestorCycle {
        buffer: String,
        start: i64,
        #[label("while evaluating this")]
        span: miette::SourceSpan,
    },
}

fn join<T: ToString>(v: &[T]) -> String {
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Evaluates expressions of one spec on concrete shapes and buffers.
///
/// Shared subexpressions (`let`s) are memoised per point, so evaluation is
/// linear in the size of the expression graph.
pub struct Evaluator<'a> {
    spec: &'a Spec,
    shapes: Shapes,
    /// Bound buffer data, indexed by [`BufferId`].
    buffers: &'a [BufferData],
    memo: Vec<(u64, Value)>,
    generation: u64,
    point: Point,
}

impl<'a> Evaluator<'a> {
    pub fn new(spec: &'a Spec, shapes: Shapes, buffers: &'a [BufferData]) -> Evaluator<'a> {
        assert_eq!(
            buffers.len(),
            spec.buffers.len(),
            "one bound buffer per declaration"
        );
        Evaluator {
            spec,
            shapes,
            buffers,
            memo: vec![(0, Value::Bool(false)); spec.exprs.len()],
            generation: 0,
            point: Point::default(),
        }
    }

    /// Evaluates `id` at `point`.
    pub fn eval(&mut self, id: ExprId, point: Point) -> Result<Value, EvalError> {
        self.generation += 1;
        self.point = point;
        self.go(id)
    }

    pub fn eval_bool(&mut self, id: ExprId, point: Point) -> Result<bool, EvalError> {
        match self.eval(id, point)? {
            Value::Bool(b) => Ok(b),
            v => unreachable!("checked bool expression gave {v:?}"),
        }
    }

    pub fn eval_float(&mut self, id: ExprId, point: Point) -> Result<f64, EvalError> {
        match self.eval(id, point)? {
            Value::Float(x) => Ok(x),
            Value::Int(i) => Ok(i as f64),
            v => unreachable!("checked float expression gave {v:?}"),
        }
    }

    fn span(&self, id: ExprId) -> miette::SourceSpan {
        let s: Span = self.spec.span(id);
        s.into()
    }

    fn go(&mut self, id: ExprId) -> Result<Value, EvalError> {
        let slot = self.memo[id.0 as usize];
        if slot.0 == self.generation {
            return Ok(slot.1);
        }
        let v = self.compute(id)?;
        self.memo[id.0 as usize] = (self.generation, v);
        Ok(v)
    }

    fn int(&mut self, id: ExprId) -> Result<i64, EvalError> {
        match self.go(id)? {
            Value::Int(i) => Ok(i),
            v => unreachable!("checked int expression gave {v:?}"),
        }
    }

    fn boolean(&mut self, id: ExprId) -> Result<bool, EvalError> {
        match self.go(id)? {
            Value::Bool(b) => Ok(b),
            v => unreachable!("checked bool expression gave {v:?}"),
        }
    }

    fn read(&self, buffer: BufferId, index: &[i64], id: ExprId) -> Result<Value, EvalError> {
        let data = &self.buffers[buffer.0 as usize];
        data.get(index).ok_or_else(|| EvalError::OutOfRange {
            buffer: self.spec.buffer(buffer).name.clone(),
            index: index.to_vec(),
            shape: data.shape().to_vec(),
            at: self.point,
            span: self.span(id),
        })
    }

    fn compute(&mut self, id: ExprId) -> Result<Value, EvalError> {
        let spec = self.spec;
        Ok(match spec.expr(id) {
            Expr::Const(v) => *v,
            Expr::Var(v) => Value::Int(match v {
                Var::B => self.point.b,
                Var::H => self.point.h,
                Var::Q => self.point.q,
                Var::Kv => self.point.kv,
            }),
            Expr::Shape(s) => Value::Int(self.shapes.get(*s) as i64),
            Expr::Score => Value::Float(self.point.score),
            Expr::Param(p) => spec.param(*p).value,
            Expr::Load { buffer, indices } => {
                let mut idx = Vec::with_capacity(indices.len());
                for i in indices {
                    idx.push(self.int(*i)?);
                }
                self.read(*buffer, &idx, id)?
            }
            Expr::Unary(UnaryOp::Neg, a) => match self.go(*a)? {
                Value::Int(i) => Value::Int(i.wrapping_neg()),
                Value::Float(x) => Value::Float(-x),
                v => unreachable!("neg of {v:?}"),
            },
            Expr::Unary(UnaryOp::Not, a) => Value::Bool(!self.boolean(*a)?),
            Expr::Unary(UnaryOp::BitNot, a) => match self.go(*a)? {
                Value::Int(i) => Value::Int(!i),
                v => unreachable!("bitnot of {v:?}"),
            },
            Expr::Binary(BinaryOp::And, a, b) => {
                Value::Bool(self.boolean(*a)? && self.boolean(*b)?)
            }
            Expr::Binary(BinaryOp::Or, a, b) => Value::Bool(self.boolean(*a)? || self.boolean(*b)?),
            Expr::Binary(op, a, b) => {
                let (x, y) = (self.go(*a)?, self.go(*b)?);
                binary(*op, x, y).ok_or_else(|| match (op.is_shift(), y) {
                    (true, Value::Int(count)) => EvalError::ShiftOutOfRange {
                        count,
                        at: self.point,
                        span: self.span(id),
                    },
                    _ => EvalError::DivisionByZero {
                        at: self.point,
                        span: self.span(id),
                    },
                })?
            }
            Expr::Select {
                cond,
                then,
                otherwise,
            } => {
                if self.boolean(*cond)? {
                    self.go(*then)?
                } else {
                    self.go(*otherwise)?
                }
            }
            Expr::Call(f, args) => {
                let mut vals = [Value::Int(0); 3];
                for (slot, a) in vals.iter_mut().zip(args) {
                    *slot = self.go(*a)?;
                }
                call(*f, &vals[..args.len()])
            }
            Expr::Ancestor { parent, i, j } => {
                let (i, j) = (self.int(*i)?, self.int(*j)?);
                if i == j {
                    return Ok(Value::Bool(true));
                }
                let len = self.buffers[parent.0 as usize].len();
                let mut x = i;
                for _ in 0..=len {
                    x = match self.read(*parent, &[x], id)? {
                        Value::Int(p) => p,
                        v => unreachable!("int buffer gave {v:?}"),
                    };
                    if x < 0 {
                        return Ok(Value::Bool(false));
                    }
                    if x == j {
                        return Ok(Value::Bool(true));
                    }
                }
                return Err(EvalError::AncestorCycle {
                    buffer: spec.buffer(*parent).name.clone(),
                    start: i,
                    span: self.span(id),
                });
            }
        })
    }

    /// Evaluates an expression with a float or int result that depends on no
    /// index, score or buffer (the `scale`). It can still fail on the shapes
    /// of a call: `float(1 / (D - D))` divides by zero.
    pub fn eval_constant(&mut self, id: ExprId) -> Result<f64, EvalError> {
        debug_assert!(!self.spec.deps(id).intersects(Deps(0b111111)));
        self.eval_float(id, Point::default())
    }
}

/// Floor division; `None` on division by zero.
pub fn floor_div(a: i64, b: i64) -> Option<i64> {
    if b == 0 {
        return None;
    }
    let q = a.wrapping_div(b);
    Some(if a.wrapping_rem(b) != 0 && ((a < 0) != (b < 0)) {
        q - 1
    } else {
        q
    })
}

/// Floor modulo: the remainder takes the divisor's sign; `None` on zero.
pub fn floor_mod(a: i64, b: i64) -> Option<i64> {
    if b == 0 {
        return None;
    }
    let r = a.wrapping_rem(b);
    Some(if r != 0 && ((r < 0) != (b < 0)) {
        r + b
    } else {
        r
    })
}

/// The shift count of `<<` and `>>` as a `u32`, or `None` outside `0..=63`.
pub fn shift_count(n: i64) -> Option<u32> {
    (0..=63).contains(&n).then_some(n as u32)
}

/// Applies a (non short-circuit) binary operator; `None` on int division by
/// zero and on a shift count outside `0..=63`.
pub fn binary(op: BinaryOp, x: Value, y: Value) -> Option<Value> {
    use BinaryOp::*;
    Some(match (x, y) {
        (Value::Int(a), Value::Int(b)) => match op {
            Add => Value::Int(a.wrapping_add(b)),
            Sub => Value::Int(a.wrapping_sub(b)),
            Mul => Value::Int(a.wrapping_mul(b)),
            Div => Value::Int(floor_div(a, b)?),
            Rem => Value::Int(floor_mod(a, b)?),
            Eq => Value::Bool(a == b),
            Ne => Value::Bool(a != b),
            Lt => Value::Bool(a < b),
            Le => Value::Bool(a <= b),
            Gt => Value::Bool(a > b),
            Ge => Value::Bool(a >= b),
            BitAnd => Value::Int(a & b),
            BitOr => Value::Int(a | b),
            BitXor => Value::Int(a ^ b),
            Shl => Value::Int(a << shift_count(b)?),
            Shr => Value::Int(a >> shift_count(b)?),
            And | Or => unreachable!("logical op on ints"),
        },
        (Value::Float(a), Value::Float(b)) => match op {
            Add => Value::Float(a + b),
            Sub => Value::Float(a - b),
            Mul => Value::Float(a * b),
            Div => Value::Float(a / b),
            Rem => Value::Float(a - b * (a / b).floor()),
            Eq => Value::Bool(a == b),
            Ne => Value::Bool(a != b),
            Lt => Value::Bool(a < b),
            Le => Value::Bool(a <= b),
            Gt => Value::Bool(a > b),
            Ge => Value::Bool(a >= b),
            And | Or | BitAnd | BitOr | BitXor | Shl | Shr => {
                unreachable!("logical or bit op on floats")
            }
        },
        (Value::Bool(a), Value::Bool(b)) => match op {
            Eq => Value::Bool(a == b),
            Ne => Value::Bool(a != b),
            And => Value::Bool(a && b),
            Or => Value::Bool(a || b),
            _ => unreachable!("arithmetic on bools"),
        },
        (x, y) => unreachable!("checked binary op on {x:?} and {y:?}"),
    })
}

/// Applies a built-in function to checked (already unified) arguments.
/// `sign` of a float: 1 or -1 by its sign, `±0` and NaN unchanged.
pub fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        x
    }
}

pub fn call(f: Func, args: &[Value]) -> Value {
    let fl = |v: Value| match v {
        Value::Float(x) => x,
        v => unreachable!("float function on {v:?}"),
    };
    match f {
        Func::Float => Value::Float(match args[0] {
            Value::Int(i) => i as f64,
            Value::Bool(b) => f64::from(u8::from(b)),
            Value::Float(x) => x,
        }),
        Func::Int => Value::Int(match args[0] {
            Value::Float(x) => x as i64,
            Value::Bool(b) => i64::from(b),
            Value::Int(i) => i,
        }),
        Func::Abs => match args[0] {
            Value::Int(i) => Value::Int(i.wrapping_abs()),
            v => Value::Float(fl(v).abs()),
        },
        Func::Sign => match args[0] {
            Value::Int(i) => Value::Int(i.signum()),
            v => Value::Float(sign(fl(v))),
        },
        Func::Pow => Value::Float(fl(args[0]).powf(fl(args[1]))),
        Func::Min | Func::Max | Func::Clamp => {
            let pick_min = |a: Value, b: Value| match (a, b) {
                (Value::Int(x), Value::Int(y)) => Value::Int(x.min(y)),
                (a, b) => Value::Float(fl(a).min(fl(b))),
            };
            let pick_max = |a: Value, b: Value| match (a, b) {
                (Value::Int(x), Value::Int(y)) => Value::Int(x.max(y)),
                (a, b) => Value::Float(fl(a).max(fl(b))),
            };
            match f {
                Func::Min => pick_min(args[0], args[1]),
                Func::Max => pick_max(args[0], args[1]),
                _ => pick_min(pick_max(args[0], args[1]), args[2]),
            }
        }
        _ => {
            let x = fl(args[0]);
            Value::Float(match f {
                Func::Exp => x.exp(),
                Func::Exp2 => x.exp2(),
                Func::Log => x.ln(),
                Func::Log2 => x.log2(),
                Func::Sqrt => x.sqrt(),
                Func::Rsqrt => 1.0 / x.sqrt(),
                // The reference computes `tanh_approx` exactly: the backends'
                // approximations are measured against it.
                Func::Tanh | Func::TanhApprox => x.tanh(),
                Func::Sigmoid => 1.0 / (1.0 + (-x).exp()),
                Func::Floor => x.floor(),
                Func::Ceil => x.ceil(),
                Func::Round => x.round_ties_even(),
                Func::Erf => libm::erf(x),
                Func::Sin => x.sin(),
                Func::Cos => x.cos(),
                _ => unreachable!(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_division_follows_divisor_sign() {
        assert_eq!(floor_div(7, 2), Some(3));
        assert_eq!(floor_div(-7, 2), Some(-4));
        assert_eq!(floor_div(7, -2), Some(-4));
        assert_eq!(floor_div(-7, -2), Some(3));
        assert_eq!(floor_mod(-7, 2), Some(1));
        assert_eq!(floor_mod(7, -2), Some(-1));
        assert_eq!(floor_mod(-8, 2), Some(0));
        assert_eq!(floor_div(1, 0), None);
        assert_eq!(floor_div(i64::MIN, -1), Some(i64::MIN));
    }

    #[test]
    fn functions() {
        assert_eq!(call(Func::Round, &[Value::Float(2.5)]), Value::Float(2.0));
        assert_eq!(call(Func::Int, &[Value::Float(-2.7)]), Value::Int(-2));
        assert_eq!(
            call(Func::Clamp, &[Value::Int(9), Value::Int(0), Value::Int(5)]),
            Value::Int(5)
        );
        assert_eq!(call(Func::Float, &[Value::Bool(true)]), Value::Float(1.0));
    }
}
