//! End-to-end tests of the `attnc` binary: `check` on every example and on a
//! bad spec, `run` on a FlexAttention fixture, every bad-input path of `run`
//! (each must exit 1 with a specific, helpful message on stderr, or 2 for a
//! command-line usage error caught by clap), and `--help` of every subcommand.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use attnc::npy;
use attnc::sema::Type;
use attnc::BufferData;
use ndarray::{Array, Array4, ArrayD, Dimension, Ix3, IxDyn};
use ndarray_npy::ReadNpyExt;
use ndarray_npy::WriteNpyExt;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures/packed_docs").join(name)
}

fn attnc(args: &[&str]) -> Output {
    // The bf16 pairs are chosen by timing them; the child takes this
    // process's choice, which the tests expect.
    let pairs = attnc::driver::default_bf16_pairs();
    Command::new(env!("CARGO_BIN_EXE_attnc"))
        .args(args)
        .env(
            attnc::runtime::gemm::pairs::BF16_PAIRS_VAR,
            if pairs { "1" } else { "0" },
        )
        .current_dir(root())
        .output()
        .expect("the attnc binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// stderr with the message lines that miette wrapped (continued with `│`)
/// joined back, so assertions can name whole messages.
fn unwrapped_stderr(o: &Output) -> String {
    let mut text = String::new();
    for line in stderr(o).lines() {
        match line.trim_start().strip_prefix("│ ") {
            Some(rest) if !text.is_empty() => {
                text.pop();
                text.push(' ');
                text.push_str(rest);
            }
            _ => text.push_str(line),
        }
        text.push('\n');
    }
    text
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A fresh, empty directory under the system temp dir, removed on drop.
struct TempDir(tempfile::TempDir);

impl TempDir {
    fn new() -> TempDir {
        TempDir(
            tempfile::Builder::new()
                .prefix("attnc-cli-test-")
                .tempdir()
                .unwrap(),
        )
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }

    fn str(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }
}

fn write_npy<T: ndarray_npy::WritableElement, D: Dimension>(path: &Path, a: &Array<T, D>) {
    a.write_npy(BufWriter::new(File::create(path).unwrap()))
        .unwrap();
}

/// Asserts exit code 1 and that stderr holds every one of `needles`.
#[track_caller]
fn assert_fails(o: &Output, needles: &[&str]) {
    let err = unwrapped_stderr(o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "stdout:\n{}\nstderr:\n{err}",
        stdout(o)
    );
    for n in needles {
        assert!(err.contains(n), "stderr lacks `{n}`:\n{err}");
    }
}

/// The arguments of `attnc run` on the packed_docs fixture, with `extra`
/// appended, writing into `dir`.
fn run_packed(dir: &TempDir, extra: &[&str]) -> Output {
    run_packed_doc(dir, &fixture("doc.npy"), extra)
}

/// [`run_packed`] with the buffer `doc` read from `doc`.
fn run_packed_doc(dir: &TempDir, doc: &Path, extra: &[&str]) -> Output {
    let (spec, q, k, v) = (
        root().join("examples/packed_docs.attn"),
        fixture("q.npy"),
        fixture("k.npy"),
        fixture("v.npy"),
    );
    let doc = format!("doc={}", doc.display());
    let out = dir.str("out.npy");
    let mut args = vec!["run", spec.to_str().unwrap()];
    for (flag, path) in [("--q", &q), ("--k", &k), ("--v", &v)] {
        args.push(flag);
        args.push(path.to_str().unwrap());
    }
    args.extend(["--buffer", &doc, "--out", &out]);
    args.extend(extra);
    attnc(&args)
}

/// `run_with` on the fixture's q, k and v, writing `dir/o.npy`.
fn run_fixture(spec: &str, dir: &TempDir, extra: &[&str]) -> Output {
    run_with(
        spec,
        &fixture("q.npy"),
        &fixture("k.npy"),
        &fixture("v.npy"),
        &dir.path("o.npy"),
        extra,
    )
}

/// `run_with` on the given q and the fixture's k and v, writing `dir/o.npy`.
fn run_with_q(spec: &str, q: &Path, dir: &TempDir) -> Output {
    run_with(
        spec,
        q,
        &fixture("k.npy"),
        &fixture("v.npy"),
        &dir.path("o.npy"),
        &[],
    )
}

/// Like `run_packed`, with q, k, v, buffers and flags all given by the caller.
fn run_with(spec: &str, q: &Path, k: &Path, v: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "run",
        spec,
        "--q",
        q.to_str().unwrap(),
        "--k",
        k.to_str().unwrap(),
        "--v",
        v.to_str().unwrap(),
    ];
    args.extend(["--out", out.to_str().unwrap()]);
    args.extend(extra);
    attnc(&args)
}

fn max_abs_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| if x == y { 0.0 } else { (x - y).abs() })
        .fold(0.0, f32::max)
}

// check ---------------------------------------------------------------------

#[test]
fn check_accepts_every_example() {
    let mut examples: Vec<PathBuf> = std::fs::read_dir(root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "attn"))
        .collect();
    examples.sort();
    assert!(examples.len() >= 12, "{examples:?}");
    for path in examples {
        let o = attnc(&["check", path.to_str().unwrap()]);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}: {}",
            path.display(),
            stderr(&o)
        );
        assert!(stdout(&o).contains(": ok ("), "{}", stdout(&o));
    }
}

#[test]
fn check_reports_a_bad_spec_with_location_and_caret() {
    let o = attnc(&["check", "tests/errors/unknown_name_typo.attn"]);
    assert_fails(
        &o,
        &[
            "unknown name `windw`",
            "[tests/errors/unknown_name_typo.attn:4:21]",
            "mask = q - kv < windw",
            "──┬──",
            "╰── not a known name",
            "help: did you mean `window`?",
        ],
    );
    // No ANSI colour codes when stderr is not a terminal.
    assert!(!stderr(&o).contains('\u{1b}'), "{}", stderr(&o));
}

#[test]
fn check_reports_every_error() {
    let o = attnc(&["check", "tests/errors/multiple_errors.attn"]);
    assert_fails(
        &o,
        &[
            "has 3 errors",
            "multiple_errors.attn:4:21]",
            "multiple_errors.attn:4:30]",
            "multiple_errors.attn:5:21]",
        ],
    );
}

#[test]
fn check_of_a_missing_file() {
    let o = attnc(&["check", "examples/nosuch.attn"]);
    assert_fails(&o, &["cannot read `examples/nosuch.attn`", "No such file"]);
}

// run -----------------------------------------------------------------------

#[test]
fn run_reproduces_the_fixture() {
    let dir = TempDir::new();
    let lse = dir.str("lse.npy");
    let o = run_packed(&dir, &["--lse", &lse]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("packed_docs: wrote out f32[2, 4, 95, 16]"),
        "{}",
        stderr(&o)
    );
    let out = npy::read_f32_dyn(&dir.path("out.npy")).unwrap();
    let expected = npy::read_f32_dyn(&fixture("out.npy")).unwrap();
    assert!(
        max_abs_diff(&out, &expected) <= 1e-5,
        "out differs by {}",
        max_abs_diff(&out, &expected)
    );
    let lse = npy::read_f32_dyn(&dir.path("lse.npy")).unwrap();
    let expected = npy::read_f32_dyn(&fixture("lse.npy")).unwrap();
    assert!(
        max_abs_diff(&lse, &expected) <= 1e-5,
        "lse differs by {}",
        max_abs_diff(&lse, &expected)
    );
    assert!(lse.into_dimensionality::<Ix3>().is_ok());
}

