"""Group-entanglement figures (derived in this project): `plot_*(data, *, ax=None) -> Figure`.

Data come from `entangle_sim.group.toys.lld_data` and `eta_rate_data`.
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
