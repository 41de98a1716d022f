//! Block-map analysis: the map equals the element-wise classification (sound
//! and exact) for random specs, shapes, tilings and offsets; text-grid
//! snapshots of every example; bad inputs; the `attnc blocks` command.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use attnc::bind::{bind, Bound, Inputs};
use attnc::mask::{self, render, BlockMaps, MaskError, TileClass, Tiling};
use attnc::sema::eval::{EvalError, Evaluator, Point};
use attnc::sema::{Deps, Spec, Type};
use attnc::{BufferData, SourceFile, SpecOptions};
use ndarray::{Array4, ArrayD, IxDyn};
use proptest::prelude::*;

/// A deterministic pseudo-random sequence.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Binds `spec` to dummy q/k/v of the given shapes (D = 1) and `buffers`.
fn bound(
    spec: &Spec,
    b: usize,
    h: usize,
    q: usize,
    kv: usize,
    q_offset: i64,
    buffers: BTreeMap<String, BufferData>,
) -> Bound {
    let one = Array4::<f32>::zeros((1, 1, 1, 1));
    let qv = one.broadcast((b, h, q, 1)).unwrap();
    let kvv = one.broadcast((b, h, kv, 1)).unwrap();
    let mut inputs = Inputs::new(qv, kvv, kvv).q_offset(q_offset);
    inputs.buffers = buffers;
    bind(spec, &inputs).unwrap()
}

/// The element-wise classification of every tile of every (b, h).
fn brute(spec: &Spec, bound: &Bound, t: Tiling) -> Result<Vec<Vec<Vec<TileClass>>>, EvalError> {
    let sh = bound.shapes();
    let mut ev = Evaluator::new(spec, sh, bound.buffers());
    let (qn, kn) = (sh.q.div_ceil(t.bq), bound.kv_rows().div_ceil(t.bkv));
    let mut all = Vec::new();
    for b in 0..sh.b {
        for h in 0..sh.h {
            let mut rows = Vec::new();
            for qt in 0..qn {
                let mut row = Vec::new();
                for kt in 0..kn {
                    let (mut vis, mut masked) = (false, false);
                    for r in qt * t.bq..((qt + 1) * t.bq).min(sh.q) {
                        for k in kt * t.bkv..((kt + 1) * t.bkv).min(bound.kv_rows()) {
                            let v = match spec.mask {
                                Some(m) => ev.eval_bool(
                                    m,
                                    Point {
                                        b: b as i64,
                                        h: h as i64,
                                        q: r as i64 + bound.q_offset(),
                                        kv: k as i64,
                                        score: 0.0,
                                    },
                                )?,
                                None => true,
                            };
                            if v {
                                vis = true;
                            } else {
                                masked = true;
                            }
                        }
                    }
                    row.push(match (vis, masked) {
                        (true, true) => TileClass::Partial,
                        (true, false) => TileClass::Full,
                        _ => TileClass::Empty,
                    });
                }
                rows.push(row);
            }
            all.push(rows);
        }
    }
    Ok(all)
}

/// Checks the maps against the brute-force classes and the layout
/// invariants of the data structure.
fn check_maps(spec: &Spec, bound: &Bound, maps: &BlockMaps, expected: &[Vec<Vec<TileClass>>]) {
    let sh = bound.shapes();
    let deps = spec.mask.map(|m| spec.deps(m)).unwrap_or(Deps::NONE);
    assert_eq!(
        maps.is_shared(),
        !deps.intersects(Deps(Deps::B.0 | Deps::H.0))
    );
    for b in 0..sh.b {
        for h in 0..sh.h {
            let m = maps.get(b, h);
            let want = &expected[b * sh.h + h];
            assert_eq!(m.q_tiles(), want.len());
            let mut counts = (0u64, 0u64);
            for (qt, row) in want.iter().enumerate() {
                assert_eq!(m.kv_tiles(), row.len());
                let ranges = m.full_ranges(qt);
                for w in ranges.windows(2) {
                    assert!(
                        w[0].end < w[1].start,
                        "full ranges must be ascending, disjoint and not adjacent: {ranges:?}"
                    );
                }
                assert!(ranges.iter().all(|r| r.start < r.end));
                assert!(m.partial(qt).windows(2).all(|w| w[0] < w[1]));
                for (kt, &c) in row.iter().enumerate() {
                    assert_eq!(
                        m.class(qt, kt),
                        c,
                        "tile ({qt}, {kt}) of (b, h) = ({b}, {h})"
                    );
                    counts.0 += u64::from(c == TileClass::Full);
                    counts.1 += u64::from(c == TileClass::Partial);
                }
                let listed: Vec<(u32, TileClass)> = m.tiles(qt).collect();
                let want_listed: Vec<(u32, TileClass)> = row
                    .iter()
                    .enumerate()
                    .filter(|(_, &c)| c != TileClass::Empty)
                    .map(|(k, &c)| (k as u32, c))
                    .collect();
                assert_eq!(listed, want_listed);
            }
            let s = m.stats();
            assert_eq!((s.full, s.partial), counts);
        }
    }
}

