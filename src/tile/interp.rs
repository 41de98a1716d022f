//! The loop-IR interpreter (`--backend interp`).
//!
//! Executes a [`Kernel`] directly, tile by tile, in f32 with the same
//! online-softmax arithmetic a compiled kernel uses: each level's values are
//! computed in their own loop (call, head, row, column, element), FULL tiles
//! skip the mask, PARTIAL tiles apply it, EMPTY tiles are never visited. It
//! proves the lowering and the optimisations right before native code exists.

use ndarray::{Array3, Array4};

use super::ir::*;
use super::nest::{Finish, Grid, KvSource, RowMap, Step};
use crate::bind::{Bound, Inputs, Outputs};
use crate::buffer::BufferData;
use crate::mask::BlockMaps;
use crate::sema::eval::{floor_div, floor_mod, EvalError, Point, Shapes};
use crate::sema::{Func, Var};

/// A scalar value of the loop IR.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scalar {
    I(i64),
    F(f32),
    B(bool),
}

impl Scalar {
    pub fn zero(ty: Ty) -> Scalar {
        match ty {
            Ty::I64 => Scalar::I(0),
            Ty::F32 => Scalar::F(0.0),
            Ty::Bool => Scalar::B(false),
        }
    }

    pub fn i(self) -> i64 {
        match self {
            Scalar::I(i) => i,
            s => unreachable!("verified IR: expected i64, found {s:?}"),
        }
    }

    pub fn f(self) -> f32 {
        match self {
            Scalar::F(x) => x,
            s => unreachable!("verified IR: expected f32, found {s:?}"),
        }
    }

    pub fn b(self) -> bool {
        match self {
            Scalar::B(b) => b,
            s => unreachable!("verified IR: expected bool, found {s:?}"),
        }
    }
}

/// The high 64 bits of the unsigned product of the bit patterns of `a` and `b`.
pub fn umulhi(a: i64, b: i64) -> i64 {
    ((u128::from(a as u64) * u128::from(b as u64)) >> 64) as u64 as i64
}

/// Evaluates an op that reads no index, shape, tile or buffer: the
/// arithmetic shared by the interpreter and constant folding. `None` for
/// other ops, for integer division by zero and for a checked shift by a
/// count outside `0..=63`.
pub fn eval_pure(op: &Op, get: impl Fn(ValueId) -> Scalar) -> Option<Scalar> {
    use Scalar::*;
    Some(match op {
        Op::IConst(i) => I(*i),
        Op::FConst(x) => F(*x),
        Op::BConst(b) => B(*b),
        Op::Unary(UnOp::INeg, a) => I(get(*a).i().wrapping_neg()),
        Op::Unary(UnOp::FNeg, a) => F(-get(*a).f()),
        Op::Unary(UnOp::Not, a) => B(!get(*a).b()),
        Op::Unary(UnOp::INot, a) => I(!get(*a).i()),
        Op::Binary(op, a, b) => {
            let (x, y) = (get(*a), get(*b));
            match op {
                BinOp::IAdd => I(x.i().wrapping_add(y.i())),
                BinOp::ISub => I(x.i().wrapping_sub(y.i())),
                BinOp::IMul => I(x.i().wrapping_mul(y.i())),
                BinOp::IDiv => I(floor_div(x.i(), y.i())?),
                BinOp::IRem => I(floor_mod(x.i(), y.i())?),
                BinOp::IShr => I(x.i() >> y.i()),
                BinOp::IAnd => I(x.i() & y.i()),
                BinOp::IXor => I(x.i() ^ y.i()),
                BinOp::IOr => I(x.i() | y.i()),
                BinOp::IShl => I(x.i() << crate::sema::eval::shift_count(y.i())?),
                BinOp::ISar => I(x.i() >> crate::sema::eval::shift_count(y.i())?),
                BinOp::IMulHiU => I(umulhi(x.i(), y.i())),
                BinOp::IMin => I(x.i().min(y.i())),
                BinOp::IMax => I(x.i().max(y.i())),
                BinOp::FAdd => F(x.f() + y.f()),
                BinOp::FSub => F(x.f() - y.f()),
                BinOp::FMul => F(x.f() * y.f()),
                BinOp::FDiv => F(x.f() / y.f()),
                BinOp::FRem => F(x.f() - y.f() * (x.f() / y.f()).floor()),
                BinOp::FMin => F(x.f().min(y.f())),
                BinOp::FMax => F(x.f().max(y.f())),
                BinOp::And => B(x.b() && y.b()),
                BinOp::Or => B(x.b() || y.b()),
                BinOp::BEq => B(x.b() == y.b()),
                BinOp::BNe => B(x.b() != y.b()),
            }
        }
        Op::Cmp(op, a, b) => {
            let ord = match (get(*a), get(*b)) {
                (I(x), I(y)) => x.partial_cmp(&y),
                (F(x), F(y)) => x.partial_cmp(&y),
                (x, y) => unreachable!("verified IR: comparison of {x:?} and {y:?}"),
            };
            use std::cmp::Ordering::*;
            B(match (op, ord) {
                (_, None) => *op == CmpOp::Ne,
                (CmpOp::Eq, Some(o)) => o == Equal,
                (CmpOp::Ne, Some(o)) => o != Equal,
                (CmpOp::Lt, Some(o)) => o == Less,
                (CmpOp::Le, Some(o)) => o != Greater,
                (CmpOp::Gt, Some(o)) => o == Greater,
                (CmpOp::Ge, Some(o)) => o != Less,
            })
        }
        Op::Select(c, a, b) => {
            if get(*c).b() {
                get(*a)
            } else {
                get(*b)
            }
        }
        Op::Call(Func::Abs, a) => match get(*a) {
            I(i) => I(i.wrapping_abs()),
            F(x) => F(x.abs()),
            B(_) => unreachable!("verified IR: abs of bool"),
        },
        Op::Call(f, a) => {
            let x = get(*a).f();
            F(match f {
                Func::Exp => x.exp(),
                Func::Exp2 => x.exp2(),
                Func::Log => x.ln(),
                Func::Log2 => x.log2(),
                Func::Sqrt => x.sqrt(),
                Func::Rsqrt => 1.0 / x.sqrt(),
                Func::Tanh => x.tanh(),
                Func::Sigmoid => 1.0 / (1.0 + (-x).exp()),
                Func::Floor => x.floor(),
                Func::Ceil => x.ceil(),
                Func::Round => x.round_ties_even(),
                Func::TanhApprox => super::math::tanh_approx(x),
                _ => unreachable!("verified IR: `{}` is lowered to other ops", f.name()),
            })
        }
        Op::IToF(a) => F(get(*a).i() as f32),
        Op::FToI(a) => I(get(*a).f() as i64),
        Op::BToI(a) => I(i64::from(get(*a).b())),
        _ => return None,
    })
}

