"""Theory figures: Table 1 region map, per-loss regime maps, the condition table (Table 2
analogue) and the R17 suffix-length curve. `plot_*(data, *, ax=None) -> Figure`, Axes API only,
no file I/O. Data come from `entangle_sim.reproduce` builders.

Multi-panel figures accept `ax` as a sequence of Axes (one per panel) or None.
"""
from __future__ import annotations


import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.patches import Patch

from ..presets import ALGO_LABELS
from ..regimes import REGIMES
from .style import COLORS, REGIME_COLORS, apply_style, new_axes

INFEASIBLE = "#FFFFFF"
REGIME_LABELS = {
    "chosen_up_rejected_down": "chosen ↑ rejected ↓ (Case 1, ideal)",
    "both_up": "both ↑ (Case 3)",
    "both_down": "both ↓ (Case 2)",
    "chosen_down_rejected_up": "chosen ↓ rejected ↑ (4th regime)",
    "stationary": "no first-order change",
}


def regime_cmap():
    """(colormap, norm) for regime codes: -1 (infeasible) and the four regimes, in `REGIMES` order."""
    colors = [INFEASIBLE] + [REGIME_COLORS[r] for r in REGIMES]
    return ListedColormap(colors), BoundaryNorm(np.arange(-1.5, len(REGIMES) + 0.5), len(colors))


def panels(ax, n: int, ncols: int, *, size=(3.2, 2.8)):
    """(fig, axes[n]) from a sequence of n Axes, or a new styled figure with an n-panel grid."""
    apply_style()
    if ax is not None:
        axes = list(np.ravel(ax))
        if len(axes) < n:
            raise ValueError(f"this figure needs {n} Axes, got {len(axes)}")
        return axes[0].figure, axes[:n]
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axs = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), layout="constrained",
                            squeeze=False)
    axs = list(axs.ravel())
    for extra in axs[n:]:
        extra.set_visible(False)
    return fig, axs[:n]


def _legend_handles(codes):
    present = set(int(c) for c in np.unique(codes))
    handles = [Patch(facecolor=REGIME_COLORS[r], label=REGIME_LABELS[r]) for i, r in enumerate(REGIMES)
               if i in present]
    if -1 in present:
        handles.append(Patch(facecolor=INFEASIBLE, edgecolor=COLORS["neutral"], hatch="///",
                             label="no Gram matrix (cos² > 1 or signs differ)"))
    return handles


def plot_table1_regions(data, *, ax=None):
    """Table 1 as a region map over (rho_w = G_wl/G_ww, rho_l = G_wl/G_ll), DPO's first-order
    regime at every feasible point (symbolic engine). The fourth regime never appears (R5)."""
    fig, ax = new_axes(ax, figsize=(5.6, 4.6))
    code = np.asarray(data["code"])
    cmap, norm = regime_cmap()
    x, y = np.asarray(data["rho_w"]), np.asarray(data["rho_l"])
    ax.pcolormesh(x, y, code, cmap=cmap, norm=norm, shading="nearest", rasterized=True)
    ax.contourf(x, y, (code == -1).astype(float), levels=[0.5, 1.5], colors="none", hatches=["///"])
    ax.axvline(1.0, color=COLORS["black"], lw=0.8, ls="--")
    ax.axhline(1.0, color=COLORS["black"], lw=0.8, ls="--")
    ax.text(0.45, 0.35, "Case 1\nchosen ↑ rejected ↓", ha="center", va="center", fontsize=8)
    ax.text(2.0, 0.3, "Case 2\nboth ↓", ha="center", va="center", fontsize=8)
    ax.text(0.3, 2.0, "Case 3\nboth ↑", ha="center", va="center", fontsize=8)
    ax.set_xlabel(r"$\rho_w = G_{wl}/G_{ww}$ (dimensionless)")
    ax.set_ylabel(r"$\rho_l = G_{wl}/G_{ll}$ (dimensionless)")
    n4 = int(np.sum(code == REGIMES.index("chosen_down_rejected_up")))
    ax.set_title("Table 1 (paper, section 3.1) as a region map — DPO: chosen falls iff ρ_w > 1, rejected rises iff ρ_l > 1;\n"
                 f"ρ_w ρ_l = cos² ≤ 1, so no point has both (4th-regime cells: {n4})")
    ax.legend(handles=_legend_handles(code), fontsize=7, loc="upper right", frameon=True, facecolor="white",
              framealpha=1.0)
    ax.grid(False)
    return fig


