"""One run loop (`train.run`) and one run-summary schema (`regimes.RUN_SUMMARY`) across the package."""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from entangle_sim import data, logs, mitigations as M, regimes, train

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def toy():
    gp = data.geometry_pairs(jax.random.PRNGKey(0), "linear", 4, K=5, target_cos=0.9, norm_ratio=2.0, d=4)
    return gp.policy(), gp.params, gp.batch


def test_run_summary_by_hand():
    """Two steps, one pair: changes (+.1, -.1) then (+.2, +.1) from levels (-1, -2): numbers read off by hand."""
    lw, ll = np.array([[-1.0], [-0.9]]), np.array([[-2.0], [-2.1]])
    rw, rl = np.array([[0.1], [0.2]]), np.array([[-0.1], [0.1]])
    s = regimes.run_summary(lw, ll, rw, rl, pred=(np.array([[1.0], [1.0]]), np.array([[-1.0], [-1.0]])),
                            loss=np.array([[0.7], [0.5]]))
    assert set(s) == set(regimes.RUN_SUMMARY)
    assert s["regime_fractions"]["chosen_up_rejected_down"] == 0.5 and s["regime_fractions"]["both_up"] == 0.5
    # final = (-0.9 + 0.2, -2.1 + 0.1): deltas 0.3 and 0.0 (float64 rounding only: 1e-15)
    assert s["mean_delta_chosen"] == pytest.approx(0.3, abs=1e-15)
    assert s["mean_delta_rejected"] == pytest.approx(0.0, abs=1e-15)
    assert s["mean_delta_margin"] == pytest.approx(0.3, abs=1e-15)
    assert (s["sign_agreement"], s["sign_agreement_n"]) == (0.75, 4)   # the rejected +0.1 disagrees
    assert s["final_loss"] == 0.5
    none = regimes.run_summary(np.zeros((0, 1)), np.zeros((0, 1)), np.zeros((0, 1)), np.zeros((0, 1)))
    assert none["mean_delta_chosen"] == 0.0 and none["sign_agreement"] is None and none["final_loss"] is None


def test_every_summary_carries_the_schema(toy, tmp_path):
    pol, params, batch = toy
    cfg = train.TrainConfig(loss="sigmoid", lr=0.05, steps=4)
    tr = train.summarize(train.train(pol, params, batch, cfg, jax.random.PRNGKey(1)))
    mit = M.summarize(M.train_mitigation(pol, params, batch, M.MitigationConfig(method="normalized", lr=0.05, steps=4),
                                         jax.random.PRNGKey(1)))
    lg = logs.summarize(logs.load_log(DATA / "trainer_state.json"))
    for s in (tr, mit, lg):
        assert set(regimes.RUN_SUMMARY) <= set(s)
    # a log: the mean deltas are the net change of the logged means
    assert lg["mean_delta_chosen"] == pytest.approx(lg["net_change"]["chosen"], abs=1e-6)   # net_change is rounded to 1e-6
    assert lg["sign_agreement"] is None and lg["final_loss"] is None


def test_baseline_mitigation_summary_equals_train_summary(toy):
    """The same run (plain DPO, SGD, float64) through the trainer and through the mitigation runner:
    one schema, equal values. 1e-12: the mitigation runs on flattened parameters (same products,
    different association)."""
    pol, params, batch = toy
    cfg = train.TrainConfig(loss="sigmoid", lr=0.05, steps=5)
    tr = train.summarize(train.train(pol, params, batch, cfg, jax.random.PRNGKey(1)))
    _, sim = M.run_with_mitigation(pol, params, batch, cfg, "none", jax.random.PRNGKey(1))
    for k in regimes.RUN_SUMMARY:
        if k == "regime_fractions":
            assert sim[k] == tr[k]
        elif k == "sign_agreement_n":
            assert sim[k] == tr[k] > 0
        else:
            assert sim[k] == pytest.approx(tr[k], rel=1e-12, abs=1e-15), k
    assert sim["sign_agreement_one_pair"] == pytest.approx(tr["sign_agreement_one_pair"], rel=1e-12)


def test_run_observe_sees_each_step(toy):
    """`train.run`'s observe gets the parameters before and after each step; on_step runs once per step."""
    pol, params, batch = toy
    cfg = train.TrainConfig(loss="sigmoid", lr=0.05, steps=3, record=False)
    step = train.make_step(pol, cfg)
    ref = pol.logps(params, batch)
    seen = []
    obs = lambda c: (c.i, pol.logps(c.params_before, c.batch)[0], pol.logps(c.params_after, c.batch)[0], c.record[0])
    p, _, (i, before, after, rec_lw) = train.run(step, params, train.make_optimizer("sgd", 0.05).init(params),
                                                 jax.random.split(jax.random.PRNGKey(1), 3), batch, reference=ref,
                                                 observe=obs, on_step=lambda i: seen.append(int(i)))
    jax.effects_barrier()
    assert list(np.asarray(i)) == [0, 1, 2] and sorted(seen) == [0, 1, 2]
    np.testing.assert_array_equal(before, rec_lw)          # the record's levels are the state before the step
    np.testing.assert_array_equal(after[:-1], before[1:])  # each step starts where the last ended
    np.testing.assert_array_equal(after[-1], pol.logps(p, batch)[0])
    with pytest.raises(ValueError, match="reduce or observe"):
        train.run(step, params, None, jax.random.split(jax.random.PRNGKey(1), 1), batch, reference=ref,
                  observe=obs, reduce=lambda r, b: r)
