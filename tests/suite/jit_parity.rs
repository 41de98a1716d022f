//! The Cranelift backend against the reference interpreter: every fixture,
//! several tilings, both tile-product implementations.

use crate::support::common;

use attnc::codegen::clif::GemmImpl;

fn gemms() -> Vec<GemmImpl> {
    let mut g = vec![GemmImpl::Jit, GemmImpl::detect()];
    g.dedup();
    g
}

#[test]
fn jit_matches_reference_on_every_fixture() {
    for dir in common::fixture_dirs() {
        let case = common::load_case(&dir);
        let program = case.program();
        let reference = program.run_reference(&case.inputs()).unwrap();
        let lse = reference.lse.clone().unwrap();
        for gemm in gemms() {
            for (bq, bkv) in [(64, 64), (16, 16), (7, 32), (1, 16)] {
                let kernel = program
                    .compile_jit(attnc::mask::Tiling { bq, bkv }, gemm)
                    .unwrap();
                let got = kernel
                    .run(&case.inputs())
                    .unwrap_or_else(|e| panic!("{}: {}", case.name, e.render()));
                common::assert_close(
                    &format!("{} {bq}x{bkv} {}", case.name, gemm.name()),
                    &got,
                    &reference.out,
                    &lse,
                    1e-5,
                );
            }
        }
    }
}

#[test]
fn jit_matches_reference_on_focused_specs_with_random_inputs() {
    use ndarray::Array4;
    insta::glob!("../specs", "*.attn", |path| {
        let program =
            attnc::load(attnc::SourceFile::read(path).unwrap(), &Default::default()).unwrap();
        let kernels: Vec<_> = [(64, 64), (5, 16), (32, 48)]
            .into_iter()
            .map(|(bq, bkv)| {
                program
                    .compile_jit(attnc::mask::Tiling { bq, bkv }, GemmImpl::detect())
                    .unwrap()
            })
            .collect();
        for (b, h, hkv, q_len, kv_len, offset, d) in [
            (1, 2, 1, 100, 100, 0, 8),
            (2, 2, 2, 37, 70, 20, 16),
            (1, 1, 1, 7, 3, 0, 5),
        ] {
            let mut rng = attnc::bench::Rng::new(q_len as u64);
            // `KV` is the end of the call's positions.
            let (q, k, v, shapes) = common::random_qkv(
                &mut rng,
                (b, h, hkv, d),
                (b, q_len, kv_len),
                kv_len.max(offset as usize + q_len),
            );
            let mut inputs = attnc::Inputs::new(q.view(), k.view(), v.view())
                .q_offset(offset)
                .with_lse();
            for decl in &program.spec.buffers {
                let recipe = match decl.elem {
                    attnc::sema::Type::Int => "docs:3",
                    attnc::sema::Type::Float => "uniform",
                    attnc::sema::Type::Bool => "bernoulli:0.6",
                };
                let data = attnc::bench::generate_buffer(decl, &shapes, recipe, &mut rng).unwrap();
                inputs.buffers.insert(decl.name.clone(), data);
            }
            let _: &Array4<f32> = &q;
            let reference = program.run_reference(&inputs);
            for kernel in &kernels {
                let got = kernel.run(&inputs);
                match (&reference, &got) {
                    (Ok(r), Ok(g)) => common::assert_close(
                        &format!("{}", path.display()),
                        g,
                        &r.out,
                        r.lse.as_ref().unwrap(),
                        1e-5,
                    ),
                    // The same first error, word for word.
                    (Err(r), Err(g)) if r.to_string() == g.to_string() => {}
                    (r, g) => panic!(
                        "{}: reference {:?} but jit {:?}",
                        path.display(),
                        r.as_ref().map(|_| "ok").map_err(|e| e.to_string()),
                        g.as_ref().map(|_| "ok").map_err(|e| e.to_string())
                    ),
                }
            }
        }
    });
}

