"""Registry of margin-based preference losses.

Every loss is written ONCE, as a builder `build(v, F, **hp)` over a math backend `F`:
with `F = JAX` it is the JAX per-pair loss, with `F = SYM` it is the SymPy expression that the
symbolic engine differentiates. One source of truth, two backends; the tests prove the SymPy
derivatives equal `jax.grad` and finite differences, and match reference formulas.

TRL equivalence: each entry with a `trl` equivalent follows the current TRL line (1.10-1.16;
`trl_version` says so) and is checked against TRL 1.16.0's own loss code (value and both
incentives, per pair and batch, float64). Changes from TRL 1.9 (not kept as variants): the
f-divergence score maps keep their constants (1 - e^-r, log 2 + log sigma(r),
(e^{(a-1)r} - 1)/(a-1)), which matter in the length-normalised `ipo` / `sigmoid_norm`;
`nca_pair`, `bco_pair`, `sppo_hard`, `apo_down` use raw log-ratios, and they, `aot`,
`aot_unpaired` and `apo_zero` refuse any f-divergence but reverse KL (TRL raises too). Every
path (JAX, traced JAX, SymPy) falls back to reverse KL when |a - 1| < 1e-6. Conventions: KTO
is a mean over rows in TRL (`reduction="row_mean"`; the default `pair_sum` is twice that);
ORPO's batch NLL is one token mean over all chosen prompt+completion tokens; TRL evaluates
alpha-divergence scores (it cannot run them in float64) and ORPO's odds ratio in float32, the
registry in the input dtype. TPO (`tpo*`): TRL's contrastive term; the gold-response NLL needs
a third response and is not modelled (see the TPO section).

Conventions (TRL): `chosen_logps` / `rejected_logps` are SUMMED completion log-probs `l_w`, `l_l`;
`ref_*` the reference model's; `chosen_len` / `rejected_len` the completion token counts `n_w`,
`n_l` (>= 1). A per-pair loss is the loss of a batch holding that pair alone; `LossSpec.batch`
gives TRL's total for a batch (the mean of per-pair losses, except the batch-coupled `aot`,
`aot_unpaired`, `sft` and the token-mean NLL terms of CPO/RRHF/`simpo`).

Example:
    >>> from entangle_sim import losses
    >>> dpo = losses.get("sigmoid")            # DPOTrainer:sigmoid, beta=0.1
    >>> float(dpo(-10.0, -12.0, -11.0, -11.0, beta=0.1))   # -log sigma(0.1 * 2)
    0.598138...

Size: the registry of ~30 losses, each a few lines next to the ones it is compared with; one file
keeps every definition and its TRL reference side by side.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from types import SimpleNamespace
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import sympy as sp

from . import regimes
from .symbolic.dynamics import derive as _symbolic_derive, set_name_resolver
from .symbolic.functions import Log1mExp, LogSigmoid, Sigmoid, jax_log1mexp
from .symbolic.symbols import PAIR_VARS, hyper_symbol
from .types import PairState

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


def _beta(default=0.1):
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
_ALPHA_FALLBACK = 1e-6  # TRL: |a - 1| < 1e-6 is the reverse-KL limit


def _alpha_is_one(a):
    """True/False for a concrete a, None for a symbol or a traced value."""
    if isinstance(a, sp.Basic):
        return bool(abs(a - 1) < _ALPHA_FALLBACK) if a.is_number else None
    if isinstance(a, jax.core.Tracer):
        return None
    return bool(abs(float(a) - 1.0) < _ALPHA_FALLBACK)


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
        one = _alpha_is_one(a)
        if one:
            return r
        if one is False:
            return F.expm1(F.minimum((a - 1) * r, ALPHA_CLAMP)) / (a - 1)
        if F.name == "sympy":
            return sp.Piecewise((r, sp.Abs(a - 1) < sp.Float(_ALPHA_FALLBACK)),
                                (F.expm1(F.minimum((a - 1) * r, ALPHA_CLAMP)) / (a - 1), True))
        near = jnp.abs(a - 1) < _ALPHA_FALLBACK
        a_safe = jnp.where(near, 0.5, a)  # keeps the unused branch (and its gradient) finite
        alpha_score = F.expm1(F.minimum((a_safe - 1) * r, ALPHA_CLAMP)) / (a_safe - 1)
        return jnp.where(near, r, alpha_score)
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; valid: {list(F_DIVERGENCES)}")


def _scores(v, F, hp):
    kw = {k: hp[k] for k in ("f_divergence_type", "f_alpha_divergence_coef") if k in hp}
    return score(v.r_w, F, **kw), score(v.r_l, F, **kw)


# --------------------------------------------------------------------------------------------
# The spec


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """A registered loss: builder, hyperparameters, TRL equivalent and description.

    Call it like a TRL loss: `spec(chosen_logps, rejected_logps, ref_chosen_logps,
    ref_rejected_logps, chosen_len, rejected_len, *, beta=..., ...)` -> per-pair loss, any
    broadcastable shapes. `spec.batch(...)` -> TRL's scalar total for a batch.
    """

    name: str
    description: str
    build: Callable[..., Any]
    hypers: tuple[Hyper, ...]
    trl: str | None = None
    uses_reference: bool = True
    batch_coupled: bool = False
    batch_build: Callable[..., Any] | None = None
    margin: Callable[..., Any] | None = None  # transformed margin z for margin-form losses
    nll_weight: str | None = None  # hyperparameter holding a token-mean NLL weight (batch form)
    nll: Callable[..., Any] | None = None  # the additive NLL regulariser inside the loss, if any
    aliases: tuple[str, ...] = ()
    reference: str = ""  # where the formula comes from
    trl_version: str | None = None  # the TRL release line whose code this entry equals
    notes: str = ""  # conventions a user must know (row normalisation, dtype, ...)

    # ---- hyperparameters
    @property
    def defaults(self) -> dict[str, Any]:
        return {h.name: h.default for h in self.hypers}

    def hyper(self, name: str) -> Hyper:
        for h in self.hypers:
            if h.name == name:
                return h
        raise ValueError(f"loss {self.name!r} has no hyperparameter {name!r}"
                         + _did_you_mean(name, [h.name for h in self.hypers])
                         + f"; valid: {[h.name for h in self.hypers]}")

    def resolve(self, **hp) -> dict[str, Any]:
        """Defaults updated with `hp`, each checked (unknown names and bad values raise)."""
        out = self.defaults
        for k, val in hp.items():
            self.hyper(k).check(val)
            out[k] = val
        return out

    def bind(self, **hp) -> "ResolvedLoss":
        """This loss with its hyperparameters resolved once: defaults filled in, every value checked
        (a misspelt name raises with a suggestion), formula-selecting values split from numeric ones.

            >>> dpo = get("sigmoid").bind(beta=0.5)
            >>> dpo.fixed, dpo.numeric
            ((('f_divergence_type', 'reverse_kl'),), (('beta', 0.5), ('f_alpha_divergence_coef', 0.5)))
        """
        full = self.resolve(**hp)
        fixed = tuple((h.name, full[h.name]) for h in self.hypers if h.structural or h.keep_value)
        numeric = tuple((h.name, full[h.name]) for h in self.hypers if not (h.structural or h.keep_value))
        return ResolvedLoss(self, fixed, numeric)

    # ---- JAX (TRL-style calls; `bind(**hp)` once and `.loss(state)` is the same without re-checking)
    def __call__(self, chosen_logps, rejected_logps, ref_chosen_logps=0.0, ref_rejected_logps=0.0,
                 chosen_len=1.0, rejected_len=1.0, *, prompt_logps=0.0, prompt_len=0.0, **hp):
        return self.bind(**hp).loss(PairState(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                              chosen_len, rejected_len, prompt_logps, prompt_len))

    def batch(self, chosen_logps, rejected_logps, ref_chosen_logps=0.0, ref_rejected_logps=0.0,
              chosen_len=1.0, rejected_len=1.0, *, prompt_logps=0.0, prompt_len=0.0, **hp):
        """TRL's total loss over a batch of pairs ([B] inputs -> scalar)."""
        return self.bind(**hp).batch(PairState(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                               chosen_len, rejected_len, prompt_logps, prompt_len))

    # ---- SymPy
    def sym_hypers(self, **hp) -> dict[str, Any]:
        """Hyperparameter values for a derivation: given values (exact rationals), else symbols.

        Numeric hyperparameters not given stay symbols (their ranges become assumptions);
        structural ones (`f_divergence_type`) and shape-changing ones (`alpha`) take defaults.
        """
        full = {}
        for h in self.hypers:
            if h.name in hp:
                h.check(hp[h.name])
                val = hp[h.name]
                full[h.name] = val if (h.structural or isinstance(val, sp.Basic)) else sp.nsimplify(val)
            else:
                full[h.name] = (h.default if h.structural else sp.nsimplify(h.default) if h.keep_value
                                else h.symbol())
        for k in hp:
            if k not in full:
                self.hyper(k)  # raises with a did-you-mean
        return full

    def symbolic(self, **hp) -> sp.Expr:
        """The per-pair loss as a SymPy expression in the theory's symbols (docs/theory.md §1) (see `sym_hypers`)."""
        return self.build(PairVars(**PAIR_VARS), SYM, **self.sym_hypers(**hp))

    def symbolic_margin(self, **hp):
        """The transformed margin z of a margin-form loss (None if the loss has no single margin)."""
        if self.margin is None:
            return None
        return self.margin(PairVars(**PAIR_VARS), SYM, **self.sym_hypers(**hp))

    def symbolic_nll(self, **hp):
        """The NLL regulariser part of the loss as SymPy (0 if none): L = margin part + NLL part."""
        if self.nll is None:
            return sp.S.Zero
        return self.nll(PairVars(**PAIR_VARS), SYM, **self.sym_hypers(**hp))

    def hyper_symbols(self) -> dict[str, sp.Symbol]:
        return {h.name: h.symbol() for h in self.hypers if not (h.structural or h.keep_value)}

    def info(self) -> dict[str, Any]:
        """JSON-ready summary (name, TRL equivalent, hyperparameters with defaults and ranges)."""
        return {
            "name": self.name,
            "trl": self.trl,
            "trl_version": self.trl_version,
            "notes": self.notes,
            "description": self.description,
            "aliases": list(self.aliases),
            "uses_reference": self.uses_reference,
            "batch_coupled": self.batch_coupled,
            "hyperparameters": {h.name: {"default": h.default, "range": h.range_str(), "doc": h.doc}
                                for h in self.hypers},
        }