/// What the element being computed is.
#[derive(Clone, Copy, Default)]
struct Here {
    b: i64,
    h: i64,
    q: i64,
    kv: i64,
    tile_score: f32,
}

struct Machine<'a> {
    k: &'a Kernel,
    shapes: Shapes,
    buffers: &'a [BufferData],
    vals: Vec<Scalar>,
}

impl Machine<'_> {
    fn error_point(here: &Here) -> Point {
        Point {
            b: here.b,
            h: here.h,
            q: here.q,
            kv: here.kv,
            score: 0.0,
        }
    }

    fn span(&self, v: usize) -> miette::SourceSpan {
        self.k.spans[v].unwrap_or_default().into()
    }

    fn read(&self, buffer: u32, index: &[i64], v: usize, here: &Here) -> Result<Scalar, EvalError> {
        let data = &self.buffers[buffer as usize];
        match data.get(index) {
            Some(crate::sema::Value::Int(i)) => Ok(Scalar::I(i)),
            Some(crate::sema::Value::Float(x)) => Ok(Scalar::F(x as f32)),
            Some(crate::sema::Value::Bool(b)) => Ok(Scalar::B(b)),
            None => Err(EvalError::OutOfRange {
                buffer: self.k.buffers[buffer as usize].name.clone(),
                index: index.to_vec(),
                shape: data.shape().to_vec(),
                at: Self::error_point(here),
                span: self.span(v),
            }),
        }
    }

    fn eval(&mut self, v: usize, here: &Here) -> Result<(), EvalError> {
        let inst = &self.k.insts[v];
        if let Some(g) = inst.guard {
            if !self.vals[g.0 as usize].b() {
                self.vals[v] = Scalar::zero(inst.ty);
                return Ok(());
            }
        }
        let vals = &self.vals;
        let get = |x: ValueId| vals[x.0 as usize];
        let result = match &inst.op {
            Op::Var(Var::B) => Scalar::I(here.b),
            Op::Var(Var::H) => Scalar::I(here.h),
            Op::Var(Var::Q) => Scalar::I(here.q),
            Op::Var(Var::Kv) => Scalar::I(here.kv),
            Op::Shape(s) => Scalar::I(self.shapes.get(*s) as i64),
            Op::TileScore => Scalar::F(here.tile_score),
            Op::Load {
                buffer, indices, ..
            } => {
                let idx: Vec<i64> = indices.iter().map(|i| get(*i).i()).collect();
                // Unchecked loads are proven in range; reading through the
                // checked path anyway keeps the interpreter safe if a proof were wrong.
                self.read(*buffer, &idx, v, here)?
            }
            Op::Ancestor { parent, i, j } => {
                let (i, j) = (get(*i).i(), get(*j).i());
                let mut found = i == j;
                if !found {
                    let len = self.buffers[*parent as usize].len();
                    let mut x = i;
                    let mut steps = 0;
                    loop {
                        x = self.read(*parent, &[x], v, here)?.i();
                        if x < 0 {
                            break;
                        }
                        if x == j {
                            found = true;
                            break;
                        }
                        steps += 1;
                        if steps > len {
                            return Err(EvalError::AncestorCycle {
                                buffer: self.k.buffers[*parent as usize].name.clone(),
                                start: i,
                                span: self.span(v),
                            });
                        }
                    }
                }
                Scalar::B(found)
            }
            op => eval_pure(op, get).ok_or_else(|| match op {
                Op::Binary(b, _, y) if b.is_checked_shift() => EvalError::ShiftOutOfRange {
                    count: self.vals[y.0 as usize].i(),
                    at: Self::error_point(here),
                    span: self.span(v),
                },
                _ => EvalError::DivisionByZero {
                    at: Self::error_point(here),
                    span: self.span(v),
                },
            })?,
        };
        self.vals[v] = result;
        Ok(())
    }

    /// Evaluates every instruction of `level` that the given loop runs.
    fn run_level(&mut self, level: Level, section: Section, here: &Here) -> Result<(), EvalError> {
        self.run_where(level, |s| s.runs_in(section), here)
    }

    /// Evaluates the instructions of `level` whose section passes `pick`.
    fn run_where(
        &mut self,
        level: Level,
        pick: impl Fn(Section) -> bool,
        here: &Here,
    ) -> Result<(), EvalError> {
        for v in 0..self.k.insts.len() {
            let inst = &self.k.insts[v];
            if inst.level == level && pick(inst.section) {
                self.eval(v, here)?;
            }
        }
        Ok(())
    }

    fn ids_at(&self, level: Level) -> Vec<usize> {
        (0..self.k.insts.len())
            .filter(|&v| self.k.insts[v].level == level)
            .collect()
    }
}

