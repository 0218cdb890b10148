"""One style for every figure: Okabe-Ito palette (colourblind-safe), labelled axes, finding-titles."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg", force=False)  # headless by default; notebooks may switch backends
import matplotlib.pyplot as plt  # noqa: E402

# Okabe & Ito (2008) colourblind-safe palette.
COLORS = {
    "chosen": "#0072B2",    # blue
    "rejected": "#D55E00",  # vermillion
    "margin": "#009E73",    # bluish green
    "neutral": "#999999",
    "accent": "#CC79A7",    # reddish purple
    "yellow": "#F0E442",
    "orange": "#E69F00",
    "sky": "#56B4E9",
    "black": "#000000",
}
REGIME_COLORS = {
    "chosen_up_rejected_down": "#009E73",
    "both_up": "#E69F00",
    "both_down": "#56B4E9",
    "chosen_down_rejected_up": "#CC79A7",
    "stationary": "#DDDDDD",
}
CYCLE = [COLORS[k] for k in ("chosen", "rejected", "margin", "orange", "sky", "accent", "yellow", "black")]


def apply_style() -> None:
    """Set rcParams once; idempotent."""
    plt.rcParams.update({
        "axes.prop_cycle": matplotlib.cycler(color=CYCLE),
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "figure.dpi": 110,
        "savefig.dpi": 150,
        "savefig.bbox": "tight",
        "font.size": 10,
        "axes.titlesize": 10,
        "legend.frameon": False,
    })


def new_axes(ax=None, *, figsize=(5.0, 3.6)):
    """Return (fig, ax): the given ax's figure, or a new styled figure."""
    apply_style()
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax
