"""Softmax last layer on causal context features (theory §5.2 Setting A, §5.3 Setting B).

Model, for one example with prompt x = (x_1..x_P) and response y = (y_1..y_T):

    z      = (x_1, .., x_P, y_1, .., y_T)                  one token sequence, vocabulary K
    s_j    = sum_{i <= j} decay^(j - i) E[z_i]             exponentially decayed prefix encoder
    h_t    = f(s_{P + t - 1})                              context of y_t: prompt and y_<t only
    p_t    = softmax(W h_t),  log pi(y_t | x, y_<t) = log p_t[y_t]

with f = tanh (default) or identity, E [K, d] a token-embedding table and W [K, d] the
unembedding. h_t never sees y_t or later tokens (causal), so the last response token's embedding
is unused.

* Setting A (trainable_embedding=False): params {'W'}; E is frozen, drawn from cfg.seed as
  embed_scale * N(0, 1). Per-token gradient g_t(y) = (e_{y_t} - p_t) h_t^T (R14).
* Setting B (trainable_embedding=True): params {'W', 'E'}; E starts from the same seed draw.
  With f = identity and a one-token prompt, h = E[x_1] is itself a parameter and
  d log pi(a) / dh = w_a - wbar (R18).

Batch convention: PairBatch with prompt [B, P] tokens (all real, P >= 1), chosen [B, T_w],
rejected [B, T_l], masks 1.0 on real tokens; padding must be on the right (causality makes the
real tokens independent of it). token_logps returns ([B, T_w], [B, T_l]), exactly 0 where masked.

Example:
    >>> cfg = LastLayerConfig(K=8, d=4)
    >>> pol = make(cfg); params = pol.init(jax.random.PRNGKey(0))   # {'W': [8, 4]}
    >>> params['W'].shape
    (8, 4)
    >>> fp = features_and_probs(cfg, params, batch)  # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..types import Array, PairBatch, Policy, PyTree

NONLINEARITIES = ("tanh", "identity")


@dataclass(frozen=True)
class LastLayerConfig:
    """K vocabulary, d feature width, decay in [0, 1] of the prefix encoder.

    W init = init_scale * N(0, 1) / sqrt(d); E = embed_scale * N(0, 1) from `seed`.
    """

    K: int
    d: int
    decay: float = 0.5
    trainable_embedding: bool = False
    seed: int = 0
    nonlinearity: str = "tanh"
    embed_scale: float = 1.0
    init_scale: float = 1.0

    def __post_init__(self):
        from .. import validate as _v

        _v.integer("LastLayerConfig: K", self.K)  # type: 2.5 or '3' refused (TypeError)
        _v.integer("LastLayerConfig: d", self.d)
        if int(self.K) < 2:
            raise ValueError(f"LastLayerConfig: need vocabulary K >= 2, got K={self.K}")
        if int(self.d) < 1:
            raise ValueError(f"LastLayerConfig: need feature width d >= 1, got d={self.d}")
        _v.real("LastLayerConfig: decay", self.decay)
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"LastLayerConfig: decay must lie in [0, 1], got {self.decay}")
        _v.integer("LastLayerConfig: seed", self.seed, lo=0)
        _v.real("LastLayerConfig: embed_scale", self.embed_scale, lo=0)
        _v.real("LastLayerConfig: init_scale", self.init_scale, lo=0)
        if self.nonlinearity not in NONLINEARITIES:
            raise ValueError(f"LastLayerConfig: nonlinearity must be one of {NONLINEARITIES}, "
                             f"got {self.nonlinearity!r}")


class FeaturesProbs(NamedTuple):
    """Context features and next-token distributions per response position.

    h_w [B, T_w, d], p_w [B, T_w, K], h_l [B, T_l, d], p_l [B, T_l, K] (padding positions included).
    """

    h_w: Array
    p_w: Array
    h_l: Array
    p_l: Array


def frozen_embedding(cfg: LastLayerConfig) -> Array:
    """E [K, d] = embed_scale * N(0, 1), deterministic from cfg.seed (Setting A's frozen table)."""
    return cfg.embed_scale * jax.random.normal(jax.random.PRNGKey(cfg.seed), (cfg.K, cfg.d))


def _nonlin(name: str):
    return jnp.tanh if name == "tanh" else (lambda s: s)


def context_features(emb: Array, P: int, decay: float, nonlinearity: str = "tanh") -> Array:
    """h [T, d] from the embedded sequence emb [P + T, d] (prompt then response), one example.

    h_t = f(sum_{i <= P+t-1} decay^(P+t-1-i) emb_i): a causal (lower-triangular) decay filter, so
    h_t depends on emb_0 .. emb_{P+t-1} only.
    """
    N = emb.shape[0]
    i = jnp.arange(N)[:, None]
    j = jnp.arange(N)[None, :]
    # where() rather than decay**(i-j) alone: negative powers would be huge above the diagonal
    D = jnp.where(i >= j, jnp.asarray(decay, emb.dtype) ** jnp.maximum(i - j, 0), 0.0)
    s = D @ emb
    return _nonlin(nonlinearity)(s[P - 1:N - 1])


def logps_from_embeddings(W: Array, emb: Array, response: Array, mask: Array, P: int,
                          decay: float, nonlinearity: str = "tanh") -> Array:
    """Per-token log pi(y_t | x, y_<t) [T] of one example from embeddings emb [P + T, d].

    Exposed so causality can be tested against the inputs: d out[t] / d emb[P + u] = 0 for u >= t.
    """
    h = context_features(emb, P, decay, nonlinearity)
    lp = jax.nn.log_softmax(h @ W.T, axis=-1)
    lp_y = jnp.take_along_axis(lp, response[:, None], axis=-1)[:, 0]
    return jnp.where(mask > 0, lp_y, 0.0)  # exact 0 on padding


def _embedding(cfg: LastLayerConfig, params: PyTree, E_frozen: Array) -> Array:
    return params["E"] if cfg.trainable_embedding else E_frozen


def make(cfg: LastLayerConfig) -> Policy:
    """Last-layer `Policy` for Setting A or B (see module docstring)."""
    E0 = frozen_embedding(cfg)

    def init(key: Array) -> PyTree:
        W = cfg.init_scale * jax.random.normal(key, (cfg.K, cfg.d), dtype=E0.dtype) / np.sqrt(cfg.d)
        return {"W": W, "E": E0} if cfg.trainable_embedding else {"W": W}

    def one(W, E, prompt, response, mask):
        emb = E[jnp.concatenate([prompt, response])]
        return logps_from_embeddings(W, emb, response, mask, prompt.shape[0], cfg.decay, cfg.nonlinearity)

    batched = jax.vmap(one, in_axes=(None, None, 0, 0, 0))

    def token_logps(params: PyTree, batch: PairBatch) -> tuple[Array, Array]:
        W, E = params["W"], _embedding(cfg, params, E0)
        return (batched(W, E, batch.prompt, batch.chosen, batch.chosen_mask),
                batched(W, E, batch.prompt, batch.rejected, batch.rejected_mask))

    tag = "B" if cfg.trainable_embedding else "A"
    return Policy(name=f"lastlayer-{tag}(K={cfg.K},d={cfg.d},decay={cfg.decay})", init=init,
                  token_logps=token_logps)


def features_and_probs(cfg: LastLayerConfig, params: PyTree, batch: PairBatch) -> FeaturesProbs:
    """h_t and p_t = softmax(W h_t) for every response position of both responses (R14-R17 checks)."""
    W, E = params["W"], _embedding(cfg, params, frozen_embedding(cfg))

    def one(prompt, response):
        h = context_features(E[jnp.concatenate([prompt, response])], prompt.shape[0], cfg.decay,
                             cfg.nonlinearity)
        return h, jax.nn.softmax(h @ W.T, axis=-1)

    h_w, p_w = jax.vmap(one)(batch.prompt, batch.chosen)
    h_l, p_l = jax.vmap(one)(batch.prompt, batch.rejected)
    return FeaturesProbs(h_w, p_w, h_l, p_l)


def token_grad_factors(cfg: LastLayerConfig):
    """Factor function for `geometry.token_gram(..., method='factored')`:
    fn(params, example) -> (TokenGradFactors chosen, TokenGradFactors rejected) for one pair.

    W [K, d]: closed form (R14), grad_t W = r_t h_t^T with r_t = mask_t (e_{y_t} - p_t), no backward.
    E [K, d] (Setting B): grad_t E = sum_i onehot(z_i) delta_{t,i}^T, delta_{t,i} = d logp_t / d emb_i,
    all T signals from one vjp vmapped over T cotangents (row t of d/dh: r_t W).
    """
    from ..types import TokenFactor, TokenGradFactors

    E0 = frozen_embedding(cfg)

    def side(params, prompt, response, mask):
        W, E = params["W"], _embedding(cfg, params, E0)
        z = jnp.concatenate([prompt, response])
        P, T = prompt.shape[0], response.shape[0]
        h, vjp = jax.vjp(lambda emb: context_features(emb, P, cfg.decay, cfg.nonlinearity), E[z])
        p = jax.nn.softmax(h @ W.T, axis=-1)
        r = (jax.nn.one_hot(response, cfg.K, dtype=h.dtype) - p) * mask[:, None]      # [T, K]
        factored = {"W": (TokenFactor(r[:, None, :], h[:, None, :]),)}
        if cfg.trainable_embedding:
            cts = jnp.eye(T, dtype=h.dtype)[:, :, None] * (r @ W)[None, :, :]         # [T, T, d]
            (delta,) = jax.vmap(vjp)(cts)                                              # [T, P + T, d]
            factored["E"] = (TokenFactor(z, delta),)
        return TokenGradFactors({}, factored)

    def fn(params, example):
        return (side(params, example.prompt, example.chosen, example.chosen_mask),
                side(params, example.prompt, example.rejected, example.rejected_mask))

    return fn
