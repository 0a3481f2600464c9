"""Greedy against optimal matching time, as ratios within one run.

Usage: python benchmarks/bench_matching.py [--sizes=1024,4096]

For each size n, an n × n matrix of squared normal costs (the shape of a merge-cost
matrix) and k = n pairs (a full share) and k = n / 2: the median seconds of
``matching.greedy`` and ``matching.optimal`` over a few runs, and greedy / optimal.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mtz_tf import matching  # noqa: E402


def _median_seconds(method: str, cost: np.ndarray, k: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matching.match(cost, k, method)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,1024,4096")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print("| n | k | greedy s | optimal s | greedy / optimal |")
    print("|---:|---:|---:|---:|---:|")
    for n in (int(s) for s in args.sizes.split(",")):
        cost = np.random.default_rng(n).standard_normal((n, n)) ** 2
        for k in (n, n // 2):
            greedy = _median_seconds("greedy", cost, k, args.repeats)
            optimal = _median_seconds("optimal", cost, k, args.repeats)
            print(f"| {n} | {k} | {greedy:.3f} | {optimal:.3f} | {greedy / optimal:.2f} |")


if __name__ == "__main__":
    main()
