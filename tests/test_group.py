"""Group entanglement (R22): SymPy weights vs the JAX registry, proofs, one real step in the trainer
(error O(eta^2)), lazy likelihood displacement in a toy and its mitigation, `predict-group` and
`conditions grpo` (contracts and one-line errors)."""
import json

import numpy as np
import pytest
import sympy as sp

from entangle_sim.cli import main
from entangle_sim.group import losses as gl
from entangle_sim.group import predict as gp
from entangle_sim.group import toys
from entangle_sim.symbolic import group as sg


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("loss_type", gl.LOSS_TYPES)
def test_symbolic_weight_equals_registry_gradient(loss_type):
    """R22a: the SymPy weight (differentiated per-token loss x aggregation) == jax.grad of the registry."""
    rng = np.random.default_rng(0)
    lens = rng.integers(1, 9, 6)
    A = rng.normal(size=6)
    p = {"max_completion_length": 13, "epsilon_high": 0.7, "num_items_in_batch": 31.0}
    w = gl.rollout_weights(loss_type, A, lens, **p)
    expr = sg.rollout_weight(loss_type)
    sym = [float(expr.subs({sg.A_i: a, sg.n_i: int(n), sg.B: 6, sg.S_n: int(lens.sum()), sg.L_max: 13,
                            sg.eps_hi: 0.7, sg.N: 31.0})) for a, n in zip(A, lens)]
    assert np.abs(w - sym).max() < 1e-12   # float64 rounding of two exact formulas


def test_group_proofs_hold():
    proofs = sg.all_proofs()
    assert [p.result for p in proofs] == ["R22b-condition", "R22b", "R22c", "R22d", "R22-Adam"]
    assert all(p.holds for p in proofs)
    # R22c's certificate is a sum of squares: SymPy derives its sign from the symbols' assumptions
    assert proofs[2].certificate.is_nonnegative and isinstance(proofs[2].certificate, sp.Mul)


def test_wKw_nonnegative_random_groups():
    """R22c numerically: 2,000 random groups (K = J J^T, any weights) have w^T K w >= 0, and sum_j w_j delta_j
    from predict equals eta w^T K w."""
    rng = np.random.default_rng(1)
    vals = []
    for _ in range(2000):
        G, P = rng.integers(2, 7), rng.integers(1, 6)
        J = rng.normal(size=(G, P))
        w = rng.normal(size=G)
        vals.append(w @ (J @ J.T) @ w)
    assert min(vals) >= -1e-12
    J = rng.normal(size=(4, 3))
    out = gp.predict("grpo", [1, 0, 0.5, 0.2], [3, 4, 5, 6], K=J @ J.T, eta=0.3)
    assert abs(np.dot(out["weights"], out["delta"]) - 0.3 * out["wKw"]) < 1e-12 and out["wKw"] >= 0


@pytest.fixture(scope="module")
def toy():
    return toys.lld_toy()


@pytest.mark.slow
def test_one_step_error_is_second_order(toy):
    """R22b: realised - eta K w shrinks ~4x per halving of eta (grpo, luspo on the softmax sequence LM,
    dapo on the linear-feature policy; SGD in train.make_step)."""
    for lt, t in (("grpo", toy), ("luspo", toy), ("dapo", toys.linear_toy())):
        recs = [toys.run(t, lt, lr=eta, steps=1) for eta in (0.02, 0.01)]
        errs = [np.abs(r.real[0] - r.pred[0]).max() for r in recs]
        # the remainder is eta^2 (1/2 dl^T H dl + ...): ratio 4 up to O(eta^3) terms; measured 3.99-4.00
        assert 3.8 < errs[0] / errs[1] < 4.2, (lt, errs)


def test_prediction_in_trainer_matches_predict_and_lin(toy):
    """The trainer's pred (eta K w) equals group.predict with the same K, and lin (J dtheta) for SGD."""
    rec = toys.run(toy, "dapo", lr=0.01, steps=1)
    K = np.asarray(rec.K[0])
    out = gp.predict("dapo", toy.rewards, [4, 4, 4, 4], K=K, eta=0.01)
    assert np.abs(np.asarray(out["delta"]) - np.asarray(rec.pred[0])).max() < 1e-12
    assert np.abs(np.asarray(rec.lin[0]) - np.asarray(rec.pred[0])).max() < 1e-12


