"""Per-pair and per-token gradient geometry (docs/theory.md §1, §3.3, §5.1 R13, §7.3 bugs 1-2).

Sequence level, per pair:  G_ww = |g_w|^2, G_wl = <g_w, g_l>, G_ll = |g_l|^2, cos, and the condition
ratios rho_w = G_wl/G_ww, rho_l = G_wl/G_ll, rho = max(rho_w, rho_l) (Case 1 <=> rho <= 1).
Token level (R13): the T_w x T_l matrix <g_t(y_w), g_u(y_l)>, whose entries sum to G_wl.

Three ways to get the sequence-level Gram, all exact (same numbers up to round-off):

* `pair_gram(logp_fn, ...)`            any JAX model: vmap over pairs of one reverse pass per
                                       response; holds 2 x chunk x |theta| gradient entries at a time.
* `pair_gram_layerwise(factor_fn, ...)` models that expose their gradient in factored form
                                       (e.g. `policies.transformer.grad_factors(cfg)`): for a matrix used
                                       as y_t = a_t W (+ b) the per-response gradient is sum_t a_t delta_t^T,
                                       so  <dW, dW'> = sum_{t,s} <a_t, a'_s> <delta_t, delta'_s>  and no
                                       parameter-sized per-example gradient is ever formed.
                                       Cost per matrix S*S'*(m+n) instead of S*m*n; memory O(S^2) instead
                                       of O(m n) per pair.
* `response_jacobian` / `jacobian_pair_gram` / `batch_gram`: the full [2B, P] Jacobian, its own-pair
                                       Gram and the 2B x 2B batch Gram (cross-pair terms) that the
                                       trainers record; `preconditioned_gram` in a diagonal metric P.
* a Python loop of `jax.grad` calls (what the official code does) lives only in tests/benchmarks.

Parameter subsets (`subset=`): None (all), a list/tuple of key-path prefixes, or a predicate on the
key-path string. Key paths join dict keys / list indices / attribute names with '/', e.g.
'blocks/0/attn/W_qkv'; prefix 'blocks/0/attn' selects that path and everything below it (not
'blocks/0/attn2'). `param_paths(params)` lists them. A subset that selects nothing raises ValueError.

Size: the sequence- and token-level Grams share their subset handling, chunked vmap and input
checks; each of the three exact methods (vmap, layer-wise, token-factored) is kept next to the one
it must equal. The cost model that picks between them is `geometry_cost`.
"""
from __future__ import annotations


from functools import partial
from typing import Callable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from .types import (Array, Factor, GradFactors, PairBatch, PyTree, TokenFactor, TokenGradFactors,  # noqa: F401  (re-exported)
                    param_paths, path_str)

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
def _freeze_subset(subset: Subset):
    """Hashable form (lists -> tuples) so the subset can be a static jit argument."""
    if subset is None or callable(subset):
        return subset
    if isinstance(subset, str):
        return (subset,)
    return tuple(subset)


def subset_predicate(subset: Subset) -> Callable[[str], bool]:
    """Predicate on key-path strings: None -> all; prefixes -> path == p or path startswith p + '/'."""
    subset = _freeze_subset(subset)
    if subset is None:
        return lambda path: True
    if callable(subset):
        return subset
    prefixes = tuple(s.strip("/") for s in subset)
    if not prefixes or any(not isinstance(s, str) for s in subset):
        raise ValueError(f"subset must be None, a predicate, or a non-empty list of path prefixes; got {subset!r}")
    return lambda path: any(path == p or path.startswith(p + "/") for p in prefixes)


def _selected(params: PyTree, subset: Subset) -> list[bool]:
    pred = subset_predicate(subset)
    paths = param_paths(params)
    sel = [bool(pred(p)) for p in paths]
    if not any(sel):
        raise ValueError(f"subset {subset!r} selects no parameter; available paths: {paths}")
    return sel


def _split(params: PyTree, sel: list[bool]):
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
def _pair_gram_vmap(logp_fn, params, batch, subset, chunk_size):
    sel = _selected(params, subset)
    theta, rebuild = _split(params, sel)

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
        from . import geometry_cost  # local import keeps `import geometry` light

        get = (lambda k: batch[k][0]) if isinstance(batch, dict) else (lambda k: getattr(batch, k)[0])
        side = (get("prompt"), get("chosen"), get("chosen_mask"))   # shapes of one response
        method = geometry_cost.choose_seq_method(factor_fn, params, side)
    if method == "layerwise":
        return pair_gram_layerwise(factor_fn, params, batch, subset=subset, chunk_size=chunk_size)
    return _pair_gram_vmap(logp_fn, params, batch, _freeze_subset(subset), chunk_size)


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
def _pair_gram_layerwise(factor_fn, params, batch, subset, chunk_size):
    paths = param_paths(params)
    keep = subset_predicate(subset)
    _selected(params, subset)  # raises on an empty selection

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
    return _pair_gram_layerwise(factor_fn, params, batch, _freeze_subset(subset), chunk_size)


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
    sel = _selected(params, subset)
    theta, rebuild = _split(params, sel)
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
        return _token_gram_factored_jit(factor_fn, params, example_or_batch, _freeze_subset(subset), chunk_size)
    return _token_gram_jit(token_logp_fn, params, example_or_batch, _freeze_subset(subset), chunk_size)


def _auto_token_method(factor_fn, params, example_or_batch) -> str:
    from . import geometry_cost  # local import keeps `import geometry` light

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
    _selected(params, subset)  # raises on an empty selection
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
    programs = {"pair_vmap": _pair_gram_vmap, "pair_layerwise": _pair_gram_layerwise,
                "token_jacrev": _token_gram_jit, "token_factored": _token_gram_factored_jit}
    if method not in programs:
        raise ValueError(f"method must be one of {GRAM_PROGRAMS}, got {method!r}")
    return programs[method].lower(fn, params, batch, _freeze_subset(subset), chunk_size)
