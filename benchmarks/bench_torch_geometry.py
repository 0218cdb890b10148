"""PyTorch backend geometry vs a plain training step and vs the official method, each measurement in a
fresh subprocess.

Baselines, measured in the same run:
* "plain": one forward + one backward (to the parameters) of the same 2B sequences, batched like ours
  (8 pairs per batch): what one DPO training step costs without the optimizer;
* "official" (re-implemented here): batch of one - for each response a forward, the sum of its
  response log-probs, a backward, all parameter gradients flattened into one vector, then the dot
  products; token maps by one such backward per completion token.
Ours: `measure_pairs` (= `pair_gram(method="auto")` per batch of 8 pairs: capture, rules, layouts; the
per-response verification runs on the first capture of a model and is reported separately as
`first_call_s`), `token_gram` (auto: the staged map; a 64+64-token pair at 124M by default, its first,
verified call reported as `first_call_s`). Token maps are compared with one plain forward + backward of
the same 2 sequences (`tokenmap_plain`) and with the official per-token loop (`tokenmap_official`; at
124M estimated from 4 tokens per response, as its flattened per-token gradients do not fit in memory).

Models: random-weight GPT-2 configs, (a) 0.43M parameters (2 layers, width 128, vocabulary 256) with
16-token prompts and 16-token responses, (b) GPT-2 small (124M: 12 layers, width 768, vocabulary 50257)
with 64-token prompts and 64-token responses; random token ids. Peak memory: VmHWM of the worker
process (includes the model and Python).
Matmul peak: best of a few 2048^3 float32 matmuls in the same run; model FLOPs of a pair counted as
6 x (matmul parameters) x 64 tokens (forward + backward of both responses).

    python benchmarks/bench_torch_geometry.py            # everything (GPT-2 small: a few minutes)
    python benchmarks/bench_torch_geometry.py --quick    # 0.43M model only
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SIZES = {"tiny": dict(n_layer=2, n_embd=128, n_head=4, vocab_size=256),
         "gpt2": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)}
LENGTHS = {"tiny": (16, 16), "gpt2": (64, 64)}   # (prompt, response) tokens


def _vmhwm_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def _model(size):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_positions=160, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **SIZES[size])
    return GPT2LMHeadModel(cfg).eval()


def _examples(n, vocab, seed=0, size="tiny"):
    import torch

    P_LEN, R_LEN = LENGTHS[size]
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (P_LEN + 2 * R_LEN,), generator=g).tolist()
        out.append({"prompt_ids": ids[:P_LEN], "chosen_ids": ids[P_LEN:P_LEN + R_LEN],
                    "rejected_ids": ids[P_LEN + R_LEN:]})
    return out


def _official_pair(model, ex):
    """The official script's per-pair computation: two forward/backward passes, flattened grads."""
    import torch

    flat = []
    for side in ("chosen_ids", "rejected_ids"):
        ids = torch.tensor([ex["prompt_ids"] + ex[side]])
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits[0, :-1]
        lp = torch.log_softmax(logits.float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
        lp[len(ex["prompt_ids"]) - 1:].sum().backward()
        flat.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]))
    gw, gl = flat
    return float(gw @ gw), float(gw @ gl), float(gl @ gl)


def _official_token_map(model, ex, per_side=None):
    """The official way to a token map: one backward per completion token, flattened gradients, then
    the [T_w, |theta|] x [|theta|, T_l] product. With per_side, only that many tokens per response are
    back-propagated and the time is extrapolated to all tokens (returns (matrix or None, seconds))."""
    import torch

    params = [p for p in model.parameters()]
    per, est = [], 0.0
    for side in ("chosen_ids", "rejected_ids"):
        t0 = time.perf_counter()
        ids = torch.tensor([ex["prompt_ids"] + ex[side]])
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
        toks = list(range(len(ex["prompt_ids"]) - 1, lp.shape[0]))
        t1 = time.perf_counter()
        rows = []
        for t in toks[:per_side]:
            g = torch.autograd.grad(lp[t], params, retain_graph=True)
            rows.append(torch.cat([x.reshape(-1) for x in g]))
        t2 = time.perf_counter()
        est += (t1 - t0) + (t2 - t1) * len(toks) / len(rows)
        per.append(torch.stack(rows))
    t3 = time.perf_counter()
    out = per[0] @ per[1].T
    est += (time.perf_counter() - t3) * (len(toks) / len(per[0])) ** 2
    return (out if per_side is None else None), est


