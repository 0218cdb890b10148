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
# # Analyse your own run
# Point `PATH` at a TRL `trainer_state.json` (or the official code's gradient CSV). The log-prob
# curves are split into logging intervals, each classified into a regime (same as
# `entangle-sim analyze-log PATH`).

# %%
from pathlib import Path

import matplotlib.pyplot as plt

from entangle_sim import logs
from entangle_sim.plotting.logs import plot_log_regimes

root = Path.cwd() if (Path.cwd() / "tests").exists() else Path.cwd().parent
PATH = root / "tests" / "data" / "trainer_state.json"

# %%
summary = logs.summarize(logs.load_log(str(PATH)))
print(summary["finding"])
print(summary.get("regime_fractions"))

# %%
fig = plot_log_regimes(summary)
plt.show()
