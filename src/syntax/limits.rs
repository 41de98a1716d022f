//! Nesting limits of the syntax stage.
//!
//! Stage: syntax. Every stage from the parser on recurses over expressions, so
//! an expression nested deeply enough would overflow the stack (an abort, not
//! even a panic). [`check_text`] runs on the source text before pest, whose
//! recursive descent (with the AST builder after it) takes several kilobytes
//! of stack per bracket level and about one per `else if`; it rejects
//! brackets nested deeper than [`MAX_BRACKETS`] and long `else if` chains.
//! [`check_depth`] runs on the AST the parser built,
//! where a chain `a || b || c` is as deep as it is long, and rejects
//! expressions deeper than [`MAX_NESTING`]. A rejected AST is taken apart
//! iteratively, since dropping it recursively could overflow the stack too.

use super::ast::{Expr, ExprKind, File, Function, ItemKind, Span};
use super::SyntaxError;

/// The deepest nesting of brackets (`(`, `[`, `{`, the block's own `{`
/// included) the parser accepts.
pub const MAX_BRACKETS: usize = 64;

/// The deepest expression the parser accepts, counting operators, calls,
/// indexing and `if`s.
pub const MAX_NESTING: usize = 256;

fn too_deep(at: Span, what: &str, limit: usize) -> SyntaxError {
    SyntaxError::new(
        at,
        format!("{what} nested too deeply (more than {limit} levels)"),
        "nested too deeply here",
    )
    .with_help("split the expression into `let`s, e.g. `let near = ...` then `mask = near && ...`")
}

