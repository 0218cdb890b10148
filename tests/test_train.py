"""Trainer: theory vs simulation, compile-once, vmap == loop, sharding, CLI."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from entangle_sim import data, regimes, train
from entangle_sim.cli import main
from entangle_sim.simulate import SimConfig, run_sweep


def _geometry(kind, cos, ratio, n=8, K=6, seed=0):
    return data.geometry_pairs(jax.random.PRNGKey(seed), kind, n, K=K, target_cos=cos, norm_ratio=ratio)


def test_tabular_one_pair_theory_matches_realised_signs():
    """Tabular softmax, one prompt row per pair: no cross-pair terms, so the per-pair symbolic
    prediction IS the first-order change of the batch step. Required: >= 99.9% sign agreement."""
    gp = _geometry("softmax", cos=-0.3, ratio=1.5, n=32, K=8)
    for loss in ("sigmoid", "simpo", "ipo", "dpop", "kto", "orpo"):
        cfg = train.TrainConfig(loss=loss, optimizer="sgd", lr=0.01, steps=60)
        traj = jax.jit(lambda p: train.train(gp.policy(), p, gp.batch, cfg, jax.random.PRNGKey(0)))(gp.params)
        s = train.summarize(traj)
        assert s["sign_agreement_one_pair"] >= 0.999 and s["sign_agreement"] >= 0.999, (loss, s)
        # and the per-pair prediction equals the first order of the actual update (no cross terms):
        np.testing.assert_allclose(traj.pred_chosen, traj.lin_chosen, rtol=1e-6, atol=1e-12)


def test_first_order_error_shrinks_as_eta_squared_along_trajectories():
    gp = _geometry("linear", cos=0.8, ratio=2.0)
    errs = []
    lrs = [0.04, 0.02, 0.01, 0.005]
    for lr in lrs:
        cfg = train.TrainConfig(loss="sigmoid", optimizer="sgd", lr=lr, steps=20)
        t = train.train(gp.policy(), gp.params, gp.batch, cfg, jax.random.PRNGKey(0))
        errs.append(float(jnp.abs(t.real_chosen - t.lin_chosen).max()))
    slope = np.polyfit(np.log(lrs), np.log(errs), 1)[0]
    assert 1.8 <= slope <= 2.2, (slope, errs)  # O(eta^2) remainder (R8) along 20-step trajectories


def test_R7_initial_conditions_give_both_down_and_both_up():
    """Fig. 1 analogue: rejected norm dominant + nearly parallel gradients -> both fall (Case 2);
    chosen norm dominant -> both rise (Case 3). Linear policy, one-pair theory at step 0."""
    for ratio, regime in ((2.0, "both_down"), (0.5, "both_up")):
        gp = _geometry("linear", cos=0.95, ratio=ratio)
        cfg = train.TrainConfig(loss="sigmoid", optimizer="sgd", lr=0.02, steps=30)
        t = train.train(gp.policy(), gp.params, gp.batch, cfg, jax.random.PRNGKey(0))
        first = regimes.fractions(t.regime_pred[0])
        assert first[regime] == 1.0
        real = regimes.fractions(regimes.classify(t.real_chosen[0], t.real_rejected[0]))
        assert real[regime] >= 0.75, real  # cross-pair terms can flip a few pairs


def test_dpop_and_rrhf_push_both_up_on_aligned_gradients():
    """theory §4.3: DPOP (lambda = 50) with r_w < 0 and RRHF with its NLL put positively aligned
    pairs in Case 3 (both up). DPOP's penalty acts only below the reference (r_w < 0), so the
    reference sits 1 nat above the chosen log-prob, as after DPO has dragged it down."""
    gp = _geometry("linear", cos=0.6, ratio=1.0)
    pol = gp.policy()
    lw0, ll0 = pol.logps(gp.params, gp.batch)
    cfg = train.TrainConfig(loss="dpop", optimizer="sgd", lr=1e-3, steps=1)
    step = train.make_step(pol, cfg)
    opt_state = train.make_optimizer("sgd", 1e-3).init(gp.params)
    _, _, rec = step(gp.params, opt_state, gp.batch, (lw0 + 1.0, ll0), jax.random.PRNGKey(0))
    assert regimes.fractions(rec.regime_pred)["both_up"] == 1.0
    assert regimes.fractions(regimes.classify(rec.real_chosen, rec.real_rejected))["both_up"] >= 0.75
    cfg = train.TrainConfig(loss="rrhf", optimizer="sgd", lr=0.01, steps=40)
    t = train.train(pol, gp.params, gp.batch, cfg, jax.random.PRNGKey(0))
    fr = regimes.fractions(t.regime_pred[5:])  # once the ranking hinge is satisfied only the NLL acts
    assert fr["both_up"] > 0.5, fr


def test_step_compiles_once():
    gp = _geometry("softmax", cos=-0.3, ratio=1.0)
    cfg = train.TrainConfig(steps=5, lr=0.01)
    fn = jax.jit(lambda p, k: train.train(gp.policy(), p, gp.batch, cfg, k))
    fn(gp.params, jax.random.PRNGKey(0))
    fn(gp.params + 0.1, jax.random.PRNGKey(1))
    assert fn._cache_size() == 1


def test_vmap_sweep_equals_loop_of_single_runs():
    gp = _geometry("linear", cos=0.5, ratio=1.2, n=4)
    cfg = train.TrainConfig(steps=10, lr=0.03, optimizer="adam", batch_size=2)
    lrs = jnp.array([0.01, 0.03, 0.05])
    betas = jnp.array([0.1, 0.5, 1.0])
    swept = train.sweep(gp.policy(), gp.batch, cfg, jax.random.PRNGKey(3), 3, params0=gp.params, lrs=lrs,
                        hps={"beta": betas})
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    for i in range(3):
        k_train = jax.random.split(keys[i], 3)[2]
        single = train.train(gp.policy(), gp.params, gp.batch, cfg, k_train, lr=lrs[i],
                             hp={**cfg.hp, "beta": betas[i]})
        np.testing.assert_allclose(swept.chosen_logps[i], single.chosen_logps, rtol=1e-10)
        np.testing.assert_allclose(swept.G_wl[i], single.G_wl, rtol=1e-10)


@pytest.mark.parametrize("opt", train.OPTIMIZERS)
def test_every_optimizer_runs_and_first_order_tracks(opt):
    gp = _geometry("linear", cos=0.2, ratio=1.0, n=4)
    cfg = train.TrainConfig(steps=10, lr=1e-3, optimizer=opt)
    s = train.summarize(train.train(gp.policy(), gp.params, gp.batch, cfg, jax.random.PRNGKey(0)))
    assert s["sign_agreement"] >= 0.999


def test_invalid_configs_raise():
    with pytest.raises(ValueError, match="unknown optimizer"):
        train.TrainConfig(optimizer="lion")
    with pytest.raises(ValueError, match="steps"):
        train.TrainConfig(steps=0)
    with pytest.raises(ValueError, match="did you mean"):
        train.TrainConfig(loss="sigmod")
    with pytest.raises(ValueError, match="K must be"):
        SimConfig(K=1)
    with pytest.raises(ValueError, match="L must be"):
        SimConfig(policy="lastlayer", task="suffix", L=-1)
    with pytest.raises(ValueError, match="needs --policy"):
        SimConfig(policy="lastlayer", task="geometry")


def test_sweep_resumes_from_chunks(tmp_path):
    cfg = SimConfig(policy="softmax", task="geometry", cos=-0.3, norm_ratio=1.0, pairs=4,
                    train=train.TrainConfig(steps=5, lr=0.01), init_noise=0.05)
    full = run_sweep(cfg, 0, 6, out=tmp_path / "a", chunk=2, progress=False)
    # simulate an interruption: drop the last chunk, rerun, and get identical results
    os.remove(tmp_path / "a" / "chunk_0002.npz")
    resumed = run_sweep(cfg, 0, 6, out=tmp_path / "a", chunk=2, progress=False)
    np.testing.assert_array_equal(full.chosen_logps, resumed.chosen_logps)
    assert full.chosen_logps.shape == (6, 5, 4)
    with pytest.raises(ValueError, match="different configuration"):
        run_sweep(SimConfig(policy="softmax", task="geometry", cos=-0.3, norm_ratio=1.0, pairs=5,
                            train=train.TrainConfig(steps=5, lr=0.01)), 0, 6, out=tmp_path / "a", chunk=2)


def test_simulate_cli_json(capsys, tmp_path):
    code = main(["simulate", "--policy", "softmax", "--task", "geometry", "--cos", "-0.5", "--norm-ratio", "1",
                 "--loss", "sigmoid", "--optimizer", "sgd", "--lr", "0.01", "--steps", "20", "--runs", "2",
                 "--seed", "0", "--pairs", "4", "--json", "--out", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert code == 0, err
    s = json.loads(out)
    assert {"sign_agreement", "regime_fractions", "mean_delta_chosen", "mean_delta_rejected"} <= set(s)
    assert s["sign_agreement"] >= 0.999
    assert s["regime_fractions"]["chosen_up_rejected_down"] == 1.0  # R15: tabular single token, Case 1
    assert (tmp_path / "o" / "config.json").exists() and (tmp_path / "o" / "chunk_0000.npz").exists()


@pytest.mark.parametrize("argv,needle", [
    (["simulate", "--policy", "mlp"], "invalid choice"),
    (["simulate", "--optimizer", "lion"], "invalid choice"),
    (["simulate", "--steps", "0"], "argument --steps: must be >= 1"),  # refused at parse time
    (["simulate", "--K", "1"], "argument --K: must be >= 2"),
    (["simulate", "--policy", "lastlayer", "--task", "suffix", "--suffix-len", "-1"], "--suffix-len"),
    (["simulate", "--loss", "dpoo"], "did you mean"),
])
def test_simulate_bad_input(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_sharded_sweep_on_four_virtual_devices():
    """Runs are sharded over devices (XLA_FLAGS host device count 4) and match one device."""
    code = r"""