// ---------------------------------------------------------------------------
// Property test: random specs from the attention patterns.

const DECLS: &str = "
    buffer doc[KV]: int
    buffer global[KV]: bool
    buffer layout[32, 32]: bool
    buffer parent[KV]: int
    buffer hw[H]: int
";

fn atom() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("causal".to_string()),
        (-5i64..40).prop_map(|w| format!("q - kv < {w}")),
        (-5i64..40).prop_map(|w| format!("kv - q <= {w}")),
        (0i64..60).prop_map(|p| format!("kv < {p}")),
        (0i64..60).prop_map(|p| format!("q >= {p}")),
        (1i64..30).prop_map(|c| format!("q / {c} == kv / {c}")),
        (1i64..30, 0i64..10).prop_map(|(c, s)| format!("(q + {s}) / {c} != kv / {c}")),
        (1i64..6).prop_map(|d| format!("(q - kv) % {d} == 0")),
        (2i64..7, 0i64..3).prop_map(|(d, r)| format!("kv % {d} == {r}")),
        (0i64..30).prop_map(|w| format!("abs(q - kv) <= {w}")),
        (0i64..60).prop_map(|c| format!("min(q, kv) > {c}")),
        (0i64..60).prop_map(|c| format!("max(q, kv) < {c}")),
        (0i64..10).prop_map(|c| format!("clamp(q - kv, 0, {c}) == {c}")),
        (-20i64..60).prop_map(|c| format!("2 * q - kv < {c}")),
        (0i64..120).prop_map(|c| format!("q + kv < {c}")),
        (-30i64..30).prop_map(|c| format!("3 * kv - 2 * q >= {c}")),
        (0i64..60, 0i64..60, 0i64..60)
            .prop_map(|(c, d, e)| format!("if q > {c} {{ kv < {d} }} else {{ kv >= {e} }}")),
        (1i64..12, 0i64..3).prop_map(|(w, r)| format!(
            "abs(q / {w} - kv / {w}) <= {r} && abs(q % {w} - kv % {w}) <= {r}"
        )),
        Just("q < KV && doc[q] == doc[kv]".to_string()),
        Just("doc[q] == doc[kv]".to_string()),
        Just("doc[kv] <= doc[min(q, KV - 1)]".to_string()),
        Just("global[kv]".to_string()),
        Just("q < KV && global[q]".to_string()),
        Just("layout[q / 8, kv / 8]".to_string()),
        Just("layout[q / 5, kv / 3]".to_string()),
        Just("q < KV && ancestor(parent, q, kv)".to_string()),
        Just("q - kv < hw[h]".to_string()),
        Just("kv + h < q + b".to_string()),
        (-5i64..20).prop_map(|c| format!("float(q - kv) * 0.5 < {c}.0")),
        Just("float(kv) < float(q) * 0.75".to_string()),
        (0i64..60).prop_map(|c| format!("q != {c} && kv / (q - {c}) >= 1")),
        (0i64..60).prop_map(|c| format!("kv / (q - {c}) >= 0")),
    ]
}

fn mask_expr() -> impl Strategy<Value = String> {
    atom().prop_recursive(3, 12, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) && ({b})")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) || ({b})")),
            inner.prop_map(|a| format!("!({a})")),
        ]
    })
}

/// Buffers for the property test, from a seed.
fn random_buffers(seed: u64, kv: usize, h: usize) -> BTreeMap<String, BufferData> {
    let mut rng = Lcg(seed);
    let mut buffers = BTreeMap::new();
    // Document ids: sorted runs, or arbitrary small ids.
    let doc: Vec<i64> = if rng.below(2) == 0 {
        let mut id = 0;
        (0..kv)
            .map(|_| {
                if rng.below(12) == 0 {
                    id += 1;
                }
                id
            })
            .collect()
    } else {
        (0..kv).map(|_| rng.below(4) as i64).collect()
    };
    let density = rng.below(4);
    let global: Vec<bool> = (0..kv).map(|_| rng.below(10) < density).collect();
    let layout: Vec<bool> = (0..32 * 32).map(|_| rng.below(2) == 0).collect();
    // Parents: an ordered forest, a forest in another order, or (rarely) a
    // cycle, which `ancestor` reports as an error.
    let parent: Vec<i64> = match rng.below(5) {
        0..=2 => (0..kv)
            .map(|x| {
                if x == 0 {
                    -1
                } else {
                    rng.below(x as u64 + 1) as i64 - 1
                }
            })
            .collect(),
        3 => {
            let mut order: Vec<usize> = (0..kv).collect();
            for i in (1..kv).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let mut p = vec![-1i64; kv];
            for i in 1..kv {
                p[order[i]] = order[rng.below(i as u64) as usize] as i64;
            }
            p
        }
        _ => (0..kv)
            .map(|x| {
                if x > 0 && rng.below(3) == 0 {
                    x as i64
                } else {
                    -1
                }
            })
            .collect(),
    };
    let hw: Vec<i64> = (0..h).map(|_| rng.below(20) as i64).collect();
    buffers.insert(
        "doc".into(),
        BufferData::Int(ArrayD::from_shape_vec(IxDyn(&[kv]), doc).unwrap()),
    );
    buffers.insert(
        "global".into(),
        BufferData::Bool(ArrayD::from_shape_vec(IxDyn(&[kv]), global).unwrap()),
    );
    buffers.insert(
        "layout".into(),
        BufferData::Bool(ArrayD::from_shape_vec(IxDyn(&[32, 32]), layout).unwrap()),
    );
    buffers.insert(
        "parent".into(),
        BufferData::Int(ArrayD::from_shape_vec(IxDyn(&[kv]), parent).unwrap()),
    );
    buffers.insert(
        "hw".into(),
        BufferData::Int(ArrayD::from_shape_vec(IxDyn(&[h]), hw).unwrap()),
    );
    buffers
}

