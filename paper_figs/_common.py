"""Shared driver of the fig_*.py scripts: run, cache, save (the package does the work)."""
import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

HERE = Path(__file__).resolve().parent


def main(name: str) -> None:
    from entangle_sim import figures, presets

    p = argparse.ArgumentParser(description=figures.FIGURES[name].title)
    p.add_argument("--preset", default="full", choices=list(presets.PRESETS))
    p.add_argument("--out", default=str(HERE / "out"))
    p.add_argument("--cache", default=str(HERE / "cache"))
    p.add_argument("--seed", type=int, default=presets.SEED)
    a = p.parse_args()
    fig, _ = figures.render(name, a.preset, cache_dir=a.cache, seed=a.seed)
    for path in figures.save_figure(fig, a.out, name):
        print(path)