/// Runs the kernel on bound inputs, walking the given block maps.
pub fn run(
    k: &Kernel,
    inputs: &Inputs<'_>,
    bound: &Bound,
    maps: &BlockMaps,
) -> Result<Outputs, EvalError> {
    let sh = bound.shapes;
    let (bq, bkv) = (k.schedule.tiling.bq, k.schedule.tiling.bkv);
    if let Some(d) = k.schedule.dim {
        assert_eq!(d, sh.d, "the kernel is specialised on D = {d}");
    }
    let mut m = Machine {
        k,
        shapes: sh,
        buffers: &bound.buffers,
        vals: vec![Scalar::I(0); k.insts.len()],
    };
    let mut out = Array4::<f32>::zeros((sh.b, sh.h, sh.q, sh.d));
    let mut lse = Array3::<f32>::from_elem((sh.b, sh.h, sh.q), f32::NEG_INFINITY);
    let here0 = Here::default();
    let not_full = |s: Section| s != Section::Full;
    let full_only = |s: Section| s == Section::Full;
    m.run_where(Level::Call, not_full, &here0)?;
    let prescale = m.vals[k.q_prescale.0 as usize].f();
    let row_ids = m.ids_at(Level::Row);
    let col_ids = m.ids_at(Level::Col);
    // The tasks of the grid: (b, first head, heads, first query row, rows);
    // a tile's row i is (head, query row) `rows_of(i)`.
    let group = sh.h / sh.hkv;
    let tasks: Vec<(usize, usize, usize, usize, usize)> = match k.nest.grid {
        Grid::QueryTiles { .. } => (0..sh.b)
            .flat_map(|b| (0..sh.h).map(move |h| (b, h)))
            .flat_map(|(b, h)| {
                (0..sh.q.div_ceil(bq)).map(move |qt| (b, h, 1, qt * bq, bq.min(sh.q - qt * bq)))
            })
            .collect(),
        Grid::KvHeads { rows } => {
            assert!(
                group * sh.q <= rows && sh.q <= bq,
                "a GQA-grouped tile holds (H / HKV) x Q <= {rows} rows and one query tile"
            );
            (0..sh.b)
                .flat_map(|b| (0..sh.hkv).map(move |kh| (b, kh * group, group, 0, group * sh.q)))
                .collect()
        }
        Grid::Sequences { rows } => {
            assert!(
                sh.h * sh.q <= rows && sh.q <= bq,
                "a tile of all heads holds H x Q <= {rows} rows and one query tile"
            );
            (0..sh.b).map(|b| (b, 0, sh.h, 0, sh.h * sh.q)).collect()
        }
    };
    for (b, h0, heads, row0, rows) in tasks {
        let q_start = bound.q_start(b);
        let kv_len = bound.kv_len(b);
        // Row i of the tile: its head and query row.
        let row_at = |i: usize| match k.nest.rows {
            RowMap::OneHead => (h0, row0 + i),
            RowMap::GqaGroup | RowMap::AllHeads => (h0 + i / sh.q, i % sh.q),
        };
        let head = Here {
            b: b as i64,
            h: h0 as i64,
            ..here0
        };
        m.run_where(Level::Head, not_full, &head)?;
        let qt = row0 / bq;
        let (full, partial) = maps.group_walk(b, h0..h0 + heads, qt);
        let has_full = !full.is_empty();
        if !has_full && partial.is_empty() {
            continue; // no key visible: out stays 0, lse -inf
        }
        if has_full {
            m.run_where(Level::Call, full_only, &head)?;
            m.run_where(Level::Head, full_only, &head)?;
        }
        // The Q tile; the score is (q·k) × prescale, as the spec writes
        // it and the compiled backends compute it (scaling q first
        // would overflow differently).
        let qs: Vec<Vec<f32>> = (0..rows)
            .map(|i| {
                let (h, r) = row_at(i);
                (0..sh.d).map(|d| inputs.q[[b, h, r, d]]).collect()
            })
            .collect();
        let row_here = |i: usize| {
            let (h, r) = row_at(i);
            Here {
                h: h as i64,
                q: r as i64 + q_start,
                ..head
            }
        };
        // Row-level values, computed once per row.
        let mut row_vals = Vec::with_capacity(rows);
        for i in 0..rows {
            let here = row_here(i);
            m.run_where(Level::Row, not_full, &here)?;
            if has_full {
                m.run_where(Level::Row, full_only, &here)?;
            }
            row_vals.push(row_ids.iter().map(|&v| m.vals[v]).collect::<Vec<_>>());
        }
        let mut mx = vec![f32::NEG_INFINITY; rows];
        let mut l = vec![0f32; rows];
        let mut acc = vec![vec![0f32; sh.d]; rows];
        // The key walk and the steps of the kernel's loop nest.
        let walk: Vec<(usize, Section)> = k
            .nest
            .sections()
            .iter()
            .flat_map(|&section| -> Vec<(usize, Section)> {
                match section {
                    Section::Full => full
                        .iter()
                        .flat_map(|r| r.clone())
                        .map(|kt| (kt as usize, section))
                        .collect(),
                    _ => partial.iter().map(|&kt| (kt as usize, section)).collect(),
                }
            })
            .collect();
        // Both sources read the caller's rows here; they differ in how the
        // compiled backends reach them (packed per call, or in place).
        // Packed bf16 products are exact on bf16 q and k (a product of two
        // bf16 values fits an f32); P is rounded to bf16 for pv.
        let round_p = match k.nest.kv {
            KvSource::Packed | KvSource::InPlace => false,
            KvSource::PackedBf16 => true,
        };
        // Row i reads the KV head of its query head.
        let row_kh: Vec<usize> = (0..rows).map(|i| bound.kv_head(row_at(i).0)).collect();
        let kv_at = |i: usize, j: usize, d: usize| bound.kv_index(b, row_kh[i], j, d);
        for (kt, section) in walk {
            let col0 = kt * bkv;
            let cols = bkv.min(kv_len - col0);
            let kv0 = col0 as i64 + bound.kv_offset;
            let mut col_vals = Vec::with_capacity(cols);
            let mut s = vec![vec![f32::NEG_INFINITY; cols]; rows];
            for step in &k.nest.steps {
                match step {
                    Step::Qk => {
                        for (i, row) in s.iter_mut().enumerate() {
                            for (j, x) in row.iter_mut().enumerate() {
                                let mut dot = 0f32;
                                for (d, &q) in qs[i].iter().enumerate().take(sh.d) {
                                    dot += q * inputs.k.get(kv_at(i, col0 + j, d));
                                }
                                *x = dot * prescale;
                            }
                        }
                    }
                    Step::Cols => {
                        for j in 0..cols {
                            let here = Here {
                                kv: kv0 + j as i64,
                                ..head
                            };
                            m.run_level(Level::Col, section, &here)?;
                            col_vals.push(col_ids.iter().map(|&v| m.vals[v]).collect::<Vec<_>>());
                        }
                    }
                    Step::Scores => {
                        for (i, row) in s.iter_mut().enumerate() {
                            for (&v, val) in row_ids.iter().zip(&row_vals[i]) {
                                m.vals[v] = *val;
                            }
                            for (j, x) in row.iter_mut().enumerate() {
                                for (&v, val) in col_ids.iter().zip(&col_vals[j]) {
                                    m.vals[v] = *val;
                                }
                                let here = Here {
                                    kv: kv0 + j as i64,
                                    tile_score: *x,
                                    ..row_here(i)
                                };
                                m.run_level(Level::Elem, section, &here)?;
                                *x = match section {
                                    Section::Partial => {
                                        let visible =
                                            k.mask.is_none_or(|mv| m.vals[mv.0 as usize].b());
                                        if visible {
                                            m.vals[k.score_partial.0 as usize].f()
                                        } else {
                                            f32::NEG_INFINITY
                                        }
                                    }
                                    _ => m.vals[k.score_full.0 as usize].f(),
                                };
                            }
                        }
                    }
                    Step::OnlineSoftmax => {
                        online_softmax(&mut s, &mut mx, &mut l, &mut acc, k.schedule.exp2)
                    }
                    Step::Pv => {
                        if round_p {
                            for x in s.iter_mut().flatten() {
                                *x = half::bf16::from_f32(*x).to_f32();
                            }
                        }
                        pv(&s, &mut acc, |i, j, d| inputs.v.get(kv_at(i, col0 + j, d)))
                    }
                }
            }
        }
        let Finish::Normalize = k.nest.finish;
        for i in 0..rows {
            if l[i] == 0.0 && mx[i] == f32::NEG_INFINITY {
                continue; // no key visible: out stays 0, lse -inf
            }
            let (h, r) = row_at(i);
            for d in 0..sh.d {
                out[[b, h, r, d]] = acc[i][d] / l[i];
            }
            lse[[b, h, r]] = if k.schedule.exp2 {
                (mx[i] + l[i].log2()) * std::f32::consts::LN_2
            } else {
                mx[i] + l[i].ln()
            };
        }
    }
    Ok(Outputs {
        out,
        lse: inputs.want_lse.then_some(lse),
    })
}

