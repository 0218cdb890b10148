"""`entangle-sim diagnose-model` as one library call: stream, measure (resumable), evaluate, report.

    res = run_diagnosis(model, tokenizer, "pairs.jsonl", out="out/diag", losses=["sigmoid"],
                        optimizer_state="out/checkpoint-500", screen=1000, check_step=True)
    res["summary"]["verdict"]      # the one-line verdict (also the first printed line)
    res["table"]                   # pairs.csv rows (one dict per measured pair)

Steps: (1) with `screen=K`, a forward-only CHES pass over every row (streamed, `screen.ches_batch`)
keeps the row numbers of the K highest-scoring rows; `pairs=N` keeps the first N rows; (2) the kept
rows are measured chunk by chunk (`diagnosis.measure_rows`: plain Gram, reference log-probs, the
Adam-preconditioned Gram from the checkpoint's optimiser state, the per-parameter-group split) through
`stream.run_chunked` (resumable: a killed run started again with the same configuration recomputes
only the missing chunks and writes identical output) or `parallel.run_parallel` under torchrun;
(3) every loss is evaluated on the merged columns (cheap: the Gram does not depend on the loss), the
batch-level prediction runs over the measured pairs in two streamed passes
(`MeasurementSession.predict_stream`), and `diagnosis.build_summary` gives verdict, top pairs, what-if
table, per-group split, reference and optimiser; (4) with `check_step`, one real optimiser step on
the first `CHECK_PAIRS` measured pairs reports predicted vs realised changes (`diagnosis.check_step`);
(5) with `out`, pairs.csv, summary.json, figures and report.md are written.

Memory: rows are never all held. What stays for the whole run is per-pair numbers (the measured
columns, the row numbers, with a screen two scores per scored row) and the tokenised pairs that later
steps need: the top pairs, the token-map pairs and the --check-step pairs. Those are re-read by
position from the measured rows: `out/selected.jsonl` (written streaming) or, without `out`, the
source filtered by row number. Every other step holds one chunk of `chunk_rows` rows at a time.

Without `out` nothing is written and nothing resumes (rows still stream in chunks).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from . import diagnosis, stream, whatif

CHECK_PAIRS = 64          # pairs in the one real step of --check-step (one collated batch)
REPORT_TOKEN_MAPS = 3     # token heat maps of the top pairs shown in report.md
DEFAULT_CHECK_LR = 1e-4   # --check-step without --lr and without an optimiser state's lr


def _clean(x):
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None (strict JSON for scripts)."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _select(data, tokenizer, model, *, pairs, screen_k, batch_size, max_length, chunk_rows, progress):
    """(row numbers of the rows to measure, sorted [n]; screen info or None). Streams the source once
    (validating every row read); keeps only row numbers and, with a screen, two scores per row."""
    from . import screen as scr
    from .data import collate, pad_token_id, tokenize_rows

    if screen_k is None:
        n = 0
        for start, chunk in stream.iter_chunks(data, chunk_rows):
            n = start + len(chunk)
            if pairs is not None and n >= pairs:
                n = pairs
                break
        return np.arange(n), None
    from tqdm.auto import tqdm

    pad = pad_token_id(tokenizer)
    scores = {"ches": [], "ln_ches": []}
    total = stream.count_rows(data)
    with tqdm(total=total if pairs is None else min(pairs, total or pairs), desc="screen (CHES)", unit="pair",
              disable=not progress) as bar:
        n = 0
        for start, chunk in stream.iter_chunks(data, batch_size):
            if pairs is not None:
                chunk = chunk[:max(0, pairs - start)]
            if not chunk:
                break
            ex = tokenize_rows(tokenizer, chunk, max_length=max_length)
            s = scr.ches_batch(model, collate(ex, pad, max_length=max_length))
            for k in scores:
                scores[k].append(s[k])
            n += len(chunk)
            bar.update(len(chunk))
    scores = {k: np.concatenate(v) for k, v in scores.items()}
    keep = np.sort(scr.select_top(scores["ln_ches"], screen_k))  # data order: chunking independent of scores
    return keep, {"k": int(screen_k), "n_scored": int(n), "score": "ln_ches", "scores": scores}


def _rows_at(data, index, chunk_rows):
    """The rows of `data` at the sorted row numbers `index`, in order (validated), streamed."""
    index = np.asarray(index)
    j = 0
    if len(index) == 0:
        return
    for start, chunk in stream.iter_chunks(data, chunk_rows):
        for i, r in enumerate(chunk, start):
            if j < len(index) and i == index[j]:
                yield r
                j += 1
        if j == len(index):
            return


def _in_chunks(rows, n):
    """Lists of n consecutive items of the iterator `rows` (the last one shorter)."""
    buf = []
    for r in rows:
        buf.append(r)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def _write_selected(path, rows_fn):
    """selected.jsonl from the streamed rows; an identical existing file is left untouched (resume)."""
    import filecmp
    import os

    from ..results import atomic_write

    new = path.with_name(path.name + ".new")

    def write(f):
        for r in rows_fn():
            f.write((json.dumps(r) + "\n").encode())

    atomic_write(new, write)
    if path.is_file() and filecmp.cmp(path, new, shallow=False):
        new.unlink()
    else:
        os.replace(new, path)


def run_diagnosis(model, tokenizer, data, *, out=None, ref_model=None, losses=("sigmoid",), loss_kwargs=None,
                  subset=None, pairs: int | None = None, batch_size: int = 8, token_maps: int = 0,
                  method: str = "auto", max_length: int | None = 1024, optimizer_state=None,
                  screen: int | None = None, check_step: bool = False, lr: float | None = None,
                  chunk_rows: int = 256, top_k: int = 10, progress: bool = True, config: dict | None = None,
                  extra: dict | None = None, dist_timeout_s: float = 60.0, make_figures=None):
    """Run the whole diagnosis (module docstring). Returns {"summary", "table", "columns", "report"}
    on rank 0 (None on other ranks under torchrun). Bad input raises ValueError subclasses with a
    one-line message (OptimizerStateError, StreamError, DistributedError). `extra`: entries added
    to the summary (e.g. the model's path); dist_timeout_s: how long a rank waits for its peers;
    make_figures(m, per_loss, summary, examples, tokenizer, token_maps) -> {file stem: Figure}: the
    figures written next to report.md (token_maps: [(stem, position, TokenGram)]; the plotting layer
    lives above this module, so the caller supplies it)."""
    from .. import regimes
    from . import parallel, theory
    from .data import pad_token_id, tokenize_rows
    from .optim_state import load_optimizer_state
    from .session import MeasurementSession

    for flag, v in (("--screen", screen), ("--pairs", pairs), ("--chunk-rows", chunk_rows)):
        if v is not None and v <= 0:
            raise ValueError(f"{flag} must be a positive integer, got {v}")
    losses = [theory.loss_spec(n).name for n in losses]
    state = load_optimizer_state(optimizer_state, model) if optimizer_state else None
    session = MeasurementSession(model, pad_token_id=pad_token_id(tokenizer), subset=subset, method=method,
                                 batch_size=batch_size, max_length=max_length)  # bad prefix -> error now
    if state is not None:
        state.preconditioners([n for n, p in model.named_parameters() if p.requires_grad])  # mismatch -> error now
    progress = progress and sys.stderr.isatty()  # bars for people, none in logs or on a one-line error
    rank, world = parallel.init(timeout_s=dist_timeout_s) if parallel.env_world()[1] > 1 else (0, 1)
    if world > 1 and out is None:
        raise ValueError("under torchrun, --out is needed (the ranks share the output folder)")

    index, scr = _select(data, tokenizer, model, pairs=pairs, screen_k=screen, batch_size=batch_size,
                         max_length=max_length, chunk_rows=chunk_rows, progress=progress and rank == 0)
    kw = dict(state=state, ref_model=ref_model, subset=subset, by_group=state is not None, batch_size=batch_size,
              max_length=max_length, method=method)

    def compute(chunk, start):
        cols = diagnosis.measure_rows(model, tokenizer, chunk, start, **kw)
        if state is None:  # the per-group split from the factored pair Gram (no per-response gradients)
            cols.update(_group_columns(session, tokenizer, chunk))
        cols["index"] = index[start:start + len(chunk)]
        return cols

    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        src = out / "selected.jsonl"  # the rows measured (all, the first N, or the screened K)
        if rank == 0:
            _write_selected(src, lambda: _rows_at(data, index, chunk_rows))
        parallel.barrier()

        def selected():  # the measured rows again, in order, from the output folder
            return (r for _, c in stream.iter_chunks(src, chunk_rows) for r in c)

        cfg = {"losses": losses, "subset": subset, "method": method, "max_length": max_length,
               "batch_size": batch_size, "optimizer_state": str(optimizer_state) if optimizer_state else None,
               "ref_model": ref_model is not None, "screen": screen, "pairs": pairs, **(config or {})}
        cols = parallel.run_parallel(src, out / "measure", compute, chunk_rows=chunk_rows, config=cfg,
                                     progress=progress, rank=rank, world_size=world)
        if cols is None:
            return None
    else:
        from tqdm.auto import tqdm

        def selected():  # the measured rows again, in order, from the source
            return _rows_at(data, index, chunk_rows)

        parts = []
        with tqdm(total=len(index), desc="diagnose-model", unit="pair", disable=not progress) as bar:
            s = 0
            for chunk in _in_chunks(selected(), chunk_rows):
                parts.append(compute(chunk, s))
                s += len(chunk)
                bar.update(len(chunk))
        cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    m, groups = diagnosis.split_group_columns(cols)
    reference = "ref_model" if ref_model is not None else "model"
    if ref_model is None:  # TRL's default: the reference is the policy itself (every log-ratio 0)
        m["ref_chosen_logps"], m["ref_rejected_logps"] = m["chosen_logps"].copy(), m["rejected_logps"].copy()
    B = len(m["index"])

    def example_chunks():  # tokenised measured pairs, chunk_rows at a time (read twice per loss)
        return (tokenize_rows(tokenizer, c, max_length=max_length) for c in _in_chunks(selected(), chunk_rows))

    per_loss = {}
    for name in losses:
        th = theory.evaluate(name, **{k: m[k] for k in ("chosen_logps", "rejected_logps", "chosen_len",
                                                        "rejected_len", "G_ww", "G_wl", "G_ll", "prompt_len")},
                             ref_chosen_logps=m["ref_chosen_logps"], ref_rejected_logps=m["ref_rejected_logps"],
                             **(loss_kwargs or {}))
        bw, bl = session.predict_stream(example_chunks, th["d_w"] / B, th["d_l"] / B)
        th.update(batch_delta_chosen=bw, batch_delta_rejected=bl,
                  batch_regime=regimes.names(regimes.classify(bw, bl)))
        if state is not None:
            ev = theory.evaluate(name, **{k: m[k] for k in ("chosen_logps", "rejected_logps", "chosen_len",
                                                            "rejected_len", "prompt_len")},
                                 G_ww=m["G_ww_adam"], G_wl=m["G_wl_adam"], G_ll=m["G_ll_adam"],
                                 ref_chosen_logps=m["ref_chosen_logps"], ref_rejected_logps=m["ref_rejected_logps"],
                                 **(loss_kwargs or {}))
            th.update(delta_chosen_adam=ev["delta_chosen"], delta_rejected_adam=ev["delta_rejected"],
                      regime_adam=ev["regime"])
        per_loss[name] = th

    # the only pairs whose tokens are needed again: the top pairs (and their token maps), the token maps
    # by cos, the --check-step batch; re-read by position from the measured rows
    k_top = min(top_k, B)
    need = set(whatif.top_order(m, k_top).tolist()) | set(np.argsort(-m["cos"])[:token_maps].tolist())
    if check_step:
        need |= set(range(min(CHECK_PAIRS, B)))
    examples = {}
    for j, r in enumerate(selected()):
        if j in need:
            examples[j] = tokenize_rows(tokenizer, [r], max_length=max_length)[0]

    base = losses[0]
    summary = {"n_pairs": B, **(extra or {}), "data": str(data), "subset": subset, "losses": losses,
               "cos_mean": float(m["cos"].mean()), "rho_mean": float(m["rho"].mean()),
               "frac_rho_le_1": float((m["rho"] <= 1).mean()), "regime_fractions": {},
               "batch_regime_fractions": {}, "moved_by_batch": {}, "method": method, "dtype": session.dtype,
               "reference_used_by": {n: bool(theory.loss_spec(n).uses_reference) for n in losses}}
    for name, th in per_loss.items():
        summary["regime_fractions"][name] = regimes.fractions(regimes.classify(th["delta_chosen"], th["delta_rejected"]))
        summary["batch_regime_fractions"][name] = regimes.fractions(
            regimes.classify(th["batch_delta_chosen"], th["batch_delta_rejected"]))
        summary["moved_by_batch"][name] = int(sum(a != b for a, b in zip(th["regime"], th["batch_regime"])))
        if state is not None:
            summary.setdefault("regime_fractions_adam", {})[name] = regimes.fractions(
                regimes.classify(th["delta_chosen_adam"], th["delta_rejected_adam"]))
    d = diagnosis.build_summary(m, examples, base=base, base_hp=loss_kwargs, state=state, by_group=groups,
                                k=k_top, tokenizer=tokenizer, index=m["index"])
    summary = {"verdict": d.pop("verdict"), **summary, **d}
    summary["reference"] = {"kind": reference, **d["reference"],
                            "note": ("reference log-probs from the reference model" if ref_model is not None else
                                     "the reference is the model itself (TRL's DPOTrainer with ref_model=None at "
                                     "the start of training): every log-ratio is 0")}
    if scr is not None:
        from .screen import rank_correlation

        summary["screen"] = {"k": scr["k"], "n_scored": scr["n_scored"], "score": scr["score"],
                             "spearman": {x: rank_correlation(scr["scores"][x][m["index"]], m["rho"])
                                          for x in ("ches", "ln_ches")}}
    if check_step:
        summary["check_step"] = _check(model, [examples[j] for j in range(min(CHECK_PAIRS, B))], per_loss[base],
                                       session, state, lr)

    table = _table(m, per_loss, losses, B)
    cols_out = _columns(losses, state is not None)
    token = _token_maps(session, examples, m, summary, token_maps)
    report = None
    if out is not None:
        report = _write(out, summary, table, cols_out, m, per_loss, examples, tokenizer, token, make_figures)
    return {"summary": _clean(summary), "table": table, "columns": cols_out, "report": report,
            "per_loss": per_loss, "measure": m}


def _group_columns(session, tokenizer, rows):
    """'by_group::<group>::G_ww|G_wl|G_ll' columns of `rows` from `geometry.pair_gram(by_group=True)`."""
    from .data import collate, tokenize_rows
    from .geometry import pair_gram

    ex = tokenize_rows(tokenizer, rows, max_length=session.max_length)
    cols: dict[str, list] = {}
    for s in range(0, len(ex), session.batch_size):
        b = collate(ex[s:s + session.batch_size], session.pad, max_length=session.max_length)
        for g, pg in pair_gram(session.model, b, subset=session.subset, method=session.method,
                               chunk_size=session.batch_size, by_group=True).items():
            for k in ("G_ww", "G_wl", "G_ll"):
                cols.setdefault(diagnosis.GROUP_SEP.join(("by_group", g, k)), []).append(
                    getattr(pg, k).detach().double().numpy())
    return {k: np.concatenate(v) for k, v in cols.items()}


def _check(model, examples, th, session, state, lr):
    """One real step (`diagnosis.check_step`) on up to CHECK_PAIRS pairs; lr: --lr, else the optimiser
    state's initial (scheduler base) lr, else its current lr if > 0, else DEFAULT_CHECK_LR."""
    n = len(examples)
    if lr is None and state is not None:
        n0 = state.names[0]
        lr = state.initial_lr.get(n0) or (state.lr[n0] if state.lr[n0] > 0 else None)
    lr = DEFAULT_CHECK_LR if lr is None else float(lr)
    from .data import collate

    batch = collate(examples, session.pad, max_length=session.max_length)
    res = diagnosis.check_step(model, batch, th["d_w"][:n] / n, th["d_l"][:n] / n, lr=lr, state=state,
                               subset="trainable")
    return {"pairs": n, "lr": lr, "optimizer": "adamw" if state is not None else "sgd",
            **diagnosis.check_summary(res),
            "per_pair": {k: np.asarray(v).tolist() for k, v in res.items()}}


def _columns(losses, adam):
    cols = ["pair", "chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
            "chosen_len", "rejected_len", "prompt_len", "G_ww", "G_wl", "G_ll", "cos", "rho_w", "rho_l", "rho"]
    if adam:
        cols += ["G_ww_adam", "G_wl_adam", "G_ll_adam"]
    for name in losses:
        cols += [f"{k}_{name}" for k in ("d_w", "d_l", "delta_chosen", "delta_rejected", "regime",
                                         "batch_delta_chosen", "batch_delta_rejected", "batch_regime")]
        if adam:
            cols += [f"{k}_{name}" for k in ("delta_chosen_adam", "delta_rejected_adam", "regime_adam")]
    return cols


def _table(m, per_loss, losses, B):
    table = []
    adam = "G_ww_adam" in m
    for i in range(B):
        r = {"pair": int(m["index"][i])}
        for k in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "G_ww", "G_wl",
                  "G_ll", "cos", "rho_w", "rho_l", "rho") + (("G_ww_adam", "G_wl_adam", "G_ll_adam") if adam else ()):
            r[k] = float(m[k][i])
        for k in ("chosen_len", "rejected_len", "prompt_len"):
            r[k] = int(m[k][i])
        for name in losses:
            th = per_loss[name]
            for k in ("d_w", "d_l", "delta_chosen", "delta_rejected", "batch_delta_chosen", "batch_delta_rejected"):
                r[f"{k}_{name}"] = float(th[k][i])
            r[f"regime_{name}"] = th["regime"][i]
            r[f"batch_regime_{name}"] = th["batch_regime"][i]
            if adam:
                r[f"delta_chosen_adam_{name}"] = float(th["delta_chosen_adam"][i])
                r[f"delta_rejected_adam_{name}"] = float(th["delta_rejected_adam"][i])
                r[f"regime_adam_{name}"] = th["regime_adam"][i]
        table.append(r)
    return table