#[test]
fn compile_api_plans_and_no_recompilation_across_shapes() {
    let src = "attention docs { buffer doc[KV]: int\n mask = doc[q] == doc[kv] && causal }";
    let kernel = attnc::compile(
        attnc::SourceFile::new("docs.attn", src),
        &attnc::CompileOptions::default(),
    )
    .unwrap();
    let program = attnc::load(
        attnc::SourceFile::new("docs.attn", src),
        &Default::default(),
    )
    .unwrap();
    // One compiled kernel serves several shapes, batches, heads and head dims.
    for (b, h, hkv, n, d) in [(1, 4, 2, 150, 16), (2, 2, 1, 33, 40), (1, 1, 1, 1, 7)] {
        let mut rng = attnc::bench::Rng::new(n as u64);
        let q = rng.array4((b, h, n, d));
        let k = rng.array4((b, hkv, n, d));
        let v = rng.array4((b, hkv, n, d));
        let doc = attnc::BufferData::Int(ndarray::ArrayD::from_shape_fn(vec![n], |i| {
            (i[0] / 40) as i64
        }));
        let inputs = attnc::Inputs::new(q.view(), k.view(), v.view())
            .buffer("doc", doc)
            .with_lse();
        let reference = program.run_reference(&inputs).unwrap();
        let plan = kernel.plan(&inputs).unwrap();
        for _ in 0..2 {
            let got = kernel.run_planned(&inputs, &plan).unwrap();
            common::assert_close(
                "planned",
                &got,
                &reference.out,
                reference.lse.as_ref().unwrap(),
                1e-5,
            );
        }
        // A plan made for other buffers is refused, not silently reused.
        if n <= 10 {
            continue; // both buffers are all zeros
        }
        let other = attnc::BufferData::Int(ndarray::ArrayD::from_shape_fn(vec![n], |i| {
            (i[0] / 10) as i64
        }));
        let changed = attnc::Inputs::new(q.view(), k.view(), v.view()).buffer("doc", other);
        assert!(kernel
            .run_planned(&changed, &plan)
            .unwrap_err()
            .to_string()
            .contains("plan was made for other inputs"));
    }
}

/// A compiled kernel keeps the block maps of its last few problems: the same
/// shapes, offsets and mask buffers reuse them; a changed mask buffer,
/// offset or length builds new ones (and the outputs stay right); a buffer
/// only the score reads, K, V and q do not matter; the cache is bounded.
#[test]
fn block_maps_are_reused_across_calls_of_one_kernel() {
    let src = "attention docs { buffer doc[KV]: int\n buffer bias[H]: float\n \
               mask = doc[q] == doc[kv] && causal\n score = score + bias[h] }";
    let kernel = attnc::compile(
        attnc::SourceFile::new("docs.attn", src),
        &attnc::CompileOptions::default(),
    )
    .unwrap();
    let program = attnc::load(
        attnc::SourceFile::new("docs.attn", src),
        &Default::default(),
    )
    .unwrap();
    let (h, n, d) = (2, 150, 8);
    let mut rng = attnc::bench::Rng::new(3);
    let (q, k, v) = (
        rng.array4((1, h, n, d)),
        rng.array4((1, h, n, d)),
        rng.array4((1, h, n, d)),
    );
    let doc = |w: usize| {
        attnc::BufferData::Int(ndarray::ArrayD::from_shape_fn(vec![n], move |i| {
            (i[0] / w) as i64
        }))
    };
    let bias = |x: f32| attnc::BufferData::Float(ndarray::ArrayD::from_elem(vec![h], x));
    fn with<'a>(
        inputs: attnc::Inputs<'a>,
        doc: attnc::BufferData,
        bias: attnc::BufferData,
    ) -> attnc::Inputs<'a> {
        inputs.buffer("doc", doc).buffer("bias", bias).with_lse()
    }
    // Two query tensors: `which` picks one.
    let qs = [q, rng.array4((1, h, n, d))];
    let inputs = |doc_w: usize, b: f32, which: usize| {
        with(
            attnc::Inputs::new(qs[which].view(), k.view(), v.view()),
            doc(doc_w),
            bias(b),
        )
    };
    let first = kernel.block_maps(&inputs(40, 0.5, 0)).unwrap();
    // Same mask inputs: the same maps, even with other q and score buffers.
    assert!(std::sync::Arc::ptr_eq(
        &first,
        &kernel.block_maps(&inputs(40, 0.5, 0)).unwrap()
    ));
    assert!(std::sync::Arc::ptr_eq(
        &first,
        &kernel.block_maps(&inputs(40, -2.0, 1)).unwrap()
    ));
    // Another document table: other maps, and the run is right.
    let other = kernel.block_maps(&inputs(10, 0.5, 0)).unwrap();
    assert!(!std::sync::Arc::ptr_eq(&first, &other));
    assert_ne!(*first, *other);
    for w in [10, 40] {
        let i = inputs(w, 0.5, 0);
        let want = program.run_reference(&i).unwrap();
        let got = kernel.run(&i).unwrap();
        common::assert_close(
            "cached maps",
            &got,
            &want.out,
            want.lse.as_ref().unwrap(),
            1e-5,
        );
    }
    // Another query offset: other maps.
    let shifted = inputs(40, 0.5, 0).q_offset(0);
    assert!(std::sync::Arc::ptr_eq(
        &first,
        &kernel.block_maps(&shifted).unwrap()
    ));
    let (qs, ks, vs) = (
        rng.array4((1, h, 20, d)),
        rng.array4((1, h, n, d)),
        rng.array4((1, h, n, d)),
    );
    let off = |o: i64| {
        attnc::Inputs::new(qs.view(), ks.view(), vs.view())
            .q_offset(o)
            .buffer("doc", doc(40))
            .buffer("bias", bias(0.5))
    };
    let at_100 = kernel.block_maps(&off(100)).unwrap();
    assert!(!std::sync::Arc::ptr_eq(
        &at_100,
        &kernel.block_maps(&off(120)).unwrap()
    ));
    assert!(std::sync::Arc::ptr_eq(
        &at_100,
        &kernel.block_maps(&off(100)).unwrap()
    ));
    // Bounded: after as many other problems as the cache holds, the first is
    // rebuilt (equal, not the same).
    for w in 0..attnc::driver::MAP_CACHE_ENTRIES {
        kernel.block_maps(&inputs(11 + w, 0.5, 0)).unwrap();
    }
    let again = kernel.block_maps(&inputs(40, 0.5, 0)).unwrap();
    assert!(!std::sync::Arc::ptr_eq(&first, &again));
    assert_eq!(*first, *again);
}

