//! No input makes the parser, the checker, param overrides or the reference
//! interpreter panic or overflow the stack.
//!
//! The property tests feed random token soup and mutated examples through
//! parse + check + rendering of the errors (the body of the `parse_check`
//! fuzz target in `fuzz/`, see `docs/testing.md`), and run the reference
//! interpreter on every mutant that checks. The deterministic tests cover
//! inputs random generation rarely reaches: deep nesting, long operator
//! chains, long `let` chains, huge literals and huge files.
//!
//! A panic anywhere fails the test; a stack overflow aborts the test binary,
//! which fails it too.

use std::sync::Arc;

use attnc::driver;
use attnc::sema::eval::Shapes;
use attnc::sema::Type;
use attnc::{BufferData, Inputs, SourceFile, SpecOptions};
use ndarray::{Array4, ArrayD, Dimension, IxDyn};
use proptest::prelude::*;
use proptest::sample::Index;

/// Parses and checks `text`, renders any error, and when it checks, loads
/// every attention block and runs it on small inputs. Returns whether the
/// text checked.
fn exercise(text: &str) -> bool {
    let file = Arc::new(SourceFile::new("input.attn", text));
    match driver::check(&file) {
        Err(e) => {
            let rendered = e.render();
            assert!(!rendered.is_empty());
            assert!(!e.to_string().is_empty());
            false
        }
        Ok(module) => {
            let _ = module.to_string();
            for spec in &module.specs {
                let options = SpecOptions {
                    entry: Some(spec.name.clone()),
                    params: vec![],
                };
                match attnc::load(SourceFile::new("input.attn", text), &options) {
                    Ok(program) => run_small(&program),
                    // Duplicate block names make `--entry` ambiguous only when
                    // the checker accepted them, which it does not.
                    Err(e) => panic!("a checked block failed to load: {}", e.render()),
                }
            }
            true
        }
    }
}

/// Runs the reference on tiny inputs with buffers of the declared shapes
/// filled with small ints (some out of range, some negative) and alternating
/// bools and floats. Errors are fine; panics are not.
fn run_small(program: &attnc::Program) {
    let shapes = Shapes {
        b: 1,
        h: 2,
        hkv: 1,
        q: 3,
        kv: 4,
        d: 2,
    };
    let q = Array4::from_shape_fn((1, 2, 3, 2), |(_, h, i, d)| {
        (h + 2 * i + 3 * d) as f32 * 0.1 - 0.3
    });
    let k = Array4::from_shape_fn((1, 1, 4, 2), |(_, _, i, d)| (i * 2 + d) as f32 * 0.2 - 0.5);
    let mut inputs = Inputs::new(q.view(), k.view(), k.view())
        .q_offset(1)
        .with_lse();
    for decl in &program.spec.buffers {
        let dims: Vec<usize> = shapes.buffer_shape(decl).unwrap();
        let Some(n) = dims
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .filter(|n| *n <= 100_000)
        else {
            return; // a declared dimension too large to allocate in a test
        };
        let shape = IxDyn(&dims);
        let data = match decl.elem {
            Type::Int => BufferData::Int(ArrayD::from_shape_fn(shape, |i| {
                (i.as_array_view().sum() as i64 % 6) - 1
            })),
            Type::Float => BufferData::Float(ArrayD::from_shape_fn(shape, |i| {
                i.as_array_view().sum() as f32 * 0.25
            })),
            Type::Bool => BufferData::Bool(ArrayD::from_shape_fn(shape, |i| {
                i.as_array_view().sum() % 2 == 0
            })),
        };
        assert_eq!(data.len(), n);
        inputs = inputs.buffer(&decl.name, data);
    }
    match program.run_reference(&inputs) {
        Ok(out) => assert_eq!(out.out.shape(), &[1, 2, 3, 2]),
        Err(e) => assert!(!e.render().is_empty()),
    }
}

fn examples() -> Vec<(String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut out: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "attn"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    assert!(
        out.len() >= 12,
        "expected the examples in {}",
        dir.display()
    );
    out
}

/// Tokens of the language, near-misses, and things that are not tokens.
const TOKENS: &[&str] = &[
    "attention",
    "param",
    "buffer",
    "let",
    "mask",
    "score",
    "scale",
    "if",
    "else",
    "true",
    "false",
    "int",
    "float",
    "bool",
    "b",
    "h",
    "q",
    "kv",
    "B",
    "H",
    "HKV",
    "Q",
    "KV",
    "D",
    "causal",
    "ancestor",
    "abs",
    "min",
    "max",
    "clamp",
    "exp",
    "exp2",
    "log",
    "log2",
    "sqrt",
    "rsqrt",
    "tanh",
    "sigmoid",
    "floor",
    "ceil",
    "round",
    "x",
    "doc",
    "window",
    "parent",
    "_",
    "a1",
    "{",
    "}",
    "(",
    ")",
    "[",
    "]",
    ",",
    ":",
    "=",
    "==",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    "+",
    "-",
    "*",
    "/",
    "%",
    "!",
    "&&",
    "||",
    "&",
    "|",
    ";",
    ".",
    "?",
    "//",
    "// note\n",
    "\n",
    "0",
    "1",
    "42",
    "1.5",
    "0.0",
    "1e10",
    "1e999",
    "1e-400",
    "2.",
    ".5",
    "1e",
    "99999999999999999999",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "é",
    "λ",
    "🦀",
    "\u{0}",
    "\u{feff}",
    "\r",
    "\t",
    "ﬁ",
    "\"",
    "'",
    "#",
    "\\",
];

