//! A paged K/V pool kept on the device between calls: the arrays uploaded
//! once, the bytes a decoding step's append writes (its `B x HKV` new rows
//! of K and V, and their scales, nothing else), and the V-tile flags of a
//! call taken from flags kept per row rather than from V.
//!
//! Host-side bookkeeping only, no driver: `runtime::cuda::CudaPool` holds the
//! device arrays, and the PTX emulator of the tests holds them as host
//! bytes; both apply the same [`RowWrite`]s, so what the emulator checks
//! (that the arrays after a run of appends are the arrays of the whole pool,
//! and that calls on them match the reference) is what the GPU holds.
//!
//! The host keeps its own pool ([`crate::KvArray`], written by
//! [`crate::KvArray::append`]): a call binds it for its shapes, page table
//! and lengths, and binding checks the scales of the slots the sequences
//! use. The device copy is what the kernel reads: rows written on the host
//! reach it through [`ResidentPool::append`] (or a new upload), and a row
//! the host wrote but never appended is not seen by that check.

use ndarray::ArrayView1;

use super::host::{self, KvBytes};
use super::{Dtype, PtxError, PtxKernel};
use crate::bind::{Bound, Inputs, KvLayout};
use crate::tensor::{ElemType, KvData};
use crate::tile::nest::KvSource;
use crate::tile::Kernel;

/// What a resident pool was laid out for: the pool's shape and stored type,
/// and the kernel's padded head dim and compute type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolLayout {
    pub num_pages: usize,
    pub page_size: usize,
    pub hkv: usize,
    pub d: usize,
    /// The stored type of K and V.
    pub elem: ElemType,
    pub d_pad: usize,
    pub dtype: Dtype,
}

impl PoolLayout {
    /// Bytes of one K or V row on the device.
    fn row_bytes(&self) -> usize {
        if self.elem.is_quantized() {
            self.d_pad
        } else {
            self.d_pad * self.dtype.size()
        }
    }

    /// The device row of KV head 0 of slot `slot` of page `page` (the rows
    /// of the other KV heads follow it).
    fn first_row(&self, page: usize, slot: usize) -> usize {
        let [page_stride, row_stride, _] = host::pool_strides(self.page_size, self.hkv);
        page * page_stride + slot * row_stride
    }
}

/// Bytes to write at `offset` of the device array passed as kernel
/// parameter `array` (`k`, `v`, `k_scales_ptr`, `v_scales_ptr`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowWrite {
    pub array: &'static str,
    pub offset: usize,
    pub bytes: Vec<u8>,
}

/// The host's record of a pool resident on the device.
#[derive(Clone, Debug)]
pub struct ResidentPool {
    layout: PoolLayout,
    /// Per device row (in the order of [`host::pool_strides`]), for kernels
    /// that flag V tiles (mma dtypes): 1 where its V row holds a non-finite
    /// value in the dtype (dequantized, for a quantized cache). `None` for
    /// the f32 kernel, which reads no flags.
    v_nonfinite: Option<Vec<u8>>,
}

/// The pool of a paged call and its page table, or why there is none: not a
/// pool, pages of no slots, or scales that are not one per row.
#[allow(clippy::type_complexity)]
fn pool_of<'a>(
    inputs: &'a Inputs<'_>,
) -> Result<(KvData<'a>, KvData<'a>, ndarray::ArrayView2<'a, i32>), PtxError> {
    let refuse = |what: String| Err(PtxError::Pool { what });
    let KvLayout::Paged { page_table } = &inputs.kv_layout else {
        return refuse(
            "K/V are not a paged pool (a pool `[num_pages, page_size, HKV, D]` is what \
             stays on the device)"
                .into(),
        );
    };
    let (k, v) = (inputs.k.reborrow(), inputs.v.reborrow());
    for (which, a) in [("k", &k), ("v", &v)] {
        if a.shape()[1] == 0 {
            return refuse(format!(
                "{which} is a pool {:?} of pages of 0 slots",
                a.shape()
            ));
        }
        if let Err(found) = a.scales_fit() {
            return refuse(format!(
                "{which}'s scales have shape {found:?}, expected {:?} (one per row)",
                &a.shape()[..3]
            ));
        }
    }
    Ok((k, v, page_table.view()))
}

