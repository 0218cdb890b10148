"""Tabular softmax policy: one free logit per (prompt, response) cell.

    pi(y | x) = softmax(logits[x])[y],        params: logits [P, K]

Gradient of one response (theory R14/R15 with h = e_x): d log pi(a|x) / d logits[x] = e_a - p,
all other rows zero. So a pair on one prompt row has G_ww = 1 - 2p_a + |p|^2,
G_wl = |p|^2 - p_a - p_b, G_ll = 1 - 2p_b + |p|^2 (R15 with |h| = 1).

Batch convention (PairBatch with P = T_w = T_l = 1):
    prompt[:, 0]  = prompt index in [0, P)
    chosen[:, 0], rejected[:, 0] = response indices in [0, K)
    chosen_mask, rejected_mask   = ones [B, 1] (a 0 gives an exact-0 log-prob)
token_logps returns ([B, 1], [B, 1]).

Example:
    >>> pol = make(SoftmaxConfig(P=2, K=3))
    >>> logits = pol.init(jax.random.PRNGKey(0))            # [2, 3]
    >>> logits.shape
    (2, 3)
    >>> tw, tl = pol.token_logps(logits, batch)  # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from ..types import Array, PairBatch, Policy


@dataclass(frozen=True)
class SoftmaxConfig:
    """P prompts, K responses per prompt; init logits = init_scale * N(0, 1)."""

    P: int
    K: int
    init_scale: float = 1.0

    def __post_init__(self):
        from .. import validate as _v

        _v.integer("SoftmaxConfig: P", self.P)  # type: 2.5 or '3' refused (TypeError)
        _v.integer("SoftmaxConfig: K", self.K)
        if int(self.P) < 1:
            raise ValueError(f"SoftmaxConfig: need P >= 1 prompts, got P={self.P}")
        if int(self.K) < 2:
            raise ValueError(f"SoftmaxConfig: need K >= 2 responses (a pair needs two), got K={self.K}")
        _v.real("SoftmaxConfig: init_scale", self.init_scale, lo=0)


def response_logp(logits: Array, x: Array, y: Array) -> Array:
    """log pi(y|x) = log_softmax(logits[x])[y] for one example (scalars in, scalar out)."""
    return jax.nn.log_softmax(logits[x])[y]


def make(cfg: SoftmaxConfig) -> Policy:
    """Tabular softmax `Policy` (see module docstring for the batch convention)."""

    def init(key: Array) -> Array:
        return cfg.init_scale * jax.random.normal(key, (cfg.P, cfg.K))

    def one(logits, x, y, m):
        # where (not multiply) so a masked entry is exactly 0 even if the log-prob were -inf
        return jnp.where(m > 0, response_logp(logits, x, y), 0.0)

    def token_logps(logits: Array, batch: PairBatch) -> tuple[Array, Array]:
        x = batch.prompt[:, 0]
        f = jax.vmap(one, in_axes=(None, 0, 0, 0))
        tw = f(logits, x, batch.chosen[:, 0], batch.chosen_mask[:, 0])
        tl = f(logits, x, batch.rejected[:, 0], batch.rejected_mask[:, 0])
        return tw[:, None], tl[:, None]

    return Policy(name=f"softmax(P={cfg.P},K={cfg.K})", init=init, token_logps=token_logps)
