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
# # Tiny transformer on the synthetic sentiment task (Figs. 3, 4a, 4b analogues)
# SFT then DPO on "prompt -> [pos | neg] + shared suffix" for the 1t / short / long datasets
# (`entangle_sim.diagnose`). In tiny mode (tests) the runs are a few steps only.

# %%
import os

import matplotlib.pyplot as plt

from entangle_sim import diagnose, figures, presets
from entangle_sim.plotting.diagnose import plot_geometry, plot_logps, plot_token_heatmap

PRESET = "tiny" if os.environ.get("ENTANGLE_SIM_TINY") else "quick"
presets.enable_x64()

# %%
if PRESET == "tiny":  # one dataset only, a few steps (tests)
    res = diagnose.run_diagnose(diagnose.DiagnoseConfig(suffix="long", **presets.preset("tiny")["diag"]))
    for plot in (plot_logps, plot_geometry, plot_token_heatmap):
        plot(res)
        plt.show()
else:
    for name in ("transformer_logps", "transformer_cos", "transformer_heatmap"):
        fig, data = figures.render(name, PRESET, cache_dir=os.environ.get("ENTANGLE_SIM_CACHE"))
        plt.show()
