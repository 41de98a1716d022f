//! Memory checks made before allocations sized by user input.
//!
//! Shapes, tile sizes and `.npy` headers come from the user; an allocation
//! sized by them may not fit. Failing allocation is not enough to catch that:
//! under Linux overcommit a reservation of many gigabytes succeeds and the
//! process is killed when it touches the pages, and a reservation beyond the
//! address space aborts the process. So every such allocation is first
//! [`Estimate`]d (a lower bound of the bytes it needs) and checked against the
//! memory available: `MemAvailable` of `/proc/meminfo` on Linux (or less,
//! under an address-space limit, `ulimit -v`), and the largest possible
//! allocation (`isize::MAX` bytes) everywhere.

use std::fmt;

use crate::mask::Tiling;
use crate::sema::eval::Shapes;
use crate::sema::{Deps, Spec, Type};

/// Estimates below this size are not checked against `MemAvailable` (reading
/// `/proc/meminfo` costs more than such an allocation; they are still checked
/// against the address space).
const SMALL: u128 = 64 << 20;

/// Where the limit of a [`MemoryError`] comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// `MemAvailable` in `/proc/meminfo`.
    MemAvailable,
    /// The process's address-space limit (`ulimit -v`) less what it maps.
    AddressSpaceLimit,
    /// The largest allocation the address space allows, `isize::MAX` bytes.
    AddressSpace,
}

/// An allocation sized by user input does not fit in the memory available.
#[derive(Clone, Debug, PartialEq, thiserror::Error, miette::Diagnostic)]
#[error(
    "{what} would need {needed}, but only {available} {limit}{parts}",
    needed = bytes(*needed),
    parts = parts_text(parts),
    available = bytes(*available as u128),
    limit = match limit {
        Limit::MemAvailable => "of memory is available (MemAvailable in /proc/meminfo)",
        Limit::AddressSpaceLimit => "can still be mapped under this process's address-space limit (`ulimit -v`)",
        Limit::AddressSpace => "can be allocated at all (the address space's limit)",
    },
)]
#[diagnostic(
    code(attnc::memory),
    help("use smaller shapes or tiles (or free memory); nothing was allocated")
)]
pub struct MemoryError {
    /// What needs the memory, naming the user's inputs (shapes, flags, files).
    pub what: String,
    /// Bytes needed (a lower bound), saturated at `u128::MAX`.
    pub needed: u128,
    /// The largest parts of `needed`, with their bytes.
    pub parts: Vec<(String, u128)>,
    /// Bytes available.
    pub available: u64,
    pub limit: Limit,
}

fn parts_text(parts: &[(String, u128)]) -> String {
    if parts.len() < 2 {
        return String::new();
    }
    let list: Vec<String> = parts
        .iter()
        .map(|(name, n)| format!("{name}: {}", short(*n)))
        .collect();
    format!("; the largest parts: {}", list.join(", "))
}

/// `n` in binary units, e.g. `5.8 TiB`.
fn short(n: u128) -> String {
    const UNITS: [&str; 7] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut x = n as f64 / 1024.0;
    for unit in UNITS {
        if x < 1024.0 {
            return format!("{x:.1} {unit}");
        }
        x /= 1024.0;
    }
    format!("{:.1e} bytes", n as f64)
}

/// `n` in binary units and exactly, e.g. `5.8 TiB (6400000000000000 bytes)`.
pub fn bytes(n: u128) -> String {
    if n < 1024 {
        format!("{n} bytes")
    } else if n == u128::MAX {
        format!("more than {}", short(n))
    } else {
        format!("{} ({n} bytes)", short(n))
    }
}

/// Bytes of memory the system can give now: `MemAvailable` of
/// `/proc/meminfo`, or less where the process's address space is limited
/// (`ulimit -v`: the limit less what the process has mapped). `None` where
/// there is no such file (other systems) or it cannot be read.
pub fn available() -> Option<u64> {
    available_and_limit().map(|(bytes, _)| bytes)
}