impl ResidentPool {
    /// The pool of `inputs` (a paged call) laid out for `kernel` (an
    /// in-place kernel: [`crate::driver::ptx_plan`]) as `ptx`, and its whole
    /// arrays, to upload once: the writes at offset 0 of `k`, `v` and, for a
    /// quantized cache, `k_scales_ptr` and `v_scales_ptr`.
    ///
    /// # Errors
    ///
    /// A kernel that does not read K/V in place, K/V that are not a paged
    /// pool (or of another head dim or stored type than the kernel reads),
    /// scales that are not one per row.
    pub fn new(
        kernel: &Kernel,
        ptx: &PtxKernel,
        inputs: &Inputs<'_>,
    ) -> Result<(ResidentPool, Vec<RowWrite>), PtxError> {
        if kernel.nest.kv != KvSource::InPlace {
            return Err(PtxError::Pool {
                what: "the kernel packs K/V per call (a resident pool needs one that reads \
                       K/V in place: `driver::ptx_plan` on a paged call)"
                    .into(),
            });
        }
        let (k, v, _) = pool_of(inputs)?;
        let l = &ptx.launch;
        let sh = k.shape();
        let layout = PoolLayout {
            num_pages: sh[0],
            page_size: sh[1],
            hkv: sh[2],
            d: sh[3],
            elem: k.elem(),
            d_pad: l.d_pad,
            dtype: l.dtype,
        };
        if k.elem() != v.elem() || k.shape() != v.shape() {
            return Err(PtxError::Pool {
                what: format!(
                    "k is {} {:?} and v {} {:?}: a pool holds K and V of one shape and type",
                    k.elem(),
                    k.shape(),
                    v.elem(),
                    v.shape()
                ),
            });
        }
        host::check_kv_type(layout.elem, l)?;
        if l.d != layout.d {
            return Err(PtxError::Pool {
                what: format!("a pool of D = {} for a kernel of D = {}", layout.d, l.d),
            });
        }
        let bytes = KvBytes::of(&k, &v, l.d_pad, l.dtype);
        let v_nonfinite = bytes.v_row_flags(l.d_pad, l.dtype);
        let whole = |array, bytes| RowWrite {
            array,
            offset: 0,
            bytes,
        };
        let mut arrays = vec![whole("k", bytes.k), whole("v", bytes.v)];
        if let Some((ks, vs)) = bytes.scales {
            arrays.push(whole("k_scales_ptr", ks));
            arrays.push(whole("v_scales_ptr", vs));
        }
        Ok((
            ResidentPool {
                layout,
                v_nonfinite,
            },
            arrays,
        ))
    }

    /// What the pool was laid out for.
    pub fn layout(&self) -> PoolLayout {
        self.layout
    }

    /// The writes that bring the device's pool up to date after
    /// [`crate::KvArray::append`] wrote key `kv_lens[b]` of each sequence
    /// `b` into `inputs`' pool (through its page table; `kv_lens` as given
    /// to the append, before the caller adds 1): those `B x HKV` rows of K
    /// and V, and their scales, one write per sequence and array (the KV
    /// heads of a slot are consecutive rows), made as [`ResidentPool::new`]
    /// makes the whole arrays. The per-row V flags follow.
    ///
    /// # Errors
    ///
    /// `inputs` not a pool of this layout, lengths of another batch than the
    /// table's, or a length whose page the table does not list inside the
    /// pool (as the append itself refuses); nothing changes then.
    pub fn append(
        &mut self,
        inputs: &Inputs<'_>,
        kv_lens: ArrayView1<'_, i32>,
    ) -> Result<Vec<RowWrite>, PtxError> {
        let (k, v, table) = pool_of(inputs)?;
        self.same_pool(&k, &v)?;
        let ly = self.layout;
        if kv_lens.len() != table.nrows() {
            return Err(PtxError::Pool {
                what: format!(
                    "{} lengths for a page table of {} sequences",
                    kv_lens.len(),
                    table.nrows()
                ),
            });
        }
        let at = crate::tensor::append_slots(ly.num_pages, ly.page_size, table, kv_lens)?;
        let rb = ly.row_bytes();
        let mut writes = Vec::with_capacity(at.len() * 4);
        for (page, slot) in at {
            let r0 = ly.first_row(page, slot);
            let bytes = KvBytes::of(
                &k.rows_at(page, slot),
                &v.rows_at(page, slot),
                ly.d_pad,
                ly.dtype,
            );
            if let (Some(flags), Some(rows)) =
                (&mut self.v_nonfinite, bytes.v_row_flags(ly.d_pad, ly.dtype))
            {
                flags[r0..r0 + ly.hkv].copy_from_slice(&rows);
            }
            let mut write = |array, offset, bytes| {
                writes.push(RowWrite {
                    array,
                    offset,
                    bytes,
                })
            };
            write("k", r0 * rb, bytes.k);
            write("v", r0 * rb, bytes.v);
            if let Some((ks, vs)) = bytes.scales {
                write("k_scales_ptr", r0 * 4, ks);
                write("v_scales_ptr", r0 * 4, vs);
            }
        }
        Ok(writes)
    }

