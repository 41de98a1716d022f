//! The `attnc` command-line tool.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use attnc::driver::{self, Error, SourceFile, SpecOptions};
use attnc::{npy, Inputs};

#[derive(Parser)]
#[command(
    name = "attnc",
    version,
    about = "An attention compiler: .attn specs of masks and score mods to fused attention kernels"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Parse and check a spec; print every diagnostic. Exits 1 on error.
    #[command(after_help = "Example:\n  attnc check examples/gemma2_local.attn")]
    Check {
        /// The `.attn` file.
        spec: PathBuf,
    },
    /// Run a spec on .npy inputs and write .npy outputs.
    #[command(
        after_help = "Example:\n  attnc run examples/packed_docs.attn --q q.npy --k k.npy --v v.npy \\\n      --buffer doc=doc.npy --out out.npy --lse lse.npy\n\n\
q is float32 [B, H, Q, D]; k and v are float32 [B or 1, HKV, KV, D] (float64 files are converted,\n\
with a note). Buffers are read in their declared type: int from int32/int64, float from\n\
float32/float64, bool from bool.\n\n\
A quick self-check without numpy: random inputs, compared with the reference backend:\n  \
attnc run examples/packed_docs.attn --random --q-len 256 --buffer doc=docs:4 --check"
    )]
    Run(Box<RunArgs>),
    /// Print a compiler stage's output for a spec.
    #[command(
        after_help = "Examples:\n  attnc emit examples/alibi.attn --stage tile\n  attnc emit examples/sliding_window.attn --stage tile --block 32x128 --dim 128 --param window=512\n  attnc emit examples/causal.attn --stage checked\n\n\
Stages: ast (the parsed syntax tree with byte spans; every block of the file unless --entry names\n\
one), checked (the checked spec: typed, names\n\
resolved, with dependences), tile (the optimised loop IR; --stage tile-unopt for the IR before\n\
optimisation). Without --q-len the tile IR is generic over batch, heads and lengths; with --q-len\n\
(and --kv-len, --batch, --heads, --kv-heads, --page-size, --dtype, --kv-dtype) it takes the loop nest\n\
a call of those shapes runs (`--stage nest` prints it alone). It specialises on the\n\
tile sizes (--block, default auto: 128x64 without a mask, 64x64 otherwise, as for `attnc run`) and the head dim (--dim, default 64; `--dim generic` keeps D symbolic)."
    )]
    Emit(Box<EmitArgs>),
    /// Classify the tiles of a spec's mask (full / partial / empty) and draw the block map.
    #[command(
        after_help = "Examples:\n  attnc blocks examples/causal.attn --q-len 4096 --block 128x128\n  \
attnc blocks examples/packed_docs.attn --q-len 1024 --buffer doc=doc.npy --json\n  \
attnc blocks examples/packed_docs.attn --q-len 65536 --kv-len 65536 --buffer doc=docs:8 --block 128\n  \
attnc blocks examples/sliding_window.attn --q-len 8192 --kv-len 8192 --param window=1024 --png map.png\n\n\
Buffers come from .npy files or from recipes (the seed is fixed): docs:N, iota, bernoulli:P,\n\
const:V, uniform, alibi; see `attnc bench --help`.\n\n\
The grid has one character per (query tile, key tile): # full (no mask code), + partial (mask\n\
applied), . empty (skipped). Maps larger than 64 x 128 tiles are folded: a cell then stands for a\n\
rectangle of tiles and shows # if all are full, . if all are empty, + otherwise. The shapes B, H\n\
and HKV (--batch, --heads, --kv-heads; --b and --h are aliases) and D = 1 are used to check buffer\n\
shapes; masks that depend on b or h get one map per (b, h), and the grid shows the one chosen with\n\
--at. --kv-len defaults to --q-len and --block to auto, as for `attnc run` and `attnc bench`."
    )]
    Blocks(Box<BlocksArgs>),
    /// Benchmark a spec on random inputs.
    #[command(
        after_help = "Examples:\n  attnc bench examples/causal.attn --q-len 4096 --heads 8 --dim 64\n  attnc bench examples/packed_docs.attn --q-len 4096 --heads 8 --dim 64 --buffer doc=docs:4 --json\n  attnc bench examples/alibi.attn --q-len 1024 --heads 8 --dim 64 --buffer slope=alibi --backend interp\n  attnc bench examples/causal.attn --q-len 4096 --gemm jit --peak   # efficiency against the f32x4 FMA peak\n\n\
Buffers come from .npy files (`--buffer NAME=FILE.npy`) or recipes (`--buffer NAME=RECIPE`):\n\
docs:N (int: N equal contiguous documents along the last dim), iota (int: 0, 1, 2, ...),\n\
alibi (float: ALiBi slopes 2^(-8(i+1)/n)), uniform (float in [-1, 1)), bernoulli:P (bool),\n\
const:V (any type). GFLOP/s count 4*B*H*Q*KV*D flops (dense) or only visible entries (useful).\n\
--peak times a register-only FMA loop at the tile products' vector width (f32x4 for --gemm jit,\n\
AVX2 or AVX-512 for native) on every thread right before each run, so efficiencies are measured\n\
against the machine's speed at that moment."
    )]
    Bench(Box<BenchArgs>),
}

