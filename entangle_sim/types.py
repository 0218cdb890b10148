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


#: The pair variables, in TRL's names and order (the symbolic engine's symbols share them).
PAIR_FIELDS = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
               "chosen_len", "rejected_len", "prompt_logps", "prompt_len")
REFERENCES = ("none", "self")


class PairState(NamedTuple):
    """The eight pair variables a per-pair loss reads (a pytree; any broadcastable shapes [...]).

    chosen_logps, rejected_logps          l_w, l_l: SUMMED completion log-probs (<= 0)
    ref_chosen_logps, ref_rejected_logps  the reference model's (r_w = l_w - l_w^ref)
    chosen_len, rejected_len              n_w, n_l completion token counts (>= 1)
    prompt_logps, prompt_len              the scored prompt tokens (ORPO's NLL only)

    Build it with `PairState.of`, which makes the reference an explicit choice.

        >>> s = PairState.of(-10.0, -12.0, reference=(-11.0, -11.0))
        >>> float(s.ref_chosen_logps), float(s.chosen_len)
        (-11.0, 1.0)
    """

    chosen_logps: Any
    rejected_logps: Any
    ref_chosen_logps: Any
    ref_rejected_logps: Any
    chosen_len: Any
    rejected_len: Any
    prompt_logps: Any
    prompt_len: Any

    @classmethod
    def of(cls, chosen_logps, rejected_logps, *, reference, chosen_len=1.0, rejected_len=1.0,
           prompt_logps=0.0, prompt_len=0.0) -> "PairState":
        """A state with an explicit reference: `reference=(ref_chosen, ref_rejected)`, `"self"`
        (reference = the policy itself, stop-gradient: r_w = r_l = 0, DPO's first step) or `"none"`
        (no reference model: zeros, the loss sees raw log-probs; what reference-free losses read)."""
        if isinstance(reference, str):
            if reference == "self":
                ref = (jax.lax.stop_gradient(jnp.asarray(chosen_logps)),
                       jax.lax.stop_gradient(jnp.asarray(rejected_logps)))
            elif reference == "none":
                ref = (jnp.zeros_like(jnp.asarray(chosen_logps, dtype=jnp.result_type(float))),
                       jnp.zeros_like(jnp.asarray(rejected_logps, dtype=jnp.result_type(float))))
            else:
                raise ValueError(f"reference={reference!r}: give (ref_chosen, ref_rejected), "
                                 f"or one of {list(REFERENCES)}")
        else:
            try:
                ref = tuple(reference)
            except TypeError:
                raise TypeError(f"reference must be a pair (ref_chosen, ref_rejected) or one of "
                                f"{list(REFERENCES)}, got {reference!r}") from None
            if len(ref) != 2:
                raise ValueError(f"reference must be a pair (ref_chosen, ref_rejected), got {len(ref)} values")
        return cls(chosen_logps, rejected_logps, ref[0], ref[1], chosen_len, rejected_len, prompt_logps, prompt_len)

    def as_arrays(self) -> "PairState":
        """Every field as a float JAX array (integers promoted to the default float)."""
        out = []
        for x in self:
            x = jnp.asarray(x)
            out.append(x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.result_type(float)))
        return PairState(*out)

    def broadcast(self) -> "PairState":
        """`as_arrays`, every field broadcast to the common shape."""
        s = self.as_arrays()
        shape = jnp.broadcast_shapes(*(jnp.shape(x) for x in s))
        return PairState(*(jnp.broadcast_to(x, shape) for x in s))


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
