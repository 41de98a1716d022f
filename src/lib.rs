//! attnc: an attention compiler.
pub mod syntax;
