//! Tile classification: the driver of the analysis.
//!
//! Stage: mask analysis. Consumes a checked [`Spec`], a [`Bound`] problem and
//! a [`Tiling`]; produces [`BlockMaps`].
//!
//! For each query tile, the key tiles are cut into runs by abstract
//! evaluation ([`super::absint`]) over boxes spanning many key tiles:
//! 1. If the box of all remaining key tiles is decided, it is one run.
//! 2. Otherwise the next key tile is decided on its own; if it is decided,
//!    its run is grown as far as the box stays decided with the same class,
//!    starting from a guess taken from the previous query tile's run and
//!    galloping (doubling steps) then bisecting. A run of length L costs
//!    O(log L) evaluations, and O(1) when the previous row's guess is right,
//!    as it is for causal and sliding-window masks.
//! 3. A key tile that is not decided is explored: a few of its elements are
//!    evaluated concretely (corners, centre), then it is split into halves
//!    that are evaluated abstractly, down to leaves of at most [`LEAF`]
//!    elements that are evaluated concretely with [`Evaluator`]. Exploration
//!    stops as soon as a visible and a masked element are found (PARTIAL)...
//! 4. ...except in boxes where evaluation might fail (a read that may be out
//!    of range, a divisor that may be zero): those are always evaluated
//!    element by element, so an error the reference interpreter would hit
//!    while evaluating the mask is reported here too, and every FULL or
//!    EMPTY tile is known to evaluate without error.
//!
//! 5. All of it within a budget of mask evaluations (abstract and concrete,
//!    each weighed by the nodes of the mask: [`MIN_BUDGET`], or a 32nd of
//!    the call's elements if more): past it, every tile left is PARTIAL, so
//!    the kernel masks it element by element, which costs less than deciding
//!    it here (a mask of a hundred thousand nodes, or an XOR of positions the
//!    intervals cannot follow, once took minutes to analyse at sizes the
//!    attention itself computed in a second).
//!
//! Result: within the budget the classification is exact (it equals the
//! element-wise one), and `classify` fails if and only if evaluating the mask
//! at some element of the problem fails. Past it, tiles it did not decide are
//! PARTIAL (a FULL or EMPTY tile is still exact and evaluates without error),
//! and an error in one of them is found by the kernel that masks it.

use crate::bind::Bound;
use crate::sema::eval::{EvalError, Evaluator, Point};
use crate::sema::{Deps, ExprId, Spec};

use super::absint::{Abs, AbsEval, QBox};
use super::map::{AnalysisCounts, BlockMap, BlockMaps, TileClass, Tiling};
use super::summary::Summaries;
use super::MaskError;

/// Boxes of at most this many elements are evaluated element by element.
const LEAF: u128 = 32;

/// The least budget of the analysis, in mask nodes evaluated (see the
/// module docs, item 5): a tenth of a second or so of evaluation.
const MIN_BUDGET: u64 = 1 << 22;

/// Elements of the call per node of the budget past [`MIN_BUDGET`].
const ELEMENTS_PER_BUDGET_NODE: u64 = 32;

/// The nodes of the mask's expression DAG (each counted once, as the
/// evaluators compute a shared node once per box or element).
fn mask_nodes(spec: &Spec, mask: ExprId) -> u64 {
    let mut seen = vec![false; spec.exprs.len()];
    let mut stack = vec![mask];
    let mut n = 0u64;
    while let Some(id) = stack.pop() {
        if std::mem::replace(&mut seen[id.0 as usize], true) {
            continue;
        }
        n += 1;
        stack.extend(spec.expr(id).operands());
    }
    n
}

/// Classifies every (query tile, key tile) of every (b, h) that needs its
/// own map. See the module docs.
pub fn classify(spec: &Spec, bound: &Bound, tiling: Tiling) -> Result<BlockMaps, MaskError> {
    classify_observed(spec, bound, tiling, &mut |_, _| {})
}