class Prediction(NamedTuple):
    """The first-order account of one plain gradient step at a state (docs/theory.md R3, R8, R10).

    d_w, d_l: incentives; delta_chosen = eta (d_w G_ww - d_l G_wl), delta_rejected =
    eta (d_w G_wl - d_l G_ll), delta_margin their difference, delta_loss = -eta |grad L|^2;
    regime: int code of `entangle_sim.regimes` (all broadcast to the state's shape).
    """

    d_w: Any
    d_l: Any
    delta_chosen: Any
    delta_rejected: Any
    delta_margin: Any
    delta_loss: Any
    regime: Any


@dataclasses.dataclass(frozen=True)
class ResolvedLoss:
    """A loss with its hyperparameters resolved once (`LossSpec.bind`): frozen and hashable (a
    static jit argument). `fixed` holds the values that select the formula (choices such as
    `f_divergence_type`, shape-changing values such as AlphaPO's `alpha`): the derivation is made
    for them. `numeric` holds the others: plain numbers in the formulas (`beta`, ...), which
    `replace` may swap for traced values (e.g. a vmapped beta) without re-deriving.

    Every method takes the pair variables as one `PairState` (`PairState.of(..., reference=...)`):

        >>> from entangle_sim.types import PairState
        >>> dpo = get("sigmoid").bind(beta=0.1)
        >>> s = PairState.of(-10.0, -12.0, reference=(-11.0, -11.0))
        >>> round(float(dpo.loss(s)), 6)                       # -log sigma(0.1 * 2)
        0.598139
        >>> p = dpo.predict(s, (1.0, 0.5, 2.0), eta=1.0)     # (G_ww, G_wl, G_ll)
        >>> round(float(p.delta_chosen), 6)                  # eta d (G_ww - G_wl), d = 0.1 sigma(-0.2)
        0.022508
    """

    spec: LossSpec
    fixed: tuple
    numeric: tuple

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def hp(self) -> dict[str, Any]:
        """Every hyperparameter (name -> value), as the builders take them."""
        given = {**dict(self.fixed), **dict(self.numeric)}
        return {h.name: given[h.name] for h in self.spec.hypers}

    def replace(self, **numeric) -> "ResolvedLoss":
        """The same loss with some numeric hyperparameters replaced (checked; traced values pass)."""
        names_ = dict(self.numeric)
        for k, val in numeric.items():
            h = self.spec.hyper(k)
            if k not in names_:
                raise ValueError(f"hyperparameter {k!r} of loss {self.name!r} selects the formula; "
                                 f"bind the loss again with it")
            h.check(val)
            names_[k] = val
        return ResolvedLoss(self.spec, self.fixed, tuple(names_.items()))

    # ---- JAX values
    def loss(self, state) -> Any:
        """Per-pair loss [...] of a `PairState`."""
        return self.spec.build(PairVars(**state.as_arrays()._asdict()), JAX, **self.hp)

    def batch(self, state) -> Any:
        """TRL's total loss of a batch of pairs ([B] state -> scalar)."""
        v = PairVars(**state.broadcast()._asdict())
        hp = self.hp
        if self.spec.batch_build is not None:
            return self.spec.batch_build(v, JAX, **hp)
        per_pair = self.spec.build(v, JAX, **hp)
        if self.spec.nll_weight is None:
            return per_pair.mean()
        # TRL's NLL is a token mean over the whole batch, not a mean of per-pair token means.
        w = hp[self.spec.nll_weight]
        per_pair_nll = -v.chosen_logps / v.chosen_len
        return (per_pair - w * per_pair_nll).mean() + w * (-v.chosen_logps.sum() / v.chosen_len.sum())

    def margin(self, state) -> Any:
        """The transformed margin z [...] of a margin-form loss (ValueError for the others)."""
        if self.spec.margin is None:
            raise ValueError(f"loss {self.name!r} has no single margin")
        return self.spec.margin(PairVars(**state.as_arrays()._asdict()), JAX, **self.hp)

    # ---- the symbolic engine's formulas, evaluated
    @property
    def derivation(self):
        """`symbolic.derive` of this loss at its formula-selecting values (cached there)."""
        return _symbolic_derive(self.spec, **dict(self.fixed))

    def values(self, state, gram=None, eta=None) -> dict[str, Any]:
        """Keyword values of the derivation's formulas: the pair variables, the numeric
        hyperparameters and, when given, the Gram entries and the step size."""
        out = {**state.as_arrays()._asdict(), **dict(self.numeric)}
        if gram is not None:
            G_ww, G_wl, G_ll = (gram.G_ww, gram.G_wl, gram.G_ll) if hasattr(gram, "G_ww") else gram
            out.update(G_ww=jnp.asarray(G_ww), G_wl=jnp.asarray(G_wl), G_ll=jnp.asarray(G_ll))
        if eta is not None:
            out["eta"] = jnp.asarray(eta)
        return out

    def incentives(self, state) -> tuple[Any, Any]:
        """(d_w, d_l) = (-dL/dl_w, +dL/dl_l) from the symbolic engine, broadcast to the state's shape
        (`losses.incentives` is the autodiff account the tests compare it with)."""
        der, vals = self.derivation, self.values(state)
        shape = jnp.broadcast_shapes(*(jnp.shape(x) for x in state))
        return jnp.broadcast_to(der.d_w(**vals), shape), jnp.broadcast_to(der.d_l(**vals), shape)

    def predict(self, state, gram, eta) -> Prediction:
        """One plain gradient step of size eta on this pair alone, to first order (R3, R8, R10).

        gram: anything with G_ww, G_wl, G_ll ([...] each; e.g. `geometry.PairGram`) or a triple.
        """
        der, vals = self.derivation, self.values(state, gram, eta)
        shape = jnp.broadcast_shapes(*(jnp.shape(x) for x in vals.values()))
        out = [jnp.broadcast_to(getattr(der, k)(**vals), shape) for k in
               ("d_w", "d_l", "delta_chosen", "delta_rejected", "delta_margin", "delta_loss")]
        return Prediction(*out, regime=regimes.classify(out[2], out[3]))

    def report(self, state, gram, eta) -> dict[str, Any]:
        """`predict` at one state as JSON-ready floats (the body of `entangle-sim predict`): d_w, d_l,
        delta_chosen, delta_rejected, delta_margin, regime, case, loss_value, delta_loss, delta_z
        (None for losses without a single margin), hyperparameters. ValueError if a value is not finite."""
        p = self.predict(state, gram, eta)
        der, vals = self.derivation, self.values(state, gram, eta)
        out = {"loss": self.name}
        for k in ("d_w", "d_l", "delta_chosen", "delta_rejected", "delta_margin"):
            out[k] = float(getattr(p, k))
        out["regime"] = regimes.REGIMES[int(p.regime)]
        out["case"] = regimes.CASE_OF_REGIME[out["regime"]]
        out["loss_value"] = float(der.loss(**vals))
        out["delta_loss"] = float(p.delta_loss)
        out["delta_z"] = None if der.delta_z is None else float(der.delta_z(**vals))
        out["hyperparameters"] = self.hp
        for k in ("d_w", "d_l", "delta_chosen", "delta_rejected", "delta_margin", "loss_value"):
            if not math.isfinite(out[k]):
                raise ValueError(f"{k} is not finite at this state ({out[k]}); check the inputs")
        return out

    def step_weight(self, state, d_w, d_l) -> Any:
        """s = -m'(z) = d_l / h'_l for margin-form losses (h'_l = -dz/dl_l), else (d_w + d_l) / 2."""
        if self.spec.margin is None:
            return 0.5 * (d_w + d_l)
        st = state.as_arrays()

        def z(lw, ll):
            return self.margin(st._replace(chosen_logps=lw, rejected_logps=ll)).sum()

        hl = -jax.grad(z, argnums=1)(st.chosen_logps, st.rejected_logps)
        return jnp.where(hl != 0, d_l / jnp.where(hl != 0, hl, 1.0), 0.5 * (d_w + d_l))


