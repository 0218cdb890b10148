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
# # Mitigations (R19, R20)
# Pairwise normalized gradient descent and sparse token masking against plain DPO
# (`entangle_sim.mitigations`). The first-order guarantee of R19 is checked on random pairs by the
# report; the comparison table needs the mitigations module.

# %%
import os

from entangle_sim import mitigations, presets, report

TINY = bool(os.environ.get("ENTANGLE_SIM_TINY"))
PRESET = "tiny" if TINY else "quick"
presets.enable_x64()
for e in report.check_R19(presets.preset(PRESET)["report"], 0):
    print(e["id"], "PASS" if e["pass"] else "FAIL", e["measured"])

# %%
kw = dict(settings=("linear",), steps=5, pairs=4, sft_steps=5) if TINY else dict(steps=40, pairs=8)
res = mitigations.run_comparison(**kw)
print(mitigations.format_table(res["rows"]))