/// [`classify`], calling `progress(done, total)` after each query tile of
/// each map (for a progress bar: a mask the symbolic analysis cannot follow
/// is evaluated element by element, and that can take a while).
pub fn classify_observed(
    spec: &Spec,
    bound: &Bound,
    tiling: Tiling,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<BlockMaps, MaskError> {
    let tiling = Tiling::new(tiling.bq, tiling.bkv)?;
    let sh = bound.shapes;
    let q_tiles = sh.q.div_ceil(tiling.bq);
    let kv_tiles = sh.kv.div_ceil(tiling.bkv);
    // Key rows of sequence b, from absolute position `kv_offset`; a ragged
    // batch has one map per sequence (its own lengths and query positions).
    for (axis, n) in [("query", q_tiles), ("key", kv_tiles)] {
        if n > u32::MAX as usize {
            return Err(MaskError::TooManyTiles { axis, tiles: n });
        }
    }
    if (bound.q_offset as i128) + (sh.q as i128) > i64::MAX as i128
        || sh.kv as u128 > i64::MAX as u128
    {
        return Err(MaskError::PositionOverflow {
            q_offset: bound.q_offset,
            q: sh.q,
            kv: sh.kv,
        });
    }
    let deps = spec.mask.map(|m| spec.deps(m)).unwrap_or(Deps::NONE);
    let by_b = deps.contains(Deps::B) || bound.is_ragged();
    let by_h = deps.contains(Deps::H);
    let n_b = if by_b { sh.b } else { 1 };
    let n_h = if by_h { sh.h } else { 1 };
    let mut maps = Vec::with_capacity(n_b * n_h);
    let mut counts = AnalysisCounts::default();
    let mut fallback = Vec::new();
    match spec.mask {
        None => {
            for b in 0..n_b {
                let n = bound.kv_len(b);
                let mut m = BlockMap::with_capacity(tiling, sh.q, n, bound.q_start(b));
                let kv_tiles = n.div_ceil(tiling.bkv);
                for _ in 0..q_tiles {
                    m.push_row((kv_tiles > 0).then_some((0, kv_tiles as u32, TileClass::Full)));
                }
                maps.push(m.with_kv_offset(bound.kv_offset));
            }
        }
        Some(mask) => {
            let elements: u64 = (0..n_b)
                .map(|b| (sh.q as u64).saturating_mul(bound.kv_len(b) as u64))
                .fold(0u64, u64::saturating_add)
                .saturating_mul(n_h as u64);
            let mut c = Classifier {
                mask,
                tiling,
                q_len: sh.q,
                kv_len: sh.kv,
                q_offset: bound.q_offset,
                kv_offset: bound.kv_offset,
                abs: AbsEval::new(spec, sh, &bound.buffers),
                ev: Evaluator::new(spec, sh, &bound.buffers),
                sums: Summaries::new(&bound.buffers),
                b: 0,
                h: 0,
                single: None,
                element_evaluations: 0,
                fallback: vec![0; spec.exprs.len()],
                cost: mask_nodes(spec, mask),
                budget: MIN_BUDGET.max(elements / ELEMENTS_PER_BUDGET_NODE),
                given_up: 0,
            };
            let total = (n_b * n_h * q_tiles) as u64;
            for b in 0..n_b {
                c.kv_len = bound.kv_len(b);
                c.q_offset = bound.q_start(b);
                for h in 0..n_h {
                    let done = ((b * n_h + h) * q_tiles) as u64;
                    maps.push(c.map(b as i64, h as i64, &mut |qt| {
                        progress(done + qt as u64 + 1, total)
                    })?);
                }
            }
            counts = AnalysisCounts {
                box_evaluations: c.abs.evaluations(),
                element_evaluations: c.element_evaluations,
                given_up_tiles: c.given_up,
            };
            let mut by: Vec<(ExprId, u64)> = c
                .fallback
                .iter()
                .enumerate()
                .filter(|&(_, &n)| n > 0)
                .map(|(i, &n)| (ExprId(i as u32), n))
                .collect();
            by.sort_by_key(|&(id, n)| (std::cmp::Reverse(n), id.0));
            fallback = by;
        }
    }
    debug_assert!(maps.iter().all(BlockMap::is_complete));
    Ok(BlockMaps {
        b: sh.b,
        h: sh.h,
        tiling,
        by_b,
        by_h,
        maps,
        counts,
        fallback,
    })
}

/// The class a decided abstract result gives a box.
fn decided_class(a: &Abs) -> Option<TileClass> {
    a.decided()
        .map(|v| if v { TileClass::Full } else { TileClass::Empty })
}

/// A run of key tiles `start..end` of one class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seg {
    start: u32,
    end: u32,
    class: TileClass,
}