# --------------------------------------------------------------------------------------------
# Registry

_REGISTRY: dict[str, LossSpec] = {}
_ALIASES: dict[str, str] = {}


def register(spec: LossSpec) -> LossSpec:
    for key in (spec.name, *spec.aliases):
        if key in _REGISTRY or key in _ALIASES:
            raise ValueError(f"loss name {key!r} registered twice")
    _REGISTRY[spec.name] = spec
    for a in spec.aliases:
        _ALIASES[a] = spec.name
    return spec


def names() -> list[str]:
    """Canonical names of every registered loss, in registration order."""
    return list(_REGISTRY)


def aliases() -> dict[str, str]:
    """alias -> canonical name."""
    return dict(_ALIASES)


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def get(name: str) -> LossSpec:
    """The loss registered under `name` or one of its aliases; ValueError with a suggestion."""
    if isinstance(name, LossSpec):
        return name
    if not isinstance(name, str):
        raise TypeError(f"loss name must be a string (or a LossSpec), got {name!r} ({type(name).__name__})")
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise ValueError(f"unknown loss {name!r}" + _did_you_mean(name, [*_REGISTRY, *_ALIASES])
                         + "; run `entangle-sim losses` for the list")
    return _REGISTRY[key]


set_name_resolver(get, names)  # symbolic.derive("name") resolves here; the engine never imports us


