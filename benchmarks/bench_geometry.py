"""Benchmark of entangle_sim.geometry against the official code's method (one backward per response /
per token), measured in the same run.

(a) sequence-level Gram of --pairs pairs: baseline loop (one jitted backward per response, flattened
    gradients, explicit dot products) vs `pair_gram` (vmap) and `pair_gram_layerwise`; absolute times,
    ratios, and achieved FLOP/s (XLA cost analysis) as a fraction of a measured matmul peak.
(b) token-level Gram of one pair (T_w = T_l = --resp-len): baseline loop (one backward per token) vs
    `token_gram` (one jacrev).
(c) peak memory from XLA's compiled `memory_analysis()` (temp + argument + output bytes of the one
    compiled executable) for --mem-pairs pairs, chunked and unchunked.

Times exclude compilation (reported separately as compile_s: first call minus a steady call);
steady-state numbers are the median of --repeats calls, each ended by block_until_ready.

    python benchmarks/bench_geometry.py                      # ~0.4M-parameter model, T = 32
    python benchmarks/bench_geometry.py --layers 1 --width 32 --pairs 4 --resp-len 4 --json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from entangle_sim import geometry as geo  # noqa: E402
from entangle_sim.policies import transformer as tr  # noqa: E402
from entangle_sim.types import PairBatch  # noqa: E402


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--resp-len", type=int, default=32, help="T = T_w = T_l")
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=None, help="pairs per vmapped chunk (default: all)")
    ap.add_argument("--mem-pairs", type=str, default="64,512")
    ap.add_argument("--mem-chunk", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peak-n", type=int, default=2048, help="matrix size for the matmul peak")
    ap.add_argument("--skip", type=str, default="", help="comma list of parts to skip: a,b,c,vmap,baseline")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--require-gpu", action="store_true", help="exit 2 unless jax's default backend is gpu")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return ap.parse_args(argv)


def timed(fn, repeats):
    """(first-call seconds, median steady seconds) with block_until_ready."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    med = statistics.median(ts)
    return first, med


def machine():
    dev = jax.devices()[0]
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "jax": jax.__version__, "backend": jax.default_backend(), "device": dev.device_kind,
            "n_devices": jax.device_count()}


def matmul_peak(n, dtype, repeats):
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    _, t = timed(lambda: f(a), max(repeats, 3))
    return 2 * n ** 3 / t


def flops_of(lowered):
    """FLOPs of a lowered program (`geometry.gram_program(...)`, `jax.jit(f).lower(...)`)."""
    try:
        ca = lowered.compile().cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return float(ca.get("flops", float("nan")))
    except Exception:  # cost analysis is best-effort (backend dependent)
        return float("nan")


def mem_of(lowered):
    """Bytes of one compiled executable: temp (scratch), argument and output buffers."""
    m = lowered.compile().memory_analysis()
    return {"temp_bytes": int(m.temp_size_in_bytes), "argument_bytes": int(m.argument_size_in_bytes),
            "output_bytes": int(m.output_size_in_bytes),
            "total_bytes": int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)}