/// Whether a visible and a masked element have been seen in a tile.
#[derive(Default)]
struct Witness {
    visible: bool,
    masked: bool,
}

impl Witness {
    fn both(&self) -> bool {
        self.visible && self.masked
    }

    fn record(&mut self, v: bool) {
        if v {
            self.visible = true;
        } else {
            self.masked = true;
        }
    }
}

struct Classifier<'a> {
    mask: ExprId,
    tiling: Tiling,
    q_len: usize,
    kv_len: usize,
    q_offset: i64,
    kv_offset: i64,
    abs: AbsEval<'a>,
    ev: Evaluator<'a>,
    sums: Summaries<'a>,
    b: i64,
    h: i64,
    /// The last single-tile evaluation of the current query tile.
    single: Option<(u32, Abs)>,
    element_evaluations: u64,
    /// Per sub-expression of the mask, the elements evaluated one by one in
    /// boxes it left undecided ([`AbsEval::culprit`]).
    fallback: Vec<u64>,
    /// Nodes of the mask: what one evaluation costs against the budget.
    cost: u64,
    /// Mask nodes the analysis may still evaluate (module docs, item 5).
    budget: u64,
    /// Tiles left PARTIAL, undecided, when the budget ran out.
    given_up: u64,
}

impl<'a> Classifier<'a> {
    /// Charges one evaluation of the mask (over a box or at an element).
    fn spend(&mut self) {
        self.budget = self.budget.saturating_sub(self.cost);
    }

    /// Whether the budget is spent: every tile left is PARTIAL.
    fn exhausted(&self) -> bool {
        self.budget == 0
    }

    /// An abstract evaluation of the mask over `bx`, charged.
    fn eval_box(&mut self, bx: QBox) -> Abs {
        self.spend();
        self.abs.eval(self.mask, bx, &mut self.sums)
    }

    fn map(
        &mut self,
        b: i64,
        h: i64,
        progress: &mut dyn FnMut(usize),
    ) -> Result<BlockMap, EvalError> {
        self.b = b;
        self.h = h;
        self.abs.set_head(b, h);
        let mut map = BlockMap::with_capacity(self.tiling, self.q_len, self.kv_len, self.q_offset);
        let mut prev: Vec<Seg> = Vec::new();
        let mut cur: Vec<Seg> = Vec::new();
        for qt in 0..map.q_tiles() {
            self.sums.next_row();
            cur.clear();
            self.row(qt, map.kv_tiles() as u32, &prev, &mut cur)?;
            map.push_row(cur.iter().map(|s| (s.start, s.end, s.class)));
            std::mem::swap(&mut prev, &mut cur);
            progress(qt);
        }
        Ok(map.with_kv_offset(self.kv_offset))
    }

    /// The box of query tile `qt` and key tiles `ka..kb`.
    fn tile_box(&self, qt: usize, ka: u32, kb: u32) -> QBox {
        let r0 = qt * self.tiling.bq;
        let r1 = ((qt + 1) * self.tiling.bq).min(self.q_len) - 1;
        let k0 = ka as usize * self.tiling.bkv;
        let k1 = (kb as usize * self.tiling.bkv).min(self.kv_len) - 1;
        QBox {
            q0: r0 as i64 + self.q_offset,
            q1: r1 as i64 + self.q_offset,
            k0: k0 as i64 + self.kv_offset,
            k1: k1 as i64 + self.kv_offset,
        }
    }

