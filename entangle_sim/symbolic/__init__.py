"""Symbolic engine (SymPy): incentives, first-order changes, conditions, regimes and proofs.

    derive(spec, **hp) -> Derivation     per-loss results (R1, R3, R4, R8-R12), callable on JAX arrays
    proofs.*                             general theorems (R5-R11) with machine-checked certificates
"""
from . import functions, proofs, symbols  # noqa: F401
from .dynamics import Derivation, Formula, SignInfo, clear_cache, derive, first_order, regime_piecewise  # noqa: F401
