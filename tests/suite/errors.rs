//! Error snapshots: every `tests/errors/*.attn` is a minimal bad spec with one
//! mistake (named after it), except `multiple_errors.attn`, which holds
//! several. Each is parsed and checked, and the rendered diagnostic (no
//! colour, fixed width) is snapshot with insta. Review the snapshots by
//! reading them: the message says what was expected and what was found, the
//! label points at the offending span, and the help suggests the fix.

use std::sync::Arc;

use attnc::driver::{self, Error, SourceFile};

/// Errors whose rendering cannot underline anything, with the reason.
const NO_CARET: &[(&str, &str)] = &[("empty_file.attn", "an empty file has no text to point at")];

/// Renders the diagnostic for a bad spec file.
fn render_bad(path: &std::path::Path) -> (String, String, Error) {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let text = std::fs::read_to_string(path).unwrap();
    let file = Arc::new(SourceFile::new(name.clone(), text));
    let err = match driver::check(&file) {
        Ok(_) => panic!("{name} was accepted, but it is a bad spec"),
        Err(e) => e,
    };
    (name, err.render(), err)
}

/// The `file:line:col` that miette prints for each labelled snippet.
fn locations(rendered: &str, name: &str) -> Vec<(usize, usize)> {
    let needle = format!("[{name}:");
    rendered
        .match_indices(&needle)
        .map(|(i, _)| {
            let rest = &rendered[i + needle.len()..];
            let end = rest.find(']').expect("location is closed by `]`");
            let (line, col) = rest[..end].split_once(':').expect("location is line:col");
            (line.parse().unwrap(), col.parse().unwrap())
        })
        .collect()
}

#[test]
fn error_snapshots() {
    insta::glob!("../errors", "*.attn", |path| {
        let (name, rendered, err) = render_bad(path);
        let text = std::fs::read_to_string(path).unwrap();
        let n_lines = text.lines().count().max(1);

        // File name with line and column, pointing inside the file.
        let locs = locations(&rendered, &name);
        assert!(
            !locs.is_empty(),
            "{name}: no `file:line:col` in\n{rendered}"
        );
        for (line, col) in &locs {
            assert!(
                *line >= 1 && *line <= n_lines + 1 && *col >= 1,
                "{name}: bad location {line}:{col}\n{rendered}"
            );
        }
        // A caret/underline with a label under the offending span: a snippet
        // line (`   · `) holding the `┬` that joins the underline to its label.
        let has_caret = rendered
            .lines()
            .any(|l| l.trim_start().starts_with('·') && l.contains('┬'));
        let has_label = rendered
            .lines()
            .any(|l| l.trim_start().starts_with('·') && l.contains("╰── "));
        if !NO_CARET.iter().any(|(n, _)| *n == name) {
            assert!(
                has_caret && has_label,
                "{name}: no caret/label line in\n{rendered}"
            );
        }
        // A suggested fix.
        assert!(rendered.contains("help:"), "{name}: no help in\n{rendered}");
        // The checker reports every error, not only the first.
        if name == "multiple_errors.attn" {
            let Error::Spec { problems, .. } = &err else {
                panic!("{name}: {err:?}")
            };
            assert_eq!(problems.len(), 3, "{name}: {rendered}");
            assert_eq!(locs.len(), 3, "{name}: {rendered}");
            assert_eq!(rendered.matches("help:").count(), 3, "{name}: {rendered}");
        }

        insta::assert_snapshot!(rendered);
    });
}

/// Every rendered message states what was wrong in words, not only in the
/// label: the first line is the message, and it is lowercase without a
/// trailing period (the house style for diagnostics).
#[test]
fn messages_follow_house_style() {
    insta::glob!("../errors", "*.attn", |path| {
        let (name, _, err) = render_bad(path);
        let problems = match &err {
            Error::Spec { problems, .. } => problems,
            other => panic!("{name}: expected a spec error, found {other:?}"),
        };
        for p in problems {
            let msg = p.to_string();
            assert!(
                !msg.ends_with('.'),
                "{name}: message ends with a period: {msg}"
            );
            let first = msg.chars().next().unwrap();
            assert!(
                !first.is_uppercase(),
                "{name}: message starts uppercase: {msg}"
            );
        }
    });
}

