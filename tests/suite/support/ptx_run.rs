//! Runs the PTX backend's kernels on the CPU emulator (`ptx_emu`), as the CUDA
//! runtime launches them: the arguments of `host::launch_args` (packing,
//! block maps, scalars, page table, V-tile flags, error record), the same
//! grid, the same decoding of the error block. Shared by `tests/suite/ptx_emulated.rs` and the random-spec
//! property test (`tests/suite/backend_props.rs`).

use std::collections::HashMap;

use attnc::codegen::ptx::{self, PtxOptions};
use attnc::mask::{classify, Tiling};
use attnc::runtime::device::pool::{ResidentPool, RowWrite};
use attnc::runtime::device::{host, Arch, Dtype};
use attnc::sema::eval::EvalError;
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
    let (kernel, compiled) = compile(spec, schedule, dtype, inputs.k.elem());
    run(&kernel, &compiled, spec, inputs, approx, None)
}

/// The device arrays of a resident pool, as emulator bytes by kernel
/// parameter: the whole arrays of [`ResidentPool::new`], then every
/// append's writes applied, as the CUDA runtime copies them.
#[derive(Default)]
pub struct PoolBytes(pub HashMap<&'static str, Vec<u8>>);

impl PoolBytes {
    pub fn apply(&mut self, writes: Vec<RowWrite>) {
        for w in writes {
            if w.offset == 0 && !self.0.contains_key(w.array) {
                self.0.insert(w.array, w.bytes);
            } else {
                let a = self.0.get_mut(w.array).expect("an array of the pool");
                a[w.offset..w.offset + w.bytes.len()].copy_from_slice(&w.bytes);
            }
        }
    }
}

/// The kernel of `spec` under `schedule` and its PTX for `dtype`, reading
/// K/V stored as `kv_elem`.
pub fn compile(
    spec: &attnc::sema::Spec,
    schedule: &Schedule,
    dtype: Dtype,
    kv_elem: attnc::ElemType,
) -> (attnc::tile::Verified, attnc::runtime::device::PtxKernel) {
    let kernel = tile::lower(spec, schedule);
    let compiled = ptx::compile(
        &kernel,
        &PtxOptions {
            arch: Arch::Sm80,
            dtype,
            kv_quant: kv_elem.is_quantized().then_some(kv_elem),
        },
    )
    .unwrap();
    (kernel, compiled)
}

/// Runs `ptx` (the PTX of `kernel`, from [`compile`]) on `inputs` whose pool
/// is resident as `pool` with the device arrays `bytes`: K, V and their
/// scales come from `bytes`, not from `inputs`.
pub fn emulate_pooled(
    kernel: &attnc::tile::Verified,
    ptx: &attnc::runtime::device::PtxKernel,
    spec: &attnc::sema::Spec,
    inputs: &Inputs<'_>,
    pool: (&ResidentPool, &PoolBytes),
) -> Result<Outputs, EvalError> {
    run(
        kernel,
        ptx,
        spec,
        inputs,
        ptx_emu::Approx::Scattered,
        Some(pool),
    )
}

fn run(
    kernel: &attnc::tile::Verified,
    compiled: &attnc::runtime::device::PtxKernel,
    spec: &attnc::sema::Spec,
    inputs: &Inputs<'_>,
    approx: ptx_emu::Approx,
    pool: Option<(&ResidentPool, &PoolBytes)>,
) -> Result<Outputs, EvalError> {
    let l = &compiled.launch;
    let bound = attnc::bind::bind(spec, inputs).unwrap();
    let s = bound.shapes();
    // A mask that fails at some element fails in the block-map analysis
    // first, as the CUDA runtime reports it.
    let maps = match classify(spec, &bound, Tiling::new(l.bq, l.bkv).unwrap()) {
        Ok(maps) => maps,
        Err(attnc::mask::MaskError::Eval(e)) => return Err(e),
        Err(e) => panic!("block maps: {e}"),
    };
    // The arguments the CUDA runtime uploads and passes, as emulator memory
    // and parameter values.
    let args =
        host::launch_args(kernel, compiled, inputs, &bound, &maps, pool.map(|p| p.0)).unwrap();
    // The CUDA runtime passes them by position: they must be the entry's
    // parameters, in order and type.
    let declared: Vec<(String, String)> = compiled
        .text
        .lines()
        .filter_map(|line| line.trim().strip_prefix(".param "))
        .map(|decl| {
            let (ty, name) = decl.trim_end_matches(',').split_once(' ').unwrap();
            (name.to_string(), ty.to_string())
        })
        .collect();
    let passed: Vec<(String, String)> = args
        .iter()
        .map(|(name, arg)| {
            let ty = match arg {
                host::Arg::Array(_) | host::Arg::Output(_) | host::Arg::Resident => ".u64",
                host::Arg::U32(_) => ".u32",
                host::Arg::S64(_) => ".s64",
            };
            (format!("p_{name}"), ty.to_string())
        })
        .collect();
    assert_eq!(
        passed, declared,
        "launch_args against the entry's parameters"
    );
    let mut mem = ptx_emu::Memory::default();
    let mut params: HashMap<String, u64> = HashMap::new();
    for (name, arg) in args {
        let value = match arg {
            host::Arg::Array(bytes) => mem.alloc(bytes),
            host::Arg::Output(n) => mem.alloc(vec![0u8; n]),
            host::Arg::Resident => {
                let bytes = pool.expect("resident arrays come with their pool").1;
                mem.alloc(bytes.0[name.as_str()].clone())
            }
            host::Arg::U32(x) => u64::from(x),
            host::Arg::S64(x) => x as u64,
        };
        params.insert(format!("p_{name}"), value);
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
    if let Some(e) = host::decode_error(&words, kernel, &bound) {
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
