"""Token heat map from per-token factors (geometry.token_gram(method='factored')) vs brute force:
one jax.grad per token, flattened, explicit inner products (float64)."""
import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from entangle_sim import geometry as geo
from entangle_sim.policies import lastlayer as ll
from entangle_sim.policies import transformer as tr

from test_transformer import CFG, perturbed_params, random_batch, B, T_W, T_L

# float64: the factored path and brute force differ only in summation order (~1e-15 relative at these
# sizes); 1e-10 is strict, while a wrong position, mask or missing term changes entries at O(1e-2).
RTOL = 1e-10


def brute_force(policy, params, batch, b):
    """[T_w, |theta|], [T_l, |theta|] per-token gradients of pair b: one jax.grad per token, a Python loop."""
    ex = batch.take(jnp.array([b]))
    T_w, T_l = batch.chosen.shape[1], batch.rejected.shape[1]
    grad = _grad_fn(policy)
    return (np.stack([grad(params, ex, 0, t) for t in range(T_w)]),
            np.stack([grad(params, ex, 1, u) for u in range(T_l)]))


_GRADS = {}


def _grad_fn(policy):
    """One jitted per-token backward per policy (t traced, side static): compiled twice, not per token."""
    if policy.token_logps not in _GRADS:
        _GRADS[policy.token_logps] = jax.jit(
            lambda p, ex, side, t: ravel_pytree(jax.grad(lambda q: policy.token_logps(q, ex)[side][0, t])(p))[0],
            static_argnums=2)
    return _GRADS[policy.token_logps]


def assert_token_gram(tg, Gw, Gl, mw):
    inner = Gw @ Gl.T
    scale = np.abs(inner).max()
    assert scale > 0
    np.testing.assert_allclose(tg.inner, inner, rtol=RTOL, atol=RTOL * scale)
    nscale = max(np.linalg.norm(Gw, axis=1).max(), np.linalg.norm(Gl, axis=1).max())
    np.testing.assert_allclose(tg.norm_w, np.linalg.norm(Gw, axis=1), rtol=RTOL, atol=RTOL * nscale)
    np.testing.assert_allclose(tg.norm_l, np.linalg.norm(Gl, axis=1), rtol=RTOL, atol=RTOL * nscale)
    cos = inner / np.maximum(np.linalg.norm(Gw, axis=1)[:, None] * np.linalg.norm(Gl, axis=1)[None, :], 1e-300)
    np.testing.assert_allclose(tg.cos, cos, rtol=1e-8, atol=1e-9)
    assert np.all(np.asarray(tg.inner)[~mw] == 0.0)


@pytest.mark.parametrize("tied", [False, True])
def test_transformer_factored_equals_per_token_loop(tied):
    cfg = dataclasses.replace(CFG, tie_embeddings=tied)
    policy, params, batch = tr.make(cfg), perturbed_params(cfg), random_batch()
    tg = geo.token_gram(policy.token_logps, params, batch, method="factored",
                        factor_fn=tr.token_grad_factors(cfg))
    assert tg.inner.shape == (B, T_W, T_L)
    for b in range(B):
        Gw, Gl = brute_force(policy, params, batch, b)
        assert_token_gram(jax.tree.map(lambda x: np.asarray(x[b]), tg), Gw, Gl, np.asarray(batch.chosen_mask[b]) > 0)
    # chunked over pairs (2 at a time, B = 3 -> padded) and single example: same numbers
    tc = geo.token_gram(policy.token_logps, params, batch, method="factored",
                        factor_fn=tr.token_grad_factors(cfg), chunk_size=2)
    np.testing.assert_allclose(tc.inner, tg.inner, rtol=RTOL, atol=RTOL * np.abs(tg.inner).max())
    t1 = geo.token_gram(policy.token_logps, params, jax.tree.map(lambda x: x[1], batch), method="factored",
                        factor_fn=tr.token_grad_factors(cfg))
    np.testing.assert_allclose(t1.inner, tg.inner[1], rtol=RTOL, atol=RTOL * np.abs(tg.inner).max())


