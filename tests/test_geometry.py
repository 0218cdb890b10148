"""Per-pair and per-token gradient geometry against brute force (one jax.grad per response / token)."""
import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from entangle_sim import geometry as geo
from entangle_sim.policies import transformer as tr
from entangle_sim.types import PairBatch, Policy

from test_transformer import CFG, perturbed_params, random_batch, B, P, T_W, T_L

# Required agreement is 1e-5 relative; in float64 every path differs from brute force only by
# summation order (~1e-15 relative on these sizes), so 1e-10 is strict yet far from round-off.
RTOL = 1e-10


# ---------------------------------------------------------------------------------------------
# models and brute force
# ---------------------------------------------------------------------------------------------
def simple_policy(vocab=11, d=5):
    """Bag-of-prompt context -> tanh hidden -> softmax over the vocabulary, per response position."""

    def init(key):
        k = jax.random.split(key, 3)
        return {"E": jax.random.normal(k[0], (vocab, d)), "W": jax.random.normal(k[1], (d, d)),
                "b": jax.random.normal(k[2], (d,)), "unembed": {"U": jnp.ones((d, vocab)) * 0.1}}

    def seq(params, prompt, resp, mask, taps=None):
        ctx = params["E"][prompt].mean(0)[None, :] + params["E"][jnp.concatenate([prompt[-1:], resp[:-1]])]  # [T, d]
        z = ctx @ params["W"] + params["b"][None, :]
        h = jnp.tanh(z if taps is None else z + taps["W"])
        logits = h @ params["unembed"]["U"]
        logits = logits if taps is None else logits + taps["U"]
        tok = jnp.take_along_axis(jax.nn.log_softmax(logits), resp[:, None], -1)[:, 0]
        return jnp.where(mask > 0, tok, 0.0), ctx, h

    v = jax.vmap(lambda p, *a: seq(p, *a)[0], in_axes=(None, 0, 0, 0))

    def token_logps(params, batch):
        return (v(params, batch.prompt, batch.chosen, batch.chosen_mask),
                v(params, batch.prompt, batch.rejected, batch.rejected_mask))

    def factor_fn(params, prompt, resp, mask):
        """Factored gradient: W, U dense (inputs x signals); E used twice by gather (mean of prompt rows
        with weight 1/P at every position, and the previous token) -> two index factors."""
        T = resp.shape[0]
        taps = {"W": jnp.zeros((T, d)), "U": jnp.zeros((T, vocab))}

        def f(b, taps):
            tok, ctx, h = seq({**params, "b": b}, prompt, resp, mask, taps)
            return tok.sum(), (ctx, h)

        _, vjp, (ctx, h) = jax.vjp(f, params["b"], taps, has_aux=True)
        gb, delta = vjp(1.0)
        dctx = delta["W"] @ params["W"].T                      # signal at ctx [T, d]
        prev = jnp.concatenate([prompt[-1:], resp[:-1]])
        Pn = prompt.shape[0]
        prompt_use = geo.Factor(prompt, jnp.broadcast_to(dctx.sum(0) / Pn, (Pn, d)))
        return geo.GradFactors({"b": gb}, {"W": (geo.Factor(ctx, delta["W"]),),
                                           "unembed/U": (geo.Factor(h, delta["U"]),),
                                           "E": (prompt_use, geo.Factor(prev, dctx))})

    return Policy("simple", init, token_logps), factor_fn


def brute_force_leaves(policy, params, batch):
    """One jax.grad per response; per leaf path, explicit dot products of the flattened gradients.

    Returns {path: [3, B] array of (G_ww, G_wl, G_ll) restricted to that leaf}; any subset's Gram is
    the sum over its leaves (Gram entries are additive over a partition of the parameters)."""
    paths = geo.param_paths(params)

    @jax.jit
    def grads(p, ex):
        gw = jax.grad(lambda q: policy.logps(q, ex)[0][0])(p)
        gl = jax.grad(lambda q: policy.logps(q, ex)[1][0])(p)
        return gw, gl

    out = {path: np.zeros((3, batch.size)) for path in paths}
    for i in range(batch.size):
        gw, gl = grads(params, batch.take(jnp.array([i])))
        for path, a, b in zip(paths, jax.tree.leaves(gw), jax.tree.leaves(gl)):
            a, b = np.ravel(a), np.ravel(b)
            out[path][:, i] = (a @ a, a @ b, b @ b)
    return out


