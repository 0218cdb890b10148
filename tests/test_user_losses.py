"""Bring your own loss: `losses.define`, `testing.check_loss`, `--losses-from`, the pytest plugin.

The user loss lives outside the package (tests/data/user_losses.py); its expected incentives and
conditions below are derived by hand from its formula, not by the code under test.
"""
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np
import pytest
import sympy as sp

from entangle_sim import losses, regimes, reproduce, testing
from entangle_sim.cli import main
from entangle_sim.cli._user_losses import load_file
from entangle_sim.losses import Hyper
from entangle_sim.symbolic import derive

DATA = Path(__file__).resolve().parent / "data"
ROOT = Path(__file__).resolve().parent.parent
USER_FILE = str(DATA / "user_losses.py")
sys.path.insert(0, str(DATA))
import broken_losses  # noqa: E402


@pytest.fixture(autouse=True)
def _clean_registry():
    """User losses defined by a test are removed after it (other tests list the registry)."""
    before = set(losses.user_names())
    yield
    for n in losses.user_names():
        if n not in before:
            losses.undefine(n)


def _logsig(x):
    return -np.logaddexp(0.0, -x)


def _rpo_closed_form(lw, ll, rw0, rl0, nw, beta=0.1, alpha=1.0):
    """user_rpo: L = -log sigma(beta D) + alpha (-l_w/n_w): d_w = beta sigma(-beta D) + alpha/n_w,
    d_l = beta sigma(-beta D) (differentiated by hand)."""
    D = (lw - rw0) - (ll - rl0)
    s = beta * np.exp(_logsig(-beta * D))
    return -_logsig(beta * D) - alpha * lw / nw, s + alpha / nw, s


