"""Figures of the diagnosis summary: where G_wl comes from (per parameter group) and the what-if
ranking. `plot_*(...) -> Figure`, no file I/O; inputs are the summary's JSON-ready dicts/lists."""
from __future__ import annotations

import numpy as np

from .style import COLORS, new_axes


def plot_by_group(by_group: dict, *, ax=None):
    """Bars per parameter group: share of the summed G_wl (left axis) and mean cos(g_w, g_l) over the
    pairs (markers, right axis). by_group: {group: {'share_G_wl', 'mean_cos', ...}}."""
    fig, ax = new_axes(ax, figsize=(6.0, 3.6))
    names = sorted(by_group, key=lambda g: -abs(by_group[g]["share_G_wl"]))
    x = np.arange(len(names))
    ax.bar(x, [by_group[g]["share_G_wl"] for g in names], color=COLORS["chosen"], label="share of G_wl")
    ax.axhline(0, color=COLORS["black"], linewidth=0.6)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=40, ha="right", fontsize=7)
    ax.set_ylabel(r"share of $\sum G_{wl}$")
    ax2 = ax.twinx()
    ax2.plot(x, [by_group[g]["mean_cos"] for g in names], "o", color=COLORS["orange"], label="mean cos")
    ax2.set_ylim(-1, 1)
    ax2.set_ylabel(r"mean cos$(g_w, g_l)$ in the group")
    ax.set_title("where the chosen/rejected gradient overlap comes from", fontsize=9)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper right")
    return fig


def plot_what_if(rows: list[dict], *, top: int = 15, ax=None):
    """Horizontal bars: fraction of pairs whose chosen log-prob rises while the margin grows, per
    scenario (the `what_if` rows, best first), under SGD and (when measured) Adam. First order."""
    rows = [r for r in rows if "skipped" not in r][:top]
    fig, ax = new_axes(ax, figsize=(6.0, 0.28 * len(rows) + 1.2))
    y = np.arange(len(rows))[::-1]
    has_adam = any("adam" in r for r in rows)
    h = 0.4 if has_adam else 0.7
    ax.barh(y + (h / 2 if has_adam else 0), [r["sgd"]["chosen_up_margin_up"] for r in rows], height=h,
            color=COLORS["chosen"], label="SGD")
    if has_adam:
        ax.barh(y - h / 2, [r["adam"]["chosen_up_margin_up"] for r in rows], height=h, color=COLORS["orange"],
                label="Adam (checkpoint state)")
    ax.set_yticks(y)
    ax.set_yticklabels([r["label"] for r in rows], fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("pairs with chosen log-prob up and margin up (first order)")
    ax.legend(fontsize=7, loc="lower right")
    return fig