fn arb_token() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(TOKENS).prop_map(str::to_string),
        1 => "\\PC{0,6}",
        1 => prop::collection::vec(any::<u8>(), 0..6).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]
}

/// Token soup, sometimes inside an attention block so the checker sees it.
fn arb_soup() -> impl Strategy<Value = String> {
    (prop::collection::vec((arb_token(), prop::sample::select(&[" ", "", "\n"][..])), 0..60), 0..4u8).prop_map(
        |(tokens, wrap)| {
            let body: String = tokens.into_iter().map(|(t, sep)| t + sep).collect();
            match wrap {
                0 => body,
                1 => format!("attention a {{ {body} }}"),
                2 => format!("attention a {{ mask = {body} }}"),
                _ => format!("attention a {{ param w: int = 3\n buffer doc[KV]: int\n let x = {body}\n mask = x }}"),
            }
        },
    )
}

/// A position in a text, as a fraction of its length (`0` is the start,
/// `u16::MAX` the end).
#[derive(Clone, Copy, Debug)]
struct Pos(u16);

impl Pos {
    fn of(self, len: usize) -> usize {
        usize::from(self.0) * len / usize::from(u16::MAX)
    }
}

/// One edit of a source text.
#[derive(Clone, Debug)]
enum Mutation {
    Delete(Pos, usize),
    Insert(Pos, String),
    Replace(Pos, String),
    Swap(Pos, Pos, usize),
    Duplicate(Pos, usize),
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<u16>(), 1usize..12).prop_map(|(i, n)| Mutation::Delete(Pos(i), n)),
        (any::<u16>(), arb_token()).prop_map(|(i, t)| Mutation::Insert(Pos(i), t)),
        (any::<u16>(), arb_token()).prop_map(|(i, t)| Mutation::Replace(Pos(i), t)),
        (any::<u16>(), any::<u16>(), 1usize..12).prop_map(|(a, b, n)| Mutation::Swap(
            Pos(a),
            Pos(b),
            n
        )),
        (any::<u16>(), 1usize..30).prop_map(|(i, n)| Mutation::Duplicate(Pos(i), n)),
    ]
}

fn apply(text: &str, m: &Mutation) -> String {
    let mut c: Vec<char> = text.chars().collect();
    let at = |p: &Pos, c: &Vec<char>| p.of(c.len());
    match m {
        Mutation::Delete(i, n) => {
            let s = at(i, &c);
            c.drain(s..(s + n).min(c.len()));
        }
        Mutation::Insert(i, t) => {
            let s = at(i, &c);
            c.splice(s..s, t.chars());
        }
        Mutation::Replace(i, t) => {
            let s = at(i, &c);
            let e = (s + t.chars().count()).min(c.len());
            c.splice(s..e, t.chars());
        }
        Mutation::Swap(a, b, n) => {
            let (a, b) = (at(a, &c), at(b, &c));
            let (lo, hi) = (a.min(b), a.max(b));
            let n = (*n).min(hi - lo).min(c.len() - hi);
            let first: Vec<char> = c[lo..lo + n].to_vec();
            let second: Vec<char> = c[hi..hi + n].to_vec();
            c.splice(hi..hi + n, first);
            c.splice(lo..lo + n, second);
        }
        Mutation::Duplicate(i, n) => {
            let s = at(i, &c);
            let e = (s + n).min(c.len());
            let span: Vec<char> = c[s..e].to_vec();
            c.splice(e..e, span);
        }
    }
    c.into_iter().collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn token_soup_never_panics(text in arb_soup()) {
        exercise(&text);
    }

    #[test]
    fn mutated_examples_never_panic(pick in any::<Index>(), mutations in prop::collection::vec(arb_mutation(), 1..5)) {
        let examples = examples();
        let (_, text) = &examples[pick.index(examples.len())];
        let mutated = mutations.iter().fold(text.clone(), |t, m| apply(&t, m));
        exercise(&mutated);
    }

    #[test]
    fn param_overrides_never_panic(name in prop_oneof![
        3 => prop::sample::select(&["w", "c", "on", "W", "x"][..]).prop_map(str::to_string),
        1 => "\\PC{0,8}",
    ], value in prop_oneof![
        2 => "\\PC{0,12}",
        2 => prop::sample::select(&[
            "1", "-1", " 7 ", "+3", "0x10", "1e3", "1.5", "-0.0", "nan", "NaN", "inf", "-inf", "infinity", "1e999",
            "99999999999999999999", "-9223372036854775808", "true", "false", "True", "", " ", "1_000",
        ][..]).prop_map(str::to_string),
        1 => any::<i64>().prop_map(|i| i.to_string()),
        1 => any::<f64>().prop_map(|x| x.to_string()),
    ]) {
        let src = "attention a {\n param w: int = 3\n param c: float = 0.5\n param on: bool = true\n mask = on && q - kv < w\n score = c * score\n}";
        let options = SpecOptions { entry: None, params: vec![(name.clone(), value.clone())] };
        match attnc::load(SourceFile::new("p.attn", src), &options) {
            Ok(program) => {
                // An accepted override has the declared type and a finite value.
                let p = program.spec.params.iter().find(|p| p.name == name).expect("overrode a declared param");
                match p.value {
                    attnc::sema::Value::Int(_) => prop_assert_eq!(p.ty, Type::Int),
                    attnc::sema::Value::Float(x) => prop_assert!(p.ty == Type::Float && x.is_finite()),
                    attnc::sema::Value::Bool(_) => prop_assert_eq!(p.ty, Type::Bool),
                }
                run_small(&program);
            }
            Err(e) => {
                let message = e.to_string();
                prop_assert!(message.contains(&format!("`{name}`")), "{}", message);
                prop_assert!(!e.render().is_empty());
            }
        }
    }
}

