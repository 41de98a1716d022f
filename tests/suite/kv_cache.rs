//! The KV cache: paged pools, ragged batches, key offsets and the merge of
//! partial results, on every CPU backend, against the reference interpreter.
//!
//! Stale slots (past a sequence's length, and pages no table lists) hold NaN,
//! so any read of one shows up as a NaN in the outputs.

use crate::support;
use crate::support::common;

use attnc::bench::Rng;
use attnc::codegen::clif::GemmImpl;
use attnc::ndarray::{s, Array1, Array2, Array3, Array4};
use attnc::{merge_states, BufferData, Inputs, Outputs, Program, SourceFile, SpecOptions};
use common::max_abs_diff;
use proptest::prelude::*;
use support::agree_to;
use support::specgen::arb_case;

/// Specs whose masks and score mods exercise positions, heads and buffers:
/// `h` in the mask makes the block maps differ per head, so a GQA-grouped
/// tile walks the union of its heads' maps.
pub(crate) const SPECS: &[&str] = &[
    "attention dense { }",
    "attention causal { mask = causal }",
    "attention window { param window: int = 37\n mask = causal && q - kv < window }",
    "attention sinks { mask = causal && (kv < 4 || q - kv < 29) }",
    "attention alibi { buffer slope[H]: float\n mask = causal\n score = score - slope[h] * (q - kv) }",
    "attention softcap { score = 20.0 * tanh(score / 20.0) }",
    "attention docs { buffer doc[KV]: int\n mask = doc[q] == doc[kv] && causal }",
    "attention by_head { mask = causal && (h % 2 == 0 || q - kv < 11) }",
];

pub(crate) fn program(src: &str) -> Program {
    attnc::load(SourceFile::new("spec.attn", src), &SpecOptions::default()).unwrap()
}

/// A ragged batch: the same keys as dense `[B, HKV, KVmax, D]` rows and as a
/// shuffled paged pool, NaN in every stale slot and in spare pages.
pub(crate) struct Cache {
    pub q: Array4<f32>,
    pub k: Array4<f32>,
    pub v: Array4<f32>,
    pub k_pages: Array4<f32>,
    pub v_pages: Array4<f32>,
    pub table: Array2<i32>,
    pub lens: Array1<i32>,
    slope: Array1<f32>,
    doc: Array1<i64>,
}

impl Cache {
    pub(crate) fn new(
        seed: u64,
        (h, hkv, q, d): (usize, usize, usize, usize),
        lens: &[usize],
        ps: usize,
    ) -> Cache {
        let mut rng = Rng::new(seed);
        let b = lens.len();
        let kv_max = *lens.iter().max().unwrap();
        let mut k = rng.array4((b, hkv, kv_max, d));
        let mut v = rng.array4((b, hkv, kv_max, d));
        for (bi, &n) in lens.iter().enumerate() {
            k.slice_mut(s![bi, .., n.., ..]).fill(f32::NAN);
            v.slice_mut(s![bi, .., n.., ..]).fill(f32::NAN);
        }
        let (k_pages, v_pages, table) = common::paged_pool(&k, &v, lens, ps, &mut rng);
        let slope = Array1::from_iter((0..h).map(|i| 0.05 * (i + 1) as f32));
        let doc = Array1::from_iter((0..kv_max).map(|i| (i / 23) as i64));
        Cache {
            q: rng.array4((b, h, q, d)),
            k,
            v,
            k_pages,
            v_pages,
            table,
            lens: Array1::from_iter(lens.iter().map(|&n| n as i32)),
            slope,
            doc,
        }
    }

