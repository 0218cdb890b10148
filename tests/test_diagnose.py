"""diagnose pipeline: structure, independent recomputation, CLI contract, figures (tiny config)."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from entangle_sim import geometry, regimes  # noqa: E402
from entangle_sim.cli import main  # noqa: E402
from entangle_sim.diagnose import DiagnoseConfig, run_diagnose  # noqa: E402

TINY = dict(pretrain_steps=3, pretrain_batch=8, sft_steps=3, po_steps=4, log_every=2, n_eval_pairs=4, sft_batch=8, po_batch=4,
            d_model=16, n_layers=1, n_heads=2, prompt_len=3, short_len=2, long_len=3, po_lr=1e-2)


@pytest.fixture(scope="module")
def res():
    return run_diagnose(DiagnoseConfig(suffix="short", **TINY))


def test_structure(res):
    assert list(res["steps"]) == [0, 2, 4]
    K = len(res["steps"])
    assert res["chosen_logp"].shape == res["rejected_logp"].shape == (K,)
    assert res["interval_regimes"].shape == (K - 1,)
    assert res["step_regimes"].shape == (4,)
    assert res["token_cos"].shape == (3, 3)  # label word + short suffix of 2
    s = res["summary"]
    json.dumps(s)
    assert set(s["regime_fractions"]) == set(regimes.REGIMES)
    assert sum(s["regime_fractions"].values()) == pytest.approx(1.0)
    assert sum(s["step_regime_fractions"].values()) == pytest.approx(1.0)
    cos = np.asarray(s["cos_trajectory"])
    assert np.all(np.abs(cos) <= 1 + 1e-5) and np.all(np.abs(res["token_cos"]) <= 1 + 1e-5)


def test_summary_carries_the_run_summary_schema(res):
    s = res["summary"]
    assert set(regimes.RUN_SUMMARY) <= set(s)
    w = res["chosen_logp"]
    assert s["mean_delta_chosen"] == s["delta_chosen"] == float(w[-1] - w[0])
    assert s["regime_fractions"] == regimes.fractions(res["interval_regimes"])
    assert s["final_loss"] == float(res["po_loss"][-1])


def test_independent_recomputation(res):
    pol, p, eb = res["policy"], res["params"], res["eval_batch"]
    lw, ll = pol.logps(p, eb)
    np.testing.assert_allclose(res["chosen_logp"][-1], float(lw.mean()), rtol=1e-5)
    np.testing.assert_allclose(res["rejected_logp"][-1], float(ll.mean()), rtol=1e-5)
    # initial log point is the reference (SFT) model
    lw0, _ = pol.logps(res["ref_params"], eb)
    np.testing.assert_allclose(res["chosen_logp"][0], float(lw0.mean()), rtol=1e-5)
    # final cosine: explicit per-pair gradients, no geometry module
    flat = lambda t: jnp.concatenate([x.ravel() for x in jax.tree.leaves(t)])  # noqa: E731

    @jax.jit
    def cos_one(e):
        gw = flat(jax.grad(lambda q: pol.logps(q, e)[0][0])(p))
        gl = flat(jax.grad(lambda q: pol.logps(q, e)[1][0])(p))
        return gw @ gl / jnp.sqrt((gw @ gw) * (gl @ gl))

    cs = [float(cos_one(jax.tree.map(lambda a: a[i:i + 1], eb))) for i in range(eb.size)]
    assert res["summary"]["final_cosine"] == pytest.approx(np.mean(cs), abs=1e-4)
    # regimes of intervals follow the logged means
    exp = regimes.classify(np.diff(res["chosen_logp"]), np.diff(res["rejected_logp"]))
    np.testing.assert_array_equal(res["interval_regimes"], exp)
    # delta = end - start
    assert res["summary"]["delta_chosen"] == pytest.approx(res["chosen_logp"][-1] - res["chosen_logp"][0])
    # token Gram sums to G_wl for pair 0 (R13)
    g = geometry.pair_gram(pol.logps, p, eb)
    assert float(res["token_inner"].sum()) == pytest.approx(float(g.G_wl[0]), rel=1e-3, abs=1e-6)


def test_figures(res):
    import matplotlib.pyplot as plt

    from entangle_sim.plotting.diagnose import plot_geometry, plot_logps, plot_token_heatmap
    for fn in (plot_logps, plot_geometry, plot_token_heatmap):
        fig = fn(res)
        assert fig.axes and fig.axes[0].get_title()
        fig.canvas.draw()
        plt.close(fig)
    fig, ax = plt.subplots()
    assert plot_token_heatmap(res, ax=ax) is fig
    plt.close(fig)


def test_config_errors():
    with pytest.raises(ValueError):
        DiagnoseConfig(suffix="medium")
    with pytest.raises(ValueError):
        DiagnoseConfig(po_steps=0)


def test_cli_errors(capsys):
    assert main(["diagnose", "--task", "sentiment", "--suffix", "1t", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "steps" in err
    assert main(["diagnose", "--suffix", "1t", "--loss", "no_such_loss"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["diagnose", "--suffix", "xl"]) == 2


def test_cli_json(res, monkeypatch, capsys, tmp_path):
    # The pipeline itself is covered above; reuse its result so the CLI test costs no compile.
    import entangle_sim.diagnose as d
    seen = {}

    def fake(cfg, progress=None):
        seen["cfg"] = cfg
        return res
    monkeypatch.setattr(d, "run_diagnose", fake)
    out = tmp_path / "o"
    assert main(["diagnose", "--task", "sentiment", "--suffix", "1t", "--steps", "2", "--json",
                 "--out", str(out)]) == 0
    s = json.loads(capsys.readouterr().out)
    for k in ("final_cosine", "regime_fractions", "delta_chosen", "delta_rejected", "cos_trajectory", "steps"):
        assert k in s
    assert set(s["regime_fractions"]) == set(regimes.REGIMES)
    assert s["steps"] == [0, 2, 4]
    assert seen["cfg"].po_steps == 2 and seen["cfg"].suffix == "1t"
    for f in ("summary.json", "logps.png", "logps.pdf", "geometry.png", "token_heatmap.pdf", "arrays.npz"):
        assert (out / f).exists()