fn load(src: &str) -> Spec {
    match attnc::load(SourceFile::new("prop.attn", src), &SpecOptions::default()) {
        Ok(p) => p.spec,
        Err(e) => panic!("generated spec does not check:\n{src}\n{}", e.render()),
    }
}

proptest! {
    // PROPTEST_CASES=N runs more cases.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(1000),
        ..ProptestConfig::default()
    })]

    #[test]
    fn maps_equal_the_elementwise_classification(
        mask in mask_expr(),
        q in 0usize..=90,
        kv in 0usize..=90,
        bq in 1usize..70,
        bkv in 1usize..70,
        q_offset in 0i64..40,
        b in 1usize..=2,
        h in 1usize..=2,
        seed in any::<u64>(),
    ) {
        let src = format!("attention prop {{ {DECLS} mask = {mask} }}");
        let spec = load(&src);
        // Buffers indexed by position cover KV, the end of the call's positions.
        let kv_end = kv.max(q_offset as usize + q);
        let bound = bound(&spec, b, h, q, kv, q_offset, random_buffers(seed, kv_end, h));
        let tiling = Tiling::new(bq, bkv).unwrap();
        let got = mask::classify(&spec, &bound, tiling);
        let want = brute(&spec, &bound, tiling);
        match (got, want) {
            (Ok(maps), Ok(want)) => check_maps(&spec, &bound, &maps, &want),
            (Err(MaskError::Eval(_)), Err(_)) => {}
            (got, want) => prop_assert!(false, "classify gave {:?}, element-wise evaluation gave {:?}", got.map(|_| "a map"), want.map(|_| "classes")),
        }
    }
}

// ---------------------------------------------------------------------------
// Snapshots of every example at Q = KV = 256 with 32 x 32 tiles.

/// Params that make each example interesting at 256 tokens.
fn example_params(name: &str) -> Vec<(&'static str, &'static str)> {
    match name {
        "chunked" => vec![("chunk", "96")],
        "dilated_sliding" => vec![("window", "24"), ("dilation", "3")],
        "gemma2_local" => vec![("window", "80")],
        "longformer_global" => vec![("window", "64")],
        "neighborhood_2d" => vec![("W", "16"), ("R", "2")],
        "prefix_lm" => vec![("prefix", "72")],
        "sliding_window" => vec![("window", "64")],
        "sliding_window_bidir" => vec![("window", "64")],
        "spec_tree" => vec![("prompt", "160")],
        "streaming_llm" => vec![("sinks", "8"), ("window", "96")],
        _ => vec![],
    }
}

/// Deterministic buffers for the examples, by name and declared type.
fn example_buffer(spec: &Spec, name: &str, shape: &[usize]) -> BufferData {
    let n: usize = shape.iter().product();
    let prompt = spec.param_id("prompt").map(|p| match spec.param(p).value {
        attnc::sema::Value::Int(v) => v,
        _ => 0,
    });
    let decl = spec.buffer(spec.buffer_id(name).unwrap());
    match (name, decl.elem) {
        // Documents of lengths 40, 80, 80 and the rest.
        ("doc", Type::Int) => BufferData::Int(ArrayD::from_shape_fn(IxDyn(shape), |i| {
            [40, 120, 200].iter().filter(|&&s| i[0] >= s).count() as i64
        })),
        // Global tokens 0, 1 and 130.
        ("global", Type::Bool) => BufferData::Bool(ArrayD::from_shape_fn(IxDyn(shape), |i| {
            [0, 1, 130].contains(&i[0])
        })),
        // Diagonal blocks, the first block column, and ~20% random blocks.
        ("layout", Type::Bool) => {
            let mut rng = Lcg(42);
            let v: Vec<bool> = (0..n).map(|_| rng.below(5) == 0).collect();
            BufferData::Bool(ArrayD::from_shape_fn(IxDyn(shape), |i| {
                i[0] == i[1] || i[1] == 0 || v[i[0] * shape[1] + i[1]]
            }))
        }
        // A binary tree after the prompt, rooted at the first draft token.
        ("parent", Type::Int) => {
            let p = prompt.unwrap_or(0) as usize;
            BufferData::Int(ArrayD::from_shape_fn(IxDyn(shape), |i| {
                if i[0] <= p {
                    -1
                } else {
                    (p + (i[0] - p - 1) / 2) as i64
                }
            }))
        }
        (_, Type::Int) => BufferData::Int(ArrayD::from_shape_fn(IxDyn(shape), |i| {
            (i[0] * 4 / shape[0].max(1)) as i64
        })),
        (_, Type::Bool) => BufferData::Bool(ArrayD::from_shape_fn(IxDyn(shape), |i| {
            ndarray::Dimension::slice(&i).iter().sum::<usize>() % 3 == 0
        })),
        (_, Type::Float) => BufferData::Float(ArrayD::from_elem(IxDyn(shape), 0.5)),
    }
}