    /// Whether `k` and `v` are a pool of this layout.
    fn same_pool(&self, k: &KvData<'_>, v: &KvData<'_>) -> Result<(), PtxError> {
        let ly = &self.layout;
        let want = [ly.num_pages, ly.page_size, ly.hkv, ly.d];
        for (which, shape, elem) in [("k", k.shape(), k.elem()), ("v", v.shape(), v.elem())] {
            if shape != want || elem != ly.elem {
                return Err(PtxError::Pool {
                    what: format!(
                        "{which} is a pool of {elem} {shape:?}, the device holds {} {want:?}",
                        ly.elem
                    ),
                });
            }
        }
        Ok(())
    }

    /// Checks that a call of `ptx` on `inputs` (bound as `bound`) reads this
    /// pool: a paged call on a pool of this layout, for a kernel of its
    /// padded head dim, dtype and stored type.
    pub(super) fn check(
        &self,
        ptx: &PtxKernel,
        inputs: &Inputs<'_>,
        bound: &Bound,
    ) -> Result<(), PtxError> {
        let (k, v, _) = pool_of(inputs)?;
        self.same_pool(&k, &v)?;
        debug_assert!(bound.pages.is_some());
        let (ly, l) = (&self.layout, &ptx.launch);
        host::check_kv_type(ly.elem, l)?;
        if (ly.d_pad, ly.dtype) != (l.d_pad, l.dtype) {
            return Err(PtxError::Pool {
                what: format!(
                    "the device pool was laid out for {} rows of {} elements, the kernel reads {} rows of {}",
                    ly.dtype, ly.d_pad, l.dtype, l.d_pad
                ),
            });
        }
        Ok(())
    }

