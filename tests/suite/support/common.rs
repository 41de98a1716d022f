//! Helpers shared by the integration tests: loading the FlexAttention
//! fixtures in `tests/fixtures/` and comparing outputs.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use attnc::{npy, BufferData, Outputs, SourceFile, SpecOptions};
use ndarray::{Array3, Array4, Ix3};

/// One fixture case: a spec, its inputs, and FlexAttention's outputs.
pub struct Case {
    pub name: String,
    pub spec_path: PathBuf,
    pub options: SpecOptions,
    pub q: Array4<f32>,
    pub k: Array4<f32>,
    pub v: Array4<f32>,
    pub buffers: BTreeMap<String, BufferData>,
    pub q_offset: i64,
    pub out: Array4<f32>,
    pub lse: Array3<f32>,
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root().join("tests/fixtures"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("case.json").exists())
        .collect();
    dirs.sort();
    dirs
}

pub fn load_case(dir: &Path) -> Case {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let spec_path = root().join(meta["spec"].as_str().unwrap());
    let params = meta["params"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string()),
            )
        })
        .collect();
    let options = SpecOptions {
        entry: meta["entry"].as_str().map(str::to_string),
        params,
    };
    let program = attnc::load(SourceFile::read(&spec_path).unwrap(), &options).unwrap();
    let mut buffers = BTreeMap::new();
    for decl in &program.spec.buffers {
        let data = npy::read_buffer(
            &dir.join(format!("{}.npy", decl.name)),
            &decl.name,
            decl.elem,
        )
        .unwrap();
        buffers.insert(decl.name.clone(), data);
    }
    Case {
        name: dir.file_name().unwrap().to_string_lossy().into_owned(),
        spec_path,
        options,
        q: npy::read_f32_4d(&dir.join("q.npy"), "q").unwrap(),
        k: npy::read_f32_4d(&dir.join("k.npy"), "k").unwrap(),
        v: npy::read_f32_4d(&dir.join("v.npy"), "v").unwrap(),
        buffers,
        q_offset: meta["q_offset"].as_i64().unwrap(),
        out: npy::read_f32_4d(&dir.join("out.npy"), "out").unwrap(),
        lse: npy::read_f32_dyn(&dir.join("lse.npy"))
            .unwrap()
            .into_dimensionality::<Ix3>()
            .unwrap(),
    }
}

impl Case {
    pub fn inputs(&self) -> attnc::Inputs<'_> {
        let mut i = attnc::Inputs::new(self.q.view(), self.k.view(), self.v.view())
            .q_offset(self.q_offset)
            .with_lse();
        i.buffers = self.buffers.clone();
        i
    }

    pub fn program(&self) -> attnc::Program {
        attnc::load(SourceFile::read(&self.spec_path).unwrap(), &self.options).unwrap()
    }
}

/// Largest absolute difference, treating equal infinities as equal; NaN is a mismatch.
pub fn max_abs_diff<'a>(
    a: impl IntoIterator<Item = &'a f32>,
    b: impl IntoIterator<Item = &'a f32>,
) -> f32 {
    a.into_iter()
        .zip(b)
        .map(|(x, y)| {
            if x == y || (x.is_nan() && y.is_nan()) {
                0.0
            } else if x.is_nan() || y.is_nan() {
                f32::INFINITY
            } else {
                (x - y).abs()
            }
        })
        .fold(0.0, f32::max)
}

/// Asserts that outputs match expected ones to `tol` (absolute), lse included.
pub fn assert_close(what: &str, got: &Outputs, out: &Array4<f32>, lse: &Array3<f32>, tol: f32) {
    assert_eq!(got.out.shape(), out.shape(), "{what}: out shape");
    let d_out = max_abs_diff(got.out.iter(), out.iter());
    let got_lse = got.lse.as_ref().expect("lse requested");
    let d_lse = max_abs_diff(got_lse.iter(), lse.iter());
    assert!(
        d_out <= tol && d_lse <= tol,
        "{what}: max |out diff| = {d_out:e}, max |lse diff| = {d_lse:e} (tolerance {tol:e})"
    );
}

