"""Synthetic data: determinism, structure, validation, and geometry_pairs hitting its targets."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from entangle_sim import data
from entangle_sim.geometry import pair_gram

KEY = jax.random.PRNGKey(0)
TASK_KW = {
    "1t": dict(n_pairs=5, K=7, prompt_len=3),
    "suffix": dict(n_pairs=5, K=7, prompt_len=3, L=4, pad=2),
    "prefix": dict(n_pairs=5, K=7, prompt_len=3, L=4),
    "edit": dict(n_pairs=5, K=7, prompt_len=3, T=6, k=2),
    "geometry": dict(policy_kind="linear", n_pairs=5, K=7, target_cos=0.5, norm_ratio=1.5),
}


def arrays(x):
    return [np.asarray(a) for a in jax.tree.leaves(x)]


@pytest.mark.parametrize("name", data.TASKS)
def test_deterministic_from_key(name):
    a1 = arrays(data.make_task(name, KEY, **TASK_KW[name]))
    a2 = arrays(data.make_task(name, KEY, **TASK_KW[name]))
    a3 = arrays(data.make_task(name, jax.random.PRNGKey(1), **TASK_KW[name]))
    assert all(np.array_equal(x, y) for x, y in zip(a1, a2))
    assert not all(np.array_equal(x, y) for x, y in zip(a1, a3))


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**20), K=st.integers(2, 9), L=st.integers(0, 5), P=st.integers(1, 3))
def test_token_task_structure(seed, K, L, P):
    key = jax.random.PRNGKey(seed)
    b1 = data.one_token(key, 6, K, P)
    assert b1.chosen.shape == (6, 1) and np.all(b1.chosen != b1.rejected)
    sfx = data.shared_suffix(key, 6, K, P, L)
    assert sfx.chosen.shape == (6, 1 + L) and sfx.prompt.shape == (6, P)
    assert np.all(sfx.chosen[:, 0] != sfx.rejected[:, 0])
    assert np.array_equal(sfx.chosen[:, 1:], sfx.rejected[:, 1:])
    pfx = data.shared_prefix(key, 6, K, P, L)
    assert np.all(pfx.chosen[:, -1] != pfx.rejected[:, -1])
    assert np.array_equal(pfx.chosen[:, :-1], pfx.rejected[:, :-1])
    T = L + 1
    k = 1 + seed % T
    ed = data.edit_distance(key, 6, K, P, T=T, k=k)
    assert np.all((np.asarray(ed.chosen) != np.asarray(ed.rejected)).sum(1) == k)
    for b in (b1, sfx, pfx, ed):
        toks = np.concatenate([np.asarray(b.prompt).ravel(), np.asarray(b.chosen).ravel(),
                               np.asarray(b.rejected).ravel()])
        assert toks.min() >= 0 and toks.max() < K and b.prompt.dtype == jnp.int32
        assert np.all(np.asarray(b.chosen_mask) == 1.0) and np.all(np.asarray(b.rejected_mask) == 1.0)


def test_padding_columns_are_masked():
    b = data.shared_suffix(KEY, 3, 5, 2, L=2, pad=3)
    assert b.chosen.shape == (3, 6)
    np.testing.assert_array_equal(b.chosen_mask, np.tile([1, 1, 1, 0, 0, 0], (3, 1)))
    np.testing.assert_array_equal(b.chosen_len, np.full(3, 3.0))


@pytest.mark.parametrize("call, msg", [
    (lambda: data.shared_suffix(KEY, 2, 5, 1, L=-1), "L must be >= 0"),
    (lambda: data.shared_prefix(KEY, 2, 5, 1, L=-2), "L must be >= 0"),
    (lambda: data.one_token(KEY, 2, 1), "K must be >= 2"),
    (lambda: data.one_token(KEY, 0, 4), "n_pairs"),
    (lambda: data.one_token(KEY, 2, 4, prompt_len=0), "prompt_len"),
    (lambda: data.edit_distance(KEY, 2, 4, 1, T=3, k=4), "1 <= k <= T"),
    (lambda: data.edit_distance(KEY, 2, 4, 1, T=3, k=0), "1 <= k <= T"),
    (lambda: data.make_task("sufix", KEY), "valid names: geometry, 1t, suffix, prefix, edit"),
    (lambda: data.geometry_pairs(KEY, "mlp", 2, 4, 0.0, 1.0), "policy_kind"),
    (lambda: data.geometry_pairs(KEY, "softmax", 2, 4, 0.45, 1.0 / 0.45 * 0.9), "infeasible"),
    (lambda: data.geometry_pairs(KEY, "softmax", 2, 4, 0.3, 3.0), "infeasible"),
    (lambda: data.geometry_pairs(KEY, "linear", 2, 2, 0.0, 1.0), "K=2"),
    (lambda: data.geometry_pairs(KEY, "linear", 2, 4, 0.5, 1.0, d=1), "d >= 2"),
    (lambda: data.geometry_pairs(KEY, "linear", 2, 4, 1.5, 1.0), "target_cos"),
])
def test_validation_errors(call, msg):
    with pytest.raises(ValueError, match=msg):
        call()


def check_geometry(gp, c, r):
    """pair_gram at the returned params hits the targets; 1e-9: exact construction in float64,
    the solver's quadratic roots are accurate to ~1e-15 relative."""
    g = pair_gram(gp.policy().logps, gp.params, gp.batch)
    np.testing.assert_allclose(g.cos, np.broadcast_to(c, g.cos.shape), atol=1e-9)
    np.testing.assert_allclose(np.sqrt(g.G_ll / g.G_ww), np.broadcast_to(r, g.cos.shape), rtol=1e-9)
    return g


