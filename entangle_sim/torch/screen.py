"""Forward-only screen: the CHES score of Razin et al. (2024, "Unintentional Unalignment: Likelihood
Displacement in Direct Preference Optimization"), to pick the pairs worth an exact Gram.

With h_t the model's last hidden state at the positions whose outputs predict the completion tokens
(the last prompt token through the second-to-last completion token; n of them for n completion
tokens), and S+ / S- their sums over the chosen / rejected completion:

    CHES    = <S+, S-> - |S+|^2
    ln-CHES = <S+, S-> / (n+ n-) - |S+|^2 / n+^2

(the paper's definitions; larger = more likelihood displacement of the chosen response expected).
One forward pass per response, no gradient: orders of magnitude cheaper than the Gram.

    s = ches_scores(model, examples, pad_token_id)         # {'ches': [N], 'ln_ches': [N]}
    keep = select_top(s["ln_ches"], k=100)                  # indices of the 100 highest scores
    rank_correlation(s["ln_ches"][keep], measured["rho"])   # Spearman, on the measured pairs
"""
from __future__ import annotations

import numpy as np
import torch

from .data import collate


def hidden_sums(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, D] sums of the last hidden states over the completion-predicting positions, [N] counts)."""
    ids, am, cm = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    out = model(input_ids=ids, attention_mask=am, output_hidden_states=True, use_cache=False)
    h = out.hidden_states[-1]
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    # position t predicts token t+1: the mask of predicting positions is the completion mask shifted left
    pred = torch.zeros_like(cm)
    pred[:, :-1] = cm[:, 1:]
    w = pred.to(acc)
    return (h.to(acc) * w.unsqueeze(-1)).sum(1), w.sum(1)


@torch.no_grad()
def ches_batch(model, batch) -> dict[str, np.ndarray]:
    """CHES and ln-CHES (numpy float64 [B]) of one TRL-collated batch ([2B, S], chosen rows first)."""
    was = model.training
    model.eval()
    try:
        S, n = hidden_sums(model, batch)
    finally:
        model.train(was)
    B = S.shape[0] // 2
    sp, sm, n_p, n_m = S[:B], S[B:], n[:B], n[B:]
    cross = (sp * sm).sum(1)
    own = (sp * sp).sum(1)
    return {"ches": (cross - own).double().numpy(),
            "ln_ches": (cross / (n_p * n_m) - own / n_p ** 2).double().numpy()}


def ches_scores(model, examples: list[dict], pad_token_id: int, *, batch_size: int = 16,
                max_length: int | None = 1024, progress=None) -> dict[str, np.ndarray]:
    """CHES and ln-CHES of tokenised examples (`tokenize_rows` output), `batch_size` pairs per forward."""
    cols: dict[str, list] = {"ches": [], "ln_ches": []}
    for s in range(0, len(examples), batch_size):
        exs = examples[s:s + batch_size]
        r = ches_batch(model, collate(exs, pad_token_id, max_length=max_length))
        for k in cols:
            cols[k].append(r[k])
        if progress is not None:
            progress(len(exs))
    return {k: np.concatenate(v) for k, v in cols.items()}


def select_top(scores, k: int) -> np.ndarray:
    """Indices of the k largest scores (ties: lower index first), in decreasing score order."""
    k = int(k)
    if k <= 0:
        raise ValueError(f"--screen K must be >= 1, got {k}")
    scores = np.asarray(scores, dtype=float)
    return np.argsort(-scores, kind="stable")[:min(k, scores.size)]


def rank_correlation(x, y) -> float:
    """Spearman rank correlation (scipy.stats.spearmanr; NaN for fewer than 3 pairs or a constant input)."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def screen_and_measure(model, examples: list[dict], pad_token_id: int, k: int, *, score: str = "ln_ches",
                       batch_size: int = 8, max_length: int | None = 1024, **measure_kw) -> dict:
    """`--screen K`: CHES-score every pair, measure the exact Gram (`measure.measure_pairs`) on the K
    highest `score` ('ches' or 'ln_ches') only. Returns {'index': [K] row indices (best first),
    'scores': {'ches', 'ln_ches'} over all pairs, 'measured': columns over the K pairs,
    'spearman': {'ches', 'ln_ches'} rank correlation with the exact rho on the measured pairs}."""
    from .measure import measure_pairs

    if score not in ("ches", "ln_ches"):
        raise ValueError(f"score must be 'ches' or 'ln_ches', got {score!r}")
    s = ches_scores(model, examples, pad_token_id, batch_size=batch_size, max_length=max_length)
    idx = select_top(s[score], k)
    m = measure_pairs(model, [examples[i] for i in idx], pad_token_id, batch_size=batch_size, max_length=max_length,
                      **measure_kw)
    return {"index": idx, "scores": s, "measured": m,
            "spearman": {x: rank_correlation(s[x][idx], m["rho"]) for x in ("ches", "ln_ches")}}
