"""Registry of margin-based preference losses (docs/theory.md §2.2 and §10).

Every loss is written ONCE, as a builder `build(v, F, **hp)` over a math backend `F`:
with `F = JAX` it is the JAX per-pair loss, with `F = SYM` it is the SymPy expression that the
symbolic engine differentiates. One source of truth, two backends; the tests prove the SymPy
derivatives equal `jax.grad` and finite differences, and match docs/theory.md §10's formulas.

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
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from types import SimpleNamespace
from typing import Any, Callable

import jax
import jax.numpy as jnp
import sympy as sp

from .symbolic.functions import Log1mExp, LogSigmoid, Sigmoid, jax_log1mexp
from .symbolic.symbols import PAIR_VARS, hyper_symbol

# --------------------------------------------------------------------------------------------
# Backends: the small vocabulary the loss builders use.


def _jax_relu(x):
    return jnp.maximum(x, 0.0)


JAX = SimpleNamespace(
    name="jax", log_sigmoid=jax.nn.log_sigmoid, sigmoid=jax.nn.sigmoid, exp=jnp.exp, log=jnp.log,
    expm1=jnp.expm1, log1mexp=jax_log1mexp, relu=_jax_relu, minimum=jnp.minimum,
)

SYM = SimpleNamespace(
    name="sympy", log_sigmoid=LogSigmoid, sigmoid=Sigmoid, exp=sp.exp, log=sp.log,
    expm1=lambda x: sp.exp(x) - 1, log1mexp=Log1mExp, relu=lambda x: sp.Max(0, x), minimum=sp.Min,
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

    @property
    def structural(self) -> bool:
        return self.choices is not None

    def check(self, value) -> None:
        """Raise ValueError if a concrete value is invalid; traced values are not checked."""
        if self.choices is not None:
            if value not in self.choices:
                raise ValueError(f"hyperparameter {self.name}={value!r} is not one of {list(self.choices)}")
            return
        if isinstance(value, (jax.core.Tracer, sp.Basic)):
            return
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"hyperparameter {self.name}={value!r} is not a number") from None
        if not math.isfinite(x):
            raise ValueError(f"hyperparameter {self.name}={value!r} must be finite")
        if self.lo is not None and (x < self.lo or (self.lo_open and x == self.lo)):
            raise ValueError(f"hyperparameter {self.name}={value!r} out of range {self.range_str()}")
        if self.hi is not None and (x > self.hi or (self.hi_open and x == self.hi)):
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


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
FDIV = Hyper("f_divergence_type", "reverse_kl", "score map phi(r) of the log-ratio (TRL §10.1)",
             choices=F_DIVERGENCES)
FALPHA = Hyper("f_alpha_divergence_coef", 0.5, "alpha-divergence coefficient a", lo=None)
EPS = Hyper("label_smoothing", 0.0, "label smoothing epsilon", lo=0.0, hi=0.5, hi_open=True, keep_value=True)
CPO_ALPHA = Hyper("cpo_alpha", 1.0, "weight of the token-mean NLL on the chosen completion", lo=0.0)
ALPHA_PO = Hyper("alpha", 0.0, "AlphaPO reward shape: u = (1 - p^-alpha)/alpha (0: plain log-prob)",
                 keep_value=True)
ALPHA_CLAMP = 80.0  # TRL clamps the alpha-divergence exponent at 80 in fp32/bf16


def score(r, F, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    """TRL's score map phi(r) (theory §10.1): reverse_kl r; forward_kl -e^-r; js log sigma(r);
    alpha e^{min((a-1) r, 80)}/(a-1), falling back to r when |a-1| < 1e-6 (concrete a only)."""
    if f_divergence_type == "reverse_kl":
        return r
    if f_divergence_type == "forward_kl":
        return -F.exp(-r)
    if f_divergence_type == "js_divergence":
        return F.log_sigmoid(r)
    if f_divergence_type == "alpha_divergence":
        a = f_alpha_divergence_coef
        if isinstance(a, (int, float)) and abs(a - 1.0) < 1e-6:
            return r
        return F.exp(F.minimum((a - 1) * r, ALPHA_CLAMP)) / (a - 1)
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
    reference: str = ""  # where the formula comes from (docs/theory.md section)

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

    # ---- JAX
    def __call__(self, chosen_logps, rejected_logps, ref_chosen_logps=0.0, ref_rejected_logps=0.0,
                 chosen_len=1.0, rejected_len=1.0, *, prompt_logps=0.0, prompt_len=0.0, **hp):
        hp = self.resolve(**hp)
        v = _jax_vars(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                      chosen_len, rejected_len, prompt_logps, prompt_len)
        return self.build(v, JAX, **hp)

    def batch(self, chosen_logps, rejected_logps, ref_chosen_logps=0.0, ref_rejected_logps=0.0,
              chosen_len=1.0, rejected_len=1.0, *, prompt_logps=0.0, prompt_len=0.0, **hp):
        """TRL's total loss over a batch of pairs ([B] inputs -> scalar)."""
        hp = self.resolve(**hp)
        v = _jax_vars(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                      chosen_len, rejected_len, prompt_logps, prompt_len)
        shape = jnp.broadcast_shapes(*(jnp.shape(x) for x in vars(v).values()))
        v = PairVars(**{k: jnp.broadcast_to(x, shape) for k, x in vars(v).items()})
        if self.batch_build is not None:
            return self.batch_build(v, JAX, **hp)
        per_pair = self.build(v, JAX, **hp)
        if self.nll_weight is None:
            return per_pair.mean()
        # TRL's NLL is a token mean over the whole batch, not a mean of per-pair token means.
        w = hp[self.nll_weight]
        per_pair_nll = -v.chosen_logps / v.chosen_len
        return (per_pair - w * per_pair_nll).mean() + w * (-v.chosen_logps.sum() / v.chosen_len.sum())

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
            "description": self.description,
            "aliases": list(self.aliases),
            "uses_reference": self.uses_reference,
            "batch_coupled": self.batch_coupled,
            "hyperparameters": {h.name: {"default": h.default, "range": h.range_str(), "doc": h.doc}
                                for h in self.hypers},
        }


