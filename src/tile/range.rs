//! Numeric ranges of int values, under the limit binding puts on shapes and
//! positions: every length, batch, head count and head dim is at most
//! [`POSITION_LIMIT`], and every query and key position is below it. Backends use it to pick narrower arithmetic where it is
//! exact, e.g. converting `float(q - kv)` from 32-bit lanes without checking
//! each lane fits.

use super::ir::*;
use crate::sema::{ShapeVar, Var, POSITION_LIMIT};

/// Inclusive range of an int value, as i128 so sums and products of i64
/// bounds cannot overflow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub lo: i128,
    pub hi: i128,
}

impl Range {
    const FULL: Range = Range {
        lo: i64::MIN as i128,
        hi: i64::MAX as i128,
    };

    fn new(lo: i128, hi: i128) -> Range {
        // Anything wider than i64 means the analysis lost track: say "anything".
        if lo < Range::FULL.lo || hi > Range::FULL.hi {
            Range::FULL
        } else {
            Range { lo, hi }
        }
    }

    fn point(x: i64) -> Range {
        Range::new(x as i128, x as i128)
    }

    /// Whether every value fits in an i32.
    pub fn fits_i32(&self) -> bool {
        self.lo >= i32::MIN as i128 && self.hi <= i32::MAX as i128
    }
}

/// Where [`int_range`] looks up the instruction of a value: a finished
/// [`Kernel`], or the [`Builder`](super::builder::Builder) of a rewrite.
pub trait Insts {
    fn op_of(&self, v: ValueId) -> &Op;
}

impl Insts for Kernel {
    fn op_of(&self, v: ValueId) -> &Op {
        &self.inst(v).op
    }
}

impl Insts for super::builder::Builder {
    fn op_of(&self, v: ValueId) -> &Op {
        &self.inst(v).op
    }
}

/// The range of int value `v` of `k` (the full i64 range when nothing better
/// is known: buffer reads, float conversions, divisions by non-constants).
pub fn int_range(k: &impl Insts, v: ValueId) -> Range {
    range(k, v, 0)
}

fn range(k: &impl Insts, v: ValueId, depth: usize) -> Range {
    // Deep expressions are rare; stop rather than recurse without bound.
    if depth > 64 {
        return Range::FULL;
    }
    let r = |x: ValueId| range(k, x, depth + 1);
    let below_limit = Range::new(0, POSITION_LIMIT as i128 - 1);
    match k.op_of(v) {
        Op::IConst(c) => Range::point(*c),
        Op::Var(Var::B | Var::H | Var::Q | Var::Kv) => below_limit,
        Op::Shape(
            ShapeVar::B | ShapeVar::H | ShapeVar::Hkv | ShapeVar::Q | ShapeVar::Kv | ShapeVar::D,
        ) => Range::new(0, POSITION_LIMIT as i128),
        Op::BToI(_) => Range::new(0, 1),
        Op::Unary(UnOp::INeg, a) => {
            let a = r(*a);
            Range::new(-a.hi, -a.lo)
        }
        Op::Select(_, a, b) => {
            let (a, b) = (r(*a), r(*b));
            Range::new(a.lo.min(b.lo), a.hi.max(b.hi))
        }
        Op::Binary(op, a, b) => {
            let (x, y) = (r(*a), r(*b));
            match op {
                BinOp::IAdd => Range::new(x.lo + y.lo, x.hi + y.hi),
                BinOp::ISub => Range::new(x.lo - y.hi, x.hi - y.lo),
                BinOp::IMul => {
                    let p = [x.lo * y.lo, x.lo * y.hi, x.hi * y.lo, x.hi * y.hi];
                    Range::new(*p.iter().min().unwrap(), *p.iter().max().unwrap())
                }
                BinOp::IMin => Range::new(x.lo.min(y.lo), x.hi.min(y.hi)),
                BinOp::IMax => Range::new(x.lo.max(y.lo), x.hi.max(y.hi)),
                // Arithmetic shift by a constant in 0..63: floor division by 2^s.
                BinOp::IShr if y.lo == y.hi && (0..63).contains(&y.lo) => {
                    Range::new(x.lo >> y.lo, x.hi >> y.lo)
                }
                // And with a non-negative constant: within [0, c].
                BinOp::IAnd if y.lo == y.hi && y.lo >= 0 => Range::new(0, y.lo),
                _ => Range::FULL,
            }
        }
        _ => Range::FULL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tile::builder::Builder;

    trait Vars {
        fn var(&mut self, v: Var) -> ValueId;
    }
    impl Vars for Builder {
        fn var(&mut self, v: Var) -> ValueId {
            self.add(Op::Var(v), Ty::I64, None, None)
        }
    }

    /// The range of the int value `f` builds, as the operand of the score's `itof`.
    fn range_of(f: impl FnOnce(&mut Builder) -> ValueId) -> Range {
        let mut b = Builder::default();
        let v = f(&mut b);
        let k = Kernel::scored_by_int(b, v, vec![]);
        let Op::IToF(v) = k.inst(k.score_full).op else {
            unreachable!("the score is the itof built above")
        };
        int_range(&k, v)
    }

    /// `q op kv`.
    fn q_kv(b: &mut Builder, op: BinOp) -> ValueId {
        let q = b.var(Var::Q);
        let kv = b.var(Var::Kv);
        b.binary(op, q, kv)
    }

    #[test]
    fn positions_and_their_differences_fit_i32() {
        let r = range_of(|b| q_kv(b, BinOp::ISub));
        assert_eq!(
            r,
            Range::new(-(POSITION_LIMIT as i128 - 1), POSITION_LIMIT as i128 - 1)
        );
        assert!(r.fits_i32());
    }

    #[test]
    fn sums_products_and_unknowns_do_not() {
        let sum = range_of(|b| q_kv(b, BinOp::IAdd));
        assert!(!sum.fits_i32());
        let scaled = range_of(|b| {
            let q = b.var(Var::Q);
            let c = b.iconst(-3);
            b.binary(BinOp::IMul, q, c)
        });
        assert_eq!(scaled.lo, -3 * (POSITION_LIMIT as i128 - 1));
        assert_eq!(scaled.hi, 0);
        let masked = range_of(|b| {
            let d = q_kv(b, BinOp::IAdd);
            let m = b.iconst(1023);
            b.binary(BinOp::IAnd, d, m)
        });
        assert_eq!(masked, Range::new(0, 1023));
        let halved = range_of(|b| {
            let d = q_kv(b, BinOp::IAdd);
            let s = b.iconst(1);
            b.binary(BinOp::IShr, d, s)
        });
        assert!(halved.fits_i32());
        let huge = range_of(|b| {
            let q = b.var(Var::Q);
            let c = b.iconst(i64::MAX);
            b.binary(BinOp::IMul, q, c)
        });
        assert_eq!(huge, Range::FULL);
    }
}
