"""Compact condition forms: equal to the raw derivation, readable, every incentive sign decided."""
import json

import pytest
import sympy as sp

from entangle_sim import losses
from entangle_sim.cli import main
from entangle_sim.symbolic import compact, derive, present
from entangle_sim.symbolic.compact import h_l, h_w, p_l, p_w, r_w, s, z
from entangle_sim.symbolic.symbols import n_l, n_w


def _hyper(name, spec):
    return spec.hyper_symbols()[name]


@pytest.mark.parametrize("name", losses.names())
def test_compact_form_equals_raw_derivation(name):
    """Every compact item was checked against the raw derivation (symbolic zero, or float64
    agreement to RTOL = 1e-9 relative at >= 500 of 1,000 random states; the check raises otherwise)."""
    c = derive(losses.get(name)).compact
    assert c.checks["d_w"] and c.checks["d_l"]
    for item, how in c.checks.items():
        assert how == "symbolic" or how.startswith("float64 at"), (item, how)
        if how != "symbolic":
            assert int(how.split()[2]) >= 500
    for item in ("t_w", "t_l"):
        if c[item] is not None:
            assert item in c.checks


@pytest.mark.parametrize("name", losses.names())
def test_every_incentive_sign_decided(name):
    der = derive(losses.get(name))
    assert der.d_w_sign.nonnegative is not None and der.d_l_sign.nonnegative is not None
    d = der.as_dict()
    expect = not (d["d_w_sign"]["nonnegative"] and d["d_l_sign"]["nonnegative"])
    assert d["fourth_regime_possible"] is expect


def test_orpo_proved_and_fourth_regime_excluded():
    der = derive(losses.get("orpo"))
    assert der.d_w_sign.nonnegative is True and der.d_l_sign.nonnegative is True
    assert "proved for l < 0" in der.d_w_sign.how
    assert der.fourth_regime_possible is False
    c = der.compact
    # Written independently: d/dl_w [l/n - log(1 - e^{l/n})] = 1/(n (1 - p)), p = e^{l/n}.
    assert sp.simplify(c["h_w"] - 1 / (n_w * (1 - p_w))) == 0
    assert sp.simplify(c["h_l"] - 1 / (n_l * (1 - p_l))) == 0
    assert c.text("z") == "log(p_w/(1 - p_w)) - log(p_l/(1 - p_l))"


def test_known_compact_forms():
    beta = sp.Symbol("beta", positive=True)
    dpo = derive(losses.get("sigmoid")).compact
    assert dpo.text("t_w") == "1" and dpo.text("s") == "sigma(-z)" and dpo.text("m") == "-log sigma(z)"
    assert dpo["z"] == beta * (r_w - sp.Symbol("r_l", real=True))
    simpo = derive(losses.get("simpo")).compact
    assert simpo["t_w"] == n_l / n_w and simpo["t_l"] == n_w / n_l
    dpop = derive(losses.get("dpop")).compact
    assert dpop.text("t_w") == "1 + lambda_p if r_w < 0, else 1"
    assert dpop.text("t_l") == "1/(1 + lambda_p) if r_w < 0, else 1"
    hinge = derive(losses.get("hinge")).compact
    assert hinge.text("s") == "1 if z < 1, else 0"
    kto = derive(losses.get("kto")).compact
    assert kto.margin_form and kto.text("m") == "lambda_D - z" and kto["s"] == 1
    assert kto.text("z") == "lambda_D*sigma(beta*(r_w - z_0)) - lambda_U*sigma(beta*(r_l - z_0))"
    assert kto["t_w"] == h_w / h_l
    orpo = derive(losses.get("orpo")).compact
    assert sp.simplify(orpo["d_w"] - (s * h_w + 1 / (sp.Symbol("n_p", nonnegative=True) + n_w))) == 0
    assert orpo["s"].has(z)


def test_conditions_all_is_readable(capsys):
    assert main(["conditions", "--all"]) == 0
    out = capsys.readouterr().out
    for bad in ("Sigmoid(", "Heaviside(", "ell^ref", "LogSigmoid", "Log1mExp"):
        assert bad not in out, bad
    long = [ln for ln in out.splitlines() if len(ln) > 160]
    assert not long, long[:3]
    assert sum(ln.startswith("== ") for ln in out.splitlines()) == len(losses.names())
    assert "sign not decided" not in out and "not excluded" not in out


def test_conditions_json_has_compact_and_signs(capsys):
    assert main(["conditions", "orpo", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["fourth_regime_possible"] is False
    assert d["compact"]["h_w"] == "1/(n_w*(1 - p_w))"


@pytest.mark.parametrize("fmt", ["markdown", "latex"])
def test_conditions_table(capsys, fmt):
    assert main(["conditions", "--table", fmt]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("| `")] if fmt == "markdown" else [
        ln for ln in out.splitlines() if ln.endswith("\\\\") and not ln.startswith("loss")]
    assert len(rows) == len(losses.names())
    assert "Sigmoid(" not in out and "Heaviside(" not in out
    dpop = next(r for r in rows if "dpop" in r)
    assert "$1 + \\lambda_p$ if $r_w < 0$, else $1$" in dpop


def test_conditions_table_rejects_loss(capsys):
    assert main(["conditions", "sigmoid", "--table", "markdown"]) == 2
    assert "error:" in capsys.readouterr().err


def test_latex_renders_in_mathtext():
    """Every threshold's inline LaTeX is parsed by matplotlib's mathtext (the condition-table figure)."""
    from matplotlib.mathtext import MathTextParser

    parser = MathTextParser("path")
    for row in present.table_rows():
        for key in ("t_w_latex", "t_l_latex"):
            for piece in row[key].split("$")[1::2]:
                parser.parse(f"${piece}$")
