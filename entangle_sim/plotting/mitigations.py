"""Figures for the mitigations: comparison grid, log-prob trajectories, masked token maps.
Functions return a Figure; no file I/O."""
from __future__ import annotations

import numpy as np

from .style import COLORS, new_axes


def plot_comparison(rows, *, metric: str = "ideal_fraction", ax=None):
    """Grouped bars: `metric` per setting (groups) and method (bars), rows from run_comparison."""
    fig, ax = new_axes(ax, figsize=(8.0, 3.6))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        vals = [next((r.get(metric, np.nan) for r in rows if r["setting"] == s and r["method"] == m), np.nan) for s in settings]
        ax.bar(np.arange(len(settings)) + j * width, vals, width, label=m)
    ax.set_xticks(np.arange(len(settings)) + 0.4 - width / 2, settings, rotation=20)
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(f"{metric.replace('_', ' ')} by method and setting")
    ax.legend(fontsize=7, ncol=2)
    return fig


def plot_logp_trajectories(records: dict, *, ax=None):
    """Mean chosen (solid) / rejected (dashed) log-prob change vs step for {method: MitigationRecord}."""
    fig, ax = new_axes(ax)
    for i, (name, rec) in enumerate(records.items()):
        lw, ll = np.asarray(rec.chosen_logps), np.asarray(rec.rejected_logps)
        line, = ax.plot((lw - lw[0]).mean(1), label=f"{name} chosen")
        ax.plot((ll - ll[0]).mean(1), ls="--", color=line.get_color(), label=f"{name} rejected")
    ax.axhline(0, color=COLORS["neutral"], lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("mean change of log-prob")
    ax.legend(fontsize=7)
    return fig


def plot_masked_token_map(token_cos, mask_w, mask_l, *, ax=None):
    """Token x token gradient cosine (rows chosen, columns rejected) weighted by the masks m^w_t m^l_u (R20)."""
    fig, ax = new_axes(ax)
    M = np.asarray(token_cos) * np.outer(np.asarray(mask_w), np.asarray(mask_l))
    im = ax.imshow(M, cmap="RdBu_r", vmin=-1, vmax=1)
    fig.colorbar(im, ax=ax, label="masked cos")
    ax.set_xlabel("rejected token")
    ax.set_ylabel("chosen token")
    return fig
