//! Running a compiled kernel: packing, the parallel task grid, and results.
//!
//! Consumes a compiled kernel ([`TaskCode`]), bound inputs and block maps; produces
//! `out` and `lse`. K and V are packed once per call and (batch, kv-head);
//! tasks (b, h, query tile) run in parallel on rayon's pool, most expensive
//! first, each with its own scratch (no allocation per tile, no O(Q x KV)
//! memory). The task function leaves m, l and acc of its rows in scratch;
//! this module finishes them (`out = acc / l`, `lse`) and turns error codes
//! into [`EvalError`]s naming the buffer, the index and the expression.

use std::borrow::Cow;
use std::ops::Range;

use ndarray::{s, Array3, Array4};
use rayon::prelude::*;

use crate::bind::{Bound, Inputs, Outputs};
use crate::buffer::BufferData;
use crate::mask::BlockMaps;
use crate::runtime::abi::{self, BufferDesc, ErrorRecord, KvView, TaskCode};
use crate::runtime::gemm::pairs::{pack_k_pairs, pack_v_pairs, PairsK, PairsV};
use crate::runtime::gemm::PANEL;
use crate::runtime::gemm::{nonfinite_tiles, pack_k, pack_v, PackedK, PackedV};
use crate::sema::eval::{EvalError, Point};
use crate::tensor::KvData;
use crate::tile::nest::{Grid, KvSource};

/// The block maps flattened for generated code.
struct FlatMap {
    /// Per query tile: offset into `full` (in ranges) and count.
    full_at: Vec<(usize, usize)>,
    full: Vec<u32>,
    part_at: Vec<(usize, usize)>,
    part: Vec<u32>,
}

impl FlatMap {
    fn new(map: &crate::mask::BlockMap) -> FlatMap {
        let mut f = FlatMap {
            full_at: vec![],
            full: vec![],
            part_at: vec![],
            part: vec![],
        };
        for qt in 0..map.q_tiles() {
            let ranges = map.full_ranges(qt);
            f.full_at.push((f.full.len() / 2, ranges.len()));
            for r in ranges {
                f.full.push(r.start);
                f.full.push(r.end);
            }
            let part = map.partial(qt);
            f.part_at.push((f.part.len(), part.len()));
            f.part.extend_from_slice(part);
        }
        f
    }

    /// Key tiles visited by query tile `qt` (for scheduling).
    fn work(&self, qt: usize) -> usize {
        let (o, n) = self.full_at[qt];
        let full: usize = (0..n)
            .map(|r| (self.full[2 * (o + r) + 1] - self.full[2 * (o + r)]) as usize)
            .sum();
        full + self.part_at[qt].1
    }
}

/// A pointer that may cross threads; tasks write disjoint rows through it.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `SendPtr`).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Bytes of packed K (and V) held at once: heads are packed and run in groups
/// that fit, so memory stays bounded whatever the lengths (one head at a time
/// once a head alone needs more).
pub const PACK_BUDGET_BYTES: usize = 32 << 20;

/// One unit of parallel work: query tile `qt` of (b, h), whose keys live in
/// packed head `head` and whose block map is `flat[map]`; `work` is the
/// number of key tiles it visits.
#[derive(Clone, Copy)]
struct Task {
    work: usize,
    b: usize,
    h: usize,
    qt: usize,
    head: usize,
    map: usize,
}

/// Per-thread scratch (the Q tile is read in place: its rows are contiguous).
struct Scratch {
    s: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    acc: Vec<f32>,
    rowvals: Vec<u64>,
    colvals: Vec<u64>,
    err: ErrorRecord,
}

impl Scratch {
    fn new(bq: usize, bkv: usize, d: usize, n_row: usize, n_col: usize) -> Scratch {
        Scratch {
            s: vec![0.0; bq * bkv],
            m: vec![0.0; bq],
            l: vec![0.0; bq],
            acc: vec![0.0; bq * d],
            rowvals: vec![0; n_row.max(1) * bq],
            colvals: vec![0; n_col.max(1) * bkv],
            err: ErrorRecord::default(),
        }
    }

    /// A task block with this scratch and the call's buffers and shapes; the
    /// caller sets the task's own fields over it.
    fn task(&mut self, call: &CallData<'_>) -> abi::Task {
        abi::Task {
            b: 0,
            h: 0,
            q_start: 0,
            rows: 0,
            q: std::ptr::null(),
            k: std::ptr::null(),
            v: std::ptr::null(),
            v_stride: 0,
            full: std::ptr::null(),
            n_full: 0,
            part: std::ptr::null(),
            n_part: 0,
            kv_len: 0,
            d: 0,
            s: self.s.as_mut_ptr(),
            m: self.m.as_mut_ptr(),
            l: self.l.as_mut_ptr(),
            acc: self.acc.as_mut_ptr(),
            rowvals: self.rowvals.as_mut_ptr(),
            colvals: self.colvals.as_mut_ptr(),
            err: &mut self.err,
            bufs: call.descs.as_ptr(),
            shapes: call.shapes.as_ptr(),
            v_flags: std::ptr::null(),
            kv_view: std::ptr::null(),
            kv_start: 0,
        }
    }

