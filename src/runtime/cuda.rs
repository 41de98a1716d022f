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
//! `codegen::ptx::schedule` (K/V read in place for a ragged batch, a paged
//! pool or a quantized cache), generates PTX for the device's architecture,
//! lets the driver JIT it, builds the block maps on the host, uploads the
//! arguments [`host::launch_args`] builds (q, k and v in the kernel's types
//! and padded head dim, or quantized K/V with their scales; the page table
//! and lengths; the buffers, the maps and the flags of the V tiles holding
//! NaN or inf), launches one CTA per (query tile, head, batch), and
//! downloads out, lse and the error block. The PTX emulator of the tests
//! runs the same arguments.

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
use crate::runtime::device::pool::{PoolLayout, ResidentPool};
use crate::runtime::device::{host, Arch, PtxError, PtxKernel};
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
    #[diagnostic(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    #[diagnostic(transparent)]
    Mask(#[from] MaskError),
    /// The kernel reported a failing read, division or `ancestor` walk.
    #[error(transparent)]
    #[diagnostic(transparent)]
    Eval(#[from] EvalError),
    /// The host side of a call (its block maps) needs more memory than there is.
    #[error(transparent)]
    #[diagnostic(transparent)]
    Memory(#[from] crate::memory::MemoryError),
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
    /// The spec the kernel was lowered from: a call binds its inputs against
    /// it ([`CudaRuntime::prepare`]), so its buffers and block maps are the
    /// ones the kernel reads.
    spec: Spec,
    /// Unique per loaded kernel: a [`Prepared`] call names the kernel it was
    /// built for.
    id: u64,
    // Private: the launch reads what these describe (tiles, shared memory,
    // argument layout), so they must stay those of the loaded function.
    kernel: Verified,
    ptx: PtxKernel,
    function: CudaFunction,
}

impl CudaKernel {
    /// Refuses a call prepared for another kernel: its arguments follow
    /// that kernel's tiles, head dim and parameter layout.
    fn takes(&self, p: &Prepared<'_>) -> Result<(), CudaError> {
        if p.kernel == self.id {
            return Ok(());
        }
        Err(PtxError::Launch {
            what: format!(
                "the call was prepared for another kernel than `{}`: prepare it with the kernel that launches it",
                self.kernel.name
            ),
        }
        .into())
    }

    /// The loop IR the kernel was emitted from.
    pub fn kernel(&self) -> &Verified {
        &self.kernel
    }

    /// The PTX text and its launch configuration.
    pub fn ptx(&self) -> &PtxKernel {
        &self.ptx
    }
}

/// One kernel argument on the device: an array, an array of a resident
/// pool, or a scalar passed by value.
enum DeviceArg<'p> {
    Array(CudaSlice<u8>),
    Pooled(&'p CudaSlice<u8>),
    U32(u32),
    S64(i64),
}

/// Everything one launch reads and writes, on the device: the arguments of
/// [`host::launch_args`], in the kernel's parameter order. `'p`: the
/// resident pool it reads ([`CudaRuntime::prepare_pooled`]), which cannot
/// change or go while it lives.
pub struct Prepared<'p> {
    /// The [`CudaKernel::id`] of the kernel the arguments were built for
    /// (tiles, head dim, argument layout): another kernel refuses them.
    kernel: u64,
    bound: Bound,
    args: Vec<(String, DeviceArg<'p>)>,
    want_lse: bool,
}

/// A paged K/V pool kept on the device between calls
/// ([`CudaRuntime::upload_pool`]): calls on it ([`CudaRuntime::prepare_pooled`])
/// upload q, the page table, the lengths and the block maps, never K or V,
/// and a decoding step uploads only its new rows ([`CudaRuntime::append_pool`]).
pub struct CudaPool {
    pool: ResidentPool,
    /// The device arrays, by the kernel parameter they are passed as.
    arrays: Vec<(&'static str, CudaSlice<u8>)>,
    /// The device the arrays live on.
    ordinal: usize,
    /// An append failed part-way (a driver error): the device arrays may
    /// hold some of its rows and not others, so the pool refuses every call
    /// until it is uploaded again.
    broken: bool,
}

impl CudaPool {
    /// What the pool was laid out for.
    pub fn layout(&self) -> PoolLayout {
        self.pool.layout()
    }

    /// Refuses a pool on another device than `rt`'s, or one an append left
    /// half-written.
    fn usable(&self, rt: &CudaRuntime) -> Result<(), CudaError> {
        let what = if self.ordinal != rt.ctx.ordinal() {
            format!(
                "the pool is on device {}, the runtime on device {}",
                self.ordinal,
                rt.ctx.ordinal()
            )
        } else if self.broken {
            "an earlier append failed part-way (a driver error), so the device arrays may hold \
             some of its rows and not others"
                .into()
        } else {
            return Ok(());
        };
        Err(PtxError::Pool { what }.into())
    }
}

impl Prepared<'_> {
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
    /// (`codegen::ptx::compile` for this device's [`Self::arch`]), lowered
    /// from `spec`. It trusts that the three belong together (the launch
    /// reads what they describe), so only the driver's `compile_for` calls it.
    pub(crate) fn load(
        &self,
        spec: &Spec,
        kernel: Verified,
        ptx: PtxKernel,
    ) -> Result<CudaKernel, CudaError> {
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
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Ok(CudaKernel {
            spec: spec.clone(),
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
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

    /// Binds the inputs to `k`'s spec, builds the block maps and uploads
    /// everything a launch of `k` needs ([`host::launch_args`]).
    pub fn prepare(
        &self,
        k: &CudaKernel,
        inputs: &Inputs<'_>,
    ) -> Result<Prepared<'static>, CudaError> {
        self.prepare_bound(k, inputs, bind(&k.spec, inputs)?)
    }

    /// [`Self::prepare`] for inputs already bound (`bound` is `bind(k's spec,
    /// inputs)`: the launch reads what it describes, so it is not public).
    pub(crate) fn prepare_bound(
        &self,
        k: &CudaKernel,
        inputs: &Inputs<'_>,
        bound: Bound,
    ) -> Result<Prepared<'static>, CudaError> {
        self.prepare_with(k, inputs, bound, None)
    }

    /// Uploads the paged pool of `inputs` for kernel `k` (an in-place kernel:
    /// [`crate::driver::ptx_plan`]), to stay on the device between calls.
    ///
    /// # Errors
    ///
    /// K/V that are not a paged pool, or a pool of another head dim or
    /// stored type than `k` reads ([`PtxError::Pool`], [`PtxError::Launch`]).
    pub fn upload_pool(&self, k: &CudaKernel, inputs: &Inputs<'_>) -> Result<CudaPool, CudaError> {
        let (pool, whole) = ResidentPool::new(&k.kernel, &k.ptx, inputs)?;
        let arrays = whole
            .into_iter()
            .map(|w| Ok((w.array, self.upload(&w.bytes)?)))
            .collect::<Result<_, CudaError>>()?;
        Ok(CudaPool {
            pool,
            arrays,
            ordinal: self.ctx.ordinal(),
            broken: false,
        })
    }

    /// Uploads the rows [`crate::KvArray::append`] just wrote into `inputs`'
    /// pool (key `kv_lens[b]` of each sequence `b`, `kv_lens` as given to the
    /// append), and nothing else ([`ResidentPool::append`]); returns the
    /// bytes uploaded.
    ///
    /// # Errors
    ///
    /// `inputs` not a pool of `pool`'s layout, a length whose page the table
    /// does not list, two sequences appending into one slot (as
    /// [`crate::KvArray::append`] refuses), or a pool on another device;
    /// nothing is uploaded then. A driver error during the copies leaves `pool` refusing every
    /// call until it is uploaded again ([`Self::upload_pool`]).
    pub fn append_pool(
        &self,
        pool: &mut CudaPool,
        inputs: &Inputs<'_>,
        kv_lens: ndarray::ArrayView1<'_, i32>,
    ) -> Result<usize, CudaError> {
        pool.usable(self)?;
        let writes = pool.pool.append(inputs, kv_lens)?;
        // Until every copy has succeeded.
        pool.broken = true;
        let mut bytes = 0;
        for w in writes {
            let array = pool
                .arrays
                .iter_mut()
                .find_map(|(name, a)| (*name == w.array).then_some(a))
                .expect("the pool holds every array it writes");
            let mut dst = array.slice_mut(w.offset..w.offset + w.bytes.len());
            self.stream
                .memcpy_htod(&w.bytes[..], &mut dst)
                .map_err(driver("uploading the appended rows"))?;
            bytes += w.bytes.len();
        }
        pool.broken = false;
        Ok(bytes)
    }

    /// [`Self::prepare`] for a call on a resident pool: `inputs`' pool is
    /// bound (shapes, page table, lengths, the scales of the slots in use)
    /// but not uploaded; the kernel reads `pool`'s arrays.
    ///
    /// # Errors
    ///
    /// Those of [`Self::prepare`], and a `pool` laid out for another pool or
    /// kernel, on another device, or left half-written by a failed append
    /// ([`PtxError::Pool`]).
    pub fn prepare_pooled<'p>(
        &self,
        k: &CudaKernel,
        inputs: &Inputs<'_>,
        pool: &'p CudaPool,
    ) -> Result<Prepared<'p>, CudaError> {
        pool.usable(self)?;
        self.prepare_with(k, inputs, bind(&k.spec, inputs)?, Some(pool))
    }

    fn prepare_with<'p>(
        &self,
        k: &CudaKernel,
        inputs: &Inputs<'_>,
        bound: Bound,
        pool: Option<&'p CudaPool>,
    ) -> Result<Prepared<'p>, CudaError> {
        let spec = &k.spec;
        let l = &k.ptx.launch;
        if bound.shapes.d != l.d {
            return Err(CudaError::HeadDim {
                kernel: l.d,
                inputs: bound.shapes.d,
            });
        }
        let tiling = Tiling::new(l.bq, l.bkv)?;
        crate::memory::check_block_maps(spec, &bound.shapes, tiling)?;
        let maps = classify(spec, &bound, tiling)?;
        let mut args = Vec::new();
        let resident = pool.map(|p| &p.pool);
        for (name, arg) in host::launch_args(&k.kernel, &k.ptx, inputs, &bound, &maps, resident)? {
            let arg = match arg {
                host::Arg::Resident => DeviceArg::Pooled(
                    pool.and_then(|p| p.arrays.iter().find(|(n, _)| *n == name))
                        .map(|(_, a)| a)
                        .expect(
                            "launch_args passes resident arrays only with the pool that holds them",
                        ),
                ),
                host::Arg::Array(bytes) => DeviceArg::Array(self.upload(&bytes)?),
                host::Arg::Output(n) => DeviceArg::Array(
                    self.stream
                        .alloc_zeros::<u8>(n.max(1))
                        .map_err(driver("allocating an output"))?,
                ),
                host::Arg::U32(x) => DeviceArg::U32(x),
                host::Arg::S64(x) => DeviceArg::S64(x),
            };
            args.push((name, arg));
        }
        Ok(Prepared {
            kernel: k.id,
            args,
            want_lse: inputs.want_lse,
            bound,
        })
    }

    /// Enqueues one launch (asynchronous; [`Self::finish`] waits).
    pub fn launch(&self, k: &CudaKernel, p: &mut Prepared<'_>) -> Result<(), CudaError> {
        k.takes(p)?;
        let l = &k.ptx.launch;
        if p.bound.is_empty() {
            return Ok(());
        }
        let s = p.bound.shapes;
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
        for (_, arg) in &mut p.args {
            match arg {
                DeviceArg::Array(a) => b.arg(a),
                DeviceArg::Pooled(a) => b.arg(*a),
                DeviceArg::U32(x) => b.arg(&*x),
                DeviceArg::S64(x) => b.arg(&*x),
            };
        }
        // SAFETY: the arguments are those of `host::launch_args` for this
        // kernel: its parameter list in order and type, every device array of
        // the size the kernel indexes (checked shapes, padded head dim, block
        // maps built for this tiling, the page table and lengths of the
        // bound call), and the shared memory is what the kernel was laid
        // out for.
        unsafe { b.launch(cfg) }.map_err(driver("launching the kernel"))?;
        Ok(())
    }

    /// The bytes of the device array `name` of `p`.
    fn download(&self, p: &Prepared<'_>, name: &str) -> Result<Vec<u8>, CudaError> {
        let array = p.args.iter().find_map(|(n, a)| match a {
            DeviceArg::Array(a) if n == name => Some(a),
            _ => None,
        });
        let array = array.expect("launch_args names every output");
        self.stream
            .clone_dtoh(array)
            .map_err(driver("downloading the outputs"))
    }

    /// Waits for the launch, downloads the outputs and turns a recorded
    /// failure into the interpreter's error.
    pub fn finish(&self, k: &CudaKernel, p: &Prepared<'_>) -> Result<Outputs, CudaError> {
        k.takes(p)?;
        let l = &k.ptx.launch;
        let s = p.bound.shapes;
        self.stream
            .synchronize()
            .map_err(driver("running the kernel"))?;
        let words: Vec<u64> = self
            .download(p, "err")?
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
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
            let f32s = |bytes: Vec<u8>| -> Vec<f32> {
                bytes
                    .chunks(4)
                    .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                    .collect()
            };
            let out = f32s(self.download(p, "out")?);
            let lse = f32s(self.download(p, "lse")?);
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
    pub fn time(
        &self,
        k: &CudaKernel,
        p: &mut Prepared<'_>,
        reps: usize,
    ) -> Result<f64, CudaError> {
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
