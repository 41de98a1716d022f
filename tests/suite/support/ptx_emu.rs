//! A small PTX emulator for the subset of PTX that `codegen::ptx` emits, so
//! the generated kernels can be run against the tile interpreter on a CPU.
//!
//! It is written from the PTX ISA's definitions, independently of the
//! generator: SIMT threads run one at a time until they reach a collective
//! (`bar.sync`, `bar.warp.sync`, `shfl.sync`, `ldmatrix`, `mma.sync`); a warp
//! collective runs when all 32 lanes wait at the same instruction, a CTA
//! barrier when every live thread waits at it. `cp.async` copies at once.
//! The approximate instructions (`ex2.approx`, `lg2.approx`, `rcp.approx`,
//! `tanh.approx`) are off by the maximum error the PTX ISA allows them, as
//! [`Approx`] says; `.ftz` flushes subnormal operands and
//! results to zero; the IEEE ones (`.rn`) are exact.
#![allow(dead_code)]

use std::collections::HashMap;

#[derive(Clone, Debug)]
enum Opd {
    Reg(usize),
    Imm(i64),
    F(u32),
    Vec(Vec<usize>),
    Mem(Box<Opd>, i64),
    Sym(String),
    Special(String),
}

#[derive(Clone, Debug)]
struct Inst {
    guard: Option<(usize, bool)>,
    op: String,
    args: Vec<Opd>,
    text: String,
}

/// How the approximate instructions err. Each is modelled at the bound the
/// PTX ISA states for it: `ex2.approx` 2^-22 relative, `lg2.approx` 2^-22
/// absolute (relative beyond |result| = 1), `rcp.approx` 1 ulp,
/// `tanh.approx` 2^-10.987 relative. Special values come out exact (NaN,
/// ±inf, ±0, `tanh(±inf) = ±1`, `tanh` of a subnormal is itself), and so do
/// `ex2` of an integer and `lg2` of a power of two.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Approx {
    /// Correctly rounded results (no approximation error).
    Exact,
    /// Off by the full bound, up or down as a hash of the operands picks:
    /// every result as far off as the hardware may be, the errors of
    /// different elements independent.
    Scattered,
    /// Off by the full bound toward zero, everywhere (a systematic bias).
    Low,
    /// Off by the full bound away from zero, everywhere.
    High,
}

/// A parsed kernel.
pub struct Program {
    insts: Vec<Inst>,
    labels: HashMap<String, usize>,
    nregs: usize,
    pub static_smem: usize,
    /// The error model of the approximate instructions; `Scattered` unless
    /// set otherwise.
    pub approx: Approx,
}

