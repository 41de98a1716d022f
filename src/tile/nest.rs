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
//! Every kernel has a FlashAttention-2 forward nest ([`LoopNest::forward`]),
//! in one of two shapes the schedule picks:
//! - prefill: one task per (b, h, query tile), K and V packed per call
//!   ([`KvSource::Packed`]);
//! - decode: one task per (b, KV head, chunk of the key walk), whose tile
//!   holds the `H / HKV` query heads that share the KV head times the `Q`
//!   query rows ([`RowMap::GqaGroup`]), so each K/V row is read once per KV
//!   head; K and V are read in place ([`KvSource::InPlace`]: dense rows or a
//!   paged pool), and the chunks' partial states are merged;
//! - decode on a paged pool: one task per (b, chunk of the key walk), whose
//!   tile holds every query head times the `Q` rows ([`RowMap::AllHeads`]):
//!   a pool page `[page_size, HKV, D]` is read whole, once, by one task,
//!   where a task per KV head would read a `D`-float slice out of every
//!   `HKV x D` row.

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
    /// `(b, kh, chunk)` for every batch, KV head and chunk of the key walk:
    /// a tile of at most `rows` rows holds every query row of the KV head's
    /// GQA group. The runtime splits the walk into chunks when `B x HKV`
    /// tasks would leave threads idle (flash-decoding), finishes each chunk
    /// and merges the chunks' `(out, lse)` (`merge_states`' row merge).
    KvHeads { rows: usize },
    /// `(b, chunk)` for every batch and chunk of the key walk: a tile of at
    /// most `rows` rows holds every query row of every head of sequence `b`,
    /// chunks split and merged as for [`Grid::KvHeads`].
    Sequences { rows: usize },
}

/// How a tile's rows map to (batch, head, query position).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RowMap {
    /// All rows of a tile belong to the task's head: row `i` is the query at
    /// absolute position `q_start(b) + qt * bq + i`.
    #[default]
    OneHead,
    /// The rows of a tile are the `G = H / HKV` query heads of KV head `kh`
    /// times the `Q` query rows: row `i` is head `kh * G + i / Q`, query row
    /// `i % Q`, at position `q_start(b) + i % Q`. The head `h` is then a
    /// row-level value.
    GqaGroup,
    /// The rows of a tile are all `H` query heads times the `Q` query rows
    /// of sequence `b`: row `i` is head `i / Q` (reading KV head `i / Q / (H
    /// / HKV)`), query row `i % Q`, at position `q_start(b) + i % Q`. As for
    /// [`RowMap::GqaGroup`], `h` is a row-level value.
    AllHeads,
}

impl RowMap {
    /// Whether the head `h` varies across the rows of a tile.
    pub fn head_per_row(self) -> bool {
        match self {
            RowMap::OneHead => false,
            RowMap::GqaGroup | RowMap::AllHeads => true,
        }
    }
}

