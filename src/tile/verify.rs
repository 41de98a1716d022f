//! The loop-IR verifier: checks the invariants listed in [`super::ir`].
//!
//! Run after lowering and after every optimisation, in every build (it is
//! linear). Backends take a [`Verified`] kernel, which only
//! [`super::optimize`] (so [`super::lower`]) produces: it verified, and its
//! only unchecked reads are the ones `prove_bounds` proved in range. Backends
//! translate it without further checks: they either succeed or return an
//! error, never panic.

use super::ir::*;
use crate::sema::Func;

/// A broken invariant, with the offending value.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("tile IR verifier: {value}: {message}")]
pub struct VerifyError {
    pub value: ValueId,
    pub message: String,
}

/// A kernel that verified after every optimisation pass and whose unchecked
/// reads were all proven in range: what the backends compile. Only
/// [`super::optimize`] makes one (the field is private), so generated code
/// that reads without a check never comes from a hand-built kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct Verified(Kernel);

impl Verified {
    /// Wraps a kernel `optimize` verified (and proved the unchecked reads of).
    pub(super) fn by_optimize(k: Kernel) -> Verified {
        Verified(k)
    }

    /// The kernel, to inspect or to transform (which makes it unverified).
    pub fn into_kernel(self) -> Kernel {
        self.0
    }
}

impl std::ops::Deref for Verified {
    type Target = Kernel;
    fn deref(&self) -> &Kernel {
        &self.0
    }
}

impl std::fmt::Display for Verified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

