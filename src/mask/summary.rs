//! Summaries of bound buffers over index boxes, for the abstract evaluator.
//!
//! Stage: mask analysis (helper of [`super::classify`]). Consumes the bound
//! buffers; answers "what values does `buf[i, j, ...]` take for indices in
//! these ranges" without touching every element:
//! - int buffers: the exact min and max (decides `doc[q] == doc[kv]` for
//!   sorted document ids);
//! - bool buffers: all true / all false / mixed (block layouts, global tokens);
//! - float buffers: not summarised (the value is unknown).
//!
//! Small boxes are scanned. Larger ones are answered from range-min/max
//! structures over one-dimensional lines of the buffer (along the axis with
//! the longest index range), built on first use and cached: per line, the
//! min and max of each block of [`BLOCK`] elements and a sparse table over
//! the blocks, so a query costs O(1) table lookups plus a scan of at most
//! two partial blocks. Lines of a buffer are cached under a memory budget;
//! lines not used during the previous query tile are dropped first.
//!
//! Every index passed in is in range: the evaluator only asks for summaries
//! of reads that cannot fail.

use std::borrow::Cow;
use std::collections::HashMap;

use crate::buffer::BufferData;
use crate::sema::BufferId;

use super::absint::{AVal, FloatRange, IntRange, Tri, MAX_DIMS};

/// Elements per block of a line summary.
pub const BLOCK: usize = 32;
/// Boxes with at most this many elements are scanned directly.
const SCAN_LIMIT: u128 = 512;
/// The most lines one query may combine (the product of the extents of the
/// other axes); larger boxes get an unknown value.
const LINE_LIMIT: u128 = 256;
/// Memory above which unused cached lines are dropped.
const CACHE_BUDGET: usize = 16 << 20;

/// The data of one buffer in row-major order.
enum Flat<'a> {
    Int(Cow<'a, [i64]>),
    Bool(Cow<'a, [bool]>),
    Float,
}

/// What `ancestor` needs to know about a parent buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forest {
    pub len: usize,
    /// Every entry is in `-1..len` and following parents never loops, so
    /// `ancestor(p, i, j)` with `i` in range never fails.
    pub valid: bool,
    /// Every entry is below its own position (`p[x] < x`), so every ancestor
    /// of `i` is below `i`.
    pub ordered: bool,
}

/// Range min/max over one line of a buffer: `len` elements at `start`,
/// `start + stride`, ... of the flat data.
struct Line {
    start: usize,
    stride: usize,
    len: usize,
    /// `mins[k][b]` = min over blocks `b .. b + 2^k`.
    mins: Vec<Vec<i64>>,
    maxs: Vec<Vec<i64>>,
    /// Bool lines: `trues[i]` = number of true elements before `i`.
    trues: Vec<u32>,
    last_used: u64,
}

impl Line {
    fn bytes(&self) -> usize {
        self.mins.iter().map(|v| v.len() * 16).sum::<usize>() + self.trues.len() * 4 + 64
    }

    /// A bool line: prefix counts answer any/all in O(1).
    fn build_bool(data: &[bool], start: usize, stride: usize, len: usize, stamp: u64) -> Line {
        let mut trues = Vec::with_capacity(len + 1);
        let mut n = 0u32;
        trues.push(0);
        for i in 0..len {
            n += u32::from(data[start + i * stride]);
            trues.push(n);
        }
        Line {
            start,
            stride,
            len,
            mins: Vec::new(),
            maxs: Vec::new(),
            trues,
            last_used: stamp,
        }
    }

