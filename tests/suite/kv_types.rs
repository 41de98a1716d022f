//! K and V stored as bf16, f16, int8 or fp8 (with a scale per token and KV
//! head): every CPU backend against the reference interpreter on the same
//! stored values, on paged pools and dense rows; stale slots hold NaN data
//! and NaN scales; the accuracy against float64 attention on the unrounded
//! values stays within the bounds the issue sets from torch's figures.

use crate::kv_cache::{agree_on_pool_and_rows, assert_close, program, Cache, SPECS};
use crate::support::common::max_abs_diff;

use attnc::bench::Rng;
use attnc::codegen::clif::GemmImpl;
use attnc::ndarray::{s, Array4};
use attnc::{ElemType, Inputs, KvArray};

/// `x` stored as `elem`, with every row of a slot `used` does not list given
/// a NaN scale (and NaN bits for fp8), so a read of one shows.
fn stored(x: &Array4<f32>, elem: ElemType, used: impl Fn(usize, usize, usize) -> bool) -> KvArray {
    let mut a = KvArray::quantize(x.view(), elem);
    if let KvArray::Int8 { scales, .. } | KvArray::Fp8 { scales, .. } = &mut a {
        for ((i, j, k), s) in scales.indexed_iter_mut() {
            if !used(i, j, k) {
                *s = f32::NAN;
            }
        }
    }
    if let KvArray::Fp8 { data, .. } = &mut a {
        for ((i, j, k, _), x) in data.indexed_iter_mut() {
            if !used(i, j, k) {
                *x = 0x7f;
            }
        }
    }
    a
}

/// Every element type, every in-place nest (all heads, a GQA group, one head
/// per tile), page sizes 1, 7 and 16, decode and chunked prefill: the jit and
/// the interpreter on the stored pool and on the stored dense rows agree with
/// the reference on the same stored values, and the reference on the pool
/// equals the reference on the dense rows exactly.
#[test]
fn every_kv_type_matches_the_reference_on_pools_and_dense_rows() {
    let shapes = [(4, 2, 1, 16), (8, 2, 3, 19), (2, 2, 40, 8)];
    for (si, src) in SPECS.iter().enumerate() {
        let program = program(src);
        let jit = program
            .compile_jit(attnc::mask::Tiling { bq: 64, bkv: 64 }, GemmImpl::detect())
            .unwrap();
        let jit16 = program
            .compile_jit(attnc::mask::Tiling { bq: 16, bkv: 16 }, GemmImpl::detect())
            .unwrap();
        for (i, &shape) in shapes.iter().enumerate() {
            let ps = [1, 7, 16][(si + i) % 3];
            let q = shape.2;
            let lens = [q, (ps + 1).max(q), 90 + 13 * i];
            let cache = Cache::new((si * 7 + i) as u64, shape, &lens, ps);
            // Slots a sequence uses: keys below its length, in its pages.
            let lens_of = |b: usize| cache.lens[b] as usize;
            let mut page_used = vec![vec![false; ps]; cache.k_pages.dim().0];
            for b in 0..lens.len() {
                for j in 0..lens_of(b) {
                    page_used[cache.table[[b, j / ps]] as usize][j % ps] = true;
                }
            }
            for elem in ElemType::ALL {
                let dense_used = |b: usize, _kh: usize, j: usize| j < lens_of(b);
                let pool_used = |p: usize, slot: usize, _kh: usize| page_used[p][slot];
                let (k, v) = (
                    stored(&cache.k, elem, dense_used),
                    stored(&cache.v, elem, dense_used),
                );
                let (kp, vp) = (
                    stored(&cache.k_pages, elem, pool_used),
                    stored(&cache.v_pages, elem, pool_used),
                );
                let dense = cache.with_buffers(
                    &program,
                    Inputs::new(cache.q.view(), k.view(), v.view()).kv_lens(cache.lens.view()),
                );
                let paged = cache.with_buffers(
                    &program,
                    Inputs::paged(
                        cache.q.view(),
                        kp.view(),
                        vp.view(),
                        cache.table.view(),
                        cache.lens.view(),
                    ),
                );
                if q > 16 {
                    // A chunked prefill on 16-row tiles: packed, gathered
                    // through the table, unless the cache is quantized.
                    let bound = attnc::bind::bind(&program.spec, &paged).unwrap();
                    let tiling = attnc::mask::Tiling::new(16, 16).unwrap();
                    let kv = if elem.is_quantized() {
                        attnc::tile::nest::KvSource::InPlace
                    } else {
                        attnc::tile::nest::KvSource::Packed
                    };
                    assert_eq!(
                        attnc::driver::nest_for(&bound, tiling, true),
                        (attnc::tile::nest::RowMap::OneHead, kv)
                    );
                }
                agree_on_pool_and_rows(
                    &program,
                    &[("jit 64x64", &jit), ("jit 16x16", &jit16)],
                    &[(8, 16)],
                    &dense,
                    &paged,
                    &format!("{src} {shape:?} {elem} page {ps} lens {lens:?}"),
                );
            }
        }
    }
}

