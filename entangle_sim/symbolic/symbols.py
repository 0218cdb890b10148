"""Symbols, declared once with their assumptions. Names follow docs/theory.md §1.

The pair variables use TRL's argument names as keys (`chosen_logps`, ...), so a SymPy result can be
evaluated on the same keyword arguments as the JAX loss.
"""
from __future__ import annotations

import sympy as sp

# Log-probabilities are <= 0; the lengths are >= 1 (TRL clamps them), positive suffices here.
ell_w = sp.Symbol("ell_w", nonpositive=True)
ell_l = sp.Symbol("ell_l", nonpositive=True)
ell_w_ref = sp.Symbol("ell^ref_w", nonpositive=True)
ell_l_ref = sp.Symbol("ell^ref_l", nonpositive=True)
n_w = sp.Symbol("n_w", positive=True)
n_l = sp.Symbol("n_l", positive=True)
ell_p = sp.Symbol("ell_p", nonpositive=True)  # prompt log-prob (ORPO's NLL includes the prompt)
n_p = sp.Symbol("n_p", nonnegative=True)

# Gram entries of g_w = grad ell_w, g_l = grad ell_l, and the step size.
G_ww = sp.Symbol("G_ww", nonnegative=True)
G_ll = sp.Symbol("G_ll", nonnegative=True)
G_wl = sp.Symbol("G_wl", real=True)
eta = sp.Symbol("eta", positive=True)

# Generic incentives d_w = -dL/d ell_w, d_l = +dL/d ell_l (real: they may be negative).
d_w = sp.Symbol("d_w", real=True)
d_l = sp.Symbol("d_l", real=True)

PAIR_VARS = {
    "chosen_logps": ell_w,
    "rejected_logps": ell_l,
    "ref_chosen_logps": ell_w_ref,
    "ref_rejected_logps": ell_l_ref,
    "chosen_len": n_w,
    "rejected_len": n_l,
    "prompt_logps": ell_p,
    "prompt_len": n_p,
}
GRAM_VARS = {"G_ww": G_ww, "G_wl": G_wl, "G_ll": G_ll, "eta": eta}

# Display names of hyperparameters (TRL keyword -> LaTeX-friendly symbol name).
HYPER_SYMBOL_NAMES = {
    "beta": "beta",
    "label_smoothing": "epsilon",
    "discopop_tau": "tau_d",
    "f_alpha_divergence_coef": "a",
    "simpo_gamma": "gamma",
    "cpo_alpha": "lambda_cpo",
    "alpha": "alpha",
    "desirable_weight": "lambda_D",
    "undesirable_weight": "lambda_U",
    "kl": "z_0",
    "dpop_lambda": "lambda_p",
    "rdpo_alpha": "alpha_r",
    "delta": "delta",
    "lambda_nll": "lambda_nll",
    "shift_lambda": "lambda_s",
}


def hyper_symbol(name: str, lo=None, lo_closed=True) -> sp.Symbol:
    """The symbol of a hyperparameter, with positivity assumptions from its lower bound."""
    assumptions = {"real": True}
    if lo is not None and lo >= 0:
        assumptions = {"positive": True} if (lo > 0 or not lo_closed) else {"nonnegative": True}
    return sp.Symbol(HYPER_SYMBOL_NAMES.get(name, name), **assumptions)

# ---------------------------------------------------------------------------------------------
# Named symbols of the compact forms (docs/theory.md §3)

r_w = sp.Symbol("r_w", real=True)
r_l = sp.Symbol("r_l", real=True)
p_w = sp.Symbol("p_w", positive=True)       # exp(l_w/n_w) in (0, 1]
p_l = sp.Symbol("p_l", positive=True)
z = sp.Symbol("z", real=True)
s = sp.Symbol("s", real=True)
h_w = sp.Symbol("h'_w", real=True)
h_l = sp.Symbol("h'_l", real=True)
NAMED = {"r_w": r_w, "r_l": r_l, "p_w": p_w, "p_l": p_l, "z": z, "s": s, "h'_w": h_w, "h'_l": h_l}
