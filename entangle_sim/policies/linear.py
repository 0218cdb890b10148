"""Log-linear (linear-feature) policy with frozen features.

    pi(y | x) = exp(theta . phi(x, y)) / sum_k exp(theta . phi(x, k)),   params: theta [d]

Gradient of one response: g(y|x) = phi(x, y) - phibar(x), phibar(x) = sum_k pi(k|x) phi(x, k),
so G_wl = <phi_a - phibar, phi_b - phibar> can take any sign and any norm ratio (unlike the tabular
policy, R15) -- this is the toy model for Cases 2 and 3 (theory R4, R7).

Features phi [P, K, d] are either passed to `make` or drawn from `feature_seed` as
feature_scale * N(0, 1) / sqrt(d); they are frozen and closed over (not a parameter).

Batch convention: same as the tabular policy (prompt[:,0] = prompt index, chosen[:,0] /
rejected[:,0] = response indices, masks ones [B,1]); token_logps returns ([B,1], [B,1]).

Example:
    >>> pol = make(LinearConfig(P=2, K=4, d=3))
    >>> theta = pol.init(jax.random.PRNGKey(0))
    >>> theta.shape
    (3,)
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from ..types import Array, PairBatch, Policy


@dataclass(frozen=True)
class LinearConfig:
    """P prompts, K responses, d features. theta init = init_scale * N(0, 1) (0 gives uniform pi)."""

    P: int
    K: int
    d: int
    feature_seed: int = 0
    feature_scale: float = 1.0
    init_scale: float = 0.0

    def __post_init__(self):
        if int(self.P) < 1:
            raise ValueError(f"LinearConfig: need P >= 1 prompts, got P={self.P}")
        if int(self.K) < 2:
            raise ValueError(f"LinearConfig: need K >= 2 responses, got K={self.K}")
        if int(self.d) < 1:
            raise ValueError(f"LinearConfig: need d >= 1 features, got d={self.d}")
        if not self.init_scale >= 0:
            raise ValueError(f"LinearConfig: init_scale must be >= 0, got {self.init_scale}")


def draw_features(cfg: LinearConfig) -> Array:
    """phi [P, K, d] = feature_scale * N(0,1) / sqrt(d), deterministic from cfg.feature_seed."""
    key = jax.random.PRNGKey(cfg.feature_seed)
    return cfg.feature_scale * jax.random.normal(key, (cfg.P, cfg.K, cfg.d)) / np.sqrt(cfg.d)


def response_logp(theta: Array, phi_x: Array, y: Array) -> Array:
    """log pi(y|x) for one example; phi_x [K, d] are the features of prompt x."""
    return jax.nn.log_softmax(phi_x @ theta)[y]


def make(cfg: LinearConfig, features: Array | None = None) -> Policy:
    """Log-linear `Policy`; `features` [P, K, d] (default: `draw_features(cfg)`), frozen."""
    phi = draw_features(cfg) if features is None else jnp.asarray(features)
    if phi.shape != (cfg.P, cfg.K, cfg.d):
        raise ValueError(f"features must have shape (P, K, d)={(cfg.P, cfg.K, cfg.d)}, got {phi.shape}")

    def init(key: Array) -> Array:
        return cfg.init_scale * jax.random.normal(key, (cfg.d,), dtype=phi.dtype)

    def one(theta, x, y, m):
        return jnp.where(m > 0, response_logp(theta, phi[x], y), 0.0)

    def token_logps(theta: Array, batch: PairBatch) -> tuple[Array, Array]:
        x = batch.prompt[:, 0]
        f = jax.vmap(one, in_axes=(None, 0, 0, 0))
        tw = f(theta, x, batch.chosen[:, 0], batch.chosen_mask[:, 0])
        tl = f(theta, x, batch.rejected[:, 0], batch.rejected_mask[:, 0])
        return tw[:, None], tl[:, None]

    return Policy(name=f"linear(P={cfg.P},K={cfg.K},d={cfg.d})", init=init, token_logps=token_logps)
