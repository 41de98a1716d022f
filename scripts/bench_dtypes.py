#!/usr/bin/env python3
"""Half precision and quantized caches: attnc in each type against its own f32 and torch SDPA, in one run.

Two cases of docs/performance.md ("Half precision and quantized caches"):
  prefill  causal B1 H8 N4096 D64: attnc with --dtype f32, bf16, f16 (q, k and v in the type),
           torch SDPA (is_causal) in float32, bfloat16 and float16;
  decode   causal B4 H32 HKV8 D128 Q1 KV16384 on a paged pool of 16-slot pages: attnc with
           --kv-dtype f32, bf16, f16, int8, fp8 (`--bandwidth`: the memory read rate measured
           right after, over the bytes the call reads), torch SDPA (enable_gqa, contiguous K/V)
           in float32 and bfloat16.
Each attnc configuration is measured before and after torch, so both sides see the machine in
the same state; the table gives both medians. Then `--rounds` paired rounds of the prefill (attnc
f32 then bf16, back to back, `--runs` each) and of the decode (f32 then int8): the median and range
of the per-round ratios, which compare two measurements made in the same state of a noisy machine
(and, for int8, its time over the memory time). Prints the
CPU's AVX-512 BF16 / VNNI / AMX flags.

Usage (from the repository root, after `cargo build --release`):
    scripts/bench_dtypes.py [--python PY] [--runs 5] [--rounds 7]
PY is a python with torch (default: this one); without torch the SDPA rows say so.
"""
import argparse
import json
import statistics
import subprocess
import sys

TORCH = r"""
import json, sys, time, statistics, torch
import torch.nn.functional as F
torch.set_num_threads(2)
case, runs = sys.argv[1], int(sys.argv[2])
out = {}
g = torch.Generator().manual_seed(0)
for name in sys.argv[3].split(","):
    dt = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[name]
    if case == "prefill":
        q, k, v = (torch.randn(1, 8, 4096, 64, generator=g).to(dt) for _ in range(3))
        call = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        q = torch.randn(4, 32, 1, 128, generator=g).to(dt)
        k, v = (torch.randn(4, 8, 16384, 128, generator=g).to(dt) for _ in range(2))
        call = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    call()
    ts = []
    for _ in range(runs):
        t = time.perf_counter(); call(); ts.append((time.perf_counter() - t) * 1e3)
    out[name] = statistics.median(ts)
print(json.dumps(out))
"""


def attnc(binary, case, dtype, runs):
    if case == "prefill":
        cmd = [binary, "bench", "examples/causal.attn", "--q-len", "4096", "--heads", "8",
               "--dim", "64", "--dtype", dtype]
    else:
        cmd = [binary, "bench", "examples/causal.attn", "--q-len", "1", "--kv-len", "16384",
               "--batch", "4", "--heads", "32", "--kv-heads", "8", "--dim", "128",
               "--page-size", "16", "--kv-dtype", dtype, "--bandwidth"]
    cmd += ["--runs", str(runs), "--json", "-q"]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def torch(python, case, dtypes, runs):
    r = subprocess.run([python, "-c", TORCH, case, str(runs), ",".join(dtypes)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return None, r.stderr.strip().splitlines()[-1] if r.stderr else "failed"
    return json.loads(r.stdout), None


def load():
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def flags():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                break
    wanted = ["avx2", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_int8"]
    return model, [f for f in wanted if f in have]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=sys.executable, help="python with torch")
    ap.add_argument("--binary", default="target/release/attnc")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=7, help="paired rounds of each comparison (f32/bf16 prefill, f32/int8 decode)")
    args = ap.parse_args()
    model, have = flags()
    print(f"CPU: {model}; flags: {' '.join(have)}; load before: {load()}\n")
    for case, ours, theirs in [
        ("prefill", ["f32", "bf16", "f16"], ["f32", "bf16", "f16"]),
        ("decode", ["f32", "bf16", "f16", "int8", "fp8"], ["f32", "bf16"]),
    ]:
        before = {t: attnc(args.binary, case, t, args.runs) for t in ours}
        sdpa, why = torch(args.python, case, theirs, args.runs)
        after = {t: attnc(args.binary, case, t, args.runs) for t in ours}
        f32 = min(before["f32"]["median_ms"], after["f32"]["median_ms"])
        print(f"### {case} (load {load()})\n")
        if case == "prefill":
            print("| type | attnc ms (before, after) | vs attnc f32 | torch SDPA ms | SDPA / attnc |")
            print("|---|---|---|---|---|")
        else:
            print("| K/V type | attnc ms (before, after) | vs attnc f32 | kv_bytes MiB | read GB/s | x memory time | torch SDPA ms |")
            print("|---|---|---|---|---|---|---|")
        for t in ours:
            a, b = before[t], after[t]
            best = min(a["median_ms"], b["median_ms"])
            sd = sdpa.get(t) if sdpa else None
            sd_text = f"{sd:.1f}" if sd else ("n/a" if sdpa else f"no torch ({why})")
            if case == "prefill":
                ratio = f"{sd / best:.2f}x" if sd else "-"
                print(f"| {t} | {a['median_ms']:.1f}, {b['median_ms']:.1f} | {f32 / best:.2f}x | {sd_text} | {ratio} |")
            else:
                mem = b.get("memory_ratio") or a.get("memory_ratio")
                rate = b.get("read_gb_per_s") or a.get("read_gb_per_s")
                print(f"| {t} | {a['median_ms']:.1f}, {b['median_ms']:.1f} | {f32 / best:.2f}x | "
                      f"{a['kv_bytes'] / 2**20:.0f} | {rate:.1f} | {mem:.2f} | {sd_text} |")
        print()
    for case, fast in [("prefill", "bf16"), ("decode", "int8")]:
        ratios, mems = [], []
        for _ in range(args.rounds):
            f32 = attnc(args.binary, case, "f32", args.runs)["median_ms"]
            other = attnc(args.binary, case, fast, args.runs)
            ratios.append(f32 / other["median_ms"])
            if other.get("memory_ratio"):
                mems.append(other["memory_ratio"])
        if ratios:
            ratios.sort()
            print(f"### {case} {fast} against f32, {len(ratios)} paired rounds (load {load()})\n")
            print(f"f32 / {fast}: median {statistics.median(ratios):.2f}x, range {ratios[0]:.2f}-{ratios[-1]:.2f}x")
            if mems:
                mems.sort()
                print(f"{fast} x memory time: median {statistics.median(mems):.2f}, range {mems[0]:.2f}-{mems[-1]:.2f}")
            print()


if __name__ == "__main__":
    main()
