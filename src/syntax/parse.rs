//! The parser: source text to [`ast::File`](super::ast::File).
//!
//! Stage: syntax. Consumes the text of one `.attn` file, produces the AST or the
//! first syntax error. pest does the tokenising and the precedence layering
//! (see `grammar/attn.pest`); this module builds spanned AST nodes from the
//! pest pairs and turns pest's errors into [`SyntaxError`]s that speak the
//! user's words.

use pest::error::{ErrorVariant, InputLocation};
use pest::iterators::Pair;
use pest::Parser;

use super::ast::*;
use super::SyntaxError;

#[derive(pest_derive::Parser)]
#[grammar = "../grammar/attn.pest"]
struct AttnParser;

/// Parses a whole `.attn` file. A leading UTF-8 byte order mark is skipped.
pub fn parse(source: &str) -> Result<File, SyntaxError> {
    // The mark is three bytes, as are three spaces: spans stay byte offsets
    // into the text as written.
    let without_bom;
    let source = match source.strip_prefix('\u{feff}') {
        Some(rest) => {
            without_bom = format!("   {rest}");
            without_bom.as_str()
        }
        None => source,
    };
    // Track the literal tokens each failed attempt expected, for messages
    // like "expected `:`, found `=`" (a process-wide switch, only ever set on).
    pest::set_error_detail(true);
    let mut pairs = AttnParser::parse(Rule::file, source).map_err(|e| convert_error(source, e))?;
    let file = pairs
        .next()
        .expect("grammar: file rule always yields one pair");
    let mut attentions = Vec::new();
    let mut functions = Vec::new();
    for pair in file.into_inner() {
        match pair.as_rule() {
            Rule::attention => attentions.push(build_attention(pair)?),
            Rule::fn_item => functions.push(build_function(pair)?),
            Rule::EOI => {}
            r => unreachable!("grammar: unexpected {r:?} in file"),
        }
    }
    if attentions.is_empty() {
        return Err(SyntaxError::new(
            Span::new(0, source.len().min(1)),
            if functions.is_empty() {
                "expected an `attention` block, found an empty file"
            } else {
                "expected an `attention` block, found only functions"
            },
            "this file defines no attention block",
        )
        .with_help("a spec starts with `attention NAME { mask = ... }`"));
    }
    Ok(File {
        functions,
        attentions,
    })
}

fn build_function(pair: Pair<'_, Rule>) -> Result<Function, SyntaxError> {
    let span = span_of(&pair);
    let mut inner = pair.into_inner();
    inner.next(); // kw_fn
    let name = ident(inner.next().expect("grammar: fn name"));
    let mut args = Vec::new();
    let mut lets = Vec::new();
    let mut ret = None;
    let mut body = None;
    for p in inner {
        match p.as_rule() {
            Rule::fn_arg => {
                let mut a = p.into_inner();
                let arg = ident(a.next().expect("grammar: arg name"));
                args.push((arg, type_name(a.next().expect("grammar: arg type"))));
            }
            Rule::type_name => ret = Some(type_name(p)),
            Rule::let_item => {
                let mut l = p.into_inner();
                l.next(); // kw_let
                let name = ident(l.next().expect("grammar: let name"));
                lets.push((name, build_expr(l.next().expect("grammar: let value"))?));
            }
            Rule::expr => body = Some(build_expr(p)?),
            r => unreachable!("grammar: unexpected {r:?} in fn"),
        }
    }
    Ok(Function {
        name,
        args,
        ret: ret.expect("grammar: fn return type"),
        lets,
        body: body.expect("grammar: fn body"),
        span,
    })
}

/// The span of a pair without the whitespace and comments pest lets trail it.
/// The language has no string literals, so `//` always starts a comment.
fn span_of(pair: &Pair<'_, Rule>) -> Span {
    let s = pair.as_span();
    let mut text = pair.as_str();
    loop {
        text = text.trim_end();
        let line_start = text.rfind('\n').map_or(0, |i| i + 1);
        match text[line_start..].find("//") {
            Some(c) => text = &text[..line_start + c],
            None => break,
        }
    }
    Span::new(s.start(), s.start() + text.len())
}

fn ident(pair: Pair<'_, Rule>) -> Ident {
    debug_assert_eq!(pair.as_rule(), Rule::ident);
    Ident {
        name: pair.as_str().to_string(),
        span: span_of(&pair),
    }
}

fn build_attention(pair: Pair<'_, Rule>) -> Result<Attention, SyntaxError> {
    let span = span_of(&pair);
    let mut inner = pair.into_inner();
    inner.next(); // kw_attention
    let name = ident(inner.next().expect("grammar: attention name"));
    let items = inner.map(build_item).collect::<Result<Vec<_>, _>>()?;
    Ok(Attention { name, items, span })
}

fn build_item(pair: Pair<'_, Rule>) -> Result<Item, SyntaxError> {
    let span = span_of(&pair);
    let rule = pair.as_rule();
    if rule == Rule::fn_item {
        let kind = ItemKind::Fn(build_function(pair)?);
        return Ok(Item { kind, span });
    }
    let mut inner = pair.into_inner();
    inner.next(); // the keyword
    let kind = match rule {
        Rule::param_item => {
            let name = ident(inner.next().unwrap());
            let ty = type_name(inner.next().unwrap());
            let value = build_literal(inner.next().unwrap())?;
            ItemKind::Param { name, ty, value }
        }
        Rule::buffer_item => {
            let name = ident(inner.next().unwrap());
            let mut dims = Vec::new();
            let mut elem = None;
            for p in inner {
                match p.as_rule() {
                    Rule::dim => dims.push(build_expr(p.into_inner().next().unwrap())?),
                    Rule::type_name => elem = Some(type_name(p)),
                    r => unreachable!("grammar: unexpected {r:?} in buffer"),
                }
            }
            ItemKind::Buffer {
                name,
                dims,
                elem: elem.expect("grammar: buffer type"),
            }
        }
        Rule::let_item => {
            let name = ident(inner.next().unwrap());
            let value = build_expr(inner.next().unwrap())?;
            ItemKind::Let { name, value }
        }
        Rule::mask_item => ItemKind::Mask(build_expr(inner.next().unwrap())?),
        Rule::score_item => ItemKind::Score(build_expr(inner.next().unwrap())?),
        Rule::scale_item => ItemKind::Scale(build_expr(inner.next().unwrap())?),
        r => unreachable!("grammar: unexpected {r:?} as item"),
    };
    Ok(Item { kind, span })
}

