#!/usr/bin/env bash
# The whole test suite, with the tools it needs (this is what .ci/run runs).
#
#   scripts/test.sh              # every test
#   scripts/test.sh --test suite ptx::   # arguments go to `cargo test`
#
# Needs a Rust toolchain from rustup and python3 with pip; installs what the tests
# need beyond cargo into .tools/ (kept between runs). A test whose tool is missing
# fails rather than skips.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# --- Tools the tests need beyond cargo ---------------------------------------------
# ptxas (from NVIDIA's PyPI wheel; no GPU or driver needed) assembles the PTX of every
# example in tests/suite/ptx.rs.
if [ ! -x .tools/cuda/nvidia/cuda_nvcc/bin/ptxas ]; then
    echo "installing ptxas into .tools/cuda (once)" >&2
    python3 -m pip install --quiet --target .tools/cuda nvidia-cuda-nvcc-cu12==12.9.86
fi

# --- The test suite ----------------------------------------------------------------
# The benchmarks build too (they run only by hand, `cargo bench`), so that a change of
# the library's types cannot leave them broken.
cargo test --benches --no-run
# The CUDA runtime and its GPU tests (tests/cuda_parity.rs) build without a GPU or a
# driver (cudarc loads it at run time): keep them compiling, free of clippy warnings
# (the allowed lints and why are in Cargo.toml), formatted, and the docs' links whole.
for tool in clippy rustfmt; do
    cargo "${tool/rustfmt/fmt}" --version >/dev/null 2>&1 || rustup component add "$tool"
done
cargo fmt --check
cargo clippy --features cuda --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --features cuda
cargo test "$@"
# The examples that check themselves against the reference run too (debug builds, about
# a minute), so that the code the docs point to keeps working. Only for the whole suite.
if [ $# -eq 0 ]; then
    for example in api decode ring; do
        echo "example $example" >&2
        cargo run --quiet --example "$example" > /dev/null
    done
fi
