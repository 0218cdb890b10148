"""Per-pair gradient geometry: G_ww, G_wl, G_ll, cosine and condition ratios (THEORY.md §1, §3.3)."""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from .types import Array, PairBatch, PyTree


class PairGram(NamedTuple):
    """Per-pair Gram statistics, each [B].

    G_ww = |g_w|^2, G_wl = <g_w, g_l>, G_ll = |g_l|^2, cos = G_wl / sqrt(G_ww G_ll),
    rho_w = G_wl / G_ww, rho_l = G_wl / G_ll, rho = max(rho_w, rho_l) (Case 1 <=> rho <= 1).
    """

    G_ww: Array
    G_wl: Array
    G_ll: Array
    cos: Array
    rho_w: Array
    rho_l: Array
    rho: Array


def _tree_vdot(a: PyTree, b: PyTree) -> Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def gram_stats(G_ww: Array, G_wl: Array, G_ll: Array) -> PairGram:
    """Derived statistics from the three Gram entries (any broadcastable shapes)."""
    tiny = jnp.finfo(jnp.result_type(G_ww, float)).tiny
    cos = G_wl / jnp.sqrt(jnp.maximum(G_ww * G_ll, tiny))
    rho_w = G_wl / jnp.maximum(G_ww, tiny)
    rho_l = G_wl / jnp.maximum(G_ll, tiny)
    return PairGram(G_ww, G_wl, G_ll, cos, rho_w, rho_l, jnp.maximum(rho_w, rho_l))


def pair_gram(logp_fn: Callable[[PyTree, PairBatch], tuple[Array, Array]], params: PyTree,
              batch: PairBatch) -> PairGram:
    """Per-pair Gram of the summed-response gradients g_w = grad l_w, g_l = grad l_l.

    logp_fn(params, batch) -> (chosen_logps [B], rejected_logps [B]); any batch-polymorphic model.
    Implementation: vmap over pairs of one reverse pass per response (no Python loop).
    """

    def one(example):
        ex = jax.tree.map(lambda a: a[None], example)

        def lw(p):
            return logp_fn(p, ex)[0][0]

        def ll(p):
            return logp_fn(p, ex)[1][0]

        gw, gl = jax.grad(lw)(params), jax.grad(ll)(params)
        return _tree_vdot(gw, gw), _tree_vdot(gw, gl), _tree_vdot(gl, gl)

    G_ww, G_wl, G_ll = jax.vmap(one)(batch)
    return gram_stats(G_ww, G_wl, G_ll)
