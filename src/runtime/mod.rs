//! Runtime support for the compiled kernels: the native tile kernels (`gemm`) that
//! JIT'd code calls per tile, and the packing of K and V they read.
//!
//! Consumes tensors (ndarray views) and tile pointers; produces packed heads and tile
//! results. Nothing here depends on the spec being compiled.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod exec;
pub mod gemm;
