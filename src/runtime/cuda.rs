//! The CUDA runtime (`--backend cuda`, feature `cuda`): runs the PTX of
//! `codegen::ptx` on an NVIDIA GPU through the driver API.
//!
//! Consumes a checked spec and bound inputs; produces [`Outputs`] as
//! ndarrays. The driver library is loaded at run time (`cudarc` with
//! dynamic loading), so building needs no CUDA toolkit; with no driver or no
//! device every entry point returns a [`CudaError`] instead of panicking.
//!
//! The runtime launches what the PTX backend generated: the driver
//! composes the two (`CudaRuntime::compile` and `run` are defined there,
//! so this module needs nothing of codegen). A run lowers the spec under
//! `codegen::ptx::schedule`, generates PTX for the device's architecture,
//! lets the driver JIT it, builds the block maps on
//! the host, uploads q/k/v (converted to the dtype and padded to the
//! kernel's head dim), the buffers, the maps and (f16/bf16) the flags of
//! the V tiles holding NaN or inf, launches one CTA per
//! (query tile, head, batch), and downloads out, lse and the error block.

// The errors carry the interpreter's diagnostics by value, as `driver::Error` does.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DriverError, LaunchConfig, PushKernelArg,
};
use ndarray::{Array3, Array4};

use crate::bind::{bind, BindError, Bound, Inputs, Outputs};
use crate::mask::{classify, MaskError, Tiling};
use crate::runtime::device::{host, Arch, Dtype, ErrorRecord, PtxError, PtxKernel};
use crate::sema::eval::EvalError;
use crate::sema::Spec;
use crate::tile::Verified;

