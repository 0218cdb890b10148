"""Hostile input: every bad input gets a one-line error (CLI: exit 2) or a correct result; the
Python API raises ValueError/TypeError naming the argument; outputs are validated before work,
written atomically with ordinary modes, and a damaged resume chunk is recomputed.

Also the TRL-1.10+ registry semantics that have no TRL-side test elsewhere: the alpha = 1
fallback on the traced-JAX and symbolic-SymPy paths, numerically stable exo_pair / AlphaPO
incentives at extreme margins.
"""
from __future__ import annotations

import json
import math
import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sympy as sp

from entangle_sim import losses, results, symbolic
from entangle_sim.cli import main

PSD = ["--gww", "1", "--gwl", "0.5", "--gll", "1"]
REF = ["--ref-chosen-logp", "-3", "--ref-rejected-logp", "-3"]


def _one_line_exit(capsys, argv, code):
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert rc == code, (argv, out, err)
    assert len(lines) == 1 and lines[0].startswith("entangle-sim:") and "Traceback" not in err, (argv, err)
    return lines[0]


# ---------------------------------------------------------------------------------------------
# CLI: absurd sizes refused before any work, with the estimate and the override flag


@pytest.mark.parametrize("argv", [
    ["simulate", "--steps", "1000000000"],
    ["simulate", "--pairs", str(10**8)],
    ["simulate", "--d", str(10**8)],
    ["simulate", "--runs", str(10**9)],
    ["diagnose", "--suffix", "1t", "--steps", str(10**9)],
    ["mitigate", "--pairs", str(10**5)],
])
def test_absurd_sizes_refused_with_estimate(capsys, argv):
    line = _one_line_exit(capsys, argv, 2)
    assert "estimated" in line and "--allow-large" in line


@pytest.mark.parametrize("argv", [
    ["simulate", "--seed", str(10**30)], ["diagnose", "--suffix", "1t", "--seed", str(10**30)],
    ["mitigate", "--seed", str(10**30)], ["reproduce", "--seed", str(10**30)],
    ["simulate", "--seed", "-1"], ["simulate", "--steps", "0"], ["simulate", "--runs", "1.5"],
    ["simulate", "--pairs", "0"], ["simulate", "--K", "1"], ["simulate", "--batch-size", "-1"],
])
def test_sizes_and_seeds_range_checked_at_parse_time(capsys, argv):
    assert "argument --" in _one_line_exit(capsys, argv, 2)


@pytest.mark.parametrize("argv", [
    ["simulate", "--cos", "nan"], ["simulate", "--init-noise", "nan"], ["simulate", "--init-noise", "-1"],
    ["simulate", "--lr", "inf"], ["simulate", "--norm-ratio", "0"], ["simulate", "--cos", "1.5"],
    ["mitigate", "--lr", "nan"],
    ["predict", "sigmoid", "--chosen-logp", "nan", "--rejected-logp", "-4", *REF, *PSD],
    ["predict", "sigmoid", "--chosen-logp", "-3", "--rejected-logp", "-4", *REF, *PSD, "--param", "beta=nan"],
])
def test_nan_inf_refused_at_the_boundary(capsys, argv):
    _one_line_exit(capsys, argv, 2)


@pytest.mark.parametrize("argv,needle", [
    (["predict", "ipo", "--chosen-logp", "-3", "--rejected-logp", "-4", *REF, *PSD, "--param", "beta=1e-300"],
     "not finite"),
    (["conditions", "--all", "--param", "beta=0.5"], "cannot be combined with --all"),
    (["predict", "nca_pair", "--chosen-logp", "-3", "--rejected-logp", "-4", *REF, *PSD,
      "--param", "f_divergence_type=forward_kl"], "only with"),
    (["predict", "aot", "--chosen-logp", "-3", "--rejected-logp", "-4", *REF, *PSD,
      "--param", "f_divergence_type=js_divergence"], "only with"),
])
def test_extreme_or_ignored_parameters_refused(capsys, argv, needle):
    assert needle in _one_line_exit(capsys, argv, 2)


def test_predict_alpha_divergence_a_equal_1_falls_back_to_reverse_kl(capsys):
    base = ["predict", "sigmoid", "--chosen-logp", "-3", "--rejected-logp", "-4", *REF, *PSD, "--json"]
    assert main(base + ["--param", "f_divergence_type=alpha_divergence", "--param", "f_alpha_divergence_coef=1.0"]) == 0
    a1 = json.loads(capsys.readouterr().out)
    assert main(base) == 0
    rkl = json.loads(capsys.readouterr().out)
    for k in ("d_w", "d_l", "delta_chosen", "delta_rejected", "loss_value"):
        assert a1[k] == pytest.approx(rkl[k], rel=1e-12)


