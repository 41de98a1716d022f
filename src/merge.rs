//! Merging partial attention results over disjoint key ranges.
//!
//! Attention over the union of disjoint key sets `K1, K2, ...` of the same
//! query rows is a weighted average of the results over each set. With `out_i`
//! and `lse_i` (natural log of the softmax denominator) of part `i`:
//!
//! ```text
//! m   = max_i lse_i
//! w_i = e^(lse_i - m)
//! lse = m + ln(Σ_i w_i)
//! out = Σ_i w_i · out_i / Σ_i w_i
//! ```
//!
//! A part whose row saw no key has `out_i = 0`, `lse_i = -inf`, so `w_i = 0`:
//! it contributes nothing (its `out_i` is never read, so it may hold anything).
//! A row that no part saw (every `lse_i = -inf`) stays `out = 0`, `lse = -inf`.
//! A NaN `lse_i` makes the row's `out` and `lse` NaN, as the unsplit call would;
//! so does an `lse_i` of `+inf`, which no call produces (an `lse` is at most
//! the row's largest score plus the log of its number of keys).
//! This is what ring attention, star attention, context parallelism and the
//! key splits of a decode step (flash-decoding) build on.

use ndarray::{Array3, Array4, ArrayView3, ArrayView4};

use crate::bind::Outputs;

/// Merges one row: `parts` yields each part's `out` row and `lse`; writes the
/// merged row to `out` and returns the merged `lse` (see the module docs).
pub(crate) fn merge_row<'a>(
    parts: impl Iterator<Item = (&'a [f32], f32)> + Clone,
    out: &mut [f32],
) -> f32 {
    let m = parts.clone().fold(f32::NEG_INFINITY, |m, (_, l)| {
        if m.is_nan() || l.is_nan() {
            f32::NAN
        } else {
            m.max(l)
        }
    });
    if m.is_nan() {
        out.fill(f32::NAN);
        return f32::NAN;
    }
    out.fill(0.0);
    if m == f32::NEG_INFINITY {
        return m;
    }
    let mut acc = vec![0f64; out.len()];
    let mut sum = 0f64;
    for (o, l) in parts {
        if l == f32::NEG_INFINITY {
            continue;
        }
        let w = (f64::from(l) - f64::from(m)).exp();
        sum += w;
        for (a, &x) in acc.iter_mut().zip(o) {
            *a += w * f64::from(x);
        }
    }
    for (x, a) in out.iter_mut().zip(&acc) {
        *x = (a / sum) as f32;
    }
    (f64::from(m) + sum.ln()) as f32
}