    /// Sets the running state of the first `rows` rows to "no key seen".
    fn reset(&mut self, rows: usize, d: usize) {
        self.m[..rows].fill(f32::NEG_INFINITY);
        self.l[..rows].fill(0.0);
        self.acc[..rows * d].fill(0.0);
    }
}

/// What every task of a call reads: Q in standard layout, the buffers and
/// their descriptors, and the shapes.
struct CallData<'a> {
    q: Cow<'a, [f32]>,
    buffers: Vec<BufferData>,
    descs: Vec<BufferDesc>,
    shapes: [i64; 6],
}

impl<'a> CallData<'a> {
    fn new(inputs: &'a Inputs<'_>, bound: &Bound) -> CallData<'a> {
        let sh = bound.shapes;
        // Q in standard layout, so a tile is `rows` rows of `d` floats.
        let q: Cow<'a, [f32]> = match inputs.q.as_slice() {
            Some(s) => Cow::Borrowed(s),
            None => Cow::Owned(inputs.q.iter().copied().collect()),
        };
        // Buffer descriptors (pointer, dims, strides), over standard-layout data.
        let buffers: Vec<BufferData> = bound.buffers.iter().map(standard).collect();
        let descs: Vec<BufferDesc> = buffers
            .iter()
            .map(|buf| match buf {
                BufferData::Int(a) => BufferDesc::new(a.as_ptr().cast(), a.shape()),
                BufferData::Float(a) => BufferDesc::new(a.as_ptr().cast(), a.shape()),
                BufferData::Bool(a) => BufferDesc::new(a.as_ptr().cast(), a.shape()),
            })
            .collect();
        let shapes = [
            sh.b as i64,
            sh.h as i64,
            sh.hkv as i64,
            sh.q as i64,
            sh.kv as i64,
            sh.d as i64,
        ];
        CallData {
            q,
            buffers,
            descs,
            shapes,
        }
    }
}

/// Keys `keys` of sequence (or k/v batch) `b`, KV head `kh` of `data` (K or
/// V) as f32 rows `[keys, d]`: dense rows in one piece (borrowed when f32),
/// the rows of a paged pool run by run through the table.
fn sequence_rows<'a>(
    data: &'a KvData<'_>,
    bound: &Bound,
    b: usize,
    kh: usize,
    keys: Range<usize>,
) -> ndarray::CowArray<'a, f32, ndarray::Ix2> {
    if bound.pages.is_none() {
        return data.rows_f32(b, kh, keys);
    }
    let by_head = data.slots_by_head();
    let mut rows = ndarray::Array2::<f32>::zeros((keys.len(), bound.shapes.d));
    for (at, page, slots) in page_runs(bound, b, keys) {
        rows.slice_mut(s![at..at + slots.len(), ..])
            .assign(&by_head.rows_f32(page, kh, slots));
    }
    rows.into()
}

/// [`sequence_rows`] of bf16 rows `[B, HKV, KV, D]` or a bf16 pool, kept in
/// bf16 (for [`KvSource::PackedBf16`]).
fn sequence_rows_bf16<'a>(
    data: &'a ndarray::ArrayView4<'_, half::bf16>,
    bound: &Bound,
    b: usize,
    kh: usize,
    keys: Range<usize>,
) -> ndarray::CowArray<'a, half::bf16, ndarray::Ix2> {
    if bound.pages.is_none() {
        return data.slice(s![b, kh, keys, ..]).into();
    }
    let mut rows = ndarray::Array2::from_elem((keys.len(), bound.shapes.d), half::bf16::ZERO);
    for (at, page, slots) in page_runs(bound, b, keys) {
        rows.slice_mut(s![at..at + slots.len(), ..])
            .assign(&data.slice(s![page, slots, kh, ..]));
    }
    rows.into()
}

/// The keys `keys` of sequence `b` of a paged pool, run by run within a
/// page: the run's first row in the keys, its page and its slots.
fn page_runs(
    bound: &Bound,
    b: usize,
    keys: Range<usize>,
) -> impl Iterator<Item = (usize, usize, Range<usize>)> + '_ {
    let p = bound.pages.as_ref().expect("a paged pool");
    let mut j = keys.start;
    std::iter::from_fn(move || {
        if j >= keys.end {
            return None;
        }
        let (page, slot) = (p.table[[b, j / p.page_size]] as usize, j % p.page_size);
        let n = (p.page_size - slot).min(keys.end - j);
        let run = (j - keys.start, page, slot..slot + n);
        j += n;
        Some(run)
    })
}