def brute_force_gram(policy, params, batch, keep=lambda path: True):
    return restrict(brute_force_leaves(policy, params, batch), keep)


def restrict(leaves, keep):
    return sum(v for path, v in leaves.items() if keep(path))


def assert_gram_close(gram, ref, rtol=RTOL):
    got = np.stack([gram.G_ww, gram.G_wl, gram.G_ll])
    scale = np.abs(ref).max()  # G_wl can be ~0: compare relative to the pair's scale
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * scale)


@pytest.fixture(scope="module")
def tx():
    policy = tr.make(CFG)
    return policy, perturbed_params(CFG), random_batch()


@pytest.fixture(scope="module")
def tx_leaves(tx):
    return brute_force_leaves(*tx)


@pytest.fixture(scope="module")
def tx_ref(tx_leaves):
    return restrict(tx_leaves, lambda path: True)


# ---------------------------------------------------------------------------------------------
# sequence-level Gram
# ---------------------------------------------------------------------------------------------
def test_pair_gram_transformer_vmap_and_layerwise(tx, tx_ref):
    policy, params, batch = tx
    assert_gram_close(geo.pair_gram(policy.logps, params, batch), tx_ref)
    assert_gram_close(geo.pair_gram_layerwise(tr.grad_factors(CFG), params, batch), tx_ref)
    # chunked (lax.map over chunks of 2 pairs, remainder 1) gives the same numbers
    assert_gram_close(geo.pair_gram_layerwise(tr.grad_factors(CFG), params, batch, chunk_size=2), tx_ref)


def test_gram_program_is_the_program_pair_gram_runs(tx, tx_ref):
    """`gram_program` (the lowered program benchmarks analyse) computes the brute-force Gram when
    executed, for both sequence paths (same tolerance as the public functions)."""
    policy, params, batch = tx
    for method, fn in (("pair_vmap", policy.logps), ("pair_layerwise", tr.grad_factors(CFG))):
        assert_gram_close(geo.gram_program(method, fn, params, batch, chunk_size=2).compile()(params, batch), tx_ref)
    with pytest.raises(ValueError, match="method"):
        geo.gram_program("loop", policy.logps, params, batch)


def test_pair_gram_tied_transformer_layerwise():
    """Tied read-out adds a dense use of embed/tok next to its gather: the cross terms must be exact."""
    cfg = dataclasses.replace(CFG, tie_embeddings=True)
    policy, params, batch = tr.make(cfg), perturbed_params(cfg), random_batch()
    ref = brute_force_gram(policy, params, batch)
    assert_gram_close(geo.pair_gram_layerwise(tr.grad_factors(cfg), params, batch), ref)


def test_pair_gram_simple_model():
    policy, factor_fn = simple_policy()
    params = policy.init(jax.random.key(0))
    batch = random_batch(seed=5)
    ref = brute_force_gram(policy, params, batch)
    assert_gram_close(geo.pair_gram(policy.logps, params, batch), ref)
    assert_gram_close(geo.pair_gram_layerwise(factor_fn, params, batch), ref)


def scale_only(path):  # a module-level predicate: one object, so the jit cache is reused
    return path.endswith("scale")


@pytest.mark.parametrize("subset,keep,check_vmap", [
    (["unembed", "blocks/1/mlp"], lambda p: p.startswith(("unembed/", "blocks/1/mlp/")), False),
    ("blocks/0/attn", lambda p: p.startswith("blocks/0/attn/"), False),
    (scale_only, scale_only, True),
])
def test_subset_selection(tx, tx_leaves, subset, keep, check_vmap):
    policy, params, batch = tx
    paths = geo.param_paths(params)
    assert any(keep(p) for p in paths) and not all(keep(p) for p in paths)
    assert [p for p in paths if geo.subset_predicate(subset)(p)] == [p for p in paths if keep(p)]
    ref = restrict(tx_leaves, keep)
    assert_gram_close(geo.pair_gram_layerwise(tr.grad_factors(CFG), params, batch, subset=subset), ref)
    if check_vmap:  # the vmap path shares the selection code; one subset keeps the suite fast
        assert_gram_close(geo.pair_gram(policy.logps, params, batch, subset=subset), ref)