def worker(case, size, n):
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    res = {"case": case, "size": size, "n": n}
    if case == "matmul":
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        a @ b
        best = 0.0
        for _ in range(5):
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * 2048**3 / (time.perf_counter() - t))
        res["gflops"] = best / 1e9
        return res
    from entangle_sim.torch import collate, pair_gram, token_gram
    from entangle_sim.torch.measure import measure_pairs

    model = _model(size)
    res["params"] = sum(p.numel() for p in model.parameters())
    res["matmul_params"] = sum(p.numel() for n_, p in model.named_parameters() if p.dim() == 2 and "wpe" not in n_)
    exs = _examples(n, SIZES[size]["vocab_size"], size=size)
    warm = _examples(1, SIZES[size]["vocab_size"], seed=1, size=size)
    if case == "plain":
        from entangle_sim.torch import response_logps

        def step(batch):
            model.zero_grad(set_to_none=True)
            response_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]).sum().backward()

        step(collate(warm, 0))
        t = time.perf_counter()
        for s0 in range(0, n, 8):
            step(collate(exs[s0:s0 + 8], 0))
        res["pairs_per_s"] = n / (time.perf_counter() - t)
    elif case == "official":
        _official_pair(model, warm[0])
        t = time.perf_counter()
        for ex in exs:
            _official_pair(model, ex)
        dt = time.perf_counter() - t
        res["pairs_per_s"] = n / dt
    elif case == "ours":
        bs = int(os.environ.get("BENCH_BATCH", "8"))
        t = time.perf_counter()
        measure_pairs(model, exs[:bs], 0, batch_size=bs)      # first capture of the model: verified
        res["first_call_s"] = time.perf_counter() - t
        t = time.perf_counter()
        measure_pairs(model, exs, 0, batch_size=bs)
        dt = time.perf_counter() - t
        res["pairs_per_s"] = n / dt
        res["method"] = "auto"
    elif case == "tokenmap_ours":
        t = time.perf_counter()
        token_gram(model, collate(warm, 0))                   # first map of the model: verified
        res["first_call_s"] = time.perf_counter() - t
        t = time.perf_counter()
        tg = token_gram(model, collate(exs[:1], 0))
        res["seconds"] = time.perf_counter() - t
        res["shape"] = list(tg.inner.shape)
    elif case == "tokenmap_plain":   # one forward + backward of the same 2 sequences (the pair as a batch)
        from entangle_sim.torch import response_logps

        def step(batch):
            model.zero_grad(set_to_none=True)
            response_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]).sum().backward()

        step(collate(warm, 0))
        t = time.perf_counter()
        step(collate(exs[:1], 0))
        res["seconds"] = time.perf_counter() - t
    elif case == "tokenmap_official":
        # 124M: 64 x 124M flattened gradients per response (32 GB each) do not fit; time 4 tokens per
        # response and extrapolate (the final product's time scaled from the 4 x 4 one)
        per_side = 4 if size == "gpt2" else None
        _official_token_map(model, warm[0], per_side)
        _, res["seconds"] = _official_token_map(model, exs[0], per_side)
        res["estimated_from_tokens_per_response"] = per_side
    res["peak_gib"] = _vmhwm_gib()
    return res


def run(case, size, n, timeout=900):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                       os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, __file__, "--worker", case, size, str(n)], capture_output=True, text=True,
                       timeout=timeout, env=env)
    if p.returncode != 0:
        return {"case": case, "size": size, "n": n, "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=3, metavar=("CASE", "SIZE", "N"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--token-map-124m", action="store_true",
                    help="(kept for compatibility: the 124M token map now runs by default, staged)")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1], int(a.worker[2]))))
        return
    results = {"uptime_before": os.popen("uptime").read().strip()}
    results["matmul"] = run("matmul", "tiny", 0)
    results["tiny_plain"] = run("plain", "tiny", 64)
    results["tiny_official"] = run("official", "tiny", 16)
    results["tiny_ours"] = run("ours", "tiny", 64)
    sizes = ("tiny",) if a.quick else ("tiny", "gpt2")
    for size in sizes:
        if size == "gpt2":
            results["gpt2_plain"] = run("plain", "gpt2", 8)
            results["gpt2_official"] = run("official", "gpt2", 2)
            results["gpt2_ours"] = run("ours", "gpt2", 8)
        for k in ("plain", "official", "ours"):
            results[f"{size}_tokenmap_{k}"] = run(f"tokenmap_{k}", size, 1)
    for size in ("tiny", "gpt2"):
        o, p, f = (results.get(f"{size}_{k}", {}) for k in ("ours", "plain", "official"))
        if "pairs_per_s" in o and "pairs_per_s" in p:
            results[f"{size}_ratio_vs_plain"] = p["pairs_per_s"] / o["pairs_per_s"]   # time ours / time plain
        if "pairs_per_s" in o and "pairs_per_s" in f:
            results[f"{size}_speedup_vs_official"] = o["pairs_per_s"] / f["pairs_per_s"]
        o, p, f = (results.get(f"{size}_tokenmap_{k}", {}) for k in ("ours", "plain", "official"))
        if "seconds" in o and "seconds" in p:   # time of one token map / time of one plain step of the pair
            results[f"{size}_tokenmap_ratio_vs_plain"] = o["seconds"] / p["seconds"]
        if "seconds" in o and "seconds" in f:
            results[f"{size}_tokenmap_speedup_vs_official"] = f["seconds"] / o["seconds"]
            if f.get("estimated_from_tokens_per_response"):
                results[f"{size}_tokenmap_official_note"] = (
                    f"official time estimated from {f['estimated_from_tokens_per_response']} tokens per response "
                    "(its 64 x 124M flattened gradients per response, 32 GB, do not fit in memory)")
    results["uptime_after"] = os.popen("uptime").read().strip()
    text = json.dumps(results, indent=1)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
