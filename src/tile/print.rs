//! The text form of the loop IR (`attnc emit --stage tile`).
//!
//! Deterministic: values are numbered in creation order, floats print so
//! they round-trip, and nothing depends on addresses or paths. Each value
//! prints as `vN = op operands [if GUARD] : type` inside the loop level
//! that computes it.

use std::fmt;

use super::ir::*;
use crate::sema::Dim;

fn dims(d: &[Dim]) -> String {
    d.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Kernel {
    fn write_inst(&self, f: &mut fmt::Formatter<'_>, indent: &str, v: ValueId) -> fmt::Result {
        let inst = self.inst(v);
        write!(f, "{indent}{v} = ")?;
        match &inst.op {
            Op::IConst(i) => write!(f, "iconst {i}")?,
            Op::FConst(x) => write!(f, "fconst {x:?}")?,
            Op::BConst(b) => write!(f, "bconst {b}")?,
            Op::Var(var) => write!(f, "var {}", var.name())?,
            Op::Shape(s) => write!(f, "shape {}", s.name())?,
            Op::TileScore => write!(f, "tile_score")?,
            Op::Unary(op, a) => write!(
                f,
                "{} {a}",
                match op {
                    UnOp::INeg => "ineg",
                    UnOp::FNeg => "fneg",
                    UnOp::Not => "bnot",
                    UnOp::INot => "inot",
                }
            )?,
            Op::Binary(op, a, b) => write!(f, "{} {a}, {b}", op.name())?,
            Op::Cmp(op, a, b) => {
                let p = if self.inst(*a).ty == Ty::F32 {
                    "fcmp"
                } else {
                    "icmp"
                };
                write!(f, "{p}.{} {a}, {b}", op.name())?
            }
            Op::Select(c, a, b) => write!(f, "select {c}, {a}, {b}")?,
            Op::Call(func, a) => write!(f, "{} {a}", func.name())?,
            Op::IToF(a) => write!(f, "itof {a}")?,
            Op::FToI(a) => write!(f, "ftoi {a}")?,
            Op::BToI(a) => write!(f, "btoi {a}")?,
            Op::Load {
                buffer,
                indices,
                checked,
            } => {
                let idx = indices
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                let kind = if *checked { "load.checked" } else { "load" };
                write!(f, "{kind} {}[{idx}]", self.buffers[*buffer as usize].name)?
            }
            Op::Ancestor { parent, i, j } => write!(
                f,
                "ancestor.checked {}, {i}, {j}",
                self.buffers[*parent as usize].name
            )?,
        }
        if let Some(g) = inst.guard {
            write!(f, " if {g}")?;
        }
        write!(f, " : {}", inst.ty)?;
        if inst.section == Section::Full
            && matches!(inst.level, Level::Call | Level::Head | Level::Row)
        {
            write!(f, "    ; only for query tiles with FULL tiles")?;
        }
        writeln!(f)
    }

    fn write_level(
        &self,
        f: &mut fmt::Formatter<'_>,
        indent: &str,
        level: Level,
        section: Option<Section>,
    ) -> fmt::Result {
        for (i, inst) in self.insts.iter().enumerate() {
            let in_section = match section {
                None => true,
                Some(s) => inst.section.runs_in(s),
            };
            if inst.level == level && in_section {
                self.write_inst(f, indent, ValueId(i as u32))?;
            }
        }
        Ok(())
    }

    /// Whether any value is computed at `level` for the given loop.
    fn has_level(&self, level: Level, section: Section) -> bool {
        self.insts
            .iter()
            .any(|i| i.level == level && i.section.runs_in(section))
    }
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.schedule;
        let d = s.dim.map_or("D".to_string(), |d| d.to_string());
        writeln!(f, "; attnc tile IR of `{}`", self.name)?;
        writeln!(
            f,
            "; schedule: bq={} bkv={} dim={} exp={}",
            s.tiling.bq,
            s.tiling.bkv,
            s.dim.map_or("generic".to_string(), |d| d.to_string()),
            if s.exp2 { "exp2" } else { "exp" }
        )?;
        if !self.params.is_empty() {
            let p = self
                .params
                .iter()
                .map(|(n, v)| format!("{n} = {v}"))
                .collect::<Vec<_>>()
                .join(", ");
            writeln!(f, "; params: {p}")?;
        }
        writeln!(
            f,
            "kernel @{}(q: f32[B, H, Q, {d}], k: f32[B|1, HKV, KV, {d}], v: f32[B|1, HKV, KV, {d}]) -> (out: f32[B, H, Q, {d}], lse: f32[B, H, Q]) {{",
            self.name
        )?;
        for (i, b) in self.buffers.iter().enumerate() {
            writeln!(f, "    buffer{i} {}: {}[{}]", b.name, b.elem, dims(&b.dims))?;
        }
        writeln!(f, "  call:")?;
        self.write_level(f, "    ", Level::Call, None)?;
        writeln!(f, "    scale = {}", self.scale)?;
        writeln!(f, "    q_prescale = {}", self.q_prescale)?;
        for (name, list) in [
            ("effects.full", &self.effects_full),
            ("effects.partial", &self.effects_partial),
        ] {
            if !list.is_empty() {
                let l = list
                    .iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                writeln!(f, "    {name} = {l}   ; evaluated even where unused")?;
            }
        }
        use super::nest::{Finish, Grid, KvSource, RowMap, Step};
        let bkv = s.tiling.bkv;
        match self.nest.grid {
            Grid::QueryTiles { bq } => {
                writeln!(
                    f,
                    "  grid b in 0..B, h in 0..H, qt in 0..ceil(Q / {bq}) parallel:"
                )?;
                writeln!(f, "    head:")?;
                self.write_level(f, "      ", Level::Head, None)?;
                writeln!(f, "    q_tile = load_q b, h, qt")?;
            }
            Grid::KvHeads { rows } => {
                writeln!(
                    f,
                    "  grid b in 0..B, kh in 0..HKV, chunk in 0..splits parallel:"
                )?;
                writeln!(f, "    head:")?;
                self.write_level(f, "      ", Level::Head, None)?;
                writeln!(
                    f,
                    "    q_tile = load_q b, heads kh * (H / HKV) .., all Q rows   ; <= {rows} rows"
                )?;
            }
            Grid::Sequences { rows } => {
                writeln!(f, "  grid b in 0..B, chunk in 0..splits parallel:")?;
                writeln!(f, "    head:")?;
                self.write_level(f, "      ", Level::Head, None)?;
                writeln!(
                    f,
                    "    q_tile = load_q b, every head, all Q rows   ; <= {rows} rows"
                )?;
            }
        }
        writeln!(f, "    m = -inf, l = 0, acc = 0")?;
        match (self.nest.rows, self.nest.grid) {
            (RowMap::OneHead, Grid::QueryTiles { bq }) => writeln!(
                f,
                "    row i (q = q_start(b) + qt * {bq} + i, i < min({bq}, Q - qt * {bq})):"
            )?,
            (RowMap::GqaGroup, _) => writeln!(
                f,
                "    row i (h = kh * (H / HKV) + i / Q, q = q_start(b) + i % Q, i < (H / HKV) * Q):"
            )?,
            (RowMap::AllHeads, _) => writeln!(
                f,
                "    row i (h = i / Q, kh = h / (H / HKV), q = q_start(b) + i % Q, i < H * Q):"
            )?,
            (RowMap::OneHead, Grid::KvHeads { .. } | Grid::Sequences { .. }) => {
                unreachable!("one-head rows have query tiles")
            }
        }
        self.write_level(f, "      ", Level::Row, None)?;
        let kv = match self.nest.kv {
            KvSource::Packed => "[b, h / (H / HKV), kt] (packed)",
            KvSource::PackedBf16 => "[b, h / (H / HKV), kt] (packed bf16 pairs)",
            KvSource::InPlace => "[b, kh, kt] (in place)",
        };
        let exp = if s.exp2 { "exp2" } else { "exp" };
        for &section in self.nest.sections() {
            writeln!(f, "    for kt in {section}(qt):")?;
            for step in &self.nest.steps {
                match step {
                    Step::Qk => writeln!(f, "      s = qk q_tile, k{kv}   ; (q . k) * q_prescale")?,
                    Step::Cols => {
                        if self.has_level(Level::Col, section) {
                            writeln!(
                                f,
                                "      col j (kv = kv_offset + kt * {bkv} + j, j < min({bkv}, kv_len(b) - kt * {bkv})):"
                            )?;
                            self.write_level(f, "        ", Level::Col, Some(section))?;
                        }
                    }
                    Step::Scores => {
                        if self.has_level(Level::Elem, section) {
                            writeln!(f, "      elem.{section} i, j:")?;
                            self.write_level(f, "        ", Level::Elem, Some(section))?;
                        }
                        match (section, self.mask) {
                            (Section::Partial, Some(m)) => {
                                writeln!(f, "      s = select {m}, {}, -inf", self.score_partial)?
                            }
                            (Section::Partial, None) => writeln!(f, "      s = {}", self.score_partial)?,
                            _ => writeln!(f, "      s = {}", self.score_full)?,
                        }
                    }
                    Step::OnlineSoftmax => writeln!(f, "      online_softmax s, m, l, acc   ; m' = max(m, rowmax s), p = {exp}(s - m'), l = l * {exp}(m - m') + rowsum p")?,
                    Step::Pv => {
                        let p = if self.nest.kv == KvSource::PackedBf16 { "bf16(p)" } else { "p" };
                        writeln!(f, "      acc += pv {p}, v{kv}   ; keys with p = 0 skipped where v is not finite")?
                    }
                }
            }
        }
        writeln!(f, "    finish:")?;
        match self.nest.finish {
            Finish::Normalize => {
                let lse = if s.exp2 {
                    "(m + log2(l)) * ln(2)"
                } else {
                    "m + log(l)"
                };
                writeln!(
                    f,
                    "      out = acc / l, lse = {lse}   ; l = 0 and m = -inf: out = 0, lse = -inf"
                )?;
            }
        }
        writeln!(f, "}}")
    }
}
