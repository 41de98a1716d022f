//! The driver: the pipeline as a flat list of stages, and the library's
//! front door.
//!
//! source text → [`syntax::parse`] → [`sema::check`] → param overrides →
//! (backend). Each stage's errors become an [`Error`] that carries the
//! source text, so rendering it (with miette) shows file, line, column and a
//! caret under the offending span.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use miette::{Diagnostic, NamedSource};

use crate::bind::{bind, BindError, Inputs, Outputs};
use crate::sema::eval::EvalError;
use crate::sema::{self, Diag, EntryError, Module, ParamError, Spec, Value};
use crate::syntax::{self, ast, SyntaxError};

/// The largest spec file [`SourceFile::read`] reads: 16 MiB.
pub const MAX_SPEC_BYTES: u64 = 16 << 20;

/// One `.attn` source text with the name it is reported under.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceFile {
    pub name: String,
    pub text: String,
}

impl SourceFile {
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> SourceFile {
        SourceFile {
            name: name.into(),
            text: text.into(),
        }
    }

    /// Reads a file from disk: at most [`MAX_SPEC_BYTES`] of UTF-8 text (a
    /// larger file, or a device that never ends, is an error after reading
    /// at most one byte more than the limit).
    pub fn read(path: &std::path::Path) -> Result<SourceFile, Error> {
        use std::io::Read;
        let io = |reason: String| Error::Io {
            what: format!("cannot read `{}`", path.display()),
            reason,
        };
        let too_large = || {
            io(format!(
                "a spec file may hold at most {} and this one holds more",
                crate::memory::bytes(MAX_SPEC_BYTES as u128)
            ))
        };
        let file = std::fs::File::open(path).map_err(|e| io(e.to_string()))?;
        let meta = file.metadata().map_err(|e| io(e.to_string()))?;
        if meta.is_dir() {
            return Err(io("it is a directory, not a spec file".into()));
        }
        if meta.is_file() && meta.len() > MAX_SPEC_BYTES {
            return Err(too_large());
        }
        let mut bytes = Vec::new();
        file.take(MAX_SPEC_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| io(e.to_string()))?;
        if bytes.len() as u64 > MAX_SPEC_BYTES {
            return Err(too_large());
        }
        let text = String::from_utf8(bytes).map_err(|e| {
            io(format!(
                "it is not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ))
        })?;
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
    Spec {
        file: Arc<SourceFile>,
        problems: Vec<SpecProblem>,
    },
    /// The inputs do not fit the spec.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// Evaluating the spec on the inputs failed (e.g. an out-of-range read).
    #[error("{error}")]
    Eval {
        file: Arc<SourceFile>,
        error: EvalError,
    },
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
    /// A backend's result differs from the reference's by more than the
    /// tolerance asked for (`attnc run --check`).
    #[error("{0}")]
    Check(String),
    /// Inputs whose size would need more memory than is available.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
}

/// The errors of a spec a diagnostic draws ([`Error::Spec`] keeps them all):
/// each drawing finds its line from the start of the file, so thousands of
/// errors in a long file took minutes to print.
pub const MAX_DRAWN_PROBLEMS: usize = 50;

fn spec_summary(file: &SourceFile, problems: &[SpecProblem]) -> String {
    match problems {
        [one] => one.to_string(),
        _ if problems.len() > MAX_DRAWN_PROBLEMS => format!(
            "`{}` has {} errors (the first {MAX_DRAWN_PROBLEMS} are shown)",
            file.name,
            problems.len()
        ),
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
            Error::Codegen(e) => e.code(),
            Error::Memory(e) => e.code(),
            Error::Io { .. } => Some(Box::new("attnc::io")),
            Error::Usage(_) => Some(Box::new("attnc::usage")),
            Error::Check(_) => Some(Box::new("attnc::check")),
            Error::Spec { .. } => Some(Box::new("attnc::spec")),
        }
    }

    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        match self {
            Error::Spec { problems, .. } if problems.len() == 1 => problems[0].help(),
            Error::Bind(e) => e.help(),
            Error::Mask(e) => e.help(),
            Error::Eval { error, .. } => error.help(),
            Error::Codegen(e) => e.help(),
            Error::Memory(e) => e.help(),
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
            Error::Spec { file, .. } | Error::Eval { file, .. } => {
                Some(&file.text as &dyn miette::SourceCode)
            }
            _ => None,
        }
    }

    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn Diagnostic> + 'a>> {
        match self {
            Error::Spec { problems, .. } if problems.len() > 1 => Some(Box::new(
                problems
                    .iter()
                    .take(MAX_DRAWN_PROBLEMS)
                    .map(|p| p as &dyn Diagnostic),
            )),
            _ => None,
        }
    }
}

impl Error {
    fn spec(file: &Arc<SourceFile>, problems: Vec<SpecProblem>) -> Error {
        Error::Spec {
            file: file.clone(),
            problems,
        }
    }

    /// Renders the error as text with source snippets (no colour), the way
    /// `attnc` prints it.
    pub fn render(&self) -> String {
        render(self, false)
    }
}

/// Renders a diagnostic with file name, line, column and carets.
pub fn render(err: &Error, color: bool) -> String {
    let theme = if color {
        miette::GraphicalTheme::unicode()
    } else {
        miette::GraphicalTheme::unicode_nocolor()
    };
    let handler = miette::GraphicalReportHandler::new_themed(theme).with_width(100);
    let mut out = String::new();
    let named;
    let with_name: &dyn Diagnostic = match err {
        Error::Spec { file, .. } | Error::Eval { file, .. } if too_wide(err, &file.text) => {
            let plain = Unsnipped::new(err, file);
            handler
                .render_report(&mut out, &plain)
                .expect("rendering to a String cannot fail");
            return out;
        }
        Error::Spec { file, .. } | Error::Eval { file, .. } => {
            named = Named {
                inner: err,
                source: file.named(),
            };
            &named
        }
        _ => err,
    };
    handler
        .render_report(&mut out, with_name)
        .expect("rendering to a String cannot fail");
    out
}

/// The widest column at which a snippet is drawn. miette pads the caret line
/// with format widths, which Rust caps at 65535 (beyond, it panics), and a
/// snippet that wide is unreadable anyway.
const MAX_SNIPPET_COLUMN: usize = 10_000;

/// The 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
}

/// Whether a label of `err` (or of the errors it lists) starts or ends
/// beyond [`MAX_SNIPPET_COLUMN`].
fn too_wide(err: &dyn Diagnostic, text: &str) -> bool {
    let far = |offset: usize| line_col(text, offset).1 > MAX_SNIPPET_COLUMN;
    err.labels()
        .into_iter()
        .flatten()
        .any(|l| far(l.offset()) || far(l.offset() + l.len()))
        || err
            .related()
            .into_iter()
            .flatten()
            .any(|r| too_wide(r, text))
}

/// A diagnostic shown without source snippets: each label is written as
/// `at FILE:LINE:COLUMN: LABEL` under the message instead.
struct Unsnipped<'a> {
    inner: &'a dyn Diagnostic,
    message: String,
    related: Vec<Unsnipped<'a>>,
}

impl<'a> Unsnipped<'a> {
    fn new(inner: &'a dyn Diagnostic, file: &SourceFile) -> Unsnipped<'a> {
        let mut message = inner.to_string();
        for l in inner.labels().into_iter().flatten() {
            let (line, col) = line_col(&file.text, l.offset());
            message += &format!("\n  at {}:{line}:{col}", file.name);
            if let Some(text) = l.label() {
                message += &format!(": {text}");
            }
        }
        let related = inner
            .related()
            .into_iter()
            .flatten()
            .map(|r| Unsnipped::new(r, file))
            .collect();
        Unsnipped {
            inner,
            message,
            related,
        }
    }
}

impl fmt::Debug for Unsnipped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Display for Unsnipped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Unsnipped<'_> {}

impl Diagnostic for Unsnipped<'_> {
    fn code<'b>(&'b self) -> Option<Box<dyn fmt::Display + 'b>> {
        self.inner.code()
    }
    fn help<'b>(&'b self) -> Option<Box<dyn fmt::Display + 'b>> {
        self.inner.help()
    }
    fn related<'b>(&'b self) -> Option<Box<dyn Iterator<Item = &'b dyn Diagnostic> + 'b>> {
        if self.related.is_empty() {
            return None;
        }
        Some(Box::new(self.related.iter().map(|r| r as &dyn Diagnostic)))
    }
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
    sema::check(&ast)
        .map_err(|diags| Error::spec(file, diags.into_iter().map(SpecProblem::Sema).collect()))
}

/// Options that pick and specialise one attention block of a file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpecOptions {
    /// The attention block to use; `None` when the file holds exactly one.
    pub entry: Option<String>,
    /// Param overrides as `(name, value text)`.
    pub params: Vec<(String, String)>,
}

