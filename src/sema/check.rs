//! The checker: AST to checked spec.
//!
//! Stage: sema. Consumes an [`ast::File`], produces a [`Module`] or every error
//! it can find. Names are resolved in declaration order (an item sees the
//! items above it), int/float mixes get explicit conversions, `causal` is
//! expanded, and each expression's dependence on `b`, `h`, `q`, `kv`, `score`
//! and buffers is recorded. Calls of user functions (`fn`) are inlined: the
//! body is checked again at each call with the arguments bound to its
//! parameters, so the checked spec has no functions, and `let`s and
//! arguments are shared nodes of the expression DAG.

use std::collections::HashMap;
use std::rc::Rc;

use super::ir::*;
use super::{Diag, Label};
use crate::syntax::ast::{self, ExprKind, ItemKind, LitValue, ScalarKind};
use crate::syntax::Span;

/// Names the language gives meaning to; a declaration may not reuse them.
const BUILTIN_NAMES: [&str; 12] = [
    "b", "h", "q", "kv", "score", "causal", "B", "H", "HKV", "Q", "KV", "D",
];

/// The most expressions one attention block may hold once its function
/// calls are inlined: functions that call the next one several times grow
/// exponentially, and the checker stops there with an error naming the chain.
pub const MAX_INLINED_EXPRS: usize = 100_000;

/// The most function calls that may be inlined inside one another (each
/// level of a chain of calls is a level of the checker's recursion).
pub const MAX_CALL_DEPTH: usize = 64;

/// The unknown names of a block that get a "did you mean" suggestion.
const MAX_SUGGESTIONS: usize = 64;

/// The most levels the checker recurses into one expression: each level is
/// an expression node, which becomes at least one level of the checked
/// expression, or a call, which adds none; so an expression that reaches
/// it is deeper than [`super::limits::MAX_DEPTH`] and would be refused
/// after the check anyway.
const CHECK_RECURSION: usize = super::limits::MAX_DEPTH + MAX_CALL_DEPTH + 16;

/// The most terms one reduction may have (`sum(i in 0..N: ...)` is
/// expanded into N terms when the spec is checked).
pub const MAX_REDUCTION_LENGTH: i64 = 65_536;

/// The per-element names: not in scope in a function's body, where a
/// parameter or `let` may take the name (`causal` is the fifth such name,
/// but may not be taken).
const ELEMENT_NAMES: [&str; 5] = ["b", "h", "q", "kv", "score"];

/// The names of the built-in functions, which a `fn` may not reuse.
fn builtin_function(name: &str) -> bool {
    name == "ancestor" || Func::from_name(name).is_some()
}

/// Whether a `param`, `buffer` or `let` may not take `name`.
fn reserved(name: &str) -> bool {
    BUILTIN_NAMES.contains(&name) || builtin_function(name) || matches!(name, "mask" | "scale")
}

/// The error for a declaration of a reserved name.
fn reserved_diag(name: &ast::Ident) -> Diag {
    let mut d = Diag::error(
        "attnc::sema::reserved_name",
        format!("`{}` is a built-in name and cannot be declared", name.name),
        Label::new(name.span, "reserved"),
    );
    d.with_help("pick another name");
    d
}

/// The error for a second definition at `span` of what `prev` defined.
fn defined_twice(message: String, span: Span, prev: Span, help: &str) -> Diag {
    let mut d = Diag::error(
        "attnc::sema::duplicate",
        message,
        Label::new(span, "second definition"),
    );
    d.with_label(Label::new(prev, "first defined here"))
        .with_help(help);
    d
}

/// Registers `f` in `functions`, or reports why it cannot be: a built-in
/// function's name, or one defined already.
fn register_function(
    functions: &mut HashMap<String, Rc<ast::Function>>,
    f: &ast::Function,
    diags: &mut Vec<Diag>,
) {
    let name = &f.name;
    if builtin_function(&name.name) {
        let mut d = Diag::error(
            "attnc::sema::reserved_name",
            format!("`{}` is a built-in function", name.name),
            Label::new(name.span, "cannot be redefined"),
        );
        d.with_help("give the function another name");
        diags.push(d);
    } else if let Some(prev) = functions.get(&name.name) {
        diags.push(defined_twice(
            format!("function `{}` is defined twice", name.name),
            name.span,
            prev.name.span,
            "give each function its own name",
        ));
    } else {
        functions.insert(name.name.clone(), Rc::new(f.clone()));
    }
}

/// Checks a parsed file. Returns every error found, not only the first.
/// Checks a file (see [`super::check`]), with the params of attention block `block` given the values
/// in `values` instead of their defaults, from the start: reductions whose
/// range they set are expanded for those values.
pub fn check_with(
    file: &ast::File,
    overrides: Option<(&str, &HashMap<String, Value>)>,
) -> Result<Module, Vec<Diag>> {
    let mut diags = Vec::new();
    let mut specs = Vec::new();
    let mut shared = HashMap::new();
    for f in &file.functions {
        register_function(&mut shared, f, &mut diags);
    }
    let mut seen: HashMap<&str, Span> = HashMap::new();
    for (i, att) in file.attentions.iter().enumerate() {
        if let Some(prev) = seen.insert(&att.name.name, att.name.span) {
            diags.push(defined_twice(
                format!("attention block `{}` is defined twice", att.name.name),
                att.name.span,
                prev,
                "give each attention block in a file its own name",
            ));
        }
        let mut checker = Checker::new(att, &shared);
        if let Some((block, values)) = overrides {
            if block == att.name.name {
                checker.overrides = values.clone();
            }
        }
        checker.check_items(&att.items);
        checker.check_functions(i == 0);
        if checker.diags.is_empty() {
            if let Some((id, x)) = super::f32_overflow(&checker.spec) {
                let mut d = Diag::error(
                    "attnc::sema::f32_range",
                    format!("this constant is {x:.3e}, outside the range of f32"),
                    Label::new(
                        checker.spec.span(id),
                        "folds to a number beyond about 3.4e38",
                    ),
                );
                d.with_help("the compiled backends compute in f32, where it would be infinite and disagree with the f64 reference; make it smaller (an infinity meant as such is written `1.0 / 0.0`)");
                checker.diags.push(d);
            }
        }
        diags.append(&mut checker.diags);
        specs.push(checker.spec);
    }
    if diags.is_empty() {
        Ok(Module { specs })
    } else {
        // A function body is checked on its own and again at each call, in
        // every block that calls it: report each error once.
        let mut seen = std::collections::HashSet::new();
        diags.retain(|d| {
            let spans: Vec<_> = d
                .labels
                .iter()
                .map(|l| (l.span.start, l.span.end))
                .collect();
            seen.insert((d.code, d.message.clone(), spans))
        });
        Err(diags)
    }
}

/// What a name in scope refers to.
#[derive(Clone, Copy)]
enum Binding {
    Param(ParamId),
    Buffer(BufferId),
    Let {
        value: ExprId,
        score_use: Option<Span>,
    },
}

/// The expression being checked, which decides what it may use.
#[derive(Clone, Copy, PartialEq)]
enum Context {
    Let,
    Mask,
    Score,
    Scale,
}

struct Checker {
    spec: Spec,
    /// Param values that replace the declared defaults (see [`check_with`]).
    overrides: HashMap<String, Value>,
    scope: HashMap<String, (Binding, Span)>,
    /// Names declared anywhere in the block, to say "declared below" rather than "unknown".
    declared_later: HashMap<String, Span>,
    diags: Vec<Diag>,
    /// The first `score` used in the expression under checking.
    score_use: Option<Span>,
    /// Declarations that failed to check (already reported); their uses
    /// are not reported again as unknown names.
    poisoned: std::collections::HashSet<String>,
    /// The functions this block sees: the file's and its own.
    functions: HashMap<String, Rc<ast::Function>>,
    /// Which of them are the block's own (they see its params and buffers).
    own_functions: std::collections::HashSet<String>,
    /// The calls being inlined, outermost first: (function, call site).
    calls: Vec<(String, Span)>,
    /// Whether the inlining budget was exceeded (reported once).
    budget_hit: bool,
    /// Whether calls nested past [`MAX_CALL_DEPTH`], or expressions past
    /// [`CHECK_RECURSION`] (reported once).
    depth_hit: bool,
    /// Levels of [`Checker::expr`] under way.
    expr_depth: usize,
    /// Unknown names reported so far, for [`MAX_SUGGESTIONS`].
    suggested: usize,
    /// Checking a function body on its own (arguments are placeholders):
    /// reductions are checked once, not expanded, since their ranges may
    /// depend on the arguments of each call.
    standalone: bool,
}

impl Checker {
    fn new(att: &ast::Attention, shared: &HashMap<String, Rc<ast::Function>>) -> Checker {
        let mut functions = shared.clone();
        let mut own_functions = std::collections::HashSet::new();
        let mut diags = vec![];
        for item in &att.items {
            if let ItemKind::Fn(f) = &item.kind {
                register_function(&mut functions, f, &mut diags);
                own_functions.insert(f.name.name.clone());
            }
        }
        let mut declared_later = HashMap::new();
        for item in &att.items {
            let name = match &item.kind {
                ItemKind::Param { name, .. }
                | ItemKind::Buffer { name, .. }
                | ItemKind::Let { name, .. } => name,
                _ => continue,
            };
            declared_later.entry(name.name.clone()).or_insert(name.span);
        }
        Checker {
            spec: Spec {
                name: att.name.name.clone(),
                span: att.span,
                params: vec![],
                buffers: vec![],
                lets: vec![],
                exprs: vec![],
                types: vec![],
                deps: vec![],
                spans: vec![],
                mask: None,
                score: None,
                scale: None,
                fixed_params: vec![],
            },
            overrides: HashMap::new(),
            scope: HashMap::new(),
            declared_later,
            diags,
            score_use: None,
            poisoned: Default::default(),
            functions,
            own_functions,
            calls: vec![],
            budget_hit: false,
            depth_hit: false,
            expr_depth: 0,
            suggested: 0,
            standalone: false,
        }
    }