/// One online-softmax step over a score tile: new running max, rescale of
/// the row sum and accumulator, and `p = exp(s - m)` written over `s`.
fn online_softmax(
    s: &mut [Vec<f32>],
    mx: &mut [f32],
    l: &mut [f32],
    acc: &mut [Vec<f32>],
    exp2: bool,
) {
    let e = |x: f32| if exp2 { x.exp2() } else { x.exp() };
    for (i, row) in s.iter_mut().enumerate() {
        let tile_max = row.iter().copied().fold(f32::NEG_INFINITY, nan_max);
        let m_new = nan_max(mx[i], tile_max);
        if m_new == f32::NEG_INFINITY {
            row.fill(0.0); // nothing visible yet
            continue;
        }
        let alpha = e(mx[i] - m_new);
        l[i] *= alpha;
        for a in acc[i].iter_mut() {
            *a *= alpha;
        }
        for x in row.iter_mut() {
            *x = e(*x - m_new);
            l[i] += *x;
        }
        mx[i] = m_new;
    }
}

/// The larger of `a` and `b`, or NaN if either is (`f32::max` would skip a
/// NaN score and let its row pass for one that sees no key).
fn nan_max(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.max(b)
    }
}

/// `acc += P V` over a tile of probabilities, skipping keys of probability 0
/// (so a NaN or infinite V at a masked key never reaches a row).
fn pv(p: &[Vec<f32>], acc: &mut [Vec<f32>], v: impl Fn(usize, usize, usize) -> f32) {
    for (i, (row, a)) in p.iter().zip(acc.iter_mut()).enumerate() {
        for (j, &pj) in row.iter().enumerate() {
            if pj != 0.0 {
                for (d, x) in a.iter_mut().enumerate() {
                    *x += pj * v(i, j, d);
                }
            }
        }
    }
}