/// Random slices of the bad specs never make the parser or checker panic.
#[test]
fn truncated_bad_specs_do_not_panic() {
    insta::glob!("../errors", "*.attn", |path| {
        let text = std::fs::read_to_string(path).unwrap();
        let cuts: Vec<usize> = (0..=text.len())
            .filter(|i| text.is_char_boundary(*i))
            .collect();
        for &cut in &cuts {
            let file = Arc::new(SourceFile::new("cut.attn", &text[..cut]));
            if let Err(e) = driver::check(&file) {
                let _ = e.render();
            }
        }
    });
}

// ---------------------------------------------------------------------------
// Param overrides, entry selection and binding: errors found after checking.
// ---------------------------------------------------------------------------

use attnc::bind::BindError;
use attnc::driver::{Program, SpecOptions, SpecProblem};
use attnc::sema::{EntryError, ParamError, Type};
use attnc::{BufferData, Inputs};
use ndarray::{Array4, ArrayD, IxDyn};

const PARAMS: &str = "attention local {
    param window: int = 128
    param cap: float = 50.0
    param soft: bool = true
    mask = causal && q - kv < window
    score = if soft { cap * tanh(score / cap) } else { score }
}
";

// `attnc::Error` is the library's error type, large or not.
#[allow(clippy::result_large_err)]
fn load(src: &str, entry: Option<&str>, params: &[(&str, &str)]) -> Result<Program, Error> {
    let options = SpecOptions {
        entry: entry.map(str::to_string),
        ..SpecOptions::with_params(params)
    };
    attnc::load(SourceFile::new("spec.attn", src), &options)
}

/// The spec problems of an error that must be `Error::Spec`.
fn problems(err: &Error) -> &[SpecProblem] {
    match err {
        Error::Spec { problems, .. } => problems,
        other => panic!("expected a spec error, found {other:?}"),
    }
}

fn param_error(src: &str, params: &[(&str, &str)]) -> (ParamError, String) {
    let err = load(src, None, params).unwrap_err();
    let rendered = err.render();
    match problems(&err) {
        [SpecProblem::Param(p)] => (p.clone(), rendered),
        other => panic!("expected one param error, found {other:?}"),
    }
}

#[test]
fn param_override_of_the_wrong_type() {
    let cases = [
        (
            "window",
            "abc",
            Type::Int,
            "write an integer, e.g. `window=128`",
        ),
        ("window", "1.5", Type::Int, "write an integer"),
        (
            "cap",
            "fifty",
            Type::Float,
            "write a finite number, e.g. `cap=0.5`",
        ),
        ("cap", "inf", Type::Float, "write a finite number"),
        ("cap", "1e400", Type::Float, "write a finite number"),
        ("soft", "1", Type::Bool, "write `soft=true` or `soft=false`"),
        (
            "soft",
            "yes",
            Type::Bool,
            "write `soft=true` or `soft=false`",
        ),
    ];
    for (name, value, ty, help) in cases {
        let (e, rendered) = param_error(PARAMS, &[(name, value)]);
        let ParamError::WrongType {
            name: n,
            ty: t,
            value: v,
            ..
        } = &e
        else {
            panic!("{e:?}")
        };
        assert_eq!((n.as_str(), *t, v.as_str()), (name, ty, value));
        // Names the param, its type and the bad value; points at the declaration.
        assert!(
            rendered.contains(&format!(
                "param `{name}` is declared {ty}, but the override `{value}`"
            )),
            "{rendered}"
        );
        assert!(
            rendered.contains(&format!("declared {ty} here")),
            "{rendered}"
        );
        assert!(rendered.contains("[spec.attn:"), "{rendered}");
        assert!(rendered.contains(help), "{rendered}");
    }
}

#[test]
fn param_overrides_that_fit_are_applied() {
    let p = load(
        PARAMS,
        None,
        &[("window", " 64 "), ("cap", "3"), ("soft", "false")],
    )
    .unwrap();
    let text = p.spec.to_string();
    assert!(text.contains("param window: int = 64"), "{text}");
    assert!(text.contains("param cap: float = 3"), "{text}");
    assert!(text.contains("param soft: bool = false"), "{text}");
}

#[test]
fn unknown_param_override() {
    // A near miss is suggested.
    let (e, rendered) = param_error(PARAMS, &[("windw", "64")]);
    assert!(
        matches!(&e, ParamError::Unknown { name, spec, .. } if name == "windw" && spec == "local"),
        "{e:?}"
    );
    assert!(
        rendered.contains("attention `local` has no param `windw`"),
        "{rendered}"
    );
    assert!(rendered.contains("did you mean `window`?"), "{rendered}");
    // Otherwise every param is listed.
    let (_, rendered) = param_error(PARAMS, &[("nosuch", "1")]);
    assert!(
        rendered.contains("its params are: window, cap, soft"),
        "{rendered}"
    );
    // A block without params says so.
    let (_, rendered) = param_error("attention a { mask = causal }", &[("window", "1")]);
    assert!(
        rendered.contains("this attention block declares no params"),
        "{rendered}"
    );
}