import jax, numpy as np
jax.config.update("jax_enable_x64", True)
from entangle_sim import data, train
assert jax.device_count() == 4
gp = data.geometry_pairs(jax.random.PRNGKey(0), "linear", 4, K=6, target_cos=0.5, norm_ratio=1.5)
cfg = train.TrainConfig(steps=5, lr=0.02)
t = train.sweep(gp.policy(), gp.batch, cfg, jax.random.PRNGKey(1), 8, params0=gp.params, init_noise=0.1)
print(len(t.chosen_logps.sharding.device_set), float(np.asarray(t.chosen_logps).sum()))
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    n_dev, total = r.stdout.split()
    assert int(n_dev) == 4
    env1 = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    r1 = subprocess.run([sys.executable, "-c", code.replace("== 4", "== 1")], capture_output=True, text=True,
                        env=env1)
    assert r1.returncode == 0, r1.stderr
    assert float(r1.stdout.split()[1]) == pytest.approx(float(total), rel=1e-12)


def test_distributed_sweep_two_local_processes_matches_single_process():
    """jax.distributed across 2 CPU processes (gloo) gives the same trajectories as one process."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = r"""
import sys, jax
pid, n, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
from entangle_sim import distributed
if n > 1:
    distributed.initialize("127.0.0.1:" + port, num_processes=n, process_id=pid)
