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


# ----------------------------------------------------------------------------------------------
# parameter key paths and factored gradients: used by policies (to describe their gradients) and
# by geometry (to contract them); here so that policies need not import geometry
# ----------------------------------------------------------------------------------------------
def key_str(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path) -> str:
    """Key path (from `jax.tree_util.tree_flatten_with_path`) -> 'a/0/b'."""
    return "/".join(key_str(k) for k in path)


def param_paths(params: PyTree) -> list[str]:
    """All leaf key paths of a parameter pytree, in leaf order, e.g. ['embed/pos', 'embed/tok', ...]."""
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


class Factor(NamedTuple):
    """One use of a matrix parameter M [m, n] whose gradient contribution is left^T @ right.

    left:  float [S, m], or int [S] meaning one-hot rows (an embedding gather: M[idx] -> rows)
    right: float [S, n]
    E.g. dense y_t = a_t W: Factor(a [S, in], delta [S, out]); gather e_t = E[x_t]:
    Factor(x [S], delta [S, D]); tied read-out logits_t = h_t E^T: Factor(delta [S, V], h [S, D]).
    """

    left: Array
    right: Array


class GradFactors(NamedTuple):
    """Gradient of one scalar (a response's summed log-prob) in factored form.

    dense:    {path: full gradient array} for small leaves (biases, LayerNorm), cheap to materialise
    factored: {path: tuple[Factor, ...]}   gradient = sum over the tuple of left^T @ right
    Together the keys must cover every parameter path exactly once.
    """

    dense: dict
    factored: dict


class TokenFactor(NamedTuple):
    """One use of a matrix M [m, n] in per-token form: grad of token t's log-prob = left_t^T @ right_t.

    left:  int [S] (one-hot rows, an embedding gather), float [S, m] (shared by all tokens: the layer
           inputs a_s) or float [T, S, m] (per token)
    right: float [T, S, n] (per token: the back-propagated signal delta_{t,s} at the layer's output)
    E.g. dense y_s = a_s W: TokenFactor(a [S, in], delta [T, S, out]) with
    grad_W logp_t = sum_s a_s delta_{t,s}^T; read-out logits_t = h_t W:
    TokenFactor(h[:, None] [T, 1, D], (e_{y_t} - p_t)[:, None] [T, 1, V]).
    """

    left: Array
    right: Array


class TokenGradFactors(NamedTuple):
    """Per-token gradients of one response's token log-probs [T] in factored form.

    dense:    {path: [T, *leaf.shape]} per-token gradient of small leaves (biases, LayerNorm)
    factored: {path: tuple[TokenFactor, ...]} per-token gradient = sum over the tuple of left_t^T right_t
    Together the keys must cover every parameter path exactly once.
    """

    dense: dict
    factored: dict