fn split_args(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth) = (Vec::new(), String::new(), 0);
    for c in s.chars() {
        match c {
            '{' | '[' => depth += 1,
            '}' | ']' => depth -= 1,
            _ => {}
        }
        if c == ',' && depth == 0 {
            out.push(cur.trim().to_string());
            cur.clear();
        } else {
            cur.push(c);
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

impl Program {
    pub fn parse(text: &str) -> Program {
        let mut regs: HashMap<String, usize> = HashMap::new();
        let mut reg = |name: &str| {
            let n = regs.len();
            *regs.entry(name.to_string()).or_insert(n)
        };
        let body = &text[text.find("\n{").expect("entry body") + 2..];
        let mut insts = Vec::new();
        let mut labels = HashMap::new();
        let mut static_smem = 0;
        for line in body.lines() {
            let l = line.trim();
            if l.is_empty()
                || l.starts_with("//")
                || l == "}"
                || l.starts_with(".reg")
                || l.starts_with(".pragma")
            {
                continue;
            }
            if l.starts_with(".shared") {
                static_smem = l[l.find('[').unwrap() + 1..l.find(']').unwrap()]
                    .parse()
                    .unwrap();
                continue;
            }
            if let Some(name) = l.strip_suffix(':') {
                labels.insert(name.to_string(), insts.len());
                continue;
            }
            let l = l.strip_suffix(';').unwrap_or_else(|| panic!("no `;`: {l}"));
            let (guard, rest) = if let Some(g) = l.strip_prefix('@') {
                let (p, rest) = g.split_once(' ').unwrap();
                let (neg, p) = match p.strip_prefix('!') {
                    Some(p) => (true, p),
                    None => (false, p),
                };
                (Some((reg(p), neg)), rest.trim())
            } else {
                (None, l)
            };
            let (op, args) = rest.split_once(' ').unwrap_or((rest, ""));
            let mut parse_opd = |a: &str| -> Opd {
                let a = a.trim();
                if let Some(inner) = a.strip_prefix('{') {
                    Opd::Vec(
                        inner
                            .trim_end_matches('}')
                            .split(',')
                            .map(|r| reg(r.trim()))
                            .collect(),
                    )
                } else if let Some(inner) = a.strip_prefix('[') {
                    let inner = inner.trim_end_matches(']');
                    let (base, off) = match inner.split_once('+') {
                        Some((b, o)) => (b, o.parse::<i64>().unwrap()),
                        None => (inner, 0),
                    };
                    let b = if base.starts_with('%') {
                        Opd::Reg(reg(base))
                    } else {
                        Opd::Sym(base.to_string())
                    };
                    Opd::Mem(Box::new(b), off)
                } else if a.starts_with("%tid")
                    || a.starts_with("%ctaid")
                    || a.starts_with("%nctaid")
                {
                    Opd::Special(a.to_string())
                } else if a.starts_with('%') {
                    Opd::Reg(reg(a))
                } else if let Some(h) = a.strip_prefix("0f") {
                    Opd::F(u32::from_str_radix(h, 16).unwrap())
                } else if let Ok(i) = a.parse::<i64>() {
                    Opd::Imm(i)
                } else {
                    Opd::Sym(a.to_string())
                }
            };
            let args = split_args(args).iter().map(|a| parse_opd(a)).collect();
            insts.push(Inst {
                guard,
                op: op.to_string(),
                args,
                text: rest.to_string(),
            });
        }
        Program {
            insts,
            labels,
            nregs: regs.len(),
            static_smem,
            approx: Approx::Scattered,
        }
    }
}

/// Device memory: disjoint regions at fake addresses.
#[derive(Default)]
pub struct Memory {
    regions: Vec<(u64, Vec<u8>)>,
}

impl Memory {
    /// Adds a region and returns its address.
    pub fn alloc(&mut self, data: Vec<u8>) -> u64 {
        let base = (self.regions.len() as u64 + 1) << 36;
        self.regions.push((base, data));
        base
    }

    pub fn bytes(&self, base: u64) -> &[u8] {
        &self.regions.iter().find(|r| r.0 == base).unwrap().1
    }

    fn slice(&mut self, addr: u64, n: usize) -> &mut [u8] {
        for (base, data) in &mut self.regions {
            if addr >= *base && addr + n as u64 <= *base + data.len() as u64 {
                let o = (addr - *base) as usize;
                return &mut data[o..o + n];
            }
        }
        panic!("global access out of bounds: {addr:#x} + {n}");
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum State {
    Run,
    Wait,
    Done,
}

struct Thread {
    pc: usize,
    regs: Vec<u64>,
    state: State,
}

fn f(x: u64) -> f32 {
    f32::from_bits(x as u32)
}
fn fb(x: f32) -> u64 {
    u64::from(x.to_bits())
}

fn half_to_f32(h: u16, bf16: bool) -> f32 {
    if bf16 {
        return f32::from_bits(u32::from(h) << 16);
    }
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let e = (h >> 10) & 0x1f;
    let m = f32::from(h & 0x3ff);
    sign * match e {
        0 => m * 2f32.powi(-24),
        31 => {
            if m == 0.0 {
                f32::INFINITY
            } else {
                f32::NAN
            }
        }
        _ => (1.0 + m / 1024.0) * 2f32.powi(i32::from(e) - 15),
    }
}

/// Runs `grid` CTAs of `threads` threads.
pub fn run(
    p: &Program,
    params: &HashMap<String, u64>,
    mem: &mut Memory,
    grid: (u32, u32, u32),
    threads: usize,
    smem_bytes: usize,
) {
    for z in 0..grid.2 {
        for y in 0..grid.1 {
            for x in 0..grid.0 {
                run_cta(
                    p,
                    params,
                    mem,
                    (x, y, z),
                    grid,
                    threads,
                    smem_bytes.max(p.static_smem),
                );
            }
        }
    }
}

fn is_collective(op: &str) -> bool {
    op.starts_with("bar.")
        || op.starts_with("shfl.")
        || op.starts_with("ldmatrix")
        || op.starts_with("mma.")
}

#[allow(clippy::too_many_arguments)]
fn run_cta(
    p: &Program,
    params: &HashMap<String, u64>,
    mem: &mut Memory,
    cta: (u32, u32, u32),
    grid: (u32, u32, u32),
    n: usize,
    smem_bytes: usize,
) {
    let mut smem = vec![0u8; smem_bytes];
    let mut ts: Vec<Thread> = (0..n)
        .map(|_| Thread {
            pc: 0,
            regs: vec![0; p.nregs],
            state: State::Run,
        })
        .collect();
    loop {
        for (tid, t) in ts.iter_mut().enumerate() {
            while t.state == State::Run {
                let inst = &p.insts[t.pc];
                if let Some((g, neg)) = inst.guard {
                    if (t.regs[g] != 0) == neg {
                        t.pc += 1;
                        continue;
                    }
                }
                if is_collective(&inst.op) {
                    t.state = State::Wait;
                    break;
                }
                step(p, inst, t, tid, cta, grid, params, mem, &mut smem);
            }
        }
        if ts.iter().all(|t| t.state == State::Done) {
            return;
        }
        let mut progress = false;
        for w in 0..n / 32 {
            let lanes = w * 32..w * 32 + 32;
            let pc = ts[w * 32].pc;
            if ts[lanes.clone()]
                .iter()
                .all(|t| t.state == State::Wait && t.pc == pc)
            {
                let op = &p.insts[pc].op;
                if op.starts_with("bar.sync") {
                    continue;
                }
                collective(&p.insts[pc], &mut ts[lanes.clone()], &smem);
                for t in &mut ts[lanes] {
                    t.pc += 1;
                    t.state = State::Run;
                }
                progress = true;
            }
        }
        let live: Vec<usize> = (0..n).filter(|&t| ts[t].state != State::Done).collect();
        if !progress
            && live.iter().all(|&t| {
                ts[t].state == State::Wait && p.insts[ts[t].pc].op.starts_with("bar.sync")
            })
        {
            for t in live {
                ts[t].pc += 1;
                ts[t].state = State::Run;
            }
            progress = true;
        }
        if !progress {
            let waits: Vec<String> = ts
                .iter()
                .enumerate()
                .filter(|(_, t)| t.state == State::Wait)
                .take(4)
                .map(|(i, t)| format!("thread {i} at `{}`", p.insts[t.pc].text))
                .collect();
            panic!("deadlock: {}", waits.join("; "));
        }
    }
}

fn collective(inst: &Inst, lanes: &mut [Thread], smem: &[u8]) {
    let op = inst.op.as_str();
    let reg = |o: &Opd| match o {
        Opd::Reg(r) => *r,
        o => panic!("register expected, found {o:?}"),
    };
    if op.starts_with("bar.warp.sync") {
        return;
    }
    if op.starts_with("shfl.sync.idx") {
        // Full-warp segment (c = 31): lane `b % 32` of the warp.
        let (d, a) = (reg(&inst.args[0]), reg(&inst.args[1]));
        assert!(
            matches!(inst.args[3], Opd::Imm(31)),
            "shfl.sync.idx over the whole warp"
        );
        let vals: Vec<u64> = lanes.iter().map(|t| t.regs[a]).collect();
        for t in lanes.iter_mut() {
            let src = match inst.args[2] {
                Opd::Imm(i) => i as usize,
                Opd::Reg(r) => t.regs[r] as usize,
                ref o => panic!("shfl lane {o:?}"),
            };
            t.regs[d] = vals[src % 32];
        }
        return;
    }
    if op.starts_with("shfl.sync.bfly") {
        let (d, a) = (reg(&inst.args[0]), reg(&inst.args[1]));
        let m = match inst.args[2] {
            Opd::Imm(m) => m as usize,
            _ => panic!("lane mask"),
        };
        let vals: Vec<u64> = lanes.iter().map(|t| t.regs[a]).collect();
        for (l, t) in lanes.iter_mut().enumerate() {
            t.regs[d] = vals[l ^ m];
        }
        return;
    }
    if op.starts_with("ldmatrix") {
        let trans = op.contains(".trans");
        let Opd::Vec(dst) = &inst.args[0] else {
            panic!("ldmatrix destination")
        };
        let Opd::Mem(base, off) = &inst.args[1] else {
            panic!("ldmatrix address")
        };
        let addrs: Vec<usize> = lanes
            .iter()
            .map(|t| (t.regs[reg(base)] as i64 + off) as usize)
            .collect();
        let elem = |m: usize, row: usize, col: usize| {
            let a = addrs[m * 8 + row] + 2 * col;
            u16::from_le_bytes([smem[a], smem[a + 1]])
        };
        for (l, t) in lanes.iter_mut().enumerate() {
            for (m, &d) in dst.iter().enumerate() {
                let (r, c) = (l / 4, 2 * (l % 4));
                let (lo, hi) = if trans {
                    (elem(m, c, r), elem(m, c + 1, r))
                } else {
                    (elem(m, r, c), elem(m, r, c + 1))
                };
                t.regs[d] = u64::from(lo) | (u64::from(hi) << 16);
            }
        }
        return;
    }
    if op.starts_with("mma.sync.aligned.m16n8k16.row.col.f32") {
        let bf16 = op.contains("bf16");
        let (Opd::Vec(d), Opd::Vec(a), Opd::Vec(b), Opd::Vec(c)) =
            (&inst.args[0], &inst.args[1], &inst.args[2], &inst.args[3])
        else {
            panic!("mma operands")
        };
        let h = |x: u64, hi: bool| half_to_f32(if hi { (x >> 16) as u16 } else { x as u16 }, bf16);
        let mut am = [[0f32; 16]; 16];
        let mut bm = [[0f32; 8]; 16];
        let mut cm = [[0f32; 8]; 16];
        for (l, t) in lanes.iter().enumerate() {
            let (g, q) = (l / 4, l % 4);
            for (i, &r) in a.iter().enumerate() {
                let row = g + 8 * (i % 2);
                let col = 2 * q + 8 * (i / 2);
                am[row][col] = h(t.regs[r], false);
                am[row][col + 1] = h(t.regs[r], true);
            }
            for (i, &r) in b.iter().enumerate() {
                let k = 2 * q + 8 * i;
                bm[k][g] = h(t.regs[r], false);
                bm[k + 1][g] = h(t.regs[r], true);
            }
            for (i, &r) in c.iter().enumerate() {
                cm[g + 8 * (i / 2)][2 * q + i % 2] = f(t.regs[r]);
            }
        }
        for (l, t) in lanes.iter_mut().enumerate() {
            let (g, q) = (l / 4, l % 4);
            for (i, &r) in d.iter().enumerate() {
                let (row, col) = (g + 8 * (i / 2), 2 * q + i % 2);
                let mut acc = cm[row][col];
                for k in 0..16 {
                    acc += am[row][k] * bm[k][col];
                }
                t.regs[r] = fb(acc);
            }
        }
        return;
    }
    panic!("unsupported collective `{}`", inst.text);
}

#[allow(clippy::too_many_arguments)]
fn step(
    p: &Program,
    inst: &Inst,
    t: &mut Thread,
    tid: usize,
    cta: (u32, u32, u32),
    grid: (u32, u32, u32),
    params: &HashMap<String, u64>,
    mem: &mut Memory,
    smem: &mut [u8],
) {
    let op = inst.op.as_str();
    let parts: Vec<&str> = op.split('.').collect();
    let ty = *parts.last().unwrap();
    let a = &inst.args;
    let val = |t: &Thread, o: &Opd| -> u64 {
        match o {
            Opd::Reg(r) => t.regs[*r],
            Opd::Imm(i) => *i as u64,
            Opd::F(b) => u64::from(*b),
            Opd::Special(s) => u64::from(match s.as_str() {
                "%tid.x" => tid as u32,
                "%ctaid.x" => cta.0,
                "%ctaid.y" => cta.1,
                "%ctaid.z" => cta.2,
                "%nctaid.x" => grid.0,
                "%nctaid.y" => grid.1,
                "%nctaid.z" => grid.2,
                s => panic!("special register {s}"),
            }),
            Opd::Sym(s) if s == "attnc_smem" => 0,
            o => panic!("value of {o:?} in `{}`", inst.text),
        }
    };
    let addr = |t: &Thread, o: &Opd| -> u64 {
        match o {
            Opd::Mem(b, off) => (val(t, b) as i64 + off) as u64,
            o => panic!("address expected: {o:?}"),
        }
    };
    let dst = |o: &Opd| match o {
        Opd::Reg(r) => *r,
        o => panic!("destination {o:?}"),
    };
    let mut next = t.pc + 1;
    let x = |i: usize| val(t, &a[i]);
    let result: Option<u64> = match parts[0] {
        "mov" => Some(x(1)),
        "cvta" => Some(x(1)),
        "ld" if parts[1] == "param" => {
            let Opd::Mem(b, _) = &a[1] else { panic!() };
            let Opd::Sym(name) = b.as_ref() else { panic!() };
            Some(*params.get(name).unwrap_or_else(|| panic!("param {name}")))
        }
        "ld" => {
            let ad = addr(t, &a[1]);
            let shared = parts[1] == "shared";
            let size = match ty {
                "u8" => 1,
                "b16" | "u16" => 2,
                "u32" | "f32" | "b32" => 4,
                _ => 8,
            };
            let n = if op.contains(".v4") {
                4
            } else if op.contains(".v2") {
                2
            } else {
                1
            };
            let mut vals = Vec::new();
            for i in 0..n {
                let at = ad + (i * size) as u64;
                let bytes: Vec<u8> = if shared {
                    smem[at as usize..at as usize + size].to_vec()
                } else {
                    mem.slice(at, size).to_vec()
                };
                let mut w = [0u8; 8];
                w[..size].copy_from_slice(&bytes);
                vals.push(u64::from_le_bytes(w));
            }
            match &a[0] {
                Opd::Vec(rs) => {
                    for (r, v) in rs.iter().zip(vals) {
                        t.regs[*r] = v;
                    }
                    None
                }
                _ => Some(vals[0]),
            }
        }
        "st" => {
            let ad = addr(t, &a[0]);
            let size = if ty == "f32" || ty == "b32" { 4 } else { 8 };
            let vals: Vec<u64> = match &a[1] {
                Opd::Vec(rs) => rs.iter().map(|r| t.regs[*r]).collect(),
                o => vec![val(t, o)],
            };
            for (i, v) in vals.iter().enumerate() {
                let at = ad + (i * size) as u64;
                let bytes = &v.to_le_bytes()[..size];
                if parts[1] == "shared" {
                    smem[at as usize..at as usize + size].copy_from_slice(bytes);
                } else {
                    mem.slice(at, size).copy_from_slice(bytes);
                }
            }
            None
        }
        "atom" => {
            let ad = addr(t, &a[1]);
            let s = mem.slice(ad, 4);
            let old = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            if u64::from(old) == x(2) {
                s.copy_from_slice(&(x(3) as u32).to_le_bytes());
            }
            Some(u64::from(old))
        }
        "cp" if parts[1] == "async" && parts.len() > 2 && parts[2] == "cg" => {
            let (d, s, size) = (addr(t, &a[0]) as usize, addr(t, &a[1]), x(3) as usize);
            let src: Vec<u8> = if size > 0 {
                mem.slice(s, size).to_vec()
            } else {
                vec![]
            };
            smem[d..d + 16].fill(0);
            smem[d..d + size].copy_from_slice(&src);
            None
        }
        "cp" => None,
        "bra" => {
            let Opd::Sym(l) = &a[0] else { panic!() };
            next = p.labels[l];
            None
        }
        "ret" => {
            t.state = State::Done;
            None
        }
        "setp" => {
            let cmp = parts[1];
            let combine = if parts.len() == 4 {
                Some(parts[2])
            } else {
                None
            };
            let (u, v) = (x(1), x(2));
            let r = match ty {
                "f32" => {
                    let (u, v) = (f(u), f(v));
                    match cmp {
                        "eq" => u == v,
                        "neu" => u != v,
                        "lt" => u < v,
                        "le" => u <= v,
                        "gt" => u > v,
                        "ge" => u >= v,
                        c => panic!("fcmp {c}"),
                    }
                }
                "s64" => {
                    let (u, v) = (u as i64, v as i64);
                    match cmp {
                        "eq" => u == v,
                        "ne" => u != v,
                        "lt" => u < v,
                        "le" => u <= v,
                        "gt" => u > v,
                        "ge" => u >= v,
                        c => panic!("icmp {c}"),
                    }
                }
                _ => {
                    let (u, v) = if ty == "u64" {
                        (u, v)
                    } else {
                        (u & 0xffff_ffff, v & 0xffff_ffff)
                    };
                    match cmp {
                        "eq" => u == v,
                        "ne" => u != v,
                        "lt" => u < v,
                        "le" => u <= v,
                        "gt" => u > v,
                        "ge" => u >= v,
                        c => panic!("ucmp {c}"),
                    }
                }
            };
            let r = match combine {
                Some("and") => r && x(3) != 0,
                Some("or") => r || x(3) != 0,
                _ => r,
            };
            Some(u64::from(r))
        }
        "selp" => Some(if x(3) != 0 { x(1) } else { x(2) }),
        "not" if ty == "pred" => Some(u64::from(x(1) == 0)),
        "not" if ty == "b32" => Some(u64::from(!(x(1) as u32))),
        "not" => Some(!x(1)),
        "and" if ty == "pred" => Some(u64::from(x(1) != 0 && x(2) != 0)),
        "or" if ty == "pred" => Some(u64::from(x(1) != 0 || x(2) != 0)),
        "xor" if ty == "pred" => Some(u64::from((x(1) != 0) != (x(2) != 0))),
        "and" => Some(x(1) & x(2)),
        "or" => Some(x(1) | x(2)),
        "xor" => Some(x(1) ^ x(2)),
        "shl" => Some(if ty == "b32" {
            u64::from((x(1) as u32).wrapping_shl(x(2) as u32))
        } else {
            x(1) << (x(2) & 63)
        }),
        "shr" => Some(match ty {
            "u32" => u64::from((x(1) as u32) >> (x(2) as u32)),
            "u64" | "b64" => x(1) >> (x(2) as u32).min(63),
            _ => ((x(1) as i64) >> (x(2) as u32).min(63)) as u64,
        }),
        "bfe" if ty == "s32" => {
            // The field sign-extended from its top bit (len < 32 here).
            let len = x(3) as u32;
            let field = (x(1) as u32 >> x(2) as u32) & ((1u32 << len) - 1);
            let shift = 32 - len;
            Some((((field << shift) as i32) >> shift) as u32 as u64)
        }
        "bfe" => Some(((x(1) as u32 >> x(2) as u32) & ((1u32 << x(3) as u32) - 1)) as u64),
        "add" | "sub" | "mul" | "mad" | "div" | "rem" | "min" | "max" | "fma" | "neg" | "abs"
        | "rcp" | "sqrt" | "ex2" | "lg2" | "copysign" | "tanh" => {
            Some(arith(parts[0], &parts, ty, &|i| x(i), &inst.text, p.approx))
        }
        "cvt" => {
            let (d_ty, s_ty) = (parts[parts.len() - 2], ty);
            let v = x(1);
            Some(match (parts[1], d_ty, s_ty) {
                (_, "u64", "u32") => v & 0xffff_ffff,
                (_, "u32", "u64") => v & 0xffff_ffff,
                ("rn", "f32", "s64") => fb(v as i64 as f32),
                ("rn", "f32", "s32") => fb(v as u32 as i32 as f32),
                ("rn", "f32", "u32") => fb(v as u32 as f32),
                ("rzi", "s64", "f32") => (f(v) as i64) as u64,
                ("rmi", "f32", "f32") => fb(f(v).floor()),
                ("rpi", "f32", "f32") => fb(f(v).ceil()),
                ("rni", "f32", "f32") => fb(f(v).round_ties_even()),
                ("f32", "f32", "f16") => fb(half_to_f32(v as u16, false)),
                ("rn", "f16x2", "f32") => {
                    let (hi, lo) = (f(x(1)), f(x(2)));
                    u64::from(attnc::runtime::device::host::f16_bits(lo))
                        | (u64::from(attnc::runtime::device::host::f16_bits(hi)) << 16)
                }
                ("rn", "bf16x2", "f32") => {
                    let (hi, lo) = (f(x(1)), f(x(2)));
                    u64::from(attnc::runtime::device::host::bf16_bits(lo))
                        | (u64::from(attnc::runtime::device::host::bf16_bits(hi)) << 16)
                }
                _ => panic!("unsupported `{}`", inst.text),
            })
        }
        _ => panic!("unsupported `{}`", inst.text),
    };
    if let Some(v) = result {
        t.regs[dst(&a[0])] = v;
    }
    t.pc = next;
}

/// `.ftz`: a subnormal becomes a zero of its sign.
fn flush(x: f32) -> f32 {
    if x.is_subnormal() {
        0f32.copysign(x)
    } else {
        x
    }
}

/// Whether the error of an approximate result goes up (away from zero),
/// given the operands' bits: a hash for `Scattered`, fixed otherwise.
fn error_up(mode: Approx, operands: &[f32]) -> bool {
    match mode {
        Approx::Exact | Approx::Low => false,
        Approx::High => true,
        Approx::Scattered => {
            // splitmix64 of the operand bits.
            let mut z = operands.iter().fold(0x9e37_79b9_7f4a_7c15u64, |h, x| {
                h.rotate_left(23) ^ u64::from(x.to_bits())
            });
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) & 1 == 1
        }
    }
}

/// `exact` off by `rel` relative (away from zero when `up`), rounded to f32;
/// NaN, ±inf and ±0 stay as they are.
fn off_rel(exact: f64, rel: f64, mode: Approx, up: bool) -> f32 {
    if mode == Approx::Exact || !exact.is_finite() || exact == 0.0 {
        return exact as f32;
    }
    (exact * if up { 1.0 + rel } else { 1.0 - rel }) as f32
}

/// `r` moved by `n` ulps (away from zero when `up`); NaN, ±inf and ±0 stay,
/// and a finite result never crosses zero.
fn off_ulps(r: f32, n: u32, mode: Approx, up: bool) -> f32 {
    if mode == Approx::Exact || !r.is_finite() || r == 0.0 {
        return r;
    }
    let mut m = r.abs();
    for _ in 0..n {
        m = if up { m.next_up() } else { m.next_down() };
    }
    m.max(0.0).copysign(r)
}

/// The approximate f32 instructions, under the error model `mode`.
fn approx_f32(op: &str, ftz: bool, a: f32, mode: Approx) -> Option<f32> {
    let a = if ftz { flush(a) } else { a };
    let up = error_up(mode, &[a]);
    let r = match op {
        // 2^-22 relative; exact at integers (the SFU's table is exact at
        // its nodes, and t5_bias's buckets on the GPU depend on it).
        "ex2" if a == a.trunc() => f64::from(a).exp2() as f32,
        "ex2" => off_rel(f64::from(a).exp2(), 2f64.powi(-22), mode, up),
        // 2^-22 absolute, relative where |log2 a| > 1; exact at powers of two.
        "lg2" if a > 0.0 && a.is_normal() && a.to_bits() & 0x7f_ffff == 0 => a.log2(),
        "lg2" => {
            let exact = f64::from(a).log2();
            if mode == Approx::Exact || !exact.is_finite() {
                exact as f32
            } else {
                let e = 2f64.powi(-22) * exact.abs().max(1.0);
                let away = if exact < 0.0 { -e } else { e };
                (exact + if up { away } else { -away }) as f32
            }
        }
        // 1 ulp.
        "rcp" => off_ulps(1.0 / a, 1, mode, up),
        // 2^-10.987 relative; exact at ±0, ±inf (±1), NaN and subnormals.
        // Not emitted at present (see `Gen::tanh`); kept to weigh it.
        "tanh" if a.is_subnormal() => a,
        "tanh" if a.is_infinite() => 1f32.copysign(a),
        "tanh" => off_rel(f64::from(a).tanh(), 2f64.powf(-10.987), mode, up),
        _ => return None,
    };
    Some(if ftz { flush(r) } else { r })
}

fn arith(
    op: &str,
    parts: &[&str],
    ty: &str,
    x: &dyn Fn(usize) -> u64,
    text: &str,
    mode: Approx,
) -> u64 {
    let wide = parts.contains(&"wide");
    match ty {
        "f32" => {
            let g = |i| f(x(i));
            if parts.contains(&"approx") {
                let r = approx_f32(op, parts.contains(&"ftz"), g(1), mode)
                    .unwrap_or_else(|| panic!("unsupported `{text}`"));
                return fb(r);
            }
            assert!(
                !parts.contains(&"ftz")
                    && !parts.contains(&"full")
                    && !matches!(op, "ex2" | "lg2" | "tanh"),
                "unsupported `{text}`"
            );
            fb(match op {
                "add" => g(1) + g(2),
                "sub" => g(1) - g(2),
                "mul" => g(1) * g(2),
                // `div.rn`, `rcp.rn`, `sqrt.rn`: IEEE.
                "div" => g(1) / g(2),
                "fma" => g(1).mul_add(g(2), g(3)),
                "min" => g(1).min(g(2)),
                "max" => g(1).max(g(2)),
                "neg" => -g(1),
                "abs" => g(1).abs(),
                "rcp" => 1.0 / g(1),
                "sqrt" => g(1).sqrt(),
                "copysign" => g(2).copysign(g(1)),
                _ => panic!("unsupported `{text}`"),
            })
        }
        "u32" | "s32" | "b32" if !wide => {
            let g = |i| x(i) as u32;
            u64::from(match op {
                "add" => g(1).wrapping_add(g(2)),
                "sub" => g(1).wrapping_sub(g(2)),
                "mul" => g(1).wrapping_mul(g(2)),
                "mad" => g(1).wrapping_mul(g(2)).wrapping_add(g(3)),
                "div" => g(1) / g(2),
                "rem" => g(1) % g(2),
                "min" => g(1).min(g(2)),
                "max" => g(1).max(g(2)),
                _ => panic!("unsupported `{text}`"),
            })
        }
        "u32" => (x(1) as u32 as u64) * (x(2) as u32 as u64),
        "u64" => match op {
            "mul" if parts.contains(&"hi") => ((u128::from(x(1)) * u128::from(x(2))) >> 64) as u64,
            "mul" => x(1).wrapping_mul(x(2)),
            "div" => x(1) / x(2),
            _ => panic!("unsupported `{text}`"),
        },
        _ => {
            let g = |i| x(i) as i64;
            if parts.contains(&"hi") {
                panic!("unsupported `{text}`");
            }
            (match op {
                "add" => g(1).wrapping_add(g(2)),
                "sub" => g(1).wrapping_sub(g(2)),
                "mul" => g(1).wrapping_mul(g(2)),
                "mad" => g(1).wrapping_mul(g(2)).wrapping_add(g(3)),
                "div" => g(1).wrapping_div(g(2)),
                "rem" => g(1).wrapping_rem(g(2)),
                "min" => g(1).min(g(2)),
                "max" => g(1).max(g(2)),
                "neg" => g(1).wrapping_neg(),
                "abs" => g(1).wrapping_abs(),
                _ => panic!("unsupported `{text}`"),
            }) as u64
        }
    }
}