impl SpecOptions {
    /// The only block of a file, with these param overrides
    /// (`&[("window", "128")]`).
    pub fn with_params(params: &[(&str, &str)]) -> SpecOptions {
        SpecOptions {
            entry: None,
            params: params
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect(),
        }
    }
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
    let ast = parse(&file)?;
    let module = match sema::check(&ast) {
        Ok(module) => module,
        Err(diags) => {
            // A default may be what fails (a `max` over `0..n` with n = 0):
            // check again with the overrides in place from the start.
            let (entry, values) = match overrides_from_the_start(&ast, options) {
                Ok(Some(found)) => found,
                Ok(None) => {
                    let problems = diags.into_iter().map(SpecProblem::Sema).collect();
                    return Err(Error::spec(&file, problems));
                }
                Err(errors) => {
                    let problems = errors.into_iter().map(SpecProblem::Param).collect();
                    return Err(Error::spec(&file, problems));
                }
            };
            let module = sema::check_with(&ast, Some((&entry, &values))).map_err(|diags| {
                Error::spec(&file, diags.into_iter().map(SpecProblem::Sema).collect())
            })?;
            let spec = module
                .entry(options.entry.as_deref())
                .map_err(|e| Error::spec(&file, vec![SpecProblem::Entry(e)]))?
                .clone();
            return Ok(Program { file, spec });
        }
    };
    let mut spec = module
        .entry(options.entry.as_deref())
        .map_err(|e| Error::spec(&file, vec![SpecProblem::Entry(e)]))?
        .clone();
    let mut problems = Vec::new();
    // Overrides of params that bound a reduction re-check the source.
    let mut fixed = HashMap::new();
    for (name, value) in &options.params {
        let result = match spec.param_value(name, value) {
            Ok((id, v)) if spec.fixed_params.contains(&id) => {
                fixed.insert(name.clone(), v);
                Ok(())
            }
            _ => spec.set_param(name, value),
        };
        if let Err(e) = result {
            problems.push(SpecProblem::Param(e));
        }
    }
    if !problems.is_empty() {
        return Err(Error::spec(&file, problems));
    }
    if !fixed.is_empty() {
        let mut values: HashMap<String, Value> = spec
            .params
            .iter()
            .map(|p| (p.name.clone(), p.value))
            .collect();
        values.extend(fixed);
        let module = sema::check_with(&ast, Some((&spec.name, &values))).map_err(|diags| {
            Error::spec(&file, diags.into_iter().map(SpecProblem::Sema).collect())
        })?;
        spec = module
            .specs
            .into_iter()
            .find(|s| s.name == spec.name)
            .expect("the re-checked file holds the entry block");
    }
    Ok(Program { file, spec })
}

/// The overrides of `options` as values for the params the entry block
/// declares, read from the syntax tree (so before any check): `Ok(None)`
/// when there are none or the entry is not one block of the file (the
/// ordinary path reports that), the errors of overrides that name no param
/// or do not fit its type.
#[allow(clippy::type_complexity)]
fn overrides_from_the_start(
    ast: &ast::File,
    options: &SpecOptions,
) -> Result<Option<(String, HashMap<String, Value>)>, Vec<ParamError>> {
    if options.params.is_empty() {
        return Ok(None);
    }
    let block = match options.entry.as_deref() {
        Some(name) => ast.attentions.iter().find(|a| a.name.name == name),
        None if ast.attentions.len() == 1 => ast.attentions.first(),
        None => None,
    };
    let Some(block) = block else {
        return Ok(None);
    };
    let declared: Vec<(&str, sema::Type, syntax::Span)> = block
        .items
        .iter()
        .filter_map(|item| match &item.kind {
            ast::ItemKind::Param { name, ty, .. } => {
                let ty = match ty.kind {
                    ast::ScalarKind::Int => sema::Type::Int,
                    ast::ScalarKind::Float => sema::Type::Float,
                    ast::ScalarKind::Bool => sema::Type::Bool,
                };
                Some((name.name.as_str(), ty, name.span))
            }
            _ => None,
        })
        .collect();
    let mut values = HashMap::new();
    let mut errors = Vec::new();
    for (name, text) in &options.params {
        match sema::override_value(&block.name.name, &declared, name, text) {
            Ok((_, v)) => {
                values.insert(name.clone(), v);
            }
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(Some((block.name.name.clone(), values)))
    } else {
        Err(errors)
    }
}

/// What differs between the binding a plan was made for and a call's, in
/// words, or `None` when they are the same. Buffers are compared bit for bit:
/// a NaN in a float buffer matches itself, and `-0.0` differs from `0.0` (a
/// mask may tell them apart). Every field of `Bound` is named, so a new one
/// must be compared here before this compiles.
fn plan_mismatch(
    spec: &crate::sema::Spec,
    plan: &crate::bind::Bound,
    call: &crate::bind::Bound,
) -> Option<String> {
    let crate::bind::Bound {
        shapes,
        q_offset,
        kv_offset,
        kv_rows,
        kv_batch,
        kv_lens,
        pages,
        kv_elem,
        q_elem,
        buffers,
    } = plan;
    let differ = |what: &str, a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| {
        Some(format!("{what} {a:?} in the plan, {b:?} in this call"))
    };
    // The offsets first: `KV` in the shapes follows from them.
    if *q_offset != call.q_offset {
        return differ("query offset", q_offset, &call.q_offset);
    }
    if *kv_offset != call.kv_offset {
        return differ("key offset", kv_offset, &call.kv_offset);
    }
    if *shapes != call.shapes {
        return Some(format!(
            "shapes {} in the plan, {} in this call",
            crate::memory::shapes_text(shapes),
            crate::memory::shapes_text(&call.shapes)
        ));
    }
    if *kv_rows != call.kv_rows {
        return differ("key rows", kv_rows, &call.kv_rows);
    }
    if *kv_batch != call.kv_batch {
        return differ(
            "K/V batch (1: shared by every query batch)",
            kv_batch,
            &call.kv_batch,
        );
    }
    if *kv_lens != call.kv_lens {
        return differ("sequence lengths", kv_lens, &call.kv_lens);
    }
    match (pages, &call.pages) {
        (None, None) => {}
        (Some(_), None) | (None, Some(_)) => {
            let layout = |x: &Option<crate::bind::Pages>| match x {
                Some(_) => "a paged pool",
                None => "dense K/V rows",
            };
            return Some(format!(
                "{} in the plan, {} in this call",
                layout(pages),
                layout(&call.pages)
            ));
        }
        (Some(a), Some(b)) => {
            if (a.page_size, a.num_pages) != (b.page_size, b.num_pages) {
                return differ(
                    "page size and pages",
                    &(a.page_size, a.num_pages),
                    &(b.page_size, b.num_pages),
                );
            }
            if a.table != b.table {
                return Some("the page table differs".into());
            }
        }
    }
    if *kv_elem != call.kv_elem {
        return Some(format!(
            "K/V stored as {kv_elem} in the plan, {} in this call",
            call.kv_elem
        ));
    }
    if *q_elem != call.q_elem {
        return Some(format!(
            "q of type {q_elem} in the plan, {} in this call",
            call.q_elem
        ));
    }
    let changed = buffers
        .iter()
        .zip(&call.buffers)
        .position(|(a, b)| !a.same_bits(b))?;
    Some(format!(
        "buffer `{}` differs",
        spec.buffer(crate::sema::BufferId(changed as u32)).name
    ))
}

/// Bound inputs and their block maps, reusable across calls with the same
/// mask, shapes and buffers.
#[derive(Debug)]
pub struct Plan {
    /// The spec the maps were built for: a plan serves kernels of this spec
    /// only (another spec's maps would skip or mask other tiles).
    spec: Spec,
    bound: crate::bind::Bound,
    maps: crate::mask::BlockMaps,
}

impl Plan {
    pub fn maps(&self) -> &crate::mask::BlockMaps {
        &self.maps
    }
}

/// The tile sizes of a compiled kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Tiles {
    /// Chosen from the spec by [`Program::auto_tiling`].
    #[default]
    Auto,
    /// These sizes (`bkv` a multiple of 16 for the CPU kernels).
    Fixed(crate::mask::Tiling),
}

impl std::str::FromStr for Tiles {
    type Err = crate::mask::MaskError;

    /// `auto`, `BQxBKV` (e.g. `64x128`) or `N` for `NxN`.
    fn from_str(text: &str) -> Result<Tiles, Self::Err> {
        match text.trim() {
            "auto" => Ok(Tiles::Auto),
            t => t.parse().map(Tiles::Fixed),
        }
    }
}

/// Checks that the jit backend can compile `tiling`: its kernels read K in
/// packed panels of 16 keys, so the key tile (the second number) must be a
/// multiple of 16. The interp and reference backends take any positive sizes.
/// The error names the sizes, the rule and the nearest valid sizes.
pub fn check_jit_tiling(tiling: crate::mask::Tiling) -> Result<(), Error> {
    let crate::mask::Tiling { bq, bkv } = tiling;
    if bkv % 16 == 0 {
        return Ok(());
    }
    let below = bkv / 16 * 16;
    let nearest = match (below, below.checked_add(16)) {
        (0, _) => format!("{bq}x16"),
        // No multiple of 16 above `usize::MAX - 15`.
        (_, None) => format!("{bq}x{below}"),
        (_, Some(above)) => format!("{bq}x{below} or {bq}x{above}"),
    };
    Err(Error::Usage(format!(
        "tile size {tiling}: the jit backend needs key tiles (the second number) that are a multiple of 16, \
         because its kernels read K in packed panels of 16 keys; found {bkv}. \
         Use {nearest}, or `--block auto` (Tiles::Auto); \
         the interp and reference backends take any positive tile sizes"
    )))
}

/// How to compile a spec for the CPU.
#[derive(Clone, Debug)]
pub struct CompileOptions {
    /// Which block, and param overrides.
    pub spec: SpecOptions,
    /// Tile sizes: chosen from the spec, or fixed.
    pub tiles: Tiles,
    /// Tile products: native (AVX-512/AVX2) or JIT-generated f32x4.
    pub gemm: crate::codegen::clif::GemmImpl,
    /// Keep the Cranelift IR text (see [`JitKernel::clif`]).
    pub keep_clif: bool,
    /// Check the bounds of the reads the optimiser proved in range too, and
    /// panic if one is out of range (a compiler bug). For tests; slower.
    pub check_proven_loads: bool,
    /// Multiply a prefill's bf16 q, k and v as bf16 pairs
    /// ([`crate::tile::nest::KvSource::PackedBf16`]) rather than widening
    /// them to f32 as they are packed. `None`: where the tile products have a
    /// bf16 dot product ([`has_bf16_dot`]).
    pub bf16_pairs: Option<bool>,
}

impl Default for CompileOptions {
    fn default() -> CompileOptions {
        CompileOptions {
            spec: SpecOptions::default(),
            tiles: Tiles::Auto,
            gemm: crate::codegen::clif::GemmImpl::detect(),
            keep_clif: false,
            check_proven_loads: false,
            bf16_pairs: None,
        }
    }
}