def test_subset_prefix_is_path_aware(tx):
    policy, params, batch = tx
    pred = geo.subset_predicate(["blocks/0"])
    assert pred("blocks/0/attn/W_o") and pred("blocks/0") and not pred("blocks/01/x") and not pred("embed/tok")
    with pytest.raises(ValueError, match="selects no parameter"):
        geo.pair_gram(policy.logps, params, batch, subset=["nope"])
    with pytest.raises(ValueError, match="selects no parameter"):
        geo.pair_gram_layerwise(tr.grad_factors(CFG), params, batch, subset=lambda p: False)
    with pytest.raises(ValueError):
        geo.subset_predicate([])


# ---------------------------------------------------------------------------------------------
# token-level Gram
# ---------------------------------------------------------------------------------------------
def test_token_gram_matches_per_token_backward(tx, tx_ref, tx_leaves):
    policy, params, batch = tx

    @partial(jax.jit, static_argnums=3)
    def tok_grad(p, ex, t, side):  # one backward per token
        return ravel_pytree(jax.grad(lambda q: policy.token_logps(q, ex)[side][0, t])(p))[0]

    tg = geo.token_gram(policy.token_logps, params, batch)  # batched: vmap over pairs
    assert tg.inner.shape == (B, T_W, T_L) and tg.cos.shape == (B, T_W, T_L)
    for b in range(B):
        ex = batch.take(jnp.array([b]))
        Gw = np.stack([tok_grad(params, ex, t, 0) for t in range(T_W)])
        Gl = np.stack([tok_grad(params, ex, u, 1) for u in range(T_L)])
        inner = Gw @ Gl.T
        scale = np.abs(inner).max()
        np.testing.assert_allclose(tg.inner[b], inner, rtol=RTOL, atol=RTOL * scale)
        np.testing.assert_allclose(tg.norm_w[b], np.linalg.norm(Gw, axis=1), rtol=RTOL, atol=RTOL * scale)
        np.testing.assert_allclose(tg.norm_l[b], np.linalg.norm(Gl, axis=1), rtol=RTOL, atol=RTOL * scale)
        # masked tokens: zero gradient rows, zero cosine; real ones: cosine in [-1, 1]
        mw = np.asarray(batch.chosen_mask[b]) > 0
        assert np.all(np.asarray(tg.inner[b])[~mw] == 0.0) and np.all(np.asarray(tg.cos[b])[~mw] == 0.0)
        assert np.all(np.abs(tg.cos[b]) <= 1 + 1e-12)
        # R13: the token matrix sums to G_wl
        np.testing.assert_allclose(np.sum(tg.inner[b]), tx_ref[1, b], rtol=RTOL, atol=RTOL * np.abs(tx_ref).max())


# ---------------------------------------------------------------------------------------------
# condition ratio and aggregates
# ---------------------------------------------------------------------------------------------
def linear_policy(a, b):
    """l_w = <theta, a>, l_l = <theta, b>: g_w = a, g_l = b exactly."""
    def token_logps(params, batch):
        n = batch.prompt.shape[0]
        return jnp.broadcast_to(params["theta"] @ a, (n, 1)), jnp.broadcast_to(params["theta"] @ b, (n, 1))
    return Policy("linear", lambda key: {"theta": jnp.zeros(a.shape[0])}, token_logps)