/// A mask buffer that differs only in the sign of a zero is another mask
/// (`1.0 / w > 0.0`): the kernel's map cache compares floats bit for bit; a
/// buffer holding NaN still finds its own entry.
#[test]
fn map_cache_tells_signed_zeros_apart() {
    let src = "attention z { buffer w[KV]: float\n mask = 1.0 / w[kv] > 0.0 }";
    let kernel =
        attnc::compile(attnc::SourceFile::new("z.attn", src), &Default::default()).unwrap();
    let program = attnc::load(attnc::SourceFile::new("z.attn", src), &Default::default()).unwrap();
    let mut rng = attnc::bench::Rng::new(5);
    let (q, k, v) = (
        rng.array4((1, 1, 64, 8)),
        rng.array4((1, 1, 64, 8)),
        rng.array4((1, 1, 64, 8)),
    );
    let run = |x: f32| {
        let w = attnc::BufferData::Float(ndarray::ArrayD::from_elem(vec![64], x));
        let inputs = attnc::Inputs::new(q.view(), k.view(), v.view())
            .buffer("w", w)
            .with_lse();
        let want = program.run_reference(&inputs).unwrap();
        let got = kernel.run(&inputs).unwrap();
        common::assert_close(
            &format!("w = {x:?}"),
            &got,
            &want.out,
            want.lse.as_ref().unwrap(),
            1e-5,
        );
        (kernel.block_maps(&inputs).unwrap(), got)
    };
    let (plus, seen) = run(0.0);
    let (minus, hidden) = run(-0.0);
    assert!(!std::sync::Arc::ptr_eq(&plus, &minus));
    assert!(seen.lse.unwrap().iter().all(|x| x.is_finite()));
    assert!(hidden.lse.unwrap().iter().all(|x| *x == f32::NEG_INFINITY));
    let (nan, _) = run(f32::NAN);
    let (nan_again, _) = run(f32::NAN);
    assert!(std::sync::Arc::ptr_eq(&nan, &nan_again));
}

