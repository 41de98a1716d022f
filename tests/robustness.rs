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
        let dims: Vec<usize> = decl.dims.iter().map(|d| shapes.dim(*d)).collect();
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