/// Compiles a spec to native code for this CPU: parse, check, param
/// overrides, loop IR, Cranelift. The kernel runs on any batch, heads,
/// lengths and head dim without recompiling.
///
/// ```
/// use attnc::{compile, CompileOptions, Inputs, SourceFile};
/// let kernel = compile(SourceFile::new("c.attn", "attention c { mask = causal }"), &CompileOptions::default()).unwrap();
/// let q = ndarray::Array4::<f32>::ones((1, 2, 100, 32));
/// let out = kernel.run(&Inputs::new(q.view(), q.view(), q.view())).unwrap();
/// assert_eq!(out.out.shape(), &[1, 2, 100, 32]);
/// ```
pub fn compile(file: SourceFile, options: &CompileOptions) -> Result<JitKernel, Error> {
    let program = load(file, &options.spec)?;
    program.compile_jit_with(options)
}

/// How a loop nest maps rows and where it reads K and V.
pub type NestShape = (crate::tile::nest::RowMap, crate::tile::nest::KvSource);

/// The loop-nest shape a call takes, from its shapes and K/V layout, read in
/// place unless said otherwise:
/// - decode on a paged pool (`H x Q` rows fit one query tile of `tiling`, more
///   than one KV head): every query head in one tile, so each pool page, whose
///   rows interleave the KV heads, is read whole by one task;
/// - decode, speculative verification (`(H / HKV) x Q` rows fit): the query
///   heads of a KV head in one tile;
/// - a quantized cache (int8, fp8) otherwise: one head per tile, K/V read in
///   place (dequantized in the tile loads, never copied);
/// - prefill otherwise (chunked prefill on a ragged batch or a paged pool
///   included): one head per tile, K/V packed per call (a pool's rows
///   gathered through its table), as bf16 pairs multiplied on bf16 operands
///   when q, k and v are all bf16. Packed products
///   run a prefill 1.6-1.8x faster than in-place ones (`attnc bench
///   examples/causal.attn --q-len 4096 --heads 8 --dim 64`, with and without
///   `--page-size 16`).
///
/// `bf16_pairs`: whether bf16 q, k and v of a prefill are multiplied as bf16
/// pairs (where the products have a bf16 dot product, [`has_bf16_dot`]) or
/// widened to f32 as they are packed (elsewhere: on AVX2 the pair products
/// ran a prefill at 0.46x the f32 speed, the widened packing at 1.0x;
/// docs/performance.md).
pub fn nest_for(
    bound: &crate::bind::Bound,
    tiling: crate::mask::Tiling,
    bf16_pairs: bool,
) -> NestShape {
    nest_for_shapes(
        &bound.shapes,
        bound.pages.is_some(),
        bound.q_elem,
        bound.kv_elem,
        tiling,
        bf16_pairs,
    )
}

/// Whether the tile products of `gemm` on this CPU multiply bf16 pairs with
/// a dot-product instruction (`vdpbf16ps`, AVX-512 BF16) that is faster than
/// f32 FMAs on this core ([`pairs::dpbf16_pays`](crate::runtime::gemm::pairs::dpbf16_pays),
/// measured once per process): there a prefill on bf16 operands ran about
/// 1.5x the f32 speed. Elsewhere bf16 is widened to f32 once as it is
/// packed: where the instruction is missing the pairs would be widened in
/// the products, which is slower, and where it is slow (an Intel Xeon:
/// half the multiply-adds of FMAs) the pairs ran at 0.62x the f32 speed.
pub fn has_bf16_dot(gemm: crate::codegen::clif::GemmImpl) -> bool {
    use crate::runtime::gemm::pairs::{dpbf16_pays, PairProducts};
    PairProducts::for_isa(gemm.products_isa(), false) == PairProducts::Dpbf16 && dpbf16_pays()
}

/// [`has_bf16_dot`] for the default tile products ([`CompileOptions`]'s
/// `gemm`): the choice of a default jit kernel on this CPU, and of the
/// interpreter ([`Program::run_interp`]) and `attnc emit`.
pub fn default_bf16_pairs() -> bool {
    has_bf16_dot(crate::codegen::clif::GemmImpl::detect())
}

/// [`nest_for`] from the shapes alone (a ragged batch takes the nest of a
/// dense one of its shapes), with `paged` for a paged pool, `q_elem` the type of q's values and `kv_elem`
/// the stored type of K and V (for `attnc emit`, which has no inputs). A
/// quantized cache (int8, fp8) is always read in place (dequantized in the
/// tile loads, never copied); bf16 q, k and v of a prefill are packed as
/// bf16 pairs with `bf16_pairs`; other bf16/f16 K/V of a prefill (and bf16
/// ones without `bf16_pairs`) are widened to f32 as they are packed.
pub fn nest_for_shapes(
    sh: &crate::sema::eval::Shapes,
    paged: bool,
    q_elem: crate::tensor::ElemType,
    kv_elem: crate::tensor::ElemType,
    tiling: crate::mask::Tiling,
    bf16_pairs: bool,
) -> NestShape {
    use crate::tensor::ElemType;
    use crate::tile::nest::{KvSource, RowMap};
    let group = sh.h / sh.hkv.max(1);
    // A grouped tile needs rows to group: none of 0 heads (H = 0 < HKV).
    let rows = group > 0 && sh.q > 0;
    if paged && sh.hkv > 1 && sh.h * sh.q <= tiling.bq && rows {
        (RowMap::AllHeads, KvSource::InPlace)
    } else if group * sh.q <= tiling.bq && rows {
        (RowMap::GqaGroup, KvSource::InPlace)
    } else if kv_elem.is_quantized() {
        (RowMap::OneHead, KvSource::InPlace)
    } else if bf16_pairs && (q_elem, kv_elem) == (ElemType::Bf16, ElemType::Bf16) {
        (RowMap::OneHead, KvSource::PackedBf16)
    } else {
        (RowMap::OneHead, KvSource::Packed)
    }
}

/// The PTX schedule a bound call takes on the CUDA runtime, and the stored
/// type of its K/V when they are quantized: K/V read in place
/// ([`crate::tile::nest::KvSource::InPlace`]: through the page table, up to
/// each sequence's length, dequantized in the tile loads) for a ragged
/// batch, a paged pool or a quantized cache; dense K/V, packed for the
/// device, otherwise. One head per tile either way (the PTX backend's only
/// row mapping).
pub fn ptx_plan(
    bound: &crate::bind::Bound,
    dtype: crate::codegen::ptx::Dtype,
) -> (crate::tile::Schedule, Option<crate::tensor::ElemType>) {
    ptx_plan_for(bound.shapes.d, dtype, bound.is_ragged(), bound.kv_elem)
}

/// [`ptx_plan`] from what it depends on: the head dim `d`, whether every
/// sequence has a length of its own (`ragged`: a ragged batch or a paged
/// pool) and the stored type of K/V (for `attnc emit --target ptx`, which has
/// no inputs).
pub fn ptx_plan_for(
    d: usize,
    dtype: crate::codegen::ptx::Dtype,
    ragged: bool,
    kv_elem: crate::tensor::ElemType,
) -> (crate::tile::Schedule, Option<crate::tensor::ElemType>) {
    let quant = kv_elem.is_quantized().then_some(kv_elem);
    let mut schedule = crate::codegen::ptx::schedule(d, dtype);
    if ragged || quant.is_some() {
        schedule.kv = crate::tile::nest::KvSource::InPlace;
    }
    (schedule, quant)
}

/// A spec compiled to native code: run it many times on new inputs.
#[derive(Debug)]
pub struct JitKernel {
    program: Program,
    tiling: crate::mask::Tiling,
    options: CompileOptions,
    compiled: crate::codegen::clif::kernel::CompiledKernel,
    /// The variants of other loop-nest shapes ([`nest_for`]), compiled the
    /// first time a call needs one and kept.
    variants: std::sync::Mutex<Vec<(NestShape, Arc<crate::codegen::clif::kernel::CompiledKernel>)>>,
    /// Packed K/V heads, kept between calls so repeated runs do not reallocate
    /// (and fault in) them; bounded by [`crate::runtime::exec::PACK_BUDGET_BYTES`]
    /// or one head. Concurrent calls that find it busy use a buffer of their own.
    workspace: std::sync::Mutex<Vec<f32>>,
    /// The block maps of the last [`MAP_CACHE_ENTRIES`] distinct problems.
    maps: crate::mask::MapCache,
}

/// Block maps a [`JitKernel`] keeps (per distinct shapes, offsets, lengths and
/// mask buffers; see [`crate::mask::cache`]).
pub const MAP_CACHE_ENTRIES: usize = 8;

impl JitKernel {
    /// Runs the kernel: binds the inputs, takes their block maps from the
    /// kernel's cache (building them on a miss), runs the tasks.
    pub fn run(&self, inputs: &Inputs<'_>) -> Result<Outputs, Error> {
        self.run_observed(inputs, &mut |_, _| {})
    }

    /// [`JitKernel::run`], calling `progress(done, total)` per query tile
    /// while it builds block maps (not when they come from the cache).
    pub fn run_observed(
        &self,
        inputs: &Inputs<'_>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Outputs, Error> {
        let bound = bind(&self.program.spec, inputs)?;
        self.check_memory(&bound)?;
        let maps = self
            .maps
            .get_or_build_observed(&self.program.spec, &bound, self.tiling, progress)
            .map_err(|e| self.program.classify_error(inputs, &bound, e))?;
        self.run_with_maps(inputs, &bound, &maps)
    }

    /// The block maps a call with `inputs` uses: the kernel keeps the maps of
    /// its last few distinct problems (shapes, offsets, lengths and the
    /// contents of the buffers the mask reads), so repeated calls reuse them.
    pub fn block_maps(&self, inputs: &Inputs<'_>) -> Result<Arc<crate::mask::BlockMaps>, Error> {
        let bound = bind(&self.program.spec, inputs)?;
        self.check_memory(&bound)?;
        self.maps
            .get_or_build(&self.program.spec, &bound, self.tiling)
            .map_err(|e| self.program.classify_error(inputs, &bound, e))
    }