class LossDefinitionError(ValueError):
    """A user loss (`define`) that cannot work; the message names the problem and the state."""


def define(name: str, fn: Callable | None = None, *, hyperparameters=(), description: str | None = None,
           trl: str | None = None, margin: Callable | None = None, nll: Callable | None = None,
           reference: str = "", replace: bool = False, check: bool = True):
    """Define and register your own loss, written once like the built-in losses.

    The builder `fn(v, F, *, <hyperparameters>)` returns the per-pair loss as a formula in
      v: the pair variables  v.chosen_logps, v.rejected_logps (summed log-probs l_w, l_l <= 0),
         v.ref_chosen_logps, v.ref_rejected_logps, v.chosen_len, v.rejected_len (n >= 1),
         v.prompt_logps, v.prompt_len, and v.r_w = l_w - l_w^ref, v.r_l, v.avg_w = l_w/n_w, v.avg_l;
      F: the math backend  F.log_sigmoid, F.sigmoid, F.exp, F.log, F.expm1, F.log1mexp, F.relu,
         F.minimum, plus + - * / ** and abs. Nothing else: no numpy/jax/math calls, no if/else
         on values. With F = JAX it is the JAX loss, with F = SYM the SymPy expression that
         `entangle_sim.symbolic.derive` differentiates, so the theory and the code cannot drift.
    Hyperparameters are the keyword-only arguments: declare them as `losses.Hyper(name, default,
    doc, lo=..., hi=..., lo_open=..., hi_open=...)` (a range; `lo >= 0` also tells SymPy the sign)
    or a dict {name: default}; undeclared keyword-only arguments with numeric defaults are
    unbounded. `margin=` / `nll=` (same signature) give the transformed margin z and an additive
    NLL part, for the step weight s = -m'(z). Use as a function or a decorator:

        >>> from entangle_sim import losses
        >>> LAM = losses.Hyper("lam", 0.5, "shift", lo=0, hi=1, lo_open=True)
        >>> @losses.define("my_shift", hyperparameters=[LAM])
        ... def my_shift(v, F, *, beta=0.1, lam):
        ...     return -F.log_sigmoid(beta * v.r_w - lam * beta * v.r_l)
        >>> float(my_shift(-10.0, -12.0, -11.0, -11.0))   # -log sigma(0.1 * 1 + 0.5 * 0.1 * 1)
        0.62095...

    Refused with a `LossDefinitionError` (a ValueError) naming the problem: a name of a built-in
    (or of another user loss, unless `replace=True`; re-running the same definition is allowed),
    a function the backend lacks, direct numpy/jax/math calls, branching on values, a
    discontinuous or non-differentiable formula, and (with `check=True`) non-finite values or
    gradients, or JAX and SymPy disagreeing, at ordinary states (policy = reference among them).
    The thorough checks are `entangle_sim.testing.check_loss`. Returns the registered LossSpec.
    """
    from . import _userloss

    return _userloss.define(name, fn, hyperparameters=hyperparameters, description=description, trl=trl,
                            margin=margin, nll=nll, reference=reference, replace=replace, check=check)


def user_names() -> list[str]:
    """Names of the losses defined with `define` (in definition order)."""
    from . import _userloss

    return _userloss.user_names()


def undefine(name: str) -> None:
    """Remove a loss defined with `define` (built-in losses cannot be removed)."""
    from . import _userloss

    _userloss.undefine(name)


def _reg(name, description, hypers, trl=None, **kw):
    if trl is not None:
        kw.setdefault("trl_version", f"{TRL_SEMANTICS} (tested against {TRL_TESTED})")

    def deco(build):
        register(LossSpec(name=name, description=description, build=build, hypers=tuple(hypers),
                          trl=trl, **kw))
        return build
    return deco


_DPO_F = (FDIV, FALPHA)

# ---------------- DPOTrainer (TRL 1.10-1.16 `_compute_loss`) ----------------


@_reg("sigmoid", "DPO: -log sigma(beta D)", (_beta(), *_DPO_F), trl="DPOTrainer:sigmoid",
      aliases=("dpo",), reference="theory §2.2 DPO, §10.2 sigmoid",
      margin=lambda v, F, beta, **hp: beta * (lambda s: s[0] - s[1])(_scores(v, F, hp)))
def _sigmoid(v, F, *, beta, **hp):
    phi_w, phi_l = _scores(v, F, hp)
    return -F.log_sigmoid(beta * (phi_w - phi_l))


@_reg("hinge", "SLiC/RSO hinge: max(0, 1 - beta D)", (_beta(), *_DPO_F), trl="DPOTrainer:hinge",
      reference="theory §10.2 hinge",
      margin=lambda v, F, beta, **hp: beta * (lambda s: s[0] - s[1])(_scores(v, F, hp)))
def _hinge(v, F, *, beta, **hp):
    phi_w, phi_l = _scores(v, F, hp)
    return F.relu(1 - beta * (phi_w - phi_l))


def _dbar(v, F, hp):
    phi_w, phi_l = _scores(v, F, hp)
    return phi_w / v.chosen_len - phi_l / v.rejected_len


@_reg("ipo", "IPO (TRL, length-averaged): (Dbar - 1/(2 beta))^2", (_beta(), *_DPO_F),
      trl="DPOTrainer:ipo", aliases=("ipo_avg",), reference="theory §2.2 IPO (TRL form), §10.2 ipo",
      margin=lambda v, F, beta, **hp: _dbar(v, F, hp))
def _ipo(v, F, *, beta, **hp):
    return (_dbar(v, F, hp) - 1 / (2 * beta)) ** 2


EXO_EPS = Hyper("label_smoothing", 1e-3, "epsilon > 0 (TRL raises at its default 0; v0.11 used 1e-3)",
                lo=0.0, hi=1.0, lo_open=True, hi_open=True)


@_reg("exo_pair", "EXO (pairwise): KL(q || 1-eps label), q = sigma(beta D)", (_beta(), EXO_EPS, *_DPO_F),
      trl="DPOTrainer:exo_pair", reference="theory §10.2 exo_pair")
def _exo_pair(v, F, *, beta, label_smoothing, **hp):
    phi_w, phi_l = _scores(v, F, hp)
    z = beta * (phi_w - phi_l)
    # Log space: q = e^{log sigma(z)}, 1 - q = e^{log sigma(-z)}. Autodiff then forms
    # dq/dz = q sigma(-z) and d(1-q)/dz = -(1-q) sigma(z), keeping the e^{-|z|} factors that
    # sigma(z)(1 - sigma(z)) rounds to 0 at large |z| (incentives exact to beta*D ~ 700).
    log_q, log_1mq = F.log_sigmoid(z), F.log_sigmoid(-z)
    eps = label_smoothing
    return F.exp(log_q) * (log_q - F.log(1 - eps)) + F.exp(log_1mq) * (log_1mq - F.log(eps))