/// [`available`], and which limit gave it.
fn available_and_limit() -> Option<(u64, Limit)> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let system = read("/proc/meminfo").and_then(|t| mem_available(&t));
    let limited = read("/proc/self/limits")
        .zip(read("/proc/self/status"))
        .and_then(|(limits, status)| address_space_left(&limits, &status));
    match (system, limited) {
        (Some(a), Some(b)) if b < a => Some((b, Limit::AddressSpaceLimit)),
        (Some(a), _) => Some((a, Limit::MemAvailable)),
        (None, b) => b.map(|b| (b, Limit::AddressSpaceLimit)),
    }
}

/// The bytes a process may still map under its soft address-space limit
/// (`Max address space` of `/proc/self/limits`, less `VmSize` of
/// `/proc/self/status`); `None` when it is unlimited or unreadable.
fn address_space_left(limits: &str, status: &str) -> Option<u64> {
    let limit: u64 = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max address space"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let used = mem_field(status, "VmSize:")?;
    Some(limit.saturating_sub(used))
}

/// `MemAvailable` in bytes from the text of `/proc/meminfo`.
fn mem_available(meminfo: &str) -> Option<u64> {
    mem_field(meminfo, "MemAvailable:")
}

/// The field `name` (with its colon) of a `/proc` text in bytes (`N kB`).
fn mem_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let mut words = line[name.len()..].split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    let unit = match words.next() {
        Some("kB") | Some("KB") | Some("kb") => 1024,
        None => 1,
        Some(_) => return None,
    };
    n.checked_mul(unit)
}

/// The bytes of an array of `shape` with elements of `elem` bytes,
/// saturating instead of overflowing.
pub fn array_bytes(shape: &[usize], elem: usize) -> u128 {
    shape
        .iter()
        .fold(elem as u128, |acc, &n| acc.saturating_mul(n as u128))
}

/// A lower bound of the memory some work needs, as named parts.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Estimate {
    parts: Vec<(String, u128)>,
}

impl Estimate {
    pub fn new() -> Estimate {
        Estimate::default()
    }

    /// Adds a part of `bytes` bytes.
    pub fn add(&mut self, name: impl Into<String>, bytes: u128) -> &mut Estimate {
        self.parts.push((name.into(), bytes));
        self
    }

    /// Adds an array of `shape` with elements of `elem` bytes, named with its
    /// shape. An array with a zero axis counts as the product of its other
    /// axes: ndarray refuses a shape whose non-zero axes overflow the address
    /// space even when it holds no element.
    pub fn array(&mut self, name: &str, shape: &[usize], elem: usize) -> &mut Estimate {
        let dims: Vec<String> = shape.iter().map(|n| n.to_string()).collect();
        let nonzero: Vec<usize> = shape.iter().copied().filter(|&n| n > 0).collect();
        let bytes = match array_bytes(&nonzero, elem) {
            // Empty but unrepresentable: as much as its non-zero axes.
            n if nonzero.len() < shape.len() && n > isize::MAX as u128 => n,
            _ if nonzero.len() < shape.len() => 0,
            n => n,
        };
        self.add(format!("{name} [{}]", dims.join(", ")), bytes)
    }

    /// The sum of the parts, saturated.
    pub fn total(&self) -> u128 {
        self.parts
            .iter()
            .fold(0u128, |acc, (_, n)| acc.saturating_add(*n))
    }

    /// Fails when the total exceeds the memory available now.
    pub fn check(&self, what: impl fmt::Display) -> Result<(), MemoryError> {
        let available = if self.total() > SMALL {
            available_and_limit()
        } else {
            None
        };
        self.check_limit(what, available)
    }

    /// Fails when the total exceeds `available` bytes (and, in any case,
    /// the largest allocation the address space allows).
    pub fn check_against(
        &self,
        what: impl fmt::Display,
        available: Option<u64>,
    ) -> Result<(), MemoryError> {
        self.check_limit(what, available.map(|a| (a, Limit::MemAvailable)))
    }

