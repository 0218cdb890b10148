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


CLAIM_COLORS = dict(zip(("1t-cos", "1t-chosen", "suffix-cos", "suffix-chosen", "heat-contrast", "heat-shared"),
                        (COLORS["rejected"], COLORS["chosen"], COLORS["orange"], COLORS["sky"], COLORS["accent"],
                         COLORS["margin"])))
LEVEL_COLORS = {"one": COLORS["chosen"], "batch": COLORS["orange"], "lin": COLORS["rejected"], "real": COLORS["black"],
                "eval": COLORS["accent"], "reference": "#56B4E9", "final": "#8C6D00"}
SETTING_COLORS = (COLORS["rejected"], COLORS["chosen"], COLORS["margin"], COLORS["orange"])


def plot_claim_scale(data, *, ax=None):
    """The claims as the model grows (`claim_stats.run_scale`, CPU and GPU sizes merged). Top: fraction
    of seeds where each claim holds vs parameter count, Wilson 95% band, paper-like setting and SGD
    control; the SGD control's second-order remainder per size. Bottom, per single-token claim: the
    failing runs by the term that breaks them (bars) and the fraction of seeds in which each account
    (level) satisfies the claim (lines): where it turns."""
    sizes = list(data["sizes"])
    npar = np.array([data["sizes"][n]["n_params"] for n in sizes], float)
    settings = [s for s in data["settings"] if any(r["setting"] == s for r in data["table"])]
    fig, axs = panels(ax, 6, 3, size=(3.6, 3.0))
    for a, setting in zip(axs[:2], (settings + [None])[:2]):
        if setting is None:
            a.set_visible(False)
            continue
        for cid in data["claims"]:
            rows = [r for r in data["table"] if r["claim"] == cid and r["setting"] == setting]
            x = np.array([r["n_params"] for r in rows], float)
            a.plot(x, [r["fraction"] for r in rows], marker="o", color=CLAIM_COLORS.get(cid), label=cid, ms=3.5,
                   ls="-" if cid in ("1t-cos", "1t-chosen", "heat-contrast") else "--")
            a.fill_between(x, [r["interval"][0] for r in rows], [r["interval"][1] for r in rows],
                           color=CLAIM_COLORS.get(cid), alpha=0.08)
        a.set_xscale("log")
        a.set_ylim(-0.03, 1.03)
        a.set_xlabel("parameters")
        a.set_ylabel("fraction of seeds where the claim holds")
        a.set_title(f"setting '{setting}' ({data['seeds']} seeds per size)", fontsize=9)
    axs[0].legend(fontsize=6.5, loc="center left")
    a = axs[2]
    for setting, mk, col in zip(settings, ("o", "s", "^", "v"), SETTING_COLORS):
        fo = [data["sizes"][n]["first_order"].get(setting) for n in sizes]
        keep = [i for i, f in enumerate(fo) if f is not None]
        a.plot(npar[keep], [fo[i]["remainder_median"] for i in keep], marker=mk, ls="-", color=col, ms=3.5,
               label=f"{setting}: median run")
        a.plot(npar[keep], [fo[i]["remainder_max"] for i in keep], marker=mk, ls=":", color=col, ms=3.5,
               mfc="none", label=f"{setting}: worst run")
    a.axhline(0.1, color=COLORS["neutral"], lw=0.8, ls="--", label="first-order limit (0.1)")
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel("parameters")
    a.set_ylabel("remainder Σ|real − lin| / Σ|lin|")
    a.set_title("Is each size's PO step first order?", fontsize=9)
    a.legend(fontsize=6)
    turns = data.get("turns", {})
    for a, cid in zip(axs[3:], ("1t-cos", "1t-chosen", "heat-contrast")):
        rows = [r for r in data["table"] if r["claim"] == cid and r["setting"] == "paper"]
        if not rows:
            a.set_visible(False)
            continue
        xi = np.arange(len(rows))
        bottom = np.zeros(len(rows))
        for term in TERM_ORDER:
            frac = np.array([r["attribution"].get(term, 0) / r["n"] for r in rows])
            if frac.any():
                a.bar(xi, frac, bottom=bottom, color=TERM_COLORS[term], alpha=0.55, label=term, width=0.6)
                bottom += frac
        t = turns.get(cid)
        if t:
            for j, lv in enumerate(t["support"][0]):   # offset slightly: equal supports stay visible
                a.plot(xi + 0.04 * (j - 2), [s[lv] for s in t["support"]], color=LEVEL_COLORS.get(lv), marker="o",
                       ms=3, lw=1.2, label=f"supported at '{lv}'")
        a.set_xticks(xi, [r["size"] for r in rows], rotation=30, ha="right", fontsize=6.5)
        a.set_xlabel("model size (layers, width, vocabulary)")
        a.set_ylim(0, 1.05)
        a.set_ylabel("fraction of seeds")
        a.set_title(f"{cid}: what breaks it, what supports it", fontsize=9)
        a.legend(fontsize=5.5, loc="upper right")
    fig.suptitle("The paper's claims as the model grows (this project's measurement; paper: GPT-2 small, Figs. 3, 4)",
                 fontsize=9)
    return fig