/// The error of spec `src` on 8 query and key rows with `buffers`, which the
/// jit (checking the reads it proved in range too: a wrong proof panics),
/// the interpreter and the reference all report alike.
fn same_error_on_every_backend(src: &str, buffers: Vec<(&str, attnc::BufferData)>) -> String {
    let program = attnc::load(attnc::SourceFile::new("s.attn", src), &Default::default()).unwrap();
    let options = attnc::CompileOptions {
        check_proven_loads: true,
        ..Default::default()
    };
    let kernel = program.compile_jit_with(&options).unwrap();
    let mut rng = attnc::bench::Rng::new(6);
    let (q, k, v) = (
        rng.array4((1, 1, 8, 4)),
        rng.array4((1, 1, 8, 4)),
        rng.array4((1, 1, 8, 4)),
    );
    let mut inputs = attnc::Inputs::new(q.view(), k.view(), v.view());
    for (name, data) in buffers {
        inputs = inputs.buffer(name, data);
    }
    let want = program.run_reference(&inputs).unwrap_err().to_string();
    assert_eq!(kernel.run(&inputs).unwrap_err().to_string(), want, "{src}");
    let interp = program.run_interp(&inputs, attnc::mask::Tiling { bq: 8, bkv: 16 });
    assert_eq!(interp.unwrap_err().to_string(), want, "{src}");
    want
}

/// `kv << 61` wraps: the index `(kv << 61) >> 61` is negative at kv = 4, and
/// the read is reported out of range as the reference reports it, never
/// performed (the range proofs take a left shift as opaque, and do not
/// multiply a bound by a factor above 2^20).
#[test]
fn wrapping_shifts_never_prove_a_read_in_range() {
    // The same with a multiply by 2^61 and a division.
    for index in [
        "(kv << 61) >> 61",
        "(kv * 2305843009213693952) / 2305843009213693952",
        // Factors each below the proof limit whose product wraps.
        "kv * 1048576 * 1048576 * 2097152 / 1048576 / 1048576 / 2097152",
        "max(max(kv * 1048576, 0) * 1048576, 0) * 2097152 / 2305843009213693952",
        "max(max(kv * 1048576, 0) * 1048576, 0) * 2097152 / 1048576 / 1048576 / 2097152",
    ] {
        let src =
            format!("attention s {{ buffer bias[KV]: float\n score = score + bias[{index}] }}");
        let bias = attnc::BufferData::Float(ndarray::ArrayD::zeros(vec![8]));
        let want = same_error_on_every_backend(&src, vec![("bias", bias)]);
        assert!(want.contains("`bias[-4]`"), "{want}");
    }
}

/// A sum with a lower bound but no upper one can wrap below its lower
/// bound (`max(doc[kv], 0) + 2^61 - 1` at a large `doc[kv]`): the range proofs
/// keep no bound of it, and the read is checked and reported out of range as
/// the reference reports it.
#[test]
fn one_sided_bounds_of_wrapping_sums_never_prove_a_read_in_range() {
    let src = "attention s { buffer doc[KV]: int\n buffer w[4]: float\n score = score + w[min(max(doc[kv], 0) + 2305843009213693951, 3)] }";
    let mut doc = vec![0i64; 8];
    doc[3] = 6917530127152709633;
    let doc = attnc::BufferData::Int(ndarray::ArrayD::from_shape_vec(vec![8], doc).unwrap());
    let w = attnc::BufferData::Float(ndarray::ArrayD::zeros(vec![4]));
    let want = same_error_on_every_backend(src, vec![("doc", doc), ("w", w)]);
    assert!(want.contains("read out of range"), "{want}");
}

