#!/usr/bin/env bash
# GPU check of the CUDA backend: build with the `cuda` feature, run the parity tests against the
# reference interpreter on every example and fixture (tolerance 1e-4 for f32 inputs, 1e-2 for
# f16/bf16), then the benchmark (B = 4, H = 16, D = 64 and 128, N = 1024 .. 16384; dense, causal,
# sliding window, document, soft-cap, ALiBi), printing TFLOP/s.
#
# Needs an NVIDIA GPU with compute capability 8.0+ and its driver; no CUDA toolkit (the driver
# JIT-compiles the PTX). Sized to finish within 10 minutes on an H200. Results go to $OUT when it is
# set (gpu_check.log, gpu_bench.jsonl, ptxas figures), else to target/gpu-check/.
#
#   scripts/gpu-check.sh              # parity + benchmark
#   scripts/gpu-check.sh --parity     # parity tests only
#   ATTNC_BENCH_SIZES=1024,4096 scripts/gpu-check.sh --bench
#   scripts/gpu-check.sh --prepare    # on a machine with cargo: build the test binaries into
#                                     # target/gpu-check-bin/ for a GPU machine without network
#
# When target/gpu-check-bin/ holds prebuilt binaries they are used instead of cargo (the GPU
# machine may have no crates.io access). They look for the specs under the checkout path they were
# built in (recorded in target/gpu-check-bin/ROOT); if that path does not exist it is linked here.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

mode="${1:-all}"
case "$mode" in
  all | --parity | --bench | --prepare) ;;
  *) echo "usage: $0 [--parity | --bench | --prepare]" >&2; exit 2 ;;
esac

bin_dir=target/gpu-check-bin
if [ "$mode" = "--prepare" ]; then
  mkdir -p "$bin_dir"
  cargo test --release --features cuda --no-run --test cuda_parity --test cuda_bench --message-format=json \
    | python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in ("cuda_parity", "cuda_bench"):
        shutil.copy(m["executable"], sys.argv[1] + "/" + m["target"]["name"])
        print("prepared", m["target"]["name"])
' "$bin_dir"
  pwd > "$bin_dir/ROOT"
  exit 0
fi

out="${OUT:-target/gpu-check}"
mkdir -p "$out"
export OUT="$out"
log="$out/gpu_check.log"
: > "$log"
say() { echo "$@" | tee -a "$log"; }

say "== gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1 | tee -a "$log" || true
else
  say "nvidia-smi not found; the tests report whether a driver and a device are usable"
fi

start=$(date +%s)
if [ -x "$bin_dir/cuda_parity" ] && [ -x "$bin_dir/cuda_bench" ]; then
  say "== using the prebuilt test binaries in $bin_dir"
  built_root="$(cat "$bin_dir/ROOT")"
  if [ "$built_root" != "$(pwd)" ] && [ ! -e "$built_root" ]; then
    mkdir -p "$(dirname "$built_root")"
    ln -s "$(pwd)" "$built_root"
  fi
  parity=("$bin_dir/cuda_parity")
  bench=("$bin_dir/cuda_bench")
else
  say "== build (release, --features cuda)"
  cargo build --release --features cuda --tests 2>&1 | tail -n 3 | tee -a "$log"
  parity=(cargo test --release --features cuda --test cuda_parity --)
  bench=(cargo test --release --features cuda --test cuda_bench --)
fi

status=0
if [ "$mode" != "--bench" ]; then
  say "== parity with the reference interpreter"
  if ! "${parity[@]}" --nocapture --test-threads=1 2>&1 | tee -a "$log"; then
    status=1
    say "parity: FAILED"
  fi
fi
if [ "$mode" != "--parity" ]; then
  say "== benchmark"
  if ! "${bench[@]}" --ignored --nocapture 2>&1 | tee -a "$log"; then
    status=1
    say "benchmark: FAILED"
  fi
fi
say "== done in $(( $(date +%s) - start )) s, status $status; log in $log"
exit "$status"