def plot_regime_maps(data, *, ax=None):
    """Small multiples: first-order regime of each loss on the (cos(g_w, g_l), |g_l|/|g_w|) plane
    at the stated pair state and default hyperparameters (symbolic engine, eta = 1)."""
    names = list(data["losses"])
    n = len(names)
    fig, axes = panels(ax, n, 3 if n <= 6 else 6, size=(3.3, 2.9) if n <= 6 else (2.6, 2.3))
    cmap, norm = regime_cmap()
    cos, ratio = np.asarray(data["cos"]), np.asarray(data["ratio"])
    codes = np.asarray(data["code"])
    for i, (a, name) in enumerate(zip(axes, names)):
        a.pcolormesh(cos, ratio, codes[i], cmap=cmap, norm=norm, shading="nearest", rasterized=True)
        a.set_yscale("log")
        a.axhline(1.0, color=COLORS["black"], lw=0.5, ls=":")
        a.grid(False)
        frac = {r: float(np.mean(codes[i] == k)) for k, r in enumerate(REGIMES)}
        label = ALGO_LABELS.get(name, name)
        tw = data.get("chosen_threshold_latex", data["chosen_threshold"])[i]
        tl = data.get("rejected_threshold_latex", data["rejected_threshold"])[i]
        small = n > 6
        a.set_title(f"{label}: Case 1 on {100 * frac['chosen_up_rejected_down']:.0f}% of plane"
                    + ("" if small else "\n" + _wrap_math(f"t_w = {tw}", 48) + "\n" + _wrap_math(f"t_l = {tl}", 48)),
                    fontsize=7 if small else 8)
        if i % (6 if small else 3) == 0:
            a.set_ylabel("|g_l|/|g_w| (norm ratio)")
        a.set_xlabel("cos(g_w, g_l)")
    st = data["state"]
    # The finding, computed: majority regime in the rejected-dominant, nearly parallel corner.
    corner = (cos[None, :] > 0.9) & (ratio[:, None] > 3.0)
    groups: dict[str, list[str]] = {}
    for i, name in enumerate(names):
        vals = codes[i][corner]
        if vals.size:
            r = REGIMES[int(np.bincount(vals[vals >= 0], minlength=len(REGIMES)).argmax())]
            groups.setdefault(REGIME_LABELS[r].split(" (")[0], []).append(ALGO_LABELS.get(name, name))
    finding = "; ".join(f"{k}: {', '.join(v)}" for k, v in groups.items())
    fig.suptitle("First-order regime per loss (derived in this project; default hyperparameters) at "
                 f"ℓ_w={st['chosen_logps']:g}, ℓ_l={st['rejected_logps']:g}, ref=({st['ref_chosen_logps']:g}, "
                 f"{st['ref_rejected_logps']:g}), n=({st['chosen_len']:g}, {st['rejected_len']:g})\n"
                 f"Rejected-dominant, nearly parallel gradients (cos > 0.9, |g_l|/|g_w| > 3) — {finding}",
                 fontsize=9 if n <= 6 else 8, wrap=True)
    fig.legend(handles=_legend_handles(codes), loc="outside lower center", ncol=4, fontsize=7)
    return fig


def _wrap_math(s: str, width: int = 44) -> str:
    """Break a mixed text/$math$ string into lines of about `width` characters, only between
    pieces (never inside $...$), so every piece still parses as mathtext and nothing is cut."""
    import re

    tokens = [tok for tok in re.split(r"(\$[^$]*\$)", s) if tok]
    lines, cur = [], ""
    for tok in tokens:
        visible = len(re.sub(r"\\[a-zA-Z]+|[{}$]", "", tok))
        if cur and len(re.sub(r"\\[a-zA-Z]+|[{}$]", "", cur)) + visible > width:
            lines.append(cur.rstrip())
            cur = tok.lstrip()
        else:
            cur += tok
    lines.append(cur)
    return "\n".join(lines)