@_reg("nca_pair", "NCA (pairwise): absolute per-response terms on raw log-ratios", (_beta(), FDIV_RKL),
      trl="DPOTrainer:nca_pair", reference="TRL nca_pair (raw log-ratios; TRL 1.9 applied phi)")
def _nca_pair(v, F, *, beta, **hp):
    return (-F.log_sigmoid(beta * v.r_w) - F.log_sigmoid(-beta * v.r_w) / 2
            - F.log_sigmoid(-beta * v.r_l) / 2)


@_reg("robust", "Robust DPO: unbiased under label-flip rate eps", (_beta(), EPS, *_DPO_F),
      trl="DPOTrainer:robust", reference="theory §10.2 robust",
      margin=lambda v, F, beta, **hp: beta * (lambda s: s[0] - s[1])(_scores(v, F, hp)))
def _robust(v, F, *, beta, label_smoothing, **hp):
    phi_w, phi_l = _scores(v, F, hp)
    z, eps = beta * (phi_w - phi_l), label_smoothing
    return (-(1 - eps) * F.log_sigmoid(z) + eps * F.log_sigmoid(-z)) / (1 - 2 * eps)


@_reg("bco_pair", "BCO (pairwise): -log sigma(beta r_w) - log sigma(-beta r_l)", (_beta(), FDIV_RKL),
      trl="DPOTrainer:bco_pair", reference="TRL bco_pair (raw log-ratios, no running-mean shift)")
def _bco_pair(v, F, *, beta, **hp):
    return -F.log_sigmoid(beta * v.r_w) - F.log_sigmoid(-beta * v.r_l)


@_reg("sppo_hard", "SPPO (hard labels): (r_w - 1/(2beta))^2 + (r_l + 1/(2beta))^2",
      (_beta(), FDIV_RKL), trl="DPOTrainer:sppo_hard", reference="TRL sppo_hard (raw log-ratios)")
def _sppo_hard(v, F, *, beta, **hp):
    return (v.r_w - 1 / (2 * beta)) ** 2 + (v.r_l + 1 / (2 * beta)) ** 2


def _aot_loss(x, F, beta, eps):
    return -(1 - eps) * F.log_sigmoid(beta * x) - eps * F.log_sigmoid(-beta * x)


def _aot_batch(v, F, *, beta, label_smoothing, **hp):
    # Both sides sorted independently along the batch (raw log-probs; ignores f-divergence).
    x = jnp.sort(v.chosen_logps - v.rejected_logps) - jnp.sort(v.ref_chosen_logps - v.ref_rejected_logps)
    return _aot_loss(x, F, beta, label_smoothing).mean()


def _aot_unpaired_batch(v, F, *, beta, label_smoothing, **hp):
    x = jnp.sort(v.r_w) - jnp.sort(v.r_l)
    return _aot_loss(x, F, beta, label_smoothing).mean()


@_reg("aot", "AOT (paired): sorted margins vs sorted reference margins (batch-coupled)", (_beta(), EPS, FDIV_RKL),
      trl="DPOTrainer:aot", batch_coupled=True, batch_build=_aot_batch, reference="theory §10.2 aot")
def _aot(v, F, *, beta, label_smoothing, **hp):
    # A batch of one pair: the sort is the identity.
    return _aot_loss((v.chosen_logps - v.rejected_logps) - (v.ref_chosen_logps - v.ref_rejected_logps),
                     F, beta, label_smoothing)


@_reg("aot_unpaired", "AOT (unpaired): sorted r_w vs sorted r_l (batch-coupled)", (_beta(), EPS, FDIV_RKL),
      trl="DPOTrainer:aot_unpaired", batch_coupled=True, batch_build=_aot_unpaired_batch,
      aliases=("aot_pair",), reference="theory §10.2 aot_unpaired")
def _aot_unpaired(v, F, *, beta, label_smoothing, **hp):
    return _aot_loss(v.r_w - v.r_l, F, beta, label_smoothing)


@_reg("apo_zero", "APO-zero: (1 - sigma(beta r_w)) + sigma(beta r_l)", (_beta(), FDIV_RKL),
      trl="DPOTrainer:apo_zero", reference="TRL apo_zero (raw log-ratios)")
def _apo_zero(v, F, *, beta, **hp):
    return (1 - F.sigmoid(beta * v.r_w)) + F.sigmoid(beta * v.r_l)


@_reg("apo_down", "APO-down: sigma(beta r_w) + (1 - sigma(beta (r_w - r_l)))", (_beta(), FDIV_RKL),
      trl="DPOTrainer:apo_down", reference="TRL apo_down (raw log-ratios)")
def _apo_down(v, F, *, beta, **hp):
    return F.sigmoid(beta * v.r_w) + (1 - F.sigmoid(beta * (v.r_w - v.r_l)))


DISCOPOP_TAU = Hyper("discopop_tau", 0.05, "DiscoPOP modulation temperature", lo=0.0, lo_open=True)


@_reg("discopop", "DiscoPOP: log-ratio modulated mix of logistic and exponential losses",
      (_beta(), DISCOPOP_TAU, *_DPO_F), trl="DPOTrainer:discopop", reference="theory §10.2 discopop",
      margin=lambda v, F, beta, **hp: beta * (lambda s: s[0] - s[1])(_scores(v, F, hp)))
def _discopop(v, F, *, beta, discopop_tau, **hp):
    phi_w, phi_l = _scores(v, F, hp)
    z = beta * (phi_w - phi_l)
    mu = F.sigmoid(z / discopop_tau)
    # mu * e^{-z} written as exp(log sigma(z/tau) - z): finite for |z| up to 1e4 in float32.
    return (1 - mu) * (-F.log_sigmoid(z)) + F.exp(F.log_sigmoid(z / discopop_tau) - z)


def _sft_batch(v, F, **hp):
    return -v.chosen_logps.sum() / v.chosen_len.sum()


# TRL accepts (and ignores) an f-divergence with sft; so does the registry.
@_reg("sft", "SFT: token-mean NLL of all chosen completion tokens of the batch", _DPO_F,
      trl="DPOTrainer:sft", uses_reference=False, batch_coupled=True, batch_build=_sft_batch,
      reference="theory §10.2 sft")
def _sft(v, F, **hp):
    return -v.chosen_logps / v.chosen_len


@_reg("sigmoid_norm", "length-normalised reference DPO: -log sigma(beta Dbar)", (_beta(), *_DPO_F),
      trl="DPOTrainer:sigmoid_norm", reference="theory §10.2 sigmoid_norm",
      margin=lambda v, F, beta, **hp: beta * _dbar(v, F, hp))
