"""Benchmark: wall time per training step of each mitigation vs the plain DPO step.

For each setting, every method is compiled once (`mitigations.timed_run`: one jitted `lax.scan` of
`--steps` steps) and run `--repeats` times; the minimum over repeats / steps is the time per step.
The baseline is the same trainer with method 'baseline' (plain DPO, 'sigmoid'), in the same process,
on the same batch. Lean recording (`record=False`: log-probs and masks only), i.e. the cost of
training, not of the diagnostics. What each method adds per step:

    normalized, normalized_sq, normalized_batch   the per-example Jacobian J [2B, P] (per-response
                                                  gradient norms, R19) + a surrogate backward pass
    oracle_mask                                   nothing (a fixed elementwise mask)
    learned_mask / feature_mask                   gradient w.r.t. the mask parameters (+ a forward pass
                                                  for the hidden states of feature_mask)
    dpop / nll                                    nothing beyond the loss

Machine info (platform, CPUs, affinity, jax version, backend, device, dtype) is printed first.

    python benchmarks/bench_mitigations.py                       # lastlayer-long + transformer-long
    python benchmarks/bench_mitigations.py --settings linear --steps 20 --repeats 2 --json   # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import platform

import jax

from entangle_sim import mitigations as M


def machine() -> dict:
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "jax": jax.__version__, "backend": jax.default_backend(), "device": str(jax.devices()[0]),
            "x64": bool(jax.config.jax_enable_x64)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", nargs="+", default=["lastlayer-long", "transformer-long"], choices=M.SETTINGS)
    ap.add_argument("--methods", nargs="+", default=list(M.COMPARISON_METHODS), choices=M.METHODS)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--x64", action="store_true", help="float64 (the tests' precision); default float32")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.x64:
        jax.config.update("jax_enable_x64", True)

    info = machine()
    results = []
    key = jax.random.PRNGKey(0)
    for si, setting in enumerate(a.settings):
        pol, params, batch, feats = M.build_setting(setting, jax.random.fold_in(key, si), pairs=a.pairs,
                                                    with_features=True)
        n_par = sum(x.size for x in jax.tree.leaves(params))
        lr = M.calibrate_lr(pol, params, batch)
        times = {}
        for method in dict.fromkeys(["baseline", *a.methods]):
            if method == "feature_mask" and feats is None:
                continue
            cfg = M.MitigationConfig(method=method, lr=lr, steps=a.steps, record=False)
            _, sec = M.timed_run(pol, params, batch, cfg, jax.random.fold_in(key, 1000 + si), feats, repeats=a.repeats)
            times[method] = sec
        for method, sec in times.items():
            results.append({"setting": setting, "params": int(n_par), "pairs": a.pairs, "method": method,
                            "sec_per_step": sec, "ratio_to_baseline": sec / times["baseline"]})
    if a.json:
        print(json.dumps({"machine": info, "steps": a.steps, "repeats": a.repeats, "results": results}))
        return
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"steps per run {a.steps}, min over {a.repeats} runs, record=False (training cost only)\n")
    print("| setting | params | method | s/step | x baseline |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['setting']} | {r['params']} | {r['method']} | {r['sec_per_step']:.2e} | "
              f"{r['ratio_to_baseline']:.2f} |")


if __name__ == "__main__":
    main()
