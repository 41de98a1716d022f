//! The loop IR: snapshots of its text form, the verifier after every pass,
//! and the IR interpreter against the reference interpreter.

mod common;

use attnc::bind::bind;
use attnc::mask::{classify, Tiling};
use attnc::tile::{self, opt, Schedule};
use attnc::SourceFile;

fn spec_of(path: &std::path::Path) -> attnc::sema::Spec {
    attnc::load(SourceFile::read(path).unwrap(), &Default::default()).unwrap().spec
}

#[test]
fn tile_ir_of_every_example_under_two_schedules() {
    insta::glob!("../examples", "*.attn", |path| {
        let spec = spec_of(path);
        let mut text = String::new();
        for schedule in [Schedule::default(), Schedule { bq: 32, bkv: 128, dim: Some(128), exp2: true }] {
            let k = tile::lower(&spec, &schedule);
            tile::verify(&k).unwrap();
            text.push_str(&k.to_string());
            text.push('\n');
        }
        insta::assert_snapshot!(text);
    });
}

#[test]
fn each_pass_on_focused_specs() {
    insta::glob!("specs", "*.attn", |path| {
        let spec = spec_of(path);
        let mut k = tile::build(&spec, &Schedule::default());
        tile::verify(&k).unwrap();
        let mut text = format!("=== built\n{k}");
        for (name, pass) in opt::PASSES {
            let next = pass(&k);
            tile::verify(&next).unwrap_or_else(|e| panic!("{name}: {e}\n{next}"));
            if next != k {
                text.push_str(&format!("=== after {name}\n{next}"));
            } else {
                text.push_str(&format!("=== after {name}: unchanged\n"));
            }
            k = next;
        }
        insta::assert_snapshot!(text);
    });
}

#[test]
fn optimisations_are_visible_in_the_text() {
    let load = |name: &str| tile::lower(&spec_of(&common::root().join("tests/specs").join(name)), &Schedule::default()).to_string();
    // ALiBi slope: a head-level load, no per-element read.
    let t = load("hoist_head.attn");
    let head = &t[t.find("head:").unwrap()..t.find("q_tile").unwrap()];
    assert!(head.contains("load slope["), "{t}");
    // doc[q] at row level, doc[kv] at column level.
    let t = load("hoist_row_col.attn");
    let row = &t[t.find("row i").unwrap()..t.find("for kt in full").unwrap()];
    assert!(row.contains("load.checked doc["), "{t}");
    let partial = &t[t.find("for kt in partial").unwrap()..];
    let col = &partial[partial.find("col j").unwrap()..partial.find("elem.partial").unwrap()];
    assert!(col.contains("load doc["), "{t}");
    // Constants folded: no shape D, window / half + 6 is one constant.
    let t = load("const_fold.attn");
    assert!(t.contains("fconst 0.125"), "{t}");
    assert!(!t.contains("idiv") && !t.contains("shape D"), "{t}");
    // Strength reduction: shifts and masks for powers of two, idiv for 3.
    let t = load("strength_reduce.attn");
    assert!(t.contains("ishr") && t.contains("iand") && t.contains("idiv"), "{t}");
    // Bounds: the guarded table read is unchecked, doc[q] stays checked.
    let t = load("bounds_guarded.attn");
    assert!(t.contains("= load table[") && t.contains("load.checked doc["), "{t}");
    let t = load("bounds_clamp.attn");
    assert!(!t.contains("load.checked"), "{t}");
}

/// Runs the IR interpreter on a fixture with the given tiling.
fn interp_case(case: &common::Case, bq: usize, bkv: usize, dim: bool) -> attnc::Outputs {
    let program = case.program();
    let inputs = case.inputs();
    let bound = bind(&program.spec, &inputs).unwrap();
    let schedule = Schedule { bq, bkv, dim: dim.then_some(bound.shapes.d), exp2: true };
    let kernel = tile::lower(&program.spec, &schedule);
    let maps = classify(&program.spec, &bound, Tiling::new(bq, bkv).unwrap()).unwrap();
    tile::interp::run(&kernel, &inputs, &bound, &maps).unwrap_or_else(|e| panic!("{}: {e}", case.name))
}

#[test]
fn interpreter_matches_reference_on_every_fixture_and_tiling() {
    for dir in common::fixture_dirs() {
        let case = common::load_case(&dir);
        let reference = case.program().run_reference(&case.inputs()).unwrap();
        let lse = reference.lse.clone().unwrap();
        for (bq, bkv, dim) in [(64, 64, true), (16, 16, false), (7, 13, true), (32, 128, false), (1, 1, true)] {
            let got = interp_case(&case, bq, bkv, dim);
            common::assert_close(&format!("{} bq={bq} bkv={bkv}", case.name), &got, &reference.out, &lse, 1e-5);
        }
    }
}

#[test]
fn interpreter_matches_flex_attention() {
    for dir in common::fixture_dirs() {
        let case = common::load_case(&dir);
        let got = interp_case(&case, 16, 32, true);
        common::assert_close(&case.name, &got, &case.out, &case.lse, 1e-5);
    }
}