#[test]
fn every_example_checks_and_runs() {
    for (name, text) in examples() {
        assert!(exercise(&text), "{name} does not check");
    }
}

#[test]
fn mutations_keep_text_valid_utf8_and_change_it() {
    // A sanity check of the mutator itself.
    let text = "attention a { mask = causal }";
    let (start, end) = (Pos(0), Pos(u16::MAX));
    let swapped = apply(text, &Mutation::Swap(start, Pos(u16::MAX / 2), 3));
    assert_ne!(swapped, text);
    assert_eq!(swapped.chars().count(), text.chars().count());
    assert_eq!(
        apply(text, &Mutation::Delete(start, 10)),
        "a { mask = causal }"
    );
    assert_eq!(apply(text, &Mutation::Delete(end, 10)), text);
    assert_eq!(apply("ab", &Mutation::Duplicate(start, 1)), "aab");
    assert_eq!(apply("aλ", &Mutation::Insert(end, "λ".into())), "aλλ");
    assert_eq!(
        apply("abc", &Mutation::Replace(Pos(u16::MAX / 2), "xyz".into())),
        "axyz"
    );
}

// ---------------------------------------------------------------------------
// Inputs random generation rarely reaches.

fn check_err(text: &str) -> String {
    let file = Arc::new(SourceFile::new("deep.attn", text));
    match driver::check(&file) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.render(),
    }
}

fn mask_spec(expr: &str) -> String {
    format!("attention a {{\n    buffer w[KV]: int\n    mask = {expr}\n}}")
}

#[test]
fn moderate_nesting_is_accepted() {
    let n = 60;
    let parens = format!("{}causal{}", "(".repeat(n), ")".repeat(n));
    assert!(exercise(&mask_spec(&parens)));
    let nots = format!("{}causal", "!".repeat(n));
    assert!(exercise(&mask_spec(&nots)));
    let chain = vec!["q - kv < 3"; n].join(" || ");
    assert!(exercise(&mask_spec(&chain)));
    let calls = format!("{}q - kv{} < 3", "abs(".repeat(n), ")".repeat(n));
    assert!(exercise(&mask_spec(&calls)));
    let index = format!(
        "{}kv{} == 0",
        "w[clamp(".repeat(n / 2),
        ", 0, KV - 1)]".repeat(n / 2)
    );
    assert!(exercise(&mask_spec(&index)));
    let mut ifs = String::new();
    for i in 0..n {
        ifs += &format!("if q == {i} {{ kv < {i} }} else ");
    }
    ifs += "{ causal }";
    assert!(exercise(&mask_spec(&ifs)));
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    for n in [300, 2_000, 20_000] {
        let cases = [
            (
                "parens",
                format!("{}causal{}", "(".repeat(n), ")".repeat(n)),
            ),
            ("unclosed parens", "(".repeat(n)),
            ("nots", format!("{}causal", "!".repeat(n))),
            ("negations", format!("{}q < kv", "-".repeat(n))),
            ("or chain", vec!["causal"; n].join(" || ")),
            ("sum chain", format!("{} < kv", vec!["q"; n].join(" + "))),
            (
                "calls",
                format!("{}q{} < kv", "abs(".repeat(n), ")".repeat(n)),
            ),
            (
                "index",
                format!("{}kv{} == 0", "w[".repeat(n), "]".repeat(n)),
            ),
            (
                "blocks",
                format!(
                    "{}causal{}",
                    "if true { ".repeat(n),
                    " } else { false }".repeat(n)
                ),
            ),
            (
                "else-if chain",
                format!("{}{{ causal }}", "if q == 0 { true } else ".repeat(n)),
            ),
        ];
        for (what, expr) in cases {
            let text = check_err(&mask_spec(&expr));
            assert!(
                text.contains("nested too deeply") || text.contains("expected"),
                "{what} x {n}: {}",
                &text[..text.len().min(600)]
            );
        }
    }
}

