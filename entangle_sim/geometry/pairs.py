"""Sequence-level gradient geometry: per-pair Gram (vmap, layer-wise factored, Jacobian), batch and
preconditioned Grams, parameter subsets (see the package docstring)."""
from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ..types import Array, Factor, GradFactors, PairBatch, PyTree, param_paths

Subset = Union[None, str, Sequence[str], Callable[[str], bool]]


# ----------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------
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
    """Derived statistics from the three Gram entries (any broadcastable shapes).

    rho is the *corrected* condition ratio max(G_wl/G_ww, G_wl/G_ll) (theory §7.3 bug 1: the official
    code computes G_wl / min(G_ww, G_ww) = rho_w and misses "rejected does not fall" whenever
    |g_l| < |g_w|). Zero norms are floored at the dtype's `tiny` so no NaN appears.

    >>> float(gram_stats(4.0, 2.0, 1.25).rho)   # rho_w = 0.5, rho_l = 1.6 -> 1.6 (Case 1 violated)
    1.6
    """
    tiny = jnp.finfo(jnp.result_type(G_ww, float)).tiny
    cos = G_wl / jnp.sqrt(jnp.maximum(G_ww * G_ll, tiny))
    rho_w = G_wl / jnp.maximum(G_ww, tiny)
    rho_l = G_wl / jnp.maximum(G_ll, tiny)
    return PairGram(G_ww, G_wl, G_ll, cos, rho_w, rho_l, jnp.maximum(rho_w, rho_l))