    pub(crate) fn with_buffers<'a>(&self, program: &Program, inputs: Inputs<'a>) -> Inputs<'a> {
        let mut inputs = inputs.with_lse();
        for decl in &program.spec.buffers {
            let data = match decl.name.as_str() {
                "slope" => BufferData::Float(self.slope.clone().into_dyn()),
                "doc" => BufferData::Int(self.doc.clone().into_dyn()),
                other => panic!("no data for buffer {other}"),
            };
            inputs = inputs.buffer(&decl.name, data);
        }
        inputs
    }

    fn dense<'a>(&'a self, program: &Program) -> Inputs<'a> {
        self.with_buffers(
            program,
            Inputs::new(self.q.view(), self.k.view(), self.v.view()).kv_lens(self.lens.view()),
        )
    }

    fn paged<'a>(&'a self, program: &Program) -> Inputs<'a> {
        let inputs = Inputs::paged(
            self.q.view(),
            self.k_pages.view(),
            self.v_pages.view(),
            self.table.view(),
            self.lens.view(),
        );
        self.with_buffers(program, inputs)
    }
}

pub(crate) fn assert_close(what: &str, got: &Outputs, want: &Outputs, tol: f32) {
    let d_out = max_abs_diff(got.out.iter(), want.out.iter());
    let d_lse = max_abs_diff(
        got.lse.as_ref().unwrap().iter(),
        want.lse.as_ref().unwrap().iter(),
    );
    assert!(
        d_out <= tol && d_lse <= tol,
        "{what}: max |out diff| = {d_out:e}, max |lse diff| = {d_lse:e} (tolerance {tol:e})"
    );
}

/// The reference on `paged` equals the reference on `dense` exactly (NaN for
/// NaN), and every jit kernel and the interpreter under every tiling in
/// `interp` agree with it to 2e-5 on both layouts.
pub(crate) fn agree_on_pool_and_rows<'a>(
    program: &Program,
    jits: &[(&str, &attnc::JitKernel)],
    interp: &[(usize, usize)],
    dense: &Inputs<'a>,
    paged: &Inputs<'a>,
    case: &str,
) {
    let want = program.run_reference(dense).unwrap();
    let what = |backend: &str, layout: &str| format!("{case}: {backend} on {layout}");
    let got = program.run_reference(paged).unwrap();
    assert_close(&what("reference", "pages"), &got, &want, 0.0);
    for (layout, inputs) in [("dense rows", dense), ("pages", paged)] {
        for (name, kernel) in jits {
            let got = kernel.run(inputs).unwrap();
            assert_close(&what(name, layout), &got, &want, 2e-5);
        }
        for &(bq, bkv) in interp {
            let got = program
                .run_interp(inputs, attnc::mask::Tiling { bq, bkv })
                .unwrap();
            assert_close(
                &what(&format!("interp {bq}x{bkv}"), layout),
                &got,
                &want,
                2e-5,
            );
        }
    }
}