#[test]
fn deep_nesting_error_says_what_to_do() {
    let text = check_err(&mask_spec(&format!(
        "{}causal{}",
        "(".repeat(500),
        ")".repeat(500)
    )));
    assert!(text.contains("nested too deeply"), "{text}");
    assert!(text.contains("deep.attn:3:"), "{text}");
    let text = check_err(&mask_spec(&vec!["causal"; 1000].join(" || ")));
    assert!(
        text.contains("nested too deeply"),
        "{}",
        &text[..text.len().min(600)]
    );
    assert!(text.contains("let"), "{}", &text[..text.len().min(600)]);
}

#[test]
fn long_let_chains_check_and_run_or_are_rejected() {
    for n in [100, 1_000, 5_000] {
        let mut src = String::from("attention a {\n");
        src += "    let x0 = q\n";
        for i in 1..n {
            src += &format!("    let x{i} = x{} + 1\n", i - 1);
        }
        src += &format!("    mask = x{} - {} >= kv\n}}\n", n - 1, n - 1);
        let accepted = exercise(&src);
        if n <= 100 {
            assert!(accepted, "a chain of {n} lets is rejected");
        } else if !accepted {
            assert!(check_err(&src).contains("nested too deeply"));
        }
    }
}

#[test]
fn exponential_let_dags_stay_linear() {
    // Each let uses the previous one twice: the expression tree has 2^64
    // leaves, the graph 64 nodes. Nothing may walk it as a tree.
    let mut src = String::from("attention a {\n    let x0 = kv\n");
    for i in 1..64 {
        src += &format!("    let x{i} = x{} + x{} - x{}\n", i - 1, i - 1, i - 1);
    }
    src += "    mask = q >= x63\n    score = score + float(x63 - kv)\n}\n";
    assert!(exercise(&src));
}

#[test]
fn huge_literals_are_errors_or_values() {
    let cases = [
        "attention a { param x: int = 99999999999999999999999999999 }",
        "attention a { param x: float = 1e400 }",
        "attention a { param x: float = 1e-400 }",
        "attention a { param x: int = -9223372036854775808\n mask = q > x }",
        "attention a { param x: int = 9223372036854775807\n mask = q + x > kv }",
        "attention a { mask = q * 9223372036854775807 > kv * 9223372036854775807 }",
        "attention a { mask = q > 9223372036854775808 }",
        "attention a { mask = abs(q - 9223372036854775807 - 2) > 0 }",
        "attention a { score = score + float(int(1e300)) }",
        "attention a { score = score * 1e308 * 1e308 }",
        "attention a { mask = (q - 9223372036854775807 - 1) / -1 < 0 && (q - 9223372036854775807 - 1) % -1 == 0 }",
        "attention a { buffer w[99999999999999999999]: int }",
        "attention a { buffer w[18446744073709551615, 18446744073709551615]: int\n mask = w[q, kv] > 0 }",
        "attention a { buffer w[KV / 18446744073709551615]: int\n mask = w[0] > 0 }",
    ];
    for src in cases {
        exercise(src);
    }
    let digits = "7".repeat(100_000);
    exercise(&format!("attention a {{ param x: int = {digits} }}"));
    exercise(&format!("attention a {{ param x: float = 0.{digits} }}"));
    exercise(&format!("attention a {{ mask = q < {digits} }}"));
}

#[test]
fn large_files_are_handled() {
    // Many blocks, a long comment, a long name.
    let mut src = String::new();
    for i in 0..2_000 {
        src += &format!("attention a{i} {{ mask = causal && q - kv < {i} }}\n");
    }
    let file = Arc::new(SourceFile::new("many.attn", src));
    assert_eq!(driver::check(&file).unwrap().specs.len(), 2_000);
    exercise(&format!("// {}\nattention a {{ }}", "x".repeat(1_000_000)));
    exercise(&format!("attention {} {{ }}", "n".repeat(100_000)));
    exercise(&format!(
        "attention a {{ mask = {}causal }}",
        " ".repeat(1_000_000)
    ));
}

#[test]
fn errors_far_along_a_line_render_with_their_position() {
    // A syntax error at column 70022 of line 1.
    let pad = " ".repeat(70_000);
    let text = check_err(&format!("attention a {{ mask = {pad}? }}"));
    assert!(
        text.contains("deep.attn:1:70022"),
        "{}",
        &text[..text.len().min(800)]
    );
    assert!(
        text.contains("expected an expression"),
        "{}",
        &text[..text.len().min(800)]
    );

    // A checker error whose label spans 200,000 characters.
    let digits = "7".repeat(200_000);
    let text = check_err(&format!("attention a {{\n    mask = 0.{digits}\n}}"));
    assert!(
        text.contains("`mask` must be bool, found float"),
        "{}",
        &text[..text.len().min(800)]
    );
    assert!(
        text.contains("deep.attn:2:12"),
        "{}",
        &text[..text.len().min(800)]
    );

    // Several errors, one of them far along its line.
    let text = check_err(&format!(
        "attention a {{\n    mask = {pad}nope\n    score = bad\n}}"
    ));
    assert!(
        text.contains("deep.attn:2:70012") && text.contains("unknown name `nope`"),
        "{}",
        &text[..text.len().min(1200)]
    );
    assert!(
        text.contains("deep.attn:3:13") && text.contains("unknown name `bad`"),
        "{}",
        &text[..text.len().min(1200)]
    );

    // An error from a run, far along its line.
    let src = format!("attention a {{\n    buffer w[KV]: int\n    mask = {pad}w[q + 100] > 0\n}}");
    let program = attnc::load(SourceFile::new("run.attn", src), &SpecOptions::default()).unwrap();
    let x = Array4::<f32>::zeros((1, 1, 2, 2));
    let inputs = Inputs::new(x.view(), x.view(), x.view())
        .buffer("w", BufferData::Int(ArrayD::zeros(IxDyn(&[2]))));
    let text = program.run_reference(&inputs).unwrap_err().render();
    assert!(
        text.contains("run.attn:3:70012") && text.contains("`w[100]`"),
        "{}",
        &text[..text.len().min(800)]
    );
}

