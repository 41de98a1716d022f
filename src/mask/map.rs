//! The block map: per query tile, the FULL and PARTIAL key tiles.
//!
//! Stage: mask analysis (its output). Produced by [`super::classify`];
//! consumed by the loop-IR builder, its interpreter and the backends, which
//! iterate over `full_ranges(qt)` (no mask code) and `partial(qt)` (mask
//! applied) and skip every other key tile.
//!
//! Layout (compressed sparse rows): for query tile `qt`, the FULL key tiles
//! are `full[full_offsets[qt]..full_offsets[qt + 1]]`, ascending disjoint
//! non-adjacent ranges; the PARTIAL key tiles are
//! `partial[partial_offsets[qt]..partial_offsets[qt + 1]]`, ascending. A
//! causal or sliding-window map holds one range and one or two partial tiles
//! per query tile, so it takes O(query tiles) memory whatever the length.

use std::fmt;
use std::ops::Range;

use ndarray::{Array3, Array4};

use super::MaskError;

/// The class of one (query tile, key tile) pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TileClass {
    /// Every element is masked: the tile is skipped.
    Empty,
    /// No element is masked: the tile runs without mask code.
    Full,
    /// The tile holds both masked and visible elements.
    Partial,
}

impl TileClass {
    /// The character the text grid uses: `#` full, `+` partial, `.` empty.
    pub fn symbol(self) -> char {
        match self {
            TileClass::Empty => '.',
            TileClass::Full => '#',
            TileClass::Partial => '+',
        }
    }
}

impl fmt::Display for TileClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TileClass::Empty => "empty",
            TileClass::Full => "full",
            TileClass::Partial => "partial",
        })
    }
}

/// Tile sizes: `bq` query rows by `bkv` keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tiling {
    pub bq: usize,
    pub bkv: usize,
}

impl Tiling {
    /// A tiling; both sizes must be at least 1.
    pub fn new(bq: usize, bkv: usize) -> Result<Tiling, MaskError> {
        if bq == 0 || bkv == 0 {
            return Err(MaskError::ZeroTile { bq, bkv });
        }
        Ok(Tiling { bq, bkv })
    }
}

impl Default for Tiling {
    /// 64 x 64.
    fn default() -> Tiling {
        Tiling { bq: 64, bkv: 64 }
    }
}

impl fmt::Display for Tiling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.bq, self.bkv)
    }
}

impl std::str::FromStr for Tiling {
    type Err = MaskError;

    /// `BQxBKV` (e.g. `64x128`) or `N` for `NxN`.
    fn from_str(s: &str) -> Result<Tiling, MaskError> {
        let bad = || MaskError::BadTiling {
            text: s.to_string(),
        };
        let t = s.trim();
        let (a, b) = match t.split_once(['x', 'X']) {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (t, t),
        };
        let bq: usize = a.parse().map_err(|_| bad())?;
        let bkv: usize = b.parse().map_err(|_| bad())?;
        Tiling::new(bq, bkv)
    }
}

/// Counts of one map, or summed over several.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BlockStats {
    pub q_tiles: usize,
    pub kv_tiles: usize,
    /// Number of (b, h) maps these counts are summed over.
    pub maps: u64,
    pub full: u64,
    pub partial: u64,
    pub empty: u64,
    /// Elements in FULL and PARTIAL tiles (the work a tiled kernel does).
    pub work_elements: u128,
    /// Q x KV elements (per map, times `maps`).
    pub dense_elements: u128,
    /// Fraction of tiles that are not EMPTY (0 when there are no tiles).
    pub density: f64,
    /// `work_elements / dense_elements`: the fraction of the dense work that
    /// remains after skipping EMPTY tiles (0 when there are no elements).
    pub work_fraction: f64,
}

impl BlockStats {
    pub fn tiles(&self) -> u64 {
        self.full + self.partial + self.empty
    }

    fn finish(mut self) -> BlockStats {
        let tiles = self.tiles();
        self.density = if tiles == 0 {
            0.0
        } else {
            (self.full + self.partial) as f64 / tiles as f64
        };
        self.work_fraction = if self.dense_elements == 0 {
            0.0
        } else {
            self.work_elements as f64 / self.dense_elements as f64
        };
        self
    }

