"""Benchmark: time to derive the first-order conditions of the whole loss registry, cold and warm.

Cold: caches cleared (SymPy differentiation, sign analysis and lambdification from scratch).
Warm: the cached `derive` (the same call a notebook or the CLI repeats). Baseline for the ratio:
the cold pass itself. Prints the machine, per-loss cold times and the totals.

    python benchmarks/bench_derive.py [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

from entangle_sim import losses
from entangle_sim.symbolic import clear_cache, derive


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    clear_cache()
    per_loss = {}
    t0 = time.perf_counter()
    for n in losses.names():
        t = time.perf_counter()
        derive(losses.get(n))
        per_loss[n] = time.perf_counter() - t
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    for n in losses.names():
        derive(losses.get(n))
    warm = time.perf_counter() - t0
    res = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
           "n_losses": len(per_loss), "cold_seconds": cold, "warm_seconds": warm,
           "cold_over_warm": cold / warm if warm > 0 else float("inf"),
           "slowest": sorted(per_loss.items(), key=lambda kv: -kv[1])[:5]}
    print(json.dumps(res, indent=2) if a.json else "\n".join(f"{k}: {v}" for k, v in res.items()))


if __name__ == "__main__":
    main()