def test_rho_regression_rejected_half_of_condition1():
    """|g_l| < |g_w| and G_ll < G_wl < G_ww: only rho_l > 1 (rejected rises, Case 3).

    The official code's G_wl / min(G_ww, G_ww) = rho_w = 0.5 would report Case 1; rho must be 1.6.
    """
    a, b = jnp.array([2.0, 0.0]), jnp.array([1.0, 0.5])
    policy = linear_policy(a, b)
    one = PairBatch(*(jnp.zeros((1, 1)) for _ in range(5)))
    g = geo.pair_gram(policy.logps, policy.init(None), one)
    np.testing.assert_allclose([g.G_ww[0], g.G_wl[0], g.G_ll[0]], [4.0, 2.0, 1.25], rtol=1e-15)
    official = g.G_wl / jnp.minimum(g.G_ww, g.G_ww)
    assert float(official[0]) == 0.5 and float(g.rho_w[0]) == 0.5
    np.testing.assert_allclose(g.rho_l, 1.6, rtol=1e-15)
    np.testing.assert_allclose(g.rho, 1.6, rtol=1e-15)
    assert geo.aggregate(g)["case1_fraction"] == 0.0
    # mirrored pair: |g_w| < |g_l|, only rho_w > 1
    g2 = geo.gram_stats(1.25, 2.0, 4.0)
    np.testing.assert_allclose([g2.rho_w, g2.rho_l, g2.rho], [1.6, 0.5, 1.6], rtol=1e-15)
    # negative G_wl: Case 1 for either sign, rho <= 0
    assert float(geo.gram_stats(1.0, -0.5, 2.0).rho) == -0.25
    # zero gradients give finite statistics
    assert np.all(np.isfinite(geo.gram_stats(0.0, 0.0, 0.0)))


def test_aggregate_labelled_and_correct():
    G_ww, G_wl, G_ll = np.array([1.0, 4.0, 9.0]), np.array([0.5, 3.0, -1.0]), np.array([4.0, 1.0, 1.0])
    agg = geo.aggregate(geo.gram_stats(jnp.array(G_ww), jnp.array(G_wl), jnp.array(G_ll)))
    rw, rl = G_wl / G_ww, G_wl / G_ll
    expect = {
        "n_pairs": 3, "G_ww_mean": G_ww.mean(), "G_wl_mean": G_wl.mean(), "G_ll_mean": G_ll.mean(),
        "norm_w_mean": np.sqrt(G_ww).mean(), "norm_l_mean": np.sqrt(G_ll).mean(),
        "cos_mean": np.mean(G_wl / np.sqrt(G_ww * G_ll)),
        "rho_w_mean_of_ratios": rw.mean(), "rho_l_mean_of_ratios": rl.mean(),
        "rho_mean_of_ratios": np.maximum(rw, rl).mean(),
        "rho_w_ratio_of_means": G_wl.mean() / G_ww.mean(), "rho_l_ratio_of_means": G_wl.mean() / G_ll.mean(),
        "rho_ratio_of_means": max(G_wl.mean() / G_ww.mean(), G_wl.mean() / G_ll.mean()),
        "cos_ratio_of_means": G_wl.mean() / np.sqrt(G_ww.mean() * G_ll.mean()),
        "case1_fraction": 2 / 3,
    }
    assert set(agg) == set(expect)
    for k, v in expect.items():
        np.testing.assert_allclose(agg[k], v, rtol=1e-14, err_msg=k)  # float64 arithmetic, a few ops
    # the two reductions really differ here (bug 2 of theory §7.3 is not cosmetic)
    assert abs(agg["rho_mean_of_ratios"] - agg["rho_ratio_of_means"]) > 0.1