    /// Binds `inputs` and builds their block maps once, for callers that run
    /// many layers with the same mask, shapes and buffers.
    pub fn plan(&self, inputs: &Inputs<'_>) -> Result<Plan, Error> {
        let bound = bind(&self.program.spec, inputs)?;
        self.check_memory(&bound)?;
        let maps = crate::mask::classify(&self.program.spec, &bound, self.tiling)
            .map_err(|e| self.program.classify_error(inputs, &bound, e))?;
        Ok(Plan {
            spec: self.program.spec.clone(),
            bound,
            maps,
        })
    }

    /// Runs the kernel with a plan made by [`JitKernel::plan`] of a kernel of
    /// the same spec. The inputs must have the plan's shapes, offsets, lengths,
    /// page table and buffers (checked).
    pub fn run_planned(&self, inputs: &Inputs<'_>, plan: &Plan) -> Result<Outputs, Error> {
        let spec = &self.program.spec;
        if plan.spec != *spec {
            let of = if plan.spec.name == spec.name {
                format!("another spec also named `{}`", spec.name)
            } else {
                format!("`{}`", plan.spec.name)
            };
            return Err(Error::Usage(format!(
                "the plan was made by a kernel of {of}, and its block maps do not fit `{}`; \
                 make a plan with this kernel (`plan`)",
                spec.name
            )));
        }
        let bound = bind(spec, inputs)?;
        if let Some(what) = plan_mismatch(spec, &plan.bound, &bound) {
            return Err(Error::Usage(format!(
                "the plan was made for other inputs: {what}; make a new plan for these (`plan`)"
            )));
        }
        self.run_with_maps(inputs, &bound, &plan.maps)
    }

    /// Checks that the block maps of a call bound as `bound` fit in memory,
    /// before they are built (the outputs and scratch of a run are checked
    /// once the maps are there, in `run_with_maps`).
    fn check_memory(&self, bound: &crate::bind::Bound) -> Result<(), Error> {
        let spec = &self.program.spec;
        Ok(crate::memory::check_block_maps(
            spec,
            &bound.shapes,
            self.tiling,
        )?)
    }

    /// The Cranelift IR of the task function, when compiled with `keep_clif`.
    pub fn clif(&self) -> Option<&str> {
        self.compiled.clif.as_deref()
    }

    /// Runs the kernel on `bound` and `maps`, which the caller made from these
    /// very inputs with this kernel's spec and tiling (`bind`, `classify`):
    /// the task functions read what they describe without bounds checks, so
    /// this is not public.
    fn run_with_maps(
        &self,
        inputs: &Inputs<'_>,
        bound: &crate::bind::Bound,
        maps: &crate::mask::BlockMaps,
    ) -> Result<Outputs, Error> {
        if maps.tiling() != self.tiling {
            return Err(Error::Usage(format!(
                "block maps were built with {} tiles, the kernel uses {}",
                maps.tiling(),
                self.tiling
            )));
        }
        // The scratch is sized by the tiles, which may be far larger than the
        // inputs: check it (and the outputs) before anything is allocated.
        let mut need = crate::memory::Estimate::new();
        crate::memory::outputs(&mut need, &bound.shapes);
        crate::memory::jit_scratch(
            &mut need,
            &bound.shapes,
            bound.key_rows(),
            self.tiling,
            rayon::current_num_threads(),
            nest_for(bound, self.tiling, self.bf16_pairs()).1,
        );
        need.check(format_args!(
            "running `{}` on {} with {} tiles",
            self.program.spec.name,
            crate::memory::shapes_text(&bound.shapes),
            self.tiling
        ))?;
        if bound.is_empty() {
            return Ok(Outputs::empty(&bound.shapes, inputs.want_lse));
        }
        let mut own = Vec::new();
        let mut shared = self.workspace.try_lock().ok();
        let workspace = shared.as_deref_mut().unwrap_or(&mut own);
        let variant = self.variant(nest_for(bound, self.tiling, self.bf16_pairs()))?;
        let compiled = variant.as_deref().unwrap_or(&self.compiled);
        crate::runtime::exec::run(compiled.code(), inputs, bound, maps, workspace)
            .map_err(|error| self.program.first_error(inputs, bound, error))
    }

    /// The compiled variant for a loop-nest shape: `None` for the one
    /// compiled up front, else compiled on first use and kept.
    fn variant(
        &self,
        nest: NestShape,
    ) -> Result<Option<Arc<crate::codegen::clif::kernel::CompiledKernel>>, Error> {
        let k = &self.compiled.kernel.schedule;
        if (k.rows, k.kv) == nest {
            return Ok(None);
        }
        let mut variants = self.variants.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, c)) = variants.iter().find(|(n, _)| *n == nest) {
            return Ok(Some(c.clone()));
        }
        let schedule = crate::tile::Schedule {
            rows: nest.0,
            kv: nest.1,
            ..*k
        };
        let compiled =
            std::sync::Arc::new(self.program.compile_schedule(&schedule, &self.options)?);
        variants.push((nest, compiled.clone()));
        Ok(Some(compiled))
    }

    /// Whether the kernel multiplies a prefill's bf16 q, k and v as bf16
    /// pairs ([`CompileOptions::bf16_pairs`]).
    pub fn bf16_pairs(&self) -> bool {
        self.options
            .bf16_pairs
            .unwrap_or_else(|| has_bf16_dot(self.compiled.gemm))
    }

    /// The tile sizes the kernel was compiled for.
    pub fn tiling(&self) -> crate::mask::Tiling {
        self.tiling
    }

    /// Time spent in Cranelift for this kernel.
    pub fn compile_time(&self) -> std::time::Duration {
        self.compiled.compile_time
    }

    /// The tile-product implementation in use.
    pub fn gemm(&self) -> String {
        self.compiled.gemm.name()
    }

    /// The implementation of the tile products.
    pub fn gemm_impl(&self) -> crate::codegen::clif::microkernel::GemmImpl {
        self.compiled.gemm
    }

    /// The tile products a call bound as `bound` runs: the kernel's own
    /// ([`Self::gemm_impl`]) on K/V packed as f32; the native products of
    /// [`GemmImpl::products_isa`](crate::codegen::clif::GemmImpl::products_isa)
    /// on K/V read in place (decode, quantized caches) or packed as bf16
    /// pairs, which have no JIT-generated form.
    pub fn products_for(
        &self,
        bound: &crate::bind::Bound,
    ) -> crate::codegen::clif::microkernel::GemmImpl {
        use crate::codegen::clif::GemmImpl;
        match nest_for(bound, self.tiling, self.bf16_pairs()).1 {
            crate::tile::nest::KvSource::Packed => self.compiled.gemm,
            _ => GemmImpl::Native(self.compiled.gemm.products_isa()),
        }
    }
}

impl Program {
    /// Lowers the spec to the optimised loop IR under `schedule`.
    pub fn kernel(&self, schedule: &crate::tile::Schedule) -> crate::tile::Verified {
        crate::tile::lower(&self.spec, schedule)
    }

    /// Runs the loop-IR interpreter with `tiling`, on the loop nest a jit
    /// kernel with the default tile products runs on this CPU (bf16 pairs
    /// where [`default_bf16_pairs`]); a kernel forced to other products may
    /// widen bf16 instead ([`JitKernel::bf16_pairs`]).
    pub fn run_interp(
        &self,
        inputs: &Inputs<'_>,
        tiling: crate::mask::Tiling,
    ) -> Result<Outputs, Error> {
        self.run_interp_nest(inputs, tiling, default_bf16_pairs())
    }

    /// [`Program::run_interp`], multiplying bf16 operands as pairs with
    /// `bf16_pairs` (see [`nest_for`]).
    pub fn run_interp_nest(
        &self,
        inputs: &Inputs<'_>,
        tiling: crate::mask::Tiling,
        bf16_pairs: bool,
    ) -> Result<Outputs, Error> {
        let tiling =
            crate::mask::Tiling::new(tiling.bq, tiling.bkv).map_err(|e| self.mask_error(e))?;
        let bound = bind(&self.spec, inputs)?;
        self.check_memory(&bound, crate::memory::Backend::Interp, tiling, 1)?;
        let maps = crate::mask::classify(&self.spec, &bound, tiling)
            .map_err(|e| self.classify_error(inputs, &bound, e))?;
        let (rows, kv) = nest_for(&bound, tiling, bf16_pairs);
        let schedule = crate::tile::Schedule {
            tiling,
            dim: Some(bound.shapes.d),
            exp2: true,
            rows,
            kv,
        };
        let kernel = self.kernel(&schedule);
        crate::tile::interp::run(&kernel, inputs, &bound, &maps)
            .map_err(|error| self.first_error(inputs, &bound, error))
    }

    /// The error to report for a run-time error of a tiled backend (or of the
    /// block-map analysis): the reference's first error in the order of `b`,
    /// `h`, row and `kv`, which names the same element and absolute position
    /// on every backend, whatever order or parallelism found one; the
    /// backend's own error if the reference finds none. Runs only on failure
    /// and evaluates only what can fail (the mask, and the score mod when it
    /// holds a read, `ancestor` or integer division); at worst it costs one
    /// pass of the reference over the call.
    pub fn first_error(
        &self,
        inputs: &Inputs<'_>,
        bound: &crate::bind::Bound,
        error: crate::sema::eval::EvalError,
    ) -> Error {
        Error::Eval {
            file: self.file.clone(),
            error: crate::reference::first_error(&self.spec, inputs, bound).unwrap_or(error),
        }
    }

    /// [`Program::first_error`] for a backend that binds the inputs itself
    /// (the CUDA runtime): binds them again, on failure only.
    pub fn first_error_of(
        &self,
        inputs: &Inputs<'_>,
        error: crate::sema::eval::EvalError,
    ) -> Error {
        match bind(&self.spec, inputs) {
            Ok(bound) => self.first_error(inputs, &bound, error),
            Err(_) => Error::Eval {
                file: self.file.clone(),
                error,
            },
        }
    }