fn type_name(pair: Pair<'_, Rule>) -> TypeName {
    let kind = match pair.as_str() {
        "int" => ScalarKind::Int,
        "float" => ScalarKind::Float,
        _ => ScalarKind::Bool,
    };
    TypeName {
        kind,
        span: span_of(&pair),
    }
}

fn parse_uint(pair: &Pair<'_, Rule>) -> Result<u64, SyntaxError> {
    let text: String = pair.as_str().chars().filter(|&c| c != '_').collect();
    let parsed = if let Some(hex) = text.strip_prefix("0x") {
        u64::from_str_radix(hex, 16)
    } else if let Some(bin) = text.strip_prefix("0b") {
        u64::from_str_radix(bin, 2)
    } else {
        text.parse::<u64>()
    };
    parsed.map_err(|_| {
        SyntaxError::new(
            span_of(pair),
            format!("integer literal `{}` is too large", pair.as_str()),
            "does not fit in 64 bits",
        )
        .with_help("ints range from -9223372036854775808 to 9223372036854775807")
    })
}

fn parse_int(pair: &Pair<'_, Rule>, negative: bool) -> Result<i64, SyntaxError> {
    let magnitude = parse_uint(pair)?;
    let limit = if negative {
        i64::MAX as u64 + 1
    } else {
        i64::MAX as u64
    };
    if magnitude > limit {
        return Err(SyntaxError::new(
            span_of(pair),
            format!("integer literal `{}` is too large", pair.as_str()),
            "ints are signed 64-bit",
        )
        .with_help("ints range from -9223372036854775808 to 9223372036854775807"));
    }
    Ok(if negative {
        (magnitude as i64).wrapping_neg()
    } else {
        magnitude as i64
    })
}

fn parse_float(pair: &Pair<'_, Rule>) -> Result<f64, SyntaxError> {
    let v: f64 = pair.as_str().parse().expect("grammar: float literal");
    if !v.is_finite() || v.abs() > f64::from(f32::MAX) {
        return Err(SyntaxError::new(
            span_of(pair),
            format!("float literal `{}` is out of range", pair.as_str()),
            "beyond the largest f32, about 3.4e38",
        )
        .with_help("the compiled backends compute in f32, where this literal would be infinite; write a smaller number (an infinity meant as such is written `1.0 / 0.0`)"));
    }
    Ok(v)
}

fn build_literal(pair: Pair<'_, Rule>) -> Result<Literal, SyntaxError> {
    let span = span_of(&pair);
    let mut negative = false;
    let mut value = None;
    for p in pair.into_inner() {
        match p.as_rule() {
            Rule::neg => negative = true,
            Rule::uint => value = Some(LitValue::Int(parse_int(&p, negative)?)),
            Rule::float => {
                let v = parse_float(&p)?;
                value = Some(LitValue::Float(if negative { -v } else { v }));
            }
            Rule::bool_lit => value = Some(LitValue::Bool(p.as_str() == "true")),
            r => unreachable!("grammar: unexpected {r:?} in literal"),
        }
    }
    Ok(Literal {
        value: value.expect("grammar: literal value"),
        span,
    })
}

fn binary_op(pair: &Pair<'_, Rule>) -> BinaryOp {
    match pair.as_str() {
        "||" => BinaryOp::Or,
        "&&" => BinaryOp::And,
        "==" => BinaryOp::Eq,
        "!=" => BinaryOp::Ne,
        "<" => BinaryOp::Lt,
        "<=" => BinaryOp::Le,
        ">" => BinaryOp::Gt,
        ">=" => BinaryOp::Ge,
        "+" => BinaryOp::Add,
        "-" => BinaryOp::Sub,
        "*" => BinaryOp::Mul,
        "/" => BinaryOp::Div,
        "%" => BinaryOp::Rem,
        "|" => BinaryOp::BitOr,
        "^" => BinaryOp::BitXor,
        "&" => BinaryOp::BitAnd,
        "<<" => BinaryOp::Shl,
        ">>" => BinaryOp::Shr,
        s => unreachable!("grammar: unknown operator {s}"),
    }
}

