"""Simulation figures: Fig. 1 analogue, algorithm comparison, suffix dynamics, token heat maps and
the tiny-transformer sentiment figures (Figs. 3, 4a, 4b analogues). `plot_*(data, *, ax=None) ->
Figure`, Axes API only, no file I/O. Data come from `entangle_sim.reproduce` builders.

Multi-panel figures accept `ax` as a sequence of Axes (one per panel) or None.
"""
from __future__ import annotations

import numpy as np

from .mitigations import plot_comparison
from .style import COLORS, new_axes
from .theory import panels


def _word(delta: float) -> str:
    return "↑" if delta > 0 else "↓"


def regime_word(dw: float, dl: float) -> str:
    """'both ↓' / 'both ↑' / 'chosen ↑ rejected ↓' / 'chosen ↓ rejected ↑' for two net changes."""
    if dw < 0 and dl < 0:
        return "both ↓"
    if dw > 0 and dl > 0:
        return "both ↑"
    return f"chosen {_word(dw)} rejected {_word(dl)}"


def _curves(a, run, *, relative=True):
    step = np.asarray(run["step"])
    cw, cl = np.asarray(run["chosen"], dtype=float), np.asarray(run["rejected"], dtype=float)
    if relative:
        cw, cl = cw - cw[0], cl - cl[0]
    a.plot(step, cw, color=COLORS["chosen"], label="chosen")
    a.plot(step, cl, color=COLORS["rejected"], ls="--", label="rejected")
    a.axhline(0.0, color=COLORS["neutral"], lw=0.8)
    a.set_xlabel("SGD step")
    a.set_ylabel("Δ mean log-prob (nats)")
    return float(cw[-1]), float(cl[-1])


def plot_fig1(data, *, ax=None):
    """Fig. 1 analogue: DPO on the linear toy policy. Left: rejected gradient norm dominant
    (|g_l|/|g_w| = 2, cos 0.95). Right: chosen dominant (0.5). Mean log-prob change vs step."""
    fig, axes = panels(ax, 2, 2, size=(4.2, 3.3))
    titles = []
    for a, key in zip(axes, data["order"]):
        run = data["runs"][key]
        dw, dl = _curves(a, run)
        r = data["ratios"][key]
        word = regime_word(dw, dl)
        titles.append(word)
        a.set_title(f"|g_l|/|g_w| = {r:g}, cos = {data['cos']:g}: {word}\n"
                    f"(Δchosen {dw:+.2f}, Δrejected {dl:+.2f} nats)", fontsize=9)
        a.legend(fontsize=7)
    fig.suptitle(f"Fig. 1 analogue (toy policy; this project's prediction from R7): DPO on a toy policy: the larger-norm response drags both log-probs "
                 f"(rejected dominant → {titles[0]}; chosen dominant → {titles[1]})", fontsize=9)
    return fig


