//! Stage 3, mask analysis: which tiles the mask rules out, which it fully
//! allows, and which need mask code.
//!
//! Entry point: [`classify`], which takes a checked [`crate::sema::Spec`], a
//! bound problem ([`crate::bind::Bound`]: shapes, query offset, buffers) and
//! a [`Tiling`], and produces [`BlockMaps`]: for every (b, h) that needs its
//! own map, a [`BlockMap`] that lists per query tile the FULL key tiles (as
//! ranges) and the PARTIAL key tiles; every other key tile is EMPTY.
//!
//! Guarantees, for every spec (see `docs/block-maps.md`):
//! - sound and exact: a tile is EMPTY iff every element in it is masked,
//!   FULL iff none is, PARTIAL iff it holds both. Positions past Q or KV are
//!   not elements: a ragged last tile is classified by its real elements.
//! - `classify` fails iff evaluating the mask at some element fails (an
//!   out-of-range read, a division by zero, a cyclic `ancestor` buffer), with
//!   the same error the reference interpreter reports; it never reads a
//!   buffer out of range.
//! - cost: decided by interval/affine reasoning and buffer summaries over
//!   boxes of many tiles (`absint`, `summary`); only tiles left undecided
//!   are looked at element by element. Causal and sliding-window maps take
//!   O(query tiles) time and memory whatever the sequence length.
//!
//! Maps do not depend on `b` or `h` unless the mask does ([`BlockMaps`]).
//! [`render`] draws maps as text or PNG; [`FlexLayout`] is FlexAttention's
//! block-mask layout for interop.

mod absint;
pub mod cache;
mod classify;
mod map;
pub mod render;
mod summary;

pub use cache::MapCache;
pub use classify::{classify, classify_observed};
pub use map::{AnalysisCounts, BlockMap, BlockMaps, BlockStats, FlexLayout, TileClass, Tiling};

use crate::sema::eval::EvalError;

/// A block map that cannot be built.
#[derive(Clone, Debug, PartialEq, thiserror::Error, miette::Diagnostic)]
pub enum MaskError {
    #[error("tile sizes must be at least 1, found {bq}x{bkv}")]
    #[diagnostic(
        code(attnc::mask::tile_size),
        help("use positive tile sizes, e.g. 64x64 or 128x128")
    )]
    ZeroTile { bq: usize, bkv: usize },
    #[error("bad tile size `{text}`: expected BQxBKV (e.g. 64x128) or N for NxN")]
    #[diagnostic(
        code(attnc::mask::tile_size),
        help("write the query and key tile sizes as positive integers, e.g. `--block 64x64`, or `--block auto` to let attnc pick them")
    )]
    BadTiling { text: String },
    #[error("too many {axis} tiles: {tiles} (at most 4294967295)")]
    #[diagnostic(code(attnc::mask::too_many_tiles), help("use larger tiles"))]
    TooManyTiles { axis: &'static str, tiles: usize },
    #[error(
        "positions overflow: q_offset {q_offset} + Q {q} (or KV {kv}) is past the largest int"
    )]
    #[diagnostic(
        code(attnc::mask::position_overflow),
        help("use a smaller query offset")
    )]
    PositionOverflow { q_offset: i64, q: usize, kv: usize },
    /// Evaluating the mask at some element failed.
    #[error(transparent)]
    #[diagnostic(transparent)]
    Eval(#[from] EvalError),
}