#[test]
fn every_bad_param_override_is_reported() {
    let err = load(
        PARAMS,
        None,
        &[("window", "x"), ("nosuch", "1"), ("cap", "2.5")],
    )
    .unwrap_err();
    let found = problems(&err);
    assert_eq!(found.len(), 2, "{err:?}");
    let rendered = err.render();
    assert!(rendered.contains("has 2 errors"), "{rendered}");
    assert!(
        rendered.contains("override `x`") && rendered.contains("no param `nosuch`"),
        "{rendered}"
    );
}

const TWO_BLOCKS: &str =
    "attention causal_a { mask = causal }\nattention local_b { mask = q - kv < 4 }\n";

#[test]
fn entry_must_name_a_block_of_the_file() {
    let err = load(TWO_BLOCKS, Some("nosuch"), &[]).unwrap_err();
    assert!(
        matches!(problems(&err), [SpecProblem::Entry(EntryError::Unknown { name, .. })] if name == "nosuch"),
        "{err:?}"
    );
    let rendered = err.render();
    assert!(
        rendered.contains("no attention block named `nosuch`"),
        "{rendered}"
    );
    assert!(
        rendered.contains("the file defines: causal_a, local_b"),
        "{rendered}"
    );
}

#[test]
fn entry_is_required_when_a_file_has_several_blocks() {
    let err = load(TWO_BLOCKS, None, &[]).unwrap_err();
    assert!(
        matches!(
            problems(&err),
            [SpecProblem::Entry(EntryError::Ambiguous { .. })]
        ),
        "{err:?}"
    );
    let rendered = err.render();
    assert!(rendered.contains("several attention blocks"), "{rendered}");
    assert!(
        rendered.contains("--entry NAME") && rendered.contains("causal_a, local_b"),
        "{rendered}"
    );
    // Naming one works, and picks that one.
    assert_eq!(
        load(TWO_BLOCKS, Some("local_b"), &[]).unwrap().spec.name,
        "local_b"
    );
}

// Binding ------------------------------------------------------------------

const PACKED: &str =
    "attention packed {\n    buffer doc[KV]: int\n    mask = doc[q] == doc[kv] && causal\n}\n";

fn qkv(q: [usize; 4], k: [usize; 4], v: [usize; 4]) -> (Array4<f32>, Array4<f32>, Array4<f32>) {
    let fill = |s: [usize; 4]| {
        Array4::from_shape_fn(s, |(b, h, i, d)| {
            ((b + 2 * h + 3 * i + 5 * d) % 7) as f32 / 7.0
        })
    };
    (fill(q), fill(k), fill(v))
}

fn int_buffer(shape: &[usize]) -> BufferData {
    BufferData::Int(ArrayD::from_shape_fn(IxDyn(shape), |i| i[0] as i64 / 2))
}

/// The bind error of `PACKED` on inputs of the given shapes and query
/// offset, with a valid `doc` buffer of 6 ids, and its rendering.
fn packed_shape_error(
    q: [usize; 4],
    kv: [usize; 4],
    v: [usize; 4],
    offset: i64,
) -> (BindError, String) {
    bind_error(PACKED, q, kv, v, vec![("doc", int_buffer(&[6]))], offset)
}

/// Runs `PACKED` (or `src`) on the given inputs and returns the bind error
/// and its rendering.
fn bind_error(
    src: &str,
    q: [usize; 4],
    kv: [usize; 4],
    v: [usize; 4],
    buffers: Vec<(&str, BufferData)>,
    offset: i64,
) -> (BindError, String) {
    let program = load(src, None, &[]).unwrap();
    let (q, k, v) = qkv(q, kv, v);
    let mut inputs = Inputs::new(q.view(), k.view(), v.view()).q_offset(offset);
    for (name, data) in buffers {
        inputs = inputs.buffer(name, data);
    }
    match program.run_reference(&inputs) {
        Err(Error::Bind(e)) => {
            let rendered = Error::Bind(e.clone()).render();
            (e, rendered)
        }
        other => panic!("expected a bind error, found {other:?}"),
    }
}