    /// The per-row V flags (see [`ResidentPool`]'s field); `None` for the
    /// f32 kernel.
    pub fn v_row_flags(&self) -> Option<&[u8]> {
        self.v_nonfinite.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::super::host::testing;
    use super::*;
    use crate::tensor::KvArray;
    use crate::tile::nest::KvSource;
    use ndarray::{Array1, Array2, Array4};

    /// Every way a resident pool can fail to fit a call is refused by what
    /// it is, and nothing is written.
    #[test]
    fn a_resident_pool_refuses_what_it_does_not_hold() {
        let spec = &testing::causal();
        let d = 16;
        let compile_as = |kv: KvSource, dtype: Dtype, quant: Option<ElemType>, d: usize| {
            testing::compile(spec, kv, dtype, quant, d)
        };
        let compile = |dtype, quant, d| compile_as(KvSource::InPlace, dtype, quant, d);
        fn fails<T>(r: Result<T, PtxError>, what: &str) {
            match r {
                Err(e) => assert!(e.to_string().contains(what), "{what}: {e}"),
                Ok(_) => panic!("{what}: accepted"),
            }
        }
        let q = Array4::<f32>::from_elem((2, 2, 1, d), 0.5);
        let pool = Array4::<f32>::from_shape_fn((4, 8, 1, d), |(p, s, _, c)| {
            ((p * 8 + s + c) % 7) as f32 / 7.0
        });
        let table = Array2::from_shape_vec((2, 2), vec![0, 1, 2, -1]).unwrap();
        let lens = Array1::from_vec(vec![10, 7]);
        let paged = Inputs::paged(
            q.view(),
            pool.view(),
            pool.view(),
            table.view(),
            lens.view(),
        );
        let (kernel, f32_kernel) = compile(Dtype::F32, None, d);

        // Not a pool; a kernel that packs K/V; a pool of another type or
        // head dim than the kernel reads; pages of no slots; scales that are
        // not one per row.
        let dense = Inputs::new(q.view(), pool.view(), pool.view());
        fails(
            ResidentPool::new(&kernel, &f32_kernel, &dense),
            "not a paged pool",
        );
        let (packed, packed_code) = compile_as(KvSource::Packed, Dtype::F32, None, d);
        fails(
            ResidentPool::new(&packed, &packed_code, &paged),
            "the kernel packs K/V per call",
        );
        let p8 = KvArray::quantize(pool.view(), ElemType::Int8);
        let int8 = Inputs::paged(q.view(), p8.view(), p8.view(), table.view(), lens.view());
        fails(
            ResidentPool::new(&kernel, &f32_kernel, &int8),
            "int8 K/V in a kernel compiled for f32 K/V",
        );
        let (kernel32, code32) = compile(Dtype::F32, None, 32);
        fails(
            ResidentPool::new(&kernel32, &code32, &paged),
            "a pool of D = 16 for a kernel of D = 32",
        );
        let empty = Array4::<f32>::zeros((4, 0, 1, d));
        let no_slots = Inputs::paged(
            q.view(),
            empty.view(),
            empty.view(),
            table.view(),
            lens.view(),
        );
        fails(
            ResidentPool::new(&kernel, &f32_kernel, &no_slots),
            "k is a pool [4, 0, 1, 16] of pages of 0 slots",
        );
        let (k8, code8) = compile(Dtype::F32, Some(ElemType::Int8), d);
        if let KvData::Int8 { data, .. } = p8.view() {
            let scales = ndarray::Array3::<f32>::zeros((4, 8, 2));
            let bad = KvData::Int8 {
                data,
                scales: scales.view(),
            };
            let inputs = Inputs::paged(q.view(), bad, p8.view(), table.view(), lens.view());
            fails(
                ResidentPool::new(&k8, &code8, &inputs),
                "k's scales have shape [4, 8, 2], expected [4, 8, 1]",
            );
        }

        // An append at a position whose page the table does not list, or
        // with lengths of another batch: nothing written.
        let (mut resident, whole) = ResidentPool::new(&kernel, &f32_kernel, &paged).unwrap();
        assert_eq!(
            whole
                .iter()
                .map(|w| (w.array, w.bytes.len()))
                .collect::<Vec<_>>(),
            [("k", 4 * 8 * d * 4), ("v", 4 * 8 * d * 4)]
        );
        let past = Array1::from_vec(vec![10, 8]);
        fails(
            resident.append(&paged, past.view()),
            "sequence 1 appends key 8, in its page 1",
        );
        fails(
            resident.append(&paged, Array1::from_vec(vec![10]).view()),
            "1 lengths for a page table of 2 sequences",
        );
        let writes = resident.append(&paged, lens.view()).unwrap();
        assert_eq!(
            writes
                .iter()
                .map(|w| (w.array, w.offset))
                .collect::<Vec<_>>(),
            // Key 10 of sequence 0: page 1, slot 2; key 7 of sequence 1:
            // page 2, slot 7 (one KV head: a row per slot).
            [
                ("k", (8 + 2) * d * 4),
                ("v", (8 + 2) * d * 4),
                ("k", (16 + 7) * d * 4),
                ("v", (16 + 7) * d * 4)
            ]
        );

        // A call on another pool, or through a kernel of another dtype.
        let bigger = Array4::<f32>::zeros((5, 8, 1, d));
        let other = Inputs::paged(
            q.view(),
            bigger.view(),
            bigger.view(),
            table.view(),
            lens.view(),
        );
        let args = |kernel: &crate::tile::Verified,
                    code: &super::super::PtxKernel,
                    inputs: &Inputs<'_>| {
            testing::args(
                spec,
                &(kernel.clone(), code.clone()),
                inputs,
                Some(&resident),
            )
            .map(|_| ())
        };
        fails(
            args(&kernel, &f32_kernel, &other),
            "the device holds f32 [4, 8, 1, 16]",
        );
        let (kernel16, f16_kernel) = compile(Dtype::F16, None, d);
        fails(
            args(&kernel16, &f16_kernel, &paged),
            "laid out for f32 rows of 16 elements, the kernel reads f16 rows of 16",
        );
        args(&kernel, &f32_kernel, &paged).unwrap();
    }

