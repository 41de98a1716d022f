//! Stage 4, tile: the tiled online-softmax loop IR.
//!
//! Entry points: [`build`] (checked spec + schedule → kernel), [`optimize`],
//! [`verify()`], [`interp::run`], and the text form (`Display` on [`Kernel`]).
//! The IR is generic over batch, heads and lengths; it specialises on the
//! schedule (tile sizes, exp base, optionally the head dim).

mod build;
pub mod builder;
pub mod interp;
pub mod ir;
pub mod math;
pub mod nest;
pub mod opt;
mod print;
pub mod range;
pub mod verify;

pub use build::build;
pub use ir::*;
pub use nest::LoopNest;
pub use opt::optimize;
pub use verify::{verify, Verified, VerifyError};

/// Lowers and optimises a spec: the kernel every backend translates.
pub fn lower(spec: &crate::sema::Spec, schedule: &Schedule) -> Verified {
    optimize(&build(spec, schedule))
}