    /// The counts of `self` and `other` together (same tile grid).
    pub fn add(&self, other: &BlockStats) -> BlockStats {
        BlockStats {
            q_tiles: self.q_tiles.max(other.q_tiles),
            kv_tiles: self.kv_tiles.max(other.kv_tiles),
            maps: self.maps + other.maps,
            full: self.full + other.full,
            partial: self.partial + other.partial,
            empty: self.empty + other.empty,
            work_elements: self.work_elements + other.work_elements,
            dense_elements: self.dense_elements + other.dense_elements,
            density: 0.0,
            work_fraction: 0.0,
        }
        .finish()
    }

    /// These counts repeated `n` times (a map shared by `n` (b, h) pairs).
    pub fn times(&self, n: u64) -> BlockStats {
        BlockStats {
            maps: self.maps * n,
            full: self.full * n,
            partial: self.partial * n,
            empty: self.empty * n,
            work_elements: self.work_elements * n as u128,
            dense_elements: self.dense_elements * n as u128,
            ..*self
        }
        .finish()
    }
}

/// FlexAttention's block-mask tensors (int32), for interop and testing.
///
/// Shapes: `kv_num_blocks` and `full_kv_num_blocks` are `[B, H, q_tiles]`,
/// `kv_indices` and `full_kv_indices` are `[B, H, q_tiles, kv_tiles]`, where
/// B and H are 1 when the map is shared (FlexAttention broadcasts them).
/// `kv_*` describe the PARTIAL tiles and `full_kv_*` the FULL ones. Each
/// index row lists the selected key tiles in ascending order, then the other
/// key tiles in ascending order, as `create_block_mask` does (a stable
/// descending argsort of the dense block mask).
#[derive(Clone, Debug, PartialEq)]
pub struct FlexLayout {
    pub bq: usize,
    pub bkv: usize,
    pub kv_num_blocks: Array3<i32>,
    pub kv_indices: Array4<i32>,
    pub full_kv_num_blocks: Array3<i32>,
    pub full_kv_indices: Array4<i32>,
}

/// The block map of one (b, h): see the module docs for the layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockMap {
    tiling: Tiling,
    q_len: usize,
    kv_len: usize,
    q_offset: i64,
    kv_offset: i64,
    q_tiles: usize,
    kv_tiles: usize,
    full_offsets: Vec<usize>,
    full: Vec<Range<u32>>,
    partial_offsets: Vec<usize>,
    partial: Vec<u32>,
}

impl BlockMap {
    /// An empty map under construction; rows are added with [`Self::push_row`].
    pub(crate) fn with_capacity(
        tiling: Tiling,
        q_len: usize,
        kv_len: usize,
        q_offset: i64,
    ) -> BlockMap {
        let q_tiles = q_len.div_ceil(tiling.bq);
        let kv_tiles = kv_len.div_ceil(tiling.bkv);
        let mut full_offsets = Vec::with_capacity(q_tiles + 1);
        full_offsets.push(0);
        let mut partial_offsets = Vec::with_capacity(q_tiles + 1);
        partial_offsets.push(0);
        BlockMap {
            tiling,
            q_len,
            kv_len,
            q_offset,
            kv_offset: 0,
            q_tiles,
            kv_tiles,
            full_offsets,
            full: Vec::new(),
            partial_offsets,
            partial: Vec::new(),
        }
    }

    /// Appends the next query tile's row, given as ascending, disjoint
    /// segments `(start, end, class)` of key tiles (EMPTY segments may be
    /// left out). Adjacent FULL segments are merged into one range.
    pub(crate) fn push_row(&mut self, segments: impl IntoIterator<Item = (u32, u32, TileClass)>) {
        let row_start = *self.full_offsets.last().unwrap();
        let mut last_end = 0u32;
        for (start, end, class) in segments {
            debug_assert!(
                start >= last_end && start < end && end as usize <= self.kv_tiles,
                "segments out of order"
            );
            last_end = end;
            match class {
                TileClass::Empty => {}
                TileClass::Full => {
                    let in_row = self.full.len() > row_start;
                    match self.full.last_mut() {
                        Some(r) if in_row && r.end == start => r.end = end,
                        _ => self.full.push(start..end),
                    }
                }
                TileClass::Partial => self.partial.extend(start..end),
            }
        }
        self.full_offsets.push(self.full.len());
        self.partial_offsets.push(self.partial.len());
    }

    /// Builds a map from a dense class array `classes[qt][kt]` (for tests and
    /// small tools).
    pub fn from_classes(
        tiling: Tiling,
        q_len: usize,
        kv_len: usize,
        q_offset: i64,
        classes: &[Vec<TileClass>],
    ) -> BlockMap {
        let mut m = BlockMap::with_capacity(tiling, q_len, kv_len, q_offset);
        assert_eq!(classes.len(), m.q_tiles, "one row per query tile");
        for row in classes {
            assert_eq!(row.len(), m.kv_tiles, "one class per key tile");
            m.push_row(
                row.iter()
                    .enumerate()
                    .map(|(k, &c)| (k as u32, k as u32 + 1, c)),
            );
        }
        m
    }

