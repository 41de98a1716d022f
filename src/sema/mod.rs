//! Stage 2, sema: the AST to a checked spec.
//!
//! Entry points: [`check`] (names, types, dependences; every error found) and
//! [`Spec::set_param`] (param overrides before compiling). The checked
//! [`Spec`] is what every later stage consumes; none of them sees the AST.
//! [`eval`] evaluates checked expressions on concrete values; it is shared by
//! the reference interpreter and the block-map analysis.

mod check;
pub mod eval;
mod fold;
pub mod ir;
mod limits;
mod print;

use std::fmt;

pub use check::suggest;
pub use fold::f32_overflow;
pub use ir::*;
pub use limits::MAX_DEPTH;

/// Exclusive bound on every shape (B, H, HKV, Q, KV, D) and every position
/// (`q_offset + Q` and KV at most this): `2^31 - 1`. Binding checks it, so
/// backends may compute index differences such as `q - kv` in 32-bit lanes.
pub const POSITION_LIMIT: i64 = i32::MAX as i64;

use crate::syntax::{ast, Span};

/// Checks a parsed file: names, types, dependences, and the depth limit of
/// expressions ([`MAX_DEPTH`]). Returns every error found, not only the first.
pub fn check(file: &ast::File) -> Result<Module, Vec<Diag>> {
    check_with(file, None)
}

/// [`check`], with the params of one attention block given other values
/// from the start (`(block, name → value)`): what an override of a param in
/// [`Spec::fixed_params`] needs.
pub fn check_with(
    file: &ast::File,
    overrides: Option<(&str, &std::collections::HashMap<String, Value>)>,
) -> Result<Module, Vec<Diag>> {
    let module = check::check_with(file, overrides)?;
    limits::check_depth(&module)?;
    Ok(module)
}

/// A secondary or primary label of a diagnostic.
#[derive(Clone, Debug, PartialEq)]
pub struct Label {
    pub span: Span,
    pub text: String,
}

impl Label {
    pub fn new(span: Span, text: impl Into<String>) -> Label {
        Label {
            span,
            text: text.into(),
        }
    }
}

/// A checker diagnostic: a code, a message saying what was expected and what
/// was found, labelled spans, and a suggested fix.
#[derive(Clone, Debug, PartialEq)]
pub struct Diag {
    pub code: &'static str,
    pub message: String,
    pub labels: Vec<Label>,
    pub help: Option<String>,
}

impl Diag {
    pub fn error(code: &'static str, message: String, primary: Label) -> Diag {
        Diag {
            code,
            message,
            labels: vec![primary],
            help: None,
        }
    }

    pub fn with_label(&mut self, label: Label) -> &mut Diag {
        self.labels.push(label);
        self
    }

    pub fn with_help(&mut self, help: impl Into<String>) -> &mut Diag {
        self.help = Some(help.into());
        self
    }
}

impl fmt::Display for Diag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Diag {}

impl miette::Diagnostic for Diag {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new(self.code))
    }

    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = miette::LabeledSpan> + '_>> {
        Some(Box::new(self.labels.iter().enumerate().map(|(i, l)| {
            let span: miette::SourceSpan = l.span.into();
            if i == 0 {
                miette::LabeledSpan::new_primary_with_span(Some(l.text.clone()), span)
            } else {
                miette::LabeledSpan::new_with_span(Some(l.text.clone()), span)
            }
        })))
    }
}

/// A param override that does not fit its declaration.
#[derive(Clone, Debug, PartialEq, thiserror::Error, miette::Diagnostic)]
pub enum ParamError {
    #[error("attention `{spec}` has no param `{name}`")]
    #[diagnostic(code(attnc::param::unknown))]
    Unknown {
        spec: String,
        name: String,
        #[help]
        help: String,
    },
    #[error("param `{name}` is declared {ty}, but the override `{value}` is not {article} {ty}")]
    #[diagnostic(code(attnc::param::type_mismatch))]
    WrongType {
        name: String,
        ty: Type,
        article: &'static str,
        value: String,
        #[label("declared {ty} here")]
        span: miette::SourceSpan,
        #[help]
        help: String,
    },
    #[error(
        "param `{name}` sets the range of a reduction, so it is fixed when the spec is checked"
    )]
    #[diagnostic(
        code(attnc::param::fixed),
        help("give it when loading the spec (`attnc::load` with `SpecOptions::params`, or `--param {name}=...`), which expands the reduction for that value")
    )]
    Fixed {
        name: String,
        #[label("declared here")]
        span: miette::SourceSpan,
    },
    #[error("param `{name}` = {value} makes a constant of the spec {constant}, outside the range of f32")]
    #[diagnostic(
        code(attnc::param::f32_range),
        help("the compiled backends compute in f32 (largest about 3.4e38), where this constant would be infinite; choose a smaller value")
    )]
    OutOfF32Range {
        name: String,
        value: String,
        constant: String,
        #[label("this becomes {constant}")]
        span: miette::SourceSpan,
    },
}