// Sizes beyond memory, .npy files and command lines (issue 17) ---------------

/// A kernel compiled for tiles whose scratch exceeds any memory fails with a
/// memory error when run, through the library as through the CLI (it aborted
/// the process on a failed allocation).
#[test]
fn tiles_beyond_memory_are_an_error_through_the_api() {
    let tiles = attnc::mask::Tiling::new(100_000_000, 100_000_000).unwrap();
    let options = attnc::CompileOptions {
        tiles: attnc::Tiles::Fixed(tiles),
        ..Default::default()
    };
    let kernel = attnc::compile(
        SourceFile::new("c.attn", "attention c { mask = causal }"),
        &options,
    )
    .unwrap();
    let q = Array4::<f32>::ones((1, 1, 8, 16));
    let err = kernel
        .run(&Inputs::new(q.view(), q.view(), q.view()))
        .unwrap_err();
    let attnc::Error::Memory(m) = &err else {
        panic!("expected a memory error, found {err:?}")
    };
    assert!(m.needed > 1 << 50, "{m}");
    let text = err.to_string();
    assert!(
        text.starts_with(
            "running `c` on B=1 H=1 HKV=1 Q=8 KV=8 D=16 with 100000000x100000000 tiles would need "
        ),
        "{text}"
    );
    assert!(err.render().contains("attnc::memory"), "{}", err.render());
}

/// Block maps per (batch, head) of a call too large for memory are a memory
/// error from every entry point of a jit kernel, as from the reference and
/// the interpreter (`run`, `plan` and `block_maps` built them first and
/// aborted the process on the failed allocation).
#[test]
fn block_maps_beyond_memory_are_an_error_through_the_api() {
    let program = attnc::load(
        SourceFile::new("t.attn", "attention t { mask = causal && h >= b }"),
        &attnc::SpecOptions::default(),
    )
    .unwrap();
    let one = Array4::<f32>::ones((1, 1, 1, 1));
    // 2^40 (b, h) pairs: past any machine's memory, maps or outputs.
    let n = 1usize << 20;
    let q = one.broadcast((n, n, 1, 1)).unwrap();
    let kv = one.broadcast((1, 1, 4, 1)).unwrap();
    let inputs = Inputs::new(q, kv, kv);
    let is_memory = |what: &str, err: attnc::Error| {
        let attnc::Error::Memory(m) = &err else {
            panic!("{what}: expected a memory error, found {err:?}")
        };
        // The tiled backends' largest part: 2^40 block maps.
        assert!(
            what == "reference" || m.to_string().contains("block maps"),
            "{what}: {m}"
        );
    };
    is_memory("reference", program.run_reference(&inputs).unwrap_err());
    let tiles = attnc::mask::Tiling::new(64, 64).unwrap();
    is_memory("interp", program.run_interp(&inputs, tiles).unwrap_err());
    let kernel = program
        .compile_jit_with(&attnc::CompileOptions::default())
        .unwrap();
    is_memory("run", kernel.run(&inputs).unwrap_err());
    is_memory("plan", kernel.plan(&inputs).map(|_| ()).unwrap_err());
    is_memory(
        "block_maps",
        kernel.block_maps(&inputs).map(|_| ()).unwrap_err(),
    );
}

/// A valid `.npy` file of `shape` float32 zeros, as bytes.
fn npy_f32(shape: &[usize]) -> Vec<u8> {
    use ndarray_npy::WriteNpyExt;
    let a = ArrayD::<f32>::zeros(IxDyn(shape));
    let mut bytes = Vec::new();
    a.write_npy(&mut bytes).unwrap();
    bytes
}