def _sigmoid_norm(v, F, *, beta, **hp):
    return -F.log_sigmoid(beta * _dbar(v, F, hp))


# ---------------- CPOTrainer family (reference-free, theory §10.4) ----------------

def _cpo_margin(v, F, *, average, alpha):
    lw, ll = (v.avg_w, v.avg_l) if average else (v.chosen_logps, v.rejected_logps)
    if (isinstance(alpha, (int, float)) and alpha == 0) or (isinstance(alpha, sp.Basic) and alpha.is_zero):
        return lw - ll
    # AlphaPO: u = (1 - p^-alpha)/alpha with p = e^{l}: u = -expm1(-alpha l)/alpha, so
    # u_w - u_l = (expm1(-alpha l_l) - expm1(-alpha l_w))/alpha, overflow-guarded in JAX.
    return F.expm1_diff(-alpha * ll, -alpha * lw) / alpha


def _nll(v):
    return -v.chosen_logps / v.chosen_len


SIMPO_GAMMA = Hyper("simpo_gamma", 0.5, "SimPO target reward margin gamma", lo=0.0)


def _cpo_family(name, kind, *, trl, nll_default, description, aliases=(), alpha_default=0.0):
    # Where the NLL is off by definition (SimPO, AlphaPO), derivations keep cpo_alpha = 0.
    nll_h = CPO_ALPHA if nll_default == 1.0 else dataclasses.replace(
        CPO_ALPHA, default=nll_default, keep_value=True)
    hypers = [_beta(), EPS, nll_h, dataclasses.replace(ALPHA_PO, default=alpha_default)]
    if kind == "simpo":
        hypers.insert(2, SIMPO_GAMMA)
    if kind in ("hinge", "ipo"):
        hypers.remove(EPS)  # TRL ignores label smoothing for these (with a warning)
    average = kind in ("simpo", "ipo")

    def margin(v, F, *, beta, alpha, **hp):
        z = _cpo_margin(v, F, average=average, alpha=alpha)
        if kind == "simpo":
            return beta * z - hp["simpo_gamma"]
        if kind == "ipo":
            return z
        return beta * z

    def build(v, F, *, beta, cpo_alpha, alpha, label_smoothing=0.0, **hp):
        z = _cpo_margin(v, F, average=average, alpha=alpha)
        if kind == "sigmoid":
            loss = _aot_loss(z, F, beta, label_smoothing)
        elif kind == "simpo":
            loss = _aot_loss(z - hp["simpo_gamma"] / beta, F, beta, label_smoothing)
        elif kind == "hinge":
            loss = F.relu(1 - beta * z)
        else:
            loss = (z - 1 / (2 * beta)) ** 2
        return loss + cpo_alpha * _nll(v)

    register(LossSpec(name=name, description=description, build=build, hypers=tuple(hypers), trl=trl,
                      uses_reference=False, margin=margin, nll_weight="cpo_alpha", aliases=aliases,
                      nll=lambda v, F, cpo_alpha, **hp: cpo_alpha * _nll(v),
                      reference="CPO/SimPO/AlphaPO papers; TRL experimental CPOTrainer",
                      trl_version=f"{TRL_SEMANTICS} (tested against {TRL_TESTED})"))


_cpo_family("cpo_sigmoid", "sigmoid", trl="CPOTrainer:sigmoid", nll_default=1.0, aliases=("cpo",),
            description="CPO: -log sigma(beta (l_w - l_l)) + cpo_alpha * NLL(chosen)")
_cpo_family("cpo_simpo", "simpo", trl="CPOTrainer:simpo", nll_default=1.0,
            description="CPO-SimPO: -log sigma(beta (lbar_w - lbar_l) - gamma) + cpo_alpha * NLL")
_cpo_family("simpo", "simpo", trl="CPOTrainer:simpo (cpo_alpha=0)", nll_default=0.0,
            description="SimPO: -log sigma(beta (lbar_w - lbar_l) - gamma), no NLL")
_cpo_family("cpo_hinge", "hinge", trl="CPOTrainer:hinge", nll_default=1.0,
            description="CPO hinge: max(0, 1 - beta (l_w - l_l)) + cpo_alpha * NLL")
_cpo_family("cpo_ipo", "ipo", trl="CPOTrainer:ipo", nll_default=1.0,
            description="CPO-IPO: (lbar_w - lbar_l - 1/(2 beta))^2 + cpo_alpha * NLL")
_cpo_family("alphapo", "simpo", trl="CPOTrainer:alphapo", nll_default=0.0,
            description="AlphaPO: SimPO on u = (1 - p^-alpha)/alpha, p = exp(lbar); set alpha != 0")


# ---------------- ORPO (theory §10.5) ----------------


def _orpo_log_odds(v, F):
    # LO = (lbar_w - lbar_l) - [log(1 - e^lbar_w) - log(1 - e^lbar_l)], log1mexp for stability.
    return (v.avg_w - v.avg_l) - (F.log1mexp(v.avg_w) - F.log1mexp(v.avg_l))


def _orpo_batch(v, F, *, beta):
    # TRL: one token mean over all chosen prompt+completion tokens of the batch (not a mean of means).
    nll = -(v.chosen_logps + v.prompt_logps).sum() / (v.chosen_len + v.prompt_len).sum()
    return nll - beta * F.log_sigmoid(_orpo_log_odds(v, F)).mean()


@_reg("orpo", "ORPO: NLL(prompt+chosen) - beta log sigma(log odds ratio)", (_beta(),), trl="ORPOTrainer",
      uses_reference=False, reference="ORPO paper; TRL ORPOTrainer", batch_build=_orpo_batch,
      notes="prompt_logps/prompt_len: the scored prompt tokens of the chosen sequence (TRL's NLL covers "
            "prompt + completion); batch NLL is one token mean over the batch; TRL evaluates the odds "
            "ratio in float32, the registry in the input dtype.",
      nll=lambda v, F, beta: -(v.chosen_logps + v.prompt_logps) / (v.chosen_len + v.prompt_len),
      margin=lambda v, F, beta: _orpo_log_odds(v, F))
def _orpo(v, F, *, beta):
    nll = -(v.chosen_logps + v.prompt_logps) / (v.chosen_len + v.prompt_len)
    return nll - beta * F.log_sigmoid(_orpo_log_odds(v, F))


# ---------------- KTO (paired use, theory §2.2, §10.6) ----------------

