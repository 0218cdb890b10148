"""Measure a set of tokenised pairs: log-probs, lengths, per-pair Gram; batch-level predictions.

Thin functional forms of `session.MeasurementSession` (kept for existing callers)."""
from __future__ import annotations

import numpy as np

from .session import MeasurementSession


def measure_pairs(model, examples: list[dict], pad_token_id: int, *, subset=None, method: str = "auto",
                  batch_size: int = 8, max_length: int | None = 1024, progress=None) -> dict[str, np.ndarray]:
    """Per pair (numpy [B]): chosen/rejected log-probs and lengths, prompt length, G_ww, G_wl, G_ll,
    cos, rho_w, rho_l, rho. `progress(n)` is called after each batch of n pairs."""
    s = MeasurementSession(model, pad_token_id=pad_token_id, subset=subset, method=method,
                           batch_size=batch_size, max_length=max_length)
    return s.measure(examples, progress=progress)


def batch_prediction(model, examples: list[dict], pad_token_id: int, c_w, c_l, *, subset=None,
                     method: str = "auto", batch_size: int = 8,
                     max_length: int | None = 1024) -> tuple[np.ndarray, np.ndarray]:
    """First-order changes (per unit step) of every chosen and rejected log-prob for the step
    theta += sum_j (c_w[j] g_w,j - c_l[j] g_l,j)  (c = incentives / B for a mean loss).

    Uses the full 2B x 2B response Gram implicitly: delta_i = sum_j w_j <g_i, g_j>.
    """
    s = MeasurementSession(model, pad_token_id=pad_token_id, subset=subset, method=method,
                           batch_size=batch_size, max_length=max_length)
    return s.predict(examples, c_w, c_l)
