//! A small decode loop on a paged KV cache, with the attnc library.
//!
//! Run it from the repository root with `cargo run --release --example decode`.
//! Three sequences of different lengths share one pool of pages (the layout of
//! vLLM and FlashInfer: `[num_pages, page_size, HKV, D]`). Each step appends
//! one token's K and V to every sequence (taking a free page when its last one
//! is full and growing its row of the page table), then decodes: one query row
//! per sequence and head, grouped-query attention (8 query heads over 2 KV
//! heads) with a sliding window. The loop runs three times, with the pool
//! stored as float32, as int8 and as fp8 (e4m3fn) with a scale per (token, KV
//! head): `KvArray::append` quantizes each step's rows as it writes them.
//! Every step is checked against the reference interpreter on the same pool.
//! Free slots and pages hold NaN (in the quantized pools: NaN scales) the
//! whole time: the kernel never reads them.

use attnc::bench::Rng;
use attnc::ndarray::{Array1, Array2, Array3, Array4};
use attnc::{load, CompileOptions, ElemType, Inputs, KvArray, SourceFile, SpecOptions};

const SPEC: &str = "attention window_decode {
    param window: int = 48
    mask = causal && q - kv < window
}";

/// A pool in `elem` where every slot is stale: NaN data, or NaN scales.
fn empty_pool(shape: (usize, usize, usize, usize), elem: ElemType) -> KvArray {
    let mut pool = KvArray::quantize(Array4::from_elem(shape, f32::NAN).view(), elem);
    if let KvArray::Int8 { scales, .. } | KvArray::Fp8 { scales, .. } = &mut pool {
        scales.fill(f32::NAN);
    }
    pool
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let program = load(
        SourceFile::new("decode.attn", SPEC),
        &SpecOptions::default(),
    )?;
    let kernel = program.compile_jit_with(&CompileOptions::default())?;
    for elem in [ElemType::F32, ElemType::Int8, ElemType::Fp8] {
        decode(&program, &kernel, elem)?;
    }
    Ok(())
}

fn decode(
    program: &attnc::Program,
    kernel: &attnc::JitKernel,
    elem: ElemType,
) -> Result<(), Box<dyn std::error::Error>> {
    let (h, hkv, d, page_size, num_pages) = (8, 2, 64, 16, 64);
    let mut lens = vec![5usize, 30, 17];
    let b = lens.len();
    let max_pages = num_pages / b;
    let mut rng = Rng::new(7);
    let mut k_pages = empty_pool((num_pages, page_size, hkv, d), elem);
    let mut v_pages = empty_pool((num_pages, page_size, hkv, d), elem);
    // The table, -1 where unused.
    let mut table = Array2::<i32>::from_elem((b, max_pages), -1);
    let mut free: Vec<i32> = (0..num_pages as i32).rev().collect();
    // Gives sequence `seq` a page for key `pos` when it starts a new one.
    let mut grow = |table: &mut Array2<i32>, seq: usize, pos: usize| {
        if pos.is_multiple_of(page_size) {
            table[[seq, pos / page_size]] = free.pop().expect("the pool has room");
        }
    };
    // The prompts, token by token (each row rounded or quantized as written).
    for (seq, &n) in lens.iter().enumerate() {
        for pos in 0..n {
            grow(&mut table, seq, pos);
            let page = table[[seq, pos / page_size]] as usize;
            for kh in 0..hkv {
                let row: Vec<f32> = (0..2 * d).map(|_| rng.uniform()).collect();
                k_pages.set_row([page, pos % page_size, kh], &row[..d]);
                v_pages.set_row([page, pos % page_size, kh], &row[d..]);
            }
        }
    }
    let mut worst = 0f32;
    for step in 0..40 {
        // This step's tokens: their K and V join the cache at each sequence's
        // next position, then they attend.
        for (seq, &n) in lens.iter().enumerate() {
            grow(&mut table, seq, n);
        }
        let at = Array1::from_iter(lens.iter().map(|&n| n as i32));
        let new_k = Array3::from_shape_simple_fn((b, hkv, d), || rng.uniform());
        let new_v = Array3::from_shape_simple_fn((b, hkv, d), || rng.uniform());
        k_pages.append(table.view(), at.view(), new_k.view())?;
        v_pages.append(table.view(), at.view(), new_v.view())?;
        for n in lens.iter_mut() {
            *n += 1;
        }
        let q = rng.array4((b, h, 1, d));
        let kv_lens = Array1::from_iter(lens.iter().map(|&n| n as i32));
        let inputs = Inputs::paged(
            q.view(),
            k_pages.view(),
            v_pages.view(),
            table.view(),
            kv_lens.view(),
        )
        .with_lse();
        let got = kernel.run(&inputs)?;
        let want = program.run_reference(&inputs)?;
        let diff = got
            .out
            .iter()
            .zip(want.out.iter())
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            got.out.iter().all(|x| x.is_finite()),
            "a stale slot was read"
        );
        assert!(diff < 1e-5, "{elem} step {step}: max |out diff| {diff:e}");
        worst = worst.max(diff);
    }
    println!(
        "ok ({elem:>4} pool): 40 decode steps on {num_pages} pages x {page_size} slots, lengths now {lens:?}, \
         max |out - reference| = {worst:.1e}"
    );
    Ok(())
}
