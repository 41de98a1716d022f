#!/usr/bin/env bash
# Block-map build time and peak memory for causal, sliding window 256,
# document (8 sorted documents) and block-sparse masks, 128 x 128 tiles.
#
# Usage: benches/block_maps/run.sh [N ...]      (default: 4096 16384 131072 1048576)
# Prints one markdown table row per (pattern, N). build_ms is the fastest of
# --repeat builds inside one process (the median is printed beside it); peak
# RSS is the whole `attnc blocks` process (spec, buffers, map), from
# /usr/bin/time -v. Needs a release build: cargo build --release.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=target/release/attnc
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(4096 16384 131072 1048576)
echo "| pattern | N | tiles | full | partial | build ms (min) | build ms (median) | box evals | element evals | map bytes | peak RSS MiB |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for n in "${sizes[@]}"; do
  rows=$(( n / 128 ))
  # About 8 random key blocks per query block.
  p=$(awk -v r="$rows" 'BEGIN { p = 8 / r; if (p > 1) p = 1; printf "%.6f", p }')
  while IFS='|' read -r name args; do
    # shellcheck disable=SC2086
    out=$(/usr/bin/time -v "$bin" blocks $args --q-len "$n" --kv-len "$n" --block 128x128 --json --repeat 5 2>/tmp/attnc_blocks_time.txt)
    rss=$(awk '/Maximum resident set size/ { printf "%.1f", $6 / 1024 }' /tmp/attnc_blocks_time.txt)
    echo "$out" | python3 -c "
import json, sys
v = json.load(sys.stdin)
print('| $name | $n | {} | {} | {} | {:.3f} | {:.3f} | {} | {} | {} | $rss |'.format(
    v['q_tiles'] * v['kv_tiles'], v['full'], v['partial'], v['build_ms'], v['build_ms_median'],
    v['box_evaluations'], v['element_evaluations'], v['map_bytes']))"
  done <<LIST
causal|examples/causal.attn
sliding window 256|examples/sliding_window.attn --param window=256
document (8 sorted)|examples/packed_docs.attn --buffer doc=docs:8
block-sparse (~8 blocks/row)|benches/block_maps/block_sparse_128.attn --buffer layout=bernoulli:$p
LIST
done
