# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Add your own loss
# A new preference loss, written once, gets everything the built-in losses get: the SymPy
# derivation of its incentives, its conditions for "chosen rises" / "rejected falls", regime maps,
# the condition table, toy simulations and the battery of checks of `entangle_sim.testing`.
#
# The example is **DPO-Shift** (Yang, Jiang, Zhang, Zhao, Li 2025, "DPO-Shift: Shifting the
# Distribution of Direct Preference Optimization", arXiv:2502.07599). It scales the rejected
# log-ratio by a factor lambda in (0, 1]:
#
# $$L = -\log\sigma\big(\beta\, r_w - \lambda\, \beta\, r_l\big), \qquad r = \ell - \ell^{\mathrm{ref}}.$$
#
# The paper's abstract states a trade-off between raising the chosen probability and the reward
# margin; below the first-order theory of this project says exactly where that trade-off sits.
# We call our loss `my_dpo_shift` (a built-in of the same formula may exist under `dpo_shift`; a user
# loss may not take a built-in's name). lambda = 0.9 is an illustrative value, not the paper's setting.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np
import sympy as sp

from entangle_sim import losses, reproduce, simulate, testing, train
from entangle_sim.losses import Hyper
from entangle_sim.plotting.theory import plot_condition_table, plot_regime_maps
from entangle_sim.report import condition_table_markdown
from entangle_sim.symbolic import derive

TINY = bool(os.environ.get("ENTANGLE_SIM_TINY"))
reproduce.enable_x64()

# %% [markdown]
# ## 1. Define it
# The builder `fn(v, F, *, hyperparameters)` uses only the pair variables `v` (`v.r_w`, `v.r_l`,
# `v.chosen_logps`, `v.chosen_len`, ...) and the backend `F` (`F.log_sigmoid`, `F.sigmoid`, `F.exp`,
# `F.log`, `F.relu`, `F.minimum`, ...): with `F = JAX` it is the training loss, with `F = SYM` the
# SymPy expression the symbolic engine differentiates. Ranges on hyperparameters are enforced on every
# call, and a lower bound >= 0 tells SymPy the sign. `margin=` gives the transformed margin z (for the
# step weight s = -m'(z)). `replace=True` lets you re-run this cell.

# %%
@losses.define(
    "my_dpo_shift",
    hyperparameters=[Hyper("beta", 0.1, "inverse temperature", lo=0.0, lo_open=True),
                     Hyper("lam", 0.9, "shift factor lambda on the rejected log-ratio", lo=0.0, hi=1.0,
                           lo_open=True)],
    margin=lambda v, F, *, beta, lam: beta * v.r_w - lam * beta * v.r_l,
    replace=True)
def my_dpo_shift(v, F, *, beta, lam):
    """DPO-Shift: -log sigma(beta r_w - lambda beta r_l)"""
    return -F.log_sigmoid(beta * v.r_w - lam * beta * v.r_l)


spec = losses.get("my_dpo_shift")
print(spec.info())
print("loss at l_w=-10, l_l=-12, ref=(-11, -11):", float(spec(-10.0, -12.0, -11.0, -11.0)))

# %% [markdown]
# Definitions that cannot work are refused with the problem named, e.g. calling numpy directly:

# %%
try:
    losses.define("broken", lambda v, F, *, beta=0.1: np.log1p(np.exp(-beta * (v.r_w - v.r_l))))
except losses.LossDefinitionError as e:
    print("refused:", e)

# %% [markdown]
# ## 2. Its conditions (symbolic engine)
# Incentives d_w = -dL/dl_w, d_l = +dL/dl_l, and one SGD step's first-order changes
# Delta l_w ~ eta (d_w G_ww - d_l G_wl), Delta l_l ~ eta (d_w G_wl - d_l G_ll), with the Gram
# entries G of the gradients g_w, g_l of the two log-probs.

# %%
der = derive(spec)
print("d_w =", der.d_w)
print("d_l =", der.d_l)
print("chosen rises   <=> G_wl <=", der.chosen_threshold, "* G_ww")
print("rejected falls <=> G_wl <=", der.rejected_threshold, "* G_ll")
print("d_w sign:", der.d_w_sign.how, "| fourth regime possible:", der.fourth_regime_possible)
der.delta_margin

# %% [markdown]
# By hand: d_w = beta sigma(-z), d_l = lambda beta sigma(-z), so the thresholds are t_w = 1/lambda and
# t_l = lambda (derived in this project; checked here against the engine). Compared with DPO
# (t_w = t_l = 1): the chosen log-prob rises on a larger set of gradient geometries (G_wl <= G_ww/lambda),
# the rejected one falls on a smaller set (G_wl <= lambda G_ll). Both incentives stay >= 0, so the
# fourth regime (chosen down, rejected up) stays impossible. The margin change
# eta beta sigma(-z) (G_ww + lambda G_ll - (1 + lambda) G_wl) is no longer a squared norm: for parallel
# gradients g_w = c g_l it is proportional to (c - 1)(c - lambda), negative when lambda < c < 1 (DPO:
# (c - 1)^2 >= 0). This is the first-order face of the trade-off the paper reports.