from entangle_sim import data, train
gp = data.geometry_pairs(jax.random.PRNGKey(0), "linear", 4, K=6, target_cos=0.5, norm_ratio=1.5)
cfg = train.TrainConfig(steps=5, lr=0.02)
t = distributed.sweep(gp.policy(), gp.batch, cfg, jax.random.PRNGKey(1), 4, params0=gp.params, init_noise=0.1)
print(jax.process_count(), repr(float(t.chosen_logps.sum())), flush=True)
"""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i), "2", str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    single = subprocess.run([sys.executable, "-c", code, "0", "1", "0"], capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr
    n1, total1 = single.stdout.strip().splitlines()[-1].split()
    for o in outs:  # the last stdout line is ours (gloo prints connection lines to stdout too)
        n, total = o[0].strip().splitlines()[-1].split()
        assert n == "2" and float(total) == float(total1)


def test_R17_shared_suffix_after_sft_cosine_grows_and_chosen_falls_more():
    """Paper §6.3 claims on the last-layer toy (SFT warm start, then DPO; reference = SFT model):
    one differing token -> negative cosine; a longer shared suffix -> higher cosine and a larger
    fall of the chosen log-prob (R17: the common mode dominates)."""
    res = {}
    for L in (0, 16):
        cfg = SimConfig(policy="lastlayer", task="suffix", L=L, pairs=16, K=8, d=8, sft_steps=100,
                        train=train.TrainConfig(loss="sigmoid", optimizer="sgd", lr=0.5, steps=60))
        s = train.summarize(run_sweep(cfg, 0, 1, progress=False))
        res[L] = s
    assert res[0]["mean_cos_first_step"] < 0 < res[16]["mean_cos_first_step"]
    assert res[16]["mean_cos_first_step"] > 0.7
    assert res[16]["mean_delta_chosen"] < res[0]["mean_delta_chosen"]
    assert res[16]["regime_fractions"]["both_down"] > 0.5


def test_simulate_cli_with_mitigation(capsys):
    """`--mitigation normalized` (R19) on the both-down toy: the per-pair theory says ideal."""
    code = main(["simulate", "--policy", "softmax", "--task", "geometry", "--cos", "-0.3", "--norm-ratio", "1",
                 "--mitigation", "normalized", "--steps", "10", "--runs", "1", "--pairs", "4", "--lr", "0.05",
                 "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    s = json.loads(out)
    assert s["mitigation"] == "normalized" and s["pair_pred_ideal_fraction"] == 1.0
    # one name per quantity: the plain simulation's summary names are there too, same values
    assert (s["sign_agreement"], s["sign_agreement_one_pair"]) == (s["sign_agreement_lin"], s["sign_agreement_pair_pred"])
    assert (s["mean_delta_chosen"], s["mean_delta_rejected"]) == (s["delta_chosen"], s["delta_rejected"])
    assert s["mean_delta_margin"] == pytest.approx(s["delta_chosen"] - s["delta_rejected"], rel=1e-12)
    assert main(["simulate", "--mitigation", "foo"]) == 2


def test_simulate_with_mitigation_writes_runs_and_resumes(tmp_path, capsys):
    """Hostile input: `--mitigation normalized --out DIR` used to write only config.json and
    summary.json. Each run's records are now on disk; a lost run is recomputed and the summary is
    the same, bit for bit (same program, same keys)."""
    argv = ["simulate", "--policy", "softmax", "--task", "geometry", "--cos", "-0.3", "--norm-ratio", "1",
            "--mitigation", "normalized", "--steps", "3",
            "--runs", "2", "--pairs", "2", "--lr", "0.05", "--json", "--out", str(tmp_path)]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    runs = sorted(p.name for p in tmp_path.glob("run_*.npz"))
    assert runs == ["run_0000.npz", "run_0001.npz"]
    rec = np.load(tmp_path / "run_0001.npz")
    assert rec["real_chosen"].shape == (3, 2) and np.all(np.isfinite(rec["real_chosen"]))
    (tmp_path / "run_0001.npz").unlink()                  # an interrupted run: recomputed on resume
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == first
    assert (tmp_path / "run_0001.npz").is_file()


def test_step_honours_the_learning_rate_of_its_state_and_takes_batch_and_reference():
    """The step applies (and its one-pair prediction uses) the rate held in opt_state, so a schedule
    that sets `opt_state.hyperparams['learning_rate']` is honoured; batch and reference log-probs
    are arguments, so one compiled step serves any batch of the same shape."""
    gp = _geometry("linear", cos=0.5, ratio=1.2, n=4)
    pol = gp.policy()
    cfg = train.TrainConfig(loss="sigmoid", optimizer="sgd", lr=0.1, steps=1)
    step = jax.jit(train.make_step(pol, cfg))
    ref = pol.logps(gp.params, gp.batch)
    key = jax.random.PRNGKey(0)
    s1 = train.make_optimizer("sgd", 0.01).init(gp.params)
    s2 = train.make_optimizer("sgd", 0.01).init(gp.params)
    s2.hyperparams["learning_rate"] = jnp.full_like(s1.hyperparams["learning_rate"], 0.03)   # a schedule
    p1, _, r1 = step(gp.params, s1, gp.batch, ref, key)
    p2, _, r2 = step(gp.params, s2, gp.batch, ref, key)
    d1, d2 = ravel_pytree(p1)[0] - ravel_pytree(gp.params)[0], ravel_pytree(p2)[0] - ravel_pytree(gp.params)[0]
    # SGD: the update is -lr * grad, so tripling the rate triples the update (float64 round-off: 1e-12)
    np.testing.assert_allclose(d2, 3.0 * d1, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(r2.pred_chosen, 3.0 * r1.pred_chosen, rtol=1e-12)
    assert float(train.learning_rate(s2)) == 0.03
    # another batch (same shapes) through the same compiled step: records are of that batch
    other = _geometry("linear", cos=-0.2, ratio=0.8, n=4, seed=7).batch
    _, _, r3 = step(gp.params, s1, other, pol.logps(gp.params, other), key)
    np.testing.assert_allclose(r3.chosen_logps, pol.logps(gp.params, other)[0], rtol=1e-12)
    assert step._cache_size() == 1


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_batch_level_record_is_the_2Bx2B_gram_contraction(opt):
    """batch_* = -lr G_batch dL/dl with G_batch = geometry.batch_gram (2B x 2B) and dL/dl from
    jax.grad of the batch loss with respect to the 2B log-probs: an independent route to the same
    number. For SGD it must equal the first order of the real update (lin_*); under Adam it need not."""
    from entangle_sim import geometry, losses

    gp = _geometry("linear", cos=0.6, ratio=1.3, n=5)
    pol = gp.policy()
    cfg = train.TrainConfig(loss="sigmoid", optimizer=opt, lr=0.05, steps=1)
    step = train.make_step(pol, cfg)
    lw0, ll0 = pol.logps(gp.params, gp.batch)
    ref = (lw0 - 0.3, ll0 + 0.2)          # r != 0, so the incentives differ between pairs
    state = train.make_optimizer(opt, 0.05).init(gp.params)
    _, _, rec = step(gp.params, state, gp.batch, ref, jax.random.PRNGKey(0))
    spec, b = losses.get("sigmoid"), gp.batch
    dLdl = jax.grad(lambda w, l: spec.batch(w, l, *ref, b.chosen_len, b.rejected_len, **cfg.hp), argnums=(0, 1))(lw0, ll0)
    G = geometry.batch_gram(pol.logps, gp.params, b)
    want = -0.05 * G @ jnp.concatenate(dLdl)
    # float64 contraction of O(1) terms: 1e-10 relative is round-off with a wide margin
    np.testing.assert_allclose(np.concatenate([rec.batch_chosen, rec.batch_rejected]), want, rtol=1e-10, atol=1e-14)
    if opt == "sgd":
        np.testing.assert_allclose(rec.batch_chosen, rec.lin_chosen, rtol=1e-10, atol=1e-14)
    else:
        assert not np.allclose(rec.batch_chosen, rec.lin_chosen, rtol=1e-3)