fn build_expr(pair: Pair<'_, Rule>) -> Result<Expr, SyntaxError> {
    let span = span_of(&pair);
    match pair.as_rule() {
        Rule::expr | Rule::paren => build_expr(pair.into_inner().next().unwrap()),
        Rule::or_expr
        | Rule::and_expr
        | Rule::cmp_expr
        | Rule::bor_expr
        | Rule::bxor_expr
        | Rule::band_expr
        | Rule::shift_expr
        | Rule::add_expr
        | Rule::mul_expr => {
            let is_cmp = pair.as_rule() == Rule::cmp_expr;
            let mut inner = pair.into_inner();
            let mut lhs = build_expr(inner.next().unwrap())?;
            while let Some(op_pair) = inner.next() {
                let op = binary_op(&op_pair);
                let rhs = build_expr(inner.next().unwrap())?;
                if is_cmp {
                    if let ExprKind::Binary(prev, _, _) = &lhs.kind {
                        if prev.is_comparison() && lhs.span.start == span.start {
                            return Err(SyntaxError::new(
                                span_of(&op_pair),
                                format!(
                                    "comparison operators cannot be chained: found `{}` after `{}`",
                                    op.symbol(),
                                    prev.symbol()
                                ),
                                "second comparison",
                            )
                            .with_help("split it with `&&`, e.g. `a < b && b < c`"));
                        }
                    }
                }
                let s = lhs.span.to(rhs.span);
                lhs = Expr {
                    kind: ExprKind::Binary(op, Box::new(lhs), Box::new(rhs)),
                    span: s,
                };
            }
            Ok(lhs)
        }
        Rule::unary => {
            let mut ops = Vec::new();
            let mut operand = None;
            for p in pair.into_inner() {
                if p.as_rule() == Rule::unary_op {
                    let op = match p.as_str() {
                        "-" => UnaryOp::Neg,
                        "~" => UnaryOp::BitNot,
                        _ => UnaryOp::Not,
                    };
                    ops.push((op, span_of(&p)));
                } else {
                    operand = Some(build_expr(p)?);
                }
            }
            let mut e = operand.expect("grammar: unary operand");
            for (op, op_span) in ops.into_iter().rev() {
                // Fold `-LITERAL` into the literal so `-9223372036854775808` works.
                if op == UnaryOp::Neg {
                    if let ExprKind::Float(x) = e.kind {
                        e = Expr {
                            kind: ExprKind::Float(-x),
                            span: op_span.to(e.span),
                        };
                        continue;
                    }
                }
                e = Expr {
                    kind: ExprKind::Unary(op, Box::new(e)),
                    span: op_span.to(span),
                };
            }
            Ok(e)
        }
        Rule::uint => Ok(Expr {
            kind: ExprKind::Int(parse_int(&pair, false)?),
            span,
        }),
        Rule::float => Ok(Expr {
            kind: ExprKind::Float(parse_float(&pair)?),
            span,
        }),
        Rule::bool_lit => Ok(Expr {
            kind: ExprKind::Bool(pair.as_str() == "true"),
            span,
        }),
        Rule::ident => Ok(Expr {
            kind: ExprKind::Name(ident(pair)),
            span,
        }),
        Rule::call | Rule::index => {
            let is_call = pair.as_rule() == Rule::call;
            let mut inner = pair.into_inner();
            // `callee` / `indexed`: the name and its opening bracket.
            let name = ident(inner.next().unwrap().into_inner().next().unwrap());
            let args = inner.map(build_expr).collect::<Result<Vec<_>, _>>()?;
            let kind = if is_call {
                ExprKind::Call(name, args)
            } else {
                ExprKind::Index(name, args)
            };
            Ok(Expr { kind, span })
        }
        Rule::reduce => {
            let mut inner = pair.into_inner();
            // `reduce_head`: the reduction's name and its `(`.
            let op_pair = inner.next().unwrap().into_inner().next().unwrap();
            let op = match op_pair.as_str() {
                "sum" => ReduceOp::Sum,
                "any" => ReduceOp::Any,
                "all" => ReduceOp::All,
                "max" => ReduceOp::Max,
                _ => ReduceOp::Min,
            };
            let var = ident(inner.next().unwrap());
            inner.next(); // kw_in
            let lo = build_expr(inner.next().unwrap())?;
            let hi = build_expr(inner.next().unwrap())?;
            let body = build_expr(inner.next().unwrap())?;
            Ok(Expr {
                kind: ExprKind::Reduce(Box::new(Reduce {
                    op,
                    var,
                    lo,
                    hi,
                    body,
                })),
                span,
            })
        }
        Rule::if_expr => {
            let mut inner = pair.into_inner();
            inner.next(); // kw_if
            let cond = build_expr(inner.next().unwrap())?;
            let then = build_expr(inner.next().unwrap())?;
            inner.next(); // kw_else
            let otherwise = build_expr(inner.next().unwrap())?;
            Ok(Expr {
                kind: ExprKind::If(Box::new(cond), Box::new(then), Box::new(otherwise)),
                span,
            })
        }
        r => unreachable!("grammar: unexpected {r:?} in expression"),
    }
}

/// How an expected item is named when it is the only thing expected.
const AN_ITEM: &str = "an item (`fn`, `param`, `buffer`, `let`, `mask`, `score` or `scale`)";

/// The words users know for each grammar rule pest may say it expected.
fn rule_name(rule: &Rule) -> Option<&'static str> {
    Some(match rule {
        Rule::attention | Rule::kw_attention => "`attention`",
        Rule::fn_arg => "an argument (`NAME: TYPE`)",
        Rule::ident => "a name",
        Rule::type_name => "a type (`int`, `float` or `bool`)",
        Rule::literal => "a literal",
        Rule::dim => {
            "a dimension (an int expression of literals, params and shapes, e.g. `KV / 64`)"
        }
        Rule::expr
        | Rule::or_expr
        | Rule::and_expr
        | Rule::cmp_expr
        | Rule::bor_expr
        | Rule::bxor_expr
        | Rule::band_expr
        | Rule::shift_expr
        | Rule::add_expr
        | Rule::mul_expr
        | Rule::unary
        | Rule::paren
        | Rule::call
        | Rule::callee
        | Rule::index
        | Rule::indexed
        | Rule::reduce_head
        | Rule::if_expr => "an expression",
        Rule::float | Rule::uint => "a number",
        Rule::bool_lit => "`true` or `false`",
        Rule::op_or
        | Rule::op_and
        | Rule::cmp_op
        | Rule::op_bor
        | Rule::op_bxor
        | Rule::op_band
        | Rule::shift_op
        | Rule::add_op
        | Rule::mul_op => "an operator",
        Rule::unary_op => "an expression",
        Rule::kw_fn
        | Rule::fn_item
        | Rule::kw_param
        | Rule::kw_buffer
        | Rule::kw_let
        | Rule::kw_mask
        | Rule::kw_score
        | Rule::kw_scale
        | Rule::param_item
        | Rule::buffer_item
        | Rule::let_item
        | Rule::mask_item
        | Rule::score_item
        | Rule::scale_item => AN_ITEM,
        Rule::kw_if => "`if`",
        Rule::kw_else => "`else`",
        Rule::neg => "`-`",
        Rule::EOI => "end of file",
        _ => return None,
    })
}

/// Punctuation that closes or separates constructs. pest reports these
/// literal tokens only through its parse attempts, not as rules.
const STRUCTURAL: [&str; 7] = [":", "=", ",", "{", "]", ")", "}"];

/// The words for a literal token pest expected, when its rules say nothing
/// better (see [`convert_error`]).
fn token_name(token: &str) -> Option<&'static str> {
    Some(match token {
        "fn" | "param" | "buffer" | "let" | "mask" | "score" | "scale" => AN_ITEM,
        "else" => "`else`",
        "if" | "true" | "false" | "!" | "~" | "(" => "an expression",
        "+" | "-" | "*" | "%" | "<" | "<=" | ">" | ">=" | "==" | "!=" | "&&" | "||" | "|" | "^"
        | "&" | "<<" | ">>" => "an operator",
        "/" => "`/`",
        ":" => "`:`",
        "=" => "`=`",
        "," => "`,`",
        "{" => "`{`",
        "[" => "`[`",
        "]" => "`]`",
        ")" => "`)`",
        "}" => "`}`",
        _ => return None,
    })
}

