"""One-step first-order prediction for a group (or micro-batch of groups) of rollouts.

    delta = eta K w        K [B, B] Gram of the rollouts' summed log-prob gradients, w = rollout weights

(derived in this project; docs/theory.md, "Group entanglement"). Inputs are the things a measured
run provides: rewards and completion lengths of B sequences, a Gram K (default the identity, so
delta = eta w), the step size and TRL's hyperparameters by TRL's names. The result carries
advantages, weights, the predicted change and regime per rollout, zero-variance flags and the
spectrum of diag(|w|)^1/2 K diag(|w|)^1/2 (the Gram of the weighted gradients sqrt|w_i| g_i).

Example:
    >>> out = predict("grpo", [1.0, 0.0, 0.0, 0.0], [3, 3, 3, 3], K=[[2, 1.9, 1.9, 1.9], [1.9, 2, 1.9, 1.9],
    ...               [1.9, 1.9, 2, 1.9], [1.9, 1.9, 1.9, 2]], eta=1.0)
    >>> out["rises"]
    [True, False, False, False]
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import losses as gl

#: Largest G x max(length) accepted (a float64 mask of this many entries is 128 MiB).
MAX_TOKENS = 2**24

#: Regime of a rollout: its advantage's sign and its predicted direction.
REGIMES = ("correct_rises", "correct_falls", "incorrect_falls", "incorrect_rises", "neutral")


def check_inputs(rewards, lens, K=None, eta: float = 1.0, num_generations: int | None = None):
    """Validated (rewards [B] float, lens [B] int, K [B, B] float, eta, G); ValueError on bad input."""
    r = np.asarray(rewards, dtype=np.float64).ravel()
    n = np.asarray(lens, dtype=np.float64).ravel()
    if r.size != n.size:
        raise ValueError(f"rewards and lengths must have one entry per completion: got {r.size} rewards and "
                         f"{n.size} lengths")
    if r.size < 2:
        raise ValueError(f"a group needs G >= 2 completions, got {r.size}")
    if not np.all(np.isfinite(r)):
        raise ValueError(f"rewards must be finite, got {r.tolist()}")
    if not np.all(np.isfinite(n)) or np.any(n < 1) or np.any(n != np.round(n)):
        raise ValueError(f"lengths must be positive integers (completion tokens), got {n.tolist()}")
    if np.abs(r).max() > 1e150:   # squares of the centred rewards would overflow in the std
        raise ValueError(f"rewards must be below 1e150 in magnitude, got {np.abs(r).max():g}")
    if n.max() * n.size > MAX_TOKENS:
        raise ValueError(f"G x max(length) must be at most {MAX_TOKENS} tokens (the weights are computed on a "
                         f"G x max(length) mask), got {n.size} x {int(n.max())}")
    G = r.size if num_generations is None else int(num_generations)
    if G < 2 or r.size % G:
        raise ValueError(f"num_generations must be >= 2 and divide the {r.size} completions, got {num_generations}")
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta > 0):
        raise ValueError(f"eta must be a positive finite number, got {eta!r}")
    if K is None:
        K = np.eye(r.size)
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (r.size, r.size):
        raise ValueError(f"the Gram matrix must be {r.size}x{r.size} (one row per completion), got shape {K.shape}")
    if not np.all(np.isfinite(K)):
        raise ValueError("the Gram matrix must be finite")
    scale = max(float(np.abs(K).max()), 1e-300)
    if np.abs(K - K.T).max() > 1e-9 * scale:
        raise ValueError("the Gram matrix must be symmetric (K_ij = <g_i, g_j>)")
    if np.linalg.eigvalsh(K).min() < -1e-9 * scale:
        raise ValueError("the Gram matrix must be positive semidefinite (K_ij = <g_i, g_j>)")
    return r, n.astype(int), K, float(eta), G


def spectrum(K, w) -> np.ndarray:
    """Eigenvalues (descending) of diag(|w|)^1/2 K diag(|w|)^1/2 on the rollouts with w_i != 0."""
    K, w = np.asarray(K, float), np.asarray(w, float)
    keep = w != 0
    s = np.sqrt(np.abs(w[keep]))
    return np.sort(np.linalg.eigvalsh(s[:, None] * K[np.ix_(keep, keep)] * s[None, :]))[::-1]


def effective_rank(eigenvalues) -> float:
    """Participation ratio (sum lam)^2 / sum lam^2 of non-negative eigenvalues (0 if all vanish):
    1 for one direction, k for k equal ones (this project's choice of effective rank)."""
    lam = np.clip(np.asarray(eigenvalues, float), 0, None)
    s2 = float((lam ** 2).sum())
    return float(lam.sum() ** 2 / s2) if s2 > 0 else 0.0


def regimes(advantages, delta) -> list[str]:
    """Per rollout: correct (A > 0) / incorrect (A < 0) and whether delta rises; 'neutral' for A = 0."""
    out = []
    for a, d in zip(np.asarray(advantages), np.asarray(delta)):
        if a > 0:
            out.append("correct_rises" if d > 0 else "correct_falls")
        elif a < 0:
            out.append("incorrect_falls" if d < 0 else "incorrect_rises")
        else:
            out.append("neutral")
    return out


def predict(loss_type: str, rewards, lens, K=None, eta: float = 1.0, *, num_generations: int | None = None,
            **trl_params) -> dict[str, Any]:
    """First-order one-step prediction delta = eta K w for B completions (one or several groups).

    rewards [B], lens [B] (completion tokens), K [B, B] (default identity), eta > 0; num_generations
    default B (one group); trl_params: TRL's names (`scale_rewards`, `max_completion_length`,
    `num_items_in_batch`, `epsilon`, `epsilon_high`, `beta`, ...). At the on-policy step with the
    policy equal to the reference (the KL term has no gradient there).
    Returns plain lists/floats: advantages, weights, delta, rises, regimes, zero_variance (per group:
    all its rewards equal, TRL's frac_reward_zero_std), wKw (= sum_i w_i delta_i / eta >= 0),
    eigenvalues, effective_rank, params.
    """
    gl.check_loss_type(loss_type)
    r, n, K, eta, G = check_inputs(rewards, lens, K, eta, num_generations)
    p = gl.resolve(loss_type, **trl_params)
    A, zero = gl.advantages(r, G, p["scale_rewards"])
    w = gl.rollout_weights(loss_type, A, n, **trl_params)
    with np.errstate(over="ignore", invalid="ignore"):
        delta = eta * K @ w
    if not (np.all(np.isfinite(w)) and np.all(np.isfinite(delta))):
        raise ValueError("the prediction overflows at these inputs (non-finite weights or delta); use a smaller "
                         "eta, Gram or hyperparameters")
    ev = spectrum(K, w)
    zero_groups = zero.reshape(-1, G)[:, 0]
    return {"loss_type": loss_type, "advantages": A.tolist(), "weights": w.tolist(), "delta": delta.tolist(),
            "rises": [bool(d > 0) for d in delta], "regimes": regimes(A, delta),
            "zero_variance": bool(zero_groups[0]) if zero_groups.size == 1 else [bool(z) for z in zero_groups],
            "wKw": float(w @ K @ w), "eigenvalues": ev.tolist(), "effective_rank": effective_rank(ev),
            "eta": eta, "params": {k: v for k, v in p.items()}}
