#!/usr/bin/env bash
# CPU benchmark of the six reference variants with the jit backend, written as
# a markdown table (one row per head dim, length and variant). Usage:
#   scripts/bench_cpu.sh [NS] [RUNS] [DIMS]   e.g. scripts/bench_cpu.sh "1024 4096 16384" 3 "64 128"
# Compare side by side with PyTorch in the same session:
#   python3 ../shared/peers/bench_torch.py --ns 1024,4096 --impls sdpa,flex
set -euo pipefail
cd "$(dirname "$0")/.."
NS=${1:-"1024 4096"}
RUNS=${2:-5}
DIMS=${3:-64}
cargo build --release >&2   # its progress on stderr; the table goes to stdout
B=target/release/attnc
echo "| D | N | variant | median ms | min ms | GF/s dense-equiv | GF/s useful | compile ms | peak RSS MiB |"
echo "|---|---|---|---|---|---|---|---|---|"
for d in $DIMS; do
for n in $NS; do
  for v in dense causal sliding_window_256 document softcap_causal alibi_causal; do
    extra=()
    case $v in
      document) extra=(--buffer doc=docs:4) ;;
      alibi_causal) extra=(--buffer slope=alibi) ;;
    esac
    $B bench benches/specs/$v.attn --q-len "$n" --heads 8 --dim "$d" --runs "$RUNS" --json "${extra[@]}" |
      python3 -c '
import json, sys
r = json.load(sys.stdin)
print("| %d | %d | %s | %.2f | %.2f | %.1f | %.1f | %.2f | %.0f |" % (r["dim"], r["q_len"], r["spec"], r["median_ms"], r["min_ms"], r["gflops_dense"], r["gflops_useful"], r["compile_ms"], r["peak_rss_mib"]))'
  done
done
done
