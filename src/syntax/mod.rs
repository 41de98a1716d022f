//! Stage 1, syntax: `.attn` source text to a spanned AST.
//!
//! Entry point: [`parse`]. Parsing stops at the first error, reported as a
//! [`SyntaxError`] that carries a span into the source (the driver attaches
//! the source text and file name when it renders the diagnostic).

pub mod ast;
mod limits;
mod parse;

pub use ast::Span;
pub use limits::{MAX_BRACKETS, MAX_NESTING};

/// Parses a whole `.attn` file: its AST, or the first syntax error. Brackets
/// nested deeper than [`MAX_BRACKETS`] and expressions deeper than
/// [`MAX_NESTING`] are errors, so that no stage can run out of stack
/// recursing over an expression.
pub fn parse(source: &str) -> Result<ast::File, SyntaxError> {
    limits::check_text(source)?;
    limits::check_depth(parse::parse(source)?)
}

/// A syntax error: what was expected, what was found, and where.
#[derive(Debug, Clone, PartialEq, thiserror::Error, miette::Diagnostic)]
#[error("{message}")]
#[diagnostic(code(attnc::syntax))]
pub struct SyntaxError {
    pub message: String,
    #[label("{label}")]
    pub span: miette::SourceSpan,
    pub label: String,
    #[help]
    pub help: Option<String>,
}

impl SyntaxError {
    pub fn new(span: Span, message: impl Into<String>, label: impl Into<String>) -> SyntaxError {
        SyntaxError {
            message: message.into(),
            span: span.into(),
            label: label.into(),
            help: None,
        }
    }

    pub fn with_help(mut self, help: impl Into<String>) -> SyntaxError {
        self.help = Some(help.into());
        self
    }
}