    fn build<T: Copy + Into<i64>>(
        data: &[T],
        start: usize,
        stride: usize,
        len: usize,
        stamp: u64,
    ) -> Line {
        let n_blocks = len.div_ceil(BLOCK);
        let mut mins = Vec::new();
        let mut maxs = Vec::new();
        if n_blocks > 2 {
            let mut m0 = Vec::with_capacity(n_blocks);
            let mut x0 = Vec::with_capacity(n_blocks);
            for b in 0..n_blocks {
                let (lo, hi) = scan(
                    data,
                    start,
                    stride,
                    b * BLOCK,
                    ((b + 1) * BLOCK).min(len) - 1,
                );
                m0.push(lo);
                x0.push(hi);
            }
            mins.push(m0);
            maxs.push(x0);
            let mut width = 1;
            while width * 2 <= n_blocks {
                let (pm, px) = (mins.last().unwrap(), maxs.last().unwrap());
                let count = n_blocks - 2 * width + 1;
                let m: Vec<i64> = (0..count).map(|b| pm[b].min(pm[b + width])).collect();
                let x: Vec<i64> = (0..count).map(|b| px[b].max(px[b + width])).collect();
                mins.push(m);
                maxs.push(x);
                width *= 2;
            }
        }
        Line {
            start,
            stride,
            len,
            mins,
            maxs,
            trues: Vec::new(),
            last_used: stamp,
        }
    }

    /// Min and max of elements `l..=r` of the line.
    fn query<T: Copy + Into<i64>>(&self, data: &[T], l: usize, r: usize) -> (i64, i64) {
        debug_assert!(l <= r && r < self.len);
        if !self.trues.is_empty() {
            let t = self.trues[r + 1] - self.trues[l];
            let all = (r - l + 1) as u32;
            return (i64::from(t == all), i64::from(t > 0));
        }
        let (bl, br) = (l / BLOCK, r / BLOCK);
        if br <= bl + 1 || self.mins.is_empty() {
            return scan(data, self.start, self.stride, l, r);
        }
        let (a_lo, a_hi) = scan(data, self.start, self.stride, l, (bl + 1) * BLOCK - 1);
        let (c_lo, c_hi) = scan(data, self.start, self.stride, br * BLOCK, r);
        // Whole blocks bl+1 ..= br-1.
        let (first, last) = (bl + 1, br - 1);
        let count = last - first + 1;
        let k = (usize::BITS - 1 - count.leading_zeros()) as usize;
        let w = 1 << k;
        let b_lo = self.mins[k][first].min(self.mins[k][last + 1 - w]);
        let b_hi = self.maxs[k][first].max(self.maxs[k][last + 1 - w]);
        (a_lo.min(b_lo).min(c_lo), a_hi.max(b_hi).max(c_hi))
    }
}

/// Min and max of elements `l..=r` of a strided line.
fn scan<T: Copy + Into<i64>>(
    data: &[T],
    start: usize,
    stride: usize,
    l: usize,
    r: usize,
) -> (i64, i64) {
    let (mut lo, mut hi) = (i64::MAX, i64::MIN);
    if stride == 1 {
        for &x in &data[start + l..=start + r] {
            let x: i64 = x.into();
            lo = lo.min(x);
            hi = hi.max(x);
        }
    } else {
        for i in l..=r {
            let x: i64 = data[start + i * stride].into();
            lo = lo.min(x);
            hi = hi.max(x);
        }
    }
    (lo, hi)
}

/// Min and max over a box of a multi-dimensional row-major array.
fn scan_box<T: Copy + Into<i64>>(
    data: &[T],
    strides: &[usize],
    ranges: &[(i64, i64)],
) -> (i64, i64) {
    let (mut lo, mut hi) = (i64::MAX, i64::MIN);
    let n = ranges.len();
    let mut idx: Vec<i64> = ranges.iter().map(|r| r.0).collect();
    loop {
        let off: usize = idx.iter().zip(strides).map(|(&i, &s)| i as usize * s).sum();
        let x: i64 = data[off].into();
        lo = lo.min(x);
        hi = hi.max(x);
        // Odometer increment.
        let mut d = n;
        loop {
            if d == 0 {
                return (lo, hi);
            }
            d -= 1;
            if idx[d] < ranges[d].1 {
                idx[d] += 1;
                break;
            }
            idx[d] = ranges[d].0;
        }
    }
}