/// Merges the `(out, lse)` pairs of attention calls over disjoint key ranges
/// of the same queries (`out` `[B, H, Q, D]`, `lse` `[B, H, Q]`, natural log)
/// into the `(out, lse)` of their union. See the module docs for the formula
/// and the rule for rows that saw no key.
///
/// ```
/// use attnc::ndarray::{Array3, Array4};
/// // Two halves of the keys of one row; the second half saw nothing.
/// let out1 = Array4::from_elem((1, 1, 1, 2), 0.5f32);
/// let lse1 = Array3::from_elem((1, 1, 1), 1.0f32);
/// let out2 = Array4::zeros((1, 1, 1, 2));
/// let lse2 = Array3::from_elem((1, 1, 1), f32::NEG_INFINITY);
/// let m = attnc::merge_states(&[(out1.view(), lse1.view()), (out2.view(), lse2.view())]).unwrap();
/// assert_eq!(m.out, out1);
/// assert_eq!(m.lse.unwrap(), lse1);
/// ```
pub fn merge_states(
    parts: &[(ArrayView4<'_, f32>, ArrayView3<'_, f32>)],
) -> Result<Outputs, crate::driver::Error> {
    let Some((first, _)) = parts.first() else {
        return Err(crate::driver::Error::Usage(
            "merge_states needs at least one (out, lse) pair".to_string(),
        ));
    };
    let shape = first.shape().to_vec();
    for (i, (o, l)) in parts.iter().enumerate() {
        if o.shape() != shape.as_slice() || l.shape() != &shape[..3] {
            return Err(crate::driver::Error::Usage(format!(
                "merge_states: part {i} has out {:?} and lse {:?}; every out must be {:?} and every lse {:?}",
                o.shape(),
                l.shape(),
                shape,
                &shape[..3]
            )));
        }
    }
    let (b, h, q, d) = (shape[0], shape[1], shape[2], shape[3]);
    let mut out = Array4::<f32>::zeros((b, h, q, d));
    let mut lse = Array3::<f32>::zeros((b, h, q));
    let rows: Vec<Vec<Vec<f32>>> = parts
        .iter()
        .map(|(o, _)| o.rows().into_iter().map(|r| r.to_vec()).collect())
        .collect();
    for (n, ((row, l), (bi, hi, qi))) in out
        .rows_mut()
        .into_iter()
        .zip(lse.iter_mut())
        .zip(row_positions(b, h, q))
        .enumerate()
    {
        let mut row = row;
        let merged = row.as_slice_mut().expect("a fresh array is contiguous");
        let iter = parts
            .iter()
            .zip(&rows)
            .map(|((_, pl), pr)| (pr[n].as_slice(), pl[[bi, hi, qi]]));
        *l = merge_row(iter, merged);
    }
    Ok(Outputs {
        out,
        lse: Some(lse),
    })
}

/// `(b, h, q)` in row-major order.
fn row_positions(b: usize, h: usize, q: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    (0..b).flat_map(move |bi| (0..h).flat_map(move |hi| (0..q).map(move |qi| (bi, hi, qi))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_merge_by_their_weights_and_empty_parts_drop_out() {
        let mut out = [0f32; 2];
        // Equal lse: the plain average, and lse + ln 2.
        let lse = merge_row(
            [(&[1f32, 3.0][..], 0.0), (&[3f32, 5.0][..], 0.0)].into_iter(),
            &mut out,
        );
        assert_eq!(out, [2.0, 4.0]);
        assert!((lse - std::f32::consts::LN_2).abs() < 1e-7);
        // A part that saw nothing holds garbage that is never read.
        let lse = merge_row(
            [
                (&[f32::NAN, 1.0][..], f32::NEG_INFINITY),
                (&[3f32, 5.0][..], 2.0),
            ]
            .into_iter(),
            &mut out,
        );
        assert_eq!((out, lse), ([3.0, 5.0], 2.0));
        // Nothing seen anywhere: 0 and -inf.
        let lse = merge_row(
            [
                (&[9f32, 9.0][..], f32::NEG_INFINITY),
                (&[9f32, 9.0][..], f32::NEG_INFINITY),
            ]
            .into_iter(),
            &mut out,
        );
        assert_eq!((out, lse), ([0.0, 0.0], f32::NEG_INFINITY));
        // NaN propagates.
        let lse = merge_row(
            [(&[1f32, 1.0][..], f32::NAN), (&[3f32, 5.0][..], 2.0)].into_iter(),
            &mut out,
        );
        assert!(lse.is_nan() && out.iter().all(|x| x.is_nan()));
        // So does an lse of +inf, which no call produces.
        let lse = merge_row(
            [(&[1f32, 1.0][..], f32::INFINITY), (&[3f32, 5.0][..], 2.0)].into_iter(),
            &mut out,
        );
        assert!(lse.is_nan() && out.iter().all(|x| x.is_nan()));
    }

    #[test]
    fn mismatched_parts_are_a_usage_error() {
        let o = Array4::<f32>::zeros((1, 1, 2, 4));
        let l = Array3::<f32>::zeros((1, 1, 3));
        let e = merge_states(&[(o.view(), l.view())]).unwrap_err();
        assert!(e.to_string().contains("every lse [1, 1, 2]"), "{e}");
        assert!(merge_states(&[]).is_err());
    }
}
