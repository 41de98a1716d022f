//! The driver: the pipeline as a flat list of stages, and the library's
//! front door.
//!
//! source text → [`syntax::parse`] → [`sema::check`] → param overrides →
//! (backend). Each stage's errors become an [`Error`] that carries the
//! source text, so rendering it (with miette) shows file, line, column and a
//! caret under the offending span.

use std::fmt;
use std::sync::Arc;

use miette::{Diagnostic, NamedSource};

use crate::bind::{bind, BindError, Inputs, Outputs};
use crate::sema::eval::EvalError;
use crate::sema::{self, Diag, EntryError, Module, ParamError, Spec};
use crate::syntax::{self, ast, SyntaxError};

/// One `.attn` source text with the name it is reported under.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceFile {
    pub name: String,
    pub text: String,
}

impl SourceFile {
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> SourceFile {
        SourceFile { name: name.into(), text: text.into() }
    }

    /// Reads a file from disk.
    pub fn read(path: &std::path::Path) -> Result<SourceFile, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Io { what: format!("cannot read `{}`", path.display()), reason: e.to_string() })?;
        Ok(SourceFile::new(path.display().to_string(), text))
    }

    fn named(&self) -> NamedSource<String> {
        NamedSource::new(&self.name, self.text.clone())
    }
}

/// A problem found in a spec, located in its source.
#[derive(Debug, thiserror::Error, Diagnostic)]
pub enum SpecProblem {
    #[error(transparent)]
    #[diagnostic(transparent)]
    Syntax(SyntaxError),
    #[error(transparent)]
    #[diagnostic(transparent)]
    Sema(Diag),
    #[error(transparent)]
    #[diagnostic(transparent)]
    Param(ParamError),
    #[error(transparent)]
    #[diagnostic(transparent)]
    Entry(EntryError),
}

/// Every error attnc returns. Render with `miette::Report::new(err)` (or
/// [`Error::render`]) to see the source snippets.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spec has errors; every one found is listed.
    #[error("{}", spec_summary(file, problems))]
    Spec { file: Arc<SourceFile>, problems: Vec<SpecProblem> },
    /// The inputs do not fit the spec.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// Evaluating the spec on the inputs failed (e.g. an out-of-range read).
    #[error("{error}")]
    Eval { file: Arc<SourceFile>, error: EvalError },
    /// The block map could not be built (bad tiling, overflow).
    #[error(transparent)]
    Mask(crate::mask::MaskError),
    /// Native code generation failed.
    #[error(transparent)]
    Codegen(#[from] crate::codegen::CodegenError),
    /// A file could not be read or written, or holds the wrong kind of data.
    #[error("{what}: {reason}")]
    Io { what: String, reason: String },
    /// A command-line argument is malformed.
    #[error("{0}")]
    Usage(String),
}

fn spec_summary(file: &SourceFile, problems: &[SpecProblem]) -> String {
    match problems {
        [one] => one.to_string(),
        _ => format!("`{}` has {} errors", file.name, problems.len()),
    }
}

impl Diagnostic for Error {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        match self {
            Error::Spec { problems, .. } if problems.len() == 1 => problems[0].code(),
            Error::Bind(e) => e.code(),
            Error::Mask(e) => e.code(),
            Error::Eval { error, .. } => error.code(),
            Error::Codegen(_) => Some(Box::new("attnc::codegen")),
            Error::Io { .. } => Some(Box::new("attnc::io")),
            Error::Usage(_) => Some(Box::new("attnc::usage")),
            Error::Spec { .. } => Some(Box::new("attnc::spec")),
        }
    }

    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        match self {
            Error::Spec { problems, .. } if problems.len() == 1 => problems[0].help(),
            Error::Bind(e) => e.help(),
            Error::Mask(e) => e.help(),
            Error::Eval { error, .. } => error.help(),
            _ => None,
        }
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = miette::LabeledSpan> + '_>> {
        match self {
            Error::Spec { problems, .. } if problems.len() == 1 => problems[0].labels(),
            Error::Eval { error, .. } => error.labels(),
            _ => None,
        }
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        match self {
            Error::Spec { file, .. } | Error::Eval { file, .. } => Some(&file.text as &dyn miette::SourceCode),
            _ => None,
        }
    }

    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn Diagnostic> + 'a>> {
        match self {
            Error::Spec { problems, .. } if problems.len() > 1 => {
                Some(Box::new(problems.iter().map(|p| p as &dyn Diagnostic)))
            }
            _ => None,
        }
    }
}