# Row convention: TRL's KTOTrainer takes the mean over ROWS and a pair is two rows (chosen row,
# rejected row), so a pair contributes half of the paired-use sum. `reduction="pair_sum"` (default,
# the paired-use loss of the theory) sums the two rows; `reduction="row_mean"` is TRL's value
# (factor 1/2 on the loss and on every incentive and predicted step).
KTO_REDUCTION = Hyper("reduction", "pair_sum", "pair_sum: chosen row + rejected row; row_mean: TRL's mean "
                      "over rows (1/2 of pair_sum)", choices=("pair_sum", "row_mean"))
KTO_H = (_beta(), Hyper("desirable_weight", 1.0, "lambda_D", lo=0.0), Hyper("undesirable_weight", 1.0,
         "lambda_U", lo=0.0), Hyper("kl", 0.0, "detached KL estimate z0 (>= 0; TRL clamps at 0)", lo=0.0),
         KTO_REDUCTION)
_KTO_NOTE = ("TRL's KTO loss is a mean over rows (a pair is two rows): with reduction='pair_sum' (default) "
             "the registry value and incentives are twice TRL's; reduction='row_mean' equals TRL.")


def _kto_scale(reduction, F):
    if reduction != "row_mean":
        return 1
    return sp.Rational(1, 2) if F.name == "sympy" else 0.5


@_reg("kto", "KTO (paired use): lambda_D(1 - sigma(beta(r_w - z0))) + lambda_U(1 - sigma(beta(z0 - r_l)))",
      KTO_H, trl="KTOTrainer:kto", reference="KTO paper; TRL KTOTrainer", notes=_KTO_NOTE,
      # Margin form (derived in this project): L = c (lambda_D - z) with z = h_w - h_l below and
      # c = 1 (pair_sum) or 1/2 (row_mean).
      margin=lambda v, F, *, beta, desirable_weight, undesirable_weight, kl, **hp: (
          desirable_weight * F.sigmoid(beta * (v.r_w - kl)) - undesirable_weight * F.sigmoid(beta * (v.r_l - kl))))
def _kto(v, F, *, beta, desirable_weight, undesirable_weight, kl, reduction="pair_sum"):
    return _kto_scale(reduction, F) * (desirable_weight * (1 - F.sigmoid(beta * (v.r_w - kl)))
                                    + undesirable_weight * (1 - F.sigmoid(beta * (kl - v.r_l))))


@_reg("apo_zero_unpaired", "APO-zero (unpaired rows, paired use): lambda_D(1 - sigma(beta r_w)) + "
      "lambda_U sigma(beta r_l)", (*KTO_H[:3], KTO_REDUCTION), trl="KTOTrainer:apo_zero_unpaired",
      reference="APO paper; TRL KTOTrainer", notes=_KTO_NOTE)
def _apo_zero_unpaired(v, F, *, beta, desirable_weight, undesirable_weight, reduction="pair_sum"):
    return _kto_scale(reduction, F) * (desirable_weight * (1 - F.sigmoid(beta * v.r_w))
                                    + undesirable_weight * F.sigmoid(beta * v.r_l))


# ---------------- TPO (TRL `trl.experimental.tpo.TPOTrainer`) ----------------
# TPO's loss is a reference-free contrastive term on (chosen, rejected) plus tpo_alpha * the
# token-mean NLL of a THIRD, "gold" response. The contrastive term is expressed below. The gold
# NLL is not a function of l_w or l_l: it adds nothing to d_w, d_l, and its effect on the
# chosen/rejected log-probs goes through the gradient overlap of the gold response with g_w and
# g_l, a third Gram row the two-response theory does not carry. So each entry equals TRL's
# TPOTrainer with tpo_alpha = 0 (value and incentives); for tpo_alpha != 0 the incentives still
# equal TRL's and the value differs by tpo_alpha * NLL(gold).

TPO_NOTE = ("equals TRL TPOTrainer with tpo_alpha=0; TRL's gold-response NLL (tpo_alpha * NLL(gold)) "
            "has no incentive on l_w, l_l and is not modelled (it needs a third response)")
TPO_GAMMA = Hyper("tpo_l_gamma", 0.5, "TPO-L target reward margin gamma", lo=0.0)


def _tpo_family(name, kind, description):
    hypers = [_beta(0.01)]
    if kind in ("sigmoid", "tpo-l"):
        hypers.append(EPS)
    if kind == "tpo-l":
        hypers.append(TPO_GAMMA)
    average = kind in ("ipo", "tpo-l")

    def margin(v, F, *, beta, **hp):
        z = (v.avg_w - v.avg_l) if average else (v.chosen_logps - v.rejected_logps)
        return z if kind == "ipo" else beta * z - hp.get("tpo_l_gamma", 0.0)

    def build(v, F, *, beta, label_smoothing=0.0, **hp):
        z = (v.avg_w - v.avg_l) if average else (v.chosen_logps - v.rejected_logps)
        if kind == "sigmoid":
            return _aot_loss(z, F, beta, label_smoothing)
        if kind == "tpo-l":
            return _aot_loss(z - hp["tpo_l_gamma"] / beta, F, beta, label_smoothing)
        if kind == "hinge":
            return F.relu(1 - beta * z)
        return (z - 1 / (2 * beta)) ** 2

    register(LossSpec(name=name, description=description, build=build, hypers=tuple(hypers),
                      trl=f"TPOTrainer:{kind} (tpo_alpha=0)", uses_reference=False, margin=margin,
                      reference="TPO paper; TRL experimental TPOTrainer", notes=TPO_NOTE,
                      trl_version=f"{TRL_SEMANTICS} (tested against {TRL_TESTED})"))


_tpo_family("tpo", "sigmoid", "TPO (contrastive part): -log sigma(beta (l_w - l_l)), beta = 0.01")
_tpo_family("tpo_hinge", "hinge", "TPO hinge (contrastive part): max(0, 1 - beta (l_w - l_l))")
_tpo_family("tpo_ipo", "ipo", "TPO-IPO (contrastive part): (lbar_w - lbar_l - 1/(2 beta))^2")
_tpo_family("tpo_l", "tpo-l", "TPO-L (contrastive part): -log sigma(beta (lbar_w - lbar_l) - gamma)")


# ---------------- Official code (theory §7.1, §10.7) and §2.2 extras ----------------


@_reg("dpop", "DPOP (Smaug): DPO with a penalty lambda * max(0, l_ref_w - l_w) inside the margin",
      (_beta(), Hyper("dpop_lambda", 50.0, "DPOP penalty weight lambda_p (official code: 50)", lo=0.0)),
      trl=None, aliases=("pdpo",), reference="theory §2.2 DPOP, §10.7 pdpo",
      margin=lambda v, F, beta, dpop_lambda: beta * (v.r_w - v.r_l - dpop_lambda * F.relu(-v.r_w)))
