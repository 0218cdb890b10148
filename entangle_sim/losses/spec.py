"""The loss definition (`LossSpec`) and its resolved form (`ResolvedLoss`, from `LossSpec.bind`):
one validation of the hyperparameters, then the JAX value, TRL's batch total, the symbolic
engine's incentives and the first-order prediction of one step, all on one `PairState`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import sympy as sp

from .. import regimes
from ..symbolic.dynamics import derive as _symbolic_derive
from ..symbolic.symbols import PAIR_VARS
from ..types import PairState
from .base import JAX, SYM, Hyper, PairVars, did_you_mean

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
                         + did_you_mean(name, [h.name for h in self.hypers])
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

            >>> from entangle_sim import losses
            >>> dpo = losses.get("sigmoid").bind(beta=0.5)
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


def _checked(state):
    """The state, after refusing concrete (untraced) lengths n_w, n_l <= 0 or prompt_len < 0: the
    formulas divide by the lengths, and a 0 there gives NaN or inf, never an error."""
    for name, lo in (("chosen_len", 0.0), ("rejected_len", 0.0), ("prompt_len", None)):
        x = getattr(state, name)
        if isinstance(x, jax.core.Tracer):
            continue
        bad = (x <= lo) if lo is not None else (x < 0)
        if bool(jnp.any(bad | jnp.isnan(x))):
            raise ValueError(f"{name} must be {'> 0' if lo is not None else '>= 0'} (a token count), got "
                             f"{jnp.ravel(x)[jnp.argmax(jnp.ravel(bad | jnp.isnan(x)))]!r}")
    return state


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

        >>> from entangle_sim import losses
        >>> from entangle_sim.types import PairState
        >>> dpo = losses.get("sigmoid").bind(beta=0.1)
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
        """Per-pair loss [...] of a `PairState` (ValueError for a concrete length <= 0)."""
        state = _checked(state.as_arrays())
        return self.spec.build(PairVars(**state._asdict()), JAX, **self.hp)

    def batch(self, state) -> Any:
        """TRL's total loss of a batch of pairs ([B] state -> scalar)."""
        v = PairVars(**_checked(state.broadcast())._asdict())
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
