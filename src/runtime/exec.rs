//! Running a compiled kernel: packing, the parallel task grid, and results.
//!
//! Consumes a [`CompiledKernel`], bound inputs and block maps; produces
//! `out` and `lse`. K and V are packed once per call and (batch, kv-head);
//! tasks (b, h, query tile) run in parallel on rayon's pool, most expensive
//! first, each with its own scratch (no allocation per tile, no O(Q x KV)
//! memory). The task function leaves m, l and acc of its rows in scratch;
//! this module finishes them (`out = acc / l`, `lse`) and turns error codes
//! into [`EvalError`]s naming the buffer, the index and the expression.

use std::borrow::Cow;

use ndarray::{s, Array3, Array4, Axis};
use rayon::prelude::*;

use crate::bind::{Bound, Inputs, Outputs};
use crate::buffer::BufferData;
use crate::codegen::clif::kernel::CompiledKernel;
use crate::mask::BlockMaps;
use crate::runtime::abi::{self, code, BufferDesc, ErrorRecord};
use crate::runtime::gemm::{nonfinite_tiles, pack_k, pack_v, PackedK, PackedV};
use crate::sema::eval::{EvalError, Point};

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

/// Runs `compiled` on bound inputs with the given block maps. `workspace` holds
/// the packed heads (at most [`PACK_BUDGET_BYTES`], or one head if more); it is
/// grown as needed and may be reused across calls to avoid reallocating it.
pub fn run(
    compiled: &CompiledKernel,
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
    compiled: &CompiledKernel,
    inputs: &Inputs<'_>,
    bound: &Bound,
    maps: &BlockMaps,
    workspace: &mut Vec<f32>,
    budget: usize,
) -> Result<Outputs, EvalError> {
    let k = &compiled.kernel;
    let sh = bound.shapes;
    let (bq, bkv) = (k.schedule.bq, k.schedule.bkv);
    if let Some(d) = k.schedule.dim {
        assert_eq!(d, sh.d, "the kernel is specialised on D = {d}");
    }
    let d = sh.d;
    // K is packed per (kv batch, kv head); V is used in place when its rows
    // already have the packed layout (contiguous, `d` a multiple of the panel).
    let heads: Vec<(usize, usize)> = (0..bound.kv_batch)
        .flat_map(|b| (0..sh.hkv).map(move |h| (b, h)))
        .collect();
    let klay = PackedK { d, kv_len: sh.kv };
    let vlay = PackedV { d, kv_len: sh.kv };
    let v_head = |b: usize, h: usize| inputs.v.slice(s![b, h, .., ..]);
    let v_direct = vlay.row_stride() == d
        && heads
            .iter()
            .all(|&(b, h)| v_head(b, h).is_standard_layout());
    let per_head = klay.len() + if v_direct { 0 } else { vlay.len() };
    // Heads are packed and run in groups whose packed copies fit the budget.
    let group = (budget / 4 / per_head.max(1)).clamp(1, heads.len().max(1));
    // Q in standard layout, so a tile is `rows` rows of `d` floats.
    let q: Cow<'_, [f32]> = match inputs.q.as_slice() {
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
    let n_kt = sh.kv.div_ceil(bkv);
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
    let n_row = compiled.slots.row.len();
    let n_col = compiled.slots.col.len();
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
                let (kp, vp) = slot.split_at_mut(klay.len());
                pack_k(inputs.k.index_axis(Axis(0), b).index_axis(Axis(0), h), kp)
                    .expect("sized by the layout");
                if !v_direct {
                    pack_v(v_head(b, h), vp).expect("sized by the layout");
                }
                nonfinite_tiles(v_head(b, h), bkv, scan.as_deref(), &mut flags[..n_kt]);
            });
        let packed: &[f32] = workspace;
        let vflags: &[u8] = &vflags;
        tasks.par_iter().try_for_each_init(
            || Scratch {
                s: vec![0.0; bq * bkv],
                m: vec![0.0; bq],
                l: vec![0.0; bq],
                acc: vec![0.0; bq * d],
                rowvals: vec![0; n_row.max(1) * bq],
                colvals: vec![0; n_col.max(1) * bkv],
                err: ErrorRecord::default(),
            },
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
                    v_head(vb, vh).as_ptr()
                } else {
                    slot[klay.len()..].as_ptr()
                };
                let q_off = ((b * sh.h + h) * sh.q + row0) * d;
                scratch.m[..rows].fill(f32::NEG_INFINITY);
                scratch.l[..rows].fill(0.0);
                scratch.acc[..rows * d].fill(0.0);
                let (fo, fnum) = fm.full_at[qt];
                let (po, pnum) = fm.part_at[qt];
                let task = abi::Task {
                    b: b as i64,
                    h: h as i64,
                    q_start: row0 as i64 + bound.q_offset,
                    rows: rows as i64,
                    q: q[q_off..q_off + rows * d].as_ptr(),
                    k: kp,
                    v: vp,
                    v_stride: vlay.row_stride() as i64,
                    full: fm.full.as_ptr().wrapping_add(2 * fo),
                    n_full: fnum as i64,
                    part: fm.part.as_ptr().wrapping_add(po),
                    n_part: pnum as i64,
                    kv_len: sh.kv as i64,
                    d: d as i64,
                    s: scratch.s.as_mut_ptr(),
                    m: scratch.m.as_mut_ptr(),
                    l: scratch.l.as_mut_ptr(),
                    acc: scratch.acc.as_mut_ptr(),
                    rowvals: scratch.rowvals.as_mut_ptr(),
                    colvals: scratch.colvals.as_mut_ptr(),
                    err: &mut scratch.err,
                    bufs: descs.as_ptr(),
                    shapes: shapes.as_ptr(),
                    v_flags: vflags[(head - g0) * n_kt..].as_ptr(),
                };
                // SAFETY: every pointer in `task` is valid for the sizes the task
                // function's contract states (scratch sized by bq, bkv, d and the
                // slot counts; packed heads by their layouts; buffers by their descriptors).
                let status = unsafe { (compiled.task)(&task) };
                if status != 0 {
                    return Err(error(compiled, &buffers, &scratch.err, b, h));
                }
                let crate::tile::nest::Finish::Normalize = k.nest.finish;
                let ln2 = std::f32::consts::LN_2;
                for i in 0..rows {
                    let (m, l) = (scratch.m[i], scratch.l[i]);
                    if l == 0.0 && m == f32::NEG_INFINITY {
                        continue; // a row that saw no key: out stays 0, lse -inf
                    }
                    // Otherwise l >= 1 (the maximum contributes e^0) or l is NaN (a
                    // NaN score), which reaches out and lse as in the reference.
                    let base = ((b * sh.h + h) * sh.q + row0 + i) * d;
                    // SAFETY: each (b, h, row) is written by exactly one task.
                    unsafe {
                        let o = std::slice::from_raw_parts_mut(out_ptr.get().add(base), d);
                        for (x, a) in o.iter_mut().zip(&scratch.acc[i * d..(i + 1) * d]) {
                            *x = a / l;
                        }
                        *lse_ptr.get().add((b * sh.h + h) * sh.q + row0 + i) = if k.schedule.exp2 {
                            (m + l.log2()) * ln2
                        } else {
                            m + l.ln()
                        };
                    }
                }
                Ok(())
            },
        )?;
    }
    Ok(Outputs {
        out,
        lse: inputs.want_lse.then_some(lse),
    })
}

