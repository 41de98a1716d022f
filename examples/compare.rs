//! Compares two float32 `.npy` files of the same shape, e.g. an `attnc run`
//! output with a reference output.
//!
//! ```text
//! cargo run --example compare -- GOT.npy EXPECTED.npy [TOLERANCE]
//! ```
//!
//! Prints the shape, the largest absolute difference (equal infinities, such
//! as the `lse = -inf` of rows that see no key, count as equal; a NaN on
//! either side counts as infinitely different) and the number of values
//! differing by more than the tolerance (default 1e-5). Exits 1 when the
//! shapes differ or some value is off by more than the tolerance.

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (got, expected, tolerance) = match args.as_slice() {
        [a, b] => (a, b, 1e-5),
        [a, b, t] => match t.parse::<f32>() {
            Ok(t) if t >= 0.0 => (a, b, t),
            _ => return usage(&format!("the tolerance must be a number >= 0, found `{t}`")),
        },
        _ => return usage("expected two .npy files and an optional tolerance"),
    };
    let read = |path: &str| {
        attnc::npy::read_f32_dyn(Path::new(path)).map_err(|e| {
            eprint!("{}", e.render());
        })
    };
    let (Ok(a), Ok(b)) = (read(got), read(expected)) else {
        return ExitCode::FAILURE;
    };
    if a.shape() != b.shape() {
        let (sa, sb) = (a.shape(), b.shape());
        eprintln!("error: `{got}` has shape {sa:?} but `{expected}` has shape {sb:?}");
        return ExitCode::FAILURE;
    }
    let mut max = 0f32;
    let mut over = 0usize;
    let mut infinite = 0usize;
    for (x, y) in a.iter().zip(b.iter()) {
        let d = if x == y {
            0.0
        } else if x.is_nan() || y.is_nan() {
            f32::INFINITY
        } else {
            (x - y).abs()
        };
        max = max.max(d);
        over += usize::from(d > tolerance);
        infinite += usize::from(x.is_infinite() && x == y);
    }
    let infinities = if infinite > 0 {
        format!(" ({infinite} equal infinities)")
    } else {
        String::new()
    };
    println!("{got} vs {expected}:");
    println!(
        "  shape {:?}, max |diff| = {max:.3e}, {over} of {} values off by more than {tolerance:e}{infinities}",
        a.shape(),
        a.len()
    );
    if over == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("error: {problem}");
    eprintln!("usage: cargo run --example compare -- GOT.npy EXPECTED.npy [TOLERANCE]");
    ExitCode::FAILURE
}
