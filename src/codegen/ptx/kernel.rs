//! The kernel skeleton: thread layout, shared-memory staging, the two
//! products (mma or FMA), the block-map walk, the per-level IR code, the
//! online softmax and the epilogue. See the module docs of [`super`].

use std::fmt::Write;

use super::writer::{f32_imm, ins, Reg, Writer};
use super::{Dtype, Launch, IN_PLACE_PARAMS, PARAMS, QUANT_PARAMS};
use crate::sema::{Dim, ShapeVar};
use crate::tensor::ElemType;
use crate::tile::nest::KvSource;
use crate::tile::{Kernel, Level, Op, Section, Ty, UnOp, ValueId, Verified};

/// Where the tiles live in shared memory. Rows of Q, K and V are padded by
/// 16 bytes, which makes `ldmatrix` and the f32 reads conflict-free.
#[derive(Clone, Debug)]
pub(super) struct Layout {
    pub bq: usize,
    pub bkv: usize,
    pub dp: usize,
    pub dtype: Dtype,
    pub threads: usize,
    /// Q fragments stay in registers (mma path, `dp <= 128`); Q is then
    /// staged in the V tile before the first V load.
    pub q_in_regs: bool,
    /// Bytes per shared-memory row of Q, K and V.
    pub row_bytes: usize,
    pub k_off: usize,
    pub v_off: usize,
    pub q_off: usize,
    /// The f32 path's per-warp P tiles (`16 x (bkv + 4)` f32 each).
    pub p_off: usize,
    pub p_row_bytes: usize,
    pub smem_bytes: usize,
}

impl Layout {
    pub fn new(bq: usize, bkv: usize, dp: usize, dtype: Dtype, q_in_regs: bool) -> Layout {
        let warps = bq / 16;
        let threads = 32 * warps;
        let row_bytes = dp * dtype.size() + 16;
        let q_in_regs = q_in_regs && dtype.uses_mma();
        let k_off = 0;
        let v_off = bkv * row_bytes;
        let v_rows = if q_in_regs { bq.max(bkv) } else { bkv };
        let q_off = if q_in_regs {
            v_off
        } else {
            v_off + v_rows * row_bytes
        };
        let q_end = if q_in_regs {
            v_off + v_rows * row_bytes
        } else {
            q_off + bq * row_bytes
        };
        let p_row_bytes = (bkv + 4) * 4;
        let p_off = q_end;
        let p_bytes = if dtype.uses_mma() {
            0
        } else {
            warps * 16 * p_row_bytes
        };
        Layout {
            bq,
            bkv,
            dp,
            dtype,
            threads,
            q_in_regs,
            row_bytes,
            k_off,
            v_off,
            q_off,
            p_off,
            p_row_bytes,
            smem_bytes: p_off + p_bytes,
        }
    }

    /// Bytes of one row of q, k or v in global memory.
    fn global_row_bytes(&self) -> usize {
        self.dp * self.dtype.size()
    }

    /// 16-byte chunks per row (the `cp.async` unit).
    fn chunks_per_row(&self) -> usize {
        self.global_row_bytes() / 16
    }
}

/// What the code being emitted is computing: the loop level, the point,
/// and the validity of its row and column.
#[derive(Clone, Debug, Default)]
pub(super) struct Ctx {
    pub level: Option<Level>,
    /// Absolute query position (s64), at row and element level.
    pub q: Option<Reg>,
    /// Key position (s64), at column and element level.
    pub kv: Option<Reg>,
    pub tile_score: Option<Reg>,
    /// Whether the row is a real one (`< Q`).
    pub row_valid: Option<Reg>,
    /// Whether the column is a real key (its position `< kv_offset + ` the
    /// key rows), computed on first use.
    pub col_valid: Option<Reg>,
    /// The conjunction of the two at element level, on first use.
    pub elem_valid: Option<Reg>,
    pub b: Option<Reg>,
    pub h: Option<Reg>,
    /// A uniform condition for the whole context (the query tile has a
    /// FULL tile, for FULL-section values above column level).
    pub gate: Option<Reg>,
}

impl Ctx {
    /// `b, h, q, kv` as the interpreter reports them at this level.
    pub fn point(&self) -> [Option<Reg>; 4] {
        [self.b, self.h, self.q, self.kv]
    }
}

/// The PTX generator of one kernel.
pub(super) struct Gen<'a> {
    pub k: &'a Kernel,
    pub launch: &'a Launch,
    pub lay: Layout,
    pub w: Writer,
    /// The register of each IR value in the current context.
    pub env: Vec<Option<Reg>>,
    pub ctx: Ctx,
    /// The error block (global u64 address).
    pub err: Reg,
    pub zero64: Reg,
    /// Key rows of K and V per head (s64): of this sequence for in-place K/V.
    pub kv_rows64: Reg,
    /// The position past the last key (s64): `kv_offset + kv_rows64`.
    pub kv_end64: Reg,
    /// The position of key row 0 (s64).
    pub kv_offset64: Reg,
    /// In-place K/V ([`KvSource::InPlace`]): how a key row is found.
    pages: Option<Pages>,
    /// Quantized K/V ([`Launch::kv_quant`]): the type and the scales of
    /// this CTA's K/V head.
    quant: Option<Quant>,
    /// Per buffer: its global address and its dims (s64).
    pub bufs: Vec<(Reg, Vec<Reg>)>,
    /// s64 shapes, indexed by `ShapeVar as usize`.
    pub shapes: Vec<Reg>,
    pub b64: Reg,
    pub h64: Reg,
    /// Per-thread ids (u32).
    tid: Reg,
    lane: Reg,
    warp: Reg,
    g: Reg,
    t4: Reg,
    /// Shared memory base (u32 shared-window address).
    smem: Reg,
    /// The S tile fragment: `s[nb][2 * half + e]`.
    s: Vec<[Reg; 4]>,
    /// The O accumulator fragment: `o[nb][2 * half + e]` for head dim `nb * 8 + 2 * t4 + e`.
    o: Vec<[Reg; 4]>,
    /// Running row max and per-thread partial row sum, per half.
    m: [Reg; 2],
    l: [Reg; 2],
    /// Q fragments per 16-wide k step, when they stay in registers.
    qf: Vec<[Reg; 4]>,
    /// Per half: absolute q (s64), row validity, row-level values.
    q_abs: [Reg; 2],
    row_valid: [Reg; 2],
    row_vals: [Vec<Option<Reg>>; 2],
    /// mma path: the current key tile's flag (u32, uniform over the CTA),
    /// nonzero when its V tile holds a non-finite value.
    v_flag: Option<Reg>,
}

/// The PTX type of the mma operands.
fn mma_type(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F16 => "f16",
        Dtype::Bf16 => "bf16",
        Dtype::F32 => unreachable!("the f32 path uses FMAs"),
    }
}

/// Generates the whole PTX module.
pub(super) fn generate(k: &Verified, launch: &Launch, entry: &str) -> String {
    // The loop nest this backend lowers: the grid (qt, H, B), one head per
    // CTA, packed or in-place K/V, FULL then PARTIAL tiles, the forward
    // steps, normalize.
    {
        use crate::tile::nest::*;
        // `launch` refuses every other grid and row map.
        assert!(matches!(k.nest.grid, Grid::QueryTiles { .. }));
        assert_eq!(k.nest.rows, RowMap::OneHead);
        // `launch` refuses the CPU's bf16 pairs (bf16 runs on tensor cores
        // here, chosen by `PtxOptions::dtype`).
        match k.nest.kv {
            KvSource::Packed | KvSource::InPlace => {}
            KvSource::PackedBf16 => unreachable!("refused by `launch`"),
        }
        let Finish::Normalize = k.nest.finish;
        assert_eq!(
            k.nest,
            LoopNest::forward(&k.schedule),
            "the PTX backend lowers the forward loop nest"
        );
    }
    let lay = Layout::new(
        launch.bq,
        launch.bkv,
        launch.d_pad,
        launch.dtype,
        launch.q_in_registers,
    );
    let mut w = Writer::default();
    let mut reg = |f: fn(&mut Writer) -> Reg| f(&mut w);
    let (tid, lane, warp, g, t4, smem) = (
        reg(Writer::r),
        reg(Writer::r),
        reg(Writer::r),
        reg(Writer::r),
        reg(Writer::r),
        reg(Writer::r),
    );
    let (err, zero64, b64, h64) = (
        reg(Writer::rd),
        reg(Writer::rd),
        reg(Writer::rd),
        reg(Writer::rd),
    );
    let (kv_rows64, kv_end64, kv_offset64) = (w.rd(), w.rd(), w.rd());
    let shapes = ShapeVar::ALL.iter().map(|_| w.rd()).collect();
    let s = (0..lay.bkv / 8)
        .map(|_| [w.f(), w.f(), w.f(), w.f()])
        .collect();
    let o = (0..lay.dp / 8)
        .map(|_| [w.f(), w.f(), w.f(), w.f()])
        .collect();
    let m = [w.f(), w.f()];
    let l = [w.f(), w.f()];
    let qf = if lay.q_in_regs {
        (0..lay.dp / 16)
            .map(|_| [w.r(), w.r(), w.r(), w.r()])
            .collect()
    } else {
        Vec::new()
    };
    let q_abs = [w.rd(), w.rd()];
    let row_valid = [w.p(), w.p()];
    let mut gen = Gen {
        k,
        launch,
        lay,
        w,
        env: vec![None; k.insts.len()],
        ctx: Ctx::default(),
        err,
        zero64,
        kv_rows64,
        kv_end64,
        kv_offset64,
        pages: None,
        quant: None,
        bufs: Vec::new(),
        shapes,
        b64,
        h64,
        tid,
        lane,
        warp,
        g,
        t4,
        smem,
        s,
        o,
        m,
        l,
        qf,
        q_abs,
        row_valid,
        row_vals: [Vec::new(), Vec::new()],
        v_flag: None,
    };
    gen.body();
    gen.module(entry)
}