/// A packed head's f32 workspace as the `u32` pairs of bf16 it holds for
/// [`KvSource::PackedBf16`].
fn as_pairs(x: &mut [f32]) -> &mut [u32] {
    // SAFETY: f32 and u32 have the same size and alignment, and every bit
    // pattern is a valid value of both.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<u32>(), x.len()) }
}

/// Keys of a bf16/f16 head widened to f32 at a time while it is packed
/// (rounded to a multiple of the key tile).
const WIDEN_KEYS: usize = 1024;

/// Runs `compiled` on bound inputs with the given block maps. `workspace` holds
/// the packed heads (at most [`PACK_BUDGET_BYTES`], or one head if more); it is
/// grown as needed and may be reused across calls to avoid reallocating it.
pub(crate) fn run(
    compiled: TaskCode<'_>,
    inputs: &Inputs<'_>,
    bound: &Bound,
    maps: &BlockMaps,
    workspace: &mut Vec<f32>,
) -> Result<Outputs, EvalError> {
    run_with_budget(compiled, inputs, bound, maps, workspace, PACK_BUDGET_BYTES)
}

/// [`run`] with `budget` bytes of packed heads per group instead of
/// [`PACK_BUDGET_BYTES`] (tests use small budgets to exercise the grouping).
pub(crate) fn run_with_budget(
    compiled: TaskCode<'_>,
    inputs: &Inputs<'_>,
    bound: &Bound,
    maps: &BlockMaps,
    workspace: &mut Vec<f32>,
    budget: usize,
) -> Result<Outputs, EvalError> {
    let k = compiled.kernel;
    let sh = bound.shapes;
    let (bq, bkv) = (k.schedule.tiling.bq, k.schedule.tiling.bkv);
    if let Some(d) = k.schedule.dim {
        assert_eq!(d, sh.d, "the kernel is specialised on D = {d}");
    }
    if k.nest.kv == KvSource::InPlace {
        return run_in_place(compiled, inputs, bound, maps);
    }
    let paged = bound.pages.is_some();
    let d = sh.d;
    assert!(
        !bound.kv_elem.is_quantized(),
        "the driver packs no quantized K/V (they are read in place)"
    );
    let bf16_pairs = k.nest.kv == KvSource::PackedBf16;
    assert!(
        !bf16_pairs
            || bound.q_elem == crate::tensor::ElemType::Bf16
                && matches!(inputs.k, KvData::Bf16(_))
                && matches!(inputs.v, KvData::Bf16(_)),
        "bf16 pairs multiply bf16 q, K and V"
    );
    // K is packed per (kv batch, kv head); V is used in place when its rows
    // are f32 and dense and already have the packed layout (contiguous, `d` a
    // multiple of the panel). bf16/f16 rows are widened as they are packed,
    // unless the kernel multiplies bf16 pairs (`KvSource::PackedBf16`); the
    // rows of a paged pool are gathered through the table
    // ([`sequence_rows`]). Sequence `b` has `kv_len(b)` keys (a ragged batch
    // or a pool); every packed head has room for the longest.
    let heads: Vec<(usize, usize)> = (0..bound.kv_batch)
        .flat_map(|b| (0..sh.hkv).map(move |h| (b, h)))
        .collect();
    let kv_rows = (0..bound.kv_batch.min(sh.b))
        .map(|b| bound.kv_len(b))
        .max()
        .unwrap_or(0);
    let klay = PackedK { d, kv_len: kv_rows };
    let vlay = PackedV { d, kv_len: kv_rows };
    let v_f32 = inputs.v.as_f32();
    let (klay2, vlay2) = (PairsK { d, kv_len: kv_rows }, PairsV { d, kv_len: kv_rows });
    let v_direct = !bf16_pairs
        && !paged
        && vlay.row_stride() == d
        && v_f32.is_some_and(|vin| {
            heads
                .iter()
                .all(|&(b, h)| vin.slice(s![b, h, .., ..]).is_standard_layout())
        });
    // Packed K, then packed V, in f32 (or in u32 pairs of bf16).
    let (k_len, v_len, v_stride) = if bf16_pairs {
        (klay2.len(), vlay2.len(), vlay2.row_stride())
    } else {
        (klay.len(), vlay.len(), vlay.row_stride())
    };
    let per_head = k_len + if v_direct { 0 } else { v_len };
    // Heads are packed and run in groups whose packed copies fit the budget.
    let group = (budget / 4 / per_head.max(1)).clamp(1, heads.len().max(1));
    let call = CallData::new(inputs, bound);
    let (q, buffers) = (&call.q, &call.buffers);
    let flat: Vec<FlatMap> = maps.maps().iter().map(FlatMap::new).collect();
    // The flattened map of (b, h): maps may be shared, per batch, per head or per (b, h).
    let all = maps.maps();
    let map_index = |b: usize, h: usize| {
        let m: *const crate::mask::BlockMap = maps.get(b, h);
        all.iter()
            .position(|x| std::ptr::eq(x, m))
            .expect("get returns one of the maps")
    };
    let q_tiles = sh.q.div_ceil(bq);
    // Tasks per head group, head by head (rayon splits the list into contiguous
    // runs, so a thread keeps reusing one head's packed K and V while they are
    // in cache), longest rows first within a head so the parallel tail is short.
    let mut groups: Vec<Vec<Task>> = vec![Vec::new(); heads.len().div_ceil(group)];
    for b in 0..sh.b {
        for h in 0..sh.h {
            let map = map_index(b, h);
            let head = bound.kv_batch_index(b) * sh.hkv + bound.kv_head(h);
            for qt in 0..q_tiles {
                groups[head / group].push(Task {
                    work: flat[map].work(qt),
                    b,
                    h,
                    qt,
                    head,
                    map,
                });
            }
        }
    }
    for tasks in &mut groups {
        tasks.sort_by(|a, b| a.head.cmp(&b.head).then(b.work.cmp(&a.work)));
    }
    let mut out = Array4::<f32>::zeros((sh.b, sh.h, sh.q, d));
    let mut lse = Array3::<f32>::from_elem((sh.b, sh.h, sh.q), f32::NEG_INFINITY);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let lse_ptr = SendPtr(lse.as_mut_ptr());
    // One flag per key tile of every head of a group: V holds NaN or inf there.
    // Only tiles where a key of probability 0 can meet such a value need the
    // scan: PARTIAL tiles (the mask), and every tile when a score mod can score
    // a key -inf. Without a score mod a FULL tile's keys are all visible, and a
    // non-finite V there reaches the row as it does in the reference. (Decode
    // at the end of a causal sequence then reads V once, as before.)
    let n_kt = kv_rows.div_ceil(bkv);
    let scan: Option<Vec<bool>> = (!k.has_score_mod()).then(|| {
        let mut partial = vec![false; n_kt];
        for fm in &flat {
            for &kt in &fm.part {
                partial[kt as usize] = true;
            }
        }
        partial
    });
    let mut vflags: Vec<u8> = Vec::new();
    let n_row = compiled.row_slots;
    let n_col = compiled.col_slots;
    for (g, tasks) in groups.iter().enumerate() {
        if tasks.is_empty() {
            continue;
        }
        let g0 = g * group;
        let group_heads = &heads[g0..heads.len().min(g0 + group)];
        let need = group_heads.len() * per_head;
        if workspace.len() < need {
            workspace.resize(need, 0.0);
        }
        vflags.resize(group_heads.len() * n_kt, 0);
        workspace[..need]
            .par_chunks_mut(per_head.max(1))
            .zip(vflags.par_chunks_mut(n_kt.max(1)))
            .zip(group_heads.par_iter())
            .for_each(|((slot, flags), &(b, h))| {
                let (kp, vp) = slot.split_at_mut(k_len);
                // Tiles past the sequence are never visited.
                flags.fill(0);
                let len = bound.kv_len(b);
                // Dense f32 heads in one piece; others a chunk of keys at a
                // time (a multiple of the panel and of the tile), so any f32
                // copy is a few hundred KiB per thread, not a head.
                let chunk = match inputs.k.elem() {
                    crate::tensor::ElemType::F32 if !paged => len.max(1),
                    _ => bkv * (WIDEN_KEYS / bkv).max(1),
                };
                for key0 in (0..len.max(1)).step_by(chunk) {
                    let keys = key0..len.min(key0 + chunk);
                    let n = keys.len();
                    let (t0, nt) = (key0 / bkv, n.div_ceil(bkv));
                    let only = scan.as_deref().map(|s| &s[t0..t0 + nt]);
                    let flags = &mut flags[t0..t0 + nt];
                    match (&inputs.k, &inputs.v) {
                        (KvData::Bf16(kin), KvData::Bf16(vin)) if bf16_pairs => {
                            let kd = &mut as_pairs(kp)[key0 / PANEL * klay2.panel_stride()..]
                                [..n.div_ceil(PANEL) * klay2.panel_stride()];
                            let kin = sequence_rows_bf16(kin, bound, b, h, keys.clone());
                            pack_k_pairs(kin.view(), kd);
                            let vin = sequence_rows_bf16(vin, bound, b, h, keys);
                            let vin = vin.view();
                            let vd = &mut as_pairs(vp)[key0 / 2 * v_stride..]
                                [..n.div_ceil(2) * v_stride];
                            pack_v_pairs(vin, vd);
                            nonfinite_tiles(vin, bkv, only, flags);
                        }
                        _ => {
                            let k_rows = sequence_rows(&inputs.k, bound, b, h, keys.clone());
                            let kd = &mut kp[key0 / PANEL * klay.panel_stride()..]
                                [..n.div_ceil(PANEL) * klay.panel_stride()];
                            pack_k(k_rows.view(), kd).expect("sized by the layout");
                            let v_rows = sequence_rows(&inputs.v, bound, b, h, keys);
                            if !v_direct {
                                let vd = &mut vp[key0 * v_stride..][..n * v_stride];
                                pack_v(v_rows.view(), vd).expect("sized by the layout");
                            }
                            nonfinite_tiles(v_rows.view(), bkv, only, flags);
                        }
                    }
                }
            });
        let packed: &[f32] = workspace;
        let vflags: &[u8] = &vflags;
        tasks.par_iter().try_for_each_init(
            || Scratch::new(bq, bkv, d, n_row, n_col),
            |scratch,
             &Task {
                 b,
                 h,
                 qt,
                 head,
                 map,
                 ..
             }| {
                let row0 = qt * bq;
                let rows = bq.min(sh.q - row0);
                let fm = &flat[map];
                let slot = &packed[(head - g0) * per_head..][..per_head];
                let kp = slot.as_ptr();
                let vp = if v_direct {
                    let (vb, vh) = heads[head];
                    v_f32
                        .expect("direct V is f32")
                        .slice(s![vb, vh, .., ..])
                        .as_ptr()
                } else {
                    slot[k_len..].as_ptr()
                };
                let q_off = ((b * sh.h + h) * sh.q + row0) * d;
                scratch.reset(rows, d);
                let (fo, fnum) = fm.full_at[qt];
                let (po, pnum) = fm.part_at[qt];
                let task = abi::Task {
                    b: b as i64,
                    h: h as i64,
                    q_start: row0 as i64 + bound.q_start(b),
                    rows: rows as i64,
                    q: q[q_off..q_off + rows * d].as_ptr(),
                    k: kp,
                    v: vp,
                    v_stride: v_stride as i64,
                    full: fm.full.as_ptr().wrapping_add(2 * fo),
                    n_full: fnum as i64,
                    part: fm.part.as_ptr().wrapping_add(po),
                    n_part: pnum as i64,
                    kv_len: bound.kv_len(b) as i64,
                    d: d as i64,
                    v_flags: vflags[(head - g0) * n_kt..].as_ptr(),
                    kv_start: bound.kv_offset,
                    ..scratch.task(&call)
                };
                // SAFETY: every pointer in `task` is valid for the sizes the task
                // function's contract states (scratch sized by bq, bkv, d and the
                // slot counts; packed heads by their layouts; buffers by their descriptors).
                let status = unsafe { (compiled.task)(&task) };
                if status != 0 {
                    return Err(error(compiled, buffers, &scratch.err, b, h));
                }
                let first = (b * sh.h + h) * sh.q + row0;
                // SAFETY: each (b, h, row) is written by exactly one task.
                unsafe {
                    finish(
                        k,
                        scratch,
                        rows,
                        d,
                        out_ptr.get().add(first * d),
                        lse_ptr.get().add(first),
                    )
                };
                Ok(())
            },
        )?;
    }
    Ok(Outputs {
        out,
        lse: inputs.want_lse.then_some(lse),
    })
}