/// A dense prefill (no lengths, no pages) with K/V in a type other than f32:
/// bf16/f16 widened chunk by chunk as they are packed, int8/fp8 read in
/// place; GQA and a broadcast batch of 1 included.
#[test]
fn dense_prefill_in_every_type_matches_the_reference() {
    let program = program("attention causal { mask = causal && q - kv < 300 }");
    let jit = program
        .compile_jit(attnc::mask::Tiling { bq: 64, bkv: 64 }, GemmImpl::detect())
        .unwrap();
    let mut rng = Rng::new(5);
    // The last: more keys than are widened at a time (1024) while packing.
    for (b, kv_b, h, hkv, n, d) in [
        (2, 2, 4, 2, 333, 24),
        (2, 1, 2, 1, 130, 64),
        (1, 1, 2, 1, 2100, 16),
    ] {
        let q = rng.array4((b, h, n, d));
        let k = rng.array4((kv_b, hkv, n, d));
        let v = rng.array4((kv_b, hkv, n, d));
        for elem in ElemType::ALL {
            let (ks, vs) = (
                KvArray::quantize(k.view(), elem),
                KvArray::quantize(v.view(), elem),
            );
            let inputs = Inputs::new(q.view(), ks.view(), vs.view()).with_lse();
            let want = program.run_reference(&inputs).unwrap();
            let got = jit.run(&inputs).unwrap();
            assert_close(
                &format!("{elem} B{b} KVB{kv_b} H{h} HKV{hkv} N{n} D{d}"),
                &got,
                &want,
                2e-5,
            );
        }
    }
}

/// The call `inputs` (q, k and v bf16) takes the bf16 pair nest; the jit and
/// the interpreter lowering it agree with each other and stay within the
/// bf16 rounding of P (2^-9 max|v|, |v| < 1) of the reference, and no NaN of a
/// hidden key or stale slot reaches the output. Returns the reference.
fn check_bf16_pairs(
    program: &attnc::Program,
    jit: &attnc::JitKernel,
    tiling: attnc::mask::Tiling,
    inputs: &Inputs<'_>,
    what: &str,
) -> attnc::Outputs {
    let bound = attnc::bind::bind(&program.spec, inputs).unwrap();
    assert!(jit.bf16_pairs(), "{what}");
    assert_eq!(
        attnc::driver::nest_for(&bound, tiling, true).1,
        attnc::tile::nest::KvSource::PackedBf16,
        "{what}"
    );
    let want = program.run_reference(inputs).unwrap();
    let got = jit.run(inputs).unwrap();
    let interp = program.run_interp_nest(inputs, tiling, true).unwrap();
    assert!(
        got.out.iter().all(|x| x.is_finite()),
        "{what}: a NaN V reached the output"
    );
    assert_close(&format!("{what}: jit vs interp"), &got, &interp, 1e-3);
    assert_close(&format!("{what}: jit vs reference"), &got, &want, 2.5e-3);
    assert_close(
        &format!("{what}: interp vs reference"),
        &interp,
        &want,
        2.5e-3,
    );
    want
}

/// A jit kernel that multiplies bf16 q, k and v as bf16 pairs, with the
/// pair products of this CPU (`vdpbf16ps` or widened), and one that widens
/// them to f32 as it packs them.
fn bf16_jits(
    program: &attnc::Program,
    tiling: attnc::mask::Tiling,
) -> (attnc::JitKernel, attnc::JitKernel) {
    let options = |pairs| attnc::CompileOptions {
        tiles: attnc::Tiles::Fixed(tiling),
        bf16_pairs: Some(pairs),
        ..Default::default()
    };
    (
        program.compile_jit_with(&options(true)).unwrap(),
        program.compile_jit_with(&options(false)).unwrap(),
    )
}

