"""Dataset-scale diagnosis: CHES screen vs exact Gram, 1 vs 2 processes, Adam-vs-SGD agreement.

Sections, each a ratio against a baseline measured in the same run:

* screen: pairs/s of `screen.ches_scores` (one forward per response, no gradient) against pairs/s of
  the exact per-pair Gram `measure.measure_pairs` (method auto) on the same pairs; and the Spearman
  rank correlation of CHES / ln-CHES with the exact rho on those pairs.
* parallel: N pairs end to end (JSONL -> measure_pairs -> resumable chunks) on the 0.43M GPT-2
  (2 layers, width 128, vocabulary 256, random weights), one process against 2 gloo ranks
  (`parallel.run_parallel`), the same torch threads per process (--proc-threads, default 1: on a
  loaded machine more threads per process than free cores makes OpenMP spin and distorts the ratio),
  wall time including process start; outputs checked equal.
* diagnose: N pairs end to end through the command itself, `entangle-sim diagnose-model` (stream ->
  measure -> every loss, what-if, streamed batch prediction -> pairs.csv, summary.json, report.md,
  figures) on the same 0.43M GPT-2 saved with a 256-word word-level tokenizer, TRL text rows:
  `python -m entangle_sim.cli` (1 process) against `torchrun --standalone --nproc-per-node 2` (2 gloo
  ranks), the same torch threads per process (--proc-threads); wall time including process start and
  imports; pairs.csv, report.md and summary.json checked byte-identical; peak RSS (VmHWM) of rank 0.
* adam_gram: the Adam-preconditioned pair Gram <g_a, P g_b> (`adam.preconditioned_pair_gram`, random
  P) per layer from the ghost factors (method auto: one parameter's per-response gradients at a time)
  against materialising whole per-response gradients (method exact, the baseline), at 0.43M and
  124M (--adam-sizes), --adam-pairs pairs, --adam-chunk pairs per capture; each in its own process
  for its peak RSS: wall time of the call (after a 1-pair warm-up), VmHWM at the end and the peak
  the Gram added over the process's peak before any Gram call (extra_mb: model, P and batch
  built); the two results' max relative difference.
* adam: a tiny float64 GPT-2 trained T AdamW steps on DPO; the next real AdamW step on a probe batch
  against three first-order predictions: SGD (the plain Gram account `diagnose-model` used), Adam with
  v frozen at the checkpoint (the per-pair Gram's linearisation), Adam with the step's v. Sign
  agreement (`regimes.sign_agreement`), correlation and max relative error.

Models: random-weight GPT-2 configs (0.43M as above; 124M = GPT-2 small, vocabulary 50257), 16-token
prompts, 16-token responses (random ids). Machine and load (uptime) are printed with the numbers.

    python benchmarks/bench_diagnosis.py --quick          # 0.43M screen, 200 pairs x 1/2 procs, adam
    python benchmarks/bench_diagnosis.py --size gpt2 --screen-pairs 16 --pairs 10000
    python benchmarks/bench_diagnosis.py --sections diagnose --pairs 10000   # end to end, 1 vs 2 processes
    python benchmarks/bench_diagnosis.py --sections adam_gram --adam-sizes tiny,gpt2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {"tiny": dict(n_layer=2, n_embd=128, n_head=4, vocab_size=256),
         "gpt2": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)}
P_LEN = R_LEN = 16


def _model(size, device="cpu"):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **SIZES[size])
    return GPT2LMHeadModel(cfg).eval().to(device)


def _examples(n, vocab, seed=0, shared=4):
    """Random pairs; the two responses share their first `shared` tokens (some entanglement)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (P_LEN + 2 * R_LEN,), generator=g).tolist()
        c = ids[P_LEN:P_LEN + R_LEN]
        r = c[:shared] + ids[P_LEN + R_LEN + shared:]
        out.append({"prompt_ids": ids[:P_LEN], "chosen_ids": c, "rejected_ids": r})
    return out