/// The finish of the loop nest for `rows` rows left in `scratch`: `out = acc
/// / l`, `lse = m + ln l` (natural log) into `rows` rows of `d` at `out` and
/// `rows` values at `lse`; a row that saw no key (l = 0, m = -inf) is left as
/// it is (0 and -inf).
///
/// # Safety
///
/// `out` must be valid for writing `rows * d` floats and `lse` `rows`, and
/// nobody else may write them meanwhile.
unsafe fn finish(
    k: &crate::tile::Kernel,
    scratch: &Scratch,
    rows: usize,
    d: usize,
    out: *mut f32,
    lse: *mut f32,
) {
    let crate::tile::nest::Finish::Normalize = k.nest.finish;
    let ln2 = std::f32::consts::LN_2;
    for i in 0..rows {
        let (m, l) = (scratch.m[i], scratch.l[i]);
        if l == 0.0 && m == f32::NEG_INFINITY {
            continue; // a row that saw no key: out stays 0, lse -inf
        }
        // Otherwise l >= 1 (the maximum contributes e^0) or l is NaN (a
        // NaN score), which reaches out and lse as in the reference.
        let o = std::slice::from_raw_parts_mut(out.add(i * d), d);
        for (x, a) in o.iter_mut().zip(&scratch.acc[i * d..(i + 1) * d]) {
            *x = a / l;
        }
        *lse.add(i) = if k.schedule.exp2 {
            (m + l.log2()) * ln2
        } else {
            m + l.ln()
        };
    }
}

