//! The loop nest of a kernel, as data.
//!
//! The loop IR's instructions say what to compute at each level (call, head,
//! row, column, element); the loop nest says what happens around them: the
//! parallel grid, how a tile's rows map to batch, head and query position,
//! where K and V come from, which key tiles are walked and how, the steps on
//! each key tile, and the finish. Every backend lowers these concepts by
//! matching on them instead of hard-coding one loop nest, so a new grid (the
//! GQA group of a KV head in one tile, a split of the key range with a merge),
//! a new K/V source (a paged pool, a quantized cache) or a new direction (the
//! backward pass) enters as a variant here, printed in `attnc emit --stage
//! nest`, and each backend that cannot yet lower it fails to compile on the
//! non-exhaustive match rather than computing something else.
//!
//! Today every kernel has the FlashAttention-2 forward nest
//! ([`LoopNest::forward`]).

use std::fmt;

use super::ir::{Schedule, Section};

/// What a kernel does around its scalar code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoopNest {
    /// The parallel iteration space: one task per element.
    pub grid: Grid,
    /// Which (batch, head, query position) row `i` of a task's tile is.
    pub rows: RowMap,
    /// Where the K and V tiles come from.
    pub kv: KvSource,
    /// Which key tiles a task visits, in order, and with which section of the
    /// scalar code (FULL tiles skip the mask).
    pub walk: KeyWalk,
    /// What each visited key tile does, in order.
    pub steps: Vec<Step>,
    /// How a task turns its running state into outputs.
    pub finish: Finish,
    /// The named outputs, in order.
    pub outputs: Vec<Output>,
}

/// The parallel grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grid {
    /// `(b, h, qt)` for every batch, query head and query tile of `bq` rows.
    QueryTiles { bq: usize },
}

/// How a tile's rows map to (batch, head, query position).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowMap {
    /// All rows of a tile belong to the task's head: row `i` is the query at
    /// absolute position `qt * bq + i + q_offset`.
    OneHead,
}

/// Where K and V come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvSource {
    /// Dense f32 tensors `[B|1, HKV, KV, D]`; query head `h` reads KV head
    /// `h / (H / HKV)`; batch 1 is shared by every query batch.
    Dense,
}

/// The key tiles a task visits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyWalk {
    /// The tiles of the block map of `bkv` keys each, section by section in
    /// this order: FULL tiles as ranges, PARTIAL tiles as a list; EMPTY tiles
    /// are never visited.
    BlockMap { bkv: usize, sections: Vec<Section> },
}

/// One step on a key tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// `S = (Q Kᵀ) × q_prescale` on the tile.
    Qk,
    /// The column-level values, once per key of the tile.
    Cols,
    /// The element-level values and the tile's scores: `score_full`, or on
    /// PARTIAL tiles `select(mask, score_partial, -inf)`.
    Scores,
    /// The online-softmax step: new row maxima, rescaled sums and
    /// accumulators, `P = e^(S - m)`.
    OnlineSoftmax,
    /// `acc += P V`, skipping keys of probability 0 in tiles whose V holds a
    /// non-finite value (so stale NaN at masked keys never reach a row).
    Pv,
}

/// How a task finishes its rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// `out = acc / l`, `lse = m + ln l` (in the kernel's exp units); a row
    /// with `l = 0` and `m = -inf` saw no key: `out = 0`, `lse = -inf`.
    Normalize,
}

/// A named output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// `out`: f32 `[B, H, Q, D]`.
    Out,
    /// `lse`: f32 `[B, H, Q]`, the natural log of the softmax denominator.
    Lse,
}

impl LoopNest {
    /// The FlashAttention-2 forward nest under `schedule`: one task per
    /// (batch, head, query tile), dense K/V, FULL then PARTIAL tiles of the
    /// block map, `qk, cols, scores, online softmax, pv` per tile.
    pub fn forward(schedule: &Schedule) -> LoopNest {
        LoopNest {
            grid: Grid::QueryTiles { bq: schedule.bq },
            rows: RowMap::OneHead,
            kv: KvSource::Dense,
            walk: KeyWalk::BlockMap {
                bkv: schedule.bkv,
                sections: vec![Section::Full, Section::Partial],
            },
            steps: vec![
                Step::Qk,
                Step::Cols,
                Step::Scores,
                Step::OnlineSoftmax,
                Step::Pv,
            ],
            finish: Finish::Normalize,
            outputs: vec![Output::Out, Output::Lse],
        }
    }

    /// The sections of the key walk, in order.
    pub fn sections(&self) -> &[Section] {
        match &self.walk {
            KeyWalk::BlockMap { sections, .. } => sections,
        }
    }
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Section::Shared => "shared",
            Section::Full => "full",
            Section::Partial => "partial",
        })
    }
}

impl fmt::Display for LoopNest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.grid {
            Grid::QueryTiles { bq } => writeln!(
                f,
                "grid query_tiles: b in 0..B, h in 0..H, qt in 0..ceil(Q / {bq}) parallel"
            )?,
        }
        let bq = match self.grid {
            Grid::QueryTiles { bq } => bq,
        };
        match self.rows {
            RowMap::OneHead => writeln!(
                f,
                "rows one_head: row i of (b, h, qt) is query q = qt * {bq} + i + q_offset of head h"
            )?,
        }
        match self.kv {
            KvSource::Dense => writeln!(
                f,
                "kv dense: k, v f32[B|1, HKV, KV, D]; head h reads kv head h / (H / HKV)"
            )?,
        }
        match &self.walk {
            KeyWalk::BlockMap { bkv, sections } => {
                let order: Vec<String> = sections
                    .iter()
                    .map(|s| match s {
                        Section::Full => "full(qt) ranges".to_string(),
                        s => format!("{s}(qt)"),
                    })
                    .collect();
                writeln!(
                    f,
                    "walk block_map: key tiles of {bkv}, {}; empty tiles never visited",
                    order.join(", then ")
                )?;
            }
        }
        let steps: Vec<&str> = self
            .steps
            .iter()
            .map(|s| match s {
                Step::Qk => "qk",
                Step::Cols => "cols",
                Step::Scores => "scores",
                Step::OnlineSoftmax => "online_softmax",
                Step::Pv => "pv",
            })
            .collect();
        writeln!(f, "per key tile: {}", steps.join(", "))?;
        match self.finish {
            Finish::Normalize => writeln!(
                f,
                "finish normalize: out = acc / l, lse = m + ln l; l = 0 and m = -inf: out = 0, lse = -inf"
            )?,
        }
        let outputs: Vec<&str> = self
            .outputs
            .iter()
            .map(|o| match o {
                Output::Out => "out f32[B, H, Q, D]",
                Output::Lse => "lse f32[B, H, Q]",
            })
            .collect();
        writeln!(f, "outputs: {}", outputs.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forward_nest_walks_full_then_partial_tiles() {
        let nest = LoopNest::forward(&Schedule::default());
        assert_eq!(nest.sections(), [Section::Full, Section::Partial]);
        assert_eq!(nest.steps.first(), Some(&Step::Qk));
        assert_eq!(nest.steps.last(), Some(&Step::Pv));
        let text = nest.to_string();
        assert!(text.contains("qt in 0..ceil(Q / 64)"), "{text}");
        assert!(
            text.contains("per key tile: qk, cols, scores, online_softmax, pv"),
            "{text}"
        );
    }
}
