"""Figures for real training logs: log-prob curves with each logging interval shaded by regime."""
from __future__ import annotations

import numpy as np
from matplotlib.patches import Patch

from ..logs import GradSeries, LogProbSeries, summarize
from .style import COLORS, REGIME_COLORS, new_axes

_SHADE_ALPHA = 0.3


def _regime_legend(ax, used: list[str], extra_handles, prefix: str = "") -> None:
    handles = list(extra_handles) + [
        Patch(facecolor=REGIME_COLORS[n], alpha=_SHADE_ALPHA, label=prefix + n.replace("_", " "))
        for n in REGIME_COLORS if n in used]
    ax.legend(handles=handles, fontsize=7, loc="best")


def plot_log_regimes(summary_or_series, *, ax=None):
    """Chosen and rejected log-prob vs step, each logging interval shaded by its regime.

    Accepts a `logs.summarize` dict or a series from `logs.load_log`. For an official gradient
    log (no log-probs) it plots the corrected condition ratio rho and the logged Grad_Condition
    against the Case-1 threshold 1, each checkpoint shaded by its first-order predicted regime.
    The title states the finding. Axes API only; returns the Figure, writes nothing.
    """
    s = summary_or_series
    if isinstance(s, (LogProbSeries, GradSeries)):
        s = summarize(s)
    if not isinstance(s, dict) or "format" not in s:
        raise TypeError("plot_log_regimes expects a summary dict or a LogProbSeries/GradSeries")
    fig, ax = new_axes(ax, figsize=(6.0, 3.6))
    if "condition" in s and "series" not in s:
        _plot_grad(ax, s)
    else:
        _plot_logprob(ax, s)
    ax.set_title(s["finding"])
    return fig


def _plot_logprob(ax, s: dict) -> None:
    for iv in s["intervals"]:
        ax.axvspan(iv["step_start"], iv["step_end"], color=REGIME_COLORS[iv["regime"]],
                   alpha=_SHADE_ALPHA, lw=0)
    ser = s["series"]
    step = np.asarray(ser["step"], dtype=float)
    lines = []
    for key in ("chosen", "rejected"):
        y = np.asarray([np.nan if v is None else v for v in ser[key]], dtype=float)
        lines += ax.plot(step, y, marker="o", ms=3, color=COLORS[key], label=key)
    split = f" ({s['split']})" if s.get("split") else ""
    ax.set_xlabel("training step")
    ax.set_ylabel(f"mean log-prob{split}")
    _regime_legend(ax, [iv["regime"] for iv in s["intervals"]], lines)


def _plot_grad(ax, s: dict) -> None:
    rows = s["condition"]["per_step"]
    step = np.asarray([r["step"] for r in rows], dtype=float)
    # Each checkpoint's prediction is shaded over the half-way points to its neighbours.
    half = 0.5 * (step[1] - step[0]) if len(step) > 1 else 0.5
    half_end = 0.5 * (step[-1] - step[-2]) if len(step) > 1 else 0.5
    edges = np.concatenate([[step[0] - half], 0.5 * (step[1:] + step[:-1]), [step[-1] + half_end]])
    for a, b, r in zip(edges[:-1], edges[1:], rows):
        ax.axvspan(a, b, color=REGIME_COLORS[r["predicted_regime"]], alpha=_SHADE_ALPHA, lw=0)
    rho = np.asarray([np.nan if r["rho"] is None else r["rho"] for r in rows], dtype=float)
    lines = ax.plot(step, rho, marker="o", ms=3, color=COLORS["margin"],
                    label="ρ = max(ρ_w, ρ_l), ratio of means")
    if s["condition"]["logged"] is not None:
        logged = np.asarray([np.nan if r["logged_condition"] is None else r["logged_condition"]
                             for r in rows], dtype=float)
        lines += ax.plot(step, logged, marker="s", ms=3, ls="--", color=COLORS["neutral"],
                         label="logged Grad_Condition (mean G_wl/G_ww)")
    ax.axhline(1.0, color=COLORS["black"], lw=0.8, ls=":")
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel("condition ratio (Case 1 ⇔ ≤ 1)")
    _regime_legend(ax, [r["predicted_regime"] for r in rows], lines, prefix="predicted: ")