/// bf16 q, k and v of a dense prefill multiply bf16 pairs
/// (`KvSource::PackedBf16`): the jit and the interpreter lowering the same
/// nest agree, and both stay within the bf16 rounding of P (|error| <= 2^-9
/// max|v|) of the reference's f64 on the same values; odd and even head
/// dims, GQA, a broadcast batch, more keys than one packing chunk (1024),
/// a score mod (every tile scanned for NaN V), and NaN V at keys the mask
/// hides from every query, which must not reach the output. Where they are
/// widened to f32 as they are packed instead (`kv packed`: the choice on a
/// CPU without a bf16 dot product), P is not rounded: the f32 bound holds.
#[test]
fn bf16_pairs_prefill_matches_the_interpreter_and_the_reference() {
    assert_eq!(
        program("attention c { mask = causal }")
            .compile_jit(attnc::mask::Tiling { bq: 64, bkv: 64 }, GemmImpl::detect())
            .unwrap()
            .bf16_pairs(),
        attnc::driver::default_bf16_pairs(),
        "by default, bf16 pairs where the CPU has a bf16 dot product"
    );
    for src in [
        "attention a { mask = causal && kv % 7 != 3 }",
        "attention b { score = score * 0.5 mask = causal && kv % 7 != 3 }",
    ] {
        let program = program(src);
        let tiling = attnc::mask::Tiling { bq: 64, bkv: 64 };
        let (jit, widened) = bf16_jits(&program, tiling);
        let mut rng = Rng::new(77);
        for (b, kv_b, h, hkv, n, d) in [
            (2, 2, 4, 2, 333, 23),
            (2, 1, 2, 1, 130, 64),
            (1, 1, 2, 1, 2100, 16),
            (1, 1, 1, 1, 100, 1),
        ] {
            let q = attnc::tensor::round_to(rng.array4((b, h, n, d)).view(), ElemType::Bf16);
            let k = rng.array4((kv_b, hkv, n, d));
            let mut v = rng.array4((kv_b, hkv, n, d));
            for ((_, _, j, _), x) in v.indexed_iter_mut() {
                if j % 7 == 3 {
                    *x = f32::NAN;
                }
            }
            let (ks, vs) = (
                KvArray::quantize(k.view(), ElemType::Bf16),
                KvArray::quantize(v.view(), ElemType::Bf16),
            );
            let inputs = Inputs::new(q.view(), ks.view(), vs.view())
                .q_elem(ElemType::Bf16)
                .with_lse();
            let what = format!("{src} B{b} KVB{kv_b} H{h} HKV{hkv} N{n} D{d}");
            let want = check_bf16_pairs(&program, &jit, tiling, &inputs, &what);
            let bound = attnc::bind::bind(&program.spec, &inputs).unwrap();
            assert_eq!(
                attnc::driver::nest_for(&bound, tiling, false).1,
                attnc::tile::nest::KvSource::Packed,
                "{what}"
            );
            assert_close(
                &format!("{what}: widened as packed"),
                &widened.run(&inputs).unwrap(),
                &want,
                2e-5,
            );
            assert_close(
                &format!("{what}: interp, widened as packed"),
                &program.run_interp_nest(&inputs, tiling, false).unwrap(),
                &want,
                2e-5,
            );
            // f32 q (not declared bf16) keeps the f32 products: tight.
            let f32_q = Inputs::new(q.view(), ks.view(), vs.view()).with_lse();
            assert_close(
                &format!("{what}: f32 q"),
                &jit.run(&f32_q).unwrap(),
                &want,
                2e-5,
            );
        }
    }
}

