#!/usr/bin/env bash
# GPU check of the CUDA backend: build with the `cuda` feature, run the parity tests against the
# reference interpreter on every example and fixture (tolerance 1e-4 for f32 inputs, 1e-2 for
# f16/bf16), with NaN/Inf at masked keys, and on KV caches (paged pools, ragged rows, int8/fp8,
# key offsets, a resident pool appended step by step), then the benchmark (B = 4, H = 16, D = 64
# and 128, N = 1024, 4096, 16384; dense, causal, sliding window, document, soft-cap, ALiBi; f16
# and bf16, f32 at N = 1024), printing TFLOP/s.
#
# Needs an NVIDIA GPU with compute capability 8.0+ and its driver; no CUDA toolkit (the driver
# JIT-compiles the PTX). Sized to finish within 8 minutes on an H200, each part time-boxed so that
# the script stops by itself: the quick parity tests 45 s, the KV-cache parity tests 90 s, the
# parity over every example 105 s, the benchmark 140 s (it starts no new configuration after
# ATTNC_BENCH_BUDGET_S, 110 s), and, where python3 has torch, a 30 s baseline: torch's SDPA
# (FlashAttention-2) on the same GPU.
# Results go to $OUT when it is set, else to target/gpu-check/: gpu_check.log (nvidia-smi, every
# parity figure, the benchmark table), gpu_bench.jsonl (one line per benchmark configuration) and
# gpu_dmon.log (nvidia-smi dmon: clocks, power, use during the run).
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
  strip "$bin_dir/cuda_parity" "$bin_dir/cuda_bench" 2> /dev/null || true
  pwd > "$bin_dir/ROOT"
  git rev-parse HEAD > "$bin_dir/COMMIT" 2> /dev/null || true
  du -sh "$bin_dir"
  exit 0
fi

out="${OUT:-target/gpu-check}"
mkdir -p "$out"
export OUT="$out"
log="$out/gpu_check.log"
: > "$log"
say() { echo "$@" | tee -a "$log"; }

say "== gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
dmon_pid=
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu,pstate --format=csv 2>&1 | tee -a "$log" || true
  nvidia-smi 2>&1 | tee -a "$log" || true
  nvidia-smi dmon -s pucm -d 5 > "$out/gpu_dmon.log" 2>&1 &
  dmon_pid=$!
else
  say "nvidia-smi not found; the tests report whether a driver and a device are usable"
fi
say "libcuda: $(ldconfig -p 2> /dev/null | grep -m1 'libcuda\.so\.1' || echo 'not in the ldconfig cache')"
[ -f "$bin_dir/COMMIT" ] && say "prebuilt binaries from commit $(cat "$bin_dir/COMMIT")"

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

# Runs "$@" for at most $1 seconds, output to the log; a timeout or a failure sets status.
status=0
part() {
  local what=$1 limit=$2 rc=0
  shift 2
  local t0=$SECONDS
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$log" || rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    say "$what: TIMED OUT after $limit s"
    status=1
  elif [ "$rc" -ne 0 ]; then
    say "$what: FAILED (exit $rc, $((SECONDS - t0)) s)"
    status=1
  else
    say "$what: ok ($((SECONDS - t0)) s)"
  fi
}

if [ "$mode" != "--bench" ]; then
  say "== parity with the reference interpreter"
  part "parity (fixtures, errors, NaN/Inf at masked keys)" 45 "${parity[@]}" --nocapture --test-threads=1 \
    non_finite failing_reads every_fixture
  part "parity (KV caches: paged, ragged, quantized, key offsets, resident pool)" 90 "${parity[@]}" \
    --nocapture --test-threads=1 paged_ragged key_offsets a_resident_pool a_prepared_call
  part "parity (every example)" 105 "${parity[@]}" --nocapture --test-threads=1 every_example
fi
if [ "$mode" != "--parity" ]; then
  say "== benchmark"
  ATTNC_BENCH_BUDGET_S="${ATTNC_BENCH_BUDGET_S:-110}" part "benchmark" 140 "${bench[@]}" --ignored --nocapture
fi
if [ "$mode" != "--parity" ] && python3 -c 'import torch' 2> /dev/null; then
  say "== baseline: torch SDPA (FlashAttention-2 backend) on the same GPU, TFLOP/s counting causal as half"
  part "baseline" 30 python3 - "$out/gpu_bench.jsonl" << 'PY'
import json, sys, torch
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F
dev = torch.cuda.get_device_name()
print(f"torch {torch.__version__} on {dev}")
print(f"{'variant':16} {'N':>5} {'D':>3} {'type':>4} {'ms':>9} {'TFLOP/s':>10}")
B, H = 4, 16
with open(sys.argv[1], "a") as log:
    for n in (4096, 16384):
        for d in (64, 128):
            for dt, name in ((torch.float16, "f16"), (torch.bfloat16, "bf16")):
                q, k, v = (torch.randn(B, H, n, d, device="cuda", dtype=dt) for _ in range(3))
                for causal in (False, True):
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        f = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                        for _ in range(3):
                            f()
                        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        s.record(); f(); e.record(); torch.cuda.synchronize()
                        reps = max(3, min(100, int(100 / max(s.elapsed_time(e), 1e-3))))
                        s.record()
                        for _ in range(reps):
                            f()
                        e.record(); torch.cuda.synchronize()
                    ms = s.elapsed_time(e) / reps
                    flops = 4 * B * H * n * n * d * (0.5 if causal else 1.0)
                    label = "sdpa_causal" if causal else "sdpa_dense"
                    tf = flops / ms / 1e9
                    print(f"{label:16} {n:>5} {d:>3} {name:>4} {ms:>9.3f} {tf:>10.1f}", flush=True)
                    log.write(json.dumps({"impl": "torch_sdpa_flash", "variant": label, "n": n, "d": d, "b": B, "h": H,
                        "dtype": name, "device": dev, "ms": ms, "reps": reps, "tflops_fa_convention": tf}) + "\n")
PY
fi
if [ -n "$dmon_pid" ]; then
  kill "$dmon_pid" 2> /dev/null || true
  nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>&1 | tee -a "$log" || true
  nvidia-smi --query-gpu=clocks_event_reasons.active --format=csv 2>&1 | tee -a "$log" || true
fi
say "== done in $(( $(date +%s) - start )) s, status $status; log in $log"
exit "$status"
