"""The paper's tiny-transformer claims as statistics: fraction of seeds holding per claim x setting
(with Wilson 95% intervals) and what breaks the failing runs. Data: `claim_stats.run_sweep`."""
from __future__ import annotations

import numpy as np

from .style import COLORS
from .theory import panels

TERM_ORDER = ("one-pair theory", "cross-pair terms", "Adam preconditioning", "second-order remainder",
              "held-out pairs", "model geometry", "training moved the geometry")
TERM_COLORS = dict(zip(TERM_ORDER, (COLORS["chosen"], COLORS["orange"], COLORS["rejected"], COLORS["neutral"],
                                    "#CC79A7", "#56B4E9", "#F0E442")))


def plot_claim_table(data, *, ax=None):
    """Left: claim x setting grid, colour = fraction of seeds where the claim holds, text = k/n and the
    Wilson 95% interval. Right: per claim, the failing runs by the term that makes them fail."""
    rows = data["table"]
    claims = list(dict.fromkeys(r["claim"] for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    frac = np.full((len(claims), len(settings)), np.nan)
    fig, (a1, a2) = panels(ax, 2, 2, size=(0.9 * len(settings) + 3.5, 0.55 * len(claims) + 2.4))
    for r in rows:
        i, j = claims.index(r["claim"]), settings.index(r["setting"])
        frac[i, j] = r["fraction"]
        lo, hi = r["interval"]
        a1.text(j, i, f"{r['k']}/{r['n']}\n[{lo:.2f},{hi:.2f}]", ha="center", va="center", fontsize=6.5,
                color="white" if r["fraction"] < 0.25 or r["fraction"] > 0.85 else "black")
    im = a1.imshow(frac, cmap="RdBu", vmin=0, vmax=1, aspect="auto")
    a1.grid(False)
    a1.set_xticks(range(len(settings)), settings, rotation=45, ha="right", fontsize=7)
    a1.set_yticks(range(len(claims)), claims, fontsize=7)
    a1.set_xlabel("setting (one factor changed from the paper-like recipe)")
    a1.set_ylabel("claim")
    fig.colorbar(im, ax=a1, fraction=0.046, label="fraction of seeds where the claim holds")
    a1.set_title(f"Paper's claims, tiny-transformer analogue ({data['seeds']} seeds per setting)", fontsize=9)
    left = np.zeros(len(claims))
    for term in TERM_ORDER:
        counts = np.array([sum(r["attribution"].get(term, 0) for r in rows if r["claim"] == c) for c in claims], float)
        if counts.any():
            a2.barh(range(len(claims)), counts, left=left, color=TERM_COLORS[term], label=term)
            left += counts
    a2.set_yticks(range(len(claims)), claims, fontsize=7)
    a2.invert_yaxis()
    a2.set_xlabel("failing runs (all settings)")
    a2.set_title("What makes a failing run fail (first term whose level breaks the claim)", fontsize=9)
    if left.any():
        a2.legend(fontsize=6.5, loc="lower right")
    fig.suptitle("Claims as statistics (this project's measurement of the paper's Figures 3, 4a, 4b claims)",
                 fontsize=9)
    return fig
