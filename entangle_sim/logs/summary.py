"""`summarize`: a series from `load_log` as a JSON-ready dict (regimes per interval, the condition
ratios of gradient logs, predicted vs realised changes of `entangle/*` entries)."""
from __future__ import annotations

import math

import numpy as np

from .. import regimes
from .common import (CONDITION_AGGREGATE, LOGGED_CONDITION, GradSeries, LogProbSeries, PairRecords, rounded,
                     summarize_entangle)
from .readers import pair_changes


# --------------------------------------------------------------------------------------------
# Analysis


def condition_ratios(G_ww, G_wl, G_ll):
    """(rho_w, rho_l, rho) = (G_wl/G_ww, G_wl/G_ll, max of both); Case 1 <=> rho <= 1 (R4, §3.3).

    Same formula as `geometry.gram_stats`, in float64 NumPy: log values are host data, and a
    verdict at rho ~ 1 must not depend on JAX's x64 flag.
    """
    G_ww, G_wl, G_ll = (np.asarray(a, dtype=float) for a in (G_ww, G_wl, G_ll))
    with np.errstate(divide="ignore", invalid="ignore"):
        rho_w, rho_l = G_wl / G_ww, G_wl / G_ll
    return rho_w, rho_l, np.maximum(rho_w, rho_l)


def regime_block(codes) -> dict:
    counts = {n: int((np.asarray(codes) == i).sum()) for i, n in enumerate(regimes.REGIMES)}
    return {"regime_counts": counts, "regime_fractions": regimes.fractions(codes)}


def finding_logprob(n, rose, fell) -> str:
    return (f"rejected log-prob rose in {rose} of {n} interval{'s' if n != 1 else ''}; "
            f"chosen fell in {fell}")


def summarize_logprob(s: LogProbSeries, tol: float) -> dict:
    codes = regimes.classify(s.delta_chosen, s.delta_rejected, tol)
    names = regimes.names(codes)
    rose = [[rounded(a), rounded(b), rounded(d)] for a, b, d in zip(s.step_start, s.step_end, s.delta_rejected)
            if d > tol]
    fell = [[rounded(a), rounded(b), rounded(d)] for a, b, d in zip(s.step_start, s.step_end, s.delta_chosen)
            if d < -tol]
    n = len(codes)
    net_c, net_r = float(s.delta_chosen.sum()), float(s.delta_rejected.sum())
    # the one run-summary schema: changes = the logged intervals, from 0 to their net sum (no prediction, no loss)
    z = np.zeros((n, 1))
    core = regimes.run_summary(z, z, np.asarray(s.delta_chosen)[:, None], np.asarray(s.delta_rejected)[:, None],
                               final=(np.array([net_c]), np.array([net_r])), tol=tol)
    out = {
        **core,
        "format": s.format, "split": s.split, "source": s.source,
        "regime_basis": ("observed changes of the mean chosen/rejected log-prob between "
                         "consecutive log entries" if s.pairs is None else
                         "mean change of the pairs logged at both ends of each interval"),
        "tol": tol, "n_entries": int(len(s.step)), "n_intervals": n,
        **regime_block(codes),   # regime_counts, and regime_fractions as run_summary's (same codes and tol)
        # sum of interval changes: last - first for a series; for pairs, paired changes only
        "net_change": {"chosen": rounded(net_c), "rejected": rounded(net_r), "margin": rounded(net_c - net_r)},
        "rejected_rose_intervals": rose,
        "chosen_fell_intervals": fell,
        "finding": finding_logprob(n, len(rose), len(fell)),
        "intervals": [{"step_start": rounded(a), "step_end": rounded(b), "delta_chosen": rounded(dc),
                       "delta_rejected": rounded(dr), "regime": nm}
                      for a, b, dc, dr, nm in zip(s.step_start, s.step_end, s.delta_chosen,
                                                  s.delta_rejected, names)],
        "series": {"step": [rounded(x) for x in s.step], "chosen": [rounded(x) for x in s.chosen],
                   "rejected": [rounded(x) for x in s.rejected]},
        "notes": list(s.notes),
    }
    if s.pairs is not None:
        out["pairs"] = summarize_pairs(s.pairs, tol)
    if s.entangle:
        out["entangle"] = summarize_entangle(s.entangle)
    return out