/// Loads an example with its snapshot params and builds its maps.
fn example_maps(path: &Path, q: usize, kv: usize, tiling: Tiling) -> (Spec, Bound, BlockMaps) {
    let name = path.file_stem().unwrap().to_string_lossy().into_owned();
    let params = example_params(&name)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let program = attnc::load(
        SourceFile::read(path).unwrap(),
        &SpecOptions {
            entry: None,
            params,
        },
    )
    .unwrap();
    let spec = program.spec;
    let shapes = attnc::sema::eval::Shapes {
        b: 1,
        h: 1,
        hkv: 1,
        q,
        kv,
        d: 1,
    };
    let mut buffers = BTreeMap::new();
    for decl in &spec.buffers {
        let shape: Vec<usize> = shapes.buffer_shape(decl).unwrap();
        buffers.insert(decl.name.clone(), example_buffer(&spec, &decl.name, &shape));
    }
    let bound = bound(&spec, 1, 1, q, kv, 0, buffers);
    let maps = mask::classify(&spec, &bound, tiling).unwrap();
    (spec, bound, maps)
}

fn example_paths() -> Vec<std::path::PathBuf> {
    let mut paths: Vec<_> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "attn"))
            .collect();
    paths.sort();
    paths
}

#[test]
fn example_grids() {
    let tiling = Tiling::new(32, 32).unwrap();
    for path in example_paths() {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let (spec, bound, maps) = example_maps(&path, 256, 256, tiling);
        // The snapshot shows what the analysis computed; check it is exact.
        check_maps(&spec, &bound, &maps, &brute(&spec, &bound, tiling).unwrap());
        let map = maps.get(0, 0);
        let params: Vec<String> = example_params(&name)
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let text = format!(
            "{}\nparams: {}\n{}{}",
            render::title(&spec.name, map),
            if params.is_empty() {
                "(defaults)".to_string()
            } else {
                params.join(" ")
            },
            render::grid(map, render::GRID_ROWS, render::GRID_COLS),
            render::stats_text(&map.stats())
        );
        insta::assert_snapshot!(format!("grid_{name}"), text);
    }
}

#[test]
fn examples_are_exact_on_ragged_shapes_and_odd_tiles() {
    for path in example_paths() {
        for (q, kv, bq, bkv) in [(100, 100, 7, 13), (61, 61, 64, 16), (97, 97, 1, 33)] {
            let tiling = Tiling::new(bq, bkv).unwrap();
            let (spec, bound, maps) = example_maps(&path, q, kv, tiling);
            check_maps(&spec, &bound, &maps, &brute(&spec, &bound, tiling).unwrap());
        }
    }
}

// ---------------------------------------------------------------------------
// Large maps: the structure of causal and sliding-window maps.

fn no_buffers(src: &str, q: usize, kv: usize, q_offset: i64) -> (Spec, Bound) {
    let spec = load(src);
    let bound = bound(&spec, 1, 1, q, kv, q_offset, BTreeMap::new());
    (spec, bound)
}

#[test]
#[allow(clippy::single_range_in_vec_init)]
fn causal_million_by_million_is_one_range_and_one_partial_per_row() {
    let n = 1 << 20;
    let (spec, bound) = no_buffers("attention c { mask = causal }", n, n, 0);
    let maps = mask::classify(&spec, &bound, Tiling::new(128, 128).unwrap()).unwrap();
    let m = maps.get(0, 0);
    assert_eq!((m.q_tiles(), m.kv_tiles()), (8192, 8192));
    for qt in 0..m.q_tiles() {
        let want_full: &[std::ops::Range<u32>] = if qt == 0 { &[] } else { &[0..qt as u32] };
        assert_eq!(m.full_ranges(qt), want_full);
        assert_eq!(m.partial(qt), &[qt as u32]);
    }
    let s = m.stats();
    assert_eq!(s.partial, 8192);
    assert_eq!(s.full, 8192 * 8191 / 2);
}

