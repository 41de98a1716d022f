#!/usr/bin/env python3
"""attnc against PyTorch SDPA and compiled flex_attention in paired rounds.

The machine is shared and its speed swings by up to 2x from one minute (or one
second) to the next, for torch as for attnc. So instead of timing one side for a
while and then the other, each round times attnc (a few runs, one `attnc bench`
process), then SDPA and flex_attention (the same number of calls, in this process,
already compiled), back to back within seconds, and the comparison is the median
over rounds of the per-round ratios: each ratio compares two measurements made in
the same state of the machine.

The torch side is set up by ../shared/peers/bench_torch.py (its variants, its SDPA
calls; flex_attention compiled with a block mask of default 128 x 128 blocks),
with 2 threads, like `attnc bench` on both cores.

Usage (from the repository root; PYTHON is a python with torch and numpy):
    PYTHON scripts/paired.py --ns 4096 --rounds 8 --runs 3
Prints a markdown table; needs `cargo build --release` first.
"""
import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time

VARIANTS = {
    "dense": [],
    "causal": [],
    "sliding_window_256": [],
    "document": ["--buffer", "doc=docs:4"],
    "softcap_causal": [],
    "alibi_causal": ["--buffer", "slope=alibi"],
}


def load_peers(path):
    spec = importlib.util.spec_from_file_location("bench_torch", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def attnc_ms(binary, variant, n, dim, runs, gemm):
    cmd = [binary, "bench", f"benches/specs/{variant}.attn", "--q-len", str(n), "--heads", "8",
           "--dim", str(dim), "--runs", str(runs), "--warmup", "1", "--gemm", gemm, "--json",
           *VARIANTS[variant]]
    r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return r["median_ms"], r["compile_ms"]


def torch_ms(fn, args, runs):
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(*args)
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def summary(ratios):
    """Median of the per-round ratios and their range, as text."""
    if not ratios:
        return "-"
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default="../shared/peers/bench_torch.py")
    ap.add_argument("--binary", default="target/release/attnc")
    ap.add_argument("--ns", default="4096")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3, help="runs per side per round (their median is taken)")
    ap.add_argument("--gemm", default="auto", help="attnc tile products: auto, jit or native")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--dim", type=int, default=64, help="head dim D of both sides")
    args = ap.parse_args()
    peers = load_peers(args.peers)
    peers.D = args.dim
    torch = peers.torch
    torch.set_num_threads(2)
    torch.manual_seed(0)
    print("| D | N | variant | rounds | attnc ms | SDPA ms | flex ms | SDPA / attnc | flex / attnc "
          "| attnc faster than SDPA | attnc at least 2x flex | attnc compile ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in map(int, args.ns.split(",")):
        for variant in args.variants.split(","):
            torch._dynamo.reset()
            var = peers.make_variant(variant, n)
            q, k, v = (torch.randn(peers.B, peers.H, n, peers.D, dtype=torch.float32) for _ in range(3))
            scale = 1.0 / math.sqrt(peers.D)
            sdpa, _, _ = peers.build_sdpa_call(var, n, scale)
            bm = None
            if var["mask_mod"] is not None:
                bm = peers.create_block_mask(var["mask_mod"], None, None, n, n, device="cpu")
            flex_c = torch.compile(peers.flex_attention)

            def flex(q_, k_, v_):
                return flex_c(q_, k_, v_, score_mod=var["score_mod"], block_mask=bm, scale=scale)

            # Compile and warm both torch paths before the rounds.
            for fn in (sdpa, flex):
                if fn is not None:
                    fn(q, k, v)
                    fn(q, k, v)
            rows = []
            compile_ms = []
            for _ in range(args.rounds):
                ours, c_ms = attnc_ms(args.binary, variant, n, args.dim, args.runs, args.gemm)
                compile_ms.append(c_ms)
                s_ms = torch_ms(sdpa, (q, k, v), args.runs) if sdpa is not None else None
                f_ms = torch_ms(flex, (q, k, v), args.runs)
                rows.append((ours, s_ms, f_ms))
            med = lambda xs: "-" if not xs else f"{statistics.median(xs):.1f}"  # noqa: E731
            ours_all = [r[0] for r in rows]
            sdpa_all = [r[1] for r in rows if r[1] is not None]
            flex_all = [r[2] for r in rows]
            vs_sdpa = [s / o for o, s, _ in rows if s is not None]
            vs_flex = [f / o for o, _, f in rows]
            faster = "-" if not vs_sdpa else f"{sum(x > 1 for x in vs_sdpa)}/{len(vs_sdpa)} rounds"
            twice = f"{sum(x >= 2 for x in vs_flex)}/{len(vs_flex)} rounds"
            print(f"| {args.dim} | {n} | {variant} | {len(rows)} | {med(ours_all)} | {med(sdpa_all)} | {med(flex_all)} | "
                  f"{summary(vs_sdpa)} | {summary(vs_flex)} | {faster} | {twice} | "
                  f"{statistics.median(compile_ms):.1f} |", flush=True)


if __name__ == "__main__":
    if not os.path.exists("benches/specs"):
        sys.exit("run from the repository root")
    sys.exit(main())