fn standard(b: &BufferData) -> BufferData {
    match b {
        BufferData::Int(a) => BufferData::Int(a.as_standard_layout().into_owned()),
        BufferData::Float(a) => BufferData::Float(a.as_standard_layout().into_owned()),
        BufferData::Bool(a) => BufferData::Bool(a.as_standard_layout().into_owned()),
    }
}

/// The error the reference gives for a failing task's record
/// ([`abi::decode`], shared with the GPU).
fn error(
    compiled: TaskCode<'_>,
    buffers: &[BufferData],
    err: &ErrorRecord,
    b: usize,
    h: usize,
) -> EvalError {
    let shapes: Vec<&[usize]> = buffers.iter().map(|b| b.shape()).collect();
    let raw = abi::RawError {
        code: err.code,
        value: err.value as usize,
        at: Point {
            b: b as i64,
            h: h as i64,
            q: err.q,
            kv: err.kv,
            score: 0.0,
        },
        words: &err.index,
    };
    abi::decode(&raw, compiled.kernel, &shapes)
}

/// Key tiles per chunk at least, when a decode step splits its key walk.
const MIN_SPLIT_TILES: usize = 4;

/// Into how many chunks a GQA-grouped call splits each key walk: enough for
/// two chunks per thread over `items` (batch, KV head) walks, each chunk of
/// at least a few tiles of the `longest` walk; 1 when the walks alone keep
/// every thread busy.
pub fn key_splits(threads: usize, items: usize, longest: usize) -> usize {
    (2 * threads)
        .div_ceil(items.max(1))
        .min(longest / MIN_SPLIT_TILES)
        .max(1)
}

