"""The diagnosis summary from one measurement, and a real one-step check of the first-order account.

`build_summary` assembles, from measured per-pair columns (`measure.measure_pairs`, optionally with
the Adam columns of `adam.measure_adam`), the report's JSON:

    verdict     one sentence (`whatif.verdict`) for the loss under diagnosis (Adam if measured, else SGD)
    top_pairs   the K most entangled pairs with their reasons (`whatif.top_pairs`)
    what_if     every registry loss and knob grid, ranked (`whatif.what_if`), labelled first order
    by_group    mean G_ww, G_wl, G_ll (and _adam) and mean cos per parameter group
    reference   whether reference log-probs were given (else the losses see raw log-probs)
    optimizer   the Adam state used (`AdamState.describe()`), or {"kind": "sgd"}

`check_step` takes ONE real optimiser step (plain SGD, or AdamW from an `AdamState`) on a copy of the
model for the rows' batch loss and returns predicted vs realised per-pair changes. Any registry loss
works: the step uses the surrogate  -sum_j (c_w,j l_w,j - c_l,j l_l,j)  with the incentives c held
fixed, whose gradient at the current parameters equals the loss's (one step only uses that gradient).
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from . import whatif
from .geometry import response_logps, select_parameters


def by_group_summary(by_group: dict) -> dict:
    """{group: {mean_G_ww, mean_G_wl, mean_G_ll, mean_cos (mean of per-pair cosines), share_G_wl}}
    (plus the _adam means when present); share_G_wl = the group's sum of G_wl over the total's."""
    if not by_group:
        return {}
    total = sum(float(np.sum(d["G_wl"])) for d in by_group.values())
    out = {}
    for g, d in by_group.items():
        ww, wl, ll = (np.asarray(d[k], dtype=float) for k in ("G_ww", "G_wl", "G_ll"))
        cos = wl / np.sqrt(np.maximum(ww * ll, np.finfo(float).tiny))
        row = {"mean_G_ww": float(ww.mean()), "mean_G_wl": float(wl.mean()), "mean_G_ll": float(ll.mean()),
               "mean_cos": float(cos.mean()), "share_G_wl": float(wl.sum() / total) if total else float("nan")}
        for k in ("G_ww_adam", "G_wl_adam", "G_ll_adam"):
            if k in d:
                row[f"mean_{k}"] = float(np.mean(d[k]))
        out[g] = row
    return out


def build_summary(m: dict, examples: list[dict] | None = None, *, base: str = "sigmoid", base_hp: dict | None = None,
                  state=None, by_group: dict | None = None, k: int = 10, tokenizer=None, losses=None,
                  index=None) -> dict:
    """The summary dict (keys verdict, top_pairs, what_if, by_group, reference, optimizer); see the module doc."""
    has_adam = all(f"G_{x}_adam" in m for x in ("ww", "wl", "ll"))
    sc = whatif.Scenario(base, tuple(sorted((base_hp or {}).items())))
    ev_sgd = whatif.evaluate_scenario(m, sc)
    ev = whatif.evaluate_scenario(m, sc, adam=True) if has_adam else ev_sgd
    opt_label = None
    if has_adam and state is not None:
        opt_label = f"AdamW state of {state.source}"
    elif has_adam:
        opt_label = "Adam preconditioner"
    verdict = whatif.verdict(whatif.summarize(ev), sc, optimizer=opt_label)
    ref = m.get("ref_chosen_logps") is not None
    return {
        "verdict": verdict,
        "verdict_sgd": whatif.verdict(whatif.summarize(ev_sgd), sc) if has_adam else verdict,
        "first_order": whatif.FIRST_ORDER,
        "top_pairs": whatif.top_pairs(m, examples, k=k, ev=ev, by_group=by_group, tokenizer=tokenizer, index=index),
        "what_if": whatif.what_if(m, base=base, base_hp=base_hp, losses=losses),
        "by_group": by_group_summary(by_group or {}),
        "reference": {"given": ref, "note": ("reference log-probs from the reference model" if ref else
                                             "no reference model: the losses see the raw log-probs (reference = 0)")},
        "optimizer": ({"kind": "adamw", **state.describe()} if state is not None else
                      {"kind": "adam preconditioner" if has_adam else "sgd"}),
    }


# ----------------------------------------------------------------------------------------------
# one real step
# ----------------------------------------------------------------------------------------------
def _adamw_from_state(model, state, lr):
    """A torch.optim.AdamW over `model`'s parameters holding `state` (one group per parameter)."""
    named = dict(model.named_parameters())
    groups = [{"params": [named[n]], "lr": state.lr[n] if lr is None else lr, "betas": state.betas[n],
               "eps": state.eps[n], "weight_decay": state.weight_decay[n]} for n in state.names]
    opt = torch.optim.AdamW(groups)
    for n in state.names:
        p = named[n]
        opt.state[p] = {"step": torch.tensor(float(state.step[n])), "exp_avg": state.exp_avg[n].clone().to(p.dtype),
                        "exp_avg_sq": state.exp_avg_sq[n].clone().to(p.dtype)}
    return opt


