//! Fuzz target: arbitrary bytes as an `.npy` file, read every way the CLI
//! reads one (q, k or v as float32 [B, H, L, D]; buffers as int, float and
//! bool; any float32 array).
//!
//! A panic or an abort is a bug: a malformed file is an error, and a header
//! that claims more data than the file holds is an error before anything is
//! allocated (run with `-rss_limit_mb=2048`: no input may make the reader
//! allocate what its header claims). The same property runs on stable in
//! `tests/suite/robustness.rs` (`mutated_npy_files_never_panic`).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use attnc::sema::Type;
use libfuzzer_sys::fuzz_target;

fn path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("attnc-fuzz-npy-{}.npy", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let path = path();
    std::fs::write(path, data).expect("the temporary file can be written");
    if let Err(e) = attnc::npy::read_f32_4d(path, "q") {
        let _ = e.render();
    }
    if let Err(e) = attnc::npy::read_f32_dyn(path) {
        let _ = e.render();
    }
    for ty in [Type::Int, Type::Float, Type::Bool] {
        if let Err(e) = attnc::npy::read_buffer(path, "doc", ty) {
            let _ = e.render();
        }
    }
});
