"""Gradient geometry at the hardware limit: every path against its baseline in the same run, with
absolute time, FLOP/s as a fraction of the matmul peak measured in the same run, the cost model's
prediction, and peak memory of a fresh process (VmHWM) per measurement.

Each measurement runs in its own subprocess (`--child ...`), so peak resident memory is that of the
measurement alone; the parent measures the matmul peak before and after (load drifts) and prints
one table (or JSON with --json, also written to --out).

    python benchmarks/bench_geometry_scale.py --size small      # 0.42M params, T = 32, 64 pairs
    python benchmarks/bench_geometry_scale.py --size gpt2       # 12 x 768, V 50257, P 16, T 16
    python benchmarks/bench_geometry_scale.py --size tiny       # seconds; what the tests run
    python benchmarks/bench_geometry_scale.py --roofline        # widths 64..768 -> out/roofline.png

Rows:
  seq/<method>     sequence Gram of `pairs` pairs: loop (one jitted backward per response, flattened,
                   explicit dots: the official code's method), vmap (`pair_gram`), layerwise
  token/<method>   token heat map of one pair: loop (one jitted backward per token), jacrev, factored
  seq/layerwise@N  the layer-wise path at a second pair count N (memory must stay flat)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from functools import partial

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

SIZES = {
    # layers, width, heads, vocab, prompt, response, pairs, chunk, tied
    "tiny": dict(layers=1, width=32, heads=2, vocab=64, P=4, T=4, pairs=4, chunk=2, tied=False, pairs2=8),
    "small": dict(layers=2, width=128, heads=4, vocab=64, P=8, T=32, pairs=64, chunk=None, tied=False, pairs2=256),
    "gpt2": dict(layers=12, width=768, heads=12, vocab=50257, P=16, T=16, pairs=8, chunk=4, tied=True, pairs2=24,
                 max_len=1024, loop_tokens=4),
}
# per size: which rows run (the loops and jacrev are too slow / too big at GPT-2 size to run fully)
ROWS = {
    "tiny": ["seq/loop", "seq/vmap", "seq/layerwise", "seq/layerwise@2", "token/loop", "token/jacrev", "token/factored"],
    "small": ["seq/loop", "seq/vmap", "seq/layerwise", "seq/layerwise@2", "token/loop", "token/jacrev", "token/factored"],
    "gpt2": ["seq/loop", "seq/layerwise", "seq/layerwise@2", "token/loop", "token/factored"],
}
LOOP_PAIRS = {"tiny": None, "small": None, "gpt2": 2}   # baseline pairs at GPT-2 size (time scaled per pair)


def vmhwm_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------------------------
# child: one measurement
# ----------------------------------------------------------------------------------------------
def child(a) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from entangle_sim import geometry as geo
    from entangle_sim import geometry_cost as gc
    from entangle_sim.policies import transformer as tr
    from entangle_sim.types import PairBatch

    z = SIZES[a.size] | json.loads(a.override or "{}")
    cfg = tr.TransformerConfig(vocab=z["vocab"], d_model=z["width"], n_layers=z["layers"], n_heads=z["heads"],
                               max_len=z.get("max_len", z["P"] + z["T"]), tie_embeddings=z["tied"])
    policy = tr.make(cfg)
    params = jax.jit(policy.init)(jax.random.key(0))
    kind, method = a.child.split("/")
    n_pairs = a.pairs or z["pairs"]
    k = jax.random.split(jax.random.key(1), 4)
    P, T = z["P"], z["T"]
    lens = jax.random.randint(k[3], (n_pairs,), max(T // 2, 1), T + 1)
    mask = (jnp.arange(T)[None, :] < lens[:, None]).astype(jnp.float32)
    batch = PairBatch(jax.random.randint(k[0], (n_pairs, P), 0, cfg.vocab),
                      jax.random.randint(k[1], (n_pairs, T), 0, cfg.vocab),
                      jax.random.randint(k[2], (n_pairs, T), 0, cfg.vocab), mask, jnp.ones((n_pairs, T), jnp.float32))
    ex1 = jax.tree.map(lambda x: x[0], batch)
    ex = batch.take(jnp.array([0]))
    cost = gc.transformer_costs(cfg, P, T, dtype_bytes=4)
    chunk = z["chunk"]
    xla = None

    if kind == "seq":
        if method == "loop":
            @partial(jax.jit, static_argnums=2)
            def grad_flat(p, e, side):
                return ravel_pytree(jax.grad(lambda q: policy.logps(q, e)[side][0])(p))[0]

            dot = jax.jit(lambda u, v: jnp.stack([u @ u, u @ v, v @ v]))
            exs = [batch.take(jnp.array([i])) for i in range(n_pairs)]

            def fn():
                return jnp.stack([dot(grad_flat(params, e, 0), grad_flat(params, e, 1)) for e in exs])
            model = cost["seq_vmap"].flops * n_pairs
        elif method == "vmap":
            def fn():
                return geo.pair_gram(policy.logps, params, batch, method="vmap", chunk_size=chunk)
            model = cost["seq_vmap"].flops * n_pairs
            if chunk is None:
                xla = _xla_cost(geo.gram_program("pair_vmap", policy.logps, params, batch))
        else:
            ff = tr.grad_factors(cfg)

            def fn():
                return geo.pair_gram_layerwise(ff, params, batch, chunk_size=chunk)
            model = cost["seq_layerwise"].flops * n_pairs
            if chunk is None:
                xla = _xla_cost(geo.gram_program("pair_layerwise", ff, params, batch))
    else:
        if method == "loop":
            @partial(jax.jit, static_argnums=1)
            def tok_grad(p, side, t):
                return ravel_pytree(jax.grad(lambda q: policy.token_logps(q, ex)[side][0, t])(p))[0]

            if z.get("loop_tokens"):
                # too big to hold T x |theta| gradients: time loop_tokens backward passes only and
                # extrapolate to the 2T of the full loop (reported as such)
                def fn():
                    return [tok_grad(params, 0, t) for t in range(z["loop_tokens"])]
            else:
                def fn():
                    gw = jnp.stack([tok_grad(params, 0, t) for t in range(T)])
                    gl = jnp.stack([tok_grad(params, 1, t) for t in range(T)])
                    return gw @ gl.T
            # T_w + T_l single-response backward passes + the T_w x T_l products
            model = 2 * T * cost["seq_vmap"].flops / 2 + 2 * T * T * cfg.n_params
        elif method == "jacrev":
            def fn():
                return geo.token_gram(policy.token_logps, params, ex1, method="jacrev")
            model = cost["token_jacrev"].flops
            xla = _xla_cost(geo.gram_program("token_jacrev", policy.token_logps, params, ex1))
        else:
            ff = tr.token_grad_factors(cfg)

            def fn():
                return geo.token_gram(policy.token_logps, params, ex1, method="factored", factor_fn=ff)
            model = cost["token_factored"].flops
            xla = _xla_cost(geo.gram_program("token_factored", ff, params, ex1))

    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    ts = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    sec = statistics.median(ts)
    extrapolated = None
    if kind == "token" and method == "loop" and z.get("loop_tokens"):
        extrapolated = f"{z['loop_tokens']} of {2 * T} backward passes timed, time scaled by {2 * T / z['loop_tokens']:g}"
        sec *= 2 * T / z["loop_tokens"]
    flops = xla[0] if xla else model
    path = {"seq": "seq_layerwise" if method == "layerwise" else "seq_vmap", "token": "token_" + method}[kind]
    return {"row": a.child, "pairs": n_pairs if kind == "seq" else 1, "seconds": sec, "compile_s": max(first - sec, 0.0),
            "flops": flops, "flops_source": "xla" if xla else "cost model", "model_flops": model,
            "xla_bytes_accessed": xla[1] if xla else None,
            "model_bytes_per_pair": cost[path].bytes if path in cost else None,
            "gflops_per_s": flops / sec / 1e9, "vmhwm_bytes": vmhwm_bytes(), "n_params": cfg.n_params,
            "chunk": chunk, "extrapolated": extrapolated}


def _xla_cost(lowered):
    """(flops, bytes accessed) of a lowered program (`geometry.gram_program`), or None (backend dependent)."""
    try:
        ca = lowered.compile().cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return float(ca["flops"]), float(ca.get("bytes accessed", float("nan")))
    except Exception:   # best effort
        return None


def matmul_peak(n: int, repeats: int = 5) -> float:
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    jax.block_until_ready(f(x))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(ts)


def memory_bandwidth(n: int = 2 ** 25, repeats: int = 5) -> float:
    """Bytes/s of a streaming read: sum over n float32 (128 MiB, past any cache; no output buffer,
    so no page faults of fresh allocations are timed)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((n,), jnp.float32)
    f = jax.jit(jnp.sum)
    jax.block_until_ready(f(x))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        ts.append(time.perf_counter() - t0)
    return 4 * n / min(ts)