fn standard(b: &BufferData) -> BufferData {
    match b {
        BufferData::Int(a) => BufferData::Int(a.as_standard_layout().into_owned()),
        BufferData::Float(a) => BufferData::Float(a.as_standard_layout().into_owned()),
        BufferData::Bool(a) => BufferData::Bool(a.as_standard_layout().into_owned()),
    }
}

/// Turns an error code and slot into the error the reference interpreter gives.
fn error(
    compiled: &CompiledKernel,
    buffers: &[BufferData],
    err: &ErrorRecord,
    b: usize,
    h: usize,
) -> EvalError {
    let k = &compiled.kernel;
    let v = err.value as usize;
    let span: miette::SourceSpan = k.spans.get(v).copied().flatten().unwrap_or_default().into();
    let at = Point {
        b: b as i64,
        h: h as i64,
        q: err.q,
        kv: err.kv,
        score: 0.0,
    };
    let buffer_of = |op: &crate::tile::Op| match op {
        crate::tile::Op::Load {
            buffer, indices, ..
        } => Some((*buffer as usize, indices.len())),
        crate::tile::Op::Ancestor { parent, .. } => Some((*parent as usize, 1)),
        _ => None,
    };
    match err.code {
        code::PROVEN_OUT_OF_RANGE => {
            let (buf, n) = buffer_of(&k.insts[v].op).expect("out-of-range errors come from reads");
            panic!(
                "compiler bug: the read {v} of `{}` was proven in range but reads index {:?} of shape {:?} (at {at:?})\n{k}",
                k.buffers[buf].name,
                &err.index[..n],
                buffers[buf].shape()
            )
        }
        code::DIV_ZERO => EvalError::DivisionByZero { at, span },
        code::CYCLE => {
            let (buf, _) = buffer_of(&k.insts[v].op).expect("cycles come from ancestor");
            EvalError::AncestorCycle {
                buffer: k.buffers[buf].name.clone(),
                start: -1,
                span,
            }
        }
        _ => {
            let (buf, n) = buffer_of(&k.insts[v].op).expect("out-of-range errors come from reads");
            EvalError::OutOfRange {
                buffer: k.buffers[buf].name.clone(),
                index: err.index[..n].to_vec(),
                shape: buffers[buf].shape().to_vec(),
                at,
                span,
            }
        }
    }
}