def _dpop(v, F, *, beta, dpop_lambda):
    return -F.log_sigmoid(beta * (v.r_w - v.r_l - dpop_lambda * F.relu(v.ref_chosen_logps - v.chosen_logps)))


@_reg("rdpo", "R-DPO: -log sigma(beta D + alpha (n_w - n_l))",
      (_beta(), Hyper("rdpo_alpha", 0.2, "length coefficient (official code: 0.2)")),
      trl=None, reference="theory §2.2 R-DPO, §10.7 rdpo",
      margin=lambda v, F, beta, rdpo_alpha: beta * (v.r_w - v.r_l) + rdpo_alpha * (v.chosen_len - v.rejected_len))
def _rdpo(v, F, *, beta, rdpo_alpha):
    return -F.log_sigmoid(beta * (v.r_w - v.r_l) + rdpo_alpha * (v.chosen_len - v.rejected_len))


@_reg("rrhf", "RRHF (pairwise): max(0, -lbar_w + lbar_l) + cpo_alpha * NLL(chosen)", (CPO_ALPHA,),
      trl=None, uses_reference=False, nll_weight="cpo_alpha", reference="theory §2.2 RRHF, §10.7 rrhf",
      nll=lambda v, F, cpo_alpha: cpo_alpha * _nll(v),
      margin=lambda v, F, cpo_alpha: v.avg_w - v.avg_l)
def _rrhf(v, F, *, cpo_alpha):
    return F.relu(-v.avg_w + v.avg_l) + cpo_alpha * _nll(v)


@_reg("sppo", "SPPO (official code): ((r_w - 0.5/beta)^2 + (r_l + 0.5/beta)^2) / 2", (_beta(),),
      trl=None, reference="theory §10.7 sppo")
def _sppo(v, F, *, beta):
    return ((v.r_w - 1 / (2 * beta)) ** 2 + (v.r_l + 1 / (2 * beta)) ** 2) / 2


@_reg("slic", "SLiC-HF: max(0, delta - (l_w - l_l)) - lambda_nll * l_w (summed NLL)",
      (Hyper("delta", 1.0, "calibration margin delta", lo=0.0, lo_open=True),
       Hyper("lambda_nll", 0.1, "weight of the summed NLL on the chosen response", lo=0.0)),
      trl=None, uses_reference=False, reference="theory §2.2 SLiC-HF",
      nll=lambda v, F, delta, lambda_nll: -lambda_nll * v.chosen_logps,
      margin=lambda v, F, **hp: v.chosen_logps - v.rejected_logps)
def _slic(v, F, *, delta, lambda_nll):
    return F.relu(delta - (v.chosen_logps - v.rejected_logps)) - lambda_nll * v.chosen_logps


@_reg("ipo_sum", "IPO (original, summed log-ratios): (D - 1/(2 beta))^2", (_beta(),), trl=None,
      reference="theory §2.2 IPO (original form)",
      margin=lambda v, F, beta: v.r_w - v.r_l)
def _ipo_sum(v, F, *, beta):
    return (v.r_w - v.r_l - 1 / (2 * beta)) ** 2


# --------------------------------------------------------------------------------------------
# Modifiers acting on token log-probs (theory §10.1)


def ld_logps(token_logps, mask, other_mask, *, ld_alpha):
    """LD-DPO log-prob: sum over the first min(n_w, n_l) tokens + ld_alpha * the rest.

    token_logps, mask: [..., T] of this response; other_mask: [..., T'] of the other response.
    Apply to policy and reference alike (TRL v1.x). Returns [...].
    """
    n_common = jnp.minimum(mask.sum(-1), other_mask.sum(-1))[..., None]
    position = jnp.cumsum(mask, -1)  # 1-based index among real tokens
    weight = jnp.where(position <= n_common, 1.0, ld_alpha) * mask
    return (token_logps * weight).sum(-1)


def wpo_weight(token_logps, token_logsumsq, mask):
    """WPO weight omega = exp(mean_t [log pi(y_t) - log sum_v pi(v)^2]), detached.

    token_logsumsq: [..., T] log sum_v pi(v|ctx)^2 per position. The per-pair loss is multiplied
    by omega_w * omega_l (a constant weight: `stop_gradient`).
    """
    n = jnp.maximum(mask.sum(-1), 1.0)
    return jax.lax.stop_gradient(jnp.exp(((token_logps - token_logsumsq) * mask).sum(-1) / n))


def incentives(spec: LossSpec | str, chosen_logps, rejected_logps, ref_chosen_logps=0.0,
               ref_rejected_logps=0.0, chosen_len=1.0, rejected_len=1.0, **hp):
    """(d_w, d_l) = (-dL/dl_w, +dL/dl_l) of the per-pair loss by autodiff (vectorised over pairs)."""
    spec = get(spec)

    def loss(lw, ll, *rest):
        return spec(lw, ll, *rest, **hp)

    args = [jnp.asarray(x, dtype=jnp.result_type(float)) for x in (
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_len, rejected_len)]
    shape = jnp.broadcast_shapes(*(a.shape for a in args))
    args = [jnp.broadcast_to(a, shape).ravel() for a in args]
    g = jax.vmap(jax.grad(loss, argnums=(0, 1)))(*args)
    return -g[0].reshape(shape), g[1].reshape(shape)


# ---------------- Losses that set the chosen/rejected incentive ratio ----------------

SHIFT_LAMBDA = Hyper("shift_lambda", 0.9, "DPO-Shift factor f(lambda) on the rejected log-ratio (<= 1)",
                     lo=0.0, hi=1.0, lo_open=True)


@_reg("dpo_shift", "DPO-Shift: -log sigma(beta r_w - lambda beta r_l), lambda <= 1", (_beta(), SHIFT_LAMBDA),
      trl=None, reference="DPO-Shift (Yang et al. 2025, arXiv:2502.07599), constant f(lambda) = lambda",
      margin=lambda v, F, beta, shift_lambda: beta * (v.r_w - shift_lambda * v.r_l))
def _dpo_shift(v, F, *, beta, shift_lambda):
    """DPO-Shift (Yang, Jiang, Zhang, Zhao, Li 2025, "DPO-Shift: Shifting the Distribution of Direct
    Preference Optimization", arXiv:2502.07599): the rejected log-ratio scaled by f(lambda) <= 1,
    here a constant lambda (the paper also schedules it). Incentives d_w = beta s, d_l = lambda beta s
    with s = sigma(-z), so t_w = 1/lambda and t_l = lambda (derived in this project)."""
    return -F.log_sigmoid(beta * (v.r_w - shift_lambda * v.r_l))