#[test]
fn bad_inputs_are_errors_not_crashes() {
    let kernel = attnc::compile(
        attnc::SourceFile::new(
            "t.attn",
            "attention t { buffer t[4]: float\n score = score + t[kv] }",
        ),
        &attnc::CompileOptions::default(),
    )
    .unwrap();
    let q = ndarray::Array4::<f32>::zeros((1, 1, 8, 4));
    let t = attnc::BufferData::Float(ndarray::ArrayD::zeros(vec![4]));
    // kv runs to 7 but t has 4 entries: an error naming the buffer and index.
    let err = kernel
        .run(&attnc::Inputs::new(q.view(), q.view(), q.view()).buffer("t", t))
        .unwrap_err();
    let text = err.render();
    assert!(text.contains("`t[4]`") && text.contains("t[kv]"), "{text}");
    // Non-contiguous inputs work (a transposed view).
    let big = attnc::bench::Rng::new(3).array4((1, 8, 1, 4));
    let view = big.view().permuted_axes([0, 2, 1, 3]);
    let causal = attnc::compile(
        attnc::SourceFile::new("c.attn", "attention c { mask = causal }"),
        &attnc::CompileOptions::default(),
    )
    .unwrap();
    let p = attnc::load(
        attnc::SourceFile::new("c.attn", "attention c { mask = causal }"),
        &Default::default(),
    )
    .unwrap();
    let i = attnc::Inputs::new(view, view, view).with_lse();
    let r = p.run_reference(&i).unwrap();
    common::assert_close(
        "strided",
        &causal.run(&i).unwrap(),
        &r.out,
        r.lse.as_ref().unwrap(),
        1e-5,
    );
}

#[test]
fn automatic_tiles_follow_the_mask_and_match_the_reference() {
    use attnc::mask::Tiling;
    let cases = [
        (
            "attention dense { score = score * 0.5 }",
            Tiling::new(128, 64),
        ),
        ("attention c { mask = causal }", Tiling::new(64, 64)),
    ];
    for (src, want) in cases {
        let file = || attnc::SourceFile::new("auto.attn", src);
        let program = attnc::load(file(), &Default::default()).unwrap();
        assert_eq!(program.auto_tiling(), want.unwrap(), "{src}");
        for gemm in gemms() {
            let options = attnc::CompileOptions {
                gemm,
                ..Default::default()
            };
            let kernel = attnc::compile(file(), &options).unwrap();
            assert_eq!(kernel.tiling(), program.auto_tiling(), "{src}");
            // Lengths around the 128-row tile: one partial query tile, several, ragged KV.
            for (q_len, kv_len) in [(100, 100), (300, 77), (129, 257)] {
                let mut rng = attnc::bench::Rng::new((q_len + kv_len) as u64);
                let q = rng.array4((1, 2, q_len, 24));
                let k = rng.array4((1, 2, kv_len, 24));
                let v = rng.array4((1, 2, kv_len, 24));
                let inputs = attnc::Inputs::new(q.view(), k.view(), v.view()).with_lse();
                let reference = program.run_reference(&inputs).unwrap();
                let got = kernel.run(&inputs).unwrap();
                common::assert_close(
                    &format!("{src} {q_len}x{kv_len} {}", gemm.name()),
                    &got,
                    &reference.out,
                    reference.lse.as_ref().unwrap(),
                    1e-5,
                );
            }
        }
    }
}

#[test]
fn tile_choices_parse_from_text() {
    use attnc::mask::Tiling;
    use attnc::Tiles;
    assert_eq!("auto".parse::<Tiles>().unwrap(), Tiles::Auto);
    assert_eq!(
        "64x128".parse::<Tiles>().unwrap(),
        Tiles::Fixed(Tiling::new(64, 128).unwrap())
    );
    assert_eq!(
        "32".parse::<Tiles>().unwrap(),
        Tiles::Fixed(Tiling::new(32, 32).unwrap())
    );
    assert!("automatic".parse::<Tiles>().is_err());
    assert!("0x64".parse::<Tiles>().is_err());
}

