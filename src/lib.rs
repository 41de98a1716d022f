//! attnc: an attention compiler.
//!
//! A `.attn` spec describes an attention variant as a mask and a score mod;
//! attnc checks it, analyses the mask per tile, and runs it. The pipeline
//! (see `docs/architecture.md`):
//!
//! ```text
//! source --syntax::parse--> ast::File --sema::check--> sema::Spec --> backend --> Outputs
//! ```
//!
//! Library use:
//!
//! ```
//! use attnc::{load, Inputs, SourceFile, SpecOptions};
//! use attnc::ndarray::Array4;
//!
//! let src = SourceFile::new("causal.attn", "attention causal { mask = causal }");
//! let program = load(src, &SpecOptions::default()).unwrap();
//! let q = Array4::<f32>::ones((1, 2, 5, 8));
//! let k = Array4::<f32>::ones((1, 2, 5, 8));
//! let v = Array4::<f32>::ones((1, 2, 5, 8));
//! let out = program.run_reference(&Inputs::new(q.view(), k.view(), v.view()).with_lse()).unwrap();
//! assert_eq!(out.out.shape(), &[1, 2, 5, 8]);
//! ```

pub mod bench;
pub mod bind;
pub mod buffer;
pub mod codegen;
pub mod driver;
pub mod mask;
pub mod memory;
pub mod merge;
pub mod npy;
pub mod reference;
pub mod runtime;
pub mod sema;
pub mod syntax;
pub mod tensor;
pub mod tile;

/// The ndarray this API takes and returns (`Array4<f32>` views in, arrays
/// out), re-exported so callers use the same version (0.16).
pub use ndarray;

pub use bind::{Inputs, KvLayout, Outputs};
pub use buffer::BufferData;
pub use driver::{
    compile, load, Backend, CompileOptions, Error, JitKernel, Plan, Program, SourceFile,
    SpecOptions, Tiles,
};
pub use merge::merge_states;
pub use tensor::{AppendError, ElemType, KvArray, KvData};

/// The pipeline runs one way: a stage's code (outside its tests) names no
/// later stage. `runtime` owns the ABI between generated code and the host,
/// so the backends (`codegen`) depend on it, never the reverse; the
/// `driver` composes them.
#[cfg(test)]
mod layering {
    const STAGES: [&str; 7] = [
        "syntax", "sema", "mask", "tile", "runtime", "codegen", "driver",
    ];

    fn sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    #[test]
    fn no_stage_names_a_later_one() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut broken = Vec::new();
        for (i, stage) in STAGES.iter().enumerate() {
            let mut files = Vec::new();
            let dir = src.join(stage);
            if dir.is_dir() {
                sources(&dir, &mut files);
            } else {
                files.push(src.join(format!("{stage}.rs")));
            }
            assert!(!files.is_empty(), "{stage} has no sources");
            for file in files {
                let text = std::fs::read_to_string(&file).unwrap();
                // The code before the unit tests, without comments.
                let code = text.split("#[cfg(test)]").next().unwrap_or("");
                for (n, line) in code.lines().enumerate() {
                    let line = line.split("//").next().unwrap_or("");
                    for later in &STAGES[i + 1..] {
                        if line.contains(&format!("crate::{later}")) {
                            broken.push(format!(
                                "{}:{}: {stage} names {later}",
                                file.display(),
                                n + 1
                            ));
                        }
                    }
                }
            }
        }
        assert!(broken.is_empty(), "{}", broken.join("\n"));
    }
}