/// Reads `bytes` as an `.npy` file every way the CLI does.
fn read_npy_every_way(bytes: &[u8]) {
    let file = tempfile::Builder::new()
        .prefix("attnc-npy-robust-")
        .suffix(".npy")
        .tempfile()
        .unwrap();
    let path = file.path();
    std::fs::write(path, bytes).unwrap();
    let _ = attnc::npy::read_f32_4d(path, "q").map_err(|e| e.render());
    let _ = attnc::npy::read_f32_dyn(path).map_err(|e| e.render());
    for ty in [Type::Int, Type::Float, Type::Bool] {
        let _ = attnc::npy::read_buffer(path, "doc", ty).map_err(|e| e.render());
    }
    for elem in attnc::ElemType::ALL {
        let _ = attnc::npy::read_q(path, elem).map_err(|e| e.render());
        let _ = attnc::npy::read_kv(path, "k", elem, None).map_err(|e| e.render());
        let _ = attnc::npy::read_kv(path, "k", elem, Some((path, "--k-scales")))
            .map_err(|e| e.render());
    }
}

/// A mutation of an `.npy` file: the header text, its length field or the data.
#[derive(Clone, Debug)]
enum NpyMutation {
    /// Replaces the shape with these numbers (as text, possibly huge).
    Shape(Vec<String>),
    /// Replaces the descriptor.
    Descr(String),
    /// Overwrites the 2 bytes of the header length.
    HeaderLen(u16),
    /// Truncates the file to this fraction (per mille) of its length.
    Truncate(u16),
    /// Sets one byte.
    Byte(Index, u8),
}

fn arb_npy_mutation() -> impl Strategy<Value = NpyMutation> {
    let dim = prop_oneof![
        (0usize..40).prop_map(|n| n.to_string()),
        Just("2147483648".to_string()),
        Just("18446744073709551615".to_string()),
        Just("99999999999999999999999".to_string()),
        Just("-1".to_string()),
        Just("1e3".to_string()),
    ];
    prop_oneof![
        prop::collection::vec(dim, 0..6).prop_map(NpyMutation::Shape),
        prop_oneof![
            Just("<f4"),
            Just("<f8"),
            Just("<i4"),
            Just("<i8"),
            Just("|b1"),
            Just(">f4"),
            Just("<f2"),
            Just(">f2"),
            Just("<u2"),
            Just("|i1"),
            Just("|u1"),
            Just("<f99999999999999999999"),
            Just("<U3"),
            Just("|O"),
            Just(""),
        ]
        .prop_map(|d| NpyMutation::Descr(d.to_string())),
        any::<u16>().prop_map(NpyMutation::HeaderLen),
        (0u16..1000).prop_map(NpyMutation::Truncate),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| NpyMutation::Byte(i, b)),
    ]
}