/// Where K and V come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KvSource {
    /// The rows `j < kv_len(b)` of each sequence and KV head, packed per call
    /// as f32 (K in panels of 16 keys) from dense rows `[B|1, HKV, KV, D]`
    /// or gathered from the pages of a pool through its table; query head
    /// `h` reads KV head `h / (H / HKV)`; a k/v batch of 1 is shared by every
    /// query batch.
    #[default]
    Packed,
    /// Read in place from the caller's memory through a K/V view: the rows
    /// of sequence `b`, KV head `kh` are dense (`[B, HKV, KV, D]`) or in the
    /// pages of a pool (`[pages, page_size, HKV, D]`, page `table[b, j /
    /// page_size]`, slot `j % page_size`). Only keys `< kv_len(b)` are read.
    InPlace,
    /// As [`KvSource::Packed`] for bf16 q, k and v: K and V are packed per
    /// call as pairs of bf16 values (K in panels of 16 keys, V in rows of two
    /// keys), and the tile products run on bf16 operands with f32
    /// accumulation (`vdpbf16ps` where the CPU has AVX-512 BF16, widened to
    /// f32 elsewhere). Q is bf16 already; P is rounded to bf16 for `pv`, as
    /// FlashAttention does, after the row sums `l` are taken in f32.
    PackedBf16,
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
    /// (batch, head, query tile), or per (batch, KV head, key chunk) for a
    /// GQA-grouped schedule; K/V from the schedule's source; FULL then
    /// PARTIAL tiles of the block map, `qk, cols, scores, online softmax, pv`
    /// per tile.
    pub fn forward(schedule: &Schedule) -> LoopNest {
        LoopNest {
            grid: match schedule.rows {
                RowMap::OneHead => Grid::QueryTiles {
                    bq: schedule.tiling.bq,
                },
                RowMap::GqaGroup => Grid::KvHeads {
                    rows: schedule.tiling.bq,
                },
                RowMap::AllHeads => Grid::Sequences {
                    rows: schedule.tiling.bq,
                },
            },
            rows: schedule.rows,
            kv: schedule.kv,
            walk: KeyWalk::BlockMap {
                bkv: schedule.tiling.bkv,
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

impl RowMap {
    /// The name the nest's text gives it (`rows gqa_group`).
    pub fn name(self) -> &'static str {
        match self {
            RowMap::OneHead => "one_head",
            RowMap::GqaGroup => "gqa_group",
            RowMap::AllHeads => "all_heads",
        }
    }
}

impl KvSource {
    /// The name the nest's text gives it (`kv in_place`).
    pub fn name(self) -> &'static str {
        match self {
            KvSource::Packed => "packed",
            KvSource::InPlace => "in_place",
            KvSource::PackedBf16 => "packed_bf16",
        }
    }
}

impl fmt::Display for LoopNest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.grid {
            Grid::QueryTiles { bq } => writeln!(
                f,
                "grid query_tiles: b in 0..B, h in 0..H, qt in 0..ceil(Q / {bq}) parallel"
            )?,
            Grid::KvHeads { rows } => writeln!(
                f,
                "grid kv_heads: b in 0..B, kh in 0..HKV, chunk in 0..splits parallel; \
                 (H / HKV) * Q <= {rows} rows per tile; chunks' (out, lse) merged"
            )?,
            Grid::Sequences { rows } => writeln!(
                f,
                "grid sequences: b in 0..B, chunk in 0..splits parallel; \
                 H * Q <= {rows} rows per tile; chunks' (out, lse) merged"
            )?,
        }
        match (self.rows, self.grid) {
            (RowMap::OneHead, Grid::QueryTiles { bq }) => writeln!(
                f,
                "rows {}: row i of (b, h, qt) is query q = q_start(b) + qt * {bq} + i of head h",
                RowMap::OneHead.name()
            )?,
            (RowMap::GqaGroup, _) => writeln!(
                f,
                "rows {}: row i of (b, kh, chunk) is head h = kh * (H / HKV) + i / Q, \
                 query q = q_start(b) + i % Q",
                RowMap::GqaGroup.name()
            )?,
            (RowMap::AllHeads, _) => writeln!(
                f,
                "rows {}: row i of (b, chunk) is head h = i / Q (kv head h / (H / HKV)), \
                 query q = q_start(b) + i % Q",
                RowMap::AllHeads.name()
            )?,
            (RowMap::OneHead, Grid::KvHeads { .. } | Grid::Sequences { .. }) => {
                unreachable!("a one-head row map has query tiles")
            }
        }
        match self.kv {
            KvSource::Packed => writeln!(
                f,
                "kv {}: rows j < kv_len(b) of k, v (dense or pages) packed per call as f32; head h reads kv head h / (H / HKV)",
                KvSource::Packed.name()
            )?,
            KvSource::PackedBf16 => writeln!(
                f,
                "kv {}: k, v bf16[B|1, HKV, KV, D] packed per call in pairs; head h reads kv head h / (H / HKV); \
                 qk and pv on bf16 operands with f32 sums, p rounded to bf16 for pv",
                KvSource::PackedBf16.name()
            )?,
            KvSource::InPlace => writeln!(
                f,
                "kv {}: rows j < kv_len(b) of kv head kh read where they are: \
                 dense [B, HKV, KV, D] or pages [P, page_size, HKV, D] at table[b, j / page_size]{}",
                KvSource::InPlace.name(),
                if self.rows == RowMap::AllHeads {
                    "; a tile reads every kv head of a row together"
                } else {
                    ""
                }
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
    fn the_decode_nest_groups_the_heads_of_a_kv_head() {
        let schedule = Schedule {
            rows: RowMap::GqaGroup,
            kv: KvSource::InPlace,
            ..Schedule::default()
        };
        let nest = LoopNest::forward(&schedule);
        assert_eq!(nest.grid, Grid::KvHeads { rows: 64 });
        let text = nest.to_string();
        assert!(text.contains("head h = kh * (H / HKV) + i / Q"), "{text}");
        assert!(text.contains("kv in_place"), "{text}");
    }

    #[test]
    fn the_paged_decode_nest_holds_every_head_of_a_sequence() {
        let schedule = Schedule {
            rows: RowMap::AllHeads,
            kv: KvSource::InPlace,
            ..Schedule::default()
        };
        let nest = LoopNest::forward(&schedule);
        assert_eq!(nest.grid, Grid::Sequences { rows: 64 });
        let text = nest.to_string();
        assert!(text.contains("grid sequences: b in 0..B, chunk"), "{text}");
        assert!(
            text.contains("head h = i / Q (kv head h / (H / HKV))"),
            "{text}"
        );
        assert!(text.contains("every kv head of a row together"), "{text}");
    }

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
