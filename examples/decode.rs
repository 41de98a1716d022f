//! A small decode loop on a paged KV cache, with the attnc library.
//!
//! Run it from the repository root with `cargo run --release --example decode`.
//! Three sequences of different lengths share one pool of pages (the layout of
//! vLLM and FlashInfer: `[num_pages, page_size, HKV, D]`). Each step appends
//! one token's K and V to every sequence (taking a free page when its last one
//! is full and growing its row of the page table), then decodes: one query row
//! per sequence and head, grouped-query attention (8 query heads over 2 KV
//! heads) with a sliding window. Every step is checked against the reference
//! interpreter on the same pool. Free slots and pages hold NaN the whole time:
//! the kernel never reads them.

use attnc::bench::Rng;
use attnc::ndarray::{s, Array1, Array2, Array4};
use attnc::{load, CompileOptions, Inputs, SourceFile, SpecOptions};

const SPEC: &str = "attention window_decode {
    param window: int = 48
    mask = causal && q - kv < window
}";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (h, hkv, d, page_size, num_pages) = (8, 2, 64, 16, 64);
    let mut lens = vec![5usize, 30, 17];
    let b = lens.len();
    let max_pages = num_pages / b;
    let mut rng = Rng::new(7);
    // The pool, NaN where nothing was written; the table, -1 where unused.
    let mut k_pages = Array4::<f32>::from_elem((num_pages, page_size, hkv, d), f32::NAN);
    let mut v_pages = k_pages.clone();
    let mut table = Array2::<i32>::from_elem((b, max_pages), -1);
    let mut free: Vec<i32> = (0..num_pages as i32).rev().collect();
    // Appends one token's K and V (`[HKV, D]` each) to sequence `seq`.
    let mut append = |k_pages: &mut Array4<f32>,
                      v_pages: &mut Array4<f32>,
                      table: &mut Array2<i32>,
                      seq: usize,
                      pos: usize,
                      rng: &mut Rng| {
        if pos % page_size == 0 {
            table[[seq, pos / page_size]] = free.pop().expect("the pool has room");
        }
        let page = table[[seq, pos / page_size]] as usize;
        let kv = rng.array4((2, 1, hkv, d));
        k_pages
            .slice_mut(s![page, pos % page_size, .., ..])
            .assign(&kv.slice(s![0, 0, .., ..]));
        v_pages
            .slice_mut(s![page, pos % page_size, .., ..])
            .assign(&kv.slice(s![1, 0, .., ..]));
    };
    // The prompts.
    for (seq, &n) in lens.iter().enumerate() {
        for pos in 0..n {
            append(&mut k_pages, &mut v_pages, &mut table, seq, pos, &mut rng);
        }
    }
    let program = load(
        SourceFile::new("decode.attn", SPEC),
        &SpecOptions::default(),
    )?;
    let kernel = program.compile_jit_with(&CompileOptions::default())?;
    for step in 0..40 {
        // This step's tokens: their K and V join the cache, then they attend.
        for (seq, n) in lens.iter_mut().enumerate() {
            append(&mut k_pages, &mut v_pages, &mut table, seq, *n, &mut rng);
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
        assert!(diff < 1e-5, "step {step}: max |out diff| {diff:e}");
        if step % 10 == 0 || step == 39 {
            println!("step {step:2}: lengths {lens:?}, max |out - reference| = {diff:.1e}");
        }
    }
    println!(
        "ok: 40 decode steps on a paged pool of {num_pages} pages x {page_size} slots agree with the reference"
    );
    Ok(())
}