def check_step(model, batch, c_w, c_l, *, lr: float, state=None, subset="trainable") -> dict[str, np.ndarray]:
    """Predicted vs realised change of every chosen/rejected log-prob after ONE real step.

    batch: TRL-collated ([2B, S]); c_w, c_l: incentives / B of the mean batch loss. state=None: plain
    SGD theta += lr sum_j (c_w g_w - c_l g_l), predicted by the response Gram; an `AdamState`: AdamW
    from that state, predicted by `adam.adam_step_prediction` (v updated by the step, as torch does).
    Returns numpy [B]: pred_chosen, pred_rejected, real_chosen, real_rejected, chosen_logps, rejected_logps.
    The model is not changed (the step is taken on a deep copy).
    """
    ids, am, cm = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    B = ids.shape[0] // 2
    w = torch.cat([torch.as_tensor(np.asarray(c_w, dtype=float)), -torch.as_tensor(np.asarray(c_l, dtype=float))])
    work = copy.deepcopy(model).eval()
    params = select_parameters(work, subset)
    with torch.no_grad():
        lp0 = response_logps(work, ids, am, cm)
    if state is None:
        from .geometry import directional

        pred = directional(work, batch, w.to(lp0.dtype), subset=subset).double().numpy() * lr
        opt = torch.optim.SGD(list(params.values()), lr=lr)
    else:
        from .adam import adam_step_prediction

        p = adam_step_prediction(work, batch, state, c_w, c_l, lr=lr, v_update=True, subset=subset)
        pred = np.r_[p["delta_chosen"], p["delta_rejected"]]
        opt = _adamw_from_state(work, state, lr)
    for p_ in work.parameters():
        p_.grad = None
    surrogate = -(response_logps(work, ids, am, cm) * w.to(lp0.dtype)).sum()
    surrogate.backward()
    opt.step()
    with torch.no_grad():
        real = (response_logps(work, ids, am, cm) - lp0).double().numpy()
    lp0 = lp0.double().numpy()
    return {"pred_chosen": pred[:B], "pred_rejected": pred[B:], "real_chosen": real[:B], "real_rejected": real[B:],
            "chosen_logps": lp0[:B], "rejected_logps": lp0[B:]}


def check_summary(res: dict) -> dict:
    """Sign agreement (`regimes.sign_agreement`), max relative error and regime agreement per pair."""
    from .. import regimes

    agree, counted = regimes.sign_agreement(res["pred_chosen"], res["pred_rejected"], res["real_chosen"],
                                            res["real_rejected"], res["chosen_logps"], res["rejected_logps"])
    pred = np.r_[res["pred_chosen"], res["pred_rejected"]]
    real = np.r_[res["real_chosen"], res["real_rejected"]]
    scale = max(float(np.abs(real).max()), np.finfo(float).tiny)
    same_regime = np.mean(regimes.classify(res["pred_chosen"], res["pred_rejected"])
                          == regimes.classify(res["real_chosen"], res["real_rejected"]))
    return {"sign_agreement": agree, "counted": counted, "max_rel_error": float(np.abs(pred - real).max() / scale),
            "regime_agreement": float(same_regime), "first_order": True}


# ----------------------------------------------------------------------------------------------
# report.md
# ----------------------------------------------------------------------------------------------
def _highlight(tokens, other) -> str:
    """Tokens of one completion, those not in the other completion in **bold** (markdown-escaped)."""
    from collections import Counter

    left = Counter(other)
    out = []
    for t in tokens:
        s = str(t).replace("|", "\\|").replace("*", "\\*").replace("`", "'")
        if left[t] > 0:
            left[t] -= 1
            out.append(s)
        else:
            out.append(f"**{s}**")
    return " ".join(out)