#[test]
fn buffer_dimensions_follow_params_and_shapes_at_bind() {
    let src = "attention d {\n    param n: int = 3\n    buffer off[n + 1]: int\n    buffer t[KV - 6, (H + 1) / 2]: float\n    mask = kv >= off[0]\n    score = score + t[0, 0]\n}\n";
    let q = attnc::bench::Rng::new(9).array4((1, 2, 8, 4));
    let run_all = |params: &[(&str, &str)], off: usize, t: Vec<usize>| {
        let program = attnc::load(
            attnc::SourceFile::new("d.attn", src),
            &attnc::SpecOptions::with_params(params),
        )
        .unwrap();
        let inputs = attnc::Inputs::new(q.view(), q.view(), q.view())
            .buffer(
                "off",
                attnc::BufferData::Int(ndarray::ArrayD::zeros(vec![off])),
            )
            .buffer("t", attnc::BufferData::Float(ndarray::ArrayD::ones(t)));
        let reference = program.run_reference(&inputs).map(|o| o.out);
        let interp = program
            .run_interp(&inputs, attnc::mask::Tiling { bq: 4, bkv: 4 })
            .map(|o| o.out);
        let jit = program
            .compile_jit_with(&Default::default())
            .unwrap()
            .run(&inputs)
            .map(|o| o.out);
        let show = |r: &Result<ndarray::Array4<f32>, attnc::Error>| match r {
            Ok(_) => "ok".to_string(),
            Err(e) => e.to_string(),
        };
        if let (Ok(r), Ok(i), Ok(j)) = (&reference, &interp, &jit) {
            let diff = |x: &ndarray::Array4<f32>| (x - r).iter().fold(0f32, |m, d| m.max(d.abs()));
            assert!(diff(i) < 1e-5 && diff(j) < 1e-5, "{} {}", diff(i), diff(j));
        }
        let (r, i, j) = (show(&reference), show(&interp), show(&jit));
        assert_eq!(r, i, "interp");
        assert_eq!(r, j, "jit");
        r
    };
    // n + 1 = 4, KV - 6 = 2, (H + 1) / 2 rounds 1.5 up to 2.
    let r = run_all(&[], 4, vec![2, 2]);
    assert!(r.starts_with("ok"), "{r}");
    // An override of n resizes `off`.
    let r = run_all(&[("n", "7")], 8, vec![2, 2]);
    assert!(r.starts_with("ok"), "{r}");
    let e = run_all(&[("n", "7")], 4, vec![2, 2]);
    assert!(
        e.contains("`off` has shape [4]") && e.contains("`off[8]` is [8]"),
        "{e}"
    );
    let e = run_all(&[], 4, vec![3, 2]);
    assert!(e.contains("`t[KV - 6, (H + 1) / 2]` is [2, 2]"), "{e}");
    // KV = 8 with a 4-row K: KV - 6 is fine; with 4 keys it would be -2.
    let k = attnc::bench::Rng::new(2).array4((1, 2, 4, 4));
    let program = attnc::load(attnc::SourceFile::new("d.attn", src), &Default::default()).unwrap();
    let inputs = attnc::Inputs::new(k.view(), k.view(), k.view())
        .buffer(
            "off",
            attnc::BufferData::Int(ndarray::ArrayD::zeros(vec![4])),
        )
        .buffer(
            "t",
            attnc::BufferData::Float(ndarray::ArrayD::ones(vec![0, 2])),
        );
    for e in [
        program.run_reference(&inputs).unwrap_err(),
        program
            .compile_jit_with(&Default::default())
            .unwrap()
            .run(&inputs)
            .unwrap_err(),
    ] {
        let text = e.render();
        assert!(
            text.contains("the dimension `KV - 6` is negative, overflows a 64-bit int")
                && text.contains("KV=4"),
            "{text}"
        );
    }
}