/// A chunked prefill with q, k and v all bf16 on a paged pool (pages of 7
/// and 16, in a shuffled order, NaN in every stale slot) and on ragged dense
/// rows multiplies bf16 pairs gathered through the table: the jit and the
/// interpreter agree with the reference within the bf16 rounding of P.
#[test]
fn bf16_pairs_gather_a_chunked_prefill_from_a_pool() {
    let program = program("attention causal { mask = causal && q - kv < 300 }");
    let tiling = attnc::mask::Tiling { bq: 64, bkv: 64 };
    let (jit, _) = bf16_jits(&program, tiling);
    let mut rng = Rng::new(31);
    let (h, hkv, q, d, lens) = (4, 2, 70, 24, [70usize, 100, 333]);
    let qv = attnc::tensor::round_to(rng.array4((3, h, q, d)).view(), ElemType::Bf16);
    let (k, v) = (rng.array4((3, hkv, 333, d)), rng.array4((3, hkv, 333, d)));
    let kv_lens = attnc::ndarray::arr1(&lens.map(|n| n as i32));
    for ps in [7, 16] {
        let (kp, vp, table) = crate::support::common::paged_pool(&k, &v, &lens, ps, &mut rng);
        let (kp, vp) = (
            KvArray::quantize(kp.view(), ElemType::Bf16),
            KvArray::quantize(vp.view(), ElemType::Bf16),
        );
        let (kd, vd) = (
            KvArray::quantize(k.view(), ElemType::Bf16),
            KvArray::quantize(v.view(), ElemType::Bf16),
        );
        let calls = [
            (
                "pool",
                Inputs::paged(
                    qv.view(),
                    kp.view(),
                    vp.view(),
                    table.view(),
                    kv_lens.view(),
                ),
            ),
            (
                "ragged rows",
                Inputs::new(qv.view(), kd.view(), vd.view()).kv_lens(kv_lens.view()),
            ),
        ];
        for (what, inputs) in calls {
            let inputs = inputs.q_elem(ElemType::Bf16).with_lse();
            check_bf16_pairs(
                &program,
                &jit,
                tiling,
                &inputs,
                &format!("{what}, pages of {ps}"),
            );
        }
    }
}

/// q declared bf16 or f16 must hold such values; int8 and fp8 are no query
/// types.
#[test]
fn a_q_that_is_not_of_its_declared_type_is_refused() {
    let program = program("attention causal { mask = causal }");
    let mut rng = Rng::new(3);
    let mut q = attnc::tensor::round_to(rng.array4((1, 1, 4, 8)).view(), ElemType::Bf16);
    q[[0, 0, 2, 5]] = 1.0 + f32::EPSILON;
    let k = KvArray::quantize(rng.array4((1, 1, 4, 8)).view(), ElemType::Bf16);
    let err = attnc::bind::bind(
        &program.spec,
        &Inputs::new(q.view(), k.view(), k.view()).q_elem(ElemType::Bf16),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "q is declared bf16, but q[0, 0, 2, 5] = 1.0000001e0 is not a bf16 value"
    );
    let err = attnc::bind::bind(
        &program.spec,
        &Inputs::new(q.view(), k.view(), k.view()).q_elem(ElemType::Int8),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "q cannot be int8: queries are f32, bf16 or f16"
    );
    // f16 checks by rounding: a bf16 value with more exponent than f16 is no f16.
    q[[0, 0, 2, 5]] = 1.0e6;
    let err = attnc::bind::bind(
        &program.spec,
        &Inputs::new(q.view(), k.view(), k.view()).q_elem(ElemType::F16),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("q is declared f16, but q[0, 0, 2, 5] = 1e6"),
        "{err}"
    );
}

