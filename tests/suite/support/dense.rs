//! Dense brute-force attention over a [`GenCase`], in f64, for comparing
//! attnc's outputs against.
//!
//! For each (b, h) it builds the whole [Q, KV] score matrix: `q·k × scale`,
//! then the mask and the score mod of the case's description (evaluated by
//! [`MaskDesc::eval`] / [`ScoreDesc::eval`], never by attnc), masked keys at
//! `-inf`. Each row then gets a softmax: a row whose scores are all `-inf`
//! (no visible key, or only `-inf` scores) has out = 0 and lse = -inf; a NaN
//! score makes the row's out and lse NaN.
//!
//! Elements are visited in the order attnc's reference visits them (b, h,
//! query row, key; mask before score mod), so when evaluation fails both
//! report the same first failing read.

use ndarray::{Array2, Array3, Array4};

use super::specgen::{At, CaseData, Env, EvalFailure, GenCase};

/// Brute-force outputs.
#[derive(Clone, Debug)]
pub struct Dense {
    /// `[B, H, Q, D]`
    pub out: Array4<f64>,
    /// `[B, H, Q]`, natural log.
    pub lse: Array3<f64>,
}

/// The largest element, or NaN when any element is NaN.
fn nan_max(row: impl Iterator<Item = f64>) -> f64 {
    let mut m = f64::NEG_INFINITY;
    for x in row {
        if x.is_nan() {
            return f64::NAN;
        }
        m = m.max(x);
    }
    m
}

/// The [Q, KV] matrix of final scores of one (b, h): `-inf` where masked.
pub fn score_matrix(
    case: &GenCase,
    data: &CaseData,
    b: usize,
    h: usize,
) -> Result<Array2<f64>, EvalFailure> {
    let s = &case.shapes;
    let spec = &case.spec;
    let env = Env {
        shapes: s,
        buffers: &data.buffers,
    };
    let scale = spec.scale_value(s);
    let kb = if s.kv_batch == 1 { 0 } else { b };
    let kh = h / (s.h / s.hkv);
    let mut scores = Array2::from_elem((s.q, s.kv), f64::NEG_INFINITY);
    for row in 0..s.q {
        for kv in 0..s.kv {
            let at = At {
                b: b as i64,
                h: h as i64,
                q: row as i64 + s.q_offset,
                kv: kv as i64 + s.kv_offset,
            };
            let visible = match &spec.mask {
                Some(m) => m.eval(&env, at)?,
                None => true,
            };
            if !visible {
                continue;
            }
            let dot: f64 = (0..s.d)
                .map(|d| f64::from(data.q[[b, h, row, d]]) * f64::from(data.k[[kb, kh, kv, d]]))
                .sum();
            let scaled = dot * scale;
            scores[[row, kv]] = match &spec.score {
                Some(sm) => sm.eval(&env, at, scaled)?,
                None => scaled,
            };
        }
    }
    Ok(scores)
}

/// Runs the case by brute force.
pub fn attention(case: &GenCase, data: &CaseData) -> Result<Dense, EvalFailure> {
    let s = &case.shapes;
    let mut out = Array4::zeros((s.b, s.h, s.q, s.d));
    let mut lse = Array3::from_elem((s.b, s.h, s.q), f64::NEG_INFINITY);
    for b in 0..s.b {
        let kb = if s.kv_batch == 1 { 0 } else { b };
        for h in 0..s.h {
            let kh = h / (s.h / s.hkv);
            let scores = score_matrix(case, data, b, h)?;
            for row in 0..s.q {
                let m = nan_max(scores.row(row).iter().copied());
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let p: Vec<f64> = scores.row(row).iter().map(|&x| (x - m).exp()).collect();
                let sum: f64 = p.iter().sum();
                for d in 0..s.d {
                    let weighted: f64 = (0..s.kv)
                        .map(|kv| p[kv] * f64::from(data.v[[kb, kh, kv, d]]))
                        .sum();
                    out[[b, h, row, d]] = weighted / sum;
                }
                lse[[b, h, row]] = m + sum.ln();
            }
        }
    }
    Ok(Dense { out, lse })
}

/// Whether `got` (f32) agrees with `want` (f64) within `tol`: NaN only where
/// NaN is expected, infinities equal, finite values within `tol`.
pub fn close(got: f32, want: f64, tol: f64) -> bool {
    let g = f64::from(got);
    if want.is_nan() || g.is_nan() {
        return want.is_nan() && g.is_nan();
    }
    if want.is_infinite() || g.is_infinite() {
        return g == want;
    }
    (g - want).abs() <= tol
}

/// Compares attnc outputs with the brute force; the error names the first
/// differing element.
pub fn compare(got: &attnc::Outputs, want: &Dense, tol: f64) -> Result<(), String> {
    if got.out.shape() != want.out.shape() {
        return Err(format!(
            "out has shape {:?}, expected {:?}",
            got.out.shape(),
            want.out.shape()
        ));
    }
    for (idx, &w) in want.out.indexed_iter() {
        let g = got.out[idx];
        if !close(g, w, tol) {
            return Err(format!("out{idx:?} = {g}, expected {w} (tolerance {tol})"));
        }
    }
    let lse = got
        .lse
        .as_ref()
        .ok_or("lse was requested but not returned")?;
    if lse.shape() != want.lse.shape() {
        return Err(format!(
            "lse has shape {:?}, expected {:?}",
            lse.shape(),
            want.lse.shape()
        ));
    }
    for (idx, &w) in want.lse.indexed_iter() {
        let g = lse[idx];
        if !close(g, w, tol) {
            return Err(format!("lse{idx:?} = {g}, expected {w} (tolerance {tol})"));
        }
    }
    Ok(())
}