def test_lazy_likelihood_displacement_and_mitigation(toy):
    """The correct rollout sharing tokens with both incorrect ones falls (predicted and realised, every
    step of 30); the other correct rollout rises. The shared-token mitigation (strength 0.5) makes it rise
    every step while both incorrect rollouts still fall."""
    A, _ = gl.advantages(toy.rewards, 4)
    rec = toys.run(toy, "grpo", lr=0.05, steps=30)
    real, pred = np.asarray(rec.real), np.asarray(rec.pred)
    assert np.all(real[:, 0] < 0) and np.all(pred[:, 0] < 0) and np.all(real[:, 1] > 0)
    assert np.all(real[:, 2:] < 0)
    mit = toys.run(toy, "grpo", lr=0.05, steps=30, mitigation=toys.shared_token_weights(toy.policy, A, 0.5))
    real_m = np.asarray(mit.real)
    assert np.all(real_m[:, 0] > 0) and np.all(real_m[:, 2:] < 0)


def test_zero_variance_group_does_not_move(toy):
    """R22d: equal rewards -> A = 0 -> the trainer's step leaves every log-prob exactly unchanged."""
    flat = toy._replace(rewards=np.ones(4))
    rec = toys.run(flat, "grpo", lr=0.5, steps=2)
    assert np.all(np.asarray(rec.real) == 0.0) and np.all(np.asarray(rec.w) == 0.0)


def test_pair_case_equals_dpo_first_order(capsys):
    """G = 2, rewards (1, 0), equal lengths: predict-group's delta equals the pair engine's DPO prediction
    with d_w = d_l = c (sigmoid at z = 0 has d = beta/2, so beta = 2c)."""
    K = [[2.0, 1.4], [1.4, 3.0]]
    out = gp.predict("grpo", [1.0, 0.0], [5, 5], K=K, eta=0.1)
    c = out["weights"][0]
    assert c > 0 and abs(out["weights"][1] + c) < 1e-15
    code, txt, _ = run(capsys, "predict", "sigmoid", "--chosen-logp", "-3", "--rejected-logp", "-4",
                       "--ref-chosen-logp", "-3", "--ref-rejected-logp", "-4", "--gww", "2", "--gwl", "1.4",
                       "--gll", "3", "--eta", "0.1", "--param", f"beta={2 * c!r}", "--json")
    pair = json.loads(txt)
    assert code == 0
    assert abs(pair["delta_chosen"] - out["delta"][0]) < 1e-12 and abs(pair["delta_rejected"] - out["delta"][1]) < 1e-12


