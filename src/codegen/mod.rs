//! Code generation: backends that turn a tiled kernel into executable code.
//!
//! `clif` targets the host CPU through Cranelift (JIT). Its building blocks are usable on
//! their own: the JIT module wrapper (`clif::jit`), the f32x4 math emitters
//! (`clif::vmath`) and the JIT-generated tile products (`clif::microkernel`).

pub mod clif;
pub mod ptx;

/// Errors of code generation. A spec that passed checking either compiles or yields one
/// of these; code generation never panics on user input.
#[derive(Debug, thiserror::Error)]
pub enum CodegenError {
    /// The host CPU is not supported by Cranelift, or a flag was rejected.
    #[error("cannot target this CPU: {0}")]
    Isa(String),
    /// Cranelift rejected a function or failed to link the module.
    #[error("cranelift failed on `{function}`: {message}")]
    Cranelift {
        /// The function being compiled (or `<module>` when linking).
        function: String,
        /// Cranelift's message.
        message: String,
    },
    /// A function was looked up under a name that was never defined.
    #[error("no JIT function named `{0}` was defined")]
    UnknownFunction(String),
}
