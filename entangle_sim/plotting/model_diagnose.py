"""Figures of `entangle-sim diagnose-model`: pairs on a loss's regime map, cos / rho histograms,
token heat maps. `plot_*(...) -> Figure`, no file I/O; inputs are numpy arrays."""
from __future__ import annotations

import numpy as np
from matplotlib.patches import Patch

from ..regimes import REGIMES, classify
from .style import COLORS, REGIME_COLORS, new_axes
from .theory import REGIME_LABELS, regime_cmap


def plot_pairs_regime_map(cos, ratio, regime_names, d_w, d_l, *, loss: str = "", ax=None):
    """Pairs as points in the (cos(g_w, g_l), |g_l|/|g_w|) plane over the loss's regime map.

    Background: first-order regime of one step on a pair with incentive ratio k = d_w/d_l equal to
    the median over the pairs (chosen rises <=> cos r <= k, rejected falls <=> k cos <= r, for d_l > 0).
    Points are coloured by each pair's own regime (its own k).
    """
    fig, ax = new_axes(ax, figsize=(5.4, 4.0))
    cos, ratio = np.asarray(cos, float), np.asarray(ratio, float)
    ok = (np.asarray(d_l) > 0) & np.isfinite(np.asarray(d_w) / np.asarray(d_l))
    k = float(np.median(np.asarray(d_w)[ok] / np.asarray(d_l)[ok])) if ok.any() else 1.0
    rmax = max(2.0, float(np.nanmax(ratio)) * 1.1 if ratio.size else 2.0)
    c, r = np.meshgrid(np.linspace(-1, 1, 301), np.linspace(0, rmax, 301))
    codes = classify(k - c * r, k * c - r)
    cmap, norm = regime_cmap()
    ax.pcolormesh(c, r, codes, cmap=cmap, norm=norm, shading="auto", alpha=0.35, rasterized=True)
    for name in dict.fromkeys(regime_names):
        sel = np.array([n == name for n in regime_names])
        ax.scatter(cos[sel], ratio[sel], s=16, color=REGIME_COLORS[name], edgecolor=COLORS["black"],
                   linewidth=0.4, label=f"{REGIME_LABELS[name]} ({sel.sum()})")
    ax.set_xlim(-1, 1)
    ax.set_ylim(0, rmax)
    ax.set_xlabel(r"cos$(g_w, g_l)$")
    ax.set_ylabel(r"$|g_l| / |g_w|$")
    ax.set_title(f"{loss}: your pairs on the regime map (background k = d_w/d_l = {k:.3g})", fontsize=9)
    handles, _ = ax.get_legend_handles_labels()
    present = set(int(x) for x in np.unique(codes))
    handles += [Patch(facecolor=REGIME_COLORS[REGIMES[i]], alpha=0.35, label=f"map: {REGIME_LABELS[REGIMES[i]]}")
                for i in sorted(present)]
    ax.legend(handles=handles, fontsize=6, loc="upper left")
    return fig


def plot_histograms(cos, rho, *, ax=None):
    """Histograms of cos(g_w, g_l) and of rho = max(G_wl/G_ww, G_wl/G_ll) (rho <= 1: ideal for DPO)."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, axs = plt.subplots(1, 2, figsize=(8, 3.2), layout="constrained")
    else:
        axs = list(np.ravel(ax))
        fig = axs[0].figure
    axs[0].hist(np.asarray(cos), bins=30, range=(-1, 1), color=COLORS["margin"])
    axs[0].set_xlabel(r"cos$(g_w, g_l)$")
    axs[0].set_ylabel("pairs")
    rho = np.asarray(rho, float)
    axs[1].hist(np.clip(rho, -5, 5), bins=30, color=COLORS["accent"])
    axs[1].axvline(1.0, color=COLORS["black"], ls="--", lw=1)
    axs[1].set_xlabel(r"$\rho$ = max($G_{wl}/G_{ww}$, $G_{wl}/G_{ll}$), clipped to [-5, 5]")
    axs[0].set_title(f"mean cos {np.mean(cos):+.3f}", fontsize=9)
    axs[1].set_title(f"rho <= 1 for {np.mean(rho <= 1):.0%} of pairs", fontsize=9)
    return fig


def plot_token_map(cos, chosen_tokens, rejected_tokens, *, title: str = "", ax=None):
    """T_w x T_l heat map of token-gradient cosines cos(g_t(y_w), g_u(y_l))."""
    fig, ax = new_axes(ax, figsize=(0.35 * len(rejected_tokens) + 2.5, 0.3 * len(chosen_tokens) + 1.8))
    im = ax.imshow(np.asarray(cos), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    ax.set_yticks(range(len(chosen_tokens)), chosen_tokens, fontsize=6)
    ax.set_xticks(range(len(rejected_tokens)), rejected_tokens, fontsize=6, rotation=90)
    ax.set_ylabel("chosen tokens")
    ax.set_xlabel("rejected tokens")
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, label="cos of token gradients")
    return fig