#[derive(Args)]
struct BlocksArgs {
    #[command(flatten)]
    spec: SpecArgs,
    /// No progress bar (one is drawn on stderr only when it is a terminal).
    #[arg(long, short)]
    quiet: bool,
    /// Number of query rows Q.
    #[arg(long, value_name = "N")]
    q_len: usize,
    /// Number of keys KV (default: Q).
    #[arg(long, value_name = "N")]
    kv_len: Option<usize>,
    /// Tile sizes BQxBKV (or N for NxN), or `auto` (as `attnc run` picks them:
    /// 128x64 for a spec without a mask, 64x64 otherwise).
    #[arg(long, default_value = "auto", value_name = "BQxBKV|auto")]
    block: String,
    /// Absolute position of query row 0.
    #[arg(
        long,
        default_value_t = 0,
        value_name = "N",
        allow_negative_numbers = true
    )]
    q_offset: i64,
    /// Bind a buffer to a .npy file or a recipe: `--buffer doc=doc.npy`,
    /// `--buffer doc=docs:8` (repeatable; recipes as for `attnc bench`).
    #[arg(long = "buffer", value_name = "NAME=FILE.npy|RECIPE")]
    buffers: Vec<String>,
    /// Batch size B (alias: --b).
    #[arg(long, alias = "b", default_value_t = 1, value_name = "B")]
    batch: usize,
    /// A ragged batch: the key length of every sequence, `--kv-lens 40,300,75`
    /// (B is their count, KV the largest); the queries are the last Q
    /// positions of each. `--at B,H` picks the sequence drawn.
    #[arg(long, value_name = "N,N,...", conflicts_with_all = ["batch", "kv_len", "q_offset"])]
    kv_lens: Option<String>,
    /// Number of query heads H (alias: --h).
    #[arg(long, alias = "h", default_value_t = 1, value_name = "H")]
    heads: usize,
    /// Key/value heads HKV, for buffers shaped by HKV (default: H).
    #[arg(long, value_name = "HKV")]
    kv_heads: Option<usize>,
    /// The (b, h) whose map is drawn when maps differ per batch or head.
    #[arg(long, default_value = "0,0", value_name = "B,H")]
    at: String,
    /// Print a JSON object instead of the grid.
    #[arg(long)]
    json: bool,
    /// Also write a PNG picture of the map.
    #[arg(long, value_name = "FILE.png")]
    png: Option<PathBuf>,
    /// Build the maps N times and report the fastest build (and the median).
    #[arg(long, default_value_t = 1, value_name = "N")]
    repeat: usize,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    spec: SpecArgs,
    /// No progress bar (one is drawn on stderr only when it is a terminal).
    #[arg(long, short)]
    quiet: bool,
    /// Query length Q.
    #[arg(long, value_name = "N")]
    q_len: usize,
    /// Key length KV (default: Q).
    #[arg(long, value_name = "N")]
    kv_len: Option<usize>,
    /// Batch size B.
    #[arg(long, default_value_t = 1, value_name = "B")]
    batch: usize,
    /// Query heads H.
    #[arg(long, default_value_t = 8, value_name = "H")]
    heads: usize,
    /// Key/value heads HKV (default: H).
    #[arg(long, value_name = "HKV")]
    kv_heads: Option<usize>,
    /// Head dim D.
    #[arg(long, default_value_t = 64, value_name = "D")]
    dim: usize,
    /// Query offset.
    #[arg(long, default_value_t = 0, value_name = "N")]
    q_offset: i64,
    /// Keep K and V in a paged pool of pages of P slots, in a shuffled order
    /// (as a server's pool is after many requests); the queries are the last
    /// Q positions of each sequence of KV keys.
    #[arg(long, value_name = "P", conflicts_with = "q_offset", value_parser = page_size)]
    page_size: Option<usize>,
    /// Element type of q, k and v: f32, bf16 or f16 (the random inputs are
    /// rounded to it), as for `attnc run`.
    #[arg(long, default_value = "f32", value_name = "f32|bf16|f16")]
    dtype: String,
    /// Element type of K and V (default: --dtype): f32, bf16, f16, int8 or
    /// fp8 (quantized with a scale per (token, KV head)); `kv_bytes` in
    /// --json counts the bytes of that type and of the scales (of the K and V
    /// rows some query sees; `kv_stored_bytes`, of every row stored).
    #[arg(long, value_name = "f32|bf16|f16|int8|fp8")]
    kv_dtype: Option<String>,
    /// Bind a buffer from a file or a recipe: `--buffer doc=docs:4` (repeatable).
    #[arg(long = "buffer", value_name = "NAME=FILE.npy|RECIPE")]
    buffers: Vec<String>,
    /// Which backend runs the spec.
    #[arg(long, value_enum, default_value_t = Backend::Jit)]
    backend: Backend,
    /// Tile products of the jit backend.
    #[arg(long, value_enum, default_value_t = Gemm::Auto)]
    gemm: Gemm,
    /// Worker threads (default: all cores).
    #[arg(long, value_name = "T")]
    threads: Option<usize>,
    /// Tile sizes BQxBKV for the tiled backends, or `auto`: 128x64 for a spec
    /// without a mask, 64x64 otherwise.
    #[arg(long, default_value = "auto", value_name = "BQxBKV|auto")]
    block: String,
    /// Timed runs (the median is reported).
    #[arg(long, default_value_t = 5, value_name = "R")]
    runs: usize,
    /// Untimed warm-up runs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    warmup: usize,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0, value_name = "N")]
    seed: u64,
    /// Before each timed run, measure the FMA peak of the tile products' vector
    /// width on every worker thread at once (jit backend), and report each run's
    /// useful GFLOP/s as a fraction of the peak measured beside it.
    #[arg(long)]
    peak: bool,
    /// After the timed runs, measure the memory read bandwidth by streaming
    /// the arrays of K and V the call reads (the pool, for `--page-size`) with
    /// every worker thread, and report the call's time against the time to
    /// read the K and V rows it must (those some query sees) once at that
    /// rate (`read_gb_per_s`, `memory_ratio` in `--json`).
    #[arg(long)]
    bandwidth: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct EmitArgs {
    #[command(flatten)]
    spec: SpecArgs,
    /// The stage to print (default: tile). Not with --target, which prints
    /// the target's code instead of a stage.
    #[arg(long, value_enum, value_name = "STAGE")]
    stage: Option<Stage>,
    /// Tile sizes BQxBKV (or N for NxN), or `auto` (the default; as `attnc
    /// run` picks them: 128x64 for a spec without a mask, 64x64 otherwise;
    /// with --target ptx, those of `attnc run --backend cuda`: 64x64 for
    /// f16/bf16 up to D = 128, 64x32 for f32 and larger heads). For the
    /// stages from tile-unopt on, and --target ptx.
    #[arg(long, value_name = "BQxBKV|auto")]
    block: Option<String>,
    /// Head dim to specialise on (default 64), or `generic`: for --stage
    /// tile-unopt|tile|nest and --target ptx.
    #[arg(long, value_name = "D|generic")]
    dim: Option<String>,
    /// Exponential base of the softmax in the kernel (default exp2): for
    /// --stage tile-unopt|tile|nest and --target ptx.
    #[arg(long, value_enum)]
    exp: Option<ExpBase>,
    /// Query length: the lengths of `--stage blocks`, or the shapes whose loop
    /// nest --stage tile-unopt|tile|nest prints (with --kv-len, --batch,
    /// --heads, --kv-heads, --page-size, --dtype, --kv-dtype).
    #[arg(long, value_name = "N")]
    q_len: Option<usize>,
    /// With --q-len: key length (default: the query length).
    #[arg(long, value_name = "N")]
    kv_len: Option<usize>,
    /// With --q-len: batch size B (default 1).
    #[arg(long, value_name = "B")]
    batch: Option<usize>,
    /// With --q-len: query heads H (default 8 for the loop nest, 1 for
    /// `--stage blocks`, as `attnc blocks`).
    #[arg(long, value_name = "H")]
    heads: Option<usize>,
    /// With --q-len: key/value heads HKV (default: H).
    #[arg(long, value_name = "HKV")]
    kv_heads: Option<usize>,
    /// With --q-len: K and V in a paged pool (or a ragged batch), read in place.
    /// With --target ptx: the kernel that reads K and V in place through a page
    /// table (a paged pool or ragged rows; the page size is a launch parameter).
    #[arg(long, value_name = "P", value_parser = page_size)]
    page_size: Option<usize>,
    /// Buffers for `--stage blocks`: `NAME=FILE.npy` or a recipe (repeatable).
    #[arg(long = "buffer", value_name = "NAME=FILE.npy|RECIPE")]
    buffers: Vec<String>,
    /// Emit code for a target instead of a stage: `ptx` (CUDA PTX for the loop IR).
    #[arg(long, value_enum)]
    target: Option<Target>,
    /// With --target ptx: the GPU architecture of the PTX, sm_80 (A100, the
    /// default) or sm_90 (H100/H200).
    #[arg(long, value_name = "sm_80|sm_90")]
    arch: Option<String>,
    /// Element type of q, k and v: in the PTX kernel, f32 (FMA), f16 or bf16
    /// (tensor cores), f32 by default as for `attnc run --backend cuda`; with
    /// --q-len, the loop nest a CPU call of that type takes on this CPU
    /// (bf16: products on bf16 pairs where its `vdpbf16ps` outruns its f32
    /// FMAs, timed once per process; `ATTNC_BF16_PAIRS=1|0` overrides).
    #[arg(long, value_name = "f32|f16|bf16")]
    dtype: Option<String>,
    /// With --target ptx: K and V stored as int8 or fp8 with a float32 scale
    /// per row, dequantized to --dtype in the tile loads of the kernel that
    /// reads them in place (the one `attnc run --backend cuda` launches for
    /// them). With --q-len: the stored type of K and V of the call whose loop
    /// nest is printed (f32, bf16, f16, int8 or fp8; default: --dtype).
    #[arg(long, value_name = "int8|fp8 (ptx), f32|bf16|f16|int8|fp8 (--q-len)")]
    kv_dtype: Option<String>,
    /// Write the output to this file instead of stdout.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Target {
    /// CUDA PTX text (one kernel; see docs/ptx.md).
    Ptx,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Stage {
    Ast,
    Checked,
    TileUnopt,
    Tile,
    /// The loop nest around the tile IR: grid, rows, K/V source, key walk,
    /// per-tile steps, finish.
    Nest,
    /// The Cranelift IR of the CPU kernel.
    Clif,
    /// The block map (needs --q-len; same output as `attnc blocks`).
    Blocks,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum ExpBase {
    /// exp2 with log2(e) folded into the query scale.
    Exp2,
    /// Natural exp.
    Exp,
}

/// Parses `auto`, `64x128` or `64` (the `--block` of every subcommand).
fn parse_tiles(text: &str) -> Result<attnc::Tiles, Error> {
    text.parse().map_err(Error::Mask)
}

/// Parses `auto`, `64x128` or `64` into the tile sizes for `program`
/// (`auto` is [`driver::Program::auto_tiling`]).
fn parse_block(text: &str, program: &driver::Program) -> Result<attnc::mask::Tiling, Error> {
    Ok(program.tiling(parse_tiles(text)?))
}

#[derive(Args)]
struct SpecArgs {
    /// The `.attn` file.
    spec: PathBuf,
    /// The attention block to use when the file holds several.
    #[arg(long, value_name = "NAME")]
    entry: Option<String>,
    /// Override a param: `--param window=128` (repeatable).
    #[arg(long = "param", value_name = "NAME=VALUE")]
    params: Vec<String>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    spec: SpecArgs,
    /// Queries, float32 or float64 (converted) [B, H, Q, D].
    #[arg(
        long,
        value_name = "FILE.npy",
        required_unless_present = "random",
        conflicts_with = "random"
    )]
    q: Option<PathBuf>,
    /// Keys, float32 or float64 (converted) [B or 1, HKV, KV, D].
    #[arg(
        long,
        value_name = "FILE.npy",
        required_unless_present_any = ["random", "k_pages"],
        conflicts_with_all = ["random", "k_pages"]
    )]
    k: Option<PathBuf>,
    /// Values, float32 or float64 (converted) [B or 1, HKV, KV, D].
    #[arg(
        long,
        value_name = "FILE.npy",
        required_unless_present_any = ["random", "v_pages"],
        conflicts_with_all = ["random", "v_pages"]
    )]
    v: Option<PathBuf>,
    /// A paged key pool, float32 [num_pages, page_size, HKV, D] (instead of
    /// --k; with --v-pages, --page-table and --kv-lens).
    #[arg(
        long,
        value_name = "FILE.npy",
        requires_all = ["v_pages", "page_table", "kv_lens"],
        conflicts_with = "random"
    )]
    k_pages: Option<PathBuf>,
    /// The paged value pool, the shape of --k-pages.
    #[arg(long, value_name = "FILE.npy", requires = "k_pages")]
    v_pages: Option<PathBuf>,
    /// The page table, int32 [B, max_pages] (or int64 whose used entries fit
    /// int32): row b lists sequence b's pages in order.
    #[arg(long, value_name = "FILE.npy", requires = "k_pages")]
    page_table: Option<PathBuf>,
    /// Keys of every sequence, int32 (or int64) [B]: with a paged pool, or with --k/--v
    /// [B, HKV, KVmax, D] for a ragged batch. The queries are the last Q
    /// positions of each sequence.
    #[arg(long, value_name = "FILE.npy", conflicts_with_all = ["random", "q_offset"])]
    kv_lens: Option<PathBuf>,
    /// Absolute position of key row 0, to compute one block of a larger
    /// attention (merge the blocks' out and lse with `merge_states`).
    #[arg(
        long,
        default_value_t = 0,
        value_name = "N",
        allow_negative_numbers = true
    )]
    kv_offset: i64,
    /// Bind a buffer: `--buffer doc=doc.npy` (repeatable); with --random
    /// also a recipe as for `attnc bench`: `--buffer doc=docs:4`.
    #[arg(long = "buffer", value_name = "NAME=FILE.npy|RECIPE")]
    buffers: Vec<String>,
    /// Run on random q, k and v (uniform in [-1, 1), as `attnc bench` makes
    /// them) of the shapes --q-len, --kv-len, --batch, --heads, --kv-heads,
    /// --dim instead of --q, --k, --v.
    #[arg(long)]
    random: bool,
    /// With --random: query length Q.
    #[arg(
        long,
        value_name = "N",
        conflicts_with = "q",
        required_if_eq("random", "true")
    )]
    q_len: Option<usize>,
    /// With --random: key length KV (default: Q).
    #[arg(long, value_name = "N", conflicts_with = "q")]
    kv_len: Option<usize>,
    /// With --random: batch size B.
    #[arg(long, default_value_t = 1, value_name = "B", conflicts_with = "q")]
    batch: usize,
    /// With --random: query heads H.
    #[arg(long, default_value_t = 8, value_name = "H", conflicts_with = "q")]
    heads: usize,
    /// With --random: key/value heads HKV (default: H).
    #[arg(long, value_name = "HKV", conflicts_with = "q")]
    kv_heads: Option<usize>,
    /// With --random: head dim D.
    #[arg(long, default_value_t = 64, value_name = "D", conflicts_with = "q")]
    dim: usize,
    /// With --random: seed of the random inputs.
    #[arg(long, default_value_t = 0, value_name = "N", conflicts_with = "q")]
    seed: u64,
    /// Also run the reference backend on the same inputs, print the max |diff|
    /// of out and of lse (relative to max(1, |lse|)), and exit 1 when one is
    /// above --tolerance.
    #[arg(long)]
    check: bool,
    /// No progress bar for the reference backend (one is drawn on stderr only
    /// when it is a terminal).
    #[arg(long, short)]
    quiet: bool,
    /// With --check: the largest max |diff| that passes. Default 1e-4, or
    /// 1e-4 + 2^-9 max|v| (over the finite values of the keys the sequences
    /// use) when the call multiplies bf16 pairs (a prefill with q, k and v
    /// all bf16, on the jit or interp backend): it rounds the probabilities
    /// to bf16 for P·V, as FlashAttention does, which moves out by at most
    /// 2^-9 max|v| from the reference's exact f64.
    #[arg(
        long,
        value_name = "T",
        requires = "check",
        allow_negative_numbers = true
    )]
    tolerance: Option<f64>,
    /// Absolute position of query row 0 (for decoding with a KV cache).
    #[arg(
        long,
        default_value_t = 0,
        value_name = "N",
        allow_negative_numbers = true
    )]
    q_offset: i64,
    /// Where to write the output, [B, H, Q, D] in --out-dtype (optional with --check).
    #[arg(long, value_name = "FILE.npy", required_unless_present = "check")]
    out: Option<PathBuf>,
    /// Element type of the --out file: f32 (float32), f16 (float16, `<f2`) or
    /// bf16 (uint16 bit patterns, as bf16 inputs travel: numpy has no bf16),
    /// rounded from the f32 result to nearest, ties to even. lse stays
    /// float32, and --check compares the f32 result.
    #[arg(
        long,
        default_value = "f32",
        value_name = "f32|bf16|f16",
        requires = "out"
    )]
    out_dtype: String,
    /// Also write the log-sum-exp of every row, float32 [B, H, Q].
    #[arg(long, value_name = "FILE.npy")]
    lse: Option<PathBuf>,
    /// Which backend runs the spec.
    #[arg(long, value_enum, default_value_t = Backend::Jit)]
    backend: Backend,
    /// Tile products of the jit backend.
    #[arg(long, value_enum, default_value_t = Gemm::Auto)]
    gemm: Gemm,
    /// Tile sizes BQxBKV for the tiled backends (or N for NxN), or `auto`:
    /// 128x64 for a spec without a mask, 64x64 otherwise.
    #[arg(long, default_value = "auto", value_name = "BQxBKV|auto")]
    block: String,
    /// Element type of q, k and v: f32, bf16 or f16. Every backend reads them
    /// in it: float32/float64 files are rounded to it (nearest, ties to even),
    /// float16 files (with f16) and uint16 files of bf16 bit patterns (with
    /// bf16) are taken as they are. The CPU backends compute in f32 on those
    /// values, except that where the CPU's bf16 dot product (AVX-512 BF16)
    /// outruns its f32 FMAs (timed once per process; `ATTNC_BF16_PAIRS=1|0`
    /// overrides) a bf16 prefill (q, k and v bf16) runs its tile products on
    /// bf16 operands with f32 sums (`vdpbf16ps`) and rounds the probabilities
    /// to bf16 for P·V, as FlashAttention does; the GPU (`--backend cuda`) runs its products in
    /// the type (tensor cores for f16 and bf16).
    #[arg(long, default_value = "f32", value_name = "f32|bf16|f16")]
    dtype: String,
    /// Element type of K and V (default: --dtype): f32, bf16, f16, or a
    /// quantized cache, int8 (symmetric) or fp8 (e4m3fn), with a float32
    /// scale per (token, KV head). Float files are quantized on load (scale =
    /// absmax / 127 or / 448); int8 or uint8 (fp8 bits) files are taken as
    /// they are, with --k-scales and --v-scales. The CPU backends widen K/V
    /// to f32 in the tile loads.
    #[arg(long, value_name = "f32|bf16|f16|int8|fp8")]
    kv_dtype: Option<String>,
    /// float32 scales of stored int8/fp8 keys: [B, HKV, KV] for --k,
    /// [num_pages, page_size, HKV] for --k-pages.
    #[arg(
        long,
        value_name = "FILE.npy",
        requires = "v_scales",
        conflicts_with = "random"
    )]
    k_scales: Option<PathBuf>,
    /// float32 scales of stored int8/fp8 values, the shape of --k-scales.
    #[arg(
        long,
        value_name = "FILE.npy",
        requires = "k_scales",
        conflicts_with = "random"
    )]
    v_scales: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    /// The f64 reference interpreter.
    Reference,
    /// The loop-IR interpreter (f32, tile by tile).
    Interp,
    /// Native code for this CPU, compiled with Cranelift.
    Jit,
    /// An NVIDIA GPU through the CUDA driver (PTX kernels; needs a build with `--features cuda`).
    Cuda,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Gemm {
    /// The fastest tile products on this CPU (native AVX-512/AVX2 where available).
    Auto,
    /// JIT-generated f32x4 tile products (portable) on packed f32 K/V; calls
    /// that read K/V in place (decode, quantized caches) or multiply bf16
    /// pairs run the native products, which have no JIT form.
    Jit,
    /// Native Rust tile products for the detected instruction set.
    Native,
}

