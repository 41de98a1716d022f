//! Instruction construction with hash-consing (so every pass gets common
//! subexpression elimination for free), level inference, and the final
//! clean-up (dead-code removal and section assignment).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use super::ir::*;
use crate::syntax::Span;

/// Hash-consing key: an op compared bit-for-bit (so `0.0` and `-0.0` differ).
#[derive(Clone, Debug)]
struct Key(Op, Option<ValueId>);

impl PartialEq for Key {
    fn eq(&self, o: &Key) -> bool {
        self.1 == o.1
            && match (&self.0, &o.0) {
                (Op::FConst(a), Op::FConst(b)) => a.to_bits() == b.to_bits(),
                (a, b) => a == b,
            }
    }
}

impl Eq for Key {}

impl Hash for Key {
    fn hash<H: Hasher>(&self, h: &mut H) {
        std::mem::discriminant(&self.0).hash(h);
        self.1.hash(h);
        match &self.0 {
            Op::IConst(i) => i.hash(h),
            Op::FConst(x) => x.to_bits().hash(h),
            Op::BConst(b) => b.hash(h),
            Op::Var(v) => v.hash(h),
            Op::Shape(s) => s.hash(h),
            Op::TileScore => {}
            Op::Unary(o, a) => (o, a).hash(h),
            Op::Binary(o, a, b) => (o, a, b).hash(h),
            Op::Cmp(o, a, b) => (o, a, b).hash(h),
            Op::Select(c, a, b) => (c, a, b).hash(h),
            Op::Call(f, a) => (f, a).hash(h),
            Op::IToF(a) | Op::FToI(a) | Op::BToI(a) => a.hash(h),
            Op::Load {
                buffer,
                indices,
                checked,
            } => (buffer, indices, checked).hash(h),
            Op::Ancestor { parent, i, j } => (parent, i, j).hash(h),
        }
    }
}

/// Builds the instruction list of a kernel.
pub struct Builder {
    pub insts: Vec<Inst>,
    pub spans: Vec<Option<Span>>,
    intern: HashMap<Key, ValueId>,
    /// The level of the head `h`: `Head`, or `Row` when a tile's rows span
    /// several heads ([`super::nest::RowMap::head_per_row`]).
    h_level: Level,
}

impl Default for Builder {
    fn default() -> Builder {
        Builder::for_rows(super::nest::RowMap::OneHead)
    }
}

impl Builder {
    /// An empty builder for a kernel whose tiles map rows as `rows` says.
    pub fn for_rows(rows: super::nest::RowMap) -> Builder {
        Builder {
            insts: Vec::new(),
            spans: Vec::new(),
            intern: HashMap::new(),
            h_level: if rows.head_per_row() {
                Level::Row
            } else {
                Level::Head
            },
        }
    }

    pub fn inst(&self, v: ValueId) -> &Inst {
        &self.insts[v.0 as usize]
    }

    pub fn ty(&self, v: ValueId) -> Ty {
        self.inst(v).ty
    }

    pub fn const_int(&self, v: ValueId) -> Option<i64> {
        match self.inst(v).op {
            Op::IConst(i) => Some(i),
            _ => None,
        }
    }

    pub fn const_bool(&self, v: ValueId) -> Option<bool> {
        match self.inst(v).op {
            Op::BConst(b) => Some(b),
            _ => None,
        }
    }

    /// Adds (or finds) an instruction. The guard is kept only on ops that may
    /// trap; the level is the join of the operands' and the guard's levels.
    pub fn add(&mut self, op: Op, ty: Ty, guard: Option<ValueId>, span: Option<Span>) -> ValueId {
        let traps = op.may_trap(|v| self.const_int(v));
        let guard = if traps || Self::keeps_guard(&op) {
            guard
        } else {
            None
        };
        self.add_guarded(op, ty, guard, span)
    }

    /// Unchecked loads keep a guard when they are only safe under it.
    fn keeps_guard(op: &Op) -> bool {
        matches!(op, Op::Load { checked: false, .. })
    }

    /// Adds an instruction with exactly this guard (a const-true guard is dropped).
    pub fn add_guarded(
        &mut self,
        op: Op,
        ty: Ty,
        guard: Option<ValueId>,
        span: Option<Span>,
    ) -> ValueId {
        let guard = guard.filter(|g| self.const_bool(*g) != Some(true));
        let key = Key(op, guard);
        if let Some(&v) = self.intern.get(&key) {
            if self.spans[v.0 as usize].is_none() {
                self.spans[v.0 as usize] = span;
            }
            return v;
        }
        let Key(op, guard) = key.clone();
        let base = match &op {
            Op::Var(crate::sema::Var::B) => Level::Head,
            Op::Var(crate::sema::Var::H) => self.h_level,
            Op::Var(crate::sema::Var::Q) => Level::Row,
            Op::Var(crate::sema::Var::Kv) => Level::Col,
            Op::TileScore => Level::Elem,
            _ => Level::Call,
        };
        let level = op
            .operands()
            .iter()
            .chain(guard.iter())
            .fold(base, |l, o| l.join(self.inst(*o).level));
        let v = ValueId(self.insts.len() as u32);
        self.insts.push(Inst {
            op,
            ty,
            level,
            section: Section::Shared,
            guard,
        });
        self.spans.push(span);
        self.intern.insert(key, v);
        v
    }