/// One task of an in-place call: rows `row0 .. row0 + rows` of heads
/// `h .. h + heads` of sequence `b` (their out/lse rows are consecutive from
/// `first`), the key walk `full` (pairs) and `part`, and, for a chunk of a
/// split walk, the slot of its partial result.
struct ViewTask {
    b: usize,
    h: usize,
    rows: usize,
    first: usize,
    q_start: i64,
    full: Vec<u32>,
    part: Vec<u32>,
    work: usize,
    chunk: Option<usize>,
}

/// Cuts a key walk (FULL ranges, then PARTIAL tiles) into `n` chunks of about
/// the same number of tiles, each as (FULL pairs, PARTIAL tiles).
fn split_walk(full: &[Range<u32>], part: &[u32], n: usize) -> Vec<(Vec<u32>, Vec<u32>)> {
    let total: usize = full.iter().map(|r| r.len()).sum::<usize>() + part.len();
    let per = total.div_ceil(n.max(1)).max(1);
    let mut chunks: Vec<(Vec<u32>, Vec<u32>)> = vec![(Vec::new(), Vec::new())];
    let mut room = per;
    let next = |chunks: &mut Vec<(Vec<u32>, Vec<u32>)>, room: &mut usize| {
        if *room == 0 {
            chunks.push((Vec::new(), Vec::new()));
            *room = per;
        }
    };
    for r in full {
        let mut start = r.start;
        while start < r.end {
            next(&mut chunks, &mut room);
            let end = r.end.min(start + room as u32);
            let c = chunks.last_mut().expect("one chunk at least");
            c.0.extend([start, end]);
            room -= (end - start) as usize;
            start = end;
        }
    }
    for &kt in part {
        next(&mut chunks, &mut room);
        chunks.last_mut().expect("one chunk at least").1.push(kt);
        room -= 1;
    }
    chunks
}