fn gemm_impl(g: Gemm) -> attnc::codegen::clif::GemmImpl {
    use attnc::codegen::clif::GemmImpl;
    match g {
        Gemm::Auto => GemmImpl::detect(),
        Gemm::Jit => GemmImpl::Jit,
        Gemm::Native => GemmImpl::Native(attnc::runtime::gemm::NativeIsa::detect()),
    }
}

fn split_assignment(s: &str, flag: &str) -> Result<(String, String), Error> {
    match s.split_once('=') {
        Some((n, v)) if !n.trim().is_empty() => Ok((n.trim().to_string(), v.to_string())),
        _ => Err(Error::Usage(format!(
            "`--{flag} {s}` must have the form NAME=VALUE"
        ))),
    }
}

/// Splits every `--{flag} NAME=VALUE`; a name given twice is an error that
/// names both occurrences.
fn assignments(items: &[String], flag: &str) -> Result<Vec<(String, String)>, Error> {
    let mut seen: Vec<(String, String)> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let (name, value) = split_assignment(item, flag)?;
        if let Some(j) = seen.iter().position(|(n, _)| *n == name) {
            return Err(Error::Usage(format!(
                "`{name}` is set twice: `--{flag} {}` and `--{flag} {item}`; pass it once",
                items[j]
            )));
        }
        debug_assert_eq!(seen.len(), i);
        seen.push((name, value));
    }
    Ok(seen)
}

fn spec_options(args: &SpecArgs) -> Result<SpecOptions, Error> {
    Ok(SpecOptions {
        entry: args.entry.clone(),
        params: assignments(&args.params, "param")?,
    })
}

/// Writes `text` to stdout. When the reader has gone away (`attnc ... | head`),
/// the program ends quietly with status 0: the output that was wanted was read.
fn say(text: impl std::fmt::Display) -> Result<(), Error> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match write!(out, "{text}").and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(Error::Io {
            what: "cannot write to standard output".into(),
            reason: e.to_string(),
        }),
    }
}

/// Writes `text` to stderr, ignoring failure (there is nowhere left to report it).
fn say_err(text: impl std::fmt::Display) {
    use std::io::Write;
    let _ = write!(std::io::stderr().lock(), "{text}");
}

/// Output files written all or nothing: each is written to a temporary file
/// beside its target, and the temporary files are renamed onto their
/// targets only when all were written ([`Staged::commit`]). Dropped without
/// a commit, it removes them. Targets that are not regular files (devices
/// such as `/dev/null`, pipes) cannot be replaced and are written directly.
struct Staged {
    /// (temporary file, target, the flag that named it).
    files: Vec<(PathBuf, PathBuf, &'static str)>,
}

impl Staged {
    fn new() -> Staged {
        Staged { files: Vec::new() }
    }

    /// Checks, before any work, that `targets` are distinct and can be
    /// written: each in an existing directory, none a directory itself.
    fn check_targets(targets: &[(&str, &Path)]) -> Result<(), Error> {
        for (i, (flag, path)) in targets.iter().enumerate() {
            let cannot = |reason: String| Error::Io {
                what: format!("cannot write `{}` ({flag})", path.display()),
                reason,
            };
            if path.is_dir() {
                return Err(cannot("it is a directory".into()));
            }
            let dir = Self::dir_of(path);
            if !dir.is_dir() {
                return Err(cannot(format!(
                    "the directory `{}` does not exist",
                    dir.display()
                )));
            }
            for (other_flag, other) in &targets[..i] {
                if Self::same_target(path, other) {
                    return Err(Error::Usage(format!(
                        "{other_flag} `{}` and {flag} `{}` name the same file; give each output its own path",
                        other.display(),
                        path.display()
                    )));
                }
            }
        }
        Ok(())
    }

    fn dir_of(path: &Path) -> &Path {
        match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        }
    }