    /// [`Program::first_error`] for an evaluation error of the block-map
    /// analysis; other errors as they are.
    fn classify_error(
        &self,
        inputs: &Inputs<'_>,
        bound: &crate::bind::Bound,
        e: crate::mask::MaskError,
    ) -> Error {
        match e {
            crate::mask::MaskError::Eval(error) => self.first_error(inputs, bound, error),
            e => Error::Mask(e),
        }
    }

    fn mask_error(&self, e: crate::mask::MaskError) -> Error {
        match e {
            crate::mask::MaskError::Eval(error) => Error::Eval {
                file: self.file.clone(),
                error,
            },
            e => Error::Mask(e),
        }
    }

    /// Compiles the spec to native code for this CPU with `tiling` (key
    /// tiles a multiple of 16). The kernel is generic over batch, heads,
    /// lengths and head dim: one compilation serves every call.
    pub fn compile_jit(
        &self,
        tiling: crate::mask::Tiling,
        gemm: crate::codegen::clif::GemmImpl,
    ) -> Result<JitKernel, Error> {
        let tiling =
            crate::mask::Tiling::new(tiling.bq, tiling.bkv).map_err(|e| self.mask_error(e))?;
        self.compile_jit_with(&CompileOptions {
            tiles: Tiles::Fixed(tiling),
            gemm,
            ..CompileOptions::default()
        })
    }

    /// [`Program::compile_jit`] with all options.
    pub fn compile_jit_with(&self, options: &CompileOptions) -> Result<JitKernel, Error> {
        let tiling = self.tiling(options.tiles);
        // `Tiles::Fixed` takes a `Tiling` literal: refuse tiles of 0 here,
        // not at the first call.
        crate::mask::Tiling::new(tiling.bq, tiling.bkv).map_err(|e| self.mask_error(e))?;
        check_jit_tiling(tiling)?;
        let schedule = crate::tile::Schedule {
            tiling,
            dim: None,
            exp2: true,
            ..crate::tile::Schedule::default()
        };
        let compiled = self.compile_schedule(&schedule, options)?;
        Ok(JitKernel {
            program: self.clone(),
            tiling,
            options: options.clone(),
            compiled,
            variants: std::sync::Mutex::new(Vec::new()),
            workspace: std::sync::Mutex::new(Vec::new()),
            maps: crate::mask::MapCache::new(MAP_CACHE_ENTRIES),
        })
    }

    /// Lowers and compiles the spec under `schedule` for this CPU.
    fn compile_schedule(
        &self,
        schedule: &crate::tile::Schedule,
        options: &CompileOptions,
    ) -> Result<crate::codegen::clif::kernel::CompiledKernel, Error> {
        let kernel = self.kernel(schedule);
        let jit_options = crate::codegen::clif::JitOptions {
            keep_clif: options.keep_clif,
            check_proven_loads: options.check_proven_loads,
            ..Default::default()
        };
        Ok(crate::codegen::clif::kernel::compile(
            &kernel,
            options.gemm,
            &jit_options,
        )?)
    }

    /// The tile sizes `tiles` stands for with this spec.
    pub fn tiling(&self, tiles: Tiles) -> crate::mask::Tiling {
        match tiles {
            Tiles::Auto => self.auto_tiling(),
            Tiles::Fixed(t) => t,
        }
    }

    /// The tile sizes [`Tiles::Auto`] picks: 128 x 64 for a spec without a mask,
    /// 64 x 64 otherwise. Without a mask every tile is full, so taller query tiles
    /// cost nothing in masked-out work and halve the K/V traffic per query row
    /// (each query tile streams the whole head's K and V); with a mask, the
    /// larger partial tiles on mask edges (diagonals, window borders) waste more
    /// work than the traffic saves (`docs/performance.md` has the measurements).
    pub fn auto_tiling(&self) -> crate::mask::Tiling {
        let (bq, bkv) = if self.spec.mask.is_none() {
            (128, 64)
        } else {
            (64, 64)
        };
        crate::mask::Tiling::new(bq, bkv).expect("the automatic tile sizes are valid")
    }

    /// Runs the reference interpreter.
    /// When the block-map analysis of `maps` fell back to evaluating
    /// elements one by one, a note that says how many and names the mask
    /// sub-expression that defeated the symbolic analysis (with its place in
    /// the file), and the next one if another did too; `None` otherwise.
    pub fn fallback_note(&self, maps: &crate::mask::BlockMaps) -> Option<String> {
        let by = maps.fallback();
        let total: u64 = by.iter().map(|&(_, n)| n).sum();
        let given_up = maps.counts().given_up_tiles;
        let gave_up = (given_up > 0).then(|| {
            format!(
                "the analysis stopped at its budget of mask evaluations and left {given_up} \
                 undecided tile(s) partial: the kernel masks them element by element, which costs \
                 less than deciding them (docs/block-maps.md)"
            )
        });
        if total == 0 {
            return gave_up.map(|g| format!("note: {g}"));
        }
        let text = &self.file.text;
        let place = |id: crate::sema::ExprId| {
            let span = self.spec.spans[id.0 as usize];
            // A parenthesised operand's span leaves out its parentheses:
            // take them back in where the snippet does not balance.
            let (mut start, mut end) = (span.start, span.end);
            let count =
                |a: usize, b: usize, c: char| text.get(a..b).map_or(0, |t| t.matches(c).count());
            while count(start, end, ')') > count(start, end, '(') {
                match text.get(..start).and_then(|t| t.rfind('(')) {
                    Some(i) => start = i,
                    None => break,
                }
            }
            while count(start, end, '(') > count(start, end, ')') {
                match text.get(end..).and_then(|t| t.find(')')) {
                    Some(i) => end += i + 1,
                    None => break,
                }
            }
            let (line, col) = line_col(text, start);
            let src = text.get(start..end).unwrap_or("?");
            let src: String = src.split_whitespace().collect::<Vec<_>>().join(" ");
            let src = if src.chars().count() > 60 {
                format!("{}...", src.chars().take(57).collect::<String>())
            } else {
                src
            };
            format!("`{src}` ({}:{line}:{col})", self.file.name)
        };
        let mut note = format!(
            "note: {total} element(s) of the mask were evaluated one by one: the symbolic analysis \
             could not decide {} over whole tiles",
            place(by[0].0)
        );
        if let Some(&(id, n)) = by.get(1) {
            note += &format!(" ({} of them; {n} for {})", by[0].1, place(id));
        }
        note += "; masks of positions, affine comparisons and sorted or constant buffers are \
                 decided per tile (docs/block-maps.md)";
        if let Some(g) = gave_up {
            note += "; ";
            note += &g;
        }
        Some(note)
    }

    /// Refuses a run on `backend` whose outputs and scratch
    /// ([`crate::memory::run_estimate`]) would not fit the memory available,
    /// before anything is allocated.
    fn check_memory(
        &self,
        bound: &crate::bind::Bound,
        backend: crate::memory::Backend,
        tiling: crate::mask::Tiling,
        threads: usize,
    ) -> Result<(), Error> {
        let need = crate::memory::run_estimate(
            &self.spec,
            &bound.shapes,
            bound.key_rows(),
            backend,
            tiling,
            threads,
            nest_for(bound, tiling, default_bf16_pairs()).1,
        );
        Ok(need.check(format_args!(
            "running `{}` on {} ({backend:?})",
            self.spec.name,
            crate::memory::shapes_text(&bound.shapes)
        ))?)
    }

    pub fn run_reference(&self, inputs: &Inputs<'_>) -> Result<Outputs, Error> {
        self.run_reference_observed(inputs, &mut |_, _| {})
    }

    /// [`Program::run_reference`], calling `progress(rows done, rows in all)`
    /// as it goes (`reference::run_observed`).
    pub fn run_reference_observed(
        &self,
        inputs: &Inputs<'_>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Outputs, Error> {
        let bound = bind(&self.spec, inputs)?;
        // The reference has no tiles; the estimate does not use them.
        let tiling = crate::mask::Tiling { bq: 1, bkv: 1 };
        self.check_memory(&bound, crate::memory::Backend::Reference, tiling, 1)?;
        crate::reference::run_observed(&self.spec, inputs, &bound, progress).map_err(|error| {
            Error::Eval {
                file: self.file.clone(),
                error,
            }
        })
    }
}

/// The backend that runs a call ([`Program::run_on`]): the choice a CLI or
/// a binding passes through, with what each backend needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The f64 reference interpreter (the oracle).
    Reference,
    /// The loop-IR interpreter (f32, tile by tile).
    Interp(Tiles),
    /// Native code for this CPU, compiled with Cranelift.
    Jit {
        tiles: Tiles,
        gemm: crate::codegen::clif::GemmImpl,
    },
    /// An NVIDIA GPU through the CUDA driver, with q, k and v of this type
    /// (needs a build with the `cuda` feature).
    Cuda(crate::codegen::ptx::Dtype),
}

impl Backend {
    /// The name `attnc run --backend` gives it.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Reference => "reference",
            Backend::Interp(_) => "interp",
            Backend::Jit { .. } => "jit",
            Backend::Cuda(_) => "cuda",
        }
    }
}

impl Program {
    /// Runs a call on `backend`, calling `progress(done, total)` where the
    /// backend reports progress: rows of the reference, query tiles of the
    /// jit's block maps while they are built.
    pub fn run_on(
        &self,
        backend: Backend,
        inputs: &Inputs<'_>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Outputs, Error> {
        match backend {
            Backend::Reference => self.run_reference_observed(inputs, progress),
            Backend::Interp(tiles) => self.run_interp(inputs, self.tiling(tiles)),
            Backend::Jit { tiles, gemm } => self
                .compile_jit(self.tiling(tiles), gemm)?
                .run_observed(inputs, progress),
            Backend::Cuda(dtype) => self.run_cuda(inputs, dtype),
        }
    }