#[test]
fn reductions_expand_for_the_loaded_param_values() {
    let src = "attention r {\n    param k: int = 3\n    buffer t[k]: int\n    buffer w[H, 4]: float\n    mask = any(i in 0..k: t[i] == kv % 5) || all(i in 1..3: q - kv >= i)\n    score = score + sum(i in 0..4: w[h, i] * float(i)) - min(i in 0..k: float(t[i]))\n}\n";
    // The same spec for k = 2, written out by hand.
    let by_hand = "attention r {\n    param k: int = 2\n    buffer t[k]: int\n    buffer w[H, 4]: float\n    mask = (t[0] == kv % 5 || t[1] == kv % 5) || (q - kv >= 1 && q - kv >= 2)\n    score = score + (((w[h, 0] * float(0) + w[h, 1] * float(1)) + w[h, 2] * float(2)) + w[h, 3] * float(3)) - min(float(t[0]), float(t[1]))\n}\n";
    let program = attnc::load(
        attnc::SourceFile::new("r.attn", src),
        &attnc::SpecOptions::with_params(&[("k", "2")]),
    )
    .unwrap();
    let manual = attnc::load(
        attnc::SourceFile::new("h.attn", by_hand),
        &Default::default(),
    )
    .unwrap();
    assert_eq!(program.spec.buffers[0].dims, manual.spec.buffers[0].dims);
    let mut rng = attnc::bench::Rng::new(4);
    let (q, k, v) = (
        rng.array4((1, 2, 19, 8)),
        rng.array4((1, 1, 19, 8)),
        rng.array4((1, 1, 19, 8)),
    );
    let inputs = attnc::Inputs::new(q.view(), k.view(), v.view())
        .with_lse()
        .buffer(
            "t",
            attnc::BufferData::Int(ndarray::arr1(&[3i64, 1]).into_dyn()),
        )
        .buffer(
            "w",
            attnc::BufferData::Float(
                rng.array4((1, 1, 2, 4))
                    .into_shape_with_order(vec![2, 4])
                    .unwrap(),
            ),
        );
    let want = manual.run_reference(&inputs).unwrap();
    let got = program.run_reference(&inputs).unwrap();
    assert_eq!(
        got.out, want.out,
        "the expansion is the hand-written spec, bit for bit"
    );
    let jit = program
        .compile_jit_with(&Default::default())
        .unwrap()
        .run(&inputs)
        .unwrap();
    common::assert_close("jit", &jit, &want.out, want.lse.as_ref().unwrap(), 1e-5);
    // The param is fixed once checked: a later override is an error naming it.
    let mut spec = program.spec.clone();
    let e = spec.set_param("k", "4").unwrap_err();
    assert!(
        e.to_string()
            .contains("param `k` sets the range of a reduction"),
        "{e}"
    );
    // A bad override is still a type error, and a new value re-checks: k = 0
    // leaves `min` without a value.
    let e = attnc::load(
        attnc::SourceFile::new("r.attn", src),
        &attnc::SpecOptions::with_params(&[("k", "two")]),
    )
    .unwrap_err();
    assert!(e.render().contains("not an int"), "{}", e.render());
    let e = attnc::load(
        attnc::SourceFile::new("r.attn", src),
        &attnc::SpecOptions::with_params(&[("k", "0")]),
    )
    .unwrap_err();
    assert!(
        e.render().contains("`min` over the empty range 0..0"),
        "{}",
        e.render()
    );
}

/// Comparisons and divisions at the ends of i64 follow the wrapping
/// arithmetic of the language on every backend: `X <= q` is not rewritten to
/// `-q <= -X` where `-X` can wrap (`X = i64::MIN`, written or read from a
/// buffer), and `abs(i64::MIN)` (itself) is not taken as non-negative by the
/// division and remainder by a constant.
#[test]
fn comparisons_and_divisions_at_the_ends_of_i64_match_the_reference() {
    const MIN: &str = "(-9223372036854775807 - 1)";
    let specs = [
        format!("mask = (if kv == 0 {{ {MIN} }} else {{ kv }}) <= q"),
        format!("mask = (if kv == 1 {{ {MIN} }} else {{ kv }}) < q + 1"),
        format!("mask = q >= (if kv == 0 {{ {MIN} }} else {{ kv }})"),
        format!("mask = q + 1 > (if kv == 2 {{ {MIN} }} else {{ kv }})"),
        format!("score = if (if kv == 0 {{ {MIN} }} else {{ kv }}) <= q {{ score }} else {{ score - 1.0 }}"),
        "buffer doc[KV]: int\n mask = doc[kv] <= doc[q]".to_string(),
        "buffer doc[KV]: int\n mask = doc[kv] - 1 < doc[q] + kv".to_string(),
        // `max(doc[kv], 0) + 1` has a lower bound but wraps to i64::MIN at
        // doc[kv] = i64::MAX: abs of it is not provably non-negative.
        "buffer doc[KV]: int\n score = score + float(abs(max(doc[kv], 0) + 1 - kv) % 3)".to_string(),
        "score = score + float(abs(kv - 9223372036854775807 - 1) % 1000) / 1000.0".to_string(),
        format!("score = score + float(abs(kv + {MIN}) / 1000000000000000000)"),
        format!("score = score + float(abs(kv + {MIN}) % 3)"),
    ];
    let n = 6;
    let mut doc = vec![0i64; n];
    doc[0] = i64::MIN;
    doc[3] = i64::MIN;
    doc[4] = i64::MAX;
    for body in specs {
        let src = format!("attention s {{ {body} }}");
        let program = attnc::load(
            attnc::SourceFile::new("s.attn", src.as_str()),
            &Default::default(),
        )
        .unwrap_or_else(|e| panic!("{src}: {e}"));
        let mut rng = attnc::bench::Rng::new(7);
        let (q, k, v) = (
            rng.array4((1, 1, n, 4)),
            rng.array4((1, 1, n, 4)),
            rng.array4((1, 1, n, 4)),
        );
        let doc =
            attnc::BufferData::Int(ndarray::ArrayD::from_shape_vec(vec![n], doc.clone()).unwrap());
        let mut inputs = attnc::Inputs::new(q.view(), k.view(), v.view()).with_lse();
        if body.contains("doc") {
            inputs = inputs.buffer("doc", doc);
        }
        let want = program.run_reference(&inputs).unwrap();
        let lse = want.lse.clone().unwrap();
        for gemm in gemms() {
            let got = program
                .compile_jit(attnc::mask::Tiling { bq: 4, bkv: 16 }, gemm)
                .unwrap()
                .run(&inputs)
                .unwrap();
            common::assert_close(
                &format!("{src} jit {}", gemm.name()),
                &got,
                &want.out,
                &lse,
                1e-5,
            );
        }
        let got = program
            .run_interp(&inputs, attnc::mask::Tiling { bq: 4, bkv: 4 })
            .unwrap();
        common::assert_close(&format!("{src} interp"), &got, &want.out, &lse, 1e-5);
    }
}

