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