def report_markdown(summary: dict, *, figures: dict[str, str] | None = None, top: int = 15) -> str:
    """report.md text: verdict, the what-if table (top rows), the top pairs with token highlights
    (tokens not shared with the other completion in bold) and the figures ({caption: relative path})."""
    from ..results import markdown_table

    lines = ["# Why the chosen log-prob falls: diagnosis", "", f"**{summary['verdict']}**", ""]
    if summary.get("verdict_sgd") and summary["verdict_sgd"] != summary["verdict"]:
        lines += [f"Plain SGD account: {summary['verdict_sgd']}", ""]
    lines += [f"All predictions are {summary.get('first_order', 'first order')}.", "", "## What to change", ""]
    rows = [r for r in summary["what_if"] if "skipped" not in r][:top]
    has_adam = any("adam" in r for r in rows)
    head = ["scenario", "chosen up & margin up (SGD)", "chosen falls (SGD)", "mean Δmargin (SGD)"]
    if has_adam:
        head += ["chosen up & margin up (Adam)", "chosen falls (Adam)"]
    body = []
    for r in rows:
        b = [r["label"], f"{r['sgd']['chosen_up_margin_up']:.0%}", f"{r['sgd']['chosen_falls']:.0%}",
             f"{r['sgd']['mean_delta_margin']:.3g}"]
        if has_adam:
            b += [f"{r['adam']['chosen_up_margin_up']:.0%}", f"{r['adam']['chosen_falls']:.0%}"]
        body.append(b)
    lines += [markdown_table(head, body), "", "## Which pairs, and why", ""]
    for p in summary["top_pairs"]:
        lines += [f"### pair {p['index']} (rho {p['rho']:.3g}, cos {p['cos']:.2f})", "", p["why"] + ".", ""]
        if p.get("G_wl_top_groups"):
            lines += ["G_wl from: " + ", ".join(p["G_wl_top_groups"]), ""]
        if "chosen_tokens" in p:
            lines += ["- chosen: " + _highlight(p["chosen_tokens"], p["rejected_tokens"]),
                      "- rejected: " + _highlight(p["rejected_tokens"], p["chosen_tokens"]), ""]
    opt = summary.get("optimizer", {})
    lines += ["## Setting", "", f"- optimizer: {opt.get('kind')}" + (f" ({opt.get('source')}, step {opt.get('step')})"
                                                                    if opt.get("source") else ""),
              f"- reference: {summary.get('reference', {}).get('note', '')}", ""]
    for cap, path in (figures or {}).items():
        lines += [f"![{cap}]({path})", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# one chunk of rows -> columns (the `compute` of stream.run_chunked / parallel.run_parallel)
# ----------------------------------------------------------------------------------------------
GROUP_SEP = "::"


def measure_rows(model, tokenizer, rows: list[dict], start: int = 0, *, state=None, ref_model=None, subset=None,
                 adam_subset="trainable", by_group: bool = False, batch_size: int = 8, max_length: int | None = 1024,
                 method: str = "auto") -> dict[str, np.ndarray]:
    """Per-pair columns of TRL rows (numpy [n]): index (row number in the data set), the
    `measure.measure_pairs` columns, ref_chosen_logps / ref_rejected_logps (with ref_model), the
    G_ww_adam / G_wl_adam / G_ll_adam columns (with an `AdamState`), and with by_group the per-group
    entries as columns 'by_group::<group>::<entry>' (`split_group_columns` undoes it)."""
    from .adam import measure_adam
    from .data import collate, pad_token_id, tokenize_rows
    from .measure import measure_pairs

    ex = tokenize_rows(tokenizer, rows, max_length=max_length)
    pad = pad_token_id(tokenizer)
    m = {"index": np.arange(start, start + len(rows))}
    m.update(measure_pairs(model, ex, pad, subset=subset, method=method, batch_size=batch_size, max_length=max_length))
    if ref_model is not None:
        rw, rl = [], []
        was = ref_model.training
        ref_model.eval()
        try:
            with torch.no_grad():
                for s in range(0, len(ex), batch_size):
                    b = collate(ex[s:s + batch_size], pad, max_length=max_length)
                    lp = response_logps(ref_model, b["input_ids"], b["attention_mask"], b["completion_mask"])
                    n = lp.shape[0] // 2
                    rw.append(lp[:n].double().numpy())
                    rl.append(lp[n:].double().numpy())
        finally:
            ref_model.train(was)
        m["ref_chosen_logps"], m["ref_rejected_logps"] = np.concatenate(rw), np.concatenate(rl)
    if state is not None or by_group:
        a = measure_adam(model, ex, pad, state, subset=adam_subset if state is not None else subset,
                         batch_size=batch_size, max_length=max_length, by_group=by_group, method=method)
        for g, d in a.pop("by_group", {}).items():
            for k, v in d.items():
                m[f"by_group{GROUP_SEP}{g}{GROUP_SEP}{k}"] = v
        m.update({k: v for k, v in a.items() if k.endswith("_adam")})
    return m


def split_group_columns(cols: dict) -> tuple[dict, dict]:
    """(per-pair columns, {group: {entry: [N]}}) from `measure_rows` output."""
    plain, groups = {}, {}
    for k, v in cols.items():
        if k.startswith("by_group" + GROUP_SEP):
            _, g, e = k.split(GROUP_SEP)
            groups.setdefault(g, {})[e] = v
        else:
            plain[k] = v
    return plain, groups