/// Describes the text at `pos` for "found ..." messages, and its span.
fn found_at(source: &str, pos: usize) -> (String, Span) {
    let rest = &source[pos..];
    let Some(c) = rest.chars().next() else {
        return ("end of file".to_string(), Span::new(pos, pos));
    };
    let len = if c.is_ascii_digit() {
        // A number, with its fraction (`2.0`, `1.5e3`).
        rest.find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_' || ch == '.'))
            .unwrap_or(rest.len())
    } else if c.is_ascii_alphanumeric() || c == '_' {
        rest.find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
            .unwrap_or(rest.len())
    } else {
        const OPS: [&str; 8] = ["&&", "||", "==", "!=", "<=", ">=", "//", "->"];
        OPS.iter()
            .find(|op| rest.starts_with(**op))
            .map(|op| op.len())
            .unwrap_or(c.len_utf8())
    };
    (
        format!("`{}`", escaped(&rest[..len])),
        Span::new(pos, pos + len),
    )
}

/// `text` with control and invisible characters escaped (`\0`, `\u{feff}`),
/// so that a message shows what it is about.
pub(crate) fn escaped(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\'' | '"' | '\\' => c.to_string(),
            c => c.escape_debug().to_string(),
        })
        .collect()
}

/// The source before `pos` without trailing whitespace and comments.
fn text_before(source: &str, pos: usize) -> &str {
    let mut text = &source[..pos];
    loop {
        text = text.trim_end();
        let line_start = text.rfind('\n').map_or(0, |i| i + 1);
        match text[line_start..].find("//") {
            Some(c) => text = &text[..line_start + c],
            None => return text,
        }
    }
}

/// Joins alternatives as `a, b or c`.
fn one_of(mut names: Vec<&str>) -> String {
    match names.len() {
        0 => "something else".to_string(),
        1 => names[0].to_string(),
        _ => {
            let last = names.pop().unwrap();
            format!("{} or {}", names.join(", "), last)
        }
    }
}

fn convert_error(source: &str, err: pest::error::Error<Rule>) -> SyntaxError {
    let mut pos = match err.location {
        InputLocation::Pos(p) => p,
        InputLocation::Span((s, _)) => s,
    };
    if let Some(e) = malformed_number(source, pos) {
        return e;
    }
    let mut names: Vec<&str> = Vec::new();
    if let ErrorVariant::ParsingError { positives, .. } = &err.variant {
        for r in positives {
            if let Some(n) = rule_name(r) {
                if !names.contains(&n) {
                    names.push(n);
                }
            }
        }
    }
    // pest's rule positives only name rules; the parse attempts also know
    // the literal tokens (`:`, `}`, ...) and the furthest position reached,
    // which is where the mistake is.
    if let Some(attempts) = err.parse_attempts() {
        let tokens: Vec<String> = attempts
            .expected_tokens()
            .iter()
            .map(|t| t.to_string())
            .collect();
        if attempts.max_position > pos && attempts.max_position <= source.len() {
            let further: Vec<&str> = tokens.iter().filter_map(|t| token_name(t)).collect();
            if !further.is_empty() {
                pos = attempts.max_position;
                names.clear();
                for n in further {
                    if !names.contains(&n) {
                        names.push(n);
                    }
                }
            }
        } else if attempts.max_position == pos {
            for t in STRUCTURAL {
                if tokens.iter().any(|x| x == t) {
                    let n = token_name(t).unwrap();
                    if !names.contains(&n) {
                        names.push(n);
                    }
                }
            }
        }
    }
    // Closers read best last: "an operator, the next item or `}`".
    names.sort_by_key(|n| matches!(*n, "`]`" | "`)`" | "`}`"));
    let raw_names = names.clone();
    if names.len() > 2 {
        for n in names.iter_mut() {
            if *n == AN_ITEM {
                *n = "the next item";
            }
        }
    }
    let expected = one_of(names.clone());
    let (found, mut span) = found_at(source, pos);
    // pest names nothing, or items a block would take, where a file's next
    // word is not a block or a function.
    let top_level_words = [AN_ITEM, "`attention`", "end of file"];
    if raw_names.iter().all(|n| top_level_words.contains(n)) && at_top_level(source, pos) {
        let word = found.trim_matches('`');
        let help = if token_name(word) == Some(AN_ITEM) && word != "fn" {
            format!("`{word} ...` is an item of an attention block: write it inside `attention NAME {{ ... }}`")
        } else if word.eq_ignore_ascii_case("attention") || word == "attn" {
            "an attention block starts with the keyword `attention` (lower case): `attention NAME { ... }`".to_string()
        } else {
            "a file holds attention blocks (`attention NAME { ... }`) and the functions they share (`fn NAME(ARG: TYPE) -> TYPE { ... }`)".to_string()
        };
        return SyntaxError::new(
            span,
            format!("expected `attention` or `fn`, found {found}"),
            "expected an attention block or a function here",
        )
        .with_help(help);
    }
    let mut label = format!("expected {expected} here");
    let before = text_before(source, pos);
    // Something missing at the end of a line is reported after the last token,
    // not at the start of the next line; nothing can be underlined at the end
    // of the file either. (A wrong item at the start of a line is its own culprit.)
    let missing_at_line_end =
        source[before.len()..pos].contains('\n') && !raw_names.contains(&AN_ITEM);
    if found == "end of file" || missing_at_line_end {
        if let Some(c) = before.chars().next_back() {
            span = Span::new(before.len() - c.len_utf8(), before.len());
            label = format!("expected {expected} after this");
        }
    }
    let mut e = SyntaxError::new(span, format!("expected {expected}, found {found}"), label);
    if let Some(help) = syntax_hint(source, pos, &found, &raw_names) {
        e = e.with_help(help);
    }
    e
}

/// Whether `pos` is outside every `{ ... }` (comments skipped): where a
/// file expects an attention block or a function.
fn at_top_level(source: &str, pos: usize) -> bool {
    let mut depth = 0i64;
    for (_, c) in code_before(source, pos) {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ => {}
        }
    }
    depth <= 0
}