/// The rows `..lens[b]` of dense `[B, HKV, KVmax, D]` k and v as a paged pool
/// of pages of `ps` slots in a shuffled order, with a spare page or three:
/// `(k_pages, v_pages, table)`, NaN in every slot no sequence owns and -1
/// past each sequence's pages in the table.
pub fn paged_pool(
    k: &Array4<f32>,
    v: &Array4<f32>,
    lens: &[usize],
    ps: usize,
    rng: &mut attnc::bench::Rng,
) -> (Array4<f32>, Array4<f32>, ndarray::Array2<i32>) {
    let (b, hkv, _, d) = k.dim();
    let used: Vec<usize> = lens.iter().map(|n| n.div_ceil(ps)).collect();
    let spare = 3;
    let num_pages = used.iter().sum::<usize>() + spare;
    // A shuffled assignment of pages to (sequence, page index).
    let mut order: Vec<usize> = (0..num_pages).collect();
    for i in (1..order.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    let max_pages = used.iter().copied().max().unwrap() + 1;
    let mut table = ndarray::Array2::from_elem((b, max_pages), -1i32);
    let mut k_pages = Array4::from_elem((num_pages, ps, hkv, d), f32::NAN);
    let mut v_pages = Array4::from_elem((num_pages, ps, hkv, d), f32::NAN);
    let mut next = 0;
    for (bi, &n) in lens.iter().enumerate() {
        for p in 0..used[bi] {
            let page = order[next];
            next += 1;
            table[[bi, p]] = page as i32;
            for slot in 0..ps.min(n - p * ps) {
                let j = p * ps + slot;
                for kh in 0..hkv {
                    k_pages
                        .slice_mut(ndarray::s![page, slot, kh, ..])
                        .assign(&k.slice(ndarray::s![bi, kh, j, ..]));
                    v_pages
                        .slice_mut(ndarray::s![page, slot, kh, ..])
                        .assign(&v.slice(ndarray::s![bi, kh, j, ..]));
                }
            }
        }
    }
    (k_pages, v_pages, table)
}

/// A ragged batch of the KV-cache tests, dense and paged.
pub struct Ragged {
    /// `[B, H, Q, D]`.
    pub q: Array4<f32>,
    /// `[B, HKV, max(lens), D]`, NaN in every row past its sequence's length.
    pub k: Array4<f32>,
    pub v: Array4<f32>,
    /// The same rows in a shuffled pool ([`paged_pool`]).
    pub k_pages: Array4<f32>,
    pub v_pages: Array4<f32>,
    pub table: ndarray::Array2<i32>,
    pub lens: ndarray::Array1<i32>,
}

/// Random q, k and v for sequences of `lens` keys, `h` query heads on `hkv`
/// KV heads, `q_len` queries and head dim `d`, with the pool of pages of `ps`
/// slots holding the same rows.
pub fn ragged(
    lens: &[usize],
    (h, hkv, q_len, d): (usize, usize, usize, usize),
    ps: usize,
    rng: &mut attnc::bench::Rng,
) -> Ragged {
    let (b, kv_max) = (lens.len(), lens.iter().copied().max().unwrap_or(0));
    let q = rng.array4((b, h, q_len, d));
    let mut k = rng.array4((b, hkv, kv_max, d));
    let mut v = rng.array4((b, hkv, kv_max, d));
    for (bi, &n) in lens.iter().enumerate() {
        k.slice_mut(ndarray::s![bi, .., n.., ..]).fill(f32::NAN);
        v.slice_mut(ndarray::s![bi, .., n.., ..]).fill(f32::NAN);
    }
    let (k_pages, v_pages, table) = paged_pool(&k, &v, lens, ps, rng);
    Ragged {
        q,
        k,
        v,
        k_pages,
        v_pages,
        table,
        lens: ndarray::Array1::from_iter(lens.iter().map(|&n| n as i32)),
    }
}

/// The buffers of a block of a longer call whose positions end at `end`
/// (ring attention): the `doc[KV]` table of document ids, indexed by
/// position, cut to the prefix `..end` the block's `KV` covers; the others
/// as they are.
pub fn kv_prefix(buffers: &[(String, BufferData)], end: usize) -> Vec<(String, BufferData)> {
    buffers
        .iter()
        .map(|(name, data)| match data {
            BufferData::Int(ids) if name == "doc" => (
                name.clone(),
                BufferData::Int(ids.slice(ndarray::s![..end]).to_owned().into_dyn()),
            ),
            _ => (name.clone(), data.clone()),
        })
        .collect()
}

/// Random q `[b, h, q_len, d]`, k and v `[kv_b, hkv, rows, d]` (in that
/// order from `rng`), and the shapes of a call on them whose positions end
/// at `kv_end`.
pub fn random_qkv(
    rng: &mut attnc::bench::Rng,
    (b, h, hkv, d): (usize, usize, usize, usize),
    (kv_b, q_len, rows): (usize, usize, usize),
    kv_end: usize,
) -> (
    Array4<f32>,
    Array4<f32>,
    Array4<f32>,
    attnc::sema::eval::Shapes,
) {
    let q = rng.array4((b, h, q_len, d));
    let k = rng.array4((kv_b, hkv, rows, d));
    let v = rng.array4((kv_b, hkv, rows, d));
    let shapes = attnc::sema::eval::Shapes {
        b,
        h,
        hkv,
        q: q_len,
        kv: kv_end,
        d,
    };
    (q, k, v, shapes)
}

/// Random buffers for `spec` at `shapes`: documents of ~1/3 of the
/// sequence for int buffers, ALiBi slopes, roots-only trees (`parent`), fair
/// coins for bool buffers, uniform values for float ones.
pub fn buffers_for(
    spec: &attnc::sema::Spec,
    shapes: &attnc::sema::eval::Shapes,
    rng: &mut attnc::bench::Rng,
) -> Vec<(String, BufferData)> {
    use attnc::sema::Type;
    spec.buffers
        .iter()
        .map(|decl| {
            let recipe = match (decl.name.as_str(), decl.elem) {
                ("parent", _) => "const:-1",
                ("slope", _) => "alibi",
                (_, Type::Int) => "docs:3",
                (_, Type::Float) => "uniform",
                (_, Type::Bool) => "bernoulli:0.5",
            };
            let data = attnc::bench::generate_buffer(decl, shapes, recipe, rng).unwrap();
            (decl.name.clone(), data)
        })
        .collect()
}
