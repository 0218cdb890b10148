"""R22a-R22d (group entanglement, derived in this project): entries computed now from the SymPy
group module, the JAX group-loss registry and real steps of `train.make_step` on the toy group."""
from __future__ import annotations

import numpy as np

from ..group import losses as gl
from ..group import predict as gp
from ..group import toys
from ..symbolic import group as sg
from .toys import entry


def _weight_errors(n, seed):
    import sympy as sp

    rng = np.random.default_rng(seed)
    worst, per = 0.0, {}
    args = (sg.A_i, sg.n_i, sg.B, sg.S_n, sg.L_max, sg.eps_hi, sg.N)
    for lt in gl.LOSS_TYPES:
        f = sp.lambdify(args, sg.rollout_weight(lt), "numpy")
        e = 0.0
        for _ in range(max(2, n // 32)):
            G = int(rng.integers(2, 9))
            lens, A = rng.integers(1, 33, G), rng.normal(size=G)
            p = {"max_completion_length": 64, "epsilon_high": float(rng.uniform(0.1, 2.0)),
                 "num_items_in_batch": float(rng.uniform(1, 200))}
            w = gl.rollout_weights(lt, A, lens, **p)
            sym = np.asarray(f(A, lens.astype(float), G, float(lens.sum()), 64.0, p["epsilon_high"],
                               p["num_items_in_batch"]), float) * np.ones(G)
            e = max(e, float(np.abs(w - sym).max() / max(np.abs(sym).max(), 1e-300)))
        per[lt] = e
        worst = max(worst, e)
    return worst, per


def check_R22(p, seed):
    out = []
    worst, per = _weight_errors(p["points"], seed)
    out.append(entry("R22a", "per-rollout weights w_i of every TRL GRPOTrainer loss type at ratio 1 (derived here)",
                     "SymPy weight (differentiated per-token loss x aggregation) vs jax.grad of the JAX registry "
                     "on random groups; the registry equals TRL 1.16's own _compute_loss (tests/test_group_trl.py)",
                     {"max_rel_error": worst, "per_loss_type": per}, "max rel. error <= 1e-12", worst <= 1e-12))
    rates, first = {}, {}
    data = toys.eta_rate_data(("grpo", "luspo"), (0.02, 0.01), seed=0)
    for lt, errs in data["errors"].items():
        rates[lt] = errs[0] / errs[1]
        first[lt] = errs[1]
    pr = sg.pair_reduction()
    ok_b = pr.holds and all(3.8 < r < 4.2 for r in rates.values())
    out.append(entry("R22b", "Delta l = eta K w (one SGD step); G = 2 reduces to Condition 1 (derived here)",
                     "toy group (softmax LM, 4 rollouts) in train.make_step: max |realised - eta K w| at eta = 0.02 "
                     "and 0.01, ratio; SymPy certificate of the G = 2 reduction",
                     {"error_ratio_per_halving": rates, "max_abs_error_eta_0.01": first, "G2_proof": pr.holds},
                     "ratio in (3.8, 4.2) (O(eta^2)) and proof holds", ok_b))
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(500):
        G = int(rng.integers(2, 9))
        J = rng.normal(size=(G, int(rng.integers(1, 6))))
        out_p = gp.predict("dapo", rng.normal(size=G), rng.integers(1, 9, G), K=J @ J.T)
        vals.append(out_p["wKw"])
    pc = sg.mean_change_nonnegative()
    out.append(entry("R22c", "sum_j w_j Delta l_j = eta w^T K w >= 0 (derived here)",
                     "SymPy sum-of-squares certificate; 500 random groups through group.predict",
                     {"min_wKw": float(min(vals)), "proof": pc.holds}, "min >= 0 and proof holds",
                     pc.holds and min(vals) >= 0))
    toy = toys.lld_toy()
    rec = toys.run(toy._replace(rewards=np.ones(4)), "grpo", lr=0.5, steps=1)
    moved = float(np.abs(np.asarray(rec.real)).max())
    pz = sg.zero_variance_no_change()
    out.append(entry("R22d", "a zero-variance group (all rewards equal) gives no change (derived here)",
                     "SymPy; one grpo step at eta = 0.5 on the toy group with rewards (1, 1, 1, 1)",
                     {"max_abs_change": moved, "proof": pz.holds}, "change exactly 0 and proof holds",
                     pz.holds and moved == 0.0))
    d = toys.lld_data()
    plain, mit = np.asarray(d["plain"]), np.asarray(d["mitigated"])
    ok = plain[-1, 0] < 0 and plain[-1, 1] > 0 and mit[-1, 0] > 0 and np.all(mit[-1, 2:] < 0)
    out.append(entry("R22-LLD", "lazy likelihood displacement (the symptom Deng et al. report) in a toy, and this "
                     "project's shared-token mitigation",
                     f"grpo, SGD lr {d['lr']}, {d['steps']} steps on the toy group: net change of each rollout "
                     f"without / with the mitigation (strength {d['strength']})",
                     {"plain": plain[-1].tolist(), "mitigated": mit[-1].tolist(), "labels": d["labels"]},
                     "correct-sharing rollout falls without, rises with; incorrect ones still fall", bool(ok)))
    return out
