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
//! reach it through [`ResidentPool::append`] (or a new upload).

use ndarray::ArrayView1;

use super::host::{self, InPlaceKv, KvBytes};
use super::{Dtype, PtxError, PtxKernel};
use crate::bind::{Bound, Inputs, KvLayout};
use crate::tensor::{ElemType, KvData};

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

    /// The device row of slot `slot` of page `page`, KV head `kh`
    /// ([`InPlaceKv::row`] of a pool).
    fn row(&self, page: usize, slot: usize, kh: usize) -> usize {
        (page * self.page_size + slot) * self.hkv + kh
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
    /// Per device row ([`PoolLayout::row`]), for kernels that flag V tiles
    /// (mma dtypes): 1 where its V row holds a non-finite value in the dtype
    /// (dequantized, for a quantized cache). `None` for the f32 kernel, which
    /// reads no flags.
    v_nonfinite: Option<Vec<u8>>,
}

/// The pool of a paged call and its page table, or why there is none.
#[allow(clippy::type_complexity)]
fn pool_of<'a>(
    inputs: &'a Inputs<'_>,
) -> Result<(KvData<'a>, KvData<'a>, ndarray::ArrayView2<'a, i32>), PtxError> {
    match &inputs.kv_layout {
        KvLayout::Paged { page_table } => {
            Ok((inputs.k.reborrow(), inputs.v.reborrow(), page_table.view()))
        }
        KvLayout::Dense => Err(PtxError::Pool {
            what: "K/V are not a paged pool (a pool `[num_pages, page_size, HKV, D]` is what \
                   stays on the device)"
                .into(),
        }),
    }
}

impl ResidentPool {
    /// The pool of `inputs` (a paged call) laid out for `ptx`, and its whole
    /// arrays, to upload once: the writes at offset 0 of `k`, `v` and, for a
    /// quantized cache, `k_scales_ptr` and `v_scales_ptr`.
    pub fn new(
        ptx: &PtxKernel,
        inputs: &Inputs<'_>,
    ) -> Result<(ResidentPool, Vec<RowWrite>), PtxError> {
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
        let bytes = KvBytes::of(&k, &v, l);
        let row = l.d_pad * l.dtype.size();
        let v_nonfinite = bytes.v_for_flags(l).map(|v| {
            v.chunks_exact(row)
                .map(|r| u8::from(host::nonfinite(r, l.dtype)))
                .collect()
        });
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
    /// heads of a slot are consecutive rows). The per-row V flags follow.
    ///
    /// # Errors
    ///
    /// `inputs` not a pool of this layout, or a length whose page the table
    /// does not list inside the pool (as the append itself refuses); nothing
    /// changes then.
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
        // The KV heads of a slot are consecutive rows: one write per
        // sequence and array.
        let mut writes = Vec::with_capacity(at.len() * 4);
        for (page, slot) in at {
            let r0 = ly.row(page, slot, 0);
            for (array, scales, a) in [("k", "k_scales_ptr", &k), ("v", "v_scales_ptr", &v)] {
                let mut bytes = Vec::with_capacity(ly.hkv * rb);
                let mut scale_bytes = Vec::new();
                for kh in 0..ly.hkv {
                    let (row, scale) = self.row_bytes(a, [page, slot, kh]);
                    bytes.extend(row);
                    if let Some(scale) = scale {
                        scale_bytes.extend(scale.to_le_bytes());
                    }
                }
                writes.push(RowWrite {
                    array,
                    offset: r0 * rb,
                    bytes,
                });
                if ly.elem.is_quantized() {
                    writes.push(RowWrite {
                        array: scales,
                        offset: r0 * 4,
                        bytes: scale_bytes,
                    });
                }
            }
            if let Some(flags) = &mut self.v_nonfinite {
                for kh in 0..ly.hkv {
                    let mut row = Vec::with_capacity(ly.d_pad * ly.dtype.size());
                    host::pack_row(
                        row_f32(&v, [page, slot, kh]).into_iter(),
                        ly.d_pad,
                        ly.dtype,
                        &mut row,
                    );
                    flags[r0 + kh] = u8::from(host::nonfinite(&row, ly.dtype));
                }
            }
        }
        Ok(writes)
    }