def test_predict_group_cli_json_contract(capsys, tmp_path):
    code, txt, _ = run(capsys, "predict-group", "grpo", "--rewards", "1,0,0,1", "--lens", "3,4,5,6", "--eta", "0.5",
                       "--json")
    out = json.loads(txt)
    assert code == 0 and {"advantages", "weights", "delta", "rises", "zero_variance"} <= set(out)
    # K = I: delta = eta * weights; weights = A / (B n)
    assert np.allclose(out["delta"], 0.5 * np.asarray(out["weights"]), rtol=0, atol=1e-15)
    A = np.asarray(out["advantages"])
    assert np.abs(np.asarray(out["weights"]) - A / (4 * np.array([3, 4, 5, 6]))).max() < 1e-15
    assert out["rises"] == [True, False, False, True] and out["zero_variance"] is False
    K = np.array([[2, 1.9], [1.9, 2.0]])
    (tmp_path / "k.json").write_text(json.dumps(K.tolist()))
    np.save(tmp_path / "k.npy", K)
    outs = []
    for f in ("k.json", "k.npy"):
        code, txt, _ = run(capsys, "predict-group", "dr_grpo", "--rewards", "1,0", "--lens", "2,2", "--gram",
                           str(tmp_path / f), "--param", "max_completion_length=4", "--param", "scale_rewards=none",
                           "--json")
        assert code == 0
        outs.append(json.loads(txt))
    assert outs[0]["delta"] == outs[1]["delta"]
    w = np.array([0.5, -0.5]) / (2 * 4)   # scale_rewards=none: A = r - mean; dr_grpo: A / (B L_max)
    assert np.abs(np.asarray(outs[0]["delta"]) - K @ w).max() < 1e-15
    code, txt, _ = run(capsys, "predict-group", "dapo", "--rewards", "2,2,2", "--lens", "1,2,3", "--json")
    assert json.loads(txt)["zero_variance"] is True and json.loads(txt)["delta"] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("argv", [
    ["grpo", "--rewards", "1,0,1", "--lens", "3,3"],            # different lengths
    ["grpo", "--rewards", "1", "--lens", "3"],                  # G < 2
    ["grpo", "--rewards", "1,nan", "--lens", "3,3"],            # non-finite reward
    ["grpo", "--rewards", "1,inf", "--lens", "3,3"],
    ["gpro", "--rewards", "1,0", "--lens", "3,3"],              # unknown loss type
    ["grpo", "--rewards", "1,x", "--lens", "3,3"],
    ["grpo", "--rewards", "1,0", "--lens", "3,0"],
    ["grpo", "--rewards", "1,0", "--lens", "3,3", "--param", "nope=1"],
    ["grpo", "--rewards", "1,0", "--lens", "3,3", "--eta", "-1"],
    ["grpo", "--rewards", "1,0", "--lens", "3,3", "--gram", "/nonexistent.json"],
    ["grpo", "--rewards", "1e308,-1e308", "--lens", "3,3"],     # std would overflow
    ["grpo", "--rewards", "1,0", "--lens", "3,1000000000"],     # mask too large
    ["dapo", "--rewards", "1,0", "--lens", "3,3", "--eta", "1e308", "--param", "num_items_in_batch=1e-300",
     "--param", "scale_rewards=none", "--gram", "/dev/null"],   # /dev/null: not JSON
])
def test_predict_group_bad_input_one_line_exit_2(capsys, argv):
    code, out, err = run(capsys, "predict-group", *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("entangle-sim: error: ")


def test_predict_group_rejects_bad_gram(capsys, tmp_path):
    for K in ([[1, 2], [2, 1]], [[1, 0.5], [0.4, 1]], [[1, 0, 0], [0, 1, 0], [0, 0, 1]]):   # not PSD, asym, 3x3
        (tmp_path / "k.json").write_text(json.dumps(K))
        code, _, err = run(capsys, "predict-group", "grpo", "--rewards", "1,0", "--lens", "2,2", "--gram",
                           str(tmp_path / "k.json"))
        assert code == 2 and err.startswith("entangle-sim: error: ")


def test_conditions_grpo_renders_group_theory(capsys):
    code, out, _ = run(capsys, "conditions", "grpo")
    assert code == 0 and "w_i = A_i/(B*n_i)" in out and "[proved]" in out and "NOT proved" not in out
    code, out, _ = run(capsys, "conditions", "cispo", "--json")
    d = json.loads(out)
    assert code == 0 and d["weight"] == "w_i = A_i*Min(1, epsilon_high)/N" and all(d["proofs"].values())
    code, _, err = run(capsys, "conditions", "grpo", "--all")
    assert code == 2 and err.startswith("entangle-sim: error: ")


def test_adam_first_step_is_preconditioned_gram(toy):
    """R22 Adam form: optax Adam's first update is -eta P grad L with P = diag(1/(|grad L| + eps)), so the
    first order of the step is eta K^P w, K^P = J P J^T (J: rollout log-prob Jacobian, w: rollout weights)."""
    import jax
    from jax.flatten_util import ravel_pytree

    eta = 1e-3
    rec = toys.run(toy, "grpo", lr=eta, steps=1, optimizer="adam")
    flat, unravel = ravel_pytree(toy.params)
    J = np.asarray(jax.jacrev(lambda f: toy.policy.logps(unravel(f), toy.batch)[0])(flat))
    A, _ = gl.advantages(toy.rewards, 4)
    w = gl.rollout_weights("grpo", A, [4, 4, 4, 4])
    grad = -(J.T @ w)
    P = 1.0 / (np.abs(grad) + 1e-8)            # optax.adam: eps = 1e-8, eps_root = 0, bias-corrected first step
    KP = (J * P) @ J.T
    # same product computed twice in float64: agreement to rounding (1e-12 absolute, values ~1e-3)
    assert np.abs(np.asarray(rec.lin[0]) - eta * KP @ w).max() < 1e-12
    assert np.all(np.sign(np.asarray(rec.real[0])) == np.sign(eta * KP @ w))