/// Every spec, page sizes 1, 7, 16 and 64, ragged lengths around page
/// boundaries, decode (Q = 1), speculative verification (Q = 3) and a
/// chunked prefill (Q = 40), GQA ratios 1, 2 and 4: the paged pool and the
/// ragged dense rows give the reference's outputs on every CPU backend, and
/// no stale NaN reaches them.
#[test]
fn paged_and_ragged_calls_match_the_reference_on_every_backend() {
    // Nests: all heads in a tile (H x Q rows fit), a KV head's group (the
    // 16-row tiling with (8, 2, 3, 16)), one head per tile (packed).
    let shapes = [
        (4, 2, 1, 16),
        (4, 1, 3, 24),
        (2, 2, 40, 8),
        (8, 2, 1, 32),
        (8, 2, 3, 16),
    ];
    let mut seed = 0;
    let mut nests = std::collections::BTreeSet::new();
    for src in SPECS {
        let program = program(src);
        let jit = program
            .compile_jit(attnc::mask::Tiling { bq: 64, bkv: 64 }, GemmImpl::detect())
            .unwrap();
        let jit16 = program
            .compile_jit(attnc::mask::Tiling { bq: 16, bkv: 16 }, GemmImpl::detect())
            .unwrap();
        for (si, &shape) in shapes.iter().enumerate() {
            let ps = [1, 7, 16, 64][(seed as usize + si) % 4];
            for bq in [64, 16] {
                let (h, hkv, q, d) = shape;
                let sh = attnc::sema::eval::Shapes {
                    b: 5,
                    h,
                    hkv,
                    q,
                    kv: 1,
                    d,
                };
                let tiling = attnc::mask::Tiling::new(bq, bq).unwrap();
                nests.insert(format!(
                    "{:?}",
                    attnc::driver::nest_for_shapes(
                        &sh,
                        true,
                        attnc::ElemType::F32,
                        attnc::ElemType::F32,
                        tiling,
                        true,
                    )
                ));
            }
            let q = shape.2;
            let lens = [
                q,
                (ps - 1).max(q),
                ps.max(q),
                (ps + 1).max(q),
                150 + si * 31,
            ];
            seed += 1;
            let cache = Cache::new(seed, shape, &lens, ps);
            let dense = cache.dense(&program);
            let paged = cache.paged(&program);
            agree_on_pool_and_rows(
                &program,
                &[("jit 64x64", &jit), ("jit 16x16", &jit16)],
                &[(64, 64), (8, 16)],
                &dense,
                &paged,
                &format!("{src} {shape:?} page {ps} lens {lens:?}"),
            );
        }
    }
    // Decode and verification read the pool in place; a chunked prefill
    // packs its rows, gathered through the table (the one-head in-place
    // nest serves quantized pools: `kv_types`).
    assert_eq!(
        nests.into_iter().collect::<Vec<_>>(),
        [
            "(AllHeads, InPlace)",
            "(GqaGroup, InPlace)",
            "(OneHead, Packed)"
        ],
        "the pools go through every in-place nest"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, rng_seed: proptest::test_runner::RngSeed::Fixed(0x9a6e_d0c5), ..ProptestConfig::default() })]

    /// Random specs of `support::specgen` (masks, score mods and buffers of the
    /// field's patterns) on ragged batches: each sequence's length is 1, a page
    /// less one, a page, a page more or random (at least Q), page sizes 1, 7,
    /// 16 and 64, GQA ratios and key offsets of the generator. The reference on the paged pool
    /// equals the reference on dense rows exactly; the jit (every read
    /// bounds-checked) and the interpreter on the pool and on the dense rows
    /// agree with it to 1e-5, or fail with its error word for word. Stale
    /// slots hold NaN.
    #[test]
    fn paged_pools_agree_with_dense_rows_on_random_specs(
        case in arb_case(),
        ps in prop::sample::select(vec![1usize, 7, 16, 64]),
        picks in prop::collection::vec(0usize..5, 3),
        bq in prop::sample::select(vec![8usize, 16, 64]),
    ) {
        let mut case = case;
        let sh = &mut case.shapes;
        sh.kv_batch = sh.b;
        sh.q_offset = 0;
        sh.kv = sh.kv.max(sh.q);
        let (q, kv) = (sh.q, sh.kv);
        // Sequence 0 is the longest, so `KV` in buffer shapes (kv_offset +
        // max kv_lens) is the generator's kv_offset + kv.
        let lens: Vec<usize> = (0..sh.b)
            .map(|b| if b == 0 { kv } else {
                [1, ps - 1, ps, ps + 1, (kv + 7 * b) % (kv + 1)][picks[b % 3]].clamp(q, kv)
            })
            .collect();
        let program = attnc::load(case.spec.source_file(), &case.spec.options()).unwrap();
        let mut data = case.data();
        for (b, &n) in lens.iter().enumerate() {
            data.k.slice_mut(s![b, .., n.., ..]).fill(f32::NAN);
            data.v.slice_mut(s![b, .., n.., ..]).fill(f32::NAN);
        }
        let lens_arr = Array1::from_iter(lens.iter().map(|&n| n as i32));
        let mut rng = Rng::new(case.seed);
        let (kp, vp, table) = common::paged_pool(&data.k, &data.v, &lens, ps, &mut rng);
        // Every sequence's keys start at the case's key offset.
        let kv_offset = case.shapes.kv_offset;
        let mut dense = Inputs::new(data.q.view(), data.k.view(), data.v.view())
            .kv_lens(lens_arr.view())
            .kv_offset(kv_offset)
            .with_lse();
        dense.buffers = data.buffers.clone();
        let mut paged = Inputs::paged(data.q.view(), kp.view(), vp.view(), table.view(), lens_arr.view())
            .kv_offset(kv_offset)
            .with_lse();
        paged.buffers = data.buffers.clone();
        let reference = program.run_reference(&dense);
        let on_pool = program.run_reference(&paged);
        // Exactly equal, NaN for NaN (a score mod can make `+inf`, and then
        // a row is NaN on both layouts), or the same error.
        agree_to(&format!("reference on the pool, ragged {lens:?} page {ps}"), &case, &reference, on_pool, 0.0)?;
        let options = attnc::CompileOptions {
            tiles: attnc::Tiles::Fixed(attnc::mask::Tiling::new(bq, 16).unwrap()),
            check_proven_loads: true,
            ..Default::default()
        };
        let kernel = program.compile_jit_with(&options).unwrap();
        for (layout, inputs) in [("dense rows", &dense), ("pool", &paged)] {
            let what = format!("ragged {lens:?} page {ps} {layout}");
            agree_to(&format!("jit {bq}x16 {what}"), &case, &reference, kernel.run(inputs), 1e-5)?;
            agree_to(&format!("interp {bq}x16 {what}"), &case, &reference, program.run_interp(inputs, attnc::mask::Tiling { bq, bkv: 16 }), 1e-5)?;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, rng_seed: proptest::test_runner::RngSeed::Fixed(0x0ff5_e7c4), ..ProptestConfig::default() })]

    /// Random specs of `support::specgen` at random query and key offsets,
    /// their keys cut at random points into chunks (empty ones included),
    /// each chunk run on its own at its key offset: on the jit (every read
    /// bounds-checked) and the emulated PTX (f32) a chunk agrees with the
    /// reference on that chunk (or fails with its error word for word), and
    /// the chunks merged by `merge_states` equal the reference on the whole
    /// call. A whole call that fails has a chunk that fails. The keys end no
    /// later than the queries, so every chunk has the whole call's `KV` and
    /// takes the same buffers.
    #[test]
    fn random_key_chunks_merge_into_the_whole(
        case in arb_case(),
        cuts in prop::collection::vec(0usize..=40, 0..4),
    ) {
        let mut case = case;
        let sh = &mut case.shapes;
        sh.q_offset = sh.q_offset.max((sh.kv_offset as usize + sh.kv) as i64 - sh.q as i64);
        let (kv, kv_offset) = (sh.kv, sh.kv_offset);
        let program = attnc::load(case.spec.source_file(), &case.spec.options()).unwrap();
        let data = case.data();
        let whole = program.run_reference(&case.inputs(&data));
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(kv)).chain([0, kv]).collect();
        cuts.sort();
        let options = attnc::CompileOptions {
            tiles: attnc::Tiles::Fixed(attnc::mask::Tiling::new(16, 16).unwrap()),
            check_proven_loads: true,
            ..Default::default()
        };
        let jit = program.compile_jit_with(&options).unwrap();
        let schedule = attnc::codegen::ptx::schedule(case.shapes.d, attnc::codegen::ptx::Dtype::F32);
        let (mut jit_parts, mut ptx_parts, mut failed) = (Vec::new(), Vec::new(), false);
        for w in cuts.windows(2) {
            let mut inputs = Inputs::new(
                data.q.view(),
                data.k.slice(s![.., .., w[0]..w[1], ..]),
                data.v.slice(s![.., .., w[0]..w[1], ..]),
            )
            .q_offset(case.shapes.q_offset)
            .kv_offset(kv_offset + w[0] as i64)
            .with_lse();
            inputs.buffers = data.buffers.clone();
            let reference = program.run_reference(&inputs);
            let what = format!("keys {w:?} of {kv} at offset {kv_offset}");
            let ptx = crate::support::ptx_run::emulate(&program.spec, &schedule, attnc::codegen::ptx::Dtype::F32, &inputs)
                .map_err(|e| program.first_error_of(&inputs, e));
            for (backend, got, parts, tol) in [
                ("jit 16x16", jit.run(&inputs), &mut jit_parts, 1e-5),
                ("ptx f32 (emulated)", ptx, &mut ptx_parts, 1e-4),
            ] {
                match got {
                    Ok(part) => {
                        agree_to(&format!("{backend}, {what}"), &case, &reference, Ok(part.clone()), tol)?;
                        parts.push(part);
                    }
                    Err(e) => agree_to(&format!("{backend}, {what}"), &case, &reference, Err(e), tol)?,
                }
            }
            failed |= reference.is_err();
        }
        match &whole {
            Ok(_) => {
                prop_assert!(!failed, "a chunk failed where the whole call did not");
                for (backend, parts, tol) in [("jit", &jit_parts, 3e-5), ("ptx", &ptx_parts, 2e-4)] {
                    let views: Vec<_> = parts
                        .iter()
                        .map(|p: &Outputs| (p.out.view(), p.lse.as_ref().unwrap().view()))
                        .collect();
                    let merged = merge_states(&views).unwrap();
                    agree_to(&format!("{backend} chunks {cuts:?} merged"), &case, &whole, Ok(merged), tol)?;
                }
            }
            Err(e) => prop_assert!(failed, "the whole call failed ({e}) and no chunk did"),
        }
    }
}

