"""The figures of `entangle-sim reproduce`: data from `reproduce` (cached) drawn by `plotting`.

    name -> Figure(title, theory references, plot(data) -> matplotlib Figure)

This module sits above the experiment layer and the plotting package (presets -> experiments ->
plotting -> report -> CLI), so neither needs to know the other.

Example:
    >>> from entangle_sim import figures
    >>> fig, data = figures.render("table1_regions", "tiny")
    >>> figures.save_figure(fig, "out", "table1_regions")       # out/table1_regions.{png,pdf}
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from . import reproduce, results
from .plotting import claims, group, simulation, theory
from .presets import SEED


@dataclasses.dataclass(frozen=True)
class Figure:
    name: str
    plot: Callable[..., Any]
    title: str
    theory: str

    @property
    def build(self) -> Callable:
        return reproduce.BUILDERS[self.data].build

    @property
    def data(self) -> str:
        """The builder (and cache file) whose data this figure draws."""
        return reproduce.DATA_OF.get(self.name, self.name)

    @property
    def uses(self) -> tuple:
        return reproduce.BUILDERS[self.data].uses


FIGURES: dict[str, Figure] = {f.name: f for f in [
    Figure("table1_regions", theory.plot_table1_regions, "Table 1: the three cases over (rho_w, rho_l)", "R4, R5"),
    Figure("regime_maps", theory.plot_regime_maps,
           "Regime maps of the six compared losses in the (cos, |g_l|/|g_w|) plane", "R9, R12"),
    Figure("regime_maps_all", theory.plot_regime_maps, "Regime maps of every registered loss", "R9, R12, R21"),
    Figure("condition_table", theory.plot_condition_table,
           "Table 2 analogue: loss-specific conditions from the symbolic engine", "R1, R9, R12"),
    Figure("fig1_toy", simulation.plot_fig1,
           "Fig. 1 analogue: both down / both up from R7 initial conditions", "R7, §6.1"),
    Figure("algorithms", simulation.plot_algorithms,
           "Algorithm comparison analogue: six losses on one toy setting", "R12, §6.2"),
    Figure("suffix_cos", theory.plot_suffix_cos,
           "R17: cos(g_w, g_l) vs shared-suffix length on the last-layer model", "R17"),
    Figure("suffix_dynamics", simulation.plot_suffix_dynamics,
           "Fig. 3 toy analogue on the last-layer model: log-probs vs step by suffix length", "R17, §6.3"),
    Figure("token_heatmap", simulation.plot_token_heatmap,
           "Fig. 4b toy analogue: token-level gradient cosines (last-layer model)", "R13, R17"),
    Figure("transformer_logps", simulation.plot_transformer_logps,
           "Fig. 3 analogue: tiny transformer, chosen/rejected log-probs for 1t/short/long", "§6.3"),
    Figure("transformer_cos", simulation.plot_transformer_cos,
           "Fig. 4a analogue: gradient cosine vs step for 1t/short/long", "§6.3, R15, R17"),
    Figure("transformer_heatmap", simulation.plot_transformer_heatmap,
           "Fig. 4b analogue: token-level gradient cosines, long suffix", "§6.3, R13"),
    Figure("transformer_claims", claims.plot_claim_table,
           "The paper's transformer claims as statistics over seeds and settings, with failures attributed",
           "§6.3, R15, R17"),
    Figure("transformer_claims_scale", claims.plot_claim_scale,
           "The paper's transformer claims as the model grows: fraction of seeds holding per size, where it turns",
           "§6.3, R15, R17"),
    Figure("mitigations", simulation.plot_mitigation_comparison,
           "Mitigation comparison: normalized GD and token masks vs plain DPO", "R19, R20, §8"),
    Figure("group_lld", group.plot_group_lld,
           "Group entanglement: a correct GRPO rollout sharing tokens with incorrect ones falls; the shared-token "
           "mitigation", "R22, §13"),
]}


def render(name: str, preset_name: str = "quick", *, cache_dir=None, seed: int = SEED):
    """(matplotlib Figure, data) of figure `name`."""
    data = reproduce.figure_data(name, preset_name, cache_dir=cache_dir, seed=seed)
    return FIGURES[name].plot(data), data


def save_figure(fig, out_dir, name: str) -> list[Path]:
    """Save a Figure as PNG and PDF (atomically: temp file + rename); returns the two paths."""
    return results.save_figure(fig, out_dir, name)