/// Applies `m` to the bytes of an `.npy` file (header edits only to a
/// version-1 file whose header is intact; otherwise it is left as it is).
fn mutate_npy(mut bytes: Vec<u8>, m: &NpyMutation) -> Vec<u8> {
    let header_end = 10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let intact = bytes.starts_with(b"\x93NUMPY\x01")
        && header_end <= bytes.len()
        && std::str::from_utf8(&bytes[10..header_end])
            .is_ok_and(|h| h.contains("'shape': (") && h.contains("'descr': '"));
    if matches!(m, NpyMutation::Shape(_) | NpyMutation::Descr(_)) && !intact {
        return bytes;
    }
    let header = String::from_utf8_lossy(&bytes[10..header_end.min(bytes.len())]).into_owned();
    let data = bytes[header_end.min(bytes.len())..].to_vec();
    let rebuild = |header: String| {
        let mut out = bytes[..8].to_vec();
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&data);
        out
    };
    // The value of a key: from after `key` to the first `close` after it.
    let span = |key: &str, close: char| {
        let start = header.find(key)? + key.len();
        Some((start, start + header[start..].find(close)?))
    };
    match m {
        NpyMutation::Shape(dims) => {
            let Some((start, end)) = span("'shape': (", ')') else {
                return bytes;
            };
            let dims = if dims.len() == 1 {
                format!("{},", dims[0])
            } else {
                dims.join(", ")
            };
            rebuild(format!("{}{dims}{}", &header[..start], &header[end..]))
        }
        NpyMutation::Descr(d) => {
            let Some((start, end)) = span("'descr': '", '\'') else {
                return bytes;
            };
            rebuild(format!("{}{d}{}", &header[..start], &header[end..]))
        }
        NpyMutation::HeaderLen(n) => {
            bytes[8..10].copy_from_slice(&n.to_le_bytes());
            bytes
        }
        NpyMutation::Truncate(per_mille) => {
            let len = bytes.len() * *per_mille as usize / 1000;
            bytes.truncate(len);
            bytes
        }
        NpyMutation::Byte(i, b) => {
            let i = i.index(bytes.len());
            bytes[i] = *b;
            bytes
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// No `.npy` file makes the reader panic or allocate what its header
    /// claims beyond the file's size: wrong shapes, descriptors, header
    /// lengths, truncation and stray bytes are errors.
    #[test]
    fn mutated_npy_files_never_panic(
        shape in prop::collection::vec(0usize..5, 0..5),
        mutations in prop::collection::vec(arb_npy_mutation(), 1..4),
    ) {
        let mut bytes = npy_f32(&shape);
        for m in &mutations {
            if bytes.len() < 10 {
                break;
            }
            bytes = mutate_npy(bytes, m);
        }
        read_npy_every_way(&bytes);
    }
}

/// A flag with a value drawn from `values`.
fn flag_of(
    name: &'static str,
    values: impl Strategy<Value = &'static str>,
) -> impl Strategy<Value = Vec<String>> {
    values.prop_map(move |v| vec![name.to_string(), v.to_string()])
}

/// A random command line from the CLI's vocabulary: each subcommand with
/// its required flags and some of its other flags, with values at and far
/// beyond every limit, and paths (examples, fixtures, missing files,
/// devices). Counts of repetitions stay small (a billion timed runs is a
/// valid request, only a long one).
fn arb_command_line() -> impl Strategy<Value = Vec<String>> {
    fn number() -> impl Strategy<Value = &'static str> + Clone {
        prop_oneof![
            4 => prop_oneof![Just("1"), Just("3"), Just("16"), Just("64"), Just("100")],
            1 => Just("0"),
            2 => prop_oneof![Just("1000000000000"), Just("18446744073709551615")],
            1 => prop_oneof![Just("18446744073709551616"), Just("-1"), Just("abc"), Just("")],
        ]
    }
    fn small() -> impl Strategy<Value = &'static str> + Clone {
        prop_oneof![Just("0"), Just("1"), Just("2"), Just("-1"), Just("x")]
    }
    fn block() -> impl Strategy<Value = &'static str> + Clone {
        prop_oneof![
            Just("auto"),
            Just("64x64"),
            Just("16"),
            Just("0x16"),
            Just("1x1"),
            Just("100000000x100000000"),
            Just("18446744073709551615x16"),
            Just("64x"),
        ]
    }
    fn spec() -> impl Strategy<Value = &'static str> + Clone {
        prop_oneof![
            4 => prop_oneof![
                Just("examples/causal.attn"), Just("examples/packed_docs.attn"),
                Just("examples/sliding_window.attn"), Just("examples/alibi.attn"),
            ],
            1 => prop_oneof![
                Just("tests/errors/score_in_mask.attn"), Just("no/such/file"), Just("/dev/null"),
                Just("/dev/zero"), Just("."), Just("tests/fixtures/packed_docs/q.npy"),
            ],
        ]
    }
    fn npy(usual: &'static str) -> impl Strategy<Value = &'static str> + Clone {
        prop_oneof![
            6 => Just(usual),
            1 => prop_oneof![
                Just("tests/fixtures/packed_docs/doc.npy"), Just("examples/causal.attn"),
                Just("no/such/file"), Just("/dev/null"), Just("/dev/zero"), Just("."),
            ],
        ]
    }
    fn assignment() -> impl Strategy<Value = &'static str> + Clone {
        prop_oneof![
            Just("doc=docs:4"),
            Just("doc=docs:0"),
            Just("doc=tests/fixtures/packed_docs/doc.npy"),
            Just("doc=iota"),
            Just("slope=alibi"),
            Just("window=8"),
            Just("window=-1"),
            Just("window=1e400"),
            Just("x=1"),
            Just("="),
            Just("noequals"),
        ]
    }
    fn backend() -> impl Strategy<Value = &'static str> + Clone {
        prop_oneof![Just("reference"), Just("interp"), Just("jit"), Just("cuda")]
    }
    fn elem() -> impl Strategy<Value = &'static str> + Clone {
        prop_oneof![
            Just("f32"),
            Just("bf16"),
            Just("f16"),
            Just("int8"),
            Just("fp8"),
            Just("int4")
        ]
    }
    let flags = |options: Vec<BoxedStrategy<Vec<String>>>| {
        prop::collection::vec(proptest::strategy::Union::new(options), 0..4)
            .prop_map(|f| f.into_iter().flatten().collect::<Vec<String>>())
    };
    let params = || flag_of("--param", assignment()).boxed();
    let buffers = || flag_of("--buffer", assignment()).boxed();
    let check = spec().prop_map(|s| vec!["check".to_string(), s.to_string()]);
    let run = (
        spec(),
        npy("tests/fixtures/packed_docs/q.npy"),
        npy("tests/fixtures/packed_docs/k.npy"),
        npy("tests/fixtures/packed_docs/v.npy"),
        flags(vec![
            params(),
            buffers(),
            flag_of("--q-offset", number()).boxed(),
            flag_of("--backend", backend()).boxed(),
            flag_of("--block", block()).boxed(),
            flag_of("--dtype", elem()).boxed(),
            flag_of("--kv-dtype", elem()).boxed(),
            flag_of("--k-scales", npy("tests/fixtures/packed_docs/q.npy")).boxed(),
            flag_of("--v-scales", npy("tests/fixtures/packed_docs/doc.npy")).boxed(),
            flag_of(
                "--lse",
                prop_oneof![Just("OUT/l.npy"), Just("OUT/o.npy"), Just("OUT/no/l.npy")],
            )
            .boxed(),
        ]),
    )
        .prop_map(|(s, q, k, v, rest)| {
            let mut a: Vec<String> = ["run", s, "--q", q, "--k", k, "--v", v, "--out", "OUT/o.npy"]
                .map(String::from)
                .to_vec();
            a.extend(rest);
            a
        });
    let bench = (
        spec(),
        number(),
        flags(vec![
            params(),
            buffers(),
            flag_of("--kv-len", number()).boxed(),
            flag_of("--batch", number()).boxed(),
            flag_of("--heads", number()).boxed(),
            flag_of("--kv-heads", number()).boxed(),
            flag_of("--dim", number()).boxed(),
            flag_of("--q-offset", number()).boxed(),
            flag_of("--threads", number()).boxed(),
            flag_of("--backend", backend()).boxed(),
            flag_of("--block", block()).boxed(),
            flag_of("--runs", small()).boxed(),
            flag_of("--warmup", small()).boxed(),
            flag_of("--dtype", elem()).boxed(),
            flag_of("--kv-dtype", elem()).boxed(),
            Just(vec!["--json".to_string()]).boxed(),
        ]),
    )
        .prop_map(|(s, q, rest)| {
            let mut a: Vec<String> = ["bench", s, "--q-len", q].map(String::from).to_vec();
            a.extend(rest);
            a
        });
    let blocks = (
        spec(),
        number(),
        number(),
        flags(vec![
            params(),
            buffers(),
            flag_of("--block", block()).boxed(),
            flag_of("--b", number()).boxed(),
            flag_of("--h", number()).boxed(),
            flag_of("--q-offset", number()).boxed(),
            flag_of("--at", prop_oneof![Just("0,0"), Just("0,1"), Just("x")]).boxed(),
            flag_of("--repeat", small()).boxed(),
            flag_of(
                "--png",
                prop_oneof![Just("OUT/m.png"), Just("OUT/no/m.png")],
            )
            .boxed(),
            Just(vec!["--json".to_string()]).boxed(),
        ]),
    )
        .prop_map(|(s, q, kv, rest)| {
            let mut a: Vec<String> = ["blocks", s, "--q-len", q, "--kv-len", kv]
                .map(String::from)
                .to_vec();
            a.extend(rest);
            a
        });
    let emit = (
        spec(),
        flags(vec![
            params(),
            buffers(),
            flag_of(
                "--stage",
                prop_oneof![
                    Just("ast"),
                    Just("checked"),
                    Just("tile"),
                    Just("tile-unopt"),
                    Just("clif"),
                    Just("blocks")
                ],
            )
            .boxed(),
            flag_of("--block", block()).boxed(),
            flag_of("--dim", prop_oneof![number(), Just("generic")]).boxed(),
            flag_of("--q-len", number()).boxed(),
            flag_of("--kv-len", number()).boxed(),
            Just(vec!["--target".to_string(), "ptx".to_string()]).boxed(),
            flag_of("-o", prop_oneof![Just("OUT/e.txt"), Just("OUT/no/e.txt")]).boxed(),
        ]),
    )
        .prop_map(|(s, rest)| {
            let mut a: Vec<String> = ["emit", s].map(String::from).to_vec();
            a.extend(rest);
            a
        });
    prop_oneof![1 => check, 3 => run, 3 => bench, 3 => blocks, 3 => emit]
}

