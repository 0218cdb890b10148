"""Tiny transformer policy (causality, normalisation, masking, batching) and the synthetic sentiment data."""
import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from entangle_sim import sentiment as st
from entangle_sim.policies import transformer as tr
from entangle_sim.types import PairBatch

CFG = tr.TransformerConfig(vocab=11, d_model=16, n_layers=2, n_heads=2, max_len=12)
B, P, T_W, T_L = 3, 3, 4, 3
# float64 round-off on a 2-layer width-16 model is ~1e-15; 1e-12 leaves ample margin while a
# genuine bug (wrong position, wrong mask) changes values at O(1e-2).
TOL = 1e-12


def perturbed_params(cfg, seed=0):
    """Init plus O(0.3) noise so biases / LayerNorm are non-trivial (zero biases hide bugs)."""
    params = tr.init(cfg, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def random_batch(seed=2, vocab=11):
    k = jax.random.split(jax.random.key(seed), 3)
    return PairBatch(jax.random.randint(k[0], (B, P), 0, vocab), jax.random.randint(k[1], (B, T_W), 0, vocab),
                     jax.random.randint(k[2], (B, T_L), 0, vocab),
                     jnp.array([[1.0, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]), jnp.array([[1.0, 1, 1], [1, 1, 1], [1, 1, 0]]))


@pytest.fixture(scope="module")
def setup():
    # jitted: eager op-by-op dispatch compiles every primitive separately and is far slower here
    policy = tr.make(CFG)
    return policy._replace(token_logps=jax.jit(policy.token_logps)), perturbed_params(CFG), random_batch()


def test_config_validation():
    for bad in [dict(d_model=10, n_heads=3), dict(vocab=0), dict(n_layers=-1), dict(max_len=1),
                dict(d_ff=0), dict(init_std=0.0), dict(n_heads=2.0)]:
        with pytest.raises(ValueError):
            tr.TransformerConfig(**bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        CFG.vocab = 3
    assert hash(CFG) == hash(tr.TransformerConfig(vocab=11, d_model=16, n_layers=2, n_heads=2, max_len=12))


def test_param_count_and_tying():
    for tie in (False, True):
        cfg = dataclasses.replace(CFG, tie_embeddings=tie)
        params = tr.init(cfg, jax.random.key(0))
        assert sum(x.size for x in jax.tree.leaves(params)) == cfg.n_params
        assert ("unembed" in params) == (not tie)
        assert params["embed"]["tok"].dtype == jnp.float64  # x64 on in tests


def test_too_long_sequence_raises(setup):
    policy, params, _ = setup
    long = PairBatch(jnp.zeros((1, 8), int), jnp.zeros((1, 6), int), jnp.zeros((1, 2), int),
                     jnp.ones((1, 6)), jnp.ones((1, 2)))
    with pytest.raises(ValueError, match="max_len"):
        policy.token_logps(params, long)


def test_masked_positions_exactly_zero_and_padding_ignored(setup):
    policy, params, batch = setup
    tw, tl = jax.jit(policy.token_logps)(params, batch)
    assert tw.shape == (B, T_W) and tl.shape == (B, T_L)
    assert np.all(np.asarray(tw)[np.asarray(batch.chosen_mask) == 0] == 0.0)  # exactly, not approximately
    assert np.all(np.asarray(tl)[np.asarray(batch.rejected_mask) == 0] == 0.0)
    assert np.all(np.asarray(tw)[np.asarray(batch.chosen_mask) == 1] < 0.0)
    # changing padded tokens changes nothing (right padding + causality)
    pad_tokens = jnp.where(batch.chosen_mask > 0, batch.chosen, (batch.chosen + 5) % CFG.vocab)
    tw2, _ = policy.token_logps(params, batch._replace(chosen=pad_tokens))
    np.testing.assert_allclose(tw2, tw, rtol=0, atol=TOL)


def test_token_logps_normalised(setup):
    """sum_v pi(v | x, y_<t) = 1 at every response position: swap y_t through the vocabulary."""
    _, params, batch = setup
    prompt, resp = batch.prompt[0], batch.chosen[0]
    ones = jnp.ones(T_W)

    def all_t(v):  # log pi(v | prefix) at every position t, with y_t := v (prefix unchanged: causal)
        return jnp.stack([tr.sequence_token_logps(CFG, params, prompt, resp.at[t].set(v), ones)[t]
                          for t in range(T_W)])

    lp = jax.jit(jax.vmap(all_t))(jnp.arange(CFG.vocab))  # [V, T]
    np.testing.assert_allclose(jax.scipy.special.logsumexp(lp, axis=0), 0.0, atol=TOL)


def test_vmap_single_equals_batched(setup):
    policy, params, batch = setup
    tw, tl = policy.token_logps(params, batch)
    single = jax.jit(partial(tr.sequence_token_logps, CFG))
    for b in range(B):
        np.testing.assert_allclose(
            single(params, batch.prompt[b], batch.chosen[b], batch.chosen_mask[b]), tw[b],
            rtol=0, atol=TOL)
        one = policy.token_logps(params, batch.take(jnp.array([b])))
        np.testing.assert_allclose(one[1][0], tl[b], rtol=0, atol=TOL)
    lw, ll = policy.logps(params, batch)
    np.testing.assert_allclose(lw, tw.sum(-1), atol=TOL)


@pytest.mark.parametrize("tie", [False, True])
def test_causal(tie):
    """d log pi(y_t | .) / d e_s = 0 for every input position s after the one predicting y_t (s > P-1+t),
    with e_s the embedding output (perturbed through the 'embed' tap), and nonzero at s <= P-1+t."""
    cfg = dataclasses.replace(CFG, tie_embeddings=tie)
    params = perturbed_params(cfg)
    batch = random_batch()
    prompt, resp = batch.prompt[0], batch.chosen[0]
    taps = tr.zero_taps(cfg, P, T_W)

    def f(e_tap):
        return tr.sequence_token_logps(cfg, params, prompt, resp, jnp.ones(T_W), {**taps, "embed": e_tap})

    J = np.asarray(jax.jit(jax.jacrev(f))(taps["embed"]))  # [T, S, D]
    norms = np.linalg.norm(J, axis=-1)            # [T, S]
    for t in range(T_W):
        assert np.all(norms[t, P + t:] == 0.0), f"token {t} depends on later positions"
        assert np.all(norms[t, : P + t] > 1e-8)
    # the summed response log-prob therefore has zero gradient w.r.t. positions after its last input
    tw_last = jax.jit(jax.grad(lambda e: f(e)[: T_W - 1].sum()))(taps["embed"])
    assert np.all(np.asarray(tw_last)[P + T_W - 2:] == 0.0)


# --------------------------------------------------------------------------------------------------
# sentiment data
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,T", [("1t", 1), ("short", 5), ("long", 17)])
def test_sentiment_pairs_well_formed(mode, T):
    cfg = st.SentimentConfig(mode=mode)
    pairs = st.preference_pairs(cfg, jax.random.key(0), 64)
    assert pairs.chosen.shape == pairs.rejected.shape == (64, T) and pairs.prompt.shape == (64, cfg.prompt_len)
    p, c, r = (np.asarray(x) for x in (pairs.prompt, pairs.chosen, pairs.rejected))
    assert np.all(p[:, 0] == st.BOS) and p.min() >= 0 and max(p.max(), c.max()) < cfg.vocab_size
    assert set(np.unique(c[:, 0])) == {st.POS, st.NEG}
    assert np.all(c[:, 0] != r[:, 0]) and np.all(np.isin(r[:, 0], [st.POS, st.NEG]))
    np.testing.assert_array_equal(c[:, 1:], r[:, 1:])                       # identical shared suffix
    np.testing.assert_array_equal(c[:, 1:], np.broadcast_to(np.asarray(st.suffix(cfg)), (64, T - 1)))
    assert np.all(np.asarray(pairs.chosen_mask) == 1.0)
    # the chosen word matches the prompt's sentiment words; every prompt has at least one
    pos = (p >= cfg.first_pos) & (p < cfg.first_neg)
    neg = (p >= cfg.first_neg) & (p < cfg.first_neutral)
    assert np.all(pos.any(1) | neg.any(1)) and not np.any(pos.any(1) & neg.any(1))
    np.testing.assert_array_equal(c[:, 0] == st.POS, pos.any(1))


def test_sentiment_deterministic_and_sft_consistent():
    cfg = st.SentimentConfig(mode="short", response_len=7)
    a = st.preference_pairs(cfg, jax.random.key(3), 32)
    b = st.preference_pairs(cfg, jax.random.key(3), 32)
    c = st.preference_pairs(cfg, jax.random.key(4), 32)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.prompt, c.prompt)
    sft = st.sft_data(cfg, jax.random.key(3), 32)
    np.testing.assert_array_equal(sft.prompt, a.prompt)                      # same key, same prompts
    np.testing.assert_array_equal(sft.response, a.chosen)                    # SFT target = chosen response
    np.testing.assert_array_equal(sft.label, np.asarray(a.chosen[:, 0] == st.POS, int))
    # padding: 1 + 4 real tokens then 2 PAD with mask 0
    np.testing.assert_array_equal(a.chosen_mask[0], [1, 1, 1, 1, 1, 0, 0])
    assert np.all(np.asarray(a.chosen)[:, 5:] == st.PAD)
    with pytest.raises(ValueError):
        st.SentimentConfig(mode="medium")
    with pytest.raises(ValueError):
        st.SentimentConfig(mode="long", response_len=4)


def test_sentiment_feeds_transformer():
    scfg = st.SentimentConfig(mode="short")
    cfg = tr.TransformerConfig(vocab=scfg.vocab_size, d_model=8, n_layers=1, n_heads=2,
                               max_len=scfg.prompt_len + scfg.T)
    policy = tr.make(cfg)
    pairs = st.preference_pairs(scfg, jax.random.key(0), 4)
    tw, tl = jax.jit(policy.token_logps)(policy.init(jax.random.key(1)), pairs)
    assert tw.shape == (4, scfg.T) and np.all(np.isfinite(tw)) and np.all(np.asarray(tl) < 0)
