//! Ring attention's arithmetic, in one process, with the attnc library.
//!
//! Run it from the repository root with `cargo run --release --example ring`.
//! A sequence of packed documents (causal attention within each document, the
//! mask of long-context training) is split into `P` blocks of `N / P`
//! positions, one per rank. In ring attention each rank keeps its block of
//! queries and passes its block of keys and values around the ring: at step
//! `s`, rank `r` holds the keys of rank `(r - s) mod P` and computes its
//! queries against them on their own, with the query offset `r * N / P` and
//! the key offset `((r - s) mod P) * N / P`, so the mask and the document
//! table see absolute positions. The partial results (`out`, `lse`) of the
//! `P` steps are merged with `merge_states`; a block of keys after the
//! queries is fully masked (its rows have `lse = -inf`) and drops out of the
//! merge. A block's `doc[KV]` table is the prefix of the whole table that its
//! positions end on.
//!
//! The ranks here are a loop; across processes, the same calls run on each
//! rank with the keys exchanged by the communication library. Every rank's
//! merged rows are checked against the reference interpreter on the whole
//! sequence.

use attnc::bench::Rng;
use attnc::ndarray::{s, Array1, Array4, Axis};
use attnc::{
    load, merge_states, BufferData, CompileOptions, Inputs, Outputs, SourceFile, SpecOptions,
};

const SPEC: &str = "attention packed_docs {
    buffer doc[KV]: int
    mask = doc[q] == doc[kv] && causal
}";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let program = load(SourceFile::new("ring.attn", SPEC), &SpecOptions::default())?;
    let kernel = program.compile_jit_with(&CompileOptions::default())?;
    let (b, h, hkv, d, n, ranks) = (1, 4, 2, 64, 512, 4);
    let block = n / ranks;
    let mut rng = Rng::new(11);
    let q = rng.array4((b, h, n, d));
    let k = rng.array4((b, hkv, n, d));
    let v = rng.array4((b, hkv, n, d));
    // Documents of 100 to 199 tokens.
    let mut doc = Vec::with_capacity(n);
    while doc.len() < n {
        let id = doc.last().map_or(0, |x| x + 1);
        let len = 100 + (rng.next_u64() % 100) as usize;
        doc.extend(std::iter::repeat_n(id, len.min(n - doc.len())));
    }
    let doc = Array1::from_vec(doc);
    let table = |end: usize| BufferData::Int(doc.slice(s![..end]).to_owned().into_dyn());

    let whole = program.run_reference(
        &Inputs::new(q.view(), k.view(), v.view())
            .buffer("doc", table(n))
            .with_lse(),
    )?;
    let mut worst = 0f32;
    for rank in 0..ranks {
        let rows = rank * block..(rank + 1) * block;
        let q_block = q.slice(s![.., .., rows.clone(), ..]);
        let mut parts: Vec<Outputs> = Vec::with_capacity(ranks);
        for step in 0..ranks {
            let held = (rank + ranks - step) % ranks;
            let keys = held * block..(held + 1) * block;
            let end = rows.end.max(keys.end);
            let inputs = Inputs::new(
                q_block,
                k.slice(s![.., .., keys.clone(), ..]),
                v.slice(s![.., .., keys.clone(), ..]),
            )
            .q_offset(rows.start as i64)
            .kv_offset(keys.start as i64)
            .buffer("doc", table(end))
            .with_lse();
            let part = kernel.run(&inputs)?;
            let lse = part.lse.as_ref().expect("asked for");
            let seen = lse.iter().filter(|x| x.is_finite()).count();
            // Keys after the queries: causal, nothing to see (out 0, lse -inf).
            if keys.start >= rows.end && seen > 0 {
                return Err(format!("{seen} rows see keys {keys:?} after their queries").into());
            }
            println!(
                "rank {rank} step {step}: queries {rows:?} x keys {keys:?}: {seen} of {} (head, query) rows see a key",
                lse.len()
            );
            parts.push(part);
        }
        let states: Vec<_> = parts
            .iter()
            .map(|p| (p.out.view(), p.lse.as_ref().expect("asked for").view()))
            .collect();
        let merged = merge_states(&states)?;
        let want_out: Array4<f32> = whole.out.slice(s![.., .., rows.clone(), ..]).to_owned();
        let want_lse = whole.lse.as_ref().expect("asked for");
        let want_lse = want_lse.slice(s![.., .., rows.clone()]);
        let merged_lse = merged.lse.as_ref().expect("merged");
        assert_eq!(merged.out.shape(), want_out.shape());
        assert_eq!(merged_lse.shape(), want_lse.shape());
        let diff = merged
            .out
            .iter()
            .zip(want_out.iter())
            .chain(merged_lse.iter().zip(want_lse.iter()))
            .map(|(a, b)| match (a - b).abs() {
                _ if a == b => 0.0,
                x if x.is_nan() => f32::INFINITY,
                x => x,
            })
            .fold(0f32, f32::max);
        println!(
            "rank {rank}: {} merged rows, max |diff| against the whole sequence {diff:.2e}",
            merged.out.len_of(Axis(2))
        );
        worst = worst.max(diff);
    }
    if worst > 1e-5 {
        return Err(
            format!("the merged blocks differ from the whole sequence by {worst:e}").into(),
        );
    }
    println!("all ranks agree with the whole sequence within {worst:.1e}");
    Ok(())
}
