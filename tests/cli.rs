//! End-to-end tests of the `attnc` binary: `check` on every example and on a
//! bad spec, `run` on a FlexAttention fixture, every bad-input path of `run`
//! (each must exit 1 with a specific, helpful message on stderr, or 2 for a
//! command-line usage error caught by clap), and `--help` of every subcommand.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use attnc::npy;
use attnc::sema::Type;
use attnc::BufferData;
use ndarray::{Array, ArrayD, Dimension, Ix3, IxDyn};
use ndarray_npy::WriteNpyExt;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures/packed_docs").join(name)
}

fn attnc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_attnc"))
        .args(args)
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
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("attnc-cli-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn str(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
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
    let (spec, q, k, v, doc) = (
        root().join("examples/packed_docs.attn"),
        fixture("q.npy"),
        fixture("k.npy"),
        fixture("v.npy"),
        fixture("doc.npy"),
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
        stderr(&o).contains("packed_docs: wrote out [2, 4, 95, 16]"),
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
            "q.npy` (expected a float32 .npy): not an .npy file",
        ],
    );
    // A text file given as a buffer.
    let text = format!("doc={}", dir.str("q.npy"));
    let o = run_packed(&dir, &["--buffer", &text]);
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
fn run_with_float64_q() {
    let dir = TempDir::new();
    write_npy(
        &dir.path("q64.npy"),
        &ArrayD::<f64>::zeros(IxDyn(&[2, 4, 95, 16])),
    );
    let o = run_with_q("examples/causal.attn", &dir.path("q64.npy"), &dir);
    assert_fails(
        &o,
        &[
            "cannot read q from `",
            "(expected a float32 .npy): the file holds float64 data (descriptor `<f8`)",
        ],
    );
}

#[test]
fn run_with_a_buffer_of_the_wrong_dtype() {
    let dir = TempDir::new();
    write_npy(&dir.path("docf.npy"), &ArrayD::<f32>::zeros(IxDyn(&[95])));
    let doc = format!("doc={}", dir.str("docf.npy"));
    let o = run_packed(&dir, &["--buffer", &doc]);
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
    let doc = format!("doc={}", dir.str("doc94.npy"));
    let o = run_packed(&dir, &["--buffer", &doc]);
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
    let mut args = vec!["bench", spec, "--q-len", "64", "--heads", "1"];
    args.extend_from_slice(extra);
    args.push("--json");
    let o = attnc(&args);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    serde_json::from_str(&stdout(&o)).expect("one JSON object")
}

#[test]
fn bench_reports_the_fma_peak_beside_the_runs() {
    let r = bench_causal_json(&["--runs", "3", "--warmup", "0", "--gemm", "jit", "--peak"]);
    let peak = &r["fma_peak"];
    assert_eq!(peak["kind"], "jit-f32x4");
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