/// A dense call of uniform length whose keys are cut into chunks, each run on
/// its own with `kv_offset` (and the queries' absolute offset), merges back
/// into the unsplit result; so does a split of a ragged decode step.
#[test]
fn key_chunks_with_offsets_merge_into_the_whole() {
    for (i, src) in SPECS.iter().enumerate() {
        let program = program(src);
        let jit = program
            .compile_jit(attnc::mask::Tiling { bq: 32, bkv: 32 }, GemmImpl::detect())
            .unwrap();
        let (b, h, hkv, q, n, d) = (2, 4, 2, 21, 90, 16);
        let cache = Cache::new(100 + i as u64, (h, hkv, q, d), &vec![n; b], 16);
        let offset = (n - q) as i64;
        let whole_inputs = cache.with_buffers(
            &program,
            Inputs::new(cache.q.view(), cache.k.view(), cache.v.view()).q_offset(offset),
        );
        let whole = program.run_reference(&whole_inputs).unwrap();
        let mut rng = Rng::new(7 + i as u64);
        for _ in 0..3 {
            // Random cut points, an empty chunk allowed.
            let mut cuts: Vec<usize> = (0..3)
                .map(|_| (rng.next_u64() % (n as u64 + 1)) as usize)
                .collect();
            cuts.extend([0, n]);
            cuts.sort();
            let mut parts: Vec<Outputs> = Vec::new();
            for w in cuts.windows(2) {
                let (k, v) = (
                    cache.k.slice(s![.., .., w[0]..w[1], ..]),
                    cache.v.slice(s![.., .., w[0]..w[1], ..]),
                );
                let inputs = cache.with_buffers(
                    &program,
                    Inputs::new(cache.q.view(), k, v)
                        .q_offset(offset)
                        .kv_offset(w[0] as i64),
                );
                let part = jit.run(&inputs).unwrap();
                let reference = program.run_reference(&inputs).unwrap();
                assert_close(&format!("{src}: chunk {w:?}"), &part, &reference, 2e-5);
                parts.push(part);
            }
            let views: Vec<_> = parts
                .iter()
                .map(|p| (p.out.view(), p.lse.as_ref().unwrap().view()))
                .collect();
            let merged = merge_states(&views).unwrap();
            assert_close(
                &format!("{src}: chunks {cuts:?} merged"),
                &merged,
                &whole,
                3e-5,
            );
        }
    }
}

