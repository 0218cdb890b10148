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
             ref_chosen_logps=None, ref_rejected_logps=None, reference: str | None = None, prompt_len=None,
             eta: float = 1.0, **hp) -> dict:
    """d_w, d_l, delta_chosen, delta_rejected (numpy [B], float64) and regime names for loss `name`.

    The loss is resolved once (`losses.get(name).bind(**hp)`: a misspelt hyperparameter is an error;
    those not given take the registry defaults, e.g. beta = 0.1) and evaluated on one `PairState`.
    The reference is explicit: the measured `ref_chosen_logps` / `ref_rejected_logps`, or
    `reference="self"` (the policy is its own reference: DPOTrainer with ref_model=None at step 0)
    or `reference="none"` (raw log-probs). A loss that reads no reference needs none of them.
    """
    import jax

    from .. import regimes
    from ..types import PairState

    spec = loss_spec(name)
    loss = spec.bind(**hp)
    B = len(np.atleast_1d(chosen_logps))

    def arr(x):
        return np.broadcast_to(np.asarray(x, dtype=float), (B,))

    if ref_chosen_logps is not None or ref_rejected_logps is not None:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError("give both ref_chosen_logps and ref_rejected_logps, or neither")
        if reference is not None:
            raise ValueError("give the reference log-probs or reference=..., not both")
        ref = (arr(ref_chosen_logps), arr(ref_rejected_logps))
    elif reference is not None:
        ref = reference
    elif not spec.uses_reference:
        ref = "none"   # the loss never reads it
    else:
        raise ValueError(f"loss {spec.name!r} reads reference log-probs: give ref_chosen_logps and "
                         "ref_rejected_logps, or reference='self' / 'none' explicitly")
    needed = set(loss.derivation.delta_chosen.arg_names) | set(loss.derivation.delta_rejected.arg_names)
    if "prompt_logps" in needed:
        raise ValueError(f"loss {spec.name!r} needs the prompt log-prob, which is not measured here")
    with jax.enable_x64(True):   # measured in float64: keep the prediction in float64 too
        state = PairState.of(arr(chosen_logps), arr(rejected_logps), reference=ref, chosen_len=arr(chosen_len),
                             rejected_len=arr(rejected_len), prompt_len=arr(0.0 if prompt_len is None else prompt_len))
        pred = loss.predict(state, (arr(G_ww), arr(G_wl), arr(G_ll)), float(eta))
        out = {k: np.asarray(getattr(pred, k), dtype=float).copy()
               for k in ("d_w", "d_l", "delta_chosen", "delta_rejected")}
    out["regime"] = regimes.names(pred.regime)
    out["loss"] = spec.name
    return out
