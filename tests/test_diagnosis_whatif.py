"""What-if over the registry, the verdict and the per-pair reasons (numpy + the symbolic engine).

* each scenario's first-order changes equal d_w G_ww - d_l G_wl, d_w G_wl - d_l G_ll with the
  incentives taken by jax.grad of the registry loss itself (independent of the symbolic engine used
  by `theory.evaluate`): 1e-10 relative, float64;
* "+ w NLL" on sigmoid without a reference equals the registry's cpo_sigmoid with cpo_alpha = w;
* the verdict's percentages on a hand-built Gram whose regimes are known (Case 1/2/3 by design);
* every per-pair registry loss (and a user loss defined in the test) appears; ranking is sorted;
* reasons: shared prefix/suffix and overlap on hand examples; the common/differential identity.
"""
import jax
import numpy as np
import pytest

pytest.importorskip("torch")

from entangle_sim import losses  # noqa: E402
from entangle_sim.torch import whatif  # noqa: E402

N = 24


@pytest.fixture(scope="module")
def measured():
    rng = np.random.default_rng(0)
    G_ww = rng.gamma(2, size=N) * 10
    G_ll = rng.gamma(2, size=N) * 10
    G_wl = rng.uniform(0.2, 0.99, N) * np.sqrt(G_ww * G_ll)
    return dict(chosen_logps=-rng.uniform(5, 30, N), rejected_logps=-rng.uniform(5, 30, N),
                ref_chosen_logps=-rng.uniform(5, 30, N), ref_rejected_logps=-rng.uniform(5, 30, N),
                chosen_len=rng.integers(3, 20, N).astype(float), rejected_len=rng.integers(3, 20, N).astype(float),
                prompt_len=np.full(N, 5.0), G_ww=G_ww, G_wl=G_wl, G_ll=G_ll,
                G_ww_adam=G_ww * 3, G_wl_adam=G_wl * 0.5, G_ll_adam=G_ll * 2)


def _jax_incentives(m, loss, hp, nll=0.0):
    spec = losses.get(loss)
    ref_w = m["ref_chosen_logps"] if spec.uses_reference else 0.0
    ref_l = m["ref_rejected_logps"] if spec.uses_reference else 0.0

    def L(lw, ll, i):
        v = spec(lw, ll, ref_w[i] if spec.uses_reference else 0.0, ref_l[i] if spec.uses_reference else 0.0,
                 m["chosen_len"][i], m["rejected_len"][i], prompt_len=m["prompt_len"][i], **hp)
        return v - nll * lw / m["chosen_len"][i]

    d_w = np.array([-float(jax.grad(L, 0)(m["chosen_logps"][i], m["rejected_logps"][i], i)) for i in range(N)])
    d_l = np.array([float(jax.grad(L, 1)(m["chosen_logps"][i], m["rejected_logps"][i], i)) for i in range(N)])
    return d_w, d_l


@pytest.mark.parametrize("sc", [whatif.Scenario("sigmoid"), whatif.Scenario("sigmoid", (("beta", 0.3),), kind="beta"),
                                whatif.Scenario("sigmoid", nll=1.0, kind="+nll"),
                                whatif.Scenario("dpop", (("dpop_lambda", 5.0),), kind="dpop_lambda"),
                                whatif.Scenario("dpo_shift", (("shift_lambda", 0.75),), kind="shift_lambda"),
                                whatif.Scenario("simpo", (("simpo_gamma", 1.0),), kind="simpo_gamma")],
                         ids=lambda s: s.label)
def test_scenario_changes_equal_the_registry_losss_gradient(measured, sc):
    m = measured
    m_ref = m if losses.get(sc.loss).uses_reference else {k: v for k, v in m.items() if not k.startswith("ref_")}
    ev = whatif.evaluate_scenario(m_ref, sc)
    d_w, d_l = _jax_incentives(m, sc.loss, sc.params, sc.nll)
    np.testing.assert_allclose(ev["d_w"], d_w, rtol=1e-10)
    np.testing.assert_allclose(ev["d_l"], d_l, rtol=1e-10)
    np.testing.assert_allclose(ev["delta_chosen"], d_w * m["G_ww"] - d_l * m["G_wl"], rtol=1e-10)
    np.testing.assert_allclose(ev["delta_rejected"], d_w * m["G_wl"] - d_l * m["G_ll"], rtol=1e-10)
    ad = whatif.evaluate_scenario(m_ref, sc, adam=True)
    np.testing.assert_allclose(ad["delta_chosen"], d_w * m["G_ww_adam"] - d_l * m["G_wl_adam"], rtol=1e-10)


def test_nll_scenario_equals_cpo_sigmoid(measured):
    m = {k: v for k, v in measured.items() if not k.startswith("ref_")}
    a = whatif.evaluate_scenario(m, whatif.Scenario("sigmoid", nll=0.7))
    b = whatif.evaluate_scenario(m, whatif.Scenario("cpo_sigmoid", (("cpo_alpha", 0.7),)))
    for k in ("d_w", "d_l", "delta_chosen", "delta_rejected"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-12, err_msg=k)


