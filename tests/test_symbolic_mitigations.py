"""SymPy derivations of entangle_sim.symbolic.mitigations, each checked against jax.grad / finite
differences in float64 (R19, R20, preconditioned and batch-level first order)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sympy as sp

from entangle_sim.symbolic import mitigations as sm
from entangle_sim.symbolic.proofs import a, b, c
from entangle_sim.symbolic.symbols import eta


@pytest.mark.parametrize("proof", sm.all_proofs(), ids=lambda p: p.result)
def test_proofs_hold(proof):
    assert proof.holds, proof.as_dict()


def test_r19_guarantee_on_1000_random_pairs_sympy_vs_autodiff():
    """1,000 random gradient pairs in R^8 (norms over 4 decades; 20% nearly parallel with unequal
    norms, DPO's both-down corner): the first-order change <g, delta_theta>, computed by a vmapped
    jax.jvp of l(theta) = <g, theta>, equals the SymPy closed form eta s |g|(1 - cos) to 1e-10 relative
    to |g| (float64 round-off of 8-term sums, amplified by cancellation near cos = 1), and its sign is
    never wrong: chosen >= 0, rejected <= 0 on every pair."""
    dcw, dcl, _ = sm.normalized_changes()
    fw = sp.lambdify((a, b, c, eta, sm.s), dcw, "numpy")
    fl = sp.lambdify((a, b, c, eta, sm.s), dcl, "numpy")
    rng = np.random.default_rng(0)
    N, n = 1000, 8
    gw = rng.normal(size=(N, n)) * 10 ** rng.uniform(-2, 2, (N, 1))
    gl = rng.normal(size=(N, n)) * 10 ** rng.uniform(-2, 2, (N, 1))
    par = rng.uniform(size=N) < 0.2
    gl[par] = gw[par] * rng.uniform(0.1, 10, (par.sum(), 1)) + 1e-3 * rng.normal(size=(par.sum(), n))
    A, B = np.linalg.norm(gw, axis=1), np.linalg.norm(gl, axis=1)
    dtheta = gw / A[:, None] - gl / B[:, None]  # eta = s = 1
    lin = jax.vmap(lambda g, d: jax.jvp(lambda t: jnp.dot(g, t), (jnp.zeros(n),), (d,))[1])
    lin_w, lin_l = np.asarray(lin(gw, dtheta)), np.asarray(lin(gl, dtheta))
    C = np.einsum("ij,ij->i", gw, gl) / (A * B)
    assert np.all(lin_w >= 0) and np.all(lin_l <= 0)
    np.testing.assert_allclose(lin_w, fw(A, B, C, 1.0, 1.0), rtol=0, atol=1e-10 * A.max())
    assert np.all(np.abs(lin_w - fw(A, B, C, 1.0, 1.0)) <= 1e-10 * A)
    assert np.all(np.abs(lin_l - fl(A, B, C, 1.0, 1.0)) <= 1e-10 * B)


def test_squared_norm_counterexample_realised():
    """The witness of R19' realised in R^2: g_w = (2, 0), g_l with |g_l| = 1, cos = 0.9. A real step of
    the squared-norm update on l(theta) = <g, theta> (linear, so first order is exact) lowers chosen."""
    gw = np.array([2.0, 0.0])
    gl = np.array([0.9, np.sqrt(1 - 0.81)])
    d = gw / (gw @ gw) - gl / (gl @ gl)
    assert gw @ d == pytest.approx(-0.8, abs=1e-14) and gl @ d < 0
    dn = gw / np.linalg.norm(gw) - gl / np.linalg.norm(gl)   # R19 on the same pair
    assert gw @ dn > 0 and gl @ dn < 0


def test_preconditioned_first_order_vs_autodiff_and_fd():
    """Item 4: the SymPy change eta (d_w G^P_ww - d_l G^P_wl) at a random state of a NONLINEAR model
    l_w(theta) = log softmax(theta)_0, l_l = log softmax(theta)_1 equals jvp(l, -eta P grad L) (autodiff,
    1e-12) and the finite-difference step difference to O(eta^2): errors shrink ~100x per 10x eta."""
    gwS, glS, pS, Pww, Pwl, Pll = sm.preconditioned_gram_symbols(3)
    dws, dls = sp.symbols("d_w d_l", real=True)
    args = (*gwS, *glS, *pS, dws, dls, eta)
    f = sp.lambdify(args, eta * (dws * Pww - dls * Pwl), "numpy")
    theta = jnp.array([0.3, -0.2, 0.5])
    P = jnp.array([2.0, 0.5, 1.5])
    lw = lambda t: jax.nn.log_softmax(t)[0]
    ll = lambda t: jax.nn.log_softmax(t)[1]
    L = lambda t: -jax.nn.log_sigmoid(lw(t) - ll(t))
    gw, gl = jax.grad(lw)(theta), jax.grad(ll)(theta)
    s_ = jax.nn.sigmoid(-(lw(theta) - ll(theta)))
    errs = []
    for e in (1e-2, 1e-3, 1e-4):
        dth = -e * P * jax.grad(L)(theta)
        sym = f(*np.asarray(gw), *np.asarray(gl), *np.asarray(P), float(s_), float(s_), e)
        auto = jax.jvp(lw, (theta,), (dth,))[1]
        np.testing.assert_allclose(float(auto), sym, rtol=1e-12)
        errs.append(abs(float(lw(theta + dth) - lw(theta)) - sym))
    assert 50 < errs[0] / errs[1] < 200 and 50 < errs[1] / errs[2] < 200, errs


def test_batch_first_order_vs_exact_step():
    """Item 5: delta_l = -eta G dL/dl (G = J J^T, 2B x 2B) matches jvp exactly (1e-12) and a real
    step to O(eta^2) on a 3-pair linear-softmax model with shared parameters (cross-pair terms on)."""
    from entangle_sim import data, mitigations
    gp = data.geometry_pairs(jax.random.PRNGKey(0), "linear", 3, K=5, target_cos=0.8, norm_ratio=1.7)
    pol = gp.policy()
    th0 = gp.params + 0.1

    @jax.jit   # everything below in one compilation (eager dispatch dominated this test's runtime)
    def state(th0):
        lw, ll = pol.logps(th0, gp.batch)
        dL = jax.grad(lambda x, y: -jax.nn.log_sigmoid(0.1 * (x - y)).mean(), argnums=(0, 1))(lw, ll)
        G = mitigations.batch_gram(pol.logps, th0, gp.batch)
        grad = jax.grad(lambda t: -jax.nn.log_sigmoid(0.1 * (lambda u: u[0] - u[1])(pol.logps(t, gp.batch))).mean())(th0)
        return lw, ll, dL, G, grad

    @jax.jit
    def step(th0, e, G, dL, grad, lw, ll):
        pred = mitigations.batch_first_order(G, jnp.concatenate(dL), e)
        lin = jax.jvp(lambda t: jnp.concatenate(pol.logps(t, gp.batch)), (th0,), (-e * grad,))[1]
        real = jnp.concatenate(pol.logps(th0 - e * grad, gp.batch)) - jnp.concatenate([lw, ll])
        return pred, lin, real

    lw, ll, dL, G, grad = state(th0)
    errs = []
    for e in (1e-1, 1e-2):
        pred, lin, real = step(th0, e, G, dL, grad, lw, ll)
        np.testing.assert_allclose(pred, lin, rtol=1e-12, atol=1e-15)
        errs.append(float(jnp.max(jnp.abs(real - pred))))
    assert 50 < errs[0] / errs[1] < 200, errs
    # one-pair theory = the block-diagonal part; it differs from the batch value (cross terms exist)
    own = mitigations.one_pair_first_order(G, jnp.concatenate(dL), 1.0)
    assert float(jnp.max(jnp.abs(own - mitigations.batch_first_order(G, jnp.concatenate(dL), 1.0)))) > 1e-6


def test_r20_setting_a_shift_vs_lastlayer_model():
    """R20-A numerically: lastlayer Setting A, y_w = (a, c), y_l = (b, c) (c different from a, b), oracle
    mask on the first token. jvp of the full log-probs along the masked update equals the closed form
    C[(1 - p_a + p_b)|h_1|^2 - (p^w_2(a) - p^w_2(b)) <h^w_2, h_1>] (1e-12)."""
    from entangle_sim.policies import lastlayer
    from entangle_sim.types import PairBatch
    cfg = lastlayer.LastLayerConfig(K=5, d=3)
    pol = lastlayer.make(cfg)
    params = pol.init(jax.random.PRNGKey(3))
    batch = PairBatch(jnp.array([[4, 2]]), jnp.array([[0, 3]]), jnp.array([[1, 3]]), jnp.ones((1, 2)), jnp.ones((1, 2)))
    tok = lambda W: pol.token_logps({"W": W}, batch)

    @jax.jit   # one compilation instead of many eager ones
    def changes(W):
        masked_grad = jax.grad(lambda W: tok(W)[0][0, 0] - tok(W)[1][0, 0])(W)  # C = 1
        dw = jax.jvp(lambda W: tok(W)[0].sum(), (W,), (masked_grad,))[1]
        dl = jax.jvp(lambda W: tok(W)[1].sum(), (W,), (masked_grad,))[1]
        return dw, dl, lastlayer.features_and_probs(cfg, {"W": W}, batch)

    dw, dl, fp = changes(params["W"])
    h1, p1 = fp.h_w[0, 0], fp.p_w[0, 0]
    hw2, pw2, hl2, pl2 = fp.h_w[0, 1], fp.p_w[0, 1], fp.h_l[0, 1], fp.p_l[0, 1]
    form_w = (1 - p1[0] + p1[1]) * h1 @ h1 + (-pw2[0] + pw2[1]) * hw2 @ h1
    form_l = -(1 + p1[0] - p1[1]) * h1 @ h1 + (-pl2[0] + pl2[1]) * hl2 @ h1
    np.testing.assert_allclose([dw, dl], [form_w, form_l], rtol=1e-12)
