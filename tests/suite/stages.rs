//! Stage snapshots of every example: the AST text (`syntax::parse`, with
//! byte spans) and the checked text (`sema::check`, one line per live
//! expression with its type and dependences). Review the snapshots by
//! reading them: `causal` is expanded to `ge q, kv`, int operands of float
//! operations are converted with `call float`, and each `let` is marked
//! where it is defined.

use std::sync::Arc;

use attnc::driver::{self, SourceFile};

fn read(path: &std::path::Path) -> (String, String) {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    (name, std::fs::read_to_string(path).unwrap())
}

#[test]
fn ast() {
    insta::glob!("../../examples", "*.attn", |path| {
        let (name, text) = read(path);
        let ast = attnc::syntax::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        let printed = ast.to_string();
        // Every block of the file is printed.
        assert_eq!(
            printed.matches("attention ").count(),
            ast.attentions.len(),
            "{printed}"
        );
        insta::assert_snapshot!(printed);
    });
}

#[test]
fn checked() {
    insta::glob!("../../examples", "*.attn", |path| {
        let (name, text) = read(path);
        let file = Arc::new(SourceFile::new(name.clone(), text.clone()));
        let module = driver::check(&file).unwrap_or_else(|e| panic!("{}", e.render()));
        let printed = module.to_string();
        // The structural promises of the checked form, on every example.
        for spec in &module.specs {
            let shown = spec.to_string();
            assert!(
                shown.starts_with(&format!("spec {} {{", spec.name)),
                "{shown}"
            );
            assert!(
                shown.contains("    mask = ") && shown.contains("    score = "),
                "{shown}"
            );
            assert!(shown.contains("    scale = "), "{shown}");
        }
        let code: String = text
            .lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        if code
            .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
            .any(|w| w == "causal")
        {
            assert!(
                printed.contains("= ge e"),
                "{name}: `causal` not expanded to `ge q, kv`:\n{printed}"
            );
        }
        insta::assert_snapshot!(printed);
    });
}