/// Buffer summaries for one classification, with their caches.
pub struct Summaries<'a> {
    flat: Vec<Flat<'a>>,
    shapes: Vec<Vec<usize>>,
    strides: Vec<Vec<usize>>,
    cache: Cache,
    forests: Vec<Option<Forest>>,
    /// The last few box queries and their answers.
    recent: [(RecentKey, Option<(i64, i64)>); RECENT],
    recent_next: usize,
}

/// A multiplicative hasher for the small integer keys of the line cache
/// (the default SipHash costs more than the queries it guards).
#[derive(Default)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

type LineKey = (u32, u8, usize);

/// Cached line summaries.
struct Cache {
    /// Keyed by (buffer, axis, flat offset of the line's first element).
    lines: HashMap<LineKey, Line, std::hash::BuildHasherDefault<KeyHasher>>,
    bytes: usize,
    /// Counts query tiles, for dropping lines no longer used.
    stamp: u64,
}

impl<'a> Summaries<'a> {
    pub fn new(buffers: &'a [BufferData]) -> Summaries<'a> {
        let mut flat = Vec::with_capacity(buffers.len());
        let mut shapes = Vec::with_capacity(buffers.len());
        let mut strides = Vec::with_capacity(buffers.len());
        for data in buffers {
            let shape = data.shape().to_vec();
            let mut st = vec![1usize; shape.len()];
            for d in (0..shape.len().saturating_sub(1)).rev() {
                st[d] = st[d + 1] * shape[d + 1];
            }
            flat.push(match data {
                BufferData::Int(a) => Flat::Int(
                    a.as_slice()
                        .map(Cow::Borrowed)
                        .unwrap_or_else(|| Cow::Owned(a.iter().copied().collect())),
                ),
                BufferData::Bool(a) => Flat::Bool(
                    a.as_slice()
                        .map(Cow::Borrowed)
                        .unwrap_or_else(|| Cow::Owned(a.iter().copied().collect())),
                ),
                BufferData::Float(_) => Flat::Float,
            });
            shapes.push(shape);
            strides.push(st);
        }
        Summaries {
            flat,
            shapes,
            strides,
            cache: Cache {
                lines: HashMap::default(),
                bytes: 0,
                stamp: 0,
            },
            forests: vec![None; buffers.len()],
            recent: [(
                RecentKey {
                    id: u32::MAX,
                    n: 0,
                    ranges: [(0, 0); MAX_DIMS],
                },
                None,
            ); RECENT],
            recent_next: 0,
        }
    }

    pub fn shape(&self, buffer: BufferId) -> &[usize] {
        &self.shapes[buffer.0 as usize]
    }

    /// Marks the start of a new query tile; drops lines not used since the
    /// previous one when the cache is over budget.
    pub fn next_row(&mut self) {
        let c = &mut self.cache;
        c.stamp += 1;
        if c.bytes > CACHE_BUDGET {
            let keep = c.stamp - 1;
            c.lines.retain(|_, l| l.last_used >= keep);
            c.bytes = c.lines.values().map(Line::bytes).sum();
        }
    }

    /// The values of `buffer[ranges...]` (every index in range).
    pub fn summary(&mut self, buffer: BufferId, ranges: &[(i64, i64)]) -> AVal {
        let id = buffer.0 as usize;
        let (lo, hi) = match &self.flat[id] {
            Flat::Float => return AVal::Float(FloatRange::Top),
            Flat::Int(_) | Flat::Bool(_) => match self.min_max(id, ranges) {
                Some(r) => r,
                None => return self.unknown(id),
            },
        };
        match &self.flat[id] {
            Flat::Bool(_) => AVal::Bool(match (lo, hi) {
                (1, 1) => Tri::True,
                (0, 0) => Tri::False,
                _ => Tri::Unknown,
            }),
            _ => AVal::Int(if lo == hi {
                IntRange::point(lo)
            } else {
                IntRange { lo, hi, aff: None }
            }),
        }
    }

    fn unknown(&self, id: usize) -> AVal {
        match self.flat[id] {
            Flat::Int(_) => AVal::Int(IntRange::TOP),
            Flat::Bool(_) => AVal::Bool(Tri::Unknown),
            Flat::Float => AVal::Float(FloatRange::Top),
        }
    }

    fn min_max(&mut self, id: usize, ranges: &[(i64, i64)]) -> Option<(i64, i64)> {
        // The same box is often asked for again (e.g. `doc[q]` over the query
        // tile, for every run of key tiles).
        let key = RecentKey::new(id, ranges)?;
        if let Some(hit) = self.recent.iter().find(|(k, _)| k.same(&key)) {
            return hit.1;
        }
        let result = self.min_max_uncached(id, ranges);
        self.recent[self.recent_next] = (key, result);
        self.recent_next = (self.recent_next + 1) % RECENT;
        result
    }

    fn min_max_uncached(&mut self, id: usize, ranges: &[(i64, i64)]) -> Option<(i64, i64)> {
        let n = ranges.len();
        let mut extents = [0u128; MAX_DIMS];
        for (e, r) in extents.iter_mut().zip(ranges) {
            *e = (r.1 - r.0 + 1) as u128;
        }
        let count: u128 = extents[..n].iter().product();
        let strides = &self.strides[id];
        if n == 1 && count <= BLOCK as u128 * 2 {
            let (l, r) = (ranges[0].0 as usize, ranges[0].1 as usize);
            return Some(match &self.flat[id] {
                Flat::Int(d) => scan(d, 0, 1, l, r),
                Flat::Bool(d) => scan(d, 0, 1, l, r),
                Flat::Float => unreachable!("float buffers are not summarised"),
            });
        }
        // Boxes with one axis longer than 1 are strided lines.
        let long_axes = extents[..n].iter().filter(|&&e| e > 1).count();
        if n > 0 && long_axes <= 1 && count <= SCAN_LIMIT {
            let axis = (0..n).find(|&d| extents[d] > 1).unwrap_or(0);
            let start: usize = ranges
                .iter()
                .zip(strides.iter())
                .enumerate()
                .map(|(d, (r, &st))| if d == axis { 0 } else { r.0 as usize * st })
                .sum();
            let (l, r) = (ranges[axis].0 as usize, ranges[axis].1 as usize);
            return Some(match &self.flat[id] {
                Flat::Int(d) => scan(d, start, strides[axis], l, r),
                Flat::Bool(d) => scan(d, start, strides[axis], l, r),
                Flat::Float => unreachable!("float buffers are not summarised"),
            });
        }
        if count <= SCAN_LIMIT || n == 0 {
            return Some(match &self.flat[id] {
                Flat::Int(d) => scan_box(d, strides, ranges),
                Flat::Bool(d) => scan_box(d, strides, ranges),
                Flat::Float => unreachable!("float buffers are not summarised"),
            });
        }
        let axis = (0..n).max_by_key(|&d| (extents[d], d)).unwrap();
        let others = count / extents[axis];
        if others > LINE_LIMIT {
            return None;
        }
        // Iterate over the other axes with the line axis pinned at 0.
        let mut fixed = [(0i64, 0i64); MAX_DIMS];
        fixed[..n].copy_from_slice(ranges);
        fixed[axis] = (0, 0);
        let (l, r) = (ranges[axis].0 as usize, ranges[axis].1 as usize);
        let (mut lo, mut hi) = (i64::MAX, i64::MIN);
        let mut idx = [0i64; MAX_DIMS];
        for d in 0..n {
            idx[d] = fixed[d].0;
        }
        loop {
            let start: usize = idx[..n]
                .iter()
                .zip(strides.iter())
                .map(|(&i, &s)| i as usize * s)
                .sum();
            let line = LineAt {
                id,
                axis,
                stride: strides[axis],
                len: self.shapes[id][axis],
                start,
            };
            let (a, b) = line_query(&mut self.cache, &self.flat[id], line, l, r);
            lo = lo.min(a);
            hi = hi.max(b);
            let mut d = n;
            loop {
                if d == 0 {
                    return Some((lo, hi));
                }
                d -= 1;
                if idx[d] < fixed[d].1 {
                    idx[d] += 1;
                    break;
                }
                idx[d] = fixed[d].0;
            }
        }
    }

    /// What `ancestor` may assume about a parent buffer (computed once).
    pub fn forest(&mut self, buffer: BufferId) -> Forest {
        let id = buffer.0 as usize;
        if let Some(f) = self.forests[id] {
            return f;
        }
        let f = match &self.flat[id] {
            Flat::Int(p) => forest_of(p),
            _ => Forest {
                len: 0,
                valid: false,
                ordered: false,
            },
        };
        self.forests[id] = Some(f);
        f
    }
}

/// Where a line lies in a buffer's flat data.
#[derive(Clone, Copy)]
struct LineAt {
    id: usize,
    axis: usize,
    stride: usize,
    len: usize,
    /// Flat offset of the line's first element.
    start: usize,
}

/// Min and max of elements `l..=r` of one line, from the cache or built.
fn line_query(cache: &mut Cache, flat: &Flat<'_>, at: LineAt, l: usize, r: usize) -> (i64, i64) {
    let key = (at.id as u32, at.axis as u8, at.start);
    let stamp = cache.stamp;
    let line = match cache.lines.entry(key) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => {
            let line = match flat {
                Flat::Int(d) => Line::build(d, at.start, at.stride, at.len, stamp),
                Flat::Bool(d) => Line::build_bool(d, at.start, at.stride, at.len, stamp),
                Flat::Float => unreachable!("float buffers are not summarised"),
            };
            cache.bytes += line.bytes();
            e.insert(line)
        }
    };
    line.last_used = stamp;
    match flat {
        Flat::Int(d) => line.query(d, l, r),
        Flat::Bool(d) => line.query(d, l, r),
        Flat::Float => unreachable!("float buffers are not summarised"),
    }
}