/// Sub-expressions the interval rules follow loosely are evaluated exactly
/// over a box: a per-head window computed from `h` (a constant per head),
/// and the coordinates of a Morton index (bit operators on `q` alone and
/// `kv` alone). Their maps build with a few element evaluations per tile,
/// not the element-by-element fallback, and equal the element-wise
/// classification.
#[test]
fn per_head_constants_and_bit_coordinates_are_folded() {
    let head_window =
        "attention w {\n let w = int(exp2(float(h + 4)))\n mask = causal && q - kv < w }";
    let morton = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/natten_morton.attn"),
    )
    .unwrap();
    for (src, h, n) in [(head_window, 8, 1024), (morton.as_str(), 1, 512)] {
        let spec = load(src);
        let bound = bound(&spec, 1, h, n, n, 0, BTreeMap::new());
        let t = Tiling::new(64, 64).unwrap();
        let maps = mask::classify(&spec, &bound, t).unwrap();
        let want = brute(&spec, &bound, t).unwrap();
        for (i, rows) in want.iter().enumerate() {
            let m = maps.get(0, i % h);
            for (qt, row) in rows.iter().enumerate() {
                for (kt, class) in row.iter().enumerate() {
                    assert_eq!(m.class(qt, kt), *class, "{src}: h={i} tile ({qt}, {kt})");
                }
            }
        }
        // A few probe elements per tile at most (partial tiles are told
        // by their corners), against n^2 per head element by element.
        let tiles = (h * n.div_ceil(64) * n.div_ceil(64)) as u64;
        let elements = maps.counts().element_evaluations;
        assert!(
            elements <= 5 * tiles,
            "{src}: {elements} element evaluations for {tiles} tiles"
        );
    }
    // Folded sub-expressions that may fail (a division by a q-dependent
    // value, a shift) leave the failing boxes to the rules: still exact, and
    // the error is the element-wise one.
    for src in [
        "attention m { mask = ((q % 7) ^ 3) == kv % 5 || (q >> 2) == (kv >> 3) }",
        "attention x { mask = (q ^ 5) / (kv % 3 - 1) > 2 }",
        "attention d { mask = q != 6 && 36 / (q - 6) > kv % 4 }",
        "attention s { mask = (1 << (q % 70)) > kv }",
    ] {
        let spec = load(src);
        let bound = bound(&spec, 1, 1, 200, 200, 0, BTreeMap::new());
        let t = Tiling::new(16, 32).unwrap();
        match (mask::classify(&spec, &bound, t), brute(&spec, &bound, t)) {
            (Ok(maps), Ok(want)) => {
                for (qt, row) in want[0].iter().enumerate() {
                    for (kt, class) in row.iter().enumerate() {
                        assert_eq!(maps.get(0, 0).class(qt, kt), *class, "{src}: ({qt}, {kt})");
                    }
                }
            }
            (Err(mask::MaskError::Eval(e)), Err(f)) => assert_eq!(e, f, "{src}"),
            (got, want) => panic!("{src}: {:?} vs {:?}", got.map(|_| ()), want.map(|_| ())),
        }
    }
}

#[test]
fn sliding_window_with_offset_and_unaligned_tiles() {
    // Decode-style: 1000 new queries after 50,000 cached keys, window 300.
    let (spec, bound) = no_buffers(
        "attention s { mask = causal && q - kv < 300 }",
        1000,
        51000,
        50000,
    );
    let tiling = Tiling::new(48, 80).unwrap();
    let maps = mask::classify(&spec, &bound, tiling).unwrap();
    let m = maps.get(0, 0);
    // Check every tile of every row against the element-wise rule.
    for qt in 0..m.q_tiles() {
        let rows = m.q_rows(qt);
        let (q0, q1) = (rows.start as i64 + 50000, rows.end as i64 - 1 + 50000);
        for kt in 0..m.kv_tiles() {
            let cols = m.kv_cols(kt);
            let (k0, k1) = (cols.start as i64, cols.end as i64 - 1);
            // q - kv takes every integer in [q0 - k1, q1 - k0] over the
            // tile; the mask is 0 <= q - kv < 300.
            let (dlo, dhi) = (q0 - k1, q1 - k0);
            let any = dlo <= 299 && dhi >= 0;
            let all = dlo >= 0 && dhi <= 299;
            let want = match (any, all) {
                (true, true) => TileClass::Full,
                (false, _) => TileClass::Empty,
                _ => TileClass::Partial,
            };
            assert_eq!(m.class(qt, kt), want, "tile ({qt}, {kt})");
        }
    }
}