impl Gen<'_> {
    /// The text of one IR instruction, for the comment above its code.
    pub(super) fn inst_text(&self, v: ValueId) -> String {
        let inst = self.k.inst(v);
        let op = match &inst.op {
            Op::IConst(i) => format!("iconst {i}"),
            Op::FConst(x) => format!("fconst {x:?}"),
            Op::BConst(b) => format!("bconst {b}"),
            Op::Var(var) => format!("var {}", var.name()),
            Op::Shape(s) => format!("shape {}", s.name()),
            Op::TileScore => "tile_score".to_string(),
            Op::Unary(op, a) => {
                let name = match op {
                    UnOp::INeg => "ineg",
                    UnOp::FNeg => "fneg",
                    UnOp::Not => "bnot",
                    UnOp::INot => "inot",
                };
                format!("{name} {a}")
            }
            Op::Binary(op, a, b) => format!("{} {a}, {b}", op.name()),
            Op::Cmp(op, a, b) => format!(
                "{}.{} {a}, {b}",
                if self.k.inst(*a).ty == Ty::F32 {
                    "fcmp"
                } else {
                    "icmp"
                },
                op.name()
            ),
            Op::Select(c, a, b) => format!("select {c}, {a}, {b}"),
            Op::Call(f, a) => format!("{} {a}", f.name()),
            Op::IToF(a) => format!("itof {a}"),
            Op::FToI(a) => format!("ftoi {a}"),
            Op::BToI(a) => format!("btoi {a}"),
            Op::Load {
                buffer,
                indices,
                checked,
            } => {
                let idx = indices
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                format!(
                    "{} {}[{idx}]",
                    if *checked { "load.checked" } else { "load" },
                    self.k.buffers[*buffer as usize].name
                )
            }
            Op::Ancestor { parent, i, j } => format!(
                "ancestor.checked {}, {i}, {j}",
                self.k.buffers[*parent as usize].name
            ),
        };
        let guard = inst.guard.map(|g| format!(" if {g}")).unwrap_or_default();
        format!("{v} = {op}{guard} : {}", inst.ty)
    }

    /// The validity predicate of the current context (`None` = always).
    pub(super) fn ctx_valid(&mut self) -> Option<Reg> {
        match self.ctx.level {
            None | Some(Level::Call) | Some(Level::Head) => self.ctx.gate,
            Some(Level::Row) => {
                if self.ctx.elem_valid.is_none() {
                    let p = self.and_opt(self.ctx.row_valid, self.ctx.gate);
                    self.ctx.elem_valid = p;
                }
                self.ctx.elem_valid
            }
            Some(Level::Col) => Some(self.col_valid()),
            Some(Level::Elem) => {
                if self.ctx.elem_valid.is_none() {
                    let c = self.col_valid();
                    let p = self.and_opt(self.ctx.row_valid, Some(c));
                    self.ctx.elem_valid = p;
                }
                self.ctx.elem_valid
            }
        }
    }

    /// `kv < kv_offset + kv_rows` (a real key; `kv` is the key's position)
    /// for the current column, computed once per column.
    fn col_valid(&mut self) -> Reg {
        if let Some(p) = self.ctx.col_valid {
            return p;
        }
        let kv = self.ctx.kv.expect("a column context has kv");
        let p = self.w.p();
        ins!(self.w, "setp.lt.s64 {p}, {kv}, {}", self.kv_end64);
        self.ctx.col_valid = Some(p);
        p
    }

    /// The ids of the instructions at `level` that the `section` loop runs.
    fn insts_at(&self, level: Level, section: Section) -> Vec<ValueId> {
        self.insts_where(level, |s| s.runs_in(section))
    }

    /// The ids of the instructions at `level` whose section passes `pick`.
    fn insts_where(&self, level: Level, pick: impl Fn(Section) -> bool) -> Vec<ValueId> {
        (0..self.k.insts.len())
            .filter(|&i| self.k.insts[i].level == level && pick(self.k.insts[i].section))
            .map(|i| ValueId(i as u32))
            .collect()
    }

    fn param(&self, name: &str) -> String {
        format!("p_{name}")
    }

    /// The module text: header, entry signature, declarations, body.
    fn module(&self, entry: &str) -> String {
        let k = self.k;
        let l = self.launch;
        let lay = &self.lay;
        let mut s = String::new();
        let product = if l.dtype.uses_mma() {
            format!(
                "{} inputs, mma.sync m16n8k16 with f32 accumulation",
                l.dtype
            )
        } else {
            "f32 inputs, FMA products".to_string()
        };
        let _ = writeln!(
            s,
            "//\n// attnc PTX of `{}` for {}: {product}",
            k.name, l.arch
        );
        let sch = &k.schedule;
        let _ = writeln!(
            s,
            "// schedule: bq={} bkv={} D={} (arrays padded to {}) exp={}; {} threads ({} warps x 16 query rows)",
            sch.tiling.bq,
            sch.tiling.bkv,
            l.d,
            l.d_pad,
            if sch.exp2 { "exp2" } else { "exp" },
            l.threads,
            l.threads / 32
        );
        if k.nest.kv == KvSource::InPlace {
            let _ = writeln!(
                s,
                "// K/V in place: key j of sequence b at row table[b, j / page_size] * page_stride + \
                 (j % page_size) * row_stride + kh * head_stride; queries end on key kv_lens[b] - 1"
            );
        }
        if let Some(e) = l.kv_quant {
            let _ = writeln!(
                s,
                "// K/V stored as {e} with a float32 scale per row (k_scales_ptr, v_scales_ptr), \
                 dequantized to {} in the tile loads",
                l.dtype.name()
            );
        }
        if !k.params.is_empty() {
            let p = k
                .params
                .iter()
                .map(|(n, v)| format!("{n} = {v}"))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(s, "// params: {p}");
        }
        let _ = writeln!(
            s,
            "// shared memory: {} bytes ({}); K tile at {}, V tile at {}, Q tile at {}{}{}",
            l.smem_bytes,
            if l.dynamic_smem { "dynamic" } else { "static" },
            lay.k_off,
            lay.v_off,
            lay.q_off,
            if lay.q_in_regs {
                " (aliases V; Q fragments stay in registers)"
            } else {
                ""
            },
            if lay.dtype.uses_mma() {
                String::new()
            } else {
                format!(", P tiles at {}", lay.p_off)
            }
        );
        let _ = writeln!(
            s,
            "//\n.version 8.0\n.target {}\n.address_size 64\n",
            l.arch
        );
        if l.dynamic_smem {
            let _ = writeln!(s, ".extern .shared .align 16 .b8 attnc_smem[];\n");
        }
        let _ = writeln!(s, ".visible .entry {entry}(");
        let mut params: Vec<String> = Vec::new();
        for name in PARAMS {
            let ty = match name {
                "q_offset" | "kv_offset" => ".s64",
                "B" | "H" | "HKV" | "Q" | "KV" | "D" | "group" | "kv_batch_stride"
                | "map_stride_b" | "map_stride_h" | "kv_rows" => ".u32",
                _ => ".u64",
            };
            params.push(format!("\t.param {ty} {}", self.param(name)));
        }
        if k.nest.kv == KvSource::InPlace {
            for name in IN_PLACE_PARAMS {
                let ty = if name.ends_with("_ptr") {
                    ".u64"
                } else {
                    ".u32"
                };
                params.push(format!("\t.param {ty} {}", self.param(name)));
            }
        }
        if l.kv_quant.is_some() {
            for name in QUANT_PARAMS {
                params.push(format!("\t.param .u64 {}", self.param(name)));
            }
        }
        for i in 0..k.buffers.len() {
            params.push(format!("\t.param .u64 {}", self.param(&format!("buf{i}"))));
        }
        let _ = writeln!(s, "{}\n)", params.join(",\n"));
        // The register budget: up to 255 per thread, and ptxas must not trade
        // spills for more CTAs per SM than the budget promises.
        let _ = writeln!(
            s,
            ".maxntid {}, 1, 1\n.minnctapersm {}\n{{",
            l.threads,
            l.register_ctas_per_sm()
        );
        s.push_str(&self.w.declarations());
        if !l.dynamic_smem {
            let _ = writeln!(s, "\t.shared .align 16 .b8 attnc_smem[{}];", l.smem_bytes);
        }
        s.push_str(self.w.body());
        s.push_str("}\n");
        s
    }

    fn ld_param(&mut self, name: &str, ty: &str) -> Reg {
        let r = if ty == "u32" { self.w.r() } else { self.w.rd() };
        ins!(self.w, "ld.param.{ty} {r}, [{}]", self.param(name));
        r
    }

    fn global_ptr(&mut self, name: &str) -> Reg {
        let r = self.ld_param(name, "u64");
        ins!(self.w, "cvta.to.global.u64 {r}, {r}");
        r
    }

    fn body(&mut self) {
        let lay = self.lay.clone();
        let (tid, lane, warp, g, t4, smem) =
            (self.tid, self.lane, self.warp, self.g, self.t4, self.smem);
        self.w
            .section("thread and CTA ids; grid = (query tiles, H, B), longest query tiles first");
        ins!(self.w, "mov.u32 {tid}, %tid.x");
        ins!(self.w, "and.b32 {lane}, {tid}, 31");
        ins!(self.w, "shr.u32 {warp}, {tid}, 5");
        ins!(self.w, "shr.u32 {g}, {lane}, 2");
        ins!(self.w, "and.b32 {t4}, {lane}, 3");
        ins!(self.w, "mov.u32 {smem}, attnc_smem");
        let (qt, n_qt, h32, b32) = (self.w.r(), self.w.r(), self.w.r(), self.w.r());
        let t = self.w.r();
        ins!(self.w, "mov.u32 {t}, %ctaid.x");
        ins!(self.w, "mov.u32 {n_qt}, %nctaid.x");
        ins!(self.w, "sub.u32 {qt}, {n_qt}, {t}");
        ins!(self.w, "sub.u32 {qt}, {qt}, 1");
        ins!(self.w, "mov.u32 {h32}, %ctaid.y");
        ins!(self.w, "mov.u32 {b32}, %ctaid.z");

        self.w.section("parameters");
        let q_ptr = self.global_ptr("q");
        let k_ptr = self.global_ptr("k");
        let v_ptr = self.global_ptr("v");
        let out_ptr = self.global_ptr("out");
        let lse_ptr = self.global_ptr("lse");
        let err = self.err;
        let e = self.global_ptr("err");
        ins!(self.w, "mov.b64 {err}, {e}");
        let map_rows = self.global_ptr("map_rows");
        let map_full = self.global_ptr("map_full");
        let map_partial = self.global_ptr("map_partial");
        // The f32 path never reads the flags: its products skip p = 0 always.
        // The mma path reads them where a key of probability 0 can meet a
        // non-finite V: on PARTIAL tiles (the mask), and on FULL tiles too when
        // a score mod can score a key -inf. A kernel with neither (dense)
        // never takes the exact path.
        let score_mod = self.k.has_score_mod();
        let v_flags = (lay.dtype.uses_mma() && (self.k.mask.is_some() || score_mod))
            .then(|| self.global_ptr("v_flags"));
        let shape32: Vec<Reg> = ["B", "H", "HKV", "Q", "KV", "D"]
            .iter()
            .map(|n| self.ld_param(n, "u32"))
            .collect();
        let group = self.ld_param("group", "u32");
        let kv_bs = self.ld_param("kv_batch_stride", "u32");
        let msb = self.ld_param("map_stride_b", "u32");
        let msh = self.ld_param("map_stride_h", "u32");
        let q_offset = self.ld_param("q_offset", "s64");
        let kv_offset = self.ld_param("kv_offset", "s64");
        ins!(self.w, "mov.b64 {}, {kv_offset}", self.kv_offset64);
        for (sv, r32) in ShapeVar::ALL.iter().zip(&shape32) {
            let r = self.shapes[*sv as usize];
            ins!(self.w, "cvt.u64.u32 {r}, {r32}");
        }
        // K and V hold `kv_rows` keys per head, at positions from
        // `kv_offset`; `KV`, the end of the call's positions, may be larger
        // (queries past the keys). In place, `kv_rows` is the longest
        // sequence's keys, and `kv_len` this sequence's.
        let (h_len, hkv_len, q_len) = (shape32[1], shape32[2], shape32[3]);
        let in_place = self.k.nest.kv == KvSource::InPlace;
        let kv_rows = self.ld_param("kv_rows", "u32");
        let (kv_len, q_offset) = if in_place {
            self.in_place_setup(b32, q_len)
        } else {
            (kv_rows, q_offset)
        };
        ins!(self.w, "cvt.u64.u32 {}, {kv_len}", self.kv_rows64);
        ins!(
            self.w,
            "add.s64 {}, {}, {kv_offset}",
            self.kv_end64,
            self.kv_rows64
        );
        ins!(self.w, "mov.b64 {}, 0", self.zero64);
        ins!(self.w, "cvt.u64.u32 {}, {b32}", self.b64);
        ins!(self.w, "cvt.u64.u32 {}, {h32}", self.h64);
        self.buffers();

        // Call, head and row values of the FULL section are computed only
        // for query tiles with a FULL tile, row values only for query tiles
        // with any tile (as the interpreter does).
        let not_full = |s: Section| s != Section::Full;
        let full_only = |s: Section| s == Section::Full;
        self.w.section("call-level values");
        self.ctx = Ctx {
            level: Some(Level::Call),
            ..Ctx::default()
        };
        for v in self.insts_where(Level::Call, not_full) {
            self.lower(v);
        }
        self.w.section("head-level values");
        self.ctx = Ctx {
            level: Some(Level::Head),
            b: Some(self.b64),
            h: Some(self.h64),
            ..Ctx::default()
        };
        for v in self.insts_where(Level::Head, not_full) {
            self.lower(v);
        }

        self.w
            .section("global addresses of this (b, h)'s Q tile and K/V head");
        let grow = lay.global_row_bytes();
        let (bh, q_tile, row0, q_rows) = (self.w.r(), self.w.rd(), self.w.r(), self.w.r());
        ins!(self.w, "mad.lo.u32 {bh}, {b32}, {h_len}, {h32}");
        ins!(self.w, "mul.lo.u32 {row0}, {qt}, {}", lay.bq);
        let t64 = self.w.rd();
        ins!(self.w, "mul.wide.u32 {t64}, {bh}, {q_len}");
        let row0_64 = self.w.rd();
        ins!(self.w, "cvt.u64.u32 {row0_64}, {row0}");
        ins!(self.w, "add.s64 {t64}, {t64}, {row0_64}");
        ins!(self.w, "mul.lo.u64 {t64}, {t64}, {grow}");
        ins!(self.w, "add.s64 {q_tile}, {q_ptr}, {t64}");
        ins!(self.w, "sub.u32 {q_rows}, {q_len}, {row0}");
        ins!(self.w, "min.u32 {q_rows}, {q_rows}, {}", lay.bq);
        let (kvh, k_head, v_head) = (self.w.r(), self.w.rd(), self.w.rd());
        let (kb, kh) = (self.w.r(), self.w.r());
        ins!(self.w, "mul.lo.u32 {kb}, {b32}, {kv_bs}");
        ins!(self.w, "div.u32 {kh}, {h32}, {group}");
        ins!(self.w, "mad.lo.u32 {kvh}, {kb}, {hkv_len}, {kh}");
        let head_off = self.w.rd();
        match &self.pages {
            // The KV head's rows start `kh * head_stride` rows in; the
            // sequence's rows are found through its table row.
            Some(p) => ins!(self.w, "mul.wide.u32 {head_off}, {kh}, {}", p.head_stride),
            None => ins!(self.w, "mul.wide.u32 {head_off}, {kvh}, {kv_len}"),
        }
        if let Some(elem) = self.launch.kv_quant {
            // The head's first scale: one f32 per row, rows as in K/V.
            let (ks, vs, so) = (
                self.global_ptr("k_scales_ptr"),
                self.global_ptr("v_scales_ptr"),
                self.w.rd(),
            );
            ins!(self.w, "shl.b64 {so}, {head_off}, 2");
            ins!(self.w, "add.s64 {ks}, {ks}, {so}");
            ins!(self.w, "add.s64 {vs}, {vs}, {so}");
            self.quant = Some(Quant {
                elem,
                k_scales: ks,
                v_scales: vs,
            });
        }
        ins!(
            self.w,
            "mul.lo.u64 {head_off}, {head_off}, {}",
            self.kv_row_bytes()
        );
        ins!(self.w, "add.s64 {k_head}, {k_ptr}, {head_off}");
        ins!(self.w, "add.s64 {v_head}, {v_ptr}, {head_off}");
        // This K/V head's V-tile flags: ceil(kv_rows / bkv) bytes at kvh *
        // ceil(kv_rows / bkv) (for in-place K/V, per sequence: kvh = b * HKV
        // + kh, and kv_rows the longest sequence's keys).
        let flag_keys = kv_rows;
        let flag_head = v_flags.map(|ptr| {
            let (n_kt, fh) = (self.w.r(), self.w.rd());
            ins!(self.w, "add.u32 {n_kt}, {flag_keys}, {}", lay.bkv - 1);
            ins!(
                self.w,
                "shr.u32 {n_kt}, {n_kt}, {}",
                lay.bkv.trailing_zeros()
            );
            ins!(self.w, "mul.wide.u32 {fh}, {kvh}, {n_kt}");
            ins!(self.w, "add.s64 {fh}, {ptr}, {fh}");
            fh
        });

        self.w.section("cp.async lane offsets");
        let loader = self.tile_loader_setup();

        self.w
            .section("load the Q tile (rows past Q are zero-filled)");
        self.load_tile(&loader, lay.q_off, lay.bq, q_tile, q_rows);

        self.w
            .section("block map of (b, h, qt): FULL ranges, then PARTIAL tiles");
        let (mi, mrow) = (self.w.r(), self.w.rd());
        ins!(self.w, "mul.lo.u32 {mi}, {b32}, {msb}");
        ins!(self.w, "mad.lo.u32 {mi}, {h32}, {msh}, {mi}");
        ins!(self.w, "mad.lo.u32 {mi}, {mi}, {n_qt}, {qt}");
        ins!(self.w, "mul.wide.u32 {mrow}, {mi}, 16");
        ins!(self.w, "add.s64 {mrow}, {map_rows}, {mrow}");
        let it = TileIter {
            fr: self.w.r(),
            fr_end: self.w.r(),
            f_end: self.w.r(),
            pi: self.w.r(),
            p_end: self.w.r(),
            map_full,
            map_partial,
        };
        ins!(
            self.w,
            "ld.global.nc.v4.u32 {{{}, {}, {}, {}}}, [{mrow}]",
            it.fr,
            it.fr_end,
            it.pi,
            it.p_end
        );
        ins!(self.w, "sub.u32 {}, {}, 1", it.fr, it.fr);
        ins!(self.w, "mov.u32 {}, 0", it.f_end);
        let (kt, full, has) = (self.w.r(), self.w.p(), self.w.p());
        let (nkt, nfull, nhas) = (self.w.r(), self.w.p(), self.w.p());
        ins!(self.w, "mov.u32 {kt}, -1");
        ins!(self.w, "mov.pred {full}, 1");
        self.next_tile(&it, kt, full, nkt, nfull, nhas);
        ins!(self.w, "mov.u32 {kt}, {nkt}");
        ins!(self.w, "mov.pred {full}, {nfull}");
        ins!(self.w, "mov.pred {has}, {nhas}");
        let (kt_off, kv_rows) = (self.w.rd(), self.w.r());
        let key0 = self.kv_tile_addr(kt, k_head, kv_len, kt_off, kv_rows);
        let k_scales = self.quant.as_ref().map(|q| q.k_scales);
        self.load_kv_tile_if(
            &loader,
            lay.k_off,
            kt_off,
            key0,
            kv_rows,
            Some(has),
            k_scales,
        );
        for half in 0..2 {
            ins!(
                self.w,
                "mov.f32 {}, {}",
                self.m[half],
                f32_imm(f32::NEG_INFINITY)
            );
            ins!(self.w, "mov.f32 {}, {}", self.l[half], f32_imm(0.0));
        }
        for nb in 0..lay.dp / 8 {
            for r in self.o[nb] {
                ins!(self.w, "mov.f32 {r}, {}", f32_imm(0.0));
            }
        }
        let finish = self.w.label("finish");
        self.w
            .comment("a query tile that sees no key tile: out = 0, lse = -inf");
        ins!(self.w, "@!{has} bra.uni {finish}");
        let has_full = self.w.p();
        ins!(self.w, "setp.lt.u32 {has_full}, {}, {}", it.fr, it.fr_end);
        let full_vals = !self.insts_where(Level::Call, full_only).is_empty()
            || !self.insts_where(Level::Head, full_only).is_empty();
        if full_vals {
            self.w.section(
                "call- and head-level values of the FULL tiles, where the query tile has one",
            );
            for level in [Level::Call, Level::Head] {
                self.ctx = Ctx {
                    level: Some(level),
                    // The interpreter runs these per query tile: the point has b and h.
                    b: Some(self.b64),
                    h: Some(self.h64),
                    gate: Some(has_full),
                    ..Ctx::default()
                };
                for v in self.insts_where(level, full_only) {
                    self.lower(v);
                }
            }
        }

        self.w
            .section("row-level values, once per owned row (rows g and g + 8 of the warp)");
        for half in 0..2 {
            let (r, qrow, qa, rv) = (
                self.w.r(),
                self.w.r(),
                self.q_abs[half],
                self.row_valid[half],
            );
            ins!(self.w, "mad.lo.u32 {r}, {warp}, 16, {g}");
            ins!(self.w, "add.u32 {qrow}, {row0}, {r}");
            if half == 1 {
                ins!(self.w, "add.u32 {qrow}, {qrow}, 8");
            }
            ins!(self.w, "setp.lt.u32 {rv}, {qrow}, {q_len}");
            ins!(self.w, "cvt.u64.u32 {qa}, {qrow}");
            ins!(self.w, "add.s64 {qa}, {qa}, {q_offset}");
            self.ctx = Ctx {
                level: Some(Level::Row),
                b: Some(self.b64),
                h: Some(self.h64),
                q: Some(qa),
                row_valid: Some(rv),
                ..Ctx::default()
            };
            for v in self.insts_where(Level::Row, not_full) {
                self.lower(v);
            }
            self.ctx.gate = Some(has_full);
            self.ctx.elem_valid = None;
            for v in self.insts_where(Level::Row, full_only) {
                self.lower(v);
            }
            self.row_vals[half] = self.env.clone();
        }

        self.w.section("wait for Q (and the first K tile)");
        ins!(self.w, "cp.async.wait_group 0");
        ins!(self.w, "bar.sync 0");
        if lay.q_in_regs {
            let a_off = self.a_lane_offset(lay.q_off, true);
            for ks in 0..lay.dp / 16 {
                self.ldmatrix_x4(self.qf[ks], false, a_off, ks * 32);
            }
        }

        self.w.section("key tile loop");
        let top = self.w.label("tile");
        self.w.place(&top);
        if let Some(fh) = flag_head {
            self.w
                .comment("whether this V tile holds a non-finite value (read now, used by P V)");
            let (flag, a) = (self.w.r(), self.w.rd());
            ins!(self.w, "cvt.u64.u32 {a}, {kt}");
            ins!(self.w, "add.s64 {a}, {fh}, {a}");
            ins!(self.w, "ld.global.nc.u8 {flag}, [{a}]");
            self.v_flag = Some(flag);
        }
        self.next_tile(&it, kt, full, nkt, nfull, nhas);
        ins!(self.w, "cp.async.wait_group 0");
        ins!(self.w, "bar.sync 0");
        self.w.comment("V of this tile loads during S = Q K^T");
        let key0 = self.kv_tile_addr(kt, v_head, kv_len, kt_off, kv_rows);
        let v_scales = self.quant.as_ref().map(|q| q.v_scales);
        self.load_kv_tile_if(&loader, lay.v_off, kt_off, key0, kv_rows, None, v_scales);
        self.qk();
        let prescale =
            self.env[self.k.q_prescale.0 as usize].expect("q_prescale is a call-level value");
        self.w.comment("tile_score = (q . k) * q_prescale");
        for nb in 0..lay.bkv / 8 {
            for r in self.s[nb] {
                ins!(self.w, "mul.rn.f32 {r}, {r}, {prescale}");
            }
        }
        ins!(self.w, "cp.async.wait_group 0");
        ins!(self.w, "bar.sync 0");
        self.w
            .comment("K of the next tile loads during the softmax and P V");
        let (nkt_off, nkv_rows) = (self.w.rd(), self.w.r());
        let key0 = self.kv_tile_addr(nkt, k_head, kv_len, nkt_off, nkv_rows);
        self.load_kv_tile_if(
            &loader,
            lay.k_off,
            nkt_off,
            key0,
            nkv_rows,
            Some(nhas),
            k_scales,
        );

        let kv0 = self.w.rd();
        let kv0_32 = self.w.r();
        ins!(self.w, "mul.lo.u32 {kv0_32}, {kt}, {}", lay.bkv);
        ins!(self.w, "shl.b32 {t}, {t4}, 1");
        ins!(self.w, "add.u32 {t}, {kv0_32}, {t}");
        ins!(self.w, "cvt.u64.u32 {kv0}, {t}");
        // The position of this thread's first column: the mask and the
        // score mod see positions, the tail mask rows.
        let kv0_pos = self.w.rd();
        ins!(self.w, "add.s64 {kv0_pos}, {kv0}, {}", self.kv_offset64);
        let (partial, softmax) = (self.w.label("partial"), self.w.label("softmax"));
        ins!(self.w, "@!{full} bra.uni {partial}");
        self.w.section("FULL tile: no mask code");
        self.tile_body(Section::Full, kv0_pos);
        self.w
            .comment("a ragged last tile: columns past the key rows are -inf");
        let (ragged, end) = (self.w.p(), self.w.r());
        let no_tail = self.w.label("no_tail");
        ins!(self.w, "add.u32 {end}, {kv0_32}, {}", lay.bkv);
        ins!(self.w, "setp.gt.u32 {ragged}, {end}, {kv_len}");
        ins!(self.w, "@!{ragged} bra.uni {no_tail}");
        self.tail_mask(kv0);
        self.w.place(&no_tail);
        ins!(self.w, "bra.uni {softmax}");
        self.w.place(&partial);
        self.w.section("PARTIAL tile: mask applied");
        self.tile_body(Section::Partial, kv0_pos);
        self.w.place(&softmax);
        ins!(self.w, "bar.warp.sync -1");
        match self.v_flag {
            // A flagged tile takes its own copy of the softmax step and the
            // exact P V, so the usual path stays one straight-line block that
            // ptxas can schedule across (the V fragments load during the softmax).
            Some(flag) => {
                let (exact, done, flagged) = (
                    self.w.label("pv_exact"),
                    self.w.label("pv_done"),
                    self.w.p(),
                );
                ins!(self.w, "setp.ne.u32 {flagged}, {flag}, 0");
                if !score_mod {
                    // Without a score mod every key of a FULL tile is visible.
                    let partial_tile = self.w.p();
                    ins!(self.w, "not.pred {partial_tile}, {full}");
                    ins!(self.w, "and.pred {flagged}, {flagged}, {partial_tile}");
                }
                ins!(self.w, "@{flagged} bra.uni {exact}");
                self.online_softmax();
                self.pv();
                ins!(self.w, "bra.uni {done}");
                self.w.place(&exact);
                self.online_softmax();
                self.pv_exact();
                self.w.place(&done);
            }
            None => {
                self.online_softmax();
                self.pv();
            }
        }
        ins!(self.w, "mov.u32 {kt}, {nkt}");
        ins!(self.w, "mov.pred {full}, {nfull}");
        ins!(self.w, "@{nhas} bra.uni {top}");

        self.w.place(&finish);
        ins!(self.w, "cp.async.wait_group 0");
        self.epilogue(out_ptr, lse_ptr, bh, q_len, row0);
        ins!(self.w, "ret");
    }

    /// Pointers and dims (s64) of every buffer.
    fn buffers(&mut self) {
        for (i, decl) in self.k.buffers.clone().iter().enumerate() {
            let ptr = self.global_ptr(&format!("buf{i}"));
            let mut dims = Vec::new();
            for d in &decl.dims {
                let r = self.dim(d);
                dims.push(r);
            }
            self.bufs.push((ptr, dims));
        }
    }

    /// A buffer dimension (s64), checked non-negative and defined by the
    /// host before the launch.
    fn dim(&mut self, d: &Dim) -> Reg {
        let r = self.w.rd();
        match d {
            Dim::Lit(n) => ins!(self.w, "mov.b64 {r}, {n}"),
            Dim::Shape(s) => ins!(self.w, "mov.b64 {r}, {}", self.shapes[*s as usize]),
            Dim::Param(_) => unreachable!("a kernel's buffer dims hold param values, not params"),
            // A shape is never negative: round up with one unsigned division.
            Dim::CeilDiv(a, b) if matches!((&**a, &**b), (Dim::Shape(_), Dim::Lit(n)) if *n >= 1) =>
            {
                let (Dim::Shape(s), Dim::Lit(n)) = (&**a, &**b) else {
                    unreachable!()
                };
                ins!(
                    self.w,
                    "add.s64 {r}, {}, {}",
                    self.shapes[*s as usize],
                    n - 1
                );
                ins!(self.w, "div.u64 {r}, {r}, {n}");
            }
            Dim::Add(a, b) | Dim::Sub(a, b) | Dim::Mul(a, b) | Dim::CeilDiv(a, b) => {
                let (a, b) = (self.dim(a), self.dim(b));
                match d {
                    Dim::Add(..) => ins!(self.w, "add.s64 {r}, {a}, {b}"),
                    Dim::Sub(..) => ins!(self.w, "sub.s64 {r}, {a}, {b}"),
                    Dim::Mul(..) => ins!(self.w, "mul.lo.s64 {r}, {a}, {b}"),
                    _ => {
                        // ceil(a / b) for b >= 1 and a of either sign: the
                        // truncated quotient, plus one where a positive
                        // remainder was cut off.
                        let (rem, p) = (self.w.rd(), self.w.p());
                        ins!(self.w, "div.s64 {r}, {a}, {b}");
                        ins!(self.w, "rem.s64 {rem}, {a}, {b}");
                        ins!(self.w, "setp.gt.s64 {p}, {rem}, 0");
                        ins!(self.w, "@{p} add.s64 {r}, {r}, 1");
                    }
                }
            }
        }
        r
    }

    /// The next tile of the walk: after a FULL tile comes the next tile of
    /// its range, else the start of the next range, else the first PARTIAL
    /// tile; after a PARTIAL tile the next PARTIAL one. Uniform over the CTA.
    fn next_tile(&mut self, it: &TileIter, kt: Reg, full: Reg, nkt: Reg, nfull: Reg, nhas: Reg) {
        let (part, range, none, done) = (
            self.w.label("next_partial"),
            self.w.label("next_range"),
            self.w.label("next_none"),
            self.w.label("next_done"),
        );
        let (t, p, a) = (self.w.r(), self.w.p(), self.w.rd());
        ins!(self.w, "@!{full} bra.uni {part}");
        ins!(self.w, "add.u32 {t}, {kt}, 1");
        ins!(self.w, "setp.lt.u32 {p}, {t}, {}", it.f_end);
        ins!(self.w, "@!{p} bra.uni {range}");
        ins!(self.w, "mov.u32 {nkt}, {t}");
        ins!(self.w, "mov.pred {nfull}, 1");
        ins!(self.w, "mov.pred {nhas}, 1");
        ins!(self.w, "bra.uni {done}");
        self.w.place(&range);
        ins!(self.w, "add.u32 {}, {}, 1", it.fr, it.fr);
        ins!(self.w, "setp.lt.u32 {p}, {}, {}", it.fr, it.fr_end);
        ins!(self.w, "@!{p} bra.uni {part}");
        ins!(self.w, "mul.wide.u32 {a}, {}, 8", it.fr);
        ins!(self.w, "add.s64 {a}, {}, {a}", it.map_full);
        ins!(self.w, "ld.global.nc.v2.u32 {{{nkt}, {}}}, [{a}]", it.f_end);
        ins!(self.w, "mov.pred {nfull}, 1");
        ins!(self.w, "mov.pred {nhas}, 1");
        ins!(self.w, "bra.uni {done}");
        self.w.place(&part);
        ins!(self.w, "setp.lt.u32 {p}, {}, {}", it.pi, it.p_end);
        ins!(self.w, "@!{p} bra.uni {none}");
        ins!(self.w, "mul.wide.u32 {a}, {}, 4", it.pi);
        ins!(self.w, "add.s64 {a}, {}, {a}", it.map_partial);
        ins!(self.w, "ld.global.nc.u32 {nkt}, [{a}]");
        ins!(self.w, "add.u32 {}, {}, 1", it.pi, it.pi);
        ins!(self.w, "mov.pred {nfull}, 0");
        ins!(self.w, "mov.pred {nhas}, 1");
        ins!(self.w, "bra.uni {done}");
        self.w.place(&none);
        ins!(self.w, "mov.u32 {nkt}, 0");
        ins!(self.w, "mov.pred {nfull}, 0");
        ins!(self.w, "mov.pred {nhas}, 0");
        self.w.place(&done);
    }

    /// `off = head + kt * bkv * row bytes`, `rows = min(bkv, kv_len - kt * bkv)`
    /// (`kv_len`: the key rows, of this sequence in place).
    fn kv_tile_addr(&mut self, kt: Reg, head: Reg, kv_len: Reg, off: Reg, rows: Reg) -> Reg {
        let lay = &self.lay;
        let (bkv, grow) = (lay.bkv, lay.global_row_bytes());
        let c0 = self.w.r();
        ins!(self.w, "mul.lo.u32 {c0}, {kt}, {bkv}");
        if self.pages.is_some() {
            // Rows are found key by key through the table, from the head.
            ins!(self.w, "mov.b64 {off}, {head}");
        } else {
            ins!(self.w, "mul.wide.u32 {off}, {c0}, {grow}");
            ins!(self.w, "add.s64 {off}, {head}, {off}");
        }
        // Past the end (no next tile) the row count clamps to 0.
        let p = self.w.p();
        ins!(self.w, "setp.lt.u32 {p}, {c0}, {kv_len}");
        ins!(self.w, "sub.u32 {rows}, {kv_len}, {c0}");
        ins!(self.w, "min.u32 {rows}, {rows}, {bkv}");
        ins!(self.w, "selp.b32 {rows}, {rows}, 0, {p}");
        c0
    }

    /// The in-place K/V parameters of sequence `b32`: its key count
    /// `kv_lens[b]` (u32) and the absolute position of its first query row,
    /// `kv_offset + kv_lens[b] - Q` (s64), which puts the last query on its
    /// last key.
    fn in_place_setup(&mut self, b32: Reg, q_len: Reg) -> (Reg, Reg) {
        let lens = self.global_ptr("kv_lens_ptr");
        let table = self.global_ptr("page_table_ptr");
        let [ts, page_size, page_stride, row_stride, head_stride] = [
            "table_stride",
            "page_size",
            "page_stride",
            "row_stride",
            "head_stride",
        ]
        .map(|n| self.ld_param(n, "u32"));
        let (a, len) = (self.w.rd(), self.w.r());
        ins!(self.w, "mul.wide.u32 {a}, {b32}, 4");
        ins!(self.w, "add.s64 {a}, {lens}, {a}");
        ins!(self.w, "ld.global.nc.u32 {len}, [{a}]");
        let (q_start, q64) = (self.w.rd(), self.w.rd());
        ins!(self.w, "cvt.u64.u32 {q_start}, {len}");
        ins!(self.w, "cvt.u64.u32 {q64}, {q_len}");
        ins!(self.w, "sub.s64 {q_start}, {q_start}, {q64}");
        ins!(self.w, "add.s64 {q_start}, {q_start}, {}", self.kv_offset64);
        let table_row = self.w.rd();
        ins!(self.w, "mul.wide.u32 {table_row}, {b32}, {ts}");
        ins!(self.w, "shl.b64 {table_row}, {table_row}, 2");
        ins!(self.w, "add.s64 {table_row}, {table}, {table_row}");
        self.pages = Some(Pages {
            table_row,
            page_size,
            page_stride,
            row_stride,
            head_stride,
        });
        (len, q_start)
    }

    /// Bytes of one K/V row in global memory: `d_pad` elements of the
    /// kernel's type, or of one byte when quantized.
    fn kv_row_bytes(&self) -> usize {
        match self.launch.kv_quant {
            Some(_) => self.lay.dp,
            None => self.lay.global_row_bytes(),
        }
    }

    /// The row index (u64, in rows from the head's first) of key `key`
    /// (u32), through the page table (in-place K/V); the table is read only
    /// where `ok` holds (a real key: entries past a sequence's pages may
    /// hold anything).
    fn kv_row_index(&mut self, key: Reg, ok: Reg) -> Reg {
        let p = self.pages.clone().expect("in-place K/V");
        let (page_i, slot, page, rows) = (self.w.r(), self.w.r(), self.w.r(), self.w.rd());
        ins!(self.w, "div.u32 {page_i}, {key}, {}", p.page_size);
        ins!(self.w, "rem.u32 {slot}, {key}, {}", p.page_size);
        let ta = self.w.rd();
        ins!(self.w, "mul.wide.u32 {ta}, {page_i}, 4");
        ins!(self.w, "add.s64 {ta}, {}, {ta}", p.table_row);
        ins!(self.w, "mov.u32 {page}, 0");
        ins!(self.w, "@{ok} ld.global.nc.u32 {page}, [{ta}]");
        let t = self.w.rd();
        ins!(self.w, "mul.wide.u32 {rows}, {page}, {}", p.page_stride);
        ins!(self.w, "mul.wide.u32 {t}, {slot}, {}", p.row_stride);
        ins!(self.w, "add.s64 {rows}, {rows}, {t}");
        rows
    }

    /// The global address of key row `key` (u32) of the K/V head at `head`
    /// into `src`, through the page table (see [`Self::kv_row_index`]).
    fn kv_row_addr(&mut self, src: Reg, head: Reg, key: Reg, ok: Reg) {
        let rows = self.kv_row_index(key, ok);
        let bytes = self.w.rd();
        ins!(
            self.w,
            "mul.lo.u64 {bytes}, {rows}, {}",
            self.kv_row_bytes()
        );
        ins!(self.w, "add.s64 {src}, {head}, {bytes}");
    }

    /// A K or V tile: [`Self::load_tile_if`] from `gptr` for packed K/V, or
    /// key by key from `key0` through the table for in-place K/V; quantized
    /// K/V (with the head's `scales`) through [`Self::load_rows_dequant`].
    #[allow(clippy::too_many_arguments)]
    fn load_kv_tile_if(
        &mut self,
        loader: &Loader,
        smem_off: usize,
        gptr: Reg,
        key0: Reg,
        valid_rows: Reg,
        when: Option<Reg>,
        scales: Option<Reg>,
    ) {
        let bkv = self.lay.bkv;
        if let (Some(scales), true) = (scales, self.pages.is_some()) {
            return self.load_rows_dequant(smem_off, bkv, gptr, key0, valid_rows, when, scales);
        }
        let key0 = self.pages.is_some().then_some(key0);
        self.load_rows_if(loader, smem_off, bkv, gptr, key0, valid_rows, when);
    }

    /// Stages `rows` quantized K/V rows (keys `key0 ..` of the head at
    /// `head`, found through the page table) into shared memory at
    /// `smem_off`, dequantized to the kernel's type: each thread takes 4
    /// elements of a row at a time (one u32 load), widens them to f32
    /// (int8: sign-extend and convert; fp8 e4m3fn: the exponent rebiased with
    /// integer ops, subnormals `m * 2^-9`, NaN for `S.1111.111`), multiplies
    /// by the row's scale and stores them (f32, or rounded to f16/bf16
    /// pairs). Rows `>= valid_rows` are zero-filled without reading global
    /// memory, scales included. Only where `when` holds; ends an (empty)
    /// `cp.async` group so the group counting of the pipeline is unchanged.
    #[allow(clippy::too_many_arguments)]
    fn load_rows_dequant(
        &mut self,
        smem_off: usize,
        rows: usize,
        head: Reg,
        key0: Reg,
        valid_rows: Reg,
        when: Option<Reg>,
        scales: Reg,
    ) {
        let lay = self.lay.clone();
        let elem = self.quant.as_ref().expect("quantized K/V").elem;
        let cpr = lay.dp / 4;
        let total = rows * cpr;
        let skip = self.w.label("no_dequant");
        if let Some(p) = when {
            ins!(self.w, "@!{p} bra.uni {skip}");
        }
        let (idx, row, col, key, soff) =
            (self.w.r(), self.w.r(), self.w.r(), self.w.r(), self.w.r());
        let (ok, inb) = (self.w.p(), self.w.p());
        let (src, sa, c64) = (self.w.rd(), self.w.rd(), self.w.rd());
        let (word, sc) = (self.w.r(), self.w.f());
        let vals = [self.w.f(), self.w.f(), self.w.f(), self.w.f()];
        let (b, mag, bits, sign, sub) =
            (self.w.r(), self.w.r(), self.w.r(), self.w.r(), self.w.f());
        let (is_sub, is_nan) = (self.w.p(), self.w.p());
        // A loop, not unrolled: unrolled, ptxas issued every iteration's
        // loads up front and spilled (fp8 at D = 128).
        let (top, done) = (self.w.label("dequant"), self.w.label("dequant_done"));
        ins!(self.w, "mov.u32 {idx}, {}", self.tid);
        self.w.place(&top);
        ins!(self.w, ".pragma \"nounroll\"");
        ins!(self.w, "setp.lt.u32 {inb}, {idx}, {total}");
        ins!(self.w, "@!{inb} bra.uni {done}");
        {
            ins!(self.w, "div.u32 {row}, {idx}, {cpr}");
            ins!(self.w, "rem.u32 {col}, {idx}, {cpr}");
            ins!(self.w, "setp.lt.u32 {ok}, {row}, {valid_rows}");
            ins!(self.w, "add.u32 {key}, {key0}, {row}");
            let rix = self.kv_row_index(key, ok);
            ins!(self.w, "mul.lo.u64 {src}, {rix}, {}", lay.dp);
            ins!(self.w, "add.s64 {src}, {head}, {src}");
            ins!(self.w, "mul.wide.u32 {c64}, {col}, 4");
            ins!(self.w, "add.s64 {src}, {src}, {c64}");
            ins!(self.w, "shl.b64 {sa}, {rix}, 2");
            ins!(self.w, "add.s64 {sa}, {scales}, {sa}");
            ins!(self.w, "mov.u32 {word}, 0");
            ins!(self.w, "mov.f32 {sc}, 0f00000000");
            ins!(self.w, "@{ok} ld.global.nc.u32 {word}, [{src}]");
            ins!(self.w, "@{ok} ld.global.nc.f32 {sc}, [{sa}]");
            for (e, v) in vals.iter().enumerate() {
                match elem {
                    ElemType::Int8 => {
                        ins!(self.w, "bfe.s32 {b}, {word}, {}, 8", 8 * e);
                        ins!(self.w, "cvt.rn.f32.s32 {v}, {b}");
                    }
                    _ => {
                        ins!(self.w, "bfe.u32 {b}, {word}, {}, 8", 8 * e);
                        ins!(self.w, "and.b32 {mag}, {b}, 127");
                        ins!(self.w, "and.b32 {sign}, {b}, 128");
                        ins!(self.w, "shl.b32 {sign}, {sign}, 24");
                        // Normal: the exponent rebiased from 7 to 127.
                        ins!(self.w, "shl.b32 {bits}, {mag}, 20");
                        ins!(self.w, "add.u32 {bits}, {bits}, 1006632960");
                        // Subnormal (exponent 0): m * 2^-9.
                        ins!(self.w, "cvt.rn.f32.u32 {sub}, {mag}");
                        ins!(self.w, "mul.rn.f32 {sub}, {sub}, 0f3B000000");
                        ins!(self.w, "setp.lt.u32 {is_sub}, {mag}, 8");
                        ins!(self.w, "mov.b32 {v}, {bits}");
                        ins!(self.w, "selp.f32 {v}, {sub}, {v}, {is_sub}");
                        ins!(self.w, "mov.b32 {bits}, {v}");
                        ins!(self.w, "setp.eq.u32 {is_nan}, {mag}, 127");
                        ins!(self.w, "selp.b32 {bits}, 2143289344, {bits}, {is_nan}");
                        ins!(self.w, "or.b32 {bits}, {bits}, {sign}");
                        ins!(self.w, "mov.b32 {v}, {bits}");
                    }
                }
                ins!(self.w, "mul.rn.f32 {v}, {v}, {sc}");
            }
            let esize = lay.dtype.size();
            ins!(
                self.w,
                "mad.lo.u32 {soff}, {row}, {}, {}",
                lay.row_bytes,
                self.smem
            );
            ins!(self.w, "mad.lo.u32 {soff}, {col}, {}, {soff}", 4 * esize);
            let [v0, v1, v2, v3] = vals;
            match lay.dtype {
                Dtype::F32 => ins!(
                    self.w,
                    "st.shared.v4.f32 [{soff}+{smem_off}], {{{v0}, {v1}, {v2}, {v3}}}"
                ),
                half => {
                    let (lo, hi) = (self.w.r(), self.w.r());
                    let t = half.name();
                    ins!(self.w, "cvt.rn.{t}x2.f32 {lo}, {v1}, {v0}");
                    ins!(self.w, "cvt.rn.{t}x2.f32 {hi}, {v3}, {v2}");
                    ins!(
                        self.w,
                        "st.shared.v2.b32 [{soff}+{smem_off}], {{{lo}, {hi}}}"
                    );
                }
            }
            ins!(self.w, "add.u32 {idx}, {idx}, {}", lay.threads);
            ins!(self.w, "bra.uni {top}");
        }
        self.w.place(&done);
        self.w.place(&skip);
        ins!(self.w, "cp.async.commit_group");
    }

    /// Per-thread constants of the `cp.async` tile loads.
    fn tile_loader_setup(&mut self) -> Loader {
        let lay = &self.lay;
        let cpr = lay.chunks_per_row();
        let (threads, row_bytes, grow) = (lay.threads, lay.row_bytes, lay.global_row_bytes());
        let tid = self.tid;
        if threads % cpr == 0 {
            let (row, col, soff, goff) = (self.w.r(), self.w.r(), self.w.r(), self.w.rd());
            ins!(self.w, "div.u32 {row}, {tid}, {cpr}");
            ins!(self.w, "rem.u32 {col}, {tid}, {cpr}");
            ins!(self.w, "mul.lo.u32 {soff}, {row}, {row_bytes}");
            ins!(self.w, "mad.lo.u32 {soff}, {col}, 16, {soff}");
            ins!(self.w, "add.u32 {soff}, {soff}, {}", self.smem);
            ins!(self.w, "mul.wide.u32 {goff}, {row}, {grow}");
            let c64 = self.w.rd();
            ins!(self.w, "mul.wide.u32 {c64}, {col}, 16");
            ins!(self.w, "add.s64 {goff}, {goff}, {c64}");
            Loader::Strided {
                row,
                soff,
                goff,
                coff: c64,
                rows_per_pass: threads / cpr,
            }
        } else {
            Loader::General
        }
    }

    fn load_tile(
        &mut self,
        loader: &Loader,
        smem_off: usize,
        rows: usize,
        gptr: Reg,
        valid_rows: Reg,
    ) {
        self.load_rows_if(loader, smem_off, rows, gptr, None, valid_rows, None);
    }

    /// Stages `rows` rows of a tile into shared memory at `smem_off` with
    /// `cp.async` (16 bytes per instruction); rows `>= valid_rows` are
    /// zero-filled (source size 0) without reading global memory. Only
    /// where `when` holds; always ends the `cp.async` group.
    /// With `key0`, row `r` is key `key0 + r` of the K/V head at `gptr`,
    /// found through the page table ([`Self::kv_row_addr`]).
    #[allow(clippy::too_many_arguments)]
    fn load_rows_if(
        &mut self,
        loader: &Loader,
        smem_off: usize,
        rows: usize,
        gptr: Reg,
        key0: Option<Reg>,
        valid_rows: Reg,
        when: Option<Reg>,
    ) {
        let lay = self.lay.clone();
        let cpr = lay.chunks_per_row();
        let total = rows * cpr;
        let skip = self.w.label("no_load");
        if let Some(p) = when {
            ins!(self.w, "@!{p} bra.uni {skip}");
        }
        let (ok, src, size) = (self.w.p(), self.w.rd(), self.w.r());
        match *loader {
            Loader::Strided {
                row,
                soff,
                goff,
                coff,
                rows_per_pass,
            } => {
                let r = self.w.r();
                for pass in 0..rows.div_ceil(rows_per_pass) {
                    let dr = pass * rows_per_pass;
                    ins!(self.w, "add.u32 {r}, {row}, {dr}");
                    ins!(self.w, "setp.lt.u32 {ok}, {r}, {valid_rows}");
                    if let Some(key0) = key0 {
                        let key = self.w.r();
                        ins!(self.w, "add.u32 {key}, {key0}, {r}");
                        self.kv_row_addr(src, gptr, key, ok);
                        ins!(self.w, "add.s64 {src}, {src}, {coff}");
                    } else {
                        ins!(self.w, "add.s64 {src}, {gptr}, {goff}");
                        if dr > 0 {
                            ins!(
                                self.w,
                                "add.s64 {src}, {src}, {}",
                                dr * lay.global_row_bytes()
                            );
                        }
                    }
                    ins!(self.w, "selp.b64 {src}, {src}, {gptr}, {ok}");
                    ins!(self.w, "selp.b32 {size}, 16, 0, {ok}");
                    let guard = if (pass + 1) * rows_per_pass > rows {
                        let inb = self.w.p();
                        ins!(self.w, "setp.lt.u32 {inb}, {r}, {rows}");
                        format!("@{inb} ")
                    } else {
                        String::new()
                    };
                    ins!(
                        self.w,
                        "{guard}cp.async.cg.shared.global [{soff}+{}], [{src}], 16, {size}",
                        smem_off + dr * lay.row_bytes
                    );
                }
            }
            Loader::General => {
                let (idx, row, col, soff, goff) =
                    (self.w.r(), self.w.r(), self.w.r(), self.w.r(), self.w.rd());
                for i in 0..total.div_ceil(lay.threads) {
                    ins!(self.w, "add.u32 {idx}, {}, {}", self.tid, i * lay.threads);
                    ins!(self.w, "div.u32 {row}, {idx}, {cpr}");
                    ins!(self.w, "rem.u32 {col}, {idx}, {cpr}");
                    ins!(self.w, "setp.lt.u32 {ok}, {row}, {valid_rows}");
                    if let Some(key0) = key0 {
                        let key = self.w.r();
                        ins!(self.w, "add.u32 {key}, {key0}, {row}");
                        self.kv_row_addr(src, gptr, key, ok);
                    } else {
                        ins!(
                            self.w,
                            "mul.wide.u32 {goff}, {row}, {}",
                            lay.global_row_bytes()
                        );
                        ins!(self.w, "add.s64 {src}, {gptr}, {goff}");
                    }
                    ins!(self.w, "mul.wide.u32 {goff}, {col}, 16");
                    ins!(self.w, "add.s64 {src}, {src}, {goff}");
                    ins!(self.w, "selp.b64 {src}, {src}, {gptr}, {ok}");
                    ins!(self.w, "selp.b32 {size}, 16, 0, {ok}");
                    ins!(
                        self.w,
                        "mad.lo.u32 {soff}, {row}, {}, {}",
                        lay.row_bytes,
                        self.smem
                    );
                    ins!(self.w, "mad.lo.u32 {soff}, {col}, 16, {soff}");
                    let guard = if (i + 1) * lay.threads > total {
                        let inb = self.w.p();
                        ins!(self.w, "setp.lt.u32 {inb}, {idx}, {total}");
                        format!("@{inb} ")
                    } else {
                        String::new()
                    };
                    ins!(
                        self.w,
                        "{guard}cp.async.cg.shared.global [{soff}+{smem_off}], [{src}], 16, {size}"
                    );
                }
            }
        }
        self.w.place(&skip);
        ins!(self.w, "cp.async.commit_group");
    }

    /// The shared address this lane gives `ldmatrix` for an A operand (Q)
    /// or a transposed B operand (V): row `lane % 8 + 8 * (lane / 8 % 2)`,
    /// column block `lane / 16`.
    fn a_lane_offset(&mut self, region: usize, with_warp: bool) -> Reg {
        let lay = &self.lay;
        let (row_bytes, lane) = (lay.row_bytes, self.lane);
        let (r, t) = (self.w.r(), self.w.r());
        ins!(self.w, "and.b32 {r}, {lane}, 7");
        ins!(self.w, "bfe.u32 {t}, {lane}, 3, 1");
        ins!(self.w, "mad.lo.u32 {r}, {t}, 8, {r}");
        if with_warp {
            ins!(self.w, "mad.lo.u32 {r}, {}, 16, {r}", self.warp);
        }
        ins!(self.w, "mul.lo.u32 {r}, {r}, {row_bytes}");
        ins!(self.w, "shr.u32 {t}, {lane}, 4");
        ins!(self.w, "mad.lo.u32 {r}, {t}, 16, {r}");
        ins!(self.w, "add.u32 {r}, {r}, {}", self.smem);
        ins!(self.w, "add.u32 {r}, {r}, {region}");
        r
    }

    /// The shared address this lane gives `ldmatrix` for the K operand:
    /// key `lane % 8 + 8 * (lane / 16)`, column block `lane / 8 % 2`.
    fn b_lane_offset(&mut self, region: usize) -> Reg {
        let lay = &self.lay;
        let (row_bytes, lane) = (lay.row_bytes, self.lane);
        let (r, t) = (self.w.r(), self.w.r());
        ins!(self.w, "and.b32 {r}, {lane}, 7");
        ins!(self.w, "shr.u32 {t}, {lane}, 4");
        ins!(self.w, "mad.lo.u32 {r}, {t}, 8, {r}");
        ins!(self.w, "mul.lo.u32 {r}, {r}, {row_bytes}");
        ins!(self.w, "bfe.u32 {t}, {lane}, 3, 1");
        ins!(self.w, "mad.lo.u32 {r}, {t}, 16, {r}");
        ins!(self.w, "add.u32 {r}, {r}, {}", self.smem);
        ins!(self.w, "add.u32 {r}, {r}, {region}");
        r
    }

    /// Four fresh 32-bit registers.
    fn regs4(&mut self) -> [Reg; 4] {
        [self.w.r(), self.w.r(), self.w.r(), self.w.r()]
    }

    /// `ldmatrix .x4` (`.trans` when `trans`): four 8x8 b16 matrices from
    /// shared memory at `base + offset` into `dst`.
    fn ldmatrix_x4(&mut self, dst: [Reg; 4], trans: bool, base: Reg, offset: usize) {
        let t = if trans { ".trans" } else { "" };
        let [d0, d1, d2, d3] = dst;
        ins!(
            self.w,
            "ldmatrix.sync.aligned.m8n8.x4{t}.shared.b16 {{{d0}, {d1}, {d2}, {d3}}}, [{base}+{offset}]"
        );
    }

    fn mma(&mut self, d: [Reg; 4], a: [Reg; 4], b0: Reg, b1: Reg) {
        let ty = mma_type(self.lay.dtype);
        ins!(
            self.w,
            "mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 {{{}, {}, {}, {}}}, {{{}, {}, {}, {}}}, {{{b0}, {b1}}}, {{{}, {}, {}, {}}}",
            d[0],
            d[1],
            d[2],
            d[3],
            a[0],
            a[1],
            a[2],
            a[3],
            d[0],
            d[1],
            d[2],
            d[3]
        );
    }

    /// S = Q Kᵀ for the warp's 16 rows and the tile's columns.
    fn qk(&mut self) {
        let lay = self.lay.clone();
        self.w.section("S = Q K^T");
        for nb in 0..lay.bkv / 8 {
            for r in self.s[nb] {
                ins!(self.w, "mov.f32 {r}, {}", f32_imm(0.0));
            }
        }
        if lay.dtype.uses_mma() {
            let b_off = self.b_lane_offset(lay.k_off);
            let a_off = if lay.q_in_regs {
                None
            } else {
                Some(self.a_lane_offset(lay.q_off, true))
            };
            for ks in 0..lay.dp / 16 {
                let a = match a_off {
                    None => self.qf[ks],
                    Some(off) => {
                        let a = self.regs4();
                        self.ldmatrix_x4(a, false, off, ks * 32);
                        a
                    }
                };
                for p in 0..lay.bkv / 16 {
                    let kf = self.regs4();
                    self.ldmatrix_x4(kf, false, b_off, p * 16 * lay.row_bytes + ks * 32);
                    self.mma(self.s[2 * p], a, kf[0], kf[1]);
                    self.mma(self.s[2 * p + 1], a, kf[2], kf[3]);
                }
            }
        } else {
            // Rows g and g + 8 of Q against columns 2 t4 + e of every 8-block of K.
            let (q0, kp, end, t, p) = (self.w.r(), self.w.r(), self.w.r(), self.w.r(), self.w.p());
            ins!(self.w, "mad.lo.u32 {t}, {}, 16, {}", self.warp, self.g);
            ins!(
                self.w,
                "mad.lo.u32 {q0}, {t}, {}, {}",
                lay.row_bytes,
                self.smem
            );
            ins!(self.w, "add.u32 {q0}, {q0}, {}", lay.q_off);
            ins!(self.w, "add.u32 {end}, {q0}, {}", lay.dp * 4);
            ins!(self.w, "shl.b32 {t}, {}, 1", self.t4);
            ins!(
                self.w,
                "mad.lo.u32 {kp}, {t}, {}, {}",
                lay.row_bytes,
                self.smem
            );
            ins!(self.w, "add.u32 {kp}, {kp}, {}", lay.k_off);
            let top = self.w.label("qk");
            self.w.place(&top);
            let qa = [self.w.f(), self.w.f(), self.w.f(), self.w.f()];
            let qb = [self.w.f(), self.w.f(), self.w.f(), self.w.f()];
            ins!(
                self.w,
                "ld.shared.v4.f32 {{{}, {}, {}, {}}}, [{q0}]",
                qa[0],
                qa[1],
                qa[2],
                qa[3]
            );
            ins!(
                self.w,
                "ld.shared.v4.f32 {{{}, {}, {}, {}}}, [{q0}+{}]",
                qb[0],
                qb[1],
                qb[2],
                qb[3],
                8 * lay.row_bytes
            );
            for nb in 0..lay.bkv / 8 {
                for e in 0..2 {
                    let kk = [self.w.f(), self.w.f(), self.w.f(), self.w.f()];
                    ins!(
                        self.w,
                        "ld.shared.v4.f32 {{{}, {}, {}, {}}}, [{kp}+{}]",
                        kk[0],
                        kk[1],
                        kk[2],
                        kk[3],
                        (nb * 8 + e) * lay.row_bytes
                    );
                    let (s0, s1) = (self.s[nb][e], self.s[nb][2 + e]);
                    for i in 0..4 {
                        ins!(self.w, "fma.rn.f32 {s0}, {}, {}, {s0}", qa[i], kk[i]);
                        ins!(self.w, "fma.rn.f32 {s1}, {}, {}, {s1}", qb[i], kk[i]);
                    }
                }
            }
            ins!(self.w, "add.u32 {q0}, {q0}, 16");
            ins!(self.w, "add.u32 {kp}, {kp}, 16");
            ins!(self.w, "setp.lt.u32 {p}, {q0}, {end}");
            ins!(self.w, "@{p} bra.uni {top}");
        }
    }

    /// The score of every owned element of a FULL or PARTIAL tile, from the
    /// column- and element-level IR code of that loop; the result replaces
    /// the tile score in `s`. `kv0` is the position (`kv_offset` + row) of
    /// the thread's first column.
    fn tile_body(&mut self, section: Section, kv0: Reg) {
        let lay = self.lay.clone();
        let col_insts = self.insts_at(Level::Col, section);
        let elem_insts = self.insts_at(Level::Elem, section);
        let row_ids: Vec<usize> = (0..self.k.insts.len())
            .filter(|&i| self.k.insts[i].level == Level::Row)
            .collect();
        let root = match section {
            Section::Partial => self.k.score_partial,
            _ => self.k.score_full,
        };
        let neg_inf = f32_imm(f32::NEG_INFINITY);
        for nb in 0..lay.bkv / 8 {
            for e in 0..2 {
                let kv = self.w.rd();
                ins!(self.w, "add.s64 {kv}, {kv0}, {}", nb * 8 + e);
                self.ctx = Ctx {
                    level: Some(Level::Col),
                    b: Some(self.b64),
                    h: Some(self.h64),
                    kv: Some(kv),
                    ..Ctx::default()
                };
                for &v in &col_insts {
                    self.lower(v);
                }
                let col_valid = self.ctx.col_valid;
                for half in 0..2 {
                    for &i in &row_ids {
                        self.env[i] = self.row_vals[half][i];
                    }
                    let sreg = self.s[nb][2 * half + e];
                    self.ctx = Ctx {
                        level: Some(Level::Elem),
                        b: Some(self.b64),
                        h: Some(self.h64),
                        q: Some(self.q_abs[half]),
                        kv: Some(kv),
                        tile_score: Some(sreg),
                        row_valid: Some(self.row_valid[half]),
                        col_valid,
                        elem_valid: None,
                        gate: None,
                    };
                    for &v in &elem_insts {
                        self.lower(v);
                    }
                    let score = self.get(root);
                    if section == Section::Partial {
                        // Masked and past-KV columns are -inf.
                        let cv = self.col_valid();
                        let keep = match self.k.mask {
                            Some(m) => {
                                let m = self.get(m);
                                self.and_opt(Some(m), Some(cv)).expect("both present")
                            }
                            None => cv,
                        };
                        ins!(self.w, "selp.f32 {sreg}, {score}, {neg_inf}, {keep}");
                    } else if score != sreg {
                        ins!(self.w, "mov.f32 {sreg}, {score}");
                    }
                }
            }
        }
    }

    /// Columns at or past the key rows of a ragged FULL tile become -inf.
    fn tail_mask(&mut self, kv0: Reg) {
        let lay = self.lay.clone();
        let kv_len = self.kv_rows64;
        let neg_inf = f32_imm(f32::NEG_INFINITY);
        for nb in 0..lay.bkv / 8 {
            for e in 0..2 {
                let (kv, p) = (self.w.rd(), self.w.p());
                ins!(self.w, "add.s64 {kv}, {kv0}, {}", nb * 8 + e);
                ins!(self.w, "setp.ge.s64 {p}, {kv}, {kv_len}");
                for half in 0..2 {
                    ins!(
                        self.w,
                        "@{p} mov.f32 {}, {neg_inf}",
                        self.s[nb][2 * half + e]
                    );
                }
            }
        }
    }

    /// One online-softmax step over the tile for both owned rows.
    fn online_softmax(&mut self) {
        let lay = self.lay.clone();
        let exp2 = self.k.schedule.exp2;
        self.w.section(
            "online softmax: m' = max(m, rowmax s), p = exp(s - m'), l = l exp(m - m') + rowsum p",
        );
        for half in 0..2 {
            let (mx, t, mnew, muse, alpha, isinf) = (
                self.w.f(),
                self.w.f(),
                self.w.f(),
                self.w.f(),
                self.w.f(),
                self.w.p(),
            );
            let cols: Vec<Reg> = (0..lay.bkv / 8)
                .flat_map(|nb| [self.s[nb][2 * half], self.s[nb][2 * half + 1]])
                .collect();
            ins!(self.w, "max.f32 {mx}, {}, {}", cols[0], cols[1]);
            for c in &cols[2..] {
                ins!(self.w, "max.f32 {mx}, {mx}, {c}");
            }
            for lanes in [1, 2] {
                ins!(self.w, "shfl.sync.bfly.b32 {t}, {mx}, {lanes}, 31, -1");
                ins!(self.w, "max.f32 {mx}, {mx}, {t}");
            }
            let (m, l) = (self.m[half], self.l[half]);
            ins!(self.w, "max.f32 {mnew}, {m}, {mx}");
            // A row with nothing visible yet keeps m = -inf, l = 0, acc = 0:
            // exponentiate against 0 instead of -inf.
            ins!(
                self.w,
                "setp.eq.f32 {isinf}, {mnew}, {}",
                f32_imm(f32::NEG_INFINITY)
            );
            ins!(self.w, "selp.f32 {muse}, {}, {mnew}, {isinf}", f32_imm(0.0));
            ins!(self.w, "sub.rn.f32 {alpha}, {m}, {muse}");
            self.exp_in_place(alpha, exp2);
            ins!(self.w, "mov.f32 {m}, {mnew}");
            ins!(self.w, "mul.rn.f32 {l}, {l}, {alpha}");
            for nb in 0..lay.dp / 8 {
                for e in 0..2 {
                    let r = self.o[nb][2 * half + e];
                    ins!(self.w, "mul.rn.f32 {r}, {r}, {alpha}");
                }
            }
            for c in cols {
                ins!(self.w, "sub.rn.f32 {c}, {c}, {muse}");
                self.exp_in_place(c, exp2);
                ins!(self.w, "add.rn.f32 {l}, {l}, {c}");
            }
        }
    }

    /// `x = exp2(x)`, or `exp(x)` when the kernel works in natural units.
    fn exp_in_place(&mut self, x: Reg, exp2: bool) {
        if !exp2 {
            ins!(
                self.w,
                "mul.rn.f32 {x}, {x}, {}",
                f32_imm(std::f32::consts::LOG2_E)
            );
        }
        ins!(self.w, "ex2.approx.ftz.f32 {x}, {x}");
    }

    /// O += P V. A key whose probability is 0 (masked, past KV, or
    /// underflowed) must not touch the accumulators, as in the reference:
    /// `0 × NaN` and `0 × inf` are NaN. The f32 path predicates every FMA on
    /// `p != 0`; the mma path multiplies densely (key tiles whose V tile the
    /// host flagged as holding a non-finite value take [`Self::pv_exact`]
    /// instead, chosen in the key-tile loop).
    fn pv(&mut self) {
        let lay = self.lay.clone();
        self.w.section("O += P V");
        if lay.dtype.uses_mma() {
            // The S accumulator layout of two 8-column blocks is the A
            // operand layout of one 16-key step.
            let cvt = match lay.dtype {
                Dtype::F16 => "cvt.rn.f16x2.f32",
                _ => "cvt.rn.bf16x2.f32",
            };
            let mut pf = Vec::new();
            for ks in 0..lay.bkv / 16 {
                let a = [self.w.r(), self.w.r(), self.w.r(), self.w.r()];
                let (lo, hi) = (self.s[2 * ks], self.s[2 * ks + 1]);
                // The first source goes to the upper half: (column + 1, column).
                ins!(self.w, "{cvt} {}, {}, {}", a[0], lo[1], lo[0]);
                ins!(self.w, "{cvt} {}, {}, {}", a[1], lo[3], lo[2]);
                ins!(self.w, "{cvt} {}, {}, {}", a[2], hi[1], hi[0]);
                ins!(self.w, "{cvt} {}, {}, {}", a[3], hi[3], hi[2]);
                pf.push(a);
            }
            let v_off = self.a_lane_offset(lay.v_off, false);
            for (ks, a) in pf.into_iter().enumerate() {
                for p in 0..lay.dp / 16 {
                    let vf = self.regs4();
                    self.ldmatrix_x4(vf, true, v_off, ks * 16 * lay.row_bytes + p * 32);
                    self.mma(self.o[2 * p], a, vf[0], vf[1]);
                    self.mma(self.o[2 * p + 1], a, vf[2], vf[3]);
                }
            }
        } else {
            // P goes through the warp's shared tile: each thread then reads
            // its two rows' p for every key.
            let (pw, t) = (self.w.r(), self.w.r());
            ins!(self.w, "mad.lo.u32 {t}, {}, 16, {}", self.warp, self.g);
            ins!(
                self.w,
                "mad.lo.u32 {pw}, {t}, {}, {}",
                lay.p_row_bytes,
                self.smem
            );
            ins!(self.w, "add.u32 {pw}, {pw}, {}", lay.p_off);
            let pt = self.w.r();
            ins!(self.w, "mad.lo.u32 {pt}, {}, 8, {pw}", self.t4);
            for half in 0..2 {
                for nb in 0..lay.bkv / 8 {
                    let (a, b) = (self.s[nb][2 * half], self.s[nb][2 * half + 1]);
                    ins!(
                        self.w,
                        "st.shared.v2.f32 [{pt}+{}], {{{a}, {b}}}",
                        half * 8 * lay.p_row_bytes + nb * 32
                    );
                }
            }
            ins!(self.w, "bar.warp.sync -1");
            let (vp, end, p) = (self.w.r(), self.w.r(), self.w.p());
            ins!(self.w, "mad.lo.u32 {vp}, {}, 8, {}", self.t4, self.smem);
            ins!(self.w, "add.u32 {vp}, {vp}, {}", lay.v_off);
            ins!(self.w, "add.u32 {end}, {pw}, {}", lay.bkv * 4);
            let top = self.w.label("pv");
            self.w.place(&top);
            let (p0, p1) = (self.w.f(), self.w.f());
            let (use0, use1) = (self.w.p(), self.w.p());
            ins!(self.w, "ld.shared.f32 {p0}, [{pw}]");
            ins!(self.w, "ld.shared.f32 {p1}, [{pw}+{}]", 8 * lay.p_row_bytes);
            // Keys with p = 0 are skipped (unordered: a NaN p still counts).
            let zero = f32_imm(0.0);
            ins!(self.w, "setp.neu.f32 {use0}, {p0}, {zero}");
            ins!(self.w, "setp.neu.f32 {use1}, {p1}, {zero}");
            for nb in 0..lay.dp / 8 {
                let (x, y) = (self.w.f(), self.w.f());
                ins!(self.w, "ld.shared.v2.f32 {{{x}, {y}}}, [{vp}+{}]", nb * 32);
                let o = self.o[nb];
                ins!(self.w, "@{use0} fma.rn.f32 {}, {p0}, {x}, {}", o[0], o[0]);
                ins!(self.w, "@{use0} fma.rn.f32 {}, {p0}, {y}, {}", o[1], o[1]);
                ins!(self.w, "@{use1} fma.rn.f32 {}, {p1}, {x}, {}", o[2], o[2]);
                ins!(self.w, "@{use1} fma.rn.f32 {}, {p1}, {y}, {}", o[3], o[3]);
            }
            ins!(self.w, "add.u32 {pw}, {pw}, 4");
            ins!(self.w, "add.u32 {vp}, {vp}, {}", lay.row_bytes);
            ins!(self.w, "setp.lt.u32 {p}, {pw}, {end}");
            ins!(self.w, "@{p} bra.uni {top}");
            ins!(self.w, "bar.warp.sync -1");
        }
    }

    /// O += P V on the mma path for a V tile with a non-finite value: f32
    /// FMAs in the accumulator layout, each predicated on `p != 0`. Key
    /// `nb * 8 + 2 j + e`'s p of rows g and g + 8 lives in lane `4 g + j`
    /// (`s[nb][e]`, `s[nb][2 + e]`) and comes over by `shfl.sync.idx`; its
    /// V row is read from the V tile in shared memory (rows of `row_bytes`,
    /// unswizzled), two head dims `nb' * 8 + 2 t4 + {0, 1}` per 32-bit word,
    /// widened to f32. A loop over j, unrolled over the key blocks and the
    /// head dim. Slow, and only for flagged tiles.
    fn pv_exact(&mut self) {
        let lay = self.lay.clone();
        self.w.section(
            "O += P V, exact: this V tile holds NaN or inf: f32 FMAs from shared memory, keys with p = 0 skipped",
        );
        let (src, vrow, end, more) = (self.w.r(), self.w.r(), self.w.r(), self.w.p());
        ins!(self.w, "and.b32 {src}, {}, 28", self.lane);
        ins!(self.w, "mad.lo.u32 {vrow}, {}, 4, {}", self.t4, self.smem);
        ins!(self.w, "add.u32 {vrow}, {vrow}, {}", lay.v_off);
        ins!(self.w, "add.u32 {end}, {vrow}, {}", 8 * lay.row_bytes);
        let top = self.w.label("pv_exact_key");
        self.w.place(&top);
        let zero = f32_imm(0.0);
        for nb in 0..lay.bkv / 8 {
            for e in 0..2 {
                let (p0, p1, use0, use1) = (self.w.f(), self.w.f(), self.w.p(), self.w.p());
                ins!(
                    self.w,
                    "shfl.sync.idx.b32 {p0}, {}, {src}, 31, -1",
                    self.s[nb][e]
                );
                ins!(
                    self.w,
                    "shfl.sync.idx.b32 {p1}, {}, {src}, 31, -1",
                    self.s[nb][2 + e]
                );
                // Unordered: a NaN p (a NaN score) still reaches the row.
                ins!(self.w, "setp.neu.f32 {use0}, {p0}, {zero}");
                ins!(self.w, "setp.neu.f32 {use1}, {p1}, {zero}");
                let key = (nb * 8 + e) * lay.row_bytes;
                for dnb in 0..lay.dp / 8 {
                    let (x, y) = match lay.dtype {
                        Dtype::F16 => {
                            let (h0, h1, x, y) = (self.w.h(), self.w.h(), self.w.f(), self.w.f());
                            ins!(
                                self.w,
                                "ld.shared.v2.b16 {{{h0}, {h1}}}, [{vrow}+{}]",
                                key + dnb * 16
                            );
                            ins!(self.w, "cvt.f32.f16 {x}, {h0}");
                            ins!(self.w, "cvt.f32.f16 {y}, {h1}");
                            (x, y)
                        }
                        _ => {
                            // bf16 is the upper half of an f32.
                            let (w, x, y) = (self.w.r(), self.w.r(), self.w.r());
                            ins!(self.w, "ld.shared.b32 {w}, [{vrow}+{}]", key + dnb * 16);
                            ins!(self.w, "shl.b32 {x}, {w}, 16");
                            ins!(self.w, "and.b32 {y}, {w}, -65536");
                            (x, y)
                        }
                    };
                    let o = self.o[dnb];
                    ins!(self.w, "@{use0} fma.rn.f32 {}, {p0}, {x}, {}", o[0], o[0]);
                    ins!(self.w, "@{use0} fma.rn.f32 {}, {p0}, {y}, {}", o[1], o[1]);
                    ins!(self.w, "@{use1} fma.rn.f32 {}, {p1}, {x}, {}", o[2], o[2]);
                    ins!(self.w, "@{use1} fma.rn.f32 {}, {p1}, {y}, {}", o[3], o[3]);
                }
            }
        }
        ins!(self.w, "add.u32 {src}, {src}, 1");
        ins!(self.w, "add.u32 {vrow}, {vrow}, {}", 2 * lay.row_bytes);
        ins!(self.w, "setp.lt.u32 {more}, {vrow}, {end}");
        ins!(self.w, "@{more} bra.uni {top}");
    }

    /// out = acc / l and lse per owned row; rows that saw no key get 0 and
    /// -inf; rows past Q are not stored.
    fn epilogue(&mut self, out_ptr: Reg, lse_ptr: Reg, bh: Reg, q_len: Reg, row0: Reg) {
        let lay = self.lay.clone();
        let exp2 = self.k.schedule.exp2;
        self.w.section("epilogue: out = acc / l, lse");
        let (qrow, t, lead) = (self.w.r(), self.w.r(), self.w.p());
        ins!(self.w, "setp.eq.u32 {lead}, {}, 0", self.t4);
        // The row sums are per-thread partial sums: reduce over the quad
        // (before any divergent store).
        for half in 0..2 {
            let (l, t_f) = (self.l[half], self.w.f());
            for lanes in [1, 2] {
                ins!(self.w, "shfl.sync.bfly.b32 {t_f}, {l}, {lanes}, 31, -1");
                ins!(self.w, "add.rn.f32 {l}, {l}, {t_f}");
            }
        }
        for half in 0..2 {
            let (l, m) = (self.l[half], self.m[half]);
            let (inv, lse, empty, p) = (self.w.f(), self.w.f(), self.w.p(), self.w.p());
            ins!(self.w, "setp.eq.f32 {empty}, {l}, {}", f32_imm(0.0));
            ins!(
                self.w,
                "setp.eq.and.f32 {empty}, {m}, {}, {empty}",
                f32_imm(f32::NEG_INFINITY)
            );
            ins!(self.w, "rcp.rn.f32 {inv}, {l}");
            ins!(self.w, "selp.f32 {inv}, {}, {inv}, {empty}", f32_imm(0.0));
            ins!(self.w, "lg2.approx.f32 {lse}, {l}");
            if exp2 {
                ins!(self.w, "add.rn.f32 {lse}, {lse}, {m}");
                ins!(
                    self.w,
                    "mul.rn.f32 {lse}, {lse}, {}",
                    f32_imm(std::f32::consts::LN_2)
                );
            } else {
                ins!(
                    self.w,
                    "mul.rn.f32 {lse}, {lse}, {}",
                    f32_imm(std::f32::consts::LN_2)
                );
                ins!(self.w, "add.rn.f32 {lse}, {lse}, {m}");
            }
            ins!(
                self.w,
                "selp.f32 {lse}, {}, {lse}, {empty}",
                f32_imm(f32::NEG_INFINITY)
            );
            // Global row index and validity.
            ins!(self.w, "mad.lo.u32 {t}, {}, 16, {}", self.warp, self.g);
            ins!(self.w, "add.u32 {qrow}, {row0}, {t}");
            if half == 1 {
                ins!(self.w, "add.u32 {qrow}, {qrow}, 8");
            }
            ins!(self.w, "setp.lt.u32 {p}, {qrow}, {q_len}");
            let skip = self.w.label("no_row");
            ins!(self.w, "@!{p} bra {skip}");
            let (row, oa, la) = (self.w.rd(), self.w.rd(), self.w.rd());
            ins!(self.w, "mul.wide.u32 {row}, {bh}, {q_len}");
            let q64 = self.w.rd();
            ins!(self.w, "cvt.u64.u32 {q64}, {qrow}");
            ins!(self.w, "add.s64 {row}, {row}, {q64}");
            ins!(self.w, "shl.b64 {la}, {row}, 2");
            ins!(self.w, "add.s64 {la}, {lse_ptr}, {la}");
            ins!(self.w, "@{lead} st.global.f32 [{la}], {lse}");
            ins!(self.w, "mul.lo.u64 {oa}, {row}, {}", lay.dp * 4);
            ins!(self.w, "add.s64 {oa}, {out_ptr}, {oa}");
            let c = self.w.rd();
            ins!(self.w, "mul.wide.u32 {c}, {}, 8", self.t4);
            ins!(self.w, "add.s64 {oa}, {oa}, {c}");
            for nb in 0..lay.dp / 8 {
                let (x, y) = (self.w.f(), self.w.f());
                ins!(self.w, "mul.rn.f32 {x}, {}, {inv}", self.o[nb][2 * half]);
                ins!(
                    self.w,
                    "mul.rn.f32 {y}, {}, {inv}",
                    self.o[nb][2 * half + 1]
                );
                ins!(self.w, "st.global.v2.f32 [{oa}+{}], {{{x}, {y}}}", nb * 32);
            }
            self.w.place(&skip);
        }
    }
}