    /// Runs a call on GPU 0 through the CUDA driver, with q, k and v rounded
    /// to `dtype`; errors are those of the CPU backends (a run-time error is
    /// the reference's first, as on the CPU).
    #[cfg(feature = "cuda")]
    pub fn run_cuda(
        &self,
        inputs: &Inputs<'_>,
        dtype: crate::codegen::ptx::Dtype,
    ) -> Result<Outputs, Error> {
        use crate::runtime::cuda::{CudaError, CudaRuntime};
        let run = || CudaRuntime::new(0)?.run(&self.spec, inputs, dtype);
        run().map_err(|e| match e {
            CudaError::Bind(e) => Error::Bind(e),
            CudaError::Eval(error) | CudaError::Mask(crate::mask::MaskError::Eval(error)) => {
                self.first_error_of(inputs, error)
            }
            CudaError::Mask(e) => Error::Mask(e),
            CudaError::Memory(e) => Error::Memory(e),
            CudaError::Codegen(e) => Error::Codegen(e.into()),
            e => {
                let help = e.help().map(|h| format!(" ({h})")).unwrap_or_default();
                Error::Io {
                    what: "the CUDA backend failed".into(),
                    reason: format!("{e}{help}"),
                }
            }
        })
    }

    /// Without the `cuda` feature: a usage error that says how to build it.
    #[cfg(not(feature = "cuda"))]
    pub fn run_cuda(
        &self,
        _: &Inputs<'_>,
        _: crate::codegen::ptx::Dtype,
    ) -> Result<Outputs, Error> {
        Err(Error::Usage(
            "this attnc was built without CUDA support: rebuild with `cargo build --release --features cuda`"
                .into(),
        ))
    }

    /// Binds the buffer `name` to `source`: a `.npy` file (float64 data of a
    /// float buffer is converted), or, with `rng`, a recipe of
    /// [`crate::bench::generate_buffer`] for `shapes` where `source` does not
    /// end in `.npy`. Returns whether the file was converted, for a note.
    pub fn bind_buffer(
        &self,
        inputs: &mut Inputs<'_>,
        shapes: &crate::sema::eval::Shapes,
        name: &str,
        source: &str,
        rng: Option<&mut crate::bench::Rng>,
    ) -> Result<bool, Error> {
        let Some(id) = self.spec.buffer_id(name) else {
            return Err(crate::bind::unknown_buffer(&self.spec, name).into());
        };
        let decl = self.spec.buffer(id);
        let (data, converted) = match rng {
            Some(rng) if !source.ends_with(".npy") => (
                crate::bench::generate_buffer(decl, shapes, source, rng)?,
                false,
            ),
            _ => crate::npy::read_buffer_converting(std::path::Path::new(source), name, decl.elem)?,
        };
        inputs.buffers.insert(name.to_string(), data);
        Ok(converted)
    }
}

/// The CUDA runtime and the PTX backend composed: the runtime launches what
/// codegen generated, and neither knows the other.
#[cfg(feature = "cuda")]
impl crate::runtime::cuda::CudaRuntime {
    /// Lowers `spec` for head dim `d` under the PTX schedule for dense K/V,
    /// generates the PTX for this device and loads it.
    pub fn compile(
        &self,
        spec: &Spec,
        d: usize,
        dtype: crate::codegen::ptx::Dtype,
    ) -> Result<crate::runtime::cuda::CudaKernel, crate::runtime::cuda::CudaError> {
        let schedule = crate::codegen::ptx::schedule(d, dtype);
        self.compile_with(spec, &schedule, dtype, None)
    }

    /// The kernel a bound call takes ([`ptx_plan`]: K/V read in place for a
    /// ragged batch, a paged pool or a quantized cache), loaded.
    pub fn compile_for(
        &self,
        spec: &Spec,
        bound: &crate::bind::Bound,
        dtype: crate::codegen::ptx::Dtype,
    ) -> Result<crate::runtime::cuda::CudaKernel, crate::runtime::cuda::CudaError> {
        let (schedule, kv_quant) = ptx_plan(bound, dtype);
        self.compile_with(spec, &schedule, dtype, kv_quant)
    }

    fn compile_with(
        &self,
        spec: &Spec,
        schedule: &crate::tile::Schedule,
        dtype: crate::codegen::ptx::Dtype,
        kv_quant: Option<crate::tensor::ElemType>,
    ) -> Result<crate::runtime::cuda::CudaKernel, crate::runtime::cuda::CudaError> {
        use crate::codegen::ptx;
        let kernel = crate::tile::lower(spec, schedule);
        let options = ptx::PtxOptions {
            arch: self.arch(),
            dtype,
            kv_quant,
        };
        let code = ptx::compile(&kernel, &options)?;
        self.load(spec, kernel, code)
    }