    /// Abstract evaluation of the mask over key tiles `ka..kb` of query tile
    /// `qt`; single-tile results are remembered for [`Self::single_tile`].
    fn eval_tiles(&mut self, qt: usize, ka: u32, kb: u32) -> Abs {
        let bx = self.tile_box(qt, ka, kb);
        let a = self.eval_box(bx);
        if kb == ka + 1 {
            self.single = Some((ka, a));
        }
        a
    }

    /// The abstract result of key tile `kt` alone, reusing the last
    /// single-tile evaluation of this query tile.
    fn single_tile(&mut self, qt: usize, kt: u32) -> Abs {
        match self.single {
            Some((k, a)) if k == kt => a,
            _ => self.eval_tiles(qt, kt, kt + 1),
        }
    }

    /// Whether key tiles `ka..kb` are decided with class `class`.
    fn chunk_holds(&mut self, qt: usize, ka: u32, kb: u32, class: TileClass) -> bool {
        decided_class(&self.eval_tiles(qt, ka, kb)) == Some(class)
    }

    /// Cuts the key tiles of query tile `qt` into runs.
    ///
    /// A run of class `c` grows chunk by chunk: the union of boxes that are
    /// each decided with class `c` is decided with class `c`, and a smaller
    /// box evaluates at least as precisely. The first chunk is guessed from
    /// the previous query tile's run at the same key tile; then chunks of
    /// 1, 2, 4, ... tiles are tried, and the first that fails is bisected.
    fn row(
        &mut self,
        qt: usize,
        n: u32,
        prev: &[Seg],
        out: &mut Vec<Seg>,
    ) -> Result<(), EvalError> {
        self.single = None;
        let mut a = 0u32;
        let mut hint = 0usize;
        let push = |out: &mut Vec<Seg>, s: Seg| match out.last_mut() {
            Some(l) if l.class == s.class && l.end == s.start && s.class != TileClass::Partial => {
                l.end = s.end
            }
            _ => out.push(s),
        };
        while a < n {
            if self.exhausted() {
                // One PARTIAL run per tile, as the kernel walks them.
                for t in a..n {
                    push(
                        out,
                        Seg {
                            start: t,
                            end: t + 1,
                            class: TileClass::Partial,
                        },
                    );
                }
                self.given_up += u64::from(n - a);
                return Ok(());
            }
            let first = self.single_tile(qt, a);
            let Some(class) = decided_class(&first) else {
                let class = self.explore_tile(qt, a, first)?;
                push(
                    out,
                    Seg {
                        start: a,
                        end: a + 1,
                        class,
                    },
                );
                a += 1;
                continue;
            };
            while hint < prev.len() && prev[hint].end <= a {
                hint += 1;
            }
            let guess = match prev.get(hint) {
                Some(s) if s.start <= a && s.class == class => s.end,
                _ => a + 1,
            };
            let mut good = a + 1;
            if guess > good && self.chunk_holds(qt, good, guess, class) {
                good = guess;
            }
            let mut step = 1u32;
            while good < n {
                let end = good.saturating_add(step).min(n);
                if self.chunk_holds(qt, good, end, class) {
                    good = end;
                    step = step.saturating_mul(2);
                    continue;
                }
                // `good..end` fails: keep its longest prefix that holds.
                let mut bad = end;
                while bad - good > 1 {
                    let mid = good + (bad - good) / 2;
                    if self.chunk_holds(qt, good, mid, class) {
                        good = mid;
                    } else {
                        bad = mid;
                    }
                }
                break;
            }
            push(
                out,
                Seg {
                    start: a,
                    end: good,
                    class,
                },
            );
            a = good;
        }
        Ok(())
    }