# ---------------------------------------------------------------------------------------------
# any pytree batch: a plain dict of arrays and an Equinox model
# ---------------------------------------------------------------------------------------------
def _equinox_setup(B=5, P=3, T=4, vocab=9, d=6):
    """An Equinox decoder-ish model (embedding -> MLP -> read-out) on a plain dict batch."""
    eqx = pytest.importorskip("equinox")

    class Tiny(eqx.Module):
        embed: eqx.nn.Embedding
        mlp: eqx.nn.MLP

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.embed = eqx.nn.Embedding(vocab, d, key=k1)
            self.mlp = eqx.nn.MLP(2 * d, vocab, width_size=8, depth=2, activation=jnp.tanh, key=k2)

        def token_logps(self, prompt, resp, mask):   # one example: prompt [P], resp [T] -> [T]
            ctx = jax.vmap(self.embed)(prompt).mean(0)
            prev = jax.vmap(self.embed)(jnp.concatenate([prompt[-1:], resp[:-1]]))          # [T, d]
            x = jnp.concatenate([jnp.broadcast_to(ctx, prev.shape), prev], -1)
            logits = jax.vmap(self.mlp)(x)
            tok = jnp.take_along_axis(jax.nn.log_softmax(logits), resp[:, None], -1)[:, 0]
            return jnp.where(mask > 0, tok, 0.0)

    params, static = eqx.partition(Tiny(jax.random.key(3)), eqx.is_array)
    assert jax.tree.leaves(params)[0].dtype == jnp.float64

    def token_logps(p, batch):   # batch: dict with a leading pair axis
        m = eqx.combine(p, static)
        f = jax.vmap(m.token_logps)
        return (f(batch["prompt"], batch["chosen"], batch["chosen_mask"]),
                f(batch["prompt"], batch["rejected"], batch["rejected_mask"]))

    def logps(p, batch):
        tw, tl = token_logps(p, batch)
        return tw.sum(-1), tl.sum(-1)

    k = jax.random.split(jax.random.key(4), 3)
    mask = jnp.ones((B, T)).at[0, -1].set(0.0)       # one padded token
    batch = {"prompt": jax.random.randint(k[0], (B, P), 0, vocab),
             "chosen": jax.random.randint(k[1], (B, T), 0, vocab),
             "rejected": jax.random.randint(k[2], (B, T), 0, vocab),
             "chosen_mask": mask, "rejected_mask": jnp.ones((B, T))}
    return params, batch, logps, token_logps


def test_pair_gram_and_token_gram_on_dict_batch_and_equinox_model():
    """pair_gram / token_gram accept a plain dict batch and an Equinox model, equal to a brute-force
    loop of one jax.grad per response (pair level) and per token (token level). Float64: the paths
    differ only in summation order (~1e-15 relative), so 1e-10 relative is strict."""
    params, batch, logps, token_logps = _equinox_setup()
    B, T = batch["chosen"].shape
    one = lambda i: {k: v[i:i + 1] for k, v in batch.items()}
    flat = lambda tree: np.asarray(ravel_pytree(tree)[0])
    ref = np.zeros((3, B))
    for i in range(B):
        gw = flat(jax.grad(lambda p: logps(p, one(i))[0][0])(params))
        gl = flat(jax.grad(lambda p: logps(p, one(i))[1][0])(params))
        ref[:, i] = (gw @ gw, gw @ gl, gl @ gl)
    assert_gram_close(geo.pair_gram(logps, params, batch), ref)
    assert_gram_close(geo.pair_gram(logps, params, batch, chunk_size=2), ref)
    # the Jacobian path the trainers record and the 2B x 2B batch Gram's own-pair blocks
    J = geo.response_jacobian(logps, params, batch)
    assert_gram_close(geo.jacobian_pair_gram(J), ref)
    G = np.asarray(geo.batch_gram(logps, params, batch))
    assert_gram_close(geo.gram_stats(np.diag(G)[:B], np.diag(G[:B, B:]), np.diag(G)[B:]), ref)

    i = 1   # token level for one pair: one jax.grad per token
    tg = geo.token_gram(token_logps, params, one(i))
    gw = np.stack([flat(jax.grad(lambda p: token_logps(p, one(i))[0][0, t])(params)) for t in range(T)])
    gl = np.stack([flat(jax.grad(lambda p: token_logps(p, one(i))[1][0, t])(params)) for t in range(T)])
    inner = gw @ gl.T
    np.testing.assert_allclose(tg.inner[0], inner, rtol=RTOL, atol=RTOL * np.abs(inner).max())
    np.testing.assert_allclose(tg.norm_w[0], np.linalg.norm(gw, axis=1), rtol=RTOL, atol=RTOL * np.abs(gw).max())


def test_pair_gram_rejects_batch_without_common_pair_axis():
    params, batch, logps, _ = _equinox_setup()
    with pytest.raises(ValueError, match="leading pair axis"):
        geo.pair_gram(logps, params, {**batch, "prompt": batch["prompt"][:2]})