def _jax_vars(*args) -> PairVars:
    names = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
             "chosen_len", "rejected_len", "prompt_logps", "prompt_len")
    vals = {}
    for k, x in zip(names, args):
        x = jnp.asarray(x)
        vals[k] = x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.result_type(float))
    return PairVars(**vals)


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
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise ValueError(f"unknown loss {name!r}" + _did_you_mean(name, [*_REGISTRY, *_ALIASES])
                         + "; run `entangle-sim losses` for the list")
    return _REGISTRY[key]


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
    def deco(build):
        register(LossSpec(name=name, description=description, build=build, hypers=tuple(hypers),
                          trl=trl, **kw))
        return build
    return deco


_DPO_F = (FDIV, FALPHA)

# ---------------- DPOTrainer (TRL v1.9.0, theory §10.2) ----------------


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
    q, log_q, log_1mq = F.sigmoid(z), F.log_sigmoid(z), F.log_sigmoid(-z)  # stable log q, log(1-q)
    eps = label_smoothing
    return q * (log_q - F.log(1 - eps)) + (1 - q) * (log_1mq - F.log(eps))


@_reg("nca_pair", "NCA (pairwise): absolute per-response terms", (_beta(), *_DPO_F),
      trl="DPOTrainer:nca_pair", reference="theory §10.2 nca_pair")
def _nca_pair(v, F, *, beta, **hp):
    phi_w, phi_l = _scores(v, F, hp)
    return (-F.log_sigmoid(beta * phi_w) - F.log_sigmoid(-beta * phi_w) / 2
            - F.log_sigmoid(-beta * phi_l) / 2)


@_reg("robust", "Robust DPO: unbiased under label-flip rate eps", (_beta(), EPS, *_DPO_F),
      trl="DPOTrainer:robust", reference="theory §10.2 robust",
      margin=lambda v, F, beta, **hp: beta * (lambda s: s[0] - s[1])(_scores(v, F, hp)))
def _robust(v, F, *, beta, label_smoothing, **hp):
    phi_w, phi_l = _scores(v, F, hp)
    z, eps = beta * (phi_w - phi_l), label_smoothing
    return (-(1 - eps) * F.log_sigmoid(z) + eps * F.log_sigmoid(-z)) / (1 - 2 * eps)


@_reg("bco_pair", "BCO (pairwise): -log sigma(beta phi_w) - log sigma(-beta phi_l)", (_beta(), *_DPO_F),
      trl="DPOTrainer:bco_pair", reference="theory §10.2 bco_pair (v1.x, no running-mean shift)")
def _bco_pair(v, F, *, beta, **hp):
    phi_w, phi_l = _scores(v, F, hp)
    return -F.log_sigmoid(beta * phi_w) - F.log_sigmoid(-beta * phi_l)


@_reg("sppo_hard", "SPPO (hard labels): (phi_w - 1/(2beta))^2 + (phi_l + 1/(2beta))^2",
      (_beta(), *_DPO_F), trl="DPOTrainer:sppo_hard", reference="theory §10.2 sppo_hard")
def _sppo_hard(v, F, *, beta, **hp):
    phi_w, phi_l = _scores(v, F, hp)
    return (phi_w - 1 / (2 * beta)) ** 2 + (phi_l + 1 / (2 * beta)) ** 2


def _aot_loss(x, F, beta, eps):
    return -(1 - eps) * F.log_sigmoid(beta * x) - eps * F.log_sigmoid(-beta * x)


def _aot_batch(v, F, *, beta, label_smoothing):
    # Both sides sorted independently along the batch (raw log-probs; ignores f-divergence).
    x = jnp.sort(v.chosen_logps - v.rejected_logps) - jnp.sort(v.ref_chosen_logps - v.ref_rejected_logps)
    return _aot_loss(x, F, beta, label_smoothing).mean()


def _aot_unpaired_batch(v, F, *, beta, label_smoothing):
    x = jnp.sort(v.r_w) - jnp.sort(v.r_l)
    return _aot_loss(x, F, beta, label_smoothing).mean()