/// A long decode step with few sequences splits its key walk across threads
/// (flash-decoding) and merges the chunks: the result is the reference's.
#[test]
fn long_decode_splits_and_merges() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build()
        .unwrap();
    for src in SPECS {
        let program = program(src);
        let jit = program
            .compile_jit(attnc::mask::Tiling { bq: 64, bkv: 64 }, GemmImpl::detect())
            .unwrap();
        let cache = Cache::new(9, (4, 1, 1, 32), &[3000], 16);
        let inputs = cache.paged(&program);
        let want = program.run_reference(&inputs).unwrap();
        let got = pool.install(|| jit.run(&inputs)).unwrap();
        assert_close(&format!("{src}: split decode"), &got, &want, 2e-5);
    }
}

/// The merge of partial results: empty parts drop out, a row no part saw
/// stays 0 / -inf.
#[test]
fn merging_rows_that_saw_nothing() {
    let out = Array4::from_elem((1, 1, 2, 3), 7.0f32);
    let mut lse = Array3::from_elem((1, 1, 2), 0.5f32);
    lse[[0, 0, 1]] = f32::NEG_INFINITY;
    let none_out = Array4::from_elem((1, 1, 2, 3), f32::NAN);
    let none_lse = Array3::from_elem((1, 1, 2), f32::NEG_INFINITY);
    let m = merge_states(&[(out.view(), lse.view()), (none_out.view(), none_lse.view())]).unwrap();
    assert_eq!(m.out.slice(s![0, 0, 0, ..]).to_vec(), vec![7.0; 3]);
    assert_eq!(m.out.slice(s![0, 0, 1, ..]).to_vec(), vec![0.0; 3]);
    assert_eq!(
        m.lse.unwrap().into_raw_vec_and_offset().0,
        vec![0.5, f32::NEG_INFINITY]
    );
}