    fn eval_at(&mut self, q: i64, kv: i64) -> Result<bool, EvalError> {
        self.element_evaluations += 1;
        self.spend();
        self.ev.eval_bool(
            self.mask,
            Point {
                b: self.b,
                h: self.h,
                q,
                kv,
                score: 0.0,
            },
        )
    }

    /// Classifies one key tile that abstract evaluation did not decide.
    fn explore_tile(&mut self, qt: usize, kt: u32, top: Abs) -> Result<TileClass, EvalError> {
        let bx = self.tile_box(qt, kt, kt + 1);
        let mut w = Witness::default();
        if !top.may_fail {
            // Cheap witnesses first: the corners and the centre.
            let (qm, km) = (bx.q0 + (bx.q1 - bx.q0) / 2, bx.k0 + (bx.k1 - bx.k0) / 2);
            for (q, kv) in [
                (bx.q1, bx.k0),
                (bx.q0, bx.k1),
                (bx.q0, bx.k0),
                (bx.q1, bx.k1),
                (qm, km),
            ] {
                if self.exhausted() {
                    break;
                }
                let v = self.eval_at(q, kv)?;
                w.record(v);
                if w.both() {
                    return Ok(TileClass::Partial);
                }
            }
        }
        if !self.exhausted() {
            // The sub-expression that left the tile undecided (the box is
            // evaluated again: the memo may hold a later box by now).
            self.eval_box(bx);
            let culprit = self.abs.culprit(self.mask).unwrap_or(self.mask);
            self.explore(bx, top.may_fail, culprit, &mut w)?;
        }
        if self.exhausted() && !w.both() {
            // Stopped before it was decided (or just as it was: no matter).
            self.given_up += 1;
            return Ok(TileClass::Partial);
        }
        Ok(match (w.visible, w.masked) {
            (true, true) => TileClass::Partial,
            (true, false) => TileClass::Full,
            (false, true) => TileClass::Empty,
            (false, false) => unreachable!("a tile holds at least one element"),
        })
    }

    /// Looks for witnesses in `bx`, whose abstract evaluation gave
    /// `may_fail`, undecided because of `culprit`; explores every element of
    /// boxes that may fail.
    fn explore(
        &mut self,
        bx: QBox,
        may_fail: bool,
        culprit: ExprId,
        w: &mut Witness,
    ) -> Result<(), EvalError> {
        if (!may_fail && w.both()) || self.exhausted() {
            return Ok(());
        }
        if bx.size() <= LEAF {
            for q in bx.q0..=bx.q1 {
                for kv in bx.k0..=bx.k1 {
                    if self.exhausted() {
                        return Ok(());
                    }
                    self.fallback[culprit.0 as usize] += 1;
                    let v = self.eval_at(q, kv)?;
                    w.record(v);
                    if !may_fail && w.both() {
                        return Ok(());
                    }
                }
            }
            return Ok(());
        }
        let halves = if bx.q1 - bx.q0 >= bx.k1 - bx.k0 {
            let m = bx.q0 + (bx.q1 - bx.q0) / 2;
            [QBox { q1: m, ..bx }, QBox { q0: m + 1, ..bx }]
        } else {
            let m = bx.k0 + (bx.k1 - bx.k0) / 2;
            [QBox { k1: m, ..bx }, QBox { k0: m + 1, ..bx }]
        };
        let results = halves.map(|h| {
            let a = self.eval_box(h);
            (h, a, self.abs.culprit(self.mask).unwrap_or(culprit))
        });
        // Decided halves give witnesses at once; then the others.
        let mut rest = Vec::with_capacity(2);
        for (h, a, c) in results {
            match a.decided() {
                Some(v) => w.record(v),
                None => rest.push((h, a.may_fail, c)),
            }
        }
        for (h, mf, c) in rest {
            self.explore(h, mf, c, w)?;
        }
        Ok(())
    }
}
