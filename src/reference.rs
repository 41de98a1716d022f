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

/// Runs `spec` on bound inputs.
pub fn run(spec: &Spec, inputs: &Inputs<'_>, bound: &Bound) -> Result<Outputs, EvalError> {
    let sh = bound.shapes;
    let mut ev = Evaluator::new(spec, sh, &bound.buffers);
    let scale = match spec.scale {
        Some(s) => ev.eval_constant(s)?,
        None => 1.0 / (sh.d as f64).sqrt(),
    };
    let mut out = Array4::<f32>::zeros((sh.b, sh.h, sh.q, sh.d));
    let mut lse = Array3::<f32>::from_elem((sh.b, sh.h, sh.q), f32::NEG_INFINITY);
    let mut scores = vec![f64::NEG_INFINITY; sh.kv];
    let mut acc = vec![0f64; sh.d];
    for b in 0..sh.b {
        let kb = bound.kv_batch_index(b);
        for h in 0..sh.h {
            let kh = bound.kv_head(h);
            for row in 0..sh.q {
                let qpos = row as i64 + bound.q_offset;
                for (kv, s_out) in scores.iter_mut().enumerate() {
                    let point = Point {
                        b: b as i64,
                        h: h as i64,
                        q: qpos,
                        kv: kv as i64,
                        score: 0.0,
                    };
                    let visible = match spec.mask {
                        Some(m) => ev.eval_bool(m, point)?,
                        None => true,
                    };
                    if !visible {
                        *s_out = f64::NEG_INFINITY;
                        continue;
                    }
                    let mut dot = 0f64;
                    for d in 0..sh.d {
                        dot += f64::from(inputs.q[[b, h, row, d]])
                            * f64::from(inputs.k[[kb, kh, kv, d]]);
                    }
                    let s = dot * scale;
                    *s_out = match spec.score {
                        Some(id) => ev.eval_float(id, Point { score: s, ..point })?,
                        None => s,
                    };
                }
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
                        *a += p * f64::from(inputs.v[[kb, kh, kv, d]]);
                    }
                }
                for (d, a) in acc.iter().enumerate() {
                    out[[b, h, row, d]] = (a / sum) as f32;
                }
                lse[[b, h, row]] = (m + sum.ln()) as f32;
            }
        }
    }
    Ok(Outputs {
        out,
        lse: inputs.want_lse.then_some(lse),
    })
}
