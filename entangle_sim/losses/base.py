"""Backends and hyperparameters of the loss registry: the math vocabulary `F` every builder uses
(`JAX` for the JAX loss, `SYM` for the SymPy expression), the pair variables `PairVars`, the
keyword-only hyperparameter `Hyper` with its range check, and TRL's f-divergence score map.

    >>> float(score(1.0, JAX, "forward_kl"))     # 1 - e^-1
    0.6321205...
"""
from __future__ import annotations

import difflib
import math
from types import SimpleNamespace
from typing import Any
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import sympy as sp

from ..symbolic.functions import Log1mExp, LogSigmoid, Sigmoid, jax_log1mexp
from ..symbolic.symbols import hyper_symbol

# --------------------------------------------------------------------------------------------
# Backends: the small vocabulary the loss builders use.


def _jax_relu(x):
    return jnp.maximum(x, 0.0)


def _jax_expm1_diff(a, b):
    """expm1(a) - expm1(b) without overflow: once max(a, b) exceeds C (80 in float32, 700 in
    float64) it returns e^C (e^{a-m} - e^{b-m}), m = max(a, b): the true value scaled down by
    e^{m-C}, same sign, still beyond every saturation point of the losses that use it (AlphaPO).
    Both branches stay finite, so gradients never pick up inf * 0 = NaN."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    dtype = jnp.result_type(a, b)
    C = 80.0 if jnp.finfo(dtype).bits <= 32 else 700.0
    m = jnp.maximum(a, b)
    big = m > C
    small = jnp.expm1(jnp.where(big, 0.0, a)) - jnp.expm1(jnp.where(big, 0.0, b))
    m_b = jnp.where(big, m, 0.0)
    scaled = jnp.exp(C) * (jnp.exp(jnp.where(big, a, 0.0) - m_b) - jnp.exp(jnp.where(big, b, 0.0) - m_b))
    return jnp.where(big, scaled, small)


JAX = SimpleNamespace(
    name="jax", log_sigmoid=jax.nn.log_sigmoid, sigmoid=jax.nn.sigmoid, exp=jnp.exp, log=jnp.log,
    expm1=jnp.expm1, log1mexp=jax_log1mexp, relu=_jax_relu, minimum=jnp.minimum,
    expm1_diff=_jax_expm1_diff,
)

SYM = SimpleNamespace(
    name="sympy", log_sigmoid=LogSigmoid, sigmoid=Sigmoid, exp=sp.exp, log=sp.log,
    expm1=lambda x: sp.exp(x) - 1, log1mexp=Log1mExp, relu=lambda x: sp.Max(0, x), minimum=sp.Min,
    expm1_diff=lambda a, b: sp.exp(a) - sp.exp(b),
)


class PairVars(SimpleNamespace):
    """The pair's variables in one namespace; `r_w`, `r_l` are the log-ratios l - l_ref."""

    @property
    def r_w(self):
        return self.chosen_logps - self.ref_chosen_logps

    @property
    def r_l(self):
        return self.rejected_logps - self.ref_rejected_logps

    @property
    def avg_w(self):
        return self.chosen_logps / self.chosen_len

    @property
    def avg_l(self):
        return self.rejected_logps / self.rejected_len


# --------------------------------------------------------------------------------------------
# Hyperparameters


@dataclasses.dataclass(frozen=True)
class Hyper:
    """A keyword-only hyperparameter with its default and valid range.

    Numeric ranges are [lo, hi] with open ends where `lo_open` / `hi_open`; string ones list
    `choices`. `structural` hyperparameters select the formula (kept as values in derivations).
    """

    name: str
    default: Any
    doc: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] | None = None
    keep_value: bool = False  # derivations substitute the value (it changes the formula's shape)
    note: str = ""  # appended to a refusal (e.g. why TRL refuses a choice)

    @property
    def structural(self) -> bool:
        return self.choices is not None

    def check(self, value) -> None:
        """Raise ValueError if a concrete value is invalid; traced values are not checked."""
        if self.choices is not None:
            if not isinstance(value, str) or value not in self.choices:
                raise ValueError(f"hyperparameter {self.name}={value!r} is not one of {list(self.choices)}"
                                 + (f" ({self.note})" if self.note else ""))
            return
        if isinstance(value, jax.core.Tracer):
            return
        if isinstance(value, sp.Basic):
            if value.is_number:  # an exact number: checked like a float; symbols pass
                self.check(float(value))
            return
        if isinstance(value, (str, bytes, bool)) or value is None:
            raise TypeError(f"hyperparameter {self.name}={value!r} must be a number, "
                            f"not {type(value).__name__}")
        try:
            x = np.asarray(value, dtype=float)
        except (TypeError, ValueError):
            raise TypeError(f"hyperparameter {self.name}={value!r} is not a number") from None
        if x.size == 0:
            raise ValueError(f"hyperparameter {self.name} is empty")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"hyperparameter {self.name}={value!r} must be finite")
        lo_v, hi_v = float(x.min()), float(x.max())
        if self.lo is not None and (lo_v < self.lo or (self.lo_open and lo_v == self.lo)):
            raise ValueError(f"hyperparameter {self.name}={value!r} out of range {self.range_str()}")
        if self.hi is not None and (hi_v > self.hi or (self.hi_open and hi_v == self.hi)):
            raise ValueError(f"hyperparameter {self.name}={value!r} out of range {self.range_str()}")

    def range_str(self) -> str:
        if self.choices is not None:
            return "{" + ", ".join(self.choices) + "}"
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        return ("(" if self.lo_open or self.lo is None else "[") + f"{lo}, {hi}" + (
            ")" if self.hi_open or self.hi is None else "]")

    def symbol(self) -> sp.Symbol:
        return hyper_symbol(self.name, self.lo, not self.lo_open)


