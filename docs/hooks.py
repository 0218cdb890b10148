"""MkDocs hooks: the docs build generates what the site shows.

* notebooks/*.py (jupytext percent files) are copied into docs/notebooks/ and executed by
  mkdocs-jupyter on the tiny presets (ENTANGLE_SIM_TINY=1), so the pages carry real outputs;
* the gallery's figures are drawn now, from `entangle_sim.reproduce` on the tiny preset, into
  docs/gallery_figs/ (both folders are git-ignored build products).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# Figures the docs build draws (fast on the tiny preset); the others are listed in the gallery.
GALLERY = ("table1_regions", "regime_maps", "condition_table", "fig1_toy", "algorithms", "suffix_cos",
           "suffix_dynamics", "token_heatmap")


def on_config(config, **kwargs):
    os.environ.setdefault("ENTANGLE_SIM_TINY", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    return config


def on_pre_build(config, **kwargs):
    nb_out = DOCS / "notebooks"
    nb_out.mkdir(exist_ok=True)
    for nb in sorted((ROOT / "notebooks").glob("*.py")):
        dst = nb_out / nb.name
        if not dst.exists() or dst.read_bytes() != nb.read_bytes():  # unchanged: keep the execution cache
            shutil.copy(nb, dst)
    _gallery(DOCS / "gallery_figs")


def _gallery(out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from entangle_sim import figures, presets

    presets.enable_x64()
    out.mkdir(exist_ok=True)
    p = presets.preset("tiny")
    for name in GALLERY:
        fig_def = figures.FIGURES[name]
        fig = fig_def.plot(fig_def.build(p, 0))
        fig.savefig(out / f"{name}.png", dpi=90)
        plt.close(fig)
