"""Shared data types: the pair batch every policy consumes and the two-function policy protocol.

Shapes use nanodo-style names: B pairs, P prompt tokens, T_w / T_l response tokens.
Tabular policies use the same container with P = T_w = T_l = 1 (indices instead of tokens).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any


class PairBatch(NamedTuple):
    """B preference pairs.

    prompt:        int [B, P]    prompt tokens (tabular: prompt index in column 0)
    chosen:        int [B, T_w]  chosen-response tokens (tabular: response index)
    rejected:      int [B, T_l]  rejected-response tokens
    chosen_mask:   float [B, T_w] 1.0 on real response tokens, 0.0 on padding
    rejected_mask: float [B, T_l]
    """

    prompt: Array
    chosen: Array
    rejected: Array
    chosen_mask: Array
    rejected_mask: Array

    @property
    def chosen_len(self) -> Array:
        """[B] number of chosen tokens (>= 1)."""
        return jnp.maximum(self.chosen_mask.sum(-1), 1.0)

    @property
    def rejected_len(self) -> Array:
        """[B] number of rejected tokens (>= 1)."""
        return jnp.maximum(self.rejected_mask.sum(-1), 1.0)

    @property
    def size(self) -> int:
        return self.prompt.shape[0]

    def take(self, idx: Array) -> "PairBatch":
        """Sub-batch along the pair axis (idx: int [b])."""
        return jax.tree.map(lambda a: a[idx], self)


class Policy(NamedTuple):
    """Two-function policy protocol: trainer and geometry never branch on the type.

    init(key) -> params                                   trainable pytree
    token_logps(params, batch) -> (tok_w [B,T_w], tok_l [B,T_l])
        per-token log pi(y_t | x, y_<t), exactly 0 on masked positions.
    Frozen pieces (features, encoders) are closed over by the constructor.
    """

    name: str
    init: Callable[[Array], PyTree]
    token_logps: Callable[[PyTree, PairBatch], tuple[Array, Array]]

    def logps(self, params: PyTree, batch: PairBatch) -> tuple[Array, Array]:
        """Summed response log-probs (chosen_logps [B], rejected_logps [B])."""
        tw, tl = self.token_logps(params, batch)
        return tw.sum(-1), tl.sum(-1)