def make_batch(key, B, P, T, vocab):
    k = jax.random.split(key, 4)
    lens = jax.random.randint(k[3], (B,), T // 2, T + 1)
    mask = (jnp.arange(T)[None, :] < lens[:, None]).astype(jax.dtypes.canonicalize_dtype(float))
    return PairBatch(jax.random.randint(k[0], (B, P), 0, vocab), jax.random.randint(k[1], (B, T), 0, vocab),
                     jax.random.randint(k[2], (B, T), 0, vocab), mask, jnp.ones((B, T), mask.dtype))


def main(argv=None):
    a = parse(argv)
    if a.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    if a.require_gpu and jax.default_backend() != "gpu":
        print(f"ERROR: a GPU is required but jax's backend is {jax.default_backend()!r} "
              f"(devices: {jax.devices()})", file=sys.stderr)
        return 2
    dtype = jnp.dtype(a.dtype)
    skip = set(filter(None, a.skip.split(",")))
    cfg = tr.TransformerConfig(vocab=a.vocab, d_model=a.width, n_layers=a.layers, n_heads=a.heads,
                               max_len=a.prompt_len + a.resp_len)
    policy = tr.make(cfg)
    params = jax.tree.map(lambda x: x.astype(dtype), policy.init(jax.random.key(0)))
    factor_fn = tr.grad_factors(cfg)
    batch = make_batch(jax.random.key(1), a.pairs, a.prompt_len, a.resp_len, a.vocab)
    out = {"machine": machine(), "config": {**vars(a), "n_params": cfg.n_params}}
    peak = matmul_peak(a.peak_n, dtype, a.repeats)
    out["matmul_peak_gflops"] = peak / 1e9

    # ---- (a) sequence-level Gram --------------------------------------------------------------
    if "a" not in skip:
        res = {}

        # Baseline = the official code's method: per pair, one backward per response, flatten, dot.
        # `side` is static so each compiled function runs one response's forward + backward only
        # (XLA drops the other response's dead forward).
        @partial(jax.jit, static_argnums=2)
        def grad_flat(p, ex, side):
            return ravel_pytree(jax.grad(lambda q: policy.logps(q, ex)[side][0])(p))[0]

        dot = jax.jit(lambda u, v: jnp.stack([u @ u, u @ v, v @ v]))
        examples = [batch.take(jnp.array([i])) for i in range(a.pairs)]

        def baseline():
            rows = []
            for ex in examples:
                gw, gl = grad_flat(params, ex, 0), grad_flat(params, ex, 1)
                rows.append(dot(gw, gl))
            return jnp.stack(rows)

        methods = {"layerwise": lambda: geo.pair_gram_layerwise(factor_fn, params, batch, chunk_size=a.chunk)}
        if "vmap" not in skip:
            methods["vmap"] = lambda: geo.pair_gram(policy.logps, params, batch, chunk_size=a.chunk)
        if "baseline" not in skip:
            methods["baseline_loop"] = baseline
        flops = {
            "layerwise": flops_of(geo.gram_program("pair_layerwise", factor_fn, params, batch, chunk_size=a.chunk)),
            "vmap": flops_of(geo.gram_program("pair_vmap", policy.logps, params, batch, chunk_size=a.chunk)),
            "baseline_loop": 2 * a.pairs * flops_of(grad_flat.lower(params, examples[0], 0)),
        }
        for name, fn in methods.items():
            first, t = timed(fn, a.repeats)
            fl = flops[name]
            res[name] = {"seconds": t, "compile_s": max(first - t, 0.0), "gflop": fl / 1e9,
                         "gflops_per_s": fl / t / 1e9, "fraction_of_matmul_peak": fl / t / peak}
        if "baseline_loop" in res:
            for name in res:
                res[name]["speedup_vs_baseline"] = res["baseline_loop"]["seconds"] / res[name]["seconds"]
        out["a_sequence_gram"] = res

    # ---- (b) token-level Gram ----------------------------------------------------------------
    if "b" not in skip:
        ex = batch.take(jnp.array([0]))
        ex1 = jax.tree.map(lambda x: x[0], ex)
        T = a.resp_len

        # one forward + one backward of one response per token (t dynamic: compiled once per side)
        @partial(jax.jit, static_argnums=1)
        def tok_grad_flat(p, side, t):
            return ravel_pytree(jax.grad(lambda q: policy.token_logps(q, ex)[side][0, t])(p))[0]

        cosm = jax.jit(lambda gw, gl: (gw @ gl.T) / jnp.maximum(
            jnp.linalg.norm(gw, axis=1)[:, None] * jnp.linalg.norm(gl, axis=1)[None, :], 1e-30))

        def baseline_tok():
            gw = jnp.stack([tok_grad_flat(params, 0, t) for t in range(T)])
            gl = jnp.stack([tok_grad_flat(params, 1, t) for t in range(T)])
            return cosm(gw, gl)

        res = {}
        for name, fn in {"token_gram": lambda: geo.token_gram(policy.token_logps, params, ex1),
                         "baseline_loop": baseline_tok}.items():
            if name == "baseline_loop" and "baseline" in skip:
                continue
            first, t = timed(fn, a.repeats)
            res[name] = {"seconds": t, "compile_s": max(first - t, 0.0)}
        if "baseline_loop" in res:
            res["token_gram"]["speedup_vs_baseline"] = res["baseline_loop"]["seconds"] / res["token_gram"]["seconds"]
        out["b_token_gram"] = res

    # ---- (c) memory ----------------------------------------------------------------------------
    if "c" not in skip:
        res = {}
        for n in [int(x) for x in a.mem_pairs.split(",") if x]:
            b = make_batch(jax.random.key(2), n, a.prompt_len, a.resp_len, a.vocab)
            row = {"layerwise_chunked": mem_of(geo.gram_program("pair_layerwise", factor_fn, params, b, chunk_size=a.mem_chunk)),
                   "vmap_chunked": mem_of(geo.gram_program("pair_vmap", policy.logps, params, b, chunk_size=a.mem_chunk))}
            if "vmap" not in skip:
                row["vmap_unchunked"] = mem_of(geo.gram_program("pair_vmap", policy.logps, params, b))
            res[str(n)] = row
        res["method"] = "XLA compiled memory_analysis(): temp + argument + output bytes of the executable"
        res["chunk"] = a.mem_chunk
        out["c_memory"] = res

    if a.json:
        print(json.dumps(out, indent=1))
    else:
        report(out)
    return 0


def report(out):
    m = out["machine"]
    print(f"machine: {m['platform']} | python {m['python']} | cpus {m['cpu_count']} (affinity {m['affinity_cpus']}) "
          f"| jax {m['jax']} backend={m['backend']} device={m['device']} x{m['n_devices']}")
    c = out["config"]
    print(f"model: {c['layers']} layers, width {c['width']}, heads {c['heads']}, vocab {c['vocab']}, "
          f"{c['n_params'] / 1e6:.3f}M params, {c['dtype']}; P={c['prompt_len']} T={c['resp_len']} pairs={c['pairs']}")
    print(f"matmul peak ({c['peak_n']}^3): {out['matmul_peak_gflops']:.1f} GFLOP/s")
    if "a_sequence_gram" in out:
        print("(a) sequence-level Gram")
        for k, r in out["a_sequence_gram"].items():
            sp = f"  x{r['speedup_vs_baseline']:.2f} vs baseline" if "speedup_vs_baseline" in r else ""
            print(f"   {k:14s} {r['seconds'] * 1e3:9.1f} ms  (compile {r['compile_s']:.2f} s)  "
                  f"{r['gflops_per_s']:7.2f} GFLOP/s = {100 * r['fraction_of_matmul_peak']:5.1f}% of peak{sp}")
    if "b_token_gram" in out:
        print("(b) token-level Gram, one pair")
        for k, r in out["b_token_gram"].items():
            sp = f"  x{r['speedup_vs_baseline']:.1f} vs baseline" if "speedup_vs_baseline" in r else ""
            print(f"   {k:14s} {r['seconds'] * 1e3:9.1f} ms  (compile {r['compile_s']:.2f} s){sp}")
    if "c_memory" in out:
        print(f"(c) memory [{out['c_memory']['method']}], chunk={out['c_memory']['chunk']}")
        for n, row in out["c_memory"].items():
            if isinstance(row, dict):
                print(f"   {n:>5s} pairs: " + ", ".join(
                    f"{k} temp {v['temp_bytes'] / 2**20:.1f} MiB / total {v['total_bytes'] / 2**20:.1f} MiB"
                    for k, v in row.items()))


if __name__ == "__main__":
    sys.exit(main())