    /// Whether two paths name one file: the same name in the same directory,
    /// or one existing file reached twice (links).
    fn same_target(a: &Path, b: &Path) -> bool {
        if a == b {
            return true;
        }
        let dir = |p: &Path| std::fs::canonicalize(Self::dir_of(p)).ok();
        if a.file_name() == b.file_name() && dir(a).is_some() && dir(a) == dir(b) {
            return true;
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
                return (x.dev(), x.ino()) == (y.dev(), y.ino());
            }
        }
        false
    }

    /// Writes `target` (named by `flag`) through `write`, into a temporary
    /// file beside it.
    fn write(
        &mut self,
        flag: &'static str,
        target: &Path,
        write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<(), String>,
    ) -> Result<(), Error> {
        use std::io::Write;
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let cannot = |reason: String| Error::Io {
            what: format!("cannot write `{}` ({flag})", target.display()),
            reason,
        };
        let direct = std::fs::metadata(target).is_ok_and(|m| !m.is_file() && !m.is_dir());
        let path = if direct {
            target.to_path_buf()
        } else {
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let name = target
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "output".into());
            Self::dir_of(target).join(format!(".{name}.attnc-{}-{n}.tmp", std::process::id()))
        };
        let file = if direct {
            std::fs::OpenOptions::new().write(true).open(&path)
        } else {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
        }
        .map_err(|e| cannot(e.to_string()))?;
        if !direct {
            self.files.push((path, target.to_path_buf(), flag));
        }
        let mut w = std::io::BufWriter::new(file);
        write(&mut w).map_err(cannot)?;
        w.flush().map_err(|e| cannot(e.to_string()))
    }

    /// Renames every temporary file onto its target.
    fn commit(mut self) -> Result<(), Error> {
        for (tmp, target, flag) in std::mem::take(&mut self.files) {
            if let Err(e) = std::fs::rename(&tmp, &target) {
                let _ = std::fs::remove_file(&tmp);
                return Err(Error::Io {
                    what: format!("cannot write `{}` ({flag})", target.display()),
                    reason: e.to_string(),
                });
            }
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        for (tmp, _, _) in &self.files {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Writes `text` to `output` (all or nothing), or to stdout without one.
fn deliver(output: Option<&Path>, text: &str) -> Result<(), Error> {
    match output {
        Some(path) => {
            Staged::check_targets(&[("-o", path)])?;
            let mut staged = Staged::new();
            staged.write("-o", path, |w| {
                use std::io::Write;
                w.write_all(text.as_bytes()).map_err(|e| e.to_string())
            })?;
            staged.commit()
        }
        None => say(text),
    }
}

/// Parses a count flag that must be at least 1 (and at most `max`).
fn count(flag: &str, n: usize, max: usize) -> Result<usize, Error> {
    if n == 0 {
        return Err(Error::Usage(format!(
            "`--{flag} 0`: {flag} must be at least 1"
        )));
    }
    if n > max {
        return Err(Error::Usage(format!(
            "`--{flag} {n}`: {flag} must be at most {max}"
        )));
    }
    Ok(n)
}

/// The most worker threads `bench --threads` starts.
const MAX_THREADS: usize = 1024;

/// The memory-estimate kind of a CPU backend.
fn memory_backend(b: Backend) -> Option<attnc::memory::Backend> {
    use attnc::memory::Backend as M;
    match b {
        Backend::Reference => Some(M::Reference),
        Backend::Interp => Some(M::Interp),
        Backend::Jit => Some(M::Jit),
        Backend::Cuda => None,
    }
}

/// Adds to `need` what random inputs of `shapes` take: q, k, v, and the
/// buffers made from recipes (`attnc bench`, `attnc run --random`).
fn random_inputs_need(
    need: &mut attnc::memory::Estimate,
    program: &driver::Program,
    shapes: &attnc::sema::eval::Shapes,
    buffer_shapes: &attnc::sema::eval::Shapes,
    buffers: &[(String, String)],
) {
    use attnc::memory;
    let (b, h, hkv, q, kv, d) = (
        shapes.b, shapes.h, shapes.hkv, shapes.q, shapes.kv, shapes.d,
    );
    need.array("q", &[b, h, q, d], 4)
        .array("k", &[b, hkv, kv, d], 4)
        .array("v", &[b, hkv, kv, d], 4);
    for (name, source) in buffers {
        if let (Some(id), false) = (program.spec.buffer_id(name), source.ends_with(".npy")) {
            let decl = program.spec.buffer(id);
            // An undefined dimension is reported when the buffer is bound.
            let dims = buffer_shapes.buffer_shape(decl).unwrap_or_default();
            need.array(
                &format!("buffer `{name}`"),
                &dims,
                memory::elem_bytes(decl.elem),
            );
        }
    }
}

/// Adds to `need` the copies random inputs take in other element types: q
/// rounded (kept as f32), K and V stored as `kv_elem` (with their scales).
fn typed_inputs_need(
    need: &mut attnc::memory::Estimate,
    shapes: &attnc::sema::eval::Shapes,
    q_elem: attnc::ElemType,
    kv_elem: attnc::ElemType,
) {
    let sh = shapes;
    if q_elem != attnc::ElemType::F32 {
        need.array(
            &format!("q rounded to {q_elem}"),
            &[sh.b, sh.h, sh.q, sh.d],
            4,
        );
    }
    if kv_elem != attnc::ElemType::F32 {
        let rows = [2, sh.b, sh.hkv, sh.kv];
        need.array(
            &format!("k and v in {kv_elem}"),
            &[rows[0], rows[1], rows[2], rows[3], sh.d],
            kv_elem.size(),
        );
        if kv_elem.is_quantized() {
            need.array("their scales", &rows, 4);
        }
    }
}

/// Says once on stderr that `path` held float64 data that was converted.
fn note_converted(path: &Path) {
    say_err(format_args!(
        "note: {} is float64; converted to float32\n",
        path.display()
    ));
}

/// Binds every `--buffer NAME=SOURCE`: SOURCE is a .npy file (float64 data of
/// a float buffer is converted, with a note), or, where `rng` is given and
/// SOURCE does not end in `.npy`, a recipe of `attnc bench` for `shapes`.
fn bind_buffers(
    inputs: &mut Inputs<'_>,
    program: &driver::Program,
    shapes: &attnc::sema::eval::Shapes,
    buffers: Vec<(String, String)>,
    mut rng: Option<&mut attnc::bench::Rng>,
) -> Result<(), Error> {
    for (name, source) in buffers {
        if program.bind_buffer(inputs, shapes, &name, &source, rng.as_deref_mut())? {
            note_converted(Path::new(&source));
        }
    }
    Ok(())
}

/// An error naming the first declared buffer that `inputs` does not bind,
/// with the flag that binds it.
fn require_all_buffers(program: &driver::Program, inputs: &Inputs<'_>) -> Result<(), Error> {
    if let Some(missing) = program
        .spec
        .buffers
        .iter()
        .find(|b| !inputs.buffers.contains_key(&b.name))
    {
        return Err(Error::Usage(format!(
            "buffer `{}` is not bound: pass `--buffer {}=FILE.npy` or a recipe such as `--buffer {}={}`",
            missing.name,
            missing.name,
            missing.name,
            match missing.elem {
                attnc::sema::Type::Int => "docs:4",
                attnc::sema::Type::Float => "uniform",
                attnc::sema::Type::Bool => "bernoulli:0.5",
            }
        )));
    }
    Ok(())
}

/// A progress bar on stderr of `total` units, or `None` under `--quiet` or
/// when stderr is not a terminal (a log or a pipe gets no bar).
fn progress_bar(quiet: bool, what: &str, unit: &str, total: u64) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if quiet || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    let style = indicatif::ProgressStyle::with_template(&format!(
        "{{msg}} [{{bar:30}}] {{pos}}/{{len}} {unit} ({{elapsed}}, about {{eta}} left)"
    ))
    .expect("a valid template");
    bar.set_style(style.progress_chars("=> "));
    bar.set_message(what.to_string());
    bar.tick(); // drawn at once, not only after the first step
    Some(bar)
}

/// Moves `bar` (when one is drawn) to `done` of `total`.
fn show(bar: &Option<indicatif::ProgressBar>, done: u64, total: u64) {
    if let Some(bar) = bar {
        bar.set_length(total);
        bar.set_position(done);
    }
}

/// Runs the reference backend with a progress bar over its rows (the
/// reference is slow: f64, one thread).
fn run_with_progress(
    program: &driver::Program,
    backend: driver::Backend,
    inputs: &Inputs<'_>,
    quiet: bool,
) -> Result<attnc::Outputs, Error> {
    let (what, unit) = match backend {
        driver::Backend::Reference => ("reference", "rows"),
        _ => ("block map", "query tiles"),
    };
    let bar = progress_bar(quiet, what, unit, 0);
    let result = program.run_on(backend, inputs, &mut |done, total| {
        show(&bar, done, total);
        if let (Some(bar), driver::Backend::Jit { .. }, true) = (&bar, backend, done == total) {
            bar.finish_and_clear(); // the block maps are built; the run goes on
        }
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    result
}

/// Refuses `--gemm` off the jit backend and `--block` off the tiled CPU
/// backends (jit, interp), which would otherwise be ignored.
fn backend_flags(backend: Backend, gemm: Gemm, block: &str) -> Result<(), Error> {
    if gemm != Gemm::Auto && !matches!(backend, Backend::Jit) {
        return Err(Error::Usage(format!(
            "`--gemm` picks the jit backend's tile products, and this is the {} backend: drop it or use `--backend jit`",
            backend_name(backend)
        )));
    }
    // `auto` as the tile parser reads it (surrounding spaces included).
    let fixed = block.parse::<attnc::Tiles>().ok() != Some(attnc::Tiles::Auto);
    if fixed && !matches!(backend, Backend::Jit | Backend::Interp) {
        return Err(Error::Usage(format!(
            "`--block` sets the tiles of the tiled CPU backends (jit, interp), and the {} backend takes none: drop it",
            backend_name(backend)
        )));
    }
    Ok(())
}

/// The library backend `--backend` names, with the tile sizes, tile
/// products and element type the flags give.
fn library_backend(
    backend: Backend,
    tiling: Option<attnc::mask::Tiling>,
    gemm: Gemm,
    dtype: &str,
) -> Result<driver::Backend, Error> {
    let tiles = tiling.map_or(attnc::Tiles::Auto, attnc::Tiles::Fixed);
    Ok(match backend {
        Backend::Reference => driver::Backend::Reference,
        Backend::Interp => driver::Backend::Interp(tiles),
        Backend::Jit => driver::Backend::Jit {
            tiles,
            gemm: gemm_impl(gemm),
        },
        Backend::Cuda => driver::Backend::Cuda(dtype.parse().map_err(Error::Usage)?),
    })
}

/// The loop nest a CPU call of `shapes` takes with K/V in a pool of pages
/// (`paged`) or dense, as `bench`, `emit` and `run` make them from their flags.
fn flags_nest(
    shapes: &attnc::sema::eval::Shapes,
    paged: bool,
    q_elem: attnc::ElemType,
    kv_elem: attnc::ElemType,
    tiling: attnc::mask::Tiling,
) -> driver::NestShape {
    driver::nest_for_shapes(
        shapes,
        paged,
        q_elem,
        kv_elem,
        tiling,
        driver::default_bf16_pairs(),
    )
}

/// K and V `[B, HKV, KV, D]` moved into a pool of pages of `ps` slots in a
/// shuffled order, with its page table and the lengths (every sequence KV).
/// The dense copies are dropped by the caller's scope; the pool holds the
/// same values.
#[allow(clippy::type_complexity)]
fn paged_pool(
    k: &ndarray::Array4<f32>,
    v: &ndarray::Array4<f32>,
    ps: usize,
    rng: &mut attnc::bench::Rng,
) -> Result<
    (
        ndarray::Array4<f32>,
        ndarray::Array4<f32>,
        ndarray::Array2<i32>,
        ndarray::Array1<i32>,
    ),
    Error,
> {
    if ps == 0 {
        return Err(Error::Usage(
            "`--page-size 0`: a page holds at least one slot".into(),
        ));
    }
    let (b, hkv, n, d) = k.dim();
    let per_seq = n.div_ceil(ps);
    let mut order: Vec<usize> = (0..b * per_seq).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    let mut kp = ndarray::Array4::<f32>::zeros((b * per_seq, ps, hkv, d));
    let mut vp = kp.clone();
    let mut table = ndarray::Array2::<i32>::zeros((b, per_seq.max(1)));
    for bi in 0..b {
        for p in 0..per_seq {
            let page = order[bi * per_seq + p];
            table[[bi, p]] = page as i32;
            for slot in 0..ps.min(n - p * ps) {
                for kh in 0..hkv {
                    let j = p * ps + slot;
                    kp.slice_mut(ndarray::s![page, slot, kh, ..])
                        .assign(&k.slice(ndarray::s![bi, kh, j, ..]));
                    vp.slice_mut(ndarray::s![page, slot, kh, ..])
                        .assign(&v.slice(ndarray::s![bi, kh, j, ..]));
                }
            }
        }
    }
    let lens = ndarray::Array1::from_elem(b, n as i32);
    Ok((kp, vp, table, lens))
}

fn bench(args: BenchArgs) -> Result<(), Error> {
    use attnc::bench::{measure, BenchConfig, PeakProbe, Rng};
    let t0 = std::time::Instant::now();
    if matches!(args.backend, Backend::Cuda) {
        return Err(Error::Usage(
            "`bench` measures the CPU backends; GPU benchmarks are in scripts/gpu-check.sh".into(),
        ));
    }
    count("runs", args.runs, usize::MAX)?;
    count("batch", args.batch, usize::MAX)?;
    count("heads", args.heads, usize::MAX)?;
    let kv_heads = count("kv-heads", args.kv_heads.unwrap_or(args.heads), usize::MAX)?;
    heads_divide(args.heads, kv_heads)?;
    call_shapes_fit(
        args.batch,
        args.heads,
        args.q_len,
        args.kv_len.unwrap_or(args.q_len),
        args.page_size,
    )?;
    backend_flags(args.backend, args.gemm, &args.block)?;
    if args.bandwidth && [args.batch, kv_heads, args.kv_len.unwrap_or(args.q_len)].contains(&0) {
        return Err(Error::Usage(format!(
            "`--bandwidth` streams the call's K and V, and they hold no bytes (B={} HKV={kv_heads} \
             KV={}): drop it, or give keys",
            args.batch,
            args.kv_len.unwrap_or(args.q_len)
        )));
    }
    let (q_elem, kv_elem) = elem_types(&args.dtype, args.kv_dtype.as_deref())?;
    let threads = args
        .threads
        .map(|t| count("threads", t, MAX_THREADS))
        .transpose()?;
    let buffers = assignments(&args.buffers, "buffer")?;
    let program = driver::load(
        SourceFile::read(&args.spec.spec)?,
        &spec_options(&args.spec)?,
    )?;
    let tiling = parse_block(&args.block, &program)?;
    let attnc::mask::Tiling { bq, bkv } = tiling;
    if let Some(t) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .map_err(|e| Error::Usage(format!("cannot start {t} threads: {e}")))?;
    }
    let config = BenchConfig {
        batch: args.batch,
        heads: args.heads,
        kv_heads,
        q_len: args.q_len,
        kv_len: args.kv_len.unwrap_or(args.q_len),
        dim: args.dim,
        q_offset: args.q_offset,
        runs: args.runs,
        warmup: args.warmup,
        seed: args.seed,
        kv_elem,
    };
    let shapes = attnc::sema::eval::Shapes {
        b: config.batch,
        h: config.heads,
        hkv: config.kv_heads,
        q: config.q_len,
        kv: config.kv_len,
        d: config.dim,
    };
    // `KV` in buffer shapes is the call's: past the keys, the query end
    // q_offset + Q (docs/language.md), as binding checks them. (A paged pool
    // has no query offset and, checked above, at least Q keys.)
    let buffer_shapes = attnc::sema::eval::Shapes {
        kv: positions_end(0, config.kv_len, config.q_offset, config.q_len),
        ..shapes
    };
    // Everything sized by the flags is estimated before anything is allocated.
    {
        let backend = memory_backend(args.backend).expect("a CPU backend");
        use attnc::memory;
        let mut need = memory::run_estimate(
            &program.spec,
            &shapes,
            config.kv_len,
            backend,
            tiling,
            rayon::current_num_threads(),
            flags_nest(&shapes, args.page_size.is_some(), q_elem, kv_elem, tiling).1,
        );
        random_inputs_need(&mut need, &program, &shapes, &buffer_shapes, &buffers);
        typed_inputs_need(&mut need, &shapes, q_elem, kv_elem);
        if let Some(ps) = args.page_size {
            // The pool is made beside the dense rows it is filled from.
            let pages = args.batch.saturating_mul(config.kv_len.div_ceil(ps.max(1)));
            let pool = [pages, ps, kv_heads, args.dim];
            need.array("k pages", &pool, 4).array("v pages", &pool, 4);
        }
        if program.spec.mask.is_some() {
            let tiles = attnc::mask::Tiling::new(64, 64).expect("64x64 is a valid tiling");
            memory::block_maps(&mut need, &program.spec, &shapes, tiles);
        }
        need.check(format_args!(
            "`attnc bench` on {} with {tiling} tiles",
            memory::shapes_text(&shapes)
        ))?;
    }
    let schedule = attnc::tile::Schedule {
        tiling,
        dim: Some(args.dim),
        exp2: true,
        ..attnc::tile::Schedule::default()
    };
    if matches!(args.backend, Backend::Interp) {
        let _ = program.kernel(&schedule);
    }
    let jit = match args.backend {
        Backend::Jit => Some(program.compile_jit(tiling, gemm_impl(args.gemm))?),
        _ => None,
    };
    let compile_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut rng = Rng::new(config.seed);
    let (q, k, v) = rng.qkv(&shapes);
    let q = match q_elem {
        attnc::ElemType::F32 => q,
        _ => attnc::tensor::round_to(q.view(), q_elem),
    };
    // The pool (when paged) replaces the dense rows, then both are stored
    // in the K/V type.
    let (k, v, pages) = match args.page_size {
        None => (k, v, None),
        Some(ps) => {
            let (kp, vp, table, lens) = paged_pool(&k, &v, ps, &mut rng)?;
            (kp, vp, Some((table, lens)))
        }
    };
    let (k, v) = (
        attnc::KvArray::from_f32(k, kv_elem),
        attnc::KvArray::from_f32(v, kv_elem),
    );
    let mut inputs = match &pages {
        None => Inputs::new(q.view(), k.view(), v.view()).q_offset(config.q_offset),
        Some((table, lens)) => {
            Inputs::paged(q.view(), k.view(), v.view(), table.view(), lens.view())
        }
    }
    .q_elem(q_elem);
    bind_buffers(
        &mut inputs,
        &program,
        &buffer_shapes,
        buffers,
        Some(&mut rng),
    )?;
    require_all_buffers(&program, &inputs)?;
    let bound = attnc::bind::bind(&program.spec, &inputs)?;
    // The products this call runs: `--gemm jit` has no JIT-generated form
    // of the in-place or bf16 pair products, which run natively.
    let products = jit.as_ref().map(|jit| jit.products_for(&bound));
    let backend_name = match args.backend {
        Backend::Reference => "reference".to_string(),
        Backend::Interp => format!("interp ({bq}x{bkv} tiles)"),
        Backend::Jit => format!(
            "jit ({}, {bq}x{bkv} tiles)",
            products.map(|p| p.name()).unwrap_or_default()
        ),
        Backend::Cuda => unreachable!("rejected above"),
    };
    let probe =
        match (products, args.peak) {
            (_, false) => None,
            (Some(products), true) => Some(products.fma_peak()?),
            (None, true) => return Err(Error::Usage(
                "`--peak` measures the jit backend's tile products: drop it or use `--backend jit`"
                    .into(),
            )),
        };
    let peak = probe.map(|probe| PeakProbe {
        name: probe.name().to_string(),
        measure: Box::new(move || {
            // About 10 ms per thread on a 50 GFLOP/s core: short beside the run,
            // long enough to see the machine's state at that moment.
            rayon::broadcast(|_| probe.measure(250_000, 20))
                .iter()
                .sum()
        }),
    });
    let bar = progress_bar(
        args.quiet,
        &format!("bench {backend_name}"),
        "runs",
        (config.warmup + config.runs) as u64,
    );
    let report = measure(
        &program,
        &backend_name,
        &config,
        &inputs,
        compile_ms,
        peak,
        |i| {
            let r = match args.backend {
                Backend::Reference => program.run_reference(i),
                Backend::Interp => program.run_interp(i, tiling),
                Backend::Jit => jit.as_ref().expect("compiled above").run(i),
                Backend::Cuda => unreachable!("rejected above"),
            };
            if let Some(bar) = &bar {
                bar.inc(1);
            }
            r
        },
    );
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let mut report = report?;
    // The nest the tiled backend ran (the jit kernel's choice of bf16 pairs;
    // the interpreter's is the host's).
    if let Some(t) = matches!(args.backend, Backend::Interp | Backend::Jit).then_some(tiling) {
        let pairs = jit
            .as_ref()
            .map_or_else(driver::default_bf16_pairs, |j| j.bf16_pairs());
        let (rows, kv) = driver::nest_for(&bound, t, pairs);
        report.nest = Some(format!("rows {}, kv {}", rows.name(), kv.name()));
    }
    if args.bandwidth {
        let (k, v) = (k.bytes(), v.bytes());
        let arrays: Vec<&[u8]> = k.iter().chain(&v).map(|b| &**b).collect();
        report = attnc::bench::with_memory(report, &arrays, args.runs.max(5));
    }
    if args.json {
        say(format_args!("{}\n", report.to_json()))
    } else {
        say(format_args!("{report}\n"))
    }
}

/// A `--page-size`: a page holds at least one slot.
fn page_size(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("a page holds at least one slot".into()),
        Ok(p) => Ok(p),
        Err(e) => Err(e.to_string()),
    }
}

/// Checks that `attnc run` names its K/V one way: `--k` and `--v`, or a
/// paged pool (`--k-pages`, `--v-pages`, `--page-table`, with `--kv-lens`),
/// or `--random`. clap's `requires` does not hold these together once
/// `--kv-lens` is given, so they are checked here.
fn kv_source_flags(args: &RunArgs) -> Result<(), Error> {
    if args.random {
        return Ok(());
    }
    let usage = |what: String| Err(Error::Usage(what));
    let given = |flags: &[(&str, bool)]| -> Vec<String> {
        flags
            .iter()
            .filter(|(_, on)| *on)
            .map(|(n, _)| format!("--{n}"))
            .collect()
    };
    let dense = given(&[("k", args.k.is_some()), ("v", args.v.is_some())]);
    let pool = [
        ("k-pages", args.k_pages.is_some()),
        ("v-pages", args.v_pages.is_some()),
        ("page-table", args.page_table.is_some()),
    ];
    let paged = given(&pool);
    if !paged.is_empty() {
        if !dense.is_empty() {
            return usage(format!(
                "{} with {}: K/V come either as --k/--v or as a paged pool (--k-pages, --v-pages, --page-table)",
                dense.join(" "),
                paged.join(" ")
            ));
        }
        let missing = given(&pool.map(|(n, on)| (n, !on)));
        if !missing.is_empty() {
            return usage(format!(
                "a paged pool needs --k-pages, --v-pages and --page-table; {} missing",
                missing.join(", ")
            ));
        }
        if args.kv_lens.is_none() {
            return usage("a paged pool needs --kv-lens (the keys of each sequence)".into());
        }
    } else if dense.len() < 2 {
        return usage(
            "give K/V as --k and --v, or as a paged pool (--k-pages, --v-pages, --page-table, --kv-lens), or use --random".into(),
        );
    }
    Ok(())
}

fn run(cmd: Command) -> Result<(), Error> {
    match cmd {
        Command::Bench(args) => bench(*args),
        Command::Emit(args) => {
            let output = args.output.clone();
            if let Some(path) = &output {
                Staged::check_targets(&[("-o", path)])?;
            }
            let text = emit(*args)?;
            deliver(output.as_deref(), &text)
        }
        Command::Blocks(args) => {
            let text = blocks(*args)?;
            say(text)
        }
        Command::Check { spec } => {
            let file = std::sync::Arc::new(SourceFile::read(&spec)?);
            let module = driver::check(&file)?;
            let names: Vec<&str> = module.specs.iter().map(|s| s.name.as_str()).collect();
            let mut notes = String::new();
            for s in &module.specs {
                let program = driver::Program {
                    file: file.clone(),
                    spec: s.clone(),
                };
                if let Some(note) = probe_fallback(&program) {
                    notes += &format!("{}: {note}\n", s.name);
                }
            }
            say(format_args!(
                "{}: ok ({} attention block{}: {})\n{notes}",
                spec.display(),
                names.len(),
                if names.len() == 1 { "" } else { "s" },
                names.join(", ")
            ))
        }
        Command::Run(args) => run_spec(*args),
    }
}

/// Shapes of the block-map probe of `attnc check`.
const PROBE_LEN: usize = 2048;

/// `attnc check`'s probe of the block-map analysis: the mask of a spec that
/// declares no buffer is classified at Q = KV = [`PROBE_LEN`] in 64x64 tiles (B = H =
/// 1), and a fallback to element evaluation is reported with the
/// sub-expression that caused it. A spec with buffers needs their data (and
/// a mask that reads them depends on it): `attnc blocks` with the data says
/// it there. A mask that fails at
/// some element of the probe is left to the run to report.
fn probe_fallback(program: &driver::Program) -> Option<String> {
    let spec = &program.spec;
    if spec.mask.is_none() || !spec.mask_buffers().is_empty() || !spec.buffers.is_empty() {
        return None;
    }
    let one = ndarray::Array4::<f32>::zeros((1, 1, 1, 1));
    let view = one.broadcast((1, 1, PROBE_LEN, 1))?;
    let inputs = Inputs::new(view, view, view);
    let bound = attnc::bind::bind(spec, &inputs).ok()?;
    let tiling = attnc::mask::Tiling::new(64, 64).ok()?;
    let maps = attnc::mask::classify(spec, &bound, tiling).ok()?;
    program
        .fallback_note(&maps)
        .map(|n| format!("{n} (probed at Q = KV = {PROBE_LEN}, 64x64 tiles)"))
}

/// Refuses `--heads` that `--kv-heads` does not divide (both at least 1).
fn heads_divide(heads: usize, kv_heads: usize) -> Result<(), Error> {
    if heads.is_multiple_of(kv_heads) {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "--heads {heads} is not a multiple of --kv-heads {kv_heads}: each key/value head serves H / HKV query heads"
    )))
}