def test_transformer_factored_subset():
    policy, params, batch = tr.make(CFG), perturbed_params(CFG), random_batch()
    subset = ["blocks/1/mlp", "unembed", "embed/pos"]
    keep = [geo.subset_predicate(subset)(p) for p in geo.param_paths(params)]
    tg = geo.token_gram(policy.token_logps, params, batch, method="factored",
                        factor_fn=tr.token_grad_factors(CFG), subset=subset)
    ref = geo.token_gram(policy.token_logps, params, batch, method="jacrev", subset=subset)
    # the jacrev path is itself checked against brute force in test_geometry; here also directly
    Gw, Gl = brute_force(policy, params, batch, 0)
    leaves = [x.size for x in jax.tree.leaves(params)]
    cols = np.concatenate([np.full(n, k) for n, k in zip(leaves, keep)])
    assert_token_gram(jax.tree.map(lambda x: np.asarray(x[0]), tg), Gw[:, cols], Gl[:, cols],
                      np.asarray(batch.chosen_mask[0]) > 0)
    np.testing.assert_allclose(tg.inner, ref.inner, rtol=RTOL, atol=RTOL * np.abs(ref.inner).max())


@pytest.mark.parametrize("trainable,nonlin", [(False, "tanh"), (True, "tanh"), (True, "identity")])
def test_lastlayer_factored_equals_per_token_loop(trainable, nonlin):
    cfg = ll.LastLayerConfig(K=7, d=3, decay=0.6, trainable_embedding=trainable, nonlinearity=nonlin)
    policy = ll.make(cfg)
    params = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(3), x.shape),
                          policy.init(jax.random.key(0)))
    batch = random_batch(vocab=7)
    tg = geo.token_gram(policy.token_logps, params, batch, factor_fn=ll.token_grad_factors(cfg),
                        method="factored")
    for b in range(B):
        Gw, Gl = brute_force(policy, params, batch, b)
        assert_token_gram(jax.tree.map(lambda x: np.asarray(x[b]), tg), Gw, Gl, np.asarray(batch.chosen_mask[b]) > 0)


def test_factored_bad_arguments():
    policy, params, batch = tr.make(CFG), perturbed_params(CFG), random_batch()
    with pytest.raises(ValueError, match="factor_fn"):
        geo.token_gram(policy.token_logps, params, batch, method="factored")
    with pytest.raises(ValueError, match="method"):
        geo.token_gram(policy.token_logps, params, batch, method="loop")
    with pytest.raises(ValueError, match="selects no parameter"):
        geo.token_gram(policy.token_logps, params, batch, method="factored",
                       factor_fn=tr.token_grad_factors(CFG), subset=["nope"])


def test_factored_accepts_dict_batch_and_gpt2_config():
    """A dict batch (leading pair axis) gives the PairBatch numbers; the GPT-2-small config is
    constructible offline (shapes only here: eval_shape, no 124M-parameter allocation)."""
    policy, params, batch = tr.make(CFG), perturbed_params(CFG), random_batch()
    ff = tr.token_grad_factors(CFG)
    ref = geo.token_gram(policy.token_logps, params, batch, method="factored", factor_fn=ff)
    got = geo.token_gram(policy.token_logps, params, batch._asdict(), method="factored", factor_fn=ff)
    np.testing.assert_allclose(got.inner, ref.inner, rtol=RTOL, atol=RTOL * np.abs(ref.inner).max())
    cfg = tr.gpt2_small_config()
    shapes = jax.eval_shape(partial(tr.init, cfg), jax.random.key(0))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == cfg.n_params == 124439808
    assert shapes["embed"]["tok"].shape == (50257, 768) and len(shapes["blocks"]) == 12 and "unembed" not in shapes
