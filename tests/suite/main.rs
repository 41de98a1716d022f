//! The integration tests, as one test binary: each binary links the whole
//! of attnc and Cranelift, so one link replaces sixteen. Each module was a
//! test file of its own and keeps its name (`cargo test --test suite
//! kv_cache::` runs one of them). Shared helpers are in [`support`]. The
//! CUDA tests (`tests/cuda_*.rs`, feature `cuda`) stay binaries of their own.

// The errors carry the interpreter's diagnostics by value, as the library's do.
#![allow(clippy::result_large_err)]

mod support;

mod backend_props;
mod block_maps;
mod cli;
mod errors;
mod flex_parity;
mod jit_parity;
mod kv_cache;
mod kv_types;
mod lowering_scale;
mod math_accuracy;
mod nonfinite;
mod ptx;
mod ptx_emulated;
mod reference_props;
mod robustness;
mod run_errors;
mod stages;
mod tile_ir;
