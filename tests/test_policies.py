"""Policies: normalisation, exact-zero masking, causality, vmap consistency, gradient formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from entangle_sim.data import one_token, shared_suffix
from entangle_sim.policies import lastlayer, linear, softmax
from entangle_sim.types import PairBatch

KEY = jax.random.PRNGKey(0)
K = 6


def tabular_batch(P, K, B=5, seed=1):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    ones = jnp.ones((B, 1))
    return PairBatch(jax.random.randint(k1, (B, 1), 0, P), jax.random.randint(k2, (B, 1), 0, K),
                     jax.random.randint(k3, (B, 1), 0, K), ones, ones)


def all_policies():
    """(name, policy, params, batch) for every policy kind, float64."""
    out = []
    sm = softmax.make(softmax.SoftmaxConfig(P=3, K=K))
    out.append(("softmax", sm, sm.init(KEY), tabular_batch(3, K)))
    li = linear.make(linear.LinearConfig(P=3, K=K, d=4, init_scale=1.0))
    out.append(("linear", li, li.init(KEY), tabular_batch(3, K)))
    seq = shared_suffix(jax.random.PRNGKey(3), 4, K, prompt_len=2, L=3, pad=2)
    for trainable in (False, True):
        cfg = lastlayer.LastLayerConfig(K=K, d=5, decay=0.6, trainable_embedding=trainable)
        pol = lastlayer.make(cfg)
        out.append((f"lastlayer-{'B' if trainable else 'A'}", pol, pol.init(KEY), seq))
    return out


POLICIES = all_policies()
IDS = [p[0] for p in POLICIES]


@pytest.mark.parametrize("bad, msg", [
    (lambda: softmax.SoftmaxConfig(P=0, K=3), "P >= 1"),
    (lambda: softmax.SoftmaxConfig(P=1, K=1), "K >= 2"),
    (lambda: linear.LinearConfig(P=1, K=1, d=2), "K >= 2"),
    (lambda: linear.LinearConfig(P=1, K=3, d=0), "d >= 1"),
    (lambda: lastlayer.LastLayerConfig(K=1, d=2), "K >= 2"),
    (lambda: lastlayer.LastLayerConfig(K=3, d=2, decay=1.5), "decay"),
    (lambda: lastlayer.LastLayerConfig(K=3, d=2, nonlinearity="relu"), "nonlinearity"),
])
def test_config_validation(bad, msg):
    with pytest.raises(ValueError, match=msg):
        bad()


def test_configs_hashable_and_features_shape_checked():
    assert hash(lastlayer.LastLayerConfig(K=3, d=2)) == hash(lastlayer.LastLayerConfig(K=3, d=2))
    with pytest.raises(ValueError, match="shape"):
        linear.make(linear.LinearConfig(P=2, K=3, d=2), features=jnp.zeros((2, 3, 5)))


@pytest.mark.parametrize("name, pol, params, batch", POLICIES, ids=IDS)
def test_token_logps_normalised(name, pol, params, batch):
    """logsumexp over the vocabulary of log pi(v | x, y_<t) is 0 at every (real) position t.

    Replacing y_t by v changes only the target of position t (causality), so position t of the
    modified batch is log p_t(v). Tolerance 1e-12: float64 log-sum-exp of <= 6 terms."""
    f = jax.jit(pol.token_logps)
    T = batch.chosen.shape[1]
    for t in range(T):
        rows = [f(params, batch._replace(chosen=batch.chosen.at[:, t].set(v)))[0][:, t] for v in range(K)]
        lse = jax.scipy.special.logsumexp(jnp.stack(rows), axis=0)
        real = batch.chosen_mask[:, t] > 0
        np.testing.assert_allclose(np.where(real, lse, 0.0), 0.0, atol=1e-12)


@pytest.mark.parametrize("name, pol, params, batch", POLICIES, ids=IDS)
def test_masked_positions_exactly_zero(name, pol, params, batch):
    # mask one real entry as well as the padding: both must be exactly 0.0, not merely small
    mw = batch.chosen_mask.at[0, 0].set(0.0)
    tw, tl = jax.jit(pol.token_logps)(params, batch._replace(chosen_mask=mw))
    assert np.all(np.asarray(tw)[np.asarray(mw) == 0] == 0.0)
    assert np.all(np.asarray(tl)[np.asarray(batch.rejected_mask) == 0] == 0.0)
    assert np.all(np.asarray(tw)[np.asarray(mw) > 0] < 0.0)  # real tokens: proper log-probs
    assert tw.shape == batch.chosen.shape and tl.shape == batch.rejected.shape


@pytest.mark.parametrize("name, pol, params, batch", POLICIES, ids=IDS)
def test_vmap_over_examples_equals_batched(name, pol, params, batch):
    """vmap(f)(single examples) == f(batch); tolerance 1e-13 (reduction order only)."""
    def single(ex):
        tw, tl = pol.token_logps(params, jax.tree.map(lambda a: a[None], ex))
        return tw[0], tl[0]

    vw, vl = jax.jit(jax.vmap(single))(batch)
    bw, bl = jax.jit(pol.token_logps)(params, batch)
    np.testing.assert_allclose(vw, bw, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(vl, bl, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("trainable", [False, True])
def test_lastlayer_causal_in_embeddings(trainable):
    """d log pi(y_t) / d emb(response token u) = 0 exactly for u >= t, and != 0 for some u < t."""
    cfg = lastlayer.LastLayerConfig(K=K, d=5, decay=0.6, trainable_embedding=trainable)
    params = lastlayer.make(cfg).init(KEY)
    E = params["E"] if trainable else lastlayer.frozen_embedding(cfg)
    P, T = 2, 4
    prompt = jnp.array([1, 4])
    resp = jnp.array([0, 3, 3, 5])
    emb = E[jnp.concatenate([prompt, resp])]
    jac = jax.jit(jax.jacrev(lambda e: lastlayer.logps_from_embeddings(
        params["W"], e, resp, jnp.ones(T), P, cfg.decay, cfg.nonlinearity)))(emb)  # [T, P+T, d]
    for t in range(T):
        assert np.all(np.asarray(jac[t, P + t:]) == 0.0), f"position {t} sees its own/later tokens"
        assert np.abs(np.asarray(jac[t, :P + t])).max() > 1e-6  # it does see the context
    # discrete version: changing tokens 2.. leaves positions 0, 1 leaves earlier log-probs bit-identical
    f = jax.jit(lastlayer.make(cfg).token_logps)
    b = shared_suffix(jax.random.PRNGKey(5), 3, K, prompt_len=2, L=3)
    tw1, _ = f(params, b)
    tw2, _ = f(params, b._replace(chosen=b.chosen.at[:, 2:].set((b.chosen[:, 2:] + 1) % K)))
    assert np.array_equal(np.asarray(tw1[:, :2]), np.asarray(tw2[:, :2]))  # before the change
    assert not np.allclose(tw1[:, 3], tw2[:, 3])  # position 3 sees the changed token 2


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), K_=st.integers(2, 7), scale=st.floats(0.1, 5.0))
def test_softmax_gradient_is_onehot_minus_p(seed, K_, scale):
    """Tabular R14 with h = e_x: d log pi(a|x) / d logits = (e_a - p) on row x, 0 elsewhere (1e-12)."""
    pol = softmax.make(softmax.SoftmaxConfig(P=3, K=K_, init_scale=scale))
    logits = pol.init(jax.random.PRNGKey(seed))
    b = tabular_batch(3, K_, B=1, seed=seed)
    g = jax.grad(lambda th: pol.logps(th, b)[0][0])(logits)
    x, a = int(b.prompt[0, 0]), int(b.chosen[0, 0])
    expected = np.zeros((3, K_))
    expected[x] = np.eye(K_)[a] - np.asarray(jax.nn.softmax(logits[x]))
    np.testing.assert_allclose(g, expected, atol=1e-12)


def test_linear_gradient_is_centred_feature():
    """g(y|x) = phi(x, y) - sum_k pi(k|x) phi(x, k) (tolerance 1e-12, float64 rounding)."""
    cfg = linear.LinearConfig(P=3, K=K, d=4, init_scale=1.0)
    pol, phi = linear.make(cfg), linear.draw_features(cfg)
    theta = pol.init(KEY)
    b = tabular_batch(3, K, B=4)
    G = jax.vmap(lambda i: jax.grad(lambda th: pol.logps(th, b)[1][i])(theta))(jnp.arange(4))
    x, y = np.asarray(b.prompt[:, 0]), np.asarray(b.rejected[:, 0])
    p = jax.nn.softmax(jnp.einsum("bkd,d->bk", phi[x], theta), axis=-1)
    expected = phi[x, y] - jnp.einsum("bk,bkd->bd", p, phi[x])
    np.testing.assert_allclose(G, expected, atol=1e-12)


def test_lastlayer_setting_b_init_shares_frozen_embedding():
    cfgA = lastlayer.LastLayerConfig(K=K, d=3, seed=7)
    cfgB = lastlayer.LastLayerConfig(K=K, d=3, seed=7, trainable_embedding=True)
    pA, pB = lastlayer.make(cfgA).init(KEY), lastlayer.make(cfgB).init(KEY)
    assert set(pA) == {"W"} and set(pB) == {"W", "E"}
    np.testing.assert_array_equal(pB["E"], lastlayer.frozen_embedding(cfgA))
    b = one_token(KEY, 3, K, prompt_len=2)
    np.testing.assert_array_equal(lastlayer.make(cfgA).token_logps(pA, b)[0],
                                  lastlayer.make(cfgB).token_logps(pB, b)[0])