    pub(crate) fn is_complete(&self) -> bool {
        self.full_offsets.len() == self.q_tiles + 1
    }

    /// Number of query tiles: `ceil(Q / bq)`.
    pub fn q_tiles(&self) -> usize {
        self.q_tiles
    }

    /// Number of key tiles: `ceil(KV / bkv)`.
    pub fn kv_tiles(&self) -> usize {
        self.kv_tiles
    }

    pub fn tiling(&self) -> Tiling {
        self.tiling
    }

    /// The number of query rows Q the map was built for.
    pub fn q_len(&self) -> usize {
        self.q_len
    }

    /// The number of keys KV the map was built for.
    pub fn kv_len(&self) -> usize {
        self.kv_len
    }

    /// The query offset the map was built for (`q = row + q_offset`).
    pub fn q_offset(&self) -> i64 {
        self.q_offset
    }

    /// The key offset the map was built for (`kv = key row + kv_offset`).
    pub fn kv_offset(&self) -> i64 {
        self.kv_offset
    }

    /// The map with key row 0 at absolute position `kv_offset`.
    pub(crate) fn with_kv_offset(mut self, kv_offset: i64) -> BlockMap {
        self.kv_offset = kv_offset;
        self
    }

    /// The query rows of tile `qt`: `qt*bq .. min((qt+1)*bq, Q)`.
    pub fn q_rows(&self, qt: usize) -> Range<usize> {
        let s = qt * self.tiling.bq;
        s..(s + self.tiling.bq).min(self.q_len)
    }

    /// The keys of tile `kt`: `kt*bkv .. min((kt+1)*bkv, KV)`.
    pub fn kv_cols(&self, kt: usize) -> Range<usize> {
        let s = kt * self.tiling.bkv;
        s..(s + self.tiling.bkv).min(self.kv_len)
    }

    /// The FULL key tiles of query tile `qt`, as ascending disjoint ranges.
    pub fn full_ranges(&self, qt: usize) -> &[Range<u32>] {
        &self.full[self.full_offsets[qt]..self.full_offsets[qt + 1]]
    }

    /// The PARTIAL key tiles of query tile `qt`, ascending.
    pub fn partial(&self, qt: usize) -> &[u32] {
        &self.partial[self.partial_offsets[qt]..self.partial_offsets[qt + 1]]
    }