/// The value of an override `text` for a param of type `ty`: an int param
/// takes an integer, a float param any finite number, a bool param `true` or
/// `false`.
pub fn param_text(ty: Type, text: &str) -> Option<Value> {
    let t = text.trim();
    match ty {
        Type::Int => t.parse::<i64>().ok().map(Value::Int),
        Type::Float => t
            .parse::<f64>()
            .ok()
            .filter(|x| x.is_finite())
            .map(Value::Float),
        Type::Bool => match t {
            "true" => Some(Value::Bool(true)),
            "false" => Some(Value::Bool(false)),
            _ => None,
        },
    }
}

/// The override `name = text` against the params `(name, type, span)` that
/// attention block `block` declares: the index of the param and its value,
/// or the error naming what is wrong (an unknown param, with the nearest
/// name; a value that does not fit its type).
pub fn override_value(
    block: &str,
    params: &[(&str, Type, Span)],
    name: &str,
    text: &str,
) -> Result<(usize, Value), ParamError> {
    let Some(i) = params.iter().position(|p| p.0 == name) else {
        let names: Vec<&str> = params.iter().map(|p| p.0).collect();
        let help = match suggest(name, names.iter().copied()) {
            Some(s) => format!("did you mean `{s}`?"),
            None if names.is_empty() => "this attention block declares no params".to_string(),
            None => format!("its params are: {}", names.join(", ")),
        };
        return Err(ParamError::Unknown {
            spec: block.to_string(),
            name: name.to_string(),
            help,
        });
    };
    let (_, ty, span) = params[i];
    match param_text(ty, text) {
        Some(v) => Ok((i, v)),
        None => Err(ParamError::WrongType {
            name: name.to_string(),
            ty,
            article: if ty == Type::Int { "an" } else { "a" },
            value: text.to_string(),
            span: span.into(),
            help: match ty {
                Type::Int => format!("write an integer, e.g. `{name}=128`"),
                Type::Float => format!("write a finite number, e.g. `{name}=0.5`"),
                Type::Bool => format!("write `{name}=true` or `{name}=false`"),
            },
        }),
    }
}

impl Spec {
    /// Overrides a param's value, given as text (`--param window=128`).
    /// An int param takes an integer, a float param any number, a bool param
    /// `true` or `false`.
    pub fn set_param(&mut self, name: &str, text: &str) -> Result<(), ParamError> {
        let (id, v) = self.param_value(name, text)?;
        if self.fixed_params.contains(&id) {
            return Err(ParamError::Fixed {
                name: name.to_string(),
                span: self.params[id.0 as usize].span.into(),
            });
        }
        let p = &mut self.params[id.0 as usize];
        let old = std::mem::replace(&mut p.value, v);
        if let Some((at, x)) = f32_overflow(self) {
            self.params[id.0 as usize].value = old;
            return Err(ParamError::OutOfF32Range {
                name: name.to_string(),
                value: text.to_string(),
                constant: format!("{x:.3e}"),
                span: self.span(at).into(),
            });
        }
        for b in &mut self.buffers {
            b.dims = b.declared.iter().map(|d| d.resolve(&self.params)).collect();
        }
        Ok(())
    }

    /// The param `name` and the value `text` gives it, without setting it:
    /// an int param takes an integer, a float param any finite number, a
    /// bool param `true` or `false`.
    pub fn param_value(&self, name: &str, text: &str) -> Result<(ParamId, Value), ParamError> {
        let params: Vec<(&str, Type, Span)> = self
            .params
            .iter()
            .map(|p| (p.name.as_str(), p.ty, p.span))
            .collect();
        override_value(&self.name, &params, name, text).map(|(i, v)| (ParamId(i as u32), v))
    }
}

impl Module {
    /// Picks a spec by name, or the only one when `name` is `None`.
    pub fn entry(&self, name: Option<&str>) -> Result<&Spec, EntryError> {
        let names = || {
            self.specs
                .iter()
                .map(|s| s.name.clone())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match name {
            Some(n) => self
                .specs
                .iter()
                .find(|s| s.name == n)
                .ok_or_else(|| EntryError::Unknown {
                    name: n.to_string(),
                    available: names(),
                }),
            None if self.specs.len() == 1 => Ok(&self.specs[0]),
            None => Err(EntryError::Ambiguous { available: names() }),
        }
    }
}

/// Choosing an attention block of a file failed.
#[derive(Clone, Debug, PartialEq, thiserror::Error, miette::Diagnostic)]
pub enum EntryError {
    #[error("no attention block named `{name}`")]
    #[diagnostic(code(attnc::entry::unknown), help("the file defines: {available}"))]
    Unknown { name: String, available: String },
    #[error("the file defines several attention blocks; choose one")]
    #[diagnostic(
        code(attnc::entry::ambiguous),
        help("pass `--entry NAME`; the file defines: {available}")
    )]
    Ambiguous { available: String },
}