#[test]
fn the_packed_spec_binds_when_everything_fits() {
    let program = load(PACKED, None, &[]).unwrap();
    let (q, k, v) = qkv([2, 4, 6, 8], [1, 2, 6, 8], [1, 2, 6, 8]);
    let inputs = Inputs::new(q.view(), k.view(), v.view()).buffer("doc", int_buffer(&[6]));
    let out = program.run_reference(&inputs).unwrap();
    assert_eq!(out.out.shape(), &[2, 4, 6, 8]);
}

#[test]
fn missing_buffer() {
    let (e, r) = bind_error(PACKED, [1, 2, 6, 8], [1, 2, 6, 8], [1, 2, 6, 8], vec![], 0);
    assert!(
        matches!(&e, BindError::MissingBuffer { name, .. } if name == "doc"),
        "{e:?}"
    );
    assert!(
        r.contains("missing buffer `doc`: attention `packed` declares `buffer doc[KV]: int`"),
        "{r}"
    );
    assert!(r.contains("--buffer doc=FILE.npy"), "{r}");
}

#[test]
fn extra_buffer() {
    let (e, r) = bind_error(
        PACKED,
        [1, 2, 6, 8],
        [1, 2, 6, 8],
        [1, 2, 6, 8],
        vec![("doc", int_buffer(&[6])), ("slope", int_buffer(&[2]))],
        0,
    );
    assert!(
        matches!(&e, BindError::ExtraBuffer { name, .. } if name == "slope"),
        "{e:?}"
    );
    assert!(
        r.contains("unexpected buffer `slope`: attention `packed` declares no such buffer"),
        "{r}"
    );
    assert!(r.contains("its buffers are: doc"), "{r}");
    let (_, r) = bind_error(
        PACKED,
        [1, 2, 6, 8],
        [1, 2, 6, 8],
        [1, 2, 6, 8],
        vec![("dco", int_buffer(&[6]))],
        0,
    );
    assert!(r.contains("did you mean `doc`?"), "{r}");
}

#[test]
fn buffer_of_the_wrong_element_type() {
    let data = BufferData::Float(ArrayD::zeros(IxDyn(&[6])));
    let (e, r) = bind_error(
        PACKED,
        [1, 2, 6, 8],
        [1, 2, 6, 8],
        [1, 2, 6, 8],
        vec![("doc", data)],
        0,
    );
    assert_eq!(
        e,
        BindError::BufferType {
            name: "doc".into(),
            declared: Type::Int,
            found: Type::Float
        }
    );
    assert!(
        r.contains("buffer `doc` is declared int but the data is float"),
        "{r}"
    );
    assert!(r.contains("int buffers take int32/int64 data"), "{r}");
}

#[test]
fn buffer_of_the_wrong_shape() {
    let (e, r) = bind_error(
        PACKED,
        [1, 2, 6, 8],
        [1, 2, 6, 8],
        [1, 2, 6, 8],
        vec![("doc", int_buffer(&[5]))],
        0,
    );
    assert!(
        matches!(&e, BindError::BufferShape { name, expected, found, .. } if name == "doc" && expected == &[6] && found == &[5]),
        "{e:?}"
    );
    assert!(
        r.contains("buffer `doc` has shape [5], but `doc[KV]` is [6] for these inputs"),
        "{r}"
    );
    assert!(r.contains("B=1, H=2, HKV=2, Q=6, KV=6, D=8"), "{r}");
    // The number of dimensions counts too.
    let (_, r) = bind_error(
        PACKED,
        [1, 2, 6, 8],
        [1, 2, 6, 8],
        [1, 2, 6, 8],
        vec![("doc", int_buffer(&[6, 1]))],
        0,
    );
    assert!(r.contains("has shape [6, 1], but `doc[KV]` is [6]"), "{r}");
    // Ceil-divided dimensions are computed from the inputs.
    let layout =
        "attention bs { buffer layout[Q / 4, KV / 4]: bool  mask = layout[q / 4, kv / 4] }";
    let data = BufferData::Bool(ArrayD::from_elem(IxDyn(&[1, 2]), true));
    let (_, r) = bind_error(
        layout,
        [1, 1, 6, 8],
        [1, 1, 9, 8],
        [1, 1, 9, 8],
        vec![("layout", data)],
        0,
    );
    assert!(
        r.contains("buffer `layout` has shape [1, 2], but `layout[Q / 4, KV / 4]` is [2, 3]"),
        "{r}"
    );
}