@pytest.mark.parametrize("K", [3, 5, 12])
def test_geometry_pairs_softmax_hits_targets(K):
    c = np.array([-0.9, -0.5, 0.0, 0.4, 0.49, -0.3, -0.1, -0.35])
    r = np.array([1.0, 0.5, 1.0, 1.0, 1.0, 2.0, 2.0, 4.0])
    gp = data.geometry_pairs(jax.random.PRNGKey(K), "softmax", len(c), K, c, r)
    assert gp.params.shape == (len(c), K) and gp.features is None
    g = check_geometry(gp, c, r)
    assert np.all(np.asarray(g.rho) <= 1.0)  # tabular pairs are always Case 1 (R15)


def test_softmax_feasible_set_boundary():
    for r in (0.25, 0.5, 1.0, 2.0, 4.0):
        cmax = data.softmax_max_cos(r)
        assert data.softmax_feasible(cmax - 1e-3, r, 6) and not data.softmax_feasible(cmax + 1e-3, r, 6)
    assert data.softmax_max_cos(1.0) == pytest.approx(0.5)
    assert data.softmax_feasible(-1.0, 1.0, 2) and not data.softmax_feasible(0.0, 1.0, 2)


@settings(max_examples=6, deadline=None)
@given(c=st.floats(-0.99, 0.99), r=st.floats(0.2, 5.0), K=st.integers(3, 8), seed=st.integers(0, 999))
def test_geometry_pairs_linear_hits_targets(c, r, K, seed):
    gp = data.geometry_pairs(jax.random.PRNGKey(seed), "linear", 4, K, c, r, d=3)
    assert gp.features.shape == (4, K, 3) and gp.params.shape == (3,)
    check_geometry(gp, c, r)


@pytest.mark.parametrize("c, r, expect", [(0.9, 2.0, "both_down"), (0.9, 0.5, "both_up"),
                                          (-0.5, 1.0, "ideal")])
def test_geometry_pairs_set_r7_regime(c, r, expect):
    """R7 use: an exact small step along g_w - g_l (the DPO direction up to C) moves (l_w, l_l)
    as predicted by the common/differential decomposition. eta = 1e-3: O(eta^2) terms ~1e-6 are
    far below the O(eta) first-order changes (~1e-3)."""
    gp = data.geometry_pairs(jax.random.PRNGKey(7), "linear", 3, 5, c, r)
    pol = gp.policy()

    # one pair at a time so that cross-pair inner products play no role
    for i in range(3):
        gwi = jax.grad(lambda th: pol.logps(th, gp.batch)[0][i])(gp.params)
        gli = jax.grad(lambda th: pol.logps(th, gp.batch)[1][i])(gp.params)
        new = gp.params + 1e-3 * (gwi - gli)
        dw = float(pol.logps(new, gp.batch)[0][i] - pol.logps(gp.params, gp.batch)[0][i])
        dl = float(pol.logps(new, gp.batch)[1][i] - pol.logps(gp.params, gp.batch)[1][i])
        got = {(True, True): "both_up", (False, False): "both_down",
               (True, False): "ideal"}.get((dw > 0, dl > 0), "chosen_down_rejected_up")
        assert got == expect, (dw, dl)