/// A box of one buffer, for the cache of recent queries.
#[derive(Clone, Copy)]
struct RecentKey {
    id: u32,
    n: u8,
    ranges: [(i64, i64); MAX_DIMS],
}

impl RecentKey {
    fn new(id: usize, ranges: &[(i64, i64)]) -> Option<RecentKey> {
        if ranges.len() > MAX_DIMS {
            return None;
        }
        let mut r = [(0, 0); MAX_DIMS];
        r[..ranges.len()].copy_from_slice(ranges);
        Some(RecentKey {
            id: id as u32,
            n: ranges.len() as u8,
            ranges: r,
        })
    }

    fn same(&self, o: &RecentKey) -> bool {
        self.id == o.id
            && self.n == o.n
            && self.ranges[..self.n as usize] == o.ranges[..o.n as usize]
    }
}

/// Number of recent box queries remembered.
const RECENT: usize = 8;

/// Checks a parent array: entries in `-1..len`, no cycles, and ordering.
fn forest_of(parent: &[i64]) -> Forest {
    let len = parent.len();
    let in_range = parent.iter().all(|&p| p >= -1 && p < len as i64);
    let ordered = in_range && parent.iter().enumerate().all(|(x, &p)| p < x as i64);
    let valid = ordered || (in_range && acyclic(parent));
    Forest {
        len,
        valid,
        ordered,
    }
}

