"""R13-R18 (theory §5): SymPy proofs, and closed forms vs jax.grad on the last-layer model (float64)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sympy as sp

from entangle_sim.data import (edit_distance, one_token, shared_prefix, shared_suffix, softmax_draw_logp,
                               softmax_draws)
from entangle_sim.geometry import pair_gram
from entangle_sim.policies import lastlayer
from entangle_sim.symbolic import softmax_theory as st

KEY = jax.random.PRNGKey(0)


def tree_vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def per_pair_grads(pol, params, batch):
    """g_w, g_l per pair as pytrees with a leading [B] axis (vmap of one reverse pass each)."""
    def one(ex):
        ex = jax.tree.map(lambda a: a[None], ex)
        return (jax.grad(lambda p: pol.logps(p, ex)[0][0])(params),
                jax.grad(lambda p: pol.logps(p, ex)[1][0])(params))
    return jax.jit(jax.vmap(one))(batch)


# ----------------------------------------------------------------------------- SymPy proofs

@pytest.mark.parametrize("K", [2, 3, 4, 5])
def test_r14_identities_by_expansion(K):
    p = st.prob_symbols(K)
    assert all(st.is_identity(st.r14_norm_identity(p, a)) for a in range(K))
    assert all(st.is_identity(st.r14_cross_identity(p, a, b)) for a in range(K) for b in range(K) if a != b)
    for y in range(K):  # direct differentiation of log-softmax in the logits gives e_y - p
        grad, q = st.logsoftmax_grad(K, y)
        expected = (st.onehot(K, y) - sp.Matrix(q)).subs(q[-1], 1 - sum(q[:-1]))
        assert sp.expand(grad - expected) == sp.zeros(K, 1)


def test_r14_gram_factorises_and_r18_gradients_by_direct_differentiation():
    p, q = st.prob_symbols(3), st.prob_symbols(3, "q")
    h, g = st.vector_symbols(2), st.vector_symbols(2, "g")
    assert st.is_identity(st.r14_gram_identity(p, q, h, g, 0, 1))
    W = st.matrix_symbols(3, 2)
    for y in range(3):
        d = st.r18_gradients(W, h, y)
        assert sp.simplify(d["g_W"] - d["g_W_closed"]) == sp.zeros(3, 2)   # R14
        assert sp.simplify(d["g_h"] - d["g_h_closed"]) == sp.zeros(2, 1)   # R18: w_y - wbar


def test_r15_closed_forms_and_condition1_proof():
    for K, a, b in [(2, 0, 1), (3, 2, 0), (4, 1, 3)]:
        p, h = st.prob_symbols(K), st.vector_symbols(3)
        assert all(st.is_identity(eq) for eq in st.r15_closed_form_identities(p, h, a, b))
    c1 = st.r15_condition1()
    assert c1["proved"]
    pa, pb, hh = sp.symbols("p_a p_b hh", nonnegative=True)
    assert sp.expand(c1["chosen_up"].lhs - (1 - pa + pb) * hh) == 0
    assert sp.expand(c1["rejected_down"].lhs - (1 + pa - pb) * hh) == 0
    for K in (3, 4):
        for mode in (0, 1):
            assert st.r15_gwl_nonpositive_at_mode(K, 0, 1, mode)["proved"]


def test_r16_common_shift_symbolic():
    P, Aw, Al = (st.matrix_symbols(2, 2, n) for n in "PAB")
    r = st.r16_common_shift(P, Aw, Al)
    assert st.is_identity(r["chosen"]) and st.is_identity(r["rejected"])
    ps = [st.prob_symbols(3, f"p{t}_") for t in range(3)]
    hs = [st.vector_symbols(2, f"h{t}_") for t in range(3)]
    assert st.is_identity(st.r16_setting_a_shift([0, 2, 1], 0, 1, ps, hs, st.vector_symbols(2, "hT")))


def test_r17_asymptotics_symbolic():
    L, c = sp.Symbol("L", positive=True), sp.Symbol("c", positive=True)
    aw, al, be = sp.symbols("alpha_w alpha_l beta", real=True)
    r = st.r17_stylised(L, c, aw, al, be)
    assert r["cos_limit"] == 1
    assert sp.diff(r["diff_norm2"], L) == 0 and sp.expand(r["diff_norm2"] - (aw + al - 2 * be)) == 0
    assert sp.simplify(r["one_minus_cos_leading"] - (aw + al - 2 * be) / (2 * c * L)) == 0
    cw, cl = sp.symbols("c_w c_l", positive=True)
    bd = st.r17_both_down_leading(cw, cl)
    assert st.is_identity(bd["identity"])
    # sign: with c_l = c_w (1 + e)^2, e > 0, the coefficient is 2 c_w e > 0
    e = sp.Symbol("e", positive=True)
    assert sp.simplify(bd["per_L"].subs(cl, cw * (1 + e) ** 2) - 2 * cw * e) == 0


def test_r18_identities_symbolic():
    p, h, W = st.prob_symbols(3), st.vector_symbols(2), st.matrix_symbols(3, 2)
    assert all(st.is_identity(eq, simplex=p) for eq in st.r18_identities(p, h, W, 0, 1))


# ----------------------------------------------------------------------------- numerical checks

def test_r14_token_gradient_and_r13_decomposition_vs_jax():
    """R14: d log p_t(y_t) / dW = (e_{y_t} - p_t) h_t^T; R13: G_wl = sum_t sum_u <g_t(y_w), g_u(y_l)>.
    Edit-distance pairs with right padding (masked tokens contribute zero gradients)."""
    Kv = 7
    b = edit_distance(jax.random.PRNGKey(1), 4, Kv, prompt_len=2, T=4, k=2, pad=1)
    for trainable in (False, True):
        cfg = lastlayer.LastLayerConfig(K=Kv, d=5, decay=0.7, trainable_embedding=trainable)
        pol = lastlayer.make(cfg)
        params = pol.init(KEY)
        # per-token gradients g_t: Jacobian leaves [B, T, *param_shape], both responses in one pass
        jw, jl = jax.jit(jax.jacrev(lambda p: pol.token_logps(p, b)))(params)
        B, T = b.chosen.shape
        # per-pair token-by-token Gram <g_t(y_w), g_u(y_l)>, summed over parameter leaves (R13)
        tok = sum(jnp.einsum("btx,bux->btu", lw.reshape(B, T, -1), ll.reshape(B, T, -1))
                  for lw, ll in zip(jax.tree.leaves(jw), jax.tree.leaves(jl)))
        gram = jax.jit(lambda p: pair_gram(pol.logps, p, b))(params)
        # tolerance 1e-10 relative: both are float64 sums of O(10) products of O(1) numbers
        np.testing.assert_allclose(tok.sum((1, 2)), gram.G_wl, rtol=1e-10, atol=1e-12)
        if not trainable:
            fp = jax.jit(lambda q: lastlayer.features_and_probs(cfg, q, b))(params)
            e = jax.nn.one_hot(b.chosen, Kv)
            closed = jnp.einsum("btk,btd->btkd", (e - fp.p_w) * b.chosen_mask[..., None], fp.h_w)
            np.testing.assert_allclose(jw["W"], closed, atol=1e-12)


def test_r15_closed_forms_vs_jax_on_single_token_pairs():
    """R15 closed forms (SymPy, lambdified) == pair_gram on the last-layer model ('1t' pairs)."""
    Kv = 9
    cfg = lastlayer.LastLayerConfig(K=Kv, d=4, init_scale=2.0)
    pol = lastlayer.make(cfg)
    params = pol.init(KEY)
    b = one_token(jax.random.PRNGKey(2), 32, Kv, prompt_len=3)
    gram = jax.jit(lambda p: pair_gram(pol.logps, p, b))(params)
    fp = jax.jit(lambda q: lastlayer.features_and_probs(cfg, q, b))(params)
    p, h = np.asarray(fp.p_w[:, 0]), np.asarray(fp.h_w[:, 0])
    a, bb = np.asarray(b.chosen[:, 0]), np.asarray(b.rejected[:, 0])
    pa_, pb_, S_, hh_ = sp.symbols("p_a p_b S hh")
    cf = st.r15_closed_forms(pa_, pb_, S_, hh_)
    args = (p[np.arange(32), a], p[np.arange(32), bb], (p ** 2).sum(1), (h ** 2).sum(1))
    for k in ("G_ww", "G_wl", "G_ll"):
        f = sp.lambdify((pa_, pb_, S_, hh_), cf[k], "numpy")
        np.testing.assert_allclose(f(*args), getattr(gram, k), rtol=1e-12, atol=1e-14)
    assert np.all(np.asarray(gram.rho) <= 1.0)  # Condition 1 on every pair


def test_r15_zero_condition1_violations_over_20000_draws():
    """20,000 draws of (K in [2,16], d in [1,8], W, h, a != b): gradients by jax.grad (vmapped),
    zero violations of G_wl <= min(G_ww, G_ll). A violation must exceed 1e-12 relative to |h|^2
    (float64 rounding of the O(1) differences); the margins are (1 -+ p_a +- p_b)|h|^2 >= 0."""
    N = 20_000
    W, h, valid, a, b = softmax_draws(jax.random.PRNGKey(42), N)   # the draws the report's R15 entry uses
    logp = softmax_draw_logp   # padded vocabulary entries get probability 0

    def gram(W, h, valid, a, b):
        gw, gl = jax.grad(logp)(W, h, valid, a), jax.grad(logp)(W, h, valid, b)
        p = jax.nn.softmax(jnp.where(valid, W @ h, -jnp.inf))
        return jnp.vdot(gw, gw), jnp.vdot(gw, gl), jnp.vdot(gl, gl), p[a], p[b], p @ p, h @ h

    Gww, Gwl, Gll, pa, pb, S, hh = jax.jit(jax.vmap(gram))(W, h, valid, a, b)
    assert not np.any(np.asarray(a == b))
    tol = 1e-12 * np.asarray(hh)
    viol = (np.asarray(Gwl - Gww) > tol) | (np.asarray(Gwl - Gll) > tol)
    assert int(viol.sum()) == 0
    # the SymPy closed forms reproduce all 20,000 jax.grad Gram entries (1e-10 rel., float64)
    sym = sp.symbols("p_a p_b S hh")
    cf = st.r15_closed_forms(*sym)
    for k, val in (("G_ww", Gww), ("G_wl", Gwl), ("G_ll", Gll)):
        f = sp.lambdify(sym, cf[k], "numpy")
        np.testing.assert_allclose(f(pa, pb, S, hh), val, rtol=1e-10, atol=1e-12)
    # the sign claim G_wl <= 0 when the mode of p is a or b (same tolerance)
    pmax = np.asarray(jnp.max(jnp.where(valid, jax.nn.softmax(jnp.where(valid, jnp.einsum(
        "nkd,nd->nk", W, h), -jnp.inf)), 0.0), axis=1))
    at_mode = (np.asarray(pa) >= pmax) | (np.asarray(pb) >= pmax)
    assert at_mode.sum() > 1000 and np.all(np.asarray(Gwl)[at_mode] <= tol[at_mode])


def test_r16_common_shift_vs_jax_on_shared_prefix():
    """R16: g_w - g_l = (e_a - e_b) h_T^T (no prefix term) and both <g_w, D> and <g_l, D> carry
    the same shift sum_{t<T} (1[c_t=a] - 1[c_t=b] - p_t(a) + p_t(b)) <h_t, h_T> (tol 1e-12)."""
    Kv, Lp = 5, 3
    cfg = lastlayer.LastLayerConfig(K=Kv, d=4, decay=0.8)
    pol = lastlayer.make(cfg)
    params = pol.init(KEY)
    b = shared_prefix(jax.random.PRNGKey(4), 8, Kv, prompt_len=2, L=Lp)
    gw, gl = per_pair_grads(pol, params, b)
    fp = jax.jit(lambda q: lastlayer.features_and_probs(cfg, q, b))(params)
    # host-side NumPy from here on: the formula is cheap and needs no compilation
    gw, gl = np.asarray(gw["W"]), np.asarray(gl["W"])
    h, p = np.asarray(fp.h_w), np.asarray(fp.p_w)
    ch = np.asarray(b.chosen)
    a, bb, c = ch[:, Lp], np.asarray(b.rejected)[:, Lp], ch[:, :Lp]
    idx = np.arange(8)
    hT, pT = h[:, Lp], p[:, Lp]
    eye = np.eye(Kv)
    D = np.einsum("bk,bd->bkd", eye[a] - eye[bb], hT)
    np.testing.assert_allclose(gw - gl, D, atol=1e-12)
    coef = (c == a[:, None]) * 1.0 - (c == bb[:, None]) - p[idx, :Lp, a] + p[idx, :Lp, bb]
    shift = np.einsum("bt,btd,bd->b", coef, h[:, :Lp], hT)
    hh = (hT ** 2).sum(-1)
    a1_w = (1 - pT[idx, a] + pT[idx, bb]) * hh       # <(e_a - p_T) h_T^T, D>, R15
    a1_l = -(1 + pT[idx, a] - pT[idx, bb]) * hh      # <(e_b - p_T) h_T^T, D>
    np.testing.assert_allclose(np.einsum("bkd,bkd->b", gw, D) - a1_w, shift, atol=1e-12)
    np.testing.assert_allclose(np.einsum("bkd,bkd->b", gl, D) - a1_l, shift, atol=1e-12)
    assert np.abs(np.asarray(shift)).max() > 1e-3  # the shift is not trivially zero


def test_r17_cos_grows_with_suffix_length():
    """R17 on Setting A (K=8, d=8, decay=0.5, 16 pairs): mean cos rises with L and exceeds 0.9 at
    L=32; G_ww grows ~linearly while |g_w - g_l|^2 stays O(1). One compilation: all L share the
    L=32 batch, shorter suffixes are masked out (causality makes that exact)."""
    Kv, B, Lmax = 8, 16, 32
    cfg = lastlayer.LastLayerConfig(K=Kv, d=8, decay=0.5)
    pol = lastlayer.make(cfg)
    params = pol.init(jax.random.PRNGKey(1))
    b = shared_suffix(jax.random.PRNGKey(2), B, Kv, prompt_len=2, L=Lmax)
    f = jax.jit(lambda m: pair_gram(pol.logps, params, b._replace(chosen_mask=m, rejected_mask=m)))
    Ls = [0, 2, 8, 32]
    stats = []
    for L in Ls:
        m = jnp.broadcast_to((jnp.arange(Lmax + 1) <= L).astype(float), (B, Lmax + 1))
        g = f(m)
        stats.append((float(g.cos.mean()), float(g.G_ww.mean()),
                      float((g.G_ww + g.G_ll - 2 * g.G_wl).mean())))
    cos, gww, diff = map(np.array, zip(*stats))
    assert np.all(np.diff(cos) > 0), cos
    assert cos[-1] > 0.9 and cos[0] < 0.2
    assert gww[-1] > 10 * gww[0]            # grows with L ...
    assert diff[-1] < 3 * diff[0]           # ... while |g_w - g_l|^2 stays O(1)


def test_r18_counterexample_violates_condition1_under_jax():
    """The SymPy counterexample (K=3, d=2, single token) in Setting B with identity features and a
    one-token prompt (so h = E[x] is a parameter): jax.grad reproduces G_ww - G_wl ~ -1.847 < 0."""
    ce = st.r18_counterexample()
    assert ce["violates"]
    cfg = lastlayer.LastLayerConfig(K=3, d=2, trainable_embedding=True, nonlinearity="identity")
    pol = lastlayer.make(cfg)
    x = 2
    W = jnp.asarray(np.array(ce["W"], dtype=float))
    E = pol.init(KEY)["E"].at[x].set(jnp.asarray(np.array(ce["h"], dtype=float)[:, 0]))
    ones = jnp.ones((1, 1))
    b = one_token(KEY, 1, 3)._replace(prompt=jnp.array([[x]], jnp.int32), chosen=jnp.array([[0]], jnp.int32),
                                      rejected=jnp.array([[1]], jnp.int32), chosen_mask=ones, rejected_mask=ones)
    g = pair_gram(pol.logps, {"W": W, "E": E}, b)
    for k in ("G_ww", "G_wl", "G_ll"):  # 1e-12 relative: float64 vs 30-digit SymPy evaluation
        np.testing.assert_allclose(g.__getattribute__(k)[0], float(sp.N(ce[k], 30)), rtol=1e-12)
    assert float(g.G_ww[0] - g.G_wl[0]) < -1.8 and float(g.rho_w[0]) > 1.0   # chosen falls
    assert float(g.G_ll[0] - g.G_wl[0]) > 0                                   # rejected falls: Case 2


def test_r18_closed_forms_vs_jax_random():
    """R18 closed forms (SymPy, lambdified) == jax.grad in Setting B on random '1t' pairs (1e-11)."""
    Kv, d = 4, 3
    cfg = lastlayer.LastLayerConfig(K=Kv, d=d, trainable_embedding=True, nonlinearity="identity",
                                    init_scale=2.0)
    pol = lastlayer.make(cfg)
    params = pol.init(jax.random.PRNGKey(3))
    b = one_token(jax.random.PRNGKey(5), 12, Kv, prompt_len=1)
    gram = jax.jit(lambda p: pair_gram(pol.logps, p, b))(params)
    ps, hs, Ws = st.prob_symbols(Kv), st.vector_symbols(d), st.matrix_symbols(Kv, d)
    h = np.asarray(params["E"])[np.asarray(b.prompt[:, 0])]
    p = np.asarray(jax.nn.softmax(h @ np.asarray(params["W"]).T, axis=-1))
    for i in range(12):
        ai, bi = int(b.chosen[i, 0]), int(b.rejected[i, 0])
        cf = st.r18_closed_forms(ps, hs, Ws, ai, bi)
        f = sp.lambdify((ps, list(hs), list(Ws)), [cf["G_ww"], cf["G_wl"], cf["G_ll"]], "numpy")
        got = f(p[i], h[i], np.asarray(params["W"]).ravel())
        np.testing.assert_allclose(got, [gram.G_ww[i], gram.G_wl[i], gram.G_ll[i]], rtol=1e-11)
