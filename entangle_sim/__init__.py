"""entangle_sim: explain, predict and fix gradient entanglement in margin-based preference optimization.

Public API (submodules load on first use, so `import entangle_sim` stays light):

    losses      registry of 30 margin losses: `losses.get(name)`, `losses.names()`; your own: `losses.define`
    testing     `testing.check_loss(spec)`: the built-in losses' checks for any loss (also a pytest fixture)
    symbolic    `symbolic.derive(spec)` -> incentives, first-order changes, conditions, regimes; proofs
    geometry    `pair_gram`, `token_gram`, `aggregate`: per-pair and token-level gradient geometry
    geometry_cost  FLOPs / peak bytes per pair of each geometry path (drives method="auto")
    train       compiled trainer recording theory vs realised changes; `sweep` over runs
    simulate    presets (`SimConfig`) and resumable sweeps; `data`, `policies` build the toy models
    mitigations normalized / masked preference optimisation, preconditioned and batch Grams
    diagnose    tiny-transformer sentiment study; `logs` reads real training logs
    regimes     the five co-movement regimes; `plotting` draws everything
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = ("losses", "symbolic", "geometry", "geometry_cost", "train", "simulate", "data", "policies", "mitigations",
               "diagnose", "logs", "regimes", "plotting", "results", "sentiment", "distributed", "presets",
               "reproduce", "figures", "report", "testing")
__all__ = ["__version__", *_SUBMODULES]


def __getattr__(name):
    if name in _SUBMODULES:
        if name == "symbolic":   # the engine resolves loss names through the registry, which it never imports
            importlib.import_module(".losses", __name__)
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'entangle_sim' has no attribute {name!r}")
