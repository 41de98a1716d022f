//! The attnc library API, end to end.
//!
//! Run it from the repository root with `cargo run --example api`. It
//!
//! 1. loads `examples/packed_docs.attn`, binds its `doc` buffer, runs the
//!    reference interpreter (and the loop-IR interpreter) on the bundled
//!    FlexAttention fixture (`tests/fixtures/packed_docs/`) and prints the
//!    largest difference from FlexAttention's `out` and `lse` (at most 1e-5);
//! 2. loads a spec from a string, overrides a param, runs it on generated
//!    inputs as a prefill and as a one-row decode step (query offset), and
//!    checks that both give the same last row;
//! 3. compiles a spec once to native code (`attnc::compile`) and runs that one
//!    kernel on several batch sizes, head counts, lengths and head dims, then
//!    through a plan shared by several layers, checking every result against
//!    the reference interpreter; a call with a wrong shape is an error value;
//! 4. prints the rendered diagnostics of a bad spec and of a bad param
//!    override, the way `attnc check` and `attnc run` print them.
//!
//! Every comparison has a tolerance, and every bad input must be refused: the
//! example exits with a failure otherwise (`scripts/test.sh` runs it).

use std::path::Path;

use attnc::ndarray::{s, Array4, Ix3};
use attnc::{load, npy, BufferData, CompileOptions, Inputs, SourceFile, SpecOptions};