pub fn verify(k: &Kernel) -> Result<(), VerifyError> {
    let n = k.insts.len();
    if k.spans.len() != n {
        return Err(VerifyError {
            value: ValueId(0),
            message: format!("{} spans for {n} instructions", k.spans.len()),
        });
    }
    for (i, inst) in k.insts.iter().enumerate() {
        let v = ValueId(i as u32);
        let err = |message: String| Err(VerifyError { value: v, message });
        for o in inst.op.operands().iter().chain(inst.guard.iter()) {
            if o.0 as usize >= i {
                return err(format!("uses {o}, which is not defined before it"));
            }
            if !k.inst(*o).level.available_in(inst.level) {
                return err(format!(
                    "at level {} uses {o} from level {}",
                    inst.level.name(),
                    k.inst(*o).level.name()
                ));
            }
        }
        if let Some(g) = inst.guard {
            if k.inst(g).ty != Ty::Bool {
                return err(format!("guard {g} is not bool"));
            }
        }
        let ty = |o: &ValueId| k.inst(*o).ty;
        let expect = |cond: bool, what: &str| if cond { Ok(()) } else { err(what.to_string()) };
        match &inst.op {
            Op::IConst(_) => expect(inst.ty == Ty::I64, "iconst must be i64")?,
            Op::FConst(_) => expect(inst.ty == Ty::F32, "fconst must be f32")?,
            Op::BConst(_) => expect(inst.ty == Ty::Bool, "bconst must be bool")?,
            Op::Var(_) | Op::Shape(_) => expect(inst.ty == Ty::I64, "indices and shapes are i64")?,
            Op::TileScore => expect(
                inst.ty == Ty::F32 && inst.level == Level::Elem,
                "tile_score is an f32 at elem level",
            )?,
            Op::Unary(UnOp::INeg, a) => expect(
                inst.ty == Ty::I64 && ty(a) == Ty::I64,
                "ineg takes and gives i64",
            )?,
            Op::Unary(UnOp::FNeg, a) => expect(
                inst.ty == Ty::F32 && ty(a) == Ty::F32,
                "fneg takes and gives f32",
            )?,
            Op::Unary(UnOp::Not, a) => expect(
                inst.ty == Ty::Bool && ty(a) == Ty::Bool,
                "bnot takes and gives bool",
            )?,
            Op::Unary(UnOp::INot, a) => expect(
                inst.ty == Ty::I64 && ty(a) == Ty::I64,
                "inot takes and gives i64",
            )?,
            Op::Binary(op, a, b) => {
                let want = match op {
                    BinOp::And | BinOp::Or | BinOp::BEq | BinOp::BNe => (Ty::Bool, Ty::Bool),
                    BinOp::FAdd
                    | BinOp::FSub
                    | BinOp::FMul
                    | BinOp::FDiv
                    | BinOp::FRem
                    | BinOp::FMin
                    | BinOp::FMax => (Ty::F32, Ty::F32),
                    _ => (Ty::I64, Ty::I64),
                };
                expect(
                    ty(a) == want.0 && ty(b) == want.0 && inst.ty == want.1,
                    &format!("{} operand or result types", op.name()),
                )?;
                if matches!(op, BinOp::IShr) {
                    expect(
                        k.const_int(*b).is_some_and(|s| (0..64).contains(&s)),
                        "ishr needs a constant shift in 0..64",
                    )?;
                }
            }
            Op::Cmp(_, a, b) => expect(
                inst.ty == Ty::Bool && ty(a) == ty(b) && ty(a) != Ty::Bool,
                "comparisons take two ints or two floats and give bool",
            )?,
            Op::Select(c, a, b) => expect(
                ty(c) == Ty::Bool && ty(a) == inst.ty && ty(b) == inst.ty,
                "select types",
            )?,
            Op::Call(f, a) => match f {
                Func::Abs => expect(
                    ty(a) == inst.ty && inst.ty != Ty::Bool,
                    "abs keeps its numeric type",
                )?,
                Func::Min
                | Func::Max
                | Func::Clamp
                | Func::Float
                | Func::Int
                | Func::Sin
                | Func::Cos
                | Func::Erf
                | Func::Pow
                | Func::Sign => return err(format!("`{}` must be lowered to other ops", f.name())),
                _ => expect(
                    ty(a) == Ty::F32 && inst.ty == Ty::F32,
                    "float functions take and give f32",
                )?,
            },
            Op::IToF(a) => expect(ty(a) == Ty::I64 && inst.ty == Ty::F32, "itof types")?,
            Op::FToI(a) => expect(ty(a) == Ty::F32 && inst.ty == Ty::I64, "ftoi types")?,
            Op::BToI(a) => expect(ty(a) == Ty::Bool && inst.ty == Ty::I64, "btoi types")?,
            Op::Load {
                buffer, indices, ..
            } => {
                let Some(decl) = k.buffers.get(*buffer as usize) else {
                    return err(format!("load of unknown buffer {buffer}"));
                };
                expect(
                    indices.len() == decl.dims.len(),
                    "one index per buffer dimension",
                )?;
                expect(indices.iter().all(|i| ty(i) == Ty::I64), "indices are i64")?;
                expect(
                    inst.ty == decl.elem,
                    "load type is the buffer's element type",
                )?;
            }
            Op::Ancestor { parent, i, j } => {
                let Some(decl) = k.buffers.get(*parent as usize) else {
                    return err(format!("ancestor of unknown buffer {parent}"));
                };
                expect(
                    decl.dims.len() == 1 && decl.elem == Ty::I64,
                    "ancestor needs a 1-d i64 buffer",
                )?;
                expect(
                    ty(i) == Ty::I64 && ty(j) == Ty::I64 && inst.ty == Ty::Bool,
                    "ancestor types",
                )?;
            }
        }
    }
    let root_ty = |v: ValueId| k.insts.get(v.0 as usize).map(|i| i.ty);
    let check_root = |v: ValueId, want: Ty, name: &str| {
        if root_ty(v) != Some(want) {
            return Err(VerifyError {
                value: v,
                message: format!("root `{name}` must be {want}"),
            });
        }
        Ok(())
    };
    check_root(k.scale, Ty::F32, "scale")?;
    check_root(k.q_prescale, Ty::F32, "q_prescale")?;
    check_root(k.score_full, Ty::F32, "score_full")?;
    check_root(k.score_partial, Ty::F32, "score_partial")?;
    if let Some(m) = k.mask {
        check_root(m, Ty::Bool, "mask")?;
    }
    for (v, name) in [(k.scale, "scale"), (k.q_prescale, "q_prescale")] {
        if k.inst(v).level != Level::Call {
            return Err(VerifyError {
                value: v,
                message: format!("`{name}` must be computed once per call"),
            });
        }
    }
    Ok(())
}
