"""Tiny decoder-only transformer policy in plain JAX: causal, pre-LayerNorm, learned positions.

Why plain JAX rather than flax / equinox:
* the Policy protocol is two pure functions over a params pytree; a nested dict of arrays *is*
  that pytree, and its key paths ('blocks/0/attn/W_qkv') are what `geometry`'s `subset=` selects;
* the layer-wise Gram identity (geometry.pair_gram_layerwise) needs each dense layer's inputs a_t
  and the back-propagated signals delta_t at its output. Written out explicitly, every dense output
  gets an additive zero "tap" and delta = d(log-prob)/d(tap); no framework interception needed;
* no dependency beyond jax.

Sequence layout (one pair side): x = prompt [P] ++ response [T]; the model reads x[:-1]
(S = P + T - 1 positions) and position P - 1 + t predicts response token t. Response padding is on
the right, so (causality) padded tokens never influence real ones; their log-probs are set to 0.

Parameters (untied; tied drops 'unembed' and reads out with embed/tok^T):
    embed/tok [V, D], embed/pos [max_len, D]
    blocks/i/ln1/{scale,bias} [D], blocks/i/attn/W_qkv [D, 3D], b_qkv [3D], W_o [D, D], b_o [D]
    blocks/i/ln2/{scale,bias} [D], blocks/i/mlp/W_in [D, F], b_in [F], W_out [F, D], b_out [D]
    ln_f/{scale,bias} [D], unembed/W [D, V]

>>> cfg = TransformerConfig(vocab=16, d_model=32, n_layers=2, n_heads=4, max_len=24)
>>> policy = make(cfg); params = policy.init(jax.random.key(0))
>>> tok_w, tok_l = policy.token_logps(params, batch)  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import math
from functools import lru_cache, partial

import jax
import jax.numpy as jnp

from ..geometry_cost import transformer_shapes  # a leaf module (jax/numpy only): see tests/test_architecture.py
from ..types import (Array, Factor, GradFactors, PairBatch, Policy, PyTree, TokenFactor, TokenGradFactors,
                     param_paths)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Architecture of the tiny decoder (frozen, hashable: usable as a static jit argument).

    d_ff defaults to 4 * d_model. init_std is the N(0, std) scale of matrices; residual output
    projections are further scaled by 1/sqrt(2 n_layers) (GPT-2). tie_embeddings=False by default;
    analysis code must never flip it (theory §7.3 bug 5).
    """

    vocab: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    max_len: int = 64
    d_ff: int | None = None
    tie_embeddings: bool = False
    init_std: float = 0.02
    ln_eps: float = 1e-5

    def __post_init__(self):
        for name in ("vocab", "d_model", "n_layers", "n_heads", "max_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TransformerConfig.{name} must be a positive int, got {v!r}")
        if self.d_ff is not None and (not isinstance(self.d_ff, int) or self.d_ff < 1):
            raise ValueError(f"TransformerConfig.d_ff must be None or a positive int, got {self.d_ff!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.max_len < 2:
            raise ValueError("max_len must be >= 2 (at least one prompt and one response token)")
        if not self.init_std > 0 or not self.ln_eps > 0:
            raise ValueError("init_std and ln_eps must be > 0")

    @property
    def ff(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def n_params(self) -> int:
        D, F, V = self.d_model, self.ff, self.vocab
        block = 2 * 2 * D + D * 3 * D + 3 * D + D * D + D + D * F + F + F * D + D
        return V * D + self.max_len * D + self.n_layers * block + 2 * D + (0 if self.tie_embeddings else D * V)


# ----------------------------------------------------------------------------------------------
def init(cfg: TransformerConfig, key: Array) -> PyTree:
    """Random parameters (dtype: jax's default float, i.e. float64 under jax_enable_x64)."""
    D, F, V, L = cfg.d_model, cfg.ff, cfg.vocab, cfg.n_layers
    keys = iter(jax.random.split(key, 3 + 4 * L))
    std, res_std = cfg.init_std, cfg.init_std / math.sqrt(2 * L)

    def normal(shape, s):
        return s * jax.random.normal(next(keys), shape)

    def ln():
        return {"scale": jnp.ones(D), "bias": jnp.zeros(D)}

    params = {
        "embed": {"tok": normal((V, D), std), "pos": normal((cfg.max_len, D), std)},
        "blocks": [
            {"ln1": ln(),
             "attn": {"W_qkv": normal((D, 3 * D), std), "b_qkv": jnp.zeros(3 * D),
                      "W_o": normal((D, D), res_std), "b_o": jnp.zeros(D)},
             "ln2": ln(),
             "mlp": {"W_in": normal((D, F), std), "b_in": jnp.zeros(F),
                     "W_out": normal((F, D), res_std), "b_out": jnp.zeros(D)}}
            for _ in range(L)],
        "ln_f": ln(),
    }
    if not cfg.tie_embeddings:
        params["unembed"] = {"W": normal((D, V), std)}
    return params


def _layer_norm(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    var = jnp.mean((x - mu) ** 2, -1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * p["scale"][None, :] + p["bias"][None, :]


def _check_lengths(cfg, P, T):
    if P < 1 or T < 1:
        raise ValueError(f"need at least one prompt and one response token, got P={P}, T={T}")
    if P + T - 1 > cfg.max_len:
        raise ValueError(f"prompt + response - 1 = {P + T - 1} positions exceed max_len={cfg.max_len}")


def tap_shapes(cfg: TransformerConfig, P: int, T: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the additive taps of one sequence: 'embed' (token + position embedding output),
    each dense layer's output (keyed by its weight path) and the read-out logits ('unembed')."""
    S, D = P + T - 1, cfg.d_model
    shapes = {"embed": (S, D), "unembed": (T, cfg.vocab)}
    for i in range(cfg.n_layers):
        shapes |= {f"blocks/{i}/attn/W_qkv": (S, 3 * D), f"blocks/{i}/attn/W_o": (S, D),
                   f"blocks/{i}/mlp/W_in": (S, cfg.ff), f"blocks/{i}/mlp/W_out": (S, D)}
    return shapes


def zero_taps(cfg: TransformerConfig, P: int, T: int, dtype=None) -> dict[str, Array]:
    """All-zero taps (see `tap_shapes`); differentiate w.r.t. them to get the signals delta."""
    return {k: jnp.zeros(s, dtype) for k, s in tap_shapes(cfg, P, T).items()}


def _body(cfg: TransformerConfig, params, prompt, response, taps):
    """One sequence up to the read-out -> (final hidden hf [T, D] at the positions predicting the
    response, recorded inputs of every tapped dense layer)."""
    P, T = prompt.shape[0], response.shape[0]
    _check_lengths(cfg, P, T)
    H, D = cfg.n_heads, cfg.d_model
    dh = D // H
    x = jnp.concatenate([prompt, response[:-1]])          # [S]
    S = x.shape[0]
    inputs = {}

    def tap(name, y):
        return y if taps is None else y + taps[name]

    def dense(name, a, W, b):
        inputs[name] = a
        return tap(name, a @ W + b[None, :])

    h = tap("embed", params["embed"]["tok"][x] + params["embed"]["pos"][:S])   # [S, D]
    causal = jnp.tril(jnp.ones((S, S), bool))
    for i, blk in enumerate(params["blocks"]):
        at = blk["attn"]
        qkv = dense(f"blocks/{i}/attn/W_qkv", _layer_norm(h, blk["ln1"], cfg.ln_eps), at["W_qkv"], at["b_qkv"])
        q, k, v = (z.reshape(S, H, dh) for z in jnp.split(qkv, 3, axis=-1))
        scores = jnp.einsum("shd,uhd->hsu", q, k) / math.sqrt(dh)
        # finite large negative (not -inf) keeps gradients NaN-free
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        o = jnp.einsum("hsu,uhd->shd", jax.nn.softmax(scores, axis=-1), v).reshape(S, D)
        h = h + dense(f"blocks/{i}/attn/W_o", o, at["W_o"], at["b_o"])
        m = blk["mlp"]
        u = jax.nn.gelu(dense(f"blocks/{i}/mlp/W_in", _layer_norm(h, blk["ln2"], cfg.ln_eps), m["W_in"], m["b_in"]))
        h = h + dense(f"blocks/{i}/mlp/W_out", u, m["W_out"], m["b_out"])
    hf = _layer_norm(h, params["ln_f"], cfg.ln_eps)[P - 1:]     # [T, D] positions predicting the response
    return hf, inputs


def _readout_matrix(cfg: TransformerConfig, params) -> Array:
    """[D, V]: logits = hf @ this (embed/tok^T when tied)."""
    return params["embed"]["tok"].T if cfg.tie_embeddings else params["unembed"]["W"]


def _apply(cfg: TransformerConfig, params, prompt, response, mask, taps):
    """One sequence -> (token log-probs [T], recorded inputs of every tapped layer, final hidden [T, D])."""
    hf, inputs = _body(cfg, params, prompt, response, taps)
    logits = hf @ _readout_matrix(cfg, params)
    if taps is not None:
        logits = logits + taps["unembed"]
    if not cfg.tie_embeddings:
        inputs["unembed/W"] = hf
    logp = jax.nn.log_softmax(logits, axis=-1)
    tok = jnp.take_along_axis(logp, response[:, None], axis=-1)[:, 0]
    return jnp.where(mask > 0, tok, 0.0), inputs, hf


def response_hidden_states(cfg: TransformerConfig, params: PyTree, prompt: Array, response: Array,
                           mask: Array) -> Array:
    """[T, d_model] final (layer-normed) hidden state at the positions that predict each response token."""
    return _apply(cfg, params, prompt, response, mask, None)[2]


def sequence_token_logps(cfg: TransformerConfig, params: PyTree, prompt: Array, response: Array,
                         mask: Array, taps: dict[str, Array] | None = None) -> Array:
    """log pi(y_t | x, y_<t) for one sequence: prompt [P], response [T], mask [T] -> [T] (0 where masked).

    taps (optional, from `zero_taps`) are added to the embedding output, every dense output and the
    logits; e.g. d/d taps['embed'] is the gradient w.r.t. each position's input embedding.
    """
    return _apply(cfg, params, prompt, response, mask, taps)[0]


def make(cfg: TransformerConfig) -> Policy:
    """Policy(name, init, token_logps): token_logps(params, batch) -> ([B, T_w], [B, T_l])."""

    seq = jax.vmap(partial(sequence_token_logps, cfg), in_axes=(None, 0, 0, 0))

    def token_logps(params: PyTree, batch: PairBatch) -> tuple[Array, Array]:
        return (seq(params, batch.prompt, batch.chosen, batch.chosen_mask),
                seq(params, batch.prompt, batch.rejected, batch.rejected_mask))

    return Policy(name="transformer", init=partial(init, cfg), token_logps=token_logps)


# ----------------------------------------------------------------------------------------------
def _is_factored(path: str) -> bool:
    last = path.rsplit("/", 1)[-1]
    return last.startswith("W") or path in ("embed/tok", "embed/pos")


def grad_factors(cfg: TransformerConfig):
    """Factor function for `geometry.pair_gram_layerwise`: the gradient of one response's summed
    log-prob, with matrices in factored form and small leaves (biases, LayerNorm) materialised.

    fn(params, prompt [P], response [T], mask [T]) -> GradFactors
        W_qkv, W_o, W_in, W_out, unembed/W:  Factor(inputs a [S, in], delta [S, out])
        embed/tok:  Factor(tokens [S] (one-hot), delta_embed [S, D]) (+ tied read-out
                    Factor(delta_logits [T, V], final hidden [T, D]))
        embed/pos:  Factor(arange(S) (one-hot), delta_embed [S, D])
    One forward and one backward to the taps and small leaves; the weight-matrix gradients are never
    formed (the matrices are closed-over constants of the differentiated function).
    The returned function is cached per cfg so jit caches keyed on it are reused.
    """
    return _grad_factors_fn(cfg)


def _tapped_vjp(cfg: TransformerConfig, params, prompt, response, run, readout_tap: bool = True):
    """vjp of `run(full params, taps) -> (out, aux)` w.r.t. (small leaves, taps): the matrices are
    closed-over constants, so no weight-matrix gradient is formed, while the taps give the
    back-propagated signal at every matrix output. The small leaves (biases, LayerNorm) are
    differentiated directly. Returns (out, vjp, aux, paths of the small leaves).
    Shared by the sequence-level (`grad_factors`) and token-level (`token_grad_factors`) factors."""
    P, T = prompt.shape[0], response.shape[0]
    _check_lengths(cfg, P, T)
    flat, treedef = jax.tree_util.tree_flatten(params)
    paths = param_paths(params)
    big = [_is_factored(p) for p in paths]
    small = [leaf for leaf, b in zip(flat, big) if not b]

    def f(small_leaves, taps):
        it = iter(small_leaves)
        return run(jax.tree.unflatten(treedef, [leaf if b else next(it) for leaf, b in zip(flat, big)]), taps)

    taps = zero_taps(cfg, P, T, params["embed"]["tok"].dtype)
    if not readout_tap:
        taps.pop("unembed")
    out, vjp, aux = jax.vjp(f, small, taps, has_aux=True)
    return out, vjp, aux, [p for p, b in zip(paths, big) if not b]


def _embedding_uses(factor, prompt, response, delta_embed):
    """(token use, position use) of the input embeddings: one-hot rows x_s (the model's input
    tokens: prompt then response[:-1]) and positions s, each with the signal at the embedding output."""
    x = jnp.concatenate([prompt, response[:-1]])
    return factor(x, delta_embed), factor(jnp.arange(x.shape[0]), delta_embed)


@lru_cache(maxsize=None)
def _grad_factors_fn(cfg: TransformerConfig):
    def fn(params, prompt, response, mask):
        def run(full, taps):
            tok, inputs, hf = _apply(cfg, full, prompt, response, mask, taps)
            return tok.sum(), (inputs, hf)

        _, vjp, (inputs, hf), small_paths = _tapped_vjp(cfg, params, prompt, response, run)
        g_small, delta = vjp(jnp.ones((), params["embed"]["tok"].dtype))
        dense = dict(zip(small_paths, g_small))
        # dense taps are keyed by their weight path; the read-out tap is 'unembed'
        factored = {name: (Factor(a, delta["unembed" if name == "unembed/W" else name]),)
                    for name, a in inputs.items()}
        tok_use, pos_use = _embedding_uses(Factor, prompt, response, delta["embed"])
        factored["embed/tok"] = (tok_use, Factor(delta["unembed"], hf)) if cfg.tie_embeddings else (tok_use,)
        factored["embed/pos"] = (pos_use,)
        return GradFactors(dense, factored)

    # exact layer list for geometry_cost's path selection
    fn.cost_shapes = lambda prompt, response: transformer_shapes(cfg, prompt.shape[0], response.shape[0])
    return fn


# ----------------------------------------------------------------------------------------------
def token_grad_factors(cfg: TransformerConfig):
    """Factor function for `geometry.token_gram(..., method='factored')`: per-token gradients of both
    responses of one pair, fn(params, example) -> (TokenGradFactors chosen, TokenGradFactors rejected).

    example: one pair (fields prompt [P], chosen [T_w], rejected [T_l] and their masks). Per response:
        read-out (unembed/W, or the tied use of embed/tok): closed form, grad_t = h_t r_t^T with
                    r_t = mask_t (e_{y_t} - p_t) -- no backward through the logits;
        W_qkv, W_o, W_in, W_out: TokenFactor(inputs a [S, in], delta [T, S, out]),
                    delta_{t,s} = d logp_t / d(output at s);
        embed/tok, embed/pos: one-hot TokenFactor(tokens / positions [S], delta_embed [T, S, D]);
        biases, LayerNorm: per-token gradients [T, ...].
    One forward of the body and ONE batched vjp with T cotangents (row t of d/d hf: W r_t), so the
    signals of all T tokens come from a single vmapped backward to the activations; no weight
    gradient is formed. Cached per cfg.
    """
    return _token_grad_factors_fn(cfg)


def _token_side(cfg: TransformerConfig, params, prompt, response, mask) -> TokenGradFactors:
    T = response.shape[0]
    dtype = params["embed"]["tok"].dtype
    hf, vjp, inputs, small_paths = _tapped_vjp(cfg, params, prompt, response,
                                               lambda full, taps: _body(cfg, full, prompt, response, taps),
                                               readout_tap=False)
    W = _readout_matrix(cfg, params)                                   # [D, V]
    p = jax.nn.softmax(hf @ W, axis=-1)                                # [T, V]
    r = (jax.nn.one_hot(response, cfg.vocab, dtype=dtype) - p) * mask[:, None]   # d logp_t / d logits_t
    g_hf = r @ W.T                                                     # [T, D] d logp_t / d hf_t
    # cotangent t is g_hf[t] on row t of hf, zero elsewhere: all T backward signals in one vmapped vjp
    cts = jnp.eye(T, dtype=dtype)[:, :, None] * g_hf[None, :, :]      # [T, T, D]
    g_small, delta = jax.vmap(vjp)(cts)
    dense = dict(zip(small_paths, g_small))
    factored = {name: (TokenFactor(a, delta[name]),) for name, a in inputs.items()}
    tok_use, pos_use = _embedding_uses(TokenFactor, prompt, response, delta["embed"])
    if cfg.tie_embeddings:
        factored["embed/tok"] = (tok_use, TokenFactor(r[:, None, :], hf[:, None, :]))   # grad_t [V, D] = r_t h_t^T
    else:
        factored["unembed/W"] = (TokenFactor(hf[:, None, :], r[:, None, :]),)          # grad_t [D, V] = h_t r_t^T
        factored["embed/tok"] = (tok_use,)
    factored["embed/pos"] = (pos_use,)
    return TokenGradFactors(dense, factored)


def _field(example, name):
    """example.name or example[name]: a PairBatch, any NamedTuple with these fields, or a dict."""
    return example[name] if isinstance(example, dict) else getattr(example, name)


@lru_cache(maxsize=None)
def _token_grad_factors_fn(cfg: TransformerConfig):
    def fn(params, example):
        g = partial(_field, example)
        return (_token_side(cfg, params, g("prompt"), g("chosen"), g("chosen_mask")),
                _token_side(cfg, params, g("prompt"), g("rejected"), g("rejected_mask")))

    def cost_shapes(ex):
        P = _field(ex, "prompt").shape[-1]
        return (transformer_shapes(cfg, P, _field(ex, "chosen").shape[-1]),
                transformer_shapes(cfg, P, _field(ex, "rejected").shape[-1]))

    fn.cost_shapes = cost_shapes
    return fn


def gpt2_small_config(*, tie_embeddings: bool = True, max_len: int = 1024) -> TransformerConfig:
    """GPT-2-small shapes (12 layers, width 768, 12 heads, vocabulary 50257, tied read-out by default:
    124.4M parameters). Random init only (`init`); nothing is downloaded.

    >>> gpt2_small_config().n_params
    124439808
    """
    return TransformerConfig(vocab=50257, d_model=768, n_layers=12, n_heads=12, max_len=max_len,
                             tie_embeddings=tie_embeddings)