/// Keys a sliding window hides hold NaN in K and V: they never reach a row,
/// read in place from dense rows or pages (the in-place products skip keys of
/// probability 0).
#[test]
fn nan_at_keys_the_mask_hides_never_reaches_a_row() {
    let program = program(SPECS[2]);
    let jit = program
        .compile_jit(attnc::mask::Tiling { bq: 64, bkv: 64 }, GemmImpl::detect())
        .unwrap();
    for (shape, ps) in [((4, 2, 1, 16), 16), ((2, 2, 5, 8), 7), ((2, 1, 40, 8), 1)] {
        let lens = [200, 121, 64 + shape.2];
        let mut cache = Cache::new(3, shape, &lens, ps);
        for (b, &n) in lens.iter().enumerate() {
            // The window is 37: key j is hidden from every query row when
            // j <= n - Q - 37.
            let hidden = n - shape.2 - 36;
            for j in 0..hidden {
                cache.k.slice_mut(s![b, .., j, ..]).fill(f32::NAN);
                cache.v.slice_mut(s![b, .., j, ..]).fill(f32::NAN);
                let page = cache.table[[b, j / ps]] as usize;
                cache
                    .k_pages
                    .slice_mut(s![page, j % ps, .., ..])
                    .fill(f32::NAN);
                cache
                    .v_pages
                    .slice_mut(s![page, j % ps, .., ..])
                    .fill(f32::NAN);
            }
        }
        let want = program.run_reference(&cache.dense(&program)).unwrap();
        assert!(want.out.iter().all(|x| x.is_finite()));
        for inputs in [cache.dense(&program), cache.paged(&program)] {
            assert_close(
                &format!("{shape:?} page {ps}"),
                &jit.run(&inputs).unwrap(),
                &want,
                2e-5,
            );
            assert_close(
                &format!("{shape:?} page {ps} interp"),
                &program
                    .run_interp(&inputs, attnc::mask::Tiling { bq: 8, bkv: 16 })
                    .unwrap(),
                &want,
                2e-5,
            );
        }
    }
}