fn main() -> std::process::ExitCode {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if let Err(e) = fixture_parity(root)
        .and_then(|()| decode_matches_prefill())
        .and_then(|()| compiled_kernel())
        .and_then(|()| diagnostics())
    {
        // Every attnc error renders with file, line, column and a caret.
        eprint!("{}", e.render());
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}

/// Runs `examples/packed_docs.attn` on the bundled fixture and compares with
/// the outputs PyTorch's FlexAttention produced for the same inputs.
fn fixture_parity(root: &Path) -> Result<(), attnc::Error> {
    println!("== packed_docs.attn on the FlexAttention fixture");
    let source = SourceFile::read(&root.join("examples/packed_docs.attn"))?;
    let program = load(source, &SpecOptions::default())?;

    let dir = root.join("tests/fixtures/packed_docs");
    let q = npy::read_f32_4d(&dir.join("q.npy"), "q")?;
    let k = npy::read_f32_4d(&dir.join("k.npy"), "k")?;
    let v = npy::read_f32_4d(&dir.join("v.npy"), "v")?;
    // Buffers are read in their declared element type (`doc` is int).
    let doc = npy::read_buffer(&dir.join("doc.npy"), "doc", attnc::sema::Type::Int)?;
    let flex_out = npy::read_f32_4d(&dir.join("out.npy"), "out")?;
    let flex_lse = npy::read_f32_dyn(&dir.join("lse.npy"))?
        .into_dimensionality::<Ix3>()
        .map_err(|e| attnc::Error::Io {
            what: "lse.npy must be [B, H, Q]".into(),
            reason: e.to_string(),
        })?;

    if let BufferData::Int(ids) = &doc {
        let ids: Vec<i64> = ids.iter().copied().collect();
        println!("doc ids of the first 12 tokens: {:?}", &ids[..12]);
    }
    let inputs = Inputs::new(q.view(), k.view(), v.view())
        .buffer("doc", doc)
        .with_lse();
    let result = program.run_reference(&inputs)?;
    let lse = result.lse.as_ref().expect("lse was requested");

    let (b, h, n_q, d) = result.out.dim();
    println!(
        "q {:?}, k/v {:?}: out [{b}, {h}, {n_q}, {d}], lse [{b}, {h}, {n_q}]",
        q.shape(),
        k.shape()
    );
    println!(
        "out[0, 0, 0, 0..4] = {:?}",
        result.out.slice(s![0, 0, 0, 0..4]).to_vec()
    );
    println!(
        "lse[0, 0, 0..4]    = {:?}",
        lse.slice(s![0, 0, 0..4]).to_vec()
    );
    within(
        "max |out - FlexAttention out|",
        max_abs_diff(result.out.iter(), flex_out.iter()),
        1e-5,
    )?;
    within(
        "max |lse - FlexAttention lse|",
        max_abs_diff(lse.iter(), flex_lse.iter()),
        1e-5,
    )?;

    // The same spec lowered to the tiled loop IR and run by its f32 interpreter.
    let tiled = program.run_interp(&inputs, attnc::mask::Tiling { bq: 32, bkv: 32 })?;
    within(
        "loop IR, 32 x 32 tiles: max |out - FlexAttention out|",
        max_abs_diff(tiled.out.iter(), flex_out.iter()),
        1e-5,
    )
}

/// A spec from a string, a param override, and the query offset: decoding
/// the last token with `q_offset = N - 1` reproduces the last row of the
/// prefill, because `q` in the spec is the absolute position.
fn decode_matches_prefill() -> Result<(), attnc::Error> {
    println!("\n== a spec from a string, with --param window=4");
    let text = "
        // Sliding-window causal attention with a soft cap on the scores.
        attention local {
            param window: int = 4096
            param cap: float = 30.0
            mask  = causal && q - kv < window
            score = cap * tanh(score / cap)
        }";
    let options = SpecOptions {
        entry: None,
        params: vec![("window".into(), "4".into())],
    };
    let program = load(SourceFile::new("local.attn", text), &options)?;
    println!(
        "params after the override: {}",
        describe_params(&program.spec)
    );

    let (b, h, hkv, n, d) = (1, 4, 2, 10, 8); // GQA: 4 query heads share 2 key/value heads
    let mut rng = Lcg(42);
    let q = Array4::from_shape_fn((b, h, n, d), |_| rng.next());
    let k = Array4::from_shape_fn((b, hkv, n, d), |_| rng.next());
    let v = Array4::from_shape_fn((b, hkv, n, d), |_| rng.next());

    let prefill = program.run_reference(&Inputs::new(q.view(), k.view(), v.view()).with_lse())?;
    let last = q.slice(s![.., .., n - 1..n, ..]);
    let decode = program.run_reference(
        &Inputs::new(last, k.view(), v.view())
            .q_offset(n as i64 - 1)
            .with_lse(),
    )?;

    let prefill_row = prefill.out.slice(s![.., .., n - 1..n, ..]);
    println!(
        "prefill out {:?}, decode out {:?} (q_offset {})",
        prefill.out.shape(),
        decode.out.shape(),
        n - 1
    );
    println!(
        "lse of the last row: prefill {:?}",
        prefill
            .lse
            .as_ref()
            .unwrap()
            .slice(s![0, .., n - 1])
            .to_vec()
    );
    println!(
        "                     decode  {:?}",
        decode.lse.as_ref().unwrap().slice(s![0, .., 0]).to_vec()
    );
    within(
        "max |prefill row - decode row|",
        max_abs_diff(prefill_row.iter(), decode.out.iter()),
        1e-6,
    )
}

/// Compiles a spec once and runs the kernel on new shapes without recompiling,
/// then with one plan (bound buffers and block maps) for several layers.
fn compiled_kernel() -> Result<(), attnc::Error> {
    println!("\n== one compiled kernel, many calls");
    let text = "
        // Packed documents, causal within each, with an ALiBi bias per head.
        attention packed_alibi {
            buffer doc[KV]: int
            buffer slope[H]: float
            mask  = doc[q] == doc[kv] && q >= kv
            score = score - slope[h] * (q - kv)
        }";
    let file = || SourceFile::new("packed_alibi.attn", text);
    // The defaults: the fastest tile products of this CPU, tiles picked from the spec.
    let options = CompileOptions::default();
    let kernel = attnc::compile(file(), &options)?;
    println!(
        "compiled in {:.2} ms: {} tile products, {} tiles",
        kernel.compile_time().as_secs_f64() * 1e3,
        kernel.gemm(),
        kernel.tiling()
    );
    let reference = load(file(), &SpecOptions::default())?;
    let mut rng = Lcg(7);
    let mut make = |b: usize, h: usize, hkv: usize, n: usize, d: usize| {
        let q = Array4::from_shape_fn((b, h, n, d), |_| rng.next());
        let k = Array4::from_shape_fn((b, hkv, n, d), |_| rng.next());
        let v = Array4::from_shape_fn((b, hkv, n, d), |_| rng.next());
        (q, k, v)
    };
    let buffers = |h: usize, n: usize| {
        let doc = attnc::ndarray::ArrayD::from_shape_fn(vec![n], |i| (i[0] / 100) as i64);
        let slope =
            attnc::ndarray::ArrayD::from_shape_fn(vec![h], |i| (-(i[0] as f32 + 1.0)).exp2());
        (BufferData::Int(doc), BufferData::Float(slope))
    };
    for (b, h, hkv, n, d) in [(1, 4, 4, 300, 64), (2, 8, 2, 129, 32), (1, 2, 1, 450, 80)] {
        let (q, k, v) = make(b, h, hkv, n, d);
        let (doc, slope) = buffers(h, n);
        let inputs = Inputs::new(q.view(), k.view(), v.view())
            .buffer("doc", doc)
            .buffer("slope", slope)
            .with_lse();
        let got = kernel.run(&inputs)?;
        let want = reference.run_reference(&inputs)?;
        within(
            &format!("B={b} H={h} HKV={hkv} N={n} D={d}: max |jit - reference| out"),
            max_abs_diff(got.out.iter(), want.out.iter()),
            1e-5,
        )?;
        within(
            "                                        lse",
            max_abs_diff(
                got.lse.as_ref().unwrap().iter(),
                want.lse.as_ref().unwrap().iter(),
            ),
            1e-5,
        )?;
    }
    // Layers with the same mask and buffers share one plan: binding and block
    // maps are done once, each layer brings its own q, k and v.
    let (h, n, d) = (4, 256, 64);
    let (doc, slope) = buffers(h, n);
    let (q, k, v) = make(1, h, h, n, d);
    let first = Inputs::new(q.view(), k.view(), v.view())
        .buffer("doc", doc.clone())
        .buffer("slope", slope.clone());
    let plan = kernel.plan(&first)?;
    for layer in 0..3 {
        let (q, k, v) = make(1, h, h, n, d);
        let inputs = Inputs::new(q.view(), k.view(), v.view())
            .buffer("doc", doc.clone())
            .buffer("slope", slope.clone());
        let got = kernel.run_planned(&inputs, &plan)?;
        let want = reference.run_reference(&inputs)?;
        within(
            &format!("layer {layer} through the plan: max |jit - reference|"),
            max_abs_diff(got.out.iter(), want.out.iter()),
            1e-5,
        )?;
    }
    // Bad inputs are errors, not crashes: here v has another head dim than k.
    let (q, k, _) = make(1, h, h, n, d);
    let (_, _, v) = make(1, h, h, n, d + 1);
    let bad = Inputs::new(q.view(), k.view(), v.view())
        .buffer("doc", doc)
        .buffer("slope", slope);
    refused("mismatched head dims", kernel.run(&bad))
}

/// What errors look like: values that render with the source snippet.
fn diagnostics() -> Result<(), attnc::Error> {
    println!("\n== diagnostics");
    let bad = "attention local {\n    param window: int = 128\n    mask = causal && q - kv < windw\n    score = score > 0.0\n}\n";
    refused(
        "bad.attn",
        load(SourceFile::new("bad.attn", bad), &SpecOptions::default()),
    )?;
    let options = SpecOptions {
        entry: None,
        params: vec![("window".into(), "1.5".into())],
    };
    let text =
        "attention local {\n    param window: int = 128\n    mask = causal && q - kv < window\n}\n";
    refused(
        "window=1.5",
        load(SourceFile::new("local.attn", text), &options),
    )
}

/// Prints `what` and `diff`; an error when `diff` is above `tol` (or NaN).
fn within(what: &str, diff: f32, tol: f32) -> Result<(), attnc::Error> {
    println!("{what} = {diff:.3e}");
    if diff <= tol {
        Ok(())
    } else {
        Err(attnc::Error::Check(format!(
            "{what} is {diff:e}, above {tol:e}"
        )))
    }
}

/// Prints the rendered error of a call that must fail; an error when it
/// did not.
fn refused<T>(what: &str, result: Result<T, attnc::Error>) -> Result<(), attnc::Error> {
    match result {
        Ok(_) => Err(attnc::Error::Check(format!(
            "{what} was accepted: it must be refused"
        ))),
        Err(e) => {
            print!("{}", e.render());
            Ok(())
        }
    }
}

fn describe_params(spec: &attnc::sema::Spec) -> String {
    spec.params
        .iter()
        .map(|p| format!("{} = {}", p.name, p.value))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The largest absolute difference; equal infinities (lse of fully masked
/// rows) count as equal, and any NaN makes the result NaN.
fn max_abs_diff<'a>(
    a: impl IntoIterator<Item = &'a f32>,
    b: impl IntoIterator<Item = &'a f32>,
) -> f32 {
    let mut max = 0f32;
    for (x, y) in a.into_iter().zip(b) {
        let d = if x == y { 0.0 } else { (x - y).abs() };
        if d.is_nan() {
            return f32::NAN;
        }
        max = max.max(d);
    }
    max
}

/// A small deterministic generator of values in [-1, 1), so the example needs no extra crates.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}