/// Whether following parents (all in `-1..len`) always reaches -1.
fn acyclic(parent: &[i64]) -> bool {
    // 0 = unvisited, 1 = on the current path, 2 = known to reach the root.
    let mut state = vec![0u8; parent.len()];
    let mut path = Vec::new();
    for s in 0..parent.len() {
        let mut x = s as i64;
        while x >= 0 && state[x as usize] == 0 {
            state[x as usize] = 1;
            path.push(x as usize);
            x = parent[x as usize];
        }
        if x >= 0 && state[x as usize] == 1 {
            return false;
        }
        for &p in &path {
            state[p] = 2;
        }
        path.clear();
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};

    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 33
    }

    #[test]
    fn line_queries_match_scans() {
        let mut seed = 7;
        let data: Vec<i64> = (0..1000)
            .map(|_| (lcg(&mut seed) % 1000) as i64 - 500)
            .collect();
        let line = Line::build(&data, 0, 1, data.len(), 0);
        for _ in 0..2000 {
            let a = (lcg(&mut seed) % 1000) as usize;
            let b = (lcg(&mut seed) % 1000) as usize;
            let (l, r) = (a.min(b), a.max(b));
            let expect = (
                *data[l..=r].iter().min().unwrap(),
                *data[l..=r].iter().max().unwrap(),
            );
            assert_eq!(line.query(&data, l, r), expect, "range {l}..={r}");
        }
    }

    #[test]
    fn strided_lines_and_boxes() {
        // A 3 x 200 int array; lines along axis 1 and axis 0.
        let mut seed = 3;
        let v: Vec<i64> = (0..600).map(|_| (lcg(&mut seed) % 50) as i64).collect();
        let arr = ArrayD::from_shape_vec(IxDyn(&[3, 200]), v.clone()).unwrap();
        let buffers = [BufferData::Int(arr)];
        let mut s = Summaries::new(&buffers);
        for (r0, r1, c0, c1) in [
            (0, 2, 0, 199),
            (1, 2, 5, 150),
            (0, 0, 0, 199),
            (2, 2, 70, 71),
            (0, 2, 64, 191),
        ] {
            let mut lo = i64::MAX;
            let mut hi = i64::MIN;
            for r in r0..=r1 {
                for c in c0..=c1 {
                    lo = lo.min(v[r * 200 + c]);
                    hi = hi.max(v[r * 200 + c]);
                }
            }
            let got = s.summary(
                BufferId(0),
                &[(r0 as i64, r1 as i64), (c0 as i64, c1 as i64)],
            );
            let expect = if lo == hi {
                IntRange::point(lo)
            } else {
                IntRange { lo, hi, aff: None }
            };
            assert_eq!(got, AVal::Int(expect), "box [{r0}..={r1}, {c0}..={c1}]");
        }
    }

    #[test]
    fn bool_summaries() {
        let mut v = vec![false; 1000];
        v[500] = true;
        let buffers = [BufferData::Bool(
            ArrayD::from_shape_vec(IxDyn(&[1000]), v).unwrap(),
        )];
        let mut s = Summaries::new(&buffers);
        assert_eq!(s.summary(BufferId(0), &[(0, 499)]), AVal::Bool(Tri::False));
        assert_eq!(
            s.summary(BufferId(0), &[(0, 999)]),
            AVal::Bool(Tri::Unknown)
        );
        assert_eq!(s.summary(BufferId(0), &[(500, 500)]), AVal::Bool(Tri::True));
        assert_eq!(
            s.summary(BufferId(0), &[(501, 999)]),
            AVal::Bool(Tri::False)
        );
    }

    #[test]
    fn forests() {
        assert_eq!(
            forest_of(&[-1, 0, 0, 1]),
            Forest {
                len: 4,
                valid: true,
                ordered: true
            }
        );
        assert_eq!(
            forest_of(&[2, -1, 1]),
            Forest {
                len: 3,
                valid: true,
                ordered: false
            }
        );
        assert_eq!(
            forest_of(&[1, 0]),
            Forest {
                len: 2,
                valid: false,
                ordered: false
            }
        );
        assert_eq!(
            forest_of(&[0]),
            Forest {
                len: 1,
                valid: false,
                ordered: false
            }
        );
        assert_eq!(
            forest_of(&[-1, 5]),
            Forest {
                len: 2,
                valid: false,
                ordered: false
            }
        );
    }
}
