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
# Pretraining on a synthetic corpus (so that the shared suffixes are fluent text the model already
# predicts, as for the paper's pretrained GPT-2), then SFT and DPO on "prompt -> [pos | neg] +
# shared suffix" for the 1t / short / long datasets (`entangle_sim.diagnose`). In tiny mode (tests)
# the runs are a few steps only. The last cell shows the paper's claims as statistics over seeds
# and settings, and as the model grows (`entangle_sim.claim_stats`, also `entangle-sim claims` and
# `entangle-sim claims --preset scale`).

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
    for name in ("transformer_logps", "transformer_cos", "transformer_heatmap", "transformer_claims",
                 "transformer_claims_scale"):
        fig, data = figures.render(name, PRESET, cache_dir=os.environ.get("ENTANGLE_SIM_CACHE"))
        plt.show()
