"""`entangle-sim losses | conditions | predict`: contracts, agreement to 1e-9, one-line errors."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from entangle_sim import losses
from entangle_sim.cli import main
from entangle_sim.symbolic import derive
from entangle_sim.testing import richardson
from reference_formulas import ref


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_losses_json_lists_every_loss(capsys):
    code, out, _ = run(capsys, "losses", "--json")
    data = json.loads(out)
    assert code == 0 and [d["name"] for d in data] == losses.names()
    sig = next(d for d in data if d["name"] == "sigmoid")
    assert sig["trl"] == "DPOTrainer:sigmoid" and sig["hyperparameters"]["beta"]["default"] == 0.1


def test_conditions_all_json_and_latex(capsys):
    code, out, _ = run(capsys, "conditions", "--all", "--json")
    data = json.loads(out)
    assert code == 0 and len(data) == len(losses.names())
    dpo = next(d for d in data if d["loss"] == "sigmoid")
    assert dpo["chosen_threshold"] == "1" and dpo["fourth_regime_possible"] is False
    code, out, _ = run(capsys, "conditions", "simpo", "--latex", "--json")
    assert "\\frac{n_{l}}{n_{w}}" in json.loads(out)["chosen_threshold"]


STATE = dict(lw=-12.0, ll=-15.0, rw0=-11.0, rl0=-14.5, nw=6.0, nl=9.0)


@pytest.mark.parametrize("name", losses.names())
def test_predict_agrees_with_sympy_and_finite_differences(capsys, name):
    """predict == SymPy == FD of the JAX loss to 1e-9 relative (float64)."""
    spec = losses.get(name)
    G = dict(gww=2.0, gwl=1.1, gll=3.0, eta=0.01)
    args = ["predict", name, "--chosen-logp", str(STATE["lw"]), "--rejected-logp", str(STATE["ll"]),
            "--ref-chosen-logp", str(STATE["rw0"]), "--ref-rejected-logp", str(STATE["rl0"]),
            "--chosen-len", str(STATE["nw"]), "--rejected-len", str(STATE["nl"]),
            "--gww", "2", "--gwl", "1.1", "--gll", "3", "--eta", "0.01", "--json"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    got = json.loads(out)
    assert set(got) >= {"loss", "d_w", "d_l", "delta_chosen", "delta_rejected", "delta_margin", "regime"}
    hp = spec.resolve()
    _, dw_ref, dl_ref = ref(name, *STATE.values(), hp)
    # FD of the JAX loss (Richardson, h = 1e-3): truncation O(h^4) ~ 1e-12 and rounding ~ 1e-13 here.
    h = 1e-3
    f = lambda a, b: float(spec(a, b, STATE["rw0"], STATE["rl0"], STATE["nw"], STATE["nl"]))  # noqa: E731
    fd = lambda g, x: richardson(g, x, h)  # noqa: E731
    dw_fd = -fd(lambda x: f(x, STATE["ll"]), STATE["lw"])
    dl_fd = fd(lambda x: f(STATE["lw"], x), STATE["ll"])
    for got_v, exp_v in ((got["d_w"], dw_ref), (got["d_l"], dl_ref), (got["d_w"], dw_fd), (got["d_l"], dl_fd)):
        assert abs(got_v - exp_v) <= 1e-9 * abs(exp_v) + 1e-12
    pred_w = G["eta"] * (dw_ref * G["gww"] - dl_ref * G["gwl"])
    pred_l = G["eta"] * (dw_ref * G["gwl"] - dl_ref * G["gll"])
    assert got["delta_chosen"] == pytest.approx(pred_w, rel=1e-9, abs=1e-15)
    assert got["delta_rejected"] == pytest.approx(pred_l, rel=1e-9, abs=1e-15)
    assert got["delta_margin"] == pytest.approx(pred_w - pred_l, rel=1e-9, abs=1e-15)


def test_predict_lr_is_the_step_size(capsys):
    """`predict --lr` is `--eta` (the name simulate / mitigate use): DPO at the reference has
    d_w = d_l = beta sigma(0) = 0.05, so Delta l_w = lr (0.05 G_ww - 0.05 G_wl) = 0.5 * 0.05 * 0.9."""
    base = ["predict", "sigmoid", "--chosen-logp", "-1", "--rejected-logp", "-2", "--ref-chosen-logp", "-1",
            "--ref-rejected-logp", "-2", "--gww", "1", "--gwl", "0.1", "--gll", "2", "--json"]
    outs = []
    for flag in ("--eta", "--lr"):
        code, out, err = run(capsys, *base, flag, "0.5")
        assert code == 0, err
        outs.append(json.loads(out))
    assert outs[0] == outs[1]
    assert outs[1]["delta_chosen"] == pytest.approx(0.5 * 0.05 * 0.9, rel=1e-12)


@pytest.mark.parametrize("argv,needle", [
    (["predict", "dpx", "--chosen-logp", "-1", "--rejected-logp", "-2", "--gww", "1", "--gwl", "0", "--gll", "1"],
     "did you mean 'dpo'"),
    (["predict", "simpo", "--chosen-logp", "-1", "--rejected-logp", "-2", "--gww", "1", "--gwl", "2", "--gll", "1"],
     "not positive semidefinite"),
    (["predict", "simpo", "--chosen-logp", "-1", "--rejected-logp", "-2", "--gww", "-1", "--gwl", "0", "--gll", "1"],
     "not positive semidefinite"),
    (["predict", "simpo", "--chosen-logp", "-1", "--rejected-logp", "-2", "--chosen-len", "0", "--gww", "1",
      "--gwl", "0", "--gll", "1"], "lengths must be positive"),
    (["predict", "simpo", "--chosen-logp", "nan", "--rejected-logp", "-2", "--gww", "1", "--gwl", "0", "--gll", "1"],
     "must be finite"),
    (["predict", "simpo", "--chosen-logp", "-1", "--rejected-logp", "-2", "--gww", "inf", "--gwl", "0", "--gll", "1"],
     "must be finite"),
    (["predict", "simpo", "--chosen-logp", "-1", "--rejected-logp", "-2", "--gww", "1", "--gwl", "0", "--gll", "1",
      "--param", "betta=1"], "did you mean 'beta'"),
    (["predict", "simpo", "--chosen-logp", "-1", "--rejected-logp", "-2", "--gww", "1", "--gwl", "0", "--gll", "1",
      "--param", "beta=-1"], "out of range"),
    (["predict", "sigmoid", "--chosen-logp", "-1", "--rejected-logp", "-2", "--gww", "1", "--gwl", "0", "--gll", "1"],
     "reference model"),
    (["predict", "simpo", "--chosen-logp", "1", "--rejected-logp", "-2", "--gww", "1", "--gwl", "0", "--gll", "1"],
     "must be <= 0"),
    (["predict", "simpo", "--chosen-logp", "x", "--rejected-logp", "-2", "--gww", "1", "--gwl", "0", "--gll", "1"],
     "invalid float"),
    (["conditions"], "exactly one of"),
    (["conditions", "nope"], "unknown loss"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err


def test_console_script_installed():
    """The `entangle-sim` entry point runs as a separate process (as a user would call it)."""
    r = subprocess.run([sys.executable, "-m", "entangle_sim.cli", "predict", "dpo", "--chosen-logp", "-10",
                        "--rejected-logp", "-12", "--ref-chosen-logp", "-11", "--ref-rejected-logp", "-11",
                        "--gww", "1", "--gwl", "1.5", "--gll", "4", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["regime"] == "both_down"  # rejected norm dominates: Case 2 (R4)