#[test]
#[allow(clippy::single_range_in_vec_init)]
fn document_mask_at_scale_has_few_partial_tiles() {
    // 131072 tokens in 8 sorted documents: partial tiles only at document
    // starts and on the diagonal.
    let n = 1 << 17;
    let spec = load("attention d { buffer doc[KV]: int mask = doc[q] == doc[kv] && causal }");
    let doc = ArrayD::from_shape_fn(IxDyn(&[n]), |i| (i[0] * 8 / n) as i64);
    let bound = bound(
        &spec,
        1,
        1,
        n,
        n,
        0,
        BTreeMap::from([("doc".to_string(), BufferData::Int(doc))]),
    );
    let maps = mask::classify(&spec, &bound, Tiling::new(128, 128).unwrap()).unwrap();
    let m = maps.get(0, 0);
    let s = m.stats();
    // Documents are tile-aligned here, so only the diagonal is partial.
    assert_eq!(s.partial, 1024);
    for qt in (0..1024).step_by(97) {
        let doc_start = (qt / 128 * 128) as u32;
        let want: &[std::ops::Range<u32>] = if qt as u32 == doc_start {
            &[]
        } else {
            &[doc_start..qt as u32]
        };
        assert_eq!(m.full_ranges(qt), want);
    }
}

// ---------------------------------------------------------------------------
// Sharing, FlexAttention export, bad inputs.

#[test]
fn head_dependent_masks_get_one_map_per_head() {
    let spec = load("attention a { buffer w[H]: int mask = causal && q - kv < w[h] }");
    let w = ArrayD::from_shape_vec(IxDyn(&[3]), vec![1i64, 8, 64]).unwrap();
    let bound = bound(
        &spec,
        2,
        3,
        64,
        64,
        0,
        BTreeMap::from([("w".to_string(), BufferData::Int(w))]),
    );
    let maps = mask::classify(&spec, &bound, Tiling::new(8, 8).unwrap()).unwrap();
    assert!(!maps.is_shared() && maps.depends_on_h() && !maps.depends_on_b());
    assert_eq!(maps.maps().len(), 3);
    assert_eq!(maps.get(0, 1), maps.get(1, 1));
    assert_ne!(maps.get(0, 0), maps.get(0, 2));
    let total = maps.stats_total();
    let by_hand = (0..3)
        .map(|h| maps.get(0, h).stats())
        .fold(attnc::mask::BlockStats::default(), |a, s| a.add(&s))
        .times(2);
    assert_eq!(
        (total.full, total.partial, total.empty, total.maps),
        (by_hand.full, by_hand.partial, by_hand.empty, 6)
    );
    let flex = maps.to_flex();
    assert_eq!(flex.kv_num_blocks.shape(), &[1, 3, 8]);
    assert_eq!(flex.full_kv_indices.shape(), &[1, 3, 8, 8]);
}

#[test]
fn flex_export_matches_dense_block_masks() {
    let (spec, bound) = no_buffers(
        "attention s { mask = causal && q - kv < 20 || kv < 3 }",
        70,
        70,
        0,
    );
    let tiling = Tiling::new(16, 8).unwrap();
    let maps = mask::classify(&spec, &bound, tiling).unwrap();
    let classes = brute(&spec, &bound, tiling).unwrap();
    let flex = maps.to_flex();
    for (qt, row) in classes[0].iter().enumerate() {
        for (kind, num, idx) in [
            (TileClass::Partial, &flex.kv_num_blocks, &flex.kv_indices),
            (
                TileClass::Full,
                &flex.full_kv_num_blocks,
                &flex.full_kv_indices,
            ),
        ] {
            let selected: Vec<i32> = (0..row.len())
                .filter(|&k| row[k] == kind)
                .map(|k| k as i32)
                .collect();
            let rest: Vec<i32> = (0..row.len())
                .filter(|&k| row[k] != kind)
                .map(|k| k as i32)
                .collect();
            assert_eq!(num[[0, 0, qt]] as usize, selected.len());
            let got: Vec<i32> = idx
                .slice(ndarray::s![0, 0, qt, ..])
                .iter()
                .copied()
                .collect();
            assert_eq!(got, [selected, rest].concat());
        }
    }
}

#[test]
fn zero_lengths_give_empty_maps() {
    let (spec, bound) = no_buffers("attention c { mask = causal }", 0, 10, 0);
    let maps = mask::classify(&spec, &bound, Tiling::default()).unwrap();
    assert_eq!(
        (maps.get(0, 0).q_tiles(), maps.get(0, 0).kv_tiles()),
        (0, 1)
    );
    assert_eq!(maps.get(0, 0).stats().tiles(), 0);
    let (spec, bound) = no_buffers("attention c { mask = causal }", 10, 0, 0);
    let maps = mask::classify(&spec, &bound, Tiling::default()).unwrap();
    let m = maps.get(0, 0);
    assert_eq!((m.q_tiles(), m.kv_tiles()), (1, 0));
    assert!(m.full_ranges(0).is_empty() && m.partial(0).is_empty());
    assert_eq!(m.stats().density, 0.0);
}