    /// Checks every function's body once on its own (with placeholder
    /// arguments), so a function that is never called is checked too; what
    /// it adds to the spec is dropped again. Runs after the block's items,
    /// so the block's own functions see all its params and buffers. The
    /// file's functions see nothing of a block, so one block checks them.
    fn check_functions(&mut self, with_file_functions: bool) {
        let mut names: Vec<_> = self
            .functions
            .keys()
            .filter(|n| with_file_functions || self.own_functions.contains(*n))
            .cloned()
            .collect();
        names.sort();
        for name in names {
            let f = self.functions[&name].clone();
            let mark = self.spec.exprs.len();
            let args: Vec<_> = f
                .args
                .iter()
                .map(|(arg, ty)| {
                    let ty = sema_type(ty.kind);
                    let zero = match ty {
                        Type::Int => Value::Int(0),
                        Type::Float => Value::Float(0.0),
                        Type::Bool => Value::Bool(false),
                    };
                    Some((self.push(Expr::Const(zero), ty, arg.span), ty))
                })
                .collect();
            let arg_spans: Vec<_> = f.args.iter().map(|(a, _)| a.span).collect();
            self.standalone = true;
            self.inline(&f, args, &arg_spans, f.name.span, Context::Let);
            self.standalone = false;
            self.spec.exprs.truncate(mark);
            self.spec.types.truncate(mark);
            self.spec.deps.truncate(mark);
            self.spec.spans.truncate(mark);
        }
    }

    /// A call of the user function `f`: checks the arguments, then inlines.
    fn user_call(
        &mut self,
        f: Rc<ast::Function>,
        args: &[ast::Expr],
        span: Span,
        ctx: Context,
    ) -> Option<(ExprId, Type)> {
        let checked: Vec<_> = args.iter().map(|a| self.expr(a, ctx)).collect();
        if args.len() != f.args.len() {
            let sig = f
                .args
                .iter()
                .map(|(n, t)| format!("{}: {}", n.name, t.kind))
                .collect::<Vec<_>>()
                .join(", ");
            self.error(
                "attnc::sema::wrong_arity",
                format!(
                    "`{}` takes {} argument{}, found {}",
                    f.name.name,
                    f.args.len(),
                    plural(f.args.len()),
                    args.len()
                ),
                Label::new(
                    span,
                    format!("{} argument{}", args.len(), plural(args.len())),
                ),
            )
            .with_label(Label::new(
                f.name.span,
                format!("defined as `{}({sig})`", f.name.name),
            ))
            .with_help("pass one value for each parameter, in order");
            return None;
        }
        let arg_spans: Vec<_> = args.iter().map(|a| a.span).collect();
        self.inline(&f, checked, &arg_spans, span, ctx)
    }

    /// Inlines a call of `f` at `call`: binds its parameters to the checked
    /// arguments (converting int to float where a float is declared) in a
    /// scope of their own, checks its `let`s and body there and returns the
    /// body's value. Recursion and the size budget are checked here.
    fn inline(
        &mut self,
        f: &ast::Function,
        args: Vec<Option<(ExprId, Type)>>,
        arg_spans: &[Span],
        call: Span,
        ctx: Context,
    ) -> Option<(ExprId, Type)> {
        let name = &f.name.name;
        if let Some(pos) = self.calls.iter().position(|(n, _)| n == name) {
            self.recursion(pos, call);
            return None;
        }
        if self.calls.len() >= MAX_CALL_DEPTH {
            if !self.depth_hit {
                self.depth_hit = true;
                let names: Vec<&str> = self.calls.iter().map(|(n, _)| n.as_str()).collect();
                let chain = format!(
                    "`{}` → `{}` → … → `{}` → `{name}`",
                    names[0],
                    names[1],
                    names[names.len() - 1]
                );
                let outer = self.calls[0].1;
                self.error(
                    "attnc::sema::too_deep",
                    format!("function calls nest more than {MAX_CALL_DEPTH} deep: {chain}"),
                    Label::new(outer, "the outermost call of the chain"),
                )
                .with_help("each call is inlined where it is made; compute the value in fewer nested calls (a loop of `sum` or one function that does several steps)");
            }
            return None;
        }
        if self.spec.exprs.len() > MAX_INLINED_EXPRS {
            if !self.budget_hit {
                self.budget_hit = true;
                let chain = self
                    .calls
                    .iter()
                    .map(|(n, _)| format!("`{n}`"))
                    .chain([format!("`{name}`")])
                    .collect::<Vec<_>>()
                    .join(" → ");
                let outer = self.calls.first().map_or(call, |(_, s)| *s);
                self.error(
                    "attnc::sema::inline_budget",
                    format!(
                        "inlining its function calls makes attention `{}` larger than {MAX_INLINED_EXPRS} expressions, at {chain}",
                        self.spec.name
                    ),
                    Label::new(outer, "this call expands past the limit"),
                )
                .with_help("a function that calls another several times with different arguments doubles in size at each level: compute shared values once with `let` and pass them on");
            }
            return None;
        }
        // The arguments, typed as declared.
        let mut scope = HashMap::new();
        if self.own_functions.contains(name) {
            for (n, (b, s)) in &self.scope {
                if matches!(b, Binding::Param(_) | Binding::Buffer(_)) {
                    scope.insert(n.clone(), (*b, *s));
                }
            }
        }
        let mut locals: HashMap<String, Span> = HashMap::new();
        let mut failed = std::collections::HashSet::new();
        let mut ok = true;
        for (((arg, ty), value), span) in f.args.iter().zip(args).zip(arg_spans) {
            ok &= self.declare_local(arg, &mut locals);
            let Some((id, found)) = value else {
                // Reported at the call; uses in the body are not unknown names.
                failed.insert(arg.name.clone());
                ok = false;
                continue;
            };
            let want = sema_type(ty.kind);
            let id = match (found, want) {
                _ if found == want => id,
                (Type::Int, Type::Float) => self.cast_to_float(id),
                _ => {
                    self.error(
                        "attnc::sema::type_mismatch",
                        format!(
                            "argument `{}` of `{name}` must be {want}, found {found}",
                            arg.name
                        ),
                        Label::new(*span, format!("this is {found}")),
                    )
                    .with_label(Label::new(
                        ty.span,
                        format!("`{}` is declared {want} here", arg.name),
                    ))
                    .with_help(match want {
                        Type::Bool => "pass a condition, e.g. `x != 0`",
                        Type::Int => "convert with `int(x)`, which rounds toward zero",
                        Type::Float => "convert a condition with `float(c)`",
                    });
                    failed.insert(arg.name.clone());
                    ok = false;
                    continue;
                }
            };
            scope.insert(
                arg.name.clone(),
                (
                    Binding::Let {
                        value: id,
                        score_use: None,
                    },
                    arg.span,
                ),
            );
        }
        let saved_scope = std::mem::replace(&mut self.scope, scope);
        let saved_poisoned = std::mem::replace(&mut self.poisoned, failed);
        let saved_later = std::mem::take(&mut self.declared_later);
        self.calls.push((name.clone(), call));
        for (let_name, value) in &f.lets {
            let checked = self.expr(value, ctx);
            if !self.declare_local(let_name, &mut locals) {
                ok = false;
                continue;
            }
            match checked {
                Some((id, _)) => {
                    self.scope.insert(
                        let_name.name.clone(),
                        (
                            Binding::Let {
                                value: id,
                                score_use: None,
                            },
                            let_name.span,
                        ),
                    );
                }
                None => {
                    self.poisoned.insert(let_name.name.clone());
                    ok = false;
                }
            }
        }
        let body = self.expr(&f.body, ctx);
        self.calls.pop();
        self.scope = saved_scope;
        self.poisoned = saved_poisoned;
        self.declared_later = saved_later;
        let (id, found) = body?;
        if !ok {
            return None;
        }
        let want = sema_type(f.ret.kind);
        match (found, want) {
            _ if found == want => Some((id, want)),
            (Type::Int, Type::Float) => Some((self.cast_to_float(id), Type::Float)),
            _ => {
                self.error(
                    "attnc::sema::type_mismatch",
                    format!("`{name}` must return {want}, found {found}"),
                    Label::new(f.body.span, format!("this is {found}")),
                )
                .with_label(Label::new(f.ret.span, format!("declared to return {want}")))
                .with_help(match want {
                    Type::Bool => "a bool function ends in a condition, e.g. `x >= 0`",
                    Type::Int => "convert with `int(x)`, or declare the function `-> float`",
                    Type::Float => {
                        "convert a condition with `float(c)`, or declare the function `-> bool`"
                    }
                });
                None
            }
        }
    }

    /// Declares a function's parameter or `let`: a name may appear once in
    /// a function, may shadow the block's names and the indices `b h q kv`
    /// and `score`, and may not be a shape, `causal` or a built-in function.
    fn declare_local(&mut self, name: &ast::Ident, locals: &mut HashMap<String, Span>) -> bool {
        if !ELEMENT_NAMES.contains(&name.name.as_str()) && reserved(&name.name) {
            self.diags.push(reserved_diag(name));
            return false;
        }
        if let Some(prev) = locals.insert(name.name.clone(), name.span) {
            self.diags.push(defined_twice(
                format!("`{}` is defined twice", name.name),
                name.span,
                prev,
                "rename one of them",
            ));
            return false;
        }
        true
    }

    /// Reports the cycle that a call of `self.calls[pos]`'s function at
    /// `call` closes. The cycle is named from its alphabetically first
    /// function, so every way into it gives the same error.
    fn recursion(&mut self, pos: usize, call: Span) {
        // Edge i: `nodes[i]` calls `nodes[i + 1]` at `edges[i]`.
        let mut nodes: Vec<String> = self.calls[pos..].iter().map(|(n, _)| n.clone()).collect();
        let mut edges: Vec<Span> = self.calls[pos + 1..].iter().map(|(_, s)| *s).collect();
        edges.push(call);
        let first = (0..nodes.len()).min_by_key(|&i| &nodes[i]).unwrap_or(0);
        nodes.rotate_left(first);
        edges.rotate_left(first);
        let chain = nodes
            .iter()
            .chain([&nodes[0]])
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(" → ");
        let label = |i: usize| {
            let callee = &nodes[(i + 1) % nodes.len()];
            Label::new(edges[i], format!("`{}` calls `{callee}` here", nodes[i]))
        };
        let d = self.error(
            "attnc::sema::recursion",
            format!("functions may not be recursive: {chain}"),
            label(0),
        );
        for i in 1..edges.len() {
            d.with_label(label(i));
        }
        d.with_help("functions are inlined where they are called: write the repetition out, or compute it with a buffer");
    }

    fn error(&mut self, code: &'static str, message: String, label: Label) -> &mut Diag {
        self.diags.push(Diag::error(code, message, label));
        self.diags.last_mut().unwrap()
    }

