#!/usr/bin/env bash
# Runs an included example end to end: checks examples/packed_docs.attn, runs it
# with the attnc CLI on the bundled inputs (tests/fixtures/packed_docs/) with the
# default backend (native code compiled with Cranelift) and with the loop-IR interpreter, and compares the results
# with what PyTorch FlexAttention computed for the same inputs. Then shows what a
# mistake in a spec looks like.
#
# Usage: scripts/demo.sh        (from anywhere; the outputs go to target/demo/)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The dev profile builds dependencies optimised (see Cargo.toml) and shares them
# with `cargo test`, so running the tests after the demo rebuilds only attnc.
echo "building attnc (the first build fetches and compiles the dependencies: a few minutes)..."
# cargo shows its own progress (on stderr), so a first build is not silent.
cargo build --bin attnc --example compare
bin=target/debug
fixture=tests/fixtures/packed_docs
demo=target/demo
mkdir -p "$demo"

# Prints a command the way a user would type it, then runs it.
show() {
    local shown="$*"
    shown=${shown//$bin\/examples\/compare/cargo run --example compare --}
    shown=${shown//$bin\//}
    printf '\n$ %s\n' "$shown"
    "$@"
}

note=$(sed -n 's/.*"note": *"\(.*\)".*/\1/p' "$fixture/case.json")
echo
echo "The spec: causal attention within each document of a packed sequence."
grep -v '^//' examples/packed_docs.attn
echo "The inputs: q, k, v float32 [B=2, H=4 (k, v: HKV=2), 95, D=16]; $note."

show "$bin/attnc" check examples/packed_docs.attn
show "$bin/attnc" run examples/packed_docs.attn \
    --q "$fixture/q.npy" --k "$fixture/k.npy" --v "$fixture/v.npy" \
    --buffer "doc=$fixture/doc.npy" --out "$demo/out.npy" --lse "$demo/lse.npy"

echo
echo "Compared with PyTorch FlexAttention's out and lse for the same inputs:"
show "$bin/examples/compare" "$demo/out.npy" "$fixture/out.npy" 1e-5
show "$bin/examples/compare" "$demo/lse.npy" "$fixture/lse.npy" 1e-5

echo
echo "The same spec lowered to the tiled loop IR (32 x 32 tiles) and run in f32 by its interpreter:"
show "$bin/attnc" run examples/packed_docs.attn --backend interp --block 32x32 \
    --q "$fixture/q.npy" --k "$fixture/k.npy" --v "$fixture/v.npy" \
    --buffer "doc=$fixture/doc.npy" --out "$demo/out_interp.npy"
show "$bin/examples/compare" "$demo/out_interp.npy" "$fixture/out.npy" 1e-5

echo
echo "A spec with a typo (docs for doc) is rejected with a pointed diagnostic:"
sed 's/doc\[kv\]/docs[kv]/' examples/packed_docs.attn > "$demo/typo.attn"
if show "$bin/attnc" check "$demo/typo.attn"; then
    echo "unexpected: the typo was accepted" >&2
    exit 1
fi
