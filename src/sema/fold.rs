//! Constant folding at check time, for one purpose: a float constant that
//! the compiled backends cannot represent is an error, not a silent infinity.
//!
//! The reference interpreter computes in f64, the compiled backends in f32.
//! A literal such as `1e39` or a folded constant such as `1e30 * 1e30` is
//! finite in f64 and infinite in f32, so the backends would disagree with the
//! oracle on every call. Such constants are rejected where they are written;
//! an infinity written on purpose (`1.0 / 0.0`) is infinite everywhere and
//! stays legal. Overflow that depends on the data (`q·k × 1e38`) is left to
//! IEEE f32 arithmetic at run time.

use super::eval::{binary, call};
use super::ir::{BinaryOp, Expr, ExprId, Spec, Type, UnaryOp, Value};

/// The first float expression (in arena order: innermost first) whose value
/// is known at check time, finite in f64 and outside the f32 range, with its
/// value.
pub fn f32_overflow(spec: &Spec) -> Option<(ExprId, f64)> {
    let mut known: Vec<Option<Value>> = Vec::with_capacity(spec.exprs.len());
    for (i, e) in spec.exprs.iter().enumerate() {
        let get = |id: &ExprId| known.get(id.0 as usize).copied().flatten();
        let value = match e {
            Expr::Const(v) => Some(*v),
            Expr::Param(p) => Some(spec.param(*p).value),
            Expr::Unary(UnaryOp::Neg, a) => get(a).map(|v| match v {
                Value::Int(x) => Value::Int(x.wrapping_neg()),
                Value::Float(x) => Value::Float(-x),
                Value::Bool(b) => Value::Bool(b),
            }),
            Expr::Unary(UnaryOp::BitNot, a) => get(a).map(|v| match v {
                Value::Int(x) => Value::Int(!x),
                v => v,
            }),
            Expr::Unary(UnaryOp::Not, a) => get(a).map(|v| match v {
                Value::Bool(b) => Value::Bool(!b),
                v => v,
            }),
            Expr::Binary(op @ (BinaryOp::And | BinaryOp::Or), a, c) => match (get(a), get(c)) {
                (Some(x), Some(y)) => binary(*op, x, y),
                _ => None,
            },
            Expr::Binary(op, a, c) => match (get(a), get(c)) {
                (Some(x), Some(y)) if x.ty() == y.ty() => binary(*op, x, y),
                _ => None,
            },
            Expr::Select {
                cond,
                then,
                otherwise,
            } => match get(cond) {
                Some(Value::Bool(true)) => get(then),
                Some(Value::Bool(false)) => get(otherwise),
                _ => None,
            },
            Expr::Call(f, args) => args
                .iter()
                .map(get)
                .collect::<Option<Vec<Value>>>()
                .map(|args| call(*f, &args)),
            _ => None,
        };
        if let Some(Value::Float(x)) = value {
            if spec.ty(ExprId(i as u32)) == Type::Float
                && x.is_finite()
                && x.abs() > f64::from(f32::MAX)
            {
                return Some((ExprId(i as u32), x));
            }
        }
        known.push(value);
    }
    None
}

#[cfg(test)]
mod tests {
    /// The message of the f32-range error `text` checks with, if any.
    fn range_error(text: &str) -> Option<String> {
        let file = crate::syntax::parse(text).unwrap();
        match crate::sema::check(&file) {
            Ok(m) => {
                assert!(super::f32_overflow(&m.specs[0]).is_none());
                None
            }
            Err(d) => {
                assert_eq!(d[0].code, "attnc::sema::f32_range", "{}", d[0].message);
                Some(d[0].message.clone())
            }
        }
    }

    #[test]
    fn folded_constants_beyond_f32_are_errors() {
        let e = range_error("attention a { param s: float = 1e30\n score = score * (s * s) }");
        assert_eq!(
            e.as_deref(),
            Some("this constant is 1.000e60, outside the range of f32")
        );
        assert!(range_error("attention a { score = score * exp(100.0) }").is_some());
        assert!(range_error("attention a { scale = 1e20 * 1e20 / 1e20 }").is_some());
        // Infinity written on purpose, data-dependent values and f32-sized values pass.
        assert_eq!(
            range_error("attention a { score = score * float(9223372036854775807) }"),
            None
        );
        assert_eq!(
            range_error("attention a { score = if q > kv { -1.0 / 0.0 } else { score } }"),
            None
        );
        assert_eq!(range_error("attention a { score = score * 1e38 }"), None);
        assert_eq!(
            range_error("attention a { score = score * float(kv) * 3e38 }"),
            None
        );
        assert_eq!(range_error("attention a { scale = 1e-50 }"), None);
        // A constant that overflows f64 too is infinite on every backend,
        // as `1.0 / 0.0` is: legal.
        assert_eq!(
            range_error("attention a { score = score - exp(1000.0) }"),
            None
        );
        assert_eq!(
            range_error("attention a { score = score - pow(10.0, 400.0) }"),
            None
        );
    }

    #[test]
    fn overrides_that_push_a_constant_beyond_f32_are_refused() {
        let file = crate::syntax::parse("attention a { param s: float = 2.0\n scale = s * 1e38 }")
            .unwrap();
        let mut spec = crate::sema::check(&file).unwrap().specs.remove(0);
        assert!(spec.set_param("s", "3.0").is_ok());
        let e = spec.set_param("s", "10.0").unwrap_err();
        assert!(
            e.to_string()
                .contains("makes a constant of the spec 1.000e39"),
            "{e}"
        );
        // The refused value is not kept.
        assert_eq!(spec.params[0].value, crate::sema::Value::Float(3.0));
    }
}