/// `KV` of a call (docs/language.md): the end of the positions it covers,
/// `max(kv_offset + key rows, q_offset + Q)`, which sizes the buffers
/// indexed by position.
fn positions_end(kv_offset: i64, kv_rows: usize, q_offset: i64, q: usize) -> usize {
    let start = |offset: i64| offset.max(0) as usize;
    start(kv_offset)
        .saturating_add(kv_rows)
        .max(start(q_offset).saturating_add(q))
}

/// Refuses shapes no call can have: lengths and sizes past the position
/// limit (2^31 - 1, as binding refuses them) and, on a paged pool, fewer keys
/// than queries (the queries are the last Q positions of each sequence).
fn call_shapes_fit(
    batch: usize,
    heads: usize,
    q_len: usize,
    kv_len: usize,
    page_size: Option<usize>,
) -> Result<(), Error> {
    let limit = attnc::sema::POSITION_LIMIT as usize;
    for (flag, n) in [
        ("--batch", batch),
        ("--heads", heads),
        ("--q-len", q_len),
        ("--kv-len", kv_len),
    ] {
        if n > limit {
            return Err(Error::Usage(format!(
                "`{flag} {n}` is past the limit of {limit} (2^31 - 1): split the call into smaller ones"
            )));
        }
    }
    if page_size.is_some() && kv_len < q_len {
        return Err(Error::Usage(format!(
            "--kv-len {kv_len} is shorter than --q-len {q_len}: on a paged pool the queries are \
             the last Q positions of each sequence, so it holds at least Q keys"
        )));
    }
    Ok(())
}