def test_deeply_nested_json_log_is_one_line(capsys, tmp_path):
    p = tmp_path / "deep.json"
    p.write_text("[" * 100000 + "]" * 100000)
    _one_line_exit(capsys, ["analyze-log", str(p)], 2)


# ---------------------------------------------------------------------------------------------
# CLI: --out / --cache validated before any computation


@pytest.fixture
def afile(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    return f


@pytest.mark.parametrize("cmd", [
    ["simulate", "--steps", "2", "--runs", "1"], ["diagnose", "--suffix", "1t", "--steps", "1"],
    ["mitigate", "--steps", "1", "--pairs", "2"], ["reproduce", "--preset", "tiny", "--only", "fig1_toy"],
    ["analyze-log", "tests/data/trainer_state.json"],
])
@pytest.mark.parametrize("where", ["empty", "file", "under_file"])
def test_bad_out_refused_before_work(capsys, monkeypatch, afile, cmd, where):
    # Any computation would call these; refusing first means they are never reached.
    import entangle_sim.diagnose as dg
    import entangle_sim.figures as fg
    import entangle_sim.mitigations as mt
    import entangle_sim.simulate as sm

    def boom(*a, **k):
        raise AssertionError("work started before --out was validated")

    for mod, name in ((sm, "run_sweep"), (dg, "run_diagnose"), (mt, "run_comparison"), (fg, "render")):
        monkeypatch.setattr(mod, name, boom)
    out = {"empty": "", "file": str(afile), "under_file": str(afile / "sub")}[where]
    line = _one_line_exit(capsys, [*cmd, "--out", out], 2)
    assert "--out" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_refused(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert "cannot be written" in _one_line_exit(capsys, ["simulate", "--out", str(ro / "x")], 2)
    finally:
        ro.chmod(0o700)


def test_reproduce_cache_lives_inside_out(tmp_path, monkeypatch):
    from entangle_sim.cli import reproduce_cmd

    seen = {}
    import entangle_sim.figures as fg

    def fake_render(name, preset, cache_dir, seed):
        seen["cache"] = cache_dir
        raise KeyboardInterrupt  # stop right after the first use

    monkeypatch.setattr(fg, "render", fake_render)
    with pytest.raises(KeyboardInterrupt):
        reproduce_cmd.reproduce(tmp_path / "out", preset="tiny", only=["fig1_toy"], report=False, progress=False)
    assert seen["cache"] == tmp_path / "out" / "cache"
    with pytest.raises(Exception, match="--cache"):
        reproduce_cmd.reproduce(tmp_path / "out", preset="tiny", cache="", only=["fig1_toy"], report=False)


# ---------------------------------------------------------------------------------------------
# One error boundary


def test_internal_error_is_one_line_exit_1_with_debug_hint(capsys, monkeypatch):
    from entangle_sim.cli import losses_cmd

    def bug(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(losses_cmd, "run_losses", bug)
    monkeypatch.delenv("ENTANGLE_SIM_DEBUG", raising=False)
    line = _one_line_exit(capsys, ["losses"], 1)
    assert "internal error" in line and "--debug" in line and "ENTANGLE_SIM_DEBUG=1" in line
    with pytest.raises(RuntimeError):
        main(["losses", "--debug"])
    monkeypatch.setenv("ENTANGLE_SIM_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["losses"])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's "mean of empty slice" on a diverged run
def test_non_finite_result_exits_1(capsys):
    line = _one_line_exit(capsys, ["simulate", "--loss", "ipo_sum", "--lr", "1e100", "--steps", "10", "--runs", "1",
                                   "--pairs", "2", "--json"], 1)
    assert "non-finite" in line


def test_json_output_is_strict(tmp_path):
    results.save_json(tmp_path / "a.json", {"x": float("nan"), "y": [1.0, float("inf")]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": None, "y": [1.0, None]}
    from entangle_sim.cli._checks import dumps

    assert "NaN" not in dumps({"a": float("nan")}) and json.loads(dumps({"a": float("nan")})) == {"a": None}


# ---------------------------------------------------------------------------------------------
# Files: modes, stale temporaries, damaged chunks


def test_atomic_writes_have_ordinary_mode(tmp_path):
    old = os.umask(0o022)
    try:
        results.save_json(tmp_path / "s.json", {"a": 1})
        results.save_npz(tmp_path / "a.npz", x=np.arange(3))
    finally:
        os.umask(old)
    for f in ("s.json", "a.npz"):
        assert stat.S_IMODE((tmp_path / f).stat().st_mode) == 0o644


def test_resume_recomputes_damaged_chunk_and_removes_tmp(tmp_path):
    from entangle_sim.simulate import SimConfig, run_sweep
    from entangle_sim.train import TrainConfig

    cfg = SimConfig(pairs=3, train=TrainConfig(steps=4, record=False))
    ref = run_sweep(cfg, 0, 6, chunk=2, progress=False)
    out = tmp_path / "run"
    run_sweep(cfg, 0, 6, out=out, chunk=2, progress=False)
    assert (out / "chunk_0001.npz.sha256").exists()
    # a killed write's temporary, a chunk cut short, a chunk with a flipped byte, a missing sidecar
    (out / ".chunk_0003.npz.abc.tmp").write_bytes(b"partial")
    data = (out / "chunk_0001.npz").read_bytes()
    (out / "chunk_0001.npz").write_bytes(data[: len(data) // 2])
    data = bytearray((out / "chunk_0002.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "chunk_0002.npz").write_bytes(bytes(data))
    (out / "chunk_0000.npz.sha256").unlink()
    resumed = run_sweep(cfg, 0, 6, out=out, chunk=2, progress=False)
    for a, b in zip(ref, resumed):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit-identical
    assert not list(out.glob(".*.tmp"))
    for i in range(3):
        assert results.load_chunk(out / f"chunk_{i:04d}.npz") is not None


# ---------------------------------------------------------------------------------------------
# Python API: ValueError / TypeError naming the argument


def _gp():
    from entangle_sim import data

    return data.geometry_pairs(jax.random.PRNGKey(0), "linear", 3, 4, 0.5, 1.0, d=4)


@pytest.mark.parametrize("call,exc,needle", [
    (lambda: losses.get(None), TypeError, "loss name"),
    (lambda: losses.get(["sigmoid"]), TypeError, "loss name"),
    (lambda: losses.get("sigmoid")(-1.0, -2.0, beta="0.1"), TypeError, "beta"),
    (lambda: losses.get("sigmoid")(-1.0, -2.0, beta=None), TypeError, "beta"),
    (lambda: losses.get("sigmoid")(-1.0, -2.0, beta=float("nan")), ValueError, "beta"),
    (lambda: losses.get("sigmoid")(-1.0, -2.0, f_divergence_type=3), ValueError, "f_divergence_type"),
    (lambda: symbolic.derive(3), TypeError, "loss name or a loss definition"),
    (lambda: symbolic.derive("sigmoidd"), ValueError, "did you mean"),
])
def test_api_losses_and_derive(call, exc, needle):
    with pytest.raises(exc, match=needle):
        call()


def test_derive_accepts_a_name():
    assert symbolic.derive("sigmoid").loss_name == "sigmoid"


STATE = dict(chosen_logps=-3.0, rejected_logps=-4.0, ref_chosen_logps=-3.0, ref_rejected_logps=-3.0,
             G_ww=1.0, G_wl=0.5, G_ll=1.0, eta=1.0)


@pytest.mark.parametrize("hp,exc,needle", [
    (dict(beta=-1), ValueError, "beta"), (dict(beta=0), ValueError, "beta"),
    (dict(beta="0.1"), TypeError, "beta"), (dict(beta=float("inf")), ValueError, "beta"),
    (dict(beta=np.array([0.1, -0.2])), ValueError, "beta"),
])
def test_derivation_evaluate_validates_like_the_loss(hp, exc, needle):
    der = symbolic.derive("sigmoid")
    with pytest.raises(exc, match=needle):
        der.evaluate(**STATE, **hp)
    with pytest.raises(exc, match=needle):  # the same refusal as the loss itself
        losses.get("sigmoid")(-3.0, -4.0, -3.0, -3.0, **hp)


def test_derivation_evaluate_refuses_a_structural_value_it_was_not_made_for():
    der = symbolic.derive("sigmoid")  # reverse KL
    with pytest.raises(ValueError, match="f_divergence_type"):
        der.evaluate(**STATE, beta=0.1, f_divergence_type="forward_kl")


def test_pair_gram_refuses_bad_mask_shape_and_nan_params():
    from entangle_sim.geometry import pair_gram

    gp = _gp()
    pol = gp.policy()
    b = gp.batch
    bad = b._replace(chosen_mask=jnp.ones((b.chosen.shape[0], b.chosen.shape[1] + 1)))
    with pytest.raises(ValueError, match="chosen_mask"):
        pair_gram(pol.logps, gp.params, bad)
    nan_params = jax.tree.map(lambda x: x * jnp.nan, gp.params)
    with pytest.raises(ValueError, match="NaN"):
        pair_gram(pol.logps, nan_params, b)
    assert np.all(np.isfinite(np.asarray(pair_gram(pol.logps, gp.params, b).cos)))


@pytest.mark.parametrize("make,exc,needle", [
    (lambda: __import__("entangle_sim.train", fromlist=["x"]).TrainConfig(batch_size=2.5), TypeError, "batch_size"),
    (lambda: __import__("entangle_sim.train", fromlist=["x"]).TrainConfig(momentum=float("nan")), ValueError,
     "momentum"),
    (lambda: __import__("entangle_sim.train", fromlist=["x"]).TrainConfig(weight_decay=float("nan")), ValueError,
     "weight_decay"),
    (lambda: __import__("entangle_sim.train", fromlist=["x"]).TrainConfig(lr="0.1"), TypeError, "lr"),
    (lambda: __import__("entangle_sim.train", fromlist=["x"]).TrainConfig(steps=True), TypeError, "steps"),
    (lambda: __import__("entangle_sim.policies.lastlayer", fromlist=["x"]).LastLayerConfig(
        K=3, d=2, init_scale=float("nan")), ValueError, "init_scale"),
    (lambda: __import__("entangle_sim.policies.softmax", fromlist=["x"]).SoftmaxConfig(P=2.5, K=3), TypeError, "P"),
    (lambda: __import__("entangle_sim.simulate", fromlist=["x"]).SimConfig(cos=float("nan")), ValueError, "cos"),
    (lambda: __import__("entangle_sim.simulate", fromlist=["x"]).SimConfig(init_noise=-1.0), ValueError,
     "init_noise"),
])
def test_api_configs(make, exc, needle):
    with pytest.raises(exc, match=needle):
        make()


# ---------------------------------------------------------------------------------------------
# Registry semantics (TRL >= 1.10) on the paths TRL's own code cannot exercise


def test_alpha_fallback_traced_jax_and_symbolic_sympy():
    spec = losses.get("sigmoid")
    args = (-3.0, -4.0, -2.0, -2.5)
    rkl = float(spec(*args))

    def f(a):
        return spec(*args, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=a)

    assert float(jax.jit(f)(1.0)) == pytest.approx(rkl, rel=1e-15)  # traced a
    g = jax.grad(f)(1.0)
    assert np.isfinite(float(g))
    der = symbolic.derive(spec, f_divergence_type="alpha_divergence")  # a stays a symbol
    assert der.loss.expr.has(sp.Piecewise)
    v = dict(STATE, ref_chosen_logps=-2.0, ref_rejected_logps=-2.5, beta=0.1)
    for a in (1.0, 1.0 + 5e-7):
        assert float(der.loss(**v, f_alpha_divergence_coef=a)) == pytest.approx(rkl, rel=1e-12)
    # away from the fallback: TRL's score (e^{(a-1)r} - 1)/(a-1)
    r_w, r_l = -1.0, -1.5
    phi = [math.expm1(-0.5 * r) / -0.5 for r in (r_w, r_l)]
    assert float(der.loss(**v, f_alpha_divergence_coef=0.5)) == pytest.approx(
        math.log1p(math.exp(-0.1 * (phi[0] - phi[1]))), rel=1e-12)


@pytest.mark.parametrize("name", ["nca_pair", "bco_pair", "sppo_hard", "apo_down", "aot", "aot_unpaired",
                                  "apo_zero"])
@pytest.mark.parametrize("fdiv", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_absolute_score_losses_refuse_f_divergences(name, fdiv):
    with pytest.raises(ValueError, match="only with"):
        losses.get(name)(-1.0, -2.0, -1.5, -1.5, f_divergence_type=fdiv)
    losses.get(name)(-1.0, -2.0, -1.5, -1.5, f_divergence_type="reverse_kl")


def test_ipo_keeps_score_constants():
    """js: phi = log 2 + log sigma(r); the constant survives in Dbar = phi_w/n_w - phi_l/n_l."""
    lw, ll, rw0, rl0, nw, nl = -3.0, -4.0, -2.0, -2.5, 2.0, 5.0
    ls = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    phi_w, phi_l = math.log(2) + ls(lw - rw0), math.log(2) + ls(ll - rl0)
    dbar = phi_w / nw - phi_l / nl
    got = float(losses.get("ipo")(lw, ll, rw0, rl0, nw, nl, f_divergence_type="js_divergence"))
    assert got == pytest.approx((dbar - 5.0) ** 2, rel=1e-13)


def test_orpo_batch_nll_is_one_token_mean():
    lw, ll = np.array([-2.0, -30.0]), np.array([-3.0, -40.0])
    nw, nl = np.array([2.0, 20.0]), np.array([3.0, 20.0])
    pl, pn = np.array([-1.0, -4.0]), np.array([1.0, 4.0])
    spec = losses.get("orpo")
    odds = spec(lw, ll, chosen_len=nw, rejected_len=nl) - (-lw / nw)  # per-pair odds term
    expected = -(lw + pl).sum() / (nw + pn).sum() + float(np.mean(odds))
    got = float(spec.batch(lw, ll, chosen_len=nw, rejected_len=nl, prompt_logps=pl, prompt_len=pn))
    assert got == pytest.approx(expected, rel=1e-13)


def test_kto_row_mean_is_half_of_pair_sum():
    for name in ("kto", "apo_zero_unpaired"):
        s = losses.get(name)
        a = float(s(-1.0, -2.0, -1.5, -1.2, reduction="row_mean"))
        assert a == pytest.approx(0.5 * float(s(-1.0, -2.0, -1.5, -1.2)), rel=1e-15)
        assert "mean over rows" in s.notes


@pytest.mark.parametrize("z", [35.0, 47.0, 200.0, -35.0, -200.0])
def test_exo_pair_incentives_exact_at_large_margins(z):
    """jax.grad of exo_pair vs the exact incentive beta q(1-q)(log((1-eps)/eps) - z) in 50 digits."""
    import mpmath as mp

    mp.mp.dps = 50
    beta, eps = 0.1, 1e-3
    D = z / beta
    dw, dl = losses.incentives("exo_pair", 0.0, -D, 0.0, 0.0, label_smoothing=eps)
    q = 1 / (1 + mp.e ** (-z))
    exact = float(beta * q * (1 - q) * (mp.log((1 - eps) / eps) - z))
    assert float(dw) == pytest.approx(exact, rel=1e-10)
    assert float(dl) == pytest.approx(exact, rel=1e-10)


@pytest.mark.parametrize("name,alpha", [("alphapo", 0.25), ("cpo_simpo", 0.25), ("simpo", 0.5)])
@pytest.mark.parametrize("margin", [1e4, -1e4])
def test_alphapo_float32_extreme_margins(name, alpha, margin):
    """Length 1, l_w = -1e4 or 0: e^{-alpha l} overflows float32; value and incentives stay finite
    and the loss is ~0 where the margin is +1e4."""
    lw, ll = (0.0, -margin) if margin > 0 else (margin, 0.0)
    x = [jnp.asarray(v, jnp.float32) for v in (lw, ll, 0.0, 0.0, 1.0, 1.0)]
    spec = losses.get(name)
    val = spec(*x, alpha=alpha)
    g = jax.grad(lambda a, b: spec(a, b, *x[2:], alpha=alpha), argnums=(0, 1))(x[0], x[1])
    assert all(np.isfinite(float(t)) for t in (val, *g))
    if margin > 0:
        nll = -float(lw) if name == "cpo_simpo" else 0.0  # cpo_alpha * NLL, NLL = -l_w/n_w = 0 here
        assert float(val) == pytest.approx(nll, abs=1e-6)


def test_kill_9_then_damaged_chunk_resumes_bit_identical(tmp_path):
    """simulate killed with SIGKILL after its first chunk, that chunk then cut short: the rerun
    recomputes it and the summary equals an uninterrupted run's, bit for bit."""
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.getcwd())
    base = [sys.executable, "-m", "entangle_sim.cli", "simulate", "--runs", "130", "--steps", "3", "--pairs", "2",
            "--seed", "7"]
    full = subprocess.run(base + ["--out", str(tmp_path / "full")], env=env, capture_output=True, timeout=600)
    assert full.returncode == 0, full.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen(base + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "chunk_0000.npz.sha256").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    data = (out / "chunk_0000.npz").read_bytes()
    (out / "chunk_0000.npz").write_bytes(data[:100])
    again = subprocess.run(base + ["--out", str(out)], env=env, capture_output=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert (out / "summary.json").read_bytes() == (tmp_path / "full" / "summary.json").read_bytes()
    for i in range(3):
        a = results.load_chunk(out / f"chunk_{i:04d}.npz")
        b = results.load_chunk(tmp_path / "full" / f"chunk_{i:04d}.npz")
        assert all(np.array_equal(a[k], b[k]) for k in b)
