//! attnc: an attention compiler.
//!
//! A `.attn` spec describes an attention variant as a mask and a score mod;
//! attnc checks it, analyses the mask per tile, and runs it. The pipeline
//! (see `docs/architecture.md`):
//!
//! ```text
//! source --syntax::parse--> ast::File --sema::check--> sema::Spec --> backend --> Outputs
//! ```
//!
//! Library use:
//!
//! ```
//! use attnc::{load, Inputs, SourceFile, SpecOptions};
//! use attnc::ndarray::Array4;
//!
//! let src = SourceFile::new("causal.attn", "attention causal { mask = causal }");
//! let program = load(src, &SpecOptions::default()).unwrap();
//! let q = Array4::<f32>::ones((1, 2, 5, 8));
//! let k = Array4::<f32>::ones((1, 2, 5, 8));
//! let v = Array4::<f32>::ones((1, 2, 5, 8));
//! let out = program.run_reference(&Inputs::new(q.view(), k.view(), v.view()).with_lse()).unwrap();
//! assert_eq!(out.out.shape(), &[1, 2, 5, 8]);
//! ```

pub mod bench;
pub mod bind;
pub mod buffer;
pub mod codegen;
pub mod driver;
pub mod mask;
pub mod memory;
pub mod merge;
pub mod npy;
pub mod reference;
pub mod runtime;
pub mod sema;
pub mod syntax;
pub mod tile;

/// The ndarray this API takes and returns (`Array4<f32>` views in, arrays
/// out), re-exported so callers use the same version (0.16).
pub use ndarray;

pub use bind::{Inputs, KvLayout, Outputs};
pub use buffer::BufferData;
pub use driver::{
    compile, load, Backend, CompileOptions, Error, JitKernel, Plan, Program, SourceFile,
    SpecOptions, Tiles,
};
pub use merge::merge_states;
