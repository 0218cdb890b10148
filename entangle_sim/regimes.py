"""Co-movement regimes of (chosen, rejected) log-probability changes (docs/theory.md §3.1, R4/R9).

Integer codes are used inside jitted code; `REGIMES[code]` is the name. A change within `tol`
of zero counts as zero; both zero is `stationary`.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

REGIMES = ("chosen_up_rejected_down", "both_up", "both_down", "chosen_down_rejected_up", "stationary")
CHOSEN_UP_REJECTED_DOWN, BOTH_UP, BOTH_DOWN, CHOSEN_DOWN_REJECTED_UP, STATIONARY = range(5)

# Which of the three paper cases each regime is (Table 1); the fourth is impossible when d_w, d_l >= 0.
CASE_OF_REGIME = {"chosen_up_rejected_down": "Case 1 (ideal)", "both_down": "Case 2",
                  "both_up": "Case 3", "chosen_down_rejected_up": "impossible if d_w, d_l >= 0",
                  "stationary": "no first-order change"}


def classify(delta_chosen, delta_rejected, tol=0.0):
    """Regime code (int array) of the changes; works on numpy and JAX arrays, any shape.

    A change with |delta| <= tol is treated as 0. A zero side takes the ideal direction:

        w \\ l     up         zero        down
        up      both_up      ideal       ideal
        zero    both_up      stationary  ideal
        down    4th regime   both_down   both_down
    """
    xp = jnp if not isinstance(delta_chosen, np.ndarray) and hasattr(delta_chosen, "at") else np
    w = xp.where(xp.abs(delta_chosen) <= tol, 0, xp.sign(delta_chosen))
    l = xp.where(xp.abs(delta_rejected) <= tol, 0, xp.sign(delta_rejected))
    code = xp.where(
        (w == 0) & (l == 0), STATIONARY,
        xp.where(
            (w >= 0) & (l <= 0), CHOSEN_UP_REJECTED_DOWN,
            xp.where((w >= 0) & (l > 0), BOTH_UP,
                     xp.where((w < 0) & (l <= 0), BOTH_DOWN, CHOSEN_DOWN_REJECTED_UP))))
    return code


def names(codes) -> list[str]:
    """Regime names for an iterable of integer codes."""
    return [REGIMES[int(c)] for c in np.asarray(codes).ravel()]


def fractions(codes) -> dict[str, float]:
    """Fraction of entries per regime name (all five keys present)."""
    c = np.asarray(codes).ravel()
    n = max(c.size, 1)
    return {name: float((c == i).sum()) / n for i, name in enumerate(REGIMES)}


def sign_agreement_counts(pred_w, pred_l, real_w, real_l, level_w, level_l, noise=None):
    """(agree, counted): how many changes have the realised sign of their prediction.

    Only changes whose |prediction| exceeds the rounding of a log-prob difference count:
    `noise` when given, else 100 eps (1 + |level|) with `level` the log-prob before the step (in
    float32 that is ~1e-5 at l ~ -10). Works on numpy and on traced JAX arrays (any matching
    shapes); returns array scalars of the input's kind.

        >>> import numpy as np
        >>> a, n = sign_agreement_counts(np.array([1., -1e-20]), np.array([-1.]), np.array([2., 5.]),
        ...                              np.array([1.]), np.zeros(2), np.zeros(1))
        >>> int(a), int(n)
        (1, 2)
    """
    xp = jnp if any(not isinstance(x, np.ndarray) and hasattr(x, "at") for x in (pred_w, real_w)) else np
    agree = counted = 0
    for pred, real, level in ((pred_w, real_w, level_w), (pred_l, real_l, level_l)):
        pred, real, level = xp.asarray(pred), xp.asarray(real), xp.asarray(level)
        thr = noise if noise is not None else 100 * xp.finfo(pred.dtype).eps * (1 + xp.abs(level))
        sel = xp.abs(pred) > thr
        agree = agree + xp.sum(sel & (xp.sign(pred) == xp.sign(real)))
        counted = counted + xp.sum(sel)
    return agree, counted


def sign_agreement(pred_w, pred_l, real_w, real_l, level_w, level_l, noise=None) -> tuple[float, int]:
    """(fraction, counted) of `sign_agreement_counts` as Python numbers; NaN when nothing counts."""
    agree, counted = sign_agreement_counts(pred_w, pred_l, real_w, real_l, level_w, level_l, noise)
    counted = int(counted)
    return (int(agree) / counted if counted else float("nan")), counted


#: The one run-summary schema. Every summary of a run — `train.summarize` (and `simulate`),
#: `mitigations.summarize`, `diagnose.summarize`, `logs.summarize` — carries these keys with these
#: meanings, filled by `run_summary`; a key the source cannot tell is None (e.g. no loss in a log).
#: Each summary adds its own keys after these.
RUN_SUMMARY = {
    "regime_fractions": "fraction of realised changes (per step and pair, or per logged interval) in each regime",
    "mean_delta_chosen": "mean over pairs of l_w(end) - l_w(start)",
    "mean_delta_rejected": "mean over pairs of l_l(end) - l_l(start)",
    "mean_delta_margin": "mean_delta_chosen - mean_delta_rejected",
    "sign_agreement": "fraction of realised changes with the sign of the first-order prediction of the actual "
                      "update (see sign_agreement); None without a prediction",
    "sign_agreement_n": "how many changes that fraction counts",
    "final_loss": "mean loss at the last step; None where no loss is recorded",
}


def run_summary(levels_w, levels_l, real_w, real_l, *, pred=None, loss=None, final=None, tol=0.0,
                noise=None) -> dict:
    """The `RUN_SUMMARY` keys of a run, as plain floats.

    levels_w, levels_l: log-probs before each step [..., S, B] (steps on axis -2; leading axes = runs);
    real_w, real_l: realised changes of each step [..., S, B]; pred: (pred_w, pred_l) first-order
    predictions of the same changes, or None; loss: [..., S, B] per-pair loss before each step, or
    None; final: (l_w, l_l) after the last step (default levels[-1] + real[-1]); tol: a change within
    tol is none (`classify`); noise: see `sign_agreement`.

        >>> import numpy as np
        >>> lw, ll = np.array([[0.], [.1]]), np.array([[0.], [-.1]])       # levels before each of 2 steps
        >>> s = run_summary(lw, ll, np.array([[.1], [.2]]), np.array([[-.1], [.1]]))
        >>> s["regime_fractions"]["both_up"], round(s["mean_delta_margin"], 12)
        (0.5, 0.3)
    """
    lw, ll = np.asarray(levels_w), np.asarray(levels_l)
    rw, rl = np.asarray(real_w), np.asarray(real_l)
    if final is None and lw.shape[-2]:
        final = (lw[..., -1, :] + rw[..., -1, :], ll[..., -1, :] + rl[..., -1, :])
    fw, fl = (None, None) if final is None else (np.asarray(final[0]), np.asarray(final[1]))
    out = {"regime_fractions": fractions(classify(rw, rl, tol))}
    if lw.shape[-2] == 0:   # no step: nothing moved
        out["mean_delta_chosen"] = out["mean_delta_rejected"] = 0.0
    else:
        out["mean_delta_chosen"] = float(np.mean(fw - lw[..., 0, :]))
        out["mean_delta_rejected"] = float(np.mean(fl - ll[..., 0, :]))
    out["mean_delta_margin"] = out["mean_delta_chosen"] - out["mean_delta_rejected"]
    if pred is None:
        out["sign_agreement"], out["sign_agreement_n"] = None, None
    else:
        out["sign_agreement"], out["sign_agreement_n"] = sign_agreement(pred[0], pred[1], rw, rl, lw, ll, noise)
    out["final_loss"] = None if loss is None or np.asarray(loss).shape[-2] == 0 else \
        float(np.mean(np.asarray(loss)[..., -1, :]))
    return out
