"""The resolved loss (`losses.get(name).bind(**hp)`) and the pair variables (`PairState`): one
validation, keyword-only names, explicit reference, and the same numbers as the TRL-style calls,
autodiff and a real gradient step (float64 unless stated)."""
import dataclasses

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest

from entangle_sim import data, losses, regimes, symbolic, train
from entangle_sim.types import PairState

rng = np.random.default_rng(0)
N = 16
STATE = PairState.of(-rng.uniform(1, 30, N), -rng.uniform(1, 30, N),
                     reference=(-rng.uniform(1, 30, N), -rng.uniform(1, 30, N)),
                     chosen_len=rng.integers(1, 12, N).astype(float), rejected_len=rng.integers(1, 12, N).astype(float))
# per-pair losses of several shapes: f-divergence (structural), keep-value (alpha, label_smoothing), plain
CASES = [("sigmoid", {"beta": 0.3}), ("sigmoid", {"f_divergence_type": "js_divergence"}), ("robust", {"label_smoothing": 0.1}),
         ("alphapo", {"alpha": 0.25}), ("ipo", {}), ("kto", {"reduction": "row_mean", "kl": 0.5}), ("dpop", {"dpop_lambda": 5.0})]


def test_bind_is_one_frozen_hashable_value():
    a, b = losses.get("sigmoid").bind(beta=0.5), losses.get("dpo").bind(beta=0.5)
    assert a == b and hash(a) == hash(b)
    assert a != losses.get("sigmoid").bind(beta=0.4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.numeric = ()
    assert a.fixed == (("f_divergence_type", "reverse_kl"),)   # selects the formula
    assert dict(a.numeric) == {"beta": 0.5, "f_alpha_divergence_coef": 0.5}
    assert dict(losses.get("alphapo").bind(alpha=0.25).fixed)["alpha"] == 0.25   # changes the formula's shape
    cfg = train.TrainConfig(loss="sigmoid", loss_params=(("beta", 0.5),))
    assert cfg.resolved == a and {cfg: 1}[cfg] == 1   # the config stays a static (hashable) jit argument


def test_bind_refuses_misspelt_names_and_bad_values():
    with pytest.raises(ValueError, match="did you mean 'beta'"):
        losses.get("sigmoid").bind(betta=0.1)
    with pytest.raises(ValueError, match="out of range"):
        losses.get("sigmoid").bind(beta=-1.0)
    with pytest.raises(TypeError):
        losses.get("sigmoid").bind(0.1)   # keyword-only
    r = losses.get("sigmoid").bind()
    with pytest.raises(ValueError, match="selects the formula"):
        r.replace(f_divergence_type="js_divergence")
    assert dict(r.replace(beta=0.2).numeric)["beta"] == 0.2


def test_pair_state_reference_is_explicit():
    with pytest.raises(TypeError):
        PairState.of(-1.0, -2.0)   # no silent reference
    with pytest.raises(ValueError, match="none"):
        PairState.of(-1.0, -2.0, reference="zero")
    s = PairState.of(jnp.array([-1.0]), jnp.array([-2.0]), reference="none")
    assert float(s.ref_chosen_logps[0]) == 0.0 and float(s.ref_rejected_logps[0]) == 0.0
    # "self": r = 0 and no gradient through the reference (DPO's first step)
    dpo = losses.get("sigmoid").bind(beta=1.0)
    g = jax.grad(lambda x: dpo.loss(PairState.of(x, jnp.array(-2.0), reference="self")))(jnp.array(-1.0))
    g_ref = jax.grad(lambda x: dpo.loss(PairState.of(x, jnp.array(-2.0), reference=(-1.0, -2.0))))(jnp.array(-1.0))
    assert float(g) == pytest.approx(float(g_ref), rel=1e-15)


@pytest.mark.parametrize("name,hp", CASES, ids=lambda x: str(x))
def test_resolved_equals_trl_style_call_and_autodiff(name, hp):
    spec, r = losses.get(name), losses.get(name).bind(**hp)
    s = STATE
    np.testing.assert_array_equal(r.loss(s), spec(*s[:6], **hp))            # the same function, bit for bit
    np.testing.assert_array_equal(r.batch(s), spec.batch(*s[:6], **hp))
    # symbolic incentives vs autodiff of the JAX loss, float64: agree to rounding (rtol 1e-9; the
    # two differ only in the order of floating-point operations)
    dw, dl = r.incentives(s)
    aw, al = losses.incentives(spec, *s[:6], **hp)
    np.testing.assert_allclose(dw, aw, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dl, al, rtol=1e-9, atol=1e-12)


def test_predict_is_the_first_order_of_a_real_step():
    """One SGD step of size eta on one pair of a log-linear policy: predict's delta has O(eta^2) error
    (halving eta divides the error by ~4; slope 2 within [1.8, 2.2])."""
    gp = data.geometry_pairs(jax.random.PRNGKey(3), "linear", 1, K=6, target_cos=0.6, norm_ratio=1.5)
    pol, th0, batch = gp.policy(), gp.params, gp.batch
    loss = losses.get("alphapo").bind(alpha=0.25, beta=2.0)

    def logps(th):
        lw, ll = pol.logps(th, batch)
        return lw[0], ll[0]

    lw0, ll0 = logps(th0)
    ref = (lw0 + 0.3, ll0 - 0.2)
    state = PairState.of(lw0, ll0, reference=ref, chosen_len=3.0, rejected_len=2.0)
    g = jax.grad(lambda th: loss.loss(state._replace(**dict(zip(("chosen_logps", "rejected_logps"), logps(th))))))(th0)
    jw, jl = jax.grad(lambda th: logps(th)[0])(th0), jax.grad(lambda th: logps(th)[1])(th0)
    vdot = lambda a, b: sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    gram = (vdot(jw, jw), vdot(jw, jl), vdot(jl, jl))
    errs = []
    for eta in (1e-2, 5e-3, 2.5e-3):
        p = loss.predict(state, gram, eta)
        lw1, ll1 = logps(jax.tree.map(lambda x, d: x - eta * d, th0, g))
        errs.append(abs(float(lw1 - lw0) - float(p.delta_chosen)) + abs(float(ll1 - ll0) - float(p.delta_rejected)))
        assert int(p.regime) == int(regimes.classify(lw1 - lw0, ll1 - ll0))
    slopes = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    assert np.all((slopes > 1.8) & (slopes < 2.2)), (errs, slopes)


def test_formula_is_keyword_strict():
    der = symbolic.derive(losses.get("sigmoid"))
    vals = dict(chosen_logps=-1.0, rejected_logps=-2.0, ref_chosen_logps=-1.0, ref_rejected_logps=-1.5, beta=0.1)
    assert float(der.d_w(**vals)) > 0
    with pytest.raises(ValueError, match="did you mean 'beta'"):
        der.d_w(**vals, betta=0.5)
    # a value for a hyperparameter the derivation fixed must equal it (it used to be ignored)
    alpha0 = symbolic.derive(losses.get("alphapo"))      # alpha = 0: plain SimPO
    with pytest.raises(ValueError, match="alpha"):
        alpha0.d_w(chosen_logps=-1.0, rejected_logps=-2.0, chosen_len=1.0, rejected_len=1.0, beta=0.1,
                   simpo_gamma=0.5, alpha=0.25)


def test_lengths_must_be_positive():
    """Hostile input: SimPO divides by the lengths; 0 used to give NaN."""
    with pytest.raises(ValueError, match="chosen_len"):
        losses.get("simpo")(-10.0, -12.0, chosen_len=0.0, rejected_len=3.0)
    with pytest.raises(ValueError, match="rejected_len"):
        losses.get("simpo").bind().batch(PairState.of(jnp.array([-1.0]), jnp.array([-2.0]), reference="none",
                                                      rejected_len=jnp.array([-1.0])))


def test_geometry_pairs_refuses_nan_cos():
    with pytest.raises(ValueError, match="target_cos"):
        data.geometry_pairs(jax.random.PRNGKey(0), "linear", 2, K=4, target_cos=float("nan"), norm_ratio=1.0)


def test_alphapo_large_alpha_value_is_the_exact_value_rounded():
    """alpha = 1e6 with the chosen response ahead: the registry's 0 is the correctly rounded value,
    not a silent failure. Exact: L = log(1 + e^{-t}) <= e^{-t}, t = beta z - gamma,
    z = (e^{-alpha lbar_l} - e^{-alpha lbar_w})/alpha (mpmath, 30 digits); t > 800 gives
    L < e^{-800} < 2.5e-324, half the smallest float64 subnormal: the nearest float64 is 0."""
    lw, ll, n, beta, gamma, alpha = -10.0, -12.0, 1.0, 0.1, 0.5, 1e6
    got = float(losses.get("alphapo")(lw, ll, chosen_len=n, rejected_len=n, alpha=alpha, beta=beta))
    with mpmath.workdps(30):
        z = (mpmath.exp(-alpha * ll / n) - mpmath.exp(-alpha * lw / n)) / alpha
        t = beta * z - gamma
        assert t > 800
    assert got == 0.0


def test_symbolic_alphapo_incentives_far_from_policy_are_not_nan():
    """Hostile input: alpha = 0.25, margin +1e4, references -5e3, lengths 10/15. In float32
    exp(-l/(4n)) overflows; the derived formulas then fall back to their log-space form where (and
    only where) the plain one is NaN, and give float64's value (0)."""
    loss = losses.get("alphapo").bind(alpha=0.25)
    for lw, ll in ((0.0, -1e4), (-1e4, -2e4), (-5e3, -1.5e4)):
        vals = {}
        for dt in (jnp.float32, jnp.float64):
            s = PairState.of(jnp.asarray(lw, dt), jnp.asarray(ll, dt), reference=(jnp.asarray(-5e3, dt), jnp.asarray(-5e3, dt)),
                             chosen_len=jnp.asarray(10.0, dt), rejected_len=jnp.asarray(15.0, dt))
            vals[dt] = [float(x) for x in loss.incentives(s)]
        assert vals[jnp.float32] == vals[jnp.float64] == [0.0, 0.0], (lw, ll, vals)
    # where the plain form is finite the value is unchanged, bit for bit
    der = loss.derivation
    from entangle_sim.symbolic.functions import lambdify_jax

    v = loss.values(PairState.of(-3.0, -4.0, reference=(-2.0, -5.0), chosen_len=10.0, rejected_len=15.0))
    names = der.d_w.names
    plain = lambdify_jax([s for _, s in names], der.d_w.expr)(*[jnp.asarray(v[k]) for k, _ in names])
    assert float(der.d_w(**v)) == float(plain)


def test_run_is_the_loop_of_run_steps():
    gp = data.geometry_pairs(jax.random.PRNGKey(0), "linear", 4, K=6, target_cos=0.5, norm_ratio=1.0)
    pol = gp.policy()
    cfg = train.TrainConfig(loss="sigmoid", lr=0.1, steps=3, record=False)
    step = train.make_step(pol, cfg)
    opt = train.make_optimizer("sgd", 0.1).init(gp.params)
    ref = pol.logps(gp.params, gp.batch)
    key = jax.random.PRNGKey(1)
    a = train.run_steps(step, gp.params, opt, gp.batch, ref, key, 3)[2]
    # the same with a batch function and a reference function, and a per-step reduction
    b = train.run(step, gp.params, opt, jax.random.split(key, 3), lambda k: gp.batch,
                  reference=lambda bt: pol.logps(gp.params, bt), reduce=lambda rec, bt: rec[0].mean())[2]
    np.testing.assert_array_equal(np.asarray(a[0]).mean(-1), np.asarray(b))