/// Pools and caches given as views of other layouts: a pool stored
/// `[pages, HKV, page_size, D]` and permuted to the pool's axes (read in
/// place at its strides), and k/v views with a reversed head axis (a
/// negative stride: copied to the standard layout first) give the same
/// outputs as the standard arrays.
#[test]
fn views_of_other_layouts_give_the_same_outputs() {
    let program = program(SPECS[3]);
    let jit = program
        .compile_jit(attnc::mask::Tiling { bq: 64, bkv: 64 }, GemmImpl::detect())
        .unwrap();
    let cache = Cache::new(21, (4, 2, 1, 16), &[40, 75, 9], 7);
    let want = jit.run(&cache.paged(&program)).unwrap();
    // [pages, HKV, ps, D] in memory, viewed as [pages, ps, HKV, D].
    let kp = cache
        .k_pages
        .view()
        .permuted_axes([0, 2, 1, 3])
        .as_standard_layout()
        .into_owned();
    let vp = cache
        .v_pages
        .view()
        .permuted_axes([0, 2, 1, 3])
        .as_standard_layout()
        .into_owned();
    let (kp, vp) = (
        kp.view().permuted_axes([0, 2, 1, 3]),
        vp.view().permuted_axes([0, 2, 1, 3]),
    );
    assert!(!kp.is_standard_layout());
    let inputs = cache.with_buffers(
        &program,
        Inputs::paged(
            cache.q.view(),
            kp,
            vp,
            cache.table.view(),
            cache.lens.view(),
        ),
    );
    assert_eq!(jit.run(&inputs).unwrap(), want);
    // Dense rows with the KV heads stored in reverse order, viewed forwards.
    let rev = |a: &Array4<f32>| {
        let mut r = a.view();
        r.invert_axis(attnc::ndarray::Axis(1));
        r.as_standard_layout().into_owned()
    };
    let (kr, vr) = (rev(&cache.k), rev(&cache.v));
    let (mut kv, mut vv) = (kr.view(), vr.view());
    kv.invert_axis(attnc::ndarray::Axis(1));
    vv.invert_axis(attnc::ndarray::Axis(1));
    assert!(kv.strides()[1] < 0);
    let dense = cache.with_buffers(
        &program,
        Inputs::new(cache.q.view(), kv, vv).kv_lens(cache.lens.view()),
    );
    let want_dense = jit.run(&cache.dense(&program)).unwrap();
    assert_eq!(jit.run(&dense).unwrap(), want_dense);
}

