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
# # The softmax toy
# Table 1's three cases (R4), the single-token result that Condition 1 always holds for a softmax
# last layer (R15), its failure with a trainable context (R18), and the Fig. 1 analogue: DPO from R7
# initial conditions on a log-linear toy policy.

# %%
import os

import matplotlib.pyplot as plt

from entangle_sim import report, figures, presets

PRESET = "tiny" if os.environ.get("ENTANGLE_SIM_TINY") else "quick"
presets.enable_x64()

# %%
fig, _ = figures.render("table1_regions", PRESET)
plt.show()

# %%
p = presets.preset(PRESET)["report"]
for e in report.check_R15(p, 0) + report.check_R18(p, 0):
    print(e["id"], "PASS" if e["pass"] else "FAIL", e["measured"])

# %%
fig, data = figures.render("fig1_toy", PRESET)
plt.show()