def aggregate(gram: PairGram) -> dict[str, float]:
    """Aggregate per-pair statistics over pairs, each key saying how it was reduced (theory §3.3, §7.3 bug 2).

    '*_mean'                 plain means over pairs: G_ww_mean, G_wl_mean, G_ll_mean, cos_mean,
                             norm_w_mean, norm_l_mean (unsquared |g|, the official code's Grad_*_Norm)
    '*_mean_of_ratios'       mean over pairs of the per-pair ratio: rho_w, rho_l, rho (= mean of max)
    '*_ratio_of_means'       ratio of the pair means: rho_w = mean G_wl / mean G_ww,
                             rho_l = mean G_wl / mean G_ll, rho = max of the two,
                             cos = mean G_wl / sqrt(mean G_ww * mean G_ll)
    'case1_fraction'         fraction of pairs with rho <= 1 (chosen up and rejected down, first order)
    'n_pairs'                number of pairs

    >>> float(aggregate(gram_stats(jnp.array([1., 4.]), jnp.array([.5, 2.]), jnp.array([1., 1.])))['rho_ratio_of_means'])
    1.25
    """
    G_ww, G_wl, G_ll = (jnp.asarray(x, float) for x in (gram.G_ww, gram.G_wl, gram.G_ll))
    agg = gram_stats(G_ww.mean(), G_wl.mean(), G_ll.mean())
    out = {
        "n_pairs": int(G_ww.size),
        "G_ww_mean": G_ww.mean(), "G_wl_mean": G_wl.mean(), "G_ll_mean": G_ll.mean(),
        "norm_w_mean": jnp.sqrt(G_ww).mean(), "norm_l_mean": jnp.sqrt(G_ll).mean(),
        "cos_mean": jnp.mean(gram.cos),
        "rho_w_mean_of_ratios": jnp.mean(gram.rho_w),
        "rho_l_mean_of_ratios": jnp.mean(gram.rho_l),
        "rho_mean_of_ratios": jnp.mean(gram.rho),
        "rho_w_ratio_of_means": agg.rho_w, "rho_l_ratio_of_means": agg.rho_l,
        "rho_ratio_of_means": agg.rho, "cos_ratio_of_means": agg.cos,
        "case1_fraction": jnp.mean((gram.rho <= 1.0).astype(G_ww.dtype)),
    }
    return {k: (v if isinstance(v, int) else float(v)) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# key paths and subsets
# ----------------------------------------------------------------------------------------------
def freeze_subset(subset: Subset):
    """Hashable form (lists -> tuples) so the subset can be a static jit argument."""
    if subset is None or callable(subset):
        return subset
    if isinstance(subset, str):
        return (subset,)
    return tuple(subset)


def subset_predicate(subset: Subset) -> Callable[[str], bool]:
    """Predicate on key-path strings: None -> all; prefixes -> path == p or path startswith p + '/'."""
    subset = freeze_subset(subset)
    if subset is None:
        return lambda path: True
    if callable(subset):
        return subset
    prefixes = tuple(s.strip("/") for s in subset)
    if not prefixes or any(not isinstance(s, str) for s in subset):
        raise ValueError(f"subset must be None, a predicate, or a non-empty list of path prefixes; got {subset!r}")
    return lambda path: any(path == p or path.startswith(p + "/") for p in prefixes)


def selected_leaves(params: PyTree, subset: Subset) -> list[bool]:
    pred = subset_predicate(subset)
    paths = param_paths(params)
    sel = [bool(pred(p)) for p in paths]
    if not any(sel):
        raise ValueError(f"subset {subset!r} selects no parameter; available paths: {paths}")
    return sel


def split_selected(params: PyTree, sel: list[bool]):
    """(selected leaves, rebuild(selected leaves) -> full params with the others fixed)."""
    leaves, treedef = jax.tree.flatten(params)
    chosen = [x for x, s in zip(leaves, sel) if s]

    def rebuild(new):
        it = iter(new)
        return jax.tree.unflatten(treedef, [next(it) if s else x for x, s in zip(leaves, sel)])

    return chosen, rebuild


def pair_count(batch: PyTree) -> int:
    """Number of pairs B of a batch: the leading axis shared by every array leaf (a PairBatch, a
    dict, a NamedTuple or a dataclass pytree). Raises ValueError if the leaves disagree."""
    sizes = {jnp.shape(x)[0] for x in jax.tree.leaves(batch) if jnp.ndim(x) > 0}
    if len(sizes) != 1:
        raise ValueError(f"a batch needs one leading pair axis shared by all its arrays; got sizes {sorted(sizes)}")
    return sizes.pop()


def _map_pairs(fn, batch, chunk_size):
    # lax.map(batch_size=c) vmaps within chunks of c pairs and loops over chunks: peak memory is
    # that of c pairs, not B.
    B = pair_count(batch)
    if chunk_size is None or chunk_size >= B:
        return jax.vmap(fn)(batch)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    # Pad to whole chunks by repeating the last pair (results sliced off) rather than
    # lax.map(batch_size=...), which compiles the body a second time for the remainder.
    n = -(-B // chunk_size)
    idx = jnp.minimum(jnp.arange(n * chunk_size), B - 1).reshape(n, chunk_size)
    out = jax.lax.map(jax.vmap(fn), jax.tree.map(lambda a: a[idx], batch))
    return jax.tree.map(lambda a: a.reshape(n * chunk_size, *a.shape[2:])[:B], out)


def check_pair_inputs(params: PyTree, batch: PyTree) -> None:
    """ValueError naming the field for masks whose shape differs from their tokens, inconsistent
    batch sizes, or non-finite parameters (checked when concrete; traced values pass).

    batch: a PairBatch, a dict / NamedTuple with the same fields (masks checked), or any other
    pytree batch (its leading pair axis is checked by `pair_count`)."""
    if isinstance(batch, dict):
        fields, get = tuple(batch), batch.__getitem__
    else:
        fields, get = tuple(getattr(batch, "_fields", ())), lambda f: getattr(batch, f)
    if {"chosen", "rejected", "chosen_mask", "rejected_mask"} <= set(fields):
        for tok, mask in (("chosen", "chosen_mask"), ("rejected", "rejected_mask")):
            ts, ms = jnp.shape(get(tok)), jnp.shape(get(mask))
            if ts != ms:
                raise ValueError(f"batch.{mask} has shape {ms}, but batch.{tok} has shape {ts}; they must match")
    if isinstance(batch, PairBatch):   # other pytrees: `pair_count` checks their leading pair axis
        sizes = {f: jnp.shape(get(f))[0] for f in fields if jnp.ndim(get(f)) >= 1}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"batch fields disagree on the number of pairs B: {sizes}")
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if isinstance(leaf, jax.core.Tracer) or not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            continue
        # numpy, not jnp: inside an outer jit a jnp op on a constant would itself be traced
        if not np.all(np.isfinite(np.asarray(leaf))):
            raise ValueError(f"params{jax.tree_util.keystr(path)} holds NaN or inf")


# ----------------------------------------------------------------------------------------------
# sequence-level Gram: generic vmap(grad) path
# ----------------------------------------------------------------------------------------------
@partial(jax.jit, static_argnames=("logp_fn", "subset", "chunk_size"))
def pair_gram_vmap_jit(logp_fn, params, batch, subset, chunk_size):
    sel = selected_leaves(params, subset)
    theta, rebuild = split_selected(params, sel)

    def one(example):
        ex = jax.tree.map(lambda a: a[None], example)
        # Two separate grads of one shared function: under jit, XLA drops the unused response's
        # forward in each, so this is one forward + one backward per response.
        gw = jax.grad(lambda th: logp_fn(rebuild(th), ex)[0][0])(theta)
        gl = jax.grad(lambda th: logp_fn(rebuild(th), ex)[1][0])(theta)
        return _tree_vdot(gw, gw), _tree_vdot(gw, gl), _tree_vdot(gl, gl)

    return gram_stats(*_map_pairs(one, batch, chunk_size))


def pair_gram(logp_fn: Callable[[PyTree, PairBatch], tuple[Array, Array]], params: PyTree,
              batch: PairBatch, *, subset: Subset = None, chunk_size: int | None = None,
              method: str = "auto", factor_fn: Callable | None = None) -> PairGram:
    """Per-pair Gram of the summed-response gradients g_w = grad l_w, g_l = grad l_l (theory §1).

    logp_fn(params, batch) -> (chosen_logps [B], rejected_logps [B]), e.g. `policy.logps`; any
    batch-polymorphic JAX model. batch: a PairBatch or any pytree whose array leaves share a
    leading pair axis [B] (dict, NamedTuple, dataclass pytree); each pair is passed to logp_fn
    with that axis of length 1. subset: parameters to differentiate (module docstring).
    chunk_size: pairs vmapped at once (None = all B); memory ~ 2 * chunk_size * |selected params|.
    method: 'vmap' (vmap of one reverse pass per response), 'layerwise' (`pair_gram_layerwise` with
    factor_fn), or 'auto': 'vmap' without factor_fn, else whichever `geometry_cost` predicts cheaper.
    Returns PairGram of [B] arrays. Jitted; logp_fn and subset must be hashable.

    >>> from entangle_sim import data
    >>> gp = data.geometry_pairs(jax.random.PRNGKey(0), "linear", 8, K=6, target_cos=0.9, norm_ratio=2.0)
    >>> pair_gram(gp.policy().logps, gp.params, gp.batch).cos.shape   # [B]
    (8,)
    """
    check_pair_inputs(params, batch)
    if method not in ("auto", "vmap", "layerwise"):
        raise ValueError(f"method must be 'auto', 'vmap' or 'layerwise', got {method!r}")
    if method == "layerwise" and factor_fn is None:
        raise ValueError("method='layerwise' needs factor_fn (e.g. transformer.grad_factors(cfg))")
    if method == "auto" and factor_fn is not None:
        from .. import geometry_cost  # local import keeps `import geometry` light

        get = (lambda k: batch[k][0]) if isinstance(batch, dict) else (lambda k: getattr(batch, k)[0])
        side = (get("prompt"), get("chosen"), get("chosen_mask"))   # shapes of one response
        method = geometry_cost.choose_seq_method(factor_fn, params, side)
    if method == "layerwise":
        return pair_gram_layerwise(factor_fn, params, batch, subset=subset, chunk_size=chunk_size)
    return pair_gram_vmap_jit(logp_fn, params, batch, freeze_subset(subset), chunk_size)


# ----------------------------------------------------------------------------------------------
# sequence-level Gram: batch level (2B x 2B), preconditioned, and from a Jacobian
# ----------------------------------------------------------------------------------------------
def response_jacobian(logp_fn: Callable[[PyTree, PairBatch], tuple[Array, Array]], params: PyTree,
                      batch: PyTree, *, separable: bool = True) -> Array:
    """J [2B, P]: rows grad l_w,i (i < B) then grad l_l,i, over the flattened parameters
    (`jax.flatten_util.ravel_pytree` order).

    separable=True (a batch-polymorphic logp_fn, pairs independent, like `pair_gram` assumes): one
    reverse pass per response, each on its own pair (vmap over the pair axis). separable=False:
    jacrev of logp_fn on the whole batch, for a logp_fn that couples pairs or does not read its
    batch argument (e.g. closes over per-token weights); it costs B times more.

    >>> J = response_jacobian(policy.logps, params, batch)  # [2B, P]  # doctest: +SKIP
    """
    flat, unravel = ravel_pytree(params)
    if not separable:
        return jax.jacrev(lambda f: jnp.concatenate(logp_fn(unravel(f), batch)))(flat)

    def one(example):
        ex = jax.tree.map(lambda a: a[None], example)
        return jax.jacrev(lambda f: jnp.concatenate(logp_fn(unravel(f), ex)))(flat)   # [2, P]

    J2 = jax.vmap(one)(batch)                                                       # [B, 2, P]
    return jnp.concatenate([J2[:, 0], J2[:, 1]])


def jacobian_pair_gram(J: Array, J_eff: Array | None = None) -> PairGram:
    """Own-pair Gram from response Jacobians J, J_eff [2B, P] (rows chosen 0..B-1, then rejected):
    G_ww = <J_w,i, E_w,i>, G_wl = <J_w,i, E_l,i>, G_ll = <J_l,i, E_l,i> with E = J_eff (default J).
    The diagonal 2 x 2 blocks of `jacobian_batch_gram(J, J_eff)`."""
    E = J if J_eff is None else J_eff
    B = J.shape[0] // 2
    Jw, Jl, Ew, El = J[:B], J[B:], E[:B], E[B:]
    return gram_stats((Jw * Ew).sum(1), (Jw * El).sum(1), (Jl * El).sum(1))


def jacobian_batch_gram(J: Array, J_eff: Array | None = None, precond: Array | None = None) -> Array:
    """The 2B x 2B Gram J P J_eff^T (P = diag(precond) [P], default identity; J_eff default J)."""
    E = J if J_eff is None else J_eff
    return (J if precond is None else J * precond[None, :]) @ E.T


def batch_gram(logp_fn, params: PyTree, batch: PyTree, precond: PyTree | None = None) -> Array:
    """The 2B x 2B Gram J P J^T of all responses (rows/cols: chosen 0..B-1, then rejected 0..B-1).

    Batch-level first order: delta_l = -eta G dL/dl with l = [l_w; l_l] and L the batch loss; the
    own-pair 2x2 blocks are the per-pair Gram, the rest are cross-pair terms. precond: a diagonal
    preconditioner as a pytree like params (e.g. Adam's 1/(sqrt(nu_hat)+eps)); None = identity.
    """
    J = response_jacobian(logp_fn, params, batch)
    return jacobian_batch_gram(J, None, None if precond is None else ravel_pytree(precond)[0])


def preconditioned_gram(logp_fn, params: PyTree, batch: PyTree, precond: PyTree) -> PairGram:
    """Per-pair Gram in the metric of a diagonal preconditioner P (pytree like params, entries > 0):

        G^P_ww = <g_w, P g_w>,  G^P_wl = <g_w, P g_l>,  G^P_ll = <g_l, P g_l>     each [B]

    and cos / rho in that metric. With delta_theta = -eta P grad L the one-pair first-order changes
    are eta (d_w G^P_ww - d_l G^P_wl), eta (d_w G^P_wl - d_l G^P_ll): every condition of the one-pair
    theory holds with G replaced by G^P. P = 1 gives pair_gram.

    >>> pg = preconditioned_gram(policy.logps, params, batch, adam_preconditioner(opt_state))  # doctest: +SKIP
    """
    sqrtP = jax.tree.map(jnp.sqrt, precond)

    def one(ex):
        ex = jax.tree.map(lambda a: a[None], ex)
        gw = jax.grad(lambda p: logp_fn(p, ex)[0][0])(params)
        gl = jax.grad(lambda p: logp_fn(p, ex)[1][0])(params)
        gw = jax.tree.map(jnp.multiply, gw, sqrtP)
        gl = jax.tree.map(jnp.multiply, gl, sqrtP)
        return _tree_vdot(gw, gw), _tree_vdot(gw, gl), _tree_vdot(gl, gl)

    return gram_stats(*jax.vmap(one)(batch))


# ----------------------------------------------------------------------------------------------
# sequence-level Gram: layer-wise identity
# ----------------------------------------------------------------------------------------------
def _left_gram(a: Array, b: Array) -> Array:
    """[S, S'] matrix of <left_a[s], left_b[s']> with int = one-hot rows."""
    a_idx, b_idx = jnp.issubdtype(a.dtype, jnp.integer), jnp.issubdtype(b.dtype, jnp.integer)
    if a_idx and b_idx:
        return (a[:, None] == b[None, :]).astype(jnp.result_type(float))
    if a_idx:
        return b[:, a].T
    if b_idx:
        return a[:, b]
    return a @ b.T


def factored_vdot(fa: Sequence[Factor], fb: Sequence[Factor]) -> Array:
    """<sum_i L_i^T R_i, sum_j L'_j^T R'_j> = sum_{i,j} sum_{s,s'} (L_i L'_j^T)_{ss'} (R_i R'_j^T)_{ss'}."""
    total = 0.0
    for a in fa:
        for b in fb:
            total = total + jnp.sum(_left_gram(a.left, b.left) * (a.right @ b.right.T))
    return total


def _factors_vdot(fa: GradFactors, fb: GradFactors, keep: Callable[[str], bool]) -> Array:
    total = 0.0
    for k in fa.dense:
        if keep(k):
            total = total + jnp.vdot(fa.dense[k], fb.dense[k])
    for k in fa.factored:
        if keep(k):
            total = total + factored_vdot(fa.factored[k], fb.factored[k])
    return total


@partial(jax.jit, static_argnames=("factor_fn", "subset", "chunk_size"))
def pair_gram_layerwise_jit(factor_fn, params, batch, subset, chunk_size):
    paths = param_paths(params)
    keep = subset_predicate(subset)
    selected_leaves(params, subset)  # raises on an empty selection

    def one(ex):
        fw = factor_fn(params, ex.prompt, ex.chosen, ex.chosen_mask)
        fl = factor_fn(params, ex.prompt, ex.rejected, ex.rejected_mask)
        covered = sorted(list(fw.dense) + list(fw.factored))
        if covered != sorted(paths):
            raise ValueError(f"factor_fn must cover every parameter path once; got {covered}, params have {sorted(paths)}")
        return _factors_vdot(fw, fw, keep), _factors_vdot(fw, fl, keep), _factors_vdot(fl, fl, keep)

    return gram_stats(*_map_pairs(one, batch, chunk_size))


def pair_gram_layerwise(factor_fn: Callable[..., GradFactors], params: PyTree, batch: PairBatch, *,
                        subset: Subset = None, chunk_size: int | None = None) -> PairGram:
    """Per-pair Gram via the layer-wise identity <dW, dW'> = sum_{t,s} <a_t, a'_s><delta_t, delta'_s>.

    factor_fn(params, prompt [P], response [T], response_mask [T]) -> GradFactors of that response's
    summed log-prob (e.g. `transformer.grad_factors(cfg)`). Exact: equals `pair_gram` to round-off.
    No per-example parameter-sized gradient is formed; per pair it holds activations, the
    back-propagated signals and S x S' Gram blocks. chunk_size as in `pair_gram`.
    """
    check_pair_inputs(params, batch)
    return pair_gram_layerwise_jit(factor_fn, params, batch, freeze_subset(subset), chunk_size)
