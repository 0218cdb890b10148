"""Token-level gradient geometry (R13, Fig. 4b): the T_w x T_l matrix of per-token gradient inner
products, by autodiff or from factored per-token gradients (see the package docstring)."""
from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from ..types import Array, PairBatch, PyTree, TokenFactor, TokenGradFactors, param_paths
from .pairs import (Subset, freeze_subset, pair_gram_layerwise_jit, pair_gram_vmap_jit, selected_leaves, split_selected,
                    subset_predicate)


# ----------------------------------------------------------------------------------------------
# token-level Gram (R13, Fig. 4b)
# ----------------------------------------------------------------------------------------------
class TokenGram(NamedTuple):
    """Per-token gradient geometry of one pair (a leading [B] axis when computed for a batch).

    inner [T_w, T_l]  <g_t(y_w), g_u(y_l)>, rows = chosen tokens, columns = rejected tokens;
                      sums to G_wl (R13)
    cos   [T_w, T_l]  inner / (norm_w norm_l); 0 where a token is masked (its gradient is 0)
    norm_w [T_w], norm_l [T_l]  |g_t(y)|
    """

    inner: Array
    cos: Array
    norm_w: Array
    norm_l: Array


@partial(jax.jit, static_argnames=("token_logp_fn", "subset"))
def _token_gram_one(token_logp_fn, params, example, subset):
    sel = selected_leaves(params, subset)
    theta, rebuild = split_selected(params, sel)
    ex = jax.tree.map(lambda a: a[None], example)

    def f(th):
        tw, tl = token_logp_fn(rebuild(th), ex)
        return tw[0], tl[0]

    # One forward and T_w + T_l vmapped backward passes (jacrev), never a Python loop.
    jw, jl = jax.jacrev(f)(theta)
    T_w, T_l = jw[0].shape[0], jl[0].shape[0]   # from the Jacobian: any pytree example
    inner = sum(a.reshape(T_w, -1) @ b.reshape(T_l, -1).T for a, b in zip(jw, jl))
    norm_w = jnp.sqrt(sum(jnp.sum(a.reshape(T_w, -1) ** 2, 1) for a in jw))
    norm_l = jnp.sqrt(sum(jnp.sum(b.reshape(T_l, -1) ** 2, 1) for b in jl))
    tiny = jnp.finfo(inner.dtype).tiny
    cos = inner / jnp.maximum(norm_w[:, None] * norm_l[None, :], tiny)
    return TokenGram(inner, cos, norm_w, norm_l)


TOKEN_METHODS = ("auto", "jacrev", "factored")


def token_gram(token_logp_fn: Callable[[PyTree, PairBatch], tuple[Array, Array]], params: PyTree,
               example_or_batch: PairBatch, *, subset: Subset = None, method: str = "auto",
               factor_fn: Callable | None = None, chunk_size: int | None = None) -> TokenGram:
    """Token-level Gram <g_t(y_w), g_u(y_l)> and cosines (theory R13, Fig. 4b), rows = chosen tokens.

    token_logp_fn: a Policy's `token_logps(params, batch) -> ([B,T_w], [B,T_l])`.
    example_or_batch: a PairBatch without (prompt [P]) or with (prompt [B, P]) a pair axis, or any
    other pytree batch with a leading pair axis (dict, NamedTuple, dataclass pytree); with a pair axis every field of the result gets a leading [B] (pairs are
    vmapped, `chunk_size` at a time).
    method:
      'jacrev'    one forward and T_w + T_l vmapped full backward passes; memory (T_w + T_l) x |params|
                  per pair (use `subset` for very large models). Works for any model.
      'factored'  per-token gradients in factored form from `factor_fn(params, example) ->
                  (TokenGradFactors chosen, TokenGradFactors rejected)` (e.g.
                  `transformer.token_grad_factors(cfg)`): dense layers from activation x signal Gram
                  blocks, the read-out in closed form; no parameter-sized per-token gradient is formed.
      'auto'      'factored' when factor_fn is given and `geometry_cost` predicts fewer FLOPs, else 'jacrev'.
    All methods are exact (same numbers up to round-off).

    >>> tg = token_gram(policy.token_logps, params, batch.take(jnp.arange(1)))  # doctest: +SKIP
    >>> tg = token_gram(policy.token_logps, params, ex,  # doctest: +SKIP
    ...                 factor_fn=transformer.token_grad_factors(cfg))
    """
    if method not in TOKEN_METHODS:
        raise ValueError(f"method must be one of {TOKEN_METHODS}, got {method!r}")
    if method == "factored" and factor_fn is None:
        raise ValueError("method='factored' needs factor_fn (e.g. transformer.token_grad_factors(cfg))")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if method == "auto":
        method = "jacrev" if factor_fn is None else _auto_token_method(factor_fn, params, example_or_batch)
    if method == "factored":
        return _token_gram_factored_jit(factor_fn, params, example_or_batch, freeze_subset(subset), chunk_size)
    return _token_gram_jit(token_logp_fn, params, example_or_batch, freeze_subset(subset), chunk_size)