    pub fn iconst(&mut self, i: i64) -> ValueId {
        self.add(Op::IConst(i), Ty::I64, None, None)
    }

    pub fn fconst(&mut self, x: f32) -> ValueId {
        self.add(Op::FConst(x), Ty::F32, None, None)
    }

    pub fn bconst(&mut self, b: bool) -> ValueId {
        self.add(Op::BConst(b), Ty::Bool, None, None)
    }

    pub fn binary(&mut self, op: BinOp, a: ValueId, b: ValueId) -> ValueId {
        let ty = match op {
            BinOp::And | BinOp::Or | BinOp::BEq | BinOp::BNe => Ty::Bool,
            _ => self.ty(a),
        };
        self.add(Op::Binary(op, a, b), ty, None, None)
    }

    /// `guard && cond`, where a missing guard means true.
    pub fn and_guard(&mut self, guard: Option<ValueId>, cond: ValueId) -> Option<ValueId> {
        Some(match guard {
            None => cond,
            Some(g) => self.binary(BinOp::And, g, cond),
        })
    }

    /// Finishes a kernel: drops dead instructions, renumbers, assigns sections.
    pub fn finish(self, template: KernelRoots) -> (Vec<Inst>, Vec<Option<Span>>, KernelRoots) {
        let n = self.insts.len();
        let mut used_full = vec![false; n];
        let mut used_partial = vec![false; n];
        let mark = |roots: &[ValueId], used: &mut Vec<bool>, insts: &[Inst]| {
            let mut stack = roots.to_vec();
            while let Some(v) = stack.pop() {
                if std::mem::replace(&mut used[v.0 as usize], true) {
                    continue;
                }
                let inst = &insts[v.0 as usize];
                stack.extend(inst.op.operands());
                stack.extend(inst.guard);
            }
        };
        let mut full_roots = vec![template.scale, template.q_prescale, template.score_full];
        full_roots.extend(&template.effects_full);
        let mut partial_roots = vec![template.scale, template.q_prescale, template.score_partial];
        partial_roots.extend(template.mask);
        partial_roots.extend(&template.effects_partial);
        full_roots.dedup();
        mark(&full_roots, &mut used_full, &self.insts);
        mark(&partial_roots, &mut used_partial, &self.insts);
        let mut remap = vec![None; n];
        let mut insts = Vec::new();
        let mut spans = Vec::new();
        for (i, inst) in self.insts.into_iter().enumerate() {
            if !used_full[i] && !used_partial[i] {
                continue;
            }
            let section = match (used_full[i], used_partial[i]) {
                (true, false) => Section::Full,
                (false, true) => Section::Partial,
                _ => Section::Shared,
            };
            let new = ValueId(insts.len() as u32);
            remap[i] = Some(new);
            let map = |v: ValueId| remap[v.0 as usize].expect("operands precede users");
            insts.push(Inst {
                op: inst.op.map_operands(map),
                ty: inst.ty,
                level: inst.level,
                section,
                guard: inst.guard.map(map),
            });
            spans.push(self.spans[i]);
        }
        let map = |v: ValueId| remap[v.0 as usize].expect("roots are live");
        let roots = KernelRoots {
            scale: map(template.scale),
            q_prescale: map(template.q_prescale),
            mask: template.mask.map(map),
            score_full: map(template.score_full),
            score_partial: map(template.score_partial),
            effects_full: effects(&template.effects_full, &insts, &remap),
            effects_partial: effects(&template.effects_partial, &insts, &remap),
        };
        (insts, spans, roots)
    }
}

