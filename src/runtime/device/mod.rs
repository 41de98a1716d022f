//! The GPU launch ABI, owned by the runtime: the architectures and element
//! types kernels are generated for, the kernel parameters in order, the
//! error block, and the launch data of a generated kernel ([`PtxKernel`]).
//! The PTX backend (`codegen::ptx`) generates code against these; [`host`]
//! builds the device arrays a launch needs and decodes the error block;
//! `runtime::cuda` launches. Pure data: no driver, no I/O, tested without a
//! GPU.

pub mod host;
pub mod pool;

use std::fmt;
use std::str::FromStr;

use crate::runtime::abi::code;

/// A GPU architecture the PTX targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    /// Ampere (A100): `mma.sync`, `cp.async`, `ldmatrix`.
    Sm80,
    /// Hopper (H100, H200), without the `sm_90a` features (`wgmma`, TMA).
    Sm90,
}

impl Arch {
    pub const ALL: [Arch; 2] = [Arch::Sm80, Arch::Sm90];

    /// The `.target` name, also ptxas's `-arch`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Sm80 => "sm_80",
            Arch::Sm90 => "sm_90",
        }
    }

    /// Shared memory one CTA may use with the opt-in attribute (A100: 163
    /// KiB, H100/H200: 227 KiB).
    pub fn max_smem_per_block(self) -> usize {
        match self {
            Arch::Sm80 => 163 * 1024,
            Arch::Sm90 => 227 * 1024,
        }
    }

    /// Shared memory of one SM available to CTAs.
    pub fn smem_per_sm(self) -> usize {
        match self {
            Arch::Sm80 => 164 * 1024,
            Arch::Sm90 => 228 * 1024,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Arch {
    type Err = String;

    fn from_str(s: &str) -> Result<Arch, String> {
        match s {
            "sm_80" | "sm80" => Ok(Arch::Sm80),
            "sm_90" | "sm90" => Ok(Arch::Sm90),
            _ => Err(format!(
                "unknown GPU architecture `{s}`: expected sm_80 or sm_90"
            )),
        }
    }
}

/// The element type of q, k and v on the device. Accumulation, the score
/// code and the softmax are f32 in every case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    F16,
    Bf16,
    F32,
}

impl Dtype {
    pub const ALL: [Dtype; 3] = [Dtype::F16, Dtype::Bf16, Dtype::F32];

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
            Dtype::F32 => "f32",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::F32 => 4,
        }
    }

    /// Whether the products run on tensor cores (`mma.sync`).
    pub fn uses_mma(self) -> bool {
        self != Dtype::F32
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Dtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Dtype, String> {
        match s {
            "f16" | "fp16" | "half" => Ok(Dtype::F16),
            "bf16" => Ok(Dtype::Bf16),
            "f32" | "fp32" | "float" => Ok(Dtype::F32),
            _ => Err(format!("unknown dtype `{s}`: expected f16, bf16 or f32")),
        }
    }
}

/// The names of the kernel parameters, in order; buffers follow as
/// `buf0`, `buf1`, ... in the kernel's buffer order.
pub const PARAMS: [&str; 23] = [
    "q",
    "k",
    "v",
    "out",
    "lse",
    "err",
    "map_rows",
    "map_full",
    "map_partial",
    "v_flags",
    "B",
    "H",
    "HKV",
    "Q",
    "KV",
    "D",
    "group",
    "kv_batch_stride",
    "map_stride_b",
    "map_stride_h",
    "kv_rows",
    "q_offset",
    "kv_offset",
];

/// The parameters a kernel with quantized K/V ([`Launch::kv_quant`]) takes
/// after [`IN_PLACE_PARAMS`]: the float32 scale of each K and V row, indexed
/// like the rows (`row * 4` bytes from the pointer).
pub const QUANT_PARAMS: [&str; 2] = ["k_scales_ptr", "v_scales_ptr"];

