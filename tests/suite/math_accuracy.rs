//! The math functions on every backend against f64 (std and libm): each is
//! run as a score mod `score = f(x[q])` over one key, so the log-sum-exp of
//! each row is the function's value; the same pipeline on `score = x[q]`
//! (the value rounded to f32 in the reference) measures what the pipeline
//! itself adds. The bounds are the table of docs/language.md plus that.

use crate::support::{ptx_emu::Approx, ptx_run};
use attnc::runtime::device::Dtype;
use attnc::runtime::gemm::math::ulp_error as ulps;
use attnc::{BufferData, Inputs, SourceFile};
use ndarray::{Array1, Array4};

/// Runs `f` on the program `score = expr` (buffers `x`, `y` of Q floats)
/// and inputs of Q rows over one key.
fn with_inputs<R>(
    expr: &str,
    xs: &[f32],
    ys: &[f32],
    f: impl FnOnce(&attnc::Program, &Inputs<'_>) -> R,
) -> R {
    let src = format!(
        "attention f {{\n    buffer x[Q]: float\n    buffer y[Q]: float\n    score = {expr}\n}}\n"
    );
    let program =
        attnc::load(SourceFile::new("f.attn", src.as_str()), &Default::default()).unwrap();
    let q = Array4::<f32>::zeros((1, 1, xs.len(), 4));
    let kv = Array4::<f32>::zeros((1, 1, 1, 4));
    let buf = |v: &[f32]| BufferData::Float(Array1::from_vec(v.to_vec()).into_dyn());
    let inputs = Inputs::new(q.view(), kv.view(), kv.view())
        .with_lse()
        .buffer("x", buf(xs))
        .buffer("y", buf(ys));
    f(&program, &inputs)
}

fn lse(o: attnc::Outputs) -> Vec<f32> {
    o.lse.unwrap().iter().copied().collect()
}

/// The log-sum-exp rows of `score = expr` on one key, per backend: jit,
/// tile interpreter, PTX emulated (f32, SFU errors at their bounds).
fn rows(expr: &str, xs: &[f32], ys: &[f32], gpu: bool) -> Vec<(&'static str, Vec<f32>)> {
    with_inputs(expr, xs, ys, |program, inputs| {
        let mut out = vec![
            (
                "jit",
                lse(program
                    .compile_jit_with(&Default::default())
                    .unwrap()
                    .run(inputs)
                    .unwrap()),
            ),
            (
                "interp",
                lse(program
                    .run_interp(inputs, attnc::mask::Tiling { bq: 64, bkv: 16 })
                    .unwrap()),
            ),
        ];
        if gpu {
            let schedule = attnc::codegen::ptx::schedule(4, Dtype::F32);
            let o = ptx_run::emulate_with(
                &program.spec,
                &schedule,
                Dtype::F32,
                inputs,
                Approx::Scattered,
            )
            .unwrap();
            out.push(("ptx", lse(o)));
        }
        out
    })
}

/// The log-sum-exp rows of the reference interpreter (f64, rounded).
fn reference_rows(expr: &str, xs: &[f32], ys: &[f32]) -> Vec<f32> {
    with_inputs(expr, xs, ys, |program, inputs| {
        lse(program.run_reference(inputs).unwrap())
    })
}

/// Max ulps per backend of `expr` against `exact`, and of the identity
/// pipeline on the exact values rounded to f32.
fn measure(
    expr: &str,
    xs: &[f32],
    ys: &[f32],
    exact: impl Fn(f64, f64) -> f64,
    gpu: bool,
) -> Vec<(&'static str, f64, f64)> {
    let want: Vec<f64> = xs
        .iter()
        .zip(ys)
        .map(|(&x, &y)| exact(x as f64, y as f64))
        .collect();
    let rounded: Vec<f32> = want.iter().map(|&w| w as f32).collect();
    let got = rows(expr, xs, ys, gpu);
    let base = rows("x[q]", &rounded, ys, gpu);
    got.into_iter()
        .zip(base)
        .map(|((name, g), (_, b))| {
            let worst = |v: &[f32]| {
                v.iter()
                    .zip(&want)
                    .map(|(&g, &w)| ulps(g, w))
                    .fold(0.0, f64::max)
            };
            let (e, e0) = (worst(&g), worst(&b));
            eprintln!("{expr:28} {name:6}: {e:8.2} ulp (pipeline alone {e0:.2})");
            (name, e, e0)
        })
        .collect()
}

/// The rows of `expr` on every backend (PTX emulated included), each
/// asserted to [`agrees`] with the reference's at the rows `i` where
/// `compare(i)`.
fn agree_with_reference(
    expr: &str,
    xs: &[f32],
    ys: &[f32],
    compare: impl Fn(usize) -> bool,
) -> Vec<(&'static str, Vec<f32>)> {
    let want = reference_rows(expr, xs, ys);
    let got = rows(expr, xs, ys, true);
    for (name, g) in &got {
        for i in (0..xs.len()).filter(|&i| compare(i)) {
            assert!(
                agrees(g[i], want[i]),
                "{name}: {expr} at x = {}, y = {} is {} but the reference says {}",
                xs[i],
                ys[i],
                g[i],
                want[i]
            );
        }
    }
    got
}

/// NaN, infinities and zeros exactly; other values within the error the
/// GPU's approximate exp2/log2 leave in a row's log-sum-exp.
fn agrees(g: f32, w: f32) -> bool {
    (g.is_nan() && w.is_nan())
        || g == w
        || (w.is_finite() && w != 0.0 && ((g - w) / w).abs() <= 1e-5)
}

fn sweep(lo: f32, hi: f32, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| lo + (hi - lo) * i as f32 / (n - 1) as f32)
        .collect()
}