#[test]
fn zero_tile_sizes_are_errors() {
    let e = Tiling::new(0, 64).unwrap_err();
    assert_eq!(e.to_string(), "tile sizes must be at least 1, found 0x64");
    let (spec, bound) = no_buffers("attention c { mask = causal }", 10, 10, 0);
    let e = mask::classify(&spec, &bound, Tiling { bq: 16, bkv: 0 }).unwrap_err();
    assert!(matches!(e, MaskError::ZeroTile { bq: 16, bkv: 0 }));
}

#[test]
fn out_of_range_reads_are_reported_like_the_interpreter() {
    // doc[q + 5] reads past doc[KV] at the last queries (KV = q_offset + Q = 25).
    let spec = load("attention d { buffer doc[KV]: int mask = doc[q + 5] == doc[kv] }");
    let doc = ArrayD::from_shape_vec(IxDyn(&[25]), vec![0i64; 25]).unwrap();
    let bound = bound(
        &spec,
        1,
        1,
        10,
        20,
        15,
        BTreeMap::from([("doc".to_string(), BufferData::Int(doc))]),
    );
    let e = mask::classify(&spec, &bound, Tiling::new(4, 4).unwrap()).unwrap_err();
    let MaskError::Eval(EvalError::OutOfRange { buffer, index, .. }) = e else {
        panic!("expected an out-of-range read, got {e:?}")
    };
    assert_eq!(buffer, "doc");
    assert!(index[0] >= 25);
}

// ---------------------------------------------------------------------------
// The `attnc blocks` command.