impl Error {
    fn spec(file: &Arc<SourceFile>, problems: Vec<SpecProblem>) -> Error {
        Error::Spec { file: file.clone(), problems }
    }

    /// Renders the error as text with source snippets (no colour), the way
    /// `attnc` prints it.
    pub fn render(&self) -> String {
        render(self, false)
    }
}

/// Renders a diagnostic with file name, line, column and carets.
pub fn render(err: &Error, color: bool) -> String {
    let theme = if color { miette::GraphicalTheme::unicode() } else { miette::GraphicalTheme::unicode_nocolor() };
    let handler = miette::GraphicalReportHandler::new_themed(theme).with_width(100);
    let mut out = String::new();
    let named;
    let with_name: &dyn Diagnostic = match err {
        Error::Spec { file, .. } | Error::Eval { file, .. } => {
            named = Named { inner: err, source: file.named() };
            &named
        }
        _ => err,
    };
    handler.render_report(&mut out, with_name).expect("rendering to a String cannot fail");
    out
}

/// Attaches a file name to the source of a diagnostic.
struct Named<'a> {
    inner: &'a Error,
    source: NamedSource<String>,
}

impl fmt::Debug for Named<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

impl fmt::Display for Named<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self.inner, f)
    }
}

impl std::error::Error for Named<'_> {}

impl Diagnostic for Named<'_> {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.inner.code()
    }
    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.inner.help()
    }
    fn labels(&self) -> Option<Box<dyn Iterator<Item = miette::LabeledSpan> + '_>> {
        self.inner.labels()
    }
    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        Some(&self.source)
    }
    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn Diagnostic> + 'a>> {
        self.inner.related()
    }
}

/// Parses a source file (stage 1).
pub fn parse(file: &Arc<SourceFile>) -> Result<ast::File, Error> {
    syntax::parse(&file.text).map_err(|e| Error::spec(file, vec![SpecProblem::Syntax(e)]))
}

/// Parses and checks a source file (stages 1-2).
pub fn check(file: &Arc<SourceFile>) -> Result<Module, Error> {
    let ast = parse(file)?;
    sema::check(&ast).map_err(|diags| Error::spec(file, diags.into_iter().map(SpecProblem::Sema).collect()))
}

/// Options that pick and specialise one attention block of a file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpecOptions {
    /// The attention block to use; `None` when the file holds exactly one.
    pub entry: Option<String>,
    /// Param overrides as `(name, value text)`.
    pub params: Vec<(String, String)>,
}

/// A checked spec, with its params set, ready for a backend.
#[derive(Clone, Debug)]
pub struct Program {
    pub file: Arc<SourceFile>,
    pub spec: Spec,
}

/// Parses, checks, picks the entry and applies param overrides.
pub fn load(file: SourceFile, options: &SpecOptions) -> Result<Program, Error> {
    let file = Arc::new(file);
    let module = check(&file)?;
    let mut spec = module
        .entry(options.entry.as_deref())
        .map_err(|e| Error::spec(&file, vec![SpecProblem::Entry(e)]))?
        .clone();
    let mut problems = Vec::new();
    for (name, value) in &options.params {
        if let Err(e) = spec.set_param(name, value) {
            problems.push(SpecProblem::Param(e));
        }
    }
    if !problems.is_empty() {
        return Err(Error::spec(&file, problems));
    }
    Ok(Program { file, spec })
}