def bench_screen(size, n, batch_size):
    import numpy as np

    from entangle_sim.torch import screen
    from entangle_sim.torch.measure import measure_pairs

    model = _model(size)
    ex = _examples(n, SIZES[size]["vocab_size"])
    screen.ches_scores(model, ex[:2], 0)           # warm-up
    measure_pairs(model, ex[:1], 0, batch_size=1)
    t = time.perf_counter()
    s = screen.ches_scores(model, ex, 0, batch_size=batch_size)
    t_screen = time.perf_counter() - t
    t = time.perf_counter()
    m = measure_pairs(model, ex, 0, batch_size=batch_size)
    t_exact = time.perf_counter() - t
    return {"section": "screen", "size": size, "params": sum(p.numel() for p in model.parameters()), "pairs": n,
            "screen_pairs_per_s": n / t_screen, "exact_pairs_per_s": n / t_exact, "ratio": t_exact / t_screen,
            "spearman_ches_rho": screen.rank_correlation(s["ches"], m["rho"]),
            "spearman_ln_ches_rho": screen.rank_correlation(s["ln_ches"], m["rho"]),
            "spearman_ln_ches_rho_w": screen.rank_correlation(s["ln_ches"], m["rho_w"]),
            "rho_gt_1": float(np.mean(m["rho"] > 1))}


WORKER = """
import sys, time, numpy as np
t0 = time.perf_counter()
from entangle_sim.torch import parallel
from entangle_sim.torch.measure import measure_pairs
sys.path.insert(0, {bench_dir!r})
from bench_diagnosis import _model
rank, world = parallel.init(timeout_s=120)
model = _model("tiny")
def compute(rows, start):
    ex = [{{"prompt_ids": r["prompt"], "chosen_ids": r["c"], "rejected_ids": r["r"]}} for r in rows]
    return measure_pairs(model, ex, 0, batch_size=16)
# rows are pre-tokenised ids here: no TRL column check
cols = parallel.run_parallel(sys.argv[1], sys.argv[2], compute, chunk_rows=64, progress=False, validate=False)
if rank == 0:
    np.savez(sys.argv[2] + "/merged.npz", **cols)
    print("WALL", time.perf_counter() - t0)
"""