    /// The non-EMPTY key tiles of query tile `qt` in ascending order, with
    /// their class.
    pub fn tiles(&self, qt: usize) -> impl Iterator<Item = (u32, TileClass)> + '_ {
        let mut full = self
            .full_ranges(qt)
            .iter()
            .flat_map(|r| r.clone())
            .peekable();
        let mut partial = self.partial(qt).iter().copied().peekable();
        std::iter::from_fn(move || match (full.peek(), partial.peek()) {
            (Some(&f), Some(&p)) if f < p => full.next().map(|k| (k, TileClass::Full)),
            (_, Some(_)) => partial.next().map(|k| (k, TileClass::Partial)),
            (Some(_), None) => full.next().map(|k| (k, TileClass::Full)),
            (None, None) => None,
        })
    }

    /// The class of (query tile `qt`, key tile `kt`), in O(log) time.
    pub fn class(&self, qt: usize, kt: usize) -> TileClass {
        assert!(
            qt < self.q_tiles && kt < self.kv_tiles,
            "tile ({qt}, {kt}) outside a {} x {} map",
            self.q_tiles,
            self.kv_tiles
        );
        let kt = kt as u32;
        if self.partial(qt).binary_search(&kt).is_ok() {
            return TileClass::Partial;
        }
        let ranges = self.full_ranges(qt);
        let i = ranges.partition_point(|r| r.end <= kt);
        if i < ranges.len() && ranges[i].start <= kt {
            TileClass::Full
        } else {
            TileClass::Empty
        }
    }

    fn cols_in(&self, r: Range<u32>) -> u128 {
        let start = r.start as usize * self.tiling.bkv;
        let end = (r.end as usize * self.tiling.bkv).min(self.kv_len);
        (end - start) as u128
    }

    /// Bytes of heap memory the map holds (its offsets, ranges and lists).
    pub fn heap_bytes(&self) -> usize {
        (self.full_offsets.capacity() + self.partial_offsets.capacity())
            * std::mem::size_of::<usize>()
            + self.full.capacity() * std::mem::size_of::<Range<u32>>()
            + self.partial.capacity() * std::mem::size_of::<u32>()
    }

    /// Counts, density and the fraction of dense work that remains.
    pub fn stats(&self) -> BlockStats {
        let mut s = BlockStats {
            q_tiles: self.q_tiles,
            kv_tiles: self.kv_tiles,
            maps: 1,
            ..BlockStats::default()
        };
        for qt in 0..self.q_tiles {
            let rows = self.q_rows(qt).len() as u128;
            for r in self.full_ranges(qt) {
                s.full += (r.end - r.start) as u64;
                s.work_elements += rows * self.cols_in(r.clone());
            }
            for &k in self.partial(qt) {
                s.partial += 1;
                s.work_elements += rows * self.cols_in(k..k + 1);
            }
        }
        s.empty = (self.q_tiles as u64 * self.kv_tiles as u64) - s.full - s.partial;
        s.dense_elements = self.q_len as u128 * self.kv_len as u128;
        s.finish()
    }

    /// Fills one (b, h) slice of FlexAttention's tensors.
    fn fill_flex(
        &self,
        num: ndarray::ArrayViewMut1<i32>,
        idx: ndarray::ArrayViewMut2<i32>,
        full: bool,
    ) {
        let (mut num, mut idx) = (num, idx);
        let mut selected = vec![false; self.kv_tiles];
        for qt in 0..self.q_tiles {
            selected.iter_mut().for_each(|s| *s = false);
            if full {
                for r in self.full_ranges(qt) {
                    selected[r.start as usize..r.end as usize]
                        .iter_mut()
                        .for_each(|s| *s = true);
                }
            } else {
                for &k in self.partial(qt) {
                    selected[k as usize] = true;
                }
            }
            let mut row = idx.row_mut(qt);
            let mut n = 0;
            for (k, _) in selected.iter().enumerate().filter(|(_, &s)| s) {
                row[n] = k as i32;
                n += 1;
            }
            num[qt] = n as i32;
            for (k, _) in selected.iter().enumerate().filter(|(_, &s)| !s) {
                row[n] = k as i32;
                n += 1;
            }
        }
    }

    /// FlexAttention's layout of this map, with B = H = 1.
    pub fn to_flex(&self) -> FlexLayout {
        flex_of(self.tiling, self.q_tiles, self.kv_tiles, 1, 1, |_, _| self)
    }
}

/// Builds FlexAttention's tensors for a `b x h` grid of maps.
pub(crate) fn flex_of<'m>(
    tiling: Tiling,
    q_tiles: usize,
    kv_tiles: usize,
    b: usize,
    h: usize,
    map: impl Fn(usize, usize) -> &'m BlockMap,
) -> FlexLayout {
    let mut out = FlexLayout {
        bq: tiling.bq,
        bkv: tiling.bkv,
        kv_num_blocks: Array3::zeros((b, h, q_tiles)),
        kv_indices: Array4::zeros((b, h, q_tiles, kv_tiles)),
        full_kv_num_blocks: Array3::zeros((b, h, q_tiles)),
        full_kv_indices: Array4::zeros((b, h, q_tiles, kv_tiles)),
    };
    for bi in 0..b {
        for hi in 0..h {
            let m = map(bi, hi);
            m.fill_flex(
                out.kv_num_blocks.slice_mut(ndarray::s![bi, hi, ..]),
                out.kv_indices.slice_mut(ndarray::s![bi, hi, .., ..]),
                false,
            );
            m.fill_flex(
                out.full_kv_num_blocks.slice_mut(ndarray::s![bi, hi, ..]),
                out.full_kv_indices.slice_mut(ndarray::s![bi, hi, .., ..]),
                true,
            );
        }
    }
    out
}

/// The block maps of every (b, h) of a call.
///
/// A mask that depends on neither `b` nor `h` has one map shared by all;
/// one that depends on `h` only has one per head (shared over batches), on
/// `b` only one per batch, on both one per (b, h).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockMaps {
    pub(crate) b: usize,
    pub(crate) h: usize,
    /// The tile sizes of every map (kept here too: a call with B = 0 or
    /// H = 0 may have no map at all).
    pub(crate) tiling: Tiling,
    pub(crate) by_b: bool,
    pub(crate) by_h: bool,
    /// `(by_b ? B : 1) x (by_h ? H : 1)`, row-major.
    pub(crate) maps: Vec<BlockMap>,
    pub(crate) counts: AnalysisCounts,
    /// Elements evaluated one by one because the symbolic analysis left their
    /// box undecided, per mask sub-expression that defeated it, most first.
    pub(crate) fallback: Vec<(crate::sema::ExprId, u64)>,
}