    fn push(&mut self, e: Expr, ty: Type, span: Span) -> ExprId {
        let deps = match &e {
            Expr::Var(v) => Deps::of_var(*v),
            Expr::Score => Deps::SCORE,
            Expr::Load { .. } | Expr::Ancestor { .. } => Deps::BUFFER,
            _ => Deps::NONE,
        };
        let deps = e
            .operands()
            .iter()
            .fold(deps, |d, o| d.union(self.spec.deps(*o)));
        let id = ExprId(self.spec.exprs.len() as u32);
        self.spec.exprs.push(e);
        self.spec.types.push(ty);
        self.spec.deps.push(deps);
        self.spec.spans.push(span);
        id
    }

    fn check_items(&mut self, items: &[ast::Item]) {
        let mut seen_main: HashMap<&'static str, Span> = HashMap::new();
        for item in items {
            match &item.kind {
                // Hoisted: registered in `Checker::new`, checked in `check_functions`.
                ItemKind::Fn(_) => {}
                ItemKind::Param { name, ty, value } => {
                    if !self.declare(name) {
                        continue;
                    }
                    let ty = sema_type(ty.kind);
                    let v = match (ty, value.value) {
                        (Type::Int, LitValue::Int(i)) => Some(Value::Int(i)),
                        (Type::Float, LitValue::Float(x)) => Some(Value::Float(x)),
                        (Type::Float, LitValue::Int(i)) => Some(Value::Float(i as f64)),
                        (Type::Bool, LitValue::Bool(b)) => Some(Value::Bool(b)),
                        _ => None,
                    };
                    let v = v.unwrap_or_else(|| {
                        let found = lit_type(value.value);
                        let article = if ty == Type::Int { "an" } else { "a" };
                        self.error(
                            "attnc::sema::type_mismatch",
                            format!(
                                "param `{}` is declared {ty} but its default is {found}",
                                name.name
                            ),
                            Label::new(value.span, format!("this is {found}")),
                        )
                        .with_help(format!(
                            "write {article} {ty} literal, or declare the param as {found}"
                        ));
                        // Keep the declaration so later uses do not cascade into more errors.
                        match ty {
                            Type::Int => Value::Int(0),
                            Type::Float => Value::Float(0.0),
                            Type::Bool => Value::Bool(false),
                        }
                    });
                    let v = match self.overrides.get(&name.name) {
                        Some(o) if o.ty() == ty => *o,
                        _ => v,
                    };
                    let id = ParamId(self.spec.params.len() as u32);
                    self.spec.params.push(Param {
                        name: name.name.clone(),
                        ty,
                        value: v,
                        span: name.span,
                    });
                    self.scope
                        .insert(name.name.clone(), (Binding::Param(id), name.span));
                }
                ItemKind::Buffer { name, dims, elem } => {
                    if !self.declare(name) {
                        continue;
                    }
                    let mut ok = true;
                    let mut out = Vec::new();
                    for d in dims {
                        match self.dim(d, &name.name) {
                            Some(d) => out.push(d),
                            None => ok = false,
                        }
                    }
                    if !ok {
                        self.poisoned.insert(name.name.clone());
                        continue;
                    }
                    let id = BufferId(self.spec.buffers.len() as u32);
                    self.spec.buffers.push(Buffer {
                        name: name.name.clone(),
                        dims: out.iter().map(|d| d.resolve(&self.spec.params)).collect(),
                        declared: out,
                        elem: sema_type(elem.kind),
                        span: name.span,
                    });
                    self.scope
                        .insert(name.name.clone(), (Binding::Buffer(id), name.span));
                }
                ItemKind::Let { name, value } => {
                    self.score_use = None;
                    let checked = self.expr(value, Context::Let);
                    let score_use = self.score_use.take();
                    if !self.declare(name) {
                        continue;
                    }
                    if let Some((id, _)) = checked {
                        self.spec.lets.push(Let {
                            name: name.name.clone(),
                            value: id,
                            span: name.span,
                        });
                        self.scope.insert(
                            name.name.clone(),
                            (
                                Binding::Let {
                                    value: id,
                                    score_use,
                                },
                                name.span,
                            ),
                        );
                    } else {
                        self.poisoned.insert(name.name.clone());
                    }
                }
                ItemKind::Mask(e) | ItemKind::Score(e) | ItemKind::Scale(e) => {
                    let kw = item.kind.keyword();
                    let kw_span = Span::new(item.span.start, item.span.start + kw.len());
                    if let Some(prev) = seen_main.insert(kw, kw_span) {
                        self.diags.push(defined_twice(
                            format!("`{kw}` is defined twice in attention `{}`", self.spec.name),
                            kw_span,
                            prev,
                            &format!("combine them into one `{kw} = ...`"),
                        ));
                        continue;
                    }
                    self.check_main(&item.kind, e);
                }
            }
        }
    }

    /// A buffer dimension: literals, int params (folded to their values),
    /// shape names, `+ - * /` (`/` rounding up) and parentheses. `None`
    /// after reporting what else it holds.
    fn dim(&mut self, e: &ast::Expr, buffer: &str) -> Option<Dim> {
        const ALLOWED: &str = "a buffer dimension is computed before the kernel runs: it may use integer literals, int params, the shapes B, H, HKV, Q, KV, D, `+ - * /` and parentheses";
        let lit = |d: &Dim| match d {
            Dim::Lit(n) => Some(*n),
            _ => None,
        };
        let overflow = |this: &mut Self| {
            this.error(
                "attnc::sema::dim_overflow",
                format!("a dimension of buffer `{buffer}` overflows a 64-bit integer"),
                Label::new(e.span, "too large"),
            );
            None
        };
        match &e.kind {
            ast::ExprKind::Int(n) => Some(Dim::Lit(*n)),
            ast::ExprKind::Unary(ast::UnaryOp::Neg, x) => {
                let x = self.dim(x, buffer)?;
                Dim::Sub(Box::new(Dim::Lit(0)), Box::new(x))
                    .fold_literals()
                    .ok()
                    .or_else(|| overflow(self))
            }
            ast::ExprKind::Name(n) => {
                if let Some(sv) = ShapeVar::from_name(&n.name) {
                    return Some(Dim::Shape(sv));
                }
                match self.scope.get(&n.name) {
                    Some((Binding::Param(id), _)) => {
                        let p = &self.spec.params[id.0 as usize];
                        if p.ty == Type::Int {
                            return Some(Dim::Param(*id));
                        }
                        let ty = p.ty;
                        self.error(
                            "attnc::sema::dim_not_int",
                            format!("param `{}` is {ty}, but a dimension of buffer `{buffer}` must be an int", n.name),
                            Label::new(n.span, format!("this is {ty}")),
                        )
                        .with_help("declare the param as int");
                        None
                    }
                    Some(_) => {
                        self.error(
                            "attnc::sema::dim_not_constant",
                            format!("`{}` cannot size buffer `{buffer}`", n.name),
                            Label::new(n.span, "not known before the kernel runs"),
                        )
                        .with_help(ALLOWED);
                        None
                    }
                    None => {
                        let params = self
                            .spec
                            .params
                            .iter()
                            .filter(|p| p.ty == Type::Int)
                            .map(|p| p.name.as_str());
                        let names: Vec<&str> = ShapeVar::ALL
                            .iter()
                            .map(|s| s.name())
                            .chain(params)
                            .collect();
                        let mut help = ALLOWED.to_string();
                        if let Some(s) = suggest(&n.name, names.iter().copied()) {
                            help = format!("did you mean `{s}`? {help}");
                        }
                        if ELEMENT_NAMES.contains(&n.name.as_str()) || n.name == "score" {
                            help = format!("`{}` changes from element to element; {help}", n.name);
                        }
                        self.error(
                            "attnc::sema::unknown_shape",
                            format!(
                                "unknown shape `{}` in the dimensions of buffer `{buffer}`",
                                n.name
                            ),
                            Label::new(n.span, "not a shape or an int param declared above"),
                        )
                        .with_help(help);
                        None
                    }
                }
            }
            ast::ExprKind::Binary(
                op @ (ast::BinaryOp::Add
                | ast::BinaryOp::Sub
                | ast::BinaryOp::Mul
                | ast::BinaryOp::Div),
                a,
                b,
            ) => {
                let (a, b) = (self.dim(a, buffer), self.dim(b, buffer));
                let (a, b) = (a?, b?);
                if *op == ast::BinaryOp::Div && lit(&b).is_some_and(|n| n <= 0) {
                    self.error(
                        "attnc::sema::dim_divided_by_zero",
                        format!("a dimension of buffer `{buffer}` is divided by {}", lit(&b).unwrap()),
                        Label::new(e.span, "divided by a number below 1"),
                    )
                    .with_help("`A / N` is A divided by N, rounded up, e.g. `Q / 64` query blocks of 64; N must be at least 1");
                    return None;
                }
                let (a, b) = (Box::new(a), Box::new(b));
                let d = match op {
                    ast::BinaryOp::Add => Dim::Add(a, b),
                    ast::BinaryOp::Sub => Dim::Sub(a, b),
                    ast::BinaryOp::Mul => Dim::Mul(a, b),
                    _ => Dim::CeilDiv(a, b),
                };
                d.fold_literals().ok().or_else(|| overflow(self))
            }
            _ => {
                let what = match &e.kind {
                    ast::ExprKind::Float(_) => "a float".to_string(),
                    ast::ExprKind::Bool(_) => "a bool".to_string(),
                    ast::ExprKind::Binary(op, ..) => format!("`{}`", op.symbol()),
                    ast::ExprKind::Unary(op, _) => format!("`{}`", op.symbol()),
                    ast::ExprKind::Index(..) => "a buffer read".to_string(),
                    ast::ExprKind::Call(..) => "a function call".to_string(),
                    ast::ExprKind::Reduce(r) => format!("`{}(...)`", r.op.name()),
                    _ => "`if`".to_string(),
                };
                self.error(
                    "attnc::sema::dim_not_constant",
                    format!("{what} cannot size buffer `{buffer}`"),
                    Label::new(e.span, "not allowed in a buffer dimension"),
                )
                .with_help(ALLOWED);
                None
            }
        }
    }