def test_verdict_percentages_on_a_designed_gram():
    # 10 pairs, DPO-type incentives (d_w = d_l): Case 1 (G_wl <= both), Case 2 (G_ww < G_wl <= G_ll,
    # both fall), Case 3 (G_ll < G_wl <= G_ww, both rise) in counts 5 / 3 / 2.
    G = [(4, 1, 4)] * 5 + [(1, 2, 4)] * 3 + [(4, 2, 1)] * 2
    G_ww, G_wl, G_ll = (np.array(x, dtype=float) for x in zip(*G))
    m = dict(chosen_logps=np.full(10, -5.0), rejected_logps=np.full(10, -5.0), chosen_len=np.ones(10),
             rejected_len=np.ones(10), G_ww=G_ww, G_wl=G_wl, G_ll=G_ll)
    sc = whatif.Scenario("sigmoid")
    s = whatif.summarize(whatif.evaluate_scenario(m, sc))
    assert s["regimes"]["chosen_up_rejected_down"] == 0.5 and s["regimes"]["both_down"] == 0.3
    assert s["regimes"]["both_up"] == 0.2 and s["chosen_falls"] == 0.3
    v = whatif.verdict(s, sc, optimizer="AdamW state of checkpoint-500")
    assert v == ("under sigmoid (β 0.1, AdamW state of checkpoint-500) the chosen log-prob is predicted to fall "
                 "for 30% of pairs; both rise for 20%; ideal for 50% (first order)")
    # margin grows for every pair under DPO (|g_w - g_l|^2 >= 0); chosen rises for Case 1 and 3
    assert s["chosen_up_margin_up"] == 0.7


def test_what_if_covers_the_registry_and_user_losses(measured):
    def half_dpo(v, F, *, beta):
        return -F.log_sigmoid(beta * (v.r_w - v.r_l)) / 2

    losses.define("halfdpo_test", half_dpo, hyperparameters=(losses.Hyper("beta", 0.1, "scale", lo=0, lo_open=True),))
    try:
        rows = whatif.what_if(measured)
    finally:
        losses.undefine("halfdpo_test")
    labels = {r["loss"] for r in rows if r["kind"] == "default"}
    per_pair = {n for n in losses.names() if not losses.get(n).batch_coupled}
    assert {r["loss"] for r in rows if r["kind"] == "default"} | {"halfdpo_test"} == per_pair | {"halfdpo_test"}
    assert "halfdpo_test" in labels and "sigmoid" in labels and "aot" not in labels
    kinds = {r["kind"] for r in rows}
    assert {"beta", "+nll", "dpop_lambda", "shift_lambda", "simpo_gamma"} <= kinds
    ok = [r for r in rows if "skipped" not in r]
    keys = [r["adam"]["chosen_up_margin_up"] for r in ok]  # Adam columns present: ranked under Adam
    assert keys == sorted(keys, reverse=True)
    assert all(r["first_order"] for r in rows)
    # skipped rows say why (a loss needing the prompt log-prob, e.g. ORPO's NLL over prompt+chosen)
    assert all(isinstance(r["skipped"], str) for r in rows if "skipped" in r)


def test_pair_reasons():
    a, b = [1, 2, 3, 9, 9, 4, 5], [1, 2, 3, 7, 4, 5]
    assert whatif.shared_prefix(a, b) == 3 and whatif.shared_suffix(a, b) == 2
    assert whatif.shared_suffix([1, 2], [1, 2]) == 0  # all shared as prefix: nothing left for the suffix
    assert whatif.token_overlap([1, 1, 2], [1, 2, 2]) == pytest.approx(2 / 4)
    G_ww, G_wl, G_ll = np.array([1.0, 4.0]), np.array([0.5, 1.9]), np.array([4.0, 1.0])
    md = whatif.modes(G_ww, G_wl, G_ll)
    np.testing.assert_allclose(md["common"] + md["differential"], G_ww - G_wl)   # DPO delta_chosen / C
    np.testing.assert_allclose(md["common"] - md["differential"], G_wl - G_ll)   # DPO delta_rejected / C
    m = dict(G_ww=G_ww, G_wl=G_wl, G_ll=G_ll, chosen_len=np.array([7, 6.0]), rejected_len=np.array([6, 6.0]))
    ex = [{"chosen_ids": a, "rejected_ids": b}, {"chosen_ids": [1], "rejected_ids": [2]}]
    top = whatif.top_pairs(m, ex, k=1)
    assert top[0]["index"] == 1 and top[0]["rho"] == pytest.approx(1.9)  # rho = max(1.9/4, 1.9/1)
    assert top[0]["norm_ratio"] == pytest.approx(0.5) and "rejected rises" in top[0]["why"]
    top = whatif.top_pairs(m, ex, k=5, by="cos")
    assert [t["index"] for t in top] == [1, 0] and top[1]["shared_prefix"] == 3 and top[1]["length_ratio"] == 6 / 7
    with pytest.raises(ValueError, match=">= 1"):
        whatif.top_pairs(m, ex, k=0)


@pytest.mark.parametrize("name", ["entangle_sim.torch.whatif", "entangle_sim.torch.adam", "entangle_sim.torch.parallel",
                                  "entangle_sim.torch.stream", "entangle_sim.torch.screen",
                                  "entangle_sim.torch.optim_state", "entangle_sim.torch.diagnosis"])
def test_docstring_examples(name):
    import doctest
    import importlib

    mod = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for t in doctest.DocTestFinder().find(mod):
        runner.run(t)
    res = runner.summarize(verbose=False)
    assert res.failed == 0, f"{res.failed} of {res.attempted} examples failed in {name}"