def run_child(args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *args]
    env = os.environ | {"PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        return {"row": args[1], "error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"rc {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def machine() -> dict:
    import jax

    dev = jax.devices()[0]
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "jax": jax.__version__, "backend": jax.default_backend(), "device": dev.device_kind,
            "loadavg_start": load}


def bench(a) -> dict:
    z = SIZES[a.size]
    out = {"machine": machine(), "size": a.size, "config": z, "rows": []}
    peak0 = matmul_peak(a.peak_n)
    for row in ROWS[a.size]:
        if a.skip and any(row.startswith(s) for s in a.skip.split(",")):
            continue
        name, pairs = row, z["pairs"]
        if row.endswith("@2"):
            name, pairs = row[:-2], z["pairs2"]
        if row == "seq/loop" and LOOP_PAIRS[a.size]:
            pairs = LOOP_PAIRS[a.size]
        args = ["--size", a.size, "--child", name, "--pairs", str(pairs), "--repeats", str(a.repeats)]
        r = run_child(args, a.timeout)
        r["row"] = row
        out["rows"].append(r)
        print(f"  done {row}: {r.get('seconds', r.get('error'))}", file=sys.stderr, flush=True)
    peak1 = matmul_peak(a.peak_n)
    out["matmul_peak_gflops"] = {"start": peak0 / 1e9, "end": peak1 / 1e9}
    peak = max(peak0, peak1)
    with open("/proc/loadavg") as f:
        out["machine"]["loadavg_end"] = f.read().split()[:3]
    rows = {r["row"]: r for r in out["rows"] if "seconds" in r}
    for r in rows.values():
        r["fraction_of_peak"] = r["gflops_per_s"] * 1e9 / peak
        r["per_pair_s"] = r["seconds"] / r["pairs"] if r["row"].startswith("seq") else r["seconds"]
        r["roofline_s"] = r["model_flops"] / peak
    for kind, base in (("seq", "seq/loop"), ("token", "token/loop")):
        if base in rows:
            for name, r in rows.items():
                if name.startswith(kind):
                    r["speedup_vs_loop"] = rows[base]["per_pair_s"] / r["per_pair_s"]
    return out