/// What can go wrong running on a GPU.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum CudaError {
    #[error("no CUDA driver: the library libcuda could not be loaded")]
    #[diagnostic(
        code(attnc::cuda::no_driver),
        help("install the NVIDIA driver, or run on the CPU (`--backend jit`)")
    )]
    NoDriver,
    #[error(
        "no CUDA device: the driver reports {count} device(s) and device {ordinal} was asked for"
    )]
    #[diagnostic(
        code(attnc::cuda::no_device),
        help("check `nvidia-smi`, or run on the CPU (`--backend jit`)")
    )]
    NoDevice { ordinal: usize, count: usize },
    #[error("`{name}` has compute capability {major}.{minor}; the PTX backend needs 8.0 or newer (A100, H100)")]
    #[diagnostic(
        code(attnc::cuda::unsupported_device),
        help("run on the CPU (`--backend jit`)")
    )]
    Unsupported {
        name: String,
        major: i32,
        minor: i32,
    },
    #[error("CUDA driver error while {what}: {error}")]
    #[diagnostic(code(attnc::cuda::driver))]
    Driver {
        what: &'static str,
        error: DriverError,
    },
    #[error("the kernel was compiled for D = {kernel}, but the inputs have D = {inputs}")]
    #[diagnostic(
        code(attnc::cuda::head_dim),
        help("compile the kernel for the inputs' head dim")
    )]
    HeadDim { kernel: usize, inputs: usize },
    #[error(transparent)]
    #[diagnostic(transparent)]
    Codegen(#[from] PtxError),
    #[error(transparent)]
    #[diagnostic(code(attnc::cuda::too_large))]
    TooLarge(#[from] host::TooLarge),
    #[error(transparent)]
    #[diagnostic(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    #[diagnostic(transparent)]
    Mask(#[from] MaskError),
    /// The kernel reported a failing read, division or `ancestor` walk.
    #[error(transparent)]
    #[diagnostic(transparent)]
    Eval(#[from] EvalError),
}

fn driver(what: &'static str) -> impl FnOnce(DriverError) -> CudaError {
    move |error| CudaError::Driver { what, error }
}

/// One GPU, ready to run kernels.
pub struct CudaRuntime {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: Arch,
    name: String,
    max_smem: usize,
}

/// A kernel loaded on the device.
pub struct CudaKernel {
    pub kernel: Verified,
    pub ptx: PtxKernel,
    function: CudaFunction,
}

/// Everything one launch reads and writes, on the device.
pub struct Prepared {
    bound: Bound,
    q: CudaSlice<u8>,
    k: CudaSlice<u8>,
    v: CudaSlice<u8>,
    out: CudaSlice<f32>,
    lse: CudaSlice<f32>,
    err: CudaSlice<u64>,
    map_rows: CudaSlice<u32>,
    map_full: CudaSlice<u32>,
    map_partial: CudaSlice<u32>,
    /// Per K/V head and key tile, whether the V tile holds NaN or inf
    /// (`host::nonfinite_tiles`; the mma kernels' exact P V path).
    v_flags: CudaSlice<u8>,
    buffers: Vec<CudaSlice<u8>>,
    scalars: host::Scalars,
    want_lse: bool,
}

impl Prepared {
    /// The bound problem (shapes, query offset).
    pub fn bound(&self) -> &Bound {
        &self.bound
    }
}

/// Whether a CUDA driver library can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: `is_culib_present` only tries to dlopen the driver library
    // by its usual names and drops the handle; it touches no other state.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

impl CudaRuntime {
    /// Opens device `ordinal`. Checks for the driver and the device first:
    /// cudarc panics when the driver library is missing.
    pub fn new(ordinal: usize) -> Result<CudaRuntime, CudaError> {
        if !driver_present() {
            return Err(CudaError::NoDriver);
        }
        let count = CudaContext::device_count()
            .map_err(driver("counting devices"))?
            .max(0) as usize;
        if ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).map_err(driver("creating a context"))?;
        let name = ctx.name().map_err(driver("reading the device name"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(driver("reading the compute capability"))?;
        let arch = match major {
            9.. => Arch::Sm90,
            8 => Arch::Sm80,
            _ => return Err(CudaError::Unsupported { name, major, minor }),
        };
        let max_smem = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(driver("reading the shared-memory limit"))?
            .max(0) as usize;
        let stream = ctx.default_stream();
        Ok(CudaRuntime {
            ctx,
            stream,
            arch,
            name,
            max_smem,
        })
    }

    /// The architecture the PTX is generated for.
    pub fn arch(&self) -> Arch {
        self.arch
    }

    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// Loads `ptx`, the PTX the backend generated for `kernel`
    /// (`codegen::ptx::compile` for this device's [`Self::arch`]).
    pub fn load(&self, kernel: Verified, ptx: PtxKernel) -> Result<CudaKernel, CudaError> {
        let l = &ptx.launch;
        if l.smem_bytes > self.max_smem {
            return Err(PtxError::SharedMemory {
                bytes: l.smem_bytes,
                max: self.max_smem,
                arch: self.arch,
            }
            .into());
        }
        let module = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx.text.clone()))
            .map_err(driver("loading the PTX"))?;
        let function = module
            .load_function(&ptx.entry)
            .map_err(driver("finding the kernel"))?;
        if l.dynamic_smem {
            function
                .set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    l.smem_bytes as i32,
                )
                .map_err(driver("raising the kernel's shared-memory limit"))?;
        }
        Ok(CudaKernel {
            kernel,
            ptx,
            function,
        })
    }

    fn upload<T: cudarc::driver::DeviceRepr + Default + Clone>(
        &self,
        data: &[T],
    ) -> Result<CudaSlice<T>, CudaError> {
        // Zero-length allocations are not allowed: keep one element.
        if data.is_empty() {
            return self
                .stream
                .clone_htod(&[T::default()])
                .map_err(driver("uploading"));
        }
        self.stream.clone_htod(data).map_err(driver("uploading"))
    }

    /// Binds the inputs, builds the block maps and uploads everything a
    /// launch of `k` needs.
    pub fn prepare(
        &self,
        k: &CudaKernel,
        spec: &Spec,
        inputs: &Inputs<'_>,
    ) -> Result<Prepared, CudaError> {
        let l = &k.ptx.launch;
        let bound = bind(spec, inputs)?;
        let s = bound.shapes;
        if bound.is_ragged() || bound.pages.is_some() || bound.kv_offset != 0 {
            return Err(PtxError::Nest {
                what: "ragged lengths, a paged pool or a key offset in the CUDA runtime"
                    .to_string(),
            }
            .into());
        }
        if bound.kv_elem.is_quantized() {
            return Err(PtxError::Nest {
                what: format!(
                    "{} K/V in the CUDA runtime (its kernels dequantize nothing yet)",
                    bound.kv_elem
                ),
            }
            .into());
        }
        let mismatch = match (bound.kv_elem, l.dtype) {
            (crate::tensor::ElemType::Bf16, Dtype::F16) => Some("f16"),
            (crate::tensor::ElemType::F16, Dtype::Bf16) => Some("bf16"),
            _ => None,
        };
        if let Some(device) = mismatch {
            return Err(PtxError::Nest {
                what: format!(
                    "{} K/V in a kernel compiled for {device} (it would round them again)",
                    bound.kv_elem
                ),
            }
            .into());
        }
        if s.d != l.d {
            return Err(CudaError::HeadDim {
                kernel: l.d,
                inputs: s.d,
            });
        }
        let maps = classify(spec, &bound, Tiling::new(l.bq, l.bkv)?)?;
        let dm = host::device_maps(&maps, s.h);
        let scalars = host::scalars(&bound, &dm)?;
        let q = self.upload(&host::pack(&inputs.q, l.d_pad, l.dtype))?;
        // bf16/f16 K/V widen exactly to f32 and pack back to the kernel's type.
        let (kf, vf) = (inputs.k.to_f32(), inputs.v.to_f32());
        let kk = self.upload(&host::pack(&kf.view(), l.d_pad, l.dtype))?;
        let v_packed = host::pack(&vf.view(), l.d_pad, l.dtype);
        // The f32 kernel predicates every product on p != 0 and never reads the flags.
        let v_flags = if l.dtype.uses_mma() {
            let (kv_b, hkv, kv, _) = vf.dim();
            host::nonfinite_tiles(&v_packed, kv_b * hkv, kv, l.d_pad, l.dtype, l.bkv)
        } else {
            Vec::new()
        };
        let v = self.upload(&v_packed)?;
        drop(v_packed);
        let rows = s.b * s.h * s.q;
        let out = self
            .stream
            .alloc_zeros::<f32>((rows * l.d_pad).max(1))
            .map_err(driver("allocating out"))?;
        let lse = self
            .stream
            .alloc_zeros::<f32>(rows.max(1))
            .map_err(driver("allocating lse"))?;
        let err = self
            .stream
            .alloc_zeros::<u64>(ErrorRecord::WORDS)
            .map_err(driver("allocating the error block"))?;
        let buffers = bound
            .buffers
            .iter()
            .map(|b| self.upload(&host::buffer_bytes(b)))
            .collect::<Result<_, _>>()?;
        Ok(Prepared {
            q,
            k: kk,
            v,
            out,
            lse,
            err,
            map_rows: self.upload(&dm.rows)?,
            map_full: self.upload(&dm.full)?,
            map_partial: self.upload(&dm.partial)?,
            v_flags: self.upload(&v_flags)?,
            buffers,
            scalars,
            want_lse: inputs.want_lse,
            bound,
        })
    }

    /// Enqueues one launch (asynchronous; [`Self::finish`] waits).
    pub fn launch(&self, k: &CudaKernel, p: &mut Prepared) -> Result<(), CudaError> {
        let l = &k.ptx.launch;
        let s = p.bound.shapes;
        if s.b == 0 || s.h == 0 || s.q == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: l.grid(s.b, s.h, s.q),
            block_dim: (l.threads as u32, 1, 1),
            shared_mem_bytes: if l.dynamic_smem {
                l.smem_bytes as u32
            } else {
                0
            },
        };
        let mut b = self.stream.launch_builder(&k.function);
        b.arg(&p.q)
            .arg(&p.k)
            .arg(&p.v)
            .arg(&mut p.out)
            .arg(&mut p.lse)
            .arg(&mut p.err);
        b.arg(&p.map_rows)
            .arg(&p.map_full)
            .arg(&p.map_partial)
            .arg(&p.v_flags);
        for x in &p.scalars.u32s {
            b.arg(x);
        }
        b.arg(&p.scalars.q_offset);
        for buf in &p.buffers {
            b.arg(buf);
        }
        // SAFETY: the arguments match the kernel's parameter list in order
        // and type (`ptx::PARAMS`, then one pointer per buffer), every
        // device array has the size the kernel indexes (checked shapes,
        // padded head dim, block maps built for this tiling), and the
        // shared memory is what the kernel was laid out for.
        unsafe { b.launch(cfg) }.map_err(driver("launching the kernel"))?;
        Ok(())
    }

    /// Waits for the launch, downloads the outputs and turns a recorded
    /// failure into the interpreter's error.
    pub fn finish(&self, k: &CudaKernel, p: &Prepared) -> Result<Outputs, CudaError> {
        let l = &k.ptx.launch;
        let s = p.bound.shapes;
        self.stream
            .synchronize()
            .map_err(driver("running the kernel"))?;
        let words = self
            .stream
            .clone_dtoh(&p.err)
            .map_err(driver("downloading the error block"))?;
        if let Some(e) = host::decode_error(&words, &k.kernel, &p.bound) {
            return Err(e.into());
        }
        let rows = s.b * s.h * s.q;
        let (out, lse) = if rows == 0 {
            (
                Array4::zeros((s.b, s.h, s.q, s.d)),
                Array3::from_elem((s.b, s.h, s.q), f32::NEG_INFINITY),
            )
        } else {
            let out = self
                .stream
                .clone_dtoh(&p.out)
                .map_err(driver("downloading out"))?;
            let lse = self
                .stream
                .clone_dtoh(&p.lse)
                .map_err(driver("downloading lse"))?;
            (
                host::unpad(&out, l, s.b, s.h, s.q),
                Array3::from_shape_vec((s.b, s.h, s.q), lse[..rows].to_vec())
                    .expect("one lse per row"),
            )
        };
        Ok(Outputs {
            out,
            lse: p.want_lse.then_some(lse),
        })
    }

    /// Milliseconds of `reps` back-to-back launches, timed with events on
    /// the stream (after one warm-up launch).
    pub fn time(&self, k: &CudaKernel, p: &mut Prepared, reps: usize) -> Result<f64, CudaError> {
        use cudarc::driver::sys::CUevent_flags;
        self.launch(k, p)?;
        let start = self
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(driver("creating an event"))?;
        let end = self
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(driver("creating an event"))?;
        start
            .record(&self.stream)
            .map_err(driver("recording an event"))?;
        for _ in 0..reps {
            self.launch(k, p)?;
        }
        end.record(&self.stream)
            .map_err(driver("recording an event"))?;
        let ms = start.elapsed_ms(&end).map_err(driver("timing"))?;
        Ok(f64::from(ms) / reps.max(1) as f64)
    }
}