def _token_maps(session, examples, m, summary, token_maps):
    """[(file stem, position in the measured pairs, TokenGram)]: the `token_maps` pairs with the largest
    cos (token_map_*), and the top pairs of the summary (top_pair_map_*, at most REPORT_TOKEN_MAPS)."""
    pos = {int(v): j for j, v in enumerate(m["index"])}
    maps = []
    for r, i in enumerate(np.argsort(-m["cos"])[:token_maps]):
        maps.append((f"token_map_{r}_pair{int(m['index'][i])}", int(i)))
    for r, p in enumerate(summary["top_pairs"][:REPORT_TOKEN_MAPS]):
        maps.append((f"top_pair_map_{r}_pair{p['index']}", pos[p["index"]]))
    cache = {}
    return [(stem, j, cache.setdefault(j, session.token_map(examples[j]))) for stem, j in maps]


def _write(out, summary, table, cols, m, per_loss, examples, tok, token, make_figures):
    import csv

    from ..results import atomic_write

    with open(out / "pairs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in table:
            w.writerow({k: (f"{v:.9g}" if isinstance(v, float) else v) for k, v in r.items()})
    figs = make_figures(m, per_loss, summary, examples, tok, token) if make_figures is not None else {}
    for fname, fig in figs.items():  # atomically, like every other output file
        atomic_write(out / f"{fname}.png", lambda fh, fig=fig: fig.savefig(fh, format="png", dpi=110))
        import matplotlib.pyplot as plt

        plt.close(fig)
    summary["figures"] = sorted(f"{k}.png" for k in figs)
    captions = {"where G_wl comes from, per parameter group": "by_group.png",
                "what to change: pairs with chosen up and margin up, per scenario (first order)": "what_if.png"}
    captions = {c: p for c, p in captions.items() if p[:-4] in figs}
    for stem, _, _ in token:
        if stem.startswith("top_pair_map_"):
            captions[f"token inner products of {stem.split('_')[-1].replace('pair', 'pair ')}"] = f"{stem}.png"
    text = diagnosis.report_markdown(summary, figures=captions)
    if "check_step" in summary:
        c = summary["check_step"]
        text += (f"\n## One real step (--check-step)\n\n{c['optimizer']} step at lr {c['lr']:g} on {c['pairs']} "
                 f"pairs: sign agreement {c['sign_agreement']} of {c['counted']}, regime agreement "
                 f"{c['regime_agreement']:.0%}, max relative error {c['max_rel_error']:.2g}.\n")
    if "screen" in summary:
        s = summary["screen"]
        text += (f"\n## Screen\n\nCHES scored {s['n_scored']} pairs; the exact Gram was measured on the top "
                 f"{s['k']} by {s['score']}. Spearman with the exact rho on them: {s['spearman']}.\n")
    atomic_write(out / "report.md", lambda f: f.write(text.encode()))
    atomic_write(out / "summary.json", lambda f: f.write(json.dumps(_clean(summary), indent=2).encode()))
    return text