    /// On an f16 kernel (which flags V tiles), f32 and int8 pools: an append
    /// brings the arrays, scales included, to those of a fresh upload; a
    /// value of 1e6 in the new V row (infinite in f16) flags that row and no
    /// other; a refused append changes no flag.
    #[test]
    fn an_append_writes_the_new_rows_and_their_flags() {
        let spec = testing::causal();
        let d = 16;
        let q = Array4::<f32>::from_elem((2, 2, 1, d), 0.5);
        let pool = Array4::<f32>::from_shape_fn((4, 8, 2, d), |(p, s, h, c)| {
            ((p * 8 + s + h + c) % 7) as f32 / 7.0
        });
        let table = Array2::from_shape_vec((2, 2), vec![0, 1, 2, -1]).unwrap();
        let lens = Array1::from_vec(vec![10, 7]);
        for elem in [ElemType::F32, ElemType::Int8] {
            let quant = elem.is_quantized().then_some(elem);
            let (kernel, code) = testing::compile(&spec, KvSource::InPlace, Dtype::F16, quant, d);
            let (mut kh, mut vh) = (
                KvArray::quantize(pool.view(), elem),
                KvArray::quantize(pool.view(), elem),
            );
            let inputs = |k: &KvArray, v: &KvArray| {
                let (k, v) = (k.view(), v.view());
                let (q, table, lens) = (q.view(), table.view(), lens.view());
                ResidentPool::new(&kernel, &code, &Inputs::paged(q, k, v, table, lens))
            };
            let (mut resident, whole) = inputs(&kh, &vh).unwrap();
            let mut device: std::collections::HashMap<_, _> =
                whole.into_iter().map(|w| (w.array, w.bytes)).collect();
            assert_eq!(device.len(), if elem.is_quantized() { 4 } else { 2 });
            let flags0 = resident.v_row_flags().unwrap().to_vec();
            assert_eq!(flags0, vec![0; 4 * 8 * 2], "{elem}");

            let past = Array1::from_vec(vec![10, 8]);
            let step_k = ndarray::Array3::<f32>::from_elem((2, 2, d), 0.25);
            let mut step_v = step_k.clone();
            step_v[[0, 1, 3]] = 1e6;
            kh.append(table.view(), lens.view(), step_k.view()).unwrap();
            vh.append(table.view(), lens.view(), step_v.view()).unwrap();
            let host = Inputs::paged(q.view(), kh.view(), vh.view(), table.view(), lens.view());
            assert!(resident.append(&host, past.view()).is_err());
            assert_eq!(resident.v_row_flags().unwrap(), flags0, "{elem}");

            let writes = resident.append(&host, lens.view()).unwrap();
            for w in writes {
                let a = device.get_mut(w.array).unwrap();
                a[w.offset..w.offset + w.bytes.len()].copy_from_slice(&w.bytes);
            }
            let (_, fresh) = inputs(&kh, &vh).unwrap();
            for w in fresh {
                assert!(device[w.array] == w.bytes, "{elem}: `{}`", w.array);
            }
            // Key 10 of sequence 0 is page 1, slot 2: rows (8 + 2) * 2 + kh.
            let flagged: Vec<usize> = (0..4 * 8 * 2)
                .filter(|&r| resident.v_row_flags().unwrap()[r] != 0)
                .collect();
            assert_eq!(flagged, [(8 + 2) * 2 + 1], "{elem}");
        }
    }
}
