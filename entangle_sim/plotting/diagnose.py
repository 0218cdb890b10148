"""Figures of a `diagnose.run_diagnose` result (theory §6.3: Figs. 3, 4a, 4b analogues). Axes API only."""
from __future__ import annotations

import numpy as np

from .style import COLORS, new_axes


def _label(res):
    c = res["config"]
    return f"suffix={c['suffix']}, loss={c['loss']}"


def plot_logps(result, *, ax=None):
    """Eval-set mean chosen / rejected log-probs over PO steps (Fig. 3 analogue). Returns the Figure."""
    fig, ax = new_axes(ax)
    s = result["steps"]
    ax.plot(s, result["chosen_logp"], color=COLORS["chosen"], marker="o", ms=3, label="chosen")
    ax.plot(s, result["rejected_logp"], color=COLORS["rejected"], marker="s", ms=3, label="rejected")
    dw = float(result["chosen_logp"][-1] - result["chosen_logp"][0])
    dl = float(result["rejected_logp"][-1] - result["rejected_logp"][0])
    ax.set_xlabel("preference-optimisation step")
    ax.set_ylabel("mean summed log-prob (eval pairs)")
    ax.set_title(f"Fig. 3 analogue: chosen {'rises' if dw > 0 else 'falls'} ({dw:+.2f}), rejected "
                 f"{'rises' if dl > 0 else 'falls'} ({dl:+.2f})\n{_label(result)}")
    ax.legend()
    return fig


def plot_geometry(result, *, ax=None):
    """Gradient cosine and condition ratios rho over PO steps (Fig. 4a analogue). Returns the Figure."""
    fig, ax = new_axes(ax)
    g, s = result["geometry"], result["steps"]
    ax.plot(s, g["cos_mean"], color=COLORS["margin"], marker="o", ms=3, label="cos(g_w, g_l), mean over pairs")
    ax.plot(s, g["cos_ratio_of_means"], color=COLORS["margin"], ls="--", label="cos, ratio of means")
    ax.plot(s, g["rho_mean_of_ratios"], color=COLORS["accent"], label="rho = max(rho_w, rho_l), mean of ratios")
    ax.plot(s, g["rho_ratio_of_means"], color=COLORS["accent"], ls="--", label="rho, ratio of means")
    ax.axhline(0.0, color=COLORS["neutral"], lw=0.8)
    ax.axhline(1.0, color=COLORS["neutral"], lw=0.8, ls=":")
    fin = float(g["cos_mean"][-1])
    ax.set_xlabel("preference-optimisation step")
    ax.set_ylabel("cosine / condition ratio")
    ax.set_title(f"Fig. 4a analogue: gradient cosine ends {'positive' if fin > 0 else 'negative'} ({fin:+.2f}); "
                 f"Case 1 needs rho <= 1\n{_label(result)}")
    ax.legend(fontsize=7)
    return fig


def plot_token_heatmap(result, *, ax=None):
    """Per-token gradient cosine of eval pair 0 at the final params (Fig. 4b analogue).

    Rows = chosen tokens, columns = rejected tokens; 'RdBu_r' centred at 0, range [-1, 1].
    """
    cos = np.asarray(result["token_cos"])
    fig, ax = new_axes(ax, figsize=(4.6 + 0.12 * cos.shape[1], 3.8 + 0.1 * cos.shape[0]))
    im = ax.imshow(cos, cmap="RdBu_r", vmin=-1.0, vmax=1.0, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="cos(g_t(chosen), g_u(rejected))")
    ax.grid(False)
    ct, rt = np.asarray(result["chosen_tokens"]), np.asarray(result["rejected_tokens"])
    ax.set_xticks(range(len(rt)), [str(int(t)) for t in rt], fontsize=6, rotation=90)
    ax.set_yticks(range(len(ct)), [str(int(t)) for t in ct], fontsize=6)
    ax.set_xlabel("rejected token (id)")
    ax.set_ylabel("chosen token (id)")
    c0 = float(cos[0, 0])
    msg = f"Contrastive tokens: cos {c0:+.2f}"
    if min(cos.shape) > 1:
        msg += f"; matched shared tokens: mean cos {float(np.mean(np.diag(cos)[1:])):+.2f}"
    ax.set_title(f"Fig. 4b analogue: {msg}\n{_label(result)}")
    return fig