def bench_parallel(n, threads):
    import numpy as np

    tmp = Path(tempfile.mkdtemp(prefix="bench_diag_"))
    src = tmp / "rows.jsonl"
    with open(src, "w") as f:
        for e in _examples(n, SIZES["tiny"]["vocab_size"], seed=3):
            f.write(json.dumps({"prompt": e["prompt_ids"], "c": e["chosen_ids"], "r": e["rejected_ids"]}) + "\n")
    script = tmp / "worker.py"
    script.write_text(WORKER.format(bench_dir=str(Path(__file__).resolve().parent)))
    res = {"section": "parallel", "size": "tiny", "pairs": n, "threads_per_process": threads}
    for world in (1, 2):
        out = tmp / f"out{world}"
        env0 = {**os.environ, "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29600 + world),
                "OMP_NUM_THREADS": str(threads), "JAX_PLATFORMS": "cpu"}
        t = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, str(script), str(src), str(out)], env={**env0, "RANK": str(r)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
        outs = [p.communicate() for p in procs]
        res[f"wall_s_{world}proc"] = time.perf_counter() - t
        if any(p.returncode for p in procs):
            raise RuntimeError(outs[0][1][-2000:] + outs[-1][1][-2000:])
    a, b = np.load(tmp / "out1" / "merged.npz"), np.load(tmp / "out2" / "merged.npz")
    res["equal_outputs"] = all(np.array_equal(a[k], b[k]) for k in a.files)
    res["speedup_2proc"] = res["wall_s_1proc"] / res["wall_s_2proc"]
    return res


def _diagnose_inputs(tmp: Path, n: int):
    """The 0.43M GPT-2 with a word-level tokenizer of its 256-token vocabulary (saved), and n TRL text
    rows: 16-word prompts, 16-word responses sharing their first 4 words."""
    import random

    from entangle_sim.torch.tiny import tiny_tokenizer

    words = [f"w{i}" for i in range(SIZES["tiny"]["vocab_size"] - 7)]  # + 7 special tokens = 256
    tok = tiny_tokenizer(words)
    assert len(tok) == SIZES["tiny"]["vocab_size"]
    _model("tiny").save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    rng = random.Random(3)
    src = tmp / "rows.jsonl"
    with open(src, "w") as f:
        for _ in range(n):
            w = [rng.choice(words) for _ in range(P_LEN + 2 * R_LEN)]
            c = w[P_LEN:P_LEN + R_LEN]
            r = c[:4] + w[P_LEN + R_LEN + 4:]
            f.write(json.dumps({"prompt": " ".join(w[:P_LEN]) + " ", "chosen": " ".join(c) + " ",
                                "rejected": " ".join(r) + " "}) + "\n")
    return tmp / "model", src


def bench_diagnose(n, threads, batch_size=16, chunk_rows=256):
    import shutil

    tmp = Path(tempfile.mkdtemp(prefix="bench_diagnose_"))
    model, src = _diagnose_inputs(tmp, n)
    torchrun = Path(sys.executable).with_name("torchrun")
    torchrun = str(torchrun) if torchrun.is_file() else shutil.which("torchrun")
    if torchrun is None:
        raise RuntimeError("torchrun not found")
    # VmHWM of rank 0: a wrapper runs the CLI and prints its own peak RSS at exit
    wrap = tmp / "cli_hwm.py"
    wrap.write_text("import atexit, sys\n"
                    "def hwm():\n"
                    "    for ln in open('/proc/self/status'):\n"
                    "        if ln.startswith('VmHWM') and __import__('os').environ.get('RANK', '0') == '0':\n"
                    "            print('VMHWM_KB', ln.split()[1], file=sys.stderr)\n"
                    "atexit.register(hwm)\n"
                    "from entangle_sim.cli import main\n"
                    "rc = main(sys.argv[1:])\n"
                    "hwm(); atexit.unregister(hwm); sys.exit(rc)\n")
    args = ["diagnose-model", "--model", str(model), "--data", str(src), "--batch-size", str(batch_size),
            "--chunk-rows", str(chunk_rows)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=str(threads), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    res = {"section": "diagnose", "size": "tiny", "pairs": n, "threads_per_process": threads,
           "batch_size": batch_size, "chunk_rows": chunk_rows}
    for world, launch in ((1, [sys.executable, str(wrap)]),
                          (2, [torchrun, "--standalone", "--nproc-per-node", "2", str(wrap)])):
        t = time.perf_counter()
        p = subprocess.run(launch + args + ["--out", str(tmp / f"out{world}")], env=env, capture_output=True,
                           text=True)
        res[f"wall_s_{world}proc"] = time.perf_counter() - t
        if p.returncode:
            raise RuntimeError(p.stderr[-3000:])
        hwm = [ln.split()[1] for ln in p.stderr.splitlines() if ln.startswith("VMHWM_KB")]
        res[f"vmhwm_mb_rank0_{world}proc"] = int(hwm[-1]) / 1024 if hwm else None
    res["identical_outputs"] = all((tmp / "out1" / f).read_bytes() == (tmp / "out2" / f).read_bytes()
                                   for f in ("pairs.csv", "report.md", "summary.json"))
    res["speedup_2proc"] = res["wall_s_1proc"] / res["wall_s_2proc"]
    shutil.rmtree(tmp, ignore_errors=True)
    return res


ADAM_WORKER = """
import sys, time, json, numpy as np, torch
sys.path.insert(0, {bench_dir!r})
from bench_diagnosis import _model, _examples, SIZES
from entangle_sim.torch import adam
from entangle_sim.torch.data import collate

def hwm_mb():
    for ln in open("/proc/self/status"):
        if ln.startswith("VmHWM"):
            return int(ln.split()[1]) / 1024

size, method, pairs, chunk, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(int(sys.argv[6]))
model = _model(size)
batch = collate(_examples(pairs, SIZES[size]["vocab_size"], seed=5), 0)
g = torch.Generator().manual_seed(0)
P = {{n: torch.rand(p.shape, generator=g) + 0.5 for n, p in model.named_parameters()}}
base = hwm_mb()  # model, P and batch built, no Gram computed yet
adam.preconditioned_pair_gram(model, collate(_examples(1, SIZES[size]["vocab_size"], seed=9), 0), P,
                              chunk_size=1, method=method)  # warm-up (and the ghost layout's verification)
t = time.perf_counter()
r = adam.preconditioned_pair_gram(model, batch, P, chunk_size=chunk, method=method)
wall = time.perf_counter() - t
np.savez(out, **r)
print(json.dumps({{"wall_s": wall, "vmhwm_mb": hwm_mb(), "vmhwm_mb_before_gram": base,
                  "params": sum(p.numel() for p in model.parameters())}}))
"""


def bench_adam_gram(sizes, pairs, chunk, threads):
    import numpy as np

    tmp = Path(tempfile.mkdtemp(prefix="bench_adam_gram_"))
    script = tmp / "worker.py"
    script.write_text(ADAM_WORKER.format(bench_dir=str(Path(__file__).resolve().parent)))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "JAX_PLATFORMS": "cpu"}
    rows = []
    for size in sizes:
        res = {"section": "adam_gram", "size": size, "pairs": pairs, "pairs_per_capture": chunk,
               "slice_elems": None}
        from entangle_sim.torch.adam import GRAD_SLICE_ELEMS

        res["slice_elems"] = GRAD_SLICE_ELEMS
        for method, label in (("exact", "materialising"), ("auto", "per_layer")):
            p = subprocess.run([sys.executable, str(script), size, method, str(pairs), str(chunk),
                                str(tmp / f"{size}_{label}.npz"), str(threads)], env=env, capture_output=True, text=True)
            if p.returncode:
                res[label] = {"error": p.stderr.strip().splitlines()[-1][:300] if p.stderr.strip() else p.returncode}
                continue
            r = json.loads(p.stdout.strip().splitlines()[-1])
            res["params"] = r.pop("params")
            r["extra_mb"] = r["vmhwm_mb"] - r["vmhwm_mb_before_gram"]  # peak the Gram added
            res[label] = r
        if "wall_s" in res.get("materialising", {}) and "wall_s" in res.get("per_layer", {}):
            a, b = np.load(tmp / f"{size}_materialising.npz"), np.load(tmp / f"{size}_per_layer.npz")
            res["max_rel_diff"] = max(float(np.abs(a[k] - b[k]).max() / np.abs(a[k]).max()) for k in a.files)
            res["time_ratio_materialising_over_per_layer"] = res["materialising"]["wall_s"] / res["per_layer"]["wall_s"]
            res["peak_ratio_materialising_over_per_layer"] = res["materialising"]["vmhwm_mb"] / res["per_layer"]["vmhwm_mb"]
            res["extra_ratio_materialising_over_per_layer"] = (res["materialising"]["extra_mb"]
                                                               / max(res["per_layer"]["extra_mb"], 1.0))
        rows.append(res)
    return rows


def bench_adam(steps=(3, 30, 200), lr=1e-4):
    import numpy as np
    import torch

    from entangle_sim import regimes
    from entangle_sim.torch import adam, optim_state, theory
    from entangle_sim.torch.data import collate, tokenize_rows
    from entangle_sim.torch.geometry import response_logps
    from entangle_sim.torch.measure import batch_prediction
    from entangle_sim.torch.tiny import tiny_model, tiny_tokenizer, toy_rows

    tok = tiny_tokenizer()
    model = tiny_model("gpt2", tok, width=16).double()
    B = 8
    ex = tokenize_rows(tok, toy_rows(B, seed=1))
    batch = collate(ex, tok.pad_token_id)
    groups = optim_state.trainer_groups(model)
    named = dict(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [named[n] for n in groups[0]], "weight_decay": 0.01},
                             {"params": [named[n] for n in groups[1]], "weight_decay": 0.0}], lr=1e-3)

    def lps(b):
        return response_logps(model, b["input_ids"], b["attention_mask"], b["completion_mask"])

    def dpo(b):
        lp = lps(b)
        n = lp.shape[0] // 2
        return -torch.nn.functional.logsigmoid(0.1 * (lp[:n] - lp[n:])).mean()

    rows, T = [], 0
    for target in steps:
        while T < target:
            opt.zero_grad()
            dpo(collate(tokenize_rows(tok, toy_rows(8, seed=100 + T)), tok.pad_token_id)).backward()
            opt.step()
            T += 1
        with torch.no_grad():
            lp0 = lps(batch).numpy()
        ev = theory.evaluate("sigmoid", chosen_logps=lp0[:B], rejected_logps=lp0[B:], chosen_len=1, rejected_len=1,
                             G_ww=0, G_wl=0, G_ll=0)
        cw, cl = ev["d_w"] / B, ev["d_l"] / B
        st = optim_state.from_optimizer(opt, model)
        pf = adam.adam_step_prediction(model, batch, st, cw, cl, lr=lr, subset=None)
        pu = adam.adam_step_prediction(model, batch, st, cw, cl, lr=lr, v_update=True, subset=None)
        sc, sr = batch_prediction(model, ex, tok.pad_token_id, cw, cl)
        saved = {n: p.detach().clone() for n, p in model.named_parameters()}
        state = {p: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for p, s in opt.state.items()}
        lrs = [g["lr"] for g in opt.param_groups]
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad()
        dpo(batch).backward()
        opt.step()
        with torch.no_grad():
            real = lps(batch).numpy() - lp0
            for n, p in model.named_parameters():
                p.copy_(saved[n])
        for p, s in opt.state.items():
            s.update(state[p])
        for g, l0 in zip(opt.param_groups, lrs):
            g["lr"] = l0
        row = {"section": "adam", "adam_steps_before": T, "lr": lr}
        for name, pred in (("sgd", np.r_[sc, sr]), ("adam_frozen_v", np.r_[pf["delta_chosen"], pf["delta_rejected"]]),
                           ("adam_step_v", np.r_[pu["delta_chosen"], pu["delta_rejected"]])):
            agree, counted = regimes.sign_agreement(pred[:B], pred[B:], real[:B], real[B:], lp0[:B], lp0[B:])
            row[name] = {"sign_agreement": agree, "counted": counted, "corr": float(np.corrcoef(pred, real)[0, 1]),
                         "max_rel_error": float(np.abs(pred * (lr if name == "sgd" else 1) - real).max()
                                                / np.abs(real).max()) if name != "sgd" else None}
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="0.43M screen (64 pairs), 200 pairs x 1/2 procs, adam")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model of the screen section")
    ap.add_argument("--screen-pairs", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=10000, help="pairs of the 1 vs 2 processes section")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--proc-threads", type=int, default=1,
                    help="torch threads of each process in the 1 vs 2 processes section (same for both)")
    ap.add_argument("--sections", default="screen,parallel,adam",
                    help="comma-separated: screen, parallel, diagnose (end to end, 1 vs 2 processes), "
                         "adam_gram (per layer vs materialising), adam")
    ap.add_argument("--adam-sizes", default="tiny,gpt2", help="models of the adam_gram section")
    ap.add_argument("--adam-pairs", type=int, default=4, help="pairs of the adam_gram section")
    ap.add_argument("--adam-chunk", type=int, default=2, help="pairs per capture in the adam_gram section")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if args.quick:
        args.pairs = min(args.pairs, 200)
    import torch

    torch.set_num_threads(args.threads)
    info = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "load": os.getloadavg(), "threads": args.threads, "torch": torch.__version__}
    print(json.dumps(info))
    out = [info]
    secs = args.sections.split(",")
    if "screen" in secs:
        r = bench_screen(args.size, args.screen_pairs, 8)
        print(json.dumps(r))
        out.append(r)
    if "parallel" in secs:
        r = bench_parallel(args.pairs, args.proc_threads)
        print(json.dumps(r))
        out.append(r)
    if "diagnose" in secs:
        r = bench_diagnose(args.pairs, args.proc_threads)
        print(json.dumps(r))
        out.append(r)
    if "adam_gram" in secs:
        for r in bench_adam_gram(args.adam_sizes.split(","), args.adam_pairs, args.adam_chunk, args.threads):
            print(json.dumps(r))
            out.append(r)
    if "adam" in secs:
        for r in bench_adam():
            print(json.dumps(r))
            out.append(r)
    out.append({"load_after": os.getloadavg()})
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
