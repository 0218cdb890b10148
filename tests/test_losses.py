"""Loss registry vs theory §10 (R1, R21): values and incentives three ways in float64.

For every registered loss at random states (margins |z| up to 1e3, lengths 1..4096):
  reference formula (tests/reference_formulas.py, written from docs/theory.md)  ==  JAX loss
  reference incentives  ==  SymPy d_w, d_l  ==  jax.grad  ==  finite differences.
"""
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from entangle_sim import losses
from entangle_sim.symbolic import derive
from entangle_sim.testing import extreme_margin_states, incentives_in_dtype, richardson
from entangle_sim.testing import pair_values as _vals
from entangle_sim.testing import random_states as _states
from reference_formulas import kinks, ref

ALL = losses.names()
# Non-default hyperparameters exercised on top of the defaults (each loss also runs at defaults).
EXTRA = {
    "robust": {"label_smoothing": 0.2}, "aot": {"label_smoothing": 0.1}, "exo_pair": {"label_smoothing": 0.05},
    "alphapo": {"alpha": 0.25}, "cpo_simpo": {"alpha": -0.3}, "kto": {"kl": 0.7},
    "cpo_sigmoid": {"label_smoothing": 0.0, "cpo_alpha": 0.5},
}


def _cases():
    for name in ALL:
        yield name, {}
        if name in EXTRA:
            yield name, EXTRA[name]