/// Rejects, before pest sees them, the two constructs that make the parser
/// recurse: brackets (`(`, `[`, `{`) nested deeper than [`MAX_BRACKETS`],
/// and more than [`MAX_NESTING`] `else if`s in one item (a chain of them
/// nests without brackets). Items are told apart by their single `=`, which
/// cannot occur inside an expression. Comments are skipped; the bytes of
/// brackets, operators and ASCII words never occur inside multi-byte
/// characters, so scanning bytes is exact.
pub fn check_text(source: &str) -> Result<(), SyntaxError> {
    let bytes = source.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let (mut depth, mut else_ifs, mut after_else) = (0usize, 0usize, false);
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c == b'/' && bytes.get(i + 1) == Some(&b'/') {
            i += bytes[i..]
                .iter()
                .position(|&b| b == b'\n')
                .unwrap_or(bytes.len() - i);
            continue;
        }
        if word(c) {
            let len = bytes[i..]
                .iter()
                .position(|&b| !word(b))
                .unwrap_or(bytes.len() - i);
            let w = &bytes[i..i + len];
            if w == b"if" && after_else {
                else_ifs += 1;
                if else_ifs > MAX_NESTING {
                    return Err(too_deep(Span::new(i, i + 2), "expression is", MAX_NESTING));
                }
            }
            after_else = w == b"else";
            i += len;
            continue;
        }
        if !c.is_ascii_whitespace() {
            after_else = false;
        }
        match c {
            b'(' | b'[' | b'{' => {
                depth += 1;
                if depth > MAX_BRACKETS {
                    return Err(too_deep(Span::new(i, i + 1), "brackets are", MAX_BRACKETS));
                }
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            b'=' => {
                let prev = if i > 0 { bytes[i - 1] } else { 0 };
                if bytes.get(i + 1) != Some(&b'=') && !matches!(prev, b'=' | b'!' | b'<' | b'>') {
                    else_ifs = 0; // a new item
                }
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

fn children(e: &Expr) -> Vec<&Expr> {
    match &e.kind {
        ExprKind::Int(_) | ExprKind::Float(_) | ExprKind::Bool(_) | ExprKind::Name(_) => vec![],
        ExprKind::Unary(_, a) => vec![a],
        ExprKind::Binary(_, a, b) => vec![a, b],
        ExprKind::Index(_, args) | ExprKind::Call(_, args) => args.iter().collect(),
        ExprKind::If(c, a, b) => vec![c, b, a],
        ExprKind::Reduce(r) => vec![&r.lo, &r.hi, &r.body],
    }
}

/// The expressions of a function: its `let`s and its body.
fn function_exprs(f: &Function) -> impl Iterator<Item = &Expr> {
    f.lets
        .iter()
        .map(|(_, e)| e)
        .chain(std::iter::once(&f.body))
}

fn expressions(file: &File) -> impl Iterator<Item = &Expr> {
    let items = file.attentions.iter().flat_map(|a| &a.items).flat_map(
        |item| -> Box<dyn Iterator<Item = &Expr> + '_> {
            match &item.kind {
                ItemKind::Let { value, .. } => Box::new(std::iter::once(value)),
                ItemKind::Mask(e) | ItemKind::Score(e) | ItemKind::Scale(e) => {
                    Box::new(std::iter::once(e))
                }
                ItemKind::Fn(f) => Box::new(function_exprs(f)),
                ItemKind::Buffer { dims, .. } => Box::new(dims.iter()),
                ItemKind::Param { .. } => Box::new(std::iter::empty()),
            }
        },
    );
    file.functions.iter().flat_map(function_exprs).chain(items)
}

/// Returns `file` if no expression in it is nested deeper than
/// [`MAX_NESTING`]; otherwise an error at the first (leftmost, outermost)
/// node that is too deep. Iterative, so any depth is safe.
pub fn check_depth(file: File) -> Result<File, SyntaxError> {
    let mut too_deep_at = None;
    'outer: for root in expressions(&file) {
        let mut stack = vec![(root, 1usize)];
        while let Some((e, depth)) = stack.pop() {
            if depth > MAX_NESTING {
                too_deep_at = Some(e.span);
                break 'outer;
            }
            // Right to left, so the leftmost child is visited first.
            stack.extend(children(e).into_iter().rev().map(|c| (c, depth + 1)));
        }
    }
    match too_deep_at {
        None => Ok(file),
        Some(span) => {
            dismantle(file);
            Err(too_deep(
                Span::new(span.start, span.start),
                "expression is",
                MAX_NESTING,
            ))
        }
    }
}

/// Drops a file without recursion: every boxed child is moved onto a work
/// list before its parent is dropped.
fn dismantle(file: File) {
    let mut work: Vec<Expr> = Vec::new();
    let take = |f: Function, work: &mut Vec<Expr>| {
        work.extend(f.lets.into_iter().map(|(_, e)| e));
        work.push(f.body);
    };
    for f in file.functions {
        take(f, &mut work);
    }
    for attention in file.attentions {
        for item in attention.items {
            match item.kind {
                ItemKind::Let { value, .. } => work.push(value),
                ItemKind::Mask(e) | ItemKind::Score(e) | ItemKind::Scale(e) => work.push(e),
                ItemKind::Fn(f) => take(f, &mut work),
                ItemKind::Buffer { dims, .. } => work.extend(dims),
                ItemKind::Param { .. } => {}
            }
        }
    }
    while let Some(e) = work.pop() {
        match e.kind {
            ExprKind::Unary(_, a) => work.push(*a),
            ExprKind::Binary(_, a, b) => work.extend([*a, *b]),
            ExprKind::Index(_, args) | ExprKind::Call(_, args) => work.extend(args),
            ExprKind::If(c, a, b) => work.extend([*c, *a, *b]),
            ExprKind::Reduce(r) => {
                let r = *r;
                work.extend([r.lo, r.hi, r.body]);
            }
            ExprKind::Int(_) | ExprKind::Float(_) | ExprKind::Bool(_) | ExprKind::Name(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(src: &str) -> Result<File, SyntaxError> {
        super::super::parse(src)
    }

    #[test]
    fn brackets_at_the_limit_are_accepted_and_beyond_rejected() {
        // The block's `{` is one level, so MAX_BRACKETS - 1 parentheses fit.
        let n = MAX_BRACKETS - 1;
        assert!(parse(&format!(
            "attention a {{ mask = {}causal{} }}",
            "(".repeat(n),
            ")".repeat(n)
        ))
        .is_ok());
        let src = format!(
            "attention a {{ mask = {}causal{} }}",
            "(".repeat(n + 1),
            ")".repeat(n + 1)
        );
        let e = parse(&src).unwrap_err();
        assert_eq!(
            e.message,
            format!("brackets are nested too deeply (more than {MAX_BRACKETS} levels)")
        );
        // Points at the first parenthesis too many.
        assert_eq!(e.span.offset(), "attention a { mask = ".len() + n);
    }

    #[test]
    fn brackets_in_comments_do_not_count() {
        let src = format!("// {}\nattention a {{ mask = causal }}", "(".repeat(1000));
        assert!(parse(&src).is_ok());
    }

    #[test]
    fn operator_chains_count_their_length() {
        let ok = vec!["causal"; MAX_NESTING].join(" || ");
        assert!(parse(&format!("attention a {{ mask = {ok} }}")).is_ok());
        let long = vec!["causal"; MAX_NESTING + 1].join(" || ");
        let e = parse(&format!("attention a {{ mask = {long} }}")).unwrap_err();
        assert!(e.message.contains("nested too deeply"), "{e:?}");
        assert!(e.help.as_deref().unwrap_or("").contains("let"), "{e:?}");
    }

    #[test]
    fn else_if_chains_are_limited_before_parsing() {
        let chain = |n: usize, cond: &str| {
            format!(
                "if {cond} {{ true }}{}",
                format!(" else if {cond} {{ true }}").repeat(n - 1)
            )
        };
        // A chain of n `if`s is n + 2 levels deep (the comparison and its
        // operands sit under the last `if`).
        let ok = chain(MAX_NESTING - 2, "q == 0");
        assert!(parse(&format!("attention a {{ mask = {ok} else {{ causal }} }}")).is_ok());
        let long = chain(100_000, "q == 0");
        let e = parse(&format!(
            "attention a {{ mask = {long} else {{ causal }} }}"
        ))
        .unwrap_err();
        assert!(e.message.contains("nested too deeply"), "{e:?}");
        // The text check counts `else if`s per item, siblings included, and
        // reports at the first `if` too many (a two-byte label).
        for cond in ["q == 0", "q <= 0", "q >= 99", "q != q"] {
            let half = chain(MAX_NESTING / 2 + 2, cond);
            let src = format!("attention a {{ mask = (({half} else {{ causal }}) == ({half} else {{ causal }})) }}");
            let e = parse(&src).unwrap_err();
            assert_eq!(e.span.len(), 2, "{cond}: {e:?}");
            assert_eq!(&src[e.span.offset()..e.span.offset() + 2], "if");
            // Two items with half as many each are fine: a single `=` starts an item.
            let src = format!(
                "attention a {{ let x = {half} else {{ causal }}\n mask = {half} else {{ x }} }}"
            );
            assert!(parse(&src).is_ok(), "{cond}");
        }
        // `else` and `if` may be separated by a comment.
        let commented = format!(
            "if q == 0 {{ true }}{}",
            " else // c\n if q == 0 { true }".repeat(MAX_NESTING + 1)
        );
        let e = parse(&format!(
            "attention a {{ mask = {commented} else {{ causal }} }}"
        ))
        .unwrap_err();
        assert_eq!(e.span.len(), 2, "{e:?}");
        // Words that merely contain `else` or `if` do not count.
        let words = format!(
            "attention a {{ let elsewhere = 1\n let iffy = 2\n mask = {}causal }}",
            "elsewhere < iffy || ".repeat(200)
        );
        assert!(parse(&words).is_ok());
    }

    #[test]
    fn unary_and_if_chains_are_limited() {
        let nots = format!(
            "attention a {{ mask = {}causal }}",
            "!".repeat(MAX_NESTING * 4)
        );
        assert!(parse(&nots)
            .unwrap_err()
            .message
            .contains("nested too deeply"));
        let ifs = format!(
            "attention a {{ mask = {}{{ causal }} }}",
            "if q == 0 { true } else ".repeat(MAX_NESTING + 1)
        );
        let e = parse(&ifs).unwrap_err();
        assert!(e.message.contains("nested too deeply"), "{e:?}");
    }

    #[test]
    fn very_deep_trees_are_rejected_and_dropped_without_overflow() {
        // Far deeper than any stack could recurse over.
        let chain = vec!["q"; 20_000].join(" + ");
        let e = parse(&format!("attention a {{ mask = {chain} < kv }}")).unwrap_err();
        assert!(e.message.contains("nested too deeply"), "{e:?}");
        let nots = format!("attention a {{ mask = {}causal }}", "!".repeat(100_000));
        assert!(parse(&nots)
            .unwrap_err()
            .message
            .contains("nested too deeply"));
    }
}