/// N(0, 1) q, k, v of causal attention B1 H8 N1024 D64, against float64
/// attention on the unrounded values: max and mean |error| of the jit with
/// q, k, v in bf16 or f16, and with f32 q and an int8 or fp8 cache, are at
/// most 1.5x torch's for the same precision (bf16 SDPA max 9.3e-3 mean
/// 2.7e-4; f16 SDPA 1.4e-3, 3.4e-5; int8 per-token absmax K/V with f32 math
/// 1.8e-2, 6.3e-4; fp8 e4m3 per-token scale 1.0e-1, 2.7e-3).
#[test]
fn accuracy_against_float64_is_within_the_torch_bounds() {
    let program = program("attention causal { mask = causal }");
    let jit = program
        .compile_jit(attnc::mask::Tiling { bq: 64, bkv: 64 }, GemmImpl::detect())
        .unwrap();
    let mut rng = Rng::new(2024);
    let shape = (1, 8, 1024, 64);
    let mut normal = || Array4::from_shape_simple_fn(shape, || rng.normal());
    let (q, k, v) = (normal(), normal(), normal());
    let exact = program
        .run_reference(&Inputs::new(q.view(), k.view(), v.view()))
        .unwrap();
    // (type of q, k, v; type of K/V; torch's max and mean |error|)
    let cases = [
        (ElemType::Bf16, ElemType::Bf16, 9.3e-3, 2.7e-4),
        (ElemType::F16, ElemType::F16, 1.4e-3, 3.4e-5),
        (ElemType::F32, ElemType::Int8, 1.8e-2, 6.3e-4),
        (ElemType::F32, ElemType::Fp8, 1.0e-1, 2.7e-3),
    ];
    for (q_elem, kv_elem, torch_max, torch_mean) in cases {
        let qr = attnc::tensor::round_to(q.view(), q_elem);
        let (ks, vs) = (
            KvArray::quantize(k.view(), kv_elem),
            KvArray::quantize(v.view(), kv_elem),
        );
        // Declared bf16, q with bf16 K/V multiplies bf16 pairs.
        let got = jit
            .run(&Inputs::new(qr.view(), ks.view(), vs.view()).q_elem(q_elem))
            .unwrap();
        let max = max_abs_diff(got.out.iter(), exact.out.iter());
        let mean = got
            .out
            .iter()
            .zip(exact.out.iter())
            .map(|(a, b)| f64::from((a - b).abs()))
            .sum::<f64>()
            / got.out.len() as f64;
        eprintln!("q {q_elem}, K/V {kv_elem}: max {max:.3e} mean {mean:.3e}");
        assert!(
            max <= 1.5 * torch_max && mean <= 1.5 * torch_mean,
            "q {q_elem}, K/V {kv_elem}: max {max:.3e} mean {mean:.3e}, bounds {:.3e} {:.3e}",
            1.5 * torch_max,
            1.5 * torch_mean
        );
    }
}

