//! The reference interpreter: the oracle every compiled backend is tested against.
//!
//! Consumes a checked [`Spec`] and bound inputs, produces `out` and `lse`.
//! It follows FlexAttention's semantics directly, in f64, with no tiling:
//! for each (b, h, query row) it computes `s = q·k × scale` for every key,
//! evaluates the mask, applies the score mod where the mask allows, and takes
//! the softmax over the visible keys. Memory is O(KV) per query row.
//!
//! The score mod is evaluated only where the mask is true, so a score mod
//! never reads a buffer on a masked position. A row whose visible scores are
//! all `-inf` (or that sees no key) gets `out = 0` and `lse = -inf`.

use ndarray::{Array3, Array4};

use crate::bind::{Bound, Inputs, Outputs};
use crate::sema::eval::{EvalError, Evaluator, Point};
use crate::sema::Spec;

/// Runs `spec` on inputs bound by `bind` (the bound of these very inputs:
/// the driver's `run_reference` makes it), calling `progress(rows done, rows
/// in all)` after every (batch, head), for a caller that shows progress (the
/// reference is slow: O(Q x KV x D) in f64 on one thread).
pub(crate) fn run_observed(
    spec: &Spec,
    inputs: &Inputs<'_>,
    bound: &Bound,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Outputs, EvalError> {
    let sh = bound.shapes;
    let mut ev = Evaluator::new(spec, sh, &bound.buffers);
    let scale = scale(spec, &mut ev, bound)?;
    let mut out = Array4::<f32>::zeros((sh.b, sh.h, sh.q, sh.d));
    let mut lse = Array3::<f32>::from_elem((sh.b, sh.h, sh.q), f32::NEG_INFINITY);
    // A row of scores per key of the longest sequence (not `sh.kv`, the end
    // of the positions, which counts the key offset).
    let mut scores = vec![f64::NEG_INFINITY; bound.key_rows()];
    let mut acc = vec![0f64; sh.d];
    for b in 0..sh.b {
        let n = bound.kv_len(b);
        for h in 0..sh.h {
            let kh = bound.kv_head(h);
            for row in 0..sh.q {
                let at = (b, h, row);
                row_scores(
                    spec,
                    &mut ev,
                    inputs,
                    bound,
                    scale,
                    at,
                    spec.score,
                    Some(&mut scores[..n]),
                )?;
                let scores = &scores[..n];
                // NaN if any score is NaN (`f64::max` would skip it), so NaN
                // reaches out and lse instead of passing for a masked row.
                let m = scores.iter().fold(f64::NEG_INFINITY, |m, &s| {
                    if m.is_nan() || s.is_nan() {
                        f64::NAN
                    } else {
                        m.max(s)
                    }
                });
                if m == f64::NEG_INFINITY {
                    continue; // out stays 0, lse stays -inf
                }
                acc.iter_mut().for_each(|a| *a = 0.0);
                let mut sum = 0f64;
                for (kv, &s) in scores.iter().enumerate() {
                    let p = (s - m).exp();
                    if p == 0.0 {
                        continue;
                    }
                    sum += p;
                    for (d, a) in acc.iter_mut().enumerate() {
                        *a += p * f64::from(inputs.v.get(bound.kv_index(b, kh, kv, d)));
                    }
                }
                for (d, a) in acc.iter().enumerate() {
                    out[[b, h, row, d]] = (a / sum) as f32;
                }
                lse[[b, h, row]] = (m + sum.ln()) as f32;
            }
            let heads_done = (b * sh.h + h + 1) as u64;
            progress(heads_done * sh.q as u64, (sh.b * sh.h * sh.q) as u64);
        }
    }
    Ok(Outputs {
        out,
        lse: inputs.want_lse.then_some(lse),
    })
}

/// The scale of a call: the spec's, or `1 / sqrt(D)`.
fn scale(spec: &Spec, ev: &mut Evaluator<'_>, bound: &Bound) -> Result<f64, EvalError> {
    match spec.scale {
        Some(s) => ev.eval_constant(s),
        None => Ok(1.0 / (bound.shapes.d as f64).sqrt()),
    }
}

/// Evaluates one query row, key by key (the sequence's keys `0 .. kv_len(b)`,
/// at absolute positions from `kv_offset`): the mask, then (where it holds)
/// the score `q·k × scale` and `score_mod`. With `scores`, writes each key's
/// final score (`-inf` where masked); without, only evaluates, for
/// [`first_error`].
#[allow(clippy::too_many_arguments)]
fn row_scores(
    spec: &Spec,
    ev: &mut Evaluator<'_>,
    inputs: &Inputs<'_>,
    bound: &Bound,
    scale: f64,
    (b, h, row): (usize, usize, usize),
    score_mod: Option<crate::sema::ExprId>,
    mut scores: Option<&mut [f64]>,
) -> Result<(), EvalError> {
    let kh = bound.kv_head(h);
    for kv in 0..bound.kv_len(b) {
        let point = Point {
            b: b as i64,
            h: h as i64,
            q: row as i64 + bound.q_start(b),
            kv: kv as i64 + bound.kv_offset,
            score: 0.0,
        };
        let visible = match spec.mask {
            Some(m) => ev.eval_bool(m, point)?,
            None => true,
        };
        if !visible {
            if let Some(s) = scores.as_deref_mut() {
                s[kv] = f64::NEG_INFINITY;
            }
            continue;
        }
        if scores.is_none() && score_mod.is_none() {
            continue;
        }
        let mut dot = 0f64;
        for d in 0..bound.shapes.d {
            dot += f64::from(inputs.q[[b, h, row, d]])
                * f64::from(inputs.k.get(bound.kv_index(b, kh, kv, d)));
        }
        let s = dot * scale;
        let s = match score_mod {
            Some(id) => ev.eval_float(id, Point { score: s, ..point })?,
            None => s,
        };
        if let Some(out) = scores.as_deref_mut() {
            out[kv] = s;
        }
    }
    Ok(())
}

/// The error [`run_observed`] reports for these inputs, if any: the first in the order
/// of `b`, `h`, row and `kv`. The tiled backends evaluate in another order (and
/// in parallel); when one of them fails, the driver asks this for the error to
/// report, so every backend names the same element. Evaluates only what can
/// fail: the mask, and the score mod where it holds a read, `ancestor` or an
/// integer division.
pub(crate) fn first_error(spec: &Spec, inputs: &Inputs<'_>, bound: &Bound) -> Option<EvalError> {
    let sh = bound.shapes;
    let mut ev = Evaluator::new(spec, sh, &bound.buffers);
    let scale = match scale(spec, &mut ev, bound) {
        Ok(s) => s,
        Err(e) => return Some(e),
    };
    let score_mod = spec.score.filter(|id| spec.may_trap()[id.0 as usize]);
    for b in 0..sh.b {
        for h in 0..sh.h {
            for row in 0..sh.q {
                let at = (b, h, row);
                if let Err(e) = row_scores(spec, &mut ev, inputs, bound, scale, at, score_mod, None)
                {
                    return Some(e);
                }
            }
        }
    }
    None
}
