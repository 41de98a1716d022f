//! Text form of a checked spec (`attnc emit --stage checked`).
//!
//! One definition per line, `eN: TYPE [DEPS] = op operands`, in creation
//! order, listing only the nodes reachable from `mask`, `score` and `scale`.

use std::fmt;

use super::ir::*;

impl Spec {
    /// Marks the expressions reachable from the roots.
    pub fn live(&self) -> Vec<bool> {
        let mut live = vec![false; self.exprs.len()];
        let mut stack: Vec<ExprId> = [self.mask, self.score, self.scale]
            .into_iter()
            .flatten()
            .collect();
        while let Some(id) = stack.pop() {
            if std::mem::replace(&mut live[id.0 as usize], true) {
                continue;
            }
            stack.extend(self.expr(id).operands());
        }
        live
    }
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "spec {} {{", self.name)?;
        for p in &self.params {
            writeln!(f, "    param {}: {} = {}", p.name, p.ty, p.value)?;
        }
        for b in &self.buffers {
            let dims = b
                .dims
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            writeln!(f, "    buffer {}[{}]: {}", b.name, dims, b.elem)?;
        }
        let live = self.live();
        for (i, e) in self.exprs.iter().enumerate() {
            if !live[i] {
                continue;
            }
            let id = ExprId(i as u32);
            write!(f, "    {id}: {} [{}] = ", self.ty(id), self.deps(id))?;
            match e {
                Expr::Const(v) => write!(f, "const {v}")?,
                Expr::Var(v) => write!(f, "var {}", v.name())?,
                Expr::Shape(s) => write!(f, "shape {}", s.name())?,
                Expr::Score => write!(f, "score")?,
                Expr::Param(p) => write!(f, "param {}", self.param(*p).name)?,
                Expr::Load { buffer, indices } => {
                    let idx = indices
                        .iter()
                        .map(|i| i.to_string())
                        .collect::<Vec<_>>()
                        .join(", ");
                    write!(f, "load {}[{idx}]", self.buffer(*buffer).name)?
                }
                Expr::Unary(UnaryOp::Neg, a) => write!(f, "neg {a}")?,
                Expr::Unary(UnaryOp::Not, a) => write!(f, "not {a}")?,
                Expr::Unary(UnaryOp::BitNot, a) => write!(f, "bitnot {a}")?,
                Expr::Binary(op, a, b) => write!(f, "{} {a}, {b}", op.name())?,
                Expr::Select {
                    cond,
                    then,
                    otherwise,
                } => write!(f, "select {cond}, {then}, {otherwise}")?,
                Expr::Call(func, args) => {
                    let a = args
                        .iter()
                        .map(|i| i.to_string())
                        .collect::<Vec<_>>()
                        .join(", ");
                    write!(f, "call {} {a}", func.name())?
                }
                Expr::Ancestor { parent, i, j } => {
                    write!(f, "ancestor {}, {i}, {j}", self.buffer(*parent).name)?
                }
            }
            if let Some(l) = self.lets.iter().find(|l| l.value == id) {
                write!(f, "    ; let {}", l.name)?;
            }
            writeln!(f)?;
        }
        match self.mask {
            Some(m) => writeln!(f, "    mask = {m}")?,
            None => writeln!(f, "    mask = all")?,
        }
        match self.score {
            Some(s) => writeln!(f, "    score = {s}")?,
            None => writeln!(f, "    score = score")?,
        }
        match self.scale {
            Some(s) => writeln!(f, "    scale = {s}")?,
            None => writeln!(f, "    scale = rsqrt(D)")?,
        }
        writeln!(f, "}}")
    }
}

impl fmt::Display for Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.specs.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{s}")?;
        }
        Ok(())
    }
}
