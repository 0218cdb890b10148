"""Measure a set of tokenised pairs: log-probs, lengths, per-pair Gram; batch-level predictions."""
from __future__ import annotations

import numpy as np
import torch

from .data import collate
from .geometry import directional, pair_gram


def measure_pairs(model, examples: list[dict], pad_token_id: int, *, subset=None, method: str = "auto",
                  batch_size: int = 8, max_length: int | None = 1024, progress=None) -> dict[str, np.ndarray]:
    """Per pair (numpy [B]): chosen/rejected log-probs and lengths, prompt length, G_ww, G_wl, G_ll,
    cos, rho_w, rho_l, rho. `progress(n)` is called after each batch of n pairs."""
    cols: dict[str, list] = {}
    for s in range(0, len(examples), batch_size):
        exs = examples[s:s + batch_size]
        batch = collate(exs, pad_token_id, max_length=max_length)
        g, (lw, ll) = pair_gram(model, batch, subset=subset, method=method, chunk_size=batch_size,
                                return_logps=True)
        cm = batch["completion_mask"]
        B = len(exs)
        part = {"chosen_logps": lw, "rejected_logps": ll, "chosen_len": cm[:B].sum(1), "rejected_len": cm[B:].sum(1),
                "prompt_len": torch.tensor([len(e["prompt_ids"]) for e in exs]), **g._asdict()}
        for k, v in part.items():
            cols.setdefault(k, []).append(v.detach().double().numpy())
        if progress is not None:
            progress(B)
    return {k: np.concatenate(v) for k, v in cols.items()}


def batch_prediction(model, examples: list[dict], pad_token_id: int, c_w, c_l, *, subset=None,
                     batch_size: int = 8, max_length: int | None = 1024) -> tuple[np.ndarray, np.ndarray]:
    """First-order changes (per unit step) of every chosen and rejected log-prob for the step
    theta += sum_j (c_w[j] g_w,j - c_l[j] g_l,j)  (c = incentives / B for a mean loss).

    Uses the full 2B x 2B response Gram implicitly: delta_i = sum_j w_j <g_i, g_j>.
    """
    batch = collate(examples, pad_token_id, max_length=max_length)
    w = torch.cat([torch.as_tensor(np.asarray(c_w), dtype=torch.float64),
                   -torch.as_tensor(np.asarray(c_l), dtype=torch.float64)])
    d = directional(model, batch, w, subset=subset, chunk_size=2 * batch_size).double().numpy()
    B = len(examples)
    return d[:B], d[B:]