/// The parameters of a kernel that reads K and V in place
/// ([`crate::tile::nest::KvSource::InPlace`]: a paged pool, or dense rows of
/// ragged lengths), after `kv_offset` and before the buffers: the sequences'
/// key counts (u32 `[B]`), the page table (u32 `[B, table_stride]`), and the
/// page size and the strides, in rows of the padded head dim, of a page, a
/// slot and a KV head in k and v (see [`host::InPlaceKv`]). `q_offset` is
/// unused there: sequence `b`'s queries end on its last key, at position
/// `kv_offset + kv_lens[b] - 1`.
pub const IN_PLACE_PARAMS: [&str; 7] = [
    "kv_lens_ptr",
    "page_table_ptr",
    "table_stride",
    "page_size",
    "page_stride",
    "row_stride",
    "head_stride",
];

/// The layout of the error block (`err`, 16 u64 words, zeroed by the host).
///
/// Word 0: the failure kind in its low 32 bits (0 = none; set once by an
/// atomic compare-and-swap, so one failing thread wins) and the value id of
/// the failing instruction in its high 32 bits. Words 1..=4: `b, h, q, kv`
/// of the point as the interpreter reports it (0 where the level does not
/// have it). Words 5..: the index of an out-of-range read (up to
/// [`ErrorRecord::MAX_INDICES`] of them), or the start position of a cyclic
/// `ancestor` walk.
pub struct ErrorRecord;

impl ErrorRecord {
    /// Words of the block.
    pub const WORDS: usize = 16;
    /// Index words recorded for an out-of-range read.
    pub const MAX_INDICES: usize = 8;
    // The kinds are the CPU's (`runtime::abi::code`): one decoder
    // (`runtime::abi::decode`) serves both.
    /// A read out of range (`load.checked` or an `ancestor` step).
    pub const OUT_OF_RANGE: u32 = code::OUT_OF_RANGE as u32;
    /// An integer division or modulo by zero.
    pub const DIVISION_BY_ZERO: u32 = code::DIV_ZERO as u32;
    /// An `ancestor` walk that does not end.
    pub const ANCESTOR_CYCLE: u32 = code::CYCLE as u32;
    /// A shift by a count outside `0..=63`; the count is index word 0.
    pub const SHIFT_OUT_OF_RANGE: u32 = code::SHIFT as u32;
}

/// How the host must launch a kernel, and the budget it was laid out for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub arch: Arch,
    pub dtype: Dtype,
    /// Query rows per CTA.
    pub bq: usize,
    /// Key columns per tile.
    pub bkv: usize,
    /// The head dim of the spec.
    pub d: usize,
    /// The head dim of the device arrays (a multiple of 16 for mma, of 8
    /// for f32); columns `d..d_pad` must be zero.
    pub d_pad: usize,
    /// Threads per CTA (`32 * bq / 16`).
    pub threads: usize,
    /// Shared memory per CTA in bytes.
    pub smem_bytes: usize,
    /// Whether the shared memory is dynamic (above 48 KiB): launch with
    /// `smem_bytes` of dynamic shared memory after raising the function's
    /// max-dynamic-shared-memory attribute. Otherwise it is static and the
    /// launch passes 0.
    pub dynamic_smem: bool,
    /// Whether the Q fragments stay in registers for the whole CTA (mma
    /// path with `d_pad <= 128`); otherwise Q is read from shared memory.
    pub q_in_registers: bool,
    /// The register budget the layout is planned for: ptxas must fit the
    /// kernel in this many registers per thread without spilling.
    pub max_registers: usize,
    /// K and V stored quantized (int8 or fp8, with a float32 scale per row
    /// in `k_scales_ptr`/`v_scales_ptr`, [`QUANT_PARAMS`]), dequantized to
    /// `dtype` in the tile loads; `None`: K and V are in `dtype`.
    pub kv_quant: Option<crate::tensor::ElemType>,
}

/// Static shared memory is limited to 48 KiB per CTA.
pub const STATIC_SMEM_LIMIT: usize = 48 * 1024;

impl Launch {
    /// The grid for a problem: `(ceil(Q / bq), H, B)`.
    pub fn grid(&self, b: usize, h: usize, q: usize) -> (u32, u32, u32) {
        (q.div_ceil(self.bq) as u32, h as u32, b as u32)
    }

