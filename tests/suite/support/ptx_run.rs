//! Runs the PTX backend's kernels on the CPU emulator (`ptx_emu`), as the CUDA
//! runtime would launch them: the same packing, block maps, scalars, V-tile
//! flags and error record. Shared by `tests/suite/ptx_emulated.rs` and the random-spec
//! property test (`tests/suite/backend_props.rs`).

use std::collections::HashMap;

use attnc::codegen::ptx::{self, PtxOptions};
use attnc::mask::{classify, Tiling};
use attnc::runtime::device::{host, Arch, Dtype, ErrorRecord, PARAMS};
use attnc::sema::eval::EvalError;
use attnc::tile::nest::KvSource;
use attnc::tile::{self, Schedule};
use attnc::{Inputs, Outputs};
use ndarray::Array3;

use super::ptx_emu;

/// Runs the PTX of `spec` under `schedule` on the emulator, the approximate
/// instructions off by their bounds in scattered directions. A schedule that
/// reads K/V in place takes ragged or paged inputs (see
/// [`host::InPlaceKv`]).
pub fn emulate(
    spec: &attnc::sema::Spec,
    schedule: &Schedule,
    dtype: Dtype,
    inputs: &Inputs<'_>,
) -> Result<Outputs, EvalError> {
    emulate_with(spec, schedule, dtype, inputs, ptx_emu::Approx::Scattered)
}

/// [`emulate`] with the given error model of the approximate instructions.
pub fn emulate_with(
    spec: &attnc::sema::Spec,
    schedule: &Schedule,
    dtype: Dtype,
    inputs: &Inputs<'_>,
    approx: ptx_emu::Approx,
) -> Result<Outputs, EvalError> {
    let kernel = tile::lower(spec, schedule);
    let compiled = ptx::compile(
        &kernel,
        &PtxOptions {
            arch: Arch::Sm80,
            dtype,
            kv_quant: inputs.k.elem().is_quantized().then(|| inputs.k.elem()),
        },
    )
    .unwrap();
    let l = &compiled.launch;
    let bound = attnc::bind::bind(spec, inputs).unwrap();
    let s = bound.shapes;
    // A mask that fails at some element fails in the block-map analysis
    // first, as the CUDA runtime reports it.
    let maps = match classify(spec, &bound, Tiling::new(l.bq, l.bkv).unwrap()) {
        Ok(maps) => maps,
        Err(attnc::mask::MaskError::Eval(e)) => return Err(e),
        Err(e) => panic!("block maps: {e}"),
    };
    let dm = host::device_maps(&maps, s.h);
    let scalars = host::scalars(&bound, &dm).unwrap();
    let mut mem = ptx_emu::Memory::default();
    let u32s = |v: &[u32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let rows = s.b * s.h * s.q;
    let mut params: HashMap<String, u64> = HashMap::new();
    let (kf, vf) = (inputs.k.to_f32(), inputs.v.to_f32());
    let v = host::pack(&vf.view(), l.d_pad, dtype);
    // In place: K/V packed as given (a pool, or dense rows), rows found
    // through the page table; flags per (sequence, KV head).
    let in_place =
        (kernel.nest.kv == KvSource::InPlace).then(|| host::InPlaceKv::of(&bound).unwrap());
    let v_flags = match &in_place {
        Some(ip) => ip.nonfinite_tiles(&v, s.hkv, s.kv, l.d_pad, dtype, l.bkv),
        None => {
            let (kv_b, hkv, kv, _) = vf.dim();
            host::nonfinite_tiles(&v, kv_b * hkv, kv, l.d_pad, dtype, l.bkv)
        }
    };
    // Quantized K/V go to the kernel as stored (bytes and scales); the V
    // flags above are those of the dequantized values.
    let (k_dev, v_dev, scales) = match (
        host::pack_quantized(&inputs.k, l.d_pad),
        host::pack_quantized(&inputs.v, l.d_pad),
    ) {
        (Some((kb, ks)), Some((vb, vs))) => (kb, vb, Some((ks, vs))),
        _ => (host::pack(&kf.view(), l.d_pad, dtype), v, None),
    };
    if let Some((ks, vs)) = scales {
        params.insert("p_k_scales_ptr".into(), mem.alloc(ks));
        params.insert("p_v_scales_ptr".into(), mem.alloc(vs));
    }
    let pointers = [
        host::pack(&inputs.q, l.d_pad, dtype),
        k_dev,
        v_dev,
        vec![0u8; rows * l.d_pad * 4],
        vec![0u8; rows * 4],
        vec![0u8; ErrorRecord::WORDS * 8],
        u32s(&dm.rows),
        u32s(&dm.full),
        u32s(&dm.partial),
        v_flags,
    ];
    for (name, data) in PARAMS.iter().zip(pointers) {
        params.insert(format!("p_{name}"), mem.alloc(data));
    }
    for (name, v) in PARAMS[10..21].iter().zip(scalars.u32s) {
        params.insert(format!("p_{name}"), u64::from(v));
    }
    params.insert("p_q_offset".into(), scalars.q_offset as u64);
    if let Some(ip) = &in_place {
        let values = [
            mem.alloc(u32s(&ip.lens)),
            mem.alloc(u32s(&ip.table)),
            u64::from(ip.table_stride),
            u64::from(ip.page_size),
            u64::from(ip.page_stride),
            u64::from(ip.row_stride),
            u64::from(ip.head_stride),
        ];
        for (name, v) in ptx::IN_PLACE_PARAMS.iter().zip(values) {
            params.insert(format!("p_{name}"), v);
        }
    }
    for (i, b) in bound.buffers.iter().enumerate() {
        params.insert(format!("p_buf{i}"), mem.alloc(host::buffer_bytes(b)));
    }
    let mut program = ptx_emu::Program::parse(&compiled.text);
    program.approx = approx;
    let smem = if l.dynamic_smem { l.smem_bytes } else { 0 };
    ptx_emu::run(
        &program,
        &params,
        &mut mem,
        l.grid(s.b, s.h, s.q),
        l.threads,
        smem,
    );
    let words: Vec<u64> = mem
        .bytes(params["p_err"])
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    if let Some(e) = host::decode_error(&words, &kernel, &bound) {
        return Err(e);
    }
    let f32s = |base: u64| {
        mem.bytes(base)
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect::<Vec<f32>>()
    };
    let out = host::unpad(&f32s(params["p_out"]), l, s.b, s.h, s.q);
    let lse = Array3::from_shape_vec((s.b, s.h, s.q), f32s(params["p_lse"])).unwrap();
    Ok(Outputs {
        out,
        lse: Some(lse),
    })
}