@pytest.mark.parametrize("name,extra", list(_cases()), ids=lambda x: x if isinstance(x, str) else str(x))
def test_loss_and_incentives_match_reference(name, extra):
    spec = losses.get(name)
    hp = spec.resolve(**extra)
    state = _states(400, seed=zlib.crc32(name.encode()))
    if extra.get("alpha", 0) != 0:
        # AlphaPO's u = (1 - e^{-alpha lbar})/alpha is exponential in the mean log-prob: keep
        # lbar >= -50 so the float64 reference does not overflow (an inherent property of the loss).
        state[1] = np.maximum(state[1], -50 * state[5])
    lw, ll, rw0, rl0, nw, nl = state
    keep = np.array([kinks(name, *[s[i] for s in state], hp) > 1e-3 for i in range(len(lw))])
    # ORPO's odds need mean log-probs away from 0 in float64 (p = 1 makes log(1 - p) infinite).
    expected = np.array([ref(name, *[s[i] for s in state], hp) for i in range(len(lw))])
    # JAX per-pair loss.
    got = np.asarray(spec(lw, ll, rw0, rl0, nw, nl, **extra))
    # rtol 1e-9: both sides are closed forms in float64; differences come only from rounding in
    # a few dozen operations (~1e-14 relative), except where the value is a difference of large
    # terms; atol covers losses that are ~0 at saturated margins.
    np.testing.assert_allclose(got, expected[:, 0], rtol=1e-9, atol=1e-12)
    # SymPy incentives (lambdified) vs the spec's closed forms.
    der = derive(spec, **{k: v for k, v in extra.items() if spec.hyper(k).keep_value})
    vals = _vals(state, hp)
    dw_sym, dl_sym = np.asarray(der.d_w(**vals)), np.asarray(der.d_l(**vals))
    dw_sym, dl_sym = np.broadcast_to(dw_sym, lw.shape), np.broadcast_to(dl_sym, lw.shape)
    # rtol 1e-9 everywhere the incentive is not vanishingly small. atol 1e-15: at saturated
    # margins some incentives (exo_pair, discopop) are ~1e-200, formed as differences of terms that
    # are themselves ~1e-200, so their *relative* error is meaningless; 1e-15 is 1e-14 of the
    # natural scale beta = 0.1 of an incentive.
    np.testing.assert_allclose(dw_sym[keep], expected[keep, 1], rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(dl_sym[keep], expected[keep, 2], rtol=1e-9, atol=1e-15)
    # jax.grad of the JAX loss.
    dw_ad, dl_ad = losses.incentives(spec, lw, ll, rw0, rl0, nw, nl, **extra)
    np.testing.assert_allclose(np.asarray(dw_ad)[keep], expected[keep, 1], rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(np.asarray(dl_ad)[keep], expected[keep, 2], rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("name", ALL)
def test_incentives_match_finite_differences(name):
    """Richardson-extrapolated central differences (error O(h^4)) of the JAX loss, float64."""
    spec = losses.get(name)
    hp = spec.resolve()
    state = _states(60, seed=1 + zlib.crc32(name.encode()))
    lw, ll, rw0, rl0, nw, nl = state
    h = 1e-3
    f = jax.jit(lambda a, b: spec(a, b, rw0, rl0, nw, nl))
    dw_fd = -np.asarray(richardson(lambda x: f(x, ll), lw, h))
    dl_fd = np.asarray(richardson(lambda x: f(lw, x), ll, h))
    dw_ad, dl_ad = (np.asarray(x) for x in losses.incentives(spec, *state))
    keep = np.array([kinks(name, *[s[i] for s in state], hp) > 10 * h for i in range(len(lw))])
    keep &= (lw < -3 * h) & (ll < -3 * h)  # the stencil must stay inside the domain l <= 0
    if name == "orpo":
        # ORPO's odds have a log singularity at l = 0 (p = 1); the O(h^4) truncation term grows as
        # (h / distance)^4, so the stencil keeps 100 h away from it.
        keep &= np.minimum(-lw / nw, -ll / nl) * np.minimum(nw, nl) > 100 * h
    loss_scale = np.abs(np.asarray(f(lw, ll)))
    # Tolerance: 1e-9 relative + the FD floor set by rounding, ~ 2 eps |L| / h (eps = 2.2e-16),
    # and the O(h^4) truncation term (scale-free losses with beta = 0.1 have tiny 5th derivatives).
    tol = 1e-9 * np.abs(dw_ad) + 20 * 2.2e-16 * (loss_scale + 1) / h + 1e-11
    assert np.all(np.abs(dw_fd - dw_ad)[keep] <= tol[keep]), name
    tol = 1e-9 * np.abs(dl_ad) + 20 * 2.2e-16 * (loss_scale + 1) / h + 1e-11
    assert np.all(np.abs(dl_fd - dl_ad)[keep] <= tol[keep]), name


@pytest.mark.parametrize("fdiv,dphi", [
    ("forward_kl", lambda r: np.exp(-r)), ("js_divergence", lambda r: 1 / (1 + np.exp(r))),
    ("alpha_divergence", lambda r: np.exp(-0.5 * r))])
def test_f_divergence_score_maps(fdiv, dphi):
    """theory §10.1 / R21: under another f-divergence d is multiplied by phi'(r)."""
    spec = losses.get("sigmoid")
    rng = np.random.default_rng(3)
    r_w, r_l = rng.normal(0, 2, 50), rng.normal(0, 2, 50)
    phi = {"forward_kl": lambda r: -np.exp(-r), "js_divergence": lambda r: -np.logaddexp(0, -r),
           "alpha_divergence": lambda r: np.exp(-0.5 * r) / (-0.5)}[fdiv]
    Dphi = phi(r_w) - phi(r_l)
    lw, ll = -5.0 + r_w, -6.0 + r_l
    got = np.asarray(spec(lw, ll, -5.0, -6.0, f_divergence_type=fdiv))
    np.testing.assert_allclose(got, np.logaddexp(0, -0.1 * Dphi), rtol=1e-12)
    dw, dl = losses.incentives(spec, lw, ll, -5.0, -6.0, f_divergence_type=fdiv)
    s = 0.1 / (1 + np.exp(0.1 * Dphi))
    np.testing.assert_allclose(np.asarray(dw), s * dphi(r_w), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(dl), s * dphi(r_l), rtol=1e-10)
    der = derive(spec, f_divergence_type=fdiv)
    v = dict(chosen_logps=lw, rejected_logps=ll, ref_chosen_logps=-5.0, ref_rejected_logps=-6.0, beta=0.1,
             f_alpha_divergence_coef=0.5)
    np.testing.assert_allclose(np.asarray(der.d_w(**v)), s * dphi(r_w), rtol=1e-10)


def test_alpha_divergence_clamp_and_fallback():
    spec = losses.get("sigmoid")
    # exponent (a-1) r clamped at 80: r = -1e3 with a = 0.5 would overflow float64 to inf otherwise
    val = spec(-1e3, -1.0, 0.0, 0.0, f_divergence_type="alpha_divergence")
    assert np.isfinite(float(val))
    # |a - 1| < 1e-6 falls back to reverse KL
    np.testing.assert_allclose(
        float(spec(-3.0, -4.0, -2.0, -2.5, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)),
        float(spec(-3.0, -4.0, -2.0, -2.5)), rtol=1e-15)


def test_batch_forms():
    """TRL batch totals: mean of per-pair losses; token-mean NLL (CPO, RRHF, sft); sorted AOT."""
    rng = np.random.default_rng(0)
    B = 6
    nw, nl = rng.integers(1, 30, B).astype(float), rng.integers(1, 30, B).astype(float)
    lw, ll = -nw * rng.uniform(0.1, 2, B), -nl * rng.uniform(0.1, 2, B)
    rw0, rl0 = lw + rng.normal(0, 1, B), ll + rng.normal(0, 1, B)
    dpo = losses.get("sigmoid")
    np.testing.assert_allclose(float(dpo.batch(lw, ll, rw0, rl0)), np.mean(np.logaddexp(0, -0.1 * ((lw - rw0) - (ll - rl0)))),
                               rtol=1e-13)
    # sft: -sum(l_w) / sum(n_w) (TRL token mean over the batch).
    np.testing.assert_allclose(float(losses.get("sft").batch(lw, ll, rw0, rl0, nw, nl)), -lw.sum() / nw.sum(), rtol=1e-13)
    # CPO: mean of the preference term + cpo_alpha * batch token-mean NLL.
    cpo = losses.get("cpo_sigmoid")
    expected = np.mean(np.logaddexp(0, -0.1 * (lw - ll))) + 1.0 * (-lw.sum() / nw.sum())
    np.testing.assert_allclose(float(cpo.batch(lw, ll, rw0, rl0, nw, nl)), expected, rtol=1e-13)
    # AOT: both sides sorted independently.
    v = np.sort(lw - ll) - np.sort(rw0 - rl0)
    np.testing.assert_allclose(float(losses.get("aot").batch(lw, ll, rw0, rl0)), np.mean(np.logaddexp(0, -0.1 * v)),
                               rtol=1e-13)
    v = np.sort(lw - rw0) - np.sort(ll - rl0)
    np.testing.assert_allclose(float(losses.get("aot_unpaired").batch(lw, ll, rw0, rl0)),
                               np.mean(np.logaddexp(0, -0.1 * v)), rtol=1e-13)
    # a batch of one pair is the per-pair loss, for every loss (definition of "per-pair").
    for name in ALL:
        spec = losses.get(name)
        np.testing.assert_allclose(float(spec.batch(lw[:1], ll[:1], rw0[:1], rl0[:1], nw[:1], nl[:1])),
                                   float(spec(lw[0], ll[0], rw0[0], rl0[0], nw[0], nl[0])), rtol=1e-13, err_msg=name)


def test_every_loss_dispatches_and_is_jittable():
    """theory §7.3 bug 3: every registered loss is dispatched and evaluated (also under jit/vmap)."""
    x = jnp.array([-3.0, -4.0])
    for name in ALL + list(losses.aliases()):
        spec = losses.get(name)
        out = jax.jit(jax.vmap(lambda a, b: spec(a, b, -3.5, -3.5, 2.0, 3.0)))(x, x - 1)
        assert out.shape == (2,) and np.all(np.isfinite(np.asarray(out))), name


def test_registry_contract():
    names = losses.names()
    trl_dpo = {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
               "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"}
    assert {losses.get(n).trl for n in trl_dpo} == {f"DPOTrainer:{n}" for n in trl_dpo}  # all 15 TRL types
    for n in ("cpo_sigmoid", "cpo_simpo", "cpo_hinge", "cpo_ipo", "alphapo", "orpo", "kto", "apo_zero_unpaired",
              "dpop", "rdpo", "rrhf", "sppo", "slic", "ipo_sum", "simpo"):
        assert n in names
    assert losses.get("dpo") is losses.get("sigmoid") and losses.get("pdpo") is losses.get("dpop")
    with pytest.raises(ValueError, match="did you mean 'sigmoid'"):
        losses.get("sigmoidd")
    with pytest.raises(ValueError, match="did you mean 'beta'"):
        losses.get("sigmoid")(-1.0, -2.0, betta=0.3)
    with pytest.raises(ValueError, match="out of range"):
        losses.get("robust")(-1.0, -2.0, label_smoothing=0.5)
    with pytest.raises(ValueError, match="out of range"):
        losses.get("exo_pair")(-1.0, -2.0, label_smoothing=0.0)
    with pytest.raises(ValueError, match="not one of"):
        losses.get("sigmoid")(-1.0, -2.0, f_divergence_type="kl")
    for n in names:  # each has a description and JSON-ready info
        info = losses.get(n).info()
        assert info["description"] and isinstance(info["hyperparameters"], dict)


def test_ld_alpha_and_wpo_modifiers():
    tok_w = jnp.array([[-1.0, -2.0, -3.0, 0.0]])
    mask_w = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    mask_l = jnp.array([[1.0, 1.0, 0.0, 0.0]])
    # LD-DPO: first min(3, 2) = 2 tokens in full, the rest weighted by alpha.
    assert float(losses.ld_logps(tok_w, mask_w, mask_l, ld_alpha=0.5)[0]) == pytest.approx(-1 - 2 - 0.5 * 3)
    assert float(losses.ld_logps(tok_w, mask_w, mask_l, ld_alpha=1.0)[0]) == pytest.approx(-6.0)
    # WPO: omega = exp(mean(logp - logsumsq)), detached.
    lss = jnp.array([[-0.5, -0.5, -0.5, 0.0]])
    w = losses.wpo_weight(tok_w, lss, mask_w)
    assert float(w[0]) == pytest.approx(math.exp(((-1 + 0.5) + (-2 + 0.5) + (-3 + 0.5)) / 3))
    g = jax.grad(lambda t: losses.wpo_weight(t, lss, mask_w).sum())(tok_w)
    assert float(jnp.abs(g).sum()) == 0.0


@pytest.mark.parametrize("name", ALL)
def test_float32_extreme_margins_stay_finite_and_accurate(name):
    """loss values and incentives finite and accurate for margins up to +-1e4 in float32."""
    spec = losses.get(name)
    hp = spec.resolve()
    margins = np.array([-1e4, -1e3, -30.0, -1.0, 0.0, 1.0, 30.0, 1e3, 1e4])
    lw, ll, rw0, rl0, nw, nl = extreme_margin_states(margins)  # l_w - l_l = margin, |l| ~ 2e4, n = 4096
    f32 = [jnp.asarray(x, jnp.float32) for x in (lw, ll, rw0, rl0, nw, nl)]
    val = np.asarray(spec(*f32), dtype=np.float64)
    # jax.grad in float32 itself (losses.incentives would promote the inputs to float64)
    dw, dl = (np.asarray(x, dtype=np.float64) for x in incentives_in_dtype(spec, f32))
    assert np.all(np.isfinite(val)) and np.all(np.isfinite(dw)) and np.all(np.isfinite(dl)), name
    exp = np.array([ref(name, lw[i], ll[i], rw0[i], rl0[i], nw[i], nl[i], hp) for i in range(len(margins))])
    # float32 accuracy: inputs of size 2e4 carry an absolute rounding of ~1e-3 (ulp(2e4) = 2e-3),
    # which moves beta * D by ~2e-4; the loss is 1-Lipschitz in beta * D for these losses, and the
    # quadratic ones (IPO/SPPO) amplify by ~2|z|. Hence rtol 1e-3 with a matching atol.
    scale = np.maximum(1.0, np.abs(exp[:, 0]))
    assert np.all(np.abs(val - exp[:, 0]) <= 1e-3 * scale + 5e-3), name
    dscale = np.maximum(np.abs(exp[:, 1:]), 1e-30)
    keep = np.array([kinks(name, lw[i], ll[i], rw0[i], rl0[i], nw[i], nl[i], hp) > 1 for i in range(len(margins))])
    err = np.abs(np.stack([dw, dl], 1) - exp[:, 1:])
    assert np.all((err <= 2e-3 * dscale + 1e-3 * np.abs(exp[:, 1:]).max() + 1e-6)[keep]), name