fn attnc(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_attnc"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_prints_grid_and_stats() {
    let (ok, out, err) = attnc(&[
        "blocks",
        "examples/causal.attn",
        "--q-len",
        "100",
        "--kv-len",
        "100",
        "--block",
        "32x32",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("q\\kv 0\n   0 +...\n   1 #+..\n   2 ##+.\n   3 ###+\n"),
        "{out}"
    );
    assert!(out.contains("full 6"), "{out}");
}

#[test]
fn cli_json_reports_counts() {
    let (ok, out, err) = attnc(&[
        "blocks",
        "examples/sliding_window.attn",
        "--q-len",
        "4096",
        "--kv-len",
        "4096",
        "--block",
        "128x128",
        "--param",
        "window=256",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["q_tiles"], 32);
    assert_eq!(v["kv_tiles"], 32);
    assert_eq!(v["full"], 31);
    // Row 0: the diagonal; rows 1..: the diagonal and the window edge (row 1: tile 0 is full).
    assert_eq!(v["partial"], 1 + 1 + 2 * 30);
    assert_eq!(v["shared"], true);
    assert_eq!(v["summed_over_bh"], false);
    assert!(v["build_ms"].as_f64().unwrap() >= 0.0);
}

#[test]
fn cli_json_sums_per_head_maps() {
    let tmp = tempfile::Builder::new()
        .prefix("attnc-blocks-")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    let spec = dir.join("heads.attn");
    std::fs::write(
        &spec,
        "attention heads { mask = causal && q - kv < 16 * (h + 1) }",
    )
    .unwrap();
    let (ok, out, err) = attnc(&[
        "blocks",
        spec.to_str().unwrap(),
        "--q-len",
        "64",
        "--kv-len",
        "64",
        "--block",
        "16",
        "--h",
        "2",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["shared"], false);
    assert_eq!(v["summed_over_bh"], true);
    assert_eq!(v["maps"], 2);
    let total =
        v["full"].as_u64().unwrap() + v["partial"].as_u64().unwrap() + v["empty"].as_u64().unwrap();
    assert_eq!(total, 2 * 16);
}

#[test]
fn cli_writes_png() {
    let tmp = tempfile::Builder::new()
        .prefix("attnc-blocks-png-")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    let png_path = dir.join("map.png");
    let (ok, _, err) = attnc(&[
        "blocks",
        "examples/causal.attn",
        "--q-len",
        "256",
        "--kv-len",
        "256",
        "--block",
        "32",
        "--png",
        png_path.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let bytes = std::fs::read(&png_path).unwrap();
    let reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .unwrap();
    assert_eq!(
        (reader.info().width, reader.info().height),
        (8 * 24, 8 * 24)
    );
}

/// `attnc blocks SPEC --q-len 10 --kv-len 10 EXTRA` fails with `needle` in its message.
fn blocks_fails(spec: &str, extra: &[&str], needle: &str) {
    let mut args = vec!["blocks", spec, "--q-len", "10", "--kv-len", "10"];
    args.extend_from_slice(extra);
    let (ok, _, err) = attnc(&args);
    assert!(!ok, "{args:?} succeeded");
    assert!(err.contains(needle), "{args:?}: {err}");
}

#[test]
fn cli_bad_inputs_say_what_is_wrong() {
    let causal = "examples/causal.attn";
    let docs = "examples/packed_docs.attn";
    blocks_fails(
        causal,
        &["--block", "0x64"],
        "tile sizes must be at least 1, found 0x64",
    );
    blocks_fails(causal, &["--block", "big"], "bad tile size `big`");
    // A buffer of the wrong shape.
    let tmp = tempfile::Builder::new()
        .prefix("attnc-blocks-bad-")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    let doc = dir.join("doc.npy");
    ndarray_npy::WriteNpyExt::write_npy(
        &ndarray::Array1::<i64>::zeros(7),
        std::fs::File::create(&doc).unwrap(),
    )
    .unwrap();
    let doc = format!("doc={}", doc.display());
    blocks_fails(
        docs,
        &["--buffer", &doc],
        "buffer `doc` has shape [7], but `doc[KV]` is [10]",
    );
    blocks_fails(docs, &[], "missing buffer `doc`");
    blocks_fails(causal, &["--h", "0"], "--h must be at least 1");
    // An empty call whose other sizes no array can hold (it panicked: the
    // check multiplied in the zero length).
    let huge = u64::MAX.to_string();
    let (ok, _, err) = attnc(&[
        "blocks", causal, "--q-len", "0", "--kv-len", "0", "--b", &huge,
    ]);
    assert!(!ok && err.contains("more than an array can hold"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // Zero lengths are allowed: an empty map.
    let (ok, out, err) = attnc(&[
        "blocks",
        "examples/causal.attn",
        "--q-len",
        "0",
        "--kv-len",
        "10",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("no tiles"), "{out}");
}

/// A mask the analysis cannot decide, past its budget of evaluations (each
/// weighed by the mask's nodes): the tiles it did not decide are PARTIAL (the
/// kernel masks them), the ones it decided are exact, the outputs match the
/// reference, and an error at an element of a tile it gave up on is the
/// reference's, found by the kernel. (Such a mask once took 100 s in
/// `attnc check` and 12 s in the analysis of a call whose attention took 0.2.)
#[test]
fn an_analysis_past_its_budget_leaves_undecided_tiles_partial() {
    use attnc::driver::Program;
    let heavy = "let x = (q ^ (kv * 3)) & 1023\n    \
                 mask = any(i in 0..1000: x == i * 2000 + 300) || q == kv";
    let src = format!("attention heavy {{\n    {heavy}\n}}");
    let program =
        attnc::load(SourceFile::new("heavy.attn", &src), &SpecOptions::default()).unwrap();
    let (n, tiling) = (128, Tiling::new(16, 16).unwrap());
    let b = bound(&program.spec, 1, 1, n, n, 0, BTreeMap::new());
    let maps = mask::classify(&program.spec, &b, tiling).unwrap();
    let counts = maps.counts();
    assert!(counts.given_up_tiles > 0, "{counts:?}");
    // About 2000 nodes an evaluation, 2^22 nodes of budget: about 2000.
    assert!(counts.element_evaluations < 4000, "{counts:?}");
    let exact = brute(&program.spec, &b, tiling).unwrap();
    let map = maps.get(0, 0);
    let mut partial = 0;
    for (qt, row) in exact[0].iter().enumerate() {
        for (kt, &want) in row.iter().enumerate() {
            match map.class(qt, kt) {
                TileClass::Partial => partial += 1,
                got => assert_eq!(got, want, "tile ({qt}, {kt})"),
            }
        }
    }
    assert!(partial as u64 >= counts.given_up_tiles);
    let note = program.fallback_note(&maps).expect("a note");
    assert!(note.contains("stopped at its budget"), "{note}");
    // Every backend computes the same attention.
    let q = Array4::<f32>::from_shape_fn((1, 1, n, 8), |(_, h, i, t)| {
        ((h * 7 + i * 3 + t) % 11) as f32 * 0.1 - 0.5
    });
    let inputs = Inputs::new(q.view(), q.view(), q.view()).with_lse();
    let want = program.run_reference(&inputs).unwrap();
    let jit = program
        .compile_jit(tiling, attnc::codegen::clif::GemmImpl::detect())
        .unwrap();
    let got = jit.run(&inputs).unwrap();
    let diff = crate::support::common::max_abs_diff(&got.out, &want.out);
    assert!(diff < 1e-5, "out differs by {diff}");
    // An error in a tile the analysis gave up on: the reference's.
    let failing = format!("attention heavy {{\n    {heavy} || 100 / (q - 120) > 1000\n}}");
    let program: Program = attnc::load(
        SourceFile::new("heavy.attn", &failing),
        &SpecOptions::default(),
    )
    .unwrap();
    // The analysis spends its budget on the rows before 120: it does not
    // meet the error, the kernel does.
    assert!(mask::classify(&program.spec, &b, tiling).is_ok());
    let want = program.run_reference(&inputs).unwrap_err().to_string();
    let jit = program
        .compile_jit(tiling, attnc::codegen::clif::GemmImpl::detect())
        .unwrap();
    let got = jit.run(&inputs).unwrap_err().to_string();
    assert_eq!(got, want);
    assert!(want.contains("division by zero"), "{want}");
}