/// A stage's name on the command line (`tile-unopt`).
fn stage_name(stage: &Stage) -> String {
    stage
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

/// Refuses an `attnc emit` flag that the stage or target asked for would
/// ignore, naming where it applies.
fn check_emit_flags(args: &EmitArgs) -> Result<(), Error> {
    use Stage::*;
    let stage = args.stage.unwrap_or(Tile);
    let ptx = args.target == Some(Target::Ptx);
    // Where each flag acts, and the text that says so.
    let nest = matches!(stage, TileUnopt | Tile | Nest);
    let tiles = (
        ptx || nest || matches!(stage, Clif | Blocks),
        "--stage tile-unopt|tile|nest|clif|blocks and --target ptx",
    );
    let kernel = (ptx || nest, "--stage tile-unopt|tile|nest and --target ptx");
    let call_types = (
        ptx || nest,
        "--target ptx, and the loop nest of --stage tile-unopt|tile|nest with --q-len",
    );
    let call_shapes = (
        !ptx && (stage == Blocks || nest),
        "--stage blocks, and the loop nest of --stage tile-unopt|tile|nest",
    );
    let flags = [
        ("--block", args.block.is_some(), tiles),
        ("--dim", args.dim.is_some(), kernel),
        ("--exp", args.exp.is_some(), kernel),
        ("--arch", args.arch.is_some(), (ptx, "--target ptx")),
        ("--page-size", args.page_size.is_some(), call_types),
        ("--dtype", args.dtype.is_some(), call_types),
        ("--kv-dtype", args.kv_dtype.is_some(), call_types),
        ("--q-len", args.q_len.is_some(), call_shapes),
        ("--kv-len", args.kv_len.is_some(), call_shapes),
        ("--batch", args.batch.is_some(), call_shapes),
        ("--heads", args.heads.is_some(), call_shapes),
        ("--kv-heads", args.kv_heads.is_some(), call_shapes),
        (
            "--buffer",
            !args.buffers.is_empty(),
            (!ptx && stage == Blocks, "--stage blocks"),
        ),
    ];
    let what = if ptx {
        "`--target ptx`".to_string()
    } else {
        format!("`--stage {}`", stage_name(&stage))
    };
    for (flag, given, (applies, applies_to)) in flags {
        if given && !applies {
            return Err(Error::Usage(format!(
                "`{flag}` has no effect on {what}: drop it (it applies to {applies_to})"
            )));
        }
    }
    // A call's shapes, types and pool size pick its loop nest: without
    // --q-len there is no call.
    if !ptx && args.q_len.is_none() {
        let ptx_too = "; `--target ptx` prints the PTX kernel for it";
        for (flag, given, also) in [
            ("--page-size", args.page_size.is_some(), ptx_too),
            ("--dtype", args.dtype.is_some(), ptx_too),
            ("--kv-dtype", args.kv_dtype.is_some(), ptx_too),
            ("--kv-len", args.kv_len.is_some(), ""),
            ("--batch", args.batch.is_some(), ""),
            ("--heads", args.heads.is_some(), ""),
            ("--kv-heads", args.kv_heads.is_some(), ""),
        ] {
            if given {
                return Err(Error::Usage(format!(
                    "`{flag}` describes a call: pass `--q-len N` too (and --kv-len, --batch, \
                     --heads, --kv-heads) for the loop nest a call of those shapes takes or, \
                     with `--stage blocks`, its block map{also}"
                )));
            }
        }
    }
    Ok(())
}

/// `attnc emit`: the text of the stage or target asked for.
fn emit(args: EmitArgs) -> Result<String, Error> {
    if args.target == Some(Target::Ptx) {
        if let Some(stage) = args.stage {
            let stages: Vec<String> = Stage::value_variants().iter().map(stage_name).collect();
            return Err(Error::Usage(format!(
                "`--target ptx` prints PTX text, not a compiler stage: drop `--stage {}`, or drop \
                 `--target ptx` to print a stage (--stage {})",
                stage_name(&stage),
                stages.join("|")
            )));
        }
        check_emit_flags(&args)?;
        return emit_ptx(args);
    }
    check_emit_flags(&args)?;
    let stage = args.stage.unwrap_or(Stage::Tile);
    if stage == Stage::Blocks {
        let Some(q_len) = args.q_len else {
            return Err(Error::Usage("`--stage blocks` needs the lengths: pass `--q-len N` (and `--kv-len N` if different)".into()));
        };
        return blocks(BlocksArgs {
            spec: args.spec,
            quiet: false,
            q_len,
            kv_len: args.kv_len,
            block: args.block.unwrap_or_else(|| "auto".into()),
            q_offset: 0,
            buffers: args.buffers,
            batch: args.batch.unwrap_or(1),
            kv_lens: None,
            heads: args.heads.unwrap_or(1),
            kv_heads: args.kv_heads,
            at: "0,0".into(),
            json: false,
            png: None,
            repeat: 1,
        });
    }
    let file = SourceFile::read(&args.spec.spec)?;
    if stage == Stage::Ast {
        // The parse of the whole file, or of the block --entry names: an
        // unknown --entry is the same error as on every other stage.
        let file = std::sync::Arc::new(file);
        let mut ast = driver::parse(&file)?;
        if let Some(name) = &args.spec.entry {
            let available: Vec<String> =
                ast.attentions.iter().map(|a| a.name.name.clone()).collect();
            ast.attentions.retain(|a| a.name.name == *name);
            if ast.attentions.is_empty() {
                return Err(Error::Spec {
                    file,
                    problems: vec![driver::SpecProblem::Entry(
                        attnc::sema::EntryError::Unknown {
                            name: name.clone(),
                            available: available.join(", "),
                        },
                    )],
                });
            }
        }
        return Ok(ast.to_string());
    }
    let program = driver::load(file, &spec_options(&args.spec)?)?;
    if stage == Stage::Checked {
        return Ok(program.spec.to_string());
    }
    let tiles = parse_tiles(args.block.as_deref().unwrap_or("auto"))?;
    let tiling = program.tiling(tiles);
    let bkv = tiling.bkv;
    let dim = match args.dim.as_deref().unwrap_or("64") {
        "generic" => None,
        d => match d.parse::<usize>() {
            Ok(d) if d > 0 => Some(d),
            _ => {
                return Err(Error::Usage(format!(
                    "`--dim {d}` must be a positive integer or `generic`"
                )))
            }
        },
    };
    // With shapes, the loop nest a call of those shapes takes.
    let mut chosen = String::new();
    let (rows, kv) = match args.q_len {
        None => (Default::default(), Default::default()),
        Some(q_len) => {
            let (batch, heads) = (args.batch.unwrap_or(1), args.heads.unwrap_or(8));
            let hkv = args.kv_heads.unwrap_or(heads);
            if heads == 0 || hkv == 0 || !heads.is_multiple_of(hkv) || batch == 0 {
                return Err(Error::Usage(format!(
                    "--heads {heads} and --kv-heads {hkv} (and --batch {batch}) must be at least 1, with H a multiple of HKV",
                )));
            }
            let kv_len = args.kv_len.unwrap_or(q_len);
            call_shapes_fit(batch, heads, q_len, kv_len, args.page_size)?;
            let shapes = attnc::sema::eval::Shapes {
                b: batch,
                h: heads,
                hkv,
                q: q_len,
                kv: kv_len,
                d: dim.unwrap_or(64),
            };
            let (q_elem, kv_elem) = elem_types(
                args.dtype.as_deref().unwrap_or("f32"),
                args.kv_dtype.as_deref(),
            )?;
            let nest = flags_nest(&shapes, args.page_size.is_some(), q_elem, kv_elem, tiling);
            let threads = rayon::current_num_threads();
            let walks = match nest.0 {
                attnc::tile::nest::RowMap::GqaGroup => Some(batch * hkv),
                attnc::tile::nest::RowMap::AllHeads => Some(batch),
                attnc::tile::nest::RowMap::OneHead => None,
            };
            let split = match walks {
                Some(walks) => format!(
                    "; each key walk split into at most {} chunk(s) on {threads} threads (that many \
                     for a walk of all {} key tiles; a call splits the tiles its mask lets a walk \
                     visit, fewer where a window or offset skips some)",
                    attnc::runtime::exec::key_splits(threads, walks, kv_len.div_ceil(bkv)),
                    kv_len.div_ceil(bkv)
                ),
                None => String::new(),
            };
            let widened = if (q_elem, kv_elem, nest.1)
                == (
                    attnc::ElemType::Bf16,
                    attnc::ElemType::Bf16,
                    attnc::tile::nest::KvSource::Packed,
                ) {
                " (bf16 widened to f32 as it is packed: this CPU has no bf16 dot product faster than f32 FMAs)"
            } else {
                ""
            };
            chosen = format!(
                "; chosen for B={} H={} HKV={hkv} Q={q_len} KV={kv_len}{}: rows {}, kv {}{widened}{split}\n",
                batch,
                heads,
                args.page_size
                    .map(|p| format!(" in pages of {p}"))
                    .unwrap_or_default(),
                nest.0.name(),
                nest.1.name()
            );
            nest
        }
    };
    let schedule = attnc::tile::Schedule {
        tiling,
        dim,
        exp2: args.exp.unwrap_or(ExpBase::Exp2) == ExpBase::Exp2,
        rows,
        kv,
    };
    if stage == Stage::Clif {
        let options = attnc::CompileOptions {
            tiles,
            keep_clif: true,
            ..Default::default()
        };
        let jit = program.compile_jit_with(&options)?;
        return Ok(jit.clif().unwrap_or_default().to_string());
    }
    let kernel = attnc::tile::build(&program.spec, &schedule);
    Ok(if stage == Stage::TileUnopt {
        kernel.to_string()
    } else if stage == Stage::Nest {
        format!(
            "; attnc loop nest of `{}`\n{chosen}{}",
            kernel.name, kernel.nest
        )
    } else {
        attnc::tile::optimize(&kernel).to_string()
    })
}

/// The value of `flag`, a float type (f32, bf16 or f16); `quantized` says
/// why int8 and fp8 (types of the K/V cache) are not.
fn float_elem(flag: &str, value: &str, quantized: &str) -> Result<attnc::ElemType, Error> {
    match value.parse::<attnc::ElemType>() {
        Ok(e) if !e.is_quantized() => Ok(e),
        Ok(_) => Err(Error::Usage(format!("`{flag} {value}`: {quantized}"))),
        Err(_) => Err(Error::Usage(format!(
            "`{flag} {value}`: unknown element type `{value}` (expected f32, bf16 or f16)"
        ))),
    }
}

/// The element types of q and of K/V from `--dtype` and `--kv-dtype`.
fn elem_types(
    dtype: &str,
    kv_dtype: Option<&str>,
) -> Result<(attnc::ElemType, attnc::ElemType), Error> {
    let q = float_elem(
        "--dtype",
        dtype,
        &format!("q, k and v are f32, bf16 or f16; {dtype} is a type of the K/V cache: `--kv-dtype {dtype}`"),
    )?;
    let kv = match kv_dtype {
        None => q,
        Some(t) => t
            .parse()
            .map_err(|e| Error::Usage(format!("`--kv-dtype {t}`: {e}")))?,
    };
    Ok((q, kv))
}

/// An index file of the call (`--page-table`, `--kv-lens`) of `ndim` dims,
/// int32 or int64 data.
fn read_index(
    path: &std::path::Path,
    name: &str,
    flag: &str,
    ndim: usize,
) -> Result<ndarray::ArrayD<i64>, Error> {
    let a = npy::read_ints(path, &format!("`{name}` ({flag})"))?;
    if a.ndim() != ndim {
        return Err(Error::Usage(format!(
            "`{}`: {name} has shape {:?}; it is int32 (or int64) with {ndim} dim{}",
            path.display(),
            a.shape(),
            if ndim == 1 { "" } else { "s" }
        )));
    }
    Ok(a)
}

/// `a` (read from `path` as `name`) as int32. An entry outside int32 is an
/// error where `used` says the call reads it (and what is wrong with it),
/// else -1: a page table's entries past a sequence's last page may hold
/// anything.
fn narrow(
    a: ndarray::ArrayD<i64>,
    path: &std::path::Path,
    name: &str,
    used: impl Fn(&[usize]) -> Option<String>,
) -> Result<ndarray::ArrayD<i32>, Error> {
    let mut out = ndarray::ArrayD::<i32>::zeros(a.shape());
    for (o, (i, &x)) in out.iter_mut().zip(a.indexed_iter()) {
        let i = ndarray::Dimension::slice(&i);
        *o = match i32::try_from(x) {
            Ok(x) => x,
            Err(_) => match used(i) {
                None => -1,
                Some(why) => {
                    return Err(Error::Usage(format!(
                        "`{}`: {name}{i:?} is {x}, {why}",
                        path.display()
                    )))
                }
            },
        };
    }
    Ok(out)
}

/// The shapes of a call whose buffers are not bound yet, as its arrays give
/// them (for estimates before the buffers are bound), and the key rows of its
/// longest sequence.
fn fallback_shapes(inputs: &Inputs<'_>) -> (attnc::sema::eval::Shapes, usize) {
    let (qs, ks) = (inputs.q.shape(), inputs.k.shape());
    let paged = matches!(inputs.kv_layout, attnc::KvLayout::Paged { .. });
    let kv_rows = match &inputs.kv_lens {
        Some(l) => l.iter().copied().max().unwrap_or(0).max(0) as usize,
        None if paged => 0,
        None => ks[2],
    };
    let shapes = attnc::sema::eval::Shapes {
        b: qs[0],
        h: qs[1],
        hkv: if paged { ks[2] } else { ks[1] },
        q: qs[2],
        kv: positions_end(inputs.kv_offset, kv_rows, inputs.q_offset, qs[2]),
        d: qs[3],
    };
    (shapes, kv_rows)
}

/// `attnc run`: reads (or makes) the inputs, runs the spec, writes the
/// outputs (all or none), and with --check compares with the reference.
fn run_spec(args: RunArgs) -> Result<(), Error> {
    let mut targets = Vec::new();
    if let Some(out) = &args.out {
        targets.push(("--out", out.as_path()));
    }
    if let Some(lse) = &args.lse {
        targets.push(("--lse", lse.as_path()));
    }
    Staged::check_targets(&targets)?;
    let (q_elem, kv_elem) = elem_types(&args.dtype, args.kv_dtype.as_deref())?;
    let out_elem = float_elem(
        "--out-dtype",
        &args.out_dtype,
        "the output is written as f32, bf16 or f16",
    )?;
    if let Some(t) = args.tolerance.filter(|t| !(*t >= 0.0 && t.is_finite())) {
        return Err(Error::Usage(format!(
            "`--tolerance {t}`: the tolerance is the largest max |diff| that passes, a finite number >= 0 (default 1e-4; see `attnc run --help`)"
        )));
    }
    kv_source_flags(&args)?;
    backend_flags(args.backend, args.gemm, &args.block)?;
    let buffers = assignments(&args.buffers, "buffer")?;
    let program = driver::load(
        SourceFile::read(&args.spec.spec)?,
        &spec_options(&args.spec)?,
    )?;
    let tiling = match args.backend {
        Backend::Interp | Backend::Jit => Some(parse_block(&args.block, &program)?),
        _ => None,
    };
    if let (Backend::Jit, Some(t)) = (args.backend, tiling) {
        driver::check_jit_tiling(t)?;
    }
    let mut rng = attnc::bench::Rng::new(args.seed);
    let (q, k, v) = if args.random {
        let q_len = args.q_len.expect("clap requires --q-len with --random");
        let shapes = attnc::sema::eval::Shapes {
            b: args.batch,
            h: args.heads,
            hkv: args.kv_heads.unwrap_or(args.heads),
            q: q_len,
            kv: args.kv_len.unwrap_or(q_len),
            d: args.dim,
        };
        let mut need = attnc::memory::Estimate::new();
        random_inputs_need(&mut need, &program, &shapes, &shapes, &buffers);
        typed_inputs_need(&mut need, &shapes, q_elem, kv_elem);
        need.check(format_args!(
            "making random inputs of {}",
            attnc::memory::shapes_text(&shapes)
        ))?;
        let (q, k, v) = rng.qkv(&shapes);
        (
            attnc::tensor::round_to(q.view(), q_elem),
            attnc::KvArray::quantize(k.view(), kv_elem),
            attnc::KvArray::quantize(v.view(), kv_elem),
        )
    } else {
        let path = |path: &Option<PathBuf>| -> PathBuf {
            path.clone()
                .expect("clap requires --q, --k, --v without --random")
        };
        let noted = |path: &std::path::Path, note: Option<String>| {
            if let Some(note) = note {
                say_err(format_args!("note: {} is {note}\n", path.display()));
            }
        };
        let paged = args.k_pages.is_some();
        let (k_path, v_path) = if paged {
            (&args.k_pages, &args.v_pages)
        } else {
            (&args.k, &args.v)
        };
        let q_path = path(&args.q);
        let (q, note) = npy::read_q(&q_path, q_elem)?;
        noted(&q_path, note);
        let mut kv = Vec::new();
        for (p, what, scales, flag) in [
            (
                k_path,
                if paged { "k_pages" } else { "k" },
                &args.k_scales,
                "--k-scales",
            ),
            (
                v_path,
                if paged { "v_pages" } else { "v" },
                &args.v_scales,
                "--v-scales",
            ),
        ] {
            let p = path(p);
            let scales = scales.as_deref().map(|s| (s, flag));
            let (a, note) = npy::read_kv(&p, what, kv_elem, scales)?;
            noted(&p, note);
            kv.push(a);
        }
        let v = kv.pop().expect("read above");
        let k = kv.pop().expect("read above");
        (q, k, v)
    };
    let kv_lens = match args.kv_lens.as_deref() {
        Some(p) => {
            let lens = read_index(p, "kv_lens", "--kv-lens", 1)?;
            Some(narrow(lens, p, "kv_lens", |_| {
                Some("outside int32".into())
            })?)
        }
        None => None,
    };
    let page_table = match args.page_table.as_deref() {
        Some(p) => {
            let table = read_index(p, "page_table", "--page-table", 2)?;
            // Entries past a sequence's last page are never read.
            let (pages, page_size) = (
                k.view().shape()[0],
                i64::try_from(k.view().shape()[1]).unwrap_or(i64::MAX),
            );
            let len = |b: usize| kv_lens.as_ref().and_then(|l| l.get(b).copied());
            Some(narrow(table, p, "page_table", |i| {
                let (b, t) = (i[0], i[1] as i64);
                let n = i64::from(len(b)?);
                // Page `t` holds keys from `t * page_size` on (a product past
                // i64 starts past every length; a page size of 0 is bind's
                // error, not the table's).
                let first = t.checked_mul(page_size).filter(|_| page_size > 0)?;
                (first < n).then(|| {
                    format!("outside the pool of {pages} pages (sequence {b} has {n} keys)")
                })
            })?)
        }
        None => None,
    };
    let mut inputs = Inputs::new(q.view(), k.view(), v.view())
        .q_elem(q_elem)
        .q_offset(args.q_offset)
        .kv_offset(args.kv_offset);
    if let Some(lens) = &kv_lens {
        inputs = inputs.kv_lens(lens.view().into_dimensionality().expect("read as 1-d"));
    }
    if let Some(table) = &page_table {
        inputs.kv_layout = attnc::KvLayout::Paged {
            page_table: table.view().into_dimensionality().expect("read as 2-d"),
        };
    }
    // The shapes buffers and estimates see: those of the bound call, random
    // inputs included (`KV` covers the queries past the keys); the binding's
    // error, if any, is the clearest message for bad shapes.
    let (shapes, kv_rows) = attnc::bind::bind(
        &program.spec,
        &Inputs {
            buffers: Default::default(),
            ..inputs.clone()
        },
    )
    .map(|b| (b.shapes(), b.key_rows()))
    .or_else(|e| match e {
        attnc::bind::BindError::MissingBuffer { .. } => Ok(fallback_shapes(&inputs)),
        e => Err(e),
    })?;
    inputs.want_lse = args.lse.is_some() || args.check;
    bind_buffers(
        &mut inputs,
        &program,
        &shapes,
        buffers,
        args.random.then_some(&mut rng),
    )?;
    if args.random {
        require_all_buffers(&program, &inputs)?;
    }
    let mut backends = vec![args.backend];
    if args.check && !matches!(args.backend, Backend::Reference) {
        backends.push(Backend::Reference);
    }
    for b in backends {
        let Some(backend) = memory_backend(b) else {
            continue;
        };
        let tiles = tiling.unwrap_or_else(|| program.auto_tiling());
        let need = attnc::memory::run_estimate(
            &program.spec,
            &shapes,
            kv_rows,
            backend,
            tiles,
            rayon::current_num_threads(),
            flags_nest(
                &shapes,
                page_table.is_some(),
                inputs.q_elem,
                inputs.k.elem(),
                tiles,
            )
            .1,
        );
        let blocks = match backend {
            attnc::memory::Backend::Reference => String::new(),
            _ => format!(" with {tiles} tiles"),
        };
        need.check(format_args!(
            "running `{}` on {}{blocks}",
            program.spec.name,
            attnc::memory::shapes_text(&shapes)
        ))?;
    }
    let backend = library_backend(args.backend, tiling, args.gemm, &args.dtype)?;
    let outputs = run_with_progress(&program, backend, &inputs, args.quiet)?;
    if let Some(out) = &args.out {
        use ndarray_npy::WriteNpyExt;
        let mut staged = Staged::new();
        staged.write("--out", out, |w| npy::write_out(w, &outputs.out, out_elem))?;
        if let (Some(path), Some(lse)) = (&args.lse, &outputs.lse) {
            staged.write("--lse", path, |w| {
                lse.write_npy(w).map_err(|e| e.to_string())
            })?;
        }
        staged.commit()?;
        let sh = outputs.out.shape();
        say_err(format_args!(
            "{}: wrote out {out_elem}[{}, {}, {}, {}] to {}{}\n",
            program.spec.name,
            sh[0],
            sh[1],
            sh[2],
            sh[3],
            out.display(),
            args.lse
                .as_ref()
                .map(|p| format!(" and lse to {}", p.display()))
                .unwrap_or_default()
        ));
    }
    if args.check {
        let reference = match args.backend {
            Backend::Reference => outputs.clone(),
            _ => run_with_progress(&program, driver::Backend::Reference, &inputs, args.quiet)?,
        };
        let out_diff = max_diff(outputs.out.iter(), reference.out.iter(), false);
        // lse relative to max(1, |lse|): an absolute 1e-4 is below half an
        // f32 ulp once |lse| passes 2048 (large logits).
        let lse_diff = match (&outputs.lse, &reference.lse) {
            (Some(a), Some(b)) => max_diff(a.iter(), b.iter(), true),
            _ => 0.0,
        };
        // The jit and the interpreter multiply bf16 pairs where the CPU has a
        // bf16 dot product (every `--gemm` runs this CPU's products).
        let bf16_pairs = driver::default_bf16_pairs();
        let tolerance = match args.tolerance {
            Some(t) => t,
            // P·V on bf16 probabilities (see `--tolerance`): max |v| over the
            // keys the sequences use (a pool's stale slots may hold anything).
            None => match (tiling, attnc::bind::bind(&program.spec, &inputs)) {
                (Some(t), Ok(bound))
                    if driver::nest_for(&bound, t, bf16_pairs).1
                        == attnc::tile::nest::KvSource::PackedBf16 =>
                {
                    let sh = bound.shapes();
                    let mut v_max = 0f32;
                    for b in 0..bound.kv_batch().min(sh.b) {
                        for kh in 0..sh.hkv {
                            for j in 0..bound.kv_len(b) {
                                for d in 0..sh.d {
                                    let x = inputs.v.get(bound.kv_index(b, kh, j, d));
                                    if x.is_finite() {
                                        v_max = v_max.max(x.abs());
                                    }
                                }
                            }
                        }
                    }
                    1e-4 + f64::from(v_max) * 2f64.powi(-9)
                }
                _ => 1e-4,
            },
        };
        let pass = out_diff <= tolerance && lse_diff <= tolerance;
        say(format_args!(
            "check `{}` {} against the reference: max |diff| out {out_diff:.3e}, lse (relative to max(1, |lse|)) {lse_diff:.3e} (tolerance {tolerance:.3e}): {}\n",
            program.spec.name,
            backend_name(args.backend),
            if pass { "ok" } else { "FAILED" }
        ))?;
        if !pass {
            return Err(Error::Check(format!(
                "`--check` of `{}` failed: max |diff| against the reference is out {out_diff:.3e}, lse (relative to max(1, |lse|)) {lse_diff:.3e}: above the tolerance {tolerance:.3e} (`--tolerance`)",
                program.spec.name
            )));
        }
    }
    Ok(())
}

fn backend_name(b: Backend) -> &'static str {
    library_backend(b, None, Gemm::Auto, "f32")
        .expect("f32 is a dtype")
        .name()
}

