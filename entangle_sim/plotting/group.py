"""Group-entanglement figures (derived in this project): `plot_*(data, *, ax=None) -> Figure`.

Data come from `entangle_sim.group.toys.lld_data` and `eta_rate_data`, and (`plot_rollout_*`) from
`entangle_sim.torch.rollouts.diagnose_rollouts`.
"""
from __future__ import annotations

import numpy as np

from .style import CYCLE, COLORS
from .theory import panels


def plot_group_lld(data, *, ax=None):
    """Cumulative log-prob change of each rollout of the toy group, without (left) and with (right)
    the shared-token mitigation: the correct rollout sharing tokens with incorrect ones falls, then rises."""
    fig, axes = panels(ax, 2, 2, size=(4.2, 3.3))
    for a, key, title in zip(axes, ("plain", "mitigated"),
                             (f"{data['loss_type']}: lazy likelihood displacement",
                              f"shared-token mitigation (strength {data['strength']:g})")):
        y = np.asarray(data[key])
        for i, lab in enumerate(data["labels"]):
            a.plot(np.arange(y.shape[0]), y[:, i], color=CYCLE[i % len(CYCLE)],
                   ls="-" if data["rewards"][i] > np.mean(data["rewards"]) else "--", label=f"{i}: {lab}")
        a.axhline(0.0, color=COLORS["neutral"], lw=0.8)
        a.set_xlabel("SGD step")
        a.set_ylabel("Δ log-prob (nats)")
        a.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    return fig


def plot_group_eta_rate(data, *, ax=None):
    """Max |realised - eta K w| after one step vs eta (log-log), per loss type, with a slope-2 guide."""
    fig, (a,) = panels(ax, 1, 1, size=(4.2, 3.3))
    etas = np.asarray(data["etas"])
    for i, (lt, errs) in enumerate(data["errors"].items()):
        a.loglog(etas, errs, "o-", color=CYCLE[i % len(CYCLE)], label=lt, ms=3)
    ref = np.asarray(next(iter(data["errors"].values())))
    a.loglog(etas, ref[0] * (etas / etas[0]) ** 2, color=COLORS["neutral"], ls=":", label="slope 2")
    a.set_xlabel("η")
    a.set_ylabel("max |realised − ηKw|")
    a.legend(fontsize=7, ncols=2)
    return fig


def plot_rollout_deltas(rollouts, *, ax=None):
    """Predicted change eta (K w)_i of each completion (from `entangle_sim.torch.rollouts.diagnose_rollouts`)
    against its advantage: correct completions (A > 0) below zero are predicted to fall."""
    fig, (a,) = panels(ax, 1, 1, size=(4.6, 3.4))
    A = np.array([r["advantage"] for r in rollouts], float)
    d = np.array([r["delta"] for r in rollouts], float)
    g = np.array([r["group"] for r in rollouts])
    for k, gi in enumerate(np.unique(g)):
        m = g == gi
        a.scatter(A[m], d[m], s=14, color=CYCLE[k % len(CYCLE)], label=f"group {gi}" if k < 8 else None)
    a.axhline(0.0, color=COLORS["neutral"], lw=0.8)
    a.axvline(0.0, color=COLORS["neutral"], lw=0.8)
    a.set_xlabel("advantage A_i")
    a.set_ylabel("predicted Δ log-prob  η(Kw)_i")
    a.set_title("correct completions below 0 are predicted to fall", fontsize=9)
    if len(np.unique(g)) > 1:
        a.legend(fontsize=7, ncols=2)
    return fig


def plot_rollout_spectra(groups, *, ax=None):
    """Eigenvalues of diag(|w|)^1/2 K diag(|w|)^1/2 per group (largest first, normalised by the largest),
    with each group's effective rank (participation ratio) in the legend; zero-variance groups left out."""
    fig, (a,) = panels(ax, 1, 1, size=(4.6, 3.4))
    k = 0
    for g in groups:
        ev = np.asarray(g["eigenvalues"], float)
        if g["zero_variance"] or ev.size == 0 or ev[0] <= 0:
            continue
        a.semilogy(np.arange(1, ev.size + 1), np.clip(ev / ev[0], 1e-12, None), "o-", ms=3,
                   color=CYCLE[k % len(CYCLE)],
                   label=f"group {g['group']}: rank {g['effective_rank']:.2f}" if k < 8 else None)
        k += 1
    a.set_xlabel("eigenvalue index")
    a.set_ylabel("λ_k / λ_1")
    a.set_title("spectrum of diag(|w|)^½ K diag(|w|)^½", fontsize=9)
    if k:
        a.legend(fontsize=7)
    return fig