@_reg("aot", "AOT (paired): sorted margins vs sorted reference margins (batch-coupled)", (_beta(), EPS),
      trl="DPOTrainer:aot", batch_coupled=True, batch_build=_aot_batch, reference="theory §10.2 aot")
def _aot(v, F, *, beta, label_smoothing):
    # A batch of one pair: the sort is the identity.
    return _aot_loss((v.chosen_logps - v.rejected_logps) - (v.ref_chosen_logps - v.ref_rejected_logps),
                     F, beta, label_smoothing)


@_reg("aot_unpaired", "AOT (unpaired): sorted r_w vs sorted r_l (batch-coupled)", (_beta(), EPS),
      trl="DPOTrainer:aot_unpaired", batch_coupled=True, batch_build=_aot_unpaired_batch,
      aliases=("aot_pair",), reference="theory §10.2 aot_unpaired")
def _aot_unpaired(v, F, *, beta, label_smoothing):
    return _aot_loss(v.r_w - v.r_l, F, beta, label_smoothing)


@_reg("apo_zero", "APO-zero: (1 - sigma(beta r_w)) + sigma(beta r_l)", (_beta(),),
      trl="DPOTrainer:apo_zero", reference="theory §10.2 apo_zero (raw log-ratios)")
def _apo_zero(v, F, *, beta):
    return (1 - F.sigmoid(beta * v.r_w)) + F.sigmoid(beta * v.r_l)


@_reg("apo_down", "APO-down: sigma(beta r_w) + (1 - sigma(beta D))", (_beta(), *_DPO_F),
      trl="DPOTrainer:apo_down", reference="theory §10.2 apo_down (first term raw r_w)")
def _apo_down(v, F, *, beta, **hp):
    phi_w, phi_l = _scores(v, F, hp)
    return F.sigmoid(beta * v.r_w) + (1 - F.sigmoid(beta * (phi_w - phi_l)))


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


def _sft_batch(v, F):
    return -v.chosen_logps.sum() / v.chosen_len.sum()


@_reg("sft", "SFT: token-mean NLL of all chosen completion tokens of the batch", (),
      trl="DPOTrainer:sft", uses_reference=False, batch_coupled=True, batch_build=_sft_batch,
      reference="theory §10.2 sft")
def _sft(v, F):
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
    # AlphaPO: u = (1 - p^-alpha)/alpha with p = e^{l}: u = -expm1(-alpha l)/alpha.
    return (-F.expm1(-alpha * lw) + F.expm1(-alpha * ll)) / alpha


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
                      reference="theory §10.4 CPOTrainer"))


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


@_reg("orpo", "ORPO: NLL(prompt+chosen) - beta log sigma(log odds ratio)", (_beta(),), trl="ORPOTrainer",
      uses_reference=False, reference="theory §2.2 ORPO, §10.5",
      nll=lambda v, F, beta: -(v.chosen_logps + v.prompt_logps) / (v.chosen_len + v.prompt_len),
      margin=lambda v, F, beta: _orpo_log_odds(v, F))
def _orpo(v, F, *, beta):
    nll = -(v.chosen_logps + v.prompt_logps) / (v.chosen_len + v.prompt_len)
    return nll - beta * F.log_sigmoid(_orpo_log_odds(v, F))


# ---------------- KTO (paired use, theory §2.2, §10.6) ----------------

KTO_H = (_beta(), Hyper("desirable_weight", 1.0, "lambda_D", lo=0.0), Hyper("undesirable_weight", 1.0,
         "lambda_U", lo=0.0), Hyper("kl", 0.0, "detached KL estimate z0 (>= 0; TRL clamps at 0)", lo=0.0))


@_reg("kto", "KTO (paired use): lambda_D(1 - sigma(beta(r_w - z0))) + lambda_U(1 - sigma(beta(z0 - r_l)))",
      KTO_H, trl="KTOTrainer:kto", reference="theory §2.2 KTO, §10.6",
      # Margin form (derived in this project): L = lambda_D - z with z = h_w - h_l below.
      margin=lambda v, F, *, beta, desirable_weight, undesirable_weight, kl: (
          desirable_weight * F.sigmoid(beta * (v.r_w - kl)) - undesirable_weight * F.sigmoid(beta * (v.r_l - kl))))
def _kto(v, F, *, beta, desirable_weight, undesirable_weight, kl):
    return (desirable_weight * (1 - F.sigmoid(beta * (v.r_w - kl)))
            + undesirable_weight * (1 - F.sigmoid(beta * (kl - v.r_l))))


@_reg("apo_zero_unpaired", "APO-zero (unpaired rows, paired use): lambda_D(1 - sigma(beta r_w)) + "
      "lambda_U sigma(beta r_l)", KTO_H[:3], trl="KTOTrainer:apo_zero_unpaired",
      reference="theory §10.6")
def _apo_zero_unpaired(v, F, *, beta, desirable_weight, undesirable_weight):
    return desirable_weight * (1 - F.sigmoid(beta * v.r_w)) + undesirable_weight * F.sigmoid(beta * v.r_l)


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
