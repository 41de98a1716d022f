//! Fuzz target: arbitrary bytes through parse + check, rendering every error.
//!
//! Invalid UTF-8 is decoded lossily, so every input reaches the parser. A
//! panic, an abort or a stack overflow is a bug: the parser and the checker
//! must answer every input with a module or a diagnostic. The same body runs
//! on stable in `tests/suite/robustness.rs` over token soup and mutated examples.
#![no_main]

use std::sync::Arc;

use attnc::{driver, SourceFile, SpecOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let file = Arc::new(SourceFile::new("fuzz.attn", text.as_ref()));
    match driver::check(&file) {
        Err(e) => {
            let _ = e.render();
        }
        Ok(module) => {
            let _ = module.to_string();
            // Picking each block must work for every block the checker accepted.
            for spec in &module.specs {
                let options = SpecOptions {
                    entry: Some(spec.name.clone()),
                    params: vec![],
                };
                if let Err(e) = attnc::load(SourceFile::new("fuzz.attn", text.as_ref()), &options) {
                    panic!(
                        "checked block `{}` failed to load: {}",
                        spec.name,
                        e.render()
                    );
                }
            }
        }
    }
});