def beta_hyper(default=0.1):
    return Hyper("beta", default, "inverse temperature / scale of the margin", lo=0.0, lo_open=True)


#: The TRL release line the registry follows, and the release its equivalence tests call.
TRL_SEMANTICS = "TRL 1.10-1.16"
TRL_TESTED = "1.16.0"

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
#: Losses for which TRL >= 1.10 accepts an f-divergence (the others raise at configuration time).
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
FDIV = Hyper("f_divergence_type", "reverse_kl", "score map phi(r) of the log-ratio", choices=F_DIVERGENCES)
# The absolute-score losses use raw log-ratios: the f-DPO reparameterisation leaves a beta log Z(x)
# term that cancels only in phi_w - phi_l, so TRL >= 1.10 refuses any other f-divergence for them.
FDIV_RKL = Hyper("f_divergence_type", "reverse_kl", "only reverse_kl (raw log-ratios)",
                 choices=("reverse_kl",),
                 note="TRL >= 1.10 supports an f-divergence only with " + ", ".join(F_DIVERGENCE_LOSSES))
FALPHA = Hyper("f_alpha_divergence_coef", 0.5, "alpha-divergence coefficient a (|a-1| < 1e-6: reverse KL)",
               lo=None)
EPS = Hyper("label_smoothing", 0.0, "label smoothing epsilon", lo=0.0, hi=0.5, hi_open=True, keep_value=True)
CPO_ALPHA = Hyper("cpo_alpha", 1.0, "weight of the token-mean NLL on the chosen completion", lo=0.0)
ALPHA_PO = Hyper("alpha", 0.0, "AlphaPO reward shape: u = (1 - p^-alpha)/alpha (0: plain log-prob)",
                 keep_value=True)
ALPHA_CLAMP = 80.0  # TRL clamps the alpha-divergence exponent at 80 in fp32/bf16
ALPHA_FALLBACK = 1e-6  # TRL: |a - 1| < 1e-6 is the reverse-KL limit


def alpha_is_one(a):
    """True/False for a concrete a, None for a symbol or a traced value."""
    if isinstance(a, sp.Basic):
        return bool(abs(a - 1) < ALPHA_FALLBACK) if a.is_number else None
    if isinstance(a, jax.core.Tracer):
        return None
    return bool(abs(float(a) - 1.0) < ALPHA_FALLBACK)


def score(r, F, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    """TRL >= 1.10 score map phi(r) (vanishes at r = 0): reverse_kl r; forward_kl 1 - e^-r;
    js log 2 + log sigma(r); alpha (e^{min((a-1) r, 80)} - 1)/(a-1), reverse KL when |a-1| < 1e-6
    (on every path: concrete a, traced a in JAX, symbolic a in SymPy as a Piecewise).

    TRL 1.9 dropped the constants (-e^-r, log sigma(r), e^{(a-1)r}/(a-1)); they cancel in
    D = phi_w - phi_l but not in the length-normalised Dbar of `ipo` and `sigmoid_norm`.
    TRL evaluates the alpha-divergence exponential in float32; the registry keeps the input dtype.
    """
    if f_divergence_type == "reverse_kl":
        return r
    if f_divergence_type == "forward_kl":
        return 1 - F.exp(-r)
    if f_divergence_type == "js_divergence":
        return (sp.log(2) if F.name == "sympy" else math.log(2)) + F.log_sigmoid(r)
    if f_divergence_type == "alpha_divergence":
        a = f_alpha_divergence_coef
        one = alpha_is_one(a)
        if one:
            return r
        if one is False:
            return F.expm1(F.minimum((a - 1) * r, ALPHA_CLAMP)) / (a - 1)
        if F.name == "sympy":
            return sp.Piecewise((r, sp.Abs(a - 1) < sp.Float(ALPHA_FALLBACK)),
                                (F.expm1(F.minimum((a - 1) * r, ALPHA_CLAMP)) / (a - 1), True))
        near = jnp.abs(a - 1) < ALPHA_FALLBACK
        a_safe = jnp.where(near, 0.5, a)  # keeps the unused branch (and its gradient) finite
        alpha_score = F.expm1(F.minimum((a_safe - 1) * r, ALPHA_CLAMP)) / (a_safe - 1)
        return jnp.where(near, r, alpha_score)
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; valid: {list(F_DIVERGENCES)}")


def scores(v, F, hp):
    kw = {k: hp[k] for k in ("f_divergence_type", "f_alpha_divergence_coef") if k in hp}
    return score(v.r_w, F, **kw), score(v.r_l, F, **kw)


def did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""