def summarize_pairs(p: PairRecords, tol: float) -> dict:
    ch = pair_changes(p)
    codes = regimes.classify(ch["delta_chosen"], ch["delta_rejected"], tol)
    out = {"n_pairs": len(set(p.pair)), "n_pair_changes": int(len(codes)),
           "basis": "every pair's own change between consecutive logged steps, pooled",
           **regime_block(codes)}
    if p.G_ww is None:
        return out
    per_step = []
    for s in ch["steps"]:
        sel = (p.step == s) & np.isfinite(p.G_ww) & np.isfinite(p.G_wl) & np.isfinite(p.G_ll)
        if not sel.any():
            continue
        rho = condition_ratios(p.G_ww[sel], p.G_wl[sel], p.G_ll[sel])[2]
        rom = condition_ratios(p.G_ww[sel].mean(), p.G_wl[sel].mean(), p.G_ll[sel].mean())[2]
        per_step.append({"step": rounded(s), "n_pairs": int(sel.sum()),
                         "case1_fraction": rounded((rho <= 1).mean()),
                         "rho_mean_of_ratios": rounded(rho.mean()),
                         "rho_ratio_of_means": rounded(rom)})
    # First-order prediction (R3): sign(d l_w) = sign(G_ww - G_wl), sign(d l_l) = sign(G_wl - G_ll)
    ok = np.isfinite(ch["G_ww"]) & np.isfinite(ch["G_wl"]) & np.isfinite(ch["G_ll"])
    pred = regimes.classify(ch["G_ww"][ok] - ch["G_wl"][ok], ch["G_wl"][ok] - ch["G_ll"][ok])
    agree = int((pred == codes[ok]).sum())
    out["condition"] = {
        "per_step": per_step,
        "aggregates": "rho = max(G_wl/G_ww, G_wl/G_ll) per pair; 'mean_of_ratios' averages the "
                      "per-pair rho, 'ratio_of_means' applies the formula to mean G entries",
        "prediction_agreement": {
            "basis": "first-order regime from the Gram entries at the interval's start (R3) "
                     "vs the pair's observed regime over the interval",
            "n": int(ok.sum()), "agree": agree,
            "fraction": rounded(agree / ok.sum()) if ok.any() else None},
    }
    return out


def summarize_grad(g: GradSeries) -> dict:
    rho_w, rho_l, rho = condition_ratios(g.norm_w ** 2, g.inner, g.norm_l ** 2)
    pred = regimes.classify(g.norm_w ** 2 - g.inner, g.inner - g.norm_l ** 2)
    pred_names = regimes.names(pred)
    case1 = rho <= 1
    has_logged = np.isfinite(g.logged_condition)
    logged_case1 = g.logged_condition <= 1
    disagree = has_logged & (case1 != logged_case1)
    per_step = [{"step": rounded(s), "rho_w": rounded(a), "rho_l": rounded(b), "rho": rounded(c),
                 "logged_condition": rounded(d), "cos_mean": rounded(e),
                 "case1_corrected": bool(k1),
                 "case1_logged": bool(k2) if h else None,
                 "predicted_regime": nm}
                for s, a, b, c, d, e, k1, k2, h, nm in zip(
                    g.step, rho_w, rho_l, rho, g.logged_condition, g.cos, case1, logged_case1,
                    has_logged, pred_names)]
    n = len(g.step)
    n_c, n_l = int(case1.sum()), int((logged_case1 & has_logged).sum())
    finding = f"corrected rho says Case 1 holds at {n_c} of {n} steps"
    if has_logged.any():
        finding += (f"; logged Grad_Condition says {n_l}"
                    f" ({int(disagree.sum())} disagree{'s' if disagree.sum() == 1 else ''})")

    def stats(x):
        x = x[np.isfinite(x)]
        return {"mean": rounded(x.mean()), "min": rounded(x.min()), "max": rounded(x.max())} if x.size else None

    return {
        "format": g.format, "split": None, "source": g.source,
        "regime_basis": ("first-order prediction per checkpoint from the ratio of per-step means "
                         "(R3: sign(G_ww - G_wl), sign(G_wl - G_ll)); the file has no log-probs"),
        "n_steps": n,
        # No log-probs in this file, so there are no observed interval changes.
        "n_intervals": None, "net_change": None,
        # the one run-summary schema: no log-probs, so no realised changes to summarise
        **{k: None for k in regimes.RUN_SUMMARY if k != "regime_fractions"},
        "rejected_rose_intervals": None, "chosen_fell_intervals": None,
        **regime_block(pred),
        "condition": {
            "corrected": {"definition": CONDITION_AGGREGATE, **stats(rho),
                          "case1_steps": n_c},
            "logged": ({"definition": LOGGED_CONDITION, **stats(g.logged_condition),
                        "case1_steps": n_l} if has_logged.any() else None),
            "disagreement_count": int(disagree.sum()) if has_logged.any() else None,
            "disagreement_steps": [rounded(s) for s in g.step[disagree]],
            "only_rho_l_exceeds_1_steps": [rounded(s) for s in g.step[(rho_w <= 1) & (rho_l > 1)]],
            "per_step": per_step,
        },
        "finding": finding,
        "notes": list(g.notes),
    }


def summarize(series: LogProbSeries | GradSeries, tol: float = 0.0) -> dict:
    """JSON-ready summary: regimes per interval (R4 via `regimes.classify`) and, for gradient
    logs, the corrected vs logged condition statistic.

    `tol` (log-prob units): a change with |delta| <= tol counts as no change.
    """
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    if isinstance(series, GradSeries):
        return summarize_grad(series)
    return summarize_logprob(series, float(tol))