/// The largest |a - b| (divided by max(1, |b|) when `relative`) over
/// paired elements, with equal values (infinities of one sign, as lse = -inf
/// of a row that sees no key) counting 0 and NaN on one side only counting
/// infinity.
fn max_diff<'a>(
    a: impl Iterator<Item = &'a f32>,
    b: impl Iterator<Item = &'a f32>,
    relative: bool,
) -> f64 {
    a.zip(b)
        .map(|(&x, &y)| {
            if x == y || (x.is_nan() && y.is_nan()) {
                0.0
            } else {
                let d = (f64::from(x) - f64::from(y)).abs();
                let d = if relative {
                    d / f64::from(y.abs()).max(1.0)
                } else {
                    d
                };
                if d.is_nan() {
                    f64::INFINITY
                } else {
                    d
                }
            }
        })
        .fold(0.0, f64::max)
}

/// `attnc blocks`: builds the block maps, writes the picture if asked, and
/// returns the text to print.
fn blocks(args: BlocksArgs) -> Result<String, Error> {
    use attnc::mask::{self, render, MaskError};
    use std::fmt::Write;
    let repeat = count("repeat", args.repeat, usize::MAX)?;
    if let Some(png) = &args.png {
        Staged::check_targets(&[("--png", png)])?;
    }
    let buffers = assignments(&args.buffers, "buffer")?;
    let program = driver::load(
        SourceFile::read(&args.spec.spec)?,
        &spec_options(&args.spec)?,
    )?;
    let tiling = parse_block(&args.block, &program)?;
    let lens: Option<ndarray::Array1<i32>> = args
        .kv_lens
        .as_deref()
        .map(|text| {
            text.split(',')
                .map(|n| match n.trim().parse::<i64>() {
                    Ok(n) if n > attnc::sema::POSITION_LIMIT => Err(Error::Usage(format!(
                        "`--kv-lens {text}`: {n} is past the limit of {} (2^31 - 1); split the sequence into smaller calls",
                        attnc::sema::POSITION_LIMIT
                    ))),
                    // A negative length is binding's error, naming the sequence.
                    Ok(n) if n >= i64::from(i32::MIN) => Ok(n as i32),
                    _ => Err(Error::Usage(format!(
                        "`--kv-lens {text}`: `{}` is not a length; give the key length of every sequence, e.g. 40,300,75",
                        n.trim()
                    ))),
                })
                .collect::<Result<ndarray::Array1<i32>, Error>>()
        })
        .transpose()?;
    let mut args = args;
    if let Some(l) = &lens {
        args.batch = l.len();
    }
    let kv_len = match &lens {
        Some(l) => l.iter().copied().max().unwrap_or(0).max(0) as usize,
        None => args.kv_len.unwrap_or(args.q_len),
    };
    let kv_heads = args.kv_heads.unwrap_or(args.heads);
    for (flag, n) in [
        ("--batch/--b", args.batch),
        ("--heads/--h", args.heads),
        ("--kv-heads", kv_heads),
    ] {
        if n == 0 {
            return Err(Error::Usage(format!("{flag} must be at least 1, found 0")));
        }
    }
    heads_divide(args.heads, kv_heads)?;
    let at = args
        .at
        .split_once(',')
        .and_then(|(b, h)| {
            Some((
                b.trim().parse::<usize>().ok()?,
                h.trim().parse::<usize>().ok()?,
            ))
        })
        .ok_or_else(|| {
            Error::Usage(format!(
                "`--at {}` must have the form B,H (e.g. 0,3)",
                args.at
            ))
        })?;
    if at.0 >= args.batch || at.1 >= args.heads {
        return Err(Error::Usage(format!(
            "`--at {},{}` is outside B = {}, H = {}",
            at.0, at.1, args.batch, args.heads
        )));
    }
    // `KV` in buffer shapes: the keys, or past them the query end
    // q_offset + Q (docs/language.md), as binding checks them.
    let call_kv = match &lens {
        Some(_) => kv_len,
        None => positions_end(0, kv_len, args.q_offset, args.q_len),
    };
    let shapes = attnc::sema::eval::Shapes {
        b: args.batch,
        h: args.heads,
        hkv: kv_heads,
        q: args.q_len,
        kv: call_kv,
        d: 1,
    };
    // Only the shapes of q, k and v matter here: zero-stride views of one
    // element, D = 1. ndarray takes a shape whose non-zero axes multiply to
    // at most isize::MAX, even when another axis is 0 and the view is empty.
    for (what, len) in [("--q-len", args.q_len), ("--kv-len", kv_len)] {
        let sizes = [args.batch, args.heads, len];
        let nonzero: u128 = sizes.iter().map(|&n| n.max(1) as u128).product();
        if nonzero > isize::MAX as u128 {
            return Err(Error::Usage(format!(
                "--batch {} x --heads {} x {what} {len}: more than an array can hold (the non-zero \
                 sizes multiply to {nonzero}, past 2^63 - 1)",
                args.batch, args.heads,
            )));
        }
    }
    {
        use attnc::memory;
        let mut need = memory::Estimate::new();
        memory::block_maps(&mut need, &program.spec, &shapes, tiling);
        for (name, source) in &buffers {
            if let (Some(id), false) = (program.spec.buffer_id(name), source.ends_with(".npy")) {
                let decl = program.spec.buffer(id);
                // An undefined dimension is reported when the buffer is bound.
                let dims = shapes.buffer_shape(decl).unwrap_or_default();
                need.array(
                    &format!("buffer `{name}`"),
                    &dims,
                    memory::elem_bytes(decl.elem),
                );
            }
        }
        need.check(format_args!(
            "`attnc blocks` of `{}` on B={} H={} Q={} KV={} with {tiling} tiles",
            program.spec.name, args.batch, args.heads, args.q_len, kv_len
        ))?;
    }
    let one = ndarray::Array4::<f32>::zeros((1, 1, 1, 1));
    let view = |heads: usize, len: usize| {
        one.broadcast((args.batch, heads, len, 1))
            .expect("the element count was checked above")
    };
    let (q, kv) = (view(args.heads, args.q_len), view(kv_heads, kv_len));
    let mut inputs = Inputs::new(q, kv, kv).q_offset(args.q_offset);
    if let Some(l) = &lens {
        inputs = inputs.kv_lens(l.view());
    }
    let mut rng = attnc::bench::Rng::new(0);
    bind_buffers(&mut inputs, &program, &shapes, buffers, Some(&mut rng))?;
    let bound = attnc::bind::bind(&program.spec, &inputs)?;
    let mut times = Vec::with_capacity(repeat);
    let mut built = None;
    // A bar over the query tiles of the first build (a mask the symbolic
    // analysis cannot follow is evaluated element by element: slow).
    let mut bar = progress_bar(args.quiet, "block map", "query tiles", 0);
    for _ in 0..repeat {
        let start = std::time::Instant::now();
        let mut observe = |done, total| show(&bar, done, total);
        let maps = mask::classify_observed(&program.spec, &bound, tiling, &mut observe);
        if let Some(bar) = bar.take() {
            bar.finish_and_clear();
        }
        let maps = maps.map_err(|e| match e {
            MaskError::Eval(error) => Error::Eval {
                file: program.file.clone(),
                error,
            },
            e => Error::Mask(e),
        })?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
        built = Some(maps);
    }
    let maps = built.expect("at least one build");
    times.sort_by(f64::total_cmp);
    let (build_ms, median_ms) = (times[0], times[times.len() / 2]);
    let map = maps.get(at.0, at.1);
    let n_pairs = args.batch * args.heads;
    // Maps are kept per b and per h where the mask depends on them; count
    // the ones that differ.
    let distinct = {
        let all = maps.maps();
        (0..all.len())
            .filter(|&i| !all[..i].contains(&all[i]))
            .count()
    };
    let stats = if maps.is_shared() {
        map.stats()
    } else {
        maps.stats_total()
    };
    if let Some(path) = &args.png {
        let bytes = render::png(map).map_err(|e| Error::Io {
            what: "cannot encode the PNG".into(),
            reason: e.to_string(),
        })?;
        let mut staged = Staged::new();
        staged.write("--png", path, |w| {
            use std::io::Write;
            w.write_all(&bytes).map_err(|e| e.to_string())
        })?;
        staged.commit()?;
    }
    if args.json {
        let v = serde_json::json!({
            "spec": program.spec.name,
            "q_len": args.q_len,
            "kv_len": kv_len,
            "q_offset": args.q_offset,
            "kv_lens": lens.as_ref().map(|l| l.to_vec()),
            "block": [tiling.bq, tiling.bkv],
            "at": [at.0, at.1],
            "map_kv_len": map.kv_len(),
            "map_q_offset": map.q_offset(),
            "q_tiles": map.q_tiles(),
            "kv_tiles": map.kv_tiles(),
            "full": stats.full,
            "partial": stats.partial,
            "empty": stats.empty,
            "density": stats.density,
            "work_fraction": stats.work_fraction,
            "build_ms": build_ms,
            "build_ms_median": median_ms,
            "repeat": times.len(),
            "map_bytes": maps.maps().iter().map(|m| m.heap_bytes()).sum::<usize>(),
            "box_evaluations": maps.counts().box_evaluations,
            "element_evaluations": maps.counts().element_evaluations,
            "given_up_tiles": maps.counts().given_up_tiles,
            "fallback_elements": maps.fallback().iter().map(|&(_, n)| n).sum::<u64>(),
            "fallback_note": program.fallback_note(&maps),
            "shared": maps.is_shared(),
            "maps": distinct,
            "summed_over_bh": !maps.is_shared(),
            "counts": if maps.is_shared() { "one (b, h) map, shared by all".to_string() } else { format!("summed over all {n_pairs} (b, h) pairs") },
        });
        return Ok(format!("{v:#}\n"));
    }
    let mut out = String::new();
    let _ = writeln!(out, "{}", render::title(&program.spec.name, map));
    if bound.is_ragged() {
        let _ = writeln!(
            out,
            "map of sequence b = {} ({} keys, queries at {}..{}), head h = {}; one map per sequence of a ragged batch",
            at.0,
            bound.kv_len(at.0),
            bound.q_start(at.0),
            bound.q_start(at.0) + args.q_len as i64,
            at.1
        );
    } else if !maps.is_shared() {
        let _ = writeln!(
            out,
            "map of (b, h) = ({}, {}); the mask depends on{}{}",
            at.0,
            at.1,
            if maps.depends_on_b() { " b" } else { "" },
            if maps.depends_on_h() { " h" } else { "" }
        );
    }
    out += &render::grid(map, render::GRID_ROWS, render::GRID_COLS);
    out += &render::stats_text(&stats);
    let work = maps.counts();
    let work = format!(
        "{} box and {} element evaluations of the mask{}",
        work.box_evaluations,
        work.element_evaluations,
        if work.given_up_tiles > 0 {
            format!(
                ", {} tile(s) left partial at its budget",
                work.given_up_tiles
            )
        } else {
            String::new()
        }
    );
    if maps.is_shared() {
        let _ = writeln!(
            out,
            "built in {build_ms:.3} ms ({work}); one map shared by all (b, h)"
        );
    } else {
        let _ = writeln!(
            out,
            "built in {build_ms:.3} ms ({work}); counts summed over all {n_pairs} (b, h) pairs ({distinct} distinct map{})",
            if distinct == 1 { "" } else { "s" }
        );
    }
    if let Some(note) = program.fallback_note(&maps) {
        let _ = writeln!(out, "{note}");
    }
    Ok(out)
}

