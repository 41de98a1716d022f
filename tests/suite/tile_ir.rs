//! The loop IR: snapshots of its text form, the verifier after every pass,
//! and the IR interpreter against the reference interpreter.

use crate::support::common;

use attnc::bind::bind;
use attnc::mask::{classify, Tiling};
use attnc::tile::{self, opt, Schedule};
use attnc::SourceFile;

fn spec_of(path: &std::path::Path) -> attnc::sema::Spec {
    attnc::load(SourceFile::read(path).unwrap(), &Default::default())
        .unwrap()
        .spec
}

#[test]
fn tile_ir_of_every_example_under_two_schedules() {
    insta::glob!("../../examples", "*.attn", |path| {
        let spec = spec_of(path);
        let mut text = String::new();
        for schedule in [
            Schedule::default(),
            Schedule {
                tiling: attnc::mask::Tiling { bq: 32, bkv: 128 },
                dim: Some(128),
                exp2: true,
                ..Schedule::default()
            },
        ] {
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
    insta::glob!("../specs", "*.attn", |path| {
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
    let load = |name: &str| {
        tile::lower(
            &spec_of(&common::root().join("tests/specs").join(name)),
            &Schedule::default(),
        )
        .to_string()
    };
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
    // Strength reduction: shifts and masks for powers of two, a high
    // multiply for 3; no division is left.
    let t = load("strength_reduce.attn");
    assert!(
        t.contains("ishr") && t.contains("iand") && t.contains("umulhi"),
        "{t}"
    );
    assert!(!t.contains("idiv") && !t.contains("irem"), "{t}");
    // Other constant divisors: the sign trick (ixor) where the dividend may
    // be negative ((q - kv) % 3 per element, (q - 50) / 7 per row), none for
    // q / 100 (row level), a plain multiply for kv % 12 / 5 (column level,
    // the dividend bounded by 11).
    let t = load("divide_by_constant.attn");
    assert!(!t.contains("idiv") && !t.contains("irem"), "{t}");
    let partial = &t[t.find("for kt in partial").unwrap()..];
    let row = &t[t.find("row i").unwrap()..t.find("for kt in full").unwrap()];
    let col = &partial[partial.find("col j").unwrap()..partial.find("elem.partial").unwrap()];
    let elem = &partial[partial.find("elem.partial").unwrap()..];
    assert_eq!(row.matches("umulhi").count(), 2, "{t}");
    assert_eq!(row.matches("ixor").count(), 2, "{t}");
    assert!(col.contains("imul") && !col.contains("ixor"), "{t}");
    assert!(elem.contains("umulhi") && elem.contains("ixor"), "{t}");
    // Bounds: the guarded table read is unchecked, doc[q] stays checked.
    let t = load("bounds_guarded.attn");
    assert!(
        t.contains("= load table[") && t.contains("load.checked doc["),
        "{t}"
    );
    let t = load("bounds_clamp.attn");
    assert!(!t.contains("load.checked"), "{t}");
}

/// Runs the IR interpreter on a fixture with the given tiling.
fn interp_case(case: &common::Case, bq: usize, bkv: usize, dim: bool) -> attnc::Outputs {
    let program = case.program();
    let inputs = case.inputs();
    let bound = bind(&program.spec, &inputs).unwrap();
    let schedule = Schedule {
        tiling: attnc::mask::Tiling { bq, bkv },
        dim: dim.then_some(bound.shapes().d),
        exp2: true,
        ..Schedule::default()
    };
    let kernel = tile::lower(&program.spec, &schedule);
    let maps = classify(&program.spec, &bound, Tiling::new(bq, bkv).unwrap()).unwrap();
    tile::interp::run(&kernel, &inputs, &bound, &maps)
        .unwrap_or_else(|e| panic!("{}: {e}", case.name))
}

#[test]
fn interpreter_matches_reference_on_every_fixture_and_tiling() {
    for dir in common::fixture_dirs() {
        let case = common::load_case(&dir);
        let reference = case.program().run_reference(&case.inputs()).unwrap();
        let lse = reference.lse.clone().unwrap();
        for (bq, bkv, dim) in [
            (64, 64, true),
            (16, 16, false),
            (7, 13, true),
            (32, 128, false),
            (1, 1, true),
        ] {
            let got = interp_case(&case, bq, bkv, dim);
            common::assert_close(
                &format!("{} bq={bq} bkv={bkv}", case.name),
                &got,
                &reference.out,
                &lse,
                1e-5,
            );
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

/// Deterministic pseudo-random data for a buffer declaration.
fn buffer_data(
    decl: &attnc::sema::Buffer,
    shapes: &attnc::sema::eval::Shapes,
    seed: &mut u64,
) -> attnc::BufferData {
    let shape: Vec<usize> = shapes.buffer_shape(decl).unwrap();
    let n: usize = shape.iter().product();
    let mut next = || {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 33) as u32
    };
    let v: Vec<u32> = (0..n).map(|_| next()).collect();
    let shape = ndarray::IxDyn(&shape);
    match decl.elem {
        attnc::sema::Type::Int => attnc::BufferData::Int(
            ndarray::ArrayD::from_shape_vec(shape, v.iter().map(|x| (x % 8) as i64).collect())
                .unwrap(),
        ),
        attnc::sema::Type::Float => attnc::BufferData::Float(
            ndarray::ArrayD::from_shape_vec(
                shape,
                v.iter().map(|x| (*x % 1000) as f32 / 500.0 - 1.0).collect(),
            )
            .unwrap(),
        ),
        attnc::sema::Type::Bool => attnc::BufferData::Bool(
            ndarray::ArrayD::from_shape_vec(shape, v.iter().map(|x| x % 3 != 0).collect()).unwrap(),
        ),
    }
}

#[test]
fn focused_specs_agree_with_reference_on_random_inputs() {
    use ndarray::Array4;
    insta::glob!("../specs", "*.attn", |path| {
        let program = attnc::load(SourceFile::read(path).unwrap(), &Default::default()).unwrap();
        for (b, h, hkv, q_len, kv_len, offset) in [(1, 2, 1, 100, 100, 0), (2, 2, 2, 37, 70, 20)] {
            let d = 8;
            let mut seed = 7u64;
            let mut rnd = |n: usize| -> Vec<f32> {
                (0..n)
                    .map(|_| {
                        seed = seed
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
                    })
                    .collect()
            };
            let q = Array4::from_shape_vec((b, h, q_len, d), rnd(b * h * q_len * d)).unwrap();
            let k = Array4::from_shape_vec((b, hkv, kv_len, d), rnd(b * hkv * kv_len * d)).unwrap();
            let v = Array4::from_shape_vec((b, hkv, kv_len, d), rnd(b * hkv * kv_len * d)).unwrap();
            let shapes = attnc::sema::eval::Shapes {
                b,
                h,
                hkv,
                q: q_len,
                // `KV` is the end of the call's positions.
                kv: kv_len.max(offset as usize + q_len),
                d,
            };
            let mut inputs = attnc::Inputs::new(q.view(), k.view(), v.view())
                .q_offset(offset)
                .with_lse();
            let mut bseed = 11u64;
            for decl in &program.spec.buffers {
                inputs
                    .buffers
                    .insert(decl.name.clone(), buffer_data(decl, &shapes, &mut bseed));
            }
            let reference = program.run_reference(&inputs);
            for (bq, bkv) in [(64, 64), (16, 8), (5, 7)] {
                let got = program.run_interp(&inputs, attnc::mask::Tiling { bq, bkv });
                match (&reference, &got) {
                    (Ok(r), Ok(g)) => common::assert_close(
                        &format!("{} {bq}x{bkv}", path.display()),
                        g,
                        &r.out,
                        r.lse.as_ref().unwrap(),
                        1e-5,
                    ),
                    // The same first error, word for word.
                    (Err(r), Err(g)) if r.to_string() == g.to_string() => {}
                    (r, g) => panic!(
                        "{} {bq}x{bkv}: reference {:?} but interpreter {:?}",
                        path.display(),
                        r.as_ref().map(|_| "ok").map_err(|e| e.to_string()),
                        g.as_ref().map(|_| "ok").map_err(|e| e.to_string())
                    ),
                }
            }
        }
    });
}

/// The loop nest (`attnc emit --stage nest`) under two schedules: what every
/// backend lowers around the instructions. Every kernel has the forward nest
/// today; a new grid, K/V source or walk shows up here first.
/// The decode kernel of a spec whose score mod reads a per-head buffer: `h`
/// is a row-level value (each row of a GQA-grouped tile has its own head),
/// so the slope is read per row, not once per task.
/// The decode kernels: the GQA group of a KV head in one tile
/// (`decode_kernel_text`), and every head of a sequence for a paged pool
/// (`paged_decode_kernel_text`); either way `h` is row-level.
#[test]
fn decode_kernel_text() {
    let spec = spec_of(&common::root().join("examples/alibi.attn"));
    for (name, rows, bq, bkv) in [
        ("decode_kernel_text", tile::nest::RowMap::GqaGroup, 16, 32),
        (
            "paged_decode_kernel_text",
            tile::nest::RowMap::AllHeads,
            32,
            16,
        ),
    ] {
        let schedule = Schedule {
            tiling: attnc::mask::Tiling { bq, bkv },
            rows,
            kv: tile::nest::KvSource::InPlace,
            ..Schedule::default()
        };
        let k = tile::lower(&spec, &schedule);
        let h = k
            .insts
            .iter()
            .find(|i| i.op == tile::Op::Var(attnc::sema::Var::H))
            .expect("the slope is read at h");
        assert_eq!(h.level, tile::Level::Row);
        insta::assert_snapshot!(name, k.to_string());
    }
}

#[test]
fn loop_nest_text() {
    let spec = spec_of(&common::root().join("examples/causal.attn"));
    let mut text = String::new();
    for schedule in [
        Schedule::default(),
        Schedule {
            tiling: attnc::mask::Tiling { bq: 128, bkv: 32 },
            dim: None,
            exp2: false,
            ..Schedule::default()
        },
        // Decode: the GQA group of a KV head in one tile, K/V read in place.
        Schedule {
            rows: tile::nest::RowMap::GqaGroup,
            kv: tile::nest::KvSource::InPlace,
            ..Schedule::default()
        },
        // Decode on a paged pool: every head of a sequence in one tile.
        Schedule {
            rows: tile::nest::RowMap::AllHeads,
            kv: tile::nest::KvSource::InPlace,
            ..Schedule::default()
        },
        // Prefill with bf16 q, k and v: products on bf16 pairs.
        Schedule {
            kv: tile::nest::KvSource::PackedBf16,
            ..Schedule::default()
        },
    ] {
        let k = tile::lower(&spec, &schedule);
        assert_eq!(k.nest, tile::LoopNest::forward(&schedule));
        text.push_str(&k.nest.to_string());
        text.push('\n');
    }
    insta::assert_snapshot!(text);
}
