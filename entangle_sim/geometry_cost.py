"""Cost model of the gradient-geometry paths: FLOPs and peak bytes per pair from model shapes.

Paths (all exact; see `geometry`):

    seq_vmap         pair_gram: per response one forward + full backward (signals and weight grads),
                     then three |theta| dot products; holds two |theta| gradients per pair.
    seq_layerwise    pair_gram_layerwise: per response forward + backward to the activations only
                     (no weight gradient), then per matrix the S x S' blocks <a_s,a'_q><delta_s,delta'_q>.
    token_jacrev     token_gram(method='jacrev'): forward + T full backward passes per response, the
                     [T, |theta|] Jacobians and their T_w x T_l products.
    token_factored   token_gram(method='factored'): forward + ONE backward with T cotangents to the
                     activations, read-out closed form, then per matrix contractions
                     sum_{s,q} <a_s,a'_q> <delta_{t,s}, delta'_{u,q}> (S S' U n + T U S n) and the diagonals.

A model is described by its matrix uses (`Use`: positions S, input width m, output width n) plus
`extra_fwd` FLOPs (attention scores, elementwise ops) that every path pays once per forward and
about twice per backward. Shapes come from `transformer_shapes(cfg, P, T)` (exact layer list) or
generically from a factor function's output shapes (`shapes_from_factors`, via jax.eval_shape;
attention and elementwise work unknown there, so extra_fwd = 0).

Where the layer-wise identity pays (derived here): for a weight m x n used at S positions, forming
the weight gradient costs 2 S m n, the Gram blocks 2 S S' (m + n): it wins when S << m n / (m + n)
(384 for 768 x 768; 96 for 128 x 384).

The model counts multiply-adds as 2 FLOPs like XLA's cost analysis; tests check it against
`cost_analysis()` and `memory_analysis()` of the compiled paths.

>>> c = path_costs(transformer_shapes(cfg, P=16, T=16), transformer_shapes(cfg, P=16, T=16))
>>> c["seq_layerwise"].flops, c["seq_layerwise"].bytes
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PATHS = ("seq_vmap", "seq_layerwise", "token_jacrev", "token_factored")


class Use(NamedTuple):
    """One use of a matrix parameter [m, n] at S positions: y = a W (a [S, m], y [S, n]).

    kind: 'dense' (input activations, signal propagated back through it), 'first' (dense, but its
    input is not differentiated: the signal stops there), 'gather' (an embedding lookup E[x]: no
    matmul; m = table rows), 'readout' (logits at the T response positions; closed form per token).
    """

    S: int
    m: int
    n: int
    kind: str = "dense"


class ModelShapes(NamedTuple):
    """One response's shapes: matrix uses, T response tokens, parameter counts, extra forward FLOPs,
    and the floats of activations a backward pass keeps per response (`act_floats`)."""

    uses: tuple
    T: int
    n_params: int
    n_small: int
    extra_fwd: float
    act_floats: float


class Cost(NamedTuple):
    """Per pair: flops (FLOPs, 2 per multiply-add) and bytes (peak working set, excluding params)."""

    flops: float
    bytes: float


# ----------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------
def transformer_shapes(cfg, P: int, T: int) -> ModelShapes:
    """Shapes of one response (prompt P, response T) of `policies.transformer` with config cfg."""
    S, D, F, V, H = P + T - 1, cfg.d_model, cfg.ff, cfg.vocab, cfg.n_heads
    uses = [Use(S, V, D, "gather"), Use(S, cfg.max_len, D, "gather")]
    for _ in range(cfg.n_layers):
        uses += [Use(S, D, 3 * D), Use(S, D, D), Use(S, D, F), Use(S, F, D)]
    uses.append(Use(T, D, V, "readout"))
    # attention: scores and weighted values 2 * 2 S^2 D; elementwise (LayerNorm ~10/elt, GELU ~20/elt,
    # softmax ~6/elt, residual adds) -- approximations, checked against XLA in the tests
    attn = cfg.n_layers * (4 * S * S * D + 6 * H * S * S)
    elt = cfg.n_layers * S * (2 * 10 * D + 20 * F + 4 * D) + S * 10 * D + 6 * T * V
    # kept for the backward per layer: LN outputs, qkv, attention probs, o, MLP in/out
    act = cfg.n_layers * (S * (D + 3 * D + D + D + 2 * F + 2 * D) + H * S * S) + S * D + 2 * T * V
    n_small = cfg.n_layers * (4 * D + 3 * D + D + F + D) + 2 * D
    return ModelShapes(tuple(uses), T, cfg.n_params, n_small, float(attn + elt), float(act))


def shapes_from_factors(factor_fn: Callable, params, example) -> tuple[ModelShapes, ModelShapes]:
    """(chosen, rejected) shapes of any model from its `token_gram` factor function's output shapes
    (jax.eval_shape: nothing is computed). Attention / elementwise work is unknown here (extra_fwd = 0);
    a factor function with a `cost_shapes(example)` attribute supplies exact shapes instead."""
    fw, fl = jax.eval_shape(factor_fn, params, example)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return _shapes_of(fw, n_params), _shapes_of(fl, n_params)


def _shapes_of(f, n_params) -> ModelShapes:
    uses, T = [], None
    for us in f.factored.values():
        for u in us:
            T = u.right.shape[0]
            n = u.right.shape[-1]
            if jnp.issubdtype(u.left.dtype, jnp.integer):
                uses.append(Use(u.left.shape[0], 1, n, "gather"))
            elif u.left.ndim == 3:    # per-token left: closed-form read-out at one position per token
                uses.append(Use(T, u.left.shape[-1], n, "readout"))
            else:
                uses.append(Use(u.left.shape[0], u.left.shape[1], n, "dense"))
    for g in f.dense.values():
        T = g.shape[0]
    n_small = sum(int(np.prod(g.shape[1:])) for g in f.dense.values())
    act = sum(u.S * (u.m + u.n) for u in uses if u.kind == "dense")
    return ModelShapes(tuple(uses), int(T), n_params, n_small, 0.0, float(act))


# ----------------------------------------------------------------------------------------------
# FLOPs and bytes
# ----------------------------------------------------------------------------------------------
def _fwd(s: ModelShapes) -> float:
    return sum(2.0 * u.S * u.m * u.n for u in s.uses if u.kind in ("dense", "first", "readout")) + s.extra_fwd


def _bwd_act(s: ModelShapes, readout: bool = True) -> float:
    """One backward to the activations (signals only): dA = dY W^T per dense use, ~2x extra work."""
    kinds = ("dense", "readout") if readout else ("dense",)
    return sum(2.0 * u.S * u.m * u.n for u in s.uses if u.kind in kinds) + 2 * s.extra_fwd


def _bwd_weights(s: ModelShapes) -> float:
    return sum(2.0 * u.S * u.m * u.n for u in s.uses if u.kind != "gather")


def _left_gram(u: Use, v: Use) -> float:
    return 2.0 * u.S * v.S * (u.m if u.kind != "gather" else 1)


def _seq_block(u: Use, v: Use) -> float:
    # left Gram + right Gram + elementwise product and sum
    return _left_gram(u, v) + 2.0 * u.S * v.S * u.n + 2.0 * u.S * v.S


def _tok_block(u: Use, v: Use, T: int, U: int) -> float:
    if u.kind == "readout":       # per-token left and right at one position: T U (m + n)
        return 2.0 * T * U * (u.m + u.n)
    return _left_gram(u, v) + 2.0 * u.S * v.S * U * u.n + 2.0 * T * U * u.S * u.n


def path_costs(sw: ModelShapes, sl: ModelShapes, dtype_bytes: int = 4) -> dict[str, Cost]:
    """{path: Cost per pair} for chosen shapes sw and rejected shapes sl (module docstring)."""
    N, Tw, Tl = sw.n_params, sw.T, sl.T
    out = {}
    # sequence level ------------------------------------------------------------------------
    fl = sum(_fwd(s) + _bwd_act(s) + _bwd_weights(s) for s in (sw, sl)) + 6.0 * N
    by = 2 * N + 2 * max(sw.act_floats, sl.act_floats)
    out["seq_vmap"] = Cost(fl, by * dtype_bytes)
    blocks = 0.0
    for a, b in ((sw, sw), (sw, sl), (sl, sl)):
        blocks += sum(_seq_block(u, v) for u, v in zip(a.uses, b.uses)) + 2.0 * sw.n_small
    fl = sum(_fwd(s) + _bwd_act(s) for s in (sw, sl)) + blocks
    S = max(u.S for u in sw.uses)
    by = 2 * (sw.act_floats + sl.act_floats) + 3 * S * S * len(sw.uses)
    out["seq_layerwise"] = Cost(fl, by * dtype_bytes)
    # token level --------------------------------------------------------------------------
    # jacrev of (tok_w, tok_l) sends each of the T_w + T_l cotangents through BOTH responses'
    # backward (the other response's cotangent is zero but dense), hence the sum over sides
    bwd = sum(_bwd_act(s) + _bwd_weights(s) for s in (sw, sl))
    fl = sum(_fwd(s) for s in (sw, sl)) + (Tw + Tl) * bwd
    fl += 2.0 * Tw * Tl * N + 2.0 * (Tw + Tl) * N
    by = (Tw + Tl) * N + Tw * max(sw.act_floats, sl.act_floats)
    out["token_jacrev"] = Cost(fl, by * dtype_bytes)
    # read-out: logits + g_hf = r W^T closed form; body: T-cotangent backward to the activations
    fl = sum(_fwd(s) + sum(2.0 * u.S * u.m * u.n for u in s.uses if u.kind == "readout")
             + s.T * _bwd_act(s, readout=False) for s in (sw, sl))
    fl += sum(_tok_block(u, v, Tw, Tl) for u, v in zip(sw.uses, sl.uses))
    fl += sum(_tok_block(u, u, a.T, 1) for a in (sw, sl) for u in a.uses)   # diagonals (norms)
    fl += 2.0 * Tw * Tl * sw.n_small
    # held at once: both responses' signals [T, S, n] at every tapped output, plus one contraction
    # intermediate [U, S, n]
    sig = sum(a.T * sum(u.S * u.n for u in a.uses if u.kind == "dense") for a in (sw, sl))
    by = sig + sw.act_floats + sl.act_floats + Tl * S * max(u.n for u in sw.uses)
    out["token_factored"] = Cost(fl, by * dtype_bytes)
    return out


def transformer_costs(cfg, P: int, T_w: int, T_l: int | None = None, dtype_bytes: int = 4) -> dict[str, Cost]:
    """path_costs of `policies.transformer` with config cfg, prompt P, responses T_w, T_l (default T_w).

    >>> transformer_costs(TransformerConfig(d_model=128, vocab=64), P=8, T_w=32)["seq_layerwise"]
    """
    return path_costs(transformer_shapes(cfg, P, T_w), transformer_shapes(cfg, P, T_l or T_w), dtype_bytes)


# ----------------------------------------------------------------------------------------------
# auto selection
# ----------------------------------------------------------------------------------------------
def choose_token_method(factor_fn: Callable, params, example) -> str:
    """'factored' or 'jacrev', whichever the model predicts to need fewer FLOPs for this example."""
    if hasattr(factor_fn, "cost_shapes"):     # the model's exact layer list (e.g. the transformer)
        sw, sl = factor_fn.cost_shapes(example)
    else:
        sw, sl = shapes_from_factors(factor_fn, params, example)
    c = path_costs(sw, sl)
    return "factored" if c["token_factored"].flops <= c["token_jacrev"].flops else "jacrev"


def choose_seq_method(factor_fn: Callable, params, example_side) -> str:
    """'layerwise' or 'vmap' for `pair_gram` from a sequence-level factor function's shapes.

    example_side: (prompt [P], response [T], mask [T]) of one response (its shapes are what counts).
    A factor function with a `cost_shapes(prompt, response)` attribute supplies its exact shapes.
    """
    if hasattr(factor_fn, "cost_shapes"):
        s = factor_fn.cost_shapes(*example_side[:2])
        c = path_costs(s, s)
        return "layerwise" if c["seq_layerwise"].flops <= c["seq_vmap"].flops else "vmap"
    f = jax.eval_shape(factor_fn, params, *example_side)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    uses = []
    for us in f.factored.values():
        for u in us:
            integer = jnp.issubdtype(u.left.dtype, jnp.integer)
            uses.append(Use(u.left.shape[0], 1 if integer else u.left.shape[1], u.right.shape[-1],
                            "gather" if integer else "dense"))
    n_small = sum(int(np.prod(g.shape)) for g in f.dense.values())
    act = sum(u.S * (u.m + u.n) for u in uses if u.kind == "dense")
    s = ModelShapes(tuple(uses), int(example_side[1].shape[0]), n_params, n_small, 0.0, float(act))
    c = path_costs(s, s)
    return "layerwise" if c["seq_layerwise"].flops <= c["seq_vmap"].flops else "vmap"