def _auto_token_method(factor_fn, params, example_or_batch) -> str:
    from .. import geometry_cost  # local import keeps `import geometry` light

    return geometry_cost.choose_token_method(factor_fn, params, _first_example(example_or_batch))


def _has_pair_axis(example_or_batch) -> bool:
    """PairBatch-like (attribute or dict key 'prompt'): prompt [B, P] vs [P]; any other pytree is
    taken to carry a leading pair axis on every leaf."""
    if isinstance(example_or_batch, dict):
        prompt = example_or_batch.get("prompt")
    else:
        prompt = getattr(example_or_batch, "prompt", None)
    return True if prompt is None else prompt.ndim != 1


def _first_example(example_or_batch):
    if _has_pair_axis(example_or_batch):
        return jax.tree.map(lambda a: a[0], example_or_batch)
    return example_or_batch


def _map_leading(fn, tree, chunk_size):
    """vmap fn over the leading axis of every leaf of `tree`, chunk_size at a time (any pytree)."""
    B = jax.tree.leaves(tree)[0].shape[0]
    if chunk_size is None or chunk_size >= B:
        return jax.vmap(fn)(tree)
    n = -(-B // chunk_size)
    # pad by repeating the last item (sliced off after) so the body compiles once
    idx = jnp.minimum(jnp.arange(n * chunk_size), B - 1).reshape(n, chunk_size)
    out = jax.lax.map(jax.vmap(fn), jax.tree.map(lambda a: a[idx], tree))
    return jax.tree.map(lambda a: a.reshape(n * chunk_size, *a.shape[2:])[:B], out)


# ----------------------------------------------------------------------------------------------
# token-level Gram from per-token factors (no per-token backward pass through the weights)
# ----------------------------------------------------------------------------------------------
def _token_factor_inner(a: TokenFactor, b: TokenFactor, diag: bool) -> Array:
    """[T, U] of <grad_t(a), grad_u(b)>, or its diagonal [T] when diag (a, b of the same response).

    = sum_{s,q} <left_a[t?, s], left_b[u?, q]> <right_a[t, s], right_b[u, q]>; one einsum whose
    contraction order opt_einsum picks (for dense layers: left Gram [S, S'], then S S' U n, T U S n).
    """
    u = "t" if diag else "u"
    out = "t" if diag else "tu"
    ai, bi = (jnp.issubdtype(x.left.dtype, jnp.integer) for x in (a, b))
    if ai or bi:
        if ai and bi:
            lg, sub = (a.left[:, None] == b.left[None, :]).astype(a.right.dtype), "sq"
        elif ai:   # b float: [S', m] -> [S, S'] or [U, S', m] -> [U, S', S]
            lg, sub = (b.left[:, a.left].T, "sq") if b.left.ndim == 2 else (b.left[:, :, a.left], u + "qs")
        else:
            lg, sub = (a.left[:, b.left], "sq") if a.left.ndim == 2 else (a.left[:, :, b.left], "tsq")
        return jnp.einsum(f"{sub},tsn,{u}qn->{out}", lg, a.right, b.right)
    sa = "sm" if a.left.ndim == 2 else "tsm"
    sb = "qm" if b.left.ndim == 2 else u + "qm"
    return jnp.einsum(f"{sa},{sb},tsn,{u}qn->{out}", a.left, b.left, a.right, b.right, optimize="optimal")


def _token_factors_inner(fa: TokenGradFactors, fb: TokenGradFactors, keep, diag: bool) -> Array:
    total = 0.0
    for k, ga in fa.dense.items():
        if keep(k):
            ga, gb = ga.reshape(ga.shape[0], -1), fb.dense[k].reshape(fb.dense[k].shape[0], -1)
            total = total + (jnp.sum(ga * gb, 1) if diag else ga @ gb.T)
    for k, us in fa.factored.items():
        if keep(k):
            for x in us:
                for y in fb.factored[k]:
                    total = total + _token_factor_inner(x, y, diag)
    return total


def _check_cover(f: TokenGradFactors, paths):
    covered = sorted(list(f.dense) + list(f.factored))
    if covered != sorted(paths):
        raise ValueError(f"factor_fn must cover every parameter path once; got {covered}, params have {sorted(paths)}")


def _token_gram_factored_one(factor_fn, params, example, subset):
    keep = subset_predicate(subset)
    selected_leaves(params, subset)  # raises on an empty selection
    fw, fl = factor_fn(params, example)
    paths = param_paths(params)
    _check_cover(fw, paths)
    _check_cover(fl, paths)
    inner = _token_factors_inner(fw, fl, keep, diag=False)
    # clip: the diagonal is a sum of squares up to round-off
    norm_w = jnp.sqrt(jnp.maximum(_token_factors_inner(fw, fw, keep, diag=True), 0.0))
    norm_l = jnp.sqrt(jnp.maximum(_token_factors_inner(fl, fl, keep, diag=True), 0.0))
    tiny = jnp.finfo(inner.dtype).tiny
    cos = inner / jnp.maximum(norm_w[:, None] * norm_l[None, :], tiny)
    return TokenGram(inner, cos, norm_w, norm_l)


@partial(jax.jit, static_argnums=(0, 3, 4))
def _token_gram_factored_jit(factor_fn, params, example_or_batch, subset, chunk_size):
    if not _has_pair_axis(example_or_batch):
        return _token_gram_factored_one(factor_fn, params, example_or_batch, subset)
    return _map_leading(lambda ex: _token_gram_factored_one(factor_fn, params, ex, subset),
                        example_or_batch, chunk_size)


@partial(jax.jit, static_argnums=(0, 3, 4))
def _token_gram_jit(token_logp_fn, params, example_or_batch, subset, chunk_size=None):
    # Compiled once per (model function, subset, shapes): the eager version re-dispatched every op.
    if not _has_pair_axis(example_or_batch):
        return _token_gram_one(token_logp_fn, params, example_or_batch, subset)
    return _map_leading(lambda ex: _token_gram_one(token_logp_fn, params, ex, subset), example_or_batch, chunk_size)


# ----------------------------------------------------------------------------------------------
# the compiled programs, for cost and memory analysis (benchmarks)
# ----------------------------------------------------------------------------------------------
GRAM_PROGRAMS = ("pair_vmap", "pair_layerwise", "token_jacrev", "token_factored")


def gram_program(method: str, fn: Callable, params: PyTree, batch: PyTree, *, subset: Subset = None,
                 chunk_size: int | None = None) -> jax.stages.Lowered:
    """The XLA program one Gram path runs, lowered for `batch` (not executed): `.compile()` gives
    the executable (`cost_analysis()`, `memory_analysis()`; calling it takes (params, batch)).

    method: 'pair_vmap' (`pair_gram`, fn = logp_fn), 'pair_layerwise' (`pair_gram_layerwise`, fn =
    factor_fn), 'token_jacrev' / 'token_factored' (`token_gram`, fn = token_logp_fn / factor_fn).

    >>> flops = gram_program("pair_vmap", policy.logps, params, batch).compile().cost_analysis()  # doctest: +SKIP
    """
    programs = {"pair_vmap": pair_gram_vmap_jit, "pair_layerwise": pair_gram_layerwise_jit,
                "token_jacrev": _token_gram_jit, "token_factored": _token_gram_factored_jit}
    if method not in programs:
        raise ValueError(f"method must be one of {GRAM_PROGRAMS}, got {method!r}")
    return programs[method].lower(fn, params, batch, freeze_subset(subset), chunk_size)