/// The block-map walk state (u32 registers, uniform over the CTA).
struct TileIter {
    /// Current FULL range index and the end of this query tile's ranges.
    fr: Reg,
    fr_end: Reg,
    /// End of the current FULL range.
    f_end: Reg,
    /// Next PARTIAL index and the end of this query tile's list.
    pi: Reg,
    p_end: Reg,
    map_full: Reg,
    map_partial: Reg,
}

/// How threads split a tile into 16-byte `cp.async` chunks.
/// How in-place K/V rows are found ([`KvSource::InPlace`]): key `j` of KV
/// head `kh` of the sequence is row `table_row[j / page_size] * page_stride +
/// (j % page_size) * row_stride + kh * head_stride` of k (and v), all u32 in
/// rows of the padded head dim. A paged pool `[P, page_size, HKV, Dp]` has
/// `page_stride = page_size * HKV`, `row_stride = HKV`, `head_stride = 1`;
/// dense rows `[B, HKV, rows, Dp]` are one page per sequence.
#[derive(Clone, Debug)]
struct Pages {
    /// This sequence's table row (global address of u32 page numbers).
    table_row: Reg,
    page_size: Reg,
    page_stride: Reg,
    row_stride: Reg,
    head_stride: Reg,
}

/// Quantized K/V: the stored type and the global address of the scale of
/// row 0 of this CTA's K and V head (scales are f32, one per row, indexed
/// like the rows).
#[derive(Clone, Debug)]
struct Quant {
    elem: ElemType,
    k_scales: Reg,
    v_scales: Reg,
}

enum Loader {
    /// Threads are a multiple of the chunks per row: every thread keeps
    /// its column and steps `rows_per_pass` rows at a time.
    Strided {
        row: Reg,
        soff: Reg,
        goff: Reg,
        /// The column's byte offset within a row (`goff` less the row's).
        coff: Reg,
        rows_per_pass: usize,
    },
    /// Otherwise chunk `tid + i * threads` of the tile, row-major.
    General,
}
