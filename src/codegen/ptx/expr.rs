//! Lowering of the loop IR's expression instructions to PTX.
//!
//! Each IR value becomes a virtual register of its type's class: i64 in a
//! `.b64` register, f32 in `.f32`, bool in a predicate. The arithmetic
//! follows [`crate::tile::interp::eval_pure`] exactly where PTX can:
//! floor division and modulo, round-to-nearest float ops that ptxas may not
//! fuse (`.rn`), saturating float-to-int, NaN-ignoring min/max, unordered
//! `!=`. Transcendentals use the SFU approximations with the accuracy noted
//! on [`Gen::float_call`].
//!
//! Operations that can fail (buffer reads, `ancestor`, integer division by
//! a value that may be zero) run only under their guard and only for real
//! rows and columns of the tile (the context's validity predicate); a
//! failure is written to the error block ([`super::ErrorRecord`]).

use super::kernel::Gen;
use super::writer::{f32_imm, ins, Reg};
use super::ErrorRecord;
use crate::sema::{Func, Var};
use crate::tile::{BinOp, CmpOp, Op, Ty, UnOp, ValueId};

const LOG2_E: f32 = std::f32::consts::LOG2_E;
const LN_2: f32 = std::f32::consts::LN_2;

impl Gen<'_> {
    /// A fresh register for a value of type `ty`.
    pub(super) fn reg_of(&mut self, ty: Ty) -> Reg {
        match ty {
            Ty::I64 => self.w.rd(),
            Ty::F32 => self.w.f(),
            Ty::Bool => self.w.p(),
        }
    }

    /// Sets `d` to the zero of `ty`.
    fn zero(&mut self, d: Reg, ty: Ty) {
        match ty {
            Ty::I64 => ins!(self.w, "mov.b64 {d}, 0"),
            Ty::F32 => ins!(self.w, "mov.f32 {d}, {}", f32_imm(0.0)),
            Ty::Bool => ins!(self.w, "mov.pred {d}, 0"),
        }
    }

    pub(super) fn get(&self, v: ValueId) -> Reg {
        self.env[v.0 as usize]
            .unwrap_or_else(|| panic!("verified IR: {v} is used where it is not computed"))
    }

    /// `a && b` of two optional predicates (`None` = true).
    pub(super) fn and_opt(&mut self, a: Option<Reg>, b: Option<Reg>) -> Option<Reg> {
        match (a, b) {
            (Some(a), Some(b)) => {
                let p = self.w.p();
                ins!(self.w, "and.pred {p}, {a}, {b}");
                Some(p)
            }
            (a, b) => a.or(b),
        }
    }

    /// Where an instruction that may fail runs: under its guard, for real
    /// rows and columns only. `None` = everywhere.
    fn active(&mut self, guard: Option<ValueId>) -> Option<Reg> {
        let valid = self.ctx_valid();
        let guard = guard.map(|g| self.get(g));
        self.and_opt(valid, guard)
    }

    /// Lowers one instruction in the current context and binds its value.
    pub(super) fn lower(&mut self, v: ValueId) {
        let inst = self.k.inst(v).clone();
        let text = self.inst_text(v);
        self.w.comment(&text);
        let ty = inst.ty;
        let trapping = inst.op.may_trap(|x| self.k.const_int(x));
        let d = match &inst.op {
            Op::Var(Var::B) => self.b64,
            Op::Var(Var::H) => self.h64,
            Op::Var(Var::Q) => self
                .ctx
                .q
                .expect("verified IR: `var q` at row level or below"),
            Op::Var(Var::Kv) => self
                .ctx
                .kv
                .expect("verified IR: `var kv` at column level or below"),
            Op::Shape(s) => self.shapes[*s as usize],
            Op::TileScore => self
                .ctx
                .tile_score
                .expect("verified IR: tile_score at element level"),
            Op::Load {
                buffer,
                indices,
                checked,
            } => {
                let idx: Vec<Reg> = indices.iter().map(|i| self.get(*i)).collect();
                let active = self.active(inst.guard);
                self.load(v, *buffer as usize, &idx, *checked, active, ty)
            }
            Op::Ancestor { parent, i, j } => {
                let (i, j) = (self.get(*i), self.get(*j));
                let active = self.active(inst.guard);
                self.ancestor(v, *parent as usize, i, j, active)
            }
            Op::Binary(op @ (BinOp::IShl | BinOp::ISar | BinOp::IDiv | BinOp::IRem), a, b) => {
                let (a, b) = (self.get(*a), self.get(*b));
                let active = if trapping {
                    self.active(inst.guard)
                } else {
                    None
                };
                let d = if op.is_checked_shift() {
                    self.checked_shift(v, *op, a, b, trapping, active)
                } else {
                    self.floor_div(v, *op, a, b, trapping, active)
                };
                if !trapping {
                    self.apply_guard(d, ty, inst.guard)
                } else {
                    d
                }
            }
            op => {
                let d = self.pure(op, ty);
                self.apply_guard(d, ty, inst.guard)
            }
        };
        self.env[v.0 as usize] = Some(d);
    }

    /// `guard ? d : 0` for an instruction that cannot fail.
    fn apply_guard(&mut self, d: Reg, ty: Ty, guard: Option<ValueId>) -> Reg {
        let Some(g) = guard else { return d };
        let g = self.get(g);
        let r = self.reg_of(ty);
        match ty {
            Ty::I64 => ins!(self.w, "selp.b64 {r}, {d}, 0, {g}"),
            Ty::F32 => ins!(self.w, "selp.f32 {r}, {d}, {}, {g}", f32_imm(0.0)),
            Ty::Bool => ins!(self.w, "and.pred {r}, {d}, {g}"),
        }
        r
    }

    /// Ops that read nothing and cannot fail.
    fn pure(&mut self, op: &Op, ty: Ty) -> Reg {
        let d = self.reg_of(ty);
        match op {
            Op::IConst(i) => ins!(self.w, "mov.b64 {d}, {i}"),
            Op::FConst(x) => ins!(self.w, "mov.f32 {d}, {}", f32_imm(*x)),
            Op::BConst(b) => ins!(self.w, "mov.pred {d}, {}", u8::from(*b)),
            Op::Unary(UnOp::INeg, a) => ins!(self.w, "neg.s64 {d}, {}", self.get(*a)),
            Op::Unary(UnOp::FNeg, a) => ins!(self.w, "neg.f32 {d}, {}", self.get(*a)),
            Op::Unary(UnOp::Not, a) => ins!(self.w, "not.pred {d}, {}", self.get(*a)),
            Op::Unary(UnOp::INot, a) => ins!(self.w, "not.b64 {d}, {}", self.get(*a)),
            Op::Binary(op, a, b) => {
                let (a, b) = (self.get(*a), self.get(*b));
                self.binary(*op, d, a, b);
            }
            Op::Cmp(op, a, b) => {
                let float = self.k.inst(*a).ty == Ty::F32;
                let (a, b) = (self.get(*a), self.get(*b));
                let cmp = match (op, float) {
                    // Ordered float comparisons are false on NaN; `!=` is true.
                    (CmpOp::Ne, true) => "neu",
                    (op, _) => op.name(),
                };
                let t = if float { "f32" } else { "s64" };
                ins!(self.w, "setp.{cmp}.{t} {d}, {a}, {b}");
            }
            Op::Select(c, a, b) => {
                let (c, a, b) = (self.get(*c), self.get(*a), self.get(*b));
                match ty {
                    Ty::I64 => ins!(self.w, "selp.b64 {d}, {a}, {b}, {c}"),
                    Ty::F32 => ins!(self.w, "selp.f32 {d}, {a}, {b}, {c}"),
                    Ty::Bool => {
                        let (t, nc, u) = (self.w.p(), self.w.p(), self.w.p());
                        ins!(self.w, "and.pred {t}, {c}, {a}");
                        ins!(self.w, "not.pred {nc}, {c}");
                        ins!(self.w, "and.pred {u}, {nc}, {b}");
                        ins!(self.w, "or.pred {d}, {t}, {u}");
                    }
                }
            }
            Op::Call(f, a) => {
                let a_ty = self.k.inst(*a).ty;
                let a = self.get(*a);
                self.float_call(*f, d, a, a_ty);
            }
            Op::IToF(a) => ins!(self.w, "cvt.rn.f32.s64 {d}, {}", self.get(*a)),
            // Truncating; PTX saturates out-of-range values and maps NaN to 0, like Rust's `as`.
            Op::FToI(a) => ins!(self.w, "cvt.rzi.s64.f32 {d}, {}", self.get(*a)),
            Op::BToI(a) => ins!(self.w, "selp.b64 {d}, 1, 0, {}", self.get(*a)),
            Op::Var(_) | Op::Shape(_) | Op::TileScore | Op::Load { .. } | Op::Ancestor { .. } => {
                unreachable!("bound or lowered by `lower`")
            }
        }
        d
    }

    fn binary(&mut self, op: BinOp, d: Reg, a: Reg, b: Reg) {
        match op {
            BinOp::IAdd => ins!(self.w, "add.s64 {d}, {a}, {b}"),
            BinOp::ISub => ins!(self.w, "sub.s64 {d}, {a}, {b}"),
            BinOp::IMul => ins!(self.w, "mul.lo.s64 {d}, {a}, {b}"),
            BinOp::IShr => {
                // The verifier guarantees a constant shift in 0..64.
                let s = self.w.r();
                ins!(self.w, "cvt.u32.u64 {s}, {b}");
                ins!(self.w, "and.b32 {s}, {s}, 63");
                ins!(self.w, "shr.s64 {d}, {a}, {s}");
            }
            BinOp::IAnd => ins!(self.w, "and.b64 {d}, {a}, {b}"),
            BinOp::IXor => ins!(self.w, "xor.b64 {d}, {a}, {b}"),
            BinOp::IOr => ins!(self.w, "or.b64 {d}, {a}, {b}"),
            BinOp::IMulHiU => ins!(self.w, "mul.hi.u64 {d}, {a}, {b}"),
            BinOp::IMin => ins!(self.w, "min.s64 {d}, {a}, {b}"),
            BinOp::IMax => ins!(self.w, "max.s64 {d}, {a}, {b}"),
            // `.rn` keeps ptxas from contracting a multiply and an add into
            // an FMA, so each op rounds like the interpreter's.
            BinOp::FAdd => ins!(self.w, "add.rn.f32 {d}, {a}, {b}"),
            BinOp::FSub => ins!(self.w, "sub.rn.f32 {d}, {a}, {b}"),
            BinOp::FMul => ins!(self.w, "mul.rn.f32 {d}, {a}, {b}"),
            BinOp::FDiv => self.fdiv(d, a, b),
            BinOp::FRem => {
                // a - b * floor(a / b), each step rounded. The quotient stays
                // IEEE (`div.rn`): `floor` of a quotient 1 ulp below an integer
                // would be off by one.
                let t = self.w.f();
                ins!(self.w, "div.rn.f32 {t}, {a}, {b}");
                ins!(self.w, "cvt.rmi.f32.f32 {t}, {t}");
                ins!(self.w, "mul.rn.f32 {t}, {b}, {t}");
                ins!(self.w, "sub.rn.f32 {d}, {a}, {t}");
            }
            // PTX min/max return the other operand when one is NaN, like Rust's.
            BinOp::FMin => ins!(self.w, "min.f32 {d}, {a}, {b}"),
            BinOp::FMax => ins!(self.w, "max.f32 {d}, {a}, {b}"),
            BinOp::And => ins!(self.w, "and.pred {d}, {a}, {b}"),
            BinOp::Or => ins!(self.w, "or.pred {d}, {a}, {b}"),
            BinOp::BNe => ins!(self.w, "xor.pred {d}, {a}, {b}"),
            BinOp::BEq => {
                let t = self.w.p();
                ins!(self.w, "xor.pred {t}, {a}, {b}");
                ins!(self.w, "not.pred {d}, {t}");
            }
            BinOp::IDiv | BinOp::IRem => unreachable!("lowered by `floor_div`"),
            BinOp::IShl | BinOp::ISar => unreachable!("lowered by `checked_shift`"),
        }
    }

    /// `a / b` within 2 ulp of the IEEE quotient (`x / c` by a constant is
    /// already `x * (1 / c)` in the loop IR, as close), with IEEE's classes
    /// (±inf for x / 0, NaN for 0 / 0 and inf / inf, ±0 for x / inf,
    /// subnormal operands and results kept), straight-line and without
    /// predicates: `a s * rcp(b s)` with `s` a power of two picked from b's
    /// exponent by integer min/max, 2^24 for a zero or subnormal b (so
    /// `rcp.ftz` sees a normal number), 2^-2 for |b| >= 2^126 (so the
    /// reciprocal is not subnormal, which `rcp.ftz` would flush), else 1.
    /// Scaling a and b alike is exact but for an `a` so small or large that
    /// the quotient underflows to 0 or overflows to inf either way.
    ///
    /// Not `div.rn` (a range check, a branch and a call to a slow path in
    /// SASS, per element), nor `div.full`, which does the same scaling with
    /// two predicates per division: with several divisions per element,
    /// ptxas interleaving the 32 elements of a thread runs out of predicate
    /// registers and spills.
    fn fdiv(&mut self, d: Reg, a: Reg, b: Reg) {
        let (bits, e, small, large, sb) =
            (self.w.r(), self.w.r(), self.w.r(), self.w.r(), self.w.r());
        let (s, a2, b2, r) = (self.w.f(), self.w.f(), self.w.f(), self.w.f());
        ins!(self.w, "mov.b32 {bits}, {b}");
        // The exponent field (0x7f800000).
        ins!(self.w, "and.b32 {e}, {bits}, 2139095040");
        // 0 for a zero or subnormal b, else 2^23 (one exponent step).
        ins!(self.w, "min.u32 {small}, {e}, 8388608");
        // 2^23 for |b| >= 2^126 (exponent field >= 253 << 23), else 0.
        ins!(self.w, "max.u32 {large}, {e}, 2113929216");
        ins!(self.w, "sub.u32 {large}, {large}, 2113929216");
        ins!(self.w, "min.u32 {large}, {large}, 8388608");
        // The bits of 2^24 (0x4b800000), 24 steps down (to 1.0) unless b is
        // small, then 2 steps down (to 0.25) if b is large.
        ins!(self.w, "mad.lo.s32 {sb}, {small}, -24, 1266679808");
        ins!(self.w, "mad.lo.s32 {sb}, {large}, -2, {sb}");
        ins!(self.w, "mov.b32 {s}, {sb}");
        ins!(self.w, "mul.rn.f32 {a2}, {a}, {s}");
        ins!(self.w, "mul.rn.f32 {b2}, {b}, {s}");
        ins!(self.w, "rcp.approx.ftz.f32 {r}, {b2}");
        ins!(self.w, "mul.rn.f32 {d}, {a2}, {r}");
    }

    /// Floor division or modulo (`sema::eval::floor_div` / `floor_mod`):
    /// truncating `div`/`rem`, then one step toward -inf when the remainder
    /// is nonzero and its sign differs from the divisor's. `i64::MIN / -1`
    /// wraps. A zero divisor (where the op is active) is an error and
    /// gives 0.
    fn floor_div(
        &mut self,
        v: ValueId,
        op: BinOp,
        a: Reg,
        b: Reg,
        trapping: bool,
        active: Option<Reg>,
    ) -> Reg {
        let divisor = if trapping {
            let z = self.w.p();
            ins!(self.w, "setp.eq.s64 {z}, {b}, 0");
            let fail = self.and_opt(Some(z), active).expect("z is present");
            self.record_error(Some(fail), ErrorRecord::DIVISION_BY_ZERO, v, &[]);
            let safe = self.w.rd();
            ins!(self.w, "selp.b64 {safe}, 1, {b}, {z}");
            Some((safe, z))
        } else {
            None
        };
        let bs = divisor.map_or(b, |(s, _)| s);
        let (q, r, m1, t, neg, nz, adj) = (
            self.w.rd(),
            self.w.rd(),
            self.w.p(),
            self.w.rd(),
            self.w.p(),
            self.w.p(),
            self.w.p(),
        );
        ins!(self.w, "div.s64 {q}, {a}, {bs}");
        ins!(self.w, "rem.s64 {r}, {a}, {bs}");
        // x / -1 = -x (wrapping), x % -1 = 0.
        ins!(self.w, "setp.eq.s64 {m1}, {bs}, -1");
        let nq = self.w.rd();
        ins!(self.w, "neg.s64 {nq}, {a}");
        ins!(self.w, "selp.b64 {q}, {nq}, {q}, {m1}");
        ins!(self.w, "selp.b64 {r}, 0, {r}, {m1}");
        ins!(self.w, "xor.b64 {t}, {r}, {bs}");
        ins!(self.w, "setp.lt.s64 {neg}, {t}, 0");
        ins!(self.w, "setp.ne.s64 {nz}, {r}, 0");
        ins!(self.w, "and.pred {adj}, {neg}, {nz}");
        let d = self.w.rd();
        match op {
            BinOp::IDiv => {
                ins!(self.w, "sub.s64 {d}, {q}, 1");
                ins!(self.w, "selp.b64 {d}, {d}, {q}, {adj}");
            }
            _ => {
                ins!(self.w, "add.s64 {d}, {r}, {bs}");
                ins!(self.w, "selp.b64 {d}, {d}, {r}, {adj}");
            }
        }
        if let Some((_, z)) = divisor {
            // Zero where the divisor is zero or the op is not active.
            self.zero_where_failed(d, z, active);
        }
        d
    }

    /// `d = 0` where `bad` holds or the op is not `active` (a trapping op's
    /// value where it failed or did not run).
    fn zero_where_failed(&mut self, d: Reg, bad: Reg, active: Option<Reg>) {
        let off = self.w.p();
        match active {
            Some(act) => {
                let nact = self.w.p();
                ins!(self.w, "not.pred {nact}, {act}");
                ins!(self.w, "or.pred {off}, {bad}, {nact}");
            }
            None => ins!(self.w, "mov.pred {off}, {bad}"),
        }
        ins!(self.w, "selp.b64 {d}, 0, {d}, {off}");
    }

    /// The spec's `a << b` / `a >> b` (arithmetic): a count outside
    /// `0..=63` is recorded as an error where the op is `active` (the value
    /// is then 0); PTX shifts clamp counts above the width, so the count is
    /// masked first and the result zeroed where it was out of range.
    fn checked_shift(
        &mut self,
        v: ValueId,
        op: BinOp,
        a: Reg,
        b: Reg,
        trapping: bool,
        active: Option<Reg>,
    ) -> Reg {
        let bad = self.w.p();
        ins!(self.w, "setp.gt.u64 {bad}, {b}, 63");
        if trapping {
            let fail = self.and_opt(Some(bad), active).expect("bad is present");
            self.record_error(Some(fail), ErrorRecord::SHIFT_OUT_OF_RANGE, v, &[b]);
        }
        let n = self.w.r();
        ins!(self.w, "cvt.u32.u64 {n}, {b}");
        ins!(self.w, "and.b32 {n}, {n}, 63");
        let d = self.w.rd();
        match op {
            BinOp::IShl => ins!(self.w, "shl.b64 {d}, {a}, {n}"),
            _ => ins!(self.w, "shr.s64 {d}, {a}, {n}"),
        }
        if trapping {
            // Zero where the count is out of range or the op is not active.
            self.zero_where_failed(d, bad, active);
        }
        d
    }

    /// Float functions of one argument, and `abs` of an int or a float.
    ///
    /// Accuracy (f32, SFU approximations as documented in the PTX ISA):
    /// `exp2`: `ex2.approx` (max relative error 2^-22 over the normal
    /// range); `exp(x) = ex2(x * log2 e)`, which adds a relative error of
    /// about |x| * 6e-8; `log2`: `lg2.approx` (max absolute error 2^-22);
    /// `log(x) = lg2(x) * ln 2`; `sqrt` and `rsqrt` are IEEE (`sqrt.rn`,
    /// `div.rn`), as the interpreter computes them. `tanh`: see
    /// [`Gen::tanh`] (about 1.1e-6 relative). `sigmoid(x) = rcp(1 + ex2(-x
    /// log2 e))` with `rcp.approx` (1 ulp, subnormal results kept), about
    /// 4e-7 relative.
    /// `floor`, `ceil` and `round` (ties to even) are exact.
    fn float_call(&mut self, f: Func, d: Reg, a: Reg, a_ty: Ty) {
        match f {
            Func::Abs if a_ty == Ty::I64 => ins!(self.w, "abs.s64 {d}, {a}"),
            Func::Abs => ins!(self.w, "abs.f32 {d}, {a}"),
            Func::Exp2 => ins!(self.w, "ex2.approx.f32 {d}, {a}"),
            Func::Exp => {
                let t = self.w.f();
                ins!(self.w, "mul.rn.f32 {t}, {a}, {}", f32_imm(LOG2_E));
                ins!(self.w, "ex2.approx.f32 {d}, {t}");
            }
            Func::Log2 => ins!(self.w, "lg2.approx.f32 {d}, {a}"),
            Func::Log => {
                let t = self.w.f();
                ins!(self.w, "lg2.approx.f32 {t}, {a}");
                ins!(self.w, "mul.rn.f32 {d}, {t}, {}", f32_imm(LN_2));
            }
            Func::Sqrt => ins!(self.w, "sqrt.rn.f32 {d}, {a}"),
            Func::Rsqrt => {
                let t = self.w.f();
                ins!(self.w, "sqrt.rn.f32 {t}, {a}");
                ins!(self.w, "div.rn.f32 {d}, {}, {t}", f32_imm(1.0));
            }
            Func::Tanh => self.tanh(d, a),
            Func::Sigmoid => {
                // 1 / (1 + e) = rcp((1 + e) / 4) / 4: `ex2` may flush (a
                // subnormal e leaves 1 + e = 1); (1 + e) / 4 < 2^126 for any
                // finite e, so `rcp.ftz` never flushes its result, and the
                // last multiply (not `.ftz`) rounds a result below 2^-126
                // to a subnormal, as the interpreter's is for x in
                // (-88.7, -87.3). No predicates, unlike `rcp.approx.f32`.
                let t = self.w.f();
                ins!(self.w, "mul.rn.f32 {t}, {a}, {}", f32_imm(-LOG2_E));
                ins!(self.w, "ex2.approx.ftz.f32 {t}, {t}");
                ins!(
                    self.w,
                    "fma.rn.f32 {t}, {t}, {}, {}",
                    f32_imm(0.25),
                    f32_imm(0.25)
                );
                ins!(self.w, "rcp.approx.ftz.f32 {t}, {t}");
                ins!(self.w, "mul.rn.f32 {d}, {t}, {}", f32_imm(0.25));
            }
            Func::Floor => ins!(self.w, "cvt.rmi.f32.f32 {d}, {a}"),
            Func::Ceil => ins!(self.w, "cvt.rpi.f32.f32 {d}, {a}"),
            Func::Round => ins!(self.w, "cvt.rni.f32.f32 {d}, {a}"),
            // The SFU's tanh (sm_75 on): relative error 2^-10.987, as
            // FlexAttention's approximate soft-cap uses it.
            Func::TanhApprox => ins!(self.w, "tanh.approx.f32 {d}, {a}"),
            Func::Min
            | Func::Max
            | Func::Clamp
            | Func::Float
            | Func::Int
            | Func::Erf
            | Func::Sin
            | Func::Cos
            | Func::Pow
            | Func::Sign => {
                unreachable!("verified IR: `{}` is lowered to other ops", f.name())
            }
        }
    }

    /// `tanh(x)`, branch-free, in every dtype: NaN to NaN, ±inf to ±1, ±0
    /// and subnormals to themselves, within about 1.1e-6 relative of the
    /// exact value with the SFU at its error bounds.
    ///
    /// Below |x| = 0.25 the odd Taylor polynomial to x^7 (truncation < 4e-7
    /// relative); above it `1 - 2 / (1 + e)` with `e = ex2(2 |x| log2 e)` and
    /// `rcp.approx` (1 ulp), the sign copied back: at most 1.1e-6 relative at
    /// |x| = 0.25 (the subtraction loses about 2 bits there), less above,
    /// and within 3e-7 absolute everywhere. Both SFU ops flush (`.ftz`)
    /// harmlessly: `e >= 1`, a reciprocal below 2^-126 leaves `1 - 2r = 1`,
    /// and `e = inf` (|x| > 44, or inf) gives `r = 0`, tanh = ±1.
    ///
    /// Not `tanh.approx.f32` (one SFU op), even for f16/bf16: its relative
    /// error of 2^-11 is an absolute error of up to 2^-11 where tanh
    /// saturates, so a soft-cap `c * tanh(s / c)` with c = 50 moves each
    /// saturated score by up to 0.024, each probability by 2.4%; with the
    /// emulator's tanh at that bound in scattered directions, saturated
    /// rows that see a few keys miss the 1e-2 parity tolerance.
    fn tanh(&mut self, d: Reg, x: Reg) {
        let (ax, e, big, x2, poly, small) = (
            self.w.f(),
            self.w.f(),
            self.w.f(),
            self.w.f(),
            self.w.f(),
            self.w.p(),
        );
        ins!(self.w, "abs.f32 {ax}, {x}");
        // |x| >= 0.25: 1 - 2 / (1 + e), e = exp(2|x|).
        ins!(self.w, "mul.rn.f32 {e}, {ax}, {}", f32_imm(2.0 * LOG2_E));
        ins!(self.w, "ex2.approx.ftz.f32 {e}, {e}");
        ins!(self.w, "add.rn.f32 {e}, {e}, {}", f32_imm(1.0));
        ins!(self.w, "rcp.approx.ftz.f32 {e}, {e}");
        ins!(
            self.w,
            "fma.rn.f32 {big}, {e}, {}, {}",
            f32_imm(-2.0),
            f32_imm(1.0)
        );
        ins!(self.w, "copysign.f32 {big}, {x}, {big}");
        // |x| < 0.25: x (1 + x^2 (-1/3 + x^2 (2/15 - x^2 17/315))).
        ins!(self.w, "mul.rn.f32 {x2}, {x}, {x}");
        ins!(self.w, "mov.f32 {poly}, {}", f32_imm(-17.0 / 315.0));
        for c in [2.0 / 15.0, -1.0 / 3.0, 1.0] {
            ins!(
                self.w,
                "fma.rn.f32 {poly}, {poly}, {x2}, {}",
                f32_imm(c as f32)
            );
        }
        ins!(self.w, "mul.rn.f32 {poly}, {poly}, {x}");
        ins!(self.w, "setp.lt.f32 {small}, {ax}, {}", f32_imm(0.25));
        ins!(self.w, "selp.f32 {d}, {poly}, {big}, {small}");
    }

    /// A buffer read: row-major address from the indices; `checked` reads
    /// compare every index with its dim (unsigned, so negatives fail) and
    /// record a failure. The read happens only where `active` and in range;
    /// elsewhere the value is zero.
    fn load(
        &mut self,
        v: ValueId,
        buffer: usize,
        idx: &[Reg],
        checked: bool,
        active: Option<Reg>,
        ty: Ty,
    ) -> Reg {
        let (ptr, dims) = self.bufs[buffer].clone();
        let run = if checked {
            let inr = self.w.p();
            for (n, (i, dim)) in idx.iter().zip(&dims).enumerate() {
                if n == 0 {
                    ins!(self.w, "setp.lt.u64 {inr}, {i}, {dim}");
                } else {
                    ins!(self.w, "setp.lt.and.u64 {inr}, {i}, {dim}, {inr}");
                }
            }
            let out = self.w.p();
            ins!(self.w, "not.pred {out}, {inr}");
            let fail = self.and_opt(Some(out), active).expect("out is present");
            self.record_error(Some(fail), ErrorRecord::OUT_OF_RANGE, v, idx);
            self.and_opt(Some(inr), active)
        } else {
            active
        };
        let addr = self.element_address(ptr, &dims, idx, ty);
        let pred = run.map(|p| format!("@{p} ")).unwrap_or_default();
        let d = self.reg_of(ty);
        match ty {
            Ty::I64 => {
                self.zero(d, ty);
                ins!(self.w, "{pred}ld.global.nc.s64 {d}, [{addr}]");
            }
            Ty::F32 => {
                self.zero(d, ty);
                ins!(self.w, "{pred}ld.global.nc.f32 {d}, [{addr}]");
            }
            Ty::Bool => {
                let byte = self.w.r();
                ins!(self.w, "mov.b32 {byte}, 0");
                ins!(self.w, "{pred}ld.global.nc.u8 {byte}, [{addr}]");
                ins!(self.w, "setp.ne.b32 {d}, {byte}, 0");
            }
        }
        d
    }

    /// `ptr + (row-major index) * element size`.
    fn element_address(&mut self, ptr: Reg, dims: &[Reg], idx: &[Reg], ty: Ty) -> Reg {
        let lin = self.w.rd();
        ins!(self.w, "mov.b64 {lin}, {}", idx[0]);
        for (i, dim) in idx.iter().zip(dims).skip(1) {
            ins!(self.w, "mad.lo.s64 {lin}, {lin}, {dim}, {i}");
        }
        let shift = match ty {
            Ty::I64 => 3,
            Ty::F32 => 2,
            Ty::Bool => 0,
        };
        let addr = self.w.rd();
        if shift > 0 {
            ins!(self.w, "shl.b64 {lin}, {lin}, {shift}");
        }
        ins!(self.w, "add.s64 {addr}, {ptr}, {lin}");
        addr
    }

    /// `ancestor(parent, i, j)`: true iff `j == i` or `j` is reached from
    /// `i` by following `parent`; a step out of range or more steps than the
    /// buffer has elements (a cycle) is an error, as in the interpreter.
    fn ancestor(&mut self, v: ValueId, parent: usize, i: Reg, j: Reg, active: Option<Reg>) -> Reg {
        let (ptr, dims) = self.bufs[parent].clone();
        let len = dims[0];
        let d = self.w.p();
        let (found, done, top, oor, cycle) = (
            self.w.label("anc_found"),
            self.w.label("anc_done"),
            self.w.label("anc_loop"),
            self.w.label("anc_oor"),
            self.w.label("anc_cycle"),
        );
        let (x, steps, addr, p) = (self.w.rd(), self.w.rd(), self.w.rd(), self.w.p());
        ins!(self.w, "mov.pred {d}, 0");
        if let Some(act) = active {
            ins!(self.w, "@!{act} bra {done}");
        }
        ins!(self.w, "setp.eq.s64 {p}, {i}, {j}");
        ins!(self.w, "@{p} bra {found}");
        ins!(self.w, "mov.b64 {x}, {i}");
        ins!(self.w, "mov.b64 {steps}, 0");
        self.w.place(&top);
        ins!(self.w, "setp.ge.u64 {p}, {x}, {len}");
        ins!(self.w, "@{p} bra {oor}");
        ins!(self.w, "shl.b64 {addr}, {x}, 3");
        ins!(self.w, "add.s64 {addr}, {ptr}, {addr}");
        ins!(self.w, "ld.global.nc.s64 {x}, [{addr}]");
        ins!(self.w, "setp.eq.s64 {p}, {x}, {j}");
        ins!(self.w, "@{p} bra {found}");
        ins!(self.w, "setp.lt.s64 {p}, {x}, 0");
        ins!(self.w, "@{p} bra {done}");
        ins!(self.w, "add.s64 {steps}, {steps}, 1");
        ins!(self.w, "setp.gt.s64 {p}, {steps}, {len}");
        ins!(self.w, "@{p} bra {cycle}");
        ins!(self.w, "bra.uni {top}");
        self.w.place(&oor);
        self.record_error(None, ErrorRecord::OUT_OF_RANGE, v, &[x]);
        ins!(self.w, "bra.uni {done}");
        self.w.place(&cycle);
        self.record_error(None, ErrorRecord::ANCESTOR_CYCLE, v, &[i]);
        ins!(self.w, "bra.uni {done}");
        self.w.place(&found);
        ins!(self.w, "mov.pred {d}, 1");
        self.w.place(&done);
        d
    }

    /// Writes a failure to the error block where `fail` holds (always when
    /// `None`): the first thread to claim word 0 writes the rest.
    pub(super) fn record_error(&mut self, fail: Option<Reg>, kind: u32, v: ValueId, idx: &[Reg]) {
        let skip = self.w.label("no_err");
        if let Some(f) = fail {
            ins!(self.w, "@!{f} bra {skip}");
        }
        let (old, won) = (self.w.r(), self.w.p());
        let err = self.err;
        ins!(self.w, "atom.global.cas.b32 {old}, [{err}], 0, {kind}");
        ins!(self.w, "setp.ne.b32 {won}, {old}, 0");
        ins!(self.w, "@{won} bra {skip}");
        let id = self.w.r();
        ins!(self.w, "mov.b32 {id}, {}", v.0);
        ins!(self.w, "st.global.b32 [{err}+4], {id}");
        let point = self.ctx.point();
        for (n, r) in point.iter().enumerate() {
            let r = r.unwrap_or(self.zero64);
            ins!(self.w, "st.global.b64 [{err}+{}], {r}", 8 * (n + 1));
        }
        for (n, r) in idx.iter().take(ErrorRecord::MAX_INDICES).enumerate() {
            ins!(self.w, "st.global.b64 [{err}+{}], {r}", 8 * (n + 5));
        }
        self.w.place(&skip);
    }
}