    /// [`Estimate::check_against`] bytes available under `limit`.
    fn check_limit(
        &self,
        what: impl fmt::Display,
        available: Option<(u64, Limit)>,
    ) -> Result<(), MemoryError> {
        let needed = self.total();
        let address_space = isize::MAX as u64;
        let (limit, kind) = match available {
            Some((a, kind)) if a < address_space => (a, kind),
            _ => (address_space, Limit::AddressSpace),
        };
        if needed <= limit as u128 {
            return Ok(());
        }
        let mut parts: Vec<(String, u128)> =
            self.parts.iter().filter(|(_, n)| *n > 0).cloned().collect();
        parts.sort_by_key(|p| std::cmp::Reverse(p.1));
        parts.truncate(4);
        Err(MemoryError {
            what: what.to_string(),
            needed,
            parts,
            available: limit,
            limit: kind,
        })
    }
}

/// Checks one allocation of `bytes` bytes for `what`.
pub fn check(what: impl fmt::Display, bytes: u128) -> Result<(), MemoryError> {
    Estimate {
        parts: vec![(String::new(), bytes)],
    }
    .check(what)
}

/// A backend whose run [`run_estimate`] estimates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The f64 reference interpreter.
    Reference,
    /// The loop-IR interpreter.
    Interp,
    /// The Cranelift backend.
    Jit,
}

/// The bytes of the element type of a buffer.
pub fn elem_bytes(ty: Type) -> usize {
    match ty {
        Type::Int => 8,
        Type::Float => 4,
        Type::Bool => 1,
    }
}

/// Adds the block maps of `spec` on `shapes` with `tiling` to `e`: one map
/// per (b, h) the mask depends on, each with at least two offsets per query
/// tile (a lower bound: the tiles' entries come on top).
pub fn block_maps(e: &mut Estimate, spec: &Spec, shapes: &Shapes, tiling: Tiling) {
    let deps = spec.mask.map_or(Deps::NONE, |m| spec.deps(m));
    let n_b = if deps.contains(Deps::B) { shapes.b } else { 1 };
    let n_h = if deps.contains(Deps::H) { shapes.h } else { 1 };
    let q_tiles = shapes.q.div_ceil(tiling.bq.max(1));
    let maps = (n_b as u128).saturating_mul(n_h as u128);
    let per_map = (q_tiles as u128 + 1) * 2 * std::mem::size_of::<usize>() as u128
        + std::mem::size_of::<crate::mask::BlockMap>() as u128;
    e.add(
        format!(
            "{maps} block map{} of {q_tiles} query tiles ({tiling} tiles)",
            if maps == 1 { "" } else { "s" }
        ),
        maps.saturating_mul(per_map),
    );
}

/// Checks, before they are built, that the block maps of `spec` on `shapes`
/// with `tiling` fit in memory (what a compiled kernel builds before it
/// runs; its outputs and scratch are checked once the maps are there).
pub fn check_block_maps(spec: &Spec, shapes: &Shapes, tiling: Tiling) -> Result<(), MemoryError> {
    let mut need = Estimate::new();
    block_maps(&mut need, spec, shapes, tiling);
    need.check(format_args!(
        "building the block maps of `{}` on {} with {tiling} tiles",
        spec.name,
        shapes_text(shapes)
    ))
}

/// `shapes` as `B=1 H=8 HKV=8 Q=64 KV=64 D=64`.
pub fn shapes_text(shapes: &Shapes) -> String {
    let Shapes {
        b,
        h,
        hkv,
        q,
        kv,
        d,
    } = *shapes;
    format!("B={b} H={h} HKV={hkv} Q={q} KV={kv} D={d}")
}