/// A call with no sequence (B = 0: dense, ragged or paged) or no query head
/// (H = 0) returns empty outputs on every backend and at every tile size,
/// as the reference does, also where the mask reads `b` or `h` (and there is
/// then no block map at all); the flex export of those maps is empty.
#[test]
fn calls_with_no_sequence_or_no_head_give_empty_outputs_at_every_tile_size() {
    use attnc::mask::Tiling;
    use attnc::{CompileOptions, Tiles};
    let tilings = [None, Some((16, 16)), Some((1, 16)), Some((32, 64))];
    for src in [
        "attention dense { }",
        "attention c { mask = causal && h >= 0 && b >= 0 }",
    ] {
        let program = program(src);
        for (b, h, hkv, ragged, paged) in [
            (0, 2, 2, false, false),
            (0, 2, 1, true, false),
            (0, 2, 2, false, true),
            (1, 0, 1, false, false),
        ] {
            let q = Array4::<f32>::zeros((b, h, 3, 8));
            let k = Array4::<f32>::zeros((b, hkv, 5, 8));
            let pool = Array4::<f32>::zeros((2, 4, hkv, 8));
            let table = Array2::<i32>::zeros((b, 2));
            let lens = Array1::<i32>::zeros(b);
            let mut inputs = if paged {
                Inputs::paged(
                    q.view(),
                    pool.view(),
                    pool.view(),
                    table.view(),
                    lens.view(),
                )
            } else {
                Inputs::new(q.view(), k.view(), k.view())
            };
            if ragged {
                inputs = inputs.kv_lens(lens.view());
            }
            let inputs = inputs.with_lse();
            let case = format!("{src} B{b} H{h} HKV{hkv} ragged {ragged} paged {paged}");
            let want = program.run_reference(&inputs).unwrap();
            assert_eq!(want.out.shape(), &[b, h, 3, 8], "{case}");
            for tiles in tilings {
                let tiles = tiles.map_or(Tiles::Auto, |(bq, bkv)| {
                    Tiles::Fixed(Tiling::new(bq, bkv).unwrap())
                });
                let jit = program
                    .compile_jit_with(&CompileOptions {
                        tiles,
                        ..CompileOptions::default()
                    })
                    .unwrap();
                let got = jit
                    .run(&inputs)
                    .unwrap_or_else(|e| panic!("{case} {tiles:?}: {e}"));
                assert_eq!(got.out, want.out, "{case} {tiles:?}");
                assert_eq!(got.lse, want.lse, "{case} {tiles:?}");
                let maps = jit.block_maps(&inputs).unwrap();
                assert_eq!(maps.tiling(), jit.tiling(), "{case} {tiles:?}");
                let flex = maps.to_flex();
                let per_b = if maps.depends_on_b() { b } else { 1 };
                let per_h = if maps.depends_on_h() { h } else { 1 };
                assert_eq!(flex.kv_num_blocks.dim().0, per_b, "{case} {tiles:?}");
                assert_eq!(flex.kv_num_blocks.dim().1, per_h, "{case} {tiles:?}");
                let tiling = Tiling::new(16, 16).unwrap();
                let interp = program.run_interp(&inputs, tiling).unwrap();
                assert_eq!(interp.out, want.out, "{case}");
            }
        }
    }
}

/// The flex export of a ragged batch: the key axis is as long as the longest
/// sequence's, each sequence's counts and first indices are its own map's
/// (a shorter first sequence once made the export index past its rows).
#[test]
fn flex_export_of_a_ragged_batch_spans_the_longest_sequence() {
    let program = program("attention c { mask = causal }");
    let jit = program
        .compile_jit(
            attnc::mask::Tiling::new(16, 16).unwrap(),
            GemmImpl::detect(),
        )
        .unwrap();
    let q = Array4::<f32>::zeros((3, 2, 4, 8));
    let k = Array4::<f32>::zeros((3, 2, 200, 8));
    let lens = Array1::from(vec![16, 200, 37]);
    let inputs = Inputs::new(q.view(), k.view(), k.view()).kv_lens(lens.view());
    let maps = jit.block_maps(&inputs).unwrap();
    let flex = maps.to_flex();
    assert_eq!(flex.kv_indices.dim(), (3, 1, 1, 13));
    for (b, &n) in lens.iter().enumerate() {
        let map = maps.get(b, 0);
        assert_eq!(map.kv_tiles(), (n as usize).div_ceil(16));
        // The queries are the last 4 positions: one partial tile (the last),
        // the tiles before it full.
        let partial: Vec<i32> = map.partial(0).iter().map(|&t| t as i32).collect();
        let used = flex.kv_num_blocks[[b, 0, 0]] as usize;
        assert_eq!(
            flex.kv_indices.slice(s![b, 0, 0, ..used]).to_vec(),
            partial,
            "sequence {b}"
        );
        let full = flex.full_kv_num_blocks[[b, 0, 0]] as usize;
        let want_full: Vec<i32> = map
            .full_ranges(0)
            .iter()
            .flat_map(|r| r.clone())
            .map(|t| t as i32)
            .collect();
        assert_eq!(
            flex.full_kv_indices.slice(s![b, 0, 0, ..full]).to_vec(),
            want_full,
            "sequence {b}"
        );
    }
}