#[test]
fn run_reads_int_buffers_from_int32_files() {
    let dir = TempDir::new();
    let BufferData::Int(doc) = npy::read_buffer(&fixture("doc.npy"), "doc", Type::Int).unwrap()
    else {
        panic!("doc is an int buffer")
    };
    write_npy(
        &dir.path("doc32.npy"),
        &doc.mapv(|x| i32::try_from(x).unwrap()),
    );
    let doc32 = format!("doc={}", dir.str("doc32.npy"));
    let out = dir.path("out32.npy");
    let o = run_with(
        "examples/packed_docs.attn",
        &fixture("q.npy"),
        &fixture("k.npy"),
        &fixture("v.npy"),
        &out,
        &["--buffer", &doc32],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = npy::read_f32_dyn(&out).unwrap();
    let expected = npy::read_f32_dyn(&fixture("out.npy")).unwrap();
    assert!(max_abs_diff(&out, &expected) <= 1e-5);
}

#[test]
fn run_of_a_missing_spec_or_input_file() {
    let dir = TempDir::new();
    let out = dir.path("out.npy");
    let o = run_with(
        "examples/nosuch.attn",
        &fixture("q.npy"),
        &fixture("k.npy"),
        &fixture("v.npy"),
        &out,
        &[],
    );
    assert_fails(&o, &["cannot read `examples/nosuch.attn`"]);
    let missing = dir.path("nosuch_q.npy");
    let o = run_with(
        "examples/causal.attn",
        &missing,
        &fixture("k.npy"),
        &fixture("v.npy"),
        &out,
        &[],
    );
    assert_fails(&o, &["cannot read `", "nosuch_q.npy`", "No such file"]);
    let o = run_with(
        "examples/packed_docs.attn",
        &fixture("q.npy"),
        &fixture("k.npy"),
        &fixture("v.npy"),
        &out,
        &["--buffer", "doc=/nonexistent/doc.npy"],
    );
    assert_fails(&o, &["cannot read `/nonexistent/doc.npy`", "No such file"]);
}

#[test]
fn run_of_an_unreadable_npy() {
    let dir = TempDir::new();
    std::fs::write(dir.path("q.npy"), "this is not an npy file\n").unwrap();
    let o = run_with_q("examples/causal.attn", &dir.path("q.npy"), &dir);
    assert_fails(
        &o,
        &[
            "cannot read q from `",
            "q.npy` (expected a float32 or float64 .npy, or one in the --dtype's own type): not an .npy file",
        ],
    );
    // A text file given as a buffer.
    let o = run_packed_doc(&dir, &dir.path("q.npy"), &[]);
    assert_fails(
        &o,
        &[
            "cannot read buffer `doc` from `",
            "it is declared int, which takes int32 or int64 data: not an .npy file",
        ],
    );
}

#[test]
fn run_with_q_not_4d() {
    let dir = TempDir::new();
    write_npy(
        &dir.path("q3.npy"),
        &ArrayD::<f32>::zeros(IxDyn(&[4, 95, 16])),
    );
    let o = run_with_q("examples/causal.attn", &dir.path("q3.npy"), &dir);
    assert_fails(
        &o,
        &[
            "q in `",
            "has shape [4, 95, 16]",
            "q must be 4-dimensional: [B, H, Q, D]",
        ],
    );
}

#[test]
fn run_converts_float64_inputs_and_says_so_once() {
    let dir = TempDir::new();
    // The fixture's float32 q, k, v and an ALiBi slope buffer, also as float64
    // (exactly the same values): the outputs must be bit for bit the same.
    let slope = Array::from_shape_fn(4, |i| 2f32.powf(-8.0 * (i + 1) as f32 / 4.0));
    write_npy(&dir.path("slope.npy"), &slope);
    write_npy(&dir.path("slope64.npy"), &slope.mapv(f64::from));
    for name in ["q", "k", "v"] {
        let a = npy::read_f32_dyn(&fixture(&format!("{name}.npy"))).unwrap();
        write_npy(&dir.path(&format!("{name}64.npy")), &a.mapv(f64::from));
    }
    let run = |q: &str, k: &str, v: &str, slope: &str, out: &str| {
        let slope = format!("slope={}", dir.str(slope));
        let lse = dir.str(&format!("lse-{out}"));
        run_with(
            "examples/alibi.attn",
            Path::new(q),
            Path::new(k),
            Path::new(v),
            &dir.path(out),
            &["--buffer", &slope, "--lse", &lse],
        )
    };
    let (q, k, v) = (fixture("q.npy"), fixture("k.npy"), fixture("v.npy"));
    let o32 = run(
        q.to_str().unwrap(),
        k.to_str().unwrap(),
        v.to_str().unwrap(),
        "slope.npy",
        "o32.npy",
    );
    assert_eq!(o32.status.code(), Some(0), "{}", stderr(&o32));
    assert!(!stderr(&o32).contains("note:"), "{}", stderr(&o32));
    let o64 = run(
        &dir.str("q64.npy"),
        &dir.str("k64.npy"),
        &dir.str("v64.npy"),
        "slope64.npy",
        "o64.npy",
    );
    assert_eq!(o64.status.code(), Some(0), "{}", stderr(&o64));
    let err = stderr(&o64);
    for name in ["q64.npy", "k64.npy", "v64.npy", "slope64.npy"] {
        let note = format!("note: {} is float64; converted to float32", dir.str(name));
        assert_eq!(
            err.matches(&note).count(),
            1,
            "`{note}` not once in:\n{err}"
        );
    }
    for (a, b) in [("o32.npy", "o64.npy"), ("lse-o32.npy", "lse-o64.npy")] {
        let (a, b) = (
            npy::read_f32_dyn(&dir.path(a)).unwrap(),
            npy::read_f32_dyn(&dir.path(b)).unwrap(),
        );
        assert_eq!(a.shape(), b.shape());
        assert!(
            a.iter()
                .zip(b.iter())
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "float64 inputs give a different output"
        );
    }
}

#[test]
fn run_with_int64_q_is_an_error() {
    let dir = TempDir::new();
    write_npy(
        &dir.path("qi.npy"),
        &ArrayD::<i64>::zeros(IxDyn(&[2, 4, 95, 16])),
    );
    let o = run_with_q("examples/causal.attn", &dir.path("qi.npy"), &dir);
    assert_fails(
        &o,
        &[
            "cannot read q from `",
            "(expected a float32 or float64 .npy, or one in the --dtype's own type): the file holds int64 data (descriptor `<i8`)",
        ],
    );
    assert!(!dir.path("o.npy").exists());
}

#[test]
fn run_with_a_buffer_of_the_wrong_dtype() {
    let dir = TempDir::new();
    write_npy(&dir.path("docf.npy"), &ArrayD::<f32>::zeros(IxDyn(&[95])));
    let o = run_packed_doc(&dir, &dir.path("docf.npy"), &[]);
    assert_fails(
        &o,
        &[
            "cannot read buffer `doc`",
            "declared int, which takes int32 or int64 data: the file holds float32 data",
        ],
    );
}

#[test]
fn run_without_a_declared_buffer() {
    let dir = TempDir::new();
    let o = run_fixture("examples/packed_docs.attn", &dir, &[]);
    assert_fails(
        &o,
        &[
            "missing buffer `doc`",
            "declares `buffer doc[KV]: int`",
            "--buffer doc=FILE.npy",
        ],
    );
    assert!(!dir.path("o.npy").exists(), "no output is written on error");
}

#[test]
fn run_with_an_undeclared_buffer() {
    let dir = TempDir::new();
    let slope = format!("slope={}", fixture("doc.npy").display());
    let o = run_packed(&dir, &["--buffer", &slope]);
    assert_fails(
        &o,
        &[
            "unexpected buffer `slope`",
            "attention `packed_docs` declares no such buffer",
            "its buffers are: doc",
        ],
    );
    // A buffer for a spec that takes none.
    let o = run_fixture("examples/causal.attn", &dir, &["--buffer", &slope]);
    assert_fails(
        &o,
        &[
            "unexpected buffer `slope`",
            "this attention block takes no buffers",
        ],
    );
}

#[test]
fn run_with_a_buffer_of_the_wrong_shape() {
    let dir = TempDir::new();
    write_npy(&dir.path("doc94.npy"), &ArrayD::<i64>::zeros(IxDyn(&[94])));
    let o = run_packed_doc(&dir, &dir.path("doc94.npy"), &[]);
    assert_fails(
        &o,
        &[
            "buffer `doc` has shape [94], but `doc[KV]` is [95] for these inputs",
            "KV=95",
        ],
    );
}

#[test]
fn run_with_mismatched_q_k_v() {
    let dir = TempDir::new();
    // D differs.
    write_npy(
        &dir.path("k8.npy"),
        &ArrayD::<f32>::zeros(IxDyn(&[2, 2, 95, 8])),
    );
    let o = run_with(
        "examples/causal.attn",
        &fixture("q.npy"),
        &dir.path("k8.npy"),
        &dir.path("k8.npy"),
        &dir.path("o.npy"),
        &[],
    );
    assert_fails(&o, &["head dim differs: q has D = 16 (shape [2, 4, 95, 16]), k and v have D = 8 (shape [2, 2, 95, 8])"]);
    // H = 4 is not a multiple of HKV = 3.
    write_npy(
        &dir.path("k3.npy"),
        &ArrayD::<f32>::zeros(IxDyn(&[2, 3, 95, 16])),
    );
    let o = run_with(
        "examples/causal.attn",
        &fixture("q.npy"),
        &dir.path("k3.npy"),
        &dir.path("k3.npy"),
        &dir.path("o.npy"),
        &[],
    );
    assert_fails(
        &o,
        &["H = 4 query heads is not a multiple of HKV = 3 key/value heads"],
    );
    // k and v differ.
    let o = run_with(
        "examples/causal.attn",
        &fixture("q.npy"),
        &fixture("k.npy"),
        &dir.path("k3.npy"),
        &dir.path("o.npy"),
        &[],
    );
    assert_fails(
        &o,
        &["k and v must have the same shape: k is [2, 2, 95, 16], v is [2, 3, 95, 16]"],
    );
    // A negative query offset.
    let o = run_fixture("examples/causal.attn", &dir, &["--q-offset", "-3"]);
    assert_fails(&o, &["the query offset must be >= 0, found -3"]);
}

#[test]
fn run_with_bad_params() {
    let dir = TempDir::new();
    let run = |extra: &[&str]| run_fixture("examples/sliding_window.attn", &dir, extra);
    let o = run(&["--param", "window=abc"]);
    assert_fails(
        &o,
        &[
            "param `window` is declared int, but the override `abc` is not an int",
            "sliding_window.attn:",
            "declared int here",
            "write an integer, e.g. `window=128`",
        ],
    );
    let o = run(&["--param", "nosuch=1"]);
    assert_fails(
        &o,
        &[
            "attention `sliding_window` has no param `nosuch`",
            "its params are: window",
        ],
    );
    let o = run(&["--param", "windwo=1"]);
    assert_fails(&o, &["did you mean `window`?"]);
    let o = run(&["--param", "window"]);
    assert_fails(&o, &["`--param window` must have the form NAME=VALUE"]);
    let o = run(&["--param", "=5"]);
    assert_fails(&o, &["`--param =5` must have the form NAME=VALUE"]);
    // A good override runs.
    let o = run(&["--param", "window=8"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn run_with_a_malformed_buffer_flag() {
    let dir = TempDir::new();
    let o = run_packed(&dir, &["--buffer", "doc"]);
    assert_fails(&o, &["`--buffer doc` must have the form NAME=VALUE"]);
}

#[test]
fn run_with_an_unknown_entry() {
    let dir = TempDir::new();
    let o = run_packed(&dir, &["--entry", "nosuch"]);
    assert_fails(
        &o,
        &[
            "no attention block named `nosuch`",
            "the file defines: packed_docs",
        ],
    );
}

#[test]
fn run_needs_an_entry_for_a_file_with_several_blocks() {
    let dir = TempDir::new();
    std::fs::write(
        dir.path("two.attn"),
        "attention a { mask = causal }\nattention b { mask = q - kv < 4 }\n",
    )
    .unwrap();
    let spec = dir.str("two.attn");
    let o = run_with(
        &spec,
        &fixture("q.npy"),
        &fixture("k.npy"),
        &fixture("v.npy"),
        &dir.path("o.npy"),
        &[],
    );
    assert_fails(
        &o,
        &[
            "several attention blocks",
            "pass `--entry NAME`; the file defines: a, b",
        ],
    );
    let o = run_with(
        &spec,
        &fixture("q.npy"),
        &fixture("k.npy"),
        &fixture("v.npy"),
        &dir.path("o.npy"),
        &["--entry", "b"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn run_of_a_bad_spec_reports_the_spec_error() {
    let dir = TempDir::new();
    let o = run_fixture("tests/errors/score_in_mask.attn", &dir, &[]);
    assert_fails(
        &o,
        &[
            "`score` cannot be used in `mask`",
            "score_in_mask.attn:3:12]",
        ],
    );
}

#[test]
fn run_to_an_unwritable_output() {
    let dir = TempDir::new();
    let o = run_with(
        "examples/causal.attn",
        &fixture("q.npy"),
        &fixture("k.npy"),
        &fixture("v.npy"),
        &dir.path("no/such/dir/out.npy"),
        &[],
    );
    assert_fails(&o, &["cannot write `", "out.npy`"]);
}

/// `attnc bench` of the causal example on a small shape with `extra` flags, its
/// JSON report parsed.
fn bench_causal_json(extra: &[&str]) -> serde_json::Value {
    bench_json("examples/causal.attn", extra)
}

/// `attnc bench` of `spec` on a small shape with `extra` flags, its JSON report parsed.
fn bench_json(spec: &str, extra: &[&str]) -> serde_json::Value {
    bench_json_of(spec, "64", "1", extra)
}

/// [`bench_json`] with `q_len` queries and `heads` heads.
fn bench_json_of(spec: &str, q_len: &str, heads: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["bench", spec, "--q-len", q_len, "--heads", heads];
    args.extend_from_slice(extra);
    args.push("--json");
    let o = attnc(&args);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    serde_json::from_str(&stdout(&o)).expect("one JSON object")
}

#[test]
fn bench_reports_the_fma_peak_beside_the_runs() {
    // A prefill on packed K/V runs the products `--gemm` asks for.
    let bench = |q_len, extra| bench_json_of("examples/causal.attn", q_len, "2", extra);
    let jit = ["--runs", "3", "--warmup", "0", "--gemm", "jit", "--peak"];
    let r = bench("256", &jit);
    assert_eq!(r["nest"], "rows one_head, kv packed", "{r}");
    assert!(
        r["backend"].as_str().unwrap().starts_with("jit (jit, "),
        "{r}"
    );
    let peak = &r["fma_peak"];
    assert_eq!(peak["kind"], "jit-f32x4");
    // A decode reads K/V in place with native products, which have no JIT
    // form: the report names them, and the peak is theirs.
    let r = bench("1", &jit);
    assert_eq!(r["nest"], "rows gqa_group, kv in_place", "{r}");
    let backend = r["backend"].as_str().unwrap();
    assert!(backend.starts_with("jit (native-"), "{r}");
    let kind = r["fma_peak"]["kind"].as_str().unwrap();
    assert!(kind != "jit-f32x4" && backend.contains(kind), "{r}");
    for key in ["median_gflops", "median_fraction", "best_fraction"] {
        let x = peak[key].as_f64().unwrap_or(-1.0);
        assert!(x.is_finite() && x > 0.0, "{key}: {peak}");
    }
    assert!(peak["best_fraction"].as_f64() >= peak["median_fraction"].as_f64());
    // Without --peak the field is null; other backends have no tile products.
    let r = bench_causal_json(&["--runs", "1"]);
    assert!(r["fma_peak"].is_null(), "{r}");
    let o = attnc(&[
        "bench",
        "examples/causal.attn",
        "--q-len",
        "64",
        "--backend",
        "interp",
        "--peak",
    ]);
    assert_fails(&o, &["`--peak` measures the jit backend", "--backend jit"]);
}

#[test]
fn bench_measures_the_memory_bandwidth_beside_the_runs() {
    // A paged decode step: the pool is what is streamed; the ratio is the
    // call's median time over the time to read K+V once at that rate.
    let o = attnc(&[
        "bench",
        "examples/causal.attn",
        "--runs",
        "3",
        "--q-len",
        "1",
        "--kv-len",
        "4096",
        "--heads",
        "8",
        "--kv-heads",
        "2",
        "--page-size",
        "16",
        "--bandwidth",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("one JSON object");
    let (bw, ratio, median, bytes) = (
        r["read_gb_per_s"].as_f64().unwrap(),
        r["memory_ratio"].as_f64().unwrap(),
        r["median_ms"].as_f64().unwrap(),
        r["kv_bytes"].as_f64().unwrap(),
    );
    assert_eq!(bytes, (2 * 4096 * 64 * 4 * 2) as f64, "{r}");
    assert_eq!(r["kv_stored_bytes"].as_f64(), Some(bytes), "{r}");
    assert!(bw.is_finite() && bw > 0.0, "{r}");
    let want = median / (bytes / (bw * 1e6));
    assert!((ratio - want).abs() <= 1e-9 * want, "{r}");
    // Text: one line; without the flag the fields are null.
    let o = attnc(&[
        "bench",
        "examples/causal.attn",
        "--q-len",
        "1",
        "--kv-len",
        "256",
        "--runs",
        "1",
        "--bandwidth",
    ]);
    assert!(
        stdout(&o)
            .contains("GB/s beside the runs (K and V streamed by every thread): the call takes"),
        "{}",
        stdout(&o)
    );
    // That query sits at position 0 (no `--q-offset`): causal, it sees key 0
    // alone, which is all the call must read of the 256 stored.
    assert!(
        stdout(&o).contains("K+V 4.0 KiB seen by the mask (of 1.0 MiB stored) read at"),
        "{}",
        stdout(&o)
    );
    let r = bench_json_of(
        "examples/causal.attn",
        "1",
        "2",
        &["--runs", "1", "--kv-len", "256"],
    );
    let row = (r["kv_heads"].as_u64().unwrap() * r["dim"].as_u64().unwrap() * 4 * 2) as f64;
    assert_eq!(r["kv_bytes"].as_f64(), Some(row), "{r}");
    assert_eq!(r["kv_stored_bytes"].as_f64(), Some(256.0 * row), "{r}");
    let r = bench_causal_json(&["--runs", "1"]);
    assert!(
        r["read_gb_per_s"].is_null() && r["memory_ratio"].is_null(),
        "{r}"
    );
}

#[test]
fn bench_reports_the_tile_sizes_it_picked() {
    // The causal example has a mask: automatic tiles are 64x64; `--block` fixes them.
    let r = bench_causal_json(&["--runs", "1"]);
    assert!(
        r["backend"].as_str().unwrap().ends_with(", 64x64 tiles)"),
        "{r}"
    );
    let r = bench_causal_json(&["--runs", "1", "--block", "32x16"]);
    assert!(
        r["backend"].as_str().unwrap().ends_with(", 32x16 tiles)"),
        "{r}"
    );
    // A spec without a mask gets taller query tiles.
    let r = bench_json("benches/specs/dense.attn", &["--runs", "1"]);
    assert!(
        r["backend"].as_str().unwrap().ends_with(", 128x64 tiles)"),
        "{r}"
    );
    let o = attnc(&[
        "bench",
        "examples/causal.attn",
        "--q-len",
        "64",
        "--block",
        "automatic",
    ]);
    assert_fails(&o, &["automatic"]);
}

#[test]
fn bench_reports_the_types_and_the_loop_nest_it_ran() {
    // A prefill of 256 rows (64 rows of one head would be read in place).
    let prefill = |extra: &[&str]| {
        let args = [
            &["--runs", "1", "--q-len", "256", "--heads", "2", "--json"][..],
            extra,
        ]
        .concat();
        let o = attnc(&[&["bench", "examples/causal.attn"][..], &args].concat());
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        serde_json::from_str::<serde_json::Value>(&stdout(&o)).expect("one JSON object")
    };
    let r = prefill(&[]);
    assert_eq!(
        (&r["q_dtype"], &r["kv_dtype"], &r["nest"]),
        (
            &serde_json::json!("f32"),
            &serde_json::json!("f32"),
            &serde_json::json!("rows one_head, kv packed")
        ),
        "{r}"
    );
    // bf16 q, k and v: pairs where this CPU has a bf16 dot product.
    let pairs = attnc::driver::default_bf16_pairs();
    let r = prefill(&["--dtype", "bf16"]);
    let kv = if pairs { "packed_bf16" } else { "packed" };
    assert_eq!(r["q_dtype"], "bf16", "{r}");
    assert_eq!(r["kv_dtype"], "bf16", "{r}");
    assert_eq!(r["nest"], format!("rows one_head, kv {kv}"), "{r}");
    // The interpreter runs the same nest.
    let r = prefill(&["--dtype", "bf16", "--backend", "interp"]);
    assert_eq!(r["nest"], format!("rows one_head, kv {kv}"), "{r}");
    // An int8 decode step on a pool: every head of a sequence in one tile,
    // read in place; the text report says it too.
    let decode = [
        "--runs",
        "1",
        "--q-len",
        "1",
        "--kv-len",
        "64",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--page-size",
        "16",
        "--kv-dtype",
        "int8",
    ];
    let o = attnc(&[&["bench", "examples/causal.attn"][..], &decode, &["--json"]].concat());
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("one JSON object");
    assert_eq!(r["q_dtype"], "f32", "{r}");
    assert_eq!(r["kv_dtype"], "int8", "{r}");
    assert_eq!(r["nest"], "rows all_heads, kv in_place", "{r}");
    let o = attnc(&[&["bench", "examples/causal.attn"][..], &decode].concat());
    assert!(
        stdout(&o)
            .contains("D=64, q f32, K/V int8, 1 runs\n  loop nest: rows all_heads, kv in_place\n"),
        "{}",
        stdout(&o)
    );
    // The reference has no loop nest.
    let r = bench_causal_json(&["--runs", "1", "--backend", "reference"]);
    assert!(r["nest"].is_null(), "{r}");
}

#[test]
fn usage_errors_exit_2() {
    // Missing required flags and unknown flags are clap's usage errors.
    let o = attnc(&["run", "examples/causal.attn", "--q", "q.npy"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--k"), "{}", stderr(&o));
    let o = attnc(&["check", "examples/causal.attn", "--nosuch"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = attnc(&["nosuch"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

// help ----------------------------------------------------------------------

/// The subcommands `attnc --help` lists (besides `help`).
fn subcommands() -> Vec<String> {
    let help = stdout(&attnc(&["--help"]));
    let list = help
        .split("Commands:")
        .nth(1)
        .expect("--help lists the commands");
    list.lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn every_subcommand_help_has_an_example() {
    let commands = subcommands();
    assert!(
        commands.iter().any(|c| c == "check") && commands.iter().any(|c| c == "run"),
        "{commands:?}"
    );
    for c in commands {
        let o = attnc(&[&c, "--help"]);
        assert_eq!(o.status.code(), Some(0), "{c}: {}", stderr(&o));
        let text = stdout(&o);
        assert!(
            text.contains("Example"),
            "`attnc {c} --help` has no example:\n{text}"
        );
        assert!(
            text.contains(&format!("attnc {c} ")),
            "`attnc {c} --help` example does not run `attnc {c}`:\n{text}"
        );
    }
}

#[test]
fn emit_ptx_that_cannot_be_generated_says_why_and_how_to_fix_it() {
    let spec = root().join("examples/causal.attn");
    let o = attnc(&[
        "emit",
        spec.to_str().unwrap(),
        "--target",
        "ptx",
        "--dim",
        "512",
    ]);
    assert_fails(
        &o,
        &[
            "attnc::ptx::head_dim",
            "head dim D = 512 is too large for the PTX backend",
            "help: use D <= 256",
        ],
    );
}

// sizes beyond memory (issue 17, item 4) ------------------------------------

/// Asserts that `o` failed with a memory error that names `input`, the bytes
/// needed and the bytes available, before allocating anything (no abort).
#[track_caller]
fn assert_beyond_memory(o: &Output, input: &str) {
    assert_fails(
        o,
        &[
            "attnc::memory",
            input,
            "would need",
            " bytes), but only ",
            "available",
        ],
    );
    assert!(!stderr(o).contains("memory allocation"), "{}", stderr(o));
}

/// Shapes and tiles whose estimate exceeds any machine's memory by far are
/// errors that name them, made before anything is allocated. (Each of these
/// aborted the process with a failed allocation, or would be killed by the
/// kernel on touching memory that overcommit granted.)
#[test]
fn bench_beyond_memory_is_an_error_naming_the_sizes() {
    let cases: [(&[&str], &str); 7] = [
        (
            &["--q-len", "64", "--kv-len", "1000000000"],
            "KV=1000000000",
        ),
        // A pool of pages far longer than the sequences (it panicked on the
        // shape's overflow, or aborted allocating it).
        (&["--q-len", "64", "--page-size", "1000000000"], "KV=64"),
        (
            &["--q-len", "64", "--page-size", "18446744073709551615"],
            "KV=64",
        ),
        (
            &["--q-len", "100000000", "--heads", "64", "--dim", "128"],
            "Q=100000000",
        ),
        (&["--q-len", "64", "--dim", "1000000000"], "D=1000000000"),
        (
            &["--q-len", "64", "--block", "100000000x100000000"],
            "100000000x100000000 tiles",
        ),
        (
            &[
                "--q-len",
                "64",
                "--batch",
                "100000000",
                "--backend",
                "reference",
            ],
            "B=100000000",
        ),
    ];
    for (flags, input) in cases {
        let mut args = vec!["bench", "examples/causal.attn"];
        args.extend_from_slice(flags);
        assert_beyond_memory(&attnc(&args), input);
    }
}

/// Under an address-space limit (`ulimit -v`) a run whose inputs fit the
/// machine but not the limit is refused, naming the limit, before it
/// allocates (it passed the check and aborted on the allocation).
#[test]
fn a_run_beyond_the_address_space_limit_is_an_error() {
    if !cfg!(target_os = "linux") {
        eprintln!("not on Linux: /proc/self/limits is not there");
        return;
    }
    // 3 GiB of address space; k and v of 2^20 x 8 x 64 floats are 4 GiB.
    let o = Command::new("sh")
        .args([
            "-c",
            "ulimit -v 3145728 && exec \"$0\" \"$@\"",
            env!("CARGO_BIN_EXE_attnc"),
            "run",
            "examples/dense.attn",
            "--random",
            "--q-len",
            "64",
            "--kv-len",
            "1048576",
            "--heads",
            "8",
            "--dim",
            "64",
            "--check",
        ])
        .current_dir(root())
        .output()
        .expect("sh runs");
    assert_fails(&o, &["attnc::memory", "`ulimit -v`"]);
    assert!(!stderr(&o).contains("memory allocation"), "{}", stderr(&o));
}

#[test]
fn run_with_tiles_beyond_memory_is_an_error() {
    let dir = TempDir::new();
    let o = run_packed(&dir, &["--block", "100000000x100000000"]);
    assert_beyond_memory(&o, "100000000x100000000 tiles");
    assert!(!dir.path("out.npy").exists());
}

#[test]
fn blocks_beyond_memory_is_an_error() {
    let dir = TempDir::new();
    // One map per (b, h): 10^9 maps of 2^31 - 1 query tiles.
    let spec = dir.path("bh.attn");
    std::fs::write(&spec, "attention bh { mask = kv <= q + b + h }").unwrap();
    let o = attnc(&[
        "blocks",
        spec.to_str().unwrap(),
        "--q-len",
        "2147483647",
        "--kv-len",
        "2147483647",
        "--block",
        "1",
        "--b",
        "1000000",
        "--h",
        "1000",
    ]);
    assert_beyond_memory(
        &o,
        "`attnc blocks` of `bh` on B=1000000 H=1000 Q=2147483647 KV=2147483647 with 1x1 tiles",
    );
}

/// Batch x heads x length beyond what an array can hold was a panic
/// ("broadcast of a single element").
#[test]
fn blocks_with_a_huge_batch_and_heads_is_an_error() {
    let o = attnc(&[
        "blocks",
        "examples/causal.attn",
        "--q-len",
        "64",
        "--kv-len",
        "64",
        "--b",
        "1000000000",
        "--h",
        "1000000000",
    ]);
    assert_fails(
        &o,
        &[
            "--batch 1000000000 x --heads 1000000000 x --q-len 64",
            "more than an array can hold",
        ],
    );
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
}

/// A header that claims more data than the file holds is an error before
/// anything is allocated (it aborted on a 128 GiB allocation).
#[test]
fn npy_claiming_more_data_than_the_file_holds_is_an_error() {
    let dir = TempDir::new();
    let q = dir.path("q.npy");
    let claim = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 2147483648, 16), }";
    std::fs::write(&q, attnc::npy::v1_file_bytes(claim, &[0; 64])).unwrap();
    let o = run_with_q("examples/causal.attn", &q, &dir);
    assert_fails(
        &o,
        &[
            "cannot read q from",
            "its header claims shape [1, 1, 2147483648, 16] of `<f4`: reading it needs 128.0 GiB (137438953472 bytes) of data, but the file holds only 64 bytes after the header",
        ],
    );
    // The same for a buffer, read in its declared type.
    let doc = dir.path("doc.npy");
    let claim = "{'descr': '<i4', 'fortran_order': False, 'shape': (4000000000000,), }";
    std::fs::write(&doc, attnc::npy::v1_file_bytes(claim, &[0; 8])).unwrap();
    let o = run_packed_doc(&dir, &doc, &[]);
    assert_fails(
        &o,
        &[
            "cannot read buffer `doc` from",
            "of `<i4`",
            "but the file holds only 8 bytes",
        ],
    );
    // A header length beyond any real header (version 2 has 4 bytes for it).
    let mut bytes = b"\x93NUMPY\x02\x00".to_vec();
    bytes.extend_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(&q, bytes).unwrap();
    let o = run_with_q("examples/causal.attn", &q, &dir);
    assert_fails(
        &o,
        &["its header claims to be 4.0 GiB (4294967295 bytes) long"],
    );
    assert!(!dir.path("o.npy").exists());
}

/// A pipe has no size to compare with: the claim is checked against the
/// memory available instead.
#[cfg(target_os = "linux")]
#[test]
fn npy_from_a_pipe_claiming_more_than_memory_is_an_error() {
    use std::io::Write;
    let dir = TempDir::new();
    let fifo = dir.path("q.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status();
    assert!(
        made.is_ok_and(|s| s.success()),
        "mkfifo (coreutils) is needed to make the pipe this test reads"
    );
    // Opened for reading and writing, a FIFO does not block on Linux; the
    // header fits in the pipe's buffer, and this end stays open while attnc reads.
    let mut pipe = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    let claim = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000, 1000, 1000, 1000000), }";
    pipe.write_all(&attnc::npy::v1_file_bytes(claim, &[0; 64]))
        .unwrap();
    let o = run_with_q("examples/causal.attn", &fifo, &dir);
    assert_beyond_memory(&o, "reading q of shape [1000, 1000, 1000, 1000000] from");
}

/// A spec file is read up to 16 MiB; beyond, it is an error, also for a
/// file that never ends (it was read until the process was killed).
#[test]
fn spec_files_beyond_the_size_limit_are_an_error() {
    let dir = TempDir::new();
    let big = dir.path("big.attn");
    let f = File::create(&big).unwrap();
    f.set_len(16 * 1024 * 1024 + 1).unwrap();
    let limit = "a spec file may hold at most 16.0 MiB (16777216 bytes) and this one holds more";
    assert_fails(&attnc(&["check", big.to_str().unwrap()]), &[limit]);
    if Path::new("/dev/zero").exists() {
        let start = std::time::Instant::now();
        assert_fails(
            &attnc(&["check", "/dev/zero"]),
            &["cannot read `/dev/zero`", limit],
        );
        assert!(start.elapsed().as_secs() < 30, "{:?}", start.elapsed());
    }
    let o = attnc(&["emit", big.to_str().unwrap(), "--stage", "ast"]);
    assert_fails(&o, &[limit]);
}

// outputs on failure (item 6) ----------------------------------------------

/// The files in `dir`, sorted.
fn files_in(dir: &TempDir) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.0.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// When one output cannot be written, none is: `--out` is not left behind
/// when `--lse` fails, and no temporary file remains.
#[test]
fn run_writes_all_outputs_or_none() {
    let dir = TempDir::new();
    let lse = dir.str("nodir/l.npy");
    let o = run_packed(&dir, &["--lse", &lse]);
    assert_fails(&o, &["cannot write `", "l.npy` (--lse)", "does not exist"]);
    assert_eq!(files_in(&dir), Vec::<String>::new());
    // A failure while writing (a full device) after out was written.
    if Path::new("/dev/full").exists() {
        let o = run_packed(&dir, &["--lse", "/dev/full"]);
        assert_fails(
            &o,
            &[
                "cannot write `/dev/full` (--lse)",
                "No space left on device",
            ],
        );
        assert_eq!(files_in(&dir), Vec::<String>::new());
        // Every output flag is named.
        let o = attnc(&["emit", "examples/causal.attn", "-o", "/dev/full"]);
        assert_fails(&o, &["cannot write `/dev/full` (-o)"]);
        let o = attnc(&[
            "blocks",
            "examples/causal.attn",
            "--q-len",
            "64",
            "--png",
            "/dev/full",
        ]);
        assert_fails(&o, &["cannot write `/dev/full` (--png)"]);
    }
    // An existing output is replaced only by a complete one.
    std::fs::write(dir.path("out.npy"), b"old").unwrap();
    let o = run_packed(&dir, &["--lse", &lse]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(std::fs::read(dir.path("out.npy")).unwrap(), b"old");
    let o = run_packed(&dir, &["--lse", &dir.str("lse.npy")]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(files_in(&dir), vec!["lse.npy", "out.npy"]);
    assert_eq!(
        npy::read_f32_dyn(&dir.path("out.npy")).unwrap().shape(),
        &[2, 4, 95, 16]
    );
}

#[test]
fn run_with_out_and_lse_the_same_file_is_an_error() {
    let dir = TempDir::new();
    for lse in [
        dir.str("out.npy"),
        format!("{}/./out.npy", dir.0.path().display()),
    ] {
        let o = run_packed(&dir, &["--lse", &lse]);
        assert_fails(&o, &["--out `", "and --lse `", "name the same file"]);
        assert_eq!(files_in(&dir), Vec::<String>::new());
    }
}

/// `emit -o FILE` writes every stage to FILE (only `--target ptx` did), the
/// same text as on stdout.
#[test]
fn emit_writes_every_stage_to_the_output_file() {
    let dir = TempDir::new();
    let stages: [&[&str]; 6] = [
        &["--stage", "ast"],
        &["--stage", "checked"],
        &["--stage", "tile-unopt"],
        &["--stage", "tile"],
        &["--stage", "clif"],
        &["--stage", "blocks", "--q-len", "256"],
    ];
    for flags in stages {
        let mut args = vec!["emit", "examples/causal.attn"];
        args.extend_from_slice(flags);
        let to_stdout = attnc(&args);
        assert_eq!(
            to_stdout.status.code(),
            Some(0),
            "{flags:?}: {}",
            stderr(&to_stdout)
        );
        let file = dir.str("stage.txt");
        args.extend(["-o", &file]);
        let o = attnc(&args);
        assert_eq!(o.status.code(), Some(0), "{flags:?}: {}", stderr(&o));
        assert_eq!(stdout(&o), "", "{flags:?}: -o must keep stdout empty");
        let written = std::fs::read_to_string(&file).unwrap();
        assert!(!written.is_empty(), "{flags:?}");
        if flags[1] == "blocks" {
            // The build time differs between runs.
            let grid = |t: &str| t.lines().take(4).collect::<Vec<_>>().join("\n");
            assert_eq!(grid(&written), grid(&stdout(&to_stdout)), "{flags:?}");
        } else {
            assert_eq!(written, stdout(&to_stdout), "{flags:?}");
        }
    }
    assert_eq!(files_in(&dir), vec!["stage.txt"]);
    // A failed emit leaves an existing file as it was, and no temporary file.
    let o = attnc(&[
        "emit",
        "tests/errors/score_in_mask.attn",
        "-o",
        &dir.str("stage.txt"),
    ]);
    assert_fails(&o, &["`score` cannot be used in `mask`"]);
    assert!(!std::fs::read_to_string(dir.path("stage.txt"))
        .unwrap()
        .is_empty());
    assert_eq!(files_in(&dir), vec!["stage.txt"]);
    let o = attnc(&[
        "emit",
        "examples/causal.attn",
        "-o",
        &dir.str("no/dir/x.txt"),
    ]);
    assert_fails(&o, &["cannot write `", "x.txt` (-o)", "does not exist"]);
}

// flags (item 7) -------------------------------------------------------------

#[test]
fn a_buffer_or_param_given_twice_is_an_error_naming_both() {
    let dir = TempDir::new();
    let doc = fixture("doc.npy");
    let o = run_packed(&dir, &["--buffer", &format!("doc = {}", doc.display())]);
    assert_fails(
        &o,
        &[
            "`doc` is set twice: `--buffer doc=",
            &format!("and `--buffer doc = {}`; pass it once", doc.display()),
        ],
    );
    let o = run_fixture(
        "examples/sliding_window.attn",
        &dir,
        &["--param", "window=8", "--param", "window=16"],
    );
    assert_fails(
        &o,
        &["`window` is set twice: `--param window=8` and `--param window=16`; pass it once"],
    );
    let o = attnc(&[
        "bench",
        "examples/packed_docs.attn",
        "--q-len",
        "64",
        "--buffer",
        "doc=docs:2",
        "--buffer",
        "doc=docs:4",
    ]);
    assert_fails(
        &o,
        &["`doc` is set twice: `--buffer doc=docs:2` and `--buffer doc=docs:4`"],
    );
    let o = attnc(&[
        "blocks",
        "examples/sliding_window.attn",
        "--q-len",
        "64",
        "--kv-len",
        "64",
        "--param",
        "window=8",
        "--param",
        "window=8",
    ]);
    assert_fails(&o, &["`window` is set twice"]);
    assert_eq!(files_in(&dir), Vec::<String>::new());
}

#[test]
fn counts_out_of_range_are_errors_not_silently_changed() {
    let bench = |flags: &[&str]| {
        let mut args = vec![
            "bench",
            "examples/causal.attn",
            "--q-len",
            "16",
            "--heads",
            "1",
        ];
        args.extend_from_slice(flags);
        attnc(&args)
    };
    assert_fails(
        &bench(&["--threads", "0"]),
        &["`--threads 0`: threads must be at least 1"],
    );
    assert_fails(
        &bench(&["--threads", "100000"]),
        &["`--threads 100000`: threads must be at most 1024"],
    );
    assert_fails(
        &bench(&["--runs", "0"]),
        &["`--runs 0`: runs must be at least 1"],
    );
    let o = attnc(&[
        "blocks",
        "examples/causal.attn",
        "--q-len",
        "64",
        "--kv-len",
        "64",
        "--repeat",
        "0",
    ]);
    assert_fails(&o, &["`--repeat 0`: repeat must be at least 1"]);
    let r = bench_causal_json(&["--threads", "2", "--runs", "2", "--warmup", "0"]);
    assert_eq!(r["runs"], 2, "{r}");
}

// invisible characters (item 10) --------------------------------------------

#[test]
fn a_spec_starting_with_a_byte_order_mark_is_read() {
    let dir = TempDir::new();
    let spec = dir.path("bom.attn");
    let text = std::fs::read_to_string(root().join("examples/causal.attn")).unwrap();
    std::fs::write(&spec, format!("\u{feff}{text}")).unwrap();
    let o = attnc(&["check", spec.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).contains(": ok (1 attention block: causal)"),
        "{}",
        stdout(&o)
    );
    // Errors after the mark point at the right place.
    std::fs::write(&spec, "\u{feff}attention a {\n  mask = q >=\n}\n").unwrap();
    let o = attnc(&["check", spec.to_str().unwrap()]);
    assert_fails(&o, &["expected an expression, found `}`", "bom.attn:2:13]"]);
}

#[test]
fn invisible_characters_are_shown_escaped() {
    let dir = TempDir::new();
    let spec = dir.path("nul.attn");
    std::fs::write(&spec, "attention a {\n  mask = q >= kv\0\n}\n").unwrap();
    let o = attnc(&["check", spec.to_str().unwrap()]);
    assert_fails(
        &o,
        &[
            "found `\\0`",
            "help: `\\0` is an invisible or control character (U+0000)",
        ],
    );
    let message = stderr(&o)
        .lines()
        .find(|l| l.contains("found"))
        .unwrap()
        .to_string();
    assert!(!message.contains('\0'), "{message:?}");
}

// closed stdout (issue 16, item 1) ------------------------------------------

/// A reader that goes away (`attnc ... | head -1`) ends attnc quietly with
/// status 0, for every subcommand that prints; it was a panic (status 101).
#[test]
fn a_closed_stdout_ends_quietly() {
    let commands: [&[&str]; 7] = [
        &["emit", "examples/causal.attn", "--stage", "tile-unopt"],
        &["emit", "examples/causal.attn", "--stage", "ast"],
        &["check", "examples/causal.attn"],
        &[
            "blocks",
            "examples/causal.attn",
            "--q-len",
            "512",
            "--kv-len",
            "512",
        ],
        &[
            "bench",
            "examples/causal.attn",
            "--q-len",
            "16",
            "--heads",
            "1",
            "--runs",
            "1",
        ],
        &[
            "emit",
            "examples/causal.attn",
            "--target",
            "ptx",
            "--dim",
            "64",
        ],
        &["--help"],
    ];
    for args in commands {
        let mut child = Command::new(env!("CARGO_BIN_EXE_attnc"))
            .args(args)
            .current_dir(root())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Close the read end before attnc writes anything.
        drop(child.stdout.take());
        let o = child.wait_with_output().unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[cfg(target_os = "linux")]
#[test]
fn a_full_stdout_is_an_error() {
    let full = File::create("/dev/full");
    let Ok(full) = full else {
        return;
    };
    let o = Command::new(env!("CARGO_BIN_EXE_attnc"))
        .args(["emit", "examples/causal.attn", "--stage", "tile"])
        .current_dir(root())
        .stdout(full)
        .output()
        .unwrap();
    assert_fails(
        &o,
        &["cannot write to standard output", "No space left on device"],
    );
}

#[test]
fn run_with_a_key_tile_the_jit_cannot_compile_is_a_usage_error() {
    let dir = TempDir::new();
    let o = run_packed(&dir, &["--block", "64x40"]);
    assert_fails(
        &o,
        &[
            "tile size 64x40",
            "the jit backend needs key tiles (the second number) that are a multiple of 16",
            "packed panels of 16 keys; found 40",
            "Use 64x32 or 64x48, or `--block auto`",
            "the interp and reference backends take any positive tile sizes",
        ],
    );
    assert!(!unwrapped_stderr(&o).contains("cannot target this CPU"));
    assert!(!dir.path("out.npy").exists());
    // The same sizes run on the interp backend.
    let o = run_packed(&dir, &["--block", "64x40", "--backend", "interp"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // At the top of usize there is no multiple of 16 above (the suggestion
    // once wrapped to `64x0`, or panicked in a debug build).
    let o = run_packed(&dir, &["--block", "64x18446744073709551615"]);
    assert_fails(&o, &["Use 64x18446744073709551600, or `--block auto`"]);
}

/// `attnc run --random` with `extra` appended.
/// Writes `src` as the spec `name` in `dir` and returns its path.
fn write_spec(dir: &TempDir, name: &str, src: &str) -> String {
    let path = dir.str(name);
    std::fs::write(&path, src).unwrap();
    path
}

/// `attnc run SPEC --random` with `args` (shapes, buffers, checks).
fn run_random_on(spec: &str, args: &[&str]) -> Output {
    let mut all = vec!["run", spec, "--random"];
    all.extend_from_slice(args);
    attnc(&all)
}

/// `examples/packed_docs.attn` on random inputs, with `extra`.
fn run_random(extra: &[&str]) -> Output {
    let mut args = vec![
        "--q-len",
        "100",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--dim",
        "16",
        "--buffer",
        "doc=docs:3",
    ];
    args.extend(extra);
    run_random_on("examples/packed_docs.attn", &args)
}

#[test]
fn run_random_check_compares_with_the_reference() {
    for backend in ["jit", "interp", "reference"] {
        let o = run_random(&["--check", "--backend", backend]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let out = stdout(&o);
        assert!(
            out.starts_with(&format!(
                "check `packed_docs` {backend} against the reference: max |diff| out "
            )) && out.contains(", lse ")
                && out.ends_with("(tolerance 1.000e-4): ok\n"),
            "{out}"
        );
    }
    // The reference against itself differs by nothing.
    let o = run_random(&["--check", "--backend", "reference", "--tolerance", "0"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("max |diff| out 0.000e0, lse (relative to max(1, |lse|)) 0.000e0"),
        "{}",
        stdout(&o)
    );
    // --random writes outputs too when asked.
    let dir = TempDir::new();
    let out = dir.str("out.npy");
    let o = run_random(&["--out", &out]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let a = npy::read_f32_dyn(&dir.path("out.npy")).unwrap();
    assert_eq!(a.shape(), &[1, 4, 100, 16]);
}

/// `--out-dtype bf16|f16` writes the f32 result rounded to nearest even, as
/// uint16 bf16 bit patterns or float16; a quantized type or an unknown one is
/// a usage error that writes nothing.
#[test]
fn run_writes_the_output_in_half_precision() {
    let dir = TempDir::new();
    let o = run_random(&["--out", &dir.str("f32.npy")]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let exact = npy::read_f32_4d(&dir.path("f32.npy"), "out").unwrap();
    for elem in [attnc::ElemType::Bf16, attnc::ElemType::F16] {
        let name = format!("{elem}.npy");
        let o = run_random(&["--out", &dir.str(&name), "--out-dtype", elem.name()]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        assert!(
            stderr(&o).contains(&format!("wrote out {elem}[1, 4, 100, 16]")),
            "{}",
            stderr(&o)
        );
        let (got, note) = npy::read_q(&dir.path(&name), elem).unwrap();
        assert_eq!(note, None, "stored as {elem} already");
        assert_eq!(got, attnc::tensor::round_to(exact.view(), elem), "{elem}");
    }
    for (bad, says) in [
        (
            "int8",
            "`--out-dtype int8`: the output is written as f32, bf16 or f16",
        ),
        (
            "f64",
            "`--out-dtype f64`: unknown element type `f64` (expected f32, bf16 or f16)",
        ),
    ] {
        let o = run_random(&["--out", &dir.str("bad.npy"), "--out-dtype", bad]);
        assert_fails(&o, &[says]);
        assert!(!dir.path("bad.npy").exists());
    }
}

/// Large logits give an lse of some thousands, where 1e-4 is below half an
/// f32 ulp: `--check` compares lse relative to max(1, |lse|), so an exact
/// result passes (compared absolutely, it read 1.6e-2 and failed).
#[test]
fn run_check_compares_a_large_lse_relatively() {
    let dir = TempDir::new();
    let src = "attention big {\n  scale = 30000.0\n  mask = causal\n}\n";
    let spec = write_spec(&dir, "big.attn", src);
    let o = run_random_on(
        &spec,
        &["--q-len", "64", "--heads", "2", "--dim", "16", "--check"],
    );
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).ends_with("(tolerance 1.000e-4): ok\n"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn run_check_above_the_tolerance_fails() {
    // f32 tiles against the f64 reference differ by rounding: above 1e-30.
    let o = run_random(&["--check", "--tolerance", "1e-30"]);
    assert_fails(
        &o,
        &[
            "attnc::check",
            "`--check` of `packed_docs` failed",
            "above the tolerance 1.000e-30 (`--tolerance`)",
        ],
    );
    assert!(stdout(&o).ends_with("FAILED\n"), "{}", stdout(&o));
    for bad in ["-1", "NaN", "inf"] {
        let o = run_random(&["--check", "--tolerance", bad]);
        assert_fails(
            &o,
            &[
                &format!("`--tolerance {}`", bad.parse::<f64>().unwrap()),
                "a finite number >= 0",
            ],
        );
    }
}

#[test]
fn run_random_flags_are_checked() {
    // --random needs --q-len; shape flags and --q exclude each other; a
    // tolerance needs --check; a missing buffer names a recipe.
    for args in [
        &["run", "examples/causal.attn", "--random", "--check"][..],
        &[
            "run",
            "examples/causal.attn",
            "--random",
            "--q-len",
            "8",
            "--q",
            "q.npy",
            "--check",
        ],
        &[
            "run",
            "examples/causal.attn",
            "--random",
            "--q-len",
            "8",
            "--tolerance",
            "1",
        ],
        &["run", "examples/causal.attn", "--random", "--q-len", "8"],
    ] {
        let o = attnc(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    }
    let o = attnc(&[
        "run",
        "examples/packed_docs.attn",
        "--random",
        "--q-len",
        "8",
        "--check",
    ]);
    assert_fails(&o, &["buffer `doc` is not bound", "--buffer doc=docs:4"]);
}

/// `attnc run` refuses `--gemm` off the jit backend and `--block` off the
/// tiled CPU backends, as `bench` does, rather than ignoring them.
#[test]
fn run_refuses_tile_flags_its_backend_ignores() {
    let base = [
        "run",
        "examples/causal.attn",
        "--random",
        "--q-len",
        "8",
        "--check",
    ];
    for (extra, want) in [
        (
            &["--backend", "interp", "--gemm", "jit"][..],
            "`--gemm` picks the jit backend's tile products, and this is the interp backend",
        ),
        (
            &["--backend", "reference", "--gemm", "native"],
            "`--gemm` picks the jit backend's tile products, and this is the reference backend",
        ),
        (
            &["--backend", "reference", "--block", "32x32"],
            "`--block` sets the tiles of the tiled CPU backends (jit, interp), and the reference backend takes none",
        ),
    ] {
        assert_fails(&attnc(&[&base[..], extra].concat()), &[want]);
    }
    // `auto` is read as the tile parser reads it, spaces included.
    for extra in [
        &["--backend", "interp", "--block", "32x32"][..],
        &["--backend", "jit", "--block", "32x32", "--gemm", "native"],
        &["--backend", "reference", "--block", " auto "],
    ] {
        let o = attnc(&[&base[..], extra].concat());
        assert_eq!(o.status.code(), Some(0), "{extra:?}: {}", stderr(&o));
    }
}

/// `attnc blocks` takes the shape flags of `bench` and `run` (`--b`/`--h`
/// stay as aliases) and defaults `--kv-len` to `--q-len`.
#[test]
fn blocks_shape_flags_match_bench_and_kv_len_defaults_to_q() {
    let dir = TempDir::new();
    std::fs::write(
        dir.path("bh.attn"),
        "attention bh { mask = kv <= q + b + h }",
    )
    .unwrap();
    let spec = dir.str("bh.attn");
    let base = ["blocks", spec.as_str(), "--q-len", "256", "--json"];
    let json = |extra: &[&str]| -> serde_json::Value {
        let o = attnc(&[&base[..], extra].concat());
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let mut v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        let m = v.as_object_mut().unwrap();
        m.remove("build_ms");
        m.remove("build_ms_median");
        v
    };
    let implicit = json(&[]);
    assert_eq!(implicit["kv_len"], 256);
    assert_eq!(implicit["maps"], 1);
    assert_eq!(implicit, json(&["--kv-len", "256"]));
    let long = json(&["--batch", "2", "--heads", "4", "--kv-heads", "2"]);
    // A map per (b, h); with 64 x 64 tiles those of b + h = 0 and of
    // b + h > 0 differ (the tile after the diagonal turns partial), the rest
    // are equal.
    assert_eq!(long["maps"], 2);
    assert_eq!(long, json(&["--b", "2", "--h", "4", "--kv-heads", "2"]));
    let o = attnc(&[&base[..], &["--heads", "0"]].concat());
    assert_fails(&o, &["--heads/--h must be at least 1, found 0"]);
    let o = attnc(&[&base[..], &["--kv-heads", "0"]].concat());
    assert_fails(&o, &["--kv-heads must be at least 1, found 0"]);
    let o = attnc(&[&base[..], &["--heads", "4", "--kv-heads", "3"]].concat());
    assert_fails(&o, &["--heads 4 is not a multiple of --kv-heads 3"]);
}

/// `attnc emit --block` defaults to `auto`, as `run` and `bench` do: 128x64
/// for a spec without a mask, 64x64 otherwise, on every stage.
#[test]
fn emit_block_defaults_to_auto_like_run() {
    let emit = |args: &[&str]| {
        let o = attnc(&[&["emit"][..], args].concat());
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        stdout(&o)
    };
    let dense = emit(&["examples/dense.attn", "--stage", "tile"]);
    assert!(dense.contains("schedule: bq=128 bkv=64"), "{dense}");
    assert_eq!(
        dense,
        emit(&["examples/dense.attn", "--stage", "tile", "--block", "auto"])
    );
    let causal = emit(&["examples/causal.attn", "--stage", "tile"]);
    assert!(causal.contains("schedule: bq=64 bkv=64"), "{causal}");
    for stage in ["tile-unopt", "nest", "clif"] {
        assert_eq!(
            emit(&["examples/dense.attn", "--stage", stage]),
            emit(&["examples/dense.attn", "--stage", stage, "--block", "128x64"]),
            "--stage {stage}"
        );
    }
}

/// `--entry` is checked on every stage: `--stage ast` with a name the file
/// does not define fails as the other stages do, and with a known name
/// prints only that block.
#[test]
fn emit_checks_entry_on_every_stage() {
    let dir = TempDir::new();
    std::fs::write(
        dir.path("two.attn"),
        "attention a { mask = causal }\nattention b { mask = q - kv < 4 }\n",
    )
    .unwrap();
    let spec = dir.str("two.attn");
    for stage in ["ast", "checked", "tile-unopt", "tile", "nest", "clif"] {
        let o = attnc(&["emit", &spec, "--stage", stage, "--entry", "nosuch"]);
        assert_fails(
            &o,
            &[
                "no attention block named `nosuch`",
                "the file defines: a, b",
            ],
        );
        assert!(stdout(&o).is_empty(), "--stage {stage}: {}", stdout(&o));
    }
    let o = attnc(&[
        "emit", &spec, "--stage", "blocks", "--q-len", "8", "--entry", "nosuch",
    ]);
    assert_fails(&o, &["no attention block named `nosuch`"]);
    let o = attnc(&["emit", &spec, "--target", "ptx", "--entry", "nosuch"]);
    assert_fails(&o, &["no attention block named `nosuch`"]);
    let o = attnc(&["emit", &spec, "--stage", "ast", "--entry", "b"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let ast = stdout(&o);
    assert!(
        ast.contains("attention b") && !ast.contains("attention a"),
        "{ast}"
    );
    let o = attnc(&["emit", &spec, "--stage", "ast"]);
    assert!(stdout(&o).contains("attention a") && stdout(&o).contains("attention b"));
}

/// `--target ptx` prints PTX text; an explicit `--stage` beside it (any
/// stage, the default one too) is a usage error that names the stages,
/// not silently ignored.
#[test]
fn emit_ptx_with_a_stage_is_a_usage_error() {
    for stage in ["tile", "ast", "clif", "blocks"] {
        let o = attnc(&[
            "emit",
            "examples/causal.attn",
            "--target",
            "ptx",
            "--stage",
            stage,
        ]);
        assert_fails(
            &o,
            &[
                "`--target ptx` prints PTX text, not a compiler stage",
                &format!("drop `--stage {stage}`"),
                "--stage ast|checked|tile-unopt|tile|nest|clif|blocks",
            ],
        );
        assert!(stdout(&o).is_empty(), "{}", stdout(&o));
    }
    let o = attnc(&["emit", "examples/causal.attn", "--target", "ptx"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains(".entry"), "{}", stdout(&o));
}

/// `attnc emit SPEC --target ptx ARGS...`, which must succeed: its stdout.
fn emit_ptx(spec: &str, args: &[&str]) -> String {
    let o = attnc(&[&["emit", spec, "--target", "ptx"][..], args].concat());
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    stdout(&o)
}

/// On the PTX target `--block auto` (the default) is the schedule
/// `attnc run --backend cuda` runs (`ptx::schedule`): 64x64 for f16/bf16 up
/// to D = 128, 64x32 for f32, with or without a mask.
#[test]
fn emit_ptx_block_auto_is_the_cuda_schedule() {
    let ptx = |args: &[&str]| emit_ptx("examples/dense.attn", args);
    let f16 = ptx(&["--dtype", "f16"]);
    assert!(f16.contains("schedule: bq=64 bkv=64 D=64"), "{f16}");
    assert_eq!(f16, ptx(&["--dtype", "f16", "--block", "64x64"]));
    let f32 = ptx(&["--dtype", "f32"]);
    assert!(f32.contains("schedule: bq=64 bkv=32 D=64"), "{f32}");
    assert_eq!(f32, ptx(&["--dtype", "f32", "--block", "auto"]));
}

/// `emit --target ptx --dtype` defaults to f32, as `run --dtype` does; f16
/// and bf16 are asked for explicitly.
#[test]
fn emit_ptx_dtype_defaults_to_f32_like_run() {
    let ptx = |args: &[&str]| emit_ptx("examples/causal.attn", args);
    let default = ptx(&[]);
    assert!(default.contains("f32 inputs, FMA products"), "{default}");
    assert_eq!(default, ptx(&["--dtype", "f32"]));
    assert!(ptx(&["--dtype", "f16"]).contains("f16 inputs, mma.sync"));
    assert!(ptx(&["--dtype", "bf16"]).contains("bf16 inputs, mma.sync"));
}

/// `--dtype bf16|f16` and `--kv-dtype` on the CPU backends: float32 files
/// are rounded or quantized on load (with a note), files already in the
/// type (uint16 bf16 bits, float16, int8 or uint8 fp8 bits with their
/// scales) are taken as they are and give the same outputs bit for bit, and
/// `--check` against the reference on the same values passes on every CPU
/// backend. Every mismatch of file and type is a clear error that leaves
/// no output.
#[test]
fn run_reads_half_precision_and_quantized_inputs() {
    use attnc::{ElemType, KvArray};
    let dir = TempDir::new();
    let (b, h, hkv, n, d) = (1usize, 4usize, 2usize, 37usize, 16usize);
    let val = |i: usize| ((i * 37 % 101) as f32) / 50.0 - 1.0;
    let qa = Array4::from_shape_fn((b, h, n, d), |(x, y, z, w)| {
        val(x * 1000 + y * 100 + z * 10 + w)
    });
    let ka = Array4::from_shape_fn((b, hkv, n, d), |(x, y, z, w)| {
        val(7 + x * 999 + y * 99 + z * 9 + w)
    });
    let va = ka.mapv(|x| x * 0.5 + 0.25);
    for (name, a) in [("q", &qa), ("k", &ka), ("v", &va)] {
        write_npy(&dir.path(&format!("{name}.npy")), a);
    }
    // Raw files of a type ndarray-npy cannot write: float16.
    let write_raw = |name: &str, descr: &str, a: &Array4<f32>, bytes: &dyn Fn(f32) -> Vec<u8>| {
        let sh = a.shape();
        let header = format!(
            "{{'descr': '{descr}', 'fortran_order': False, 'shape': ({}, {}, {}, {}), }}",
            sh[0], sh[1], sh[2], sh[3]
        );
        let data: Vec<u8> = a.iter().flat_map(|&x| bytes(x)).collect();
        std::fs::write(dir.path(name), npy::v1_file_bytes(&header, &data)).unwrap();
    };
    for (name, a) in [("q", &qa), ("k", &ka), ("v", &va)] {
        write_raw(&format!("{name}_f16.npy"), "<f2", a, &|x| {
            half::f16::from_f32(x).to_le_bytes().to_vec()
        });
        write_npy(
            &dir.path(&format!("{name}_bf16.npy")),
            &a.mapv(|x| half::bf16::from_f32(x).to_bits()),
        );
    }
    for (elem, tag) in [(ElemType::Int8, "int8"), (ElemType::Fp8, "fp8")] {
        for (name, a) in [("k", &ka), ("v", &va)] {
            match KvArray::quantize(a.view(), elem) {
                KvArray::Int8 { data, scales } => {
                    write_npy(&dir.path(&format!("{name}_{tag}.npy")), &data);
                    write_npy(&dir.path(&format!("{name}_{tag}_scales.npy")), &scales);
                }
                KvArray::Fp8 { data, scales } => {
                    write_npy(&dir.path(&format!("{name}_{tag}.npy")), &data);
                    write_npy(&dir.path(&format!("{name}_{tag}_scales.npy")), &scales);
                }
                _ => unreachable!(),
            }
        }
    }
    let spec = "examples/sliding_window.attn";
    let run = |files: [&str; 3], extra: &[&str], out: &str| {
        let (q, k, v, o) = (
            dir.str(files[0]),
            dir.str(files[1]),
            dir.str(files[2]),
            dir.str(out),
        );
        attnc(
            &[
                &["run", spec, "--q", &q, "--k", &k, "--v", &v, "--out", &o],
                extra,
            ]
            .concat(),
        )
    };
    let read = |p: &str| ArrayD::<f32>::read_npy(File::open(dir.path(p)).unwrap()).unwrap();
    let f32_files = ["q.npy", "k.npy", "v.npy"];
    // (--dtype, --kv-dtype, files already in the type, their extra flags)
    type Case<'a> = (&'a str, Option<&'a str>, [&'a str; 3], Vec<String>);
    let cases: [Case; 4] = [
        (
            "bf16",
            None,
            ["q_bf16.npy", "k_bf16.npy", "v_bf16.npy"],
            vec![],
        ),
        ("f16", None, ["q_f16.npy", "k_f16.npy", "v_f16.npy"], vec![]),
        (
            "f32",
            Some("int8"),
            ["q.npy", "k_int8.npy", "v_int8.npy"],
            vec![
                "--k-scales".into(),
                dir.str("k_int8_scales.npy"),
                "--v-scales".into(),
                dir.str("v_int8_scales.npy"),
            ],
        ),
        (
            "f16",
            Some("fp8"),
            ["q_f16.npy", "k_fp8.npy", "v_fp8.npy"],
            vec![
                "--k-scales".into(),
                dir.str("k_fp8_scales.npy"),
                "--v-scales".into(),
                dir.str("v_fp8_scales.npy"),
            ],
        ),
    ];
    let pairs = attnc::driver::default_bf16_pairs();
    for (dtype, kv_dtype, stored, extra) in &cases {
        let mut types = vec!["--dtype", dtype];
        if let Some(t) = kv_dtype {
            types.extend(["--kv-dtype", t]);
        }
        let what = format!("--dtype {dtype} --kv-dtype {kv_dtype:?}");
        for backend in ["jit", "interp", "reference"] {
            let o = run(
                f32_files,
                &[&types[..], &["--backend", backend, "--check"]].concat(),
                "rounded.npy",
            );
            assert!(o.status.success(), "{what} {backend}: {}", stderr(&o));
            assert!(stdout(&o).contains(": ok"), "{}", stdout(&o));
            // bf16 q, k and v on a tiled backend of a CPU with a bf16 dot
            // product: the default tolerance allows for the bf16
            // probabilities of P·V, 1e-4 + 2^-9 max|v| (v in [-1, 1) here);
            // elsewhere bf16 is widened to f32 as it is packed and P is not
            // rounded. The reference itself is exact.
            let tol: f64 = stdout(&o)
                .split("(tolerance ")
                .nth(1)
                .and_then(|t| t.split(')').next())
                .and_then(|t| t.parse().ok())
                .unwrap_or_else(|| panic!("no tolerance in {}", stdout(&o)));
            if (*dtype, *kv_dtype) == ("bf16", None) && backend != "reference" && pairs {
                assert!(tol > 1e-4 && tol <= 1e-4 + 2f64.powi(-9), "{tol}");
            } else {
                assert_eq!(tol, 1e-4);
            }
            let err = stderr(&o);
            let kv_to = kv_dtype.unwrap_or(dtype);
            if *dtype != "f32" {
                assert!(
                    err.contains(&format!("q.npy is float32; rounded to {dtype}")),
                    "{err}"
                );
            }
            let quantized = matches!(kv_to, "int8" | "fp8");
            let note = if quantized {
                format!("k.npy is float32; quantized to {kv_to} with a scale per (token, KV head)")
            } else {
                format!("k.npy is float32; rounded to {kv_to}")
            };
            assert!(err.contains(&note), "{err}");
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            let o = run(
                *stored,
                &[&types[..], &["--backend", backend], &extra[..]].concat(),
                "stored.npy",
            );
            assert!(
                o.status.success(),
                "{what} {backend} stored: {}",
                stderr(&o)
            );
            assert!(!stderr(&o).contains("note:"), "{}", stderr(&o));
            assert_eq!(read("rounded.npy"), read("stored.npy"), "{what} {backend}");
        }
    }
    // Bad combinations: each an error, no output.
    let bad: Vec<(Vec<String>, [&str; 3], &str)> = vec![
        (vec![], ["q_bf16.npy", "k.npy", "v.npy"], "numpy has no bf16: uint16 files are bf16 bit patterns, read with `--dtype bf16`"),
        (vec!["--dtype".into(), "bf16".into()], ["q_f16.npy", "k.npy", "v.npy"], "float16 data goes with `--dtype f16`"),
        (vec!["--kv-dtype".into(), "int8".into()], ["q.npy", "k_int8.npy", "v_int8.npy"], "quantized int8 data needs a float32 scale per (token, KV head): pass `--k-scales FILE.npy`"),
        (vec!["--kv-dtype".into(), "fp8".into()], ["q.npy", "k_int8.npy", "v_int8.npy"], "the file holds int8 data; int8 data goes with `--kv-dtype int8`"),
        (vec!["--kv-dtype".into(), "int8".into(), "--k-scales".into(), dir.str("k_int8_scales.npy"), "--v-scales".into(), dir.str("v_int8_scales.npy")], ["q.npy", "k.npy", "v.npy"], "which attnc quantizes itself (with scales of its own); scales go with int8 or uint8 (fp8) files: drop `--k-scales`"),
        (vec!["--kv-dtype".into(), "int8".into(), "--k-scales".into(), dir.str("v_int8_scales.npy"), "--v-scales".into(), dir.str("q.npy")], ["q.npy", "k_int8.npy", "v_int8.npy"], "q.npy` has shape [1, 4, 37, 16]"),
        (vec![], ["k_int8.npy", "k.npy", "v.npy"], "q is float32, bf16 or f16 (int8 and fp8 are types of the K/V cache, `--kv-dtype`)"),
        (vec!["--dtype".into(), "fp8".into()], f32_files, "`--dtype fp8`: q, k and v are f32, bf16 or f16; fp8 is a type of the K/V cache: `--kv-dtype fp8`"),
        (vec!["--dtype".into(), "f64".into()], f32_files, "`--dtype f64`: unknown element type `f64` (expected f32, bf16 or f16)"),
        (vec!["--kv-dtype".into(), "f64".into()], f32_files, "`--kv-dtype f64`: unknown element type `f64` (expected f32, bf16, f16, int8 or fp8)"),
    ];
    for (flags, files, needle) in bad {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let o = run(files, &flags, "bad.npy");
        assert_fails(&o, &[needle]);
        assert!(
            !dir.path("bad.npy").exists(),
            "no output is left on failure"
        );
    }
    // Scales of the wrong shape are the binding's error.
    write_npy(
        &dir.path("short_scales.npy"),
        &ndarray::Array3::<f32>::ones((1, 2, 36)),
    );
    let o = run(
        ["q.npy", "k_int8.npy", "v_int8.npy"],
        &[
            "--kv-dtype",
            "int8",
            "--k-scales",
            &dir.str("short_scales.npy"),
            "--v-scales",
            &dir.str("v_int8_scales.npy"),
        ],
        "bad.npy",
    );
    assert_fails(
        &o,
        &["the k scales have shape [1, 2, 36], expected [1, 2, 37]"],
    );
    // A NaN in a float file quantized on load: int8 has no NaN, and the
    // row's scale is NaN (not a silent 0), refused at a key the sequence
    // uses, in both quantized types; f32 keeps it (and computes NaN).
    let mut k_nan = ka.clone();
    k_nan[[0, 1, 5, 3]] = f32::NAN;
    write_npy(&dir.path("k_nan.npy"), &k_nan);
    for kv_dtype in ["int8", "fp8"] {
        let o = run(
            ["q.npy", "k_nan.npy", "v.npy"],
            &["--kv-dtype", kv_dtype],
            "bad.npy",
        );
        assert_fails(
            &o,
            &[
                "the k scale of key 5 of sequence 0, KV head 1 is NaN, which is not finite",
                "a scale quantized from float data",
            ],
        );
        assert!(
            !dir.path("bad.npy").exists(),
            "no output is left on failure"
        );
    }
}

/// `emit --target ptx --kv-dtype int8|fp8` prints the in-place kernel that
/// dequantizes K/V in its tile loads (with or without `--page-size`: the page
/// size is a launch parameter); `--kv-dtype` needs `--target ptx` (then a
/// quantized type) or `--q-len`.
/// `--page-size 0` is a usage error for `emit` (PTX or a nest) and `bench`
/// alike: a page holds at least one slot.
#[test]
fn a_page_size_of_zero_is_a_usage_error() {
    for args in [
        &[
            "emit",
            "examples/causal.attn",
            "--target",
            "ptx",
            "--page-size",
            "0",
        ][..],
        &[
            "emit",
            "examples/causal.attn",
            "--stage",
            "nest",
            "--q-len",
            "1",
            "--page-size",
            "0",
        ],
        &[
            "bench",
            "examples/causal.attn",
            "--q-len",
            "1",
            "--kv-len",
            "64",
            "--page-size",
            "0",
        ],
    ] {
        let o = attnc(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(
                "invalid value '0' for '--page-size <P>': a page holds at least one slot"
            ),
            "{}",
            stderr(&o)
        );
    }
}

#[test]
fn emit_ptx_of_a_quantized_pool() {
    for (elem, dtype, paged) in [
        ("int8", "f16", true),
        ("fp8", "bf16", true),
        ("int8", "f32", false),
    ] {
        let mut args = vec!["--kv-dtype", elem, "--dtype", dtype];
        if paged {
            args.extend(["--page-size", "16"]);
        }
        let ptx = emit_ptx("examples/causal.attn", &args);
        assert!(
            ptx.contains(&format!(
                "// K/V stored as {elem} with a float32 scale per row (k_scales_ptr, v_scales_ptr), dequantized to {dtype} in the tile loads"
            )),
            "{ptx}"
        );
        assert!(
            ptx.contains("_param_k_scales_ptr") || ptx.contains("k_scales_ptr"),
            "{ptx}"
        );
    }
    let o = attnc(&["emit", "examples/causal.attn", "--kv-dtype", "int8"]);
    assert_fails(&o, &["`--kv-dtype` describes a call: pass `--q-len N` too"]);
    let o = attnc(&[
        "emit",
        "examples/causal.attn",
        "--target",
        "ptx",
        "--page-size",
        "16",
        "--kv-dtype",
        "bf16",
    ]);
    assert_fails(&o, &["`--kv-dtype bf16` with --target ptx: the kernel takes K/V in its --dtype, or int8/fp8 with scales"]);
}

/// `emit --target ptx --page-size P` prints the kernel that reads K and V in
/// place through a page table; without --target ptx, --page-size needs shapes.
#[test]
fn emit_ptx_of_a_paged_pool() {
    let paged = emit_ptx("examples/causal.attn", &["--page-size", "16"]);
    for param in [
        "p_kv_lens_ptr",
        "p_page_table_ptr",
        "p_page_size",
        "p_head_stride",
    ] {
        assert!(paged.contains(param), "{param} missing:\n{paged}");
    }
    assert!(!emit_ptx("examples/causal.attn", &[]).contains("p_page_table_ptr"));
    let o = attnc(&["emit", "examples/causal.attn", "--page-size", "16"]);
    assert_fails(
        &o,
        &[
            "`--page-size` describes a call: pass `--q-len N` too",
            "--q-len",
            "--target ptx",
        ],
    );
}

/// The reference backend and `bench` draw a progress bar on stderr when it is
/// a terminal (here a pseudo-terminal made by `script`, from util-linux), and
/// never into a pipe or a log, nor with `--quiet`.
#[test]
fn progress_bars_only_on_a_terminal_and_not_with_quiet() {
    let bin = env!("CARGO_BIN_EXE_attnc");
    let spec = root().join("examples/causal.attn");
    let dir = TempDir::new();
    let out = dir.str("out.npy");
    let run = format!(
        "{bin} run {} --random --q-len 300 --heads 2 --backend reference --out {out}",
        spec.display()
    );
    let bench = format!(
        "{bin} bench {} --q-len 64 --heads 1 --runs 3",
        spec.display()
    );
    let blocks = format!("{bin} blocks {} --q-len 4096", spec.display());
    let jit = format!(
        "{bin} run {} --random --q-len 4096 --heads 1 --out {out}",
        spec.display()
    );
    // In a pipe: no bar, with or without --quiet.
    for args in [&run, &bench, &blocks, &jit] {
        let parts: Vec<&str> = args.split(' ').skip(1).collect();
        let o = attnc(&parts);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let err = stderr(&o);
        assert!(
            !err.contains(" rows (") && !err.contains(" runs ("),
            "{err}"
        );
    }
    // On a terminal: a bar, unless --quiet (or -q).
    let on_terminal = |cmd: &str| {
        let o = Command::new("script")
            .args(["-qec", cmd, "/dev/null"])
            .output()
            .expect("`script` (util-linux) runs a command on a pseudo-terminal");
        assert_eq!(o.status.code(), Some(0), "{cmd}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let shown = on_terminal(&run);
    assert!(
        shown.contains("reference [") && shown.contains(" rows ("),
        "{shown}"
    );
    let shown = on_terminal(&bench);
    assert!(
        shown.contains("bench jit") || shown.contains("bench native"),
        "{shown}"
    );
    assert!(shown.contains(" runs ("), "{shown}");
    for cmd in [&blocks, &jit] {
        let shown = on_terminal(cmd);
        assert!(
            shown.contains("block map [") && shown.contains(" query tiles ("),
            "{shown}"
        );
    }
    for cmd in [
        format!("{run} --quiet"),
        format!("{bench} -q"),
        format!("{blocks} --quiet"),
        format!("{jit} -q"),
    ] {
        let shown = on_terminal(&cmd);
        assert!(
            !shown.contains(" rows (")
                && !shown.contains(" runs (")
                && !shown.contains(" query tiles ("),
            "{shown}"
        );
    }
}

/// When the block-map analysis falls back to evaluating elements one by one,
/// `attnc check` (probing a mask that reads no buffer) and `attnc blocks` say
/// so, naming the sub-expression that defeated it, with its place; a mask it
/// decides per tile gets no note.
#[test]
fn block_map_fallback_is_named() {
    let dir = TempDir::new();
    let spec = dir.path("strided.attn");
    std::fs::write(
        &spec,
        "// every third key, causal\nattention strided {\n    mask = causal && (q - kv) % 3 == 0\n}\n",
    )
    .unwrap();
    let spec = spec.to_str().unwrap();
    let expr = "`(q - kv) % 3 == 0` (";
    let place = "strided.attn:3:22)";
    let o = attnc(&["check", spec]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("ok (1 attention block: strided)"), "{text}");
    assert!(
        text.contains("strided: note: ") && text.contains("evaluated one by one"),
        "{text}"
    );
    assert!(text.contains(expr) && text.contains(place), "{text}");
    assert!(text.contains("probed at Q = KV = 2048"), "{text}");
    let o = attnc(&["blocks", spec, "--q-len", "512"]);
    assert!(
        stdout(&o).contains(expr) && stdout(&o).contains(place),
        "{}",
        stdout(&o)
    );
    let o = attnc(&["blocks", spec, "--q-len", "512", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(v["fallback_elements"].as_u64().unwrap() > 0, "{v}");
    assert!(v["fallback_note"].as_str().unwrap().contains(expr), "{v}");
    // Decided per tile: no note.
    for example in ["examples/causal.attn", "examples/sliding_window.attn"] {
        let o = attnc(&["check", example]);
        assert!(!stdout(&o).contains("note:"), "{}", stdout(&o));
        let o = attnc(&["blocks", example, "--q-len", "2048", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert_eq!(v["fallback_elements"], 0, "{v}");
        assert!(v["fallback_note"].is_null(), "{v}");
    }
}

/// `attnc run` on a paged pool (`--k-pages --v-pages --page-table
/// --kv-lens`) writes what the ragged dense call (`--k --v --kv-lens`) does,
/// and `--check` passes on both; a table entry outside the pool, a length
/// below Q and `--kv-lens` with `--q-offset` are clear errors that leave no
/// output.
#[test]
fn run_on_a_paged_pool_and_a_ragged_batch() {
    let dir = TempDir::new();
    let (b, h, hkv, q, d, ps) = (2usize, 4usize, 2usize, 1usize, 8usize, 4usize);
    let lens = [7i32, 10];
    let kv_max = 10;
    let val = |i: usize| ((i * 37 % 101) as f32) / 50.0 - 1.0;
    let qa = Array4::from_shape_fn((b, h, q, d), |(x, y, z, w)| {
        val(x * 1000 + y * 100 + z * 10 + w)
    });
    let ka = Array4::from_shape_fn((b, hkv, kv_max, d), |(x, y, z, w)| {
        val(7 + x * 999 + y * 99 + z * 9 + w)
    });
    let va = ka.mapv(|x| x * 0.5);
    // Pages: sequence 0 takes pages 3, 0; sequence 1 takes 1, 4, 2; page 5 is spare.
    let table = ndarray::arr2(&[[3i32, 0, -1], [1, 4, 2]]);
    let mut kp = Array4::<f32>::from_elem((6, ps, hkv, d), f32::NAN);
    let mut vp = kp.clone();
    for (bi, &n) in lens.iter().enumerate() {
        for j in 0..n as usize {
            let page = table[[bi, j / ps]] as usize;
            for kh in 0..hkv {
                for t in 0..d {
                    kp[[page, j % ps, kh, t]] = ka[[bi, kh, j, t]];
                    vp[[page, j % ps, kh, t]] = va[[bi, kh, j, t]];
                }
            }
        }
    }
    write_npy(&dir.path("q.npy"), &qa);
    write_npy(&dir.path("k.npy"), &ka);
    write_npy(&dir.path("v.npy"), &va);
    write_npy(&dir.path("kp.npy"), &kp);
    write_npy(&dir.path("vp.npy"), &vp);
    write_npy(&dir.path("table.npy"), &table);
    write_npy(&dir.path("lens.npy"), &ndarray::arr1(&lens));
    let spec = root().join("examples/sliding_window.attn");
    let spec = spec.to_str().unwrap();
    let (qs, ks, vs, kps, vps, ts, ls) = (
        dir.str("q.npy"),
        dir.str("k.npy"),
        dir.str("v.npy"),
        dir.str("kp.npy"),
        dir.str("vp.npy"),
        dir.str("table.npy"),
        dir.str("lens.npy"),
    );
    let (paged_out, dense_out) = (dir.str("paged.npy"), dir.str("dense.npy"));
    // `attnc run` on the pool with a table, lengths and more flags.
    let run_paged = |table: &str, lens: &str, extra: &[&str]| {
        let args = [
            "run",
            spec,
            "--param",
            "window=5",
            "--q",
            &qs,
            "--k-pages",
            &kps,
            "--v-pages",
            &vps,
            "--page-table",
            table,
            "--kv-lens",
            lens,
        ];
        attnc(&[&args[..], extra].concat())
    };
    let o = run_paged(&ts, &ls, &["--check", "--out", &paged_out]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains(": ok"), "{}", stdout(&o));
    let dense = [
        "run",
        spec,
        "--param",
        "window=5",
        "--q",
        &qs,
        "--k",
        &ks,
        "--v",
        &vs,
        "--kv-lens",
        &ls,
        "--check",
        "--out",
        &dense_out,
    ];
    let o = attnc(&dense);
    assert!(o.status.success(), "{}", stderr(&o));
    let read = |p: &str| ArrayD::<f32>::read_npy(File::open(p).unwrap()).unwrap();
    let (a, bb) = (read(&paged_out), read(&dense_out));
    assert!(
        a.iter().all(|x| x.is_finite()),
        "stale NaN reached the output"
    );
    assert!(max_abs_diff(&a, &bb) <= 1e-6);

    let bad_out = dir.str("bad.npy");
    write_npy(
        &dir.path("bad_table.npy"),
        &ndarray::arr2(&[[3i32, 9, -1], [1, 4, 2]]),
    );
    let o = run_paged(&dir.str("bad_table.npy"), &ls, &["--out", &bad_out]);
    assert_fails(&o, &["page_table[0, 1] is 9, outside the pool of 6 pages"]);
    // An int64 table may hold anything past a sequence's last page, values
    // outside int32 included; a used entry outside int32 names the pool.
    let far = 1i64 << 40;
    write_npy(
        &dir.path("table64.npy"),
        &ndarray::arr2(&[[3i64, 0, far], [1, 4, 2]]),
    );
    let wide_out = dir.str("wide.npy");
    let o = run_paged(&dir.str("table64.npy"), &ls, &["--out", &wide_out]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        read(&wide_out),
        a,
        "unused entries outside int32 are never read"
    );
    write_npy(
        &dir.path("table64_used.npy"),
        &ndarray::arr2(&[[3i64, 0, -1], [1, far, 2]]),
    );
    let o = run_paged(&dir.str("table64_used.npy"), &ls, &["--out", &bad_out]);
    assert_fails(
        &o,
        &["page_table[1, 1] is 1099511627776, outside the pool of 6 pages (sequence 1 has 10 keys)"],
    );
    // A pool of pages of 0 slots is bind's error, whatever the table holds.
    write_npy(&dir.path("kp0.npy"), &Array4::<f32>::zeros((6, 0, hkv, d)));
    let kp0 = dir.str("kp0.npy");
    let o = attnc(&[
        "run",
        spec,
        "--q",
        &qs,
        "--k-pages",
        &kp0,
        "--v-pages",
        &kp0,
        "--page-table",
        &dir.str("table64_used.npy"),
        "--kv-lens",
        &ls,
        "--out",
        &bad_out,
    ]);
    assert_fails(
        &o,
        &["the K/V pool has shape [6, 0, 2, 8]: a page size of 0"],
    );
    write_npy(&dir.path("lens64.npy"), &ndarray::arr1(&[7i64, 1 << 33]));
    let o = run_paged(&ts, &dir.str("lens64.npy"), &["--out", &bad_out]);
    assert_fails(&o, &["kv_lens[1] is 8589934592, outside int32"]);
    // A table of another integer type names the flag, not a spec buffer.
    write_npy(&dir.path("table_u32.npy"), &table.mapv(|x| x as u32));
    let o = run_paged(&dir.str("table_u32.npy"), &ls, &["--out", &bad_out]);
    assert_fails(
        &o,
        &[
            "cannot read `page_table` (--page-table) from",
            "it takes int32 or int64 data: the file holds uint32 data",
        ],
    );
    write_npy(&dir.path("short.npy"), &ndarray::arr1(&[0i32, 10]));
    let sl = dir.str("short.npy");
    let o = attnc(&[
        "run",
        spec,
        "--q",
        &qs,
        "--k",
        &ks,
        "--v",
        &vs,
        "--kv-lens",
        &sl,
        "--out",
        &bad_out,
    ]);
    assert_fails(&o, &["kv_lens[0] is 0, shorter than the Q = 1 queries"]);
    let o = attnc(&[
        "run",
        spec,
        "--q",
        &qs,
        "--k",
        &ks,
        "--v",
        &vs,
        "--kv-lens",
        &ls,
        "--q-offset",
        "3",
        "--out",
        &bad_out,
    ]);
    assert_eq!(o.status.code(), Some(2), "a usage error");
    assert!(stderr(&o).contains("'--kv-lens <FILE.npy>' cannot be used with '--q-offset <N>'"));
    // K/V named two ways at once, or a pool without its table: usage errors
    // (with --kv-lens, which clap's `requires` does not hold together).
    let base = ["run", spec, "--q", &qs, "--kv-lens", &ls, "--out", &bad_out];
    for (flags, want) in [
        (
            vec!["--k-pages", &kps, "--v", &vs, "--page-table", &ts],
            "--v with --k-pages --page-table: K/V come either as --k/--v or as a paged pool",
        ),
        (
            vec!["--k", &ks, "--v-pages", &vps, "--page-table", &ts],
            "--k with --v-pages --page-table",
        ),
        (
            vec!["--k", &ks, "--v", &vs, "--page-table", &ts],
            "--k --v with --page-table",
        ),
    ] {
        let o = attnc(&[&base[..], &flags[..]].concat());
        assert_fails(&o, &["attnc::usage", want]);
    }
    for (flags, want) in [
        (
            vec!["--k-pages", &kps, "--v-pages", &vps],
            "--page-table <FILE.npy>",
        ),
        (vec!["--k", &ks], "--v <FILE.npy>"),
    ] {
        let o = attnc(&[&base[..], &flags[..]].concat());
        assert_eq!(o.status.code(), Some(2), "a usage error");
        let err = stderr(&o);
        assert!(err.contains("required arguments were not provided") && err.contains(want));
    }
    assert!(
        !dir.path("bad.npy").exists(),
        "no output is left on failure"
    );
}

/// `attnc blocks --kv-lens` draws the map of one sequence of a ragged batch:
/// a sliding-window decode visits only the tiles of its window, wherever the
/// sequence ends; a bad list is a usage error.
#[test]
fn blocks_of_a_ragged_batch() {
    let spec = root().join("examples/sliding_window.attn");
    let spec = spec.to_str().unwrap();
    let o = attnc(&[
        "blocks",
        spec,
        "--param",
        "window=100",
        "--q-len",
        "4",
        "--kv-lens",
        "100,300,37",
        "--block",
        "16x64",
        "--at",
        "1,0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("map of sequence b = 1 (300 keys, queries at 296..300)"),
        "{text}"
    );
    // Keys 196..299 are in the window: tiles 3 and 4 of 0..5 (64 keys each).
    assert!(text.contains("   0 ...++"), "{text}");
    let o = attnc(&["blocks", spec, "--q-len", "4", "--kv-lens", "100,x"]);
    assert_fails(&o, &["`x` is not a length"]);
    let o = attnc(&["blocks", spec, "--q-len", "4", "--kv-lens", "100,2"]);
    assert_fails(&o, &["kv_lens[1] is 2, shorter than the Q = 4 queries"]);
}

/// `attnc emit --stage nest` with shapes prints the nest a call of those
/// shapes takes: a long MQA decode groups the heads, reads in place and
/// splits its key walk; a prefill packs.
#[test]
fn emit_prints_the_nest_chosen_for_shapes() {
    let spec = root().join("examples/causal.attn");
    let spec = spec.to_str().unwrap();
    let o = attnc(&[
        "emit",
        spec,
        "--stage",
        "nest",
        "--q-len",
        "1",
        "--kv-len",
        "131072",
        "--heads",
        "8",
        "--kv-heads",
        "1",
        "--dim",
        "128",
        "--page-size",
        "16",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("in pages of 16: rows gqa_group, kv in_place; each key walk split into"),
        "{text}"
    );
    assert!(text.contains("grid kv_heads"), "{text}");
    let o = attnc(&[
        "emit", spec, "--stage", "nest", "--q-len", "2048", "--heads", "8",
    ]);
    assert!(
        stdout(&o).contains("rows one_head, kv packed"),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("grid query_tiles"), "{}", stdout(&o));
    // bf16 q, k and v: the prefill multiplies bf16 pairs where this CPU has
    // a bf16 dot product, else widens them to f32 as it packs them, and says
    // so.
    let pairs = attnc::driver::default_bf16_pairs();
    let o = attnc(&[
        "emit", spec, "--stage", "nest", "--q-len", "2048", "--heads", "8", "--dtype", "bf16",
    ]);
    let text = stdout(&o);
    if pairs {
        assert!(text.contains("rows one_head, kv packed_bf16"), "{text}");
        assert!(text.contains("kv packed_bf16"), "{text}");
    } else {
        assert!(
            text.contains(
                "rows one_head, kv packed (bf16 widened to f32 as it is packed: \
                 this CPU has no bf16 dot product faster than f32 FMAs)"
            ),
            "{text}"
        );
        assert!(text.contains("kv packed: "), "{text}");
    }
    let o = attnc(&[
        "emit", spec, "--stage", "tile", "--q-len", "2048", "--heads", "8", "--dtype", "bf16",
    ]);
    let text = stdout(&o);
    assert_eq!(
        text.contains("acc += pv bf16(p), v[b, h / (H / HKV), kt] (packed bf16 pairs)"),
        pairs,
        "{text}"
    );
    // GQA decode on a paged pool: every head of a sequence in one tile.
    let o = attnc(&[
        "emit",
        spec,
        "--stage",
        "nest",
        "--q-len",
        "1",
        "--kv-len",
        "16384",
        "--batch",
        "4",
        "--heads",
        "32",
        "--kv-heads",
        "8",
        "--page-size",
        "16",
    ]);
    let text = stdout(&o);
    assert!(
        text.contains("in pages of 16: rows all_heads, kv in_place; each key walk split into"),
        "{text}"
    );
    assert!(text.contains("grid sequences"), "{text}");
    let o = attnc(&[
        "emit",
        spec,
        "--stage",
        "nest",
        "--q-len",
        "1",
        "--heads",
        "6",
        "--kv-heads",
        "4",
    ]);
    assert_fails(&o, &["H a multiple of HKV"]);
}

#[test]
fn random_buffers_are_sized_for_the_bound_shapes() {
    // Queries past the keys: `KV` is q_offset + Q = 7, not --kv-len 1.
    let dir = TempDir::new();
    let src = "attention a {\n buffer t[KV]: int\n mask = t[kv] >= 0\n}\n";
    let spec = write_spec(&dir, "kv.attn", src);
    let o = run_random_on(
        &spec,
        &[
            "--q-len", "7", "--kv-len", "1", "--heads", "1", "--dim", "4", "-q", "--buffer",
            "t=iota", "--check",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn an_override_can_repair_a_default_that_empties_a_reduction() {
    // With n = 0, `max` over 0..n has no value; the override is checked
    // from the start, so n = 3 runs.
    let dir = TempDir::new();
    let src = "attention a {\n param n: int = 0\n score = score + float(max(i in 0..n: i))\n}\n";
    let spec = write_spec(&dir, "ov.attn", src);
    let run = |extra: &[&str]| {
        let mut args = vec![
            "--q-len", "4", "--heads", "1", "--dim", "4", "-q", "--check",
        ];
        args.extend_from_slice(extra);
        run_random_on(&spec, &args)
    };
    assert_fails(&run(&[]), &["`max` over the empty range 0..0"]);
    let o = run(&["--param", "n=3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_fails(&run(&["--param", "n=x"]), &["param `n` is declared int"]);
    assert_fails(&run(&["--param", "m=3"]), &["has no param `m`"]);
}

/// `attnc emit` refuses a flag the stage or target it prints would ignore,
/// naming where the flag applies.
#[test]
fn emit_refuses_flags_its_stage_ignores() {
    let cases: [(&[&str], &[&str]); 11] = [
        (
            &["--target", "ptx", "--heads", "4"],
            &["`--heads` has no effect on `--target ptx`"],
        ),
        (
            &["--stage", "nest", "--batch", "2"],
            &["`--batch` describes a call: pass `--q-len N` too"],
        ),
        (
            &["--stage", "clif", "--q-len", "4096"],
            &[
                "`--q-len` has no effect on `--stage clif`",
                "--stage blocks",
            ],
        ),
        (
            &["--stage", "ast", "--q-len", "4", "--page-size", "16"],
            &["`--page-size` has no effect on `--stage ast`"],
        ),
        (
            &["--stage", "checked", "--dim", "128"],
            &["`--dim` has no effect on `--stage checked`", "--target ptx"],
        ),
        (
            &["--arch", "sm_90"],
            &[
                "`--arch` has no effect on `--stage tile`",
                "(it applies to --target ptx)",
            ],
        ),
        (
            &["--target", "ptx", "--q-len", "4", "--heads", "4"],
            &["`--q-len` has no effect on `--target ptx`"],
        ),
        (
            &["--stage", "nest", "--buffer", "doc=docs:4"],
            &[
                "`--buffer` has no effect on `--stage nest`",
                "--stage blocks",
            ],
        ),
        (
            &["--stage", "blocks", "--q-len", "64", "--kv-dtype", "int8"],
            &["`--kv-dtype` has no effect on `--stage blocks`"],
        ),
        (
            &["--stage", "tile", "--dtype", "bf16"],
            &["`--dtype` describes a call: pass `--q-len N` too"],
        ),
        (
            &["--stage", "clif", "--exp", "exp"],
            &["`--exp` has no effect on `--stage clif`"],
        ),
    ];
    for (flags, want) in cases {
        let mut args = vec!["emit", "examples/causal.attn"];
        args.extend_from_slice(flags);
        assert_fails(&attnc(&args), want);
    }
}

/// `attnc emit --stage blocks` draws the map `attnc blocks` draws for the
/// same heads and batch, and the loop nest refuses shapes no call has.
#[test]
fn emit_blocks_takes_the_heads_and_the_nest_takes_callable_shapes() {
    let dir = TempDir::new();
    std::fs::write(
        dir.path("perhead.attn"),
        "attention perhead { mask = causal && q - kv < 16 * (h + b + 1) }",
    )
    .unwrap();
    let spec = dir.str("perhead.attn");
    let shape = [
        "--q-len", "128", "--block", "16", "--heads", "4", "--batch", "2",
    ];
    let emitted = attnc(&[&["emit", spec.as_str(), "--stage", "blocks"], &shape[..]].concat());
    let drawn = attnc(&[&["blocks", spec.as_str()], &shape[..]].concat());
    assert_eq!(emitted.status.code(), Some(0), "{}", stderr(&emitted));
    assert!(stdout(&emitted).contains("counts summed over all 8 (b, h) pairs"));
    // The same text but for the build time.
    let strip = |o: &Output| {
        stdout(o)
            .lines()
            .filter(|l| !l.starts_with("built in"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(strip(&emitted), strip(&drawn));
    let nest = |extra: &[&str]| {
        attnc(&[&["emit", "examples/causal.attn", "--stage", "nest"], extra].concat())
    };
    assert_fails(
        &nest(&["--q-len", "8", "--kv-len", "4", "--page-size", "16"]),
        &["--kv-len 4 is shorter than --q-len 8: on a paged pool the queries are the last Q"],
    );
    assert_fails(
        &nest(&["--q-len", "3000000000", "--kv-len", "4000000000"]),
        &["`--q-len 3000000000` is past the limit of 2147483647 (2^31 - 1)"],
    );
    let o = nest(&[
        "--q-len",
        "1",
        "--kv-len",
        "8192",
        "--heads",
        "2",
        "--kv-heads",
        "1",
    ]);
    assert!(
        stdout(&o).contains("each key walk split into at most ")
            && stdout(&o).contains("a call splits the tiles its mask lets a walk visit"),
        "{}",
        stdout(&o)
    );
}

/// `attnc blocks` sizes buffer recipes by the call's KV (past the keys, the
/// query end), reports the drawn map of a ragged batch, and names the limit
/// of a length.
#[test]
fn blocks_recipes_ragged_json_and_length_limits() {
    let o = attnc(&[
        "blocks",
        "examples/packed_docs.attn",
        "--q-len",
        "4",
        "--kv-len",
        "100",
        "--q-offset",
        "98",
        "--buffer",
        "doc=docs:4",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = attnc(&[
        "blocks",
        "examples/causal.attn",
        "--q-len",
        "4",
        "--kv-lens",
        "40,300",
        "--block",
        "16",
        "--at",
        "0,0",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(r["kv_len"], 300, "{r}");
    assert_eq!(r["kv_lens"], serde_json::json!([40, 300]), "{r}");
    assert_eq!(r["at"], serde_json::json!([0, 0]), "{r}");
    assert_eq!(r["map_kv_len"], 40, "{r}");
    assert_eq!(r["map_q_offset"], 36, "{r}");
    assert_eq!(r["kv_tiles"], 3, "{r}");
    let o = attnc(&[
        "blocks",
        "examples/causal.attn",
        "--q-len",
        "1",
        "--kv-lens",
        "2147483648,5",
    ]);
    assert_fails(
        &o,
        &["`--kv-lens 2147483648,5`: 2147483648 is past the limit of 2147483647 (2^31 - 1)"],
    );
}

/// `attnc bench` refuses shapes, flags and measurements it cannot honour,
/// and sizes buffer recipes by the call's KV.
#[test]
fn bench_refuses_what_it_cannot_honour() {
    let bench = |extra: &[&str]| {
        attnc(
            &[
                &[
                    "bench",
                    "examples/causal.attn",
                    "--runs",
                    "1",
                    "--warmup",
                    "0",
                ],
                extra,
            ]
            .concat(),
        )
    };
    let cases: [(&[&str], &str); 7] = [
        (&["--q-len", "8", "--heads", "0"], "`--heads 0`: heads must be at least 1"),
        (
            &["--q-len", "8", "--kv-heads", "0"],
            "`--kv-heads 0`: kv-heads must be at least 1",
        ),
        (&["--q-len", "8", "--batch", "0"], "`--batch 0`: batch must be at least 1"),
        (
            &["--q-len", "8", "--kv-len", "4", "--page-size", "16"],
            "--kv-len 4 is shorter than --q-len 8: on a paged pool",
        ),
        (
            &["--q-len", "8", "--backend", "reference", "--block", "7x5"],
            "`--block` sets the tiles of the tiled CPU backends (jit, interp), and the reference backend takes none",
        ),
        (
            &["--q-len", "8", "--backend", "interp", "--gemm", "native"],
            "`--gemm` picks the jit backend's tile products, and this is the interp backend",
        ),
        (
            &["--q-len", "0", "--bandwidth"],
            "`--bandwidth` streams the call's K and V, and they hold no bytes",
        ),
    ];
    for (flags, want) in cases {
        assert_fails(&bench(flags), &[want]);
    }
    // A mask that hides every key: nothing to read, so no ratio.
    let dir = TempDir::new();
    std::fs::write(dir.path("none.attn"), "attention none { mask = kv < 0 }").unwrap();
    let spec = dir.str("none.attn");
    let o = attnc(&[
        "bench",
        spec.as_str(),
        "--q-len",
        "8",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--bandwidth",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("the call must read no K or V (the mask hides every key)")
            && stdout(&o).contains("K+V 0.0 KiB seen by the mask (of 32.0 KiB stored)"),
        "{}",
        stdout(&o)
    );
    // `doc[KV]` of a call whose queries end past the keys is sized by the
    // query end.
    let o = attnc(&[
        "bench",
        "examples/packed_docs.attn",
        "--q-len",
        "64",
        "--kv-len",
        "32",
        "--buffer",
        "doc=docs:4",
        "--runs",
        "1",
        "--warmup",
        "0",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}