/// Adds the outputs of a run on `shapes` to `e`: out and lse.
pub fn outputs(e: &mut Estimate, shapes: &Shapes) {
    let Shapes { b, h, q, d, .. } = *shapes;
    e.array("out", &[b, h, q, d], 4).array("lse", &[b, h, q], 4);
}

/// Adds what the Cranelift backend allocates for a run on `shapes` with
/// `tiling` besides the outputs and the block maps: one tile's scratch per
/// worker thread (scores, accumulators, row statistics; sized by the tile,
/// not by the shapes) and, where its loop nest's K/V source `kv_source` packs them
/// (not where it reads them in place: `driver::nest_for`), the packed keys of a group of
/// heads, `kv_rows` keys each (the longest sequence's, not `shapes.kv`,
/// which counts the key offset too).
pub fn jit_scratch(
    e: &mut Estimate,
    shapes: &Shapes,
    kv_rows: usize,
    tiling: Tiling,
    threads: usize,
    kv_source: crate::tile::nest::KvSource,
) {
    let Shapes { hkv, d, .. } = *shapes;
    let kv = kv_rows;
    let Tiling { bq, bkv } = tiling;
    let threads = threads.max(1) as u128;
    let tile =
        array_bytes(&[bq, bkv], 4).saturating_add(array_bytes(&[bq, d.saturating_add(2)], 4));
    e.add(
        format!("tile scratch per thread ({threads} threads, {tiling} tiles)"),
        threads.saturating_mul(tile),
    );
    if kv_source == crate::tile::nest::KvSource::InPlace {
        return;
    }
    // Packed K of every kv head, in groups of at most the budget (or one head).
    let head = array_bytes(&[kv, d], 4);
    let budget = (crate::runtime::exec::PACK_BUDGET_BYTES as u128).max(head);
    e.add("packed keys", head.saturating_mul(hkv as u128).min(budget));
}

