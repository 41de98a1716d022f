#!/usr/bin/env python3
"""Decode on the KV cache: attnc against the memory bandwidth and torch SDPA, in one run.

For each case of docs/performance.md ("Decode on the KV cache"), runs `attnc bench --bandwidth`
on contiguous K/V and on a paged pool of 16-slot pages (the memory read bandwidth is measured by
attnc right after its runs, streaming the arrays of K and V the call read with every thread), then
torch SDPA on the same shapes (contiguous K/V, `enable_gqa`), then attnc again, so that both sides
see the machine in the same state. Prints a markdown table.

Usage (from the repository root, after `cargo build --release`):
    scripts/bench_decode.py [--python PY] [--runs 7] [--only gqa,mqa,window]
PY is a python with torch (default: this one); without torch the SDPA column says so.
"""
import argparse
import json
import os
import subprocess
import sys

# name, spec, B, H, HKV, D, KV
CASES = [
    ("gqa", "examples/causal.attn", 4, 32, 8, 128, 16384),
    ("mqa", "examples/causal.attn", 1, 8, 1, 128, 131072),
    ("window", "examples/sliding_window.attn", 4, 32, 8, 128, 4096),
    ("window", "examples/sliding_window.attn", 4, 32, 8, 128, 65536),
]

# One decode step in torch: q [B, H, 1, D] against K/V [B, HKV, KV, D]; the sliding window
# (4096, as in examples/sliding_window.attn) as a boolean mask over the keys.
TORCH = r"""
import json, statistics, sys, time, torch
import torch.nn.functional as F
B, H, HKV, D, KV, window, runs = (int(x) for x in sys.argv[1:8])
torch.set_num_threads(int(sys.argv[8])); torch.manual_seed(0)
q = torch.randn(B, H, 1, D); k = torch.randn(B, HKV, KV, D); v = torch.randn(B, HKV, KV, D)
mask = None
if window > 0:
    mask = (KV - 1 - torch.arange(KV)) < window
    mask = mask[None, None, None, :]
f = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=HKV != H)
with torch.no_grad():
    for _ in range(2): f()
    ts = []
    for _ in range(runs):
        t = time.perf_counter(); f(); ts.append((time.perf_counter() - t) * 1e3)
print(json.dumps({"median_ms": statistics.median(ts), "min_ms": min(ts), "torch": torch.__version__}))
"""


def attnc(spec, b, h, hkv, d, kv, runs, page):
    cmd = ["target/release/attnc", "bench", spec, "--q-len", "1", "--kv-len", str(kv),
           "--batch", str(b), "--heads", str(h), "--kv-heads", str(hkv), "--dim", str(d),
           "--runs", str(runs), "--bandwidth", "--json", "--quiet"]
    cmd += ["--page-size", str(page)] if page else ["--q-offset", str(kv - 1)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def sdpa(python, b, h, hkv, d, kv, window, runs):
    threads = os.cpu_count() or 1
    r = subprocess.run([python, "-c", TORCH, *map(str, (b, h, hkv, d, kv, window, runs, threads))],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1][:80]}
    return json.loads(r.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--only", default="gqa,mqa,window")
    a = ap.parse_args()
    only = set(a.only.split(","))
    print("| case | K/V | attnc median ms (2nd pass) | K+V GB/s | memory read GB/s | x memory time | torch SDPA median ms | SDPA / attnc |")
    print("|---|---|---|---|---|---|---|---|")
    for name, spec, b, h, hkv, d, kv in CASES:
        if name not in only:
            continue
        window = 4096 if name == "window" else 0
        first = {p: attnc(spec, b, h, hkv, d, kv, a.runs, p) for p in (None, 16)}
        torch = sdpa(a.python, b, h, hkv, d, kv, window, a.runs)
        second = {p: attnc(spec, b, h, hkv, d, kv, a.runs, p) for p in (None, 16)}
        for p in (None, 16):
            r1, r2 = first[p], second[p]
            ms = (r1["median_ms"] + r2["median_ms"]) / 2
            bw = (r1["read_gb_per_s"] + r2["read_gb_per_s"]) / 2
            ratio = (r1["memory_ratio"] + r2["memory_ratio"]) / 2
            if "median_ms" in torch and p is None:
                t = "%.1f" % torch["median_ms"]
                speed = "%.1fx" % (torch["median_ms"] / ms)
            elif "median_ms" in torch:
                t, speed = "(contiguous above)", "%.1fx" % (torch["median_ms"] / ms)
            else:
                t, speed = torch.get("error", "-"), "-"
            print("| %s B%d H%d HKV%d D%d KV%d | %s | %.1f (%.1f) | %.1f | %.1f | %.2f | %s | %s |" % (
                name, b, h, hkv, d, kv, "pages of %d" % p if p else "contiguous",
                r1["median_ms"], r2["median_ms"], r1["gb_per_s"], bw, ratio, t, speed), flush=True)


if __name__ == "__main__":
    main()