/// Bad stored K/V are bind errors on every backend: k and v of different
/// types, scales of the wrong shape, a non-finite scale at a key a sequence
/// uses. A NaN scale past a sequence's length is no error.
#[test]
fn bad_stored_kv_is_refused_on_every_backend() {
    let program = program("attention causal { mask = causal }");
    let jit = program
        .compile_jit(attnc::mask::Tiling { bq: 64, bkv: 64 }, GemmImpl::detect())
        .unwrap();
    let mut rng = Rng::new(1);
    let q = rng.array4((2, 2, 3, 8));
    let k = rng.array4((2, 2, 10, 8));
    let lens = attnc::ndarray::arr1(&[6, 10]);
    let int8 = KvArray::quantize(k.view(), ElemType::Int8);
    let bf16 = KvArray::quantize(k.view(), ElemType::Bf16);
    let run_all = |inputs: &Inputs<'_>| -> Vec<String> {
        vec![
            program.run_reference(inputs).unwrap_err().to_string(),
            program
                .run_interp(inputs, attnc::mask::Tiling { bq: 16, bkv: 16 })
                .unwrap_err()
                .to_string(),
            jit.run(inputs).unwrap_err().to_string(),
        ]
    };
    let all_say = |inputs: &Inputs<'_>, want: &str| {
        for got in run_all(inputs) {
            assert!(got.contains(want), "{got:?} should say {want:?}");
        }
    };
    all_say(
        &Inputs::new(q.view(), int8.view(), bf16.view()),
        "k and v must have the same element type: k is int8, v is bf16",
    );
    let KvArray::Int8 { data, scales } = &int8 else {
        unreachable!()
    };
    let short = scales.slice(s![.., .., ..9]);
    all_say(
        &Inputs::new(
            q.view(),
            attnc::KvData::Int8 {
                data: data.view(),
                scales: short,
            },
            int8.view(),
        ),
        "the k scales have shape [2, 2, 9], expected [2, 2, 10]",
    );
    let mut bad = scales.clone();
    bad[[0, 1, 5]] = f32::INFINITY;
    bad[[0, 1, 7]] = f32::NAN; // past sequence 0's 6 keys: never read
    let stale_only = {
        let mut s = scales.clone();
        s[[0, 1, 7]] = f32::NAN;
        s
    };
    all_say(
        &Inputs::new(
            q.view(),
            int8.view(),
            attnc::KvData::Int8 {
                data: data.view(),
                scales: bad.view(),
            },
        )
        .kv_lens(lens.view()),
        "the v scale of key 5 of sequence 0, KV head 1 is inf, which is not finite",
    );
    // A finite scale so large that a stored value times it overflows f32
    // (here 3e38 x 127) is refused alike; the largest usable one is not.
    let mut huge = scales.clone();
    huge[[0, 0, 2]] = 3e38;
    all_say(
        &Inputs::new(
            q.view(),
            attnc::KvData::Int8 {
                data: data.view(),
                scales: huge.view(),
            },
            int8.view(),
        )
        .kv_lens(lens.view()),
        "the k scale of key 2 of sequence 0, KV head 0 is 3e38, and 127 (the largest int8 a row may hold) times it overflows f32",
    );
    huge[[0, 0, 2]] = f32::MAX / 128.0;
    // An int8 K of `data` and `scales`, with the lengths of the other calls.
    fn int8_k<'a>(
        q: &'a Array4<f32>,
        (data, scales): (&'a Array4<i8>, &'a attnc::ndarray::Array3<f32>),
        v: &'a KvArray,
        lens: &'a attnc::ndarray::Array1<i32>,
    ) -> Inputs<'a> {
        let k = attnc::KvData::Int8 {
            data: data.view(),
            scales: scales.view(),
        };
        Inputs::new(q.view(), k, v.view()).kv_lens(lens.view())
    }
    let data = data.to_owned();
    attnc::bind::bind(&program.spec, &int8_k(&q, (&data, &huge), &int8, &lens)).unwrap();
    // Above f32::MAX / 128, an int8 scale dequantizes 127 within f32 but
    // not -128: a row that holds no -128 binds, one that does is refused.
    huge[[0, 0, 2]] = f32::MAX / 127.5;
    assert!(!data.slice(s![0, 0, 2, ..]).iter().any(|&x| x == i8::MIN));
    attnc::bind::bind(&program.spec, &int8_k(&q, (&data, &huge), &int8, &lens)).unwrap();
    let mut data_min = data.clone();
    data_min[[0, 0, 2, 3]] = i8::MIN;
    let want = format!(
        "the k scale of key 2 of sequence 0, KV head 0 is {:e}, and -128 (a value of that row) times it overflows f32",
        f32::MAX / 127.5
    );
    for got in run_all(&int8_k(&q, (&data_min, &huge), &int8, &lens)) {
        assert!(got.contains(&want), "{got:?} should say {want:?}");
    }
    // fp8 holds up to 448: a scale of f32::MAX / 448 binds, one above it not.
    let fp8 = KvArray::quantize(k.view(), ElemType::Fp8);
    let KvArray::Fp8 { data: bits, scales } = &fp8 else {
        unreachable!()
    };
    for (scale, fits) in [(f32::MAX / 448.0, true), (f32::MAX / 440.0, false)] {
        let mut big = scales.clone();
        big[[1, 1, 4]] = scale;
        let v = attnc::KvData::Fp8 {
            data: bits.view(),
            scales: big.view(),
        };
        let inputs = Inputs::new(q.view(), fp8.view(), v);
        if fits {
            attnc::bind::bind(&program.spec, &inputs).unwrap();
            continue;
        }
        let want = format!(
            "the v scale of key 4 of sequence 1, KV head 1 is {scale:e}, and 448 (the largest fp8 e4m3fn a row may hold) times it overflows f32"
        );
        for got in run_all(&inputs) {
            assert!(got.contains(&want), "{got:?} should say {want:?}");
        }
    }
    let fine = Inputs::new(
        q.view(),
        int8.view(),
        attnc::KvData::Int8 {
            data: data.view(),
            scales: stale_only.view(),
        },
    )
    .kv_lens(lens.view())
    .with_lse();
    let want = program.run_reference(&fine).unwrap();
    assert!(want.out.iter().all(|x| x.is_finite()));
    assert_close("stale NaN scale", &jit.run(&fine).unwrap(), &want, 2e-5);
}