/// A lower bound of the memory a run of `spec` on inputs of `shapes`, whose
/// longest sequence has `kv_rows` keys, needs beyond the inputs themselves:
/// the outputs, the block maps and the scratch of `threads` worker threads
/// (with packed keys where the jit's nest packs K/V: [`jit_scratch`]).
pub fn run_estimate(
    spec: &Spec,
    shapes: &Shapes,
    kv_rows: usize,
    backend: Backend,
    tiling: Tiling,
    threads: usize,
    kv_source: crate::tile::nest::KvSource,
) -> Estimate {
    let mut e = Estimate::new();
    outputs(&mut e, shapes);
    let Shapes { q, d, .. } = *shapes;
    let kv = kv_rows;
    match backend {
        Backend::Reference => {
            let threads = threads.max(1) as u128;
            e.add(
                format!("a row of scores per thread ({threads} threads)"),
                threads.saturating_mul(array_bytes(&[kv.saturating_add(d)], 8)),
            );
        }
        Backend::Interp => {
            block_maps(&mut e, spec, shapes, tiling);
            e.add(
                format!("the interpreter's tile ({tiling} tiles)"),
                array_bytes(&[tiling.bq.min(q), tiling.bkv.min(kv).saturating_add(d)], 4),
            );
        }
        Backend::Jit => {
            block_maps(&mut e, spec, shapes, tiling);
            jit_scratch(&mut e, shapes, kv_rows, tiling, threads, kv_source);
        }
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_available_in_bytes() {
        let text = "MemTotal:       24683792 kB\nMemFree:        21922828 kB\nMemAvailable:   23623160 kB\n";
        assert_eq!(mem_available(text), Some(23623160 * 1024));
        assert_eq!(mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(mem_available("MemAvailable: x kB\n"), None);
        // `ulimit -v`: the soft limit less what is mapped.
        let limits = "Max stack size            8388608              unlimited            bytes\n\
                      Max address space         8000000000           unlimited            bytes\n";
        let status = "Name:\tattnc\nVmPeak:\t  10 kB\nVmSize:\t 1000 kB\n";
        assert_eq!(
            address_space_left(limits, status),
            Some(8_000_000_000 - 1_024_000)
        );
        let unlimited =
            "Max address space         unlimited            unlimited            bytes\n";
        assert_eq!(address_space_left(unlimited, status), None);
        assert_eq!(
            address_space_left(limits, "VmSize: 9999999999 kB\n"),
            Some(0)
        );
        if cfg!(target_os = "linux") {
            assert!(available().is_some_and(|a| a > 0));
        }
    }

    /// The jit's packed keys are counted only where its nest packs K/V: a
    /// decode that reads a long cache in place was refused for them.
    #[test]
    fn packed_keys_are_counted_only_where_the_nest_packs() {
        let shapes = Shapes {
            b: 1,
            h: 8,
            hkv: 1,
            q: 1,
            kv: 1 << 29,
            d: 64,
        };
        let spec = crate::load(
            crate::SourceFile::new("c.attn", "attention c { mask = causal }"),
            &crate::SpecOptions::default(),
        )
        .unwrap()
        .spec;
        let tiling = Tiling::new(64, 64).unwrap();
        let estimate = |kv| run_estimate(&spec, &shapes, 1 << 29, Backend::Jit, tiling, 2, kv);
        use crate::tile::nest::KvSource::{InPlace, Packed};
        let named = |e: &Estimate| {
            e.parts
                .iter()
                .any(|(name, n)| name == "packed keys" && *n > 0)
        };
        assert!(named(&estimate(Packed)));
        assert!(!named(&estimate(InPlace)));
        assert!(
            estimate(InPlace).total() < 1 << 30,
            "{:?}",
            estimate(InPlace)
        );
    }

    /// Under `ulimit -v` the error names that limit.
    #[test]
    fn an_address_space_limit_is_named() {
        let mut e = Estimate::new();
        e.array("k", &[1 << 20, 1 << 10], 4);
        let err = e
            .check_limit("the inputs", Some((1 << 30, Limit::AddressSpaceLimit)))
            .unwrap_err();
        assert_eq!(err.limit, Limit::AddressSpaceLimit);
        assert!(err.to_string().contains("`ulimit -v`"), "{err}");
    }

    #[test]
    fn sizes_saturate() {
        assert_eq!(array_bytes(&[2, 3, 4], 4), 96);
        assert_eq!(array_bytes(&[], 8), 8);
        assert_eq!(array_bytes(&[usize::MAX; 4], 8), u128::MAX);
        assert_eq!(array_bytes(&[usize::MAX, 0], 8), 0);
    }

    #[test]
    fn an_estimate_beyond_the_limit_names_what_needs_it_and_the_numbers() {
        let mut e = Estimate::new();
        e.array("q", &[1, 8, 64, 64], 4)
            .array("k", &[1, 8, 1_000_000_000_000, 64], 4);
        assert!(e.check_against("x", Some(u64::MAX)).is_ok());
        let err = e.check_against("the inputs", Some(1 << 30)).unwrap_err();
        assert_eq!(err.needed, 4 * 8 * 64 * 64 + 4 * 8 * 64 * 1_000_000_000_000);
        assert_eq!(err.limit, Limit::MemAvailable);
        assert_eq!(
            err.to_string(),
            "the inputs would need 1.8 PiB (2048000000131072 bytes), but only 1.0 GiB (1073741824 bytes) \
             of memory is available (MemAvailable in /proc/meminfo); the largest parts: \
             k [1, 8, 1000000000000, 64]: 1.8 PiB, q [1, 8, 64, 64]: 128.0 KiB"
        );
        // Without MemAvailable, the address space still limits.
        let mut huge = Estimate::new();
        huge.array("a", &[usize::MAX; 3], 4);
        let err = huge.check_against("a", None).unwrap_err();
        assert_eq!(err.limit, Limit::AddressSpace);
        assert!(
            err.to_string().starts_with("a would need more than "),
            "{err}"
        );
        assert!(check("small", 100).is_ok());
    }
}
