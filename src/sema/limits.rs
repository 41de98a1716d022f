//! The depth limit of checked expressions.
//!
//! Stage: sema. The parser bounds the nesting of each expression as written
//! (`syntax::MAX_NESTING`), but a `let` is substituted where it is used, so a
//! chain of `let`s that each use the previous one builds an expression as
//! deep as the chain is long. Every later stage, the evaluator included,
//! recurses over checked expressions; [`check_depth`] rejects any deeper than
//! [`MAX_DEPTH`] so that none of them can run out of stack.

use super::ir::{ExprId, Module};
use super::{Diag, Label};

/// The deepest a checked expression may be, counting the `let`s it uses.
pub const MAX_DEPTH: usize = 512;

/// One error per attention block that has an expression deeper than
/// [`MAX_DEPTH`], at the first expression that crosses the limit.
pub fn check_depth(module: &Module) -> Result<(), Vec<Diag>> {
    let mut diags = Vec::new();
    for spec in &module.specs {
        // Operands are created before the expressions that use them, so one
        // pass in creation order sees every operand's depth first.
        let mut depths = vec![0usize; spec.exprs.len()];
        for (i, e) in spec.exprs.iter().enumerate() {
            let depth = 1 + e
                .operands()
                .iter()
                .map(|o| depths[o.0 as usize])
                .max()
                .unwrap_or(0);
            depths[i] = depth;
            if depth > MAX_DEPTH {
                let mut d = Diag::error(
                    "attnc::sema::too_deep",
                    format!("expression is nested too deeply (more than {MAX_DEPTH} levels, counting the `let`s it uses)"),
                    Label::new(spec.span(ExprId(i as u32)), "nested too deeply here"),
                );
                d.with_help("each `let` is substituted where it is used, so `let`s that each use the previous one nest as deep as the chain is long; compute the value in fewer steps");
                diags.push(d);
                break;
            }
        }
    }
    if diags.is_empty() {
        Ok(())
    } else {
        Err(diags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn let_chain(n: usize) -> String {
        let mut src = String::from("attention a {\n    let x0 = q\n");
        for i in 1..n {
            src += &format!("    let x{i} = x{} + 1\n", i - 1);
        }
        src + &format!("    mask = x{} >= kv\n}}\n", n - 1)
    }

    fn check(src: &str) -> Result<Module, Vec<Diag>> {
        super::super::check(&crate::syntax::parse(src).unwrap())
    }

    #[test]
    fn let_chains_up_to_the_limit_check() {
        // `x0` is depth 1, each `+ 1` adds one, and the mask's `>=` one more.
        assert!(check(&let_chain(MAX_DEPTH - 1)).is_ok());
    }

    #[test]
    fn longer_let_chains_are_rejected_once() {
        let src = let_chain(MAX_DEPTH + 50);
        let diags = check(&src).unwrap_err();
        assert_eq!(diags.len(), 1, "{diags:?}");
        assert_eq!(diags[0].code, "attnc::sema::too_deep");
        // The label sits on the `let` where the limit is crossed.
        let span = diags[0].labels[0].span;
        assert_eq!(
            &src[span.start..span.end],
            format!("x{} + 1", MAX_DEPTH - 1)
        );
    }

    #[test]
    fn wide_graphs_are_not_deep() {
        // Each let uses the previous one twice: many paths, little depth.
        let mut src = String::from("attention a {\n    let x0 = kv\n");
        for i in 1..200 {
            src += &format!("    let x{i} = x{} + x{}\n", i - 1, i - 1);
        }
        src += "    mask = q >= x199\n}\n";
        assert!(check(&src).is_ok());
    }
}