/// Rows of values near f32::MAX quantize to scales that bind and dequantize
/// within f32 (int8's absmax / 127 rounded up past it for absmax = f32::MAX,
/// and binding refused every int8 scale above f32::MAX / 128 and every fp8
/// scale above f32::MAX / 449): with one key, every backend returns the
/// dequantized V row.
#[test]
fn rows_near_the_largest_float_quantize_and_run() {
    let program = program("attention dense { }");
    let jit = program
        .compile_jit(attnc::mask::Tiling { bq: 64, bkv: 64 }, GemmImpl::detect())
        .unwrap();
    let q = Array4::from_elem((1, 1, 1, 4), 1e-30f32);
    for top in [f32::MAX, 3.4e38, 3.39e38, -3.39e38] {
        let k = Array4::from_shape_vec((1, 1, 1, 4), vec![top, 1.0, -2.0, 0.5]).unwrap();
        for elem in [ElemType::Int8, ElemType::Fp8] {
            let kv = KvArray::quantize(k.view(), elem);
            let stored = kv.view();
            let want: Vec<f32> = (0..4).map(|d| stored.get([0, 0, 0, d])).collect();
            assert!(want.iter().all(|x| x.is_finite()), "{elem} {top}: {want:?}");
            assert!(
                (want[0] - top).abs() <= top.abs() / 64.0,
                "{elem} {top}: {want:?}"
            );
            let inputs = Inputs::new(q.view(), kv.view(), kv.view());
            let outs = [
                program.run_reference(&inputs).unwrap().out,
                program
                    .run_interp(&inputs, attnc::mask::Tiling { bq: 16, bkv: 16 })
                    .unwrap()
                    .out,
                jit.run(&inputs).unwrap().out,
            ];
            for out in outs {
                assert_eq!(out.as_slice().unwrap(), &want[..], "{elem} {top}");
            }
        }
    }
}

