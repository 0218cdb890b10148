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
# # Group entanglement (GRPO and its variants)
# For one prompt's G rollouts with rewards r_i, TRL's `GRPOTrainer` gives each rollout a weight w_i
# (its advantage times the loss type's normaliser), and one gradient step changes the log-probs by
# Δℓ ≈ η K w, with K the rollouts' gradient Gram. This first-order account, its conditions and the
# toy below are **derived in this project**; Deng et al. (arXiv 2505.18830) report the symptom
# ("lazy likelihood displacement": correct rollouts barely rise or fall).

# %%
import matplotlib.pyplot as plt
import numpy as np

from entangle_sim import reproduce
from entangle_sim.group import losses as gl
from entangle_sim.group import predict as gp
from entangle_sim.group import toys
from entangle_sim.plotting.group import plot_group_eta_rate, plot_group_lld
from entangle_sim.symbolic import group as sg

reproduce.enable_x64()

# %% [markdown]
# ## Weights per loss type (SymPy, by differentiating TRL's per-token loss and aggregation)

# %%
for lt in gl.LOSS_TYPES:
    print(f"{lt:>8}: w_i = {sg.rollout_weight(lt)}")
print({p.result: p.holds for p in sg.all_proofs()})

# %% [markdown]
# ## One group, a measured-looking Gram
# Four rollouts whose gradients overlap strongly (K_ij = 1.9 off the diagonal, 2 on it): the correct
# rollout still rises here, because the incorrect weights sum to minus its own.

# %%
K = np.full((4, 4), 1.9) + 0.1 * np.eye(4)
out = gp.predict("grpo", [1, 0, 0, 0], [30, 30, 30, 30], K=K, eta=1.0)
print({k: out[k] for k in ("advantages", "weights", "delta", "regimes", "effective_rank")})

# %% [markdown]
# ## A toy where a correct rollout falls
# Rollout 0 (correct) shares three tokens with both incorrect rollouts; rollout 1 (correct) does not.
# With `grpo` on a softmax sequence LM, rollout 0 falls every step, and this project's shared-token
# mitigation (down-weighting the incorrect rollouts' loss on tokens whose gradient pushes a correct
# rollout down) makes it rise while the incorrect rollouts still fall.

# %%
data = toys.lld_data(steps=30)
plot_group_lld(data)
plt.show()
print("net change without:", np.round(data["plain"][-1], 3))
print("net change with   :", np.round(data["mitigated"][-1], 3))

# %% [markdown]
# ## First order: the error shrinks as η²

# %%
rate = toys.eta_rate_data(("grpo", "dapo", "luspo"), (0.02, 0.01, 0.005))
plot_group_eta_rate(rate)
plt.show()
print({lt: [e[i] / e[i + 1] for i in range(len(e) - 1)] for lt, e in rate["errors"].items()})