/// Runs a kernel whose loop nest reads K and V in place
/// ([`KvSource::InPlace`]): dense rows of any length per sequence, or the
/// pages of a pool. Nothing is packed. With a GQA-grouped grid, one task
/// serves every query row of a KV head, and when `B x HKV` tasks would leave
/// threads idle each walk is split into chunks whose results are merged
/// ([`crate::merge`]).
fn run_in_place(
    compiled: TaskCode<'_>,
    inputs: &Inputs<'_>,
    bound: &Bound,
    maps: &BlockMaps,
) -> Result<Outputs, EvalError> {
    let k = compiled.kernel;
    let sh = bound.shapes;
    let (bq, bkv, d) = (k.schedule.tiling.bq, k.schedule.tiling.bkv, sh.d);
    let call = CallData::new(inputs, bound);
    let group = sh.h / sh.hkv;
    // K and V with unit stride along D, the same strides, none negative (a
    // copy only for inputs that lack it: views of odd layouts).
    let (k_own, v_own);
    let direct = |a: &KvData<'_>| {
        let scales_ok = a
            .scales()
            .is_none_or(|sc| sc.strides().iter().all(|&st| st >= 0));
        (a.strides()[3] == 1 || a.shape()[3] == 1)
            && a.strides().iter().all(|&st| st >= 0)
            && scales_ok
    };
    let same_scales = match (inputs.k.scales(), inputs.v.scales()) {
        (Some(a), Some(b)) => a.strides() == b.strides(),
        (None, None) => true,
        _ => false,
    };
    let (kin, vin) = if direct(&inputs.k)
        && direct(&inputs.v)
        && inputs.k.strides() == inputs.v.strides()
        && same_scales
    {
        (inputs.k.reborrow(), inputs.v.reborrow())
    } else {
        k_own = inputs.k.to_standard();
        v_own = inputs.v.to_standard();
        (k_own.view(), v_own.view())
    };
    let elem = kin.elem();
    let st = kin.strides().to_vec();
    let sst: Vec<isize> = kin.scales().map_or(vec![0; 3], |sc| sc.strides().to_vec());
    // The address of element `[i, j, k, 0]` (and of its scale).
    let at = |a: &KvData<'_>, [i, j, k]: [usize; 3]| -> *const u8 {
        let off = (i as isize * st[0] + j as isize * st[1] + k as isize * st[2]) as usize;
        a.as_ptr().wrapping_add(off * elem.size())
    };
    let scale_at = |a: &KvData<'_>, [i, j, k]: [usize; 3]| -> *const f32 {
        a.scales().map_or(std::ptr::null(), |sc| {
            sc.as_ptr().wrapping_add(
                (i as isize * sst[0] + j as isize * sst[1] + k as isize * sst[2]) as usize,
            )
        })
    };
    // One view per (sequence, KV head); a tile of all heads reads from the
    // view of KV head 0 onwards, a head every `group * Q` rows.
    let paged = bound.pages.is_some();
    let (head_stride, scale_head_stride, head_rows) = match (k.nest.grid, paged) {
        (Grid::Sequences { .. }, false) => (st[1] as i64, sst[1] as i64, (group * sh.q) as i64),
        (Grid::Sequences { .. }, true) => (st[2] as i64, sst[2] as i64, (group * sh.q) as i64),
        _ => (0, 0, i64::MAX),
    };
    let one_page = [0i32];
    let views: Vec<KvView> = (0..sh.b)
        .flat_map(|b| (0..sh.hkv).map(move |kh| (b, kh)))
        .map(|(b, kh)| {
            // The first row's index, the row, page and head strides, the
            // page size and table.
            let (first, rs, ps, srs, sps, page_size, table) = match &bound.pages {
                None => (
                    [bound.kv_batch_index(b), kh, 0],
                    st[2],
                    0,
                    sst[2],
                    0,
                    bound.kv_len(b).max(1) as i64,
                    one_page.as_ptr(),
                ),
                Some(p) => (
                    [0, 0, kh],
                    st[1],
                    st[0],
                    sst[1],
                    sst[0],
                    p.page_size as i64,
                    p.table.row(b).as_ptr(),
                ),
            };
            KvView {
                k: at(&kin, first),
                v: at(&vin, first),
                len: bound.kv_len(b) as i64,
                row_stride: rs as i64,
                page_stride: ps as i64,
                page_size,
                table,
                head_stride,
                head_rows,
                elem,
                k_scales: scale_at(&kin, first),
                v_scales: scale_at(&vin, first),
                scale_row_stride: srs as i64,
                scale_page_stride: sps as i64,
                scale_head_stride,
            }
        })
        .collect();
    assert!(
        kin.strides() == vin.strides(),
        "k and v share one layout (the same strides, or both copied to the standard one)"
    );
    // The tasks of the grid, with their key walks.
    let mut tasks: Vec<ViewTask> = Vec::new();
    let walk_work = |full: &[Range<u32>], part: &[u32]| {
        full.iter().map(|r| r.len()).sum::<usize>() + part.len()
    };
    match k.nest.grid {
        Grid::QueryTiles { .. } => {
            for b in 0..sh.b {
                for h in 0..sh.h {
                    let map = maps.get(b, h);
                    for qt in 0..sh.q.div_ceil(bq) {
                        let row0 = qt * bq;
                        let full = map.full_ranges(qt);
                        tasks.push(ViewTask {
                            b,
                            h,
                            rows: bq.min(sh.q - row0),
                            first: (b * sh.h + h) * sh.q + row0,
                            q_start: bound.q_start(b) + row0 as i64,
                            full: full.iter().flat_map(|r| [r.start, r.end]).collect(),
                            part: map.partial(qt).to_vec(),
                            work: walk_work(full, map.partial(qt)),
                            chunk: None,
                        });
                    }
                }
            }
        }
        Grid::KvHeads { rows } | Grid::Sequences { rows } => {
            // The heads a task's tile holds: a KV head's GQA group, or all.
            let heads = match k.nest.grid {
                Grid::Sequences { .. } => sh.h,
                _ => group,
            };
            assert!(
                heads * sh.q <= rows && sh.q <= bq,
                "the driver picks a grouped nest only when its rows fit one tile"
            );
            // Per (b, first head): its key walk, FULL ranges and PARTIAL tiles.
            type Walk = (usize, usize, Vec<Range<u32>>, Vec<u32>);
            let walks: Vec<Walk> = (0..sh.b)
                .flat_map(|b| (0..sh.h / heads).map(move |g| (b, g * heads)))
                .map(|(b, h)| {
                    let (full, part) = maps.group_walk(b, h..h + heads, 0);
                    (b, h, full, part)
                })
                .collect();
            // Enough chunks for two per thread, each of a few tiles at least.
            let longest = walks
                .iter()
                .map(|w| walk_work(&w.2, &w.3))
                .max()
                .unwrap_or(0);
            let splits = key_splits(rayon::current_num_threads(), walks.len(), longest);
            for (b, h, full, part) in walks {
                let chunks = if splits > 1 {
                    split_walk(&full, &part, splits)
                } else {
                    vec![(full.iter().flat_map(|r| [r.start, r.end]).collect(), part)]
                };
                let n = chunks.len();
                for (c, (full, part)) in chunks.into_iter().enumerate() {
                    tasks.push(ViewTask {
                        b,
                        h,
                        rows: heads * sh.q,
                        first: (b * sh.h + h) * sh.q,
                        q_start: bound.q_start(b),
                        work: full
                            .chunks(2)
                            .map(|r| (r[1] - r[0]) as usize)
                            .sum::<usize>()
                            + part.len(),
                        full,
                        part,
                        chunk: (n > 1).then_some(c),
                    });
                }
            }
        }
    }
    tasks.sort_by_key(|t| std::cmp::Reverse(t.work));
    // Chunks of a split walk write partial results here, merged below.
    let chunked: Vec<usize> = tasks
        .iter()
        .enumerate()
        .filter_map(|(i, t)| t.chunk.map(|_| i))
        .collect();
    let part_rows: usize = chunked.iter().map(|&i| tasks[i].rows).sum();
    let mut part_out = vec![0f32; part_rows * d];
    let mut part_lse = vec![f32::NEG_INFINITY; part_rows];
    let mut part_at = vec![usize::MAX; tasks.len()];
    let mut at = 0;
    for &i in &chunked {
        part_at[i] = at;
        at += tasks[i].rows;
    }
    let mut out = Array4::<f32>::zeros((sh.b, sh.h, sh.q, d));
    let mut lse = Array3::<f32>::from_elem((sh.b, sh.h, sh.q), f32::NEG_INFINITY);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let lse_ptr = SendPtr(lse.as_mut_ptr());
    let pout_ptr = SendPtr(part_out.as_mut_ptr());
    let plse_ptr = SendPtr(part_lse.as_mut_ptr());
    let (n_row, n_col) = (compiled.row_slots, compiled.col_slots);
    let no_flags = [0u8];
    tasks.par_iter().enumerate().try_for_each_init(
        || Scratch::new(bq, bkv, d, n_row, n_col),
        |scratch, (i, t)| {
            scratch.reset(t.rows, d);
            let view = &views[t.b * sh.hkv + bound.kv_head(t.h)];
            let task = abi::Task {
                b: t.b as i64,
                h: t.h as i64,
                q_start: t.q_start,
                rows: t.rows as i64,
                q: call.q[t.first * d..(t.first + t.rows) * d].as_ptr(),
                full: t.full.as_ptr(),
                n_full: (t.full.len() / 2) as i64,
                part: t.part.as_ptr(),
                n_part: t.part.len() as i64,
                kv_len: bound.kv_len(t.b) as i64,
                d: d as i64,
                v_flags: no_flags.as_ptr(),
                kv_view: view,
                kv_start: bound.kv_offset,
                ..scratch.task(&call)
            };
            // SAFETY: as in `run_with_budget`; the view's rows `0 .. kv_len(b)`
            // are in k and v (dense rows checked by binding, pages by the table
            // check), and the walk stays below kv_len(b) (block maps of the
            // sequence's length).
            let status = unsafe { (compiled.task)(&task) };
            if status != 0 {
                return Err(error(compiled, &call.buffers, &scratch.err, t.b, t.h));
            }
            // SAFETY: each (b, h, row), and each chunk's partial rows, is
            // written by exactly one task.
            unsafe {
                match t.chunk {
                    None => finish(
                        k,
                        scratch,
                        t.rows,
                        d,
                        out_ptr.get().add(t.first * d),
                        lse_ptr.get().add(t.first),
                    ),
                    Some(_) => finish(
                        k,
                        scratch,
                        t.rows,
                        d,
                        pout_ptr.get().add(part_at[i] * d),
                        plse_ptr.get().add(part_at[i]),
                    ),
                }
            }
            Ok(())
        },
    )?;
    // Merge the chunks of each split walk, row by row.
    if !chunked.is_empty() {
        let mut by_first: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        for &i in &chunked {
            by_first.entry(tasks[i].first).or_default().push(i);
        }
        let out_rows = out.as_slice_mut().expect("fresh");
        let lse_rows = lse.as_slice_mut().expect("fresh");
        for (first, parts) in by_first {
            let rows = tasks[parts[0]].rows;
            for r in 0..rows {
                let iter = parts.iter().map(|&i| {
                    let at = part_at[i] + r;
                    (&part_out[at * d..(at + 1) * d], part_lse[at])
                });
                let row = first + r;
                lse_rows[row] =
                    crate::merge::merge_row(iter, &mut out_rows[row * d..(row + 1) * d]);
            }
        }
    }
    Ok(Outputs {
        out,
        lse: inputs.want_lse.then_some(lse),
    })
}