/// Copies the files `arb_command_line` names (relative to the package root)
/// into `dir`, under the same relative paths.
fn copy_inputs(dir: &std::path::Path) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for sub in ["examples", "tests/fixtures/packed_docs", "tests/errors"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        for entry in std::fs::read_dir(root.join(sub)).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::fs::copy(&path, dir.join(sub).join(path.file_name().unwrap())).unwrap();
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// No command line makes `attnc` panic or abort: it exits 0, 1 (an
    /// error it explains) or 2 (a command line clap rejects), within
    /// seconds. Outputs go to a fresh directory.
    #[test]
    fn command_lines_never_crash(args in arb_command_line()) {
        let tmp = tempfile::Builder::new().prefix("attnc-cli-robust-").tempdir().unwrap();
        let dir = tmp.path();
        // The command runs in a scratch copy of the files it names: a mutated
        // command line can make any argument an output path (`-o examples/x.attn`,
        // `--lse run`), and must never write into the source tree.
        copy_inputs(dir);
        let out = dir.display().to_string();
        let args: Vec<String> = args.iter().map(|a| a.replace("OUT", &out)).collect();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_attnc"))
            .args(&args)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut err = String::new();
            use std::io::Read;
            let _ = stderr.read_to_string(&mut err);
            err
        });
        let start = std::time::Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if start.elapsed() > std::time::Duration::from_secs(60) {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        let err = reader.join().unwrap();
        if std::env::var_os("ATTNC_SHOW_COMMANDS").is_some() {
            eprintln!("{:?} attnc {}", status.and_then(|s| s.code()), args.join(" "));
        }
        let Some(status) = status else {
            // Slow is not a crash (e.g. a large valid block map); note it.
            eprintln!("slow (killed after 60 s): attnc {}", args.join(" "));
            return Ok(());
        };
        prop_assert!(
            matches!(status.code(), Some(0..=2)),
            "attnc {} ended with {status:?}:\n{err}",
            args.join(" ")
        );
        prop_assert!(!err.contains("panicked"), "attnc {}:\n{err}", args.join(" "));
    }
}