def report(out) -> str:
    m = out["machine"]
    c = out["config"]
    pk = out["matmul_peak_gflops"]
    lines = [f"machine: {m['platform']}, {m['cpu_count']} CPUs (affinity {m['affinity_cpus']}), jax {m['jax']} "
             f"{m['backend']} ({m['device']}); load average {' '.join(m['loadavg_start'])} -> {' '.join(m['loadavg_end'])}",
             f"size {out['size']}: {c['layers']} layers, width {c['width']}, vocab {c['vocab']}, tied={c['tied']}, "
             f"P={c['P']} T={c['T']}, float32; matmul peak {pk['start']:.1f} / {pk['end']:.1f} GFLOP/s (start / end)",
             "| row | pairs | time | per pair | vs loop | GFLOP/s | % of peak | FLOPs from | peak RSS (VmHWM) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        if "error" in r:
            lines.append(f"| {r['row']} | failed: {r['error']} |")
            continue
        sp = f"x{r['speedup_vs_loop']:.1f}" if "speedup_vs_loop" in r else "-"
        lines.append(f"| {r['row']} | {r['pairs']} | {r['seconds'] * 1e3:.1f} ms | {r['per_pair_s'] * 1e3:.1f} ms | {sp} | "
                     f"{r['gflops_per_s']:.1f} | {100 * r['fraction_of_peak']:.0f}% | {r['flops_source']} | "
                     f"{r['vmhwm_bytes'] / 2 ** 30:.2f} GiB |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# roofline sweep
# ----------------------------------------------------------------------------------------------
def roofline(a) -> dict:
    peak0 = matmul_peak(a.peak_n)
    rows = []
    for w in [int(x) for x in a.widths.split(",")]:
        override = json.dumps({"width": w, "heads": max(w // 64, 1), "layers": 2, "vocab": 64, "chunk": None})
        for row in ("seq/layerwise", "seq/vmap", "token/factored"):
            args = ["--size", "small", "--child", row, "--pairs", str(a.roofline_pairs), "--repeats", str(a.repeats),
                    "--override", override]
            r = run_child(args, a.timeout)
            r["width"] = w
            rows.append(r)
            print(f"  done {row} width {w}: {r.get('seconds', r.get('error'))}", file=sys.stderr, flush=True)
    peak1 = matmul_peak(a.peak_n)
    # the larger of the start / end peaks: load from other jobs only ever lowers a measurement
    return {"machine": machine(), "matmul_peak_gflops": max(peak0, peak1) / 1e9,
            "matmul_peak_start_end_gflops": [peak0 / 1e9, peak1 / 1e9],
            "memory_bandwidth_gbs": memory_bandwidth() / 1e9, "rows": rows}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--override", help=argparse.SUPPRESS)
    ap.add_argument("--pairs", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peak-n", type=int, default=2048, help="matrix size of the matmul peak")
    ap.add_argument("--skip", default="", help="comma list of row prefixes to skip, e.g. seq/loop,token/jacrev")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per measurement subprocess")
    ap.add_argument("--roofline", action="store_true", help="width sweep -> roofline figure")
    ap.add_argument("--widths", default="64,128,256,384,512,768")
    ap.add_argument("--roofline-pairs", type=int, default=8)
    ap.add_argument("--out", default=os.path.join(ROOT, "out"), help="folder for JSON / figure (git-ignored)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--require-gpu", action="store_true", help="exit 2 unless jax's default backend is gpu")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    if a.child:
        print(json.dumps(child(a)))
        return 0
    import jax

    if a.require_gpu and jax.default_backend() != "gpu":
        print(f"ERROR: a GPU is required but jax's backend is {jax.default_backend()!r}", file=sys.stderr)
        return 2
    os.makedirs(a.out, exist_ok=True)
    if a.roofline:
        res = roofline(a)
        with open(os.path.join(a.out, "roofline.json"), "w") as f:
            json.dump(res, f, indent=1)
        from entangle_sim.plotting.geometry import plot_roofline

        fig = plot_roofline(res["rows"], res["matmul_peak_gflops"], res["memory_bandwidth_gbs"])
        fig.savefig(os.path.join(a.out, "roofline.png"), dpi=120)
        print(json.dumps(res, indent=1) if a.json else f"wrote {os.path.join(a.out, 'roofline.png')}")
        return 0
    res = bench(a)
    with open(os.path.join(a.out, f"geometry_scale_{a.size}.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1) if a.json else report(res))
    return 0 if all("seconds" in r for r in res["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