def plot_algorithms(data, *, ax=None):
    """Algorithm comparison analogue: DPO, IPO, R-DPO, DPOP, SimPO, RRHF on one toy setting
    (linear policy, cos 0.9, |g_l|/|g_w| = 1.5). Each panel states the realised net regime."""
    order = list(data["order"])
    fig, axes = panels(ax, len(order), 3, size=(3.4, 2.8))
    summary = []
    for a, name in zip(axes, order):
        run = data["runs"][name]
        dw, dl = _curves(a, run)
        lab = data["labels"].get(name, name)
        summary.append(f"{lab} {regime_word(dw, dl)}")
        a.set_title(f"{lab}: {regime_word(dw, dl)} (Δ {dw:+.3g} / {dl:+.3g})", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Algorithm comparison (this project's prediction from §4.3). Six losses, one toy setting (cos {data['cos']:g}, |g_l|/|g_w| = {data['ratio']:g}): "
                 + "; ".join(summary), fontsize=8)
    return fig


def plot_suffix_dynamics(data, *, ax=None):
    """Fig. 3 toy analogue (last-layer model, DPO, SGD): mean log-prob change vs step for a
    single differing token (L = 0) and short / long shared suffixes."""
    order = list(data["order"])
    fig, axes = panels(ax, len(order), 3, size=(3.4, 2.9))
    words = []
    for a, key in zip(axes, order):
        run = data["runs"][key]
        dw, dl = _curves(a, run, relative=False)  # already relative to step 0
        words.append(f"{key}: {regime_word(dw, dl)}")
        a.set_title(f"suffix {key}: {regime_word(dw, dl)}\n(Δchosen {dw:+.3g}, Δrejected {dl:+.3g})", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle("Fig. 3 toy analogue (this project's prediction, R17): DPO on the last-layer toy model by shared-suffix length — " + "; ".join(words), fontsize=9)
    return fig


def _heatmap(ax, cos, chosen_tokens, rejected_tokens):
    cos = np.asarray(cos)
    im = ax.imshow(cos, cmap="RdBu_r", vmin=-1.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.figure.colorbar(im, ax=ax, label="cos(g_t(chosen), g_u(rejected))")
    ax.grid(False)
    ct, rt = np.asarray(chosen_tokens), np.asarray(rejected_tokens)
    ax.set_xticks(range(len(rt)), [f"{u}:{int(t)}" for u, t in enumerate(rt)], fontsize=6, rotation=90)
    ax.set_yticks(range(len(ct)), [f"{u}:{int(t)}" for u, t in enumerate(ct)], fontsize=6)
    ax.set_xlabel("rejected token (position:id)")
    ax.set_ylabel("chosen token (position:id)")
    c0 = float(cos[0, 0])
    diag = float(np.mean(np.diag(cos)[1:])) if min(cos.shape) > 1 else float("nan")
    return c0, diag


def plot_token_heatmap(data, *, ax=None):
    """Token × token gradient cosines of one shared-suffix pair on the last-layer model (Fig. 4b toy
    analogue): row/column 0 is the contrastive token, the diagonal pairs matched shared tokens."""
    n = np.asarray(data["cos"]).shape[0]
    fig, ax = new_axes(ax, figsize=(4.8 + 0.12 * n, 4.0 + 0.1 * n))
    c0, diag = _heatmap(ax, data["cos"], data["chosen_tokens"], data["rejected_tokens"])
    ax.set_title(f"Fig. 4b toy analogue (this project): contrastive tokens: cos {c0:+.2f}; matched shared-suffix tokens: mean cos {diag:+.2f}\n"
                 f"(last-layer model, Setting A, suffix L = {int(data['L'])})", fontsize=9)
    return fig


# ------------------------------------------------------------------ tiny transformer (diagnose)

def plot_transformer_logps(data, *, ax=None):
    """Fig. 3 analogue: eval-set mean chosen / rejected log-probs during preference optimisation
    of the tiny transformer, one panel per dataset (1t, short suffix, long suffix)."""
    suffixes = list(data["suffixes"])
    fig, axes = panels(ax, len(suffixes), 3, size=(3.5, 3.0))
    words = []
    for a, sfx in zip(axes, suffixes):
        run = data["runs"][sfx]
        step = np.asarray(run["steps"])
        cw, cl = np.asarray(run["chosen_logp"], float), np.asarray(run["rejected_logp"], float)
        a.plot(step, cw - cw[0], color=COLORS["chosen"], marker="o", ms=3, label="chosen")
        a.plot(step, cl - cl[0], color=COLORS["rejected"], marker="s", ms=3, ls="--", label="rejected")
        a.axhline(0.0, color=COLORS["neutral"], lw=0.8)
        dw, dl = float(cw[-1] - cw[0]), float(cl[-1] - cl[0])
        words.append(f"{sfx}: {regime_word(dw, dl)}")
        a.set_title(f"{sfx}: {regime_word(dw, dl)} (Δ {dw:+.3g} / {dl:+.3g})", fontsize=9)
        a.set_xlabel("preference-optimisation step")
        a.set_ylabel("Δ mean summed log-prob (nats)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Fig. 3 analogue (this project, tiny transformer, synthetic sentiment task, DPO): " + "; ".join(words), fontsize=9)
    return fig


def plot_transformer_cos(data, *, ax=None):
    """Fig. 4a analogue: mean cos(g_w, g_l) over eval pairs vs step for 1t / short / long."""
    fig, ax = new_axes(ax, figsize=(5.4, 3.6))
    colors = {"1t": COLORS["chosen"], "short": COLORS["orange"], "long": COLORS["rejected"]}
    finals = []
    for sfx in data["suffixes"]:
        run = data["runs"][sfx]
        c = np.asarray(run["geometry"]["cos_mean"], float)
        ax.plot(np.asarray(run["steps"]), c, marker="o", ms=3, color=colors.get(sfx), label=sfx)
        finals.append(f"{sfx} {c[-1]:+.2f}")
    ax.axhline(0.0, color=COLORS["neutral"], lw=0.8)
    ax.set_xlabel("preference-optimisation step")
    ax.set_ylabel("cos(g_w, g_l), mean over eval pairs")
    ax.legend(title="dataset", fontsize=7)
    ax.set_title("Fig. 4a analogue (this project): final gradient cosine by dataset: " + ", ".join(finals), fontsize=9)
    return fig


def plot_transformer_heatmap(data, *, ax=None):
    """Fig. 4b analogue: token-level gradient cosines of one long-suffix eval pair (tiny transformer)."""
    sfx = "long" if "long" in data["runs"] else list(data["runs"])[-1]
    run = data["runs"][sfx]
    n = np.asarray(run["token_cos"]).shape[0]
    fig, ax = new_axes(ax, figsize=(4.8 + 0.12 * n, 4.0 + 0.1 * n))
    c0, diag = _heatmap(ax, run["token_cos"], run["chosen_tokens"], run["rejected_tokens"])
    ax.set_title(f"Fig. 4b analogue (this project): tiny transformer, {sfx} suffix: contrastive tokens cos {c0:+.2f}; "
                 f"matched shared tokens mean cos {diag:+.2f}", fontsize=9)
    return fig


# ------------------------------------------------------------------ mitigations

def plot_mitigation_comparison(data, *, ax=None):
    """Mitigation comparison (R19, R20): realised fraction of (step, pair) changes in the ideal
    regime (left) and one-pair first-order prediction of it (right), per setting and method.
    Bars by `plotting.mitigations.plot_comparison`; titles state the finding."""
    rows = data["rows"]
    fig, (a1, a2) = panels(ax, 2, 2, size=(6.0, 3.6))
    plot_comparison(rows, metric="ideal_fraction", ax=a1)
    plot_comparison(rows, metric="pair_pred_ideal_fraction", ax=a2)
    a1.set_ylabel("realised ideal fraction (chosen ↑, rejected ↓)")
    a2.set_ylabel("one-pair predicted ideal fraction")
    for a in (a1, a2):
        a.set_xlabel("toy setting")
        a.set_ylim(0, 1.4)
        a.set_yticks(np.linspace(0, 1, 6))
        a.legend(fontsize=7, ncol=4, loc="upper center")

    def mean(method, key):
        v = [r[key] for r in rows if r["method"] == method]
        return float(np.mean(v)) if v else float("nan")

    a1.set_title(f"Realised: normalized {mean('normalized', 'ideal_fraction'):.2f} vs baseline "
                 f"{mean('baseline', 'ideal_fraction'):.2f} (mean over settings)", fontsize=9)
    a2.set_title(f"One-pair theory: normalized {mean('normalized', 'pair_pred_ideal_fraction'):.2f} "
                 f"vs baseline {mean('baseline', 'pair_pred_ideal_fraction'):.2f}", fontsize=9)
    fig.suptitle("Mitigations (derived in this project; SGD, DPO): pairwise normalization makes every one-pair step ideal (R19); "
                 "realised steps also carry cross-pair terms", fontsize=9)
    return fig
