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
# # Tokens and shared suffixes (R13, R17)
# On the last-layer model (Setting A) the gradient cosine of a pair grows towards 1 with the length
# of an identical suffix, while |g_w - g_l|^2 stays O(1); after an SFT warm start DPO then moves both
# log-probabilities down, more for a longer suffix. The token heat map shows where the inner product
# comes from.

# %%
import os

import matplotlib.pyplot as plt

from entangle_sim import figures, presets

PRESET = "tiny" if os.environ.get("ENTANGLE_SIM_TINY") else "quick"
presets.enable_x64()

# %%
fig, tab = figures.render("suffix_cos", PRESET)
plt.show()
print(dict(L=tab["L"].tolist(), cos=tab["cos"].round(3).tolist()))

# %%
fig, _ = figures.render("token_heatmap", PRESET)
plt.show()

# %%
fig, _ = figures.render("suffix_dynamics", PRESET)
plt.show()
