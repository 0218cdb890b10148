"""Figure of the mitigation comparison (grouped bars). Returns a Figure; no file I/O."""
from __future__ import annotations

import numpy as np

from .style import new_axes


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
