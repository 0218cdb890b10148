"""Benchmark: 1,000 runs x 500 steps of DPO on a tabular softmax (K = 50), vmap+scan vs a Python loop.

Baseline (same process, same compiled step): a Python loop over runs, each run one jitted
`lax.scan` call; measured on a subset of runs and reported per run. Lean recording (log-probs
and losses only), as for large sweeps. Also reports scaling over virtual CPU devices when
XLA_FLAGS=--xla_force_host_platform_device_count=N is set (run once per N).

    python benchmarks/bench_simulate.py [--runs 1000] [--steps 500] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp

from entangle_sim import train
from entangle_sim.policies import softmax
from entangle_sim.types import PairBatch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--K", type=int, default=50)
    ap.add_argument("--loop-runs", type=int, default=50, help="runs timed in the Python-loop baseline")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    pol = softmax.make(softmax.SoftmaxConfig(P=1, K=a.K))
    one = jnp.ones((1, 1))
    batch = PairBatch(prompt=jnp.zeros((1, 1), jnp.int32), chosen=jnp.zeros((1, 1), jnp.int32),
                      rejected=jnp.ones((1, 1), jnp.int32), chosen_mask=one, rejected_mask=one)
    cfg = train.TrainConfig(loss="sigmoid", optimizer="sgd", lr=0.1, steps=a.steps, record=False)
    key = jax.random.PRNGKey(0)

    # vmap + scan (sharded over devices when several exist)
    t0 = time.perf_counter()
    out = train.sweep(pol, batch, cfg, key, a.runs)
    out.chosen_logps.block_until_ready()
    compile_and_run = time.perf_counter() - t0
    times = []
    for rep in range(3):
        t0 = time.perf_counter()
        out = train.sweep(pol, batch, cfg, jax.random.fold_in(key, rep + 1), a.runs)
        out.chosen_logps.block_until_ready()
        times.append(time.perf_counter() - t0)
    t_vmap = min(times)

    # Baseline: Python loop over runs, each a compiled single-run scan.
    single = jax.jit(lambda p, k: train.train(pol, p, batch, cfg, k).chosen_logps)
    keys = jax.random.split(key, a.loop_runs)
    single(pol.init(keys[0]), keys[0]).block_until_ready()  # compile outside the timing
    t0 = time.perf_counter()
    for k in keys:
        single(pol.init(k), k).block_until_ready()
    t_loop_per_run = (time.perf_counter() - t0) / a.loop_runs

    res = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "backend": jax.default_backend(),
                    "devices": jax.device_count()},
        "runs": a.runs, "steps": a.steps, "K": a.K,
        "vmap_scan_seconds": t_vmap, "vmap_scan_runs_per_s": a.runs / t_vmap,
        "first_call_seconds_incl_compile": compile_and_run,
        "loop_seconds_per_run": t_loop_per_run, "loop_runs_per_s": 1 / t_loop_per_run,
        "ratio_vmap_over_loop": (a.runs / t_vmap) * t_loop_per_run,
    }
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k:>34}: {v}")


if __name__ == "__main__":
    main()