/// How much work the analysis did (all maps together).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AnalysisCounts {
    /// Abstract evaluations of the mask over boxes (runs of tiles, tiles and
    /// parts of tiles).
    pub box_evaluations: u64,
    /// Concrete evaluations of the mask at single elements.
    pub element_evaluations: u64,
    /// Tiles left PARTIAL without being decided, the analysis's budget spent
    /// (`mask::classify`, item 5): the kernel masks them element by element.
    pub given_up_tiles: u64,
}

impl BlockMaps {
    /// The elements the analysis evaluated one by one (in boxes of at most a
    /// few dozen elements that symbolic evaluation could not decide), per
    /// sub-expression of the mask that left them undecided, most first: the
    /// cost cliff of a mask the interval/affine reasoning cannot follow.
    /// Tiles decided by a few probe elements (the partial tiles of a causal
    /// mask) are not counted.
    pub fn fallback(&self) -> &[(crate::sema::ExprId, u64)] {
        &self.fallback
    }

    /// The map of batch `b`, head `h`.
    pub fn get(&self, b: usize, h: usize) -> &BlockMap {
        assert!(
            b < self.b.max(1) && h < self.h.max(1),
            "(b, h) = ({b}, {h}) outside B = {}, H = {}",
            self.b,
            self.h
        );
        let bi = if self.by_b { b } else { 0 };
        let hi = if self.by_h { h } else { 0 };
        &self.maps[bi * if self.by_h { self.h } else { 1 } + hi]
    }

    /// The key walk of query tile `qt` for the rows of heads `heads` of batch
    /// `b` in one tile (a GQA group): a key tile is FULL where it is FULL
    /// for every head, EMPTY where it is EMPTY for every head, and PARTIAL
    /// otherwise. Returns the FULL ranges and the PARTIAL tiles, as
    /// [`BlockMap::full_ranges`] and [`BlockMap::partial`] do.
    pub fn group_walk(
        &self,
        b: usize,
        heads: Range<usize>,
        qt: usize,
    ) -> (Vec<Range<u32>>, Vec<u32>) {
        let first = self.get(b, heads.start);
        if !self.by_h || heads.len() <= 1 {
            return (first.full_ranges(qt).to_vec(), first.partial(qt).to_vec());
        }
        let mut full: Vec<Range<u32>> = Vec::new();
        let mut partial = Vec::new();
        for kt in 0..first.kv_tiles() {
            let classes = heads.clone().map(|h| self.get(b, h).class(qt, kt));
            let class = classes
                .reduce(|a, c| if a == c { a } else { TileClass::Partial })
                .expect("at least one head");
            let kt = kt as u32;
            match class {
                TileClass::Empty => {}
                TileClass::Partial => partial.push(kt),
                TileClass::Full => match full.last_mut() {
                    Some(r) if r.end == kt => r.end = kt + 1,
                    _ => full.push(kt..kt + 1),
                },
            }
        }
        (full, partial)
    }

    /// Whether one map serves every (b, h).
    pub fn is_shared(&self) -> bool {
        !self.by_b && !self.by_h
    }

    /// Whether the maps differ between batches.
    pub fn depends_on_b(&self) -> bool {
        self.by_b
    }

    /// Whether the maps differ between heads.
    pub fn depends_on_h(&self) -> bool {
        self.by_h
    }

    /// The maps, one per `(b if the mask depends on it, h if it does)`,
    /// row-major (two of them may be equal: a window per KV head, say).
    pub fn maps(&self) -> &[BlockMap] {
        &self.maps
    }

    /// How much work building the maps took.
    pub fn counts(&self) -> AnalysisCounts {
        self.counts
    }

    /// The tile sizes the maps were built with (also when there is none).
    pub fn tiling(&self) -> Tiling {
        self.tiling
    }

    /// The counts summed over every (b, h) pair of the call (B x H maps,
    /// shared ones counted once per pair they serve).
    pub fn stats_total(&self) -> BlockStats {
        let per_map = (if self.by_b { 1 } else { self.b as u64 })
            * (if self.by_h { 1 } else { self.h as u64 });
        self.maps.iter().fold(BlockStats::default(), |acc, m| {
            acc.add(&m.stats().times(per_map))
        })
    }