/// The still-trapping effects among `list`, renumbered, sorted, deduplicated.
fn effects(list: &[ValueId], insts: &[Inst], remap: &[Option<ValueId>]) -> Vec<ValueId> {
    let mut out: Vec<ValueId> = list
        .iter()
        .filter_map(|v| remap[v.0 as usize])
        .filter(|v| {
            let inst = &insts[v.0 as usize];
            inst.op.may_trap(|c| match insts[c.0 as usize].op {
                Op::IConst(x) => Some(x),
                _ => None,
            })
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The root values of a kernel, while it is being built or rewritten.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelRoots {
    pub scale: ValueId,
    pub q_prescale: ValueId,
    pub mask: Option<ValueId>,
    pub score_full: ValueId,
    pub score_partial: ValueId,
    /// Trapping operations the spec evaluates even when their value is not
    /// used (a checked read whose result is discarded must still fail).
    pub effects_full: Vec<ValueId>,
    pub effects_partial: Vec<ValueId>,
}

impl KernelRoots {
    pub fn of(k: &Kernel) -> KernelRoots {
        KernelRoots {
            scale: k.scale,
            q_prescale: k.q_prescale,
            mask: k.mask,
            score_full: k.score_full,
            score_partial: k.score_partial,
            effects_full: k.effects_full.clone(),
            effects_partial: k.effects_partial.clone(),
        }
    }

    pub fn map(self, f: impl Fn(ValueId) -> ValueId) -> KernelRoots {
        KernelRoots {
            scale: f(self.scale),
            q_prescale: f(self.q_prescale),
            mask: self.mask.map(&f),
            score_full: f(self.score_full),
            score_partial: f(self.score_partial),
            effects_full: self.effects_full.iter().map(|v| f(*v)).collect(),
            effects_partial: self.effects_partial.iter().map(|v| f(*v)).collect(),
        }
    }
}

/// Rebuilds a kernel instruction by instruction. `rewrite` sees each old
/// instruction with operands and guard already mapped into the new builder
/// and may return a replacement value; otherwise the instruction is re-added.
pub fn rewrite(
    k: &Kernel,
    mut rewrite: impl FnMut(&mut Builder, &Inst, Option<Span>) -> Option<ValueId>,
) -> Kernel {
    let mut b = Builder::for_rows(k.nest.rows);
    let mut remap: Vec<ValueId> = Vec::with_capacity(k.insts.len());
    for (i, inst) in k.insts.iter().enumerate() {
        let mapped = Inst {
            op: inst.op.map_operands(|v| remap[v.0 as usize]),
            ty: inst.ty,
            level: inst.level,
            section: inst.section,
            guard: inst.guard.map(|v| remap[v.0 as usize]),
        };
        let span = k.spans.get(i).copied().flatten();
        let new = match rewrite(&mut b, &mapped, span) {
            Some(v) => v,
            None => b.add(mapped.op, mapped.ty, mapped.guard, span),
        };
        remap.push(new);
    }
    let roots = KernelRoots::of(k).map(|v| remap[v.0 as usize]);
    let (insts, spans, roots) = b.finish(roots);
    Kernel {
        insts,
        spans,
        ..k.with_roots(roots)
    }
}

/// The declarations of a kernel: everything but its instructions and roots.
pub struct KernelDecls {
    pub name: String,
    pub schedule: Schedule,
    pub params: Vec<(String, String)>,
    pub buffers: Vec<BufferDecl>,
}

impl Kernel {
    /// A kernel from its declarations and what [`Builder::finish`] returns.
    pub fn from_parts(
        decls: KernelDecls,
        insts: Vec<Inst>,
        spans: Vec<Option<crate::syntax::Span>>,
        r: KernelRoots,
    ) -> Kernel {
        Kernel {
            nest: super::nest::LoopNest::forward(&decls.schedule),
            name: decls.name,
            schedule: decls.schedule,
            params: decls.params,
            buffers: decls.buffers,
            insts,
            spans,
            scale: r.scale,
            q_prescale: r.q_prescale,
            mask: r.mask,
            score_full: r.score_full,
            score_partial: r.score_partial,
            effects_full: r.effects_full,
            effects_partial: r.effects_partial,
        }
    }

    /// A kernel (for tests) whose full and partial score is `itof(v)`, with
    /// no mask, scale 1 and the given buffers.
    #[cfg(test)]
    pub(crate) fn scored_by_int(mut b: Builder, v: ValueId, buffers: Vec<BufferDecl>) -> Kernel {
        let score = b.add(Op::IToF(v), Ty::F32, None, None);
        let one = b.fconst(1.0);
        let roots = KernelRoots {
            scale: one,
            q_prescale: one,
            mask: None,
            score_full: score,
            score_partial: score,
            effects_full: vec![],
            effects_partial: vec![],
        };
        let (insts, spans, roots) = b.finish(roots);
        let decls = KernelDecls {
            name: "scored_by_int".into(),
            schedule: Schedule::default(),
            params: vec![],
            buffers,
        };
        Kernel::from_parts(decls, insts, spans, roots)
    }

    /// A copy with other roots (instructions unchanged).
    pub fn with_roots(&self, r: KernelRoots) -> Kernel {
        let decls = KernelDecls {
            name: self.name.clone(),
            schedule: self.schedule,
            params: self.params.clone(),
            buffers: self.buffers.clone(),
        };
        Kernel::from_parts(decls, self.insts.clone(), self.spans.clone(), r)
    }
}