def plot_condition_table(data, *, ax=None):
    """The loss-specific condition table (Table 2 analogue; entries derived in this project by the
    symbolic engine): chosen rises iff G_wl <= t_w G_ww, rejected falls iff G_wl <= t_l G_ll, and
    whether the fourth regime is reachable. Thresholds are the compact forms, typeset with
    matplotlib mathtext and wrapped (never truncated)."""
    rows = data["rows"]
    cells, heights = [], []
    for r in rows:
        # \dfrac: display-size fractions stay legible at table font sizes.
        tw = _wrap_math(r.get("chosen_threshold_latex", r["chosen_threshold"])).replace(r"\frac", r"\dfrac")
        tl = _wrap_math(r.get("rejected_threshold_latex", r["rejected_threshold"])).replace(r"\frac", r"\dfrac")
        cells.append([r["loss"], tw, tl, f"{r['d_w_sign']} / {r['d_l_sign']}",
                      "possible" if r["fourth_regime_possible"] else "impossible"])
        heights.append(max(tw.count("\n"), tl.count("\n")) + 1)
    unit = 0.5
    fig, ax = new_axes(ax, figsize=(13.0, unit * (sum(heights) + 1) + 1.2))
    ax.axis("off")
    cols = ["loss", r"chosen ↑ iff $G_{wl} \leq t_w G_{ww}$ ; $t_w$ =",
            r"rejected ↓ iff $G_{wl} \leq t_l G_{ll}$ ; $t_l$ =", "d_w / d_l sign", "4th regime"]
    table = ax.table(cellText=cells, colLabels=cols, cellLoc="left", bbox=[0, 0, 1, 1],
                     colWidths=[0.1, 0.35, 0.35, 0.12, 0.08])
    table.auto_set_font_size(False)
    table.set_fontsize(7.5)
    total = sum(heights) + 1
    for (i, j), cell in table.get_celld().items():
        cell.set_edgecolor("#CCCCCC")
        cell.set_height((1 if i == 0 else heights[i - 1]) / total)
        if i == 0:
            cell.set_facecolor("#EEEEEE")
        elif j == 4 and rows[i - 1]["fourth_regime_possible"]:
            cell.set_facecolor(REGIME_COLORS["chosen_down_rejected_up"])
    n4 = sum(r["fourth_regime_possible"] for r in rows)
    negative = [r["fourth_regime_possible"] and "can be < 0" in (r["d_w_sign"] + r["d_l_sign"]) for r in rows]
    neg = sum(negative)
    und = [r["loss"] for r, ng in zip(rows, negative) if r["fourth_regime_possible"] and not ng]
    ax.set_title(f"Conditions of {len(rows)} losses (derived in this project, symbolic engine): the 4th regime "
                 f"(chosen ↓, rejected ↑) is reachable for {n4} losses — {neg} have an incentive that can be negative"
                 + (f", {len(und)} an undecided sign ({', '.join(und)})" if und else "")
                 + "\nsymbols: r = l − l_ref, p = exp(l/n), z = margin, s = −m′(z), h′ = dz/dl "
                 "(each loss's values: `entangle-sim conditions LOSS`)", fontsize=9)
    return fig


def plot_suffix_cos(data, *, ax=None):
    """R17: mean cos(g_w, g_l) over pairs vs shared-suffix length L (left), and the Gram entries
    G_ww, G_ll (grow ~ L) against |g_w - g_l|^2 (stays O(1)) (right). Last-layer model, Setting A."""
    fig, (a1, a2) = panels(ax, 2, 2, size=(4.0, 3.3))
    L = np.asarray(data["L"], dtype=float)
    x = L + 1  # log axis: L = 0 plotted at 1
    a1.fill_between(x, data["cos_min"], data["cos_max"], color=COLORS["sky"], alpha=0.3, lw=0,
                    label="min–max over pairs")
    a1.plot(x, data["cos"], marker="o", color=COLORS["chosen"], label="mean over pairs")
    a1.axhline(1.0, color=COLORS["neutral"], lw=0.8, ls=":")
    a1.set_xscale("log", base=2)
    a1.set_xticks(x, [str(int(v)) for v in L])
    a1.set_xlabel("shared-suffix length L (tokens)")
    a1.set_ylabel("cos(g_w, g_l)")
    a1.legend(fontsize=7)
    for key, c, lab in (("G_ww", COLORS["chosen"], "G_ww = |g_w|²"), ("G_ll", COLORS["rejected"], "G_ll = |g_l|²"),
                        ("diff", COLORS["margin"], "|g_w − g_l|²")):
        a2.plot(x, data[key], marker="o", color=c, label=lab)
    a2.set_xscale("log", base=2)
    a2.set_yscale("log")
    a2.set_xticks(x, [str(int(v)) for v in L])
    a2.set_xlabel("shared-suffix length L (tokens)")
    a2.set_ylabel("squared gradient norm (param units²)")
    a2.legend(fontsize=7)
    fig.suptitle(f"R17 (derived in this project): cos rises from {data['cos'][0]:+.2f} (L={int(L[0])}) to {data['cos'][-1]:+.2f} "
                 f"(L={int(L[-1])}); norms grow with L while |g_w − g_l|² stays "
                 f"{data['diff'][-1] / data['diff'][0]:.1f}× its L=0 value", fontsize=9)
    return fig