def test_user_file_loss_gets_conditions_regime_map_and_passing_check_loss():
    assert load_file(USER_FILE) == ["user_rpo"]
    spec = losses.get("user_rpo")
    assert spec.uses_reference and [h.name for h in spec.hypers] == ["beta", "alpha"]
    # Conditions (symbolic engine) vs the hand derivation, at random states in float64.
    der = derive(spec)
    lw, ll, rw0, rl0, nw, nl = testing.random_states(200, seed=5)
    vals = testing.pair_values([lw, ll, rw0, rl0, nw, nl], spec.defaults)
    L, dw, dl = _rpo_closed_form(lw, ll, rw0, rl0, nw)
    # rtol 1e-12: closed forms in float64 (a few operations each, stable log-sigmoid forms).
    np.testing.assert_allclose(np.asarray(der.loss(**vals)), L, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(der.d_w(**vals)), dw, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(np.asarray(der.d_l(**vals)), dl, rtol=1e-12, atol=1e-300)
    # chosen rises iff G_wl <= (d_w / d_l) G_ww; rejected falls iff G_wl <= (d_l / d_w) G_ll
    st = dict(chosen_logps=-12.0, rejected_logps=-15.0, ref_chosen_logps=-11.0, ref_rejected_logps=-14.5,
              chosen_len=6.0, rejected_len=9.0, beta=0.1, alpha=1.0)
    _, dw0, dl0 = _rpo_closed_form(-12.0, -15.0, -11.0, -14.5, 6.0)
    at = {s: st[k] for k, s in der.loss.names if k in st}
    tw = float(der.chosen_threshold.rewrite(sp.exp).subs(at))
    tl = float(der.rejected_threshold.rewrite(sp.exp).subs(at))
    assert tw == pytest.approx(dw0 / dl0, rel=1e-12) and tl == pytest.approx(dl0 / dw0, rel=1e-12)
    assert der.d_w_sign.nonnegative is True and der.d_l_sign.nonnegative is True
    assert not der.fourth_regime_possible
    # Step weight s = -m'(z) with z = beta D: sigma(-z), from the margin= / nll= parts.
    z = 0.1 * ((-12.0 + 11.0) - (-15.0 + 14.5))
    assert float(der.step_weight(**st)) == pytest.approx(np.exp(_logsig(-z)), rel=1e-12)

    # Regime map and condition table of the user loss (the figures' data builders and plots).
    maps = reproduce.regime_maps([spec, "sigmoid"], n=9)
    assert maps["losses"] == ["user_rpo", "sigmoid"]
    C, R = np.meshgrid(maps["cos"], maps["ratio"], indexing="xy")
    s = reproduce.MAP_STATE
    _, dwm, dlm = _rpo_closed_form(s["chosen_logps"], s["rejected_logps"], s["ref_chosen_logps"],
                                   s["ref_rejected_logps"], s["chosen_len"])
    expected = regimes.classify(dwm - dlm * C * R, dwm * C * R - dlm * R * R)
    np.testing.assert_array_equal(maps["code"][0], np.asarray(expected))
    from entangle_sim.plotting.theory import plot_condition_table, plot_regime_maps

    rows = reproduce.condition_rows([spec])
    assert rows[0]["loss"] == "user_rpo" and rows[0]["fourth_regime_possible"] is False
    assert rows[0]["d_w_sign"] == ">= 0" and rows[0]["d_l_sign"] == ">= 0"
    for fig in (plot_regime_maps(maps), plot_condition_table({"rows": rows})):
        plt.close(fig)

    # check_loss: every check passes, with its measurements in the report.
    report = testing.check_loss(spec)
    assert report.passed and report.n_states > 400
    assert report.grad_max_rel_err < 1e-9 and report.loss_max_rel_err < 1e-9
    assert report.fd_max_err_over_tol <= 1
    assert len(report.one_step_slopes) == 2 and all(1.85 <= x <= 2.15 for x in report.one_step_slopes)
    assert report.float32_finite and report.d_w_sign.startswith(">= 0")
    # at other hyperparameters (fixed in the derivation as exact rationals)
    report = testing.check_loss(spec, hp={"alpha": 0.25, "beta": 0.5})
    assert report.passed and report.hyperparameters == {"beta": 0.5, "alpha": 0.25}


@pytest.mark.parametrize("name", ["hinge", "ipo", "dpop"])
def test_check_loss_passes_on_builtin_losses(name):
    """check_loss is no stricter than this project's tests: built-ins with kinks (hinge, dpop at the
    reference) and negative incentives (ipo: a witness verified by jax.grad)."""
    report = testing.check_loss(name)
    assert report.passed
    if name == "ipo":
        assert report.d_w_sign.startswith("can be < 0") and report.fourth_regime_possible


def _undecided_demo(v, F, *, beta=0.1):
    # d_w = beta (sigma(-x) + sigma(x)) - beta/2 = beta/2 > 0 (x = beta r_w): true, but SymPy's
    # assumptions do not see sigma(x) + sigma(-x) = 1, and no sampled state is negative.
    x = beta * v.r_w
    return -F.log_sigmoid(x) + F.log_sigmoid(-x) + x / 2 - F.log_sigmoid(-beta * v.r_l)


def test_check_loss_reports_undecided_signs():
    """A loss whose d_w sign the engine cannot decide: every check passes, the signs are reported.
    (ORPO, once the example here, is now proved: its signs are decided for l < 0.)"""
    losses.define("undecided_demo", _undecided_demo)
    with pytest.raises(testing.LossCheckError, match="the sign of d_w is undecided") as e:
        testing.check_loss("undecided_demo")
    assert all(f.startswith("signs:") for f in e.value.failures)
    assert testing.check_loss("undecided_demo", allow_undecided_signs=True).passed
    assert testing.check_loss("orpo").passed


def test_not_differentiable_loss_is_refused_naming_the_state():
    """lam ||(r_w, r_l)|| is not differentiable at r = 0, the reference, where every run starts."""
    with pytest.raises(losses.LossDefinitionError) as e:
        losses.define("norm_reg_dpo", broken_losses.norm_reg_dpo)
    msg = str(e.value)
    assert "not finite at an ordinary state" in msg and "= nan" in msg
    assert "chosen_logps=-12, rejected_logps=-15, ref_chosen_logps=-12, ref_rejected_logps=-15" in msg
    assert "policy = reference" in msg
    # Registered without the definition checks, check_loss fails and names the same state.
    spec = losses.define("norm_reg_dpo", broken_losses.norm_reg_dpo, check=False)
    with pytest.raises(testing.LossCheckError) as e:
        testing.check_loss(spec)
    fails = e.value.failures
    assert any(f.startswith("values: d_w (jax.grad) is not finite (nan) in float64 at chosen_logps=-12, "
                            "rejected_logps=-15, ref_chosen_logps=-12, ref_rejected_logps=-15") for f in fails), fails
    assert any(f.startswith("float32: d_w = nan at margin l_w - l_l = 0") for f in fails), fails


def test_non_finite_at_extreme_margins_fails_check_loss_naming_the_state():
    """-log(sigmoid(beta D)) is fine at ordinary states (define accepts it) but inf at D = -1e4."""
    spec = losses.define("naive_dpo", broken_losses.naive_dpo)
    with pytest.raises(testing.LossCheckError) as e:
        testing.check_loss(spec)
    report = e.value.report
    assert report.float32_finite is False
    assert any(f.startswith("float32: loss = inf at margin l_w - l_l = -10000 (chosen_logps=-20000, "
                            "rejected_logps=-10000") for f in report.failures), report.failures
    assert any(f.startswith("values: loss (JAX) is not finite (inf) in float64 at") for f in report.failures)
    # the one-step and sign checks still ran and passed (failures name only what is broken)
    assert len(report.one_step_slopes) == 2 and report.d_w_sign.startswith(">= 0")


def test_check_loss_names_state_and_measured_error_of_a_wrong_gradient():
    """A builder whose JAX form differs from its SymPy form by 1e-7 z (below define's loose check)."""
    def drift(v, F, *, beta=0.1):
        z = beta * (v.r_w - v.r_l)
        return -F.log_sigmoid(z) + (1e-7 * z if F.name == "jax" else 0)

    spec = losses.define("drift_dpo", drift)
    report = testing.check_loss(spec, raise_on_failure=False)
    assert not report.passed
    values = next(f for f in report.failures if f.startswith("values:"))
    assert "vs SymPy" in values and "error" in values and "> 1e-9 rel" in values and "chosen_logps=" in values


@pytest.mark.parametrize("fn,needle", [
    (lambda v, F, *, beta=0.1: F.tanh(v.r_w), "the math backend F has no function 'tanh'"),
    (lambda v, F, *, beta=0.1: np.log1p(np.exp(-beta * (v.r_w - v.r_l))), "it calls numpy directly"),
    (lambda v, F, *, beta=0.1: jax.numpy.exp(v.r_w), "it calls jax/jax.numpy directly"),
    (lambda v, F, *, beta=0.1: v.margin, "the pair variables v have no attribute 'margin'"),
    (lambda v, F, *, beta=0.1: -F.log_sigmoid(beta * ((v.r_w - v.r_l) // 1)), "not differentiable: it uses floor"),
    (lambda v, F, *, beta=0.1: (v.r_w > 0) * 1.0, "it compares values"),
    (lambda v, F, *, beta=0.1: F.log(v.r_w - v.r_l), "is not finite at an ordinary state: loss value (JAX) = -inf"),
    (lambda v, F, beta=0.1: v.r_w, "hyperparameters must be keyword-only"),
    (lambda v, F, *, beta: v.r_w, "keyword-only argument 'beta' has no default"),
    (lambda v, F, *, eta=0.1: v.r_w, "clashes with a variable of the theory"),
])
def test_definitions_that_cannot_work_are_refused(fn, needle):
    with pytest.raises(losses.LossDefinitionError, match=None) as e:
        losses.define("bad_loss", fn)
    assert needle in str(e.value), str(e.value)
    assert "bad_loss" not in losses.names()


def test_jax_only_failures_are_refused():
    """Builders that differ by backend: float() works on SymPy numbers only in the JAX branch's
    absence, and a JAX-only rounding (zero gradient) makes the two backends disagree."""
    with pytest.raises(losses.LossDefinitionError, match="does not run under jax.jit/jax.grad"):
        losses.define("jax_float", lambda v, F, *, beta=0.1: float(v.r_w) if F.name == "jax" else v.r_w)
    with pytest.raises(losses.LossDefinitionError, match="JAX and SymPy backends disagree.*dL/dchosen_logps"):
        losses.define("jax_round", lambda v, F, *, beta=0.1: jax.numpy.round(v.r_w) if F.name == "jax" else v.r_w)


def test_branching_is_refused_with_the_line():
    def branchy(v, F, *, beta=0.1):
        if v.r_w > v.r_l:
            return v.r_w
        return v.r_l

    with pytest.raises(losses.LossDefinitionError, match=r"test_user_losses.py:\d+ `if v.r_w > v.r_l:`.*branches"):
        losses.define("branchy", branchy)


def test_names_hyperparameters_and_replace():
    def f(v, F, *, beta=0.1):
        return -F.log_sigmoid(beta * (v.r_w - v.r_l))

    def g(v, F, *, beta=0.1):
        return -F.log_sigmoid(2 * beta * (v.r_w - v.r_l))

    with pytest.raises(losses.LossDefinitionError, match="clashes with a built-in loss"):
        losses.define("sigmoid", f)
    with pytest.raises(losses.LossDefinitionError, match="alias of the built-in loss 'sigmoid'"):
        losses.define("dpo", f)
    with pytest.raises(losses.LossDefinitionError, match="default out of its own range"):
        losses.define("mine", f, hyperparameters=[Hyper("beta", -1.0, "", lo=0.0, lo_open=True)])
    spec = losses.define("mine", f, hyperparameters=[Hyper("beta", 0.1, "", lo=0.0, lo_open=True)])
    assert losses.define("mine", f, hyperparameters=spec.hypers) is not None  # re-running the same definition
    with pytest.raises(losses.LossDefinitionError, match="already defined.*replace=True"):
        losses.define("mine", g)
    with pytest.raises(losses.LossDefinitionError, match="already defined"):  # another lambda, same file
        losses.define("mine", lambda v, F, *, beta=0.1: -F.log_sigmoid(3 * beta * (v.r_w - v.r_l)))
    losses.define("mine", g, hyperparameters=spec.hypers, replace=True)
    assert float(losses.get("mine")(-1.0, -2.0, -1.0, -1.0)) == pytest.approx(-_logsig(0.2))  # D = 1
    with pytest.raises(ValueError, match="out of range"):  # the declared range is enforced on calls
        losses.get("mine")(-1.0, -2.0, beta=0.0)
    with pytest.raises(ValueError, match="cannot be removed|not a user-defined loss"):
        losses.undefine("sigmoid")


# ------------------------------------------------------------------------------------------------
# CLI


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_losses_from_good_file(capsys):
    code, out, err = run(capsys, "losses", "--json", "--losses-from", USER_FILE)
    assert code == 0, err
    info = next(d for d in json.loads(out) if d["name"] == "user_rpo")
    assert info["hyperparameters"]["alpha"] == {"default": 1.0, "range": "[0, inf)",
                                                "doc": "weight of the token-mean NLL on the chosen response"}
    code, out, err = run(capsys, "conditions", "user_rpo", "--json", "--losses-from", USER_FILE)
    assert code == 0, err
    d = json.loads(out)
    assert d["loss"] == "user_rpo" and d["fourth_regime_possible"] is False
    code, out, err = run(capsys, "predict", "user_rpo", "--chosen-logp", "-12", "--rejected-logp", "-15",
                         "--ref-chosen-logp", "-11", "--ref-rejected-logp", "-14.5", "--chosen-len", "6",
                         "--rejected-len", "9", "--gww", "2", "--gwl", "1.1", "--gll", "3", "--eta", "0.01",
                         "--param", "alpha=0.5", "--json", "--losses-from", USER_FILE)
    assert code == 0, err
    got = json.loads(out)
    _, dw, dl = _rpo_closed_form(-12.0, -15.0, -11.0, -14.5, 6.0, alpha=0.5)
    assert got["d_w"] == pytest.approx(dw, rel=1e-12) and got["d_l"] == pytest.approx(dl, rel=1e-12)
    assert got["delta_chosen"] == pytest.approx(0.01 * (dw * 2 - dl * 1.1), rel=1e-12)
    code, out, err = run(capsys, "simulate", "--loss", "user_rpo", "--steps", "3", "--runs", "1", "--pairs", "4",
                         "--json", "--losses-from", USER_FILE)
    assert code == 0, err
    sim = json.loads(out)
    assert sim["config"]["train"]["loss"] == "user_rpo"
    # first order of the real step vs the realised change: small lr, so the signs agree
    assert sim["sign_agreement"] > 0.95


def _one_line_error(capsys, argv):
    code, out, err = run(capsys, *argv)
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_cli_losses_from_bad_and_missing_files(capsys, tmp_path):
    line = _one_line_error(capsys, ["conditions", "x", "--losses-from", str(tmp_path / "nope.py")])
    assert line.startswith("entangle-sim: error: argument --losses-from:") and "no such file" in line
    refused = tmp_path / "refused.py"
    refused.write_text("import sys\nsys.path.insert(0, %r)\nfrom broken_losses import norm_reg_dpo\n"
                       "from entangle_sim import losses\nlosses.define('norm_reg', norm_reg_dpo)\n" % str(DATA))
    line = _one_line_error(capsys, ["losses", "--losses-from", str(refused)])
    assert "(line 5): loss 'norm_reg' is not finite at an ordinary state" in line and "policy = reference" in line
    syntax = tmp_path / "syntax.py"
    syntax.write_text("def f(:\n")
    assert "syntax error at line 1" in _one_line_error(capsys, ["losses", "--losses-from", str(syntax)])
    boom = tmp_path / "boom.py"
    boom.write_text("x = 1\nraise RuntimeError('boom')\n")
    assert "(line 2): RuntimeError: boom" in _one_line_error(capsys, ["predict", "x", "--chosen-logp", "-1",
                                                                      "--rejected-logp", "-2", "--gww", "1",
                                                                      "--gwl", "0", "--gll", "1",
                                                                      "--losses-from", str(boom)])
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    assert "defines no loss" in _one_line_error(capsys, ["simulate", "--losses-from", str(empty)])


def test_cli_runs_no_user_code_without_the_flag(capsys):
    """Without --losses-from nothing is loaded: the user loss is unknown."""
    assert "unknown loss 'user_rpo'" in _one_line_error(capsys, ["conditions", "user_rpo"])


# ------------------------------------------------------------------------------------------------
# pytest plugin


def test_pytest_plugin_entry_point_and_fixture(tmp_path):
    """`pytest` in a user's project: the pytest11 entry point names the plugin, whose fixture
    check_loss is testing.check_loss and fails a broken loss naming the state."""
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["pytest11"]
    assert eps == {"entangle_sim": "entangle_sim.pytest_plugin"}
    (tmp_path / "test_mine.py").write_text(
        "import sys\nsys.path.insert(0, %r)\n" % str(DATA)
        + "import broken_losses\nfrom entangle_sim import losses\n\n"
        "def test_fixture(check_loss):\n    from entangle_sim import testing\n"
        "    assert check_loss is testing.check_loss\n\n"
        "def test_broken(check_loss):\n"
        "    check_loss(losses.define('naive', broken_losses.naive_dpo))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "entangle_sim.pytest_plugin", "-p",
                        "no:cacheprovider", "test_mine.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert "1 failed, 1 passed" in r.stdout, r.stdout + r.stderr
    assert "float32: loss = inf at margin l_w - l_l = -10000" in r.stdout