/// A pool's scales are checked page by page in memory order, but a failure
/// names the first bad key in the order of the sequences and their keys:
/// with two bad scales of one sequence, the earlier key is named even when
/// its page lies later in the pool. NaN scales in stale slots (past each
/// sequence's length, spare pages) are no error.
#[test]
fn a_bad_scale_in_a_pool_is_named_in_key_order() {
    let program = program("attention causal { mask = causal }");
    let mut rng = Rng::new(9);
    let (ps, lens) = (7, [20usize, 37]);
    let q = rng.array4((2, 2, 1, 8));
    let (k, v) = (rng.array4((2, 2, 40, 8)), rng.array4((2, 2, 40, 8)));
    let (kp, vp, table) = crate::support::common::paged_pool(&k, &v, &lens, ps, &mut rng);
    let kv_lens = attnc::ndarray::arr1(&lens.map(|n| n as i32));
    let (kq, vq) = (
        KvArray::quantize(kp.view(), ElemType::Int8),
        KvArray::quantize(vp.view(), ElemType::Int8),
    );
    let KvArray::Int8 { data, scales } = &vq else {
        unreachable!()
    };
    // NaN scales in every slot no sequence uses.
    let mut stale = attnc::ndarray::Array3::from_elem(scales.dim(), f32::NAN);
    for (s, &n) in lens.iter().enumerate() {
        for key in 0..n {
            let (page, slot) = (table[[s, key / ps]] as usize, key % ps);
            stale
                .slice_mut(s![page, slot, ..])
                .assign(&scales.slice(s![page, slot, ..]));
        }
    }
    let scales = &stale;
    let fine_v = attnc::KvData::Int8 {
        data: data.view(),
        scales: scales.view(),
    };
    let fine = Inputs::paged(q.view(), kq.view(), fine_v, table.view(), kv_lens.view());
    assert!(program.run_reference(&fine).is_ok());
    // Keys a < b of sequence 1 whose pages lie the other way round.
    let page = |key: usize| table[[1, key / ps]] as usize;
    let (a, b) = (0..37)
        .flat_map(|a| (a + 1..37).map(move |b| (a, b)))
        .find(|&(a, b)| page(a) > page(b))
        .expect("a shuffled table");
    let mut bad = scales.clone();
    bad[[page(a), a % ps, 1]] = f32::NAN;
    bad[[page(b), b % ps, 0]] = f32::INFINITY;
    let bad_v = attnc::KvData::Int8 {
        data: data.view(),
        scales: bad.view(),
    };
    let inputs = Inputs::paged(q.view(), kq.view(), bad_v, table.view(), kv_lens.view());
    let err = program.run_reference(&inputs).unwrap_err().to_string();
    let want =
        format!("the v scale of key {a} of sequence 1, KV head 1 is NaN, which is not finite");
    assert!(err.contains(&want), "{err:?} should say {want:?}");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 48,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x6b76_7479),
        ..proptest::prelude::ProptestConfig::default()
    })]

    /// Random specs of `support::specgen` (masks, score mods, buffers, GQA,
    /// broadcast k/v, query and key offsets) with q rounded to bf16 or f16 and K/V
    /// stored in a random type: the jit (every read bounds-checked) and the
    /// interpreter agree with the reference on the same stored values, or
    /// fail with its error word for word. (The PTX dequantization has its
    /// own emulated test, `emulated_ptx_dequantizes_int8_and_fp8_pools`.)
    #[test]
    fn every_backend_agrees_on_random_specs_in_every_type(
        case in crate::support::specgen::arb_case(),
        elem in proptest::sample::select(ElemType::ALL.to_vec()),
        q_half in proptest::sample::select(vec![ElemType::F32, ElemType::Bf16, ElemType::F16]),
    ) {
        let program = attnc::load(case.spec.source_file(), &case.spec.options()).unwrap();
        let mut data = case.data();
        data.q = attnc::tensor::round_to(data.q.view(), q_half);
        let (k, v) = (KvArray::quantize(data.k.view(), elem), KvArray::quantize(data.v.view(), elem));
        let mut inputs = Inputs::new(data.q.view(), k.view(), v.view())
            .q_elem(q_half)
            .q_offset(case.shapes.q_offset)
            .kv_offset(case.shapes.kv_offset)
            .with_lse();
        inputs.buffers = data.buffers.clone();
        let reference = program.run_reference(&inputs);
        // bf16 q, k and v multiply bf16 pairs in a dense prefill, with P
        // rounded to bf16 for pv: |error| <= 2^-9 max|v| (|v| <= 1 here),
        // against the reference's f64 on the same bf16 inputs.
        let tol = if (q_half, elem) == (ElemType::Bf16, ElemType::Bf16) { 2.5e-3 } else { 1e-5 };
        let what = |backend: &str| format!("{backend}, q {q_half}, K/V {elem}");
        let options = attnc::CompileOptions {
            tiles: attnc::Tiles::Fixed(attnc::mask::Tiling::new(16, 16).unwrap()),
            check_proven_loads: true,
            ..Default::default()
        };
        let kernel = program.compile_jit_with(&options).unwrap();
        crate::support::agree_to(&what("jit 16x16"), &case, &reference, kernel.run(&inputs), tol)?;
        crate::support::agree_to(
            &what("interp 8x16"),
            &case,
            &reference,
            program.run_interp(&inputs, attnc::mask::Tiling { bq: 8, bkv: 16 }),
            tol,
        )?;
    }

    /// Random specs of `support::specgen` with q, k and v all bf16: a dense
    /// prefill multiplies bf16 pairs (`KvSource::PackedBf16`) and rounds P to
    /// bf16, others read K/V in place; either way the jit (every read
    /// bounds-checked) and the interpreter agree with the reference on the
    /// same bf16 values within the bf16 rounding of P (2^-9 max|v|, |v| < 1
    /// here), or fail with its error word for word.
    #[test]
    fn bf16_pairs_agree_on_random_specs(case in crate::support::specgen::arb_case()) {
        let program = attnc::load(case.spec.source_file(), &case.spec.options()).unwrap();
        let mut data = case.data();
        data.q = attnc::tensor::round_to(data.q.view(), ElemType::Bf16);
        let (k, v) = (
            KvArray::quantize(data.k.view(), ElemType::Bf16),
            KvArray::quantize(data.v.view(), ElemType::Bf16),
        );
        let mut inputs = Inputs::new(data.q.view(), k.view(), v.view())
            .q_elem(ElemType::Bf16)
            .q_offset(case.shapes.q_offset)
            .kv_offset(case.shapes.kv_offset)
            .with_lse();
        inputs.buffers = data.buffers.clone();
        let reference = program.run_reference(&inputs);
        // Pairs on every CPU (`vdpbf16ps` or widened in the products).
        let options = attnc::CompileOptions {
            tiles: attnc::Tiles::Fixed(attnc::mask::Tiling::new(16, 16).unwrap()),
            check_proven_loads: true,
            bf16_pairs: Some(true),
            ..Default::default()
        };
        let kernel = program.compile_jit_with(&options).unwrap();
        crate::support::agree_to("jit 16x16, bf16", &case, &reference, kernel.run(&inputs), 2.5e-3)?;
        crate::support::agree_to(
            "interp 16x16, bf16",
            &case,
            &reference,
            program.run_interp_nest(&inputs, attnc::mask::Tiling { bq: 16, bkv: 16 }, true),
            2.5e-3,
        )?;
    }
}
