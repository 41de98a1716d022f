//! Lowering and compiling stay linear in the size of the spec.
//!
//! Lets used in the condition and both branches of an `if`, level after
//! level, were once lowered as a tree (3^n copies); lets with range-checked
//! reads still are lowered once per guard they need, so these specs cover
//! both the pure and the trapping forms. Every spec also runs on every CPU
//! backend against the reference, so sharing never changes what is computed
//! or which read is checked.

use attnc::codegen::clif::GemmImpl;
use attnc::tile::Schedule;
use attnc::{BufferData, Inputs, SourceFile};

/// `x_i = if x_{i-1} > 0.5 { x_{i-1} * 0.5 } else { x_{i-1} + 1.0 }`.
fn pure_chain(n: usize) -> String {
    let mut s = String::from("attention a {\n    let x0 = float(kv) * 0.1\n");
    for i in 1..=n {
        let p = i - 1;
        s += &format!("    let x{i} = if x{p} > 0.5 {{ x{p} * 0.5 }} else {{ x{p} + 1.0 }}\n");
    }
    s + &format!("    mask = x{n} < 100.0\n    score = score + x{n}\n}}\n")
}

/// The same with a checked read in the condition and a branch.
fn read_chain(n: usize) -> String {
    let mut s = String::from("attention a {\n    buffer t[KV]: int\n    let x0 = kv\n");
    for i in 1..=n {
        let p = i - 1;
        s +=
            &format!("    let x{i} = if t[x{p} % KV] > 0 {{ t[x{p} % KV] }} else {{ x{p} + 1 }}\n");
    }
    s + &format!("    mask = x{n} >= 0\n    score = score + float(x{n} % 3)\n}}\n")
}

/// A let read in both branches of an `if` whose condition does not use it.
fn both_branches(n: usize) -> String {
    let mut s = String::from("attention a {\n    buffer t[KV]: int\n    let x0 = kv\n");
    for i in 1..=n {
        let p = i - 1;
        s += &format!(
            "    let x{i} = if q > {i} {{ t[x{p} % KV] }} else {{ t[(x{p} + 1) % KV] }}\n"
        );
    }
    s + &format!("    mask = x{n} >= 0\n}}\n")
}

fn instructions(text: &str) -> usize {
    let program = attnc::load(SourceFile::new("s.attn", text), &Default::default()).unwrap();
    program.kernel(&Schedule::default()).insts.len()
}

#[test]
fn chains_of_conditional_lets_lower_to_linear_size() {
    for (name, make) in [
        ("pure", pure_chain as fn(usize) -> String),
        ("reads", read_chain),
        ("both branches", both_branches),
    ] {
        let (small, large) = (instructions(&make(10)), instructions(&make(40)));
        // Four times the lets, at most about four times the instructions.
        assert!(
            large <= 5 * small,
            "{name}: 10 levels lower to {small} instructions, 40 levels to {large}"
        );
    }
}

#[test]
fn shared_lets_compute_what_the_reference_computes() {
    for text in [pure_chain(12), read_chain(12), both_branches(12)] {
        let program = attnc::load(SourceFile::new("s.attn", &*text), &Default::default()).unwrap();
        let mut rng = attnc::bench::Rng::new(3);
        let (q, k) = (rng.array4((1, 2, 40, 8)), rng.array4((1, 2, 70, 8)));
        // Positive and non-positive entries, so both branches run.
        let t =
            ndarray::Array1::from_shape_fn(70, |i| [(i * 7 % 70) as i64, 0, -1][i % 3]).into_dyn();
        let mut inputs = Inputs::new(q.view(), k.view(), k.view()).with_lse();
        if !program.spec.buffers.is_empty() {
            inputs = inputs.buffer("t", BufferData::Int(t));
        }
        let want = program.run_reference(&inputs).unwrap();
        let interp = program
            .run_interp(&inputs, attnc::mask::Tiling { bq: 16, bkv: 16 })
            .unwrap();
        let jit = program
            .compile_jit(attnc::mask::Tiling { bq: 16, bkv: 16 }, GemmImpl::detect())
            .unwrap()
            .run(&inputs)
            .unwrap();
        for got in [interp, jit] {
            for (g, w) in got.out.iter().zip(want.out.iter()) {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{g} vs {w}\n{text}"
                );
            }
        }
    }
}

#[test]
fn thousands_of_independent_lets_compile() {
    // 2000 score-level lets summed in a balanced tree, and 2000 column-level
    // ones: every let is one value, and only the values another loop level
    // reads are kept in scratch (storing all of them made register allocation
    // superlinear: minutes for 4000 lets).
    for base in ["score", "float(kv)"] {
        let mut s = String::from("attention a {\n");
        let mut names: Vec<String> = (0..2000)
            .map(|i| {
                s += &format!("    let x{i} = {base} * 1.{i:04} + {}.0\n", i % 7);
                format!("x{i}")
            })
            .collect();
        let mut level = 0;
        while names.len() > 1 {
            names = names
                .chunks(2)
                .enumerate()
                .map(|(j, pair)| match pair {
                    [a, b] => {
                        s += &format!("    let s{level}_{j} = {a} + {b}\n");
                        format!("s{level}_{j}")
                    }
                    [a] => a.clone(),
                    _ => unreachable!(),
                })
                .collect();
            level += 1;
        }
        s += &format!("    score = score + {} * 0.0001\n}}\n", names[0]);
        let program = attnc::load(SourceFile::new("s.attn", &*s), &Default::default()).unwrap();
        let mut rng = attnc::bench::Rng::new(4);
        let q = rng.array4((1, 1, 20, 16));
        let inputs = Inputs::new(q.view(), q.view(), q.view()).with_lse();
        let want = program.run_reference(&inputs).unwrap();
        let got = program
            .compile_jit(attnc::mask::Tiling { bq: 16, bkv: 16 }, GemmImpl::detect())
            .unwrap()
            .run(&inputs)
            .unwrap();
        for (g, w) in got.out.iter().zip(want.out.iter()) {
            assert!(
                (g - w).abs() <= 1e-3 * (1.0 + w.abs()),
                "{base}: {g} vs {w}"
            );
        }
    }
}