    /// FlexAttention's layout: `[B, H, ...]` with B (or H) equal to 1 when
    /// the maps do not depend on b (or h), as FlexAttention broadcasts.
    ///
    /// The key axis is as long as the longest sequence's (a ragged batch's
    /// maps differ in length; a shorter row's indices past its own tiles are
    /// 0, and its counts say how many are used); a call with no sequence or
    /// no head gives empty arrays.
    pub fn to_flex(&self) -> FlexLayout {
        let b = if self.by_b { self.b } else { 1 };
        let h = if self.by_h { self.h } else { 1 };
        let stride = if self.by_h { self.h } else { 1 };
        let most = |tiles: fn(&BlockMap) -> usize| self.maps.iter().map(tiles).max().unwrap_or(0);
        flex_of(
            self.tiling,
            most(BlockMap::q_tiles),
            most(BlockMap::kv_tiles),
            b,
            h,
            |bi, hi| &self.maps[bi * stride + hi],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use TileClass::*;

    fn sample() -> BlockMap {
        // 3 query tiles x 4 key tiles, Q = 10, KV = 14 with 4 x 4 tiles.
        let classes = vec![
            vec![Partial, Empty, Empty, Empty],
            vec![Full, Full, Partial, Empty],
            vec![Full, Partial, Full, Full],
        ];
        BlockMap::from_classes(Tiling::new(4, 4).unwrap(), 10, 14, 0, &classes)
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn rows_and_classes() {
        let m = sample();
        assert_eq!((m.q_tiles(), m.kv_tiles()), (3, 4));
        assert_eq!(m.full_ranges(0), &[] as &[Range<u32>]);
        assert_eq!(m.partial(0), &[0]);
        assert_eq!(m.full_ranges(1), &[0..2]);
        assert_eq!(m.full_ranges(2), &[0..1, 2..4]);
        assert_eq!(m.partial(2), &[1]);
        assert_eq!(m.class(1, 3), Empty);
        assert_eq!(m.class(2, 3), Full);
        assert_eq!(m.class(2, 1), Partial);
        let row: Vec<_> = m.tiles(2).collect();
        assert_eq!(row, vec![(0, Full), (1, Partial), (2, Full), (3, Full)]);
        assert_eq!(m.q_rows(2), 8..10);
        assert_eq!(m.kv_cols(3), 12..14);
    }

    #[test]
    fn stats_count_tiles_and_elements() {
        let s = sample().stats();
        assert_eq!((s.full, s.partial, s.empty), (5, 3, 4));
        assert_eq!(s.density, 8.0 / 12.0);
        // Row 0: 4 rows x 4 keys; row 1: 4 x 12; row 2: 2 x 14.
        assert_eq!(s.work_elements, 16 + 48 + 28);
        assert_eq!(s.dense_elements, 140);
        let twice = s.times(2);
        assert_eq!((twice.full, twice.maps), (10, 2));
        assert_eq!(twice.density, s.density);
    }

    #[test]
    fn flex_layout_lists_selected_tiles_first() {
        let f = sample().to_flex();
        assert_eq!(f.kv_num_blocks.as_slice().unwrap(), &[1, 1, 1]);
        assert_eq!(f.full_kv_num_blocks.as_slice().unwrap(), &[0, 2, 3]);
        let idx: Vec<i32> = f.kv_indices.iter().copied().collect();
        assert_eq!(idx, vec![0, 1, 2, 3, 2, 0, 1, 3, 1, 0, 2, 3]);
        let full: Vec<i32> = f.full_kv_indices.iter().copied().collect();
        assert_eq!(full, vec![0, 1, 2, 3, 0, 1, 2, 3, 0, 2, 3, 1]);
    }

    #[test]
    fn tilings_parse() {
        assert_eq!(
            "64x128".parse::<Tiling>().unwrap(),
            Tiling { bq: 64, bkv: 128 }
        );
        assert_eq!("32".parse::<Tiling>().unwrap(), Tiling { bq: 32, bkv: 32 });
        assert!(matches!(
            "0x64".parse::<Tiling>(),
            Err(MaskError::ZeroTile { bq: 0, bkv: 64 })
        ));
        assert!(matches!(
            "64by64".parse::<Tiling>(),
            Err(MaskError::BadTiling { .. })
        ));
        assert!(matches!(
            "-1x4".parse::<Tiling>(),
            Err(MaskError::BadTiling { .. })
        ));
    }
}