/// The characters of `source` before `pos` and their offsets, comments
/// (`//` to the end of a line) left out.
fn code_before(source: &str, pos: usize) -> impl Iterator<Item = (usize, char)> + '_ {
    let mut start = 0;
    source[..pos].split('\n').flat_map(move |line| {
        let offset = start;
        start += line.len() + 1;
        let code = line.find("//").map_or(line, |c| &line[..c]);
        code.char_indices().map(move |(i, c)| (offset + i, c))
    })
}

/// Whether `word` is a number the grammar reads: a decimal, `0x` or `0b`
/// int (with `_` separators after the first digit), or a float with a
/// fraction or an exponent.
fn is_number(word: &str) -> bool {
    let digits = |s: &str, ok: fn(char) -> bool| {
        s.chars().next().is_some_and(ok) && s.chars().all(|c| ok(c) || c == '_')
    };
    if let Some(hex) = word.strip_prefix("0x") {
        return digits(hex, |c| c.is_ascii_hexdigit());
    }
    if let Some(bin) = word.strip_prefix("0b") {
        return digits(bin, |c| c == '0' || c == '1');
    }
    if digits(word, |c| c.is_ascii_digit()) {
        return true;
    }
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (mantissa, exponent) = match word.find(['e', 'E']) {
        Some(i) => (&word[..i], Some(&word[i + 1..])),
        None => (word, None),
    };
    let mantissa_ok = match mantissa.split_once('.') {
        Some((int, frac)) => all_digits(int) && all_digits(frac),
        None => all_digits(mantissa) && exponent.is_some(),
    };
    let exponent_ok = exponent.is_none_or(|e| all_digits(e.strip_prefix(['+', '-']).unwrap_or(e)));
    mantissa_ok && exponent_ok
}