#[test]
fn math_functions_meet_their_documented_bounds_on_every_backend() {
    let n = 2048;
    let zeros = vec![0.0f32; n];
    // (expr, inputs x, y, exact, bound on the CPU backends, bound on the GPU)
    type Case = (
        &'static str,
        Vec<f32>,
        Vec<f32>,
        fn(f64, f64) -> f64,
        f64,
        f64,
    );
    let cases: Vec<Case> = vec![
        (
            "sin(x[q])",
            sweep(-100.0, 100.0, n),
            zeros.clone(),
            |x, _| x.sin(),
            2.0,
            2.0,
        ),
        (
            "cos(x[q])",
            sweep(-100.0, 100.0, n),
            zeros.clone(),
            |x, _| x.cos(),
            2.0,
            2.0,
        ),
        (
            "erf(x[q])",
            sweep(-4.5, 4.5, n),
            zeros.clone(),
            |x, _| libm::erf(x),
            3.0,
            4.0,
        ),
        // On the GPU `tanh.approx.f32`: 2^-10.987 relative, about 8200 ulp.
        (
            "tanh_approx(x[q])",
            sweep(-10.0, 10.0, n),
            zeros.clone(),
            |x, _| x.tanh(),
            6.0,
            8300.0,
        ),
        (
            "sign(x[q])",
            sweep(-2.0, 2.0, n),
            zeros.clone(),
            |x, _| {
                if x > 0.0 {
                    1.0
                } else if x < 0.0 {
                    -1.0
                } else {
                    x
                }
            },
            0.0,
            0.0,
        ),
        // |y · log2 x| <= 16 here.
        (
            "pow(x[q], y[q])",
            sweep(0.1, 8.0, n),
            sweep(-4.0, 4.0, n),
            f64::powf,
            16.0,
            64.0,
        ),
    ];
    let mut failures = Vec::new();
    for (expr, xs, ys, exact, cpu, gpu) in cases {
        // The emulator is slow: a quarter of the points for it.
        for (name, e, e0) in measure(expr, &xs, &ys, exact, false).into_iter().chain(
            measure(expr, &xs[..n / 4], &ys[..n / 4], exact, true)
                .into_iter()
                .filter(|r| r.0 == "ptx"),
        ) {
            let bound = if name == "ptx" { gpu } else { cpu };
            if e > bound + e0 {
                failures.push(format!(
                    "{expr} on {name}: {e:.2} ulp, bound {bound} + pipeline {e0:.2}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn sin_and_cos_keep_an_absolute_error_of_1e_7_up_to_a_million() {
    let xs = sweep(-1.0e6, 1.0e6, 2048);
    // The emulated PTX (slow) on every fourth point: the same f32 operations,
    // its log-sum-exp through the SFU's ex2/lg2.
    let xs4: Vec<f32> = xs.iter().step_by(4).copied().collect();
    for (expr, f) in [
        ("sin(x[q])", f64::sin as fn(f64) -> f64),
        ("cos(x[q])", f64::cos),
    ] {
        for (xs, gpu) in [(&xs, false), (&xs4, true)] {
            let zeros = vec![0.0f32; xs.len()];
            let want: Vec<f64> = xs.iter().map(|&x| f(x as f64)).collect();
            let rounded: Vec<f32> = want.iter().map(|&w| w as f32).collect();
            let worst = |v: &[f32]| {
                v.iter()
                    .zip(&want)
                    .map(|(&g, &w)| (g as f64 - w).abs())
                    .fold(0.0, f64::max)
            };
            let base = rows("x[q]", &rounded, &zeros, gpu);
            for ((name, got), (_, b)) in rows(expr, xs, &zeros, gpu).into_iter().zip(base) {
                if gpu && name != "ptx" {
                    continue;
                }
                let (e, e0) = (worst(&got), worst(&b));
                eprintln!("{expr} {name}: absolute {e:.2e} (pipeline alone {e0:.2e})");
                assert!(
                    e <= 1.1e-7 + e0,
                    "{expr} on {name}: absolute error {e:.2e} past a million"
                );
            }
        }
    }
}

#[test]
fn pow_and_sign_follow_ieee_special_values_on_every_backend() {
    let inf = f32::INFINITY;
    let nan = f32::NAN;
    let xs = [
        -0.0, -0.0, 0.0, -2.0, -2.0, -2.0, -inf, -inf, 1.0, -1.0, nan, 2.0, 0.5, -1.0, 3.0,
    ];
    let ys = [
        3.0, -3.0, -1.0, 3.0, 2.0, 0.5, 3.0, -2.0, nan, inf, 0.0, -inf, inf, 0.5, 1.0,
    ];
    // Rows compare with the reference, whose `pow` is IEEE's (f64): a
    // score of +inf makes a row NaN on every backend and -inf masks it, so
    // `-1 / pow` tells the signed zeros apart.
    for expr in ["pow(x[q], y[q])", "-1.0 / pow(x[q], y[q])"] {
        agree_with_reference(expr, &xs, &ys, |_| true);
    }
    // The reference itself: pow(-0, 3) = -0 gives -1 / -0 = +inf, a NaN row;
    // pow(0, -1) = +inf; pow(-2, 0.5) = NaN; pow(1, NaN) = 1; pow(-1, inf) = 1.
    let r = reference_rows("-1.0 / pow(x[q], y[q])", &xs, &ys);
    assert!(
        r[0].is_nan() && r[2] == 0.0 && r[5].is_nan() && r[8] == -1.0 && r[9] == -1.0,
        "{r:?}"
    );
    // sin and cos: NaN for NaN and ±inf, finite for huge finite x, and
    // sin keeps the sign of zero (-1 / sin(-0) = +inf: a NaN row).
    let xs = [nan, inf, -inf, 1e30, -3e38, -0.0, 0.0, 1e-30];
    for expr in ["sin(x[q])", "cos(x[q])", "-1.0 / sin(x[q])"] {
        // Beyond the reduction's range: finite, and in [-1, 1].
        let huge = |x: f32| x.is_finite() && x.abs() > 1e6;
        let bound = if expr.starts_with("-1.0") {
            f32::MAX
        } else {
            1.0
        };
        for (name, got) in agree_with_reference(expr, &xs, &xs, |i| !huge(xs[i])) {
            for (x, g) in xs.iter().zip(&got).filter(|(x, _)| huge(**x)) {
                assert!(g.abs() <= bound, "{name}: {expr} at {x} is {g}");
            }
        }
    }
    let xs = [-0.0, 0.0, -3.5, 2.0, nan, -inf];
    let want = reference_rows("-1.0 / sign(x[q])", &xs, &xs);
    assert!(
        want[0].is_nan() && want[1] == f32::NEG_INFINITY && want[2] == 1.0 && want[4].is_nan(),
        "{want:?}"
    );
    agree_with_reference("-1.0 / sign(x[q])", &xs, &xs, |_| true);
}