# %%
lam = sp.Symbol("lam", positive=True)
assert sp.simplify(der.chosen_threshold - 1 / lam) == 0
assert sp.simplify(der.rejected_threshold - lam) == 0
assert der.d_w_sign.nonnegative and der.d_l_sign.nonnegative and not der.fourth_regime_possible
# Parallel gradients g_w = 0.6 g_l (G_ww = 0.36, G_wl = 0.6, G_ll = 1): DPO's margin grows,
# DPO-Shift's with lambda = 0.5 < 0.6 shrinks.
state = dict(chosen_logps=-21.0, rejected_logps=-24.0, ref_chosen_logps=-20.0, ref_rejected_logps=-22.0,
             G_ww=0.36, G_wl=0.6, G_ll=1.0, eta=1.0, beta=0.1)
dm_dpo = float(derive(losses.get("sigmoid")).delta_margin(**state))
dm_shift = float(der.delta_margin(**state, lam=0.5))
print(f"Delta margin ~ DPO {dm_dpo:+.5f}, DPO-Shift (lambda = 0.5) {dm_shift:+.5f}")
assert dm_dpo > 0 > dm_shift

# %% [markdown]
# ## 3. Regime map and condition table
# The same figure functions as for the built-in losses; the data builders accept user losses.

# %%
maps = reproduce.regime_maps(["sigmoid", "my_dpo_shift"], n=21 if TINY else 81)
fig = plot_regime_maps(maps)
plt.show()
for name, code in zip(maps["losses"], maps["code"]):
    print(f"{name:13s} share of the plane: chosen up & rejected down {np.mean(code == 0):.3f}, "
          f"both up {np.mean(code == 1):.3f}, both down {np.mean(code == 2):.3f}")

# %%
rows = reproduce.condition_rows(["sigmoid", "my_dpo_shift"])
fig = plot_condition_table({"rows": rows})
plt.show()
print(condition_table_markdown(rows))

# %% [markdown]
# ## 4. A toy simulation
# A linear softmax policy whose pairs start with cos(g_w, g_l) = 0.9 and |g_l|/|g_w| = 2 (rejected
# gradient dominant: DPO's Case 2, both log-probs fall). Same data: DPO, DPO-Shift at lambda = 0.9
# and 0.5 (the trainer takes the user loss by name, like any registered loss).

# %%
steps, runs = (10, 2) if TINY else (100, 8)
for loss, params in (("sigmoid", ()), ("my_dpo_shift", ()), ("my_dpo_shift", (("lam", 0.5),))):
    cfg = simulate.SimConfig(policy="linear", task="geometry", pairs=16, cos=0.9, norm_ratio=2.0,
                             train=train.TrainConfig(loss=loss, loss_params=params, optimizer="sgd", lr=0.05,
                                                     steps=steps))
    s = train.summarize(simulate.run_sweep(cfg, seed=0, runs=runs, progress=False))
    label = loss + "".join(f" {k}={v}" for k, v in params)
    print(f"{label:22s} mean change: chosen {s['mean_delta_chosen']:+.4f}, rejected {s['mean_delta_rejected']:+.4f}, "
          f"margin {s['mean_delta_margin']:+.4f}; first-order sign agreement {s['sign_agreement']:.4f}")

# %% [markdown]
# ## 5. Check it: `entangle_sim.testing.check_loss`
# SymPy vs `jax.grad` vs finite differences (float64, random and extreme states), the one-step
# prediction against a real gradient step (error ~ eta^2), the incentive signs, and float32 at
# margins of +-1e4. A failing check raises `LossCheckError` naming the state and the measured error.

# %%
report = testing.check_loss(spec)
print(report)
assert report.passed

# %% [markdown]
# ## 6. Use it outside this notebook
# Put the definition in a file, e.g. `my_losses.py`, then
#
# * command line: `entangle-sim conditions my_dpo_shift --losses-from my_losses.py` (also `losses`,
#   `predict`, `simulate`, `mitigate`, `diagnose`). **Loading the file runs its code**, which is why
#   it happens only with this explicit flag;
# * pytest, in your own project (the plugin is registered by installing entangle_sim):
#
# ```python
# import my_losses
#
# def test_my_dpo_shift(check_loss):
#     check_loss("my_dpo_shift")
# ```
