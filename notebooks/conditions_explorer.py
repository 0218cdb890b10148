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
# # Conditions explorer
# Pick a loss, beta, the two response lengths and a gradient geometry (cosine, norm ratio
# |g_l|/|g_w|). The symbolic engine gives the regime map of the loss on the (cos, ratio) plane and the
# predicted first-order changes at your point (G_ww = 1, eta = 1). With `ipywidgets` installed
# (`pip install -e ".[widgets]"`) the controls are interactive; otherwise the cell shows static output.

# %%
import os

import matplotlib.pyplot as plt

from entangle_sim import losses, reproduce
from entangle_sim.plotting.theory import plot_regime_maps

reproduce.enable_x64()
N = 21 if os.environ.get("ENTANGLE_SIM_TINY") else 81


def show(loss="sigmoid", beta=0.1, chosen_len=10, rejected_len=15, cos=0.9, ratio=2.0):
    maps, pred = reproduce.explore(loss, beta=beta, chosen_len=chosen_len, rejected_len=rejected_len,
                                   cos=cos, ratio=ratio, n=N)
    fig = plot_regime_maps(maps)
    fig.axes[0].plot([cos], [ratio], marker="*", ms=14, color="black")
    plt.show()
    print({k: v for k, v in pred.items() if k != "hyperparameters"})


# %%
try:
    import ipywidgets as w
except ImportError:
    w = None

if w is not None and not os.environ.get("ENTANGLE_SIM_TINY"):
    w.interact(show, loss=w.Dropdown(options=losses.names(), value="sigmoid"),
               beta=w.FloatLogSlider(value=0.1, base=10, min=-2, max=1),
               chosen_len=w.IntSlider(value=10, min=1, max=200), rejected_len=w.IntSlider(value=15, min=1, max=200),
               cos=w.FloatSlider(value=0.9, min=-1, max=1, step=0.01),
               ratio=w.FloatLogSlider(value=2.0, base=10, min=-1, max=1))
else:
    print("ipywidgets not available (or tiny mode): static output")
    show("sigmoid", cos=0.9, ratio=2.0)
    show("simpo", beta=2.0, chosen_len=10, rejected_len=40, cos=0.9, ratio=2.0)
