"""The symbolic engine's per-pair predictions evaluated on measured log-probs and Grams.

For a loss L(l_w, l_l) the incentives are d_w = -dL/dl_w, d_l = dL/dl_l, and one gradient step
theta -= eta dL/dtheta on that pair alone changes the log-probs to first order by

    delta_chosen   = eta (d_w G_ww - d_l G_wl),      delta_rejected = eta (d_w G_wl - d_l G_ll)

(derived in this project from the chain rule; the formulas and the regime come from
`entangle_sim.symbolic.derive(entangle_sim.losses.get(name))`). For one step on the mean loss over
B pairs, response i moves by eta * sum_j c_j <g_i, g_j> with c = (d_w / B for chosen, -d_l / B for
rejected) - the batch-level prediction.
"""
from __future__ import annotations

import numpy as np


def loss_spec(name: str):
    """Registered loss by name or alias; refuses losses whose per-pair theory is not defined here."""
    from .. import losses

    spec = losses.get(name)
    if spec.batch_coupled:
        raise ValueError(f"loss {spec.name!r} couples the pairs of a batch; its per-pair prediction is "
                         "not defined (choose a per-pair loss)")
    return spec


def evaluate(name: str, *, chosen_logps, rejected_logps, chosen_len, rejected_len, G_ww, G_wl, G_ll,
             ref_chosen_logps=None, ref_rejected_logps=None, prompt_len=None, eta: float = 1.0, **hp) -> dict:
    """d_w, d_l, delta_chosen, delta_rejected (numpy [B]) and regime names for loss `name`.

    Reference log-probs default to 0 (no reference model: the loss sees the raw log-probs).
    Hyperparameters not given take the registry defaults (e.g. beta = 0.1).
    """
    from .. import regimes, symbolic

    spec = loss_spec(name)
    hpv = spec.resolve(**hp)
    structural = {h.name: hpv[h.name] for h in spec.hypers if h.structural}
    der = symbolic.derive(spec, **structural)
    B = len(np.atleast_1d(chosen_logps))

    def arr(x, default=0.0):
        return np.broadcast_to(np.asarray(default if x is None else x, dtype=float), (B,))

    vals = {"chosen_logps": arr(chosen_logps), "rejected_logps": arr(rejected_logps),
            "ref_chosen_logps": arr(ref_chosen_logps), "ref_rejected_logps": arr(ref_rejected_logps),
            "chosen_len": arr(chosen_len), "rejected_len": arr(rejected_len),
            "prompt_len": arr(prompt_len), "G_ww": arr(G_ww), "G_wl": arr(G_wl), "G_ll": arr(G_ll),
            "eta": float(eta)}
    vals.update({k: v for k, v in hpv.items() if k not in structural})
    needed = set(der.delta_chosen.arg_names) | set(der.delta_rejected.arg_names)
    if "prompt_logps" in needed:
        raise ValueError(f"loss {spec.name!r} needs the prompt log-prob, which is not measured here")
    out = {k: np.asarray(getattr(der, k)(**vals), dtype=float) for k in ("d_w", "d_l", "delta_chosen",
                                                                        "delta_rejected")}
    out = {k: np.broadcast_to(v, (B,)).copy() for k, v in out.items()}
    out["regime"] = regimes.names(regimes.classify(out["delta_chosen"], out["delta_rejected"]))
    out["loss"] = spec.name
    return out
