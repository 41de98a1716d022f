#!/usr/bin/env python3
"""Two or more builds of attnc on one benchmark, in alternating rounds.

The machine is shared and its speed swings by up to 2x from one minute to the next,
so two builds timed one after the other compare the machine's states as much as the
builds. Each round here runs `attnc bench ARGS --json` once with every binary, back
to back; the comparison is the median over rounds of the per-round ratio of the first
binary's median time to each other's (above 1: faster than the first).

To keep a build to compare against, copy its binary before rebuilding:
    cargo build --release && cp target/release/attnc /tmp/attnc_before
    (change, rebuild)
    scripts/ab_builds.py --rounds 8 /tmp/attnc_before target/release/attnc -- \\
        examples/causal.attn --q-len 1 --kv-len 16384 --batch 4 --heads 32 --kv-heads 8 \\
        --dim 128 --page-size 16 --kv-dtype int8 --runs 5
"""
import argparse
import json
import statistics
import subprocess
import sys


def median_ms(binary, args):
    cmd = [binary, "bench", *args, "--json"]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        sys.exit(f"ab_builds.py: cannot run {binary}: {e}")
    if run.returncode != 0:
        sys.exit(f"ab_builds.py: `{' '.join(cmd)}` failed (exit {run.returncode}):\n{run.stderr}")
    return json.loads(run.stdout)["median_ms"]


def main():
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s [--rounds N] BINARY BINARY [BINARY ...] -- BENCH_ARGS ...",
    )
    ap.add_argument("--rounds", type=int, default=6, help="alternating rounds (default 6)")
    ap.add_argument("binaries", nargs="*", help="attnc binaries; the first is the baseline")
    a = ap.parse_args(argv[:cut])
    bench = argv[cut + 1 :]
    if len(a.binaries) < 2 or not bench:
        ap.error("give two or more binaries, then -- and the `attnc bench` arguments")
    if a.rounds < 1:
        ap.error("--rounds must be at least 1")
    # By position, not by path: one binary given twice is an A/A check of the noise.
    times = [[] for _ in a.binaries]
    for r in range(a.rounds):
        for i, b in enumerate(a.binaries):
            times[i].append(median_ms(b, bench))
        print(f"round {r + 1}: " + ", ".join(f"{t[-1]:.2f}" for t in times), file=sys.stderr)
    print(f"`attnc bench {' '.join(bench)}`, {a.rounds} alternating rounds\n")
    print("| binary | median ms | range ms | paired speed-up over the first (median, range) |")
    print("|---|---|---|---|")
    for b, t in zip(a.binaries, times):
        ratios = [x / y for x, y in zip(times[0], t)]
        print(
            f"| {b} | {statistics.median(t):.2f} | {min(t):.2f}-{max(t):.2f} "
            f"| {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |"
        )


if __name__ == "__main__":
    main()