    /// Checks `mask`, `score` or `scale` and records it in the spec.
    fn check_main(&mut self, kind: &ItemKind, e: &ast::Expr) {
        let (ctx, want) = match kind {
            ItemKind::Mask(_) => (Context::Mask, "bool"),
            ItemKind::Score(_) => (Context::Score, "float"),
            _ => (Context::Scale, "float"),
        };
        self.score_use = None;
        let Some((id, ty)) = self.expr(e, ctx) else {
            return;
        };
        let id = match (ctx, ty) {
            (Context::Mask, Type::Bool) => id,
            (Context::Score | Context::Scale, Type::Float) => id,
            (Context::Score | Context::Scale, Type::Int) => self.cast_to_float(id),
            _ => {
                let help = match ctx {
                    Context::Mask => "a mask is a condition, e.g. `q >= kv` or `doc[q] == doc[kv]`".to_string(),
                    _ => format!("`{}` must be a number; use `if COND {{ A }} else {{ B }}` to choose between numbers", kind.keyword()),
                };
                self.error(
                    "attnc::sema::type_mismatch",
                    format!("`{}` must be {want}, found {ty}", kind.keyword()),
                    Label::new(e.span, format!("this is {ty}")),
                )
                .with_help(help);
                return;
            }
        };
        match ctx {
            Context::Mask => self.spec.mask = Some(id),
            Context::Score => self.spec.score = Some(id),
            _ => self.spec.scale = Some(id),
        }
    }

    /// Registers a declared name; reports duplicates and builtin clashes.
    fn declare(&mut self, name: &ast::Ident) -> bool {
        if reserved(&name.name) {
            self.diags.push(reserved_diag(name));
            // Uses of it that are not built in (`let exp = ...` then `exp`) are not unknown names too.
            self.poisoned.insert(name.name.clone());
            return false;
        }
        if let Some((_, prev)) = self.scope.get(&name.name) {
            self.diags.push(defined_twice(
                format!("`{}` is defined twice", name.name),
                name.span,
                *prev,
                "rename one of them",
            ));
            return false;
        }
        true
    }

    /// A bounded reduction `OP(VAR in LO..HI: BODY)`, expanded here: the
    /// body is checked once per value of VAR (bound to that int constant)
    /// and the values are combined by [`Self::combine`]. LO and HI are
    /// compile-time ints; an empty range still checks the body once.
    fn reduce(&mut self, r: &ast::Reduce, span: Span, ctx: Context) -> Option<(ExprId, Type)> {
        let var = &r.var;
        let op = r.op;
        // `Some(None)`: a function body checked on its own, whose range may
        // depend on the arguments: the bounds' types are checked and the
        // body once.
        let range = if self.standalone {
            let lo = self
                .expr(&r.lo, ctx)
                .map(|b| self.bound_type(b.1, &r.lo, op));
            let hi = self
                .expr(&r.hi, ctx)
                .map(|b| self.bound_type(b.1, &r.hi, op));
            (lo == Some(true) && hi == Some(true)).then_some(None)
        } else {
            let (lo, hi) = (self.bound(&r.lo, ctx, op), self.bound(&r.hi, ctx, op));
            lo.zip(hi).map(Some)
        };
        if reserved(&var.name) || ELEMENT_NAMES.contains(&var.name.as_str()) {
            self.diags.push(reserved_diag(var));
            return None;
        }
        let Some((lo, hi)) = range? else {
            return self.reduce_term(r, 0, ctx);
        };
        let n = hi.saturating_sub(lo).max(0);
        if n == 0 {
            // The body is checked once all the same (names, types), and an
            // empty `sum` has the body's type.
            let (_, ty) = self.reduce_term(r, lo, ctx)?;
            if matches!(op, ast::ReduceOp::Max | ast::ReduceOp::Min) {
                self.error(
                    "attnc::sema::empty_reduction",
                    format!("`{}` over the empty range {lo}..{hi} has no value", op.name()),
                    Label::new(span, format!("{lo}..{hi} holds no value of `{}`", var.name)),
                )
                .with_help("the range LO..HI runs from LO up to HI - 1: make HI greater than LO, or use `sum`, `any` or `all`, which have a value for an empty range");
                return None;
            }
            let v = match (op, ty) {
                (ast::ReduceOp::Sum, Type::Float) => Value::Float(0.0),
                (ast::ReduceOp::Sum, _) => Value::Int(0),
                (ast::ReduceOp::Any, _) => Value::Bool(false),
                _ => Value::Bool(true),
            };
            return Some((self.push(Expr::Const(v), v.ty(), span), v.ty()));
        }
        if n > MAX_REDUCTION_LENGTH {
            self.error(
                "attnc::sema::reduction_too_long",
                format!(
                    "`{}` over {lo}..{hi} has {n} terms, more than {MAX_REDUCTION_LENGTH}",
                    op.name()
                ),
                Label::new(span, "too many terms"),
            )
            .with_help("reductions are expanded when the spec is checked: reduce a shorter range, or precompute the values into a buffer");
            return None;
        }
        let mut terms = Vec::with_capacity(n as usize);
        for i in lo..hi {
            if self.spec.exprs.len() > MAX_INLINED_EXPRS {
                if !self.budget_hit {
                    self.budget_hit = true;
                    self.error(
                        "attnc::sema::inline_budget",
                        format!(
                            "expanding `{}({} in {lo}..{hi}: ...)` makes attention `{}` larger than {MAX_INLINED_EXPRS} expressions",
                            op.name(),
                            var.name,
                            self.spec.name
                        ),
                        Label::new(span, "this reduction expands past the limit"),
                    )
                    .with_help("reduce a shorter range, move work that does not depend on the index out of the body with `let`, or precompute the values into a buffer");
                }
                return None;
            }
            terms.push(self.reduce_term(r, i, ctx)?);
        }
        Some(self.combine(op, &terms, span))
    }

    /// The body of reduction `r` with its index bound to the int `i`,
    /// type-checked against the operation.
    fn reduce_term(&mut self, r: &ast::Reduce, i: i64, ctx: Context) -> Option<(ExprId, Type)> {
        let var = &r.var;
        let op = r.op;
        let value = self.push(Expr::Const(Value::Int(i)), Type::Int, var.span);
        let saved = self.scope.insert(
            var.name.clone(),
            (
                Binding::Let {
                    value,
                    score_use: None,
                },
                var.span,
            ),
        );
        let saved_poisoned = self.poisoned.remove(&var.name);
        let body = self.expr(&r.body, ctx);
        self.scope.remove(&var.name);
        if let Some(b) = saved {
            self.scope.insert(var.name.clone(), b);
        }
        if saved_poisoned {
            self.poisoned.insert(var.name.clone());
        }
        let (id, ty) = body?;
        let fits = match op {
            ast::ReduceOp::Any | ast::ReduceOp::All => ty == Type::Bool,
            _ => ty.is_numeric(),
        };
        if !fits {
            let (need, help) = match op {
                ast::ReduceOp::Any | ast::ReduceOp::All => ("bool", "write a condition, e.g. `t[i] == kv / 64`"),
                _ => ("a number", "convert a condition with `float(c)`, or count with `sum(i in ..: if c { 1 } else { 0 })`"),
            };
            self.error(
                "attnc::sema::type_mismatch",
                format!("the body of `{}` must be {need}, found {ty}", op.name()),
                Label::new(r.body.span, format!("this is {ty}")),
            )
            .with_help(help);
            return None;
        }
        Some((id, ty))
    }

    /// Combines the terms of a reduction pairwise (a balanced tree, so its
    /// depth is log2 of the number of terms): `+` for `sum`, `||` and `&&`
    /// for `any` and `all` (which short-circuit left to right as a chain
    /// would), the functions `max` and `min`.
    fn combine(
        &mut self,
        op: ast::ReduceOp,
        terms: &[(ExprId, Type)],
        span: Span,
    ) -> (ExprId, Type) {
        if terms.len() == 1 {
            return terms[0];
        }
        let mid = terms.len() / 2;
        let (a, _) = self.combine(op, &terms[..mid], span);
        let (b, _) = self.combine(op, &terms[mid..], span);
        let mut ids = [a, b];
        let (e, t) = match op {
            ast::ReduceOp::Sum => {
                let t = self.unify_numeric(&mut ids);
                (Expr::Binary(BinaryOp::Add, ids[0], ids[1]), t)
            }
            ast::ReduceOp::Max | ast::ReduceOp::Min => {
                let t = self.unify_numeric(&mut ids);
                let f = if op == ast::ReduceOp::Max {
                    Func::Max
                } else {
                    Func::Min
                };
                (Expr::Call(f, ids.to_vec()), t)
            }
            ast::ReduceOp::Any => (Expr::Binary(BinaryOp::Or, a, b), Type::Bool),
            ast::ReduceOp::All => (Expr::Binary(BinaryOp::And, a, b), Type::Bool),
        };
        (self.push(e, t, span), t)
    }

    /// Whether a checked bound has type int (reporting it if not).
    fn bound_type(&mut self, ty: Type, e: &ast::Expr, op: ast::ReduceOp) -> bool {
        if ty != Type::Int {
            self.error(
                "attnc::sema::type_mismatch",
                format!("the bounds of `{}` must be int, found {ty}", op.name()),
                Label::new(e.span, format!("this is {ty}")),
            )
            .with_help("a range is written `LO..HI` with ints, e.g. `0..4` or `0..top_k`");
            return false;
        }
        true
    }

    /// A bound of a reduction's range: an int known when the spec is
    /// checked (literals, int params, and arithmetic and functions of them;
    /// a function's argument when the call passes such a value). The params
    /// it reads are recorded in [`Spec::fixed_params`].
    fn bound(&mut self, e: &ast::Expr, ctx: Context, op: ast::ReduceOp) -> Option<i64> {
        let (id, ty) = self.expr(e, ctx)?;
        if !self.bound_type(ty, e, op) {
            return None;
        }
        // Every node it depends on must be known now.
        let mut params = Vec::new();
        let mut work = vec![id];
        let mut seen = std::collections::HashSet::new();
        while let Some(x) = work.pop() {
            if !seen.insert(x) {
                continue;
            }
            let why = match self.spec.expr(x) {
                Expr::Param(p) => {
                    params.push(*p);
                    None
                }
                Expr::Shape(s) => Some(format!("the shape `{}`", s.name())),
                Expr::Var(v) => Some(format!("the index `{}`", v.name())),
                Expr::Score => Some("`score`".to_string()),
                Expr::Load { .. } | Expr::Ancestor { .. } => Some("a buffer read".to_string()),
                _ => None,
            };
            if let Some(why) = why {
                self.error(
                    "attnc::sema::reduction_bound",
                    format!("the range of `{}` must be known when the spec is checked, but depends on {why}", op.name()),
                    Label::new(e.span, "not a compile-time int"),
                )
                .with_help("bounds are ints made of literals and int params (kernels are compiled for any shape): declare a `param` for it, e.g. `param top_k: int = 4` and `0..top_k`");
                return None;
            }
            work.extend(self.spec.expr(x).operands());
        }
        match self.constant(id) {
            Ok(Value::Int(v)) => {
                for p in params {
                    if !self.spec.fixed_params.contains(&p) {
                        self.spec.fixed_params.push(p);
                    }
                }
                Some(v)
            }
            Ok(v) => unreachable!("an int expression gave {v:?}"),
            Err(err) => {
                self.error(
                    "attnc::sema::reduction_bound",
                    format!("the range of `{}` cannot be computed: {err}", op.name()),
                    Label::new(e.span, "fails"),
                );
                None
            }
        }
    }

