//! The Cranelift backend: JIT compilation for the host CPU.
//!
//! * `jit`: the JIT module (flags, ISA, symbols, definition, finalization) and the
//!   owner of the finalized code.
//! * `vmath`: emitters of f32x4 vector math (exp, exp2, log, log2, tanh, sigmoid,
//!   max/min, horizontal reductions) with documented accuracy.
//! * `microkernel`: JIT-generated f32x4 register-tiled `qk` / `pv` tile products with
//!   the same C ABI as the native kernels in `runtime::gemm`, and [`GemmImpl`] to pick
//!   between the two.
//!
//! Generated code is compiled at `opt_level = "none"`: the front end unrolls, hoists
//! and schedules, because Cranelift's optimiser spills heavily on register-tiled code.

pub mod jit;
pub mod kernel;
pub mod microkernel;
pub mod vmath;

pub use jit::{JitCode, JitModule, JitOptions};
pub use microkernel::GemmImpl;
