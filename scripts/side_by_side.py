#!/usr/bin/env python3
"""attnc against PyTorch SDPA and compiled flex_attention, variant by variant, in one run.

The machine is shared and noisy, so each variant is measured as attnc, then torch
(SDPA and flex, through ../shared/peers/bench_torch.py), then attnc again, all within a
minute or two; the table shows both attnc medians and compares their mean with torch's
medians, and compares the fastest run of each side (noise only ever adds time).

Usage (from the repository root; PYTHON is a python with torch and numpy):
    scripts/side_by_side.py --python ../.venv-torch/bin/python --ns 4096 --runs 5
Prints a markdown table; needs `cargo build --release` first.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

VARIANTS = [
    ("dense", []),
    ("causal", []),
    ("sliding_window_256", []),
    ("document", ["--buffer", "doc=docs:4"]),
    ("softcap_causal", []),
    ("alibi_causal", ["--buffer", "slope=alibi"]),
]


def attnc(binary, variant, extra, n, runs, gemm):
    cmd = [binary, "bench", f"benches/specs/{variant}.attn", "--q-len", str(n), "--heads", "8",
           "--dim", "64", "--runs", str(runs), "--gemm", gemm, "--json", *extra]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def torch(python, peers, variant, n, runs):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "torch.json")
        subprocess.run([python, peers, "--ns", str(n), "--no-16k", "--variants", variant,
                        "--impls", "sdpa,flex", "--runs", str(runs), "--warmup", "1",
                        "--out", out], check=True, capture_output=True, text=True)
        with open(out) as f:
            rows = json.load(f)["results"]
    return {r["impl"]: r for r in rows if "impl" in r and r.get("median_ms")}


def load():
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", required=True, help="python with torch and numpy")
    ap.add_argument("--peers", default="../shared/peers/bench_torch.py")
    ap.add_argument("--binary", default="target/release/attnc")
    ap.add_argument("--ns", default="4096")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--gemm", default="auto", help="attnc tile products: auto, jit or native")
    ap.add_argument("--variants", default=",".join(v for v, _ in VARIANTS))
    args = ap.parse_args()
    wanted = args.variants.split(",")
    print("| N | variant | attnc ms (before / after torch) | SDPA ms | flex ms | attnc vs SDPA | attnc vs flex "
          "| best runs: attnc / SDPA / flex ms | best vs SDPA | best vs flex | attnc compile ms | flex first call s | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in map(int, args.ns.split(",")):
        for variant, extra in VARIANTS:
            if variant not in wanted:
                continue
            before = attnc(args.binary, variant, extra, n, args.runs, args.gemm)
            peers = torch(args.python, args.peers, variant, n, args.runs)
            after = attnc(args.binary, variant, extra, n, args.runs, args.gemm)
            ours = (before["median_ms"] + after["median_ms"]) / 2
            sdpa = peers.get("sdpa", {}).get("median_ms")
            flex = peers.get("flex", {}).get("median_ms")
            first = peers.get("flex", {}).get("first_call_ms")
            # The fastest run of each side: on a shared machine noise only adds
            # time, so the minima compare the code with less of the machine's swings.
            best = min(before["min_ms"], after["min_ms"])
            best_sdpa = peers.get("sdpa", {}).get("min_ms")
            best_flex = peers.get("flex", {}).get("min_ms")
            fmt = lambda x: "-" if x is None else f"{x:.1f}"
            ratio = lambda x, base: "-" if x is None else f"{x / base:.2f}x"
            print(f"| {n} | {variant} | {before['median_ms']:.1f} / {after['median_ms']:.1f} | {fmt(sdpa)} | "
                  f"{fmt(flex)} | {ratio(sdpa, ours)} | {ratio(flex, ours)} | "
                  f"{best:.1f} / {fmt(best_sdpa)} / {fmt(best_flex)} | {ratio(best_sdpa, best)} | "
                  f"{ratio(best_flex, best)} | {before['compile_ms']:.1f} | "
                  f"{'-' if first is None else f'{first / 1000:.1f}'} | {load()} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