    /// The device bytes of row `[page, slot, kh]` of `a`, and its scale when
    /// quantized.
    fn row_bytes(&self, a: &KvData<'_>, [page, slot, kh]: [usize; 3]) -> (Vec<u8>, Option<f32>) {
        let ly = &self.layout;
        let mut out = Vec::with_capacity(ly.row_bytes());
        let at = ndarray::s![page, slot, kh, ..];
        let scale = match a {
            KvData::Int8 { data, scales } => {
                out.extend(data.slice(at).iter().map(|&x| x as u8));
                Some(scales[[page, slot, kh]])
            }
            KvData::Fp8 { data, scales } => {
                out.extend(data.slice(at).iter().copied());
                Some(scales[[page, slot, kh]])
            }
            _ => {
                host::pack_row(
                    row_f32(a, [page, slot, kh]).into_iter(),
                    ly.d_pad,
                    ly.dtype,
                    &mut out,
                );
                None
            }
        };
        out.resize(ly.row_bytes(), 0);
        (out, scale)
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

    /// The V-tile flags of a call on this pool ([`InPlaceKv::nonfinite_tiles`]
    /// from the per-row flags; none for the f32 kernel).
    pub(super) fn v_flags(&self, ip: &InPlaceKv, hkv: usize, kv: usize, tile: usize) -> Vec<u8> {
        match &self.v_nonfinite {
            Some(flags) => ip.nonfinite_tiles(hkv, kv, tile, |r| flags[r] != 0),
            None => Vec::new(),
        }
    }
}

/// Row `[page, slot, kh]` of a pool as f32 (dequantized).
fn row_f32(a: &KvData<'_>, [page, slot, kh]: [usize; 3]) -> Vec<f32> {
    (0..a.shape()[3])
        .map(|c| a.get([page, slot, kh, c]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codegen::ptx::{self, PtxOptions};
    use crate::driver::{load, SourceFile, SpecOptions};
    use crate::mask::{classify, Tiling};
    use crate::tensor::KvArray;
    use crate::tile::nest::KvSource;
    use ndarray::{Array1, Array2, Array4};

    /// Every way a resident pool can fail to fit a call is refused by what
    /// it is, and nothing is written.
    #[test]
    fn a_resident_pool_refuses_what_it_does_not_hold() {
        let program = load(
            SourceFile::new("t.attn", "attention a { mask = causal }"),
            &SpecOptions::default(),
        )
        .unwrap();
        let spec = &program.spec;
        let d = 16;
        let compile = |dtype: Dtype, quant: Option<ElemType>, d: usize| {
            let schedule = crate::tile::Schedule {
                kv: KvSource::InPlace,
                ..ptx::schedule(d, dtype)
            };
            let kernel = crate::tile::lower(spec, &schedule);
            let opts = PtxOptions {
                arch: super::super::Arch::Sm80,
                dtype,
                kv_quant: quant,
            };
            (kernel.clone(), ptx::compile(&kernel, &opts).unwrap())
        };
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

        // Not a pool; a pool of another type or head dim than the kernel reads.
        let dense = Inputs::new(q.view(), pool.view(), pool.view());
        fails(ResidentPool::new(&f32_kernel, &dense), "not a paged pool");
        let p8 = KvArray::quantize(pool.view(), ElemType::Int8);
        let int8 = Inputs::paged(q.view(), p8.view(), p8.view(), table.view(), lens.view());
        fails(
            ResidentPool::new(&f32_kernel, &int8),
            "int8 K/V in a kernel compiled for f32 K/V",
        );
        fails(
            ResidentPool::new(&compile(Dtype::F32, None, 32).1, &paged),
            "a pool of D = 16 for a kernel of D = 32",
        );

        // An append at a position whose page the table does not list, or
        // with lengths of another batch: nothing written, the flags kept.
        let (mut resident, whole) = ResidentPool::new(&f32_kernel, &paged).unwrap();
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
            let bound = crate::bind::bind(spec, inputs).unwrap();
            let l = &code.launch;
            let maps = classify(spec, &bound, Tiling::new(l.bq, l.bkv).unwrap()).unwrap();
            host::launch_args(kernel, code, inputs, &bound, &maps, Some(&resident)).map(|_| ())
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
}