#[test]
fn huge_dimensions_never_prove_a_read_in_range() {
    // Scaling the dimension by the divisor of the index passes 2^127: the
    // proof must give up rather than wrap into "in range".
    let src = "attention oob {\n    buffer t[(KV - 3) * 1048576 * 1048576 * 1048576 * 262144 * 1048576]: int\n    mask = t[kv / 268435456] == 0\n}\n";
    let program =
        attnc::load(attnc::SourceFile::new("oob.attn", src), &Default::default()).unwrap();
    let options = attnc::CompileOptions {
        check_proven_loads: true,
        ..Default::default()
    };
    let kernel = program.compile_jit_with(&options).unwrap();
    let q = attnc::bench::Rng::new(1).array4((1, 1, 3, 4));
    let t = attnc::BufferData::Int(ndarray::ArrayD::zeros(vec![0]));
    let inputs = attnc::Inputs::new(q.view(), q.view(), q.view()).buffer("t", t);
    let want = program.run_reference(&inputs).unwrap_err().to_string();
    assert!(want.contains("`t[0]`"), "{want}");
    assert_eq!(kernel.run(&inputs).unwrap_err().to_string(), want);
}

#[test]
fn reductions_in_functions_long_ranges_and_empty_ranges() {
    // A range set by a function's argument expands at each call (the body
    // checked on its own does not reject `max` over 0..k); 600 terms fit
    // the nesting limit (a balanced tree); an empty float sum is 0.0.
    let src = "fn best(k: int) -> int { max(i in 0..k: i) }\nfn per(k: int) -> int { sum(i in 0..64 / k: i) }\nattention r {\n    param n: int = 0\n    score = score + sum(i in 0..600: float(i)) * 0.00001 + float(best(3) + per(4)) + sum(i in 0..n: 1.5)\n}\n";
    let program = attnc::load(attnc::SourceFile::new("r.attn", src), &Default::default())
        .unwrap_or_else(|e| panic!("{}", e.render()));
    let q = attnc::bench::Rng::new(3).array4((1, 1, 5, 4));
    let inputs = attnc::Inputs::new(q.view(), q.view(), q.view()).with_lse();
    let want = program.run_reference(&inputs).unwrap();
    let got = program
        .compile_jit_with(&Default::default())
        .unwrap()
        .run(&inputs)
        .unwrap();
    common::assert_close(
        "reductions",
        &got,
        &want.out,
        want.lse.as_ref().unwrap(),
        1e-5,
    );
    // The value the reductions add: 0.00001 * 179700 + 2 + 120 + 0.
    let plain = attnc::load(
        attnc::SourceFile::new("p.attn", "attention p { score = score + 123.797 }"),
        &Default::default(),
    )
    .unwrap();
    let same = plain.run_reference(&inputs).unwrap();
    for (a, b) in want.lse.unwrap().iter().zip(same.lse.unwrap().iter()) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
}