/// A word that starts with a digit, touches `pos` and is not a number the
/// grammar reads (`1e`, `1e+`, `1.5f`, `2x`, `1.`): an error about the
/// number, where pest would name the character after it.
fn malformed_number(source: &str, pos: usize) -> Option<SyntaxError> {
    let bytes = source.as_bytes();
    let word_byte = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'.';
    // `+`/`-` belong to the word right after the `e` of an exponent.
    let sign_in_word = |i: usize| {
        (bytes[i] == b'+' || bytes[i] == b'-')
            && i >= 2
            && matches!(bytes[i - 1], b'e' | b'E')
            && (bytes[i - 2].is_ascii_digit() || bytes[i - 2] == b'.')
    };
    let mut start = pos.min(bytes.len());
    while start > 0 && (word_byte(bytes[start - 1]) || sign_in_word(start - 1)) {
        start -= 1;
    }
    if !bytes.get(start).is_some_and(u8::is_ascii_digit) {
        return None;
    }
    let mut end = start;
    while end < bytes.len() && (word_byte(bytes[end]) || sign_in_word(end)) {
        end += 1;
    }
    let word = &source[start..end];
    // `0..4` is a reduction's range; a word after a declaration keyword is
    // a name (`let 2x = ...`), which other messages explain.
    let previous = text_before(source, start)
        .rsplit(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .next()
        .unwrap_or("");
    let declares = ["let", "param", "buffer", "fn", "attention"].contains(&previous);
    if end < pos || is_number(word) || word.contains("..") || declares {
        return None;
    }
    let mantissa = word.trim_end_matches(['e', 'E', '+', '-']);
    let help = if word.ends_with(['e', 'E', '+', '-']) && is_number(mantissa) {
        "the exponent of a number needs digits: `1e5`, `2.5e-3`"
    } else if matches!(word.get(..2), Some("0x" | "0b")) {
        "a `0x` (hex) or `0b` (binary) number needs digits of its base after the prefix: `0xff`, `0b101`"
    } else if word.ends_with('.') || word.contains(".e") {
        "a `.` in a number needs digits on both sides: `1.0`, `0.5`"
    } else {
        "a number cannot run into letters: put an operator between them (`2 * x`); there are no type suffixes (write `1.5`, not `1.5f`)"
    };
    Some(
        SyntaxError::new(
            Span::new(start, end),
            format!("malformed number `{}`", escaped(word)),
            "not a number",
        )
        .with_help(help),
    )
}

/// Targeted advice for common slips.
/// The `(` or `[` at `pos`, or the innermost one still open at a `,` at
/// `pos`, when it starts its line right after a name that ends the line before:
/// the grammar reads a call's `(` and a read's `[` only on the name's line,
/// so `max` then `(q, kv)` on the next line is a name and a parenthesis.
fn bracket_on_next_line(source: &str, pos: usize) -> Option<String> {
    let mut open = Vec::new();
    for (i, c) in code_before(source, pos) {
        match c {
            '(' | '[' => open.push(i),
            ')' | ']' => {
                open.pop();
            }
            _ => {}
        }
    }
    // The bracket itself, where the error is (nothing may follow the line
    // before's expression there), or a `,` right inside it (arguments meant
    // for a call); an error elsewhere inside has its own cause and hint.
    let at = match source[pos..].chars().next() {
        Some('(' | '[') => pos,
        Some(',') => *open.last()?,
        _ => return None,
    };
    let line_start = source[..at].rfind('\n').map_or(0, |i| i + 1);
    if !source[line_start..at].trim().is_empty() {
        return None;
    }
    let before = text_before(source, at);
    let name = before
        .rsplit(|c: char| !(c.is_alphanumeric() || c == '_'))
        .next()
        .filter(|w| w.starts_with(|c: char| c.is_alphabetic() || c == '_'))?;
    if token_name(name).is_some() {
        return None;
    }
    Some(if source[at..].starts_with('(') {
        format!("`{name}` ends the line before, so this `(` starts an expression of its own: a call's `(` goes on the name's line (`{name}(...)`)")
    } else {
        format!("`{name}` ends the line before, and a buffer read's `[` goes on the name's line (`{name}[...]`)")
    })
}

fn syntax_hint(source: &str, pos: usize, found: &str, expected: &[&str]) -> Option<String> {
    let rest = &source[pos..];
    let before = text_before(source, pos);
    let expects = |what: &str| expected.contains(&what);
    if let Some(c) = rest
        .chars()
        .next()
        .filter(|c| escaped(&c.to_string()).chars().count() > 1)
    {
        return Some(format!(
            "{found} is an invisible or control character (U+{:04X}) that does not belong here; delete it",
            c as u32
        ));
    }
    if let Some(hint) = bracket_on_next_line(source, pos) {
        return Some(hint);
    }
    if found == "end of file" && expects("`}`") {
        return Some("close the attention block with `}`".to_string());
    }
    if rest.starts_with('=') && !rest.starts_with("==") {
        if expects("`:`") {
            return Some("a param is declared `param NAME: int|float|bool = VALUE`".to_string());
        }
        if before.ends_with("mask") || before.ends_with("score") || before.ends_with("scale") {
            return None;
        }
        return Some("to compare values use `==`".to_string());
    }
    // What users type from other languages.
    if rest.starts_with("**") {
        return Some(
            "there is no power operator `**`: write `pow(x, y)`, or `x * x` for a square"
                .to_string(),
        );
    }
    let word = |w: &str| {
        rest.starts_with(w)
            && !rest[w.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '_')
    };
    if word("and") {
        return Some("logical and is written `&&`".to_string());
    }
    if word("or") {
        return Some("logical or is written `||`".to_string());
    }
    let last_word = before
        .rsplit(|c: char| !(c.is_alphanumeric() || c == '_'))
        .next()
        .unwrap_or("");
    if last_word == "not" {
        return Some("logical not is written `!`, e.g. `!causal`".to_string());
    }
    if rest.starts_with(';') {
        return Some("items end at the end of the line: remove the `;`".to_string());
    }
    if expects("a name") {
        if let "`attention`" | "`fn`" | "`param`" | "`buffer`" | "`let`" | "`if`" | "`else`"
        | "`true`" | "`false`" = found
        {
            return Some(format!("{found} is a keyword and cannot be used as a name"));
        }
        if before.ends_with("attention") {
            return Some("name the block: `attention NAME { ... }`".to_string());
        }
    }
    if expects("`else`") {
        return Some(
            "`if` is an expression and always needs an `else`: `if COND { A } else { B }`"
                .to_string(),
        );
    }
    if rest.starts_with("else") || rest.starts_with('?') {
        return Some("conditionals are written `if COND { A } else { B }`".to_string());
    }
    if expects("`:`")
        && before
            .rsplit(|c: char| c.is_whitespace())
            .nth(1)
            .is_some_and(|w| w.starts_with("param"))
    {
        return Some("a param is declared `param NAME: int|float|bool = VALUE`".to_string());
    }
    if expects("`:`")
        && before
            .rsplit('(')
            .next()
            .is_some_and(|inner| inner.contains(" in ") && inner.contains(".."))
    {
        return Some(
            "a reduction is written `OP(i in LO..HI: EXPR)`, e.g. `any(i in 0..top_k: t[i] == kv)`"
                .to_string(),
        );
    }
    if expects("`:`") && before.ends_with(']') {
        return Some("a buffer is declared `buffer NAME[DIM, ...]: int|float|bool`".to_string());
    }
    if expects("`]`") && expects("`,`") {
        let line = &before[before.rfind('\n').map_or(0, |i| i + 1)..];
        let in_dims = line.trim_start().starts_with("buffer") && !line.contains('=');
        return Some(if expects("an operator") && !in_dims {
            "separate the indices with `,` and close them with `]`, e.g. `layout[q / 64, kv / 64]`"
        } else {
            "close the dimensions with `]`, e.g. `buffer doc[KV]: int`"
        }
        .to_string());
    }
    if expects("`)`") && expects("`,`") {
        return Some("separate the arguments with `,` and close the call with `)`, e.g. `clamp(x, -1.0, 1.0)`".to_string());
    }
    if expects("`{`") {
        let last_line = &before[before.rfind('\n').map_or(0, |i| i + 1)..];
        let words: Vec<&str> = last_line.split_whitespace().collect();
        if words.len() == 2 && words[0] == "attention" {
            return Some("a block is written `attention NAME { ... }`".to_string());
        }
        if words.contains(&"if") || words.contains(&"else") {
            return Some("conditionals are written `if COND { A } else { B }`".to_string());
        }
    }
    if expects(AN_ITEM)
        && found.starts_with('`')
        && found[1..].starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
    {
        let name = found.trim_matches('`');
        return Some(format!(
            "every item starts with `param`, `buffer`, `let`, `mask`, `score` or `scale`; to name a value write `let {name} = ...`"
        ));
    }
    if expects("an expression") && expected.len() == 1 {
        const OPS: [&str; 21] = [
            "||", "&&", "==", "!=", "<=", ">=", "<<", ">>", "<", ">", "+", "-", "*", "/", "%", "!",
            "=", "|", "^", "&", "~",
        ];
        if let Some(op) = OPS.iter().find(|op| before.ends_with(**op)) {
            return Some(if *op == "=" {
                "write an expression after `=`, e.g. `mask = q >= kv`".to_string()
            } else {
                format!("`{op}` needs an operand after it")
            });
        }
        return Some("an expression is a number, a name, `buf[i]`, `f(x)`, `(...)` or `if C { A } else { B }`".to_string());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(src: &str) -> String {
        parse(src).unwrap().to_string()
    }

    /// `is_number` agrees with the grammar's literals: every word it
    /// accepts parses as a score, and none it refuses does.
    #[test]
    fn malformed_numbers_are_named_and_numbers_are_not() {
        for word in [
            "1",
            "1_000",
            "0x5555_5555",
            "0b1010",
            "1.5",
            "2.5e-3",
            "1e5",
            "1E+5",
            "3.0e2",
        ] {
            assert!(is_number(word), "{word}");
            parse(&format!("attention a {{ score = score * {word} }}")).unwrap();
        }
        for (word, help) in [
            ("1e", "exponent"),
            ("1e+", "exponent"),
            ("2.5E-", "exponent"),
            ("1.5f", "letters"),
            ("2x", "letters"),
            ("1e5x", "letters"),
            ("1.", "digits on both sides"),
            ("1.e5", "digits on both sides"),
            ("0x", "after the prefix"),
            ("0b2", "after the prefix"),
        ] {
            assert!(!is_number(word), "{word}");
            for src in [
                format!("attention a {{ score = score * {word} }}"),
                format!("attention a {{\n    score = score * {word}\n}}\n"),
            ] {
                let err = parse(&src).expect_err(word);
                assert_eq!(err.message, format!("malformed number `{word}`"), "{src}");
                assert!(
                    err.help.as_deref().unwrap_or("").contains(help),
                    "{src}: {err:?}"
                );
            }
        }
        // A number followed by another is not malformed: the operator is missing.
        let err = parse("attention a { score = score * 2 3 }").unwrap_err();
        assert!(
            err.message.starts_with("expected an operator"),
            "{}",
            err.message
        );
        // A reduction's range is not a number, nor is a name after `let`.
        for src in [
            "attention a { mask = any(i in 0..4) }",
            "attention a { score = sum(i in 0..KV, score) }",
        ] {
            let err = parse(src).unwrap_err();
            assert!(!err.message.contains("malformed"), "{src}: {}", err.message);
            assert!(
                err.help
                    .as_deref()
                    .unwrap_or("")
                    .contains("OP(i in LO..HI: EXPR)"),
                "{src}: {err:?}"
            );
        }
        let err = parse("attention a { let 2x = 1 mask = causal }").unwrap_err();
        assert!(!err.message.contains("malformed"), "{}", err.message);
    }

    /// A call's `(`, a reduction's `(` and a read's `[` follow the name on
    /// its line: on the next line they start an expression of their own (the
    /// value of a function after its `let`s), and where that expression does
    /// not belong the hint says why.
    #[test]
    fn brackets_on_the_next_line_start_an_expression() {
        let block = "\nattention a { mask = causal }";
        // The value on the line after a `let`; and, on the name's line,
        // spaces between the name and its bracket.
        for (body, parsed) in [
            (
                "{\n    let a = x\n    (a + 1) * 2\n}",
                "{ let a = x; (* (+ a 1) 2) }",
            ),
            (
                "{ max (x, 2) + sum (i in 0..2: i) }",
                "{ (+ max(x, 2) (sum i 0 2 i)) }",
            ),
        ] {
            let file = parse(&format!("fn f(x: int) -> int {body}{block}")).unwrap();
            assert_eq!(
                file.functions[0].to_string(),
                format!("f(x: int) -> int {parsed}")
            );
        }
        for (src, name, bracket) in [
            ("attention a {\n  mask = max\n  (q, kv) > 0\n}", "max", '('),
            ("attention a {\n  let a = kv\n  (a + 1) > 2\n}", "kv", '('),
            (
                "attention a {\n  buffer w[KV]: float\n  score = score + w\n    [kv]\n}",
                "w",
                '[',
            ),
            (
                "attention a {\n  score = sum\n (i in 0..2: score)\n}",
                "sum",
                '(',
            ),
        ] {
            let err = parse(src).expect_err(src);
            let help = err.help.unwrap_or_default();
            assert!(
                help.contains(&format!("`{name}` ends the line before"))
                    && help.contains(&format!("`{bracket}` goes on the name's line")),
                "{src}: {help}"
            );
        }
        // Not for a parenthesis that follows an operator, nor for a mistake
        // of its own inside a parenthesis that may start a line (a function's
        // value after its `let`s): that mistake keeps its hint.
        let err = parse("attention a {\n  mask = q >\n  (kv, 1)\n}").unwrap_err();
        assert!(!err
            .help
            .unwrap_or_default()
            .contains("ends the line before"));
        for (value, hint) in [("(a > 1 and a < 4)", "`&&`"), ("(a = 1)", "`==`")] {
            let src = format!("fn f(x: int) -> bool {{\n    let a = x\n    {value}\n}}{block}");
            let help = parse(&src).expect_err(&src).help.unwrap_or_default();
            assert!(help.contains(hint), "{src}: {help}");
        }
    }

    /// A file's words outside any block must start a block or a function.
    #[test]
    fn words_outside_blocks_ask_for_attention_or_fn() {
        for (src, help) in [
            ("mask = causal", "item of an attention block"),
            (
                "// a comment\nparam w: int = 3",
                "item of an attention block",
            ),
            (
                "attention a { mask = causal }\nscore = score",
                "item of an attention block",
            ),
            ("Attention a { mask = causal }", "lower case"),
            ("attn a { mask = causal }", "lower case"),
            ("{ }", "a file holds attention blocks"),
        ] {
            let err = parse(src).expect_err(src);
            assert!(
                err.message
                    .starts_with("expected `attention` or `fn`, found"),
                "{src}: {}",
                err.message
            );
            assert!(
                err.help.as_deref().unwrap_or("").contains(help),
                "{src}: {err:?}"
            );
        }
    }

    /// Every keyword of the grammar, used as a name, is explained as one
    /// (the list of the hint is kept by hand beside the grammar's).
    #[test]
    fn every_keyword_used_as_a_name_is_called_a_keyword() {
        let grammar = include_str!("../../grammar/attn.pest");
        let rule = grammar
            .lines()
            .find(|l| l.starts_with("keyword"))
            .expect("the grammar has a keyword rule");
        let words: Vec<&str> = rule.split('"').skip(1).step_by(2).collect();
        assert!(words.len() >= 9 && words.contains(&"fn"), "{words:?}");
        for word in words {
            let err = parse(&format!(
                "attention a {{ param {word}: int = 1 mask = causal }}"
            ))
            .expect_err(word);
            let help = err.help.unwrap_or_default();
            assert_eq!(
                help,
                format!("`{word}` is a keyword and cannot be used as a name"),
                "{word}"
            );
        }
    }

    #[test]
    fn precedence_and_assoc() {
        let s = ok("attention a { mask = q - kv - 1 < 2 * 3 + 4 || !causal && true }");
        assert!(
            s.contains("(|| (< (- (- q kv) 1) (+ (* 2 3) 4)) (&& (! causal) true))"),
            "{s}"
        );
    }

    #[test]
    fn bit_operators_bind_as_in_rust() {
        // `|` < `^` < `&` < shifts < `+ -` < `* / %`, all tighter than comparisons.
        let s = ok("attention a { mask = q | kv ^ 3 & q << 1 + 2 == ~kv >> 1 * 2 }");
        assert!(
            s.contains("(== (| q (^ kv (& 3 (<< q (+ 1 2))))) (>> (~ kv) (* 1 2)))"),
            "{s}"
        );
        // `<<` and `>>` are not two comparisons; `&&`, `||` stay logical.
        let s = ok("attention a { mask = q < kv && (q >> 1) > (kv << 1) || q <= 1 }");
        assert!(
            s.contains("(|| (&& (< q kv) (> (>> q 1) (<< kv 1))) (<= q 1))"),
            "{s}"
        );
    }

    #[test]
    fn hex_binary_and_separated_literals() {
        let s = ok("attention a {\n param m: int = 0x5555_5555\n param b: int = -0b1010\n buffer t[1_000]: int\n mask = (q & 0xFF) == 1_024 }");
        assert!(s.contains("param m: int = 1431655765"), "{s}");
        assert!(s.contains("param b: int = -10"), "{s}");
        assert!(s.contains("buffer t[1000]: int"), "{s}");
        assert!(s.contains("(== (& q 255) 1024)"), "{s}");
        for bad in ["0x", "0b2", "1__0x", "0xG"] {
            assert!(
                parse(&format!("attention a {{ mask = q == {bad} }}")).is_err(),
                "{bad} parses"
            );
        }
    }

    #[test]
    fn items_and_literals() {
        let s = ok("attention a {\n param w: int = -5\n param c: float = 1.5e1\n buffer doc[KV, Q / 64, 3]: bool\n let x = if causal { 1 } else if q > 2 { 2 } else { 3 }\n score = tanh(score) + doc[q, kv, 0]\n scale = 0.5 }");
        assert!(s.contains("param w: int = -5"), "{s}");
        assert!(s.contains("param c: float = 15.0"), "{s}");
        assert!(s.contains("buffer doc[KV, Q / 64, 3]: bool"), "{s}");
        assert!(s.contains("(if causal 1 (if (> q 2) 2 3))"), "{s}");
        assert!(s.contains("(+ tanh(score) doc[q, kv, 0])"), "{s}");
    }

    #[test]
    fn spans_cover_source() {
        let src = "attention a { mask = q >= kv }";
        let f = parse(src).unwrap();
        let ItemKind::Mask(e) = &f.attentions[0].items[0].kind else {
            panic!()
        };
        assert_eq!(&src[e.span.start..e.span.end], "q >= kv");
    }

    /// A leading byte order mark is skipped, and spans still point into the
    /// text as written.
    #[test]
    fn a_leading_byte_order_mark_is_skipped() {
        let src = "\u{feff}attention a { mask = q >= kv }";
        let f = parse(src).unwrap();
        let ItemKind::Mask(e) = &f.attentions[0].items[0].kind else {
            panic!()
        };
        assert_eq!(&src[e.span.start..e.span.end], "q >= kv");
        assert_eq!(
            &src[f.attentions[0].name.span.start..f.attentions[0].name.span.end],
            "a"
        );
        let src = "\u{feff}attention a { mask = q >= }";
        let e = parse(src).unwrap_err();
        assert_eq!(e.to_string(), "expected an expression, found `}`");
        assert_eq!(&src[e.span.offset()..e.span.offset() + 1], "}");
        // Only at the start: elsewhere it is a character out of place.
        let e = parse("attention a { mask = \u{feff}q }").unwrap_err();
        assert_eq!(e.to_string(), "expected an expression, found `\\u{feff}`");
    }

    /// Control and invisible characters are escaped in messages.
    #[test]
    fn invisible_characters_are_escaped_in_messages() {
        for (c, shown) in [
            ('\0', "\\0"),
            ('\u{200b}', "\\u{200b}"),
            ('\u{7}', "\\u{7}"),
            ('\u{a0}', "\\u{a0}"),
            ('\u{202e}', "\\u{202e}"),
        ] {
            let e = parse(&format!("attention a {{ mask = {c} }}")).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("expected an expression, found `{shown}`")
            );
        }
        // Visible characters are shown as they are.
        let e = parse("attention a { mask = é }").unwrap_err();
        assert_eq!(e.to_string(), "expected an expression, found `é`");
        assert_eq!(escaped("a'\"\\\t\n"), "a'\"\\\\t\\n");
    }

    #[test]
    fn chained_comparison_is_an_error() {
        let e = parse("attention a { mask = 0 < q < 5 }").unwrap_err();
        assert!(e.to_string().contains("cannot be chained"), "{e}");
    }

    #[test]
    fn errors_say_expected_and_found() {
        let e = parse("attention a { mask = q >= }").unwrap_err();
        assert_eq!(e.to_string(), "expected an expression, found `}`");
        let e = parse("attention a { mask = q = kv }").unwrap_err();
        assert!(e.help.as_deref().unwrap_or("").contains("=="), "{e:?}");
        let e = parse("").unwrap_err();
        assert!(e.to_string().contains("empty file"));
        let e = parse("fn f(x: int) -> int { x }").unwrap_err();
        assert_eq!(
            e.to_string(),
            "expected an `attention` block, found only functions"
        );
        let e = parse("attention let { }").unwrap_err();
        assert!(e.help.as_deref().unwrap_or("").contains("keyword"), "{e:?}");
    }

    #[test]
    fn errors_name_missing_punctuation_where_it_is_missing() {
        // pest's rule positives alone would report `param` at the item start.
        let src = "attention a {\n param w = 1\n}";
        let e = parse(src).unwrap_err();
        assert_eq!(e.to_string(), "expected `:`, found `=`");
        assert_eq!(e.span.offset(), src.find(" = ").unwrap() + 1);
        // A missing `}` at the end of the file is reported after the last token.
        let src = "attention a {\n mask = causal // done\n";
        let e = parse(src).unwrap_err();
        assert_eq!(
            e.to_string(),
            "expected an operator, the next item or `}`, found end of file"
        );
        assert_eq!(e.span.offset(), src.find("causal").unwrap() + 5);
        assert!(e.help.as_deref().unwrap_or("").contains("`}`"), "{e:?}");
        let e = parse("attention a { score = if causal { score } }").unwrap_err();
        assert_eq!(e.to_string(), "expected `else`, found `}`");
        let e = parse("attention a { score = clamp(score, 1.0 2.0) }").unwrap_err();
        assert_eq!(
            e.to_string(),
            "expected an operator, `,` or `)`, found `2.0`"
        );
    }

    #[test]
    fn big_literals() {
        assert!(parse("attention a { param x: int = 99999999999999999999 }").is_err());
        assert!(ok("attention a { param x: int = -9223372036854775808 }")
            .contains("-9223372036854775808"));
        assert!(parse("attention a { param x: float = 1e999 }").is_err());
    }
}
