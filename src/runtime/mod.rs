//! Runtime support for the compiled kernels: the ABI between generated code and
//! the runtime (`abi`), the native tile kernels (`gemm`) that JIT'd code calls per
//! tile, the packing of K and V they read, and the task runner (`exec`).
//!
//! Consumes tensors (ndarray views) and tile pointers; produces packed heads and tile
//! results. Nothing here depends on the spec being compiled.

pub mod abi;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod exec;
pub mod gemm;