    /// CTAs that fit on one SM with `registers` per thread (as ptxas
    /// reports them), limited by registers, shared memory and warps.
    pub fn ctas_per_sm(&self, registers: usize) -> usize {
        // Registers are allocated per warp in units of 256 (8 per thread).
        let per_thread = registers.max(1).div_ceil(8) * 8;
        let by_regs = 65536 / (per_thread * self.threads);
        // Each CTA also reserves 1 KiB of shared memory for the system.
        let by_smem = self.arch.smem_per_sm() / (self.smem_bytes + 1024);
        let by_warps = 64 / (self.threads / 32);
        by_regs.min(by_smem).min(by_warps).min(32)
    }

    /// CTAs per SM that [`Self::max_registers`] leaves room for (at least 1);
    /// the kernel tells ptxas (`.minnctapersm`) not to aim higher at the
    /// cost of spills.
    pub fn register_ctas_per_sm(&self) -> usize {
        (65536 / (self.max_registers.div_ceil(8) * 8 * self.threads)).max(1)
    }

    /// The smallest occupancy the layout promises: CTAs per SM at
    /// [`Self::max_registers`].
    pub fn min_ctas_per_sm(&self) -> usize {
        self.ctas_per_sm(self.max_registers)
    }
}

/// PTX for one kernel and how to launch it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PtxKernel {
    /// The PTX module text.
    pub text: String,
    /// The name of the `.entry` function.
    pub entry: String,
    pub launch: Launch,
}

/// A kernel the PTX backend cannot generate, or the CUDA runtime cannot
/// launch: what the launch layout does not express.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, miette::Diagnostic)]
pub enum PtxError {
    #[error("the PTX backend needs a fixed head dim, but the kernel is generic over D")]
    #[diagnostic(
        code(attnc::ptx::generic_dim),
        help("specialise the kernel on the head dim, e.g. `--dim 64`")
    )]
    GenericDim,
    #[error("head dim D = {d} is too large for the PTX backend: it is padded to {d_pad}, and at most {max} fits the register and shared-memory budget")]
    #[diagnostic(
        code(attnc::ptx::head_dim),
        help("use D <= {max}, or split the heads into smaller ones")
    )]
    HeadDimTooLarge { d: usize, d_pad: usize, max: usize },
    #[error("tile sizes {bq}x{bkv} do not fit the PTX kernel layout")]
    #[diagnostic(
        code(attnc::ptx::tile_size),
        help("use bq = 16, 32, 64 or 128 (16 query rows per warp) and bkv = 16, 32, 64 or 128; `ptx::schedule` picks 64x64 for f16/bf16 (64x32 for f32)")
    )]
    TileSize { bq: usize, bkv: usize },
    #[error(
        "the kernel needs {bytes} bytes of shared memory, but {arch} allows at most {max} per CTA"
    )]
    #[diagnostic(
        code(attnc::ptx::shared_memory),
        help("use smaller tiles (drop `--block` on the command line, or give smaller ones such as `--block 32x32`; `ptx::schedule` picks tiles that fit) or a smaller head dim")
    )]
    SharedMemory {
        bytes: usize,
        max: usize,
        arch: Arch,
    },
    #[error("the PTX backend does not lower this loop nest yet: {what}")]
    #[diagnostic(
        code(attnc::ptx::nest),
        help("the PTX backend lowers one head per tile, with dense K/V or K/V read in place through a page table (`attnc emit --target ptx --page-size P`): run GQA-grouped decode on the CPU (`--backend jit`)")
    )]
    Nest { what: String },
    #[error("the CUDA kernel cannot take this call: {what}")]
    #[diagnostic(
        code(attnc::ptx::launch),
        help("run it on the CPU (`--backend jit`), which takes every call")
    )]
    Launch { what: String },
    #[error(transparent)]
    #[diagnostic(code(attnc::ptx::too_large))]
    TooLarge(#[from] host::TooLarge),
    #[error("the pool on the device does not fit this call: {what}")]
    #[diagnostic(
        code(attnc::ptx::pool),
        help("upload the pool again for this kernel and pool shape (`CudaRuntime::upload_pool`); rows written on the host reach the device through `CudaRuntime::append_pool`")
    )]
    Pool { what: String },
    #[error(transparent)]
    #[diagnostic(transparent)]
    Append(#[from] crate::tensor::AppendError),
}
