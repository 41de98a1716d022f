//! Code generation: backends that turn a tiled kernel into executable code.
//!
//! `clif` targets the host CPU through Cranelift (JIT). Its building blocks are usable on
//! their own: the JIT module wrapper (`clif::jit`), the f32x4 math emitters
//! (`clif::vmath`) and the JIT-generated tile products (`clif::microkernel`).

pub mod clif;
pub mod ptx;

/// Errors of code generation. A spec that passed checking either compiles or yields one
/// of these; code generation never panics on user input.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum CodegenError {
    /// The host CPU is not supported by Cranelift, or a flag was rejected.
    #[error("cannot target this CPU: {0}")]
    #[diagnostic(
        code(attnc::codegen::isa),
        help(
            "run with `--backend interp` or `--backend reference`, which need no code generation"
        )
    )]
    Isa(String),
    /// Cranelift rejected a function or failed to link the module.
    #[error("cranelift failed on `{function}`: {message}")]
    #[diagnostic(
        code(attnc::codegen::cranelift),
        help("this is a bug in attnc; `attnc emit SPEC --stage clif` shows the code it generated")
    )]
    Cranelift {
        /// The function being compiled (or `<module>` when linking).
        function: String,
        /// Cranelift's message.
        message: String,
    },
    /// A function was looked up under a name that was never defined.
    #[error("no JIT function named `{0}` was defined")]
    #[diagnostic(code(attnc::codegen::unknown_function))]
    UnknownFunction(String),
    /// The PTX backend cannot generate the kernel (its code and help say why).
    #[error(transparent)]
    #[diagnostic(transparent)]
    Ptx(#[from] ptx::PtxError),
}
