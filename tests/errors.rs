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
    insta::glob!("errors/*.attn", |path| {
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
    insta::glob!("errors/*.attn", |path| {
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
    insta::glob!("errors/*.attn", |path| {
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
