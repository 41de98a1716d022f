#!/usr/bin/env bash
# Regenerates the block-map pictures of docs/block-maps.md:
# every example at Q = KV = 1024 with 32 x 32 tiles (a 32 x 32 grid).
# Needs a release build (cargo build --release) and python3 (no packages).
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=target/release/attnc
out=docs/images/block-maps
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# parent[1024] for spec_tree: prompt tokens are roots, the 256 draft tokens
# after the prompt form a binary tree rooted at position 768.
python3 - "$tmp/parent.npy" <<'PY'
import struct, sys
n, prompt = 1024, 768
vals = [-1 if i <= prompt else prompt + (i - prompt - 1) // 2 for i in range(n)]
header = "{'descr': '<i8', 'fortran_order': False, 'shape': (%d,), }" % n
header += " " * (63 - (10 + len(header)) % 64) + "\n"
with open(sys.argv[1], "wb") as f:
    f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode())
    f.write(struct.pack("<%dq" % n, *vals))
PY
# offsets[5] for doc_offsets: four documents of 200, 250, 350 and 224 tokens.
python3 - "$tmp/offsets.npy" <<'PY'
import struct, sys
vals = [0, 200, 450, 800, 1024]
header = "{'descr': '<i8', 'fortran_order': False, 'shape': (%d,), }" % len(vals)
header += " " * (63 - (10 + len(header)) % 64) + "\n"
with open(sys.argv[1], "wb") as f:
    f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode())
    f.write(struct.pack("<%dq" % len(vals), *vals))
PY
run() {
  local name=$1
  shift
  "$bin" blocks "examples/$name.attn" --q-len 1024 --kv-len 1024 --block 32x32 --png "$out/$name.png" "$@" >/dev/null
}
run causal
run dense
run sliding_window --param window=256
run sliding_window_bidir --param window=256
run gemma2_local --param window=320
run streaming_llm --param sinks=32 --param window=384
run chunked --param chunk=384
run dilated_sliding --param window=96 --param dilation=3
run prefix_lm --param prefix=288
run packed_docs --buffer doc=docs:5
run packed_alibi --buffer doc=docs:3 --buffer slope=alibi
run longformer_global --param window=192 --buffer global=bernoulli:0.004
run block_sparse --buffer layout=bernoulli:0.15
run neighborhood_2d --param W=32 --param R=3
run spec_tree --param prompt=768 --buffer "parent=$tmp/parent.npy"
run alibi --buffer slope=alibi
run softcap
run t5_bias --buffer rel_bias=uniform
run doc_offsets --buffer "offsets=$tmp/offsets.npy"
run gelu_score
run mla_rope --buffer q_pe=uniform --buffer k_pe=uniform
run natten_morton --param R=3
run sandwich
ls "$out"