#[test]
fn head_dims_must_match() {
    let (e, r) = packed_shape_error([1, 2, 6, 8], [1, 2, 6, 4], [1, 2, 6, 4], 0);
    assert!(matches!(e, BindError::HeadDim { q: 8, kv: 4, .. }), "{e:?}");
    assert!(
        r.contains("q has D = 8 (shape [1, 2, 6, 8]), k and v have D = 4 (shape [1, 2, 6, 4])"),
        "{r}"
    );
    let (e, _) = packed_shape_error([1, 2, 6, 0], [1, 2, 6, 0], [1, 2, 6, 0], 0);
    assert_eq!(e, BindError::ZeroHeadDim);
}

#[test]
fn query_heads_must_be_a_multiple_of_kv_heads() {
    let (e, r) = packed_shape_error([1, 3, 6, 8], [1, 2, 6, 8], [1, 2, 6, 8], 0);
    assert_eq!(e, BindError::Heads { h: 3, hkv: 2 });
    assert!(
        r.contains("H = 3 query heads is not a multiple of HKV = 2 key/value heads"),
        "{r}"
    );
    assert!(r.contains("GQA/MQA"), "{r}");
}

#[test]
fn kv_batch_must_match_or_broadcast() {
    let (e, r) = packed_shape_error([2, 2, 6, 8], [3, 2, 6, 8], [3, 2, 6, 8], 0);
    assert_eq!(e, BindError::Batch { q: 2, kv: 3 });
    assert!(
        r.contains("batch differs: q has B = 2, k and v have B = 3"),
        "{r}"
    );
    assert!(r.contains("or 1 to broadcast"), "{r}");
}

#[test]
fn k_and_v_must_have_the_same_shape() {
    let (e, r) = packed_shape_error([1, 2, 6, 8], [1, 2, 6, 8], [1, 2, 5, 8], 0);
    assert!(matches!(e, BindError::KvShape { .. }), "{e:?}");
    assert!(r.contains("k is [1, 2, 6, 8], v is [1, 2, 5, 8]"), "{r}");
}

#[test]
fn query_offset_must_not_be_negative() {
    let (e, r) = packed_shape_error([1, 2, 6, 8], [1, 2, 6, 8], [1, 2, 6, 8], -1);
    assert_eq!(e, BindError::NegativeOffset(-1));
    assert!(r.contains("the query offset must be >= 0, found -1"), "{r}");
    assert!(r.contains("help:"), "{r}");
}

#[test]
fn positions_past_the_limit_are_refused() {
    let (e, r) = packed_shape_error(
        [1, 2, 6, 8],
        [1, 2, 6, 8],
        [1, 2, 6, 8],
        i32::MAX as i64 - 5,
    );
    assert_eq!(
        e,
        BindError::TooLarge {
            what: "the query end q_offset + Q",
            value: i32::MAX as u64 + 1,
        }
    );
    assert!(
        r.contains("the query end q_offset + Q is 2147483648, past the limit of 2147483647"),
        "{r}"
    );
    assert!(r.contains("help: shapes and positions"), "{r}");
    // The last position below the limit is accepted (a buffer indexed by
    // position would have to cover KV = q_offset + Q, so this spec has none).
    let program = load("attention c { mask = causal }", None, &[]).unwrap();
    let (q, k, v) = qkv([1, 2, 6, 8], [1, 2, 6, 8], [1, 2, 6, 8]);
    let inputs = Inputs::new(q.view(), k.view(), v.view()).q_offset(i32::MAX as i64 - 6);
    let bound = attnc::bind::bind(&program.spec, &inputs).unwrap();
    assert_eq!(bound.shapes().kv, i32::MAX as usize);
}

/// A spec with more errors than a diagnostic draws: all are kept, the first
/// `MAX_DRAWN_PROBLEMS` are drawn, and the summary says so.
#[test]
fn many_errors_draw_the_first_few() {
    let n = driver::MAX_DRAWN_PROBLEMS + 7;
    let mut text = String::from("attention a {\n");
    for i in 0..n {
        text += &format!("    let x{i} = unknown{i} + 1\n");
    }
    text += "    mask = causal\n}\n";
    let file = Arc::new(SourceFile::new("many.attn", text));
    let err = driver::check(&file).unwrap_err();
    let Error::Spec { problems, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(problems.len(), n);
    let rendered = err.render();
    assert!(
        rendered.contains(&format!(
            "`many.attn` has {n} errors (the first {} are shown)",
            driver::MAX_DRAWN_PROBLEMS
        )),
        "{rendered}"
    );
    assert_eq!(
        rendered.matches("unknown name `unknown").count(),
        driver::MAX_DRAWN_PROBLEMS,
        "{rendered}"
    );
}