    /// The value of an expression of constants and params (checked by the
    /// caller), or why it has none.
    fn constant(&self, id: ExprId) -> Result<Value, &'static str> {
        use super::eval;
        Ok(match self.spec.expr(id) {
            Expr::Const(v) => *v,
            Expr::Param(p) => self.spec.param(*p).value,
            Expr::Unary(op, a) => match (op, self.constant(*a)?) {
                (UnaryOp::Neg, Value::Int(i)) => Value::Int(i.wrapping_neg()),
                (UnaryOp::Neg, Value::Float(x)) => Value::Float(-x),
                (UnaryOp::Not, Value::Bool(b)) => Value::Bool(!b),
                (UnaryOp::BitNot, Value::Int(i)) => Value::Int(!i),
                _ => unreachable!("checked unary operand"),
            },
            Expr::Binary(op, a, b) => {
                let (x, y) = (self.constant(*a)?, self.constant(*b)?);
                eval::binary(*op, x, y).ok_or(if op.is_shift() {
                    "a shift count outside 0..=63"
                } else {
                    "an integer division by zero"
                })?
            }
            Expr::Select {
                cond,
                then,
                otherwise,
            } => match self.constant(*cond)? {
                Value::Bool(true) => self.constant(*then)?,
                _ => self.constant(*otherwise)?,
            },
            Expr::Call(f, args) => {
                let args = args
                    .iter()
                    .map(|a| self.constant(*a))
                    .collect::<Result<Vec<_>, _>>()?;
                eval::call(*f, &args)
            }
            e => unreachable!("not a constant: {e:?}"),
        })
    }

    fn cast_to_float(&mut self, id: ExprId) -> ExprId {
        if self.spec.ty(id) == Type::Float {
            return id;
        }
        if let Expr::Const(Value::Int(i)) = self.spec.expr(id) {
            let v = *i as f64;
            let span = self.spec.span(id);
            return self.push(Expr::Const(Value::Float(v)), Type::Float, span);
        }
        let span = self.spec.span(id);
        self.push(Expr::Call(Func::Float, vec![id]), Type::Float, span)
    }

    /// Brings numeric operands to one type: int if all are int, else float.
    fn unify_numeric(&mut self, ids: &mut [ExprId]) -> Type {
        if ids.iter().all(|i| self.spec.ty(*i) == Type::Int) {
            return Type::Int;
        }
        for id in ids.iter_mut() {
            *id = self.cast_to_float(*id);
        }
        Type::Float
    }

    /// Checks one expression, recursing into its operands and into the
    /// bodies of the functions it calls; past [`CHECK_RECURSION`] levels an
    /// error (the expression would be deeper than
    /// [`super::limits::MAX_DEPTH`] once checked), not a stack overflow.
    fn expr(&mut self, e: &ast::Expr, ctx: Context) -> Option<(ExprId, Type)> {
        if self.expr_depth >= CHECK_RECURSION {
            if !self.depth_hit {
                self.depth_hit = true;
                self.error(
                    "attnc::sema::too_deep",
                    format!(
                        "expression is nested too deeply (more than {} levels, counting the bodies of the functions it calls)",
                        super::limits::MAX_DEPTH
                    ),
                    Label::new(e.span, "nested too deeply here"),
                )
                .with_help("each call is inlined where it is made, so nested calls of deep function bodies nest as deep as all of them together; compute the value in fewer steps");
            }
            return None;
        }
        self.expr_depth += 1;
        let checked = self.expr_at_depth(e, ctx);
        self.expr_depth -= 1;
        checked
    }

    fn expr_at_depth(&mut self, e: &ast::Expr, ctx: Context) -> Option<(ExprId, Type)> {
        let span = e.span;
        match &e.kind {
            ExprKind::Int(i) => Some((
                self.push(Expr::Const(Value::Int(*i)), Type::Int, span),
                Type::Int,
            )),
            ExprKind::Float(x) => Some((
                self.push(Expr::Const(Value::Float(*x)), Type::Float, span),
                Type::Float,
            )),
            ExprKind::Bool(b) => Some((
                self.push(Expr::Const(Value::Bool(*b)), Type::Bool, span),
                Type::Bool,
            )),
            ExprKind::Name(n) => self.name(n, ctx),
            ExprKind::Unary(op, a) => {
                let (a_id, a_ty) = self.expr(a, ctx)?;
                match (op, a_ty) {
                    (ast::UnaryOp::Neg, Type::Int | Type::Float) => {
                        Some((self.push(Expr::Unary(UnaryOp::Neg, a_id), a_ty, span), a_ty))
                    }
                    (ast::UnaryOp::Not, Type::Bool) => Some((
                        self.push(Expr::Unary(UnaryOp::Not, a_id), Type::Bool, span),
                        Type::Bool,
                    )),
                    (ast::UnaryOp::Neg, _) => {
                        self.error(
                            "attnc::sema::type_mismatch",
                            "cannot negate a bool with `-`".into(),
                            Label::new(a.span, "this is bool"),
                        )
                        .with_help("use `!` for logical not");
                        None
                    }
                    (ast::UnaryOp::Not, t) => {
                        self.error(
                            "attnc::sema::type_mismatch",
                            format!("`!` expects bool, found {t}"),
                            Label::new(a.span, format!("this is {t}")),
                        )
                        .with_help(if t == Type::Int {
                            "`!` is logical not: for the bits of an int use `~`, to test it compare, e.g. `x != 0`"
                        } else {
                            "use `-` to negate a number, or compare it, e.g. `x != 0`"
                        });
                        None
                    }
                    (ast::UnaryOp::BitNot, Type::Int) => Some((
                        self.push(Expr::Unary(UnaryOp::BitNot, a_id), Type::Int, span),
                        Type::Int,
                    )),
                    (ast::UnaryOp::BitNot, t) => {
                        self.error(
                            "attnc::sema::type_mismatch",
                            format!("`~` expects int, found {t}"),
                            Label::new(a.span, format!("this is {t}")),
                        )
                        .with_help(if t == Type::Bool {
                            "`~` is the bitwise not of an int: for a bool use `!`"
                        } else {
                            "`~` is the bitwise not of an int: `int(x)` converts a float"
                        });
                        None
                    }
                }
            }
            ExprKind::Binary(op, a, b) => {
                let lhs = self.expr(a, ctx);
                let rhs = self.expr(b, ctx);
                let ((mut l, lt), (mut r, rt)) = (lhs?, rhs?);
                let sop = sema_binop(*op);
                match sop {
                    BinaryOp::And | BinaryOp::Or => {
                        for (t, sub) in [(lt, a), (rt, b)] {
                            if t != Type::Bool {
                                let bits = if sop == BinaryOp::And { "&" } else { "|" };
                                self.error(
                                    "attnc::sema::type_mismatch",
                                    format!("`{}` expects bool operands, found {t}", op.symbol()),
                                    Label::new(sub.span, format!("this is {t}")),
                                )
                                .with_help(
                                    if lt == Type::Int && rt == Type::Int {
                                        format!(
                                            "`{}` is logical; for the bits of ints use `{bits}`",
                                            op.symbol()
                                        )
                                    } else {
                                        "compare the number to make a condition, e.g. `x != 0`"
                                            .to_string()
                                    },
                                );
                                return None;
                            }
                        }
                        Some((
                            self.push(Expr::Binary(sop, l, r), Type::Bool, span),
                            Type::Bool,
                        ))
                    }
                    _ if sop.is_comparison() => {
                        let ok = (lt.is_numeric() && rt.is_numeric())
                            || (lt == Type::Bool
                                && rt == Type::Bool
                                && matches!(sop, BinaryOp::Eq | BinaryOp::Ne));
                        if !ok {
                            self.error(
                                "attnc::sema::type_mismatch",
                                format!("cannot compare {lt} with {rt} using `{}`", op.symbol()),
                                Label::new(span, format!("{lt} {} {rt}", op.symbol())),
                            )
                            .with_help(if lt == Type::Bool && rt == Type::Bool {
                                "bools can only be compared with `==` and `!=`"
                            } else {
                                "both sides must be numbers, or both bool; `float(x)` and `int(x)` convert"
                            });
                            return None;
                        }
                        if lt.is_numeric() {
                            let mut ids = [l, r];
                            self.unify_numeric(&mut ids);
                            [l, r] = ids;
                        }
                        Some((
                            self.push(Expr::Binary(sop, l, r), Type::Bool, span),
                            Type::Bool,
                        ))
                    }
                    BinaryOp::BitAnd
                    | BinaryOp::BitOr
                    | BinaryOp::BitXor
                    | BinaryOp::Shl
                    | BinaryOp::Shr => {
                        for (t, sub) in [(lt, a), (rt, b)] {
                            if t != Type::Int {
                                let logical = match sop {
                                    BinaryOp::BitAnd => Some("`&&`"),
                                    BinaryOp::BitOr => Some("`||`"),
                                    BinaryOp::BitXor => Some("`!=`"),
                                    _ => None,
                                };
                                let help = match (t, logical) {
                                    (Type::Bool, Some(l)) if lt == Type::Bool && rt == Type::Bool => format!(
                                        "`{}` is an integer bit operator: for bools use {l}",
                                        op.symbol()
                                    ),
                                    (Type::Bool, Some(l)) => format!(
                                        "`{}` is an integer bit operator and binds tighter than comparisons: for a condition use {l}",
                                        op.symbol()
                                    ),
                                    (Type::Bool, None) => "bit operators take ints: `int(COND)` turns a condition into 0 or 1".to_string(),
                                    _ => format!(
                                        "`{}` is an integer bit operator: `int(x)` converts a float (shifts by a power of two are `x * exp2(n)` in floats)",
                                        op.symbol()
                                    ),
                                };
                                self.error(
                                    "attnc::sema::type_mismatch",
                                    format!("`{}` expects int operands, found {t}", op.symbol()),
                                    Label::new(sub.span, format!("this is {t}")),
                                )
                                .with_help(help);
                                return None;
                            }
                        }
                        Some((
                            self.push(Expr::Binary(sop, l, r), Type::Int, span),
                            Type::Int,
                        ))
                    }
                    _ => {
                        for (t, sub) in [(lt, a), (rt, b)] {
                            if t == Type::Bool {
                                self.error(
                                    "attnc::sema::type_mismatch",
                                    format!("`{}` expects numbers, found bool", op.symbol()),
                                    Label::new(sub.span, "this is bool"),
                                )
                                .with_help("use `if COND { 1 } else { 0 }` or `int(COND)` to turn a condition into a number");
                                return None;
                            }
                        }
                        let mut ids = [l, r];
                        let t = self.unify_numeric(&mut ids);
                        Some((self.push(Expr::Binary(sop, ids[0], ids[1]), t, span), t))
                    }
                }
            }
            ExprKind::Reduce(r) => self.reduce(r, span, ctx),
            ExprKind::If(c, a, b) => {
                let cond = self.expr(c, ctx);
                let then = self.expr(a, ctx);
                let other = self.expr(b, ctx);
                let ((cid, ct), (mut tid, tt), (mut oid, ot)) = (cond?, then?, other?);
                if ct != Type::Bool {
                    self.error(
                        "attnc::sema::type_mismatch",
                        format!("the condition of `if` must be bool, found {ct}"),
                        Label::new(c.span, format!("this is {ct}")),
                    )
                    .with_help("compare it, e.g. `if x != 0 { ... }`");
                    return None;
                }
                let t = if tt == ot {
                    tt
                } else if tt.is_numeric() && ot.is_numeric() {
                    let mut ids = [tid, oid];
                    let t = self.unify_numeric(&mut ids);
                    [tid, oid] = ids;
                    t
                } else {
                    self.error(
                        "attnc::sema::type_mismatch",
                        format!("the branches of `if` have different types: {tt} and {ot}"),
                        Label::new(a.span, format!("this is {tt}")),
                    )
                    .with_label(Label::new(b.span, format!("this is {ot}")))
                    .with_help("both branches must be numbers, or both bool");
                    return None;
                };
                Some((
                    self.push(
                        Expr::Select {
                            cond: cid,
                            then: tid,
                            otherwise: oid,
                        },
                        t,
                        span,
                    ),
                    t,
                ))
            }
            ExprKind::Index(name, args) => self.index(name, args, span, ctx),
            ExprKind::Call(name, args) => self.call(name, args, span, ctx),
        }
    }

    fn name(&mut self, n: &ast::Ident, ctx: Context) -> Option<(ExprId, Type)> {
        let span = n.span;
        if let Some((function, _)) = self.calls.last() {
            // In a function body its parameters and lets come first; the
            // per-element names are not in scope: they are passed in.
            let local = self.scope.contains_key(&n.name);
            if !local && (ELEMENT_NAMES.contains(&n.name.as_str()) || n.name == "causal") {
                let function = function.clone();
                self.error(
                    "attnc::sema::fn_scope",
                    format!("function `{function}` cannot use `{}`", n.name),
                    Label::new(span, "not in scope in a function"),
                )
                .with_help(format!(
                    "a function sees only its parameters: add a parameter (e.g. `{}: {}`) and pass `{}` at the call",
                    n.name,
                    if n.name == "score" { "float" } else if n.name == "causal" { "bool" } else { "int" },
                    n.name
                ));
                return None;
            }
            if local {
                return self.scoped_name(n, ctx);
            }
        }
        let index_var = |s: &str| match s {
            "b" => Some(Var::B),
            "h" => Some(Var::H),
            "q" => Some(Var::Q),
            "kv" => Some(Var::Kv),
            _ => None,
        };
        if let Some(v) = index_var(&n.name) {
            if ctx == Context::Scale {
                self.error(
                    "attnc::sema::scale_not_constant",
                    format!("`scale` cannot depend on the index `{}`", n.name),
                    Label::new(span, "varies per element"),
                )
                .with_help("the scale is one number per call; fold per-element factors into `score = ...` instead");
                return None;
            }
            return Some((self.push(Expr::Var(v), Type::Int, span), Type::Int));
        }
        if let Some(s) = ShapeVar::from_name(&n.name) {
            return Some((self.push(Expr::Shape(s), Type::Int, span), Type::Int));
        }
        match n.name.as_str() {
            "score" => {
                return match ctx {
                    Context::Score => {
                        Some((self.push(Expr::Score, Type::Float, span), Type::Float))
                    }
                    Context::Let => {
                        self.score_use.get_or_insert(span);
                        Some((self.push(Expr::Score, Type::Float, span), Type::Float))
                    }
                    Context::Mask => {
                        self.error(
                            "attnc::sema::score_outside_score",
                            "`score` cannot be used in `mask`".into(),
                            Label::new(span, "the mask is decided before scores exist"),
                        )
                        .with_help("a mask may use only indices, shapes, params and buffers; move score-dependent logic into `score = ...` (e.g. `if COND { score } else { -1e30 }`)");
                        None
                    }
                    Context::Scale => {
                        self.error(
                            "attnc::sema::score_outside_score",
                            "`score` cannot be used in `scale`".into(),
                            Label::new(span, "the scale is applied before the score exists"),
                        )
                        .with_help("use `score = ...` to transform scores");
                        None
                    }
                };
            }
            "causal" => {
                if ctx == Context::Scale {
                    self.error(
                        "attnc::sema::scale_not_constant",
                        "`scale` cannot depend on `causal`".into(),
                        Label::new(span, "varies per element"),
                    )
                    .with_help("the scale is one number per call; put conditions in `mask = ...` or `score = ...`");
                    return None;
                }
                let q = self.push(Expr::Var(Var::Q), Type::Int, span);
                let kv = self.push(Expr::Var(Var::Kv), Type::Int, span);
                return Some((
                    self.push(Expr::Binary(BinaryOp::Ge, q, kv), Type::Bool, span),
                    Type::Bool,
                ));
            }
            _ => {}
        }
        self.scoped_name(n, ctx)
    }

    /// A name declared in the block (or the function being inlined).
    fn scoped_name(&mut self, n: &ast::Ident, ctx: Context) -> Option<(ExprId, Type)> {
        let span = n.span;
        match self.scope.get(&n.name).map(|(b, s)| (*b, *s)) {
            Some((Binding::Param(id), _)) => {
                let ty = self.spec.param(id).ty;
                Some((self.push(Expr::Param(id), ty, span), ty))
            }
            Some((Binding::Let { value, score_use }, decl)) => {
                if let Some(use_span) = score_use {
                    match ctx {
                        Context::Let => {
                            self.score_use.get_or_insert(use_span);
                        }
                        Context::Mask | Context::Scale => {
                            let what = if ctx == Context::Mask {
                                "mask"
                            } else {
                                "scale"
                            };
                            self.error(
                                "attnc::sema::score_outside_score",
                                format!("`{what}` uses `{}`, which depends on `score`", n.name),
                                Label::new(span, format!("used in `{what}` here")),
                            )
                            .with_label(Label::new(use_span, "`score` is used here"))
                            .with_label(Label::new(decl, "declared here"))
                            .with_help("`score` is only available in `score = ...`");
                            return None;
                        }
                        Context::Score => {}
                    }
                }
                if ctx == Context::Scale
                    && self.spec.deps(value).intersects(Deps(
                        Deps::B.0 | Deps::H.0 | Deps::Q.0 | Deps::KV.0 | Deps::BUFFER.0,
                    ))
                {
                    self.error(
                        "attnc::sema::scale_not_constant",
                        format!("`scale` cannot use `{}`, which varies per element", n.name),
                        Label::new(span, "depends on indices or buffers"),
                    )
                    .with_label(Label::new(decl, "declared here"))
                    .with_help(
                        "the scale is one number per call: use params, shapes and literals only",
                    );
                    return None;
                }
                Some((value, self.spec.ty(value)))
            }
            Some((Binding::Buffer(id), _)) => {
                let b = self.spec.buffer(id);
                let dims = b.dims.len();
                let example = b
                    .dims
                    .iter()
                    .enumerate()
                    .map(|(i, d)| match d {
                        Dim::Shape(ShapeVar::B) => "b",
                        Dim::Shape(ShapeVar::H) => "h",
                        Dim::Shape(ShapeVar::Q) => "q",
                        Dim::Shape(ShapeVar::Kv) => "kv",
                        _ => ["i", "j", "k", "l"].get(i).copied().unwrap_or("x"),
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                self.error(
                    "attnc::sema::buffer_not_indexed",
                    format!("buffer `{}` must be indexed", n.name),
                    Label::new(span, format!("a {}-dimensional buffer", dims)),
                )
                .with_help(format!("read one element with `{}[{example}]`", n.name));
                None
            }
            None => {
                self.unknown_name(n, "name");
                None
            }
        }
    }

    fn unknown_name(&mut self, n: &ast::Ident, what: &str) {
        if self.poisoned.contains(&n.name) && what != "function" {
            return;
        }
        if let Some(later) = self.declared_later.get(&n.name).copied() {
            if later.start > n.span.start {
                self.error(
                    "attnc::sema::used_before_declared",
                    format!("`{}` is used before it is declared", n.name),
                    Label::new(n.span, "used here"),
                )
                .with_label(Label::new(later, "declared here"))
                .with_help("move the declaration above its first use");
                return;
            }
        }
        let reduction = ast::ReduceOp::ALL.iter().any(|r| r.name() == n.name);
        let function = builtin_function(&n.name) || self.functions.contains_key(&n.name);
        let builtin = BUILTIN_NAMES.contains(&n.name.as_str());
        if what == "buffer" && (builtin || function || reduction) {
            let (kind, help) = if builtin {
                (
                    "a built-in value",
                    "`b h q kv` (indices), `B H HKV Q KV D` (shapes), `causal` and `score` are values; only names declared with `buffer` can be indexed or passed to `ancestor`".to_string(),
                )
            } else {
                (
                    "a function",
                    format!("call it with its arguments: `{}(...)`", n.name),
                )
            };
            self.error(
                "attnc::sema::not_a_buffer",
                format!("`{}` is {kind}, not a buffer", n.name),
                Label::new(n.span, "not a buffer"),
            )
            .with_help(help);
            return;
        }
        let called = what == "function";
        if reduction || (function && !called) {
            let range_help = format!(
                "`{0}` over a range is written `{0}(i in 0..N: ...)`, with `i` a new name for each term's index",
                n.name
            );
            let (message, label, help) = if called {
                (
                    "a reduction, not a function",
                    "needs `i in LO..HI:`",
                    range_help,
                )
            } else if function {
                (
                    "a function, not a value",
                    "not called",
                    format!("call it with its arguments: `{}(...)`", n.name),
                )
            } else {
                ("a reduction, not a value", "not called", range_help)
            };
            self.error(
                "attnc::sema::not_called",
                format!("`{}` is {message}", n.name),
                Label::new(n.span, label),
            )
            .with_help(help);
            return;
        }
        // Each suggestion compares the name with every name in scope: past
        // the first few dozen unknown names of a block (a file of thousands
        // of them took minutes), the help lists what is in scope instead.
        self.suggested += 1;
        let mut candidates: Vec<String> = Vec::new();
        if self.suggested <= MAX_SUGGESTIONS {
            candidates = if what == "function" {
                Func::ALL
                    .iter()
                    .map(|f| f.name().to_string())
                    .chain(["ancestor".to_string()])
                    .chain(self.functions.keys().cloned())
                    .collect()
            } else {
                self.scope
                    .keys()
                    .cloned()
                    .chain(BUILTIN_NAMES.iter().map(|s| s.to_string()))
                    .collect()
            };
            candidates.sort();
            candidates.retain(|c| *c != n.name);
        }
        let help = match suggest(&n.name, candidates.iter().map(|s| s.as_str())) {
            Some(s) => format!("did you mean `{s}`?"),
            None if what == "function" => format!(
                "the functions are {} ancestor, and the reductions sum any all max min (`sum(i in 0..4: ...)`)",
                Func::ALL.map(Func::name).join(" ")
            ),
            None => "names in scope: b h q kv (indices), B H HKV Q KV D (shapes), causal, score (in `score =`), and params, buffers and lets declared above".to_string(),
        };
        self.error(
            "attnc::sema::unknown_name",
            format!("unknown {what} `{}`", n.name),
            Label::new(n.span, format!("not a known {what}")),
        )
        .with_help(help);
    }

    fn index(
        &mut self,
        name: &ast::Ident,
        args: &[ast::Expr],
        span: Span,
        ctx: Context,
    ) -> Option<(ExprId, Type)> {
        let checked: Vec<_> = args.iter().map(|a| self.expr(a, ctx)).collect();
        let id = match self.scope.get(&name.name).map(|(b, _)| *b) {
            Some(Binding::Buffer(id)) => id,
            Some(_) => {
                self.error(
                    "attnc::sema::not_a_buffer",
                    format!("`{}` is not a buffer and cannot be indexed", name.name),
                    Label::new(name.span, "not a buffer"),
                )
                .with_help("only names declared with `buffer` can be indexed");
                return None;
            }
            None => {
                self.unknown_name(name, "buffer");
                return None;
            }
        };
        if ctx == Context::Scale {
            self.error(
                "attnc::sema::scale_not_constant",
                format!("`scale` cannot read buffer `{}`", name.name),
                Label::new(span, "varies per element"),
            )
            .with_help("the scale is one number per call: use params, shapes and literals only");
            return None;
        }
        let buf = self.spec.buffer(id).clone();
        if args.len() != buf.dims.len() {
            let dims = buf
                .dims
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            self.error(
                "attnc::sema::wrong_index_count",
                format!(
                    "buffer `{}` has {} dimension{} but is indexed with {}",
                    name.name,
                    buf.dims.len(),
                    plural(buf.dims.len()),
                    args.len()
                ),
                Label::new(
                    span,
                    format!(
                        "{} ind{}",
                        args.len(),
                        if args.len() == 1 { "ex" } else { "ices" }
                    ),
                ),
            )
            .with_label(Label::new(
                buf.span,
                format!("declared as `{}[{dims}]`", name.name),
            ))
            .with_help(format!(
                "give one int index per dimension: `{}[{}]`",
                name.name,
                (0..buf.dims.len())
                    .map(|_| "_")
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            return None;
        }
        let mut indices = Vec::new();
        let mut ok = true;
        for (a, c) in args.iter().zip(checked) {
            let Some((i, t)) = c else {
                ok = false;
                continue;
            };
            if t != Type::Int {
                ok = false;
                self.error(
                    "attnc::sema::type_mismatch",
                    format!("buffer indices must be int, found {t}"),
                    Label::new(a.span, format!("this is {t}")),
                )
                .with_help(if t == Type::Float {
                    "convert with `int(x)` (truncates) or `int(floor(x))`"
                } else {
                    "use `if COND { 1 } else { 0 }`"
                });
            }
            indices.push(i);
        }
        if !ok {
            return None;
        }
        Some((
            self.push(
                Expr::Load {
                    buffer: id,
                    indices,
                },
                buf.elem,
                span,
            ),
            buf.elem,
        ))
    }

    fn call(
        &mut self,
        name: &ast::Ident,
        args: &[ast::Expr],
        span: Span,
        ctx: Context,
    ) -> Option<(ExprId, Type)> {
        if name.name == "ancestor" {
            return self.ancestor(name, args, span, ctx);
        }
        if let Some(f) = self.functions.get(&name.name).cloned() {
            return self.user_call(f, args, span, ctx);
        }
        let Some(func) = Func::from_name(&name.name) else {
            for a in args {
                self.expr(a, ctx);
            }
            if let Some((Binding::Buffer(_), _)) = self.scope.get(&name.name) {
                self.error(
                    "attnc::sema::not_a_function",
                    format!("`{}` is a buffer, not a function", name.name),
                    Label::new(name.span, "a buffer"),
                )
                .with_help(format!("index buffers with brackets: `{}[...]`", name.name));
                return None;
            }
            self.unknown_name(name, "function");
            return None;
        };
        let checked: Vec<_> = args.iter().map(|a| self.expr(a, ctx)).collect();
        if args.len() != func.arity() {
            let sig = match func {
                Func::Min | Func::Max => format!("{}(a, b)", func.name()),
                Func::Pow => "pow(x, y)".to_string(),
                Func::Clamp => "clamp(x, lo, hi)".to_string(),
                _ => format!("{}(x)", func.name()),
            };
            self.error(
                "attnc::sema::wrong_arity",
                format!(
                    "`{}` takes {} argument{}, found {}",
                    func.name(),
                    func.arity(),
                    plural(func.arity()),
                    args.len()
                ),
                Label::new(
                    span,
                    format!("{} argument{}", args.len(), plural(args.len())),
                ),
            )
            .with_help(format!("call it as `{sig}`"));
            return None;
        }
        let mut ids = Vec::new();
        let mut types = Vec::new();
        for c in checked {
            let (i, t) = c?;
            ids.push(i);
            types.push(t);
        }
        let bool_arg = types.iter().position(|t| *t == Type::Bool);
        let ty = match func {
            Func::Float => {
                if types[0] == Type::Float {
                    return Some((ids[0], Type::Float));
                }
                Type::Float
            }
            Func::Int => {
                if types[0] == Type::Int {
                    return Some((ids[0], Type::Int));
                }
                Type::Int
            }
            _ => {
                if let Some(i) = bool_arg {
                    self.error(
                        "attnc::sema::type_mismatch",
                        format!("`{}` expects numbers, found bool", func.name()),
                        Label::new(args[i].span, "this is bool"),
                    )
                    .with_help("convert a condition with `int(c)` or `float(c)`");
                    return None;
                }
                match func {
                    Func::Abs | Func::Sign | Func::Min | Func::Max | Func::Clamp => {
                        self.unify_numeric(&mut ids)
                    }
                    _ => {
                        for id in ids.iter_mut() {
                            *id = self.cast_to_float(*id);
                        }
                        Type::Float
                    }
                }
            }
        };
        Some((self.push(Expr::Call(func, ids), ty, span), ty))
    }

    fn ancestor(
        &mut self,
        name: &ast::Ident,
        args: &[ast::Expr],
        span: Span,
        ctx: Context,
    ) -> Option<(ExprId, Type)> {
        if args.len() != 3 {
            for (k, a) in args.iter().enumerate() {
                // The first argument names the parent buffer; it is not read as a value.
                if k == 0 && matches!(a.kind, ExprKind::Name(_)) {
                    continue;
                }
                self.expr(a, ctx);
            }
            self.error(
                "attnc::sema::wrong_arity",
                format!("`ancestor` takes 3 arguments, found {}", args.len()),
                Label::new(
                    span,
                    format!("{} argument{}", args.len(), plural(args.len())),
                ),
            )
            .with_help(
                "call it as `ancestor(parent, i, j)` with `parent` a 1-dimensional int buffer",
            );
            return None;
        }
        let parent = match &args[0].kind {
            ExprKind::Name(n) => match self.scope.get(&n.name).map(|(b, _)| *b) {
                Some(Binding::Buffer(id)) => Some(id),
                None => {
                    self.unknown_name(n, "buffer");
                    None
                }
                Some(_) => {
                    self.error(
                        "attnc::sema::type_mismatch",
                        format!(
                            "the first argument of `ancestor` must be a buffer, `{}` is not",
                            n.name
                        ),
                        Label::new(n.span, "not a buffer"),
                    )
                    .with_help("pass the parent buffer by name: `ancestor(parent, q, kv)`");
                    None
                }
            },
            _ => {
                self.error(
                    "attnc::sema::type_mismatch",
                    "the first argument of `ancestor` must be a buffer name".into(),
                    Label::new(args[0].span, "expected a buffer name"),
                )
                .with_help("pass the parent buffer by name: `ancestor(parent, q, kv)`");
                None
            }
        };
        let i = self.expr(&args[1], ctx);
        let j = self.expr(&args[2], ctx);
        let parent = parent?;
        let buf = self.spec.buffer(parent).clone();
        if buf.dims.len() != 1 || buf.elem != Type::Int {
            self.error(
                "attnc::sema::type_mismatch",
                format!(
                    "`ancestor` needs a 1-dimensional int buffer, `{}` is {}[{}]",
                    buf.name,
                    buf.elem,
                    buf.dims
                        .iter()
                        .map(|d| d.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                Label::new(args[0].span, "wrong kind of buffer"),
            )
            .with_label(Label::new(buf.span, "declared here"))
            .with_help("declare the tree as `buffer parent[KV]: int` (-1 marks a root)");
            return None;
        }
        let ((i, it), (j, jt)) = (i?, j?);
        for (t, a) in [(it, &args[1]), (jt, &args[2])] {
            if t != Type::Int {
                self.error(
                    "attnc::sema::type_mismatch",
                    format!("`ancestor` positions must be int, found {t}"),
                    Label::new(a.span, format!("this is {t}")),
                )
                .with_help("pass token positions, e.g. `ancestor(parent, q, kv)`");
                return None;
            }
        }
        if ctx == Context::Scale {
            self.error(
                "attnc::sema::scale_not_constant",
                "`scale` cannot read buffers".into(),
                Label::new(name.span, "varies per element"),
            )
            .with_help("the scale is one number per call: use params, shapes and literals only");
            return None;
        }
        Some((
            self.push(Expr::Ancestor { parent, i, j }, Type::Bool, span),
            Type::Bool,
        ))
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn sema_type(k: ScalarKind) -> Type {
    match k {
        ScalarKind::Int => Type::Int,
        ScalarKind::Float => Type::Float,
        ScalarKind::Bool => Type::Bool,
    }
}

fn lit_type(v: LitValue) -> Type {
    match v {
        LitValue::Int(_) => Type::Int,
        LitValue::Float(_) => Type::Float,
        LitValue::Bool(_) => Type::Bool,
    }
}

fn sema_binop(op: ast::BinaryOp) -> BinaryOp {
    use ast::BinaryOp as A;
    match op {
        A::Or => BinaryOp::Or,
        A::And => BinaryOp::And,
        A::Eq => BinaryOp::Eq,
        A::Ne => BinaryOp::Ne,
        A::Lt => BinaryOp::Lt,
        A::Le => BinaryOp::Le,
        A::Gt => BinaryOp::Gt,
        A::Ge => BinaryOp::Ge,
        A::Add => BinaryOp::Add,
        A::Sub => BinaryOp::Sub,
        A::Mul => BinaryOp::Mul,
        A::Div => BinaryOp::Div,
        A::Rem => BinaryOp::Rem,
        A::BitAnd => BinaryOp::BitAnd,
        A::BitOr => BinaryOp::BitOr,
        A::BitXor => BinaryOp::BitXor,
        A::Shl => BinaryOp::Shl,
        A::Shr => BinaryOp::Shr,
    }
}

/// The closest candidate by edit distance, if it is close enough to be a likely typo.
pub fn suggest<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    // Rank by case-insensitive distance, then by exact-case distance.
    let mut best: Option<((usize, usize), &str)> = None;
    let lower = name.to_lowercase();
    for c in candidates {
        // Any letter is one edit from any other, so a one-letter name only
        // suggests the same letter in another case (`d` -> `D`).
        let limit = if name.chars().count() <= 1 {
            0
        } else {
            (name.len().max(c.len()) / 3).max(1)
        };
        // The distance is at least the difference of the lengths.
        if name.len().abs_diff(c.len()) > limit {
            continue;
        }
        let d = edit_distance(&lower, &c.to_lowercase());
        let key = (d, edit_distance(name, c));
        if d <= limit && best.is_none_or(|(bk, _)| key < bk) {
            best = Some((key, c));
        }
    }
    best.map(|(_, c)| c)
}

/// Edit distance counting an adjacent transposition as one edit
/// (optimal string alignment), so `dco` is one edit from `doc`.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, x) in d[0].iter_mut().enumerate() {
        *x = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_dimensions_are_int_expressions_of_params_and_shapes() {
        let src = "attention a {\n param n: int = 3\n buffer t[n + 1, (KV - 1) / 64 + 1, -n + KV * 2, Q / n]: float\n score = score + t[0, 0, 0, 0]\n}";
        let file = crate::syntax::parse(src).unwrap();
        let module = crate::sema::check(&file).unwrap();
        let mut spec = module.specs[0].clone();
        let dims: Vec<String> = spec.buffers[0].dims.iter().map(|d| d.to_string()).collect();
        assert_eq!(dims, ["4", "(KV - 1) / 64 + 1", "(-3) + KV * 2", "Q / 3"]);
        let shapes = super::super::eval::Shapes {
            b: 1,
            h: 1,
            hkv: 1,
            q: 7,
            kv: 65,
            d: 8,
        };
        assert_eq!(
            shapes.buffer_shape(&spec.buffers[0]).unwrap(),
            [4, 2, 127, 3]
        );
        // An override re-sizes the buffer; a divisor of 0 leaves it undefined.
        spec.set_param("n", "0").unwrap();
        let err = shapes.buffer_shape(&spec.buffers[0]).unwrap_err();
        assert_eq!(err.to_string(), "Q / 0");
        spec.set_param("n", "-200").unwrap();
        assert_eq!(spec.buffers[0].dims[0].to_string(), "(-199)");
        assert_eq!(
            shapes
                .buffer_shape(&spec.buffers[0])
                .unwrap_err()
                .to_string(),
            "(-199)"
        );
    }

    /// `f0(x) = x` and `n` functions `fI(x) = f{I-1}(x) + 1.0 + ...` (with
    /// `terms` additions), then a block with `item`.
    fn call_chain(n: usize, terms: usize, item: &str) -> String {
        let mut src = String::from("fn f0(x: float) -> float { x }\n");
        for i in 1..=n {
            src += &format!(
                "fn f{i}(x: float) -> float {{ f{}(x){} }}\n",
                i - 1,
                " + 1.0".repeat(terms)
            );
        }
        src + &format!("attention a {{ {item} }}\n")
    }

    /// The one error of checking `src`, which must be `too_deep`, checked on
    /// a thread with the main thread's 8 MiB of stack, as the CLI has.
    fn too_deep(src: String) -> String {
        let diags = std::thread::Builder::new()
            .stack_size(8 << 20)
            .spawn(move || crate::sema::check(&crate::syntax::parse(&src).unwrap()).unwrap_err())
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(diags.len(), 1, "{diags:?}");
        assert_eq!(diags[0].code, "attnc::sema::too_deep");
        diags[0].message.clone()
    }

    /// A chain of functions each calling the one before: an error, not a
    /// stack overflow, whether the chain is used or only checked on its own.
    #[test]
    fn long_chains_of_calls_are_errors_not_stack_overflows() {
        for src in [
            call_chain(3000, 1, "mask = causal"),
            call_chain(3000, 1, "mask = f3000(float(q)) > 0.0"),
            call_chain(MAX_CALL_DEPTH, 1, "mask = f64(float(q)) > 0.0"),
        ] {
            let message = too_deep(src);
            assert!(
                message.contains("function calls nest more than 64 deep"),
                "{message}"
            );
        }
        // One level less is checked as usual.
        let src = call_chain(MAX_CALL_DEPTH - 1, 1, "mask = f63(float(q)) > 0.0");
        crate::sema::check(&crate::syntax::parse(&src).unwrap()).unwrap();
    }

    /// Calls within the depth limit whose bodies are each nearly as deep as
    /// the parser allows (`f(x) + 1.0 + 1.0 + ...` nests to the left, 200
    /// levels): an error once the checker is past what the depth check would
    /// accept, not a stack overflow.
    #[test]
    fn deep_bodies_of_nested_calls_are_errors_not_stack_overflows() {
        let message = too_deep(call_chain(39, 200, "score = f39(score)"));
        assert!(
            message.contains("counting the bodies of the functions it calls"),
            "{message}"
        );
    }

    /// Past the first few dozen unknown names of a block, the help lists
    /// what is in scope instead of searching it for the nearest name.
    #[test]
    fn suggestions_stop_after_the_first_unknown_names() {
        let mut src = String::from("attention a {\n let x = q\n");
        for i in 0..(MAX_SUGGESTIONS + 10) {
            src += &format!(" let y{i} = xx + 1\n");
        }
        src += " mask = causal\n}\n";
        let diags = crate::sema::check(&crate::syntax::parse(&src).unwrap()).unwrap_err();
        assert_eq!(diags.len(), MAX_SUGGESTIONS + 10);
        let helps: Vec<&str> = diags.iter().map(|d| d.help.as_deref().unwrap()).collect();
        assert!(
            helps[..MAX_SUGGESTIONS]
                .iter()
                .all(|h| *h == "did you mean `x`?"),
            "{helps:?}"
        );
        assert!(
            helps[MAX_SUGGESTIONS..]
                .iter()
                .all(|h| h.starts_with("names in scope")),
            "{helps:?}"
        );
    }

    #[test]
    fn suggestions_count_transpositions() {
        assert_eq!(edit_distance("dco", "doc"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(suggest("dco", ["doc", "q", "kv"].into_iter()), Some("doc"));
        assert_eq!(suggest("kvv", ["kv", "KV", "q"].into_iter()), Some("kv"));
        assert_eq!(suggest("zzzz", ["kv", "q"].into_iter()), None);
    }

    #[test]
    fn one_letter_names_suggest_only_a_case_change() {
        let shapes = ["B", "H", "HKV", "Q", "KV", "D"];
        assert_eq!(suggest("N", shapes.into_iter()), None);
        assert_eq!(suggest("d", shapes.into_iter()), Some("D"));
    }

    fn diags(src: &str) -> Vec<Diag> {
        crate::sema::check(&crate::syntax::parse(src).unwrap()).unwrap_err()
    }

    #[test]
    fn a_failed_declaration_is_reported_once() {
        // The bad dimension is the only error; the uses of `doc` are not unknown names.
        let d = diags("attention a { buffer doc[N]: int  mask = doc[q] == doc[kv] }");
        assert_eq!(
            d.iter().map(|d| d.code).collect::<Vec<_>>(),
            ["attnc::sema::unknown_shape"]
        );
        // A let whose value fails is not reported again where it is used.
        let d = diags("attention a { let far = q - kv > windw  mask = far || causal }");
        assert_eq!(
            d.iter().map(|d| d.message.as_str()).collect::<Vec<_>>(),
            ["unknown name `windw`"]
        );
        // A reserved name that was declared anyway.
        let d = diags("attention a { let exp = q - kv  mask = exp > 0 }");
        assert_eq!(
            d.iter().map(|d| d.code).collect::<Vec<_>>(),
            ["attnc::sema::reserved_name"]
        );
        // `ancestor` with a wrong argument count does not read its buffer argument as a value.
        let d = diags("attention a { buffer parent[KV]: int  mask = ancestor(parent, q) }");
        assert_eq!(
            d.iter().map(|d| d.code).collect::<Vec<_>>(),
            ["attnc::sema::wrong_arity"]
        );
    }
}