/// `attnc emit --target ptx`: the PTX of the spec's kernel.
fn emit_ptx(args: EmitArgs) -> Result<String, Error> {
    use attnc::codegen::ptx::{self, PtxOptions};
    let program = driver::load(
        SourceFile::read(&args.spec.spec)?,
        &spec_options(&args.spec)?,
    )?;
    let arch = args
        .arch
        .as_deref()
        .unwrap_or("sm_80")
        .parse()
        .map_err(Error::Usage)?;
    let dtype = args
        .dtype
        .as_deref()
        .unwrap_or("f32")
        .parse()
        .map_err(Error::Usage)?;
    let kv_elem = match args.kv_dtype.as_deref() {
        None => attnc::ElemType::F32,
        Some(t) => {
            let e: attnc::ElemType = t
                .parse()
                .map_err(|e| Error::Usage(format!("`--kv-dtype {t}`: {e}")))?;
            if !e.is_quantized() {
                return Err(Error::Usage(format!(
                    "`--kv-dtype {t}` with --target ptx: the kernel takes K/V in its --dtype, or int8/fp8 with scales"
                )));
            }
            e
        }
    };
    let dim_text = args.dim.as_deref().unwrap_or("64");
    let dim = match dim_text.parse::<usize>() {
        Ok(d) if d > 0 => d,
        _ => {
            return Err(Error::Usage(format!(
                "`--dim {dim_text}`: PTX kernels need a fixed positive head dim, e.g. `--dim 64`",
            )))
        }
    };
    // `auto` is what `attnc run --backend cuda` runs (`ptx::schedule`), K/V
    // in place for a pool, ragged rows or a quantized cache.
    let (mut schedule, kv_quant) =
        driver::ptx_plan_for(dim, dtype, args.page_size.is_some(), kv_elem);
    if let attnc::Tiles::Fixed(t) = parse_tiles(args.block.as_deref().unwrap_or("auto"))? {
        schedule.tiling = t;
    }
    schedule.exp2 = args.exp.unwrap_or(ExpBase::Exp2) == ExpBase::Exp2;
    let kernel = program.kernel(&schedule);
    ptx::emit(
        &kernel,
        &PtxOptions {
            arch,
            dtype,
            kv_quant,
        },
    )
    .map_err(|e| Error::Codegen(e.into()))
}

/// Parses `args` (the program name first) and runs the command; returns the
/// exit status: 0, 1 for an error, 2 for a command line clap rejects (after
/// printing the error or the help asked for). The fuzz target
/// `fuzz/fuzz_targets/cli_args.rs` calls this in-process.
pub(crate) fn main_with<I, T>(args: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    match run(cli.command) {
        Ok(()) => 0,
        Err(e) => {
            say_err(driver::render(&e, std::io::stderr().is_terminal()));
            1
        }
    }
}

fn main() -> ExitCode {
    ExitCode::from(main_with(std::env::args_os()))
}