    /// Binds, compiles, uploads, runs and downloads in one call.
    pub fn run(
        &self,
        spec: &Spec,
        inputs: &Inputs<'_>,
        dtype: crate::codegen::ptx::Dtype,
    ) -> Result<Outputs, crate::runtime::cuda::CudaError> {
        let bound = bind(spec, inputs)?;
        if bound.is_empty() {
            // No rows: nothing to compile, upload or launch.
            return Ok(Outputs::empty(&bound.shapes, inputs.want_lse));
        }
        let k = self.compile_for(spec, &bound, dtype)?;
        let mut p = self.prepare_bound(&k, inputs, bound)?;
        self.launch(&k, &mut p)?;
        self.finish(&k, &p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Rng;

    fn program(src: &str) -> Program {
        load(SourceFile::new("t.attn", src), &SpecOptions::default()).unwrap()
    }

    fn jit(program: &Program) -> JitKernel {
        program
            .compile_jit(
                crate::mask::Tiling::new(64, 64).unwrap(),
                crate::codegen::clif::GemmImpl::detect(),
            )
            .unwrap()
    }

    fn max_diff(a: &Outputs, b: &Outputs) -> f32 {
        a.out
            .iter()
            .zip(&b.out)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// A page table in column-major (Fortran) layout reads the same pages as
    /// the same table in row-major layout: the kernels read a sequence's row
    /// of the table as a contiguous run, so binding keeps a standard copy.
    /// The entries past each sequence's pages are garbage.
    #[test]
    fn a_column_major_page_table_reads_the_same_pages() {
        let p = program("attention a { mask = causal }");
        let kernel = jit(&p);
        let mut rng = Rng::new(7);
        let (pages, ps, hkv, d) = (12, 4, 2, 8);
        let kp = rng.array4((pages, ps, hkv, d));
        let vp = rng.array4((pages, ps, hkv, d));
        // Sequence 0 uses pages 3, 7, 1 (11 keys) and sequence 1 pages 10,
        // 0, 5 (10 keys): 1_000_000 and -9 sit past their pages.
        let rows = vec![3, 7, 1, 1_000_000, 10, 0, 5, -9, 11, 2, 4, 6];
        let table = ndarray::Array2::from_shape_vec((3, 4), rows).unwrap();
        let lens = ndarray::Array1::from_vec(vec![11, 10, 13]);
        let mut fortran = ndarray::Array2::<i32>::zeros(ndarray::ShapeBuilder::f((3, 4)));
        fortran.assign(&table);
        assert!(!fortran.is_standard_layout());
        for q_len in [1, 6] {
            let q = rng.array4((3, 4, q_len, d));
            let want = p
                .run_reference(&Inputs::paged(
                    q.view(),
                    kp.view(),
                    vp.view(),
                    table.view(),
                    lens.view(),
                ))
                .unwrap();
            let inputs = Inputs::paged(q.view(), kp.view(), vp.view(), fortran.view(), lens.view());
            let got = kernel.run(&inputs).unwrap();
            assert!(max_diff(&got, &want) < 1e-5, "Q = {q_len}");
            let tiling = crate::mask::Tiling::new(5, 3).unwrap();
            let got = p.run_interp(&inputs, tiling).unwrap();
            assert!(max_diff(&got, &want) < 1e-5, "interp, Q = {q_len}");
        }
    }

    /// A plan carries the spec its block maps were built for: a kernel of
    /// another spec refuses it (its maps would skip or mask other tiles),
    /// another kernel of the same spec takes it.
    #[test]
    fn a_plan_serves_kernels_of_its_own_spec_only() {
        let causal = program("attention a { mask = causal }");
        let window = program("attention a { mask = causal && q - kv < 16 }");
        let (kc, kw, kc2) = (jit(&causal), jit(&window), jit(&causal));
        let x = Rng::new(3).array4((1, 2, 300, 16));
        let inputs = Inputs::new(x.view(), x.view(), x.view());
        let plan = kw.plan(&inputs).unwrap();
        match kc.run_planned(&inputs, &plan) {
            Err(Error::Usage(m)) => assert!(
                m.starts_with("the plan was made by a kernel of another spec also named `a`"),
                "{m}"
            ),
            other => panic!("expected a usage error, got {other:?}"),
        }
        let want = kc.run(&inputs).unwrap();
        let got = kc2
            .run_planned(&inputs, &kc.plan(&inputs).unwrap())
            .unwrap();
        assert_eq!(got.out, want.out);
    }

    /// `run_planned` takes the very inputs of its plan, NaN in a float
    /// buffer included (the derived `==` found NaN unequal to itself and
    /// refused them), and names what differs when they are not.
    #[test]
    fn a_plan_names_what_differs_from_its_inputs() {
        let p = program(
            "attention a { buffer slope[H]: float\n mask = causal\n score = score + slope[h] }",
        );
        let k = jit(&p);
        let x = Rng::new(5).array4((2, 4, 40, 8));
        let kv = Rng::new(6).array4((2, 2, 40, 8));
        fn slope(s1: f32) -> crate::BufferData {
            let values = vec![0.5, s1, 0.1, 0.2];
            crate::BufferData::Float(ndarray::ArrayD::from_shape_vec(vec![4], values).unwrap())
        }
        fn call<'a>(
            x: &'a ndarray::Array4<f32>,
            k: crate::tensor::KvData<'a>,
            v: crate::tensor::KvData<'a>,
            s1: f32,
        ) -> Inputs<'a> {
            Inputs::new(x.view(), k, v).buffer("slope", slope(s1))
        }
        let with = |s1| call(&x, kv.view().into(), kv.view().into(), s1);
        let inputs = with(f32::NAN);
        let plan = k.plan(&inputs).unwrap();
        let want = k.run(&inputs).unwrap();
        let got = k.run_planned(&inputs, &plan).unwrap();
        let bits = |o: &Outputs| o.out.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want), "head 1 NaN, the others finite");
        assert!(want.out.iter().any(|x| x.is_nan()) && want.out.iter().any(|x| x.is_finite()));
        let refused = |other: &Inputs<'_>| match k.run_planned(other, &plan) {
            Err(Error::Usage(m)) => m,
            other => panic!("expected a usage error, got {other:?}"),
        };
        let m = refused(&with(0.3));
        assert!(m.contains("other inputs: buffer `slope` differs"), "{m}");
        let bf16 = crate::tensor::KvArray::quantize(kv.view(), crate::tensor::ElemType::Bf16);
        let m = refused(&call(&x, bf16.view(), bf16.view(), f32::NAN));
        assert!(
            m.contains("K/V stored as f32 in the plan, bf16 in this call"),
            "{m}"
        );
        let shared = kv.slice(ndarray::s![..1, .., .., ..]);
        let m = refused(&call(&x, shared.into(), shared.into(), f32::NAN));
        assert!(
            m.contains("K/V batch (1: shared by every query batch) 2 in the plan, 1 in this call"),
            "{m}"
        );
        let m = refused(&with(f32::NAN).kv_offset(3));
        assert!(
            m.contains("key offset 0 in the plan, 3 in this call"),
            "{m}"
        );
    }

    /// A call with no rows (B, H or Q of 0, with key/value heads or not) gives
    /// empty outputs on every CPU backend: H = 0 with HKV = 2 used to divide
    /// by a GQA group of 0 heads in the jit.
    #[test]
    fn calls_without_rows_give_empty_outputs() {
        let p = program("attention a { mask = causal }");
        let kernel = jit(&p);
        for (q_shape, q_offset) in [
            ((1, 0, 1, 8), 3),
            ((1, 0, 200, 8), 0),
            ((0, 2, 4, 8), 0),
            ((1, 2, 0, 8), 0),
        ] {
            let q = ndarray::Array4::<f32>::zeros(q_shape);
            let kv = Rng::new(1).array4((1, 2, 200, 8));
            let inputs = Inputs::new(q.view(), kv.view(), kv.view())
                .q_offset(q_offset)
                .with_lse();
            let tiling = crate::mask::Tiling::new(64, 64).unwrap();
            for out in [
                kernel.run(&inputs).unwrap(),
                p.run_interp(&inputs, tiling).unwrap(),
                p.run_reference(&inputs).unwrap(),
            ] {
                let (b, h, q, d) = q_shape;
                assert_eq!(out.out.shape(), &[b, h, q, d]);
                assert_eq!(out.lse.unwrap().shape(), &[b, h, q]);
            }
        }
    }

    /// A small call far along the sequence costs what its rows cost: the
    /// reference's row of scores and the jit's packed keys are sized by the
    /// key rows, not by the end of the positions (`KV`, offsets included).
    #[test]
    fn a_small_call_at_a_large_offset_needs_little_memory() {
        let p = program("attention a { param w: int = 3 mask = causal && q - kv < w }");
        let kernel = jit(&p);
        let mut rng = Rng::new(5);
        let (q, kv) = (rng.array4((1, 2, 2, 8)), rng.array4((1, 2, 4, 8)));
        for (q_offset, kv_offset) in [
            (1_000_000_002, 1_000_000_000),
            ((1 << 31) - 3, (1 << 31) - 5),
        ] {
            let inputs = Inputs::new(q.view(), kv.view(), kv.view())
                .q_offset(q_offset)
                .kv_offset(kv_offset)
                .with_lse();
            let want = p.run_reference(&inputs).unwrap();
            let got = kernel.run(&inputs).unwrap();
            assert!(max_diff(&got, &want) < 1e-5);
            let near = Inputs::new(q.view(), kv.view(), kv.view())
                .q_offset(2)
                .with_lse();
            assert!(max_diff(&p.run_reference(&near).unwrap(), &want) < 1e-6);
        }
    }

    /// The reference and the interpreter refuse a call whose outputs cannot
    /// fit in memory, before allocating them, as the jit does.
    #[test]
    fn every_cpu_backend_refuses_outputs_past_the_memory() {
        let p = program("attention a { mask = causal }");
        let one = ndarray::Array4::<f32>::zeros((1, 1, 1, 8));
        let q = one.broadcast((1 << 15, 1 << 15, 1 << 15, 8)).unwrap();
        let kv = one.broadcast((1, 1, 4, 8)).unwrap();
        let inputs = Inputs::new(q, kv, kv);
        let tiling = crate::mask::Tiling::new(64, 64).unwrap();
        for result in [
            p.run_reference(&inputs),
            p.run_interp(&inputs, tiling),
            jit(&p).run(&inputs),
        ] {
            match result {
                Err(Error::Memory(e)) => assert!(e.to_string().contains("out"), "{e}"),
                other => panic!("expected a memory error, got {:?}", other.map(|_| ())),
            }
        }
    }

    /// The nest groups heads only when there are heads to group: with H = 0
    /// and HKV = 2 a GQA group has 0 heads, and the jit (past its early
    /// return for calls without rows) and the interpreter would divide by it.
    #[test]
    fn no_grouped_nest_for_zero_heads() {
        use crate::tensor::ElemType;
        use crate::tile::nest::RowMap;
        let tiling = crate::mask::Tiling::new(64, 64).unwrap();
        for (h, q, paged) in [(0, 1, false), (0, 1, true), (0, 200, false), (8, 1, true)] {
            let sh = crate::sema::eval::Shapes {
                b: 1,
                h,
                hkv: 2,
                q,
                kv: 300,
                d: 8,
            };
            let (rows, _) =
                nest_for_shapes(&sh, paged, ElemType::F32, ElemType::F32, tiling, false);
            let grouped = matches!(rows, RowMap::GqaGroup | RowMap::AllHeads);
            assert_eq!(grouped, h > 0, "H = {h}, Q = {q}, paged {paged}: {rows:?}");
        }
    }

    /// Tiles of 0 are refused when the kernel is compiled.
    #[test]
    fn fixed_tiles_of_zero_are_refused_at_compile_time() {
        let p = program("attention a { mask = causal }");
        let options = CompileOptions {
            tiles: Tiles::Fixed(crate::mask::Tiling { bq: 0, bkv: 64 }),
            ..CompileOptions::default()
        };
        assert!(matches!(p.compile_jit_with(&options), Err(Error::Mask(_))));
    }

    /// On the CUDA runtime, a ragged batch, a paged pool and a quantized
    /// cache read K/V in place (quantized: with its stored type); dense f32
    /// K/V are packed for the device.
    #[test]
    fn cuda_calls_read_ragged_paged_and_quantized_kv_in_place() {
        use crate::codegen::ptx::Dtype;
        use crate::tensor::{ElemType, KvArray};
        use crate::tile::nest::KvSource;
        let program = load(
            SourceFile::new("t.attn", "attention a { mask = causal }"),
            &SpecOptions::default(),
        )
        .unwrap();
        let q = ndarray::Array4::<f32>::zeros((2, 2, 1, 8));
        let kv = ndarray::Array4::<f32>::zeros((2, 1, 32, 8));
        let pool = ndarray::Array4::<f32>::zeros((4, 16, 1, 8));
        let table = ndarray::Array2::from_shape_vec((2, 2), vec![0, 1, 3, 2]).unwrap();
        let lens = ndarray::Array1::from_vec(vec![32, 20]);
        let k8 = KvArray::quantize(kv.view(), ElemType::Int8);
        let plan = |inputs: &Inputs<'_>| {
            let bound = bind(&program.spec, inputs).unwrap();
            let (schedule, quant) = ptx_plan(&bound, Dtype::F16);
            (schedule.kv, quant, schedule.dim)
        };
        let dense = Inputs::new(q.view(), kv.view(), kv.view()).q_offset(31);
        assert_eq!(plan(&dense), (KvSource::Packed, None, Some(8)));
        let ragged = Inputs::new(q.view(), kv.view(), kv.view()).kv_lens(lens.view());
        assert_eq!(plan(&ragged), (KvSource::InPlace, None, Some(8)));
        let paged = Inputs::paged(
            q.view(),
            pool.view(),
            pool.view(),
            table.view(),
            lens.view(),
        );
        assert_eq!(plan(&paged), (KvSource::InPlace, None, Some(8)));
        let quant = Inputs::new(q.view(), k8.view(), k8.view()).q_offset(31);
        assert_eq!(
            plan(&quant),
            (KvSource::InPlace, Some(ElemType::Int8), Some(8))
        );
    }

    /// A bf16 prefill multiplies pairs only where asked, and by default only
    /// where the products have `vdpbf16ps`: never on AVX2 or the portable
    /// path, on AVX-512 only with AVX-512 BF16. Decode and quantized caches
    /// read in place either way.
    #[test]
    fn bf16_pairs_need_a_bf16_dot_product() {
        use crate::codegen::clif::GemmImpl;
        use crate::runtime::gemm::NativeIsa;
        use crate::tensor::ElemType::{Bf16, Int8, F16, F32};
        use crate::tile::nest::{KvSource, RowMap};
        assert!(!has_bf16_dot(GemmImpl::Native(NativeIsa::Avx2)));
        assert!(!has_bf16_dot(GemmImpl::Native(NativeIsa::Portable)));
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            has_bf16_dot(GemmImpl::Native(NativeIsa::Avx512)),
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bf16")
                && crate::runtime::gemm::pairs::dpbf16_pays()
        );
        let tiling = crate::mask::Tiling::new(64, 64).unwrap();
        let prefill = crate::sema::eval::Shapes {
            b: 1,
            h: 8,
            hkv: 2,
            q: 512,
            kv: 512,
            d: 64,
        };
        let decode = crate::sema::eval::Shapes { q: 1, ..prefill };
        for paged in [false, true] {
            let decode_rows = if paged {
                RowMap::AllHeads
            } else {
                RowMap::GqaGroup
            };
            for (sh, q, kv, pairs, want) in [
                (
                    &prefill,
                    Bf16,
                    Bf16,
                    true,
                    (RowMap::OneHead, KvSource::PackedBf16),
                ),
                (
                    &prefill,
                    Bf16,
                    Bf16,
                    false,
                    (RowMap::OneHead, KvSource::Packed),
                ),
                (
                    &prefill,
                    F32,
                    Bf16,
                    true,
                    (RowMap::OneHead, KvSource::Packed),
                ),
                (
                    &prefill,
                    F16,
                    F16,
                    true,
                    (RowMap::OneHead, KvSource::Packed),
                ),
                (
                    &prefill,
                    F32,
                    F32,
                    true,
                    (RowMap::OneHead, KvSource::Packed),
                ),
                (
                    &prefill,
                    Bf16,
                    Int8,
                    true,
                    (RowMap::OneHead, KvSource::InPlace),
                ),
                (&decode, Bf16, Bf16, true, (decode_rows, KvSource::InPlace)),
            ] {
                assert_eq!(
                    nest_for_shapes(sh, paged, q, kv, tiling, pairs),
                    want,
                    "{sh:?} paged {paged} q {q} kv {kv} pairs {pairs}"
                );
            }
        }
    }

    /// Running heads in small packing groups (down to one head at a time, and
    /// with a ragged last group) and reusing the workspace across calls of
    /// other shapes gives exactly the outputs of one group.
    #[test]
    fn packing_groups_and_workspace_reuse_do_not_change_results() {
        let src = "attention c { mask = causal && q - kv < 40 }";
        let kernel = compile(SourceFile::new("c.attn", src), &CompileOptions::default()).unwrap();
        let mut workspace = Vec::new();
        // d = 24 packs V, d = 32 reads it in place; 2 x 3 kv heads make 6 packed heads.
        for (n, d) in [(100, 24), (70, 32), (9, 24)] {
            let mut rng = Rng::new(n as u64);
            let q = rng.array4((2, 6, n, d));
            let k = rng.array4((2, 3, n, d));
            let v = rng.array4((2, 3, n, d));
            let inputs = Inputs::new(q.view(), k.view(), v.view()).with_lse();
            let plan = kernel.plan(&inputs).unwrap();
            let run = |budget: usize, ws: &mut Vec<f32>| {
                crate::runtime::exec::run_with_budget(
                    kernel.compiled.code(),
                    &inputs,
                    &plan.bound,
                    &plan.maps,
                    ws,
                    budget,
                )
                .unwrap()
            };
            let whole = run(usize::MAX, &mut Vec::new());
            let head_bytes = 4 * n * d * if d == 24 { 2 } else { 1 };
            for heads_per_group in [1, 4] {
                let got = run(heads_per_group * head_bytes, &mut workspace);
                assert_eq!(
                    got.out, whole.out,
                    "n={n} d={d}, budget of {heads_per_group} unpadded heads"
                );
                assert_eq!(
                    got.lse, whole.lse,
                    "n={n} d={d}, budget of {heads_per_group} unpadded heads"
                );
            }
        }
    }

    /// The jit's own error record, decoded by `runtime::abi::decode` without
    /// the reference's help, names the cycle's start as the reference does.
    #[test]
    fn the_jit_decodes_a_cycle_with_its_start() {
        let src = "attention t {\n    buffer parent[KV]: int\n    \
                   score = if ancestor(parent, q, kv) { score } else { score - 1.0 }\n}\n";
        let program = load(SourceFile::new("t.attn", src), &SpecOptions::default()).unwrap();
        let kernel = program
            .compile_jit(
                crate::mask::Tiling::new(16, 16).unwrap(),
                crate::codegen::clif::GemmImpl::detect(),
            )
            .unwrap();
        // 0 <- 1 <- 2 ... with 5 -> 6 -> 5 a cycle.
        let mut parent: Vec<i64> = (0..20).map(|i| i - 1).collect();
        parent[5] = 6;
        parent[6] = 5;
        let q = Rng::new(2).array4((1, 1, 20, 8));
        let inputs = Inputs::new(q.view(), q.view(), q.view()).buffer(
            "parent",
            crate::BufferData::Int(ndarray::ArrayD::from_shape_vec(vec![20], parent).unwrap()),
        );
        let Err(Error::Eval { error: want, .. }) = program.run_reference(&inputs) else {
            panic!("the reference finds the cycle")
        };
        let plan = kernel.plan(&inputs).unwrap();
        let got = crate::runtime::exec::run(
            kernel.compiled.code(),
            &inputs,
            &plan.bound,
            &plan.maps,
            &mut Vec::new(),
        )
        .unwrap_err();
        let start = |e: &EvalError| match e {
            EvalError::AncestorCycle { start, .. } => *start,
            e => panic!("{e}"),
        };
        assert!((5..20).contains(&start(&got)), "{got}");
        assert_eq!(start(&want), 5, "{want}");
    }

    /// `run_on` runs every CPU backend with buffers bound by `bind_buffer`
    /// (a recipe and a `.npy` file), to the reference's outputs; CUDA without
    /// the feature, an unknown buffer and a bad recipe are errors.
    #[test]
    fn run_on_selects_the_backend_and_bind_buffer_binds() {
        let src = "attention a {\n    buffer doc[KV]: int\n    buffer bias[H]: float\n    \
                   mask = causal && doc[q] == doc[kv]\n    score = score + bias[h]\n}\n";
        let program = load(SourceFile::new("a.attn", src), &SpecOptions::default()).unwrap();
        let mut rng = Rng::new(4);
        let (q, k, v) = (
            rng.array4((1, 2, 40, 8)),
            rng.array4((1, 2, 40, 8)),
            rng.array4((1, 2, 40, 8)),
        );
        let shapes = crate::sema::eval::Shapes {
            b: 1,
            h: 2,
            hkv: 2,
            q: 40,
            kv: 40,
            d: 8,
        };
        let tmp = tempfile::Builder::new()
            .prefix("attnc-bind-")
            .tempdir()
            .unwrap();
        let dir = tmp.path();
        let bias = dir.join("bias.npy");
        ndarray_npy::write_npy(&bias, &ndarray::arr1(&[0.5f64, -1.0])).unwrap();
        let mut inputs = Inputs::new(q.view(), k.view(), v.view()).with_lse();
        let converted = program
            .bind_buffer(&mut inputs, &shapes, "doc", "docs:3", Some(&mut rng))
            .unwrap();
        assert!(!converted);
        let converted = program
            .bind_buffer(
                &mut inputs,
                &shapes,
                "bias",
                bias.to_str().unwrap(),
                Some(&mut rng),
            )
            .unwrap();
        assert!(converted, "float64 data is converted");
        drop(tmp);
        let want = program
            .run_on(Backend::Reference, &inputs, &mut |_, _| {})
            .unwrap();
        let tiles = Tiles::Fixed(crate::mask::Tiling::new(16, 16).unwrap());
        for backend in [
            Backend::Interp(tiles),
            Backend::Jit {
                tiles,
                gemm: crate::codegen::clif::GemmImpl::detect(),
            },
        ] {
            let mut calls = 0;
            let got = program
                .run_on(backend, &inputs, &mut |_, _| calls += 1)
                .unwrap();
            let diff = got
                .out
                .iter()
                .zip(&want.out)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "{} differs by {diff}", backend.name());
            if matches!(backend, Backend::Jit { .. }) {
                assert!(calls > 0, "the jit reports its block-map progress");
            }
        }
        let e = program.bind_buffer(&mut inputs, &shapes, "nope", "docs:3", Some(&mut rng));
        assert!(matches!(e, Err(Error::Bind(_))), "{e:?}");
        let e = program.bind_buffer(&mut inputs, &shapes, "doc", "docs:x", Some(&mut rng));
        assert!(e.is_err(), "{e:?}");
        #[cfg(not(feature = "cuda"))]
        {
            let e = program
                .run_on(
                    Backend::Cuda(crate::codegen::ptx::Dtype::F32),
                    &inputs,
                    &mut |_, _| {},
                )
                .unwrap_err();
            assert!(e.to_string().contains("--features cuda"), "{e}");
        }
    }

    /// With `check_proven_loads`, a read the optimiser proved in range that is
    /// out of range at run time (here: a buffer swapped for a shorter one
    /// behind the binding's back) stops with a compiler-bug panic instead of
    /// reading past the buffer.
    #[test]
    #[should_panic(expected = "compiler bug: the read")]
    fn a_proven_read_out_of_range_panics_when_checked() {
        let src = "attention a {\n    buffer t[KV]: int\n    score = score + float(t[kv])\n}\n";
        let program = load(SourceFile::new("a.attn", src), &SpecOptions::default()).unwrap();
        let options = CompileOptions {
            tiles: Tiles::Fixed(crate::mask::Tiling::new(16, 16).unwrap()),
            check_proven_loads: true,
            ..CompileOptions::default()
        };
        let kernel = program.compile_jit_with(&options).unwrap();
        assert!(
            kernel
                .compiled
                .kernel
                .insts
                .iter()
                .any(|i| matches!(i.op, crate::tile::Op::Load { checked: false, .. })),
            "the read is proven in range"
        );
        let q = Rng::new(1).array4((1, 1, 40, 8));
        let t = crate::BufferData::Int(ndarray::ArrayD::zeros(vec![40]));
        let inputs = Inputs::new(q.view(), q.view(), q.view()).buffer("t", t);
        let plan = kernel.plan(&inputs).unwrap();
        let mut bound = plan.bound.clone();
        bound.buffers[0] = crate::BufferData::Int(ndarray::ArrayD::zeros(vec![20]));
        let _ = kernel.run_with_maps(&inputs, &bound, &plan.maps);
    }
}