/// A spec compiled to native code: run it many times on new inputs.
#[derive(Debug)]
pub struct JitKernel {
    program: Program,
    tiling: crate::mask::Tiling,
    compiled: crate::codegen::clif::kernel::CompiledKernel,
}

impl JitKernel {
    /// Runs the kernel: binds the inputs, builds the block maps, runs the tasks.
    pub fn run(&self, inputs: &Inputs<'_>) -> Result<Outputs, Error> {
        let bound = bind(&self.program.spec, inputs)?;
        let maps = crate::mask::classify(&self.program.spec, &bound, self.tiling).map_err(|e| self.program.mask_error(e))?;
        self.run_with_maps(inputs, &bound, &maps)
    }

    /// Runs the kernel with block maps built by the caller (reuse them across
    /// layers that share a mask and shapes).
    pub fn run_with_maps(&self, inputs: &Inputs<'_>, bound: &crate::bind::Bound, maps: &crate::mask::BlockMaps) -> Result<Outputs, Error> {
        if maps.tiling() != self.tiling {
            return Err(Error::Usage(format!("block maps were built with {} tiles, the kernel uses {}", maps.tiling(), self.tiling)));
        }
        crate::runtime::exec::run(&self.compiled, inputs, bound, maps)
            .map_err(|error| Error::Eval { file: self.program.file.clone(), error })
    }

    /// Time spent in Cranelift for this kernel.
    pub fn compile_time(&self) -> std::time::Duration {
        self.compiled.compile_time
    }

    /// The tile-product implementation in use.
    pub fn gemm(&self) -> String {
        self.compiled.gemm.name()
    }
}

impl Program {
    /// Lowers the spec to the optimised loop IR under `schedule`.
    pub fn kernel(&self, schedule: &crate::tile::Schedule) -> crate::tile::Kernel {
        crate::tile::lower(&self.spec, schedule)
    }

    /// Runs the loop-IR interpreter with `bq x bkv` tiles.
    pub fn run_interp(&self, inputs: &Inputs<'_>, bq: usize, bkv: usize) -> Result<Outputs, Error> {
        let bound = bind(&self.spec, inputs)?;
        let tiling = crate::mask::Tiling::new(bq, bkv).map_err(|e| self.mask_error(e))?;
        let maps = crate::mask::classify(&self.spec, &bound, tiling).map_err(|e| self.mask_error(e))?;
        let schedule = crate::tile::Schedule { bq, bkv, dim: Some(bound.shapes.d), exp2: true };
        let kernel = self.kernel(&schedule);
        crate::tile::interp::run(&kernel, inputs, &bound, &maps)
            .map_err(|error| Error::Eval { file: self.file.clone(), error })
    }

    fn mask_error(&self, e: crate::mask::MaskError) -> Error {
        match e {
            crate::mask::MaskError::Eval(error) => Error::Eval { file: self.file.clone(), error },
            e => Error::Mask(e),
        }
    }

    /// Compiles the spec to native code for this CPU with `bq x bkv` tiles
    /// (`bkv` a multiple of 16). The kernel is generic over batch, heads,
    /// lengths and head dim: one compilation serves every call.
    pub fn compile_jit(&self, bq: usize, bkv: usize, gemm: crate::codegen::clif::GemmImpl) -> Result<JitKernel, Error> {
        let tiling = crate::mask::Tiling::new(bq, bkv).map_err(|e| self.mask_error(e))?;
        let schedule = crate::tile::Schedule { bq, bkv, dim: None, exp2: true };
        let kernel = self.kernel(&schedule);
        let compiled = crate::codegen::clif::kernel::compile(&kernel, gemm, &crate::codegen::clif::JitOptions::default())?;
        Ok(JitKernel { program: self.clone(), tiling, compiled })
    }

    /// Runs the reference interpreter.
    pub fn run_reference(&self, inputs: &Inputs<'_>) -> Result<Outputs, Error> {
        let bound = bind(&self.spec, inputs)?;
        crate::reference::run(&self.spec, inputs, &bound)
            .map_err(|error| Error::Eval { file: self.file.clone(), error })
    }
}
